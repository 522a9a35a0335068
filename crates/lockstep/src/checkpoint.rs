//! Checkpoints: snapshots of a protected VM on shared storage. They bound what both copies
//! keep (the events since the latest one) and let a newcomer join any live copy (restore
//! the latest, then replay what follows it).
//!
//! This module owns the VM's checkpoint folder, `<shared>/<vm>/checkpoints/`, and the
//! thread that takes checkpoints ([`spawn`]). A checkpoint is written whole under a
//! temporary name by the VM itself (`machine::snapshot::write_file`: write, fsync,
//! rename), then renamed to the generation of the copy that took it and its position
//! (`<generation, 20 digits>-<events, 20 digits>.snap`) and the folder synced; older ones
//! are then pruned, the newest two kept (a newcomer may be reading the previous one).
//! Newest means highest generation, then highest position: a copy that halts (its
//! generation superseded) between its last check and its rename may still publish a
//! checkpoint, but never one that a copy of a newer generation would take over that
//! generation's own. Names of before generations (`<events, 20 digits>.snap`) still read,
//! as generation 0.
//!
//! Invariants: a file named for a position holds this VM at that position (a VM powering
//! on removes the checkpoints of an earlier life, [`Checkpoints::clear`]) as the copy of
//! the generation it names executed it; the events before
//! a checkpoint are dropped only once its file is in place; while a secondary is attached
//! only the secondary takes checkpoints (the primary never pauses for one while protected);
//! a copy without a secondary (a primary alone, or a copy that went live) takes its own,
//! since it alone holds the history then, copying the VM's memory while it runs and
//! pausing it only for the pages written since (`machine::dirty`; the whole memory where
//! the host cannot track writes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use machine::control::Control;

use crate::{FtError, VmDir, io_err};

/// The suffix of a checkpoint file.
const SUFFIX: &str = ".snap";
/// How many checkpoints are kept.
const KEEP: usize = 2;
/// How often the checkpointer looks at what its copy keeps.
const POLL: Duration = Duration::from_millis(50);
/// How long a checkpoint waits for the VM to reach a snapshot point.
const POINT_WAIT: Duration = Duration::from_secs(10);

/// The VM's checkpoint folder.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    folder: PathBuf,
}

impl Checkpoints {
    pub fn new(dir: &VmDir) -> Self {
        Checkpoints {
            folder: dir.0.join("checkpoints"),
        }
    }

    /// Remove every checkpoint (the VM powers on: they are of an earlier life of it).
    pub fn clear(&self) -> Result<(), FtError> {
        std::fs::create_dir_all(&self.folder)
            .map_err(io_err(format!("create {}", self.folder.display())))?;
        for entry in std::fs::read_dir(&self.folder)
            .map_err(io_err(format!("list {}", self.folder.display())))?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "snap") {
                std::fs::remove_file(&path)
                    .map_err(io_err(format!("remove {}", path.display())))?;
            }
        }
        Ok(())
    }

    /// Every checkpoint, oldest first: ((generation, position), file).
    fn all(&self) -> Vec<((u64, u64), PathBuf)> {
        let mut found: Vec<((u64, u64), PathBuf)> = std::fs::read_dir(&self.folder)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                Some((parse_name(&name)?, e.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// The latest checkpoint (highest generation, then highest position): (position, file).
    pub fn latest(&self) -> Option<(u64, PathBuf)> {
        self.all().pop().map(|((_, events), path)| (events, path))
    }

    /// Where the VM writes a checkpoint being taken: a name no other copy, on this host or
    /// another, uses at the same time.
    fn taking(&self) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let host = crate::primary::hostname().replace('/', "-");
        self.folder.join(format!(".taking-{host}-{nanos}{SUFFIX}"))
    }

    /// The checkpoint just written to `taken` holds the VM at `events` as a copy of
    /// `generation` executed it: name it so, durably, and prune the old ones.
    fn install(&self, taken: &Path, generation: u64, events: u64) -> Result<PathBuf, FtError> {
        let path = self
            .folder
            .join(format!("{generation:020}-{events:020}{SUFFIX}"));
        std::fs::rename(taken, &path)
            .map_err(io_err(format!("install checkpoint {}", path.display())))?;
        std::fs::File::open(&self.folder)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("sync {}", self.folder.display())))?;
        let all = self.all();
        for (_, old) in all.iter().take(all.len().saturating_sub(KEEP)) {
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }
}

/// A checkpoint's (generation, position) from its file name: `<generation>-<events>.snap`,
/// or `<events>.snap` (generation 0), each number 20 digits; anything else is no checkpoint.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let number = |d: &str| {
        (d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()))
            .then(|| d.parse().ok())
            .flatten()
    };
    let stem = name.strip_suffix(SUFFIX)?;
    match stem.split_once('-') {
        Some((generation, events)) => Some((number(generation)?, number(events)?)),
        None => Some((0, number(stem)?)),
    }
}

/// What a copy keeps since its last checkpoint, when it is to take the next one.
#[derive(Clone, Copy, Debug)]
pub struct Kept {
    /// What the events since the last checkpoint weigh.
    pub bytes: u64,
    /// The copy is live: its memory is copied while it runs (see `machine::dirty`), it
    /// pauses only for the pages written since and the rest of the capture, and the file
    /// is written while it runs. A replaying secondary waits for the file too: its pause holds the primary
    /// back (see `FtConfig::max_history_bytes`), which is what bounds the history.
    pub live: bool,
    /// Take one now, whatever the policy says.
    pub due: bool,
    /// The generation of the copy's VM: the live copy's, or for a secondary the primary's
    /// it follows. The checkpoint is named with it.
    pub generation: u64,
}

/// When to checkpoint: once the events kept since the last one weigh `bytes`, or `every`
/// has passed and there are any.
#[derive(Clone, Debug)]
pub struct Policy {
    pub bytes: u64,
    pub every: Duration,
}

/// Take checkpoints of the VM behind `control` as `policy` says, until the VM ends.
/// `kept()` is what this copy keeps since the last checkpoint (bytes), or `None` while it
/// must not take one (asked again before a checkpoint taken is installed: a copy that
/// lost arbitration meanwhile must not publish its state); `done(events)` is called once a
/// checkpoint at `events` is in place.
pub fn spawn(
    control: Arc<Control>,
    checkpoints: Checkpoints,
    policy: Policy,
    kept: impl Fn() -> Option<Kept> + Send + 'static,
    done: impl Fn(u64) + Send + 'static,
) -> Result<(), FtError> {
    std::fs::create_dir_all(&checkpoints.folder)
        .map_err(io_err(format!("create {}", checkpoints.folder.display())))?;
    std::thread::Builder::new()
        .name("ft-checkpoint".into())
        .spawn(move || {
            let mut last = Instant::now();
            while !control.ended() {
                std::thread::sleep(POLL);
                let Some(Kept {
                    bytes, live, due, ..
                }) = kept()
                else {
                    continue;
                };
                if !due && bytes < policy.bytes && (bytes == 0 || last.elapsed() < policy.every) {
                    continue;
                }
                last = Instant::now();
                match take(&control, &checkpoints, live, &kept) {
                    Ok((taken, path)) => {
                        let precopied = taken.precopied.as_ref().map_or(String::new(), |p| {
                            format!(
                                "; pre-copied {:.1} MiB in {} rounds while it ran, {} KiB in \
                                 the pause{}",
                                p.running_bytes as f64 / (1 << 20) as f64,
                                p.rounds,
                                p.stopped_bytes >> 10,
                                if p.whole {
                                    " (whole: the memory moved)"
                                } else {
                                    ""
                                }
                            )
                        });
                        tracing::info!(
                            "checkpoint at event {} in {} (the VM paused {:.1} ms){precopied}",
                            taken.events,
                            path.display(),
                            taken.pause_ms
                        );
                        done(taken.events);
                    }
                    Err(why) if control.ended() => {
                        tracing::debug!("no checkpoint: {why}");
                    }
                    Err(why) => tracing::warn!("checkpoint failed: {why}"),
                }
            }
        })
        .map_err(io_err("start the checkpointer"))?;
    Ok(())
}

fn take(
    control: &Control,
    checkpoints: &Checkpoints,
    live: bool,
    kept: &impl Fn() -> Option<Kept>,
) -> Result<(machine::capture::Taken, PathBuf), String> {
    let tmp = checkpoints.taking();
    let taken = if live {
        control.snapshot_running(tmp.clone(), POINT_WAIT)
    } else {
        control.snapshot(tmp.clone(), false, false, POINT_WAIT)
    }
    .map_err(|(_, why)| why)?;
    // Asked again after the capture: the generation named is the copy's at the latest
    // moment before the rename (a secondary that went live meanwhile names its own: the
    // state captured is before its go-live, the same in both).
    let Some(Kept { generation, .. }) = kept() else {
        let _ = std::fs::remove_file(&tmp);
        return Err("this copy may no longer checkpoint (it halted or left)".into());
    };
    let path = checkpoints
        .install(&tmp, generation, taken.events)
        .map_err(|e| e.to_string())?;
    Ok((taken, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_is_the_highest_position_and_install_keeps_two() {
        let tmp = std::env::temp_dir().join(format!("tandem-cp-{}", std::process::id()));
        let dir = VmDir(tmp.clone());
        let cps = Checkpoints::new(&dir);
        cps.clear().unwrap();
        assert_eq!(cps.latest(), None);
        for events in [5u64, 100, 42] {
            let tmp = cps.taking();
            std::fs::write(&tmp, events.to_le_bytes()).unwrap();
            cps.install(&tmp, 1, events).unwrap();
        }
        // Named by position: 42 sorts below 100 whatever the order written.
        let (pos, path) = cps.latest().unwrap();
        assert_eq!(pos, 100);
        assert_eq!(
            path.file_name().unwrap(),
            "00000000000000000001-00000000000000000100.snap"
        );
        assert_eq!(cps.all().len(), KEEP);
        std::fs::write(cps.folder.join("00000000000000000007.snap.junk"), b"x").unwrap();
        std::fs::write(cps.folder.join("7.snap"), b"x").unwrap();
        assert_eq!(
            cps.latest().unwrap().0,
            100,
            "stray names are not checkpoints"
        );
        cps.clear().unwrap();
        assert_eq!(cps.latest(), None);
        let _ = std::fs::remove_dir_all(tmp);
    }

    #[test]
    fn the_highest_generation_wins_over_a_later_position_and_old_names_still_read() {
        let shared = tempfile::tempdir().unwrap();
        let cps = Checkpoints::new(&VmDir(shared.path().to_path_buf()));
        cps.clear().unwrap();
        // A checkpoint named the way before generations were: generation 0.
        std::fs::write(cps.folder.join("00000000000000000700.snap"), b"old").unwrap();
        assert_eq!(cps.latest().unwrap().0, 700, "an old name still reads");
        let install = |generation: u64, events: u64| {
            let tmp = cps.taking();
            std::fs::write(&tmp, events.to_le_bytes()).unwrap();
            cps.install(&tmp, generation, events).unwrap()
        };
        // Generation 2 went live at event 300 and checkpointed there.
        install(2, 300);
        assert_eq!(
            cps.latest().unwrap().0,
            300,
            "generation 2 over the old name"
        );
        // A copy of generation 1 that halted between its check and its rename publishes
        // a checkpoint further on: never taken over generation 2's.
        let stale = install(1, 900);
        let (pos, path) = cps.latest().unwrap();
        assert_eq!(pos, 300);
        assert_eq!(
            path.file_name().unwrap(),
            "00000000000000000002-00000000000000000300.snap"
        );
        // Pruning keeps the newest two by the same order: the stale one goes first.
        install(2, 350);
        assert!(
            !stale.exists(),
            "the stale generation's checkpoint was kept"
        );
        assert_eq!(
            cps.all().iter().map(|c| c.0).collect::<Vec<_>>(),
            [(2, 300), (2, 350)]
        );
        // Names that are neither form are no checkpoints.
        for junk in [
            "00000000000000000003-7.snap",
            "3-00000000000000000007.snap",
            "00000000000000000003-00000000000000000007-1.snap",
            "00000000000000000003_00000000000000000007.snap",
            "-00000000000000000007.snap",
        ] {
            std::fs::write(cps.folder.join(junk), b"x").unwrap();
        }
        assert_eq!(cps.latest().unwrap().0, 350);
        assert_eq!(
            parse_name("00000000000000000003-00000000000000000007.snap"),
            Some((3, 7))
        );
        assert_eq!(parse_name("00000000000000000007.snap"), Some((0, 7)));
    }
}
