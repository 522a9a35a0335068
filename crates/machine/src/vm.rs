//! A Tandem VM: one wasm instance plus its state, run against live inputs or a log.
//!
//! [`Vm`] is the wasmtime store's data. It owns the VM state (descriptor table, clock,
//! position, output digest) and the input side: [`Inputs::Live`] performs host operations
//! and appends each result to an optional [`EventSink`]; [`Inputs::Replay`] takes every
//! result from an [`EventSource`] and checks it belongs where the guest now is.
//!
//! Invariants:
//! - every nondeterministic value the guest observes passes through [`Vm::event`];
//! - during replay nothing is performed on the host: console and disk outputs are only
//!   digested, so a replay leaves the datastore and the console untouched.
//!
//! Stopping. A stop request ([`request_stop`], e.g. from SIGTERM) stops a live VM at its
//! next WASI call ([`Exit::Stopped`]). A guest computing without calls is stopped between
//! events ([`Exit::Interrupted`]) without any check in its compiled code: the guest runs on
//! a thread of its own while the thread that called [`Machine::run`] (or
//! [`crate::capture::SnapMachine`]'s run, through [`run_watched`]) watches, and when the
//! guest has not reached a call [`STOP_GRACE`] after a stop request, the watcher ends the
//! run itself. It can, because everything the end of a run needs is behind a [`Gate`] the
//! guest holds through each event: the events taken, the output chain at the last one, the
//! sink or source. Closing the gate abandons the guest: its thread may compute on until the
//! process ends, but it takes no more events and its outputs no longer leave (the port is
//! muted), so nothing it does after the stop is seen. A replaying VM is watched the same
//! way: when its source says the recorded run stopped or was cut where the guest now is
//! ([`EventSource::stops_at`]), the replay ends there instead of running on (the guest may
//! never make another call).
//!
//! (wasmtime's epoch interruption would stop the guest from inside, but its checks at every
//! loop header and function entry cost 40% on the CPU benchmark even with the epoch never
//! advanced.)
//!
//! The digest of a run stopped between events, or of a replay of a cut log, covers the
//! outputs up to its last event: what the guest wrote after it (console writes are outputs
//! but not events) depends on where the stop caught it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, Linker, Module, Store, StoreLimits, StoreLimitsBuilder};

use crate::clock::VmClock;
use crate::event::{Bytes, Event, Intent, Kind, Outcome, first_u64};
use crate::fdtable::FdTable;
use crate::host::{HostError, LiveHost};
use crate::log::{End, EventSink, EventSource, Exit, LogError, LogHeader, Tail};
use crate::port::{Direct, DiskWrite, OutputPort};

/// Default guest memory limit: fixed, so that `memory.grow` fails at the same point on
/// every copy of the VM.
pub const DEFAULT_MEMORY_LIMIT: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a WebAssembly module: {why}")]
    NotWasm { path: PathBuf, why: String },
    #[error("{0}")]
    Link(String),
    #[error("datastore {0} is not a directory")]
    Datastore(PathBuf),
    #[error("the log was recorded from a different module (log {log}, given {given})")]
    ModuleMismatch { log: String, given: String },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Device(#[from] devices::DeviceError),
    #[error("replay diverged at event {seq}: {why}")]
    Divergence { seq: u64, why: String },
    #[error("cannot go live: {0}")]
    GoLive(String),
    #[error("internal error: {0}")]
    Internal(String),
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long a computing guest has to reach a call after a stop request before the run
/// is ended between events.
pub const STOP_GRACE: Duration = Duration::from_millis(250);
/// How often the thread that runs a VM looks for a stop.
const WATCH_TICK: Duration = Duration::from_millis(50);
/// The guest's thread's stack: the wasm stack (wasmtime's 512 KiB limit) plus host calls.
const GUEST_STACK: usize = 8 << 20;

/// Ask every live VM of this process to stop (async-signal-safe: a signal handler may call
/// it; it only stores to an atomic). A guest stops at its next call, or between events
/// [`STOP_GRACE`] later.
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    STOP_NOTICE.give();
}

pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// Told of a stop request, for [`wait_for_stop`]; never drained (a stop is for good).
static STOP_NOTICE: crate::notice::Notice = crate::notice::Notice::new();

/// Wait until a stop is requested, without looking periodically.
pub fn wait_for_stop() {
    STOP_NOTICE.arm();
    while !stop_requested() {
        STOP_NOTICE.wait(false, None);
    }
}

/// Why the guest stopped running before `_start` returned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Fault {
    #[error("guest exited with code {0}")]
    Exit(u32),
    #[error("stopped by the host")]
    Stopped,
    /// Stopped between events, or at the end of a replayed log that stops between events
    /// or is cut there.
    #[error("stopped by the host between events")]
    Interrupted,
    #[error("replay diverged at event {seq}: {why}")]
    Divergence { seq: u64, why: String },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot go live: {0}")]
    GoLive(String),
    /// A VM state that cannot be (a snapshot that does not fit where it resumes).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where the VM's nondeterministic inputs come from, and where a live VM's outputs go.
pub enum Inputs {
    Live {
        host: LiveHost,
        sink: Option<Box<dyn EventSink + Send>>,
        port: Box<dyn OutputPort>,
    },
    Replay {
        source: Box<dyn EventSource + Send>,
        /// What the VM becomes when its source runs dry: live on this host (go-live).
        /// Without it, a dry source ends the replay.
        go_live: Option<GoLive>,
    },
}

/// How a replaying VM goes live on this host.
pub struct GoLive {
    /// The datastore on this host.
    pub root: Option<PathBuf>,
    /// The bridge the VM's NIC joins on this host.
    pub bridge: Option<String>,
    /// Where the VM's events go from then on.
    pub sink: Option<Box<dyn EventSink + Send>>,
    /// Whether console output reaches this process's stdout/stderr.
    pub console: bool,
    /// The live VM's output port, built from its NIC's tap on this host. Without it,
    /// outputs go straight to the tap and the console: an FT copy going live instead
    /// becomes a primary, holding outputs to the output rule for a secondary that joins.
    pub port: Option<PortFactory>,
}

/// Builds a live VM's output port from its NIC's tap on this host ([`GoLive::port`]).
pub type PortFactory = Box<dyn FnOnce(Option<Arc<devices::Tap>>) -> Box<dyn OutputPort> + Send>;

/// What a guest sees of its configuration; fixed for the VM's life.
#[derive(Clone, Debug, Default)]
pub struct GuestSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Whether the datastore is preopened at fd 3 (where it lives is the live host's).
    pub datastore: bool,
    pub memory_limit: u64,
    /// The VM's NIC and the TCP ports it listens on (fds 4, 5, ...).
    pub nic: Option<netstack::NetConfig>,
    pub listen: Vec<u16>,
}

impl GuestSpec {
    /// The header of a log of a run of this guest from power-on, by the module `digest`.
    pub fn log_header(&self, module_digest: [u8; 32]) -> LogHeader {
        LogHeader {
            module_digest,
            args: self.args.clone(),
            env: self.env.clone(),
            datastore: self.datastore,
            memory_limit: self.memory_limit,
            nic: self.nic.clone(),
            listen: self.listen.clone(),
            first_seq: 0,
        }
    }

    /// What a guest saw in a recorded or streamed run.
    pub fn from_header(h: &LogHeader) -> Self {
        GuestSpec {
            args: h.args.clone(),
            env: h.env.clone(),
            datastore: h.datastore,
            memory_limit: h.memory_limit,
            nic: h.nic.clone(),
            listen: h.listen.clone(),
        }
    }
}

pub struct Vm {
    pub(crate) spec: Arc<GuestSpec>,
    pub(crate) seq: u64,
    pub(crate) fds: FdTable,
    pub(crate) clock: VmClock,
    pub(crate) outputs: Outputs,
    pub(crate) inputs: Inputs,
    /// The guest's network stack, when the VM has a NIC.
    pub(crate) net: Option<netstack::NetStack>,
    /// VM monotonic time of the last network step: the stack's notion of now.
    pub(crate) net_now: u64,
    /// Whether stdin was readable at the last network step.
    pub(crate) stdin_ready: bool,
    /// While the stack delays acknowledgements: the event before which they go if no
    /// network step comes first (see [`crate::net`]).
    pub(crate) acks_by: Option<u64>,
    limits: StoreLimits,
    warned: std::collections::BTreeSet<&'static str>,
    gate: SharedGate,
    /// Set when the watcher ends the run between events (mutes the port).
    abandoned: Arc<AtomicBool>,
    /// Snapshots (issue 8): the host's side of Asyncify, for a VM of an instrumented
    /// module ([`crate::capture`]); `None` otherwise.
    pub(crate) snap: Option<Box<crate::capture::Ctl>>,
    /// Set only at a snapshot point inside a call, before its wait (see
    /// [`crate::capture`]): what the interrupted call, entered again by the rewind, goes
    /// on with. `None` at every other point.
    pub(crate) resume: Option<Resume>,
    /// The guest memory's size as the current call was entered (whether Asyncify's
    /// buffer fits, at a snapshot point inside a call).
    pub(crate) memory_len: usize,
    /// Where the instance running this VM exports its memory, set as its store is made:
    /// every call looks the memory up, and by name that cost 4% of a replay's thread
    /// (see [`Vm::guest_memory`]).
    pub(crate) memory_export: Option<wasmtime::ModuleExport>,
    /// Replaying with a go-live ahead: the writes replayed that the primary may not have
    /// performed yet (it performs a write once the output rule lets it leave, after giving
    /// its outcome). A copy going live performs them again, in order: each is positional,
    /// at the end the VM knew for an append, so writing again what was written is
    /// harmless. Forgotten once the source says they were performed
    /// ([`EventSource::written_below`]) or at any other disk event.
    written: VecDeque<Written>,
}

/// A write replayed (see [`Vm::written`]): the file as the table named it then (its path
/// shared with the write kept before it, for the usual run of writes to one file).
struct Written {
    seq: u64,
    path: Arc<str>,
    ino: u64,
    at: u64,
    data: Bytes,
}

/// Where a call interrupted by a snapshot before its wait goes on (see [`crate::capture`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Resume {
    /// A `poll_oneoff` with a NIC, with the clock deadlines it computed.
    Poll(Vec<Option<u64>>),
    /// A blocking socket call (accept, receive, send), waiting for its socket.
    Socket,
}

/// Every output the VM produces: digested always, performed only when live.
///
/// The digest is a chain over event boundaries: each output is hashed once, with XXH3's
/// 128-bit hash (an output is the guest's own data, hashed to tell a divergence, never to
/// resist an adversary: a non-cryptographic hash, a sixth of blake3's cost for a 4 KiB
/// write), and folded into the open segment (`pending = blake3(pending ‖ xxh3(output))`,
/// the first output's hash standing alone, zero-filled; within an output, each part is its
/// length then its bytes); at each event the segment is sealed into
/// `chain = blake3(chain ‖ pending)`. Sealing costs a few compressions however long the
/// run, the chain before an event is what that event carries (its first 8 bytes), and the
/// whole digest state is two hashes, so a snapshot can hold it between events too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outputs {
    chain: [u8; 32],
    /// The outputs since the last event, folded; `None` when there were none.
    pending: Option<[u8; 32]>,
}

impl Outputs {
    fn new() -> Self {
        Outputs {
            chain: [0; 32],
            pending: None,
        }
    }

    pub(crate) fn add(&mut self, what: &str, parts: &[&[u8]]) {
        // A 4 KiB write's data took 1.7 µs through blake3 here, 0.26 µs through XXH3.
        let mut x = xxhash_rust::xxh3::Xxh3Default::new();
        x.update(&(what.len() as u64).to_le_bytes());
        x.update(what.as_bytes());
        for p in parts {
            x.update(&(p.len() as u64).to_le_bytes());
            x.update(p);
        }
        let output = x.digest128().to_le_bytes();
        self.pending = Some(match self.pending {
            None => {
                let mut alone = [0; 32];
                alone[..16].copy_from_slice(&output);
                alone
            }
            Some(before) => {
                let mut h = blake3::Hasher::new();
                h.update(&before);
                h.update(&output);
                *h.finalize().as_bytes()
            }
        });
    }

    fn sealed(&self) -> [u8; 32] {
        let Some(pending) = self.pending else {
            return self.chain;
        };
        let mut h = blake3::Hasher::new();
        h.update(&self.chain);
        h.update(&pending);
        *h.finalize().as_bytes()
    }

    /// Seal the outputs so far (an event boundary) and return the short digest.
    fn seal(&mut self) -> u64 {
        self.chain = self.sealed();
        self.pending = None;
        first_u64(&self.chain)
    }

    /// Digest of every output, sealed or not.
    fn full(&self) -> [u8; 32] {
        self.sealed()
    }

    /// Digest of the outputs sealed at the last event boundary.
    fn at_last_event(&self) -> [u8; 32] {
        self.chain
    }

    /// Undo the last seal (the run ends before the event that made it).
    fn rewind(&mut self, chain: [u8; 32]) {
        self.chain = chain;
        self.pending = None;
    }
}

impl Vm {
    pub(crate) fn host(&mut self) -> Option<&mut LiveHost> {
        match &mut self.inputs {
            Inputs::Live { host, .. } => Some(host),
            Inputs::Replay { .. } => None,
        }
    }

    /// Take one nondeterministic input. Live: run `op` on the host and log its outcome.
    /// Replay: take the next logged outcome after checking it was logged at this position
    /// for this call with these arguments and the same outputs before it. A replay whose
    /// source runs dry goes live, if it may, and takes the input live.
    pub(crate) fn event(
        &mut self,
        kind: Kind,
        args: u64,
        op: impl FnOnce(&mut LiveHost, &FdTable, &VmClock) -> Outcome,
    ) -> Result<Outcome, Fault> {
        self.event_on(kind, args, &[], op)
    }

    /// The next input may make the guest wait (for a frame, stdin or a deadline): a live
    /// VM's port is told first ([`OutputPort::idle`]), so that outputs held for a replica
    /// are not left waiting for the wait's end.
    pub(crate) fn before_wait(&mut self) {
        // No reply comes while the guest waits.
        self.send_owed_acks();
        self.tell_idle();
    }

    /// [`Vm::before_wait`] for this copy's port alone: a snapshot's pause, which only the
    /// copy taking the snapshot makes, must change no VM state.
    pub(crate) fn tell_idle(&mut self) {
        if let Inputs::Live { port, .. } = &mut self.inputs {
            port.idle();
        }
    }

    /// [`Vm::event`] for a disk operation that must not be done twice, on `names` (each a
    /// guest path beneath a directory descriptor): live, its [`Intent`] is made known to
    /// the output port before it is performed; a copy going live whose first event is the
    /// one its predecessor announced takes its outcome from the disk if it was performed.
    pub(crate) fn event_on(
        &mut self,
        kind: Kind,
        args: u64,
        names: &[(u32, &str)],
        op: impl FnOnce(&mut LiveHost, &FdTable, &VmClock) -> Outcome,
    ) -> Result<Outcome, Fault> {
        self.event_with(kind, args, names, None, op)
    }

    /// The event of a write of `data` at `at` to open file `fd`. Live, with a port that
    /// would make the VM wait for the output rule first, a write that can only fail with
    /// its storage path is given its outcome now and performed once it may leave (see
    /// [`OutputPort::write_behind`]); every other write is performed before its outcome is
    /// logged. Replaying with a go-live ahead, the write is kept until the primary is known
    /// to have performed it ([`Vm::written`]).
    pub(crate) fn write_event(
        &mut self,
        fd: u32,
        at: u64,
        data: &Bytes,
        args: u64,
        file: Option<(&str, u64)>,
    ) -> Result<Outcome, Fault> {
        let seq = self.seq;
        let behind = match &mut self.inputs {
            Inputs::Live { host, port, .. }
                if file.is_some() && port.defers_writes() && host.uncertain.is_none() =>
            {
                host.write_behind(fd, at, data).map(|w| {
                    let predicted = Outcome::Written {
                        n: data.len() as u32,
                        offset: at + data.len() as u64,
                    };
                    (w, predicted)
                })
            }
            _ => None,
        };
        let outcome = self.event_with(Kind::FdWrite, args, &[], behind, |h, _, _| {
            h.write_at(fd, at, data)
        })?;
        if !matches!(
            self.inputs,
            Inputs::Replay {
                go_live: Some(_),
                ..
            }
        ) {
            return Ok(outcome);
        }
        let (Outcome::Written { n, .. }, Some(file)) = (&outcome, file) else {
            // A write that could not go behind was performed before it was logged, and
            // after every write behind before it: those are done.
            self.written.clear();
            return Ok(outcome);
        };
        let below = lock(&self.gate)
            .source
            .as_mut()
            .map_or(u64::MAX, |s| s.written_below());
        self.forget_written(below);
        let n = (*n as usize).min(data.len());
        if seq >= below && n > 0 {
            // Kept whole when it was written whole (the common case): no copy.
            let data = if n == data.len() {
                data.clone()
            } else {
                Bytes::from(data[..n].to_vec())
            };
            let path = match self.written.back() {
                Some(w) if w.ino == file.1 && *w.path == *file.0 => Arc::clone(&w.path),
                _ => Arc::from(file.0),
            };
            self.written.push_back(Written {
                seq,
                path,
                ino: file.1,
                at,
                data,
            });
        }
        Ok(outcome)
    }

    fn event_with(
        &mut self,
        kind: Kind,
        args: u64,
        names: &[(u32, &str)],
        mut behind: Option<(DiskWrite, Outcome)>,
        op: impl FnOnce(&mut LiveHost, &FdTable, &VmClock) -> Outcome,
    ) -> Result<Outcome, Fault> {
        if self.acks_by.is_some_and(|by| self.seq >= by) {
            self.send_owed_acks();
        }
        let seq = self.seq;
        let prior = self.outputs.at_last_event();
        // Every event is a boundary of the output digest, in every mode, so the digest of a
        // run means the same thing live, recorded and replayed.
        let outputs = self.outputs.seal();
        let gate = Arc::clone(&self.gate);
        let mut g = lock(&gate);
        if g.closed {
            // The watcher ended the run between events: this guest is abandoned.
            return Err(Fault::Stopped);
        }
        let mut op = Some(op);
        loop {
            match &mut self.inputs {
                Inputs::Live { host, port, .. } => {
                    if stop_requested() {
                        return Err(Fault::Stopped);
                    }
                    if let Some((write, predicted)) = behind.take() {
                        // Registered before its event is logged: an event the secondary
                        // holds is of a write performed or held here, never one unknown.
                        // Not taken, it is performed below, as any write.
                        if port.write_behind(seq, write)?.is_none() {
                            return self.logged(&mut g, seq, kind, args, outputs, predicted);
                        }
                    }
                    if kind.uses_disk() {
                        port.settle_writes()?;
                    }
                    let uncertain = host
                        .uncertain
                        .take()
                        .filter(|i| i.seq == seq && i.kind == kind && i.args == args);
                    let mut done_before = None;
                    // The names are looked at only where an intent is to be compared or
                    // made known: an unprotected VM pays nothing for them.
                    if !names.is_empty() && (uncertain.is_some() || port.replicates()) {
                        let before = host.name_states(names);
                        match uncertain {
                            // This copy went live at the very operation its predecessor
                            // announced: if the names changed since, it was performed.
                            Some(i) => {
                                if before != i.names {
                                    tracing::warn!(
                                        "event {seq} ({kind:?}) was performed before the go-live: its outcome is taken from the disk"
                                    );
                                    done_before =
                                        Some(host.performed(kind, names, &i.names, &self.fds));
                                }
                                port.before_disk(seq)?;
                            }
                            None => port.before_uncertain(&Intent {
                                seq,
                                kind,
                                args,
                                names: before,
                            })?,
                        }
                    } else if kind.mutates_disk() {
                        port.before_disk(seq)?;
                    }
                    let op = op.take().ok_or(Fault::GoLive("input taken twice".into()))?;
                    let outcome = match done_before {
                        Some(Some(outcome)) => outcome,
                        // Performed, but its outcome is what running it again gives (an
                        // exclusive create opens what it created).
                        Some(None) => {
                            host.redo = true;
                            let o = op(host, &self.fds, &self.clock);
                            host.redo = false;
                            o
                        }
                        None => op(host, &self.fds, &self.clock),
                    };
                    crate::failpoint::after_disk_op(kind, !names.is_empty());
                    if kind.uses_disk() && outcome == Outcome::Errno(crate::wasi::errno::IO) {
                        // A lost storage path: a copy that still reaches storage may take
                        // the VM over before the guest sees the error.
                        port.storage_failed(seq)?;
                    }
                    // A wait cut short by a stop request has no effect on the host and is
                    // not part of the run: the run ends before it.
                    if stop_requested() && matches!(kind, Kind::PollOneoff | Kind::NetStep) {
                        return Err(Fault::Stopped);
                    }
                    return self.logged(&mut g, seq, kind, args, outputs, outcome);
                }
                Inputs::Replay { go_live, .. } => {
                    let source = g
                        .source
                        .as_mut()
                        .ok_or_else(|| Fault::GoLive("the replay has no source".into()))?;
                    let Some(event) = source.next_event()? else {
                        match source.tail()? {
                            Tail::GoLive if go_live.is_some() => {
                                let intent = source.pending_intent();
                                // The primary announces an operation only once every write
                                // behind before it was performed.
                                let written = source
                                    .written_below()
                                    .max(intent.as_ref().map_or(0, |i| i.seq));
                                drop(g);
                                self.forget_written(written);
                                self.go_live(intent)?;
                                g = lock(&gate);
                                continue;
                            }
                            // A run the host stopped ends where it was stopped: stop there too.
                            Tail::End(End {
                                exit: Exit::Stopped,
                                events,
                                ..
                            }) if events == seq => return Err(Fault::Stopped),
                            // A run stopped between events, or a recording cut, after the
                            // events taken: the guest stops before the call the log does
                            // not hold, its digest that of the outputs up to the last
                            // event, as the recording's.
                            Tail::End(End {
                                exit: Exit::Interrupted,
                                events,
                                ..
                            })
                            | Tail::Cut(events)
                                if events == seq =>
                            {
                                self.outputs.rewind(prior);
                                return Err(Fault::Interrupted);
                            }
                            _ => {
                                return Err(Fault::Divergence {
                                    seq,
                                    why: format!(
                                        "the guest made a {kind:?} call after the last logged event"
                                    ),
                                });
                            }
                        }
                    };
                    let why = if event.seq != seq {
                        Some(format!("log holds event {} here", event.seq))
                    } else if event.kind != kind {
                        Some(format!(
                            "the guest made a {kind:?} call where the log holds {:?}",
                            event.kind
                        ))
                    } else if event.args != args {
                        Some(format!("{kind:?} called with other arguments than logged"))
                    } else if event.outputs != outputs {
                        Some("the outputs before this event differ from the logged run".to_string())
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Err(Fault::Divergence { seq, why });
                    }
                    // The primary performs any other disk operation only once every write
                    // before it was performed, and logs it after: the writes kept for a
                    // go-live are done.
                    if kind.uses_disk() && kind != Kind::FdWrite {
                        self.written.clear();
                    }
                    self.seq += 1;
                    g.seq = self.seq;
                    g.chain = self.outputs.at_last_event();
                    return Ok(event.outcome);
                }
            }
        }
    }

    /// Forget the writes kept to write again that the source says were performed.
    fn forget_written(&mut self, below: u64) {
        while self.written.front().is_some_and(|w| w.seq < below) {
            self.written.pop_front();
        }
    }

    /// Going live: perform again, in order, the writes the predecessor may not have
    /// performed ([`Vm::written`]). One that cannot be made stops the VM here rather than
    /// let it run on as if it had been: no output that depends on it has left.
    fn write_again(&mut self, host: &LiveHost) -> Result<(), Fault> {
        if self.written.is_empty() {
            return Ok(());
        }
        let (n, bytes) = (
            self.written.len(),
            self.written.iter().map(|w| w.data.len()).sum::<usize>(),
        );
        let mut files: std::collections::HashMap<u64, std::fs::File> = Default::default();
        for w in std::mem::take(&mut self.written) {
            let file = match files.entry(w.ino) {
                std::collections::hash_map::Entry::Occupied(f) => Ok(f.into_mut()),
                std::collections::hash_map::Entry::Vacant(v) => {
                    host.open_to_write(&w.path, w.ino).map(|f| v.insert(f))
                }
            };
            let r = file.and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&w.data, w.at)
            });
            if let Err(e) = r {
                return Err(Fault::GoLive(format!(
                    "the write of event {} ({} bytes at {} of {}), which the predecessor may not have made, cannot be made again: {e}",
                    w.seq,
                    w.data.len(),
                    w.at,
                    w.path
                )));
            }
        }
        tracing::info!(
            "going live: {n} writes ({bytes} bytes) the predecessor may not have performed were made again"
        );
        Ok(())
    }

    /// Log a live event's outcome and move past it.
    fn logged(
        &mut self,
        g: &mut MutexGuard<'_, Gate>,
        seq: u64,
        kind: Kind,
        args: u64,
        outputs: u64,
        outcome: Outcome,
    ) -> Result<Outcome, Fault> {
        let outcome = match &mut g.sink {
            Some(sink) => {
                // The sink keeps the event (a primary's history, a log's batch until it
                // is written); the guest's copy of the outcome shares its data read and
                // frames received (`event::Bytes`): no data is copied.
                let kept = outcome.clone();
                sink.append(Event {
                    seq,
                    kind,
                    args,
                    outputs,
                    outcome,
                })?;
                kept
            }
            None => outcome,
        };
        self.seq += 1;
        g.seq = self.seq;
        g.chain = self.outputs.at_last_event();
        Ok(outcome)
    }

    /// Go live where the replay stands: host resources rebuilt from VM state, the NIC on
    /// this host, the VM's address announced, unacknowledged data sent again at once.
    fn go_live(&mut self, intent: Option<Intent>) -> Result<(), Fault> {
        let Inputs::Replay { go_live, .. } = &mut self.inputs else {
            return Ok(());
        };
        let Some(gl) = go_live.take() else {
            return Ok(());
        };
        let tap =
            nic_tap(&self.spec, gl.bridge.as_deref()).map_err(|e| Fault::GoLive(e.to_string()))?;
        let mut host = LiveHost::from_state(gl.root.as_deref(), &self.fds, &self.clock)
            .map_err(|e| Fault::GoLive(e.to_string()))?;
        if let Some(t) = &tap {
            host.attach_tap(t.clone());
        }
        if let Some(i) = &intent {
            tracing::info!(
                "going live holding the intent of event {} ({:?})",
                i.seq,
                i.kind
            );
        }
        host.uncertain = intent;
        self.write_again(&host)?;
        {
            let mut g = lock(&self.gate);
            g.sink = gl.sink;
            g.live = true;
        }
        let port: Box<dyn OutputPort> = match gl.port {
            Some(build) => build(tap),
            None => Box::new(Direct {
                tap,
                console: gl.console,
            }),
        };
        self.inputs = Inputs::Live {
            host,
            sink: None,
            port: Box::new(Muted {
                port,
                abandoned: self.abandoned.clone(),
            }),
        };
        tracing::warn!("went live at event {}", self.seq);
        let now = self.net_now;
        if let Some(net) = self.net.as_mut() {
            net.go_live(now);
        }
        self.flush_net();
        Ok(())
    }

    /// An outcome of the wrong shape for its call can only come from a damaged or foreign
    /// log: report it as divergence at the event just taken.
    pub(crate) fn unexpected(&self, kind: Kind, got: &Outcome) -> Fault {
        Fault::Divergence {
            seq: self.seq.saturating_sub(1),
            why: format!("logged outcome {got:?} does not fit a {kind:?} call"),
        }
    }

    pub(crate) fn warn_unsupported(&mut self, name: &'static str) {
        if self.warned.insert(name) {
            tracing::warn!("guest called unsupported WASI function {name}; it gets ENOSYS");
        }
    }
}

/// Compile a guest under the deterministic engine and link it to the WASI host; a module
/// importing anything else is refused.
pub(crate) fn compile_guest(
    bytes: &[u8],
    path: &Path,
) -> Result<(Engine, Module, Linker<Vm>), MachineError> {
    let engine = deterministic_engine()?;
    let (module, _) =
        crate::codecache::load_or_compile(&engine, bytes).map_err(|e| MachineError::NotWasm {
            path: path.to_path_buf(),
            why: format!("{e:#}"),
        })?;
    for import in module.imports() {
        if !crate::wasi::provides(import.module(), import.name()) {
            return Err(MachineError::Link(format!(
                "{} imports {}::{}, which a Tandem VM does not provide",
                path.display(),
                import.module(),
                import.name()
            )));
        }
    }
    let mut linker = Linker::new(&engine);
    crate::wasi::add_to_linker(&mut linker).map_err(|e| MachineError::Internal(e.to_string()))?;
    Ok((engine, module, linker))
}

/// The deterministic engine configuration every copy of a VM runs under.
pub fn deterministic_engine() -> Result<Engine, MachineError> {
    let mut config = Config::new();
    config
        // Threads are compiled out of our wasmtime build (no `threads` feature): a guest
        // with shared memory or atomics.wait fails to load rather than race.
        .cranelift_nan_canonicalization(true)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        // Maps from machine code back to wasm offsets serve only a trap's backtrace (which
        // then names functions without offsets); building them was a tenth of a first
        // start's compile. Nothing in Tandem reads them.
        .generate_address_map(false)
        // A snapshot point's whole stack is looked at (`crate::capture::unwindable`): every
        // frame must be in the backtrace, so no wasm function is inlined into another
        // (wasmtime's default, pinned).
        .compiler_inlining(wasmtime::Inlining::No)
        .wasm_backtrace_max_frames(std::num::NonZeroUsize::new(
            crate::capture::BACKTRACE_FRAMES,
        ));
    Engine::new(&config).map_err(|e| MachineError::Internal(e.to_string()))
}

/// What copies of one VM on two hosts must agree on to exchange logs and snapshots: the
/// formats' versions, the snapshot transform and the engine's compiled-code identity
/// (wasmtime checks the last itself for serialized modules: `Engine::precompile_compatibility_hash`).
pub fn engine_fingerprint() -> String {
    match deterministic_engine() {
        Ok(engine) => fingerprint_of(&engine),
        Err(_) => fingerprint_parts(None),
    }
}

/// [`engine_fingerprint`] of an engine already built.
pub(crate) fn fingerprint_of(engine: &Engine) -> String {
    fingerprint_parts(Some(engine))
}

fn fingerprint_parts(engine: Option<&Engine>) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(engine) = engine {
        engine.precompile_compatibility_hash().hash(&mut h);
    }
    let mut key = blake3::Hasher::new();
    key.update(&h.finish().to_le_bytes());
    key.update(&crate::log::VERSION.to_le_bytes());
    key.update(&crate::snapshot::VERSION.to_le_bytes());
    key.update(&crate::migrate::VERSION.to_le_bytes());
    key.update(&crate::asyncify::TRANSFORM_VERSION.to_le_bytes());
    crate::hex(&key.finalize().as_bytes()[..8])
}

/// What ending a run needs, shared by the guest's thread and the thread watching it.
///
/// Invariant: the guest's thread holds the lock through every event, from its first check
/// to its last update, so whoever holds it between events sees a VM at an event boundary
/// whose sink or source holds exactly `seq` events. The watcher only ever `try_lock`s it: a
/// guest inside an event (a wait, a disk write) is not stopped there, it stops at the
/// event's end by itself.
pub(crate) struct Gate {
    /// The run was ended by the watcher: the guest's thread takes no more events.
    closed: bool,
    /// The VM takes its inputs live (from power-on, or since it went live).
    live: bool,
    /// Events taken, and the output chain sealed at the last of them.
    seq: u64,
    chain: [u8; 32],
    /// Where a live VM's events go (moved here from [`Inputs::Live`] at power-on, and from
    /// [`GoLive`] at go-live).
    sink: Option<Box<dyn EventSink + Send>>,
    /// Where a replaying VM's events come from (moved here from [`Inputs::Replay`]).
    source: Option<Box<dyn EventSource + Send>>,
}

type SharedGate = Arc<Mutex<Gate>>;

fn lock(gate: &SharedGate) -> MutexGuard<'_, Gate> {
    gate.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stands in [`Inputs::Replay`] for the source, which lives in the [`Gate`].
struct InGate;

impl EventSource for InGate {
    fn next_event(&mut self) -> Result<Option<Event>, LogError> {
        Err(LogError::Source(
            "internal: the source is in the gate".into(),
        ))
    }
    fn tail(&mut self) -> Result<Tail, LogError> {
        Err(LogError::Source(
            "internal: the source is in the gate".into(),
        ))
    }
}

/// A live VM's port, silenced once its run has been ended between events: an abandoned
/// guest computing on must not be seen (its disk writes are events, refused by the gate).
struct Muted {
    port: Box<dyn OutputPort>,
    abandoned: Arc<AtomicBool>,
}

impl OutputPort for Muted {
    fn frame(&mut self, position: u64, frame: &[u8]) {
        if !self.abandoned.load(Ordering::Relaxed) {
            self.port.frame(position, frame);
        }
    }
    fn console(&mut self, position: u64, fd: u32, data: &[u8]) {
        if !self.abandoned.load(Ordering::Relaxed) {
            self.port.console(position, fd, data);
        }
    }
    fn before_disk(&mut self, position: u64) -> Result<(), LogError> {
        self.port.before_disk(position)
    }
    fn before_uncertain(&mut self, intent: &Intent) -> Result<(), LogError> {
        self.port.before_uncertain(intent)
    }
    fn replicates(&self) -> bool {
        self.port.replicates()
    }
    fn idle(&mut self) {
        self.port.idle()
    }
    fn storage_failed(&mut self, position: u64) -> Result<(), LogError> {
        self.port.storage_failed(position)
    }
    fn defers_writes(&self) -> bool {
        self.port.defers_writes()
    }
    fn write_behind(
        &mut self,
        position: u64,
        write: DiskWrite,
    ) -> Result<Option<DiskWrite>, LogError> {
        self.port.write_behind(position, write)
    }
    fn settle_writes(&mut self) -> Result<(), LogError> {
        self.port.settle_writes()
    }
}

/// A compiled guest module, ready to run as any number of VMs.
pub struct Machine {
    engine: Engine,
    module: Module,
    linker: Linker<Vm>,
    digest: [u8; 32],
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    pub exit: Exit,
    pub events: u64,
    /// Digest of the run's outputs: all of them, or those up to the last event when the
    /// run was interrupted between events or replayed a log that stops or is cut there.
    pub digest: [u8; 32],
    /// A replay whose log was cut (no end record; its recorder killed): it replayed every
    /// event the log holds, `events` of them, and stopped there.
    pub cut: bool,
}

impl RunReport {
    pub fn end(&self) -> End {
        End {
            events: self.events,
            exit: self.exit.clone(),
            digest: self.digest,
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Machine {
    pub fn load(path: &Path) -> Result<Self, MachineError> {
        let bytes = std::fs::read(path).map_err(|source| MachineError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, MachineError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(MachineError::NotWasm {
                path: path.to_path_buf(),
                why: "no wasm magic".into(),
            });
        }
        let (engine, module, linker) = compile_guest(bytes, path)?;
        Ok(Machine {
            engine,
            module,
            linker,
            digest: *blake3::hash(bytes).as_bytes(),
        })
    }

    /// blake3 of the module's bytes.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The header a log of a run of `spec` carries.
    pub fn log_header(&self, spec: &GuestSpec) -> LogHeader {
        spec.log_header(self.digest)
    }

    /// Check that a log was recorded from this module.
    pub fn check_log(&self, header: &LogHeader) -> Result<(), MachineError> {
        if header.module_digest != self.digest {
            return Err(MachineError::ModuleMismatch {
                log: hex(&header.module_digest[..8]),
                given: hex(&self.digest[..8]),
            });
        }
        Ok(())
    }

    /// Run a VM from power-on until the guest exits or is stopped. A live run finishes its
    /// sink with the run's end; a replay checks the run against the end its source
    /// recorded. The guest runs on a thread of its own while this one watches for a stop
    /// (see the module documentation).
    pub fn run(&self, spec: GuestSpec, inputs: Inputs) -> Result<RunReport, MachineError> {
        let mut vm = Vm::new(spec, inputs);
        let watcher = vm.watcher();
        if let Err(fault) = vm.power_on() {
            return Err(match fault {
                Fault::Log(l) => MachineError::Log(l),
                Fault::Divergence { seq, why } => MachineError::Divergence { seq, why },
                Fault::Exit(_) => MachineError::Internal("exit at power-on".into()),
                Fault::Stopped | Fault::Interrupted => {
                    MachineError::Internal("stopped at power-on".into())
                }
                Fault::GoLive(why) => MachineError::GoLive(why),
                Fault::Internal(why) => MachineError::Internal(why),
            });
        }
        let (engine, module, linker) = (
            self.engine.clone(),
            self.module.clone(),
            self.linker.clone(),
        );
        let watched = run_watched(&watcher, move || {
            let mut store = vm.into_store(&engine, &module);
            let exit = match linker.instantiate(&mut store, &module) {
                Ok(instance) => match instance.get_typed_func::<(), ()>(&mut store, "_start") {
                    Ok(start) => classify(start.call(&mut store, ())),
                    Err(_) => Err(MachineError::Link(
                        "the module exports no _start function (not a WASI command)".into(),
                    )),
                },
                Err(e) => classify(Err(e)),
            };
            (exit, store.into_data())
        })?;
        match watched {
            Watched::Ended((exit, vm)) => vm.conclude(exit?),
            Watched::Stopped(report) => Ok(report),
        }
    }
}

/// What the thread watching a VM needs of it (see the module documentation).
#[derive(Clone)]
pub(crate) struct Watcher {
    gate: SharedGate,
    abandoned: Arc<AtomicBool>,
}

impl Watcher {
    /// Hold the VM at its event boundary: the watcher leaves a guest that holds this
    /// alone, as one inside an event (a snapshot being taken is not a guest computing).
    pub(crate) fn hold(&self) -> MutexGuard<'_, Gate> {
        lock(&self.gate)
    }
}

/// How a watched run ended.
pub(crate) enum Watched<T> {
    /// The guest's thread finished, with this.
    Ended(T),
    /// The watcher ended the run between events; the guest's thread is abandoned.
    Stopped(RunReport),
}

/// Run `guest` (a VM's whole run, its store inside) on a thread of its own while this
/// thread watches for a stop (see the module documentation).
pub(crate) fn run_watched<T: Send + 'static>(
    watcher: &Watcher,
    guest: impl FnOnce() -> T + Send + 'static,
) -> Result<Watched<T>, MachineError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let guest = std::thread::Builder::new()
        .name("tandem-vm".into())
        .stack_size(GUEST_STACK)
        .spawn(move || {
            // The watcher may have ended the run and gone: nobody to tell, then.
            let _ = tx.send(guest());
        })
        .map_err(|e| MachineError::Internal(format!("cannot start the VM's thread: {e}")))?;
    let mut stop_seen = None;
    let done = loop {
        match rx.recv_timeout(WATCH_TICK) {
            Ok(done) => break done,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(report) = watch(&watcher.gate, &watcher.abandoned, &mut stop_seen)? {
                    // The guest's thread is abandoned (see `Gate`); it ends with the
                    // process.
                    return Ok(Watched::Stopped(report));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let why = match guest.join() {
                    Err(panic) => panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into()),
                    Ok(()) => "no result".into(),
                };
                return Err(MachineError::Internal(format!(
                    "the VM's thread ended with {why}"
                )));
            }
        }
    };
    let _ = guest.join();
    Ok(Watched::Ended(done))
}

/// One look at a running VM: end the run if it is to stop and its guest is between events.
///
/// Live: a stop was requested at least [`STOP_GRACE`] ago and the guest has not stopped at
/// a call (it is computing). Replay: the source holds no more events and says the recorded
/// run stopped or was cut where the guest is. The gate is closed, the port muted, and the
/// run ends as [`Exit::Interrupted`] with what the gate holds.
fn watch(
    gate: &SharedGate,
    abandoned: &AtomicBool,
    stop_seen: &mut Option<Instant>,
) -> Result<Option<RunReport>, MachineError> {
    let stop_due =
        stop_requested() && stop_seen.get_or_insert_with(Instant::now).elapsed() >= STOP_GRACE;
    let mut g = match gate.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        // The guest is inside an event: it is not computing, and checks for a stop there.
        Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
    };
    if g.closed {
        return Ok(None);
    }
    let seq = g.seq;
    let stop = if g.live {
        stop_due
    } else {
        g.source.as_mut().is_some_and(|s| s.stops_at(seq))
    };
    if !stop {
        return Ok(None);
    }
    g.closed = true;
    abandoned.store(true, Ordering::Relaxed);
    let report = RunReport {
        exit: Exit::Interrupted,
        events: g.seq,
        digest: g.chain,
        cut: false,
    };
    if g.live {
        let sink = g.sink.take();
        drop(g);
        tracing::info!(
            "the guest made no call within {} ms of the stop request: stopped between events, after {} events",
            STOP_GRACE.as_millis(),
            report.events
        );
        if let Some(sink) = sink {
            sink.finish(&report.end())?;
        }
        return Ok(Some(report));
    }
    let Some(mut source) = g.source.take() else {
        return Err(MachineError::Internal("the replay lost its source".into()));
    };
    drop(g);
    let at_last = report.digest;
    conclude_replay(report, &mut *source, at_last).map(Some)
}

/// Check a finished replay against what its source holds beyond the guest's last event.
/// `at_last` is the output chain at the replay's last event.
fn conclude_replay(
    mut report: RunReport,
    source: &mut dyn EventSource,
    at_last: [u8; 32],
) -> Result<RunReport, MachineError> {
    match source.tail()? {
        Tail::End(end) => {
            if end.exit == Exit::Interrupted {
                // Whether the replay was stopped where the log ends or its guest ran on to
                // an end of its own, what the log vouches for is the outputs up to its last
                // event.
                report.digest = at_last;
            }
            check_replay(&report, &end)?;
            // The replay reproduced a run the host stopped: report that stop, not where the
            // replay happened to be caught (or ran on to).
            if end.exit.is_stop() {
                report.exit = end.exit;
            }
        }
        Tail::Cut(events) => {
            // Nothing to compare beyond the events themselves, each checked with the
            // outputs before it as it was taken.
            report.digest = at_last;
            report.cut = true;
            if events != report.events {
                return Err(MachineError::Divergence {
                    seq: report.events,
                    why: format!(
                        "the guest finished ({}) after {} events; the log holds {events}",
                        report.exit, report.events
                    ),
                });
            }
        }
        // The recorder was lost just as the guest finished: nothing to compare with.
        Tail::GoLive => {}
        Tail::Event(seq) => {
            return Err(MachineError::Divergence {
                seq,
                why: format!(
                    "the guest finished ({}) but the log holds more events",
                    report.exit
                ),
            });
        }
    }
    Ok(report)
}

/// Turn how `_start` ended into an exit, or an error that ends the run.
pub(crate) fn classify(result: wasmtime::Result<()>) -> Result<Exit, MachineError> {
    let err = match result {
        Ok(()) => return Ok(Exit::Code(0)),
        Err(e) => e,
    };
    if let Some(fault) = err.downcast_ref::<Fault>() {
        return match fault {
            Fault::Exit(code) => Ok(Exit::Code(*code)),
            Fault::Stopped => Ok(Exit::Stopped),
            Fault::Interrupted => Ok(Exit::Interrupted),
            Fault::GoLive(why) => Err(MachineError::GoLive(why.clone())),
            Fault::Internal(why) => Err(MachineError::Internal(why.clone())),
            Fault::Divergence { seq, why } => Err(MachineError::Divergence {
                seq: *seq,
                why: why.clone(),
            }),
            Fault::Log(_) => match err.downcast::<Fault>() {
                Ok(Fault::Log(l)) => Err(MachineError::Log(l)),
                _ => Err(MachineError::Internal("log fault vanished".into())),
            },
        };
    }
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>() {
        return Ok(Exit::Trap(trap.to_string()));
    }
    Ok(Exit::Trap(format!("{err:#}")))
}

/// Compare a finished replay with the end record of its log.
///
/// A run that ended by itself, or was stopped at a call, must end the same way with the
/// same outputs. A run stopped between events ([`Exit::Interrupted`]) is reproduced up to
/// its last event: the replay may stop where the log ends or run on to an end of its own
/// (the live run was cut off on its way there), and the digests compared are those of the
/// outputs up to the last event. A replay interrupted where a log stopped at a call (a
/// source that stops a guest wherever it is, such as a secondary) compares nothing beyond
/// the events, each checked with the outputs before it as it was taken.
fn check_replay(report: &RunReport, end: &End) -> Result<(), MachineError> {
    let seq = report.events;
    if report.events != end.events {
        return Err(MachineError::Divergence {
            seq,
            why: format!(
                "the guest finished after {} events; the log holds {}",
                report.events, end.events
            ),
        });
    }
    match (&end.exit, &report.exit) {
        (Exit::Interrupted, _) => {}
        (Exit::Stopped, Exit::Interrupted) => return Ok(()),
        (logged, replayed) if logged != replayed => {
            return Err(MachineError::Divergence {
                seq,
                why: format!("the guest ended with {replayed}; the logged run ended with {logged}"),
            });
        }
        _ => {}
    }
    if report.digest != end.digest {
        return Err(MachineError::Divergence {
            seq,
            why: "the outputs after the last event differ from the logged run".into(),
        });
    }
    Ok(())
}

/// The VM's NIC on this host: a tap on `bridge`, named after the VM's MAC. `None` for a
/// VM without a NIC.
pub fn nic_tap(
    spec: &GuestSpec,
    bridge: Option<&str>,
) -> Result<Option<Arc<devices::Tap>>, MachineError> {
    match (&spec.nic, bridge) {
        (Some(nic), Some(bridge)) => {
            let m = nic.mac;
            let name = format!("tnd{:02x}{:02x}{:02x}{:02x}", m[2], m[3], m[4], m[5]);
            let tap = devices::Tap::create(&name, bridge)?;
            tracing::info!("NIC {} on bridge {bridge}", tap.name());
            Ok(Some(Arc::new(tap)))
        }
        (None, None) => Ok(None),
        _ => Err(MachineError::Internal(
            "a NIC needs a bridge and a bridge a NIC".into(),
        )),
    }
}

/// The live host of a VM powering on here, its datastore at `root`.
pub fn live_host(
    spec: &GuestSpec,
    root: Option<&Path>,
    tap: Option<Arc<devices::Tap>>,
) -> Result<LiveHost, MachineError> {
    if let Some(ds) = root.filter(|d| !d.is_dir()) {
        return Err(MachineError::Datastore(ds.to_path_buf()));
    }
    let fds = FdTable::new(root.is_some(), &spec.listen);
    let mut host = LiveHost::from_state(root, &fds, &VmClock::default())?;
    if let Some(tap) = tap {
        host.attach_tap(tap);
    }
    Ok(host)
}

/// Inputs for an unprotected VM powering on here: its datastore at `root`, its NIC (if
/// `spec` has one) a tap on `bridge`, events recorded into `sink` if given, outputs direct.
pub fn live_inputs(
    spec: &GuestSpec,
    root: Option<&Path>,
    bridge: Option<&str>,
    sink: Option<Box<dyn EventSink + Send>>,
) -> Result<Inputs, MachineError> {
    let tap = nic_tap(spec, bridge)?;
    let host = live_host(spec, root, tap.clone())?;
    Ok(Inputs::Live {
        host,
        sink,
        port: Box::new(Direct { tap, console: true }),
    })
}

// ---- Snapshots (issue 8): what crate::capture needs of the VM. New items only; nothing
// above depends on them. `Machine::run` could build its Vm with `Vm::new` too.

impl Outputs {
    /// The whole digest state: the chain and the open segment (a snapshot holds it).
    pub(crate) fn state(&self) -> ([u8; 32], Option<[u8; 32]>) {
        (self.chain, self.pending)
    }

    /// Outputs continuing from a saved state.
    pub(crate) fn from_state(chain: [u8; 32], pending: Option<[u8; 32]>) -> Self {
        Outputs { chain, pending }
    }
}

impl Vm {
    /// A VM at power-on (before [`Vm::power_on`]): its sink or source moved into its
    /// [`Gate`], a live VM's port muted once the run is abandoned.
    pub(crate) fn new(spec: GuestSpec, mut inputs: Inputs) -> Vm {
        let limit = usize::try_from(spec.memory_limit).unwrap_or(usize::MAX);
        let abandoned = Arc::new(AtomicBool::new(false));
        let mut gate = Gate {
            closed: false,
            live: false,
            seq: 0,
            chain: [0; 32],
            sink: None,
            source: None,
        };
        match &mut inputs {
            Inputs::Live { sink, port, .. } => {
                gate.live = true;
                gate.sink = sink.take();
                let inner = std::mem::replace(
                    port,
                    Box::new(Direct {
                        tap: None,
                        console: false,
                    }),
                );
                *port = Box::new(Muted {
                    port: inner,
                    abandoned: abandoned.clone(),
                });
            }
            Inputs::Replay { source, .. } => {
                gate.source = Some(std::mem::replace(source, Box::new(InGate)));
            }
        }
        Vm {
            fds: FdTable::new(spec.datastore, &spec.listen),
            spec: Arc::new(spec),
            seq: 0,
            clock: VmClock::default(),
            outputs: Outputs::new(),
            inputs,
            net: None,
            net_now: 0,
            stdin_ready: false,
            acks_by: None,
            limits: StoreLimitsBuilder::new()
                .memory_size(limit)
                .instances(1)
                .tables(4)
                .memories(1)
                .build(),
            warned: Default::default(),
            gate: Arc::new(Mutex::new(gate)),
            abandoned,
            snap: None,
            resume: None,
            memory_len: 0,
            memory_export: None,
            written: VecDeque::new(),
        }
    }

    /// The memory of the instance a call came from: through the export found as it was
    /// instantiated, or by name for an instance this VM was not told of (a lookup of
    /// another module's export finds nothing, so a stale one is never used).
    pub(crate) fn guest_memory(caller: &mut wasmtime::Caller<'_, Vm>) -> Option<wasmtime::Memory> {
        let found = match caller.data().memory_export {
            Some(export) => caller.get_module_export(&export),
            None => None,
        };
        match found.or_else(|| caller.get_export("memory")) {
            Some(wasmtime::Extern::Memory(m)) => Some(m),
            _ => None,
        }
    }

    /// End a run that ended with `exit`: a live run finishes its sink with the run's end; a
    /// replay checks the run against the end its source recorded.
    pub(crate) fn conclude(self, exit: Exit) -> Result<RunReport, MachineError> {
        if let Some(net) = &self.net {
            tracing::info!("network: {:?}", net.stats());
        }
        let at_last = self.outputs.at_last_event();
        let report = RunReport {
            digest: if exit == Exit::Interrupted {
                at_last
            } else {
                self.outputs.full()
            },
            exit,
            events: self.seq,
            cut: false,
        };
        let (sink, source) = {
            let mut g = lock(&self.gate);
            (g.sink.take(), g.source.take())
        };
        match (self.inputs, sink, source) {
            (Inputs::Live { .. }, Some(sink), _) => sink.finish(&report.end())?,
            (Inputs::Live { .. }, None, _) => {}
            (Inputs::Replay { .. }, _, Some(mut source)) => {
                return conclude_replay(report, &mut *source, at_last);
            }
            (Inputs::Replay { .. }, _, None) => {
                return Err(MachineError::Internal("the replay lost its source".into()));
            }
        }
        Ok(report)
    }

    /// What the thread watching this VM's run needs of it ([`run_watched`]).
    pub(crate) fn watcher(&self) -> Watcher {
        Watcher {
            gate: self.gate.clone(),
            abandoned: self.abandoned.clone(),
        }
    }

    /// A store holding this VM for an instance of `module`, its memory limited (every run
    /// of a VM, plain or instrumented, makes its store here). Where the module exports its
    /// memory is found here, once, for every call to look it up by ([`Vm::guest_memory`]).
    pub(crate) fn into_store(mut self, engine: &Engine, module: &Module) -> Store<Vm> {
        self.memory_export = module.get_export_index("memory");
        let mut store = Store::new(engine, self);
        store.limiter(|vm| &mut vm.limits);
        store
    }
}
// ---- end of snapshot additions.

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_digest_chains_over_event_boundaries() {
        let run = |segments: &[&[u8]]| {
            let mut o = Outputs::new();
            let mut shorts = Vec::new();
            for seg in segments {
                o.add("console", &[seg]);
                shorts.push(o.seal());
            }
            (shorts, o.full())
        };
        let (a, da) = run(&[b"one", b"two"]);
        assert_eq!((a.clone(), da), run(&[b"one", b"two"]), "deterministic");
        let (b, db) = run(&[b"one", b"TWO"]);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1], "a different output shows at the next boundary");
        assert_ne!(da, db);
        // Sealing with nothing new changes nothing; unsealed outputs are in the full digest.
        let mut o = Outputs::new();
        o.add("console", &[b"x"]);
        let s1 = o.seal();
        assert_eq!(o.seal(), s1);
        let sealed = o.full();
        o.add("console", &[b"y"]);
        assert_ne!(o.full(), sealed);

        // The state between events (a snapshot's) continues exactly: open segment and all.
        let (chain, pending) = o.state();
        assert!(pending.is_some());
        let mut copy = Outputs::from_state(chain, pending);
        for x in [&mut o, &mut copy] {
            x.add("frame", &[b"z", b"w"]);
            x.seal();
        }
        assert_eq!(o, copy);
        // Parts are framed: moving a byte from one part to the next is another output.
        let (mut a, mut b) = (Outputs::new(), Outputs::new());
        a.add("frame", &[b"ab", b"c"]);
        b.add("frame", &[b"a", b"bc"]);
        assert_ne!(a.full(), b.full());
    }

    /// A port that notes what it was told, in order (of a TCP segment, its numbers).
    struct Noting(Arc<Mutex<Vec<String>>>);

    impl OutputPort for Noting {
        fn frame(&mut self, position: u64, frame: &[u8]) {
            use netstack::wire::{parse_ethernet, parse_ipv4, parse_tcp};
            let tcp = parse_ethernet(frame)
                .and_then(|e| parse_ipv4(e.payload).ok())
                .and_then(|ip| parse_tcp(ip.src, ip.dst, ip.payload))
                .map_or(String::new(), |t| {
                    format!(" seq {} ack {} len {}", t.seq, t.ack, t.payload.len())
                });
            self.0
                .lock()
                .unwrap()
                .push(format!("frame@{position}{tcp}"));
        }
        fn console(&mut self, _: u64, _: u32, data: &[u8]) {
            let line = String::from_utf8_lossy(data).trim().to_string();
            self.0.lock().unwrap().push(line);
        }
        fn before_disk(&mut self, _: u64) -> Result<(), LogError> {
            Ok(())
        }
        fn before_uncertain(&mut self, _: &Intent) -> Result<(), LogError> {
            Ok(())
        }
        fn replicates(&self) -> bool {
            true
        }
        fn idle(&mut self) {
            self.0.lock().unwrap().push("idle".into());
        }
        fn storage_failed(&mut self, _: u64) -> Result<(), LogError> {
            Ok(())
        }
    }

    /// A live VM tells its port before every wait for input, never between a guest's
    /// outputs while it computes: a primary sends held outputs' events on their way then.
    #[test]
    fn a_live_vm_tells_its_port_before_each_wait() {
        let spec = GuestSpec {
            args: ["trap", "30", "exit", "0"].map(String::from).to_vec(),
            env: vec![],
            datastore: false,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            nic: None,
            listen: vec![],
        };
        let noted = Arc::new(Mutex::new(Vec::new()));
        let mut inputs = crate::testing::quiet(&spec);
        if let Inputs::Live { port, .. } = &mut inputs {
            *port = Box::new(Noting(noted.clone()));
        }
        let m = Machine::load(&crate::testing::guest("trap.wasm")).unwrap();
        let report = m.run(spec, inputs).unwrap();
        assert_eq!(report.exit, Exit::Code(0));
        // "up", three sleeps of 10 ms (each a wait), then the last line.
        assert_eq!(
            *noted.lock().unwrap(),
            ["up", "idle", "idle", "idle", "exiting with 0"]
        );
    }

    /// The stack's delayed acknowledgements go at points every copy reaches alike: before
    /// the next event once `ACK_EVENTS` passed without a network step (a guest busy with
    /// its disk), or before the guest waits; a reply carries one.
    #[test]
    fn a_delayed_acknowledgement_goes_at_the_event_bound_or_before_a_wait() {
        use crate::net::ACK_EVENTS;
        use netstack::wire::{TCP_ACK, TCP_SYN, TcpOptions, TcpOut, tcp_frame};
        let nic = netstack::NetConfig {
            mac: [2, 0, 0, 0, 0, 0x10],
            ip: [10, 9, 0, 10],
            prefix_len: 24,
        };
        let spec = GuestSpec {
            args: vec!["kvd".into()],
            env: vec![],
            datastore: false,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            nic: Some(nic.clone()),
            listen: vec![6379],
        };
        let noted = Arc::new(Mutex::new(Vec::new()));
        let mut inputs = crate::testing::quiet(&spec);
        if let Inputs::Live { port, .. } = &mut inputs {
            *port = Box::new(Noting(noted.clone()));
        }
        let mut vm = Vm::new(spec, inputs);
        let mut net = netstack::NetStack::new(nic, 7);
        net.listen(6379, 8).unwrap();
        vm.net = Some(net);
        let from_peer = |seq: u32, ack: u32, flags: u8, payload: &[u8]| -> Bytes {
            tcp_frame(&TcpOut {
                src_mac: [2, 0, 0, 0, 0, 2],
                dst_mac: [2, 0, 0, 0, 0, 0x10],
                src_ip: [10, 9, 0, 2],
                dst_ip: [10, 9, 0, 10],
                ip_id: 1,
                src_port: 40000,
                dst_port: 6379,
                seq,
                ack,
                flags,
                window: 1000,
                options: TcpOptions::default(),
                payload,
            })
            .into()
        };
        let take = || std::mem::take(&mut *noted.lock().unwrap());
        let event = |vm: &mut Vm| {
            vm.event(Kind::RandomGet, 1, |h, _, _| h.random(1)).unwrap();
        };
        const MS: u64 = 1_000_000;

        vm.net_input(0, &[from_peer(1000, 0, TCP_SYN, &[])]);
        let synack = take();
        let isn: u32 = synack[0].split(' ').nth(2).unwrap().parse().unwrap();
        assert_eq!(synack, [format!("frame@0 seq {isn} ack 1001 len 0")]);
        let ours = isn + 1;
        vm.net_input(0, &[from_peer(1001, ours, TCP_ACK, &[])]);
        let conn = vm.net.as_mut().unwrap().accept(6379).unwrap();

        // A request the guest is slow to answer: acknowledged at the bound, not before.
        vm.net_input(MS, &[from_peer(1001, ours, TCP_ACK, b"0123456789")]);
        assert_eq!(vm.acks_by, Some(ACK_EVENTS));
        for _ in 0..ACK_EVENTS {
            event(&mut vm);
        }
        assert_eq!(take(), Vec::<String>::new(), "nothing before the bound");
        event(&mut vm);
        assert_eq!(
            take(),
            [format!("frame@{ACK_EVENTS} seq {ours} ack 1011 len 0")]
        );
        assert_eq!(vm.acks_by, None);

        // The guest goes to wait: the acknowledgement goes first, then the port is told.
        vm.net_input(2 * MS, &[from_peer(1011, ours, TCP_ACK, b"0123456789")]);
        vm.before_wait();
        assert_eq!(
            take(),
            [
                format!("frame@{} seq {ours} ack 1021 len 0", ACK_EVENTS + 1),
                "idle".into()
            ]
        );

        // A reply carries it: nothing else goes, at the bound or later.
        vm.net_input(3 * MS, &[from_peer(1021, ours, TCP_ACK, b"0123456789")]);
        let now = vm.net_now;
        vm.net
            .as_mut()
            .unwrap()
            .send(conn, b"+OK\r\n", now)
            .unwrap();
        vm.flush_net();
        for _ in 0..2 * ACK_EVENTS {
            event(&mut vm);
        }
        vm.before_wait();
        assert_eq!(
            take(),
            [
                format!("frame@{} seq {ours} ack 1031 len 5", ACK_EVENTS + 1),
                "idle".into()
            ]
        );
        assert!(!vm.net.as_ref().unwrap().acks_delayed());

        // Every network step sets the bound anew: it counts the events since the last.
        vm.net_input(4 * MS, &[from_peer(1031, ours + 5, TCP_ACK, b"0123456789")]);
        vm.net
            .as_mut()
            .unwrap()
            .send(conn, b"+OK\r\n", 4 * MS)
            .unwrap();
        vm.flush_net();
        let at = vm.seq;
        assert_eq!(
            take(),
            [format!("frame@{at} seq {} ack 1041 len 5", ours + 5)]
        );
        event(&mut vm);
        event(&mut vm);
        vm.net_input(
            5 * MS,
            &[from_peer(1041, ours + 10, TCP_ACK, b"0123456789")],
        );
        assert_eq!(vm.acks_by, Some(vm.seq + ACK_EVENTS));
        // Also with nothing new, the delay's deadline still ahead.
        event(&mut vm);
        vm.net_input(6 * MS, &[]);
        assert_eq!(vm.acks_by, Some(vm.seq + ACK_EVENTS));
        assert_eq!(take(), Vec::<String>::new());
    }

    #[test]
    fn every_byte_of_a_long_output_counts_and_the_digest_is_pinned() {
        let digest = |what: &str, parts: &[&[u8]]| {
            let mut o = Outputs::new();
            o.add(what, parts);
            o.seal()
        };
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let d = digest("write", &[b"/f", &page]);
        // One byte changed anywhere in a 4 KiB write, or what the output is, changes it.
        for at in [0, 1, 2047, 4095] {
            let mut other = page.clone();
            other[at] ^= 1;
            assert_ne!(d, digest("write", &[b"/f", &other]), "byte {at}");
        }
        assert_ne!(d, digest("frame", &[b"/f", &page]));
        assert_ne!(d, digest("write", &[b"/f", &page[..4095]]));
        // Logs and the logging channel carry these digests, and a copy of another build
        // compares them: a change here is a change of the log's and the wire's versions.
        assert_eq!(d, PINNED_WRITE_DIGEST, "{d:#x}");
        // The fold of a second output into the open segment, pinned too.
        let mut o = Outputs::new();
        o.add("console", &[b"a"]);
        o.add("write", &[b"/f", &page]);
        let two = o.seal();
        assert_eq!(two, PINNED_FOLD_DIGEST, "{two:#x}");
    }

    const PINNED_WRITE_DIGEST: u64 = 0xacf0_ebfb_cab2_962e;
    const PINNED_FOLD_DIGEST: u64 = 0x068d_bf68_f9c2_c9b7;
}
