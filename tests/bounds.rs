//! Every input from a guest is hostile until bounded: a guest asking for 80 MiB of entropy
//! at once, a 64 MiB read, a gather of 256 iovecs over one buffer, or five million poll
//! subscriptions gets what Linux would give it, the host allocates only bounded parts, and
//! the log of the run replays.

mod common;

use common::{events_and_digest, guest, s, tandem};

/// Record `hostile MODE ARGS` in a fresh datastore, replay it, and return the guest's
/// output (the recorded digest and the replayed one must agree).
fn record_and_replay(mode: &[&str]) -> String {
    let ds = tempfile::tempdir().unwrap();
    let log = ds
        .path()
        .join("../")
        .join(format!("bounds-{}-{}.tlog", mode[0], std::process::id()));
    let wasm = guest("hostile.wasm");
    let mut args = vec![
        "vm",
        "run",
        "--wasm",
        s(&wasm),
        "--datastore",
        s(ds.path()),
        "--record",
        s(&log),
    ];
    for m in mode {
        args.extend(["--arg", m]);
    }
    let run = tandem(&args);
    assert_eq!(run.code, 0, "{mode:?}: {}{}", run.stdout, run.stderr);
    let (events, digest) = events_and_digest(run.last_line(), "recorded: ");
    let replay = tandem(&["vm", "replay", s(&log), "--wasm", s(&wasm)]);
    let _ = std::fs::remove_file(&log);
    assert_eq!(
        replay.code, 0,
        "{mode:?}: {}{}",
        replay.stdout, replay.stderr
    );
    assert_eq!(
        events_and_digest(replay.last_line(), "replay ok: "),
        (events, digest),
        "{mode:?}: the replay differs from the recording"
    );
    let out: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| !l.starts_with("recorded: "))
        .collect();
    out.join("\n")
}

#[test]
fn an_80_mib_random_get_is_served_in_parts_and_replays() {
    let out = record_and_replay(&["random"]);
    assert_eq!(
        out, "random: errno 0, 83886080 bytes, zeros below 1%: 1",
        "{out}"
    );
}

#[test]
fn a_64_mib_read_gets_all_of_it_and_replays() {
    let out = record_and_replay(&["bigread"]);
    assert_eq!(out, "bigread: got 67108864 of 67108864, same: 1", "{out}");
}

#[test]
fn a_gather_of_256_iovecs_over_one_buffer_is_written_in_bounded_parts() {
    // 256 iovecs over one 4 MiB buffer: 1 GiB gathered and written in 16 MiB parts. (The
    // host's gather is bounded per part whatever the iovecs ask; `wasi::tests` checks
    // 256 × 256 MiB without writing 2 GiB to disk.)
    let out = record_and_replay(&["gather", "4"]);
    assert_eq!(out, "gather: errno 0, wrote 1073741824", "{out}");
}

#[test]
fn five_million_subscriptions_and_an_unknown_clock_are_refused() {
    let out = record_and_replay(&["poll"]);
    // 28 = EINVAL, at once, with nothing logged for them.
    assert_eq!(
        out, "poll: errno 28, events 0\npoll unknown clock: errno 28",
        "{out}"
    );
}
