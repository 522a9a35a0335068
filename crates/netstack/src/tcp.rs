//! One TCP connection: its control block and state machine (RFC 9293 for a passive
//! opener, with RFC 6298 retransmission timing, RFC 5681 congestion control and fast
//! retransmit, RFC 7323 window scaling).
//!
//! A [`Tcb`] changes only through [`Tcb::on_segment`], [`Tcb::on_timer`], [`Tcb::ack_now`]
//! and the application calls, each given the current time; it produces segments through
//! a [`Emit`] callback. Sequence numbers compare modulo 2^32.
//!
//! The acknowledgement of in-order data is delayed for the application's reply to carry
//! it. Invariant: `ack_deadline` is set only while `ack_pending` is, and every segment
//! that acknowledges all received (data, FIN, a bare ACK) clears both.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::wire::{Ip, Mac, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Tcp, TcpOptions};

pub const OUR_MSS: u16 = 1460;
pub const OUR_WSCALE: u8 = 7;
pub const RECV_BUF: usize = 256 << 10;
pub const SEND_BUF: usize = 256 << 10;
const MS: u64 = 1_000_000;
const RTO_INITIAL: u64 = 1000 * MS;
const RTO_MIN: u64 = 200 * MS;
const RTO_MAX: u64 = 60_000 * MS;
/// Give up on a connection after this many retransmissions of the same data.
const MAX_RETRIES: u32 = 12;
const SYN_RETRIES: u32 = 5;
pub const TIME_WAIT: u64 = 30_000 * MS;
/// How long an acknowledgement of in-order data may wait for a reply to carry it (RFC 9293
/// 3.8.6.3 and RFC 1122 4.2.3.2: under 0.5 s; Linux waits at least 40 ms). It is sent
/// sooner when a second segment arrives or the guest goes to wait for input.
pub const DELAYED_ACK: u64 = 40 * MS;

pub fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
pub fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    SynReceived,
    Established,
    CloseWait,
    FinWait1,
    FinWait2,
    Closing,
    LastAck,
    TimeWait,
    Closed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcb {
    pub local_port: u16,
    pub remote_ip: Ip,
    pub remote_port: u16,
    pub remote_mac: Mac,
    pub state: State,
    // Send side: `send_buf` holds the bytes from `snd_una` on.
    pub iss: u32,
    pub snd_una: u32,
    pub snd_nxt: u32,
    /// The highest sequence number sent (plus one), FIN included.
    pub snd_max: u32,
    pub snd_wnd: u32,
    pub snd_wl1: u32,
    pub snd_wl2: u32,
    pub send_buf: VecDeque<u8>,
    /// The application has no more to send (shutdown or close).
    pub fin_queued: bool,
    pub fin_sent: bool,
    // Receive side.
    pub irs: u32,
    pub rcv_nxt: u32,
    pub recv_buf: VecDeque<u8>,
    /// Out-of-order segments by sequence number.
    pub ooo: BTreeMap<u32, Vec<u8>>,
    pub fin_received: bool,
    pub ack_pending: bool,
    /// While the acknowledgement owed for in-order data is delayed: when it must go.
    pub ack_deadline: Option<u64>,
    // Options.
    pub peer_mss: u16,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    // Timing and congestion.
    pub srtt: u64,
    pub rttvar: u64,
    pub rto: u64,
    pub rtt_probe: Option<(u32, u64)>,
    pub rto_deadline: Option<u64>,
    pub retries: u32,
    pub dup_acks: u32,
    pub cwnd: u32,
    pub ssthresh: u32,
    pub recover: Option<u32>,
    pub tw_deadline: Option<u64>,
    /// The peer reset the connection, or it timed out.
    pub reset: bool,
    /// The application closed its socket.
    pub app_closed: bool,
}

/// Where a connection's segments go: (flags, seq, payload range in send_buf or none).
pub trait Emit {
    fn segment(&mut self, tcb: &Tcb, flags: u8, seq: u32, payload: &[u8], options: TcpOptions);
    fn retransmitted(&mut self) {}
}

impl Tcb {
    /// A connection from a SYN received on a listening port; sends the SYN-ACK.
    pub fn from_syn(
        local_port: u16,
        remote_ip: Ip,
        remote_mac: Mac,
        syn: &Tcp,
        iss: u32,
        now: u64,
        out: &mut impl Emit,
    ) -> Tcb {
        let (snd_wscale, rcv_wscale) = match syn.options.wscale {
            Some(ws) => (ws, OUR_WSCALE),
            None => (0, 0),
        };
        let peer_mss = syn.options.mss.unwrap_or(536).clamp(64, OUR_MSS);
        let mut t = Tcb {
            local_port,
            remote_ip,
            remote_port: syn.src_port,
            remote_mac,
            state: State::SynReceived,
            iss,
            snd_una: iss,
            snd_nxt: iss.wrapping_add(1),
            snd_max: iss.wrapping_add(1),
            snd_wnd: u32::from(syn.window),
            snd_wl1: syn.seq,
            snd_wl2: iss,
            send_buf: VecDeque::new(),
            fin_queued: false,
            fin_sent: false,
            irs: syn.seq,
            rcv_nxt: syn.seq.wrapping_add(1),
            recv_buf: VecDeque::new(),
            ooo: BTreeMap::new(),
            fin_received: false,
            ack_pending: false,
            ack_deadline: None,
            peer_mss,
            snd_wscale,
            rcv_wscale,
            srtt: 0,
            rttvar: 0,
            rto: RTO_INITIAL,
            rtt_probe: None,
            rto_deadline: Some(now + RTO_INITIAL),
            retries: 0,
            dup_acks: 0,
            cwnd: 10 * u32::from(peer_mss),
            ssthresh: u32::MAX,
            recover: None,
            tw_deadline: None,
            reset: false,
            app_closed: false,
        };
        t.send_syn_ack(out);
        t
    }

    fn send_syn_ack(&mut self, out: &mut impl Emit) {
        let options = TcpOptions {
            mss: Some(OUR_MSS),
            wscale: (self.rcv_wscale > 0).then_some(self.rcv_wscale),
        };
        out.segment(self, TCP_SYN | TCP_ACK, self.iss, &[], options);
    }

    fn mss(&self) -> u32 {
        u32::from(self.peer_mss)
    }

    /// The receive window we advertise, in bytes.
    fn rcv_wnd(&self) -> u32 {
        let ooo: usize = self.ooo.values().map(Vec::len).sum();
        let max = if self.rcv_wscale == 0 {
            65535
        } else {
            RECV_BUF
        };
        max.saturating_sub(self.recv_buf.len() + ooo) as u32
    }

    /// The window field of an outgoing segment.
    pub fn window_field(&self) -> u16 {
        (self.rcv_wnd() >> self.rcv_wscale).min(65535) as u16
    }

    pub fn readable(&self) -> bool {
        !self.recv_buf.is_empty() || self.fin_received || self.reset || self.state == State::Closed
    }

    pub fn writable(&self) -> bool {
        self.reset
            || !matches!(
                self.state,
                State::SynReceived | State::Established | State::CloseWait
            )
            || self.send_buf.len() < SEND_BUF
    }

    /// Whether the connection has nothing left to do and nobody holds it.
    pub fn finished(&self) -> bool {
        self.state == State::Closed && self.app_closed
    }

    fn acceptable(&self, seq: u32, len: u32) -> bool {
        let wnd = self.rcv_wnd().max(1);
        let end = self.rcv_nxt.wrapping_add(wnd);
        if len == 0 {
            return le(self.rcv_nxt, seq) && lt(seq, end) || seq == self.rcv_nxt;
        }
        let last = seq.wrapping_add(len - 1);
        (le(self.rcv_nxt, seq) && lt(seq, end)) || (le(self.rcv_nxt, last) && lt(last, end))
    }

    fn close_now(&mut self) {
        self.state = State::Closed;
        self.rto_deadline = None;
        self.tw_deadline = None;
        // A closed connection owes nothing: no timer of it stays armed.
        self.acknowledged();
        self.send_buf.clear();
    }

    /// Handle a segment for this connection.
    pub fn on_segment(&mut self, seg: &Tcp, now: u64, out: &mut impl Emit) {
        let len = seg.payload.len() as u32 + u32::from(seg.flags & TCP_FIN != 0);
        if self.state == State::SynReceived && seg.flags & TCP_SYN != 0 && seg.flags & TCP_ACK == 0
        {
            // The peer retransmitted its SYN: our SYN-ACK was lost.
            if seg.seq == self.irs {
                self.send_syn_ack(out);
            }
            return;
        }
        if !self.acceptable(seg.seq, len) {
            if seg.flags & TCP_RST == 0 {
                self.send_ack(out);
            }
            return;
        }
        if seg.flags & TCP_RST != 0 {
            self.reset = self.state != State::TimeWait;
            self.close_now();
            return;
        }
        if seg.flags & TCP_SYN != 0 {
            // A SYN inside an open connection: answer with an ACK (RFC 5961 challenge).
            self.send_ack(out);
            return;
        }
        if seg.flags & TCP_ACK == 0 {
            return;
        }
        if self.state == State::SynReceived {
            if seg.ack != self.iss.wrapping_add(1) {
                out.segment(self, TCP_RST, seg.ack, &[], TcpOptions::default());
                return;
            }
            self.state = State::Established;
            self.snd_una = seg.ack;
            self.rto_deadline = None;
            self.retries = 0;
            self.update_window(seg);
        }
        self.on_ack(seg, now, out);
        if self.state == State::Closed {
            return;
        }
        let owed = self.ack_pending;
        let delayable = self.on_data(seg);
        if !self.ack_pending || (len == 0 && self.ack_deadline.is_some()) {
            // Nothing owed, or a bare acknowledgement or window update while one is
            // delayed: it brought nothing new to acknowledge, and the delay goes on.
        } else if delayable && !owed {
            // The guest's reply, if it comes soon, carries the acknowledgement: one segment
            // instead of two, as a Linux receiver does. A second segment arriving meanwhile
            // is acknowledged at once (every other one at least).
            self.ack_deadline = Some(now + DELAYED_ACK);
        } else {
            self.output(now, out);
        }
    }

    fn update_window(&mut self, seg: &Tcp) {
        if lt(self.snd_wl1, seg.seq) || (self.snd_wl1 == seg.seq && le(self.snd_wl2, seg.ack)) {
            self.snd_wnd = u32::from(seg.window) << self.snd_wscale;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = seg.ack;
        }
    }

    fn on_ack(&mut self, seg: &Tcp, now: u64, out: &mut impl Emit) {
        let ack = seg.ack;
        if lt(self.snd_max, ack) {
            // Acknowledges something never sent.
            self.send_ack(out);
            return;
        }
        let old_wnd = self.snd_wnd;
        if lt(self.snd_una, ack) {
            let acked = ack.wrapping_sub(self.snd_una);
            let data = (acked as usize).min(self.send_buf.len());
            self.send_buf.drain(..data);
            self.snd_una = ack;
            if lt(self.snd_nxt, ack) {
                self.snd_nxt = ack;
            }
            if let Some((probe, sent)) = self.rtt_probe
                && le(probe, ack)
            {
                self.rtt_sample(now.saturating_sub(sent));
                self.rtt_probe = None;
            }
            self.retries = 0;
            self.rto_deadline = (self.snd_una != self.snd_max).then_some(now + self.rto);
            match self.recover {
                Some(r) if lt(ack, r) => {
                    // Partial ACK in fast recovery: resend the next hole (NewReno).
                    self.retransmit_one(now, out);
                }
                Some(_) => {
                    self.recover = None;
                    self.cwnd = self.ssthresh;
                }
                None => {
                    let mss = self.mss();
                    if self.cwnd < self.ssthresh {
                        self.cwnd = self.cwnd.saturating_add(acked.min(mss));
                    } else {
                        self.cwnd = self
                            .cwnd
                            .saturating_add((mss * mss / self.cwnd.max(1)).max(1));
                    }
                }
            }
            self.dup_acks = 0;
            let fin_acked = self.fin_sent && ack == self.snd_max;
            if fin_acked {
                match self.state {
                    State::FinWait1 => self.state = State::FinWait2,
                    State::Closing => self.enter_time_wait(now),
                    State::LastAck => self.close_now(),
                    _ => {}
                }
            }
        } else if ack == self.snd_una
            && seg.payload.is_empty()
            && seg.flags & TCP_FIN == 0
            && self.snd_una != self.snd_max
            && u32::from(seg.window) << self.snd_wscale == old_wnd
        {
            self.dup_acks += 1;
            if self.dup_acks == 3 && self.recover.is_none() {
                let flight = self.snd_max.wrapping_sub(self.snd_una);
                self.ssthresh = (flight / 2).max(2 * self.mss());
                self.cwnd = self.ssthresh + 3 * self.mss();
                self.recover = Some(self.snd_max);
                self.retransmit_one(now, out);
            } else if self.dup_acks > 3 {
                self.cwnd = self.cwnd.saturating_add(self.mss());
            }
        }
        self.update_window(seg);
        let unsent = self.send_buf.len() > self.snd_nxt.wrapping_sub(self.snd_una) as usize;
        if unsent || (self.fin_queued && !self.fin_sent) {
            self.output(now, out);
        }
    }

    fn rtt_sample(&mut self, r: u64) {
        if self.srtt == 0 {
            self.srtt = r;
            self.rttvar = r / 2;
        } else {
            let diff = self.srtt.abs_diff(r);
            self.rttvar = (3 * self.rttvar + diff) / 4;
            self.srtt = (7 * self.srtt + r) / 8;
        }
        self.rto = (self.srtt + (4 * self.rttvar).max(MS)).clamp(RTO_MIN, RTO_MAX);
    }

    /// Take the segment's data and FIN; whether its acknowledgement may be delayed: it
    /// brought new data in order, no FIN, and there was no hole before it nor is one left
    /// (RFC 5681 4.2: the duplicate acknowledgements a hole causes drive the peer's fast
    /// retransmit, and the one for a filled hole its recovery, so they go at once).
    fn on_data(&mut self, seg: &Tcp) -> bool {
        let before = self.rcv_nxt;
        let had_hole = !self.ooo.is_empty();
        let mut seq = seg.seq;
        let mut data = seg.payload;
        if !data.is_empty() {
            if matches!(
                self.state,
                State::Established | State::FinWait1 | State::FinWait2
            ) && !self.app_closed
            {
                // Trim what we already have.
                if lt(seq, self.rcv_nxt) {
                    let skip = (self.rcv_nxt.wrapping_sub(seq) as usize).min(data.len());
                    data = &data[skip..];
                    seq = self.rcv_nxt;
                }
                if seq == self.rcv_nxt {
                    let take = data.len().min(self.rcv_wnd() as usize);
                    self.recv_buf.extend(&data[..take]);
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(take as u32);
                    self.drain_ooo();
                } else if !data.is_empty() && (self.rcv_wnd() as usize) >= data.len() {
                    self.ooo.entry(seq).or_insert_with(|| data.to_vec());
                }
            } else if self.app_closed {
                // Nobody will read it: acknowledge and drop.
                if seq == self.rcv_nxt {
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(data.len() as u32);
                }
            }
            self.ack_pending = true;
        }
        // A window that shrank below a segment is told at once (the peer is about to stall;
        // a segment only partly taken left none).
        let delayable = self.state == State::Established
            && !self.app_closed
            && self.rcv_nxt != before
            && self.rcv_wnd() >= self.mss()
            && !had_hole
            && self.ooo.is_empty();
        if seg.flags & TCP_FIN != 0 {
            let fin_seq = seg.seq.wrapping_add(seg.payload.len() as u32);
            if fin_seq == self.rcv_nxt && !self.fin_received {
                self.fin_received = true;
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
                self.state = match self.state {
                    State::Established => State::CloseWait,
                    State::FinWait1 => State::Closing,
                    State::FinWait2 => State::TimeWait,
                    s => s,
                };
            }
            self.ack_pending = true;
            return false;
        }
        delayable
    }

    fn drain_ooo(&mut self) {
        while let Some((&seq, _)) = self.ooo.iter().next() {
            if lt(self.rcv_nxt, seq) {
                break;
            }
            let Some(data) = self.ooo.remove(&seq) else {
                break;
            };
            let skip = self.rcv_nxt.wrapping_sub(seq) as usize;
            if skip < data.len() {
                let take = (data.len() - skip).min(self.rcv_wnd() as usize);
                self.recv_buf.extend(&data[skip..skip + take]);
                self.rcv_nxt = self.rcv_nxt.wrapping_add(take as u32);
            }
        }
    }

    fn enter_time_wait(&mut self, now: u64) {
        self.state = State::TimeWait;
        self.rto_deadline = None;
        self.tw_deadline = Some(now + TIME_WAIT);
    }

    /// Send what the windows allow, then a pending ACK if nothing carried it.
    pub fn output(&mut self, now: u64, out: &mut impl Emit) {
        if matches!(
            self.state,
            State::SynReceived | State::Closed | State::TimeWait
        ) {
            if self.state == State::TimeWait && self.ack_pending {
                self.send_ack(out);
            }
            if self.state == State::TimeWait && self.tw_deadline.is_none() {
                self.tw_deadline = Some(now + TIME_WAIT);
            }
            return;
        }
        let mss = self.mss() as usize;
        loop {
            let in_flight = self.snd_nxt.wrapping_sub(self.snd_una) as usize;
            let wnd = self.snd_wnd.min(self.cwnd) as usize;
            let sent_data = in_flight.min(self.send_buf.len());
            let avail = self.send_buf.len() - sent_data;
            if avail > 0 && in_flight < wnd {
                let n = avail.min(mss).min(wnd - in_flight);
                let (a, b) = self.send_buf.as_slices();
                let chunk: Vec<u8> = if sent_data + n <= a.len() {
                    a[sent_data..sent_data + n].to_vec()
                } else {
                    a.iter()
                        .chain(b.iter())
                        .skip(sent_data)
                        .take(n)
                        .copied()
                        .collect()
                };
                let flags = TCP_ACK | if n == avail { TCP_PSH } else { 0 };
                let seq = self.snd_nxt;
                out.segment(self, flags, seq, &chunk, TcpOptions::default());
                self.snd_nxt = self.snd_nxt.wrapping_add(n as u32);
                if lt(self.snd_max, self.snd_nxt) {
                    self.snd_max = self.snd_nxt;
                }
                if self.rtt_probe.is_none() && self.retries == 0 {
                    self.rtt_probe = Some((self.snd_nxt, now));
                }
                self.rto_deadline.get_or_insert(now + self.rto);
                self.acknowledged();
                continue;
            }
            if avail == 0 && self.fin_queued && !self.fin_sent {
                out.segment(
                    self,
                    TCP_FIN | TCP_ACK,
                    self.snd_nxt,
                    &[],
                    TcpOptions::default(),
                );
                self.fin_sent = true;
                self.snd_nxt = self.snd_nxt.wrapping_add(1);
                if lt(self.snd_max, self.snd_nxt) {
                    self.snd_max = self.snd_nxt;
                }
                self.state = match self.state {
                    State::Established => State::FinWait1,
                    State::CloseWait => State::LastAck,
                    s => s,
                };
                self.rto_deadline.get_or_insert(now + self.rto);
                self.acknowledged();
            }
            if avail > 0 && self.snd_wnd == 0 && in_flight == 0 {
                // Zero window: the retransmission timer doubles as the persist timer.
                self.rto_deadline.get_or_insert(now + self.rto);
            }
            break;
        }
        if self.ack_pending {
            self.send_ack(out);
        }
    }

    /// A segment acknowledging all received went: nothing is owed any more.
    fn acknowledged(&mut self) {
        self.ack_pending = false;
        self.ack_deadline = None;
    }

    /// Send a bare acknowledgement of all received.
    fn send_ack(&mut self, out: &mut impl Emit) {
        self.acknowledged();
        out.segment(self, TCP_ACK, self.snd_nxt, &[], TcpOptions::default());
    }

    /// Send the acknowledgement being delayed, if any: its delay is over, or no reply is
    /// coming to carry it (the guest goes to wait, or is busy with other work).
    pub fn ack_now(&mut self, now: u64, out: &mut impl Emit) {
        if self.ack_deadline.take().is_some() && self.ack_pending {
            self.output(now, out);
        }
    }

    /// Resend one segment from `snd_una`.
    fn retransmit_one(&mut self, now: u64, out: &mut impl Emit) {
        let n = self.send_buf.len().min(self.mss() as usize);
        if n > 0 {
            let chunk: Vec<u8> = self.send_buf.iter().take(n).copied().collect();
            out.segment(
                self,
                TCP_ACK | TCP_PSH,
                self.snd_una,
                &chunk,
                TcpOptions::default(),
            );
        } else if self.fin_sent {
            out.segment(
                self,
                TCP_FIN | TCP_ACK,
                self.snd_una,
                &[],
                TcpOptions::default(),
            );
        }
        if n > 0 || self.fin_sent {
            self.acknowledged();
        }
        out.retransmitted();
        self.rtt_probe = None;
        self.rto_deadline = Some(now + self.rto);
    }

    /// The VM just went live on another host: whatever the peer has not acknowledged may
    /// never have left the old host, so send it again now instead of at the next timeout.
    ///
    /// The peer may also have sent something the old host took but never logged: three
    /// duplicate ACKs make it retransmit that at once (fast retransmit) rather than after
    /// its backed-off timeout.
    pub fn kick(&mut self, now: u64, out: &mut impl Emit) {
        match self.state {
            State::SynReceived => self.send_syn_ack(out),
            State::Closed | State::TimeWait => {}
            _ => {
                if self.snd_una != self.snd_max {
                    self.retransmit_one(now, out);
                }
                for _ in 0..3 {
                    self.send_ack(out);
                }
            }
        }
    }

    /// Timers: retransmission (and persist), TIME_WAIT, then the delayed acknowledgement
    /// (a retransmission due at the same time carries it).
    pub fn on_timer(&mut self, now: u64, out: &mut impl Emit) {
        self.on_retransmission_timer(now, out);
        if self.ack_deadline.is_some_and(|t| now >= t) {
            self.ack_now(now, out);
        }
    }

    fn on_retransmission_timer(&mut self, now: u64, out: &mut impl Emit) {
        if let Some(t) = self.tw_deadline {
            if now >= t {
                self.close_now();
            }
            return;
        }
        let Some(deadline) = self.rto_deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        self.retries += 1;
        let limit = if self.state == State::SynReceived {
            SYN_RETRIES
        } else {
            MAX_RETRIES
        };
        if self.retries > limit {
            out.segment(
                self,
                TCP_RST | TCP_ACK,
                self.snd_nxt,
                &[],
                TcpOptions::default(),
            );
            self.reset = true;
            self.close_now();
            return;
        }
        self.rto = (self.rto * 2).min(RTO_MAX);
        if self.state == State::SynReceived {
            self.send_syn_ack(out);
            self.rto_deadline = Some(now + self.rto);
            out.retransmitted();
            return;
        }
        if self.snd_wnd == 0 && !self.send_buf.is_empty() && self.snd_una == self.snd_nxt {
            // Window probe: one byte beyond the closed window.
            let byte = [self.send_buf[0]];
            out.segment(self, TCP_ACK, self.snd_una, &byte, TcpOptions::default());
            self.acknowledged();
            self.rto_deadline = Some(now + self.rto);
            return;
        }
        let flight = self.snd_max.wrapping_sub(self.snd_una);
        self.ssthresh = (flight / 2).max(2 * self.mss());
        self.cwnd = self.mss();
        self.recover = None;
        self.dup_acks = 0;
        // Go back to the first unacknowledged byte and send again from there.
        self.snd_nxt = self.snd_una;
        if self.fin_sent {
            self.fin_sent = false;
        }
        self.rtt_probe = None;
        self.rto_deadline = None;
        out.retransmitted();
        self.output(now, out);
        self.rto_deadline.get_or_insert(now + self.rto);
    }

    /// The earliest time a timer of this connection fires.
    pub fn deadline(&self) -> Option<u64> {
        [self.rto_deadline, self.tw_deadline, self.ack_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    // Application side.

    pub fn recv(&mut self, buf: &mut [u8], peek: bool, now: u64, out: &mut impl Emit) -> usize {
        let before = self.window_field();
        let n = buf.len().min(self.recv_buf.len());
        for (dst, src) in buf.iter_mut().zip(self.recv_buf.iter()) {
            *dst = *src;
        }
        if !peek {
            self.recv_buf.drain(..n);
            // Tell the peer when reading reopened a window that had (almost) closed.
            let after = self.window_field();
            if (before as u32) < (after as u32) / 2 || (before == 0 && after > 0) {
                self.ack_pending = true;
                self.output(now, out);
            }
        }
        n
    }

    pub fn send(&mut self, data: &[u8], now: u64, out: &mut impl Emit) -> usize {
        let n = data.len().min(SEND_BUF.saturating_sub(self.send_buf.len()));
        self.send_buf.extend(&data[..n]);
        self.output(now, out);
        n
    }

    pub fn shutdown_write(&mut self, now: u64, out: &mut impl Emit) {
        if !self.fin_queued
            && matches!(
                self.state,
                State::SynReceived | State::Established | State::CloseWait
            )
        {
            self.fin_queued = true;
            self.output(now, out);
        }
    }

    pub fn close(&mut self, now: u64, out: &mut impl Emit) {
        self.app_closed = true;
        if self.state == State::Closed {
            return;
        }
        if !self.recv_buf.is_empty() {
            // Unread data at close: abort, as other stacks do, so the peer knows.
            out.segment(
                self,
                TCP_RST | TCP_ACK,
                self.snd_nxt,
                &[],
                TcpOptions::default(),
            );
            self.close_now();
            return;
        }
        self.shutdown_write(now, out);
    }
}
