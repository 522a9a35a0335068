//! Tandem's REST API (DESIGN.md, "The cluster", Interfaces): every verb of the cluster is
//! one HTTP call with a JSON body, described by an OpenAPI document the agents serve.
//!
//! - [`server`] serves the routes over `cluster::verbs::Verbs` (one per host agent);
//! - [`client`] calls them, trying a cluster's APIs in order (the CLI is its user);
//! - [`openapi`] generates the OpenAPI document from the route table and the handlers'
//!   types ([`bodies`], the cluster's views);
//! - [`metrics`] renders `/metrics` (Prometheus text format);
//! - the dashboard (`dashboard.html`, served at `/`) is one embedded page fed by the event
//!   stream.
//!
//! This crate sits above `cluster` (never the reverse) and owns the wire: the route table,
//! the HTTP parsing, the mapping of `cluster::ClusterError` to status codes and the
//! `{"error": "..."}` bodies.

pub mod bodies;
pub mod client;
pub mod metrics;
pub mod openapi;
pub mod server;

mod routes;

/// The server's errors (starting it; serving never fails as a whole).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the API's thread: {0}")]
    Thread(std::io::Error),
}

#[cfg(test)]
mod tests;
