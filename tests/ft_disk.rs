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
    let reference = tempfile::tempdir().unwrap();
    let run = tandem(&[
        "vm",
        "run",
        "--wasm",
        s(&churn),
        "--datastore",
        s(reference.path()),
        "--arg",
        steps,
        "--arg",
        ms,
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let want = contents(reference.path());
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
