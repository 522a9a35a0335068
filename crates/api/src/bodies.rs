//! The bodies the handlers read and write, beside the cluster's views: each is the type the
//! handler (de)serialises *and* the type the OpenAPI document describes (through
//! `schemars`), so the document cannot drift from the wire.

use cluster::model::{ClusterView, HostView, VmView};
use cluster::timeline::TimelineEvent;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Every error answer: one line saying what went wrong.
#[derive(Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /healthz`.
#[derive(Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// The host whose agent answered.
    pub host: String,
    pub ok: bool,
}

/// `power-on`'s body (optional).
#[derive(Deserialize, Serialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerOnBody {
    /// Where the primary should start, if that host can take it.
    #[serde(default)]
    pub host: Option<String>,
}

/// `migrate-secondary`'s body.
#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The host the secondary moves to.
    pub to: String,
}

/// The other verbs take no body, or `{}`.
#[derive(Deserialize, Serialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

/// `POST /api/v1/session` (JSON; a form post sends `token=...`).
#[derive(Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignInBody {
    pub token: String,
}

/// The data of each server-sent event of `GET /api/v1/events`.
#[derive(Serialize, Deserialize, JsonSchema)]
pub struct Snapshot {
    /// When (Unix ms).
    pub at_ms: u64,
    /// The agent that serves this stream.
    pub served_by: String,
    pub cluster: ClusterView,
    pub hosts: Vec<HostView>,
    pub vms: Vec<VmView>,
    /// The most recent events, oldest first.
    pub timeline: Vec<TimelineEvent>,
    /// In a stream's first event only: what this agent sampled over the last
    /// [`crate::server::HISTORY_WINDOW`], oldest first, so that a page just opened draws
    /// its charts from minutes back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Sample>,
}

/// Each FT VM's logging bandwidth and secondary lag at one moment.
#[derive(Clone, Serialize, Deserialize, JsonSchema, Debug, PartialEq)]
pub struct Sample {
    /// When (Unix ms).
    pub at_ms: u64,
    /// VM name → logging-channel bandwidth, bytes per second.
    pub log_bps: std::collections::BTreeMap<String, u64>,
    /// VM name → the secondary's lag, ms.
    pub lag_ms: std::collections::BTreeMap<String, u64>,
}

impl Sample {
    pub fn of(at_ms: u64, vms: &[cluster::model::VmView]) -> Sample {
        Sample {
            at_ms,
            log_bps: vms
                .iter()
                .filter_map(|v| Some((v.name.clone(), v.log_bps?)))
                .collect(),
            lag_ms: vms
                .iter()
                .filter_map(|v| Some((v.name.clone(), v.lag_ms?)))
                .collect(),
        }
    }
}

pub type VmList = Vec<VmView>;
pub type HostList = Vec<HostView>;
pub type TimelineEvents = Vec<TimelineEvent>;
