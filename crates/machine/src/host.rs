//! The live host: the only code that touches the real datastore, clock, entropy and stdin.
//!
//! Every method performs one host operation and returns its [`Outcome`]; the caller turns
//! that into an event, so whatever the host answered is exactly what the log holds. Host
//! file handles are keyed by guest descriptor and are *not* VM state: a copy going live
//! rebuilds them from the [`FdTable`] with [`LiveHost::from_state`]. The datastore's file
//! operations, sandboxed by the kernel, are in [`crate::datastore`].
//!
//! Invariant: no method panics on any host answer; failures become WASI errnos.
//!
//! Waking a wait. A network wait with no deadline blocks until a frame or stdin arrives;
//! a request that needs the VM at its next snapshot point (a snapshot through the
//! control API, an API stop) wakes it through a process-wide [`crate::notice::Notice`]
//! ([`wake_waits`]), whose descriptor the wait polls beside its inputs.
//! The woken wait returns an ordinary outcome with no frames (recorded and replayed like
//! any other), after which the guest reaches a snapshot point (unless its stack holds a
//! call made through a function pointer: see [`crate::capture::unwindable`]). Each wake
//! ends one wait.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::VmClock;
use crate::event::{Outcome, PollEvent};
use crate::fdtable::FdTable;
use crate::wasi::{clockid, errno, eventtype};

/// What wakes network waits (see the module docs).
static WAKE: crate::notice::Notice = crate::notice::Notice::new();

/// The descriptor a network wait polls to be woken; `None` if the kernel gave no pipe, and
/// then a wait is woken only by its own inputs.
fn wake_fd() -> Option<RawFd> {
    WAKE.arm();
    WAKE.fd()
}

/// Wake the network wait of this process's VM (or its next one): it returns at once with
/// what it has, so that the VM reaches its next snapshot point.
pub fn wake_waits() {
    WAKE.arm();
    WAKE.give();
}

/// Consume a pending wake, if any.
pub(crate) fn clear_wake() {
    WAKE.wait(true, Some(std::time::Duration::ZERO));
}

/// One `poll_oneoff` subscription, decoded from guest memory.
#[derive(Clone, Debug)]
pub enum Subscription {
    Clock {
        userdata: u64,
        id: u32,
        /// Nanoseconds of VM time at which it fires.
        deadline: u64,
    },
    /// Readiness of a descriptor; `ready` is known without asking the host (files, console
    /// output) unless it is `None` (stdin).
    Fd {
        userdata: u64,
        kind: u8,
        ready: Option<Result<u64, u16>>,
    },
}

pub struct LiveHost {
    /// The datastore, when the VM has one.
    pub(crate) root: Option<Root>,
    /// Host handles of the guest's open files and directories, by guest descriptor.
    pub(crate) files: HashMap<u32, Arc<File>>,
    pub(crate) dirs: HashMap<u32, OwnedFd>,
    /// The VM's NIC on this host.
    tap: Option<Arc<devices::Tap>>,
    /// Where frames are read from the tap: one buffer for the VM's life, not one a step.
    frame_buf: Vec<u8>,
    /// VM monotonic time = host monotonic time + this offset.
    mono_offset: i128,
    /// A copy that went live holding its predecessor's intent for the next operation.
    pub(crate) uncertain: Option<crate::event::Intent>,
    /// The operation at hand was performed before the go-live: an exclusive create opens
    /// the file it created.
    pub(crate) redo: bool,
    /// Some descriptor of the table could not be found again (see
    /// [`LiveHost::reopen_missing`]).
    pub(crate) missing: bool,
    /// What writes performed later need to know ([`LiveHost::write_behind`]).
    pub(crate) behind: Box<crate::datastore::Behind>,
}

/// The datastore on this host: every guest path is resolved by the kernel beneath it.
pub(crate) struct Root {
    /// Its canonical path, to turn a descriptor's kernel path into a datastore path.
    pub(crate) path: PathBuf,
    /// Where files unlinked or replaced while open are set aside: a folder beside the
    /// datastore (`.NAME.aside`), on the same file system and outside the guest's reach.
    pub(crate) aside: Option<PathBuf>,
    /// The datastore folder itself, which every reopened path is resolved beneath.
    pub(crate) fd: OwnedFd,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot open the datastore {path}: {source}")]
    Datastore { path: PathBuf, source: io::Error },
}
fn host_monotonic() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn host_realtime() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Map a host I/O error to the WASI errno the guest sees.
pub fn errno_of(e: &io::Error) -> u16 {
    match e.raw_os_error() {
        Some(libc::ENOENT) => errno::NOENT,
        Some(libc::EEXIST) => errno::EXIST,
        Some(libc::EACCES) => errno::ACCES,
        Some(libc::EPERM) => errno::PERM,
        Some(libc::ENOTDIR) => errno::NOTDIR,
        Some(libc::EISDIR) => errno::ISDIR,
        Some(libc::ENOTEMPTY) => errno::NOTEMPTY,
        Some(libc::ENOSPC) => errno::NOSPC,
        Some(libc::EDQUOT) => errno::DQUOT,
        Some(libc::EINVAL) => errno::INVAL,
        Some(libc::ENAMETOOLONG) => errno::NAMETOOLONG,
        Some(libc::ELOOP) => errno::LOOP,
        Some(libc::EBADF) => errno::BADF,
        Some(libc::EFBIG) => errno::FBIG,
        Some(libc::EROFS) => errno::ROFS,
        Some(libc::EXDEV) => errno::XDEV,
        Some(libc::EBUSY) => errno::BUSY,
        Some(libc::EMFILE) => errno::MFILE,
        Some(libc::ENFILE) => errno::NFILE,
        Some(libc::EAGAIN) => errno::AGAIN,
        Some(libc::EINTR) => errno::INTR,
        Some(libc::ENOMEM) => errno::NOMEM,
        Some(libc::ESPIPE) => errno::SPIPE,
        Some(libc::ENXIO) => errno::NXIO,
        Some(libc::EOVERFLOW) => errno::OVERFLOW,
        Some(libc::EMLINK) => errno::MLINK,
        Some(libc::ETXTBSY) => errno::TXTBSY,
        Some(libc::EOPNOTSUPP) => errno::NOTSUP,
        Some(_) => errno::IO,
        // Errors the standard library makes up (no OS error) are invalid arguments, such
        // as a length beyond what the file system takes.
        None => errno::INVAL,
    }
}

impl LiveHost {
    /// A live host for a VM whose state is `fds` and `clock`: reopens every file and
    /// directory the guest holds open and continues the VM's monotonic clock from its last
    /// reading. A descriptor whose file cannot be found again is reported and answers EIO;
    /// only a datastore that cannot be opened at all is an error.
    pub fn from_state(
        root: Option<&Path>,
        fds: &FdTable,
        clock: &VmClock,
    ) -> Result<Self, HostError> {
        let mut host = LiveHost {
            root: None,
            files: HashMap::new(),
            dirs: HashMap::new(),
            tap: None,
            frame_buf: Vec::new(),
            mono_offset: 0,
            uncertain: None,
            redo: false,
            missing: false,
            behind: Default::default(),
        };
        let now = host_monotonic() as i128;
        if (clock.last_monotonic as i128) > now {
            host.mono_offset = clock.last_monotonic as i128 - now;
        }
        if let Some(root) = root {
            host.open_datastore(root, fds)?;
        }
        Ok(host)
    }

    /// Give the VM its NIC on this host (frames are read here; sending them is the output
    /// port's).
    pub fn attach_tap(&mut self, tap: Arc<devices::Tap>) {
        self.tap = Some(tap);
    }

    fn monotonic(&self) -> u64 {
        (host_monotonic() as i128 + self.mono_offset).max(0) as u64
    }

    /// The network's inputs: the frames waiting on the tap, after waiting (if `wait`) until
    /// one arrives, stdin becomes readable (if `watch_stdin`), or `deadline` passes.
    pub fn net_wait(&mut self, deadline: Option<u64>, wait: bool, watch_stdin: bool) -> Outcome {
        const MAX_FRAMES: usize = 256;
        let mut frames = Vec::new();
        // A frame is at most the tap's MTU plus headers; 64 KiB covers any offload size.
        let mut buf = std::mem::take(&mut self.frame_buf);
        buf.resize(65536, 0);
        let wake = if wait { wake_fd() } else { None };
        let mut woken = false;
        loop {
            if let Some(tap) = &self.tap {
                while frames.len() < MAX_FRAMES {
                    match tap.recv(&mut buf) {
                        Ok(Some(n)) => frames.push(crate::event::Bytes::from(buf[..n].to_vec())),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("tap {}: receive failed: {e}", tap.name());
                            break;
                        }
                    }
                }
            }
            let stdin = watch_stdin && stdin_ready(0);
            let now = self.monotonic();
            let timeout_ms = match deadline {
                Some(d) if d <= now => 0,
                Some(d) => (d - now).div_ceil(1_000_000).min(i32::MAX as u64) as i32,
                None => -1,
            };
            if !frames.is_empty()
                || stdin
                || !wait
                || timeout_ms == 0
                || woken
                || crate::vm::stop_requested()
            {
                self.frame_buf = buf;
                return Outcome::Net { now, frames, stdin };
            }
            let mut fds = Vec::with_capacity(2);
            if let Some(tap) = &self.tap {
                fds.push(libc::pollfd {
                    fd: tap.raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if watch_stdin {
                fds.push(libc::pollfd {
                    fd: 0,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            if let Some(fd) = wake {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if let Some(fd) = wake
                && fds.iter().any(|p| p.fd == fd && p.revents != 0)
            {
                clear_wake();
                woken = true;
            }
        }
    }

    pub fn now(&self, id: u32) -> Outcome {
        match id {
            clockid::REALTIME => Outcome::Value(host_realtime()),
            clockid::MONOTONIC | clockid::PROCESS_CPUTIME | clockid::THREAD_CPUTIME => {
                Outcome::Value(self.monotonic())
            }
            _ => Outcome::Errno(errno::INVAL),
        }
    }

    pub fn random(&self, len: usize) -> Outcome {
        let mut buf = crate::event::Bytes::buffer(len);
        let mut filled = 0;
        while filled < len {
            // SAFETY: the pointer and length describe the unfilled tail of `buf`.
            let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), len - filled, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Outcome::Errno(errno_of(&e));
            }
            filled += n as usize;
        }
        Outcome::Data(buf.into())
    }

    pub fn read_stdin(&self, len: usize) -> Outcome {
        let mut buf = vec![0u8; len];
        match io::stdin().lock().read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Outcome::Data(buf.into())
            }
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    /// Wait until a subscription is ready or a clock fires. `now` reads VM time.
    pub fn poll(&self, subs: &[Subscription], now: impl Fn(u32) -> u64) -> Outcome {
        loop {
            let mut events = Vec::new();
            let mut wait_stdin = None;
            for s in subs {
                if let Subscription::Fd {
                    userdata,
                    kind,
                    ready,
                } = s
                {
                    let ready = match ready {
                        Some(r) => *r,
                        None => {
                            wait_stdin = Some(*userdata);
                            if stdin_ready(0) { Ok(0) } else { continue }
                        }
                    };
                    events.push(PollEvent {
                        userdata: *userdata,
                        error: ready.err().unwrap_or(0),
                        kind: *kind,
                        nbytes: ready.unwrap_or(0),
                        flags: 0,
                    });
                }
            }
            let mut earliest: Option<u64> = None;
            for s in subs {
                if let Subscription::Clock {
                    userdata,
                    id,
                    deadline,
                } = s
                {
                    let t = now(*id);
                    if t >= *deadline {
                        events.push(PollEvent {
                            userdata: *userdata,
                            error: 0,
                            kind: eventtype::CLOCK,
                            nbytes: 0,
                            flags: 0,
                        });
                    } else {
                        let left = deadline - t;
                        earliest = Some(earliest.map_or(left, |e| e.min(left)));
                    }
                }
            }
            if !events.is_empty() || crate::vm::stop_requested() {
                return Outcome::Polled(events);
            }
            match (earliest, wait_stdin) {
                (Some(ns), Some(_)) => {
                    stdin_ready(ns.div_ceil(1_000_000).min(i32::MAX as u64) as i32);
                }
                // Sleep in slices so that a stop request is noticed.
                (Some(ns), None) => {
                    std::thread::sleep(std::time::Duration::from_nanos(ns.min(50_000_000)))
                }
                (None, Some(_)) => {
                    stdin_ready(50);
                }
                (None, None) => return Outcome::Errno(errno::INVAL),
            }
        }
    }
}

/// Whether host stdin is readable within `timeout_ms` (-1: wait for ever).
fn stdin_ready(timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd, alive for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait with nothing to wait for (no NIC, no stdin, no deadline) blocks for ever;
    /// a wake ends it with an outcome that holds no frames.
    #[test]
    fn a_wake_ends_a_wait_without_deadline() {
        let mut host = LiveHost::from_state(None, &FdTable::new(false, &[]), &VmClock::default())
            .expect("a host without datastore");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(host.net_wait(None, true, false));
        });
        // Woken again and again: another test of this process may consume a wake.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let outcome = loop {
            wake_waits();
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(o) => break o,
                Err(_) => assert!(
                    std::time::Instant::now() < deadline,
                    "the wait was never woken"
                ),
            }
        };
        assert!(
            matches!(&outcome, Outcome::Net { frames, stdin: false, .. } if frames.is_empty()),
            "{outcome:?}"
        );
    }
}
