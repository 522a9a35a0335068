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
//! The exchange, source → receiver and back:
//!
//! 1. `Hello` (the module's digests) → `Welcome`, or `Refused` (another module): done by
//!    the API thread while the guest runs, so a receiver that is not there or refuses
//!    costs the VM no pause at all.
//! 2. At the VM's next snapshot point: `Offer` (the encoded snapshot) → `Ready` once the
//!    receiver holds it whole, checked against its module, its NIC and datastore set up;
//!    or `Refused`.
//! 3. `Commit` → `Live` once the receiver's VM is instantiated from the snapshot and
//!    about to run.
//!
//! Invariant (never both, and never neither unless the connection dies in the one
//! round trip of step 3): the source emits nothing from its capture on; the receiver
//! goes live only on `Commit`, which the source sends only after `Ready`; the source
//! goes on (rewinds) when anything fails before it sent `Commit`, and exits once it got
//! `Live`. If it sent `Commit` and cannot tell what happened next, it stops: the receiver
//! may be live, and two copies of one VM answering its clients would diverge (lost
//! writes, resets), while a stopped VM loses nothing acknowledged and is a visible outage.
//!
//! Bounds: a frame's payload is at most [`MAX_OFFER`] for an offer and [`MAX_SMALL`]
//! otherwise (checked from the frame head, before anything is read or allocated beyond
//! what arrives); every wait has a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const MAGIC: [u8; 8] = *b"TNDMMIGR";
pub const VERSION: u32 = 1;
/// The largest offer: a snapshot of a VM's whole 4 GiB memory that does not compress,
/// plus its other sections.
pub const MAX_OFFER: u64 = (4 << 30) + (64 << 20);
/// The largest payload of any other frame.
pub const MAX_SMALL: u64 = 4096;
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
            _ => return None,
        })
    }

    fn bound(self) -> u64 {
        match self {
            Kind::Offer => MAX_OFFER,
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
    let deadline = Instant::now() + timeout;
    let h = head(kind, payload.len());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&h);
    hasher.update(payload);
    let what = "the peer to take a frame";
    write_by(conn, &h, deadline, what)?;
    write_by(conn, payload, deadline, what)?;
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
        return Err(MigrateError::Protocol(format!(
            "migration protocol version {version} (this Tandem speaks {VERSION})"
        )));
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

/// The source's side of a hand-over at a snapshot point: encode the captured snapshot,
/// hand it over, and report the pause from the unwind's start (`since`) to the
/// receiver's live.
pub(crate) fn migrate_out(
    out: Outbound,
    snap: &crate::snapshot::Snapshot,
    since: Instant,
) -> Result<crate::capture::Taken, HandOverError> {
    let bytes = crate::snapshot::encode(snap);
    let peer = out.peer();
    out.hand_over(&bytes)?;
    let t = crate::capture::Taken {
        events: snap.events,
        bytes: bytes.len() as u64,
        pause_ms: since.elapsed().as_secs_f64() * 1e3,
        precopied: None,
    };
    tracing::info!(
        "migrated to {peer} at event {} ({} bytes, paused {:.1} ms)",
        t.events,
        t.bytes,
        t.pause_ms
    );
    Ok(t)
}

/// The source's side: a connection to a receiver that welcomed this module.
#[derive(Debug)]
pub struct Outbound {
    conn: TcpStream,
    peer: SocketAddr,
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
        Ok(Outbound { conn, peer: to })
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Hand the VM over: offer its encoded snapshot, commit once the receiver is ready,
    /// wait for it to be live. The caller has stopped the VM (captured it) and emits
    /// nothing more unless this fails with [`HandOverError::NotCommitted`].
    pub fn hand_over(mut self, snapshot: &[u8]) -> Result<(), HandOverError> {
        use HandOverError::{NotCommitted, Uncertain};
        send_within(&mut self.conn, Kind::Offer, snapshot, OFFER_SEND_TIMEOUT)
            .map_err(NotCommitted)?;
        expect(
            &mut self.conn,
            Kind::Ready,
            READY_TIMEOUT,
            "the receiver's ready",
        )
        .map_err(NotCommitted)?;
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
        let p = expect(
            &mut self.conn,
            Kind::Hello,
            FRAME_TIMEOUT,
            "the source's hello",
        )?;
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

    /// The offered snapshot's bytes (unchecked: the caller decodes them).
    pub fn offer(&mut self) -> Result<Vec<u8>, MigrateError> {
        expect(
            &mut self.conn,
            Kind::Offer,
            OFFER_TIMEOUT,
            "the source's offer",
        )
    }

    /// Tell the source why not (best effort: it may be gone).
    pub fn refuse(&mut self, why: &str) {
        let bytes = why.as_bytes();
        let _ = send(
            &mut self.conn,
            Kind::Refused,
            &bytes[..bytes.len().min(MAX_SMALL as usize)],
        );
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
    fn the_whole_exchange_and_a_receiver_that_dies_before_ready() {
        let l = Listener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32]).unwrap();
            assert_eq!(inb.offer().unwrap(), vec![5u8; 3 << 20]);
            inb.ready().unwrap();
            inb.live().unwrap();
            // The second source: dies after its offer, before ready.
            let mut inb = l.accept(|| false).unwrap().unwrap();
            inb.hello(&[1; 32], &[2; 32]).unwrap();
            inb.offer().unwrap();
        });
        let out = Outbound::connect(addr, &[1; 32], &[2; 32]).unwrap();
        out.hand_over(&vec![5u8; 3 << 20]).unwrap();
        let out = Outbound::connect(addr, &[1; 32], &[2; 32]).unwrap();
        let e = out.hand_over(b"snap").unwrap_err();
        assert!(matches!(e, HandOverError::NotCommitted(_)), "{e}");
        t.join().unwrap();
    }
}
