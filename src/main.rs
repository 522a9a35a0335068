//! `tandem`: the command-line edge of Tandem. Parses arguments, drives the crates, and
//! turns their typed errors into one clear line and an exit code:
//! 0 success (or the guest's own exit code for `vm run`), 2 bad input, 3 replay divergence.

mod bench;
mod guests;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use machine::{
    DEFAULT_MEMORY_LIMIT, EventSink, Exit, GuestSpec, Inputs, LogReader, LogWriter, Machine,
    MachineError, hex, live_inputs,
};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Fault tolerance for WebAssembly VMs: a primary and a secondary in lockstep",
    long_about = "Tandem runs ordinary wasm32-wasi programs as deterministic VMs. Every \
nondeterministic input a VM observes (clock, entropy, file reads, stdin) is an event in its \
log, so a recorded run replays to the identical execution."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run, record and replay VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Measure Tandem and print a table of ratios measured side by side.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum VmCommand {
    /// Run a wasm32-wasi program as a Tandem VM, optionally recording its event log.
    ///
    /// The guest sees DIR as its preopened directory "/" (fd 3); its stdout and stderr go
    /// to this process's. Exits with the guest's exit code (1 if the guest trapped).
    Run {
        /// The guest module (a wasm32-wasi command).
        #[arg(long, value_name = "FILE")]
        wasm: PathBuf,
        /// The VM's datastore folder, preopened as "/" at fd 3.
        #[arg(long, value_name = "DIR")]
        datastore: Option<PathBuf>,
        /// An argument for the guest (repeat for more); argv[0] is the module's file name.
        #[arg(long = "arg", value_name = "A", allow_hyphen_values = true)]
        args: Vec<String>,
        /// An environment variable for the guest (repeat for more).
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Record every event into this log file.
        #[arg(long, value_name = "LOG")]
        record: Option<PathBuf>,
        /// The guest's memory limit in MiB (fixed for the VM's life).
        #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_LIMIT >> 20)]
        memory_mib: u64,
    },
    /// Replay a recorded log and check the execution is identical.
    ///
    /// Nothing is written to the datastore or the console: outputs are computed and
    /// digested. Prints `replay ok: events=N digest=HEX` (exit 0) or
    /// `replay diverged at event N: WHY` (exit 3).
    Replay {
        /// The log written by `vm run --record`.
        log: PathBuf,
        /// The guest module the log was recorded from.
        #[arg(long, value_name = "FILE")]
        wasm: PathBuf,
        /// The VM's datastore folder (checked to exist; never touched by a replay).
        #[arg(long, value_name = "DIR")]
        datastore: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The VM: recording overhead and wasm speed against native code.
    Vm(bench::VmBenchArgs),
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<MachineError> for Failure {
    fn from(e: MachineError) -> Self {
        match e {
            MachineError::Divergence { .. } => Failure {
                code: 3,
                message: e.to_string(),
            },
            _ => Failure {
                code: 2,
                message: format!("tandem: {e}"),
            },
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            code: 2,
            message: format!("tandem: {e:#}"),
        }
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(VmCommand::Run {
            wasm,
            datastore,
            args,
            env,
            record,
            memory_mib,
        }) => vm_run(
            &wasm,
            datastore.as_deref(),
            args,
            env,
            record.as_deref(),
            memory_mib,
        ),
        Command::Vm(VmCommand::Replay {
            log,
            wasm,
            datastore,
        }) => vm_replay(&log, &wasm, datastore.as_deref()),
        Command::Bench(BenchCommand::Vm(a)) => bench::vm(&a).map_err(Failure::from),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            if f.code == 3 {
                println!("{}", f.message);
            } else {
                eprintln!("{}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn bad(message: String) -> Failure {
    Failure {
        code: 2,
        message: format!("tandem: {message}"),
    }
}

fn check_datastore(datastore: Option<&Path>) -> Result<(), Failure> {
    match datastore {
        Some(d) if !d.is_dir() => Err(bad(format!("datastore {} is not a directory", d.display()))),
        _ => Ok(()),
    }
}

/// The exit code `vm run` passes on for a guest's exit.
fn exit_code(exit: &Exit) -> u8 {
    match exit {
        Exit::Code(c) => (*c).min(255) as u8,
        Exit::Trap(t) => {
            eprintln!("tandem: guest trapped: {t}");
            1
        }
    }
}

fn vm_run(
    wasm: &Path,
    datastore: Option<&Path>,
    args: Vec<String>,
    env: Vec<String>,
    record: Option<&Path>,
    memory_mib: u64,
) -> Result<u8, Failure> {
    if let Some(bad_env) = env.iter().find(|e| !e.contains('=') || e.starts_with('=')) {
        return Err(bad(format!("--env {bad_env:?} is not of the form K=V")));
    }
    if memory_mib == 0 || memory_mib > 4096 {
        return Err(bad(format!(
            "--memory-mib {memory_mib} is outside 1..=4096"
        )));
    }
    check_datastore(datastore)?;
    let machine = Machine::load(wasm)?;
    let spec = GuestSpec {
        args: std::iter::once(guest_name(wasm)).chain(args).collect(),
        env,
        datastore: datastore.is_some(),
        memory_limit: memory_mib << 20,
    };
    let sink = match record {
        Some(path) => Some(Box::new(
            LogWriter::create(path, &machine.log_header(&spec)).map_err(MachineError::from)?,
        ) as Box<dyn EventSink + Send>),
        None => None,
    };
    let report = machine.run(spec, live_inputs(datastore, sink)?)?;
    if let Some(path) = record {
        tracing::info!("log written to {}", path.display());
        println!(
            "recorded: events={} digest={}",
            report.events,
            hex(&report.digest)
        );
    }
    Ok(exit_code(&report.exit))
}

fn guest_name(wasm: &Path) -> String {
    wasm.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest".into())
}

fn vm_replay(log: &Path, wasm: &Path, datastore: Option<&Path>) -> Result<u8, Failure> {
    check_datastore(datastore)?;
    let machine = Machine::load(wasm)?;
    let reader = LogReader::open(log).map_err(MachineError::from)?;
    machine.check_log(reader.header())?;
    let header = reader.header().clone();
    let spec = GuestSpec {
        args: header.args,
        env: header.env,
        datastore: header.datastore,
        memory_limit: header.memory_limit,
    };
    let report = machine.run(
        spec,
        Inputs::Replay {
            source: Box::new(reader),
        },
    )?;
    println!(
        "replay ok: events={} digest={}",
        report.events,
        hex(&report.digest)
    );
    Ok(0)
}
