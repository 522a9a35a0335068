//! The primary: streams its VM's events to a secondary and holds outputs to the output rule.
//!
//! One [`Primary`] serves one VM. Its state sits behind one mutex with one condition
//! variable: the VM's thread appends events ([`PrimarySink`]) and outputs ([`GatedPort`]);
//! a listener accepts a secondary on the logging address; per connection a sender streams
//! history and heartbeats and a receiver takes acknowledgements and watches for silence; a
//! releaser sends held outputs once they are acknowledged.
//!
//! Invariants: a held output at position p leaves only when the secondary holds p events or
//! the VM is not protected (no secondary, or arbitration won after losing it); after losing
//! arbitration nothing more leaves, ever.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use machine::event::Event;
use machine::port::{OutputPort, send_frame, write_console};
use machine::{End, EventSink, LogError, LogHeader};

use crate::arbiter::{Arbiter, Claim};
use crate::wire::{FrameReader, FrameWriter, connection_key};
use crate::{FtConfig, FtError, KIND_MSG, ToPrimary, ToSecondary, VmDir, decode, encode, io_err};

enum Held {
    Frame(Vec<u8>),
    Console(u32, Vec<u8>),
}

struct State {
    header: LogHeader,
    history: Vec<Event>,
    end: Option<End>,
    /// Events the attached secondary holds and has executed.
    acked: u64,
    executed: u64,
    /// The attached secondary's connection number, if one is attached.
    attached: Option<u64>,
    next_conn: u64,
    generation: u64,
    halted: Option<String>,
    held: VecDeque<(u64, Held)>,
    /// Outputs the releaser sent after holding them.
    released: u64,
    /// Bytes sent on logging channels, and the input bytes the events carried.
    log_bytes: u64,
    disk_read_bytes: u64,
    net_in_bytes: u64,
}

struct Shared {
    state: Mutex<State>,
    /// New events (or the end) for the sender.
    events: Condvar,
    /// Acknowledgements and changes of protection: the releaser, the disk gate and the
    /// lag bound wait on these.
    acks: Condvar,
    config: FtConfig,
    key: [u8; 32],
    dir: VmDir,
    arbiter: Arbiter,
    tap: Option<Arc<devices::Tap>>,
    console: bool,
    host: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread elsewhere must not take the VM down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(&self, st: &State) {
        let role = if st.halted.is_some() {
            "halted"
        } else {
            "primary"
        };
        self.dir.write_status(&[
            ("role", role.into()),
            ("host", self.host.clone()),
            (
                "protected",
                (st.attached.is_some() && st.halted.is_none()).to_string(),
            ),
            ("generation", st.generation.to_string()),
            ("events", st.history.len().to_string()),
            ("acked", st.acked.to_string()),
            ("log_bytes", st.log_bytes.to_string()),
            ("disk_read_bytes", st.disk_read_bytes.to_string()),
            ("net_in_bytes", st.net_in_bytes.to_string()),
        ]);
    }

    /// The attached secondary went silent or broke the protocol: settle who is live.
    fn lose_secondary(&self, conn: u64, why: &str) {
        let mut st = self.lock();
        if st.attached != Some(conn) || st.halted.is_some() {
            return;
        }
        st.attached = None;
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
        if let Some(why) = &st.halted {
            tracing::error!("halting: {why}");
            // The VM's thread may be waiting for frames: wake it so that it stops.
            machine::request_stop();
        }
        self.status(&st);
        self.events.notify_all();
        self.acks.notify_all();
    }
}

/// A running primary. Dropping it does not stop its threads; they end with the process.
pub struct Primary {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
}

impl Primary {
    /// Claim the next generation, create the pair key and listen for a secondary on `addr`.
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
        let host = hostname();
        let generation = arbiter.current()? + 1;
        if arbiter.claim(generation, &format!("primary on {host}"))? != Claim::Won {
            return Err(FtError::Protocol(format!(
                "another copy claimed generation {generation} first"
            )));
        }
        let listener = TcpListener::bind(addr).map_err(io_err(format!("listen on {addr}")))?;
        let local = listener
            .local_addr()
            .map_err(io_err("read the listening address"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                header,
                history: Vec::new(),
                end: None,
                acked: 0,
                executed: 0,
                attached: None,
                next_conn: 1,
                generation,
                halted: None,
                held: VecDeque::new(),
                released: 0,
                log_bytes: 0,
                disk_read_bytes: 0,
                net_in_bytes: 0,
            }),
            events: Condvar::new(),
            acks: Condvar::new(),
            config,
            key,
            dir,
            arbiter,
            tap,
            console,
            host,
        });
        shared.status(&shared.lock());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ft-listen".into())
            .spawn(move || listen(s, listener))
            .map_err(io_err("start the listener"))?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ft-release".into())
            .spawn(move || release(s))
            .map_err(io_err("start the releaser"))?;
        tracing::info!("primary live in generation {generation}; logging channel on {local}");
        Ok(Primary {
            shared,
            addr: local,
        })
    }

    pub fn sink(&self) -> PrimarySink {
        PrimarySink(self.shared.clone())
    }

    pub fn port(&self) -> GatedPort {
        GatedPort(self.shared.clone())
    }

    /// Outputs held and then released under the output rule so far.
    pub fn released(&self) -> u64 {
        self.shared.lock().released
    }

    /// Why the primary halted, if it did.
    pub fn halted(&self) -> Option<String> {
        self.shared.lock().halted.clone()
    }

    /// Wait (bounded) until the attached secondary holds every event, so that a guest
    /// that exits is not cut off from its secondary mid-stream.
    pub fn drain(&self, limit: std::time::Duration) {
        let deadline = Instant::now() + limit;
        let mut st = self.shared.lock();
        while st.attached.is_some()
            && st.acked < st.history.len() as u64
            && Instant::now() < deadline
        {
            st = self
                .shared
                .acks
                .wait_timeout(st, self.shared.config.heartbeat)
                .map(|r| r.0)
                .unwrap_or_else(|p| p.into_inner().0);
        }
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
    fn append(&mut self, event: &Event) -> Result<(), LogError> {
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
        st.history.push(event.clone());
        s.events.notify_all();
        // Bounded lag: a secondary that trails too far slows the primary down.
        while st.attached.is_some()
            && st.halted.is_none()
            && st.history.len() as u64 > st.executed + s.config.max_lag_events
        {
            st = s.acks.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    fn finish(self: Box<Self>, end: &End) -> Result<(), LogError> {
        let mut st = self.0.lock();
        st.end = Some(end.clone());
        self.0.events.notify_all();
        Ok(())
    }
}

/// Outputs held to the output rule.
pub struct GatedPort(Arc<Shared>);

impl GatedPort {
    fn hold(&mut self, position: u64, out: Held) {
        let s = &self.0;
        let mut st = s.lock();
        if st.halted.is_some() {
            return;
        }
        if st.attached.is_none() && st.held.is_empty() {
            drop(st);
            send(s, out);
            return;
        }
        st.held.push_back((position, out));
        // The releaser waits for acknowledgements; wake it only if this one is due.
        if position <= st.acked {
            s.acks.notify_all();
        }
    }
}

fn send(s: &Shared, out: Held) {
    match out {
        Held::Frame(f) => {
            if let Some(tap) = &s.tap {
                send_frame(tap, &f);
            }
        }
        Held::Console(fd, d) => {
            if s.console {
                write_console(fd, &d);
            }
        }
    }
}

impl OutputPort for GatedPort {
    fn frame(&mut self, position: u64, frame: &[u8]) {
        self.hold(position, Held::Frame(frame.to_vec()));
    }

    fn console(&mut self, position: u64, fd: u32, data: &[u8]) {
        self.hold(position, Held::Console(fd, data.to_vec()));
    }

    fn before_disk(&mut self, position: u64) -> Result<(), LogError> {
        let s = &self.0;
        let mut st = s.lock();
        loop {
            if let Some(why) = &st.halted {
                return Err(LogError::Source(format!("halted: {why}")));
            }
            if st.attached.is_none() || st.acked >= position {
                return Ok(());
            }
            st = s.acks.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Send held outputs as soon as the rule allows, in the order they were produced.
fn release(s: Arc<Shared>) {
    loop {
        let mut st = s.lock();
        let ready = |st: &State| {
            st.held.front().is_some_and(|(p, _)| {
                st.halted.is_none() && (st.attached.is_none() || *p <= st.acked)
            })
        };
        while !ready(&st) {
            st = s.acks.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let mut batch = Vec::new();
        while ready(&st) {
            if let Some((_, out)) = st.held.pop_front() {
                batch.push(out);
            }
        }
        st.released += batch.len() as u64;
        drop(st);
        for out in batch {
            send(&s, out);
        }
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
    let (_, hello) = reader.recv()?;
    let ToPrimary::Hello { host } = decode(&hello)? else {
        return Err(FtError::Protocol("expected Hello".into()));
    };
    let conn = {
        let mut st = s.lock();
        if st.halted.is_some() {
            return Err(FtError::Protocol("this copy has halted".into()));
        }
        if st.attached.is_some() {
            return Err(FtError::Protocol(format!(
                "a secondary is attached already; refusing {host}"
            )));
        }
        let conn = st.next_conn;
        st.next_conn += 1;
        st.attached = Some(conn);
        st.acked = 0;
        st.executed = 0;
        s.status(&st);
        conn
    };
    tracing::info!(
        "secondary {host} attached; streaming {} events of history",
        s.lock().history.len()
    );
    let writer = FrameWriter::new(stream.try_clone().map_err(io_err("clone the stream"))?, key);
    let sender_shared = s.clone();
    let _ = std::thread::Builder::new()
        .name("ft-send".into())
        .spawn(move || {
            if let Err(e) = stream_to(&sender_shared, conn, writer) {
                sender_shared.lose_secondary(conn, &e.to_string());
            }
        });
    let result = receive_from(s, conn, &mut reader, &host);
    if let Err(e) = &result {
        s.lose_secondary(conn, &e.to_string());
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}

/// Serialises exactly as `ToSecondary::Events`, borrowing the events.
pub(crate) struct EventsRef<'a>(pub(crate) &'a [Event]);

impl serde::Serialize for EventsRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_variant("ToSecondary", 1, "Events", self.0)
    }
}

fn stream_to(s: &Shared, conn: u64, mut w: FrameWriter<TcpStream>) -> Result<(), FtError> {
    let hello = {
        let st = s.lock();
        ToSecondary::Hello {
            header: st.header.clone(),
            generation: st.generation,
        }
    };
    w.send(KIND_MSG, &encode(&hello))
        .map_err(io_err("send Hello"))?;
    let mut sent = 0usize;
    let mut end_sent = false;
    let mut status_at = Instant::now();
    loop {
        if status_at.elapsed() > std::time::Duration::from_millis(250) {
            // Keep the counters in the status current for operators and benchmarks.
            s.status(&s.lock());
            status_at = Instant::now();
        }
        let (batch, end) = {
            let mut st = s.lock();
            let deadline = Instant::now() + s.config.heartbeat;
            while st.attached == Some(conn)
                && st.history.len() == sent
                && (st.end.is_none() || end_sent)
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                st = s
                    .events
                    .wait_timeout(st, left)
                    .map(|r| r.0)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if st.attached != Some(conn) {
                return Ok(());
            }
            let upto = st.history.len().min(sent + 4096);
            // Serialised straight from the history: no copy of the events on this path.
            let batch = (upto > sent).then(|| encode(&EventsRef(&st.history[sent..upto])));
            let end = if upto == st.history.len() && !end_sent {
                st.end.clone()
            } else {
                None
            };
            if batch.is_some() {
                // Frame overhead: 16 bytes of header, 4 of CRC, 16 of MAC.
                st.log_bytes += batch.as_ref().map_or(0, |b| b.len() as u64 + 36);
                sent = upto;
            }
            (batch, end)
        };
        if let Some(payload) = batch {
            w.send(KIND_MSG, &payload)
                .map_err(io_err("stream events"))?;
        } else if end.is_none() {
            w.send(KIND_MSG, &encode(&ToSecondary::Heartbeat))
                .map_err(io_err("send a heartbeat"))?;
        }
        if let Some(end) = end {
            w.send(KIND_MSG, &encode(&ToSecondary::End(end)))
                .map_err(io_err("send the end"))?;
            end_sent = true;
        }
    }
}

fn receive_from(
    s: &Shared,
    conn: u64,
    r: &mut FrameReader<TcpStream>,
    host: &str,
) -> Result<(), FtError> {
    let mut caught_up = false;
    loop {
        // The read timeout is the failure timeout: silence that long ends the channel.
        let (_, payload) = r.recv()?;
        match decode::<ToPrimary>(&payload)? {
            ToPrimary::Ack { received, executed } => {
                let mut st = s.lock();
                if st.attached != Some(conn) {
                    return Ok(());
                }
                if received > st.history.len() as u64 || executed > received {
                    return Err(FtError::Protocol(format!(
                        "acknowledgement of {received} events beyond the {} sent",
                        st.history.len()
                    )));
                }
                st.acked = st.acked.max(received);
                st.executed = st.executed.max(executed);
                if !caught_up && executed + 64 >= st.history.len() as u64 {
                    caught_up = true;
                    tracing::info!("secondary {host} caught up at event {executed}: VM PROTECTED");
                    s.status(&st);
                }
                s.acks.notify_all();
            }
            ToPrimary::Hello { .. } => return Err(FtError::Protocol("a second Hello".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secondary::Secondary;
    use machine::EventSource;
    use machine::event::{Event, Kind, Outcome};
    use std::time::Duration;

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

    #[test]
    fn outputs_wait_until_the_secondary_holds_their_events() {
        let shared = tempfile::tempdir().unwrap();
        let dir = VmDir::new(shared.path(), "vm");
        let primary = Primary::start(
            dir.clone(),
            "127.0.0.1:0",
            header(),
            None,
            false,
            FtConfig::default(),
        )
        .unwrap();
        let (mut sink, mut port) = (primary.sink(), primary.port());
        // Unprotected: an output leaves at once.
        port.frame(0, b"before any secondary");
        assert_eq!(primary.released(), 0, "sent directly, not held");

        let secondary = Secondary::connect(
            dir,
            &primary.addr.to_string(),
            Duration::from_secs(5),
            FtConfig::default(),
        )
        .unwrap();
        let mut source = secondary.source();
        wait("attach", || primary.shared.lock().attached.is_some());
        // An output produced after 3 events is held while the secondary has fewer.
        sink.append(&event(0)).unwrap();
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
        sink.append(&event(1)).unwrap();
        sink.append(&event(2)).unwrap();
        // The secondary receives them (it need not have executed them yet).
        wait("release", || primary.released() == 2);
        assert!(disk.join().unwrap().is_ok());
        for seq in 0..3 {
            assert_eq!(source.next_event().unwrap().unwrap().seq, seq);
        }
    }
}
