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

use crate::guests;

#[derive(clap::Args)]
pub struct VmBenchArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// A small, fast run (fewer rounds, less work): for smoke tests, not for figures.
    #[arg(long)]
    quick: bool,
    /// Rounds per side (default 5, or 2 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
}

#[derive(Serialize)]
struct VmBench {
    /// Throughput of the file- and clock-heavy guest recorded ÷ unrecorded (goal ≥ 0.95).
    record_ratio: f64,
    /// Speed of the CPU-bound guest under Tandem ÷ the same C compiled native (goal ≥ 0.7).
    wasm_native_ratio: f64,
    io_unrecorded_s: f64,
    io_recorded_s: f64,
    io_events: u64,
    io_log_bytes: u64,
    cpu_wasm_s: f64,
    cpu_native_s: f64,
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

fn progress(json: bool, msg: &str) {
    if !json {
        eprintln!("bench: {msg}");
    }
}

pub fn vm(args: &VmBenchArgs) -> Result<u8> {
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 5 }).max(1);
    let (io_rounds, cpu_scale) = if args.quick {
        ("2000", "1")
    } else {
        ("40000", "40")
    };
    let work = tempfile::tempdir().context("creating a scratch folder")?;

    progress(
        args.json,
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

    progress(args.json, "CPU-bound guest: wasm under Tandem vs native");
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

    let result = VmBench {
        record_ratio: secs(io_plain) / secs(io_rec),
        wasm_native_ratio: secs(cpu_native) / secs(cpu_wasm),
        io_unrecorded_s: secs(io_plain),
        io_recorded_s: secs(io_rec),
        io_events,
        io_log_bytes,
        cpu_wasm_s: secs(cpu_wasm),
        cpu_native_s: secs(cpu_native),
        rounds,
    };
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        print_vm_table(&result);
    }
    Ok(0)
}

/// The guests' console output is not the bench's: keep it off the table.
fn quiet(mut inputs: Inputs) -> Inputs {
    if let Inputs::Live { echo_console, .. } = &mut inputs {
        *echo_console = false;
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
        "{:<34} {:>11.3}s {:>11.3}s {:>8.3} {:>6}",
        "wasm_native_ratio (native ÷ wasm)",
        r.cpu_native_s,
        r.cpu_wasm_s,
        r.wasm_native_ratio,
        "≥0.70"
    );
    println!(
        "recorded run: {} events, log {} bytes ({:.1} bytes/event)",
        r.io_events,
        r.io_log_bytes,
        r.io_log_bytes as f64 / r.io_events.max(1) as f64
    );
}
