//! The cluster store: a client of etcd v3 through its JSON gateway (`/v3/kv/*`,
//! `/v3/lease/*`), over [`crate::http`].
//!
//! It owns the list of etcd endpoints and which one answered last; nothing is cached.
//! Invariants:
//! - every call goes to the endpoint that answered last, then to the others in order, each
//!   within [`TIMEOUT`]: a call never waits longer than `TIMEOUT` × endpoints;
//! - a call is retried on another endpoint only when the first did not answer (or answered
//!   503, a member without a leader). A timeout after the request was sent is ambiguous: a
//!   retried `put`/`delete` is harmless, a retried [`Store::create`], [`Store::put_if`] or
//!   [`Store::delete_if`]
//!   may then report `false` for a write that the first attempt made; callers of those
//!   re-read the key before concluding they lost;
//! - whatever etcd (or anything at its address) answers is parsed without panicking; an
//!   answer that is not what etcd sends is [`StoreError::Decode`];
//! - keys are UTF-8 (they are built from [`crate::model`]); a stored key that is not is
//!   skipped with a warning rather than failing a whole listing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::http;

/// How long one endpoint gets to answer one request.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// At most this many endpoints in one store address.
const MAX_ENDPOINTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No endpoint answered (each one's failure, `; `-separated).
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    /// etcd answered and refused the request.
    #[error("etcd refused the request (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// The lease named is gone (it expired or was revoked).
    #[error("the lease expired")]
    LeaseExpired,
    /// An answer, or a stored value, is not what was expected.
    #[error("undecodable: {0}")]
    Decode(String),
    /// The store address is not a list of `http://host:port` URLs.
    #[error("bad store address: {0}")]
    BadEndpoint(String),
}

/// One key as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (0: absent).
    pub create_revision: i64,
    /// The revision of the last write (what [`Store::put_if`] compares).
    pub mod_revision: i64,
    /// The lease the key lives under (0: none).
    pub lease: i64,
}

/// A handle on one etcd cluster; clones share the endpoint list and its memory of which
/// endpoint answered.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `http://host:port`, no trailing slash.
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last.
    preferred: AtomicUsize,
    timeout: Duration,
}

impl Store {
    /// A store at `endpoints`, `http://a:2379,http://b:2379`. The URLs are checked; nothing
    /// is contacted.
    pub fn connect(endpoints: &str) -> Result<Store, StoreError> {
        let mut list = Vec::new();
        for ep in endpoints.split(',').map(str::trim) {
            if ep.is_empty() {
                continue;
            }
            let u = http::parse_url(ep).map_err(|e| StoreError::BadEndpoint(e.to_string()))?;
            if u.path != "/" {
                return Err(StoreError::BadEndpoint(format!(
                    "{ep}: an endpoint is http://host:port, without a path"
                )));
            }
            let ep = format!("http://{}", u.authority());
            if !list.contains(&ep) {
                list.push(ep);
            }
        }
        if list.is_empty() {
            return Err(StoreError::BadEndpoint(
                "no endpoint: expected http://host:port[,http://host:port...]".into(),
            ));
        }
        if list.len() > MAX_ENDPOINTS {
            return Err(StoreError::BadEndpoint(format!(
                "{} endpoints: at most {MAX_ENDPOINTS}",
                list.len()
            )));
        }
        Ok(Store {
            inner: Arc::new(Inner {
                endpoints: list,
                preferred: AtomicUsize::new(0),
                timeout: TIMEOUT,
            }),
        })
    }

    /// The same endpoints with another per-endpoint timeout (default [`TIMEOUT`]).
    pub fn with_timeout(&self, timeout: Duration) -> Store {
        Store {
            inner: Arc::new(Inner {
                endpoints: self.inner.endpoints.clone(),
                preferred: AtomicUsize::new(self.inner.preferred.load(Ordering::Relaxed)),
                timeout,
            }),
        }
    }

    /// The endpoints, as normalised by [`Store::connect`].
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// A cheap linearizable read: Ok when the cluster has a leader and answers.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.call(
            "/v3/kv/range",
            &json!({ "key": B64.encode(crate::model::PREFIX), "limit": "1", "keys_only": true }),
        )
        .map(drop)
    }

    pub fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        let v = self.call("/v3/kv/range", &json!({ "key": B64.encode(key) }))?;
        let mut kvs = kvs(&v)?;
        // etcd answers one key at most for a single-key range; anything else is not etcd.
        if kvs.len() > 1 {
            return Err(StoreError::Decode(format!(
                "{} keys for the single key {key}",
                kvs.len()
            )));
        }
        Ok(kvs.pop())
    }

    /// Every key starting with `prefix`, sorted by key.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        let v = self.call("/v3/kv/range", &range(prefix))?;
        let mut kvs = kvs(&v)?;
        kvs.retain(|kv| kv.key.starts_with(prefix));
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(kvs)
    }

    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), StoreError> {
        self.call("/v3/kv/put", &put_request(key, value, lease))
            .map(drop)
    }

    /// Write `key` only if it does not exist; whether it was written.
    pub fn create(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<bool, StoreError> {
        self.txn(
            key,
            "CREATE",
            "create_revision",
            0,
            json!({ "request_put": put_request(key, value, lease) }),
        )
    }

    /// Write `key` only if its last write was at `mod_revision` (0: only if absent);
    /// whether it was written.
    pub fn put_if(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
        lease: Option<i64>,
    ) -> Result<bool, StoreError> {
        self.txn(
            key,
            "MOD",
            "mod_revision",
            mod_revision,
            json!({ "request_put": put_request(key, value, lease) }),
        )
    }

    /// Delete `key` only if its last write was at `mod_revision`; whether it was deleted.
    pub fn delete_if(&self, key: &str, mod_revision: i64) -> Result<bool, StoreError> {
        self.txn(
            key,
            "MOD",
            "mod_revision",
            mod_revision,
            json!({ "request_delete_range": { "key": B64.encode(key) } }),
        )
    }

    /// `op` (one etcd request) if `key`'s `field` equals `revision`; whether it was done.
    fn txn(
        &self,
        key: &str,
        target: &str,
        field: &str,
        revision: i64,
        op: Value,
    ) -> Result<bool, StoreError> {
        let mut compare = json!({ "target": target, "key": B64.encode(key), "result": "EQUAL" });
        compare[field] = json!(revision.to_string());
        let v = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [compare],
                "success": [op],
            }),
        )?;
        // proto3 JSON leaves `false` out.
        match v.get("succeeded") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(StoreError::Decode(format!("txn succeeded={other}"))),
        }
    }

    /// Whether the key existed.
    pub fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let v = self.call("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))?;
        Ok(int(&v, "deleted")? > 0)
    }

    /// How many keys starting with `prefix` were deleted.
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let v = self.call("/v3/kv/deleterange", &range(prefix))?;
        Ok(int(&v, "deleted")?.max(0) as u64)
    }

    /// A new lease of `ttl_secs` (etcd may raise a TTL below its minimum); its id.
    pub fn grant(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        let v = self.call("/v3/lease/grant", &json!({ "TTL": ttl_secs.to_string() }))?;
        match int(&v, "ID")? {
            0 => Err(StoreError::Decode(format!(
                "a lease grant without an id: {}",
                bounded(&v.to_string())
            ))),
            id => Ok(id),
        }
    }

    /// Renew `lease`; its remaining TTL in seconds. [`StoreError::LeaseExpired`] if it is
    /// gone.
    pub fn keepalive(&self, lease: i64) -> Result<i64, StoreError> {
        let v = self.call("/v3/lease/keepalive", &json!({ "ID": lease.to_string() }))?;
        // The gateway streams: one `{"result": ...}` (or `{"error": ...}`) per message.
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(refusal(200, e));
        }
        let result = v
            .get("result")
            .ok_or_else(|| StoreError::Decode(format!("keepalive: {}", bounded(&v.to_string()))))?;
        // An unknown lease is answered with no TTL (proto3 leaves 0 out).
        match int(result, "TTL")? {
            ttl if ttl > 0 => Ok(ttl),
            _ => Err(StoreError::LeaseExpired),
        }
    }

    /// End `lease` and delete its keys. A lease already gone is not an error.
    pub fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })) {
            Ok(_) | Err(StoreError::LeaseExpired) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The JSON value at `key` and its mod revision (for [`Store::put_if`]).
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>, StoreError> {
        let Some(kv) = self.get(key)? else {
            return Ok(None);
        };
        let t = serde_json::from_slice(&kv.value)
            .map_err(|e| StoreError::Decode(format!("the value of {key}: {e}")))?;
        Ok(Some((t, kv.mod_revision)))
    }

    pub fn put_json<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| StoreError::Decode(format!("encoding the value of {key}: {e}")))?;
        self.put(key, &bytes, lease)
    }

    /// Every key starting with `prefix` (full keys, sorted) with its JSON value decoded;
    /// values that do not decode as `T` are skipped with a warning.
    pub fn prefix_json<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.get_prefix(prefix)? {
            match serde_json::from_slice(&kv.value) {
                Ok(t) => out.push((kv.key, t)),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping an undecodable value")
                }
            }
        }
        Ok(out)
    }

    /// POST `body` to `path` on the endpoints in turn (see the module's invariants).
    fn call(&self, path: &str, body: &Value) -> Result<Value, StoreError> {
        let body = body.to_string().into_bytes();
        let eps = &self.inner.endpoints;
        let first = self.inner.preferred.load(Ordering::Relaxed) % eps.len();
        let mut failures = Vec::new();
        for i in 0..eps.len() {
            let idx = (first + i) % eps.len();
            let url = format!("{}{path}", eps[idx]);
            match http::request("POST", &url, Some(&body), self.inner.timeout) {
                Ok(r) if r.status == 503 => {
                    failures.push(format!("{url}: HTTP 503 {}", bounded(&r.text())));
                }
                Ok(r) => {
                    self.inner.preferred.store(idx, Ordering::Relaxed);
                    if r.status != 200 {
                        let v: Value = serde_json::from_slice(&r.body)
                            .unwrap_or_else(|_| Value::String(r.text()));
                        return Err(refusal(r.status, &v));
                    }
                    return serde_json::from_slice(&r.body).map_err(|e| {
                        StoreError::Decode(format!("{url}: {e}: {}", bounded(&r.text())))
                    });
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(StoreError::Unreachable(failures.join("; ")))
    }
}

/// etcd's refusal `{"error": ..., "message": ..., "code": N}` (or anything else).
fn refusal(status: u16, v: &Value) -> StoreError {
    let message = match v {
        Value::Object(o) => o
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string()),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if message.contains("requested lease not found") || message.contains("lease expired") {
        return StoreError::LeaseExpired;
    }
    StoreError::Rejected {
        status,
        message: bounded(&message),
    }
}

/// At most 300 characters of `s`, for messages.
fn bounded(s: &str) -> String {
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn put_request(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut r = json!({ "key": B64.encode(key), "value": B64.encode(value) });
    if let Some(l) = lease.filter(|&l| l != 0) {
        r["lease"] = json!(l.to_string());
    }
    r
}

/// The range of every key starting with `prefix`.
fn range(prefix: &str) -> Value {
    if prefix.is_empty() {
        // etcd's "every key": from "\0" with range_end "\0".
        return json!({ "key": B64.encode([0u8]), "range_end": B64.encode([0u8]) });
    }
    json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix.as_bytes())) })
}

/// The smallest key greater than every key starting with `prefix`: the prefix with its
/// last byte below 0xff incremented (and what follows dropped); `\0` ("to the end") when
/// every byte is 0xff.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An int64 field, which the gateway writes as a string (a number is accepted too); absent
/// means 0 (proto3 leaves zeros out).
fn int(v: &Value, field: &str) -> Result<i64, StoreError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| StoreError::Decode(format!("{field}={}", bounded(s)))),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| StoreError::Decode(format!("{field}={n}"))),
        Some(other) => Err(StoreError::Decode(format!(
            "{field}={}",
            bounded(&other.to_string())
        ))),
    }
}

fn bytes(v: &Value, field: &str) -> Result<Vec<u8>, StoreError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => B64
            .decode(s)
            .map_err(|e| StoreError::Decode(format!("{field}: {e}"))),
        Some(other) => Err(StoreError::Decode(format!(
            "{field}={}",
            bounded(&other.to_string())
        ))),
    }
}

/// The `kvs` of a range answer.
fn kvs(v: &Value) -> Result<Vec<Kv>, StoreError> {
    let list = match v.get("kvs") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(StoreError::Decode(format!(
                "kvs={}",
                bounded(&other.to_string())
            )));
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let raw = bytes(item, "key")?;
        let Ok(key) = String::from_utf8(raw) else {
            tracing::warn!("skipping a stored key that is not UTF-8");
            continue;
        };
        out.push(Kv {
            key,
            value: bytes(item, "value")?,
            create_revision: int(item, "create_revision")?,
            mod_revision: int(item, "mod_revision")?,
            lease: int(item, "lease")?,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    /// A real etcd on 127.0.0.1 (free ports, a temporary data folder), killed on drop.
    pub(crate) struct Etcd {
        child: Child,
        pub url: String,
        dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
        l.local_addr().unwrap().port()
    }

    impl Etcd {
        pub(crate) fn start() -> Etcd {
            let bin = std::path::Path::new("/usr/bin/etcd");
            assert!(
                bin.is_file(),
                "{} is missing: run scripts/setup (it installs etcd-server); the store's tests need a real etcd",
                bin.display()
            );
            let dir = tempfile::tempdir().expect("a temporary folder");
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
            let purl = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
            let child = Command::new(bin)
                .arg("--name=test")
                .arg(format!("--data-dir={}", dir.path().join("data").display()))
                .arg(format!("--listen-client-urls={url}"))
                .arg(format!("--advertise-client-urls={url}"))
                .arg(format!("--listen-peer-urls={purl}"))
                .arg(format!("--initial-advertise-peer-urls={purl}"))
                .arg(format!("--initial-cluster=test={purl}"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting etcd");
            let mut etcd = Etcd { child, url, dir };
            let store = Store::connect(&etcd.url).unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            while let Err(e) = store.ping() {
                if let Ok(Some(status)) = etcd.child.try_wait() {
                    panic!("etcd exited ({status}): {}", etcd.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd did not answer within 15 s ({e}): {}",
                    etcd.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            etcd
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
        }

        pub(crate) fn store(&self) -> Store {
            Store::connect(&self.url).unwrap()
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn keys_values_and_prefixes() {
        let etcd = Etcd::start();
        let s = etcd.store();
        assert_eq!(s.get("/t/a").unwrap(), None);
        s.put("/t/a", b"1", None).unwrap();
        let a = s.get("/t/a").unwrap().unwrap();
        assert_eq!(
            (a.key.as_str(), a.value.as_slice(), a.lease),
            ("/t/a", &b"1"[..], 0)
        );
        assert!(a.create_revision > 0 && a.mod_revision == a.create_revision);
        // An empty value (which proto3 leaves out) reads back empty.
        s.put("/t/empty", b"", None).unwrap();
        assert_eq!(s.get("/t/empty").unwrap().unwrap().value, b"");
        // Binary values survive.
        let bin: Vec<u8> = (0..=255).collect();
        s.put("/t/bin", &bin, None).unwrap();
        assert_eq!(s.get("/t/bin").unwrap().unwrap().value, bin);

        for k in ["/p/c", "/p/a", "/p/b/x", "/p0", "/o", "/p"] {
            s.put(k, k.as_bytes(), None).unwrap();
        }
        let keys: Vec<String> = s
            .get_prefix("/p/")
            .unwrap()
            .into_iter()
            .map(|k| k.key)
            .collect();
        assert_eq!(keys, ["/p/a", "/p/b/x", "/p/c"]);
        let all = s.get_prefix("").unwrap();
        assert!(all.len() >= 9 && all.windows(2).all(|w| w[0].key < w[1].key));
        assert!(s.get_prefix("/nothing/").unwrap().is_empty());

        assert!(s.delete("/p/a").unwrap());
        assert!(!s.delete("/p/a").unwrap());
        assert_eq!(s.delete_prefix("/p/").unwrap(), 2);
        assert_eq!(s.delete_prefix("/p/").unwrap(), 0);
        assert!(
            s.get("/p0").unwrap().is_some(),
            "a neighbour of the prefix survives"
        );

        // etcd's refusals are Rejected with its message.
        match s.put("", b"x", None) {
            Err(StoreError::Rejected { status, message }) => {
                assert_eq!(status, 400);
                assert!(message.contains("key is not provided"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn compare_and_swap() {
        let etcd = Etcd::start();
        let s = etcd.store();
        assert!(s.create("/c/k", b"first", None).unwrap());
        assert!(!s.create("/c/k", b"second", None).unwrap());
        let kv = s.get("/c/k").unwrap().unwrap();
        assert_eq!(kv.value, b"first");

        assert!(s.put_if("/c/k", b"v2", kv.mod_revision, None).unwrap());
        // The same (now stale) revision loses.
        assert!(!s.put_if("/c/k", b"v3", kv.mod_revision, None).unwrap());
        let kv2 = s.get("/c/k").unwrap().unwrap();
        assert_eq!(kv2.value, b"v2");
        assert!(kv2.mod_revision > kv.mod_revision);
        assert_eq!(kv2.create_revision, kv.create_revision);
        // 0 means "only if absent".
        assert!(!s.put_if("/c/k", b"v4", 0, None).unwrap());
        assert!(s.put_if("/c/new", b"n", 0, None).unwrap());
        assert_eq!(s.get("/c/new").unwrap().unwrap().value, b"n");
        // A delete on a stale revision loses; on the current one it deletes.
        let n = s.get("/c/new").unwrap().unwrap().mod_revision;
        s.put("/c/new", b"n2", None).unwrap();
        assert!(!s.delete_if("/c/new", n).unwrap());
        assert_eq!(s.get("/c/new").unwrap().unwrap().value, b"n2");
        let n2 = s.get("/c/new").unwrap().unwrap().mod_revision;
        assert!(s.delete_if("/c/new", n2).unwrap());
        assert!(s.get("/c/new").unwrap().is_none());

        // Two writers racing on one revision: exactly one wins.
        let base = s.get("/c/k").unwrap().unwrap().mod_revision;
        let wins: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let s = s.clone();
                    sc.spawn(move || {
                        s.put_if("/c/k", format!("w{i}").as_bytes(), base, None)
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap() as usize).sum()
        });
        assert_eq!(wins, 1);

        // JSON helpers.
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct R {
            n: u32,
        }
        s.put_json("/j/a", &R { n: 1 }, None).unwrap();
        s.put_json("/j/c", &R { n: 3 }, None).unwrap();
        s.put("/j/b", b"not json", None).unwrap();
        let (r, rev) = s.get_json::<R>("/j/a").unwrap().unwrap();
        assert_eq!(r, R { n: 1 });
        assert_eq!(rev, s.get("/j/a").unwrap().unwrap().mod_revision);
        assert!(s.get_json::<R>("/j/none").unwrap().is_none());
        assert!(matches!(
            s.get_json::<R>("/j/b"),
            Err(StoreError::Decode(_))
        ));
        let listed = s.prefix_json::<R>("/j/").unwrap();
        assert_eq!(
            listed,
            vec![
                ("/j/a".to_string(), R { n: 1 }),
                ("/j/c".to_string(), R { n: 3 })
            ]
        );
    }

    #[test]
    fn leases_keep_keys_alive_and_expire() {
        let etcd = Etcd::start();
        let s = etcd.store();
        let lease = s.grant(2).unwrap();
        assert_ne!(lease, 0);
        s.put("/l/k", b"v", Some(lease)).unwrap();
        assert!(s.create("/l/c", b"v", Some(lease)).unwrap());
        assert_eq!(s.get("/l/k").unwrap().unwrap().lease, lease);
        // Renewed for longer than its TTL, the key stays.
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let ttl = s.keepalive(lease).unwrap();
            assert!(ttl > 0 && ttl <= 2, "ttl {ttl}");
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(s.get("/l/k").unwrap().is_some());
        // Left alone, it expires with its keys.
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.get("/l/k").unwrap().is_some() {
            assert!(Instant::now() < deadline, "the lease never expired");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(s.get("/l/c").unwrap().is_none());
        assert!(matches!(s.keepalive(lease), Err(StoreError::LeaseExpired)));
        assert!(matches!(
            s.put("/l/k", b"v", Some(lease)),
            Err(StoreError::LeaseExpired)
        ));
        assert!(matches!(
            s.create("/l/k2", b"v", Some(lease)),
            Err(StoreError::LeaseExpired)
        ));

        // Revoked, its keys go at once; revoking again is fine.
        let l2 = s.grant(60).unwrap();
        s.put("/l/r", b"v", Some(l2)).unwrap();
        s.revoke(l2).unwrap();
        assert!(s.get("/l/r").unwrap().is_none());
        s.revoke(l2).unwrap();
        assert!(matches!(s.keepalive(l2), Err(StoreError::LeaseExpired)));
    }

    #[test]
    fn endpoints_fail_over_and_bad_ones_are_refused() {
        let etcd = Etcd::start();
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let s = Store::connect(&format!("{dead}, {}/", etcd.url)).unwrap();
        assert_eq!(s.endpoints(), [dead.clone(), etcd.url.clone()]);
        s.put("/e/k", b"v", None).unwrap();
        assert_eq!(s.get("/e/k").unwrap().unwrap().value, b"v");
        // It remembers the one that answered.
        assert_eq!(s.inner.preferred.load(Ordering::Relaxed), 1);

        let gone = Store::connect(&dead).unwrap();
        let e = gone.get("/e/k").unwrap_err();
        assert!(
            matches!(&e, StoreError::Unreachable(m) if m.contains(dead.trim_start_matches("http://"))),
            "{e}"
        );

        // An endpoint that accepts and never answers costs its timeout, then the next is
        // asked.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = Store::connect(&format!(
            "http://{},{}",
            silent.local_addr().unwrap(),
            etcd.url
        ))
        .unwrap()
        .with_timeout(Duration::from_millis(300));
        let start = Instant::now();
        assert_eq!(s.get("/e/k").unwrap().unwrap().value, b"v");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        drop(silent);

        for bad in [
            "",
            " , ",
            "https://a:2379",
            "http://a:2379/v3",
            "a:2379",
            "http://a:2379,ftp://b",
        ] {
            assert!(
                matches!(Store::connect(bad), Err(StoreError::BadEndpoint(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn answers_that_are_not_etcd_are_errors() {
        // A server answering 200 with a body that is not what etcd sends, every time.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let bodies: Vec<&[u8]> = vec![
            b"not json",
            br#"{"kvs":"x"}"#,
            br#"{"kvs":[{"key":"!!"}]}"#,
            br#"{"kvs":[{"key":"YQ==","mod_revision":"x"}]}"#,
            br#"{"kvs":[{"key":"YQ=="},{"key":"Yg=="}]}"#,
        ];
        let n = bodies.len();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            for body in bodies {
                let (mut c, _) = l.accept().unwrap();
                // Read the whole request (its JSON body ends with '}') so that closing
                // does not reset the connection under unread bytes.
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.ends_with(b"}") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(body);
            }
        });
        let s = Store::connect(&url).unwrap();
        for i in 0..n {
            let e = s.get("a").unwrap_err();
            assert!(matches!(e, StoreError::Decode(_)), "answer {i}: {e}");
        }
        server.join().unwrap();
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
