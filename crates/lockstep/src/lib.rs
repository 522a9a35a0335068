//! vLockstep: a primary and a secondary executing one VM in lockstep.
//!
//! The primary runs the VM live. Every event it takes is appended to its history and
//! streamed over the logging channel ([`wire`]) to the secondary, which replays it. The
//! secondary acknowledges what it holds and reports what it executed. Outputs follow the
//! output rule ([`primary::GatedPort`]): a frame or console write produced after N events
//! leaves only once the secondary holds those N events, and a disk mutation is performed
//! only then. Both sides send heartbeats; silence past the failure detector's timeout (which
//! adapts to the jitter observed, between a floor and the configured timeout: [`detector`])
//! is a suspected failure, settled by arbitration on shared storage ([`arbiter`]): exactly
//! one copy stays live.
//! A secondary that wins goes live where the primary left off.
//!
//! Invariants (from the design; tests in `tests/ft.rs` exercise each):
//! 1. no output leaves the primary's host before the secondary holds the events it depends on;
//! 2. the secondary performs no output while replaying;
//! 3. at most one copy is live: a copy goes live only after winning arbitration;
//! 4. a damaged or forged frame closes the channel and never reaches the replica; no frame
//!    is ever larger than [`wire::MAX_PAYLOAD`] (the history is split by bytes);
//! 5. (design invariant 9) only a caught-up secondary may go live. A newcomer first catches
//!    up *ungated*: the primary streams it the backlog but behaves as unprotected (outputs
//!    and disk operations go at once), and its `Hello` carries no release point, so the
//!    newcomer cannot go live. Once it is nearly caught up the primary *gates* it: it picks
//!    the *release point*, its history length at that moment (outputs depending on those
//!    events may already have left), sends it in-stream (`ToSecondary::Release`), and from
//!    then on holds outputs for it. The secondary is *eligible* once it holds the release
//!    point and every event up to it; an ineligible secondary that loses the primary drops
//!    out and never claims a generation. The VM is reported protected only once the
//!    secondary confirmed the release point (`ToPrimary::ReleaseHeld`) and acknowledged
//!    every event up to it; a primary that loses a secondary to which it never sent the
//!    release point, or fewer events than it, keeps running without arbitration (that
//!    secondary cannot be eligible). The primary never gates while an operation that must
//!    not be done twice (7.) may be under way ungated, so a secondary never goes live at an
//!    operation whose intent it could not have held;
//! 6. (design invariant 10) stopping is not failing: the primary's end (a guest exit or an
//!    operator's stop, always at an event boundary) is sent after every event and confirmed
//!    by the secondary (`ToPrimary::EndHeld`); a secondary that holds the end never
//!    arbitrates and replays to the same end. The primary exits only once the secondary
//!    confirmed and every held output was written, or, past a bound, after fencing the
//!    secondary off by claiming the next generation. Only the live copy writes the VM's
//!    status file; a secondary keeps its own in `status.secondary`.
//! 7. a disk operation that must not be done twice (create, remove, rename, link) is
//!    performed only once the secondary holds its intent (`ToSecondary::Intent`, answered
//!    by `ToPrimary::IntentHeld`; see `machine::event::Intent`): a secondary going live at
//!    that very operation takes its outcome from the disk if the primary performed it, so
//!    the guest never sees "already exists" for what it did itself
//!    (`tests/ft_disk.rs`, every such operation in turn).
//! 8. (design: snapshots) both copies keep only the events since the latest checkpoint
//!    ([`checkpoint`]): the secondary takes checkpoints while attached (the primary never
//!    pauses for one while protected) and reports them (`ToPrimary::Checkpoint`); a copy
//!    with no secondary takes its own. Any live copy accepts a secondary: a newcomer
//!    restores the latest checkpoint and says where it starts (`ToPrimary::Hello::from`); a
//!    copy that no longer holds the events from there refuses it (`ToSecondary::Refused`).
//!    Every secondary keeps what it replays in a standby [`primary::Primary`], which becomes
//!    the primary when it goes live (`tests/ft.rs`: two successive host kills).
//! 9. a planned switch ([`primary::Primary::hand_over`]) is a failover without a failure:
//!    the primary pauses at an event boundary, before the event's result reaches its guest;
//!    once the secondary holds every event and every held output was written it sends
//!    `ToSecondary::Handover`, and from then on it never resumes except by winning
//!    arbitration, or the secondary's refusal: a secondary whose host, looked at afresh,
//!    lacks a path the primary's host has (storage lost on both at once, say) answers
//!    `ToPrimary::Declined`, never claims for that handover, and the VM resumes on the
//!    primary, its guest seeing the error it would natively. Otherwise the secondary claims
//!    the next generation as after a failure, so at most one copy is live whatever is lost
//!    on the way (`tests/ft.rs`: handover under load, storage lost on both hosts at once).

pub mod arbiter;
pub mod checkpoint;
pub mod detector;
pub mod health;
pub mod primary;
pub mod secondary;
pub mod status;
pub mod wire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use machine::event::{Event, Intent};
use machine::{End, LogHeader};
use serde::{Deserialize, Serialize};

/// Timing of the protocol.
#[derive(Clone, Debug)]
pub struct FtConfig {
    /// Heartbeat interval on the channel. It also bounds how long events (and the outputs
    /// that depend on them) wait unsent while the guest computes without a call: otherwise
    /// they go when it waits, at its next call once an output waited `SEND_DELAY`, or once
    /// they weigh `SEND_BYTES` (see [`primary`]).
    pub heartbeat: Duration,
    /// Silence for this long is a suspected failure: the ceiling of the adaptive
    /// detector ([`detector`]), and the timeout until it has heard enough.
    pub timeout: Duration,
    /// The floor of the adaptive detector: it never suspects a failure after less
    /// silence than this, nor than two heartbeats.
    pub min_timeout: Duration,
    /// The primary is slowed when the secondary trails by more events than this.
    pub max_lag_events: u64,
    /// The primary is slowed when the history it keeps (the events since the latest
    /// checkpoint) weighs more than this: the checkpoints (the secondary's, or without one
    /// this copy's own), not the run's length, bound the primary's memory. If no checkpoint
    /// comes within [`HISTORY_WAIT`] the primary goes on (checkpoints are failing). It is
    /// at least the checkpoint interval: a checkpointer that sees the history past it
    /// takes a checkpoint (see `Primary::to_checkpoint_kept`).
    pub max_history_bytes: u64,
    /// How long a finished primary waits for its secondary to confirm the end (and for its
    /// held outputs to be written) before it fences the secondary off.
    pub end_wait: Duration,
    /// Whether plain writes go behind while a secondary is gated (see
    /// [`primary`]): the guest has their outcome at once and they leave under the output
    /// rule. Off, every write waits for the secondary before it is performed, and the guest
    /// gets its true outcome.
    pub write_behind: bool,
}

impl Default for FtConfig {
    fn default() -> Self {
        FtConfig {
            heartbeat: Duration::from_millis(20),
            timeout: Duration::from_millis(300),
            min_timeout: Duration::from_millis(150),
            max_lag_events: 100_000,
            max_history_bytes: u64::MAX,
            end_wait: Duration::from_secs(10),
            write_behind: true,
        }
    }
}

impl FtConfig {
    /// A failure detector for one side of a channel with this timing.
    pub fn detector(&self) -> detector::Detector {
        detector::Detector::new(
            self.min_timeout.max(self.heartbeat.saturating_mul(2)),
            self.timeout,
        )
    }

    /// The timing of the primary's side: its detector does not adapt, it waits the whole
    /// timeout. Suspecting a secondary early only shortens the stall of outputs waiting for
    /// it, and suspecting it wrongly (a secondary's host busy for a moment) costs the VM its
    /// protection until a new secondary joins; a soak with every core busy saw primaries
    /// drop secondaries stalled just past the adaptive floor. The secondary's side adapts:
    /// there the timeout is most of the failover gap.
    pub fn primary_side(&self) -> FtConfig {
        FtConfig {
            min_timeout: self.timeout,
            ..self.clone()
        }
    }
}

/// The least silence of the logging channel that counts as a failure while the secondary
/// catches up ungated (on both sides, until the primary gates it): no output waits for it
/// and it cannot go live, so suspecting it late costs nothing, and suspecting it wrongly
/// costs the whole join. A newcomer restoring a large checkpoint on a busy host was seen
/// silent for 317 ms (`tandem bench ft`, a 256 MiB kvd, the join's first second).
pub const CATCH_UP_PATIENCE: Duration = Duration::from_secs(3);

/// The longest one event waits for a checkpoint that brings the history under
/// [`FtConfig::max_history_bytes`].
pub const HISTORY_WAIT: Duration = Duration::from_secs(5);

/// Primary → secondary. Variant order is wire format (`primary::EventsRef` mirrors
/// `Events` as variant 1): append, never reorder.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToSecondary {
    /// The VM's configuration and the generation in which the primary is live. It carries
    /// no release point: until `Release` comes the secondary is catching up ungated and may
    /// never go live.
    Hello {
        header: LogHeader,
        generation: u64,
    },
    /// The next events, in sequence order.
    Events(Vec<Event>),
    /// The guest finished (the secondary's replay must end the same way).
    End(End),
    Heartbeat,
    /// The primary is about to perform a disk operation that must not be done twice, as
    /// its next event (after every event sent so far); it waits for `IntentHeld`.
    Intent(Intent),
    /// Instead of Hello: this copy cannot serve the secondary, and why (e.g. it starts
    /// from a checkpoint older than the history this copy keeps).
    Refused(String),
    /// A planned switch: the primary stopped at an event boundary after `events` events
    /// (all sent, all acknowledged, every output depending on them written) and takes no
    /// more. The secondary claims the next generation and goes live there; `why` is the
    /// reason, for the logs and the status.
    Handover {
        events: u64,
        why: String,
    },
    /// The secondary is gated from now on: the primary's outputs wait for it, and it may go
    /// live once it holds `release` events (the primary's history length when it was
    /// gated; every event sent before this message comes before that point). Sent once.
    Release {
        release: u64,
    },
    /// Every write logged before event `below` was performed by the primary (it performs
    /// a write once the output rule lets it leave, after the guest had its outcome): the
    /// secondary need not keep those to write again at a go-live.
    Written {
        below: u64,
    },
}

/// Secondary → primary.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToPrimary {
    /// `from`: the position the secondary starts at (0: power-on; else the checkpoint
    /// it restored). The primary streams its history from there.
    Hello { host: String, from: u64 },
    /// The secondary holds `received` events and has executed `executed` of them.
    Ack { received: u64, executed: u64 },
    /// The secondary holds all `events` events and the end: it will end the same way and
    /// never arbitrate.
    EndHeld { events: u64 },
    /// The secondary holds the intent for event `seq`.
    IntentHeld { seq: u64 },
    /// The secondary wrote a checkpoint holding the VM at event `events` to shared
    /// storage: the events before it may be dropped.
    Checkpoint { events: u64 },
    /// What the secondary's host reaches (sent when it changes): the primary hands over
    /// only to a copy whose host has what its own lost.
    Health(health::HostHealth),
    /// The secondary holds the release point (`ToSecondary::Release`): once it holds that
    /// many events it is eligible, and the primary reports the VM protected.
    ReleaseHeld { release: u64 },
    /// The secondary will not take the VM over at the handover after `events` events: its
    /// host, looked at right now, lacks a path the primary's has (`health`, fresh: no hold).
    /// It never claims a generation for that handover; the primary resumes.
    Declined {
        events: u64,
        health: health::HostHealth,
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
    #[error("the primary refused this secondary: {0}")]
    Refused(String),
    /// Not a failure: the primary handed the VM over (a planned switch), and why.
    #[error("the primary handed the VM over: {0}")]
    HandedOver(String),
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
    /// The VM's status: written only by the live copy.
    pub fn status(&self) -> PathBuf {
        self.0.join("status")
    }

    /// What the secondary is doing: written only by a secondary that is not live.
    pub fn secondary_status(&self) -> PathBuf {
        self.0.join("status.secondary")
    }

    /// Record what the live copy is doing, for operators and tests (`key=value` lines),
    /// unless a later generation than `generation` was claimed: then this copy is not live
    /// and the status belongs to the copy that is. Written by the status thread
    /// ([`status`]), never by the caller: storage may be slow.
    pub fn write_status(&self, generation: u64, fields: &[(&str, String)]) {
        status::post(
            self.status(),
            fields,
            Some((self.arbitration(), generation)),
        );
    }

    /// Record what a secondary is doing (never the VM's status).
    pub fn write_secondary_status(&self, fields: &[(&str, String)]) {
        status::post(self.secondary_status(), fields, None);
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
    fn the_primary_side_waits_the_whole_timeout_and_the_secondary_side_adapts() {
        let config = FtConfig::default();
        let (mut primary, mut secondary) = (config.primary_side().detector(), config.detector());
        // Steady heartbeats for 4 s.
        for i in 0..200u64 {
            let at = Duration::from_millis(i * 20);
            primary.heard(at);
            secondary.heard(at);
        }
        assert_eq!(primary.timeout(), config.timeout);
        assert_eq!(secondary.timeout(), config.min_timeout);
    }

    #[test]
    fn borrowed_events_encode_as_the_message_does() {
        let events = vec![
            Event {
                seq: 3,
                kind: Kind::ClockTimeGet,
                args: 1,
                outputs: 2,
                outcome: Outcome::Value(42),
            },
            Event {
                seq: 4,
                kind: Kind::FdRead,
                args: 5,
                outputs: 6,
                outcome: Outcome::Data((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>().into()),
            },
        ];
        let shared: Vec<std::sync::Arc<Event>> =
            events.iter().cloned().map(std::sync::Arc::new).collect();
        let owned = encode(&ToSecondary::Events(events.clone()));
        let borrowed = encode(&primary::EventsRef(&shared));
        assert_eq!(borrowed, owned);
        // Serialised onto a writer in pieces, as the sender does: the same bytes.
        let mut streamed = Vec::new();
        primary::serialize_into(&primary::EventsRef(&shared), &mut streamed).unwrap();
        assert_eq!(streamed, owned);
        assert!(
            matches!(decode::<ToSecondary>(&borrowed).unwrap(), ToSecondary::Events(e) if e == events)
        );
    }
}
