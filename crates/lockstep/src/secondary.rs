//! The secondary: replays the primary's events as they arrive, and goes live when the
//! primary is lost and arbitration says so.
//!
//! A receiver thread takes frames into a queue, watches for silence and acknowledges what
//! it received itself, right after each frame of events, or after the last of frames that
//! arrived together (and an intent as it comes): the primary's outputs wait for that
//! acknowledgement, so it goes before the receiver waits again, without waking another
//! thread. A sender thread sends a heartbeat (received, executed) whenever nothing
//! was sent for a heartbeat, and what else the primary is to hear (the end once held, the
//! release point, checkpoints, health, declined handovers). The VM's thread takes events
//! from the queue ([`SecondarySource`]), woken for a batch ([`REPLAY_BATCH`]) or within a
//! heartbeat, not per frame: no output waits for the replay. What it executed rides on the acknowledgements
//! and heartbeats (the lag bound and checkpoints need no more), so it wakes no thread per
//! event. A newcomer catches up ungated: it learns the primary's release
//! point only when the primary gates it (`ToSecondary::Release`, confirmed with
//! `ToPrimary::ReleaseHeld`). When the channel fails the receiver decides: a secondary that
//! was not gated, or does not yet hold the release point, drops out without arbitrating;
//! otherwise it arbitrates. The source hands out every event still queued, then answers
//! "no more" (go live) or an error (halt).
//!
//! Invariants: this copy claims a generation only if it received the release point, holds
//! every event up to it and never received the primary's end; it writes the VM's status
//! only once it won (it is then the live copy), and its own doings to `status.secondary`.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use machine::event::{Event, Intent};
use machine::{End, EventSource, LogError, LogHeader, Tail};

use crate::arbiter::{Arbiter, Claim};
use crate::primary::Primary;
use crate::wire::{FrameReader, FrameWriter, connection_key};
use crate::{FtConfig, FtError, KIND_MSG, ToPrimary, ToSecondary, VmDir, decode, encode, io_err};

enum Verdict {
    GoLive,
    Halt(String),
}

struct State {
    queue: VecDeque<Event>,
    received: u64,
    executed: u64,
    end: Option<End>,
    verdict: Option<Verdict>,
    /// The end's confirmation was sent, or can no longer be (the channel broke).
    end_confirmed: bool,
    /// The primary's intent for the event after those received, if it sent one.
    intent: Option<Intent>,
    /// Every write logged before this event was performed by the primary
    /// (`ToSecondary::Written`): the replay keeps the others to write again if it goes live.
    written_below: u64,
    /// The primary's release point, once it gated this copy: it is eligible to go live
    /// once it holds this many events. Never before.
    release: Option<u64>,
    /// The generation this copy won to go live in, once it did, and why it went live.
    live_generation: Option<u64>,
    went_live: Option<String>,
    /// This copy left on request (an operator's stop) before it went live.
    left: bool,
    /// The latest checkpoint this copy wrote, to be reported to the primary.
    checkpoint: Option<u64>,
    /// The primary was lost and this copy is settling what to do: too late to leave.
    deciding: bool,
    /// This host's health, to be reported to the primary.
    health: Option<crate::health::HostHealth>,
    /// Handovers declined so far, and the latest one's event count and this host's health
    /// then: to be sent to the primary (`ToPrimary::Declined`).
    declines: u64,
    declined: Option<(u64, crate::health::HostHealth)>,
    acknowledger_gone: bool,
    /// The VM's thread waits on [`Shared::vm`] for events (woken only then).
    vm_waiting: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The sender and [`Secondary::finish`] wait on this.
    cv: Condvar,
    /// The VM's thread waits on this for events, the end or a verdict.
    vm: Condvar,
    /// The channel's writing half, shared by the receiver (acknowledgements) and the
    /// sender (the rest): a frame is written whole under this lock. Never taken with
    /// `state` held, so that a write never holds up the VM's thread.
    out: Mutex<FrameWriter<TcpStream>>,
    /// When anything was last sent to the primary (µs since `origin`): the sender sends a
    /// heartbeat only after a heartbeat of silence.
    origin: Instant,
    sent_at: AtomicU64,
    /// This host's health, once watched: a handover is taken only with every path.
    monitor: OnceLock<crate::health::Monitor>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake the VM's thread if it waits for events.
    fn wake_vm(&self, st: &State) {
        if st.vm_waiting {
            self.vm.notify_all();
        }
    }

    /// Something every waiter looks at changed (the end, a verdict).
    fn wake_all(&self) {
        self.cv.notify_all();
        self.vm.notify_all();
    }

    /// The VM's thread waits for events, the end or a verdict.
    fn wait_vm<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.vm_waiting = true;
        let mut st = self.vm.wait(st).unwrap_or_else(|p| p.into_inner());
        st.vm_waiting = false;
        st
    }

    /// Send `msg` to the primary. The receiving thread sends its acknowledgements itself,
    /// so a write that blocked would also stop it watching for silence: the socket's write
    /// timeout is the failure timeout, and a write that long unread (the primary's reader
    /// stuck, e.g. writing released outputs to a stalled console) fails the channel like a
    /// silence would. This side sends only small frames, so its buffer fills only then.
    fn send(&self, msg: &ToPrimary) -> std::io::Result<()> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.send(KIND_MSG, &encode(msg))?;
        self.sent_at
            .store(self.origin.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// When anything was last sent to the primary.
    fn sent_at(&self) -> Instant {
        self.origin + Duration::from_micros(self.sent_at.load(Ordering::Relaxed))
    }
}

pub struct Secondary {
    shared: Arc<Shared>,
    /// The logging channel, to close it when this copy leaves.
    stream: TcpStream,
    pub header: LogHeader,
    pub generation: u64,
}

/// One attempt to join the primary at `addr`: connect (retrying until `deadline`),
/// authenticate with the pair key, say where this copy starts, and read the primary's
/// Hello: the stream, its writer and reader, this host's name and (header, generation).
#[allow(clippy::type_complexity)]
fn handshake(
    dir: &VmDir,
    addr: &str,
    deadline: Instant,
    config: &FtConfig,
    from: u64,
) -> Result<
    (
        TcpStream,
        FrameWriter<TcpStream>,
        FrameReader<TcpStream>,
        String,
        (LogHeader, u64),
    ),
    FtError,
> {
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(io_err(format!("connect to the primary at {addr}"))(e));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(config.timeout))
        .and_then(|()| stream.set_write_timeout(Some(config.timeout)))
        .map_err(io_err("set a timeout"))?;
    let mut nonce = [0u8; 16];
    std::io::Read::read_exact(&mut &stream, &mut nonce)
        .map_err(io_err("read the primary's nonce"))?;
    let key = connection_key(&dir.read_key()?, &nonce);
    let mut writer = FrameWriter::new(stream.try_clone().map_err(io_err("clone the stream"))?, key);
    let host = crate::primary::hostname();
    writer
        .send(
            KIND_MSG,
            &encode(&ToPrimary::Hello {
                host: host.clone(),
                from,
            }),
        )
        .map_err(io_err("send Hello"))?;
    let channel = stream.try_clone().map_err(io_err("clone the stream"))?;
    let mut reader = FrameReader::new(stream, key);
    let (_, hello) = reader.recv()?;
    let hello = match decode(&hello)? {
        ToSecondary::Hello { header, generation } => (header, generation),
        ToSecondary::Refused(why) => return Err(FtError::Refused(why)),
        _ => return Err(FtError::Protocol("expected Hello".into())),
    };
    Ok((channel, writer, reader, host, hello))
}

impl Secondary {
    /// Connect to the primary at `addr` (retrying for `wait`), authenticate with the pair
    /// key from shared storage, and start following its event stream from event `from`
    /// (0: the VM's power-on; else the position of the checkpoint this copy restored).
    pub fn connect(
        dir: VmDir,
        addr: &str,
        wait: Duration,
        config: FtConfig,
        from: u64,
    ) -> Result<Secondary, FtError> {
        let deadline = Instant::now() + wait;
        // A primary still holding the secondary this one replaces (being stopped by its
        // agent at this moment, say) refuses a second: ask again until `wait` is over.
        let (stream, writer, reader, host, (header, generation)) = loop {
            match handshake(&dir, addr, deadline, &config, from) {
                Err(FtError::Refused(why))
                    if why.contains(crate::primary::ATTACHED_ALREADY)
                        && Instant::now() < deadline =>
                {
                    tracing::info!("the primary at {addr} {why}; asking again");
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => break other?,
            }
        };
        let channel = stream;
        let mut reader = crate::detector::Watched::new(reader, &config);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                received: from,
                executed: from,
                end: None,
                verdict: None,
                end_confirmed: false,
                intent: None,
                written_below: 0,
                release: None,
                live_generation: None,
                went_live: None,
                left: false,
                checkpoint: None,
                deciding: false,
                health: None,
                declines: 0,
                declined: None,
                acknowledger_gone: false,
                vm_waiting: false,
            }),
            cv: Condvar::new(),
            vm: Condvar::new(),
            out: Mutex::new(writer),
            origin: Instant::now(),
            sent_at: AtomicU64::new(0),
            monitor: OnceLock::new(),
        });
        dir.write_secondary_status(&[
            ("role", "secondary".into()),
            ("host", host.clone()),
            ("generation", generation.to_string()),
            ("release", "none".into()),
        ]);
        let s = shared.clone();
        let heartbeat = config.heartbeat;
        std::thread::Builder::new()
            .name("ft-ack".into())
            .spawn(move || {
                acknowledge(&s, heartbeat);
                s.lock().acknowledger_gone = true;
                s.cv.notify_all();
            })
            .map_err(io_err("start the acknowledger"))?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ft-recv".into())
            .spawn(move || {
                let why = match follow(&s, &mut reader, &dir, &host, generation) {
                    Ok(()) => {
                        let release = release_field(s.lock().release);
                        dir.write_secondary_status(&[
                            ("role", "ending".into()),
                            ("host", host.clone()),
                            ("generation", generation.to_string()),
                            ("release", release),
                        ]);
                        return;
                    }
                    Err(FtError::HandedOver(reason)) => format!("handover: {reason}"),
                    Err(e) => format!("primary lost ({e})"),
                };
                decide(&s, &dir, generation, &host, &why);
            })
            .map_err(io_err("start the receiver"))?;
        tracing::info!(
            "secondary following the primary at {addr} (generation {generation}); catching up, not eligible to go live before the primary gates it"
        );
        Ok(Secondary {
            shared,
            stream: channel,
            header,
            generation,
        })
    }

    /// The primary's release point, once it gated this copy (it is eligible to go live
    /// once it holds that many events).
    pub fn release(&self) -> Option<u64> {
        self.shared.lock().release
    }

    /// Leave (an operator stopped this copy) unless it already went live or holds the end:
    /// it drops out without claiming a generation, and the primary, finding the channel
    /// closed, carries on unprotected. A stop is never remembered for a later go-live.
    /// Returns whether it left.
    pub fn leave(&self, why: &str) -> bool {
        {
            let mut st = self.shared.lock();
            if st.verdict.is_some() || st.end.is_some() || st.deciding {
                return false;
            }
            st.left = true;
            st.verdict = Some(Verdict::Halt(format!("left: {why}")));
        }
        self.shared.wake_all();
        tracing::warn!("secondary leaving: {why}; not claiming a generation");
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        true
    }

    /// Whether this copy left on request ([`Secondary::leave`]).
    pub fn left(&self) -> bool {
        self.shared.lock().left
    }

    /// The generation this copy went live in, if it won arbitration.
    pub fn live_generation(&self) -> Option<u64> {
        self.shared.lock().live_generation
    }

    /// Why this copy went live ("handover: ...", "primary lost (...)"), once it did.
    pub fn went_live(&self) -> Option<String> {
        self.shared.lock().went_live.clone()
    }

    /// The replaying VM's events. Each one handed out is kept by `standby` (this copy's
    /// primary-to-be), so that once live it can serve a newcomer the events since the
    /// latest checkpoint.
    pub fn source(&self, standby: Option<Primary>) -> SecondarySource {
        SecondarySource {
            shared: self.shared.clone(),
            standby,
            lowered: Lowered::NotYet,
        }
    }

    /// Report this host's health to the primary whenever it changes.
    /// A handover is declined while this host, looked at afresh, lacks a path.
    pub fn watch_health(&self, monitor: crate::health::Monitor) -> std::io::Result<()> {
        let _ = self.shared.monitor.set(monitor.clone());
        let s = self.shared.clone();
        std::thread::Builder::new()
            .name("ft-health-report".into())
            .spawn(move || {
                let mut now = monitor.current();
                loop {
                    {
                        let mut st = s.lock();
                        if st.verdict.is_some() || st.acknowledger_gone {
                            return;
                        }
                        if st.health.as_ref() != Some(&now) {
                            st.health = Some(now.clone());
                            s.cv.notify_all();
                        }
                    }
                    // Woken by a change; at least every second, to end with the copy.
                    now = monitor.wait_change(&now, Duration::from_secs(1));
                }
            })
            .map(drop)
    }

    /// This copy wrote a checkpoint at event `events`: tell the primary, which then drops
    /// the events before it.
    pub fn checkpointed(&self, events: u64) {
        self.shared.lock().checkpoint = Some(events);
        self.shared.cv.notify_all();
    }

    /// The replay ended: wait (at most `limit`) until the primary was told that this copy
    /// holds the end, so that the process does not exit (closing the channel) before the
    /// primary heard it: the primary would take that for a lost secondary.
    pub fn finish(&self, limit: Duration) {
        let s = &self.shared;
        let deadline = Instant::now() + limit;
        let mut st = s.lock();
        while st.end.is_some() && !st.end_confirmed && !st.acknowledger_gone {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st =
                s.cv.wait_timeout(st, left)
                    .map(|r| r.0)
                    .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Events, the end and intents each come at the position right after the events received:
/// anything else is a broken stream.
fn in_place(st: &State, position: u64, what: &str) -> Result<(), FtError> {
    if position != st.received {
        return Err(FtError::Protocol(format!(
            "{what} at position {position} where {} events were received",
            st.received
        )));
    }
    Ok(())
}

/// A release point for a status file.
fn release_field(release: Option<u64>) -> String {
    release.map_or_else(|| "none".into(), |r| r.to_string())
}

/// Take frames until the primary ends the run or the channel fails.
fn follow(
    s: &Shared,
    r: &mut crate::detector::Watched,
    dir: &VmDir,
    host: &str,
    generation: u64,
) -> Result<(), FtError> {
    crate::detector::favour_this_thread();
    // Until the primary gates this copy it cannot go live: see `CATCH_UP_PATIENCE`.
    r.set_patience(Some(crate::CATCH_UP_PATIENCE));
    // Events received and not yet acknowledged.
    let mut owed = false;
    loop {
        // Received and checked (the reader verified each frame's CRC and MAC, and each
        // event's place): acknowledged from this thread, since the primary's outputs wait
        // for it, and before it waits for more. Frames that arrived together (already read
        // ahead, whole) are taken first: one acknowledgement for them all, a few
        // microseconds later, instead of a send here and a wake of the primary's
        // receiver for each.
        if owed && !r.holds_frame() {
            let ack = {
                let st = s.lock();
                ToPrimary::Ack {
                    received: st.received,
                    executed: st.executed,
                }
            };
            s.send(&ack).map_err(io_err("acknowledge events"))?;
            owed = false;
        }
        let (_, payload) = r.recv()?;
        match decode::<ToSecondary>(&payload)? {
            ToSecondary::Events(events) => {
                let mut st = s.lock();
                for e in events {
                    in_place(&st, e.seq, "event")?;
                    st.received += 1;
                    st.queue.push_back(e);
                }
                // The replay is not on the output path (outputs wait for what was
                // received, never for what was executed): it is woken for a batch, or by
                // the sender within a heartbeat, not for every frame.
                if st.queue.len() >= REPLAY_BATCH {
                    s.wake_vm(&st);
                }
                owed = true;
            }
            ToSecondary::End(end) => {
                let mut st = s.lock();
                in_place(&st, end.events, "the end")?;
                // From here on this copy ends the way the primary did and never arbitrates.
                st.end = Some(end);
                drop(st);
                s.wake_all();
                return Ok(());
            }
            ToSecondary::Intent(intent) => {
                let seq = intent.seq;
                {
                    let mut st = s.lock();
                    in_place(&st, seq, "an intent")?;
                    st.intent = Some(intent);
                }
                // The primary's VM waits for this before its operation.
                s.send(&ToPrimary::IntentHeld { seq })
                    .map_err(io_err("acknowledge an intent"))?;
            }
            ToSecondary::Written { below } => {
                let mut st = s.lock();
                if below > st.received {
                    return Err(FtError::Protocol(format!(
                        "writes said performed up to event {below} where {} events were received",
                        st.received
                    )));
                }
                st.written_below = st.written_below.max(below);
            }
            ToSecondary::Handover { events, why } => {
                in_place(&s.lock(), events, "a handover")?;
                // Bounded for the logs: the reason comes off the wire.
                let why: String = why.chars().take(200).collect();
                // Taken only with every path, looked at now: a loss that hit both hosts at
                // once (storage, say) is not yet reported after its hold, and a copy that
                // cannot reach storage could not claim the generation anyway: the primary
                // would halt too and the VM be lost. Declined, the VM stays where it is.
                let here = s.monitor.get().map(|m| m.fresh()).unwrap_or_default();
                if let Some(lost) = here.lost() {
                    tracing::error!(
                        "handover ({why}) declined: this host lost {lost}; not claiming a generation"
                    );
                    let mut st = s.lock();
                    st.declines += 1;
                    st.declined = Some((events, here));
                    s.cv.notify_all();
                    continue;
                }
                return Err(FtError::HandedOver(why));
            }
            ToSecondary::Release { release } => {
                let mut st = s.lock();
                // Every event sent before it is at or before the release point, and it
                // comes once.
                if st.release.is_some() || release < st.received {
                    return Err(FtError::Protocol(format!(
                        "a release point {release} where {} events were received{}",
                        st.received,
                        if st.release.is_some() {
                            " (a second one)"
                        } else {
                            ""
                        }
                    )));
                }
                st.release = Some(release);
                s.cv.notify_all();
                drop(st);
                // Eligible from here on: a silence is the failover's to detect.
                r.set_patience(None);
                tracing::info!(
                    "gated by the primary: eligible to go live once holding {release} events"
                );
                dir.write_secondary_status(&[
                    ("role", "secondary".into()),
                    ("host", host.into()),
                    ("generation", generation.to_string()),
                    ("release", release.to_string()),
                ]);
            }
            ToSecondary::Heartbeat => {}
            ToSecondary::Hello { .. } | ToSecondary::Refused(_) => {
                return Err(FtError::Protocol("a second Hello".into()));
            }
        }
    }
}

/// The primary is lost: drop out if this copy has not caught up, otherwise arbitrate; tell
/// the VM what to do once the queue is empty.
fn decide(s: &Shared, dir: &VmDir, generation: u64, host: &str, why: &str) {
    {
        let mut st = s.lock();
        if st.verdict.is_some() {
            // This copy left on request: nothing to settle.
            return;
        }
        // From here a stop no longer makes it leave: it may be about to claim the VM,
        // and if it goes live the stop stops the live VM instead.
        st.deciding = true;
    }
    let next = generation + 1;
    let (received, release) = {
        let st = s.lock();
        (st.received, st.release)
    };
    let verdict = match release {
        // Not gated yet: the primary's outputs did not wait for this copy, so any of them
        // may depend on events it does not hold.
        None => Verdict::Halt(format!(
            "dropped out: {why} during catch-up, holding {received} events, before the \
             primary gated this copy; not claiming a generation"
        )),
        // Outputs depending on events this copy does not hold may have left the primary:
        // going live here would roll back what the world was told.
        Some(release) if received < release => Verdict::Halt(format!(
            "dropped out: {why} during catch-up, holding {received} of the \
             {release} events it must hold to go live; not claiming a generation"
        )),
        Some(_) => {
            match Arbiter::new(&dir.arbitration()).claim(next, &format!("secondary on {host}")) {
                Ok(Claim::Won) => {
                    tracing::warn!("{why}; won arbitration for generation {next}: going live");
                    {
                        let mut st = s.lock();
                        st.live_generation = Some(next);
                        st.went_live = Some(why.to_string());
                    }
                    dir.write_status(
                        next,
                        &[
                            ("role", "live".into()),
                            ("host", host.into()),
                            ("protected", "false".into()),
                            ("generation", next.to_string()),
                            ("went_live", why.into()),
                        ],
                    );
                    Verdict::GoLive
                }
                Ok(Claim::Lost(holder)) => Verdict::Halt(format!(
                    "the primary ({}) kept generation {next}",
                    holder.trim()
                )),
                Err(e) => Verdict::Halt(format!(
                    "{e}: a copy that cannot reach shared storage must not go live"
                )),
            }
        }
    };
    let role = match &verdict {
        Verdict::GoLive => "live",
        Verdict::Halt(why) => {
            tracing::error!("halting: {why}");
            if release.is_none_or(|r| received < r) {
                "dropped-out"
            } else {
                "halted"
            }
        }
    };
    dir.write_secondary_status(&[
        ("role", role.into()),
        ("host", host.into()),
        ("received", received.to_string()),
        ("release", release_field(release)),
    ]);
    s.lock().verdict = Some(verdict);
    s.wake_all();
}

/// The receiver wakes a waiting replay once this many events are queued; fewer wait at
/// most a heartbeat for the sender to wake it. A wake per frame would cost the secondary a
/// context switch per frame of a busy primary, for a replay no output waits for.
const REPLAY_BATCH: usize = 64;

/// The sender: a heartbeat (what was received and executed) after a heartbeat of silence,
/// and whatever else the primary is to hear as it comes. Acknowledgements of events and
/// intents go from the receiver ([`follow`]).
fn acknowledge(s: &Shared, heartbeat: Duration) {
    let mut end_confirmed = false;
    let mut checkpoint_sent = None;
    let mut health_sent = None;
    let mut release_sent = None;
    let mut declines_sent = 0;
    loop {
        let declined = {
            let st = s.lock();
            (st.declines != declines_sent)
                .then(|| st.declined.clone().map(|d| (st.declines, d)))
                .flatten()
        };
        if let Some((n, (events, health))) = declined {
            // First: the primary holds its VM paused until it hears this.
            declines_sent = n;
            if s.send(&ToPrimary::Declined { events, health }).is_err() {
                return;
            }
            continue;
        }
        let (now, end, release, checkpoint, health) = {
            let mut st = s.lock();
            loop {
                if st.verdict.is_some() {
                    return;
                }
                let news = (!end_confirmed && st.end.is_some())
                    || st.release != release_sent
                    || st.checkpoint != checkpoint_sent
                    || st.health != health_sent
                    || st.declines != declines_sent;
                // Silent for a heartbeat (the receiver sends under load): time for one.
                let left = (s.sent_at() + heartbeat).saturating_duration_since(Instant::now());
                if news || left.is_zero() {
                    break;
                }
                // Events the receiver left for a batch are replayed within a heartbeat.
                if !st.queue.is_empty() {
                    s.wake_vm(&st);
                }
                st =
                    s.cv.wait_timeout(st, left)
                        .map(|r| r.0)
                        .unwrap_or_else(|p| p.into_inner().0);
            }
            let end = (!end_confirmed)
                .then(|| st.end.as_ref().map(|e| e.events))
                .flatten();
            let release = st.release.filter(|r| Some(*r) != release_sent);
            let checkpoint = st.checkpoint.filter(|c| Some(*c) != checkpoint_sent);
            let health = st
                .health
                .clone()
                .filter(|h| Some(h) != health_sent.as_ref());
            ((st.received, st.executed), end, release, checkpoint, health)
        };
        let msg = match (end, release, checkpoint, health) {
            (Some(events), ..) => ToPrimary::EndHeld { events },
            (None, Some(release), ..) => {
                release_sent = Some(release);
                ToPrimary::ReleaseHeld { release }
            }
            (None, None, Some(events), _) => {
                checkpoint_sent = Some(events);
                ToPrimary::Checkpoint { events }
            }
            (None, None, None, Some(h)) => {
                health_sent = Some(h.clone());
                ToPrimary::Health(h)
            }
            (None, None, None, None) => ToPrimary::Ack {
                received: now.0,
                executed: now.1,
            },
        };
        if s.send(&msg).is_err() {
            // The receiver notices a broken channel and decides (unless it holds the end).
            return;
        }
        if end.is_some() {
            end_confirmed = true;
            s.lock().end_confirmed = true;
            s.cv.notify_all();
        }
    }
}

/// The niceness a newcomer's replay runs at while it catches up ungated: in the background.
/// A catch-up is a burst of replay as fast as the CPU allows; a live VM on the same host
/// (the primary itself in a one-machine lab, other VMs' primaries in a cluster) must not
/// pause for it. The threads that receive and acknowledge keep their priority: once the
/// copy is gated, outputs wait for them.
pub const CATCH_UP_NICE: i32 = 19;

/// Whether the replaying thread runs in the background ([`CATCH_UP_NICE`]).
enum Lowered {
    NotYet,
    /// Lowered from this niceness.
    From(i32),
    /// Back at its own priority (or never lowered: gated from the start).
    Done,
}

/// The calling thread's niceness, and setting it (Linux: niceness is per thread).
pub(crate) fn thread_nice() -> Option<i32> {
    // SAFETY: gettid and getpriority take no pointers; errno is the calling thread's own
    // and is cleared first, since -1 is both a niceness and the error return.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        (n != -1 || *libc::__errno_location() == 0).then_some(n)
    }
}

fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take no pointers and affect only the calling thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The replaying VM's events.
pub struct SecondarySource {
    shared: Arc<Shared>,
    standby: Option<Primary>,
    lowered: Lowered,
}

impl SecondarySource {
    /// Replay in the background while catching up ungated, at the thread's own priority
    /// once gated (see [`CATCH_UP_NICE`]).
    fn pace(&mut self, gated: bool) {
        match (&self.lowered, gated) {
            (Lowered::NotYet, false) => {
                self.lowered = match thread_nice() {
                    Some(own) if own < CATCH_UP_NICE => match set_thread_nice(CATCH_UP_NICE) {
                        Ok(()) => Lowered::From(own),
                        Err(e) => {
                            tracing::warn!("cannot replay the catch-up in the background: {e}");
                            Lowered::Done
                        }
                    },
                    _ => Lowered::Done,
                };
            }
            (Lowered::NotYet, true) => self.lowered = Lowered::Done,
            (Lowered::From(own), true) => {
                if let Err(e) = set_thread_nice(*own) {
                    tracing::warn!(
                        "caught up, but cannot replay at the priority of before ({own}): {e}"
                    );
                }
                self.lowered = Lowered::Done;
            }
            _ => {}
        }
    }
}

impl EventSource for SecondarySource {
    fn next_event(&mut self) -> Result<Option<Event>, LogError> {
        let gated = self.shared.lock().release.is_some();
        self.pace(gated);
        let s = &self.shared;
        let mut st = s.lock();
        loop {
            if let Some(e) = st.queue.pop_front() {
                // Reported with the next acknowledgement or heartbeat: no wake per event.
                st.executed += 1;
                drop(st);
                if let Some(p) = &self.standby {
                    p.retain(&e);
                }
                return Ok(Some(e));
            }
            match &st.verdict {
                Some(Verdict::GoLive) => return Ok(None),
                Some(Verdict::Halt(why)) => return Err(LogError::Source(format!("halted: {why}"))),
                None => {}
            }
            if st.end.is_some() {
                return Ok(None);
            }
            st = s.wait_vm(st);
        }
    }

    /// The primary's run ended after `events` events by a stop (at a call or between
    /// events) and this copy holds no more: a replaying guest that computes on without
    /// calls is to be stopped there too.
    /// The primary's intent for the operation right after the events this copy holds
    /// (and has all handed out): a copy going live there takes it along.
    fn pending_intent(&mut self) -> Option<Intent> {
        let st = self.shared.lock();
        st.intent
            .clone()
            .filter(|i| i.seq == st.received && st.queue.is_empty())
    }

    fn written_below(&mut self) -> u64 {
        self.shared.lock().written_below
    }

    fn stops_at(&mut self, events: u64) -> bool {
        let st = self.shared.lock();
        st.queue.is_empty()
            && matches!(&st.end, Some(End { exit, events: n, .. }) if exit.is_stop() && *n == events)
    }

    fn tail(&mut self) -> Result<Tail, LogError> {
        let s = &self.shared;
        let mut st = s.lock();
        loop {
            if let Some(e) = st.queue.front() {
                return Ok(Tail::Event(e.seq));
            }
            if let Some(end) = &st.end {
                return Ok(Tail::End(end.clone()));
            }
            match &st.verdict {
                Some(Verdict::GoLive) => return Ok(Tail::GoLive),
                Some(Verdict::Halt(why)) => return Err(LogError::Source(format!("halted: {why}"))),
                None => {}
            }
            st = s.wait_vm(st);
        }
    }
}
