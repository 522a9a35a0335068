//! A notice a signal handler can give and a thread can wait for without waking up
//! periodically to look (an FT copy's idle threads cost a context switch each time they
//! look, which on a paravirtualised host is tens of microseconds: a thread looking every
//! 20 ms for a signal that comes once in a VM's life cost more than the VM idling).
//!
//! The network wait of a VM is woken the same way (`host::wake_waits`), its notice's
//! descriptor polled beside the tap ([`Notice::fd`]).
//!
//! A [`Notice`] is a pipe: [`Notice::give`] writes a byte to it (async-signal-safe: one
//! `write(2)` to a non-blocking pipe, `errno` kept), [`Notice::wait`] polls its read end.
//! The pipe is made by [`Notice::arm`], which a waiter calls before it first looks at the
//! state the notice is about: what was given before the pipe existed is in that state, and
//! anything given after it is in the pipe. A notice that cannot be armed (no file
//! descriptors left) still works, by waiting a short while and looking again.
//!
//! Invariant: the read end is never drained by [`Notice::wait`] unless asked (`drain`), so
//! a notice for a state that never goes back (a stop) wakes every waiter, then and later.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// How long a waiter sleeps between looks when its notice has no pipe.
const UNARMED_LOOK: Duration = Duration::from_millis(20);

pub struct Notice {
    read: AtomicI32,
    write: AtomicI32,
}

impl Drop for Notice {
    fn drop(&mut self) {
        for fd in [
            self.read.load(Ordering::SeqCst),
            self.write.load(Ordering::SeqCst),
        ] {
            if fd >= 0 {
                // SAFETY: the notice owns its descriptors, and nothing can give or wait on
                // it any more.
                unsafe { libc::close(fd) };
            }
        }
    }
}

impl Default for Notice {
    fn default() -> Self {
        Self::new()
    }
}

impl Notice {
    pub const fn new() -> Notice {
        Notice {
            read: AtomicI32::new(-1),
            write: AtomicI32::new(-1),
        }
    }

    /// Make the pipe, once (concurrent callers agree on one). Whether the notice has one;
    /// once it returns `true`, [`Notice::fd`] is the read end (a network wait polls it from
    /// its first wait on).
    pub fn arm(&self) -> bool {
        if self.read.load(Ordering::SeqCst) >= 0 {
            return true;
        }
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given, which has room
        // for two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return false;
        }
        // The write end first: from then on what is given is in the pipe, even before a
        // waiter can see the read end (until it can, it waits as if unarmed, briefly).
        if self
            .write
            .compare_exchange(-1, fds[1], Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // Another thread armed it first: this pipe is nobody's. That thread publishes its
            // read end right after its write end: a few instructions to wait for.
            // SAFETY: both descriptors were just made here and are not shared.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            while self.read.load(Ordering::SeqCst) < 0 {
                std::thread::yield_now();
            }
            return true;
        }
        self.read.store(fds[0], Ordering::SeqCst);
        true
    }

    /// The read end, for a wait on it beside other descriptors (a network wait); readable
    /// while what was given is not drained. `None` before [`Notice::arm`] succeeded.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        let fd = self.read.load(Ordering::SeqCst);
        (fd >= 0).then_some(fd)
    }

    /// Wake the waiters (async-signal-safe: no allocation, no lock, one system call, and
    /// the interrupted code's `errno` is put back). Before [`Notice::arm`] it does nothing:
    /// the caller changes the state it tells of first, and a waiter arms before it looks.
    pub fn give(&self) {
        let fd = self.write.load(Ordering::SeqCst);
        if fd < 0 {
            return;
        }
        // SAFETY: __errno_location returns the calling thread's errno, valid for the
        // thread's life.
        let errno = unsafe { *libc::__errno_location() };
        let byte = 1u8;
        // SAFETY: writes one byte from a live local to a descriptor this notice owns and
        // never closes; the pipe is non-blocking, so a full pipe (the waiters woken
        // already) returns at once.
        let _ = unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }

    /// Wait until the notice is given (or was, and is not drained), at most `limit` (`None`:
    /// no limit). With `drain`, what was given is taken, so the next wait waits for the next
    /// notice. Whether it was given; without a pipe, after a short sleep, `false`: the
    /// caller looks at its state again either way.
    pub fn wait(&self, drain: bool, limit: Option<Duration>) -> bool {
        let fd = self.read.load(Ordering::SeqCst);
        if fd < 0 {
            std::thread::sleep(limit.map_or(UNARMED_LOOK, |l| l.min(UNARMED_LOOK)));
            return false;
        }
        // Rounded up: a limit under a millisecond still waits, and zero only looks.
        let timeout = limit.map_or(-1, |l| {
            l.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if n <= 0 {
            return false;
        }
        if drain {
            let mut buf = [0u8; 64];
            // SAFETY: reads into a live local buffer of the length given; the read end is
            // non-blocking, so the loop ends once the pipe is empty.
            while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_notice_wakes_its_waiter_and_a_drained_one_waits_for_the_next() {
        let n: &'static Notice = Box::leak(Box::new(Notice::new()));
        // Given before it is armed: nothing to wait for in the pipe (the state tells).
        n.give();
        assert!(n.arm());
        assert!(!n.wait(true, Some(Duration::from_millis(10))));
        let t = std::thread::spawn(move || {
            let start = Instant::now();
            let given = n.wait(true, Some(Duration::from_secs(10)));
            (given, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        n.give();
        let (given, took) = t.join().unwrap();
        assert!(given);
        assert!(took < Duration::from_secs(5), "woken after {took:?}");
        // Drained: the next wait times out (and a zero limit only drains).
        assert!(!n.wait(true, Some(Duration::from_millis(10))));
        n.give();
        assert!(n.wait(true, Some(Duration::ZERO)));
        assert!(!n.wait(true, Some(Duration::ZERO)));
        assert!(n.fd().is_some());
        // Not drained: every wait after a notice returns at once.
        n.give();
        assert!(n.wait(false, Some(Duration::from_secs(10))));
        assert!(n.wait(false, Some(Duration::from_secs(10))));
    }

    #[test]
    fn giving_keeps_errno_even_when_the_pipe_is_full() {
        let n = Notice::new();
        assert!(n.arm());
        // Fill the pipe: the next write fails (EAGAIN), which sets errno.
        let fd = n.write.load(Ordering::SeqCst);
        let chunk = [0u8; 4096];
        // SAFETY: writes from a live local buffer to the notice's own non-blocking pipe.
        while unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) } > 0 {}
        // SAFETY: the calling thread's errno.
        unsafe { *libc::__errno_location() = libc::EINTR };
        n.give();
        // SAFETY: as above.
        assert_eq!(unsafe { *libc::__errno_location() }, libc::EINTR);
        // And the waiters are woken all the same.
        assert!(n.wait(false, Some(Duration::from_secs(5))));
    }
}
