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
    /// Patch 2 (64 tokens), width 128, depth 6: meant for `--device cuda` (this preset has never
    /// run on a GPU, though the GPU DiT and the toy pipeline on cuda pass their tests on an H200);
    /// on the CPU it runs, but for hours.
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
    /// The few-step sampler's times for `steps` steps: arctan σ_max, then `mid2` (2 steps), the
    /// first `steps − 1` of `mid4` (3 or 4 steps), or evenly from 1.3 down to 0.3 (more).
    /// [`Error::Invalid`] for 0 steps, more than [`trigflow::MAX_STEPS`], too few times in
    /// `mid2`, or times that do not decrease from arctan σ_max while staying above 0 (see
    /// [`trigflow::few_step_times`]).
    pub fn times(&self, steps: usize) -> Result<Vec<f64>> {
        if steps == 0 || steps > trigflow::MAX_STEPS {
            return Err(Error::invalid(
                "rcm",
                format!(
                    "a {steps}-step sampler; step counts run from 1 to {}",
                    trigflow::MAX_STEPS
                ),
            ));
        }
        let mid: Vec<f64> = match steps {
            1 => vec![],
            2 => self.mid2.clone(),
            s if s <= self.mid4.len() + 1 => self.mid4[..s - 1].to_vec(),
            s => (0..s - 1)
                .map(|i| 1.3 - 1.0 * i as f64 / (s - 2) as f64)
                .collect(),
        };
        trigflow::few_step_times(steps, self.sigma_max, &mid)
            .map_err(|e| Error::invalid("rcm", format!("the {steps}-step sampler: {e}")))
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

    /// [`Error::Invalid`] naming the setting (its field path, and the rcm example's option
    /// where it has one) and its value, for any setting `run` cannot train or sample with: a DiT
    /// config `Dit::validate_config` refuses (checked first, before anything is sized from it),
    /// one that is not for 16×16 one-channel glyphs of 10 classes or has more than
    /// [`MAX_PARAMS`] parameters; sizes of 0 or beyond their caps ([`MAX_TRAIN_STEPS`],
    /// [`MAX_BATCH`], [`sample::MAX_SAMPLES`], [`trigflow::MAX_STEPS`], [`MAX_FAKE_UPDATES`],
    /// [`MAX_EVAL_STEP_COUNTS`]); and floats that are not finite or out of range: learning rates
    /// and scales ≥ 0, betas and EMA decays in [0, 1), eps > 0, label dropout in [0, 1],
    /// p_std ≥ 0, 0 < sigma_min < sigma_max, dmd_shift > 0, and sampler times that decrease
    /// from arctan sigma_max and stay above 0 (mid2 one time, mid4 three).
    pub fn check(&self) -> Result<()> {
        Dit::validate_config(&self.dit)?;
        let bad = |m: String| Err(Error::invalid("rcm", m));
        if self.dit.num_classes != NUM_CLASSES || self.dit.image_size != SIZE {
            return bad(format!(
                "the DiT must take 16×16 glyph images of 10 classes, not {0}×{0} of {1}",
                self.dit.image_size, self.dit.num_classes
            ));
        }
        if self.dit.in_channels != 1 {
            return bad(format!(
                "the glyph images have one channel, not {}",
                self.dit.in_channels
            ));
        }
        // validate_config bounds every size so that these products cannot overflow; checked
        // all the same.
        let params = Dit::param_layout(&self.dit)?
            .iter()
            .try_fold(0usize, |acc, (_, shape)| {
                let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
                acc.checked_add(n)
            });
        if params.is_none_or(|n| n > MAX_PARAMS) {
            return bad(format!(
                "the DiT (hidden {}, depth {}, mlp_ratio {}, patch {}) has {} parameters; at \
                 most {MAX_PARAMS}",
                self.dit.hidden,
                self.dit.depth,
                self.dit.mlp_ratio,
                self.dit.patch,
                params.map_or("too many".to_string(), |n| n.to_string())
            ));
        }
        if !matches!(self.dtype, DType::F32 | DType::F64) {
            return bad(format!(
                "dtype {} is not trainable: use f32 or f64",
                self.dtype
            ));
        }

        let (t, st, ev) = (&self.teacher, &self.student, &self.eval);
        let max_steps = trigflow::MAX_STEPS;
        for (name, v, min, max) in [
            (
                "teacher.steps (--teacher-steps)",
                t.steps,
                0,
                MAX_TRAIN_STEPS,
            ),
            (
                "student.steps (--student-steps)",
                st.steps,
                0,
                MAX_TRAIN_STEPS,
            ),
            ("teacher.batch (--teacher-batch)", t.batch, 1, MAX_BATCH),
            ("student.batch (--student-batch)", st.batch, 1, MAX_BATCH),
            ("eval.n (--eval-n)", ev.n, 1, sample::MAX_SAMPLES),
            (
                "eval.teacher_steps (--ode-steps)",
                ev.teacher_steps,
                1,
                max_steps,
            ),
            (
                "student.max_rollout (--max-rollout)",
                st.max_rollout,
                1,
                max_steps,
            ),
            (
                "student.fake_updates (--fake-updates)",
                st.fake_updates,
                0,
                MAX_FAKE_UPDATES,
            ),
            ("checkpoint_every", self.checkpoint_every, 1, usize::MAX),
            (
                "the number of eval.steps",
                ev.steps.len(),
                0,
                MAX_EVAL_STEP_COUNTS,
            ),
        ] {
            if v < min || v > max {
                return bad(format!("{name} is {v}; it must be from {min} to {max}"));
            }
        }
        if let Some(s) = ev.steps.iter().find(|&&s| s == 0 || s > max_steps) {
            return bad(format!(
                "eval.steps holds {s}; step counts run from 1 to {max_steps}"
            ));
        }

        // Floats. Each test is written `!(in range)` so that NaN fails it.
        let finite = |name: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                bad(format!("{name} is {v}; it must be finite"))
            }
        };
        let at_least_0 = |name: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                bad(format!("{name} is {v}; it must be finite and ≥ 0"))
            }
        };
        let below_1 = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                bad(format!("{name} is {v}; it must be in [0, 1)"))
            }
        };
        // `flag`: the rcm example's option that sets the optimizer's learning rate.
        let adam = |name: &str, flag: &str, a: &AdamWConfig| {
            a.validate(name).map_err(|e| match e {
                Error::Invalid { message, .. } => {
                    Error::invalid("rcm", format!("{message} ({flag} sets {name}.lr)"))
                }
                e => e,
            })
        };
        finite("p_mean (--p-mean)", self.p_mean)?;
        at_least_0("p_std (--p-std)", self.p_std)?;
        finite("guidance (--guidance)", self.guidance)?;
        adam("teacher.adam", "--teacher-lr", &t.adam)?;
        below_1("teacher.ema (--teacher-ema)", t.ema)?;
        if !(0.0..=1.0).contains(&t.label_dropout) {
            return bad(format!(
                "teacher.label_dropout is {}; it must be in [0, 1]",
                t.label_dropout
            ));
        }
        finite("student.p_mean (--student-p-mean)", st.p_mean)?;
        at_least_0("student.p_std (--student-p-std)", st.p_std)?;
        adam("student.adam", "--student-lr", &st.adam)?;
        adam("student.fake_adam", "--fake-lr", &st.fake_adam)?;
        below_1("student.ema (--student-ema)", st.ema)?;
        at_least_0("student.scm_scale", st.scm_scale)?;
        at_least_0("student.dmd_scale (--dmd-scale)", st.dmd_scale)?;
        finite("student.dmd_guidance (--dmd-guidance)", st.dmd_guidance)?;
        if !(st.dmd_shift.is_finite() && st.dmd_shift > 0.0) {
            return bad(format!(
                "student.dmd_shift (--dmd-shift) is {}; it must be finite and > 0",
                st.dmd_shift
            ));
        }
        if !(ev.sigma_max.is_finite() && ev.sigma_min > 0.0 && ev.sigma_min < ev.sigma_max) {
            return bad(format!(
                "eval.sigma_min {} and eval.sigma_max (--sigma-max) {} must satisfy 0 < \
                 sigma_min < sigma_max < inf",
                ev.sigma_min, ev.sigma_max
            ));
        }
        for (name, mid, len) in [
            ("eval.mid2 (--mid2)", &ev.mid2, 1),
            ("eval.mid4 (--mid4)", &ev.mid4, 3),
        ] {
            if mid.len() != len {
                return bad(format!(
                    "{name} holds {} times ({mid:?}); it must hold {len}",
                    mid.len()
                ));
            }
            trigflow::few_step_times(len + 1, ev.sigma_max, mid).map_err(|e| {
                Error::invalid(
                    "rcm",
                    format!(
                        "{name} {mid:?} with eval.sigma_max (--sigma-max) {}: {e}",
                        ev.sigma_max
                    ),
                )
            })?;
        }
        for &s in &ev.steps {
            ev.times(s)?;
        }
        Ok(())
    }
}

/// The most steps a training phase may take (teacher steps, student updates): far above any
/// run, small enough that every counter stays exact in a checkpoint's f64 counters.
pub const MAX_TRAIN_STEPS: usize = 1_000_000_000;
/// The largest teacher or student batch (2^16 images).
pub const MAX_BATCH: usize = 1 << 16;
/// The most fake-score updates per student update (the reference takes 4).
pub const MAX_FAKE_UPDATES: usize = 10_000;
/// The most step counts `eval.steps` may list (each a row of the report, a panel of the image).
pub const MAX_EVAL_STEP_COUNTS: usize = 64;
/// The most scalar parameters the DiT may have (2^28; the gpu preset has about 1.2 million).
pub const MAX_PARAMS: usize = 1 << 28;

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
    /// report. `Some(0)` takes no step at all: the first phase that would train stops before its
    /// first step, leaving no checkpoint (finished models in `out` are still reused). For testing
    /// that a resumed run continues exactly where it stopped.
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
/// results.md and samples.png into `opts.out`, and returns the report. The settings are checked
/// first ([`RcmConfig::check`]; a method listed twice is refused too), before anything is
/// sized, allocated or written.
pub fn run(opts: &RcmOptions) -> Result<Report> {
    opts.config.check()?;
    if let Some((i, m)) = opts
        .methods
        .iter()
        .enumerate()
        .find(|(i, m)| opts.methods[..*i].contains(m))
    {
        return Err(Error::invalid(
            "rcm",
            format!("method {} is listed twice (at {i})", m.name()),
        ));
    }
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
            times: cfg.eval.times(s)?,
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
                times: cfg.eval.times(st)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_pass_their_checks() {
        for p in [Preset::Default, Preset::Gpu, Preset::Toy] {
            RcmConfig::preset(p).check().unwrap();
        }
    }

    /// Every setting the audit found unchecked: each is an error naming it and its value.
    #[test]
    fn bad_settings_are_errors_naming_them() {
        type Edit = fn(&mut RcmConfig);
        let cases: Vec<(&str, Edit)> = vec![
            // The DiT is validated before anything is sized from it (these used to abort on
            // allocation or overflow in the parameter layout).
            ("depth 1000000000", |c| c.dit.depth = 1_000_000_000),
            ("depth 18446744073709551615", |c| c.dit.depth = usize::MAX),
            ("hidden", |c| c.dit.hidden = 4097 * 4),
            ("time_scale", |c| c.dit.time_scale = f64::NAN),
            ("parameters", |c| {
                c.dit.hidden = 4096;
                c.dit.heads = 4;
                c.dit.depth = 64;
            }),
            ("one channel", |c| c.dit.in_channels = 2),
            ("dtype", |c| c.dtype = DType::BF16),
            // Sizes.
            (
                "eval.teacher_steps (--ode-steps) is 18446744073709551615",
                |c| c.eval.teacher_steps = usize::MAX,
            ),
            ("eval.n (--eval-n) is 2305843009213693952", |c| {
                c.eval.n = 1 << 61
            }),
            ("eval.n (--eval-n) is 0", |c| c.eval.n = 0),
            (
                "teacher.batch (--teacher-batch) is 4611686018427387904",
                |c| c.teacher.batch = 1 << 62,
            ),
            ("student.batch (--student-batch) is 0", |c| {
                c.student.batch = 0
            }),
            ("teacher.steps", |c| c.teacher.steps = usize::MAX),
            ("student.fake_updates", |c| {
                c.student.fake_updates = usize::MAX
            }),
            ("student.max_rollout", |c| c.student.max_rollout = 0),
            ("checkpoint_every", |c| c.checkpoint_every = 0),
            ("eval.steps holds 0", |c| c.eval.steps = vec![1, 0]),
            ("eval.steps holds 18446744073709551615", |c| {
                c.eval.steps = vec![usize::MAX]
            }),
            // Floats.
            ("teacher.adam.lr is NaN", |c| c.teacher.adam.lr = f64::NAN),
            ("--teacher-lr", |c| c.teacher.adam.lr = -1.0),
            ("student.adam.beta1 is 1", |c| c.student.adam.beta1 = 1.0),
            ("student.fake_adam.beta2", |c| {
                c.student.fake_adam.beta2 = 1.5
            }),
            ("teacher.adam.eps", |c| c.teacher.adam.eps = 0.0),
            ("teacher.adam.weight_decay", |c| {
                c.teacher.adam.weight_decay = f64::INFINITY
            }),
            ("teacher.ema (--teacher-ema) is 1", |c| c.teacher.ema = 1.0),
            ("student.ema (--student-ema) is NaN", |c| {
                c.student.ema = f64::NAN
            }),
            ("teacher.label_dropout is 1.5", |c| {
                c.teacher.label_dropout = 1.5
            }),
            ("p_std (--p-std) is -1", |c| c.p_std = -1.0),
            ("p_mean (--p-mean) is inf", |c| c.p_mean = f64::INFINITY),
            ("student.p_std", |c| c.student.p_std = f64::NAN),
            ("guidance (--guidance) is NaN", |c| c.guidance = f64::NAN),
            ("student.dmd_guidance", |c| {
                c.student.dmd_guidance = f64::NAN
            }),
            ("student.dmd_scale", |c| c.student.dmd_scale = -1.0),
            ("student.scm_scale", |c| c.student.scm_scale = f64::NAN),
            ("student.dmd_shift (--dmd-shift) is 0", |c| {
                c.student.dmd_shift = 0.0
            }),
            ("--sigma-max) 0", |c| c.eval.sigma_max = 0.0),
            ("--sigma-max) inf", |c| c.eval.sigma_max = f64::INFINITY),
            ("eval.sigma_min 100", |c| c.eval.sigma_min = 100.0),
            ("eval.sigma_min -1", |c| c.eval.sigma_min = -1.0),
            ("eval.mid4 (--mid4) [5.0, 5.0, 5.0]", |c| {
                c.eval.mid4 = vec![5.0; 3]
            }),
            ("eval.mid4 (--mid4) [0.5, 1.0, 0.2]", |c| {
                c.eval.mid4 = vec![0.5, 1.0, 0.2]
            }),
            ("eval.mid4 (--mid4) holds 2", |c| {
                c.eval.mid4 = vec![1.0, 0.5]
            }),
            ("eval.mid2 (--mid2) [0.0]", |c| c.eval.mid2 = vec![0.0]),
            ("eval.mid2 (--mid2) [NaN]", |c| c.eval.mid2 = vec![f64::NAN]),
            // arctan(2) ≈ 1.107: the 2-step sampler would re-noise at 1.3, above its start.
            ("eval.mid2 (--mid2) [1.3]", |c| {
                c.eval.sigma_max = 2.0;
                c.eval.mid2 = vec![1.3];
                c.eval.mid4 = vec![1.0, 0.8, 0.5];
            }),
            // 6 steps take times from 1.3 down, above arctan(2).
            ("6-step sampler", |c| {
                c.eval.sigma_max = 2.0;
                c.eval.mid2 = vec![1.0];
                c.eval.mid4 = vec![1.0, 0.8, 0.5];
                c.eval.steps = vec![1, 6];
            }),
        ];
        for (want, edit) in cases {
            let mut c = RcmConfig::preset(Preset::Toy);
            edit(&mut c);
            let e = c.check().expect_err(want).to_string();
            assert!(e.contains(want), "want `{want}` in: {e}");
        }
    }

    #[test]
    fn sampler_times_are_checked() {
        let c = RcmConfig::preset(Preset::Default).eval;
        assert_eq!(c.times(4).unwrap(), vec![80f64.atan(), 1.1, 1.0, 0.9]);
        assert_eq!(c.times(6).unwrap().len(), 6);
        assert!(c.times(0).is_err());
        assert!(c.times(usize::MAX).is_err());
        let no_mid2 = EvalConfig {
            mid2: vec![],
            ..c.clone()
        };
        let e = no_mid2.times(2).unwrap_err().to_string();
        assert!(e.contains("2-step"), "{e}");
    }
}
