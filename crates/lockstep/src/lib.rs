//! vLockstep: a primary and a secondary executing one VM in lockstep.
//!
//! The primary runs the VM live. Every event it takes is appended to its history and
//! streamed over the logging channel ([`wire`]) to the secondary, which replays it. The
//! secondary acknowledges what it holds and reports what it executed. Outputs follow the
//! output rule ([`primary::GatedPort`]): a frame or console write produced after N events
//! leaves only once the secondary holds those N events, and a disk mutation is performed
//! only then. Both sides send heartbeats; silence past the timeout is a suspected failure,
//! settled by arbitration on shared storage ([`arbiter`]): exactly one copy stays live.
//! A secondary that wins goes live where the primary left off.
//!
//! Invariants (from the design; tests in `tests/ft.rs` exercise each):
//! 1. no output leaves the primary's host before the secondary holds the events it depends on;
//! 2. the secondary performs no output while replaying;
//! 3. at most one copy is live: a copy goes live only after winning arbitration;
//! 4. a damaged or forged frame closes the channel and never reaches the replica.

pub mod arbiter;
pub mod primary;
pub mod secondary;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use machine::event::Event;
use machine::{End, LogHeader};
use serde::{Deserialize, Serialize};

/// Timing of the protocol.
#[derive(Clone, Debug)]
pub struct FtConfig {
    pub heartbeat: Duration,
    /// Silence for this long is a suspected failure.
    pub timeout: Duration,
    /// The primary is slowed when the secondary trails by more events than this.
    pub max_lag_events: u64,
}

impl Default for FtConfig {
    fn default() -> Self {
        FtConfig {
            heartbeat: Duration::from_millis(50),
            timeout: Duration::from_millis(300),
            max_lag_events: 100_000,
        }
    }
}

/// Primary → secondary. Variant order is wire format (`primary::EventsRef` mirrors
/// `Events` as variant 1): append, never reorder.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToSecondary {
    /// The VM's configuration, and the generation in which the primary is live.
    Hello {
        header: LogHeader,
        generation: u64,
    },
    /// The next events, in sequence order.
    Events(Vec<Event>),
    /// The guest finished (the secondary's replay must end the same way).
    End(End),
    Heartbeat,
}

/// Secondary → primary.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToPrimary {
    Hello {
        host: String,
    },
    /// The secondary holds `received` events and has executed `executed` of them.
    Ack {
        received: u64,
        executed: u64,
    },
}

/// Frame kinds on the wire.
const KIND_MSG: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum FtError {
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("logging channel: {0}")]
    Frame(#[from] wire::FrameError),
    #[error("logging channel: undecodable message: {0}")]
    Message(String),
    #[error("logging channel: {0}")]
    Protocol(String),
    #[error(transparent)]
    Storage(#[from] arbiter::StorageError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FtError {
    let what = what.into();
    move |source| FtError::Io { what, source }
}

fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    // Our own plain types always serialise.
    postcard::to_stdvec(m).unwrap_or_default()
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, FtError> {
    postcard::from_bytes(b).map_err(|e| FtError::Message(e.to_string()))
}

/// Where a protected VM keeps its shared state: `<shared>/<vm>/`.
#[derive(Clone, Debug)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    pub fn new(shared: &Path, vm: &str) -> Self {
        VmDir(shared.join(vm))
    }
    pub fn key(&self) -> PathBuf {
        self.0.join("key")
    }
    pub fn arbitration(&self) -> PathBuf {
        self.0.join("arbitration")
    }
    pub fn status(&self) -> PathBuf {
        self.0.join("status")
    }

    /// Record what this copy is doing, for operators and tests (`key=value` lines).
    pub fn write_status(&self, fields: &[(&str, String)]) {
        let text: String = fields.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let tmp = self.0.join(format!("status.{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, self.status());
        }
    }

    /// Create (primary) the pair's key: 32 random bytes, readable by root only.
    pub fn create_key(&self) -> Result<[u8; 32], FtError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(self.arbitration())
            .map_err(io_err(format!("create {}", self.0.display())))?;
        let mut key = [0u8; 32];
        let mut urandom =
            std::fs::File::open("/dev/urandom").map_err(io_err("open /dev/urandom"))?;
        std::io::Read::read_exact(&mut urandom, &mut key).map_err(io_err("read /dev/urandom"))?;
        let tmp = self.0.join(format!("key.{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(format!("create {}", tmp.display())))?;
        std::io::Write::write_all(&mut f, &key).map_err(io_err("write the pair key"))?;
        std::fs::rename(&tmp, self.key()).map_err(io_err("install the pair key"))?;
        Ok(key)
    }

    pub fn read_key(&self) -> Result<[u8; 32], FtError> {
        let k = std::fs::read(self.key()).map_err(io_err(format!(
            "read the pair key {}",
            self.key().display()
        )))?;
        k.try_into()
            .map_err(|_| FtError::Protocol("the pair key is not 32 bytes".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use machine::event::{Kind, Outcome};

    #[test]
    fn borrowed_events_encode_as_the_message_does() {
        let events = vec![Event {
            seq: 3,
            kind: Kind::ClockTimeGet,
            args: 1,
            outputs: 2,
            outcome: Outcome::Value(42),
        }];
        let borrowed = encode(&primary::EventsRef(&events));
        assert_eq!(borrowed, encode(&ToSecondary::Events(events.clone())));
        assert!(
            matches!(decode::<ToSecondary>(&borrowed).unwrap(), ToSecondary::Events(e) if e == events)
        );
    }
}
