//! `tandem demo`: an FT-protected VM surviving the death of its primary's host.
//!
//! A lab with two hosts; kvd protected by FT (primary on host1, secondary on host2, the
//! datastore on shared storage); redis-benchmark and the checker drive it from the client
//! namespace; host1 is killed midway; the verdict says whether the client carried on with
//! every acknowledged write intact and no connection reset.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{CheckerReport, Resp, checker, in_netns};
use crate::guests;
use crate::lab::{self, LabGuard, VmProcess};

pub const VM_IP: &str = "10.77.0.10";
pub const LOG_ADDR: &str = "10.78.0.11:7000";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The lab's name (prefix of its namespaces).
    #[arg(long, default_value = "tandem-demo")]
    pub name: String,
    /// Leave the lab up afterwards for a look around (`tandem lab down --name NAME`).
    #[arg(long)]
    pub keep: bool,
}

fn say(msg: &str) {
    println!("demo: {msg}");
}

/// A lab running kvd under FT: primary on host1, secondary on host2 (or the primary alone,
/// FT to be enabled later with [`FtLab::start_secondary`]).
pub struct FtLab {
    pub name: String,
    pub shared: PathBuf,
    /// The copies: stopped when the lab is dropped.
    primary: VmProcess,
    secondary: Option<VmProcess>,
    timeout_ms: u64,
    _guard: Option<LabGuard>,
}

impl FtLab {
    /// `timeout_ms`: the failure timeout both copies use (the design's default is 300).
    pub fn start(name: &str, keep: bool, timeout_ms: u64) -> Result<FtLab> {
        let mut ft = FtLab::start_primary(name, keep, timeout_ms, &[])?;
        ft.start_secondary()?;
        ft.wait_protected(Duration::from_secs(15))?;
        Ok(ft)
    }

    /// kvd as an `ft primary` on host1 alone (unprotected), `extra` added to its arguments;
    /// answering PING when this returns.
    pub fn start_primary(name: &str, keep: bool, timeout_ms: u64, extra: &[&str]) -> Result<FtLab> {
        lab::down(name);
        lab::up(name, 2)?;
        let guard = (!keep).then(|| LabGuard(name.to_string()));
        let shared = lab::shared_dir(name);
        let data = shared.join("kvd/data");
        std::fs::create_dir_all(&data).context("creating the datastore on shared storage")?;
        let kvd = guests::file("kvd.wasm")?.display().to_string();
        let (shared_s, data_s) = (shared.display().to_string(), data.display().to_string());
        let timeout = timeout_ms.to_string();
        let nic = format!("bridge=br-vm,mac=02:00:00:00:00:10,ip={VM_IP}/24");
        let mut args = Self::common("primary", &shared_s, &timeout, &kvd, &data_s);
        args.extend([
            "--log-listen",
            LOG_ADDR,
            "--nic",
            &nic,
            "--listen",
            "tcp:6379",
        ]);
        args.extend_from_slice(extra);
        let primary = VmProcess::start_logged(
            &lab::host_ns(name, 1),
            &args,
            Some(&shared.join("primary.log")),
        )?;
        let ft = FtLab {
            name: name.to_string(),
            shared,
            primary,
            secondary: None,
            timeout_ms,
            _guard: guard,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ft.redis(&["PING"]).is_ok_and(|r| r == "+PONG") {
            if Instant::now() > deadline {
                bail!("kvd did not come up; primary log:\n{}", ft.log("primary"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(ft)
    }

    /// What both copies are told alike: the VM, its shared folder, its timing, its module
    /// and datastore; then what only each role needs.
    fn common<'a>(
        role: &'a str,
        shared: &'a str,
        timeout: &'a str,
        kvd: &'a str,
        data: &'a str,
    ) -> Vec<&'a str> {
        vec![
            "ft",
            role,
            "--vm",
            "kvd",
            "--shared",
            shared,
            "--timeout-ms",
            timeout,
            "--wasm",
            kvd,
            "--datastore",
            data,
        ]
    }

    /// Start the secondary on host2 (it joins the primary and catches up; see
    /// [`FtLab::wait_protected`]).
    pub fn start_secondary(&mut self) -> Result<()> {
        let kvd = guests::file("kvd.wasm")?.display().to_string();
        let data = self.shared.join("kvd/data");
        let (shared_s, data_s) = (
            self.shared.display().to_string(),
            data.display().to_string(),
        );
        let timeout = self.timeout_ms.to_string();
        let mut args = Self::common("secondary", &shared_s, &timeout, &kvd, &data_s);
        args.extend(["--primary", LOG_ADDR, "--bridge", "br-vm"]);
        self.secondary = Some(VmProcess::start_logged(
            &lab::host_ns(&self.name, 2),
            &args,
            Some(&self.shared.join("secondary.log")),
        )?);
        Ok(())
    }

    /// The primary's process id (that of `tandem` itself: `ip netns exec` execs it).
    pub fn primary_pid(&self) -> u32 {
        self.primary.0.id()
    }

    /// What copy `who` ("primary" or "secondary") printed so far.
    pub fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.shared.join(format!("{who}.log"))).unwrap_or_default()
    }

    pub fn status(&self) -> String {
        std::fs::read_to_string(self.shared.join("kvd/status")).unwrap_or_default()
    }

    /// Wait (at most `limit`) until the status says protected and kvd answers.
    pub fn wait_protected(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.status().contains("protected=true")
                && self.redis(&["PING"]).is_ok_and(|r| r == "+PONG")
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "kvd did not come up protected; primary log:\n{}\nsecondary log:\n{}",
            self.log("primary"),
            self.log("secondary")
        )
    }

    pub fn client_ns(&self) -> String {
        lab::ns(&self.name, "client")
    }

    pub fn addr() -> SocketAddr {
        SocketAddr::from(([10, 77, 0, 10], 6379))
    }

    /// One command over a fresh connection from the client namespace.
    pub fn redis(&self, args: &[&str]) -> Result<String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        in_netns(&self.client_ns(), move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            Resp::connect(Self::addr(), Duration::from_secs(5))?.call(&refs)
        })
    }

    /// Start the checker on `key` from the client namespace.
    pub fn start_checker(&self, key: &str) -> RunningChecker {
        let stop = Arc::new(AtomicBool::new(false));
        let mark = Arc::new(AtomicBool::new(false));
        let (s, m, key, ns) = (
            stop.clone(),
            mark.clone(),
            key.to_string(),
            self.client_ns(),
        );
        let handle =
            std::thread::spawn(move || in_netns(&ns, move || checker(FtLab::addr(), key, s, m)));
        RunningChecker { stop, mark, handle }
    }

    /// Kill host1 and wait (bounded) until the secondary reports it went live.
    pub fn kill_primary_host(&self) -> Result<Instant> {
        let at = Instant::now();
        lab::kill(&self.name, "host1")?;
        let deadline = at + Duration::from_secs(10);
        while !self.status().contains("role=live") {
            if Instant::now() > deadline {
                bail!(
                    "the secondary did not go live within 10 s: {}",
                    self.status()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(at)
    }
}

/// A checker running on its own thread.
pub struct RunningChecker {
    stop: Arc<AtomicBool>,
    mark: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<CheckerReport>>,
}

impl RunningChecker {
    /// From now on, replies count as "after the mark" (the kill).
    pub fn mark(&self) {
        self.mark.store(true, Ordering::SeqCst);
    }

    pub fn finish(self) -> Result<CheckerReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the checker panicked"))?
    }
}

pub struct Outcome {
    pub report: CheckerReport,
    pub final_value: i64,
    pub benchmark_ok: bool,
}

impl Outcome {
    pub fn lost(&self) -> i64 {
        (self.report.last_value - self.final_value).max(0)
    }

    pub fn pass(&self) -> bool {
        let r = &self.report;
        self.lost() == 0
            && r.resets == 0
            && r.errors.is_empty()
            && r.out_of_order == 0
            && r.after_mark > 0
            && self.benchmark_ok
    }
}

pub fn run(a: &DemoArgs) -> Result<u8> {
    say(&format!(
        "setting up lab {}: two hosts, a switch, a client, shared storage",
        a.name
    ));
    let ft = FtLab::start(&a.name, a.keep, 300)?;
    say(&format!(
        "kvd is FT-protected: primary on host1, secondary on host2, logging channel {LOG_ADDR}"
    ));

    let checker = ft.start_checker("demo:counter");
    say(
        "load: redis-benchmark (SET and INCR, 20 clients, pipeline 8) and the checker (one connection, INCR after INCR)",
    );
    let bench = Command::new("timeout")
        .args([
            "60",
            "ip",
            "netns",
            "exec",
            &ft.client_ns(),
            "redis-benchmark",
            "-h",
            VM_IP,
            "-t",
            "set,incr",
            "-n",
            "400000",
            "-c",
            "20",
            "-P",
            "8",
            "-q",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting redis-benchmark (package redis-tools)")?;

    std::thread::sleep(Duration::from_millis(1500));
    say("killing host1: its links cut, every process on it SIGKILLed");
    checker.mark();
    let killed = ft.kill_primary_host()?;
    say(&format!(
        "the secondary on host2 went live {} ms after the kill",
        killed.elapsed().as_millis()
    ));
    std::thread::sleep(Duration::from_millis(2500));
    let report = checker.finish()?;
    let out = bench
        .wait_with_output()
        .context("waiting for redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    for line in text.lines().filter(|l| l.contains("requests per second")) {
        say(&format!("redis-benchmark: {}", line.trim()));
    }
    let final_value: i64 = ft.redis(&["GET", "demo:counter"])?.parse().unwrap_or(-1);
    let outcome = Outcome {
        report,
        final_value,
        benchmark_ok: out.status.success(),
    };
    let r = &outcome.report;
    say(&format!(
        "checker: {} INCRs acknowledged ({} after the kill), longest gap between replies {} ms, {} resets, {} errors",
        r.acked,
        r.after_mark,
        r.max_gap_ms,
        r.resets,
        r.errors.len()
    ));
    say(&format!(
        "counter read back after the failover: {final_value} (last acknowledged {})",
        r.last_value
    ));
    say(&format!(
        "status: {}",
        ft.status().replace('\n', " ").trim()
    ));
    println!(
        "verdict: {} lost={} resets={} gap_ms={}",
        if outcome.pass() { "PASS" } else { "FAIL" },
        outcome.lost(),
        r.resets,
        r.max_gap_ms
    );
    if a.keep {
        say(&format!(
            "lab {} left up: `tandem lab down --name {}` removes it",
            a.name, a.name
        ));
    }
    Ok(if outcome.pass() { 0 } else { 1 })
}
