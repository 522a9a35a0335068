//! The live host: the only code that touches the real datastore, clock, entropy and stdin.
//!
//! Every method performs one host operation and returns its [`Outcome`]; the caller turns
//! that into an event, so whatever the host answered is exactly what the log holds. Host
//! file handles are keyed by guest descriptor and are *not* VM state: a copy going live
//! rebuilds them from the [`FdTable`] with [`LiveHost::from_state`].
//!
//! Invariant: no method panics on any host answer; failures become WASI errnos.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::VmClock;
use crate::event::{Filestat, Outcome, PollEvent};
use crate::fdtable::{FdKind, FdTable};
use crate::wasi::{clockid, errno, eventtype, filetype, fstflags, oflags};

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
    root: Option<PathBuf>,
    files: HashMap<u32, File>,
    /// The VM's NIC on this host.
    tap: Option<Arc<devices::Tap>>,
    /// Where frames are read from the tap: one buffer for the VM's life, not one a step.
    frame_buf: Vec<u8>,
    /// VM monotonic time = host monotonic time + this offset.
    mono_offset: i128,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot reopen {path} for descriptor {fd}: {source}")]
    Reopen {
        fd: u32,
        path: PathBuf,
        source: io::Error,
    },
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
        _ => errno::IO,
    }
}

fn outcome(r: io::Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Errno(errno_of(&e)),
    }
}

fn stat_of(m: &std::fs::Metadata) -> Filestat {
    let ft = m.file_type();
    let filetype = if ft.is_dir() {
        filetype::DIRECTORY
    } else if ft.is_file() {
        filetype::REGULAR_FILE
    } else if ft.is_symlink() {
        filetype::SYMBOLIC_LINK
    } else if ft.is_block_device() {
        filetype::BLOCK_DEVICE
    } else if ft.is_char_device() {
        filetype::CHARACTER_DEVICE
    } else {
        filetype::UNKNOWN
    };
    let ns = |s: i64, n: i64| (s.max(0) as u64) * 1_000_000_000 + n.max(0) as u64;
    Filestat {
        dev: m.dev(),
        ino: m.ino(),
        filetype,
        nlink: m.nlink(),
        size: m.size(),
        atim: ns(m.atime(), m.atime_nsec()),
        mtim: ns(m.mtime(), m.mtime_nsec()),
        ctim: ns(m.ctime(), m.ctime_nsec()),
    }
}

fn timespecs(atim: u64, mtim: u64, flags: u16) -> [libc::timespec; 2] {
    let one = |t: u64, set: u16, now: u16| libc::timespec {
        tv_sec: (t / 1_000_000_000) as libc::time_t,
        tv_nsec: if flags & now != 0 {
            libc::UTIME_NOW
        } else if flags & set != 0 {
            (t % 1_000_000_000) as libc::c_long
        } else {
            libc::UTIME_OMIT
        },
    };
    [
        one(atim, fstflags::ATIM, fstflags::ATIM_NOW),
        one(mtim, fstflags::MTIM, fstflags::MTIM_NOW),
    ]
}

fn cpath(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl LiveHost {
    /// A live host for a VM whose state is `fds` and `clock`: reopens every file the guest
    /// holds open and continues the VM's monotonic clock from its last reading.
    pub fn from_state(
        root: Option<&Path>,
        fds: &FdTable,
        clock: &VmClock,
    ) -> Result<Self, HostError> {
        let mut host = LiveHost {
            root: root.map(Path::to_path_buf),
            files: HashMap::new(),
            tap: None,
            frame_buf: Vec::new(),
            mono_offset: 0,
        };
        let now = host_monotonic() as i128;
        if (clock.last_monotonic as i128) > now {
            host.mono_offset = clock.last_monotonic as i128 - now;
        }
        for (fd, kind) in fds.iter() {
            if let FdKind::File {
                path, read, write, ..
            } = kind
            {
                let full = host
                    .root
                    .as_deref()
                    .unwrap_or(Path::new("/nonexistent"))
                    .join(path);
                let file = OpenOptions::new()
                    .read(*read)
                    .write(*write)
                    .open(&full)
                    .map_err(|source| HostError::Reopen {
                        fd,
                        path: full.clone(),
                        source,
                    })?;
                host.files.insert(fd, file);
            }
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
        loop {
            if let Some(tap) = &self.tap {
                while frames.len() < MAX_FRAMES {
                    match tap.recv(&mut buf) {
                        Ok(Some(n)) => frames.push(serde_bytes::ByteBuf::from(buf[..n].to_vec())),
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
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        }
    }

    fn path(&self, rel: &str) -> Result<PathBuf, u16> {
        let root = self.root.as_ref().ok_or(errno::NOTCAPABLE)?;
        Ok(if rel.is_empty() {
            root.clone()
        } else {
            root.join(rel)
        })
    }

    fn file(&self, fd: u32) -> Result<&File, u16> {
        self.files.get(&fd).ok_or(errno::BADF)
    }

    fn with_path(&self, rel: &str, f: impl FnOnce(&Path) -> io::Result<()>) -> Outcome {
        match self.path(rel) {
            Ok(p) => outcome(f(&p)),
            Err(e) => Outcome::Errno(e),
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
        let mut buf = vec![0u8; len];
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
        Outcome::Data(buf)
    }

    pub fn read_stdin(&self, len: usize) -> Outcome {
        let mut buf = vec![0u8; len];
        match io::stdin().lock().read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Outcome::Data(buf)
            }
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn open(&mut self, fd: u32, rel: &str, oflags_: u16, read: bool, write: bool) -> Outcome {
        let path = match self.path(rel) {
            Ok(p) => p,
            Err(e) => return Outcome::Errno(e),
        };
        let meta = std::fs::metadata(&path);
        if let Ok(m) = &meta {
            if oflags_ & oflags::CREAT != 0 && oflags_ & oflags::EXCL != 0 {
                return Outcome::Errno(errno::EXIST);
            }
            if m.is_dir() {
                if write || oflags_ & oflags::TRUNC != 0 {
                    return Outcome::Errno(errno::ISDIR);
                }
                return Outcome::Opened {
                    filetype: filetype::DIRECTORY,
                    size: 0,
                };
            }
            if oflags_ & oflags::DIRECTORY != 0 {
                return Outcome::Errno(errno::NOTDIR);
            }
        } else if oflags_ & oflags::DIRECTORY != 0 {
            return Outcome::Errno(meta.map(|_| errno::NOENT).unwrap_or_else(|e| errno_of(&e)));
        }
        let mut opts = OpenOptions::new();
        opts.read(read || !write)
            .write(write)
            .create(oflags_ & oflags::CREAT != 0 && write)
            .create_new(oflags_ & oflags::EXCL != 0 && oflags_ & oflags::CREAT != 0 && write)
            .truncate(oflags_ & oflags::TRUNC != 0 && write)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
        if oflags_ & oflags::CREAT != 0 && !write {
            // O_CREAT on a read-only open still creates the file, as POSIX does.
            if let Err(e) = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
            {
                return Outcome::Errno(errno_of(&e));
            }
        }
        match opts.open(&path) {
            Ok(f) => {
                let (ft, size) = match f.metadata() {
                    Ok(m) if m.is_file() => (filetype::REGULAR_FILE, m.len()),
                    Ok(_) => (filetype::UNKNOWN, 0),
                    Err(e) => return Outcome::Errno(errno_of(&e)),
                };
                self.files.insert(fd, f);
                Outcome::Opened { filetype: ft, size }
            }
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    pub fn close(&mut self, fd: u32) {
        self.files.remove(&fd);
    }

    pub fn renumber(&mut self, from: u32, to: u32) {
        self.files.remove(&to);
        if let Some(f) = self.files.remove(&from) {
            self.files.insert(to, f);
        }
    }

    pub fn read_at(&self, fd: u32, offset: u64, len: usize) -> Outcome {
        let file = match self.file(fd) {
            Ok(f) => f,
            Err(e) => return Outcome::Errno(e),
        };
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if got == 0 => return Outcome::Errno(errno_of(&e)),
                Err(_) => break,
            }
        }
        buf.truncate(got);
        Outcome::Data(buf)
    }

    /// Write `data` at `at`. Every write is positional, appends included (at the end the VM
    /// knows), so that writing again what a predecessor wrote is harmless.
    pub fn write_at(&self, fd: u32, at: u64, data: &[u8]) -> Outcome {
        let file = match self.file(fd) {
            Ok(f) => f,
            Err(e) => return Outcome::Errno(e),
        };
        match file.write_all_at(data, at) {
            Ok(()) => Outcome::Written {
                n: data.len() as u32,
                offset: at + data.len() as u64,
            },
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    pub fn file_size(&self, fd: u32) -> Outcome {
        match self.file(fd).map(File::metadata) {
            Ok(Ok(m)) => Outcome::Value(m.len()),
            Ok(Err(e)) => Outcome::Errno(errno_of(&e)),
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn sync(&self, fd: u32, kind: &FdKind) -> Outcome {
        match kind {
            FdKind::File { .. } => match self.file(fd) {
                Ok(f) => outcome(f.sync_all()),
                Err(e) => Outcome::Errno(e),
            },
            FdKind::Dir { path, .. } => self.with_path(path, |p| File::open(p)?.sync_all()),
            _ => Outcome::Errno(errno::INVAL),
        }
    }

    pub fn fstat(&self, fd: u32, kind: &FdKind) -> Outcome {
        let meta = match kind {
            FdKind::File { .. } => match self.file(fd) {
                Ok(f) => f.metadata(),
                Err(e) => return Outcome::Errno(e),
            },
            FdKind::Dir { path, .. } => match self.path(path) {
                Ok(p) => std::fs::metadata(p),
                Err(e) => return Outcome::Errno(e),
            },
            _ => {
                return Outcome::Stat(Filestat {
                    filetype: filetype::CHARACTER_DEVICE,
                    nlink: 1,
                    ..Filestat::default()
                });
            }
        };
        match meta {
            Ok(m) => Outcome::Stat(stat_of(&m)),
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    pub fn stat(&self, rel: &str, follow: bool) -> Outcome {
        let p = match self.path(rel) {
            Ok(p) => p,
            Err(e) => return Outcome::Errno(e),
        };
        let m = if follow {
            std::fs::metadata(p)
        } else {
            std::fs::symlink_metadata(p)
        };
        match m {
            Ok(m) => Outcome::Stat(stat_of(&m)),
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    pub fn set_size(&self, fd: u32, size: u64) -> Outcome {
        match self.file(fd) {
            Ok(f) => outcome(f.set_len(size)),
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn allocate(&self, fd: u32, offset: u64, len: u64) -> Outcome {
        match self.file(fd) {
            Ok(f) => match f.metadata() {
                Ok(m) if m.len() < offset.saturating_add(len) => {
                    outcome(f.set_len(offset.saturating_add(len)))
                }
                Ok(_) => Outcome::Done,
                Err(e) => Outcome::Errno(errno_of(&e)),
            },
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn set_times(&self, rel: &str, atim: u64, mtim: u64, flags: u16) -> Outcome {
        let times = timespecs(atim, mtim, flags);
        self.with_path(rel, |p| {
            let c = cpath(p)?;
            // SAFETY: `c` is a NUL-terminated path and `times` two valid timespecs, both
            // alive for the duration of the call.
            let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        })
    }

    pub fn mkdir(&self, rel: &str) -> Outcome {
        self.with_path(rel, |p| std::fs::create_dir(p))
    }

    pub fn rmdir(&self, rel: &str) -> Outcome {
        self.with_path(rel, |p| std::fs::remove_dir(p))
    }

    pub fn unlink(&self, rel: &str) -> Outcome {
        self.with_path(rel, |p| {
            if std::fs::symlink_metadata(p)?.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            std::fs::remove_file(p)
        })
    }

    pub fn rename(&self, from: &str, to: &str) -> Outcome {
        match (self.path(from), self.path(to)) {
            (Ok(a), Ok(b)) => outcome(std::fs::rename(a, b)),
            (Err(e), _) | (_, Err(e)) => Outcome::Errno(e),
        }
    }

    pub fn readlink(&self, rel: &str) -> Outcome {
        match self.path(rel).map(std::fs::read_link) {
            Ok(Ok(t)) => Outcome::Data(t.as_os_str().as_bytes().to_vec()),
            Ok(Err(e)) => Outcome::Errno(errno_of(&e)),
            Err(e) => Outcome::Errno(e),
        }
    }

    /// Directory entries of `rel` in WASI `dirent` encoding, from entry `cookie` on, cut
    /// at `buf_len` bytes as the guest's buffer is.
    pub fn readdir(&self, rel: &str, cookie: u64, buf_len: usize) -> Outcome {
        let p = match self.path(rel) {
            Ok(p) => p,
            Err(e) => return Outcome::Errno(e),
        };
        let mut names: Vec<(Vec<u8>, u64, u8)> = match std::fs::read_dir(&p) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| {
                    let ft = match e.file_type() {
                        Ok(t) if t.is_dir() => filetype::DIRECTORY,
                        Ok(t) if t.is_file() => filetype::REGULAR_FILE,
                        Ok(t) if t.is_symlink() => filetype::SYMBOLIC_LINK,
                        _ => filetype::UNKNOWN,
                    };
                    let ino = e.metadata().map(|m| m.ino()).unwrap_or(0);
                    (e.file_name().as_bytes().to_vec(), ino, ft)
                })
                .collect(),
            Err(e) => return Outcome::Errno(errno_of(&e)),
        };
        // A stable order makes cookies mean the same entry across calls.
        names.sort();
        let mut out = Vec::new();
        for (i, (name, ino, ft)) in names.iter().enumerate().skip(cookie as usize) {
            out.extend_from_slice(&(i as u64 + 1).to_le_bytes());
            out.extend_from_slice(&ino.to_le_bytes());
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(&[*ft, 0, 0, 0]);
            out.extend_from_slice(name);
            if out.len() >= buf_len {
                break;
            }
        }
        out.truncate(buf_len);
        Outcome::Data(out)
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
