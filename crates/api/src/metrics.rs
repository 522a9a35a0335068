//! `/metrics`: the cluster as this agent reads it from the store, in the Prometheus text
//! exposition format (0.0.4). Names follow Prometheus conventions: a `tandem_` prefix,
//! `_total` for counters, base units (seconds, bytes).
//!
//! Invariants: every family has one `# HELP` and one `# TYPE` line before its samples;
//! label values are escaped (`\\`, `\"`, `\n`); a store that cannot be read is said by
//! `tandem_store_up 0`, never by a failing scrape.

use std::fmt::Write;

use cluster::model::{FtStatus, HostView, Power, VmView};

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn family<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out }
}

/// The exposition for agent `me`: `state` is the hosts and VMs, or `None` if the store
/// could not be read.
pub fn render(me: &str, state: Option<(&[HostView], &[VmView])>) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "tandem_store_up",
        "gauge",
        "Whether this agent could read the cluster store for this scrape.",
    )
    .sample("tandem_store_up", &[], f64::from(u8::from(state.is_some())));
    let Some((hosts, vms)) = state else {
        return out;
    };
    let is_master = hosts.iter().any(|h| h.name == me && h.master);
    family(
        &mut out,
        "tandem_agent_master",
        "gauge",
        "1 if this agent is the cluster's HA master.",
    )
    .sample(
        "tandem_agent_master",
        &[("host", me)],
        f64::from(u8::from(is_master)),
    );
    type PerHost = fn(&HostView) -> f64;
    let per_host: [(&str, &str, PerHost); 3] = [
        ("tandem_host_vms", "VM copies running on the host.", |h| {
            h.vms as f64
        }),
        (
            "tandem_host_ft_vms",
            "FT copies (primaries and secondaries) on the host.",
            |h| h.ft_vms as f64,
        ),
        (
            "tandem_host_maintenance",
            "1 if the host is in maintenance mode.",
            |h| f64::from(u8::from(h.maintenance)),
        ),
    ];
    for (name, help, value) in per_host {
        let mut f = family(&mut out, name, "gauge", help);
        for h in hosts {
            f.sample(name, &[("host", &h.name)], value(h));
        }
    }
    {
        let name = "tandem_vm_ft_state";
        let mut f = family(
            &mut out,
            name,
            "gauge",
            "The VM's FT status: 1 for the state it is in, 0 for the others.",
        );
        for v in vms {
            for (state, s) in [
                ("protected", FtStatus::Protected),
                ("not_protected", FtStatus::NotProtected),
                ("disabled", FtStatus::Disabled),
                ("off", FtStatus::Off),
            ] {
                f.sample(
                    name,
                    &[("vm", &v.name), ("state", state)],
                    f64::from(u8::from(v.ft == s)),
                );
            }
        }
    }
    type Get = fn(&VmView) -> Option<f64>;
    let per_vm: [(&str, &str, &str, Get); 12] = [
        (
            "tandem_vm_powered_on",
            "gauge",
            "1 if the VM is powered on.",
            |v| Some(f64::from(u8::from(v.power == Power::On))),
        ),
        (
            "tandem_vm_secondary_lag_events",
            "gauge",
            "Events the primary executed that the secondary has not acknowledged.",
            |v| v.lag_events.map(|x| x as f64),
        ),
        (
            "tandem_vm_secondary_lag_seconds",
            "gauge",
            "Age of the oldest event the secondary has not acknowledged.",
            |v| v.lag_ms.map(|x| x as f64 / 1000.0),
        ),
        (
            "tandem_vm_events_total",
            "counter",
            "Events the live copy executed (the VM's position in its event log).",
            |v| v.events.map(|x| x as f64),
        ),
        (
            "tandem_vm_log_bytes_total",
            "counter",
            "Bytes the live copy sent on its logging channel (since it went live).",
            |v| v.log_bytes.map(|x| x as f64),
        ),
        (
            "tandem_vm_log_bandwidth_bytes_per_second",
            "gauge",
            "Logging-channel bandwidth over the agent's last report.",
            |v| v.log_bps.map(|x| x as f64),
        ),
        (
            "tandem_vm_outputs_held",
            "gauge",
            "Outputs the primary holds back now until the secondary has their events.",
            |v| v.outputs_held.map(|x| x as f64),
        ),
        (
            "tandem_vm_outputs_held_total",
            "counter",
            "Outputs the primary ever held back by the output rule (since it went live).",
            |v| v.outputs_held_total.map(|x| x as f64),
        ),
        (
            "tandem_vm_failovers_total",
            "counter",
            "Failovers: the secondary went live.",
            |v| Some(v.failovers as f64),
        ),
        (
            "tandem_vm_reprotections_total",
            "counter",
            "Times the VM was protected again after losing protection.",
            |v| Some(v.reprotections as f64),
        ),
        (
            "tandem_vm_ha_restarts_total",
            "counter",
            "HA restarts of the VM from its datastore.",
            |v| Some(v.restarts as f64),
        ),
        (
            "tandem_vm_reprotect_duration_seconds",
            "gauge",
            "How long the last re-protection took.",
            |v| v.reprotect_ms.map(|x| x as f64 / 1000.0),
        ),
    ];
    for (name, kind, help, get) in per_vm {
        let mut f = family(&mut out, name, kind, help);
        for v in vms {
            if let Some(x) = get(v) {
                f.sample(name, &[("vm", &v.name)], x);
            }
        }
    }
    out
}
