//! Tests of the HTTP layer: parsing, routing, error mapping, the OpenAPI document's
//! agreement with the router, and the client against the server. The verbs behind the
//! server are an in-memory fake ([`Fake`]): these tests claim nothing about the cluster.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster::ClusterError;
use cluster::model::{ClusterView, FtStatus, HostView, Power, Priority, VmSpec, VmView};
use cluster::timeline::TimelineEvent;
use cluster::verbs::{CreateVm, FtOp};

use crate::client::{Client, ClientError};
use crate::routes::ROUTES;
use crate::server::{self, AgentInfo, Backend, Request};

/// Verbs that record their calls. `kvd` exists; `busy` conflicts; `boom` panics; any other
/// name is unknown.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    /// The timeline events the server recorded.
    notes: Mutex<Vec<TimelineEvent>>,
}

impl Fake {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn known(&self, name: &str) -> Result<VmView, ClusterError> {
        match name {
            "kvd" => Ok(view("kvd")),
            "busy" => Err(ClusterError::Conflict("busy: FT is already on".into())),
            "bad" => Err(ClusterError::Invalid("bad: memory too large".into())),
            "oops" => Err(ClusterError::Internal("oops: disk full".into())),
            "boom" => panic!("the fake verb panics"),
            other => Err(ClusterError::NotFound(format!("no VM {other}"))),
        }
    }
}

fn view(name: &str) -> VmView {
    VmView {
        name: name.into(),
        power: Power::On,
        ft: FtStatus::Protected,
        ft_reason: None,
        primary_host: Some("host1".into()),
        secondary_host: Some("host2".into()),
        lag_ms: Some(3),
        lag_events: Some(1),
        log_bytes: Some(1000),
        log_bps: Some(250),
        restart_priority: Priority::Medium,
        failovers: 0,
        reprotections: 0,
        restarts: 0,
        spec: VmSpec {
            name: name.into(),
            wasm: "/guests/kvd.wasm".into(),
            datastore: "/shared/kvd".into(),
            nic: None,
            listen: vec![6379],
            memory_mib: 256,
            restart_priority: Priority::Medium,
            args: vec![],
            env: vec![],
            log_port: 7100,
        },
        events: Some(100),
        outputs_held: Some(1),
        outputs_held_total: Some(40),
        disk_read_bps: Some(1000),
        net_in_bps: Some(2000),
        reprotect_ms: Some(1500),
        ops: Default::default(),
    }
}

impl Backend for Fake {
    fn status(&self) -> Result<ClusterView, ClusterError> {
        self.record("status".into());
        Ok(ClusterView {
            master: Some("host1".into()),
            hosts: 2,
            vms: 1,
            protected: 1,
            not_protected: 0,
            version: "0.1.0".into(),
        })
    }
    fn hosts(&self) -> Result<Vec<HostView>, ClusterError> {
        self.record("hosts".into());
        Ok(vec![])
    }
    fn vms(&self) -> Result<Vec<VmView>, ClusterError> {
        self.record("vms".into());
        Ok(vec![view("kvd")])
    }
    fn vm(&self, name: &str) -> Result<VmView, ClusterError> {
        self.record(format!("vm {name}"));
        self.known(name)
    }
    fn create(&self, req: CreateVm) -> Result<VmView, ClusterError> {
        self.record(format!("create {}", req.name));
        Ok(view(&req.name))
    }
    fn power_on(&self, name: &str, host: Option<String>) -> Result<VmView, ClusterError> {
        self.record(format!("power_on {name} {host:?}"));
        self.known(name)
    }
    fn power_off(&self, name: &str) -> Result<VmView, ClusterError> {
        self.record(format!("power_off {name}"));
        self.known(name)
    }
    fn destroy(&self, name: &str) -> Result<(), ClusterError> {
        self.record(format!("destroy {name}"));
        self.known(name).map(drop)
    }
    fn ft(&self, name: &str, op: FtOp) -> Result<VmView, ClusterError> {
        self.record(format!("ft {name} {op:?}"));
        self.known(name)
    }
    fn timeline(&self, limit: usize) -> Result<Vec<TimelineEvent>, ClusterError> {
        let n = self.notes.lock().unwrap();
        Ok(n[n.len().saturating_sub(limit)..].to_vec())
    }
    fn note(&self, event: TimelineEvent) {
        self.notes.lock().unwrap().push(event);
    }
    fn maintenance(&self, host: &str, enter: bool) -> Result<HostView, ClusterError> {
        self.record(format!("maintenance {host} {enter}"));
        Ok(HostView {
            name: host.into(),
            state: "connected".into(),
            version: "0.1.0".into(),
            fingerprint: "f".into(),
            master: false,
            ft_vms: 0,
            vms: 0,
            maintenance: enter,
            memory_mib: 1024,
            memory_reserved_mib: 0,
            api: "http://10.79.0.11:7070".into(),
            log_peers: None,
        })
    }
    fn ft_schedule(
        &self,
        name: &str,
        _: cluster::verbs::ScheduleRequest,
    ) -> Result<VmView, ClusterError> {
        self.record(format!("ft_schedule {name}"));
        self.known(name)
    }
    fn set_monitoring(
        &self,
        name: &str,
        _: cluster::ops::Monitoring,
    ) -> Result<VmView, ClusterError> {
        self.record(format!("set_monitoring {name}"));
        self.known(name)
    }
    fn ft_sizing(&self, name: &str) -> Result<cluster::ops::Sizing, ClusterError> {
        self.record(format!("ft_sizing {name}"));
        self.known(name)?;
        Ok(cluster::ops::Sizing {
            vm: name.into(),
            primary_host: Some("host1".into()),
            secondary_host: Some("host2".into()),
            disk_read_bytes: 0,
            net_in_bytes: 1 << 20,
            log_bytes: 2 << 20,
            disk_read_mbyte_s: 0.0,
            net_in_mbit_s: 8.0,
            log_mbit_s: 9.0,
            need_mbit_s: cluster::ops::need_mbit_s(0.0, 8.0),
            measured: None,
            warning: None,
        })
    }
    fn check_logging(
        &self,
        me: &str,
        from: &str,
        req: cluster::logcheck::CheckRequest,
    ) -> Result<cluster::logcheck::LogCheck, ClusterError> {
        self.record(format!("check_logging {me} {from} {}", req.to));
        Ok(cluster::logcheck::LogCheck {
            from: from.into(),
            to: req.to,
            from_ip: "10.78.0.11".into(),
            to_ip: "10.78.0.12".into(),
            pings: 1,
            rtt_min_us: 10,
            rtt_median_us: 10,
            rtt_p99_us: 10,
            bytes: 1 << 20,
            secs: 0.01,
            mbyte_s: 100.0,
            gbit_s: 0.8,
            at_ms: 0,
        })
    }
}

fn info() -> AgentInfo {
    AgentInfo::open("host1")
}

/// Answer one parsed request: (status, JSON body or Null).
fn ask(fake: &Fake, method: &str, target: &str, body: &str) -> (u16, serde_json::Value) {
    let req = Request {
        method: method.into(),
        target: target.into(),
        body: body.as_bytes().to_vec(),
        ..Default::default()
    };
    let r = server::respond(&req, fake, &info());
    let v = if r.body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&r.body).expect("every answer is JSON")
    };
    (r.status, v)
}

fn error_line(v: &serde_json::Value) -> &str {
    v["error"]
        .as_str()
        .expect("an error body has an error line")
}

#[test]
fn every_documented_route_is_served_and_every_served_route_documented() {
    let doc: serde_json::Value = serde_json::from_str(crate::openapi::document()).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served);
    assert_eq!(served.len(), ROUTES.len(), "a route is listed twice");
}

#[test]
fn the_openapi_references_resolve_and_views_have_their_schemas() {
    let doc: serde_json::Value = serde_json::from_str(crate::openapi::document()).unwrap();
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    // OpenAPI 3.0's dialect: no `type` arrays (a null type is `nullable: true`).
    fn no_type_arrays(v: &serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(t) = m.get("type") {
                    assert!(t.is_string(), "a type that is not one name: {v}");
                }
                m.values().for_each(no_type_arrays);
            }
            serde_json::Value::Array(a) => a.iter().for_each(no_type_arrays),
            _ => {}
        }
    }
    no_type_arrays(&doc["components"]);
    no_type_arrays(&doc["paths"]);
    assert_eq!(
        doc["components"]["schemas"]["VmView"]["properties"]["lag_ms"]["nullable"],
        true
    );
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
    }
    // The documented view keys are the ones the server sends.
    let vm = serde_json::to_value(view("kvd")).unwrap();
    let schema = &doc["components"]["schemas"]["VmView"]["properties"];
    let sent: BTreeSet<&String> = vm.as_object().unwrap().keys().collect();
    let described: BTreeSet<&String> = schema.as_object().unwrap().keys().collect();
    assert_eq!(sent, described);
    let create = &doc["components"]["schemas"]["CreateVm"]["properties"];
    let req = serde_json::to_value(CreateVm {
        name: "a".into(),
        wasm: "/a".into(),
        datastore: None,
        nic: None,
        listen: vec![],
        memory_mib: None,
        restart_priority: None,
        monitoring: None,
        args: vec![],
        env: vec![],
    })
    .unwrap();
    let sent: BTreeSet<&String> = req.as_object().unwrap().keys().collect();
    let described: BTreeSet<&String> = create.as_object().unwrap().keys().collect();
    assert_eq!(sent, described);
}

#[test]
fn routes_reach_their_verbs() {
    let fake = Fake::default();
    assert_eq!(ask(&fake, "GET", "/api/v1/cluster", "").0, 200);
    assert_eq!(ask(&fake, "GET", "/api/v1/hosts", "").0, 200);
    let (s, v) = ask(&fake, "GET", "/api/v1/vms", "");
    assert_eq!((s, v[0]["name"].as_str()), (200, Some("kvd")));
    let (s, v) = ask(&fake, "GET", "/api/v1/vms/kvd", "");
    assert_eq!((s, v["ft"].as_str()), (200, Some("protected")));
    let (s, v) = ask(
        &fake,
        "POST",
        "/api/v1/vms",
        r#"{"name":"web","wasm":"/g/httpd.wasm","listen":[80]}"#,
    );
    assert_eq!((s, v["name"].as_str()), (201, Some("web")));
    assert_eq!(ask(&fake, "DELETE", "/api/v1/vms/kvd", "").0, 204);
    assert_eq!(
        ask(
            &fake,
            "POST",
            "/api/v1/vms/kvd/power-on",
            r#"{"host":"host2"}"#
        )
        .0,
        200
    );
    assert_eq!(ask(&fake, "POST", "/api/v1/vms/kvd/power-on", "").0, 200);
    assert_eq!(ask(&fake, "POST", "/api/v1/vms/kvd/power-off", "").0, 200);
    for op in [
        "turn-on",
        "turn-off",
        "disable",
        "enable",
        "test-failover",
        "restart-secondary",
    ] {
        let (s, _) = ask(&fake, "POST", &format!("/api/v1/vms/kvd/ft/{op}"), "{}");
        assert_eq!(s, 200, "{op}");
    }
    let (s, _) = ask(
        &fake,
        "POST",
        "/api/v1/vms/kvd/ft/migrate-secondary",
        r#"{"to":"host3"}"#,
    );
    assert_eq!(s, 200);
    let (s, v) = ask(&fake, "GET", "/healthz", "");
    assert_eq!(
        (s, v["ok"].as_bool(), v["host"].as_str()),
        (200, Some(true), Some("host1"))
    );
    let (s, v) = ask(&fake, "GET", "/api/v1/openapi.json", "");
    assert_eq!((s, v["openapi"].as_str()), (200, Some("3.0.3")));
    assert_eq!(
        fake.calls(),
        [
            "status",
            "hosts",
            "vms",
            "vm kvd",
            "create web",
            "destroy kvd",
            "power_on kvd Some(\"host2\")",
            "power_on kvd None",
            "power_off kvd",
            "ft kvd TurnOn",
            "ft kvd TurnOff",
            "ft kvd Disable",
            "ft kvd Enable",
            "ft kvd TestFailover",
            "ft kvd RestartSecondary",
            "ft kvd MigrateSecondary { to: \"host3\" }",
        ]
    );
}

#[test]
fn errors_map_to_their_codes_with_one_line() {
    let fake = Fake::default();
    for (name, status) in [
        ("nope", 404),
        ("busy", 409),
        ("bad", 400),
        ("oops", 500),
        ("boom", 500),
    ] {
        let (s, v) = ask(&fake, "GET", &format!("/api/v1/vms/{name}"), "");
        assert_eq!(s, status, "{name}: {v}");
        let line = error_line(&v);
        assert!(!line.is_empty() && !line.contains('\n'), "{line}");
    }
    assert_eq!(
        error_line(&ask(&fake, "GET", "/api/v1/vms/busy", "").1),
        "busy: FT is already on"
    );
}

#[test]
fn bad_requests_are_refused_before_the_verbs() {
    let fake = Fake::default();
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("GET", "/api/v1/vms/KVD", "", 400, "bad VM name"),
        ("GET", "/api/v1/vms/a_b", "", 400, "bad VM name"),
        ("POST", "/api/v1/vms/..%2F/power-on", "", 400, "bad VM name"),
        ("GET", "/api/v1/nothing", "", 404, "no route"),
        ("GET", "/api", "", 404, "no route"),
        ("PUT", "/api/v1/vms", "", 405, "not allowed"),
        ("GET", "/api/v1/vms/kvd/power-on", "", 405, "not allowed"),
        ("POST", "/api/v1/vms", "{", 400, "malformed JSON"),
        ("POST", "/api/v1/vms", "", 400, "malformed JSON"),
        ("POST", "/api/v1/vms", "[1]", 400, "malformed JSON"),
        (
            "POST",
            "/api/v1/vms",
            r#"{"name":"web","wasm":"/w","colour":"red"}"#,
            400,
            "unknown field `colour`",
        ),
        (
            "POST",
            "/api/v1/vms",
            r#"{"name":"web"}"#,
            400,
            "missing field `wasm`",
        ),
        (
            "POST",
            "/api/v1/vms",
            r#"{"name":"Web!","wasm":"/w"}"#,
            400,
            "bad VM name",
        ),
        (
            "POST",
            "/api/v1/vms",
            r#"{"name":"web","wasm":"/w","memory_mib":-1}"#,
            400,
            "malformed JSON",
        ),
        (
            "POST",
            "/api/v1/vms/kvd/power-on",
            r#"{"host":"Host 2"}"#,
            400,
            "bad host name",
        ),
        (
            "POST",
            "/api/v1/vms/kvd/power-on",
            r#"{"hots":"h"}"#,
            400,
            "unknown field",
        ),
        (
            "POST",
            "/api/v1/vms/kvd/ft/turn-on",
            r#"{"x":1}"#,
            400,
            "unknown field",
        ),
        (
            "POST",
            "/api/v1/vms/kvd/ft/migrate-secondary",
            "",
            400,
            "malformed JSON",
        ),
        (
            "POST",
            "/api/v1/vms/kvd/ft/migrate-secondary",
            r#"{"to":"../etc"}"#,
            400,
            "bad host name",
        ),
        ("POST", "/api/v1/vms/kvd/ft/explode", "", 404, "no route"),
    ];
    for (method, target, body, status, says) in cases {
        let (s, v) = ask(&fake, method, target, body);
        assert_eq!(s, *status, "{method} {target} {body}: {v}");
        assert!(error_line(&v).contains(says), "{method} {target}: {v}");
    }
    assert_eq!(
        fake.calls(),
        Vec::<String>::new(),
        "a refused request reached a verb"
    );
}

/// A connection fed from a buffer, its answer kept.
struct Wire {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}
impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The final answer's status to these bytes (None: no answer), and its head and body.
fn over_wire(fake: &Fake, bytes: &[u8]) -> Option<(u16, String, Vec<u8>)> {
    let mut w = Wire {
        input: std::io::Cursor::new(bytes.to_vec()),
        output: Vec::new(),
    };
    server::serve_connection(&mut w, fake, &info());
    if w.output.is_empty() {
        return None;
    }
    let mut out = w.output.as_slice();
    // Skip an interim `100 Continue`.
    if let Some(rest) = out.strip_prefix(b"HTTP/1.1 100 Continue\r\n\r\n".as_slice()) {
        out = rest;
    }
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8(out[..end].to_vec()).expect("an ASCII head");
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    assert!(head.contains("\r\nX-Tandem-Host: host1\r\n"), "{head}");
    let status = head[9..12].parse().expect("a status");
    Some((status, head, out[end + 4..].to_vec()))
}

#[test]
fn the_wire_is_parsed_and_bounded() {
    let fake = Fake::default();
    let ok = over_wire(&fake, b"GET /api/v1/vms/kvd HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(ok.0, 200);
    assert!(ok.1.contains("Content-Type: application/json"));
    let body: serde_json::Value = serde_json::from_slice(&ok.2).unwrap();
    assert_eq!(body["name"], "kvd");
    let created =
        b"POST /api/v1/vms HTTP/1.1\r\nContent-Length: 28\r\nExpect: 100-continue\r\n\r\n\
{\"name\":\"web\",\"wasm\":\"/w\"}\r\n";
    assert_eq!(over_wire(&fake, created).unwrap().0, 201);
    let deleted = over_wire(&fake, b"DELETE /api/v1/vms/kvd HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(deleted.0, 204);
    assert!(deleted.2.is_empty() && !deleted.1.contains("Content-Length"));
    let allow = over_wire(&fake, b"PATCH /api/v1/vms/kvd HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(allow.0, 405);
    assert!(allow.1.contains("\r\nAllow: GET, DELETE"), "{}", allow.1);

    let long_head = format!(
        "GET /api/v1/vms HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(server::MAX_HEAD)
    );
    let endless_head = "GET /api/v1/vms HTTP/1.1\r\n".to_string() + &"X: y\r\n".repeat(5000);
    let many_headers =
        "GET /api/v1/vms HTTP/1.1\r\n".to_string() + &"X: y\r\n".repeat(100) + "\r\n";
    let big_body = format!(
        "POST /api/v1/vms HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        server::MAX_BODY + 1
    );
    let cases: Vec<(&[u8], u16)> = vec![
        (long_head.as_bytes(), 431),
        (endless_head.as_bytes(), 431),
        (many_headers.as_bytes(), 431),
        (big_body.as_bytes(), 413),
        (
            b"POST /api/v1/vms HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            400,
        ),
        (
            b"POST /api/v1/vms HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}",
            400,
        ),
        (
            b"POST /api/v1/vms HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
            400,
        ),
        (
            b"POST /api/v1/vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (b"GET /api/v1/vms HTTP/2.0\r\n\r\n", 505),
        (b"GET /api/v1/vms\r\n\r\n", 400),
        (b"GET  /api/v1/vms HTTP/1.1\r\n\r\n", 400),
        (b"get /api/v1/vms HTTP/1.1\r\n\r\n", 400),
        (b"GET api/v1/vms HTTP/1.1\r\n\r\n", 400),
        (b"GET /api/v1/vms HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET /api/v1/vms HTTP/1.1\r\n", 400),
    ];
    for (bytes, status) in cases {
        let got = over_wire(&fake, bytes).expect("an answer");
        assert_eq!(
            got.0,
            status,
            "{:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
        let v: serde_json::Value = serde_json::from_slice(&got.2).unwrap();
        assert!(!error_line(&v).is_empty());
    }
    assert_eq!(over_wire(&fake, b""), None, "no request, no answer");
}

/// A connection whose client stops sending (its reads time out).
struct Stalled(std::io::Cursor<Vec<u8>>, Vec<u8>);

impl Read for Stalled {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf)? {
            0 => Err(std::io::ErrorKind::WouldBlock.into()),
            n => Ok(n),
        }
    }
}
impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_stalled_request_is_answered_408() {
    let fake = Fake::default();
    for partial in [
        &b"GET /api/v1/vms HTTP/1.1\r\nHost"[..],
        b"POST /api/v1/vms HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"na",
    ] {
        let mut s = Stalled(std::io::Cursor::new(partial.to_vec()), Vec::new());
        server::serve_connection(&mut s, &fake, &info());
        let out = String::from_utf8_lossy(&s.1);
        assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    }
    assert!(fake.calls().is_empty());
}

/// xorshift64*: reproducible noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzzed_requests_never_panic_and_always_get_a_well_formed_answer() {
    let fake = Fake::default();
    let seeds: &[&[u8]] = &[
        b"GET /api/v1/vms/kvd HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /api/v1/vms HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"name\":\"web\",\"wasm\":\"/w\",\"listen\":[80]}",
        b"POST /api/v1/vms/kvd/ft/migrate-secondary HTTP/1.1\r\nContent-Length: 14\r\n\r\n{\"to\":\"host3\"}",
        b"POST /api/v1/vms/kvd/power-on HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"host\":\"host\"}",
    ];
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let alphabet: &[u8] = b"GETPOST /api/v1vms{}\":,[]\r\n0123456789-kvdContent-Length: ";
    for round in 0..20_000 {
        let mut bytes: Vec<u8> = match round % 3 {
            // Pure noise.
            0 => (0..noise.below(300)).map(|_| noise.next() as u8).collect(),
            // A valid request, mutated.
            1 => {
                let mut b = seeds[noise.below(seeds.len())].to_vec();
                for _ in 0..=noise.below(4) {
                    let at = noise.below(b.len() + 1);
                    match noise.below(3) {
                        0 if at < b.len() => b[at] = noise.next() as u8,
                        1 => b.insert(at, alphabet[noise.below(alphabet.len())]),
                        _ => b.truncate(at),
                    }
                }
                b
            }
            // Request-like tokens.
            _ => (0..noise.below(200))
                .map(|_| alphabet[noise.below(alphabet.len())])
                .collect(),
        };
        if round % 7 == 0 {
            bytes.extend_from_slice(b"\r\n\r\n");
        }
        if let Some((status, _, body)) = over_wire(&fake, &bytes) {
            assert!(
                matches!(
                    status,
                    200 | 201 | 204 | 400 | 404 | 405 | 409 | 413 | 431 | 501 | 505
                ),
                "status {status} for {:?}",
                String::from_utf8_lossy(&bytes)
            );
            if status >= 400 {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let line = error_line(&v);
                assert!(!line.contains('\n') && line.len() < 1000, "{line}");
            }
        }
    }
}

fn start(fake: Arc<Fake>) -> server::Server {
    server::serve_backend("127.0.0.1:0".parse().unwrap(), fake, info()).unwrap()
}

/// A port nothing listens on (just released).
fn dead_api() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[test]
fn the_client_calls_the_server_and_carries_its_errors() {
    let fake = Arc::new(Fake::default());
    let server = start(fake.clone());
    let api = format!("http://{}", server.local_addr());
    // A dead API first: the client passes on to the next.
    let client = Client::new(vec![dead_api(), api.clone() + "/"], None);
    assert_eq!(client.status().unwrap().master.as_deref(), Some("host1"));
    assert_eq!(client.vms().unwrap()[0].name, "kvd");
    assert_eq!(
        client.vm("kvd").unwrap().secondary_host.as_deref(),
        Some("host2")
    );
    match client.vm("nope") {
        Err(ClientError::Api {
            status: 404,
            message,
        }) => assert_eq!(message, "no VM nope"),
        other => panic!("{other:?}"),
    }
    match client.ft("busy", &FtOp::TurnOn) {
        Err(ClientError::Api {
            status: 409,
            message,
        }) => {
            assert_eq!(message, "busy: FT is already on")
        }
        other => panic!("{other:?}"),
    }
    let create = CreateVm {
        name: "web".into(),
        wasm: "/g/httpd.wasm".into(),
        datastore: None,
        nic: Some(cluster::model::Nic {
            mac: "02:00:00:00:00:20".into(),
            ip: "10.77.0.20/24".into(),
        }),
        listen: vec![80],
        memory_mib: Some(64),
        restart_priority: Some(Priority::High),
        monitoring: None,
        args: vec!["-v".into()],
        env: vec!["A=B".into()],
    };
    assert_eq!(client.create(&create).unwrap().name, "web");
    client.power_on("kvd", Some("host3")).unwrap();
    client.power_off("kvd").unwrap();
    client
        .ft("kvd", &FtOp::MigrateSecondary { to: "host4".into() })
        .unwrap();
    client.destroy("kvd").unwrap();
    assert!(matches!(
        client.destroy("gone"),
        Err(ClientError::Api { status: 404, .. })
    ));
    assert!(matches!(client.vm("../x"), Err(ClientError::Invalid(_))));
    let raw = client.get_raw("/api/v1/vms").unwrap();
    assert_eq!(raw, serde_json::to_string(&[view("kvd")]).unwrap());
    assert_eq!(
        fake.calls(),
        [
            "status",
            "vms",
            "vm kvd",
            "vm nope",
            "ft busy TurnOn",
            "create web",
            "power_on kvd Some(\"host3\")",
            "power_off kvd",
            "ft kvd MigrateSecondary { to: \"host4\" }",
            "destroy kvd",
            "destroy gone",
            "vms",
        ]
    );
    server.shutdown();
    match Client::new(vec![api, dead_api()], None).status() {
        Err(ClientError::Unreachable(why)) => assert!(why.contains("; "), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_verb_sent_without_answer_is_not_sent_again_elsewhere() {
    // An API that takes requests and never answers; it counts them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_api = format!("http://{}", silent.local_addr().unwrap());
    silent.set_nonblocking(true).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match silent.accept() {
                    Ok((c, _)) => kept.push(c),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            kept.len()
        })
    };
    let fake = Arc::new(Fake::default());
    let server = start(fake.clone());
    let client = Client::new(
        vec![silent_api, format!("http://{}", server.local_addr())],
        None,
    )
    .with_timeout(Duration::from_millis(500));
    match client.ft("kvd", &FtOp::TestFailover) {
        Err(ClientError::Unreachable(why)) => assert!(why.contains("may have been"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(fake.calls().is_empty(), "the verb was sent twice");
    // A read is safe to ask elsewhere.
    assert_eq!(client.vm("kvd").unwrap().name, "kvd");
    assert_eq!(fake.calls(), ["vm kvd"]);
    // The API that answered is asked first from now on: the silent one is not.
    client.ft("kvd", &FtOp::TurnOn).unwrap();
    client.vm("kvd").unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(held.join().unwrap(), 2, "the silent API was asked again");
}

#[test]
fn an_answer_that_is_not_a_tandem_error_says_so() {
    // A plain HTTP server answering 404 with no body, then one with HTML.
    for (body, says) in [
        ("", "without an error message"),
        ("<html>nope</html>", "<html>nope"),
    ] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", l.local_addr().unwrap());
        let serving = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let head = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            c.write_all(head.as_bytes()).unwrap();
            c.write_all(body.as_bytes()).unwrap();
        });
        match Client::new(vec![api], None).vms() {
            Err(ClientError::Api {
                status: 404,
                message,
            }) => {
                assert!(message.contains(says), "{message}")
            }
            other => panic!("{other:?}"),
        }
        serving.join().unwrap();
    }
}

#[test]
fn connections_beyond_the_bound_are_refused_503_and_served_again_after() {
    let fake = Arc::new(Fake::default());
    let server = start(fake);
    let addr = server.local_addr();
    // Idle connections hold their slots (their threads wait for a request).
    let idle: Vec<TcpStream> = (0..server::MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    drop(idle);
    let client = Client::new(vec![format!("http://{addr}")], None);
    // The slots free as the idle connections' threads see them closed.
    let mut served = false;
    for _ in 0..100 {
        if client.status().is_ok() {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "the server never served again");
}

#[test]
fn random_bytes_over_tcp_leave_the_server_serving() {
    let fake = Arc::new(Fake::default());
    let server = start(fake);
    let addr: SocketAddr = server.local_addr();
    let mut noise = Noise(42);
    for _ in 0..200 {
        let mut s = TcpStream::connect(addr).unwrap();
        let bytes: Vec<u8> = (0..noise.below(2000)).map(|_| noise.next() as u8).collect();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 4"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    let client = Client::new(vec![format!("http://{addr}")], None);
    assert!(client.status().is_ok());
}

#[test]
fn a_lab_is_found_by_its_file_and_its_absence_said_plainly() {
    match Client::from_lab("no-such-lab-here") {
        Err(e @ ClientError::NoLab(_)) => assert_eq!(
            e.to_string(),
            "no lab no-such-lab-here: run `tandem lab up` or pass --api URL"
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Client::from_lab("../etc"),
        Err(ClientError::Invalid(_))
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x-lab.json");
    std::fs::write(
        &path,
        r#"{"name":"x","netns":"x-net","store":"http://10.79.0.1:2379",
            "apis":["http://10.79.0.11:7070","http://10.79.0.12:7070"],"hosts":2}"#,
    )
    .unwrap();
    let client = super::client::tests_support::from_lab_file("x", &path).unwrap();
    assert_eq!(
        client.apis(),
        ["http://10.79.0.11:7070", "http://10.79.0.12:7070"]
    );
    std::fs::write(&path, r#"{"apis":[]}"#).unwrap();
    assert!(matches!(
        super::client::tests_support::from_lab_file("x", &path),
        Err(ClientError::Lab { .. })
    ));
    std::fs::write(&path, "not json").unwrap();
    assert!(matches!(
        super::client::tests_support::from_lab_file("x", &path),
        Err(ClientError::Lab { .. })
    ));
}

/// A network namespace of this test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name} (needs root)");
        let ns = Netns(name.into());
        let ok = std::process::Command::new("ip")
            .args(["-n", name, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn the_client_reaches_an_api_inside_a_network_namespace() {
    let name = format!("tandem-apitest-{}", std::process::id());
    let ns = Netns::new(&name);
    // The server listens on the namespace's own loopback: unreachable from here.
    let fake = Arc::new(Fake::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", ns.0);
    let serving = std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: `f` is a namespace file; only this test thread moves, and it only serves.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        // The server's threads are spawned from here: they inherit the namespace.
        let server = start(fake);
        tx.send(server.local_addr()).unwrap();
        // Keep the server until the test drops the channel's other end.
        std::thread::park_timeout(Duration::from_secs(30));
        server.shutdown();
    });
    let addr = rx.recv().unwrap();
    let api = format!("http://{addr}");
    let inside = Client::new(vec![api.clone()], Some(name.clone()));
    assert_eq!(inside.status().unwrap().hosts, 2);
    let outside = Client::new(vec![api], None).with_timeout(Duration::from_secs(2));
    assert!(matches!(outside.status(), Err(ClientError::Unreachable(_))));
    let nowhere = Client::new(
        vec!["http://127.0.0.1:1".into()],
        Some("no-such-ns-x".into()),
    );
    assert!(matches!(nowhere.status(), Err(ClientError::Netns { .. })));
    serving.thread().unpark();
    serving.join().unwrap();
}

/// `curl -s -w '%{http_code}'` against the server: (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn curl_speaks_to_the_server() {
    let fake = Arc::new(Fake::default());
    let server = start(fake.clone());
    let base = format!("http://{}", server.local_addr());
    let (s, body) = curl(&[&format!("{base}/api/v1/vms/kvd")]);
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_str::<VmView>(&body).unwrap().name, "kvd");
    // A body over 1 KiB: curl sends `Expect: 100-continue` and waits for it.
    let big_env = format!("K={}", "v".repeat(2000));
    let create = serde_json::json!({"name": "web", "wasm": "/g/httpd.wasm", "env": [big_env]});
    let (s, _) = curl(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        &create.to_string(),
        &format!("{base}/api/v1/vms"),
    ]);
    assert_eq!(s, 201);
    let (s, body) = curl(&["-X", "PUT", &format!("{base}/api/v1/vms/kvd")]);
    assert_eq!(s, 405);
    assert!(body.contains("not allowed"), "{body}");
    let (s, body) = curl(&["-d", "{nope", &format!("{base}/api/v1/vms")]);
    assert_eq!(s, 400);
    assert!(body.starts_with("{\"error\":\"malformed JSON"), "{body}");
    let (s, _) = curl(&["-X", "DELETE", &format!("{base}/api/v1/vms/kvd")]);
    assert_eq!(s, 204);
    let (s, body) = curl(&[&format!("{base}/healthz")]);
    assert_eq!((s, body.as_str()), (200, r#"{"host":"host1","ok":true}"#));
    assert_eq!(fake.calls(), ["vm kvd", "create web", "destroy kvd"]);
}

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn start_with_token(fake: Arc<Fake>) -> server::Server {
    let info = AgentInfo {
        host: "host1".into(),
        token: Some(TOKEN.into()),
        token_hint: "/tmp/lab-shared/.token".into(),
    };
    server::serve_backend("127.0.0.1:0".parse().unwrap(), fake, info).unwrap()
}

/// One raw exchange: (status, head, body). An event stream is read until its first event.
fn raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&out);
        if text.contains("text/event-stream") && text.contains("\ndata: ") && text.ends_with("\n\n")
        {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    (
        head[9..12].parse().unwrap(),
        head.to_string(),
        body.to_string(),
    )
}

fn req(method: &str, path: &str, headers: &[&str], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r
}

#[test]
fn every_documented_route_answers_with_the_token_and_refuses_without_it() {
    let fake = Arc::new(Fake::default());
    let server = start_with_token(fake.clone());
    let doc: serde_json::Value = serde_json::from_str(crate::openapi::document()).unwrap();
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_uppercase();
            let target = path.replace("{name}", "kvd");
            let body = match path.as_str() {
                "/api/v1/vms" => r#"{"name":"web","wasm":"/g/httpd.wasm"}"#.to_string(),
                "/api/v1/session" => format!(r#"{{"token":"{TOKEN}"}}"#),
                p if p.ends_with("migrate-secondary") => r#"{"to":"host3"}"#.into(),
                p if p.ends_with("ft/schedule") => r#"{"clear":true}"#.into(),
                p if p.ends_with("/monitoring") => r#"{"max_resets":3}"#.into(),
                p if p.ends_with("check-logging") => r#"{"to":"host2"}"#.into(),
                _ => String::new(),
            };
            let (status, head, _) = raw(
                server.local_addr(),
                &req(&method, &target, &[&bearer], &body),
            );
            let documented: Vec<u16> = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            assert!(
                (200..400).contains(&status) && documented.contains(&status),
                "{method} {path}: {status} not a documented success ({documented:?}): {head}"
            );
            let needs_token = op.get("security") != Some(&serde_json::json!([]));
            let (without, _, _) = raw(server.local_addr(), &req(&method, &target, &[], &body));
            if needs_token {
                assert_eq!(without, 401, "{method} {path} without the token");
                assert!(
                    documented.contains(&401),
                    "{method} {path}: 401 undocumented"
                );
            } else if path != "/api/v1/session" {
                assert_ne!(without, 401, "{method} {path} needs no token");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, ROUTES.len());
}

#[test]
fn the_dashboard_signs_in_by_form_and_cookie_changes_need_the_csrf_header() {
    let fake = Arc::new(Fake::default());
    let server = start_with_token(fake.clone());
    let a = server.local_addr();
    // No token: the sign-in page, saying where the token is.
    let (s, head, body) = raw(a, &req("GET", "/", &[], ""));
    assert_eq!(s, 401);
    assert!(head.contains("text/html"), "{head}");
    assert!(
        body.contains("/tmp/lab-shared/.token") && body.contains("<form"),
        "{body}"
    );
    // A wrong token: the page again, saying so.
    let form = "Content-Type: application/x-www-form-urlencoded";
    let (s, _, body) = raw(a, &req("POST", "/api/v1/session", &[form], "token=nope"));
    assert_eq!(s, 401);
    assert!(body.contains("not this cluster"), "{body}");
    // The right one: a cookie, and back to the dashboard.
    let (s, head, _) = raw(
        a,
        &req(
            "POST",
            "/api/v1/session",
            &[form],
            &format!("token={TOKEN}"),
        ),
    );
    assert_eq!(s, 303, "{head}");
    assert!(head.contains("Location: /\r\n"), "{head}");
    assert!(
        head.contains(&format!(
            "Set-Cookie: tandem_token={TOKEN}; Path=/; HttpOnly; SameSite=Strict"
        )),
        "{head}"
    );
    let cookie = format!("Cookie: other=1; tandem_token={TOKEN}");
    let (s, _, body) = raw(a, &req("GET", "/", &[&cookie], ""));
    assert_eq!(s, 200);
    assert!(body.contains("EventSource") && body.contains("Turn On FT"));
    // A change by cookie alone is refused without the dashboard's header.
    let (s, _, _) = raw(
        a,
        &req("POST", "/api/v1/vms/kvd/ft/turn-on", &[&cookie], ""),
    );
    assert_eq!(s, 403);
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    let (s, _, _) = raw(
        a,
        &req(
            "POST",
            "/api/v1/vms/kvd/ft/turn-on",
            &[&cookie, "X-Tandem-Csrf: 1"],
            "",
        ),
    );
    assert_eq!(s, 200);
    // A wrong cookie or bearer is refused; so is a token of the wrong length.
    for h in [
        "Cookie: tandem_token=0123456789abcdef0123456789abcdee".to_string(),
        "Authorization: Bearer 0123456789abcdef0123456789abcde".to_string(),
        format!("Authorization: Basic {TOKEN}"),
    ] {
        let (s, head, _) = raw(a, &req("GET", "/api/v1/vms", &[&h], ""));
        assert_eq!(s, 401, "{h}");
        assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    }
    // /metrics and /healthz need no token.
    assert_eq!(raw(a, &req("GET", "/metrics", &[], "")).0, 200);
    assert_eq!(raw(a, &req("GET", "/healthz", &[], "")).0, 200);
}

#[test]
fn verbs_are_told_in_the_timeline_with_who_asked() {
    let fake = Arc::new(Fake::default());
    let server = start_with_token(fake.clone());
    let client = Client::new(vec![format!("http://{}", server.local_addr())], None)
        .with_token(Some(TOKEN.into()));
    client.ft("kvd", &FtOp::TurnOn).unwrap();
    client
        .ft("kvd", &FtOp::MigrateSecondary { to: "host3".into() })
        .unwrap();
    // A failed verb is not told.
    assert!(client.ft("nope", &FtOp::TurnOn).is_err());
    let notes = fake.notes.lock().unwrap().clone();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(notes[0].detail, "ft turn-on");
    assert_eq!(notes[1].detail, "ft migrate-secondary --to host3");
    assert_eq!(notes[0].vm.as_deref(), Some("kvd"));
    assert_eq!(notes[0].who.as_deref(), Some("API token from 127.0.0.1"));
    let timeline = client.get_raw("/api/v1/timeline").unwrap();
    assert!(timeline.contains("migrate-secondary"), "{timeline}");
    // A client without the token is refused, and says so.
    let bare = Client::new(vec![format!("http://{}", server.local_addr())], None);
    match bare.vms() {
        Err(ClientError::Api {
            status: 401,
            message,
        }) => {
            assert!(message.contains("Authorization: Bearer"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_event_stream_sends_the_whole_state_and_metrics_have_their_families() {
    let fake = Arc::new(Fake::default());
    let server = start_with_token(fake.clone());
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let (s, head, body) = raw(
        server.local_addr(),
        &req("GET", "/api/v1/events", &[&bearer], ""),
    );
    assert_eq!(s, 200);
    assert!(head.contains("Content-Type: text/event-stream"), "{head}");
    let data = body
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("an event");
    let snap: crate::bodies::Snapshot = serde_json::from_str(data).unwrap();
    assert_eq!(snap.vms[0].name, "kvd");
    assert_eq!(snap.served_by, "host1");
    let (s, head, text) = raw(server.local_addr(), &req("GET", "/metrics", &[], ""));
    assert_eq!(s, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    for line in [
        "tandem_store_up 1",
        "tandem_vm_ft_state{vm=\"kvd\",state=\"protected\"} 1",
        "tandem_vm_ft_state{vm=\"kvd\",state=\"off\"} 0",
        "tandem_vm_secondary_lag_seconds{vm=\"kvd\"} 0.003",
        "tandem_vm_outputs_held_total{vm=\"kvd\"} 40",
        "tandem_vm_reprotect_duration_seconds{vm=\"kvd\"} 1.5",
        "# TYPE tandem_vm_failovers_total counter",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
}

#[test]
fn metrics_say_an_unreadable_store_and_escape_their_labels() {
    let text = crate::metrics::render("host1", None);
    assert_eq!(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        ["tandem_store_up 0"]
    );
    let mut odd = view("kvd");
    odd.name = "a\"b\\c\nd".into();
    let text = crate::metrics::render("host1", Some((&[], &[odd])));
    assert!(
        text.contains(r#"tandem_vm_failovers_total{vm="a\"b\\c\nd"} 0"#),
        "{text}"
    );
    // Every family is declared once, before its samples.
    let mut declared = BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            assert!(
                declared.insert(rest.split(' ').next().unwrap().to_string()),
                "{l}"
            );
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(declared.contains(name), "{l} before its TYPE");
        }
    }
}

#[test]
fn the_day_two_routes_check_their_bodies_before_the_verbs() {
    let fake = Fake::default();
    for (method, target, body, status) in [
        ("POST", "/api/v1/vms/kvd/ft/schedule", "{", 400),
        (
            "POST",
            "/api/v1/vms/kvd/ft/schedule",
            r#"{"on":"x","when":1}"#,
            400,
        ),
        (
            "POST",
            "/api/v1/hosts/host1/check-logging",
            r#"{"to":"Bad"}"#,
            400,
        ),
        ("POST", "/api/v1/hosts/host1/check-logging", r#"{}"#, 400),
        (
            "POST",
            "/api/v1/hosts/Host1/check-logging",
            r#"{"to":"host2"}"#,
            400,
        ),
        ("GET", "/api/v1/vms/kvd/ft/schedule", "", 405),
    ] {
        let (s, v) = ask(&fake, method, target, body);
        assert_eq!(s, status, "{method} {target} {body}: {v}");
        assert!(!error_line(&v).is_empty());
    }
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[test]
fn the_charts_history_keeps_one_sample_per_period_over_five_minutes() {
    let ctx = crate::server::Ctx::detached();
    let mut off = view("off");
    off.log_bps = None;
    off.lag_ms = None;
    let vms = [view("kvd"), off];
    ctx.sample(1_000_000, &vms);
    // Within the period: not kept (the sampler and every open stream call it).
    ctx.sample(1_001_000, &vms);
    ctx.sample(1_002_000, &vms);
    let h = ctx.history();
    assert_eq!(
        h.iter().map(|s| s.at_ms).collect::<Vec<_>>(),
        [1_000_000, 1_002_000]
    );
    // Only VMs with a figure are in a sample.
    assert_eq!(h[0].log_bps.get("kvd"), Some(&250));
    assert_eq!(h[0].lag_ms.get("kvd"), Some(&3));
    assert!(!h[0].log_bps.contains_key("off") && !h[0].lag_ms.contains_key("off"));
    // Five minutes on, the first ones are gone.
    ctx.sample(1_301_500, &vms);
    let h = ctx.history();
    assert_eq!(
        h.iter().map(|s| s.at_ms).collect::<Vec<_>>(),
        [1_002_000, 1_301_500]
    );
}
