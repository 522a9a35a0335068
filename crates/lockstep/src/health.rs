//! What a copy's host reaches, for the failures the logging channel cannot see: the VM's
//! folder on shared storage, and the VM network's uplink.
//!
//! A [`Monitor`] probes both from a thread of its own: storage by writing, syncing and
//! reading back a small file in the VM's folder (each probe bounded by [`PROBE_TIMEOUT`]:
//! a hung file system is a lost one; the file is removed after each probe), the uplink by
//! its carrier in `/sys/class/net` and, if peers are configured (the gateway, the other
//! hosts' or a client's VM-network addresses), by their reachability through it: a thread
//! sends each an ARP probe (RFC 5227: no sender address, the host having none on the VM
//! network) out of the uplink on a packet socket and waits for a reply. The uplink fails
//! while it has no carrier or no peer answers (one answering is enough). A path is *lost*
//! only after it failed continuously for the hold time, so a flap shorter than that does
//! nothing (and is logged as ignored), and found again at its first success. The peers'
//! silence is held at least [`PEER_HOLD`]: a round that found no answer is not a loss while
//! the next one can still answer in time.
//!
//! The secondary sends its host's health to the primary (`ToPrimary::Health`); the primary
//! hands the VM over when its own host lost a path the secondary's host has, and the
//! secondary's host lacks none this one has ([`HostHealth::better_than`]; see
//! `primary::Primary::watch_health`), and reports the VM not protected while the
//! secondary's host lacks one. Reports come after the hold, so a loss on both hosts at once
//! is not yet reported when the primary asks: the secondary then looks afresh
//! ([`Monitor::fresh`]: storage probed, the carrier read and the peers asked, then and
//! there) and declines (`ToPrimary::Declined`) without every path.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
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
/// How long the peers have to answer one round of ARP probes.
const PEER_WAIT: Duration = Duration::from_millis(200);
/// The shortest hold of the peers' silence, whatever the configured hold: a failed round's
/// verdict stands while the next round runs (up to [`PEER_WAIT`]), so a shorter hold would
/// take one round unanswered and the next answered late but in time for a loss. Held this
/// long, a loss takes two rounds in a row unanswered.
const PEER_HOLD: Duration = PEER_WAIT.saturating_add(PROBE_EVERY);
/// The most peers one host watches.
pub const MAX_PEERS: usize = 16;
/// How long a path must fail before it counts as lost, unless configured
/// (`ft ... --health-hold-ms`). Under Linux's 200 ms minimum retransmission timeout: a
/// client's request lost at the cut is sent again once about 200 ms later, and then only
/// about 400 ms after that. A carrier or storage loss is seen within a `TICK`, held this
/// long, told to the primary's watcher at once, and the VM handed over (a few ms)
/// before that first retransmission, so it lands on the new live copy: with a 300 ms hold
/// the lab's clients waited about 620 ms across an uplink's carrier loss, with this one
/// about 210 ms, as across a host's death (`tandem bench ft`, `uplink_handover_ms`). The
/// peers' silence takes a round of [`PEER_WAIT`] and [`PEER_HOLD`] to tell: its handover
/// comes after that retransmission (about 650 ms in the lab).
pub const DEFAULT_HOLD_MS: u64 = 150;

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
    /// Addresses on the VM network that must be reachable through the uplink (one of them
    /// answering is enough); none: the carrier alone is watched. Needs `uplink`.
    pub peers: Vec<Ipv4Addr>,
    /// A path is lost only after failing continuously this long (the peers' silence: at
    /// least [`PEER_HOLD`]).
    pub hold: Duration,
}

/// One path's failures so far.
#[derive(Default)]
struct Path {
    failing_since: Option<Instant>,
    why: Option<String>,
    /// The hold its latest failure was held to (what a flap it ends was shorter than).
    hold: Duration,
    lost: bool,
}

impl Path {
    fn saw(&mut self, result: Result<(), String>, hold: Duration, what: &str) {
        match result {
            Ok(()) => {
                if self.lost {
                    tracing::warn!("{what} reachable again");
                } else if let Some(since) = self.failing_since {
                    tracing::info!(
                        "{what}: a flap of {} ms ignored (shorter than the {} ms hold): {}",
                        since.elapsed().as_millis(),
                        self.hold.as_millis(),
                        self.why.as_deref().unwrap_or("")
                    );
                }
                *self = Path::default();
            }
            Err(why) => {
                self.hold = hold;
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
}

#[derive(Default)]
struct State {
    storage: Path,
    uplink: Path,
    /// The latest round of peer probes: when it started, and whether a peer answered.
    peers: Option<(Instant, Result<(), String>)>,
}

impl State {
    fn health(&self) -> HostHealth {
        HostHealth {
            storage: self.storage.lost(),
            uplink: self.uplink.lost(),
        }
    }
}

/// A storage probe's answer.
type Answer = Result<(), String>;

/// Watches this host's paths (a handle: clones watch the same).
#[derive(Clone)]
pub struct Monitor {
    config: Arc<HealthConfig>,
    state: Arc<Mutex<State>>,
    /// Notified when what this host has lost ([`Monitor::current`]) changes, so that those
    /// who act on it wait for a change instead of looking every tick.
    changed: Arc<Condvar>,
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
                    let r = probe_storage(&probe, &folder);
                    // Nothing is left in the VM's folder, whenever the process ends.
                    let _ = std::fs::remove_file(&probe);
                    let _ = answer.send(r);
                }
            })?;
        let m = Monitor {
            config: Arc::new(config),
            state: Arc::default(),
            changed: Arc::default(),
            prober: Arc::new(prober),
        };
        if let Some(ifname) = m
            .config
            .uplink
            .clone()
            .filter(|_| !m.config.peers.is_empty())
        {
            let w = m.clone();
            std::thread::Builder::new()
                .name("ft-peers".into())
                .spawn(move || {
                    loop {
                        let started = Instant::now();
                        let r = peers_answer(&ifname, &w.config.peers, PEER_WAIT);
                        w.state.lock().unwrap_or_else(|p| p.into_inner()).peers =
                            Some((started, r));
                        std::thread::sleep(PROBE_EVERY.saturating_sub(started.elapsed()));
                    }
                })?;
        }
        let w = m.clone();
        std::thread::Builder::new()
            .name("ft-health".into())
            .spawn(move || w.watch())?;
        Ok(m)
    }

    /// What this host has lost now.
    pub fn current(&self) -> HostHealth {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .health()
    }

    /// What this host has lost, once it differs from `seen`, or after `limit`.
    pub fn wait_change(&self, seen: &HostHealth, limit: Duration) -> HostHealth {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.changed
            .wait_timeout_while(st, limit, |st| st.health() == *seen)
            .map(|r| r.0)
            .unwrap_or_else(|p| p.into_inner().0)
            .health()
    }

    /// What this host lacks right now, without waiting for the hold: storage probed now
    /// (bounded by [`PROBE_TIMEOUT`]), the uplink's carrier read now and its peers asked
    /// now (bounded by [`PEER_WAIT`]). A copy asked to take the VM over answers with this:
    /// a loss that hit both hosts at once is not yet a loss after the hold on either, and
    /// a carrier lost on one host is told long before a silence of the peers on the other.
    pub fn fresh(&self) -> HostHealth {
        let storage = self.storage_now();
        let uplink = self.config.uplink.as_deref().and_then(|ifname| {
            carrier(ifname)
                .and_then(|()| match self.config.peers.as_slice() {
                    [] => Ok(()),
                    peers => peers_answer(ifname, peers, PEER_WAIT),
                })
                .err()
        });
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
        // Since when the uplink has had carrier: peer probes sent before then say nothing of
        // it now (a probe lost in a carrier flap must not stretch the flap).
        let mut carrier_since: Option<Instant> = None;
        let mut told = HostHealth::default();
        loop {
            std::thread::sleep(TICK);
            if let Some(ifname) = &self.config.uplink {
                let mut r = carrier(ifname);
                if r.is_err() {
                    carrier_since = None;
                }
                let since = *carrier_since.get_or_insert_with(Instant::now);
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let mut hold = self.config.hold;
                if r.is_ok()
                    && let Some((started, Err(why))) = &st.peers
                    && *started >= since
                {
                    r = Err(why.clone());
                    hold = hold.max(PEER_HOLD);
                }
                st.uplink.saw(r, hold, "the VM network's uplink");
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
            let now = self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .health();
            if now != told {
                told = now;
                self.changed.notify_all();
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

/// Whether any of `peers` answers an ARP probe sent out of interface `ifname` within `wait`.
fn peers_answer(ifname: &str, peers: &[Ipv4Addr], wait: Duration) -> Result<(), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let list = peers
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let fail = |why: String| format!("no peer ({list}) answers through {ifname}: {why}");
    let mac = mac_of(ifname).map_err(fail)?;
    let name = std::ffi::CString::new(ifname).map_err(|e| fail(e.to_string()))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) takes no pointers; the descriptor returned is owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            all as i32,
        )
    };
    if raw < 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: `raw` is a descriptor just returned by socket(2) and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
    let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    at.sll_family = libc::AF_PACKET as u16;
    at.sll_protocol = all;
    at.sll_ifindex = ifindex as i32;
    at.sll_halen = 6;
    at.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `at` is a valid sockaddr_ll of `len` bytes, alive for the call.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const at).cast(), len) } != 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    for peer in peers {
        let frame = arp_probe(&mac, *peer);
        // SAFETY: `frame` and `at` are valid for the lengths given and alive for the call.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const at).cast(),
                len,
            )
        };
        if sent < 0 {
            return Err(fail(std::io::Error::last_os_error().to_string()));
        }
    }
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(format!("no ARP reply within {} ms", wait.as_millis())));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd, alive for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: `buf` is valid for writes of its length for the call.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 && arp_reply_from(&buf[..n as usize], peers) {
            return Ok(());
        }
    }
}

/// An ARP probe for `peer` from a host with hardware address `mac` and no IP address.
fn arp_probe(mac: &[u8; 6], peer: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, a request.
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(mac);
    // Sender address 0.0.0.0, target hardware address unknown: a probe.
    f[38..42].copy_from_slice(&peer.octets());
    f
}

/// Whether `frame` is an ARP reply from one of `peers`.
fn arp_reply_from(frame: &[u8], peers: &[Ipv4Addr]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 2]
        && peers.iter().any(|p| frame[28..32] == p.octets())
}

/// The hardware address of interface `ifname`.
fn mac_of(ifname: &str) -> Result<[u8; 6], String> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .map_err(|e| format!("{ifname}: {e}"))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    bytes
        .try_into()
        .map_err(|_| format!("{ifname} has no Ethernet address"))
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
            peers: vec![],
            hold: Duration::from_millis(100),
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(m.current().ok(), "{:?}", m.current());
        assert!(m.storage_now().is_none());
        // Nothing changes: a waiter waits its limit.
        let ok = m.current();
        let start = Instant::now();
        assert_eq!(m.wait_change(&ok, Duration::from_millis(200)), ok);
        assert!(start.elapsed() >= Duration::from_millis(200));
        std::fs::remove_dir_all(&folder).unwrap();
        assert!(m.storage_now().is_some());
        // The loss wakes a waiter.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut h = ok;
        while h.storage.is_none() {
            assert!(Instant::now() < deadline, "storage loss never seen");
            h = m.wait_change(&h, deadline.saturating_duration_since(Instant::now()));
        }
        let lost = h.lost().unwrap();
        assert!(lost.starts_with("its storage"), "{lost}");
        std::fs::create_dir(&folder).unwrap();
        // So does finding it again.
        while h.storage.is_some() {
            assert!(Instant::now() < deadline, "storage never found again");
            h = m.wait_change(&h, deadline.saturating_duration_since(Instant::now()));
        }
    }

    #[test]
    fn a_handover_goes_only_to_a_host_no_worse_on_any_path_and_better_on_one() {
        let h = |storage: bool, uplink: bool| HostHealth {
            storage: (!storage).then(|| "lost".into()),
            uplink: (!uplink).then(|| "lost".into()),
        };
        // (peer, own): whether the peer may take over.
        assert!(h(true, true).better_than(&h(false, true)));
        assert!(h(true, true).better_than(&h(true, false)));
        assert!(h(true, false).better_than(&h(false, false)));
        assert!(
            !h(true, true).better_than(&h(true, true)),
            "nothing lost here"
        );
        assert!(!h(false, true).better_than(&h(false, true)), "lost on both");
        assert!(
            !h(false, true).better_than(&h(true, false)),
            "storage traded for the VM network"
        );
        assert!(!h(true, false).better_than(&h(false, true)));
    }

    #[test]
    fn an_arp_probe_has_no_sender_address_and_only_a_peers_reply_counts() {
        let mac = [2, 0, 0, 0, 0, 9];
        let peer = Ipv4Addr::new(10, 77, 0, 2);
        let probe = arp_probe(&mac, peer);
        assert_eq!(&probe[28..32], &[0, 0, 0, 0]);
        assert_eq!(&probe[38..42], &peer.octets());
        assert!(!arp_reply_from(&probe, &[peer]), "a request is no reply");
        let mut reply = probe;
        reply[20..22].copy_from_slice(&[0, 2]);
        reply[28..32].copy_from_slice(&peer.octets());
        assert!(arp_reply_from(&reply, &[peer]));
        assert!(!arp_reply_from(&reply, &[Ipv4Addr::new(10, 77, 0, 3)]));
        assert!(!arp_reply_from(&reply[..41], &[peer]), "a short frame");
        assert!(peers_answer("no-such-if0", &[peer], PEER_WAIT).is_err());
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
