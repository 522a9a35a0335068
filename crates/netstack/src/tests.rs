//! The stack against crafted frames from a simulated peer.

use super::*;
use crate::wire::*;

const VM_MAC: Mac = [0x02, 0, 0, 0, 0, 0x10];
const VM_IP: Ip = [10, 9, 0, 10];
const PEER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
const PEER_IP: Ip = [10, 9, 0, 2];
const MS: u64 = 1_000_000;

fn stack() -> NetStack {
    let mut s = NetStack::new(
        NetConfig {
            mac: VM_MAC,
            ip: VM_IP,
            prefix_len: 24,
        },
        42,
    );
    s.listen(6379, 128).unwrap();
    s
}

struct Seg {
    flags: u8,
    seq: u32,
    ack: u32,
    window: u16,
    options: TcpOptions,
    payload: Vec<u8>,
    dst_port: u16,
}

fn peer(sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8], options: TcpOptions) -> Vec<u8> {
    tcp_frame(&TcpOut {
        src_mac: PEER_MAC,
        dst_mac: VM_MAC,
        src_ip: PEER_IP,
        dst_ip: VM_IP,
        ip_id: 1,
        src_port: sport,
        dst_port: 6379,
        seq,
        ack,
        flags,
        window: 1000,
        options,
        payload,
    })
}

fn segs(s: &mut NetStack) -> Vec<Seg> {
    s.take_output()
        .iter()
        .filter_map(|f| {
            let eth = parse_ethernet(f)?;
            assert_eq!(eth.src, VM_MAC);
            let ip = parse_ipv4(eth.payload).ok()?;
            let t =
                parse_tcp(ip.src, ip.dst, ip.payload).expect("our segments carry valid checksums");
            Some(Seg {
                flags: t.flags,
                seq: t.seq,
                ack: t.ack,
                window: t.window,
                options: t.options,
                payload: t.payload.to_vec(),
                dst_port: t.dst_port,
            })
        })
        .collect()
}

/// Open a connection from port `sport`; returns (conn id, our next seq, their next seq).
fn connect(s: &mut NetStack, sport: u16, now: u64) -> (ConnId, u32, u32) {
    let opts = TcpOptions {
        mss: Some(1460),
        wscale: Some(7),
    };
    s.input(now, &peer(sport, 1000, 0, TCP_SYN, &[], opts));
    let out = segs(s);
    assert_eq!(out.len(), 1);
    let synack = &out[0];
    assert_eq!(synack.flags, TCP_SYN | TCP_ACK);
    assert_eq!(synack.ack, 1001);
    assert_eq!(synack.options.mss, Some(1460));
    assert_eq!(synack.options.wscale, Some(7));
    let ours = synack.seq.wrapping_add(1);
    s.input(
        now,
        &peer(sport, 1001, ours, TCP_ACK, &[], TcpOptions::default()),
    );
    assert!(s.acceptable(6379));
    let id = s.accept(6379).unwrap();
    (id, ours, 1001)
}

#[test]
fn arp_requests_for_our_ip_are_answered() {
    let mut s = stack();
    s.input(
        0,
        &arp_frame(1, PEER_MAC, PEER_IP, [0; 6], VM_IP, BROADCAST),
    );
    let out = s.take_output();
    assert_eq!(out.len(), 1);
    let eth = parse_ethernet(&out[0]).unwrap();
    assert_eq!(eth.dst, PEER_MAC);
    let arp = parse_arp(eth.payload).unwrap();
    assert_eq!(
        (arp.op, arp.sha, arp.spa, arp.tpa),
        (2, VM_MAC, VM_IP, PEER_IP)
    );
    // Someone else's address: no answer, but the sender is learnt.
    s.input(
        0,
        &arp_frame(1, PEER_MAC, PEER_IP, [0; 6], [10, 9, 0, 99], BROADCAST),
    );
    assert!(s.take_output().is_empty());
    assert_eq!(s.state().arp.get(&PEER_IP), Some(&PEER_MAC));
}

#[test]
fn gratuitous_arp_announces_our_mac() {
    let mut s = stack();
    s.announce();
    let out = s.take_output();
    let eth = parse_ethernet(&out[0]).unwrap();
    assert_eq!(eth.dst, BROADCAST);
    let arp = parse_arp(eth.payload).unwrap();
    assert_eq!((arp.sha, arp.spa, arp.tpa), (VM_MAC, VM_IP, VM_IP));
}

#[test]
fn icmp_echo_is_answered_with_the_same_payload() {
    let mut s = stack();
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(b"ping payload");
    let c = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = ethernet(VM_MAC, PEER_MAC, ETH_IPV4, 20 + icmp.len());
    push_ipv4(&mut f, 5, PROTO_ICMP, PEER_IP, VM_IP, icmp.len());
    f.extend_from_slice(&icmp);
    s.input(0, &f);
    let out = s.take_output();
    assert_eq!(out.len(), 1);
    let eth = parse_ethernet(&out[0]).unwrap();
    let ip = parse_ipv4(eth.payload).unwrap();
    assert_eq!((ip.src, ip.dst, ip.proto), (VM_IP, PEER_IP, PROTO_ICMP));
    assert_eq!(ip.payload[0], 0);
    assert_eq!(&ip.payload[4..], &icmp[4..]);
    assert_eq!(checksum(&[ip.payload]), 0);
}

#[test]
fn a_connection_carries_data_both_ways_and_closes() {
    let mut s = stack();
    let (id, ours, mut theirs) = connect(&mut s, 40000, 0);
    s.input(
        1,
        &peer(
            40000,
            theirs,
            ours,
            TCP_ACK | TCP_PSH,
            b"PING\r\n",
            TcpOptions::default(),
        ),
    );
    theirs += 6;
    assert!(
        segs(&mut s).is_empty(),
        "the acknowledgement waits for the reply"
    );
    assert!(s.readable(id));
    let mut buf = [0u8; 64];
    assert_eq!(s.recv(id, &mut buf, false, 2).unwrap(), 6);
    assert_eq!(&buf[..6], b"PING\r\n");
    assert_eq!(s.recv(id, &mut buf, false, 2), Err(SockError::WouldBlock));

    assert_eq!(s.send(id, b"+PONG\r\n", 3).unwrap(), 7);
    let out = segs(&mut s);
    assert_eq!(
        out.len(),
        1,
        "one segment: the reply carries the acknowledgement"
    );
    assert_eq!(
        (out[0].seq, out[0].ack, out[0].payload.as_slice()),
        (ours, theirs, &b"+PONG\r\n"[..])
    );
    s.on_timers(3 + tcp::DELAYED_ACK);
    assert!(segs(&mut s).is_empty(), "nothing is owed any more");
    let ours = ours + 7;
    s.input(
        4,
        &peer(40000, theirs, ours, TCP_ACK, &[], TcpOptions::default()),
    );
    assert!(segs(&mut s).is_empty(), "a pure ACK needs no answer");

    // The client closes; we read EOF, close, and our FIN is acknowledged.
    s.input(
        5,
        &peer(
            40000,
            theirs,
            ours,
            TCP_ACK | TCP_FIN,
            &[],
            TcpOptions::default(),
        ),
    );
    theirs += 1;
    assert_eq!(segs(&mut s).last().unwrap().ack, theirs);
    assert_eq!(s.recv(id, &mut buf, false, 6).unwrap(), 0, "end of stream");
    s.close(id, 6);
    let fin = segs(&mut s);
    assert_eq!(fin.last().unwrap().flags & TCP_FIN, TCP_FIN);
    s.input(
        7,
        &peer(40000, theirs, ours + 1, TCP_ACK, &[], TcpOptions::default()),
    );
    assert!(
        s.state().conns.is_empty(),
        "the closed connection is forgotten"
    );
}

/// `n` bytes of data from the peer on `sport`, at `seq`.
fn data(s: &mut NetStack, sport: u16, now: u64, seq: u32, ours: u32, n: usize) {
    let payload = vec![b'x'; n];
    s.input(
        now,
        &peer(sport, seq, ours, TCP_ACK, &payload, TcpOptions::default()),
    );
}

#[test]
fn a_delayed_acknowledgement_goes_at_its_deadline_when_the_guest_waits_or_for_a_second_segment() {
    let mut s = stack();
    let (_, ours, theirs) = connect(&mut s, 40010, 0);
    // Unanswered: acknowledged at the deadline, not before, and once.
    assert!(!s.acks_delayed());
    data(&mut s, 40010, MS, theirs, ours, 10);
    assert!(segs(&mut s).is_empty());
    assert!(s.acks_delayed());
    let due = MS + tcp::DELAYED_ACK;
    assert_eq!(s.next_deadline(), Some(due), "the delay's timer runs");
    // A copy restored from the state taken now acknowledges alike.
    let bytes = postcard::to_stdvec(s.state()).unwrap();
    let mut restored = NetStack::from_state(postcard::from_bytes(&bytes).unwrap());
    for s in [&mut s, &mut restored] {
        s.on_timers(due - 1);
        assert!(segs(s).is_empty(), "nothing before the deadline");
        s.on_timers(due);
        let acks = segs(s);
        assert_eq!(acks.len(), 1);
        assert_eq!((acks[0].ack, acks[0].payload.len()), (theirs + 10, 0));
        s.on_timers(due + tcp::DELAYED_ACK);
        assert!(segs(s).is_empty(), "acknowledged once");
        assert_eq!(s.next_deadline(), None, "no timer left running");
        assert!(!s.acks_delayed());
    }

    // The guest goes to wait: what it did not answer is acknowledged then.
    data(&mut s, 40010, 2 * MS, theirs + 10, ours, 10);
    assert!(segs(&mut s).is_empty());
    s.ack_now(2 * MS);
    let acks = segs(&mut s);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].ack, theirs + 20);
    assert_eq!(s.next_deadline(), None, "the delay's timer is stopped");
    s.ack_now(2 * MS);
    assert!(segs(&mut s).is_empty(), "nothing is owed any more");

    // A second segment while one is unacknowledged: both are, at once.
    data(&mut s, 40010, 3 * MS, theirs + 20, ours, 1460);
    assert!(segs(&mut s).is_empty());
    data(&mut s, 40010, 3 * MS, theirs + 1480, ours, 1460);
    let acks = segs(&mut s);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].ack, theirs + 2940);
    assert!(!s.acks_delayed());

    // A segment after a hole is acknowledged at once (the peer's fast retransmit needs
    // the duplicate), and so is the one that fills it.
    data(&mut s, 40010, 3 * MS, theirs + 2950, ours, 10);
    assert_eq!(segs(&mut s).last().map(|g| g.ack), Some(theirs + 2940));
    data(&mut s, 40010, 3 * MS, theirs + 2940, ours, 10);
    assert_eq!(segs(&mut s).last().map(|g| g.ack), Some(theirs + 2960));
    assert!(!s.acks_delayed());

    // A FIN is acknowledged at once.
    s.input(
        4 * MS,
        &peer(
            40010,
            theirs + 2960,
            ours,
            TCP_ACK | TCP_FIN,
            &[],
            TcpOptions::default(),
        ),
    );
    assert_eq!(segs(&mut s).last().map(|g| g.ack), Some(theirs + 2961));
    assert!(!s.acks_delayed());

    // A reset connection owes nothing: no acknowledgement, no timer.
    let (_, ours, theirs) = connect(&mut s, 40011, 5 * MS);
    data(&mut s, 40011, 5 * MS, theirs, ours, 10);
    assert!(s.acks_delayed());
    s.input(
        5 * MS,
        &peer(
            40011,
            theirs + 10,
            ours,
            TCP_RST,
            &[],
            TcpOptions::default(),
        ),
    );
    assert!(!s.acks_delayed());
    s.ack_now(6 * MS);
    s.on_timers(5 * MS + tcp::DELAYED_ACK);
    assert!(
        segs(&mut s).is_empty(),
        "nothing goes to a reset connection"
    );
}

#[test]
fn a_delayed_acknowledgement_outlives_bare_acknowledgements_and_rides_on_what_goes_next() {
    let mut s = stack();
    let (id, ours, theirs) = connect(&mut s, 40012, 0);
    // A bare acknowledgement (a window update) while one is delayed: the delay goes on.
    data(&mut s, 40012, MS, theirs, ours, 10);
    s.input(
        MS,
        &peer(
            40012,
            theirs + 10,
            ours,
            TCP_ACK,
            &[],
            TcpOptions::default(),
        ),
    );
    assert!(segs(&mut s).is_empty());
    assert_eq!(s.next_deadline(), Some(MS + tcp::DELAYED_ACK));

    // The guest shuts its side: the FIN carries the acknowledgement, once.
    s.shutdown_write(id, 2 * MS).unwrap();
    let out = segs(&mut s);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].flags & TCP_FIN, out[0].ack), (TCP_FIN, theirs + 10));
    assert!(!s.acks_delayed());

    // A retransmission due with the delay's deadline carries it: one segment, not two.
    let mut s = stack();
    let (id, ours, theirs) = connect(&mut s, 40013, 3 * MS);
    s.send(id, b"+OK\r\n", 3 * MS).unwrap();
    segs(&mut s);
    let rto = s.next_deadline().expect("the retransmission timer runs");
    data(&mut s, 40013, rto - tcp::DELAYED_ACK, theirs, ours, 10);
    assert!(segs(&mut s).is_empty());
    s.on_timers(rto);
    let out = segs(&mut s);
    assert_eq!(out.len(), 1, "one segment");
    assert_eq!(
        (out[0].seq, out[0].ack, out[0].payload.as_slice()),
        (ours, theirs + 10, &b"+OK\r\n"[..])
    );
    assert!(!s.acks_delayed());
}

#[test]
fn data_that_leaves_the_window_smaller_than_a_segment_is_acknowledged_at_once() {
    let mut s = stack();
    let (_, ours, theirs) = connect(&mut s, 40014, 0);
    // Fill the receive buffer (nobody reads) to 2,144 bytes short of full.
    let mut seq = theirs;
    for n in [60_000, 60_000, 60_000, 60_000, 20_000] {
        data(&mut s, 40014, MS, seq, ours, n);
        seq += n as u32;
    }
    s.ack_now(MS);
    segs(&mut s);
    // 1,000 more leave 1,144, less than the peer's segment: the peer must hear at once.
    data(&mut s, 40014, MS, seq, ours, 1000);
    let out = segs(&mut s);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].ack, u32::from(out[0].window) << tcp::OUR_WSCALE),
        (seq + 1000, 1144 >> tcp::OUR_WSCALE << tcp::OUR_WSCALE)
    );
    assert!(!s.acks_delayed());
}

#[test]
fn lost_data_is_retransmitted_after_the_timeout() {
    let mut s = stack();
    let (id, ours, _) = connect(&mut s, 40001, 0);
    s.send(id, b"hello", 10 * MS).unwrap();
    assert_eq!(segs(&mut s).len(), 1);
    let due = s.next_deadline().expect("the retransmission timer runs");
    assert!(due > 10 * MS);
    s.on_timers(due - 1);
    assert!(segs(&mut s).is_empty(), "nothing before the deadline");
    s.on_timers(due);
    let again = segs(&mut s);
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].seq, again[0].payload.as_slice()),
        (ours, &b"hello"[..])
    );
    assert_eq!(s.stats().tcp_retransmits, 1);
    // Backoff: the next timeout is later than the first was.
    assert!(s.next_deadline().unwrap() - due > due - 10 * MS);
}

#[test]
fn three_duplicate_acks_trigger_fast_retransmit() {
    let mut s = stack();
    let (id, ours, theirs) = connect(&mut s, 40002, 0);
    let data = vec![7u8; 1460 * 6];
    s.send(id, &data, MS).unwrap();
    let sent = segs(&mut s);
    assert!(sent.len() >= 4, "initial window sends several segments");
    // The first segment is lost: the peer acknowledges nothing new, three times.
    for _ in 0..3 {
        s.input(
            2 * MS,
            &peer(40002, theirs, ours, TCP_ACK, &[], TcpOptions::default()),
        );
    }
    let re = segs(&mut s);
    assert!(
        re.iter().any(|g| g.seq == ours && g.payload.len() == 1460),
        "fast retransmit of the first segment"
    );
    assert_eq!(s.stats().tcp_retransmits, 1);
}

#[test]
fn out_of_order_segments_are_reassembled() {
    let mut s = stack();
    let (id, ours, theirs) = connect(&mut s, 40003, 0);
    s.input(
        1,
        &peer(
            40003,
            theirs + 5,
            ours,
            TCP_ACK,
            b"world",
            TcpOptions::default(),
        ),
    );
    let dup = segs(&mut s);
    assert_eq!(
        dup.last().unwrap().ack,
        theirs,
        "a hole: acknowledge what we have"
    );
    assert!(!s.readable(id));
    s.input(
        2,
        &peer(
            40003,
            theirs,
            ours,
            TCP_ACK,
            b"hello",
            TcpOptions::default(),
        ),
    );
    assert_eq!(segs(&mut s).last().unwrap().ack, theirs + 10);
    let mut buf = [0u8; 16];
    assert_eq!(s.recv(id, &mut buf, false, 3).unwrap(), 10);
    assert_eq!(&buf[..10], b"helloworld");
}

#[test]
fn segments_for_no_connection_are_reset() {
    let mut s = stack();
    s.input(
        0,
        &peer(40004, 5, 77, TCP_ACK, b"stray", TcpOptions::default()),
    );
    let out = segs(&mut s);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].flags, out[0].seq), (TCP_RST, 77));
    // A SYN to a port nobody listens on.
    let f = tcp_frame(&TcpOut {
        src_mac: PEER_MAC,
        dst_mac: VM_MAC,
        src_ip: PEER_IP,
        dst_ip: VM_IP,
        ip_id: 1,
        src_port: 40005,
        dst_port: 7000,
        seq: 9,
        ack: 0,
        flags: TCP_SYN,
        window: 1000,
        options: TcpOptions::default(),
        payload: &[],
    });
    s.input(0, &f);
    let out = segs(&mut s);
    assert_eq!((out[0].flags, out[0].ack), (TCP_RST | TCP_ACK, 10));
    assert_eq!(s.stats().tcp_resets_sent, 2);
}

#[test]
fn a_peer_reset_is_reported_to_the_application() {
    let mut s = stack();
    let (id, ours, theirs) = connect(&mut s, 40006, 0);
    s.input(
        1,
        &peer(40006, theirs, ours, TCP_RST, &[], TcpOptions::default()),
    );
    let mut buf = [0u8; 4];
    assert_eq!(s.recv(id, &mut buf, false, 2), Err(SockError::Reset));
    assert_eq!(s.send(id, b"x", 2), Err(SockError::Reset));
    s.close(id, 3);
    assert!(s.state().conns.is_empty());
}

#[test]
fn hundreds_of_connections_at_once() {
    let mut s = stack();
    s.listen(8080, 1024).unwrap();
    let mut ids = Vec::new();
    for p in 0..400u16 {
        let (id, ours, theirs) = connect(&mut s, 20000 + p, u64::from(p));
        ids.push((id, ours, theirs, 20000 + p));
    }
    for (id, ours, theirs, port) in &ids {
        s.input(
            1000,
            &peer(
                *port,
                *theirs,
                *ours,
                TCP_ACK,
                &port.to_be_bytes(),
                TcpOptions::default(),
            ),
        );
        let mut buf = [0u8; 2];
        assert_eq!(s.recv(*id, &mut buf, false, 1001).unwrap(), 2);
        assert_eq!(u16::from_be_bytes(buf), *port);
    }
    assert_eq!(s.state().conns.len(), 400);
    assert_eq!(s.stats().tcp_accepted, 400);
}

#[test]
fn the_window_is_scaled_when_the_peer_offers_scaling() {
    let mut s = stack();
    let (_, ours, theirs) = connect(&mut s, 40007, 0);
    s.input(
        1,
        &peer(40007, theirs, ours, TCP_ACK, b"x", TcpOptions::default()),
    );
    // No reply comes: the guest goes to wait, and the acknowledgement goes.
    s.ack_now(2);
    let ack = segs(&mut s).pop().unwrap();
    // 256 KiB minus the unread byte, in units of 2^7.
    assert_eq!(u32::from(ack.window), (tcp::RECV_BUF as u32 - 1) >> 7);
    assert_eq!(ack.dst_port, 40007);
}

#[test]
fn malformed_frames_are_dropped_and_counted_never_a_panic() {
    let mut s = stack();
    let (_, ours, theirs) = connect(&mut s, 40008, 0);
    let good = peer(40008, theirs, ours, TCP_ACK, b"data", TcpOptions::default());
    let before = s.stats().rx_malformed;
    // Every truncation of a valid frame.
    for cut in 0..good.len() {
        s.input(1, &good[..cut]);
    }
    assert!(s.stats().rx_malformed > before);
    // Every single-bit flip of a valid frame, and pseudo-random garbage.
    let mut x: u64 = 0x1234_5678;
    for i in 0..good.len() * 8 {
        let mut f = good.clone();
        f[i / 8] ^= 1 << (i % 8);
        s.input(2, &f);
    }
    for len in 0..3000 {
        let f: Vec<u8> = (0..len % 200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        s.input(3, &f);
        let mut g = good.clone();
        g[14 + (len % 20)] = x as u8;
        s.input(3, &g);
    }
    let _ = s.take_output();
    assert!(s.stats().rx_malformed > 100);
}

#[test]
fn state_round_trips_and_continues_identically() {
    let mut a = stack();
    let (id, ours, theirs) = connect(&mut a, 40009, 0);
    a.send(id, b"queued bytes", 5).unwrap();
    let _ = a.take_output();
    let bytes = postcard::to_stdvec(a.state()).unwrap();
    let mut b = NetStack::from_state(postcard::from_bytes(&bytes).unwrap());
    assert_eq!(a.state(), b.state());
    // The same inputs drive both to the same outputs.
    for s in [&mut a, &mut b] {
        s.input(
            6,
            &peer(40009, theirs, ours, TCP_ACK, b"more", TcpOptions::default()),
        );
        s.on_timers(5_000 * MS);
    }
    assert_eq!(a.take_output(), b.take_output());
    assert_eq!(a.state(), b.state());
}
