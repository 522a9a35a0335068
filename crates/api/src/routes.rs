//! The route table: every (method, path) the API serves, with what it needs (the token), its
//! bodies' types and its answers, and the matching of a request against it. The table is the
//! one truth both the dispatcher and the OpenAPI generator (`crate::openapi`) read: a route
//! cannot be served undocumented, and a test calls every documented route.
//!
//! Invariant: a `{name}` segment that reaches a handler is a valid cluster name
//! (`cluster::model::valid_name`): it is checked here, before any store access.

use crate::bodies::{
    ErrorBody, Health, HostList, MigrateBody, NoBody, PowerOnBody, SignInBody, TimelineEvents,
    VmList,
};
use cluster::logcheck::{CheckRequest, LogCheck};
use cluster::model::valid_name;
use cluster::model::{ClusterView, HostView, VmView};
use cluster::ops::{Monitoring, Sizing};
use cluster::verbs::{CreateVm, ScheduleRequest};

/// What a route does (its name, if any, travels beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dashboard,
    SignIn,
    SignOut,
    Events,
    Timeline,
    Metrics,
    Cluster,
    Hosts,
    Vms,
    CreateVm,
    GetVm,
    DestroyVm,
    PowerOn,
    PowerOff,
    Ft(FtKind),
    /// FT on demand: set or clear the VM's schedule.
    FtSchedule,
    /// VM monitoring's settings of the VM.
    SetMonitoring,
    /// The seed's sizing formula for the VM.
    FtSizing,
    /// Measure the logging network from `{name}` (a host) to another.
    CheckLogging,
    /// Host maintenance mode: enter (`true`) or exit.
    Maintenance(bool),
    OpenApi,
    Healthz,
}

/// The FT verbs, as named in their paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FtKind {
    TurnOn,
    TurnOff,
    Disable,
    Enable,
    TestFailover,
    RestartSecondary,
    MigrateSecondary,
}

/// A JSON schema of a type the handlers use (a `$ref` into the document's components).
pub type SchemaFn = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

/// The schema of `T`, as the OpenAPI generator references it.
pub fn schema<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// A request's or an answer's body.
#[derive(Clone, Copy)]
pub enum Body {
    /// No body.
    Empty,
    /// JSON of this type.
    Json(SchemaFn),
    /// JSON of this type, or nothing at all (an absent body is the type's default).
    OptionalJson(SchemaFn),
    /// Text of this media type (HTML, Prometheus text, an event stream): `.1` says what.
    Text(&'static str, &'static str),
}

/// One route: what the dispatcher matches and the OpenAPI generator documents, from the
/// same table (a route cannot be served undocumented, nor documented unserved).
pub struct Route {
    pub method: &'static str,
    /// `{name}` is a VM name.
    pub path: &'static str,
    pub kind: Kind,
    pub summary: &'static str,
    pub description: &'static str,
    /// Whether the token is required (every route but the health check, the metrics and
    /// signing in).
    pub auth: bool,
    pub request: Body,
    /// The success answer: status and body.
    pub ok: (u16, Body),
    /// The error statuses it may answer (each with an `ErrorBody`).
    pub errors: &'static [u16],
}

const STORE: &[u16] = &[401, 500, 503];
const VERB: &[u16] = &[400, 401, 404, 409, 500, 503];

const fn ft(
    path: &'static str,
    kind: FtKind,
    summary: &'static str,
    description: &'static str,
) -> Route {
    Route {
        method: "POST",
        path,
        kind: Kind::Ft(kind),
        summary,
        description,
        auth: true,
        request: Body::OptionalJson(schema::<NoBody>),
        ok: (200, Body::Json(schema::<VmView>)),
        errors: VERB,
    }
}

/// Every route.
pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/",
        kind: Kind::Dashboard,
        summary: "The dashboard",
        description: "The cluster's web page: hosts, VMs, FT status and lag, charts, the \
            timeline and every verb. Without a valid token (cookie or bearer) it answers 401 \
            with a sign-in form.",
        auth: true,
        request: Body::Empty,
        ok: (
            200,
            Body::Text("text/html", "The dashboard (HTML, CSS and JS in one page)."),
        ),
        errors: &[401],
    },
    Route {
        method: "POST",
        path: "/api/v1/session",
        kind: Kind::SignIn,
        summary: "Sign in",
        description: "Check the token and set it as an HttpOnly cookie for the dashboard. A \
            form post (token=...) is answered 303 to /, a JSON post 204.",
        auth: false,
        request: Body::Json(schema::<SignInBody>),
        ok: (204, Body::Empty),
        errors: &[400, 401],
    },
    Route {
        method: "DELETE",
        path: "/api/v1/session",
        kind: Kind::SignOut,
        summary: "Sign out",
        description: "Clear the dashboard's cookie.",
        auth: false,
        request: Body::Empty,
        ok: (204, Body::Empty),
        errors: &[],
    },
    Route {
        method: "GET",
        path: "/api/v1/events",
        kind: Kind::Events,
        summary: "Live state (server-sent events)",
        description: "A text/event-stream: every second an event whose data is a Snapshot \
            (JSON: the cluster, hosts, VMs and the recent timeline). The stream ends after \
            15 minutes; EventSource reconnects.",
        auth: true,
        request: Body::Empty,
        ok: (
            200,
            Body::Text("text/event-stream", "`data: <Snapshot JSON>` every second."),
        ),
        errors: &[401, 503],
    },
    Route {
        method: "GET",
        path: "/api/v1/timeline",
        kind: Kind::Timeline,
        summary: "The event timeline",
        description: "Failovers, re-protections, HA restarts, arbitration results and verbs \
            (with who asked), oldest first; the last 200 kept of a bounded log.",
        auth: true,
        request: Body::Empty,
        ok: (200, Body::Json(schema::<TimelineEvents>)),
        errors: STORE,
    },
    Route {
        method: "GET",
        path: "/metrics",
        kind: Kind::Metrics,
        summary: "Prometheus metrics",
        description: "The Prometheus text exposition format (0.0.4): per VM its FT state, \
            lag, events, log bytes, outputs held, failovers, re-protections; per host its \
            VMs; this agent's master role. No token needed.",
        auth: false,
        request: Body::Empty,
        ok: (
            200,
            Body::Text(
                "text/plain; version=0.0.4",
                "Prometheus text exposition format.",
            ),
        ),
        errors: &[],
    },
    Route {
        method: "GET",
        path: "/api/v1/cluster",
        kind: Kind::Cluster,
        summary: "The cluster's state",
        description: "Its master, how many hosts and VMs, how many VMs are protected.",
        auth: true,
        request: Body::Empty,
        ok: (200, Body::Json(schema::<ClusterView>)),
        errors: STORE,
    },
    Route {
        method: "GET",
        path: "/api/v1/hosts",
        kind: Kind::Hosts,
        summary: "The hosts",
        description: "Every host whose agent holds its lease.",
        auth: true,
        request: Body::Empty,
        ok: (200, Body::Json(schema::<HostList>)),
        errors: STORE,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms",
        kind: Kind::Vms,
        summary: "The VMs",
        description: "Every VM with its power state, FT status, hosts and lag.",
        auth: true,
        request: Body::Empty,
        ok: (200, Body::Json(schema::<VmList>)),
        errors: STORE,
    },
    Route {
        method: "POST",
        path: "/api/v1/vms",
        kind: Kind::CreateVm,
        summary: "Create a VM",
        description: "Record a VM (powered off, FT off). Unknown fields are refused.",
        auth: true,
        request: Body::Json(schema::<CreateVm>),
        ok: (201, Body::Json(schema::<VmView>)),
        errors: VERB,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{name}",
        kind: Kind::GetVm,
        summary: "One VM",
        description: "The VM as `vm show` presents it.",
        auth: true,
        request: Body::Empty,
        ok: (200, Body::Json(schema::<VmView>)),
        errors: &[400, 401, 404, 500, 503],
    },
    Route {
        method: "DELETE",
        path: "/api/v1/vms/{name}",
        kind: Kind::DestroyVm,
        summary: "Destroy a VM",
        description: "Forget a powered-off VM (its datastore is kept).",
        auth: true,
        request: Body::Empty,
        ok: (204, Body::Empty),
        errors: VERB,
    },
    Route {
        method: "POST",
        path: "/api/v1/vms/{name}/power-on",
        kind: Kind::PowerOn,
        summary: "Power on",
        description: "Start the VM (on `host` if given and it can take it).",
        auth: true,
        request: Body::OptionalJson(schema::<PowerOnBody>),
        ok: (200, Body::Json(schema::<VmView>)),
        errors: VERB,
    },
    Route {
        method: "POST",
        path: "/api/v1/vms/{name}/power-off",
        kind: Kind::PowerOff,
        summary: "Power off",
        description: "Stop the VM and its secondary.",
        auth: true,
        request: Body::OptionalJson(schema::<NoBody>),
        ok: (200, Body::Json(schema::<VmView>)),
        errors: VERB,
    },
    ft(
        "/api/v1/vms/{name}/ft/turn-on",
        FtKind::TurnOn,
        "Turn On Fault Tolerance",
        "Place a secondary on another host and keep it in lockstep.",
    ),
    ft(
        "/api/v1/vms/{name}/ft/turn-off",
        FtKind::TurnOff,
        "Turn Off Fault Tolerance",
        "Remove the secondary and its placement.",
    ),
    ft(
        "/api/v1/vms/{name}/ft/disable",
        FtKind::Disable,
        "Disable Fault Tolerance",
        "Stop the secondary, keep its placement.",
    ),
    ft(
        "/api/v1/vms/{name}/ft/enable",
        FtKind::Enable,
        "Enable Fault Tolerance",
        "Start the parked secondary again.",
    ),
    ft(
        "/api/v1/vms/{name}/ft/test-failover",
        FtKind::TestFailover,
        "Test Failover",
        "Kill the primary: the secondary goes live.",
    ),
    ft(
        "/api/v1/vms/{name}/ft/restart-secondary",
        FtKind::RestartSecondary,
        "Test Restart Secondary",
        "Kill the secondary: a new one is started.",
    ),
    Route {
        method: "POST",
        path: "/api/v1/vms/{name}/ft/migrate-secondary",
        kind: Kind::Ft(FtKind::MigrateSecondary),
        summary: "Migrate Secondary",
        description: "Move the secondary to host `to`.",
        auth: true,
        request: Body::Json(schema::<MigrateBody>),
        ok: (200, Body::Json(schema::<VmView>)),
        errors: VERB,
    },
    Route {
        method: "POST",
        path: "/api/v1/vms/{name}/ft/schedule",
        kind: Kind::FtSchedule,
        summary: "FT on demand: set or clear the VM's FT schedule",
        description: "While a schedule is set, the master turns the VM's FT on and off at its times (`ft turn-on/off/enable/disable` are refused until it is cleared). SPEC: a weekly window `DAYS HH:MM-HH:MM` (FT on inside it; no `off`), or instants for `on` and `off`: `DAYS HH:MM`, or cron with 5 fields (MIN HOUR DOM MON DOW) or 6 (a seconds field first). Times are in `tz`: UTC (default), UTC+HH:MM, UTC-HH:MM, or host (the master's time zone). Clearing keeps FT as the schedule had it.",
        auth: true,
        request: Body::Json(schema::<ScheduleRequest>),
        ok: (200, Body::Json(schema::<VmView>)),
        errors: VERB,
    },
    Route {
        method: "GET",
        path: "/api/v1/vms/{name}/ft/sizing",
        kind: Kind::FtSizing,
        summary: "FT sizing: the logging bandwidth the VM needs",
        description: "The seed's formula, (average disk reads MB/s x 8 + average network input Mbit/s) x 1.2, from the live copy's own counters (averaged since it went live), beside the logging channel's measured rate and the pair's last `check-logging` measurement. 409 when the VM has no live copy.",
        auth: true,
        request: Body::Empty,
        ok: (200, Body::Json(schema::<Sizing>)),
        errors: VERB,
    },
    Route {
        method: "POST",
        path: "/api/v1/vms/{name}/monitoring",
        kind: Kind::SetMonitoring,
        summary: "VM monitoring's settings",
        description: "A guest that traps or exits with a non-zero code is reset (a fresh power-on from its datastore) at most `max_resets` times within `window_secs`, then left off with the reason; with `heartbeat_secs`, the VM is also reset when its guest executes no event for that long. The resets already counted stay.",
        auth: true,
        request: Body::Json(schema::<Monitoring>),
        ok: (200, Body::Json(schema::<VmView>)),
        errors: VERB,
    },
    Route {
        method: "POST",
        path: "/api/v1/hosts/{name}/check-logging",
        kind: Kind::CheckLogging,
        summary: "Measure the logging network from this host to another",
        description: "Round trips of 64-byte messages (min, median, p99) and a bulk send (throughput) from host `name` to host `to` on the logging network, against the check service every agent runs on its logging address (port 7068; one measurement at a time). Must be sent to host `name`'s own API (409 otherwise, naming it). The result is recorded for `ft sizing` and `ft turn-on`'s warning.",
        auth: true,
        request: Body::Json(schema::<CheckRequest>),
        ok: (200, Body::Json(schema::<LogCheck>)),
        errors: VERB,
    },
    Route {
        method: "POST",
        path: "/api/v1/hosts/{name}/maintenance/enter",
        kind: Kind::Maintenance(true),
        summary: "Enter maintenance mode",
        description: "The host takes nothing more; the master moves its VMs: secondaries to \
            other hosts, protected primaries by a planned switch to their secondary (then \
            re-protected elsewhere), VMs without FT through a secondary placed for the move, \
            pairs no host of their version can keep protected to hosts of another version. 409 \
            with every reason when the other hosts cannot take them or an FT VM on it is not \
            protected.",
        auth: true,
        request: Body::OptionalJson(schema::<NoBody>),
        ok: (200, Body::Json(schema::<HostView>)),
        errors: VERB,
    },
    Route {
        method: "POST",
        path: "/api/v1/hosts/{name}/maintenance/exit",
        kind: Kind::Maintenance(false),
        summary: "Exit maintenance mode",
        description: "The host takes copies again.",
        auth: true,
        request: Body::OptionalJson(schema::<NoBody>),
        ok: (200, Body::Json(schema::<HostView>)),
        errors: VERB,
    },
    Route {
        method: "GET",
        path: "/api/v1/openapi.json",
        kind: Kind::OpenApi,
        summary: "This document",
        description: "The OpenAPI 3.0 document, generated from the route table and the \
            handlers' types.",
        auth: true,
        request: Body::Empty,
        ok: (200, Body::Text("application/json", "The OpenAPI document.")),
        errors: &[401],
    },
    Route {
        method: "GET",
        path: "/healthz",
        kind: Kind::Healthz,
        summary: "Health",
        description: "The agent answers (no token needed).",
        auth: false,
        request: Body::Empty,
        ok: (200, Body::Json(schema::<Health>)),
        errors: &[],
    },
];

/// The error body's schema (every error answer).
pub fn error_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schema::<ErrorBody>(g)
}

/// Why a request matches no route: its status and one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Miss {
    /// 404: no such path.
    NotFound(String),
    /// 405: the path exists, not with this method; the methods it has.
    Method { allow: String, message: String },
    /// 400: the path's name is not a valid name.
    BadName(String),
}

/// The route a request takes, and the `{name}` in its path (checked). The query string, if
/// any, is ignored.
pub fn route(method: &str, target: &str) -> Result<(&'static Route, Option<String>), Miss> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let segments: Vec<&str> = path.split('/').collect();
    let mut allow: Vec<&str> = Vec::new();
    for r in ROUTES {
        let Some(name) = match_pattern(r.path, &segments) else {
            continue;
        };
        if r.method != method {
            allow.push(r.method);
            continue;
        }
        if let Some(n) = name
            && !valid_name(n)
        {
            return Err(Miss::BadName(format!(
                "bad VM name {:?}: use 1-63 lowercase letters, digits and '-', not \
                     starting with '-'",
                clip(n)
            )));
        }
        return Ok((r, name.map(str::to_string)));
    }
    if allow.is_empty() {
        Err(Miss::NotFound(format!("no route {}", clip(path))))
    } else {
        Err(Miss::Method {
            allow: allow.join(", "),
            message: format!(
                "method {} not allowed on {} (allowed: {})",
                clip(method),
                clip(path),
                allow.join(", ")
            ),
        })
    }
}

/// The `{name}` segment if the path's segments match the pattern (`Some(None)` when the
/// pattern has no name).
fn match_pattern<'a>(pattern: &str, segments: &[&'a str]) -> Option<Option<&'a str>> {
    let parts: Vec<&str> = pattern.split('/').collect();
    if parts.len() != segments.len() {
        return None;
    }
    let mut name = None;
    for (p, s) in parts.iter().zip(segments) {
        if *p == "{name}" {
            name = Some(*s);
        } else if p != s {
            return None;
        }
    }
    Some(name)
}

/// A piece of the request quoted in an error: bounded, so that an error stays one short
/// line whatever the request.
pub fn clip(s: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = s.chars().take(MAX).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, target: &str) -> Result<(Kind, Option<String>), Miss> {
        super::route(method, target).map(|(r, n)| (r.kind, n))
    }

    #[test]
    fn routes_match_with_their_names() {
        assert_eq!(route("GET", "/api/v1/vms"), Ok((Kind::Vms, None)));
        assert_eq!(route("POST", "/api/v1/vms"), Ok((Kind::CreateVm, None)));
        assert_eq!(
            route("GET", "/api/v1/vms/kvd?x=1"),
            Ok((Kind::GetVm, Some("kvd".into())))
        );
        assert_eq!(
            route("POST", "/api/v1/vms/web-1/ft/migrate-secondary"),
            Ok((Kind::Ft(FtKind::MigrateSecondary), Some("web-1".into())))
        );
        assert_eq!(route("GET", "/healthz"), Ok((Kind::Healthz, None)));
    }

    #[test]
    fn misses_say_why() {
        assert!(matches!(
            route("GET", "/api/v1/nope"),
            Err(Miss::NotFound(_))
        ));
        assert!(matches!(
            route("GET", "/api/v1/vms/"),
            Err(Miss::BadName(_))
        ));
        assert!(matches!(
            route("GET", "/api/v1/vms/kvd/"),
            Err(Miss::NotFound(_))
        ));
        assert!(matches!(route("GET", ""), Err(Miss::NotFound(_))));
        match route("PUT", "/api/v1/vms/kvd") {
            Err(Miss::Method { allow, .. }) => assert_eq!(allow, "GET, DELETE"),
            other => panic!("{other:?}"),
        }
        for bad in ["KVD", "a%2Fb", "..", "-x", "a_b", &"x".repeat(64)] {
            assert!(
                matches!(
                    route("GET", &format!("/api/v1/vms/{bad}")),
                    Err(Miss::BadName(_))
                ),
                "{bad}"
            );
        }
        // A bad name is refused whatever the verb.
        assert!(matches!(
            route("POST", "/api/v1/vms/Bad/ft/turn-on"),
            Err(Miss::BadName(_))
        ));
    }

    #[test]
    fn clipped_quotes_are_one_short_line() {
        let c = clip(&format!("a\r\nb{}", "x".repeat(500)));
        assert!(!c.contains('\n') && c.chars().count() <= 81, "{c}");
    }
}
