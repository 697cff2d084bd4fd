//! The whole rCM pipeline at a toy size (a tiny DiT, a few steps, a few samples): every row is
//! there with finite metrics, the outputs decode, and an interrupted run resumed from its
//! checkpoints ends exactly where the uninterrupted run does.

use std::path::{Path, PathBuf};

use flashjvp::rcm::{self, Method, Preset, RcmConfig, RcmOptions};
use flashjvp::DeviceRequest;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashjvp-rcm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn options(out: &Path, methods: &[Method]) -> RcmOptions {
    RcmOptions {
        config: RcmConfig::preset(Preset::Toy),
        methods: methods.to_vec(),
        device: DeviceRequest::Cpu,
        seed: 7,
        out: out.to_path_buf(),
        resume: false,
        progress: false,
        stop_after: None,
    }
}

fn rows_json(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["device"], "cpu");
    assert!(v["seconds"].as_f64().is_some_and(|s| s > 0.0));
    v["rows"].as_array().expect("rows").clone()
}

#[test]
fn toy_pipeline_writes_every_row_and_resumes() {
    let out = temp_dir("all");
    let opts = options(&out, &[Method::Rcm, Method::Scm, Method::Dmd]);
    let report = rcm::run(&opts).expect("the toy pipeline runs");
    assert!(report.complete);

    // Teacher at 1, 2, 4 steps and its ODE solver; every student at 1, 2, 4.
    let rows = rows_json(&out);
    let want: Vec<(&str, u64)> = [
        ("teacher", 1),
        ("teacher", 2),
        ("teacher", 4),
        ("teacher", 3),
        ("rcm", 1),
        ("rcm", 2),
        ("rcm", 4),
        ("scm", 1),
        ("scm", 2),
        ("scm", 4),
        ("dmd", 1),
        ("dmd", 2),
        ("dmd", 4),
    ]
    .to_vec();
    assert_eq!(rows.len(), want.len(), "{rows:?}");
    for (r, (model, steps)) in rows.iter().zip(want) {
        assert_eq!(r["model"], model, "{r}");
        assert_eq!(r["steps"].as_u64(), Some(steps), "{r}");
        for key in [
            "precision",
            "coverage",
            "spread",
            "class_accuracy",
            "ms_per_sample",
        ] {
            let v = r[key].as_f64();
            assert!(v.is_some_and(f64::is_finite), "{key} of {r}");
        }
        for key in ["precision", "coverage", "class_accuracy"] {
            let v = r[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} of {r}");
        }
    }
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    // Four teacher rows and three per student, plus one line each in the phase table.
    assert_eq!(md.matches("\n| teacher |").count(), 5, "{md}");
    assert_eq!(md.matches("\n| dmd |").count(), 4, "{md}");

    // samples.png decodes: 4 models in rows, 4 panels in the widest (the teacher's) row.
    let file = std::fs::File::open(out.join("samples.png")).expect("samples.png");
    let mut dec = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .expect("a PNG");
    let mut buf = vec![0; dec.output_buffer_size().expect("a size")];
    let info = dec.next_frame(&mut buf).expect("one frame");
    assert!(info.width >= 4 * 256 && info.height >= 4 * 256, "{info:?}");
    assert!(buf.iter().any(|&p| p < 64) && buf.iter().any(|&p| p > 192));

    // A second run with --resume reuses every finished model: nothing retrained, same numbers.
    let teacher_file = out.join("teacher.safetensors");
    let before = std::fs::metadata(&teacher_file)
        .unwrap()
        .modified()
        .unwrap();
    let again = rcm::run(&RcmOptions {
        resume: true,
        ..opts.clone()
    })
    .expect("the resumed run");
    assert!(again.phases.iter().all(|p| p.reused && p.steps_run == 0));
    let after = std::fs::metadata(&teacher_file)
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "the teacher was rewritten");
    assert_eq!(rows_json(&out).len(), rows.len());
    for (a, b) in report.rows.iter().zip(&again.rows) {
        assert_eq!(a.metrics, b.metrics, "{} at {} steps", a.model, a.steps);
    }

    // Without --resume a finished teacher with the same settings is still reused.
    let fresh = rcm::run(&RcmOptions {
        methods: vec![Method::Scm],
        ..opts.clone()
    })
    .expect("a run beside a finished teacher");
    assert!(fresh.phases[0].reused, "{:?}", fresh.phases);
    assert!(!fresh.phases[1].reused && fresh.phases[1].steps_run > 0);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn interrupted_runs_resume_exactly() {
    let whole = temp_dir("whole");
    let parts = temp_dir("parts");
    let cfg = RcmConfig::preset(Preset::Toy);
    let (nt, ns) = (cfg.teacher.steps, cfg.student.steps);
    let full = rcm::run(&options(&whole, &[Method::Rcm])).expect("the uninterrupted run");

    // Stop mid-teacher, then mid-student (between checkpoints), then finish.
    let first = rcm::run(&RcmOptions {
        stop_after: Some(nt / 2 + 1),
        ..options(&parts, &[Method::Rcm])
    })
    .expect("the first part");
    assert!(!first.complete);
    assert!(!parts.join("teacher.safetensors").exists());
    let second = rcm::run(&RcmOptions {
        stop_after: Some(nt - (nt / 2 + 1) + ns / 2 + 1),
        resume: true,
        ..options(&parts, &[Method::Rcm])
    })
    .expect("the second part");
    assert!(!second.complete);
    assert_eq!(second.phases.len(), 1);
    assert_eq!(second.phases[0].steps_run, nt - (nt / 2 + 1));
    let last = rcm::run(&RcmOptions {
        resume: true,
        ..options(&parts, &[Method::Rcm])
    })
    .expect("the last part");
    assert!(last.complete);
    assert!(last.phases[0].reused);
    assert_eq!(last.phases[1].steps_run, ns - (ns / 2 + 1));

    for name in ["teacher.safetensors", "rcm.safetensors"] {
        let a = flashjvp::io::load_safetensors(&whole.join(name)).unwrap();
        let b = flashjvp::io::load_safetensors(&parts.join(name)).unwrap();
        assert_eq!(a, b, "{name} differs after resuming");
    }
    for (a, b) in full.rows.iter().zip(&last.rows) {
        assert_eq!(a.metrics, b.metrics, "{} at {} steps", a.model, a.steps);
    }
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&parts);
}

#[test]
fn cuda_and_bad_options_are_errors() {
    let out = temp_dir("bad");
    let mut opts = options(&out, &[Method::Rcm]);
    opts.device = DeviceRequest::Cuda;
    let err = rcm::run(&opts).unwrap_err().to_string();
    assert!(err.contains("cuda"), "{err}");
    assert!(Method::parse_list("rcm,bogus").is_err());
    assert!(Preset::parse("huge").is_err());
    let mut opts = options(&out, &[Method::Rcm]);
    opts.config.eval.n = 0;
    assert!(rcm::run(&opts).is_err());
    let _ = std::fs::remove_dir_all(&out);

    // What the rcm example's options can set, each refused before anything is written (these
    // used to abort on allocation, overflow, divide by zero or train NaN weights).
    type Edit = fn(&mut RcmConfig);
    let cases: [(&str, Edit); 9] = [
        ("depth", |c| c.dit.depth = 1_000_000_000),
        ("depth", |c| c.dit.depth = usize::MAX),
        ("--ode-steps", |c| c.eval.teacher_steps = usize::MAX),
        ("--eval-n", |c| c.eval.n = 1 << 61),
        ("--teacher-batch", |c| c.teacher.batch = usize::MAX / 16),
        ("--sigma-max", |c| c.eval.sigma_max = 0.0),
        ("--teacher-lr", |c| c.teacher.adam.lr = f64::NAN),
        ("--dmd-shift", |c| c.student.dmd_shift = 0.0),
        ("--mid4", |c| c.eval.mid4 = vec![5.0, 5.0, 5.0]),
    ];
    for (want, edit) in cases {
        let mut opts = options(&out, &[Method::Rcm]);
        edit(&mut opts.config);
        let e = rcm::run(&opts).expect_err(want).to_string();
        assert!(e.contains(want), "want `{want}` in: {e}");
        assert!(!out.exists(), "{want}: the run wrote to {}", out.display());
    }
    let e = rcm::run(&options(&out, &[Method::Scm, Method::Rcm, Method::Scm]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("scm is listed twice"), "{e}");
}

/// The toy settings with `teacher_steps` teacher steps.
fn toy_teacher(out: &Path, teacher_steps: usize, seed: u64) -> RcmOptions {
    let mut o = options(out, &[]);
    o.config.teacher.steps = teacher_steps;
    o.seed = seed;
    o
}

/// A checkpoint left by one run is never resumed by another: run A (seed 7, 8 steps) stops at
/// step 6; run B (seed 1, 4 steps) starts fresh and is killed before its first checkpoint; run
/// C resumes B. C used to load A's step-6 state under B's fingerprint and compute 4 − 6 steps
/// run. Now B removes A's checkpoint before writing its fingerprint, and a checkpoint that
/// survives all the same (as from an older build) carries A's fingerprint tag and is ignored.
#[test]
fn stale_checkpoints_are_never_resumed() {
    let out = temp_dir("stale");
    let ckpt = out.join("teacher.ckpt.safetensors");
    let a = rcm::run(&RcmOptions {
        stop_after: Some(6),
        ..toy_teacher(&out, 8, 7)
    })
    .expect("run A");
    assert!(!a.complete && ckpt.exists());
    let a_ckpt = std::fs::read(&ckpt).unwrap();

    let b = rcm::run(&RcmOptions {
        stop_after: Some(0),
        ..toy_teacher(&out, 4, 1)
    })
    .expect("run B");
    assert!(!b.complete && b.phases.is_empty());
    assert!(out.join("teacher.run.json").exists());
    assert!(
        !ckpt.exists(),
        "run B left run A's checkpoint beside its fingerprint"
    );

    // As an older build would have left the folder: A's checkpoint under B's fingerprint.
    std::fs::write(&ckpt, &a_ckpt).unwrap();
    let c = rcm::run(&RcmOptions {
        resume: true,
        ..toy_teacher(&out, 4, 1)
    })
    .expect("run C");
    assert!(c.complete);
    assert_eq!((c.phases[0].steps, c.phases[0].steps_run), (4, 4));
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["phases"][0]["steps_run"], 4, "{v}");

    // C's teacher is the one a clean run with its settings trains.
    let clean = temp_dir("stale-clean");
    rcm::run(&toy_teacher(&clean, 4, 1)).expect("the clean run");
    let x = flashjvp::io::load_safetensors(&out.join("teacher.safetensors")).unwrap();
    let y = flashjvp::io::load_safetensors(&clean.join("teacher.safetensors")).unwrap();
    assert_eq!(x, y, "run C did not train from scratch");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&clean);
}

/// Rewrites the tensor `name` of the safetensors file at `path` with `f`.
fn edit_tensor(path: &Path, name: &str, f: impl FnOnce(&flashjvp::Tensor) -> flashjvp::Tensor) {
    let mut map = flashjvp::io::load_safetensors(path).unwrap();
    let t = f(&map[name]);
    map.insert(name.to_string(), t);
    flashjvp::io::save_safetensors(path, map.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
}

fn counters(c: &[f64]) -> flashjvp::Tensor {
    flashjvp::Tensor::from_vec(c.to_vec(), &[c.len()]).unwrap()
}

/// Edited, truncated or foreign checkpoints are errors naming the file and what is wrong, never
/// a panic, a silent restart or NaN weights.
#[test]
fn edited_checkpoints_are_errors() {
    let out = temp_dir("edited");
    let cfg = RcmConfig::preset(Preset::Toy);
    let nt = cfg.teacher.steps;
    // Stop at teacher step 3 (saved there although checkpoint_every is 2).
    let first = rcm::run(&RcmOptions {
        stop_after: Some(3),
        ..options(&out, &[Method::Rcm])
    })
    .unwrap();
    assert!(!first.complete);
    let ckpt = out.join("teacher.ckpt.safetensors");
    let good = std::fs::read(&ckpt).unwrap();
    let saved = flashjvp::io::load_safetensors(&ckpt).unwrap()["counters"].to_f64_vec();
    assert_eq!(saved[..3], [3.0, 3.0, 3.0]);
    let tag = saved[3];
    let resume = || {
        rcm::run(&RcmOptions {
            resume: true,
            ..options(&out, &[Method::Rcm])
        })
    };
    type Edit = Box<dyn Fn(&Path)>;
    let set = |c: Vec<f64>| -> Edit {
        Box::new(move |p: &Path| edit_tensor(p, "counters", |_| counters(&c)))
    };
    let cases: Vec<(&str, Edit)> = vec![
        // Short counters used to panic on indexing.
        ("has 2 counters, expected 4", set(vec![3.0, 3.0])),
        // NaN and −1 used to become step 0 (a silent restart on trained weights), 1e300
        // usize::MAX (an overflow on the next step).
        ("counter `step` is NaN", set(vec![f64::NAN, 3.0, 3.0, tag])),
        ("counter `adam step` is -1", set(vec![3.0, -1.0, 3.0, tag])),
        (
            "counter `ema updates` is 2.5",
            set(vec![3.0, 3.0, 2.5, tag]),
        ),
        (
            "counter `step` is 1000000000",
            set(vec![1e300, 3.0, 3.0, tag]),
        ),
        // 2^32 − 1 used to wrap to −1 in the bias correction: NaN weights.
        (
            "adam step 4294967295",
            set(vec![3.0, 4294967295.0, 3.0, tag]),
        ),
        // Beyond the phase's steps: 8 − 100 steps run used to wrap.
        ("step 100", set(vec![100.0, 100.0, 100.0, tag])),
        // A tensor in another dtype used to build a network of mixed dtypes.
        (
            "net.",
            Box::new(|p: &Path| {
                let map = flashjvp::io::load_safetensors(p).unwrap();
                let name = map.keys().find(|k| k.starts_with("net.")).unwrap().clone();
                edit_tensor(p, &name, |t| t.to_dtype(flashjvp::DType::F64))
            }),
        ),
        (
            "ema.",
            Box::new(|p: &Path| {
                let map = flashjvp::io::load_safetensors(p).unwrap();
                let name = map
                    .iter()
                    .find(|(k, t)| k.starts_with("ema.") && t.rank() >= 2)
                    .unwrap()
                    .0
                    .clone();
                edit_tensor(p, &name, |t| t.clone().reshape(&[t.numel()]).unwrap())
            }),
        ),
        (
            "",
            Box::new(|p: &Path| {
                let bytes = std::fs::read(p).unwrap();
                std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
            }),
        ),
    ];
    for (want, edit) in &cases {
        std::fs::write(&ckpt, &good).unwrap();
        edit(&ckpt);
        let e = resume().expect_err(want).to_string();
        assert!(
            e.contains("teacher.ckpt.safetensors") && e.contains(want),
            "want `{want}` in: {e}"
        );
    }

    // The unedited checkpoint resumes; stop one update into the student and edit its counters:
    // the fake-score step must match the updates taken with DMD on (none yet, in the warmup).
    std::fs::write(&ckpt, &good).unwrap();
    let second = rcm::run(&RcmOptions {
        stop_after: Some(nt - 3 + 1),
        resume: true,
        ..options(&out, &[Method::Rcm])
    })
    .unwrap();
    assert_eq!(second.phases[0].steps_run, nt - 3);
    let student = out.join("rcm.ckpt.safetensors");
    let c = flashjvp::io::load_safetensors(&student).unwrap()["counters"].to_f64_vec();
    assert_eq!(c[..5], [1.0, 1.0, 1.0, 0.0, 0.0]);
    edit_tensor(&student, "counters", |_| {
        counters(&[1.0, 1.0, 1.0, 5.0, 5.0, c[5]])
    });
    let e = resume().unwrap_err().to_string();
    assert!(
        e.contains("rcm.ckpt.safetensors") && e.contains("fake-score step 5"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `stop_after: Some(0)` takes no step at all (it used to take one), and a budget that ends with
/// the teacher leaves the student untouched.
#[test]
fn a_spent_budget_takes_no_step() {
    let out = temp_dir("budget");
    let nt = RcmConfig::preset(Preset::Toy).teacher.steps;
    let r = rcm::run(&RcmOptions {
        stop_after: Some(0),
        ..options(&out, &[Method::Rcm])
    })
    .unwrap();
    assert!(!r.complete && r.phases.is_empty());
    assert!(!out.join("teacher.ckpt.safetensors").exists());
    let r = rcm::run(&RcmOptions {
        stop_after: Some(nt),
        ..options(&out, &[Method::Rcm])
    })
    .unwrap();
    assert!(!r.complete);
    assert_eq!(r.phases.len(), 1);
    assert_eq!(r.phases[0].steps_run, nt);
    assert!(out.join("teacher.safetensors").exists());
    assert!(
        !out.join("rcm.ckpt.safetensors").exists(),
        "a student step was taken"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// A finished teacher is reused only under the settings that trained it, dtype included; and
/// its old fingerprint goes before the new model is written, so a failure in between leaves no
/// fingerprint naming the wrong model.
#[test]
fn the_finished_teacher_and_its_fingerprint() {
    let out = temp_dir("fingerprint");
    rcm::run(&toy_teacher(&out, 2, 7)).expect("an f32 teacher");
    let mut f64_opts = RcmOptions {
        stop_after: Some(0),
        ..toy_teacher(&out, 2, 7)
    };
    f64_opts.config.dtype = flashjvp::DType::F64;
    let r = rcm::run(&f64_opts).unwrap();
    assert!(
        r.phases.is_empty(),
        "the f32 teacher was reused for f64: {:?}",
        r.phases
    );
    let r = rcm::run(&RcmOptions {
        stop_after: Some(0),
        ..toy_teacher(&out, 2, 7)
    })
    .unwrap();
    assert!(r.phases[0].reused);

    // The model cannot be written (its path is a folder): the old fingerprint is gone anyway.
    let out2 = temp_dir("fingerprint-order");
    std::fs::create_dir_all(out2.join("teacher.safetensors")).unwrap();
    std::fs::write(out2.join("teacher.json"), r#"{"fingerprint": "old"}"#).unwrap();
    assert!(rcm::run(&toy_teacher(&out2, 2, 7)).is_err());
    assert!(!out2.join("teacher.json").exists());
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&out2);
}

/// The samplers with the mixture's exact denoiser: the ODE solver reproduces the data, while
/// sampling the denoiser in few steps collapses (4 steps: every sample at its centre) or blurs
/// (1 step: the average of a class's positions). That gap is what distillation closes.
#[test]
fn samplers_with_the_exact_denoiser() {
    use flashjvp::data::glyph;
    use flashjvp::rcm::sample::{evaluate_with, Sampler};
    let exact = |x: &[f64], t: &[f64], c: &[usize]| -> flashjvp::Result<Vec<f64>> {
        Ok(x.chunks(glyph::PIXELS)
            .zip(t)
            .zip(c)
            .map(|((xi, &ti), &ci)| glyph::posterior_mean(xi, ti, Some(ci)))
            .collect::<flashjvp::Result<Vec<_>>>()?
            .concat())
    };
    let cfg = RcmConfig::preset(Preset::Default);
    let heun = Sampler::Heun {
        steps: 32,
        sigma_min: cfg.eval.sigma_min,
        sigma_max: cfg.eval.sigma_max,
    };
    let m = evaluate_with(&exact, &heun, 512, 1).unwrap().metrics;
    assert!(m.precision >= 0.99 && m.coverage == 1.0, "{m:?}");
    assert!((m.spread - 1.0).abs() < 0.05, "{m:?}");
    assert_eq!(m.class_accuracy, 1.0, "{m:?}");
    let four = Sampler::FewStep {
        times: cfg.eval.times(4).unwrap(),
    };
    let m = evaluate_with(&exact, &four, 512, 2).unwrap().metrics;
    assert!(m.precision >= 0.99 && m.spread < 0.5, "{m:?}");
    let one = Sampler::FewStep {
        times: cfg.eval.times(1).unwrap(),
    };
    let m = evaluate_with(&exact, &one, 512, 3).unwrap().metrics;
    assert!(m.precision == 0.0 && m.spread > 3.0, "{m:?}");
}
