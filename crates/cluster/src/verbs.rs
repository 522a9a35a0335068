//! The verbs: every user action on the cluster, as the REST API calls them. A verb checks
//! its request, records desired state in the store (`vms/`, `kill/`) and returns; the
//! master and the agents carry it out. Nothing here runs a VM.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ClusterError;
use crate::master::View;

/// How long `destroy` waits for the copies of a VM powered off to stop.
const DESTROY_WAIT: Duration = Duration::from_secs(5);
use crate::model::{
    self, ClusterView, CopyState, FtMode, FtStatus, HostView, Nic, Power, Priority, VmRecord,
    VmSpec, VmView,
};
pub use crate::ops_verbs::ScheduleRequest;
use crate::placement::{self, Request};
use crate::store::Store;

/// `POST /api/v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub wasm: PathBuf,
    /// Default: `<shared>/<name>/datastore` (created).
    #[serde(default)]
    pub datastore: Option<PathBuf>,
    #[serde(default)]
    pub nic: Option<Nic>,
    #[serde(default)]
    pub listen: Vec<u16>,
    /// Default 256.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub restart_priority: Option<Priority>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// VM monitoring (default: 3 resets an hour, no heartbeat).
    #[serde(default)]
    pub monitoring: Option<crate::ops::Monitoring>,
}

/// The FT verbs (`POST /api/v1/vms/{name}/ft/{op}`).
#[derive(Clone, Debug, PartialEq)]
pub enum FtOp {
    TurnOn,
    TurnOff,
    Disable,
    Enable,
    TestFailover,
    RestartSecondary,
    MigrateSecondary { to: String },
}

/// The verbs, over one cluster store.
#[derive(Clone, Debug)]
pub struct Verbs {
    pub(crate) store: Store,
    /// The shared storage folder, as this host sees it.
    pub(crate) shared: PathBuf,
}

/// Bounds on what a VM may ask for.
const MAX_MEMORY_MIB: u64 = 4096;
const MAX_LISTEN: usize = 16;
const MAX_ARGS: usize = 64;
const MAX_ARG_BYTES: usize = 4096;
/// Logging-channel ports handed to VMs.
const LOG_PORTS: std::ops::RangeInclusive<u16> = 7100..=7999;
/// Kill requests for a copy that no agent carries out vanish after this long.
const KILL_TTL_SECS: i64 = 30;

fn invalid(s: impl Into<String>) -> ClusterError {
    ClusterError::Invalid(s.into())
}

fn check_name(what: &str, name: &str) -> Result<(), ClusterError> {
    if model::valid_name(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} name {name:?}: use 1-{} lowercase letters, digits and '-', not starting with '-'",
            model::MAX_NAME
        )))
    }
}

/// A MAC address, six hex pairs separated by ':'.
fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    let bytes: Vec<u8> = parts
        .iter()
        .filter(|p| p.len() == 2)
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    // Six octets, a unicast address (the multicast bit clear), not all zero.
    parts.len() == 6 && bytes.len() == 6 && bytes[0] & 1 == 0 && bytes.iter().any(|b| *b != 0)
}

fn valid_cidr(ip: &str) -> bool {
    ip.split_once('/').is_some_and(|(a, n)| {
        a.parse::<std::net::Ipv4Addr>().is_ok_and(|a| {
            !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast() && !a.is_loopback()
        }) && n.parse::<u8>().is_ok_and(|n| (8..=30).contains(&n))
    })
}

/// `path` is inside `root`, as the kernel resolves both (symbolic links followed).
pub(crate) fn inside(path: &std::path::Path, root: &std::path::Path) -> bool {
    match (path.canonicalize(), root.canonicalize()) {
        (Ok(p), Ok(r)) => p.starts_with(r),
        _ => false,
    }
}

impl Verbs {
    pub fn new(store: Store, shared: PathBuf) -> Self {
        Verbs { store, shared }
    }

    pub(crate) fn view(&self) -> Result<View, ClusterError> {
        let mut v = View::read(&self.store)?;
        for (_, c) in self
            .store
            .prefix_json::<crate::logcheck::LogCheck>(&format!("{}logcheck/", model::PREFIX))?
        {
            v.logchecks.insert((c.from.clone(), c.to.clone()), c);
        }
        Ok(v)
    }

    /// The store the verbs write (the API records its timeline events there).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn record(&self, name: &str) -> Result<(VmRecord, i64), ClusterError> {
        check_name("VM", name)?;
        self.store
            .get_json::<VmRecord>(&model::vm_key(name))?
            .ok_or_else(|| ClusterError::NotFound(format!("no VM named {name}")))
    }

    /// Change a VM's record with a compare-and-swap (a concurrent verb makes this one fail
    /// with a conflict rather than be lost).
    pub(crate) fn update(
        &self,
        name: &str,
        change: impl FnOnce(&mut VmRecord) -> Result<(), ClusterError>,
    ) -> Result<VmView, ClusterError> {
        let (mut rec, rev) = self.record(name)?;
        change(&mut rec)?;
        let bytes = serde_json::to_vec(&rec).map_err(|e| ClusterError::Internal(e.to_string()))?;
        if !self.store.put_if(&model::vm_key(name), &bytes, rev, None)? {
            return Err(ClusterError::Conflict(format!(
                "{name} changed while this request ran; try again"
            )));
        }
        self.vm(name)
    }

    pub fn status(&self) -> Result<ClusterView, ClusterError> {
        let v = self.view()?;
        let views = Self::views(&v);
        Ok(ClusterView {
            master: v.master.map(|m| m.host),
            hosts: v.hosts.len(),
            vms: views.len(),
            protected: views.iter().filter(|x| x.ft == FtStatus::Protected).count(),
            not_protected: views
                .iter()
                .filter(|x| x.ft == FtStatus::NotProtected)
                .count(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
    }

    pub fn hosts(&self) -> Result<Vec<HostView>, ClusterError> {
        Ok(host_views(&self.view()?))
    }

    fn views(v: &View) -> Vec<VmView> {
        v.vms.values().map(|r| Self::view_of(v, r)).collect()
    }

    pub(crate) fn view_of(v: &View, stored: &VmRecord) -> VmView {
        // While a schedule is set, FT is what it wants now.
        let r = &*crate::ops::effective(stored);
        let name = &r.spec.name;
        let p = v
            .places
            .get(name)
            .map(|(p, _)| p.clone())
            .unwrap_or_default();
        let primary = p.primary.as_ref().and_then(|c| v.report(name, c));
        let secondary = p.secondary.as_ref().and_then(|c| v.report(name, c));
        // The primary's word alone may be a second old: the secondary it counts on must be
        // the one placed, and running.
        let protected = primary.is_some_and(|c| c.live && c.protected)
            && secondary.is_some_and(|s| s.state == CopyState::Running)
            // A copy placed for a move (to another version) is not protection.
            && !p.moving;
        let ended = p.ended.as_ref().filter(|(boot, _)| *boot >= r.boots);
        let (ft, reason) = match r.ft {
            _ if ended.is_some() => (
                if r.ft == FtMode::Off {
                    FtStatus::Off
                } else {
                    FtStatus::NotProtected
                },
                ended.map(|(_, why)| format!("{why}; `vm power-on` starts it again")),
            ),
            // A VM that should run but has no primary says why (it cannot be placed).
            FtMode::Off if r.power == Power::On && p.primary.is_none() => (
                FtStatus::Off,
                Some(p.reason.clone().unwrap_or_else(|| "starting".into())),
            ),
            FtMode::Off => (FtStatus::Off, None),
            FtMode::Disabled => (FtStatus::Disabled, Some("FT is disabled".to_string())),
            FtMode::On if protected => (FtStatus::Protected, None),
            FtMode::On => {
                let why = if r.power == Power::Off {
                    "the VM is powered off".to_string()
                } else if let Some(s) = secondary.filter(|s| s.state == CopyState::Exited) {
                    format!(
                        "the secondary on {} ended ({})",
                        p.secondary.as_ref().map_or("?", |c| c.host.as_str()),
                        s.exit.clone().unwrap_or_default()
                    )
                } else if let Some(why) = primary.and_then(|c| c.unprotected_why.clone()) {
                    // The live copy's own word: the secondary runs, but its host lacks a
                    // path the VM needs ("the secondary's host lost its storage (...)").
                    why
                } else {
                    p.reason.clone().unwrap_or_else(|| "starting".into())
                };
                (FtStatus::NotProtected, Some(why))
            }
        };
        // A VM whose guest ended is off, whatever was last asked, until powered on again.
        let power = if ended.is_some() { Power::Off } else { r.power };
        VmView {
            name: name.clone(),
            power,
            ft,
            ft_reason: reason,
            primary_host: p.primary.as_ref().map(|c| c.host.clone()),
            secondary_host: p
                .secondary
                .as_ref()
                .map(|c| c.host.clone())
                .or(p.secondary_parked.clone()),
            lag_ms: primary.filter(|_| p.secondary.is_some()).map(|c| c.lag_ms),
            lag_events: primary
                .filter(|_| p.secondary.is_some())
                .map(|c| c.events.saturating_sub(c.acked)),
            log_bytes: primary.map(|c| c.log_bytes),
            log_bps: primary.map(|c| c.log_bps),
            restart_priority: r.spec.restart_priority,
            failovers: p.failovers,
            reprotections: p.reprotections,
            restarts: p.restarts,
            spec: r.spec.clone(),
            ops: crate::ops_verbs::ops_view(v, stored, r, &p, primary),
            events: primary.map(|c| c.events),
            outputs_held: primary.map(|c| c.outputs_held),
            outputs_held_total: primary.map(|c| c.outputs_held_total),
            disk_read_bps: primary.map(|c| c.disk_read_bps),
            net_in_bps: primary.map(|c| c.net_in_bps),
            reprotect_ms: p.last_reprotect_ms,
        }
    }

    pub fn vms(&self) -> Result<Vec<VmView>, ClusterError> {
        Ok(Self::views(&self.view()?))
    }

    pub fn vm(&self, name: &str) -> Result<VmView, ClusterError> {
        check_name("VM", name)?;
        let v = self.view()?;
        let r = v
            .vms
            .get(name)
            .ok_or_else(|| ClusterError::NotFound(format!("no VM named {name}")))?;
        Ok(Self::view_of(&v, r))
    }

    pub fn create(&self, req: CreateVm) -> Result<VmView, ClusterError> {
        check_name("VM", &req.name)?;
        if !req.wasm.is_absolute() || !req.wasm.is_file() {
            return Err(invalid(format!(
                "--wasm {}: not a file (give an absolute path every host can read)",
                req.wasm.display()
            )));
        }
        let datastore = match req.datastore {
            Some(d) => self.check_datastore(&req.name, &d)?,
            None => {
                let d = self.own_folder(&req.name)?.join("datastore");
                if std::fs::symlink_metadata(&d).is_err() {
                    std::fs::create_dir(&d).map_err(|e| {
                        ClusterError::Internal(format!("create {}: {e}", d.display()))
                    })?;
                }
                self.check_datastore(&req.name, &d)?
            }
        };
        if let Some(m) = &req.monitoring {
            m.check().map_err(invalid)?;
        }
        let memory_mib = req.memory_mib.unwrap_or(256);
        if memory_mib == 0 || memory_mib > MAX_MEMORY_MIB {
            return Err(invalid(format!(
                "--memory-mib {memory_mib} is outside 1..={MAX_MEMORY_MIB}"
            )));
        }
        if let Some(nic) = &req.nic {
            if !valid_mac(&nic.mac) {
                return Err(invalid(format!(
                    "NIC mac {:?}: use six hex pairs, e.g. 02:00:00:00:00:0a",
                    nic.mac
                )));
            }
            if !valid_cidr(&nic.ip) {
                return Err(invalid(format!(
                    "NIC ip {:?}: use IPv4 CIDR, e.g. 10.77.0.10/24",
                    nic.ip
                )));
            }
        }
        if req.listen.len() > MAX_LISTEN {
            return Err(invalid(format!("at most {MAX_LISTEN} --listen ports")));
        }
        if !req.listen.is_empty() && req.nic.is_none() {
            return Err(invalid("--listen needs --nic"));
        }
        if req.listen.contains(&0) {
            return Err(invalid("--listen port 0 is not a port"));
        }
        if req.args.len() + req.env.len() > MAX_ARGS
            || req
                .args
                .iter()
                .chain(&req.env)
                .any(|a| a.len() > MAX_ARG_BYTES || a.contains('\0'))
        {
            return Err(invalid(format!(
                "at most {MAX_ARGS} arguments and variables, each at most {MAX_ARG_BYTES} bytes, no NUL"
            )));
        }
        if let Some(e) = req
            .env
            .iter()
            .find(|e| !e.contains('=') || e.starts_with('='))
        {
            return Err(invalid(format!("--env {e:?}: use K=V")));
        }
        let v = self.view()?;
        if let Some(nic) = &req.nic {
            let ip = nic.ip.split('/').next().unwrap_or_default();
            for o in v.vms.values().filter(|o| o.spec.name != req.name) {
                if let Some(on) = &o.spec.nic
                    && (on.mac.eq_ignore_ascii_case(&nic.mac)
                        || on.ip.split('/').next() == Some(ip))
                {
                    return Err(ClusterError::Conflict(format!(
                        "VM {} already has MAC {} / address {}",
                        o.spec.name, on.mac, on.ip
                    )));
                }
            }
        }
        for o in v.vms.values().filter(|o| o.spec.name != req.name) {
            let theirs = o
                .spec
                .datastore
                .canonicalize()
                .unwrap_or(o.spec.datastore.clone());
            if theirs.starts_with(&datastore) || datastore.starts_with(&theirs) {
                return Err(ClusterError::Conflict(format!(
                    "--datastore {}: VM {} uses {} (a datastore belongs to one VM)",
                    datastore.display(),
                    o.spec.name,
                    o.spec.datastore.display()
                )));
            }
        }
        // The logging port is reserved in the store, so that two VMs created at once
        // never get the same one.
        let mut log_port = None;
        for port in LOG_PORTS {
            if self
                .store
                .create(&model::port_key(port), req.name.as_bytes(), None)?
            {
                log_port = Some(port);
                break;
            }
        }
        let log_port = log_port.ok_or_else(|| {
            ClusterError::Conflict("every logging port is taken: too many VMs".into())
        })?;
        let rec = VmRecord {
            spec: VmSpec {
                name: req.name.clone(),
                wasm: req.wasm,
                datastore,
                nic: req.nic,
                listen: req.listen,
                memory_mib,
                restart_priority: req.restart_priority.unwrap_or_default(),
                args: req.args,
                env: req.env,
                log_port,
            },
            power: Power::Off,
            ft: FtMode::Off,
            want_host: None,
            secondary_to: None,
            boots: 0,
            ops: crate::ops::VmOps {
                monitoring: req.monitoring.unwrap_or_default(),
                ft_schedule: None,
            },
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| ClusterError::Internal(e.to_string()))?;
        if !self.store.create(&model::vm_key(&req.name), &bytes, None)? {
            self.store.delete(&model::port_key(log_port))?;
            return Err(ClusterError::Conflict(format!(
                "a VM named {} already exists",
                req.name
            )));
        }
        tracing::info!("created VM {}", req.name);
        self.vm(&req.name)
    }

    /// The VM's own folder on shared storage, `<shared>/<name>`, made if missing: a real
    /// folder (never a symbolic link), exactly where the kernel resolves it to be.
    fn own_folder(&self, name: &str) -> Result<PathBuf, ClusterError> {
        let shared = self.shared.canonicalize().map_err(|e| {
            ClusterError::Internal(format!("shared storage {}: {e}", self.shared.display()))
        })?;
        let own = shared.join(name);
        match std::fs::symlink_metadata(&own) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(invalid(format!(
                    "{} is not a folder (a link or a file): the VM's folder must be a real folder",
                    own.display()
                )));
            }
            Err(_) => std::fs::create_dir(&own)
                .map_err(|e| ClusterError::Internal(format!("create {}: {e}", own.display())))?,
        }
        if own.canonicalize().ok().as_deref() != Some(own.as_path()) {
            return Err(invalid(format!(
                "{} does not resolve to itself",
                own.display()
            )));
        }
        Ok(own)
    }

    /// A datastore a guest may be given: an existing folder, as the kernel resolves it,
    /// inside the VM's own folder on shared storage (not its FT state). Anything else would
    /// hand the guest a folder of the host or of another VM. The path kept is the resolved
    /// one, and agents check again that it still resolves to itself before each start.
    fn check_datastore(&self, name: &str, d: &std::path::Path) -> Result<PathBuf, ClusterError> {
        let own = self.own_folder(name)?;
        let refuse = |why: &str| {
            invalid(format!(
                "--datastore {}: {why}; a datastore is a folder inside {}/ (on shared storage)",
                d.display(),
                own.display(),
            ))
        };
        if !d.is_absolute() {
            return Err(refuse("not an absolute path"));
        }
        let real = d.canonicalize().map_err(|e| refuse(&e.to_string()))?;
        if !real.is_dir() {
            return Err(refuse("not a folder"));
        }
        match real
            .strip_prefix(&own)
            .ok()
            .and_then(|r| r.components().next())
        {
            Some(std::path::Component::Normal(first))
                if !matches!(first.to_str(), Some("checkpoints" | "arbitration")) =>
            {
                Ok(real)
            }
            _ => Err(refuse(
                "not inside the VM's own folder (or it is its FT state)",
            )),
        }
    }

    pub fn power_on(&self, name: &str, host: Option<String>) -> Result<VmView, ClusterError> {
        if let Some(h) = &host {
            check_name("host", h)?;
            if self.store.get(&model::host_key(h))?.is_none() {
                return Err(ClusterError::NotFound(format!(
                    "no connected host named {h}"
                )));
            }
        }
        self.update(name, |r| {
            r.power = Power::On;
            r.want_host = host;
            r.boots += 1;
            Ok(())
        })
    }

    pub fn power_off(&self, name: &str) -> Result<VmView, ClusterError> {
        self.update(name, |r| {
            r.power = Power::Off;
            Ok(())
        })
    }

    pub fn destroy(&self, name: &str) -> Result<(), ClusterError> {
        let powered_on =
            || ClusterError::Conflict(format!("{name} is powered on: power it off first"));
        let (rec, _) = self.record(name)?;
        if rec.power == Power::On {
            return Err(powered_on());
        }
        // A copy of a VM just powered off reports until its agent has stopped it (an agent
        // tick, and the copy's own stop): `power-off` then `destroy` at once waits that out
        // here rather than fail.
        let deadline = Instant::now() + DESTROY_WAIT;
        while self.view()?.copies.keys().any(|(_, vm)| vm == name) {
            if Instant::now() >= deadline {
                return Err(ClusterError::Conflict(format!(
                    "{name}'s copies are still stopping after {} s (is a host not responding?): \
                     try again once they stopped",
                    DESTROY_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Deleted only as it was read now: powered on meanwhile (its copies starting
        // again) or changed by another verb, it is refused, never deleted under them.
        let (now, rev) = self.record(name)?;
        if now.power == Power::On {
            return Err(powered_on());
        }
        // A `false` after an ambiguous retry may be our own delete (see `store`): then the
        // record is gone, and that is done.
        let key = model::vm_key(name);
        if !self.store.delete_if(&key, rev)? && self.store.get(&key)?.is_some() {
            return Err(ClusterError::Conflict(format!(
                "{name} changed while it was being destroyed: look again and retry"
            )));
        }
        self.store.delete(&model::port_key(now.spec.log_port))?;
        tracing::info!("destroyed VM {name}");
        Ok(())
    }

    /// The FT requirements for a VM (DESIGN.md, "Lifecycle": turn on FT): its datastore on
    /// shared storage, and a compatible second host with room.
    fn ft_requirements(&self, r: &VmRecord, v: &View) -> Result<(), ClusterError> {
        if !inside(&r.spec.datastore, &self.shared) {
            return Err(ClusterError::Conflict(format!(
                "cannot turn FT on for {}: its datastore {} is not on shared storage ({})",
                r.spec.name,
                r.spec.datastore.display(),
                self.shared.display()
            )));
        }
        let loads = v.loads();
        let p = v
            .places
            .get(&r.spec.name)
            .map(|(p, _)| p.clone())
            .unwrap_or_default();
        let primary_host = p.primary.as_ref().map(|c| c.host.clone());
        // Where the primary is (or would be), then whether a secondary fits beside it.
        let phost = match primary_host {
            Some(h) => h,
            None => placement::place(
                &loads,
                &Request {
                    any_version: false,
                    vm: r,
                    ft: true,
                    primary: None,
                    prefer: r.want_host.as_deref(),
                    avoid: &[],
                    counted_on: None,
                },
            )
            .map_err(|why| {
                ClusterError::Conflict(format!("cannot turn FT on for {}: {why}", r.spec.name))
            })?,
        };
        let Some(prec) = v.hosts.get(&phost) else {
            return Err(ClusterError::Conflict(format!(
                "cannot turn FT on for {}: its primary's host {phost} is not connected",
                r.spec.name
            )));
        };
        placement::place(
            &loads,
            &Request {
                any_version: false,
                vm: r,
                ft: true,
                primary: Some(prec),
                prefer: None,
                avoid: &[],
                counted_on: p.secondary_parked.as_deref(),
            },
        )
        .map(|_| ())
        .map_err(|why| {
            ClusterError::Conflict(format!("cannot turn FT on for {}: {why}", r.spec.name))
        })
    }

    /// `host maintenance enter`: the host takes nothing more and the master moves what it
    /// holds (see `master`). Refused, with every reason, when the other hosts cannot take
    /// what it holds, or when an FT VM on it is not protected (a switch would lose it).
    pub fn enter_maintenance(&self, host: &str) -> Result<HostView, ClusterError> {
        check_name("host", host)?;
        let mut v = self.view()?;
        if !v.hosts.contains_key(host) {
            return Err(ClusterError::NotFound(format!(
                "no connected host named {host}"
            )));
        }
        if !v.maintenance.contains(host) {
            if let Some(h) = v.hosts.get_mut(host) {
                h.maintenance = true;
            }
            let why = Self::evacuation_blockers(&v, host);
            if !why.is_empty() {
                return Err(ClusterError::Conflict(format!(
                    "{host} cannot enter maintenance: {}",
                    why.join("; ")
                )));
            }
            let rec = model::MaintenanceRecord {
                since_ms: model::now_ms(),
            };
            let bytes =
                serde_json::to_vec(&rec).map_err(|e| ClusterError::Internal(e.to_string()))?;
            self.store
                .put(&model::maintenance_key(host), &bytes, None)?;
            tracing::warn!("{host} enters maintenance: its VMs move to other hosts");
        }
        self.host(host)
    }

    /// `host maintenance exit`: the host takes copies again.
    pub fn exit_maintenance(&self, host: &str) -> Result<HostView, ClusterError> {
        check_name("host", host)?;
        self.store.delete(&model::maintenance_key(host))?;
        tracing::info!("{host} leaves maintenance");
        self.host(host)
    }

    fn host(&self, host: &str) -> Result<HostView, ClusterError> {
        self.hosts()?
            .into_iter()
            .find(|h| h.name == host)
            .ok_or_else(|| ClusterError::NotFound(format!("no connected host named {host}")))
    }

    /// Why the VMs on `host` (already marked in maintenance in `v`) could not all move.
    /// The same rules as the master's: a copy an FT pair needs goes to a host of its
    /// version; failing that, the VM moves to hosts of another version (same engine) that
    /// can re-protect it; a VM without FT moves to any host.
    fn evacuation_blockers(v: &View, host: &str) -> Vec<String> {
        let mut loads = v.loads();
        let mut why = Vec::new();
        // Place one copy (and count it), or say why not.
        let fit = |loads: &mut Vec<placement::HostLoad>,
                   r: &VmRecord,
                   from: &model::HostRecord,
                   any_version: bool,
                   avoid: &[String]|
         -> Result<String, String> {
            let to = placement::place(loads, &Request::secondary(r, from, any_version, avoid))?;
            if let Some(l) = loads.iter_mut().find(|l| l.host.name == to) {
                l.copies += 1;
                l.ft_copies += 1;
                l.reserved_mib += r.spec.memory_mib;
            }
            Ok(to)
        };
        for (name, (p, _)) in &v.places {
            let Some(r) = v.vms.get(name) else { continue };
            let on = |c: &Option<model::Copy>| c.as_ref().is_some_and(|c| c.host == host);
            let primary = p.primary.as_ref().and_then(|c| v.hosts.get(&c.host));
            let secondary = p.secondary.as_ref().and_then(|c| v.hosts.get(&c.host));
            if !on(&p.primary) && !on(&p.secondary) {
                continue;
            }
            let Some(ph) = primary else { continue };
            if r.ft != FtMode::On {
                if on(&p.primary)
                    && let Err(e) = fit(&mut loads, r, ph, true, &[])
                {
                    why.push(format!("no host to move {name}: {e}"));
                }
                continue;
            }
            let view = Self::view_of(v, r);
            if on(&p.primary) && view.ft != FtStatus::Protected {
                why.push(format!(
                    "{name} is not protected{}: a switch would lose it",
                    view.ft_reason
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ));
                continue;
            }
            let Some(sh) = secondary else { continue };
            let place = |from: &model::HostRecord, any_version: bool, avoid: &[String]| {
                fit(&mut loads, r, from, any_version, avoid)
            };
            if let Err(e) = placement::plan_pair(&v.hosts, ph, sh, on(&p.primary), place) {
                let what = if on(&p.primary) {
                    "no host for the new secondary of"
                } else {
                    "no host for the secondary of"
                };
                why.push(format!("{what} {name}: {e}"));
            }
        }
        why
    }

    fn kill(&self, vm: &str, id: u64) -> Result<(), ClusterError> {
        let lease = self.store.grant(KILL_TTL_SECS)?;
        self.store.put(&model::kill_key(vm, id), b"", Some(lease))?;
        Ok(())
    }

    pub fn ft(&self, name: &str, op: FtOp) -> Result<VmView, ClusterError> {
        let (rec, _) = self.record(name)?;
        let v = self.view()?;
        let p = v
            .places
            .get(name)
            .map(|(p, _)| p.clone())
            .unwrap_or_default();
        let conflict = |s: String| Err(ClusterError::Conflict(s));
        if let Some(s) = &rec.ops.ft_schedule
            && matches!(
                op,
                FtOp::TurnOn | FtOp::TurnOff | FtOp::Disable | FtOp::Enable
            )
        {
            return conflict(format!(
                "FT of {name} follows its schedule (on {:?}): `tandem ft schedule {name} --clear` first",
                s.on
            ));
        }
        match op {
            FtOp::TurnOn => {
                if rec.ft == FtMode::On {
                    return self.vm(name);
                }
                self.ft_requirements(&rec, &v)?;
                let view = self.update(name, |r| {
                    r.ft = FtMode::On;
                    Ok(())
                })?;
                if let Some(w) = &view.ops.logging_warning {
                    tracing::warn!("ft turn-on {name}: {w}");
                }
                Ok(view)
            }
            FtOp::TurnOff => self.update(name, |r| {
                r.ft = FtMode::Off;
                r.secondary_to = None;
                Ok(())
            }),
            FtOp::Disable => {
                if rec.ft != FtMode::On {
                    return conflict(format!("FT is not on for {name}: nothing to disable"));
                }
                self.update(name, |r| {
                    r.ft = FtMode::Disabled;
                    Ok(())
                })
            }
            FtOp::Enable => {
                if rec.ft != FtMode::Disabled {
                    return conflict(format!("FT is not disabled for {name}: use `ft turn-on`"));
                }
                self.update(name, |r| {
                    r.ft = FtMode::On;
                    Ok(())
                })
            }
            FtOp::TestFailover => {
                let view = Self::view_of(&v, &rec);
                if view.ft != FtStatus::Protected {
                    let why = view
                        .ft_reason
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default();
                    return conflict(format!(
                        "{name} is not protected{why}: a test failover would lose it"
                    ));
                }
                let c = p.primary.expect("protected implies a primary");
                self.kill(name, c.id)?;
                tracing::warn!("test failover of {name}: killing its primary on {}", c.host);
                Ok(view)
            }
            FtOp::RestartSecondary => {
                let Some(c) = p.secondary else {
                    return conflict(format!("{name} has no running secondary"));
                };
                // Between a failover and the master's next look, the placed secondary is
                // the live copy: never kill that one.
                if v.report(name, &c).is_some_and(|r| r.live) {
                    return conflict(format!(
                        "the secondary of {name} on {} just went live; try again",
                        c.host
                    ));
                }
                self.kill(name, c.id)?;
                tracing::warn!("restarting the secondary of {name} on {}", c.host);
                self.vm(name)
            }
            FtOp::MigrateSecondary { to } => {
                check_name("host", &to)?;
                if rec.ft != FtMode::On {
                    return conflict(format!("FT is not on for {name}"));
                }
                let Some(h) = v.hosts.get(&to) else {
                    return Err(ClusterError::NotFound(format!(
                        "no connected host named {to}"
                    )));
                };
                if p.primary.as_ref().is_some_and(|c| c.host == to) {
                    return conflict(format!(
                        "{to} runs the primary of {name}: the secondary must be on another host"
                    ));
                }
                if p.secondary.as_ref().is_some_and(|c| c.host == to) {
                    return self.vm(name);
                }
                if let Some(prec) = p.primary.as_ref().and_then(|c| v.hosts.get(&c.host)) {
                    let loads = v.loads();
                    let req = Request {
                        any_version: false,
                        vm: &rec,
                        ft: true,
                        primary: Some(prec),
                        prefer: Some(&h.name),
                        avoid: &[],
                        counted_on: None,
                    };
                    let got = placement::place(&loads, &req).map_err(ClusterError::Conflict)?;
                    if got != to {
                        return conflict(format!("{to} cannot take the secondary of {name}"));
                    }
                }
                self.update(name, |r| {
                    r.secondary_to = Some(to);
                    Ok(())
                })
            }
        }
    }
}

/// The hosts as `host list` and the dashboard show them: every registered host, and each
/// host without a lease that copies are still placed on or that is in maintenance (not
/// responding), so a host that died does not just vanish from the list.
pub fn host_views(v: &View) -> Vec<HostView> {
    let master = v.master.as_ref().map(|m| m.host.clone());
    let mut hosts: Vec<HostView> = v
        .loads()
        .into_iter()
        .map(|l| HostView {
            master: master.as_deref() == Some(l.host.name.as_str()),
            state: match (l.host.maintenance, l.copies) {
                (false, _) => "connected",
                (true, 0) => "in maintenance",
                (true, _) => "entering maintenance",
            }
            .into(),
            name: l.host.name,
            version: l.host.version,
            fingerprint: l.host.fingerprint,
            ft_vms: l.ft_copies,
            vms: l.copies,
            maintenance: l.host.maintenance,
            memory_mib: l.host.memory_mib,
            memory_reserved_mib: l.reserved_mib,
            api: l.host.api,
            log_peers: l.host.log_peers,
        })
        .collect();
    // A host whose agent lost its lease is still named by the copies placed on it
    // (until the master moves them) or by its maintenance record: shown as not
    // responding rather than vanishing from the list.
    let placed = v.places.values().flat_map(|(p, _)| {
        [p.primary.as_ref(), p.secondary.as_ref()]
            .into_iter()
            .flatten()
            .map(|c| c.host.clone())
    });
    let gone: BTreeSet<String> = placed
        .chain(v.maintenance.iter().cloned())
        .filter(|h| !v.hosts.contains_key(h))
        .collect();
    for name in gone {
        let copies = |ft: bool| {
            v.places
                .values()
                .filter(|(p, _)| {
                    (!ft || p.secondary.is_some())
                        && [p.primary.as_ref(), p.secondary.as_ref()]
                            .into_iter()
                            .flatten()
                            .any(|c| c.host == name)
                })
                .count()
        };
        hosts.push(HostView {
            master: false,
            state: model::NOT_RESPONDING.into(),
            version: String::new(),
            fingerprint: String::new(),
            ft_vms: copies(true),
            vms: copies(false),
            maintenance: v.maintenance.contains(&name),
            memory_mib: 0,
            memory_reserved_mib: 0,
            api: String::new(),
            log_peers: None,
            name,
        });
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_a_lease_that_copies_are_placed_on_is_listed_as_not_responding() {
        let mut v = View::default();
        for h in ["h1", "h2", "h3"] {
            let mut rec = crate::model::fixtures::host(h);
            rec.maintenance = h == "h3";
            v.hosts.insert(h.into(), rec);
        }
        v.maintenance.extend(["h3".to_string(), "h5".to_string()]);
        // kvd's primary on h1; its secondary on h4, whose agent lost its lease.
        let p = crate::model::fixtures::place_kvd(&mut v, "h1", "h4");
        v.places.insert("kvd".into(), (p, 1));
        let hosts = host_views(&v);
        let state = |n: &str| {
            hosts
                .iter()
                .find(|h| h.name == n)
                .map(|h| (h.state.clone(), h.responding(), h.ft_vms))
        };
        assert_eq!(state("h1"), Some(("connected".into(), true, 1)));
        assert_eq!(state("h2"), Some(("connected".into(), true, 0)));
        assert_eq!(state("h3"), Some(("in maintenance".into(), true, 0)));
        assert_eq!(state("h4"), Some(("not responding".into(), false, 1)));
        // In maintenance with no lease: still listed, so that its operator sees it.
        assert_eq!(state("h5"), Some(("not responding".into(), false, 0)));
        assert_eq!(hosts.len(), 5);
        // A host in maintenance with copies still on it is entering maintenance.
        v.hosts.get_mut("h1").unwrap().maintenance = true;
        v.maintenance.insert("h1".into());
        let hosts = host_views(&v);
        assert_eq!(
            hosts
                .iter()
                .find(|h| h.name == "h1")
                .map(|h| h.state.as_str()),
            Some("entering maintenance")
        );
    }
}
