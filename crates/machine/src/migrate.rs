//! Live migration's wire protocol: a running VM handed, as a snapshot, from its process
//! (the source) to a `vm receive` on another host (the receiver), over one TCP
//! connection.
//!
//! Every message is a frame:
//!
//! ```text
//! magic "TNDMMIGR" | version u32 | kind u8 | length u64 | payload | blake3 of all before
//! ```
//!
//! The exchange (protocol version 2), source → receiver and back:
//!
//! 1. `Hello` (the module's digests) → `Welcome`, or `Refused` (another module, another
//!    protocol version): done by the API thread while the guest runs, so a receiver that
//!    is not there or refuses costs the VM no pause at all.
//! 2. **Pre-copy**, while the guest runs (on the API thread, [`Outbound::precopy`]):
//!    `Pages` frames (`declared u64 | offset u64 | bytes`, at most [`PAGES_CHUNK`] bytes
//!    each): first the whole memory (pages all zero skipped: the receiver's image starts
//!    zeroed), then rounds of the pages the guest wrote meanwhile ([`crate::dirty`]'s
//!    tracker on the mapping) and of the memory it grew meanwhile (tracked from the round
//!    on, sent whole, zero pages skipped, under a larger `declared`), until a round
//!    copies little, stops shrinking, or
//!    [`crate::control::PRECOPY_ROUNDS`] / [`PRECOPY_TIME`] is reached. The receiver
//!    keeps an image ([`Image`], a mapping of its own); every frame's `declared` (the
//!    source's memory length, a multiple of 64 KiB, never shrinking, at most
//!    [`MAX_MEMORY`]) bounds its offset and length. Once committed, the restore moves the
//!    image's pages into the new instance's memory (`mremap`), so that a large memory
//!    costs the pause neither its transfer nor a copy.
//!    Then `Sync` → `Synced`: the receiver took every frame (the pause waits behind
//!    nothing queued), and one last round.
//! 3. At the VM's next snapshot point, the guest stopped: `Pages` for the pages written
//!    since the last round and the memory grown since, then `Offer` (`mode u8 |
//!    memory_len u64 | encoded snapshot`; mode 1: the snapshot's memory section is empty
//!    and the memory is the image, resized to `memory_len`; mode 0: the memory is in the
//!    snapshot, stop-and-copy, where the kernel cannot track writes) → `Ready` once the
//!    receiver rebuilt the whole snapshot and checked it exactly as a snapshot file
//!    (module digest, section checksums, the module's globals), its NIC and datastore set
//!    up; or `Refused`.
//! 4. `Commit` → `Live` once the receiver's VM is instantiated from the snapshot and
//!    about to run.
//!
//! A version 1 peer (stop-and-copy, no `Pages`) is refused at its first frame with one
//! line naming both versions ([`MigrateError::Version`]); the receiver tells a source
//! that in a `Refused` frame (a version 1 receiver closes the connection on a version 2
//! hello: the source reports the closed connection).
//!
//! Invariant (never both, and never neither unless the connection dies in the one
//! round trip of step 4): the source emits nothing from its capture on; the receiver
//! goes live only on `Commit`, which the source sends only after `Ready`, and says ready
//! only for a snapshot it rebuilt and verified whole; the source goes on (rewinds) when
//! anything fails before it sent `Commit`, and exits once it got `Live`. If it sent
//! `Commit` and cannot tell what happened next, it stops: the receiver may be live, and
//! two copies of one VM answering its clients would diverge (lost writes, resets), while
//! a stopped VM loses nothing acknowledged and is a visible outage. A failure during the
//! pre-copy costs the VM no pause at all: the API thread gives up before asking for one.
//!
//! The image the receiver rebuilds is the source's memory at the stop, byte for byte:
//! every page was sent after the last scan that found it written, and the stop sends
//! every page written after that scan (the invariant of [`crate::dirty::PreCopy`]).
//!
//! Bounds: a frame's payload is at most [`MAX_OFFER`] for an offer, [`PAGES_CHUNK`] plus
//! its head for pages and [`MAX_SMALL`] otherwise (checked from the frame head, before
//! anything is read or allocated beyond what arrives); the receiver's image at most
//! [`MAX_MEMORY`]; every wait has a deadline.
//!
//! Fault injection for tests: `TANDEM_FAILPOINT=migrate-page-out-of-bounds` makes a
//! source send, first, one page past the memory it declares (a receiver must refuse it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 8] = *b"TNDMMIGR";
pub const VERSION: u32 = 2;
/// The largest offer: a snapshot of a VM's whole 4 GiB memory that does not compress,
/// plus its other sections.
pub const MAX_OFFER: u64 = (4 << 30) + (64 << 20);
/// The largest payload of any other frame.
pub const MAX_SMALL: u64 = 4096;
/// The most memory one `Pages` frame carries.
pub const PAGES_CHUNK: usize = 4 << 20;
/// A `Pages` frame's head: the memory length declared, the offset.
const PAGES_HEAD: usize = 16;
/// An `Offer`'s head: its mode, the memory's length.
const OFFER_HEAD: usize = 9;
/// The largest memory a source may declare: wasm32's whole 4 GiB.
pub const MAX_MEMORY: u64 = 4 << 30;
/// How long the pre-copy's rounds after the first may go on (the guest runs meanwhile).
pub const PRECOPY_TIME: Duration = Duration::from_secs(20);
/// How long a receiver may wait for the whole exchange up to the offer: the pre-copy's
/// first round (one frame at most [`FRAME_TIMEOUT`] apart), its rounds, the snapshot
/// point.
pub const ARRIVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a connection to the receiver, and its welcome, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the receiver may take to check an offer and set the VM up (the guest is
/// paused meanwhile).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the receiver may take from commit to live.
pub const LIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a receiver waits for the next frame of a source that is connected.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source may take to send its offer (the guest is paused meanwhile; the
/// receiver's [`OFFER_TIMEOUT`] is longer).
pub const OFFER_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a receiver waits for the offer: the VM reaches a snapshot point within the
/// control API's wait, then its snapshot travels.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(120);

const HEAD: usize = 8 + 4 + 1 + 8;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("refused by the receiver: {0}")]
    Refused(String),
    #[error(
        "the peer speaks migration protocol version {theirs}, this Tandem speaks version {ours}"
    )]
    Version { theirs: u32, ours: u32 },
    #[error("reading the guest's memory: {0}")]
    Memory(#[from] crate::dirty::DirtyError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the peer closed the connection while we waited for {0}")]
    Closed(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Offer = 3,
    Ready = 4,
    Commit = 5,
    Live = 6,
    Refused = 7,
    Pages = 8,
    Sync = 9,
    Synced = 10,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Offer,
            4 => Kind::Ready,
            5 => Kind::Commit,
            6 => Kind::Live,
            7 => Kind::Refused,
            8 => Kind::Pages,
            9 => Kind::Sync,
            10 => Kind::Synced,
            _ => return None,
        })
    }

    fn bound(self) -> u64 {
        match self {
            Kind::Offer => MAX_OFFER + OFFER_HEAD as u64,
            Kind::Pages => (PAGES_HEAD + PAGES_CHUNK) as u64,
            _ => MAX_SMALL,
        }
    }
}

/// A frame's head: magic, version, kind, payload length.
fn head(kind: Kind, len: usize) -> [u8; HEAD] {
    let mut h = [0u8; HEAD];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12] = kind as u8;
    h[13..21].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

/// One frame's bytes (for tests: [`send`] writes the parts without copying the payload).
#[cfg(test)]
fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = head(kind, payload.len()).to_vec();
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Write all of `buf` by `deadline`, however slowly the peer reads.
fn write_by(
    conn: &mut TcpStream,
    buf: &[u8],
    deadline: Instant,
    what: &'static str,
) -> Result<(), MigrateError> {
    for chunk in buf.chunks(1 << 20) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrateError::Timeout(what));
        }
        conn.set_write_timeout(Some(left))?;
        conn.write_all(chunk).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                MigrateError::Timeout(what)
            }
            _ => e.into(),
        })?;
    }
    Ok(())
}

/// Send one frame, whole, within `timeout`.
fn send_within(
    conn: &mut TcpStream,
    kind: Kind,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), MigrateError> {
    send_parts(conn, kind, &[payload], timeout)
}

/// Send one frame whose payload is `parts` one after the other (never copied together).
fn send_parts(
    conn: &mut TcpStream,
    kind: Kind,
    parts: &[&[u8]],
    timeout: Duration,
) -> Result<(), MigrateError> {
    let deadline = Instant::now() + timeout;
    let len = parts.iter().map(|p| p.len()).sum();
    let h = head(kind, len);
    let mut hasher = blake3::Hasher::new();
    hasher.update(&h);
    for p in parts {
        hasher.update(p);
    }
    let what = "the peer to take a frame";
    write_by(conn, &h, deadline, what)?;
    for p in parts {
        write_by(conn, p, deadline, what)?;
    }
    write_by(conn, hasher.finalize().as_bytes(), deadline, what)?;
    conn.flush()?;
    Ok(())
}

/// Send one small frame.
fn send(conn: &mut TcpStream, kind: Kind, payload: &[u8]) -> Result<(), MigrateError> {
    send_within(conn, kind, payload, FRAME_TIMEOUT)
}

/// Read exactly `buf.len()` bytes by `deadline`.
fn read_by(
    conn: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &'static str,
) -> Result<(), MigrateError> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MigrateError::Timeout(what));
        }
        conn.set_read_timeout(Some(left))?;
        match conn.read(&mut buf[at..]) {
            Ok(0) => return Err(MigrateError::Closed(what)),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(MigrateError::Timeout(what));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Read one frame by `deadline`: its kind and checked payload. A payload is only
/// allocated as its bytes arrive, whatever length the head claims.
fn receive(
    conn: &mut TcpStream,
    deadline: Instant,
    what: &'static str,
) -> Result<(Kind, Vec<u8>), MigrateError> {
    let mut head = [0u8; HEAD];
    read_by(conn, &mut head, deadline, what)?;
    if head[..8] != MAGIC {
        return Err(MigrateError::Protocol("not a Tandem migration".into()));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != VERSION {
        return Err(MigrateError::Version {
            theirs: version,
            ours: VERSION,
        });
    }
    let kind = Kind::from_u8(head[12])
        .ok_or_else(|| MigrateError::Protocol(format!("unknown frame kind {}", head[12])))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[13..21]);
    let len = u64::from_le_bytes(len);
    if len > kind.bound() {
        return Err(MigrateError::Protocol(format!(
            "{kind:?} of {len} bytes (at most {})",
            kind.bound()
        )));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&head);
    let mut payload = Vec::new();
    let mut chunk = vec![0u8; (len as usize).min(1 << 20)];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(chunk.len());
        read_by(conn, &mut chunk[..n], deadline, what)?;
        payload.extend_from_slice(&chunk[..n]);
        left -= n;
    }
    hasher.update(&payload);
    let mut sum = [0u8; 32];
    read_by(conn, &mut sum, deadline, what)?;
    if hasher.finalize().as_bytes() != &sum {
        return Err(MigrateError::Protocol(format!(
            "{kind:?} checksum mismatch"
        )));
    }
    Ok((kind, payload))
}

/// Read a frame that must be `want` (or `Refused`, an error carrying its reason).
fn expect(
    conn: &mut TcpStream,
    want: Kind,
    timeout: Duration,
    what: &'static str,
) -> Result<Vec<u8>, MigrateError> {
    let (kind, payload) = receive(conn, Instant::now() + timeout, what)?;
    match kind {
        k if k == want => Ok(payload),
        Kind::Refused => Err(MigrateError::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        other => Err(MigrateError::Protocol(format!(
            "got {other:?} while waiting for {what}"
        ))),
    }
}

fn hello_payload(module: &[u8; 32], instrumented: &[u8; 32]) -> Vec<u8> {
    let mut p = module.to_vec();
    p.extend_from_slice(instrumented);
    p
}

/// Resolve `to` (ADDR:PORT) to one address.
pub fn resolve(to: &str) -> Result<SocketAddr, MigrateError> {
    to.to_socket_addrs()?
        .next()
        .ok_or_else(|| MigrateError::Protocol(format!("{to} names no address")))
}

/// How a hand-over failed, as the source sees it.
#[derive(Debug, thiserror::Error)]
pub enum HandOverError {
    /// Nothing was committed: the receiver will not go live; the source goes on.
    #[error("{0}")]
    NotCommitted(MigrateError),
    /// The commit was sent but no `Live` came back: the receiver may be live.
    #[error("{0}")]
    Uncertain(MigrateError),
}

impl HandOverError {
    /// What the source does and tells its API client: (goes on running here, HTTP
    /// status, message).
    pub(crate) fn verdict(self) -> (bool, u16, String) {
        match self {
            HandOverError::NotCommitted(e) => (true, 502, e.to_string()),
            HandOverError::Uncertain(e) => (
                false,
                500,
                format!(
                    "the VM stopped here: the receiver was told to go live but did not \
                     confirm ({e}); check whether it runs there"
                ),
            ),
        }
    }
}

/// The source's side of a hand-over at a snapshot point: send what the pre-copy left
/// (or, without one, the whole snapshot), hand the VM over, and report the pause from the
/// unwind's start (`since`) to the receiver's live. `memory` is the guest's memory, the
/// guest stopped; `snap` is its capture (without memory when the pre-copy streamed it).
/// A tracker the hand-over no longer needs (it failed: the VM goes on) goes back to
/// `control` for the next pre-copy.
pub(crate) fn migrate_out(
    mut out: Outbound,
    snap: &crate::snapshot::Snapshot,
    since: Instant,
    memory: &[u8],
    control: Option<&crate::control::Control>,
) -> Result<crate::capture::Taken, HandOverError> {
    let peer = out.peer();
    let streamed = out.streamed.is_some();
    let result = (|| {
        let (mode, memory_len) = if streamed {
            out.finish_pages(memory)
                .map_err(HandOverError::NotCommitted)?;
            (1u8, memory.len() as u64)
        } else {
            (0u8, snap.memory.len() as u64)
        };
        tracing::debug!("pause +{:.1} ms: last pages sent", ms(since));
        let bytes = crate::snapshot::encode(snap);
        tracing::debug!("pause +{:.1} ms: snapshot encoded", ms(since));
        out.hand_over(mode, memory_len, &bytes, since)?;
        Ok(bytes.len() as u64)
    })();
    let sent = match result {
        Ok(_) => out.sent,
        Err(e) => {
            if let (Some(s), Some(c)) = (out.streamed.take(), control) {
                c.keep_tracker(s.tracker);
            }
            return Err(e);
        }
    };
    let precopied = out.streamed.as_ref().map(|s| s.stats.clone());
    let t = crate::capture::Taken {
        events: snap.events,
        bytes: sent,
        pause_ms: since.elapsed().as_secs_f64() * 1e3,
        precopied: precopied.clone(),
    };
    match &precopied {
        Some(p) => tracing::info!(
            "migrated to {peer} at event {} ({} bytes, paused {:.1} ms; pre-copy: {} rounds, \
             {} bytes while the guest ran, {} bytes stopped{})",
            t.events,
            t.bytes,
            t.pause_ms,
            p.rounds,
            p.running_bytes,
            p.stopped_bytes,
            if p.whole {
                ", memory moved: copied whole"
            } else {
                ""
            }
        ),
        None => tracing::info!(
            "migrated to {peer} at event {} ({} bytes, paused {:.1} ms; stop-and-copy)",
            t.events,
            t.bytes,
            t.pause_ms
        ),
    }
    Ok(t)
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Whether this source is to send a page past the memory it declares (see the module
/// docs).
fn page_out_of_bounds_failpoint() -> bool {
    std::env::var("TANDEM_FAILPOINT").is_ok_and(|v| v == "migrate-page-out-of-bounds")
}

/// The runs of pages of `buf` (`page` bytes each, the last perhaps shorter) that are not
/// all zero.
fn nonzero_runs(buf: &[u8], page: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, p) in buf.chunks(page).enumerate() {
        if p.iter().all(|&b| b == 0) {
            continue;
        }
        let r = i * page..i * page + p.len();
        match runs.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => runs.push(r),
        }
    }
    runs
}

/// Memory sent while the guest ran: where the stop goes on from.
struct Streamed {
    tracker: crate::dirty::Tracker,
    /// The memory length declared so far (the range tracked, then the memory's at the
    /// stop).
    declared: u64,
    stats: crate::dirty::PreCopied,
}

/// The source's side: a connection to a receiver that welcomed this module.
pub struct Outbound {
    conn: TcpStream,
    peer: SocketAddr,
    /// The pre-copy's state once memory was streamed ([`Outbound::precopy`]).
    streamed: Option<Streamed>,
    /// Bytes sent (frames' payloads) so far.
    sent: u64,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outbound({}, {} bytes sent)", self.peer, self.sent)
    }
}

impl Outbound {
    /// Connect to the receiver at `to` and check it takes a VM of this module.
    pub fn connect(
        to: SocketAddr,
        module: &[u8; 32],
        instrumented: &[u8; 32],
    ) -> Result<Outbound, MigrateError> {
        let mut conn = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
        conn.set_nodelay(true)?;
        send(&mut conn, Kind::Hello, &hello_payload(module, instrumented))?;
        expect(
            &mut conn,
            Kind::Welcome,
            CONNECT_TIMEOUT,
            "the receiver's welcome",
        )?;
        Ok(Outbound {
            conn,
            peer: to,
            streamed: None,
            sent: 0,
        })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the memory was streamed (the stop sends only what is left).
    pub(crate) fn streamed(&self) -> bool {
        self.streamed.is_some()
    }

    /// One `Pages` frame: `bytes` at `offset` of a memory of `declared` bytes.
    fn pages(&mut self, declared: u64, offset: u64, bytes: &[u8]) -> Result<(), MigrateError> {
        let mut h = [0u8; PAGES_HEAD];
        h[..8].copy_from_slice(&declared.to_le_bytes());
        h[8..].copy_from_slice(&offset.to_le_bytes());
        send_parts(&mut self.conn, Kind::Pages, &[&h, bytes], FRAME_TIMEOUT)?;
        self.sent += (PAGES_HEAD + bytes.len()) as u64;
        Ok(())
    }

    /// A receiver that refused meanwhile (it reads our frames and says why once): its
    /// reason, read without waiting when nothing came.
    fn refused_meanwhile(&mut self) -> Result<(), MigrateError> {
        self.conn.set_nonblocking(true)?;
        let mut b = [0u8; 1];
        let peeked = self.conn.peek(&mut b);
        self.conn.set_nonblocking(false)?;
        match peeked {
            Ok(0) => Err(MigrateError::Closed("the receiver to take the memory")),
            Ok(_) => {
                let (kind, payload) = receive(
                    &mut self.conn,
                    Instant::now() + FRAME_TIMEOUT,
                    "the receiver's word",
                )?;
                Err(match kind {
                    Kind::Refused => {
                        MigrateError::Refused(String::from_utf8_lossy(&payload).into_owned())
                    }
                    other => MigrateError::Protocol(format!("got {other:?} during the pre-copy")),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A failed send during the pre-copy: the receiver's reason, if it gave one.
    fn why(&mut self, e: MigrateError) -> MigrateError {
        match self.refused_meanwhile() {
            Err(r @ MigrateError::Refused(_)) => r,
            _ => e,
        }
    }

    /// Send `ranges` (offsets from `base`) of this process's memory, which the guest
    /// may be writing meanwhile (copied by the kernel, see [`crate::dirty`]), in frames
    /// of at most [`PAGES_CHUNK`]: the bytes sent.
    fn send_racing(
        &mut self,
        base: usize,
        declared: u64,
        ranges: &[std::ops::Range<usize>],
        buf: &mut [u8],
    ) -> Result<u64, MigrateError> {
        let mut bytes = 0;
        for r in ranges {
            let mut at = r.start;
            while at < r.end {
                let n = (r.end - at).min(buf.len());
                crate::dirty::read_racing(base + at, &mut buf[..n], std::slice::from_ref(&(0..n)))?;
                self.pages(declared, at as u64, &buf[..n])?;
                bytes += n as u64;
                at += n;
            }
        }
        Ok(bytes)
    }

    /// `range` of the memory at `base`, read while the guest runs, its zero pages skipped
    /// (the receiver's image starts zeroed, and grows zeroed); the bytes sent.
    fn send_nonzero(
        &mut self,
        base: usize,
        declared: u64,
        range: std::ops::Range<usize>,
        buf: &mut [u8],
    ) -> Result<u64, MigrateError> {
        let page = crate::dirty::page_size();
        let mut bytes = 0;
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(buf.len());
            crate::dirty::read_racing(base + at, &mut buf[..n], std::slice::from_ref(&(0..n)))?;
            for run in nonzero_runs(&buf[..n], page) {
                self.pages(declared, (at + run.start) as u64, &buf[run.clone()])?;
                bytes += run.len() as u64;
            }
            at += n;
            self.refused_meanwhile()?;
        }
        Ok(bytes)
    }

    /// Stream the VM's memory (what `tracker` tracks, this process's mapping of it) while
    /// the guest runs: the whole of it, then rounds of the pages written meanwhile (see
    /// the module docs); `ended` says the VM ended meanwhile, `extent` where its memory is
    /// and how long, now. On success the stop sends only what was written since
    /// ([`migrate_out`]); on failure the VM never paused.
    pub(crate) fn precopy(
        &mut self,
        tracker: crate::dirty::Tracker,
        ended: impl Fn() -> bool,
        extent: impl Fn() -> (usize, usize),
    ) -> Result<(), MigrateError> {
        self.precopy_inner(tracker, ended, extent)
            .map_err(|e| self.why(e))
    }

    /// One round: the memory grown since the last (`extent`: where it is and how long,
    /// now) tracked from now and declared, the pages written since the last scan sent,
    /// then the growth whole, after the scan (see [`crate::dirty::Tracker::scan_round`]),
    /// so that the stop sends only what was written or grown after this round. The bytes
    /// written again, which tell whether the rounds converge (growth counts in `stats`
    /// only). Memory past the bound is left to the stop, which refuses it; memory that
    /// moved (another base) is not tracked here, and the stop sends it whole.
    fn precopy_round(
        &mut self,
        tracker: &mut crate::dirty::Tracker,
        (at, len): (usize, usize),
        dirty: &mut Vec<std::ops::Range<usize>>,
        buf: &mut [u8],
        stats: &mut crate::dirty::PreCopied,
    ) -> Result<u64, MigrateError> {
        let grown_from = if len as u64 <= MAX_MEMORY {
            tracker.grow_at(at, len)
        } else {
            None
        };
        let (base, declared) = (tracker.base(), tracker.len() as u64);
        let bytes = tracker.scan_round(dirty, grown_from)?;
        self.send_racing(base, declared, dirty, buf)?;
        stats.running_bytes += bytes;
        if let Some(from) = grown_from {
            stats.running_bytes += self.send_nonzero(base, declared, from..tracker.len(), buf)?;
        }
        stats.rounds += 1;
        Ok(bytes)
    }

    fn precopy_inner(
        &mut self,
        mut tracker: crate::dirty::Tracker,
        ended: impl Fn() -> bool,
        extent: impl Fn() -> (usize, usize),
    ) -> Result<(), MigrateError> {
        let (base, len) = (tracker.base(), tracker.len());
        let declared = len as u64;
        if declared > MAX_MEMORY {
            return Err(MigrateError::Protocol(format!(
                "a memory of {declared} bytes (at most {MAX_MEMORY})"
            )));
        }
        let page = crate::dirty::page_size();
        let mut stats = crate::dirty::PreCopied {
            rounds: 1,
            ..Default::default()
        };
        // This scan protects every page: from here on, a write is listed.
        let mut dirty = Vec::new();
        tracker.scan(&mut dirty)?;
        let mut buf = vec![0u8; PAGES_CHUNK];
        if page_out_of_bounds_failpoint() {
            tracing::error!("failpoint: sending a page past the memory declared");
            self.pages(declared, declared, &buf[..page])?;
        }
        // The whole memory, zero pages skipped.
        stats.running_bytes += self.send_nonzero(base, declared, 0..len, &mut buf)?;
        let started = Instant::now();
        let mut last = u64::MAX;
        while stats.rounds < crate::control::PRECOPY_ROUNDS
            && started.elapsed() < PRECOPY_TIME
            && !ended()
        {
            let bytes =
                self.precopy_round(&mut tracker, extent(), &mut dirty, &mut buf, &mut stats)?;
            self.refused_meanwhile()?;
            let done = crate::control::precopy_done(bytes, last);
            last = bytes;
            if done {
                break;
            }
        }
        // The receiver has taken every frame sent so far (nothing queued between us for
        // the pause to wait behind), then one last round of what the guest wrote
        // meanwhile.
        send(&mut self.conn, Kind::Sync, &[])?;
        expect(
            &mut self.conn,
            Kind::Synced,
            FRAME_TIMEOUT,
            "the receiver to take the memory",
        )?;
        self.precopy_round(&mut tracker, extent(), &mut dirty, &mut buf, &mut stats)?;
        self.streamed = Some(Streamed {
            declared: tracker.len() as u64,
            tracker,
            stats,
        });
        Ok(())
    }

    /// At the stop: send the pages written since the last round and the memory grown
    /// since it, from `memory` (the guest's, stopped). A mapping that
    /// moved or shrank is sent whole (every page: the receiver's image holds old ones).
    fn finish_pages(&mut self, memory: &[u8]) -> Result<(), MigrateError> {
        let Some(mut s) = self.streamed.take() else {
            return Ok(());
        };
        let result = (|| {
            let (base, len) = (s.tracker.base(), s.tracker.len());
            let declared = memory.len() as u64;
            if declared > MAX_MEMORY || declared < s.declared {
                return Err(MigrateError::Protocol(format!(
                    "the memory is {declared} bytes at the stop, {} declared",
                    s.declared
                )));
            }
            s.declared = declared;
            s.stats.memory_bytes = declared;
            let mut dirty = Vec::new();
            let same = memory.as_ptr() as usize == base && memory.len() >= len;
            if same && s.tracker.scan(&mut dirty).is_ok() {
                dirty.push(len..memory.len());
            } else {
                tracing::warn!("the guest's memory moved or could not be scanned: sent whole");
                s.stats.whole = true;
                dirty.clear();
                dirty.push(0..memory.len());
            }
            let mut bytes = 0u64;
            for r in dirty.iter().filter(|r| !r.is_empty()) {
                for start in r.clone().step_by(PAGES_CHUNK) {
                    let end = (start + PAGES_CHUNK).min(r.end);
                    self.pages(declared, start as u64, &memory[start..end])?;
                    bytes += (end - start) as u64;
                }
            }
            s.stats.stopped_bytes = bytes;
            Ok(())
        })();
        self.streamed = Some(s);
        result
    }

    /// Hand the VM over: offer its encoded snapshot (`mode` 1: its memory is what was
    /// streamed, `memory_len` bytes), commit once the receiver is ready, wait for it to be
    /// live. The caller has stopped the VM (captured it) and emits nothing more unless
    /// this fails with [`HandOverError::NotCommitted`].
    fn hand_over(
        &mut self,
        mode: u8,
        memory_len: u64,
        snapshot: &[u8],
        since: Instant,
    ) -> Result<(), HandOverError> {
        use HandOverError::{NotCommitted, Uncertain};
        let mut h = [0u8; OFFER_HEAD];
        h[0] = mode;
        h[1..].copy_from_slice(&memory_len.to_le_bytes());
        send_parts(
            &mut self.conn,
            Kind::Offer,
            &[&h, snapshot],
            OFFER_SEND_TIMEOUT,
        )
        .map_err(NotCommitted)?;
        self.sent += (OFFER_HEAD + snapshot.len()) as u64;
        expect(
            &mut self.conn,
            Kind::Ready,
            READY_TIMEOUT,
            "the receiver's ready",
        )
        .map_err(NotCommitted)?;
        tracing::debug!("pause +{:.1} ms: ready", ms(since));
        // The point of no return: from here on the receiver may go live, so the source
        // never runs again (see the module docs).
        send(&mut self.conn, Kind::Commit, &[]).map_err(Uncertain)?;
        expect(
            &mut self.conn,
            Kind::Live,
            LIVE_TIMEOUT,
            "the receiver's live",
        )
        .map_err(Uncertain)?;
        Ok(())
    }
}

/// The memory a receiver rebuilds from pages: an anonymous mapping of its own, reserved
/// for [`MAX_MEMORY`] bytes up front (pages are only taken as they are written), so that
/// the restore can move its pages into the guest's memory (`mremap`) instead of copying
/// them in the pause ([`Image::move_to`]).
pub struct Image {
    ptr: *mut u8,
    /// The memory's length (declared by the source): bytes past it are never touched.
    len: usize,
}

// SAFETY: the mapping is owned by the `Image` alone; nothing else refers to it.
unsafe impl Send for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({} bytes)", self.len)
    }
}

impl Image {
    fn new() -> Result<Image, MigrateError> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAX_MEMORY as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Image {
            ptr: ptr.cast(),
            len: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memory's length is `len` now (at most [`MAX_MEMORY`]; bytes past the old
    /// length are zero: never written).
    fn set_len(&mut self, len: usize) {
        self.len = len.min(MAX_MEMORY as usize);
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of our mapping, readable (zero where never
        // written), borrowed immutably with `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Move the memory's pages to `dst` (`len` bytes there, mapped readable and
    /// writable, page-aligned, whose contents are to be replaced whole): the kernel moves
    /// the page tables, nothing is copied. Falls back to a copy when it cannot.
    pub fn move_to(mut self, dst: &mut [u8]) {
        let page = crate::dirty::page_size();
        let fits = dst.len() == self.len
            && (dst.as_ptr() as usize).is_multiple_of(page)
            && self.len.is_multiple_of(page);
        if fits && self.len > 0 {
            // SAFETY: the source is the first `len` bytes of our own mapping (unmapped by
            // the move, which `Drop` tolerates); the destination is exactly `dst`, memory
            // we hold mutably whose contents the caller replaces whole: MREMAP_FIXED
            // unmaps it and puts our pages in its place, readable and writable as it
            // was. No other range is touched.
            let r = unsafe {
                libc::mremap(
                    self.ptr.cast(),
                    self.len,
                    self.len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    dst.as_mut_ptr().cast::<libc::c_void>(),
                )
            };
            if r != libc::MAP_FAILED {
                return;
            }
            tracing::debug!(
                "moving the memory's pages: {}; copied",
                std::io::Error::last_os_error()
            );
        }
        if dst.len() == self.len {
            dst.copy_from_slice(self.as_mut_slice());
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: our own mapping (parts perhaps already moved away: unmapping a hole is
        // no error), no longer used.
        unsafe { libc::munmap(self.ptr.cast(), MAX_MEMORY as usize) };
    }
}

/// What a source offered: its encoded snapshot and, when its memory came as pages, the
/// memory rebuilt from them (the snapshot's own memory section is then empty).
#[derive(Debug)]
pub struct Offered {
    pub snapshot: Vec<u8>,
    pub memory: Option<Image>,
    /// Bytes of memory that came as pages.
    pub page_bytes: u64,
}

/// The receiver's side: the listening socket.
pub struct Listener {
    listener: TcpListener,
}

impl Listener {
    pub fn bind(addr: &str) -> Result<Listener, MigrateError> {
        let listener = TcpListener::bind(resolve(addr)?)?;
        listener.set_nonblocking(true)?;
        Ok(Listener { listener })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, MigrateError> {
        Ok(self.listener.local_addr()?)
    }

    /// Wait for the next source; `None` once `give_up` says so (checked every 50 ms).
    pub fn accept(&self, give_up: impl Fn() -> bool) -> Result<Option<Inbound>, MigrateError> {
        loop {
            match self.listener.accept() {
                Ok((conn, peer)) => {
                    conn.set_nonblocking(false)?;
                    conn.set_nodelay(true)?;
                    return Ok(Some(Inbound { conn, peer }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if give_up() {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A connection that died before we took it is that source's problem.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The receiver's side of one connected source.
pub struct Inbound {
    conn: TcpStream,
    peer: SocketAddr,
}

impl Inbound {
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Take the source's hello; welcome it if it runs this module, else refuse it.
    pub fn hello(
        &mut self,
        module: &[u8; 32],
        instrumented: &[u8; 32],
    ) -> Result<(), MigrateError> {
        let p = match expect(
            &mut self.conn,
            Kind::Hello,
            FRAME_TIMEOUT,
            "the source's hello",
        ) {
            Ok(p) => p,
            Err(e @ MigrateError::Version { .. }) => {
                // Said in our version's frame: a source of another reads its head's
                // version and reports both.
                self.refuse(&e.to_string());
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if p.len() != 64 {
            return Err(MigrateError::Protocol("a hello of another length".into()));
        }
        if p[..32] != module[..] {
            let why = format!(
                "the VM runs module {}, this receiver was given {}",
                crate::vm::hex(&p[..8]),
                crate::vm::hex(&module[..8])
            );
            self.refuse(&why);
            return Err(MigrateError::Protocol(why));
        }
        if p[32..] != instrumented[..] {
            let why = "the VM's module was instrumented otherwise here (another wasm-opt?)";
            self.refuse(why);
            return Err(MigrateError::Protocol(why.into()));
        }
        send(&mut self.conn, Kind::Welcome, &[])
    }

    /// The memory's pages, then the offered snapshot (unchecked: the caller decodes it
    /// and puts the memory in). Every page frame is checked against the memory length
    /// its source declares (at most [`MAX_MEMORY`], never shrinking); a frame that breaks
    /// a bound is refused, and so the whole migration.
    pub fn offer(&mut self) -> Result<Offered, MigrateError> {
        let r = self.offer_inner();
        if let Err(MigrateError::Protocol(why)) = &r {
            let why = why.clone();
            self.refuse(&why);
        }
        r
    }

    fn offer_inner(&mut self) -> Result<Offered, MigrateError> {
        let deadline = Instant::now() + ARRIVE_TIMEOUT;
        let mut image: Option<Image> = None;
        let mut page_bytes = 0u64;
        let bad = |why: String| MigrateError::Protocol(why);
        loop {
            // Each frame within the offer's timeout (the source's snapshot point may take
            // that long), the whole within the arrival's.
            let by = deadline.min(Instant::now() + OFFER_TIMEOUT);
            let (kind, payload) = receive(&mut self.conn, by, "the source's memory or offer")?;
            match kind {
                Kind::Pages => {
                    if payload.len() < PAGES_HEAD {
                        return Err(bad("a page frame without its head".into()));
                    }
                    let (h, bytes) = payload.split_at(PAGES_HEAD);
                    let declared = u64::from_le_bytes(h[..8].try_into().unwrap_or_default());
                    let offset = u64::from_le_bytes(h[8..].try_into().unwrap_or_default());
                    let had = image.as_ref().map_or(0, |i| i.len() as u64);
                    if declared > MAX_MEMORY
                        || !declared.is_multiple_of(crate::snapshot::PAGE as u64)
                        || declared < had
                    {
                        return Err(bad(format!(
                            "a page frame declaring a memory of {declared} bytes (had {had}, at \
                             most {MAX_MEMORY}, in 64 KiB pages)"
                        )));
                    }
                    let end = offset.checked_add(bytes.len() as u64);
                    if end.is_none_or(|end| end > declared) {
                        return Err(bad(format!(
                            "a page frame of {} bytes at {offset:#x}, past the memory's {declared} bytes",
                            bytes.len()
                        )));
                    }
                    let img = match &mut image {
                        Some(i) => i,
                        None => image.insert(Image::new()?),
                    };
                    // Bounded by MAX_MEMORY above.
                    img.set_len(declared as usize);
                    let at = offset as usize;
                    img.as_mut_slice()[at..at + bytes.len()].copy_from_slice(bytes);
                    page_bytes += bytes.len() as u64;
                }
                Kind::Sync => send(&mut self.conn, Kind::Synced, &[])?,
                Kind::Offer => {
                    if payload.len() < OFFER_HEAD {
                        return Err(bad("an offer without its head".into()));
                    }
                    let mode = payload[0];
                    let memory_len =
                        u64::from_le_bytes(payload[1..OFFER_HEAD].try_into().unwrap_or_default());
                    let had = image.as_ref().map_or(0, |i| i.len() as u64);
                    let memory = match mode {
                        0 if image.is_none() => None,
                        0 => return Err(bad("memory pages, then a whole snapshot".into())),
                        1 => {
                            if memory_len > MAX_MEMORY
                                || memory_len < had
                                || !memory_len.is_multiple_of(crate::snapshot::PAGE as u64)
                            {
                                return Err(bad(format!(
                                    "an offer of a memory of {memory_len} bytes (pages for {had})"
                                )));
                            }
                            let mut img = match image.take() {
                                Some(i) => i,
                                None => Image::new()?,
                            };
                            img.set_len(memory_len as usize);
                            Some(img)
                        }
                        m => return Err(bad(format!("an offer of mode {m}"))),
                    };
                    let mut snapshot = payload;
                    snapshot.drain(..OFFER_HEAD);
                    return Ok(Offered {
                        snapshot,
                        memory,
                        page_bytes,
                    });
                }
                Kind::Refused => {
                    return Err(MigrateError::Refused(
                        String::from_utf8_lossy(&payload).into_owned(),
                    ));
                }
                other => return Err(bad(format!("got {other:?} while waiting for the offer"))),
            }
        }
    }

    /// Tell the source why not (best effort: it may be gone), then read what it still
    /// sends for a moment (boundedly) before the caller closes: closing with its frames
    /// unread would reset the connection, and the reset could lose our reason.
    pub fn refuse(&mut self, why: &str) {
        let bytes = why.as_bytes();
        let _ = send(
            &mut self.conn,
            Kind::Refused,
            &bytes[..bytes.len().min(MAX_SMALL as usize)],
        );
        let _ = self.conn.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut sink = vec![0u8; 64 << 10];
        while Instant::now() < deadline {
            let _ = self.conn.set_read_timeout(Some(Duration::from_millis(200)));
            match self.conn.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Say ready and wait for the source's commit. An error means the source did not
    /// commit (or we cannot know it did): the VM must not go live here.
    pub fn ready(&mut self) -> Result<(), MigrateError> {
        crate::failpoint::receiver_at("before-ready");
        send(&mut self.conn, Kind::Ready, &[])?;
        expect(
            &mut self.conn,
            Kind::Commit,
            FRAME_TIMEOUT,
            "the source's commit",
        )?;
        crate::failpoint::receiver_at("after-commit");
        Ok(())
    }

    /// Tell the source the VM is live here (best effort: committed, the VM runs here
    /// whether or not the source hears it).
    pub fn live(mut self) -> Result<(), MigrateError> {
        send(&mut self.conn, Kind::Live, &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    #[test]
    fn frames_round_trip_and_damage_is_refused() {
        let (mut a, mut b) = pair();
        send(&mut a, Kind::Offer, b"snapshot bytes").unwrap();
        let (k, p) = receive(&mut b, soon(), "test").unwrap();
        assert_eq!((k, p.as_slice()), (Kind::Offer, &b"snapshot bytes"[..]));

        // One flipped bit anywhere: refused.
        let good = frame(Kind::Ready, b"x");
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            a.write_all(&bad).unwrap();
            assert!(receive(&mut b, soon(), "test").is_err(), "byte {i}");
            let (a2, b2) = pair();
            (a, b) = (a2, b2);
        }
    }

    #[test]
    fn oversized_and_truncated_frames_are_refused_without_allocating() {
        let (mut a, mut b) = pair();
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.push(Kind::Ready as u8);
        head.extend_from_slice(&(MAX_SMALL + 1).to_le_bytes());
        a.write_all(&head).unwrap();
        let e = receive(&mut b, soon(), "test").unwrap_err();
        assert!(matches!(e, MigrateError::Protocol(_)), "{e}");

        // An offer claiming 4 GiB that sends 3 bytes and closes: an error, quickly.
        let (mut a, mut b) = pair();
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.push(Kind::Offer as u8);
        head.extend_from_slice(&(4u64 << 30).to_le_bytes());
        head.extend_from_slice(b"abc");
        a.write_all(&head).unwrap();
        drop(a);
        let e = receive(&mut b, soon(), "test").unwrap_err();
        assert!(matches!(e, MigrateError::Closed(_)), "{e}");

        // A silent peer: a timeout.
        let (_a, mut b) = pair();
        let e = receive(&mut b, Instant::now() + Duration::from_millis(100), "x").unwrap_err();
        assert!(matches!(e, MigrateError::Timeout(_)), "{e}");
    }

    #[test]
    fn a_peer_that_does_not_read_cannot_hold_a_send_past_its_deadline() {
        let (mut a, _b) = pair();
        let t = Instant::now();
        let e = send_within(
            &mut a,
            Kind::Offer,
            &vec![1u8; 256 << 20],
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(e, MigrateError::Timeout(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[test]
    fn a_receiver_of_another_module_refuses_at_hello() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32])
        });
        let e = Outbound::connect(addr, &[9; 32], &[2; 32]).unwrap_err();
        assert!(
            matches!(e, MigrateError::Refused(ref w) if w.contains("module")),
            "{e}"
        );
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn memory_grown_during_a_migrations_pre_copy_is_sent_while_it_runs() {
        use crate::dirty::tests::{Mapping, tracker_or_skip};
        let page = crate::dirty::page_size();
        // Whole wasm pages, as a guest's memory is (the receiver holds to them).
        let (old, new) = (16 * crate::snapshot::PAGE, 64 * crate::snapshot::PAGE);
        let m = Mapping::new(new / page);
        // Half of it written before the pre-copy, a part of the growth included; the rest
        // never touched until after it.
        for p in 0..new / page / 2 {
            m.write(p * page + 1, p as u8 | 1);
        }
        let Some(tracker) = tracker_or_skip(m.base(), old) else {
            return;
        };
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let receiver = std::thread::spawn(move || {
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32]).unwrap();
            let o = inb.offer().unwrap();
            inb.ready().unwrap();
            inb.live().unwrap();
            o
        });
        let mut out = Outbound::connect(addr, &[1; 32], &[2; 32]).unwrap();
        // The guest grew its memory from `old` to `new` (in place) once the copy began.
        out.precopy(tracker, || false, || (m.base(), new)).unwrap();
        let streamed = out.streamed.as_ref().unwrap();
        assert_eq!(
            (streamed.declared, streamed.tracker.len()),
            (new as u64, new),
            "the growth declared and tracked while the guest runs"
        );
        // After the pre-copy: a page of the growth never touched, one copied by a round.
        m.write(new - 100 * page, 0x77);
        m.write(old + 3 * page + 1, 0x78);
        out.finish_pages(m.bytes()).unwrap();
        let stats = out.streamed.as_ref().unwrap().stats.clone();
        assert_eq!(
            stats.running_bytes,
            (new / 2) as u64,
            "every page written before the pre-copy sent once while the guest ran, the \
             growth's zero pages not at all: {stats:?}"
        );
        assert_eq!(
            stats.stopped_bytes,
            2 * page as u64,
            "only the pages written after the pre-copy are sent in the pause: {stats:?}"
        );
        out.hand_over(1, new as u64, b"snap", Instant::now())
            .unwrap();
        let o = receiver.join().unwrap();
        let image = o.memory.expect("the memory came as pages");
        assert!(
            image.as_slice() == m.bytes(),
            "the image differs from the memory"
        );
    }

    #[test]
    fn the_whole_exchange_and_a_receiver_that_dies_before_ready() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32]).unwrap();
            let o = inb.offer().unwrap();
            assert_eq!(o.snapshot, vec![5u8; 3 << 20]);
            assert!(o.memory.is_none());
            inb.ready().unwrap();
            inb.live().unwrap();
            // The second source: dies after its offer, before ready.
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32]).unwrap();
            inb.offer().unwrap();
        });
        let mut out = Outbound::connect(addr, &[1; 32], &[2; 32]).unwrap();
        out.hand_over(0, 0, &vec![5u8; 3 << 20], Instant::now())
            .unwrap();
        let mut out = Outbound::connect(addr, &[1; 32], &[2; 32]).unwrap();
        let e = out.hand_over(0, 0, b"snap", Instant::now()).unwrap_err();
        assert!(matches!(e, HandOverError::NotCommitted(_)), "{e}");
        t.join().unwrap();
    }

    /// A receiver that gets `frames` after its hello: the offer's outcome.
    fn offered(frames: Vec<(Kind, Vec<u8>)>) -> Result<Offered, MigrateError> {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32]).unwrap();
            inb.offer()
        });
        let mut out = Outbound::connect(addr, &[1; 32], &[2; 32]).unwrap();
        for (k, p) in frames {
            if send(&mut out.conn, k, &p).is_err() {
                break;
            }
        }
        let r = t.join().unwrap();
        if r.is_err() {
            // Every refusal is told to the source, with its reason.
            let e = expect(&mut out.conn, Kind::Ready, FRAME_TIMEOUT, "x").unwrap_err();
            assert!(matches!(e, MigrateError::Refused(_)), "{e}");
        }
        r
    }

    fn pages(declared: u64, offset: u64, bytes: &[u8]) -> (Kind, Vec<u8>) {
        let mut p = declared.to_le_bytes().to_vec();
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(bytes);
        (Kind::Pages, p)
    }

    fn offer(mode: u8, memory_len: u64, snapshot: &[u8]) -> (Kind, Vec<u8>) {
        let mut p = vec![mode];
        p.extend_from_slice(&memory_len.to_le_bytes());
        p.extend_from_slice(snapshot);
        (Kind::Offer, p)
    }

    #[test]
    fn pages_build_the_image_and_every_bound_is_checked() {
        const P: u64 = crate::snapshot::PAGE as u64;
        // Pages, overwritten, the memory grown, then the offer: the image.
        let o = offered(vec![
            pages(P, 0, &[1; 100]),
            pages(P, 50, &[2; 10]),
            pages(3 * P, 2 * P + 7, &[3; 4]),
            offer(1, 4 * P, b"snap"),
        ])
        .unwrap();
        assert_eq!(o.snapshot, b"snap");
        assert_eq!(o.page_bytes, 114);
        let m = o.memory.unwrap();
        let m = m.as_slice();
        let mut want = vec![0u8; 4 * P as usize];
        want[..100].fill(1);
        want[50..60].fill(2);
        want[2 * P as usize + 7..2 * P as usize + 11].fill(3);
        assert!(m == want);
        // Mode 0 with no pages: the memory is in the snapshot.
        let o = offered(vec![offer(0, 0, b"whole")]).unwrap();
        assert!(o.memory.is_none() && o.snapshot == b"whole");

        let refused = |frames, what: &str| {
            let e = offered(frames).unwrap_err();
            assert!(matches!(e, MigrateError::Protocol(_)), "{what}: {e}");
        };
        refused(vec![pages(P, P - 4, &[1; 5])], "past the end");
        refused(vec![pages(P, u64::MAX - 2, &[1; 5])], "offset overflow");
        refused(vec![pages(MAX_MEMORY + P, 0, &[1])], "over MAX_MEMORY");
        refused(vec![pages(P + 1, 0, &[1])], "not whole pages");
        refused(
            vec![pages(2 * P, 0, &[1]), pages(P, 0, &[1])],
            "a memory that shrinks",
        );
        refused(
            vec![pages(2 * P, 0, &[1]), offer(1, P, b"s")],
            "an offer smaller than the pages",
        );
        refused(
            vec![pages(P, 0, &[1]), offer(0, 0, b"s")],
            "pages then mode 0",
        );
        refused(vec![offer(7, 0, b"s")], "an unknown mode");
        refused(vec![(Kind::Pages, vec![0; 8])], "no head");
        // A frame larger than its kind allows is refused from its head.
        let e = offered(vec![(Kind::Pages, vec![0; PAGES_HEAD + PAGES_CHUNK + 1])]).unwrap_err();
        assert!(matches!(e, MigrateError::Protocol(_)), "{e}");
    }

    /// An image's pages moved into another mapping are its bytes there, and a
    /// destination it cannot move to (misaligned) gets a copy.
    #[test]
    fn an_image_moves_its_pages_or_copies_them() {
        let len = 4 * crate::snapshot::PAGE;
        let mut img = Image::new().unwrap();
        img.set_len(len);
        img.as_mut_slice()[5] = 1;
        img.as_mut_slice()[len - 1] = 2;
        let want = img.as_slice().to_vec();
        // SAFETY: a fresh anonymous mapping of our own, unmapped below.
        let dst = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(dst, libc::MAP_FAILED);
        // SAFETY: within the mapping just made, used by this test alone.
        let slice = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len + 4096) };
        slice.fill(9);
        img.move_to(&mut slice[..len]);
        assert!(slice[..len] == want[..]);
        assert!(
            slice[len..].iter().all(|&b| b == 9),
            "nothing past it touched"
        );
        let mut img = Image::new().unwrap();
        img.set_len(4096);
        img.as_mut_slice()[7] = 3;
        img.move_to(&mut slice[1..4097]);
        assert_eq!((slice[8], slice[1]), (3, 0));
        // SAFETY: our mapping, no longer used.
        unsafe { libc::munmap(dst, len + 4096) };
    }

    #[test]
    fn a_version_1_source_is_refused_naming_both_versions() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32])
        });
        let mut a = TcpStream::connect(addr).unwrap();
        let mut f = frame(Kind::Hello, &[1; 64]);
        f[8..12].copy_from_slice(&1u32.to_le_bytes());
        a.write_all(&f).unwrap();
        let e = t.join().unwrap().unwrap_err();
        let line = e.to_string();
        assert!(
            matches!(e, MigrateError::Version { theirs: 1, ours: 2 }),
            "{e}"
        );
        assert!(line.contains("version 1") && line.contains("version 2") && !line.contains('\n'));
        // The source hears why, in a version 2 frame (a version 1 source reports that
        // version from its head).
        let mut head = [0u8; HEAD];
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        a.read_exact(&mut head).unwrap();
        assert_eq!(head[12], Kind::Refused as u8);
        assert_eq!(head[8..12], 2u32.to_le_bytes());
    }
}
