//! What a copy's host reaches, for the failures the logging channel cannot see: the VM's
//! folder on shared storage, and the VM network's uplink.
//!
//! A [`Monitor`] probes both from a thread of its own: storage by writing, syncing and
//! reading back a small file in the VM's folder (each probe bounded by [`PROBE_TIMEOUT`]:
//! a hung file system is a lost one), the uplink by its carrier in `/sys/class/net`. A
//! path is *lost* only after it failed continuously for the hold time, so a flap shorter
//! than that does nothing, and found again at its first success.
//!
//! The secondary sends its host's health to the primary (`ToPrimary::Health`); the primary
//! hands the VM over when its own host lost a path the secondary's host has (see
//! `primary::Primary::watch_health`), and reports the VM not protected while the
//! secondary's host lacks one.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The longest one storage probe may take before storage counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the monitor looks.
const TICK: Duration = Duration::from_millis(20);
/// How often storage is probed while it answers.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// The longest reason kept (reasons travel on the logging channel).
pub const MAX_WHY: usize = 200;

/// What a host has lost, if anything: each `Some` says why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHealth {
    pub storage: Option<String>,
    pub uplink: Option<String>,
}

impl HostHealth {
    pub fn ok(&self) -> bool {
        self.storage.is_none() && self.uplink.is_none()
    }

    /// What was lost, as a phrase: "its storage (...)", "its VM network (...)".
    pub fn lost(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(w) = &self.storage {
            parts.push(format!("its storage ({w})"));
        }
        if let Some(w) = &self.uplink {
            parts.push(format!("its VM network ({w})"));
        }
        (!parts.is_empty()).then(|| parts.join(" and "))
    }

    /// Whether a copy on a host with this health may take the VM over from a host with
    /// `own`: it lacks nothing `own` has (a handover never trades one lost path for
    /// another), and has something `own` lost.
    pub fn better_than(&self, own: &HostHealth) -> bool {
        let no_worse = (self.storage.is_none() || own.storage.is_some())
            && (self.uplink.is_none() || own.uplink.is_some());
        let better = (own.storage.is_some() && self.storage.is_none())
            || (own.uplink.is_some() && self.uplink.is_none());
        no_worse && better
    }

    /// Reasons bounded in length (what came off the wire).
    pub fn bounded(mut self) -> Self {
        for w in [&mut self.storage, &mut self.uplink].into_iter().flatten() {
            if w.len() > MAX_WHY {
                *w = w.chars().take(MAX_WHY).collect();
            }
        }
        self
    }
}

/// A network interface's name as Linux allows it (it names a `/sys/class/net` entry, so
/// nothing else is accepted): 1-15 letters, digits, '_', '.' or '-', not starting with '.'.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// What to watch.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// The VM's folder on shared storage (probed).
    pub folder: PathBuf,
    /// The VM network's uplink on this host (its carrier is watched), if known.
    pub uplink: Option<String>,
    /// A path is lost only after failing continuously this long.
    pub hold: Duration,
}

/// One path's failures so far.
#[derive(Default)]
struct Path {
    failing_since: Option<Instant>,
    why: Option<String>,
    lost: bool,
}

impl Path {
    fn saw(&mut self, result: Result<(), String>, hold: Duration, what: &str) {
        match result {
            Ok(()) => {
                if self.lost {
                    tracing::warn!("{what} reachable again");
                }
                *self = Path::default();
            }
            Err(why) => {
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                if !self.lost && since.elapsed() >= hold {
                    tracing::error!("{what} lost: {why}");
                    self.lost = true;
                }
                self.why = Some(why);
            }
        }
    }

    fn lost(&self) -> Option<String> {
        self.lost.then(|| self.why.clone().unwrap_or_default())
    }

    /// Why it fails now, lost or not yet (its latest look failed).
    fn failing(&self) -> Option<String> {
        self.failing_since.and(self.why.clone())
    }
}

#[derive(Default)]
struct State {
    storage: Path,
    uplink: Path,
}

/// A storage probe's answer.
type Answer = Result<(), String>;

/// Watches this host's paths (a handle: clones watch the same).
#[derive(Clone)]
pub struct Monitor {
    config: Arc<HealthConfig>,
    state: Arc<Mutex<State>>,
    /// Asks the one prober thread for a storage probe; it answers on the sender given.
    /// One thread for the monitor's life, so a probe costs no thread start; a hung probe
    /// holds only that thread, and later questions wait behind it until their askers'
    /// bound runs out.
    prober: Arc<std::sync::mpsc::Sender<std::sync::mpsc::Sender<Answer>>>,
}

impl Monitor {
    /// Start watching.
    pub fn start(config: HealthConfig) -> std::io::Result<Monitor> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let probe = config
            .folder
            .join(format!(".health.{host}.{}", std::process::id()));
        let (prober, questions) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<Answer>>();
        let folder = config.folder.clone();
        std::thread::Builder::new()
            .name("ft-probe".into())
            .spawn(move || {
                for answer in questions {
                    let _ = answer.send(probe_storage(&probe, &folder));
                }
            })?;
        let m = Monitor {
            config: Arc::new(config),
            state: Arc::default(),
            prober: Arc::new(prober),
        };
        let w = m.clone();
        std::thread::Builder::new()
            .name("ft-health".into())
            .spawn(move || w.watch())?;
        Ok(m)
    }

    /// What this host has lost now.
    pub fn current(&self) -> HostHealth {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        HostHealth {
            storage: st.storage.lost(),
            uplink: st.uplink.lost(),
        }
    }

    /// What this host lacks right now, without waiting for the hold: storage probed now
    /// (bounded by [`PROBE_TIMEOUT`]), the uplink as its latest look found it. A copy asked
    /// to take the VM over answers with this: a loss that hit both hosts at once is not
    /// yet a loss after the hold on either.
    pub fn fresh(&self) -> HostHealth {
        let storage = self.storage_now();
        let uplink = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .uplink
            .failing();
        HostHealth { storage, uplink }.bounded()
    }

    /// Probe storage now (an operation just failed with an I/O error): why it is
    /// unreachable, or `None` if it answers.
    pub fn storage_now(&self) -> Option<String> {
        // On the prober's thread: a hung file system must not hold the VM past the bound.
        let Some(rx) = self.ask() else {
            return Some("the storage prober has stopped".into());
        };
        match rx.recv_timeout(PROBE_TIMEOUT) {
            Ok(r) => r.err(),
            Err(_) => Some(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
        }
    }

    fn watch(&self) {
        let mut last_probe: Option<Instant> = None;
        // One probe at a time: a hung one is waited for no longer than PROBE_TIMEOUT, and
        // no second is started while it hangs.
        let mut pending: Option<(Instant, std::sync::mpsc::Receiver<Answer>)> = None;
        loop {
            std::thread::sleep(TICK);
            if let Some(ifname) = &self.config.uplink {
                let r = carrier(ifname);
                self.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .uplink
                    .saw(r, self.config.hold, "the VM network's uplink");
            }
            let result = match &pending {
                Some((started, rx)) => match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(std::sync::mpsc::TryRecvError::Empty)
                        if started.elapsed() < PROBE_TIMEOUT =>
                    {
                        None
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => Some(Err(format!(
                        "no answer within {} ms",
                        PROBE_TIMEOUT.as_millis()
                    ))),
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        Some(Err("the probe ended without an answer".into()))
                    }
                },
                None => None,
            };
            if let Some(r) = result {
                let timed_out = r.as_ref().is_err_and(|w| w.starts_with("no answer"));
                if !timed_out {
                    pending = None;
                }
                self.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .storage
                    .saw(r, self.config.hold, "shared storage");
            }
            if pending.is_none() && last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY) {
                pending = self.ask().map(|rx| (Instant::now(), rx));
                last_probe = Some(Instant::now());
            }
        }
    }

    /// Ask the prober for a storage probe: where its answer will come.
    fn ask(&self) -> Option<std::sync::mpsc::Receiver<Answer>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.prober.send(tx).ok().map(|()| rx)
    }
}

/// Write, sync and read back a small file in the VM's folder.
fn probe_storage(probe: &std::path::Path, folder: &std::path::Path) -> Result<(), String> {
    use std::io::{Read, Write};
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        .to_le_bytes();
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", folder.display());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(probe)
        .map_err(|e| fail("cannot write in", e))?;
    f.write_all(&stamp)
        .and_then(|_| f.sync_data())
        .map_err(|e| fail("cannot write in", e))?;
    let mut back = [0u8; 8];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut back))
        .map_err(|e| fail("cannot read in", e))?;
    if back != stamp {
        return Err(format!(
            "{} reads back what was not written",
            folder.display()
        ));
    }
    Ok(())
}

/// The carrier of interface `ifname` in this network namespace.
fn carrier(ifname: &str) -> Result<(), String> {
    let path = format!("/sys/class/net/{ifname}/carrier");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim() == "1" => Ok(()),
        Ok(_) => Err(format!("{ifname} has no carrier")),
        // Reading the carrier of a link that is down fails with EINVAL.
        Err(e) => Err(format!("{ifname}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_shorter_than_the_hold_is_not_a_loss_and_one_success_ends_a_loss() {
        let hold = Duration::from_millis(60);
        let mut p = Path::default();
        p.saw(Err("down".into()), hold, "x");
        assert!(p.lost().is_none());
        std::thread::sleep(Duration::from_millis(30));
        p.saw(Ok(()), hold, "x");
        p.saw(Err("down".into()), hold, "x");
        std::thread::sleep(Duration::from_millis(30));
        p.saw(Err("down".into()), hold, "x");
        assert!(p.lost().is_none(), "a flap restarts the hold");
        std::thread::sleep(Duration::from_millis(40));
        p.saw(Err("still down".into()), hold, "x");
        assert_eq!(p.lost().as_deref(), Some("still down"));
        p.saw(Ok(()), hold, "x");
        assert!(p.lost().is_none());
    }

    #[test]
    fn storage_is_probed_in_the_folder_and_a_missing_folder_is_lost_after_the_hold() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("vm");
        std::fs::create_dir(&folder).unwrap();
        let m = Monitor::start(HealthConfig {
            folder: folder.clone(),
            uplink: Some("lo".into()),
            hold: Duration::from_millis(100),
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(m.current().ok(), "{:?}", m.current());
        assert!(m.storage_now().is_none());
        std::fs::remove_dir_all(&folder).unwrap();
        assert!(m.storage_now().is_some());
        let deadline = Instant::now() + Duration::from_secs(3);
        while m.current().storage.is_none() {
            assert!(Instant::now() < deadline, "storage loss never seen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let lost = m.current().lost().unwrap();
        assert!(lost.starts_with("its storage"), "{lost}");
        std::fs::create_dir(&folder).unwrap();
        while m.current().storage.is_some() {
            assert!(Instant::now() < deadline, "storage never found again");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_interface_without_carrier_or_absent_is_a_lost_uplink() {
        assert!(carrier("no-such-if0").is_err());
        let h = HostHealth {
            storage: None,
            uplink: Some("x".repeat(1000)),
        }
        .bounded();
        assert_eq!(h.uplink.as_ref().map(|w| w.len()), Some(MAX_WHY));
        assert!(!h.ok());
    }
}
