//! The training phases: the teacher (flow matching), then a student per method (sCM, DMD, rCM),
//! each resumable from its checkpoint. Every loss is formed in f64 from the network's outputs and
//! handed back to the network as an output cotangent (dL/dF) for one backward.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::glyph::{self, NUM_CLASSES, PIXELS};
use crate::dit::Dit;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::checkpoint::{self, Checkpoint};
use super::net::{self, NULL_CLASS};
use super::optim::{AdamW, Ema};
use super::{mix_seed, trigflow, Method, PhaseInfo, RcmConfig};

/// What every phase needs to know about the run.
pub struct Ctx<'a> {
    /// The run's settings.
    pub cfg: &'a RcmConfig,
    /// The output folder: checkpoints, fingerprints and finished models.
    pub out: &'a Path,
    /// The run's seed, from which every step's random numbers are derived.
    pub seed: u64,
    /// Continue phases from their checkpoints and reuse finished students (a finished teacher
    /// with a matching fingerprint is reused either way).
    pub resume: bool,
    /// Progress bars and phase summaries on stderr.
    pub progress: bool,
    /// Training steps this run may still take before it stops as if killed (None: no limit;
    /// Some(0): no step at all, a phase that would train stops before its first step).
    pub budget: std::cell::Cell<Option<usize>>,
}

impl Ctx<'_> {
    /// Counts one training step (just taken) against the budget; true when the budget is spent
    /// and the run must stop now.
    fn spend(&self) -> bool {
        match self.budget.get() {
            None => false,
            Some(n) => {
                let left = n.saturating_sub(1);
                self.budget.set(Some(left));
                left == 0
            }
        }
    }

    /// True when the budget allows no further step.
    fn exhausted(&self) -> bool {
        self.budget.get() == Some(0)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    fn bar(&self, name: &str, len: usize, pos: usize) -> indicatif::ProgressBar {
        let pb = if self.progress {
            indicatif::ProgressBar::new(len as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix(name.to_string());
        pb.set_position(pos as u64);
        pb.reset_eta();
        pb
    }

    fn say(&self, msg: &str) {
        if self.progress {
            eprintln!("{msg}");
        }
    }
}

/// A loss value smoothed for display.
struct Smooth(Option<f64>);

impl Smooth {
    fn push(&mut self, v: f64) -> f64 {
        if v.is_finite() {
            self.0 = Some(self.0.map_or(v, |s| 0.95 * s + 0.05 * v));
        }
        self.0.unwrap_or(f64::NAN)
    }
}

fn step_rng(seed: u64, tag: u64, step: usize) -> StdRng {
    StdRng::seed_from_u64(mix_seed(seed, tag, step as u64))
}

fn random_classes(n: usize, rng: &mut impl Rng) -> Vec<usize> {
    (0..n).map(|_| rng.random_range(0..NUM_CLASSES)).collect()
}

/// Per sample (of `dim` values each, `n` samples): whether it is finite in every listed vector.
fn finite_mask(vs: &[&[f64]], n: usize, dim: usize) -> Vec<bool> {
    (0..n)
        .map(|i| {
            vs.iter()
                .all(|v| v[i * dim..(i + 1) * dim].iter().all(|x| x.is_finite()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Teacher

/// One flow-matching step: L = mean_i ‖F(x_t, t, c) − (cos t·z − sin t·x₀)‖², labels dropped to
/// the null class with probability `label_dropout` so the same network gives the unconditional
/// branch of classifier-free guidance. Returns the per-pixel loss and the parameter gradients.
fn teacher_grads(net: &Dit, cfg: &RcmConfig, rng: &mut StdRng) -> Result<(f64, Vec<Tensor>)> {
    let tc = &cfg.teacher;
    let b = tc.batch;
    let classes = random_classes(b, rng);
    let x0 = glyph::sample_classes(&classes, rng)?;
    let cond: Vec<usize> = classes
        .iter()
        .map(|&c| {
            if rng.random::<f64>() < tc.label_dropout {
                NULL_CLASS
            } else {
                c
            }
        })
        .collect();
    let z = trigflow::randn(b * PIXELS, rng);
    let t = trigflow::sample_t_lognormal(b, cfg.p_mean, cfg.p_std, rng);
    let xt = trigflow::noisy(&x0, &z, &t, PIXELS)?;
    let v = trigflow::velocity_target(&x0, &z, &t, PIXELS)?;
    let (f, cache) = net::velocity_train(net, &xt, &t, &cond)?;
    let ok = finite_mask(&[&f], b, PIXELS);
    let valid = ok.iter().filter(|&&o| o).count().max(1) as f64;
    let mut gout = vec![0.0; b * PIXELS];
    let mut loss = 0.0;
    for i in (0..b).filter(|&i| ok[i]) {
        for k in i * PIXELS..(i + 1) * PIXELS {
            let d = f[k] - v[k];
            loss += d * d;
            gout[k] = 2.0 * d / valid;
        }
    }
    let grads = net::backward(net, &cache, &gout)?;
    Ok((loss / (valid * PIXELS as f64), grads))
}

/// Trains the teacher, or reuses a finished one in `out` trained with the same settings.
/// Returns its EMA weights.
/// `None` when the step budget ran out first (the checkpoint holds the state).
pub fn teacher(ctx: &Ctx) -> Result<Option<(Dit, PhaseInfo)>> {
    let cfg = ctx.cfg;
    cfg.check()?;
    let fp = teacher_fingerprint(cfg, ctx.seed);
    let (final_path, final_json) = (ctx.path("teacher.safetensors"), ctx.path("teacher.json"));
    let start = Instant::now();
    if final_path.exists() && checkpoint::read_fingerprint(&final_json).as_deref() == Some(&fp) {
        ctx.say(&format!("teacher: reusing {}", final_path.display()));
        let net = Dit::load(cfg.dit.clone(), &final_path)?;
        return Ok(Some((net, PhaseInfo::reused("teacher", cfg.teacher.steps))));
    }
    let names = checkpoint::param_names(&cfg.dit)?;
    let (ckpt_path, run_json) = (
        ctx.path("teacher.ckpt.safetensors"),
        ctx.path("teacher.run.json"),
    );
    let mut init_rng = step_rng(ctx.seed, TAG_INIT, 0);
    let mut net = Dit::new(cfg.dit.clone(), cfg.dtype, &mut init_rng)?;
    let mut opt = AdamW::new(cfg.teacher.adam, net.params());
    let mut ema = Ema::new(cfg.teacher.ema, net.params());
    let mut step = 0usize;
    let total = cfg.teacher.steps;
    let resumed = resume_or_start(
        ctx,
        "teacher",
        &ckpt_path,
        &run_json,
        &fp,
        &TEACHER_COUNTERS,
    )?;
    if let Some((ck, c)) = resumed {
        // Each step is one optimizer update and one EMA update.
        if c[0] > total || c[1] != c[0] || c[2] != c[0] {
            return Err(inconsistent(
                &ckpt_path,
                &TEACHER_COUNTERS,
                &c,
                format!(
                    "step must be at most the {total} teacher steps and the adam step and ema \
                     updates equal to it"
                ),
            ));
        }
        let like = net.params().to_vec();
        net = restore(cfg, &ck, &names, &like, &mut ema, &mut opt)?;
        step = c[0];
        opt.step = c[1];
        ema.updates = c[2];
        ctx.say(&format!("teacher: resuming at step {step}"));
    }
    // step ≤ total from here on (checked above), so `total - resumed_from` cannot wrap.
    let resumed_from = step;
    let pb = ctx.bar("teacher", total, step);
    let mut smooth = Smooth(None);
    while step < total {
        if ctx.exhausted() {
            pb.abandon();
            return Ok(None);
        }
        let mut rng = step_rng(ctx.seed, TAG_TEACHER, step);
        let (loss, grads) = teacher_grads(&net, cfg, &mut rng)?;
        opt.update(net.params_mut(), &grads)?;
        ema.update(net.params())?;
        step += 1;
        let l = smooth.push(loss);
        pb.set_message(format!("loss {l:.4}"));
        pb.inc(1);
        let stop = ctx.spend();
        if step % cfg.checkpoint_every == 0 || step == total || stop {
            checkpoint::save(
                &ckpt_path,
                &names,
                &[
                    ("net", net.params()),
                    ("ema", &ema.params),
                    ("adam_m", &opt.m),
                    ("adam_v", &opt.v),
                ],
                &[
                    step as f64,
                    opt.step as f64,
                    ema.updates as f64,
                    checkpoint::fingerprint_tag(&fp),
                ],
            )?;
        }
        if stop && step < total {
            pb.abandon();
            return Ok(None);
        }
    }
    pb.finish();
    let (teacher, seconds) =
        finish_phase(cfg, ema.params, &final_path, &final_json, &fp, total, start)?;
    ctx.say(&format!(
        "teacher: {} steps in {seconds:.1} s, final loss {:.4}",
        total - resumed_from,
        smooth.0.unwrap_or(f64::NAN)
    ));
    Ok(Some((
        teacher,
        PhaseInfo {
            name: "teacher".into(),
            steps: total,
            steps_run: total - resumed_from,
            seconds,
            reused: false,
        },
    )))
}

// ---------------------------------------------------------------------------------------------
// Students

const TAG_INIT: u64 = 1;
const TAG_TEACHER: u64 = 2;
const TAG_STUDENT: u64 = 3;
const TAG_FAKE: u64 = 4;

/// The sCM gradient on one batch of data.
///
/// Tangents along the teacher's PF-ODE: ẋ = cos t sin t·F_teacher(x_t, t) (guided), ṫ = cos t sin t.
/// One dual forward of the student gives F⁻ (its primal) and u = cos t sin t·dF⁻/dt (its tangent).
/// With warmup r: g = −cos t·√(1 − r² sin² t)·(F⁻ − F_teacher) − r·(cos t sin t·x_t + u), then
/// g ← g/(‖g‖ + 0.1) per sample, and the loss is L = scale·mean_i Σ(F − sg(F) − g)².
///
/// Why one backward suffices: g is a constant (stop-gradient) and sg(F) equals F at the current
/// parameters, so the gradient of L with respect to F there is
/// dL/dF = 2·scale·(F − sg(F) − g)/B = −2·scale·g/B. The parameter gradient is that cotangent
/// pulled back through F; the primal of the dual forward *is* F at the current parameters, and its
/// cache serves `Dit::backward` exactly as a plain forward's would. The reference implementation
/// runs a JVP pass, a second forward for the differentiable F, and a backward; here the second
/// forward is unnecessary.
fn scm_grads(
    student: &Dit,
    teacher: &Dit,
    cfg: &RcmConfig,
    r: f64,
    classes: &[usize],
    rng: &mut StdRng,
) -> Result<(f64, Vec<Tensor>)> {
    let b = classes.len();
    let x0 = glyph::sample_classes(classes, rng)?;
    let z = trigflow::randn(b * PIXELS, rng);
    let t = trigflow::sample_t_lognormal(b, cfg.student.p_mean, cfg.student.p_std, rng);
    let xt = trigflow::noisy(&x0, &z, &t, PIXELS)?;
    let f_teacher = net::velocity_guided(teacher, &xt, &t, classes, cfg.guidance)?;
    let (cos, sin) = trigflow::cos_sin(&t);
    let cs: Vec<f64> = cos.iter().zip(&sin).map(|(c, s)| c * s).collect();
    let zero = vec![0.0; b];
    let x_dot = trigflow::combine(&cs, &f_teacher, &zero, &f_teacher, PIXELS)?;
    let (f_minus, u, cache) = net::velocity_dual(student, &xt, &x_dot, &t, &cs, classes)?;
    let mut g = vec![0.0; b * PIXELS];
    for i in 0..b {
        let a = -cos[i] * (1.0 - r * r * sin[i] * sin[i]).max(0.0).sqrt();
        for k in i * PIXELS..(i + 1) * PIXELS {
            g[k] = a * (f_minus[k] - f_teacher[k]) - r * (cs[i] * xt[k] + u[k]);
        }
    }
    let ok = finite_mask(&[&g, &f_minus], b, PIXELS);
    let valid = ok.iter().filter(|&&o| o).count().max(1) as f64;
    let mut gout = vec![0.0; b * PIXELS];
    let mut loss = 0.0;
    for i in (0..b).filter(|&i| ok[i]) {
        let gi = &g[i * PIXELS..(i + 1) * PIXELS];
        let norm = gi.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (k, gk) in gi.iter().enumerate() {
            let gn = gk / (norm + 0.1);
            loss += gn * gn;
            gout[i * PIXELS + k] = -2.0 * cfg.student.scm_scale * gn / valid;
        }
    }
    let grads = net::backward(student, &cache, &gout)?;
    Ok((cfg.student.scm_scale * loss / valid, grads))
}

/// Rolls the student out from pure noise (at t = arctan σ_max) for `pre` steps without gradient, each step
/// re-noising its x̂₀ at a time drawn for DMD and capped by the previous one. Returns x and t of
/// the last state, where the step that keeps a gradient (or the final sample) is taken.
fn rollout(
    student: &Dit,
    cfg: &RcmConfig,
    classes: &[usize],
    pre: usize,
    rng: &mut StdRng,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let b = classes.len();
    // Start where the few-step sampler starts, from pure noise.
    let mut t = vec![cfg.eval.sigma_max.atan(); b];
    let mut x = trigflow::randn(b * PIXELS, rng);
    for _ in 0..pre {
        let x0 = net::denoised(student, &x, &t, classes, 1.0)?;
        let td = trigflow::sample_t_shifted(b, cfg.student.dmd_shift, rng);
        for (ti, di) in t.iter_mut().zip(td) {
            *ti = ti.min(di);
        }
        let eps = trigflow::randn(b * PIXELS, rng);
        x = trigflow::noisy(&x0, &eps, &t, PIXELS)?;
    }
    Ok((x, t))
}

/// The DMD gradient: roll out, keep the gradient of the last step x̂₀ = cos t·x − sin t·F,
/// re-noise x̂₀ at t_D, and push x̂₀ along grad = (x̂₀_fake − x̂₀_teacher)/mean|x̂₀ − x̂₀_teacher|:
/// L = scale·mean_i Σ(x̂₀ − sg(x̂₀ − grad))², so dL/dx̂₀ = 2·scale·grad/B and, through the
/// denoiser, dL/dF = −sin t·dL/dx̂₀.
fn dmd_grads(
    student: &Dit,
    teacher: &Dit,
    fake: &Dit,
    cfg: &RcmConfig,
    classes: &[usize],
    pre: usize,
    rng: &mut StdRng,
) -> Result<(f64, Vec<Tensor>)> {
    let b = classes.len();
    let (gx, gt) = rollout(student, cfg, classes, pre, rng)?;
    let (f, cache) = net::velocity_train(student, &gx, &gt, classes)?;
    let x0 = trigflow::denoise(&gx, &f, &gt, PIXELS)?;
    let td = trigflow::sample_t_shifted(b, cfg.student.dmd_shift, rng);
    let eps = trigflow::randn(b * PIXELS, rng);
    let dx = trigflow::noisy(&x0, &eps, &td, PIXELS)?;
    let x0_fake = net::denoised(fake, &dx, &td, classes, 1.0)?;
    let x0_teacher = net::denoised(teacher, &dx, &td, classes, cfg.student.dmd_guidance)?;
    let ok = finite_mask(&[&x0, &x0_fake, &x0_teacher], b, PIXELS);
    let valid = ok.iter().filter(|&&o| o).count().max(1) as f64;
    let mut gout = vec![0.0; b * PIXELS];
    let mut loss = 0.0;
    for i in (0..b).filter(|&i| ok[i]) {
        let r = i * PIXELS..(i + 1) * PIXELS;
        let weight = (r
            .clone()
            .map(|k| (x0[k] - x0_teacher[k]).abs())
            .sum::<f64>()
            / PIXELS as f64)
            .max(1e-5);
        let sin = gt[i].sin();
        for k in r {
            let grad = (x0_fake[k] - x0_teacher[k]) / weight;
            loss += grad * grad;
            gout[k] = -sin * 2.0 * cfg.student.dmd_scale * grad / valid;
        }
    }
    let grads = net::backward(student, &cache, &gout)?;
    Ok((cfg.student.dmd_scale * loss / valid, grads))
}

/// One fake-score update: flow matching on the student's own samples, so the fake network tracks
/// the score of the student's distribution.
fn fake_grads(
    student: &Dit,
    fake: &Dit,
    cfg: &RcmConfig,
    classes: &[usize],
    pre: usize,
    rng: &mut StdRng,
) -> Result<(f64, Vec<Tensor>)> {
    let b = classes.len();
    let (gx, gt) = rollout(student, cfg, classes, pre, rng)?;
    let x0 = net::denoised(student, &gx, &gt, classes, 1.0)?;
    let td = trigflow::sample_t_shifted(b, cfg.student.dmd_shift, rng);
    let eps = trigflow::randn(b * PIXELS, rng);
    let dx = trigflow::noisy(&x0, &eps, &td, PIXELS)?;
    let v = trigflow::velocity_target(&x0, &eps, &td, PIXELS)?;
    let (f, cache) = net::velocity_train(fake, &dx, &td, classes)?;
    let ok = finite_mask(&[&f, &v], b, PIXELS);
    let valid = ok.iter().filter(|&&o| o).count().max(1) as f64;
    let mut gout = vec![0.0; b * PIXELS];
    let mut loss = 0.0;
    for i in (0..b).filter(|&i| ok[i]) {
        for k in i * PIXELS..(i + 1) * PIXELS {
            let d = f[k] - v[k];
            loss += d * d;
            gout[k] = 2.0 * d / valid;
        }
    }
    let grads = net::backward(fake, &cache, &gout)?;
    Ok((loss / (valid * PIXELS as f64), grads))
}

/// Distils the teacher into a few-step student with `method`: sCM alone, DMD alone, or rCM
/// (sCM + DMD after the tangent warmup, the DMD loss at `dmd_scale` against sCM's `scm_scale`). Returns the
/// student's EMA weights.
/// `None` when the step budget ran out first.
pub fn student(
    ctx: &Ctx,
    method: Method,
    teacher: &Dit,
    teacher_fp: &str,
) -> Result<Option<(Dit, PhaseInfo)>> {
    let cfg = ctx.cfg;
    cfg.check()?;
    let sc = &cfg.student;
    let name = method.name();
    let fp = format!(
        "{name}|{teacher_fp}|{sc:?}|guidance {}|sigma_max {}|seed {}",
        cfg.guidance, cfg.eval.sigma_max, ctx.seed
    );
    let final_path = ctx.path(&format!("{name}.safetensors"));
    let final_json = ctx.path(&format!("{name}.json"));
    let start = Instant::now();
    if ctx.resume
        && final_path.exists()
        && checkpoint::read_fingerprint(&final_json).as_deref() == Some(&fp)
    {
        ctx.say(&format!("{name}: reusing {}", final_path.display()));
        let net = Dit::load(cfg.dit.clone(), &final_path)?;
        return Ok(Some((net, PhaseInfo::reused(name, sc.steps))));
    }
    let names = checkpoint::param_names(&cfg.dit)?;
    let ckpt_path = ctx.path(&format!("{name}.ckpt.safetensors"));
    let run_json = ctx.path(&format!("{name}.run.json"));
    let uses_scm = method != Method::Dmd;
    let uses_dmd = method != Method::Scm;
    let mut student = net::dit_with_params(cfg.dit.clone(), teacher.params().to_vec())?;
    let mut opt = AdamW::new(sc.adam, student.params());
    let mut ema = Ema::new(sc.ema, student.params());
    let mut fake = if uses_dmd {
        let f = net::dit_with_params(cfg.dit.clone(), teacher.params().to_vec())?;
        let o = AdamW::new(sc.fake_adam, f.params());
        Some((f, o))
    } else {
        None
    };
    let (mut step, mut fake_step) = (0usize, 0usize);
    let total = sc.steps;
    let resumed = resume_or_start(ctx, name, &ckpt_path, &run_json, &fp, &STUDENT_COUNTERS)?;
    if let Some((ck, c)) = resumed {
        // Each student update is one optimizer and one EMA update, and each update with DMD on
        // (see the loop) `fake_updates` fake-score updates, each one optimizer update.
        let dmd_updates = if !uses_dmd {
            0
        } else if !uses_scm {
            c[0]
        } else {
            c[0].saturating_sub(sc.tangent_warmup)
        };
        let fakes = dmd_updates.checked_mul(sc.fake_updates);
        if c[0] > total || c[1] != c[0] || c[2] != c[0] || Some(c[3]) != fakes || c[4] != c[3] {
            return Err(inconsistent(
                &ckpt_path,
                &STUDENT_COUNTERS,
                &c,
                format!(
                    "step must be at most the {total} student updates, the adam step and ema \
                     updates equal to it, and the fake-score step and its adam step {}",
                    fakes.map_or("beyond any count".to_string(), |f| f.to_string())
                ),
            ));
        }
        let like = teacher.params().to_vec();
        student = restore(cfg, &ck, &names, &like, &mut ema, &mut opt)?;
        step = c[0];
        opt.step = c[1];
        ema.updates = c[2];
        fake_step = c[3];
        if let Some((f, o)) = fake.as_mut() {
            *f = net::dit_with_params(cfg.dit.clone(), ck.group_like("fake", &names, &like)?)?;
            o.m = ck.group_like("fake_adam_m", &names, &like)?;
            o.v = ck.group_like("fake_adam_v", &names, &like)?;
            o.step = c[4];
        }
        ctx.say(&format!("{name}: resuming at student step {step}"));
    }
    // step ≤ total from here on (checked above), so `total - resumed_from` cannot wrap.
    let resumed_from = step;
    let pb = ctx.bar(name, total, step);
    let (mut s_scm, mut s_dmd, mut s_fake) = (Smooth(None), Smooth(None), Smooth(None));
    while step < total {
        if ctx.exhausted() {
            pb.abandon();
            return Ok(None);
        }
        // rCM turns DMD on once the tangent warmup is over (as the reference does); DMD alone
        // runs it from the start.
        let dmd_on = uses_dmd && (!uses_scm || step >= sc.tangent_warmup);
        if dmd_on {
            let (f, o) = fake.as_mut().expect("DMD methods hold a fake score");
            for _ in 0..sc.fake_updates {
                let mut rng = step_rng(ctx.seed, TAG_FAKE ^ method.tag(), fake_step);
                let classes = random_classes(sc.batch, &mut rng);
                let pre = fake_step % sc.max_rollout;
                let (loss, grads) = fake_grads(&student, f, cfg, &classes, pre, &mut rng)?;
                o.update(f.params_mut(), &grads)?;
                s_fake.push(loss);
                fake_step += 1;
            }
        }
        let mut rng = step_rng(ctx.seed, TAG_STUDENT ^ method.tag(), step);
        let classes = random_classes(sc.batch, &mut rng);
        let mut grads: Option<Vec<Tensor>> = None;
        if uses_scm {
            let r = if sc.tangent_warmup == 0 {
                1.0
            } else {
                (step as f64 / sc.tangent_warmup as f64).min(1.0)
            };
            let (loss, g) = scm_grads(&student, teacher, cfg, r, &classes, &mut rng)?;
            s_scm.push(loss);
            grads = Some(g);
        }
        if dmd_on {
            let (f, _) = fake.as_ref().expect("DMD methods hold a fake score");
            let pre = step % sc.max_rollout;
            let (loss, g) = dmd_grads(&student, teacher, f, cfg, &classes, pre, &mut rng)?;
            s_dmd.push(loss);
            match grads.as_mut() {
                Some(acc) => net::add_grads(acc, &g)?,
                None => grads = Some(g),
            }
        }
        let grads = grads.expect("every method has a loss");
        opt.update(student.params_mut(), &grads)?;
        ema.update(student.params())?;
        step += 1;
        pb.set_message(format!(
            "sCM {:.3} DMD {:.3} fake {:.4}",
            s_scm.0.unwrap_or(f64::NAN),
            s_dmd.0.unwrap_or(f64::NAN),
            s_fake.0.unwrap_or(f64::NAN)
        ));
        pb.inc(1);
        let stop = ctx.spend();
        if step % cfg.checkpoint_every == 0 || step == total || stop {
            let empty: Vec<Tensor> = Vec::new();
            let (fp_, fm, fv, fs) = match &fake {
                Some((f, o)) => (f.params(), &o.m[..], &o.v[..], o.step),
                None => (&empty[..], &empty[..], &empty[..], 0),
            };
            let mut groups: Vec<(&str, &[Tensor])> = vec![
                ("net", student.params()),
                ("ema", &ema.params),
                ("adam_m", &opt.m),
                ("adam_v", &opt.v),
            ];
            if fake.is_some() {
                groups.extend([("fake", fp_), ("fake_adam_m", fm), ("fake_adam_v", fv)]);
            }
            checkpoint::save(
                &ckpt_path,
                &names,
                &groups,
                &[
                    step as f64,
                    opt.step as f64,
                    ema.updates as f64,
                    fake_step as f64,
                    fs as f64,
                    checkpoint::fingerprint_tag(&fp),
                ],
            )?;
        }
        if stop && step < total {
            pb.abandon();
            return Ok(None);
        }
    }
    pb.finish();
    let (model, seconds) =
        finish_phase(cfg, ema.params, &final_path, &final_json, &fp, total, start)?;
    ctx.say(&format!(
        "{name}: {} student steps ({fake_step} fake-score updates in all) in {seconds:.1} s",
        total - resumed_from
    ));
    Ok(Some((
        model,
        PhaseInfo {
            name: name.into(),
            steps: total,
            steps_run: total - resumed_from,
            seconds,
            reused: false,
        },
    )))
}

/// The counters of a teacher checkpoint, in order (the last is the fingerprint's tag).
const TEACHER_COUNTERS: [&str; 4] = ["step", "adam step", "ema updates", "fingerprint"];

/// The counters of a student checkpoint, in order (the last is the fingerprint's tag).
const STUDENT_COUNTERS: [&str; 6] = [
    "step",
    "adam step",
    "ema updates",
    "fake-score step",
    "fake adam step",
    "fingerprint",
];

/// The checkpoint to resume a phase from, with its counters (checked as whole counts, the
/// fingerprint tag removed), when resuming was asked for, `run_json` names this phase's
/// fingerprint and the checkpoint's own tag matches it. Otherwise the phase starts fresh: a
/// checkpoint left in the folder by an earlier run is removed *before* the new fingerprint is
/// written, so a later `--resume` under this fingerprint never picks up the other run's
/// weights, moments and counters.
fn resume_or_start(
    ctx: &Ctx,
    name: &str,
    ckpt_path: &Path,
    run_json: &Path,
    fp: &str,
    labels: &[&str],
) -> Result<Option<(Checkpoint, Vec<usize>)>> {
    if ctx.resume
        && ckpt_path.exists()
        && checkpoint::read_fingerprint(run_json).as_deref() == Some(fp)
    {
        let ck = Checkpoint::load(ckpt_path)?;
        let mut c = ck.counts(labels)?;
        let tag = c.pop().map(|t| t as f64);
        if tag == Some(checkpoint::fingerprint_tag(fp)) {
            return Ok(Some((ck, c)));
        }
        ctx.say(&format!(
            "{name}: {} was written by a run with other settings; starting afresh",
            ckpt_path.display()
        ));
    }
    checkpoint::remove_if_present(ckpt_path)?;
    checkpoint::write_fingerprint(run_json, fp, serde_json::json!({}))?;
    Ok(None)
}

/// A phase's network, its EMA and its optimizer moments from a checkpoint, each tensor checked
/// against `like` (the network's own parameters) in shape and dtype.
fn restore(
    cfg: &RcmConfig,
    ck: &Checkpoint,
    names: &[String],
    like: &[Tensor],
    ema: &mut Ema,
    opt: &mut AdamW,
) -> Result<Dit> {
    let net = net::dit_with_params(cfg.dit.clone(), ck.group_like("net", names, like)?)?;
    ema.params = ck.group_like("ema", names, like)?;
    opt.m = ck.group_like("adam_m", names, like)?;
    opt.v = ck.group_like("adam_v", names, like)?;
    Ok(net)
}

/// [`Error::Format`] for counters that are whole numbers but do not fit the phase.
fn inconsistent(path: &Path, labels: &[&str], c: &[usize], want: String) -> Error {
    let got: Vec<String> = labels
        .iter()
        .zip(c)
        .map(|(l, v)| format!("{l} {v}"))
        .collect();
    Error::Format {
        path: path.display().to_string(),
        message: format!(
            "checkpoint counters ({}) do not fit this phase: {want}",
            got.join(", ")
        ),
    }
}

/// The end of a training phase: the EMA weights become the phase's network, saved atomically,
/// then the fingerprint that lets a later run reuse it. The old fingerprint is removed before
/// the model is written, so a run killed in between leaves a model without a fingerprint (never
/// reused), not a new model under the old one's fingerprint. Returns the network and the phase's
/// seconds.
fn finish_phase(
    cfg: &RcmConfig,
    ema_params: Vec<Tensor>,
    final_path: &std::path::Path,
    final_json: &std::path::Path,
    fingerprint: &str,
    total: usize,
    start: Instant,
) -> Result<(Dit, f64)> {
    let model = net::dit_with_params(cfg.dit.clone(), ema_params)?;
    checkpoint::remove_if_present(final_json)?;
    model.save(final_path)?;
    let seconds = start.elapsed().as_secs_f64();
    checkpoint::write_fingerprint(
        final_json,
        fingerprint,
        serde_json::json!({ "steps": total, "seconds": seconds }),
    )?;
    Ok((model, seconds))
}

/// The settings that determine the teacher (DiT, parameter dtype, teacher phase, training times,
/// seed) as text; a student's fingerprint includes it, so a new teacher means new students.
pub fn teacher_fingerprint(cfg: &RcmConfig, seed: u64) -> String {
    format!(
        "teacher|{:?}|{:?}|{:?}|{:?}|seed {}",
        cfg.dit,
        cfg.dtype,
        cfg.teacher,
        (cfg.p_mean, cfg.p_std),
        seed
    )
}
