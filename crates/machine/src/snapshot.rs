//! The snapshot file: a VM's whole future at an event boundary, in one self-checking file.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic "TNDMSNAP" | version u32 | header length u32 | header (postcard) | blake3 of all before
//! section 0 bytes | section 1 bytes | ...            (nothing after the last section)
//! ```
//!
//! The header names the module (blake3 of the *original* module, as logs do, and of the
//! instrumented module whose stack layout the stack section holds), the event position
//! (the sequence number of the next event), and for each section its kind, its stored
//! (zstd-compressed) and raw lengths and the blake3 of its stored bytes. Sections:
//! linear memory (its length, a bitmap of the 64 KiB pages that are not all zero, those
//! pages), the globals, Asyncify's stack data, and the VM state (an opaque blob its
//! owner serialises: position, output digest chain, descriptor table, clock, network).
//!
//! Invariant: [`decode`] either returns a snapshot every byte of which was checked, or a
//! typed error; nothing is handed out before the whole file is verified, so a caller can
//! never half-restore a damaged, truncated or foreign snapshot.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 8] = *b"TNDMSNAP";
/// 2: the VM state holds the guest's configuration.
/// 3: the VM state holds the output digest's open segment and an interrupted poll.
/// 4: a TCP connection's state holds its delayed acknowledgement's deadline, the VM's the
/// event by which delayed acknowledgements go.
pub const VERSION: u32 = 4;
/// A wasm page.
pub const PAGE: usize = 65536;
/// No honest header comes near this (it lists a handful of sections).
const MAX_HEADER: u32 = 1 << 16;
/// Nor a section: 4 GiB of memory plus its bitmap and length, with room to spare.
const MAX_RAW: u64 = 5 << 30;
const PREAMBLE: usize = 8 + 4 + 4;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a Tandem snapshot")]
    NotSnapshot,
    #[error("snapshot format version {0} (this Tandem reads version {VERSION})")]
    Version(u32),
    #[error("truncated snapshot ({0})")]
    Truncated(String),
    #[error("damaged snapshot: {0}")]
    Damaged(String),
    #[error("the snapshot is of another module (snapshot {snapshot}, given {given})")]
    OtherModule { snapshot: String, given: String },
    #[error(
        "the snapshot was taken under another instrumentation of this module (another \
         wasm-opt?): its stack cannot be restored here"
    )]
    OtherInstrumentation,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The value of one global, by its bits (floats included, so NaN payloads survive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalValue {
    I32(i32),
    I64(i64),
    F32(u32),
    F64(u64),
    V128(u128),
}

/// Everything a VM's future depends on at one event boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// blake3 of the original module.
    pub module_digest: [u8; 32],
    /// blake3 of the instrumented module the stack data belongs to.
    pub instrumented_digest: [u8; 32],
    /// The sequence number of the next event.
    pub events: u64,
    /// Linear memory, whole (a multiple of [`PAGE`] bytes).
    pub memory: Vec<u8>,
    /// Every global, in index order.
    pub globals: Vec<GlobalValue>,
    /// Asyncify's saved stack (the bytes between the buffer's start and its current
    /// position after the unwind).
    pub stack: Vec<u8>,
    /// The VM state, serialised by its owner.
    pub vm: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
enum Kind {
    Memory = 1,
    Globals = 2,
    Stack = 3,
    Vm = 4,
}

const KINDS: [Kind; 4] = [Kind::Memory, Kind::Globals, Kind::Stack, Kind::Vm];

#[derive(Debug, Serialize, Deserialize)]
struct SectionEntry {
    kind: Kind,
    raw_len: u64,
    stored_len: u64,
    checksum: [u8; 32],
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    module_digest: [u8; 32],
    instrumented_digest: [u8; 32],
    events: u64,
    sections: Vec<SectionEntry>,
}

/// What [`peek`] tells without reading the sections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub module_digest: [u8; 32],
    pub instrumented_digest: [u8; 32],
    pub events: u64,
    /// The file's length.
    pub bytes: u64,
}

/// Memory as stored: its length, a bitmap of the pages not all zero, those pages.
fn encode_memory(memory: &[u8]) -> Vec<u8> {
    let pages = memory.len().div_ceil(PAGE);
    let mut out = (memory.len() as u64).to_le_bytes().to_vec();
    let bitmap_at = out.len();
    out.resize(bitmap_at + pages.div_ceil(8), 0);
    for (i, page) in memory.chunks(PAGE).enumerate() {
        if page.iter().any(|&b| b != 0) {
            out[bitmap_at + i / 8] |= 1 << (i % 8);
            out.extend_from_slice(page);
        }
    }
    out
}

fn decode_memory(raw: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let bad = |why: &str| SnapshotError::Damaged(format!("memory section: {why}"));
    let len = raw
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .ok_or_else(|| bad("no length"))?;
    if len > MAX_RAW || !(len as usize).is_multiple_of(PAGE) {
        return Err(bad("impossible length"));
    }
    let len = len as usize;
    let pages = len / PAGE;
    let bitmap = raw
        .get(8..8 + pages.div_ceil(8))
        .ok_or_else(|| bad("no page bitmap"))?;
    let mut data = &raw[8 + bitmap.len()..];
    let mut memory = vec![0u8; len];
    for i in 0..pages {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            let page = data.get(..PAGE).ok_or_else(|| bad("pages missing"))?;
            memory[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
            data = &data[PAGE..];
        }
    }
    if !data.is_empty() {
        return Err(bad("bytes after the last page"));
    }
    Ok(memory)
}

/// The memory section compressed as it is laid out, never laid out whole first (a
/// snapshot of a large memory would otherwise hold it three times over while it is
/// written): its raw length and stored bytes.
fn compress_memory(memory: &[u8]) -> (u64, Vec<u8>) {
    let pages = memory.len().div_ceil(PAGE);
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    let mut kept = 0;
    for (i, page) in memory.chunks(PAGE).enumerate() {
        if page.iter().any(|&b| b != 0) {
            bitmap[i / 8] |= 1 << (i % 8);
            kept += page.len();
        }
    }
    let raw_len = (8 + bitmap.len() + kept) as u64;
    let streamed = (|| {
        let mut z = zstd::stream::write::Encoder::new(Vec::new(), 1)?;
        z.set_pledged_src_size(Some(raw_len))?;
        z.write_all(&(memory.len() as u64).to_le_bytes())?;
        z.write_all(&bitmap)?;
        for (i, page) in memory.chunks(PAGE).enumerate() {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                z.write_all(page)?;
            }
        }
        z.finish()
    })();
    match streamed {
        Ok(stored) => (raw_len, stored),
        // Not seen (compressing into memory), but never a panic: the laid-out way.
        Err(_) => {
            let raw = encode_memory(memory);
            let stored = zstd::bulk::compress(&raw, 1).unwrap_or_else(|_| raw.clone());
            (raw.len() as u64, stored)
        }
    }
}

/// The snapshot as a file's bytes.
pub fn encode(s: &Snapshot) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_to(&mut out, s);
    out
}

/// Write the snapshot's bytes to `w` (the sections are compressed first, one at a time,
/// and written where they are: the file's bytes are never gathered whole); how many.
pub fn write_to(w: &mut impl Write, s: &Snapshot) -> std::io::Result<u64> {
    let mut sections = Vec::new();
    let mut bodies = Vec::new();
    for kind in KINDS {
        // Level 1: snapshots are taken with the VM paused; speed matters more than size,
        // and zero pages are already gone.
        let (raw_len, stored) = match kind {
            Kind::Memory => compress_memory(&s.memory),
            _ => {
                let raw = match kind {
                    // Serialising plain vectors of plain values to a Vec cannot fail.
                    Kind::Globals => postcard::to_stdvec(&s.globals).unwrap_or_default(),
                    Kind::Stack => s.stack.clone(),
                    Kind::Vm | Kind::Memory => s.vm.clone(),
                };
                let stored = zstd::bulk::compress(&raw, 1).unwrap_or_else(|_| raw.clone());
                (raw.len() as u64, stored)
            }
        };
        sections.push(SectionEntry {
            kind,
            raw_len,
            stored_len: stored.len() as u64,
            checksum: *blake3::hash(&stored).as_bytes(),
        });
        bodies.push(stored);
    }
    let header = Header {
        module_digest: s.module_digest,
        instrumented_digest: s.instrumented_digest,
        events: s.events,
        sections,
    };
    let header = postcard::to_stdvec(&header).unwrap_or_default();
    let mut head = Vec::with_capacity(PREAMBLE + header.len() + 32);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(header.len() as u32).to_le_bytes());
    head.extend_from_slice(&header);
    let checksum = blake3::hash(&head);
    head.extend_from_slice(checksum.as_bytes());
    w.write_all(&head)?;
    let mut written = head.len() as u64;
    for b in bodies {
        w.write_all(&b)?;
        written += b.len() as u64;
    }
    Ok(written)
}

/// Check the preamble and the header; returns the header and where the sections start.
fn header(bytes: &[u8]) -> Result<(Header, usize), SnapshotError> {
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(if MAGIC.starts_with(bytes) {
            SnapshotError::Truncated("in the magic".into())
        } else {
            SnapshotError::NotSnapshot
        });
    }
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| SnapshotError::Truncated("in the preamble".into()))
    };
    let version = u32_at(8)?;
    if version != VERSION {
        return Err(SnapshotError::Version(version));
    }
    let header_len = u32_at(12)?;
    if header_len > MAX_HEADER {
        return Err(SnapshotError::Damaged("impossible header length".into()));
    }
    let end = PREAMBLE + header_len as usize;
    let Some(checksum) = bytes.get(end..end + 32) else {
        return Err(SnapshotError::Truncated("in the header".into()));
    };
    if blake3::hash(&bytes[..end]).as_bytes() != checksum {
        return Err(SnapshotError::Damaged("header checksum mismatch".into()));
    }
    let header: Header = postcard::from_bytes(&bytes[PREAMBLE..end])
        .map_err(|e| SnapshotError::Damaged(format!("header: {e}")))?;
    let kinds: Vec<Kind> = header.sections.iter().map(|s| s.kind).collect();
    if kinds != KINDS {
        return Err(SnapshotError::Damaged("unexpected sections".into()));
    }
    let mut total = (end + 32) as u64;
    for s in &header.sections {
        if s.raw_len > MAX_RAW || s.stored_len > MAX_RAW {
            return Err(SnapshotError::Damaged("impossible section length".into()));
        }
        total += s.stored_len;
    }
    match (bytes.len() as u64).cmp(&total) {
        std::cmp::Ordering::Less => {
            return Err(SnapshotError::Truncated(format!(
                "{} of {total} bytes",
                bytes.len()
            )));
        }
        std::cmp::Ordering::Greater => {
            return Err(SnapshotError::Damaged(
                "bytes after the last section".into(),
            ));
        }
        std::cmp::Ordering::Equal => {}
    }
    Ok((header, end + 32))
}

/// What a snapshot's header says, after checking the header (not the sections).
pub fn peek(bytes: &[u8]) -> Result<Summary, SnapshotError> {
    let (h, _) = header(bytes)?;
    Ok(Summary {
        module_digest: h.module_digest,
        instrumented_digest: h.instrumented_digest,
        events: h.events,
        bytes: bytes.len() as u64,
    })
}

/// Check and decode a whole snapshot of the module whose original digest is `module`
/// (and, if given, whose instrumented digest is `instrumented`).
pub fn decode(
    bytes: &[u8],
    module: &[u8; 32],
    instrumented: Option<&[u8; 32]>,
) -> Result<Snapshot, SnapshotError> {
    let (h, mut at) = header(bytes)?;
    if &h.module_digest != module {
        return Err(SnapshotError::OtherModule {
            snapshot: crate::vm::hex(&h.module_digest[..8]),
            given: crate::vm::hex(&module[..8]),
        });
    }
    if instrumented.is_some_and(|d| d != &h.instrumented_digest) {
        return Err(SnapshotError::OtherInstrumentation);
    }
    let mut raws = Vec::new();
    for s in &h.sections {
        let stored = &bytes[at..at + s.stored_len as usize];
        at += s.stored_len as usize;
        if blake3::hash(stored).as_bytes() != &s.checksum {
            return Err(SnapshotError::Damaged(format!(
                "{:?} section checksum mismatch",
                s.kind
            )));
        }
        // Streamed, not sized by the header: memory is only taken for bytes the section
        // really holds, whatever length a crafted header claims.
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::with_buffer(stored)
            .and_then(|d| {
                use std::io::Read;
                d.take(s.raw_len + 1).read_to_end(&mut raw)
            })
            .map_err(|e| SnapshotError::Damaged(format!("{:?} section: {e}", s.kind)))?;
        if raw.len() as u64 != s.raw_len {
            return Err(SnapshotError::Damaged(format!(
                "{:?} section length mismatch",
                s.kind
            )));
        }
        raws.push(raw);
    }
    let mut raws = raws.into_iter();
    let mut next = || raws.next().unwrap_or_default();
    let memory = decode_memory(&next())?;
    let globals: Vec<GlobalValue> = postcard::from_bytes(&next())
        .map_err(|e| SnapshotError::Damaged(format!("globals section: {e}")))?;
    Ok(Snapshot {
        module_digest: h.module_digest,
        instrumented_digest: h.instrumented_digest,
        events: h.events,
        memory,
        globals,
        stack: next(),
        vm: next(),
    })
}

/// Write a snapshot to `path` durably and atomically: a temporary file beside it, synced,
/// renamed over `path`, the folder synced. Returns the file's length.
/// A random number for a temporary name (it only has to defeat guessing).
fn nonce() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is writable for its length for the duration of the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == b.len() as isize {
        u64::from_le_bytes(b)
    } else {
        // No entropy is no reason to fail a snapshot: the exclusive create still refuses
        // anything planted at the name.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

pub fn write_file(path: &Path, s: &Snapshot) -> Result<u64, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    // A fresh name, created exclusively and never through a link: a file or link planted
    // at a predictable name is never written through.
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        nonce()
    ));
    let result = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
        let written = write_to(&mut out, s)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()?;
        Ok(written)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Read and check the snapshot at `path` (see [`decode`]).
pub fn read_file(
    path: &Path,
    module: &[u8; 32],
    instrumented: Option<&[u8; 32]>,
) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes, module, instrumented)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_compressed_as_laid_out_is_the_laid_out_section() {
        let memory = sample().memory;
        let (raw_len, stored) = compress_memory(&memory);
        let raw = encode_memory(&memory);
        assert_eq!(raw_len, raw.len() as u64);
        assert_eq!(zstd::stream::decode_all(&stored[..]).unwrap(), raw);
        // Written to a sink or gathered, the same bytes.
        let mut out = Vec::new();
        let n = write_to(&mut out, &sample()).unwrap();
        assert_eq!(n, out.len() as u64);
        assert_eq!(out, encode(&sample()));
    }

    fn sample() -> Snapshot {
        let mut memory = vec![0u8; 5 * PAGE];
        memory[3] = 1; // page 0
        memory[3 * PAGE + 100..3 * PAGE + 200].fill(0xab); // page 3
        memory[5 * PAGE - 1] = 9; // page 4, last byte
        Snapshot {
            module_digest: [7; 32],
            instrumented_digest: [8; 32],
            events: 1234,
            memory,
            globals: vec![
                GlobalValue::I32(-5),
                GlobalValue::I64(1 << 40),
                GlobalValue::F32(f32::NAN.to_bits() | 1),
                GlobalValue::F64(2.5f64.to_bits()),
                GlobalValue::V128(u128::MAX - 3),
            ],
            stack: (0..200u8).collect(),
            vm: b"opaque vm state".to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes, &[7; 32], Some(&[8; 32])).unwrap(), s);
        assert_eq!(decode(&bytes, &[7; 32], None).unwrap(), s);
        let p = peek(&bytes).unwrap();
        assert_eq!((p.events, p.bytes), (1234, bytes.len() as u64));
        // An empty memory and empty sections round-trip too.
        let empty = Snapshot {
            memory: vec![],
            globals: vec![],
            stack: vec![],
            vm: vec![],
            ..s
        };
        assert_eq!(decode(&encode(&empty), &[7; 32], None).unwrap(), empty);
    }

    #[test]
    fn zero_pages_are_skipped() {
        let s = sample();
        let raw = encode_memory(&s.memory);
        // Length, one bitmap byte, and three of the five pages.
        assert_eq!(raw.len(), 8 + 1 + 3 * PAGE);
        assert_eq!(raw[8], 0b11001);
        assert_eq!(decode_memory(&raw).unwrap(), s.memory);
        // A memory of zero pages only is stored as its length and bitmap.
        assert_eq!(encode_memory(&vec![0; 64 * PAGE]).len(), 8 + 8);
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                match decode(&b, &[7; 32], Some(&[8; 32])) {
                    Err(
                        SnapshotError::NotSnapshot
                        | SnapshotError::Version(_)
                        | SnapshotError::Damaged(_)
                        | SnapshotError::Truncated(_),
                    ) => {}
                    other => panic!("byte {i} ^ {flip:#x}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_refused_and_so_are_extra_bytes() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            let r = decode(&bytes[..len], &[7; 32], None);
            assert!(
                matches!(r, Err(SnapshotError::Truncated(_))),
                "{len} bytes: {r:?}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer, &[7; 32], None),
            Err(SnapshotError::Damaged(_))
        ));
    }

    #[test]
    fn another_module_is_refused() {
        let bytes = encode(&sample());
        let e = decode(&bytes, &[6; 32], None).unwrap_err();
        assert!(matches!(e, SnapshotError::OtherModule { .. }), "{e}");
        assert!(e.to_string().contains("0707070707070707"), "{e}");
        assert!(matches!(
            decode(&bytes, &[7; 32], Some(&[9; 32])),
            Err(SnapshotError::OtherInstrumentation)
        ));
        assert!(matches!(
            decode(b"\0asm\x01\0\0\0 something else", &[7; 32], None),
            Err(SnapshotError::NotSnapshot)
        ));
    }

    #[test]
    fn files_are_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        let s = sample();
        let n = write_file(&path, &s).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), n);
        assert_eq!(read_file(&path, &[7; 32], None).unwrap(), s);
        // Overwriting replaces it; no temporary file is left behind.
        let s2 = Snapshot { events: 99, ..s };
        write_file(&path, &s2).unwrap();
        assert_eq!(read_file(&path, &[7; 32], None).unwrap().events, 99);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(matches!(
            read_file(&dir.path().join("missing"), &[7; 32], None),
            Err(SnapshotError::Io { .. })
        ));
    }
}
