//! The API's client: typed calls mirroring the routes, over a list of agents' APIs tried in
//! order until one answers (any agent serves the whole cluster).
//!
//! A lab's APIs live in its network namespaces: with `netns` set, each exchange runs on a
//! fresh thread that first joins that namespace (`setns`), so the caller's own threads never
//! change namespace. [`Client::from_lab`] reads what `tandem lab up` wrote.
//!
//! A non-2xx answer is [`ClientError::Api`] carrying the server's `error` line.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cluster::logcheck::{CheckRequest, LogCheck};
use cluster::model::{ClusterView, HostView, VmView, valid_name};
use cluster::ops::{Monitoring, Sizing};
use cluster::verbs::{CreateVm, FtOp, ScheduleRequest};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use cluster::http::{Response, request_with};

/// How long one exchange with one API may take (a verb only records what it asks, so
/// an answer is quick; an API on a dead host costs this much, once: see `preferred`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest error line kept from an answer that is not `{"error": ...}`.
const MAX_ERROR_LINE: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `/tmp/NAME-lab.json` is absent.
    #[error("no lab {0}: run `tandem lab up` or pass --api URL")]
    NoLab(String),
    /// The lab's file cannot be read or is not what `lab up` writes.
    #[error("lab {name}: {why}")]
    Lab { name: String, why: String },
    /// No API answered (each one's failure, in order).
    #[error("cluster unreachable: {0}")]
    Unreachable(String),
    /// The network namespace could not be joined.
    #[error("network namespace {ns}: {why}")]
    Netns { ns: String, why: String },
    /// The token file cannot be read or holds no token.
    #[error("token file {path}: {why}")]
    Token { path: String, why: String },
    /// The request is refused before sending (a bad name).
    #[error("{0}")]
    Invalid(String),
    /// The API answered with an error.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    /// The API answered 2xx with something that is not the expected JSON.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

/// What `tandem lab up` writes to `/tmp/NAME-lab.json` (the fields the client needs).
#[derive(Deserialize)]
struct LabFile {
    #[serde(default)]
    netns: Option<String>,
    apis: Vec<String>,
    /// The file holding the cluster's API token (mode 0600).
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// Where this machine reaches the lab's dashboard (`tandem lab up` starts a relay).
    #[serde(default)]
    dashboard: Option<String>,
}

/// The longest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// The token in `path` (its first line, trimmed), checked to be one a server accepts.
pub fn read_token(path: &std::path::Path) -> Result<String, ClientError> {
    use std::io::Read;
    let bad = |why: String| ClientError::Token {
        path: path.display().to_string(),
        why,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_FILE).read_to_string(&mut text))
        .map_err(|e| bad(e.to_string()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if !crate::server::valid_token(&token) {
        return Err(bad(
            "not a token (16-256 letters, digits, '-', '_', '.', '~' on the first line)".into(),
        ));
    }
    Ok(token)
}

/// A client of a cluster's REST API.
#[derive(Clone, Debug)]
pub struct Client {
    apis: Vec<String>,
    netns: Option<String>,
    timeout: Duration,
    /// Sent as `Authorization: Bearer` on every call.
    token: Option<String>,
    /// Where the token came from (said by `cluster status`).
    token_file: Option<PathBuf>,
    /// Where this machine reaches the dashboard, when it is not the APIs' own address (a
    /// lab's agents are on its management network; its relay is here).
    dashboard: Option<String>,
    /// The API that answered last: tried first next time, so that a dead host's API (its
    /// connection attempts time out) slows one call, not every poll of a long verb.
    preferred: Arc<AtomicUsize>,
}

impl Client {
    /// Call these APIs (`http://IP:PORT`), in order, from network namespace `netns` if set.
    pub fn new(apis: Vec<String>, netns: Option<String>) -> Self {
        Client {
            apis: apis
                .into_iter()
                .map(|a| a.trim_end_matches('/').to_string())
                .collect(),
            netns,
            timeout: DEFAULT_TIMEOUT,
            token: None,
            token_file: None,
            dashboard: None,
            preferred: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The lab `name`'s cluster, as `tandem lab up` described it.
    pub fn from_lab(name: &str) -> Result<Self, ClientError> {
        Self::from_lab_file(name, &lab_file(name)?)
    }

    fn from_lab_file(name: &str, path: &std::path::Path) -> Result<Self, ClientError> {
        let lab_err = |why: String| ClientError::Lab {
            name: name.into(),
            why,
        };
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::NoLab(name.into()));
            }
            Err(e) => return Err(lab_err(format!("{}: {e}", path.display()))),
        };
        if text.len() > 1 << 20 {
            return Err(lab_err(format!("{} is over 1 MiB", path.display())));
        }
        let lab: LabFile = serde_json::from_slice(&text)
            .map_err(|e| lab_err(format!("{}: {e}", path.display())))?;
        if lab.apis.is_empty() {
            return Err(lab_err(format!("{} lists no API", path.display())));
        }
        let client = Client {
            dashboard: lab.dashboard,
            ..Client::new(lab.apis, lab.netns)
        };
        match lab.token_file {
            Some(f) => client.with_token_file(&f),
            None => Ok(client),
        }
    }

    /// Send the token in `path` with every call.
    pub fn with_token_file(mut self, path: &std::path::Path) -> Result<Self, ClientError> {
        self.token = Some(read_token(path)?);
        self.token_file = Some(path.to_path_buf());
        Ok(self)
    }

    /// Send this token with every call.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The token file the client read, if any.
    pub fn token_file(&self) -> Option<&std::path::Path> {
        self.token_file.as_deref()
    }

    /// The dashboard's URL from this machine: the lab's relay if it has one, else the API
    /// that answered last.
    pub fn dashboard(&self) -> String {
        match &self.dashboard {
            Some(d) => d.trim_end_matches('/').to_string() + "/",
            None => {
                let i = self.preferred.load(Ordering::Relaxed);
                let api = self.apis.get(i).or(self.apis.first());
                api.cloned().unwrap_or_default() + "/"
            }
        }
    }

    /// The network namespace the APIs are reached from, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Each exchange may take this long (per API tried).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn apis(&self) -> &[String] {
        &self.apis
    }

    pub fn status(&self) -> Result<ClusterView, ClientError> {
        self.get("/api/v1/cluster")
    }
    pub fn hosts(&self) -> Result<Vec<HostView>, ClientError> {
        self.get("/api/v1/hosts")
    }
    pub fn vms(&self) -> Result<Vec<VmView>, ClientError> {
        self.get("/api/v1/vms")
    }
    pub fn vm(&self, name: &str) -> Result<VmView, ClientError> {
        self.get(&format!("/api/v1/vms/{}", checked(name)?))
    }
    pub fn create(&self, req: &CreateVm) -> Result<VmView, ClientError> {
        checked(&req.name)?;
        self.post("/api/v1/vms", Some(to_json(req)?))
    }
    pub fn power_on(&self, name: &str, host: Option<&str>) -> Result<VmView, ClientError> {
        let body = serde_json::json!({ "host": host });
        self.post(
            &format!("/api/v1/vms/{}/power-on", checked(name)?),
            Some(to_json(&body)?),
        )
    }
    pub fn power_off(&self, name: &str) -> Result<VmView, ClientError> {
        self.post(&format!("/api/v1/vms/{}/power-off", checked(name)?), None)
    }
    pub fn destroy(&self, name: &str) -> Result<(), ClientError> {
        let r = self.call("DELETE", &format!("/api/v1/vms/{}", checked(name)?), None)?;
        ok_or_error(r).map(drop)
    }
    pub fn ft(&self, name: &str, op: &FtOp) -> Result<VmView, ClientError> {
        let name = checked(name)?;
        let (verb, body) = match op {
            FtOp::TurnOn => ("turn-on", None),
            FtOp::TurnOff => ("turn-off", None),
            FtOp::Disable => ("disable", None),
            FtOp::Enable => ("enable", None),
            FtOp::TestFailover => ("test-failover", None),
            FtOp::RestartSecondary => ("restart-secondary", None),
            FtOp::MigrateSecondary { to } => (
                "migrate-secondary",
                Some(to_json(&serde_json::json!({ "to": to }))?),
            ),
        };
        self.post(&format!("/api/v1/vms/{name}/ft/{verb}"), body)
    }

    /// Put a host into maintenance mode (`enter`) or take it out.
    pub fn maintenance(&self, host: &str, enter: bool) -> Result<HostView, ClientError> {
        let verb = if enter { "enter" } else { "exit" };
        self.post(
            &format!("/api/v1/hosts/{}/maintenance/{verb}", checked(host)?),
            None,
        )
    }

    /// `ft schedule`: set (or clear) the VM's FT schedule.
    pub fn ft_schedule(&self, name: &str, req: &ScheduleRequest) -> Result<VmView, ClientError> {
        let name = checked(name)?;
        self.post(
            &format!("/api/v1/vms/{name}/ft/schedule"),
            Some(to_json(req)?),
        )
    }

    /// `vm monitor`: VM monitoring's settings of the VM.
    pub fn set_monitoring(&self, name: &str, m: &Monitoring) -> Result<VmView, ClientError> {
        let name = checked(name)?;
        self.post(&format!("/api/v1/vms/{name}/monitoring"), Some(to_json(m)?))
    }

    /// `ft sizing`: the seed's formula for the VM.
    pub fn ft_sizing(&self, name: &str) -> Result<Sizing, ClientError> {
        self.get(&format!("/api/v1/vms/{}/ft/sizing", checked(name)?))
    }

    /// `host check-logging FROM TO`: call this on a client of FROM's own API
    /// ([`Client::only`]).
    pub fn check_logging(&self, from: &str, req: &CheckRequest) -> Result<LogCheck, ClientError> {
        let from = checked(from)?;
        self.post(
            &format!("/api/v1/hosts/{from}/check-logging"),
            Some(to_json(req)?),
        )
    }

    /// A client of one API of the same cluster (same namespace, same timeout).
    pub fn only(&self, api: &str) -> Client {
        Client {
            token: self.token.clone(),
            ..Client::new(vec![api.to_string()], self.netns.clone()).with_timeout(self.timeout)
        }
    }

    /// `GET path`'s JSON text exactly as the API returned it (for `--json` output),
    /// checked to be JSON.
    /// The event timeline, oldest first.
    pub fn timeline(&self) -> Result<Vec<cluster::timeline::TimelineEvent>, ClientError> {
        self.get("/api/v1/timeline")
    }

    pub fn get_raw(&self, path: &str) -> Result<String, ClientError> {
        let r = ok_or_error(self.call("GET", path, None)?)?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&r.body)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        String::from_utf8(r.body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode(self.call("GET", path, None)?)
    }

    fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        decode(self.call("POST", path, body)?)
    }

    /// One exchange: the APIs in order until one answers. An API that was not reached
    /// passes to the next; so does one that answers 503 (its store unreachable: its
    /// answer stands if none does better). A request that reached an API and got no answer
    /// is passed on only if it is a GET: a verb may have been carried out, and is not
    /// sent twice.
    fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        // The preferred API first, then the others in order.
        let first = self.preferred.load(Ordering::Relaxed);
        let urls: Vec<(usize, String)> = (0..self.apis.len())
            .map(|i| (i + first) % self.apis.len())
            .map(|i| (i, format!("{}{path}", self.apis[i])))
            .collect();
        let timeout = self.timeout;
        let preferred = self.preferred.clone();
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let exchange = move || -> Result<Response, ClientError> {
            let mut failures = Vec::new();
            let mut unavailable = None;
            for (i, url) in &urls {
                let headers: Vec<(&str, &str)> = auth
                    .as_deref()
                    .map(|a| ("Authorization", a))
                    .into_iter()
                    .collect();
                match request_with(method, url, &headers, body.as_deref(), timeout) {
                    Ok(r) if r.status == 503 => unavailable = Some(r),
                    Ok(r) => {
                        preferred.store(*i, Ordering::Relaxed);
                        return Ok(r);
                    }
                    Err(e) if e.is_connect() || method == "GET" => failures.push(e.to_string()),
                    Err(e) => {
                        failures.push(e.to_string());
                        return Err(ClientError::Unreachable(format!(
                            "{}; the request was sent, it may have been carried out",
                            failures.join("; ")
                        )));
                    }
                }
            }
            match unavailable {
                Some(r) => Ok(r),
                None if failures.is_empty() => Err(ClientError::Unreachable("no API given".into())),
                None => Err(ClientError::Unreachable(failures.join("; "))),
            }
        };
        match &self.netns {
            None => exchange(),
            Some(ns) => in_netns(ns, exchange)?,
        }
    }
}

fn lab_file(name: &str) -> Result<PathBuf, ClientError> {
    if !valid_name(name) {
        return Err(ClientError::Invalid(format!(
            "bad lab name {name:?}: use lowercase letters, digits and '-'"
        )));
    }
    Ok(PathBuf::from(format!("/tmp/{name}-lab.json")))
}

/// A name put in a path: checked, so that it cannot change the path.
fn checked(name: &str) -> Result<&str, ClientError> {
    if valid_name(name) {
        Ok(name)
    } else {
        Err(ClientError::Invalid(format!(
            "bad VM name {name:?}: use 1-63 lowercase letters, digits and '-', not starting \
             with '-'"
        )))
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(v).map_err(|e| ClientError::Invalid(format!("cannot encode: {e}")))
}

/// The answer if 2xx, else its error line.
fn ok_or_error(r: Response) -> Result<Response, ClientError> {
    if (200..300).contains(&r.status) {
        return Ok(r);
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let message = match serde_json::from_slice::<ErrorBody>(&r.body) {
        Ok(b) => b.error,
        // Not a Tandem API's error: quote the start of what came back.
        Err(_) => {
            let text = String::from_utf8_lossy(&r.body);
            let line: String = text
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(MAX_ERROR_LINE)
                .collect();
            if line.trim().is_empty() {
                "an answer without an error message (is this a Tandem agent's API?)".into()
            } else {
                format!("{line} (not a Tandem API's error)")
            }
        }
    };
    Err(ClientError::Api {
        status: r.status,
        message,
    })
}

fn decode<T: DeserializeOwned>(r: Response) -> Result<T, ClientError> {
    let r = ok_or_error(r)?;
    serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))
}

/// Run `f` on a fresh thread inside network namespace `ns` (`/run/netns/NS`); only that
/// thread changes namespace, and it ends with `f`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ClientError> {
    let err = |why: String| ClientError::Netns { ns: ns.into(), why };
    if ns.is_empty() || ns.len() > 255 || ns.contains('/') || ns == "." || ns == ".." {
        return Err(err("not a namespace name".into()));
    }
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("api-netns".into())
        .spawn(move || {
            let joined = std::fs::File::open(&path).and_then(|file| {
                use std::os::fd::AsRawFd;
                // SAFETY: `file` is an open descriptor of a network namespace file (or
                // setns fails with EINVAL); setns only changes this thread's network
                // namespace, and this thread runs `f` and ends, so no other code runs in the
                // namespace by mistake.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
            let _ = tx.send(joined.map(|()| f()));
        })
        .map_err(|e| err(format!("cannot start a thread: {e}")))?;
    match rx.recv() {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(err(e.to_string())),
        Err(_) => Err(err("the exchange's thread failed".into())),
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn from_lab_file(name: &str, path: &std::path::Path) -> Result<Client, ClientError> {
        Client::from_lab_file(name, path)
    }
}
