//! Builds and runs the file-layer test programs of `tests/c` for `tests/posix.rs` and
//! `tests/conformance.rs`: natively (the Linux reference), under `tandem vm run`, and under
//! wasmtime (the reference WASI implementation, through its Python bindings in
//! `target/wasmtime-venv`, installed by `scripts/setup`). Also snapshots a folder's tree and
//! shows two outputs' differences line by line.
//!
//! Builds are cached in `target/c-tests` and redone only when a source is newer; each build
//! goes to a temporary name first and is renamed into place, so concurrent test binaries never
//! see half a binary.

#![allow(dead_code)] // each test binary uses a part

use crate::common::{Run, s, workspace};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

#[derive(Clone, Copy)]
pub enum Target {
    Wasm,
    Native,
}

fn fresh(out: &Path, sources: &[PathBuf]) -> bool {
    let Ok(built) = out.metadata().and_then(|m| m.modified()) else {
        return false;
    };
    sources.iter().all(|src| {
        src.metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t <= built)
    })
}

/// `tests/c/NAME.c` compiled for `target`, as the guests are (`clang --target=wasm32-wasi
/// -O2`, a 1 MiB stack) or natively with `clang -O2`.
pub fn build(name: &str, target: Target) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src_dir = workspace().join("tests/c");
    let cache = workspace().join("target/c-tests");
    let ext = match target {
        Target::Wasm => "wasm",
        Target::Native => "native",
    };
    let out = cache.join(format!("{name}.{ext}"));
    let sources = [src_dir.join(format!("{name}.c")), src_dir.join("util.h")];
    if fresh(&out, &sources) {
        return out;
    }
    std::fs::create_dir_all(&cache).expect("creating target/c-tests");
    let tmp = cache.join(format!("{name}.{ext}.{}.tmp", std::process::id()));
    let mut cmd = Command::new("clang");
    if let Target::Wasm = target {
        cmd.args(["--target=wasm32-wasi", "-Wl,-z,stack-size=1048576"]);
    }
    let result = cmd
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&tmp)
        .arg(&sources[0])
        .output()
        .expect("running clang (scripts/setup installs it)");
    assert!(
        result.status.success(),
        "building {name}.c for {ext} failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&tmp, &out).expect("moving a build into place");
    out
}

/// The native build run with its working folder `cwd`.
pub fn native(exe: &Path, cwd: &Path, args: &[&str]) -> Run {
    Command::new(exe)
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("running a native test program")
        .into()
}

/// `tandem vm run` of `wasm` with `datastore` as "/", program arguments and environment.
pub fn tandem(wasm: &Path, datastore: &Path, args: &[&str], env: &[&str]) -> Run {
    let mut argv = vec!["vm", "run", "--wasm", s(wasm), "--datastore", s(datastore)];
    for a in args {
        argv.extend(["--arg", a]);
    }
    for e in env {
        argv.extend(["--env", e]);
    }
    // A guest the VM never returns to (a lost wakeup, say) must fail the test, not hang it:
    // `timeout` kills the run after 20 s (exit code 137).
    let run: Run = Command::new("timeout")
        .args(["-s", "KILL", "20"])
        .arg(env!("CARGO_BIN_EXE_tandem"))
        .args(&argv)
        .output()
        .expect("running tandem under timeout")
        .into();
    assert!(
        !run.stderr.contains("panicked"),
        "tandem panicked: {}",
        run.stderr
    );
    run
}

/// The same run under wasmtime (see `tests/c/wasmtime_run.py`).
pub fn wasmtime(wasm: &Path, datastore: &Path, args: &[&str], env: &[&str]) -> Run {
    let python = workspace().join("target/wasmtime-venv/bin/python");
    assert!(
        python.is_file(),
        "the wasmtime reference is not installed ({}): run scripts/setup",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.arg(workspace().join("tests/c/wasmtime_run.py"))
        .arg(wasm)
        .arg(datastore);
    for e in env {
        cmd.args(["--env", e]);
    }
    let run: Run = cmd
        .arg("--")
        .args(args)
        .output()
        .expect("running wasmtime")
        .into();
    assert!(
        !run.stderr.contains("Traceback"),
        "the wasmtime runner failed: {}",
        run.stderr
    );
    run
}

/// One entry of a folder tree: what a program can observe of it besides inode numbers,
/// permissions and times.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Node {
    Dir,
    File(String),
    Symlink(String),
}

/// A folder's entries by relative path.
pub type Tree = BTreeMap<String, Node>;

/// Every entry below `dir` by its path relative to `dir`. File contents are shown as text
/// with escapes (`{:?}`); symlink targets have `strip` (a test's own temporary folder)
/// replaced by `$BASE`, so that two worlds built in different folders compare equal.
pub fn snapshot(dir: &Path, strip: Option<&Path>) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).expect("lstat");
            let node = if meta.is_symlink() {
                let mut t = std::fs::read_link(&p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if let Some(base) = strip {
                    t = t.replace(s(base), "$BASE");
                }
                Node::Symlink(t)
            } else if meta.is_dir() {
                stack.push(p.clone());
                Node::Dir
            } else {
                let bytes = std::fs::read(&p).expect("read");
                Node::File(describe(&bytes))
            };
            out.insert(rel, node);
        }
    }
    out
}

/// A file's content as text with escapes; a long one by its length, its start and a hash
/// of all of it (FNV-1a), so that a difference report stays readable.
fn describe(bytes: &[u8]) -> String {
    if bytes.len() <= 96 {
        return format!("{:?}", String::from_utf8_lossy(bytes));
    }
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!(
        "{} bytes {:?}... fnv={hash:016x}",
        bytes.len(),
        String::from_utf8_lossy(&bytes[..64])
    )
}

/// The differences between two trees, one line per entry that differs.
pub fn tree_diff(
    want: &BTreeMap<String, Node>,
    got: &BTreeMap<String, Node>,
    want_name: &str,
) -> String {
    let mut out = String::new();
    let keys: std::collections::BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    for k in keys {
        let (w, g) = (want.get(k), got.get(k));
        if w != g {
            out.push_str(&format!("  {k}: {want_name} {w:?}, tandem {g:?}\n"));
        }
    }
    out
}

/// A line diff of `want` and `got` (longest common subsequence; outputs are short):
/// `-` lines only the reference printed, `+` lines only Tandem printed.
pub fn line_diff(want: &str, got: &str) -> String {
    let a: Vec<&str> = want.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    let mut l = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            l[i][j] = if a[i] == b[j] {
                l[i + 1][j + 1] + 1
            } else {
                l[i + 1][j].max(l[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || l[i][j + 1] >= l[i + 1][j]) {
            out.push_str(&format!("  + {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("  - {}\n", a[i]));
            i += 1;
        }
    }
    out
}

/// Compare a Tandem run with a reference run: stdout, exit code and (if given) the trees
/// they left. Returns a description of every difference, empty when they agree.
pub fn differences(
    reference: &str,
    want: &Run,
    got: &Run,
    trees: Option<(&Tree, &Tree)>,
) -> String {
    let mut out = String::new();
    if want.stdout != got.stdout {
        out.push_str(&format!(
            "stdout differs (- {reference} only, + tandem only):\n{}",
            line_diff(&want.stdout, &got.stdout)
        ));
    }
    if want.code != got.code {
        out.push_str(&format!(
            "exit code: {reference} {}, tandem {} (-1: killed by the 20 s timeout; tandem stderr: {})\n",
            want.code,
            got.code,
            got.stderr.trim()
        ));
    }
    if let Some((w, g)) = trees {
        let d = tree_diff(w, g, reference);
        if !d.is_empty() {
            out.push_str(&format!("file tree differs:\n{d}"));
        }
    }
    out
}
