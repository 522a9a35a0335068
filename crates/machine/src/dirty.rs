//! Dirty-page tracking on the guest's linear memory, and the pre-copy built on it: a
//! snapshot of a running VM whose memory is copied while the guest runs, the VM stopping
//! only for the pages it wrote since the last look.
//!
//! **Tracking.** A [`Tracker`] registers a range of this process's memory (wasmtime's
//! mapping of the guest's linear memory) with a userfaultfd in asynchronous write-protect
//! mode (`UFFD_FEATURE_WP_ASYNC`: a write to a protected page is resolved by the kernel
//! itself, which only marks the page written; no thread ever handles a fault), and asks
//! `/proc/self/pagemap`'s `PAGEMAP_SCAN` for the pages written since the previous scan,
//! write-protecting them again in the same call. Soft-dirty bits would do the same, but
//! kernels are often built without them (this one is); userfaultfd WP-async is in every
//! kernel since 6.7. The kernel's headers on build machines are older than that, so the
//! few structures and numbers are defined here (from the kernel's UAPI,
//! `linux/userfaultfd.h` and `linux/fs.h`).
//!
//! **Pre-copy** ([`PreCopy`]): start tracking, copy the whole range while the guest runs,
//! then rounds of the pages written meanwhile (and of the memory grown meanwhile, once
//! [`PreCopy::grow`] tracks it) until few remain; then, with the guest stopped at its
//! snapshot point, [`PreCopy::finish`] copies only the pages written since the last
//! round's scan, plus anything past the range tracked (memory grown since the last grow).
//! The copies made while the guest runs race with its writes: they are made by the kernel
//! (`process_vm_readv` on this process), never by a Rust read of memory another thread
//! writes, and a page torn by a write during its copy was written after the scan that
//! listed it, so the next scan lists it again.
//!
//! Every write to the guest's memory goes through this process's page tables (the guest's
//! code, the host's copies into it, and the kernel's `copy_to_user` for a `read` into it):
//! nothing writes it by DMA (no `O_DIRECT` or io_uring buffers in guest memory), which
//! the tracking would not see.
//!
//! Invariant: the image [`PreCopy::finish`] returns is byte for byte the memory it is
//! given (the guest stopped): every page was copied after the last scan that found it
//! written, and a page written after that scan is found by the final one. When the
//! mapping moved or shrank (it never does with wasmtime's static reservation, but nothing
//! here assumes it), the image is a whole copy instead.

use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("userfaultfd: {0}")]
    Userfaultfd(std::io::Error),
    #[error("userfaultfd without asynchronous write-protect tracking: {0}")]
    Features(String),
    #[error("registering the memory for write-protect tracking: {0}")]
    Register(std::io::Error),
    #[error("/proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error("PAGEMAP_SCAN: {0}")]
    Scan(std::io::Error),
    #[error("reading the guest's memory: {0}")]
    Read(String),
    #[error("the range {0:#x}+{1:#x} is not page-aligned")]
    Unaligned(usize, usize),
}

// From the kernel's UAPI (linux/userfaultfd.h, linux/fs.h): see the module docs.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// How many written ranges one `PAGEMAP_SCAN` call returns at most (the scan goes on
/// from where a full buffer stopped it).
const REGIONS: usize = 4096;
/// How many ranges one `process_vm_readv` call copies (the kernel's `UIO_MAXIOV`).
const IOVECS: usize = 1024;

/// The host's page size: what the kernel tracks.
pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; no memory is involved.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Pages of a range of this process's memory written since the last scan.
pub struct Tracker {
    /// Closing it ends the tracking (the kernel unregisters the range).
    _uffd: OwnedFd,
    pagemap: File,
    base: usize,
    len: usize,
    regions: Vec<PageRegion>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tracker({:#x}+{:#x})", self.base, self.len)
    }
}

impl Tracker {
    /// Track writes to `[base, base + len)`, which must be mapped and page-aligned. The
    /// first [`Tracker::scan`] lists every page mapped, but may leave out a range no page
    /// table covers yet (never touched; a write there is listed by the next scan): a first
    /// copy is of the whole range, never of what the first scan lists.
    ///
    /// Registering never changes what the memory holds or how it may be used: with
    /// asynchronous write-protection a write to a protected page only costs a minor fault
    /// the kernel resolves itself. Whatever is mapped there is only tracked.
    pub fn new(base: usize, len: usize) -> Result<Tracker, DirtyError> {
        let page = page_size();
        if !base.is_multiple_of(page) || !len.is_multiple_of(page) || len == 0 {
            return Err(DirtyError::Unaligned(base, len));
        }
        if crate::failpoint::no_userfaultfd() {
            return Err(DirtyError::Userfaultfd(std::io::Error::from_raw_os_error(
                libc::ENOSYS,
            )));
        }
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: userfaultfd takes flags and returns a new descriptor or -1; no memory
        // is passed.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(DirtyError::Userfaultfd(std::io::Error::last_os_error()));
        }
        let fd = libc::c_int::try_from(fd)
            .map_err(|_| DirtyError::Features("a descriptor out of range".into()))?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
        let wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is
        // (same layout, repr(C)), alive for the call.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(DirtyError::Features(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        if api.features & wanted != wanted {
            return Err(DirtyError::Features(format!(
                "features {:#x}",
                api.features
            )));
        }
        let mut reg = UffdioRegister {
            start: base as u64,
            len: len as u64,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`, which
        // `reg` is, alive for the call. It changes no memory's contents or protection.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(DirtyError::Register(std::io::Error::last_os_error()));
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(DirtyError::Pagemap)?;
        Ok(Tracker {
            _uffd: uffd,
            pagemap,
            base,
            len,
            regions: vec![PageRegion::default(); REGIONS],
        })
    }

    /// Track the range up to `len` from the base too (the memory grew in place).
    pub fn grow(&mut self, len: usize) -> Result<(), DirtyError> {
        if len <= self.len {
            return Ok(());
        }
        if !len.is_multiple_of(page_size()) {
            return Err(DirtyError::Unaligned(self.base, len));
        }
        let mut reg = UffdioRegister {
            start: (self.base + self.len) as u64,
            len: (len - self.len) as u64,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: as in `Tracker::new`: `reg` is a `struct uffdio_register`, alive for
        // the call, which changes no memory's contents or protection.
        if unsafe { libc::ioctl(self._uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(DirtyError::Register(std::io::Error::last_os_error()));
        }
        self.len = len;
        Ok(())
    }

    /// Track the memory grown in place to `len` too while a pre-copy runs (at `base`:
    /// memory at another base moved, and is not); where the growth begins, if it grew. A
    /// growth the kernel refuses to track is left to the stop, which copies whatever lies
    /// past the range tracked.
    pub fn grow_at(&mut self, base: usize, len: usize) -> Option<usize> {
        if base != self.base || len <= self.len {
            return None;
        }
        let from = self.len;
        match self.grow(len) {
            Ok(()) => Some(from),
            Err(e) => {
                tracing::debug!(
                    "memory grown to {len} bytes, not tracked ({e}): copied at the stop"
                );
                None
            }
        }
    }

    /// A pre-copy round's scan: the pages written since the last scan, into `dirty`, cut
    /// where the memory grown since the last round begins (`grown_from`: the caller copies
    /// it whole after this scan, which protects what of it is mapped, so that a write after
    /// it is listed by the next; cut, nothing is copied twice). The bytes written again,
    /// which tell whether the rounds converge (growth is not counted).
    pub fn scan_round(
        &mut self,
        dirty: &mut Vec<Range<usize>>,
        grown_from: Option<usize>,
    ) -> Result<u64, DirtyError> {
        dirty.clear();
        self.scan(dirty)?;
        if let Some(from) = grown_from {
            dirty.retain_mut(|r| {
                r.end = r.end.min(from);
                r.start < r.end
            });
        }
        Ok(dirty.iter().map(|r| r.len() as u64).sum())
    }

    /// The length tracked.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address tracked.
    pub fn base(&self) -> usize {
        self.base
    }

    /// Append to `out` the ranges (offsets from the base, page-aligned, ascending) written
    /// since the previous scan, and write-protect them again: a page written after its
    /// part of this scan is listed by the next.
    pub fn scan(&mut self, out: &mut Vec<Range<usize>>) -> Result<(), DirtyError> {
        let end = (self.base + self.len) as u64;
        let mut from = self.base as u64;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: from,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` (a `struct pm_scan_arg`, alive for the
            // call), writes at most `vec_len` `struct page_region`s to `vec` (our buffer
            // of that many, repr(C)) and `walk_end` into `arg`. It changes page
            // protection only within [from, end), which this tracker registered.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(DirtyError::Scan(std::io::Error::last_os_error()));
            }
            let n = (n as usize).min(self.regions.len());
            for r in &self.regions[..n] {
                let (s, e) = (r.start.max(from), r.end.min(end));
                if s < e {
                    let range = (s - self.base as u64) as usize..(e - self.base as u64) as usize;
                    match out.last_mut() {
                        Some(last) if last.end == range.start => last.end = range.end,
                        _ => out.push(range),
                    }
                }
            }
            if arg.walk_end <= from || arg.walk_end > end {
                // Stopped where it started, or went past the end: a kernel we do not
                // understand. Never loop on it.
                return Err(DirtyError::Scan(std::io::Error::other(format!(
                    "the walk ended at {:#x} (from {from:#x} to {end:#x})",
                    arg.walk_end
                ))));
            }
            from = arg.walk_end;
        }
        Ok(())
    }
}

/// Copy `ranges` (offsets) of this process's memory at `base` into the same offsets of
/// `image`, by the kernel, while another thread may write them (see the module docs).
pub(crate) fn read_racing(
    base: usize,
    image: &mut [u8],
    ranges: &[Range<usize>],
) -> Result<(), DirtyError> {
    for chunk in ranges.chunks(IOVECS) {
        let mut local = Vec::with_capacity(chunk.len());
        let mut remote = Vec::with_capacity(chunk.len());
        let mut want = 0usize;
        for r in chunk {
            let dst = image
                .get_mut(r.clone())
                .ok_or_else(|| DirtyError::Read(format!("{r:?} is outside the image")))?;
            local.push(libc::iovec {
                iov_base: dst.as_mut_ptr().cast(),
                iov_len: dst.len(),
            });
            remote.push(libc::iovec {
                iov_base: (base + r.start) as *mut libc::c_void,
                iov_len: r.len(),
            });
            want += r.len();
        }
        // SAFETY: the kernel writes only into the `local` buffers, disjoint parts of
        // `image` we hold mutably, each of the length given. The `remote` addresses are
        // read by the kernel, not by Rust: an address that is not mapped (the VM ended
        // and its memory was unmapped) fails the call (EFAULT) rather than faulting us,
        // and a page another thread writes meanwhile is a torn copy the tracker lists
        // again, never a data race in this program.
        let got = unsafe {
            libc::process_vm_readv(
                libc::getpid(),
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if got < 0 {
            return Err(DirtyError::Read(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        if got as usize != want {
            return Err(DirtyError::Read(format!("{got} of {want} bytes")));
        }
    }
    Ok(())
}

/// What a pre-copy copied, and when.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreCopied {
    /// Rounds copied while the guest ran (the whole memory being the first).
    pub rounds: u32,
    /// Bytes copied while the guest ran.
    pub running_bytes: u64,
    /// Bytes copied with the guest stopped: the last pages written, and memory grown
    /// since the last round.
    pub stopped_bytes: u64,
    /// The mapping moved or shrank: the stop copied the whole memory.
    pub whole: bool,
    /// The memory's length at the stop.
    #[serde(default)]
    pub memory_bytes: u64,
}

/// A snapshot's memory being copied while the guest runs (see the module docs).
pub struct PreCopy {
    tracker: Tracker,
    image: Vec<u8>,
    dirty: Vec<Range<usize>>,
    /// Where the memory tracked began when [`PreCopy::grow`] last grew it: the next round
    /// copies from there to the end whole.
    grown_from: Option<usize>,
    stats: PreCopied,
}

impl std::fmt::Debug for PreCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreCopy({:?}, {:?})", self.tracker, self.stats)
    }
}

impl PreCopy {
    /// Track `[base, base + len)` and copy it whole while the guest runs.
    pub fn start(base: usize, len: usize) -> Result<PreCopy, DirtyError> {
        Self::start_with(Tracker::new(base, len)?)
    }

    /// Copy the range `tracker` tracks whole while the guest runs (a tracker kept from
    /// an earlier pre-copy: what it lists from before is copied anyway).
    pub fn start_with(mut tracker: Tracker) -> Result<PreCopy, DirtyError> {
        let (base, len) = (tracker.base(), tracker.len());
        // This scan protects every page: from here on, a write is listed.
        let mut dirty = Vec::new();
        tracker.scan(&mut dirty)?;
        dirty.clear();
        let mut image = vec![0u8; len];
        read_racing(base, &mut image, std::slice::from_ref(&(0..len)))?;
        Ok(PreCopy {
            tracker,
            image,
            dirty,
            grown_from: None,
            stats: PreCopied {
                rounds: 1,
                running_bytes: len as u64,
                ..PreCopied::default()
            },
        })
    }

    /// Track the memory grown in place to `len` too, while the guest runs: the next
    /// [`PreCopy::round`] copies the part grown whole after its scan (which protects what
    /// of it is mapped: a write after the scan is listed by the next), so the stop copies
    /// only what is written or grown after that, not every byte grown since the start (a
    /// guest filling its memory grows it by megabytes between snapshots). Nothing happens
    /// for a length not beyond the range tracked, nor for memory at another `base` (a
    /// mapping that moved: [`PreCopy::finish`] copies it whole; see [`Tracker::grow_at`]).
    pub fn grow(&mut self, base: usize, len: usize) {
        if let Some(from) = self.tracker.grow_at(base, len) {
            self.image.resize(self.tracker.len(), 0);
            self.grown_from.get_or_insert(from);
        }
    }

    /// Copy again the pages written since the previous scan, and the memory grown since,
    /// while the guest runs: the bytes written again (what tells whether the rounds
    /// converge; the memory grown counts in the stats only).
    pub fn round(&mut self) -> Result<u64, DirtyError> {
        let grown_from = self.grown_from.take();
        let rewritten = self.tracker.scan_round(&mut self.dirty, grown_from)?;
        if let Some(from) = grown_from {
            self.dirty.push(from..self.tracker.len());
        }
        read_racing(self.tracker.base(), &mut self.image, &self.dirty)?;
        let bytes: u64 = self.dirty.iter().map(|r| r.len() as u64).sum();
        self.stats.rounds += 1;
        self.stats.running_bytes += bytes;
        Ok(rewritten)
    }

    /// The whole memory, with the guest stopped: `memory` is the guest's memory now (the
    /// same mapping, perhaps grown). Only the pages written since the last scan, and any
    /// past the range tracked, are copied from it. Leaves the tracker to be dropped (which
    /// walks the range to unprotect it: better not done while the guest waits).
    pub fn finish(&mut self, memory: &[u8]) -> (Vec<u8>, PreCopied) {
        let (base, len) = (self.tracker.base(), self.tracker.len());
        let same = memory.as_ptr() as usize == base && memory.len() >= len;
        self.dirty.clear();
        let scanned = same && self.tracker.scan(&mut self.dirty).is_ok();
        let mut image = std::mem::take(&mut self.image);
        if !scanned {
            tracing::warn!(
                "the guest's memory moved or could not be scanned: copied whole at the stop"
            );
            self.stats.whole = true;
            self.stats.stopped_bytes = memory.len() as u64;
            self.stats.memory_bytes = memory.len() as u64;
            return (memory.to_vec(), self.stats.clone());
        }
        let mut bytes = 0u64;
        for r in &self.dirty {
            image[r.clone()].copy_from_slice(&memory[r.clone()]);
            bytes += r.len() as u64;
        }
        image.extend_from_slice(&memory[len..]);
        bytes += (memory.len() - len) as u64;
        self.stats.stopped_bytes = bytes;
        self.stats.memory_bytes = image.len() as u64;
        (image, self.stats.clone())
    }

    /// What was copied so far.
    pub fn stats(&self) -> &PreCopied {
        &self.stats
    }

    /// The tracker, for the next pre-copy of the same memory: keeping it saves
    /// registering again and, above all, the walk that ends the tracking (which holds the
    /// process's memory map, and so the guest's page faults, meanwhile).
    pub fn into_tracker(self) -> Tracker {
        self.tracker
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An anonymous private mapping of `pages` pages, unmapped when dropped.
    pub(crate) struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is plain memory; the tests synchronise their use of it.
    unsafe impl Send for Mapping {}
    unsafe impl Sync for Mapping {}

    impl Mapping {
        pub(crate) fn new(pages: usize) -> Mapping {
            let len = pages * page_size();
            // SAFETY: a fresh anonymous mapping; no existing memory is touched.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Mapping {
                ptr: ptr.cast(),
                len,
            }
        }

        pub(crate) fn base(&self) -> usize {
            self.ptr as usize
        }

        /// Write `value` at byte `at` (volatile: another thread may copy it meanwhile).
        pub(crate) fn write(&self, at: usize, value: u8) {
            assert!(at < self.len);
            // SAFETY: within the mapping, which lives as long as `self`.
            unsafe { self.ptr.add(at).write_volatile(value) }
        }

        /// The whole mapping; only while no thread writes it.
        pub(crate) fn bytes(&self) -> &[u8] {
            // SAFETY: mapped, initialised (zero-filled) memory of `len` bytes.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no longer used.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    pub(crate) fn tracker_or_skip(base: usize, len: usize) -> Option<Tracker> {
        match Tracker::new(base, len) {
            Ok(t) => Some(t),
            // A kernel without WP-async (before 6.7) or a sandbox without userfaultfd:
            // the pre-copy falls back to a whole copy there; nothing to test.
            Err(e @ (DirtyError::Userfaultfd(_) | DirtyError::Features(_))) => {
                eprintln!("SKIPPED: no dirty tracking here: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn writes_are_reported_exactly_and_rescans_are_clean() {
        let page = page_size();
        let m = Mapping::new(64);
        for p in 0..16 {
            m.write(p * page, 1);
        }
        let Some(mut t) = tracker_or_skip(m.base(), m.len) else {
            return;
        };
        let mut out = Vec::new();
        t.scan(&mut out).unwrap();
        assert_eq!(out, vec![0..m.len], "the first scan lists every page");
        out.clear();
        t.scan(&mut out).unwrap();
        assert_eq!(out, [], "nothing written since");
        // Touched and untouched pages alike, one byte each, two adjacent.
        for p in [2usize, 6, 7, 40, 63] {
            m.write(p * page + 123, 9);
        }
        t.scan(&mut out).unwrap();
        assert_eq!(
            out,
            [
                2 * page..3 * page,
                6 * page..8 * page,
                40 * page..41 * page,
                63 * page..64 * page
            ]
        );
        out.clear();
        t.scan(&mut out).unwrap();
        assert_eq!(out, [], "a rescan is clean");
        // More written ranges than one scan call returns: the scan goes on past a full
        // buffer (every other page of a larger mapping).
        let big = Mapping::new(2 * REGIONS + 10);
        let Some(mut t) = tracker_or_skip(big.base(), big.len) else {
            return;
        };
        t.scan(&mut out).unwrap();
        out.clear();
        let pages: Vec<usize> = (0..2 * REGIONS + 10).step_by(2).collect();
        for &p in &pages {
            big.write(p * page, 1);
        }
        t.scan(&mut out).unwrap();
        assert_eq!(
            out,
            pages
                .iter()
                .map(|p| p * page..(p + 1) * page)
                .collect::<Vec<_>>()
        );
        // Unaligned ranges are refused.
        assert!(matches!(
            Tracker::new(m.base() + 1, page),
            Err(DirtyError::Unaligned(..))
        ));
    }

    /// Memory grown while a pre-copy runs is copied by its rounds, not at the stop,
    /// whether the guest wrote it before the growth was tracked, after, or never (no page
    /// mapped there yet): the stop copies only the pages written after the last round, the
    /// image is still the memory byte for byte, and growth does not count as pages written
    /// again (it would end the rounds early).
    #[test]
    fn memory_grown_during_a_pre_copy_is_copied_while_it_runs() {
        let page = page_size();
        let (pages, grown) = (256, 1024);
        let m = Mapping::new(pages + grown);
        // The first half of the growth is written before it is tracked; the second half
        // (4 MiB, whole page tables) is never touched until the rounds run.
        for p in 0..pages + grown / 2 {
            m.write(p * page + 1, p as u8 | 1);
        }
        let Some(t) = tracker_or_skip(m.base(), pages * page) else {
            return;
        };
        let mut pc = PreCopy::start_with(t).unwrap();
        let running = pc.stats().running_bytes;
        pc.grow(m.base(), pages * page);
        pc.grow(m.base(), page);
        pc.grow(m.base() + page, (pages + 1) * page);
        assert_eq!(
            pc.tracker.len(),
            pages * page,
            "no shrinking, no change, nothing at another base"
        );
        pc.grow(m.base(), (pages + grown / 4) * page);
        pc.grow(m.base(), (pages + grown) * page);
        // Written after the growth was tracked, before the round: in the old range, in the
        // growth written before, in the part never touched.
        m.write(5 * page, 0x55);
        m.write((pages + 3) * page, 0x66);
        m.write((pages + grown - 7) * page + 9, 0x67);
        let rewritten = pc.round().unwrap();
        assert_eq!(
            rewritten, page as u64,
            "only the old range's page written again"
        );
        assert_eq!(
            pc.stats().running_bytes - running,
            ((grown + 1) * page) as u64,
            "the growth whole, once, and the page written again"
        );
        // After the round: a write into the growth, in a page never touched before, and
        // in one copied by the round.
        m.write((pages + grown - 100) * page, 0x77);
        m.write((pages + 3) * page + 1, 0x78);
        let (image, stats) = pc.finish(m.bytes());
        assert!(image == m.bytes(), "the image differs from the memory");
        assert_eq!(stats.stopped_bytes, 2 * page as u64, "{stats:?}");
        assert_eq!(stats.memory_bytes, ((pages + grown) * page) as u64);
    }

    /// A pre-copy of memory written all the time by another thread, finished once it
    /// stopped, is that memory byte for byte; memory past the range tracked (grown since
    /// the start) is copied at the stop.
    #[test]
    fn a_pre_copy_of_memory_written_meanwhile_is_exact_and_counts_growth() {
        let page = page_size();
        let pages = 2048;
        let m = std::sync::Arc::new(Mapping::new(pages + 16));
        for p in 0..pages {
            m.write(p * page, p as u8);
        }
        // Track only the first `pages`: the last 16 are "grown" later.
        let Some(_) = tracker_or_skip(m.base(), pages * page) else {
            return;
        };
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let started = std::sync::Arc::new(AtomicBool::new(false));
        let writer = {
            let (m, stop, started) = (m.clone(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Anywhere, the grown part included.
                    m.write((x as usize) % m.len, (x >> 56) as u8);
                    n += 1;
                    if n == 1000 {
                        started.store(true, Ordering::Relaxed);
                    }
                }
                n
            })
        };
        while !started.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        let mut pc = PreCopy::start(m.base(), pages * page).unwrap();
        for _ in 0..6 {
            pc.round().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        // The last pages the writer wrote, some perhaps torn by the copies racing it.
        pc.round().unwrap();
        // Written after the last round: only the stop copies these.
        for p in [3usize, 1000, 1001, 2047] {
            m.write(p * page + 7, 0xee);
        }
        // The guest is stopped: what the stop copies, and the image, are exact.
        let (image, stats) = pc.finish(m.bytes());
        assert!(image == m.bytes(), "the image differs from the memory");
        assert_eq!(stats.rounds, 8);
        assert!(!stats.whole);
        assert_eq!(
            stats.stopped_bytes,
            (4 + 16) * page as u64,
            "the pages written since the last round and those past the range: {stats:?}"
        );
        assert!(
            stats.running_bytes > (pages * page) as u64,
            "the rounds copied pages written while they ran: {stats:?}"
        );
        eprintln!("{writes} writes; {stats:?}");
        // The tracker kept for the next pre-copy, the memory grown meanwhile: it tracks
        // the grown part too from then on.
        let mut t = pc.into_tracker();
        t.grow(m.len).unwrap();
        let mut pc = PreCopy::start_with(t).unwrap();
        m.write(pages * page + 5, 0x11);
        m.write(7 * page, 0x22);
        let (image, stats) = pc.finish(m.bytes());
        assert!(image == m.bytes());
        assert_eq!(stats.stopped_bytes, 2 * page as u64, "{stats:?}");
        drop(pc);
        // A finish given another mapping copies it whole.
        let other = Mapping::new(pages);
        let mut pc = PreCopy::start(m.base(), pages * page).unwrap();
        let (image, stats) = pc.finish(other.bytes());
        assert!(stats.whole && image == other.bytes());
    }
}
