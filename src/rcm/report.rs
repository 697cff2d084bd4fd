//! The run's outputs: results.json, results.md (also printed) and samples.png.

use std::path::Path;

use crate::data::glyph::{PIXELS, SIZE};
use crate::error::{Error, Result};

use super::checkpoint::write_atomic;
use super::{RcmOptions, Report};

/// Samples per panel of samples.png (8×8).
pub const PANEL_SAMPLES: usize = 64;
const GRID: usize = 8;
const UPSCALE: usize = 2;
const GAP: usize = 2;
const PANEL_GAP: usize = 12;

/// The first samples of one model at one step count.
pub struct Panel {
    /// "teacher" or the method's name: the row of samples.png the panel goes to.
    pub model: String,
    /// The step count of the samples.
    pub steps: usize,
    /// Up to [`PANEL_SAMPLES`] images [n, 16, 16] row-major (−1..1 drawn black to white).
    pub images: Vec<f64>,
}

/// The contents of results.json: rows, device, seconds, phases, seed and the config (as its
/// `Debug` text).
pub fn json(report: &Report, opts: &RcmOptions) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = report
        .rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "model": r.model,
                "steps": r.steps,
                "evaluations": r.evaluations,
                "precision": r.metrics.precision,
                "coverage": r.metrics.coverage,
                "spread": r.metrics.spread,
                "class_accuracy": r.metrics.class_accuracy,
                "ms_per_sample": r.ms_per_sample,
            })
        })
        .collect();
    let phases: Vec<serde_json::Value> = report
        .phases
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name, "steps": p.steps, "steps_run": p.steps_run,
                "seconds": p.seconds, "reused": p.reused,
            })
        })
        .collect();
    serde_json::json!({
        "rows": rows,
        "device": report.device,
        "seconds": report.seconds,
        "phases": phases,
        "seed": opts.seed,
        "config": format!("{:?}", opts.config),
    })
}

/// The contents of results.md: the rows and the phases as tables, with notes on reading them.
pub fn markdown(report: &Report, opts: &RcmOptions) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# rCM on the glyph mixture\n\nDevice {}, {:.1} s in all (seed {}).\n\n",
        report.device, report.seconds, opts.seed
    ));
    s.push_str(
        "| model | steps | NFE | precision | coverage | spread | class acc. | ms/sample |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &report.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            r.model,
            r.steps,
            r.evaluations,
            r.metrics.precision,
            r.metrics.coverage,
            r.metrics.spread,
            r.metrics.class_accuracy,
            r.ms_per_sample
        ));
    }
    s.push_str(
        "\nNFE: network evaluations per sample (guided teacher evaluations run the conditional and \
         unconditional branches as one doubled batch). The teacher's last row is its Heun ODE \
         solver; every other row is the few-step sampler.\n\n| phase | steps | run now | seconds | reused |\n|---|---:|---:|---:|---|\n",
    );
    for p in &report.phases {
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} |\n",
            p.name, p.steps, p.steps_run, p.seconds, p.reused
        ));
    }
    s.push_str(
        "\nsamples.png: one row of 8×8 panels per model (teacher first), one panel per step count \
         in table order; requested classes run 0–9 along each panel row.\n",
    );
    s
}

/// Renders panels into a grayscale image: one row per model (in order of first appearance), one
/// column per panel of that model; pixel values −1..1 map to 0..255, gaps mid-gray.
pub fn render(panels: &[Panel]) -> (usize, usize, Vec<u8>) {
    let mut models: Vec<&str> = Vec::new();
    for p in panels {
        if !models.contains(&p.model.as_str()) {
            models.push(&p.model);
        }
    }
    let cell = SIZE * UPSCALE;
    let side = GRID * cell + (GRID - 1) * GAP;
    let cols = models
        .iter()
        .map(|m| panels.iter().filter(|p| p.model == *m).count())
        .max()
        .unwrap_or(1);
    let width = cols * side + (cols + 1) * PANEL_GAP;
    let height = models.len() * side + (models.len() + 1) * PANEL_GAP;
    let mut img = vec![128u8; width * height];
    for (row, m) in models.iter().enumerate() {
        for (col, p) in panels.iter().filter(|p| p.model == *m).enumerate() {
            let (ox, oy) = (
                PANEL_GAP + col * (side + PANEL_GAP),
                PANEL_GAP + row * (side + PANEL_GAP),
            );
            for (k, sample) in p
                .images
                .chunks_exact(PIXELS)
                .enumerate()
                .take(PANEL_SAMPLES)
            {
                let (sx, sy) = (
                    ox + (k % GRID) * (cell + GAP),
                    oy + (k / GRID) * (cell + GAP),
                );
                for y in 0..cell {
                    for x in 0..cell {
                        let v = sample[(y / UPSCALE) * SIZE + x / UPSCALE];
                        let g = if v.is_finite() {
                            ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
                        } else {
                            0
                        };
                        img[(sy + y) * width + sx + x] = g;
                    }
                }
            }
        }
    }
    (width, height, img)
}

/// An 8-bit grayscale PNG of `gray` (`width`·`height` bytes, row-major); [`Error::Format`] when
/// the encoder fails.
pub fn png_bytes(width: usize, height: usize, gray: &[u8]) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| Error::Format {
        path: "samples.png".into(),
        message: format!("cannot encode: {e}"),
    };
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, width as u32, height as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(gray).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(bytes)
}

/// Writes results.json, results.md and samples.png, each atomically.
pub fn write_all(out: &Path, report: &Report, panels: &[Panel], opts: &RcmOptions) -> Result<()> {
    let j = serde_json::to_string_pretty(&json(report, opts)).map_err(|e| Error::Io {
        path: "results.json".into(),
        message: e.to_string(),
    })?;
    write_atomic(&out.join("results.json"), j.as_bytes())?;
    let md = markdown(report, opts);
    write_atomic(&out.join("results.md"), md.as_bytes())?;
    let (w, h, gray) = render(panels);
    write_atomic(&out.join("samples.png"), &png_bytes(w, h, &gray)?)
}
