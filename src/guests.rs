//! Where the example guests built from `guests/` live.
//!
//! `make -C guests` writes them to `guests/build`. The binary looks there relative to the
//! working directory, then relative to itself (`target/<profile>/tandem` sits two levels
//! below the workspace), unless `TANDEM_GUESTS` names the folder.

use std::path::PathBuf;

use anyhow::{bail, Result};

pub fn dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TANDEM_GUESTS") {
        return Ok(PathBuf::from(d));
    }
    let mut candidates = vec![PathBuf::from("guests/build")];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(ws) = exe.parent().and_then(|p| p.parent()).and_then(|p| p.parent()) {
            candidates.push(ws.join("guests/build"));
        }
    }
    for c in &candidates {
        if c.is_dir() {
            return Ok(c.clone());
        }
    }
    bail!("the example guests are not built: run `make -C guests` (or set TANDEM_GUESTS)")
}

/// The path of a built guest file, checked to exist.
pub fn file(name: &str) -> Result<PathBuf> {
    let p = dir()?.join(name);
    if !p.is_file() {
        bail!("{} is missing: run `make -C guests`", p.display());
    }
    Ok(p)
}
