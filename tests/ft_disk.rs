//! Fault tolerance of the datastore: a guest whose files change under it as real programs'
//! files do (a journal rotated by renaming, a data file written through a descriptor kept
//! across rename, a scratch file unlinked while open) survives the death of its primary's
//! host, and its files end exactly as an uninterrupted run leaves them.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Lab, guest, s, tandem};

const LOG_ADDR: &str = "10.78.0.11:7000";

/// Every file below `dir`: relative name and content (times and inodes differ by run).
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    common::tree(dir)
        .into_iter()
        .map(|(p, c, _)| (p.strip_prefix(dir).unwrap().to_path_buf(), c))
        .collect()
}

#[test]
fn renamed_rotated_and_unlinked_open_files_survive_a_primary_host_kill() {
    let churn = guest("filechurn.wasm");
    let (steps, ms) = ("300", "10");

    // The reference: the same guest run unprotected, start to end.
    let want = reference_run(&churn, &[steps, ms]);
    assert!(
        want.iter().any(|(p, _)| p == Path::new("app.log.5")),
        "the guest rotated its log: {want:?}"
    );

    let mut lab = Lab::up("fd", 2);
    let shared = PathBuf::from(format!("/tmp/{}-shared", lab.name));
    let data = shared.join("churn/data");
    std::fs::create_dir_all(&data).unwrap();
    let primary = lab.start_vm(
        1,
        &[
            "ft",
            "primary",
            "--vm",
            "churn",
            "--shared",
            s(&shared),
            "--log-listen",
            LOG_ADDR,
            "--wasm",
            s(&churn),
            "--datastore",
            s(&data),
            "--arg",
            steps,
            "--arg",
            ms,
        ],
        &shared.join("primary.out"),
    );
    let secondary = lab.start_vm(
        2,
        &[
            "ft",
            "secondary",
            "--vm",
            "churn",
            "--shared",
            s(&shared),
            "--primary",
            LOG_ADDR,
            "--wasm",
            s(&churn),
            "--datastore",
            s(&data),
        ],
        &shared.join("secondary.out"),
    );
    let log =
        |who: &str| std::fs::read_to_string(shared.join(format!("{who}.out"))).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(shared.join("churn/status"))
        .unwrap_or_default()
        .contains("protected=true")
    {
        assert!(
            Instant::now() < deadline,
            "never protected:\n{}\n{}",
            log("primary"),
            log("secondary")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Mid-run: some rotations done, more to come.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        lab.exited(primary).is_none(),
        "the guest finished before the kill:\n{}",
        log("primary")
    );
    let r = tandem(&["lab", "kill", "--name", &lab.name, "host1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let code = lab.wait_exit(secondary, Duration::from_secs(30), "the secondary");
    let out = log("secondary");
    assert_eq!(code, 0, "the secondary's run:\n{out}");
    assert!(
        out.contains("went live"),
        "the secondary never went live:\n{out}"
    );
    assert!(
        out.contains(&format!("filechurn: {steps} steps, 0 bad reads")),
        "{out}"
    );
    assert_eq!(
        contents(&data),
        want,
        "the files differ from an uninterrupted run's"
    );
}

/// The files an uninterrupted, unprotected run of `wasm` with `args` leaves.
fn reference_run(wasm: &Path, args: &[&str]) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let mut a = vec!["vm", "run", "--wasm", s(wasm), "--datastore", s(dir.path())];
    for x in args {
        a.extend(["--arg", x]);
    }
    let run = tandem(&a);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    contents(dir.path())
}

/// `tandem ARGS` in this namespace (an FT pair on loopback), its stdout and stderr in
/// `dir/WHO` and `dir/WHO.err`.
fn spawn(dir: &Path, who: &str, args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    let out = |name: String| std::fs::File::create(dir.join(name)).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(out(who.to_string()))
        .stderr(out(format!("{who}.err")))
        .spawn()
        .expect("starting tandem")
}

/// Wait (bounded) for `c`; how it ended, or `None` if it had to be killed.
fn wait_child(c: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(dir: &Path, who: &str) -> String {
    std::fs::read_to_string(dir.join(who)).unwrap_or_default()
}

/// What both copies said, for a failing assertion.
fn story(dir: &Path) -> String {
    format!(
        "primary:\n{}{}\nsecondary:\n{}{}",
        read(dir, "primary"),
        read(dir, "primary.err"),
        read(dir, "secondary"),
        read(dir, "secondary.err")
    )
}

/// A primary that dies right after performing a disk operation that must not be done
/// twice — before its event reached the log or the secondary — leaves a secondary that
/// answers the guest as the primary would have: the operation is not done again (a rename
/// would fail ENOENT, a mkdir EEXIST), its outcome is taken from the disk, and descriptors
/// held across a rename keep working. For each of the guest's ten such operations in turn,
/// the files end exactly as an uninterrupted run's.
#[test]
fn a_primary_dying_right_after_a_non_idempotent_disk_operation_is_not_redone_at_go_live() {
    let wasm = guest("uncertain.wasm");
    let want = reference_run(&wasm, &[]);
    let results = String::from_utf8_lossy(
        &want
            .iter()
            .find(|(p, _)| p == Path::new("results"))
            .expect("the guest writes its results")
            .1,
    )
    .into_owned();
    assert_eq!(results.lines().count(), 15, "{results}");
    assert!(results.lines().all(|l| l.ends_with("= 0 ok")), "{results}");

    let port0 = 20_000 + (std::process::id() % 20_000) as u16;
    // mkdir, O_EXCL create, rename, link, symlink, unlink, rename over an open file,
    // rename of a folder held open, unlink, rmdir.
    for k in 1..=10u16 {
        // The guest waits a second first: the secondary is attached before its first
        // operation.
        let (shared, story) = run_to_failpoint(
            &wasm,
            "u",
            port0 + k,
            &["1000"],
            format!("die-after-uncertain:{k}"),
            false,
        );
        assert_eq!(
            contents(&shared.path().join("u/data")),
            want,
            "the files differ from an uninterrupted run's: {story}"
        );
    }
}

/// An FT pair of `wasm` (VM `vm`, the guest's arguments `args`, the logging channel on
/// loopback `port`) whose primary dies by `failpoint`, the secondary started first if
/// `secondary_first`: the secondary must go live and finish the run. Shared storage (the
/// datastore at `VM/data`) and what both copies said.
fn run_to_failpoint(
    wasm: &Path,
    vm: &str,
    port: u16,
    args: &[&str],
    failpoint: String,
    secondary_first: bool,
) -> (tempfile::TempDir, String) {
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path();
    let data = dir.join(format!("{vm}/data"));
    std::fs::create_dir_all(&data).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let ft = [
        "--vm",
        vm,
        "--shared",
        s(dir),
        "--wasm",
        s(wasm),
        "--datastore",
        s(&data),
    ];
    let mut primary_args = vec!["ft", "primary", "--log-listen", &addr];
    for a in args {
        primary_args.extend(["--arg", a]);
    }
    primary_args.extend(ft);
    let secondary_args = [&["ft", "secondary", "--primary", &addr][..], &ft].concat();
    let env = [("TANDEM_FAILPOINT", failpoint.clone())];
    let (mut primary, mut secondary) = if secondary_first {
        let sec = spawn(dir, "secondary", &secondary_args, &[]);
        (spawn(dir, "primary", &primary_args, &env), sec)
    } else {
        let p = spawn(dir, "primary", &primary_args, &env);
        (p, spawn(dir, "secondary", &secondary_args, &[]))
    };
    let p = wait_child(&mut primary, Duration::from_secs(20));
    let sec = wait_child(&mut secondary, Duration::from_secs(20));
    let story = format!("failpoint {failpoint}\n{}", story(dir));
    assert_eq!(
        p.map(|p| p.code()),
        Some(None),
        "the primary died by its failpoint: {story}"
    );
    assert_eq!(sec.and_then(|s| s.code()), Some(0), "{story}");
    assert!(read(dir, "secondary.err").contains("went live"), "{story}");
    (shared, story)
}

/// A write whose outcome the guest was given before it was performed (write-behind, while
/// a secondary is gated) and that the primary never performed — its host died after the
/// write's event reached the secondary — is written again by the secondary as it goes
/// live: the files end exactly as an uninterrupted run's, for a write to a journal, to a
/// data file renamed while open, and one after a rotation.
#[test]
fn a_write_the_primary_never_performed_is_written_again_at_go_live() {
    let churn = guest("filechurn.wasm");
    let (steps, ms) = ("120", "10");
    let want = reference_run(&churn, &[steps, ms]);
    let port0 = 24_000 + (std::process::id() % 20_000) as u16;
    for k in [1u16, 2, 101] {
        // The secondary first: it waits for the primary, so that the guest is protected
        // (and its writes go behind) from its first steps.
        let (shared, story) = run_to_failpoint(
            &churn,
            "w",
            port0 + k,
            &[steps, ms],
            format!("die-before-write-behind:{k}"),
            true,
        );
        assert!(
            read(shared.path(), "primary.err").contains("which the secondary holds"),
            "the primary died with the write's event at the secondary: {story}"
        );
        let again = read(shared.path(), "secondary.err")
            .lines()
            .find_map(|l| {
                l.split("going live: ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
            .unwrap_or(0);
        assert!(again >= 1, "nothing was written again: {story}");
        assert_eq!(
            contents(&shared.path().join("w/data")),
            want,
            "the files differ from an uninterrupted run's: {story}"
        );
    }
}

/// An operator's stop of a secondary makes it leave: it exits at once without claiming a
/// generation, the primary carries on unprotected and finishes the run, and the stop is
/// never kept for a later go-live.
#[test]
fn sigterm_to_a_secondary_makes_it_leave_and_the_primary_carries_on() {
    let churn = guest("filechurn.wasm");
    let want = reference_run(&churn, &["200", "10"]);
    let shared = tempfile::tempdir().unwrap();
    let dir = shared.path();
    let data = dir.join("c/data");
    std::fs::create_dir_all(&data).unwrap();
    let addr = format!(
        "127.0.0.1:{}",
        40_000 + (std::process::id() % 20_000) as u16
    );
    let ft = [
        "--vm",
        "c",
        "--shared",
        s(dir),
        "--wasm",
        s(&churn),
        "--datastore",
        s(&data),
    ];
    let mut primary = spawn(
        dir,
        "primary",
        &[
            &[
                "ft",
                "primary",
                "--log-listen",
                &addr,
                "--arg",
                "200",
                "--arg",
                "10",
            ][..],
            &ft,
        ]
        .concat(),
        &[],
    );
    let mut secondary = spawn(
        dir,
        "secondary",
        &[&["ft", "secondary", "--primary", &addr][..], &ft].concat(),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read(dir, "c/status").contains("protected=true") {
        assert!(Instant::now() < deadline, "never protected: {}", story(dir));
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(secondary.id() as i32, libc::SIGTERM) };
    let sec = wait_child(&mut secondary, Duration::from_secs(5));
    assert_eq!(
        sec.and_then(|s| s.code()),
        Some(0),
        "the secondary left at once: {}",
        story(dir)
    );
    assert!(
        read(dir, "secondary.err").contains("left on request"),
        "{}",
        story(dir)
    );
    let p = wait_child(&mut primary, Duration::from_secs(20));
    assert_eq!(
        p.and_then(|p| p.code()),
        Some(0),
        "the primary finished the run: {}",
        story(dir)
    );
    assert!(
        read(dir, "primary").contains("filechurn: 200 steps, 0 bad reads"),
        "{}",
        story(dir)
    );
    assert!(
        !read(dir, "secondary").contains("filechurn"),
        "the secondary never went live: {}",
        story(dir)
    );
    assert_eq!(contents(&data), want, "{}", story(dir));
}
