//! Fencing a copy by its host's lease: the copy's process itself stops when its agent no
//! longer vouches for the lease (DESIGN.md, "Fencing").
//!
//! The agent hands each copy the read end of a pipe. Over it, it keeps sending a deadline:
//! an absolute `CLOCK_MONOTONIC` time (8 bytes, little-endian nanoseconds) until which the
//! host's lease is surely held, counted from when the last successful renewal was *sent*
//! plus the lease's TTL less one second. The copy exits at once (`_exit`, no clean stop: a clean stop
//! would end the VM on its secondary too) when the deadline passes without a newer one, or
//! when the pipe closes (the agent died). So whatever happens to the agent (killed,
//! stopped, cut off from the store, stuck), no copy outlives the host's lease, and the
//! master starts a VM elsewhere only after that lease expired.
//!
//! Invariant: a deadline is never later than the renewal's send time plus the TTL less a
//! second, and the store keeps the lease for the whole TTL after it received the renewal.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The file descriptor a copy finds its fence on.
pub const FENCE_FD: i32 = 3;

/// Now, on the clock every process of this machine shares.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`, a valid timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The agent's end of one copy's fence.
pub struct FenceWriter(std::fs::File);

/// A new fence: the agent keeps the writer, the copy gets the reader as [`FENCE_FD`].
pub fn pipe() -> std::io::Result<(FenceWriter, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, an array of two we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Above the standard descriptors and the fence's own number: the child's stdio and
    // the dup2 to FENCE_FD must not land on it.
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own to a new one we then own.
    let high = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if high < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `high` was just created by fcntl and is owned by nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(high) };
    // A stuck copy must never block the agent: a full pipe drops the deadline instead.
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(w.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(w.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    Ok((FenceWriter(std::fs::File::from(w)), r))
}

impl FenceWriter {
    /// Vouch for the lease until `deadline_ns` (monotonic).
    pub fn send(&mut self, deadline_ns: u64) {
        let _ = self.0.write(&deadline_ns.to_le_bytes());
    }
}

/// The exit code of a fenced copy.
pub const FENCED_EXIT: i32 = 75;

/// In the copy: watch the fence on `fd`; on a missed deadline or a closed pipe, exit at
/// once with [`FENCED_EXIT`] (nothing is written first: a blocked stderr must not keep a
/// fenced copy alive; the agent says why from the exit code).
pub fn watch(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::other(format!(
            "--fence-fd {fd}: not an open file descriptor"
        )));
    }
    // SAFETY: the descriptor is open (checked) and handed to this process for this use
    // alone; nothing else in the process uses it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    std::thread::Builder::new()
        .name("fence".into())
        .spawn(move || {
            let _why = follow(file);
            // SAFETY: _exit ends the process without running anything else; that is the
            // point: no clean stop, no end sent to a secondary.
            unsafe { libc::_exit(FENCED_EXIT) };
        })?;
    Ok(())
}

/// Read deadlines until one passes or the pipe closes; say which.
fn follow(mut file: std::fs::File) -> String {
    // Until the first deadline arrives, the agent vouches for a short while only (it
    // sends one before starting the copy, so this is a bound, not the rule).
    let mut deadline = monotonic_ns() + Duration::from_secs(1).as_nanos() as u64;
    let mut buf = [0u8; 512];
    let mut have = 0;
    loop {
        let now = monotonic_ns();
        if now >= deadline {
            return "the host agent no longer vouches for this host's lease".into();
        }
        let wait_ms = ((deadline - now) / 1_000_000).clamp(1, 1000) as i32;
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, with a bounded timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        if n <= 0 {
            continue;
        }
        match file.read(&mut buf[have..]) {
            Ok(0) => return "the host agent is gone".into(),
            Ok(k) => {
                have += k;
                // Every whole deadline read counts, the newest most: after a stop (no
                // CPU for a while) old ones are still queued and must not end a copy
                // whose lease is held.
                let whole = have / 8 * 8;
                for d in buf[..whole].chunks_exact(8) {
                    let d = u64::from_le_bytes(d.try_into().expect("8 bytes"));
                    deadline = deadline.max(d);
                }
                buf.copy_within(whole..have, 0);
                have -= whole;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return format!("reading the fence: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_keep_the_copy_and_a_missed_one_or_a_closed_pipe_end_it() {
        let (mut w, r) = pipe().unwrap();
        let file = std::fs::File::from(r);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(follow(file)).unwrap());
        // Kept alive for a second by deadlines 800 ms ahead, every 100 ms.
        for _ in 0..10 {
            w.send(monotonic_ns() + 800_000_000);
            std::thread::sleep(Duration::from_millis(100));
            assert!(rx.try_recv().is_err(), "ended while vouched for");
        }
        // Then silence: it ends within the last deadline.
        let why = rx.recv_timeout(Duration::from_secs(3)).unwrap();
        assert!(why.contains("no longer vouches"), "{why}");

        let (w, r) = pipe().unwrap();
        let file = std::fs::File::from(r);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(follow(file)).unwrap());
        drop(w);
        let why = rx.recv_timeout(Duration::from_secs(1)).unwrap();
        assert!(why.contains("gone"), "{why}");
    }
}
