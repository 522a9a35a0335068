//! The day-two verbs on the command line (issue 11): `ft schedule`, `ft sizing`, `host
//! check-logging`, VM monitoring's flags of `vm create`, and their lines in `vm show` and
//! `ft turn-on`. Each is REST calls through `api::client::Client`, as in `verbs_cli`.

use std::time::{Duration, Instant};

use api::client::Client;
use cluster::logcheck::{CheckRequest, LogCheck};
use cluster::model::VmView;
use cluster::ops::{Monitoring, Sizing};
use cluster::verbs::ScheduleRequest;

use crate::verbs_cli::{
    BAD_REQUEST, Fail, OK, Target, bad, bytes, check_name, finish, holds, print_json,
};

/// VM monitoring's flags of `vm create`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MonitoringArgs {
    /// VM monitoring: resets allowed within --reset-window-secs before the VM is left off
    /// (a guest that traps or exits with a non-zero code is reset); default 3.
    #[arg(long, value_name = "N")]
    pub max_resets: Option<u32>,
    /// VM monitoring's window; default 3600.
    #[arg(long, value_name = "SECS")]
    pub reset_window_secs: Option<u64>,
    /// Opt-in liveness: reset the VM when its guest executes no event (no clock read, no
    /// I/O) for SECS. Only for guests that wake by themselves at least that often.
    #[arg(long, value_name = "SECS")]
    pub heartbeat: Option<u64>,
}

impl MonitoringArgs {
    /// The request's monitoring (None: the cluster's defaults).
    pub fn request(&self) -> Result<Option<Monitoring>, Fail> {
        if self.max_resets.is_none() && self.reset_window_secs.is_none() && self.heartbeat.is_none()
        {
            return Ok(None);
        }
        let d = Monitoring::default();
        let m = Monitoring {
            max_resets: self.max_resets.unwrap_or(d.max_resets),
            window_secs: self.reset_window_secs.unwrap_or(d.window_secs),
            heartbeat_secs: self.heartbeat,
        };
        m.check().map_err(bad)?;
        Ok(Some(m))
    }
}

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub monitoring: MonitoringArgs,
    /// Stop checking the VM's heartbeat.
    #[arg(long, conflicts_with = "heartbeat")]
    pub no_heartbeat: bool,
    #[command(flatten)]
    pub target: Target,
}

pub fn vm_monitor(a: &MonitorArgs) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        let client = a.target.client()?;
        let now = client.vm(&a.name)?.ops.monitoring;
        let f = &a.monitoring;
        let m = Monitoring {
            max_resets: f.max_resets.unwrap_or(now.max_resets),
            window_secs: f.reset_window_secs.unwrap_or(now.window_secs),
            heartbeat_secs: if a.no_heartbeat {
                None
            } else {
                f.heartbeat.or(now.heartbeat_secs)
            },
        };
        m.check().map_err(bad)?;
        let v = client.set_monitoring(&a.name, &m)?;
        show_ops(&v);
        Ok(OK)
    })())
}

#[derive(clap::Args, Debug)]
pub struct ScheduleArgs {
    /// The VM's name.
    pub name: String,
    /// When FT turns on: a weekly window `DAYS HH:MM-HH:MM` (FT on inside it, off
    /// outside, no --off), or an instant: `DAYS HH:MM` or cron (`MIN HOUR DOM MON DOW`,
    /// or 6 fields with seconds first).
    #[arg(long, value_name = "SPEC", allow_hyphen_values = true)]
    pub on: Option<String>,
    /// When FT turns off (an instant; with an instant --on).
    #[arg(long, value_name = "SPEC", allow_hyphen_values = true)]
    pub off: Option<String>,
    /// The schedule's time zone: UTC (default), UTC+HH:MM, UTC-HH:MM, or host (the
    /// master's).
    #[arg(long, value_name = "TZ")]
    pub tz: Option<String>,
    /// Remove the schedule (FT stays as it is now).
    #[arg(long, conflicts_with_all = ["on", "off", "tz"])]
    pub clear: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(clap::Args, Debug)]
pub struct SizingArgs {
    /// The VM's name.
    pub name: String,
    /// Also measure over this window (two looks SECS apart), beside the averages since
    /// the VM's copy went live; 0: only those.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub secs: u64,
    /// Print the API's JSON (the averages since live only).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(clap::Args, Debug)]
pub struct CheckLoggingArgs {
    /// The host that measures (its agent sends).
    pub from: String,
    /// The host measured against.
    pub to: String,
    /// Round trips of 64-byte messages.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub pings: u32,
    /// MiB sent in bulk for the throughput.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub mib: u32,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: Target,
}

pub fn ft_schedule(a: &ScheduleArgs) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        if !a.clear && a.on.is_none() {
            return Err(bad(
                "give --on SPEC (and --off SPEC unless --on is a window), or --clear".into(),
            ));
        }
        let req = ScheduleRequest {
            on: a.on.clone(),
            off: a.off.clone(),
            tz: a.tz.clone(),
            clear: a.clear,
        };
        let v = a.target.client()?.ft_schedule(&a.name, &req)?;
        match &v.ops.ft_schedule {
            Some(s) => println!(
                "{}: FT schedule {}; the schedule wants FT {} now",
                v.name,
                s.describe(),
                if v.ops.scheduled_ft_on == Some(true) {
                    "on"
                } else {
                    "off"
                }
            ),
            None => println!("{}: no FT schedule", v.name),
        }
        println!("{}", holds(&v));
        Ok(OK)
    })())
}

fn mbit(bps: f64) -> f64 {
    bps * 8.0 / 1e6
}

/// What a need of `need` Mbit/s is on a link of `gbit` Gbit/s.
fn on_link(need: f64, gbit: f64) -> String {
    let pct = need / (gbit * 1000.0) * 100.0;
    let verdict = if pct <= 70.0 {
        "fits"
    } else if pct <= 100.0 {
        "fits, with little headroom"
    } else {
        "does NOT fit"
    };
    format!("{pct:.2}% of a {gbit} Gbit/s link: {verdict}")
}

pub fn ft_sizing(a: &SizingArgs) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        if a.secs > 600 {
            return Err(bad(format!("--secs {} is over 600", a.secs)));
        }
        let client = a.target.client()?;
        if a.json {
            return print_json(&client.get_raw(&format!("/api/v1/vms/{}/ft/sizing", a.name))?);
        }
        let first = client.ft_sizing(&a.name)?;
        let t0 = Instant::now();
        println!(
            "{}: FT sizing (primary {}, secondary {})",
            first.vm,
            first.primary_host.as_deref().unwrap_or("-"),
            first.secondary_host.as_deref().unwrap_or("-")
        );
        let line = |what: &str, disk: f64, net: f64, log: f64| {
            let need = cluster::ops::need_mbit_s(disk, net);
            println!("{what}:");
            println!("  disk reads:        {disk:10.3} MB/s");
            println!("  network input:     {net:10.3} Mbit/s");
            println!(
                "  need:              {need:10.3} Mbit/s   = ({disk:.3} x 8 + {net:.3}) x 1.2"
            );
            println!("  logging measured:  {log:10.3} Mbit/s   (the FT logging channel itself)");
            println!("  on 1 Gbit/s:       {}", on_link(need, 1.0));
            println!("  on 10 Gbit/s:      {}", on_link(need, 10.0));
            need
        };
        line(
            "since the copy went live",
            first.disk_read_mbyte_s,
            first.net_in_mbit_s,
            first.log_mbit_s,
        );
        if a.secs > 0 {
            std::thread::sleep(Duration::from_secs(a.secs));
            let second: Sizing = client.ft_sizing(&a.name)?;
            let changed = second.primary_host != first.primary_host
                || second.net_in_bytes < first.net_in_bytes
                || second.disk_read_bytes < first.disk_read_bytes;
            if changed {
                // Another live copy (a failover or a reset): its counters started afresh.
                println!(
                    "over the last {} s: the live copy changed meanwhile; run it again",
                    a.secs
                );
            } else {
                let dt = t0.elapsed().as_secs_f64();
                let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
                line(
                    &format!("over the last {dt:.1} s"),
                    d(first.disk_read_bytes, second.disk_read_bytes) / 1e6,
                    mbit(d(first.net_in_bytes, second.net_in_bytes)),
                    mbit(d(first.log_bytes, second.log_bytes)),
                );
            }
        }
        match &first.measured {
            Some(m) => println!(
                "logging network {} -> {} (measured {}): {:.3} Gbit/s, rtt median {} us",
                m.from,
                m.to,
                age(m.at_ms),
                m.gbit_s,
                m.rtt_median_us
            ),
            None => println!(
                "logging network: not measured yet (`tandem host check-logging {} OTHER`)",
                first.primary_host.as_deref().unwrap_or("HOST")
            ),
        }
        if let Some(w) = &first.warning {
            println!("warning: {w}");
        }
        Ok(OK)
    })())
}

fn age(at_ms: u64) -> String {
    let secs = cluster::model::now_ms().saturating_sub(at_ms) / 1000;
    format!("{secs} s ago")
}

pub fn check_logging(a: &CheckLoggingArgs) -> u8 {
    finish((|| {
        check_name("host", &a.from)?;
        check_name("host", &a.to)?;
        if a.from == a.to {
            return Err(Fail(BAD_REQUEST, "give two different hosts".into()));
        }
        let client = a.target.client()?;
        let hosts = client.hosts()?;
        let Some(from) = hosts.iter().find(|h| h.name == a.from && h.responding()) else {
            return Err(Fail(
                BAD_REQUEST,
                format!("no connected host named {}", a.from),
            ));
        };
        // The measuring host's own agent sends: its API is the one asked.
        let own = client.only(&from.api).with_timeout(Duration::from_secs(90));
        let req = CheckRequest {
            to: a.to.clone(),
            pings: Some(a.pings),
            mib: Some(a.mib),
        };
        let c: LogCheck = own.check_logging(&a.from, &req)?;
        if a.json {
            let text = serde_json::to_string(&c).map_err(|e| Fail(1, e.to_string()))?;
            return print_json(&text);
        }
        println!(
            "logging network {} ({}) -> {} ({}):",
            c.from, c.from_ip, c.to, c.to_ip
        );
        println!(
            "  round trip:  min {} us, median {} us, p99 {} us ({} pings of 64 bytes)",
            c.rtt_min_us, c.rtt_median_us, c.rtt_p99_us, c.pings
        );
        println!(
            "  throughput:  {:.1} MB/s = {:.3} Gbit/s ({} in {:.2} s)",
            c.mbyte_s,
            c.gbit_s,
            bytes(c.bytes),
            c.secs
        );
        Ok(OK)
    })())
}

/// After `ft turn-on`: the pair's measured logging bandwidth against the VM's need.
pub fn warn_logging(client: &Client, name: &str) {
    if let Ok(v) = client.vm(name)
        && let Some(w) = &v.ops.logging_warning
    {
        println!("warning: {w}");
        eprintln!("tandem: warning: {w}");
    }
}

/// `vm show`'s day-two lines.
pub fn show_ops(v: &VmView) {
    let o = &v.ops;
    println!(
        "monitoring:       at most {} resets in {} s{}; {} so far{}",
        o.monitoring.max_resets,
        o.monitoring.window_secs,
        o.monitoring
            .heartbeat_secs
            .map(|h| format!(", heartbeat {h} s"))
            .unwrap_or_default(),
        o.resets,
        o.last_reset
            .as_ref()
            .map(|w| format!(" (last: {w})"))
            .unwrap_or_default()
    );
    if let Some(s) = &o.ft_schedule {
        println!(
            "ft schedule:      {}; FT {} now",
            s.describe(),
            if o.scheduled_ft_on == Some(true) {
                "on"
            } else {
                "off"
            }
        );
    }
    if let (Some(d), Some(n)) = (o.disk_read_avg_bps, o.net_in_avg_bps) {
        println!(
            "reads / input:    {:.3} MB/s disk, {:.3} Mbit/s network (averages since live)",
            d as f64 / 1e6,
            mbit(n as f64)
        );
    }
    if let Some(w) = &o.logging_warning {
        println!("warning:          {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_say_whether_the_need_fits() {
        assert!(on_link(120.0, 1.0).starts_with("12.00% of a 1 Gbit/s link: fits"));
        assert!(on_link(1200.0, 1.0).contains("does NOT fit"));
        assert!(on_link(1200.0, 10.0).contains("12.00%"));
    }

    #[test]
    fn monitoring_flags_are_checked() {
        let none = MonitoringArgs::default();
        assert!(none.request().unwrap().is_none());
        let m = MonitoringArgs {
            max_resets: Some(2),
            reset_window_secs: Some(600),
            heartbeat: None,
        };
        let got = m.request().unwrap().unwrap();
        assert_eq!((got.max_resets, got.window_secs), (2, 600));
        let bad = MonitoringArgs {
            heartbeat: Some(0),
            ..Default::default()
        };
        assert!(bad.request().is_err());
    }
}
