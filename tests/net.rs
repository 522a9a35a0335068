//! The VM's network end to end: real namespaces, bridges and taps, real kvd and httpd
//! guests, and real, unmodified clients (redis-cli, redis-benchmark, curl, ping).

mod common;

use common::{Lab, events_and_digest, guest, kvd_args, s, tandem};

/// `redis-cli -h 10.77.0.10 ARGS` from the client: its trimmed output.
fn cli(lab: &Lab, args: &[&str]) -> String {
    let mut a = vec!["-h", "10.77.0.10"];
    a.extend_from_slice(args);
    let r = lab.client("redis-cli", &a);
    assert_eq!(r.code, 0, "redis-cli {args:?}: {}{}", r.stdout, r.stderr);
    r.stdout.trim().to_string()
}

#[test]
fn kvd_serves_real_redis_clients_and_keeps_its_data_across_a_restart() {
    let mut lab = Lab::up("kv", 1);
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    std::fs::create_dir(&ds).unwrap();
    let kvd = guest("kvd.wasm");
    let args = kvd_args(&kvd, &ds, &[]);
    let vm = lab.start_vm(1, &args, &dir.path().join("vm1.out"));
    lab.wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");

    let ping = lab.client("ping", &["-c", "3", "-i", "0.2", "-W", "2", "10.77.0.10"]);
    assert!(ping.stdout.contains("3 received"), "{}", ping.stdout);

    assert_eq!(cli(&lab, &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(cli(&lab, &["GET", "greeting"]), "hello world");
    assert_eq!(cli(&lab, &["INCR", "visits"]), "1");
    assert_eq!(cli(&lab, &["INCRBY", "visits", "41"]), "42");
    assert_eq!(cli(&lab, &["EXISTS", "greeting", "visits", "nothing"]), "2");
    assert_eq!(cli(&lab, &["SET", "doomed", "x"]), "OK");
    assert_eq!(cli(&lab, &["DEL", "doomed"]), "1");
    assert_eq!(cli(&lab, &["GET", "doomed"]), "");

    let bench = lab.redis_benchmark(common::KVD_LOAD);
    assert_eq!(bench.code, 0, "{}{}", bench.stdout, bench.stderr);
    let text = bench.stdout.replace('\r', "\n");
    for t in ["SET", "GET", "INCR"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{t}: ")) && l.contains("requests per second")),
            "{t} missing: {text}"
        );
    }
    // redis-benchmark's INCR hits one key 20000 times.
    assert_eq!(cli(&lab, &["GET", "counter:__rand_int__"]), "20000");
    let keys: u64 = cli(&lab, &["DBSIZE"]).parse().unwrap();

    assert_eq!(lab.stop_vm(vm), 0);
    let again = lab.start_vm(1, &args, &dir.path().join("vm2.out"));
    lab.wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    assert_eq!(cli(&lab, &["GET", "greeting"]), "hello world");
    assert_eq!(cli(&lab, &["GET", "visits"]), "42");
    assert_eq!(cli(&lab, &["GET", "counter:__rand_int__"]), "20000");
    assert_eq!(cli(&lab, &["DBSIZE"]).parse::<u64>().unwrap(), keys);
    assert_eq!(lab.stop_vm(again), 0);
}

#[test]
fn httpd_serves_files_over_keep_alive() {
    let mut lab = Lab::up("http", 1);
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("www");
    std::fs::create_dir_all(ds.join("docs")).unwrap();
    std::fs::write(ds.join("index.html"), "<h1>hello from a Tandem VM</h1>\n").unwrap();
    std::fs::write(ds.join("docs/notes.txt"), "some notes\n").unwrap();
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(ds.join("big.bin"), &big).unwrap();
    let httpd = guest("httpd.wasm");
    let vm = lab.start_vm(
        1,
        &[
            "vm",
            "run",
            "--wasm",
            s(&httpd),
            "--datastore",
            s(&ds),
            "--nic",
            "bridge=br-vm,mac=02:00:00:00:00:11,ip=10.77.0.11/24",
            "--listen",
            "tcp:80",
        ],
        &dir.path().join("vm.out"),
    );
    lab.wait_for(
        "curl",
        &["-s", "http://10.77.0.11/"],
        "hello from a Tandem VM",
    );

    // Three requests on one connection: curl says it re-used it.
    let r = lab.client(
        "curl",
        &[
            "-sv",
            "http://10.77.0.11/",
            "http://10.77.0.11/docs/notes.txt",
            "http://10.77.0.11/missing",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("hello from a Tandem VM") && r.stdout.contains("some notes"),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.stderr.matches("Re-using existing connection").count(),
        2,
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("< HTTP/1.1 404 Not Found"),
        "{}",
        r.stderr
    );

    let out = dir.path().join("big.out");
    let r = lab.client(
        "curl",
        &[
            "-s",
            "-o",
            s(&out),
            "-w",
            "%{http_code}",
            "http://10.77.0.11/big.bin",
        ],
    );
    assert_eq!(r.stdout, "200");
    assert!(
        std::fs::read(&out).unwrap() == big,
        "the 300 kB file arrived damaged"
    );
    let r = lab.client(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "DELETE",
            "http://10.77.0.11/index.html",
        ],
    );
    assert_eq!(r.stdout, "405");
    assert_eq!(lab.stop_vm(vm), 0);
}

#[test]
fn a_recorded_kvd_under_redis_benchmark_replays_identically() {
    let mut rec = common::RecordedKvd::start("rec");
    let bench = rec.lab.redis_benchmark(common::KVD_LOAD);
    assert_eq!(bench.code, 0, "{}", bench.stderr);
    let (text, (events, digest)) = rec.stop();
    let (ds, log, kvd) = (&rec.ds, &rec.log, &rec.kvd);
    assert!(events > 1000, "only {events} events under redis-benchmark");
    // A frame per request, not two: each reply carries its request's acknowledgement
    // (14,753 frames sent for 7,816 received when every request was acknowledged at once).
    let (received, sent) = frames(&text);
    assert!(
        received > 1000 && sent * 10 < received * 12,
        "{sent} frames sent for {received} received"
    );

    let before = common::tree(ds);
    let run = tandem(&["vm", "replay", s(log), "--wasm", s(kvd)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        events_and_digest(run.last_line(), "replay ok: "),
        (events, digest)
    );
    assert!(
        before == common::tree(ds),
        "the replay touched the datastore"
    );
}

/// The frames the VM's NIC received and sent, from the statistics `vm run` logs as it ends.
fn frames(text: &str) -> (u64, u64) {
    let stats = text
        .lines()
        .find(|l| l.contains("network: NetStats"))
        .unwrap_or_else(|| panic!("no network statistics: {text}"));
    let count = |name: &str| -> u64 {
        stats
            .split(&format!(" {name}: "))
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    };
    (count("rx_frames"), count("tx_frames"))
}

/// A guest slow to answer (kvd's TIME reads the clock, an event, per command: a pipelined
/// batch of 16 is 16 events after the network step that took it) has its request
/// acknowledged at the event bound, before its reply: a frame of its own, sent at the same
/// point of the event stream by every copy, so that the replay sends it too, and the run
/// replays to the same outputs, also from snapshots taken with the acknowledgement pending
/// (`vm replay --snapshot-at`, then `--from`; a restore that dropped the bound diverged).
/// TIME itself answers as Redis does, with the host's clock.
#[test]
fn a_reply_slower_than_the_event_bound_is_acknowledged_first_and_replays_identically() {
    let mut rec = common::RecordedKvd::start("ackb");
    let lab = &rec.lab;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let time = cli(lab, &["TIME"]);
    let fields: Vec<u64> = time
        .lines()
        .map(|l| l.trim().parse().expect("TIME answers two integers"))
        .collect();
    assert_eq!(fields.len(), 2, "TIME answered {time:?}");
    assert!(
        fields[0].abs_diff(now) <= 5 && fields[1] < 1_000_000,
        "TIME answered {fields:?} at {now}"
    );
    assert!(
        cli(lab, &["TIME", "now"]) == "ERR wrong number of arguments for 'time' command",
        "TIME with an argument is refused, as Redis refuses it"
    );

    // 100 batches of 16 commands, one connection: one segment each way per batch, and a
    // bare acknowledgement before each reply.
    let batches = 100;
    let bench = lab.client(
        "redis-benchmark",
        &[
            "-h",
            "10.77.0.10",
            "-c",
            "1",
            "-n",
            "1600",
            "-P",
            "16",
            "-q",
            "TIME",
        ],
    );
    assert_eq!(bench.code, 0, "{}{}", bench.stdout, bench.stderr);
    assert!(bench.stdout.contains("TIME"), "{}", bench.stdout);
    let (text, (events, digest)) = rec.stop();
    let (log, kvd) = (&rec.log, &rec.kvd);
    let (received, sent) = frames(&text);
    // Replies alone (each carrying its acknowledgement) would be a frame per batch (121
    // frames in all with the bound lifted); the bound adds one per batch (220). What the
    // client sends (its own bare acknowledgements after a stall) does not count here.
    assert!(
        received >= batches && sent >= batches * 7 / 4,
        "{sent} frames sent for {received} received in {batches} batches"
    );
    assert!(
        events >= 1600,
        "only {events} events for 1600 TIME commands"
    );
    let run = tandem(&["vm", "replay", s(log), "--wasm", s(kvd)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        events_and_digest(run.last_line(), "replay ok: "),
        (events, digest.clone())
    );

    // A snapshot taken while an acknowledgement is pending at the bound keeps the bound:
    // the copy restored from it sends the acknowledgement where the recorded run did. A
    // batch is about 18 events, at most 9 of them in a row with none pending, so 12
    // snapshots at consecutive events take some with one pending.
    let snap = rec.dir.path().join("mid.snap");
    let mut taken = Vec::new();
    for at in events / 2..events / 2 + 12 {
        let at = at.to_string();
        let replay = |extra: &[&str]| {
            let mut args = vec!["vm", "replay", s(log), "--wasm", s(kvd)];
            args.extend_from_slice(extra);
            let run = tandem(&args);
            assert_eq!(run.code, 0, "{extra:?}: {}{}", run.stdout, run.stderr);
            (
                events_and_digest(run.last_line(), "replay ok: "),
                run.stdout,
            )
        };
        let (whole, out) = replay(&["--snapshot-at", &at, "--to", s(&snap)]);
        assert_eq!(whole, (events, digest.clone()), "snapshotting at {at}");
        let line = out
            .lines()
            .find(|l| l.starts_with("snapshot: "))
            .unwrap_or_else(|| panic!("no snapshot line: {out}"));
        let pos: u64 = line
            .split_whitespace()
            .find_map(|p| p.strip_prefix("events="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no position in {line:?}"));
        taken.push(pos);
        assert_eq!(
            replay(&["--from", s(&snap)]).0,
            (events, digest.clone()),
            "from event {at}"
        );
    }
    taken.dedup();
    assert_eq!(taken.len(), 12, "snapshots at {taken:?}");
}

#[test]
fn bad_network_options_give_one_clear_line_and_exit_2() {
    let kvd = guest("kvd.wasm");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--nic",
                "bridge=no-such-br,mac=02:00:00:00:00:10,ip=10.0.0.1/24",
            ],
            "does not exist",
        ),
        (
            vec!["--nic", "bridge=lo,mac=02:00:00:00:00,ip=10.0.0.1/24"],
            "not a MAC address",
        ),
        (
            vec!["--nic", "bridge=lo,mac=03:00:00:00:00:10,ip=10.0.0.1/24"],
            "multicast",
        ),
        (
            vec!["--nic", "bridge=lo,mac=02:00:00:00:00:10,ip=10.0.0.300/24"],
            "not an IPv4 address",
        ),
        (
            vec!["--nic", "bridge=lo,mac=02:00:00:00:00:10,ip=10.0.0.1"],
            "not an IPv4 address",
        ),
        (vec!["--nic", "bridge=lo,mac=02:00:00:00:00:10"], "needs ip"),
        (vec!["--nic", "colour=blue"], "not one of"),
        (vec!["--listen", "tcp:80"], "needs a NIC"),
        (vec!["--listen", "udp:53"], "tcp:PORT"),
        (vec!["--listen", "tcp:0"], "tcp:PORT"),
        (
            vec!["--listen", "tcp:80", "--listen", "tcp:80"],
            "given twice",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["vm", "run", "--wasm", s(&kvd)];
        args.extend(extra.iter());
        let run = tandem(&args);
        assert_eq!(run.code, 2, "{extra:?}: {}{}", run.stdout, run.stderr);
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "{extra:?}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains(want),
            "{extra:?}: want {want:?} in {}",
            run.stderr
        );
    }
}
