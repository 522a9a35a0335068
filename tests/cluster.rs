//! The cluster end to end, through the verbs only (the real `tandem` CLI against the REST
//! API of real host agents on a real etcd), with real clients: placement rules, automatic
//! re-protection after a host kill under load, HA restart, the master's failover, bad
//! requests.

mod common;

use common::cluster::Cluster;

use std::time::Duration;

use common::{Checker, KVD_LOAD, guest, s, tandem};
use serde_json::Value;

const KVD_NIC: &str = "mac=02:00:00:00:00:10,ip=10.77.0.10/24";

impl Cluster {
    fn kill(&self, host: &str) {
        let r = tandem(&["lab", "kill", host, "--name", &self.lab.name]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    }

    /// kvd created with its datastore on shared storage and powered on.
    fn kvd(&self, name: &str, nic: &str, extra: &[&str]) {
        self.kvd_with(name, nic, extra, None)
    }

    fn kvd_on(&self, name: &str, nic: &str, host: Option<&str>) {
        self.kvd_with(name, nic, &[], host)
    }

    fn kvd_with(&self, name: &str, nic: &str, extra: &[&str], host: Option<&str>) {
        let kvd = guest("kvd.wasm");
        let mut a = vec![
            "vm",
            "create",
            name,
            "--wasm",
            s(&kvd),
            "--nic",
            nic,
            "--listen",
            "tcp:6379",
            "--memory-mib",
            "64",
        ];
        a.extend_from_slice(extra);
        self.ok(&a);
        match host {
            Some(h) => self.ok(&["vm", "power-on", name, "--host", h]),
            None => self.ok(&["vm", "power-on", name]),
        };
    }

    /// httpd as VM `web` (10.77.0.11:80, not FT), serving `page` from its datastore on
    /// shared storage, powered on on `host`.
    fn web(&self, page: &str, host: &str) {
        let httpd = guest("httpd.wasm");
        let www = format!("/tmp/{}-shared/web/www", self.lab.name);
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(format!("{www}/index.html"), page).unwrap();
        self.ok(&[
            "vm",
            "create",
            "web",
            "--wasm",
            s(&httpd),
            "--datastore",
            &www,
            "--nic",
            "mac=02:00:00:00:00:11,ip=10.77.0.11/24",
            "--listen",
            "tcp:80",
            "--memory-mib",
            "64",
        ]);
        self.ok(&["vm", "power-on", "web", "--host", host]);
        assert_eq!(field(&self.show("web"), "primary_host"), host);
        self.lab
            .wait_for("curl", &["-s", "http://10.77.0.11/"], page.trim());
    }

    /// How many `ft primary` processes of `vm` run on host K.
    fn primaries_on(&self, k: u32, vm: &str) -> usize {
        let want = format!("ft\0primary\0--vm\0{vm}\0");
        common::netns_pids(&self.lab.ns(&format!("host{k}")))
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(want.len()).any(|w| w == want.as_bytes()))
            })
            .count()
    }

    /// How many `ft primary`/`ft secondary` processes of `vm` run, over every host.
    fn copies_running(&self, vm: &str) -> usize {
        let out = std::process::Command::new("pgrep")
            .args([
                "-f",
                &format!(
                    "ft (primary|secondary) --vm {vm} --shared /tmp/{}-shared ",
                    self.lab.name
                ),
            ])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

/// What [`Cluster::watching`] saw: the most copies of the VM running at once, in how many
/// looks, and what the watched work returned.
struct Watched<R> {
    most: usize,
    samples: usize,
    out: R,
}

impl Cluster {
    /// Run `work` while counting, every 10 ms, the copies of `vm` running on every host.
    fn watching<R: Send>(&self, vm: &str, work: impl FnOnce() -> R + Send) -> Watched<R> {
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            let watcher = sc.spawn(|| {
                let (mut most, mut samples) = (0, 0);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    most = most.max(self.copies_running(vm));
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                (most, samples)
            });
            let out = work();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let (most, samples) = watcher.join().unwrap();
            Watched { most, samples, out }
        })
    }
}

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

/// The cluster tells the losses the copies handle by themselves, with their reasons: a
/// secondary whose host lost its storage makes the VM not protected saying so, and a
/// primary whose host lost its storage hands the VM over, which the timeline tells as a
/// handover with its cause, not as a failover (none is counted).
#[test]
fn storage_losses_are_told_with_their_reasons_and_a_handover_is_no_failover() {
    let c = Cluster::up("hwhy", 3);
    c.kvd("kvd", KVD_NIC, &[]);
    c.ok(&["ft", "turn-on", "kvd"]);
    let v = c.show("kvd");
    assert_eq!(field(&v, "ft"), "protected", "{v}");
    let (p1, s1) = (
        field(&v, "primary_host").to_string(),
        field(&v, "secondary_host").to_string(),
    );
    let lab_fault = |verb: &str, host: &str| {
        let r = tandem(&["lab", verb, "--name", &c.lab.name, host, "storage"]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    };
    lab_fault("cut", &s1);
    c.wait("not protected, saying why", 30, || {
        let v = c.show("kvd");
        field(&v, "ft") == "not_protected"
            && field(&v, "ft_reason").contains("the secondary's host lost its storage")
    });
    lab_fault("heal", &s1);
    c.wait("protected again", 30, || {
        field(&c.show("kvd"), "ft") == "protected"
    });
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    lab_fault("cut", &p1);
    // kvd's next write fails on the primary's host: the VM moves before kvd sees it.
    let mut n = 0;
    c.wait("the VM on the secondary's host", 30, || {
        let r = c
            .lab
            .client("redis-cli", &["-h", "10.77.0.10", "INCR", "hwhy"]);
        if r.code == 0 && r.stdout.trim().parse::<u64>().is_ok() {
            n += 1;
        }
        field(&c.show("kvd"), "primary_host") == s1
    });
    lab_fault("heal", &p1);
    let v = c.show("kvd");
    assert_eq!(v["failovers"], 0, "{v}");
    let token = std::fs::read_to_string(format!("/tmp/{}-shared/.token", c.lab.name)).unwrap();
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let timeline = c.lab.client(
        "curl",
        &[
            "-s",
            "-H",
            &bearer,
            "http://10.79.0.11:7070/api/v1/timeline",
        ],
    );
    let events: Value = serde_json::from_str(&timeline.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", timeline.stdout));
    let events = events.as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e["vm"] == "kvd")
        .map(|e| field(e, "kind"))
        .collect();
    assert!(!kinds.contains(&"failover"), "{kinds:?}");
    assert!(
        events.iter().any(|e| field(e, "kind") == "handover"
            && field(e, "detail").starts_with(&format!(
                "handover (primary lost its storage): the VM runs on {s1}, its primary on {p1} lost its storage"
            ))),
        "{events:#?}"
    );
    let r = c
        .lab
        .client("redis-cli", &["-h", "10.77.0.10", "GET", "hwhy"]);
    assert_eq!(
        r.stdout.trim(),
        n.to_string(),
        "every acknowledged INCR is there"
    );
}

#[test]
fn a_host_kill_under_load_fails_over_and_the_cluster_reprotects_without_a_command() {
    let c = Cluster::up("reprot", 3);
    c.kvd("kvd", KVD_NIC, &[]);
    let on = c.ok(&["ft", "turn-on", "kvd"]);
    assert!(
        on.stdout.lines().last().unwrap_or("").contains("Protected"),
        "{}",
        on.stdout
    );
    let v = c.show("kvd");
    assert_eq!(field(&v, "ft"), "protected", "{v}");
    let (p1, s1) = (field(&v, "primary_host"), field(&v, "secondary_host"));
    assert!(
        !p1.is_empty() && !s1.is_empty() && p1 != s1,
        "anti-affinity: {v}"
    );
    assert!(v["lag_ms"].is_u64(), "{v}");
    let (p1, s1) = (p1.to_string(), s1.to_string());

    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    let mut checker = Checker::start(&c.lab, "reprot:counter");
    let load = std::thread::scope(|sc| {
        let bench = sc.spawn(|| c.lab.redis_benchmark(KVD_LOAD));
        checker.incr_for("reprot:counter", Duration::from_millis(500));
        c.kill(&p1);
        checker.incr_for("reprot:counter", Duration::from_secs(2));
        bench.join().unwrap()
    });
    assert_eq!(
        load.code, 0,
        "redis-benchmark: {}{}",
        load.stdout, load.stderr
    );
    let sent = checker.sent;
    assert_eq!(checker.finish(), sent, "every INCR answered in order");

    // Protected again, with no command: the old secondary is the primary, a new secondary
    // runs on the third host.
    c.wait("re-protected", 60, || {
        let v = c.show("kvd");
        field(&v, "ft") == "protected" && field(&v, "primary_host") == s1
    });
    let v = c.show("kvd");
    let s2 = field(&v, "secondary_host");
    assert!(s2 != s1 && s2 != p1 && !s2.is_empty(), "{v}");
    assert_eq!(v["failovers"], 1, "{v}");
    assert_eq!(v["reprotections"], 1, "{v}");
    let r = c
        .lab
        .client("redis-cli", &["-h", "10.77.0.10", "GET", "reprot:counter"]);
    assert_eq!(r.stdout.trim(), sent.to_string());
    let list = c.ok(&["vm", "list"]);
    assert!(list.stdout.contains("Protected"), "{}", list.stdout);
}

#[test]
fn both_hosts_of_a_pair_killed_restarts_the_vm_with_every_acknowledged_write_and_a_plain_vm_too() {
    let c = Cluster::up("harst", 4);
    c.kvd("kvd", KVD_NIC, &["--restart-priority", "high"]);
    c.ok(&["ft", "turn-on", "kvd"]);
    // An unprotected httpd beside it, on the primary's host.
    let v = c.show("kvd");
    let (p, sec) = (
        field(&v, "primary_host").to_string(),
        field(&v, "secondary_host").to_string(),
    );
    c.web("served by the cluster\n", &p);
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    for i in 0..50 {
        let r = c.lab.client(
            "redis-cli",
            &[
                "-h",
                "10.77.0.10",
                "SET",
                &format!("k{i}"),
                &format!("v{i}"),
            ],
        );
        assert_eq!(r.stdout.trim(), "OK");
    }

    c.kill(&p);
    c.kill(&sec);
    let took = c.wait("kvd and web restarted elsewhere", 60, || {
        let (k, w) = (c.show("kvd"), c.show("web"));
        let alive = |h: &str| !h.is_empty() && h != p && h != sec;
        alive(field(&k, "primary_host")) && alive(field(&w, "primary_host"))
    });
    eprintln!("restarted in {took:?}");
    c.lab.wait_for(
        "curl",
        &["-s", "http://10.77.0.11/"],
        "served by the cluster",
    );
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    for i in 0..50 {
        let r = c
            .lab
            .client("redis-cli", &["-h", "10.77.0.10", "GET", &format!("k{i}")]);
        assert_eq!(r.stdout.trim(), format!("v{i}"), "every acknowledged write");
    }
    let k = c.show("kvd");
    assert_eq!(k["restarts"], 1, "{k}");
    // And it is protected again, on the two hosts left.
    c.wait("kvd protected again", 60, || {
        field(&c.show("kvd"), "ft") == "protected"
    });
    assert!(c.copies_running("kvd") == 2);
}

#[test]
fn placement_rules_anti_affinity_four_ft_copies_per_host_and_the_same_version() {
    let mut c = Cluster::up("place", 3);
    // host3 runs another Tandem version (a rolling upgrade half done).
    c.lab.restart_agent(3, &["--advertise-version", "9.9.9"]);
    c.wait("host3 back with version 9.9.9", 60, || {
        c.json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "host3" && h["version"] == "9.9.9")
    });
    // Four FT VMs with their primaries on host1 and host2: each secondary must go to the
    // other of the two (never beside its primary, never to host3), which fills both.
    for i in 0..4 {
        let name = format!("kv{i}");
        let host = if i % 2 == 0 { "host1" } else { "host2" };
        c.kvd_on(
            &name,
            &format!("mac=02:00:00:00:01:0{i},ip=10.77.0.2{i}/24"),
            Some(host),
        );
        c.ok(&["ft", "turn-on", &name]);
        let v = c.show(&name);
        assert_eq!(field(&v, "primary_host"), host, "{v}");
        assert_ne!(field(&v, "secondary_host"), host, "anti-affinity: {v}");
        assert_ne!(field(&v, "secondary_host"), "host3", "same version: {v}");
    }
    let hosts = c.json(&["host", "list"]);
    for h in hosts.as_array().unwrap() {
        let want = if h["name"] == "host3" { 0 } else { 4 };
        assert_eq!(h["ft_vms"], want, "{hosts}");
    }
    // A fifth VM runs unprotected on host1 (a non-FT VM does not count), but FT for it is
    // refused, in one line naming each host's reason.
    c.kvd_on(
        "kv4",
        "mac=02:00:00:00:01:04,ip=10.77.0.24/24",
        Some("host1"),
    );
    let r = c.verb(&["ft", "turn-on", "kv4"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    let why = r.stderr.trim();
    assert_eq!(why.lines().count(), 1, "{why}");
    assert!(why.contains("no compatible second host"), "{why}");
    assert!(
        why.contains("host2 is full (4 FT copies, at most 4)"),
        "{why}"
    );
    assert!(why.contains("host3 runs Tandem 9.9.9"), "{why}");
    // Turning FT off for kv1 frees a slot on each of host1 and host2: kv4 now fits.
    c.ok(&["ft", "turn-off", "kv1"]);
    c.wait("kv1's secondary removed", 30, || {
        c.copies_running("kv1") == 1
    });
    c.ok(&["ft", "turn-on", "kv4"]);
    let v = c.show("kv4");
    assert_eq!(field(&v, "ft"), "protected", "{v}");
    assert_eq!(field(&v, "secondary_host"), "host2", "{v}");
}

#[test]
fn the_masters_agent_killed_and_restarted_at_once_never_runs_a_copy_twice() {
    let c = Cluster::up("master", 3);
    let m1 = field(&c.json(&["cluster", "status"]), "master").to_string();
    assert!(m1.starts_with("host"), "{m1}");
    let k: u32 = m1["host".len()..].parse().unwrap();
    // kvd's primary on the master's host, protected.
    c.kvd_on("kvd", KVD_NIC, Some(&m1));
    c.ok(&["ft", "turn-on", "kvd"]);
    assert_eq!(field(&c.show("kvd"), "primary_host"), m1);
    // Only the agent dies (its copies with it), and is started again at once: the new one
    // must never start the copies its predecessor ran, whoever is master meanwhile.
    assert_eq!(c.primaries_on(k, "kvd"), 1);
    let stale = std::sync::atomic::AtomicUsize::new(0);
    let Watched {
        most, out: took, ..
    } = c.watching("kvd", || {
        c.lab.kill_agent(k);
        c.lab.host_op("revive", k);
        let took = c.wait("kvd failed over and protected again", 60, || {
            // The old primary never comes back on its host (the live copy is the
            // promoted secondary, an `ft secondary` process).
            stale.fetch_max(
                c.primaries_on(k, "kvd"),
                std::sync::atomic::Ordering::Relaxed,
            );
            let v = c.show("kvd");
            field(&v, "ft") == "protected" && v["failovers"] == 1
        });
        c.lab
            .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        std::thread::sleep(Duration::from_secs(1));
        took
    });
    eprintln!("protected again {took:?} after the master's agent was killed");
    assert!(
        most <= 2,
        "kvd ran {most} copies at once (a primary and a secondary at most)"
    );
    assert_eq!(c.copies_running("kvd"), 2);
    assert_eq!(
        stale.into_inner(),
        0,
        "the restarted agent started its predecessor's primary"
    );
    assert_eq!(c.primaries_on(k, "kvd"), 0);
    let st = c.json(&["cluster", "status"]);
    assert!(field(&st, "master").starts_with("host"), "a master: {st}");
    // The restarted agent's host is back and takes work again.
    c.wait("the old master's host back", 30, || {
        c.json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == m1.as_str() && h["state"] != "not responding")
    });
    let v = c.show("kvd");
    if field(&v, "secondary_host") != m1 && field(&v, "primary_host") != m1 {
        c.ok(&["ft", "migrate-secondary", "kvd", "--to", &m1]);
        assert_eq!(field(&c.show("kvd"), "secondary_host"), m1);
    }
    assert_eq!(field(&c.show("kvd"), "ft"), "protected");
}

#[test]
fn power_cycles_re_creation_and_concurrent_creates_stay_consistent() {
    let c = Cluster::up("cycle", 2);
    c.kvd_on("kvd", KVD_NIC, Some("host1"));
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    // Off and on again at once, asking for the other host: whether the master saw it off
    // or not, there is never a second copy before the first stopped.
    let most = c
        .watching("kvd", || {
            c.ok(&["vm", "power-off", "kvd"]);
            c.ok(&["vm", "power-on", "kvd", "--host", "host2"]);
            c.lab
                .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        })
        .most;
    assert_eq!(most, 1, "kvd ran twice across a power cycle");
    // Destroyed and created again under its name: it runs again at once.
    c.ok(&["vm", "power-off", "kvd"]);
    c.wait("kvd stopped", 30, || c.copies_running("kvd") == 0);
    // At once after the power-off: destroy waits for the copies' reports to go.
    c.ok(&["vm", "destroy", "kvd"]);
    c.kvd("kvd", KVD_NIC, &[]);
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    // Created at once: every VM gets its own logging port.
    let kvd = guest("kvd.wasm");
    std::thread::scope(|sc| {
        for i in 0..4 {
            let kvd = &kvd;
            let c = &c;
            sc.spawn(move || {
                let name = format!("p{i}");
                c.ok(&["vm", "create", &name, "--wasm", s(kvd)]);
            });
        }
    });
    let vms = c.json(&["vm", "list"]);
    let mut ports: Vec<u64> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["spec"]["log_port"].as_u64().unwrap())
        .collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 5, "{vms}");
    // A datastore outside the VM's own folder, or another VM's, is refused.
    for bad in ["/etc", &format!("/tmp/{}-shared/kvd", c.lab.name)] {
        let r = c.verb(&[
            "vm",
            "create",
            "evil",
            "--wasm",
            s(&kvd),
            "--datastore",
            bad,
        ]);
        assert_eq!(r.code, 2, "{bad}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.contains("a datastore is a folder inside"),
            "{}",
            r.stderr
        );
    }
    // A datastore swapped for a link after the VM was created: no copy ever starts on it;
    // the cluster gives up after five tries and says why.
    let ds = format!("/tmp/{}-shared/p0/datastore", c.lab.name);
    std::fs::remove_dir(&ds).unwrap();
    std::os::unix::fs::symlink("/etc", &ds).unwrap();
    c.ok(&["vm", "power-on", "p0", "--no-wait"]);
    c.wait("p0 left off, saying why", 60, || {
        let v = c.show("p0");
        field(&v, "power") == "off"
            && field(&v, "ft_reason").contains("no longer resolves to itself")
    });
    assert_eq!(c.copies_running("p0"), 0);
    // A VM folder that is a link, or a datastore that leads out through one: refused.
    let shared = format!("/tmp/{}-shared", c.lab.name);
    std::os::unix::fs::symlink("/etc", format!("{shared}/linked")).unwrap();
    let r = c.verb(&["vm", "create", "linked", "--wasm", s(&kvd)]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("must be a real folder"), "{}", r.stderr);
    std::fs::create_dir_all(format!("{shared}/out")).unwrap();
    std::os::unix::fs::symlink("/", format!("{shared}/out/ds")).unwrap();
    let r = c.verb(&[
        "vm",
        "create",
        "out",
        "--wasm",
        s(&kvd),
        "--datastore",
        &format!("{shared}/out/ds/etc"),
    ]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("not inside the VM's own folder"),
        "{}",
        r.stderr
    );
    let r = c.verb(&["vm", "create", "twin", "--wasm", s(&kvd), "--nic", KVD_NIC]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("already has MAC"), "{}", r.stderr);
}

#[test]
fn bad_requests_are_refused_with_a_4xx_and_a_clear_message() {
    let c = Cluster::up("bad", 2);
    let r = c.verb(&["vm", "show", "nope"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no VM named nope"), "{}", r.stderr);
    let r = c.verb(&["vm", "power-on", "Bad/Name"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("VM name"), "{}", r.stderr);
    let r = c.verb(&["vm", "create", "x", "--wasm", "/no/such.wasm"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a file"), "{}", r.stderr);
    c.kvd("kvd", KVD_NIC, &[]);
    let r = c.verb(&["vm", "create", "kvd", "--wasm", s(&guest("kvd.wasm"))]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    let r = c.verb(&["vm", "destroy", "kvd"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("power it off first"), "{}", r.stderr);
    let r = c.verb(&["ft", "disable", "kvd"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("FT is not on"), "{}", r.stderr);
    let r = c.verb(&["ft", "test-failover", "kvd"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not protected"), "{}", r.stderr);
    // Raw HTTP from the client machine: malformed JSON, unknown fields, unknown routes.
    let api = "http://10.79.0.11:7070/api/v1";
    let token = std::fs::read_to_string(format!("/tmp/{}-shared/.token", c.lab.name)).unwrap();
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let curl = |args: &[&str]| {
        c.lab.client(
            "curl",
            &[&["-s", "-w", "\n%{http_code}", "-H", &bearer], args].concat(),
        )
    };
    // Without the token (or with another), the API refuses, and says how to sign in.
    for h in [
        &[][..],
        &["-H", "Authorization: Bearer 0000000000000000000000"][..],
    ] {
        let r = c.lab.client(
            "curl",
            &[&["-s", "-w", "\n%{http_code}"], h, &[&format!("{api}/vms")]].concat(),
        );
        assert!(r.stdout.ends_with("401"), "{}", r.stdout);
        assert!(r.stdout.contains("Authorization: Bearer"), "{}", r.stdout);
    }
    let r = curl(&["-X", "POST", "-d", "{bad", &format!("{api}/vms")]);
    assert!(r.stdout.ends_with("400"), "{}", r.stdout);
    assert!(r.stdout.contains("\"error\""), "{}", r.stdout);
    let r = curl(&[
        "-X",
        "POST",
        "-d",
        r#"{"name":"y","wasm":"/x","colour":1}"#,
        &format!("{api}/vms"),
    ]);
    assert!(r.stdout.ends_with("400"), "{}", r.stdout);
    let r = curl(&[&format!("{api}/nothing")]);
    assert!(r.stdout.ends_with("404"), "{}", r.stdout);
    let r = curl(&["-X", "DELETE", &format!("{api}/cluster")]);
    assert!(r.stdout.ends_with("405"), "{}", r.stdout);
    // A host whose logging link is down cannot take a secondary, and the refusal says so.
    let v = c.show("kvd");
    let other = if field(&v, "primary_host") == "host1" {
        2
    } else {
        1
    };
    let cut = std::process::Command::new("ip")
        .args([
            "-n",
            &c.lab.ns(&format!("host{other}")),
            "link",
            "set",
            "log0",
            "down",
        ])
        .status()
        .unwrap();
    assert!(cut.success());
    c.wait("the cut seen by the probe", 30, || {
        c.json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == format!("host{other}") && h["log_peers"] == serde_json::json!([]))
    });
    let r = c.verb(&["ft", "turn-on", "kvd"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "host{other} cannot reach the primary's host {} on the logging network",
            field(&v, "primary_host")
        )),
        "{}",
        r.stderr
    );
    let r = curl(&[&format!("{api}/openapi.json")]);
    assert!(
        r.stdout.contains("\"openapi\"") && r.stdout.ends_with("200"),
        "{}",
        r.stdout
    );
}

#[test]
fn an_isolated_host_stops_its_vm_which_restarts_elsewhere_and_never_runs_twice() {
    let c = Cluster::up("isol", 2);
    c.web("one copy only\n", "host1");
    let r = tandem(&["lab", "isolate", "host1", "--name", &c.lab.name]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // Until it serves from host2, never more than one copy runs anywhere.
    let Watched { most, samples, .. } = c.watching("web", || {
        c.wait("web restarted on host2", 60, || {
            field(&c.show("web"), "primary_host") == "host2"
        });
        c.lab
            .wait_for("curl", &["-s", "http://10.77.0.11/"], "one copy only");
    });
    assert_eq!(most, 1, "web ran {most} times at once");
    assert!(
        samples > 10,
        "the isolation was watched ({samples} samples)"
    );
    let log =
        std::fs::read_to_string(format!("/tmp/{}-host1-agent.log", c.lab.name)).unwrap_or_default();
    assert!(
        log.contains("isolation response"),
        "host1's agent says why it stopped web: {log}"
    );
}

#[test]
fn a_guest_that_ends_leaves_its_vm_off_and_power_on_starts_it_again() {
    let c = Cluster::up("ends", 2);
    let fsdemo = guest("fsdemo.wasm");
    c.ok(&[
        "vm",
        "create",
        "once",
        "--wasm",
        s(&fsdemo),
        "--arg",
        "hello",
    ]);
    c.ok(&["vm", "power-on", "once"]);
    let agents = format!("/tmp/{}-shared/.agents", c.lab.name);
    let runs = || -> usize {
        (1..=2)
            .flat_map(|k| {
                std::fs::read_dir(format!("{agents}/host{k}"))
                    .into_iter()
                    .flatten()
            })
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("once."))
            .count()
    };
    c.wait("the guest ended and the VM is off", 30, || {
        let v = c.show("once");
        field(&v, "power") == "off"
            && field(&v, "ft_reason").contains("the guest ended (exit code 0)")
    });
    // Not restarted: the guest ended by itself, and would end alike anywhere.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(runs(), 1);
    assert_eq!(c.show("once")["restarts"], 0);
    // The copy's module, instrumented and compiled, is cached on shared storage...
    let code = format!("/tmp/{}-shared/.cache/code", c.lab.name);
    let entries = || -> Vec<(std::path::PathBuf, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(&code)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.path(), e.metadata().unwrap().ino()))
            .collect()
    };
    let first = entries();
    assert_eq!(first.len(), 1, "no compiled code in {code}");
    c.ok(&["vm", "power-on", "once"]);
    c.wait("a second run", 30, || runs() == 2);
    c.wait("off again", 30, || field(&c.show("once"), "power") == "off");
    // ...so the second run, on whichever host, loaded it: a compile would have stored its
    // code anew (another file renamed into place).
    assert_eq!(entries(), first);
}

#[test]
fn a_stalled_agent_fences_its_copies_before_its_lease_expires() {
    let c = Cluster::up("stall", 2);
    c.kvd_on("kvd", KVD_NIC, Some("host1"));
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    // The agent stops (SIGSTOP): it neither renews its lease nor kills anything. Its copy
    // must end by itself before the lease expires and kvd starts on host2.
    c.lab.signal_agent(1, libc::SIGSTOP);
    let Watched { most, samples, .. } = c.watching("kvd", || {
        c.wait("kvd restarted on host2", 60, || {
            field(&c.show("kvd"), "primary_host") == "host2"
        });
        c.lab
            .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    });
    c.lab.signal_agent(1, libc::SIGCONT);
    assert_eq!(most, 1, "kvd ran {most} times at once");
    assert!(samples > 10, "watched ({samples} samples)");
    // Once running again, host1's agent reaps its copy and says why it ended.
    let log = c.lab.agent_log(1);
    let mut fenced = false;
    for _ in 0..50 {
        fenced = std::fs::read_to_string(&log).is_ok_and(|t| t.contains("(fenced:"));
        if fenced {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fenced, "host1's agent says its copy was fenced");
    // The agent, running again, registers anew and runs nothing of its earlier life.
    c.wait("host1 back", 30, || {
        c.json(&["host", "list"])
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "host1" && h["state"] != "not responding")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.copies_running("kvd"), 1);
}

/// Maintenance of a host holding an FT primary, another VM's FT secondary and a VM without
/// FT, under real client load: the primary hands over by a planned switch, the secondary
/// moves, the plain VM moves through a secondary placed for the move; nothing is lost, no
/// connection resets, every FT VM is protected again, and nothing lands on the host.
#[test]
fn maintenance_moves_a_primary_a_secondary_and_a_plain_vm_off_a_host_under_load() {
    let c = Cluster::up("maint", 4);
    c.kvd_on("a", KVD_NIC, Some("host1"));
    c.ok(&["ft", "turn-on", "a"]);
    c.kvd_on("b", "mac=02:00:00:00:00:12,ip=10.77.0.12/24", Some("host2"));
    c.ok(&["ft", "turn-on", "b"]);
    c.ok(&["ft", "migrate-secondary", "b", "--to", "host1"]);
    c.web("<h1>maintained</h1>\n", "host1");
    assert_eq!(field(&c.show("a"), "primary_host"), "host1");
    assert_eq!(field(&c.show("b"), "secondary_host"), "host1");
    let b_secondary = c
        .lab
        .client("redis-cli", &["-h", "10.77.0.12", "SET", "maint:b", "kept"]);
    assert_eq!(b_secondary.stdout.trim(), "OK", "{}", b_secondary.stderr);

    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    let mut checker = Checker::start(&c.lab, "maint:counter");
    let (load, entered) = std::thread::scope(|sc| {
        let bench = sc.spawn(|| c.lab.redis_benchmark(KVD_LOAD));
        checker.incr_for("maint:counter", Duration::from_millis(300));
        let entered = sc.spawn(|| c.verb(&["host", "maintenance", "enter", "host1"]));
        while !entered.is_finished() {
            checker.incr_for("maint:counter", Duration::from_millis(200));
        }
        checker.incr_for("maint:counter", Duration::from_millis(500));
        (bench.join().unwrap(), entered.join().unwrap())
    });
    assert_eq!(entered.code, 0, "{}{}", entered.stdout, entered.stderr);
    eprintln!("{}", entered.stdout);
    assert!(
        entered.stdout.contains("host1 evacuated"),
        "{}",
        entered.stdout
    );
    assert_eq!(
        load.code, 0,
        "redis-benchmark: {}{}",
        load.stdout, load.stderr
    );
    let sent = checker.sent;
    assert_eq!(
        checker.finish(),
        sent,
        "every INCR answered in order, no reset"
    );
    let r = c
        .lab
        .client("redis-cli", &["-h", "10.77.0.10", "GET", "maint:counter"]);
    assert_eq!(r.stdout.trim(), sent.to_string());

    for vm in ["a", "b"] {
        let v = c.show(vm);
        assert_eq!(field(&v, "ft"), "protected", "{v}");
        assert!(field(&v, "primary_host") != "host1", "{v}");
        assert!(field(&v, "secondary_host") != "host1", "{v}");
        // A planned switch is not a failover.
        assert_eq!(v["failovers"], 0, "{v}");
    }
    // a's primary left host1 by a planned switch: the secondary went live on the
    // handover, never on a timeout (its copy logs, on every host, say which).
    let logs: String = (1..=4)
        .filter_map(|k| {
            std::fs::read_dir(format!("/tmp/{}-shared/.agents/host{k}", c.lab.name)).ok()
        })
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with("a.") && n.ends_with(".log")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("handover: planned switch") && logs.contains("going live"),
        "a's secondary went live on the handover: {logs}"
    );
    assert!(
        !logs.contains("primary lost ("),
        "a timeout, not a planned switch: {logs}"
    );
    let web = c.show("web");
    assert!(
        !field(&web, "primary_host").is_empty() && field(&web, "primary_host") != "host1",
        "{web}"
    );
    assert!(
        web["secondary_host"].is_null(),
        "no secondary is left behind: {web}"
    );
    let page = c.lab.client("curl", &["-s", "http://10.77.0.11/"]);
    assert_eq!(page.stdout.trim(), "<h1>maintained</h1>");
    let got = c
        .lab
        .client("redis-cli", &["-h", "10.77.0.12", "GET", "maint:b"]);
    assert_eq!(got.stdout.trim(), "kept");
    let hosts = c.json(&["host", "list"]);
    let h1 = hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == "host1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(h1["maintenance"], true, "{hosts}");
    assert_eq!(h1["vms"], 0, "{hosts}");
    // Out of maintenance, the host takes VMs again.
    c.ok(&["host", "maintenance", "exit", "host1"]);
    c.ok(&["ft", "migrate-secondary", "a", "--to", "host1"]);
}

/// Maintenance is refused, with the reason, when the other hosts cannot take what the host
/// holds, and then nothing moves.
#[test]
fn maintenance_is_refused_when_the_rest_of_the_cluster_cannot_take_the_vms() {
    let c = Cluster::up("mrefuse", 2);
    c.kvd_on("kvd", KVD_NIC, Some("host1"));
    c.ok(&["ft", "turn-on", "kvd"]);
    let r = c.verb(&["host", "maintenance", "enter", "host1"]);
    assert_ne!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("host1 cannot enter maintenance")
            && r.stderr.contains("no host for the new secondary of kvd"),
        "{}",
        r.stderr
    );
    let v = c.show("kvd");
    assert_eq!(field(&v, "primary_host"), "host1", "{v}");
    assert_eq!(field(&v, "ft"), "protected", "{v}");
    let bad = c.verb(&["host", "maintenance", "enter", "nosuch"]);
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr.contains("no connected host named nosuch"),
        "{}",
        bad.stderr
    );
}

/// A rolling upgrade, the documented way: one host at a time enters maintenance, its agent
/// is replaced by a second build of another version, and it exits maintenance. Under a
/// client's load the FT VMs stay protected except while their own pair moves, nothing is
/// lost, and no pair is ever protected across two versions.
#[test]
fn a_rolling_upgrade_of_every_host_to_a_second_build_keeps_protection_and_never_pairs_two_versions()
{
    const V2: &str = "0.2.0-upgrade";
    let v2 = common::second_build(V2);
    let mut c = Cluster::up("upgrade", 4);
    c.kvd("a", KVD_NIC, &[]);
    c.ok(&["ft", "turn-on", "a"]);
    c.kvd("b", "mac=02:00:00:00:00:12,ip=10.77.0.12/24", &[]);
    c.ok(&["ft", "turn-on", "b"]);
    c.lab
        .wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
    let mut checker = Checker::start(&c.lab, "upgrade:counter");
    let done = std::sync::atomic::AtomicBool::new(false);
    /// Stops the watcher however the scope ends (a failed step must not leave it looping).
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let mixed = std::thread::scope(|sc| {
        let _stop = Stop(&done);
        // Every 150 ms: is any VM protected by a pair on two versions?
        let name = c.lab.name.clone();
        let done = &done;
        let watcher = sc.spawn(move || {
            let mut mixed = Vec::new();
            let list = |what: &str| tandem(&[what, "list", "--json", "--lab", &name]);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let (hosts, vms) = (list("host"), list("vm"));
                let (Ok(hosts), Ok(vms)) = (
                    serde_json::from_str::<Value>(&hosts.stdout),
                    serde_json::from_str::<Value>(&vms.stdout),
                ) else {
                    continue;
                };
                let version = |h: &str| {
                    hosts.as_array().and_then(|a| {
                        a.iter()
                            .find(|x| x["name"] == h)
                            .map(|x| x["version"].as_str().unwrap_or("").to_string())
                    })
                };
                for v in vms.as_array().into_iter().flatten() {
                    let (p, s) = (field(v, "primary_host"), field(v, "secondary_host"));
                    if field(v, "ft") == "protected" && version(p) != version(s) {
                        mixed.push(format!(
                            "{} on {p} ({:?}) and {s} ({:?})",
                            field(v, "name"),
                            version(p),
                            version(s)
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(150));
            }
            mixed
        });
        for k in 1..=4 {
            let host = format!("host{k}");
            checker.incr_for("upgrade:counter", Duration::from_millis(200));
            // A pair with no copy on this host does not move: it stays protected
            // throughout this host's maintenance and upgrade.
            let untouched: Vec<&str> = ["a", "b"]
                .into_iter()
                .filter(|vm| {
                    let v = c.show(vm);
                    field(&v, "primary_host") != host && field(&v, "secondary_host") != host
                })
                .collect();
            let still_protected = |when: &str| {
                for vm in &untouched {
                    let v = c.show(vm);
                    assert_eq!(field(&v, "ft"), "protected", "{vm} {when} on {host}: {v}");
                }
            };
            c.ok(&["host", "maintenance", "enter", &host]);
            still_protected("after maintenance enter");
            // The upgrade: the agent stops (its host holds nothing) and the second build
            // starts in its place.
            c.lab.signal_agent(k, libc::SIGTERM);
            c.wait("the old agent gone", 30, || {
                // A host whose agent left stays listed while it is in maintenance, as
                // not responding.
                let r = c.verb(&["host", "list", "--json"]);
                serde_json::from_str::<Value>(&r.stdout).is_ok_and(|a| {
                    a.as_array().is_some_and(|a| {
                        a.iter()
                            .any(|h| h["name"] == host.as_str() && h["state"] == "not responding")
                    })
                })
            });
            still_protected("with the agent stopped");
            c.lab.start_agent_exe(k, &v2, &[]);
            c.wait("the upgraded agent registered", 30, || {
                let r = c.verb(&["host", "list", "--json"]);
                serde_json::from_str::<Value>(&r.stdout).is_ok_and(|a| {
                    a.as_array().is_some_and(|a| {
                        a.iter()
                            .any(|h| h["name"] == host.as_str() && h["version"] == V2)
                    })
                })
            });
            c.ok(&["host", "maintenance", "exit", &host]);
            for vm in ["a", "b"] {
                c.wait("protected after the host's upgrade", 60, || {
                    field(&c.show(vm), "ft") == "protected"
                });
            }
            checker.incr_for("upgrade:counter", Duration::from_millis(200));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    assert!(mixed.is_empty(), "pairs across two versions: {mixed:?}");
    let sent = checker.sent;
    assert_eq!(
        checker.finish(),
        sent,
        "every INCR answered in order, no reset"
    );
    let r = c
        .lab
        .client("redis-cli", &["-h", "10.77.0.10", "GET", "upgrade:counter"]);
    assert_eq!(r.stdout.trim(), sent.to_string());
    let hosts = c.json(&["host", "list"]);
    assert!(
        hosts
            .as_array()
            .is_some_and(|a| a.len() == 4 && a.iter().all(|h| h["version"] == V2)),
        "{hosts}"
    );
    for vm in ["a", "b"] {
        assert_eq!(field(&c.show(vm), "ft"), "protected");
    }
}
