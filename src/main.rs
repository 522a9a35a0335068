//! `tandem`: the command-line edge of Tandem. Parses arguments, drives the crates, and
//! turns their typed errors into one clear line and an exit code:
//! 0 success (or the guest's own exit code for `vm run`), 2 bad input, 3 replay divergence,
//! 4 a copy halted (lost arbitration), 5 a replayed log that was cut (its recorder killed).
//! The cluster verbs (`cluster`, `host list`, `vm create|power-on|...`, `ft turn-on|...`,
//! see `verbs_cli`) have their own: 0 done, 1 timed out or failed, 2 bad request,
//! 3 cluster unreachable.

mod agent_cli;
mod bench;
mod client;
mod cluster_lab;
mod demo;
mod guests;
mod lab;
mod lab_proxy;
mod labstore;
mod ops_cli;
mod snap;
mod verbs_cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cluster::verbs::FtOp;
use machine::capture::{CaptureError, SnapMachine};
use machine::control::Control;
use machine::{
    DEFAULT_MEMORY_LIMIT, EventSink, Exit, GuestSpec, Inputs, LogReader, LogWriter, Machine,
    MachineError, hex, live_inputs,
};

/// This build's Tandem version: the package's, unless the build set `TANDEM_VERSION`
/// (a second build for a rolling-upgrade test). Hosts report it, and an FT pair only spans
/// hosts of one version.
pub const VERSION: &str = match option_env!("TANDEM_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

#[derive(Parser)]
#[command(
    name = "tandem",
    version = VERSION,
    about = "Fault tolerance for WebAssembly VMs: a primary and a secondary in lockstep",
    long_about = "Tandem keeps a VM running when the host under it dies. VMs are ordinary \
wasm32-wasi programs run deterministically: every nondeterministic input (clock, entropy, \
file reads, network frames) is an event, so a recorded run replays to the identical \
execution. Under FT a primary streams its events to a secondary that replays them in \
lockstep; outputs leave only once the secondary holds their inputs; when the primary's host \
dies the secondary goes live where it left off. Start with `tandem demo`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Keep guests' compiled code in DIR, so that a second start of a module loads it
    /// instead of compiling it (default: $TANDEM_CODE_CACHE, else the folder `code` in
    /// the instrumented-module cache: $TANDEM_CACHE_DIR, $XDG_CACHE_HOME/tandem,
    /// ~/.cache/tandem or /var/cache/tandem). An entry is checked before use; a damaged
    /// one is reported, deleted and rebuilt.
    #[arg(long, global = true, value_name = "DIR")]
    code_cache: Option<PathBuf>,
    /// Compile every guest afresh: no compiled-code cache.
    #[arg(long, global = true, conflicts_with = "code_cache")]
    no_code_cache: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run, record and replay VMs; create and manage a cluster's VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Measure Tandem and print a table of ratios measured side by side.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// A cluster on this machine made of network namespaces: hosts, a switch, a client.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Fault tolerance: a cluster VM's FT verbs (turn-on, disable, test-failover, ...), or
    /// run a VM as a primary or a secondary in lockstep by hand.
    #[command(subcommand)]
    Ft(FtCommand),
    /// The cluster: its master, hosts and VMs (a REST call to a host agent).
    #[command(subcommand)]
    Cluster(verbs_cli::ClusterCommand),
    /// The cluster's hosts: list them, or run this host's agent.
    #[command(subcommand)]
    Host(verbs_cli::HostCommand),
    /// The main job: a 4-host lab cluster keeps kvd FT-protected through two host deaths
    /// under redis-benchmark and a checker (failover, then automatic re-protection), and
    /// HA-restarts an unprotected httpd; ends with `verdict: PASS|FAIL failovers=...`.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum FtCommand {
    /// Run a VM as the primary: live on this host, every event streamed to a secondary
    /// that connects to --log-listen; outputs wait until the secondary holds their events.
    Primary(FtPrimaryArgs),
    /// Run a VM as the secondary: replay the primary's events as they arrive; if the
    /// primary is lost and this copy wins arbitration, go live here.
    Secondary(FtSecondaryArgs),
    /// Cluster verb: turn FT on for a VM. The cluster checks the requirements (each
    /// refusal one line with its reason), places a secondary on another host and starts
    /// it; waits until the VM is Protected.
    TurnOn(verbs_cli::WaitVmArgs),
    /// Cluster verb: turn FT off for a VM: its secondary is stopped and its placement
    /// removed.
    TurnOff(verbs_cli::VmArgs),
    /// Cluster verb: disable FT for a VM: its secondary is stopped, its placement and
    /// statistics kept (`ft enable` starts it there again).
    Disable(verbs_cli::VmArgs),
    /// Cluster verb: enable FT again after `ft disable`; waits until the VM is Protected.
    Enable(verbs_cli::WaitVmArgs),
    /// Cluster verb: kill the VM's primary on purpose; the secondary goes live and the
    /// cluster re-protects it. Waits until it failed over and is Protected again.
    TestFailover(verbs_cli::WaitVmArgs),
    /// Cluster verb: kill the VM's secondary on purpose; waits until a new secondary
    /// protects it again.
    RestartSecondary(verbs_cli::WaitVmArgs),
    /// Cluster verb: move the VM's secondary to another host; waits until the VM is
    /// Protected with its secondary there.
    MigrateSecondary(verbs_cli::MigrateArgs),
    /// Cluster verb: FT on demand. `--on SPEC --off SPEC` (or a window `--on 'Mon-Fri
    /// 08:00-18:00'`): the master turns FT on and off at those times; `--clear` removes it.
    Schedule(ops_cli::ScheduleArgs),
    /// Cluster verb: the logging bandwidth the VM needs, by the seed's formula
    /// ((disk reads MB/s x 8 + network input Mbit/s) x 1.2) from its own measured reads
    /// and input, beside what its logging channel carries and the measured network.
    Sizing(ops_cli::SizingArgs),
}

#[derive(clap::Args)]
struct FtArgs {
    /// The VM's name: its folder on shared storage holds the pair key, the arbitration
    /// records and its status.
    #[arg(long)]
    vm: String,
    /// The shared storage folder both hosts reach.
    #[arg(long, value_name = "DIR")]
    shared: PathBuf,
    /// Heartbeat interval on the logging channel. It also bounds how long events (and the
    /// outputs that depend on them) wait unsent while the guest computes without a call:
    /// otherwise they go when it waits for input, at its next call once an output waited
    /// 0.2 ms for them, or once they weigh 64 KiB.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    heartbeat_ms: u64,
    /// Silence for this long is always a suspected failure (then arbitration decides):
    /// the ceiling of the failure detector, which adapts to the jitter it observes on
    /// the channel (a fresh channel waits this long).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    timeout_ms: u64,
    /// The failure detector's floor: however steady the channel, less silence than this
    /// (or than two heartbeats) is never a suspected failure. Above --timeout-ms it is
    /// --timeout-ms (a fixed timeout).
    #[arg(long, value_name = "MS", default_value_t = 150)]
    min_timeout_ms: u64,
    /// Checkpoint the VM (a snapshot on shared storage) once the events since the last
    /// one weigh this much: what each copy keeps in memory is bounded by it. The
    /// secondary takes checkpoints; a copy without one takes its own.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    checkpoint_mib: u64,
    /// Checkpoint at least this often while the VM takes events.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    checkpoint_secs: u64,
    /// Set by a host agent: the fence this copy lives by. The agent keeps writing deadlines
    /// until which its host's lease is held; a missed one, or the pipe closing, ends this
    /// copy at once (so that no copy outlives its host's lease).
    #[arg(long, value_name = "FD")]
    fence_fd: Option<i32>,
    /// The VM network's uplink on this host (the VM bridge's port towards the network):
    /// its carrier is watched. Shared storage (the VM's folder) is always watched. A
    /// primary whose host lost either, while the secondary's host has it, hands the VM
    /// over to the secondary; a secondary whose host lost one makes the VM not protected.
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
    /// An address on the VM network that must be reachable through the uplink (the
    /// gateway, another host's or a client's address; repeatable, at most 16): it is sent
    /// ARP probes out of the uplink, and the uplink counts as lost, even with carrier, while
    /// none of them answers. Needs --uplink.
    #[arg(long = "uplink-peer", value_name = "IP")]
    uplink_peers: Vec<std::net::Ipv4Addr>,
    /// A storage or uplink failure counts only once it has lasted this long (the silence
    /// of --uplink-peer: at least 300 ms): a shorter flap does nothing. The default hands a
    /// VM over after a lost carrier or storage path before a client's first TCP
    /// retransmission (200 ms at the least on Linux) of what the cut lost.
    #[arg(long, value_name = "MS", default_value_t = lockstep::health::DEFAULT_HOLD_MS)]
    health_hold_ms: u64,
    /// Never hand the VM over because of this host's storage or uplink (still reported).
    #[arg(long)]
    no_health_handover: bool,
    /// Every write waits for the secondary before it is performed, and the guest gets its
    /// true outcome. By default a plain write to a regular file goes behind while the VM
    /// is protected: the guest has its outcome at once and the write leaves with the other
    /// outputs, under the output rule (taken only where it can fail only by a lost
    /// storage path; the secondary writes it again if the primary could not).
    #[arg(long)]
    no_write_behind: bool,
}

/// The largest heartbeat interval or failure timeout accepted, in milliseconds.
const MAX_FT_MS: u64 = 60_000;
/// The longest a secondary keeps trying to reach its primary: a day.
const MAX_WAIT_SECS: u64 = 86_400;

impl FtArgs {
    /// Live by the fence, if a host agent gave one (before anything else is started).
    fn fence(&self) -> Result<(), Failure> {
        match self.fence_fd {
            Some(fd) => cluster::fence::watch(fd).map_err(|e| bad(e.to_string())),
            None => Ok(()),
        }
    }

    /// What to watch of this host's health (storage, and the uplink if given), checked.
    fn health(&self, dir: &lockstep::VmDir) -> Result<lockstep::health::HealthConfig, Failure> {
        if let Some(i) = &self.uplink
            && !lockstep::health::valid_ifname(i)
        {
            return Err(bad(format!(
                "--uplink {i:?}: an interface name is 1-15 letters, digits, '_', '.' or '-'"
            )));
        }
        if self.health_hold_ms == 0 || self.health_hold_ms > MAX_FT_MS {
            return Err(bad(format!(
                "--health-hold-ms {} is outside 1..={MAX_FT_MS}",
                self.health_hold_ms
            )));
        }
        if !self.uplink_peers.is_empty() && self.uplink.is_none() {
            return Err(bad(
                "--uplink-peer: peers are probed through the uplink: give --uplink too".into(),
            ));
        }
        if self.uplink_peers.len() > lockstep::health::MAX_PEERS {
            return Err(bad(format!(
                "--uplink-peer given {} times: at most {}",
                self.uplink_peers.len(),
                lockstep::health::MAX_PEERS
            )));
        }
        Ok(lockstep::health::HealthConfig {
            folder: dir.0.clone(),
            uplink: self.uplink.clone(),
            peers: self.uplink_peers.clone(),
            hold: std::time::Duration::from_millis(self.health_hold_ms),
        })
    }

    /// The checked checkpoint policy.
    fn policy(&self) -> Result<lockstep::checkpoint::Policy, Failure> {
        if self.checkpoint_mib == 0 || self.checkpoint_mib > 4096 {
            return Err(bad(format!(
                "--checkpoint-mib {} is outside 1..=4096",
                self.checkpoint_mib
            )));
        }
        if self.checkpoint_secs == 0 || self.checkpoint_secs > MAX_WAIT_SECS {
            return Err(bad(format!(
                "--checkpoint-secs {} is outside 1..={MAX_WAIT_SECS}",
                self.checkpoint_secs
            )));
        }
        Ok(lockstep::checkpoint::Policy {
            bytes: self.checkpoint_mib << 20,
            every: std::time::Duration::from_secs(self.checkpoint_secs),
        })
    }

    /// The checked arguments: `--vm` a plain name, `--shared` an existing folder, the
    /// timings in range (checked arithmetic: no value may pass a check by overflow).
    fn config(&self) -> Result<lockstep::FtConfig, Failure> {
        check_vm_name(&self.vm)?;
        if !self.shared.is_dir() {
            return Err(bad(format!(
                "--shared {}: no such folder (shared storage must exist)",
                self.shared.display()
            )));
        }
        for (flag, v) in [
            ("--heartbeat-ms", self.heartbeat_ms),
            ("--timeout-ms", self.timeout_ms),
            ("--min-timeout-ms", self.min_timeout_ms),
        ] {
            if v == 0 || v > MAX_FT_MS {
                return Err(bad(format!("{flag} {v} is outside 1..={MAX_FT_MS}")));
            }
        }
        if self
            .heartbeat_ms
            .checked_mul(2)
            .is_none_or(|twice| self.timeout_ms < twice)
        {
            return Err(bad(format!(
                "--timeout-ms {} must be at least twice --heartbeat-ms {}",
                self.timeout_ms, self.heartbeat_ms
            )));
        }
        Ok(lockstep::FtConfig {
            heartbeat: std::time::Duration::from_millis(self.heartbeat_ms),
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            min_timeout: std::time::Duration::from_millis(self.min_timeout_ms),
            // One interval and one largest event: the secondary checkpoints at one interval,
            // and while it takes that checkpoint the primary goes on for another (the
            // largest event: one that takes the history past the interval may be that
            // large). The primary waits only past that, and then holds one event more (the
            // one that lets an idle secondary reach a point to checkpoint at).
            max_history_bytes: (self.checkpoint_mib << 20) + machine::event::MAX_EVENT_DATA as u64,
            write_behind: !self.no_write_behind,
            ..lockstep::FtConfig::default()
        })
    }
}

/// A VM's name names its folder below --shared: a plain name, so that the pair key and the
/// arbitration records stay inside shared storage.
fn check_vm_name(vm: &str) -> Result<(), Failure> {
    let plain = !vm.is_empty()
        && vm.len() <= 64
        && !vm.starts_with('.')
        && vm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        Ok(())
    } else {
        Err(bad(format!(
            "--vm {vm:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

#[derive(clap::Args)]
struct FtPrimaryArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// Address of the logging channel (on the logging network).
    #[arg(long, value_name = "ADDR:PORT")]
    log_listen: String,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct FtSecondaryArgs {
    #[command(flatten)]
    ft: FtArgs,
    /// The primary's logging channel address.
    #[arg(long, value_name = "ADDR:PORT")]
    primary: String,
    /// The guest module (the same as the primary's).
    #[arg(long, value_name = "FILE")]
    wasm: PathBuf,
    /// The VM's datastore: the same shared folder as the primary's.
    #[arg(long, value_name = "DIR")]
    datastore: Option<PathBuf>,
    /// The bridge the VM's NIC joins on this host when this copy goes live.
    #[arg(long, value_name = "BR")]
    bridge: Option<String>,
    /// How long to keep trying to reach the primary (at most a day).
    #[arg(long, default_value_t = 10)]
    wait_secs: u64,
    /// Once this copy is live (its primary lost), accept a new secondary here.
    #[arg(long, value_name = "ADDR:PORT")]
    log_listen: Option<String>,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Run a wasm32-wasi program as a Tandem VM, optionally recording its event log.
    ///
    /// The guest sees DIR as its preopened directory "/" (fd 3); its stdout and stderr go
    /// to this process's. Exits with the guest's exit code (1 if the guest trapped).
    /// SIGINT/SIGTERM stop the guest within a second, even one making no calls (exit 0;
    /// a recording then ends with a stop record and replays to the same stop).
    ///
    /// With --restore, the VM continues from a snapshot (its module instrumented for
    /// snapshots the same way; a snapshot of another module is refused, exit 2): the
    /// guest's arguments, environment, memory limit, NIC and listeners are the
    /// snapshot's; --nic names the bridge on this host (its MAC and IP must be the
    /// snapshot's). With --api-sock, the VM serves its control API (HTTP/JSON on a Unix
    /// socket: GET /status, PUT /snapshot, PUT /stop); see `tandem vm snapshot`.
    Run(snap::VmRunArgs),
    /// Checkpoint a running VM (one started with --api-sock) at its next event boundary:
    /// prints `snapshot: events=N bytes=B pause_ms=P`. With --stop the VM then stops
    /// (suspend); `tandem vm run --restore FILE` resumes it.
    Snapshot(snap::SnapshotArgs),
    /// Wait for one VM migrated here by `tandem vm migrate` (from another host), then run
    /// it as `vm run --restore` would: its MAC and IP are the VM's own (announced as it
    /// goes live), --bridge names this host's bridge for its NIC. Failed attempts are
    /// logged and the next source awaited; SIGTERM before a VM arrived exits 0.
    Receive(snap::ReceiveArgs),
    /// Move a running VM (started with --api-sock) to a `vm receive` on another host: its
    /// memory copied while it runs (rounds of the pages written meanwhile), then a short
    /// stop at its next event boundary for the last pages, the receiver goes live, this VM
    /// exits. Prints `precopied: rounds=R running_bytes=X stopped_bytes=Y` and
    /// `migrated: events=N pause_ms=P bytes=B`. Exit 1: not migrated, the VM goes on here
    /// (receiver absent, refusing or failing before the commit); exit 4: the receiver was
    /// told to go live but did not confirm, so the VM stopped here (it may run there).
    Migrate(snap::MigrateArgs),
    /// Replay a recorded log and check the execution is identical.
    ///
    /// Nothing is written to the datastore or the console: outputs are computed and
    /// digested. Prints `replay ok: events=N digest=HEX` (exit 0) or
    /// `replay diverged at event N: WHY` (exit 3).
    ///
    /// A recording stopped by SIGINT/SIGTERM replays to the same stop: `stopped: ...`
    /// saying where, then `replay ok: ...` (exit 0). A recording killed (no end record; its
    /// last chunk possibly torn) replays every event it holds, then prints `cut: the log
    /// ends after N events without an end record (its recording was killed); replayed up
    /// to there` and `replay ok: events=N digest=HEX` (exit 5). The digest then covers the
    /// outputs up to the last event. Damage anywhere else is refused (exit 2).
    Replay {
        /// The log written by `vm run --record`.
        log: PathBuf,
        /// The guest module the log was recorded from.
        #[arg(long, value_name = "FILE")]
        wasm: PathBuf,
        /// The VM's datastore folder (checked to exist; never touched by a replay).
        #[arg(long, value_name = "DIR")]
        datastore: Option<PathBuf>,
        #[command(flatten)]
        snap: snap::ReplaySnapArgs,
    },
    /// Cluster verb: create a VM (powered off, FT off) from a guest module every host
    /// reads; its datastore on shared storage.
    Create(verbs_cli::CreateArgs),
    /// Cluster verb: power a VM on; waits until it runs on a host (the primary's).
    PowerOn(verbs_cli::PowerOnArgs),
    /// Cluster verb: power a VM off: every copy of it stops.
    PowerOff(verbs_cli::VmArgs),
    /// Cluster verb: destroy a powered-off VM (its datastore is kept).
    Destroy(verbs_cli::VmArgs),
    /// Cluster verb: the VMs: power, FT status (Protected; Not protected with the reason;
    /// Disabled; Off), primary and secondary hosts, the secondary's lag, logging bandwidth.
    List(verbs_cli::ListArgs),
    /// Cluster verb: one VM in full.
    Show(verbs_cli::ShowArgs),
    /// Cluster verb: VM monitoring's settings of a VM (what is not given stays): resets
    /// allowed in a window, and the opt-in heartbeat.
    Monitor(ops_cli::MonitorArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The guest module (a wasm32-wasi command).
    #[arg(long, value_name = "FILE")]
    pub wasm: PathBuf,
    /// The VM's datastore folder, preopened as "/" at fd 3.
    #[arg(long, value_name = "DIR")]
    pub datastore: Option<PathBuf>,
    /// An argument for the guest (repeat for more); argv[0] is the module's file name.
    #[arg(long = "arg", value_name = "A", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable for the guest (repeat for more).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Record every event into this log file.
    #[arg(long, value_name = "LOG")]
    pub record: Option<PathBuf>,
    /// The guest's memory limit in MiB (fixed for the VM's life).
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_LIMIT >> 20)]
    pub memory_mib: u64,
    /// Give the VM a NIC: a tap on bridge BR, with its own MAC and IPv4 address
    /// (CIDR, e.g. 10.0.0.10/24), served by the VM's own network stack.
    #[arg(long, value_name = "bridge=BR,mac=MAC,ip=CIDR")]
    pub nic: Option<String>,
    /// A TCP port the VM listens on; the guest finds the listeners preopened at fd 4,
    /// 5, ... in this order (repeat for more). Needs --nic.
    #[arg(long = "listen", value_name = "tcp:PORT")]
    pub listen: Vec<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The VM: recording overhead, wasm against native code, the network stack, kvd.
    Vm(bench::VmBenchArgs),
    /// Fault tolerance: FT against unprotected kvd, failover gap, logging bandwidth.
    Ft(bench::FtBenchArgs),
    /// The cluster: re-protection, HA restart and master failover times (a lab of 4 hosts).
    Cluster(bench::ClusterBenchArgs),
    /// kvd under FT and load, its primary's host killed N times (revived in between):
    /// nothing lost, no reset, every failover re-protected.
    Soak(bench::SoakArgs),
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<MachineError> for Failure {
    fn from(e: MachineError) -> Self {
        match e {
            MachineError::Divergence { .. } => Failure {
                code: 3,
                message: e.to_string(),
            },
            MachineError::Log(machine::LogError::Source(why)) => Failure {
                code: 4,
                message: format!("tandem: {why}"),
            },
            _ => Failure {
                code: 2,
                message: format!("tandem: {e}"),
            },
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            code: 2,
            message: format!("tandem: {e:#}"),
        }
    }
}

/// SIGINT and SIGTERM stop the VMs of this process (at their next call, or between events
/// if the guest computes without calls), so that a recording ends with its end record and a
/// NIC's tap is removed.
fn install_stop_handler() {
    extern "C" fn on_signal(sig: libc::c_int) {
        if sig == libc::SIGUSR1 {
            HANDOVER.store(true, std::sync::atomic::Ordering::SeqCst);
            HANDOVER_NOTICE.give();
        } else {
            STOP_SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
            machine::request_stop();
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: `on_signal` only stores to atomics and gives notices (itself or through
        // `machine::request_stop`), which is async-signal-safe (no locks, no allocation,
        // one `write(2)` with errno kept); the sigaction structure is fully initialised
        // before the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn start_monitor(
    health: lockstep::health::HealthConfig,
) -> Result<lockstep::health::Monitor, Failure> {
    lockstep::health::Monitor::start(health)
        .map_err(|e| bad(format!("cannot watch this host's health: {e}")))
}

/// SIGUSR1 asks an FT copy that is live to hand its VM over to its secondary (a planned
/// switch: a host agent's maintenance mode sends it).
static HANDOVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Given with [`HANDOVER`], so that the thread serving handovers sleeps until one is asked.
static HANDOVER_NOTICE: machine::notice::Notice = machine::notice::Notice::new();

/// The last of SIGINT or SIGTERM that came (0: none).
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// A bench that failed because a stop signal came exits as a shell reports a process that
/// signal ended (128 + the signal: 130 for Ctrl-C, 143 for SIGTERM), saying so; any other
/// failure is `Failure::from`.
fn bench_failure(e: anyhow::Error) -> Failure {
    let (sig, name) = match STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) {
        libc::SIGTERM => (libc::SIGTERM, "SIGTERM"),
        libc::SIGINT => (libc::SIGINT, "SIGINT"),
        _ => return Failure::from(e),
    };
    Failure {
        code: 128 + sig as u8,
        message: format!(
            "tandem: bench interrupted ({name}): its labs removed, no figures ({e:#})"
        ),
    }
}

/// Hand the VM over to the secondary whenever SIGUSR1 asks (while `live` says this copy
/// is the live one).
fn serve_handovers(
    primary: lockstep::primary::Primary,
    live: impl Fn() -> bool + Send + 'static,
) -> Result<(), Failure> {
    std::thread::Builder::new()
        .name("ft-handover".into())
        .spawn(move || {
            HANDOVER_NOTICE.arm();
            loop {
                if !HANDOVER.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    HANDOVER_NOTICE.wait(true, None);
                    continue;
                }
                if !live() {
                    tracing::warn!("handover asked of a copy that is not live: ignored");
                    continue;
                }
                if let Err(e) = primary.hand_over("planned switch asked by SIGUSR1") {
                    tracing::warn!("handover refused: {e}");
                }
            }
        })
        .map(|_| ())
        .map_err(|e| bad(format!("cannot start a thread: {e}")))
}

/// Large allocations (an event's data, up to 16 MiB; a frame of events) go to their own
/// mappings and back to the kernel when freed. glibc's default raises its mmap threshold to
/// the size of the largest block freed so far, so after the first 16 MiB read every later one
/// is carved from the heap, whose freed blocks stay resident: an FT primary, which holds a
/// few such events at a time and frees them in another order than it took them, kept
/// tens of MiB of freed heap at its peak. A fixed threshold also stops that adjustment.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const THRESHOLD: i32 = 256 << 10;
        // SAFETY: mallopt only sets an allocator parameter; it is called once, first thing
        // in main, before any other thread exists.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
        if ok == 0 {
            eprintln!("tandem: cannot set the allocator's mmap threshold; going on without");
        }
    }
}

fn main() -> ExitCode {
    fix_mmap_threshold();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log that cannot be written (a host agent keeps its copies' logs on shared
        // storage, which the host may lose) must not take the logging thread down: the
        // subscriber would report the failure with eprintln!, which panics on that same
        // stderr (and a health watcher dying this way never reports the loss).
        .log_internal_errors(false)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let cli = Cli::parse();
    if cli.no_code_cache {
        machine::codecache::set(machine::codecache::Setting::Off);
    } else if let Some(dir) = &cli.code_cache {
        machine::codecache::set(machine::codecache::Setting::Dir(dir.clone()));
    }
    // A replay performs nothing on the host and does not stop on request: SIGINT/SIGTERM
    // keep their default action there (end the process).
    if !matches!(cli.command, Command::Vm(VmCommand::Replay { .. })) {
        install_stop_handler();
    }
    // The cluster's client verbs print reports that are piped into `head` and the like:
    // a closed pipe ends them quietly, as it does any Unix tool (everything else keeps
    // Rust's default, where a closed socket is an error, not a signal).
    let client_verb = matches!(
        cli.command,
        Command::Cluster(_)
            | Command::Host(
                verbs_cli::HostCommand::List { .. } | verbs_cli::HostCommand::Maintenance(_)
            )
            | Command::Vm(
                VmCommand::Create(_)
                    | VmCommand::PowerOn(_)
                    | VmCommand::PowerOff(_)
                    | VmCommand::Destroy(_)
                    | VmCommand::List(_)
                    | VmCommand::Show(_)
            )
    );
    if client_verb {
        // SAFETY: restoring a signal's default disposition; no handler, no memory.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Vm(VmCommand::Run(a)) if a.is_plain() => vm_run(a.run),
        Command::Vm(VmCommand::Run(a)) => snap::vm_run(a),
        Command::Vm(VmCommand::Snapshot(a)) => snap::vm_snapshot(&a),
        Command::Vm(VmCommand::Receive(a)) => snap::vm_receive(&a),
        Command::Vm(VmCommand::Migrate(a)) => snap::vm_migrate(&a),
        Command::Vm(VmCommand::Replay {
            log,
            wasm,
            datastore,
            snap,
        }) if snap.is_plain() => vm_replay(&log, &wasm, datastore.as_deref()),
        Command::Vm(VmCommand::Replay {
            log,
            wasm,
            datastore,
            snap,
        }) => snap::vm_replay(&log, &wasm, datastore.as_deref(), &snap),
        Command::Bench(b) => {
            let ran = match b {
                BenchCommand::Vm(a) => bench::vm(&a),
                BenchCommand::Ft(a) => bench::ft(&a),
                BenchCommand::Cluster(a) => bench::cluster(&a),
                BenchCommand::Soak(a) => bench::soak(&a),
            };
            ran.map_err(bench_failure)
        }
        Command::Demo(a) => demo::run(&a).map_err(Failure::from),
        Command::Ft(FtCommand::Primary(a)) => ended_ft(ft_primary(a)),
        Command::Ft(FtCommand::Secondary(a)) => ended_ft(ft_secondary(a)),
        Command::Cluster(c) => Ok(verbs_cli::cluster(&c)),
        Command::Host(c) => verbs_cli::host(&c).map_err(Failure::from),
        Command::Vm(VmCommand::Create(a)) => Ok(verbs_cli::vm_create(&a)),
        Command::Vm(VmCommand::PowerOn(a)) => Ok(verbs_cli::vm_power_on(&a)),
        Command::Vm(VmCommand::PowerOff(a)) => Ok(verbs_cli::vm_power_off(&a)),
        Command::Vm(VmCommand::Destroy(a)) => Ok(verbs_cli::vm_destroy(&a)),
        Command::Vm(VmCommand::List(a)) => Ok(verbs_cli::vm_list(&a)),
        Command::Vm(VmCommand::Show(a)) => Ok(verbs_cli::vm_show(&a)),
        Command::Vm(VmCommand::Monitor(a)) => Ok(ops_cli::vm_monitor(&a)),
        Command::Ft(FtCommand::TurnOn(a)) => Ok(verbs_cli::ft_wait(&a, FtOp::TurnOn)),
        Command::Ft(FtCommand::TurnOff(a)) => Ok(verbs_cli::ft_now(&a, FtOp::TurnOff)),
        Command::Ft(FtCommand::Disable(a)) => Ok(verbs_cli::ft_now(&a, FtOp::Disable)),
        Command::Ft(FtCommand::Enable(a)) => Ok(verbs_cli::ft_wait(&a, FtOp::Enable)),
        Command::Ft(FtCommand::TestFailover(a)) => Ok(verbs_cli::ft_wait(&a, FtOp::TestFailover)),
        Command::Ft(FtCommand::RestartSecondary(a)) => {
            Ok(verbs_cli::ft_wait(&a, FtOp::RestartSecondary))
        }
        Command::Ft(FtCommand::MigrateSecondary(a)) => Ok(verbs_cli::ft_wait(
            &a.vm,
            FtOp::MigrateSecondary { to: a.to.clone() },
        )),
        Command::Ft(FtCommand::Schedule(a)) => Ok(ops_cli::ft_schedule(&a)),
        Command::Ft(FtCommand::Sizing(a)) => Ok(ops_cli::ft_sizing(&a)),
        Command::Lab(c) => lab::run(c).map_err(Failure::from),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            if f.code == 3 {
                println!("{}", f.message);
            } else {
                eprintln!("{}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn bad(message: String) -> Failure {
    Failure {
        code: 2,
        message: format!("tandem: {message}"),
    }
}

fn check_datastore(datastore: Option<&Path>) -> Result<(), Failure> {
    match datastore {
        Some(d) if !d.is_dir() => Err(bad(format!("datastore {} is not a directory", d.display()))),
        _ => Ok(()),
    }
}

/// The exit code `vm run` passes on for a guest's exit.
fn exit_code(exit: &Exit) -> u8 {
    match exit {
        Exit::Code(c) => (*c).min(255) as u8,
        Exit::Trap(t) => {
            eprintln!("tandem: guest trapped: {t}");
            1
        }
        Exit::Stopped => {
            tracing::info!("VM stopped on request");
            0
        }
        Exit::Interrupted => {
            tracing::info!("VM stopped on request between events");
            0
        }
    }
}

/// A NIC as given on the command line: the bridge its tap joins and its identity.
struct Nic {
    bridge: String,
    config: netstack::NetConfig,
}

/// A NIC's `mac=` value: six hex octets, unicast.
pub fn nic_mac(v: &str) -> Result<[u8; 6], String> {
    let m = parse_mac(v)
        .ok_or_else(|| format!("--nic: {v:?} is not a MAC address like 02:00:00:00:00:10"))?;
    if m[0] & 1 != 0 {
        return Err(format!(
            "--nic: {v} is a multicast MAC; a NIC needs a unicast one"
        ));
    }
    Ok(m)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok().filter(|l| (1..=32).contains(l))?;
    Some((ip.octets(), len))
}

/// `--listen tcp:PORT` flags: the ports, each 1-65535 and given once.
pub fn listen_ports(listen: &[String]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for l in listen {
        let port = l
            .strip_prefix("tcp:")
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("--listen {l:?} is not of the form tcp:PORT (PORT 1-65535)"))?;
        if ports.contains(&port) {
            return Err(format!("--listen: port {port} is given twice"));
        }
        ports.push(port);
    }
    Ok(ports)
}

fn parse_network(nic: Option<&str>, listen: &[String]) -> Result<(Option<Nic>, Vec<u16>), Failure> {
    let ports = listen_ports(listen).map_err(bad)?;
    let Some(nic) = nic else {
        if !ports.is_empty() {
            return Err(bad(
                "--listen needs a NIC: add --nic bridge=BR,mac=MAC,ip=CIDR".into(),
            ));
        }
        return Ok((None, ports));
    };
    let (mut bridge, mut mac, mut ip) = (None, None, None);
    for part in nic.split(',') {
        match part.split_once('=') {
            Some(("bridge", v)) if !v.is_empty() => bridge = Some(v.to_string()),
            Some(("mac", v)) => mac = Some(nic_mac(v).map_err(bad)?),
            Some(("ip", v)) => {
                ip = Some(parse_cidr(v).ok_or_else(|| {
                    bad(format!(
                        "--nic: {v:?} is not an IPv4 address with prefix like 10.0.0.10/24"
                    ))
                })?)
            }
            _ => {
                return Err(bad(format!(
                    "--nic: {part:?} is not one of bridge=BR, mac=MAC, ip=CIDR"
                )));
            }
        }
    }
    let missing = |what: &str| bad(format!("--nic needs {what}=..."));
    let bridge = bridge.ok_or_else(|| missing("bridge"))?;
    let mac = mac.ok_or_else(|| missing("mac"))?;
    let (ip, prefix_len) = ip.ok_or_else(|| missing("ip"))?;
    if !devices::bridge_exists(&bridge) {
        return Err(bad(format!(
            "--nic: bridge {bridge:?} does not exist on this host"
        )));
    }
    Ok((
        Some(Nic {
            bridge,
            config: netstack::NetConfig {
                mac,
                ip,
                prefix_len,
            },
        }),
        ports,
    ))
}

/// A VM as the run flags describe it: its module, what the guest sees, and its NIC.
struct Prepared {
    machine: Machine,
    spec: GuestSpec,
    nic: Option<Nic>,
}

fn prepare(a: &RunArgs) -> Result<Prepared, Failure> {
    let (spec, nic) = prepare_spec(a)?;
    let machine = Machine::load(&a.wasm)?;
    Ok(Prepared { machine, spec, nic })
}

/// What the run flags say the guest sees, and its NIC, checked (the module not loaded).
fn prepare_spec(a: &RunArgs) -> Result<(GuestSpec, Option<Nic>), Failure> {
    let (nic, listen) = parse_network(a.nic.as_deref(), &a.listen)?;
    if let Some(bad_env) = a
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        return Err(bad(format!("--env {bad_env:?} is not of the form K=V")));
    }
    if a.memory_mib == 0 || a.memory_mib > 4096 {
        return Err(bad(format!(
            "--memory-mib {} is outside 1..=4096",
            a.memory_mib
        )));
    }
    check_datastore(a.datastore.as_deref())?;
    let spec = GuestSpec {
        args: std::iter::once(guest_name(&a.wasm))
            .chain(a.args.iter().cloned())
            .collect(),
        env: a.env.clone(),
        datastore: a.datastore.is_some(),
        memory_limit: a.memory_mib << 20,
        nic: nic.as_ref().map(|n| n.config.clone()),
        listen,
    };
    Ok((spec, nic))
}

fn vm_run(a: RunArgs) -> Result<u8, Failure> {
    let Prepared { machine, spec, nic } = prepare(&a)?;
    let record = a.record.as_deref();
    let sink = match record {
        Some(path) => Some(Box::new(
            LogWriter::create(path, &machine.log_header(&spec)).map_err(MachineError::from)?,
        ) as Box<dyn EventSink + Send>),
        None => None,
    };
    let bridge = nic.as_ref().map(|n| n.bridge.as_str());
    let inputs = live_inputs(&spec, a.datastore.as_deref(), bridge, sink)?;
    let report = machine.run(spec, inputs)?;
    if let Some(path) = record {
        tracing::info!("log written to {}", path.display());
        println!(
            "recorded: events={} digest={}",
            report.events,
            hex(&report.digest)
        );
    }
    Ok(exit_code(&report.exit))
}

/// Run a VM as an FT primary: live here, its events streamed to a secondary.
///
/// The VM runs instrumented for snapshots: while no secondary is attached this copy
/// takes its own checkpoints, so that what it keeps stays bounded (see
/// `lockstep::checkpoint`).
/// A copy's last status reaches its file before the process ends (see `lockstep::status`).
fn ended_ft(result: Result<u8, Failure>) -> Result<u8, Failure> {
    if !lockstep::status::flush(std::time::Duration::from_secs(2)) {
        tracing::warn!(
            "the VM's status file may be out of date: its storage did not answer within 2 s"
        );
    }
    result
}

fn ft_primary(a: FtPrimaryArgs) -> Result<u8, Failure> {
    a.ft.fence()?;
    if a.run.record.is_some() {
        return Err(bad(
            "--record does not combine with FT: the secondary holds the log".into(),
        ));
    }
    let config = a.ft.config()?;
    let policy = a.ft.policy()?;
    let health = a.ft.health(&lockstep::VmDir::new(&a.ft.shared, &a.ft.vm))?;
    let (spec, nic) = prepare_spec(&a.run)?;
    let machine = SnapMachine::load(&a.run.wasm)?;
    let control = Control::new(&machine.module_digest(), &machine.instrumented_digest());
    let machine = machine.with_control(control.clone());
    let dir = lockstep::VmDir::new(&a.ft.shared, &a.ft.vm);
    let tap = machine::nic_tap(&spec, nic.as_ref().map(|n| n.bridge.as_str()))?;
    let primary = lockstep::primary::Primary::start(
        dir.clone(),
        &a.log_listen,
        machine.log_header(&spec),
        tap.clone(),
        true,
        config,
    )
    .map_err(|e| bad(e.to_string()))?;
    let (kept, done) = (primary.clone(), primary.clone());
    lockstep::checkpoint::spawn(
        control,
        lockstep::checkpoint::Checkpoints::new(&dir),
        policy,
        move || kept.to_checkpoint_kept(),
        move |events| done.checkpointed(events),
    )
    .map_err(|e| bad(e.to_string()))?;
    serve_handovers(primary.clone(), || true)?;
    primary.watch_health(start_monitor(health)?, !a.ft.no_health_handover);
    let host = machine::live_host(&spec, a.run.datastore.as_deref(), tap)?;
    let inputs = Inputs::Live {
        host,
        sink: Some(Box::new(primary.sink())),
        port: Box::new(primary.port()),
    };
    let result = machine.run(spec, inputs, None);
    end_primary(&primary, result.map(|r| r.report))
}

/// A live copy's run ended: end it on both copies the same way. The secondary confirms
/// the end (or is fenced off) and every held output is written before this process exits.
fn end_primary(
    primary: &lockstep::primary::Primary,
    result: Result<machine::RunReport, CaptureError>,
) -> Result<u8, Failure> {
    if let Some(why) = primary.handed_over() {
        eprintln!("tandem: handed over to the secondary: {why}");
        return Ok(0);
    }
    if let Some(why) = primary.halted() {
        eprintln!("tandem: halted: {why}");
        return Ok(4);
    }
    let report = result?;
    primary.finish();
    if let Some(why) = primary.halted() {
        eprintln!("tandem: halted: {why}");
        return Ok(4);
    }
    Ok(exit_code(&report.exit))
}

/// How many times a newcomer tries again when it was refused: a newer checkpoint appeared
/// between reading the latest and attaching, or the copy it joins just went live and is
/// taking the checkpoint to join from.
const JOIN_TRIES: u32 = 20;
/// How long a refused newcomer waits for a newer checkpoint before asking again.
const JOIN_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// Run a VM as an FT secondary: replay the primary's events; go live if it is lost.
///
/// It joins from the VM's latest checkpoint (or from power-on if there is none), takes
/// checkpoints as it replays, and keeps the events since the latest: once live, it
/// accepts a new secondary on --log-listen, which joins the same way.
fn ft_secondary(a: FtSecondaryArgs) -> Result<u8, Failure> {
    a.ft.fence()?;
    check_datastore(a.datastore.as_deref())?;
    let config = a.ft.config()?;
    let policy = a.ft.policy()?;
    if a.wait_secs > MAX_WAIT_SECS {
        return Err(bad(format!(
            "--wait-secs {} is over a day ({MAX_WAIT_SECS})",
            a.wait_secs
        )));
    }
    let dir = lockstep::VmDir::new(&a.ft.shared, &a.ft.vm);
    let health = a.ft.health(&dir)?;
    let machine = SnapMachine::load(&a.wasm)?;
    let checkpoints = lockstep::checkpoint::Checkpoints::new(&dir);
    let mut tries = 0;
    let (secondary, restore) = loop {
        let restore = match checkpoints.latest() {
            Some((_, path)) => match machine.open_snapshot(&path) {
                Ok(r) => Some(r),
                // Pruned while read (two newer ones were installed meanwhile): the newest.
                Err(e) if tries < JOIN_TRIES && !path.exists() => {
                    tracing::info!("{e}; joining from the newest checkpoint");
                    tries += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let from = restore.as_ref().map_or(0, |r| r.events());
        match lockstep::secondary::Secondary::connect(
            dir.clone(),
            &a.primary,
            std::time::Duration::from_secs(a.wait_secs),
            config.clone(),
            from,
        ) {
            Ok(s) => {
                match &restore {
                    Some(r) => {
                        tracing::info!("joining from the checkpoint at event {}", r.events())
                    }
                    None => tracing::info!("joining from the VM's power-on"),
                }
                break (s, restore);
            }
            Err(lockstep::FtError::Refused(why)) if tries < JOIN_TRIES => {
                if checkpoints.latest().map(|c| c.0) != Some(from) {
                    tracing::info!("refused ({why}); a newer checkpoint is there: joining from it");
                } else {
                    // A copy that just went live takes its first checkpoint at once.
                    tracing::info!("refused ({why}); waiting for a newer checkpoint");
                    std::thread::sleep(JOIN_RETRY);
                }
                tries += 1;
            }
            Err(e) => return Err(bad(e.to_string())),
        }
    };
    let header = secondary.header.clone();
    if header.module_digest != machine.module_digest() {
        return Err(MachineError::ModuleMismatch {
            log: hex(&header.module_digest[..8]),
            given: hex(&machine.module_digest()[..8]),
        }
        .into());
    }
    if let Some(r) = &restore {
        let mut ours = r.log_header();
        ours.first_seq = header.first_seq;
        if ours != header {
            return Err(bad(
                "the latest checkpoint is of another VM than the primary's (arguments, \
                 environment, memory limit, NIC or listeners differ)"
                    .into(),
            ));
        }
    }
    if header.datastore && a.datastore.is_none() {
        return Err(bad(
            "the VM has a datastore: give --datastore (the same shared folder as the primary's)"
                .into(),
        ));
    }
    if header.nic.is_some() && a.bridge.is_none() {
        return Err(bad(
            "the VM has a NIC: give --bridge for when this copy goes live".into(),
        ));
    }
    let from = restore.as_ref().map_or(0, |r| r.events());
    let standby =
        lockstep::primary::Primary::standby(dir.clone(), header.clone(), from, true, config)
            .map_err(|e| bad(e.to_string()))?;
    let control = Control::new(&machine.module_digest(), &machine.instrumented_digest());
    let machine = machine.with_control(control.clone());
    let secondary = std::sync::Arc::new(secondary);
    {
        let (sec, kept) = (secondary.clone(), standby.clone());
        let (sec2, done) = (secondary.clone(), standby.clone());
        lockstep::checkpoint::spawn(
            control,
            checkpoints,
            policy,
            move || {
                if sec.left() {
                    None
                } else if let Some(won) = sec.live_generation() {
                    // Named with the generation won, also before the copy is activated.
                    kept.to_checkpoint_kept()
                        .map(|k| lockstep::checkpoint::Kept {
                            generation: k.generation.max(won),
                            ..k
                        })
                } else {
                    Some(lockstep::checkpoint::Kept {
                        bytes: kept.history_bytes(),
                        live: false,
                        due: false,
                        generation: sec.generation,
                    })
                }
            },
            move |events| {
                done.checkpointed(events);
                if sec2.live_generation().is_none() {
                    sec2.checkpointed(events);
                }
            },
        )
        .map_err(|e| bad(e.to_string()))?;
    }
    // Going live, this copy becomes the primary: outputs held to the output rule for the
    // secondary that may join it on --log-listen.
    let port: machine::PortFactory = {
        let (sec, p, listen) = (secondary.clone(), standby.clone(), a.log_listen.clone());
        Box::new(move |tap| {
            // Going live follows a generation won; a copy without one has nothing to serve.
            let generation = sec.live_generation();
            match generation {
                Some(g) => p.activate(g, sec.went_live(), tap, listen.as_deref()),
                None => tracing::error!("going live without a generation won: not serving"),
            }
            Box::new(p.port())
        })
    };
    let inputs = Inputs::Replay {
        source: Box::new(secondary.source(Some(standby.clone()))),
        go_live: Some(machine::GoLive {
            root: a.datastore.clone(),
            bridge: a.bridge.clone(),
            sink: Some(Box::new(standby.sink())),
            console: true,
            port: Some(port),
        }),
    };
    {
        let sec = secondary.clone();
        serve_handovers(standby.clone(), move || sec.live_generation().is_some())?;
        let monitor = start_monitor(health)?;
        secondary
            .watch_health(monitor.clone())
            .map_err(|e| bad(format!("cannot start a thread: {e}")))?;
        standby.watch_health(monitor, !a.ft.no_health_handover);
    }
    // An operator's stop while this copy replays makes it leave (drop out without
    // claiming a generation); it is never kept for a later go-live. Once live, the VM's
    // own stop handling takes it.
    let leaving = secondary.clone();
    std::thread::Builder::new()
        .name("ft-leave".into())
        .spawn(move || {
            machine::wait_for_stop();
            leaving.leave("stopped by the operator");
        })
        .map_err(|e| bad(format!("cannot start a thread: {e}")))?;
    let result = match &restore {
        Some(r) => machine.resume(r, inputs, None, false),
        None => machine.run(GuestSpec::from_header(&header), inputs, None),
    };
    if secondary.left() {
        eprintln!("tandem: the secondary left on request; the primary carries on unprotected");
        return Ok(0);
    }
    if secondary.live_generation().is_some() {
        // This copy is the VM now: its end is the VM's, on its own secondary too.
        return end_primary(&standby, result.map(|r| r.report));
    }
    let report = result?.report;
    // Ended with the primary: make sure it heard so before the channel closes.
    secondary.finish(std::time::Duration::from_secs(2));
    Ok(exit_code(&report.exit))
}

fn guest_name(wasm: &Path) -> String {
    wasm.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest".into())
}

fn vm_replay(log: &Path, wasm: &Path, datastore: Option<&Path>) -> Result<u8, Failure> {
    check_datastore(datastore)?;
    let machine = Machine::load(wasm)?;
    let reader = LogReader::open(log).map_err(MachineError::from)?;
    machine.check_log(reader.header())?;
    let header = reader.header().clone();
    if header.first_seq != 0 {
        return Err(bad(format!(
            "the log starts at event {} (a VM restored from a snapshot recorded it): give \
             --from the snapshot it continues",
            header.first_seq
        )));
    }
    let spec = GuestSpec::from_header(&header);
    let report = machine.run(
        spec,
        Inputs::Replay {
            source: Box::new(reader),
            go_live: None,
        },
    )?;
    Ok(replay_verdict(&report))
}

/// Print how a replay ended and its verdict; `vm replay`'s exit code.
fn replay_verdict(report: &machine::RunReport) -> u8 {
    // What kind of end the log had first, the verdict last (`replay ok: ...` stays the last
    // line whatever the log's end).
    if report.cut {
        println!(
            "cut: the log ends after {} events without an end record (its recording was \
             killed); replayed up to there",
            report.events
        );
    }
    match report.exit {
        Exit::Stopped if !report.cut => println!(
            "stopped: the recorded run was stopped by the host at its call after {} events; \
             the replay stopped there",
            report.events
        ),
        Exit::Interrupted if !report.cut => println!(
            "stopped: the recorded run was stopped by the host between events, after {} \
             events; the replay stopped there (outputs compared up to the last event)",
            report.events
        ),
        _ => {}
    }
    println!(
        "replay ok: events={} digest={}",
        report.events,
        hex(&report.digest)
    );
    if report.cut { CUT } else { 0 }
}

/// `vm replay`'s exit code for a log cut short (its recorder killed): every event it holds
/// replayed identically, but the run's end is unknown.
const CUT: u8 = 5;
