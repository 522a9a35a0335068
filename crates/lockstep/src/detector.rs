//! Failure detection on the logging channel: how long a silence may last before the other
//! copy is suspected, adapted to the jitter observed on this channel.
//!
//! Each side hears the other at least every heartbeat (and far more often under load). The
//! detector ([`Detector`]) is fed the arrival time of every frame and answers with the
//! silence that counts as a failure: the larger of
//! - `mean + K·stddev` of the inter-arrival times (exponentially weighted, so that it
//!   follows the channel as its load changes), and
//! - `MARGIN ×` the longest inter-arrival time seen over the last [`MEMORY`] seconds (a
//!   scheduling stall or a burst of lateness once seen keeps the detector patient for a
//!   while: stalls come back),
//!
//! clamped to `[floor, ceiling]`. Until it has heard [`WARMUP`] frames it answers the
//! ceiling (the configured timeout): a fresh channel has shown nothing of its jitter yet.
//!
//! Invariants: the answer is always within `[floor, ceiling]` (the floor is first lowered
//! to the ceiling if above it); its state is bounded (a fixed ring of per-second maxima
//! and three numbers); any sequence of arrival times is accepted, out of order included
//! (a time before the previous one counts as an interval of zero). It is pure: times are
//! given, never read, so that it is tested by feeding it arrival times.
//!
//! [`Watched`] applies it to a channel's reader: the socket's read timeout follows the
//! detector, so that a read that finds the channel silent that long fails
//! ([`crate::wire::FrameError::Silent`]) and the caller treats the other copy as lost. While
//! a newcomer catches up ungated, its channel is given patience
//! ([`Watched::set_patience`], [`crate::CATCH_UP_PATIENCE`]): a silence counts only past it
//! too, since nothing waits on that copy and it cannot go live.
//!
//! **This process's own stalls are not the peer's silence.** When the host is so busy
//! that this process itself did not run (a burst of CPU contention, memory pressure, a
//! stopped machine), the other copy's frames may be late for the same reason, and a
//! failover would be spurious. A ticking thread ([`Pauses`]) records every interval in
//! which this process was not scheduled; a silence is counted without them
//! ([`Pauses::starved`]), so only time this process was running and heard nothing counts
//! toward the timeout. A peer that really died is detected as before: this process ran
//! all along, so nothing is discounted (the failover gap is unchanged).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::wire::{FrameError, FrameReader};

/// Frames heard before the detector trusts what it measured.
pub const WARMUP: u32 = 16;
/// How many standard deviations above the mean an interval may be.
const K: f64 = 8.0;
/// How far above the longest recent interval the timeout stays.
const MARGIN: f64 = 2.0;
/// Seconds over which the longest interval is remembered (a ring of per-second maxima).
pub const MEMORY: usize = 30;
/// Weight of a new interval in the running mean and variance.
const ALPHA: f64 = 1.0 / 32.0;

/// An adaptive failure detector for one direction of one channel. Times are durations
/// since an origin the caller picks (the channel's start, say).
#[derive(Clone, Debug)]
pub struct Detector {
    floor: Duration,
    ceiling: Duration,
    heard: u32,
    last: Option<Duration>,
    /// Exponentially weighted mean and variance of the intervals, in seconds.
    mean: f64,
    var: f64,
    /// The longest interval that ended in each of the last [`MEMORY`] seconds, by the
    /// second it ended in (`second`, `longest`); stale slots are ignored.
    recent: [(u64, f64); MEMORY],
}

impl Detector {
    /// A detector that never answers less than `floor` nor more than `ceiling`.
    pub fn new(floor: Duration, ceiling: Duration) -> Detector {
        Detector {
            floor: floor.min(ceiling),
            ceiling,
            heard: 0,
            last: None,
            mean: 0.0,
            var: 0.0,
            recent: [(u64::MAX, 0.0); MEMORY],
        }
    }

    /// A frame arrived at `at`.
    pub fn heard(&mut self, at: Duration) {
        if let Some(last) = self.last {
            let gap = at.saturating_sub(last).as_secs_f64();
            if self.heard <= 1 {
                self.mean = gap;
                self.var = 0.0;
            } else {
                // West's incremental form of the exponentially weighted variance.
                let diff = gap - self.mean;
                let incr = ALPHA * diff;
                self.mean += incr;
                self.var = (1.0 - ALPHA) * (self.var + diff * incr);
            }
            let second = at.as_secs();
            let slot = &mut self.recent[(second % MEMORY as u64) as usize];
            if slot.0 != second {
                *slot = (second, 0.0);
            }
            slot.1 = slot.1.max(gap);
        }
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
        self.heard = self.heard.saturating_add(1);
    }

    /// The silence, counted from the last frame, that is a suspected failure.
    pub fn timeout(&self) -> Duration {
        if self.heard < WARMUP {
            return self.ceiling;
        }
        let now = self.last.map_or(0, |l| l.as_secs());
        let longest = self
            .recent
            .iter()
            .filter(|(second, _)| *second <= now && now - *second < MEMORY as u64)
            .map(|(_, gap)| *gap)
            .fold(0.0, f64::max);
        let spread = self.mean + K * self.var.max(0.0).sqrt();
        let want = spread.max(MARGIN * longest);
        // Non-finite values cannot arise from finite times, but must never panic.
        let want = if want.is_finite() {
            Duration::from_secs_f64(want.clamp(0.0, self.ceiling.as_secs_f64()))
        } else {
            self.ceiling
        };
        want.clamp(self.floor, self.ceiling)
    }
}

/// The nice value of the channel's receiving threads (the primary's `ft-conn`, the
/// secondary's `ft-recv`): what they read must not wait behind the VM, the client or
/// anything else busy on the host, or a frame that did arrive would be read late and the
/// silence taken for a failure. They block between frames and never spin.
///
/// The sending threads (`ft-send`, `ft-ack`) are left at the usual priority on purpose:
/// favoured, they preempt the VM at every event it logs and send one frame per event
/// instead of a batch (measured with `tandem bench ft --quick`, two runs each way: the
/// channel's CPU per event about doubled, 37-41 µs against 19-20, and throughput_ratio
/// fell from 0.46-0.63 to 0.32-0.36). Favouring the receivers alone showed no cost
/// beyond this machine's noise. Heartbeats are due only when the channel is otherwise
/// idle. (The secondary's receiver writes its acknowledgements itself, one small frame per
/// frame received: favoured, the acknowledgement the primary's outputs wait for is never
/// late behind the replay; the primary's receiver writes the outputs they release.)
pub const CHANNEL_NICE: i32 = -10;

/// Favour the calling thread (a receiving thread of the channel) with the scheduler:
/// nice [`CHANNEL_NICE`]. Fails soft: without the privilege to raise a priority the
/// thread runs at its usual one (logged once per process).
pub fn favour_this_thread() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    // SAFETY: gettid(2) takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority(2) on this very thread's id (on Linux, PRIO_PROCESS with a
    // thread id sets that thread's nice value); no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, CHANNEL_NICE) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        WARNED.call_once(|| {
            tracing::info!(
                "logging channel threads run at the usual priority (cannot set nice \
                 {CHANNEL_NICE}: {e}); a busy host may delay heartbeats"
            )
        });
    }
}

/// How often the pause monitor's thread wakes up. A stall is measured from when the tick
/// was due, so one that began between ticks is taken for up to this much shorter than it
/// was (10 ms against detection timeouts of 150 ms and more); each tick costs a context
/// switch (tens of µs on a paravirtualised host), and at 5 ms the ticks were a fifth of an
/// idle FT copy's CPU.
const TICK: Duration = Duration::from_millis(10);
/// A wake-up later than [`TICK`] by more than this is a stall of this process.
const STALL: Duration = Duration::from_millis(20);
/// How many stalls are remembered (the oldest dropped first; a silence is at most a
/// ceiling long, and stalls shorter than [`STALL`] are not kept).
const STALLS_KEPT: usize = 256;

/// The intervals in which this process was not scheduled, as a thread of its own that
/// wakes up every [`TICK`] sees them. One per process, started on first use.
pub struct Pauses {
    origin: Instant,
    /// When the ticking thread last ran (µs since `origin`).
    last_tick: std::sync::atomic::AtomicU64,
    /// Stalls, oldest first: (from, to) in µs since `origin`.
    stalls: std::sync::Mutex<std::collections::VecDeque<(u64, u64)>>,
}

impl Pauses {
    /// The process's monitor; `None` if its thread cannot be started (then nothing is
    /// discounted: detection works as without it).
    pub fn get() -> Option<&'static Pauses> {
        static PAUSES: std::sync::OnceLock<Option<&'static Pauses>> = std::sync::OnceLock::new();
        *PAUSES.get_or_init(|| {
            let p: &'static Pauses = Box::leak(Box::new(Pauses::new()));
            std::thread::Builder::new()
                .name("ft-pauses".into())
                .spawn(move || {
                    // As favoured as the receivers: a stall it records is one they had too.
                    favour_this_thread();
                    loop {
                        std::thread::sleep(TICK);
                        p.tick(p.micros(Instant::now()));
                    }
                })
                .ok()
                .map(|_| p)
        })
    }

    fn new() -> Pauses {
        Pauses {
            origin: Instant::now(),
            last_tick: std::sync::atomic::AtomicU64::new(0),
            stalls: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// The ticking thread ran at `now` (µs since the origin).
    fn tick(&self, now: u64) {
        use std::sync::atomic::Ordering;
        let before = self.last_tick.swap(now, Ordering::Relaxed);
        let late = now.saturating_sub(before);
        if late > (TICK + STALL).as_micros() as u64 {
            let mut stalls = self.stalls.lock().unwrap_or_else(|p| p.into_inner());
            if stalls.len() == STALLS_KEPT {
                stalls.pop_front();
            }
            // The thread was due one tick after it last ran: the rest is the stall.
            stalls.push_back((before + TICK.as_micros() as u64, now));
        }
    }

    /// How much of `[since, now]` this process spent not running: the stalls recorded
    /// within it, and the one it may be in right now (the ticking thread has not run for
    /// longer than a stall, which is also the case just after a stall, before it ran).
    pub fn starved(&self, since: Instant, now: Instant) -> Duration {
        self.starved_us(self.micros(since), self.micros(now))
    }

    fn starved_us(&self, since: u64, now: u64) -> Duration {
        use std::sync::atomic::Ordering;
        let overlap = |(a, b): (u64, u64)| b.min(now).saturating_sub(a.max(since));
        let stalls = self.stalls.lock().unwrap_or_else(|p| p.into_inner());
        let mut us: u64 = stalls.iter().copied().map(overlap).sum();
        let last = self.last_tick.load(Ordering::Relaxed);
        if now.saturating_sub(last) > (TICK + STALL).as_micros() as u64 {
            us += overlap((last + TICK.as_micros() as u64, now));
        }
        Duration::from_micros(us.min(now.saturating_sub(since)))
    }
}

/// A channel's reader whose read timeout follows a [`Detector`] fed by its frames.
pub struct Watched {
    reader: FrameReader<TcpStream>,
    detector: Detector,
    origin: Instant,
    /// The read timeout in force on the socket.
    current: Duration,
    /// When the last frame (or the channel's start) was heard.
    heard: Instant,
    /// While set, the least silence that counts as a failure ([`Watched::set_patience`]).
    patience: Option<Duration>,
}

/// The read timeout is changed only when the detector's answer moved this much: one
/// system call per frame would cost the channel more than the precision is worth.
const RESET_STEP: Duration = Duration::from_millis(5);

impl Watched {
    /// Watch `reader`, whose socket's read timeout is `config`'s ceiling until the
    /// detector has heard enough.
    pub fn new(reader: FrameReader<TcpStream>, config: &crate::FtConfig) -> Watched {
        let detector = config.detector();
        let current = detector.timeout();
        let _ = reader.get_ref().set_read_timeout(Some(current));
        let _ = Pauses::get();
        Watched {
            reader,
            detector,
            origin: Instant::now(),
            current,
            heard: Instant::now(),
            patience: None,
        }
    }

    /// Count a silence as a failure only past `patience` too, until this is called again
    /// with `None` (then the detector alone decides once more). For a channel whose copy
    /// no output waits for and that cannot go live (a newcomer catching up ungated): there
    /// a wrong suspicion costs the whole join, and a late one nothing.
    pub fn set_patience(&mut self, patience: Option<Duration>) {
        if patience == self.patience {
            return;
        }
        self.patience = patience;
        let want = self.wanted();
        // If this fails the previous timeout stays in force: the detector's, or longer.
        if self.reader.get_ref().set_read_timeout(Some(want)).is_ok() {
            self.current = want;
        }
    }

    /// Whether the next frame is already here, whole ([`FrameReader::holds_frame`]).
    pub fn holds_frame(&self) -> bool {
        self.reader.holds_frame()
    }

    /// The silence that counts as a failure now.
    fn wanted(&self) -> Duration {
        let t = self.detector.timeout();
        self.patience.map_or(t, |p| t.max(p))
    }

    /// The next frame; [`FrameError::Silent`] once the channel was silent past the
    /// detector's timeout, counting only time this process was running ([`Pauses`]).
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>), FrameError> {
        let mut extended = false;
        let got = loop {
            match self.reader.recv() {
                // Between frames: nothing consumed, the wait may go on.
                Err(FrameError::Silent) if !self.reader.within_frame() => {
                    match self.not_counted() {
                        Some((left, starved)) => {
                            if !extended {
                                extended = true;
                                tracing::info!(
                                    "logging channel silent for {} ms, {} ms of them while this process was not running: not counted",
                                    self.heard.elapsed().as_millis(),
                                    starved.as_millis()
                                );
                            }
                            if self.reader.get_ref().set_read_timeout(Some(left)).is_err() {
                                break Err(FrameError::Silent);
                            }
                        }
                        None => break Err(FrameError::Silent),
                    }
                }
                Err(FrameError::Silent) => {
                    tracing::warn!(
                        "logging channel silent for {} ms within a frame (the detector's timeout; ceiling {} ms)",
                        self.current.as_millis(),
                        self.detector.ceiling.as_millis()
                    );
                    break Err(FrameError::Silent);
                }
                other => break other,
            }
        };
        if extended {
            let _ = self.reader.get_ref().set_read_timeout(Some(self.current));
        }
        let got = got?;
        self.heard = Instant::now();
        self.detector.heard(self.origin.elapsed());
        let want = self.wanted();
        if want.abs_diff(self.current) >= RESET_STEP {
            // If this fails the previous timeout stays in force: still within bounds.
            if self.reader.get_ref().set_read_timeout(Some(want)).is_ok() {
                self.current = want;
            }
        }
        Ok(got)
    }

    /// After a silence past the timeout: how much longer to wait, if part of the silence
    /// was time this process was not running, and how much that was; `None` (said) if it
    /// was silent while this process ran for the whole timeout.
    fn not_counted(&self) -> Option<(Duration, Duration)> {
        let now = Instant::now();
        let silence = now.saturating_duration_since(self.heard);
        let starved = Pauses::get().map_or(Duration::ZERO, |p| p.starved(self.heard, now));
        let counted = silence.saturating_sub(starved);
        if counted + Duration::from_millis(1) < self.current {
            return Some((self.current - counted, starved));
        }
        tracing::warn!(
            "logging channel silent for {} ms ({} ms of it while this process was not running; the detector's timeout {} ms, ceiling {} ms)",
            silence.as_millis(),
            starved.as_millis(),
            self.current.as_millis(),
            self.detector.ceiling.as_millis()
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_count_only_the_time_this_process_was_not_running() {
        let p = Pauses::new();
        let us = |n: u64| n * 1000;
        let (k, stall) = (TICK.as_millis() as u64, STALL.as_millis() as u64);
        // Three ticks on time, then nothing until 100 ms: a stall from when the fourth was
        // due to 100 ms.
        for t in [0, k, 2 * k, 100, 100 + k, 100 + 2 * k] {
            p.tick(us(t));
        }
        let end = 100 + 2 * k;
        assert_eq!(p.starved_us(us(0), us(end + 2)), ms(100 - 3 * k));
        // Only the part of a stall inside the window counts.
        assert_eq!(p.starved_us(us(50), us(end + 2)), ms(50));
        assert_eq!(p.starved_us(us(100), us(end + 2)), Duration::ZERO);
        // Late by less than a stall: not counted.
        let last = end + k + stall - 1;
        p.tick(us(last));
        assert_eq!(p.starved_us(us(end), us(last + 1)), Duration::ZERO);
        // A stall in progress (the ticking thread has not run for 110 ms) counts up to now.
        assert_eq!(p.starved_us(us(last - 10), us(last + 110)), ms(110 - k));
        // Never more than the window.
        assert!(p.starved_us(us(last + 80), us(last + 110)) <= ms(30));
        // Bounded memory.
        for i in 0..2 * STALLS_KEPT as u64 {
            p.tick(us(1000 + 100 * i));
        }
        assert_eq!(p.stalls.lock().unwrap().len(), STALLS_KEPT);
    }

    const FLOOR: Duration = Duration::from_millis(100);
    const CEILING: Duration = Duration::from_millis(300);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rounded(d: Duration) -> u128 {
        (d.as_micros() + 500) / 1000
    }

    /// Feed arrivals every `every` ms from `from` ms for `count` frames; the time of the last.
    fn feed(d: &mut Detector, from: u64, every: u64, count: u64) -> u64 {
        let mut t = from;
        for i in 0..count {
            t = from + i * every;
            d.heard(ms(t));
        }
        t
    }

    #[test]
    fn a_fresh_channel_waits_the_ceiling() {
        let mut d = Detector::new(FLOOR, CEILING);
        assert_eq!(d.timeout(), CEILING);
        feed(&mut d, 0, 20, u64::from(WARMUP) - 1);
        assert_eq!(d.timeout(), CEILING);
    }

    #[test]
    fn steady_heartbeats_bring_it_down_to_the_floor() {
        let mut d = Detector::new(FLOOR, CEILING);
        feed(&mut d, 0, 20, 200);
        assert_eq!(d.timeout(), FLOOR);
    }

    #[test]
    fn a_stall_once_seen_keeps_it_patient_and_then_is_forgotten() {
        let mut d = Detector::new(FLOOR, CEILING);
        let t = feed(&mut d, 0, 20, 200);
        // One 120 ms stall: twice it is 240 ms.
        d.heard(ms(t + 120));
        assert_eq!(rounded(d.timeout()), 240);
        // Still remembered 20 s later...
        let t = feed(&mut d, t + 140, 20, 1000);
        assert_eq!(rounded(d.timeout()), 240);
        // ...and forgotten once it is over MEMORY seconds old.
        feed(&mut d, t + 20, 20, 1000);
        assert_eq!(d.timeout(), FLOOR);
    }

    #[test]
    fn jitter_raises_it_and_the_ceiling_bounds_it() {
        let mut d = Detector::new(FLOOR, CEILING);
        // Intervals alternating 5 and 75 ms: mean 40, stddev 35; mean + 8·sd = 320 ms and
        // twice the longest is 150: the ceiling.
        let mut t = 0;
        for i in 0..400 {
            t += if i % 2 == 0 { 5 } else { 75 };
            d.heard(ms(t));
        }
        assert_eq!(d.timeout(), CEILING);
        // Light jitter (18-22 ms): the floor.
        let mut d = Detector::new(FLOOR, CEILING);
        let mut t = 0;
        for i in 0..400 {
            t += 18 + (i % 5);
            d.heard(ms(t));
        }
        assert_eq!(d.timeout(), FLOOR);
    }

    #[test]
    fn load_then_idle_stays_at_the_floor() {
        // Frames every millisecond under load, then heartbeats every 20 ms.
        let mut d = Detector::new(FLOOR, CEILING);
        let t = feed(&mut d, 0, 1, 5000);
        assert_eq!(d.timeout(), FLOOR);
        feed(&mut d, t + 20, 20, 100);
        assert_eq!(d.timeout(), FLOOR);
    }

    #[test]
    fn hostile_times_never_panic_and_stay_in_bounds() {
        let mut d = Detector::new(FLOOR, CEILING);
        for t in [5_000u64, 0, u64::MAX / 2, 3, u64::MAX, 7, 1, 0, 0, 0] {
            d.heard(Duration::from_millis(t));
            d.heard(Duration::MAX);
            let got = d.timeout();
            assert!(got >= FLOOR && got <= CEILING, "{got:?}");
        }
        for _ in 0..100 {
            d.heard(Duration::ZERO);
        }
        let got = d.timeout();
        assert!(got >= FLOOR && got <= CEILING, "{got:?}");
    }

    /// A channel on loopback whose other side `talk`s and then is silent, the connection
    /// held open until the writer is joined; its reader watched with `config`.
    fn watched_channel(
        config: &crate::FtConfig,
        talk: impl FnOnce(&mut crate::wire::FrameWriter<TcpStream>) + Send + 'static,
    ) -> (
        Watched,
        std::thread::JoinHandle<crate::wire::FrameWriter<TcpStream>>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let key = [3u8; 32];
        let writer = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut w = crate::wire::FrameWriter::new(conn, key);
            talk(&mut w);
            w
        });
        let stream = TcpStream::connect(addr).unwrap();
        (Watched::new(FrameReader::new(stream, key), config), writer)
    }

    #[test]
    fn a_watched_channel_that_falls_silent_fails_and_one_that_closes_says_so() {
        let config = crate::FtConfig::default();
        let (mut r, writer) = watched_channel(&config, |w| {
            for _ in 0..2 * WARMUP {
                w.send(1, b"beat").unwrap();
                std::thread::sleep(ms(2));
            }
        });
        for _ in 0..2 * WARMUP {
            assert_eq!(r.recv().unwrap(), (1, b"beat".to_vec()));
        }
        // The detector has heard enough: its timeout is below the configured one.
        assert!(r.current < config.timeout, "{:?}", r.current);
        assert!(matches!(r.recv(), Err(FrameError::Silent)));
        drop(writer.join().unwrap());
        assert!(matches!(r.recv(), Err(FrameError::Closed)));
    }

    #[test]
    fn patience_outlasts_a_silence_past_the_timeout_and_once_dropped_the_timeout_holds() {
        let config = crate::FtConfig {
            timeout: ms(100),
            min_timeout: ms(50),
            ..Default::default()
        };
        let (mut r, writer) = watched_channel(&config, |w| {
            w.send(1, b"beat").unwrap();
            // Silent for three timeouts: a newcomer busy restoring its checkpoint.
            std::thread::sleep(ms(300));
            w.send(1, b"late").unwrap();
        });
        r.set_patience(Some(ms(2000)));
        assert_eq!(r.recv().unwrap(), (1, b"beat".to_vec()));
        assert_eq!(r.recv().unwrap(), (1, b"late".to_vec()));
        r.set_patience(None);
        assert_eq!(r.current, config.timeout);
        let start = Instant::now();
        assert!(matches!(r.recv(), Err(FrameError::Silent)));
        assert!(start.elapsed() < ms(1500), "{:?}", start.elapsed());
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_floor_above_the_ceiling_is_the_ceiling() {
        let mut d = Detector::new(ms(500), CEILING);
        feed(&mut d, 0, 20, 100);
        assert_eq!(d.timeout(), CEILING);
    }
}
