//! A stand-in for `cluster::http::request` (helper A's blocking HTTP client), with its
//! signature, until that lands: the client calls HTTP only through [`request`], so the
//! switch is this module's `use` in `client.rs`.
//!
//! One request per connection (`Connection: close`); the answer is bounded
//! ([`MAX_RESPONSE`]) and every read has the caller's timeout.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The largest answer read, bytes.
pub const MAX_RESPONSE: usize = 16 << 20;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0:?}: expected http://HOST:PORT/PATH")]
    Url(String),
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("{0}")]
    Io(String),
    #[error("malformed answer: {0}")]
    Malformed(String),
}

impl HttpError {
    /// The server was never reached (nothing was sent): trying another server is safe.
    pub fn is_connect(&self) -> bool {
        matches!(self, HttpError::Url(_) | HttpError::Connect(_))
    }
}

/// `METHOD url` with an optional JSON body; the whole exchange within about `timeout`.
pub fn request(
    method: &str,
    url: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HttpError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || path.contains([' ', '\r', '\n']) {
        return Err(HttpError::Url(url.into()));
    }
    let deadline = Instant::now() + timeout;
    let addrs: Vec<_> = authority
        .to_socket_addrs()
        .map_err(|e| HttpError::Connect(format!("{authority}: {e}")))?
        .collect();
    let mut last = format!("{authority}: no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("{authority}: {e}"),
        }
    }
    let mut stream = stream.ok_or(HttpError::Connect(last))?;
    let io = |e: std::io::Error| HttpError::Io(format!("{authority}: {e}"));
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let body = body.unwrap_or_default();
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Accept: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out).map_err(io)?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if Instant::now() > deadline {
            return Err(HttpError::Io(format!("{authority}: timed out")));
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.len() > MAX_RESPONSE {
                    return Err(HttpError::Malformed(format!(
                        "answer over {MAX_RESPONSE} bytes"
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    parse(&answer)
}

fn parse(answer: &[u8]) -> Result<Response, HttpError> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| HttpError::Malformed("no end of head".into()))?;
    let head = std::str::from_utf8(&answer[..end])
        .map_err(|_| HttpError::Malformed("head not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| HttpError::Malformed(format!("status line {status_line:?}")))?;
    let mut length = None;
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = answer[end + 4..].to_vec();
    if let Some(n) = length {
        if body.len() < n {
            return Err(HttpError::Malformed(format!(
                "body of {} bytes, {n} announced",
                body.len()
            )));
        }
        body.truncate(n);
    }
    Ok(Response { status, body })
}
