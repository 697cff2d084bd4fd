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
                 optional scalar `scale` (default 1/sqrt(d)); optional `key_lens` [B] (whole
                 numbers in 1..=Nk: batch entry b attends to its first key_lens[b] keys only).
                 jvp -> o, to [B,H,Nq,dv], lse, tlse [B,H,Nq]; vjp takes go [B,H,Nq,dv] -> dq, dk, dv
  layernorm_mod  x [T,C], tx; scale, shift [C] or [T,C]; tscale, tshift alike;
                 optional scalar `eps` (default 1e-6). jvp -> y, ty; vjp takes gy -> dx, dscale, dshift
  mlp            x [T,C], tx; w1 [Hd,C], b1 [Hd], w2 [C,Hd], b2 [C] (GELU tanh).
                 jvp -> y, ty; vjp takes gy -> dx, dw1, db1, dw2, db2
  rms_norm       x [T,C], tx; w [C], tw; optional scalar `eps` (default 1e-6).
                 jvp -> y, ty; vjp takes gy -> dx, dw
  rope           x [B,N,H,d] (d even), tx; cos, sin [N,d/2] or [B,N,d/2]; optional scalar `halves`
                 (0, default: pairs x[2i], x[2i+1]; 1: x[i], x[i+d/2]). jvp -> y, ty;
                 vjp takes gy [B,N,H,d] -> dx
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
    /// Version, CPU threads, which CUDA libraries this machine has and its GPU
    Info,
    /// Compile every CUDA kernel with NVRTC (no GPU needed) and print its resources; without
    /// --arch, for the GPU's arch, also load them on it and keep them in the kernel cache
    Kernels(KernelsArgs),
    /// Time forward, JVP and backward of an op on the GPU
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct KernelsArgs {
    /// Architectures, comma-separated (e.g. sm_80,sm_90a) [default: the GPU's]
    #[arg(long, value_delimiter = ',')]
    arch: Vec<String>,
    /// Print a JSON array of {kernel, arch, ok, registers, spill_bytes, shared_bytes}
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The op: attention (shape B,H,Nq,Nk,d or B,H,N,d), layernorm_mod (T,C or T,C,G), mlp
    /// (T,C,Hd), dit_block (B,N,C,heads), rms_norm (T,C), rope (B,N,H,d)
    op: String,
    /// Comma-separated sizes [default: a set of representative shapes per op]
    #[arg(long, value_delimiter = ',')]
    shape: Vec<usize>,
    /// Storage dtype
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: GpuDTypeArg,
    /// One JSON object per timed pass and line: {op, pass, shape, dtype, ms, tflops | gbps, ...}
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum GpuDTypeArg {
    Bf16,
    F16,
    F32,
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
    /// Where to compute: auto picks the GPU when one is usable, else the CPU (the GPU: device 0, or the
    /// ordinal in FLASHJVP_DEVICE)
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Computation and output dtype [default: the dtype of the op's first input; bf16 and f16
    /// inputs compute in f32 on the CPU, f64 inputs in f32 on the GPU]
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
    F16,
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
        Command::Kernels(args) => kernels(args),
        Command::Bench(args) => bench(args),
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
        DTypeArg::F16 => DType::F16,
    });
    let inputs = io::load_safetensors(&args.input)?;
    let outputs = cli::run(mode, args.op, &inputs, dtype, device)?;
    io::save_safetensors(&args.output, outputs.iter().map(|(n, t)| (n.as_str(), t)))?;
    // Said once the run succeeded, so that a failure stays a single `error:` line.
    if request == DeviceRequest::Auto {
        eprintln!("flashjvp: --device auto: {}", auto_choice(device));
    }
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
        (Device::Cpu, DeviceRequest::Auto) => "cpu (auto: no usable GPU)",
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

/// What `--device auto` chose, and why.
fn auto_choice(device: Device) -> String {
    match device {
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            if let Ok(g) = flashjvp::cuda::Gpu::get() {
                return format!("running on cuda ({})", g.info().name);
            }
            "running on cuda".into()
        }
        Device::Cpu => match flashjvp::device::cuda_usable() {
            Ok(()) => "running on cpu".into(),
            Err(e) => format!("running on cpu ({})", one_line(&e.to_string())),
        },
    }
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
    /// Which attention kernels a device of arch `arch` takes, in words.
    #[cfg(feature = "cuda")]
    fn attention_kernels(arch: &str) -> String {
        use flashjvp::cuda::attention::small_shared_memory;
        if arch == "sm_90a" {
            "Hopper (wgmma, TMA) for bf16/f16 at head dims 64/72/96/128 with dv == d (unless \
         FLASHJVP_ATTENTION_PATH=sm80), sm_80 ones elsewhere"
                .into()
        } else if small_shared_memory(arch) {
            "sm_80 (mma.sync), on shorter key tiles (99 KiB of shared memory per block)".into()
        } else {
            "sm_80 (mma.sync)".into()
        }
    }

    #[cfg(feature = "cuda")]
    {
        println!("cuda feature: compiled in (NVRTC kernel compilation, cuBLASLt)");
        match flashjvp::cuda::Gpu::get() {
            Ok(g) => {
                let i = g.info();
                println!("GPU: {i}");
                println!("GPU arch: {}", i.arch);
                println!(
                    "GPU memory: {:.1} GiB",
                    i.total_mem_bytes as f64 / (1u64 << 30) as f64
                );
                println!("attention kernels: {}", attention_kernels(&i.arch));
            }
            Err(e) => println!("GPU: none usable ({})", one_line(&e.to_string())),
        }
        println!(
            "CUDA ops: attention, layernorm_mod, mlp, rms_norm, rope (jvp and vjp with --device cuda)"
        );
    }
    #[cfg(not(feature = "cuda"))]
    {
        println!("cuda feature: not compiled in");
        println!("GPU: not used (built without the cuda feature)");
        println!("CUDA ops: not part of this build (ops run on the CPU)");
    }
}

#[cfg(feature = "cuda")]
fn kernels(args: KernelsArgs) -> flashjvp::Result<()> {
    use flashjvp::cuda::nvrtc;
    let archs = if args.arch.is_empty() {
        match flashjvp::cuda::Gpu::get() {
            Ok(g) => vec![g.arch().to_string()],
            Err(e) => {
                return Err(flashjvp::Error::Unsupported(format!(
                    "kernels: no GPU to take the architecture from ({}); pass --arch, e.g. --arch sm_80,sm_90a",
                    one_line(&e.to_string())
                )))
            }
        }
    } else {
        // Each architecture once, in the order given.
        let mut seen = Vec::new();
        for a in &args.arch {
            if !seen.contains(a) {
                seen.push(a.clone());
            }
        }
        seen
    };
    for a in &archs {
        let digits = a.strip_prefix("sm_").map(|r| r.trim_end_matches('a'));
        if !digits.is_some_and(|d| d.len() >= 2 && d.chars().all(|c| c.is_ascii_digit())) {
            return Err(flashjvp::Error::Unsupported(format!(
                "kernels: architecture `{a}`: expected a name like sm_80 or sm_90a"
            )));
        }
    }
    if !flashjvp::cuda::nvrtc_present() {
        return Err(flashjvp::Error::Unsupported(
            "kernels: NVRTC (libnvrtc.so.13) not found; put it on LD_LIBRARY_PATH".into(),
        ));
    }
    // Files built for one architecture only (attention_jvp_sm90.cu: sm_90a) are skipped for the
    // others, with a line saying so (nothing in --json).
    let all: Vec<(&str, &str)> = nvrtc::kernel_files()
        .into_iter()
        .flat_map(|f| archs.iter().map(move |a| (f, a.as_str())))
        .collect();
    type Jobs<'a> = Vec<(&'a str, &'a str)>;
    let (jobs, skipped): (Jobs, Jobs) = all
        .into_iter()
        .partition(|(f, a)| nvrtc::file_supports_arch(f, a));
    if !args.json {
        for (f, a) in &skipped {
            println!("skip {a:7} {f} (built for sm_90a only)");
        }
    }
    // NVRTC compiles one file per thread (the files are independent), as many at once as the
    // machine has cores.
    let width = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<_> = (0..jobs.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..width)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(f, a)) = jobs.get(i) else {
                            break done;
                        };
                        done.push((i, nvrtc::compile(f, a)));
                    }
                })
            })
            .collect();
        for w in workers {
            for (i, r) in w.join().expect("compile thread") {
                results[i] = Some(r);
            }
        }
    });
    let results = results.into_iter().map(|r| r.expect("every job ran"));
    let mut rows = Vec::new();
    let mut failed = 0;
    let mut first_error = String::new();
    for ((file, arch), r) in jobs.iter().zip(results) {
        match r {
            Ok(c) => {
                for k in &c.kernels {
                    // Compiled, but to a register count its setmaxnreg moves would hang on.
                    let pool =
                        if flashjvp::cuda::attention_sm90::uses_register_pool(file, &k.kernel) {
                            flashjvp::cuda::attention_sm90::check_register_pool(
                                &k.kernel,
                                k.registers,
                            )
                            .err()
                            .map(|e| one_line(&e.to_string()))
                        } else {
                            None
                        };
                    let mut row = serde_json::json!({
                        "kernel": k.kernel, "arch": k.arch, "ok": pool.is_none(), "file": file,
                        "registers": k.registers, "spill_bytes": k.spill_bytes,
                        "stack_bytes": k.stack_bytes, "shared_bytes": k.shared_bytes,
                    });
                    if let Some(msg) = &pool {
                        row["error"] = msg.clone().into();
                        failed += 1;
                        if first_error.is_empty() {
                            first_error = msg.clone();
                        }
                    }
                    rows.push(row);
                    if !args.json {
                        println!(
                            "{} {arch:7} {:40} regs {:3}  spill {:5} B  stack {:4} B  smem {:6} B",
                            if pool.is_some() { "FAIL" } else { "ok  " },
                            k.kernel,
                            k.registers,
                            k.spill_bytes,
                            k.stack_bytes,
                            k.shared_bytes
                        );
                    }
                }
            }
            Err(e) => {
                failed += 1;
                let msg = one_line(&e.to_string());
                if first_error.is_empty() {
                    first_error = format!("{file} for {arch}: {msg}");
                }
                rows.push(serde_json::json!({
                    "kernel": file, "arch": arch, "ok": false, "file": file,
                    "registers": null, "spill_bytes": null, "shared_bytes": null, "error": msg,
                }));
                if !args.json {
                    println!("FAIL {arch:7} {file}: {msg}");
                }
            }
        }
    }
    if args.json {
        println!("{}", serde_json::Value::Array(rows));
    }
    if failed > 0 {
        return Err(flashjvp::Error::Cuda(format!(
            "{failed} kernel checks failed over {} compilations (first: {first_error})",
            jobs.len()
        )));
    }
    if args.arch.is_empty() {
        // The GPU's own arch: load what was just compiled (NVRTC's in-process cache, no second
        // compile) onto the device and into the disk kernel cache, so that later processes skip
        // the compile and a module the driver refuses is reported here.
        let gpu = flashjvp::cuda::Gpu::get()?;
        if !gpu.is_emulated() {
            gpu.preload()?;
            eprintln!(
                "kernels: every module loaded on the GPU ({}) and kept in the kernel cache",
                gpu.arch()
            );
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn bench(args: BenchArgs) -> flashjvp::Result<()> {
    use flashjvp::cuda::bench::{bench, ratio_lines, BenchOp};
    let op = BenchOp::parse(&args.op)?;
    let dtype = match args.dtype {
        GpuDTypeArg::Bf16 => DType::BF16,
        GpuDTypeArg::F16 => DType::F16,
        GpuDTypeArg::F32 => DType::F32,
    };
    let shapes = if args.shape.is_empty() {
        op.default_shapes()
    } else {
        vec![args.shape.clone()]
    };
    if !args.json {
        let g = flashjvp::cuda::Gpu::get()?;
        println!("# {}", g.info());
    }
    for shape in shapes {
        let rows = bench(op, &shape, dtype)?;
        for row in &rows {
            if args.json {
                println!("{}", row.json());
            } else {
                println!("{}", row.line());
            }
        }
        if !args.json {
            for line in ratio_lines(op, &rows) {
                println!("{line}");
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn kernels(_: KernelsArgs) -> flashjvp::Result<()> {
    Err(flashjvp::device::cuda_not_built())
}

#[cfg(not(feature = "cuda"))]
fn bench(_: BenchArgs) -> flashjvp::Result<()> {
    Err(flashjvp::device::cuda_not_built())
}

/// clap's own errors, squeezed to one line (help and version still print in full, exit 0).
fn clap_error(e: clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!(
            "error: a command is required: jvp, vjp, info, kernels or bench (see flashjvp --help)"
        );
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
