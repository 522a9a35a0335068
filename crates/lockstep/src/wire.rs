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
pub const VERSION: u8 = 6;
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

fn mac(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    let h = blake3::keyed_hash(key, data);
    let mut m = [0u8; 16];
    m.copy_from_slice(&h.as_bytes()[..16]);
    m
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

/// Payloads up to this size are framed in one buffer and written at once.
const SMALL: usize = 64 << 10;

/// Writes frames with consecutive sequence numbers.
pub struct FrameWriter<W> {
    out: W,
    key: [u8; 32],
    seq: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(out: W, key: [u8; 32]) -> Self {
        FrameWriter { out, key, seq: 0 }
    }

    /// Send one frame; a payload over [`MAX_PAYLOAD`] is refused before anything is
    /// written (the reader would refuse it and close the channel).
    pub fn send(&mut self, kind: u8, payload: &[u8]) -> io::Result<()> {
        if payload.len() > MAX_PAYLOAD as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a frame of {} bytes is over the {MAX_PAYLOAD}-byte cap",
                    payload.len()
                ),
            ));
        }
        if payload.len() <= SMALL {
            // One write: a heartbeat or an acknowledgement is one segment on the wire.
            let f = encode(&self.key, self.seq, kind, payload);
            self.out.write_all(&f)?;
        } else {
            // A large payload is written where it is, never copied into a frame.
            let (head, tail) = frame_parts(&self.key, self.seq, kind, payload);
            self.out.write_all(&head)?;
            self.out.write_all(payload)?;
            self.out.write_all(&tail)?;
        }
        self.seq += 1;
        self.out.flush()
    }
}

/// Reads and verifies frames.
pub struct FrameReader<R> {
    input: R,
    key: [u8; 32],
    seq: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(input: R, key: [u8; 32]) -> Self {
        FrameReader { input, key, seq: 0 }
    }

    /// What it reads from (to set a socket's timeout, say).
    pub fn get_ref(&self) -> &R {
        &self.input
    }

    /// The next frame's kind and payload.
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>), FrameError> {
        let mut head = [0u8; HEADER];
        self.input.read_exact(&mut head)?;
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
        self.input.read_exact(&mut rest)?;
        let body_end = len as usize;
        let mut framed = Vec::with_capacity(HEADER + body_end);
        framed.extend_from_slice(&head);
        framed.extend_from_slice(&rest[..body_end]);
        let crc = u32::from_le_bytes([
            rest[body_end],
            rest[body_end + 1],
            rest[body_end + 2],
            rest[body_end + 3],
        ]);
        if crc32fast::hash(&framed) != crc {
            return Err(FrameError::Checksum);
        }
        framed.extend_from_slice(&crc.to_le_bytes());
        if !same(&mac(&self.key, &framed), &rest[body_end + 4..]) {
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
        rest.truncate(body_end);
        Ok((head[3], rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
