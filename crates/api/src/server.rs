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
//!
//! Auth: with a token set ([`AgentInfo::token`]), every route whose table entry says `auth`
//! needs it, as `Authorization: Bearer TOKEN` or as the dashboard's HttpOnly cookie
//! ([`COOKIE`], set by signing in); anything else is 401 (the dashboard's 401 is its sign-in
//! page). A change authenticated by the cookie alone must also carry [`CSRF_HEADER`] (which
//! a cross-site form cannot send), or it is 403. Tokens are compared in constant time.
//!
//! The event stream (`/api/v1/events`) holds its connection: at most [`MAX_STREAMS`] at
//! once, each at most [`STREAM_LIFETIME`], each ending when the server stops.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cluster::ClusterError;
use cluster::logcheck::{CheckRequest, LogCheck};
use cluster::model::{ClusterView, HostView, VmView, valid_name};
use cluster::ops::{Monitoring, Sizing};
use cluster::timeline::{EventKind, TimelineEvent};
use cluster::verbs::{CreateVm, FtOp, ScheduleRequest, Verbs};

use crate::ApiError;
use crate::bodies::{
    ErrorBody, Health, MigrateBody, NoBody, PowerOnBody, Sample, SignInBody, Snapshot,
};
use crate::routes::{self, FtKind, Kind, Miss, clip};

/// The dashboard's cookie (HttpOnly, SameSite=Strict): the token, set by signing in.
pub const COOKIE: &str = "tandem_token";
/// The header a cookie-authenticated change must carry (`1`): the dashboard's scripts send
/// it; a form or link from another site cannot.
pub const CSRF_HEADER: &str = "x-tandem-csrf";
/// Event streams served at once; one more is answered 503.
pub const MAX_STREAMS: usize = 16;
/// How long one event stream lasts (the browser's EventSource reconnects).
pub const STREAM_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// How often a stream sends the cluster's state.
pub const STREAM_PERIOD: Duration = Duration::from_secs(1);
/// How far back the charts' samples go.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(300);
/// The samples' spacing (at most [`HISTORY_WINDOW`] / this many are kept).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Timeline events in a stream's snapshot, and in `GET /api/v1/timeline`.
const SNAPSHOT_EVENTS: usize = 50;
const TIMELINE_EVENTS: usize = 200;
/// The dashboard: one page, its styles and scripts inline (no build step, no CDN).
const DASHBOARD: &str = include_str!("dashboard.html");
const SIGN_IN: &str = include_str!("signin.html");

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

/// Who serves: named in every answer's `X-Tandem-Host` header and in `/healthz`; and the
/// token its routes require.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    pub host: String,
    /// The cluster's token (`None`: no route needs one: only for tests of this layer).
    pub token: Option<String>,
    /// Where the token is, said on the sign-in page and in 401 answers.
    pub token_hint: String,
}

impl AgentInfo {
    /// An agent that needs no token (tests of this layer).
    pub fn open(host: &str) -> Self {
        AgentInfo {
            host: host.to_string(),
            token: None,
            token_hint: String::new(),
        }
    }
}

/// A token as the lab writes it and agents read it: 16-256 characters safe in a header and
/// a cookie (letters, digits, `-`, `_`, `.`, `~`).
pub fn valid_token(t: &str) -> bool {
    (16..=256).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    /// The last `limit` timeline events, oldest first.
    fn timeline(&self, limit: usize) -> Result<Vec<TimelineEvent>, ClusterError>;
    /// Record a timeline event (best effort: a failure is logged).
    fn note(&self, event: TimelineEvent);
    /// Host maintenance mode: enter or exit.
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
    fn timeline(&self, limit: usize) -> Result<Vec<TimelineEvent>, ClusterError> {
        Ok(cluster::timeline::recent(self.store(), limit)?)
    }
    fn note(&self, event: TimelineEvent) {
        cluster::timeline::note(self.store(), event);
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
    start(listen, Arc::new(verbs), info, true)
}

/// Serve the REST API over any [`Backend`] (the charts' history is sampled only while
/// event streams are open: a test's backend sees no calls but its clients').
pub fn serve_backend(
    listen: SocketAddr,
    backend: Arc<dyn Backend>,
    info: AgentInfo,
) -> Result<Server, ApiError> {
    start(listen, backend, info, false)
}

fn start(
    listen: SocketAddr,
    backend: Arc<dyn Backend>,
    info: AgentInfo,
    sampler: bool,
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
            .spawn(move || accept_loop(listener, backend, info, stop, sampler))
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
    sampler: bool,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let ctx = Arc::new(Ctx::new(stop.clone()));
    if sampler {
        // The charts' history is kept whether or not a page is open.
        let (ctx, backend) = (ctx.clone(), backend.clone());
        let _ = std::thread::Builder::new()
            .name("api-sampler".into())
            .spawn(move || {
                while !ctx.stop.load(Ordering::SeqCst) {
                    if let Ok(vms) = backend.vms() {
                        ctx.sample(cluster::model::now_ms(), &vms);
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            });
    }
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
        let (backend, info, ctx) = (backend.clone(), info.clone(), ctx.clone());
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                let _slot = slot;
                let peer = stream.peer_addr().ok();
                serve_stream(&mut stream, &*backend, &info, &ctx, peer);
                let _ = stream.shutdown(Shutdown::Both);
            });
        if let Err(e) = spawned {
            tracing::warn!("API: cannot start a connection's thread: {e}");
        }
    }
}

/// What the stream serving needs beyond one request: the server's stop flag and how many
/// event streams are open.
pub(crate) struct Ctx {
    pub stop: Arc<AtomicBool>,
    pub streams: AtomicUsize,
    /// The samples of the last [`HISTORY_WINDOW`] (see [`Ctx::sample`]).
    pub history: Mutex<VecDeque<Sample>>,
}

impl Ctx {
    fn new(stop: Arc<AtomicBool>) -> Ctx {
        Ctx {
            stop,
            streams: AtomicUsize::new(0),
            history: Mutex::new(VecDeque::new()),
        }
    }

    /// Keep a sample of `vms` if the last one is [`SAMPLE_EVERY`] old; drop those older
    /// than [`HISTORY_WINDOW`]. At most one per period, whoever calls: the sampler thread
    /// and every open stream.
    pub(crate) fn sample(&self, at_ms: u64, vms: &[VmView]) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let period = SAMPLE_EVERY.as_millis() as u64;
        if h.back().is_some_and(|s| at_ms < s.at_ms + period) {
            return;
        }
        h.push_back(Sample::of(at_ms, vms));
        let window = HISTORY_WINDOW.as_millis() as u64;
        while h.front().is_some_and(|s| s.at_ms + window < at_ms) {
            h.pop_front();
        }
    }

    pub(crate) fn history(&self) -> Vec<Sample> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().cloned().collect()
    }
}

#[cfg(test)]
impl Ctx {
    /// A context whose server has stopped: an event stream sends its head and ends (a test
    /// connection never breaks, so a stream on it would not end otherwise).
    pub(crate) fn detached() -> Ctx {
        Ctx::new(Arc::new(AtomicBool::new(true)))
    }
}

/// One answer.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    pub allow: Option<String>,
    pub content_type: &'static str,
    /// Further headers (`Set-Cookie`, `Location`, ...): names and values of ours only.
    pub headers: Vec<(&'static str, String)>,
    /// The answer is an event stream: its head only is in `to_bytes`, then the stream.
    pub stream: bool,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            body,
            allow: None,
            content_type,
            headers: Vec::new(),
            stream: false,
        }
    }

    fn with(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }

    fn to_bytes(&self, host: &str) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        // The host name is ours, but keep the header well-formed whatever it is.
        let host: String = host.chars().filter(|c| c.is_ascii_graphic()).collect();
        head.push_str(&format!("X-Tandem-Host: {host}\r\nConnection: close\r\n"));
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        for (name, value) in &self.headers {
            let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.stream {
            head.push_str(&format!(
                "Content-Type: {}\r\nCache-Control: no-store\r\n\r\n",
                self.content_type
            ));
            return head.into_bytes();
        }
        if self.status != 204 {
            head.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
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
        303 => "See Other",
        401 => "Unauthorized",
        403 => "Forbidden",
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
    Response::new(
        status,
        "application/json",
        serde_json::to_vec(&ErrorBody { error: line })
            .unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec()),
    )
}

fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => Response::new(status, "application/json", body),
        Err(e) => error(500, format!("cannot encode the answer: {e}")),
    }
}

fn html(status: u16, page: String) -> Response {
    Response::new(status, "text/html; charset=utf-8", page.into_bytes())
        .with("Cache-Control", "no-store".into())
        // The page's own inline script and style only: nothing loaded from elsewhere.
        .with(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline' 'self'; img-src 'self' data:; frame-ancestors 'none'".into(),
        )
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

/// Read one request from the connection, answer it (tests: no peer, no stop flag).
#[cfg(test)]
pub(crate) fn serve_connection<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    info: &AgentInfo,
) {
    serve_stream(stream, backend, info, &Ctx::detached(), None)
}

fn serve_stream<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    info: &AgentInfo,
    ctx: &Ctx,
    peer: Option<SocketAddr>,
) {
    let response = match read_request(stream) {
        Ok(Some(mut req)) => {
            req.peer = peer;
            respond(&req, backend, info)
        }
        // The peer closed without a request: nothing to answer.
        Ok(None) => return,
        Err(r) => r,
    };
    if response.stream {
        stream_events(stream, backend, info, ctx, response);
        return;
    }
    let _ = stream.write_all(&response.to_bytes(&info.host));
    let _ = stream.flush();
}

/// Serve an event stream: every [`STREAM_PERIOD`] the cluster's [`Snapshot`], until the
/// peer leaves, the server stops or [`STREAM_LIFETIME`] passed.
fn stream_events<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    info: &AgentInfo,
    ctx: &Ctx,
    head: Response,
) {
    struct Open<'a>(&'a AtomicUsize);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    if ctx.streams.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
        drop(Open(&ctx.streams));
        let r = error(
            503,
            format!("more than {MAX_STREAMS} event streams: try again"),
        );
        let _ = stream.write_all(&r.to_bytes(&info.host));
        return;
    }
    let _open = Open(&ctx.streams);
    if stream.write_all(&head.to_bytes(&info.host)).is_err() {
        return;
    }
    // Reconnect after 2 s if the stream breaks.
    if stream.write_all(b"retry: 2000\n\n").is_err() {
        return;
    }
    let started = std::time::Instant::now();
    let mut first = true;
    while !ctx.stop.load(Ordering::SeqCst) && started.elapsed() < STREAM_LIFETIME {
        let snap = snapshot(backend, info).map(|mut s| {
            ctx.sample(s.at_ms, &s.vms);
            if std::mem::take(&mut first) {
                s.history = ctx.history();
            }
            s
        });
        let chunk = match snap {
            Ok(s) => match serde_json::to_string(&s) {
                Ok(j) => format!("data: {j}\n\n"),
                Err(e) => format!("event: failure\ndata: {}\n\n", json_line(&e.to_string())),
            },
            Err(e) => format!("event: failure\ndata: {}\n\n", json_line(&e.to_string())),
        };
        if stream
            .write_all(chunk.as_bytes())
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
        std::thread::sleep(STREAM_PERIOD);
    }
}

fn json_line(message: &str) -> String {
    serde_json::to_string(&ErrorBody {
        error: message.replace(['\r', '\n'], " "),
    })
    .unwrap_or_default()
}

fn snapshot(backend: &dyn Backend, info: &AgentInfo) -> Result<Snapshot, ClusterError> {
    Ok(Snapshot {
        at_ms: cluster::model::now_ms(),
        served_by: info.host.clone(),
        cluster: backend.status()?,
        hosts: backend.hosts()?,
        vms: backend.vms()?,
        timeline: backend.timeline(SNAPSHOT_EVENTS)?,
        history: Vec::new(),
    })
}

/// A parsed request.
#[derive(Debug, Default)]
pub(crate) struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    /// The headers this server reads (names lower-cased): authorization, cookie,
    /// content-type and the CSRF header.
    pub headers: Vec<(String, String)>,
    /// The client's address (who asked, in the timeline).
    pub peer: Option<SocketAddr>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The dashboard's cookie, if sent.
    fn cookie(&self) -> Option<&str> {
        self.header("cookie")?.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == COOKIE).then_some(v)
        })
    }
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
    let mut kept = Vec::new();
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
        } else if ["authorization", "cookie", "content-type", CSRF_HEADER]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            kept.push((name.to_ascii_lowercase(), value.to_string()));
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
        headers: kept,
        peer: None,
    }))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

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

/// How a request proved it may call: who asked, as the timeline says it.
enum Caller {
    Bearer,
    Cookie,
    Open,
}

fn who(caller: &Caller, req: &Request) -> String {
    let how = match caller {
        Caller::Bearer => "API token",
        Caller::Cookie => "dashboard",
        Caller::Open => "anonymous",
    };
    match req.peer {
        Some(p) => format!("{how} from {}", p.ip()),
        None => how.to_string(),
    }
}

/// The caller, if the request carries the token (or none is required).
fn authenticate(req: &Request, info: &AgentInfo) -> Option<Caller> {
    let Some(token) = &info.token else {
        return Some(Caller::Open);
    };
    if let Some(bearer) = req
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        && same(bearer.trim().as_bytes(), token.as_bytes())
    {
        return Some(Caller::Bearer);
    }
    if let Some(c) = req.cookie()
        && same(c.as_bytes(), token.as_bytes())
    {
        return Some(Caller::Cookie);
    }
    None
}

fn sign_in_page(status: u16, info: &AgentInfo, note: &str) -> Response {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let hint = if info.token_hint.is_empty() {
        "the token file given to the agents with --token-file".to_string()
    } else {
        info.token_hint.clone()
    };
    html(
        status,
        SIGN_IN
            .replace("{{HOST}}", &escape(&info.host))
            .replace("{{HINT}}", &escape(&hint))
            .replace("{{NOTE}}", &escape(note)),
    )
}

fn unauthorized(kind: Kind, info: &AgentInfo) -> Response {
    if kind == Kind::Dashboard {
        return sign_in_page(401, info, "");
    }
    let hint = if info.token_hint.is_empty() {
        String::new()
    } else {
        format!(" (the token is in {})", info.token_hint)
    };
    error(
        401,
        format!("missing or wrong token: send `Authorization: Bearer TOKEN`{hint}"),
    )
    .with("WWW-Authenticate", "Bearer realm=\"tandem\"".into())
}

fn set_cookie(value: &str, max_age: u64) -> String {
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

/// `application/x-www-form-urlencoded`'s field `name`, decoded (bounded by the body).
fn form_field(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let raw = text.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b'%' => return None,
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn sign_in(req: &Request, info: &AgentInfo) -> Response {
    let form = req
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    let given = if form {
        form_field(&req.body, "token")
    } else {
        serde_json::from_slice::<SignInBody>(&req.body)
            .ok()
            .map(|b| b.token)
    };
    let Some(given) = given else {
        return error(
            400,
            "send {\"token\": \"...\"} or a form with token=...".into(),
        );
    };
    let given = given.trim();
    let ok = match &info.token {
        Some(t) => same(given.as_bytes(), t.as_bytes()),
        None => true,
    };
    if !ok {
        return if form {
            sign_in_page(401, info, "That token is not this cluster's.")
        } else {
            error(401, "wrong token".into())
        };
    }
    let value = info.token.clone().unwrap_or_default();
    let cookie = set_cookie(&value, 7 * 24 * 3600);
    if form {
        Response::new(303, "text/plain", b"signed in".to_vec())
            .with("Location", "/".into())
            .with("Set-Cookie", cookie)
    } else {
        Response::new(204, "application/json", Vec::new()).with("Set-Cookie", cookie)
    }
}

/// A verb's line in the timeline.
fn verb_line(kind: Kind, req: &Request) -> Option<String> {
    Some(match kind {
        Kind::CreateVm => "vm create".into(),
        Kind::DestroyVm => "vm destroy".into(),
        Kind::PowerOn => match parse_optional::<PowerOnBody>(&req.body).ok()?.host {
            Some(h) => format!("vm power-on --host {h}"),
            None => "vm power-on".into(),
        },
        Kind::PowerOff => "vm power-off".into(),
        Kind::Ft(ft) => {
            let op = match ft {
                FtKind::TurnOn => "turn-on",
                FtKind::TurnOff => "turn-off",
                FtKind::Disable => "disable",
                FtKind::Enable => "enable",
                FtKind::TestFailover => "test-failover",
                FtKind::RestartSecondary => "restart-secondary",
                FtKind::MigrateSecondary => {
                    let to = parse::<MigrateBody>(&req.body).ok()?.to;
                    return Some(format!("ft migrate-secondary --to {to}"));
                }
            };
            format!("ft {op}")
        }
        Kind::FtSchedule => "ft schedule".into(),
        Kind::SetMonitoring => "vm monitor".into(),
        Kind::CheckLogging => "host check-logging".into(),
        Kind::Maintenance(true) => "host maintenance enter".into(),
        Kind::Maintenance(false) => "host maintenance exit".into(),
        _ => return None,
    })
}

fn dispatch(req: &Request, backend: &dyn Backend, info: &AgentInfo) -> Result<Response, Response> {
    let (route, name) = routes::route(&req.method, &req.target).map_err(|miss| match miss {
        Miss::NotFound(m) => error(404, m),
        Miss::BadName(m) => error(400, m),
        Miss::Method { allow, message } => Response {
            allow: Some(allow),
            ..error(405, message)
        },
    })?;
    let kind = route.kind;
    let caller = if route.auth {
        let Some(c) = authenticate(req, info) else {
            return Err(unauthorized(kind, info));
        };
        if matches!(c, Caller::Cookie)
            && req.method != "GET"
            && req.header(CSRF_HEADER) != Some("1")
        {
            return Err(error(
                403,
                format!("a change signed in by cookie must send the {CSRF_HEADER}: 1 header"),
            ));
        }
        c
    } else {
        Caller::Open
    };
    let name = name.unwrap_or_default();
    let response = answer(kind, &name, req, backend, info)?;
    if (200..300).contains(&response.status)
        && let Some(line) = verb_line(kind, req)
    {
        let vm = if kind == Kind::CreateVm {
            serde_json::from_slice::<CreateVm>(&req.body)
                .ok()
                .map(|c| c.name)
        } else {
            Some(name.clone())
        };
        backend.note(TimelineEvent {
            at_ms: cluster::model::now_ms(),
            kind: EventKind::Verb,
            vm,
            host: Some(info.host.clone()),
            detail: line,
            who: Some(who(&caller, req)),
        });
    }
    Ok(response)
}

fn answer(
    kind: Kind,
    name: &str,
    req: &Request,
    backend: &dyn Backend,
    info: &AgentInfo,
) -> Result<Response, Response> {
    let verb = |r: Result<VmView, ClusterError>, status: u16| match r {
        Ok(v) => json(status, &v),
        Err(e) => error(status_of(&e), e.to_string()),
    };
    Ok(match kind {
        Kind::Dashboard => html(200, DASHBOARD.replace("{{HOST}}", &info.host)),
        Kind::SignIn => sign_in(req, info),
        Kind::SignOut => {
            Response::new(204, "application/json", Vec::new()).with("Set-Cookie", set_cookie("", 0))
        }
        Kind::Events => {
            let mut r = Response::new(200, "text/event-stream", Vec::new());
            r.stream = true;
            r
        }
        Kind::Timeline => match backend.timeline(TIMELINE_EVENTS) {
            Ok(v) => json(200, &v),
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::Metrics => {
            let state = backend.hosts().and_then(|h| Ok((h, backend.vms()?)));
            let text = match &state {
                Ok((h, v)) => crate::metrics::render(&info.host, Some((h, v))),
                Err(e) => {
                    tracing::warn!("metrics: cannot read the cluster: {e}");
                    crate::metrics::render(&info.host, None)
                }
            };
            Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                text.into_bytes(),
            )
        }
        Kind::Healthz => json(
            200,
            &Health {
                host: info.host.clone(),
                ok: true,
            },
        ),
        Kind::OpenApi => Response::new(
            200,
            "application/json",
            crate::openapi::document().as_bytes().to_vec(),
        ),
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
        Kind::GetVm => verb(backend.vm(name), 200),
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
        Kind::DestroyVm => match backend.destroy(name) {
            Ok(()) => Response::new(204, "application/json", Vec::new()),
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::PowerOn => {
            let b: PowerOnBody = parse_optional(&req.body)?;
            if let Some(h) = &b.host {
                check_host("\"host\"", h)?;
            }
            verb(backend.power_on(name, b.host), 200)
        }
        Kind::PowerOff => {
            parse_optional::<NoBody>(&req.body)?;
            verb(backend.power_off(name), 200)
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
            verb(backend.ft(name, op), 200)
        }
        Kind::FtSchedule => {
            let b: ScheduleRequest = parse(&req.body)?;
            verb(backend.ft_schedule(name, b), 200)
        }
        Kind::SetMonitoring => {
            let m: Monitoring = parse(&req.body)?;
            verb(backend.set_monitoring(name, m), 200)
        }
        Kind::FtSizing => match backend.ft_sizing(name) {
            Ok(v) => json(200, &v),
            Err(e) => error(status_of(&e), e.to_string()),
        },
        Kind::CheckLogging => {
            let b: CheckRequest = parse(&req.body)?;
            check_host("\"to\"", &b.to)?;
            match backend.check_logging(&info.host, name, b) {
                Ok(v) => json(200, &v),
                Err(e) => error(status_of(&e), e.to_string()),
            }
        }
        Kind::Maintenance(enter) => {
            parse_optional::<NoBody>(&req.body)?;
            match backend.maintenance(name, enter) {
                Ok(v) => json(200, &v),
                Err(e) => error(status_of(&e), e.to_string()),
            }
        }
    })
}
