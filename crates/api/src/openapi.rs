//! The OpenAPI 3.0 document, generated once from the route table ([`crate::routes::ROUTES`])
//! and the handlers' own types (their `schemars` schemas): what is served is what is
//! documented, by construction. The tests check the other direction (every documented
//! route answers).

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use crate::routes::{Body, ROUTES, error_schema};

/// The document, as served at `/api/v1/openapi.json`.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        serde_json::to_string_pretty(&generate()).unwrap_or_else(|_| "{}".to_string())
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "The request is malformed or out of bounds.",
        401 => "Missing or wrong token (Authorization: Bearer TOKEN, or the dashboard's cookie).",
        403 => "A cookie-authenticated change without the dashboard's header.",
        404 => "No such VM or host.",
        409 => "The request conflicts with the VM's state.",
        500 => "An internal error on the agent.",
        503 => "The cluster store is unreachable.",
        _ => "Error.",
    }
}

/// A schema given inline, in OpenAPI 3.0's dialect (`nullable`, not a `null` type), as the
/// generator's own transforms make the referenced ones.
fn dialect(mut schema: schemars::Schema) -> Value {
    use schemars::transform::Transform;
    schemars::transform::AddNullable::default().transform(&mut schema);
    schema.to_value()
}

fn content(g: &mut schemars::SchemaGenerator, body: Body) -> Option<Value> {
    match body {
        Body::Empty => None,
        Body::Json(f) | Body::OptionalJson(f) => {
            Some(json!({ "application/json": { "schema": dialect(f(g)) } }))
        }
        Body::Text(mime, _) => Some(json!({ mime: { "schema": { "type": "string" } } })),
    }
}

/// The document as JSON.
pub fn generate() -> Value {
    let mut g = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut paths = Map::new();
    for r in ROUTES {
        let mut op = Map::new();
        op.insert("summary".into(), r.summary.into());
        op.insert("description".into(), r.description.into());
        op.insert(
            "operationId".into(),
            format!(
                "{}{}",
                r.method.to_lowercase(),
                r.path.replace(['/', '{', '}', '.', '-'], "_")
            )
            .into(),
        );
        if r.path.contains("{name}") {
            op.insert(
                "parameters".into(),
                json!([{
                    "name": "name",
                    "in": "path",
                    "required": true,
                    "description": "The VM's name: 1-63 lowercase letters, digits and '-', not starting with '-'.",
                    "schema": { "type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$" }
                }]),
            );
        }
        if let Some(c) = content(&mut g, r.request) {
            op.insert(
                "requestBody".into(),
                json!({
                    "required": matches!(r.request, Body::Json(_)),
                    "content": c
                }),
            );
        }
        let mut responses = Map::new();
        let (status, body) = r.ok;
        let description = match body {
            Body::Text(_, what) => what.to_string(),
            _ => "Success.".to_string(),
        };
        let mut ok = json!({ "description": description });
        if let Some(c) = content(&mut g, body) {
            ok["content"] = c;
        }
        responses.insert(status.to_string(), ok);
        for e in r.errors {
            let schema = dialect(error_schema(&mut g));
            responses.insert(
                e.to_string(),
                json!({
                    "description": reason(*e),
                    "content": { "application/json": { "schema": schema } }
                }),
            );
        }
        op.insert("responses".into(), Value::Object(responses));
        if !r.auth {
            op.insert("security".into(), json!([]));
        }
        let item = paths
            .entry(r.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = item {
            m.insert(r.method.to_lowercase(), Value::Object(op));
        }
    }
    // The event stream's data, described beside the rest.
    let _ = crate::routes::schema::<crate::bodies::Snapshot>(&mut g);
    // Taken with the OpenAPI 3.0 transforms applied (`nullable`, no type arrays).
    let schemas = Value::Object(g.take_definitions(true));
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Tandem cluster API",
            "version": "1",
            "description": "Every verb of a Tandem cluster (fault-tolerant WebAssembly VMs). \
                Every host agent serves it; a verb records desired state and returns, the HA \
                master and the agents carry it out. Errors are {\"error\": \"one line\"}. \
                Every route but /healthz, /metrics and signing in needs the cluster's token."
        },
        "security": [ { "bearer": [] }, { "cookie": [] } ],
        "paths": Value::Object(paths),
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer" },
                "cookie": { "type": "apiKey", "in": "cookie", "name": crate::server::COOKIE }
            }
        }
    })
}
