//! The cluster verbs on the command line (`tandem cluster|host|vm|ft ...`): each one REST
//! call through `api::client::Client`, its answer printed as a table, a line or JSON.
//!
//! The long verbs (power-on, FT turn-on, enable, test-failover, restart-secondary,
//! migrate-secondary) then poll the VM every [`POLL`] and print each change of its FT
//! status or hosts, until what they asked holds or `--timeout-secs` passes; they end with
//! one line saying what holds.
//!
//! Exit codes: 0 done, 1 timed out or failed, 2 bad request (a 4xx answer or bad flags),
//! 3 cluster unreachable.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::client::{Client, ClientError};
use cluster::model::{FtStatus, HostView, Nic, Power, Priority, VmView, valid_name};
use cluster::verbs::{CreateVm, FtOp};

/// How often a long verb looks at its VM.
const POLL: Duration = Duration::from_millis(200);

pub(crate) const OK: u8 = 0;
pub(crate) const FAILED: u8 = 1;
pub(crate) const BAD_REQUEST: u8 = 2;
const UNREACHABLE: u8 = 3;

/// Which cluster to call.
#[derive(clap::Args, Clone, Debug)]
pub struct Target {
    /// The lab whose cluster to call: its APIs and network namespace are read from
    /// /tmp/NAME-lab.json (written by `tandem lab up`).
    #[arg(long, value_name = "NAME", default_value = "tandem")]
    pub lab: String,
    /// Call this agent's API instead of a lab's (http://IP:PORT; repeat for more, tried
    /// in order), from this machine's own network.
    #[arg(long, value_name = "URL", conflicts_with = "lab")]
    pub api: Vec<String>,
    /// The cluster's API token, from this file (its first line): with --api (a lab's CLI
    /// reads the lab's token file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

impl Target {
    pub(crate) fn client(&self) -> Result<Client, ClientError> {
        let client = if self.api.is_empty() {
            Client::from_lab(&self.lab)?
        } else {
            Client::new(self.api.clone(), None)
        };
        match &self.token_file {
            Some(f) => client.with_token_file(f),
            None => Ok(client),
        }
    }
}

/// How long verbs wait.
#[derive(clap::Args, Clone, Debug)]
pub struct Wait {
    /// Give up waiting after this long: exit 1, saying what holds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout_secs: u64,
    /// Return as soon as the cluster accepted the request, without waiting for it to hold.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// The cluster at a glance: its master, hosts, VMs and how many are protected.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// The event timeline, oldest first: failovers, arbitration results, re-protections,
    /// HA restarts, FT schedules, VMs left off, and every verb with who asked (UTC times).
    Timeline {
        #[command(flatten)]
        target: Target,
        /// Only the last N events.
        #[arg(long, value_name = "N", default_value_t = 50,
              value_parser = clap::value_parser!(u32).range(1..=500))]
        last: u32,
        /// Only the events of this VM.
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Print the API's JSON (every event it keeps; --last and --vm ignored).
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
pub enum HostCommand {
    /// The hosts whose agents are connected: state, Tandem version, which is the master,
    /// FT copies (primaries and secondaries) of the at most 4, maintenance mode.
    List {
        #[command(flatten)]
        target: Target,
        /// Print the API's JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Run this host's agent: register the host in the cluster store, run the VM copies
    /// placed here, serve the REST API (one agent per host; one of them is the master).
    Agent(crate::agent_cli::AgentArgs),
    /// Maintenance mode. `enter HOST` moves everything off the host (secondaries to other
    /// hosts; protected primaries by a planned switch to their secondary, then re-protected
    /// elsewhere; VMs without FT through a secondary placed for the move) and waits until
    /// it holds nothing and every FT VM is protected again; it is refused, with the reason,
    /// when the other hosts cannot take them. The host takes nothing until `exit HOST`.
    #[command(subcommand)]
    Maintenance(MaintenanceCommand),
    /// Measure the logging network between two hosts (vmkping's job): round-trip latency
    /// (min/median/p99) and throughput, measured by the first host's agent against the
    /// second's; the result is kept for `ft sizing` and `ft turn-on`'s warning.
    CheckLogging(crate::ops_cli::CheckLoggingArgs),
}

#[derive(clap::Subcommand)]
pub enum MaintenanceCommand {
    /// Evacuate HOST and keep it empty.
    Enter(MaintenanceArgs),
    /// HOST takes VMs again.
    Exit(MaintenanceArgs),
}

#[derive(clap::Args)]
pub struct MaintenanceArgs {
    /// The host's name.
    pub host: String,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub wait: Wait,
}

/// A verb on one VM.
#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub target: Target,
}

/// A verb on one VM that waits for its outcome.
#[derive(clap::Args, Debug)]
pub struct WaitVmArgs {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub wait: Wait,
}

#[derive(clap::Args, Debug)]
pub struct PowerOnArgs {
    #[command(flatten)]
    pub vm: WaitVmArgs,
    /// Start the primary on this host (if the placement rules allow it).
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub vm: WaitVmArgs,
    /// The host the secondary moves to.
    #[arg(long, value_name = "HOST")]
    pub to: String,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print the API's JSON array (keys name, power, ft, ft_reason, primary_host,
    /// secondary_host, lag_ms, ...).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub target: Target,
    /// Print the API's JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PriorityArg {
    High,
    Medium,
    Low,
    Disabled,
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The VM's name: 1-63 lowercase letters, digits and '-'.
    pub name: String,
    /// The guest module (wasm32-wasi): a path every host reads (made absolute here).
    #[arg(long, value_name = "FILE")]
    pub wasm: PathBuf,
    /// The VM's datastore folder, on shared storage (made absolute here); default: one
    /// of its own on the cluster's shared storage.
    #[arg(long, value_name = "DIR")]
    pub datastore: Option<PathBuf>,
    /// The VM's NIC: its MAC and IPv4 address (on each host's VM bridge).
    #[arg(long, value_name = "mac=MAC,ip=CIDR")]
    pub nic: Option<String>,
    /// A TCP port the VM listens on (repeat for more; needs --nic).
    #[arg(long = "listen", value_name = "tcp:PORT")]
    pub listen: Vec<String>,
    /// The guest's memory limit (reserved on both hosts under FT); default 256.
    #[arg(long, value_name = "MIB")]
    pub memory_mib: Option<u64>,
    /// Which VMs HA restarts first when their host dies (disabled: never restarted).
    #[arg(long, value_enum, value_name = "P")]
    pub restart_priority: Option<PriorityArg>,
    /// An argument for the guest (repeat for more).
    #[arg(long = "arg", value_name = "A", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable for the guest (repeat for more).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    #[command(flatten)]
    pub monitoring: crate::ops_cli::MonitoringArgs,
    #[command(flatten)]
    pub target: Target,
}

/// A failure: its line (on stderr) and exit code.
#[derive(Debug)]
pub(crate) struct Fail(pub(crate) u8, pub(crate) String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Api { status: 503, .. } => UNREACHABLE,
            ClientError::Api { status, .. } if (400..500).contains(status) => BAD_REQUEST,
            ClientError::Api { .. } | ClientError::Decode(_) => FAILED,
            ClientError::Invalid(_) | ClientError::Token { .. } => BAD_REQUEST,
            ClientError::NoLab(_)
            | ClientError::Lab { .. }
            | ClientError::Unreachable(_)
            | ClientError::Netns { .. } => UNREACHABLE,
        };
        let hint = match &e {
            // The server's words are for any API client; the CLI's user passes a file.
            ClientError::Api { status: 401, .. } => {
                " (the API wants the cluster's token: pass --token-file FILE with the file the agents were given)"
            }
            _ => "",
        };
        Fail(code, format!("{e}{hint}"))
    }
}

pub(crate) fn finish(r: Result<u8, Fail>) -> u8 {
    match r {
        Ok(code) => code,
        Err(Fail(code, message)) => {
            eprintln!("tandem: {message}");
            code
        }
    }
}

/// The API's JSON, as it sent it (keys in its order).
pub(crate) fn print_json(text: &str) -> Result<u8, Fail> {
    println!("{text}");
    Ok(OK)
}

pub fn cluster(cmd: &ClusterCommand) -> u8 {
    finish(match cmd {
        ClusterCommand::Status { target, json } => cluster_status(target, *json),
        ClusterCommand::Timeline {
            target,
            last,
            vm,
            json,
        } => cluster_timeline(target, *last as usize, vm.as_deref(), *json),
    })
}

fn cluster_timeline(
    target: &Target,
    last: usize,
    vm: Option<&str>,
    json: bool,
) -> Result<u8, Fail> {
    if let Some(vm) = vm {
        check_name("VM", vm)?;
    }
    let client = target.client()?;
    if json {
        return print_json(&client.get_raw("/api/v1/timeline")?);
    }
    let events: Vec<_> = client
        .timeline()?
        .into_iter()
        .filter(|e| vm.is_none() || e.vm.as_deref() == vm)
        .collect();
    for e in &events[events.len().saturating_sub(last)..] {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|k| k.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut line = format!(
            "{}  {kind:<12} {}{}",
            cluster::schedule::utc_time(e.at_ms),
            e.vm.as_deref()
                .map(|v| format!("{v}: "))
                .unwrap_or_default(),
            e.detail
        );
        if let Some(who) = &e.who {
            line += &format!(" (by {who}");
            if let Some(h) = &e.host {
                line += &format!(" via {h}");
            }
            line += ")";
        }
        println!("{line}");
    }
    if events.is_empty() {
        println!(
            "no events{}",
            vm.map(|v| format!(" of {v}")).unwrap_or_default()
        );
    }
    Ok(OK)
}

fn cluster_status(target: &Target, json: bool) -> Result<u8, Fail> {
    let client = target.client()?;
    if json {
        return print_json(&client.get_raw("/api/v1/cluster")?);
    }
    let c = client.status()?;
    println!(
        "master:   {}",
        c.master.as_deref().unwrap_or("none (electing)")
    );
    println!("hosts:    {}", c.hosts);
    println!(
        "vms:      {} ({} protected, {} not protected)",
        c.vms, c.protected, c.not_protected
    );
    println!("version:  {}", c.version);
    // The dashboard is every agent's `/`; a lab's agents are reached here through its relay.
    println!("dashboard: {}", client.dashboard());
    match client.token_file() {
        Some(f) => println!(
            "token:    {} (sign in with it; API clients send it as a bearer token)",
            f.display()
        ),
        None => println!("token:    none given (pass --token-file FILE)"),
    }
    Ok(OK)
}

/// `host ...`; `host agent` is the agent's own (it returns its exit code).
pub fn host(cmd: &HostCommand) -> anyhow::Result<u8> {
    match cmd {
        HostCommand::List { target, json } => Ok(finish(host_list(target, *json))),
        HostCommand::Agent(a) => crate::agent_cli::run(a),
        HostCommand::Maintenance(MaintenanceCommand::Enter(a)) => Ok(finish(enter_maintenance(a))),
        HostCommand::Maintenance(MaintenanceCommand::Exit(a)) => Ok(finish((|| {
            check_name("host", &a.host)?;
            let h = a.target.client()?.maintenance(&a.host, false)?;
            println!(
                "maintenance: {} takes VMs again (maintenance={})",
                h.name, h.maintenance
            );
            Ok(OK)
        })())),
        HostCommand::CheckLogging(a) => Ok(crate::ops_cli::check_logging(a)),
    }
}

/// What holds `host` (`vm (role)`, sorted), and the FT VMs not protected.
fn on_host(vms: &[VmView], host: &str) -> (Vec<String>, Vec<String>) {
    let mut here = Vec::new();
    for v in vms {
        if v.primary_host.as_deref() == Some(host) {
            here.push(format!("{} (primary)", v.name));
        }
        if v.secondary_host.as_deref() == Some(host) {
            here.push(format!("{} (secondary)", v.name));
        }
    }
    let unprotected = vms
        .iter()
        .filter(|v| v.power == Power::On && v.ft == FtStatus::NotProtected)
        .map(|v| v.name.clone())
        .collect();
    (here, unprotected)
}

fn enter_maintenance(a: &MaintenanceArgs) -> Result<u8, Fail> {
    check_name("host", &a.host)?;
    let client = a.target.client()?;
    client.maintenance(&a.host, true)?;
    println!("maintenance: {} takes nothing more; moving its VMs", a.host);
    if a.wait.no_wait {
        return Ok(OK);
    }
    let start = Instant::now();
    let limit = Duration::from_secs(a.wait.timeout_secs);
    let mut last = None;
    loop {
        let vms = client.vms()?;
        let (here, unprotected) = on_host(&vms, &a.host);
        let line = format!(
            "on {}: {}; not protected: {}",
            a.host,
            if here.is_empty() {
                "nothing".into()
            } else {
                here.join(", ")
            },
            if unprotected.is_empty() {
                "none".into()
            } else {
                unprotected.join(", ")
            }
        );
        if last.as_ref() != Some(&line) {
            println!("[{:6.1}s] {line}", start.elapsed().as_secs_f64());
            last = Some(line);
        }
        if here.is_empty() && unprotected.is_empty() {
            println!(
                "maintenance: {} evacuated in {:.1} s; every FT VM protected",
                a.host,
                start.elapsed().as_secs_f64()
            );
            return Ok(OK);
        }
        if start.elapsed() >= limit || machine::stop_requested() {
            return Err(Fail(
                FAILED,
                format!(
                    "{} not evacuated after {:.0} s (it stays in maintenance; `host maintenance exit` takes it out)",
                    a.host,
                    start.elapsed().as_secs_f64()
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn host_list(target: &Target, json: bool) -> Result<u8, Fail> {
    let client = target.client()?;
    if json {
        return print_json(&client.get_raw("/api/v1/hosts")?);
    }
    print!("{}", host_table(&client.hosts()?));
    Ok(OK)
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn host_table(hosts: &[HostView]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            vec![
                h.name.clone(),
                h.state.clone(),
                h.version.clone(),
                if h.master { "yes" } else { "-" }.into(),
                format!("{}/{}", h.ft_vms, cluster::model::MAX_FT_COPIES_PER_HOST),
                if h.maintenance { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "VERSION",
            "MASTER",
            "FT-VMS",
            "MAINTENANCE",
        ],
        &rows,
    )
}

/// The FT column: Protected / Not protected (why) / Disabled / Off.
fn ft_cell(v: &VmView) -> String {
    match v.ft {
        FtStatus::Protected => "Protected".into(),
        FtStatus::NotProtected => match &v.ft_reason {
            Some(why) => format!("Not protected ({why})"),
            None => "Not protected".into(),
        },
        FtStatus::Disabled => "Disabled".into(),
        // FT off has a reason only when the VM is off for one (its guest ended).
        FtStatus::Off => match &v.ft_reason {
            Some(why) => format!("Off ({why})"),
            None => "Off".into(),
        },
    }
}

pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn vm_table(vms: &[VmView]) -> String {
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            let lag = match (v.lag_ms, v.lag_events) {
                (Some(ms), Some(ev)) => format!("{ms} ms / {ev} ev"),
                (Some(ms), None) => format!("{ms} ms"),
                (None, Some(ev)) => format!("{ev} ev"),
                (None, None) => dash(),
            };
            vec![
                v.name.clone(),
                match v.power {
                    Power::On => "on".into(),
                    Power::Off => "off".into(),
                },
                ft_cell(v),
                v.primary_host.clone().unwrap_or_else(dash),
                v.secondary_host.clone().unwrap_or_else(dash),
                lag,
                v.log_bps.map_or_else(dash, |b| bytes(b) + "/s"),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "POWER",
            "FT",
            "PRIMARY",
            "SECONDARY",
            "LAG",
            "LOG-BW",
        ],
        &rows,
    )
}

/// The one line saying what holds for a VM, e.g. `kvd: Protected (primary host2,
/// secondary host3)`.
pub(crate) fn holds(v: &VmView) -> String {
    let mut hosts = Vec::new();
    if let Some(p) = &v.primary_host {
        hosts.push(format!("primary {p}"));
    }
    if let Some(s) = &v.secondary_host {
        hosts.push(format!("secondary {s}"));
    }
    let where_ = if hosts.is_empty() {
        String::new()
    } else {
        format!(" ({})", hosts.join(", "))
    };
    let state = match (v.power, v.ft) {
        (Power::Off, FtStatus::Off) if v.ft_reason.is_some() => {
            format!(
                "Powered off: {}",
                v.ft_reason.as_deref().unwrap_or_default()
            )
        }
        (Power::Off, _) => "Powered off".to_string(),
        (Power::On, FtStatus::Protected) => "Protected".into(),
        (Power::On, FtStatus::NotProtected) => match &v.ft_reason {
            Some(why) => format!("Not protected: {why}"),
            None => "Not protected".into(),
        },
        (Power::On, FtStatus::Disabled) => "On, FT disabled".into(),
        (Power::On, FtStatus::Off) => "On, FT off".into(),
    };
    format!("{}: {state}{where_}", v.name)
}

pub fn vm_list(a: &ListArgs) -> u8 {
    finish((|| {
        let client = a.target.client()?;
        if a.json {
            return print_json(&client.get_raw("/api/v1/vms")?);
        }
        print!("{}", vm_table(&client.vms()?));
        Ok(OK)
    })())
}

pub fn vm_show(a: &ShowArgs) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        let client = a.target.client()?;
        if a.json {
            return print_json(&client.get_raw(&format!("/api/v1/vms/{}", a.name))?);
        }
        let v = client.vm(&a.name)?;
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        println!("{}", holds(&v));
        println!(
            "power:            {}",
            if v.power == Power::On { "on" } else { "off" }
        );
        println!("ft:               {}", ft_cell(&v));
        println!("primary:          {}", opt(&v.primary_host));
        println!("secondary:        {}", opt(&v.secondary_host));
        println!(
            "lag:              {}",
            match (v.lag_ms, v.lag_events) {
                (None, None) => "-".into(),
                (ms, ev) => format!(
                    "{} ms, {} events",
                    ms.map_or("-".into(), |m| m.to_string()),
                    ev.map_or("-".into(), |e| e.to_string())
                ),
            }
        );
        println!(
            "logging:          {} sent, {}",
            v.log_bytes.map_or("-".into(), bytes),
            v.log_bps.map_or("-".into(), |b| bytes(b) + "/s")
        );
        println!(
            "failovers:        {} (re-protected {}, HA restarts {})",
            v.failovers, v.reprotections, v.restarts
        );
        println!("restart priority: {}", priority_name(v.restart_priority));
        println!("wasm:             {}", v.spec.wasm.display());
        println!("datastore:        {}", v.spec.datastore.display());
        if let Some(nic) = &v.spec.nic {
            println!("nic:              mac={} ip={}", nic.mac, nic.ip);
        }
        if !v.spec.listen.is_empty() {
            let ports: Vec<String> = v.spec.listen.iter().map(|p| format!("tcp:{p}")).collect();
            println!("listen:           {}", ports.join(" "));
        }
        println!("memory:           {} MiB", v.spec.memory_mib);
        crate::ops_cli::show_ops(&v);
        Ok(OK)
    })())
}

fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::High => "high",
        Priority::Medium => "medium",
        Priority::Low => "low",
        Priority::Disabled => "disabled",
    }
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), Fail> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(Fail(
            BAD_REQUEST,
            format!(
                "bad {what} name {name:?}: use 1-63 lowercase letters, digits and '-', not \
                 starting with '-'"
            ),
        ))
    }
}

pub(crate) fn bad(message: String) -> Fail {
    Fail(BAD_REQUEST, message)
}

fn absolute(flag: &str, p: &Path) -> Result<PathBuf, Fail> {
    std::path::absolute(p).map_err(|e| bad(format!("{flag} {}: {e}", p.display())))
}

/// `mac=MAC,ip=CIDR`, checked.
fn parse_nic(s: &str) -> Result<Nic, Fail> {
    let (mut mac, mut ip) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("mac", v)) => {
                crate::nic_mac(v).map_err(bad)?;
                mac = Some(v.to_ascii_lowercase());
            }
            Some(("ip", v)) => {
                crate::parse_cidr(v).ok_or_else(|| {
                    bad(format!(
                        "--nic: {v:?} is not an IPv4 address with prefix like 10.77.0.10/24"
                    ))
                })?;
                ip = Some(v.to_string());
            }
            _ => {
                return Err(bad(format!(
                    "--nic: {part:?} is not one of mac=MAC, ip=CIDR (the bridge is each \
                     host's VM bridge)"
                )));
            }
        }
    }
    Ok(Nic {
        mac: mac.ok_or_else(|| bad("--nic needs mac=...".into()))?,
        ip: ip.ok_or_else(|| bad("--nic needs ip=...".into()))?,
    })
}

fn parse_listen(listen: &[String]) -> Result<Vec<u16>, Fail> {
    crate::listen_ports(listen).map_err(bad)
}

/// The request `vm create` sends, its flags checked and its paths made absolute.
fn create_request(a: &CreateArgs) -> Result<CreateVm, Fail> {
    check_name("VM", &a.name)?;
    let nic = a.nic.as_deref().map(parse_nic).transpose()?;
    let listen = parse_listen(&a.listen)?;
    if !listen.is_empty() && nic.is_none() {
        return Err(bad("--listen needs a NIC: add --nic mac=MAC,ip=CIDR".into()));
    }
    if let Some(m) = a.memory_mib
        && !(1..=4096).contains(&m)
    {
        return Err(bad(format!("--memory-mib {m} is outside 1..=4096")));
    }
    if let Some(e) = a
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        return Err(bad(format!("--env {e:?} is not of the form K=V")));
    }
    Ok(CreateVm {
        name: a.name.clone(),
        wasm: absolute("--wasm", &a.wasm)?,
        datastore: a
            .datastore
            .as_deref()
            .map(|d| absolute("--datastore", d))
            .transpose()?,
        nic,
        listen,
        memory_mib: a.memory_mib,
        restart_priority: a.restart_priority.map(|p| match p {
            PriorityArg::High => Priority::High,
            PriorityArg::Medium => Priority::Medium,
            PriorityArg::Low => Priority::Low,
            PriorityArg::Disabled => Priority::Disabled,
        }),
        args: a.args.clone(),
        env: a.env.clone(),
        monitoring: a.monitoring.request()?,
    })
}

pub fn vm_create(a: &CreateArgs) -> u8 {
    finish((|| {
        let req = create_request(a)?;
        let v = a.target.client()?.create(&req)?;
        println!("{}: created", v.name);
        println!("{}", holds(&v));
        Ok(OK)
    })())
}

pub fn vm_power_on(a: &PowerOnArgs) -> u8 {
    finish((|| {
        check_name("VM", &a.vm.name)?;
        if let Some(h) = &a.host {
            check_name("host", h)?;
        }
        let client = a.vm.target.client()?;
        let v = client.power_on(&a.vm.name, a.host.as_deref())?;
        wait(
            &client,
            &a.vm.wait,
            v,
            "powered on with a primary host",
            |_, now| now.power == Power::On && now.primary_host.is_some(),
        )
    })())
}

pub fn vm_power_off(a: &VmArgs) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        let v = a.target.client()?.power_off(&a.name)?;
        println!("{}", holds(&v));
        Ok(OK)
    })())
}

pub fn vm_destroy(a: &VmArgs) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        a.target.client()?.destroy(&a.name)?;
        println!("{}: destroyed", a.name);
        Ok(OK)
    })())
}

/// `ft turn-off` and `ft disable`: the answer is what holds.
pub fn ft_now(a: &VmArgs, op: FtOp) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        let v = a.target.client()?.ft(&a.name, &op)?;
        println!("{}", holds(&v));
        Ok(OK)
    })())
}

/// The FT verbs that wait until the VM is protected again (and, for test-failover,
/// restart-secondary and migrate-secondary, until the copy they replace is replaced).
pub fn ft_wait(a: &WaitVmArgs, op: FtOp) -> u8 {
    finish((|| {
        check_name("VM", &a.name)?;
        if let FtOp::MigrateSecondary { to } = &op {
            check_name("host", to)?;
        }
        let client = a.target.client()?;
        let before = client.ft(&a.name, &op)?;
        let protected = |v: &VmView| v.power == Power::On && v.ft == FtStatus::Protected;
        match op {
            FtOp::TestFailover => wait(
                &client,
                &a.wait,
                before,
                "failed over and protected again",
                move |b, now| {
                    protected(now)
                        && (now.failovers > b.failovers || now.primary_host != b.primary_host)
                },
            ),
            FtOp::RestartSecondary => wait(
                &client,
                &a.wait,
                before,
                "a new secondary and protected again",
                move |b, now| {
                    protected(now)
                        && (now.reprotections > b.reprotections
                            || now.secondary_host != b.secondary_host)
                },
            ),
            FtOp::MigrateSecondary { to } => wait(
                &client,
                &a.wait,
                before,
                "the secondary moved and protected again",
                move |_, now| protected(now) && now.secondary_host.as_deref() == Some(&to),
            ),
            FtOp::TurnOn => {
                let code = wait(&client, &a.wait, before, "protected", move |_, now| {
                    protected(now)
                })?;
                crate::ops_cli::warn_logging(&client, &a.name);
                Ok(code)
            }
            _ => wait(&client, &a.wait, before, "protected", move |_, now| {
                protected(now)
            }),
        }
    })())
}

/// What a progress line shows: a change of any of these is printed.
fn progress_key(
    v: &VmView,
) -> (
    Power,
    FtStatus,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    (
        v.power,
        v.ft,
        v.ft_reason.clone(),
        v.primary_host.clone(),
        v.secondary_host.clone(),
    )
}

/// Poll the VM until `done(before, now)`, printing each change; the last line says what
/// holds. Transient failures to reach the cluster are printed once and waited through.
fn wait(
    client: &Client,
    w: &Wait,
    before: VmView,
    goal: &str,
    done: impl Fn(&VmView, &VmView) -> bool,
) -> Result<u8, Fail> {
    if w.no_wait {
        println!("{}", holds(&before));
        return Ok(OK);
    }
    let start = Instant::now();
    let limit = Duration::from_secs(w.timeout_secs);
    let mut last_key = None;
    let mut now = before.clone();
    let mut unreachable = false;
    loop {
        let key = progress_key(&now);
        if last_key.as_ref() != Some(&key) {
            println!("[{:6.1}s] {}", start.elapsed().as_secs_f64(), holds(&now));
            last_key = Some(key);
        }
        if done(&before, &now) {
            println!("{}", holds(&now));
            return Ok(OK);
        }
        if start.elapsed() >= limit {
            eprintln!(
                "tandem: timed out after {} s waiting for {}: {goal}",
                w.timeout_secs, before.name
            );
            // Unreachable to the end: say so, by the exit code too.
            if unreachable {
                println!("{} (last seen; the cluster is unreachable)", holds(&now));
                return Ok(UNREACHABLE);
            }
            println!("{}", holds(&now));
            return Ok(FAILED);
        }
        if machine::stop_requested() {
            eprintln!("tandem: interrupted waiting for {}: {goal}", before.name);
            println!("{}", holds(&now));
            return Ok(FAILED);
        }
        std::thread::sleep(POLL);
        match client.vm(&before.name) {
            Ok(v) => {
                if unreachable {
                    println!(
                        "[{:6.1}s] cluster reachable again",
                        start.elapsed().as_secs_f64()
                    );
                    unreachable = false;
                }
                now = v;
            }
            Err(ClientError::Api {
                status: 404,
                message,
            }) => {
                return Err(Fail(FAILED, format!("{} vanished: {message}", before.name)));
            }
            Err(e @ (ClientError::Unreachable(_) | ClientError::Api { status: 503, .. })) => {
                if !unreachable {
                    println!("[{:6.1}s] {e}; still trying", start.elapsed().as_secs_f64());
                    unreachable = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster::model::VmSpec;

    fn vm(ft: FtStatus) -> VmView {
        VmView {
            name: "kvd".into(),
            power: Power::On,
            ft,
            ft_reason: None,
            primary_host: Some("host2".into()),
            secondary_host: Some("host3".into()),
            lag_ms: Some(12),
            lag_events: Some(3),
            log_bytes: Some(3 << 20),
            log_bps: Some(3 << 19),
            restart_priority: Priority::High,
            failovers: 0,
            reprotections: 0,
            restarts: 0,
            spec: VmSpec {
                name: "kvd".into(),
                wasm: "/g/kvd.wasm".into(),
                datastore: "/s/kvd".into(),
                nic: None,
                listen: vec![],
                memory_mib: 64,
                restart_priority: Priority::High,
                args: vec![],
                env: vec![],
                log_port: 7000,
            },
            ops: Default::default(),
            events: Some(100),
            outputs_held: Some(0),
            outputs_held_total: Some(5),
            disk_read_bps: Some(0),
            net_in_bps: Some(0),
            reprotect_ms: None,
        }
    }

    #[test]
    fn the_closing_line_says_what_holds() {
        assert_eq!(
            holds(&vm(FtStatus::Protected)),
            "kvd: Protected (primary host2, secondary host3)"
        );
        let mut v = vm(FtStatus::NotProtected);
        v.ft_reason = Some("no compatible second host".into());
        v.secondary_host = None;
        assert_eq!(
            holds(&v),
            "kvd: Not protected: no compatible second host (primary host2)"
        );
        v.power = Power::Off;
        v.primary_host = None;
        assert_eq!(holds(&v), "kvd: Powered off");
    }

    #[test]
    fn tables_have_the_documented_columns() {
        let mut v = vm(FtStatus::NotProtected);
        v.ft_reason = Some("secondary starting".into());
        let t = vm_table(&[vm(FtStatus::Protected), v]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "NAME",
                "POWER",
                "FT",
                "PRIMARY",
                "SECONDARY",
                "LAG",
                "LOG-BW"
            ]
        );
        assert!(lines[1].contains("Protected") && lines[1].contains("12 ms / 3 ev"));
        assert!(lines[1].contains("1.5 MiB/s"), "{t}");
        assert!(
            lines[2].contains("Not protected (secondary starting)"),
            "{t}"
        );
        // Columns line up: every row's PRIMARY starts where its header does.
        let col = lines[0].find("PRIMARY").unwrap();
        assert_eq!(&lines[1][col..col + 5], "host2", "{t}");
    }

    #[test]
    fn create_flags_are_checked_and_paths_made_absolute() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            create: CreateArgs,
        }
        let args = |extra: &[&str]| {
            let mut v = vec!["x", "web", "--wasm", "g/httpd.wasm"];
            v.extend_from_slice(extra);
            <Cli as clap::Parser>::try_parse_from(v).unwrap().create
        };
        let r = create_request(&args(&[
            "--nic",
            "mac=02:00:00:00:00:2A,ip=10.77.0.20/24",
            "--listen",
            "tcp:80",
            "--restart-priority",
            "high",
            "--arg",
            "-v",
            "--env",
            "A=B",
            "--datastore",
            "ds",
        ]))
        .unwrap_or_else(|f| panic!("{}", f.1));
        assert!(r.wasm.is_absolute() && r.wasm.ends_with("g/httpd.wasm"));
        assert!(r.datastore.as_ref().unwrap().is_absolute());
        assert_eq!(r.nic.as_ref().unwrap().mac, "02:00:00:00:00:2a");
        assert_eq!(r.listen, [80]);
        assert_eq!(r.restart_priority, Some(Priority::High));
        assert_eq!(r.args, ["-v"]);
        for (bad_flags, says) in [
            (&["--listen", "tcp:80"][..], "needs a NIC"),
            (
                &["--nic", "mac=01:00:00:00:00:01,ip=10.0.0.1/24"],
                "multicast",
            ),
            (&["--nic", "mac=02:00:00:00:00:01"], "needs ip"),
            (
                &["--nic", "bridge=br0,mac=02:00:00:00:00:01,ip=10.0.0.1/24"],
                "not one of",
            ),
            (&["--nic", "mac=02:00:00:00:00:01,ip=10.0.0.1"], "prefix"),
            (&["--memory-mib", "0"], "outside"),
            (&["--env", "NOEQUALS"], "K=V"),
        ] {
            match create_request(&args(bad_flags)) {
                Err(Fail(2, m)) => assert!(m.contains(says), "{bad_flags:?}: {m}"),
                Err(Fail(c, m)) => panic!("{bad_flags:?}: exit {c}: {m}"),
                Ok(_) => panic!("{bad_flags:?} accepted"),
            }
        }
        let mut a = args(&[]);
        a.name = "Web".into();
        assert!(matches!(create_request(&a), Err(Fail(2, _))));
    }

    /// Verbs whose VM goes through `script`, one step per look (then stays at the last);
    /// an empty step is a VM gone. Only the HTTP layer and this module are under test.
    struct Scripted {
        script: Vec<Option<VmView>>,
        looks: std::sync::atomic::AtomicUsize,
    }

    impl api::server::Backend for Scripted {
        fn status(&self) -> Result<cluster::model::ClusterView, cluster::ClusterError> {
            Err(cluster::ClusterError::Internal("not scripted".into()))
        }
        fn hosts(&self) -> Result<Vec<HostView>, cluster::ClusterError> {
            Err(cluster::ClusterError::Internal("not scripted".into()))
        }
        fn vms(&self) -> Result<Vec<VmView>, cluster::ClusterError> {
            Err(cluster::ClusterError::Internal("not scripted".into()))
        }
        fn vm(&self, name: &str) -> Result<VmView, cluster::ClusterError> {
            let i = self.looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.script[(i + 1).min(self.script.len() - 1)]
                .clone()
                .ok_or_else(|| cluster::ClusterError::NotFound(format!("no VM {name}")))
        }
        fn create(&self, _: CreateVm) -> Result<VmView, cluster::ClusterError> {
            Err(cluster::ClusterError::Internal("not scripted".into()))
        }
        fn power_on(&self, _: &str, _: Option<String>) -> Result<VmView, cluster::ClusterError> {
            Ok(self.script[0].clone().unwrap())
        }
        fn power_off(&self, _: &str) -> Result<VmView, cluster::ClusterError> {
            Err(cluster::ClusterError::Internal("not scripted".into()))
        }
        fn destroy(&self, _: &str) -> Result<(), cluster::ClusterError> {
            Err(cluster::ClusterError::Internal("not scripted".into()))
        }
        fn ft(&self, _: &str, _: FtOp) -> Result<VmView, cluster::ClusterError> {
            Ok(self.script[0].clone().unwrap())
        }
        fn maintenance(&self, _: &str, _: bool) -> Result<HostView, cluster::ClusterError> {
            Err(cluster::ClusterError::Internal("not scripted".into()))
        }
        fn timeline(
            &self,
            _: usize,
        ) -> Result<Vec<cluster::timeline::TimelineEvent>, cluster::ClusterError> {
            Ok(vec![])
        }
        fn note(&self, _: cluster::timeline::TimelineEvent) {}
    }

    /// Run an FT verb against the script: (exit code, looks taken).
    fn run_ft(script: Vec<Option<VmView>>, op: FtOp, timeout_secs: u64) -> (u8, usize) {
        let backend = std::sync::Arc::new(Scripted {
            script,
            looks: Default::default(),
        });
        let server = api::server::serve_backend(
            "127.0.0.1:0".parse().unwrap(),
            backend.clone(),
            api::server::AgentInfo::open("host1"),
        )
        .unwrap();
        let args = WaitVmArgs {
            name: "kvd".into(),
            target: Target {
                lab: "tandem".into(),
                api: vec![format!("http://{}", server.local_addr())],
                token_file: None,
            },
            wait: Wait {
                timeout_secs,
                no_wait: false,
            },
        };
        let code = ft_wait(&args, op);
        (
            code,
            backend.looks.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    fn step(
        ft: FtStatus,
        primary: &str,
        secondary: Option<&str>,
        failovers: u64,
    ) -> Option<VmView> {
        let mut v = vm(ft);
        v.primary_host = Some(primary.into());
        v.secondary_host = secondary.map(str::to_string);
        v.failovers = failovers;
        Some(v)
    }

    #[test]
    fn test_failover_waits_past_the_stale_protected_state_until_protected_again() {
        let script = vec![
            step(FtStatus::Protected, "host2", Some("host3"), 0),
            step(FtStatus::Protected, "host2", Some("host3"), 0),
            step(FtStatus::NotProtected, "host3", None, 1),
            step(FtStatus::NotProtected, "host3", Some("host4"), 1),
            step(FtStatus::Protected, "host3", Some("host4"), 1),
        ];
        let (code, looks) = run_ft(script, FtOp::TestFailover, 30);
        assert_eq!((code, looks), (OK, 4));
    }

    #[test]
    fn migrate_waits_for_the_secondary_on_its_new_host() {
        let script = vec![
            step(FtStatus::Protected, "host2", Some("host3"), 0),
            step(FtStatus::NotProtected, "host2", Some("host4"), 0),
            step(FtStatus::Protected, "host2", Some("host4"), 0),
        ];
        let to = FtOp::MigrateSecondary { to: "host4".into() };
        assert_eq!(run_ft(script, to, 30), (OK, 2));
    }

    #[test]
    fn a_verb_that_never_holds_times_out_and_a_vanished_vm_fails() {
        let stuck = vec![step(FtStatus::NotProtected, "host2", None, 0)];
        let (code, looks) = run_ft(stuck, FtOp::TurnOn, 1);
        assert_eq!(code, FAILED);
        assert!(looks >= 2, "{looks}");
        let gone = vec![step(FtStatus::NotProtected, "host2", None, 0), None];
        assert_eq!(run_ft(gone, FtOp::Enable, 30), (FAILED, 1));
    }

    #[test]
    fn client_errors_map_to_exit_codes() {
        let code = |e| Fail::from(e).0;
        assert_eq!(
            code(ClientError::Api {
                status: 404,
                message: "x".into()
            }),
            2
        );
        assert_eq!(
            code(ClientError::Api {
                status: 409,
                message: "x".into()
            }),
            2
        );
        assert_eq!(
            code(ClientError::Api {
                status: 503,
                message: "x".into()
            }),
            3
        );
        assert_eq!(
            code(ClientError::Api {
                status: 500,
                message: "x".into()
            }),
            1
        );
        assert_eq!(code(ClientError::Unreachable("x".into())), 3);
        assert_eq!(code(ClientError::NoLab("x".into())), 3);
    }
}
