//! The verbs: every user action on the cluster, as the REST API calls them. A verb checks
//! its request, records desired state in the store (`vms/`, `kill/`) and returns; the
//! master and the agents carry it out. Nothing here runs a VM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ClusterError;
use crate::model::{ClusterView, HostView, Nic, Priority, VmView};
use crate::store::Store;

/// `POST /api/v1/vms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub wasm: PathBuf,
    /// Default: `<shared>/<name>/datastore` (created).
    #[serde(default)]
    pub datastore: Option<PathBuf>,
    #[serde(default)]
    pub nic: Option<Nic>,
    #[serde(default)]
    pub listen: Vec<u16>,
    /// Default 256.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub restart_priority: Option<Priority>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
}

/// The FT verbs (`POST /api/v1/vms/{name}/ft/{op}`).
#[derive(Clone, Debug, PartialEq)]
pub enum FtOp {
    TurnOn,
    TurnOff,
    Disable,
    Enable,
    TestFailover,
    RestartSecondary,
    MigrateSecondary { to: String },
}

/// The verbs, over one cluster store.
#[derive(Clone)]
pub struct Verbs {
    store: Store,
    /// The shared storage folder, as this host sees it.
    shared: PathBuf,
}

impl Verbs {
    pub fn new(store: Store, shared: PathBuf) -> Self {
        Verbs { store, shared }
    }
    pub fn status(&self) -> Result<ClusterView, ClusterError> {
        todo!("{:?}{:?}", self.shared, self.store)
    }
    pub fn hosts(&self) -> Result<Vec<HostView>, ClusterError> {
        todo!()
    }
    pub fn vms(&self) -> Result<Vec<VmView>, ClusterError> {
        todo!()
    }
    pub fn vm(&self, _name: &str) -> Result<VmView, ClusterError> {
        todo!()
    }
    pub fn create(&self, _req: CreateVm) -> Result<VmView, ClusterError> {
        todo!()
    }
    pub fn power_on(&self, _name: &str, _host: Option<String>) -> Result<VmView, ClusterError> {
        todo!()
    }
    pub fn power_off(&self, _name: &str) -> Result<VmView, ClusterError> {
        todo!()
    }
    pub fn destroy(&self, _name: &str) -> Result<(), ClusterError> {
        todo!()
    }
    pub fn ft(&self, _name: &str, _op: FtOp) -> Result<VmView, ClusterError> {
        todo!()
    }
}
