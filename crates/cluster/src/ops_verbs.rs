//! The day-two verbs (issue 11): `ft schedule`, `ft sizing`, `host check-logging`, and the
//! day-two part of a VM's view. Like every verb, they check, record desired state (the
//! VM's record, `vms/`) or a measurement (`logcheck/`), and return; the master acts.

use serde::{Deserialize, Serialize};

use crate::ClusterError;
use crate::logcheck::{self, CheckRequest, LogCheck};
use crate::master::View;
use crate::model::{self, CopyReport, FtMode, HostRecord, Placement, VmRecord, VmView};
use crate::ops::{self, OpsView, Sizing};
use crate::schedule::{self, FtSchedule};
use crate::verbs::Verbs;

/// `POST /api/v1/vms/{name}/ft/schedule`: a schedule, or `{"clear": true}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    #[serde(default)]
    pub on: Option<String>,
    #[serde(default)]
    pub off: Option<String>,
    /// `UTC` (default), `UTC+HH:MM`, `UTC-HH:MM`, or `host` (the master's time zone).
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub clear: bool,
}

/// Round trips and MiB of a logging check when the request says nothing.
const DEFAULT_PINGS: u32 = 200;
const DEFAULT_MIB: u32 = 64;

/// The measurement that says what the VM's logging channel can carry: the pair's (either
/// direction, the newest), else, with no secondary yet, the newest from the primary's host.
fn measured_for<'a>(v: &'a View, p: &Placement) -> Option<&'a LogCheck> {
    let primary = p.primary.as_ref()?.host.as_str();
    let secondary = p
        .secondary
        .as_ref()
        .map(|c| c.host.as_str())
        .or(p.secondary_parked.as_deref());
    v.logchecks
        .values()
        .filter(|c| match secondary {
            Some(s) => (c.from == primary && c.to == s) || (c.from == s && c.to == primary),
            None => c.from == primary || c.to == primary,
        })
        .max_by_key(|c| c.at_ms)
}

/// The sized need of a VM from its live copy's report, Mbit/s.
fn need(primary: Option<&CopyReport>) -> Option<f64> {
    let r = primary.filter(|r| r.live)?;
    let (disk, net) = ops::averages(r);
    Some(ops::need_mbit_s(disk, net))
}

/// The day-two part of a VM's view (`stored` as recorded, `effective` as acted on).
pub(crate) fn ops_view(
    v: &View,
    stored: &VmRecord,
    effective: &VmRecord,
    p: &Placement,
    primary: Option<&CopyReport>,
) -> OpsView {
    let live = primary.filter(|r| r.live);
    let warning = if effective.ft == FtMode::On {
        need(primary).and_then(|n| ops::logging_warning(&stored.spec.name, n, measured_for(v, p)))
    } else {
        None
    };
    OpsView {
        monitoring: stored.ops.monitoring.clone(),
        resets: p.monitor.resets,
        last_reset: p.monitor.last.clone(),
        ft_schedule: stored.ops.ft_schedule.clone(),
        scheduled_ft_on: stored
            .ops
            .ft_schedule
            .as_ref()
            .map(|_| effective.ft != FtMode::Off),
        disk_read_bytes: live.map(|r| r.disk_read_bytes),
        net_in_bytes: live.map(|r| r.net_in_bytes),
        disk_read_avg_bps: live.map(|r| r.disk_read_avg_bps),
        net_in_avg_bps: live.map(|r| r.net_in_avg_bps),
        logging_warning: warning,
    }
}

fn placement_of(v: &View, name: &str) -> Placement {
    v.places
        .get(name)
        .map(|(p, _)| p.clone())
        .unwrap_or_default()
}

impl Verbs {
    /// `ft schedule NAME --on SPEC [--off SPEC] [--tz TZ]` or `--clear`.
    pub fn ft_schedule(&self, name: &str, req: ScheduleRequest) -> Result<VmView, ClusterError> {
        let invalid = |s: String| ClusterError::Invalid(s);
        let (rec, _) = self.record(name)?;
        if req.clear {
            if req.on.is_some() || req.off.is_some() || req.tz.is_some() {
                return Err(invalid("--clear takes no --on, --off or --tz".into()));
            }
            // FT stays as the schedule had it, now as the user's own setting.
            let now_on = ops::effective(&rec).ft;
            let view = self.update(name, |r| {
                r.ops.ft_schedule = None;
                r.ft = now_on;
                Ok(())
            })?;
            tracing::info!("FT schedule of {name} cleared; FT stays {now_on:?}");
            return Ok(view);
        }
        let Some(on) = req.on else {
            return Err(invalid(
                "give --on SPEC (and --off SPEC unless --on is a window), or --clear".into(),
            ));
        };
        let s = FtSchedule {
            on,
            off: req.off,
            tz: req.tz.unwrap_or_else(|| "UTC".into()),
        };
        if s.tz.len() > schedule::MAX_SPEC
            || s.off.as_ref().is_some_and(|o| o.len() > schedule::MAX_SPEC)
        {
            return Err(invalid("a SPEC or time zone too long".into()));
        }
        s.parse().map_err(|e| invalid(e.to_string()))?;
        if !crate::verbs::inside(&rec.spec.datastore, &self.shared) {
            return Err(ClusterError::Conflict(format!(
                "cannot schedule FT for {name}: its datastore {} is not on shared storage ({})",
                rec.spec.datastore.display(),
                self.shared.display()
            )));
        }
        let view = self.update(name, |r| {
            r.ops.ft_schedule = Some(s.clone());
            // The schedule decides from now on; a disabled FT stays disabled.
            if r.ft == FtMode::On {
                r.ft = FtMode::Off;
            }
            Ok(())
        })?;
        tracing::info!(
            "FT schedule of {name}: on {:?}, off {:?}, time zone {}",
            s.on,
            s.off,
            s.tz
        );
        Ok(view)
    }

    /// `vm monitor NAME ...`: VM monitoring's settings (the resets already counted stay).
    pub fn set_monitoring(&self, name: &str, m: ops::Monitoring) -> Result<VmView, ClusterError> {
        m.check().map_err(ClusterError::Invalid)?;
        let view = self.update(name, |r| {
            r.ops.monitoring = m.clone();
            Ok(())
        })?;
        tracing::info!(
            "VM monitoring of {name}: at most {} resets in {} s, heartbeat {:?} s",
            m.max_resets,
            m.window_secs,
            m.heartbeat_secs
        );
        Ok(view)
    }

    /// `ft sizing NAME`: the seed's formula from the VM's own measured reads and input.
    pub fn sizing(&self, name: &str) -> Result<Sizing, ClusterError> {
        let (rec, _) = self.record(name)?;
        let v = self.view()?;
        let p = placement_of(&v, name);
        let primary = p.primary.as_ref().and_then(|c| v.report(name, c));
        let live = primary.filter(|r| r.live).ok_or_else(|| {
            ClusterError::Conflict(format!(
                "{name} has no live copy: power it on and give it its load first"
            ))
        })?;
        let (disk, net) = ops::averages(live);
        let need = ops::need_mbit_s(disk, net);
        let measured = measured_for(&v, &p).cloned();
        Ok(Sizing {
            vm: rec.spec.name.clone(),
            primary_host: p.primary.as_ref().map(|c| c.host.clone()),
            secondary_host: p.secondary.as_ref().map(|c| c.host.clone()),
            disk_read_bytes: live.disk_read_bytes,
            net_in_bytes: live.net_in_bytes,
            log_bytes: live.log_bytes,
            disk_read_mbyte_s: disk,
            net_in_mbit_s: net,
            log_mbit_s: live.log_bps as f64 * 8.0 / 1e6,
            need_mbit_s: need,
            warning: ops::logging_warning(name, need, measured.as_ref()),
            measured,
        })
    }

    /// `host check-logging FROM TO`, carried out by FROM's own agent (`me`): measures the
    /// logging network to TO's check service and records the result.
    pub fn check_logging(
        &self,
        me: &str,
        from: &str,
        req: CheckRequest,
    ) -> Result<LogCheck, ClusterError> {
        let host = |h: &str| -> Result<HostRecord, ClusterError> {
            if !model::valid_name(h) {
                return Err(ClusterError::Invalid(format!("bad host name {h:?}")));
            }
            self.store
                .get_json::<HostRecord>(&model::host_key(h))?
                .map(|(r, _)| r)
                .ok_or_else(|| ClusterError::NotFound(format!("no connected host named {h}")))
        };
        let a = host(from)?;
        if from != me {
            return Err(ClusterError::Conflict(format!(
                "the check from {from} is made by {from}'s own agent: ask its API ({})",
                a.api
            )));
        }
        let b = host(&req.to)?;
        if b.name == a.name {
            return Err(ClusterError::Invalid(
                "check-logging needs two different hosts".into(),
            ));
        }
        let c = logcheck::measure(
            (&a.name, &a.log_ip),
            (&b.name, &b.log_ip),
            req.pings.unwrap_or(DEFAULT_PINGS),
            req.mib.unwrap_or(DEFAULT_MIB),
        )
        .map_err(|e| match e {
            logcheck::CheckError::Invalid(m) => ClusterError::Invalid(m),
            e @ logcheck::CheckError::Busy { .. } => ClusterError::Conflict(e.to_string()),
            e => ClusterError::Internal(e.to_string()),
        })?;
        self.store
            .put_json(&model::logcheck_key(&a.name, &b.name), &c, None)?;
        tracing::info!(
            "logging network {} -> {}: rtt min {} us, median {} us, p99 {} us; {:.1} MB/s ({:.2} Gbit/s)",
            a.name,
            b.name,
            c.rtt_min_us,
            c.rtt_median_us,
            c.rtt_p99_us,
            c.mbyte_s,
            c.gbit_s
        );
        Ok(c)
    }
}
