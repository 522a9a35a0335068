//! The datastore: the guest's files, on the live host, sandboxed by the kernel.
//!
//! The datastore folder is the guest's "/". Every guest path is resolved by the kernel
//! beneath a directory the guest holds open — `openat2` with `RESOLVE_BENEATH` (and no
//! magic links) — never as text: symlinks inside the datastore are followed only where
//! they stay inside, `..` never climbs above the datastore, and an absolute path or an
//! escaping link answers `EPERM` (as in wasmtime). Operations on a name (mkdir, unlink, rename,
//! link, symlink, readlink, lstat) resolve the name's parent that way and then act on the
//! last component with the `*at` system calls, which never follow a last component
//! outside. Nothing ever acts on the datastore folder itself (it has no name inside).
//!
//! Host handles are keyed by guest descriptor: a file's open `File`, a directory's
//! `O_DIRECTORY` descriptor, which is also the base its guest paths resolve beneath.
//! Writes are positional, at offsets the VM computed ([`crate::fdtable`]), so a copy going
//! live that writes again what its predecessor may already have written writes the same
//! bytes in the same place.
//!
//! A file unlinked or replaced while the guest holds it open is first linked into the
//! set-aside folder beside the datastore under its inode number (idempotently: a copy
//! going live that does it again links the same file under the same name), so that a copy
//! going live on another host can reopen it; the name is removed when the last descriptor
//! closes ([`LiveHost::drop_aside`]).
//!
//! Invariant: no path the guest gives, and no link found in the datastore, makes the host
//! touch anything outside the datastore and the VM's set-aside folder.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::event::{Filestat, Kind, NameState, Outcome};
use crate::fdtable::{FdKind, FdTable};
use crate::host::{HostError, LiveHost, Root, errno_of};
use crate::wasi::{errno, fdflags, filetype, fstflags, oflags};

/// How every guest path is resolved: beneath its base, never through /proc magic links.
/// A write taken to be performed later ends below this (every Linux file system takes
/// files this large; EFBIG is for larger ones)...
pub(crate) const MAX_BEHIND_END: u64 = 1 << 40;
/// ...and leaves at least this much space free...
pub(crate) const SPACE_MARGIN: u64 = 256 << 20;
/// ...as looked at no longer ago than this.
pub(crate) const SPACE_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// What writes performed later need to know (see [`LiveHost::write_behind`]).
#[derive(Default)]
pub(crate) struct Behind {
    /// The datastore's bytes free for an unprivileged writer, less the writes taken since
    /// it was looked at, and when that was.
    left: u64,
    checked: Option<std::time::Instant>,
    /// Which guest descriptors are of regular files.
    regular: std::collections::HashMap<u32, bool>,
}

/// Bytes free for an unprivileged writer on the file system of `fd`.
fn free_bytes(fd: RawFd) -> io::Result<u64> {
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid and writable for the call; `fd` is a descriptor we hold.
    check(unsafe { libc::fstatvfs(fd, &mut st) })?;
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

const RESOLVE: u64 = 0x08 /* RESOLVE_BENEATH */ | 0x02 /* RESOLVE_NO_MAGICLINKS */;

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Open `path` beneath the directory `base`, as the kernel resolves it.
fn openat2(base: RawFd, path: &CStr, flags: i32, mode: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode,
        resolve: RESOLVE,
    };
    // EAGAIN: a concurrent rename raced the lookup; the kernel asks us to try again.
    for _ in 0..64 {
        // SAFETY: `path` is NUL-terminated and `how` a valid open_how whose size we pass;
        // both outlive the call, which only reads them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                base,
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// The errno for a failed resolution: leaving the datastore is not permitted (EPERM, as
/// wasmtime answers).
fn resolve_errno(e: &io::Error) -> u16 {
    match e.raw_os_error() {
        Some(libc::EXDEV) => errno::PERM,
        _ => errno_of(e),
    }
}

fn cstr(s: &str) -> Result<CString, u16> {
    CString::new(s).map_err(|_| errno::INVAL)
}

/// The result of a libc call that returns -1 and sets errno on failure.
fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid and writable for the call; `fd` is a descriptor we hold.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

fn fstatat(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` writable, both alive for the call.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

fn filetype_of(mode: libc::mode_t) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => filetype::DIRECTORY,
        libc::S_IFREG => filetype::REGULAR_FILE,
        libc::S_IFLNK => filetype::SYMBOLIC_LINK,
        libc::S_IFBLK => filetype::BLOCK_DEVICE,
        libc::S_IFCHR => filetype::CHARACTER_DEVICE,
        _ => filetype::UNKNOWN,
    }
}

fn filestat(st: &libc::stat) -> Filestat {
    let ns = |s: i64, n: i64| (s.max(0) as u64) * 1_000_000_000 + n.max(0) as u64;
    Filestat {
        dev: st.st_dev,
        ino: st.st_ino,
        filetype: filetype_of(st.st_mode),
        nlink: st.st_nlink,
        size: st.st_size.max(0) as u64,
        atim: ns(st.st_atime, st.st_atime_nsec),
        mtim: ns(st.st_mtime, st.st_mtime_nsec),
        ctim: ns(st.st_ctime, st.st_ctime_nsec),
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

fn done(r: io::Result<()>) -> Outcome {
    match r {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Errno(errno_of(&e)),
    }
}

/// A name inside a directory: its parent, resolved beneath the base, and its last
/// component as given (trailing slashes kept, so the kernel judges them as natively).
struct At {
    /// The parent, when it is not the base itself.
    owned: Option<OwnedFd>,
    base: RawFd,
    name: CString,
    /// The last component without trailing slashes.
    last: String,
}

impl At {
    fn dir(&self) -> RawFd {
        self.owned.as_ref().map_or(self.base, |f| f.as_raw_fd())
    }

    /// `.` or `..`: names that are not entries of the parent and that no operation may
    /// create, remove or rename.
    fn is_dot(&self) -> bool {
        self.last == "." || self.last == ".."
    }
}

/// The path of `fd` inside the datastore at `root`, as the kernel knows it.
fn datastore_path(root: &Path, fd: RawFd) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let rel = target.strip_prefix(root).ok()?;
    let rel = rel.to_str()?;
    (!rel.contains('\0')).then(|| rel.to_string())
}

/// One WASI `dirent` (24 bytes of header, then the name), in the guest's encoding.
fn push_dirent(out: &mut Vec<u8>, next: u64, ino: u64, kind: u8, name: &[u8]) {
    out.extend_from_slice(&next.to_le_bytes());
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(name);
}

/// What open flags a guest's `path_open` maps to on the host. Appends are not passed on:
/// every write is positional, at the end the VM knows for an append.
/// The access mode of a descriptor that reads and/or writes (neither: read-only).
fn access(read: bool, write: bool) -> i32 {
    match (read, write) {
        (true, true) => libc::O_RDWR,
        (false, true) => libc::O_WRONLY,
        _ => libc::O_RDONLY,
    }
}

pub(crate) fn open_flags(of: u16, fdfl: u16, read: bool, write: bool, follow: bool) -> i32 {
    let mut flags = libc::O_NONBLOCK;
    if of & oflags::DIRECTORY != 0 {
        // A directory opened to write is EISDIR, as natively and in wasmtime.
        flags |= libc::O_DIRECTORY | if write { libc::O_RDWR } else { libc::O_RDONLY };
    } else {
        flags |= access(read, write);
    }
    if of & oflags::CREAT != 0 {
        flags |= libc::O_CREAT;
    }
    if of & oflags::EXCL != 0 {
        flags |= libc::O_EXCL;
    }
    if of & oflags::TRUNC != 0 {
        flags |= libc::O_TRUNC;
    }
    flags | sync_flags(fdfl) | if follow { 0 } else { libc::O_NOFOLLOW }
}

fn sync_flags(fdfl: u16) -> i32 {
    let mut flags = 0;
    if fdfl & fdflags::SYNC != 0 {
        flags |= libc::O_SYNC;
    }
    if fdfl & fdflags::DSYNC != 0 {
        flags |= libc::O_DSYNC;
    }
    if fdfl & fdflags::RSYNC != 0 {
        flags |= libc::O_RSYNC;
    }
    flags
}

impl LiveHost {
    /// Open the datastore at `root` and every file and directory `fds` holds in it.
    pub(crate) fn open_datastore(&mut self, root: &Path, fds: &FdTable) -> Result<(), HostError> {
        let err = |source| HostError::Datastore {
            path: root.to_path_buf(),
            source,
        };
        let path = std::fs::canonicalize(root).map_err(err)?;
        let rootfd = File::open(&path).map_err(err)?;
        if !rootfd.metadata().map_err(err)?.is_dir() {
            return Err(err(io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        let rootfd = OwnedFd::from(rootfd);
        let base = rootfd.as_raw_fd();
        let dev = fstat(base).map_err(err)?.st_dev;
        if let Some(parent) = path.parent()
            && std::fs::metadata(parent)
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                .ok()
                != Some(dev)
        {
            tracing::warn!(
                "datastore {} is a file system of its own: files it unlinks or replaces while \
                 open cannot be set aside beside it, and cannot be reopened after a failover \
                 (give a folder inside the mounted file system instead)",
                path.display()
            );
        }
        self.root = Some(Root {
            aside: aside_folder(&path),
            path,
            fd: rootfd.try_clone().map_err(err)?,
        });
        for (fd, kind) in fds.iter() {
            if let FdKind::Dir {
                preopen: Some(_), ..
            } = kind
            {
                self.dirs.insert(fd, rootfd.try_clone().map_err(err)?);
            }
        }
        self.reopen_missing(fds);
        Ok(())
    }

    /// Open again every file and directory of `fds` this host holds no handle for (all of
    /// them on a copy going live; after that, those whose path was unknown until the
    /// outcome of the operation at the go-live said where they went). One that cannot be
    /// found answers EIO.
    pub(crate) fn reopen_missing(&mut self, fds: &FdTable) {
        self.missing = false;
        let Some(base) = self.root.as_ref().map(|r| r.fd.as_raw_fd()) else {
            return;
        };
        for (fd, kind) in fds.iter() {
            if self.files.contains_key(&fd) || self.dirs.contains_key(&fd) {
                continue;
            }
            let found = match kind {
                FdKind::Dir { path: p, ino, .. } => self
                    .reopen(base, p, *ino, libc::O_RDONLY | libc::O_DIRECTORY, false)
                    .map(|d| self.dirs.insert(fd, d))
                    .is_some(),
                FdKind::File {
                    path: p,
                    ino,
                    read,
                    write,
                    flags,
                    aside,
                    ..
                } => {
                    let flags = access(*read, *write) | libc::O_NONBLOCK | sync_flags(*flags);
                    self.reopen(base, p, *ino, flags, *aside)
                        .map(|f| self.files.insert(fd, Arc::new(File::from(f))))
                        .is_some()
                }
                _ => continue,
            };
            if !found {
                self.missing = true;
                tracing::warn!(
                    "descriptor {fd} ({kind:?}) cannot be found again (yet): it answers EIO"
                );
            }
        }
    }

    /// Find an open file or directory again: at its path if the same inode is there,
    /// otherwise under its inode number in the set-aside folder.
    fn reopen(
        &self,
        base: RawFd,
        path: &str,
        ino: u64,
        flags: i32,
        aside_first: bool,
    ) -> Option<OwnedFd> {
        let by_path = || {
            let c = cstr(path).ok()?;
            let f = openat2(base, &c, flags | libc::O_NOFOLLOW, 0).ok()?;
            (fstat(f.as_raw_fd()).ok()?.st_ino == ino).then_some(f)
        };
        let by_aside = || {
            let aside = self.root.as_ref()?.aside.as_ref()?;
            let f = std::fs::OpenOptions::new()
                .read(flags & libc::O_ACCMODE != libc::O_WRONLY)
                .write(flags & libc::O_ACCMODE != libc::O_RDONLY)
                .open(aside.join(ino.to_string()))
                .ok()?;
            use std::os::unix::fs::MetadataExt;
            (f.metadata().ok()?.ino() == ino).then(|| OwnedFd::from(f))
        };
        if aside_first {
            by_aside().or_else(by_path)
        } else {
            by_path().or_else(by_aside)
        }
    }

    /// Open file `ino`, last named `path` in the datastore, for writing (a copy going live
    /// writing again what its predecessor may not have written: see `Vm::written`).
    pub(crate) fn open_to_write(&self, path: &str, ino: u64) -> io::Result<File> {
        let base = self
            .root
            .as_ref()
            .map(|r| r.fd.as_raw_fd())
            .ok_or_else(|| io::Error::other("the VM has no datastore here"))?;
        self.reopen(base, path, ino, libc::O_WRONLY | libc::O_NONBLOCK, false)
            .map(File::from)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("file {ino} ({path}) is gone"),
                )
            })
    }

    /// The host directory a guest directory descriptor resolves beneath.
    fn base(&self, fd: u32) -> Result<RawFd, u16> {
        if self.root.is_none() {
            return Err(errno::NOTCAPABLE);
        }
        self.dirs.get(&fd).map(|d| d.as_raw_fd()).ok_or(errno::IO)
    }

    fn file(&self, fd: u32) -> Result<&File, u16> {
        // The table said it is an open file; a host handle missing means it could not be
        // found again after a go-live.
        self.files.get(&fd).map(|f| &**f).ok_or(errno::IO)
    }

    /// Resolve the parent of `guest` beneath directory `fd`.
    fn at(&self, fd: u32, guest: &str) -> Result<At, u16> {
        let base = self.base(fd)?;
        if guest.is_empty() {
            return Err(errno::NOENT);
        }
        if guest.starts_with('/') {
            return Err(errno::PERM);
        }
        let trimmed = guest.trim_end_matches('/');
        let (parent, last) = match trimmed.rfind('/') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => ("", trimmed),
        };
        let owned = if parent.is_empty() {
            None
        } else {
            let c = cstr(parent)?;
            Some(
                openat2(base, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                    .map_err(|e| resolve_errno(&e))?,
            )
        };
        Ok(At {
            owned,
            base,
            name: cstr(&guest[parent.len() + usize::from(!parent.is_empty())..])?,
            last: last.to_string(),
        })
    }

    /// Open `guest` beneath directory `fd` as a path-only descriptor (for stat and times).
    fn locate(&self, fd: u32, guest: &str, follow: bool) -> Result<OwnedFd, u16> {
        let base = self.base(fd)?;
        if guest.is_empty() {
            return Err(errno::NOENT);
        }
        let c = cstr(guest)?;
        let flags = libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW };
        openat2(base, &c, flags, 0).map_err(|e| resolve_errno(&e))
    }

    /// The path inside the datastore of the name `at` (its parent as the kernel knows it),
    /// or `None` where the kernel cannot give it (beyond PATH_MAX).
    fn kernel_path(&self, at: &At) -> Option<String> {
        let parent = self.rel(at.dir())?;
        Some(if parent.is_empty() {
            at.last.clone()
        } else {
            format!("{parent}/{}", at.last)
        })
    }

    fn rel(&self, fd: RawFd) -> Option<String> {
        datastore_path(&self.root.as_ref()?.path, fd)
    }

    /// `path_open`: `flags` from [`open_flags`]. The new descriptor's host handle is kept
    /// as `guest_fd`.
    pub fn open(&mut self, dirfd: u32, guest: &str, flags: i32, guest_fd: u32) -> Outcome {
        let r = (|| {
            let base = self.base(dirfd)?;
            if guest.is_empty() {
                return Err(errno::NOENT);
            }
            let c = cstr(guest)?;
            // Created by this VM's predecessor just before it failed: open what it made.
            let flags = if self.redo {
                flags & !libc::O_EXCL
            } else {
                flags
            };
            // openat2 refuses a mode without O_CREAT.
            let mode = if flags & libc::O_CREAT != 0 { 0o666 } else { 0 };
            let f = openat2(base, &c, flags, mode).map_err(|e| resolve_errno(&e))?;
            let st = fstat(f.as_raw_fd()).map_err(|e| errno_of(&e))?;
            // What a copy going live reopens it by. Beyond PATH_MAX the kernel cannot name
            // it in one path: refused, as nothing could find it again after a failover.
            let path = self.rel(f.as_raw_fd()).ok_or(errno::NAMETOOLONG)?;
            let ft = filetype_of(st.st_mode);
            if ft == filetype::DIRECTORY {
                self.dirs.insert(guest_fd, f);
            } else {
                self.files.insert(guest_fd, Arc::new(File::from(f)));
            }
            Ok(Outcome::Opened {
                filetype: ft,
                size: st.st_size.max(0) as u64,
                ino: st.st_ino,
                path,
            })
        })();
        r.unwrap_or_else(Outcome::Errno)
    }

    /// What each name (a guest path beneath a directory descriptor) stands for now.
    pub(crate) fn name_states(&self, names: &[(u32, &str)]) -> Vec<NameState> {
        names
            .iter()
            .map(|&(fd, guest)| match self.at(fd, guest) {
                Err(e) => NameState::Unreachable(e),
                Ok(at) => match fstatat(at.dir(), &at.name) {
                    Ok(st) => NameState::Present {
                        ino: st.st_ino,
                        dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
                    },
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => NameState::Missing,
                    Err(e) => NameState::Unreachable(errno_of(&e)),
                },
            })
            .collect()
    }

    /// The outcome of an operation on `names` that this VM's predecessor performed (the
    /// names were `before` just before): what the guest would have been answered.
    /// `None`: the operation's outcome is what running it again gives.
    pub(crate) fn performed(
        &self,
        kind: Kind,
        names: &[(u32, &str)],
        before: &[NameState],
        fds: &FdTable,
    ) -> Option<Outcome> {
        let open_ino = |i: usize| match before.get(i) {
            Some(NameState::Present { ino, dir: false }) if fds.holds_ino(*ino) => Some(*ino),
            _ => None,
        };
        match kind {
            Kind::PathUnlinkFile => Some(Outcome::Removed { aside: open_ino(0) }),
            Kind::PathRename => {
                let path = |i: usize| {
                    let &(fd, guest) = names.get(i)?;
                    self.kernel_path(&self.at(fd, guest).ok()?)
                };
                let source = match before.first() {
                    Some(NameState::Present { ino, .. }) => Some(*ino),
                    _ => None,
                };
                let aside = open_ino(1).filter(|ino| Some(*ino) != source);
                Some(match (path(0), path(1)) {
                    (Some(from), Some(to)) => Outcome::Moved { from, to, aside },
                    _ => Outcome::Errno(errno::NAMETOOLONG),
                })
            }
            Kind::PathOpen => None,
            _ => Some(Outcome::Done),
        }
    }

    pub fn close(&mut self, fd: u32) {
        self.behind.regular.remove(&fd);
        self.files.remove(&fd);
        self.dirs.remove(&fd);
    }

    pub fn renumber(&mut self, from: u32, to: u32) {
        if from == to {
            return;
        }
        self.close(to);
        self.behind.regular.remove(&from);
        if let Some(f) = self.files.remove(&from) {
            self.files.insert(to, f);
        }
        if let Some(d) = self.dirs.remove(&from) {
            self.dirs.insert(to, d);
        }
    }

    pub fn read_at(&self, fd: u32, offset: u64, len: usize) -> Outcome {
        let file = match self.file(fd) {
            Ok(f) => f,
            Err(e) => return Outcome::Errno(e),
        };
        let mut buf = crate::event::Bytes::buffer(len);
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
        Outcome::Data(buf.into())
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

    /// A write of `data` at `at` to open file `fd` to be performed later
    /// ([`crate::port::OutputPort::write_behind`]), if it cannot fail but by a lost storage
    /// path: a regular file, ending below [`MAX_BEHIND_END`], and the file system at least
    /// [`SPACE_MARGIN`] from full for an unprivileged writer (looked at again every
    /// [`SPACE_RECHECK`], or sooner once the writes taken since could have used up the
    /// margin). `None`: perform it now, so that the guest gets its error (ENOSPC, EFBIG) as
    /// natively. (Disk quotas are not looked at: a datastore's file system has none.)
    pub(crate) fn write_behind(
        &mut self,
        fd: u32,
        at: u64,
        data: &crate::event::Bytes,
    ) -> Option<crate::port::DiskWrite> {
        let file = self.files.get(&fd)?;
        let len = data.len() as u64;
        if at.checked_add(len)? > MAX_BEHIND_END {
            return None;
        }
        // Asked once per descriptor: on a network or FUSE datastore every fstat is a
        // round trip to the server.
        let regular = *self.behind.regular.entry(fd).or_insert_with(|| {
            fstat(file.as_raw_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG)
        });
        if !regular {
            return None;
        }
        let stale = self
            .behind
            .checked
            .is_none_or(|t| t.elapsed() >= SPACE_RECHECK)
            || self.behind.left < SPACE_MARGIN + len;
        if stale {
            self.behind.left = free_bytes(file.as_raw_fd()).unwrap_or(0);
            self.behind.checked = Some(std::time::Instant::now());
        }
        if self.behind.left < SPACE_MARGIN + len {
            return None;
        }
        self.behind.left -= len;
        Some(crate::port::DiskWrite {
            file: Arc::clone(file),
            at,
            data: data.clone(),
        })
    }

    /// The raw descriptor behind a guest file or directory descriptor.
    fn raw(&self, fd: u32) -> Result<RawFd, u16> {
        if let Some(f) = self.files.get(&fd) {
            return Ok(f.as_raw_fd());
        }
        self.dirs.get(&fd).map(|d| d.as_raw_fd()).ok_or(errno::IO)
    }

    pub fn file_size(&self, fd: u32) -> Outcome {
        match self.raw(fd).map(fstat) {
            Ok(Ok(st)) => Outcome::Value(st.st_size.max(0) as u64),
            Ok(Err(e)) => Outcome::Errno(errno_of(&e)),
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn sync(&self, fd: u32) -> Outcome {
        match self.raw(fd) {
            // SAFETY: fsync on a descriptor we hold; no memory is involved.
            Ok(raw) => done(check(unsafe { libc::fsync(raw) })),
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn fstat(&self, fd: u32) -> Outcome {
        match self.raw(fd).map(fstat) {
            Ok(Ok(st)) => Outcome::Stat(filestat(&st)),
            Ok(Err(e)) => Outcome::Errno(errno_of(&e)),
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn stat(&self, dirfd: u32, guest: &str, follow: bool) -> Outcome {
        match self.locate(dirfd, guest, follow) {
            Ok(f) => match fstat(f.as_raw_fd()) {
                Ok(st) => Outcome::Stat(filestat(&st)),
                Err(e) => Outcome::Errno(errno_of(&e)),
            },
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn set_size(&self, fd: u32, size: u64) -> Outcome {
        match self.file(fd) {
            Ok(f) => done(f.set_len(size)),
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn allocate(&self, fd: u32, offset: u64, len: u64) -> Outcome {
        let f = match self.file(fd) {
            Ok(f) => f,
            Err(e) => return Outcome::Errno(e),
        };
        let Some(end) = offset.checked_add(len).filter(|e| *e <= i64::MAX as u64) else {
            return Outcome::Errno(errno::FBIG);
        };
        match f.metadata() {
            Ok(m) if m.len() < end => done(f.set_len(end)),
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    /// Set the times of an open file or directory.
    pub fn fd_set_times(&self, fd: u32, atim: u64, mtim: u64, flags: u16) -> Outcome {
        let times = timespecs(atim, mtim, flags);
        match self.raw(fd) {
            // SAFETY: `times` is two valid timespecs alive for the call; `raw` is ours.
            Ok(raw) => done(check(unsafe { libc::futimens(raw, times.as_ptr()) })),
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn set_times(
        &self,
        dirfd: u32,
        guest: &str,
        follow: bool,
        atim: u64,
        mtim: u64,
        flags: u16,
    ) -> Outcome {
        let times = timespecs(atim, mtim, flags);
        let r = (|| {
            if follow {
                // Resolved beneath the base (following links inside only); the magic link
                // of our own descriptor then names exactly that file.
                let f = self.locate(dirfd, guest, true)?;
                let c = cstr(&format!("/proc/self/fd/{}", f.as_raw_fd()))?;
                // SAFETY: `c` is NUL-terminated and `times` valid, both alive for the call.
                check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) })
                    .map_err(|e| errno_of(&e))
            } else {
                let at = self.at(dirfd, guest)?;
                let (dir, name) = if at.is_dot() {
                    // `.`/`..` are never links: resolve them beneath the base instead.
                    let f = self.locate(dirfd, guest, false)?;
                    let c = cstr(&format!("/proc/self/fd/{}", f.as_raw_fd()))?;
                    // SAFETY: as above.
                    return check(unsafe {
                        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0)
                    })
                    .map_err(|e| errno_of(&e));
                } else {
                    (at.dir(), at.name.clone())
                };
                // SAFETY: `name` is NUL-terminated and `times` valid, both alive for the call.
                check(unsafe {
                    libc::utimensat(
                        dir,
                        name.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                })
                .map_err(|e| errno_of(&e))
            }
        })();
        match r {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Errno(e),
        }
    }

    pub fn mkdir(&self, dirfd: u32, guest: &str) -> Outcome {
        let at = match self.at(dirfd, guest) {
            Ok(at) if at.is_dot() => return Outcome::Errno(errno::EXIST),
            Ok(at) => at,
            Err(e) => return Outcome::Errno(e),
        };
        // SAFETY: `name` is NUL-terminated and alive for the call.
        done(check(unsafe {
            libc::mkdirat(at.dir(), at.name.as_ptr(), 0o777)
        }))
    }

    pub fn rmdir(&self, dirfd: u32, guest: &str) -> Outcome {
        let at = match self.at(dirfd, guest) {
            Ok(at) => at,
            Err(e) => return Outcome::Errno(e),
        };
        if at.is_dot() {
            // As wasmtime answers (Linux says ENOTEMPTY for ".."); and the datastore
            // itself is never removed.
            return Outcome::Errno(errno::INVAL);
        }
        // SAFETY: `name` is NUL-terminated and alive for the call.
        done(check(unsafe {
            libc::unlinkat(at.dir(), at.name.as_ptr(), libc::AT_REMOVEDIR)
        }))
    }

    /// Link the open file `name` (inode `ino`) in `dir` into the set-aside folder, so that
    /// its descriptors can be found again after the name is gone. False if there is no
    /// set-aside folder on this file system.
    fn set_aside(&self, dir: RawFd, name: &CStr, ino: u64) -> bool {
        let Some(aside) = self.root.as_ref().and_then(|r| r.aside.as_ref()) else {
            return false;
        };
        let _ = std::fs::create_dir(aside);
        let Ok(target) = cstr(&format!("{}/{ino}", aside.display())) else {
            return false;
        };
        // A copy going live that sets the same file aside again finds it there already.
        if let Ok(st) = fstatat(libc::AT_FDCWD, &target) {
            if st.st_ino == ino {
                return true;
            }
            // SAFETY: `target` is NUL-terminated and alive for the call.
            unsafe { libc::unlink(target.as_ptr()) };
        }
        // SAFETY: both names are NUL-terminated and alive for the call.
        let r =
            check(unsafe { libc::linkat(dir, name.as_ptr(), libc::AT_FDCWD, target.as_ptr(), 0) });
        if let Err(e) = &r {
            tracing::warn!(
                "cannot set aside open file {}: {e}; a copy going live elsewhere cannot reopen it",
                name.to_string_lossy()
            );
        }
        r.is_ok()
    }

    /// The last descriptor of set-aside file `ino` closed: remove its set-aside name.
    pub fn drop_aside(&self, ino: u64) -> Outcome {
        if let Some(aside) = self.root.as_ref().and_then(|r| r.aside.as_ref()) {
            let _ = std::fs::remove_file(aside.join(ino.to_string()));
            // Only removed when nothing else is set aside.
            let _ = std::fs::remove_dir(aside);
        }
        Outcome::Done
    }

    /// Whether the entry `name` of `dir` is a regular file the guest holds open (by
    /// inode), and that inode.
    fn open_file_at(dir: RawFd, name: &CStr, fds: &FdTable) -> Option<u64> {
        let st = fstatat(dir, name).ok()?;
        (st.st_mode & libc::S_IFMT == libc::S_IFREG && fds.holds_ino(st.st_ino))
            .then_some(st.st_ino)
    }

    pub fn unlink(&self, dirfd: u32, guest: &str, fds: &FdTable) -> Outcome {
        let at = match self.at(dirfd, guest) {
            Ok(at) if at.is_dot() => return Outcome::Errno(errno::ISDIR),
            Ok(at) => at,
            Err(e) => return Outcome::Errno(e),
        };
        match fstatat(at.dir(), &at.name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                return Outcome::Errno(errno::ISDIR);
            }
            Ok(_) => {}
            Err(e) => return Outcome::Errno(errno_of(&e)),
        }
        let aside = Self::open_file_at(at.dir(), &at.name, fds)
            .filter(|ino| self.set_aside(at.dir(), &at.name, *ino));
        // SAFETY: `name` is NUL-terminated and alive for the call.
        match check(unsafe { libc::unlinkat(at.dir(), at.name.as_ptr(), 0) }) {
            Ok(()) => Outcome::Removed { aside },
            Err(e) => Outcome::Errno(errno_of(&e)),
        }
    }

    pub fn rename(&self, dirfd: u32, from: &str, dirfd2: u32, to: &str, fds: &FdTable) -> Outcome {
        let (a, b) = match (self.at(dirfd, from), self.at(dirfd2, to)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Outcome::Errno(e),
        };
        if a.is_dot() || b.is_dot() {
            return Outcome::Errno(errno::BUSY);
        }
        let source = match fstatat(a.dir(), &a.name) {
            Ok(st) => st.st_ino,
            Err(e) => return Outcome::Errno(errno_of(&e)),
        };
        // Both names as the kernel knows them, taken before the rename: the descriptors
        // below the source move with it. A name the kernel cannot give (beyond PATH_MAX)
        // is refused rather than leave descriptors that could not be found again.
        let (Some(from), Some(to)) = (self.kernel_path(&a), self.kernel_path(&b)) else {
            return Outcome::Errno(errno::NAMETOOLONG);
        };
        let aside = Self::open_file_at(b.dir(), &b.name, fds)
            .filter(|ino| *ino != source && self.set_aside(b.dir(), &b.name, *ino));
        // SAFETY: both names are NUL-terminated and alive for the call.
        let r =
            check(unsafe { libc::renameat(a.dir(), a.name.as_ptr(), b.dir(), b.name.as_ptr()) });
        if let Err(e) = r {
            if let Some(ino) = aside {
                self.drop_aside(ino);
            }
            return Outcome::Errno(errno_of(&e));
        }
        Outcome::Moved { from, to, aside }
    }

    pub fn symlink(&self, target: &str, dirfd: u32, guest: &str) -> Outcome {
        let at = match self.at(dirfd, guest) {
            Ok(at) if at.is_dot() => return Outcome::Errno(errno::EXIST),
            Ok(at) => at,
            Err(e) => return Outcome::Errno(e),
        };
        // An absolute target could only ever lead outside: refused, as in wasmtime.
        if target.starts_with('/') {
            return Outcome::Errno(errno::PERM);
        }
        let Ok(t) = cstr(target) else {
            return Outcome::Errno(errno::INVAL);
        };
        // The link's text is stored as given; following it is resolved beneath the
        // datastore like every other path, so a link pointing outside leads nowhere.
        // SAFETY: both strings are NUL-terminated and alive for the call.
        done(check(unsafe {
            libc::symlinkat(t.as_ptr(), at.dir(), at.name.as_ptr())
        }))
    }

    pub fn link(&self, dirfd: u32, from: &str, dirfd2: u32, to: &str) -> Outcome {
        let (a, b) = match (self.at(dirfd, from), self.at(dirfd2, to)) {
            (Ok(a), _) if a.is_dot() => return Outcome::Errno(errno::PERM),
            (_, Ok(b)) if b.is_dot() => return Outcome::Errno(errno::EXIST),
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Outcome::Errno(e),
        };
        // Flags 0: a link's source that is a symlink is linked itself, never followed.
        // SAFETY: both names are NUL-terminated and alive for the call.
        done(check(unsafe {
            libc::linkat(a.dir(), a.name.as_ptr(), b.dir(), b.name.as_ptr(), 0)
        }))
    }

    pub fn readlink(&self, dirfd: u32, guest: &str) -> Outcome {
        let at = match self.at(dirfd, guest) {
            Ok(at) if at.is_dot() => return Outcome::Errno(errno::INVAL),
            Ok(at) => at,
            Err(e) => return Outcome::Errno(e),
        };
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `buf` is writable for its length; `name` is NUL-terminated.
        let n = unsafe {
            libc::readlinkat(
                at.dir(),
                at.name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Outcome::Errno(errno_of(&io::Error::last_os_error()));
        }
        buf.truncate(n as usize);
        // A link to an absolute path names nothing inside the datastore (as in wasmtime).
        if buf.first() == Some(&b'/') {
            return Outcome::Errno(errno::PERM);
        }
        Outcome::Data(buf.into())
    }

    /// Entries of directory `fd` in WASI `dirent` encoding from `cookie` on (0: the start),
    /// cut at `buf_len` bytes as the guest's buffer is. Cookies are the file system's own
    /// directory offsets, which stay valid while entries are removed, so a guest that
    /// unlinks as it lists sees every entry once; each call reads only what it returns.
    pub fn readdir(&self, fd: u32, cookie: u64, buf_len: usize) -> Outcome {
        let Some(dir) = self.dirs.get(&fd).map(|d| d.as_raw_fd()) else {
            return Outcome::Errno(errno::IO);
        };
        // SAFETY: lseek on a descriptor we hold; no memory is involved.
        if unsafe { libc::lseek(dir, cookie as libc::off_t, libc::SEEK_SET) } < 0 {
            return Outcome::Errno(errno_of(&io::Error::last_os_error()));
        }
        let mut out = Vec::with_capacity(buf_len.min(64 << 10));
        let mut raw = vec![0u8; buf_len.clamp(4096, 64 << 10)];
        while out.len() < buf_len {
            // SAFETY: `raw` is writable for its length for the duration of the call.
            let n =
                unsafe { libc::syscall(libc::SYS_getdents64, dir, raw.as_mut_ptr(), raw.len()) };
            if n < 0 {
                return Outcome::Errno(errno_of(&io::Error::last_os_error()));
            }
            if n == 0 {
                break;
            }
            let mut at = 0usize;
            while at + 19 <= n as usize && out.len() < buf_len {
                // linux_dirent64: ino u64, off i64, reclen u16, type u8, name NUL-terminated.
                let rec = &raw[at..n as usize];
                let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
                let off = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or([0; 8]));
                let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
                if reclen < 19 || reclen > rec.len() {
                    break;
                }
                let name = &rec[19..reclen];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                let kind = match rec[18] {
                    libc::DT_DIR => filetype::DIRECTORY,
                    libc::DT_REG => filetype::REGULAR_FILE,
                    libc::DT_LNK => filetype::SYMBOLIC_LINK,
                    libc::DT_BLK => filetype::BLOCK_DEVICE,
                    libc::DT_CHR => filetype::CHARACTER_DEVICE,
                    _ => filetype::UNKNOWN,
                };
                push_dirent(&mut out, off, ino, kind, name);
                at += reclen;
            }
            if at < n as usize {
                break;
            }
        }
        out.truncate(buf_len);
        Outcome::Data(out.into())
    }
}

/// The folder beside datastore `root` where its open files are set aside.
pub fn aside_folder(root: &Path) -> Option<PathBuf> {
    let name = root.file_name()?;
    let mut n = std::ffi::OsString::from(".");
    n.push(name);
    n.push(".aside");
    Some(root.parent()?.join(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aside_folder_is_a_hidden_sibling() {
        assert_eq!(
            aside_folder(Path::new("/s/vm/data")).unwrap(),
            Path::new("/s/vm/.data.aside")
        );
    }

    /// A read into a buffer an earlier event's data left behind returns the file's bytes
    /// alone: a short read is cut to what was read, never padded with the old data.
    #[test]
    fn a_short_read_into_a_reused_buffer_carries_no_earlier_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 100]).unwrap();
        let mut host = LiveHost::from_state(
            None,
            &FdTable::new(false, &[]),
            &crate::clock::VmClock::default(),
        )
        .unwrap();
        host.files.insert(5, Arc::new(File::open(&path).unwrap()));
        crate::event::Bytes::from(vec![0xAA; 4096]).spare();
        assert_eq!(crate::event::spare_buffers(), 1);
        let Outcome::Data(d) = host.read_at(5, 0, 4096) else {
            panic!("the read failed");
        };
        assert_eq!(
            crate::event::spare_buffers(),
            0,
            "the buffer was not reused"
        );
        assert_eq!(&d[..], &[1u8; 100][..]);
    }

    #[test]
    fn dirents_have_the_wasi_layout() {
        let mut out = Vec::new();
        push_dirent(&mut out, 7, 9, filetype::REGULAR_FILE, b"ab");
        assert_eq!(out.len(), 26);
        assert_eq!(&out[0..8], &7u64.to_le_bytes());
        assert_eq!(&out[8..16], &9u64.to_le_bytes());
        assert_eq!(&out[16..20], &2u32.to_le_bytes());
        assert_eq!(out[20], filetype::REGULAR_FILE);
        assert_eq!(&out[24..], b"ab");
    }
}
