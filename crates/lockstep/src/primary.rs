//! The primary: streams its VM's events to a secondary and holds outputs to the output rule.
//!
//! One [`Primary`] serves one VM. Its state sits behind one mutex: the VM's thread appends
//! events ([`PrimarySink`]) and outputs ([`GatedPort`]); a listener accepts a secondary on
//! the logging address; per connection a sender streams history (in frames split by bytes,
//! [`next_batch`]; the VM's thread writes a frame itself as it goes to wait, see below) and
//! heartbeats and a receiver takes acknowledgements and watches for silence. Held outputs
//! are written by the thread that learns they may leave: the receiver, as the
//! acknowledgement comes; the VM's thread, for an output whose events are acknowledged
//! already; a releaser, for what no acknowledgement releases (the secondary lost while
//! outputs are held) and for writes behind while storage is slow.
//!
//! Hand-offs between threads are what the channel costs per event (every wake is a futex
//! call and a context switch): each kind of waiter has its own condition variable, and a
//! change wakes a waiter only if one waits, and for an acknowledgement only one that waits
//! for that far. A busy sender is never woken: it looks at the history again before it
//! waits, and takes everything appended meanwhile in one frame. While a secondary is gated
//! a waiting sender is not woken for each event either, but when the VM is about to wait
//! for input (`OutputPort::idle`) or for the secondary, when what waits unsent weighs
//! [`SEND_BYTES`], or when an output waited [`SEND_DELAY`] for it (its heartbeat takes the
//! rest): a burst of guest work goes in one frame and draws one acknowledgement. As the VM
//! goes to wait for input, its own thread writes that frame when it can without waiting
//! (`Shared::send_from_vm`): never blocking, it leaves what the socket does not take at
//! once to the sender, and frames leave in the order their events were taken, since
//! whoever takes events for a frame takes the connection's writer before the state's lock
//! is released.
//!
//! A newcomer catches up *ungated*: while it takes the backlog this copy behaves as if it
//! had no secondary (outputs and disk operations go at once). Once it holds and executed
//! all but [`GATE_EVENTS`] events (of at most [`GATE_BYTES`] bytes) of the history (or after
//! [`GATE_ROUNDS`] rounds of catching up, for a VM that outruns it) it is *gated*: the
//! release point is the history length at that moment, sent in-stream
//! (`ToSecondary::Release`), and from then on outputs wait for it.
//!
//! Disk writes are outputs too. While a secondary is gated, a plain write to a regular file
//! (the common case: an append-only file, a data file) is a *write behind*: the guest gets
//! its outcome at once (all written) and the write is held like a frame, performed once its
//! events are acknowledged, in order with the other outputs (a reply that says it was
//! written leaves after it). Any other disk operation first waits until every write
//! behind was performed (`settle_writes`), so that it sees them. The secondary keeps the
//! writes it replays until told they were performed (`ToSecondary::Written`, or any other
//! disk event) and performs them again as it goes live: each is positional, so doing again
//! what was done is harmless (invariant 2). The thread that learns a write behind may be
//! performed (the receiver, as the acknowledgement comes) performs it only while storage is
//! quick, and leaves it to the releaser otherwise: the receiver also watches for silence
//! ([`QUICK_WRITE_BYTES`], [`SLOW_WRITE`]). One that fails stops everything after it from
//! leaving; the VM is handed over if this host lost its storage and the secondary's has it,
//! else this copy halts and closes the channel, and the secondary takes over: either way
//! the secondary writes it again (the end is never sent while a write behind is pending, so
//! a secondary holding the end never has to). A newcomer is gated only once no write
//! behind is pending: it could not perform again one from before its start.
//!
//! Invariants: a held output at position p leaves only when the secondary holds p events or
//! no secondary is gated (none attached, one still catching up, or arbitration won after
//! losing one); after losing arbitration nothing more leaves, ever, and this copy never
//! writes the VM's status again. A secondary is eligible to go live only once it holds the
//! release point and every event before it; losing one to which the release point or that
//! many events were not sent needs no arbitration, since it cannot be eligible. A secondary
//! is never gated while an operation that must not be done twice may be under way ungated
//! (its intent is at the end of the history). The process ends ([`Primary::finish`])
//! only once the secondary confirmed the end and every held output was written, or after
//! the secondary was fenced off by claiming the next generation.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use machine::event::{Event, Intent};
use machine::port::{DiskWrite, OutputPort, send_frame, write_console};
use machine::{End, EventSink, LogError, LogHeader};

use crate::arbiter::{Arbiter, Claim};
use crate::wire::{FrameReader, FrameWriter, MAX_PAYLOAD, Outbox, connection_key};
use crate::{FtConfig, FtError, KIND_MSG, ToPrimary, ToSecondary, VmDir, decode, encode, io_err};

/// The payload bytes a frame of events aims at: large enough that frame overhead is
/// nothing, small enough that acknowledgements flow while a long history is in transit.
pub const FRAME_TARGET: usize = 1 << 20;

/// A catching-up secondary is gated once it holds and has executed all but at most this
/// many events...
pub const GATE_EVENTS: u64 = 256;
/// ...and these events weigh at most this: the outputs produced from then on wait only for
/// what is left in transit (about a round trip), not for the backlog.
pub const GATE_BYTES: u64 = 128 << 10;
/// A round of catching up ends when the secondary executed what this copy held when the
/// round began; after this many rounds without getting near the end (a VM producing events as
/// fast as they travel) it is gated anyway, with about one round's events in transit.
pub const GATE_ROUNDS: u32 = 8;

/// While a secondary is gated, the events a waiting sender has not taken wake it once they
/// weigh this much (see [`State::send_due`])...
const SEND_BYTES: u64 = 64 << 10;
/// ...or once an output has waited this long for events not sent (a guest computing on
/// without waiting for input); otherwise they go when the VM waits, or at the sender's
/// heartbeat. Longer than a burst of kvd's work on a loaded host (at 200 µs, bursts of 20
/// pipelining clients here often outlasted it: the sender was woken mid-burst, and only
/// 40% of frames went from the VM's thread as it waited, against 92% at 1 ms). A guest
/// that produces an output and computes on without a call holds it this long, plus a
/// round trip (kvd's replies go as it waits for the next requests, without this delay).
const SEND_DELAY: Duration = Duration::from_millis(1);

/// A `ToSecondary::Events` payload's bytes beyond its events: the variant's tag (1) and the
/// event count (a varint of at most 10).
const EVENTS_OVERHEAD: usize = 11;

/// A connection's frame writer, shared by its sender and the VM's thread. Whoever updates
/// `State::sent` for a frame takes this lock before releasing the state's, and keeps it
/// until the frame is written: frames reach the wire in the order their events were taken.
type Channel = Arc<Mutex<FrameWriter<Outbox>>>;

fn lock_channel(c: &Channel) -> MutexGuard<'_, FrameWriter<Outbox>> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

enum Held {
    Frame(Vec<u8>),
    Console(u32, Vec<u8>),
    /// A write whose outcome the guest already has (see `OutputPort::write_behind`).
    Disk(DiskWrite),
}

/// Writes behind not yet performed weigh at most about this (a write is taken while they
/// weigh less; one write is at most 16 MiB): what they hold in memory, and what they may
/// take of the datastore's free space beyond what was free when the guest was told they
/// were written, well within the space a write behind leaves free
/// (`machine::datastore::SPACE_MARGIN`, 256 MiB).
const BEHIND_BYTES: u64 = 48 << 20;

/// A thread with other work than writing held outputs (the receiver, which reads
/// acknowledgements and watches for silence; the VM's thread) performs a write behind
/// itself, rather than waking the releaser for it, only while storage is quick: the write's
/// own event is acknowledged (so that the thread never waits for a later acknowledgement,
/// which the receiver itself reads), it takes at most this many bytes with the other writes
/// of its batch...
const QUICK_WRITE_BYTES: u64 = 64 << 10;
/// ...and no write behind took this long, sleeping, in the last [`SLOW_WRITE_HOLD`]. A
/// write into the page cache takes microseconds; one that sleeps longer (writeback
/// throttling, a journal commit, a slow device) sends the writes after it to the releaser
/// for a while: the receiver is held up by at most one slow write per hold, and while it
/// is, the outputs it would release wait behind that write anyway. A write that took long
/// only because its thread was preempted (on a busy host, about once a run of
/// `tandem bench ft`) is not storage being slow: it did not sleep. (`RWF_NOWAIT` would let
/// the receiver give up instead of waiting, but buffered writes do not take it on ext4 or
/// tmpfs.)
const SLOW_WRITE: Duration = Duration::from_millis(5);
const SLOW_WRITE_HOLD: Duration = Duration::from_secs(1);

/// Under load, the secondary is told which writes were performed at most this often.
const WRITTEN_EVERY: Duration = Duration::from_millis(10);

/// How long a planned switch waits for the secondary to hold every event and for the held
/// outputs to be written before it is given up (the VM goes on here, still protected).
pub const HANDOVER_WAIT: Duration = Duration::from_secs(5);
/// How long after `Handover` was sent the secondary has to claim the next generation before
/// it is fenced off (this copy then claims it, and goes on if it wins).
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// After the secondary declined a handover, none is asked of it again for this long (its
/// own report of the loss comes after its hold time).
const DECLINE_HOLD: Duration = Duration::from_secs(2);
/// How often the health watcher looks while this host lacks a path...
const HEALTH_LOOK: Duration = Duration::from_millis(20);
/// ...and at the latest while it lacks none (it wakes at once when one is lost).
const HEALTH_IDLE_LOOK: Duration = Duration::from_secs(1);

/// A planned switch in progress ([`Primary::hand_over`]).
struct Handover {
    why: String,
    /// The event boundary the VM paused at, once it reached one.
    at: Option<u64>,
    /// Every event up to `at` is acknowledged and every held output written: the sender
    /// may send `Handover`.
    ready: bool,
    /// `Handover` was (being) sent: the secondary may claim the next generation at any
    /// moment, so this copy may resume only by winning it.
    sent: bool,
}

struct State {
    header: LogHeader,
    /// The events from position `base` on: those since the latest checkpoint (a snapshot
    /// holds the VM at `base`), which a secondary joining from that checkpoint replays.
    /// Shared, not copied: the VM gave its guest the data of the last one from the same
    /// allocation, and a sender takes the ones it streams without holding the lock.
    history: Vec<Arc<Event>>,
    base: u64,
    /// What `history` weighs (encoded bytes): the checkpoint policy's measure.
    history_bytes: u64,
    /// The latest checkpoint's position, once there is one.
    checkpoint: Option<u64>,
    /// A secondary's copy-to-be: it keeps the history it replays, but is not live (no
    /// listener, no generation, no status) until [`Primary::activate`].
    standby: bool,
    /// This copy was a secondary and went live (its status says `live`), and why.
    promoted: bool,
    went_live: Option<String>,
    /// The history outgrew its bound once without a checkpoint (said once).
    history_warned: bool,
    /// This copy went live: its next checkpoint is due at once (see [`Primary::activate`]).
    checkpoint_due: bool,
    /// Without a secondary: the history length when this copy's checkpointer was seen
    /// asking for a checkpoint with the history past its bound, until that checkpoint is
    /// in place (see [`PrimarySink::append`]).
    own_asked: Option<u64>,
    end: Option<End>,
    /// Events the attached secondary holds and has executed.
    acked: u64,
    executed: u64,
    /// The attached secondary's connection number, if one is attached.
    attached: Option<u64>,
    /// Whether the attached secondary is gated (outputs wait for it), its release point
    /// (the history length when it was gated), whether the release point was handed to its
    /// connection and whether it confirmed holding it.
    gated: bool,
    release: u64,
    release_sent: bool,
    release_held: bool,
    /// While it catches up ungated: the history length at which its current round of
    /// catching up ends, and the rounds done.
    catch_up_mark: u64,
    catch_up_rounds: u32,
    /// The events handed to its connection, and whether it confirmed holding the end.
    sent: u64,
    /// What the events pushed since the last frame took the last event weigh, and since
    /// when an output waits for them (both cleared when a frame takes the last event
    /// again, [`State::taken_for_sending`]): what a waiting sender has not taken, since it
    /// waits only with every event taken.
    unsent_bytes: u64,
    output_waits_since: Option<Instant>,
    /// The attached secondary's output (set only while it is attached: cleared wherever
    /// `attached` is), which its sender writes and the VM's thread too, without blocking
    /// ([`Shared::send_from_vm`]); and whether the VM's thread left bytes pending on it (or
    /// saw it fail) for the sender to deal with.
    channel: Option<Channel>,
    flush_due: bool,
    /// Frames of events written, and how many of them the VM's thread wrote itself.
    frames: u64,
    frames_from_vm: u64,
    /// Acknowledgements that told of events received or executed not acknowledged before
    /// (one may cover several frames; a heartbeat that tells nothing new is not counted).
    acks: u64,
    end_held: bool,
    /// The intent of the disk operation the VM is about to perform (it waits until the
    /// attached secondary holds it), and the last intent the secondary said it holds.
    intent: Option<Intent>,
    intent_held: Option<u64>,
    next_conn: u64,
    generation: u64,
    halted: Option<String>,
    /// A planned switch asked for, and once it happened, why (this copy then halted).
    handover: Option<Handover>,
    handed_over: Option<String>,
    /// What this host and the attached secondary's host have lost (see [`crate::health`]),
    /// and whether losing a path the secondary's host has hands the VM over.
    own_health: crate::health::HostHealth,
    peer_health: crate::health::HostHealth,
    health_handover: bool,
    /// When the secondary last declined a handover (its host, looked at afresh, lacked a
    /// path): none is asked again for [`DECLINE_HOLD`], so a loss on both hosts at once does
    /// not pause the VM at every failing operation while the secondary's report is on its
    /// way.
    declined_at: Option<Instant>,
    held: VecDeque<(u64, Held)>,
    /// The positions of the writes taken to be performed later and not yet performed, in
    /// order (see `OutputPort::write_behind`): every write logged before the first (or
    /// before the history's end, if none) was performed. The VM's side waits for this to
    /// be empty before any other disk operation; how many wait.
    unwritten: VecDeque<u64>,
    unwritten_bytes: u64,
    writes_waiting: u32,
    writes_behind: u64,
    /// Writes behind the releaser performed (the others were performed by the thread that
    /// learned they could be), and when one last took [`SLOW_WRITE`] or more.
    writes_by_releaser: u64,
    slow_write_at: Option<Instant>,
    /// A write behind failed (why): it and every output after it stay held while the VM
    /// is handed over (the secondary writes it again); nothing more leaves from here.
    write_failed: Option<String>,
    /// Outputs ever held, and those the releaser has written (held outputs all written:
    /// `held` empty and the two equal).
    held_total: u64,
    released: u64,
    /// Set once the run ended and its final status was written.
    finished: Option<String>,
    /// Who waits now, so that a change wakes only a thread that waits for it (a wake is a
    /// futex syscall whether or not anyone waits, and on a virtualised host an expensive
    /// one): senders waiting for something to send; threads waiting on [`Shared::vm`], the
    /// least acknowledged position one of them waits for (0: any change), and how many of
    /// them wait for every held output to be written; whether the releaser waits.
    senders_waiting: u32,
    vm_waiting: u32,
    vm_target: u64,
    outputs_waiting: u32,
    releaser_waiting: bool,
    /// A thread is popping and writing held outputs ([`release_outputs`]): it alone does,
    /// so outputs leave in the order they were produced although several threads release
    /// them, and it writes whatever becomes due before it stops.
    releasing: bool,
    /// Bytes sent on logging channels, and the input bytes the events carried.
    log_bytes: u64,
    disk_read_bytes: u64,
    net_in_bytes: u64,
    /// When the status was last written from the event path (without a secondary, nothing
    /// else keeps its counters current: VM monitoring's heartbeat and sizing read them).
    status_at: Instant,
}

impl State {
    /// The position after the last event: how many events the VM has taken.
    fn end(&self) -> u64 {
        self.base + self.history.len() as u64
    }

    /// The events up to `upto`, a frame's payload of `size` bytes, are about to be written
    /// on the channel: counted as sent before the write, since the secondary may hold them
    /// from then on.
    fn taken_for_sending(&mut self, upto: u64, size: usize) {
        // Frame overhead: 16 bytes of header, 4 of CRC, 16 of MAC.
        self.log_bytes += size as u64 + 36;
        self.frames += 1;
        self.sent = upto;
        if upto == self.end() {
            self.output_waits_since = None;
            self.unsent_bytes = 0;
        }
    }

    fn push(&mut self, event: Arc<Event>) {
        let w = weight(&event);
        self.history_bytes += w;
        self.unsent_bytes += w;
        self.history.push(event);
    }

    /// Whether the VM's thread, having added an event or output, should wake a waiting
    /// sender now. Without a gated secondary, always (a newcomer catching up takes the
    /// history as it comes). With one, only once what waits unsent weighs [`SEND_BYTES`]
    /// or an output waited [`SEND_DELAY`] for it: the events of a burst of guest work then
    /// go in one frame, as the VM waits for input ([`OutputPort::idle`]) or its side waits
    /// for the secondary ([`Shared::wait_vm`]), and draw one acknowledgement, instead of a
    /// wake, a frame and an acknowledgement for each of the first few events.
    fn send_due(&self) -> bool {
        self.end() > self.sent
            && (!self.gates()
                || self.unsent_bytes >= SEND_BYTES
                || self
                    .output_waits_since
                    .is_some_and(|t| t.elapsed() >= SEND_DELAY))
    }

    /// Forget the events before `position`, which a checkpoint holds, but never one an
    /// attached secondary may still need sent (its history in transit). They are returned,
    /// to be freed once the state's lock is released: freeing a checkpoint's worth of
    /// events (tens of thousands, and their data) under it would hold up the VM's thread,
    /// which takes the lock at every event.
    #[must_use = "free the forgotten events after releasing the lock"]
    fn drop_before(&mut self, position: u64) -> Vec<Arc<Event>> {
        let keep_from = if self.attached.is_some() {
            position.min(self.acked)
        } else {
            position
        };
        let n = keep_from
            .saturating_sub(self.base)
            .min(self.history.len() as u64) as usize;
        if n == 0 {
            return Vec::new();
        }
        let freed: u64 = self.history[..n].iter().map(|e| weight(e)).sum();
        // The kept events move to a Vec of their own size (a burst leaves no large
        // allocation behind); the forgotten ones stay in the old one, untouched here.
        let kept = self.history.split_off(n);
        let forgotten = std::mem::replace(&mut self.history, kept);
        self.base += n as u64;
        self.history_bytes = self.history_bytes.saturating_sub(freed);
        // Checkpoints come again: the bound holds again.
        self.history_warned = false;
        forgotten
    }

    /// The attached secondary holds the release point and every event up to it: it may go
    /// live.
    fn protected(&self) -> bool {
        self.gates() && self.halted.is_none() && self.release_held && self.acked >= self.release
    }

    /// Outputs and disk operations wait for the attached secondary: it is gated.
    fn gates(&self) -> bool {
        self.attached.is_some() && self.gated
    }

    /// The attached secondary could be eligible: its connection was handed the release point
    /// and every event up to it. Losing one that could not needs no arbitration.
    fn may_be_eligible(&self) -> bool {
        self.gates() && self.release_sent && self.sent >= self.release
    }

    /// Gate the attached, catching-up secondary if it is nearly caught up (see
    /// [`GATE_EVENTS`]): the release point is the end of the history now. Whether it was.
    fn gate_if_near(&mut self) -> bool {
        if self.attached.is_none() || self.gated || self.halted.is_some() || self.end.is_some() {
            return false;
        }
        // A write the guest was told was done, and not yet performed, may be from before
        // the newcomer's start, where it could not perform it again: gated only once
        // there is none (none is taken while no secondary is gated).
        if !self.unwritten.is_empty() {
            return false;
        }
        // An operation that must not be done twice may be under way ungated: a secondary
        // going live right before it would not hold its intent and would do it again.
        if self.intent.as_ref().is_some_and(|i| i.seq >= self.end()) {
            return false;
        }
        let end = self.end();
        let behind = end.saturating_sub(self.acked);
        // Near in what it holds and in what it executed: a newcomer still restoring its
        // checkpoint or replaying the backlog is busy, and outputs waiting for its
        // acknowledgements would wait on that.
        let near = behind <= GATE_EVENTS && end.saturating_sub(self.executed) <= GATE_EVENTS && {
            let from = self.acked.saturating_sub(self.base) as usize;
            let bytes: u64 = self
                .history
                .get(from..)
                .unwrap_or(&[])
                .iter()
                .map(|e| weight(e))
                .sum();
            bytes <= GATE_BYTES
        };
        if !near {
            if self.executed < self.catch_up_mark {
                return false;
            }
            self.catch_up_rounds += 1;
            self.catch_up_mark = end;
            if self.catch_up_rounds < GATE_ROUNDS {
                return false;
            }
        }
        self.gated = true;
        self.release = end;
        true
    }

    /// The oldest held output may leave: the attached secondary holds its events, or no
    /// secondary is gated (and this copy did not halt: then nothing leaves, ever).
    fn release_due(&self) -> bool {
        self.halted.is_none()
            && self.write_failed.is_none()
            && self
                .held
                .front()
                .is_some_and(|(p, _)| !self.gates() || *p <= self.acked)
    }

    /// A thread other than the releaser may perform the due write behind at `position` of
    /// `bytes` (with those its batch took before it): see [`QUICK_WRITE_BYTES`].
    fn quick_write(&self, position: u64, bytes: u64) -> bool {
        self.gates()
            && position < self.acked
            && bytes <= QUICK_WRITE_BYTES
            && self
                .slow_write_at
                .is_none_or(|t| t.elapsed() >= SLOW_WRITE_HOLD)
    }

    /// Every held output was written.
    fn outputs_done(&self) -> bool {
        self.held.is_empty() && self.released == self.held_total
    }

    /// This host lost storage (`own`, its health now): hand the VM over, only to a secondary
    /// whose host is at least as healthy on every path (by its latest report; it looks
    /// again when asked, and declines if it lacks a path now). `Ok(true)`: asked for now;
    /// `Ok(false)`: a handover was under way already; `Err`: why not.
    fn hand_over_for_storage(
        &mut self,
        own: &crate::health::HostHealth,
    ) -> Result<bool, &'static str> {
        if self.handover.is_some() {
            return Ok(false);
        }
        if self.declined_lately() {
            return Err("the secondary's host lacks it too (it declined a handover just now)");
        }
        if !self.protected() || !self.peer_health.better_than(own) {
            return Err("no secondary whose host reaches it");
        }
        let lost = own.storage.as_deref().unwrap_or_default();
        self.handover = Some(Handover {
            why: format!("primary lost its storage ({lost})"),
            at: None,
            ready: false,
            sent: false,
        });
        Ok(true)
    }

    /// The secondary declined a handover a moment ago: do not ask again yet.
    fn declined_lately(&self) -> bool {
        self.declined_at.is_some_and(|t| t.elapsed() < DECLINE_HOLD)
    }

    /// Why the VM is reported not protected although a secondary could go live: its host
    /// lost a path (storage, VM network) that the VM would need there.
    fn weakness(&self) -> Option<String> {
        self.peer_health
            .lost()
            .filter(|_| self.protected())
            .map(|l| format!("the secondary's host lost {l}"))
    }
}

struct Shared {
    state: Mutex<State>,
    /// The sender waits on this for new events (or the end, an intent, a release point, a
    /// handover).
    events: Condvar,
    /// The VM's side waits on this: the disk gate, intents, the lag bound, the history
    /// bound, a planned switch and the end (acknowledgements, written outputs, changes of
    /// protection).
    vm: Condvar,
    /// The releaser waits on this for outputs that no acknowledgement releases (the
    /// secondary lost or not gated while outputs are held).
    releaser: Condvar,
    config: FtConfig,
    key: [u8; 32],
    dir: VmDir,
    arbiter: Arbiter,
    /// The NIC's tap on this host: set at start, or when a standby copy goes live.
    tap: OnceLock<Arc<devices::Tap>>,
    /// This host's health, once watched ([`Primary::watch_health`]).
    monitor: OnceLock<crate::health::Monitor>,
    console: bool,
    host: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread elsewhere must not take the VM down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This host's health if storage, looked at now, confirms it is lost here (and losing
    /// it may hand the VM over); `None` otherwise.
    fn storage_lost_now(&self) -> Option<crate::health::HostHealth> {
        let monitor = self.monitor.get()?;
        if !self.lock().health_handover {
            return None;
        }
        let lost = monitor.storage_now()?;
        Some(crate::health::HostHealth {
            storage: Some(lost),
            uplink: monitor.current().uplink,
        })
    }

    /// Something to send may have come: wake the sender if it waits (one that is busy
    /// looks at the state again before it waits).
    fn wake_sender(&self, st: &State) {
        if st.senders_waiting > 0 {
            self.events.notify_all();
        }
    }

    /// Events wait unsent and nothing more is coming from the VM for a while (it waits):
    /// wake the sender for them now rather than at its heartbeat.
    fn send_now(&self, st: &State) {
        if st.end() > st.sent {
            self.wake_sender(st);
        }
    }

    /// The VM's thread is about to wait for input: the events it appended since the last
    /// frame go to the gated secondary now. It writes them itself when it can do so
    /// without waiting (the channel is free, nothing is pending on it, they fit in
    /// [`SEND_BYTES`] and nothing else is due before them: a release point, an intent, a
    /// handover, the end), saving the sender's wake and context switch, the most frequent
    /// hand-off of a request and its reply. What the socket does not take at once stays
    /// pending for the sender, woken for it: the VM's thread never blocks on the channel
    /// (a frozen secondary's host must not freeze the VM). Otherwise the sender is woken.
    fn send_from_vm(&self, mut st: MutexGuard<'_, State>) {
        if st.end() <= st.sent {
            return;
        }
        let plain = st.gates()
            && st.release_sent
            && st.halted.is_none()
            && st.handover.is_none()
            && st.end.is_none()
            && st.unsent_bytes <= SEND_BYTES
            && st.intent.as_ref().is_none_or(|i| i.seq < st.sent);
        let channel = match &st.channel {
            Some(c) if plain => c.clone(),
            _ => return self.wake_sender(&st),
        };
        // Never waited for: the sender holds it only while it writes.
        let Ok(mut w) = channel.try_lock() else {
            return self.wake_sender(&st);
        };
        if w.get_ref().pending() > 0 || w.get_ref().failed() {
            drop(w);
            return self.wake_sender(&st);
        }
        let from = (st.sent - st.base) as usize;
        let batch = st.history[from..].to_vec();
        let size = batch_size(&batch);
        if size > SEND_BYTES as usize {
            drop(w);
            return self.wake_sender(&st);
        }
        let upto = st.end();
        st.taken_for_sending(upto, size);
        st.frames_from_vm += 1;
        drop(st);
        w.get_mut().set_blocking(false);
        let sent = w.send_with(KIND_MSG, size, |out| {
            serialize_into(&EventsRef(&batch), out)
        });
        w.get_mut().set_blocking(true);
        if let Err(e) = &sent {
            // Whatever the cause, part of a frame may be on the wire: nothing may follow.
            w.get_mut().set_failed(e.kind());
        }
        let left = sent.is_err() || w.get_ref().pending() > 0;
        drop(w);
        if left {
            // Its sender writes the rest, or finds the channel failed and ends it (unless
            // the connection is gone already).
            let mut st = self.lock();
            if st
                .channel
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &channel))
            {
                st.flush_due = true;
                self.wake_sender(&st);
            }
        }
    }

    /// Something the VM's side waits for may have changed: wake it if it waits.
    fn wake_vm(&self, st: &State) {
        if st.vm_waiting > 0 {
            self.vm.notify_all();
        }
    }

    /// An acknowledgement came: wake the VM's side if it waits for one that far (or for
    /// any).
    fn wake_vm_acked(&self, st: &State) {
        if st.vm_waiting > 0 && st.acked >= st.vm_target {
            self.vm.notify_all();
        }
    }

    /// Held outputs may leave without an acknowledgement: wake the releaser if they may
    /// and it waits.
    fn wake_releaser(&self, st: &State) {
        if st.releaser_waiting && st.release_due() && !st.releasing {
            self.releaser.notify_one();
        }
    }

    /// Wait on [`Shared::vm`] (for at most `timeout`): for an acknowledgement of `target`
    /// events (0: any change), and if `outputs`, for every held output to be written.
    fn wait_vm<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        target: u64,
        outputs: bool,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        // Whatever the VM's side waits for comes back only once the events appended so far
        // reach the secondary.
        self.send_now(&st);
        // The target is at most every waiter's: a lower one wakes too often, never too
        // seldom.
        st.vm_target = if st.vm_waiting == 0 {
            target
        } else {
            st.vm_target.min(target)
        };
        st.vm_waiting += 1;
        st.outputs_waiting += u32::from(outputs);
        let mut st = match timeout {
            Some(t) => self
                .vm
                .wait_timeout(st, t)
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0),
            None => self.vm.wait(st).unwrap_or_else(|p| p.into_inner()),
        };
        st.vm_waiting -= 1;
        st.outputs_waiting -= u32::from(outputs);
        if st.vm_waiting == 0 {
            st.vm_target = 0;
        }
        st
    }

    /// Bounded history: while the history is past its bound and `waiting` holds, wait
    /// for a checkpoint to drop events (or for whatever else wakes the acknowledgements),
    /// until `deadline`; past it, say once (`what` ... the history grows) and go on.
    fn wait_for_checkpoint<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Instant,
        what: &str,
        waiting: impl Fn(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while st.halted.is_none()
            && !st.history_warned
            && st.history_bytes > self.config.max_history_bytes
            && waiting(&st)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.history_warned = true;
                tracing::warn!(
                    "{what} in {} s: the history grows past {} bytes",
                    crate::HISTORY_WAIT.as_secs(),
                    self.config.max_history_bytes
                );
                break;
            }
            st = self.wait_vm(st, 0, false, Some(left));
        }
        st
    }

    /// The VM's status, while this copy is the live one (never after it halted).
    fn status(&self, st: &State) {
        if st.halted.is_some() || st.standby {
            return;
        }
        let role = if st.finished.is_some() {
            "stopped"
        } else if st.promoted {
            "live"
        } else {
            "primary"
        };
        let mut fields = vec![
            ("role", role.to_string()),
            ("host", self.host.clone()),
            (
                "protected",
                (st.protected() && st.weakness().is_none()).to_string(),
            ),
            ("generation", st.generation.to_string()),
            ("events", st.end().to_string()),
            ("history_events", st.history.len().to_string()),
            ("history_bytes", st.history_bytes.to_string()),
            (
                "checkpoint",
                st.checkpoint
                    .map_or_else(|| "none".into(), |c| c.to_string()),
            ),
            ("acked", st.acked.to_string()),
            ("gated", st.gates().to_string()),
            ("release", st.release.to_string()),
            ("log_bytes", st.log_bytes.to_string()),
            // Frames of events, and those the VM's thread wrote itself as it went to wait.
            ("log_frames", st.frames.to_string()),
            ("log_frames_from_vm", st.frames_from_vm.to_string()),
            ("log_acks", st.acks.to_string()),
            ("disk_read_bytes", st.disk_read_bytes.to_string()),
            ("net_in_bytes", st.net_in_bytes.to_string()),
            // The output rule at work: outputs held now, and ever (metrics).
            ("outputs_held", st.held.len().to_string()),
            ("outputs_held_total", st.held_total.to_string()),
            ("outputs_released", st.released.to_string()),
            // Writes whose outcome the guest had before they were performed.
            ("writes_behind", st.writes_behind.to_string()),
            // Those the releaser performed: the rest went without a wake.
            (
                "writes_behind_by_releaser",
                st.writes_by_releaser.to_string(),
            ),
        ];
        if let Some(exit) = &st.finished {
            fields.push(("exit", exit.clone()));
        }
        if let Some(why) = st.weakness() {
            fields.push(("unprotected_why", why));
        }
        if let Some(lost) = st.own_health.lost() {
            fields.push(("host_lost", lost));
        }
        if let Some(why) = &st.went_live {
            fields.push(("went_live", why.clone()));
        }
        self.dir.write_status(st.generation, &fields);
    }

    /// The attached secondary went silent, broke the protocol, ended with the VM or is
    /// being fenced off: settle who is live, if that is in question.
    fn lose_secondary(&self, conn: u64, why: &str) {
        let mut st = self.lock();
        if st.attached != Some(conn) || st.halted.is_some() {
            return;
        }
        let may_be_eligible = st.may_be_eligible();
        st.attached = None;
        st.channel = None;
        if st.end_held {
            // It holds the end and never arbitrates: it ends the way this copy did.
            tracing::info!("secondary done ({why}); it ends with the VM");
        } else if !may_be_eligible {
            // It was never handed the release point or every event up to it, so it cannot be
            // eligible: it drops out and never claims a generation. No arbitration needed.
            if st.gated {
                tracing::warn!(
                    "secondary lost during catch-up ({why}) after {} of {} events: NOT PROTECTED",
                    st.sent,
                    st.release
                );
            } else {
                tracing::warn!(
                    "secondary lost during catch-up ({why}) after {} events, before it was \
                     gated: NOT PROTECTED",
                    st.sent
                );
            }
        } else {
            let next = st.generation + 1;
            match self
                .arbiter
                .claim(next, &format!("primary on {}", self.host))
            {
                Ok(Claim::Won) => {
                    st.generation = next;
                    tracing::warn!(
                        "secondary lost ({why}); won arbitration for generation {next}: live, NOT PROTECTED"
                    );
                }
                Ok(Claim::Lost(holder)) => {
                    st.halted = Some(format!(
                        "the other copy ({}) went live in generation {next}",
                        holder.trim()
                    ));
                }
                Err(e) => {
                    st.halted = Some(format!(
                        "{e}: a copy that cannot reach shared storage must not stay live"
                    ))
                }
            }
        }
        if st.halted.is_some()
            && let Some(h) = st.handover.take().filter(|h| h.sent)
        {
            // The secondary was told to take over and this copy may not go on: the switch
            // happened (the other copy holds the generation, or this one lost storage and
            // can never be live again).
            st.handed_over = Some(h.why);
        }
        if let Some(why) = &st.halted {
            tracing::error!("halting: {why}");
            // The VM's thread may be waiting for frames: wake it so that it stops.
            machine::request_stop();
        }
        self.status(&st);
        self.wake_sender(&st);
        self.wake_vm(&st);
        // Held outputs go now unless this copy halted: no acknowledgement will come.
        self.wake_releaser(&st);
    }
}

impl Shared {
    /// The VM's thread, at an event boundary with a planned switch asked for: pause until
    /// the secondary took over (then this copy halts: `Err`), or the switch was given up or
    /// the secondary lost and arbitration won (`Ok`: the VM goes on here).
    fn switch_over<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, LogError> {
        let at = st.end();
        let generation = st.generation;
        if let Some(h) = st.handover.as_mut() {
            h.at = Some(at);
        }
        let start = Instant::now();
        loop {
            if let Some(why) = &st.halted {
                return Err(LogError::Source(format!("halted: {why}")));
            }
            let Some(h) = st.handover.as_ref() else {
                return self.resume(st);
            };
            let sent = h.sent;
            if st.attached.is_none() {
                // The secondary was lost (and, if it could have gone live, arbitration kept
                // the VM here): the switch is off.
                tracing::warn!("planned switch given up: the secondary was lost");
                st.handover = None;
                return self.resume(st);
            }
            if sent {
                // The secondary claims the next generation on `Handover`.
                if self.arbiter.current().is_ok_and(|g| g > generation) {
                    let why = st.handover.take().map(|h| h.why).unwrap_or_default();
                    tracing::warn!(
                        "planned switch done after {at} events, the VM paused {} ms: the secondary is live ({why}); halting",
                        start.elapsed().as_millis()
                    );
                    st.handed_over = Some(why.clone());
                    st.halted = Some(format!("handed over to the secondary ({why})"));
                    self.wake_sender(&st);
                    self.wake_vm(&st);
                    return Err(LogError::Source(format!("handed over: {why}")));
                }
                if start.elapsed() > HANDOVER_WAIT + TAKEOVER_WAIT
                    && let Some(conn) = st.attached
                {
                    drop(st);
                    self.lose_secondary(conn, "it did not take over in time");
                    st = self.lock();
                    st.handover = None;
                    continue;
                }
            } else if st.acked >= at && (st.outputs_done() || st.write_failed.is_some()) {
                if let Some(h) = st.handover.as_mut()
                    && !h.ready
                {
                    h.ready = true;
                    self.wake_sender(&st);
                }
            } else if start.elapsed() > HANDOVER_WAIT {
                tracing::warn!(
                    "planned switch given up: the secondary did not hold event {at} within {} s",
                    HANDOVER_WAIT.as_secs()
                );
                st.handover = None;
                return self.resume(st);
            }
            st = self.wait_vm(st, 0, true, Some(Duration::from_millis(5)));
        }
    }

    /// A planned switch is off and the VM goes on here, unless a write behind failed: then
    /// nothing can leave from here any more, and this copy halts.
    fn resume<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, LogError> {
        if st.write_failed.is_some() {
            halt_on_write_failure(self, &mut st);
        }
        match &st.halted {
            Some(why) => Err(LogError::Source(format!("halted: {why}"))),
            None => Ok(st),
        }
    }

    fn new(
        dir: VmDir,
        key: [u8; 32],
        header: LogHeader,
        base: u64,
        console: bool,
        config: FtConfig,
    ) -> Arc<Shared> {
        let arbiter = Arbiter::new(&dir.arbitration());
        Arc::new(Shared {
            state: Mutex::new(State {
                header,
                history: Vec::new(),
                base,
                history_bytes: 0,
                checkpoint: None,
                standby: false,
                promoted: false,
                went_live: None,
                history_warned: false,
                checkpoint_due: false,
                own_asked: None,
                end: None,
                acked: 0,
                executed: 0,
                attached: None,
                gated: false,
                release: 0,
                release_sent: false,
                release_held: false,
                catch_up_mark: 0,
                catch_up_rounds: 0,
                sent: 0,
                unsent_bytes: 0,
                output_waits_since: None,
                channel: None,
                flush_due: false,
                frames: 0,
                frames_from_vm: 0,
                acks: 0,
                end_held: false,
                intent: None,
                intent_held: None,
                next_conn: 1,
                generation: 0,
                halted: None,
                handover: None,
                handed_over: None,
                own_health: Default::default(),
                peer_health: Default::default(),
                health_handover: false,
                declined_at: None,
                held: VecDeque::new(),
                unwritten: VecDeque::new(),
                unwritten_bytes: 0,
                writes_waiting: 0,
                writes_behind: 0,
                writes_by_releaser: 0,
                slow_write_at: None,
                write_failed: None,
                held_total: 0,
                released: 0,
                finished: None,
                senders_waiting: 0,
                vm_waiting: 0,
                vm_target: 0,
                outputs_waiting: 0,
                releaser_waiting: false,
                releasing: false,
                log_bytes: 0,
                disk_read_bytes: 0,
                net_in_bytes: 0,
                status_at: Instant::now(),
            }),
            events: Condvar::new(),
            vm: Condvar::new(),
            releaser: Condvar::new(),
            config,
            key,
            dir,
            arbiter,
            tap: OnceLock::new(),
            monitor: OnceLock::new(),
            console,
            host: hostname(),
        })
    }
}

/// Go live in `generation`: start the releaser and, given a listener, accept secondaries.
fn launch(
    shared: &Arc<Shared>,
    generation: u64,
    listener: Option<TcpListener>,
) -> Result<Option<SocketAddr>, FtError> {
    shared.lock().generation = generation;
    shared.status(&shared.lock());
    let s = shared.clone();
    std::thread::Builder::new()
        .name("ft-release".into())
        .spawn(move || release(s))
        .map_err(io_err("start the releaser"))?;
    let Some(listener) = listener else {
        tracing::warn!(
            "primary live in generation {generation}; no logging channel: NOT PROTECTABLE"
        );
        return Ok(None);
    };
    let local = listener
        .local_addr()
        .map_err(io_err("read the listening address"))?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("ft-listen".into())
        .spawn(move || listen(s, listener))
        .map_err(io_err("start the listener"))?;
    tracing::info!("primary live in generation {generation}; logging channel on {local}");
    Ok(Some(local))
}

/// A running primary (a handle: clones are the same primary). Dropping it does not stop
/// its threads; they end with the process.
#[derive(Clone)]
pub struct Primary {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
}

impl Primary {
    /// Claim the next generation, create the pair key and listen for a secondary on `addr`.
    /// The VM powers on: checkpoints of an earlier life of it are removed.
    pub fn start(
        dir: VmDir,
        addr: &str,
        header: LogHeader,
        tap: Option<Arc<devices::Tap>>,
        console: bool,
        config: FtConfig,
    ) -> Result<Primary, FtError> {
        let key = dir.create_key()?;
        let arbiter = Arbiter::new(&dir.arbitration());
        let generation = arbiter.current()? + 1;
        let host = hostname();
        if arbiter.claim(generation, &format!("primary on {host}"))? != Claim::Won {
            return Err(FtError::Protocol(format!(
                "another copy claimed generation {generation} first"
            )));
        }
        // Won: the VM powers on here, and checkpoints of an earlier life of it go.
        crate::checkpoint::Checkpoints::new(&dir).clear()?;
        let listener = TcpListener::bind(addr).map_err(io_err(format!("listen on {addr}")))?;
        let shared = Shared::new(dir, key, header, 0, console, config);
        if let Some(tap) = tap {
            let _ = shared.tap.set(tap);
        }
        let addr = launch(&shared, generation, Some(listener))?;
        Ok(Primary {
            shared,
            addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        })
    }

    /// A secondary's primary-to-be: it keeps the events the secondary replays from
    /// position `base` on ([`Primary::retain`]), so that once this copy goes live
    /// ([`Primary::activate`]) a newcomer can join it from the latest checkpoint.
    pub fn standby(
        dir: VmDir,
        header: LogHeader,
        base: u64,
        console: bool,
        config: FtConfig,
    ) -> Result<Primary, FtError> {
        let key = dir.read_key()?;
        let shared = Shared::new(dir, key, header, base, console, config);
        shared.lock().standby = true;
        Ok(Primary {
            shared,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        })
    }

    /// A standby copy keeps an event it replayed (its data shared with the replay's, not
    /// copied: see `machine::event::Bytes`).
    pub fn retain(&self, event: &Event) {
        let mut st = self.shared.lock();
        if st.standby && st.end() == event.seq {
            st.push(Arc::new(event.clone()));
        }
    }

    /// This (standby) copy won `generation` and went live with its NIC on `tap`: from
    /// now on it is the primary, accepting a secondary on `addr` (if given). A copy that
    /// cannot listen stays live, unprotectable, and says so.
    pub fn activate(
        &self,
        generation: u64,
        why: Option<String>,
        tap: Option<Arc<devices::Tap>>,
        addr: Option<&str>,
    ) {
        if let Some(tap) = tap {
            let _ = self.shared.tap.set(tap);
        }
        let listener = addr.and_then(|a| match TcpListener::bind(a) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(
                    "cannot listen for a secondary on {a}: {e}; the VM stays live, NOT PROTECTED"
                );
                None
            }
        });
        // The standby's whole history, freed once the listener is up (this is the VM's
        // thread, going live).
        let forgotten;
        {
            let mut st = self.shared.lock();
            st.standby = false;
            st.promoted = true;
            st.went_live = why;
            // Going live changed the VM outside any event (the NIC announced, unacknowledged
            // data sent again): a replay of the history across this point would diverge.
            // So the history starts here, a newcomer joins from a checkpoint taken after
            // it, and that checkpoint is taken at once.
            let end = st.end();
            forgotten = st.drop_before(end);
            st.checkpoint_due = true;
        }
        if let Err(e) = launch(&self.shared, generation, listener) {
            tracing::error!("{e}; the VM stays live, NOT PROTECTED");
        }
        drop(forgotten);
    }

    /// A checkpoint holds the VM at `position`: the events before it are dropped (but
    /// never those an attached secondary has yet to receive).
    pub fn checkpointed(&self, position: u64) {
        let mut st = self.shared.lock();
        if st.halted.is_some() {
            return;
        }
        st.checkpoint = Some(st.checkpoint.map_or(position, |c| c.max(position)));
        let forgotten = st.drop_before(position);
        st.own_asked = None;
        self.shared.wake_vm(&st);
        if position >= st.base {
            st.checkpoint_due = false;
        }
        self.shared.status(&st);
        drop(st);
        drop(forgotten);
    }

    /// What [`Primary::to_checkpoint`] says, and whether the checkpoint is due at once
    /// (this copy just went live: no newcomer can join it before).
    ///
    /// Called by this copy's checkpointer: one that sees the history past its bound takes a
    /// checkpoint (the bound is at least the checkpoint interval), which a VM waiting for it
    /// learns here.
    pub fn to_checkpoint_kept(&self) -> Option<crate::checkpoint::Kept> {
        let (due, generation) = {
            let mut st = self.shared.lock();
            if st.attached.is_none()
                && st.halted.is_none()
                && st.own_asked.is_none()
                && st.history_bytes > self.shared.config.max_history_bytes
            {
                st.own_asked = Some(st.end());
                self.shared.wake_vm(&st);
            }
            (st.checkpoint_due, st.generation)
        };
        self.to_checkpoint().map(|bytes| crate::checkpoint::Kept {
            bytes,
            live: true,
            due,
            generation,
        })
    }

    /// What the kept history weighs, if this copy is to take the next checkpoint: not
    /// while a secondary is attached (it takes them: a primary never pauses for one while
    /// protected), and never once this copy halted (its state is not the VM's).
    pub fn to_checkpoint(&self) -> Option<u64> {
        let st = self.shared.lock();
        (st.attached.is_none() && st.halted.is_none()).then_some(st.history_bytes)
    }

    /// What the kept history weighs (a standby's: what its secondary replayed since the
    /// latest checkpoint).
    pub fn history_bytes(&self) -> u64 {
        self.shared.lock().history_bytes
    }

    pub fn sink(&self) -> PrimarySink {
        PrimarySink(self.shared.clone())
    }

    pub fn port(&self) -> GatedPort {
        GatedPort(self.shared.clone())
    }

    /// Outputs held and then written under the output rule so far.
    pub fn released(&self) -> u64 {
        self.shared.lock().released
    }

    /// Why the primary halted, if it did (a copy that handed over halted too).
    pub fn halted(&self) -> Option<String> {
        self.shared.lock().halted.clone()
    }

    /// Watch this host's health: while live, losing a path (storage, VM network) that the
    /// secondary's host has hands the VM over to it (if `handover`), and the VM is reported
    /// not protected while the secondary's host lacks one. A loss on both sides changes
    /// nothing: the VM stays, and its guest sees what it would natively.
    pub fn watch_health(&self, monitor: crate::health::Monitor, handover: bool) {
        let _ = self.shared.monitor.set(monitor.clone());
        self.shared.lock().health_handover = handover;
        let p = self.clone();
        let spawned = std::thread::Builder::new()
            .name("ft-health-watch".into())
            .spawn(move || {
                let mut tried: Option<Instant> = None;
                let mut both_said = false;
                let mut own = crate::health::HostHealth::default();
                loop {
                    // While this host lacks nothing there is nothing to do until that
                    // changes (looked at every second, to end with the copy); while it
                    // lacks a path, the secondary's reports and the retry's clock decide,
                    // so look every tick.
                    own = if own.ok() {
                        monitor.wait_change(&own, HEALTH_IDLE_LOOK)
                    } else {
                        std::thread::sleep(HEALTH_LOOK);
                        monitor.current()
                    };
                    let (ask, both) = {
                        let mut st = p.shared.lock();
                        if st.halted.is_some() {
                            return;
                        }
                        if st.standby {
                            continue;
                        }
                        if own != st.own_health {
                            st.own_health = own.clone();
                            p.shared.status(&st);
                        }
                        // Only to a host at least as healthy on every path, which has
                        // what this one lost (by its latest report; it looks again when
                        // asked, and declines if it lacks a path now).
                        let better = st.peer_health.better_than(&own);
                        let ask = handover
                            && st.protected()
                            && st.handover.is_none()
                            && better
                            && !st.declined_lately()
                            && tried.is_none_or(|t| t.elapsed() > Duration::from_secs(1));
                        let peer = st.peer_health.lost();
                        (
                            ask,
                            (!own.ok() && st.attached.is_some() && !better).then_some(peer),
                        )
                    };
                    if let Some(peer) = &both
                        && !both_said
                    {
                        tracing::error!(
                            "this host lost {} and the secondary's host is no better off \
                             (it lost {}): the VM stays here",
                            own.lost().unwrap_or_default(),
                            peer.as_deref().unwrap_or("nothing")
                        );
                    }
                    both_said = both.is_some();
                    if ask {
                        tried = Some(Instant::now());
                        let why = format!("primary lost {}", own.lost().unwrap_or_default());
                        if let Err(e) = p.hand_over(&why) {
                            tracing::warn!("handover for {why}: {e}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot watch this host's health: {e}");
        }
    }

    /// Why this copy handed the VM over to its secondary, if it did.
    pub fn handed_over(&self) -> Option<String> {
        self.shared.lock().handed_over.clone()
    }

    /// Hand the VM over to the secondary (a planned switch): at its next event boundary the
    /// VM pauses before the event's result reaches the guest; once the secondary holds every
    /// event and every held output was written, the secondary goes live there and this copy
    /// halts ([`Primary::handed_over`]). Refused unless the VM is protected. If the switch
    /// cannot be completed within [`HANDOVER_WAIT`] it is given up and the VM goes on here.
    pub fn hand_over(&self, why: &str) -> Result<(), FtError> {
        {
            let mut st = self.shared.lock();
            if st.standby || st.halted.is_some() {
                return Err(FtError::Protocol("this copy is not the live one".into()));
            }
            if !st.protected() {
                return Err(FtError::Protocol(
                    "the VM is not protected: no secondary could take it over".into(),
                ));
            }
            if st.handover.is_some() {
                return Ok(());
            }
            tracing::warn!("planned switch ({why}): pausing the VM at its next event");
            st.handover = Some(Handover {
                why: why.to_string(),
                at: None,
                ready: false,
                sent: false,
            });
        }
        // An idle VM waiting for the network takes its next event now.
        machine::host::wake_waits();
        Ok(())
    }

    /// Whether the VM is protected: a secondary is attached and eligible to go live.
    pub fn protected(&self) -> bool {
        self.shared.lock().protected()
    }

    /// The run ended (the sink's end is recorded): end the VM on both copies the same way.
    ///
    /// Waits until the attached secondary confirmed it holds every event and the end (it
    /// then replays to the same end and never arbitrates) and every held output was
    /// written. If the secondary does not confirm within `FtConfig::end_wait`, it is fenced
    /// off: dropped like a lost secondary, which claims the next generation when it could
    /// be eligible, so that it can never go live after this copy's end. Afterwards
    /// [`Primary::halted`] says whether this copy lost that claim (its outputs then stay
    /// unwritten, as they must).
    pub fn finish(&self) {
        let s = &self.shared;
        let start = Instant::now();
        let wait = s.config.end_wait;
        let mut st = s.lock();
        loop {
            if st.write_failed.is_some() {
                // The secondary was sent no end: it takes over and writes it again.
                halt_on_write_failure(s, &mut st);
            }
            if st.halted.is_some() {
                return;
            }
            let secondary_done = st.attached.is_none() || st.end_held;
            let outputs_done = st.outputs_done();
            if secondary_done && outputs_done {
                break;
            }
            if !secondary_done
                && start.elapsed() >= wait
                && let Some(conn) = st.attached
            {
                drop(st);
                s.lose_secondary(conn, "it did not confirm the end in time");
                st = s.lock();
                continue;
            }
            // Frames may be given up on (TCP sends them again), writes never: the guest
            // was told they were done.
            if secondary_done && start.elapsed() >= wait * 2 && st.unwritten.is_empty() {
                tracing::error!("held outputs still unwritten at the end; giving up on them");
                break;
            }
            st = s.wait_vm(st, 0, true, Some(s.config.heartbeat));
        }
        st.finished = Some(
            st.end
                .as_ref()
                .map_or_else(|| "unknown".to_string(), |e| e.exit.to_string()),
        );
        s.status(&st);
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
        + &format!("/{}", std::process::id())
}

/// The VM's events go into the primary's history and out to the secondary.
pub struct PrimarySink(Arc<Shared>);

impl EventSink for PrimarySink {
    fn append(&mut self, event: Event) -> Result<(), LogError> {
        let event = Arc::new(event);
        let s = &self.0;
        let mut st = s.lock();
        if let Some(why) = &st.halted {
            return Err(LogError::Source(format!("halted: {why}")));
        }
        use machine::event::{Kind, Outcome};
        match (&event.kind, &event.outcome) {
            (Kind::FdRead | Kind::FdPread, Outcome::Data(d)) => {
                st.disk_read_bytes += d.len() as u64
            }
            (_, Outcome::Net { frames, .. }) => {
                st.net_in_bytes += frames.iter().map(|f| f.len() as u64).sum::<u64>()
            }
            _ => {}
        }
        if st.end() != event.seq {
            return Err(LogError::Source(format!(
                "event {} out of order: the history ends at {}",
                event.seq,
                st.end()
            )));
        }
        st.push(event);
        if st.attached.is_none() && st.status_at.elapsed() > Duration::from_millis(250) {
            st.status_at = Instant::now();
            s.status(&st);
        }
        // A sender busy sending takes this event along when it looks again; a waiting one
        // is woken for it only when it is due.
        if st.send_due() {
            s.wake_sender(&st);
        }
        if st.handover.is_some() {
            st = s.switch_over(st)?;
        }
        // Bounded lag: a secondary that trails too far slows the primary down.
        while st.attached.is_some()
            && st.halted.is_none()
            && st.end() > st.executed + s.config.max_lag_events
        {
            st = s.wait_vm(st, 0, false, None);
        }
        // Bounded history: past its bound, wait for the secondary's next checkpoint, but
        // only while it has events left to replay: a secondary that took them all waits
        // inside a call for the next one, where it has no snapshot point to take a
        // checkpoint at.
        let deadline = Instant::now() + crate::HISTORY_WAIT;
        st = s.wait_for_checkpoint(st, deadline, "no checkpoint from the secondary", |st| {
            st.attached.is_some() && st.executed < st.end()
        });
        // Without a secondary this copy takes its own checkpoints, and bounds its history
        // the same way. A checkpoint is taken at a snapshot point, the start of an event,
        // never while the VM waits here: past the bound the VM waits until its checkpointer
        // asks for one (and then goes on to that point), and once it passed a point since
        // (the checkpoint is being written), until the checkpoint is in place. Otherwise a
        // VM taking large events quickly keeps many of them in the time a checkpoint takes.
        let _st = s.wait_for_checkpoint(st, deadline, "no checkpoint", |st| {
            st.attached.is_none() && !st.standby && st.own_asked.is_none_or(|at| st.end() > at)
        });
        Ok(())
    }

    fn finish(self: Box<Self>, end: &End) -> Result<(), LogError> {
        let mut st = self.0.lock();
        st.end = Some(end.clone());
        self.0.wake_sender(&st);
        Ok(())
    }
}

/// Outputs held to the output rule.
pub struct GatedPort(Arc<Shared>);

impl GatedPort {
    /// Hold a frame or console output (a write behind goes through
    /// [`OutputPort::write_behind`]).
    fn hold(&mut self, position: u64, out: Held) {
        let s = &self.0;
        let st = s.lock();
        if st.halted.is_some() {
            return;
        }
        if !st.gates() && st.outputs_done() {
            // No secondary, or one still catching up, and no earlier output on its way:
            // unprotected, the output goes at once (only a disk write can fail).
            drop(st);
            let _ = send(s, &out);
            return;
        }
        self.push(st, position, out);
    }

    /// Add an output to the held ones and write those that may leave now (a write behind
    /// only if quick, [`QUICK_WRITE_BYTES`]).
    fn push(&self, mut st: MutexGuard<'_, State>, position: u64, out: Held) {
        let s = &self.0;
        st.held.push_back((position, out));
        st.held_total += 1;
        if st.output_waits_since.is_none() {
            if position > st.sent {
                st.output_waits_since = Some(Instant::now());
            }
        } else if st.send_due() {
            s.wake_sender(&st);
        }
        // Already acknowledged (or not gated): written here, after those before it, rather
        // than by waking another thread for it.
        let due = st.release_due();
        drop(st);
        if due {
            release_outputs(s, false);
        }
    }
}

/// Write one output. `Err`: a write the guest was told was done failed.
fn send(s: &Shared, out: &Held) -> Result<(), String> {
    match out {
        Held::Frame(f) => {
            if let Some(tap) = s.tap.get() {
                send_frame(tap, f);
            }
        }
        Held::Console(fd, d) => {
            if s.console {
                write_console(*fd, d);
            }
        }
        Held::Disk(w) => {
            return w
                .perform()
                .map_err(|e| format!("a write of {} bytes to the datastore failed: {e}", w.len()));
        }
    }
    Ok(())
}

/// A write behind failed here (it and every output after it stay held: none may leave
/// before it). Storage lost on this host, and a secondary whose host has it: the VM is
/// handed over, and the secondary writes it again as it goes live. Otherwise this copy
/// halts ([`halt_on_write_failure`]).
fn after_write_failure(s: &Shared, why: String) {
    // An I/O error that storage does not confirm is not a lost path.
    let own = s.storage_lost_now();
    let mut st = s.lock();
    if st.halted.is_some() {
        return;
    }
    // After the run's end no VM thread is left to pause for a handover: the secondary
    // (which was sent no end) takes over, writes it again and ends as the guest did.
    if let Some(own) = own.filter(|_| st.end.is_none())
        && st.hand_over_for_storage(&own).is_ok()
    {
        tracing::error!(
            "{why}: storage lost here ({}); handing over: the secondary writes it again",
            own.storage.as_deref().unwrap_or_default()
        );
        s.wake_vm(&st);
        drop(st);
        // An idle VM waiting for the network takes its next event now.
        machine::host::wake_waits();
        return;
    }
    halt_on_write_failure(s, &mut st);
}

/// A write behind failed and the VM cannot be handed over: nothing more leaves from here,
/// ever (an output after it may tell a client it was done), and the VM stops. The logging
/// channel is closed: the secondary, which holds the write's event or goes live before
/// it, claims the next generation (this copy never does) and writes it again as it goes
/// live (if it cannot either, it stops there too).
fn halt_on_write_failure(s: &Shared, st: &mut State) {
    let why = st
        .write_failed
        .clone()
        .unwrap_or_else(|| "a write behind failed".into());
    tracing::error!("halting: {why}; a secondary going live writes it again");
    if st.halted.is_none() {
        st.halted = Some(why);
    }
    // Its sender and receiver see this and close the connection.
    st.attached = None;
    st.channel = None;
    machine::request_stop();
    s.wake_vm(st);
    s.wake_sender(st);
}

impl OutputPort for GatedPort {
    fn frame(&mut self, position: u64, frame: &[u8]) {
        self.hold(position, Held::Frame(frame.to_vec()));
    }

    fn console(&mut self, position: u64, fd: u32, data: &[u8]) {
        self.hold(position, Held::Console(fd, data.to_vec()));
    }

    /// Only while a secondary is gated (then the write would wait for the output rule),
    /// both hosts reach storage (with it lost on either, a failed write could be written
    /// again by neither copy: the guest gets its error as natively), and the writes not
    /// yet performed weigh less than [`BEHIND_BYTES`]. Unprotected, a write is performed
    /// before the guest gets its outcome.
    fn defers_writes(&self) -> bool {
        let st = self.0.lock();
        self.0.config.write_behind
            && st.gates()
            && st.halted.is_none()
            && st.handover.is_none()
            && st.unwritten_bytes < BEHIND_BYTES
            && st.own_health.storage.is_none()
            && st.peer_health.storage.is_none()
    }

    fn write_behind(
        &mut self,
        position: u64,
        write: DiskWrite,
    ) -> Result<Option<DiskWrite>, LogError> {
        let mut st = self.0.lock();
        if let Some(why) = &st.halted {
            return Err(LogError::Source(format!("halted: {why}")));
        }
        if !st.gates() {
            // The secondary went meanwhile (or is not gated yet): the write is done now,
            // after the held ones (the caller settles first), and the guest gets its true
            // outcome.
            return Ok(Some(write));
        }
        st.unwritten.push_back(position);
        st.unwritten_bytes += write.len() as u64;
        st.writes_behind += 1;
        self.push(st, position, Held::Disk(write));
        Ok(None)
    }

    fn settle_writes(&mut self) -> Result<(), LogError> {
        let s = &self.0;
        let mut st = s.lock();
        loop {
            if let Some(why) = &st.halted {
                return Err(LogError::Source(format!("halted: {why}")));
            }
            if st.unwritten.is_empty() {
                // The operation may take a while (slow storage, a sync): outputs waiting
                // for events not sent must not wait for it too.
                if st.output_waits_since.is_some() {
                    s.send_now(&st);
                }
                return Ok(());
            }
            if st.handover.is_some() {
                // A planned switch (a failed write behind's, say) pauses the VM here.
                st = s.switch_over(st)?;
                continue;
            }
            st.writes_waiting += 1;
            st = s.wait_vm(st, 0, false, None);
            st.writes_waiting -= 1;
        }
    }

    fn replicates(&self) -> bool {
        true
    }

    fn idle(&mut self) {
        self.0.send_from_vm(self.0.lock());
    }

    fn before_uncertain(&mut self, intent: &Intent) -> Result<(), LogError> {
        let s = &self.0;
        let mut st = s.lock();
        st.intent = Some(intent.clone());
        s.wake_sender(&st);
        loop {
            if let Some(why) = &st.halted {
                return Err(LogError::Source(format!("halted: {why}")));
            }
            // Held by the secondary (which holds every event before it too, the channel
            // being in order), or no secondary that could go live here (none, or one still
            // catching up: it is not gated before this operation's event is in the history).
            if !st.gates() || st.intent_held == Some(intent.seq) {
                return Ok(());
            }
            st = s.wait_vm(st, 0, false, None);
        }
    }

    fn storage_failed(&mut self, position: u64) -> Result<(), LogError> {
        let s = &self.0;
        // An I/O error that storage does not confirm is the guest's to see.
        let Some(own) = s.storage_lost_now() else {
            return Ok(());
        };
        let lost = own.storage.clone().unwrap_or_default();
        let mut st = s.lock();
        if let Some(h) = &st.halted {
            return Err(LogError::Source(format!("halted: {h}")));
        }
        match st.hand_over_for_storage(&own) {
            Err(why_not) => {
                tracing::error!(
                    "event {position}: storage lost here ({lost}) and {why_not}: the guest gets the error"
                );
                return Ok(());
            }
            Ok(true) => tracing::error!(
                "event {position}: storage lost here ({lost}); handing over before the guest sees the error"
            ),
            Ok(false) => {}
        }
        s.switch_over(st).map(drop)
    }

    fn before_disk(&mut self, position: u64) -> Result<(), LogError> {
        let s = &self.0;
        let mut st = s.lock();
        loop {
            if let Some(why) = &st.halted {
                return Err(LogError::Source(format!("halted: {why}")));
            }
            if !st.gates() || st.acked >= position {
                return Ok(());
            }
            st = s.wait_vm(st, position, false, None);
        }
    }
}

/// Write the held outputs the rule allows now, in the order they were produced. Whoever
/// learns that they may leave calls this: the receiver on an acknowledgement, the VM's
/// thread for an output already acknowledged, the releaser (`releaser`) for outputs no
/// acknowledgement releases and for writes behind the others leave to it (storage can be
/// slow: they perform only quick ones, [`QUICK_WRITE_BYTES`]). One thread at a time pops
/// and writes (`State::releasing`); one that finds another at it leaves its outputs to it,
/// which looks again before it stops, so that no thread ever waits for another's writes.
fn release_outputs(s: &Shared, releaser: bool) {
    let mut st = s.lock();
    if st.releasing {
        return;
    }
    st.releasing = true;
    loop {
        let mut batch = Vec::new();
        let mut quick_bytes = 0;
        while st.release_due() {
            if let Some((position, Held::Disk(w))) = st.held.front()
                && !releaser
            {
                let bytes = quick_bytes + w.len() as u64;
                if !st.quick_write(*position, bytes) {
                    // It, and what follows it, are the releaser's (woken below).
                    break;
                }
                quick_bytes = bytes;
            }
            if let Some(held) = st.held.pop_front() {
                batch.push(held);
            }
        }
        if batch.is_empty() {
            break;
        }
        drop(st);
        let (mut done, mut written, mut written_bytes) = (0u64, 0usize, 0u64);
        let mut slow = false;
        let mut failed = None;
        let mut rest = Vec::new();
        let mut batch = batch.into_iter();
        while let Some((position, out)) = batch.next() {
            let disk = matches!(out, Held::Disk(_));
            let outcome = if disk && s.lock().halted.is_some() {
                // Lost arbitration while writing this batch: the other copy is live and
                // writes; a write from here could land over its newer data.
                Err(String::new())
            } else {
                if disk && machine::failpoint::dies_before_write_behind() {
                    die_once_held(s, position);
                }
                let timer = disk.then(WriteTimer::start);
                let outcome = send(s, &out);
                slow |= timer.is_some_and(|t| t.slept_long());
                outcome
            };
            if let Err(why) = outcome {
                // It and what follows it stay held, in order.
                rest.push((position, out));
                rest.extend(batch.by_ref());
                failed = Some(why);
                break;
            }
            done += 1;
            if let Held::Disk(w) = &out {
                written += 1;
                written_bytes += w.len() as u64;
            }
        }
        st = s.lock();
        if slow {
            st.slow_write_at = Some(Instant::now());
        }
        if releaser {
            st.writes_by_releaser += written as u64;
        }
        let written = written.min(st.unwritten.len());
        st.unwritten.drain(..written);
        st.unwritten_bytes = st.unwritten_bytes.saturating_sub(written_bytes);
        for held in rest.into_iter().rev() {
            st.held.push_front(held);
        }
        if st.writes_waiting > 0 && st.unwritten.is_empty() {
            s.vm.notify_all();
        }
        // Counted once written, so that the end waits for the writes themselves.
        st.released += done;
        if let Some(why) = failed {
            if st.halted.is_none() && st.write_failed.is_none() {
                st.write_failed = Some(why.clone());
                st.releasing = false;
                drop(st);
                after_write_failure(s, why);
                st = s.lock();
                st.releasing = true;
            }
            break;
        }
    }
    st.releasing = false;
    if st.outputs_waiting > 0 && st.outputs_done() {
        s.vm.notify_all();
    }
    if st.unwritten.is_empty() && st.end.is_some() {
        // The end waits for the writes behind.
        s.wake_sender(&st);
    }
    // Writes left to it.
    s.wake_releaser(&st);
}

/// Times a write behind on its thread: whether it took [`SLOW_WRITE`] or more and slept
/// meanwhile (waited for storage), not only was preempted.
struct WriteTimer {
    at: Instant,
    sleeps: Option<i64>,
}

impl WriteTimer {
    fn start() -> Self {
        WriteTimer {
            at: Instant::now(),
            sleeps: thread_sleeps(),
        }
    }

    fn slept_long(&self) -> bool {
        self.at.elapsed() >= SLOW_WRITE
            && match (self.sleeps, thread_sleeps()) {
                (Some(before), Some(after)) => after > before,
                // Unknown: taken for a sleep, so that a slow write is never taken for a
                // quick one.
                _ => true,
            }
    }
}

/// How many times the calling thread slept (voluntary context switches).
fn thread_sleeps() -> Option<i64> {
    // SAFETY: `rusage` is plain integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only into the `rusage` it is given, which outlives the call;
    // RUSAGE_THREAD names the calling thread.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (rc == 0).then_some(usage.ru_nvcsw)
}

/// The failpoint `die-before-write-behind`: die once the secondary acknowledged holding the
/// write's event at `position` (waiting at most 5 s: a test reads "never held" as a
/// failure of its setup).
fn die_once_held(s: &Shared, position: u64) -> ! {
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.lock().acked <= position {
        if Instant::now() > deadline {
            machine::failpoint::die(&format!(
                "before the write of event {position}, which the secondary never held"
            ))
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    machine::failpoint::die(&format!(
        "before the write of event {position}, which the secondary holds"
    ))
}

/// The releaser: writes held outputs that no acknowledgement releases (the secondary lost,
/// or attached anew and not gated, while outputs were held). It waits on its own
/// condition variable, woken only when there is such work.
fn release(s: Arc<Shared>) {
    loop {
        {
            let mut st = s.lock();
            // Outputs another thread is releasing are its to write (it looks again
            // before it stops): waiting for them here would spin.
            while !st.release_due() || st.releasing {
                st.releaser_waiting = true;
                st = s.releaser.wait(st).unwrap_or_else(|p| p.into_inner());
                st.releaser_waiting = false;
            }
        }
        release_outputs(&s, true);
    }
}

fn listen(s: Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let s = s.clone();
        let _ = std::thread::Builder::new()
            .name("ft-conn".into())
            .spawn(move || {
                if let Err(e) = serve(&s, stream) {
                    tracing::warn!("logging channel from {peer} closed: {e}");
                }
            });
    }
}

/// One connection: authenticate the secondary, then stream to it and listen to it.
fn serve(s: &Arc<Shared>, stream: TcpStream) -> Result<(), FtError> {
    let _ = stream.set_nodelay(true);
    let mut nonce = [0u8; 16];
    let mut urandom = std::fs::File::open("/dev/urandom").map_err(io_err("open /dev/urandom"))?;
    std::io::Read::read_exact(&mut urandom, &mut nonce).map_err(io_err("read /dev/urandom"))?;
    std::io::Write::write_all(&mut &stream, &nonce).map_err(io_err("send the nonce"))?;
    let key = connection_key(&s.key, &nonce);
    stream
        .set_read_timeout(Some(s.config.timeout))
        .map_err(io_err("set a timeout"))?;
    let mut reader = FrameReader::new(stream.try_clone().map_err(io_err("clone the stream"))?, key);
    let refuse = |why: &str| {
        // Say why, so that the newcomer does not take it for a lost primary. (A tandem of
        // another protocol version refuses this frame in turn, naming this version.)
        if let Ok(out) = stream.try_clone() {
            let mut w = FrameWriter::new(out, key);
            let _ = w.send(KIND_MSG, &encode(&ToSecondary::Refused(why.to_string())));
        }
    };
    let hello = match reader.recv() {
        Ok((_, hello)) => hello,
        Err(e @ crate::wire::FrameError::Version(_)) => {
            refuse(&e.to_string());
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let ToPrimary::Hello { host, from } = decode(&hello)? else {
        return Err(FtError::Protocol("expected Hello".into()));
    };
    let attached = attach(s, &host, from);
    let (conn, gated) = match attached {
        Ok(a) => a,
        Err(e) => {
            refuse(&e.to_string());
            return Err(e);
        }
    };
    match gated {
        Some(release) => tracing::info!(
            "secondary {host} attached from event {from}; release point {release}: streaming the history"
        ),
        None => tracing::info!(
            "secondary {host} attached from event {from}: streaming the history, outputs not held until it nearly caught up"
        ),
    }
    let writer = FrameWriter::new(
        Outbox::new(stream.try_clone().map_err(io_err("clone the stream"))?),
        key,
    );
    let writer: Channel = Arc::new(Mutex::new(writer));
    {
        let mut st = s.lock();
        if st.attached == Some(conn) {
            st.channel = Some(writer.clone());
        }
    }
    let sender_shared = s.clone();
    let _ = std::thread::Builder::new()
        .name("ft-send".into())
        .spawn(move || {
            if let Err(e) = stream_to(&sender_shared, conn, writer) {
                sender_shared.lose_secondary(conn, &e.to_string());
            }
        });
    let mut reader = crate::detector::Watched::new(reader, &s.config.primary_side());
    let result = receive_from(s, conn, &mut reader, &host);
    let why = match &result {
        Ok(()) => "the channel closed".to_string(),
        Err(e) => e.to_string(),
    };
    s.lose_secondary(conn, &why);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}

/// How a primary refuses a newcomer while it has a secondary: the newcomer asks again
/// (the one attached may be on its way out).
pub(crate) const ATTACHED_ALREADY: &str = "a secondary is attached already";

/// Attach the secondary `host` starting at event `from`, if this copy can serve it: its
/// connection number and, if it is near enough the end to be gated at once, its release
/// point.
fn attach(s: &Shared, host: &str, from: u64) -> Result<(u64, Option<u64>), FtError> {
    let mut st = s.lock();
    if st.halted.is_some() {
        return Err(FtError::Protocol("this copy has halted".into()));
    }
    if st.standby {
        return Err(FtError::Protocol("this copy is not live".into()));
    }
    // A newcomer starts from a checkpoint (or power-on) and replays what follows it:
    // this copy must still hold every event from there.
    if from < st.base || from > st.end() {
        return Err(FtError::Protocol(format!(
            "{host} starts at event {from}, but this copy holds events {} to {}: start \
             from the latest checkpoint",
            st.base,
            st.end()
        )));
    }
    if st.end.is_some() {
        return Err(FtError::Protocol("the VM has ended".into()));
    }
    if st.attached.is_some() {
        return Err(FtError::Protocol(format!(
            "{ATTACHED_ALREADY}; refusing {host}"
        )));
    }
    let conn = st.next_conn;
    st.next_conn += 1;
    st.attached = Some(conn);
    st.acked = from;
    st.executed = from;
    st.sent = from;
    // What a connection before it left unsent is this one's to send from the start.
    st.output_waits_since = None;
    st.unsent_bytes = 0;
    st.channel = None;
    st.flush_due = false;
    st.end_held = false;
    st.intent_held = None;
    // A new secondary's host says what it reaches once it runs.
    st.peer_health = Default::default();
    // It catches up ungated: outputs go at once meanwhile, and it cannot go live. The
    // release point is chosen when it is gated (at once if it starts near the end).
    st.gated = false;
    st.release = 0;
    st.release_sent = false;
    st.release_held = false;
    st.catch_up_mark = st.end();
    st.catch_up_rounds = 0;
    // The secondary takes the checkpoints now: one this copy asked for will not count, and
    // a VM waiting for it (the history past its bound) waits for the secondary instead.
    st.own_asked = None;
    s.wake_vm(&st);
    let gated = st.gate_if_near().then_some(st.release);
    s.wake_releaser(&st);
    s.status(&st);
    Ok((conn, gated))
}

/// Serialises exactly as `ToSecondary::Events`, from the history's shared events.
pub(crate) struct EventsRef<'a>(pub(crate) &'a [Arc<Event>]);

/// The events of an [`EventsRef`], as the sequence `Vec<Event>` serialises as.
struct EventSeq<'a>(&'a [Arc<Event>]);

impl serde::Serialize for EventsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant("ToSecondary", 1, "Events", &EventSeq(self.0))
    }
}

impl serde::Serialize for EventSeq<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| &**e))
    }
}

/// What an event weighs in the history: its encoded size.
pub fn weight(e: &Event) -> u64 {
    e.encoded_len() as u64
}

/// Where the next frame of `history[from..]` ends: as many events as fit in `target`
/// payload bytes, and at least one. Sizes are computed, not encoded
/// ([`Event::encoded_len`]), so a batch is encoded once.
/// Whatever the events, a batch is over `target` only when it is a single event.
pub fn next_batch(history: &[Arc<Event>], from: usize, target: usize) -> usize {
    let mut bytes = EVENTS_OVERHEAD;
    let mut upto = from;
    for e in &history[from..] {
        let size = e.encoded_len();
        if upto > from && bytes + size > target {
            break;
        }
        bytes += size;
        upto += 1;
    }
    upto
}

/// A batch's `ToSecondary::Events` payload size: exactly what postcard writes for it
/// (the variant's index, one byte; the count; the events), computed, not walked through
/// serde: the sender holds the state's lock, which the VM's thread takes at every event.
fn batch_size(batch: &[Arc<Event>]) -> usize {
    1 + machine::event::varint_len(batch.len() as u64)
        + batch.iter().map(|e| e.encoded_len()).sum::<usize>()
}

/// Serialise `m` onto `out` as [`encode`] would into a buffer. (postcard reports a failed
/// write as a full buffer: the write's own error is kept to say what happened.)
pub(crate) fn serialize_into<T: serde::Serialize>(
    m: &T,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    struct Keep<'a> {
        out: &'a mut dyn std::io::Write,
        failed: Option<std::io::Error>,
    }
    impl std::io::Write for Keep<'_> {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.out.write(data).map_err(|e| {
                let kind = e.kind();
                self.failed = Some(e);
                std::io::Error::from(kind)
            })
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.out.flush()
        }
    }
    let mut keep = Keep { out, failed: None };
    match postcard::to_io(m, &mut keep) {
        Ok(_) => Ok(()),
        Err(e) => Err(keep
            .failed
            .take()
            .unwrap_or_else(|| std::io::Error::other(e.to_string()))),
    }
}

fn stream_to(s: &Shared, conn: u64, channel: Channel) -> Result<(), FtError> {
    let hello = {
        let st = s.lock();
        ToSecondary::Hello {
            header: st.header.clone(),
            generation: st.generation,
        }
    };
    lock_channel(&channel)
        .send(KIND_MSG, &encode(&hello))
        .map_err(io_err("send Hello"))?;
    let mut end_sent = false;
    let mut intent_sent = None;
    let mut status_at = Instant::now();
    // What the secondary was last told of the writes performed, and when.
    let mut written_sent = 0u64;
    let mut written_at = Instant::now();
    loop {
        if status_at.elapsed() > Duration::from_millis(250) {
            // Keep the counters in the status current for operators and benchmarks.
            s.status(&s.lock());
            status_at = Instant::now();
        }
        let (batch, end, intent, handover, written, mut w) = {
            let mut st = s.lock();
            let deadline = Instant::now() + s.config.heartbeat;
            let unsent = |st: &State| {
                st.intent
                    .as_ref()
                    .is_some_and(|i| Some(i.seq) != intent_sent && i.seq == st.end())
            };
            let handover_due = |st: &State| {
                st.handover
                    .as_ref()
                    .is_some_and(|h| h.ready && !h.sent && h.at == Some(st.end()))
            };
            let release_due = |st: &State| st.gated && !st.release_sent;
            while st.attached == Some(conn)
                && st.end() == st.sent
                && !st.flush_due
                && (st.end.is_none() || end_sent || !st.unwritten.is_empty())
                && !unsent(&st)
                && !handover_due(&st)
                && !release_due(&st)
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st.senders_waiting += 1;
                st = s
                    .events
                    .wait_timeout(st, left)
                    .map(|r| r.0)
                    .unwrap_or_else(|p| p.into_inner().0);
                st.senders_waiting -= 1;
            }
            if st.attached != Some(conn) {
                return Ok(());
            }
            let sent = st.sent;
            if sent < st.base {
                return Err(FtError::Protocol(format!(
                    "events from {sent} were dropped at a checkpoint before they were sent"
                )));
            }
            // Taken before the state's lock is released: what is chosen here to send goes
            // out before anything the VM's thread chooses after it (see `Channel`).
            let mut w = lock_channel(&channel);
            st.flush_due = false;
            if release_due(&st) {
                // Before any event after the release point (every event sent so far is at
                // or before it): counted before the write, as it may arrive from now on.
                st.release_sent = true;
                let release = st.release;
                drop(st);
                w.send(KIND_MSG, &encode(&ToSecondary::Release { release }))
                    .map_err(io_err("send the release point"))?;
                continue;
            }
            let from = (sent - st.base) as usize;
            let upto = next_batch(&st.history, from, FRAME_TARGET);
            // The batch's events, shared with the history: serialised after the lock is
            // dropped, straight onto the channel, so the VM never waits for the send and no
            // copy of the events is ever made on this path.
            let batch = (upto > from).then(|| st.history[from..upto].to_vec());
            let size = batch.as_deref().map_or(0, batch_size);
            let batch = batch.map(|b| (b, size));
            let upto = st.base + upto as u64;
            if size > MAX_PAYLOAD as usize {
                return Err(FtError::Protocol(format!(
                    "event {sent} is too large for a frame ({size} bytes)"
                )));
            }
            // The end only once every write behind was performed: a secondary that holds
            // the end never goes live, so it would never write again one left unwritten.
            let end = if upto == st.end() && !end_sent && st.unwritten.is_empty() {
                st.end.clone()
            } else {
                None
            };
            // An intent follows every event before it, never an event after it.
            let intent = (upto == st.end() && unsent(&st))
                .then(|| st.intent.clone())
                .flatten();
            if batch.is_some() {
                st.taken_for_sending(upto, size);
            }
            // The switch follows every event, never an event after it.
            let handover = (upto == st.end() && handover_due(&st))
                .then(|| {
                    st.handover.as_mut().map(|h| {
                        // Sent from here on: the secondary may claim at any moment.
                        h.sent = true;
                        (upto, h.why.clone())
                    })
                })
                .flatten();
            // Every write logged before this was performed (a write is registered before
            // its event is logged). Said at most every WRITTEN_EVERY while this sender
            // writes frames, and whenever it wakes to an idle channel (at least every
            // heartbeat, also while the VM's thread writes the frames): what the secondary
            // keeps to write again stays that small.
            let below = st.unwritten.front().map_or(upto, |&p| p.min(upto));
            let idle = batch.is_none() && intent.is_none() && handover.is_none();
            let written = (below > written_sent && (idle || written_at.elapsed() >= WRITTEN_EVERY))
                .then_some(below);
            (batch, end, intent, handover, written, w)
        };
        // What the VM's thread left pending goes first (or its failure ends the channel).
        w.get_mut()
            .flush_pending()
            .map_err(io_err("stream events"))?;
        let idle = batch.is_none() && intent.is_none() && handover.is_none();
        if let Some((batch, size)) = batch {
            w.send_with(KIND_MSG, size, |out| {
                serialize_into(&EventsRef(&batch), out)
            })
            .map_err(io_err("stream events"))?;
        }
        if let Some(intent) = intent {
            intent_sent = Some(intent.seq);
            w.send(KIND_MSG, &encode(&ToSecondary::Intent(intent)))
                .map_err(io_err("send an intent"))?;
        }
        if let Some(below) = written {
            // It stands in for a heartbeat.
            w.send(KIND_MSG, &encode(&ToSecondary::Written { below }))
                .map_err(io_err("say what was written"))?;
            written_sent = below;
            written_at = Instant::now();
        } else if idle && end.is_none() {
            w.send(KIND_MSG, &encode(&ToSecondary::Heartbeat))
                .map_err(io_err("send a heartbeat"))?;
        }
        if let Some(end) = end {
            w.send(KIND_MSG, &encode(&ToSecondary::End(end)))
                .map_err(io_err("send the end"))?;
            end_sent = true;
        }
        if let Some((events, why)) = handover {
            w.send(KIND_MSG, &encode(&ToSecondary::Handover { events, why }))
                .map_err(io_err("send the handover"))?;
        }
    }
}

fn receive_from(
    s: &Shared,
    conn: u64,
    r: &mut crate::detector::Watched,
    host: &str,
) -> Result<(), FtError> {
    // Only now: a thread inherits its creator's priority, and `ft-send` must not.
    crate::detector::favour_this_thread();
    let mut protected = false;
    // Gated at once if it attached near the end; otherwise only after a frame (below).
    let mut gated = s.lock().gates();
    loop {
        // Outputs wait for a gated secondary only: until then see `CATCH_UP_PATIENCE`.
        let patience = (!gated).then_some(crate::CATCH_UP_PATIENCE);
        r.set_patience(patience);
        // The detector's timeout is the failure timeout: silence that long ends the channel.
        let (_, payload) = r.recv()?;
        // Declared before the lock: dropped after it (see `State::drop_before`).
        let mut _forgotten = Vec::new();
        let mut st = s.lock();
        if st.attached != Some(conn) {
            return Ok(());
        }
        match decode::<ToPrimary>(&payload)? {
            ToPrimary::Ack { received, executed } => {
                if received > st.sent || executed > received {
                    return Err(FtError::Protocol(format!(
                        "acknowledgement of {received} events beyond the {} sent",
                        st.sent
                    )));
                }
                // Counted when it acknowledges something new: the secondary's heartbeats
                // are acknowledgements too, and an idle copy's status would otherwise
                // change (and be written again) at every one.
                if received > st.acked || executed > st.executed {
                    st.acks += 1;
                }
                st.acked = st.acked.max(received);
                st.executed = st.executed.max(executed);
            }
            ToPrimary::EndHeld { events } => {
                if st.end.as_ref().map(|e| e.events) != Some(events) || events > st.sent {
                    return Err(FtError::Protocol(format!(
                        "the secondary claims to hold an end after {events} events"
                    )));
                }
                st.acked = st.acked.max(events);
                st.end_held = true;
                tracing::info!("secondary {host} holds the end after {events} events");
            }
            ToPrimary::IntentHeld { seq } => {
                if seq > st.sent || st.intent.as_ref().is_none_or(|i| seq > i.seq) {
                    return Err(FtError::Protocol(format!(
                        "the secondary claims to hold an intent for event {seq}"
                    )));
                }
                st.acked = st.acked.max(seq);
                st.intent_held = Some(seq);
            }
            ToPrimary::Checkpoint { events } => {
                // Its acknowledgement of the events may still be on its way: a checkpoint
                // is bounded by what was sent, and says that much was executed.
                if events > st.sent {
                    return Err(FtError::Protocol(format!(
                        "a checkpoint at event {events}, beyond the {} sent",
                        st.sent
                    )));
                }
                st.executed = st.executed.max(events);
                st.checkpoint = Some(st.checkpoint.map_or(events, |c| c.max(events)));
                _forgotten = st.drop_before(events);
                tracing::info!(
                    "secondary {host} checkpointed at event {events}; history kept from event {}",
                    st.base
                );
                s.status(&st);
            }
            ToPrimary::Health(h) => {
                let h = h.bounded();
                if h != st.peer_health {
                    match h.lost() {
                        Some(l) => tracing::error!(
                            "secondary {host}'s host lost {l}: NOT PROTECTED against this host's loss of it"
                        ),
                        None => tracing::info!(
                            "secondary {host}'s host reaches storage and its VM network"
                        ),
                    }
                    st.peer_health = h;
                    s.status(&st);
                }
            }
            ToPrimary::Declined { events, health } => {
                let health = health.bounded();
                let asked = st
                    .handover
                    .as_ref()
                    .is_some_and(|h| h.sent && h.at == Some(events));
                if !asked {
                    return Err(FtError::Protocol(format!(
                        "the secondary declines a handover after {events} events it was not asked"
                    )));
                }
                // It never claims for this handover: the VM resumes here, and the guest
                // sees what it would natively.
                let why = st.handover.take().map(|h| h.why).unwrap_or_default();
                st.declined_at = Some(Instant::now());
                tracing::error!(
                    "handover ({why}) declined by secondary {host}: its host lost {}; the VM stays here",
                    health.lost().unwrap_or_else(|| "nothing it names".into())
                );
            }
            ToPrimary::ReleaseHeld { release } => {
                if !st.release_sent || release != st.release || st.release_held {
                    return Err(FtError::Protocol(format!(
                        "the secondary claims to hold release point {release}"
                    )));
                }
                st.release_held = true;
            }
            ToPrimary::Hello { .. } => return Err(FtError::Protocol("a second Hello".into())),
        }
        if st.gate_if_near() {
            tracing::info!(
                "secondary {host} nearly caught up (holds {} events); release point {}: outputs now wait for it",
                st.acked,
                st.release
            );
            s.status(&st);
            s.wake_sender(&st);
        }
        gated = st.gates();
        if !protected && st.protected() {
            protected = true;
            tracing::info!(
                "secondary {host} holds the release point ({} events): VM PROTECTED",
                st.release
            );
            s.status(&st);
        }
        if r.holds_frame() {
            // What the next frame, already here, says is acted on with this: one wake of
            // the VM and one release for frames that arrived together.
            continue;
        }
        s.wake_vm_acked(&st);
        // The outputs this acknowledgement allows are written here, at once: no other
        // thread is woken for them.
        let due = st.release_due();
        drop(st);
        if due {
            release_outputs(s, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secondary::Secondary;
    use machine::event::{Event, Kind, Outcome};
    use machine::{EventSource, Exit, Tail};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    fn data_event(seq: u64, len: usize) -> Event {
        Event {
            seq,
            kind: Kind::FdRead,
            args: u64::MAX,
            outputs: u64::MAX,
            outcome: Outcome::Data(vec![seq as u8; len].into()),
        }
    }

    fn config() -> FtConfig {
        FtConfig {
            end_wait: Duration::from_secs(1),
            ..FtConfig::default()
        }
    }

    fn generations(dir: &VmDir) -> Vec<String> {
        let mut g: Vec<String> = std::fs::read_dir(dir.arbitration())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        g.sort();
        g
    }

    /// Split `history` as the sender does; check every frame against the cap and the target.
    fn split(history: &[Event], target: usize) -> Vec<std::ops::Range<usize>> {
        let history: Vec<Arc<Event>> = history.iter().cloned().map(Arc::new).collect();
        let history = &history[..];
        let mut frames = Vec::new();
        let mut from = 0;
        while from < history.len() {
            let upto = next_batch(history, from, target);
            assert!(upto > from, "no progress at {from}");
            let len = encode(&EventsRef(&history[from..upto])).len();
            assert_eq!(len, batch_size(&history[from..upto]), "measured as encoded");
            assert!(
                len <= MAX_PAYLOAD as usize,
                "frame {from}..{upto}: {len} bytes"
            );
            assert!(
                len <= target || upto == from + 1,
                "frame {from}..{upto} of {len} bytes is over the target with several events"
            );
            frames.push(from..upto);
            from = upto;
        }
        frames
    }

    #[test]
    fn frames_are_split_by_bytes_whatever_the_events() {
        // Many tiny events: far more than the old 4096 per frame, and bounded by bytes.
        let tiny: Vec<Event> = (0..300_000).map(event).collect();
        let frames = split(&tiny, FRAME_TARGET);
        assert!(frames.len() > 1 && frames.iter().any(|f| f.len() > 4096));
        // 40 MiB in 64 KiB reads: about 1 MiB per frame, never one 40 MiB frame.
        let reads: Vec<Event> = (0..640).map(|i| data_event(i, 64 << 10)).collect();
        let frames = split(&reads, FRAME_TARGET);
        assert!(frames.len() >= 40, "{} frames", frames.len());
        // Events of 16 MiB (the most one event carries) go alone, each under the cap.
        let mut mixed: Vec<Event> = (0..10).map(event).collect();
        for i in 10..13 {
            mixed.push(data_event(i, 16 << 20));
        }
        mixed.extend((13..20).map(event));
        let frames = split(&mixed, FRAME_TARGET);
        for big in 10..13 {
            assert!(frames.contains(&(big..big + 1)), "{frames:?}");
        }
        // The frames cover the history once, in order.
        let covered: Vec<usize> = frames.into_iter().flatten().collect();
        assert_eq!(covered, (0..20).collect::<Vec<_>>());
        // A measured size is the encoded size, so the target is met exactly.
        let one = [Arc::new(data_event(0, 1000))];
        assert_eq!(
            postcard::experimental::serialized_size(&*one[0]).unwrap() + 2,
            encode(&EventsRef(&one)).len()
        );
    }

    /// A stand-in primary on a real TCP channel speaking the real wire format: it sends
    /// Hello, then the release point if any (gating the secondary), then `events`, then
    /// `end` if any, then closes the channel.
    fn fake_primary(
        dir: &VmDir,
        release: Option<u64>,
        events: Vec<Event>,
        end: Option<End>,
    ) -> String {
        let pair = dir.create_key().unwrap();
        let arbiter = Arbiter::new(&dir.arbitration());
        assert_eq!(arbiter.claim(1, "primary").unwrap(), Claim::Won);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let nonce = [9u8; 16];
            std::io::Write::write_all(&mut &stream, &nonce).unwrap();
            let key = connection_key(&pair, &nonce);
            let mut r = FrameReader::new(stream.try_clone().unwrap(), key);
            let mut w = FrameWriter::new(stream.try_clone().unwrap(), key);
            r.recv().unwrap();
            let hello = ToSecondary::Hello {
                header: header(),
                generation: 1,
            };
            w.send(KIND_MSG, &encode(&hello)).unwrap();
            if let Some(release) = release {
                w.send(KIND_MSG, &encode(&ToSecondary::Release { release }))
                    .unwrap();
            }
            w.send(KIND_MSG, &encode(&ToSecondary::Events(events)))
                .unwrap();
            if let Some(end) = end {
                w.send(KIND_MSG, &encode(&ToSecondary::End(end))).unwrap();
            }
            std::thread::sleep(Duration::from_millis(100));
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
        addr
    }

    #[test]
    fn frames_that_arrive_together_are_acknowledged_once() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let pair = dir.create_key().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acks = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            // A secondary that never acknowledges all three fails the test, not hangs it.
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let nonce = [5u8; 16];
            std::io::Write::write_all(&mut &stream, &nonce).unwrap();
            let key = connection_key(&pair, &nonce);
            let mut r = FrameReader::new(stream.try_clone().unwrap(), key);
            r.recv().unwrap();
            // The Hello and three frames of one event each, in one write: the secondary
            // reads them all at once.
            let hello = ToSecondary::Hello {
                header: header(),
                generation: 1,
            };
            let mut bytes = crate::wire::encode(&key, 0, KIND_MSG, &encode(&hello));
            for seq in 0..3 {
                let frame = encode(&ToSecondary::Events(vec![event(seq)]));
                bytes.extend(crate::wire::encode(&key, seq + 1, KIND_MSG, &frame));
            }
            std::io::Write::write_all(&mut &stream, &bytes).unwrap();
            let mut acks = Vec::new();
            while acks.last() != Some(&3) {
                if let ToPrimary::Ack { received, .. } = decode(&r.recv().unwrap().1).unwrap() {
                    acks.push(received);
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
            acks
        });
        let _secondary = join(&dir, &addr, 0);
        let acks = acks.join().unwrap();
        // Heartbeats before the frames were read may say 0; none says 1 or 2.
        assert!(acks.iter().all(|&a| a == 0 || a == 3), "{acks:?}");
    }

    /// A secondary following a primary that sends three events (and `release`, if any)
    /// and then dies: the secondary, its source, its folder and the error that ended it.
    fn lost_after_three_events(
        release: Option<u64>,
    ) -> (
        tempfile::TempDir,
        VmDir,
        Secondary,
        crate::secondary::SecondarySource,
        String,
    ) {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let addr = fake_primary(&dir, release, (0..3).map(event).collect(), None);
        let secondary = join(&dir, &addr, 0);
        let mut source = secondary.source(None);
        for seq in 0..3 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
        let err = source.next_event().unwrap_err().to_string();
        (shared, dir, secondary, source, err)
    }

    #[test]
    fn a_secondary_lost_before_the_release_point_drops_out_without_claiming() {
        let (_shared, dir, secondary, _source, err) = lost_after_three_events(Some(10));
        assert!(err.contains("dropped out"), "{err}");
        assert_eq!(secondary.release(), Some(10));
        assert_eq!(
            generations(&dir),
            ["gen-1"],
            "an ineligible secondary claimed"
        );
        assert!(!dir.status().exists(), "a secondary wrote the VM's status");
        let own = crate::status::read_flushed(&dir.secondary_status()).unwrap();
        assert!(own.contains("role=dropped-out"), "{own}");
    }

    #[test]
    fn a_newcomer_never_gated_cannot_go_live_when_the_primary_dies() {
        // It holds every event the primary had, but no release point: the primary's
        // outputs did not wait for it, so it must not go live.
        let (_shared, dir, secondary, mut source, err) = lost_after_three_events(None);
        assert!(
            err.contains("dropped out") && err.contains("before the primary gated"),
            "{err}"
        );
        assert!(source.tail().is_err());
        assert_eq!(secondary.release(), None);
        assert_eq!(generations(&dir), ["gen-1"], "an ungated secondary claimed");
        assert!(!dir.status().exists(), "a secondary wrote the VM's status");
        let own = crate::status::read_flushed(&dir.secondary_status()).unwrap();
        assert!(
            own.contains("role=dropped-out") && own.contains("release=none"),
            "{own}"
        );
    }

    #[test]
    fn a_newcomer_replays_in_the_background_until_gated_then_at_its_own_priority() {
        use crate::secondary::{CATCH_UP_NICE, thread_nice};
        for gated in [false, true] {
            let shared = tempfile::tempdir().unwrap();
            let dir = VmDir::new(shared.path(), "vm");
            let addr = fake_primary(&dir, gated.then_some(3), (0..3).map(event).collect(), None);
            let secondary = join(&dir, &addr, 0);
            let mut source = secondary.source(None);
            // On a thread of its own, as the VM's: niceness is per thread.
            let (own, during, after) = std::thread::spawn(move || {
                let own = thread_nice().unwrap();
                assert_eq!(source.next_event().unwrap().unwrap().seq, 0);
                let during = thread_nice().unwrap();
                for seq in 1..3 {
                    assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
                }
                let _ = source.next_event();
                (own, during, thread_nice().unwrap())
            })
            .join()
            .unwrap();
            assert!(own < CATCH_UP_NICE);
            if gated {
                assert_eq!(after, own, "still in the background once gated");
            } else {
                assert_eq!(during, CATCH_UP_NICE, "catching up at the VM's priority");
                assert_eq!(after, CATCH_UP_NICE, "never gated, never back");
            }
        }
    }

    #[test]
    fn a_secondary_holding_the_release_point_arbitrates_and_goes_live() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let addr = fake_primary(&dir, Some(3), (0..3).map(event).collect(), None);
        let secondary = join(&dir, &addr, 0);
        let mut source = secondary.source(None);
        for seq in 0..3 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
        assert!(source.next_event().unwrap().is_none());
        assert!(matches!(source.tail().unwrap(), Tail::GoLive));
        assert_eq!(generations(&dir), ["gen-1", "gen-2"]);
        let status = crate::status::read_flushed(&dir.status()).unwrap();
        assert!(status.contains("role=live") && status.contains("generation=2"));
    }

    #[test]
    fn a_secondary_that_holds_the_end_never_arbitrates() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let end = End {
            events: 3,
            exit: Exit::Stopped,
            digest: [1; 32],
        };
        // The channel closes right after the end, as when the primary's process exits.
        let addr = fake_primary(
            &dir,
            Some(3),
            (0..3).map(event).collect(),
            Some(end.clone()),
        );
        let secondary = join(&dir, &addr, 0);
        let mut source = secondary.source(None);
        for seq in 0..3 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
        assert!(source.next_event().unwrap().is_none());
        std::thread::sleep(config().timeout * 3);
        assert!(matches!(source.tail().unwrap(), Tail::End(e) if e == end));
        assert_eq!(
            generations(&dir),
            ["gen-1"],
            "a secondary holding the end claimed"
        );
    }

    /// A stand-in secondary: authenticates, then reads frames and acknowledges only what
    /// `ack` allows (`None`: never reads after Hello and stays silent); it confirms a
    /// release point at once.
    fn fake_secondary(primary: &Primary, ack: Option<u64>) -> std::thread::JoinHandle<()> {
        let ack = ack.map(|a| Arc::new(AtomicU64::new(a)));
        fake_secondary_with(primary, ack, Default::default())
    }

    /// [`fake_secondary`] with a limit that the test may raise as it goes, noting how many
    /// events each frame of events brought in `frames`.
    /// Attach to the primary at `addr` as secondary `host` from event 0, as a secondary
    /// does, and take its Hello: the connection's writer and reader.
    /// A fake secondary's two ends of its connection.
    type FakeConnection = (FrameWriter<TcpStream>, FrameReader<TcpStream>);

    fn handshake(addr: SocketAddr, pair: [u8; 32], host: &str) -> FakeConnection {
        let stream = TcpStream::connect(addr).unwrap();
        let mut nonce = [0u8; 16];
        std::io::Read::read_exact(&mut &stream, &mut nonce).unwrap();
        let key = connection_key(&pair, &nonce);
        let mut w = FrameWriter::new(stream.try_clone().unwrap(), key);
        let mut r = FrameReader::new(stream, key);
        let hello = ToPrimary::Hello {
            host: host.into(),
            from: 0,
        };
        w.send(KIND_MSG, &encode(&hello)).unwrap();
        r.recv().unwrap();
        (w, r)
    }

    /// A primary whose sender sends nothing unless something wakes it (heartbeats 10 s
    /// apart), its failure timeout `timeout`; the temporary folder it lives in.
    fn quiet_primary(timeout: Duration) -> (tempfile::TempDir, Primary) {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let config = FtConfig {
            heartbeat: Duration::from_secs(10),
            timeout,
            ..config()
        };
        let primary = Primary::start(dir, "127.0.0.1:0", header(), None, false, config).unwrap();
        (shared, primary)
    }

    fn fake_secondary_with(
        primary: &Primary,
        ack: Option<Arc<AtomicU64>>,
        frames: Arc<Mutex<Vec<usize>>>,
    ) -> std::thread::JoinHandle<()> {
        let (addr, pair) = (primary.addr, primary.shared.key);
        std::thread::spawn(move || {
            let (mut w, mut r) = handshake(addr, pair, "fake");
            let Some(limit) = ack else {
                // Silent, reading nothing more: the history stays in transit.
                std::thread::sleep(Duration::from_secs(3));
                return;
            };
            let mut received = 0u64;
            while let Ok((_, payload)) = r.recv() {
                match decode::<ToSecondary>(&payload) {
                    Ok(ToSecondary::Events(e)) => {
                        frames.lock().unwrap().push(e.len());
                        received += e.len() as u64
                    }
                    Ok(ToSecondary::Release { release }) => {
                        let held = ToPrimary::ReleaseHeld { release };
                        if w.send(KIND_MSG, &encode(&held)).is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
                let acked = received.min(limit.load(Ordering::SeqCst));
                let ack = ToPrimary::Ack {
                    received: acked,
                    executed: acked,
                };
                if w.send(KIND_MSG, &encode(&ack)).is_err() {
                    return;
                }
            }
        })
    }

    /// A secondary of the primary at `addr` joining from event `from` (waiting up to 5 s
    /// for it), with the tests' configuration.
    fn join(dir: &VmDir, addr: &str, from: u64) -> Secondary {
        Secondary::connect(dir.clone(), addr, Duration::from_secs(5), config(), from).unwrap()
    }

    fn primary_with_history(dir: &VmDir, events: Vec<Event>) -> (Primary, PrimarySink) {
        let primary =
            Primary::start(dir.clone(), "127.0.0.1:0", header(), None, false, config()).unwrap();
        let mut sink = primary.sink();
        for e in events {
            sink.append(e).unwrap();
        }
        (primary, sink)
    }

    #[test]
    fn storage_lost_on_both_hosts_at_once_is_declined_by_the_secondary_and_the_vm_stays() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, mut sink) = primary_with_history(&dir, (0..10).map(event).collect());
        let secondary = join(&dir, &primary.addr.to_string(), 0);
        let _source = secondary.source(None);
        wait("protected", || primary.protected());
        // Each host's view of the VM's folder is gone; neither has held the loss long
        // enough to report it (a loss on both at once).
        let gone = shared.path().join("gone");
        let monitor = |folder: &std::path::Path| {
            crate::health::Monitor::start(crate::health::HealthConfig {
                folder: folder.to_path_buf(),
                uplink: None,
                peers: vec![],
                hold: Duration::from_secs(60),
            })
            .unwrap()
        };
        secondary.watch_health(monitor(&gone)).unwrap();
        primary.watch_health(monitor(&gone), true);
        let mut port = primary.port();
        // The operation at event 10 failed: the primary asks the secondary, which looks
        // afresh, declines, and never claims: the guest gets the error here.
        let failed = std::thread::spawn(move || port.storage_failed(10));
        wait("the guest given the error", || failed.is_finished());
        assert!(failed.join().unwrap().is_ok());
        assert!(primary.halted().is_none() && primary.handed_over().is_none());
        assert!(primary.shared.lock().declined_lately());
        assert_eq!(generations(&dir), ["gen-1"]);
        // The VM goes on here, still protected by the same secondary.
        sink.append(event(10)).unwrap();
        wait("acked", || primary.shared.lock().acked == 11);
        assert!(primary.protected());
        assert!(secondary.live_generation().is_none());
        // A second failing operation right after: the guest gets its error at once.
        let mut port = primary.port();
        let start = Instant::now();
        assert!(port.storage_failed(11).is_ok());
        assert!(start.elapsed() < Duration::from_millis(500));
        assert_eq!(generations(&dir), ["gen-1"]);
    }

    #[test]
    fn a_copy_that_goes_live_keeps_no_history_from_before_and_checkpoints_at_once() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        dir.create_key().unwrap();
        let standby = Primary::standby(dir.clone(), header(), 0, false, config()).unwrap();
        for i in 0..10 {
            standby.retain(&data_event(i, 100));
        }
        assert!(standby.history_bytes() >= 1000);
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        standby.activate(1, None, None, Some(&addr));
        assert_eq!(
            standby.history_bytes(),
            0,
            "the events before going live are gone"
        );
        let kept = standby.to_checkpoint_kept().unwrap();
        assert!(kept.due && kept.live, "{kept:?}");
        // A newcomer from power-on would replay across the go-live: refused.
        match Secondary::connect(dir.clone(), &addr, Duration::from_secs(5), config(), 0) {
            Err(FtError::Refused(why)) => assert!(why.contains("events 10 to 10"), "{why}"),
            other => panic!("joining from before the go-live: {:?}", other.err()),
        }
        standby.checkpointed(10);
        assert!(!standby.to_checkpoint_kept().unwrap().due);
        let s = Secondary::connect(dir.clone(), &addr, Duration::from_secs(5), config(), 10);
        assert!(
            s.is_ok(),
            "from the checkpoint after the go-live: {:?}",
            s.err()
        );
    }

    #[test]
    fn a_newcomer_refused_while_a_secondary_is_attached_asks_again_and_joins_once_it_leaves() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, _sink) =
            primary_with_history(&dir, (0..4).map(|i| data_event(i, 10)).collect());
        let addr = primary.addr.to_string();
        let first = join(&dir, &addr, 0);
        // Without time to wait, the refusal is the answer.
        match Secondary::connect(dir.clone(), &addr, Duration::ZERO, config(), 0) {
            Err(FtError::Refused(why)) => assert!(why.contains(ATTACHED_ALREADY), "{why}"),
            other => panic!("a second secondary: {:?}", other.err()),
        }
        // With time, the newcomer asks again and is taken once the first has left.
        let leaver = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            assert!(first.leave("replaced"));
            first
        });
        let second =
            Secondary::connect(dir.clone(), &addr, Duration::from_secs(10), config(), 0).unwrap();
        let _first = leaver.join().unwrap();
        let mut source = second.source(None);
        for seq in 0..4 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
    }

    #[test]
    fn a_checkpoint_drops_the_history_before_it_and_newcomers_join_from_there() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, _sink) =
            primary_with_history(&dir, (0..10).map(|i| data_event(i, 100)).collect());
        let bytes = primary.to_checkpoint().unwrap();
        assert!(bytes >= 1000);
        primary.checkpointed(6);
        assert!(
            primary.history_bytes() < bytes / 2,
            "dropped six of ten events"
        );
        let status = crate::status::read_flushed(&dir.status()).unwrap();
        assert!(
            status.contains("checkpoint=6") && status.contains("events=10"),
            "{status}"
        );
        // Before the checkpoint: refused, saying why; at it: served from there.
        let addr = primary.addr.to_string();
        match Secondary::connect(dir.clone(), &addr, Duration::from_secs(5), config(), 5) {
            Err(FtError::Refused(why)) => assert!(why.contains("events 6 to 10"), "{why}"),
            other => panic!("joining before the history: {:?}", other.err()),
        }
        let secondary = join(&dir, &addr, 6);
        let mut source = secondary.source(None);
        for seq in 6..10 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
        // Four events behind: gated at once, at the end of the history.
        wait("gated", || secondary.release() == Some(10));
    }

    #[test]
    fn a_standby_keeps_what_it_replays_in_order_and_serves_from_its_go_live_once_live() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        dir.create_key().unwrap();
        let standby = Primary::standby(dir.clone(), header(), 3, false, config()).unwrap();
        for seq in [3, 4, 9, 5] {
            standby.retain(&data_event(seq, 10));
        }
        // Event 9 was out of order and not kept: 3, 4 and 5 are.
        assert_eq!(standby.history_bytes(), 3 * weight(&data_event(3, 10)));
        standby.checkpointed(4);
        assert!(!dir.status().exists(), "a standby writes no status");
        Arbiter::new(&dir.arbitration()).claim(1, "test").unwrap();
        // Listening on a port of its own choosing: find it from the status-less handle.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap().to_string();
        drop(probe);
        standby.activate(1, None, None, Some(&addr));
        let status = crate::status::read_flushed(&dir.status()).unwrap();
        assert!(
            status.contains("role=live") && status.contains("events=6"),
            "{status}"
        );
        // A replay across the go-live would diverge: joining from the checkpoint before it
        // is refused; from a checkpoint at the go-live point it is served.
        match Secondary::connect(dir.clone(), &addr, Duration::from_secs(5), config(), 4) {
            Err(FtError::Refused(why)) => assert!(why.contains("events 6 to 6"), "{why}"),
            other => panic!("joining from before the go-live: {:?}", other.err()),
        }
        standby.checkpointed(6);
        let secondary = join(&dir, &addr, 6);
        wait("gated", || secondary.release() == Some(6));
    }

    #[test]
    fn without_a_secondary_the_history_past_its_bound_waits_for_the_copys_own_checkpoint() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let bound = 2 * weight(&data_event(0, 1000));
        let config = FtConfig {
            max_history_bytes: bound,
            ..config()
        };
        let primary =
            Primary::start(dir.clone(), "127.0.0.1:0", header(), None, false, config).unwrap();
        let mut sink = primary.sink();
        // Two events: at the bound, not past it.
        for seq in 0..2 {
            sink.append(data_event(seq, 1000)).unwrap();
        }
        let appender = std::thread::spawn(move || {
            for seq in 2..4 {
                sink.append(data_event(seq, 1000)).unwrap();
            }
        });
        let appended = || primary.shared.lock().end();
        wait("the third event", || appended() == 3);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(appended(), 3, "the VM went on past the bound unasked");
        // The checkpointer looks and asks: the VM goes on to its next event (where the
        // checkpoint is taken), and then waits for the checkpoint to be in place.
        let kept = primary.to_checkpoint_kept().unwrap();
        assert!(kept.bytes > bound);
        wait("the fourth event", || appended() == 4);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !appender.is_finished(),
            "the VM went on before the checkpoint"
        );
        primary.checkpointed(3);
        wait("the VM going on", || appender.is_finished());
        appender.join().unwrap();
        assert_eq!(primary.history_bytes(), weight(&data_event(3, 1000)));
    }

    #[test]
    fn a_secondary_lost_with_its_history_in_transit_is_dropped_without_arbitration() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        // 64 MiB of history: far more than socket buffers hold, so most of it is unsent.
        let (primary, _sink) =
            primary_with_history(&dir, (0..16).map(|i| data_event(i, 4 << 20)).collect());
        let fake = fake_secondary(&primary, None);
        wait("attach", || primary.shared.lock().attached.is_some());
        assert!(!primary.protected(), "protected before catching up");
        let status = crate::status::read_flushed(&dir.status()).unwrap();
        assert!(status.contains("protected=false"), "{status}");
        wait("the silent secondary dropped", || {
            primary.shared.lock().attached.is_none()
        });
        fake.join().unwrap();
        assert!(primary.shared.lock().sent < 16);
        assert_eq!(generations(&dir), ["gen-1"], "arbitration was not needed");
        assert!(primary.halted().is_none());
    }

    #[test]
    fn protected_only_once_the_secondary_holds_the_release_point() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, _sink) = primary_with_history(&dir, (0..1000).map(event).collect());
        // Acknowledges at most 900 of the 1000 events of its release point: near enough to
        // be gated, not enough to be eligible.
        let fake = fake_secondary(&primary, Some(900));
        wait("acks", || primary.shared.lock().acked == 900);
        wait("gated", || primary.shared.lock().release_held);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(primary.shared.lock().release, 1000);
        assert!(!primary.protected());
        assert!(
            crate::status::read_flushed(&dir.status())
                .unwrap()
                .contains("protected=false")
        );
        drop(fake);
        // A real secondary holds all 100 and protects the VM.
        let shared2 = tempfile::tempdir().unwrap();
        let dir2 = VmDir::new(shared2.path(), "vm");
        let (primary2, _sink2) = primary_with_history(&dir2, (0..100).map(event).collect());
        let _secondary = join(&dir2, &primary2.addr.to_string(), 0);
        wait("protected", || primary2.protected());
        wait("status", || {
            std::fs::read_to_string(dir2.status())
                .unwrap()
                .contains("protected=true")
        });
    }

    #[test]
    fn the_end_is_confirmed_and_every_held_output_written_before_the_primary_finishes() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, mut sink) = primary_with_history(&dir, vec![]);
        let secondary = join(&dir, &primary.addr.to_string(), 0);
        let mut source = secondary.source(None);
        wait("attach", || primary.protected());
        let mut port = primary.port();
        for seq in 0..50 {
            sink.append(event(seq)).unwrap();
            port.console(seq + 1, 1, b"a line");
        }
        let end = End {
            events: 50,
            exit: Exit::Code(3),
            digest: [2; 32],
        };
        Box::new(sink).finish(&end).unwrap();
        primary.finish();
        assert!(
            primary.shared.lock().end_held,
            "finished without the confirmation"
        );
        assert_eq!(primary.released(), 50, "held outputs were not all written");
        assert!(primary.halted().is_none());
        let status = crate::status::read_flushed(&dir.status()).unwrap();
        assert!(
            status.contains("role=stopped") && status.contains("exit=exit code 3"),
            "{status}"
        );
        for seq in 0..50 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
        assert!(source.next_event().unwrap().is_none());
        assert!(matches!(source.tail().unwrap(), Tail::End(e) if e == end));
        assert_eq!(generations(&dir), ["gen-1"]);
    }

    #[test]
    fn a_secondary_that_never_confirms_the_end_is_fenced_off() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, mut sink) = primary_with_history(&dir, vec![]);
        // Acknowledges every event but never confirms an end.
        let _fake = fake_secondary(&primary, Some(u64::MAX));
        wait("attach", || primary.protected());
        sink.append(event(0)).unwrap();
        let end = End {
            events: 1,
            exit: Exit::Stopped,
            digest: [0; 32],
        };
        Box::new(sink).finish(&end).unwrap();
        let start = Instant::now();
        primary.finish();
        assert!(start.elapsed() >= config().end_wait);
        // The primary claimed the next generation: the secondary can never go live.
        assert_eq!(generations(&dir), ["gen-1", "gen-2"]);
        assert!(primary.halted().is_none());
    }

    fn header() -> LogHeader {
        LogHeader {
            module_digest: [0; 32],
            args: vec![],
            env: vec![],
            datastore: false,
            memory_limit: 1 << 20,
            nic: None,
            listen: vec![],
            first_seq: 0,
        }
    }

    fn event(seq: u64) -> Event {
        Event {
            seq,
            kind: Kind::ClockTimeGet,
            args: 0,
            outputs: 0,
            outcome: Outcome::Value(seq),
        }
    }

    fn wait(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ok() {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A primary of the default configuration on loopback...
    fn default_primary(dir: &VmDir) -> Primary {
        Primary::start(
            dir.clone(),
            "127.0.0.1:0",
            header(),
            None,
            false,
            FtConfig::default(),
        )
        .unwrap()
    }

    /// ...and a secondary joining it from power-on.
    fn joined(dir: VmDir, primary: &Primary) -> Secondary {
        Secondary::connect(
            dir,
            &primary.addr.to_string(),
            Duration::from_secs(5),
            FtConfig::default(),
            0,
        )
        .unwrap()
    }

    #[test]
    fn outputs_wait_until_the_secondary_holds_their_events() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let primary = default_primary(&dir);
        let (mut sink, mut port) = (primary.sink(), primary.port());
        // Unprotected: an output leaves at once.
        port.frame(0, b"before any secondary");
        assert_eq!(primary.released(), 0, "sent directly, not held");

        let secondary = joined(dir, &primary);
        let mut source = secondary.source(None);
        wait("attach", || primary.shared.lock().attached.is_some());
        // An output produced after 3 events is held while the secondary has fewer.
        sink.append(event(0)).unwrap();
        port.frame(3, b"depends on events 0..3");
        port.console(3, 1, b"so does this");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            primary.released(),
            0,
            "released before the secondary held its events"
        );
        // A disk mutation at position 2 waits too.
        let mut disk_port = primary.port();
        let disk = std::thread::spawn(move || disk_port.before_disk(2));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !disk.is_finished(),
            "a disk mutation went ahead of the secondary"
        );
        sink.append(event(1)).unwrap();
        sink.append(event(2)).unwrap();
        // The secondary receives them (it need not have executed them yet).
        wait("release", || primary.released() == 2);
        assert!(disk.join().unwrap().is_ok());
        for seq in 0..3 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
    }

    /// While a secondary is gated, a waiting sender is not woken for each event: a burst of
    /// events and outputs goes in one frame when the VM is about to wait for input, or once
    /// an output waited `SEND_DELAY` for its events, or once they weigh `SEND_BYTES`.
    #[test]
    fn a_gated_secondary_gets_a_burst_in_one_frame_when_the_vm_waits_or_an_output_waited() {
        // Heartbeats far apart: nothing is sent unless something wakes the sender.
        let (_shared, primary) = quiet_primary(Duration::from_secs(30));
        let (mut sink, mut port) = (primary.sink(), primary.port());
        let frames = Arc::new(Mutex::new(Vec::new()));
        let _fake = fake_secondary_with(
            &primary,
            Some(Arc::new(AtomicU64::new(u64::MAX))),
            frames.clone(),
        );
        // Holding the whole (empty) history, the secondary is gated at once.
        wait("protection", || primary.protected());
        let sender_waits = || {
            let st = primary.shared.lock();
            st.senders_waiting > 0 && st.sent == st.end()
        };
        wait("the sender to wait (1)", sender_waits);

        // A burst: nine events and a reply that depends on them stay here...
        let before = frames.lock().unwrap().len();
        for seq in 0..9 {
            sink.append(event(seq)).unwrap();
        }
        port.frame(9, b"reply");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            primary.shared.lock().sent,
            0,
            "events sent before the VM waited"
        );
        assert_eq!(primary.released(), 0);
        // ...until the VM waits for input: then all of them go in one frame, which the VM's
        // thread writes itself (the sender is not woken for it).
        port.idle();
        {
            let st = primary.shared.lock();
            assert_eq!(
                (st.sent, st.frames_from_vm),
                (9, 1),
                "not written by idle()"
            );
        }
        wait("the reply", || primary.released() == 1);
        assert_eq!(frames.lock().unwrap()[before..], [9]);

        // A guest computing on without waiting: its output goes once it waited SEND_DELAY,
        // at the next event.
        wait("the sender to wait (2)", sender_waits);
        sink.append(event(9)).unwrap();
        port.frame(10, b"progress");
        std::thread::sleep(SEND_DELAY * 5);
        sink.append(event(10)).unwrap();
        wait("the progress line", || primary.released() == 2);
        assert_eq!(frames.lock().unwrap()[before + 1..], [2]);

        // Events that weigh SEND_BYTES go without an output or a wait.
        wait("the sender to wait (3)", sender_waits);
        sink.append(data_event(11, SEND_BYTES as usize)).unwrap();
        wait("the large event sent", || primary.shared.lock().acked == 12);
        assert_eq!(frames.lock().unwrap()[before + 2..], [1]);

        // The VM's side waiting for the secondary (here a disk mutation after an event not
        // sent) sends what it waits for at once, not at the heartbeat.
        wait("the sender to wait (4)", sender_waits);
        sink.append(event(12)).unwrap();
        let asked = Instant::now();
        port.before_disk(13).unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "waited for a heartbeat"
        );
        assert_eq!(frames.lock().unwrap()[before + 3..], [1]);
    }

    /// A secondary that reads its Hello and then nothing until `go` (or 30 s), then takes
    /// every frame, acknowledging events, until it holds `want`: the sequence numbers of
    /// the events it got, in order, and whether it gave up waiting for `go`.
    /// Its connection comes back with what it read: closed with data unread (the
    /// primary's heartbeats), it would be reset, and its last acknowledgement with it.
    fn stalled_secondary(
        primary: &Primary,
        go: std::sync::mpsc::Receiver<()>,
        want: u64,
    ) -> std::thread::JoinHandle<(Vec<u64>, bool, FakeConnection)> {
        let (addr, pair) = (primary.addr, primary.shared.key);
        std::thread::spawn(move || {
            let (mut w, mut r) = handshake(addr, pair, "stalled");
            let gave_up = go.recv_timeout(Duration::from_secs(30)).is_err();
            let mut seqs = Vec::new();
            while (seqs.len() as u64) < want {
                let (_, payload) = r.recv().unwrap();
                if let ToSecondary::Events(e) = decode::<ToSecondary>(&payload).unwrap() {
                    seqs.extend(e.iter().map(|e| e.seq));
                    let n = seqs.len() as u64;
                    let ack = ToPrimary::Ack {
                        received: n,
                        executed: n,
                    };
                    w.send(KIND_MSG, &encode(&ack)).unwrap();
                }
            }
            (seqs, gave_up, (w, r))
        })
    }

    /// The most a TCP connection's two ends may buffer on this host (in this network
    /// namespace): the largest send buffer plus the largest receive buffer, from the third
    /// field of `tcp_wmem` and `tcp_rmem` (Linux's defaults, 4 + 6 MiB, if unreadable).
    fn socket_buffers_max() -> u64 {
        let max = |name: &str, default: u64| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
                .unwrap_or(default)
        };
        max("tcp_wmem", 4 << 20) + max("tcp_rmem", 6 << 20)
    }

    #[test]
    fn the_vms_thread_never_blocks_on_a_channel_the_secondary_stopped_reading() {
        let (_shared, primary) = quiet_primary(Duration::from_secs(60));
        let (mut sink, mut port) = (primary.sink(), primary.port());
        // Events of 60 KiB, twice what the socket buffers of both ends may hold (4 + 6 MiB
        // by Linux's default limits, 4 + 32 here), at least 384 (22.5 MiB), at most 4,096
        // (240 MiB, all of it kept in the primary's history): the channel fills on any
        // host whose limits are under 120 MiB.
        let size = 60 << 10;
        let n = (2 * socket_buffers_max())
            .div_ceil(size as u64)
            .clamp(384, 4096);
        let (go, stalled) = std::sync::mpsc::channel();
        let secondary = stalled_secondary(&primary, stalled, n);
        // Gated at once (the history is empty), the release point sent: the sender waits.
        wait("the release point sent", || {
            let st = primary.shared.lock();
            st.gates() && st.release_sent && st.senders_waiting > 0
        });
        // The VM computes and waits for input again and again while the secondary reads
        // nothing: each wait writes what the socket takes and leaves the rest to the
        // sender, which blocks on the full channel in its place. Were the VM's thread to
        // block here, the secondary would give up waiting for its go after 30 s.
        for seq in 0..n {
            sink.append(data_event(seq, size)).unwrap();
            port.idle();
        }
        let from_vm = primary.shared.lock().frames_from_vm;
        assert!(from_vm > 0, "the VM's thread wrote no frame itself");
        let _ = go.send(());
        let (seqs, gave_up, _connection) = secondary.join().unwrap();
        assert!(!gave_up, "the VM's thread blocked on the full channel");
        assert_eq!(
            seqs,
            (0..n).collect::<Vec<_>>(),
            "events lost or out of order"
        );
        wait("every event acknowledged", || {
            primary.shared.lock().acked == n
        });
        let st = primary.shared.lock();
        assert!(
            st.frames > st.frames_from_vm,
            "the sender wrote none ({} frames)",
            st.frames
        );
    }

    /// A new, empty file to write behind to.
    fn empty_file(path: &std::path::Path) -> Arc<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Arc::new(file)
    }

    /// A write behind: the guest has its outcome at once, the write leaves under the output
    /// rule in order with the other outputs, any other disk operation waits for it, and the
    /// secondary is told once it was performed. A write that fails halts the copy: nothing
    /// after it leaves.
    #[test]
    fn writes_behind_leave_in_order_under_the_output_rule_and_a_failed_one_halts() {
        use machine::event::Bytes;
        use machine::port::DiskWrite;
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let primary = default_primary(&dir);
        let (mut sink, mut port) = (primary.sink(), primary.port());
        assert!(
            !port.defers_writes(),
            "without a secondary a write is done at once"
        );
        let path = shared.path().join("file");
        let file = empty_file(&path);
        let early = DiskWrite::new(file.clone(), 0, Bytes::from(b"early".to_vec()));
        assert!(
            port.write_behind(0, early).unwrap().is_some(),
            "not gated, a write is handed back to be done at once"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"",
            "handed back, not written"
        );
        let secondary = joined(dir, &primary);
        let mut source = secondary.source(None);
        sink.append(event(0)).unwrap();
        wait("gated", || primary.shared.lock().gated);
        assert!(port.defers_writes());

        // Produced after 2 events, of which the secondary holds 1: held.
        let w = DiskWrite::new(file.clone(), 3, Bytes::from(b"hello".to_vec()));
        assert!(
            port.write_behind(2, w).unwrap().is_none(),
            "a gated copy takes it"
        );
        port.frame(2, b"says hello was written");
        let mut settle_port = primary.port();
        let settle = std::thread::spawn(move || settle_port.settle_writes());
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"",
            "written before its events were held"
        );
        assert!(
            !settle.is_finished(),
            "a disk operation went ahead of a held write"
        );
        assert_eq!(primary.released(), 0);
        assert!(
            source.written_below() <= 2,
            "a held write was said performed"
        );
        sink.append(event(1)).unwrap();
        wait("the write and the frame", || primary.released() == 2);
        assert!(settle.join().unwrap().is_ok());
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0hello");
        sink.append(event(2)).unwrap();
        wait("the secondary told", || source.written_below() >= 3);

        // A write that fails (the file is read-only here), held with an output after it:
        // once its events are held it is tried and fails; the output never leaves, the
        // secondary is never told it was written, and the VM stops at its next event.
        let ro = Arc::new(std::fs::File::open(&path).unwrap());
        let taken = port.write_behind(4, DiskWrite::new(ro, 0, Bytes::from(b"x".to_vec())));
        assert!(taken.unwrap().is_none(), "a gated copy takes it");
        port.frame(4, b"must never leave");
        sink.append(event(3)).unwrap();
        wait("halted", || primary.shared.lock().halted.is_some());
        assert_eq!(
            primary.released(),
            2,
            "an output after the failed write left"
        );
        assert!(sink.append(event(4)).is_err());
        assert!(port.settle_writes().is_err());
        assert!(
            port.write_behind(5, DiskWrite::new(file, 0, Bytes::from(b"y".to_vec())))
                .is_err()
        );
        assert!(
            source.written_below() <= 4,
            "a failed write was said performed"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0hello");
    }

    /// A write behind whose event the secondary acknowledged is performed by the receiver
    /// as the acknowledgement comes, without waking the releaser; after a slow write the
    /// releaser performs them for a while (the receiver also watches for silence).
    #[test]
    fn a_quick_write_behind_goes_with_its_acknowledgement_and_after_a_slow_one_the_releaser_writes()
    {
        use machine::event::Bytes;
        use machine::port::DiskWrite;
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let primary = default_primary(&dir);
        let (mut sink, mut port) = (primary.sink(), primary.port());
        let path = shared.path().join("file");
        let file = empty_file(&path);
        let secondary = joined(dir, &primary);
        let _source = secondary.source(None);
        sink.append(event(0)).unwrap();
        wait("gated", || primary.shared.lock().gated);
        let by_releaser = || primary.shared.lock().writes_by_releaser;

        // The k-th write behind (from 1), of `data` at `offset`, with a frame after it: both
        // leave once their events are acknowledged.
        let mut write_and_say = |k: u64, offset: u64, data: &[u8]| {
            let w = DiskWrite::new(file.clone(), offset, Bytes::from(data.to_vec()));
            assert!(port.write_behind(k, w).unwrap().is_none());
            port.frame(k, b"written");
            sink.append(event(k)).unwrap();
            port.idle();
            wait("the write and the frame", || primary.released() == 2 * k);
        };
        write_and_say(1, 0, b"one");
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(by_releaser(), 0, "the releaser was woken for a quick write");

        primary.shared.lock().slow_write_at = Some(Instant::now());
        write_and_say(2, 3, b"two");
        assert_eq!(std::fs::read(&path).unwrap(), b"onetwo");
        assert_eq!(
            by_releaser(),
            1,
            "a write right after a slow one was not the releaser's"
        );
    }

    /// What tells a write that waited for storage from one whose thread was preempted: a
    /// sleep counts, computing does not.
    #[test]
    fn a_thread_sleeping_is_counted_and_one_computing_is_not() {
        let before = thread_sleeps().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let slept = thread_sleeps().unwrap();
        assert!(slept > before, "a sleep was not counted");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert_eq!(
            thread_sleeps().unwrap(),
            slept,
            "computing was counted as a sleep"
        );
    }

    #[test]
    fn outputs_go_at_once_while_a_newcomer_catches_up_and_wait_for_it_once_gated() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, mut sink) = primary_with_history(&dir, (0..2000).map(event).collect());
        let mut port = primary.port();
        // The newcomer holds 1000 of the 2000 events of its backlog: far from the end.
        let limit = Arc::new(AtomicU64::new(1000));
        let _fake = fake_secondary_with(&primary, Some(limit.clone()), Default::default());
        wait("acks", || primary.shared.lock().acked == 1000);
        std::thread::sleep(Duration::from_millis(200));
        {
            let st = primary.shared.lock();
            assert!(st.attached.is_some() && !st.gated && !st.release_sent);
        }
        assert!(!primary.protected());
        // Catching up, it is not gated: outputs and disk operations go at once.
        port.frame(2000, b"depends on every event");
        port.console(2000, 1, b"so does this");
        assert_eq!(
            primary.shared.lock().held_total,
            0,
            "an output was held for a secondary still catching up"
        );
        let mut disk_port = primary.port();
        let disk = std::thread::spawn(move || disk_port.before_disk(2000));
        wait("the disk operation", || disk.is_finished());
        assert!(disk.join().unwrap().is_ok());
        // An operation that must not be done twice, performed ungated: the newcomer is not
        // gated while it may be under way, even once it holds every event.
        let intent = Intent {
            seq: 2000,
            kind: Kind::PathCreateDirectory,
            args: 7,
            names: vec![],
        };
        let mut intent_port = primary.port();
        let intent_call = std::thread::spawn(move || intent_port.before_uncertain(&intent));
        wait("the uncertain operation", || intent_call.is_finished());
        assert!(intent_call.join().unwrap().is_ok());
        limit.store(u64::MAX, Ordering::SeqCst);
        wait("acks", || primary.shared.lock().acked == 2000);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !primary.shared.lock().gated,
            "gated while an ungated operation was under way"
        );
        // Its event is in the history: now it is gated, past it, and confirms.
        sink.append(event(2000)).unwrap();
        wait("protected", || primary.protected());
        assert_eq!(primary.shared.lock().release, 2001);
        // Gated: an output after 2002 events waits until the secondary holds them.
        port.frame(2002, b"held");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(primary.shared.lock().held_total, 1);
        assert_eq!(
            primary.released(),
            0,
            "released before the secondary held it"
        );
        sink.append(event(2001)).unwrap();
        wait("release", || primary.released() == 1);
        assert_eq!(generations(&dir), ["gen-1"]);
    }

    #[test]
    fn a_newcomer_silent_past_the_timeout_is_kept_while_ungated_and_dropped_once_gated() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, _sink) = primary_with_history(&dir, (0..2000).map(event).collect());
        let timeout = primary.shared.config.timeout;
        // A newcomer that reads everything and says something only while `speak` is set.
        let speak = Arc::new(AtomicBool::new(false));
        let (addr, pair, s) = (primary.addr, primary.shared.key, speak.clone());
        let _fake = std::thread::spawn(move || {
            let (mut w, mut r) = handshake(addr, pair, "busy");
            let mut received = 0u64;
            while let Ok((_, payload)) = r.recv() {
                let reply = match decode::<ToSecondary>(&payload) {
                    Ok(ToSecondary::Events(e)) => {
                        received += e.len() as u64;
                        None
                    }
                    Ok(ToSecondary::Release { release }) => {
                        Some(ToPrimary::ReleaseHeld { release })
                    }
                    _ => None,
                };
                if !s.load(Ordering::SeqCst) {
                    continue;
                }
                let ack = ToPrimary::Ack {
                    received,
                    executed: received,
                };
                for m in reply.iter().chain([&ack]) {
                    if w.send(KIND_MSG, &encode(m)).is_err() {
                        return;
                    }
                }
            }
        });
        wait("attach", || primary.shared.lock().attached.is_some());
        // Restoring its checkpoint, say: silent for three timeouts, not yet gated.
        std::thread::sleep(timeout * 3);
        assert!(
            primary.shared.lock().attached.is_some(),
            "a newcomer catching up was dropped after a silence of {:?}",
            timeout * 3
        );
        speak.store(true, Ordering::SeqCst);
        wait("protected", || primary.protected());
        // Gated, outputs wait for it: a silence past the timeout is a failure again.
        speak.store(false, Ordering::SeqCst);
        let silent = Instant::now();
        wait("the silent secondary dropped", || {
            primary.shared.lock().attached.is_none()
        });
        assert!(
            silent.elapsed() < crate::CATCH_UP_PATIENCE,
            "a gated secondary silent for {:?} was still attached",
            silent.elapsed()
        );
    }

    #[test]
    fn a_newcomer_of_another_protocol_version_is_refused_saying_why() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let (primary, _sink) = primary_with_history(&dir, (0..3).map(event).collect());
        let stream = TcpStream::connect(primary.addr).unwrap();
        let mut nonce = [0u8; 16];
        std::io::Read::read_exact(&mut &stream, &mut nonce).unwrap();
        let key = connection_key(&primary.shared.key, &nonce);
        let hello = encode(&ToPrimary::Hello {
            host: "old".into(),
            from: 0,
        });
        let old = crate::wire::encode_as(crate::wire::VERSION - 1, &key, 0, KIND_MSG, &hello);
        std::io::Write::write_all(&mut &stream, &old).unwrap();
        let mut r = FrameReader::new(stream.try_clone().unwrap(), key);
        let (_, reply) = r.recv().unwrap();
        match decode::<ToSecondary>(&reply).unwrap() {
            ToSecondary::Refused(why) => assert!(why.contains("protocol version"), "{why}"),
            other => panic!("answered {other:?}"),
        }
        assert!(matches!(
            r.recv(),
            Err(crate::wire::FrameError::Closed | crate::wire::FrameError::Io(_))
        ));
        assert!(primary.shared.lock().attached.is_none());
        assert_eq!(generations(&dir), ["gen-1"]);
    }
}
