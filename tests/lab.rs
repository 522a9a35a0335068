//! `tandem lab`: the management network, the lab's etcd and agents, the lab file, and
//! the host failures the cluster tests inject (kill, isolate, revive). Real namespaces,
//! real etcd, real curl and ping.

mod common;

use common::{Lab, Run, netns_pids as pids, tandem};
use std::path::Path;
use std::process::Command;

/// `CMD ARGS` in namespace `ns` (bounded in time).
fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> Run {
    let out = Command::new("timeout")
        .args(["20", "ip", "netns", "exec", ns, cmd])
        .args(args)
        .output()
        .expect("running a command in a namespace");
    Run::from(out)
}

fn pings(from_ns: &str, ip: &str) -> bool {
    in_ns(from_ns, "ping", &["-c", "1", "-W", "1", ip]).code == 0
}

/// A healed link answers again within a few seconds (the switch port relearns): a ping
/// that gets through within 5 s.
fn pings_again(from_ns: &str, ip: &str) -> bool {
    (0..5).any(|_| pings(from_ns, ip))
}

/// etcd's JSON gateway at the lab's store, asked from `ns`.
fn etcd(ns: &str, path: &str, body: &str) -> String {
    let r = in_ns(
        ns,
        "curl",
        &[
            "-s",
            "-m",
            "3",
            "-d",
            body,
            &format!("http://10.79.0.1:2379{path}"),
        ],
    );
    r.stdout
}

#[test]
fn a_cluster_lab_runs_etcd_and_agents_on_the_management_network() {
    let lab = Lab::cluster("lc", 2);
    let name = lab.name().to_string();

    // The lab file says where everything is; the dashboard from this machine is the
    // lab's relay, on a free port of 127.0.0.1, and it answers from here.
    let mut file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.lab_file()).expect("the lab file"))
            .expect("the lab file is JSON");
    let dashboard = file
        .as_object_mut()
        .and_then(|o| o.remove("dashboard"))
        .and_then(|d| d.as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no dashboard in the lab file: {file}"));
    assert!(dashboard.starts_with("http://127.0.0.1:"), "{dashboard}");
    let health = Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("{dashboard}/healthz"))
        .output()
        .unwrap();
    assert!(
        health.status.success() && !health.stdout.is_empty(),
        "{dashboard}/healthz: {}",
        String::from_utf8_lossy(&health.stderr)
    );
    let relay_pid = std::fs::read_to_string(format!("/tmp/{name}-run/dashboard.pid"))
        .expect("the relay's pid file")
        .trim()
        .to_string();
    assert!(
        std::path::Path::new(&format!("/proc/{relay_pid}")).exists(),
        "the relay runs"
    );
    assert_eq!(
        file,
        serde_json::json!({
            "name": name,
            "netns": lab.ns("client"),
            "store": "http://10.79.0.1:2379",
            "apis": ["http://10.79.0.11:7070", "http://10.79.0.12:7070"],
            "hosts": 2,
            "token_file": format!("/tmp/{name}-shared/.token"),
        })
    );
    // The API token: random, readable by its owner only.
    {
        use std::os::unix::fs::PermissionsExt;
        let token = format!("/tmp/{name}-shared/.token");
        let meta = std::fs::metadata(&token).expect("the token file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let t = std::fs::read_to_string(&token).unwrap();
        assert!(
            t.trim().len() == 64 && t.trim().bytes().all(|b| b.is_ascii_hexdigit()),
            "{t:?}"
        );
    }

    // One etcd, reachable from every host and the client: a key written from host1 is
    // read from host2 and from the client.
    let put = etcd(
        &lab.ns("host1"),
        "/v3/kv/put",
        r#"{"key":"a2V5","value":"dmFsdWU="}"#,
    );
    assert!(put.contains("revision"), "put from host1: {put}");
    for ns in [lab.ns("host2"), lab.ns("client")] {
        let got = etcd(&ns, "/v3/kv/range", r#"{"key":"a2V5"}"#);
        assert!(
            got.contains(r#""value":"dmFsdWU=""#),
            "range from {ns}: {got}"
        );
    }
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
    assert!(pings(&lab.ns("host1"), "10.79.0.12"));
    // The agents were started (each says so in its log, or at least made it).
    for k in 1..=2 {
        assert!(lab.agent_log(k).is_file(), "host{k}'s agent log");
    }

    // Isolated: no link works, its processes live on.
    let sleeper = Command::new("ip")
        .args(["netns", "exec", &lab.ns("host1"), "sleep", "60"])
        .spawn()
        .expect("a process on host1");
    lab.host_op("isolate", 1);
    assert!(!pings(&lab.ns("client"), "10.79.0.11"), "management cut");
    assert!(!pings(&lab.ns("host2"), "10.78.0.11"), "logging cut");
    let cut = etcd(&lab.ns("host1"), "/v3/kv/range", r#"{"key":"a2V5"}"#);
    assert!(!cut.contains("value"), "etcd unreachable from host1: {cut}");
    assert!(
        pids(&lab.ns("host1")).contains(&sleeper.id().to_string()),
        "an isolated host's processes stay alive"
    );
    lab.host_op("revive", 1);
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
    assert!(pings(&lab.ns("host2"), "10.78.0.11"));

    // Killed: every process gone, links cut (the management link too); revived: links
    // up and an agent started again.
    lab.host_op("kill", 1);
    let mut sleeper = sleeper;
    let _ = sleeper.wait();
    assert!(
        pids(&lab.ns("host1")).is_empty(),
        "a killed host runs nothing"
    );
    assert!(!pings(&lab.ns("client"), "10.79.0.11"));
    let revived = tandem(&["lab", "revive", "--name", &name, "host1"]);
    assert_eq!(revived.code, 0, "{}{}", revived.stdout, revived.stderr);
    assert!(
        revived.stdout.contains("agent started"),
        "{}",
        revived.stdout
    );
    assert!(pings(&lab.ns("client"), "10.79.0.11"));

    // Unknown hosts are refused with the reason.
    let bad = tandem(&["lab", "isolate", "--name", &name, "host9"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("no host"), "{}", bad.stderr);

    // Down removes the namespaces, etcd, its data, the logs and the lab file; again is
    // fine.
    for _ in 0..2 {
        let down = tandem(&["lab", "down", "--name", &name]);
        assert_eq!(down.code, 0, "{}", down.stderr);
    }
    for f in [
        lab.lab_file(),
        format!("/tmp/{name}-etcd").into(),
        format!("/tmp/{name}-etcd.log").into(),
        lab.agent_log(1),
        lab.agent_log(2),
        format!("/tmp/{name}-shared").into(),
    ] {
        assert!(!f.exists(), "{} survived lab down", f.display());
    }
    assert!(
        !common::netns_list()
            .iter()
            .any(|n| n.contains(&format!("{name}-"))),
        "namespaces survived lab down"
    );
    // The relay is stopped (a zombie until its parent, long gone, is reaped: not running).
    let state = std::fs::read_to_string(format!("/proc/{relay_pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z "),
        "the dashboard relay survived lab down: {state}"
    );
}

#[test]
fn a_bare_lab_has_the_management_network_and_no_cluster() {
    let lab = Lab::up("lb", 1);
    assert!(!lab.lab_file().exists(), "a bare lab has no lab file");
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
    assert!(pings(&lab.ns("host1"), "10.79.0.1"));
    let got = etcd(&lab.ns("client"), "/v3/kv/range", r#"{"key":"a2V5"}"#);
    assert!(got.is_empty(), "no etcd in a bare lab: {got}");
    assert!(pids(&lab.ns("net")).is_empty(), "nothing runs in NAME-net");
    // The lab's switches forward frames without the bridge netfilter hooks (where the
    // kernel has them: `br_netfilter`, which starts every namespace with them on).
    let hook = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if Path::new(hook).exists() {
        for ns in ["net", "host1"] {
            let r = in_ns(&lab.ns(ns), "cat", &[hook]);
            assert_eq!(r.stdout.trim(), "0", "{ns}: {}", r.stderr);
        }
    }
    // Reviving a host of a bare lab starts no agent.
    lab.host_op("isolate", 1);
    let r = tandem(&["lab", "revive", "--name", lab.name(), "host1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("agent"), "{}", r.stdout);
    assert!(pings(&lab.ns("client"), "10.79.0.11"));
}

/// `tandem lab exec --name NAME hostK -- CMD ARGS` (bounded in time).
fn on_host(lab: &Lab, k: u32, cmd: &str, args: &[&str]) -> Run {
    let host = format!("host{k}");
    let out = Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_tandem"), "lab", "exec", "--name"])
        .args([lab.name(), &host, "--", cmd])
        .args(args)
        .output()
        .expect("running a command on a host");
    Run::from(out)
}

fn sh(lab: &Lab, k: u32, script: &str) -> Run {
    on_host(lab, k, "bash", &["-c", script])
}

/// A process on a host that holds a file open and answers one request per line:
/// `pread` (of the descriptor opened at start), `open` (a new open and read) and `write`;
/// newlines in what it read are shown as `|`.
const HOLDER: &str = r#"
import os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDWR)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "pread":
            out = os.pread(fd, 100, 0).decode()
        elif cmd[0] == "open":
            g = os.open(path, os.O_RDONLY)
            out = os.read(g, 100).decode()
            os.close(g)
        elif cmd[0] == "write":
            os.pwrite(fd, cmd[1].encode(), 0)
            os.fsync(fd)
            out = "done"
        print("ok " + out.replace("\n", "|"), flush=True)
    except OSError as e:
        print("err " + str(e.errno), flush=True)
"#;

struct Holder {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
}

impl Holder {
    fn start(lab: &Lab, k: u32, path: &str) -> Holder {
        use std::process::Stdio;
        let host = format!("host{k}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["lab", "exec", "--name", lab.name(), &host, "--"])
            .args(["python3", "-u", "-c", HOLDER, path])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting a holder");
        let to = child.stdin.take().unwrap();
        let from = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut h = Holder { child, to, from };
        assert_eq!(h.line(), "ready");
        h
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut l = String::new();
        self.from
            .read_line(&mut l)
            .expect("a reply from the holder");
        l.trim_end().to_string()
    }

    fn ask(&mut self, req: &str) -> String {
        use std::io::Write;
        writeln!(self.to, "{req}").expect("writing to the holder");
        self.line()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS from a directory descriptor
/// on the folder given; prints `NAME: ok` or `NAME: ERRNO` for each try.
const OPENAT2: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
d = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for label, name, flags in [("x", b"x", os.O_RDONLY), ("x nofollow", b"x", os.O_WRONLY | os.O_NOFOLLOW),
                           ("../escape", b"../" + os.path.basename(sys.argv[1]).encode() + b"/x", os.O_RDONLY)]:
    how = ctypes.create_string_buffer(struct.pack("QQQ", flags | os.O_CLOEXEC, 0, 0x08 | 0x02))
    r = libc.syscall(437, d, name, how, 24)
    print("%s: %s" % (label, "ok" if r >= 0 else ctypes.get_errno()))
"#;

/// Every thread of every host races to create `race-I` with O_EXCL, for I in 0..ROUNDS,
/// once `go` exists; prints the rounds this host won.
const RACER: &str = r#"
import os, sys, threading, time
d, rounds = sys.argv[1], int(sys.argv[2])
won, lock = [], threading.Lock()
while not os.path.exists(d + "/go"):
    time.sleep(0.01)
def race():
    for i in range(rounds):
        try:
            os.close(os.open(d + "/race-%d" % i, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            with lock:
                won.append(i)
        except FileExistsError:
            pass
ts = [threading.Thread(target=race) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
print(" ".join(map(str, won)))
"#;

#[test]
fn every_host_sees_the_shared_storage_through_its_own_view_which_the_lab_can_cut() {
    let lab = Lab::up("sv", 2);
    let shared = format!("/tmp/{}-shared", lab.name());

    // Each host has its own view mounted at the shared folder's path; the machine has none.
    for k in 1..=2 {
        let mounts = on_host(&lab, k, "cat", &["/proc/mounts"]);
        assert!(
            mounts.stdout.contains(&format!("{shared} fuse")),
            "host{k}: {}",
            mounts.stdout
        );
    }
    let ours = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!ours.contains(&shared), "the view leaked out: {ours}");

    // Coherence: what one host writes the other reads at once, both ways, also through a
    // descriptor opened before the write.
    assert_eq!(sh(&lab, 1, &format!("echo one > {shared}/x")).code, 0);
    assert_eq!(
        on_host(&lab, 2, "cat", &[&format!("{shared}/x")]).stdout,
        "one\n"
    );
    let mut held = Holder::start(&lab, 1, &format!("{shared}/x"));
    assert_eq!(held.ask("pread"), "ok one|");
    assert_eq!(sh(&lab, 2, &format!("printf two > {shared}/x")).code, 0);
    assert_eq!(held.ask("pread"), "ok two");
    assert_eq!(held.ask("write three"), "ok done");
    assert_eq!(
        on_host(&lab, 2, "cat", &[&format!("{shared}/x")]).stdout,
        "three"
    );
    // A file has the same inode number in every view (the datastore finds files by it).
    let ino = |k| on_host(&lab, k, "stat", &["-c", "%i", &format!("{shared}/x")]).stdout;
    assert_eq!(ino(1), ino(2));
    let real = std::fs::metadata(format!("{shared}/x")).unwrap();
    assert_eq!(
        ino(1).trim(),
        std::os::unix::fs::MetadataExt::ino(&real).to_string()
    );
    // Rename over an existing file, seen by the other host at once.
    let r = sh(
        &lab,
        2,
        &format!(
            "echo new > {shared}/t && mv -f {shared}/t {shared}/y && echo old > {shared}/z && mv -f {shared}/y {shared}/z"
        ),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        on_host(&lab, 1, "cat", &[&format!("{shared}/z")]).stdout,
        "new\n"
    );
    // Links, directories, truncation, modes and times pass through.
    let r = sh(
        &lab,
        1,
        &format!(
            "cd {shared} && ln -s z sym && ln z hard && mkdir -p d/e && rmdir d/e && \
             truncate -s 2 z && chmod 640 z && touch -d @1000000000 z"
        ),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sh(
        &lab,
        2,
        &format!(
            "cd {shared} && readlink sym && stat -c '%s %a %h %Y' z && ls d | wc -l && cat sym"
        ),
    );
    assert_eq!(r.stdout, "z\n2 640 2 1000000000\n0\nne", "{}", r.stderr);
    let r = sh(
        &lab,
        2,
        &format!("cd {shared} && rm hard sym && rmdir d && ls"),
    );
    assert_eq!(r.stdout, "x\nz\n", "{}", r.stderr);
    let df = on_host(&lab, 1, "stat", &["-f", "-c", "%b", &shared]);
    assert!(
        df.stdout.trim().parse::<u64>().is_ok_and(|b| b > 0),
        "statfs: {}",
        df.stdout
    );

    // openat2 beneath a directory descriptor held on the view (how a VM reaches its
    // datastore): a name below opens, with O_NOFOLLOW too; `..` out of it is refused.
    let r = on_host(&lab, 1, "python3", &["-c", OPENAT2, &shared]);
    assert_eq!(
        r.stdout, "x: ok\nx nofollow: ok\n../escape: 18\n",
        "{}",
        r.stderr
    );

    // O_EXCL stays atomic across hosts: 2 hosts x 8 threads race for each of 30 names,
    // exactly one creator wins each.
    let rounds = 30;
    let racers: Vec<_> = (1..=2)
        .map(|k| {
            Command::new(env!("CARGO_BIN_EXE_tandem"))
                .args([
                    "lab",
                    "exec",
                    "--name",
                    lab.name(),
                    &format!("host{k}"),
                    "--",
                ])
                .args(["python3", "-c", RACER, &shared, &rounds.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("a racer")
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::write(format!("{shared}/go"), b"").unwrap();
    let mut won: Vec<u32> = racers
        .into_iter()
        .flat_map(|c| {
            let out = c.wait_with_output().expect("a racer's result");
            assert!(out.status.success());
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(|w| w.parse::<u32>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    won.sort();
    assert_eq!(won, (0..rounds).collect::<Vec<_>>(), "one winner per name");

    // A storage cut: host1's processes get EIO, on the descriptor they hold and on new
    // opens; host2 is unaffected.
    lab.host_op_on("cut", 1, "storage");
    assert_eq!(held.ask("pread"), format!("err {}", libc::EIO));
    assert_eq!(held.ask("open"), format!("err {}", libc::EIO));
    assert_eq!(held.ask("write four"), format!("err {}", libc::EIO));
    let r = on_host(&lab, 1, "cat", &[&format!("{shared}/z")]);
    assert!(
        r.code != 0 && r.stderr.contains("Input/output error"),
        "{}",
        r.stderr
    );
    assert_eq!(
        on_host(&lab, 2, "cat", &[&format!("{shared}/x")]).stdout,
        "three"
    );
    assert_eq!(sh(&lab, 2, &format!("echo five > {shared}/x")).code, 0);
    // Healed: everything works again, the descriptor held through the cut too.
    lab.host_op_on("heal", 1, "storage");
    assert_eq!(held.ask("pread"), "ok five|");
    assert_eq!(held.ask("open"), "ok five|");
    assert_eq!(
        on_host(&lab, 1, "cat", &[&format!("{shared}/z")]).stdout,
        "ne"
    );
    drop(held);

    // An uplink cut: carrier gone in host1, a VM-network address on host1 unreachable
    // from the client; healed, it answers again.
    let r = on_host(
        &lab,
        1,
        "ip",
        &["addr", "add", "10.77.0.50/24", "dev", "br-vm"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(pings(&lab.ns("client"), "10.77.0.50"));
    lab.host_op_on("cut", 1, "uplink");
    let carrier = on_host(&lab, 1, "cat", &["/sys/class/net/uplink/carrier"]);
    assert_eq!(carrier.stdout.trim(), "0", "{}", carrier.stderr);
    assert!(!pings(&lab.ns("client"), "10.77.0.50"));
    assert!(
        pings(&lab.ns("host2"), "10.78.0.11"),
        "only the uplink is cut"
    );
    lab.host_op_on("heal", 1, "uplink");
    assert_eq!(
        on_host(&lab, 1, "cat", &["/sys/class/net/uplink/carrier"])
            .stdout
            .trim(),
        "1"
    );
    assert!(pings_again(&lab.ns("client"), "10.77.0.50"));
    // A logging cut: host1 cannot reach host2's logging address; healed, it can.
    lab.host_op_on("cut", 1, "logging");
    assert!(!pings(&lab.ns("host1"), "10.78.0.12"));
    assert!(
        pings(&lab.ns("client"), "10.77.0.50"),
        "only logging is cut"
    );
    lab.host_op_on("heal", 1, "logging");
    assert!(pings_again(&lab.ns("host1"), "10.78.0.12"));

    // Clear refusals.
    for (args, want) in [
        (
            vec!["cut", "--name", lab.name(), "host9", "storage"],
            "no host",
        ),
        (
            vec!["cut", "--name", lab.name(), "host1", "disk"],
            "storage, uplink or logging",
        ),
        (
            vec!["heal", "--name", lab.name(), "hostx", "uplink"],
            "no host",
        ),
    ] {
        let mut a = vec!["lab"];
        a.extend(args);
        let r = tandem(&a);
        assert_eq!(r.code, 2, "{}", r.stdout);
        assert!(r.stderr.contains(want), "{}", r.stderr);
    }

    // Killed: the storage server goes too; revived: the view is back.
    lab.host_op("kill", 1);
    assert!(
        pids(&lab.ns("host1")).is_empty(),
        "a killed host runs nothing"
    );
    lab.host_op("revive", 1);
    assert_eq!(
        on_host(&lab, 1, "cat", &[&format!("{shared}/x")]).stdout,
        "five\n"
    );

    // Down leaves no process, no mount, no namespace, no file; again is fine.
    let name = lab.name().to_string();
    for _ in 0..2 {
        let down = tandem(&["lab", "down", "--name", &name]);
        assert_eq!(down.code, 0, "{}", down.stderr);
    }
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains("storage-serve") && l.contains(&name)),
        "a storage server survived lab down: {ps}"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(&name), "{mounts}");
    assert!(
        !common::netns_list()
            .iter()
            .any(|n| n.contains(&format!("{name}-")))
    );
    for f in [
        shared.clone(),
        format!("/tmp/{name}-storage-paths"),
        format!("/tmp/{name}-host1-storage"),
        format!("/tmp/{name}-host1-storage.log"),
    ] {
        assert!(!std::path::Path::new(&f).exists(), "{f} survived lab down");
    }
}

#[test]
fn a_lab_with_plain_storage_refuses_a_storage_cut() {
    let name = format!("t{}pl", std::process::id() % 100_000);
    let up = tandem(&[
        "lab",
        "up",
        "--name",
        &name,
        "--hosts",
        "1",
        "--bare",
        "--plain-storage",
    ]);
    let _guard = Downer(name.clone());
    assert_eq!(up.code, 0, "{}{}", up.stdout, up.stderr);
    let r = tandem(&["lab", "cut", "--name", &name, "host1", "storage"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no per-host storage views"),
        "{}",
        r.stderr
    );
    // An unknown path is named with the verb asked.
    for verb in ["cut", "heal"] {
        let r = tandem(&["lab", verb, "--name", &name, "host1", "foo"]);
        assert_eq!(r.code, 2);
        assert!(
            r.stderr.contains(&format!("cannot {verb} \"foo\"")),
            "{}",
            r.stderr
        );
    }
    // `lab exec` still runs a command on the host (its network namespace).
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "lab",
            "exec",
            "--name",
            &name,
            "host1",
            "--",
            "cat",
            "/sys/class/net/uplink/carrier",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // Links are cut at the switch all the same.
    let r = tandem(&["lab", "cut", "--name", &name, "host1", "uplink"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `lab down` when dropped.
struct Downer(String);

impl Drop for Downer {
    fn drop(&mut self) {
        let _ = tandem(&["lab", "down", "--name", &self.0]);
    }
}
