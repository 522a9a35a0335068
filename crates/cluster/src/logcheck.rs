//! The logging network's check (`tandem host check-logging A B`, vmkping's job): every
//! agent serves a small echo/sink service on its logging address ([`LOG_CHECK_PORT`]); the
//! agent of A measures against B's: round trips of small messages (latency) and one bulk
//! send (throughput).
//!
//! The wire (one measurement per connection): the client sends an op byte and a u32 (big
//! endian); `P n`: n 64-byte messages, each echoed at once; `T mib`: `mib` MiB follow, and
//! the server answers with the u64 count it received. The server answers `B` and closes
//! when it is already serving a measurement.
//!
//! Invariants: bounded whatever a peer sends: one measurement at a time per service,
//! at most [`MAX_PINGS`] pings and [`MAX_MIB`] MiB, every read and write under a timeout,
//! and a connection never outlives [`DEADLINE`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The port of the service on each host's logging address (beside the probe's 7069).
pub const LOG_CHECK_PORT: u16 = 7068;
pub const MAX_PINGS: u32 = 10_000;
pub const MAX_MIB: u32 = 1024;
const PING_BYTES: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a measurement may take, on either side.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One measurement between two hosts' logging addresses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct LogCheck {
    pub from: String,
    pub to: String,
    pub from_ip: String,
    pub to_ip: String,
    pub pings: u32,
    pub rtt_min_us: u64,
    pub rtt_median_us: u64,
    pub rtt_p99_us: u64,
    pub bytes: u64,
    pub secs: f64,
    pub mbyte_s: f64,
    pub gbit_s: f64,
    /// When it was measured (Unix ms).
    pub at_ms: u64,
}

/// What to measure (`POST /api/v1/hosts/{name}/check-logging`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// The other host.
    pub to: String,
    /// Round trips (default 200).
    #[serde(default)]
    pub pings: Option<u32>,
    /// MiB sent in bulk (default 64).
    #[serde(default)]
    pub mib: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Invalid(String),
    #[error("the logging check service of {addr} is busy with another measurement")]
    Busy { addr: SocketAddr },
    #[error("logging network to {addr}: {why}")]
    Io { addr: SocketAddr, why: String },
}

/// Serve the check on `ip`:[`LOG_CHECK_PORT`] from a thread of its own, until the process
/// ends.
pub fn serve(ip: &str) -> std::io::Result<()> {
    serve_listener(TcpListener::bind(format!("{ip}:{LOG_CHECK_PORT}"))?)
}

fn serve_listener(listener: TcpListener) -> std::io::Result<()> {
    let busy = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("log-check".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                if busy.swap(true, Ordering::SeqCst) {
                    let _ = s.write_all(b"B");
                    continue;
                }
                let flag = busy.clone();
                let spawned = std::thread::Builder::new()
                    .name("log-check-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(&mut s) {
                            tracing::debug!("logging check: {e}");
                        }
                        flag.store(false, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    // The closure (and its flag reset) never ran.
                    tracing::warn!("logging check: cannot start a thread");
                    busy.store(false, Ordering::SeqCst);
                }
            }
        })?;
    Ok(())
}

fn answer(s: &mut TcpStream) -> std::io::Result<()> {
    let start = Instant::now();
    let _ = s.set_nodelay(true);
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let late = || std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline");
    match head[0] {
        b'P' if n <= MAX_PINGS => {
            s.write_all(b"K")?;
            let mut m = [0u8; PING_BYTES];
            for _ in 0..n {
                if start.elapsed() > DEADLINE {
                    return Err(late());
                }
                s.read_exact(&mut m)?;
                s.write_all(&m)?;
            }
            Ok(())
        }
        b'T' if n <= MAX_MIB => {
            s.write_all(b"K")?;
            let want = u64::from(n) << 20;
            let mut got = 0u64;
            let mut buf = vec![0u8; 256 << 10];
            while got < want {
                if start.elapsed() > DEADLINE {
                    return Err(late());
                }
                let k = (want - got).min(buf.len() as u64) as usize;
                match s.read(&mut buf[..k])? {
                    0 => break,
                    r => got += r as u64,
                }
            }
            s.write_all(&got.to_be_bytes())
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "bad request",
        )),
    }
}

fn connect(addr: SocketAddr, op: u8, n: u32) -> Result<TcpStream, CheckError> {
    let io = |e: std::io::Error| CheckError::Io {
        addr,
        why: e.to_string(),
    };
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(io)?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let mut head = [op, 0, 0, 0, 0];
    head[1..].copy_from_slice(&n.to_be_bytes());
    s.write_all(&head).map_err(io)?;
    let mut ok = [0u8; 1];
    s.read_exact(&mut ok).map_err(io)?;
    match ok[0] {
        b'K' => Ok(s),
        b'B' => Err(CheckError::Busy { addr }),
        _ => Err(CheckError::Io {
            addr,
            why: "not a logging check service".into(),
        }),
    }
}

/// Round-trip times of `pings` small messages, microseconds, sorted.
pub fn ping(addr: SocketAddr, pings: u32) -> Result<Vec<u64>, CheckError> {
    let mut s = connect(addr, b'P', pings)?;
    let io = |e: std::io::Error| CheckError::Io {
        addr,
        why: e.to_string(),
    };
    let start = Instant::now();
    let mut rtts = Vec::with_capacity(pings as usize);
    let mut m = [0u8; PING_BYTES];
    for i in 0..pings {
        if start.elapsed() > DEADLINE {
            return Err(CheckError::Io {
                addr,
                why: format!("{i} of {pings} round trips within {DEADLINE:?}"),
            });
        }
        m[..4].copy_from_slice(&i.to_be_bytes());
        let t = Instant::now();
        s.write_all(&m).map_err(io)?;
        let mut back = [0u8; PING_BYTES];
        s.read_exact(&mut back).map_err(io)?;
        if back != m {
            return Err(CheckError::Io {
                addr,
                why: "an echo that is not what was sent".into(),
            });
        }
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    Ok(rtts)
}

/// Send `mib` MiB and wait for the peer's count: (bytes it received, seconds).
pub fn bulk(addr: SocketAddr, mib: u32) -> Result<(u64, f64), CheckError> {
    let mut s = connect(addr, b'T', mib)?;
    let io = |e: std::io::Error| CheckError::Io {
        addr,
        why: e.to_string(),
    };
    let buf = vec![0x5au8; 256 << 10];
    let want = u64::from(mib) << 20;
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < want {
        if start.elapsed() > DEADLINE {
            return Err(CheckError::Io {
                addr,
                why: format!("{sent} of {want} bytes within {DEADLINE:?}"),
            });
        }
        let k = (want - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).map_err(io)?;
        sent += k as u64;
    }
    let mut got = [0u8; 8];
    s.read_exact(&mut got).map_err(io)?;
    Ok((u64::from_be_bytes(got), start.elapsed().as_secs_f64()))
}

/// The p-th percentile (0..=100) of sorted values.
fn pct(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) * p).div_ceil(100)]
}

/// Measure from here to `to_ip`'s service.
/// How long a measurement waits for the service to finish another one (say, the reverse
/// direction's, whose last bytes it is still draining) before it says it is busy.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `step`, asked again while the service is busy, until [`BUSY_WAIT`] runs out.
fn patiently<T>(mut step: impl FnMut() -> Result<T, CheckError>) -> Result<T, CheckError> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match step() {
            Err(CheckError::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

pub fn measure(
    from: (&str, &str),
    to: (&str, &str),
    pings: u32,
    mib: u32,
) -> Result<LogCheck, CheckError> {
    if !(1..=MAX_PINGS).contains(&pings) {
        return Err(CheckError::Invalid(format!(
            "pings {pings} is outside 1..={MAX_PINGS}"
        )));
    }
    if !(1..=MAX_MIB).contains(&mib) {
        return Err(CheckError::Invalid(format!(
            "mib {mib} is outside 1..={MAX_MIB}"
        )));
    }
    let addr: SocketAddr = format!("{}:{LOG_CHECK_PORT}", to.1)
        .parse()
        .map_err(|_| CheckError::Invalid(format!("{} has no logging address", to.0)))?;
    let rtts = patiently(|| ping(addr, pings))?;
    let (bytes, secs) = patiently(|| bulk(addr, mib))?;
    let rate = bytes as f64 / secs.max(1e-9);
    Ok(LogCheck {
        from: from.0.into(),
        to: to.0.into(),
        from_ip: from.1.into(),
        to_ip: to.1.into(),
        pings,
        rtt_min_us: rtts.first().copied().unwrap_or(0),
        rtt_median_us: pct(&rtts, 50),
        rtt_p99_us: pct(&rtts, 99),
        bytes,
        secs,
        mbyte_s: rate / 1e6,
        gbit_s: rate * 8.0 / 1e9,
        at_ms: crate::model::now_ms(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(pct(&v, 50), 51);
        assert_eq!(pct(&v, 99), 100);
        assert_eq!(pct(&[7], 99), 7);
        assert_eq!(pct(&[], 50), 0);
    }

    #[test]
    fn a_measurement_against_a_real_service_and_a_hostile_request() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        serve_listener(l).unwrap();
        let rtts = ping(addr, 50).unwrap();
        assert_eq!(rtts.len(), 50);
        assert!(rtts[0] <= rtts[49]);
        // The ping's thread may still be ending (one measurement at a time): busy, briefly.
        let (got, secs) = (0..50)
            .find_map(|_| {
                bulk(addr, 4)
                    .inspect_err(|_| std::thread::sleep(std::time::Duration::from_millis(20)))
                    .ok()
            })
            .expect("the bulk measurement");
        assert_eq!(got, 4 << 20);
        assert!(secs > 0.0);
        // Over the bounds: refused (closed), and the service serves the next one.
        // (The previous measurement's thread may still be ending: busy, once.)
        for tries in 0.. {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&[b'T', 0xff, 0xff, 0xff, 0xff]).unwrap();
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(1) if b[0] == b'B' && tries < 50 => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => {
                    assert!(matches!(r, Ok(0) | Err(_)), "{r:?} {b:?}");
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ping(addr, 3).unwrap().len(), 3);
    }

    #[test]
    fn bounds_are_checked_before_anything_is_sent() {
        let e = measure(("a", "127.0.0.1"), ("b", "127.0.0.1"), 0, 1).unwrap_err();
        assert!(e.to_string().contains("pings"), "{e}");
        let e = measure(("a", "127.0.0.1"), ("b", "127.0.0.1"), 1, MAX_MIB + 1).unwrap_err();
        assert!(e.to_string().contains("mib"), "{e}");
    }
}
