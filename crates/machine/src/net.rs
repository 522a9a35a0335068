//! The VM's NIC, guest side: how the network stack is driven from the guest's calls.
//!
//! The stack advances only at network steps ([`Vm::net_step`]): each is one event whose
//! outcome holds the frames that arrived since the last step and the VM's monotonic time.
//! Everything else the guest learns of the network (accepted connections, bytes received,
//! readiness) is then a pure function of the stack's state, so socket calls need no
//! events of their own. Frames the stack sends are outputs: digested always, written to
//! the tap only by a live VM.
//!
//! Invariant: a replaying VM's stack takes exactly the steps the recording VM's took, at
//! the same points of the guest's execution, and so holds the same state.
//!
//! The stack delays its acknowledgement of a request for the guest's reply to carry it
//! (one frame instead of two). What is still owed goes at points every copy reaches alike:
//! before the guest waits (in the waiting step, before the wait's deadline is taken, which
//! its event's arguments hold), at a network step past its 40 ms deadline, and before the
//! next event once [`ACK_EVENTS`] passed without a network step, so that a guest busy
//! with other calls (its disk) does not leave its peer retransmitting. A guest that takes
//! longer than the peer's retransmission timeout (200 ms or more) to reach any of those
//! (computing without a call, fewer events that are each slow, socket calls that take no
//! event) holds it that long, as it holds its own retransmissions: the VM sees the stack
//! only at its calls.

use netstack::{NetStack, SockError};

use crate::event::{Kind, Outcome, args_digest};
use crate::vm::{Fault, Inputs, Resume, Vm};
use crate::wasi::{Stop, clockid, errno};

/// Listen backlog of every preopened listener.
const BACKLOG: usize = 1024;
/// How many events may pass without a network step (which looks at the delays' deadlines)
/// while acknowledgements wait for a reply: a server's reply commonly follows a write or
/// two to its disk; a peer retransmits after 200 ms or more without one.
pub(crate) const ACK_EVENTS: u64 = 8;

pub(crate) fn sock_errno(e: SockError) -> u16 {
    match e {
        SockError::WouldBlock => errno::AGAIN,
        SockError::Reset => errno::CONNRESET,
        SockError::Closed => errno::PIPE,
        SockError::BadSocket => errno::BADF,
        SockError::PortInUse(_) => errno::ADDRINUSE,
    }
}

impl Vm {
    /// Power-on: give the VM's network stack its entropy and listeners, and announce the
    /// VM's address on the network.
    pub(crate) fn power_on(&mut self) -> Result<(), Fault> {
        let Some(config) = self.spec.nic.clone() else {
            return Ok(());
        };
        let seed = match self.event(Kind::NetSeed, 0, |h, _, _| h.random(8))? {
            Outcome::Data(d) if d.len() == 8 => {
                u64::from_le_bytes(d[..].try_into().unwrap_or([0; 8]))
            }
            other => return Err(self.unexpected(Kind::NetSeed, &other)),
        };
        let mut net = NetStack::new(config, seed);
        for &port in &self.spec.listen {
            // The CLI refuses duplicate ports; a second listen on one is harmless here.
            let _ = net.listen(port, BACKLOG);
        }
        net.announce();
        self.net = Some(net);
        self.flush_net();
        Ok(())
    }

    /// One network step: take the frames that arrived (if `wait`, waiting for some until
    /// the stack's next timer or the caller's `until`, in VM monotonic time, or for ever)
    /// and advance the stack to now.
    pub(crate) fn net_step(
        &mut self,
        wait: bool,
        until: Option<u64>,
        watch_stdin: bool,
    ) -> Result<(), Fault> {
        let mut deadline = until;
        if wait {
            self.before_wait();
            // Taken here, after the delayed acknowledgements went (their deadline is no
            // timer to wait for): the event's arguments hold it, alike in every copy
            // whether or not one paused for a snapshot before.
            let timers = self.net.as_ref().and_then(NetStack::next_deadline);
            deadline = [until, timers].into_iter().flatten().min();
        }
        let args = args_digest(&[
            &[u8::from(wait), u8::from(watch_stdin)],
            &deadline.unwrap_or(u64::MAX).to_le_bytes(),
        ]);
        let outcome = self.event(Kind::NetStep, args, |h, _, _| {
            h.net_wait(deadline, wait, watch_stdin)
        })?;
        let Outcome::Net { now, frames, stdin } = outcome else {
            return Err(self.unexpected(Kind::NetStep, &outcome));
        };
        let now = self.clock.observe(clockid::MONOTONIC, now);
        self.stdin_ready = stdin;
        self.net_input(now, &frames);
        Ok(())
    }

    /// Advance the stack to `now` (VM monotonic time) with the frames that arrived.
    pub(crate) fn net_input(&mut self, now: u64, frames: &[crate::event::Bytes]) {
        self.net_now = now;
        if let Some(net) = self.net.as_mut() {
            for f in frames {
                net.input(now, f);
            }
            net.on_timers(now);
            // A step sends what is past its deadline; the bound counts the events after it
            // (a server reading its connections dry takes a step per connection).
            self.acks_by = net.acks_delayed().then_some(self.seq + ACK_EVENTS);
        }
        self.flush_net();
    }

    /// Send the acknowledgements the stack is delaying: no reply is coming soon to carry
    /// them. Called only at points every copy reaches alike (see the module's doc).
    pub(crate) fn send_owed_acks(&mut self) {
        self.acks_by = None;
        let now = self.net_now;
        if let Some(net) = self.net.as_mut() {
            net.ack_now(now);
        }
        self.flush_net();
    }

    /// Send what the stack produced: digested always, onto the wire only when live.
    pub(crate) fn flush_net(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        for frame in net.take_output() {
            self.outputs.add("frame", &[&frame]);
            if let Inputs::Live { port, .. } = &mut self.inputs {
                port.frame(self.seq, &frame);
            }
        }
    }

    /// Take network steps until `ready` holds of the stack.
    ///
    /// Before each waiting step is a snapshot point (a server blocked in accept or receive
    /// waits here): with a snapshot due, the call unwinds, marked [`Resume::Socket`], and
    /// rewound comes back here through [`Vm::sock_op`] (see [`crate::capture`]).
    pub(crate) fn net_wait_until(&mut self, ready: impl Fn(&NetStack) -> bool) -> Result<(), Stop> {
        loop {
            let Some(net) = self.net.as_ref() else {
                return Ok(());
            };
            if ready(net) {
                return Ok(());
            }
            if self.snap.is_some() && crate::capture::due(self, self.memory_len) {
                // The snapshot pauses the VM as a wait would; only this copy pauses, so it
                // changes no VM state (what is owed goes in the step after it).
                self.tell_idle();
                self.resume = Some(Resume::Socket);
                return Err(Stop::Unwind);
            }
            self.net_step(true, None, false)?;
        }
    }

    pub(crate) fn net_mut(&mut self) -> Result<&mut NetStack, u16> {
        self.net.as_mut().ok_or(errno::NOTSOCK)
    }

    /// Run a socket operation: first on the stack as it is; if it would block, after one
    /// step that takes what arrived; then, for a blocking socket, after as many waiting
    /// steps as it takes.
    pub(crate) fn sock_op<T>(
        &mut self,
        nonblocking: bool,
        ready: impl Fn(&NetStack) -> bool,
        mut op: impl FnMut(&mut NetStack, u64) -> Result<T, SockError>,
    ) -> Result<T, Stop> {
        let mut stepped = false;
        match self.resume.take() {
            None => {}
            // Interrupted by a snapshot in the wait below: what came before it (a try that
            // would block, a step) was done; go on with the wait.
            Some(Resume::Socket) => {
                self.net_wait_until(&ready)?;
                stepped = true;
            }
            Some(other) => {
                return Err(Stop::Fault(Fault::Internal(format!(
                    "a socket call resumed where {other:?} was interrupted"
                ))));
            }
        }
        loop {
            let now = self.net_now;
            let result = op(self.net_mut()?, now);
            self.flush_net();
            match result {
                Ok(v) => return Ok(v),
                Err(SockError::WouldBlock) if !stepped => {
                    self.net_step(false, None, false)?;
                    stepped = true;
                }
                Err(SockError::WouldBlock) if nonblocking => return Err(errno::AGAIN.into()),
                Err(SockError::WouldBlock) => self.net_wait_until(&ready)?,
                Err(e) => return Err(sock_errno(e).into()),
            }
        }
    }
}
