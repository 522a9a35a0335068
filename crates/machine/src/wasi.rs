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

use wasmtime::{Caller, Extern, Linker};

use crate::event::{Filestat, Kind, Outcome, PollEvent, args_digest};
use crate::fdtable::FdKind;
use crate::host::Subscription;
use crate::vm::{Fault, Vm};

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
    pub const PERM: u16 = 63;
    pub const PIPE: u16 = 64;
    pub const ROFS: u16 = 69;
    pub const SPIPE: u16 = 70;
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
    pub const NONBLOCK: u16 = 4;
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

mod rights {
    pub const FD_READ: u64 = 1 << 1;
    pub const FD_SEEK: u64 = 1 << 2;
    pub const FD_TELL: u64 = 1 << 5;
    pub const FD_WRITE: u64 = 1 << 6;
    pub const ALL: u64 = (1 << 29) - 1;
}

/// The largest read served in one call; a shorter read is always allowed.
const MAX_IO: usize = 16 << 20;

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
    fn iovecs(&self, ptr: u32, n: u32) -> Result<Vec<(u32, u32)>, u16> {
        let mut out = Vec::with_capacity(n.min(1024) as usize);
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
    fn gather(&self, iovs: &[(u32, u32)]) -> Result<Vec<u8>, u16> {
        let mut out = Vec::new();
        for &(p, l) in iovs {
            out.extend_from_slice(self.bytes(p, l)?);
        }
        Ok(out)
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

fn total_len(iovs: &[(u32, u32)]) -> usize {
    iovs.iter()
        .map(|&(_, l)| l as usize)
        .sum::<usize>()
        .min(MAX_IO)
}

fn call(
    caller: &mut Caller<'_, Vm>,
    f: impl FnOnce(&mut Mem, &mut Vm) -> Ret,
) -> wasmtime::Result<i32> {
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return Ok(i32::from(errno::FAULT));
    };
    let (data, vm) = memory.data_and_store_mut(caller);
    match f(&mut Mem(data), vm) {
        Ok(()) => Ok(0),
        Err(Stop::Errno(e)) => Ok(i32::from(e)),
        Err(Stop::Fault(fault)) => Err(wasmtime::Error::new(fault)),
    }
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
                let r = call(&mut caller, |$m, $vm| $body);
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
        if id > clockid::THREAD_CPUTIME {
            return Err(errno::INVAL.into());
        }
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
        vm.fds.get(fd)?;
        Ok(())
    });
    wasi!(l, "fd_allocate", |_m, vm, fd: u32, off: u64, len: u64| {
        fd_allocate(vm, fd, off, len)
    });
    wasi!(l, "fd_close", |_m, vm, fd: u32| {
        if let FdKind::Socket { conn, .. } = vm.fds.remove(fd)? {
            let now = vm.net_now;
            vm.net_mut()?.close(conn, now);
            vm.flush_net();
        }
        if let Some(h) = vm.host() {
            h.close(fd);
        }
        Ok(())
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
            FdKind::File {
                append,
                append_at,
                offset,
                ..
            } => {
                if !*append {
                    *append_at = *offset;
                }
                *append = flags as u16 & fdflags::APPEND != 0
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
        |_m, vm, fd: u32, _b: u64, _i: u64| {
            vm.fds.get(fd)?;
            Ok(())
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
            set_times(vm, Kind::FdFilestatSetTimes, &path, a, mt, f as u16)
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
        vm.fds.get(to)?;
        let kind = vm.fds.remove(from)?;
        vm.fds.insert(to, kind);
        if let Some(h) = vm.host() {
            h.renumber(from, to);
        }
        Ok(())
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
            let path = vm.fds.resolve(fd, m.str(p, pl)?)?;
            path_op(vm, Kind::PathCreateDirectory, "mkdir", &path, |h| {
                h.mkdir(&path)
            })
        }
    );
    wasi!(
        l,
        "path_remove_directory",
        |m, vm, fd: u32, p: u32, pl: u32| {
            let path = vm.fds.resolve(fd, m.str(p, pl)?)?;
            path_op(vm, Kind::PathRemoveDirectory, "rmdir", &path, |h| {
                h.rmdir(&path)
            })
        }
    );
    wasi!(l, "path_unlink_file", |m, vm, fd: u32, p: u32, pl: u32| {
        let path = vm.fds.resolve(fd, m.str(p, pl)?)?;
        path_op(vm, Kind::PathUnlinkFile, "unlink", &path, |h| {
            h.unlink(&path)
        })
    });
    wasi!(l, "path_rename", |m,
                             vm,
                             fd: u32,
                             p: u32,
                             pl: u32,
                             fd2: u32,
                             q: u32,
                             ql: u32| {
        let from = vm.fds.resolve(fd, m.str(p, pl)?)?;
        let to = vm.fds.resolve(fd2, m.str(q, ql)?)?;
        let both = format!("{from}\0{to}");
        path_op(vm, Kind::PathRename, "rename", &both, |h| {
            h.rename(&from, &to)
        })
    });
    wasi!(
        l,
        "path_filestat_get",
        |m, vm, fd: u32, flags: u32, p: u32, pl: u32, out: u32| {
            let path = vm.fds.resolve(fd, m.str(p, pl)?)?;
            let follow = flags & 1 != 0;
            let args = args_digest(&[path.as_bytes(), &[follow as u8]]);
            let st = expect!(vm, Kind::PathFilestatGet,
            vm.event(Kind::PathFilestatGet, args, |h, _, _| h.stat(&path, follow))?,
            Outcome::Stat(s) => s);
            Ok(put_filestat(m, out, &st)?)
        }
    );
    wasi!(
        l,
        "path_filestat_set_times",
        |m, vm, fd: u32, _fl: u32, p: u32, pl: u32, a: u64, mt: u64, f: u32| {
            let path = vm.fds.resolve(fd, m.str(p, pl)?)?;
            set_times(vm, Kind::PathFilestatSetTimes, &path, a, mt, f as u16)
        }
    );
    wasi!(
        l,
        "path_readlink",
        |m, vm, fd: u32, p: u32, pl: u32, buf: u32, len: u32, out: u32| {
            let path = vm.fds.resolve(fd, m.str(p, pl)?)?;
            let args = args_digest(&[path.as_bytes()]);
            let target = expect!(vm, Kind::PathReadlink,
            vm.event(Kind::PathReadlink, args, |h, _, _| h.readlink(&path))?,
            Outcome::Data(d) => d);
            let n = target.len().min(len as usize);
            m.put(buf, &target[..n])?;
            Ok(m.put_u32(out, n as u32)?)
        }
    );
    wasi!(l, "path_open", |m,
                           vm,
                           fd: u32,
                           _df: u32,
                           p: u32,
                           pl: u32,
                           of: u32,
                           rb: u64,
                           _ri: u64,
                           ff: u32,
                           out: u32| {
        path_open(m, vm, fd, p, pl, of as u16, rb, ff as u16, out)
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
    wasi!(l, "path_link", |_m,
                           vm,
                           _a: u32,
                           _b: u32,
                           _c: u32,
                           _d: u32,
                           _e: u32,
                           _f: u32,
                           _g: u32| {
        unsupported(vm, "path_link")
    });
    wasi!(l, "path_symlink", |_m,
                              vm,
                              _a: u32,
                              _b: u32,
                              _c: u32,
                              _d: u32,
                              _e: u32| {
        unsupported(vm, "path_symlink")
    });
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
        let data = m.gather(&iovs)?;
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

fn clock_time_get(m: &mut Mem, vm: &mut Vm, id: u32, out: u32) -> Ret {
    if id > clockid::THREAD_CPUTIME {
        return Err(errno::INVAL.into());
    }
    m.bytes(out, 8)?;
    let raw = expect!(vm, Kind::ClockTimeGet,
        vm.event(Kind::ClockTimeGet, u64::from(id), |h, _, _| h.now(id))?,
        Outcome::Value(t) => t);
    let t = vm.clock.observe(id, raw);
    Ok(m.put_u64(out, t)?)
}

fn random_get(m: &mut Mem, vm: &mut Vm, buf: u32, len: u32) -> Ret {
    m.bytes(buf, len)?;
    let data = expect!(vm, Kind::RandomGet,
        vm.event(Kind::RandomGet, u64::from(len), |h, _, _| h.random(len as usize))?,
        Outcome::Data(d) if d.len() == len as usize => d);
    Ok(m.put(buf, &data)?)
}

/// The path of an open file, or the errno for a descriptor that is not one.
fn file_path(vm: &Vm, fd: u32) -> Result<String, u16> {
    match vm.fds.get(fd)? {
        FdKind::File { path, .. } => Ok(path.clone()),
        FdKind::Dir { .. } => Err(errno::ISDIR),
        _ => Err(errno::SPIPE),
    }
}

fn fd_allocate(vm: &mut Vm, fd: u32, off: u64, len: u64) -> Ret {
    let path = file_path(vm, fd)?;
    let args = args_digest(&[&le(u64::from(fd)), &le(off), &le(len)]);
    expect!(vm, Kind::FdAllocate,
        vm.event(Kind::FdAllocate, args, |h, _, _| h.allocate(fd, off, len))?,
        Outcome::Done => ());
    vm.outputs
        .add("allocate", &[path.as_bytes(), &le(off), &le(len)]);
    Ok(())
}

fn fd_sync(vm: &mut Vm, fd: u32) -> Ret {
    let kind = vm.fds.get(fd)?.clone();
    if !matches!(kind, FdKind::File { .. } | FdKind::Dir { .. }) {
        return Err(errno::INVAL.into());
    }
    expect!(vm, Kind::FdSync,
        vm.event(Kind::FdSync, u64::from(fd), |h, _, _| h.sync(fd, &kind))?,
        Outcome::Done => ());
    Ok(())
}

fn fd_fdstat_get(m: &mut Mem, vm: &mut Vm, fd: u32, out: u32) -> Ret {
    let kind = vm.fds.get(fd)?;
    let (flags, rights) = match kind {
        FdKind::File { append, .. } => (if *append { fdflags::APPEND } else { 0 }, rights::ALL),
        FdKind::Dir { .. } => (0, rights::ALL),
        FdKind::Socket { nonblocking, .. } | FdKind::Listener { nonblocking, .. } => (
            if *nonblocking { fdflags::NONBLOCK } else { 0 },
            rights::ALL & !(rights::FD_SEEK | rights::FD_TELL),
        ),
        // Console descriptors are not seekable, which is how libc tells a terminal.
        _ => (0, rights::ALL & !(rights::FD_SEEK | rights::FD_TELL)),
    };
    let mut b = [0u8; 24];
    b[0] = kind.filetype();
    b[2..4].copy_from_slice(&flags.to_le_bytes());
    b[8..16].copy_from_slice(&rights.to_le_bytes());
    b[16..24].copy_from_slice(&rights::ALL.to_le_bytes());
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
    let st = match kind {
        FdKind::File { .. } | FdKind::Dir { .. } => expect!(vm, Kind::FdFilestatGet,
            vm.event(Kind::FdFilestatGet, u64::from(fd), |h, _, _| h.fstat(fd, &kind))?,
            Outcome::Stat(s) => s),
        _ => Filestat {
            filetype: kind.filetype(),
            nlink: 1,
            ..Filestat::default()
        },
    };
    Ok(put_filestat(m, out, &st)?)
}

fn fd_set_size(vm: &mut Vm, fd: u32, size: u64) -> Ret {
    let path = file_path(vm, fd)?;
    let args = args_digest(&[&le(u64::from(fd)), &le(size)]);
    expect!(vm, Kind::FdFilestatSetSize,
        vm.event(Kind::FdFilestatSetSize, args, |h, _, _| h.set_size(fd, size))?,
        Outcome::Done => ());
    vm.outputs.add("truncate", &[path.as_bytes(), &le(size)]);
    Ok(())
}

fn set_times(vm: &mut Vm, kind: Kind, path: &str, a: u64, mt: u64, f: u16) -> Ret {
    let args = args_digest(&[path.as_bytes(), &le(a), &le(mt), &le(u64::from(f))]);
    expect!(vm, kind,
        vm.event(kind, args, |h, _, _| h.set_times(path, a, mt, f))?,
        Outcome::Done => ());
    vm.outputs.add(
        "times",
        &[path.as_bytes(), &le(a), &le(mt), &le(u64::from(f))],
    );
    Ok(())
}

/// A directory operation on `path`: an event, and on success an output.
fn path_op(
    vm: &mut Vm,
    kind: Kind,
    what: &str,
    path: &str,
    op: impl FnOnce(&mut crate::host::LiveHost) -> Outcome,
) -> Ret {
    let args = args_digest(&[what.as_bytes(), path.as_bytes()]);
    expect!(vm, kind, vm.event(kind, args, |h, _, _| op(h))?, Outcome::Done => ());
    vm.outputs.add(what, &[path.as_bytes()]);
    Ok(())
}

fn fd_read(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    let len = total_len(&iovs);
    m.bytes(out, 4)?;
    let (offset, stdin) = match vm.fds.get(fd)? {
        FdKind::Socket { .. } => {
            let data = sock_read(vm, fd, len, false)?;
            m.scatter(&iovs, &data)?;
            return Ok(m.put_u32(out, data.len() as u32)?);
        }
        FdKind::Listener { .. } => return Err(errno::INVAL.into()),
        FdKind::Stdin => (0, true),
        FdKind::File {
            offset, read: true, ..
        } => (*offset, false),
        FdKind::File { .. } | FdKind::Stdout | FdKind::Stderr => return Err(errno::BADF.into()),
        FdKind::Dir { .. } => return Err(errno::ISDIR.into()),
    };
    let args = args_digest(&[&le(u64::from(fd)), &le(len as u64)]);
    let data = expect!(vm, Kind::FdRead,
        vm.event(Kind::FdRead, args, |h, _, _| if stdin { h.read_stdin(len) } else { h.read_at(fd, offset, len) })?,
        Outcome::Data(d) if d.len() <= len => d);
    if let Ok(FdKind::File { offset, .. }) = vm.fds.get_mut(fd) {
        *offset += data.len() as u64;
    }
    m.scatter(&iovs, &data)?;
    Ok(m.put_u32(out, data.len() as u32)?)
}

fn fd_pread(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, off: u64, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    let len = total_len(&iovs);
    m.bytes(out, 4)?;
    file_path(vm, fd)?;
    let args = args_digest(&[&le(u64::from(fd)), &le(off), &le(len as u64)]);
    let data = expect!(vm, Kind::FdPread,
        vm.event(Kind::FdPread, args, |h, _, _| h.read_at(fd, off, len))?,
        Outcome::Data(d) if d.len() <= len => d);
    m.scatter(&iovs, &data)?;
    Ok(m.put_u32(out, data.len() as u32)?)
}

fn fd_write(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    m.bytes(out, 4)?;
    let data = m.gather(&iovs)?;
    let (path, at) = match vm.fds.get(fd)? {
        FdKind::Stdout | FdKind::Stderr => {
            // Console output is an output, not an input: it always succeeds in full.
            vm.outputs.add("console", &[&le(u64::from(fd)), &data]);
            if let crate::vm::Inputs::Live { port, .. } = &mut vm.inputs {
                port.console(vm.seq, fd, &data);
            }
            return Ok(m.put_u32(out, data.len() as u32)?);
        }
        // Appends are positional too, at the end the VM knows of: a copy going live that
        // writes again what its predecessor may already have written writes the same
        // bytes in the same place, never twice.
        FdKind::File {
            path,
            offset,
            write: true,
            append,
            append_at,
            ..
        } => (path.clone(), if *append { *append_at } else { *offset }),
        FdKind::Dir { .. } => return Err(errno::ISDIR.into()),
        _ => return Err(errno::BADF.into()),
    };
    // The data itself is an output: the next event's output digest checks it.
    let args = args_digest(&[&le(u64::from(fd)), &le(data.len() as u64)]);
    let (written, end) = expect!(vm, Kind::FdWrite,
        vm.event(Kind::FdWrite, args, |h, _, _| h.write_at(fd, at, &data))?,
        Outcome::Written { n, offset } if n as usize <= data.len() => (n, offset));
    if let Ok(FdKind::File {
        offset,
        append,
        append_at,
        ..
    }) = vm.fds.get_mut(fd)
    {
        *offset = end;
        if *append {
            *append_at = end;
        }
    }
    let start = end.saturating_sub(u64::from(written));
    vm.outputs.add(
        "write",
        &[path.as_bytes(), &le(start), &data[..written as usize]],
    );
    Ok(m.put_u32(out, written)?)
}

fn fd_pwrite(m: &mut Mem, vm: &mut Vm, fd: u32, iovs: u32, n: u32, off: u64, out: u32) -> Ret {
    let iovs = m.iovecs(iovs, n)?;
    m.bytes(out, 4)?;
    let data = m.gather(&iovs)?;
    let path = match vm.fds.get(fd)? {
        FdKind::File {
            path, write: true, ..
        } => path.clone(),
        FdKind::Dir { .. } => return Err(errno::ISDIR.into()),
        FdKind::File { .. } => return Err(errno::BADF.into()),
        _ => return Err(errno::SPIPE.into()),
    };
    let args = args_digest(&[&le(u64::from(fd)), &le(off), &le(data.len() as u64)]);
    let written = expect!(vm, Kind::FdPwrite,
        vm.event(Kind::FdPwrite, args, |h, _, _| h.write_at(fd, off, &data))?,
        Outcome::Written { n, .. } if n as usize <= data.len() => n);
    vm.outputs.add(
        "write",
        &[path.as_bytes(), &le(off), &data[..written as usize]],
    );
    Ok(m.put_u32(out, written)?)
}

fn fd_seek(m: &mut Mem, vm: &mut Vm, fd: u32, delta: i64, whence: u32, out: u32) -> Ret {
    m.bytes(out, 8)?;
    let cur = match vm.fds.get(fd)? {
        FdKind::File { offset, .. } => *offset,
        FdKind::Dir { .. } => return Err(errno::ISDIR.into()),
        _ => return Err(errno::SPIPE.into()),
    };
    let base = match whence {
        0 => 0,
        1 => cur,
        2 => expect!(vm, Kind::FdSeekEnd,
            vm.event(Kind::FdSeekEnd, u64::from(fd), |h, _, _| h.file_size(fd))?,
            Outcome::Value(v) => v),
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
    let path = vm.fds.dir_path(fd)?.to_string();
    let args = args_digest(&[path.as_bytes(), &le(cookie), &le(u64::from(len))]);
    let data = expect!(vm, Kind::FdReaddir,
        vm.event(Kind::FdReaddir, args, |h, _, _| h.readdir(&path, cookie, len as usize))?,
        Outcome::Data(d) if d.len() <= len as usize => d);
    m.put(buf, &data)?;
    Ok(m.put_u32(out, data.len() as u32)?)
}

#[allow(clippy::too_many_arguments)]
fn path_open(
    m: &mut Mem,
    vm: &mut Vm,
    dirfd: u32,
    p: u32,
    pl: u32,
    of: u16,
    rights_base: u64,
    ff: u16,
    out: u32,
) -> Ret {
    let path = vm.fds.resolve(dirfd, m.str(p, pl)?)?;
    m.bytes(out, 4)?;
    let read = rights_base & rights::FD_READ != 0;
    let write = rights_base & rights::FD_WRITE != 0 || ff & fdflags::APPEND != 0;
    let append = ff & fdflags::APPEND != 0;
    let fd = vm.fds.lowest_free()?;
    let args = args_digest(&[
        path.as_bytes(),
        &le(u64::from(of)),
        &[read as u8, write as u8, append as u8],
        &le(u64::from(fd)),
    ]);
    let (ft, size) = expect!(vm, Kind::PathOpen,
        vm.event(Kind::PathOpen, args, |h, _, _| h.open(fd, &path, of, read, write))?,
        Outcome::Opened { filetype, size } => (filetype, size));
    if of & (oflags::CREAT | oflags::TRUNC) != 0 {
        vm.outputs
            .add("open", &[path.as_bytes(), &le(u64::from(of))]);
    }
    let kind = if ft == filetype::DIRECTORY {
        FdKind::Dir {
            path,
            preopen: None,
        }
    } else {
        FdKind::File {
            path,
            offset: 0,
            read: read || !write,
            write,
            append,
            append_at: size,
        }
    };
    vm.fds.insert(fd, kind);
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
    if n == 0 {
        return Err(errno::INVAL.into());
    }
    let raw = m
        .bytes(subs, n.checked_mul(48).ok_or(errno::FAULT)?)?
        .to_vec();
    m.bytes(events, n * 32)?;
    m.bytes(out, 4)?;
    let mut parsed = Vec::with_capacity(n as usize);
    for s in raw.chunks_exact(48) {
        let u64_at = |i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap_or([0; 4]));
        let userdata = u64_at(0);
        parsed.push(match s[8] {
            eventtype::CLOCK => Sub::Clock {
                userdata,
                id: u32_at(16),
                timeout: u64_at(24),
                abs: u16::from_le_bytes([s[40], s[41]]) & 1 != 0,
            },
            kind @ (eventtype::FD_READ | eventtype::FD_WRITE) => Sub::Fd {
                userdata,
                kind,
                fd: u32_at(16),
            },
            _ => return Err(errno::INVAL.into()),
        });
    }
    let polled = if vm.net.is_some() {
        poll_with_network(vm, &parsed)?
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
fn poll_with_network(vm: &mut Vm, parsed: &[Sub]) -> Result<Vec<PollEvent>, Stop> {
    let watch_stdin = parsed.iter().any(|s| {
        matches!(s, Sub::Fd { kind: eventtype::FD_READ, fd, .. } if matches!(vm.fds.get(*fd), Ok(FdKind::Stdin)))
    });
    vm.net_step(false, None, watch_stdin)?;
    let start = vm.net_now;
    let deadlines: Vec<Option<u64>> = parsed
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
        .collect();
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
        let next = deadlines
            .iter()
            .flatten()
            .copied()
            .chain(vm.net.as_ref().and_then(|n| n.next_deadline()))
            .min();
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
