//! Tandem's cluster (DESIGN.md, "The cluster"): the state in etcd ([`store`], [`model`]),
//! the host agent that runs a host's VM copies ([`agent`]), the HA master that places and
//! re-protects them ([`master`], [`placement`]), and the verbs users call ([`verbs`]).
//! No HTTP server here: `crates/api` serves the verbs.

pub mod agent;
pub mod fence;
pub mod http;
pub mod logcheck;
pub mod master;
pub mod model;
pub mod ops;
mod ops_verbs;
pub mod placement;
pub mod schedule;
pub mod store;
pub mod timeline;
pub mod verbs;

/// The cluster's errors, by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The request names something that does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or out of bounds (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The request conflicts with the VM's state or a requirement is not met (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The cluster store cannot be reached or answered badly (HTTP 503).
    #[error("cluster store: {0}")]
    Store(#[from] store::StoreError),
    /// Anything else on this host (HTTP 500).
    #[error("{0}")]
    Internal(String),
}
