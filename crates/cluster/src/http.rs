//! A minimal blocking HTTP/1.1 client over [`std::net::TcpStream`]: one request per
//! connection (`Connection: close`), plain `http://` only.
//!
//! It owns nothing but the one connection of a call. Invariants: whatever the server
//! sends, a call returns within about its `timeout` (one deadline covers connecting,
//! sending and reading), never buffers more than [`MAX_HEADERS`] of status line and
//! headers nor more than [`MAX_BODY`] of body, and never panics. Used by the cluster
//! store (etcd's JSON gateway) and by the CLI's REST client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The most bytes of status line and headers accepted (each response, 1xx included).
pub const MAX_HEADERS: usize = 64 * 1024;
/// The largest body accepted.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("bad URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {why}")]
    Resolve { host: String, why: String },
    /// No address of the host accepted a connection.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The deadline passed before the whole answer arrived.
    #[error("{url}: no complete answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The connection failed while sending or reading.
    #[error("{url}: {source}")]
    Io { url: String, source: std::io::Error },
    /// The answer is not HTTP/1.x as this client reads it.
    #[error("{url}: malformed answer: {why}")]
    Malformed { url: String, why: String },
    /// The answer's headers or body exceed the bounds.
    #[error("{url}: answer too large: {why}")]
    TooLarge { url: String, why: String },
}

impl HttpError {
    /// The server was never reached (nothing was sent): trying another server is safe.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            HttpError::Connect { .. } | HttpError::Resolve { .. } | HttpError::BadUrl { .. }
        )
    }
}

/// A final (non-1xx) answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `http://host[:port][/path]`, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// As written in the URL (`[::1]` keeps its brackets): what the Host header carries.
    pub host: String,
    pub port: u16,
    /// Starts with `/`; `/` when the URL has none. Query strings stay in it.
    pub path: String,
}

impl Url {
    /// `host:port` for the Host header and for resolving.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Split `http://host[:port][/path]`; anything else (https, user info, fragments, control
/// characters) is refused with the reason.
pub fn parse_url(url: &str) -> Result<Url, HttpError> {
    let bad = |why: &str| HttpError::BadUrl {
        url: url.chars().take(200).collect(),
        why: why.to_string(),
    };
    if url.len() > 8192 {
        return Err(bad("longer than 8192 bytes"));
    }
    if url
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b >= 0x80)
    {
        return Err(bad("spaces, control or non-ASCII characters"));
    }
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "scheme {scheme:?}: only http:// is supported"
            )));
        }
        None => return Err(bad("expected http://host:port/path")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if path.contains('#') {
        return Err(bad("fragments are not sent"));
    }
    if authority.contains('@') {
        return Err(bad("user info is not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (inner, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address in [ ]"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
        };
        (format!("[{inner}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("no host"));
    }
    if !host.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    {
        return Err(bad("the host has characters a host name cannot have"));
    }
    let port = match port {
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(bad("the port is not 1-65535")),
        },
    };
    Ok(Url {
        host,
        port,
        path: path.to_string(),
    })
}

/// Send one request and read its answer, all within `timeout`. A body is sent as
/// `Content-Type: application/json`. Any status is a [`Response`]: the caller decides what
/// a 4xx or 5xx means.
pub fn request(
    method: &str,
    url: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    request_with(method, url, &[], body, timeout)
}

/// [`request`] with extra headers (`Authorization`, ...). A header whose name or value could
/// end the line or the head (CR, LF, a ':' in the name) is refused, never sent.
pub fn request_with(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    for (name, value) in headers {
        let bad_name =
            name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if bad_name || value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(HttpError::BadUrl {
                url: url.chars().take(200).collect(),
                why: format!(
                    "header {:?}: not a single header line",
                    name.chars().take(40).collect::<String>()
                ),
            });
        }
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::BadUrl {
            url: url.chars().take(200).collect(),
            why: format!("method {method:?}: expected an upper-case token such as GET"),
        });
    }
    let u = parse_url(url)?;
    let deadline = Instant::now() + timeout;
    let stream = connect(&u, deadline, timeout)?;
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        pos: 0,
        deadline,
        url,
        timeout,
    };
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tandem\r\nAccept: */*\r\nConnection: close\r\n",
        u.path,
        if u.port == 80 {
            u.host.clone()
        } else {
            u.authority()
        }
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    } else if matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.unwrap_or_default());
    conn.write_all(&out)?;
    loop {
        let (status, headers) = conn.read_head()?;
        // 1xx answers are interim (100 Continue, 103 Early Hints): the final one follows.
        // 101 would switch protocols, which this client never asks for.
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = if method == "HEAD" || status == 204 || status == 304 || status == 101 {
            Vec::new()
        } else {
            conn.read_body(&headers)?
        };
        return Ok(Response { status, body });
    }
}

/// The longest wait for a connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn connect(u: &Url, deadline: Instant, timeout: Duration) -> Result<TcpStream, HttpError> {
    let host = u.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (host, u.port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Resolve {
            host: u.host.clone(),
            why: e.to_string(),
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // A server on the same network accepts within milliseconds: one that does not
        // within a second is down or cut off, and the caller's next server is worth more
        // than the rest of the wait.
        match TcpStream::connect_timeout(&addr, left.min(CONNECT_TIMEOUT)) {
            Ok(s) => {
                // Small requests and answers: do not wait to coalesce them.
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, source)) if source.kind() != std::io::ErrorKind::TimedOut => {
            HttpError::Connect {
                addr: addr.to_string(),
                source,
            }
        }
        Some((addr, _)) => HttpError::Connect {
            addr: addr.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ),
        },
        None => HttpError::Resolve {
            host: u.host.clone(),
            why: "no address (or no time left to try one)".into(),
        },
    })
}

/// One connection being read: a buffer over the stream, under the call's deadline.
struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    deadline: Instant,
    url: &'a str,
    timeout: Duration,
}

impl Conn<'_> {
    fn left(&self) -> Result<Duration, HttpError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        Ok(left)
    }

    fn timed_out(&self) -> HttpError {
        HttpError::Timeout {
            url: self.url.to_string(),
            timeout: self.timeout,
        }
    }

    fn io(&self, e: std::io::Error) -> HttpError {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return self.timed_out();
        }
        HttpError::Io {
            url: self.url.to_string(),
            source: e,
        }
    }

    fn malformed(&self, why: impl Into<String>) -> HttpError {
        HttpError::Malformed {
            url: self.url.to_string(),
            why: why.into(),
        }
    }

    fn too_large(&self, why: impl Into<String>) -> HttpError {
        HttpError::TooLarge {
            url: self.url.to_string(),
            why: why.into(),
        }
    }

    fn write_all(&mut self, mut data: &[u8]) -> Result<(), HttpError> {
        while !data.is_empty() {
            let left = self.left()?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            match self.stream.write(data) {
                Ok(0) => return Err(self.io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }

    /// Read more bytes into the buffer; `Ok(false)` at end of stream.
    fn fill(&mut self) -> Result<bool, HttpError> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = self.left()?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.io(e))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
    }

    /// One line without its CRLF (a bare LF is accepted), at most `limit` bytes.
    fn read_line(&mut self, limit: usize, what: &str) -> Result<Vec<u8>, HttpError> {
        // Bytes after `pos` already searched: relative, as `fill` may move the buffer.
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[self.pos + scanned..]
                .iter()
                .position(|&b| b == b'\n')
            {
                let end = self.pos + scanned + i;
                if end - self.pos > limit {
                    return Err(self.too_large(format!("{what} longer than {limit} bytes")));
                }
                let mut line = self.buf[self.pos..end].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.pos = end + 1;
                return Ok(line);
            }
            scanned = self.buf.len() - self.pos;
            if scanned > limit {
                return Err(self.too_large(format!("{what} longer than {limit} bytes")));
            }
            if !self.fill()? {
                return Err(self.malformed(format!("the connection closed within the {what}")));
            }
        }
    }

    /// Status line and headers (names lower-cased), within [`MAX_HEADERS`] in all.
    fn read_head(&mut self) -> Result<(u16, Vec<(String, String)>), HttpError> {
        let mut budget = MAX_HEADERS;
        let status_line = self.read_line(budget, "status line")?;
        budget -= status_line.len();
        let status = parse_status(&status_line).ok_or_else(|| {
            self.malformed(format!(
                "status line {:?}",
                String::from_utf8_lossy(&status_line[..status_line.len().min(100)])
            ))
        })?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line(budget, "headers")?;
            if line.is_empty() {
                return Ok((status, headers));
            }
            budget = budget
                .checked_sub(line.len() + 2)
                .ok_or_else(|| self.too_large(format!("headers over {MAX_HEADERS} bytes")))?;
            let text = String::from_utf8_lossy(&line);
            let (name, value) = text
                .split_once(':')
                .ok_or_else(|| self.malformed("a header line without ':'"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }

    fn read_body(&mut self, headers: &[(String, String)]) -> Result<Vec<u8>, HttpError> {
        fn header<'h>(
            headers: &'h [(String, String)],
            name: &'h str,
        ) -> impl Iterator<Item = &'h String> {
            headers
                .iter()
                .filter(move |(k, _)| k == name)
                .map(|(_, v)| v)
        }
        let chunked = header(headers, "transfer-encoding")
            .flat_map(|v| v.split(','))
            .any(|c| c.trim().eq_ignore_ascii_case("chunked"));
        if chunked {
            return self.read_chunked();
        }
        let lengths: Vec<&String> = header(headers, "content-length").collect();
        if let Some(first) = lengths.first() {
            if lengths.iter().any(|l| l != first) {
                return Err(self.malformed("conflicting Content-Length headers"));
            }
            let n: u64 = first
                .parse()
                .map_err(|_| self.malformed(format!("Content-Length {first:?}")))?;
            if n > MAX_BODY as u64 {
                return Err(self.too_large(format!("a body of {n} bytes (limit {MAX_BODY})")));
            }
            return self.read_exact(n as usize, "body");
        }
        // Neither: the body runs to the end of the connection.
        loop {
            if self.buf.len() - self.pos > MAX_BODY {
                return Err(self.too_large(format!("a body over {MAX_BODY} bytes")));
            }
            if !self.fill()? {
                let body = self.buf[self.pos..].to_vec();
                self.pos = self.buf.len();
                return Ok(body);
            }
        }
    }

    fn read_exact(&mut self, n: usize, what: &str) -> Result<Vec<u8>, HttpError> {
        while self.buf.len() - self.pos < n {
            if !self.fill()? {
                return Err(self.malformed(format!(
                    "the connection closed within the {what} ({} of {n} bytes)",
                    self.buf.len() - self.pos
                )));
            }
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line(1024, "chunk size line")?;
            let text = String::from_utf8_lossy(&line);
            let size = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| self.malformed(format!("chunk size {size:?}")))?;
            if size == 0 {
                break;
            }
            if size > MAX_BODY - body.len() {
                return Err(self.too_large(format!("a chunked body over {MAX_BODY} bytes")));
            }
            body.extend(self.read_exact(size, "chunk")?);
            let end = self.read_line(2, "chunk end")?;
            if !end.is_empty() {
                return Err(self.malformed("a chunk longer than its size"));
            }
        }
        // Trailers (etcd's gateway sends some) up to the empty line, bounded like headers.
        let mut budget = MAX_HEADERS;
        loop {
            let line = self.read_line(budget, "trailers")?;
            if line.is_empty() {
                return Ok(body);
            }
            budget = budget
                .checked_sub(line.len() + 2)
                .ok_or_else(|| self.too_large(format!("trailers over {MAX_HEADERS} bytes")))?;
        }
    }
}

/// `HTTP/1.x NNN reason` → NNN.
fn parse_status(line: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    (100..600).contains(&code).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A one-connection server: reads the request (headers and a Content-Length body),
    /// hands it to the test, then writes `answer` raw and closes.
    fn serve(answer: Vec<u8>) -> (String, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&req[..i]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if req.len() >= i + 4 + len {
                        break;
                    }
                }
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&chunk[..n]);
            }
            let _ = s.write_all(&answer);
            req
        });
        (url, h)
    }

    const T: Duration = Duration::from_secs(5);

    /// Like [`serve`], the answer written in pieces with pauses (so the client reads it
    /// in several reads, its buffer emptied between them).
    fn serve_pieces(pieces: Vec<&'static [u8]>) -> (String, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 4096];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&chunk[..n]);
            }
            for p in pieces {
                s.write_all(p).unwrap();
                s.flush().unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
            req
        });
        (url, h)
    }

    #[test]
    fn answers_split_across_reads() {
        let (url, h) = serve_pieces(vec![
            b"HTTP/1.1 200 OK\r\nTransfer-",
            b"Encoding: chunked\r\n\r\n",
            b"3\r\nabc\r\n",
            b"2\r",
            b"\nde\r\n0\r\n",
            b"T: 1\r\n",
            b"\r\n",
        ]);
        let r = request("GET", &url, None, T).unwrap();
        assert_eq!(r.body, b"abcde");
        h.join().unwrap();
        let (url, h) = serve_pieces(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab",
            b"cd",
            b"ef",
        ]);
        assert_eq!(request("GET", &url, None, T).unwrap().body, b"abcdef");
        h.join().unwrap();
    }

    #[test]
    fn sends_a_json_body_and_reads_content_length() {
        let (url, h) =
            serve(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello-and-junk".to_vec());
        let r = request("POST", &format!("{url}/v3/kv/range"), Some(b"{\"a\":1}"), T).unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: b"hello".to_vec()
            }
        );
        let req = String::from_utf8(h.join().unwrap()).unwrap();
        assert!(req.starts_with("POST /v3/kv/range HTTP/1.1\r\n"), "{req}");
        let lower = req.to_lowercase();
        assert!(
            lower.contains("content-type: application/json\r\n"),
            "{req}"
        );
        assert!(lower.contains("connection: close\r\n"), "{req}");
        assert!(lower.contains("content-length: 7\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {}\r\n", url.trim_start_matches("http://"))));
        assert!(req.ends_with("\r\n\r\n{\"a\":1}"), "{req}");
    }

    #[test]
    fn get_without_body_sends_no_content_type() {
        let (url, h) = serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno".to_vec());
        let r = request("GET", &url, None, T).unwrap();
        assert_eq!((r.status, r.text().as_str()), (404, "no"));
        let req = String::from_utf8(h.join().unwrap()).unwrap();
        assert!(req.starts_with("GET / HTTP/1.1\r\n"), "{req}");
        assert!(!req.to_lowercase().contains("content-type"), "{req}");
    }

    #[test]
    fn reads_chunked_bodies_with_extensions_and_trailers() {
        let (url, h) = serve(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X\r\n\r\n\
              4;ext=1\r\nabcd\r\na\r\n0123456789\r\n0\r\nGrpc-Trailer-X: y\r\n\r\n"
                .to_vec(),
        );
        let r = request("GET", &url, None, T).unwrap();
        assert_eq!(r.body, b"abcd0123456789");
        h.join().unwrap();
    }

    #[test]
    fn reads_to_the_end_without_a_length_and_skips_interim_answers() {
        let (url, h) = serve(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 201 Created\r\nX: 1\r\n\r\nall of it".to_vec(),
        );
        let r = request("PUT", &url, None, T).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"all of it"[..]));
        h.join().unwrap();
    }

    #[test]
    fn refuses_oversized_headers_and_bodies() {
        let mut big = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADERS + 10));
        big.extend_from_slice(b"\r\n\r\n");
        let (url, h) = serve(big);
        let e = request("GET", &url, None, T).unwrap_err();
        assert!(matches!(e, HttpError::TooLarge { .. }), "{e}");
        h.join().unwrap();

        let (url, h) = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 67108865\r\n\r\n".to_vec());
        let e = request("GET", &url, None, T).unwrap_err();
        assert!(matches!(e, HttpError::TooLarge { .. }), "{e}");
        h.join().unwrap();

        let (url, h) =
            serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4000001\r\n".to_vec());
        let e = request("GET", &url, None, T).unwrap_err();
        assert!(matches!(e, HttpError::TooLarge { .. }), "{e}");
        h.join().unwrap();
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for answer in [
            &b""[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
        ] {
            let (url, h) = serve(answer.to_vec());
            let e = request("GET", &url, None, T).unwrap_err();
            assert!(
                matches!(e, HttpError::Malformed { .. }),
                "{:?}: {e}",
                String::from_utf8_lossy(answer)
            );
            h.join().unwrap();
        }
    }

    #[test]
    fn a_silent_server_times_out_within_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        // Accepts (the kernel does, by the backlog) and never answers.
        let start = Instant::now();
        let e = request("GET", &url, None, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        drop(listener);
    }

    #[test]
    fn a_closed_port_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        drop(listener);
        let e = request("GET", &url, None, T).unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("http://10.79.0.1:2379").unwrap(),
            Url {
                host: "10.79.0.1".into(),
                port: 2379,
                path: "/".into()
            }
        );
        assert_eq!(
            parse_url("http://[::1]:7070/v1/vms?x=1").unwrap(),
            Url {
                host: "[::1]".into(),
                port: 7070,
                path: "/v1/vms?x=1".into()
            }
        );
        assert_eq!(parse_url("HTTP://example.org/a").unwrap().port, 80);
        for bad in [
            "https://a:1/",
            "a:1",
            "http://",
            "http://:80/",
            "http://a:0/",
            "http://a:99999/",
            "http://a:x/",
            "http://u@a/",
            "http://a b/",
            "http://a/\r\nX: y",
            "http://[::1/",
            "http://[zz]:1/",
            "http://a/#f",
            "http://é/",
        ] {
            assert!(
                matches!(parse_url(bad), Err(HttpError::BadUrl { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            request("get", "http://a/", None, T),
            Err(HttpError::BadUrl { .. })
        ));
    }
}
