//! The host agent: registers its host under a lease, runs the copies the master placed on
//! it as child processes (`tandem ft primary` / `tandem ft secondary`), reports them, and
//! takes its turn as the HA master when elected.
//!
//! Invariants:
//! - a copy id is started at most once on this host, and only if it was placed under this
//!   host's current incarnation (its lease): a copy that ended (or was stopped), or one
//!   placed in an earlier life of the agent, is never started; the master places a new one;
//! - every copy lives by its fence ([`crate::fence`]), fed from the lease's renewals (send
//!   time plus the TTL less a second) and only while that lease is current: whatever
//!   happens to the agent, its copies end before its lease can expire. Its reports (the
//!   copies' locks) vanish with the lease, and only then may the master start them
//!   elsewhere. The agent's own isolation response (it kills its copies past the same
//!   deadline and starts none) is the second line;
//! - children die with the agent (`PR_SET_PDEATHSIG`, and their fence closes): an agent
//!   that dies is a host that died, as far as its copies are concerned. A restarted agent
//!   finds no copy of its earlier life still running.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ClusterError;
use crate::fence::{self, FenceWriter};
use crate::master::{self, Master};
use crate::model::{self, CopyReport, CopyState, HostRecord, Placement, Role, VmRecord};
use crate::store::{Store, StoreError};

/// The host's lease: its records vanish this long after its agent last renewed it.
pub const LEASE_TTL_SECS: i64 = 4;
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How long one renewal may take: several attempts fit in [`ISOLATED_AFTER`], so that one
/// slow answer of the store does not fence every copy of the host.
const RENEW_TIMEOUT: Duration = Duration::from_millis(700);
/// Without a renewal for this long, the agent stops its copies (half the TTL).
const ISOLATED_AFTER: Duration = Duration::from_millis(LEASE_TTL_SECS as u64 * 1000 - 1000);
/// How often each copy's fence is fed.
const FENCE_EVERY: Duration = Duration::from_millis(100);
/// How often the agent looks at its placements and its children.
const TICK: Duration = Duration::from_millis(200);
/// A report is rewritten at least this often (its counters move).
const REPORT_EVERY: Duration = Duration::from_millis(1000);
/// Every agent accepts (and at once closes) connections on this port of its logging
/// address, so that its peers can tell whether the logging network joins them.
pub const LOG_PROBE_PORT: u16 = 7069;
/// How often the logging network is probed when nothing changed, and how long a probe may
/// take.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the agent looks at the registered hosts: a host that registers is probed
/// within this, and one newly missed is probed again this soon (then less and less often
/// while it stays missed, up to [`PROBE_EVERY`]), so that a cluster just formed can place
/// secondaries without waiting for the slow round. Each look is one read of the host
/// records from the store per agent: 4 a second each, cheap for a cluster of a few dozen
/// hosts (a watch of `hosts/` would serve a larger one).
const PROBE_LOOK_EVERY: Duration = Duration::from_millis(250);

/// When the logging network is probed next: at once when the set of other hosts changed
/// or the last result could not be recorded; soon when a host was missed that the probe
/// before reached or did not know (a peer whose logging link comes up late), backing
/// off to [`PROBE_EVERY`] while the same hosts stay missed (a host cut off for good costs a
/// probe every [`PROBE_EVERY`]); otherwise every [`PROBE_EVERY`].
#[derive(Default)]
struct ProbeDue {
    /// The other hosts at the last probe (`None` before the first).
    names: Option<Vec<String>>,
    /// The hosts the last probe missed.
    missed: Vec<String>,
    next: Option<Instant>,
    /// The wait after the last probe that missed a host.
    backoff: Duration,
    /// The last record of what a probe found failed.
    failing: bool,
}

impl ProbeDue {
    fn now(&self, names: &[String], now: Instant) -> bool {
        self.names.as_deref() != Some(names) || self.next.is_none_or(|t| now >= t)
    }

    /// The probe of `names` reached `reached`: the hosts it missed.
    fn probed(&mut self, names: Vec<String>, reached: &[String], now: Instant) -> &[String] {
        let missed: Vec<String> = names
            .iter()
            .filter(|n| !reached.contains(n))
            .cloned()
            .collect();
        let wait = if missed.is_empty() {
            self.backoff = Duration::ZERO;
            PROBE_EVERY
        } else {
            let newly = missed.iter().any(|n| !self.missed.contains(n));
            self.backoff = if newly || self.backoff.is_zero() {
                PROBE_LOOK_EVERY
            } else {
                (self.backoff * 2).min(PROBE_EVERY)
            };
            self.backoff
        };
        self.missed = missed;
        self.names = Some(names);
        self.next = Some(now + wait);
        &self.missed
    }

    /// What the last probe found could not be recorded: probe again at the next look, the
    /// first time; while it keeps failing (the lease lost: the store refuses the record),
    /// on the usual schedule.
    fn unrecorded(&mut self) {
        if !self.failing {
            self.next = None;
        }
        self.failing = true;
    }

    /// What the last probe found was recorded.
    fn recorded(&mut self) {
        self.failing = false;
    }
}

/// The caches' folder on shared storage (VM names cannot start with a dot).
pub fn shared_cache(shared: &std::path::Path) -> PathBuf {
    shared.join(".cache")
}

/// What an agent is told at start.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    pub store: Store,
    /// The shared storage folder.
    pub shared: PathBuf,
    /// The bridge VMs' NICs join on this host.
    pub vm_bridge: String,
    /// The VM network's uplink on this host, which copies watch (`ft ... --uplink`).
    pub vm_uplink: Option<String>,
    /// Addresses on the VM network the copies probe through the uplink
    /// (`ft ... --uplink-peer`).
    pub vm_peers: Vec<std::net::Ipv4Addr>,
    /// How long a storage or uplink failure must last to count (`ft ... --health-hold-ms`;
    /// `None`: the copies' default; the peers' silence at least 300 ms), and whether a primary never hands over because of its
    /// host's health (`ft ... --no-health-handover`).
    pub health_hold_ms: Option<u64>,
    pub no_health_handover: bool,
    /// This host's address on the logging network.
    pub log_ip: String,
    /// The URL the host's REST API is reached at.
    pub api: String,
    pub memory_mib: u64,
    pub version: String,
    pub fingerprint: String,
    /// The `tandem` binary the copies run.
    pub exe: PathBuf,
    /// Where the copies' logs go.
    pub state_dir: PathBuf,
}

/// A copy this agent started.
struct Running {
    vm: String,
    id: u64,
    role: Role,
    child: Child,
    exit: Option<String>,
    /// (when, events executed) samples of the live copy, to tell the secondary's lag in ms.
    samples: VecDeque<(Instant, u64)>,
    log_bytes: (Instant, u64),
    /// (when, disk read bytes, network input bytes) at the last rate sample.
    io_bytes: (Instant, u64, u64),
    reported: Option<(Instant, CopyReport)>,
    log: PathBuf,
    /// When this agent first saw the copy live, and its disk-read and network-input
    /// counters then: averages are taken from there.
    live_base: Option<(Instant, u64, u64)>,
}

/// The copies' fences, each under the lease it was started in: only those of the current
/// lease are fed, so a copy started in an earlier life of the lease dies.
#[derive(Default)]
struct Fences {
    by_copy: BTreeMap<u64, (i64, FenceWriter)>,
}

impl Fences {
    fn feed(&mut self, lease: i64, deadline_ns: u64) {
        self.by_copy.retain(|_, (l, _)| *l == lease);
        for (_, f) in self.by_copy.values_mut() {
            f.send(deadline_ns);
        }
    }
}

/// The lease, shared between the renewing thread and the rest.
struct Lease {
    id: i64,
    /// When the last successful renewal was *sent* (the store counts the TTL from when
    /// it received it, which is later), and the same on the machine's monotonic clock.
    renewed: Instant,
    renewed_ns: u64,
}

/// What a probe of the logging network found: the hosts reached and the hosts missed.
#[derive(Clone, Debug, PartialEq)]
struct LogReach {
    reached: Vec<String>,
    missed: Vec<String>,
}

pub struct Agent {
    cfg: AgentConfig,
    /// This machine's host name, as copies write it in their status (`name/pid`).
    hostname: String,
    lease: Arc<Mutex<Lease>>,
    stop: Arc<AtomicBool>,
    /// What the last probe of the logging network found.
    log_peers: Arc<Mutex<Option<LogReach>>>,
    /// The probes' listener, bound before the host is registered: a peer that probes this
    /// host as soon as it sees its record finds it answering.
    probe_listener: std::net::TcpListener,
    /// Each running copy's fence (by copy id): its process lives only while fed.
    fences: Arc<Mutex<Fences>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn already_registered(name: &str) -> ClusterError {
    ClusterError::Conflict(format!(
        "host {name} is already registered by a live agent (or one that died less than {LEASE_TTL_SECS} s ago)"
    ))
}

impl Agent {
    /// Register the host (under a new lease). Refused if another live agent holds the name.
    pub fn register(cfg: AgentConfig) -> Result<Agent, ClusterError> {
        if !model::valid_name(&cfg.name) {
            return Err(ClusterError::Invalid(format!(
                "host name {:?}: use 1-63 lowercase letters, digits and '-'",
                cfg.name
            )));
        }
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
            ClusterError::Internal(format!("create {}: {e}", cfg.state_dir.display()))
        })?;
        // Bound before the host is registered (see `probe_listener`). Another agent of this
        // host holds it too: its registration is the clearer refusal.
        let addr = format!("{}:{LOG_PROBE_PORT}", cfg.log_ip);
        let probe_listener = match std::net::TcpListener::bind(&addr) {
            Ok(l) => l,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && matches!(cfg.store.get(&model::host_key(&cfg.name)), Ok(Some(_)))
                {
                    return Err(already_registered(&cfg.name));
                }
                return Err(ClusterError::Internal(format!(
                    "listen on {addr} for probes: {e}"
                )));
            }
        };
        let (renewed, renewed_ns) = (Instant::now(), fence::monotonic_ns());
        let id = cfg.store.grant(LEASE_TTL_SECS)?;
        let rec = Self::record(&cfg, None, id);
        let bytes = serde_json::to_vec(&rec).map_err(|e| ClusterError::Internal(e.to_string()))?;
        if !cfg
            .store
            .create(&model::host_key(&cfg.name), &bytes, Some(id))?
        {
            let _ = cfg.store.revoke(id);
            return Err(already_registered(&cfg.name));
        }
        tracing::info!(
            "host {} registered (Tandem {}, engine {}, {} MiB, API {})",
            cfg.name,
            cfg.version,
            cfg.fingerprint,
            cfg.memory_mib,
            cfg.api
        );
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        Ok(Agent {
            cfg,
            hostname,
            lease: Arc::new(Mutex::new(Lease {
                id,
                renewed,
                renewed_ns,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            log_peers: Arc::new(Mutex::new(None)),
            probe_listener,
            fences: Arc::new(Mutex::new(Fences::default())),
        })
    }

    fn record(cfg: &AgentConfig, reach: Option<LogReach>, lease: i64) -> HostRecord {
        let (log_peers, log_missed) = match reach {
            Some(r) => (Some(r.reached), Some(r.missed)),
            None => (None, None),
        };
        HostRecord {
            name: cfg.name.clone(),
            version: cfg.version.clone(),
            fingerprint: cfg.fingerprint.clone(),
            api: cfg.api.clone(),
            log_ip: cfg.log_ip.clone(),
            memory_mib: cfg.memory_mib,
            maintenance: false,
            started_ms: model::now_ms(),
            log_peers,
            log_missed,
            incarnation: lease,
        }
    }

    /// A flag that ends [`Agent::run`] when set.
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Renew the lease, run the master when elected and the copies until stopped; then
    /// stop every copy and give the lease back.
    pub fn run(self) -> Result<(), ClusterError> {
        let renewer = {
            let (store, lease, stop, cfg, peers, fences) = (
                self.cfg.store.clone(),
                self.lease.clone(),
                self.stop.clone(),
                self.cfg.clone(),
                self.log_peers.clone(),
                self.fences.clone(),
            );
            std::thread::Builder::new()
                .name("lease".into())
                .spawn(move || renew(&store, &lease, &stop, &cfg, &peers, &fences))
                .map_err(|e| ClusterError::Internal(format!("start a thread: {e}")))?
        };
        self.probe_logging_network()?;
        {
            let (lease, stop, fences) =
                (self.lease.clone(), self.stop.clone(), self.fences.clone());
            std::thread::Builder::new()
                .name("fence".into())
                .spawn(move || {
                    // The copies' deadlines follow the lease's renewals, from a thread of
                    // its own: a stalled main loop must not let a copy outlive the lease,
                    // nor kill copies whose lease is held.
                    while !stop.load(Ordering::Relaxed) {
                        let (id, deadline) = {
                            let l = lock(&lease);
                            (l.id, l.renewed_ns + ISOLATED_AFTER.as_nanos() as u64)
                        };
                        lock(&fences).feed(id, deadline);
                        std::thread::sleep(FENCE_EVERY);
                    }
                })
                .map_err(|e| ClusterError::Internal(format!("start a thread: {e}")))?;
        }
        let masterer = {
            let (store, lease, stop, name) = (
                self.cfg.store.clone(),
                self.lease.clone(),
                self.stop.clone(),
                self.cfg.name.clone(),
            );
            std::thread::Builder::new()
                .name("master".into())
                .spawn(move || run_master(&store, &lease, &stop, &name))
                .map_err(|e| ClusterError::Internal(format!("start a thread: {e}")))?
        };
        let mut copies: BTreeMap<String, Running> = BTreeMap::new();
        let mut started: BTreeSet<(String, u64)> = BTreeSet::new();
        let mut isolated = false;
        while !self.stop.load(Ordering::Relaxed) {
            let (lease_id, since) = {
                let l = lock(&self.lease);
                (l.id, l.renewed.elapsed())
            };
            if since > ISOLATED_AFTER {
                if !isolated {
                    tracing::error!(
                        "isolated: the cluster store has not renewed this host's lease for {} ms; stopping every copy here (isolation response)",
                        since.as_millis()
                    );
                    isolated = true;
                }
                for c in copies.values_mut() {
                    if c.exit.is_none() {
                        let _ = c.child.kill();
                    }
                }
                self.reap(&mut copies);
                std::thread::sleep(TICK);
                continue;
            }
            if isolated {
                tracing::warn!("the cluster store answers again: this host takes copies again");
                isolated = false;
            }
            if let Err(e) = self.tick(&mut copies, &mut started, lease_id) {
                tracing::warn!("{e}");
            }
            std::thread::sleep(TICK);
        }
        tracing::info!("agent stopping: stopping its copies");
        for c in copies.values_mut() {
            stop_copy(c);
        }
        let _ = renewer.join();
        let _ = masterer.join();
        let id = lock(&self.lease).id;
        let _ = self.cfg.store.revoke(id);
        Ok(())
    }

    /// Answer peers' probes on the logging network, and probe theirs: the host record says
    /// which hosts this one reaches there (placement needs a secondary that reaches its
    /// primary).
    fn probe_logging_network(&self) -> Result<(), ClusterError> {
        crate::logcheck::serve(&self.cfg.log_ip).map_err(|e| {
            ClusterError::Internal(format!(
                "serve the logging check on {}:{}: {e}",
                self.cfg.log_ip,
                crate::logcheck::LOG_CHECK_PORT
            ))
        })?;
        let listener = self.probe_listener.try_clone().map_err(|e| {
            ClusterError::Internal(format!("answer probes on the logging network: {e}"))
        })?;
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(|_| ())
                .map_err(|e| ClusterError::Internal(format!("start a thread: {e}")))
        };
        spawn(
            "probe-answer",
            Box::new(move || {
                // Accepting is the answer; the connection closes as it drops.
                for conn in listener.incoming() {
                    drop(conn);
                }
            }),
        )?;
        let (cfg, lease, stop, peers) = (
            self.cfg.clone(),
            self.lease.clone(),
            self.stop.clone(),
            self.log_peers.clone(),
        );
        spawn(
            "probe",
            Box::new(move || {
                let mut due = ProbeDue::default();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(hosts) = cfg
                        .store
                        .prefix_json::<HostRecord>(&format!("{}hosts/", model::PREFIX))
                    {
                        let others: Vec<HostRecord> = hosts
                            .into_iter()
                            .map(|(_, h)| h)
                            .filter(|h| h.name != cfg.name)
                            .collect();
                        let mut names: Vec<String> =
                            others.iter().map(|h| h.name.clone()).collect();
                        names.sort();
                        if due.now(&names, Instant::now()) {
                            let mut reached: Vec<String> = others
                                .into_iter()
                                .filter(|h| {
                                    format!("{}:{LOG_PROBE_PORT}", h.log_ip)
                                        .parse::<std::net::SocketAddr>()
                                        .is_ok_and(|a| {
                                            std::net::TcpStream::connect_timeout(&a, PROBE_TIMEOUT)
                                                .is_ok()
                                        })
                                })
                                .map(|h| h.name)
                                .collect();
                            reached.sort();
                            let missed = due.probed(names, &reached, Instant::now()).to_vec();
                            let reach = LogReach { reached, missed };
                            let changed = lock(&peers).as_ref() != Some(&reach);
                            if changed {
                                tracing::info!(
                                    "logging network: this host reaches [{}]",
                                    reach.reached.join(", ")
                                );
                                *lock(&peers) = Some(reach.clone());
                                let id = lock(&lease).id;
                                let rec = Agent::record(&cfg, Some(reach), id);
                                if let Err(e) =
                                    cfg.store
                                        .put_json(&model::host_key(&cfg.name), &rec, Some(id))
                                {
                                    tracing::warn!("cannot update this host's record: {e}");
                                    *lock(&peers) = None;
                                    due.unrecorded();
                                } else {
                                    due.recorded();
                                }
                            }
                        }
                    }
                    std::thread::sleep(PROBE_LOOK_EVERY);
                }
            }),
        )
    }

    fn reap(&self, copies: &mut BTreeMap<String, Running>) {
        for c in copies.values_mut() {
            if c.exit.is_none()
                && let Ok(Some(status)) = c.child.try_wait()
            {
                let how = describe(status);
                if status.success() {
                    tracing::info!("{} copy {} ({:?}) ended: {how}", c.vm, c.id, c.role);
                } else {
                    // Its own last words say why; the operator should not need to find the file.
                    tracing::warn!(
                        "{} copy {} ({:?}) ended: {how}: {} (log {})",
                        c.vm,
                        c.id,
                        c.role,
                        last_line(&c.log),
                        c.log.display()
                    );
                }
                c.exit = Some(how);
            }
            if c.exit.is_some() {
                lock(&self.fences).by_copy.remove(&c.id);
            }
        }
    }

    /// One look at the placements: stop what is no longer placed here, start what is,
    /// report every copy.
    fn tick(
        &self,
        copies: &mut BTreeMap<String, Running>,
        started: &mut BTreeSet<(String, u64)>,
        lease: i64,
    ) -> Result<(), StoreError> {
        let store = &self.cfg.store;
        let me = &self.cfg.name;
        let places = store.prefix_json::<Placement>(&format!("{}place/", model::PREFIX))?;
        let vms: BTreeMap<String, VmRecord> = store
            .prefix_json::<VmRecord>(&format!("{}vms/", model::PREFIX))?
            .into_iter()
            .map(|(_, r)| (r.spec.name.clone(), r))
            .collect();
        // The hosts are read only when a secondary is to start (it needs its primary's
        // logging address): most ticks start nothing.
        let mut hosts: Option<BTreeMap<String, HostRecord>> = None;
        // What the master placed here, under this incarnation: vm → (id, role, placement).
        // A copy placed under an earlier one died with that agent: never started again.
        let mut wanted: BTreeMap<String, (u64, Role, Placement)> = BTreeMap::new();
        for (key, p) in places {
            let vm = key.rsplit('/').next().unwrap_or_default().to_string();
            let here = |c: &&model::Copy| &c.host == me && c.incarnation == lease;
            if let Some(c) = p.primary.as_ref().filter(here) {
                wanted.insert(vm, (c.id, Role::Primary, p.clone()));
            } else if let Some(c) = p.secondary.as_ref().filter(here) {
                wanted.insert(vm, (c.id, Role::Secondary, p.clone()));
            }
        }
        // Kill requests.
        let kills = format!("{}kill/", model::PREFIX);
        for kv in store.get_prefix(&kills)? {
            let Some((vm, id)) = kv.key.strip_prefix(&kills).and_then(|s| s.split_once('/')) else {
                continue;
            };
            let (vm, id) = (vm.to_string(), id.parse::<u64>().ok());
            if let Some(c) = copies.get_mut(&vm).filter(|c| Some(c.id) == id)
                && c.exit.is_none()
            {
                if kv.value == model::HANDOVER {
                    // A planned switch: the copy hands its VM over to its secondary at its
                    // next event boundary (or refuses, unprotected, and carries on).
                    tracing::warn!("{vm}: asking copy {} for a planned switch", c.id);
                    // SAFETY: kill(2) on our own child's pid; no memory is involved.
                    unsafe { libc::kill(c.child.id() as i32, libc::SIGUSR1) };
                } else {
                    tracing::warn!("{vm}: killing copy {} ({:?}) on request", c.id, c.role);
                    let _ = c.child.kill();
                }
                store.delete(&kv.key)?;
            }
        }
        self.reap(copies);
        // Copies no longer placed here stop, and their reports go.
        let gone: Vec<String> = copies
            .iter()
            .filter(|(vm, c)| wanted.get(*vm).is_none_or(|(id, _, _)| *id != c.id))
            .map(|(vm, _)| vm.clone())
            .collect();
        for vm in gone {
            if let Some(mut c) = copies.remove(&vm) {
                if c.exit.is_none() {
                    tracing::info!("{vm}: copy {} no longer placed here; stopping it", c.id);
                    stop_copy(&mut c);
                }
                lock(&self.fences).by_copy.remove(&c.id);
                if !wanted.contains_key(&vm) {
                    store.delete(&model::copy_key(me, &vm))?;
                }
            }
        }
        // Placed copies not yet started start.
        for (vm, (id, role, p)) in &wanted {
            if copies.contains_key(vm) || started.contains(&(vm.clone(), *id)) {
                continue;
            }
            let Some(rec) = vms.get(vm) else { continue };
            let primary_ip = match role {
                Role::Primary => None,
                Role::Secondary => {
                    let host = p.primary.as_ref().map(|c| c.host.as_str()).unwrap_or("");
                    if hosts.is_none() {
                        hosts = Some(
                            store
                                .prefix_json::<HostRecord>(&format!("{}hosts/", model::PREFIX))?
                                .into_iter()
                                .map(|(_, h)| (h.name.clone(), h))
                                .collect(),
                        );
                    }
                    match hosts.as_ref().and_then(|h| h.get(host)) {
                        Some(h) => Some(h.log_ip.clone()),
                        None => continue,
                    }
                }
            };
            started.insert((vm.clone(), *id));
            match self.start(rec, *id, *role, primary_ip.as_deref(), lease) {
                Ok(c) => {
                    tracing::info!("{vm}: started copy {id} as {role:?} (pid {})", c.child.id());
                    copies.insert(vm.clone(), c);
                }
                Err(e) => {
                    tracing::error!("{vm}: cannot start copy {id}: {e}");
                    // Said at once, so that the master places it elsewhere now rather
                    // than when its start grace ends.
                    let failed = CopyReport {
                        exit: Some("failed to start".into()),
                        last_error: Some(e.to_string()),
                        ..CopyReport::new(vm, *id, *role, CopyState::Exited)
                    };
                    store.put_json(&model::copy_key(me, vm), &failed, Some(lease))?;
                }
            }
        }
        // Reports.
        for (vm, c) in copies.iter_mut() {
            let report = self.report(c);
            let due = c.reported.as_ref().is_none_or(|(at, last)| {
                at.elapsed() > REPORT_EVERY
                    || last.state != report.state
                    || last.live != report.live
                    || last.protected != report.protected
            });
            if due {
                store.put_json(&model::copy_key(me, vm), &report, Some(lease))?;
                c.reported = Some((Instant::now(), report));
            }
        }
        // A report of a copy this agent no longer runs (its delete failed, or it never
        // started) would hold the VM's lock for ever: it goes.
        let mine = format!("{}copies/{me}/", model::PREFIX);
        for kv in store.get_prefix(&mine)? {
            let vm = kv.key.strip_prefix(&mine).unwrap_or_default();
            // (A copy placed here that failed to start keeps its report: it says so.)
            if !copies.contains_key(vm) && !wanted.contains_key(vm) {
                store.delete(&kv.key)?;
            }
        }
        Ok(())
    }

    fn start(
        &self,
        rec: &VmRecord,
        id: u64,
        role: Role,
        primary_ip: Option<&str>,
        lease: i64,
    ) -> std::io::Result<Running> {
        let spec = &rec.spec;
        let cfg = &self.cfg;
        // The datastore was checked (resolved, inside the VM's folder) when the VM was
        // created: a link put in its place since must not hand the guest another folder.
        if spec.datastore.canonicalize().ok().as_ref() != Some(&spec.datastore) {
            return Err(std::io::Error::other(format!(
                "the datastore {} no longer resolves to itself (a link was put in its place?)",
                spec.datastore.display()
            )));
        }
        let mut args: Vec<String> = vec![
            "ft".into(),
            match role {
                Role::Primary => "primary",
                Role::Secondary => "secondary",
            }
            .into(),
            "--vm".into(),
            spec.name.clone(),
            "--shared".into(),
            cfg.shared.display().to_string(),
            "--wasm".into(),
            spec.wasm.display().to_string(),
            "--datastore".into(),
            spec.datastore.display().to_string(),
            "--log-listen".into(),
            format!("{}:{}", cfg.log_ip, spec.log_port),
        ];
        if let Some(uplink) = &cfg.vm_uplink {
            args.extend(["--uplink".into(), uplink.clone()]);
        }
        for peer in &cfg.vm_peers {
            args.extend(["--uplink-peer".into(), peer.to_string()]);
        }
        if let Some(ms) = cfg.health_hold_ms {
            args.extend(["--health-hold-ms".into(), ms.to_string()]);
        }
        if cfg.no_health_handover {
            args.push("--no-health-handover".into());
        }
        match role {
            Role::Primary => {
                args.extend(["--memory-mib".into(), spec.memory_mib.to_string()]);
                if let Some(nic) = &spec.nic {
                    args.extend([
                        "--nic".into(),
                        format!("bridge={},mac={},ip={}", cfg.vm_bridge, nic.mac, nic.ip),
                    ]);
                }
                for p in &spec.listen {
                    args.extend(["--listen".into(), format!("tcp:{p}")]);
                }
                for a in &spec.args {
                    args.push(format!("--arg={a}"));
                }
                for e in &spec.env {
                    // One argument: a value starting with '-' stays a value.
                    args.push(format!("--env={e}"));
                }
            }
            Role::Secondary => {
                args.extend([
                    "--primary".into(),
                    format!("{}:{}", primary_ip.unwrap_or_default(), spec.log_port),
                    "--bridge".into(),
                    cfg.vm_bridge.clone(),
                    "--wait-secs".into(),
                    "30".into(),
                ]);
            }
        }
        let log = cfg.state_dir.join(format!("{}.{id}.log", spec.name));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&cfg.exe);
        cmd.args(&args).stdin(Stdio::null()).stdout(out).stderr(err);
        // The copies' caches (instrumented modules, compiled code) on shared storage, unless
        // this agent was told otherwise: a copy started on another host (a new secondary, a
        // failover's re-protection, an HA restart) finds the module already instrumented and
        // compiled by the first, instead of spending seconds per MB of wasm on each.
        if std::env::var_os("TANDEM_CACHE_DIR").is_none() {
            cmd.env("TANDEM_CACHE_DIR", shared_cache(&cfg.shared));
        }
        let (mut writer, reader) = fence::pipe()?;
        // The copy's first deadline is the lease's, before it exists: a copy started late
        // in a renewal's life must not outlive it; none at all under a lease not current.
        let deadline = {
            let l = lock(&self.lease);
            if l.id != lease {
                return Err(std::io::Error::other("this host's lease changed meanwhile"));
            }
            l.renewed_ns + ISOLATED_AFTER.as_nanos() as u64
        };
        if deadline <= fence::monotonic_ns() {
            return Err(std::io::Error::other(
                "this host's lease is not known to be held",
            ));
        }
        writer.send(deadline);
        let reader_fd = std::os::fd::AsRawFd::as_raw_fd(&reader);
        cmd.args(["--fence-fd", &fence::FENCE_FD.to_string()]);
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // dup2(2), prctl(2) and getppid(2), which are async-signal-safe; it touches no
        // memory of the parent but the two integers copied into it.
        let agent = std::process::id() as libc::pid_t;
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                // The fence at a known descriptor (dup2 clears close-on-exec on it).
                if reader_fd == fence::FENCE_FD {
                    if libc::fcntl(reader_fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(reader_fd, fence::FENCE_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent died between fork and prctl: the signal will never come.
                if libc::getppid() != agent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(reader);
        lock(&self.fences).by_copy.insert(id, (lease, writer));
        Ok(Running {
            vm: spec.name.clone(),
            id,
            role,
            child,
            exit: None,
            samples: VecDeque::new(),
            log_bytes: (Instant::now(), 0),
            io_bytes: (Instant::now(), 0, 0),
            reported: None,
            log,
            live_base: None,
        })
    }

    /// What a copy is doing, from its process and the status files on shared storage.
    fn report(&self, c: &mut Running) -> CopyReport {
        let dir = lockstep::VmDir::new(&self.cfg.shared, &c.vm);
        // A copy names itself `hostname/pid` in the status files.
        let me = format!("{}/{}", self.hostname, c.child.id());
        let pid = c.child.id();
        let mine = |f: &BTreeMap<String, String>| f.get("host").is_some_and(|h| *h == me);
        let status = read_fields(&dir.status());
        let live = c.exit.is_none() && mine(&status);
        // The guest's own end, as this copy recorded it while live.
        let guest_exit = (c.exit.is_some() && mine(&status))
            .then(|| status.get("exit").cloned())
            .flatten();
        let secondary = read_fields(&dir.secondary_status());
        let running =
            live || (mine(&secondary) && secondary.get("role").is_some_and(|r| r == "secondary"));
        // The live copy's reasons, bounded (they end up in every report and view).
        let why = |k: &str| {
            live.then(|| status.get(k))
                .flatten()
                .map(|w| w.chars().take(MAX_REASON).collect::<String>())
        };
        let num = |k: &str| {
            status
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (events, acked, log_bytes) = if live {
            (num("events"), num("acked"), num("log_bytes"))
        } else {
            (0, 0, 0)
        };
        let now = Instant::now();
        let (disk_read_bytes, net_in_bytes) = if live {
            (num("disk_read_bytes"), num("net_in_bytes"))
        } else {
            (0, 0)
        };
        let (mut disk_read_avg_bps, mut net_in_avg_bps) = (0, 0);
        if live {
            let (since, disk0, net0) =
                *c.live_base
                    .get_or_insert((now, disk_read_bytes, net_in_bytes));
            let secs = now.duration_since(since).as_secs_f64();
            if secs >= 1.0 {
                disk_read_avg_bps = (disk_read_bytes.saturating_sub(disk0) as f64 / secs) as u64;
                net_in_avg_bps = (net_in_bytes.saturating_sub(net0) as f64 / secs) as u64;
            }
        }
        let mut lag_ms = 0;
        if live {
            c.samples.push_back((now, events));
            while c.samples.len() > 100 {
                c.samples.pop_front();
            }
            // The age of the oldest sample the secondary has not acknowledged yet.
            if let Some((at, _)) = c.samples.iter().find(|(_, e)| *e > acked) {
                lag_ms = now.duration_since(*at).as_millis() as u64;
            }
        }
        let (at, before) = c.log_bytes;
        let dt = now.duration_since(at).as_secs_f64();
        let log_bps = if dt > 0.0 && log_bytes >= before {
            ((log_bytes - before) as f64 / dt) as u64
        } else {
            0
        };
        if dt >= 1.0 {
            c.log_bytes = (now, log_bytes);
        }
        // The sizing formula's inputs, as rates over the same kind of window.
        let (disk, net) = if live {
            (num("disk_read_bytes"), num("net_in_bytes"))
        } else {
            (0, 0)
        };
        let (io_at, disk_before, net_before) = c.io_bytes;
        let io_dt = now.duration_since(io_at).as_secs_f64();
        let rate = |now_v: u64, before: u64| {
            if io_dt > 0.0 && now_v >= before {
                ((now_v - before) as f64 / io_dt) as u64
            } else {
                0
            }
        };
        let (disk_read_bps, net_in_bps) = (rate(disk, disk_before), rate(net, net_before));
        if io_dt >= 1.0 {
            c.io_bytes = (now, disk, net);
        }
        CopyReport {
            vm: c.vm.clone(),
            id: c.id,
            role: c.role,
            pid,
            state: if c.exit.is_some() {
                CopyState::Exited
            } else if running {
                CopyState::Running
            } else {
                CopyState::Starting
            },
            live,
            protected: live && status.get("protected").is_some_and(|p| p == "true"),
            guest_exit,
            events,
            acked,
            lag_ms,
            log_bytes,
            log_bps,
            outputs_held: if live { num("outputs_held") } else { 0 },
            outputs_held_total: if live { num("outputs_held_total") } else { 0 },
            disk_read_bps,
            net_in_bps,
            exit: c.exit.clone(),
            last_error: c.exit.as_ref().and_then(|_| last_error(&c.log)),
            disk_read_bytes,
            net_in_bytes,
            disk_read_avg_bps,
            net_in_avg_bps,
            unprotected_why: why("unprotected_why"),
            host_lost: why("host_lost"),
            went_live: why("went_live"),
        }
    }
}

/// The longest reason from a status file carried in a copy's report.
const MAX_REASON: usize = 300;

/// Stop a copy: SIGTERM (a primary stops its VM cleanly, a secondary leaves), then SIGKILL.
fn stop_copy(c: &mut Running) {
    if c.exit.is_some() {
        return;
    }
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) };
    for _ in 0..100 {
        if let Ok(Some(s)) = c.child.try_wait() {
            c.exit = Some(describe(s));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.child.kill();
    c.exit = c.child.wait().ok().map(describe);
}

/// The last non-empty line of a copy's log (at most its last 4 KiB read, 300 characters kept).
fn last_line(log: &std::path::Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut tail = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = f.take(4096).read_to_end(&mut tail);
    }
    let text = String::from_utf8_lossy(&tail);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty log)");
    line.trim().chars().take(300).collect()
}

fn describe(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(fence::FENCED_EXIT), _) => format!(
            "exit {} (fenced: its host's lease was not renewed in time)",
            fence::FENCED_EXIT
        ),
        (Some(c), _) => format!("exit {c}"),
        (_, Some(sig)) => format!("signal {sig}"),
        _ => "ended".into(),
    }
}

/// `key=value` lines (a missing or torn file is empty).
fn read_fields(path: &Path) -> BTreeMap<String, String> {
    use std::io::Read;
    // A status file is a dozen short lines: read no more than that could be.
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(64 * 1024).read_to_string(&mut text);
    }
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The last warning or error a copy logged (its log is ours, bounded by reading its tail).
fn last_error(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)))
        .ok()?;
    let mut tail = String::new();
    f.take(16 * 1024).read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .find(|l| l.contains("ERROR") || l.contains("WARN") || l.starts_with("tandem:"))
        .map(|l| l.chars().take(300).collect())
}

/// Keep the lease alive; if it expired (the host was cut off too long), register again
/// under a new one.
fn renew(
    slow_store: &Store,
    lease: &Mutex<Lease>,
    stop: &AtomicBool,
    cfg: &AgentConfig,
    peers: &Mutex<Option<LogReach>>,
    fences: &Mutex<Fences>,
) {
    let store = &slow_store.with_timeout(RENEW_TIMEOUT);
    let mut next = Instant::now() + RENEW_EVERY;
    while !stop.load(Ordering::Relaxed) {
        // A fixed schedule from the sends: a slow answer does not push the next one back.
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next = Instant::now() + RENEW_EVERY;
        let id = lock(lease).id;
        let (sent, sent_ns) = (Instant::now(), fence::monotonic_ns());
        match store.keepalive(id) {
            Ok(_) => {
                let mut l = lock(lease);
                l.renewed = sent;
                l.renewed_ns = sent_ns;
            }
            Err(StoreError::LeaseExpired) => {
                // Every copy of the old lease ends now (closing its fence), before this
                // host is registered again.
                lock(fences).by_copy.clear();
                tracing::warn!("this host's lease expired; its copies stopped; registering again");
                let again = store.grant(LEASE_TTL_SECS).and_then(|id| {
                    let rec = Agent::record(cfg, lock(peers).clone(), id);
                    let bytes =
                        serde_json::to_vec(&rec).map_err(|e| StoreError::Decode(e.to_string()))?;
                    Ok((
                        id,
                        store.create(&model::host_key(&cfg.name), &bytes, Some(id))?,
                    ))
                });
                match again {
                    Ok((id, true)) => {
                        let mut l = lock(lease);
                        l.id = id;
                        l.renewed = sent;
                        l.renewed_ns = sent_ns;
                    }
                    Ok((id, false)) => {
                        // Another agent took this host's name meanwhile (this one was
                        // stopped or cut off): it is that one's host now.
                        let _ = store.revoke(id);
                        tracing::error!(
                            "another agent registered host {} meanwhile; this one exits",
                            cfg.name
                        );
                        std::process::exit(1);
                    }
                    Err(e) => tracing::warn!("cannot register again: {e}"),
                }
            }
            Err(e) => tracing::debug!("lease renewal failed: {e}"),
        }
    }
}

/// Take part in the election; while master, reconcile.
fn run_master(store: &Store, lease: &Mutex<Lease>, stop: &AtomicBool, name: &str) {
    let mut master = Master::default();
    let mut was = false;
    while !stop.load(Ordering::Relaxed) {
        let (id, fresh) = {
            let l = lock(lease);
            (l.id, l.renewed.elapsed() < ISOLATED_AFTER)
        };
        let is = fresh && master::elect(store, name, id).unwrap_or(false);
        if is != was {
            if is {
                tracing::info!("{name} is the HA master now");
                master = Master::default();
            } else {
                tracing::warn!("{name} is no longer the HA master");
            }
            was = is;
        }
        if is {
            match master.reconcile(store) {
                Ok(said) => {
                    for s in said {
                        tracing::info!("master: {s}");
                    }
                }
                Err(e) => tracing::warn!("master: {e}"),
            }
        }
        std::thread::sleep(master::PERIOD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    /// How long after `t` the next probe is due (in 50 ms steps; at most 10 s).
    fn wait_of(due: &ProbeDue, names: &[String], t: Instant) -> Duration {
        let mut wait = Duration::ZERO;
        while !due.now(names, t + wait) {
            wait += Duration::from_millis(50);
            assert!(wait < Duration::from_secs(10), "never due");
        }
        wait
    }

    #[test]
    fn the_logging_network_is_probed_soon_after_a_miss_and_at_once_on_a_new_host() {
        let t0 = Instant::now();
        let mut due = ProbeDue::default();
        assert!(due.now(&names(&["h2"]), t0), "the first look probes");
        // All reached: the slow round.
        due.probed(names(&["h2"]), &names(&["h2"]), t0);
        assert!(!due.now(&names(&["h2"]), t0 + PROBE_EVERY / 2));
        assert!(due.now(&names(&["h2"]), t0 + PROBE_EVERY));
        // A host registers: probed at the next look, not after the slow round.
        assert!(due.now(&names(&["h2", "h3"]), t0 + PROBE_LOOK_EVERY));
        // It does not answer yet: again soon, then less and less often, never beyond
        // the slow round.
        let mut t = t0;
        let mut waits = vec![];
        for _ in 0..6 {
            due.probed(names(&["h2", "h3"]), &names(&["h2"]), t);
            let wait = wait_of(&due, &names(&["h2", "h3"]), t);
            waits.push(wait);
            t += wait;
        }
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 2000, 2000].map(Duration::from_millis)
        );
        // h3 stays cut off; h4 registers and is missed too: soon again, not after the
        // slow round h3 earned.
        let three = names(&["h2", "h3", "h4"]);
        assert!(due.now(&three, t));
        due.probed(three.clone(), &names(&["h2"]), t);
        assert_eq!(wait_of(&due, &three, t), PROBE_LOOK_EVERY);
        // A host reached before and missed now is news too.
        due.probed(three.clone(), &names(&["h4"]), t);
        assert_eq!(wait_of(&due, &three, t), PROBE_LOOK_EVERY);
        due.probed(three.clone(), &names(&["h4"]), t);
        assert_eq!(wait_of(&due, &three, t), 2 * PROBE_LOOK_EVERY);
        // What it found could not be recorded: probed at the next look; failing again, on
        // the usual schedule; recorded at last, the next failure is retried at once again.
        due.unrecorded();
        assert!(due.now(&three, t));
        due.probed(three.clone(), &names(&["h4"]), t);
        due.unrecorded();
        assert!(!due.now(&three, t));
        due.recorded();
        due.unrecorded();
        assert!(due.now(&three, t));
        // Reached at last: the slow round again, and a later miss starts soon again.
        due.probed(names(&["h2", "h3"]), &names(&["h2", "h3"]), t);
        assert!(!due.now(&names(&["h2", "h3"]), t + PROBE_EVERY / 2));
        due.probed(names(&["h2", "h3"]), &names(&["h3"]), t);
        assert!(due.now(&names(&["h2", "h3"]), t + PROBE_LOOK_EVERY));
        assert!(!due.now(&names(&["h2", "h3"]), t + PROBE_LOOK_EVERY / 2));
        // A host leaves: probed at once too.
        assert!(due.now(&names(&["h3"]), t));
    }
}
