//! Shared helpers for the end-to-end tests: the real `tandem` binary and the real guests.

#![allow(dead_code)]

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A second build of `tandem` announcing `version` (set at build time through
/// `TANDEM_VERSION`), for rolling upgrades. It is built in `target/upgrade` from a copy of
/// this build's compiled dependencies, so only the binary's own crates compile again (a
/// later call with unchanged sources is a no-op build).
pub fn second_build(version: &str) -> PathBuf {
    let ws = workspace();
    let main = ws.join("target/release");
    let dir = ws.join("target/upgrade");
    let release = dir.join("release");
    if !release.join(".fingerprint").exists() {
        std::fs::create_dir_all(release.join("deps")).expect("creating target/upgrade");
        let copied = Command::new("cp")
            .args(["-a"])
            .arg(main.join("build"))
            .arg(main.join(".fingerprint"))
            .arg(&release)
            .status()
            .expect("cp");
        assert!(copied.success(), "copying the build's fingerprints");
        for entry in std::fs::read_dir(main.join("deps")).expect("target/release/deps") {
            let path = entry.expect("a deps entry").path();
            let keep = path
                .extension()
                .is_some_and(|e| ["rlib", "rmeta", "so", "d"].contains(&e.to_str().unwrap_or("")));
            if keep {
                std::fs::copy(&path, release.join("deps").join(path.file_name().unwrap()))
                    .expect("copying a compiled dependency");
            }
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--offline",
            "--bin",
            "tandem",
            "--target-dir",
        ])
        .arg(&dir)
        .env("TANDEM_VERSION", version)
        .current_dir(&ws)
        .status()
        .expect("cargo build");
    assert!(built.success(), "building tandem {version}");
    release.join("tandem")
}

/// Build the example guests once per test binary (make is idempotent).
pub fn guest(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let out = Command::new("make")
            .arg("-C")
            .arg(workspace().join("guests"))
            .output()
            .expect("running make -C guests");
        assert!(
            out.status.success(),
            "building the guests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let p = workspace().join("guests/build").join(name);
    assert!(p.is_file(), "{} was not built", p.display());
    p
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The last line of stdout.
    pub fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub fn tandem(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_GUESTS", workspace().join("guests/build"))
        .output()
        .expect("running tandem");
    let run = Run::from(out);
    assert!(
        !run.stderr.contains("panicked"),
        "tandem panicked: {}",
        run.stderr
    );
    run
}

/// The processes in network namespace `ns` (`ip netns pids`), as their pids' text.
pub fn netns_pids(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The names of the network namespaces that exist now (`ip netns list`).
pub fn netns_list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `recorded: events=N digest=HEX` or `replay ok: events=N digest=HEX` → (N, HEX).
pub fn events_and_digest(line: &str, prefix: &str) -> (u64, String) {
    let rest = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected a line starting {prefix:?}, got {line:?}"));
    let mut events = None;
    let mut digest = None;
    for part in rest.split_whitespace() {
        if let Some(v) = part.strip_prefix("events=") {
            events = v.parse().ok();
        }
        if let Some(v) = part.strip_prefix("digest=") {
            digest = Some(v.to_string());
        }
    }
    let digest = digest.expect("a digest");
    assert_eq!(digest.len(), 64, "digest is 32 bytes of hex");
    (events.expect("an event count"), digest)
}

/// `tandem vm replay LOG --wasm WASM --from SNAP`: it must succeed; its (events, digest).
pub fn replay_from(log: &Path, wasm: &Path, snap: &Path) -> (u64, String) {
    let run = tandem(&["vm", "replay", s(log), "--wasm", s(wasm), "--from", s(snap)]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    events_and_digest(run.last_line(), "replay ok: ")
}

/// Every file and folder below `dir` with its content and modification time, to prove a
/// folder untouched.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let meta = e.metadata().expect("metadata");
            let p = e.path();
            let content = if meta.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else {
                std::fs::read(&p).expect("read")
            };
            out.push((p, content, meta.modified().expect("mtime")));
        }
    }
    out.sort();
    out
}

/// A lab (namespaces: switch, client, hosts) that is removed when dropped, also when the
/// test fails; every VM process started through it is stopped first.
pub struct Lab {
    pub name: String,
    vms: Vec<std::process::Child>,
    /// Made with etcd and agents ([`Lab::cluster`]).
    cluster: bool,
}

/// The issues' standard load at kvd: `redis-benchmark -t set,get,incr -n 20000 -c 20 -P 8`.
pub const KVD_LOAD: &[&str] = &["-t", "set,get,incr", "-n", "20000", "-c", "20", "-P", "8"];

/// A bare lab's VM NIC for kvd: 10.77.0.10 on the VM network's bridge.
pub const KVD_NIC: &str = "bridge=br-vm,mac=02:00:00:00:00:10,ip=10.77.0.10/24";

/// `vm run` of kvd with its datastore at `ds`, its NIC at 10.77.0.10 and port 6379, plus
/// `extra` flags.
pub fn kvd_args<'a>(kvd: &'a Path, ds: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "vm",
        "run",
        "--wasm",
        s(kvd),
        "--datastore",
        s(ds),
        "--nic",
        KVD_NIC,
        "--listen",
        "tcp:6379",
    ];
    a.extend_from_slice(extra);
    a
}

/// kvd as a VM at 10.77.0.10:6379 on host1 of a one-host bare lab, its datastore a fresh
/// folder, recording its event log: answering the client once started.
pub struct RecordedKvd {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub ds: PathBuf,
    pub log: PathBuf,
    pub kvd: PathBuf,
    out: PathBuf,
    vm: usize,
}

impl RecordedKvd {
    pub fn start(tag: &str) -> RecordedKvd {
        let mut lab = Lab::up(tag, 1);
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("ds");
        std::fs::create_dir(&ds).unwrap();
        let log = dir.path().join("kvd.tlog");
        let kvd = guest("kvd.wasm");
        let out = dir.path().join("vm.out");
        let vm = lab.start_vm(1, &kvd_args(&kvd, &ds, &["--record", s(&log)]), &out);
        lab.wait_for("redis-cli", &["-h", "10.77.0.10", "PING"], "PONG");
        RecordedKvd {
            lab,
            dir,
            ds,
            log,
            kvd,
            out,
            vm,
        }
    }

    /// Stop the VM (exit 0): what it printed, and the events and digest of its recording.
    pub fn stop(&mut self) -> (String, (u64, String)) {
        assert_eq!(self.lab.stop_vm(self.vm), 0);
        let text = std::fs::read_to_string(&self.out).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("recorded: "))
            .unwrap_or_else(|| panic!("no recorded line: {text}"));
        let recorded = events_and_digest(line, "recorded: ");
        (text, recorded)
    }
}

impl Lab {
    /// A bare lab (`lab up --bare`: namespaces and networks, no etcd, no agents) named
    /// after this test process and `tag`.
    pub fn up(tag: &str, hosts: u32) -> Lab {
        Self::make(tag, hosts, false)
    }

    /// A lab running a cluster: etcd on the management network and a host agent on every
    /// host (started, not waited for), described by [`Lab::lab_file`].
    pub fn cluster(tag: &str, hosts: u32) -> Lab {
        Self::make(tag, hosts, true)
    }

    fn make(tag: &str, hosts: u32, cluster: bool) -> Lab {
        let name = format!("t{}{tag}", std::process::id() % 100_000);
        let h = hosts.to_string();
        let mut args = vec!["lab", "up", "--name", &name, "--hosts", &h];
        if !cluster {
            args.push("--bare");
        }
        let run = tandem(&args);
        // Construct first so that a half-built lab is removed too.
        let lab = Lab {
            name,
            vms: vec![],
            cluster,
        };
        assert_eq!(
            run.code, 0,
            "lab up failed (tests need root): {}{}",
            run.stdout, run.stderr
        );
        lab
    }

    /// The lab's name (`--name` of every `tandem lab` command).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/tmp/NAME-lab.json`: where the lab's cluster is (only for [`Lab::cluster`] labs).
    pub fn lab_file(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/{}-lab.json", self.name))
    }

    /// Host K's agent log (`/tmp/NAME-hostK-agent.log`).
    pub fn agent_log(&self, k: u32) -> PathBuf {
        PathBuf::from(format!("/tmp/{}-host{k}-agent.log", self.name))
    }

    /// Where an agent this test restarted (`start_agent_exe`) writes its log.
    pub fn restarted_log(&self, k: u32) -> PathBuf {
        self.agent_log(k).with_extension("restarted.log")
    }

    /// `tandem lab VERB --name NAME hostK` (kill, isolate, revive); panics unless it worked.
    pub fn host_op(&self, verb: &str, k: u32) {
        let host = format!("host{k}");
        let run = tandem(&["lab", verb, "--name", &self.name, &host]);
        assert_eq!(
            run.code, 0,
            "lab {verb} {host}: {}{}",
            run.stdout, run.stderr
        );
    }

    /// `tandem lab VERB --name NAME hostK WHAT` (cut, heal); panics unless it worked.
    pub fn host_op_on(&self, verb: &str, k: u32, what: &str) {
        let host = format!("host{k}");
        let run = tandem(&["lab", verb, "--name", &self.name, &host, what]);
        assert_eq!(
            run.code, 0,
            "lab {verb} {host} {what}: {}{}",
            run.stdout, run.stderr
        );
    }

    pub fn ns(&self, what: &str) -> String {
        format!("{}-{what}", self.name)
    }

    /// Replace host K's agent (SIGKILL, which takes its copies with it) by one started with
    /// the lab's flags and `extra`; it registers once the old one's lease expired.
    pub fn restart_agent(&mut self, k: u32, extra: &[&str]) {
        self.kill_agent(k);
        self.start_agent(k, extra);
    }

    /// SIGKILL host K's agent (its copies die with it), leaving the host up.
    pub fn kill_agent(&self, k: u32) {
        self.signal_agent(k, libc::SIGKILL);
    }

    /// Send `sig` to host K's agent.
    pub fn signal_agent(&self, k: u32, sig: i32) {
        for pid in netns_pids(&self.ns(&format!("host{k}"))) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmd.windows(11).any(|w| w == b"host\0agent\0")
                && let Ok(pid) = pid.parse::<i32>()
            {
                // SAFETY: kill(2) with a pid read from the kernel; no memory is involved.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }

    /// Start an agent on host K with the lab's flags and `extra`.
    pub fn start_agent(&mut self, k: u32, extra: &[&str]) {
        self.start_agent_exe(k, Path::new(env!("CARGO_BIN_EXE_tandem")), extra);
    }

    /// [`Lab::start_agent`] with another build of `tandem` (it runs its copies too).
    pub fn start_agent_exe(&mut self, k: u32, exe: &Path, extra: &[&str]) {
        let (log_ip, api) = (
            format!("10.78.0.{}", 10 + k),
            format!("10.79.0.{}:7070", 10 + k),
        );
        let (host, shared) = (format!("host{k}"), format!("/tmp/{}-shared", self.name));
        let state = format!("{shared}/.agents/host{k}");
        let mut args = vec![
            "host",
            "agent",
            "--name",
            &host,
            "--store",
            "http://10.79.0.1:2379",
            "--shared",
            &shared,
            "--vm-bridge",
            "br-vm",
            "--vm-uplink",
            "uplink",
            "--log-ip",
            &log_ip,
            "--api",
            &api,
            "--state-dir",
            &state,
        ];
        args.extend_from_slice(extra);
        let log = self.restarted_log(k);
        self.start_exe(k, exe, &[], &args, &log);
    }

    /// Start `tandem ARGS` on host `k` in the background; stdout and stderr to `out`.
    pub fn start_vm(&mut self, k: u32, args: &[&str], out: &Path) -> usize {
        self.start_vm_env(k, &[], args, out)
    }

    /// [`Lab::start_vm`] with environment variables `env` (K, V) set for it.
    pub fn start_vm_env(
        &mut self,
        k: u32,
        env: &[(&str, &str)],
        args: &[&str],
        out: &Path,
    ) -> usize {
        self.start_exe(k, Path::new(env!("CARGO_BIN_EXE_tandem")), env, args, out)
    }

    /// Start `EXE ARGS` on host `k` in the background; stdout and stderr to `out`.
    pub fn start_exe(
        &mut self,
        k: u32,
        exe: &Path,
        env: &[(&str, &str)],
        args: &[&str],
        out: &Path,
    ) -> usize {
        let file = std::fs::File::create(out).expect("creating the VM's output file");
        // `lab exec` joins the host's network namespace and its view of the shared storage,
        // then execs: the child is the VM itself.
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args([
                "lab",
                "exec",
                "--name",
                &self.name,
                &format!("host{k}"),
                "--",
            ])
            .arg(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("starting a VM");
        self.vms.push(child);
        self.vms.len() - 1
    }

    /// The process id of VM `i` (`lab exec` execs it: the same process).
    pub fn pid(&self, i: usize) -> u32 {
        self.vms[i].id()
    }

    /// Stop VM `i` as an operator would (SIGTERM) and wait for it; its exit code.
    pub fn stop_vm(&mut self, i: usize) -> i32 {
        let child = &mut self.vms[i];
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("waiting for a VM") {
                return status.code().unwrap_or(-1);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("VM {i} did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Run a client tool in the client namespace.
    pub fn client(&self, cmd: &str, args: &[&str]) -> Run {
        let out = Command::new("timeout")
            .args(["120", "ip", "netns", "exec", &self.ns("client"), cmd])
            .args(args)
            .output()
            .expect("running a client");
        Run::from(out)
    }

    /// `redis-benchmark -h KVD ARGS -q` from the client against the lab's kvd.
    pub fn redis_benchmark(&self, args: &[&str]) -> Run {
        let mut a = vec!["-h", "10.77.0.10"];
        a.extend_from_slice(args);
        a.push("-q");
        self.client("redis-benchmark", &a)
    }

    /// Wait until `redis-cli PING` (or any probe) succeeds from the client, up to 10 s.
    pub fn wait_for(&self, cmd: &str, args: &[&str], want: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = self.client(cmd, args);
            if r.stdout.contains(want) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{cmd} never answered {want:?}: {}{}",
                r.stdout,
                r.stderr
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failing cluster test says what etcd and the agents said, before `down`
        // removes their logs.
        if self.cluster && std::thread::panicking() {
            let mut logs = vec![PathBuf::from(format!("/tmp/{}-etcd.log", self.name))];
            logs.extend((1..=16).map(|k| self.agent_log(k)));
            logs.extend((1..=16).map(|k| self.restarted_log(k)));
            for log in logs {
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!(
                        "--- {} (last 30 lines)\n{}",
                        log.display(),
                        lines[lines.len().saturating_sub(30)..].join("\n")
                    );
                }
            }
        }
        for child in &mut self.vms {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["lab", "down", "--name", &self.name])
            .output();
        // The logs of agents this test restarted are its own, not the lab's.
        for k in 1..=16 {
            let _ = std::fs::remove_file(self.restarted_log(k));
        }
    }
}

impl Lab {
    /// Wait (bounded) for VM process `i` to exit; its exit code.
    pub fn wait_exit(&mut self, i: usize, limit: std::time::Duration, what: &str) -> i32 {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(code) = self.exited(i) {
                return code;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} did not exit within {limit:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// How VM process `i` exited, if it has.
    pub fn exited(&mut self, i: usize) -> Option<i32> {
        self.vms[i]
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.code().unwrap_or(-1))
    }
}

/// One redis-cli holding one connection, fed INCR after INCR through its stdin.
pub struct Checker {
    child: std::process::Child,
    pub sent: u64,
}

impl Checker {
    pub fn start(lab: &Lab, key: &str) -> Checker {
        let child = std::process::Command::new("timeout")
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
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting redis-cli");
        let mut c = Checker { child, sent: 0 };
        c.incr_for(key, std::time::Duration::from_millis(300));
        c
    }

    pub fn incr_for(&mut self, key: &str, d: std::time::Duration) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        let end = std::time::Instant::now() + d;
        while std::time::Instant::now() < end {
            writeln!(stdin, "INCR {key}").expect("writing to redis-cli");
            stdin.flush().unwrap();
            self.sent += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Every reply, in order; panics unless each INCR was answered with the next value.
    pub fn finish(mut self) -> u64 {
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
