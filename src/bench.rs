//! `tandem bench ...`: performance measured as ratios, side by side in one run.
//!
//! Each ratio alternates its two sides round after round (A B A B ...) so that machine
//! noise hits both alike, and takes each side's best round.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use machine::{
    DEFAULT_MEMORY_LIMIT, EventSink, GuestSpec, Inputs, LogWriter, Machine, live_inputs,
};
use serde::Serialize;

use crate::client::in_netns;
use crate::guests;
use crate::lab::{LabGuard, VmProcess};

#[derive(clap::Args)]
pub struct BenchFlags {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// A small, fast run (fewer rounds, less work): for smoke tests, not for figures.
    #[arg(long)]
    quick: bool,
    /// Rounds per side (default: 5 for vm, 3 for ft; fewer with --quick; at most 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
}

impl BenchFlags {
    fn rounds(&self, full: u32, quick: u32) -> u32 {
        self.rounds.unwrap_or(if self.quick { quick } else { full })
    }
}

#[derive(clap::Args)]
pub struct VmBenchArgs {
    #[command(flatten)]
    flags: BenchFlags,
}

#[derive(Serialize)]
struct VmBench {
    #[serde(flatten)]
    net: Option<NetBench>,
    /// Why the network rows are missing, when they are.
    net_skipped: Option<String>,
    /// Throughput of the file- and clock-heavy guest recorded ÷ unrecorded (goal ≥ 0.95).
    record_ratio: f64,
    /// Speed of the CPU-bound guest under Tandem ÷ the same C compiled native (goal ≥ 0.7).
    wasm_native_ratio: f64,
    io_unrecorded_s: f64,
    io_recorded_s: f64,
    io_events: u64,
    /// What recording adds per event, in absolute terms: (recorded − unrecorded time) ÷
    /// events. The ratio alone falls when the VM itself gets faster. Not clamped: a
    /// negative figure says the difference is within the run-to-run noise.
    record_us_per_event: f64,
    io_log_bytes: u64,
    cpu_wasm_s: f64,
    cpu_native_s: f64,
    /// Speed of the CPU-bound guest instrumented for snapshots (Asyncify) ÷ plain
    /// (goal ≥ 0.9).
    asyncify_ratio: f64,
    cpu_instrumented_s: f64,
    /// Pause to snapshot a VM, per GiB of (incompressible) guest memory: capture,
    /// compress, write and fsync, and resume.
    snapshot_ms_per_gib: f64,
    snapshot_memory_mib: u64,
    snapshot_pause_ms: f64,
    snapshot_bytes: u64,
    /// Start-up of a large guest (`bigcode.wasm`, `start_module_bytes` of wasm): a
    /// `tandem vm run` process from spawn to exit (the guest's own work takes
    /// milliseconds), its compiled-code cache empty (goal: ≤ `wasmtime_compile_s`)...
    start_first_s: f64,
    /// ...and again, the cache holding its code (goal ≤ 1 s).
    start_cached_s: f64,
    /// wasmtime compiling the same module under its default configuration (its Python
    /// bindings, `target/wasmtime-venv`), timed around the compile alone, same rounds.
    wasmtime_compile_s: Option<f64>,
    /// Why `wasmtime_compile_s` is missing, when it is.
    wasmtime_skipped: Option<String>,
    start_module_bytes: u64,
    rounds: u32,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Alternate `a` and `b` for `rounds` rounds; the best time of each.
fn side_by_side(
    rounds: u32,
    mut a: impl FnMut() -> Result<Duration>,
    mut b: impl FnMut() -> Result<Duration>,
) -> Result<(Duration, Duration)> {
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        best_a = best_a.min(a()?);
        best_b = best_b.min(b()?);
    }
    Ok((best_a, best_b))
}

use crate::demo::not_interrupted;

/// `thread::sleep`, in steps, ending early (an error) on an interrupt.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        not_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

fn progress(json: bool, msg: &str) {
    if !json {
        eprintln!("bench: {msg}");
    }
}

pub fn vm(args: &VmBenchArgs) -> Result<u8> {
    let rounds = args.flags.rounds(5, 2);
    let (io_rounds, cpu_scale) = if args.flags.quick {
        ("2000", "1")
    } else {
        ("40000", "40")
    };
    let work = tempfile::tempdir().context("creating a scratch folder")?;

    progress(
        args.flags.json,
        "file- and clock-heavy guest: unrecorded vs recorded",
    );
    let io = Machine::load(&guests::file("bench_io.wasm")?)?;
    let spec = GuestSpec {
        args: vec!["bench_io".into(), io_rounds.into()],
        env: vec![],
        datastore: true,
        memory_limit: DEFAULT_MEMORY_LIMIT,
        nic: None,
        listen: vec![],
    };
    let log = work.path().join("bench_io.tlog");
    let mut io_events = 0;
    let run_io = |record: bool| -> Result<(Duration, u64)> {
        let sink = if record {
            Some(Box::new(LogWriter::create(&log, &io.log_header(&spec))?)
                as Box<dyn EventSink + Send>)
        } else {
            None
        };
        let inputs = quiet(live_inputs(&spec, Some(work.path()), None, sink)?);
        let start = Instant::now();
        let report = io.run(spec.clone(), inputs)?;
        let took = start.elapsed();
        if report.exit != machine::Exit::Code(0) {
            bail!("bench_io ended with {}", report.exit);
        }
        Ok((took, report.events))
    };
    let (io_plain, io_rec) = side_by_side(
        rounds,
        || run_io(false).map(|r| r.0),
        || {
            let (t, n) = run_io(true)?;
            io_events = n;
            Ok(t)
        },
    )?;
    let io_log_bytes = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);

    progress(
        args.flags.json,
        "CPU-bound guest: wasm under Tandem vs native",
    );
    let cpu = Machine::load(&guests::file("bench_cpu.wasm")?)?;
    let native = guests::file("bench_cpu.native")?;
    let cpu_spec = GuestSpec {
        args: vec!["bench_cpu".into(), cpu_scale.into()],
        env: vec![],
        datastore: false,
        memory_limit: DEFAULT_MEMORY_LIMIT,
        nic: None,
        listen: vec![],
    };
    let (cpu_wasm, cpu_native) = side_by_side(
        rounds,
        || {
            let inputs = quiet(live_inputs(&cpu_spec, None, None, None)?);
            let start = Instant::now();
            let report = cpu.run(cpu_spec.clone(), inputs)?;
            let took = start.elapsed();
            if report.exit != machine::Exit::Code(0) {
                bail!("bench_cpu.wasm ended with {}", report.exit);
            }
            Ok(took)
        },
        || run_native(&native, cpu_scale),
    )?;

    progress(
        args.flags.json,
        "CPU-bound guest: instrumented for snapshots vs plain; a snapshot's pause",
    );
    let snap = snapshot_rows(&cpu, &cpu_spec, rounds, args.flags.quick, work.path())?;

    progress(
        args.flags.json,
        "start-up of a large guest: empty code cache, cached, wasmtime's own compile",
    );
    let start = start_rows(rounds, work.path())?;

    progress(
        args.flags.json,
        "network: bulk TCP into a VM vs host loopback; kvd under redis-benchmark",
    );
    let (net, net_skipped) = match net_rows(args.flags.quick, rounds) {
        Ok(n) => (Some(n), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let result = VmBench {
        net,
        net_skipped,
        record_ratio: secs(io_plain) / secs(io_rec),
        wasm_native_ratio: secs(cpu_native) / secs(cpu_wasm),
        io_unrecorded_s: secs(io_plain),
        io_recorded_s: secs(io_rec),
        io_events,
        record_us_per_event: (secs(io_rec) - secs(io_plain)) * 1e6 / io_events.max(1) as f64,
        io_log_bytes,
        cpu_wasm_s: secs(cpu_wasm),
        cpu_native_s: secs(cpu_native),
        asyncify_ratio: snap.asyncify_ratio,
        cpu_instrumented_s: snap.cpu_instrumented_s,
        snapshot_ms_per_gib: snap.pause_ms / (snap.memory_mib as f64 / 1024.0),
        snapshot_memory_mib: snap.memory_mib,
        snapshot_pause_ms: snap.pause_ms,
        snapshot_bytes: snap.bytes,
        start_first_s: start.first_s,
        start_cached_s: start.cached_s,
        wasmtime_compile_s: start.wasmtime_s,
        wasmtime_skipped: start.wasmtime_skipped,
        start_module_bytes: start.module_bytes,
        rounds,
    };
    not_interrupted()?;
    if args.flags.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_vm_table(&result);
    }
    Ok(0)
}

struct SnapRows {
    asyncify_ratio: f64,
    cpu_instrumented_s: f64,
    memory_mib: u64,
    pause_ms: f64,
    bytes: u64,
}

/// Asyncify's cost (the CPU-bound guest plain and instrumented, alternated) and the pause
/// of a snapshot of a guest whose memory is full of incompressible bytes (the best of
/// `rounds`), taken at its first event after filling it.
fn snapshot_rows(
    cpu: &Machine,
    cpu_spec: &GuestSpec,
    rounds: u32,
    quick: bool,
    work: &Path,
) -> Result<SnapRows> {
    use machine::capture::{Plan, SnapMachine};
    let instrumented = SnapMachine::load(&guests::file("bench_cpu.wasm")?)?;
    let (plain, inst) = side_by_side(
        rounds,
        || {
            let inputs = quiet(live_inputs(cpu_spec, None, None, None)?);
            let start = Instant::now();
            let report = cpu.run(cpu_spec.clone(), inputs)?;
            let took = start.elapsed();
            if report.exit != machine::Exit::Code(0) {
                bail!("bench_cpu.wasm ended with {}", report.exit);
            }
            Ok(took)
        },
        || {
            let inputs = quiet(live_inputs(cpu_spec, None, None, None)?);
            let start = Instant::now();
            let ran = instrumented.run(cpu_spec.clone(), inputs, None)?;
            let took = start.elapsed();
            if ran.report.exit != machine::Exit::Code(0) {
                bail!(
                    "bench_cpu.wasm (instrumented) ended with {}",
                    ran.report.exit
                );
            }
            Ok(took)
        },
    )?;
    let memory_mib: u64 = if quick { 32 } else { 512 };
    let fill = SnapMachine::load(&guests::file("memfill.wasm")?)?;
    let spec = GuestSpec {
        args: vec!["memfill".into(), memory_mib.to_string()],
        env: vec![],
        datastore: false,
        memory_limit: DEFAULT_MEMORY_LIMIT,
        nic: None,
        listen: vec![],
    };
    let to = work.join("bench.snap");
    let (mut best, mut bytes) = (f64::MAX, 0);
    for _ in 0..rounds {
        let inputs = quiet(live_inputs(&spec, None, None, None)?);
        // Event 0 is the clock read after the fill (memfill makes no call before it).
        let plan = Plan {
            at: 0,
            to: to.clone(),
            stop: false,
        };
        let ran = fill.run(spec.clone(), inputs, Some(plan))?;
        if ran.report.exit != machine::Exit::Code(0) {
            bail!("memfill ended with {}", ran.report.exit);
        }
        let taken = ran.taken.context("memfill took no snapshot")?;
        best = best.min(taken.pause_ms);
        bytes = taken.bytes;
    }
    let _ = std::fs::remove_file(&to);
    Ok(SnapRows {
        asyncify_ratio: secs(plain) / secs(inst),
        cpu_instrumented_s: secs(inst),
        memory_mib,
        pause_ms: best,
        bytes,
    })
}

struct StartRows {
    first_s: f64,
    cached_s: f64,
    wasmtime_s: Option<f64>,
    wasmtime_skipped: Option<String>,
    module_bytes: u64,
}

/// Start-up of the large guest, round after round: a `tandem vm run` with a fresh (empty)
/// compiled-code cache, the same again with the cache it filled, and wasmtime's default
/// compile of the module; the best of each. Every run's output is checked.
fn start_rows(rounds: u32, work: &Path) -> Result<StartRows> {
    let wasm = guests::file("bigcode.wasm")?;
    let expected = std::fs::read_to_string(guests::file("bigcode.expected")?)?;
    let module_bytes = std::fs::metadata(&wasm)?.len();
    let exe = std::env::current_exe().context("finding this executable")?;
    let python = wasmtime_python();
    let mut wasmtime_skipped = python
        .is_none()
        .then(|| "wasmtime's Python bindings are not installed (scripts/setup)".to_string());
    let (mut first, mut cached, mut reference) = (Duration::MAX, Duration::MAX, Duration::MAX);
    // The snapshot rows leave hundreds of MiB of dirty page cache behind: written back
    // during these rows, it would throttle the cache entry's write and share the cores.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    for round in 0..rounds {
        not_interrupted()?;
        let cache = work.join(format!("code-cache-{round}"));
        for slot in [&mut first, &mut cached] {
            let begun = Instant::now();
            let out = Command::new(&exe)
                .arg("--code-cache")
                .arg(&cache)
                .args(["vm", "run", "--wasm"])
                .arg(&wasm)
                .env("TANDEM_LOG", "warn")
                .output()
                .context("running tandem vm run")?;
            let took = begun.elapsed();
            if !out.status.success() || String::from_utf8_lossy(&out.stdout) != expected {
                bail!(
                    "bigcode.wasm ran wrong ({}): {:?} / {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            *slot = (*slot).min(took);
        }
        let _ = std::fs::remove_dir_all(&cache);
        if let (Some(py), None) = (&python, &wasmtime_skipped) {
            match wasmtime_compile(py, &wasm) {
                Ok(t) => reference = reference.min(t),
                Err(e) => wasmtime_skipped = Some(format!("{e:#}")),
            }
        }
    }
    Ok(StartRows {
        first_s: secs(first),
        cached_s: secs(cached),
        wasmtime_s: wasmtime_skipped.is_none().then(|| secs(reference)),
        wasmtime_skipped,
        module_bytes,
    })
}

/// The Python that has wasmtime's bindings: `$TANDEM_WASMTIME_PYTHON`, else
/// `target/wasmtime-venv` beside this executable's `target/<profile>/`, or in the
/// workspace the guests were found in.
fn wasmtime_python() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("TANDEM_WASMTIME_PYTHON") {
        return Some(p.into());
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("wasmtime-venv/bin/python")));
    let in_workspace = guests::dir()
        .ok()
        .map(|d| d.join("../../target/wasmtime-venv/bin/python"));
    beside_exe
        .into_iter()
        .chain(in_workspace)
        .find(|p| p.is_file())
}

/// wasmtime's compile of `wasm` under its default configuration (a fresh engine), timed
/// around `wasmtime.Module(engine, bytes)` alone.
fn wasmtime_compile(python: &Path, wasm: &Path) -> Result<Duration> {
    const SCRIPT: &str = "import sys, time, wasmtime\n\
        b = open(sys.argv[1], 'rb').read()\n\
        e = wasmtime.Engine()\n\
        t = time.perf_counter()\n\
        wasmtime.Module(e, b)\n\
        print(time.perf_counter() - t)\n";
    let out = Command::new(python)
        .args(["-c", SCRIPT])
        .arg(wasm)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "wasmtime's compile failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let secs: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("reading wasmtime's compile time")?;
    Ok(Duration::from_secs_f64(secs))
}

/// The guests' console output is not the bench's: keep it off the table.
fn quiet(mut inputs: Inputs) -> Inputs {
    if let Inputs::Live { port, host, .. } = &mut inputs {
        let _ = host;
        *port = Box::new(machine::port::Direct {
            tap: None,
            console: false,
        });
    }
    inputs
}

fn run_native(exe: &Path, scale: &str) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new(exe)
        .arg(scale)
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("{} failed: {}", exe.display(), out.status);
    }
    Ok(took)
}

fn print_vm_table(r: &VmBench) {
    println!(
        "tandem bench vm  (best of {} rounds per side, sides alternated)",
        r.rounds
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8} {:>6}",
        "measure", "A", "B", "A/B", "goal"
    );
    println!(
        "{:<34} {:>11.3}s {:>11.3}s {:>8.3} {:>6}",
        "record_ratio (unrec. ÷ rec. time)",
        r.io_unrecorded_s,
        r.io_recorded_s,
        r.record_ratio,
        "≥0.95"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>6.3}µs {:>6}",
        "  recording's cost per event",
        format!("{} ev", r.io_events),
        "-",
        r.record_us_per_event,
        "-"
    );
    println!(
        "{:<34} {:>11.3}s {:>11.3}s {:>8.3} {:>6}",
        "wasm_native_ratio (native ÷ wasm)",
        r.cpu_native_s,
        r.cpu_wasm_s,
        r.wasm_native_ratio,
        "≥0.70"
    );
    println!(
        "{:<34} {:>11.3}s {:>11.3}s {:>8.3} {:>6}",
        "asyncify_ratio (plain ÷ instr.)",
        r.cpu_instrumented_s * r.asyncify_ratio,
        r.cpu_instrumented_s,
        r.asyncify_ratio,
        "≥0.90"
    );
    println!(
        "snapshot_ms_per_gib: {:.0} ms/GiB ({} MiB of incompressible memory paused {:.1} ms, \
         snapshot {} bytes)",
        r.snapshot_ms_per_gib, r.snapshot_memory_mib, r.snapshot_pause_ms, r.snapshot_bytes
    );
    println!(
        "{:<34} {:>11.3}s {:>11.3}s {:>8} {:>6}",
        "start_first_s / start_cached_s", r.start_first_s, r.start_cached_s, "-", "≤1s"
    );
    match (r.wasmtime_compile_s, &r.wasmtime_skipped) {
        (Some(w), _) => println!(
            "{:<34} {:>11.3}s {:>11.3}s {:>8.3} {:>6}",
            "wasmtime_compile_s ÷ start_first_s",
            w,
            r.start_first_s,
            w / r.start_first_s,
            "≥1.00"
        ),
        (None, why) => println!(
            "wasmtime_compile_s skipped: {}",
            why.as_deref().unwrap_or("-")
        ),
    }
    println!(
        "start-up: bigcode.wasm, {:.1} MB of wasm, a `tandem vm run` from spawn to exit",
        r.start_module_bytes as f64 / 1e6
    );
    println!(
        "recorded run: {} events, log {} bytes ({:.1} bytes/event)",
        r.io_events,
        r.io_log_bytes,
        r.io_log_bytes as f64 / r.io_events.max(1) as f64
    );
    match (&r.net, &r.net_skipped) {
        (Some(n), _) => {
            println!(
                "{:<34} {:>8.0}MB/s {:>8.0}MB/s {:>8.3} {:>6}",
                "netstack_loopback_ratio (VM÷lo)",
                n.vm_mbps,
                n.loopback_mbps,
                n.netstack_loopback_ratio,
                "-"
            );
            println!(
                "{:<34} {:>10.0}/s {:>10.0}/s {:>8.3} {:>6}",
                "kvd_ops_per_s (rec. ÷ unrec.)",
                n.kvd_ops_per_s_recorded,
                n.kvd_ops_per_s,
                n.kvd_record_ratio,
                "≥0.95"
            );
        }
        (None, Some(why)) => println!("network rows skipped: {why}"),
        (None, None) => {}
    }
}

#[derive(Serialize)]
struct NetBench {
    /// Bulk TCP throughput into a VM ÷ the same transfer over host loopback.
    netstack_loopback_ratio: f64,
    vm_mbps: f64,
    loopback_mbps: f64,
    /// kvd under redis-benchmark (mean of SET, GET, INCR requests per second), unrecorded.
    kvd_ops_per_s: f64,
    kvd_ops_per_s_recorded: f64,
    /// Recorded ÷ unrecorded (goal ≥ 0.95).
    kvd_record_ratio: f64,
}

/// Push `bytes` to a sink at `addr`, which answers with the count when we shut down.
fn push(addr: std::net::SocketAddr, bytes: usize) -> Result<Duration> {
    use std::io::{Read, Write};
    let chunk = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let took = start.elapsed();
    if reply.trim() != bytes.to_string() {
        bail!("the sink counted {:?} bytes of {bytes}", reply.trim());
    }
    Ok(took)
}

/// A sink on host loopback, for the baseline.
fn loopback_sink() -> Result<std::net::SocketAddr> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        for mut s in l.incoming().flatten() {
            let mut total = 0u64;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = writeln!(s, "{total}");
        }
    });
    Ok(addr)
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..200 {
        if ok() {
            return Ok(());
        }
        pause(Duration::from_millis(50))?;
    }
    bail!("{what} never came up")
}

/// One redis-benchmark result row.
#[derive(Clone, Debug)]
struct BenchRow {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Run redis-benchmark from `client_ns` against `ip` with `args` (CSV output): one row per test.
fn redis_benchmark(client_ns: &str, ip: &str, args: &[&str]) -> Result<Vec<BenchRow>> {
    let out = crate::client::redis_benchmark(client_ns, ip, 120)
        .arg("--csv")
        .args(args)
        .output()
        .context("running redis-benchmark (package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with('"'));
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim_matches('"').to_string())
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (rps, p50, p99) = (col("rps"), col("p50_latency_ms"), col("p99_latency_ms"));
    let rows: Vec<BenchRow> = lines
        .map(|l| {
            let cells: Vec<f64> = l
                .split(',')
                .map(|c| c.trim_matches('"').parse().unwrap_or(f64::NAN))
                .collect();
            let get = |i: Option<usize>| i.and_then(|i| cells.get(i).copied()).unwrap_or(f64::NAN);
            BenchRow {
                rps: get(rps),
                p50_ms: get(p50),
                p99_ms: get(p99),
            }
        })
        .collect();
    if rows.is_empty() || rows.iter().any(|r| !r.rps.is_finite()) {
        bail!("unexpected redis-benchmark output: {text}");
    }
    Ok(rows)
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Where an unprotected kvd keeps its fresh datastore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KvdStore {
    /// A folder of this machine's /tmp.
    Local,
    /// A folder of the lab's shared storage, which host1 sees through its storage server,
    /// as an FT primary's datastore is: an FT ÷ unprotected ratio then compares the
    /// copies' costs, not two kinds of storage.
    Shared,
}

/// An unprotected kvd VM on host1 of `lab_name` at `ip`, with a fresh datastore in `store`,
/// recording its log if `record`; up and answering when this returns.
fn kvd_vm(
    lab_name: &str,
    ip: &str,
    record: bool,
    store: KvdStore,
) -> Result<(VmProcess, tempfile::TempDir)> {
    let work = match store {
        KvdStore::Local => tempfile::tempdir()?,
        KvdStore::Shared => tempfile::tempdir_in(crate::lab::shared_dir(lab_name))
            .context("creating a datastore on the lab's shared storage")?,
    };
    let ds = work.path().join("ds");
    std::fs::create_dir(&ds)?;
    let kvd = guests::file("kvd.wasm")?.display().to_string();
    let (ds, log) = (
        ds.display().to_string(),
        work.path().join("kvd.tlog").display().to_string(),
    );
    let nic = format!("bridge=br-vm,mac=02:00:00:00:00:10,ip={ip}/24");
    let mut args = vec![
        "vm",
        "run",
        "--wasm",
        &kvd,
        "--datastore",
        &ds,
        "--nic",
        &nic,
        "--listen",
        "tcp:6379",
    ];
    if record {
        args.extend(["--record", &log]);
    }
    let vm = VmProcess::start(&crate::lab::host_ns(lab_name, 1), &args)?;
    wait_for_kvd(&crate::lab::ns(lab_name, "client"), ip)?;
    Ok((vm, work))
}

/// redis-benchmark against kvd in a fresh VM: the mean of its SET, GET and INCR rates.
fn kvd_round(lab_name: &str, record: bool, requests: &str) -> Result<f64> {
    let _vm = kvd_vm(lab_name, "10.77.0.21", record, KvdStore::Local)?;
    let client = crate::lab::ns(lab_name, "client");
    let rows = redis_benchmark(
        &client,
        "10.77.0.21",
        &["-t", "set,get,incr", "-n", requests, "-c", "20", "-P", "8"],
    )?;
    Ok(mean(rows.iter().map(|r| r.rps)))
}

fn wait_for_kvd(client_ns: &str, ip: &str) -> Result<()> {
    wait_until("kvd", || {
        Command::new("ip")
            .args(["netns", "exec", client_ns, "redis-cli", "-h", ip, "PING"])
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
    })
}

fn net_rows(quick: bool, rounds: u32) -> Result<NetBench> {
    let name = format!("bench{}", std::process::id() % 100_000);
    crate::lab::up(&name, 1)?;
    let _lab = LabGuard(name.clone());
    let bytes = if quick { 8 << 20 } else { 128 << 20 };

    let sink = guests::file("sink.wasm")?.display().to_string();
    let vm = VmProcess::start(
        &crate::lab::host_ns(&name, 1),
        &[
            "vm",
            "run",
            "--wasm",
            &sink,
            "--nic",
            "bridge=br-vm,mac=02:00:00:00:00:20,ip=10.77.0.20/24",
            "--listen",
            "tcp:5001",
        ],
    )?;
    let client = crate::lab::ns(&name, "client");
    let vm_addr: std::net::SocketAddr = "10.77.0.20:5001".parse()?;
    let c = client.clone();
    in_netns(&c, move || {
        wait_until("the sink VM", || push(vm_addr, 1).is_ok())
    })?;
    let lo = loopback_sink()?;
    let (vm_t, lo_t) = side_by_side(
        rounds,
        || {
            let c = client.clone();
            in_netns(&c, move || push(vm_addr, bytes))
        },
        || push(lo, bytes),
    )?;
    drop(vm);

    let requests = if quick { "20000" } else { "100000" };
    let (plain, recorded) = side_by_side(
        rounds,
        || kvd_round(&name, false, requests).map(|ops| Duration::from_secs_f64(1.0 / ops)),
        || kvd_round(&name, true, requests).map(|ops| Duration::from_secs_f64(1.0 / ops)),
    )?;
    let (ops, ops_rec) = (1.0 / secs(plain), 1.0 / secs(recorded));
    let mb = bytes as f64 / 1e6;
    Ok(NetBench {
        netstack_loopback_ratio: secs(lo_t) / secs(vm_t),
        vm_mbps: mb / secs(vm_t),
        loopback_mbps: mb / secs(lo_t),
        kvd_ops_per_s: ops,
        kvd_ops_per_s_recorded: ops_rec,
        kvd_record_ratio: ops_rec / ops,
    })
}

#[derive(clap::Args)]
pub struct FtBenchArgs {
    #[command(flatten)]
    flags: BenchFlags,
    /// Primary host kills for the failover gap (default 5, 1 with --quick; at most 50).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    kills: Option<u32>,
    /// The failure timeout of the FT pair: the ceiling of its adaptive failure detector
    /// (the design's default: 300 ms; the floor stays at its default, 150 ms, so at least
    /// that; at most 60000).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(150..=60_000))]
    timeout_ms: u64,
    /// Only the rows of a secondary joining a loaded kvd (join_s, enable_pause_ms,
    /// checkpoint_pause_ms).
    #[arg(long)]
    join_only: bool,
    /// Seconds in total that FT pairs are left alone, half idle and half under load,
    /// while a CPU burner keeps every core busy, counting failovers nobody caused
    /// (spurious_failovers; default 600, 20 with --quick; 0 skips the soak; at most a day,
    /// 86400).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=86_400))]
    soak_secs: Option<u64>,
    /// Only the soak (spurious_failovers).
    #[arg(long)]
    soak_only: bool,
}

/// A secondary joining a running kvd (FT enabled late): see [`join_rows`].
#[derive(Serialize)]
struct JoinBench {
    /// From the secondary's start to the VM's status saying `protected=true`, kvd having
    /// touched `join_filled_mib` of values and then taken `join_load_s` of load (goal ≤ 5 s).
    join_s: f64,
    /// The primary's longest pause while its first secondary joins, as the one-connection
    /// INCR checker sees it: its longest gap between two replies, from just before the
    /// secondary starts until 0.5 s after protected, minus its mean interval between
    /// replies over that time (goal ≤ 10 ms).
    enable_pause_ms: f64,
    enable_max_gap_ms: u64,
    enable_checker_interval_ms: f64,
    /// For comparison: the checker's longest gap over 2 s just before, no secondary
    /// starting (what the machine's scheduling alone costs).
    enable_baseline_gap_ms: u64,
    /// The lone primary's longest pause for its own checkpoints during the fill and the
    /// load (its "checkpoint at event N ... (the VM paused P ms)" lines), and their count.
    checkpoint_pause_ms: f64,
    checkpoints: usize,
    /// Of those, the ones whose memory was copied while the guest ran (the rest copied it
    /// whole in their pause: no dirty-page tracking on this host), and the most any of them
    /// copied in its pause (the pages written since the last round, in KiB).
    checkpoints_precopied: usize,
    checkpoint_stopped_kib_max: u64,
    /// The primary's resident memory once filled and loaded, just before the join.
    join_primary_rss_mib: f64,
    join_filled_mib: u64,
    join_load_s: u64,
    /// The checkpoint the secondary joined from (its event number), and the events the
    /// primary streamed it from there to its release point (the primary's "attached from
    /// event A; release point R" line): outputs of later events wait until the secondary
    /// acknowledges them, so after all of these.
    join_from_event: Option<u64>,
    join_events_streamed: Option<u64>,
}

#[derive(Serialize)]
struct FtBench {
    /// kvd throughput under FT ÷ unprotected (goal ≥ 0.8). Both keep their datastore on
    /// the lab's shared storage, seen through host1's storage server.
    throughput_ratio: f64,
    ops_unprotected: f64,
    ops_ft: f64,
    /// Request latency FT minus unprotected, one client, no pipelining (goals ≤ 1 / ≤ 5 ms).
    latency_added_p50_ms: f64,
    latency_added_p99_ms: f64,
    p50_unprotected_ms: f64,
    p50_ft_ms: f64,
    p99_unprotected_ms: f64,
    p99_ft_ms: f64,
    /// The longest client-visible silence across a primary host kill (goal ≤ 250 ms).
    failover_gap_ms_median: f64,
    failover_gaps_ms: Vec<u64>,
    failover_lost: i64,
    failover_resets: u64,
    /// The longest client-visible silence when the primary's host loses its storage or its
    /// VM network's uplink (fault to the first reply from the secondary it hands over to),
    /// median and each; what the checker lost and the resets it saw across all of them.
    storage_handover_ms: f64,
    storage_handovers_ms: Vec<u64>,
    uplink_handover_ms: f64,
    uplink_handovers_ms: Vec<u64>,
    handover_lost: i64,
    handover_resets: u64,
    /// Logging channel bandwidth measured during the FT throughput run, next to the
    /// sizing formula (disk reads MB/s × 8 + network input Mbit/s) × 1.2 for that run.
    logging_mbps: f64,
    formula_mbps: f64,
    /// Live migration of kvd under redis-benchmark between two lab hosts: the guest's
    /// pause, unwind to the receiver's live, median (goal ≤ 50 ms) and each.
    migrate_pause_ms: f64,
    migrate_pauses_ms: Vec<f64>,
    migrate_bytes: u64,
    #[serde(flatten)]
    migrate_big: MigrateBig,
    #[serde(flatten)]
    join: JoinBench,
    #[serde(flatten)]
    disk: DiskRows,
    disk_read_mbps: f64,
    net_in_mbps: f64,
    /// CPU time (utime+stime) of the primary's process per kvd operation under the
    /// throughput load, FT ÷ unprotected (goal ≤ 1.15), and each side in µs per op.
    primary_cpu_ratio: f64,
    primary_cpu_us_per_op_unprotected: f64,
    primary_cpu_us_per_op_ft: f64,
    /// The secondary's process CPU ÷ the primary's over the same FT run (goal ≤ 0.6).
    secondary_cpu_ratio: f64,
    /// CPU of the logging channel's own threads (ft-send, ft-conn and ft-release on the
    /// primary, ft-recv and ft-ack on the secondary) per event streamed, over the same FT
    /// run. It includes writing the released outputs to the tap (done by ft-conn as an
    /// acknowledgement arrives, or by ft-release), which an unprotected VM does on its own
    /// thread.
    ///
    /// Frames of events that the VM's thread wrote itself as it went to wait for input
    /// (`channel_frames_from_vm`) cost CPU on that thread, not on these.
    channel_cpu_us_per_event: f64,
    /// Events the primary streamed during the FT throughput runs, in how many frames, and
    /// how many of those the VM's thread wrote itself; and the acknowledgements of events
    /// the primary received (one covers the frames the secondary found together).
    channel_events: u64,
    channel_frames: u64,
    channel_frames_from_vm: u64,
    channel_acks: u64,
    /// Writes behind (kvd's appends to its file) in the same runs, and those the releaser
    /// performed: the others the thread that learned of their acknowledgement performed
    /// itself, without a wake.
    channel_writes_behind: u64,
    channel_writes_behind_by_releaser: u64,
    /// Wakes (voluntary context switches) of the primary's threads per kvd operation over
    /// the same throughput runs, unprotected and FT: each is a thread that waited (for the
    /// tap, an event to send, an acknowledgement, an output to release) and was woken.
    primary_wakes_per_op_unprotected: f64,
    primary_wakes_per_op_ft: f64,
    /// What one wake of a thread on another core costs this machine in CPU, measured in
    /// this run by two threads handing a turn back and forth on otherwise idle cores (a
    /// lower bound: see [`wake_cpu_us`]).
    wake_cpu_us: Option<f64>,
    /// Why `wake_cpu_us` (and so `extra_wakes_cpu_us_per_op`) is missing, when it is.
    wake_skipped: Option<String>,
    /// An estimate of the part of the primary's added CPU per operation that is threads
    /// waiting and being woken: the wakes FT adds per operation times `wake_cpu_us`. Many
    /// of them are woken by the network (an acknowledgement, a frame on the tap), and on
    /// loaded cores, so it is an order of magnitude, to set beside the CPU added.
    extra_wakes_cpu_us_per_op: Option<f64>,
    /// CPU an idle kvd costs per second of wall time (ms/s: tenths of a percent of a
    /// core), measured for [`IDLE_WINDOW`] in each round before the load, side by side:
    /// the unprotected VM's process, and the FT primary's and secondary's. What FT adds
    /// here is its periodic work: heartbeats both ways, health probes, the pause monitor.
    idle_cpu_ms_per_s_unprotected: f64,
    idle_cpu_ms_per_s_primary: f64,
    idle_cpu_ms_per_s_secondary: f64,
    /// Failovers (a generation claimed) with no fault injected, FT pairs left idle and
    /// under load for `soak_secs` in total while every core is kept busy (goal 0).
    spurious_failovers: u64,
    soak_secs: u64,
    rounds: u32,
}

/// How long each round of `bench ft` watches the idle VM's CPU, each side, before its load.
const IDLE_WINDOW: Duration = Duration::from_secs(4);

/// A process's or thread's CPU time so far (utime + stime) from its `stat` file at
/// `path`, in seconds; `None` if unreadable (it ended).
fn stat_cpu_s(path: &Path) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted
    // from the last ')'. After it come field 3 (state) onwards; utime and stime are
    // fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a system constant; no memory is involved.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A process's CPU time so far in seconds (0 if it is gone).
fn process_cpu_s(pid: u32) -> f64 {
    stat_cpu_s(&Path::new("/proc").join(pid.to_string()).join("stat")).unwrap_or(0.0)
}

/// The logging channel's threads, by name, those that release held outputs (and write
/// them to the tap) included: the cost of the output rule is the channel's cost.
const CHANNEL_THREADS: [&str; 5] = ["ft-send", "ft-conn", "ft-release", "ft-recv", "ft-ack"];

/// The folders of process `pid`'s live threads (`/proc/PID/task/TID`): none if it is gone.
fn tasks(pid: u32) -> impl Iterator<Item = std::path::PathBuf> {
    std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| t.path())
}

/// The CPU time so far of process `pid`'s logging-channel threads, in seconds.
fn channel_cpu_s(pid: u32) -> f64 {
    tasks(pid)
        .filter(|t| {
            std::fs::read_to_string(t.join("comm"))
                .is_ok_and(|c| CHANNEL_THREADS.contains(&c.trim()))
        })
        .filter_map(|t| stat_cpu_s(&t.join("stat")))
        .sum()
}

/// CPU time so far of the live threads of process `pid`, in seconds, to the nanosecond
/// (`/proc/PID/task/TID/schedstat`: `stat` counts in ticks of 10 ms, as coarse as an idle
/// VM's whole use over seconds; it is the fallback on a kernel without schedstat). A
/// thread that ended takes its time with it.
fn live_threads_cpu_s(pid: u32) -> f64 {
    let schedstat = |t: &Path| {
        let s = std::fs::read_to_string(t.join("schedstat")).ok()?;
        Some(s.split_whitespace().next()?.parse::<u64>().ok()? as f64 / 1e9)
    };
    tasks(pid)
        .filter_map(|t| schedstat(&t).or_else(|| stat_cpu_s(&t.join("stat"))))
        .sum()
}

/// Voluntary context switches so far of the live threads of process `pid`: each is a
/// thread that waited and was woken again (for the tap, an event to send, an
/// acknowledgement, an output to release; and the timers of the heartbeats, the pause
/// monitor, the health probe and the checkpointer, about a tenth of a loaded FT primary's).
/// A thread that ended
/// takes its count with it (the primary's threads live through a throughput run). 0 if the
/// process is gone.
fn process_wakes(pid: u32) -> u64 {
    tasks_wakes(tasks(pid))
}

/// The voluntary context switches of the threads whose `/proc` folders these are.
fn tasks_wakes(tasks: impl Iterator<Item = std::path::PathBuf>) -> u64 {
    tasks
        .filter_map(|t| std::fs::read_to_string(t.join("status")).ok())
        .filter_map(|status| voluntary_switches(&status))
        .sum()
}

/// The `voluntary_ctxt_switches` of a thread's `status` file.
fn voluntary_switches(status: &str) -> Option<u64> {
    status_field(status, "voluntary_ctxt_switches:")?
        .parse()
        .ok()
}

/// The value of field `key` (its name and colon) of a `/proc` `status` file, trimmed.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// The calling thread's voluntary context switches so far (as [`process_wakes`] counts
/// them) and its CPU time so far in seconds.
fn thread_usage() -> (u64, f64) {
    let waits = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|status| voluntary_switches(&status))
        .unwrap_or(0);
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a live timespec for clock_gettime to fill. This clock counts the
    // thread's CPU to the nanosecond, where getrusage's times lag until the scheduler next
    // accounts for the thread.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    (waits, t.tv_sec as f64 + t.tv_nsec as f64 / 1e9)
}

/// The CPUs the calling thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t of the size passed; sched_getaffinity fills it for
    // the calling thread.
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0;
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, within the set.
        .filter(|&cpu| ok && unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// Keep the calling thread on `cpu`. Whether it is.
fn pin_this_thread(cpu: usize) -> bool {
    // SAFETY: an all-zero cpu_set_t is a valid empty set, `cpu` is below CPU_SETSIZE (it
    // came from `allowed_cpus`), and sched_setaffinity reads the live set of the size
    // passed, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0
    }
}

/// At least what one wake of a thread waiting on another core costs this machine in CPU,
/// in µs, and the waits it was measured over.
///
/// Two threads, each kept on a core of its own, pass a turn back and forth, each waiting
/// in read(2) on a pipe of its own for it and passing it on with a byte written to the
/// other's, as the logging channel's threads hand events and acknowledgements to threads
/// on the other core. A read of an empty pipe always sleeps (a mutex and a condition
/// variable spin first, and two threads on idle cores then pass thousands of turns without
/// ever sleeping); unpinned, the scheduler would run the woken thread where its waker just
/// went to sleep, which the channel's busy VM thread never lets it do. The figure is the
/// CPU of both threads (the syscalls, the sleeper's switch out and back in) over the waits
/// they made (their voluntary context switches, the unit of `primary_wakes_per_op`); the
/// other core's exit from idle and the wake's interrupt are charged to neither thread.
/// Best of 3 runs of `turns` turns; a run cut short (a pipe that failed) or that waited
/// for fewer than half its turns does not count. An error if no run counted: pipes or
/// threads could not be made, or a core could not be kept.
fn wake_cpu_us(turns: u64) -> Result<(f64, u64)> {
    let (a, b) = match allowed_cpus()[..] {
        [a, b, ..] => (Some(a), Some(b)),
        // One core: the figure is a same-core wake's.
        _ => (None, None),
    };
    let one_run = || -> Result<(f64, u64)> {
        let (first_inbox, to_first) = std::io::pipe().context("making a pipe")?;
        let (second_inbox, to_second) = std::io::pipe().context("making a pipe")?;
        let spawn = |inbox, outbox, first, cpu| {
            std::thread::Builder::new()
                .name("wake-cost".into())
                .spawn(move || pass_turns(inbox, outbox, first, cpu, turns / 2))
                .context("starting a thread")
        };
        let second = spawn(second_inbox, to_first, false, b)?;
        // On a thread of its own too: the caller's own affinity stays as it was.
        let first = spawn(first_inbox, to_second, true, a)?;
        let (Ok(Some(x)), Ok(Some(y))) = (first.join(), second.join()) else {
            bail!("a turn was not passed, or a core not kept");
        };
        let waits = x.0 + y.0;
        if waits < turns / 2 {
            bail!("{waits} waits in {turns} turns: the threads did not sleep");
        }
        Ok((x.1 + y.1, waits))
    };
    let per_wait = |r: &(f64, u64)| r.0 / r.1.max(1) as f64;
    let mut best = one_run();
    for _ in 1..3 {
        let run = one_run();
        let better = match (&run, &best) {
            (Ok(r), Ok(b)) => per_wait(r) < per_wait(b),
            (Ok(_), Err(_)) => true,
            (Err(_), _) => false,
        };
        if better {
            best = run;
        }
    }
    best.map(|b| (per_wait(&b) * 1e6, b.1))
        .context("measuring what a wake costs")
}

/// One side of [`wake_cpu_us`]: `passes` times, pass the turn (the first side first) and
/// wait for it back (the other side the other way round). Its waits and CPU (s) over them;
/// `None` if a pipe failed (then the other side sees its pipe end and stops too) or `cpu`
/// could not be kept.
fn pass_turns(
    mut inbox: std::io::PipeReader,
    mut outbox: std::io::PipeWriter,
    first: bool,
    cpu: Option<usize>,
    passes: u64,
) -> Option<(u64, f64)> {
    use std::io::{Read, Write};
    if cpu.is_some_and(|cpu| !pin_this_thread(cpu)) {
        return None;
    }
    let begun = thread_usage();
    let mut byte = [0u8; 1];
    for _ in 0..passes {
        if first {
            outbox.write_all(&byte).ok()?;
        }
        inbox.read_exact(&mut byte).ok()?;
        if !first {
            outbox.write_all(&byte).ok()?;
        }
    }
    let ended = thread_usage();
    Some((ended.0.saturating_sub(begun.0), ended.1 - begun.1))
}

/// Turns (each about a wake) per run of [`wake_cpu_us`] in `bench ft`: about a second per
/// run here (a tenth of it with `--quick`).
const WAKE_TURNS: u64 = 40_000;

/// The `tandem` process that `pid` is or started (a launcher such as `ip netns exec`
/// execs it, but a wrapper may fork): `pid` itself if it is not found within a few levels.
fn tandem_pid(pid: u32) -> u32 {
    let mut at = pid;
    for _ in 0..4 {
        let proc = Path::new("/proc").join(at.to_string());
        if std::fs::read_to_string(proc.join("comm")).is_ok_and(|c| c.trim() == "tandem") {
            return at;
        }
        let children =
            std::fs::read_to_string(proc.join("task").join(at.to_string()).join("children"))
                .unwrap_or_default();
        match children
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
        {
            Some(child) => at = child,
            None => break,
        }
    }
    pid
}

/// CPU seconds of the primary, the secondary and both sides' channel threads.
#[derive(Clone, Copy, Default)]
struct FtCpu {
    primary: f64,
    secondary: f64,
    channel: f64,
}

impl FtCpu {
    fn read(primary: u32, secondary: Option<u32>) -> FtCpu {
        FtCpu {
            primary: process_cpu_s(primary),
            secondary: secondary.map_or(0.0, process_cpu_s),
            channel: channel_cpu_s(primary) + secondary.map_or(0.0, channel_cpu_s),
        }
    }

    fn since(self, before: FtCpu) -> FtCpu {
        FtCpu {
            primary: (self.primary - before.primary).max(0.0),
            secondary: (self.secondary - before.secondary).max(0.0),
            channel: (self.channel - before.channel).max(0.0),
        }
    }
}

/// Spin on every core until `stop`: the busy machine of the soak.
fn burn_cpus(
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
            })
        })
        .collect()
}

fn generation(status: &str) -> u64 {
    status_counter(status, "generation") as u64
}

/// FT pairs of kvd in lab `lab_name` left alone for `secs` in total, each pair half idle
/// and half under the standard load, every core kept busy by a burner: the generations
/// claimed with no fault injected. A pair that failed over is replaced by a fresh one.
fn soak_rows(lab_name: &str, secs: u64, timeout_ms: u64, json: bool) -> Result<u64> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if secs == 0 {
        return Ok(0);
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let burners = burn_cpus(&stop);
    let result = (|| -> Result<u64> {
        let mut spurious = 0;
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            not_interrupted()?;
            let lab = crate::demo::FtLab::start(lab_name, false, timeout_ms)?;
            let first = generation(&lab.status());
            let left = end.saturating_duration_since(Instant::now());
            let idle_until = Instant::now() + left / 2;
            progress(
                json,
                &format!(
                    "soak: FT pair idle and under load for {} s, cores busy",
                    left.as_secs()
                ),
            );
            let mut load: Option<std::process::Child> = None;
            // An interrupt or a load that cannot start ends the loop; the load is stopped
            // either way.
            let failed_over: Result<u64> = loop {
                if let Err(e) = pause(Duration::from_millis(200)) {
                    break Err(e);
                }
                let now = Instant::now();
                if now >= idle_until && now < end {
                    let done = match load.as_mut() {
                        None => true,
                        Some(l) => !matches!(l.try_wait(), Ok(None)),
                    };
                    if done {
                        match background_load(&lab.client_ns(), "1000000") {
                            Ok(l) => load = Some(l),
                            Err(e) => break Err(e),
                        }
                    }
                }
                let g = generation(&lab.status());
                if g > first {
                    break Ok(g - first);
                }
                if now >= end {
                    break Ok(0);
                }
            };
            if let Some(mut l) = load {
                let _ = l.kill();
                let _ = l.wait();
            }
            let failed_over = failed_over?;
            if failed_over > 0 {
                // Give the copies a moment to log why, then say it.
                std::thread::sleep(Duration::from_millis(300));
                let why: Vec<String> = ["primary", "secondary"]
                    .iter()
                    .flat_map(|who| {
                        lab.log(who)
                            .lines()
                            .filter(|l| {
                                ["silent", "lost", "arbitration", "closed"]
                                    .iter()
                                    .any(|w| l.contains(w))
                            })
                            .map(|l| format!("{who}: {l}"))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                // On stderr even with --json: a failure to explain, never a progress line.
                eprintln!(
                    "bench: soak: a failover with no fault (generation {first} → {}):\n{}",
                    first + failed_over,
                    why.join("\n")
                );
            }
            spurious += failed_over;
        }
        Ok(spurious)
    })();
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    result
}

fn status_counter(status: &str, key: &str) -> f64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A guest that writes its files as ordinary programs do (filechurn: each step appends a
/// line to a journal and a record to a data file, and writes and reads back a scratch
/// file), unprotected and as an FT pair on this host (the logging channel on loopback,
/// the datastore on local disk), alternated: the best time of each for its steps (as the
/// guest measures it; under FT it starts them once protected), and how many of the FT
/// run's writes went behind (their outcome given at once, the write held to the output
/// rule); and the same FT run with `--no-write-behind` (every write waits for the
/// secondary before it is performed). Every run's output is checked.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct DiskRows {
    /// Unprotected time ÷ FT time (a throughput ratio, like `throughput_ratio`).
    disk_ratio: f64,
    disk_unprotected_s: f64,
    disk_ft_s: f64,
    /// The same with `--no-write-behind`.
    disk_ratio_no_write_behind: f64,
    disk_ft_no_write_behind_s: f64,
    disk_steps: u32,
    disk_writes_behind: u64,
}

fn disk_rows(rounds: u32, quick: bool, json: bool) -> Result<DiskRows> {
    let wasm = guests::file("filechurn.wasm")?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let steps: u32 = if quick { 5000 } else { 20000 };
    let want = format!("filechurn: {steps} steps, 0 bad reads");
    // The FT run waits this long before its steps: the secondary is gated by then.
    let wait_ms = "1500";
    // What the guest says its steps took.
    let took = |out: &std::process::Output| -> Result<Duration> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find_map(|l| {
                l.strip_prefix("filechurn: steps took ")?
                    .strip_suffix(" us")
            })
            .and_then(|us| us.trim().parse().ok())
            .map(Duration::from_micros)
            .context("filechurn did not say how long its steps took")
    };
    let (mut plain, mut ft, mut ft_sync, mut behind) =
        (Duration::MAX, Duration::MAX, Duration::MAX, 0);
    let addr = format!("127.0.0.1:{}", 30_000 + std::process::id() % 20_000);
    let checked = |who: &str, out: &std::process::Output| -> Result<()> {
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains(&want) {
            bail!(
                "filechurn ({who}) ran wrong ({}): {} / {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    for round in 0..rounds {
        not_interrupted()?;
        progress(
            json,
            &format!(
                "disk round {}/{rounds}: filechurn unprotected, under FT, under FT without writes behind",
                round + 1
            ),
        );
        let work = tempfile::tempdir().context("creating a scratch folder")?;
        let data = work.path().join("plain");
        std::fs::create_dir_all(&data)?;
        let out = Command::new(&exe)
            .args(["vm", "run", "--wasm"])
            .arg(&wasm)
            .arg("--datastore")
            .arg(&data)
            .args(["--arg", &steps.to_string(), "--arg", "0"])
            .env("TANDEM_LOG", "warn")
            .output()
            .context("running tandem vm run")?;
        checked("unprotected", &out)?;
        plain = plain.min(took(&out)?);

        for sync in [false, true] {
            let vm = if sync { "s" } else { "w" };
            let data = work.path().join(format!("{vm}/data"));
            std::fs::create_dir_all(&data)?;
            let pair = |role: &str| {
                let mut c = Command::new(&exe);
                c.args(["ft", role, "--vm", vm, "--shared"])
                    .arg(work.path())
                    .arg("--wasm")
                    .arg(&wasm)
                    .arg("--datastore")
                    .arg(&data)
                    .env("TANDEM_LOG", "warn");
                c
            };
            // The secondary first: it waits for the primary.
            let secondary = pair("secondary")
                .args(["--primary", &addr])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("starting the secondary")?;
            let mut primary = pair("primary");
            primary.args(["--log-listen", &addr]).args([
                "--arg",
                &steps.to_string(),
                "--arg",
                "0",
                "--arg",
                wait_ms,
            ]);
            if sync {
                primary.arg("--no-write-behind");
            }
            let out = primary.output().context("running the primary")?;
            let sec = secondary.wait_with_output()?;
            checked("FT primary", &out)?;
            if !sec.status.success() {
                bail!(
                    "filechurn's secondary failed ({}): {}",
                    sec.status,
                    String::from_utf8_lossy(&sec.stderr)
                );
            }
            let status = std::fs::read_to_string(work.path().join(format!("{vm}/status")))
                .unwrap_or_default();
            let n: u64 = status
                .split_whitespace()
                .find_map(|f| f.strip_prefix("writes_behind=")?.parse().ok())
                .unwrap_or(0);
            if sync {
                ft_sync = ft_sync.min(took(&out)?);
                if n != 0 {
                    bail!("{n} writes went behind with --no-write-behind");
                }
            } else {
                ft = ft.min(took(&out)?);
                behind = n;
            }
        }
    }
    Ok(DiskRows {
        disk_ratio: plain.as_secs_f64() / ft.as_secs_f64(),
        disk_unprotected_s: plain.as_secs_f64(),
        disk_ft_s: ft.as_secs_f64(),
        disk_ratio_no_write_behind: plain.as_secs_f64() / ft_sync.as_secs_f64(),
        disk_ft_no_write_behind_s: ft_sync.as_secs_f64(),
        disk_steps: steps,
        disk_writes_behind: behind,
    })
}

pub fn ft(args: &FtBenchArgs) -> Result<u8> {
    use crate::demo::{FtLab, VM_IP};
    let pid = std::process::id() % 100_000;
    if args.join_only {
        let join = join_rows(&format!("bfj{pid}"), args)?;
        not_interrupted()?;
        if args.flags.json {
            println!("{}", serde_json::to_string(&join)?);
        } else {
            println!("tandem bench ft --join-only");
            print_ft_header();
            print_join_table(&join);
        }
        return Ok(0);
    }
    let soak_secs = args
        .soak_secs
        .unwrap_or(if args.flags.quick { 20 } else { 600 });
    if args.soak_only {
        let spurious = soak_rows(
            &format!("bff{pid}"),
            soak_secs,
            args.timeout_ms,
            args.flags.json,
        )?;
        not_interrupted()?;
        let r = serde_json::json!({ "spurious_failovers": spurious, "soak_secs": soak_secs });
        if args.flags.json {
            println!("{r}");
        } else {
            println!("spurious_failovers {spurious} ({soak_secs} s soak, cores busy; goal 0)");
        }
        return Ok(0);
    }
    let rounds = args.flags.rounds(3, 1);
    let kills = args.kills.unwrap_or(if args.flags.quick { 1 } else { 5 });
    let requests = if args.flags.quick { "20000" } else { "100000" };
    let lat_requests = if args.flags.quick { "2000" } else { "10000" };
    let (plain_lab, ft_lab) = (format!("bfp{pid}"), format!("bff{pid}"));
    progress(
        args.flags.json,
        "wake cost: two threads handing a turn back and forth",
    );
    let wake_turns = if args.flags.quick {
        WAKE_TURNS / 10
    } else {
        WAKE_TURNS
    };
    // A diagnostic: a machine where it cannot be measured still gets every other figure.
    let (wake_cpu_us, wake_skipped) = match wake_cpu_us(wake_turns) {
        Ok((us, _)) => (Some(us), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    not_interrupted()?;
    crate::lab::up(&plain_lab, 1)?;
    let _plain_guard = LabGuard(plain_lab.clone());

    let mut plain = Vec::new();
    let mut ft_rows = Vec::new();
    let mut logging = (0.0, 0.0, 0.0);
    // CPU over the throughput runs, summed over rounds: unprotected primary, then FT.
    let (mut cpu_plain, mut cpu_ft) = (0.0, FtCpu::default());
    // The primary's threads' wakes over the same runs.
    let (mut wakes_plain, mut wakes_ft) = (0u64, 0u64);
    // CPU over the idle windows, summed over rounds.
    let (mut idle_plain, mut idle_ft) = (0.0, (0.0, 0.0));
    let (mut channel_events, mut channel_frames, mut channel_frames_from_vm) = (0u64, 0u64, 0u64);
    let mut channel_acks = 0u64;
    let (mut channel_writes_behind, mut channel_writes_behind_by_releaser) = (0u64, 0u64);
    // Operations per throughput run: `requests` of each of SET, GET and INCR.
    let ops_per_run = 3.0 * requests.parse::<f64>().unwrap_or(0.0);
    for round in 0..rounds {
        not_interrupted()?;
        progress(
            args.flags.json,
            &format!("round {}/{rounds}: kvd unprotected", round + 1),
        );
        {
            // On the storage the FT primary's datastore is on (the lab's, through host1's
            // storage server): what the primary's CPU and wakes add under FT is FT's.
            let vm = kvd_vm(&plain_lab, VM_IP, false, KvdStore::Shared)?;
            let pid = tandem_pid(vm.0.0.id());
            let client = crate::lab::ns(&plain_lab, "client");
            let idle_before = live_threads_cpu_s(pid);
            std::thread::sleep(IDLE_WINDOW);
            idle_plain += (live_threads_cpu_s(pid) - idle_before).max(0.0);
            let cpu_before = process_cpu_s(pid);
            let wakes_before = process_wakes(pid);
            let t = redis_benchmark(
                &client,
                VM_IP,
                &["-t", "set,get,incr", "-n", requests, "-c", "20", "-P", "8"],
            )?;
            cpu_plain += (process_cpu_s(pid) - cpu_before).max(0.0);
            wakes_plain += process_wakes(pid).saturating_sub(wakes_before);
            let l = redis_benchmark(
                &client,
                VM_IP,
                &["-t", "set,get", "-n", lat_requests, "-c", "1"],
            )?;
            plain.push((t, l));
        }
        progress(
            args.flags.json,
            &format!(
                "round {}/{rounds}: kvd under FT (primary host1, secondary host2)",
                round + 1
            ),
        );
        {
            let lab = FtLab::start(&ft_lab, false, args.timeout_ms)?;
            let client = lab.client_ns();
            let pids = (
                tandem_pid(lab.primary_pid()),
                lab.secondary_pid().map(tandem_pid),
            );
            let idle_cpu = || {
                (
                    live_threads_cpu_s(pids.0),
                    pids.1.map_or(0.0, live_threads_cpu_s),
                )
            };
            let idle_before = idle_cpu();
            std::thread::sleep(IDLE_WINDOW);
            let idle_after = idle_cpu();
            idle_ft.0 += (idle_after.0 - idle_before.0).max(0.0);
            idle_ft.1 += (idle_after.1 - idle_before.1).max(0.0);
            let before = lab.status();
            let cpu_before = FtCpu::read(pids.0, pids.1);
            let wakes_before = process_wakes(pids.0);
            let start = Instant::now();
            let t = redis_benchmark(
                &client,
                VM_IP,
                &["-t", "set,get,incr", "-n", requests, "-c", "20", "-P", "8"],
            )?;
            let took = start.elapsed().as_secs_f64();
            let cpu = FtCpu::read(pids.0, pids.1).since(cpu_before);
            cpu_ft.primary += cpu.primary;
            wakes_ft += process_wakes(pids.0).saturating_sub(wakes_before);
            // The secondary and the channel may still be finishing the last batches:
            // read after the status caught up (below), the primary's before.
            // Let the status catch up with the last batches before reading the counters.
            std::thread::sleep(Duration::from_millis(400));
            let late = FtCpu::read(pids.0, pids.1).since(cpu_before);
            cpu_ft.secondary += late.secondary;
            cpu_ft.channel += late.channel;
            let after = lab.status();
            let delta = |k: &str| (status_counter(&after, k) - status_counter(&before, k)).max(0.0);
            channel_events += delta("events") as u64;
            channel_frames += delta("log_frames") as u64;
            channel_frames_from_vm += delta("log_frames_from_vm") as u64;
            channel_acks += delta("log_acks") as u64;
            channel_writes_behind += delta("writes_behind") as u64;
            channel_writes_behind_by_releaser += delta("writes_behind_by_releaser") as u64;
            logging = (
                delta("log_bytes") * 8.0 / took / 1e6,
                delta("disk_read_bytes") / took / 1e6,
                delta("net_in_bytes") * 8.0 / took / 1e6,
            );
            let l = redis_benchmark(
                &client,
                VM_IP,
                &["-t", "set,get", "-n", lat_requests, "-c", "1"],
            )?;
            ft_rows.push((t, l));
        }
    }
    let ops = |v: &[(Vec<BenchRow>, Vec<BenchRow>)]| {
        mean(v.iter().map(|(t, _)| mean(t.iter().map(|r| r.rps))))
    };
    let p = |v: &[(Vec<BenchRow>, Vec<BenchRow>)], f: fn(&BenchRow) -> f64| {
        mean(v.iter().map(|(_, l)| mean(l.iter().map(f))))
    };

    let mut gaps = Vec::new();
    let (mut lost, mut resets) = (0i64, 0u64);
    for k in 0..kills {
        not_interrupted()?;
        progress(
            args.flags.json,
            &format!(
                "failover {}/{kills}: killing the primary's host under the checker",
                k + 1
            ),
        );
        let lab = FtLab::start(&ft_lab, false, args.timeout_ms)?;
        let checker = lab.start_checker("bench:counter");
        std::thread::sleep(Duration::from_millis(800));
        checker.mark();
        lab.kill_primary_host()?;
        std::thread::sleep(Duration::from_millis(1500));
        let rep = checker.finish()?;
        let final_value: i64 = lab.redis(&["GET", "bench:counter"])?.parse().unwrap_or(-1);
        lost += (rep.last_value - final_value).max(0);
        resets += rep.resets;
        gaps.push(rep.max_gap_ms);
    }
    let median = median_f64(&gaps.iter().map(|g| *g as f64).collect::<Vec<_>>());
    // Failures the logging channel does not see: the primary's host loses its storage, or
    // its uplink; it hands the VM over to the secondary.
    let handovers = if args.flags.quick { 1 } else { 5 };
    let (mut storage_gaps, mut uplink_gaps) = (Vec::new(), Vec::new());
    let (mut handover_lost, mut handover_resets) = (0i64, 0u64);
    for fault in [crate::lab::Fault::Storage, crate::lab::Fault::Uplink] {
        for k in 0..handovers {
            not_interrupted()?;
            progress(
                args.flags.json,
                &format!(
                    "handover {}/{handovers}: the primary's host loses its {} under the checker",
                    k + 1,
                    fault.name()
                ),
            );
            let lab = FtLab::start_with(&ft_lab, false, args.timeout_ms, &["--uplink", "uplink"])?;
            let checker = lab.start_checker("bench:counter");
            std::thread::sleep(Duration::from_millis(800));
            checker.mark();
            crate::lab::cut(&ft_lab, "host1", fault, true)?;
            std::thread::sleep(Duration::from_millis(1500));
            let rep = checker.finish()?;
            let final_value: i64 = lab.redis(&["GET", "bench:counter"])?.parse().unwrap_or(-1);
            handover_lost += (rep.last_value - final_value).max(0);
            handover_resets += rep.resets;
            match fault {
                crate::lab::Fault::Storage => storage_gaps.push(rep.max_gap_ms),
                _ => uplink_gaps.push(rep.max_gap_ms),
            }
        }
    }
    let med = |v: &[u64]| median_f64(&v.iter().map(|g| *g as f64).collect::<Vec<_>>());
    let migrations = if args.flags.quick { 2 } else { 6 };
    progress(
        args.flags.json,
        &format!("live migration: kvd under load, {migrations} moves between two hosts"),
    );
    let (migrate_pauses_ms, migrate_bytes, migrate_big) =
        migrate_rows(&format!("bfm{pid}"), migrations, args.flags.json)?;
    let join = join_rows(&format!("bfj{pid}"), args)?;
    let disk = disk_rows(rounds, args.flags.quick, args.flags.json)?;
    let spurious_failovers = soak_rows(&ft_lab, soak_secs, args.timeout_ms, args.flags.json)?;
    let (ops_plain, ops_ft) = (ops(&plain), ops(&ft_rows));
    let all_ops = ops_per_run * f64::from(rounds);
    let us_per_op = |cpu_s: f64| cpu_s * 1e6 / all_ops;
    let idle_ms_per_s = |cpu_s: f64| cpu_s * 1e3 / (IDLE_WINDOW.as_secs_f64() * f64::from(rounds));
    let r = FtBench {
        throughput_ratio: ops_ft / ops_plain,
        ops_unprotected: ops_plain,
        ops_ft,
        latency_added_p50_ms: p(&ft_rows, |r| r.p50_ms) - p(&plain, |r| r.p50_ms),
        latency_added_p99_ms: p(&ft_rows, |r| r.p99_ms) - p(&plain, |r| r.p99_ms),
        p50_unprotected_ms: p(&plain, |r| r.p50_ms),
        p50_ft_ms: p(&ft_rows, |r| r.p50_ms),
        p99_unprotected_ms: p(&plain, |r| r.p99_ms),
        p99_ft_ms: p(&ft_rows, |r| r.p99_ms),
        failover_gap_ms_median: median,
        failover_gaps_ms: gaps,
        failover_lost: lost,
        failover_resets: resets,
        storage_handover_ms: med(&storage_gaps),
        storage_handovers_ms: storage_gaps,
        uplink_handover_ms: med(&uplink_gaps),
        uplink_handovers_ms: uplink_gaps,
        handover_lost,
        handover_resets,
        logging_mbps: logging.0,
        formula_mbps: (logging.1 * 8.0 + logging.2) * 1.2,
        disk_read_mbps: logging.1,
        net_in_mbps: logging.2,
        migrate_pause_ms: median_f64(&migrate_pauses_ms),
        migrate_pauses_ms,
        migrate_bytes,
        migrate_big,
        join,
        disk,
        primary_cpu_ratio: cpu_ft.primary / cpu_plain,
        primary_cpu_us_per_op_unprotected: us_per_op(cpu_plain),
        primary_cpu_us_per_op_ft: us_per_op(cpu_ft.primary),
        secondary_cpu_ratio: cpu_ft.secondary / cpu_ft.primary,
        channel_cpu_us_per_event: cpu_ft.channel * 1e6 / channel_events.max(1) as f64,
        channel_events,
        channel_frames,
        channel_frames_from_vm,
        channel_acks,
        channel_writes_behind,
        channel_writes_behind_by_releaser,
        primary_wakes_per_op_unprotected: wakes_plain as f64 / all_ops,
        primary_wakes_per_op_ft: wakes_ft as f64 / all_ops,
        extra_wakes_cpu_us_per_op: wake_cpu_us
            .map(|us| (wakes_ft as f64 - wakes_plain as f64) / all_ops * us),
        wake_cpu_us,
        wake_skipped,
        idle_cpu_ms_per_s_unprotected: idle_ms_per_s(idle_plain),
        idle_cpu_ms_per_s_primary: idle_ms_per_s(idle_ft.0),
        idle_cpu_ms_per_s_secondary: idle_ms_per_s(idle_ft.1),
        spurious_failovers,
        soak_secs,
        rounds,
    };
    not_interrupted()?;
    if args.flags.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "tandem bench ft  ({rounds} rounds per side alternated, {kills} primary host kills)"
        );
        print_ft_header();
        println!(
            "{:<40} {:>10.0}/s {:>10.0}/s {:>10.3} {:>8}",
            "throughput_ratio (FT ÷ unprotected)",
            r.ops_unprotected,
            r.ops_ft,
            r.throughput_ratio,
            "≥0.8"
        );
        println!(
            "{:<40} {:>10.3}ms {:>10.3}ms {:>8.3}ms {:>8}",
            "latency_added_p50_ms",
            r.p50_unprotected_ms,
            r.p50_ft_ms,
            r.latency_added_p50_ms,
            "≤1ms"
        );
        println!(
            "{:<40} {:>10.3}ms {:>10.3}ms {:>8.3}ms {:>8}",
            "latency_added_p99_ms",
            r.p99_unprotected_ms,
            r.p99_ft_ms,
            r.latency_added_p99_ms,
            "≤5ms"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>8.0}ms {:>8}",
            "failover_gap_ms_median",
            "-",
            format!("{:?}", r.failover_gaps_ms),
            r.failover_gap_ms_median,
            "≤250ms"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>10}",
            "failover lost / resets",
            "-",
            "-",
            format!("{} / {}", r.failover_lost, r.failover_resets)
        );
        for (what, gaps, median) in [
            (
                "storage_handover_ms",
                &r.storage_handovers_ms,
                r.storage_handover_ms,
            ),
            (
                "uplink_handover_ms",
                &r.uplink_handovers_ms,
                r.uplink_handover_ms,
            ),
        ] {
            println!(
                "{:<40} {:>12} {:>12} {:>8.0}ms {:>8}",
                what,
                "-",
                format!("{gaps:?}"),
                median,
                "-"
            );
        }
        println!(
            "{:<40} {:>12} {:>12} {:>10}",
            "handover lost / resets",
            "-",
            "-",
            format!("{} / {}", r.handover_lost, r.handover_resets)
        );
        println!(
            "{:<40} {:>12} {:>12} {:>8.1}Mb {:>8}",
            "logging_mbps (measured)", "-", "-", r.logging_mbps, "-"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>8.1}Mb {:>8}",
            format!(
                "formula_mbps ({:.2} MB/s×8 + {:.1} Mb/s)×1.2",
                r.disk_read_mbps, r.net_in_mbps
            ),
            "-",
            "-",
            r.formula_mbps,
            "-"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>8.1}ms {:>8}",
            format!("migrate_pause_ms ({} B sent)", r.migrate_bytes),
            "-",
            format!(
                "{:?}",
                r.migrate_pauses_ms
                    .iter()
                    .map(|p| p.round() as u64)
                    .collect::<Vec<_>>()
            ),
            r.migrate_pause_ms,
            "≤50ms"
        );
        let b = &r.migrate_big;
        println!(
            "{:<40} {:>12} {:>12} {:>8.1}ms {:>8}",
            format!(
                "migrate_pause_ms_big ({} MiB touched)",
                b.migrate_big_memory_bytes >> 20
            ),
            format!("{} rounds", b.migrate_big_rounds),
            format!(
                "{:.1}/{:.2}MiB",
                b.migrate_big_running_bytes as f64 / (1u64 << 20) as f64,
                b.migrate_big_stopped_bytes as f64 / (1u64 << 20) as f64
            ),
            b.migrate_pause_ms_big,
            "≤50ms"
        );
        let d = &r.disk;
        println!(
            "{:<40} {:>11.2}s {:>11.2}s {:>10.3} {:>8}",
            format!("disk_ratio (filechurn, {} steps)", d.disk_steps),
            d.disk_unprotected_s,
            d.disk_ft_s,
            d.disk_ratio,
            "-"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>10} {:>8}",
            "  writes behind in the FT run", "-", "-", d.disk_writes_behind, "-"
        );
        println!(
            "{:<40} {:>11.2}s {:>11.2}s {:>10.3} {:>8}",
            "  the same, --no-write-behind",
            d.disk_unprotected_s,
            d.disk_ft_no_write_behind_s,
            d.disk_ratio_no_write_behind,
            "-"
        );
        println!(
            "{:<40} {:>10.1}µs {:>10.1}µs {:>10.3} {:>8}",
            "primary_cpu_ratio (CPU per op)",
            r.primary_cpu_us_per_op_unprotected,
            r.primary_cpu_us_per_op_ft,
            r.primary_cpu_ratio,
            "≤1.15"
        );
        println!(
            "{:<40} {:>12.4} {:>12.4} {:>10.4} {:>8}",
            "  primary_wakes_per_op (threads woken)",
            r.primary_wakes_per_op_unprotected,
            r.primary_wakes_per_op_ft,
            r.primary_wakes_per_op_ft - r.primary_wakes_per_op_unprotected,
            "-"
        );
        match (r.wake_cpu_us, r.extra_wakes_cpu_us_per_op) {
            (Some(wake), Some(extra)) => {
                println!(
                    "{:<40} {:>12} {:>12} {:>8.2}µs {:>8}",
                    "  wake_cpu_us (one wake, both sides)", "-", "-", wake, "-"
                );
                println!(
                    "{:<40} {:>12} {:>10.2}µs {:>8.2}µs {:>8}",
                    "  added µs/op: measured | wakes × cost",
                    "-",
                    r.primary_cpu_us_per_op_ft - r.primary_cpu_us_per_op_unprotected,
                    extra,
                    "-"
                );
            }
            _ => println!(
                "  wake_cpu_us skipped: {}",
                r.wake_skipped.as_deref().unwrap_or("not measured")
            ),
        }
        println!(
            "{:<40} {:>12} {:>12} {:>10.3} {:>8}",
            "secondary_cpu_ratio (secondary ÷ primary)", "-", "-", r.secondary_cpu_ratio, "≤0.6"
        );
        println!(
            "{:<40} {:>8.1}ms/s {:>8.1}ms/s {:>8.1}ms/s {:>8}",
            "idle_cpu (VM idle; FT: primary | second.)",
            r.idle_cpu_ms_per_s_unprotected,
            r.idle_cpu_ms_per_s_primary,
            r.idle_cpu_ms_per_s_secondary,
            "-"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>8.2}µs {:>8}",
            format!(
                "channel_cpu_us_per_event ({} ev, +release)",
                r.channel_events
            ),
            "-",
            "-",
            r.channel_cpu_us_per_event,
            "-"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>10} {:>8}",
            "channel_frames | by VM thread | acks",
            "-",
            "-",
            format!(
                "{} | {} | {}",
                r.channel_frames, r.channel_frames_from_vm, r.channel_acks
            ),
            "-"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>10} {:>8}",
            "writes behind: all | by ft-release",
            "-",
            "-",
            format!(
                "{} | {}",
                r.channel_writes_behind, r.channel_writes_behind_by_releaser
            ),
            "-"
        );
        println!(
            "{:<40} {:>12} {:>12} {:>10} {:>8}",
            format!("spurious_failovers ({} s soak, busy)", r.soak_secs),
            "-",
            "-",
            r.spurious_failovers,
            "0"
        );
        print_join_table(&r.join);
    }
    Ok(0)
}

fn print_ft_header() {
    println!(
        "{:<40} {:>12} {:>12} {:>10} {:>8}",
        "measure", "unprotected", "FT", "result", "goal"
    );
}

fn print_join_table(j: &JoinBench) {
    println!(
        "{:<40} {:>12} {:>12} {:>9.2}s {:>8}",
        format!(
            "join_s ({} MiB of values, {} s load)",
            j.join_filled_mib, j.join_load_s
        ),
        "-",
        format!("rss {:.0} MiB", j.join_primary_rss_mib),
        j.join_s,
        "≤5s"
    );
    println!(
        "{:<40} {:>12} {:>12} {:>8.1}ms {:>8}",
        format!(
            "enable_pause_ms (gap−interval, {} ev)",
            j.join_events_streamed
                .map_or_else(|| "?".to_string(), |n| n.to_string())
        ),
        "-",
        format!(
            "{} − {:.1} ms",
            j.enable_max_gap_ms, j.enable_checker_interval_ms
        ),
        j.enable_pause_ms,
        "≤10ms"
    );
    println!(
        "{:<40} {:>12} {:>12} {:>8}ms {:>8}",
        "  checker's max gap, 2 s, no join", "-", "-", j.enable_baseline_gap_ms, "-"
    );
    println!(
        "{:<40} {:>12} {:>12} {:>8.1}ms {:>8}",
        "checkpoint_pause_ms (lone primary, max)",
        "-",
        format!("{} taken", j.checkpoints),
        j.checkpoint_pause_ms,
        "-"
    );
    println!(
        "{:<40} {:>12} {:>12} {:>7}KiB {:>8}",
        "  pre-copied; most copied in a pause",
        "-",
        format!("{} of {}", j.checkpoints_precopied, j.checkpoints),
        j.checkpoint_stopped_kib_max,
        "-"
    );
}

/// What the checkpoints a copy reported as pre-copied copied in their pause, in KiB
/// (their "...; pre-copied M MiB in R rounds while it ran, K KiB in the pause" lines).
fn checkpoint_stopped_kib(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("checkpoint at event "))
        .filter_map(|l| l.split("; pre-copied ").nth(1))
        .filter_map(|rest| {
            rest.split(" KiB in the pause")
                .next()?
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The pauses a copy reported for its checkpoints in its output, in ms.
fn checkpoint_pauses(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("checkpoint at event "))
        .filter_map(|l| l.split("(the VM paused ").nth(1))
        .filter_map(|rest| rest.split(" ms)").next()?.parse().ok())
        .collect()
}

/// From a primary's output, its secondary's "attached from event A; release point R": R − A.
fn attached_span(log: &str) -> Option<u64> {
    let number =
        |s: &str| -> Option<u64> { s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok() };
    let rest = log.split(" attached from event ").nth(1)?;
    let from = number(rest)?;
    let release = number(rest.split("; release point ").nth(1)?)?;
    release.checked_sub(from)
}

/// A process's resident memory in MiB (0 if unreadable).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, "VmRSS:")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Run redis-benchmark from `client_ns` against `ip` to its end (at most `limit_s`).
fn redis_benchmark_quiet(client_ns: &str, ip: &str, limit_s: u64, args: &[&str]) -> Result<()> {
    let status = crate::client::redis_benchmark(client_ns, ip, limit_s)
        .arg("-q")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running redis-benchmark (package redis-tools)")?;
    if !status.success() {
        bail!("redis-benchmark {args:?} failed: {status}");
    }
    Ok(())
}

/// FT enabled on a busy kvd: kvd alone as an `ft primary` in a fresh lab `lab_name`, filled
/// with 64 KiB values (256 MiB; 64 MiB with --quick), then a minute (5 s) of the standard
/// load, which then stops; then a secondary starts on host2 and joins (from the latest
/// checkpoint plus the events since) while the INCR checker runs.
fn join_rows(lab_name: &str, args: &FtBenchArgs) -> Result<JoinBench> {
    use crate::demo::{FtLab, VM_IP};
    not_interrupted()?;
    let quick = args.flags.quick;
    let (keys, load_s): (u64, u64) = if quick { (1024, 5) } else { (4096, 60) };
    let filled_mib = keys * 64 / 1024;
    progress(
        args.flags.json,
        &format!("join: kvd as a lone FT primary, filling {filled_mib} MiB of values"),
    );
    let mut lab =
        FtLab::start_primary(lab_name, false, args.timeout_ms, &["--memory-mib", "1024"])?;
    let client = lab.client_ns();
    // Random keys over `keys` names, twice as many SETs: most names get a value.
    let (r, n) = (keys.to_string(), (keys * 2).to_string());
    redis_benchmark_quiet(
        &client,
        VM_IP,
        900,
        &["-t", "set", "-d", "65536", "-r", &r, "-n", &n, "-c", "20"],
    )?;
    progress(
        args.flags.json,
        &format!(
            "join: {load_s} s of redis-benchmark load (SET, GET, INCR; 20 clients, pipeline 8)"
        ),
    );
    let mut load = background_load(&client, "1000000000")?;
    let loaded = pause(Duration::from_secs(load_s));
    let _ = load.kill();
    let _ = load.wait();
    loaded?;
    let rss = rss_mib(lab.primary_pid());
    let pauses = checkpoint_pauses(&lab.log("primary"));
    let stopped_kib = checkpoint_stopped_kib(&lab.log("primary"));

    progress(
        args.flags.json,
        "join: the INCR checker on, 2 s alone, then a secondary starting on host2",
    );
    let baseline = lab.start_checker("bench:baseline");
    std::thread::sleep(Duration::from_secs(2));
    let baseline = baseline.finish()?;
    let checker_start = Instant::now();
    let checker = lab.start_checker("bench:join");
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    lab.start_secondary()?;
    let limit = Duration::from_secs(120);
    while !lab.status().contains("protected=true") {
        if let Err(e) = not_interrupted() {
            let _ = checker.finish();
            return Err(e);
        }
        if start.elapsed() > limit {
            let _ = checker.finish();
            // The primary's side of it too: which of the two closed the channel, and why.
            let primary = lab.log("primary");
            let tail: Vec<&str> = primary.lines().rev().take(20).collect();
            bail!(
                "the secondary did not join within {} s; its output:\n{}\nthe primary's last lines:\n{}",
                limit.as_secs(),
                lab.log("secondary"),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let join_s = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let rep = checker.finish()?;
    let ran_ms = checker_start.elapsed().as_secs_f64() * 1000.0;
    if rep.acked == 0 || rep.resets > 0 || !rep.errors.is_empty() || rep.out_of_order > 0 {
        bail!("the checker saw trouble during the join: {rep:?}");
    }
    let interval = ran_ms / rep.acked as f64;
    let join_from_event = lab
        .log("secondary")
        .split("joining from the checkpoint at event ")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        });
    Ok(JoinBench {
        join_s,
        enable_pause_ms: (rep.max_gap_ms as f64 - interval).max(0.0),
        enable_max_gap_ms: rep.max_gap_ms,
        enable_checker_interval_ms: interval,
        enable_baseline_gap_ms: baseline.max_gap_ms,
        checkpoint_pause_ms: pauses.iter().copied().fold(0.0, f64::max),
        checkpoints: pauses.len(),
        checkpoints_precopied: stopped_kib.len(),
        checkpoint_stopped_kib_max: stopped_kib.iter().copied().max().unwrap_or(0),
        join_primary_rss_mib: rss,
        join_filled_mib: filled_mib,
        join_load_s: load_s,
        join_from_event,
        join_events_streamed: attached_span(&lab.log("primary")),
    })
}

/// The standard load at kvd (SET, GET, INCR; 20 clients, pipeline 8) in the background,
/// `requests` of it at most: the caller stops it (kill) when it has measured enough.
fn background_load(client: &str, requests: &str) -> Result<std::process::Child> {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            client,
            "redis-benchmark",
            "-h",
            crate::demo::VM_IP,
        ])
        .args([
            "-t",
            "set,get,incr",
            "-n",
            requests,
            "-c",
            "20",
            "-P",
            "8",
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting redis-benchmark")
}

fn median_f64(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Live migration of a kvd that touched much memory: see [`migrate_rows`].
#[derive(Serialize)]
struct MigrateBig {
    /// The guest's pause (unwind to the receiver's live) migrating kvd filled with
    /// ≥ 128 MiB of values, under the standard load (goal ≤ 50 ms).
    migrate_pause_ms_big: f64,
    /// Its memory at the migration.
    migrate_big_memory_bytes: u64,
    /// Memory sent while the guest ran (the whole, then the rounds), and in its pause.
    migrate_big_running_bytes: u64,
    migrate_big_stopped_bytes: u64,
    migrate_big_rounds: u32,
}

/// kvd powered on at host1 of a fresh two-host lab `lab_name`, under redis-benchmark,
/// moved `migrations` times between host1 and host2 with `vm migrate`'s request: each
/// migration's pause (as the source measured it) and the last one's bytes sent; then filled with 160 MiB of 64 KiB values, the
/// load on, and migrated once more (its memory streamed while it runs: [`MigrateBig`]).
fn migrate_rows(
    lab_name: &str,
    migrations: u32,
    json: bool,
) -> Result<(Vec<f64>, u64, MigrateBig)> {
    use crate::demo::VM_IP;
    crate::lab::up(lab_name, 2)?;
    let _guard = LabGuard(lab_name.to_string());
    let shared = crate::lab::shared_dir(lab_name);
    let ds = shared.join("kvd-data");
    std::fs::create_dir_all(&ds)?;
    let kvd = guests::file("kvd.wasm")?.display().to_string();
    let ds = ds.display().to_string();
    // Control sockets where the bench (on the machine) can reach them: not through a
    // host's view of the shared storage.
    let run = crate::lab::run_dir(lab_name);
    let sock = |i: u32| run.join(format!("vm{i}.sock"));
    let nic = format!("bridge=br-vm,mac=02:00:00:00:00:10,ip={VM_IP}/24");
    let first = sock(0).display().to_string();
    let mut vm = VmProcess::start(
        &crate::lab::host_ns(lab_name, 1),
        &[
            "vm",
            "run",
            "--wasm",
            &kvd,
            "--datastore",
            &ds,
            "--nic",
            &nic,
            "--listen",
            "tcp:6379",
            "--api-sock",
            &first,
        ],
    )?;
    let client = crate::lab::ns(lab_name, "client");
    wait_for_kvd(&client, VM_IP)?;
    wait_until("the control socket", || sock(0).exists())?;
    // Migration `i`: a receiver on the other host, the VM moved there.
    let migrate = |i: u32, vm: &mut VmProcess| -> Result<machine::control::SnapshotReply> {
        let host = if i.is_multiple_of(2) { 2 } else { 1 };
        let to = format!("10.78.0.{}:{}", 10 + host, 7100 + i);
        let next = sock(i + 1).display().to_string();
        let receiver = VmProcess::start(
            &crate::lab::host_ns(lab_name, host),
            &[
                "vm",
                "receive",
                "--listen",
                &to,
                "--wasm",
                &kvd,
                "--datastore",
                &ds,
                "--bridge",
                "br-vm",
                "--api-sock",
                &next,
            ],
        )?;
        wait_until("the receiver", || sock(i + 1).exists())?;
        let (code, reply) = machine::control::request(
            &sock(i),
            "PUT",
            "/migrate",
            Some(&serde_json::json!({ "to": to })),
            Duration::from_secs(120),
        )?;
        if code != 200 {
            bail!("migration {} refused ({code}): {reply}", i + 1);
        }
        let r: machine::control::SnapshotReply = serde_json::from_value(reply)?;
        wait_until("the source's exit", || {
            vm.0.try_wait().is_ok_and(|s| s.is_some())
        })?;
        *vm = receiver;
        Ok(r)
    };
    // The load: kept running through every migration, stopped at the end.
    let mut load = background_load(&client, "100000000")?;
    let result = (|| {
        let mut pauses = Vec::new();
        let mut bytes = 0;
        for i in 0..migrations {
            not_interrupted()?;
            std::thread::sleep(Duration::from_millis(300));
            let r = migrate(i, &mut vm)?;
            pauses.push(r.pause_ms);
            bytes = r.bytes;
        }
        progress(
            json,
            "live migration: kvd filled with 160 MiB of values, under load, moved once more",
        );
        redis_benchmark_quiet(
            &client,
            VM_IP,
            600,
            &[
                "-t", "set", "-d", "65536", "-r", "2560", "-n", "8000", "-c", "20",
            ],
        )?;
        std::thread::sleep(Duration::from_millis(500));
        let r = migrate(migrations, &mut vm)?;
        let p = r.precopied.unwrap_or_default();
        let big = MigrateBig {
            migrate_pause_ms_big: r.pause_ms,
            migrate_big_memory_bytes: p.memory_bytes,
            migrate_big_running_bytes: p.running_bytes,
            migrate_big_stopped_bytes: if p.rounds == 0 {
                r.bytes
            } else {
                p.stopped_bytes
            },
            migrate_big_rounds: p.rounds,
        };
        Ok((pauses, bytes, big))
    })();
    let _ = load.kill();
    let _ = load.wait();
    drop(vm);
    result
}

/// `tandem bench cluster`: how fast the cluster heals, measured through its API.
#[derive(clap::Args)]
pub struct ClusterBenchArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Repetitions of each measurement (median and worst reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// The lab's name (taken down and made afresh).
    #[arg(long, default_value = "bcluster")]
    name: String,
}

#[derive(Serialize)]
struct ClusterBench {
    runs: u32,
    hosts: u32,
    /// kvd's primary's host killed → kvd Protected again (its secondary on a live host),
    /// median over the runs (goal ≤ 10 s); `reprotect_worst_s` the worst run.
    reprotect_s: f64,
    reprotect_worst_s: f64,
    /// The same kill → the cluster showing kvd's primary on another host (the clients'
    /// failover itself is far quicker: see `bench ft`'s gap_ms).
    failover_seen_s: f64,
    failover_seen_worst_s: f64,
    /// The same kill (web, httpd not FT, ran there too) → web serving from another host
    /// (goal ≤ 15 s).
    ha_restart_s: f64,
    ha_restart_worst_s: f64,
    /// The master's host killed → another master in `cluster status`.
    master_failover_s: f64,
    master_failover_worst_s: f64,
    /// A killed host revived (`lab revive`) → back in `host list`.
    rejoin_s: f64,
    rejoin_worst_s: f64,
    /// Each run's figures, in order.
    reprotect_runs_s: Vec<f64>,
    ha_restart_runs_s: Vec<f64>,
    master_failover_runs_s: Vec<f64>,
}

fn worst(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NAN, f64::max)
}

pub fn cluster(args: &ClusterBenchArgs) -> Result<u8> {
    use crate::cluster_lab::{ClusterLab, KillOutcome, Progress};
    use cluster::model::Priority;

    let hosts = 4;
    progress(
        args.json,
        &format!("lab {}: {hosts} hosts running a cluster", args.name),
    );
    let say = if args.json {
        Progress::Quiet
    } else {
        Progress::Stderr("bench")
    };
    let c = ClusterLab::up(&args.name, hosts, false, say)?;
    c.create_kvd(Priority::High)?;
    let v = c.ft_on("kvd")?;
    c.create_web(v.primary_host.as_deref().unwrap_or("host1"))?;
    let (mut reprotect, mut failover, mut ha, mut master, mut rejoin) =
        (vec![], vec![], vec![], vec![], vec![]);
    let limit = Duration::from_secs(60);
    for run in 1..=args.runs {
        // kvd's primary's host, with web beside it, killed.
        let p = c.vm("kvd")?.primary_host.context("kvd has no primary")?;
        c.place_web(&p)?;
        progress(
            args.json,
            &format!("run {run}/{}: killing {p} (kvd's primary, web)", args.runs),
        );
        let mut out = KillOutcome::default();
        c.kill_and_watch(&p, true, limit, &mut out)?;
        let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
        reprotect.push(secs(out.protected));
        failover.push(secs(out.failover));
        ha.push(secs(out.web_back));
        rejoin.push(c.revive(&p)?.as_secs_f64());

        // The master's host killed (whatever runs there: the cluster heals it too).
        let m = c.master()?.context("the cluster has no master")?;
        progress(
            args.json,
            &format!("run {run}/{}: killing {m} (the master)", args.runs),
        );
        c.kill(&m)?;
        let (_, took) = c.wait_until("another master", limit, || {
            Ok(c.master()?.filter(|n| *n != m))
        })?;
        master.push(took.as_secs_f64());
        c.wait_until("kvd protected and web serving", limit, || {
            let v = c.vm("kvd")?;
            let ok = v.ft == cluster::model::FtStatus::Protected
                && v.primary_host.as_deref() != Some(m.as_str())
                && v.secondary_host.as_deref() != Some(m.as_str())
                && !c.web_on(&m)?
                && c.web_serves();
            Ok(ok.then_some(()))
        })?;
        rejoin.push(c.revive(&m)?.as_secs_f64());
    }
    let r = ClusterBench {
        runs: args.runs,
        hosts,
        reprotect_s: median_f64(&reprotect),
        reprotect_worst_s: worst(&reprotect),
        failover_seen_s: median_f64(&failover),
        failover_seen_worst_s: worst(&failover),
        ha_restart_s: median_f64(&ha),
        ha_restart_worst_s: worst(&ha),
        master_failover_s: median_f64(&master),
        master_failover_worst_s: worst(&master),
        rejoin_s: median_f64(&rejoin),
        rejoin_worst_s: worst(&rejoin),
        reprotect_runs_s: reprotect,
        ha_restart_runs_s: ha,
        master_failover_runs_s: master,
    };
    not_interrupted()?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "cluster ({} hosts, {} runs)                median    worst   goal",
            r.hosts, r.runs
        );
        let row = |what: &str, m: f64, w: f64, goal: &str| {
            println!("  {what:<38} {m:>6.2} s {w:>6.2} s  {goal}");
        };
        row(
            "reprotect_s (kill → Protected)",
            r.reprotect_s,
            r.reprotect_worst_s,
            "≤ 10 s",
        );
        row(
            "failover_seen_s (kill → new primary)",
            r.failover_seen_s,
            r.failover_seen_worst_s,
            "",
        );
        row(
            "ha_restart_s (kill → web serving)",
            r.ha_restart_s,
            r.ha_restart_worst_s,
            "≤ 15 s",
        );
        row(
            "master_failover_s (kill → master)",
            r.master_failover_s,
            r.master_failover_worst_s,
            "",
        );
        row(
            "rejoin_s (revive → in host list)",
            r.rejoin_s,
            r.rejoin_worst_s,
            "",
        );
    }
    Ok(0)
}

/// `tandem bench soak`: kvd under FT and load, its primary's host killed again and again.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// How many times to kill the current primary's host.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    kills: u32,
    /// Hosts in the lab (at least 3: a failover needs a third host to re-protect on).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..=16))]
    hosts: u32,
    /// Print one JSON object instead of the lines.
    #[arg(long)]
    json: bool,
    /// The lab's name (taken down and made afresh).
    #[arg(long, default_value = "soak")]
    name: String,
}

#[derive(Serialize)]
struct Soak {
    pass: bool,
    kills: u32,
    /// Kills after which kvd's primary moved, and after which it was Protected again.
    failovers: u32,
    reprotected: u32,
    /// The cluster's own counts (`vm show kvd`).
    cluster_failovers: u64,
    cluster_reprotections: u64,
    /// Acknowledged INCRs missing from the counter read back at the end.
    lost: i64,
    resets: u64,
    /// Checker replies that were errors or out of order.
    checker_errors: u64,
    acked: u64,
    /// The checker's longest silence between two replies, ms.
    gap_ms: u64,
    /// Worst and median kill → Protected, s.
    reprotect_s: f64,
    reprotect_median_s: f64,
    /// Worst revive → back in `host list`, s.
    rejoin_worst_s: f64,
    load_runs: u32,
    load_failures: Vec<String>,
    /// Why the soak stopped early, if it did.
    error: Option<String>,
}

pub fn soak(args: &SoakArgs) -> Result<u8> {
    use crate::cluster_lab::{ClusterLab, KillOutcome, Progress};
    use cluster::model::Priority;

    let progress = if args.json {
        Progress::Quiet
    } else {
        Progress::Stdout("soak")
    };
    let c = ClusterLab::up(&args.name, args.hosts, false, progress)?;
    c.create_kvd(Priority::High)?;
    let v = c.ft_on("kvd")?;
    c.say(&format!(
        "kvd Protected (primary {}, secondary {}); load: redis-benchmark runs and the checker",
        v.primary_host.as_deref().unwrap_or("?"),
        v.secondary_host.as_deref().unwrap_or("?")
    ));
    let checker = c.start_checker("soak:counter");
    let load = c.start_load();
    std::thread::sleep(Duration::from_millis(1000));
    checker.mark();
    let (mut failovers, mut reprotected) = (0u32, 0u32);
    let (mut reprotect, mut rejoin) = (vec![], vec![]);
    let mut error = None;
    for k in 1..=args.kills {
        let step = (|| -> Result<()> {
            let p = c.vm("kvd")?.primary_host.context("kvd has no primary")?;
            c.say(&format!("kill {k}/{}: {p} (kvd's primary)", args.kills));
            let mut out = KillOutcome::default();
            let r = c.kill_and_watch(&p, false, Duration::from_secs(60), &mut out);
            failovers += u32::from(out.failover.is_some());
            if let Some(d) = out.protected {
                reprotected += 1;
                reprotect.push(d.as_secs_f64());
            }
            r?;
            rejoin.push(c.revive(&p)?.as_secs_f64());
            c.say(&format!("{p} revived and back in host list"));
            Ok(())
        })();
        if let Err(e) = step {
            c.say(&format!("stopped at kill {k}: {e:#}"));
            error = Some(format!("kill {k}: {e:#}"));
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let rep = checker.finish()?;
    let load = load.finish()?;
    let final_value: i64 = c
        .redis(&["GET", "soak:counter"])
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let (cf, cr) = c
        .vm("kvd")
        .map(|v| (v.failovers, v.reprotections))
        .unwrap_or((0, 0));
    let lost = (rep.last_value - final_value).max(0);
    let checker_errors = rep.errors.len() as u64 + rep.out_of_order;
    let pass = error.is_none()
        && failovers == args.kills
        && reprotected == args.kills
        && lost == 0
        && rep.resets == 0
        && checker_errors == 0
        && rep.after_mark > 0
        && load.ok();
    let r = Soak {
        pass,
        kills: args.kills,
        failovers,
        reprotected,
        cluster_failovers: cf,
        cluster_reprotections: cr,
        lost,
        resets: rep.resets,
        checker_errors,
        acked: rep.acked,
        gap_ms: rep.max_gap_ms,
        reprotect_s: worst(&reprotect),
        reprotect_median_s: median_f64(&reprotect),
        rejoin_worst_s: worst(&rejoin),
        load_runs: load.runs,
        load_failures: load.failures,
        error,
    };
    not_interrupted()?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for e in rep.errors.iter().take(3) {
            c.say(&format!("checker error: {e}"));
        }
        for f in &r.load_failures {
            c.say(&format!("load failed: {f}"));
        }
        println!(
            "soak: {} kills={} failovers={} reprotected={} lost={} resets={} checker_errors={} acked={} gap_ms={} reprotect_s={:.1} (median {:.1}) rejoin_worst_s={:.1} load_runs={} (cluster counts {} failovers, {} re-protections)",
            if r.pass { "PASS" } else { "FAIL" },
            r.kills,
            r.failovers,
            r.reprotected,
            r.lost,
            r.resets,
            r.checker_errors,
            r.acked,
            r.gap_ms,
            r.reprotect_s,
            r.reprotect_median_s,
            r.rejoin_worst_s,
            r.load_runs,
            r.cluster_failovers,
            r.cluster_reprotections
        );
    }
    Ok(if r.pass { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checkpoint lines as `lockstep::checkpoint` writes them.
    #[test]
    fn checkpoint_lines_are_read_whether_pre_copied_or_not() {
        let log = " INFO checkpoint at event 7 in /s/a.snap (the VM paused 161.0 ms)\n\
                   x\n \
                   INFO checkpoint at event 9 in /s/b.snap (the VM paused 2.5 ms); pre-copied \
                   256.0 MiB in 3 rounds while it ran, 120 KiB in the pause\n \
                   INFO checkpoint at event 11 in /s/c.snap (the VM paused 0.9 ms); pre-copied \
                   256.5 MiB in 2 rounds while it ran, 8 KiB in the pause\n";
        assert_eq!(checkpoint_pauses(log), [161.0, 2.5, 0.9]);
        assert_eq!(checkpoint_stopped_kib(log), [120, 8]);
    }

    /// The live threads' CPU counts a process's work to well under a tick, and not its
    /// sleep.
    #[test]
    fn live_threads_cpu_counts_work_not_sleep() {
        let spawn = |script: &str| {
            std::process::Command::new("sh")
                .args(["-c", script])
                .spawn()
                .unwrap()
        };
        let mut sleeper = spawn("sleep 30");
        let mut worker = spawn("while :; do :; done");
        // However busy the machine, the spinner gets its 50 ms within seconds.
        let deadline = Instant::now() + Duration::from_secs(10);
        while live_threads_cpu_s(worker.id()) < 0.05 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (slept, worked) = (
            live_threads_cpu_s(sleeper.id()),
            live_threads_cpu_s(worker.id()),
        );
        for c in [&mut sleeper, &mut worker] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(worked >= 0.05, "10 s of spinning counted as {worked} s");
        assert!(slept < worked / 2.0, "a sleep counted as {slept} s of CPU");
        assert_eq!(
            live_threads_cpu_s(u32::MAX),
            0.0,
            "no such process: nothing"
        );
    }

    /// A process's wakes are the sum of its threads' voluntary switches; a thread that
    /// sleeps ten times waited ten times more.
    #[test]
    fn a_process_wakes_are_its_threads_voluntary_switches() {
        assert_eq!(
            voluntary_switches(
                "Name:\tx\nvoluntary_ctxt_switches:\t42\nnonvoluntary_ctxt_switches:\t7\n"
            ),
            Some(42)
        );
        assert_eq!(voluntary_switches("Name:\tx\n"), None);
        let dir = tempfile::tempdir().unwrap();
        for (tid, n) in [(1, 3), (2, 4)] {
            let task = dir.path().join(tid.to_string());
            std::fs::create_dir(&task).unwrap();
            std::fs::write(
                task.join("status"),
                format!(
                    "Name:\tt\nvoluntary_ctxt_switches:\t{n}\nnonvoluntary_ctxt_switches:\t9\n"
                ),
            )
            .unwrap();
        }
        let tasks = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|t| t.unwrap().path());
        assert_eq!(tasks_wakes(tasks), 7);
        assert_eq!(process_wakes(u32::MAX), 0, "a process that is not there");
        let (waits, _) = std::thread::spawn(|| {
            let before = thread_usage();
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let after = thread_usage();
            (after.0 - before.0, after.1 - before.1)
        })
        .join()
        .unwrap();
        assert!(waits >= 10, "{waits}");
    }

    /// Each turn wakes the thread on the other core: the two threads wait about once a
    /// turn (each read sleeps at most once), each wait costs CPU, and the turns end.
    #[test]
    fn a_wake_costs_some_cpu_and_the_turns_end() {
        let (us, waits) = wake_cpu_us(2_000).unwrap();
        eprintln!("one wake: {us:.2} µs of CPU over {waits} waits");
        assert!(us.is_finite() && us > 0.0 && us < 1_000.0, "{us}");
        // On one core the woken reader may run before its waker blocks: half the waits.
        let least = if allowed_cpus().len() >= 2 {
            1_500
        } else {
            1_000
        };
        assert!(
            (least..=2_100).contains(&waits),
            "{waits} waits for 2000 turns"
        );
        assert_eq!(wake_cpu_us(0).unwrap().1, 0, "no turn, no wait");
    }
}
