//! Where the example guests built from `guests/` live.
//!
//! `make -C guests` writes them to `guests/build`. The binary looks there relative to the
//! working directory, then relative to itself (`target/<profile>/tandem` sits two levels
//! below the workspace), unless `TANDEM_GUESTS` names the folder.

use std::path::PathBuf;

use anyhow::{Result, bail};

pub fn dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TANDEM_GUESTS") {
        return Ok(PathBuf::from(d));
    }
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        let ws = exe.parent()?.parent()?.parent()?;
        Some(ws.join("guests/build"))
    });
    if let Some(found) = std::iter::once(PathBuf::from("guests/build"))
        .chain(beside_exe)
        .find(|c| c.is_dir())
    {
        return Ok(found);
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
