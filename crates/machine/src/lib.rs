//! The Tandem VM: a deterministic WebAssembly machine whose every nondeterministic input is
//! an event.
//!
//! A VM is one wasm32-wasi (preview 1) module instance, compiled by wasmtime under a
//! deterministic configuration ([`deterministic_engine`]). The guest reaches the world only
//! through WASI calls, served by [`wasi`]; each call whose result is not a pure function of
//! the guest's execution is an [`event::Event`], taken from the live host ([`host`]) and
//! appended to a log, or taken from a log during replay. This crate knows nothing of
//! replication: lockstep drives it through [`log::EventSource`] and [`log::EventSink`].

pub mod asyncify;
pub mod capture;
pub mod clock;
pub mod codecache;
pub mod control;
pub mod datastore;
pub mod dirty;
pub mod event;
pub mod failpoint;
pub mod fdtable;
pub mod host;
pub mod log;
pub mod migrate;
mod net;
pub mod notice;
pub mod port;
pub mod snapshot;
pub mod vm;
pub mod wasi;

pub use log::{End, EventSink, EventSource, Exit, LogError, LogHeader, LogReader, LogWriter, Tail};
pub use vm::{
    DEFAULT_MEMORY_LIMIT, GoLive, GuestSpec, Inputs, Machine, MachineError, PortFactory, RunReport,
    deterministic_engine, engine_fingerprint, hex, live_host, live_inputs, nic_tap, request_stop,
    stop_requested, wait_for_stop,
};

/// Helpers for this crate's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    /// An example guest, built by `make -C guests` (idempotent) if need be.
    pub fn guest(name: &str) -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(root.join("guests"))
            .output()
            .expect("make");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join("guests/build").join(name)
    }

    /// Live inputs for a VM without datastore or NIC whose console goes nowhere.
    pub fn quiet(spec: &crate::GuestSpec) -> crate::Inputs {
        crate::Inputs::Live {
            host: crate::vm::live_host(spec, None, None).unwrap(),
            sink: None,
            port: Box::new(crate::port::Direct {
                tap: None,
                console: false,
            }),
        }
    }
}
