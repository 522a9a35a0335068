//! The lab's per-host views of shared storage, which the lab can break one host at a time.
//!
//! What this module owns:
//! - **The storage server** (`tandem lab storage-serve`, internal): one process per lab
//!   host, started in the host's network namespace. It opens the real shared folder
//!   `/tmp/NAME-shared` (as an `O_PATH` descriptor), makes itself a mount namespace of its
//!   own (a slave of the one it came from: nothing it mounts leaks out) and mounts over
//!   that same path a FUSE file system that passes every operation through to the real
//!   folder, relative to the descriptor. Every process of the host joins this server's
//!   network and mount namespaces ([`exec`], `tandem lab exec`), so it sees the shared
//!   folder at the path the cluster stores, through its host's server. The server is the
//!   holder of the host's mount namespace: the namespace (and the mount) is gone once the
//!   server and the processes that joined it are gone, so `lab down` leaves no mount.
//! - **The cut**: SIGUSR1 makes the server answer EIO to every operation (lookups, opens,
//!   reads, writes, fsync, ... on descriptors opened before the cut too), SIGUSR2 makes it
//!   pass through again. Descriptors opened before the cut work again after the heal: the
//!   server keeps their real descriptors open throughout. The server acknowledges each
//!   change in its state file `/tmp/NAME-hostK-storage` (`PID ok` or `PID cut`), which is
//!   also how `lab exec` finds it.
//!
//! Invariants:
//! - Several hosts' servers over one real folder stay coherent: attribute and entry
//!   timeouts are 0 (every path walk asks the server, so another host's rename or unlink
//!   is seen at once), and every file is opened with `FOPEN_DIRECT_IO` (no page cache:
//!   a read sees another host's write at once, and a cut reaches reads of open files).
//! - Exclusive creation stays atomic across hosts: `create` passes the caller's flags,
//!   `O_EXCL` included, to `openat` on the real folder, so exactly one of several hosts'
//!   racing creators wins, as on a local file system.
//! - A node is an `O_PATH` descriptor of the real file, never a path: a rename by another
//!   host does not make the server look at the wrong file.
//! - Nothing a caller sends panics the server or reaches past the shared folder: names
//!   with NUL or `/`, `.` and `..` are refused, sizes are bounded, unknown handles and
//!   nodes answer EBADF / ESTALE.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use crate::lab;

/// No caching of attributes or names: another host's change must be seen at once.
const TTL: Duration = Duration::ZERO;
/// The most one read answers (the kernel asks for at most its max_read anyway).
const MAX_READ: u32 = 1 << 20;
/// The most entries one directory listing holds (a bound on the server's memory).
const MAX_DIR_ENTRIES: usize = 1 << 20;
/// How long `lab up`/`revive`/`cut`/`heal` wait for a server to acknowledge.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// `/tmp/NAME-hostK-storage`: host K's storage server's pid and state (`PID ok|cut`).
pub fn state_file(name: &str, k: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-host{k}-storage"))
}

/// `/tmp/NAME-storage-paths`: present while lab NAME gives its hosts storage views.
pub fn marker(name: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/{name}-storage-paths"))
}

/// Whether lab `name` was made with per-host storage views.
pub fn enabled(name: &str) -> bool {
    marker(name).is_file()
}

/// What the state file says: the server's pid and whether it is cut, if the server
/// named there still runs.
fn server(name: &str, k: u32) -> Option<(i32, bool)> {
    let text = std::fs::read_to_string(state_file(name, k)).ok()?;
    let mut words = text.split_whitespace();
    let pid: i32 = words.next()?.parse().ok()?;
    let cut = words.next()? == "cut";
    is_server(pid).then_some((pid, cut))
}

/// Whether `pid` is a running storage server (a stale pid may name anything else).
fn is_server(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"storage-serve"))
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            // A zombie (state Z) serves nothing.
            .is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
}

/// The pid of host K's storage server, if it runs.
pub fn server_pid(name: &str, k: u32) -> Option<i32> {
    server(name, k).map(|(pid, _)| pid)
}

/// Start host K's storage server (detached, in the host's network namespace) and wait
/// until its view is mounted.
pub fn start(name: &str, k: u32) -> Result<()> {
    let _ = std::fs::remove_file(state_file(name, k));
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let log = PathBuf::from(format!("/tmp/{name}-host{k}-storage.log"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut child = std::process::Command::new("setsid")
        .args(["ip", "netns", "exec", &lab::host_ns(name, k)])
        .arg(exe)
        .args(["lab", "storage-serve", "--name", name, &format!("host{k}")])
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting a storage server")?;
    let deadline = Instant::now() + ACK_WAIT;
    while server(name, k).is_none() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "host{k}'s storage server exited at start ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        if Instant::now() > deadline {
            bail!("host{k}'s storage server did not mount within {ACK_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

/// Cut (`true`) or heal host K's storage, waiting for the server's acknowledgement.
pub fn set_cut(name: &str, k: u32, cut: bool) -> Result<()> {
    if !enabled(name) {
        bail!(
            "lab {name} has no per-host storage views (made with --plain-storage): its storage cannot be cut"
        );
    }
    let Some((pid, _)) = server(name, k) else {
        bail!("host{k}'s storage server is not running (host killed? `tandem lab revive` it)");
    };
    let sig = if cut { libc::SIGUSR1 } else { libc::SIGUSR2 };
    // SAFETY: kill(2) with a pid checked to be the storage server; no memory involved.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!(
            "signalling host{k}'s storage server: {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + ACK_WAIT;
    loop {
        match server(name, k) {
            Some((_, now)) if now == cut => return Ok(()),
            Some(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Some(_) => bail!("host{k}'s storage server did not acknowledge within {ACK_WAIT:?}"),
            None => bail!("host{k}'s storage server exited"),
        }
    }
}

/// `tandem lab exec`: replace this process by `cmd` run on host K: in the host's network
/// namespace and, in a lab with storage views, in its storage server's mount namespace.
/// Returns only on failure.
pub fn exec(name: &str, k: u32, cmd: &[OsString]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = cmd.split_first() else {
        bail!("lab exec: no command given");
    };
    if !enabled(name) {
        // No views: the host is its network namespace alone.
        let e = std::process::Command::new("ip")
            .args(["netns", "exec", &lab::host_ns(name, k)])
            .arg(program)
            .args(args)
            .exec();
        bail!("running ip netns exec: {e}");
    }
    let Some(pid) = server_pid(name, k) else {
        bail!("host{k}'s storage server is not running (host killed? `tandem lab revive` it)");
    };
    let cwd = std::env::current_dir().ok();
    for (ns, flag) in [("net", libc::CLONE_NEWNET), ("mnt", libc::CLONE_NEWNS)] {
        let f = std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .with_context(|| format!("opening host{k}'s {ns} namespace"))?;
        // SAFETY: setns(2) on a namespace descriptor we own; this process runs one thread
        // (the CLI starts none before dispatching), as joining a mount namespace requires.
        if unsafe { libc::setns(f.as_raw_fd(), flag) } != 0 {
            bail!(
                "joining host{k}'s {ns} namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // Joining a mount namespace moves the working directory to its root: go back to
    // where the caller was (relative paths in `cmd` mean what the caller meant).
    if let Some(cwd) = cwd {
        let _ = std::env::set_current_dir(cwd);
    }
    let e = std::process::Command::new(program).args(args).exec();
    bail!("running {}: {e}", program.to_string_lossy())
}

/// `tandem lab storage-serve`: host K's storage server (see the module docs). Runs until
/// SIGTERM or SIGINT, or until its view is unmounted.
pub fn serve(name: &str, k: u32) -> Result<()> {
    let shared = lab::shared_dir(name);
    // Every signal the server takes is taken by one thread, synchronously: blocked here,
    // before any thread exists, so every thread inherits the mask.
    let set = signal_set();
    // SAFETY: pthread_sigmask with a set initialised by `signal_set`.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let root = open_path(&shared).with_context(|| format!("opening {}", shared.display()))?;
    // SAFETY: unshare(2) with no memory involved; one thread only (required for
    // CLONE_NEWNS), as none has been started yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        bail!(
            "a mount namespace of its own: {}",
            std::io::Error::last_os_error()
        );
    }
    // Mounts made here stay here (slave: the host still sees what the machine mounts).
    let slash = c"/";
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        bail!(
            "making the mount namespace a slave: {}",
            std::io::Error::last_os_error()
        );
    }
    raise_fd_limit();
    favour_server();
    let cut = Arc::new(AtomicBool::new(false));
    let fs = Passthrough::new(root, cut.clone())?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("{name}-host{k}")),
        fuser::MountOption::Subtype("tandem-lab".into()),
    ];
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session = fuser::Session::new(fs, &shared, &config)
        .with_context(|| format!("mounting the view over {}", shared.display()))?;
    let state = state_file(name, k);
    write_state(&state, false)?;
    std::thread::Builder::new()
        .name("storage-signals".into())
        .spawn(move || take_signals(set, &cut, &state))
        .context("starting the signal thread")?;
    session.run().context("serving the view")?;
    Ok(())
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// The server's signal thread: cut, heal (each acknowledged in the state file) or stop.
fn take_signals(set: libc::sigset_t, cut: &AtomicBool, state: &Path) {
    loop {
        let mut sig = 0;
        // SAFETY: sigwait with an initialised set (blocked in every thread) and an out int.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        match sig {
            libc::SIGUSR1 | libc::SIGUSR2 => {
                let now = sig == libc::SIGUSR1;
                cut.store(now, Ordering::SeqCst);
                if let Err(e) = write_state(state, now) {
                    eprintln!("storage server: {e:#}");
                }
            }
            _ => {
                let _ = std::fs::remove_file(state);
                // The mount goes with the namespace once its last process is gone.
                std::process::exit(0);
            }
        }
    }
}

fn write_state(state: &Path, cut: bool) -> Result<()> {
    let tmp = state.with_extension("tmp");
    let text = format!(
        "{} {}\n",
        std::process::id(),
        if cut { "cut" } else { "ok" }
    );
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, state))
        .with_context(|| format!("writing {}", state.display()))
}

/// The server stands for a filer, another machine: the lab host's CPU load must not slow
/// it down, or a busy host takes its storage for lost when it only waits for a CPU (a
/// soak with every core busy saw "no answer within 1000 ms" and a handover). It runs
/// favoured (nice -10), as its threads, started after this, inherit; it only ever waits
/// for requests, so it takes no CPU from anyone when idle.
fn favour_server() {
    // SAFETY: setpriority(2) on this thread (who 0); no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } != 0 {
        eprintln!(
            "tandem: storage server at the usual priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a fully initialised struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn open_path(p: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    // SAFETY: open(2) with a NUL-terminated path that outlives the call.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by open(2), owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The errno of the last failed call, as FUSE answers it.
fn last() -> Errno {
    Errno::from(std::io::Error::last_os_error())
}

/// A descriptor returned by a syscall (negative: the errno).
fn owned(fd: RawFd) -> Result<OwnedFd, Errno> {
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_int) -> Result<(), Errno> {
    if r < 0 { Err(last()) } else { Ok(()) }
}

/// One name in a directory, as the kernel sends it. Never `..`, `.` or a path: the server
/// resolves names relative to the real folder's descriptors, and such a name would reach
/// beyond the node it was asked of (out of the shared folder, from its root).
fn cname(name: &OsStr) -> Result<CString, Errno> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    CString::new(b).map_err(|_| Errno::EINVAL)
}

/// `/proc/self/fd/N`: the file an `O_PATH` descriptor stands for, to calls that take a
/// path (they follow this link to the file itself, wherever it has been renamed to).
fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

fn stat_fd(fd: RawFd) -> Result<libc::stat, Errno> {
    // SAFETY: a zeroed stat is a valid out parameter for fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat on a descriptor we hold, an empty NUL-terminated path, an out struct.
    check(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let nsec = nsec.clamp(0, 999_999_999) as u32;
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        }
    }
}

/// A file the kernel knows by number: the real file's `O_PATH` descriptor and how many
/// lookups the kernel has not forgotten yet.
struct Node {
    fd: Arc<OwnedFd>,
    key: (u64, u64),
    lookups: u64,
}

#[derive(Default)]
struct Nodes {
    by_ino: HashMap<u64, Node>,
    /// (st_dev, st_ino) of the real file → the number the kernel knows it by.
    by_key: HashMap<(u64, u64), u64>,
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

/// The pass-through file system of one host's view (see the module docs).
pub struct Passthrough {
    cut: Arc<AtomicBool>,
    root: Arc<OwnedFd>,
    nodes: Mutex<Nodes>,
    next_ino: AtomicU64,
    files: Mutex<HashMap<u64, Arc<OwnedFd>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
}

/// Answer EIO while the view is cut.
macro_rules! unless_cut {
    ($self:ident, $reply:ident) => {
        if $self.cut.load(Ordering::SeqCst) {
            $reply.error(Errno::EIO);
            return;
        }
    };
}

/// Reply with the value, or the errno.
macro_rules! answer {
    ($reply:ident, $r:expr, |$v:ident| $ok:expr) => {
        match $r {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

impl Passthrough {
    fn new(root: OwnedFd, cut: Arc<AtomicBool>) -> Result<Self> {
        let st = stat_fd(root.as_raw_fd())
            .map_err(|e| anyhow::anyhow!("stat of the shared folder: errno {}", e.code()))?;
        let root = Arc::new(root);
        let mut nodes = Nodes::default();
        let key = (st.st_dev, st.st_ino);
        nodes.by_key.insert(key, INodeNo::ROOT.0);
        nodes.by_ino.insert(
            INodeNo::ROOT.0,
            Node {
                fd: root.clone(),
                key,
                lookups: 1,
            },
        );
        Ok(Passthrough {
            cut,
            root,
            nodes: Mutex::new(nodes),
            next_ino: AtomicU64::new(1 << 63),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<OwnedFd>, Errno> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .by_ino
            .get(&ino.0)
            .map(|n| n.fd.clone())
            .ok_or(Errno::ESTALE)
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OwnedFd>, Errno> {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// The kernel learns of (or looks up again) the file `fd` stands for: its number
    /// and attributes, one lookup counted.
    fn remember(&self, fd: OwnedFd) -> Result<(u64, FileAttr), Errno> {
        let st = stat_fd(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&ino) = nodes.by_key.get(&key)
            && let Some(n) = nodes.by_ino.get_mut(&ino)
        {
            n.lookups += 1;
            return Ok((ino, attr(ino, &st)));
        }
        // The kernel's node number is also the inode number `stat` shows: the real one,
        // so that every host's view shows a file by the same number (the datastore finds
        // a file again by it when a copy goes live). Only a clash (another file system
        // below the folder, or the number the root must have) takes a number of our own.
        let mut ino = st.st_ino;
        if ino == INodeNo::ROOT.0 || nodes.by_ino.contains_key(&ino) {
            ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
        }
        nodes.by_key.insert(key, ino);
        nodes.by_ino.insert(
            ino,
            Node {
                fd: Arc::new(fd),
                key,
                lookups: 1,
            },
        );
        Ok((ino, attr(ino, &st)))
    }

    fn lookup_at(&self, parent: INodeNo, name: &OsStr) -> Result<(u64, FileAttr), Errno> {
        let p = self.node(parent)?;
        let c = cname(name)?;
        // SAFETY: openat on a descriptor we hold with a NUL-terminated name.
        let fd = owned(unsafe {
            libc::openat(
                p.as_raw_fd(),
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        self.remember(fd)
    }

    fn getattr_of(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let fd = self.node(ino)?;
        Ok(attr(ino.0, &stat_fd(fd.as_raw_fd())?))
    }

    fn read_dir(&self, ino: INodeNo) -> Result<Vec<DirEntry>, Errno> {
        use std::os::unix::fs::DirEntryExt;
        let fd = self.node(ino)?;
        let path = proc_path(fd.as_raw_fd());
        let dir = std::fs::read_dir(OsStr::from_bytes(path.as_bytes()))?;
        let mut out = vec![
            DirEntry {
                ino: ino.0,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: ino.0,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for e in dir {
            let e = e?;
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(Errno::from_i32(libc::EOVERFLOW));
            }
            let kind = e
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            out.push(DirEntry {
                ino: e.ino().max(1),
                kind,
                name: e.file_name(),
            });
        }
        Ok(out)
    }
}

impl Filesystem for Passthrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_READ);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        unless_cut!(self, reply);
        answer!(reply, self.lookup_at(parent, name), |v| reply.entry(
            &TTL,
            &v.1,
            Generation(0)
        ));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino == INodeNo::ROOT {
            return;
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let gone = match nodes.by_ino.get_mut(&ino.0) {
            Some(n) => {
                n.lookups = n.lookups.saturating_sub(nlookup);
                (n.lookups == 0).then_some(n.key)
            }
            None => None,
        };
        if let Some(key) = gone {
            nodes.by_ino.remove(&ino.0);
            if nodes.by_key.get(&key) == Some(&ino.0) {
                nodes.by_key.remove(&key);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        unless_cut!(self, reply);
        answer!(reply, self.getattr_of(ino), |a| reply.attr(&TTL, &a));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        unless_cut!(self, reply);
        let r = (|| -> Result<FileAttr, Errno> {
            let fd = self.node(ino)?;
            let path = proc_path(fd.as_raw_fd());
            let is_link = kind(stat_fd(fd.as_raw_fd())?.st_mode) == FileType::Symlink;
            if let Some(mode) = mode {
                if is_link {
                    return Err(Errno::from_i32(libc::EOPNOTSUPP));
                }
                // SAFETY: chmod on a NUL-terminated path that outlives the call.
                check(unsafe { libc::chmod(path.as_ptr(), mode & 0o7777) })?;
            }
            if uid.is_some() || gid.is_some() {
                // SAFETY: fchownat on a descriptor we hold, an empty path; -1 keeps an id.
                check(unsafe {
                    libc::fchownat(
                        fd.as_raw_fd(),
                        c"".as_ptr(),
                        uid.unwrap_or(u32::MAX),
                        gid.unwrap_or(u32::MAX),
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            }
            if let Some(size) = size {
                let size = i64::try_from(size).map_err(|_| Errno::EFBIG)?;
                match fh.map(|fh| self.file(fh)) {
                    // SAFETY: ftruncate on an open descriptor we hold.
                    Some(Ok(f)) => check(unsafe { libc::ftruncate(f.as_raw_fd(), size) })?,
                    // SAFETY: truncate on a NUL-terminated path that outlives the call.
                    _ => check(unsafe { libc::truncate(path.as_ptr(), size) })?,
                }
            }
            if (atime.is_some() || mtime.is_some()) && !is_link {
                let times = [timespec(atime), timespec(mtime)];
                // SAFETY: utimensat with a NUL-terminated path and two initialised times.
                check(unsafe {
                    libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0)
                })?;
            }
            self.getattr_of(ino)
        })();
        answer!(reply, r, |a| reply.attr(&TTL, &a));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        unless_cut!(self, reply);
        let r = (|| -> Result<Vec<u8>, Errno> {
            let fd = self.node(ino)?;
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: readlinkat on a descriptor we hold, an empty path, a buffer of its size.
            let n = unsafe {
                libc::readlinkat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(last());
            }
            buf.truncate(n as usize);
            Ok(buf)
        })();
        answer!(reply, r, |d| reply.data(&d));
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let p = self.node(parent)?;
            let c = cname(name)?;
            // SAFETY: mknodat on a descriptor we hold with a NUL-terminated name.
            check(unsafe {
                libc::mknodat(
                    p.as_raw_fd(),
                    c.as_ptr(),
                    mode & !umask,
                    rdev as libc::dev_t,
                )
            })?;
            self.lookup_at(parent, name)
        })();
        answer!(reply, r, |v| reply.entry(&TTL, &v.1, Generation(0)));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let p = self.node(parent)?;
            let c = cname(name)?;
            // SAFETY: mkdirat on a descriptor we hold with a NUL-terminated name.
            check(unsafe { libc::mkdirat(p.as_raw_fd(), c.as_ptr(), mode & !umask & 0o7777) })?;
            self.lookup_at(parent, name)
        })();
        answer!(reply, r, |v| reply.entry(&TTL, &v.1, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        unless_cut!(self, reply);
        let r = (|| {
            let p = self.node(parent)?;
            let c = cname(name)?;
            // SAFETY: unlinkat on a descriptor we hold with a NUL-terminated name.
            check(unsafe { libc::unlinkat(p.as_raw_fd(), c.as_ptr(), 0) })
        })();
        answer!(reply, r, |_v| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        unless_cut!(self, reply);
        let r = (|| {
            let p = self.node(parent)?;
            let c = cname(name)?;
            // SAFETY: unlinkat on a descriptor we hold with a NUL-terminated name.
            check(unsafe { libc::unlinkat(p.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
        })();
        answer!(reply, r, |_v| reply.ok());
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let p = self.node(parent)?;
            let c = cname(link_name)?;
            // A link's target is any path (the kernel resolves it for the reader).
            let t = CString::new(target.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
            // SAFETY: symlinkat with NUL-terminated strings and a descriptor we hold.
            check(unsafe { libc::symlinkat(t.as_ptr(), p.as_raw_fd(), c.as_ptr()) })?;
            self.lookup_at(parent, link_name)
        })();
        answer!(reply, r, |v| reply.entry(&TTL, &v.1, Generation(0)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let (p, np) = (self.node(parent)?, self.node(newparent)?);
            let (c, nc) = (cname(name)?, cname(newname)?);
            // SAFETY: renameat2 on descriptors we hold with NUL-terminated names.
            check(unsafe {
                libc::renameat2(
                    p.as_raw_fd(),
                    c.as_ptr(),
                    np.as_raw_fd(),
                    nc.as_ptr(),
                    flags.bits(),
                )
            })
        })();
        answer!(reply, r, |_v| reply.ok());
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let (fd, np) = (self.node(ino)?, self.node(newparent)?);
            let nc = cname(newname)?;
            let path = proc_path(fd.as_raw_fd());
            // SAFETY: linkat with NUL-terminated paths and a descriptor we hold; following
            // the /proc link names the file itself.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    np.as_raw_fd(),
                    nc.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })?;
            self.lookup_at(newparent, newname)
        })();
        answer!(reply, r, |v| reply.entry(&TTL, &v.1, Generation(0)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        unless_cut!(self, reply);
        let r = (|| {
            let fd = self.node(ino)?;
            let path = proc_path(fd.as_raw_fd());
            // O_NOFOLLOW was the kernel's to apply (to the name, already resolved): here it
            // would refuse the /proc link itself.
            let flags = (flags.0
                & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW))
                | libc::O_CLOEXEC;
            // SAFETY: open(2) with a NUL-terminated path that outlives the call.
            let f = owned(unsafe { libc::open(path.as_ptr(), flags) })?;
            let fh = self.new_fh();
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fh, Arc::new(f));
            Ok(fh)
        })();
        answer!(reply, r, |fh| reply
            .opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO));
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let f = self.file(fh)?;
            let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let mut buf = vec![0u8; size.min(MAX_READ) as usize];
            // SAFETY: pread into a buffer of the length given.
            let n = unsafe { libc::pread(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
            if n < 0 {
                return Err(last());
            }
            buf.truncate(n as usize);
            Ok(buf)
        })();
        answer!(reply, r, |d| reply.data(&d));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let f = self.file(fh)?;
            let mut off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let mut done = 0usize;
            while done < data.len() {
                let rest = &data[done..];
                // SAFETY: pwrite from a slice of the length given.
                let n =
                    unsafe { libc::pwrite(f.as_raw_fd(), rest.as_ptr().cast(), rest.len(), off) };
                if n < 0 {
                    if done > 0 {
                        break;
                    }
                    return Err(last());
                }
                if n == 0 {
                    break;
                }
                done += n as usize;
                off += n as i64;
            }
            Ok(done as u32)
        })();
        answer!(reply, r, |n| reply.written(n));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // A close while cut fails as a close on a lost path would.
        unless_cut!(self, reply);
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Always: the kernel has let go of the handle, so must the server (cut or not).
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        unless_cut!(self, reply);
        let r = self.file(fh).and_then(|f| {
            // SAFETY: fsync/fdatasync on an open descriptor we hold.
            check(unsafe {
                if datasync {
                    libc::fdatasync(f.as_raw_fd())
                } else {
                    libc::fsync(f.as_raw_fd())
                }
            })
        });
        answer!(reply, r, |_v| reply.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        unless_cut!(self, reply);
        let r = self.read_dir(ino).map(|entries| {
            let fh = self.new_fh();
            self.dirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fh, Arc::new(entries));
            fh
        });
        answer!(reply, r, |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        unless_cut!(self, reply);
        // A listing read from its start again (rewinddir) is read afresh.
        if offset == 0
            && let Ok(entries) = self.read_dir(ino)
        {
            self.dirs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fh.0, Arc::new(entries));
        }
        let entries = self
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned();
        let Some(entries) = entries else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(start) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let fd = self.node(ino)?;
            let path = proc_path(fd.as_raw_fd());
            // SAFETY: open(2) with a NUL-terminated path that outlives the call.
            let d = owned(unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            })?;
            // SAFETY: fsync on a descriptor we own.
            check(unsafe { libc::fsync(d.as_raw_fd()) })
        })();
        answer!(reply, r, |_v| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        unless_cut!(self, reply);
        // SAFETY: a zeroed statvfs is a valid out parameter.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatvfs on a descriptor we hold with an out struct.
        let r = check(unsafe { libc::fstatvfs(self.root.as_raw_fd(), &mut st) });
        answer!(reply, r, |_v| reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        ));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let p = self.node(parent)?;
            let c = cname(name)?;
            // The caller's flags as given: O_EXCL makes the real folder arbitrate.
            let flags = (flags & !libc::O_NOCTTY) | libc::O_CREAT | libc::O_CLOEXEC;
            // SAFETY: openat on a descriptor we hold with a NUL-terminated name.
            let f = owned(unsafe {
                libc::openat(p.as_raw_fd(), c.as_ptr(), flags, mode & !umask & 0o7777)
            })?;
            // The node from the open file itself: no window for another host's rename.
            let path = proc_path(f.as_raw_fd());
            // SAFETY: open(2) with a NUL-terminated path that outlives the call.
            let node = owned(unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
            let (_ino, a) = self.remember(node)?;
            let fh = self.new_fh();
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fh, Arc::new(f));
            Ok((a, fh))
        })();
        answer!(reply, r, |v| reply.created(
            &TTL,
            &v.0,
            Generation(0),
            FileHandle(v.1),
            FopenFlags::FOPEN_DIRECT_IO
        ));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        unless_cut!(self, reply);
        let r = (|| {
            let f = self.file(fh)?;
            let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
            let len = i64::try_from(length).map_err(|_| Errno::EINVAL)?;
            // SAFETY: fallocate on an open descriptor we hold.
            check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) })
        })();
        answer!(reply, r, |_v| reply.ok());
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        unless_cut!(self, reply);
        let r = self.file(fh).and_then(|f| {
            // SAFETY: lseek on an open descriptor we hold (SEEK_DATA/SEEK_HOLE are why).
            let n = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
            if n < 0 { Err(last()) } else { Ok(n) }
        });
        answer!(reply, r, |n| reply.offset(n));
    }
}
