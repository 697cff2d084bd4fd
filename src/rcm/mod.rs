//! rCM distillation end to end on the glyph mixture (DESIGN.md sections 5 and 6): train a
//! class-conditional TrigFlow teacher, distil it into few-step students (sCM, DMD, or their
//! combination rCM), and measure every model at 1, 2 and 4 steps (the teacher also with its
//! many-step ODE solver) with the glyph metrics.
//!
//! Everything is resumable: each phase checkpoints its whole state (weights, EMA, optimizer
//! moments, counters) atomically, and per-step random numbers are derived from (seed, phase, step),
//! so a resumed run draws exactly what the uninterrupted run would have drawn.
//!
//! Outputs in the `out` folder: results.json, results.md, samples.png, teacher.safetensors and one
//! `<method>.safetensors` per student (EMA weights), and `*.ckpt.safetensors` checkpoints.

pub mod checkpoint;
pub mod net;
pub mod optim;
pub mod report;
pub mod sample;
pub mod train;
pub mod trigflow;

use std::path::PathBuf;
use std::time::Instant;

use crate::data::glyph::{Metrics, NUM_CLASSES, PIXELS, SIZE};
use crate::device::{Device, DeviceRequest};
use crate::dit::{Dit, DitConfig};
use crate::error::{Error, Result};
use crate::tensor::DType;

use optim::AdamWConfig;
use sample::Sampler;

/// A distillation method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Continuous-time consistency (forward divergence) alone.
    Scm,
    /// Distribution matching (reverse divergence) alone.
    Dmd,
    /// sCM + λ·DMD, λ = dmd_scale / scm_scale (the reference uses 0.01; the default and gpu
    /// presets 0.5, the toy preset of the tests 0.01).
    Rcm,
}

impl Method {
    /// The lowercase name ("scm", "dmd", "rcm"): the `--methods` spelling, the model's name in
    /// the report and the stem of its output files.
    pub fn name(self) -> &'static str {
        match self {
            Method::Scm => "scm",
            Method::Dmd => "dmd",
            Method::Rcm => "rcm",
        }
    }

    /// The method named `s` (surrounding whitespace ignored); [`Error::Unsupported`] for any
    /// other name.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "scm" => Ok(Method::Scm),
            "dmd" => Ok(Method::Dmd),
            "rcm" => Ok(Method::Rcm),
            other => Err(Error::Unsupported(format!(
                "unknown method `{other}`: expected rcm, scm or dmd"
            ))),
        }
    }

    /// A comma-separated list such as "rcm,scm,dmd" (duplicates dropped, order kept).
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let m = Method::parse(part)?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            return Err(Error::Unsupported("--methods: no method given".into()));
        }
        Ok(out)
    }

    fn tag(self) -> u64 {
        match self {
            Method::Scm => 0x100,
            Method::Dmd => 0x200,
            Method::Rcm => 0x300,
        }
    }
}

/// Named configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// Fits in 10 minutes on a 2-core CPU (see `RcmConfig::preset`).
    Default,
    /// Patch 2 (64 tokens), width 128, depth 6: meant for `--device cuda` (never run on a GPU
    /// yet); on the CPU it runs, but for hours.
    Gpu,
    /// Seconds: the pipeline's test size. Its numbers mean nothing.
    Toy,
}

impl Preset {
    /// "default", "gpu" or "toy" (exact spelling); [`Error::Unsupported`] for anything else.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "default" => Ok(Preset::Default),
            "gpu" => Ok(Preset::Gpu),
            "toy" => Ok(Preset::Toy),
            other => Err(Error::Unsupported(format!(
                "unknown preset `{other}`: expected default, gpu or toy"
            ))),
        }
    }
}

/// The teacher's flow-matching phase.
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// The teacher's optimizer.
    pub adam: AdamWConfig,
    /// EMA decay (the teacher is the EMA of its weights).
    pub ema: f64,
    /// Share of labels replaced by the null class (for classifier-free guidance).
    pub label_dropout: f64,
}

/// A student's distillation phase (shared by every method).
#[derive(Clone, Debug, PartialEq)]
pub struct StudentConfig {
    /// Student updates.
    pub steps: usize,
    /// sCM times: log tan t ~ N(p_mean, p_std²). The few-step sampler starts at arctan σ_max, so
    /// the student's consistency map must be trained out there too.
    pub p_mean: f64,
    /// Standard deviation of log tan t for the sCM times.
    pub p_std: f64,
    /// Images per student update (and per fake-score update).
    pub batch: usize,
    /// The student's optimizer.
    pub adam: AdamWConfig,
    /// The fake score's optimizer (DMD and rCM only).
    pub fake_adam: AdamWConfig,
    /// EMA decay (the student returned is the EMA of its weights).
    pub ema: f64,
    /// Student updates over which the sCM tangent weight r grows from 0 to 1; rCM adds DMD after.
    pub tangent_warmup: usize,
    /// Weight of the sCM loss.
    pub scm_scale: f64,
    /// Weight of the DMD loss (rCM's λ is dmd_scale / scm_scale).
    pub dmd_scale: f64,
    /// Guidance weight of the teacher's x̂₀ in the DMD gradient (the sCM tangent uses `guidance`).
    pub dmd_guidance: f64,
    /// Fake-score updates per student update once DMD is on (reference: 4).
    pub fake_updates: usize,
    /// DMD rolls the student out 1..=max_rollout steps from noise.
    pub max_rollout: usize,
    /// Shift of the DMD re-noising times towards noise (1: rectified-flow time uniform).
    pub dmd_shift: f64,
}

/// The evaluation: samplers, their times, and the sample count.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalConfig {
    /// Samples per model and step count.
    pub n: usize,
    /// Few-step counts every model is sampled with.
    pub steps: Vec<usize>,
    /// Heun steps of the teacher's ODE solver (2·steps − 1 evaluations).
    pub teacher_steps: usize,
    /// The last nonzero noise level of the teacher's ODE solver.
    pub sigma_min: f64,
    /// Every sampler starts from pure noise taken as x at t = arctan σ_max (the teacher's ODE
    /// solver, the few-step sampler, and DMD's training rollouts).
    pub sigma_max: f64,
    /// The intermediate time of the 2-step sampler.
    pub mid2: Vec<f64>,
    /// The intermediate times of the 4-step sampler.
    pub mid4: Vec<f64>,
}

impl EvalConfig {
    /// The few-step sampler's times for `steps` steps.
    pub fn times(&self, steps: usize) -> Vec<f64> {
        let mid: Vec<f64> = match steps {
            0 | 1 => vec![],
            2 => self.mid2.clone(),
            s if s <= self.mid4.len() + 1 => self.mid4[..s - 1].to_vec(),
            s => (0..s - 1)
                .map(|i| 1.3 - 1.0 * i as f64 / (s - 2) as f64)
                .collect(),
        };
        trigflow::few_step_times(steps.max(1), self.sigma_max, &mid)
    }
}

/// A whole run's settings: the network, the teacher, the students and the evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct RcmConfig {
    /// The DiT of the teacher and of every student and fake score (16×16 glyphs, one channel,
    /// 10 classes, else `run` fails with [`Error::Invalid`]).
    pub dit: DitConfig,
    /// The teacher's parameter dtype at initialisation (students copy the teacher's).
    pub dtype: DType,
    /// Training times: log tan t ~ N(p_mean, p_std²) (tan t is σ for σ_d = 1).
    pub p_mean: f64,
    /// Standard deviation of log tan t for the teacher's training times.
    pub p_std: f64,
    /// Classifier-free guidance weight w of F_u + w·(F_c − F_u), for the teacher's samples and for
    /// the teacher inside distillation (students are not guided at sampling time).
    pub guidance: f64,
    /// The teacher phase.
    pub teacher: TeacherConfig,
    /// Every student phase.
    pub student: StudentConfig,
    /// The evaluation.
    pub eval: EvalConfig,
    /// Steps between checkpoints of a phase.
    pub checkpoint_every: usize,
}

impl RcmConfig {
    /// The settings of a named preset (its source notes the measurements behind the values).
    pub fn preset(preset: Preset) -> Self {
        let adam = |lr: f64, beta1: f64, warmup: usize, decay_steps: usize| AdamWConfig {
            lr,
            beta1,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup,
            decay_steps,
            final_lr_ratio: 0.05,
        };
        let dit = |patch: usize, hidden: usize, depth: usize, heads: usize| DitConfig {
            image_size: SIZE,
            in_channels: 1,
            patch,
            hidden,
            depth,
            heads,
            mlp_ratio: 4,
            num_classes: NUM_CLASSES,
            freq_dim: 64,
            // c_noise = 10·t: t ∈ [0, π/2] spans 15.7 radians of the fastest embedding
            // frequency. 100 gave a worse teacher (0.89 against 0.95 ODE precision at 6000 steps)
            // and 1 worse students.
            time_scale: 10.0,
        };
        let eval = |n: usize, teacher_steps: usize| EvalConfig {
            n,
            steps: vec![1, 2, 4],
            teacher_steps,
            sigma_min: 0.002,
            sigma_max: 80.0,
            // Tuned on the glyph mixture, whose modes separate around σ ≈ 1–2 (t ≈ 0.8–1.1):
            // re-noising around there and ending at t = 0.9 beat the reference (1.3, 1.0, 0.6)
            // (4-step precision 0.87 against 0.76 for the same sCM student).
            mid2: vec![1.0],
            mid4: vec![1.1, 1.0, 0.9],
        };
        match preset {
            // Measured on this project's 2-core CPU while other jobs loaded it (load average
            // about 3): teacher 190 s, rCM student 251 s, evaluation 18 s, 459 s in all.
            Preset::Default => RcmConfig {
                dit: dit(4, 64, 2, 4),
                dtype: DType::F32,
                // log σ ~ N(−0.4, 1.4²): centred between the data's own noise (σ = 0.1) and the
                // scale where the 40 modes separate (σ ≈ 1–3). (−1.0, 1.6) trained a worse
                // teacher in the same steps (ODE precision 0.81 against 0.85).
                p_mean: -0.4,
                p_std: 1.4,
                // Guidance 2 against 1.5 and 1: ODE precision 0.90, 0.85, 0.67 (same teacher).
                guidance: 2.0,
                teacher: TeacherConfig {
                    // Steps matter more than batch here (at lr 2e-3, 3000 steps of batch 128
                    // reached ODE precision 0.16 where 6000 of batch 64 reached 0.67), and a
                    // high learning rate trains faster (4e-3: 0.81 at 6000 steps, 0.92 at 12000).
                    steps: 12_000,
                    batch: 64,
                    adam: adam(4e-3, 0.9, 200, 12_000),
                    ema: 0.995,
                    label_dropout: 0.1,
                },
                student: StudentConfig {
                    p_mean: -0.4,
                    p_std: 1.4,
                    steps: 3000,
                    batch: 32,
                    adam: adam(2e-4, 0.0, 0, 0),
                    fake_adam: adam(2e-4, 0.0, 0, 0),
                    ema: 0.99,
                    tangent_warmup: 500,
                    scm_scale: 100.0,
                    // Three departures from the reference recipe (λ = 0.01, the guided
                    // teacher in DMD, 1–4 step rollouts), each measured on this default teacher
                    // at 1500 student steps, 1-step precision (docs/rcm_tuning.md): λ = 0.01 with
                    // the guided teacher 0.05; unguided teacher in DMD 0.10 (guidance makes DMD
                    // overshoot the stroke amplitude and the pixel noise, so its samples miss
                    // the precision radius); then λ = 0.1: 0.16, λ = 0.5: 0.26; rollouts of 1–2
                    // steps: 0.28 at λ = 0.1 and, at 3000 steps with λ = 0.5, 0.42.
                    dmd_scale: 50.0,
                    dmd_guidance: 1.0,
                    fake_updates: 4,
                    max_rollout: 2,
                    dmd_shift: 1.0,
                },
                eval: eval(2048, 32),
                checkpoint_every: 250,
            },
            // Sized from FLOP counts for about 5 minutes on one H100/H200 (the DiT in f32 on
            // cuBLAS and the f32 attention kernel at an assumed ~30 TFLOP/s, AdamW on the host):
            // teacher ~20 ms a step (~120 s), student ~90 ms an update (~110 s), evaluation
            // ~30 s. An estimate: this preset has never run on a GPU.
            Preset::Gpu => RcmConfig {
                dit: dit(2, 128, 6, 4),
                dtype: DType::F32,
                p_mean: -0.4,
                p_std: 1.4,
                guidance: 2.0,
                teacher: TeacherConfig {
                    steps: 6000,
                    batch: 256,
                    adam: adam(2e-3, 0.9, 200, 6000),
                    ema: 0.999,
                    label_dropout: 0.1,
                },
                student: StudentConfig {
                    p_mean: -0.4,
                    p_std: 1.4,
                    steps: 1200,
                    batch: 128,
                    adam: adam(2e-4, 0.0, 0, 0),
                    fake_adam: adam(2e-4, 0.0, 0, 0),
                    ema: 0.99,
                    tangent_warmup: 200,
                    scm_scale: 100.0,
                    // As the default preset (measured there).
                    dmd_scale: 50.0,
                    dmd_guidance: 1.0,
                    fake_updates: 4,
                    max_rollout: 2,
                    dmd_shift: 1.0,
                },
                eval: eval(2048, 32),
                checkpoint_every: 250,
            },
            Preset::Toy => RcmConfig {
                dit: DitConfig {
                    freq_dim: 16,
                    mlp_ratio: 2,
                    ..dit(4, 16, 1, 2)
                },
                dtype: DType::F32,
                p_mean: -1.0,
                p_std: 1.6,
                guidance: 1.5,
                teacher: TeacherConfig {
                    steps: 8,
                    batch: 8,
                    adam: adam(1e-3, 0.9, 0, 0),
                    ema: 0.9,
                    label_dropout: 0.1,
                },
                student: StudentConfig {
                    p_mean: -0.4,
                    p_std: 1.4,
                    steps: 4,
                    batch: 4,
                    adam: adam(1e-4, 0.0, 0, 0),
                    fake_adam: adam(1e-4, 0.0, 0, 0),
                    ema: 0.9,
                    tangent_warmup: 2,
                    scm_scale: 100.0,
                    dmd_scale: 1.0,
                    dmd_guidance: 1.0,
                    fake_updates: 2,
                    max_rollout: 4,
                    dmd_shift: 1.0,
                },
                eval: eval(40, 3),
                checkpoint_every: 2,
            },
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::invalid("rcm", m.to_string()));
        if self.dit.num_classes != NUM_CLASSES || self.dit.image_size != SIZE {
            return bad("the DiT must take 16×16 glyph images of 10 classes");
        }
        if self.dit.in_channels != 1 {
            return bad("the glyph images have one channel");
        }
        if self.teacher.batch == 0 || self.student.batch == 0 || self.eval.n == 0 {
            return bad("batch sizes and the evaluation size must be positive");
        }
        if self.checkpoint_every == 0 || self.student.max_rollout == 0 {
            return bad("checkpoint_every and max_rollout must be positive");
        }
        if self.eval.teacher_steps == 0 || self.eval.steps.contains(&0) {
            return bad("step counts must be positive");
        }
        if self.eval.mid2.len() != 1 || self.eval.mid4.len() != 3 {
            return bad("mid2 holds one time and mid4 three");
        }
        Ok(())
    }
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct RcmOptions {
    /// The settings (checked by `run`).
    pub config: RcmConfig,
    /// The students to distil, in this order (each measured after the teacher in this order).
    pub methods: Vec<Method>,
    /// Where the DiT runs: `auto` falls back to the CPU when the GPU or its kernels cannot take
    /// the DiT.
    pub device: DeviceRequest,
    /// The seed of every random number of the run (initialisation, batches, noise, evaluation).
    pub seed: u64,
    /// The output folder (created if missing).
    pub out: PathBuf,
    /// Continue interrupted phases from their checkpoints and reuse finished students.
    pub resume: bool,
    /// Progress bars and phase summaries on stderr.
    pub progress: bool,
    /// Stop after this many training steps (teacher steps and student updates together) as if
    /// the process were killed there: the phase checkpoints and `run` returns an incomplete
    /// report. For testing that a resumed run continues exactly where it stopped.
    pub stop_after: Option<usize>,
}

/// What a phase did.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseInfo {
    /// "teacher" or the method's name.
    pub name: String,
    /// Steps the finished phase has (student updates for students).
    pub steps: usize,
    /// Steps this run took (0 when reused, fewer when resumed).
    pub steps_run: usize,
    /// Wall-clock seconds of the phase in this run (0 when reused).
    pub seconds: f64,
    /// A finished model was found in the output folder and reused.
    pub reused: bool,
}

impl PhaseInfo {
    fn reused(name: &str, steps: usize) -> Self {
        PhaseInfo {
            name: name.into(),
            steps,
            steps_run: 0,
            seconds: 0.0,
            reused: true,
        }
    }
}

/// One measured model at one step count.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// "teacher" or the method's name.
    pub model: String,
    /// Sampler steps (for the teacher's ODE solver: its Heun steps).
    pub steps: usize,
    /// Network evaluations per sample (doubled in batch when guided).
    pub evaluations: usize,
    /// The glyph metrics of the `eval.n` samples.
    pub metrics: Metrics,
    /// Wall-clock sampling time (all cores together) per sample, in ms.
    pub ms_per_sample: f64,
}

/// What `run` measured (also written to results.json and results.md).
#[derive(Clone, Debug)]
pub struct Report {
    /// False when `stop_after` ended the run before evaluation (nothing else is filled then).
    pub complete: bool,
    /// The teacher at each `eval.steps` count, then its ODE solver, then each student at each
    /// `eval.steps` count, in `methods` order.
    pub rows: Vec<Row>,
    /// `cpu`, or `cuda (<GPU name>)`.
    pub device: String,
    /// Wall-clock seconds of training and evaluation.
    pub seconds: f64,
    /// The finished phases (trained or reused), in order; when the run stopped early, those
    /// finished before the stop.
    pub phases: Vec<PhaseInfo>,
}

/// splitmix64 of (seed, tag, index): independent streams for every phase, step and chunk.
pub fn mix_seed(seed: u64, tag: u64, index: u64) -> u64 {
    let mut z =
        seed ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Trains (or reuses) the teacher and the students, evaluates them, writes results.json,
/// results.md and samples.png into `opts.out`, and returns the report.
pub fn run(opts: &RcmOptions) -> Result<Report> {
    // `auto` takes the GPU when one is usable; `cuda` without one is an error from the device
    // layer saying why. Every DiT call of the run goes to the chosen device (see `net`).
    let device = match opts.device.resolve()? {
        Device::Cpu => Device::Cpu,
        Device::Cuda => match net::gpu_takes(&opts.config.dit) {
            Ok(()) => Device::Cuda,
            Err(e) if opts.device == DeviceRequest::Auto => {
                if opts.progress {
                    eprintln!("device: auto found a GPU, but {e}; using the CPU");
                }
                Device::Cpu
            }
            Err(e) => return Err(Error::Unsupported(format!("--device cuda: {e}"))),
        },
    };
    let device_name = match device {
        Device::Cpu => "cpu".to_string(),
        #[cfg(feature = "cuda")]
        Device::Cuda => format!("cuda ({})", crate::cuda::Gpu::get()?.info().name),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => return Err(crate::device::cuda_not_built()),
    };
    let _device = net::use_device(device);
    if opts.progress {
        eprintln!("device: {device_name}");
    }
    opts.config.check()?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::Io {
        path: opts.out.display().to_string(),
        message: format!("cannot create: {e}"),
    })?;
    let start = Instant::now();
    let cfg = &opts.config;
    let ctx = train::Ctx {
        cfg,
        out: &opts.out,
        seed: opts.seed,
        resume: opts.resume,
        progress: opts.progress,
        budget: std::cell::Cell::new(opts.stop_after),
    };
    let stopped = |phases: Vec<PhaseInfo>| Report {
        complete: false,
        rows: Vec::new(),
        device: device_name.clone(),
        seconds: start.elapsed().as_secs_f64(),
        phases,
    };
    let mut phases = Vec::new();
    let Some((teacher, info)) = train::teacher(&ctx)? else {
        return Ok(stopped(phases));
    };
    phases.push(info);
    let teacher_fp = train::teacher_fingerprint(cfg, opts.seed);
    let mut students: Vec<(Method, Dit)> = Vec::new();
    for &m in &opts.methods {
        let Some((s, info)) = train::student(&ctx, m, &teacher, &teacher_fp)? else {
            return Ok(stopped(phases));
        };
        phases.push(info);
        students.push((m, s));
    }

    let mut rows = Vec::new();
    let mut panels = Vec::new();
    let mut measure = |name: &str, model: &Dit, w: f64, sampler: Sampler, steps: usize| {
        // The same noise for every model at a step count: differences are the models'.
        let seed = mix_seed(opts.seed, 0xE7A1, steps as u64);
        let ev = sample::evaluate(model, w, &sampler, cfg.eval.n, seed)?;
        if opts.progress {
            eprintln!(
                "eval {name:>7} {steps:>3} steps: precision {:.3} coverage {:.3} spread {:.3} class {:.3} ({:.2} ms/sample)",
                ev.metrics.precision,
                ev.metrics.coverage,
                ev.metrics.spread,
                ev.metrics.class_accuracy,
                ev.ms_per_sample
            );
        }
        let keep = ev.images.len().min(report::PANEL_SAMPLES * PIXELS);
        panels.push(report::Panel {
            model: name.to_string(),
            steps,
            images: ev.images[..keep].to_vec(),
        });
        rows.push(Row {
            model: name.to_string(),
            steps,
            evaluations: sampler.evaluations(),
            metrics: ev.metrics,
            ms_per_sample: ev.ms_per_sample,
        });
        Ok::<(), Error>(())
    };
    for &s in &cfg.eval.steps {
        let sampler = Sampler::FewStep {
            times: cfg.eval.times(s),
        };
        measure("teacher", &teacher, cfg.guidance, sampler, s)?;
    }
    let heun = Sampler::Heun {
        steps: cfg.eval.teacher_steps,
        sigma_min: cfg.eval.sigma_min,
        sigma_max: cfg.eval.sigma_max,
    };
    measure(
        "teacher",
        &teacher,
        cfg.guidance,
        heun,
        cfg.eval.teacher_steps,
    )?;
    for (m, s) in &students {
        for &st in &cfg.eval.steps {
            let sampler = Sampler::FewStep {
                times: cfg.eval.times(st),
            };
            measure(m.name(), s, 1.0, sampler, st)?;
        }
    }
    let report = Report {
        complete: true,
        rows,
        device: device_name,
        seconds: start.elapsed().as_secs_f64(),
        phases,
    };
    report::write_all(&opts.out, &report, &panels, opts)?;
    Ok(report)
}
