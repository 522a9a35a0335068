//! The HA master: one agent, elected through the store, reconciles desired state (`vms/`)
//! with actual state (`hosts/`, `copies/`) by writing placements (`place/`).
//!
//! Election: the master key is created only if absent, under the agent's lease; the master
//! loses it when its lease expires (its host died or was cut off) and any other agent may
//! then take it. Every placement is written with a compare-and-swap on its revision, so a
//! master that lost its key without noticing cannot overwrite a newer master's decision.
//!
//! Invariants:
//! - a copy is started elsewhere only once the copy it replaces holds no report: a report is
//!   held under its host's lease, and an agent that cannot renew its lease stops its copies
//!   before the lease can expire (the agent's isolation response), so no VM runs twice;
//! - a secondary that went live (it won arbitration) becomes the primary at once, without
//!   waiting for the old primary's lease: arbitration already fenced the old primary;
//! - an FT VM is restarted from its datastore only when neither copy runs anywhere;
//! - VM monitoring ([`crate::ops`]): a guest that trapped or exited with an error is reset
//!   (a fresh power-on, a new pair under FT) within its VM's limit, never while its running
//!   secondary may still replay to the same end; one that stopped heartbeating is reset the
//!   same way, its earlier copy stopping before the new one is placed (a stray);
//! - the FT a VM gets is what its schedule wants now, when it has one
//!   ([`crate::ops::effective`]): a pure function of its record and the time.
//!
//! Maintenance mode (`maintenance/<host>`): such a host takes nothing, and the master moves
//! what it holds: a secondary is replaced by one elsewhere (kept until another host can
//! take it); a primary whose VM is protected is asked for a planned switch to its secondary
//! (a `kill/` request of [`model::HANDOVER`]), after which the VM is re-protected elsewhere;
//! a VM without FT is moved the same way, through a secondary placed only for the move. A
//! pair no host of its version can keep protected moves to hosts of another version (a
//! rolling upgrade), unprotected only while it moves.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::model::{
    self, Copy, CopyReport, CopyState, FtMode, HostRecord, MasterRecord, Placement, Power,
    Priority, VmRecord,
};
use crate::ops;
use crate::placement::{self, HostLoad, Request};
use crate::store::{Store, StoreError};

/// How often the master looks at the cluster.
pub const PERIOD: Duration = Duration::from_millis(200);

/// A copy that does not report running this long after it was placed is replaced.
const START_GRACE: Duration = Duration::from_secs(30);
/// A VM lost this many times within [`RESTART_WINDOW_MS`] is left off, with the reason.
const MAX_RESTARTS_IN_WINDOW: usize = 5;
const RESTART_WINDOW_MS: u64 = 60_000;

/// Everything the master decides from, read in one pass.
#[derive(Default)]
pub struct View {
    pub hosts: BTreeMap<String, HostRecord>,
    pub vms: BTreeMap<String, VmRecord>,
    pub places: BTreeMap<String, (Placement, i64)>,
    /// (host, vm) → report.
    pub copies: BTreeMap<(String, String), CopyReport>,
    pub master: Option<MasterRecord>,
    /// Hosts in maintenance mode (their records say so too).
    pub maintenance: BTreeSet<String>,
    /// The last logging-network measurements, (from, to) → result (read by the verbs
    /// only: the master does not need them).
    pub logchecks: BTreeMap<(String, String), crate::logcheck::LogCheck>,
}

impl View {
    pub fn read(store: &Store) -> Result<View, StoreError> {
        let mut v = View::default();
        for (_, h) in store.prefix_json::<HostRecord>(&format!("{}hosts/", model::PREFIX))? {
            v.hosts.insert(h.name.clone(), h);
        }
        for (_, r) in store.prefix_json::<VmRecord>(&format!("{}vms/", model::PREFIX))? {
            v.vms.insert(r.spec.name.clone(), r);
        }
        for kv in store.get_prefix(&format!("{}place/", model::PREFIX))? {
            let name = kv.key.rsplit('/').next().unwrap_or_default().to_string();
            if let Ok(p) = serde_json::from_slice::<Placement>(&kv.value) {
                v.places.insert(name, (p, kv.mod_revision));
            }
        }
        let copies = format!("{}copies/", model::PREFIX);
        for (key, c) in store.prefix_json::<CopyReport>(&copies)? {
            let host = key
                .strip_prefix(&copies)
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default()
                .to_string();
            v.copies.insert((host, c.vm.clone()), c);
        }
        v.master = store
            .get_json::<MasterRecord>(&model::master_key())?
            .map(|(m, _)| m);
        let maintenance = format!("{}maintenance/", model::PREFIX);
        for kv in store.get_prefix(&maintenance)? {
            if let Some(host) = kv.key.strip_prefix(&maintenance) {
                v.maintenance.insert(host.to_string());
            }
        }
        for (name, h) in v.hosts.iter_mut() {
            h.maintenance |= v.maintenance.contains(name);
        }
        Ok(v)
    }

    /// The report of this copy, if its host reports it (and it is this copy, not an
    /// older one on the same host).
    pub fn report(&self, vm: &str, copy: &Copy) -> Option<&CopyReport> {
        self.copies
            .get(&(copy.host.clone(), vm.to_string()))
            .filter(|r| r.id == copy.id)
    }

    pub fn loads(&self) -> Vec<HostLoad> {
        let hosts: Vec<HostRecord> = self.hosts.values().cloned().collect();
        let places: BTreeMap<String, Placement> = self
            .places
            .iter()
            .map(|(k, (p, _))| (k.clone(), p.clone()))
            .collect();
        placement::loads(&hosts, &self.vms, &places)
    }
}

/// How a placed copy is doing.
#[derive(Debug, PartialEq)]
enum Health {
    /// Started, not yet running (a secondary joining, a primary booting), within its grace.
    Starting,
    /// Running: a primary running its VM, or a secondary following its primary.
    Up,
    /// Live: it runs the VM and writes its status.
    Live { protected: bool },
    /// Its process ended, or it has no report and its host is gone.
    Gone,
}

/// The master's memory between passes (not in the store: a new master starts afresh,
/// which at worst gives a starting copy a new grace period).
#[derive(Default)]
pub struct Master {
    /// When each copy id was first seen placed without a report.
    waiting: BTreeMap<(String, u64), Instant>,
    /// Planned switches asked of live copies (vm, copy id), and when.
    handovers: BTreeMap<(String, u64), Instant>,
    /// Planned switches to ask this pass.
    to_ask: Vec<(String, u64)>,
    /// The live copies' last event counts, and when each last moved (heartbeats).
    progress: BTreeMap<(String, u64), (u64, Instant)>,
    /// What each scheduled VM's schedule wanted at the last pass (to log its changes).
    scheduled: BTreeMap<String, bool>,
}

/// A planned switch not done this long after it was asked is asked again.
const HANDOVER_RETRY: Duration = Duration::from_secs(15);
/// A `kill/` request no agent carries out vanishes after this long.
const REQUEST_TTL_SECS: i64 = 30;

impl Master {
    fn health(&mut self, view: &View, vm: &str, copy: &Copy) -> Health {
        let host = view.hosts.get(&copy.host);
        if host.is_some_and(|h| h.incarnation != copy.incarnation) {
            // Placed under an earlier life of its host's agent: it died with that agent
            // (and its report with that lease), and is never started by the new one.
            return Health::Gone;
        }
        match view.report(vm, copy) {
            Some(r) if r.state == CopyState::Exited => Health::Gone,
            Some(r) if r.live && r.state == CopyState::Running => Health::Live {
                protected: r.protected,
            },
            Some(r) if r.state == CopyState::Running => Health::Up,
            Some(_) => Health::Starting,
            None if host.is_none() => Health::Gone,
            None => {
                let since = *self
                    .waiting
                    .entry((vm.to_string(), copy.id))
                    .or_insert_with(Instant::now);
                if since.elapsed() > START_GRACE {
                    tracing::warn!(
                        "{vm}: copy {} on {} never reported; replacing it",
                        copy.id,
                        copy.host
                    );
                    Health::Gone
                } else {
                    Health::Starting
                }
            }
        }
    }

    /// One pass: every VM's placement brought toward its desired state. Returns what
    /// changed, as log lines.
    pub fn reconcile(&mut self, store: &Store) -> Result<Vec<String>, StoreError> {
        let view = View::read(store)?;
        let mut said = Vec::new();
        // Restart order: high priority first, so capacity goes to what matters most.
        let mut order: Vec<&VmRecord> = view.vms.values().collect();
        order.sort_by_key(|r| (r.spec.restart_priority, r.spec.name.clone()));
        let mut loads = view.loads();
        for r in order {
            let name = &r.spec.name;
            let (old, rev) = view.places.get(name).cloned().unwrap_or_default();
            let mut p = old.clone();
            let mut notes = Vec::new();
            let r = &*ops::effective(r);
            self.log_schedule(store, r, &old, &mut said);
            self.decide(&view, &mut loads, r, &mut p, &mut notes);
            if p != old {
                let bytes =
                    serde_json::to_vec(&p).map_err(|e| StoreError::Decode(e.to_string()))?;
                if store.put_if(&model::place_key(name), &bytes, rev, None)? {
                    crate::timeline::placement_changed(store, &view, name, &old, &p);
                    said.extend(notes.into_iter().map(|n| format!("{name}: {n}")));
                } else {
                    said.push(format!("{name}: placement changed under me; next pass"));
                }
            }
        }
        // Placements of destroyed VMs go once no copy reports.
        for (name, (_, rev)) in &view.places {
            if !view.vms.contains_key(name) && !view.copies.keys().any(|(_, v)| v == name) {
                let _ = rev;
                store.delete(&model::place_key(name))?;
                said.push(format!("{name}: destroyed"));
            }
        }
        let live: BTreeSet<(String, u64)> = view
            .places
            .iter()
            .flat_map(|(n, (p, _))| {
                [p.primary.as_ref(), p.secondary.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(move |c| (n.clone(), c.id))
            })
            .collect();
        self.waiting.retain(|k, _| live.contains(k));
        self.handovers.retain(|k, _| live.contains(k));
        for (vm, id) in std::mem::take(&mut self.to_ask) {
            let lease = store.grant(REQUEST_TTL_SECS)?;
            store.put(&model::kill_key(&vm, id), model::HANDOVER, Some(lease))?;
        }
        self.progress.retain(|k, _| live.contains(k));
        self.scheduled.retain(|k, _| view.vms.contains_key(k));
        Ok(said)
    }

    /// FT on demand: say when a VM's schedule turns its FT on or off (`r` is effective), in
    /// the log and on the timeline. A master that just took over knows no earlier state:
    /// it tells a turn only when the placement does not match it yet, so a master failover
    /// does not repeat one on the timeline.
    fn log_schedule(
        &mut self,
        store: &Store,
        r: &VmRecord,
        placed: &Placement,
        said: &mut Vec<String>,
    ) {
        let Some(s) = &r.ops.ft_schedule else {
            self.scheduled.remove(&r.spec.name);
            return;
        };
        let on = r.ft != FtMode::Off;
        let before = self.scheduled.insert(r.spec.name.clone(), on);
        if before == Some(on) {
            return;
        }
        let detail = format!(
            "FT schedule ({}): FT {}",
            s.describe(),
            if on { "on" } else { "off" }
        );
        said.push(format!("{}: {detail}", r.spec.name));
        if before.is_some() || placed.secondary.is_some() != on {
            crate::timeline::note(
                store,
                crate::timeline::TimelineEvent {
                    at_ms: model::now_ms(),
                    kind: crate::timeline::EventKind::Notice,
                    vm: Some(r.spec.name.clone()),
                    host: placed.primary.as_ref().map(|c| c.host.clone()),
                    detail,
                    who: Some("the FT schedule".into()),
                },
            );
        }
    }

    /// A new copy of the VM on `host`, under the host's current incarnation. Ids start
    /// from the clock when a VM is first placed, so that a VM destroyed and created again
    /// under its name never reuses an id an agent remembers having started.
    fn new_copy(view: &View, p: &mut Placement, host: String) -> Copy {
        p.next_id = p.next_id.max(model::now_ms()) + 1;
        Copy {
            id: p.next_id,
            incarnation: view.hosts.get(&host).map_or(0, |h| h.incarnation),
            host,
        }
    }

    /// A copy of the VM that is not among those placed is still running somewhere
    /// (powered off and on again, or replaced, before it stopped): its host, if any.
    fn stray(view: &View, name: &str, p: &Placement) -> Option<String> {
        let placed = |host: &str, id: u64| {
            [p.primary.as_ref(), p.secondary.as_ref()]
                .into_iter()
                .flatten()
                .any(|c| c.host == host && c.id == id)
        };
        view.copies
            .iter()
            .find(|((host, vm), r)| {
                vm == name && r.state != CopyState::Exited && !placed(host, r.id)
            })
            .map(|((host, _), _)| host.clone())
    }

    /// Bring one VM's placement toward its record.
    fn decide(
        &mut self,
        view: &View,
        loads: &mut [HostLoad],
        r: &VmRecord,
        p: &mut Placement,
        notes: &mut Vec<String>,
    ) {
        let name = r.spec.name.as_str();
        if p.ended.as_ref().is_some_and(|(boot, _)| *boot < r.boots) {
            // Powered on again since the guest ended: VM monitoring's count starts afresh
            // (the user's power-on is a decision, not a failure).
            p.ended = None;
            p.monitor.recent.clear();
        }
        if r.power == Power::Off || p.ended.is_some() {
            if r.power == Power::Off {
                p.ended = None;
            }
            if p.primary.is_some() || p.secondary.is_some() {
                notes.push("powered off".into());
            }
            p.primary = None;
            p.secondary = None;
            p.secondary_parked = None;
            p.reason = None;
            p.unprotected_since_ms = None;
            return;
        }
        let ft = r.ft != FtMode::Off;
        // The primary.
        let primary = p.primary.clone();
        let primary_health = primary.as_ref().map(|c| self.health(view, name, c));
        let secondary_health = p.secondary.clone().map(|c| self.health(view, name, &c));
        if let (Some(c), Some(Health::Live { .. })) = (&primary, &primary_health)
            && self.stalled(view, r, c)
        {
            let why = format!(
                "no heartbeat: its guest executed no event for {} s",
                r.ops.monitoring.heartbeat_secs.unwrap_or_default()
            );
            if !Self::monitor_reset(r, p, notes, &why) {
                p.primary = None;
                p.secondary = None;
                p.reason = None;
                p.unprotected_since_ms = None;
                return;
            }
        }
        if let Some(Health::Live { .. }) = secondary_health {
            // The secondary won arbitration and runs the VM: it is the primary now.
            let s = p
                .secondary
                .take()
                .expect("secondary health implies a secondary");
            let planned = primary
                .as_ref()
                .is_some_and(|c| self.handovers.contains_key(&(name.to_string(), c.id)));
            // A handover the copies made by themselves (the primary's host lost a path the
            // secondary's has) says why in the new live copy's status: not a failover.
            let by_health = view
                .report(name, &s)
                .and_then(|r| r.went_live.clone())
                .and_then(|w| w.strip_prefix("handover: ").map(str::to_string))
                .filter(|_| !planned);
            let what = match &by_health {
                _ if planned => "planned switch".to_string(),
                Some(why) => format!("handover ({})", health_cause(why)),
                None => "failover".to_string(),
            };
            notes.push(format!(
                "{what}: the secondary on {} went live (primary was on {}){}",
                s.host,
                primary.as_ref().map_or("?", |c| c.host.as_str()),
                by_health
                    .as_ref()
                    .map_or(String::new(), |why| format!(": {why}"))
            ));
            p.primary = Some(s);
            p.moving = false;
            if let Some(why) = by_health {
                p.handovers += 1;
                p.last_handover = Some(why);
            } else if !planned {
                p.failovers += 1;
            }
            p.unprotected_since_ms.get_or_insert(model::now_ms());
        } else if let Some(exit) = primary
            .as_ref()
            .filter(|_| primary_health == Some(Health::Gone))
            .and_then(|c| view.report(name, c))
            .and_then(|r| r.guest_exit.clone())
        {
            if secondary_health == Some(Health::Up) {
                // It replays to the same end, then exits too.
                return;
            }
            // VM monitoring resets a guest that failed (a fresh power-on: both FT copies
            // fail alike, so FT cannot save it), within its limit; a guest that ended by
            // itself stays off, restarting it would end alike.
            if !ops::unexpected_end(&exit) || !Self::monitor_reset(r, p, notes, &exit) {
                if p.ended.is_none() {
                    notes.push(format!("the guest ended ({exit}): the VM is off"));
                    p.ended = Some((r.boots, format!("the guest ended ({exit})")));
                }
                p.primary = None;
                p.secondary = None;
                p.reason = None;
                p.unprotected_since_ms = None;
                return;
            }
        } else if primary_health == Some(Health::Gone) {
            // Only a running secondary can be deciding arbitration: one still joining
            // never claims (it is not caught up), so it is not waited for.
            let secondary_up = secondary_health == Some(Health::Up);
            if secondary_up {
                // Arbitration is deciding: the secondary goes live or halts (then gone).
                p.reason = Some("failover in progress".into());
                return;
            }
            let old = primary.as_ref().map(|c| c.host.clone()).unwrap_or_default();
            p.primary = None;
            p.secondary = None;
            if r.spec.restart_priority == Priority::Disabled {
                notes.push(format!(
                    "lost on {old}; restart priority disabled: left off"
                ));
                p.ended = Some((
                    r.boots,
                    format!("lost with its host {old}; its restart priority is disabled"),
                ));
                p.reason = None;
                p.unprotected_since_ms = None;
                return;
            }
            let now = model::now_ms();
            p.recent_starts
                .retain(|t| now.saturating_sub(*t) < RESTART_WINDOW_MS);
            if p.recent_starts.len() >= MAX_RESTARTS_IN_WINDOW {
                let why = primary
                    .as_ref()
                    .and_then(|c| view.report(name, c))
                    .and_then(|r| r.last_error.clone().or(r.exit.clone()))
                    .unwrap_or_else(|| "its copies kept being lost".into());
                notes.push(format!(
                    "lost {MAX_RESTARTS_IN_WINDOW} times within a minute: left off"
                ));
                p.ended = Some((
                    r.boots,
                    format!(
                        "lost {MAX_RESTARTS_IN_WINDOW} times within a minute (last: {why}); left off"
                    ),
                ));
                p.reason = None;
                p.unprotected_since_ms = None;
                return;
            }
            p.recent_starts.push(now);
            notes.push(format!("lost on {old}: HA restart from its datastore"));
            p.restarts += 1;
            p.unprotected_since_ms.get_or_insert(now);
        }
        if p.primary.is_none() {
            if let Some(host) = Self::stray(view, name, p) {
                // Never two copies at once: the earlier one stops first.
                p.reason = Some(format!("waiting for an earlier copy on {host} to stop"));
                return;
            }
            let req = Request {
                any_version: false,
                vm: r,
                ft,
                primary: None,
                prefer: r.want_host.as_deref(),
                avoid: &[],
                counted_on: None,
            };
            match placement::place(loads, &req) {
                Ok(host) => {
                    notes.push(format!("primary placed on {host}"));
                    Self::account(loads, &host, r, ft);
                    p.primary = Some(Self::new_copy(view, p, host));
                    p.reason = None;
                }
                Err(why) => {
                    if p.reason.as_deref() != Some(&why) {
                        notes.push(format!("cannot place: {why}"));
                    }
                    p.reason = Some(why);
                }
            }
            return;
        }
        // The secondary.
        let primary = p.primary.clone().expect("placed above");
        let primary_live = matches!(self.health(view, name, &primary), Health::Live { .. });
        // A VM leaving a host in maintenance moves through a secondary, FT or not.
        let evacuating = view.maintenance.contains(&primary.host);
        match r.ft {
            _ if evacuating => {}
            FtMode::Off => {
                if p.secondary.take().is_some() {
                    notes.push("FT turned off: secondary removed".into());
                }
                p.secondary_parked = None;
                p.reason = None;
                p.unprotected_since_ms = None;
                return;
            }
            FtMode::Disabled => {
                if let Some(s) = p.secondary.take() {
                    notes.push(format!("FT disabled: secondary on {} stopped", s.host));
                    p.secondary_parked = Some(s.host);
                }
                p.reason = None;
                p.unprotected_since_ms = None;
                return;
            }
            FtMode::On => {}
        }
        if r.ft == FtMode::On
            && !p.moving
            && let Some((to, version)) = Self::cross_version_target(view, loads, r, p, &primary)
        {
            notes.push(format!(
                "moving to {to} (Tandem {version}) off a host in maintenance: not protected while its pair moves"
            ));
            Self::account(loads, &to, r, true);
            p.moving = true;
            p.secondary = Some(Self::new_copy(view, p, to.clone()));
            p.unprotected_since_ms.get_or_insert(model::now_ms());
            p.reason = Some(format!("moving to {to} (Tandem {version})"));
            return;
        }
        let secondary = p.secondary.clone();
        let replace = match &secondary {
            None => true,
            Some(s) => {
                let gone = self.health(view, name, s) == Health::Gone;
                // `migrate-secondary --to`: moved only to a host that can take it now (one
                // that cannot is not worth losing the running secondary for).
                let moved = r.secondary_to.as_ref().is_some_and(|to| {
                    to != &s.host
                        && to != &primary.host
                        && view.hosts.get(&primary.host).is_some_and(|ph| {
                            let req = Request {
                                any_version: false,
                                vm: r,
                                ft: true,
                                primary: Some(ph),
                                prefer: Some(to),
                                avoid: &[],
                                counted_on: None,
                            };
                            placement::place(loads, &req).is_ok_and(|h| &h == to)
                        })
                });
                // Off a host in maintenance, once another host can take it.
                let leaving = view.maintenance.contains(&s.host)
                    && view.hosts.get(&primary.host).is_some_and(|ph| {
                        let avoid = [s.host.clone()];
                        let req = Request::secondary(r, ph, false, &avoid);
                        placement::place(loads, &req).is_ok()
                    });
                if gone {
                    notes.push(format!("secondary on {} lost", s.host));
                    p.unprotected_since_ms.get_or_insert(model::now_ms());
                    // A move that lost its copy starts over: the replacement is placed
                    // among the pair's own version and the move is chosen again from there
                    // (a copy of either version, and then a switch, would strand the VM
                    // where nothing can re-protect it).
                    p.moving = false;
                } else if leaving {
                    notes.push(format!("secondary leaves {} (maintenance)", s.host));
                }
                gone || moved || leaving
            }
        };
        if replace {
            if !primary_live {
                // A secondary joins a live copy: wait until the primary runs.
                p.secondary = None;
                p.reason = Some("waiting for the primary to run".into());
                return;
            }
            let Some(phost) = view.hosts.get(&primary.host) else {
                p.secondary = None;
                p.reason = Some(format!(
                    "the primary's host {} is not connected",
                    primary.host
                ));
                return;
            };
            let avoid: Vec<String> = secondary.iter().map(|s| s.host.clone()).collect();
            let prefer = r.secondary_to.as_deref().or(p.secondary_parked.as_deref());
            let req = Request {
                vm: r,
                ft: true,
                primary: Some(phost),
                prefer,
                avoid: if r.secondary_to.is_some() {
                    &[]
                } else {
                    &avoid
                },
                counted_on: p.secondary_parked.as_deref(),
                // A copy placed only to move the VM may run another version.
                any_version: p.moving || (evacuating && r.ft != FtMode::On),
            };
            match placement::place(loads, &req) {
                Ok(host) => {
                    notes.push(format!("secondary placed on {host}"));
                    if p.secondary_parked.as_deref() != Some(&host) {
                        Self::account(loads, &host, r, true);
                    }
                    p.secondary_parked = None;
                    p.secondary = Some(Self::new_copy(view, p, host));
                    p.reason = Some("secondary starting".into());
                }
                Err(why) => {
                    if p.reason.as_deref() != Some(&why) {
                        notes.push(format!("cannot place the secondary: {why}"));
                    }
                    p.secondary = None;
                    p.reason = Some(why);
                }
            }
            return;
        }
        let protected = matches!(
            self.health(view, name, &primary),
            Health::Live { protected: true }
        ) && p
            .secondary
            .as_ref()
            .and_then(|s| view.report(name, s))
            .is_some_and(|r| r.state == CopyState::Running);
        if protected && evacuating && !p.moving && r.ft == FtMode::On {
            // After the switch the secondary's host needs a secondary of its own: until a
            // host can take it (a restarted agent still probing its peers, say), the VM
            // stays protected where it is rather than switch into an unprotected spot.
            let reprotectable = p
                .secondary
                .as_ref()
                .and_then(|s| view.hosts.get(&s.host))
                .is_some_and(|sh| {
                    let req = Request::secondary(r, sh, false, &[]);
                    placement::place(loads, &req).is_ok()
                });
            if !reprotectable {
                let why = format!(
                    "waiting to leave {} (maintenance): no host could re-protect it after the switch",
                    primary.host
                );
                if p.reason.as_deref() != Some(&why) {
                    notes.push(why.clone());
                }
                p.reason = Some(why);
                return;
            }
        }
        if protected && (evacuating || p.moving) {
            // The pair is whole: hand the VM over to the secondary, off this host.
            let key = (name.to_string(), primary.id);
            let due = self
                .handovers
                .get(&key)
                .is_none_or(|asked| asked.elapsed() > HANDOVER_RETRY);
            if due {
                notes.push(format!(
                    "planned switch asked of the primary on {} (maintenance)",
                    primary.host
                ));
                self.handovers.insert(key, Instant::now());
                self.to_ask.push((name.to_string(), primary.id));
            }
            if !p.moving {
                p.reason = Some(format!("moving off {} (maintenance)", primary.host));
            }
            return;
        }
        if protected {
            if let Some(since) = p.unprotected_since_ms.take() {
                p.reprotections += 1;
                p.last_reprotect_ms = Some(model::now_ms().saturating_sub(since));
                notes.push(format!(
                    "protected again after {:.1} s",
                    model::now_ms().saturating_sub(since) as f64 / 1000.0
                ));
            }
            p.reason = None;
        } else if p.reason.is_none() || p.reason.as_deref() == Some("secondary starting") {
            p.reason = Some("secondary catching up".into());
        }
    }

    /// An FT pair one of whose hosts is in maintenance, when no host of its version can
    /// take the copy it needs to stay protected: the host of another Tandem version (with
    /// the same engine) it may move to, and that version, if one can take it and re-protect
    /// it among hosts of its own version. (A rolling upgrade: the last pairs on the old
    /// version move to the new one, unprotected only while they move.)
    fn cross_version_target(
        view: &View,
        loads: &[HostLoad],
        r: &VmRecord,
        p: &Placement,
        primary: &Copy,
    ) -> Option<(String, String)> {
        let sec = p.secondary.as_ref()?;
        let on_primary = view.maintenance.contains(&primary.host);
        if !on_primary && !view.maintenance.contains(&sec.host) {
            return None;
        }
        let ph = view.hosts.get(&primary.host)?;
        let sh = view.hosts.get(&sec.host)?;
        let place = |from: &HostRecord, any_version: bool, avoid: &[String]| {
            placement::place(loads, &Request::secondary(r, from, any_version, avoid))
        };
        match placement::plan_pair(&view.hosts, ph, sh, on_primary, place) {
            Ok(placement::PairPlan::Across { to, version }) => Some((to, version)),
            _ => None,
        }
    }

    /// VM monitoring: reset the VM (its copies dropped, a fresh primary placed below) if
    /// its limit allows, else leave it off with the reason. Whether it was reset.
    fn monitor_reset(r: &VmRecord, p: &mut Placement, notes: &mut Vec<String>, why: &str) -> bool {
        match ops::on_failure(&r.ops.monitoring, &mut p.monitor, model::now_ms(), why) {
            ops::Verdict::Reset => {
                notes.push(format!(
                    "VM monitoring: {why}; reset {} (a fresh power-on from its datastore)",
                    p.monitor.resets
                ));
                p.primary = None;
                p.secondary = None;
                p.unprotected_since_ms.get_or_insert(model::now_ms());
                true
            }
            ops::Verdict::LeaveOff(reason) => {
                notes.push(format!("VM monitoring: {reason}"));
                p.ended = Some((r.boots, reason));
                false
            }
        }
    }

    /// The live copy `c` of a VM declared to heartbeat has executed no event for its
    /// heartbeat time (as this master saw it: a new master starts the count afresh).
    fn stalled(&mut self, view: &View, r: &VmRecord, c: &Copy) -> bool {
        let Some(secs) = r.ops.monitoring.heartbeat_secs else {
            return false;
        };
        let Some(events) = view.report(&r.spec.name, c).map(|rep| rep.events) else {
            return false;
        };
        let key = (r.spec.name.clone(), c.id);
        let seen = self.progress.entry(key).or_insert((events, Instant::now()));
        if seen.0 != events {
            *seen = (events, Instant::now());
            return false;
        }
        seen.1.elapsed() > Duration::from_secs(secs)
    }

    fn account(loads: &mut [HostLoad], host: &str, r: &VmRecord, ft: bool) {
        if let Some(l) = loads.iter_mut().find(|l| l.host.name == host) {
            l.copies += 1;
            l.ft_copies += usize::from(ft);
            l.reserved_mib += r.spec.memory_mib;
        }
    }
}

/// A health handover's cause without its details: "primary lost its storage" of "primary
/// lost its storage (cannot write in ...)".
fn health_cause(why: &str) -> &str {
    why.split_once(" (").map_or(why, |(cause, _)| cause)
}

/// Try to become the master (or confirm this agent still is). `lease` is the agent's.
pub fn elect(store: &Store, host: &str, lease: i64) -> Result<bool, StoreError> {
    let key = model::master_key();
    if let Some(kv) = store.get(&key)? {
        let rec: Option<MasterRecord> = serde_json::from_slice(&kv.value).ok();
        return Ok(rec.is_some_and(|m| m.host == host) && kv.lease == lease);
    }
    let rec = MasterRecord {
        host: host.to_string(),
        since_ms: model::now_ms(),
    };
    let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Decode(e.to_string()))?;
    store.create(&key, &bytes, Some(lease))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn host(name: &str) -> HostRecord {
        crate::model::fixtures::host(name)
    }

    fn vm(ft: FtMode) -> VmRecord {
        crate::model::fixtures::vm("kvd", ft, 64)
    }

    fn report(id: u64, role: Role, state: CopyState, live: bool, protected: bool) -> CopyReport {
        CopyReport {
            pid: 1,
            live,
            protected,
            ..CopyReport::new("kvd", id, role, state)
        }
    }

    fn view(hosts: &[&str], r: VmRecord, copies: Vec<(&str, CopyReport)>) -> View {
        let mut v = View::default();
        for h in hosts {
            v.hosts.insert(h.to_string(), host(h));
        }
        v.vms.insert("kvd".into(), r);
        for (h, c) in copies {
            v.copies.insert((h.to_string(), "kvd".into()), c);
        }
        v
    }

    fn decide(v: &View, p: &mut Placement) -> Vec<String> {
        let mut notes = vec![];
        let mut loads = v.loads();
        let r = v.vms["kvd"].clone();
        Master::default().decide(v, &mut loads, &r, p, &mut notes);
        notes
    }

    /// Primary 1 on h1, secondary 2 on h2.
    fn pair() -> Placement {
        Placement {
            primary: copy(1, "h1"),
            secondary: copy(2, "h2"),
            next_id: 2,
            ..Default::default()
        }
    }

    /// Primary 1 on h1, alone.
    fn alone() -> Placement {
        Placement {
            primary: copy(1, "h1"),
            next_id: 1,
            ..Default::default()
        }
    }

    fn copy(id: u64, host: &str) -> Option<Copy> {
        Some(Copy {
            id,
            host: host.into(),
            incarnation: 0,
        })
    }

    #[test]
    fn a_powered_on_ft_vm_gets_a_primary_then_a_secondary_on_another_host() {
        let mut p = Placement::default();
        let v = view(&["h1", "h2"], vm(FtMode::On), vec![]);
        decide(&v, &mut p);
        let primary = p.primary.clone().unwrap();
        assert!(
            p.secondary.is_none(),
            "a secondary waits for a running primary"
        );
        let v = view(
            &["h1", "h2"],
            vm(FtMode::On),
            vec![(
                &primary.host,
                report(primary.id, Role::Primary, CopyState::Running, true, false),
            )],
        );
        decide(&v, &mut p);
        let s = p.secondary.clone().unwrap();
        assert_ne!(s.host, primary.host);
        assert_ne!(s.id, primary.id);
    }

    #[test]
    fn a_handover_for_the_primarys_storage_is_named_and_not_counted_as_a_failover() {
        let mut p = pair();
        // The primary on h1 lost its storage and handed over: it halted, the secondary is
        // live and says why.
        let mut live = report(2, Role::Secondary, CopyState::Running, true, false);
        live.went_live = Some("handover: primary lost its storage (cannot write in /s/kvd)".into());
        let v = view(&["h1", "h2", "h3"], vm(FtMode::On), vec![("h2", live)]);
        let notes = decide(&v, &mut p);
        assert_eq!(p.primary, copy(2, "h2"), "{notes:?}");
        assert_eq!((p.failovers, p.handovers), (0, 1));
        assert_eq!(
            p.last_handover.as_deref(),
            Some("primary lost its storage (cannot write in /s/kvd)")
        );
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("handover (primary lost its storage): the secondary on h2")),
            "{notes:?}"
        );
    }

    #[test]
    fn a_live_secondary_becomes_the_primary_and_a_new_secondary_is_placed_elsewhere() {
        let mut p = pair();
        // h1 died (no host record, no report); the secondary won arbitration.
        let v = view(
            &["h2", "h3"],
            vm(FtMode::On),
            vec![(
                "h2",
                report(2, Role::Secondary, CopyState::Running, true, false),
            )],
        );
        let notes = decide(&v, &mut p);
        assert_eq!(p.primary, copy(2, "h2"), "{notes:?}");
        assert_eq!(p.failovers, 1);
        assert_eq!(p.secondary.as_ref().unwrap().host, "h3");
        assert!(p.unprotected_since_ms.is_some());
        let new_id = p.secondary.as_ref().unwrap().id;
        assert!(new_id > 2, "ids are never reused");
        // Once the new pair is protected, the re-protection is counted once.
        let v = view(
            &["h2", "h3"],
            vm(FtMode::On),
            vec![
                (
                    "h2",
                    report(2, Role::Secondary, CopyState::Running, true, true),
                ),
                (
                    "h3",
                    report(new_id, Role::Secondary, CopyState::Running, false, false),
                ),
            ],
        );
        decide(&v, &mut p);
        decide(&v, &mut p);
        assert_eq!(p.reprotections, 1);
        assert!(p.reason.is_none());
    }

    #[test]
    fn no_fresh_primary_while_an_earlier_copy_runs_and_none_from_an_earlier_agent() {
        // Powered off and on again: copy 1 still runs on h1 (not placed any more).
        let mut p = Placement::default();
        let v = view(
            &["h1", "h2"],
            vm(FtMode::Off),
            vec![(
                "h1",
                report(1, Role::Primary, CopyState::Running, true, false),
            )],
        );
        decide(&v, &mut p);
        assert!(p.primary.is_none());
        assert!(
            p.reason.as_deref().unwrap().contains("earlier copy on h1"),
            "{:?}",
            p.reason
        );
        // A copy placed under an earlier incarnation of its host is gone: its agent died.
        let mut v = view(&["h1", "h2"], vm(FtMode::Off), vec![]);
        v.hosts.get_mut("h1").unwrap().incarnation = 7;
        let mut p = alone();
        decide(&v, &mut p);
        let c = p.primary.unwrap();
        assert_ne!(c.id, 1, "replaced");
        assert_eq!(p.restarts, 1);
        if c.host == "h1" {
            assert_eq!(
                c.incarnation, 7,
                "placed under the host's current incarnation"
            );
        }
    }

    #[test]
    fn a_secondary_still_joining_does_not_hold_off_a_restart_and_five_losses_leave_it_off() {
        let mut p = pair();
        let v = view(
            &["h2", "h3"],
            vm(FtMode::On),
            vec![(
                "h2",
                report(2, Role::Secondary, CopyState::Starting, false, false),
            )],
        );
        decide(&v, &mut p);
        assert_eq!(p.restarts, 1, "restarted at once");
        assert!(p.secondary.is_none());
        for _ in 0..10 {
            let mut q = p.clone();
            q.primary = copy(99, "gone");
            q.secondary = None;
            decide(&view(&["h3"], vm(FtMode::Off), vec![]), &mut q);
            p = q;
        }
        assert_eq!(p.restarts, 5);
        assert!(
            p.ended
                .as_ref()
                .unwrap()
                .1
                .contains("5 times within a minute"),
            "{:?}",
            p.ended
        );
    }

    #[test]
    fn while_arbitration_decides_nothing_is_restarted() {
        let mut p = pair();
        let v = view(
            &["h2", "h3"],
            vm(FtMode::On),
            vec![(
                "h2",
                report(2, Role::Secondary, CopyState::Running, false, false),
            )],
        );
        let before = p.clone();
        decide(&v, &mut p);
        assert_eq!(p.primary, before.primary);
        assert_eq!(p.secondary, before.secondary);
        assert_eq!(p.restarts, 0);
    }

    #[test]
    fn an_ft_vm_whose_two_hosts_died_restarts_from_its_datastore_but_one_with_priority_disabled_does_not()
     {
        let base = pair();
        let mut p = base.clone();
        let v = view(&["h3"], vm(FtMode::On), vec![]);
        decide(&v, &mut p);
        assert_eq!(p.primary.as_ref().unwrap().host, "h3");
        assert_eq!(p.restarts, 1);
        assert!(p.secondary.is_none());
        let mut r = vm(FtMode::Off);
        r.spec.restart_priority = Priority::Disabled;
        let mut p = base;
        p.secondary = None;
        let v = view(&["h3"], r, vec![]);
        decide(&v, &mut p);
        assert!(p.primary.is_none());
        assert!(p.ended.as_ref().unwrap().1.contains("disabled"));
        decide(&v, &mut p);
        assert!(p.primary.is_none(), "and it stays off");
    }

    #[test]
    fn a_guest_that_ended_leaves_the_vm_off_until_it_is_powered_on_again() {
        let mut p = alone();
        let mut ended = report(1, Role::Primary, CopyState::Exited, false, false);
        ended.exit = Some("exit 3".into());
        ended.guest_exit = Some("exit 3".into());
        let v = view(&["h1", "h2"], vm(FtMode::Off), vec![("h1", ended.clone())]);
        decide(&v, &mut p);
        assert!(p.primary.is_none(), "not restarted");
        assert_eq!(p.restarts, 0);
        assert!(p.ended.as_ref().unwrap().1.contains("exit 3"));
        decide(&v, &mut p);
        assert!(p.primary.is_none(), "still not restarted");
        // Killed (a signal) is not ended: that copy is restarted.
        let mut killed = ended.clone();
        killed.exit = Some("signal 9".into());
        killed.guest_exit = None;
        let mut q = alone();
        decide(
            &view(&["h1", "h2"], vm(FtMode::Off), vec![("h1", killed)]),
            &mut q,
        );
        assert_eq!(q.restarts, 1);
        assert!(q.primary.is_some());
        // Powered on again (a new boot): placed again.
        let mut again = vm(FtMode::Off);
        again.boots = 2;
        decide(&view(&["h1", "h2"], again, vec![("h1", ended)]), &mut p);
        assert!(p.primary.is_some() && p.ended.is_none());
    }

    #[test]
    fn a_guest_that_traps_is_reset_up_to_its_limit_then_left_off_saying_why() {
        let mut r = vm(FtMode::On);
        r.ops.monitoring.max_resets = 2;
        let mut p = pair();
        let trapped = |id: u64, role: Role| {
            let mut t = report(id, role, CopyState::Exited, false, false);
            t.exit = Some("exit 1".into());
            t.guest_exit = Some("trap: wasm trap: unreachable".into());
            t
        };
        // Both copies trap alike: while the secondary still runs, it is waited for.
        let v = view(
            &["h1", "h2"],
            r.clone(),
            vec![
                ("h1", trapped(1, Role::Primary)),
                (
                    "h2",
                    report(2, Role::Secondary, CopyState::Running, false, false),
                ),
            ],
        );
        let before = p.clone();
        decide(&v, &mut p);
        assert_eq!(p, before, "waiting for the secondary's end");
        for n in 1..=3u64 {
            let (pc, sc) = (p.primary.clone().unwrap(), p.secondary.clone());
            let mut copies = vec![(pc.host.as_str(), trapped(pc.id, Role::Primary))];
            if let Some(s) = &sc {
                copies.push((s.host.as_str(), trapped(s.id, Role::Secondary)));
            }
            let v = view(&["h1", "h2"], r.clone(), copies);
            let notes = decide(&v, &mut p);
            if n <= 2 {
                let c = p.primary.clone().expect("reset: a fresh primary");
                assert!(c.id != pc.id, "{notes:?}");
                assert!(p.secondary.is_none(), "a new pair, once the primary runs");
                assert_eq!(p.monitor.resets, n);
                assert_eq!(p.restarts, 0, "not an HA restart");
                assert!(
                    notes.iter().any(|n| n.contains("VM monitoring")),
                    "{notes:?}"
                );
            } else {
                assert!(p.primary.is_none() && p.secondary.is_none());
                let why = &p.ended.as_ref().unwrap().1;
                assert!(why.contains("trap") && why.contains("2 times"), "{why}");
            }
        }
        decide(&view(&["h1", "h2"], r.clone(), vec![]), &mut p);
        assert!(p.primary.is_none(), "it stays off");
        // Powered on again: placed, and monitoring's count starts afresh.
        let mut again = r.clone();
        again.boots += 1;
        decide(&view(&["h1", "h2"], again, vec![]), &mut p);
        assert!(p.primary.is_some() && p.monitor.recent.is_empty());
        assert_eq!(p.monitor.resets, 2, "the statistics stay");
        // A guest that exits 0 ended by itself: off at once, no reset.
        let mut q = alone();
        let mut clean = report(1, Role::Primary, CopyState::Exited, false, false);
        clean.guest_exit = Some("exit code 0".into());
        decide(&view(&["h1"], r.clone(), vec![("h1", clean)]), &mut q);
        assert!(q.primary.is_none() && q.ended.is_some() && q.monitor.resets == 0);
    }

    #[test]
    fn a_vm_declared_to_heartbeat_is_reset_when_its_events_stall() {
        let mut r = vm(FtMode::Off);
        r.ops.monitoring.heartbeat_secs = Some(2);
        let mut p = alone();
        let mut live = report(1, Role::Primary, CopyState::Running, true, false);
        live.events = 10;
        let v = view(&["h1", "h2"], r.clone(), vec![("h1", live.clone())]);
        let mut m = Master::default();
        let mut loads = v.loads();
        let mut notes = vec![];
        m.decide(&v, &mut loads, &r, &mut p, &mut notes);
        assert_eq!(p.primary, copy(1, "h1"));
        // Events move: no reset.
        std::thread::sleep(Duration::from_millis(1500));
        live.events = 11;
        let v = view(&["h1", "h2"], r.clone(), vec![("h1", live.clone())]);
        m.decide(&v, &mut loads, &r, &mut p, &mut notes);
        assert_eq!(p.primary, copy(1, "h1"));
        // Stalled past the heartbeat: reset; the new primary waits for the old to stop.
        std::thread::sleep(Duration::from_millis(2100));
        m.decide(&v, &mut loads, &r, &mut p, &mut notes);
        assert!(p.primary.is_none(), "{notes:?}");
        assert_eq!(p.monitor.resets, 1);
        assert!(p.monitor.last.as_ref().unwrap().contains("heartbeat"));
        assert!(p.reason.as_ref().unwrap().contains("earlier copy on h1"));
    }

    #[test]
    fn an_exited_secondary_is_replaced_and_disable_parks_its_host() {
        let mut p = pair();
        let primary = (
            "h1",
            report(1, Role::Primary, CopyState::Running, true, false),
        );
        let v = view(
            &["h1", "h2", "h3"],
            vm(FtMode::On),
            vec![
                primary.clone(),
                (
                    "h2",
                    report(2, Role::Secondary, CopyState::Exited, false, false),
                ),
            ],
        );
        decide(&v, &mut p);
        assert_eq!(
            p.secondary.as_ref().unwrap().host,
            "h3",
            "the host it failed on is avoided"
        );
        let v = view(
            &["h1", "h2", "h3"],
            vm(FtMode::Disabled),
            vec![primary.clone()],
        );
        decide(&v, &mut p);
        assert!(p.secondary.is_none());
        assert_eq!(p.secondary_parked.as_deref(), Some("h3"));
        let v = view(&["h1", "h2", "h3"], vm(FtMode::On), vec![primary]);
        decide(&v, &mut p);
        assert_eq!(
            p.secondary.as_ref().unwrap().host,
            "h3",
            "enable goes back to the parked host"
        );
        let mut off = vm(FtMode::On);
        off.power = Power::Off;
        decide(&view(&["h1"], off, vec![]), &mut p);
        assert!(p.primary.is_none() && p.secondary.is_none());
    }
}

#[cfg(test)]
mod maintenance_tests {
    use super::*;
    use crate::model::Role;

    fn setup(versions: &[(&str, &str)], maintenance: &str) -> (View, Placement) {
        let mut v = View::default();
        for (h, ver) in versions {
            let mut rec = crate::model::fixtures::host(h);
            rec.version = ver.to_string();
            rec.maintenance = *h == maintenance;
            v.hosts.insert(h.to_string(), rec);
        }
        v.maintenance.insert(maintenance.to_string());
        let p = crate::model::fixtures::place_kvd(&mut v, "h3", "h4");
        for (id, h, role, live) in [
            (1, "h3", Role::Primary, true),
            (2, "h4", Role::Secondary, false),
        ] {
            v.copies.insert(
                (h.to_string(), "kvd".into()),
                CopyReport {
                    pid: 1,
                    live,
                    protected: live,
                    ..CopyReport::new("kvd", id, role, CopyState::Running)
                },
            );
        }
        (v, p)
    }

    fn decide(m: &mut Master, v: &View, p: &mut Placement) -> Vec<String> {
        let mut notes = vec![];
        let mut loads = v.loads();
        let r = v.vms["kvd"].clone();
        m.decide(v, &mut loads, &r, p, &mut notes);
        notes
    }

    #[test]
    fn a_pair_that_cannot_stay_on_its_version_moves_to_the_other_one_through_a_move_copy() {
        let (v, mut p) = setup(&[("h1", "2"), ("h2", "2"), ("h3", "1"), ("h4", "1")], "h3");
        let mut m = Master::default();
        let notes = decide(&mut m, &v, &mut p);
        assert!(p.moving, "{notes:?} {p:?}");
        let to = p.secondary.as_ref().unwrap().host.clone();
        assert!(to == "h1" || to == "h2", "{p:?}");
        assert!(
            m.to_ask.is_empty(),
            "no switch before the move copy holds the VM"
        );
    }

    #[test]
    fn a_move_whose_copy_is_lost_is_chosen_again_and_never_switches_into_its_own_version() {
        let (mut v, mut p) = setup(&[("h1", "2"), ("h2", "2"), ("h3", "1"), ("h4", "1")], "h3");
        let mut m = Master::default();
        decide(&mut m, &v, &mut p);
        assert!(p.moving);
        let mover = p.secondary.clone().unwrap();
        // The move copy exits (as when it could not join); the primary still runs.
        v.copies.insert(
            (mover.host.clone(), "kvd".into()),
            CopyReport {
                pid: 1,
                ..CopyReport::new("kvd", mover.id, Role::Secondary, CopyState::Exited)
            },
        );
        let notes = decide(&mut m, &v, &mut p);
        assert!(!p.moving, "{notes:?}");
        let back = p.secondary.clone().unwrap();
        assert_eq!(back.host, "h4", "{notes:?}");
        // The replacement runs and the pair is whole again on version 1: no switch into
        // h4 (nothing of version 1 could re-protect it there); the move is chosen again.
        v.copies.insert(
            ("h4".into(), "kvd".into()),
            CopyReport {
                pid: 1,
                ..CopyReport::new("kvd", back.id, Role::Secondary, CopyState::Running)
            },
        );
        let notes = decide(&mut m, &v, &mut p);
        assert!(m.to_ask.is_empty(), "no switch into h4: {notes:?}");
        assert!(p.moving, "{notes:?} {p:?}");
        let to = p.secondary.as_ref().unwrap().host.clone();
        assert!(to == "h1" || to == "h2", "{p:?}");
    }

    #[test]
    fn a_pair_that_can_stay_on_its_version_switches_within_it() {
        let (v, mut p) = setup(&[("h1", "1"), ("h2", "2"), ("h3", "1"), ("h4", "1")], "h3");
        let mut m = Master::default();
        let notes = decide(&mut m, &v, &mut p);
        assert!(!p.moving, "{notes:?}");
        assert_eq!(m.to_ask, vec![("kvd".to_string(), 1)], "{notes:?}");
    }

    #[test]
    fn two_pairs_on_the_old_version_both_move() {
        let mut v = View::default();
        for (h, ver) in [("h1", "2"), ("h2", "2"), ("h3", "1"), ("h4", "1")] {
            let mut rec = crate::model::fixtures::host(h);
            rec.version = ver.to_string();
            rec.maintenance = h == "h3";
            v.hosts.insert(h.to_string(), rec);
        }
        v.maintenance.insert("h3".into());
        let copy = |id, host: &str| {
            Some(Copy {
                id,
                host: host.into(),
                incarnation: 0,
            })
        };
        for vm in ["a", "b"] {
            v.vms
                .insert(vm.into(), crate::model::fixtures::vm(vm, FtMode::On, 64));
            let p = Placement {
                primary: copy(1, "h3"),
                secondary: copy(2, "h4"),
                next_id: 2,
                ..Default::default()
            };
            v.places.insert(vm.into(), (p, 1));
            for (id, h, role, live) in [
                (1, "h3", Role::Primary, true),
                (2, "h4", Role::Secondary, false),
            ] {
                v.copies.insert(
                    (h.to_string(), vm.into()),
                    CopyReport {
                        pid: 1,
                        live,
                        protected: live,
                        ..CopyReport::new(vm, id, role, CopyState::Running)
                    },
                );
            }
        }
        let mut m = Master::default();
        let mut loads = v.loads();
        for vm in ["a", "b"] {
            let mut p = v.places[vm].0.clone();
            let mut notes = vec![];
            let r = v.vms[vm].clone();
            m.decide(&v, &mut loads, &r, &mut p, &mut notes);
            assert!(p.moving, "{vm}: {notes:?} {p:?}");
        }
    }
}
