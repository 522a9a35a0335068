//! The Tandem VM end to end: the real `tandem` binary runs real wasm32-wasi guests built
//! from C, records them, and replays the recordings.

mod common;

use common::{events_and_digest, guest, s, tandem, tree};
use machine::event::{Kind, Outcome};
use machine::log::{LogReader, write_log};

/// Record `wasm` with `args` in `datastore` into `log`; returns (events, digest, stdout).
fn record(
    wasm: &str,
    datastore: &std::path::Path,
    log: &std::path::Path,
    args: &[&str],
) -> (u64, String, String) {
    let g = guest(wasm);
    let mut argv = vec![
        "vm",
        "run",
        "--wasm",
        s(&g),
        "--datastore",
        s(datastore),
        "--record",
        s(log),
    ];
    for a in args {
        argv.push("--arg");
        argv.push(a);
    }
    let run = tandem(&argv);
    assert_eq!(
        run.code, 0,
        "recording {wasm} failed: {}{}",
        run.stdout, run.stderr
    );
    let (n, d) = events_and_digest(run.last_line(), "recorded: ");
    (n, d, run.stdout)
}

fn replay(wasm: &str, log: &std::path::Path) -> common::Run {
    let g = guest(wasm);
    tandem(&["vm", "replay", s(log), "--wasm", s(&g)])
}

#[test]
fn ordinary_programs_record_and_replay_identically_without_touching_the_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    // Several runs, so that the journal and the notes folder carry state between them.
    for i in 0..3 {
        let log = dir.path().join(format!("fsdemo{i}.tlog"));
        let (events, digest, stdout) = record("fsdemo.wasm", &ds, &log, &[&format!("run{i}")]);
        assert!(
            stdout.contains(&format!("journal holds {} runs", i + 1)),
            "{stdout}"
        );
        assert!(events > 10, "fsdemo made only {events} events");

        let before = tree(&ds);
        let run = replay("fsdemo.wasm", &log);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        // A replay prints its verdict and nothing of the guest's console.
        assert_eq!(
            run.stdout.lines().count(),
            1,
            "replay wrote console output: {}",
            run.stdout
        );
        assert_eq!(
            events_and_digest(run.last_line(), "replay ok: "),
            (events, digest)
        );
        assert!(before == tree(&ds), "replay changed the datastore");
    }
    assert!(ds.join("journal.log").is_file());
    assert_eq!(
        std::fs::read_to_string(ds.join("journal.log"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // A text-processing program that was not written for Tandem either.
    let text =
        "the quick brown fox jumps over the lazy dog\nThe dog sleeps; the fox runs.\n".repeat(200);
    std::fs::write(ds.join("input.txt"), &text).unwrap();
    let log = dir.path().join("wordfreq.tlog");
    let (events, digest, stdout) = record("wordfreq.wasm", &ds, &log, &["input.txt", "freq.txt"]);
    assert!(stdout.contains("3000 words, 10 distinct"), "{stdout}");
    let freq = std::fs::read_to_string(ds.join("freq.txt")).unwrap();
    assert_eq!(freq.lines().next(), Some("800 the"));
    let run = replay("wordfreq.wasm", &log);
    assert_eq!(
        events_and_digest(run.last_line(), "replay ok: "),
        (events, digest)
    );
}

#[test]
fn recordings_of_different_runs_differ_and_each_replays_to_its_own_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (a_ds, b_ds) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a_ds).unwrap();
    std::fs::create_dir(&b_ds).unwrap();
    let (la, lb) = (dir.path().join("a.tlog"), dir.path().join("b.tlog"));
    // Same program, same arguments: only entropy and time differ, and the digest shows it.
    let (_, da, _) = record("fsdemo.wasm", &a_ds, &la, &["x"]);
    let (_, db, _) = record("fsdemo.wasm", &b_ds, &lb, &["x"]);
    assert_ne!(
        da, db,
        "two live runs with fresh entropy produced the same outputs"
    );
    assert_eq!(
        events_and_digest(replay("fsdemo.wasm", &la).last_line(), "replay ok: ").1,
        da
    );
    assert_eq!(
        events_and_digest(replay("fsdemo.wasm", &lb).last_line(), "replay ok: ").1,
        db
    );
}

#[test]
fn a_flipped_byte_anywhere_is_refused_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let log = dir.path().join("good.tlog");
    record("fsdemo.wasm", &ds, &log, &["flip"]);
    let good = std::fs::read(&log).unwrap();
    let bad = dir.path().join("bad.tlog");
    // Positions across the header, the first chunk's header and body, and the last byte.
    let n = good.len();
    for at in [0, 9, 12, 20, n / 3, n / 2, 2 * n / 3, n - 5, n - 1] {
        let mut b = good.clone();
        b[at] ^= 0x01;
        std::fs::write(&bad, &b).unwrap();
        let run = replay("fsdemo.wasm", &bad);
        assert_eq!(run.code, 2, "flip at {at}: {}{}", run.stdout, run.stderr);
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "flip at {at}: {}",
            run.stderr
        );
        assert!(
            // A flipped length in the file header makes it look cut short (refused all the
            // same); chunk heads carry their own checksum, so in a chunk it is damage.
            [
                "corrupted",
                "truncated",
                "not a Tandem event log",
                "version"
            ]
            .iter()
            .any(|w| run.stderr.contains(w)),
            "flip at {at}: {}",
            run.stderr
        );
    }
}

#[test]
fn a_log_cut_short_replays_up_to_the_cut_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let log = dir.path().join("good.tlog");
    record("fsdemo.wasm", &ds, &log, &["cut"]);
    let good = std::fs::read(&log).unwrap();
    let cut = dir.path().join("cut.tlog");
    // Inside the file header: not a log at all.
    for len in [0, 5, 30] {
        std::fs::write(&cut, &good[..len]).unwrap();
        let run = replay("fsdemo.wasm", &cut);
        assert_eq!(run.code, 2, "cut at {len}: {}{}", run.stdout, run.stderr);
        assert!(
            run.stderr.contains("truncated") || run.stderr.contains("not a Tandem event log"),
            "cut at {len}: {}",
            run.stderr
        );
    }
    // Inside the chunks (fsdemo's run is short: one chunk, torn): a cut, exit 5.
    for len in [good.len() / 2, good.len() - 1] {
        std::fs::write(&cut, &good[..len]).unwrap();
        let run = replay("fsdemo.wasm", &cut);
        assert_eq!(run.code, 5, "cut at {len}: {}{}", run.stdout, run.stderr);
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "cut at {len}: {}", run.stdout);
        let (n, _) = events_and_digest(lines[1], "replay ok: ");
        assert!(
            lines[0].starts_with(&format!("cut: the log ends after {n} events")),
            "cut at {len}: {}",
            run.stdout
        );
    }
}

/// A `tandem` process whose stdout is read line by line as it comes.
struct Live {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Live {
    fn start(args: &[&str]) -> Live {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting tandem");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Live {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait (at most 20 s) for a line satisfying `want`; returns it.
    fn wait_line(&mut self, want: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no such line; stdout so far: {:?}", self.seen);
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, which it still is (not yet waited for).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Wait for the process to exit, at most `bound` (it is killed and the test fails
    /// otherwise); returns its exit code (-1 for a signal), how long it took, and the rest
    /// of its stdout.
    fn wait_exit(mut self, bound: std::time::Duration) -> (i32, std::time::Duration, Vec<String>) {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let took = start.elapsed();
                let mut rest = std::mem::take(&mut self.seen);
                rest.extend(self.lines.iter());
                return (status.code().unwrap_or(-1), took, rest);
            }
            if start.elapsed() > bound {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "tandem did not exit within {bound:?}; stdout: {:?}",
                    self.seen
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[test]
fn sigterm_stops_a_guest_that_makes_no_calls_and_its_recording_replays_to_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let spin = guest("spin.wasm");
    let log = dir.path().join("spin.tlog");
    // Generous bound (the stop itself takes about 0.3 s): not a timing test.
    let bound = std::time::Duration::from_secs(3);
    let api = dir.path().join("api.sock");
    // The third run is of the module instrumented for snapshots (it serves a control
    // API): it is watched the same way.
    for (record, instrumented) in [(false, false), (true, false), (true, true)] {
        let mut args = vec!["vm", "run", "--wasm", s(&spin)];
        if record {
            args.extend(["--record", s(&log)]);
        }
        if instrumented {
            args.extend(["--api-sock", s(&api)]);
        }
        let mut vm = Live::start(&args);
        vm.wait_line(|l| l == "spinning");
        // Let it spin: it has made its last call.
        std::thread::sleep(std::time::Duration::from_millis(300));
        vm.signal(libc::SIGTERM);
        let (code, took, out) = vm.wait_exit(bound);
        assert_eq!(code, 0, "record={record} {instrumented}: {out:?}");
        assert!(
            took < bound,
            "record={record} {instrumented}: took {took:?}"
        );
        if !record {
            continue;
        }
        let (events, digest) = events_and_digest(out.last().unwrap(), "recorded: ");
        assert_eq!(
            events, 1,
            "spin makes one call (a clock read), then computes"
        );

        // The replay stops where the recording stopped: between events, after the last
        // one; it does not spin forever, nor call the log damaged.
        let mut rep = Live::start(&["vm", "replay", s(&log), "--wasm", s(&spin)]);
        rep.wait_line(|l| l.starts_with("replay ok:"));
        let (code, _, out) = rep.wait_exit(std::time::Duration::from_secs(10));
        assert_eq!(code, 0, "{out:?}");
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(events_and_digest(&out[1], "replay ok: "), (events, digest));
        assert!(
            out[0].starts_with("stopped:") && out[0].contains("between events, after 1 events"),
            "{out:?}"
        );
    }
}

#[test]
fn sigterm_during_a_wait_stops_at_the_call_and_the_replay_compares_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let spin = guest("spin.wasm");
    let log = dir.path().join("tick.tlog");
    let mut vm = Live::start(&[
        "vm",
        "run",
        "--wasm",
        s(&spin),
        "--record",
        s(&log),
        "--arg",
        "tick",
    ]);
    vm.wait_line(|l| l == "ticks 200");
    // The guest spends its time sleeping in poll_oneoff: the stop finds it at a call.
    vm.signal(libc::SIGTERM);
    let (code, _, out) = vm.wait_exit(std::time::Duration::from_secs(3));
    assert_eq!(code, 0, "{out:?}");
    let (events, digest) = events_and_digest(out.last().unwrap(), "recorded: ");
    assert!(events >= 200, "{events} events");
    let run = replay("spin.wasm", &log);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(
        lines[0].starts_with(&format!(
            "stopped: the recorded run was stopped by the host at its call after {events} events"
        )),
        "{}",
        run.stdout
    );
    assert_eq!(events_and_digest(lines[1], "replay ok: "), (events, digest));
}

#[test]
fn a_recording_killed_mid_run_replays_up_to_where_it_was_cut() {
    let dir = tempfile::tempdir().unwrap();
    let spin = guest("spin.wasm");
    let log = dir.path().join("tick.tlog");
    // One event per millisecond: far from filling a batch, so only the writer's time
    // limit puts them on disk before the kill.
    let mut vm = Live::start(&[
        "vm",
        "run",
        "--wasm",
        s(&spin),
        "--record",
        s(&log),
        "--arg",
        "tick",
    ]);
    vm.wait_line(|l| l == "ticks 500");
    vm.signal(libc::SIGKILL);
    let (code, _, out) = vm.wait_exit(std::time::Duration::from_secs(3));
    assert_eq!(code, -1, "killed");
    let ticks: u64 = out
        .iter()
        .filter_map(|l| l.strip_prefix("ticks "))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap();
    let run = replay("spin.wasm", &log);
    assert_eq!(run.code, 5, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    let (events, _) = events_and_digest(lines[1], "replay ok: ");
    assert!(
        lines[0].starts_with(&format!(
            "cut: the log ends after {events} events without an end record"
        )),
        "{}",
        run.stdout
    );
    // The guest had made at least `ticks` calls when it said so; at most the last ~50 ms
    // (a few dozen events here) may be lost. 400 leaves room for a loaded machine.
    assert!(
        events + 400 >= ticks,
        "the log holds {events} events; the guest had made {ticks} calls"
    );

    // Damage inside the cut log (more data follows it) is still damage.
    let good = std::fs::read(&log).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x01;
    let damaged = dir.path().join("damaged.tlog");
    std::fs::write(&damaged, &bad).unwrap();
    let run = replay("spin.wasm", &damaged);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("corrupted"), "{}", run.stderr);
}

/// Rewrite `log` with `alter` applied to its events.
fn alter_log(
    log: &std::path::Path,
    out: &std::path::Path,
    alter: impl Fn(&mut Vec<machine::event::Event>),
) {
    let (header, mut events, end) = LogReader::open(log).unwrap().read_all().unwrap();
    alter(&mut events);
    write_log(out, &header, &events, &end).unwrap();
}

#[test]
fn an_altered_but_valid_event_is_reported_as_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let log = dir.path().join("good.tlog");
    record("fsdemo.wasm", &ds, &log, &["alter"]);

    // Different entropy: the guest prints another token, so its outputs diverge.
    let altered = dir.path().join("entropy.tlog");
    let seq = std::cell::Cell::new(None);
    alter_log(&log, &altered, |events| {
        let e = events
            .iter_mut()
            .find(|e| e.kind == Kind::RandomGet)
            .expect("fsdemo reads entropy");
        if let Outcome::Data(d) = &mut e.outcome {
            d.make_mut()[0] ^= 0xff;
        }
        seq.set(Some(e.seq));
    });
    let run = replay("fsdemo.wasm", &altered);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let line = run.last_line();
    let at: u64 = line
        .strip_prefix("replay diverged at event ")
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a divergence line: {line:?}"));
    assert!(
        at > seq.get().unwrap(),
        "divergence reported at {at}, before the altered event"
    );

    // A different file read result: the journal count the guest prints changes.
    let altered = dir.path().join("read.tlog");
    alter_log(&log, &altered, |events| {
        let e = events
            .iter_mut()
            .find(|e| {
                e.kind == Kind::FdRead && matches!(&e.outcome, Outcome::Data(d) if !d.is_empty())
            })
            .expect("fsdemo reads its journal");
        e.outcome = Outcome::Data(b"run a\nrun b\nrun c\n".to_vec().into());
    });
    let run = replay("fsdemo.wasm", &altered);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert!(
        run.last_line().starts_with("replay diverged at event "),
        "{}",
        run.stdout
    );

    // An event of another kind where the guest makes a clock call.
    let altered = dir.path().join("kind.tlog");
    alter_log(&log, &altered, |events| {
        let e = events
            .iter_mut()
            .find(|e| e.kind == Kind::ClockTimeGet)
            .expect("fsdemo reads the clock");
        e.kind = Kind::RandomGet;
    });
    let run = replay("fsdemo.wasm", &altered);
    assert_eq!(run.code, 3);
    assert!(run.last_line().contains("ClockTimeGet"), "{}", run.stdout);

    // Events the guest never asks for.
    let altered = dir.path().join("extra.tlog");
    alter_log(&log, &altered, |events| {
        let mut extra = events.last().unwrap().clone();
        extra.seq += 1;
        events.push(extra);
    });
    let run = replay("fsdemo.wasm", &altered);
    assert_eq!(run.code, 3);
    assert!(run.last_line().contains("more events"), "{}", run.stdout);
}

#[test]
fn the_clock_never_goes_backwards_even_when_the_log_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let log = dir.path().join("clock.tlog");
    let (events, digest, stdout) = record("clockcheck.wasm", &ds, &log, &["3000"]);
    assert!(stdout.contains("never backwards"), "{stdout}");
    // Make every other logged clock reading jump back an hour. The guest must still see a
    // clock that never goes backwards, so it prints the same verdict: same digest.
    let altered = dir.path().join("backwards.tlog");
    alter_log(&log, &altered, |events| {
        let mut n = 0;
        for e in events.iter_mut().filter(|e| e.kind == Kind::ClockTimeGet) {
            n += 1;
            if let (Outcome::Value(t), true) = (&mut e.outcome, n % 2 == 0) {
                *t = t.saturating_sub(3_600_000_000_000);
            }
        }
        assert!(n >= 6000, "clockcheck read the clock {n} times");
    });
    let run = replay("clockcheck.wasm", &altered);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        events_and_digest(run.last_line(), "replay ok: "),
        (events, digest)
    );
}

#[test]
fn bad_input_gives_one_clear_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"this is not wasm at all").unwrap();
    let fake_wasm = dir.path().join("fake.wasm");
    std::fs::write(&fake_wasm, b"\0asm\x01\0\0\0\xff\xff\xff").unwrap();
    let fs = guest("fsdemo.wasm");
    let badimport = guest("badimport.wasm");
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let log = dir.path().join("w.tlog");
    std::fs::write(ds.join("t.txt"), "some words").unwrap();
    record("wordfreq.wasm", &ds, &log, &["t.txt"]);
    let missing = dir.path().join("nope");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["vm", "run", "--wasm", s(&missing)], "cannot read"),
        (
            vec!["vm", "run", "--wasm", s(&junk)],
            "not a WebAssembly module",
        ),
        (
            vec!["vm", "run", "--wasm", s(&fake_wasm)],
            "not a WebAssembly module",
        ),
        (
            vec!["vm", "run", "--wasm", s(&badimport)],
            "env::launch_missiles",
        ),
        (
            vec!["vm", "run", "--wasm", s(&fs), "--datastore", s(&missing)],
            "not a directory",
        ),
        (
            vec!["vm", "run", "--wasm", s(&fs), "--env", "NOEQUALS"],
            "K=V",
        ),
        (
            vec!["vm", "replay", s(&missing), "--wasm", s(&fs)],
            "cannot open log",
        ),
        (
            vec!["vm", "replay", s(&junk), "--wasm", s(&fs)],
            "not a Tandem event log",
        ),
        (
            vec!["vm", "replay", s(&log), "--wasm", s(&fs)],
            "different module",
        ),
    ];
    for (args, want) in cases {
        let run = tandem(&args);
        assert_eq!(run.code, 2, "{args:?}: {}{}", run.stdout, run.stderr);
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains(want),
            "{args:?}: want {want:?} in {}",
            run.stderr
        );
    }
}

#[test]
fn the_guest_exit_code_is_passed_on_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let log = dir.path().join("w.tlog");
    // wordfreq with a missing input exits 1 after perror: both live and in replay.
    let g = guest("wordfreq.wasm");
    let run = tandem(&[
        "vm",
        "run",
        "--wasm",
        s(&g),
        "--datastore",
        s(&ds),
        "--record",
        s(&log),
        "--arg",
        "absent.txt",
    ]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("absent.txt"), "{}", run.stderr);
    let (events, digest) = events_and_digest(run.last_line(), "recorded: ");
    let rep = replay("wordfreq.wasm", &log);
    assert_eq!(rep.code, 0, "{}{}", rep.stdout, rep.stderr);
    assert_eq!(
        events_and_digest(rep.last_line(), "replay ok: "),
        (events, digest)
    );
}

#[test]
fn bench_counts_and_durations_out_of_range_are_refused_before_any_work() {
    for (args, flag) in [
        (&["bench", "ft", "--kills", "0"][..], "--kills"),
        (&["bench", "ft", "--kills", "51"][..], "--kills"),
        (&["bench", "ft", "--soak-secs", "86401"][..], "--soak-secs"),
        (
            &["bench", "ft", "--soak-secs", "18446744073709551615"][..],
            "--soak-secs",
        ),
        (&["bench", "ft", "--timeout-ms", "149"][..], "--timeout-ms"),
        (
            &["bench", "ft", "--timeout-ms", "60001"][..],
            "--timeout-ms",
        ),
        (&["bench", "vm", "--rounds", "0"][..], "--rounds"),
        (&["bench", "vm", "--rounds", "101"][..], "--rounds"),
    ] {
        let r = tandem(args);
        assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains(flag) && r.stderr.contains("is not in"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("bench:"), "{args:?} began: {}", r.stderr);
    }
}

/// SIGTERM ends a bench as a shell reports a process that signal ended (143; Ctrl-C's
/// 130 is tested with a lab in tests/ft.rs), with no figures.
#[test]
fn a_bench_stopped_by_sigterm_exits_143_without_figures() {
    use std::io::{BufRead, Read};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "vm", "--quick"])
        .env("TANDEM_GUESTS", guest("bench_io.wasm").parent().unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting tandem");
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(first.starts_with("bench: "), "{first}");
    // Both pipes drained while it ends: a child blocked writing one would look stuck.
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        rest
    });
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    // SAFETY: kill(2) on our own child's pid, not yet waited for.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let sent = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("still running 20 s after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (rest, out) = (rest.join().unwrap(), out.join().unwrap());
    assert_eq!(status.code(), Some(143), "{first}{rest}");
    assert!(rest.contains("bench interrupted (SIGTERM)"), "{rest}");
    assert!(!rest.contains("panicked"), "{rest}");
    assert_eq!(out, "", "figures printed after SIGTERM");
}

#[test]
fn bench_vm_reports_its_ratios_as_json() {
    let run = tandem(&["bench", "vm", "--quick", "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let v: serde_json::Value = serde_json::from_str(run.last_line()).expect("one JSON object");
    for key in [
        "record_ratio",
        "wasm_native_ratio",
        "netstack_loopback_ratio",
        "kvd_ops_per_s",
        "kvd_record_ratio",
        "start_first_s",
        "start_cached_s",
    ] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}");
    }
    assert!(v["io_events"].as_u64().unwrap() > 1000, "{v}");
    assert!(
        v["record_us_per_event"]
            .as_f64()
            .is_some_and(f64::is_finite),
        "{v}"
    );
    // Start-up is measured on a module of 10 MiB or more, beside wasmtime's own compile
    // (or the reason it could not be run).
    assert!(v["start_module_bytes"].as_u64().unwrap() >= 10 << 20, "{v}");
    assert!(
        v["wasmtime_compile_s"].as_f64().is_some_and(|x| x > 0.0)
            || v["wasmtime_skipped"].is_string(),
        "{v}"
    );
}
