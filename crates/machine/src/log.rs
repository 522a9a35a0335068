//! The event log file: how a VM's events are kept on disk.
//!
//! Layout:
//! ```text
//! "TANDEMLG" | version u16 | header length u32 | crc32 u32 | header (postcard)
//! zstd frame (with content checksum) of records:
//!     length u32 | crc32 u32 | record (postcard)
//! ```
//! All integers are little-endian. The records are the events in sequence order and, when
//! the run finished, one [`End`] record. A log without its `End` record is truncated.
//!
//! Invariant: nothing read from a log reaches the VM unless its header, its record checksum
//! and the zstd frame checksum all verified; any damage is a [`LogError`], never a guess.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::Event;

pub const MAGIC: &[u8; 8] = b"TANDEMLG";
pub const VERSION: u16 = 1;
/// No single record is larger than this; a larger length field means damage.
const MAX_RECORD: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot {what} log {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0} is not a Tandem event log (bad magic)")]
    NotALog(PathBuf),
    #[error("{path} is log format version {found}; this tandem reads version {VERSION}")]
    Version { path: PathBuf, found: u16 },
    #[error("log {path} is corrupted: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("log {path} is truncated: it ends after {events} events without an end record")]
    Truncated { path: PathBuf, events: u64 },
}

/// What a replay must reproduce besides the events: the VM's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    /// blake3 of the wasm module's bytes.
    pub module_digest: [u8; 32],
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Whether the VM had a datastore preopened at fd 3.
    pub datastore: bool,
    pub memory_limit: u64,
    /// Sequence number of the first event in this log (0 = from power-on).
    pub first_seq: u64,
}

/// How a run ended, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    /// The guest called `proc_exit` or returned from `_start` (code 0).
    Code(u32),
    /// The guest trapped; the trap's message.
    Trap(String),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Trap(t) => write!(f, "trap: {t}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub events: u64,
    pub exit: Exit,
    /// Digest of every output the VM produced.
    pub digest: [u8; 32],
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Event(Event),
    End(End),
}

/// Where events go while a VM runs live.
pub trait EventSink {
    fn append(&mut self, event: &Event) -> Result<(), LogError>;
    /// The run ended: record how.
    fn finish(self: Box<Self>, end: &End) -> Result<(), LogError>;
}

/// What a source holds after the guest's last call.
#[derive(Debug)]
pub enum Tail {
    /// The end record of the logged run.
    End(End),
    /// An event the replaying guest never asked for.
    Event(u64),
}

/// Where a replaying VM takes its events from.
pub trait EventSource {
    /// The next event, or `None` when the source holds no more.
    fn next_event(&mut self) -> Result<Option<Event>, LogError>;
    /// Called once the guest has finished: what the source holds beyond its last event.
    fn tail(&mut self) -> Result<Tail, LogError>;
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain types into a Vec cannot fail.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Frame a payload as `length | crc32 | payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Appends events to a log file.
pub struct LogWriter {
    path: PathBuf,
    out: Option<zstd::stream::Encoder<'static, BufWriter<File>>>,
}

impl LogWriter {
    pub fn create(path: &Path, header: &LogHeader) -> Result<Self, LogError> {
        let file = File::create(path).map_err(io_err("create", path))?;
        let mut w = BufWriter::with_capacity(256 << 10, file);
        let payload = encode(header);
        w.write_all(MAGIC)
            .and_then(|_| w.write_all(&VERSION.to_le_bytes()))
            .and_then(|_| w.write_all(&frame(&payload)))
            .map_err(io_err("write", path))?;
        let mut enc = zstd::stream::Encoder::new(w, 3).map_err(io_err("compress", path))?;
        enc.include_checksum(true).map_err(io_err("compress", path))?;
        Ok(LogWriter {
            path: path.to_path_buf(),
            out: Some(enc),
        })
    }

    fn write_record(&mut self, record: &Record) -> Result<(), LogError> {
        let path = &self.path;
        let out = self.out.as_mut().ok_or_else(|| LogError::Corrupt {
            path: path.clone(),
            why: "write after end record".into(),
        })?;
        out.write_all(&frame(&encode(record)))
            .map_err(io_err("write", path))
    }

    /// Write the end record and close the log.
    pub fn finish_log(mut self, end: &End) -> Result<(), LogError> {
        self.write_record(&Record::End(end.clone()))?;
        let path = self.path.clone();
        if let Some(enc) = self.out.take() {
            let mut w = enc.finish().map_err(io_err("write", &path))?;
            w.flush().map_err(io_err("write", &path))?;
            w.get_ref().sync_all().map_err(io_err("sync", &path))?;
        }
        Ok(())
    }
}

impl EventSink for LogWriter {
    fn append(&mut self, event: &Event) -> Result<(), LogError> {
        self.write_record(&Record::Event(event.clone()))
    }

    fn finish(self: Box<Self>, end: &End) -> Result<(), LogError> {
        self.finish_log(end)
    }
}

/// Reads a log file, verifying every checksum.
pub struct LogReader {
    path: PathBuf,
    input: zstd::stream::Decoder<'static, BufReader<BufReader<File>>>,
    header: LogHeader,
    events: u64,
    end: Option<End>,
}

impl LogReader {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let mut r = BufReader::with_capacity(256 << 10, file);
        let mut magic = [0u8; 8];
        read_exact_or(&mut r, &mut magic, || LogError::NotALog(path.to_path_buf()))?;
        if &magic != MAGIC {
            return Err(LogError::NotALog(path.to_path_buf()));
        }
        let mut version = [0u8; 2];
        read_exact_or(&mut r, &mut version, || truncated(path, 0))?;
        let found = u16::from_le_bytes(version);
        if found != VERSION {
            return Err(LogError::Version {
                path: path.to_path_buf(),
                found,
            });
        }
        let payload = read_frame(&mut r, path, 0)?.ok_or_else(|| truncated(path, 0))?;
        let header: LogHeader = decode(&payload, path, "header")?;
        let input = zstd::stream::Decoder::new(r).map_err(io_err("decompress", path))?;
        Ok(LogReader {
            path: path.to_path_buf(),
            input,
            header,
            events: 0,
            end: None,
        })
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The end record, once the reader has reached it.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Read every remaining event into memory (used to rewrite logs in tests and tools).
    pub fn read_all(mut self) -> Result<(LogHeader, Vec<Event>, End), LogError> {
        let mut events = Vec::new();
        while let Some(e) = self.next_event()? {
            events.push(e);
        }
        let end = self.end.clone().ok_or_else(|| truncated(&self.path, self.events))?;
        Ok((self.header, events, end))
    }
}

impl EventSource for LogReader {
    fn next_event(&mut self) -> Result<Option<Event>, LogError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let Some(payload) = read_frame(&mut self.input, &self.path, self.events)? else {
            return Err(truncated(&self.path, self.events));
        };
        match decode::<Record>(&payload, &self.path, "record")? {
            Record::Event(e) => {
                if e.seq != self.header.first_seq + self.events {
                    return Err(LogError::Corrupt {
                        path: self.path.clone(),
                        why: format!(
                            "event {} found where event {} belongs",
                            e.seq,
                            self.header.first_seq + self.events
                        ),
                    });
                }
                self.events += 1;
                Ok(Some(e))
            }
            Record::End(end) => {
                // Anything after the end record (bytes, or a second zstd frame) is damage.
                let mut rest = [0u8; 1];
                match self.input.read(&mut rest) {
                    Ok(0) => {}
                    Ok(_) => {
                        return Err(LogError::Corrupt {
                            path: self.path.clone(),
                            why: "data after the end record".into(),
                        });
                    }
                    Err(e) => return Err(classify(&self.path, self.events, e)),
                }
                self.end = Some(end);
                Ok(None)
            }
        }
    }

    fn tail(&mut self) -> Result<Tail, LogError> {
        if let Some(e) = self.next_event()? {
            return Ok(Tail::Event(e.seq));
        }
        self.end
            .clone()
            .map(Tail::End)
            .ok_or_else(|| truncated(&self.path, self.events))
    }
}

fn truncated(path: &Path, events: u64) -> LogError {
    LogError::Truncated {
        path: path.to_path_buf(),
        events,
    }
}

fn classify(path: &Path, events: u64, e: io::Error) -> LogError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        truncated(path, events)
    } else {
        LogError::Corrupt {
            path: path.to_path_buf(),
            why: e.to_string(),
        }
    }
}

fn read_exact_or(
    r: &mut impl Read,
    buf: &mut [u8],
    on_eof: impl FnOnce() -> LogError,
) -> Result<(), LogError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            on_eof()
        } else {
            LogError::Corrupt {
                path: PathBuf::new(),
                why: e.to_string(),
            }
        }
    })
}

/// Read one `length | crc32 | payload` frame; `None` at a clean end of input.
fn read_frame(r: &mut impl Read, path: &Path, events: u64) -> Result<Option<Vec<u8>>, LogError> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(truncated(path, events)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(classify(path, events, e)),
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD {
        return Err(LogError::Corrupt {
            path: path.to_path_buf(),
            why: format!("record {events} claims {len} bytes"),
        });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .map_err(|e| classify(path, events, e))?;
    if crc32fast::hash(&payload) != crc {
        return Err(LogError::Corrupt {
            path: path.to_path_buf(),
            why: format!("checksum mismatch in record {events}"),
        });
    }
    Ok(Some(payload))
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], path: &Path, what: &str) -> Result<T, LogError> {
    postcard::from_bytes(bytes).map_err(|e| LogError::Corrupt {
        path: path.to_path_buf(),
        why: format!("undecodable {what}: {e}"),
    })
}

/// Write a complete log (header, events, end) in one go.
pub fn write_log(path: &Path, header: &LogHeader, events: &[Event], end: &End) -> Result<(), LogError> {
    let mut w = LogWriter::create(path, header)?;
    for e in events {
        w.append(e)?;
    }
    w.finish_log(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Kind, Outcome};

    fn sample() -> (LogHeader, Vec<Event>, End) {
        let header = LogHeader {
            module_digest: [7; 32],
            args: vec!["guest".into()],
            env: vec![],
            datastore: true,
            memory_limit: 1 << 20,
            first_seq: 0,
        };
        let events = (0..100)
            .map(|seq| Event {
                seq,
                kind: Kind::ClockTimeGet,
                args: seq * 3,
                outputs: 0,
                outcome: Outcome::Value(seq * 1000),
            })
            .collect();
        let end = End {
            events: 100,
            exit: Exit::Code(0),
            digest: [1; 32],
        };
        (header, events, end)
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tlog");
        let (h, ev, end) = sample();
        write_log(&path, &h, &ev, &end).unwrap();
        let (h2, ev2, end2) = LogReader::open(&path).unwrap().read_all().unwrap();
        assert_eq!((h, ev, end), (h2, ev2, end2));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tlog");
        let (h, ev, end) = sample();
        write_log(&path, &h, &ev, &end).unwrap();
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let res = LogReader::open(&path).and_then(|r| r.read_all());
            assert!(res.is_err(), "flip at byte {i} of {} was accepted", good.len());
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tlog");
        let (h, ev, end) = sample();
        write_log(&path, &h, &ev, &end).unwrap();
        let good = std::fs::read(&path).unwrap();
        for cut in 0..good.len() {
            std::fs::write(&path, &good[..cut]).unwrap();
            let res = LogReader::open(&path).and_then(|r| r.read_all());
            assert!(res.is_err(), "truncation at {cut} was accepted");
        }
    }
}
