//! The Tandem VM's file layer against the references, with real programs built from C
//! (`tests/c`):
//!
//! - Differential: the same POSIX program (`tests/c/posix.c`, one scenario per run) built
//!   natively and run in a fresh folder (Linux, the reference) and built for wasm32-wasi and
//!   run under `tandem vm run` with a fresh datastore: same stdout, same exit code, same
//!   resulting file tree (names, types, contents, symlink targets).
//! - Escape: a datastore holding symlinks that lead outside it; the guest
//!   (`tests/c/escape.c`) tries every operation through them and through `..`, and tries to
//!   remove or move the datastore itself. Every attempt is refused as wasmtime refuses it
//!   (same output as under wasmtime), the world outside is unchanged, and the datastore stands.

mod common;
#[path = "c/harness.rs"]
mod harness;

use harness::{Node, Target, build, differences, native, snapshot, tandem, wasmtime};
use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::Path;

/// Run scenario `name` natively and under Tandem in two fresh folders and compare.
fn differential(name: &str) {
    let exe = build("posix", Target::Native);
    let wasm = build("posix", Target::Wasm);
    let dir = tempfile::tempdir().unwrap();
    let (linux_dir, tandem_dir) = (dir.path().join("linux"), dir.path().join("tandem"));
    std::fs::create_dir(&linux_dir).unwrap();
    std::fs::create_dir(&tandem_dir).unwrap();

    let want = native(&exe, &linux_dir, &[name]);
    assert_eq!(
        (want.code, want.stdout.lines().last()),
        (0, Some("done")),
        "the Linux reference run of {name} did not finish: {}{}",
        want.stdout,
        want.stderr
    );
    let got = tandem(&wasm, &tandem_dir, &[name], &[]);
    let (w, g) = (snapshot(&linux_dir, None), snapshot(&tandem_dir, None));
    let diff = differences("linux", &want, &got, Some((&w, &g)));
    assert!(
        diff.is_empty(),
        "scenario {name}: tandem differs from Linux\n{diff}"
    );
}

macro_rules! scenarios {
    ($($test:ident => $name:literal,)*) => {$(
        #[test]
        fn $test() {
            differential($name);
        }
    )*};
}

scenarios! {
    o_append_writes_land_at_the_end_of_the_file => "append",
    descriptors_follow_renamed_files_and_folders => "rename",
    log_rotation_keeps_both_logs_apart => "rotate",
    an_unlinked_or_replaced_open_file_stays_readable_and_writable => "unlink_open",
    readdir_while_unlinking_removes_all_1000_files_in_one_pass => "readdir_unlink",
    readdir_lists_dot_and_dotdot_and_seekdir_returns_to_a_cookie => "readdir_dots",
    renumber_moves_a_descriptor_and_onto_itself_is_a_no_op => "renumber",
    symlinks_inside_the_datastore_work_as_on_linux => "symlinks",
    hard_links_work_as_on_linux => "hardlinks",
    a_trailing_slash_on_a_file_is_not_a_directory => "trailing_slash",
    futimens_changes_the_open_file_after_rename_and_recreate => "times",
    truncate_seek_pread_pwrite_work_as_on_linux => "truncseek",
}

/// `base/outside` (the sentinel world) and `base/ds` (the datastore) with the links the
/// escape guest tries: absolute and relative, to a folder, to a file, and dangling.
fn escape_world(base: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (outside, ds) = (base.join("outside"), base.join("ds"));
    for d in [outside.join("keep"), outside.join("sub"), ds.join("sub")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(outside.join("secret.txt"), "secret\n").unwrap();
    std::fs::write(outside.join("sub/inner.txt"), "inner\n").unwrap();
    std::fs::write(ds.join("inside.txt"), "inside\n").unwrap();
    symlink(&outside, ds.join("out_dir")).unwrap();
    symlink(outside.join("secret.txt"), ds.join("abs_file")).unwrap();
    symlink(outside.join("created"), ds.join("dangling")).unwrap();
    symlink("../outside", ds.join("rel_up")).unwrap();
    symlink("../../outside", ds.join("sub/deep_up")).unwrap();
    symlink("../outside/created2", ds.join("rel_dangling")).unwrap();
    (outside, ds)
}

/// One entry of `common::tree`: path, content, modification time.
type Entry = (std::path::PathBuf, Vec<u8>, std::time::SystemTime);

/// Lines of an escape run that report an escape attempt as having succeeded.
fn escapes_allowed(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("escape: "))
        .filter(|l| !(l.contains("= -1 E") || (l.contains("= E") && !l.ends_with("= OK"))))
        .collect()
}

#[test]
fn sandbox_escapes_are_refused_as_in_wasmtime_and_the_outside_is_untouched() {
    let wasm = build("escape", Target::Wasm);
    let dir = tempfile::tempdir().unwrap();
    let (tbase, wbase) = (dir.path().join("t"), dir.path().join("w"));
    let (t_out, t_ds) = escape_world(&tbase);
    let (_, w_ds) = escape_world(&wbase);
    let before = common::tree(&t_out);

    let (got, want) = std::thread::scope(|sc| {
        let w = sc.spawn(|| wasmtime(&wasm, &w_ds, &[], &[]));
        let t = tandem(&wasm, &t_ds, &[], &[]);
        (t, w.join().unwrap())
    });
    assert_eq!(
        (want.code, want.stdout.lines().last()),
        (0, Some("done")),
        "the wasmtime reference run did not finish: {}{}",
        want.stdout,
        want.stderr
    );
    assert!(
        escapes_allowed(&want.stdout).is_empty(),
        "the reference allowed an escape: {:?}",
        escapes_allowed(&want.stdout)
    );

    let mut failures = String::new();
    if !t_ds.is_dir() {
        failures.push_str("the datastore itself is gone\n");
    }
    let after = common::tree(&t_out);
    if before != after {
        let names = |t: &[Entry]| {
            t.iter()
                .map(|(p, c, m)| {
                    format!("{} {:?} {:?}", p.display(), String::from_utf8_lossy(c), m)
                })
                .collect::<Vec<_>>()
                .join("\n    ")
        };
        failures.push_str(&format!(
            "the folder outside the datastore changed:\n  before:\n    {}\n  after:\n    {}\n",
            names(&before),
            names(&after)
        ));
    }
    let allowed = escapes_allowed(&got.stdout);
    if !allowed.is_empty() {
        failures.push_str(&format!("escapes allowed:\n  {}\n", allowed.join("\n  ")));
    }
    let (w, g): (BTreeMap<String, Node>, BTreeMap<String, Node>) = (
        snapshot(&w_ds, Some(&wbase)),
        if t_ds.is_dir() {
            snapshot(&t_ds, Some(&tbase))
        } else {
            BTreeMap::new()
        },
    );
    failures.push_str(&differences("wasmtime", &want, &got, Some((&w, &g))));
    assert!(failures.is_empty(), "{failures}");
}
