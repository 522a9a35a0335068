"""The reference oracle of tests/posix.rs and tests/conformance.rs: run a wasm32-wasi
program under wasmtime (its Python bindings) the way `tandem vm run` runs it -- DATASTORE
preopened as "/", argv[0] the wasm file's name, the given environment, stdout and stderr
inherited -- and exit with the guest's exit code.

usage: wasmtime_run.py WASM DATASTORE [--env K=V]... [--] [ARG]...
"""
import os
import sys

import wasmtime


def main() -> int:
    wasm, datastore, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    env = []
    while rest and rest[0] == "--env":
        k, _, v = rest[1].partition("=")
        env.append((k, v))
        rest = rest[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    cfg = wasmtime.WasiConfig()
    cfg.argv = [os.path.basename(wasm)] + rest
    cfg.env = env
    cfg.preopen_dir(datastore, "/")
    cfg.inherit_stdout()
    cfg.inherit_stderr()
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    store.set_wasi(cfg)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module.from_file(engine, wasm)
    instance = linker.instantiate(store, module)
    sys.stdout.flush()
    try:
        instance.exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        return e.code
    except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
        print(f"wasmtime_run: trap: {e}", file=sys.stderr)
        return 134
    return 0


if __name__ == "__main__":
    sys.exit(main())
