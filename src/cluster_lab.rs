//! A harness that drives a lab cluster (`lab::up_cluster`: etcd plus an agent per host)
//! through the cluster's REST API, for `tandem demo`, `tandem bench cluster` and
//! `tandem bench soak`.
//!
//! It owns: the lab's life (taken down on drop unless kept), the API client, the example
//! VMs (kvd under FT, an unprotected httpd), bounded waits with progress, host failures
//! (`lab::kill`, `lab::revive`) and the clients in the lab's client namespace (the INCR
//! checker, looping redis-benchmark runs, HTTP probes).
//!
//! Invariant: everything the verbs can do goes through the API ([`Client`]); only what
//! no verb does (killing and reviving hosts) goes around it. Every wait is bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use api::client::Client;
use cluster::model::{FtStatus, Nic, Priority, VmView, meshed};
use cluster::verbs::{CreateVm, FtOp};

use crate::client::{in_netns, redis_in};
use crate::demo::{RunningChecker, not_interrupted};
use crate::guests;
use crate::lab::{self, LabGuard};

/// kvd's address and MAC on the VM network.
pub const KVD_IP: &str = "10.77.0.10";
const KVD_MAC: &str = "02:00:00:00:00:10";
/// httpd's address and MAC.
pub const WEB_IP: &str = "10.77.0.11";
const WEB_MAC: &str = "02:00:00:00:00:11";
/// What httpd serves (its datastore's index.html).
pub const WEB_PAGE: &str = "served by the Tandem cluster\n";
/// An HTTP probe of httpd gives up after this long (short: waits poll with it).
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often waits poll the cluster.
const POLL: Duration = Duration::from_millis(100);
/// Each client call (API, HTTP probe) gives up after this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a [`ClusterLab`] says what happens: `PREFIX: line` on stdout (the demo, whose
/// story it is), on stderr (a benchmark, whose table is its output), or nowhere (`--json`).
#[derive(Clone, Copy)]
pub enum Progress {
    Stdout(&'static str),
    Stderr(&'static str),
    Quiet,
}

/// A lab running a cluster, and the way to drive it.
pub struct ClusterLab {
    pub name: String,
    pub(crate) client: Client,
    /// Where progress lines go.
    progress: Progress,
    _guard: Option<LabGuard>,
}

impl ClusterLab {
    /// A fresh lab `name` of `hosts` hosts (any old one of that name taken down first),
    /// returned once every agent is registered and every host reaches every other on the
    /// logging network (before that, placement may find no second host for a pair).
    /// Taken down when dropped unless `keep`.
    pub fn up(name: &str, hosts: u32, keep: bool, progress: Progress) -> Result<Self> {
        lab::down(name);
        lab::up_cluster(name, hosts)?;
        let guard = (!keep).then(|| LabGuard(name.to_string()));
        let client = Client::from_lab(name)?.with_timeout(CALL_TIMEOUT);
        let c = ClusterLab {
            name: name.to_string(),
            client,
            progress,
            _guard: guard,
        };
        let mut last = Vec::new();
        c.wait_until(
            "every agent registered and reaching the others on the logging network",
            Duration::from_secs(60),
            || {
                last = c.client.hosts()?;
                Ok(meshed(&last, hosts as usize).then_some(()))
            },
        )
        .map_err(|e| {
            let seen: Vec<String> = last
                .iter()
                .map(|h| match &h.log_peers {
                    Some(p) => format!("{} ({}) reaches [{}]", h.name, h.state, p.join(", ")),
                    None => format!("{} ({}) not probed yet", h.name, h.state),
                })
                .collect();
            anyhow!(
                "{e:#}; hosts: {}; agents' logs: /tmp/{name}-hostK-agent.log",
                if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join("; ")
                }
            )
        })?;
        Ok(c)
    }

    /// A progress line (nothing if quiet).
    pub fn say(&self, msg: &str) {
        match self.progress {
            Progress::Stdout(p) => println!("{p}: {msg}"),
            Progress::Stderr(p) => eprintln!("{p}: {msg}"),
            Progress::Quiet => {}
        }
    }

    pub fn client_ns(&self) -> String {
        lab::ns(&self.name, "client")
    }

    /// Poll `f` every 100 ms until it gives `Some`, at most `limit`; an error from `f` (the
    /// cluster briefly unreachable while its master changes) counts as "not yet". Says
    /// every 10 s that it still waits; gives up at once on SIGINT/SIGTERM (the lab is then
    /// taken down as the caller unwinds). Returns the value and how long it took.
    pub fn wait_until<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut() -> Result<Option<T>>,
    ) -> Result<(T, Duration)> {
        let start = Instant::now();
        let mut next_note = Duration::from_secs(10);
        let mut last_err = None;
        loop {
            match f() {
                Ok(Some(v)) => return Ok((v, start.elapsed())),
                Ok(None) => {}
                Err(e) => last_err = Some(format!("{e:#}")),
            }
            not_interrupted().with_context(|| format!("waiting for {what}"))?;
            let took = start.elapsed();
            if took > limit {
                bail!(
                    "{what}: not within {} s{}",
                    limit.as_secs(),
                    last_err.map_or(String::new(), |e| format!(" (last error: {e})"))
                );
            }
            if took > next_note {
                self.say(&format!(
                    "... still waiting for {what} ({} s)",
                    took.as_secs()
                ));
                next_note += Duration::from_secs(10);
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn vm(&self, name: &str) -> Result<VmView> {
        Ok(self.client.vm(name)?)
    }

    /// The hosts registered now (their agents hold their leases).
    pub fn host_names(&self) -> Result<Vec<String>> {
        Ok(self
            .client
            .hosts()?
            .into_iter()
            .filter(|h| h.responding())
            .map(|h| h.name)
            .collect())
    }

    pub fn master(&self) -> Result<Option<String>> {
        Ok(self.client.status()?.master)
    }

    /// kvd created (datastore on shared storage, 64 MiB) and powered on, answering PING.
    pub fn create_kvd(&self, priority: Priority) -> Result<()> {
        let wasm = guest("kvd.wasm")?;
        self.client.create(&CreateVm {
            name: "kvd".into(),
            wasm,
            datastore: None,
            nic: Some(Nic {
                mac: KVD_MAC.into(),
                ip: format!("{KVD_IP}/24"),
            }),
            listen: vec![6379],
            memory_mib: Some(64),
            restart_priority: Some(priority),
            args: vec![],
            env: vec![],
            monitoring: None,
        })?;
        self.client.power_on("kvd", None)?;
        self.wait_until("kvd answering PING", Duration::from_secs(30), || {
            Ok(self
                .redis(&["PING"])
                .is_ok_and(|r| r == "+PONG")
                .then_some(()))
        })?;
        Ok(())
    }

    /// `ft turn-on`, waited for until Protected; the view then.
    pub fn ft_on(&self, vm: &str) -> Result<VmView> {
        self.client.ft(vm, &FtOp::TurnOn)?;
        let (v, _) =
            self.wait_until(&format!("{vm} protected"), Duration::from_secs(60), || {
                let v = self.vm(vm)?;
                Ok((v.ft == FtStatus::Protected).then_some(v))
            })?;
        Ok(v)
    }

    /// httpd (`web`) created with its datastore (holding an index.html) on shared storage,
    /// restart priority high, powered on on `host`, waited for until it serves its page.
    pub fn create_web(&self, host: &str) -> Result<()> {
        let www = lab::shared_dir(&self.name).join("web").join("www");
        std::fs::create_dir_all(&www).context("creating httpd's datastore")?;
        std::fs::write(www.join("index.html"), WEB_PAGE).context("writing index.html")?;
        self.client.create(&CreateVm {
            name: "web".into(),
            wasm: guest("httpd.wasm")?,
            datastore: Some(www),
            nic: Some(Nic {
                mac: WEB_MAC.into(),
                ip: format!("{WEB_IP}/24"),
            }),
            listen: vec![80],
            memory_mib: Some(64),
            restart_priority: Some(Priority::High),
            args: vec![],
            env: vec![],
            monitoring: None,
        })?;
        self.place_web(host)
    }

    /// `web` powered on on `host` (powered off first if it runs elsewhere), serving.
    pub fn place_web(&self, host: &str) -> Result<()> {
        let v = self.vm("web")?;
        if v.primary_host.as_deref() == Some(host) {
            return Ok(());
        }
        if v.power == cluster::model::Power::On {
            self.client.power_off("web")?;
            self.wait_until("web powered off", Duration::from_secs(30), || {
                Ok(self.vm("web")?.primary_host.is_none().then_some(()))
            })?;
        }
        self.client.power_on("web", Some(host))?;
        self.wait_until(
            &format!("web serving from {host}"),
            Duration::from_secs(30),
            || {
                let on = self.vm("web")?.primary_host.as_deref() == Some(host);
                Ok((on && self.web_serves()).then_some(()))
            },
        )?;
        Ok(())
    }

    /// Kill a host (its links cut, its processes SIGKILLed); the moment of the kill.
    pub fn kill(&self, host: &str) -> Result<Instant> {
        let at = Instant::now();
        lab::kill(&self.name, host)?;
        Ok(at)
    }

    /// Bring a killed host back the way the lab does (`lab revive`): once its old lease has
    /// expired (it is gone from `host list`), links up and its agent started; returned when
    /// it is registered again.
    pub fn revive(&self, host: &str) -> Result<Duration> {
        self.wait_until(
            &format!("{host} gone from host list"),
            Duration::from_secs(30),
            || Ok((!self.host_names()?.iter().any(|h| h == host)).then_some(())),
        )?;
        let at = Instant::now();
        lab::revive(&self.name, host)?;
        self.wait_until(
            &format!("{host} back in host list"),
            Duration::from_secs(30),
            || Ok(self.host_names()?.iter().any(|h| h == host).then_some(())),
        )?;
        Ok(at.elapsed())
    }

    /// Whether httpd answers `GET /` with its page, from the client namespace.
    pub fn web_serves(&self) -> bool {
        let url = format!("http://{WEB_IP}/");
        in_netns(&self.client_ns(), move || {
            let r = cluster::http::request("GET", &url, None, PROBE_TIMEOUT)?;
            Ok(r.status == 200 && r.text() == WEB_PAGE)
        })
        .unwrap_or(false)
    }

    pub fn kvd_addr() -> SocketAddr {
        SocketAddr::from(([10, 77, 0, 10], 6379))
    }

    /// One command to kvd over a fresh connection from the client namespace.
    pub fn redis(&self, args: &[&str]) -> Result<String> {
        redis_in(&self.client_ns(), Self::kvd_addr(), args)
    }

    /// The one-connection INCR checker on kvd's `key`.
    pub fn start_checker(&self, key: &str) -> RunningChecker {
        RunningChecker::start(&self.client_ns(), Self::kvd_addr(), key)
    }

    /// redis-benchmark against kvd, run after run, until stopped.
    pub fn start_load(&self) -> Load {
        Load::start(&self.client_ns(), KVD_IP)
    }
}

/// A built guest's absolute path (the agents read it from where they run).
fn guest(name: &str) -> Result<PathBuf> {
    let p = guests::file(name)?;
    p.canonicalize()
        .with_context(|| format!("resolving {}", p.display()))
}

/// Bounded redis-benchmark runs (`-t set,incr -n 20000 -c 20 -P 8`, each at most 60 s)
/// one after another on a thread of their own, until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<LoadReport>,
}

/// What the load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub runs: u32,
    /// Runs that did not exit 0 (each with why).
    pub failures: Vec<String>,
    /// The last run's requests-per-second lines.
    pub last_rates: Vec<String>,
}

impl LoadReport {
    pub fn ok(&self) -> bool {
        self.runs > 0 && self.failures.is_empty()
    }
}

impl Load {
    fn start(ns: &str, ip: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, ns, ip) = (stop.clone(), ns.to_string(), ip.to_string());
        let handle = std::thread::spawn(move || {
            let mut rep = LoadReport::default();
            while !s.load(Ordering::SeqCst) && !machine::stop_requested() && rep.failures.len() < 5
            {
                let out = crate::client::redis_benchmark(&ns, &ip, 60)
                    .args(["-t", "set,incr", "-n", "20000", "-c", "20", "-P", "8", "-q"])
                    .stdin(Stdio::null())
                    .output();
                rep.runs += 1;
                match out {
                    Ok(o) if o.status.success() => {
                        let text = String::from_utf8_lossy(&o.stdout).replace('\r', "\n");
                        rep.last_rates = text
                            .lines()
                            .filter(|l| l.contains("requests per second"))
                            .map(|l| l.trim().to_string())
                            .collect();
                    }
                    Ok(o) => rep.failures.push(format!(
                        "redis-benchmark run {}: {}: {}",
                        rep.runs,
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => {
                        rep.failures.push(format!(
                            "starting redis-benchmark (package redis-tools): {e}"
                        ));
                        break;
                    }
                }
            }
            rep
        });
        Load { stop, handle }
    }

    /// Stop after the current run (bounded by its timeout) and report.
    pub fn finish(self) -> Result<LoadReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow!("the load thread panicked"))
    }
}

/// What followed one host kill, as seen through the API (times from the kill).
#[derive(Debug, Default, Clone)]
pub struct KillOutcome {
    /// kvd's primary shown on another host.
    pub failover: Option<Duration>,
    /// kvd Protected again, its secondary on a host other than the killed one, and the
    /// cluster's re-protection count up.
    pub protected: Option<Duration>,
    /// web serving again from another host (when it ran on the killed host).
    pub web_back: Option<Duration>,
}

impl ClusterLab {
    /// Kill `host` and wait (at most `limit`) until kvd failed over and is protected again,
    /// and, if `web` ran there, web serves from another host; progress said as each
    /// happens. `out` holds what happened even when the wait fails.
    pub fn kill_and_watch(
        &self,
        host: &str,
        web_there: bool,
        limit: Duration,
        out: &mut KillOutcome,
    ) -> Result<()> {
        let before = self.vm("kvd")?;
        let at = self.kill(host)?;
        self.wait_until(
            &format!("kvd re-protected after {host}'s kill"),
            limit,
            || {
                let v = self.vm("kvd")?;
                let new_p = v.primary_host.as_deref().filter(|h| *h != host);
                if out.failover.is_none()
                    && let Some(np) = new_p
                {
                    out.failover = Some(at.elapsed());
                    self.say(&format!(
                        "kvd failed over: primary now {np} (the cluster showed it {} ms after the kill)",
                        at.elapsed().as_millis()
                    ));
                }
                let secondary_ok = v.secondary_host.as_deref().is_some_and(|h| h != host);
                if out.failover.is_some()
                    && out.protected.is_none()
                    && v.ft == FtStatus::Protected
                    && secondary_ok
                    && v.reprotections > before.reprotections
                {
                    out.protected = Some(at.elapsed());
                    self.say(&format!(
                        "kvd re-protected automatically {:.1} s after the kill: primary {}, new secondary {}",
                        at.elapsed().as_secs_f64(),
                        new_p.unwrap_or("?"),
                        v.secondary_host.as_deref().unwrap_or("?")
                    ));
                }
                if web_there && out.web_back.is_none() {
                    let w = self.vm("web")?;
                    if let Some(h) = w.primary_host.as_deref().filter(|h| *h != host)
                        && self.web_serves()
                    {
                        out.web_back = Some(at.elapsed());
                        self.say(&format!(
                            "web HA-restarted on {h}: serving again {:.1} s after the kill",
                            at.elapsed().as_secs_f64()
                        ));
                    }
                }
                let web_done = !web_there || out.web_back.is_some();
                Ok((out.protected.is_some() && web_done).then_some(()))
            },
        )?;
        Ok(())
    }

    /// Whether web runs on `host` now.
    pub fn web_on(&self, host: &str) -> Result<bool> {
        Ok(self.vm("web")?.primary_host.as_deref() == Some(host))
    }
}
