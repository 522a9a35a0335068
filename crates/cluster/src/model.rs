//! The cluster's state, as kept in the store (etcd), and the names of its keys.
//!
//! Keys, all below [`PREFIX`] (values are JSON):
//! - `hosts/<host>` → [`HostRecord`], under the host's lease (a dead host's record vanishes);
//! - `master` → [`MasterRecord`], under the master's lease (the election: created only if
//!   absent);
//! - `vms/<vm>` → [`VmRecord`], desired state, written by the verbs only (no lease);
//! - `place/<vm>` → [`Placement`], which copy runs where, written by the master only;
//! - `copies/<host>/<vm>` → [`CopyReport`], actual state, written by the host's agent under
//!   its lease. A copy's report is also its lock: the master starts a copy of the VM
//!   elsewhere only once this key is gone, and an agent that cannot renew its lease stops
//!   its copies before the lease can expire (the isolation response);
//! - `ports/<port>` → the VM holding that logging-channel port (created with the VM);
//! - `logcheck/<from>/<to>` → [`crate::logcheck::LogCheck`], the last measurement of the
//!   logging network between two hosts (written by the verb that measured it);
//! - `kill/<vm>/<copy id>` → `""`, a request (test-failover, restart-secondary, disable) that the
//!   agent running that copy carries out and deletes; → [`HANDOVER`], a planned switch the
//!   master asks of a live copy (maintenance mode): its agent signals the copy;
//! - `maintenance/<host>` → [`MaintenanceRecord`], desired state: the host takes nothing and
//!   the master moves everything off it.
//!   agent running that copy carries out and deletes;
//! - `timeline/<ms>-<host>-<seq>` → `timeline::TimelineEvent`, the events the dashboard
//!   shows (bounded; written by the master for its decisions, by agents for verbs).
//!
//! Invariant: one writer per key family (verbs: `vms/`, `kill/` kills, `maintenance/`,
//! `logcheck/`; master: `place/`, `master`, `kill/` handovers; each agent: its own
//! `hosts/<host>` and `copies/<host>/`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Every key of a cluster starts with this.
pub const PREFIX: &str = "/tandem/";

/// At most this many FT copies (primaries and secondaries together) on one host.
pub const MAX_FT_COPIES_PER_HOST: usize = 4;

/// The longest VM or host name.
pub const MAX_NAME: usize = 63;

/// A VM or host name: 1-63 lowercase letters, digits and '-', starting with a letter or
/// digit. It names keys and folders, so nothing else is accepted.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn host_key(host: &str) -> String {
    format!("{PREFIX}hosts/{host}")
}
pub fn master_key() -> String {
    format!("{PREFIX}master")
}
pub fn vm_key(vm: &str) -> String {
    format!("{PREFIX}vms/{vm}")
}
pub fn place_key(vm: &str) -> String {
    format!("{PREFIX}place/{vm}")
}
pub fn copy_key(host: &str, vm: &str) -> String {
    format!("{PREFIX}copies/{host}/{vm}")
}
pub fn kill_key(vm: &str, copy: u64) -> String {
    format!("{PREFIX}kill/{vm}/{copy}")
}
pub fn maintenance_key(host: &str) -> String {
    format!("{PREFIX}maintenance/{host}")
}
/// The value of a `kill/` request that asks a live copy to hand its VM over to its
/// secondary instead of dying.
pub const HANDOVER: &[u8] = b"handover";

/// A host in maintenance mode, as the verb that put it there recorded it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MaintenanceRecord {
    pub since_ms: u64,
}

pub fn logcheck_key(from: &str, to: &str) -> String {
    format!("{PREFIX}logcheck/{from}/{to}")
}
pub fn port_key(port: u16) -> String {
    format!("{PREFIX}ports/{port}")
}

/// A host, as its agent registers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct HostRecord {
    pub name: String,
    /// Tandem's version on the host.
    pub version: String,
    /// What snapshots and logs of this host's engine are compatible with (see
    /// `machine::engine_fingerprint`): copies of one VM must agree on it.
    pub fingerprint: String,
    /// The agent's REST API, `http://IP:PORT`.
    pub api: String,
    /// The host's address on the logging network.
    pub log_ip: String,
    /// Memory the host offers VMs, MiB.
    pub memory_mib: u64,
    /// In maintenance mode, a host takes no new copy.
    #[serde(default)]
    pub maintenance: bool,
    /// When the agent started (Unix ms).
    pub started_ms: u64,
    /// The hosts this host reaches on the logging network (`None` until first probed).
    #[serde(default)]
    pub log_peers: Option<Vec<String>>,
    /// The hosts its last probe tried and did not reach (`None` until first probed, or from
    /// an agent that does not say). A host neither reached nor missed registered since: the
    /// record does not know whether this host reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_missed: Option<Vec<String>>,
    /// This registration of the host (its lease): a copy placed under an earlier one died
    /// with that agent and is never started by a later one.
    #[serde(default)]
    pub incarnation: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MasterRecord {
    pub host: String,
    pub since_ms: u64,
}

#[derive(
    Clone,
    Copy,
    Debug,
    Serialize,
    Deserialize,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Medium,
    Low,
    /// Never HA-restarted.
    Disabled,
}

#[derive(
    Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    On,
    #[default]
    Off,
}

/// What the user asked of FT for a VM.
#[derive(
    Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FtMode {
    /// No secondary.
    #[default]
    Off,
    /// A secondary, placed and running.
    On,
    /// The secondary's placement kept, its copy stopped.
    Disabled,
}

/// The VM's NIC: its own MAC and address (the bridge is each host's VM bridge).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Nic {
    pub mac: String,
    /// CIDR, e.g. `10.77.0.10/24`.
    pub ip: String,
}

/// What a VM is: fixed at `vm create`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct VmSpec {
    pub name: String,
    /// The guest module (a path every host reads: on shared storage, or installed alike).
    pub wasm: PathBuf,
    /// The VM's datastore folder (on shared storage).
    pub datastore: PathBuf,
    #[serde(default)]
    pub nic: Option<Nic>,
    /// TCP ports the VM listens on.
    #[serde(default)]
    pub listen: Vec<u16>,
    pub memory_mib: u64,
    #[serde(default)]
    pub restart_priority: Priority,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// The VM's logging-channel port on the host of its primary (unique in the cluster).
    pub log_port: u16,
}

/// Desired state of a VM: its spec and what the user last asked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub power: Power,
    pub ft: FtMode,
    /// `power-on --host`: where the primary should start (if it may).
    #[serde(default)]
    pub want_host: Option<String>,
    /// `migrate-secondary --to`: where the secondary should move.
    #[serde(default)]
    pub secondary_to: Option<String>,
    /// How many times the VM was powered on: a power-on after its guest ended starts it
    /// again (see [`Placement::ended`]).
    #[serde(default)]
    pub boots: u64,
    /// Day-two settings: VM monitoring, FT schedule.
    #[serde(default)]
    pub ops: crate::ops::VmOps,
}

/// What a copy is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// One copy of a VM on one host, as the master placed it. `id` is unique in the cluster
/// for the copy's life: a copy that goes live keeps its id as it becomes the primary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Copy {
    pub id: u64,
    pub host: String,
    /// The host's incarnation when the copy was placed there.
    #[serde(default)]
    pub incarnation: i64,
}

/// Which copies of a VM run where: the master's decision.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
pub struct Placement {
    pub primary: Option<Copy>,
    pub secondary: Option<Copy>,
    /// FT disabled: the secondary's host kept, its copy not running.
    #[serde(default)]
    pub secondary_parked: Option<String>,
    /// The next copy id to hand out for this VM.
    pub next_id: u64,
    /// Why the VM is not protected, when it should be (for `vm list`).
    #[serde(default)]
    pub reason: Option<String>,
    /// Failovers and re-protections seen (statistics).
    #[serde(default)]
    pub failovers: u64,
    #[serde(default)]
    pub reprotections: u64,
    /// Handovers the copies made by themselves (not failovers: no copy failed), and why
    /// the latest was made (`primary lost its storage (...)`).
    #[serde(default)]
    pub handovers: u64,
    #[serde(default)]
    pub last_handover: Option<String>,
    /// HA restarts of this VM.
    #[serde(default)]
    pub restarts: u64,
    /// When the recent copies of the VM were placed after one was lost (Unix ms): too many
    /// in a short time and the VM is left off (a copy that cannot start anywhere).
    #[serde(default)]
    pub recent_starts: Vec<u64>,
    /// When the VM last lost protection (Unix ms), to measure re-protection.
    #[serde(default)]
    pub unprotected_since_ms: Option<u64>,
    /// How long the last re-protection took (ms): from losing protection to protected again.
    #[serde(default)]
    pub last_reprotect_ms: Option<u64>,
    /// The guest ended by itself (exited, or trapped) in boot `.0`, as `.1` says: the VM is
    /// off until powered on again, never restarted by HA (its copies would end alike).
    #[serde(default)]
    pub ended: Option<(u64, String)>,
    /// The VM is moving to hosts of another Tandem version (a rolling upgrade): its
    /// secondary is a copy placed for the move, which may run another version.
    #[serde(default)]
    pub moving: bool,
    /// VM monitoring's resets.
    #[serde(default)]
    pub monitor: crate::ops::MonitorState,
}

/// How a copy's process is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CopyState {
    /// Started, not yet running the VM (a secondary joining, a primary booting).
    Starting,
    Running,
    /// The process ended; `exit` says how.
    Exited,
}

/// A copy as its host's agent sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CopyReport {
    pub vm: String,
    pub id: u64,
    /// The role the copy was started in.
    pub role: Role,
    pub pid: u32,
    pub state: CopyState,
    /// This copy is the VM's live one (it writes the VM's status on shared storage).
    pub live: bool,
    /// Live and protected by a caught-up secondary.
    pub protected: bool,
    /// How the guest ended, as the live copy recorded it (`None`: it did not end by itself;
    /// a copy that failed to start or was killed has none).
    #[serde(default)]
    pub guest_exit: Option<String>,
    /// Events the live copy executed, and the secondary acknowledged.
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub acked: u64,
    /// How far behind the secondary is, in ms (the age of the oldest unacknowledged event).
    #[serde(default)]
    pub lag_ms: u64,
    /// Bytes streamed over the logging channel, and their rate over the last report.
    #[serde(default)]
    pub log_bytes: u64,
    #[serde(default)]
    pub log_bps: u64,
    /// Outputs the live copy holds back by the output rule now, and how many it ever held.
    #[serde(default)]
    pub outputs_held: u64,
    #[serde(default)]
    pub outputs_held_total: u64,
    /// The rates of disk reads and network input the VM's events carried, bytes per second
    /// (the inputs of the logging-bandwidth sizing formula).
    #[serde(default)]
    pub disk_read_bps: u64,
    #[serde(default)]
    pub net_in_bps: u64,
    /// How the process ended (`exit 0`, `signal 9`, ...).
    #[serde(default)]
    pub exit: Option<String>,
    /// The last line the copy logged at warn/error level (why it ended).
    #[serde(default)]
    pub last_error: Option<String>,
    /// The live copy's disk bytes read and network bytes received (cumulative), and their
    /// averages since this agent first saw it live (bytes per second).
    #[serde(default)]
    pub disk_read_bytes: u64,
    #[serde(default)]
    pub net_in_bytes: u64,
    #[serde(default)]
    pub disk_read_avg_bps: u64,
    #[serde(default)]
    pub net_in_avg_bps: u64,
    /// The live copy's word on why the VM is not protected although a secondary could go
    /// live (the secondary's host lost a path), on what its own host lost, and on why it
    /// went live, if it was a secondary (`handover: primary lost its storage (...)`,
    /// `primary lost (...)`).
    #[serde(default)]
    pub unprotected_why: Option<String>,
    #[serde(default)]
    pub host_lost: Option<String>,
    #[serde(default)]
    pub went_live: Option<String>,
}

impl CopyReport {
    /// A copy with nothing counted yet.
    pub fn new(vm: &str, id: u64, role: Role, state: CopyState) -> Self {
        CopyReport {
            vm: vm.to_string(),
            id,
            role,
            pid: 0,
            state,
            live: false,
            protected: false,
            guest_exit: None,
            events: 0,
            acked: 0,
            lag_ms: 0,
            log_bytes: 0,
            log_bps: 0,
            outputs_held: 0,
            outputs_held_total: 0,
            disk_read_bps: 0,
            net_in_bps: 0,
            exit: None,
            last_error: None,
            disk_read_bytes: 0,
            net_in_bytes: 0,
            disk_read_avg_bps: 0,
            net_in_avg_bps: 0,
            unprotected_why: None,
            host_lost: None,
            went_live: None,
        }
    }
}

/// The FT status users see.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FtStatus {
    Protected,
    NotProtected,
    Disabled,
    Off,
}

/// A VM as `vm list` / `vm show` present it (JSON keys are part of the API).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct VmView {
    pub name: String,
    pub power: Power,
    pub ft: FtStatus,
    pub ft_reason: Option<String>,
    pub primary_host: Option<String>,
    pub secondary_host: Option<String>,
    pub lag_ms: Option<u64>,
    pub lag_events: Option<u64>,
    pub log_bytes: Option<u64>,
    /// Logging-channel bandwidth, bytes per second.
    pub log_bps: Option<u64>,
    pub restart_priority: Priority,
    pub failovers: u64,
    pub reprotections: u64,
    pub restarts: u64,
    pub spec: VmSpec,
    /// Day-two figures: monitoring, FT schedule, measured reads and input.
    #[serde(default)]
    pub ops: crate::ops::OpsView,
    /// Events the live copy executed (the VM's position).
    #[serde(default)]
    pub events: Option<u64>,
    /// Outputs held back by the output rule now, and ever.
    #[serde(default)]
    pub outputs_held: Option<u64>,
    #[serde(default)]
    pub outputs_held_total: Option<u64>,
    /// Disk reads and network input carried by the VM's events, bytes per second: the
    /// sizing formula's inputs (logging bandwidth ~ (disk reads + network input) x 1.2).
    #[serde(default)]
    pub disk_read_bps: Option<u64>,
    #[serde(default)]
    pub net_in_bps: Option<u64>,
    /// How long the last re-protection took, ms.
    #[serde(default)]
    pub reprotect_ms: Option<u64>,
}

/// A host as `host list` presents it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct HostView {
    pub name: String,
    /// `connected` (its agent holds its lease), `entering maintenance` (copies still
    /// on it), `in maintenance`, or `not responding` (no lease, but copies are still
    /// placed on it or it is in maintenance).
    pub state: String,
    pub version: String,
    pub fingerprint: String,
    pub master: bool,
    pub ft_vms: usize,
    pub vms: usize,
    pub maintenance: bool,
    pub memory_mib: u64,
    pub memory_reserved_mib: u64,
    pub api: String,
    /// The hosts it reaches on the logging network (`None` until probed).
    pub log_peers: Option<Vec<String>>,
}

/// [`HostView::state`] of a host that holds no lease.
pub const NOT_RESPONDING: &str = "not responding";

impl HostView {
    /// Whether its agent holds its lease (it is registered now).
    pub fn responding(&self) -> bool {
        self.state != NOT_RESPONDING
    }
}

/// Whether `want` hosts are registered and each reaches every other on the logging network
/// as its agent last probed it (a cluster just formed can place every pair then).
pub fn meshed(hosts: &[HostView], want: usize) -> bool {
    let up: Vec<&HostView> = hosts.iter().filter(|h| h.responding()).collect();
    up.len() == want
        && up.iter().all(|h| {
            up.iter()
                .filter(|o| o.name != h.name)
                .all(|o| h.log_peers.as_ref().is_some_and(|p| p.contains(&o.name)))
        })
}

/// `cluster status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ClusterView {
    pub master: Option<String>,
    pub hosts: usize,
    pub vms: usize,
    pub protected: usize,
    pub not_protected: usize,
    pub version: String,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records for unit tests of the crate's decisions.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A connected host with 4 GiB, version 1, fingerprint "f".
    pub fn host(name: &str) -> HostRecord {
        HostRecord {
            name: name.into(),
            version: "1".into(),
            fingerprint: "f".into(),
            api: String::new(),
            log_ip: String::new(),
            memory_mib: 4096,
            maintenance: false,
            started_ms: 0,
            log_peers: None,
            log_missed: None,
            incarnation: 0,
        }
    }

    /// kvd (FT on, 64 MiB) in `v`, and a placement of it with its primary on `primary`
    /// and its secondary on `secondary` (copies 1 and 2).
    pub fn place_kvd(v: &mut crate::master::View, primary: &str, secondary: &str) -> Placement {
        v.vms.insert("kvd".into(), vm("kvd", FtMode::On, 64));
        let copy = |id, host: &str| {
            Some(Copy {
                id,
                host: host.into(),
                incarnation: 0,
            })
        };
        Placement {
            primary: copy(1, primary),
            secondary: copy(2, secondary),
            next_id: 2,
            ..Default::default()
        }
    }

    /// A powered-on VM `name` of `memory_mib`.
    pub fn vm(name: &str, ft: FtMode, memory_mib: u64) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                name: name.into(),
                wasm: "/x.wasm".into(),
                datastore: "/d".into(),
                nic: None,
                listen: vec![],
                memory_mib,
                restart_priority: Priority::Medium,
                args: vec![],
                env: vec![],
                log_port: 7100,
            },
            power: Power::On,
            ft,
            want_host: None,
            secondary_to: None,
            boots: 1,
            ops: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, state: &str, peers: Option<&[&str]>) -> HostView {
        HostView {
            name: name.into(),
            state: state.into(),
            version: "1".into(),
            fingerprint: "f".into(),
            master: false,
            ft_vms: 0,
            vms: 0,
            maintenance: false,
            memory_mib: 1024,
            memory_reserved_mib: 0,
            api: String::new(),
            log_peers: peers.map(|p| p.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn a_cluster_is_meshed_once_every_host_reaches_every_other() {
        let c = "connected";
        let all = [
            host("h1", c, Some(&["h2", "h3"])),
            host("h2", c, Some(&["h1", "h3"])),
            host("h3", c, Some(&["h1", "h2"])),
        ];
        assert!(meshed(&all, 3));
        assert!(!meshed(&all, 4), "a host not registered yet");
        let mut unprobed = all.clone();
        unprobed[1].log_peers = None;
        assert!(!meshed(&unprobed, 3), "a host not probed yet");
        let mut early = all.clone();
        early[2].log_peers = Some(vec!["h2".into()]);
        assert!(
            !meshed(&early, 3),
            "a host that probed before h1 registered"
        );
        let mut gone = all.to_vec();
        gone.push(host("h4", NOT_RESPONDING, None));
        assert!(meshed(&gone, 3), "a host without a lease is not waited for");
    }

    #[test]
    fn names_are_plain() {
        for good in ["kvd", "web-1", "a", &"x".repeat(63)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "A",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(64),
            "a_b",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn views_serialise_with_the_documented_keys() {
        let v = serde_json::to_value(FtStatus::NotProtected).unwrap();
        assert_eq!(v, "not_protected");
        assert_eq!(serde_json::to_value(Power::On).unwrap(), "on");
    }
}
