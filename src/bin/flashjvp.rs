//! `flashjvp`: run an op's JVP or VJP on tensors from a safetensors file (DESIGN.md section 8).
//! Every failure is one line `error: ...` on stderr and a non-zero exit: 2 for usage errors
//! (clap's), 1 for the rest.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use flashjvp::cli::{self, Mode, OpKind};
use flashjvp::device::{probe_cuda_libraries, CUDA_DRIVER_NAMES, NVRTC_NAMES};
use flashjvp::{io, DType, Device, DeviceRequest};

const TENSORS_HELP: &str = "\
Tensors (safetensors in, safetensors out; contiguous, row-major; inputs F32, F64, BF16 or F16):
  attention      q [B,H,Nq,d], k [B,H,Nk,d], v [B,H,Nk,dv]; tangents tq, tk, tv alike;
                 optional scalar `scale` (default 1/sqrt(d)).
                 jvp -> o, to [B,H,Nq,dv], lse, tlse [B,H,Nq]; vjp takes go [B,H,Nq,dv] -> dq, dk, dv
  layernorm_mod  x [T,C], tx; scale, shift [C] or [T,C]; tscale, tshift alike;
                 optional scalar `eps` (default 1e-6). jvp -> y, ty; vjp takes gy -> dx, dscale, dshift
  mlp            x [T,C], tx; w1 [Hd,C], b1 [Hd], w2 [C,Hd], b2 [C] (GELU tanh).
                 jvp -> y, ty; vjp takes gy -> dx, dw1, db1, dw2, db2
Tangents are optional: an absent tangent is zero (attention with no tk and tv takes the faster
path for constant K and V). Scalars are 0-d or 1-element tensors. Tensors the op does not use are
ignored, so one file can feed both jvp and vjp.";

#[derive(Parser)]
#[command(
    name = "flashjvp",
    version,
    about = "Forward-mode (JVP) and reverse-mode (VJP) derivatives of transformer ops",
    after_help = TENSORS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Primal outputs and their tangents along the input tangents
    #[command(after_help = TENSORS_HELP)]
    Jvp(OpArgs),
    /// Gradients of the inputs given the output cotangent
    #[command(after_help = TENSORS_HELP)]
    Vjp(OpArgs),
    /// Version, CPU threads and which CUDA libraries this machine has
    Info,
}

#[derive(clap::Args)]
struct OpArgs {
    /// The op
    #[arg(value_enum)]
    op: OpKind,
    /// safetensors file with the op's inputs
    #[arg(long, short)]
    input: PathBuf,
    /// safetensors file to write the outputs to (replaced atomically)
    #[arg(long, short)]
    output: PathBuf,
    /// Where to compute: auto picks the GPU when one is usable, else the CPU
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Computation and output dtype [default: the dtype of the op's first input; bf16 and f16
    /// inputs compute in f32 on the CPU]
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F64,
    Bf16,
}

fn main() -> ExitCode {
    // A panic is a bug in flashjvp; even then the user sees one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!(
            "error: internal error, flashjvp panicked{at}: {} (please report this bug)",
            one_line(&msg)
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> flashjvp::Result<()> {
    match cli.command {
        Command::Jvp(args) => run_op(Mode::Jvp, args),
        Command::Vjp(args) => run_op(Mode::Vjp, args),
        Command::Info => {
            info();
            Ok(())
        }
    }
}

fn run_op(mode: Mode, args: OpArgs) -> flashjvp::Result<()> {
    let request = match args.device {
        DeviceArg::Auto => DeviceRequest::Auto,
        DeviceArg::Cpu => DeviceRequest::Cpu,
        DeviceArg::Cuda => DeviceRequest::Cuda,
    };
    let device = request.resolve()?;
    let dtype = args.dtype.map(|d| match d {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F64 => DType::F64,
        DTypeArg::Bf16 => DType::BF16,
    });
    let inputs = io::load_safetensors(&args.input)?;
    let outputs = cli::run(mode, args.op, &inputs, dtype, device)?;
    io::save_safetensors(&args.output, outputs.iter().map(|(n, t)| (n.as_str(), t)))?;
    let summary: Vec<String> = args
        .op
        .outputs(mode)
        .iter()
        .filter_map(|n| outputs.get(*n).map(|t| format!("{n} {:?}", t.shape())))
        .collect();
    let dtype = outputs
        .values()
        .next()
        .map(|t| t.dtype().name())
        .unwrap_or("");
    let device = match (device, request) {
        (Device::Cpu, DeviceRequest::Auto) => "cpu (auto: no CUDA ops in this build)",
        (Device::Cpu, _) => "cpu",
        (Device::Cuda, _) => "cuda",
    };
    println!(
        "{} {} on {device} ({dtype}): wrote {} to {}",
        mode.name(),
        args.op.name(),
        summary.join(", "),
        args.output.display()
    );
    Ok(())
}

fn info() {
    println!("flashjvp {}", env!("CARGO_PKG_VERSION"));
    println!("rayon threads: {}", rayon::current_num_threads());
    let probe = probe_cuda_libraries();
    let found = |lib: Option<&str>, tried: &[&str]| match lib {
        Some(name) => format!("found ({name})"),
        None => format!("not found (tried {})", tried.join(", ")),
    };
    println!("CUDA driver: {}", found(probe.driver, CUDA_DRIVER_NAMES));
    println!("NVRTC: {}", found(probe.nvrtc, NVRTC_NAMES));
    let feature = if cfg!(feature = "cuda") {
        "compiled in (NVRTC kernel compilation)"
    } else {
        "not compiled in"
    };
    println!("cuda feature: {feature}");
    println!("CUDA ops: not part of this build yet (ops run on the CPU)");
}

/// clap's own errors, squeezed to one line (help and version still print in full, exit 0).
fn clap_error(e: clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!("error: a command is required: jvp, vjp or info (see flashjvp --help)");
        return ExitCode::from(2);
    }
    // What went wrong and its context ("[possible values: ...]", tips) come before the usage
    // block; the usage block and the pointer to --help are dropped.
    let text = e.render().to_string();
    let kept: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let line = kept.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("error: {line}");
    ExitCode::from(2)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
