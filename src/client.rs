//! Clients the binary drives from a lab's client namespace: entering a namespace, a minimal
//! RESP client, and the failover checker.
//!
//! The checker holds one TCP connection to a Redis-protocol server and does INCR after
//! INCR on one key, remembering every value the server acknowledged, every reset and the
//! longest silence between two replies. After a failover it proves, with a fresh
//! connection, that every acknowledged increment survived.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Run `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    api::client::in_netns(ns, f)?
}

/// One command to the RESP server at `addr`, over a fresh connection from namespace `ns`.
pub fn redis_in(ns: &str, addr: SocketAddr, args: &[&str]) -> Result<String> {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    in_netns(ns, move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Resp::connect(addr, Duration::from_secs(5))?.call(&refs)
    })
}

/// `redis-benchmark -h IP` run in namespace `ns`, ended after `limit_s` seconds (the
/// caller adds the load's arguments and what to do with its output).
pub fn redis_benchmark(ns: &str, ip: &str, limit_s: u64) -> std::process::Command {
    let mut cmd = std::process::Command::new("timeout");
    // `--foreground`: redis-benchmark stays in the caller's process group, so a terminal's
    // Ctrl-C ends it with the VMs it loads (in a group of its own it waited out `limit_s`
    // against servers that had stopped). `ip netns exec` execs it: the limit still holds.
    cmd.arg("--foreground").arg(limit_s.to_string()).args([
        "ip",
        "netns",
        "exec",
        ns,
        "redis-benchmark",
        "-h",
        ip,
    ]);
    cmd
}

/// One RESP connection.
pub struct Resp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Resp {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Resp> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Resp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// Send a command and read a one-line reply (`+OK`, `:1`, `-ERR ...`) or a bulk string.
    pub fn call(&mut self, args: &[&str]) -> Result<String> {
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(cmd.as_bytes())?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            bail!("the server closed the connection");
        }
        let line = line.trim_end().to_string();
        if let Some(len) = line.strip_prefix('$') {
            let len: i64 = len.parse()?;
            if len < 0 {
                return Ok(String::new());
            }
            let mut body = String::new();
            self.r.read_line(&mut body)?;
            return Ok(body.trim_end().to_string());
        }
        Ok(line)
    }
}

#[derive(Debug, Default, Clone)]
pub struct CheckerReport {
    /// INCRs the server acknowledged, and the last value it returned.
    pub acked: u64,
    pub last_value: i64,
    /// Replies that were not the previous value plus one.
    pub out_of_order: u64,
    pub resets: u64,
    pub errors: Vec<String>,
    /// The longest time between two replies, in ms.
    pub max_gap_ms: u64,
    /// Replies received after `mark` was set (e.g. after the kill).
    pub after_mark: u64,
}

/// INCR `key` over one connection until `stop`; `mark` splits before and after an event.
pub fn checker(
    addr: SocketAddr,
    key: String,
    stop: Arc<AtomicBool>,
    mark: Arc<AtomicBool>,
) -> Result<CheckerReport> {
    let mut rep = CheckerReport::default();
    let mut conn = Resp::connect(addr, Duration::from_secs(10))?;
    let mut last_reply = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        match conn.call(&["INCR", &key]) {
            Ok(reply) => {
                let now = Instant::now();
                rep.max_gap_ms = rep
                    .max_gap_ms
                    .max(now.duration_since(last_reply).as_millis() as u64);
                last_reply = now;
                match reply.strip_prefix(':').and_then(|v| v.parse::<i64>().ok()) {
                    Some(v) => {
                        if rep.acked > 0 && v != rep.last_value + 1 {
                            rep.out_of_order += 1;
                        }
                        rep.acked += 1;
                        rep.last_value = v;
                        if mark.load(Ordering::SeqCst) {
                            rep.after_mark += 1;
                        }
                    }
                    None => rep.errors.push(reply),
                }
            }
            Err(e) => {
                let reset = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset);
                if reset {
                    rep.resets += 1;
                } else {
                    rep.errors.push(format!("{e:#}"));
                }
                if rep.errors.len() > 20 {
                    break;
                }
                conn = Resp::connect(addr, Duration::from_secs(10))?;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(rep)
}
