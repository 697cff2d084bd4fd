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
            .flat_map(|((xi, &ti), &ci)| glyph::posterior_mean(xi, ti, Some(ci)))
            .collect())
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
        times: cfg.eval.times(4),
    };
    let m = evaluate_with(&exact, &four, 512, 2).unwrap().metrics;
    assert!(m.precision >= 0.99 && m.spread < 0.5, "{m:?}");
    let one = Sampler::FewStep {
        times: cfg.eval.times(1),
    };
    let m = evaluate_with(&exact, &one, 512, 3).unwrap().metrics;
    assert!(m.precision == 0.0 && m.spread > 3.0, "{m:?}");
}
