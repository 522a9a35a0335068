//! The event log file: how a VM's events are kept on disk.
//!
//! Layout:
//! ```text
//! "TANDEMLG" | version u16 | header length u32 | crc32 u32 | header (postcard)
//! chunk*:  raw length u32 | compressed length u32 | crc32 of compressed u32
//!          | crc32 of the previous 12 bytes u32 | zstd
//!          the zstd data decompresses to records:
//!              length u32 | crc32 u32 | record (postcard)
//! ```
//! All integers are little-endian. The records are the events in sequence order and, when
//! the run finished (or was stopped), one [`End`] record.
//!
//! A log without its `End` record was *cut*: its recorder was killed. Chunks are written
//! whole and in order, so a kill leaves whole chunks followed by at most one torn chunk
//! (its head or body shorter than it claims, up to the end of the file). Such a log reads
//! up to its last whole chunk and then reports the cut ([`Tail::Cut`]), never damage. A
//! chunk whose checksum fails is damage wherever it is: a kill shortens a chunk, it does
//! not change its bytes (the head's own checksum means a damaged length field cannot pass
//! for a torn chunk either).
//!
//! The writer hands a batch to its thread when it is full or older than [`STALE`], and
//! the thread writes each chunk to the file at once, so a recording killed at any moment
//! loses at most the events of about that long.
//!
//! Invariant: nothing read from a log reaches the VM unless the header's, the chunk's and
//! the record's checksums all verified, so every byte of the file is covered; any damage is
//! a [`LogError`], never a guess.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::event::Event;

pub const MAGIC: &[u8; 8] = b"TANDEMLG";
/// 2: the output digest is a chain over event boundaries.
/// 3: descriptors by inode, stops between events (an [`Exit::Interrupted`] end; chunk
/// heads carry their own checksum so that a cut log tells a torn tail from damage).
/// 4: the outputs between two events are folded one by one (so that a snapshot can hold
/// the open segment): digests differ.
/// 5: an output's part longer than a blake3 chunk is digested on its own first (a write's
/// data, a large frame): digests differ.
/// 6: the guest's TCP delays its acknowledgements (fewer frames): a replay of a version 5
/// log would diverge.
/// 7: outputs and call arguments are digested with XXH3 (`vm::Outputs`,
/// `event::args_digest`): digests differ.
pub const VERSION: u16 = 7;
/// No single record is larger than this; a larger length field means damage.
const MAX_RECORD: u32 = 64 << 20;
/// No chunk is larger than this (a batch plus its largest record).
const MAX_CHUNK: u32 = 2 * MAX_RECORD;

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
    /// A live event source (the logging channel) failed.
    #[error("{0}")]
    Source(String),
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
    /// The VM's NIC, if it has one, and its TCP listeners in fd order.
    pub nic: Option<netstack::NetConfig>,
    pub listen: Vec<u16>,
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
    /// The host stopped the VM (on request) at a WASI call: the guest had made the call
    /// that would have been event number `End::events`.
    Stopped,
    /// The host stopped the VM (on request) between events: after `End::events` events,
    /// while the guest computed and before it made another call. The end's digest then
    /// covers the outputs up to the last event only (see [`End::digest`]).
    Interrupted,
}

impl Exit {
    /// Whether the host stopped the run (at a call or between events).
    pub fn is_stop(&self) -> bool {
        matches!(self, Exit::Stopped | Exit::Interrupted)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Trap(t) => write!(f, "trap: {t}"),
            Exit::Stopped => write!(f, "stopped by the host"),
            Exit::Interrupted => write!(f, "stopped by the host between events"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub events: u64,
    pub exit: Exit,
    /// Digest of every output the VM produced; for an [`Exit::Interrupted`] run, of the
    /// outputs produced before its last event (what followed it was cut off mid-way and
    /// a replay cannot reproduce how far it got: console writes are outputs, not events).
    pub digest: [u8; 32],
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Event(Event),
    End(End),
}

/// Where events go while a VM runs live.
pub trait EventSink {
    /// Take the next event. The VM gives the guest a clone of its outcome, made before:
    /// data read and frames received are shared by the two ([`crate::event::Bytes`]),
    /// never copied. The event is the sink's to keep (a primary's history, a log's batch
    /// until written) without an allocation of its own per event.
    fn append(&mut self, event: Event) -> Result<(), LogError>;
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
    /// The source lost the copy that produced its events (a secondary whose primary
    /// failed, and that won arbitration): this copy is to go live.
    GoLive,
    /// The source ends after this many events without an end record: the recording was
    /// cut (its recorder killed). A replay stops there.
    Cut(u64),
}

/// Where a replaying VM takes its events from.
pub trait EventSource {
    /// The next event, or `None` when the source holds no more.
    fn next_event(&mut self) -> Result<Option<Event>, LogError>;
    /// Called once the guest has finished: what the source holds beyond its last event.
    fn tail(&mut self) -> Result<Tail, LogError>;
    /// Without blocking: whether a guest that has taken `events` events is to stop now,
    /// wherever it is, because the source holds no more events and ends there with a stop
    /// (an [`End`] whose exit [`Exit::is_stop`], `End::events == events`) or a cut.
    ///
    /// A replaying VM asks this a few times a second while its guest computes, so that a
    /// guest recorded up to a stop does not run on past it (it may never make another
    /// call). The default never says so: the guest then stops only at its next call.
    fn stops_at(&mut self, events: u64) -> bool {
        let _ = events;
        false
    }
    /// The intent of the operation after the last event, if the source holds one for it
    /// (a secondary whose primary announced it): see [`crate::event::Intent`].
    fn pending_intent(&mut self) -> Option<crate::event::Intent> {
        None
    }
    /// Every write logged before this position was performed (see
    /// [`crate::port::OutputPort::write_behind`]); a copy going live performs again the
    /// writes it took from or after it. A log performs each operation before it logs it:
    /// the default says all were.
    fn written_below(&mut self) -> u64 {
        u64::MAX
    }
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

/// The same encoding as [`Record`], borrowing: the hot path serialises without a clone.
#[derive(Serialize)]
enum RecordRef<'a> {
    Event(&'a Event),
    End(&'a End),
}

/// Batches handed to the writer thread are about this large (their records' encoded size):
/// each hand-over wakes the writer, and a wake-up crossing cores is an interrupt to the
/// other vCPU, costly on a virtual machine.
const BATCH: usize = 1 << 20;
/// A batch is handed over at this many records too, whatever their size: a record held
/// costs memory beyond its encoded size (its slot here, an `Event`'s size), which for events
/// of a few bytes would otherwise let ten batches hold tens of MiB.
const BATCH_RECORDS: usize = 4096;
/// How many batches may wait for the writer thread before the guest waits for it.
const QUEUED_BATCHES: usize = 8;
/// How many written batches may wait to be emptied by the guest's thread (see
/// `LogWriter::spent`); the writer frees any beyond.
const SPENT_KEPT: usize = QUEUED_BATCHES + 2;
/// A batch older than this is written even if not full: what a recording killed at any
/// moment loses at most (plus the time to write it).
pub const STALE: Duration = Duration::from_millis(50);
/// The writer thread makes the log durable as it goes, every this many bytes written:
/// off the guest's thread, so that closing the log syncs only its last stretch (a sync
/// of the whole log at the end cost a 0.3 s run of `bench_io` 20–30 ms), and a host
/// crash loses at most this much of a long recording.
const SYNC_EVERY: u64 = 1 << 20;

/// A record waiting for the writer thread.
enum Queued {
    Event(Event),
    End(Box<End>),
}

/// Records waiting for the writer thread: the guest's thread keeps the events themselves
/// (their data read and frames received shared with the guest's outcome, not copied) and
/// the writer encodes them.
#[derive(Default)]
struct Batch {
    records: Vec<Queued>,
    /// The records' encoded size.
    bytes: usize,
}

impl Batch {
    /// An empty batch with room for [`BATCH_RECORDS`].
    fn with_room() -> Batch {
        Batch {
            records: Vec::with_capacity(BATCH_RECORDS),
            bytes: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    /// Empty a written batch on the guest's thread, which made its events (see
    /// `LogWriter::spent`).
    fn recycle(mut self) -> Batch {
        // Their data buffers serve this thread's next reads (see `Bytes::buffer`).
        for record in self.records.drain(..) {
            if let Queued::Event(e) = record {
                e.spare_data();
            }
        }
        self.clear();
        self
    }
}

/// The batch being filled, shared by the guest's thread (which appends) and the writer
/// thread (which takes it when it goes stale).
///
/// Invariant (chunk order): batches enter the channel only while this lock is held, and
/// the writer takes a stale batch only under it after first draining the channel, so the
/// file holds chunks in the order their records were appended.
type Pending = Arc<Mutex<Batch>>;

/// A lock of the batch being filled or of the written ones: a panic elsewhere leaves
/// batches whole (records are only pushed and taken), so a poisoned lock is taken as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Written batches handed back to the guest's thread (see `LogWriter::spent`).
type Spent = Arc<Mutex<Vec<Batch>>>;

/// The writer hands a written batch back, or frees it (after the lock) if [`SPENT_KEPT`]
/// wait already.
fn give_back(spent: &Spent, batch: Batch) {
    let mut kept = lock(spent);
    if kept.len() < SPENT_KEPT {
        kept.push(batch);
    }
}

/// Appends events to a log file.
///
/// The guest's thread only moves each event into a batch (its data read and frames
/// received shared with the guest's outcome, not copied); a writer thread encodes,
/// checksums, compresses and writes batches, so recording costs the guest little more than
/// moving each event. A batch has room for [`BATCH_RECORDS`] events inline (about 400 KiB),
/// kept from batch to batch; an idle guest's written batches are freed.
/// The writer takes a batch when the guest hands it over full, or itself when the batch
/// has waited [`STALE`] (a quiet or blocked guest appends nothing that would ship it), and
/// writes each chunk through to the file at once (not synced: that is for `finish_log`).
/// An I/O error on the writer thread is reported by the `append` that next hands over a
/// batch, or by `finish_log`.
pub struct LogWriter {
    path: PathBuf,
    pending: Pending,
    tx: Option<std::sync::mpsc::SyncSender<Batch>>,
    /// Batches the writer thread has written, for reuse (fresh memory costs page faults),
    /// still holding their events: they are emptied on the guest's thread, which made
    /// them, whenever it starts a batch. glibc's malloc frees a block into the arena of
    /// the thread that allocated it; the writer freeing the guest's events and read data
    /// put thousands of 4 KiB blocks a second into the guest's arena from another thread,
    /// and every allocation of the guest then sorted them (`bench_io`: half of what
    /// recording cost, 28 of ~70 ms). At most [`SPENT_KEPT`] wait here; a guest that
    /// appends nothing for [`STALE`] has them freed by the writer (then the frees' cost
    /// no longer matters, the memory they hold does). Emptying them sets their events'
    /// data read aside for the guest's next reads (`Event::spare_data`). The end record
    /// may come from another thread (the one that ends the run): it empties none, and
    /// what is left is freed with the writer.
    spent: Spent,
    writer: Option<std::thread::JoinHandle<Result<(), LogError>>>,
}

/// The writer thread's buffers and compressor, kept from chunk to chunk: a fresh
/// compression context and output buffer per chunk would each be mapped and unmapped
/// again (allocations this large are `mmap`s), several system calls per chunk.
struct Chunker {
    framed: Vec<u8>,
    packed: Vec<u8>,
    zstd: zstd::bulk::Compressor<'static>,
    /// Bytes written since the file was last synced.
    unsynced: u64,
}

impl Chunker {
    fn new(path: &Path) -> Result<Chunker, LogError> {
        Ok(Chunker {
            framed: Vec::with_capacity(BATCH + (64 << 10)),
            packed: Vec::new(),
            zstd: zstd::bulk::Compressor::new(1).map_err(io_err("compress", path))?,
            unsynced: 0,
        })
    }

    /// [`Chunker::write`], then a sync of the file once [`SYNC_EVERY`] bytes were
    /// written since the last.
    fn write_synced(
        &mut self,
        w: &mut BufWriter<File>,
        batch: &Batch,
        path: &Path,
    ) -> Result<(), LogError> {
        self.unsynced += self.write(w, batch, path)? as u64;
        if self.unsynced >= SYNC_EVERY {
            w.get_ref().sync_data().map_err(io_err("sync", path))?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Encode, frame (`length | crc32 | payload`), compress and write one batch of
    /// records as a chunk; the bytes written.
    fn write(&mut self, w: &mut impl Write, batch: &Batch, path: &Path) -> Result<usize, LogError> {
        // Encoding, checksums and compression are done here, off the guest's thread.
        let framed = &mut self.framed;
        framed.clear();
        for record in &batch.records {
            let at = framed.len();
            framed.extend_from_slice(&[0; 8]);
            let encoded = match record {
                Queued::Event(e) => postcard::to_io(&RecordRef::Event(e), &mut *framed),
                Queued::End(end) => postcard::to_io(&RecordRef::End(end), &mut *framed),
            };
            if let Err(e) = encoded {
                return Err(LogError::Corrupt {
                    path: path.to_path_buf(),
                    why: format!("cannot encode a record: {e}"),
                });
            }
            let len = (framed.len() - at - 8) as u32;
            let crc = crc32fast::hash(&framed[at + 8..]);
            framed[at..at + 4].copy_from_slice(&len.to_le_bytes());
            framed[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        }
        let packed = &mut self.packed;
        packed.clear();
        packed.reserve(zstd::zstd_safe::compress_bound(framed.len()));
        self.zstd
            .compress_to_buffer(framed.as_slice(), packed)
            .map_err(io_err("compress", path))?;
        let mut head = [0u8; 16];
        head[0..4].copy_from_slice(&(framed.len() as u32).to_le_bytes());
        head[4..8].copy_from_slice(&(packed.len() as u32).to_le_bytes());
        head[8..12].copy_from_slice(&crc32fast::hash(packed).to_le_bytes());
        let head_crc = crc32fast::hash(&head[..12]);
        head[12..16].copy_from_slice(&head_crc.to_le_bytes());
        // Through to the file now: a kill after this loses nothing of this chunk.
        w.write_all(&head)
            .and_then(|_| w.write_all(packed))
            .and_then(|_| w.flush())
            .map_err(io_err("write", path))?;
        Ok(head.len() + packed.len())
    }
}

impl LogWriter {
    pub fn create(path: &Path, header: &LogHeader) -> Result<Self, LogError> {
        let file = File::create(path).map_err(io_err("create", path))?;
        let mut w = BufWriter::with_capacity(256 << 10, file);
        let payload = encode(header);
        w.write_all(MAGIC)
            .and_then(|_| w.write_all(&VERSION.to_le_bytes()))
            .and_then(|_| w.write_all(&frame(&payload)))
            .and_then(|_| w.flush())
            .map_err(io_err("write", path))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(QUEUED_BATCHES);
        let spent: Spent = Arc::default();
        let thread_spent = spent.clone();
        let pending: Pending = Arc::new(Mutex::new(Batch::with_room()));
        let thread_pending = pending.clone();
        let thread_path = path.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("tandem-log".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                let path = thread_path;
                let mut chunker = Chunker::new(&path)?;
                let mut next_look = Instant::now() + STALE;
                loop {
                    let wait = next_look.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(batch) => {
                            chunker.write_synced(&mut w, &batch, &path)?;
                            give_back(&thread_spent, batch);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            next_look = Instant::now() + STALE;
                            // Never wait for the lock: the guest may hold it while it waits
                            // for this thread to take a full batch.
                            let Ok(mut batch) = thread_pending.try_lock() else {
                                continue;
                            };
                            if batch.is_empty() {
                                // Nothing appended since the guest started this batch: it
                                // empties none of the written ones soon.
                                drop(batch);
                                let idle = std::mem::take(&mut *lock(&thread_spent));
                                drop(idle);
                                continue;
                            }
                            // Chunk order: full batches sent before this one go first.
                            let mut ready: Vec<Batch> = rx.try_iter().collect();
                            ready.push(std::mem::take(&mut *batch));
                            drop(batch);
                            for b in ready {
                                chunker.write_synced(&mut w, &b, &path)?;
                                give_back(&thread_spent, b);
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                w.flush().map_err(io_err("write", &path))?;
                w.get_ref().sync_all().map_err(io_err("sync", &path))
            })
            .map_err(io_err("start a writer for", path))?;
        Ok(LogWriter {
            path: path.to_path_buf(),
            pending,
            tx: Some(tx),
            spent,
            writer: Some(writer),
        })
    }

    /// Add a record to the batch (`bytes` its encoded size); hand the batch over when it is
    /// full, or at once if it is the `last` (the end record, pushed by whatever thread ends
    /// the run: written batches are not emptied there, see `spent`).
    fn push(&mut self, record: Queued, bytes: usize, last: bool) -> Result<(), LogError> {
        let mut batch = lock(&self.pending);
        if batch.is_empty() && !last {
            // A batch begins (after a hand-over, or the writer took a stale one): empty the
            // written ones now, and fill the roomiest of them.
            if let Some(roomy) = self.empty_spent()
                && roomy.records.capacity() > batch.records.capacity()
            {
                *batch = roomy;
            }
        }
        batch.records.push(record);
        batch.bytes += bytes;
        if !last && batch.bytes < BATCH && batch.records.len() < BATCH_RECORDS {
            return Ok(());
        }
        // Sent under the lock: see `Pending` (chunk order).
        // Not `Batch::default()` unless it is the last: a fresh batch has room for a whole
        // batch of records.
        let fresh = if last {
            Batch::default()
        } else {
            self.empty_spent().unwrap_or_else(Batch::with_room)
        };
        let full = std::mem::replace(&mut *batch, fresh);
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(full).is_ok())
            .unwrap_or(false);
        drop(batch);
        if sent {
            return Ok(());
        }
        self.tx = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => Err(e),
            _ => Err(LogError::Corrupt {
                path: self.path.clone(),
                why: "the log writer stopped".into(),
            }),
        }
    }

    /// Empty every written batch on this (the guest's) thread; the roomiest of them, for
    /// reuse.
    fn empty_spent(&self) -> Option<Batch> {
        let written = std::mem::take(&mut *lock(&self.spent));
        written
            .into_iter()
            .map(Batch::recycle)
            .max_by_key(|b| b.records.capacity())
    }

    /// Append a copy of an event the caller keeps.
    pub fn record(&mut self, event: &Event) -> Result<(), LogError> {
        self.append(event.clone())
    }

    /// Write the end record and close the log, durably.
    pub fn finish_log(mut self, end: &End) -> Result<(), LogError> {
        self.push(Queued::End(Box::new(end.clone())), 0, true)?;
        self.tx = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(result)) => result,
            _ => Err(LogError::Corrupt {
                path: self.path.clone(),
                why: "the log writer stopped".into(),
            }),
        }
    }
}

impl EventSink for LogWriter {
    fn append(&mut self, event: Event) -> Result<(), LogError> {
        let bytes = event.encoded_len();
        self.push(Queued::Event(event), bytes, false)
    }

    fn finish(self: Box<Self>, end: &End) -> Result<(), LogError> {
        self.finish_log(end)
    }
}

/// Reads a log file, verifying every checksum.
pub struct LogReader {
    path: PathBuf,
    input: BufReader<File>,
    /// The current chunk, decompressed, and the read position in it.
    chunk: Vec<u8>,
    pos: usize,
    header: LogHeader,
    /// Events read so far.
    events: u64,
    end: Option<End>,
    /// The file ended (cleanly between chunks, or in a torn chunk) before an end record.
    cut: bool,
    /// What `stops_at` read ahead, for the next `next_event`.
    lookahead: Option<Result<Option<Event>, LogError>>,
}

/// What reading the next chunk found.
enum ChunkRead {
    Loaded,
    /// The end of the file, between chunks.
    Eof,
    /// The end of the file inside a chunk: a chunk whose writing was cut short.
    Torn,
}

/// Read into `buf` until it is full or the input ends; how many bytes were read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<usize, LogError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    Ok(got)
}

impl LogReader {
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let mut r = BufReader::with_capacity(256 << 10, file);
        let mut magic = [0u8; 8];
        read_exact_or(&mut r, &mut magic, path, || {
            LogError::NotALog(path.to_path_buf())
        })?;
        if &magic != MAGIC {
            return Err(LogError::NotALog(path.to_path_buf()));
        }
        let mut version = [0u8; 2];
        read_exact_or(&mut r, &mut version, path, || truncated(path, 0))?;
        let found = u16::from_le_bytes(version);
        if found != VERSION {
            return Err(LogError::Version {
                path: path.to_path_buf(),
                found,
            });
        }
        let mut cursor = ChunkCursor {
            buf: &mut Vec::new(),
            pos: 0,
            input: &mut r,
        };
        let payload = read_frame(&mut cursor, path, 0)?.ok_or_else(|| truncated(path, 0))?;
        let header: LogHeader = decode(&payload, path, "header")?;
        Ok(LogReader {
            path: path.to_path_buf(),
            input: r,
            chunk: Vec::new(),
            pos: 0,
            header,
            events: 0,
            end: None,
            cut: false,
            lookahead: None,
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
        let end = self
            .end
            .clone()
            .ok_or_else(|| truncated(&self.path, self.events))?;
        Ok((self.header, events, end))
    }

    /// Load the next chunk.
    fn next_chunk(&mut self) -> Result<ChunkRead, LogError> {
        let mut head = [0u8; 16];
        match read_up_to(&mut self.input, &mut head, &self.path)? {
            0 => return Ok(ChunkRead::Eof),
            n if n < head.len() => return Ok(ChunkRead::Torn),
            _ => {}
        }
        let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let (raw, packed_len, crc, head_crc) = (word(0), word(4), word(8), word(12));
        if crc32fast::hash(&head[..12]) != head_crc {
            return Err(self.corrupt(format!(
                "checksum mismatch in the head of the chunk after event {}",
                self.events
            )));
        }
        if raw > MAX_CHUNK || packed_len > MAX_CHUNK {
            return Err(self.corrupt(format!(
                "chunk after event {} claims {raw}/{packed_len} bytes",
                self.events
            )));
        }
        let mut packed = vec![0u8; packed_len as usize];
        if read_up_to(&mut self.input, &mut packed, &self.path)? < packed.len() {
            return Ok(ChunkRead::Torn);
        }
        if crc32fast::hash(&packed) != crc {
            return Err(self.corrupt(format!(
                "checksum mismatch in the chunk after event {}",
                self.events
            )));
        }
        self.chunk = zstd::bulk::decompress(&packed, raw as usize)
            .map_err(|e| self.corrupt(format!("undecompressable chunk: {e}")))?;
        if self.chunk.len() != raw as usize {
            return Err(self.corrupt("chunk length mismatch".into()));
        }
        self.pos = 0;
        Ok(ChunkRead::Loaded)
    }

    fn corrupt(&self, why: String) -> LogError {
        LogError::Corrupt {
            path: self.path.clone(),
            why,
        }
    }

    /// The next record; `None` where the file ends (cleanly or in a torn chunk).
    fn next_record(&mut self) -> Result<Option<Record>, LogError> {
        while self.pos == self.chunk.len() {
            match self.next_chunk()? {
                ChunkRead::Loaded => {}
                ChunkRead::Eof | ChunkRead::Torn => return Ok(None),
            }
        }
        let mut cursor = ChunkCursor {
            buf: &mut self.chunk,
            pos: self.pos,
            input: &mut io::empty(),
        };
        // A chunk is verified whole: a record running past its end is damage, not a cut.
        let payload = match read_frame(&mut cursor, &self.path, self.events) {
            Ok(Some(p)) => p,
            Ok(None) | Err(LogError::Truncated { .. }) => {
                return Err(self.corrupt(format!(
                    "record {} runs past the end of its chunk",
                    self.events
                )));
            }
            Err(e) => return Err(e),
        };
        self.pos = cursor.pos;
        decode::<Record>(&payload, &self.path, "record").map(Some)
    }

    /// The next event from the file (no lookahead).
    fn read_event(&mut self) -> Result<Option<Event>, LogError> {
        if self.end.is_some() || self.cut {
            return Ok(None);
        }
        match self.next_record()? {
            None => {
                self.cut = true;
                Ok(None)
            }
            Some(Record::Event(e)) => {
                let want = self.header.first_seq + self.events;
                if e.seq != want {
                    return Err(
                        self.corrupt(format!("event {} found where event {want} belongs", e.seq))
                    );
                }
                self.events += 1;
                Ok(Some(e))
            }
            Some(Record::End(end)) => {
                // Anything after the end record is damage.
                if self.pos != self.chunk.len() || !matches!(self.next_chunk()?, ChunkRead::Eof) {
                    return Err(self.corrupt("data after the end record".into()));
                }
                self.end = Some(end);
                Ok(None)
            }
        }
    }
}

/// Reads from a chunk buffer first, then from `input` (used for the header frame).
struct ChunkCursor<'a, R: Read + ?Sized> {
    buf: &'a mut Vec<u8>,
    pos: usize,
    input: &'a mut R,
}

impl<R: Read + ?Sized> Read for ChunkCursor<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.buf.len() {
            let n = out.len().min(self.buf.len() - self.pos);
            out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.input.read(out)
    }
}

impl EventSource for LogReader {
    fn next_event(&mut self) -> Result<Option<Event>, LogError> {
        match self.lookahead.take() {
            Some(ahead) => ahead,
            None => self.read_event(),
        }
    }

    fn tail(&mut self) -> Result<Tail, LogError> {
        if let Some(e) = self.next_event()? {
            return Ok(Tail::Event(e.seq));
        }
        Ok(match &self.end {
            Some(end) => Tail::End(end.clone()),
            None => Tail::Cut(self.header.first_seq + self.events),
        })
    }

    /// True at an [`Exit::Interrupted`] end or a cut. Not at an [`Exit::Stopped`] end: a
    /// guest stopped at a call makes that call again in replay (it is deterministic), and
    /// stopping it there, rather than wherever a check finds it, compares every output.
    fn stops_at(&mut self, events: u64) -> bool {
        if self.lookahead.is_none() {
            let ahead = self.read_event();
            self.lookahead = Some(ahead);
        }
        if !matches!(self.lookahead, Some(Ok(None))) {
            return false;
        }
        let at = self.header.first_seq + self.events;
        match &self.end {
            Some(end) => end.exit == Exit::Interrupted && end.events == events && at == events,
            None => at == events,
        }
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
    path: &Path,
    on_eof: impl FnOnce() -> LogError,
) -> Result<(), LogError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            on_eof()
        } else {
            LogError::Io {
                what: "read",
                path: path.to_path_buf(),
                source: e,
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
pub fn write_log(
    path: &Path,
    header: &LogHeader,
    events: &[Event],
    end: &End,
) -> Result<(), LogError> {
    let mut w = LogWriter::create(path, header)?;
    for e in events {
        w.record(e)?;
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
            nic: None,
            listen: vec![],
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
            assert!(
                res.is_err(),
                "flip at byte {i} of {} was accepted",
                good.len()
            );
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

    /// Read with a replay's tolerance: events until the source runs dry, then the tail.
    fn replay_read(path: &Path) -> Result<(Vec<Event>, Tail), LogError> {
        let mut r = LogReader::open(path)?;
        let mut events = Vec::new();
        while let Some(e) = r.next_event()? {
            events.push(e);
        }
        Ok((events, r.tail()?))
    }

    /// A log written in several chunks: groups of events with pauses longer than STALE,
    /// so that the writer thread writes each group while the log is still open. Returns
    /// the file length after each group, as read while the writer was still open.
    fn chunked(path: &Path, exit: Exit) -> (Vec<Event>, Vec<u64>) {
        let (h, ev, _) = sample();
        let mut w = LogWriter::create(path, &h).unwrap();
        let mut lens = Vec::new();
        for group in ev.chunks(20) {
            for e in group {
                w.record(e).unwrap();
            }
            std::thread::sleep(STALE * 4);
            lens.push(std::fs::metadata(path).unwrap().len());
        }
        let end = End {
            events: ev.len() as u64,
            exit,
            digest: [1; 32],
        };
        w.finish_log(&end).unwrap();
        (ev, lens)
    }

    #[test]
    fn a_quiet_writer_still_writes_its_events_within_a_short_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tlog");
        let (h, ev, _) = sample();
        let mut w = LogWriter::create(&path, &h).unwrap();
        for e in &ev[..20] {
            w.record(e).unwrap();
        }
        std::thread::sleep(STALE * 4);
        // The writer is still open and nothing filled a batch: a kill now loses nothing.
        let (got, tail) = replay_read(&path).unwrap();
        assert_eq!(got, ev[..20].to_vec());
        assert!(matches!(tail, Tail::Cut(20)), "{tail:?}");
        drop(w);
    }

    #[test]
    fn written_batches_go_back_to_the_guest_and_an_idle_one_holds_none_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tlog");
        let (h, _, _) = sample();
        let mut w = LogWriter::create(&path, &h).unwrap();
        // Events with data, as a read makes them: two full batches and a bit.
        let event = |seq: u64| Event {
            seq,
            kind: Kind::FdRead,
            args: 0,
            outputs: 0,
            outcome: Outcome::Data(vec![seq as u8; 4096].into()),
        };
        let n = 2 * BATCH_RECORDS as u64 + 10;
        let data = event(0).outcome;
        for seq in 0..n {
            w.append(event(seq)).unwrap();
        }
        // The guest's thread took back what was written before its last hand-over, and
        // emptied it: what waits to be emptied is at most what was written since.
        let waiting = |w: &LogWriter| -> usize {
            let kept = w.spent.lock().unwrap();
            kept.iter().map(|b| b.records.len()).sum()
        };
        assert!(waiting(&w) <= 2 * BATCH_RECORDS, "{}", waiting(&w));
        // The guest goes idle: within a few STALE periods the writer wrote the last events
        // (the last full batch, then the stale rest) and freed every written batch, so an
        // idle guest keeps no read data alive.
        std::thread::sleep(STALE * 8);
        assert!(w.spent.lock().unwrap().is_empty(), "{}", waiting(&w));
        // Nothing was lost on the way.
        let end = End {
            events: n,
            exit: Exit::Code(0),
            digest: [1; 32],
        };
        w.finish_log(&end).unwrap();
        let (_, got, end2) = LogReader::open(&path).unwrap().read_all().unwrap();
        assert_eq!(end2, end);
        assert_eq!(got.len() as u64, n);
        assert!(got.iter().enumerate().all(|(i, e)| e.seq == i as u64));
        assert_eq!(got[0].outcome, data);
    }

    #[test]
    fn emptying_a_written_batch_keeps_its_read_data_for_the_next_reads() {
        let data = crate::event::Bytes::buffer(4096);
        let at = data.as_ptr();
        let mut batch = Batch::with_room();
        let event = Event {
            seq: 0,
            kind: Kind::FdRead,
            args: 0,
            outputs: 0,
            outcome: Outcome::Data(data.into()),
        };
        batch.records.push(Queued::Event(event));
        let batch = batch.recycle();
        assert!(batch.is_empty());
        assert_eq!(crate::event::spare_buffers(), 1);
        let again = crate::event::Bytes::buffer(4096);
        assert_eq!(again.as_ptr(), at);
        assert_eq!(crate::event::spare_buffers(), 0);
    }

    #[test]
    fn a_cut_log_replays_up_to_its_last_whole_chunk_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tlog");
        let (ev, lens) = chunked(&path, Exit::Code(0));
        assert!(
            lens.windows(2).all(|w| w[0] < w[1]),
            "one chunk per group: {lens:?}"
        );
        let good = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.tlog");
        let mut last = 0;
        for at in 0..good.len() {
            std::fs::write(&cut, &good[..at]).unwrap();
            match replay_read(&cut) {
                Ok((got, Tail::Cut(n))) => {
                    assert_eq!(n as usize, got.len(), "cut at {at}");
                    assert_eq!(got[..], ev[..got.len()], "cut at {at}");
                    assert!(got.len() >= last, "cut at {at} reads fewer events");
                    // Whole groups: every event of every chunk before the cut.
                    let whole = lens.iter().filter(|&&l| l as usize <= at).count() * 20;
                    assert_eq!(got.len(), whole, "cut at {at}");
                    last = got.len();
                }
                // Inside the file header: not a log one can replay at all.
                Err(LogError::Truncated { events: 0, .. } | LogError::NotALog(_)) => {
                    assert_eq!(last, 0, "cut at {at}");
                }
                other => panic!("cut at {at}: {other:?}"),
            }
        }
        let (got, tail) = replay_read(&path).unwrap();
        assert_eq!(got, ev);
        assert!(matches!(tail, Tail::End(_)));
    }

    #[test]
    fn a_flipped_byte_in_a_chunked_log_is_damage_not_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tlog");
        chunked(&path, Exit::Code(0));
        let good = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad.tlog");
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            std::fs::write(&bad, &b).unwrap();
            let res = replay_read(&bad);
            assert!(
                res.is_err(),
                "flip at byte {i} of {} was accepted: {:?}",
                good.len(),
                res.map(|r| r.1)
            );
        }
    }

    #[test]
    fn a_source_says_where_a_recorded_run_stopped_between_events_or_was_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (h, ev, _) = sample();
        let n = ev.len() as u64;
        for (exit, stops) in [
            (Exit::Interrupted, true),
            (Exit::Stopped, false),
            (Exit::Code(0), false),
        ] {
            let path = dir.path().join("a.tlog");
            let end = End {
                events: n,
                exit: exit.clone(),
                digest: [1; 32],
            };
            write_log(&path, &h, &ev, &end).unwrap();
            let mut r = LogReader::open(&path).unwrap();
            for e in &ev {
                // Asking reads ahead; the event is still handed out next.
                assert!(!r.stops_at(e.seq), "{exit:?} at {}", e.seq);
                assert_eq!(r.next_event().unwrap().as_ref(), Some(e));
            }
            assert_eq!(r.stops_at(n), stops, "{exit:?}");
            assert!(!r.stops_at(n + 1));
            assert!(r.next_event().unwrap().is_none());
            assert!(matches!(r.tail().unwrap(), Tail::End(e) if e == end));
        }
        // A cut log (its writer still open, as if killed) stops where it was cut.
        let path = dir.path().join("cut.tlog");
        let mut w = LogWriter::create(&path, &h).unwrap();
        for e in &ev {
            w.record(e).unwrap();
        }
        std::thread::sleep(STALE * 4);
        let mut r = LogReader::open(&path).unwrap();
        for e in &ev {
            assert_eq!(r.next_event().unwrap().as_ref(), Some(e));
        }
        assert!(r.stops_at(n));
        assert!(matches!(r.tail().unwrap(), Tail::Cut(c) if c == n));
        drop(w);
    }
}
