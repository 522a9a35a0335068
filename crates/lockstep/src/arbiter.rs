//! Arbitration on shared storage: exactly one live copy per generation.
//!
//! A VM's generations are files `gen-N` in its arbitration folder, each created with
//! `O_EXCL` by the copy that is live in generation N. When the copies lose each other, both
//! try to create `gen-(N+1)`; the file system lets exactly one succeed. The winner is live;
//! the loser halts. A copy that cannot reach the folder at all does not go live.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Won,
    /// The other copy holds this generation.
    Lost(String),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot reach the arbitration record {path}: {source}")]
pub struct StorageError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

pub struct Arbiter {
    dir: PathBuf,
}

impl Arbiter {
    pub fn new(dir: &Path) -> Self {
        Arbiter {
            dir: dir.to_path_buf(),
        }
    }

    fn record(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("gen-{generation}"))
    }

    /// The highest generation claimed so far (0 if none).
    pub fn current(&self) -> Result<u64, StorageError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| StorageError {
            path: self.dir.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("gen-")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0))
    }

    /// Atomically claim `generation` for `who`.
    pub fn claim(&self, generation: u64, who: &str) -> Result<Claim, StorageError> {
        let path = self.record(generation);
        let err = |source| StorageError {
            path: path.clone(),
            source,
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(who.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(err)?;
                Ok(Claim::Won)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                Ok(Claim::Lost(holder))
            }
            Err(e) => Err(err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_claim_wins_even_when_racing() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arbiter::new(dir.path());
        assert_eq!(a.current().unwrap(), 0);
        assert_eq!(a.claim(1, "primary").unwrap(), Claim::Won);
        let winners: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let a = Arbiter::new(dir.path());
                    s.spawn(move || a.claim(2, &format!("copy{i}")).unwrap() == Claim::Won)
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(winners.iter().filter(|w| **w).count(), 1);
        assert_eq!(a.current().unwrap(), 2);
        assert!(matches!(a.claim(2, "late").unwrap(), Claim::Lost(h) if h.starts_with("copy")));
    }

    #[test]
    fn unreachable_storage_is_an_error_not_a_win() {
        let a = Arbiter::new(Path::new("/nonexistent/tandem/arbitration"));
        assert!(a.claim(1, "x").is_err());
        assert!(a.current().is_err());
    }
}
