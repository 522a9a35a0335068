//! The clock the guest sees: VM state that makes time monotonic for the VM's whole life.
//!
//! Both clocks the guest can read never go backwards: not when the host's wall clock is
//! stepped, not across a replay, and not when another host's copy goes live with a
//! different monotonic base (the live host re-bases itself on [`VmClock::last_monotonic`]).

use serde::{Deserialize, Serialize};

use crate::wasi::clockid;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmClock {
    pub last_realtime: u64,
    pub last_monotonic: u64,
}

impl VmClock {
    /// Take a raw reading of clock `id` into VM time: never below the last reading.
    pub fn observe(&mut self, id: u32, raw: u64) -> u64 {
        let last = if id == clockid::REALTIME {
            &mut self.last_realtime
        } else {
            &mut self.last_monotonic
        };
        *last = (*last).max(raw);
        *last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards() {
        let mut c = VmClock::default();
        assert_eq!(c.observe(clockid::REALTIME, 100), 100);
        assert_eq!(c.observe(clockid::REALTIME, 50), 100);
        assert_eq!(c.observe(clockid::MONOTONIC, 7), 7);
        assert_eq!(c.observe(clockid::MONOTONIC, 3), 7);
        assert_eq!(c.observe(clockid::REALTIME, 101), 101);
    }
}
