//! `tandem demo`: the cluster story, and [`FtLab`], a hand-made FT pair (no cluster) that
//! `tandem bench ft` measures.
//!
//! The story (issue 9, item 6), all through the cluster's API: a lab of 4 hosts; kvd
//! created, powered on and turned FT on; an unprotected httpd VM (`web`, restart priority
//! high) powered on on kvd's primary's host; redis-benchmark and the one-connection INCR
//! checker on kvd, HTTP probes on web, from the client namespace. The primary's host is
//! killed: kvd fails over, the cluster re-protects it on another host and HA-restarts web
//! elsewhere, without a command. Then the new primary's host is killed: failover and
//! re-protection again. The last line is the verdict:
//! `verdict: PASS|FAIL failovers=F reprotected=P lost=L resets=R gap_ms=G reprotect_s=S
//! ha_restart_s=H` (PASS: 2 failovers, 2 re-protections, nothing lost, no reset, web
//! served again after every kill of its host, the load without an error).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use cluster::model::Priority;

use crate::client::{CheckerReport, checker, in_netns, redis_in};
use crate::cluster_lab::{ClusterLab, KVD_IP, KillOutcome, Progress, WEB_IP};
use crate::guests;
use crate::lab::{self, LabGuard, VmProcess};

pub const VM_IP: &str = "10.77.0.10";
pub const LOG_ADDR: &str = "10.78.0.11:7000";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The lab's name (prefix of its namespaces). Any lab of that name is taken down
    /// first. Not `tandem-...`: `lab down` of the default lab `tandem` would take it too.
    #[arg(long, default_value = "demo")]
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

/// Whether SIGINT or SIGTERM came (`main` installs the handler): an error then. The labs'
/// waits check it, so that an interrupt ends them at once rather than at their limit; a
/// bench checks it before each phase and round, and before printing (what was measured
/// while it was being interrupted is not a figure). A terminal's Ctrl-C reaches the
/// bench's VMs and clients too (they are in its process group:
/// `client::redis_benchmark`), so a wait on them ends at once.
pub(crate) fn not_interrupted() -> Result<()> {
    if machine::stop_requested() {
        bail!("interrupted (SIGINT or SIGTERM)");
    }
    Ok(())
}

impl FtLab {
    /// `timeout_ms`: the failure timeout both copies use (the design's default is 300).
    pub fn start(name: &str, keep: bool, timeout_ms: u64) -> Result<FtLab> {
        FtLab::start_with(name, keep, timeout_ms, &[])
    }

    /// [`FtLab::start`] with `extra` arguments for both copies.
    pub fn start_with(name: &str, keep: bool, timeout_ms: u64, extra: &[&str]) -> Result<FtLab> {
        let mut ft = FtLab::start_primary(name, keep, timeout_ms, extra)?;
        ft.start_secondary_with(extra)?;
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
            not_interrupted()?;
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
        self.start_secondary_with(&[])
    }

    /// [`FtLab::start_secondary`] with `extra` arguments.
    pub fn start_secondary_with(&mut self, extra: &[&str]) -> Result<()> {
        let kvd = guests::file("kvd.wasm")?.display().to_string();
        let data = self.shared.join("kvd/data");
        let (shared_s, data_s) = (
            self.shared.display().to_string(),
            data.display().to_string(),
        );
        let timeout = self.timeout_ms.to_string();
        let mut args = Self::common("secondary", &shared_s, &timeout, &kvd, &data_s);
        args.extend(["--primary", LOG_ADDR, "--bridge", "br-vm"]);
        args.extend_from_slice(extra);
        self.secondary = Some(VmProcess::start_logged(
            &lab::host_ns(&self.name, 2),
            &args,
            Some(&self.shared.join("secondary.log")),
        )?);
        Ok(())
    }

    /// The primary's process id (that of `tandem` itself: `lab exec` execs it).
    pub fn primary_pid(&self) -> u32 {
        self.primary.0.id()
    }

    /// The secondary's process id, once started (that of `tandem` itself, as for the
    /// primary).
    pub fn secondary_pid(&self) -> Option<u32> {
        self.secondary.as_ref().map(|s| s.0.id())
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
            not_interrupted()?;
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
        redis_in(&self.client_ns(), Self::addr(), args)
    }

    /// Start the checker on `key` from the client namespace.
    pub fn start_checker(&self, key: &str) -> RunningChecker {
        RunningChecker::start(&self.client_ns(), Self::addr(), key)
    }

    /// Kill host1 and wait (bounded) until the secondary reports it went live.
    pub fn kill_primary_host(&self) -> Result<Instant> {
        let at = Instant::now();
        lab::kill(&self.name, "host1")?;
        let deadline = at + Duration::from_secs(10);
        while !self.status().contains("role=live") {
            not_interrupted()?;
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
    /// The checker on `key` of the server at `addr`, from network namespace `ns`.
    pub fn start(ns: &str, addr: SocketAddr, key: &str) -> RunningChecker {
        let stop = Arc::new(AtomicBool::new(false));
        let mark = Arc::new(AtomicBool::new(false));
        let (s, m, key, ns) = (stop.clone(), mark.clone(), key.to_string(), ns.to_string());
        let handle = std::thread::spawn(move || in_netns(&ns, move || checker(addr, key, s, m)));
        RunningChecker { stop, mark, handle }
    }

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

/// What the story measured, whatever happened (a FAIL verdict still prints every field).
#[derive(Default)]
struct Tally {
    /// Failovers and re-protections the demo saw through the API (the kill, then the
    /// VM's primary elsewhere; then Protected with a secondary elsewhere).
    failovers: u64,
    reprotected: u64,
    /// Worst kill → Protected, and kill → web serving from another host, in s.
    reprotect_s: f64,
    ha_restart_s: f64,
    /// Kills of web's host after which it served again (must equal `web_kills`).
    web_kills: u32,
    web_back: u32,
}

/// The number of kills in the story.
const KILLS: u64 = 2;

pub fn run(a: &DemoArgs) -> Result<u8> {
    say(&format!(
        "setting up lab {}: 4 hosts, etcd and a host agent on each, a client, shared storage",
        a.name
    ));
    // A failure before the kills still ends with a verdict line (the README's promise).
    let c = match ClusterLab::up(&a.name, 4, a.keep, Progress::Stdout("demo")) {
        Ok(c) => c,
        Err(e) => return Ok(fail_early(&e)),
    };
    if let Err(e) = prepare(&c) {
        return Ok(fail_early(&e));
    }
    let checker = c.start_checker("demo:counter");
    let load = c.start_load();
    say(
        "load: redis-benchmark runs (SET and INCR, 20 clients, pipeline 8) and the checker (one connection, INCR after INCR); web probed over HTTP",
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut t = Tally::default();
    let story = kills(&c, &checker, &mut t);
    if let Err(e) = &story {
        say(&format!("error: {e:#}"));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let report = checker.finish()?;
    let load = load.finish()?;
    for line in &load.last_rates {
        say(&format!("redis-benchmark (last run): {line}"));
    }
    for f in &load.failures {
        say(&format!("load failed: {f}"));
    }
    let final_value: i64 = c
        .redis(&["GET", "demo:counter"])
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let outcome = Outcome {
        report,
        final_value,
        benchmark_ok: load.ok(),
    };
    let r = &outcome.report;
    say(&format!(
        "checker: {} INCRs acknowledged ({} after the first kill), longest gap between replies {} ms, {} resets, {} errors{}",
        r.acked,
        r.after_mark,
        r.max_gap_ms,
        r.resets,
        r.errors.len(),
        r.errors
            .first()
            .map_or(String::new(), |e| format!(" (first: {e})"))
    ));
    say(&format!(
        "counter read back: {final_value} (last acknowledged {}); redis-benchmark: {} runs",
        r.last_value, load.runs
    ));
    // The cluster's own count must agree with what the demo saw.
    let (cf, cr) = c
        .vm("kvd")
        .map(|v| (v.failovers, v.reprotections))
        .unwrap_or((0, 0));
    if (cf, cr) != (t.failovers, t.reprotected) {
        say(&format!(
            "the cluster counts {cf} failovers and {cr} re-protections, the demo saw {} and {}",
            t.failovers, t.reprotected
        ));
    }
    let pass = story.is_ok()
        && outcome.pass()
        && t.failovers == KILLS
        && t.reprotected == KILLS
        && (cf, cr) == (KILLS, KILLS)
        && t.web_kills > 0
        && t.web_back == t.web_kills;
    println!(
        "verdict: {} failovers={} reprotected={} lost={} resets={} gap_ms={} reprotect_s={:.1} ha_restart_s={:.1}",
        if pass { "PASS" } else { "FAIL" },
        t.failovers,
        t.reprotected,
        outcome.lost(),
        r.resets,
        r.max_gap_ms,
        t.reprotect_s,
        t.ha_restart_s
    );
    if a.keep {
        say(&format!(
            "lab {} left up: `tandem vm list --lab {}` to look, `tandem lab down --name {}` removes it",
            a.name, a.name, a.name
        ));
    }
    Ok(if pass { 0 } else { 1 })
}

/// The VMs, through the API: kvd created, powered on and turned FT on; web powered on on
/// kvd's primary's host.
fn prepare(c: &ClusterLab) -> Result<()> {
    say(&format!(
        "cluster up: hosts {}, master {}",
        c.host_names()?.join(" "),
        c.master()?.unwrap_or_else(|| "(none yet)".into())
    ));
    say(&format!(
        "dashboard: {} (watch the failovers live; sign in with the token in {})",
        c.client.dashboard(),
        c.client.token_file().map_or_else(
            || "the lab's token file".into(),
            |f| f.display().to_string()
        )
    ));
    c.create_kvd(Priority::High)?;
    let v = c.vm("kvd")?;
    say(&format!(
        "kvd (a Redis-protocol server) created and powered on through the API: on {}, {KVD_IP}:6379",
        v.primary_host.as_deref().unwrap_or("?")
    ));
    let started = Instant::now();
    let v = c.ft_on("kvd")?;
    let primary = v.primary_host.clone().context("kvd has no primary")?;
    say(&format!(
        "ft turn-on kvd: Protected in {:.1} s (primary {primary}, secondary {})",
        started.elapsed().as_secs_f64(),
        v.secondary_host.as_deref().unwrap_or("?")
    ));
    c.create_web(&primary)?;
    say(&format!(
        "web (httpd, not FT, restart priority high, index.html on shared storage) powered on on {primary}: serving at http://{WEB_IP}/"
    ));
    Ok(())
}

/// The demo could not set its stage: why, and a FAIL verdict with nothing measured.
fn fail_early(e: &anyhow::Error) -> u8 {
    say(&format!("error: {e:#}"));
    println!(
        "verdict: FAIL failovers=0 reprotected=0 lost=0 resets=0 gap_ms=0 reprotect_s=0.0 ha_restart_s=0.0"
    );
    1
}

/// Kill kvd's primary's host, twice, each time waiting for the failover, the
/// re-protection and (if web ran there) web's HA restart.
fn kills(c: &ClusterLab, checker: &RunningChecker, t: &mut Tally) -> Result<()> {
    for round in 1..=KILLS {
        let Some(p) = c.vm("kvd")?.primary_host else {
            bail!("kvd has no primary before kill {round}");
        };
        let web_on_p = c.web_on(&p)?;
        if web_on_p && !c.web_serves() {
            bail!("web does not serve before kill {round}");
        }
        let master_on_p = c.master()?.as_deref() == Some(p.as_str());
        say(&format!(
            "kill {round}: killing {p} (kvd's primary{}{}): links cut, every process SIGKILLed",
            if web_on_p { ", web" } else { "" },
            if master_on_p {
                ", the cluster's master"
            } else {
                ""
            }
        ));
        checker.mark();
        t.web_kills += u32::from(web_on_p);
        let mut out = KillOutcome::default();
        let r = c.kill_and_watch(&p, web_on_p, Duration::from_secs(60), &mut out);
        t.failovers += u64::from(out.failover.is_some());
        if let Some(d) = out.protected {
            t.reprotected += 1;
            t.reprotect_s = t.reprotect_s.max(d.as_secs_f64());
        }
        if let Some(d) = out.web_back {
            t.web_back += 1;
            t.ha_restart_s = t.ha_restart_s.max(d.as_secs_f64());
        }
        r?;
    }
    Ok(())
}
