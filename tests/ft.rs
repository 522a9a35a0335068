//! Fault tolerance end to end: a primary and a secondary in real namespaces, real kvd,
//! real redis-cli and redis-benchmark, and real failures (a host's links cut and its
//! processes SIGKILLed; the logging link cut; garbage on the logging port).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Checker, KVD_NIC, Lab, Run, guest, s, tandem};

const LOG_ADDR: &str = "10.78.0.11:7000";

/// FT tests measure time (heartbeats, timeouts): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Ft {
    lab: Lab,
    shared: std::path::PathBuf,
    /// The VM's name: its folder below `shared`.
    vm: String,
    primary: usize,
    secondary: usize,
    /// The guest both copies run (in `guests/build`).
    guest: &'static str,
}

impl Ft {
    fn start(tag: &str) -> Ft {
        Ft::start_in(Lab::up(tag, 2), "kvd")
    }

    /// A protected kvd named `vm` in an existing lab.
    fn start_in(lab: Lab, vm: &str) -> Ft {
        let mut ft = Ft::start_primary_in(lab, vm);
        ft.start_secondary();
        ft.lab
            .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        ft.wait_status("protected=true", Duration::from_secs(10));
        ft
    }

    /// Only the primary: an unprotected VM, FT to be enabled later.
    fn start_primary(tag: &str) -> Ft {
        Ft::start_primary_in(Lab::up(tag, 2), "kvd")
    }

    fn start_primary_in(lab: Lab, vm: &str) -> Ft {
        Ft::start_primary_with(lab, vm, &[])
    }

    /// A protected kvd whose copies both take `extra` arguments.
    fn start_with(tag: &str, extra: &[&str]) -> Ft {
        let mut ft = Ft::start_primary_with(Lab::up(tag, 2), "kvd", extra);
        ft.secondary = ft.join(2, 1, extra, "secondary");
        ft.lab
            .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        ft.wait_status("protected=true", Duration::from_secs(10));
        ft
    }

    fn start_primary_with(lab: Lab, vm: &str, extra: &[&str]) -> Ft {
        Ft::start_guest(lab, vm, "kvd.wasm", extra)
    }

    /// Only the primary of `wasm` (kvd on port 6379 or httpd on port 80, serving its
    /// datastore), with `extra` arguments.
    fn start_guest(mut lab: Lab, vm: &str, wasm: &'static str, extra: &[&str]) -> Ft {
        let shared = std::path::PathBuf::from(format!("/tmp/{}-shared", lab.name));
        let data = shared.join(vm).join("data");
        std::fs::create_dir_all(&data).unwrap();
        let listen = if wasm == "httpd.wasm" {
            std::fs::write(data.join("index.html"), "served from shared storage\n").unwrap();
            "tcp:80"
        } else {
            "tcp:6379"
        };
        let kvd = guest(wasm);
        let primary = lab.start_vm(
            1,
            &[
                "ft",
                "primary",
                "--vm",
                vm,
                "--shared",
                s(&shared),
                "--log-listen",
                LOG_ADDR,
                "--wasm",
                s(&kvd),
                "--datastore",
                s(&data),
                "--nic",
                KVD_NIC,
                "--listen",
                listen,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
            &shared.join(format!("{vm}.primary.out")),
        );
        let ft = Ft {
            lab,
            shared,
            vm: vm.to_string(),
            primary,
            secondary: usize::MAX,
            guest: wasm,
        };
        if wasm == "httpd.wasm" {
            ft.lab.wait_for(
                "curl",
                &["-s", "http://10.77.0.10/"],
                "served from shared storage",
            );
        } else {
            ft.lab
                .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        }
        ft
    }

    /// Enable FT: a secondary on host2 catches up from the primary's log, then follows.
    fn start_secondary(&mut self) {
        self.secondary = self.join(2, 1, &[], "secondary");
    }

    /// The VM's status: written only by its live copy.
    fn status(&self) -> String {
        std::fs::read_to_string(self.shared.join(&self.vm).join("status")).unwrap_or_default()
    }

    fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.shared.join(format!("{}.{who}.out", self.vm)))
            .unwrap_or_default()
    }

    /// The holders of the VM's arbitration records, by generation.
    fn generations(&self) -> Vec<(String, String)> {
        arbitration(&self.shared.join(&self.vm))
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

    /// `redis-cli ARGS` from the client, again until it succeeds and `ok` holds for its
    /// trimmed output (clients reconnect and retransmit after a go-live), for at most 5 s:
    /// that output; else fail, saying `what` and the last answer.
    fn cli_until(&self, args: &[&str], what: &str, ok: impl Fn(&str) -> bool) -> String {
        let mut a = vec!["-h", "10.77.0.10"];
        a.extend_from_slice(args);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.lab.client("redis-cli", &a);
            if r.code == 0 && ok(r.stdout.trim()) {
                return r.stdout.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {}{}",
                r.stdout,
                r.stderr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether VM process `i` is still running.
    fn running(&mut self, i: usize) -> bool {
        self.lab.exited(i).is_none()
    }
}

#[test]
fn the_primary_host_dies_under_load_and_clients_carry_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fk");
    let mut bench = background_benchmark(&ft.lab, "300000", Stdio::piped());
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

/// Under redis-benchmark and the one-connection INCR checker (on `key`), `fault` makes the
/// primary hand the VM over to the secondary: the primary exits 0 saying why (`why`), the
/// secondary went live in the next generation saying so in its log and the status, every
/// acknowledged INCR is there and no connection was reset. The primary's log.
fn hands_over_under_load(ft: &mut Ft, key: &str, why: &str, fault: impl FnOnce(&Ft)) -> String {
    let mut bench = background_benchmark(&ft.lab, "200000", Stdio::piped());
    let mut checker = Checker::start(&ft.lab, key);
    checker.incr_for(key, Duration::from_millis(500));
    fault(ft);
    let before = checker.sent;
    checker.incr_for(key, Duration::from_millis(2500));
    let code = ft.lab.wait_exit(
        ft.primary,
        Duration::from_secs(10),
        "the primary handing over",
    );
    let log = ft.log("primary");
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains(&format!("handed over to the secondary: {why}")),
        "{log}"
    );
    let sent = checker.finish();
    assert!(sent > before + 50, "the client did not carry on");
    assert!(
        bench.wait().unwrap().success(),
        "redis-benchmark failed across the handover"
    );
    let _ = bench.stdout.take();
    // Claimed on the handover, not after a timeout; the primary never claimed again.
    ft.wait_status("role=live", Duration::from_secs(5));
    let gens = ft.generations();
    assert_eq!(gens.len(), 2, "{gens:?}");
    assert!(gens[1].1.starts_with("secondary"), "{gens:?}");
    assert!(
        ft.log("secondary").contains(&format!("handover: {why}")),
        "{}",
        ft.log("secondary")
    );
    assert!(
        ft.status().contains(&format!("went_live=handover: {why}")),
        "{}",
        ft.status()
    );
    assert_eq!(ft.cli(&["GET", key]), sent.to_string());
    assert!(ft.running(ft.secondary));
    log
}

#[test]
fn a_planned_switch_under_load_hands_the_vm_to_the_secondary_with_nothing_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fh");
    // SIGUSR1: what a host agent sends when the primary's host enters maintenance.
    hands_over_under_load(&mut ft, "ft:switch", "planned switch", |ft| {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(ft.lab.pid(ft.primary) as i32, libc::SIGUSR1) };
    });
}

/// A switch asked of an unprotected primary is refused and the VM carries on there.
#[test]
fn a_planned_switch_without_a_secondary_is_refused_and_the_vm_carries_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start_primary("fr");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(ft.lab.pid(ft.primary) as i32, libc::SIGUSR1) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ft.log("primary").contains("handover refused") {
        assert!(Instant::now() < deadline, "{}", ft.log("primary"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        ft.log("primary").contains("not protected"),
        "{}",
        ft.log("primary")
    );
    assert_eq!(ft.cli(&["INCR", "ft:alone"]), "1");
    assert!(ft.running(ft.primary));
}

/// Set host K's uplink (its VM bridge's port on the VM switch) down or up: the host's side
/// loses or regains carrier.
fn uplink(ft: &Ft, k: u32, up: bool) {
    let r = Command::new("ip")
        .args([
            "-n",
            &ft.lab.ns("net"),
            "link",
            "set",
            &format!("h{k}up"),
            if up { "up" } else { "down" },
        ])
        .status()
        .unwrap();
    assert!(r.success());
}

const WATCH_UPLINK: &[&str] = &["--uplink", "uplink"];

#[test]
fn a_primary_that_loses_its_vm_network_hands_over_to_a_secondary_that_has_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start_with("fu", WATCH_UPLINK);
    hands_over_under_load(
        &mut ft,
        "ft:uplink",
        "primary lost its VM network (uplink has no carrier)",
        |ft| uplink(ft, 1, false),
    );
}

#[test]
fn a_secondary_without_vm_network_leaves_the_primary_in_place_not_protected_and_a_flap_does_nothing()
 {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // The hold given, not the default: the flap below is a 100 ms sleep between two `ip`
    // runs, too close to the default's 150 ms.
    let mut ft = Ft::start_with("fv", &with_hold(WATCH_UPLINK, "300"));
    // A flap shorter than the hold (300 ms) on the primary's side: nothing happens.
    uplink(&ft, 1, false);
    std::thread::sleep(Duration::from_millis(100));
    uplink(&ft, 1, true);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(ft.running(ft.primary), "{}", ft.log("primary"));
    assert_eq!(ft.generations().len(), 1, "{:?}", ft.generations());
    assert!(
        !ft.log("primary").contains("planned switch"),
        "{}",
        ft.log("primary")
    );
    // Seen, and ignored for being shorter than the hold (not missed).
    assert!(
        ft.log("primary")
            .contains("the VM network's uplink: a flap of"),
        "{}",
        ft.log("primary")
    );
    // The secondary's host loses its VM network: the VM stays, reported not protected,
    // and why.
    uplink(&ft, 2, false);
    ft.wait_status("protected=false", Duration::from_secs(5));
    assert!(
        ft.status()
            .contains("unprotected_why=the secondary's host lost its VM network"),
        "{}",
        ft.status()
    );
    assert_eq!(ft.cli(&["INCR", "ft:stays"]), "1");
    // And the primary's too, now: both lost it, so nothing moves.
    uplink(&ft, 1, false);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(ft.running(ft.primary), "{}", ft.log("primary"));
    assert_eq!(ft.generations().len(), 1, "{:?}", ft.generations());
    uplink(&ft, 1, true);
    uplink(&ft, 2, true);
    ft.wait_status("protected=true", Duration::from_secs(5));
    assert_eq!(ft.cli(&["INCR", "ft:stays"]), "2");
}

/// Watch the uplink's carrier and whether the client machine answers through it.
const WATCH_PEERS: &[&str] = &["--uplink", "uplink", "--uplink-peer", "10.77.0.2"];

/// Take host K's uplink off the VM switch (`false`), or put it back: its carrier stays up,
/// but nothing on the VM network is reachable through it (a switch port in the wrong VLAN).
fn plug(ft: &Ft, k: u32, plugged: bool) {
    let port = format!("h{k}up");
    let how: &[&str] = if plugged {
        &["master", "sw0"]
    } else {
        &["nomaster"]
    };
    let r = Command::new("ip")
        .args(["-n", &ft.lab.ns("net"), "link", "set", &port])
        .args(how)
        .status()
        .unwrap();
    assert!(r.success());
}

#[test]
fn a_primary_whose_peers_are_unreachable_with_carrier_up_hands_over_and_healing_moves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start_with("fp", WATCH_PEERS);
    let log = hands_over_under_load(
        &mut ft,
        "ft:peers",
        "primary lost its VM network (no peer (10.77.0.2) answers through uplink",
        |ft| plug(ft, 1, false),
    );
    assert!(!log.contains("has no carrier"), "{log}");
    let count: u64 = ft.cli(&["GET", "ft:peers"]).parse().unwrap();
    // Put back: nothing more happens (the old primary halted; the VM stays on host2).
    plug(&ft, 1, true);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ft.generations().len(), 2, "{:?}", ft.generations());
    assert!(ft.running(ft.secondary), "{}", ft.log("secondary"));
    assert!(ft.status().contains("role=live"), "{}", ft.status());
    assert_eq!(ft.cli(&["INCR", "ft:peers"]), (count + 1).to_string());
}

/// `watch` with a hold of `ms` instead of the default.
fn with_hold<'a>(watch: &[&'a str], ms: &'a str) -> Vec<&'a str> {
    watch
        .iter()
        .copied()
        .chain(["--health-hold-ms", ms])
        .collect()
}

/// The VM network lost on both hosts at once (`set(ft, false)`: the secondary's host
/// first, then the primary's; `set(ft, true)` heals both): the secondary's own report comes
/// after its (long) hold, so the primary asks it to take the VM over; it looks afresh,
/// finds its VM network lost (`why`, its log's words) and declines. Nothing moves; healed,
/// the VM serves on, still protected.
fn both_lose_the_vm_network_and_nothing_moves(
    tag: &str,
    watch: &[&str],
    why: &str,
    set: impl Fn(&Ft, bool),
) {
    let mut ft = Ft::start_primary_with(Lab::up(tag, 2), "kvd", watch);
    ft.secondary = ft.join(2, 1, &with_hold(watch, "5000"), "secondary");
    ft.wait_status("protected=true", Duration::from_secs(10));
    let key = format!("ft:{tag}");
    assert_eq!(ft.cli(&["INCR", &key]), "1");
    let nothing_moved = |ft: &mut Ft| {
        assert_eq!(ft.generations().len(), 1, "{:?}", ft.generations());
        assert!(
            ft.running(ft.primary) && ft.running(ft.secondary),
            "{}",
            ft.log("primary")
        );
        assert!(
            !ft.log("primary").contains("handed over"),
            "{}",
            ft.log("primary")
        );
    };
    set(&ft, false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ft.log("primary").contains("declined by secondary") {
        assert!(Instant::now() < deadline, "{}", ft.log("primary"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let secondary = ft.log("secondary");
    assert!(
        secondary.contains(&format!("declined: this host lost its VM network ({why}")),
        "{secondary}"
    );
    nothing_moved(&mut ft);
    set(&ft, true);
    ft.wait_status("protected=true", Duration::from_secs(10));
    assert_eq!(ft.cli(&["INCR", &key]), "2");
    nothing_moved(&mut ft);
}

/// The primary's host loses its uplink's carrier while the secondary's host loses its peers
/// (carrier up, nothing answers): the carrier's loss is told after the primary's default
/// hold (about 170 ms), long before the secondary would tell the peers' silence. Asked, the
/// secondary asks its peers then and there, hears nothing and declines: the VM is not
/// handed to a host without its VM network.
#[test]
fn a_carrier_lost_on_the_primary_while_the_secondarys_peers_fall_silent_is_declined() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    both_lose_the_vm_network_and_nothing_moves(
        "fx",
        WATCH_PEERS,
        "no peer (10.77.0.2)",
        |ft, up| {
            plug(ft, 2, up);
            uplink(ft, 1, up);
        },
    );
}

/// Both uplinks lose their carrier at once; the secondary finds its own down and declines.
#[test]
fn uplink_lost_on_both_hosts_at_once_is_declined_and_moves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    both_lose_the_vm_network_and_nothing_moves(
        "fw",
        WATCH_UPLINK,
        "uplink has no carrier",
        |ft, up| {
            uplink(ft, 2, up);
            uplink(ft, 1, up);
        },
    );
}

/// `tandem lab cut|heal` of host K's `what` (storage, uplink, logging).
fn lab_fault(ft: &Ft, verb: &str, k: u32, what: &str) {
    let r = tandem(&[
        "lab",
        verb,
        "--name",
        &ft.lab.name,
        &format!("host{k}"),
        what,
    ]);
    assert_eq!(
        r.code, 0,
        "lab {verb} host{k} {what}: {}{}",
        r.stdout, r.stderr
    );
}

#[test]
fn a_primary_that_loses_its_storage_hands_over_before_the_guest_sees_an_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fs");
    // Every write kvd acknowledges is in its append-only file first: the next one after
    // the cut fails on host1's storage.
    let log = hands_over_under_load(&mut ft, "ft:storage", "primary lost its storage", |ft| {
        lab_fault(ft, "cut", 1, "storage")
    });
    assert!(
        !log.contains("kvd: writing the append-only file"),
        "the guest saw the error: {log}"
    );
    lab_fault(&ft, "heal", 1, "storage");
}

#[test]
fn storage_lost_by_the_secondary_then_by_both_moves_nothing_and_the_guest_sees_the_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fb");
    assert_eq!(ft.cli(&["SET", "k", "v"]), "OK");
    lab_fault(&ft, "cut", 2, "storage");
    ft.wait_status("protected=false", Duration::from_secs(5));
    assert!(
        ft.status()
            .contains("unprotected_why=the secondary's host lost its storage"),
        "{}",
        ft.status()
    );
    // The primary stays and serves.
    assert_eq!(ft.cli(&["INCR", "n"]), "1");
    // Now host1 loses it too: no handover (no copy could do better); kvd's next write
    // fails as it would natively, and kvd ends the way it does on a failed write.
    lab_fault(&ft, "cut", 1, "storage");
    std::thread::sleep(Duration::from_millis(600));
    let _ = ft
        .lab
        .client("redis-cli", &["-h", "10.77.0.10", "INCR", "n"]);
    let code = ft.lab.wait_exit(
        ft.primary,
        Duration::from_secs(10),
        "the primary whose guest ended",
    );
    let log = ft.log("primary");
    assert!(log.contains("kvd: writing the append-only file"), "{log}");
    assert!(!log.contains("handed over"), "{log}");
    assert_ne!(code, 0, "{log}");
    lab_fault(&ft, "heal", 1, "storage");
    lab_fault(&ft, "heal", 2, "storage");
    assert_eq!(ft.generations().len(), 1, "{:?}", ft.generations());
}

/// The HTTP status of GET `path` from the protected httpd ("000": no answer).
fn http_code(ft: &Ft, path: &str) -> String {
    let url = format!("http://10.77.0.10/{path}");
    let r = ft.lab.client(
        "curl",
        &[
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ],
    );
    r.stdout.trim().to_string()
}

/// Storage lost on both hosts at once. The secondary's hold is long, so its report of the
/// loss comes well after the primary's first failing operation: the primary asks it to take
/// over, it looks afresh, finds storage lost too and declines. The VM stays on its primary
/// (one generation, no handover, both copies running) and its guest sees the error as it
/// would natively: httpd, which opens the file for each request and keeps serving whatever
/// a request's fate, answers 404. (kvd would not do: it exits on a failed write, as Redis
/// does with `appendfsync always`.) Healed, httpd serves the file again, still protected.
#[test]
fn storage_lost_on_both_hosts_at_once_moves_nothing_and_the_guest_recovers_when_healed() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let hold = ["--health-hold-ms", "4000"];
    let mut ft = Ft::start_guest(Lab::up("fd", 2), "web", "httpd.wasm", &hold);
    ft.secondary = ft.join(2, 1, &hold, "secondary");
    ft.wait_status("protected=true", Duration::from_secs(10));
    assert_eq!(http_code(&ft, "index.html"), "200");
    // The secondary's host first, then the primary's, back to back: by the primary's first
    // failing operation the secondary's storage is gone too, but not yet reported.
    lab_fault(&ft, "cut", 2, "storage");
    lab_fault(&ft, "cut", 1, "storage");
    let mut codes = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        codes.push(http_code(&ft, "index.html"));
    }
    let log = ft.log("primary");
    assert!(
        codes.iter().all(|c| c == "404" || c == "200") && codes.iter().any(|c| c == "404"),
        "{codes:?}\n{log}"
    );
    assert!(log.contains("declined by secondary"), "{log}");
    assert!(
        ft.log("secondary")
            .contains("declined: this host lost its storage"),
        "{}",
        ft.log("secondary")
    );
    assert!(!log.contains("handed over"), "{log}");
    assert!(ft.running(ft.primary), "{log}");
    assert!(ft.running(ft.secondary), "{}", ft.log("secondary"));
    lab_fault(&ft, "heal", 1, "storage");
    lab_fault(&ft, "heal", 2, "storage");
    ft.lab.wait_for(
        "curl",
        &["-s", "http://10.77.0.10/index.html"],
        "served from shared storage",
    );
    ft.wait_status("protected=true", Duration::from_secs(10));
    assert_eq!(ft.generations().len(), 1, "{:?}", ft.generations());
    assert!(ft.running(ft.primary) && ft.running(ft.secondary));
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
    ft.cli_until(&["GET", "before"], "nobody serves after the cut", |o| {
        o == "cut"
    });
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

/// Stall the whole machine for `d`: on every CPU, a real-time (SCHED_FIFO) thread spins,
/// so that no ordinary process runs (the kernel still leaves them 5% of each second), as
/// when a host is overloaded: their timers expire while they cannot run.
fn stall_the_machine(d: Duration) {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let until = Instant::now() + d;
    let hogs: Vec<_> = (0..cpus)
        .map(|cpu| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
                // sched_setaffinity/sched_setscheduler act on this thread (pid 0) with
                // structures that live for the call.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    let param = libc::sched_param { sched_priority: 10 };
                    assert_eq!(
                        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param),
                        0,
                        "SCHED_FIFO: {}",
                        std::io::Error::last_os_error()
                    );
                }
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    for h in hogs {
        h.join().unwrap();
    }
}

#[test]
fn a_stall_of_both_copies_longer_than_the_timeout_is_not_a_failover() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start("fz");
    ft.wait_status("protected=true", Duration::from_secs(30));
    let mut checker = Checker::start(&ft.lab, "z");
    checker.incr_for("z", Duration::from_millis(300));
    // Twice the ceiling (300 ms), four times the floor. Up to three stalls: after one, a
    // peer's heartbeat may reach the reader before its timeout is looked at (then the stall
    // went unnoticed, rightly, but proved nothing); the detector must see one of them.
    let noticed = "while this process was not running: not counted";
    for _ in 0..3 {
        stall_the_machine(Duration::from_millis(600));
        checker.incr_for("z", Duration::from_millis(400));
        if (ft.log("primary") + &ft.log("secondary")).contains(noticed) {
            break;
        }
    }
    let sent = checker.finish();
    assert_eq!(ft.cli(&["GET", "z"]), sent.to_string());
    let gens = ft.generations();
    assert_eq!(
        gens.len(),
        1,
        "a copy claimed the VM: {gens:?}\nprimary:\n{}\nsecondary:\n{}",
        ft.log("primary"),
        ft.log("secondary")
    );
    assert!(ft.running(ft.primary) && ft.running(ft.secondary));
    let logs = ft.log("primary") + &ft.log("secondary");
    assert!(logs.contains(noticed), "{logs}");
    ft.wait_status("protected=true", Duration::from_secs(5));
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
    ft.cli_until(
        &["INCR", "g"],
        "the secondary did not take over correctly",
        |o| o == "3",
    );
}

#[test]
fn enabling_ft_on_a_running_vm_catches_up_and_protects_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start_primary("fe");
    // A VM with a past: 20000 writes before any secondary exists.
    let bench = ft
        .lab
        .redis_benchmark(&["-t", "incr", "-n", "20000", "-c", "10", "-P", "8"]);
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
    ft.cli_until(&["GET", "counter:__rand_int__"], "after failover", |o| {
        o == "20001"
    });
    assert_eq!(ft.cli(&["GET", "before"]), "enable");
    assert!(ft.running(ft.secondary));
}

/// A secondary that joins while the guest's replies lag its requests past the event bound
/// (pipelined batches of 10 TIME commands from 4 clients, each command a clock read: an
/// acknowledgement is pending at the bound at some of the points where a checkpoint is
/// taken) starts from a checkpoint that carries the bound and sends the same bare
/// acknowledgements as the primary (a copy that did not would diverge at its next event,
/// each event carrying the digest of the outputs before it, and never be protected), then
/// takes over. Where the checkpoint falls is the primary's timing: that a restored bound
/// is kept is shown deterministically by `vm replay --from` in `tests/net.rs`.
#[test]
fn a_secondary_joining_while_acknowledgements_are_delayed_replays_the_same_frames() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Checkpoints every MiB of events: an unprotected primary takes its own, and a
    // secondary starts from the last.
    let small = ["--checkpoint-mib", "1"];
    let mut ft = Ft::start_primary_with(Lab::up("fk", 2), "kvd", &small);
    let mut load = Command::new("timeout")
        .args(["60", "ip", "netns", "exec", &ft.lab.ns("client")])
        .args(["redis-benchmark", "-h", "10.77.0.10", "-q"])
        .args(["-c", "4", "-P", "10", "-n", "5000000", "TIME"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ft.status().contains("checkpoint=") || ft.status().contains("checkpoint=none") {
        assert!(Instant::now() < deadline, "no checkpoint: {}", ft.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    ft.secondary = ft.join(2, 1, &small, "secondary");
    ft.wait_status("protected=true", Duration::from_secs(20));
    // Batches replayed from the checkpoint on, then the primary's host dies mid-load.
    std::thread::sleep(Duration::from_secs(1));
    let log = ft.log("secondary");
    assert!(log.contains("joining from the checkpoint"), "{log}");
    assert!(
        load.try_wait().unwrap().is_none(),
        "the load ended before the failover"
    );
    assert_eq!(
        tandem(&["lab", "kill", "--name", &ft.lab.name, "host1"]).code,
        0
    );
    ft.wait_status("role=live", Duration::from_secs(5));
    // SIGTERM to `timeout`, which passes it on to redis-benchmark (SIGKILL would orphan it).
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(load.id() as i32, libc::SIGTERM) };
    let _ = load.wait();
    let log = ft.log("secondary");
    assert!(!log.contains("diverged"), "{log}");
    ft.cli_until(&["TIME"], "TIME after the failover", |o| {
        o.lines().count() == 2
    });
    assert!(ft.running(ft.secondary));
}

/// Every `gen-N` record in a VM folder's arbitration folder, with its holder, by generation.
/// redis-benchmark (SET, INCR; 20 clients, pipeline 8; `requests` of them, at most 60 s) at
/// the VM from the client, in the background.
fn background_benchmark(lab: &Lab, requests: &str, stdout: Stdio) -> std::process::Child {
    Command::new("timeout")
        .args(["60", "ip", "netns", "exec", &lab.ns("client")])
        .args(["redis-benchmark", "-h", "10.77.0.10", "-q"])
        .args(["-t", "set,incr", "-n", requests, "-c", "20", "-P", "8"])
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn arbitration(vm_dir: &std::path::Path) -> Vec<(String, String)> {
    let mut gens: Vec<(String, String)> = std::fs::read_dir(vm_dir.join("arbitration"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    let holder = std::fs::read_to_string(e.path()).unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), holder)
                })
                .collect()
        })
        .unwrap_or_default();
    gens.sort();
    gens
}

/// A copy that never went live: it claimed no generation and never switched to live inputs.
fn assert_never_live(secondary_log: &str, gens: &[(String, String)]) {
    assert!(
        !secondary_log.contains("went live") && !secondary_log.contains("won arbitration"),
        "the secondary went live:\n{secondary_log}"
    );
    assert!(
        gens.iter().all(|(_, holder)| !holder.contains("secondary")),
        "the secondary claimed a generation: {gens:?}\n{secondary_log}"
    );
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One bigread VM under FT in `lab`: the primary on host1, the secondary on host2.
struct BigRead {
    shared: std::path::PathBuf,
    vm: String,
    input: Vec<u8>,
    primary: usize,
    secondary: usize,
}

impl BigRead {
    /// Run bigread over `input` in `chunk`-byte reads, sleeping `sleep_ms` before it prints
    /// and exits with `code`. The secondary starts `secondary_after` the primary, or (None)
    /// first, retrying until the primary listens.
    #[allow(clippy::too_many_arguments)]
    fn start(
        lab: &mut Lab,
        vm: &str,
        input: Vec<u8>,
        chunk: usize,
        sleep_ms: u32,
        code: u8,
        secondary_after: Option<Duration>,
    ) -> BigRead {
        let shared = std::path::PathBuf::from(format!("/tmp/{}-shared", lab.name));
        let data = shared.join(vm).join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("in.bin"), &input).unwrap();
        let wasm = guest("bigread.wasm");
        let (chunk, sleep, code) = (chunk.to_string(), sleep_ms.to_string(), code.to_string());
        let ft = |role: &str| ft_args(role, vm, &shared, &wasm, &data);
        let mut primary_args = ft("primary");
        primary_args.extend(["--log-listen", LOG_ADDR].map(String::from));
        for a in ["/in.bin", &chunk, &sleep, &code] {
            primary_args.extend(["--arg".to_string(), a.to_string()]);
        }
        let mut secondary_args = ft("secondary");
        secondary_args.extend(["--primary", LOG_ADDR].map(String::from));
        let out = |who: &str| shared.join(format!("{vm}.{who}.out"));
        let (primary, secondary) = match secondary_after {
            Some(d) => {
                let p = lab.start_vm(1, &as_str(&primary_args), &out("primary"));
                std::thread::sleep(d);
                (
                    p,
                    lab.start_vm(2, &as_str(&secondary_args), &out("secondary")),
                )
            }
            None => {
                let sec = lab.start_vm(2, &as_str(&secondary_args), &out("secondary"));
                (
                    lab.start_vm(1, &as_str(&primary_args), &out("primary")),
                    sec,
                )
            }
        };
        BigRead {
            shared,
            vm: vm.to_string(),
            input,
            primary,
            secondary,
        }
    }

    fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.shared.join(format!("{}.{who}.out", self.vm)))
            .unwrap_or_default()
    }

    /// Both copies ended with `code`; the guest's output appeared in full, exactly once,
    /// from the primary only; the VM never failed over and was protected while it ran.
    fn check_ended_together(&self, lab: &mut Lab, code: i32) {
        let p = lab.wait_exit(self.primary, Duration::from_secs(60), "the primary");
        let s_ = lab.wait_exit(self.secondary, Duration::from_secs(20), "the secondary");
        let (plog, slog) = (self.log("primary"), self.log("secondary"));
        assert_eq!(
            (p, s_),
            (code, code),
            "exit codes (primary, secondary)\nprimary:\n{plog}\nsecondary:\n{slog}"
        );
        let lines: Vec<&str> = plog.lines().filter(|l| l.starts_with("bigread:")).collect();
        let read = format!("bigread: read {} bytes in ", self.input.len());
        let sum = format!(", fnv {:016x}", fnv(&self.input));
        assert!(
            lines.len() == 3
                && lines[0] == "bigread: start"
                && lines[1].starts_with(&read)
                && lines[1].ends_with(&sum)
                && lines[2] == "bigread: done",
            "the guest's output, once and in full, was expected:\n{plog}\nsecondary:\n{slog}"
        );
        assert!(plog.contains("VM PROTECTED"), "never protected:\n{plog}");
        assert!(!slog.contains("bigread:"), "the secondary printed:\n{slog}");
        let gens = arbitration(&self.shared.join(&self.vm));
        assert_never_live(&slog, &gens);
        assert_eq!(
            gens.len(),
            1,
            "nobody needed arbitration: {gens:?}\nprimary:\n{plog}\nsecondary:\n{slog}"
        );
        let status =
            std::fs::read_to_string(self.shared.join(&self.vm).join("status")).unwrap_or_default();
        assert!(
            status.contains("role=stopped") && status.contains("generation=1"),
            "{status}"
        );
    }
}

/// `ft ROLE` for VM `vm` on shared storage `shared`, running `wasm` on datastore `data`.
fn ft_args(
    role: &str,
    vm: &str,
    shared: &std::path::Path,
    wasm: &std::path::Path,
    data: &std::path::Path,
) -> Vec<String> {
    let flags = ["ft", role, "--vm", vm, "--shared", s(shared)];
    let more = ["--wasm", s(wasm), "--datastore", s(data)];
    flags.iter().chain(&more).map(|a| a.to_string()).collect()
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_big_history_streams_in_bounded_frames_without_failover() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::up("fb", 2);
    let mut input = vec![0u8; 64 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in input.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    // 40 MiB in 64 KiB reads, FT enabled a second later: the history is 40 MiB when the
    // secondary attaches (one 40 MiB batch closed the channel before frames were bounded).
    let many = BigRead::start(
        &mut lab,
        "many",
        input[..40 << 20].to_vec(),
        64 << 10,
        4000,
        0,
        Some(Duration::from_secs(1)),
    );
    many.check_ended_together(&mut lab, 0);
    // One 64 MiB read (served in reads of at most 16 MiB, each one event).
    let one = BigRead::start(
        &mut lab,
        "one",
        input,
        64 << 20,
        4000,
        0,
        Some(Duration::from_secs(1)),
    );
    one.check_ended_together(&mut lab, 0);
}

#[test]
fn a_short_protected_guest_prints_once_and_its_secondary_ends_the_same_way() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::up("fo", 2);
    let input: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    for run in 0..20 {
        let vm = format!("short{run}");
        // The secondary first (it retries until the primary listens): it attaches as the
        // guest starts, so the whole output is held to the output rule.
        let r = BigRead::start(&mut lab, &vm, input.clone(), 64 << 10, 500, 7, None);
        r.check_ended_together(&mut lab, 7);
    }
}

#[test]
fn sigterm_to_a_protected_primary_stops_the_vm_on_both_copies() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Some(Lab::up("ft", 2));
    for round in 1..=5 {
        let mut ft = Ft::start_in(lab.take().unwrap(), &format!("kvd{round}"));
        assert_eq!(ft.cli(&["INCR", "n"]), "1");
        let p = ft.lab.stop_vm(ft.primary);
        let sec = ft.secondary;
        let s_ = ft
            .lab
            .wait_exit(sec, Duration::from_secs(10), "the secondary");
        let (plog, slog) = (ft.log("primary"), ft.log("secondary"));
        assert_eq!(
            (p, s_),
            (0, 0),
            "round {round}: both copies stop (exit 0)\nprimary:\n{plog}\nsecondary:\n{slog}"
        );
        assert_never_live(&slog, &ft.generations());
        assert_eq!(ft.generations().len(), 1, "{:?}", ft.generations());
        assert!(slog.contains("VM stopped on request"), "{slog}");
        let status = ft.status();
        assert!(
            status.contains("role=stopped") && status.contains("exit=stopped by the host"),
            "round {round}: {status}"
        );
        lab = Some(ft.lab);
    }
}

/// A kvd with a history of about 15 MB and two acknowledged writes; FT enabled over a
/// logging link slowed to 8 Mbit/s (a token bucket), so that the history is still in
/// transit a second later.
fn secondary_in_catch_up(tag: &str) -> Ft {
    let mut ft = Ft::start_primary(tag);
    let bench = ft
        .lab
        .redis_benchmark(&["-t", "set", "-d", "3000", "-n", "5000", "-c", "10"]);
    assert_eq!(bench.code, 0, "{}", bench.stderr);
    assert_eq!(ft.cli(&["SET", "before", "attach"]), "OK");
    assert_eq!(ft.cli(&["INCR", "acked"]), "1");
    let slow = Command::new("ip")
        .args(["netns", "exec", &ft.lab.ns("host1"), "tc", "qdisc", "add"])
        .args(["dev", "log0", "root", "tbf", "rate", "8mbit"])
        .args(["burst", "32kbit", "latency", "500ms"])
        .status()
        .unwrap();
    assert!(
        slow.success(),
        "tc qdisc tbf (the kernel has no netem here)"
    );
    ft.start_secondary();
    let own = ft.shared.join(&ft.vm).join("status.secondary");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&own).is_ok_and(|s| s.contains("role=secondary")) {
        assert!(Instant::now() < deadline, "the secondary never attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ft.status().contains("protected=false"),
        "caught up already: the test needs the history in transit\n{}",
        ft.status()
    );
    ft
}

/// The primary serves on, unprotected, with every acknowledged write.
fn check_primary_serves_on(ft: &mut Ft) {
    assert!(ft.running(ft.primary), "{}", ft.log("primary"));
    ft.wait_status("protected=false", Duration::from_secs(5));
    assert!(ft.status().contains("role=primary"), "{}", ft.status());
    assert_eq!(ft.cli(&["GET", "before"]), "attach");
    assert_eq!(ft.cli(&["INCR", "acked"]), "2");
}

#[test]
fn a_secondary_killed_during_catch_up_never_goes_live() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = secondary_in_catch_up("fk2");
    let killed = tandem(&["lab", "kill", "--name", &ft.lab.name, "host2"]);
    assert_eq!(killed.code, 0, "{}", killed.stderr);
    let sec = ft.secondary;
    ft.lab
        .wait_exit(sec, Duration::from_secs(5), "the killed secondary");
    std::thread::sleep(Duration::from_secs(1));
    assert_never_live(&ft.log("secondary"), &ft.generations());
    check_primary_serves_on(&mut ft);
}

#[test]
fn a_secondary_cut_off_during_catch_up_drops_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = secondary_in_catch_up("fd");
    let cut = Command::new("ip")
        .args(["-n", &ft.lab.ns("host2"), "link", "set", "log0", "down"])
        .status()
        .unwrap();
    assert!(cut.success());
    let sec = ft.secondary;
    let code = ft
        .lab
        .wait_exit(sec, Duration::from_secs(10), "the secondary");
    let slog = ft.log("secondary");
    assert_eq!(code, 4, "a secondary dropping out exits 4:\n{slog}");
    assert!(slog.contains("dropped out"), "{slog}");
    assert_never_live(&slog, &ft.generations());
    let own = std::fs::read_to_string(ft.shared.join(&ft.vm).join("status.secondary")).unwrap();
    assert!(own.contains("role=dropped-out"), "{own}");
    check_primary_serves_on(&mut ft);
}

#[test]
fn ft_arguments_are_range_checked_and_the_vm_stays_inside_shared_storage() {
    let shared = tempfile::tempdir().unwrap();
    let sh = s(shared.path());
    let wasm = guest("bigread.wasm");
    let missing = shared.path().join("missing");
    let primary = |extra: &[&str]| {
        let mut a = vec![
            "ft",
            "primary",
            "--log-listen",
            "127.0.0.1:0",
            "--wasm",
            s(&wasm),
        ];
        a.extend_from_slice(extra);
        tandem(&a)
    };
    let secondary = |extra: &[&str]| {
        let mut a = vec![
            "ft",
            "secondary",
            "--primary",
            "127.0.0.1:9",
            "--wasm",
            s(&wasm),
        ];
        a.extend_from_slice(extra);
        tandem(&a)
    };
    let cases: Vec<(&str, Run)> = vec![
        (
            "--wait-secs",
            secondary(&[
                "--vm",
                "v",
                "--shared",
                sh,
                "--wait-secs",
                "18446744073709551615",
            ]),
        ),
        (
            "--heartbeat-ms",
            secondary(&[
                "--vm",
                "v",
                "--shared",
                sh,
                "--heartbeat-ms",
                "9223372036854775808",
                "--timeout-ms",
                "1",
            ]),
        ),
        (
            "--timeout-ms",
            primary(&[
                "--vm",
                "v",
                "--shared",
                sh,
                "--timeout-ms",
                "18446744073709551615",
            ]),
        ),
        (
            "--timeout-ms",
            primary(&[
                "--vm",
                "v",
                "--shared",
                sh,
                "--heartbeat-ms",
                "100",
                "--timeout-ms",
                "150",
            ]),
        ),
        ("--vm", primary(&["--vm", "/tmp/outside", "--shared", sh])),
        ("--vm", primary(&["--vm", "../outside", "--shared", sh])),
        ("--vm", primary(&["--vm", "..", "--shared", sh])),
        ("--vm", primary(&["--vm", ".", "--shared", sh])),
        ("--vm", primary(&["--vm", "", "--shared", sh])),
        ("--vm", secondary(&["--vm", "a/b", "--shared", sh])),
        ("--vm", primary(&["--vm", &"v".repeat(65), "--shared", sh])),
        ("--shared", primary(&["--vm", "v", "--shared", s(&missing)])),
        (
            "--uplink",
            primary(&["--vm", "v", "--shared", sh, "--uplink", "../../x"]),
        ),
        (
            "--uplink",
            secondary(&[
                "--vm",
                "v",
                "--shared",
                sh,
                "--uplink",
                "averyveryverylongname",
            ]),
        ),
        (
            "--health-hold-ms",
            primary(&["--vm", "v", "--shared", sh, "--health-hold-ms", "0"]),
        ),
        (
            "--uplink-peer",
            primary(&["--vm", "v", "--shared", sh, "--uplink-peer", "10.77.0.2"]),
        ),
        (
            "--uplink-peer",
            secondary(
                &["--vm", "v", "--shared", sh, "--uplink", "uplink"]
                    .into_iter()
                    .chain(std::iter::repeat_n(["--uplink-peer", "10.0.0.1"], 17).flatten())
                    .collect::<Vec<_>>(),
            ),
        ),
    ];
    for (flag, run) in &cases {
        assert_eq!(run.code, 2, "{flag}: {}{}", run.stdout, run.stderr);
        assert_eq!(
            run.stderr.lines().count(),
            1,
            "{flag}: one line: {}",
            run.stderr
        );
        assert!(run.stderr.contains(flag), "{flag}: {}", run.stderr);
    }
    assert!(!missing.exists(), "ft primary created --shared");
    assert!(!std::path::Path::new("/tmp/outside").exists());
    assert!(
        std::fs::read_dir(shared.path()).unwrap().next().is_none(),
        "a refused command left files in shared storage"
    );
}

/// The logging address of lab host `k`.
fn log_addr(k: u32) -> String {
    format!("10.78.0.{}:7000", 10 + k)
}

impl Ft {
    /// A secondary on host `k` following the live copy on host `of`, itself accepting a
    /// secondary once live; `extra` flags added; its output in `VM.WHO.out`.
    fn join(&mut self, k: u32, of: u32, extra: &[&str], who: &str) -> usize {
        let kvd = guest(self.guest);
        let data = self.shared.join(&self.vm).join("data");
        let (primary, listen) = (log_addr(of), log_addr(k));
        let mut args = vec![
            "ft",
            "secondary",
            "--vm",
            &self.vm,
            "--shared",
            s(&self.shared),
            "--primary",
            &primary,
            "--log-listen",
            &listen,
            "--wasm",
            s(&kvd),
            "--datastore",
            s(&data),
            "--bridge",
            "br-vm",
        ];
        args.extend_from_slice(extra);
        let out = self.shared.join(format!("{}.{who}.out", self.vm));
        self.lab.start_vm(k, &args, &out)
    }

    fn host_log(&self, k: u32) -> String {
        self.log(&format!("host{k}"))
    }

    /// The latest checkpoint's position, from the live copy's status.
    fn checkpoint(&self) -> Option<u64> {
        self.status()
            .lines()
            .find_map(|l| l.strip_prefix("checkpoint="))
            .and_then(|v| v.parse().ok())
    }

    fn wait_checkpoint(&self, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(c) = self.checkpoint().filter(|c| *c > 0) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "no checkpoint: {}\n{}",
                self.status(),
                self.host_log(2)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_successive_host_kills_under_load_and_clients_never_notice() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start_primary_in(Lab::up("fc", 3), "kvd");
    // Small checkpoints: several are taken within the test's load.
    let second = ft.join(2, 1, &["--checkpoint-mib", "2"], "host2");
    ft.wait_status("protected=true", Duration::from_secs(10));
    let mut bench = background_benchmark(&ft.lab, "400000", Stdio::null());
    let mut checker = Checker::start(&ft.lab, "chain");
    checker.incr_for("chain", Duration::from_millis(1500));
    let first_checkpoint = ft.wait_checkpoint(Duration::from_secs(20));

    // host1 dies: host2 goes live, and accepts a secondary.
    assert_eq!(
        tandem(&["lab", "kill", "--name", &ft.lab.name, "host1"]).code,
        0
    );
    checker.incr_for("chain", Duration::from_millis(1500));
    ft.wait_status("role=live", Duration::from_secs(5));
    assert!(ft.status().contains("generation=2"), "{}", ft.status());

    // A newcomer on host3 joins the live copy from the latest checkpoint plus the events
    // since, and the VM is protected again.
    let third = ft.join(3, 2, &["--checkpoint-mib", "2"], "host3");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ft.status().contains("protected=true") {
        checker.incr_for("chain", Duration::from_millis(100));
        assert!(
            Instant::now() < deadline,
            "host3 never protected the VM: {}\nhost2:\n{}\nhost3:\n{}",
            ft.status(),
            ft.host_log(2),
            ft.host_log(3)
        );
    }
    let joined = ft.host_log(3);
    let from = joined
        .split("joining from the checkpoint at event ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("host3 did not join from a checkpoint:\n{joined}"));
    assert!(
        from >= first_checkpoint,
        "joined from {from} < {first_checkpoint}"
    );
    checker.incr_for("chain", Duration::from_millis(1000));

    // host2 dies: host3 goes live; the clients carry on.
    assert_eq!(
        tandem(&["lab", "kill", "--name", &ft.lab.name, "host2"]).code,
        0
    );
    let before = checker.sent;
    checker.incr_for("chain", Duration::from_millis(2500));
    ft.wait_status("generation=3", Duration::from_secs(5));
    assert!(ft.status().contains("role=live"), "{}", ft.status());
    let sent = checker.finish();
    assert!(sent > before + 100, "the client did not carry on");
    assert!(bench.wait().unwrap().success(), "redis-benchmark failed");
    assert_eq!(ft.cli(&["GET", "chain"]), sent.to_string());
    assert!(ft.running(third));
    assert!(!ft.running(second));
}

#[test]
fn checkpoints_bound_both_copies_memory_under_two_minutes_of_load() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut ft = Ft::start_primary_in(Lab::up("fm", 2), "kvd");
    let second = ft.join(2, 1, &[], "secondary");
    ft.wait_status("protected=true", Duration::from_secs(10));
    let (p, s2) = (ft.lab.pid(ft.primary), ft.lab.pid(second));
    let start = Instant::now();
    let mut at_one_minute = None;
    let mut rounds = 0;
    // Bounded in count and time: rounds of the issues' load for two minutes.
    while start.elapsed() < Duration::from_secs(120) && rounds < 10_000 {
        let r = ft
            .lab
            .redis_benchmark(&["-t", "set,incr", "-n", "50000", "-c", "20", "-P", "8"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        rounds += 1;
        if at_one_minute.is_none() && start.elapsed() >= Duration::from_secs(60) {
            at_one_minute = Some((rss_kib(p), rss_kib(s2)));
        }
    }
    let (p1, s1) = at_one_minute.expect("a minute of load");
    let (p2, s2now) = (rss_kib(p), rss_kib(s2));
    assert!(
        p1 > 0 && s1 > 0 && p2 > 0 && s2now > 0,
        "both copies ran throughout: RSS {p1}/{s1} then {p2}/{s2now} KiB; generations {:?}\n{}\nprimary:\n{}\nsecondary:\n{}",
        ft.generations(),
        ft.status(),
        ft.log("primary"),
        ft.log("secondary")
    );
    assert!(ft.checkpoint().is_some_and(|c| c > 0), "{}", ft.status());
    let grew = |a: u64, b: u64| b.saturating_sub(a) / 1024;
    assert!(
        grew(p1, p2) <= 64 && grew(s1, s2now) <= 64,
        "RSS between minute 1 and 2: primary {p1} -> {p2} KiB, secondary {s1} -> {s2now} KiB\n{}",
        ft.status()
    );
    eprintln!("RSS at 1 and 2 min: primary {p1} -> {p2} KiB, secondary {s1} -> {s2now} KiB");
}

/// Run VM process `i` to its end, sampling its peak resident memory (VmHWM) as it goes;
/// the last sample (KiB) and its exit code.
fn peak_rss_until_exit(lab: &mut Lab, i: usize, limit: Duration) -> (u64, i32) {
    let pid = lab.pid(i);
    let deadline = Instant::now() + limit;
    let mut peak = 0;
    loop {
        let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        peak = peak.max(hwm);
        if let Some(code) = lab.exited(i) {
            return (peak, code);
        }
        assert!(
            Instant::now() < deadline,
            "VM {i} still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_protected_guest_rereading_a_file_keeps_its_primary_memory_bounded_by_checkpoints() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::up("fr", 2);
    let shared = std::path::PathBuf::from(format!("/tmp/{}-shared", lab.name));
    let data = shared.join("rr").join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(data.join("in.bin"), &file).unwrap();
    let wasm = guest("reread.wasm");
    // 16 MiB read 128 times: 2 GiB of disk reads, every byte of them events.
    let guest_args = ["--arg", "/in.bin", "--arg", "128", "--arg", "16777216"];
    let mut plain = vec!["vm", "run", "--wasm", s(&wasm), "--datastore", s(&data)];
    plain.extend_from_slice(&guest_args);
    let i = lab.start_vm(1, &plain, &shared.join("plain.out"));
    let (plain_kib, code) = peak_rss_until_exit(&mut lab, i, Duration::from_secs(120));
    assert_eq!(
        code,
        0,
        "{}",
        std::fs::read_to_string(shared.join("plain.out")).unwrap_or_default()
    );
    let mut secondary = ft_args("secondary", "rr", &shared, &wasm, &data);
    secondary.extend(["--primary", LOG_ADDR, "--wait-secs", "30"].map(String::from));
    let sec = lab.start_vm(2, &as_str(&secondary), &shared.join("secondary.out"));
    let mut primary = ft_args("primary", "rr", &shared, &wasm, &data);
    primary.extend(["--log-listen", LOG_ADDR].map(String::from));
    primary.extend(guest_args.map(String::from));
    let p = lab.start_vm(1, &as_str(&primary), &shared.join("primary.out"));
    let (ft_kib, code) = peak_rss_until_exit(&mut lab, p, Duration::from_secs(300));
    let logs = || {
        format!(
            "primary:\n{}\nsecondary:\n{}",
            std::fs::read_to_string(shared.join("primary.out")).unwrap_or_default(),
            std::fs::read_to_string(shared.join("secondary.out")).unwrap_or_default()
        )
    };
    assert_eq!(code, 0, "{}", logs());
    assert_eq!(
        lab.wait_exit(sec, Duration::from_secs(30), "the secondary"),
        0,
        "{}",
        logs()
    );
    let out = std::fs::read_to_string(shared.join("primary.out")).unwrap_or_default();
    let plain_out = std::fs::read_to_string(shared.join("plain.out")).unwrap_or_default();
    let line = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("reread:"))
            .map(str::to_string)
    };
    assert_eq!(line(&out), line(&plain_out), "the same output");
    assert!(
        line(&out).is_some_and(|l| l.contains("2147483648 bytes")),
        "{out}"
    );
    // The goal is 2x. The primary holds each event once (its history shares the
    // guest's read and the sender streams from it), so its RSS is `vm run`'s plus what the
    // history holds beyond the last event: with the secondary attached at most three
    // 16 MiB events (the bound of one interval and one event, plus the event that lets an
    // idle secondary reach a point to checkpoint at). Until the secondary attaches the
    // primary takes its own checkpoint: its capture holds the guest's memory once more,
    // and its write compresses the memory section as it lays it out and streams the file
    // (no copy of the section's raw bytes nor of the file's). Measured 1.94x to 1.96x;
    // 1.9x to 2.3x before the streamed write. The bound leaves room for a busy machine;
    // before checkpoints it was over 40x: it fails if the history grows with the run
    // again, or if an event is held twice again.
    assert!(
        2 * ft_kib <= 5 * plain_kib,
        "peak RSS: ft primary {ft_kib} KiB, vm run {plain_kib} KiB\n{}",
        logs()
    );
    eprintln!("peak RSS: ft primary {ft_kib} KiB, vm run {plain_kib} KiB");
}

/// A bench is interrupted as a terminal's Ctrl-C does it (SIGINT to its process group)
/// while redis-benchmark loads a protected kvd in its lab: it ends at once with code 130,
/// prints no figures and leaves no namespace. (A client in a group of its own would wait
/// out its time limit against VMs that stopped.)
#[test]
fn an_interrupted_bench_stops_at_once_and_leaves_no_lab_behind() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());

    /// The namespaces of the labs named by letters and then exactly `tag`.
    fn ours(tag: &str) -> Vec<String> {
        common::netns_list()
            .into_iter()
            .filter(|n| {
                n.split_once('-').is_some_and(|(lab, _)| {
                    lab.trim_start_matches(|c: char| c.is_ascii_alphabetic()) == tag
                })
            })
            .collect()
    }
    /// Whatever the test's end: SIGINT to the group, then SIGKILL, then its labs removed.
    struct Bench(std::process::Child);
    impl Drop for Bench {
        fn drop(&mut self) {
            let group = -(self.0.id() as i32);
            if matches!(self.0.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on our own running child's process group; no memory.
                unsafe { libc::kill(group, libc::SIGINT) };
                let deadline = Instant::now() + Duration::from_secs(15);
                while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            if matches!(self.0.try_wait(), Ok(None)) {
                // SAFETY: as above.
                unsafe { libc::kill(group, libc::SIGKILL) };
                let _ = self.0.wait();
            }
            let tag = (self.0.id() % 100_000).to_string();
            let labs: std::collections::BTreeSet<String> = ours(&tag)
                .iter()
                .filter_map(|n| Some(n.split_once('-')?.0.to_string()))
                .collect();
            for lab in labs {
                let _ = tandem(&["lab", "down", "--name", &lab]);
            }
        }
    }
    let kvd = common::guest("kvd.wasm");
    let mut bench = Bench(
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["bench", "ft", "--quick", "--soak-secs", "0", "--kills", "1"])
            .env("TANDEM_GUESTS", kvd.parent().unwrap())
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let tag = (bench.0.id() % 100_000).to_string();
    let mut err = BufReader::new(bench.0.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("kvd under FT") {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "the bench ended before its FT phase: {seen}"
        );
        seen += &line;
    }
    // Its lab is up and redis-benchmark runs in it.
    let client = format!("bff{tag}-client");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let loading = common::netns_pids(&client).iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "redis-benchmark")
        });
        if loading {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no client ran in {client}: {seen}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's process group; no memory is involved.
    unsafe { libc::kill(-(bench.0.id() as i32), libc::SIGINT) };
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = bench.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(bench.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("bench interrupted"), "{rest}");
    assert_eq!(out, "", "figures printed after an interrupt");
    assert_eq!(ours(&tag), Vec::<String>::new(), "namespaces left behind");
}
