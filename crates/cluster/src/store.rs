//! The cluster store: etcd v3 (placeholder signatures: helper A writes it).
#![allow(unused)]
use serde::{Serialize, de::DeserializeOwned};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Unreachable(String),
    #[error("lease expired")]
    LeaseExpired,
    #[error("{0}")]
    Decode(String),
}

pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

#[derive(Clone, Debug)]
pub struct Store {}
impl Store {
    pub fn connect(endpoints: &str) -> Result<Store, StoreError> {
        todo!()
    }
    pub fn ping(&self) -> Result<(), StoreError> {
        todo!()
    }
    pub fn get(&self, key: &str) -> Result<Option<Kv>, StoreError> {
        todo!()
    }
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<Kv>, StoreError> {
        todo!()
    }
    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), StoreError> {
        todo!()
    }
    pub fn create(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<bool, StoreError> {
        todo!()
    }
    pub fn put_if(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
        lease: Option<i64>,
    ) -> Result<bool, StoreError> {
        todo!()
    }
    pub fn delete(&self, key: &str) -> Result<bool, StoreError> {
        todo!()
    }
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        todo!()
    }
    pub fn grant(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        todo!()
    }
    pub fn keepalive(&self, lease: i64) -> Result<i64, StoreError> {
        todo!()
    }
    pub fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        todo!()
    }
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, i64)>, StoreError> {
        todo!()
    }
    pub fn put_json<T: Serialize>(
        &self,
        key: &str,
        v: &T,
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        todo!()
    }
    pub fn prefix_json<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        todo!()
    }
}
