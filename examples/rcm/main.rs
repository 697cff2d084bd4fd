//! rCM distillation on the glyph mixture, end to end: a thin command line over `flashjvp::rcm`.
//!
//!     cargo run --release --example rcm -- --out out/rcm
//!     cargo run --release --example rcm -- --out out/ablation --methods rcm,scm,dmd
//!
//! The default preset trains the teacher (DiT: patch 4, width 64, depth 2; 12k steps) and the rCM
//! student (3000 updates, DMD on after 500, λ = 0.5 against the unguided teacher) and evaluates
//! them on 2048 samples per row, in under 10 minutes on a 2-core CPU. The measured table is in
//! docs/rcm_default_results.md (and the README), the ablation in docs/rcm_ablation_results.md,
//! the settings' measurements in docs/rcm_tuning.md.
//!
//! `--preset gpu` is a larger network (patch 2, width 128, depth 6) meant for `--device cuda`,
//! sized for about 5 minutes on one H100/H200 but never run on a GPU yet (the GPU DiT and a toy rCM
//! run on cuda pass their tests on an H200; the default preset's head dim 16 is below the GPU
//! attention kernels' 32, so it stays on the CPU). `--preset toy` runs in well under a second and
//! is what the tests use; its numbers mean nothing. `--resume` continues an interrupted run from
//! its checkpoints and reuses finished students; a finished teacher with the same settings is
//! always reused.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use flashjvp::rcm::{self, Method, Preset, RcmConfig, RcmOptions};
use flashjvp::DeviceRequest;

#[derive(Parser, Debug)]
#[command(
    about = "Distil a glyph-mixture diffusion teacher into a 1-4 step generator with rCM",
    allow_negative_numbers = true
)]
struct Args {
    /// Output folder: results.json, results.md, samples.png, checkpoints.
    #[arg(long, default_value = "out/rcm")]
    out: PathBuf,
    /// default | gpu | toy.
    #[arg(long, default_value = "default")]
    preset: String,
    /// Comma-separated distillation methods: rcm, scm, dmd.
    #[arg(long, default_value = "rcm")]
    methods: String,
    /// auto | cpu | cuda (the GPU: device 0, or the ordinal in FLASHJVP_DEVICE).
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoints in --out and reuse finished students.
    #[arg(long)]
    resume: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,

    /// DiT width.
    #[arg(long)]
    hidden: Option<usize>,
    #[arg(long)]
    depth: Option<usize>,
    #[arg(long)]
    heads: Option<usize>,
    /// Patch side (16 must be a multiple).
    #[arg(long)]
    patch: Option<usize>,
    /// c_noise(t) = time_scale·t.
    #[arg(long)]
    time_scale: Option<f64>,
    /// Teacher training steps.
    #[arg(long)]
    teacher_steps: Option<usize>,
    #[arg(long)]
    teacher_batch: Option<usize>,
    #[arg(long)]
    teacher_lr: Option<f64>,
    /// EMA decay of the teacher's weights.
    #[arg(long)]
    teacher_ema: Option<f64>,
    /// Student updates.
    #[arg(long)]
    student_steps: Option<usize>,
    #[arg(long)]
    student_batch: Option<usize>,
    #[arg(long)]
    student_lr: Option<f64>,
    /// Cosine-decay the student's learning rate over its updates.
    #[arg(long)]
    student_lr_decay: bool,
    /// EMA decay of the student's weights.
    #[arg(long)]
    student_ema: Option<f64>,
    /// Learning rate of the fake-score network.
    #[arg(long)]
    fake_lr: Option<f64>,
    /// DMD rolls the student out 1..=max_rollout steps.
    #[arg(long)]
    max_rollout: Option<usize>,
    /// Shift of the DMD re-noising times towards noise.
    #[arg(long)]
    dmd_shift: Option<f64>,
    /// Guidance weight of the teacher inside the DMD gradient.
    #[arg(long)]
    dmd_guidance: Option<f64>,
    /// Scale of the DMD loss (sCM's is 100).
    #[arg(long)]
    dmd_scale: Option<f64>,
    /// Student updates of sCM tangent warmup (rCM adds DMD after it).
    #[arg(long)]
    tangent_warmup: Option<usize>,
    /// Fake-score updates per student update.
    #[arg(long)]
    fake_updates: Option<usize>,
    /// Classifier-free guidance weight w (1: none).
    #[arg(long)]
    guidance: Option<f64>,
    /// Training times: log tan t ~ N(p_mean, p_std²).
    #[arg(long)]
    p_mean: Option<f64>,
    #[arg(long)]
    p_std: Option<f64>,
    /// sCM times of the student: log tan t ~ N(student_p_mean, student_p_std²).
    #[arg(long)]
    student_p_mean: Option<f64>,
    #[arg(long)]
    student_p_std: Option<f64>,
    /// Samplers start from noise at t = arctan(sigma_max).
    #[arg(long)]
    sigma_max: Option<f64>,
    /// Samples per evaluated model and step count.
    #[arg(long)]
    eval_n: Option<usize>,
    /// Heun steps of the teacher's ODE solver.
    #[arg(long)]
    ode_steps: Option<usize>,
    /// The intermediate time of the 2-step sampler.
    #[arg(long)]
    mid2: Option<f64>,
    /// The three intermediate times of the 4-step sampler, comma-separated.
    #[arg(long)]
    mid4: Option<String>,
}

fn config(a: &Args) -> flashjvp::Result<RcmConfig> {
    let mut c = RcmConfig::preset(Preset::parse(&a.preset)?);
    macro_rules! set {
        ($field:expr, $opt:expr) => {
            if let Some(v) = $opt {
                $field = v;
            }
        };
    }
    set!(c.dit.hidden, a.hidden);
    set!(c.dit.depth, a.depth);
    set!(c.dit.heads, a.heads);
    set!(c.dit.patch, a.patch);
    set!(c.dit.time_scale, a.time_scale);
    if let Some(v) = a.teacher_steps {
        c.teacher.steps = v;
        // The learning-rate decay spans the whole teacher phase.
        if c.teacher.adam.decay_steps > 0 {
            c.teacher.adam.decay_steps = v;
        }
    }
    set!(c.teacher.ema, a.teacher_ema);
    set!(c.student.ema, a.student_ema);
    set!(c.student.fake_adam.lr, a.fake_lr);
    set!(c.student.dmd_shift, a.dmd_shift);
    set!(c.student.max_rollout, a.max_rollout);
    set!(c.student.dmd_guidance, a.dmd_guidance);
    set!(c.student.dmd_scale, a.dmd_scale);
    set!(c.teacher.batch, a.teacher_batch);
    set!(c.teacher.adam.lr, a.teacher_lr);
    set!(c.student.steps, a.student_steps);
    if a.student_lr_decay {
        c.student.adam.decay_steps = c.student.steps;
    }
    set!(c.student.batch, a.student_batch);
    set!(c.student.adam.lr, a.student_lr);
    set!(c.student.tangent_warmup, a.tangent_warmup);
    set!(c.student.fake_updates, a.fake_updates);
    set!(c.guidance, a.guidance);
    set!(c.p_mean, a.p_mean);
    set!(c.p_std, a.p_std);
    set!(c.student.p_mean, a.student_p_mean);
    set!(c.student.p_std, a.student_p_std);
    set!(c.eval.n, a.eval_n);
    set!(c.eval.sigma_max, a.sigma_max);
    set!(c.eval.teacher_steps, a.ode_steps);
    if let Some(m) = a.mid2 {
        c.eval.mid2 = vec![m];
    }
    if let Some(s) = &a.mid4 {
        c.eval.mid4 = s
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|e| flashjvp::Error::Unsupported(format!("--mid4 `{s}`: {e}")))?;
    }
    Ok(c)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = (|| {
        let opts = RcmOptions {
            config: config(&args)?,
            methods: Method::parse_list(&args.methods)?,
            device: DeviceRequest::parse(&args.device)?,
            seed: args.seed,
            out: args.out.clone(),
            resume: args.resume,
            progress: !args.quiet,
            stop_after: None,
        };
        let report = rcm::run(&opts)?;
        Ok::<_, flashjvp::Error>((opts, report))
    })();
    match result {
        Ok((opts, report)) => {
            println!("{}", rcm::report::markdown(&report, &opts));
            println!("written to {}", opts.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
