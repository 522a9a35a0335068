//! `tandem lab dashboard`: a lab's agents, reachable from this machine. The agents listen on
//! the lab's management network, which only the lab's namespaces reach; this relays each
//! TCP connection accepted here to the first agent that accepts one, connecting from the
//! lab's client machine (a thread that joins its namespace to connect; the relaying itself
//! needs no namespace). A dead host's agent is passed over at the next connection, so the
//! dashboard's event stream reconnects to a live agent; the sign-in cookie is the cluster's
//! token, valid at every agent.
//!
//! Bounds: at most [`MAX_RELAYS`] connections at once (more wait in the listen backlog's
//! place: they are closed); a connection attempt to an agent takes at most
//! [`CONNECT_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Connections relayed at once.
const MAX_RELAYS: usize = 64;
/// The longest wait for one agent to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The agents' `IP:PORT`s from the lab file's `http://IP:PORT` APIs.
fn agents(name: &str) -> Result<(String, Vec<SocketAddr>)> {
    let path = crate::lab::lab_file(name);
    let text = std::fs::read(&path)
        .with_context(|| format!("{}: is lab {name} up with a cluster?", path.display()))?;
    let lab: crate::lab::LabFile =
        serde_json::from_slice(&text).with_context(|| format!("{}", path.display()))?;
    let addrs: Vec<SocketAddr> = lab
        .apis
        .iter()
        .filter_map(|a| a.strip_prefix("http://"))
        .filter_map(|a| a.trim_end_matches('/').parse().ok())
        .collect();
    if addrs.is_empty() {
        bail!("{} lists no agent API", path.display());
    }
    Ok((lab.netns, addrs))
}

/// Relay until interrupted.
pub fn run(name: &str, listen: SocketAddr, addr_file: Option<&std::path::Path>) -> Result<u8> {
    let (ns, addrs) = agents(name)?;
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let listen = listener.local_addr().context("the address listened on")?;
    if let Some(f) = addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, listen.to_string())
            .and_then(|()| std::fs::rename(&tmp, f))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    // A relay outlives nothing of its lab: once the lab file is gone (`lab down`), it ends.
    let lab = crate::lab::lab_file(name);
    std::thread::spawn(move || {
        while lab.exists() {
            std::thread::sleep(Duration::from_secs(1));
        }
        std::process::exit(0);
    });
    let token = crate::lab::token_file(name);
    println!(
        "dashboard: http://{listen}/ (relayed to lab {name}'s agents {}; sign in with the \
         token in {}); Ctrl-C stops",
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        token.display()
    );
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(client) = conn else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if active.load(Ordering::SeqCst) >= MAX_RELAYS {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (ns, addrs, done) = (ns.clone(), addrs.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                relay(client, &ns, &addrs);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The thread never ran (its closure, and the connection, were dropped): its
            // count is given back here.
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("lab dashboard: cannot start a relay thread");
        }
    }
    Ok(0)
}

/// The first agent that accepts a connection, connected from namespace `ns`.
fn connect(ns: &str, addrs: &[SocketAddr]) -> Option<TcpStream> {
    let addrs = addrs.to_vec();
    api::client::in_netns(ns, move || {
        addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, CONNECT_TIMEOUT).ok())
    })
    .ok()
    .flatten()
}

fn relay(client: TcpStream, ns: &str, addrs: &[SocketAddr]) {
    let Some(agent) = connect(ns, addrs) else {
        let mut c = client;
        let body = "no agent of the lab accepts a connection\n";
        let _ = write!(
            c,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    };
    let (Ok(client2), Ok(agent2)) = (client.try_clone(), agent.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || pipe(client2, agent2));
    pipe(agent, client);
    let _ = up.join();
}

/// Copy `from` to `to` until `from` ends, then end `to`'s writing side.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
