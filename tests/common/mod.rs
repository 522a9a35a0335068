//! Shared helpers for the end-to-end tests: the real `tandem` binary and the real guests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Build the example guests once per test binary (make is idempotent).
pub fn guest(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let out = Command::new("make")
            .arg("-C")
            .arg(workspace().join("guests"))
            .output()
            .expect("running make -C guests");
        assert!(
            out.status.success(),
            "building the guests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let p = workspace().join("guests/build").join(name);
    assert!(p.is_file(), "{} was not built", p.display());
    p
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The last line of stdout.
    pub fn last_line(&self) -> &str {
        self.stdout.lines().last().unwrap_or("")
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub fn tandem(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_GUESTS", workspace().join("guests/build"))
        .output()
        .expect("running tandem");
    let run = Run::from(out);
    assert!(
        !run.stderr.contains("panicked"),
        "tandem panicked: {}",
        run.stderr
    );
    run
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `recorded: events=N digest=HEX` or `replay ok: events=N digest=HEX` → (N, HEX).
pub fn events_and_digest(line: &str, prefix: &str) -> (u64, String) {
    let rest = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected a line starting {prefix:?}, got {line:?}"));
    let mut events = None;
    let mut digest = None;
    for part in rest.split_whitespace() {
        if let Some(v) = part.strip_prefix("events=") {
            events = v.parse().ok();
        }
        if let Some(v) = part.strip_prefix("digest=") {
            digest = Some(v.to_string());
        }
    }
    let digest = digest.expect("a digest");
    assert_eq!(digest.len(), 64, "digest is 32 bytes of hex");
    (events.expect("an event count"), digest)
}

/// Every file and folder below `dir` with its content and modification time, to prove a
/// folder untouched.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let meta = e.metadata().expect("metadata");
            let p = e.path();
            let content = if meta.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else {
                std::fs::read(&p).expect("read")
            };
            out.push((p, content, meta.modified().expect("mtime")));
        }
    }
    out.sort();
    out
}
