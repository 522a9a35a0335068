//! The cluster store: etcd v3 (placeholder: helper A writes it).

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Unreachable(String),
}

#[derive(Clone, Debug)]
pub struct Store {}
