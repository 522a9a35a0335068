//! Live migration end to end (issue 8): kvd on a lab host, real redis-benchmark and a
//! one-connection redis-cli INCR checker in the client namespace, `vm migrate` moving the
//! VM to a `vm receive` on the other host (and back), over the lab's logging network; and
//! memchurn, a guest writing its memory all the time, moved between two processes over
//! this machine's loopback, its state checked against a replay of its recorded run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Checker, Lab, events_and_digest, guest, replay_from, s, tandem};

const NIC: &str = "bridge=br-vm,mac=02:00:00:00:00:10,ip=10.77.0.10/24";

/// Migrations measure nothing but share two cores: one lab at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Setup {
    lab: Lab,
    shared: PathBuf,
    data: PathBuf,
    kvd: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let lab = Lab::up(tag, 2);
        let shared = PathBuf::from(format!("/tmp/{}-shared", lab.name));
        let data = shared.join("kvd-data");
        std::fs::create_dir_all(&data).unwrap();
        Setup {
            lab,
            shared,
            data,
            kvd: guest("kvd.wasm"),
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.shared.join(format!("{name}.out"))
    }

    fn text(&self, name: &str) -> String {
        std::fs::read_to_string(self.out(name)).unwrap_or_default()
    }

    /// In the lab's socket folder (`/tmp/NAME-run`), which the test reaches: a socket bound
    /// through a host's view of the shared storage is that host's alone.
    fn sock(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/tmp/{}-run", self.lab.name)).join(format!("{name}.sock"))
    }

    /// kvd powered on at host `k`, serving its control API at `sock(name)`.
    fn start_kvd(&mut self, k: u32, name: &str) -> usize {
        let (kvd, data, sock, out) = (
            self.kvd.clone(),
            self.data.clone(),
            self.sock(name),
            self.out(name),
        );
        let i = self.lab.start_vm(
            k,
            &[
                "vm",
                "run",
                "--wasm",
                s(&kvd),
                "--datastore",
                s(&data),
                "--nic",
                NIC,
                "--listen",
                "tcp:6379",
                "--api-sock",
                s(&sock),
            ],
            &out,
        );
        self.lab
            .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        wait_until(|| sock.exists(), "the control socket");
        i
    }

    /// `vm receive` on host `k` at `addr` with `wasm`, serving the API at `sock(name)`
    /// once a VM arrived; returns once it listens.
    fn start_receiver(&mut self, k: u32, addr: &str, wasm: &Path, name: &str) -> usize {
        self.start_receiver_with(k, addr, wasm, name, &["--bridge", "br-vm"])
    }

    fn start_receiver_with(
        &mut self,
        k: u32,
        addr: &str,
        wasm: &Path,
        name: &str,
        more: &[&str],
    ) -> usize {
        self.start_receiver_env(k, addr, wasm, name, more, &[])
    }

    fn start_receiver_env(
        &mut self,
        k: u32,
        addr: &str,
        wasm: &Path,
        name: &str,
        more: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let (data, sock, out) = (self.data.clone(), self.sock(name), self.out(name));
        let mut args = vec![
            "vm",
            "receive",
            "--listen",
            addr,
            "--wasm",
            s(wasm),
            "--datastore",
            s(&data),
            "--api-sock",
            s(&sock),
        ];
        args.extend_from_slice(more);
        let i = self.lab.start_vm_env(k, env, &args, &out);
        wait_until(
            || self.text(name).contains("waiting for a VM on"),
            "the receiver listening",
        );
        i
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut a = vec!["-h", "10.77.0.10"];
        a.extend_from_slice(args);
        let r = self.lab.client("redis-cli", &a);
        assert_eq!(r.code, 0, "redis-cli {args:?}: {}{}", r.stdout, r.stderr);
        r.stdout.trim().to_string()
    }
}

fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `migrated: events=N pause_ms=P bytes=B` → (N, P, B).
fn migrated(line: &str) -> (u64, f64, u64) {
    let mut out = (None, None, None);
    for part in line
        .strip_prefix("migrated: ")
        .unwrap_or_else(|| panic!("not a migrated line: {line:?}"))
        .split_whitespace()
    {
        match part.split_once('=') {
            Some(("events", v)) => out.0 = v.parse().ok(),
            Some(("pause_ms", v)) => out.1 = v.parse().ok(),
            Some(("bytes", v)) => out.2 = v.parse().ok(),
            _ => panic!("unexpected field in {line:?}"),
        }
    }
    (out.0.unwrap(), out.1.unwrap(), out.2.unwrap())
}

/// `vm migrate` while the checker keeps the VM busy: a VM reaches a snapshot point as it
/// takes an event, and a kvd waiting for input takes none.
fn migrate(sock: &Path, to: &str, checker: &mut Checker, key: &str) -> common::Run {
    let (sock, to) = (sock.to_path_buf(), to.to_string());
    let run =
        std::thread::spawn(move || tandem(&["vm", "migrate", "--api-sock", s(&sock), "--to", &to]));
    while !run.is_finished() {
        checker.incr_for(key, Duration::from_millis(50));
    }
    run.join().expect("vm migrate")
}

/// kvd under redis-benchmark plus the INCR checker moves host1 → host2 → host1: every
/// INCR on the one connection is answered with the next value (no reset, nothing lost),
/// redis-benchmark ends without an error, each source exits 0 once its receiver is live,
/// and the counter read back on a new connection equals the INCRs acknowledged.
#[test]
fn kvd_under_load_migrates_there_and_back_and_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut t = Setup::new("mg");
    let first = t.start_kvd(1, "first");
    let kvd = t.kvd.clone();
    let second = t.start_receiver(2, "10.78.0.12:7100", &kvd, "second");
    assert_eq!(t.cli(&["SET", "before", "kept"]), "OK");

    let bench = Command::new("timeout")
        .args(["60", "ip", "netns", "exec", &t.lab.ns("client")])
        .args(["redis-benchmark", "-h", "10.77.0.10", "-q"])
        .args(["-t", "set,get,incr", "-n", "600000", "-c", "20", "-P", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    const KEY: &str = "mg:counter";
    let mut checker = Checker::start(&t.lab, KEY);
    checker.incr_for("mg:counter", Duration::from_millis(500));

    let run = migrate(&t.sock("first"), "10.78.0.12:7100", &mut checker, KEY);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (events, pause_ms, bytes) = migrated(run.last_line());
    eprintln!("host1 → host2: events={events} pause_ms={pause_ms} bytes={bytes}");
    assert!(events > 0 && bytes > 0);
    assert_eq!(
        t.lab
            .wait_exit(first, Duration::from_secs(10), "the first source"),
        0,
        "{}",
        t.text("first")
    );
    assert!(!t.sock("first").exists(), "the source's socket is removed");
    assert!(t.text("second").contains("live"), "{}", t.text("second"));
    let before = checker.sent;
    checker.incr_for("mg:counter", Duration::from_millis(700));

    // And back, to a receiver on host1: the migrated VM serves its API and moves again.
    let third = t.start_receiver(1, "10.78.0.11:7100", &kvd, "third");
    let run = migrate(&t.sock("second"), "10.78.0.11:7100", &mut checker, KEY);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (events_back, _, _) = migrated(run.last_line());
    assert!(events_back > events);
    assert_eq!(
        t.lab
            .wait_exit(second, Duration::from_secs(10), "the second source"),
        0,
        "{}",
        t.text("second")
    );
    checker.incr_for("mg:counter", Duration::from_millis(700));
    let sent = checker.finish();
    assert!(sent > before + 50, "the checker did not carry on");

    let out = bench.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("rror"),
        "redis-benchmark across the migrations: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(t.cli(&["GET", "mg:counter"]), sent.to_string());
    assert_eq!(t.cli(&["GET", "before"]), "kept");
    assert!(t.lab.exited(third).is_none(), "{}", t.text("third"));
}

/// A migration to a receiver that is not there, to one running another module, and one
/// whose connection is fed garbage first: `vm migrate` exits 1 with one line saying so,
/// the VM goes on at the source (the client's connection still answered), and the
/// receiver of the right module, having shrugged off the garbage, then takes the VM.
#[test]
fn a_failed_migration_leaves_the_source_running() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut t = Setup::new("mf");
    let source = t.start_kvd(1, "source");
    const KEY: &str = "mf:n";
    let mut checker = Checker::start(&t.lab, KEY);

    // Nobody listens there.
    let run = migrate(&t.sock("source"), "10.78.0.12:7199", &mut checker, KEY);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("not migrated") && run.stderr.contains("10.78.0.12:7199"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    checker.incr_for("mf:n", Duration::from_millis(300));

    // A receiver of another module refuses it (and waits on for the right one).
    let other = guest("clockcheck.wasm");
    let wrong = t.start_receiver(2, "10.78.0.12:7100", &other, "wrong");
    // Its API says it has no VM yet and takes no request for one.
    let api = t.sock("wrong");
    let (code, status) =
        machine::control::request(&api, "GET", "/status", None, Duration::from_secs(5)).unwrap();
    assert_eq!(
        (code, status["state"].as_str()),
        (200, Some("waiting")),
        "{status}"
    );
    let body = serde_json::json!({"to": "10.78.0.11:7100"});
    let (code, reply) =
        machine::control::request(&api, "PUT", "/migrate", Some(&body), Duration::from_secs(5))
            .unwrap();
    assert_eq!(code, 409, "{reply}");
    let run = migrate(&t.sock("source"), "10.78.0.12:7100", &mut checker, KEY);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("module"), "{}", run.stderr);
    assert!(t.lab.exited(wrong).is_none(), "{}", t.text("wrong"));
    checker.incr_for("mf:n", Duration::from_millis(300));
    assert!(t.lab.exited(source).is_none(), "{}", t.text("source"));

    // A receiver of the right module that cannot give the VM its NIC (no --bridge):
    // refused once the VM was offered, after the source paused; the source rewinds.
    let kvd = t.kvd.clone();
    let no_nic = t.start_receiver_with(2, "10.78.0.12:7102", &kvd, "nonic", &[]);
    let run = migrate(&t.sock("source"), "10.78.0.12:7102", &mut checker, KEY);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("--bridge"), "{}", run.stderr);
    assert!(t.lab.exited(no_nic).is_none(), "{}", t.text("nonic"));
    checker.incr_for(KEY, Duration::from_millis(300));
    assert!(t.lab.exited(source).is_none(), "{}", t.text("source"));

    // Garbage at the right receiver: refused, it waits on; then the VM arrives.
    let right = t.start_receiver(2, "10.78.0.12:7101", &kvd, "right");
    let junk = Command::new("ip")
        .args(["netns", "exec", &t.lab.ns("host1"), "bash", "-c"])
        .arg("printf 'GET / HTTP/1.1\\r\\n\\r\\n%.0s' $(seq 300) > /dev/tcp/10.78.0.12/7101")
        .status()
        .unwrap();
    assert!(junk.success());
    wait_until(
        || t.text("right").contains("no VM from"),
        "the garbage refused",
    );
    assert!(t.lab.exited(right).is_none(), "{}", t.text("right"));
    checker.incr_for("mf:n", Duration::from_millis(300));
    let run = migrate(&t.sock("source"), "10.78.0.12:7101", &mut checker, KEY);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    migrated(run.last_line());
    assert_eq!(
        t.lab
            .wait_exit(source, Duration::from_secs(10), "the source"),
        0
    );
    checker.incr_for("mf:n", Duration::from_millis(300));
    let sent = checker.finish();
    assert_eq!(t.cli(&["GET", "mf:n"]), sent.to_string());
    assert!(t.lab.exited(right).is_none(), "{}", t.text("right"));
}

/// A receiver that dies holding the whole offer, before it said ready: the source goes on
/// (exit 1). One that dies once committed, before it said live: the source cannot know
/// whether it went live and stops (exit 4): neither runs, never both (see
/// `machine::migrate`).
#[test]
fn a_receiver_that_dies_mid_hand_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut t = Setup::new("md");
    let source = t.start_kvd(1, "source");
    const KEY: &str = "md:n";
    let mut checker = Checker::start(&t.lab, KEY);
    let kvd = t.kvd.clone();
    let bridge = ["--bridge", "br-vm"];

    let early = t.start_receiver_env(
        2,
        "10.78.0.12:7100",
        &kvd,
        "early",
        &bridge,
        &[("TANDEM_FAILPOINT", "receiver-dies:before-ready")],
    );
    let run = migrate(&t.sock("source"), "10.78.0.12:7100", &mut checker, KEY);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("not migrated"), "{}", run.stderr);
    assert_eq!(t.lab.wait_exit(early, Duration::from_secs(10), "early"), -1);
    checker.incr_for(KEY, Duration::from_millis(300));
    assert!(t.lab.exited(source).is_none(), "{}", t.text("source"));
    let sent = checker.finish();
    assert_eq!(t.cli(&["GET", KEY]), sent.to_string());

    let late = t.start_receiver_env(
        2,
        "10.78.0.12:7101",
        &kvd,
        "late",
        &bridge,
        &[("TANDEM_FAILPOINT", "receiver-dies:after-commit")],
    );
    let mut checker = Checker::start(&t.lab, "md:m");
    let run = migrate(&t.sock("source"), "10.78.0.12:7101", &mut checker, "md:m");
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("stopped"), "{}", run.stderr);
    assert_eq!(t.lab.wait_exit(late, Duration::from_secs(10), "late"), -1);
    assert_eq!(
        t.lab
            .wait_exit(source, Duration::from_secs(10), "the source"),
        0
    );
}

/// Processes of a test on this machine, killed if the test fails before they ended.
struct Procs(Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Procs {
    /// `tandem ARGS` with `env`, its output to `out`: its index.
    fn start(&mut self, args: &[&str], env: &[(&str, &str)], out: &Path) -> usize {
        let f = std::fs::File::create(out).unwrap();
        let c = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.0.push(c);
        self.0.len() - 1
    }

    fn wait(&mut self, i: usize, what: &str) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.0[i].try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still running after 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A free port on the loopback.
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// memchurn (`args`) powered on recording to `dir/src.tlog`, its API at `dir/src.sock`,
/// with `env`; returns once it churns.
fn churn_source(p: &mut Procs, dir: &Path, args: [&str; 3], env: &[(&str, &str)]) -> usize {
    let wasm = guest("memchurn.wasm");
    let (sock, log) = (dir.join("src.sock"), dir.join("src.tlog"));
    let mut a = vec![
        "vm",
        "run",
        "--wasm",
        s(&wasm),
        "--api-sock",
        s(&sock),
        "--record",
        s(&log),
    ];
    for x in &args {
        a.extend_from_slice(&["--arg", x]);
    }
    let i = p.start(&a, env, &dir.join("src.out"));
    wait_until(|| sock.exists(), "the source's control socket");
    // Past its fill: churning.
    std::thread::sleep(Duration::from_millis(1500));
    i
}

/// `vm receive` for memchurn at `addr`, recording to `dir/NAME.tlog`: returns once it
/// listens.
/// `vm migrate` of the churning source in `dir` to `addr`.
fn migrate_churn(dir: &Path, addr: &str) -> common::Run {
    tandem(&[
        "vm",
        "migrate",
        "--api-sock",
        s(&dir.join("src.sock")),
        "--to",
        addr,
    ])
}

fn churn_receiver(p: &mut Procs, dir: &Path, addr: &str, name: &str) -> usize {
    let wasm = guest("memchurn.wasm");
    let log = dir.join(format!("{name}.tlog"));
    let out = dir.join(format!("{name}.out"));
    let i = p.start(
        &[
            "vm",
            "receive",
            "--listen",
            addr,
            "--wasm",
            s(&wasm),
            "--record",
            s(&log),
        ],
        &[],
        &out,
    );
    wait_until(
        || read(&out).contains("waiting for a VM on"),
        "the receiver listening",
    );
    i
}

/// The source (recorded to `dir/src.tlog` up to the migration at event `at`) and the
/// receiver `name` (recorded from there on) ran one VM: a snapshot a replay of the
/// source's log takes at `at`, with the guest stopped for the whole copy, replays the
/// receiver's log to the very events and digest the receiver recorded. The guest's last
/// output is a hash of its whole memory, part of that digest: a page the migration
/// missed or tore would show.
fn check_against_replay(dir: &Path, at: u64, name: &str) {
    let wasm = guest("memchurn.wasm");
    let text = read(&dir.join(format!("{name}.out")));
    assert!(text.contains("memchurn: "), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("recorded: "))
        .unwrap_or_else(|| panic!("no recorded line: {text}"));
    let live = events_and_digest(line, "recorded: ");
    let snap = dir.join("at.snap");
    let at_s = at.to_string();
    let run = tandem(&[
        "vm",
        "replay",
        s(&dir.join("src.tlog")),
        "--wasm",
        s(&wasm),
        "--snapshot-at",
        &at_s,
        "--to",
        s(&snap),
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!("snapshot: events={at} ")),
        "{}",
        run.stdout
    );
    let log = dir.join(format!("{name}.tlog"));
    assert_eq!(replay_from(&log, &wasm, &snap), live);
}

/// `precopied: rounds=R running_bytes=X stopped_bytes=Y` → (R, X, Y).
fn precopied(out: &str) -> Option<(u64, u64, u64)> {
    let line = out.lines().find(|l| l.starts_with("precopied: "))?;
    let mut v = [0u64; 3];
    for (i, key) in ["rounds=", "running_bytes=", "stopped_bytes="]
        .iter()
        .enumerate()
    {
        v[i] = line
            .split_whitespace()
            .find_map(|p| p.strip_prefix(key))
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    }
    Some((v[0], v[1], v[2]))
}

/// memchurn, writing a word in each of 64 pages and one page whole at every step of
/// its 128 MiB, migrates while it writes: its memory is streamed while it runs (the
/// whole, then rounds of what it wrote), the pause sends only the last pages, and the
/// VM that goes on at the receiver is exactly the one a replay of the source's log
/// reaches (see [`check_against_replay`]).
#[test]
fn a_guest_writing_its_memory_migrates_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut p = Procs(Vec::new());
    let addr = free_port();
    let recv = churn_receiver(&mut p, d, &addr, "recv");
    let src = churn_source(&mut p, d, ["128", "6", "64"], &[]);
    let run = migrate_churn(d, &addr);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (events, pause_ms, bytes) = migrated(run.last_line());
    let (rounds, running, stopped) = precopied(&run.stdout).unwrap_or_else(|| {
        panic!(
            "not pre-copied (no userfaultfd write-protect tracking here?): {}",
            run.stdout
        )
    });
    eprintln!(
        "memchurn 128 MiB: events={events} pause_ms={pause_ms} bytes={bytes} rounds={rounds} \
         running={running} stopped={stopped}"
    );
    assert!(rounds >= 2, "the whole memory and at least one round of it");
    assert!(running >= 128 << 20, "{running}");
    // memchurn writes pages faster than any link carries them (every page within a
    // fraction of a second): the rounds stop once they no longer shrink, and the pause
    // sends what is left. (A server's working set is smaller: `tandem bench ft`'s
    // migrate_pause_ms_big.)
    assert!(stopped < running, "{stopped} of {running}");
    assert!(bytes >= running + stopped);
    assert_eq!(p.wait(src, "the source"), 0, "{}", read(&d.join("src.out")));
    let src_out = read(&d.join("src.out"));
    assert!(src_out.contains("pre-copy: "), "{src_out}");
    assert!(
        !src_out.contains("memchurn: "),
        "the source ran on: {src_out}"
    );
    assert_eq!(
        p.wait(recv, "the receiver"),
        0,
        "{}",
        read(&d.join("recv.out"))
    );
    for l in read(&d.join("recv.out"))
        .lines()
        .filter(|l| l.contains("restore") || l.contains("memory:"))
    {
        eprintln!("receiver: {l}");
    }
    check_against_replay(d, events, "recv");
}

/// A receiver that gets a page past the memory its source declared refuses the
/// migration, saying why, and waits on; the source, which had not paused, carries on to
/// its end, its run replaying whole. Where the kernel cannot track writes
/// (`TANDEM_FAILPOINT=no-userfaultfd`), a migration is stop-and-copy, said once in the
/// source's log, and exact as well.
#[test]
fn a_page_out_of_bounds_is_refused_and_without_tracking_migration_is_stop_and_copy() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let wasm = guest("memchurn.wasm");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut p = Procs(Vec::new());
    let addr = free_port();
    let recv = churn_receiver(&mut p, d, &addr, "recv");
    let src = churn_source(
        &mut p,
        d,
        ["16", "3", "16"],
        &[("TANDEM_FAILPOINT", "migrate-page-out-of-bounds")],
    );
    let run = migrate_churn(d, &addr);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("not migrated") && run.stderr.contains("past the memory"),
        "{}",
        run.stderr
    );
    assert_eq!(p.wait(src, "the source"), 0, "{}", read(&d.join("src.out")));
    let src_out = read(&d.join("src.out"));
    assert!(src_out.contains("memchurn: "), "{src_out}");
    let line = src_out
        .lines()
        .find(|l| l.starts_with("recorded: "))
        .unwrap_or_else(|| panic!("{src_out}"));
    let whole = events_and_digest(line, "recorded: ");
    let run = tandem(&["vm", "replay", s(&d.join("src.tlog")), "--wasm", s(&wasm)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(events_and_digest(run.last_line(), "replay ok: "), whole);
    let recv_out = read(&d.join("recv.out"));
    assert!(
        recv_out.contains("no VM from") && recv_out.contains("past the memory"),
        "{recv_out}"
    );
    assert!(p.0[recv].try_wait().unwrap().is_none(), "{recv_out}");

    // The same receiver, waiting on, takes a VM whose source cannot track writes.
    std::fs::remove_file(d.join("src.tlog")).unwrap();
    let src = churn_source(
        &mut p,
        d,
        ["32", "4", "16"],
        &[("TANDEM_FAILPOINT", "no-userfaultfd")],
    );
    let run = migrate_churn(d, &addr);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(precopied(&run.stdout).is_none(), "{}", run.stdout);
    let (events, _, bytes) = migrated(run.last_line());
    assert!(bytes > 0);
    assert_eq!(p.wait(src, "the source"), 0, "{}", read(&d.join("src.out")));
    let src_out = read(&d.join("src.out"));
    assert_eq!(
        src_out.matches("stop-and-copy").count(),
        2,
        "said once, and in the migration's line: {src_out}"
    );
    assert_eq!(
        p.wait(recv, "the receiver"),
        0,
        "{}",
        read(&d.join("recv.out"))
    );
    check_against_replay(d, events, "recv");
}
