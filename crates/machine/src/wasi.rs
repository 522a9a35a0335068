//! WASI preview 1, served by the Tandem VM.
//!
//! Each function decodes its arguments from guest memory, does whatever is a pure function
//! of VM state itself (descriptor table, arguments, console output), and takes everything
//! else through [`Vm::event`]. Results are written back to guest memory only from the
//! event's outcome, so a replaying copy writes exactly what the recording copy wrote.
//!
//! Invariant: a guest cannot make the host panic. Bad pointers are `EFAULT`, bad
//! descriptors `EBADF`, unknown functions `ENOSYS`; only `proc_exit` and faults of the
//! event source (divergence, damaged log) end the run.

use wasmtime::{Caller, Linker};

use crate::event::{Filestat, Kind, Outcome, PollEvent, args_digest};
use crate::fdtable::FdKind;
use crate::host::Subscription;
use crate::vm::{Fault, Resume, Vm};

pub const MODULE: &str = "wasi_snapshot_preview1";

pub mod errno {
    pub const SUCCESS: u16 = 0;
    pub const ACCES: u16 = 2;
    pub const ADDRINUSE: u16 = 3;
    pub const AGAIN: u16 = 6;
    pub const BADF: u16 = 8;
    pub const BUSY: u16 = 10;
    pub const CONNRESET: u16 = 15;
    pub const DQUOT: u16 = 19;
    pub const EXIST: u16 = 20;
    pub const FAULT: u16 = 21;
    pub const FBIG: u16 = 22;
    pub const ILSEQ: u16 = 25;
    pub const INTR: u16 = 27;
    pub const INVAL: u16 = 28;
    pub const IO: u16 = 29;
    pub const ISDIR: u16 = 31;
    pub const LOOP: u16 = 32;
    pub const MFILE: u16 = 33;
    pub const MLINK: u16 = 34;
    pub const NAMETOOLONG: u16 = 37;
    pub const NFILE: u16 = 41;
    pub const NOENT: u16 = 44;
    pub const NOMEM: u16 = 48;
    pub const NOSPC: u16 = 51;
    pub const NOSYS: u16 = 52;
    pub const NOTDIR: u16 = 54;
    pub const NOTEMPTY: u16 = 55;
    pub const NOTSOCK: u16 = 57;
    pub const NOTSUP: u16 = 58;
    pub const NXIO: u16 = 60;
    pub const OVERFLOW: u16 = 61;
    pub const PERM: u16 = 63;
    pub const PIPE: u16 = 64;
    pub const ROFS: u16 = 69;
    pub const SPIPE: u16 = 70;
    pub const TXTBSY: u16 = 74;
    pub const XDEV: u16 = 75;
    pub const NOTCAPABLE: u16 = 76;
}

pub mod filetype {
    pub const UNKNOWN: u8 = 0;
    pub const BLOCK_DEVICE: u8 = 1;
    pub const CHARACTER_DEVICE: u8 = 2;
    pub const DIRECTORY: u8 = 3;
    pub const REGULAR_FILE: u8 = 4;
    pub const SOCKET_STREAM: u8 = 6;
    pub const SYMBOLIC_LINK: u8 = 7;
}

pub mod clockid {
    pub const REALTIME: u32 = 0;
    pub const MONOTONIC: u32 = 1;
    pub const PROCESS_CPUTIME: u32 = 2;
    pub const THREAD_CPUTIME: u32 = 3;
}

pub mod oflags {
    pub const CREAT: u16 = 1;
    pub const DIRECTORY: u16 = 2;
    pub const EXCL: u16 = 4;
    pub const TRUNC: u16 = 8;
}

pub mod fdflags {
    pub const APPEND: u16 = 1;
    pub const DSYNC: u16 = 2;
    pub const NONBLOCK: u16 = 4;
    pub const RSYNC: u16 = 8;
    pub const SYNC: u16 = 16;
}

pub mod lookupflags {
    pub const SYMLINK_FOLLOW: u32 = 1;
}

pub mod fstflags {
    pub const ATIM: u16 = 1;
    pub const ATIM_NOW: u16 = 2;
    pub const MTIM: u16 = 4;
    pub const MTIM_NOW: u16 = 8;
}

pub mod eventtype {
    pub const CLOCK: u8 = 0;
    pub const FD_READ: u8 = 1;
    pub const FD_WRITE: u8 = 2;
}

/// WASI rights. Preview 1 rights are advisory: as in wasmtime, a descriptor's rights are a
/// function of what it is (and, for a file, whether it reads and writes), the rights asked
/// for at `path_open` only say whether the file is opened to read and to write, and
/// `fd_fdstat_set_rights` is not supported.
pub mod rights {
    use crate::fdtable::FdKind;

    pub const FD_DATASYNC: u64 = 1 << 0;
    pub const FD_READ: u64 = 1 << 1;
    pub const FD_WRITE: u64 = 1 << 6;
    pub const FD_ALLOCATE: u64 = 1 << 8;
    pub const FD_READDIR: u64 = 1 << 14;
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    /// Rights 0-29: everything preview 1 defines.
    pub const ALL: u64 = (1 << 30) - 1;
    /// Asking for any of these opens a file to read; for any of `WRITES`, to write.
    pub const READS: u64 = FD_READ | FD_READDIR;
    pub const WRITES: u64 = FD_DATASYNC | FD_WRITE | FD_ALLOCATE | FD_FILESTAT_SET_SIZE;
    /// The preopened datastore, and a directory opened by the guest (wasmtime's values).
    pub const PREOPEN: [u64; 2] = [0x07b7_fe00, 0x0ff7_ffff];
    pub const DIRECTORY: u64 = 0x3fb7_ffbb;
    /// Console and sockets: not seekable, which is how libc tells a terminal.
    pub const STREAM: [u64; 2] = [((1 << 29) - 1) & !((1 << 2) | (1 << 5)), (1 << 29) - 1];

    /// The rights (base, inheriting) of a descriptor.
    pub fn of_kind(kind: &FdKind) -> [u64; 2] {
        match kind {
            FdKind::Dir {
                preopen: Some(_), ..
            } => PREOPEN,
            FdKind::Dir { .. } => [DIRECTORY, DIRECTORY],
            FdKind::File { read, write, .. } => {
                let mut r = ALL;
                if !*write {
                    r &= !FD_WRITE;
                }
                if !*read {
                    r &= !READS;
                }
                [r, r]
            }
            _ => STREAM,
        }
    }
}

/// Reads, writes and entropy larger than this are served in parts of this size, each its
/// own event: no event, log record or frame on the logging channel grows with what a
/// guest asks for.
const MAX_IO: usize = crate::event::MAX_EVENT_DATA;
/// The most iovecs one call takes (Linux's IOV_MAX).
const MAX_IOVECS: u32 = 1024;
/// The longest path a guest may pass (Linux's PATH_MAX).
const MAX_PATH: u32 = 4096;
/// The most subscriptions one `poll_oneoff` takes (Linux refuses more descriptors than
/// its open-file limit the same way).
const MAX_SUBSCRIPTIONS: u32 = 1 << 16;

/// Every preview 1 function; the linker provides all of them.
const FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// Whether a Tandem VM provides this import.
pub fn provides(module: &str, name: &str) -> bool {
    module == MODULE && FUNCTIONS.contains(&name)
}

/// How a call ends: an errno for the guest, or a fault that stops the VM.
pub(crate) enum Stop {
    Errno(u16),
    Fault(Fault),
    /// A snapshot is due inside the call, before it is done (a poll or a blocking socket
    /// call about to wait): the call unwinds without a result and, rewound, runs again
    /// (see [`crate::capture`]).
    Unwind,
}

impl From<u16> for Stop {
    fn from(e: u16) -> Self {
        Stop::Errno(e)
    }
}

impl From<Fault> for Stop {
    fn from(f: Fault) -> Self {
        Stop::Fault(f)
    }
}

type Ret = Result<(), Stop>;

/// Guest linear memory, bounds-checked.
pub(crate) struct Mem<'a>(&'a mut [u8]);

impl Mem<'_> {
    fn range(&self, ptr: u32, len: u32) -> Result<std::ops::Range<usize>, u16> {
        let start = ptr as usize;
        let end = start.checked_add(len as usize).ok_or(errno::FAULT)?;
        if end > self.0.len() {
            return Err(errno::FAULT);
        }
        Ok(start..end)
    }
    fn bytes(&self, ptr: u32, len: u32) -> Result<&[u8], u16> {
        let r = self.range(ptr, len)?;
        Ok(&self.0[r])
    }
    fn bytes_mut(&mut self, ptr: u32, len: u32) -> Result<&mut [u8], u16> {
        let r = self.range(ptr, len)?;
        Ok(&mut self.0[r])
    }
    fn str(&self, ptr: u32, len: u32) -> Result<&str, u16> {
        std::str::from_utf8(self.bytes(ptr, len)?).map_err(|_| errno::ILSEQ)
    }
    fn u32(&self, ptr: u32) -> Result<u32, u16> {
        let b = self.bytes(ptr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn put(&mut self, ptr: u32, data: &[u8]) -> Result<(), u16> {
        self.bytes_mut(ptr, data.len() as u32)?
            .copy_from_slice(data);
        Ok(())
    }
    fn put_u32(&mut self, ptr: u32, v: u32) -> Result<(), u16> {
        self.put(ptr, &v.to_le_bytes())
    }
    fn put_u64(&mut self, ptr: u32, v: u64) -> Result<(), u16> {
        self.put(ptr, &v.to_le_bytes())
    }
    /// The (pointer, length) pairs of an iovec array, checked to lie in memory.
    /// At most [`MAX_IOVECS`], as Linux takes at most `IOV_MAX`.
    fn iovecs(&self, ptr: u32, n: u32) -> Result<Vec<(u32, u32)>, u16> {
        if n > MAX_IOVECS {
            return Err(errno::INVAL);
        }
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let at = ptr
                .checked_add(i.checked_mul(8).ok_or(errno::FAULT)?)
                .ok_or(errno::FAULT)?;
            let (p, l) = (self.u32(at)?, self.u32(at + 4)?);
            self.range(p, l)?;
            out.push((p, l));
        }
        Ok(out)
    }
    /// At most `max` bytes of the gather list, from byte `skip` of it on: a gather is
    /// taken in bounded parts, however often its iovecs point at the same memory.
    fn gather_at(&self, iovs: &[(u32, u32)], mut skip: usize, max: usize) -> Result<Vec<u8>, u16> {
        let mut out = Vec::new();
        for &(p, l) in iovs {
            if out.len() >= max {
                break;
            }
            let b = self.bytes(p, l)?;
            if skip >= b.len() {
                skip -= b.len();
                continue;
            }
            let b = &b[skip..];
            skip = 0;
            out.extend_from_slice(&b[..b.len().min(max - out.len())]);
        }
        Ok(out)
    }
    /// Scatter `data` into the iovecs from byte `skip` of them on.
    fn scatter_at(
        &mut self,
        iovs: &[(u32, u32)],
        mut skip: usize,
        mut data: &[u8],
    ) -> Result<(), u16> {
        for &(p, l) in iovs {
            if data.is_empty() {
                break;
            }
            if skip >= l as usize {
                skip -= l as usize;
                continue;
            }
            let n = (l as usize - skip).min(data.len());
            self.put(p + skip as u32, &data[..n])?;
            data = &data[n..];
            skip = 0;
        }
        Ok(())
    }

    fn scatter(&mut self, iovs: &[(u32, u32)], mut data: &[u8]) -> Result<(), u16> {
        for &(p, l) in iovs {
            if data.is_empty() {
                break;
            }
            let n = (l as usize).min(data.len());
            self.put(p, &data[..n])?;
            data = &data[n..];
        }
        Ok(())
    }
}

fn le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// The bytes an iovec list asks for, bounded as Linux bounds one read or write.
fn total_len(iovs: &[(u32, u32)]) -> usize {
    iovs.iter()
        .fold(0usize, |a, &(_, l)| a.saturating_add(l as usize))
        .min(MAX_RW)
}

fn call(
    caller: &mut Caller<'_, Vm>,
    name: &'static str,
    mut f: impl FnMut(&mut Mem, &mut Vm) -> Ret,
) -> wasmtime::Result<i32> {
    // Snapshots (issue 8): a call re-entered by a rewind returns what it returned before.
    if caller.data().snap.is_some()
        && let Some(r) = crate::capture::on_entry(caller, name)?
    {
        return Ok(r);
    }
    let Some(memory) = Vm::guest_memory(caller) else {
        return Ok(i32::from(errno::FAULT));
    };
    let r = loop {
        let (data, vm) = memory.data_and_store_mut(&mut *caller);
        vm.memory_len = data.len();
        match f(&mut Mem(data), vm) {
            Ok(()) => break 0,
            Err(Stop::Errno(e)) => break i32::from(e),
            Err(Stop::Fault(fault)) => return Err(wasmtime::Error::new(fault)),
            Err(Stop::Unwind) if crate::capture::unwindable(caller) => {
                crate::capture::start_unwind(caller, 0)?;
                return Ok(0);
            }
            // Not a snapshot point after all (its stack cannot unwind, and no other point
            // of this call is one): the call goes on from where it stopped, as it would
            // once rewound, and finds what it needs in `Vm::resume`.
            Err(Stop::Unwind) => {}
        }
    };
    // Snapshots: an event import returning may be a snapshot point.
    if caller.data().snap.is_some() {
        crate::capture::on_exit(caller, name, r)?;
    }
    Ok(r)
}

/// Take an event and insist on one outcome shape; an `Errno` outcome becomes the call's.
macro_rules! expect {
    ($vm:ident, $kind:expr, $outcome:expr, $pat:pat $(if $guard:expr)? => $val:expr) => {{
        let outcome = $outcome;
        match outcome {
            $pat $(if $guard)? => $val,
            Outcome::Errno(e) => return Err(Stop::Errno(e)),
            other => return Err(Stop::Fault($vm.unexpected($kind, &other))),
        }
    }};
}

macro_rules! wasi {
    ($linker:ident, $name:literal, |$m:ident, $vm:ident $(, $arg:ident : $ty:ty)*| $body:expr) => {
        $linker.func_wrap(
            MODULE,
            $name,
            |mut caller: Caller<'_, Vm>, $($arg: $ty),*| -> wasmtime::Result<i32> {
                let r = call(&mut caller, $name, |$m, $vm| $body);
                tracing::trace!(target: "wasi", "{}({}) = {:?}", $name, { let a: &[String] = &[$(format!("{}", $arg)),*]; a.join(", ") }, r.as_ref().ok());
                r
            },
        )?;
    };
}

pub(crate) fn add_to_linker(l: &mut Linker<Vm>) -> wasmtime::Result<()> {
    wasi!(l, "args_get", |m, vm, argv: u32, buf: u32| strings_get(
        m,
        &vm.spec.args,
        argv,
        buf
    ));
    wasi!(l, "args_sizes_get", |m, vm, n: u32, size: u32| {
        strings_sizes(m, &vm.spec.args, n, size)
    });
    wasi!(l, "environ_get", |m, vm, envp: u32, buf: u32| strings_get(
        m,
        &vm.spec.env,
        envp,
        buf
    ));
    wasi!(l, "environ_sizes_get", |m, vm, n: u32, size: u32| {
        strings_sizes(m, &vm.spec.env, n, size)
    });
    wasi!(l, "clock_res_get", |m, _vm, id: u32, out: u32| {
        clock_id(id)?;
        Ok(m.put_u64(out, 1_000)?)
    });
    wasi!(
        l,
        "clock_time_get",
        |m, vm, id: u32, _precision: u64, out: u32| clock_time_get(m, vm, id, out)
    );
    wasi!(l, "random_get", |m, vm, buf: u32, len: u32| random_get(
        m, vm, buf, len
    ));
    wasi!(l, "fd_advise", |_m,
                           vm,
                           fd: u32,
                           _o: u64,
                           _l: u64,
                           _a: u32| {
        match vm.fds.get(fd)? {
            FdKind::File { .. } => Ok(()),
            _ => Err(errno::BADF.into()),
        }
    });
    wasi!(l, "fd_allocate", |_m, vm, fd: u32, off: u64, len: u64| {
        fd_allocate(vm, fd, off, len)
    });
    wasi!(l, "fd_close", |_m, vm, fd: u32| {
        let (kind, drop_aside) = vm.fds.remove(fd)?;
        if let FdKind::Socket { conn, .. } = kind {
            let now = vm.net_now;
            vm.net_mut()?.close(conn, now);
            vm.flush_net();
        }
        if let Some(h) = vm.host() {
            h.close(fd);
        }
        aside_drop(vm, drop_aside)
    });
    wasi!(l, "fd_datasync", |_m, vm, fd: u32| fd_sync(vm, fd));
    wasi!(l, "fd_sync", |_m, vm, fd: u32| fd_sync(vm, fd));
    wasi!(
        l,
        "fd_fdstat_get",
        |m, vm, fd: u32, out: u32| fd_fdstat_get(m, vm, fd, out)
    );
    wasi!(l, "fd_fdstat_set_flags", |_m, vm, fd: u32, flags: u32| {
        match vm.fds.get_mut(fd)? {
            FdKind::File { flags: f, .. } => {
                let settable = fdflags::APPEND | fdflags::NONBLOCK;
                *f = (*f & !settable) | (flags as u16 & settable)
            }
            FdKind::Socket { nonblocking, .. } | FdKind::Listener { nonblocking, .. } => {
                *nonblocking = flags as u16 & fdflags::NONBLOCK != 0
            }
            _ => {}
        }
        Ok(())
    });
    wasi!(
        l,
        "fd_fdstat_set_rights",
        |_m, vm, fd: u32, _base: u64, _inheriting: u64| {
            vm.fds.get(fd)?;
            Err(errno::NOTSUP.into())
        }
    );
    wasi!(l, "fd_filestat_get", |m, vm, fd: u32, out: u32| {
        fd_filestat_get(m, vm, fd, out)
    });
    wasi!(l, "fd_filestat_set_size", |_m, vm, fd: u32, size: u64| {
        fd_set_size(vm, fd, size)
    });
    wasi!(
        l,
        "fd_filestat_set_times",
        |_m, vm, fd: u32, a: u64, mt: u64, f: u32| {
            let path = match vm.fds.get(fd)? {
                FdKind::File { path, .. } | FdKind::Dir { path, .. } => path.clone(),
                _ => return Err(errno::NOTSUP.into()),
            };
            let flags = check_fstflags(f)?;
            let args = args_digest(&[&le(u64::from(fd)), &le(a), &le(mt), &le(u64::from(flags))]);
            expect!(vm, Kind::FdFilestatSetTimes,
                vm.event(Kind::FdFilestatSetTimes, args, |h, _, _| h.fd_set_times(fd, a, mt, flags))?,
                Outcome::Done => ());
            vm.outputs.add(
                "times",
                &[path.as_bytes(), &le(a), &le(mt), &le(u64::from(flags))],
            );
            Ok(())
        }
    );
    wasi!(l, "fd_pread", |m,
                          vm,
                          fd: u32,
                          iovs: u32,
                          n: u32,
                          off: u64,
                          out: u32| fd_pread(
        m, vm, fd, iovs, n, off, out
    ));
    wasi!(l, "fd_pwrite", |m,
                           vm,
                           fd: u32,
                           iovs: u32,
                           n: u32,
                           off: u64,
                           out: u32| {
        fd_pwrite(m, vm, fd, iovs, n, off, out)
    });
    wasi!(l, "fd_prestat_get", |m, vm, fd: u32, out: u32| {
        match vm.fds.get(fd)? {
            FdKind::Dir {
                preopen: Some(name),
                ..
            } => {
                m.put(out, &[0, 0, 0, 0])?;
                Ok(m.put_u32(out + 4, name.len() as u32)?)
            }
            _ => Err(errno::BADF.into()),
        }
    });
    wasi!(
        l,
        "fd_prestat_dir_name",
        |m, vm, fd: u32, buf: u32, len: u32| {
            match vm.fds.get(fd)? {
                FdKind::Dir {
                    preopen: Some(name),
                    ..
                } => {
                    let name = name.as_bytes();
                    if (len as usize) < name.len() {
                        return Err(errno::INVAL.into());
                    }
                    Ok(m.put(buf, name)?)
                }
                _ => Err(errno::BADF.into()),
            }
        }
    );
    wasi!(l, "fd_read", |m,
                         vm,
                         fd: u32,
                         iovs: u32,
                         n: u32,
                         out: u32| fd_read(
        m, vm, fd, iovs, n, out
    ));
    wasi!(l, "fd_readdir", |m,
                            vm,
                            fd: u32,
                            buf: u32,
                            len: u32,
                            cookie: u64,
                            out: u32| {
        fd_readdir(m, vm, fd, buf, len, cookie, out)
    });
    wasi!(l, "fd_renumber", |_m, vm, from: u32, to: u32| {
        let (old, drop_aside) = vm.fds.renumber(from, to)?;
        if let Some(FdKind::Socket { conn, .. }) = old {
            // The connection `to` held is closed as by fd_close: its peer gets a FIN.
            let now = vm.net_now;
            vm.net_mut()?.close(conn, now);
            vm.flush_net();
        }
        if let Some(h) = vm.host() {
            h.renumber(from, to);
        }
        aside_drop(vm, drop_aside)
    });
    wasi!(l, "fd_seek", |m,
                         vm,
                         fd: u32,
                         delta: i64,
                         whence: u32,
                         out: u32| fd_seek(
        m, vm, fd, delta, whence, out
    ));
    wasi!(l, "fd_tell", |m, vm, fd: u32, out: u32| fd_seek(
        m, vm, fd, 0, 1, out
    ));
    wasi!(l, "fd_write", |m,
                          vm,
                          fd: u32,
                          iovs: u32,
                          n: u32,
                          out: u32| fd_write(
        m, vm, fd, iovs, n, out
    ));
    wasi!(
        l,
        "path_create_directory",
        |m, vm, fd: u32, p: u32, pl: u32| {
            let path = guest_path(m, vm, fd, p, pl)?;
            path_op(
                vm,
                Kind::PathCreateDirectory,
                "mkdir",
                fd,
                &path,
                &[(fd, &path)],
                |h, _| h.mkdir(fd, &path),
            )
        }
    );
    wasi!(
        l,
        "path_remove_directory",
        |m, vm, fd: u32, p: u32, pl: u32| {
            let path = guest_path(m, vm, fd, p, pl)?;
            path_op(
                vm,
                Kind::PathRemoveDirectory,
                "rmdir",
                fd,
                &path,
                &[(fd, &path)],
                |h, _| h.rmdir(fd, &path),
            )
        }
    );
    wasi!(l, "path_unlink_file", |m, vm, fd: u32, p: u32, pl: u32| {
        let path = guest_path(m, vm, fd, p, pl)?;
        path_op(
            vm,
            Kind::PathUnlinkFile,
            "unlink",
            fd,
            &path,
            &[(fd, &path)],
            |h, fds| h.unlink(fd, &path, fds),
        )
    });
    wasi!(l, "path_rename", |m,
                             vm,
                             fd: u32,
                             p: u32,
                             pl: u32,
                             fd2: u32,
                             q: u32,
                             ql: u32| {
        let from = guest_path(m, vm, fd, p, pl)?;
        let to = guest_path(m, vm, fd2, q, ql)?;
        let both = format!("{from}\0{fd2}\0{to}");
        path_op(
            vm,
            Kind::PathRename,
            "rename",
            fd,
            &both,
            &[(fd, &from), (fd2, &to)],
            |h, fds| h.rename(fd, &from, fd2, &to, fds),
        )
    });
    wasi!(l, "path_symlink", |m,
                              vm,
                              t: u32,
                              tl: u32,
                              fd: u32,
                              p: u32,
                              pl: u32| {
        if tl > MAX_PATH {
            return Err(errno::NAMETOOLONG.into());
        }
        let target = m.str(t, tl)?.to_string();
        let path = guest_path(m, vm, fd, p, pl)?;
        let both = format!("{target}\0{path}");
        path_op(
            vm,
            Kind::PathSymlink,
            "symlink",
            fd,
            &both,
            &[(fd, &path)],
            |h, _| h.symlink(&target, fd, &path),
        )
    });
    wasi!(l, "path_link", |m,
                           vm,
                           fd: u32,
                           flags: u32,
                           p: u32,
                           pl: u32,
                           fd2: u32,
                           q: u32,
                           ql: u32| {
        let from = guest_path(m, vm, fd, p, pl)?;
        let to = guest_path(m, vm, fd2, q, ql)?;
        // Following a link's source is not supported (as in wasmtime; POSIX link()
        // does not follow either).
        if flags & lookupflags::SYMLINK_FOLLOW != 0 {
            return Err(errno::INVAL.into());
        }
        let both = format!("{from}\0{fd2}\0{to}");
        path_op(
            vm,
            Kind::PathLink,
            "link",
            fd,
            &both,
            &[(fd, &from), (fd2, &to)],
            |h, _| h.link(fd, &from, fd2, &to),
        )
    });
    wasi!(
        l,
        "path_filestat_get",
        |m, vm, fd: u32, flags: u32, p: u32, pl: u32, out: u32| {
            let path = guest_path(m, vm, fd, p, pl)?;
            m.bytes(out, 64)?;
            let follow = flags & lookupflags::SYMLINK_FOLLOW != 0;
            let args = args_digest(&[&le(u64::from(fd)), path.as_bytes(), &[follow as u8]]);
            let st = expect!(vm, Kind::PathFilestatGet,
            vm.event(Kind::PathFilestatGet, args, |h, _, _| h.stat(fd, &path, follow))?,
            Outcome::Stat(s) => s);
            Ok(put_filestat(m, out, &st)?)
        }
    );
    wasi!(
        l,
        "path_filestat_set_times",
        |m, vm, fd: u32, fl: u32, p: u32, pl: u32, a: u64, mt: u64, f: u32| {
            let path = guest_path(m, vm, fd, p, pl)?;
            let flags = check_fstflags(f)?;
            let follow = fl & lookupflags::SYMLINK_FOLLOW != 0;
            let what = format!("{path}\0{}\0{a}\0{mt}\0{flags}", u8::from(follow));
            path_op(
                vm,
                Kind::PathFilestatSetTimes,
                "times",
                fd,
                &what,
                &[],
                |h, _| h.set_times(fd, &path, follow, a, mt, flags),
            )
        }
    );
    wasi!(
        l,
        "path_readlink",
        |m, vm, fd: u32, p: u32, pl: u32, buf: u32, len: u32, out: u32| {
            let path = guest_path(m, vm, fd, p, pl)?;
            m.bytes(buf, len)?;
            m.bytes(out, 4)?;
            let args = args_digest(&[&le(u64::from(fd)), path.as_bytes()]);
            let target = expect!(vm, Kind::PathReadlink,
            vm.event(Kind::PathReadlink, args, |h, _, _| h.readlink(fd, &path))?,
            Outcome::Data(d) if d.len() <= MAX_PATH as usize => d);
            let n = target.len().min(len as usize);
            m.put(buf, &target[..n])?;
            Ok(m.put_u32(out, n as u32)?)
        }
    );
    wasi!(l, "path_open", |m,
                           vm,
                           fd: u32,
                           lf: u32,
                           p: u32,
                           pl: u32,
                           of: u32,
                           rb: u64,
                           ri: u64,
                           ff: u32,
                           out: u32| {
        let path = guest_path(m, vm, fd, p, pl)?;
        let open = Open {
            dirfd: fd,
            follow: lf & lookupflags::SYMLINK_FOLLOW != 0,
            oflags: of as u16,
            rights: [rb, ri],
            fdflags: ff as u16,
        };
        path_open(m, vm, &path, open, out)
    });
    wasi!(l, "poll_oneoff", |m,
                             vm,
                             subs: u32,
                             events: u32,
                             n: u32,
                             out: u32| {
        poll_oneoff(m, vm, subs, events, n, out)
    });
    wasi!(l, "sched_yield", |_m, _vm| Ok(()));
    wasi!(l, "proc_raise", |_m, vm, _s: u32| unsupported(
        vm,
        "proc_raise"
    ));
    wasi!(l, "sock_accept", |m, vm, fd: u32, flags: u32, out: u32| {
        sock_accept(m, vm, fd, flags as u16, out)
    });
    wasi!(l, "sock_recv", |m,
                           vm,
                           fd: u32,
                           iovs: u32,
                           n: u32,
                           fl: u32,
                           out: u32,
                           oflags: u32| {
        let iovs = m.iovecs(iovs, n)?;
        m.bytes(out, 4)?;
        m.bytes(oflags, 2)?;
        let data = sock_read(vm, fd, total_len(&iovs), fl & 1 != 0)?;
        m.scatter(&iovs, &data)?;
        m.put(oflags, &[0, 0])?;
        Ok(m.put_u32(out, data.len() as u32)?)
    });
    wasi!(l, "sock_send", |m,
                           vm,
                           fd: u32,
                           iovs: u32,
                           n: u32,
                           _fl: u32,
                           out: u32| {
        let iovs = m.iovecs(iovs, n)?;
        m.bytes(out, 4)?;
        let data = m.gather_at(&iovs, 0, MAX_IO)?;
        let sent = sock_write(vm, fd, &data)?;
        Ok(m.put_u32(out, sent as u32)?)
    });
    wasi!(l, "sock_shutdown", |_m, vm, fd: u32, how: u32| {
        let (conn, _) = socket(vm, fd)?;
        if how & 2 != 0 {
            let now = vm.net_now;
            vm.net_mut()?
                .shutdown_write(conn, now)
                .map_err(crate::net::sock_errno)?;
            vm.flush_net();
        }
        Ok(())
    });
    l.func_wrap(
        MODULE,
        "proc_exit",
        |_: Caller<'_, Vm>, code: u32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(Fault::Exit(code)))
        },
    )?;
    Ok(())
}

fn unsupported(vm: &mut Vm, name: &'static str) -> Ret {
    vm.warn_unsupported(name);
    Err(errno::NOSYS.into())
}

fn strings_sizes(m: &mut Mem, strings: &[String], n: u32, size: u32) -> Ret {
    m.put_u32(n, strings.len() as u32)?;
    let total: usize = strings.iter().map(|s| s.len() + 1).sum();
    Ok(m.put_u32(size, total as u32)?)
}

fn strings_get(m: &mut Mem, strings: &[String], ptrs: u32, buf: u32) -> Ret {
    let mut at = buf;
    for (i, s) in strings.iter().enumerate() {
        m.put_u32(ptrs + 4 * i as u32, at)?;
        m.put(at, s.as_bytes())?;
        m.put(at + s.len() as u32, &[0])?;
        at += s.len() as u32 + 1;
    }
    Ok(())
}

/// The clocks a VM has: real time and monotonic time. CPU-time clocks answer EBADF as in
/// wasmtime (a replica's CPU time is not the primary's); other ids are invalid.
fn clock_id(id: u32) -> Result<(), u16> {
    match id {
        clockid::REALTIME | clockid::MONOTONIC => Ok(()),
        clockid::PROCESS_CPUTIME | clockid::THREAD_CPUTIME => Err(errno::BADF),
        _ => Err(errno::INVAL),
    }
}

fn clock_time_get(m: &mut Mem, vm: &mut Vm, id: u32, out: u32) -> Ret {
    clock_id(id)?;
    m.bytes(out, 8)?;
    let raw = expect!(vm, Kind::ClockTimeGet,
        vm.event(Kind::ClockTimeGet, u64::from(id), |h, _, _| h.now(id))?,
        Outcome::Value(t) => t);
    let t = vm.clock.observe(id, raw);
    Ok(m.put_u64(out, t)?)
}

fn random_get(m: &mut Mem, vm: &mut Vm, buf: u32, len: u32) -> Ret {
    m.bytes(buf, len)?;
    let len = len as usize;
    let mut done = 0;
    while done < len {
        let part = (len - done).min(MAX_IO);
        let data = expect!(vm, Kind::RandomGet,
            vm.event(Kind::RandomGet, part as u64, |h, _, _| h.random(part))?,
            Outcome::Data(d) if d.len() == part => d);
        m.put(buf + done as u32, &data)?;
        done += part;
    }
    Ok(())
}

/// The largest read or write served in one call, as Linux's `MAX_RW_COUNT`: a larger
/// request is answered short.
const MAX_RW: usize = 0x7fff_f000;

/// A guest path for an operation beneath directory `fd`: bounded, and only for a
/// descriptor that is a directory.
fn guest_path(m: &Mem, vm: &Vm, fd: u32, p: u32, pl: u32) -> Result<String, u16> {
    vm.fds.dir_path(fd)?;
    if pl > MAX_PATH {
        return Err(errno::NAMETOOLONG);
    }
    Ok(m.str(p, pl)?.to_string())
}

/// Contradictory time flags (a time and "now" for the same stamp) are invalid.
fn check_fstflags(f: u32) -> Result<u16, u16> {
    let both = |set: u16, now: u16| f & u32::from(set) != 0 && f & u32::from(now) != 0;
    if f > 0xf
        || both(fstflags::ATIM, fstflags::ATIM_NOW)
        || both(fstflags::MTIM, fstflags::MTIM_NOW)
    {
        return Err(errno::INVAL);
    }
    Ok(f as u16)
}

/// The path and inode of an open file, or the errno for a descriptor that is not one.
fn open_file(vm: &Vm, fd: u32) -> Result<(String, u64), u16> {
    match vm.fds.get(fd)? {
        FdKind::File { path, ino, .. } => Ok((path.clone(), *ino)),
        FdKind::Dir { .. } => Err(errno::BADF),
        _ => Err(errno::SPIPE),
    }
}

/// The last descriptor of a set-aside file closed: its set-aside name goes, once the
/// output rule allows (it is a change to shared storage like any other).
fn aside_drop(vm: &mut Vm, ino: Option<u64>) -> Ret {
    if let Some(ino) = ino {
        expect!(vm, Kind::AsideDrop,
            vm.event(Kind::AsideDrop, ino, |h, _, _| h.drop_aside(ino))?,
            Outcome::Done => ());
    }
    Ok(())
}

fn fd_allocate(vm: &mut Vm, fd: u32, off: u64, len: u64) -> Ret {
    let (path, ino) = open_file(vm, fd)?;
    let args = args_digest(&[&le(u64::from(fd)), &le(off), &le(len)]);
    expect!(vm, Kind::FdAllocate,
        vm.event(Kind::FdAllocate, args, |h, _, _| h.allocate(fd, off, len))?,
        Outcome::Done => ());
    vm.fds.grow(ino, off.saturating_add(len));
    vm.outputs
        .add("allocate", &[path.as_bytes(), &le(off), &le(len)]);
    Ok(())
}

fn fd_sync(vm: &mut Vm, fd: u32) -> Ret {
    if !matches!(vm.fds.get(fd)?, FdKind::File { .. } | FdKind::Dir { .. }) {
        return Err(errno::INVAL.into());
    }
    expect!(vm, Kind::FdSync,
        vm.event(Kind::FdSync, u64::from(fd), |h, _, _| h.sync(fd))?,
        Outcome::Done => ());
    Ok(())
}

fn fd_fdstat_get(m: &mut Mem, vm: &mut Vm, fd: u32, out: u32) -> Ret {
    let kind = vm.fds.get(fd)?;
    let flags = match kind {
        FdKind::File { flags, .. } => *flags,
        FdKind::Socket {
            nonblocking: true, ..
        }
        | FdKind::Listener {
            nonblocking: true, ..
        } => fdflags::NONBLOCK,
        _ => 0,
    };
    let filetype = kind.filetype();
    let [base, inheriting] = rights::of_kind(kind);
    let mut b = [0u8; 24];
    b[0] = filetype;
    b[2..4].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&base.to_le_bytes());
    b[16..24].copy_from_slice(&inheriting.to_le_bytes());
    Ok(m.put(out, &b)?)
}

fn put_filestat(m: &mut Mem, out: u32, s: &Filestat) -> Result<(), u16> {
    let mut b = [0u8; 64];
    b[0..8].copy_from_slice(&s.dev.to_le_bytes());
    b[8..16].copy_from_slice(&s.ino.to_le_bytes());
    b[16] = s.filetype;
    b[24..32].copy_from_slice(&s.nlink.to_le_bytes());
    b[32..40].copy_from_slice(&s.size.to_le_bytes());
    b[40..48].copy_from_slice(&s.atim.to_le_bytes());
    b[48..56].copy_from_slice(&s.mtim.to_le_bytes());
    b[56..64].copy_from_slice(&s.ctim.to_le_bytes());
    m.put(out, &b)
}

fn fd_filestat_get(m: &mut Mem, vm: &mut Vm, fd: u32, out: u32) -> Ret {
    let kind = vm.fds.get(fd)?.clone();
    m.bytes(out, 64)?;
    let mut st = match kind {
        FdKind::File { .. } | FdKind::Dir { .. } => expect!(vm, Kind::FdFilestatGet,
            vm.event(Kind::FdFilestatGet, u64::from(fd), |h, _, _| h.fstat(fd))?,
            Outcome::Stat(s) => s),
        _ => Filestat {
            filetype: kind.filetype(),
            nlink: 1,
            ..Filestat::default()
        },
    };
    if let FdKind::File { ino, aside, .. } = kind {
        // What the host said is now what the VM knows.
        vm.fds.resize(ino, st.size);
        if aside {
            // The set-aside link is the host's, not a name the guest could see.
            st.nlink = st.nlink.saturating_sub(1);
        }
    }
    Ok(put_filestat(m, out, &st)?)
}

fn fd_set_size(vm: &mut Vm, fd: u32, size: u64) -> Ret {
    let (path, ino) = open_file(vm, fd)?;
    let args = args_digest(&[&le(u64::from(fd)), &le(size)]);
    expect!(vm, Kind::FdFilestatSetSize,
        vm.event(Kind::FdFilestatSetSize, args, |h, _, _| h.set_size(fd, size))?,
        Outcome::Done => ());
    vm.fds.resize(ino, size);
    vm.outputs.add("truncate", &[path.as_bytes(), &le(size)]);
    Ok(())
}

/// An operation on a name beneath directory `dirfd` (`desc` says which names): an event,
/// and on success an output. Renames and unlinks also tell the descriptor table what
/// became of the files the guest holds open. `names` (each beneath a directory
/// descriptor), for an operation that must not be done twice: see [`Vm::event_on`].
#[allow(clippy::too_many_arguments)]
fn path_op(
    vm: &mut Vm,
    kind: Kind,
    what: &str,
    dirfd: u32,
    desc: &str,
    names: &[(u32, &str)],
    op: impl FnOnce(&mut crate::host::LiveHost, &crate::fdtable::FdTable) -> Outcome,
) -> Ret {
    let args = args_digest(&[what.as_bytes(), &le(u64::from(dirfd)), desc.as_bytes()]);
    match vm.event_on(kind, args, names, |h, fds, _| op(h, fds))? {
        Outcome::Done => {}
        Outcome::Removed { aside } if kind == Kind::PathUnlinkFile => {
            if let Some(ino) = aside {
                vm.fds.set_aside(ino);
            }
        }
        Outcome::Moved { from, to, aside } if kind == Kind::PathRename => {
            if let Some(ino) = aside {
                vm.fds.set_aside(ino);
            }
            vm.fds.moved(&from, &to);
            // A copy gone live at a rename its predecessor performed could not reopen what
            // moved: now the table says where it went.
            if let crate::vm::Inputs::Live { host, .. } = &mut vm.inputs
                && host.missing
            {
                host.reopen_missing(&vm.fds);
            }
        }
        Outcome::Errno(e) => return Err(e.into()),
        other => return Err(Stop::Fault(vm.unexpected(kind, &other))),
    }
    vm.outputs
        .add(what, &[&le(u64::from(dirfd)), desc.as_bytes()]);
    Ok(())
}

/// Read up to `len` bytes in parts of at most [`MAX_IO`], each its own event, scattering
/// them into `iovs`; a short part ends the read, as it would natively.
fn read_parts(
    m: &mut Mem,
    vm: &mut Vm,
    iovs: &[(u32, u32)],
    len: usize,
    mut part: impl FnMut(&mut Vm, usize, usize) -> Result<crate::event::Bytes, Stop>,
) -> Result<usize, Stop> {
    let mut done = 0;
    while done < len {
        let want = (len - done).min(MAX_IO);
        let data = match part(vm, done, want) {
            Ok(d) => d,
            Err(Stop::Errno(_)) if done > 0 => break,
            Err(e) => return Err(e),
        };
        m.scatter_at(iovs, done, &data)?;
        done += data.len();
        if data.len() < want {
            break;
        }
    }
    Ok(done)
}

fn fd_read(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    let len = total_len(&iovs);
    m.bytes(out, 4)?;
    let offset = match vm.fds.get(fd)? {
        FdKind::Socket { .. } => {
            let data = sock_read(vm, fd, len.min(MAX_IO), false)?;
            m.scatter(&iovs, &data)?;
            return Ok(m.put_u32(out, data.len() as u32)?);
        }
        FdKind::Listener { .. } => return Err(errno::INVAL.into()),
        FdKind::Stdin => {
            let want = len.min(MAX_IO);
            let args = args_digest(&[&le(u64::from(fd)), &le(want as u64)]);
            vm.before_wait();
            let data = expect!(vm, Kind::FdRead,
                vm.event(Kind::FdRead, args, |h, _, _| h.read_stdin(want))?,
                Outcome::Data(d) if d.len() <= want => d);
            m.scatter(&iovs, &data)?;
            return Ok(m.put_u32(out, data.len() as u32)?);
        }
        FdKind::File {
            offset, read: true, ..
        } => *offset,
        FdKind::File { .. } | FdKind::Stdout | FdKind::Stderr => return Err(errno::BADF.into()),
        FdKind::Dir { .. } => return Err(errno::BADF.into()),
    };
    let got = read_parts(m, vm, &iovs, len, |vm, done, want| {
        let at = offset + done as u64;
        let args = args_digest(&[&le(u64::from(fd)), &le(want as u64)]);
        Ok(expect!(vm, Kind::FdRead,
            vm.event(Kind::FdRead, args, |h, _, _| h.read_at(fd, at, want))?,
            Outcome::Data(d) if d.len() <= want => d))
    })?;
    if let Ok(FdKind::File { offset, .. }) = vm.fds.get_mut(fd) {
        *offset += got as u64;
    }
    Ok(m.put_u32(out, got as u32)?)
}

fn fd_pread(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, off: u64, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    let len = total_len(&iovs);
    m.bytes(out, 4)?;
    match vm.fds.get(fd)? {
        FdKind::File { read: true, .. } => {}
        FdKind::File { .. } => return Err(errno::BADF.into()),
        FdKind::Dir { .. } => return Err(errno::BADF.into()),
        _ => return Err(errno::SPIPE.into()),
    }
    let got = read_parts(m, vm, &iovs, len, |vm, done, want| {
        let at = off.saturating_add(done as u64);
        let args = args_digest(&[&le(u64::from(fd)), &le(at), &le(want as u64)]);
        Ok(expect!(vm, Kind::FdPread,
            vm.event(Kind::FdPread, args, |h, _, _| h.read_at(fd, at, want))?,
            Outcome::Data(d) if d.len() <= want => d))
    })?;
    Ok(m.put_u32(out, got as u32)?)
}

/// Write the guest's `iovs` to open file `fd` in parts of at most [`MAX_IO`], each its
/// own event: at `at` (pwrite) or at the descriptor's offset, or for an append at the end
/// the VM knows. Returns the bytes written; an error after some were is a short write.
fn write_file(
    m: &Mem,
    vm: &mut Vm,
    fd: u32,
    iovs: &[(u32, u32)],
    at: Option<u64>,
) -> Result<usize, Stop> {
    let (path, ino, offset, append, behind) = match vm.fds.get(fd)? {
        FdKind::File {
            path,
            ino,
            offset,
            write: true,
            flags,
            aside,
            ..
        } => (
            path.clone(),
            *ino,
            *offset,
            flags & fdflags::APPEND != 0,
            // A copy going live finds the file again by its path to write it again, which
            // a file set aside has no more; and a synchronous write is durable when its
            // outcome is given.
            !aside && flags & (fdflags::DSYNC | fdflags::RSYNC | fdflags::SYNC) == 0,
        ),
        FdKind::File { .. } | FdKind::Dir { .. } => return Err(errno::BADF.into()),
        _ if at.is_some() => return Err(errno::SPIPE.into()),
        _ => return Err(errno::BADF.into()),
    };
    let len = total_len(iovs);
    let mut done = 0;
    let mut position = at.unwrap_or(offset);
    loop {
        let data = crate::event::Bytes::from(m.gather_at(iovs, done, MAX_IO)?);
        // Appends go to the file's end: every change of its size went through this VM, so
        // the end it knows is the end, and writing there again is idempotent. (Linux
        // appends a pwrite on an append descriptor too.)
        let start = if append {
            vm.fds.size_of(ino)
        } else {
            position
        };
        let args = args_digest(&[&le(u64::from(fd)), &le(start), &le(data.len() as u64)]);
        let outcome = vm.write_event(fd, start, &data, args, behind.then_some((&path, ino)));
        let (written, end) = match outcome? {
            Outcome::Written { n, offset } if n as usize <= data.len() => (n as usize, offset),
            Outcome::Errno(_) if done > 0 => break,
            Outcome::Errno(e) => return Err(e.into()),
            other => return Err(Stop::Fault(vm.unexpected(Kind::FdWrite, &other))),
        };
        vm.fds.grow(ino, end);
        vm.outputs
            .add("write", &[path.as_bytes(), &le(start), &data[..written]]);
        done += written;
        position = end;
        if written < data.len() || done >= len {
            break;
        }
    }
    if at.is_none()
        && let Ok(FdKind::File { offset, .. }) = vm.fds.get_mut(fd)
    {
        *offset = position;
    }
    Ok(done)
}

fn fd_write(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    m.bytes(out, 4)?;
    let written = match vm.fds.get(fd)? {
        FdKind::Stdout | FdKind::Stderr => {
            // Console output is an output, not an input: it always succeeds in full.
            let len = total_len(&iovs);
            let mut done = 0;
            while done < len {
                let data = m.gather_at(&iovs, done, MAX_IO)?;
                vm.outputs.add("console", &[&le(u64::from(fd)), &data]);
                if let crate::vm::Inputs::Live { port, .. } = &mut vm.inputs {
                    port.console(vm.seq, fd, &data);
                }
                done += data.len();
            }
            done
        }
        FdKind::Socket { .. } => {
            let data = m.gather_at(&iovs, 0, MAX_IO)?;
            sock_write(vm, fd, &data)?
        }
        _ => write_file(m, vm, fd, &iovs, None)?,
    };
    Ok(m.put_u32(out, written as u32)?)
}

fn fd_pwrite(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, off: u64, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    m.bytes(out, 4)?;
    let written = write_file(m, vm, fd, &iovs, Some(off))?;
    Ok(m.put_u32(out, written as u32)?)
}

fn fd_seek(m: &mut Mem, vm: &mut Vm, fd: u32, delta: i64, whence: u32, out: u32) -> Ret {
    m.bytes(out, 8)?;
    let (cur, ino) = match vm.fds.get(fd)? {
        FdKind::File { offset, ino, .. } => (*offset, *ino),
        FdKind::Dir { .. } => return Err(errno::BADF.into()),
        _ => return Err(errno::SPIPE.into()),
    };
    let base = match whence {
        0 => 0,
        1 => cur,
        2 => {
            let size = expect!(vm, Kind::FdSeekEnd,
                vm.event(Kind::FdSeekEnd, u64::from(fd), |h, _, _| h.file_size(fd))?,
                Outcome::Value(v) => v);
            vm.fds.resize(ino, size);
            size
        }
        _ => return Err(errno::INVAL.into()),
    };
    let new = i128::from(base) + i128::from(delta);
    if new < 0 || new > i128::from(i64::MAX) {
        return Err(errno::INVAL.into());
    }
    if let Ok(FdKind::File { offset, .. }) = vm.fds.get_mut(fd) {
        *offset = new as u64;
    }
    Ok(m.put_u64(out, new as u64)?)
}

fn fd_readdir(m: &mut Mem, vm: &mut Vm, fd: u32, buf: u32, len: u32, cookie: u64, out: u32) -> Ret {
    m.bytes(buf, len)?;
    m.bytes(out, 4)?;
    match vm.fds.get(fd)? {
        FdKind::Dir { .. } => {}
        _ => return Err(errno::BADF.into()),
    }
    // A cookie this VM never handed out lists nothing, as past the end.
    let Some(offset) = vm.fds.dir_offset(fd, cookie) else {
        return Ok(m.put_u32(out, 0)?);
    };
    // A listing is one event, bounded like any other: a buffer larger than that is
    // filled up to the bound.
    let want = (len as usize).min(MAX_IO);
    let args = args_digest(&[&le(u64::from(fd)), &le(offset), &le(want as u64)]);
    let mut data = expect!(vm, Kind::FdReaddir,
        vm.event(Kind::FdReaddir, args, |h, _, _| h.readdir(fd, offset, want))?,
        Outcome::Data(d) if d.len() <= want => d);
    // The guest sees cookies, the event keeps offsets: a shared listing is copied here.
    vm.fds.give_cookies(fd, data.make_mut())?;
    m.put(buf, &data)?;
    Ok(m.put_u32(out, data.len() as u32)?)
}

/// A decoded `path_open` call.
struct Open {
    dirfd: u32,
    follow: bool,
    oflags: u16,
    rights: [u64; 2],
    fdflags: u16,
}

fn path_open(m: &mut Mem, vm: &mut Vm, path: &str, o: Open, out: u32) -> Ret {
    m.bytes(out, 4)?;
    let [rights_base, _] = o.rights;
    let read = rights_base & rights::READS != 0;
    // O_APPEND alone does not make a descriptor writable (O_RDONLY|O_APPEND cannot write).
    let write = rights_base & rights::WRITES != 0;
    let fd = vm.fds.lowest_free()?;
    let flags = crate::datastore::open_flags(o.oflags, o.fdflags, read, write, o.follow);
    let args = args_digest(&[
        &le(u64::from(o.dirfd)),
        path.as_bytes(),
        &le(flags as u64),
        &le(u64::from(fd)),
    ]);
    let dirfd = o.dirfd;
    // An exclusive create must not be done twice (the second would fail EEXIST).
    let exclusive = o.oflags & (oflags::CREAT | oflags::EXCL) == oflags::CREAT | oflags::EXCL;
    let names: &[(u32, &str)] = if exclusive { &[(dirfd, path)] } else { &[] };
    let (ft, size, ino, kpath) = expect!(vm, Kind::PathOpen,
        vm.event_on(Kind::PathOpen, args, names, |h, _, _| h.open(dirfd, path, flags, fd))?,
        Outcome::Opened { filetype, size, ino, path } => (filetype, size, ino, path));
    if o.oflags & (oflags::CREAT | oflags::TRUNC) != 0 {
        vm.outputs
            .add("open", &[path.as_bytes(), &le(u64::from(o.oflags))]);
    }
    let kind = if ft == filetype::DIRECTORY {
        FdKind::Dir {
            path: kpath,
            preopen: None,
            ino,
        }
    } else {
        FdKind::File {
            path: kpath,
            ino,
            offset: 0,
            read: read || !write,
            write,
            flags: o.fdflags
                & (fdflags::APPEND
                    | fdflags::NONBLOCK
                    | fdflags::DSYNC
                    | fdflags::RSYNC
                    | fdflags::SYNC),
            aside: false,
        }
    };
    vm.fds.insert_file(fd, kind, size);
    Ok(m.put_u32(out, fd)?)
}

/// One decoded `poll_oneoff` subscription.
enum Sub {
    Clock {
        userdata: u64,
        id: u32,
        timeout: u64,
        abs: bool,
    },
    Fd {
        userdata: u64,
        kind: u8,
        fd: u32,
    },
}

fn poll_oneoff(m: &mut Mem, vm: &mut Vm, subs: u32, events: u32, n: u32, out: u32) -> Ret {
    // Taken first: whatever this call does, it is `None` again once the call is entered.
    let resume = match vm.resume.take() {
        None => None,
        Some(Resume::Poll(d)) => Some(d),
        Some(other) => {
            return Err(Stop::Fault(Fault::Internal(format!(
                "a poll resumed where {other:?} was interrupted"
            ))));
        }
    };
    if n == 0 || n > MAX_SUBSCRIPTIONS {
        return Err(errno::INVAL.into());
    }
    let raw = m.bytes(subs, n * 48)?.to_vec();
    m.bytes(events, n * 32)?;
    m.bytes(out, 4)?;
    let mut parsed = Vec::with_capacity(n as usize);
    for s in raw.chunks_exact(48) {
        let u64_at = |i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap_or([0; 4]));
        let userdata = u64_at(0);
        parsed.push(match s[8] {
            // A clock the VM does not have can never fire.
            eventtype::CLOCK if clock_id(u32_at(16)).is_err() => {
                return Err(errno::INVAL.into());
            }
            eventtype::CLOCK => Sub::Clock {
                userdata,
                id: u32_at(16),
                timeout: u64_at(24),
                abs: u16::from_le_bytes([s[40], s[41]]) & 1 != 0,
            },
            // As wasmtime: a subscription to a descriptor that is not open fails the call.
            kind @ (eventtype::FD_READ | eventtype::FD_WRITE) => {
                let fd = u32_at(16);
                vm.fds.get(fd)?;
                Sub::Fd { userdata, kind, fd }
            }
            _ => return Err(errno::INVAL.into()),
        });
    }
    let polled = if vm.net.is_some() {
        poll_with_network(vm, &parsed, resume, m.0.len())?
    } else if resume.is_some() {
        return Err(Stop::Fault(Fault::Internal(
            "a poll resumed in a VM without a NIC".into(),
        )));
    } else {
        poll_host(vm, &parsed, &raw)?
    };
    for (i, e) in polled.iter().enumerate() {
        put_event(m, events + 32 * i as u32, e)?;
    }
    Ok(m.put_u32(out, polled.len() as u32)?)
}

/// Without a NIC a poll is one event: the host waits and says what became ready.
fn poll_host(vm: &mut Vm, parsed: &[Sub], raw: &[u8]) -> Result<Vec<PollEvent>, Stop> {
    let ready: Vec<Option<Result<u64, u16>>> = parsed
        .iter()
        .map(|s| match s {
            Sub::Fd { kind, fd, .. } => match vm.fds.get(*fd) {
                Ok(FdKind::Stdin) if *kind == eventtype::FD_READ => None,
                Ok(_) => Some(Ok(0)),
                Err(e) => Some(Err(e)),
            },
            Sub::Clock { .. } => None,
        })
        .collect();
    let args = args_digest(&[raw]);
    let n = parsed.len();
    // A poll that may wait: nothing ready, and no clock that fires at once.
    let at_once = parsed.iter().any(|s| {
        matches!(
            s,
            Sub::Clock {
                timeout: 0,
                abs: false,
                ..
            }
        )
    });
    if !at_once && ready.iter().all(Option::is_none) {
        vm.before_wait();
    }
    Ok(expect!(vm, Kind::PollOneoff,
        vm.event(Kind::PollOneoff, args, |h, _, clock| {
            let now = |id: u32| match h.now(id) {
                Outcome::Value(t) => t.max(if id == clockid::REALTIME { clock.last_realtime } else { clock.last_monotonic }),
                _ => 0,
            };
            let subs: Vec<Subscription> = parsed.iter().zip(&ready).map(|(s, ready)| match s {
                Sub::Clock { userdata, id, timeout, abs } => Subscription::Clock {
                    userdata: *userdata,
                    id: *id,
                    deadline: if *abs { *timeout } else { now(*id).saturating_add(*timeout) },
                },
                Sub::Fd { userdata, kind, .. } => Subscription::Fd { userdata: *userdata, kind: *kind, ready: *ready },
            }).collect();
            h.poll(&subs, now)
        })?,
        Outcome::Polled(p) if !p.is_empty() && p.len() <= n => p))
}

/// With a NIC a poll is a series of network steps: after each, readiness is a pure
/// function of VM state, and the step's time decides which clocks fired.
///
/// Just before each waiting step is a snapshot point (an idle VM waits here): with a
/// snapshot due, the call saves its deadlines in [`Vm::resume`] and unwinds
/// ([`Stop::Unwind`]); rewound, it is entered again with the same subscriptions (the
/// guest ran no instruction since) and goes on from that point, without the first
/// non-waiting step it already took: the same events follow as without the snapshot.
fn poll_with_network(
    vm: &mut Vm,
    parsed: &[Sub],
    resume: Option<Vec<Option<u64>>>,
    memory_len: usize,
) -> Result<Vec<PollEvent>, Stop> {
    let watch_stdin = parsed.iter().any(|s| {
        matches!(s, Sub::Fd { kind: eventtype::FD_READ, fd, .. } if matches!(vm.fds.get(*fd), Ok(FdKind::Stdin)))
    });
    let deadlines: Vec<Option<u64>> = match resume {
        Some(d) if d.len() == parsed.len() => d,
        Some(_) => {
            return Err(Stop::Fault(Fault::Internal(
                "the poll resumed has other subscriptions than the one interrupted".into(),
            )));
        }
        None => {
            vm.net_step(false, None, watch_stdin)?;
            let start = vm.net_now;
            parsed
                .iter()
                .map(|s| match s {
                    Sub::Clock {
                        id,
                        timeout,
                        abs: true,
                        ..
                    } if *id == clockid::REALTIME => {
                        Some(start.saturating_add(timeout.saturating_sub(vm.clock.last_realtime)))
                    }
                    Sub::Clock {
                        timeout, abs: true, ..
                    } => Some(*timeout),
                    Sub::Clock { timeout, .. } => Some(start.saturating_add(*timeout)),
                    Sub::Fd { .. } => None,
                })
                .collect()
        }
    };
    loop {
        let mut events = Vec::new();
        let net = vm.net.as_ref();
        for (s, deadline) in parsed.iter().zip(&deadlines) {
            let (userdata, kind, ready) = match s {
                Sub::Clock { userdata, .. } => (
                    *userdata,
                    eventtype::CLOCK,
                    Ok(deadline.is_some_and(|d| vm.net_now >= d)),
                ),
                Sub::Fd { userdata, kind, fd } => {
                    let read = *kind == eventtype::FD_READ;
                    let ready = match vm.fds.get(*fd) {
                        Ok(FdKind::Stdin) => Ok(read && vm.stdin_ready),
                        Ok(FdKind::Socket { conn, .. }) => Ok(net.is_some_and(|n| {
                            if read {
                                n.readable(*conn)
                            } else {
                                n.writable(*conn)
                            }
                        })),
                        Ok(FdKind::Listener { port, .. }) => {
                            Ok(read && net.is_some_and(|n| n.acceptable(*port)))
                        }
                        Ok(_) => Ok(true),
                        Err(e) => Err(e),
                    };
                    (*userdata, *kind, ready)
                }
            };
            match ready {
                Ok(false) => {}
                Ok(true) => events.push(PollEvent {
                    userdata,
                    error: 0,
                    kind,
                    nbytes: 0,
                    flags: 0,
                }),
                Err(e) => events.push(PollEvent {
                    userdata,
                    error: e,
                    kind,
                    nbytes: 0,
                    flags: 0,
                }),
            }
        }
        if !events.is_empty() {
            return Ok(events);
        }
        let next = deadlines.iter().flatten().copied().min();
        if vm.snap.is_some() && crate::capture::due(vm, memory_len) {
            // The snapshot pauses the VM as a wait would (see [`Vm::net_wait_until`]).
            vm.tell_idle();
            vm.resume = Some(Resume::Poll(deadlines));
            return Err(Stop::Unwind);
        }
        vm.net_step(true, next, watch_stdin)?;
    }
}

/// The connection behind a socket descriptor.
fn socket(vm: &Vm, fd: u32) -> Result<(u64, bool), u16> {
    match vm.fds.get(fd)? {
        FdKind::Socket { conn, nonblocking } => Ok((*conn, *nonblocking)),
        FdKind::Listener { .. } => Err(errno::INVAL),
        _ => Err(errno::NOTSOCK),
    }
}

fn sock_accept(m: &mut Mem, vm: &mut Vm, fd: u32, flags: u16, out: u32) -> Ret {
    let (port, nonblocking) = match vm.fds.get(fd)? {
        FdKind::Listener { port, nonblocking } => (*port, *nonblocking),
        FdKind::Socket { .. } => return Err(errno::INVAL.into()),
        _ => return Err(errno::NOTSOCK.into()),
    };
    m.bytes(out, 4)?;
    let newfd = vm.fds.lowest_free()?;
    let conn = vm.sock_op(nonblocking, |n| n.acceptable(port), |n, _| n.accept(port))?;
    vm.fds.insert(
        newfd,
        FdKind::Socket {
            conn,
            nonblocking: flags & fdflags::NONBLOCK != 0,
        },
    );
    Ok(m.put_u32(out, newfd)?)
}

fn sock_read(vm: &mut Vm, fd: u32, len: usize, peek: bool) -> Result<Vec<u8>, Stop> {
    let (conn, nonblocking) = socket(vm, fd)?;
    // Sized to what the stack holds, not to the guest's buffer: no 64 KiB to zero per call.
    // (One byte when nothing is queued, so that "nothing yet" is not read as end of stream.)
    vm.sock_op(
        nonblocking,
        |n| n.readable(conn),
        |n, now| {
            let mut buf = vec![0u8; len.min(n.queued(conn).max(1))];
            let got = n.recv(conn, &mut buf, peek, now)?;
            buf.truncate(got);
            Ok(buf)
        },
    )
}

fn sock_write(vm: &mut Vm, fd: u32, data: &[u8]) -> Result<usize, Stop> {
    let (conn, nonblocking) = socket(vm, fd)?;
    vm.sock_op(
        nonblocking,
        |n| n.writable(conn),
        |n, now| n.send(conn, data, now),
    )
}

fn put_event(m: &mut Mem, at: u32, e: &PollEvent) -> Result<(), u16> {
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(&e.userdata.to_le_bytes());
    b[8..10].copy_from_slice(&e.error.to_le_bytes());
    b[10] = e.kind;
    b[16..24].copy_from_slice(&e.nbytes.to_le_bytes());
    b[24..26].copy_from_slice(&e.flags.to_le_bytes());
    m.put(at, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_accesses_are_checked() {
        let mut buf = vec![0u8; 16];
        let mut m = Mem(&mut buf);
        assert_eq!(m.u32(12).unwrap(), 0);
        assert_eq!(m.u32(13).unwrap_err(), errno::FAULT);
        assert_eq!(m.bytes(u32::MAX, 2).unwrap_err(), errno::FAULT);
        assert_eq!(m.put_u64(9, 1).unwrap_err(), errno::FAULT);
        assert!(m.iovecs(0, u32::MAX).is_err());
        assert_eq!(m.iovecs(0, MAX_IOVECS + 1).unwrap_err(), errno::INVAL);
    }

    #[test]
    fn a_gather_is_taken_in_bounded_parts_however_its_iovecs_overlap() {
        let mut buf = vec![7u8; 64 << 20];
        let m = Mem(&mut buf);
        // 256 iovecs over one 64 MiB buffer ask for 16 GiB.
        let iovs = vec![(0u32, 64u32 << 20); 256];
        assert_eq!(total_len(&iovs), super::MAX_RW);
        let part = m.gather_at(&iovs, 0, MAX_IO).unwrap();
        assert_eq!(part.len(), MAX_IO);
        // A part from deep inside the list: the bytes after `skip`, across iovecs.
        let small = [(0u32, 3u32), (8, 4)];
        let mut b = (0u8..16).collect::<Vec<_>>();
        let m = Mem(&mut b);
        assert_eq!(m.gather_at(&small, 2, 3).unwrap(), vec![2, 8, 9]);
        assert_eq!(m.gather_at(&small, 7, 10).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn scatter_at_skips_what_earlier_parts_filled() {
        let mut buf = vec![0u8; 16];
        let mut m = Mem(&mut buf);
        m.scatter_at(&[(0, 2), (8, 4)], 1, b"xyz").unwrap();
        assert_eq!(&buf[0..2], b"\0x");
        assert_eq!(&buf[8..10], b"yz");
    }

    #[test]
    fn contradictory_time_flags_are_invalid() {
        assert_eq!(
            check_fstflags(u32::from(fstflags::ATIM | fstflags::MTIM_NOW)),
            Ok(fstflags::ATIM | fstflags::MTIM_NOW)
        );
        assert_eq!(
            check_fstflags(u32::from(fstflags::ATIM | fstflags::ATIM_NOW)),
            Err(errno::INVAL)
        );
        assert_eq!(
            check_fstflags(u32::from(fstflags::MTIM | fstflags::MTIM_NOW)),
            Err(errno::INVAL)
        );
        assert_eq!(check_fstflags(16), Err(errno::INVAL));
    }

    #[test]
    fn scatter_fills_iovecs_in_order() {
        let mut buf = vec![0u8; 16];
        let mut m = Mem(&mut buf);
        m.scatter(&[(0, 2), (8, 4)], b"abcdef").unwrap();
        assert_eq!(&buf[0..2], b"ab");
        assert_eq!(&buf[8..12], b"cdef");
    }

    #[test]
    fn provides_only_preview1() {
        assert!(provides(MODULE, "fd_write"));
        assert!(!provides(MODULE, "fd_frobnicate"));
        assert!(!provides("env", "fd_write"));
    }
}
