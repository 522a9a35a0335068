//! WASI preview 1 conformance: programs built from C (`tests/c/conf_*.c`) call every
//! preview 1 function that wasi-libc and Rust std programs use, raw, and print what they
//! observe. Each runs under `tandem vm run` and under wasmtime (the reference, see
//! `tests/c/harness.rs`) in fresh, identical datastores; stdout, exit code and the file tree
//! left behind must be the same.

mod common;
#[path = "c/harness.rs"]
mod harness;

use harness::{Target, build, differences, snapshot, tandem, wasmtime};

/// Run `tests/c/NAME.c` under Tandem and wasmtime (in parallel) and compare.
fn conforms(name: &str, args: &[&str], env: &[&str], want_code: i32) {
    let wasm = build(name, Target::Wasm);
    let dir = tempfile::tempdir().unwrap();
    let (w_ds, t_ds) = (dir.path().join("wasmtime"), dir.path().join("tandem"));
    std::fs::create_dir(&w_ds).unwrap();
    std::fs::create_dir(&t_ds).unwrap();
    let (got, want) = std::thread::scope(|sc| {
        let w = sc.spawn(|| wasmtime(&wasm, &w_ds, args, env));
        let t = tandem(&wasm, &t_ds, args, env);
        (t, w.join().unwrap())
    });
    assert_eq!(
        want.code, want_code,
        "the wasmtime reference run of {name} did not end as expected: {}{}",
        want.stdout, want.stderr
    );
    let (w, t) = (snapshot(&w_ds, None), snapshot(&t_ds, None));
    let diff = differences("wasmtime", &want, &got, Some((&w, &t)));
    assert!(
        diff.is_empty(),
        "{name}: tandem differs from wasmtime\n{diff}"
    );
}

#[test]
fn file_and_path_calls_behave_as_in_wasmtime() {
    conforms("conf_fs", &[], &[], 0);
}

#[test]
fn args_environ_clocks_random_poll_and_exit_behave_as_in_wasmtime() {
    conforms(
        "conf_misc",
        &["one", "two words", ""],
        &["A=1", "EMPTY="],
        7,
    );
}
