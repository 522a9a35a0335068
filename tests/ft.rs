//! Fault tolerance end to end: a primary and a secondary in real namespaces, real kvd,
//! real redis-cli and redis-benchmark, and real failures (a host's links cut and its
//! processes SIGKILLed; the logging link cut; garbage on the logging port).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lab, guest, s, tandem};

const LOG_ADDR: &str = "10.78.0.11:7000";
const NIC: &str = "bridge=br-vm,mac=02:00:00:00:00:10,ip=10.77.0.10/24";

/// FT tests measure time (heartbeats, timeouts): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Ft {
    lab: Lab,
    shared: std::path::PathBuf,
    primary: usize,
    secondary: usize,
}

impl Ft {
    fn start(tag: &str) -> Ft {
        let mut ft = Ft::start_primary(tag);
        ft.start_secondary();
        ft.lab
            .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        ft.wait_status("protected=true", Duration::from_secs(10));
        ft
    }

    /// Only the primary: an unprotected VM, FT to be enabled later.
    fn start_primary(tag: &str) -> Ft {
        let mut lab = Lab::up(tag, 2);
        let shared = std::path::PathBuf::from(format!("/tmp/{}-shared", lab.name));
        let data = shared.join("kvd/data");
        std::fs::create_dir_all(&data).unwrap();
        let kvd = guest("kvd.wasm");
        let primary = lab.start_vm(
            1,
            &[
                "ft",
                "primary",
                "--vm",
                "kvd",
                "--shared",
                s(&shared),
                "--log-listen",
                LOG_ADDR,
                "--wasm",
                s(&kvd),
                "--datastore",
                s(&data),
                "--nic",
                NIC,
                "--listen",
                "tcp:6379",
            ],
            &shared.join("primary.out"),
        );
        let ft = Ft {
            lab,
            shared,
            primary,
            secondary: usize::MAX,
        };
        ft.lab
            .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        ft
    }

    /// Enable FT: a secondary on host2 catches up from the primary's log, then follows.
    fn start_secondary(&mut self) {
        let kvd = guest("kvd.wasm");
        let data = self.shared.join("kvd/data");
        self.secondary = self.lab.start_vm(
            2,
            &[
                "ft",
                "secondary",
                "--vm",
                "kvd",
                "--shared",
                s(&self.shared),
                "--primary",
                LOG_ADDR,
                "--wasm",
                s(&kvd),
                "--datastore",
                s(&data),
                "--bridge",
                "br-vm",
            ],
            &self.shared.join("secondary.out"),
        );
    }

    fn status(&self) -> String {
        std::fs::read_to_string(self.shared.join("kvd/status")).unwrap_or_default()
    }

    fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.shared.join(format!("{who}.out"))).unwrap_or_default()
    }

    fn wait_status(&self, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.status().contains(want) {
            assert!(
                Instant::now() < deadline,
                "status never said {want:?}: {}\nprimary:\n{}\nsecondary:\n{}",
                self.status(),
                self.log("primary"),
                self.log("secondary")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut a = vec!["-h", "10.77.0.10"];
        a.extend_from_slice(args);
        let r = self.lab.client("redis-cli", &a);
        assert_eq!(r.code, 0, "redis-cli {args:?}: {}{}", r.stdout, r.stderr);
        r.stdout.trim().to_string()
    }

    /// Whether VM process `i` is still running.
    fn running(&mut self, i: usize) -> bool {
        self.lab.exited(i).is_none()
    }
}

/// One redis-cli holding one connection, fed INCR after INCR through its stdin.
struct Checker {
    child: std::process::Child,
    sent: u64,
}

impl Checker {
    fn start(lab: &Lab, key: &str) -> Checker {
        let child = Command::new("timeout")
            .args([
                "60",
                "ip",
                "netns",
                "exec",
                &lab.ns("client"),
                "redis-cli",
                "-h",
                "10.77.0.10",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting redis-cli");
        let mut c = Checker { child, sent: 0 };
        c.incr_for(key, Duration::from_millis(300));
        c
    }

    fn incr_for(&mut self, key: &str, d: Duration) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        let end = Instant::now() + d;
        while Instant::now() < end {
            writeln!(stdin, "INCR {key}").expect("writing to redis-cli");
            stdin.flush().unwrap();
            self.sent += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every reply, in order; panics unless each INCR was answered with the next value.
    fn finish(mut self) -> u64 {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().expect("redis-cli");
        let text = String::from_utf8_lossy(&out.stdout);
        let values: Vec<&str> = text.lines().collect();
        assert_eq!(
            values.len() as u64,
            self.sent,
            "not every INCR was answered: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (i, v) in values.iter().enumerate() {
            assert_eq!(
                v.trim().parse::<u64>().ok(),
                Some(i as u64 + 1),
                "reply {i} on the one connection: {v:?}\n{text}"
            );
        }
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("reset"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.sent
    }
}

#[test]
fn the_primary_host_dies_under_load_and_clients_carry_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fk");
    let mut bench = Command::new("timeout")
        .args([
            "60",
            "ip",
            "netns",
            "exec",
            &ft.lab.ns("client"),
            "redis-benchmark",
            "-h",
            "10.77.0.10",
        ])
        .args([
            "-t", "set,incr", "-n", "300000", "-c", "20", "-P", "8", "-q",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut checker = Checker::start(&ft.lab, "ft:counter");
    checker.incr_for("ft:counter", Duration::from_millis(700));
    // The secondary executes the same guest but performs none of its outputs.
    assert!(
        ft.log("primary").contains("kvd: serving on fd 4"),
        "{}",
        ft.log("primary")
    );
    assert!(
        !ft.log("secondary").contains("kvd: serving"),
        "{}",
        ft.log("secondary")
    );
    let killed = tandem(&["lab", "kill", "--name", &ft.lab.name, "host1"]);
    assert_eq!(killed.code, 0, "{}", killed.stderr);
    let before_kill = checker.sent;
    checker.incr_for("ft:counter", Duration::from_millis(2500));
    let sent = checker.finish();
    assert!(
        sent > before_kill + 100,
        "the client did not carry on after the kill"
    );

    let out = bench.wait().unwrap();
    assert!(out.success(), "redis-benchmark failed across the failover");
    let _ = bench.stdout.take();
    ft.wait_status("role=live", Duration::from_secs(5));
    assert!(ft.status().contains("generation=2"), "{}", ft.status());
    // Every acknowledged increment is there, read back on a new connection.
    assert_eq!(ft.cli(&["GET", "ft:counter"]), sent.to_string());
    assert!(
        ft.log("secondary").contains("went live"),
        "{}",
        ft.log("secondary")
    );
    assert!(ft.running(ft.secondary));
}

#[test]
fn cutting_only_the_logging_link_leaves_exactly_one_live_copy() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fc");
    assert_eq!(ft.cli(&["SET", "before", "cut"]), "OK");
    let cut = Command::new("ip")
        .args(["-n", &ft.lab.ns("host1"), "link", "set", "log0", "down"])
        .status()
        .unwrap();
    assert!(cut.success());
    // Both copies suspect the other; arbitration keeps one. The loser halts (exit 4).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (p, s_) = (ft.primary, ft.secondary);
    loop {
        let (pr, sr) = (ft.running(p), ft.running(s_));
        if pr != sr {
            break;
        }
        assert!(
            pr && Instant::now() < deadline,
            "both copies {} after the cut",
            if pr { "still run" } else { "stopped" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let loser = if ft.running(p) { s_ } else { p };
    assert_eq!(ft.lab.exited(loser), Some(4), "the loser halts with exit 4");
    let status = ft.status();
    assert!(
        status.contains("generation=2") && status.contains("protected=false"),
        "{status}"
    );
    // Clients keep being served, by the one live copy.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = ft
            .lab
            .client("redis-cli", &["-h", "10.77.0.10", "GET", "before"]);
        if r.stdout.trim() == "cut" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nobody serves after the cut: {}{}",
            r.stdout,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ft.cli(&["INCR", "after"]), "1");
}

#[test]
fn killing_the_secondary_host_leaves_the_primary_running_unprotected() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fs");
    let mut checker = Checker::start(&ft.lab, "k");
    let killed = tandem(&["lab", "kill", "--name", &ft.lab.name, "host2"]);
    assert_eq!(killed.code, 0);
    checker.incr_for("k", Duration::from_millis(1500));
    let sent = checker.finish();
    ft.wait_status("protected=false", Duration::from_secs(5));
    assert!(ft.status().contains("role=primary"), "{}", ft.status());
    assert!(
        ft.log("primary").contains("NOT PROTECTED"),
        "{}",
        ft.log("primary")
    );
    assert!(ft.running(ft.primary));
    assert_eq!(ft.cli(&["GET", "k"]), sent.to_string());
}

#[test]
fn garbage_truncated_and_forged_frames_on_the_logging_port_are_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fg");
    assert_eq!(ft.cli(&["INCR", "g"]), "1");
    let dir = tempfile::tempdir().unwrap();
    let forged = lockstep::wire::encode(&[0x42; 32], 0, 1, b"a frame under the wrong key");
    let valid_then_cut = &forged[..10];
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: tandem\r\n\r\n".repeat(50),
        ),
        ("truncated", valid_then_cut.to_vec()),
        ("forged", forged.clone()),
        ("huge", {
            let mut f = forged.clone();
            f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
            f
        }),
    ];
    for (name, bytes) in &attacks {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let sent = Command::new("ip")
            .args(["netns", "exec", &ft.lab.ns("host2"), "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/10.78.0.11/7000 && cat {} >&3; sleep 0.4",
                s(&file)
            ))
            .status()
            .unwrap();
        assert!(sent.success(), "could not deliver the {name} frames");
    }
    std::thread::sleep(Duration::from_millis(500));
    // Both copies are unharmed: still running, still protected, still in step.
    assert!(ft.running(ft.primary) && ft.running(ft.secondary));
    let status = ft.status();
    assert!(
        status.contains("role=primary")
            && status.contains("protected=true")
            && status.contains("generation=1"),
        "{status}"
    );
    let log = ft.log("primary");
    for why in ["bad magic", "authentication failed", "claims"] {
        assert!(
            log.contains(why),
            "the primary did not refuse with {why:?}:\n{log}"
        );
    }
    assert_eq!(ft.cli(&["INCR", "g"]), "2");
    // And the secondary still holds a replica that can take over with the right data.
    assert_eq!(
        tandem(&["lab", "kill", "--name", &ft.lab.name, "host1"]).code,
        0
    );
    ft.wait_status("role=live", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = ft
            .lab
            .client("redis-cli", &["-h", "10.77.0.10", "INCR", "g"]);
        if r.stdout.trim() == "3" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the secondary did not take over correctly: {}{}",
            r.stdout,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn enabling_ft_on_a_running_vm_catches_up_and_protects_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start_primary("fe");
    // A VM with a past: 20000 writes before any secondary exists.
    let bench = ft.lab.client(
        "redis-benchmark",
        &[
            "-h",
            "10.77.0.10",
            "-t",
            "incr",
            "-n",
            "20000",
            "-c",
            "10",
            "-P",
            "8",
            "-q",
        ],
    );
    assert_eq!(bench.code, 0, "{}", bench.stderr);
    assert_eq!(ft.cli(&["SET", "before", "enable"]), "OK");
    assert!(ft.status().contains("protected=false"), "{}", ft.status());
    ft.start_secondary();
    ft.wait_status("protected=true", Duration::from_secs(15));
    assert!(
        ft.log("primary").contains("VM PROTECTED"),
        "{}",
        ft.log("primary")
    );
    assert_eq!(ft.cli(&["INCR", "counter:__rand_int__"]), "20001");
    // The caught-up secondary holds everything: it takes over with the whole history.
    assert_eq!(
        tandem(&["lab", "kill", "--name", &ft.lab.name, "host1"]).code,
        0
    );
    ft.wait_status("role=live", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = ft.lab.client(
            "redis-cli",
            &["-h", "10.77.0.10", "GET", "counter:__rand_int__"],
        );
        if r.stdout.trim() == "20001" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after failover: {}{}",
            r.stdout,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ft.cli(&["GET", "before"]), "enable");
    assert!(ft.running(ft.secondary));
}
