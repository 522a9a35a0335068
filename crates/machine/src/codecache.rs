//! The compiled-code cache: a guest module's machine code, compiled once by wasmtime and
//! kept on disk, so that a second start of the same module (a secondary's start, an HA
//! restart, a migration's destination) loads it instead of compiling it again.
//!
//! This module owns the cache's folder, the format of its entries and the decision
//! whether an entry may be run.
//!
//! **Key.** An entry is named by blake3 of: the bytes of the module actually compiled
//! (for a snapshot-capable copy, the Asyncify-instrumented module, not the original),
//! the engine's configuration ([`crate::vm::engine_fingerprint`]'s parts: wasmtime's own
//! compatibility hash of the deterministic engine and Tandem's format versions) and
//! Tandem's version. A module, an engine setting or a Tandem release that differs gets
//! another name, so a stale entry is never found.
//!
//! **Entry.** `MAGIC`, [`VERSION`], the key, the payload's length and its blake3, then the
//! payload: what `Module::serialize` wrote. Before anything is deserialized the whole file
//! is read (at most [`MAX_ENTRY`] bytes) and every header field checked; the payload's
//! hash must match. A damaged entry (a flipped byte, a truncated file, another key's
//! entry renamed into place, a foreign file) is reported in the log, deleted and rebuilt:
//! it is never run. wasmtime checks its own header (its version and the engine's
//! compatibility) once more when deserializing; a refusal there is handled the same way.
//!
//! **Trust.** Deserialized code runs unchecked, so only files this user wrote are read:
//! the folder must belong to this user and not be writable by anyone else, and so must
//! each entry (a regular file, not a link). The payload's hash detects accidental damage,
//! not a forger who can already write the folder (who could run code as this user anyway).
//!
//! **Concurrency.** An entry is written to a temporary name in the same folder, closed,
//! then renamed into place: a reader sees a whole entry or none. It is never synced (file
//! or folder): an entry that a crash left empty or torn under its final name is rejected
//! by the checks above and rebuilt, like any damaged one (syncing 7 MB of code cost a
//! first start 0.07–0.2 s here). Two processes starting
//! the same module at once both compile and both rename; the last rename wins and either
//! entry is valid. The cache only ever speeds a start up: a folder that cannot be made,
//! read or written is reported and the module compiled as if there were no cache.
//!
//! **Seen.** A hit or a miss is a debug line (`TANDEM_LOG=machine::codecache=debug`: an
//! error's output stays one line); a rejected entry, a folder not used or an entry not
//! stored is a warning.
//!
//! **Where.** [`set`] (the `--code-cache DIR` / `--no-code-cache` flags) wins; else
//! `$TANDEM_CODE_CACHE` (`off` turns the cache off); else the folder `code` in the
//! instrumented-module cache's folder ([`crate::asyncify::cache_dir`], itself
//! `$TANDEM_CACHE_DIR`, `$XDG_CACHE_HOME/tandem`, ...). A cluster's agent points its copies
//! at a folder on shared storage, so a copy started on another host finds the code that
//! the first copy compiled.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use wasmtime::{Engine, Module};

/// The first bytes of every entry.
pub const MAGIC: &[u8; 8] = b"TNDMCODE";
/// The entry format's version.
pub const VERSION: u32 = 1;
/// magic, version, key, payload length, payload hash.
pub const HEADER_LEN: usize = 8 + 4 + 32 + 8 + 32;
/// The largest entry read from disk (the compiled code of a 24 MB module is about 60 MB).
pub const MAX_ENTRY: u64 = 1 << 30;
/// The extension of an entry's file name.
const EXT: &str = "cwasm";

/// Where compiled code is cached, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    Off,
    Dir(PathBuf),
}

static SETTING: Mutex<Option<Setting>> = Mutex::new(None);

/// Choose the cache for this process (the command line's flags): it overrides the
/// environment.
pub fn set(setting: Setting) {
    *SETTING.lock().unwrap_or_else(|p| p.into_inner()) = Some(setting);
}

/// The cache this process uses (see the module docs).
pub fn current() -> Setting {
    if let Some(s) = SETTING.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return s;
    }
    match std::env::var_os("TANDEM_CODE_CACHE") {
        Some(v) if v == "off" => Setting::Off,
        Some(v) if !v.is_empty() => Setting::Dir(PathBuf::from(v)),
        _ => Setting::Dir(crate::asyncify::cache_dir().join("code")),
    }
}

/// How a module's code was obtained, for the start-up log line and the benchmarks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Loaded from the cache.
    Hit,
    /// Not in the cache: compiled (and stored, unless `unstored` says why not).
    Compiled { unstored: Option<String> },
    /// An entry was there but rejected (why): deleted, the module compiled and stored again.
    Rebuilt { why: String },
    /// No cache: compiled.
    Off,
}

/// Errors of the cache itself. None of them fails a start: they are logged and the module
/// compiled.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the folder {0} is not this user's alone (owned by another user, or writable by others): not used"
    )]
    Untrusted(PathBuf),
    #[error("{0}")]
    Rejected(String),
}

/// The key of `module`'s code under `engine`.
pub fn key(engine: &Engine, module: &[u8]) -> [u8; 32] {
    let mut k = blake3::Hasher::new();
    k.update(b"tandem compiled code\0");
    k.update(blake3::hash(module).as_bytes());
    k.update(crate::vm::fingerprint_of(engine).as_bytes());
    k.update(env!("CARGO_PKG_VERSION").as_bytes());
    *k.finalize().as_bytes()
}

/// The file an entry of `key` has in `dir`.
pub fn entry_path(dir: &Path, key: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.{EXT}", crate::vm::hex(key)))
}

/// Compile `bytes` under `engine`, through the cache [`current`] names. Compilation
/// errors are wasmtime's; the cache's own are logged (see [`CacheError`]).
pub fn load_or_compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<(Module, Source)> {
    let started = Instant::now();
    let dir = match current() {
        Setting::Off => return Ok((compile(engine, bytes)?, Source::Off)),
        Setting::Dir(d) => d,
    };
    let key = key(engine, bytes);
    let path = entry_path(&dir, &key);
    let short = crate::vm::hex(&key[..6]);
    let mut rejected = None;
    match read_entry(&dir, &path, &key) {
        Ok(Some(entry)) => {
            let payload = &entry[HEADER_LEN..];
            // SAFETY: `payload` is exactly what `Module::serialize` wrote for this module
            // under an engine of this configuration and this Tandem version: it was read
            // whole from a file that this user alone can write (folder and file checked),
            // its header names this key (module digest, engine fingerprint, version) and
            // its blake3 matches the hash written with it, so it is neither damaged nor
            // another module's code. wasmtime also checks its own header (version, engine
            // compatibility) and refuses a mismatch, handled below as a rejected entry.
            match unsafe { Module::deserialize(engine, payload) } {
                Ok(m) => {
                    tracing::debug!(
                        "code cache: hit {short}: {} loaded in {:.3} s",
                        path.display(),
                        started.elapsed().as_secs_f64()
                    );
                    return Ok((m, Source::Hit));
                }
                Err(e) => rejected = Some(format!("wasmtime refused it: {e}")),
            }
        }
        Ok(None) => {}
        Err(CacheError::Rejected(why)) => rejected = Some(why),
        Err(e) => {
            tracing::warn!("code cache: {e}; compiling without it");
            let m = compile(engine, bytes)?;
            return Ok((
                m,
                Source::Compiled {
                    unstored: Some(e.to_string()),
                },
            ));
        }
    }
    if let Some(why) = &rejected {
        tracing::warn!(
            "code cache: entry {} rejected ({why}): deleted, compiling again",
            path.display()
        );
        remove_entry(&path);
    }
    let m = compile(engine, bytes)?;
    let compiled = started.elapsed().as_secs_f64();
    let unstored = match m.serialize() {
        Ok(payload) => store(&dir, &path, &key, &payload)
            .err()
            .map(|e| e.to_string()),
        Err(e) => Some(format!("serialize: {e}")),
    };
    match &unstored {
        None => tracing::debug!(
            "code cache: miss {short}: compiled in {compiled:.3} s, stored as {}",
            path.display()
        ),
        Some(why) => tracing::warn!(
            "code cache: miss {short}: compiled in {compiled:.3} s, not stored: {why}"
        ),
    }
    Ok((
        m,
        match rejected {
            Some(why) => Source::Rebuilt { why },
            None => Source::Compiled { unstored },
        },
    ))
}

/// wasmtime's compile of `bytes`, with the memory its threads free kept from going back
/// to the kernel while it runs.
///
/// The compiler's threads allocate and free at a high rate; glibc's malloc gives the top
/// of a heap back to the kernel as soon as 128 KiB of it are free and maps it again at the
/// next allocation, each give-back a TLB shoot-down interrupting the other cores: a sixth
/// of a first start here (a 10 MB module: 1.17 s, 1.02 s without). So the trim threshold
/// is raised while any compile runs in this process, and put back to glibc's default once
/// the last one ended, when what they freed is given back at once.
fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Module> {
    let _heap = CompileHeap::enter();
    Module::new(engine, bytes)
}

/// While one lives, glibc keeps freed memory (see [`compile`]); counted, so that
/// concurrent compiles put the threshold back only when the last one ends.
struct CompileHeap;

static COMPILING: Mutex<usize> = Mutex::new(0);

impl CompileHeap {
    fn enter() -> CompileHeap {
        let mut n = COMPILING.lock().unwrap_or_else(|p| p.into_inner());
        if *n == 0 {
            set_trim_threshold(1 << 30, false);
        }
        *n += 1;
        CompileHeap
    }
}

impl Drop for CompileHeap {
    fn drop(&mut self) {
        let mut n = COMPILING.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            set_trim_threshold(128 << 10, true);
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_trim_threshold(bytes: i32, trim: bool) {
    // SAFETY: mallopt(3) and malloc_trim(3) only adjust and trim glibc's own heaps, are
    // thread-safe, and take plain integers.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, bytes);
        if trim {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_trim_threshold(_bytes: i32, _trim: bool) {}

/// Whether `meta` (a folder or an entry) is this user's alone.
fn owned_alone(meta: &std::fs::Metadata) -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    meta.uid() == me && meta.mode() & 0o022 == 0
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The entry at `path`, checked (its payload follows [`HEADER_LEN`] bytes of header);
/// `None` when there is none.
fn read_entry(dir: &Path, path: &Path, key: &[u8; 32]) -> Result<Option<Vec<u8>>, CacheError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if !m.is_dir() || !owned_alone(&m) => {
            return Err(CacheError::Untrusted(dir.to_path_buf()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(dir)(e)),
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a link: ELOOP. Not ours: rejected (and deleted).
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(CacheError::Rejected("a symbolic link".into()));
        }
        Err(e) => return Err(io(path)(e)),
    };
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() || !owned_alone(&meta) {
        return Err(CacheError::Rejected(
            "not a regular file of this user's alone".into(),
        ));
    }
    if meta.len() > MAX_ENTRY {
        return Err(CacheError::Rejected(format!(
            "{} bytes, over the bound of {MAX_ENTRY}",
            meta.len()
        )));
    }
    let mut all = Vec::with_capacity(meta.len() as usize);
    // The bound holds even if the file grows while read.
    file.take(MAX_ENTRY + 1)
        .read_to_end(&mut all)
        .map_err(io(path))?;
    check_entry(&all, key).map(|()| Some(all))
}

/// Check an entry's header against `key` and its payload against the hash it carries.
pub fn check_entry(all: &[u8], key: &[u8; 32]) -> Result<(), CacheError> {
    let reject = |why: &str| Err(CacheError::Rejected(why.to_string()));
    if all.len() < HEADER_LEN {
        return reject("shorter than its header (truncated)");
    }
    if &all[..8] != MAGIC {
        return reject("no entry magic (not a Tandem code cache entry)");
    }
    let version = u32::from_le_bytes(all[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(CacheError::Rejected(format!(
            "entry format {version}, this Tandem writes {VERSION}"
        )));
    }
    if &all[12..44] != key {
        return reject("its header names another key (another module, engine or version)");
    }
    let len = u64::from_le_bytes(all[44..52].try_into().unwrap_or_default());
    let payload = &all[HEADER_LEN..];
    if len != payload.len() as u64 {
        return Err(CacheError::Rejected(format!(
            "its payload is {} bytes, its header says {len} (truncated?)",
            payload.len()
        )));
    }
    if blake3::hash(payload).as_bytes() != &all[52..84] {
        return reject("its payload does not match its hash (damaged)");
    }
    Ok(())
}

/// An entry's bytes: header and payload.
pub fn encode_entry(key: &[u8; 32], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(payload).as_bytes());
    out.extend_from_slice(payload);
    out
}

fn remove_entry(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("code cache: cannot delete {}: {e}", path.display());
    }
}

/// A temporary file this old was left by a process killed while writing it (a write takes
/// seconds).
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Delete the temporary files of writers killed mid-write, which would otherwise pile up.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    for e in list.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(".code.") && name.ends_with(".tmp")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMPORARY);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Write an entry: a temporary file beside it, closed, then renamed into place (not synced:
/// see the module docs).
fn store(dir: &Path, path: &Path, key: &[u8; 32], payload: &[u8]) -> Result<(), CacheError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if !meta.is_dir() || !owned_alone(&meta) {
        return Err(CacheError::Untrusted(dir.to_path_buf()));
    }
    remove_stale_temporaries(dir);
    let tmp = crate::asyncify::temp_name(dir, "code");
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&encode_entry(key, payload))?;
        // Closed before the rename: on NFS (a cluster's shared cache) the close sends the
        // written pages, so a host that opens the new name reads all of it.
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_checked_before_use() {
        let key = [7u8; 32];
        let payload = b"compiled code".to_vec();
        let good = encode_entry(&key, &payload);
        assert!(check_entry(&good, &key).is_ok());
        // Another key's entry.
        assert!(check_entry(&good, &[8u8; 32]).is_err());
        // Every single flipped byte, header or payload, is caught.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(check_entry(&bad, &key).is_err(), "byte {i} flipped");
        }
        // Every truncation too.
        for n in 0..good.len() {
            assert!(check_entry(&good[..n], &key).is_err(), "cut at {n}");
        }
    }
}
