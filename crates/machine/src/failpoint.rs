//! Fault injection for tests: a process that dies at a chosen point, as a host that loses
//! power there would.
//!
//! `TANDEM_FAILPOINT=die-after-uncertain:K` SIGKILLs this process right after it performed
//! the K-th (from 1) disk operation that must not be done twice, before its event reaches
//! the log or the logging channel: the window the intent records of
//! [`crate::event::Intent`] exist for. Unset (always, outside tests), it costs one relaxed
//! load per disk operation.
//!
//! `TANDEM_FAILPOINT=die-before-write-behind:K` makes a primary SIGKILL itself instead of
//! performing the K-th (from 1) write whose outcome the guest was given before it was
//! performed ([`crate::port::OutputPort::write_behind`]), once the write's event reached
//! its secondary: the window in which a copy going live must write it again.
//!
//! `TANDEM_FAILPOINT=receiver-dies:POINT` SIGKILLs a migration's receiver at POINT
//! (`before-ready`: holding the whole offer; `after-commit`: committed, before saying live):
//! the windows [`crate::migrate`]'s handshake is built around.
//!
//! `TANDEM_FAILPOINT=no-userfaultfd` makes this process's kernel lack userfaultfd
//! (ENOSYS) for [`crate::dirty`]: snapshots fall back to copying memory in their pause.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

fn target() -> Option<u64> {
    static TARGET: OnceLock<Option<u64>> = OnceLock::new();
    *TARGET.get_or_init(|| {
        std::env::var("TANDEM_FAILPOINT")
            .ok()?
            .strip_prefix("die-after-uncertain:")?
            .parse()
            .ok()
    })
}

/// A disk operation of `kind` was just performed (`uncertain`: one that must not be done
/// twice).
pub(crate) fn after_disk_op(kind: crate::event::Kind, uncertain: bool) {
    static SEEN: AtomicU64 = AtomicU64::new(0);
    if !uncertain {
        return;
    }
    let Some(k) = target() else { return };
    if SEEN.fetch_add(1, Ordering::Relaxed) + 1 == k {
        die(&format!("after {kind:?}"));
    }
}

/// Whether the write about to be performed after its outcome was given is the one to die
/// at (see the module docs); counted here.
pub fn dies_before_write_behind() -> bool {
    static TARGET: OnceLock<Option<u64>> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        std::env::var("TANDEM_FAILPOINT")
            .ok()?
            .strip_prefix("die-before-write-behind:")?
            .parse()
            .ok()
    });
    target.is_some_and(|k| SEEN.fetch_add(1, Ordering::Relaxed) + 1 == k)
}

/// Die now, as a host losing power would.
pub fn die(why: &str) -> ! {
    tracing::error!("failpoint: dying {why}");
    // SAFETY: kill(2) on this very process; no memory is involved.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL is not caught")
}

/// A migration's receiver reached `point` (see the module docs).
pub(crate) fn receiver_at(point: &str) {
    let Ok(v) = std::env::var("TANDEM_FAILPOINT") else {
        return;
    };
    if v.strip_prefix("receiver-dies:") == Some(point) {
        die(&format!("(the receiver) {point}"));
    }
}

/// Whether userfaultfd is to fail as on a kernel without it (see the module docs).
pub(crate) fn no_userfaultfd() -> bool {
    static NO: OnceLock<bool> = OnceLock::new();
    *NO.get_or_init(|| std::env::var("TANDEM_FAILPOINT").is_ok_and(|v| v == "no-userfaultfd"))
}
