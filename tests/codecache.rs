//! The compiled-code cache end to end: the real `tandem` binary starts the large generated
//! guest (`bigcode.wasm`, 11 MB of wasm) with a cache folder of the test's own; the log's
//! `code cache:` line (debug level) says whether the code was loaded or compiled. Damaged entries are
//! rebuilt, never run; concurrent starts share the folder safely.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Run, guest, s, workspace};

/// What the cache did is a debug line.
const LOG: &str = "warn,machine::codecache=debug";

/// The `tandem` binary with the cache's debug lines on.
fn tandem_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.args(args).env("TANDEM_LOG", LOG);
    c
}

fn tandem(args: &[&str]) -> Run {
    let run = Run::from(tandem_cmd(args).output().expect("running tandem"));
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run
}

fn expected() -> String {
    guest("bigcode.wasm");
    std::fs::read_to_string(workspace().join("guests/build/bigcode.expected")).unwrap()
}

/// `tandem vm run` of bigcode with `cache` as the compiled-code cache.
fn start(cache: &Path) -> Run {
    let g = guest("bigcode.wasm");
    tandem(&["--code-cache", s(cache), "vm", "run", "--wasm", s(&g)])
}

/// A start that printed the right result; its log.
fn start_ok(cache: &Path) -> String {
    let run = start(cache);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stdout, expected(), "{}", run.stderr);
    run.stderr
}

/// The cache's entries (temporary files excluded: they start with a dot).
fn entries(cache: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|x| x == "cwasm"));
    v.sort();
    v
}

fn leftovers(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|x| x != "cwasm"))
        .collect()
}

#[test]
fn a_second_start_loads_the_code_the_first_compiled() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("code");
    let log = start_ok(&cache);
    assert!(log.contains("code cache: miss"), "{log}");
    assert_eq!(entries(&cache).len(), 1);
    let log = start_ok(&cache);
    assert!(log.contains("code cache: hit"), "{log}");
    assert!(!log.contains("miss"), "{log}");

    // Without the cache nothing is read or written.
    let g = guest("bigcode.wasm");
    let run = tandem(&["--no-code-cache", "vm", "run", "--wasm", s(&g)]);
    assert_eq!(run.stdout, expected(), "{}", run.stderr);
    assert!(!run.stderr.contains("code cache"), "{}", run.stderr);

    // The environment names the cache when no flag does.
    let other = dir.path().join("from-env");
    let out = tandem_cmd(&["vm", "run", "--wasm", s(&g)])
        .env("TANDEM_CODE_CACHE", &other)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected());
    assert_eq!(entries(&other).len(), 1);
}

#[test]
fn a_copy_instrumented_for_snapshots_is_cached_under_its_own_key() {
    // A VM serving its control API runs the Asyncify-instrumented module: its code is
    // another module's, under another key, and the plain module's entry is not taken.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("code");
    let g = guest("clockcheck.wasm");
    let plain = tandem(&["--code-cache", s(&cache), "vm", "run", "--wasm", s(&g)]);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    assert_eq!(entries(&cache).len(), 1);
    let sock = dir.path().join("api.sock");
    let argv = [
        "--code-cache",
        s(&cache),
        "vm",
        "run",
        "--wasm",
        s(&g),
        "--api-sock",
        s(&sock),
    ];
    let inst = tandem(&argv);
    assert_eq!(inst.code, 0, "{}", inst.stderr);
    assert_eq!(inst.stdout, plain.stdout);
    assert!(inst.stderr.contains("code cache: miss"), "{}", inst.stderr);
    assert_eq!(entries(&cache).len(), 2);
    let again = tandem(&argv);
    assert!(again.stderr.contains("code cache: hit"), "{}", again.stderr);
    assert_eq!(again.stdout, plain.stdout);
}

/// Damage the one entry of `cache` with `damage`, start: the damage is reported with
/// `why`, the entry rebuilt and the output right; the next start loads the new entry.
fn damaged(cache: &Path, why: &str, damage: impl FnOnce(&Path)) {
    let entry = entries(cache).pop().expect("an entry");
    damage(&entry);
    let log = start_ok(cache);
    assert!(
        log.contains("rejected") && log.contains(why) && log.contains("code cache: miss"),
        "damage not reported as {why:?}: {log}"
    );
    let log = start_ok(cache);
    assert!(log.contains("code cache: hit"), "not rebuilt: {log}");
}

#[test]
fn a_damaged_or_stale_entry_is_reported_deleted_and_rebuilt_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("code");
    start_ok(&cache);
    let flip = |at: fn(u64) -> u64| {
        move |p: &Path| {
            let mut b = std::fs::read(p).unwrap();
            let i = at(b.len() as u64) as usize;
            b[i] ^= 0x01;
            std::fs::write(p, b).unwrap();
        }
    };
    // One bit of the compiled code.
    damaged(&cache, "does not match its hash", flip(|n| n / 2));
    // One bit of the last byte.
    damaged(&cache, "does not match its hash", flip(|n| n - 1));
    // The format version.
    damaged(&cache, "entry format", flip(|_| 8));
    // The magic.
    damaged(&cache, "no entry magic", flip(|_| 0));
    // Cut short, and cut inside the header.
    damaged(&cache, "truncated", |p| {
        let n = std::fs::metadata(p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(n - 4096)
            .unwrap();
    });
    damaged(&cache, "truncated", |p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(20)
            .unwrap();
    });
    // Another module's entry renamed into place: whole and hashed right, but another key.
    let other = guest("clockcheck.wasm");
    let run = tandem(&["--code-cache", s(&cache), "vm", "run", "--wasm", s(&other)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let all = entries(&cache);
    assert_eq!(all.len(), 2);
    let ours = {
        // The newest is clockcheck's; ours is the other.
        let mut by_time = all.clone();
        by_time.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
        by_time[0].clone()
    };
    let theirs = all.iter().find(|p| **p != ours).unwrap().clone();
    std::fs::rename(&theirs, &ours).unwrap();
    damaged(&cache, "another key", |_| {});
    // A link in the entry's place is not followed.
    let target = dir.path().join("elsewhere.cwasm");
    damaged(&cache, "symbolic link", |p| {
        std::fs::rename(p, &target).unwrap();
        std::os::unix::fs::symlink(&target, p).unwrap();
    });
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
}

#[test]
fn a_folder_others_can_write_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("code");
    start_ok(&cache);
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let log = start_ok(&cache);
    assert!(log.contains("not this user's alone"), "{log}");
    assert!(!log.contains("code cache: hit"), "{log}");
}

#[test]
fn two_starts_at_once_with_an_empty_cache_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("code");
    let g = guest("bigcode.wasm");
    let spawn = || {
        tandem_cmd(&["--code-cache", s(&cache), "vm", "run", "--wasm", s(&g)])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let mut misses = 0;
    for child in [a, b] {
        let run = Run::from(child.wait_with_output().unwrap());
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(run.stdout, expected(), "{}", run.stderr);
        // Both find the cache empty (a compile takes seconds, both read it at once); were
        // one delayed that long it would load the other's entry, which is right too.
        assert!(!run.stderr.contains("rejected"), "{}", run.stderr);
        misses += usize::from(run.stderr.contains("code cache: miss"));
    }
    assert!(misses >= 1);
    assert_eq!(entries(&cache).len(), 1);
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
    let log = start_ok(&cache);
    assert!(log.contains("code cache: hit"), "{log}");
}
