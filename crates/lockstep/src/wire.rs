//! The logging channel's wire format: authenticated, checksummed, sequenced frames.
//!
//! ```text
//! "TL" | version u8 | kind u8 | seq u64 | length u32 | payload | crc32 u32 | mac [16]
//! ```
//! Integers are little-endian. The CRC covers header and payload; the MAC is BLAKE3 keyed
//! with the connection key over header, payload and CRC. The connection key is derived from
//! the VM pair's shared key and a nonce the primary picks per connection, so frames of one
//! connection are worthless on another. Sequence numbers count from 0 in each direction.
//!
//! Invariant: a frame reaches its reader only if its length, CRC, MAC and sequence number
//! all check; anything else is an error that closes the channel. A writer never sends a
//! payload over [`MAX_PAYLOAD`]: the primary splits its history into frames by bytes
//! (`primary::next_batch`), and one event carries at most 16 MiB of data, so the cap,
//! twice that, is never reached by an honest primary.

use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 2] = b"TL";
/// Version 2: `Hello` carries the release point, `ToPrimary::EndHeld` confirms the end.
/// 3: intents (`ToSecondary::Intent`, `ToPrimary::IntentHeld`). 5: `Hello` carries no
/// release point; a newcomer catches up ungated until `ToSecondary::Release` (confirmed by
/// `ToPrimary::ReleaseHeld`). 6: a secondary may decline a handover (`ToPrimary::Declined`).
/// 7: writes performed after their outcome was logged (`ToSecondary::Written`).
/// 8: the output digest of log version 5 (a pair of copies must digest alike).
/// 9: log version 6 (delayed acknowledgements: a pair of copies must send alike).
/// 10: log version 7 (XXH3 digests: a pair of copies must digest alike).
pub const VERSION: u8 = 10;
/// The largest payload a frame may carry: comfortably above one event's 16 MiB of data.
pub const MAX_PAYLOAD: u32 = 32 << 20;
const HEADER: usize = 16;
const TRAILER: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(io::Error),
    #[error("the other side fell silent past the failure timeout")]
    Silent,
    #[error("the other side closed the channel")]
    Closed,
    #[error("not a Tandem logging frame (bad magic)")]
    Magic,
    #[error("logging protocol version {0}; this tandem speaks {VERSION}")]
    Version(u8),
    #[error("frame claims {0} bytes")]
    TooLong(u32),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("frame authentication failed (wrong key, or forged)")]
    Forged,
    #[error("frame {got} out of sequence (expected {want})")]
    Sequence { want: u64, got: u64 },
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::Silent,
            io::ErrorKind::UnexpectedEof => FrameError::Closed,
            _ => FrameError::Io(e),
        }
    }
}

/// The key for one connection: the pair's key bound to the connection's nonce.
pub fn connection_key(pair_key: &[u8; 32], nonce: &[u8; 16]) -> [u8; 32] {
    *blake3::keyed_hash(pair_key, nonce).as_bytes()
}

/// Compare without an early exit, so that timing says nothing of where tags differ.
fn same(a: &[u8; 16], b: &[u8]) -> bool {
    b.len() == 16 && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A frame's header and trailer around `payload`, computed over the payload in place.
fn frame_parts(
    key: &[u8; 32],
    seq: u64,
    kind: u8,
    payload: &[u8],
) -> ([u8; HEADER], [u8; TRAILER]) {
    frame_parts_as(VERSION, key, seq, kind, payload)
}

fn frame_parts_as(
    version: u8,
    key: &[u8; 32],
    seq: u64,
    kind: u8,
    payload: &[u8],
) -> ([u8; HEADER], [u8; TRAILER]) {
    let mut head = [0u8; HEADER];
    head[..MAGIC.len()].copy_from_slice(MAGIC);
    let mut at = MAGIC.len();
    head[at] = version;
    head[at + 1] = kind;
    at += 2;
    head[at..at + 8].copy_from_slice(&seq.to_le_bytes());
    head[at + 8..at + 12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(payload);
    let crc = crc.finalize().to_le_bytes();
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&head);
    h.update(payload);
    h.update(&crc);
    let mut tail = [0u8; TRAILER];
    tail[..4].copy_from_slice(&crc);
    tail[4..].copy_from_slice(&h.finalize().as_bytes()[..16]);
    (head, tail)
}

pub fn encode(key: &[u8; 32], seq: u64, kind: u8, payload: &[u8]) -> Vec<u8> {
    let (head, tail) = frame_parts(key, seq, kind, payload);
    [&head[..], payload, &tail[..]].concat()
}

/// A frame as a tandem speaking protocol `version` writes it (tests of cross-version pairs).
#[cfg(test)]
pub(crate) fn encode_as(
    version: u8,
    key: &[u8; 32],
    seq: u64,
    kind: u8,
    payload: &[u8],
) -> Vec<u8> {
    let (head, tail) = frame_parts_as(version, key, seq, kind, payload);
    [&head[..], payload, &tail[..]].concat()
}

/// What a writer gathers before it writes: a frame's header, small payloads and its
/// trailer go out together (a heartbeat or an acknowledgement is one segment on the wire),
/// and a payload serialised piece by piece is written in pieces of about this size, never
/// one syscall per piece. A piece at least this large is written where it is, not copied.
const STAGE: usize = 64 << 10;

/// Writes frames with consecutive sequence numbers.
pub struct FrameWriter<W> {
    out: W,
    key: [u8; 32],
    seq: u64,
    /// Bytes of the frame being written, not yet hashed nor written (reused: at most
    /// [`STAGE`] bytes and a trailer).
    stage: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(out: W, key: [u8; 32]) -> Self {
        FrameWriter {
            out,
            key,
            seq: 0,
            stage: Vec::new(),
        }
    }

    /// Send one frame; a payload over [`MAX_PAYLOAD`] is refused before anything is
    /// written (the reader would refuse it and close the channel).
    pub fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        self.send_with(kind, payload.len(), |w| w.write_all(payload))
    }

    /// Send one frame whose payload, of exactly `len` bytes, `fill` writes: the payload is
    /// never held whole (a batch of events is serialised straight onto the channel), its
    /// checksum and MAC are computed as it goes. The frame is byte for byte what
    /// [`encode`] makes of the same payload. A `len` over [`MAX_PAYLOAD`] is refused before
    /// anything is written; a `fill` that writes more or fewer bytes than `len` is an error
    /// (the channel is then unusable: the frame on it is cut or damaged).
    pub fn send_with(
        &mut self,
        kind: u8,
        len: usize,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        if len > MAX_PAYLOAD as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {len} bytes is over the {MAX_PAYLOAD}-byte cap"),
            ));
        }
        let mut head = [0u8; HEADER];
        head[..MAGIC.len()].copy_from_slice(MAGIC);
        head[2] = VERSION;
        head[3] = kind;
        head[4..12].copy_from_slice(&self.seq.to_le_bytes());
        head[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        self.stage.clear();
        let mut body = Body {
            out: &mut self.out,
            stage: &mut self.stage,
            crc: crc32fast::Hasher::new(),
            mac: blake3::Hasher::new_keyed(&self.key),
            left: len,
        };
        body.stage.extend_from_slice(&head);
        fill(&mut body)?;
        if body.left != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a frame's payload fell {} bytes short of its length",
                    body.left
                ),
            ));
        }
        body.hash_stage();
        let Body {
            out,
            stage,
            crc,
            mut mac,
            ..
        } = body;
        let crc = crc.finalize().to_le_bytes();
        mac.update(&crc);
        stage.extend_from_slice(&crc);
        stage.extend_from_slice(&mac.finalize().as_bytes()[..16]);
        out.write_all(stage)?;
        stage.clear();
        if stage.capacity() > 2 * STAGE {
            // A large small-payload frame (up to the cap) leaves no large buffer behind.
            stage.shrink_to(STAGE);
        }
        self.seq += 1;
        self.out.flush()
    }
}

impl<W> FrameWriter<W> {
    /// What it writes to.
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

/// A connection's output that a thread which must never block (the VM's) may write too.
///
/// Blocking, it writes as a stream does, after what is pending. Not blocking
/// ([`Outbox::set_blocking`]), it hands the kernel what the socket's buffer takes at once
/// (`MSG_DONTWAIT`, per call: the socket itself stays blocking for its reader) and keeps
/// the rest pending, for the next blocking write or [`Outbox::flush_pending`]: a write
/// never waits, and bytes leave in the order they were written. After a failed write the
/// stream is unusable (a frame on it may be cut): every later write fails.
pub struct Outbox {
    stream: std::net::TcpStream,
    blocking: bool,
    pending: Vec<u8>,
    failed: Option<io::ErrorKind>,
}

impl Outbox {
    pub fn new(stream: std::net::TcpStream) -> Self {
        Outbox {
            stream,
            blocking: true,
            pending: Vec::new(),
            failed: None,
        }
    }

    pub fn set_blocking(&mut self, blocking: bool) {
        self.blocking = blocking;
    }

    /// Bytes written without blocking that the kernel has not taken yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether a write failed (the stream is unusable).
    pub fn failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Write what is pending, blocking until the kernel took it.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        if let Some(kind) = self.failed {
            return Err(kind.into());
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        // `write_all` retries an interrupted call itself.
        let result = self.stream.write_all(&self.pending);
        self.pending.clear();
        if self.pending.capacity() > 2 * STAGE {
            self.pending.shrink_to(STAGE);
        }
        self.note(result)
    }

    /// Keep a write's failure: the stream is unusable from then on. An interrupted call
    /// (a signal, without `SA_RESTART`) wrote nothing and is retried by its caller.
    fn note<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &result
            && e.kind() != io::ErrorKind::Interrupted
        {
            self.failed = Some(e.kind());
        }
        result
    }

    /// Whatever was written of a frame cannot be trusted (its writer gave up on it midway):
    /// the stream is unusable from now on.
    pub fn set_failed(&mut self, kind: io::ErrorKind) {
        self.failed.get_or_insert(kind);
    }

    /// One `send(2)` that never blocks: the bytes the kernel took (0 if its buffer is full).
    fn send_now(&self, data: &[u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: `data` is a live slice of `data.len()` readable bytes for the whole
            // call, and the descriptor is the stream's own, open while `self` lives.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }
}

impl Write for Outbox {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(kind) = self.failed {
            return Err(kind.into());
        }
        if self.blocking {
            self.flush_pending()?;
            let result = self.stream.write(data);
            return self.note(result);
        }
        if self.pending.is_empty() {
            let result = self.send_now(data);
            let taken = self.note(result)?;
            self.pending.extend_from_slice(&data[taken..]);
        } else {
            self.pending.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.blocking {
            self.flush_pending()
        } else {
            Ok(())
        }
    }
}

/// A frame's payload on its way out: hashed and written as it comes, in bounded pieces.
struct Body<'a, W> {
    out: &'a mut W,
    /// What is gathered but not yet hashed nor written.
    stage: &'a mut Vec<u8>,
    crc: crc32fast::Hasher,
    mac: blake3::Hasher,
    /// Payload bytes still to come.
    left: usize,
}

impl<W: Write> Body<'_, W> {
    fn hash_stage(&mut self) {
        self.crc.update(self.stage);
        self.mac.update(self.stage);
    }

    fn write_stage(&mut self) -> io::Result<()> {
        self.hash_stage();
        self.out.write_all(self.stage)?;
        self.stage.clear();
        Ok(())
    }
}

impl<W: Write> Write for Body<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.len() > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a frame's payload ran past its length",
            ));
        }
        self.left -= data.len();
        if self.stage.len() + data.len() > STAGE {
            self.write_stage()?;
        }
        if data.len() >= STAGE {
            self.crc.update(data);
            self.mac.update(data);
            self.out.write_all(data)?;
        } else {
            self.stage.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The frame is flushed whole, by `send_with`.
        Ok(())
    }
}

/// What a reader takes from its input in one read: small frames that arrived together
/// (acknowledgements, frames of a few events) cost one read between them, not two each
/// (header, then the rest).
const READ_AHEAD: usize = 16 << 10;

/// Reads and verifies frames.
pub struct FrameReader<R> {
    input: R,
    key: [u8; 32],
    seq: u64,
    /// Bytes of a frame were read and the frame not finished (an error cut it short).
    within: bool,
    /// Bytes read ahead, `buf[at..end]` not yet taken (at most [`READ_AHEAD`]).
    buf: Vec<u8>,
    at: usize,
    end: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(input: R, key: [u8; 32]) -> Self {
        FrameReader {
            input,
            key,
            seq: 0,
            within: false,
            buf: vec![0; READ_AHEAD],
            at: 0,
            end: 0,
        }
    }

    /// Read what the input has (at least one byte, at most what the buffer holds after
    /// what is left in it), retrying an interrupted read. End of input is `Ok(0)`.
    fn read_ahead(&mut self) -> io::Result<usize> {
        if self.at == self.end {
            (self.at, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.at..self.end, 0);
            (self.at, self.end) = (0, self.end - self.at);
        }
        loop {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Fill `out` from what was read ahead, then from the input itself.
    fn take(&mut self, out: &mut [u8]) -> io::Result<()> {
        let have = (self.end - self.at).min(out.len());
        out[..have].copy_from_slice(&self.buf[self.at..self.at + have]);
        self.at += have;
        if have < out.len() {
            // A large rest is read straight where it goes, not through the buffer.
            self.input.read_exact(&mut out[have..])?;
        }
        Ok(())
    }

    /// Whether the last [`FrameReader::recv`] failed within a frame. If it did not, a
    /// [`FrameError::Silent`] consumed nothing and the reader may be asked again.
    pub fn within_frame(&self) -> bool {
        self.within
    }

    /// Whether a whole frame was read ahead: the next [`FrameReader::recv`] then returns
    /// without reading its input, so whatever answers what was just received can wait for
    /// it (one acknowledgement for frames that arrived together, not one each).
    pub fn holds_frame(&self) -> bool {
        let have = self.end - self.at;
        if self.within || have < HEADER {
            return false;
        }
        let h = &self.buf[self.at..self.at + HEADER];
        let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize;
        have >= HEADER + len + TRAILER
    }

    /// What it reads from (to set a socket's timeout, say).
    pub fn get_ref(&self) -> &R {
        &self.input
    }

    /// The next frame's kind and payload.
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>), FrameError> {
        if self.within {
            // What is left of a frame cut short cannot be found again.
            return Err(FrameError::Silent);
        }
        let mut head = [0u8; HEADER];
        // The first read alone: a silence before it consumed nothing.
        if self.at == self.end && self.read_ahead()? == 0 {
            return Err(FrameError::Closed);
        }
        self.within = true;
        while self.end - self.at < HEADER {
            if self.read_ahead()? == 0 {
                return Err(FrameError::Closed);
            }
        }
        head.copy_from_slice(&self.buf[self.at..self.at + HEADER]);
        self.at += HEADER;
        if &head[0..2] != MAGIC {
            return Err(FrameError::Magic);
        }
        if head[2] != VERSION {
            return Err(FrameError::Version(head[2]));
        }
        let len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        let mut rest = vec![0u8; len as usize + TRAILER];
        self.take(&mut rest)?;
        let body_end = len as usize;
        // Checked where it lies: a frame of 16 MiB is not copied to be checked.
        let (body, trailer) = rest.split_at(body_end);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(body);
        let crc = crc.finalize().to_le_bytes();
        if crc[..] != trailer[..4] {
            return Err(FrameError::Checksum);
        }
        let mut mac = blake3::Hasher::new_keyed(&self.key);
        mac.update(&head);
        mac.update(body);
        mac.update(&crc);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&mac.finalize().as_bytes()[..16]);
        if !same(&tag, &trailer[4..]) {
            return Err(FrameError::Forged);
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&head[4..12]);
        let seq = u64::from_le_bytes(s);
        if seq != self.seq {
            return Err(FrameError::Sequence {
                want: self.seq,
                got: seq,
            });
        }
        self.seq += 1;
        self.within = false;
        rest.truncate(body_end);
        Ok((head[3], rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silence_between_frames_consumes_nothing_and_one_within_a_frame_ends_the_reader() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut out = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (inp, _) = l.accept().unwrap();
        inp.set_read_timeout(Some(std::time::Duration::from_millis(30)))
            .unwrap();
        let key = [3; 32];
        let mut r = FrameReader::new(inp, key);
        // Nothing sent: silent, nothing consumed, asked again it reads the frame whole.
        assert!(matches!(r.recv(), Err(FrameError::Silent)));
        assert!(!r.within_frame());
        out.write_all(&encode(&key, 0, 1, b"one")).unwrap();
        assert_eq!(r.recv().unwrap(), (1, b"one".to_vec()));
        // Half a frame, then silence: the frame is lost, and so is the reader.
        let frame = encode(&key, 1, 1, b"two");
        out.write_all(&frame[..5]).unwrap();
        assert!(matches!(r.recv(), Err(FrameError::Silent)));
        assert!(r.within_frame());
        out.write_all(&frame[5..]).unwrap();
        assert!(matches!(r.recv(), Err(FrameError::Silent)));
    }

    #[test]
    fn an_outbox_not_blocking_keeps_what_the_socket_refuses_and_writes_it_first_later() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (inp, _) = l.accept().unwrap();
        let key = [9; 32];
        let payload = |i: u8| vec![i; 256 << 10];
        // Nobody reads: 32 MiB of frames, far over what both ends' buffers hold, are all
        // taken without a wait (a blocking write would never return).
        let (done, written) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut w = FrameWriter::new(Outbox::new(out), key);
            w.get_mut().set_blocking(false);
            for i in 0..128u8 {
                w.send(1, &payload(i)).unwrap();
            }
            let _ = done.send(w);
        });
        let mut w = written
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a write that must not block blocked");
        assert!(w.get_ref().pending() > 0, "the socket took 32 MiB at once");
        assert!(!w.get_ref().failed());
        // A blocking write sends what is pending first, then its own frame.
        let reader = std::thread::spawn(move || {
            let mut r = FrameReader::new(inp, key);
            (0..129).map(|_| r.recv().unwrap()).collect::<Vec<_>>()
        });
        w.get_mut().set_blocking(true);
        w.send(2, b"after").unwrap();
        assert_eq!(w.get_ref().pending(), 0);
        let got = reader.join().unwrap();
        for (i, (kind, body)) in got[..128].iter().enumerate() {
            assert_eq!((*kind, body), (1, &payload(i as u8)), "frame {i}");
        }
        assert_eq!(got[128], (2, b"after".to_vec()));
    }

    #[test]
    fn an_outbox_whose_write_failed_refuses_every_later_write() {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (inp, _) = l.accept().unwrap();
        let mut o = Outbox::new(out);
        o.set_blocking(false);
        // Closed with unread data, the peer resets the connection: a later send fails.
        o.write_all(b"unread").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(inp);
        let mut failed = false;
        for _ in 0..200 {
            if o.write_all(&[0; 1024]).is_err() {
                failed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(failed, "writes to a reset connection never failed");
        assert!(o.failed());
        assert!(o.write_all(b"x").is_err());
        o.set_blocking(true);
        assert!(o.write_all(b"x").is_err());
        assert!(o.flush_pending().is_err());
    }

    fn frames(key: &[u8; 32]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new(), *key);
        w.send(1, b"first").unwrap();
        w.send(2, b"second payload").unwrap();
        w.out
    }

    #[test]
    fn frames_round_trip() {
        let key = [7u8; 32];
        let bytes = frames(&key);
        let mut r = FrameReader::new(&bytes[..], key);
        assert_eq!(r.recv().unwrap(), (1, b"first".to_vec()));
        assert_eq!(r.recv().unwrap(), (2, b"second payload".to_vec()));
        assert!(matches!(r.recv(), Err(FrameError::Closed)));
    }

    /// A reader that returns at most `step` bytes per read: frames cut anywhere.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.data.len().min(out.len()).min(self.step);
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_read_ahead_together_or_cut_anywhere_come_out_whole_and_in_order() {
        let key = [7u8; 32];
        // Small frames around ones larger than the read-ahead, one just at its edge.
        let sizes = [
            0,
            5,
            100,
            READ_AHEAD - HEADER - TRAILER,
            3,
            READ_AHEAD * 3 + 7,
            1,
            40,
        ];
        let payloads: Vec<Vec<u8>> = (0..200)
            .map(|i| vec![i as u8; sizes[i % sizes.len()]])
            .collect();
        let mut bytes = Vec::new();
        for (seq, p) in payloads.iter().enumerate() {
            bytes.extend(encode(&key, seq as u64, 1, p));
        }
        for step in [1, 7, HEADER, 1000, READ_AHEAD, usize::MAX] {
            let mut r = FrameReader::new(Trickle { data: &bytes, step }, key);
            for p in &payloads {
                assert_eq!(r.recv().unwrap(), (1, p.clone()), "step {step}");
            }
            assert!(matches!(r.recv(), Err(FrameError::Closed)), "step {step}");
        }
    }

    #[test]
    fn a_frame_is_held_only_once_all_of_it_was_read_ahead() {
        let key = [3u8; 32];
        let small = encode(&key, 0, 1, &[1; 10]);
        let next = encode(&key, 1, 1, &[2; 10]);
        let mut bytes = small.clone();
        bytes.extend(&next);
        // A reader of `data` (all of it in one read), after it took the first frame.
        let after_first = |data| {
            let step = usize::MAX;
            let mut r = FrameReader::new(Trickle { data, step }, key);
            assert!(!r.holds_frame(), "nothing read yet");
            r.recv().unwrap();
            r
        };
        // Both frames come in one read: the second is held once the first is taken.
        let mut r = after_first(&bytes);
        assert!(r.holds_frame());
        r.recv().unwrap();
        assert!(!r.holds_frame());
        // The second frame short of its last byte: not held, its rest is still to come.
        assert!(!after_first(&bytes[..bytes.len() - 1]).holds_frame());
        // Only its header read ahead: not held either.
        assert!(!after_first(&bytes[..small.len() + HEADER]).holds_frame());
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let key = [7u8; 32];
        let good = frames(&key);
        for i in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[i / 8] ^= 1 << (i % 8);
            let mut r = FrameReader::new(&bad[..], key);
            let ok = r.recv().is_ok() && r.recv().is_ok();
            assert!(!ok, "bit {i} flipped and both frames accepted");
        }
    }

    #[test]
    fn a_wrong_key_or_a_replayed_frame_is_refused() {
        let good = frames(&[7u8; 32]);
        let mut r = FrameReader::new(&good[..], [8u8; 32]);
        assert!(matches!(r.recv(), Err(FrameError::Forged)));
        // The second frame alone: valid MAC, wrong position.
        let first_len = HEADER + 5 + TRAILER;
        let mut r = FrameReader::new(&good[first_len..], [7u8; 32]);
        assert!(matches!(
            r.recv(),
            Err(FrameError::Sequence { want: 0, got: 1 })
        ));
        // Keys of two connections differ.
        assert_ne!(
            connection_key(&[1; 32], &[0; 16]),
            connection_key(&[1; 32], &[1; 16])
        );
    }

    #[test]
    fn a_frame_of_another_protocol_version_is_refused_whatever_its_mac() {
        let key = [7u8; 32];
        for version in [1, VERSION - 1, VERSION + 1, u8::MAX] {
            let f = encode_as(version, &key, 0, 1, b"hello");
            assert!(matches!(
                FrameReader::new(&f[..], key).recv(),
                Err(FrameError::Version(v)) if v == version
            ));
        }
    }

    #[test]
    fn truncated_frames_are_refused() {
        let key = [7u8; 32];
        let good = frames(&key);
        for cut in 0..HEADER + 5 + TRAILER {
            let mut r = FrameReader::new(&good[..cut], key);
            assert!(r.recv().is_err(), "cut at {cut} accepted");
        }
        let huge = {
            let mut f = encode(&key, 0, 1, b"x");
            f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
            f
        };
        assert!(matches!(
            FrameReader::new(&huge[..], key).recv(),
            Err(FrameError::TooLong(_))
        ));
    }

    #[test]
    fn a_payload_written_in_pieces_makes_the_frame_encode_makes_of_it_whole() {
        let key = [7u8; 32];
        // Sizes around the stage: small, straddling it, larger than it; pieces of one
        // byte, of the stage's size and larger.
        for len in [
            0,
            1,
            STAGE - HEADER - 1,
            STAGE - HEADER,
            STAGE,
            3 * STAGE + 5,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut w = FrameWriter::new(Vec::new(), key);
            w.send(1, b"before").unwrap();
            let mut pieces = Vec::new();
            let mut at = 0;
            for (i, n) in [1usize, 5, STAGE, 1, STAGE + 7, 3]
                .iter()
                .cycle()
                .enumerate()
            {
                if at >= len || i > 1000 {
                    break;
                }
                let n = (*n).min(len - at);
                pieces.push(&payload[at..at + n]);
                at += n;
            }
            pieces.push(&payload[at..]);
            w.send_with(2, len, |out| {
                pieces.iter().try_for_each(|p| out.write_all(p))
            })
            .unwrap();
            let mut want = encode(&key, 0, 1, b"before");
            want.extend(encode(&key, 1, 2, &payload));
            assert!(w.out == want, "a payload of {len} bytes framed otherwise");
            let mut r = FrameReader::new(&w.out[..], key);
            r.recv().unwrap();
            assert_eq!(r.recv().unwrap(), (2, payload));
        }
    }

    #[test]
    fn a_payload_longer_or_shorter_than_announced_is_an_error() {
        let key = [7u8; 32];
        let mut w = FrameWriter::new(Vec::new(), key);
        assert!(w.send_with(1, 4, |out| out.write_all(b"five!")).is_err());
        let mut w = FrameWriter::new(Vec::new(), key);
        assert!(w.send_with(1, 6, |out| out.write_all(b"five!")).is_err());
        // Nothing a reader would take for a frame.
        assert!(FrameReader::new(&w.out[..], key).recv().is_err());
        let mut w = FrameWriter::new(Vec::new(), key);
        let over = MAX_PAYLOAD as usize + 1;
        assert!(w.send_with(1, over, |_| Ok(())).is_err());
        assert!(w.out.is_empty());
    }

    #[test]
    fn a_writer_refuses_a_payload_over_the_cap_and_sends_one_at_the_cap() {
        let key = [7u8; 32];
        let mut w = FrameWriter::new(Vec::new(), key);
        let over = vec![0u8; MAX_PAYLOAD as usize + 1];
        assert!(w.send(1, &over).is_err());
        assert!(w.out.is_empty(), "nothing is written for a refused frame");
        let at = vec![5u8; MAX_PAYLOAD as usize];
        w.send(1, &at).unwrap();
        let mut r = FrameReader::new(&w.out[..], key);
        let (kind, payload) = r.recv().unwrap();
        assert_eq!((kind, payload.len()), (1, MAX_PAYLOAD as usize));
    }
}
