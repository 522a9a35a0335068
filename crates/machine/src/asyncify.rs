//! Instrumenting a guest module for snapshots: Binaryen's Asyncify, and every global
//! exported.
//!
//! wasmtime cannot save a stack with wasm frames on it, so a module that may be
//! snapshotted is rewritten by Binaryen's Asyncify pass (`wasm-opt` from Debian's
//! `binaryen`, found on `PATH` or at `$TANDEM_WASM_OPT`). Asyncify turns every function
//! that can reach one of the listed imports ([`EVENT_IMPORTS`]: the WASI calls that take
//! events, and only those) by direct calls (indirect ones are left alone: see
//! [`WASM_OPT_ARGS`]) into one that can *unwind* (save its locals and its position,
//! return to its caller) and later *rewind* (be called again, skip to where it was,
//! restore its locals). The runtime protocol, as the instrumented module exports it:
//!
//! - `asyncify_start_unwind(data)`: called by an import; when the import returns, every
//!   frame down to the export that was entered saves itself to the buffer `data` names
//!   and returns. The host then calls `asyncify_stop_unwind()`.
//! - `asyncify_start_rewind(data)`, then call the same export again: every frame restores
//!   itself from the buffer and calls on towards the import, which is called again; the
//!   import calls `asyncify_stop_rewind()` and returns normally.
//! - `data` points at two little-endian u32 in memory 0: the buffer's *current* position
//!   (unwinding pushes frames from there upwards; rewinding pops them back) and its *end*
//!   (an unwind that would pass it traps).
//!
//! **Where the buffer lives.** Binaryen 108 (Debian 12) can only put it in memory 0, the
//! guest's own memory: the pass argument that moves it to a memory of its own
//! (`asyncify-in-secondary-memory`) arrived in version 111 and version 108 silently
//! ignores it (checked: the output still has one memory). Tandem therefore *borrows* a
//! region of the guest's memory ([`crate::capture`]): its bytes are saved by the host
//! before an unwind or a rewind and put back before the guest runs a single instruction
//! of its own again. While the region holds Asyncify's data only Asyncify's save and
//! restore code runs (an unwinding frame returns at once; a rewinding one skips to its
//! call), so the guest can never observe the buffer. With Binaryen ≥ 111 the secondary
//! memory would make the borrowing unnecessary; see [`WASM_OPT_ARGS`].
//!
//! **Globals.** A snapshot must hold every global, mutable or not, exported or not (the
//! shadow stack pointer is an unexported mutable global). As Wizer does, Tandem adds an
//! export `tandem:global:N` for every global N of the module ([`export_globals`]), after
//! Asyncify (whose own two globals are then exported too).
//!
//! **What a snapshot need not hold.** Tables and data/element segments are immutable
//! after instantiation unless the code mutates them (`table.set/grow/fill/copy/init`,
//! `elem.drop`, `data.drop`, `memory.init`): a module with such an instruction is refused
//! ([`InstrumentError::Unsupported`]); any other module's tables are exactly those a fresh
//! instance has. (C compiled for wasm32-wasi without threads has none of them.)
//!
//! **Cache.** Instrumenting takes about a second, so results are cached by the digest of
//! the original module and of the instrumentation itself (wasm-opt's version and
//! arguments, this module's transform version): `$TANDEM_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/tandem`, else `$HOME/.cache/tandem`, else `/var/cache/tandem`; created
//! owner-only, written to a temporary file, synced, then renamed into place, so readers
//! never see a partial file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// The WASI imports that take events, and so the only places a snapshot is taken: the
/// only imports Asyncify instruments calls to. (`fd_tell`, the argument and environment
/// calls, `fd_fdstat_*`, `fd_prestat_*`, `sched_yield`, `proc_exit`, `proc_raise` and
/// `sock_shutdown` take none.)
pub const EVENT_IMPORTS: &[&str] = &[
    "clock_time_get",
    "random_get",
    "poll_oneoff",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_sync",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_write",
    "path_create_directory",
    "path_remove_directory",
    "path_unlink_file",
    "path_rename",
    "path_symlink",
    "path_link",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_readlink",
    "path_open",
    "sock_accept",
    "sock_recv",
    "sock_send",
];

/// The WASI module every event import comes from.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// wasm-opt's arguments besides the input and output files.
///
/// `asyncify-ignore-indirect`: an indirect call (a C function pointer: wasi-libc's stdio,
/// a server's command table) is taken never to reach an event import, so neither the call
/// site nor, for its sake, every function that makes one is instrumented. Without it,
/// Asyncify must assume any indirect call may unwind, and a call-heavy guest pays on most
/// of its code: kvd's replay took ~1.5× the CPU of the plain module (2026-11-29), about
/// the same as the plain module with it. The price is that an event import reached
/// through an indirect call is no snapshot point: [`CallFacts`] tells such a stack, and
/// the snapshot waits for the guest's next event import reached by direct calls alone
/// (see [`crate::capture`]).
///
/// Then Binaryen's `-O2` pipeline (version 108's, pass by pass), which removes most of
/// what Asyncify adds to code that never reaches an event import (measured on the
/// CPU-bound guest: without it the instrumented module runs ~1.6× slower) — all but
/// `directize`. That pass turns an indirect call whose target is a constant into a direct
/// one: run after Asyncify, it would make a call site Asyncify left uninstrumented look
/// direct to [`CallFacts`], and a snapshot there would resume wrongly. (No other pass of
/// the list turns an indirect call into a direct one; for every guest of `guests/` the
/// output is byte for byte `-O2`'s.)
pub const WASM_OPT_ARGS: &[&str] = &[
    "--asyncify",
    "--pass-arg=asyncify-ignore-indirect",
    "--optimize-level=2",
    "--duplicate-function-elimination",
    "--memory-packing",
    "--once-reduction",
    "--dce",
    "--remove-unused-names",
    "--remove-unused-brs",
    "--remove-unused-names",
    "--optimize-instructions",
    "--pick-load-signs",
    "--precompute",
    "--code-pushing",
    "--simplify-locals-nostructure",
    "--vacuum",
    "--reorder-locals",
    "--remove-unused-brs",
    "--coalesce-locals",
    "--simplify-locals",
    "--vacuum",
    "--reorder-locals",
    "--coalesce-locals",
    "--reorder-locals",
    "--vacuum",
    "--merge-blocks",
    "--remove-unused-brs",
    "--remove-unused-names",
    "--merge-blocks",
    "--precompute",
    "--optimize-instructions",
    "--rse",
    "--vacuum",
    "--dae-optimizing",
    "--inlining-optimizing",
    "--duplicate-function-elimination",
    "--duplicate-import-elimination",
    "--simplify-globals-optimizing",
    "--remove-unused-module-elements",
    "--generate-stack-ir",
    "--optimize-stack-ir",
];

/// Bumped whenever [`export_globals`] or the arguments change what an instrumented module
/// is: part of the cache key and of a snapshot's identity.
pub const TRANSFORM_VERSION: u32 = 2;

/// The export name under which global `index` of an instrumented module is reachable.
pub fn global_export_name(index: u32) -> String {
    format!("tandem:global:{index}")
}

#[derive(Debug, thiserror::Error)]
pub enum InstrumentError {
    #[error(
        "wasm-opt was not found ({0}): snapshots need Binaryen's wasm-opt to instrument the \
         module (Debian: apt-get install binaryen; or set TANDEM_WASM_OPT)"
    )]
    WasmOptMissing(String),
    #[error("wasm-opt failed on the module: {0}")]
    WasmOpt(String),
    #[error("module cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed module: {0}")]
    Malformed(String),
    #[error("the module cannot be snapshotted: {0}")]
    Unsupported(String),
}

fn malformed(e: impl std::fmt::Display) -> InstrumentError {
    InstrumentError::Malformed(e.to_string())
}

/// A module instrumented for snapshots.
#[derive(Clone, Debug)]
pub struct Instrumented {
    /// The instrumented module's bytes.
    pub bytes: Vec<u8>,
    /// blake3 of the original module: what logs and snapshots name.
    pub original_digest: [u8; 32],
    /// blake3 of `bytes`: a snapshot's stack data fits only this module.
    pub digest: [u8; 32],
    /// How many globals the module has (imported ones included); each is exported as
    /// [`global_export_name`].
    pub globals: u32,
    /// Which calls of the instrumented module may be indirect.
    pub calls: Arc<CallFacts>,
}

/// What a stack of the instrumented module needs to be unwound: which of its calls may
/// have been indirect (Asyncify instruments no indirect call site: see
/// [`WASM_OPT_ARGS`]). Functions are numbered in the module's function index space,
/// imports first, as wasmtime's backtraces number them.
#[derive(Debug, Default)]
pub struct CallFacts {
    /// Functions an indirect call may reach: those in an element segment (tables are
    /// never changed by the code: such a module is refused), every one if a table is
    /// imported (its contents are not the module's to know).
    in_table: Vec<bool>,
    /// Functions whose code makes an indirect call (`call_indirect`, `call_ref` and their
    /// tail-call forms).
    calls_indirectly: Vec<bool>,
    /// An imported table: any function may be in it.
    table_imported: bool,
    /// The function `_start` exports: the outermost frame of a whole stack.
    start: Option<u32>,
    /// How many functions are imported (numbered first).
    imported: usize,
}

impl CallFacts {
    /// Whether the frame of `caller` may have called `callee` (`None`: an import) by an
    /// indirect call. Conservative: a function that calls both directly and indirectly
    /// one that may be in a table counts as an indirect call.
    pub fn maybe_indirect(&self, caller: u32, callee: Option<u32>) -> bool {
        let flag = |v: &[bool], i: u32| v.get(i as usize).copied().unwrap_or(true);
        if !flag(&self.calls_indirectly, caller) {
            return false;
        }
        match callee {
            _ if self.table_imported => true,
            Some(f) => flag(&self.in_table, f),
            // An import in a table: any import might be the one called.
            None => self.in_table[..self.imported.min(self.in_table.len())]
                .iter()
                .any(|&t| t),
        }
    }

    /// `_start`'s function index.
    pub fn start(&self) -> Option<u32> {
        self.start
    }
}

/// The wasm-opt to run.
pub fn wasm_opt() -> PathBuf {
    std::env::var_os("TANDEM_WASM_OPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("wasm-opt"))
}

/// wasm-opt's version line, or why it cannot be run.
pub fn wasm_opt_version() -> Result<String, InstrumentError> {
    let tool = wasm_opt();
    let out = Command::new(&tool)
        .arg("--version")
        .output()
        .map_err(|e| InstrumentError::WasmOptMissing(format!("{}: {e}", tool.display())))?;
    if !out.status.success() {
        return Err(InstrumentError::WasmOptMissing(format!(
            "{} --version: {}",
            tool.display(),
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The folder instrumented modules are cached in (see the module docs).
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = env("TANDEM_CACHE_DIR") {
        return d;
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return d.join("tandem");
    }
    if let Some(h) = env("HOME") {
        return h.join(".cache").join("tandem");
    }
    PathBuf::from("/var/cache/tandem")
}

/// Instrument `original`, from the cache in [`cache_dir`] when it holds it.
pub fn instrument(original: &[u8]) -> Result<Instrumented, InstrumentError> {
    instrument_in(original, &cache_dir())
}

/// Instrument `original`, caching the result in `cache`.
pub fn instrument_in(original: &[u8], cache: &Path) -> Result<Instrumented, InstrumentError> {
    let facts = facts(original)?;
    if let Some(why) = facts.unsupported {
        return Err(InstrumentError::Unsupported(why));
    }
    let original_digest = *blake3::hash(original).as_bytes();
    let version = wasm_opt_version()?;
    let imports = import_list();
    let mut key = blake3::Hasher::new();
    key.update(&original_digest);
    key.update(version.as_bytes());
    key.update(&TRANSFORM_VERSION.to_le_bytes());
    for a in WASM_OPT_ARGS {
        key.update(a.as_bytes()).update(b"\0");
    }
    key.update(imports.as_bytes());
    let key = crate::vm::hex(&key.finalize().as_bytes()[..20]);
    let cached = cache.join(format!("{key}.wasm"));
    let bytes = match std::fs::read(&cached) {
        // A cached file is ours (owner-only folder, written whole then renamed); still, one
        // that is not a module with our exports is rebuilt rather than trusted.
        Ok(b) if looks_instrumented(&b) => b,
        Ok(_) | Err(_) => {
            let made = export_globals(&run_wasm_opt(original, cache, &imports)?)?;
            store(cache, &cached, &made)?;
            made
        }
    };
    let f = facts_of_instrumented(&bytes)?;
    Ok(Instrumented {
        digest: *blake3::hash(&bytes).as_bytes(),
        bytes,
        original_digest,
        globals: f.globals,
        calls: Arc::new(f.calls),
    })
}

fn import_list() -> String {
    EVENT_IMPORTS
        .iter()
        .map(|n| format!("{WASI_MODULE}.{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn looks_instrumented(b: &[u8]) -> bool {
    let Ok(f) = facts(b) else { return false };
    f.exports.iter().any(|e| e == "asyncify_start_unwind")
        && f.exports.iter().any(|e| e == &global_export_name(0)) == (f.globals > 0)
}

fn facts_of_instrumented(b: &[u8]) -> Result<Facts, InstrumentError> {
    let f = facts(b)?;
    for needed in [
        "asyncify_start_unwind",
        "asyncify_stop_unwind",
        "asyncify_start_rewind",
        "asyncify_stop_rewind",
        "asyncify_get_state",
    ] {
        if !f.exports.iter().any(|e| e == needed) {
            return Err(InstrumentError::WasmOpt(format!(
                "the instrumented module does not export {needed}"
            )));
        }
    }
    Ok(f)
}

/// A fresh owner-only folder, made if missing.
fn ensure_dir(dir: &Path) -> Result<(), InstrumentError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| InstrumentError::Cache {
            path: dir.to_path_buf(),
            source,
        })
}

/// A name no other process or thread uses at the same time.
pub(crate) fn temp_name(dir: &Path, what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(
        ".{what}.{}.{}.{nanos}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Write `bytes` to `path` atomically: a temporary file beside it, synced, renamed.
fn store(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), InstrumentError> {
    ensure_dir(dir)?;
    let tmp = temp_name(dir, "module");
    let err = |source| InstrumentError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Removes a temporary file however the scope is left.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_wasm_opt(original: &[u8], dir: &Path, imports: &str) -> Result<Vec<u8>, InstrumentError> {
    ensure_dir(dir)?;
    let input = TempFile(temp_name(dir, "in"));
    let output = TempFile(temp_name(dir, "out"));
    std::fs::write(&input.0, original).map_err(|source| InstrumentError::Cache {
        path: input.0.clone(),
        source,
    })?;
    let tool = wasm_opt();
    let out = Command::new(&tool)
        .arg(&input.0)
        .args(WASM_OPT_ARGS)
        .arg(format!("--pass-arg=asyncify-imports@{imports}"))
        .arg("-o")
        .arg(&output.0)
        .output()
        .map_err(|e| InstrumentError::WasmOptMissing(format!("{}: {e}", tool.display())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(InstrumentError::WasmOpt(format!(
            "{}: {}",
            out.status,
            err.lines().take(5).collect::<Vec<_>>().join(" / ")
        )));
    }
    std::fs::read(&output.0).map_err(|e| InstrumentError::WasmOpt(format!("no output: {e}")))
}

/// What instrumenting needs to know of a module.
#[derive(Debug, Default)]
struct Facts {
    /// Globals, imported ones included.
    globals: u32,
    exports: Vec<String>,
    /// Why the module's state is not just memory, globals and the stack.
    unsupported: Option<String>,
    calls: CallFacts,
}

fn facts(wasm: &[u8]) -> Result<Facts, InstrumentError> {
    use wasmparser::{ElementItems, Operator, Parser, Payload, TypeRef};
    let mut f = Facts::default();
    let mut in_table = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(malformed)? {
            Payload::ImportSection(r) => {
                for imp in r.into_imports() {
                    match imp.map_err(malformed)?.ty {
                        TypeRef::Global(_) => f.globals += 1,
                        TypeRef::Func(_) | TypeRef::FuncExact(_) => f.calls.imported += 1,
                        TypeRef::Table(_) => f.calls.table_imported = true,
                        _ => {}
                    }
                }
                // Imported functions are numbered first; they make no calls of ours.
                f.calls.calls_indirectly = vec![false; f.calls.imported];
            }
            Payload::ElementSection(r) => {
                for e in r {
                    match e.map_err(malformed)?.items {
                        ElementItems::Functions(fs) => {
                            for i in fs {
                                in_table.push(i.map_err(malformed)?);
                            }
                        }
                        ElementItems::Expressions(_, es) => {
                            for e in es {
                                ref_funcs(&e.map_err(malformed)?, &mut in_table)?;
                            }
                        }
                    }
                }
            }
            Payload::GlobalSection(r) => {
                f.globals += r.count();
                for g in r {
                    ref_funcs(&g.map_err(malformed)?.init_expr, &mut in_table)?;
                }
            }
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e.map_err(malformed)?;
                    if e.name == "_start" && e.kind == wasmparser::ExternalKind::Func {
                        f.calls.start = Some(e.index);
                    }
                    f.exports.push(e.name.to_string());
                }
            }
            Payload::MemorySection(r) => {
                for m in r {
                    let m = m.map_err(malformed)?;
                    if m.shared || m.memory64 {
                        f.unsupported
                            .get_or_insert("a shared or 64-bit memory".to_string());
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                f.calls.calls_indirectly.push(false);
                let mut ops = body.get_operators_reader().map_err(malformed)?;
                while !ops.eof() {
                    let why = match ops.read().map_err(malformed)? {
                        Operator::CallIndirect { .. }
                        | Operator::ReturnCallIndirect { .. }
                        | Operator::CallRef { .. }
                        | Operator::ReturnCallRef { .. } => {
                            if let Some(this) = f.calls.calls_indirectly.last_mut() {
                                *this = true;
                            }
                            continue;
                        }
                        // A reference to a function taken in code (or in a global's
                        // initialiser, below) may be called by `call_ref`, or put in a
                        // table (refused below): counted as in a table all the same.
                        Operator::RefFunc { function_index } => {
                            in_table.push(function_index);
                            continue;
                        }
                        Operator::TableSet { .. }
                        | Operator::TableGrow { .. }
                        | Operator::TableFill { .. }
                        | Operator::TableCopy { .. }
                        | Operator::TableInit { .. }
                        | Operator::ElemDrop { .. } => "its code changes a table",
                        Operator::MemoryInit { .. } | Operator::DataDrop { .. } => {
                            "its code uses passive data segments"
                        }
                        _ => continue,
                    };
                    f.unsupported.get_or_insert(why.to_string());
                }
            }
            _ => {}
        }
    }
    // Imports, then one entry per function body.
    let functions = f.calls.calls_indirectly.len();
    f.calls.in_table = vec![false; functions];
    for i in in_table {
        // An index past the functions: the module is malformed and will not compile.
        if let Some(t) = f.calls.in_table.get_mut(i as usize) {
            *t = true;
        }
    }
    Ok(f)
}

/// The functions a constant expression (an element's item, a global's initial value)
/// takes a reference to.
fn ref_funcs(expr: &wasmparser::ConstExpr<'_>, into: &mut Vec<u32>) -> Result<(), InstrumentError> {
    for op in expr.get_operators_reader() {
        if let wasmparser::Operator::RefFunc { function_index } = op.map_err(malformed)? {
            into.push(function_index);
        }
    }
    Ok(())
}

/// Encode `v` as unsigned LEB128.
fn leb(mut v: u32, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Decode an unsigned LEB128 u32 at `*at`, advancing it.
fn read_leb(b: &[u8], at: &mut usize) -> Result<u32, InstrumentError> {
    let mut v: u64 = 0;
    for shift in (0..35).step_by(7) {
        let byte = *b.get(*at).ok_or_else(|| malformed("truncated LEB128"))?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return u32::try_from(v).map_err(|_| malformed("LEB128 out of range"));
        }
    }
    Err(malformed("overlong LEB128"))
}

/// A section of a module: its id, where it starts (its id byte) and its payload.
struct Section {
    id: u8,
    start: usize,
    payload: std::ops::Range<usize>,
}

/// The sections of a module, in order, after checking the header.
fn sections(wasm: &[u8]) -> Result<Vec<Section>, InstrumentError> {
    if wasm.len() < 8 || wasm[..4] != *b"\0asm" || wasm[4..8] != [1, 0, 0, 0] {
        return Err(malformed("not a core wasm module (version 1)"));
    }
    let mut at = 8;
    let mut out = Vec::new();
    while at < wasm.len() {
        let start = at;
        let id = wasm[at];
        at += 1;
        let len = read_leb(wasm, &mut at)? as usize;
        let end = at
            .checked_add(len)
            .filter(|&e| e <= wasm.len())
            .ok_or_else(|| malformed("a section runs past the end"))?;
        out.push(Section {
            id,
            start,
            payload: at..end,
        });
        at = end;
    }
    Ok(out)
}

/// Where a section of this id goes among the known sections (custom sections: none).
fn order(id: u8) -> Option<u8> {
    // type, import, function, table, memory, tag, global, export, start, element,
    // data count, code, data.
    const ORDER: [u8; 13] = [1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11];
    ORDER.iter().position(|&x| x == id).map(|p| p as u8)
}

/// Add an export `tandem:global:N` for every global N (see the module docs). The rest of
/// the module is copied byte for byte.
pub fn export_globals(wasm: &[u8]) -> Result<Vec<u8>, InstrumentError> {
    let f = facts(wasm)?;
    let secs = sections(wasm)?;
    let mut extra = Vec::new();
    for i in 0..f.globals {
        let name = global_export_name(i);
        if f.exports.contains(&name) {
            return Err(malformed(format!("the module already exports {name}")));
        }
        leb(name.len() as u32, &mut extra);
        extra.extend_from_slice(name.as_bytes());
        extra.push(0x03); // export kind: global
        leb(i, &mut extra);
    }
    let total = u32::try_from(f.exports.len() as u64 + u64::from(f.globals))
        .map_err(|_| malformed("too many exports"))?;
    let mut export_payload = Vec::new();
    leb(total, &mut export_payload);
    if let Some(s) = secs.iter().find(|s| s.id == 7) {
        let mut at = s.payload.start;
        read_leb(wasm, &mut at)?; // the old count
        export_payload.extend_from_slice(&wasm[at..s.payload.end]);
    }
    export_payload.extend_from_slice(&extra);
    let mut section = vec![7u8];
    leb(
        u32::try_from(export_payload.len()).map_err(|_| malformed("export section too large"))?,
        &mut section,
    );
    section.extend_from_slice(&export_payload);

    let mut out = wasm[..8].to_vec();
    let mut placed = false;
    let export_order = order(7);
    for s in &secs {
        if s.id == 7 {
            out.extend_from_slice(&section);
            placed = true;
            continue;
        }
        // A module without exports gets them before the first section that follows
        // exports in the binary format's order.
        if !placed && order(s.id).is_some() && order(s.id) > export_order {
            out.extend_from_slice(&section);
            placed = true;
        }
        out.extend_from_slice(&wasm[s.start..s.payload.end]);
    }
    if !placed {
        out.extend_from_slice(&section);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module in the binary format: the given sections after the header.
    fn module(sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        for (id, payload) in sections {
            m.push(*id);
            leb(payload.len() as u32, &mut m);
            m.extend_from_slice(payload);
        }
        m
    }

    /// Global section: `n` mutable i32 globals initialised to 7.
    fn globals(n: u8) -> Vec<u8> {
        let mut p = vec![n];
        for _ in 0..n {
            p.extend_from_slice(&[0x7f, 0x01, 0x41, 0x07, 0x0b]);
        }
        p
    }

    #[test]
    fn leb128_round_trips() {
        for v in [0, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut b = Vec::new();
            leb(v, &mut b);
            let mut at = 0;
            assert_eq!(read_leb(&b, &mut at).unwrap(), v);
            assert_eq!(at, b.len());
        }
        assert!(read_leb(&[0x80, 0x80], &mut 0).is_err(), "truncated");
        assert!(read_leb(&[0xff; 6], &mut 0).is_err(), "overlong");
    }

    #[test]
    fn every_global_gets_an_export_and_the_module_still_validates() {
        // Two globals, an existing export section with one global export, a custom
        // section after it: the new exports join the existing section.
        let mut exports = vec![1u8];
        exports.push(1);
        exports.extend_from_slice(b"g");
        exports.extend_from_slice(&[0x03, 0x01]);
        let m = module(&[(6, globals(2)), (7, exports), (0, b"\x04namex".to_vec())]);
        let out = export_globals(&m).unwrap();
        let f = facts(&out).unwrap();
        assert_eq!(
            f.exports,
            vec!["g", "tandem:global:0", "tandem:global:1"],
            "old exports kept, in order, new ones after"
        );
        wasmparser::Validator::new().validate_all(&out).unwrap();
        // The custom section is still there, byte for byte.
        assert!(out.ends_with(b"\x00\x06\x04namex"));
    }

    #[test]
    fn a_module_without_exports_gets_an_export_section_in_its_place() {
        // Globals then a start-less data count section (id 12) that must follow exports.
        let m = module(&[(6, globals(3)), (12, vec![0])]);
        let out = export_globals(&m).unwrap();
        let ids: Vec<u8> = sections(&out).unwrap().iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![6, 7, 12]);
        assert_eq!(facts(&out).unwrap().exports.len(), 3);
        wasmparser::Validator::new().validate_all(&out).unwrap();
        // No globals: an empty export section, still valid.
        let out = export_globals(&module(&[])).unwrap();
        wasmparser::Validator::new().validate_all(&out).unwrap();
    }

    #[test]
    fn damaged_modules_are_refused_not_rewritten() {
        let m = module(&[(6, globals(1))]);
        assert!(export_globals(&m[..m.len() - 1]).is_err(), "truncated");
        assert!(export_globals(b"\0asm\x02\0\0\0").is_err(), "wrong version");
        assert!(export_globals(b"not wasm").is_err());
    }

    /// One imported function (0) and three defined ones: 1 (`_start`) makes an indirect
    /// call, 2 does not, 3 calls the import; the table holds `in_table`.
    fn call_module(in_table: &[u8]) -> Vec<u8> {
        let types = vec![1, 0x60, 0, 0];
        let imports = vec![1, 1, b'm', 1, b'f', 0x00, 0x00];
        let funcs = vec![3, 0, 0, 0];
        let tables = vec![1, 0x70, 0x00, 0x04];
        let mut exports = vec![1, 6];
        exports.extend_from_slice(b"_start");
        exports.extend_from_slice(&[0x00, 1]);
        let mut elements = vec![1, 0x00, 0x41, 0x00, 0x0b, in_table.len() as u8];
        elements.extend_from_slice(in_table);
        let bodies: [&[u8]; 3] = [
            &[0, 0x41, 0x00, 0x11, 0x00, 0x00, 0x0b],
            &[0, 0x0b],
            &[0, 0x10, 0x00, 0x0b],
        ];
        let mut code = vec![3];
        for b in bodies {
            leb(b.len() as u32, &mut code);
            code.extend_from_slice(b);
        }
        let m = module(&[
            (1, types),
            (2, imports),
            (3, funcs),
            (4, tables),
            (7, exports),
            (9, elements),
            (10, code),
        ]);
        wasmparser::Validator::new().validate_all(&m).unwrap();
        m
    }

    #[test]
    fn a_call_may_be_indirect_only_from_a_function_that_makes_one_to_one_in_a_table() {
        let c = facts(&call_module(&[3])).unwrap().calls;
        assert_eq!(c.start(), Some(1));
        assert!(
            c.maybe_indirect(1, Some(3)),
            "1 calls indirectly; 3 is in the table"
        );
        assert!(
            !c.maybe_indirect(1, Some(2)),
            "2 is in no table: called directly"
        );
        assert!(!c.maybe_indirect(2, Some(3)), "2 makes no indirect call");
        assert!(!c.maybe_indirect(3, None), "3 makes no indirect call");
        assert!(!c.maybe_indirect(1, None), "no import is in the table");
        assert!(
            c.maybe_indirect(9, Some(3)),
            "a function not in the module: unknown"
        );
        // The import in the table: a call of an import from 1 may be indirect.
        let c = facts(&call_module(&[0, 3])).unwrap().calls;
        assert!(c.maybe_indirect(1, None));
        assert!(!c.maybe_indirect(3, None));
    }

    #[test]
    fn table_mutation_makes_a_module_unsupported() {
        // type () -> (); one function; a table; code: ref.null func, i32.const 0 ... no:
        // simply `i32.const 0, ref.null func, table.set 0`.
        let types = vec![1, 0x60, 0, 0];
        let funcs = vec![1, 0];
        let tables = vec![1, 0x70, 0x00, 0x01];
        let body = vec![0, 0x41, 0x00, 0xd0, 0x70, 0x26, 0x00, 0x0b];
        let mut code = vec![1];
        leb(body.len() as u32, &mut code);
        code.extend_from_slice(&body);
        let m = module(&[(1, types), (3, funcs), (4, tables), (10, code)]);
        wasmparser::Validator::new().validate_all(&m).unwrap();
        let f = facts(&m).unwrap();
        assert_eq!(f.unsupported.as_deref(), Some("its code changes a table"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            instrument_in(&m, dir.path()),
            Err(InstrumentError::Unsupported(_))
        ));
    }

    #[test]
    fn a_missing_wasm_opt_is_named() {
        // The variable is read per call; this test's process sets it only for the call
        // below and restores it (tests in this module that run wasm-opt use their own
        // process environment only through `wasm_opt()`, which this test serialises on).
        let _guard = ENV.lock().unwrap();
        // SAFETY: the test harness runs other tests on other threads, but every test
        // here that reads TANDEM_WASM_OPT holds ENV, so none reads it concurrently.
        unsafe { std::env::set_var("TANDEM_WASM_OPT", "/nonexistent/wasm-opt") };
        let r = wasm_opt_version();
        // SAFETY: as above.
        unsafe { std::env::remove_var("TANDEM_WASM_OPT") };
        let e = r.unwrap_err();
        assert!(matches!(e, InstrumentError::WasmOptMissing(_)));
        assert!(e.to_string().contains("binaryen"), "{e}");
    }

    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn guest(name: &str) -> Vec<u8> {
        std::fs::read(crate::testing::guest(name)).unwrap()
    }

    #[test]
    fn a_real_guest_is_instrumented_once_then_served_from_the_cache() {
        let _guard = ENV.lock().unwrap();
        let original = guest("fsdemo.wasm");
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let a = instrument_in(&original, &cache).unwrap();
        assert_eq!(a.original_digest, *blake3::hash(&original).as_bytes());
        assert!(
            a.globals >= 3,
            "the stack pointer and Asyncify's two globals"
        );
        let f = facts(&a.bytes).unwrap();
        for i in 0..a.globals {
            assert!(f.exports.contains(&global_export_name(i)));
        }
        wasmparser::Validator::new().validate_all(&a.bytes).unwrap();
        let files: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
        assert_eq!(files.len(), 1, "one cached module, no temporary files left");
        let meta = std::fs::metadata(&cache).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        // Served from the cache: the same bytes, even with wasm-opt's output gone stale
        // (a damaged cache entry is rebuilt, not used).
        let b = instrument_in(&original, &cache).unwrap();
        assert_eq!(a.digest, b.digest);
        let entry = files[0].as_ref().unwrap().path();
        std::fs::write(&entry, b"garbage").unwrap();
        let c = instrument_in(&original, &cache).unwrap();
        assert_eq!(c.digest, a.digest, "rebuilt identically");
    }
}
