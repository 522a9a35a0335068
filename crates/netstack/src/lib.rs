//! The guest network stack: Ethernet, ARP, IPv4, ICMP echo and TCP, inside the VM boundary.
//!
//! The stack owns all connection state of a VM's NIC (ARP table, listeners, every TCP
//! control block with its queued bytes and timers) as one plain serde value,
//! [`NetStackState`]; [`NetStack::from_state`] restores it. It does no I/O and reads no
//! clock: it is driven only by the frames and the time it is given, and hands back the
//! frames it wants sent. Given the same inputs in the same order it takes the same steps on
//! every host, which is what lets it replicate by replay and move with the VM.
//!
//! Invariants:
//! - no input, however malformed, makes the stack panic; bad frames are dropped and counted;
//! - the stack's behaviour is a pure function of its state, the inputs and `now`;
//! - an acknowledgement of in-order data waits up to [`tcp::DELAYED_ACK`] for the
//!   application's reply to carry it: a caller about to wait for input calls
//!   [`NetStack::ack_now`] first, or the peer waits that long for it.

pub mod tcp;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use tcp::{Emit, State, Tcb};
use wire::{Ip, Mac, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpOptions, TcpOut};

/// The NIC's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub mac: Mac,
    pub ip: Ip,
    pub prefix_len: u8,
}

/// Counters of what the stack saw and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_malformed: u64,
    pub rx_not_for_us: u64,
    pub rx_unsupported: u64,
    pub rx_fragments: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub arp_replies: u64,
    pub icmp_echo_replies: u64,
    pub tcp_accepted: u64,
    pub tcp_syn_dropped: u64,
    pub tcp_resets_sent: u64,
    pub tcp_retransmits: u64,
}

pub type ConnId = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub backlog: usize,
    /// Established connections waiting for `accept`.
    pub ready: VecDeque<ConnId>,
}

/// The complete state of the stack: everything needed to continue it elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStackState {
    pub config: NetConfig,
    /// Secret for initial sequence numbers, from the VM's entropy.
    pub seed: u64,
    pub ip_id: u16,
    pub arp: BTreeMap<Ip, Mac>,
    pub listeners: BTreeMap<u16, Listener>,
    pub conns: BTreeMap<ConnId, Conn>,
    /// (local port, remote ip, remote port) → connection.
    pub by_tuple: BTreeMap<(u16, Ip, u16), ConnId>,
    pub next_conn: ConnId,
    pub stats: NetStats,
}

/// A connection and whether the application took it from its listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conn {
    pub tcb: Tcb,
    pub accepted: bool,
    pub queued: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SockError {
    #[error("operation would block")]
    WouldBlock,
    #[error("connection reset by peer")]
    Reset,
    #[error("connection closed for sending")]
    Closed,
    #[error("no such socket")]
    BadSocket,
    #[error("port {0} is already listened on")]
    PortInUse(u16),
}

pub struct NetStack {
    state: NetStackState,
    out: Vec<Vec<u8>>,
}

/// Builds frames for a connection's segments.
struct Out<'a> {
    config: &'a NetConfig,
    ip_id: &'a mut u16,
    stats: &'a mut NetStats,
    frames: &'a mut Vec<Vec<u8>>,
}

impl Out<'_> {
    fn push(&mut self, f: Vec<u8>) {
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += f.len() as u64;
        self.frames.push(f);
    }

    fn next_id(&mut self) -> u16 {
        *self.ip_id = self.ip_id.wrapping_add(1);
        *self.ip_id
    }
}

impl Emit for Out<'_> {
    fn segment(&mut self, tcb: &Tcb, flags: u8, seq: u32, payload: &[u8], options: TcpOptions) {
        if flags & TCP_RST != 0 {
            self.stats.tcp_resets_sent += 1;
        }
        let ip_id = self.next_id();
        let f = wire::tcp_frame(&TcpOut {
            src_mac: self.config.mac,
            dst_mac: tcb.remote_mac,
            src_ip: self.config.ip,
            dst_ip: tcb.remote_ip,
            ip_id,
            src_port: tcb.local_port,
            dst_port: tcb.remote_port,
            seq,
            ack: if flags & TCP_ACK != 0 { tcb.rcv_nxt } else { 0 },
            flags,
            window: tcb.window_field(),
            options,
            payload,
        });
        self.push(f);
    }

    fn retransmitted(&mut self) {
        self.stats.tcp_retransmits += 1;
    }
}

/// splitmix64: a fast, well-mixing hash step for sequence-number secrets.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl NetStack {
    pub fn new(config: NetConfig, seed: u64) -> Self {
        NetStack {
            state: NetStackState {
                config,
                seed,
                ip_id: 0,
                arp: BTreeMap::new(),
                listeners: BTreeMap::new(),
                conns: BTreeMap::new(),
                by_tuple: BTreeMap::new(),
                next_conn: 1,
                stats: NetStats::default(),
            },
            out: Vec::new(),
        }
    }

    pub fn from_state(state: NetStackState) -> Self {
        NetStack {
            state,
            out: Vec::new(),
        }
    }

    pub fn state(&self) -> &NetStackState {
        &self.state
    }

    pub fn stats(&self) -> &NetStats {
        &self.state.stats
    }

    /// Frames the stack wants sent, in order.
    pub fn take_output(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.out)
    }

    pub fn listen(&mut self, port: u16, backlog: usize) -> Result<(), SockError> {
        if self.state.listeners.contains_key(&port) {
            return Err(SockError::PortInUse(port));
        }
        self.state.listeners.insert(
            port,
            Listener {
                backlog: backlog.max(1),
                ready: VecDeque::new(),
            },
        );
        Ok(())
    }

    /// Announce our MAC for our IP (gratuitous ARP), as a VM does when it goes live.
    pub fn announce(&mut self) {
        let c = &self.state.config;
        let f = wire::arp_frame(1, c.mac, c.ip, [0; 6], c.ip, wire::BROADCAST);
        self.emitter().push(f);
    }

    /// The connections and listeners, and an emitter for their segments, borrowed side by
    /// side.
    fn parts(
        &mut self,
    ) -> (
        &mut BTreeMap<ConnId, Conn>,
        &mut BTreeMap<u16, Listener>,
        Out<'_>,
    ) {
        let NetStackState {
            config,
            ip_id,
            stats,
            conns,
            listeners,
            ..
        } = &mut self.state;
        let out = Out {
            config,
            ip_id,
            stats,
            frames: &mut self.out,
        };
        (conns, listeners, out)
    }

    fn emitter(&mut self) -> Out<'_> {
        Out {
            config: &self.state.config,
            ip_id: &mut self.state.ip_id,
            stats: &mut self.state.stats,
            frames: &mut self.out,
        }
    }

    /// Take one received frame.
    pub fn input(&mut self, now: u64, frame: &[u8]) {
        let st = &mut self.state.stats;
        st.rx_frames += 1;
        st.rx_bytes += frame.len() as u64;
        let Some(eth) = wire::parse_ethernet(frame) else {
            st.rx_malformed += 1;
            return;
        };
        if eth.dst != self.state.config.mac && eth.dst != wire::BROADCAST {
            st.rx_not_for_us += 1;
            return;
        }
        match eth.ethertype {
            wire::ETH_ARP => self.arp_input(eth.src, eth.payload),
            wire::ETH_IPV4 => self.ipv4_input(now, eth.src, eth.payload),
            _ => st.rx_unsupported += 1,
        }
    }

    fn arp_input(&mut self, eth_src: Mac, p: &[u8]) {
        let Some(arp) = wire::parse_arp(p) else {
            self.state.stats.rx_malformed += 1;
            return;
        };
        if arp.spa != [0; 4] && arp.sha == eth_src {
            self.state.arp.insert(arp.spa, arp.sha);
        }
        let c = &self.state.config;
        if arp.op == 1 && arp.tpa == c.ip && arp.spa != c.ip {
            let f = wire::arp_frame(2, c.mac, c.ip, arp.sha, arp.spa, arp.sha);
            self.state.stats.arp_replies += 1;
            self.emitter().push(f);
        }
    }

    fn ipv4_input(&mut self, now: u64, eth_src: Mac, p: &[u8]) {
        let ip = match wire::parse_ipv4(p) {
            Ok(ip) => ip,
            Err(wire::Ipv4Reject::Fragment) => {
                self.state.stats.rx_fragments += 1;
                return;
            }
            Err(wire::Ipv4Reject::Malformed) => {
                self.state.stats.rx_malformed += 1;
                return;
            }
        };
        if ip.dst != self.state.config.ip {
            self.state.stats.rx_not_for_us += 1;
            return;
        }
        self.state.arp.insert(ip.src, eth_src);
        match ip.proto {
            wire::PROTO_ICMP => {
                let c = &self.state.config;
                let id = self.state.ip_id.wrapping_add(1);
                match wire::icmp_echo_reply(c.mac, eth_src, c.ip, ip.src, id, ip.payload) {
                    Some(f) => {
                        self.state.ip_id = id;
                        self.state.stats.icmp_echo_replies += 1;
                        self.emitter().push(f);
                    }
                    None => self.state.stats.rx_unsupported += 1,
                }
            }
            wire::PROTO_TCP => match wire::parse_tcp(ip.src, ip.dst, ip.payload) {
                Some(seg) => self.tcp_input(now, ip.src, eth_src, &seg),
                None => self.state.stats.rx_malformed += 1,
            },
            _ => self.state.stats.rx_unsupported += 1,
        }
    }

    fn isn(&self, now: u64, key: (u16, Ip, u16)) -> u32 {
        let tuple =
            u64::from(key.0) << 48 | u64::from(u32::from_be_bytes(key.1)) << 16 | u64::from(key.2);
        // RFC 6528: a secret hash of the 4-tuple plus a 4 µs clock.
        (mix(self.state.seed ^ mix(tuple)) as u32).wrapping_add((now / 4000) as u32)
    }

    fn tcp_input(&mut self, now: u64, src_ip: Ip, src_mac: Mac, seg: &wire::Tcp) {
        let key = (seg.dst_port, src_ip, seg.src_port);
        if let Some(&id) = self.state.by_tuple.get(&key) {
            let (conns, listeners, mut out) = self.parts();
            if let Some(conn) = conns.get_mut(&id) {
                let was = conn.tcb.state;
                conn.tcb.on_segment(seg, now, &mut out);
                if was == State::SynReceived
                    && conn.tcb.state != State::SynReceived
                    && conn.tcb.state != State::Closed
                    && let Some(l) = listeners.get_mut(&seg.dst_port)
                {
                    l.ready.push_back(id);
                    conn.queued = true;
                    out.stats.tcp_accepted += 1;
                }
            }
            self.collect();
            return;
        }
        let is_syn = seg.flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
        if is_syn && let Some(l) = self.state.listeners.get(&seg.dst_port) {
            let pending = self
                .state
                .conns
                .values()
                .filter(|c| {
                    c.tcb.local_port == seg.dst_port
                        && (c.queued || c.tcb.state == State::SynReceived)
                })
                .count();
            if pending >= l.backlog {
                self.state.stats.tcp_syn_dropped += 1;
                return;
            }
            let iss = self.isn(now, key);
            let id = self.state.next_conn;
            self.state.next_conn += 1;
            let tcb = Tcb::from_syn(
                seg.dst_port,
                src_ip,
                src_mac,
                seg,
                iss,
                now,
                &mut self.emitter(),
            );
            self.state.conns.insert(
                id,
                Conn {
                    tcb,
                    accepted: false,
                    queued: false,
                },
            );
            self.state.by_tuple.insert(key, id);
            return;
        }
        if seg.flags & TCP_RST == 0 {
            self.reset_unknown(src_ip, src_mac, seg);
        }
    }

    /// Answer a segment for no connection with a reset (RFC 9293 3.10.7.1).
    fn reset_unknown(&mut self, src_ip: Ip, src_mac: Mac, seg: &wire::Tcp) {
        let len = seg.payload.len() as u32
            + u32::from(seg.flags & TCP_SYN != 0)
            + u32::from(seg.flags & TCP_FIN != 0);
        let (seq, ack, flags) = if seg.flags & TCP_ACK != 0 {
            (seg.ack, 0, TCP_RST)
        } else {
            (0, seg.seq.wrapping_add(len), TCP_RST | TCP_ACK)
        };
        let c = self.state.config.clone();
        let mut out = self.emitter();
        let ip_id = out.next_id();
        out.stats.tcp_resets_sent += 1;
        let f = wire::tcp_frame(&TcpOut {
            src_mac: c.mac,
            dst_mac: src_mac,
            src_ip: c.ip,
            dst_ip: src_ip,
            ip_id,
            src_port: seg.dst_port,
            dst_port: seg.src_port,
            seq,
            ack,
            flags,
            window: 0,
            options: TcpOptions::default(),
            payload: &[],
        });
        out.push(f);
    }

    /// Forget connections nobody holds and that have nothing left to do.
    fn collect(&mut self) {
        let dead: Vec<ConnId> = self
            .state
            .conns
            .iter()
            .filter(|(_, c)| {
                c.tcb.state == State::Closed && !c.queued && (c.tcb.app_closed || !c.accepted)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            if let Some(c) = self.state.conns.remove(&id) {
                self.state
                    .by_tuple
                    .remove(&(c.tcb.local_port, c.tcb.remote_ip, c.tcb.remote_port));
            }
        }
    }

    /// Fire every timer due at `now`.
    pub fn on_timers(&mut self, now: u64) {
        let (conns, _, mut out) = self.parts();
        for conn in conns.values_mut() {
            if conn.tcb.deadline().is_some_and(|d| d <= now) {
                conn.tcb.on_timer(now, &mut out);
            }
        }
        self.collect();
    }

    /// Send every acknowledgement still delayed: no reply of the guest's is coming soon to
    /// carry them (it goes to wait for input, or has been busy too long). A client waiting
    /// for them, Nagle's algorithm on, would otherwise stall until their deadline.
    pub fn ack_now(&mut self, now: u64) {
        let (conns, _, mut out) = self.parts();
        for conn in conns.values_mut() {
            conn.tcb.ack_now(now, &mut out);
        }
    }

    /// Whether an acknowledgement is being delayed for a reply to carry it.
    pub fn acks_delayed(&self) -> bool {
        self.state
            .conns
            .values()
            .any(|c| c.tcb.ack_deadline.is_some())
    }

    /// The VM went live on this host: announce its address so that switches and peers
    /// learn where it is now, and resend what the peers have not acknowledged.
    pub fn go_live(&mut self, now: u64) {
        self.announce();
        let (conns, _, mut out) = self.parts();
        for conn in conns.values_mut() {
            conn.tcb.kick(now, &mut out);
        }
    }

    /// When the next timer fires, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.state
            .conns
            .values()
            .filter_map(|c| c.tcb.deadline())
            .min()
    }

    /// Run `f` on a connection the application holds, with an emitter for its segments.
    fn with_conn<R>(
        &mut self,
        id: ConnId,
        f: impl FnOnce(&mut Tcb, &mut Out) -> R,
    ) -> Result<R, SockError> {
        let (conns, _, mut out) = self.parts();
        let conn = conns.get_mut(&id).ok_or(SockError::BadSocket)?;
        if !conn.accepted || conn.tcb.app_closed {
            return Err(SockError::BadSocket);
        }
        Ok(f(&mut conn.tcb, &mut out))
    }

    // The application side, as the VM's socket calls use it.

    pub fn acceptable(&self, port: u16) -> bool {
        self.state
            .listeners
            .get(&port)
            .is_some_and(|l| !l.ready.is_empty())
    }

    pub fn accept(&mut self, port: u16) -> Result<ConnId, SockError> {
        let l = self
            .state
            .listeners
            .get_mut(&port)
            .ok_or(SockError::BadSocket)?;
        let id = l.ready.pop_front().ok_or(SockError::WouldBlock)?;
        if let Some(c) = self.state.conns.get_mut(&id) {
            c.accepted = true;
            c.queued = false;
        }
        Ok(id)
    }

    pub fn readable(&self, id: ConnId) -> bool {
        self.state.conns.get(&id).is_none_or(|c| c.tcb.readable())
    }

    /// Bytes received on a connection and not yet read.
    pub fn queued(&self, id: ConnId) -> usize {
        self.state
            .conns
            .get(&id)
            .map_or(0, |c| c.tcb.recv_buf.len())
    }

    pub fn writable(&self, id: ConnId) -> bool {
        self.state.conns.get(&id).is_none_or(|c| c.tcb.writable())
    }

    /// Read queued bytes; `Ok(0)` is the end of the stream.
    pub fn recv(
        &mut self,
        id: ConnId,
        buf: &mut [u8],
        peek: bool,
        now: u64,
    ) -> Result<usize, SockError> {
        self.with_conn(id, |t, out| {
            if !t.recv_buf.is_empty() {
                Ok(t.recv(buf, peek, now, out))
            } else if t.reset {
                Err(SockError::Reset)
            } else if t.fin_received || t.state == State::Closed || buf.is_empty() {
                Ok(0)
            } else {
                Err(SockError::WouldBlock)
            }
        })?
    }

    /// Queue bytes for sending; how many were taken.
    pub fn send(&mut self, id: ConnId, data: &[u8], now: u64) -> Result<usize, SockError> {
        self.with_conn(id, |t, out| {
            if t.reset {
                return Err(SockError::Reset);
            }
            if t.fin_queued || !matches!(t.state, State::Established | State::CloseWait) {
                return Err(SockError::Closed);
            }
            match t.send(data, now, out) {
                0 if !data.is_empty() => Err(SockError::WouldBlock),
                n => Ok(n),
            }
        })?
    }

    pub fn shutdown_write(&mut self, id: ConnId, now: u64) -> Result<(), SockError> {
        self.with_conn(id, |t, out| t.shutdown_write(now, out))
    }

    /// The application closed its socket: finish the connection gracefully (or abort it
    /// if unread data remains).
    pub fn close(&mut self, id: ConnId, now: u64) {
        let _ = self.with_conn(id, |t, out| t.close(now, out));
        self.collect();
    }
}

#[cfg(test)]
mod tests;
