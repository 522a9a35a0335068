//! Day-two operations on a VM (issue 11): VM monitoring (a guest that traps or exits with
//! an error is reset, within limits; an opt-in heartbeat), FT on demand (the VM's FT follows
//! its [`crate::schedule`]) and FT sizing (the seed's formula from the VM's own measured
//! disk reads and network input, beside the logging bandwidth measured by
//! [`crate::logcheck`]).
//!
//! What is stored: the user's settings in the VM's record ([`VmOps`], written by the verbs),
//! the resets in its placement ([`MonitorState`], written by the master). What the master
//! decides from them is here, as pure functions of those records and the time, so that a
//! new master decides alike.

use serde::{Deserialize, Serialize};

use crate::logcheck::LogCheck;
use crate::model::{CopyReport, FtMode, VmRecord};
use crate::schedule::{self, FtSchedule};

/// vSphere VM Monitoring's default sensitivity: at most 3 resets in an hour.
pub const DEFAULT_MAX_RESETS: u32 = 3;
pub const DEFAULT_RESET_WINDOW_SECS: u64 = 3600;
/// Bounds on what a user may set.
pub const MAX_RESETS: u32 = 100;
pub const MAX_WINDOW_SECS: u64 = 7 * 86_400;
pub const MIN_HEARTBEAT_SECS: u64 = 2;
pub const MAX_HEARTBEAT_SECS: u64 = 86_400;

/// How a VM is monitored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Monitoring {
    /// Resets allowed within `window_secs`; one more failure leaves the VM off.
    #[serde(default = "default_max_resets")]
    pub max_resets: u32,
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// Opt-in liveness: the VM is reset when its live copy has executed no event (no
    /// clock read, no I/O: the guest's heartbeat) for this long. Only for guests that
    /// wake at least that often by themselves.
    #[serde(default)]
    pub heartbeat_secs: Option<u64>,
}

fn default_max_resets() -> u32 {
    DEFAULT_MAX_RESETS
}
fn default_window() -> u64 {
    DEFAULT_RESET_WINDOW_SECS
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring {
            max_resets: DEFAULT_MAX_RESETS,
            window_secs: DEFAULT_RESET_WINDOW_SECS,
            heartbeat_secs: None,
        }
    }
}

impl Monitoring {
    /// Within bounds, or why not.
    pub fn check(&self) -> Result<(), String> {
        if self.max_resets > MAX_RESETS {
            return Err(format!(
                "--max-resets {} is over {MAX_RESETS}",
                self.max_resets
            ));
        }
        if !(1..=MAX_WINDOW_SECS).contains(&self.window_secs) {
            return Err(format!(
                "--reset-window-secs {} is outside 1..={MAX_WINDOW_SECS}",
                self.window_secs
            ));
        }
        if let Some(h) = self.heartbeat_secs
            && !(MIN_HEARTBEAT_SECS..=MAX_HEARTBEAT_SECS).contains(&h)
        {
            return Err(format!(
                "--heartbeat {h} is outside {MIN_HEARTBEAT_SECS}..={MAX_HEARTBEAT_SECS} seconds"
            ));
        }
        Ok(())
    }
}

/// The day-two settings of a VM, in its record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
pub struct VmOps {
    #[serde(default)]
    pub monitoring: Monitoring,
    /// FT on demand: while set, the VM's FT follows it (`ft turn-on/off` are refused).
    #[serde(default)]
    pub ft_schedule: Option<FtSchedule>,
}

/// The master's record of monitoring resets, in the VM's placement.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema)]
pub struct MonitorState {
    /// When the VM was reset within the current window (Unix ms).
    #[serde(default)]
    pub recent: Vec<u64>,
    /// Resets ever (statistics).
    #[serde(default)]
    pub resets: u64,
    /// Why the last reset happened.
    #[serde(default)]
    pub last: Option<String>,
}

/// The guest ended in a way VM monitoring resets: a trap, or a non-zero exit code. An exit
/// with code 0 is the guest ending by itself; a stop by the host is the host's doing.
pub fn unexpected_end(guest_exit: &str) -> bool {
    guest_exit.starts_with("trap")
        || guest_exit
            .strip_prefix("exit code ")
            .is_some_and(|c| c.trim() != "0")
}

/// What monitoring decides about a VM that failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Reset it (a fresh power-on); the reset is recorded.
    Reset,
    /// It failed too often: left off, saying why.
    LeaveOff(String),
}

/// Record a failure of the VM at `now_ms` for `why`: reset it, or, past the limit, leave
/// it off.
pub fn on_failure(m: &Monitoring, st: &mut MonitorState, now_ms: u64, why: &str) -> Verdict {
    let window_ms = m.window_secs.saturating_mul(1000);
    st.recent.retain(|t| now_ms.saturating_sub(*t) < window_ms);
    if st.recent.len() >= m.max_resets as usize {
        return Verdict::LeaveOff(format!(
            "{why}; reset {} times within {} s (VM monitoring's limit): left off",
            st.recent.len(),
            m.window_secs
        ));
    }
    st.recent.push(now_ms);
    st.resets += 1;
    st.last = Some(why.to_string());
    Verdict::Reset
}

/// The record as the master and the views act on it: while a schedule is set, FT is what
/// the schedule wants now (kept disabled if the user disabled it).
pub fn effective(r: &VmRecord) -> std::borrow::Cow<'_, VmRecord> {
    let Some(s) = &r.ops.ft_schedule else {
        return std::borrow::Cow::Borrowed(r);
    };
    let mut e = r.clone();
    e.ft = match (schedule::wants_on_now(s), r.ft) {
        (false, _) => FtMode::Off,
        (true, FtMode::Disabled) => FtMode::Disabled,
        (true, _) => FtMode::On,
    };
    std::borrow::Cow::Owned(e)
}

/// Day-two figures of a VM, as `vm show` and the sizing verb present them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
pub struct OpsView {
    pub monitoring: Monitoring,
    /// Monitoring resets ever, and the last one's reason.
    pub resets: u64,
    pub last_reset: Option<String>,
    pub ft_schedule: Option<FtSchedule>,
    /// What the schedule wants now (None without one).
    pub scheduled_ft_on: Option<bool>,
    /// The live copy's counters: disk bytes read, network bytes received (frames).
    pub disk_read_bytes: Option<u64>,
    pub net_in_bytes: Option<u64>,
    /// Their averages since the copy went live, bytes per second.
    pub disk_read_avg_bps: Option<u64>,
    pub net_in_avg_bps: Option<u64>,
    /// A warning about the logging network (the pair's measured bandwidth cannot carry the
    /// VM's sized need).
    pub logging_warning: Option<String>,
}

/// `GET /api/v1/vms/{name}/ft/sizing`: the seed's formula for the VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Sizing {
    pub vm: String,
    pub primary_host: Option<String>,
    pub secondary_host: Option<String>,
    /// Cumulative counters of the live copy (for a caller's own window).
    pub disk_read_bytes: u64,
    pub net_in_bytes: u64,
    pub log_bytes: u64,
    /// Averages since the live copy went live.
    pub disk_read_mbyte_s: f64,
    pub net_in_mbit_s: f64,
    /// The logging channel's rate at the last report, Mbit/s.
    pub log_mbit_s: f64,
    /// (disk reads MB/s × 8 + network input Mbit/s) × 1.2.
    pub need_mbit_s: f64,
    /// The last measurement (`host check-logging`) between the pair's hosts, if any.
    pub measured: Option<LogCheck>,
    pub warning: Option<String>,
}

/// The seed's formula: (average disk reads MB/s × 8 + average network input Mbit/s) × 1.2,
/// in Mbit/s.
pub fn need_mbit_s(disk_read_mbyte_s: f64, net_in_mbit_s: f64) -> f64 {
    (disk_read_mbyte_s * 8.0 + net_in_mbit_s) * 1.2
}

/// The figures of a live copy's report: (disk MB/s, network Mbit/s) averages.
pub fn averages(r: &CopyReport) -> (f64, f64) {
    (
        r.disk_read_avg_bps as f64 / 1e6,
        r.net_in_avg_bps as f64 * 8.0 / 1e6,
    )
}

/// A warning when the measured logging bandwidth cannot carry the need.
pub fn logging_warning(vm: &str, need_mbit_s: f64, measured: Option<&LogCheck>) -> Option<String> {
    let m = measured?;
    let have = m.gbit_s * 1000.0;
    (need_mbit_s > have).then(|| {
        format!(
            "the logging network between {} and {} measured {have:.0} Mbit/s, less than the {need_mbit_s:.0} Mbit/s {vm} is sized to need",
            m.from, m.to
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traps_and_error_exits_are_unexpected_a_clean_exit_is_not() {
        assert!(unexpected_end("trap: wasm trap: unreachable"));
        assert!(unexpected_end("exit code 3"));
        assert!(!unexpected_end("exit code 0"));
        assert!(!unexpected_end("stopped by the host"));
    }

    #[test]
    fn resets_within_the_window_up_to_the_limit() {
        let m = Monitoring {
            max_resets: 2,
            window_secs: 60,
            heartbeat_secs: None,
        };
        let mut st = MonitorState::default();
        assert_eq!(on_failure(&m, &mut st, 1_000, "trap"), Verdict::Reset);
        assert_eq!(on_failure(&m, &mut st, 2_000, "trap"), Verdict::Reset);
        match on_failure(&m, &mut st, 3_000, "trap") {
            Verdict::LeaveOff(why) => assert!(why.contains("2 times within 60 s"), "{why}"),
            v => panic!("{v:?}"),
        }
        // A window later, it may be reset again.
        assert_eq!(on_failure(&m, &mut st, 70_000, "trap"), Verdict::Reset);
        assert_eq!(st.resets, 3);
        assert!(m.check().is_ok());
        let bad = Monitoring {
            heartbeat_secs: Some(1),
            ..m
        };
        assert!(bad.check().unwrap_err().contains("heartbeat"));
    }

    #[test]
    fn a_schedule_decides_ft_and_keeps_a_disabled_ft_disabled() {
        let mut r = crate::model::fixtures::vm("kvd", FtMode::Off, 64);
        assert_eq!(effective(&r).ft, FtMode::Off);
        r.ops.ft_schedule = Some(FtSchedule {
            on: "daily 00:00-23:59".into(),
            off: None,
            tz: "UTC".into(),
        });
        // On all day but the day's last minute.
        let last_minute = (crate::model::now_ms() / 1000) % 86_400 >= 86_340;
        let want = if last_minute { FtMode::Off } else { FtMode::On };
        assert_eq!(effective(&r).ft, want);
        r.ft = FtMode::Disabled;
        if !last_minute {
            assert_eq!(effective(&r).ft, FtMode::Disabled);
        }
        r.ops.ft_schedule.as_mut().unwrap().on = "Mon 00:00".into();
        assert_eq!(
            effective(&r).ft,
            FtMode::Off,
            "a schedule that no longer parses: off"
        );
    }

    #[test]
    fn a_warning_only_when_the_measured_network_is_short() {
        let m = LogCheck {
            from: "h1".into(),
            to: "h2".into(),
            from_ip: "10.78.0.11".into(),
            to_ip: "10.78.0.12".into(),
            pings: 10,
            rtt_min_us: 10,
            rtt_median_us: 20,
            rtt_p99_us: 30,
            bytes: 1 << 20,
            secs: 1.0,
            mbyte_s: 1.25,
            gbit_s: 0.01,
            at_ms: 0,
        };
        let w = logging_warning("kvd", 120.0, Some(&m)).unwrap();
        assert!(w.contains("10 Mbit/s") && w.contains("120 Mbit/s"), "{w}");
        assert!(logging_warning("kvd", 5.0, Some(&m)).is_none());
        assert!(
            logging_warning("kvd", 5000.0, None).is_none(),
            "not measured: no word"
        );
    }

    #[test]
    fn the_seeds_formula() {
        // 10 MB/s of reads and 20 Mbit/s of input: (80 + 20) × 1.2.
        assert!((need_mbit_s(10.0, 20.0) - 120.0).abs() < 1e-9);
    }
}
