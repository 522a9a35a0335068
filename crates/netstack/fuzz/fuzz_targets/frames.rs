//! Feed arbitrary bytes to the stack as received frames, at arbitrary times, with a
//! listener open and a connection in progress: it must never panic, and whatever it
//! sends must parse back as well-formed frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netstack::{NetConfig, NetStack};

fuzz_target!(|data: &[u8]| {
    let mut s = NetStack::new(
        NetConfig {
            mac: [2, 0, 0, 0, 0, 0x10],
            ip: [10, 9, 0, 10],
            prefix_len: 24,
        },
        7,
    );
    let _ = s.listen(6379, 16);
    // The input is a sequence of frames, each prefixed by a 2-byte length and a time step.
    let mut rest = data;
    let mut now = 0u64;
    while rest.len() >= 3 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 3);
        now += u64::from(rest[2]) * 10_000_000;
        let frame = &rest[3..3 + len];
        rest = &rest[3 + len..];
        s.input(now, frame);
        s.on_timers(now);
        if let Ok(id) = s.accept(6379) {
            let mut buf = [0u8; 64];
            let _ = s.recv(id, &mut buf, false, now);
            let _ = s.send(id, b"reply", now);
        }
        for out in s.take_output() {
            assert!(netstack::wire::parse_ethernet(&out).is_some());
        }
    }
});
