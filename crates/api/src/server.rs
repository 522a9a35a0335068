//! The API server: HTTP/1.1 on a std `TcpListener`, a thread per connection, one request
//! per connection (`Connection: close`), JSON in and out.
//!
//! Every request is hostile until parsed: the head is bounded ([`MAX_HEAD`], 431 beyond),
//! the body too ([`MAX_BODY`], 413 beyond), each read has a timeout, at most
//! [`MAX_CONNECTIONS`] are served at once (503 beyond), and no input makes it panic (a
//! panicking verb is caught and answered 500). A request's `{name}` is checked before the
//! verbs see it ([`crate::routes`]).
//!
//! The verbs are reached through [`Backend`], implemented by `cluster::verbs::Verbs`: the
//! unit tests put an in-memory fake behind it, and what they test is this layer (parsing,
//! routing, error mapping), never the cluster.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use cluster::ClusterError;
use cluster::logcheck::{CheckRequest, LogCheck};
use cluster::model::{ClusterView, HostView, VmView, valid_name};
use cluster::ops::{Monitoring, Sizing};
use cluster::verbs::{CreateVm, FtOp, ScheduleRequest, Verbs};
use serde::Deserialize;

use crate::ApiError;
use crate::routes::{self, FtKind, Kind, Miss, clip};

/// Connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// The request line and headers, bytes.
pub const MAX_HEAD: usize = 8 << 10;
/// Headers in one request.
pub const MAX_HEADERS: usize = 64;
/// A request's body, bytes.
pub const MAX_BODY: usize = 1 << 20;
/// The longest wait for a client's next bytes, and for it to take ours.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a whole request may take to arrive (a client trickling bytes just under
/// [`IO_TIMEOUT`] holds its slot no longer than this).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Who serves: named in every answer's `X-Tandem-Host` header and in `/healthz`.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    pub host: String,
}

/// The verbs as the server calls them (`cluster::verbs::Verbs`'s methods).
pub trait Backend: Send + Sync + 'static {
    fn status(&self) -> Result<ClusterView, ClusterError>;
    fn hosts(&self) -> Result<Vec<HostView>, ClusterError>;
    fn vms(&self) -> Result<Vec<VmView>, ClusterError>;
    fn vm(&self, name: &str) -> Result<VmView, ClusterError>;
    fn create(&self, req: CreateVm) -> Result<VmView, ClusterError>;
    fn power_on(&self, name: &str, host: Option<String>) -> Result<VmView, ClusterError>;
    fn power_off(&self, name: &str) -> Result<VmView, ClusterError>;
    fn destroy(&self, name: &str) -> Result<(), ClusterError>;
    fn ft(&self, name: &str, op: FtOp) -> Result<VmView, ClusterError>;
    fn maintenance(&self, host: &str, enter: bool) -> Result<HostView, ClusterError>;
    /// The day-two verbs (issue 11); a backend without them answers 501-like errors.
    fn ft_schedule(&self, name: &str, req: ScheduleRequest) -> Result<VmView, ClusterError> {
        let _ = (name, req);
        Err(ClusterError::Internal("not served here".into()))
    }
    fn ft_sizing(&self, name: &str) -> Result<Sizing, ClusterError> {
        let _ = name;
        Err(ClusterError::Internal("not served here".into()))
    }
    fn set_monitoring(&self, name: &str, m: Monitoring) -> Result<VmView, ClusterError> {
        let _ = (name, m);
        Err(ClusterError::Internal("not served here".into()))
    }
    /// Measure the logging network from host `from`; `me` is the host serving the call.
    fn check_logging(
        &self,
        me: &str,
        from: &str,
        req: CheckRequest,
    ) -> Result<LogCheck, ClusterError> {
        let _ = (me, from, req);
        Err(ClusterError::Internal("not served here".into()))
    }
}

impl Backend for Verbs {
    fn status(&self) -> Result<ClusterView, ClusterError> {
        Verbs::status(self)
    }
    fn hosts(&self) -> Result<Vec<HostView>, ClusterError> {
        Verbs::hosts(self)
    }
    fn vms(&self) -> Result<Vec<VmView>, ClusterError> {
        Verbs::vms(self)
    }
    fn vm(&self, name: &str) -> Result<VmView, ClusterError> {
        Verbs::vm(self, name)
    }
    fn create(&self, req: CreateVm) -> Result<VmView, ClusterError> {
        Verbs::create(self, req)
    }
    fn power_on(&self, name: &str, host: Option<String>) -> Result<VmView, ClusterError> {
        Verbs::power_on(self, name, host)
    }
    fn power_off(&self, name: &str) -> Result<VmView, ClusterError> {
        Verbs::power_off(self, name)
    }
    fn destroy(&self, name: &str) -> Result<(), ClusterError> {
        Verbs::destroy(self, name)
    }
    fn ft(&self, name: &str, op: FtOp) -> Result<VmView, ClusterError> {
        Verbs::ft(self, name, op)
    }
    fn maintenance(&self, host: &str, enter: bool) -> Result<HostView, ClusterError> {
        if enter {
            Verbs::enter_maintenance(self, host)
        } else {
            Verbs::exit_maintenance(self, host)
        }
    }
    fn ft_schedule(&self, name: &str, req: ScheduleRequest) -> Result<VmView, ClusterError> {
        Verbs::ft_schedule(self, name, req)
    }
    fn ft_sizing(&self, name: &str) -> Result<Sizing, ClusterError> {
        Verbs::sizing(self, name)
    }
    fn set_monitoring(&self, name: &str, m: Monitoring) -> Result<VmView, ClusterError> {
        Verbs::set_monitoring(self, name, m)
    }
    fn check_logging(
        &self,
        me: &str,
        from: &str,
        req: CheckRequest,
    ) -> Result<LogCheck, ClusterError> {
        Verbs::check_logging(self, me, from, req)
    }
}

/// A running server; dropping it stops accepting (connections in flight finish).
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// The address it listens on (the port chosen if `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and wait for the accepting thread to end.
    pub fn shutdown(mut self) {
        self.stop_accepting();
    }

    fn stop_accepting(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop_accepting();
        }
    }
}

/// Serve the REST API on `listen` over these verbs.
pub fn serve(listen: SocketAddr, verbs: Verbs, info: AgentInfo) -> Result<Server, ApiError> {
    serve_backend(listen, Arc::new(verbs), info)
}

/// Serve the REST API over any [`Backend`].
pub fn serve_backend(
    listen: SocketAddr,
    backend: Arc<dyn Backend>,
    info: AgentInfo,
) -> Result<Server, ApiError> {
    let listener = TcpListener::bind(listen).map_err(|source| ApiError::Listen {
        addr: listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| ApiError::Listen {
        addr: listen,
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let accept = {
        let stop = stop.clone();
        let info = Arc::new(info);
        std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || accept_loop(listener, backend, info, stop))
            .map_err(ApiError::Thread)?
    };
    tracing::info!("REST API on http://{addr}");
    Ok(Server {
        addr,
        stop,
        accept: Some(accept),
    })
}

/// Counts a connection while it is served (also when its thread panics or never starts).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: TcpListener,
    backend: Arc<dyn Backend>,
    info: Arc<AgentInfo>,
    stop: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or the like: do not spin on it.
                tracing::warn!("API accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            drop(Slot(active.clone()));
            // Written from this thread: bounded by the write timeout, and small enough for
            // the socket's buffer.
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let r = error(503, "too many connections: try again".into());
            let _ = stream.write_all(&r.to_bytes(&info.host));
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let slot = Slot(active.clone());
        let (backend, info) = (backend.clone(), info.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(&mut stream, &*backend, &info);
                let _ = stream.shutdown(Shutdown::Both);
            });
        if let Err(e) = spawned {
            tracing::warn!("API: cannot start a connection's thread: {e}");
        }
    }
}

/// One answer.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub allow: Option<String>,
}

impl Response {
    fn to_bytes(&self, host: &str) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        // The host name is ours, but keep the header well-formed whatever it is.
        let host: String = host.chars().filter(|c| c.is_ascii_graphic()).collect();
        head.push_str(&format!("X-Tandem-Host: {host}\r\nConnection: close\r\n"));
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if self.status != 204 {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                self.body.len()
            ));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if self.status != 204 {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// `{"error": "..."}` with its status; the message made one line.
pub(crate) fn error(status: u16, message: String) -> Response {
    let line = message.replace(['\r', '\n'], " ");
    Response {
        status,
        body: serde_json::to_vec(&serde_json::json!({ "error": line }))
            .unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec()),
        allow: None,
    }
}

fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response {
            status,
            body,
            allow: None,
        },
        Err(e) => error(500, format!("cannot encode the answer: {e}")),
    }
}

/// The status code of a verb's error.
pub fn status_of(e: &ClusterError) -> u16 {
    match e {
        ClusterError::NotFound(_) => 404,
        ClusterError::Invalid(_) => 400,
        ClusterError::Conflict(_) => 409,
        ClusterError::Store(_) => 503,
        ClusterError::Internal(_) => 500,
    }
}

/// Read one request from the connection, answer it.
pub(crate) fn serve_connection<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    info: &AgentInfo,
) {
    let response = match read_request(stream) {
        Ok(Some(req)) => respond(&req, backend, info),
        // The peer closed without a request: nothing to answer.
        Ok(None) => return,
        Err(r) => r,
    };
    let _ = stream.write_all(&response.to_bytes(&info.host));
    let _ = stream.flush();
}

/// A parsed request.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Read and parse one request: `Ok(None)` if the peer sent nothing, `Err` the answer to a
/// request refused (too large, malformed, too slow).
pub(crate) fn read_request<S: Read + Write>(stream: &mut S) -> Result<Option<Request>, Response> {
    let started = std::time::Instant::now();
    let too_slow = || error(408, "timed out waiting for the request".into());
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(error(431, format!("request head over {MAX_HEAD} bytes")));
        }
        if started.elapsed() > REQUEST_DEADLINE {
            return Err(too_slow());
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(error(400, "the request ended inside its head".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(too_slow()),
            Err(_) => return Ok(None),
        }
    };
    if head_end > MAX_HEAD {
        return Err(error(431, format!("request head over {MAX_HEAD} bytes")));
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| error(400, "the request head is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(error(
            400,
            format!("malformed request line {:?}", clip(request_line)),
        ));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(error(400, format!("malformed method {:?}", clip(method))));
    }
    if !target.starts_with('/') {
        return Err(error(400, format!("malformed target {:?}", clip(target))));
    }
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(error(
            505,
            format!(
                "HTTP version {:?} not supported (HTTP/1.1 is)",
                clip(version)
            ),
        ));
    }
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for (i, line) in lines.enumerate() {
        if i >= MAX_HEADERS {
            return Err(error(431, format!("more than {MAX_HEADERS} headers")));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(error(400, format!("malformed header {:?}", clip(line))));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| error(400, format!("bad Content-Length {:?}", clip(value))))?;
            if n > MAX_BODY as u64 {
                return Err(error(413, format!("request body over {MAX_BODY} bytes")));
            }
            if content_length.is_some_and(|c| c as u64 != n) {
                return Err(error(400, "conflicting Content-Length headers".into()));
            }
            content_length = Some(n as usize);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(error(
                501,
                "Transfer-Encoding is not supported: send the body with Content-Length".into(),
            ));
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    let length = content_length.unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    if body.len() > length {
        // Pipelined bytes after the body: this server answers one request per connection.
        body.truncate(length);
    }
    if body.len() < length && expect_continue {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    while body.len() < length {
        if started.elapsed() > REQUEST_DEADLINE {
            return Err(too_slow());
        }
        let want = (length - body.len()).min(chunk.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => {
                return Err(error(
                    400,
                    format!("the body ended after {} of {length} bytes", body.len()),
                ));
            }
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(too_slow()),
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        body,
    }))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// `power-on`'s body (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PowerOnBody {
    #[serde(default)]
    host: Option<String>,
}

/// `migrate-secondary`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    to: String,
}

/// The other verbs take no body, or `{}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoBody {}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| error(400, format!("malformed JSON: {e}")))
}

/// A body that may be absent (empty, or only whitespace).
fn parse_optional<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body)
    }
}

fn check_host(what: &str, host: &str) -> Result<(), Response> {
    if valid_name(host) {
        Ok(())
    } else {
        Err(error(
            400,
            format!(
                "bad host name {:?} in {what}: use 1-63 lowercase letters, digits and '-'",
                clip(host)
            ),
        ))
    }
}

/// Answer a parsed request; a panicking verb is answered 500.
pub(crate) fn respond(req: &Request, backend: &dyn Backend, info: &AgentInfo) -> Response {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dispatch(req, backend, info)
    }));
    match result {
        Ok(Ok(r)) | Ok(Err(r)) => r,
        Err(_) => error(500, "internal error: the verb failed on this host".into()),
    }
}

fn dispatch(req: &Request, backend: &dyn Backend, info: &AgentInfo) -> Result<Response, Response> {
    let (kind, name) = routes::route(&req.method, &req.target).map_err(|miss| match miss {
        Miss::NotFound(m) => error(404, m),
        Miss::BadName(m) => error(400, m),
        Miss::Method { allow, message } => Response {
            allow: Some(allow),
            ..error(405, message)
        },
    })?;
    let name = name.unwrap_or_default();
    let verb = |r: Result<VmView, ClusterError>, status: u16| match r {
        Ok(v) => json(status, &v),
        Err(e) => error(status_of(&e), e.to_string()),
    };
    Ok(match kind {
        Kind::Healthz => json(200, &serde_json::json!({"ok": true, "host": info.host})),
        Kind::OpenApi => Response {
            status: 200,
            body: crate::OPENAPI.as_bytes().to_vec(),
            allow: None,
        },
        Kind::Cluster => match backend.status() {
            Ok(v) => json(200, &v),
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::Hosts => match backend.hosts() {
            Ok(v) => json(200, &v),
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::Vms => match backend.vms() {
            Ok(v) => json(200, &v),
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::GetVm => verb(backend.vm(&name), 200),
        Kind::CreateVm => {
            let create: CreateVm = parse(&req.body)?;
            if !valid_name(&create.name) {
                return Err(error(
                    400,
                    format!(
                        "bad VM name {:?}: use 1-63 lowercase letters, digits and '-', not \
                         starting with '-'",
                        clip(&create.name)
                    ),
                ));
            }
            verb(backend.create(create), 201)
        }
        Kind::DestroyVm => match backend.destroy(&name) {
            Ok(()) => Response {
                status: 204,
                body: Vec::new(),
                allow: None,
            },
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::PowerOn => {
            let b: PowerOnBody = parse_optional(&req.body)?;
            if let Some(h) = &b.host {
                check_host("\"host\"", h)?;
            }
            verb(backend.power_on(&name, b.host), 200)
        }
        Kind::PowerOff => {
            parse_optional::<NoBody>(&req.body)?;
            verb(backend.power_off(&name), 200)
        }
        Kind::FtSchedule => {
            let b: ScheduleRequest = parse(&req.body)?;
            verb(backend.ft_schedule(&name, b), 200)
        }
        Kind::SetMonitoring => {
            let m: Monitoring = parse(&req.body)?;
            verb(backend.set_monitoring(&name, m), 200)
        }
        Kind::FtSizing => match backend.ft_sizing(&name) {
            Ok(v) => json(200, &v),
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::CheckLogging => {
            let b: CheckRequest = parse(&req.body)?;
            check_host("\"to\"", &b.to)?;
            match backend.check_logging(&info.host, &name, b) {
                Ok(v) => json(200, &v),
                Err(e) => error(status_of(&e), e.to_string()),
            }
        }
        Kind::Ft(ft) => {
            let simple = |op: FtOp| parse_optional::<NoBody>(&req.body).map(|_| op);
            let op = match ft {
                FtKind::MigrateSecondary => {
                    let b: MigrateBody = parse(&req.body)?;
                    check_host("\"to\"", &b.to)?;
                    FtOp::MigrateSecondary { to: b.to }
                }
                FtKind::TurnOn => simple(FtOp::TurnOn)?,
                FtKind::TurnOff => simple(FtOp::TurnOff)?,
                FtKind::Disable => simple(FtOp::Disable)?,
                FtKind::Enable => simple(FtOp::Enable)?,
                FtKind::TestFailover => simple(FtOp::TestFailover)?,
                FtKind::RestartSecondary => simple(FtOp::RestartSecondary)?,
            };
            verb(backend.ft(&name, op), 200)
        }
        Kind::Maintenance(enter) => {
            parse_optional::<NoBody>(&req.body)?;
            match backend.maintenance(&name, enter) {
                Ok(v) => json(200, &v),
                Err(e) => error(status_of(&e), e.to_string()),
            }
        }
    })
}
