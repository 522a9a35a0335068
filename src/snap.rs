//! The snapshot side of `tandem vm`: replaying from a snapshot (or taking one while
//! replaying), restoring a VM from one, and the per-VM control API (`--api-sock`,
//! `vm snapshot`).
//!
//! Runs that use none of these flags never come here: they run the plain module exactly
//! as before. Runs that do use the module instrumented for snapshots
//! ([`machine::asyncify`]), whose execution is identical (same events, same digest).

use std::path::{Path, PathBuf};

use machine::capture::{CaptureError, FromEvent, Plan, Ran, Restore, SnapMachine};
use machine::control;
use machine::migrate::{Inbound, Listener, MigrateError};
use machine::{EventSink, Exit, Inputs, LogReader, LogWriter, MachineError, hex};

use crate::{Failure, RunArgs, bad, check_datastore, exit_code, parse_network, replay_verdict};

impl From<CaptureError> for Failure {
    fn from(e: CaptureError) -> Self {
        match e {
            CaptureError::Machine(m) => Failure::from(m),
            other => Failure {
                code: 2,
                message: format!("tandem: {other}"),
            },
        }
    }
}

/// `vm replay`'s snapshot flags.
#[derive(clap::Args)]
pub struct ReplaySnapArgs {
    /// Start from this snapshot (of a run of the same VM) and replay only the log's events
    /// after it; the verdict is the same as replaying the whole log.
    #[arg(long, value_name = "SNAP")]
    pub from: Option<PathBuf>,
    /// Take a snapshot at the first snapshot point at or after event N (written to --to),
    /// then replay on to the end of the log.
    #[arg(long, value_name = "N", requires = "to")]
    pub snapshot_at: Option<u64>,
    /// Where --snapshot-at writes the snapshot.
    #[arg(long, value_name = "SNAP", requires = "snapshot_at")]
    pub to: Option<PathBuf>,
}

impl ReplaySnapArgs {
    pub fn is_plain(&self) -> bool {
        self.from.is_none() && self.snapshot_at.is_none()
    }
}

/// `vm run`'s arguments: a VM's flags plus restoring and the control API.
#[derive(clap::Args)]
pub struct VmRunArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Continue the VM from this snapshot (taken by `vm snapshot` or `vm replay
    /// --snapshot-at`) instead of powering it on.
    #[arg(long, value_name = "SNAP")]
    pub restore: Option<PathBuf>,
    /// Serve the VM's control API (HTTP/1.1, JSON) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
}

impl VmRunArgs {
    pub fn is_plain(&self) -> bool {
        self.restore.is_none() && self.api_sock.is_none()
    }
}

/// `vm snapshot`'s arguments.
#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// The VM's control socket (its `vm run --api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Where the snapshot goes (written whole, then renamed into place).
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// Stop the VM once the snapshot is written (suspend).
    #[arg(long)]
    pub stop: bool,
}

fn load(wasm: &Path) -> Result<SnapMachine, Failure> {
    Ok(SnapMachine::load(wasm)?)
}

fn print_taken(ran: &Ran) {
    if let Some(t) = &ran.taken {
        println!(
            "snapshot: events={} bytes={} pause_ms={:.3}",
            t.events, t.bytes, t.pause_ms
        );
    }
}

/// `vm replay LOG --wasm FILE [--from SNAP] [--snapshot-at N --to SNAP]`.
pub fn vm_replay(
    log: &Path,
    wasm: &Path,
    datastore: Option<&Path>,
    a: &ReplaySnapArgs,
) -> Result<u8, Failure> {
    check_datastore(datastore)?;
    let m = load(wasm)?;
    let reader = LogReader::open(log).map_err(MachineError::from)?;
    let header = reader.header().clone();
    if header.module_digest != m.module_digest() {
        return Err(MachineError::ModuleMismatch {
            log: hex(&header.module_digest[..8]),
            given: hex(&m.module_digest()[..8]),
        }
        .into());
    }
    let plan = match (a.snapshot_at, &a.to) {
        (Some(at), Some(to)) => Some(Plan {
            at,
            to: to.clone(),
            stop: false,
        }),
        _ => None,
    };
    let ran = match &a.from {
        None => {
            if header.first_seq != 0 {
                return Err(bad(format!(
                    "the log starts at event {}: give --from the snapshot it continues",
                    header.first_seq
                )));
            }
            let spec = machine::GuestSpec::from_header(&header);
            let inputs = Inputs::Replay {
                source: Box::new(reader),
                go_live: None,
            };
            m.run(spec, inputs, plan)?
        }
        Some(from) => {
            let restore = m.open_snapshot(from)?;
            let events = restore.events();
            if header.first_seq > events {
                return Err(bad(format!(
                    "the log starts at event {}, after the snapshot (event {events})",
                    header.first_seq
                )));
            }
            let mut ours = restore.log_header();
            ours.first_seq = header.first_seq;
            if ours != header {
                return Err(bad(
                    "the snapshot is of another VM than the log (arguments, environment, \
                     memory limit, NIC or listeners differ)"
                        .into(),
                ));
            }
            // A log that starts at the snapshot was recorded by a VM restored from it,
            // which announced itself as it went live (see `SnapMachine::resume`).
            let announced = header.first_seq == events && events > 0;
            let inputs = Inputs::Replay {
                source: Box::new(FromEvent::new(reader, events)),
                go_live: None,
            };
            m.resume(&restore, inputs, plan, announced)?
        }
    };
    if let Some(at) = a.snapshot_at
        && ran.taken.is_none()
    {
        return Err(bad(format!(
            "no snapshot taken: the run ended after {} events, before a snapshot point at \
             or after event {at} (a call reached through a function pointer is none)",
            ran.report.events
        )));
    }
    print_taken(&ran);
    Ok(replay_verdict(&ran.report))
}

/// The VM `vm run --restore` continues: its snapshot, checked, and the module.
struct Restored {
    m: SnapMachine,
    restore: Restore,
}

fn open_restore(a: &VmRunArgs, path: &Path) -> Result<Restored, Failure> {
    let r = &a.run;
    if !r.args.is_empty()
        || !r.env.is_empty()
        || r.memory_mib != machine::DEFAULT_MEMORY_LIMIT >> 20
    {
        return Err(bad(
            "--restore: the guest's arguments, environment and memory limit are the \
             snapshot's (drop --arg, --env and --memory-mib)"
                .into(),
        ));
    }
    check_datastore(r.datastore.as_deref())?;
    let m = load(&r.wasm)?;
    let restore = m.open_snapshot(path)?;
    Ok(Restored { m, restore })
}

/// `vm run --restore SNAP` and/or `--api-sock PATH`.
pub fn vm_run(a: VmRunArgs) -> Result<u8, Failure> {
    match a.restore.clone() {
        Some(path) => run_restored(&a, &path),
        None => run_fresh(&a),
    }
}

/// The control API, if asked for: the machine answers it and the socket is served until
/// the returned server is dropped (which removes the socket file).
fn control(
    a: &VmRunArgs,
    m: SnapMachine,
) -> Result<(SnapMachine, Option<control::Server>), Failure> {
    serve_control(a.api_sock.as_deref(), m)
}

fn serve_control(
    path: Option<&Path>,
    m: SnapMachine,
) -> Result<(SnapMachine, Option<control::Server>), Failure> {
    serve_control_with(path, m, |_| ())
}

/// [`serve_control`], `prepare` seeing the control before it is served.
fn serve_control_with(
    path: Option<&Path>,
    m: SnapMachine,
    prepare: impl FnOnce(&std::sync::Arc<control::Control>),
) -> Result<(SnapMachine, Option<control::Server>), Failure> {
    let Some(path) = path else {
        return Ok((m, None));
    };
    let c = control::Control::new(&m.module_digest(), &m.instrumented_digest());
    prepare(&c);
    let server = control::serve(path, c.clone()).map_err(|e| bad(e.to_string()))?;
    tracing::info!("control API on {}", path.display());
    Ok((m.with_control(c), Some(server)))
}

/// `vm run --api-sock PATH ...`: a VM powered on here, instrumented for snapshots.
fn run_fresh(a: &VmRunArgs) -> Result<u8, Failure> {
    let (spec, nic) = crate::prepare_spec(&a.run)?;
    let m = load(&a.run.wasm)?;
    let sink = match &a.run.record {
        Some(log) => Some(Box::new(
            LogWriter::create(log, &m.log_header(&spec)).map_err(MachineError::from)?,
        ) as Box<dyn EventSink + Send>),
        None => None,
    };
    let inputs = machine::live_inputs(
        &spec,
        a.run.datastore.as_deref(),
        nic.as_ref().map(|n| n.bridge.as_str()),
        sink,
    )?;
    let (m, _server) = control(a, m)?;
    let ran = m.run(spec, inputs, None)?;
    finish_run(a, &ran)
}

/// `vm run --restore SNAP ...`: the VM continues here from its snapshot.
fn run_restored(a: &VmRunArgs, path: &Path) -> Result<u8, Failure> {
    let Restored { m, restore } = open_restore(a, path)?;
    let spec = restore.spec();
    let (nic, listen) = parse_network(a.run.nic.as_deref(), &a.run.listen)?;
    if nic.as_ref().map(|n| &n.config) != spec.nic.as_ref() {
        return Err(bad(match &spec.nic {
            Some(_) => "--restore: the VM has a NIC: give --nic with the snapshot's MAC and IP \
                        and this host's bridge"
                .into(),
            None => "--restore: the VM has no NIC (drop --nic)".into(),
        }));
    }
    if !listen.is_empty() && listen != spec.listen {
        return Err(bad(format!(
            "--restore: the VM listens on {:?}; --listen must name the same ports or none",
            spec.listen
        )));
    }
    if spec.datastore != a.run.datastore.is_some() {
        return Err(bad(if spec.datastore {
            "--restore: the VM has a datastore: give --datastore".into()
        } else {
            "--restore: the VM has no datastore (drop --datastore)".into()
        }));
    }
    let sink = match &a.run.record {
        Some(log) => Some(Box::new(
            LogWriter::create(log, &restore.log_header()).map_err(MachineError::from)?,
        ) as Box<dyn EventSink + Send>),
        None => None,
    };
    let tap = machine::nic_tap(&spec, nic.as_ref().map(|n| n.bridge.as_str()))?;
    let host = restore.live_host(a.run.datastore.as_deref(), tap.clone())?;
    tracing::info!("restored at event {}", restore.events());
    let inputs = Inputs::Live {
        host,
        sink,
        port: Box::new(machine::port::Direct { tap, console: true }),
    };
    let (m, _server) = control(a, m)?;
    let ran = m.resume(&restore, inputs, None, true)?;
    finish_run(a, &ran)
}

fn finish_run(a: &VmRunArgs, ran: &Ran) -> Result<u8, Failure> {
    if let Some(path) = &a.run.record {
        tracing::info!("log written to {}", path.display());
        println!(
            "recorded: events={} digest={}",
            ran.report.events,
            hex(&ran.report.digest)
        );
    }
    if ran.report.exit == Exit::Stopped
        && let Some(t) = &ran.taken
    {
        if ran.handed_over {
            tracing::info!("migrated away at event {} ({} bytes)", t.events, t.bytes);
        } else {
            tracing::info!("suspended at event {} ({} bytes)", t.events, t.bytes);
        }
    }
    Ok(exit_code(&ran.report.exit))
}

/// `vm snapshot --api-sock PATH --to FILE [--stop]`.
pub fn vm_snapshot(a: &SnapshotArgs) -> Result<u8, Failure> {
    // The VM resolves the path in its own working folder: give it ours.
    let to =
        std::path::absolute(&a.to).map_err(|e| bad(format!("--to {}: {e}", a.to.display())))?;
    let body = serde_json::json!({ "to": to, "stop": a.stop });
    let (code, reply) = control::request(
        &a.api_sock,
        "PUT",
        "/snapshot",
        Some(&body),
        control::SNAPSHOT_WAIT + std::time::Duration::from_secs(10),
    )
    .map_err(|e| {
        bad(format!(
            "cannot reach the VM at {}: {e}",
            a.api_sock.display()
        ))
    })?;
    if code != 200 {
        let why = reply
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        return Err(bad(format!("snapshot refused ({code}): {why}")));
    }
    let r: control::SnapshotReply =
        serde_json::from_value(reply).map_err(|e| bad(format!("the VM's reply: {e}")))?;
    println!(
        "snapshot: events={} bytes={} pause_ms={:.3}",
        r.events, r.bytes, r.pause_ms
    );
    Ok(0)
}

/// `vm receive`'s arguments.
#[derive(clap::Args)]
pub struct ReceiveArgs {
    /// Where sources connect (`vm migrate --to` names it).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: String,
    /// The guest module (the VM's; checked against the one the source runs).
    #[arg(long, value_name = "FILE")]
    pub wasm: PathBuf,
    /// The VM's datastore folder on this host (shared storage: the same files the source
    /// uses). Needed if the VM has one.
    #[arg(long, value_name = "DIR")]
    pub datastore: Option<PathBuf>,
    /// The bridge the VM's NIC joins on this host (its MAC and IP are the VM's own).
    /// Needed if the VM has a NIC.
    #[arg(long, value_name = "BR")]
    pub bridge: Option<String>,
    /// Serve the VM's control API on this Unix socket (so it can be migrated again).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Record the VM's events from its arrival on to this log (`vm replay LOG --from
    /// SNAP` replays it from a snapshot at the arrival).
    #[arg(long, value_name = "LOG")]
    pub record: Option<PathBuf>,
}

/// `vm migrate`'s arguments.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The VM's control socket (its `vm run --api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// The receiver: a `vm receive --listen ADDR:PORT` on another host.
    #[arg(long, value_name = "ADDR:PORT")]
    pub to: String,
}

/// A VM that arrived: checked, its host here set up, the source committed.
struct Arrived {
    restore: Restore,
    host: machine::host::LiveHost,
    tap: Option<std::sync::Arc<devices::Tap>>,
    /// `--record`'s log, created before the source commits (a log that cannot be is a
    /// refusal, never a VM committed and then lost).
    sink: Option<Box<dyn EventSink + Send>>,
}

/// One migration attempt on a connected source, up to its commit. Any error leaves
/// nothing behind here (the tap and reopened files are dropped) and the source running.
fn arrive(m: &SnapMachine, a: &ReceiveArgs, inb: &mut Inbound) -> Result<Arrived, String> {
    let (module, instrumented) = (m.module_digest(), m.instrumented_digest());
    inb.hello(&module, &instrumented)
        .map_err(|e| e.to_string())?;
    let offered = inb.offer().map_err(|e| e.to_string())?;
    let t = std::time::Instant::now();
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    let prepared = (|| {
        let snap = machine::snapshot::decode(&offered.snapshot, &module, Some(&instrumented))
            .map_err(|e| e.to_string())?;
        drop(offered.snapshot);
        tracing::debug!("offer +{:.1} ms: decoded", ms(t));
        let restore = m.check(snap).map_err(|e| e.to_string())?;
        // The memory streamed as pages goes with the snapshot, checked with it as a
        // snapshot file is (see `machine::migrate`); the restore moves its pages into the
        // guest's memory rather than copying them.
        let restore = match offered.memory {
            Some(memory) => {
                tracing::info!(
                    "memory: {} bytes, {} came as pages",
                    memory.len(),
                    offered.page_bytes
                );
                restore.with_memory(memory).map_err(|e| e.to_string())?
            }
            None => restore,
        };
        let spec = restore.spec();
        if spec.nic.is_some() != a.bridge.is_some() {
            return Err(if spec.nic.is_some() {
                "the VM has a NIC: this receiver was given no --bridge".to_string()
            } else {
                "the VM has no NIC: this receiver was given --bridge".to_string()
            });
        }
        if spec.datastore != a.datastore.is_some() {
            return Err(if spec.datastore {
                "the VM has a datastore: this receiver was given no --datastore".to_string()
            } else {
                "the VM has no datastore: this receiver was given --datastore".to_string()
            });
        }
        tracing::debug!("offer +{:.1} ms: checked", ms(t));
        let tap = machine::nic_tap(&spec, a.bridge.as_deref()).map_err(|e| e.to_string())?;
        tracing::debug!("offer +{:.1} ms: NIC", ms(t));
        let host = restore
            .live_host(a.datastore.as_deref(), tap.clone())
            .map_err(|e| e.to_string())?;
        let sink = match &a.record {
            Some(log) => Some(Box::new(
                LogWriter::create(log, &restore.log_header())
                    .map_err(|e| format!("--record {}: {e}", log.display()))?,
            ) as Box<dyn EventSink + Send>),
            None => None,
        };
        Ok(Arrived {
            restore,
            host,
            tap,
            sink,
        })
    })();
    let arrived = match prepared {
        Ok(p) => p,
        Err(why) => {
            inb.refuse(&why);
            return Err(why);
        }
    };
    tracing::debug!("offer +{:.1} ms: set up", ms(t));
    inb.ready().map_err(|e| e.to_string())?;
    tracing::debug!("offer +{:.1} ms: committed", ms(t));
    Ok(arrived)
}

/// `vm receive --listen ADDR:PORT --wasm FILE [--datastore DIR] [--bridge BR] [--api-sock PATH]`.
pub fn vm_receive(a: &ReceiveArgs) -> Result<u8, Failure> {
    check_datastore(a.datastore.as_deref())?;
    let m = load(&a.wasm)?;
    let listener = Listener::bind(&a.listen).map_err(|e| listen_failure(&a.listen, e))?;
    // The API socket is bound before any VM arrives: a bad path is refused now, never
    // after a source committed (the VM must then go live here whatever happens). Bound
    // after the listener, so that the socket's presence says the receiver listens.
    let mut waiting = None;
    let (m, _server) = serve_control_with(a.api_sock.as_deref(), m, |c| {
        c.set_waiting(true);
        waiting = Some(c.clone());
    })?;
    let at = listener
        .local_addr()
        .map_err(|e| listen_failure(&a.listen, e))?;
    tracing::info!("waiting for a VM on {at}");
    let (arrived, inb) = loop {
        let Some(mut inb) = listener
            .accept(machine::stop_requested)
            .map_err(|e| listen_failure(&a.listen, e))?
        else {
            tracing::info!("stopped before a VM arrived");
            return Ok(0);
        };
        let peer = inb.peer();
        match arrive(&m, a, &mut inb) {
            Ok(arrived) => break (arrived, inb),
            // A failed attempt is the source's to report (it goes on running); this
            // receiver waits for the next one.
            Err(why) => tracing::warn!("no VM from {peer}: {why}"),
        }
    };
    drop(listener);
    if let Some(c) = waiting {
        c.set_waiting(false);
    }
    let Arrived {
        restore,
        host,
        tap,
        sink,
    } = arrived;
    tracing::info!(
        "VM from {} committed at event {}",
        inb.peer(),
        restore.events()
    );
    let inputs = Inputs::Live {
        host,
        sink,
        port: Box::new(machine::port::Direct { tap, console: true }),
    };
    let ready: machine::capture::Ready<'_> = Box::new(move || match inb.live() {
        Ok(()) => tracing::info!("live"),
        // Committed: the VM runs here whether or not the source hears it (it stops).
        Err(e) => tracing::warn!("live, but the source did not hear it: {e}"),
    });
    let ran = m.resume_then(&restore, inputs, None, true, Some(ready))?;
    if a.record.is_some() {
        println!(
            "recorded: events={} digest={}",
            ran.report.events,
            hex(&ran.report.digest)
        );
    }
    if ran.report.exit == Exit::Stopped
        && let Some(t) = &ran.taken
        && ran.handed_over
    {
        tracing::info!("migrated away at event {} ({} bytes)", t.events, t.bytes);
    }
    Ok(exit_code(&ran.report.exit))
}

fn listen_failure(listen: &str, e: MigrateError) -> Failure {
    bad(format!("--listen {listen}: {e}"))
}

/// `vm migrate --api-sock PATH --to ADDR:PORT`.
pub fn vm_migrate(a: &MigrateArgs) -> Result<u8, Failure> {
    let body = serde_json::json!({ "to": a.to });
    let wait = control::SNAPSHOT_WAIT
        + machine::migrate::READY_TIMEOUT
        + machine::migrate::LIVE_TIMEOUT
        + machine::migrate::CONNECT_TIMEOUT
        + machine::migrate::PRECOPY_TIME
        + machine::migrate::ARRIVE_TIMEOUT;
    let (code, reply) = control::request(&a.api_sock, "PUT", "/migrate", Some(&body), wait)
        .map_err(|e| {
            bad(format!(
                "cannot reach the VM at {}: {e}",
                a.api_sock.display()
            ))
        })?;
    let why = || {
        reply
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given")
            .to_string()
    };
    match code {
        200 => {
            let r: control::SnapshotReply = serde_json::from_value(reply.clone())
                .map_err(|e| bad(format!("the VM's reply: {e}")))?;
            if let Some(p) = &r.precopied {
                println!(
                    "precopied: rounds={} running_bytes={} stopped_bytes={}",
                    p.rounds, p.running_bytes, p.stopped_bytes
                );
            }
            println!(
                "migrated: events={} pause_ms={:.3} bytes={}",
                r.events, r.pause_ms, r.bytes
            );
            Ok(0)
        }
        // Committed without an answer: the VM stopped at the source (see
        // `machine::migrate`).
        500 => Err(Failure {
            code: 4,
            message: format!("tandem: {}", why()),
        }),
        _ => Err(Failure {
            code: 1,
            message: format!(
                "tandem: not migrated, the VM goes on at the source: {}",
                why()
            ),
        }),
    }
}
