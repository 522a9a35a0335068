//! A VM's control API: HTTP/1.1 with JSON bodies on a Unix socket, as Firecracker serves
//! its API, so that an operator (and later the cluster's agents) can drive one running VM.
//!
//! - `GET /status` → `{"state" (running, snapshot-pending, stopping, ended; waiting: a
//!   `vm receive` that has no VM yet), "events", "module_digest", "instrumented_digest",
//!   "snapshots"}`
//! - `PUT /snapshot` `{"to": FILE, "stop": bool}` → at the VM's next snapshot point (an
//!   event boundary, see [`crate::capture`]) the snapshot is written to FILE (whole, then
//!   renamed into place); the reply, once it is, is `{"events", "bytes", "pause_ms"}`
//!   (and `"precopied"`, what was copied while the guest ran and at the stop, when the
//!   memory was pre-copied). With `"stop": true` the VM then stops (suspend); without, its
//!   memory is first copied while it runs ([`Control::snapshot_running`]).
//! - `PUT /migrate` `{"to": "ADDR:PORT"}` → the VM moves to the `vm receive` listening
//!   there ([`crate::migrate`]): connected and checked, its memory streamed, while the
//!   guest runs (this connection's thread), handed over at its next snapshot point; the
//!   reply, once the receiver is live, is `{"events", "bytes", "pause_ms"}` (and
//!   `"precopied"`) and the VM here then stops. A failed migration (502 before the
//!   pause, 500 after it) leaves the VM running here, unless the error says it stopped.
//! - `PUT /stop` → the VM stops at its next call, as on SIGTERM.
//!
//! This module owns the socket and the [`Control`] shared with the VM's thread. The VM
//! never blocks on the API: it only looks at an atomic flag at each snapshot point (as
//! each event import returns, and before each wait of a poll: see [`crate::capture`])
//! and, when a snapshot is pending, takes the request from the [`Control`] there,
//! answering it through a channel. A request wakes a VM blocked waiting for the network
//! ([`crate::host::wake_waits`]), so an idle VM reaches its snapshot point at once —
//! unless the call it waits in was reached through a function pointer, which is no
//! snapshot point ([`crate::capture::unwindable`]).
//!
//! **Pre-copy.** A snapshot of a VM that goes on copies its memory while the guest runs
//! ([`crate::dirty`]), on the thread that asked for it (the API connection's, or the
//! checkpointer's), from the mapping the VM publishes here ([`Control::set_memory`]);
//! the VM then pauses at its snapshot point only for the pages written since the last
//! round. Where the kernel cannot track writes, the pause copies the whole memory, as it
//! does without pre-copy (said once in the log).
//!
//! Bounds: one request per connection; a request's head is at most [`MAX_HEAD`] bytes and
//! its body at most [`MAX_BODY`]; a client has [`IO_TIMEOUT`] to send it; one snapshot may
//! be pending at a time (a second gets 409); a snapshot the VM has not reached an event
//! point for within [`SNAPSHOT_WAIT`] is withdrawn (504), so a VM waiting for input that
//! never comes, or making its calls only through function pointers, cannot hold a client
//! for ever; the 504 says which, as far as the VM could tell.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::capture::Taken;
use crate::dirty::{DirtyError, PreCopy, Tracker};

/// The largest request line plus headers.
pub const MAX_HEAD: usize = 8 << 10;
/// The largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// How long a client has to send its request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections served at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a snapshot request waits for the VM to reach a snapshot point.
pub const SNAPSHOT_WAIT: Duration = Duration::from_secs(30);
/// Set once the kernel or the sandbox refused dirty-page tracking: the same next time.
static UNTRACKABLE: AtomicBool = AtomicBool::new(false);

/// The most rounds of a pre-copy (the whole memory being the first).
pub const PRECOPY_ROUNDS: u32 = 12;
/// A pre-copy stops its rounds once one copies no more than this: what is left for the
/// pause is about as much.
pub const PRECOPY_ENOUGH: u64 = 1 << 20;

/// Whether a pre-copy's rounds end after one that copied `bytes` written again, the one
/// before it `last`: few pages left, or no longer fewer each round (the guest writes as
/// fast as they are copied); the pause copies the rest.
pub(crate) fn precopy_done(bytes: u64, last: u64) -> bool {
    bytes <= PRECOPY_ENOUGH || bytes.saturating_mul(4) > last.saturating_mul(3)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a request asks of the VM at its next snapshot point.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write the snapshot to `to`; then stop if `stop`. With `behind` (and not `stop`)
    /// the VM waits only for the capture and goes on while the file is written. With
    /// `precopy`, its memory was copied while it ran: the capture copies only the pages
    /// written since.
    Write {
        to: PathBuf,
        stop: bool,
        behind: bool,
        precopy: Option<Box<PreCopy>>,
    },
    /// Hand the VM over to the receiver at the other end (see [`crate::migrate`]).
    Migrate(crate::migrate::Outbound),
}

/// The VM's answer to a request: what it took, or an HTTP status and why not.
pub(crate) type Answer = Result<Taken, (u16, String)>;

/// A snapshot asked for through the API, waiting for the VM.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) action: Action,
    pub(crate) reply: Sender<Answer>,
}

/// What the API and the VM's thread share.
#[derive(Debug)]
pub struct Control {
    /// Set while a snapshot request waits: the VM's only check, as each import returns.
    pending: AtomicBool,
    request: Mutex<Option<Request>>,
    /// Events taken so far (updated by the VM as imports return).
    events: AtomicU64,
    /// Where the VM's linear memory is mapped in this process, and its length as of
    /// the last import that returned (0 and 0 while there is no VM): what a pre-copy copies.
    memory_base: AtomicUsize,
    memory_len: AtomicUsize,
    /// The dirty-page tracker of the last pre-copy, kept for the next (see
    /// [`PreCopy::into_tracker`]); dropped when the VM ends.
    tracker: Mutex<Option<Tracker>>,
    snapshots: AtomicU64,
    /// Calls at which a snapshot was due but the guest's stack could not be unwound (an
    /// indirect call on it: see `crate::capture::unwindable`).
    refused_points: AtomicU64,
    /// The VM has ended (exited, stopped, suspended).
    ended: AtomicBool,
    /// No VM here yet: a migration's receiver waiting for one.
    waiting: AtomicBool,
    /// Connections whose request the VM has answered or will answer, until their reply
    /// is written: the process waits for them (boundedly) before it exits.
    answering: std::sync::atomic::AtomicUsize,
    module_digest: String,
    instrumented_digest: String,
    /// The same, as bytes: what a migration's receiver must run.
    digests: ([u8; 32], [u8; 32]),
}

impl Control {
    pub fn new(module_digest: &[u8; 32], instrumented_digest: &[u8; 32]) -> Arc<Self> {
        Arc::new(Control {
            pending: AtomicBool::new(false),
            request: Mutex::new(None),
            events: AtomicU64::new(0),
            memory_base: AtomicUsize::new(0),
            memory_len: AtomicUsize::new(0),
            tracker: Mutex::new(None),
            snapshots: AtomicU64::new(0),
            refused_points: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            answering: std::sync::atomic::AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            module_digest: crate::vm::hex(module_digest),
            instrumented_digest: crate::vm::hex(instrumented_digest),
            digests: (*module_digest, *instrumented_digest),
        })
    }

    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn set_events(&self, n: u64) {
        self.events.store(n, Ordering::Relaxed);
    }

    /// A call at which a snapshot was due was no snapshot point (its stack cannot be
    /// unwound): said when a request times out.
    pub(crate) fn refused_point(&self) {
        self.refused_points.fetch_add(1, Ordering::Relaxed);
    }

    /// The VM's memory is mapped at `base` (for as long as the VM runs: wasmtime reserves
    /// its whole range up front and grows it in place) and is `len` bytes now.
    pub(crate) fn set_memory(&self, base: usize, len: usize) {
        self.memory_base.store(base, Ordering::SeqCst);
        self.memory_len.store(len, Ordering::SeqCst);
    }

    /// The VM's memory is `len` bytes now (it grew).
    pub(crate) fn set_memory_len(&self, len: usize) {
        self.memory_len.store(len, Ordering::Relaxed);
    }

    /// Where the VM's memory is mapped and how long it is now (it grows while a pre-copy
    /// runs).
    pub(crate) fn memory_extent(&self) -> (usize, usize) {
        (
            self.memory_base.load(Ordering::SeqCst),
            self.memory_len.load(Ordering::SeqCst),
        )
    }

    /// Copy the VM's memory while it runs, until little is left for the pause (see the
    /// module docs); `None` when there is no VM, when it ended meanwhile, or when writes
    /// cannot be tracked here (the snapshot then copies the whole memory in its pause).
    pub(crate) fn precopy(&self) -> Option<Box<PreCopy>> {
        let mut pc = match PreCopy::start_with(self.tracker_of_memory()?) {
            Ok(pc) => pc,
            Err(e) => {
                tracing::debug!("no pre-copy: {e}");
                return None;
            }
        };
        let mut last = u64::MAX;
        while pc.stats().rounds < PRECOPY_ROUNDS && !self.ended() {
            // Memory the guest grew since the last round is copied now rather than in
            // the pause (wasmtime grows it in place: the same base).
            let (base, len) = self.memory_extent();
            pc.grow(base, len);
            match pc.round() {
                Ok(bytes) => {
                    let done = precopy_done(bytes, last);
                    last = bytes;
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!("pre-copy given up: {e}");
                    return None;
                }
            }
        }
        Some(Box::new(pc))
    }

    /// A tracker of the VM's whole memory, for a snapshot's or a migration's pre-copy (the
    /// one kept from the last pre-copy, or a new one); `None` when there is no VM, a
    /// request already waits (this one will be refused: copy nothing), or writes cannot be
    /// tracked here (the memory is then copied in the pause: stop-and-copy, said once in
    /// the log).
    pub(crate) fn tracker_of_memory(&self) -> Option<Tracker> {
        let (base, len) = self.memory_extent();
        if base == 0 || len == 0 || self.pending() || self.unavailable().is_some() {
            return None;
        }
        if UNTRACKABLE.load(Ordering::Relaxed) {
            return None;
        }
        let kept = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let tracker = match kept {
            // Grown in place since: tracked from now, or left to the stop if the kernel
            // refuses (the pre-copy copies what is tracked, the stop whatever lies past it).
            Some(mut t) if t.base() == base && t.len() <= len => {
                t.grow_at(base, len);
                Ok(t)
            }
            _ => Tracker::new(base, len),
        };
        match tracker {
            Ok(t) => Some(t),
            Err(
                e @ (DirtyError::Userfaultfd(_) | DirtyError::Features(_) | DirtyError::Pagemap(_)),
            ) => {
                // The kernel or the sandbox: the same next time. Said once.
                UNTRACKABLE.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "no dirty-page tracking here ({e}): snapshots and migrations copy the \
                     VM's memory while it waits (stop-and-copy)"
                );
                None
            }
            // Not a registration: another pre-copy may hold the range for a moment (EBUSY).
            Err(e) => {
                tracing::debug!("no pre-copy: {e}");
                None
            }
        }
    }

    /// The waiting request, taken by the VM at a snapshot point.
    pub(crate) fn take(&self) -> Option<Request> {
        let mut r = self.request.lock().unwrap_or_else(|p| p.into_inner());
        self.pending.store(false, Ordering::Relaxed);
        // A wake the request caused and no wait consumed would end the next wait early.
        crate::host::clear_wake();
        r.take()
    }

    pub(crate) fn taken_one(&self) {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the VM's run is over.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Keep the tracker of a pre-copy finished for the next one, unless the VM ended.
    pub(crate) fn keep_tracker(&self, tracker: Tracker) {
        let mut kept = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        // Checked under the lock `end` takes after setting `ended`: a tracker is never
        // kept past the VM's end.
        if !self.ended() {
            *kept = Some(tracker);
        }
    }

    /// The VM's run is over: requests are refused from now on.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.set_memory(0, 0);
        // Its memory is unmapped by now: the tracking ends with it.
        drop(
            self.tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        // A request that arrived too late is answered rather than left to time out.
        if let Some(r) = self.take() {
            let _ = r.reply.send(Err((409, "the VM has ended".into())));
        }
        // A suspend's or a migration's reply is the client's only word on what became of
        // the VM: let it be written before the process exits (boundedly: a client that
        // does not read gets IO_TIMEOUT at most).
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        while self.answering.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether there is no VM here yet (`vm receive` before one arrived): requests for
    /// one are refused meanwhile rather than left to time out.
    pub fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::SeqCst);
    }

    /// Why the VM cannot take a request now, if it cannot.
    fn unavailable(&self) -> Option<(u16, String)> {
        if self.ended.load(Ordering::SeqCst) {
            Some((409, "the VM has ended".into()))
        } else if self.waiting.load(Ordering::SeqCst) {
            Some((409, "no VM here yet: this receiver waits for one".into()))
        } else {
            None
        }
    }

    /// Queue a snapshot request; the receiver gets the VM's answer.
    fn submit(&self, action: Action) -> Result<Receiver<Answer>, (u16, String)> {
        let mut r = self.request.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.unavailable() {
            return Err(e);
        }
        if r.is_some() {
            return Err((409, "a snapshot is already pending".into()));
        }
        let (tx, rx) = channel();
        *r = Some(Request { action, reply: tx });
        // Counted before the VM can see it, so that its end waits for the reply.
        self.answering.fetch_add(1, Ordering::SeqCst);
        self.pending.store(true, Ordering::Relaxed);
        // An idle VM waits for the network without a deadline: wake it.
        crate::host::wake_waits();
        Ok(rx)
    }

    /// Take a snapshot at the VM's next snapshot point, written to `to` (whole, then
    /// renamed into place), and wait for it: at most `wait` for the VM to reach a point
    /// (then the request is withdrawn), however long the writing takes once it did.
    /// Errors carry the HTTP status that says why (409 busy or ended, 504 no point in
    /// time, 500 the VM could not take or write it).
    ///
    /// With `behind`, the VM pauses only for the capture and the file is written while it
    /// runs; without, it also waits for the file (a copy that may pause: a replaying
    /// secondary, whose pause is what holds its primary's history to its bound).
    pub fn snapshot(
        &self,
        to: PathBuf,
        stop: bool,
        behind: bool,
        wait: Duration,
    ) -> Result<Taken, (u16, String)> {
        let rx = self.submit(Action::Write {
            to,
            stop,
            behind,
            precopy: None,
        })?;
        self.answer(rx, wait)
    }

    /// A snapshot of the VM, which goes on: its memory copied while it runs
    /// ([`Control::precopy`]), then at its next snapshot point the pages written since,
    /// the rest of its state, and it goes on while the file is written to `to`. The rest
    /// as [`Control::snapshot`].
    pub fn snapshot_running(&self, to: PathBuf, wait: Duration) -> Result<Taken, (u16, String)> {
        if let Some(e) = self.unavailable() {
            return Err(e);
        }
        let precopy = self.precopy();
        let rx = self.submit(Action::Write {
            to,
            stop: false,
            behind: true,
            precopy,
        })?;
        self.answer(rx, wait)
    }

    /// The VM's answer to a request submitted, withdrawing it if the VM reached no
    /// snapshot point within `wait`.
    fn answer(&self, rx: Receiver<Answer>, wait: Duration) -> Result<Taken, (u16, String)> {
        let refused_before = self.refused_points.load(Ordering::Relaxed);
        match rx.recv_timeout(wait) {
            Ok(a) => a,
            Err(_) if self.withdraw() => Err((
                504,
                format!(
                    "the VM reached no snapshot point within {} s ({})",
                    wait.as_secs(),
                    match self.refused_points.load(Ordering::Relaxed) - refused_before {
                        0 => "it waits for input".to_string(),
                        n => format!(
                            "{n} of its calls meanwhile were no snapshot point: their stack \
                             could not be unwound (a call made through a function pointer, \
                             as C's stdio makes them, or a stack too deep to see whole)"
                        ),
                    }
                ),
            )),
            // Taken just now: its answer is on its way.
            Err(_) => rx
                .recv()
                .map_err(|_| (500, "the VM ended without answering".to_string()))?,
        }
    }

    /// Withdraw a request the VM has not taken; false if it already has.
    fn withdraw(&self) -> bool {
        let mut r = self.request.lock().unwrap_or_else(|p| p.into_inner());
        let had = r.take().is_some();
        if had {
            self.pending.store(false, Ordering::Relaxed);
        }
        had
    }

    fn status(&self) -> Status {
        let state = if self.ended.load(Ordering::SeqCst) {
            "ended"
        } else if self.waiting.load(Ordering::SeqCst) {
            "waiting"
        } else if crate::vm::stop_requested() {
            "stopping"
        } else if self.pending() {
            "snapshot-pending"
        } else {
            "running"
        };
        Status {
            state: state.into(),
            events: self.events.load(Ordering::Relaxed),
            module_digest: self.module_digest.clone(),
            instrumented_digest: self.instrumented_digest.clone(),
            snapshots: self.snapshots.load(Ordering::Relaxed),
        }
    }
}

/// `GET /status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub state: String,
    pub events: u64,
    pub module_digest: String,
    pub instrumented_digest: String,
    pub snapshots: u64,
}

/// `PUT /snapshot`'s body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub to: PathBuf,
    #[serde(default)]
    pub stop: bool,
}

/// `PUT /migrate`'s body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The receiver: `vm receive --listen ADDR:PORT`.
    pub to: String,
}

/// `PUT /snapshot`'s reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotReply {
    pub events: u64,
    pub bytes: u64,
    pub pause_ms: f64,
    /// What was copied while the VM ran and in its pause, when its memory was pre-copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopied: Option<crate::dirty::PreCopied>,
}

impl From<Taken> for SnapshotReply {
    fn from(t: Taken) -> Self {
        SnapshotReply {
            events: t.events,
            bytes: t.bytes,
            pause_ms: t.pause_ms,
            precopied: t.precopied,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorReply {
    error: String,
}

/// The API's socket, served by a thread of its own; the socket file is removed when this
/// is dropped.
pub struct Server {
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind `path` (a stale socket file left by a dead process is replaced; a live one is
/// refused) and serve `control` on it.
pub fn serve(path: &Path, control: Arc<Control>) -> Result<Server, ControlError> {
    let err = |source| ControlError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a stale socket is replaced: any other file there is someone's.
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another VM serves this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // Whoever can connect can snapshot the VM to any path this process may write, and
    // stop it: the socket is its owner's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    std::thread::Builder::new()
        .name("tandem-api".into())
        .spawn(move || {
            let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                use std::sync::atomic::Ordering;
                // Bounded: a client that opens connections and sends nothing holds no
                // more than this many threads (each also bounded in time).
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    drop(conn);
                    continue;
                }
                let control = control.clone();
                // A snapshot request waits for the VM: a thread per connection keeps
                // status and stop answered meanwhile (a second snapshot gets 409).
                let spawned = std::thread::Builder::new()
                    .name("tandem-api-conn".into())
                    .spawn({
                        let open = open.clone();
                        move || {
                            handle(conn, &control);
                            open.fetch_sub(1, Ordering::SeqCst);
                        }
                    });
                if spawned.is_err() {
                    open.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .map_err(err)?;
    Ok(Server {
        path: path.to_path_buf(),
    })
}

/// A parsed request.
struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// Read one line of the request head into `line`, counting it against [`MAX_HEAD`].
fn next_line(
    r: &mut impl BufRead,
    line: &mut String,
    head: &mut usize,
) -> Result<(), (u16, String)> {
    line.clear();
    let n = r
        .take((MAX_HEAD - *head) as u64 + 1)
        .read_line(line)
        .map_err(|e| (400, format!("reading the request: {e}")))?;
    *head += n;
    if *head > MAX_HEAD {
        return Err((431, "request head too large".into()));
    }
    if n == 0 || !line.ends_with('\n') {
        return Err((400, "incomplete request".into()));
    }
    Ok(())
}

fn read_request(conn: &mut UnixStream) -> Result<HttpRequest, (u16, String)> {
    let bad = |why: &str| (400, why.to_string());
    let mut r = BufReader::new(Read::take(&mut *conn, (MAX_HEAD + MAX_BODY) as u64));
    let mut head = 0usize;
    let mut line = String::new();
    next_line(&mut r, &mut line, &mut head)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err((505, "HTTP/1.x only".into()));
    }
    let (method, path) = (method.to_string(), path.to_string());
    let mut length = 0usize;
    loop {
        next_line(&mut r, &mut line, &mut head)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(bad("malformed header"));
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .trim()
                .parse()
                .map_err(|_| bad("bad Content-Length"))?;
            if length > MAX_BODY {
                return Err((413, format!("body over {MAX_BODY} bytes")));
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err((411, "give a Content-Length".into()));
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)
        .map_err(|e| (400, format!("reading the body: {e}")))?;
    Ok(HttpRequest { method, path, body })
}

fn respond(conn: &mut UnixStream, code: u16, body: &impl Serialize) {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Internal Server Error",
    };
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // The client may have gone: nothing to do about it.
    let _ = conn
        .write_all(head.as_bytes())
        .and_then(|_| conn.write_all(&body));
}

fn handle(mut conn: UnixStream, control: &Control) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut answering = None;
    let (code, body) =
        match read_request(&mut conn).and_then(|req| route(&req, control, &mut answering)) {
            Ok(v) => (200, v),
            Err((code, error)) => (
                code,
                serde_json::to_value(ErrorReply { error }).unwrap_or_default(),
            ),
        };
    respond(&mut conn, code, &body);
    drop(answering);
    // Closing with part of the request unread (a refused body) would reset the
    // connection and lose the reply: read what the client still sends, boundedly.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = std::io::copy(
        &mut Read::take(&mut conn, (1 << 20) as u64),
        &mut std::io::sink(),
    );
}

/// A connection whose request the VM will answer, until its reply is written (see
/// [`Control::end`]).
struct Answering<'a>(&'a Control);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Queue `action` for the VM's next snapshot point and wait for its answer.
fn wait_answer<'a>(
    control: &'a Control,
    action: Action,
    answering: &mut Option<Answering<'a>>,
) -> Result<Taken, (u16, String)> {
    let rx = control.submit(action)?;
    *answering = Some(Answering(control));
    control.answer(rx, SNAPSHOT_WAIT)
}

fn route<'a>(
    req: &HttpRequest,
    control: &'a Control,
    answering: &mut Option<Answering<'a>>,
) -> Result<serde_json::Value, (u16, String)> {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/status") => Ok(json(&control.status())),
        ("PUT", "/stop") => {
            crate::vm::request_stop();
            crate::host::wake_waits();
            Ok(json(&control.status()))
        }
        ("PUT", "/snapshot") => {
            let r: SnapshotRequest =
                serde_json::from_slice(&req.body).map_err(|e| (400, format!("body: {e}")))?;
            let parent = match r.to.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if r.to.file_name().is_none() || !parent.is_dir() {
                return Err((
                    400,
                    format!(
                        "\"to\": {} is not a file in an existing folder",
                        r.to.display()
                    ),
                ));
            }
            if let Some(e) = control.unavailable() {
                return Err(e);
            }
            // A VM that goes on pauses only for what it wrote during the copy.
            let precopy = if r.stop { None } else { control.precopy() };
            let t = wait_answer(
                control,
                Action::Write {
                    to: r.to,
                    stop: r.stop,
                    behind: true,
                    precopy,
                },
                answering,
            )?;
            Ok(json(&SnapshotReply::from(t)))
        }
        ("PUT", "/migrate") => {
            let r: MigrateRequest =
                serde_json::from_slice(&req.body).map_err(|e| (400, format!("body: {e}")))?;
            if let Some(e) = control.unavailable() {
                return Err(e);
            }
            let to = crate::migrate::resolve(&r.to)
                .map_err(|e| (400, format!("\"to\": {}: {e}", r.to)))?;
            // Connected and welcomed while the guest runs: a receiver that is not there
            // or refuses this module costs the VM no pause.
            let (module, instrumented) = control.digests;
            let mut out = crate::migrate::Outbound::connect(to, &module, &instrumented)
                .map_err(|e| (502, format!("receiver {to}: {e}")))?;
            // The memory streamed while the guest runs: the pause sends only what it
            // wrote since. A failure here cost the VM nothing.
            if let Some(tracker) = control.tracker_of_memory() {
                out.precopy(tracker, || control.ended(), || control.memory_extent())
                    .map_err(|e| (502, format!("receiver {to}: {e}")))?;
            }
            let t = wait_answer(control, Action::Migrate(out), answering)?;
            Ok(json(&SnapshotReply::from(t)))
        }
        (_, "/status" | "/stop" | "/snapshot" | "/migrate") => {
            Err((405, "method not allowed".into()))
        }
        _ => Err((404, format!("no such resource: {}", req.path))),
    }
}

fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// A client of the API: one request, its status code and JSON body.
pub fn request(
    path: &Path,
    method: &str,
    resource: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), std::io::Error> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let body = body
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .unwrap_or_default();
    let head = format!(
        "{method} {resource} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(&body)?;
    let mut reply = Vec::new();
    Read::take(&mut conn, (MAX_HEAD + MAX_BODY) as u64).read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no reply head"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| invalid("no status code"))?;
    let value = serde_json::from_str(body).map_err(|_| invalid("reply body is not JSON"))?;
    Ok((code, value))
}
