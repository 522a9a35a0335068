//! The route table: every (method, path) the API serves, and the matching of a request's
//! method and path against it. The table is the one truth the OpenAPI document is checked
//! against (see the tests): a route added here and not documented fails a test.
//!
//! Invariant: a `{name}` segment that reaches a handler is a valid cluster name
//! (`cluster::model::valid_name`): it is checked here, before any store access.

use cluster::model::valid_name;

/// What a route does (its name, if any, travels beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Cluster,
    Hosts,
    Vms,
    CreateVm,
    GetVm,
    DestroyVm,
    PowerOn,
    PowerOff,
    Ft(FtKind),
    /// Host maintenance mode: enter (`true`) or exit.
    Maintenance(bool),
    /// FT on demand: set or clear the VM's schedule.
    FtSchedule,
    /// VM monitoring's settings of the VM.
    SetMonitoring,
    /// The seed's sizing formula for the VM.
    FtSizing,
    /// Measure the logging network from `{name}` (a host) to another.
    CheckLogging,
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

/// Every route: method, path pattern (`{name}` is a VM name), what it does.
pub const ROUTES: &[(&str, &str, Kind)] = &[
    ("GET", "/api/v1/cluster", Kind::Cluster),
    ("GET", "/api/v1/hosts", Kind::Hosts),
    ("GET", "/api/v1/vms", Kind::Vms),
    ("POST", "/api/v1/vms", Kind::CreateVm),
    ("GET", "/api/v1/vms/{name}", Kind::GetVm),
    ("DELETE", "/api/v1/vms/{name}", Kind::DestroyVm),
    ("POST", "/api/v1/vms/{name}/power-on", Kind::PowerOn),
    ("POST", "/api/v1/vms/{name}/power-off", Kind::PowerOff),
    (
        "POST",
        "/api/v1/vms/{name}/ft/turn-on",
        Kind::Ft(FtKind::TurnOn),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/ft/turn-off",
        Kind::Ft(FtKind::TurnOff),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/ft/disable",
        Kind::Ft(FtKind::Disable),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/ft/enable",
        Kind::Ft(FtKind::Enable),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/ft/test-failover",
        Kind::Ft(FtKind::TestFailover),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/ft/restart-secondary",
        Kind::Ft(FtKind::RestartSecondary),
    ),
    (
        "POST",
        "/api/v1/vms/{name}/ft/migrate-secondary",
        Kind::Ft(FtKind::MigrateSecondary),
    ),
    (
        "POST",
        "/api/v1/hosts/{name}/maintenance/enter",
        Kind::Maintenance(true),
    ),
    (
        "POST",
        "/api/v1/hosts/{name}/maintenance/exit",
        Kind::Maintenance(false),
    ),
    ("POST", "/api/v1/vms/{name}/ft/schedule", Kind::FtSchedule),
    ("GET", "/api/v1/vms/{name}/ft/sizing", Kind::FtSizing),
    ("POST", "/api/v1/vms/{name}/monitoring", Kind::SetMonitoring),
    (
        "POST",
        "/api/v1/hosts/{name}/check-logging",
        Kind::CheckLogging,
    ),
    ("GET", "/api/v1/openapi.json", Kind::OpenApi),
    ("GET", "/healthz", Kind::Healthz),
];

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
pub fn route(method: &str, target: &str) -> Result<(Kind, Option<String>), Miss> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let segments: Vec<&str> = path.split('/').collect();
    let mut allow: Vec<&str> = Vec::new();
    for (m, pattern, kind) in ROUTES {
        let Some(name) = match_pattern(pattern, &segments) else {
            continue;
        };
        if *m != method {
            allow.push(m);
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
        return Ok((*kind, name.map(str::to_string)));
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
