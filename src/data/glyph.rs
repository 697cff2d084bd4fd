//! The glyph mixture of DESIGN.md section 6: an image distribution known exactly, so that a
//! generator's quality (precision, spread) and diversity (coverage) are measured, not guessed.
//!
//! 16×16 single-channel images. Ten classes (digits 0–9) drawn from an embedded 5×7 bitmap font,
//! scaled ×2 to 10×14 and placed at 4 positions (x offset 1 or 5, y offset 0 or 2): 40 mode
//! centres with stroke +0.8 and background −0.8. A sample is a centre (class and position
//! uniform) plus isotropic Gaussian noise of σ = 0.1.
//!
//! Metrics assign every sample to its nearest centre in L2 and use the normalised distance
//! d = ‖x − c‖/(σ√256): for a real sample d² is a χ²₂₅₆/256 variable, so d ≈ 1 ± 0.044.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// Image side.
pub const SIZE: usize = 16;
/// Pixels per image.
pub const PIXELS: usize = SIZE * SIZE;
/// Classes: the digits 0–9.
pub const NUM_CLASSES: usize = 10;
/// Placements per class: (x, y) offsets (1, 0), (5, 0), (1, 2), (5, 2), in that order.
pub const NUM_POSITIONS: usize = 4;
/// Mixture modes, one per (class, position): 40, indexed by [`mode_index`].
pub const NUM_MODES: usize = NUM_CLASSES * NUM_POSITIONS;
/// Centre pixel value where the scaled glyph has ink.
pub const STROKE: f64 = 0.8;
/// Centre pixel value everywhere else.
pub const BACKGROUND: f64 = -0.8;
/// The noise around every centre.
pub const SIGMA: f64 = 0.1;
/// A sample is precise when its normalised distance to the nearest centre is at most this.
pub const PRECISION_RADIUS: f64 = 1.25;

/// 5×7 bitmaps of the digits, one row per byte, the five low bits left (bit 4) to right (bit 0).
const FONT: [[u8; 7]; NUM_CLASSES] = [
    [
        0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110,
    ], // 0
    [
        0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
    ], // 1
    [
        0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111,
    ], // 2
    [
        0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110,
    ], // 3
    [
        0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010,
    ], // 4
    [
        0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110,
    ], // 5
    [
        0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110,
    ], // 6
    [
        0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000,
    ], // 7
    [
        0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110,
    ], // 8
    [
        0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100,
    ], // 9
];
const FONT_W: usize = 5;
const FONT_H: usize = 7;
const SCALE: usize = 2;
const X_OFFSETS: [usize; 2] = [1, 5];
const Y_OFFSETS: [usize; 2] = [0, 2];

const OP: &str = "glyph";

/// Whether the font has ink at (column, row) of `digit`'s 5×7 bitmap: digit < 10, column < 5,
/// row < 7, else an error naming the value out of range.
pub fn font_pixel(digit: usize, col: usize, row: usize) -> Result<bool> {
    for (name, v, n) in [
        ("digit", digit, NUM_CLASSES),
        ("column", col, FONT_W),
        ("row", row, FONT_H),
    ] {
        if v >= n {
            return Err(Error::invalid(
                OP,
                format!("font {name} {v} is out of range (0..{n})"),
            ));
        }
    }
    Ok(ink(digit, col, row))
}

/// `font_pixel` for indices known to be in range.
fn ink(digit: usize, col: usize, row: usize) -> bool {
    FONT[digit][row] >> (FONT_W - 1 - col) & 1 == 1
}

fn check_class(what: &str, class: usize) -> Result<()> {
    if class >= NUM_CLASSES {
        return Err(Error::invalid(
            OP,
            format!("{what} {class} is out of range: the classes are 0..{NUM_CLASSES}"),
        ));
    }
    Ok(())
}

/// The mode index of a (class, position) pair, class < 10 and position < 4; `mode /
/// NUM_POSITIONS` is the class.
pub fn mode_index(class: usize, position: usize) -> Result<usize> {
    check_class("class", class)?;
    if position >= NUM_POSITIONS {
        return Err(Error::invalid(
            OP,
            format!("position {position} is out of range (0..{NUM_POSITIONS})"),
        ));
    }
    Ok(class * NUM_POSITIONS + position)
}

/// The class of a mode index (< 40).
pub fn mode_class(mode: usize) -> Result<usize> {
    if mode >= NUM_MODES {
        return Err(Error::invalid(
            OP,
            format!("mode {mode} is out of range (0..{NUM_MODES})"),
        ));
    }
    Ok(class_of(mode))
}

/// `mode_class` for a mode known to be in range.
fn class_of(mode: usize) -> usize {
    mode / NUM_POSITIONS
}

/// The centre image of `class` (< 10) at `position` (< 4), row-major, PIXELS values.
pub fn centre(class: usize, position: usize) -> Result<Vec<f64>> {
    let mode = mode_index(class, position)?;
    Ok(centre_of(mode))
}

/// The centre of a mode known to be in range.
fn centre_of(mode: usize) -> Vec<f64> {
    let (class, position) = (class_of(mode), mode % NUM_POSITIONS);
    let (x0, y0) = (X_OFFSETS[position % 2], Y_OFFSETS[position / 2]);
    let mut img = vec![BACKGROUND; PIXELS];
    for row in 0..FONT_H * SCALE {
        for col in 0..FONT_W * SCALE {
            if ink(class, col / SCALE, row / SCALE) {
                img[(y0 + row) * SIZE + x0 + col] = STROKE;
            }
        }
    }
    img
}

/// All 40 centres, indexed by `mode_index`.
pub fn centres() -> Vec<Vec<f64>> {
    (0..NUM_MODES).map(centre_of).collect()
}

/// A batch of samples: `images` holds `classes.len()` images of PIXELS values each.
#[derive(Clone, Debug)]
pub struct Batch {
    /// The images one after another, each row-major [SIZE, SIZE].
    pub images: Vec<f64>,
    /// The class (digit) of each image.
    pub classes: Vec<usize>,
    /// The mode of each image ([`mode_index`] of its class and position).
    pub modes: Vec<usize>,
}

/// The number of values of `n` images, or an error when it overflows.
fn image_values(n: usize) -> Result<usize> {
    n.checked_mul(PIXELS).ok_or_else(|| {
        Error::invalid(
            OP,
            format!("{n} images of {PIXELS} pixels overflow the address space"),
        )
    })
}

/// `n` real samples: class and position uniform, x = c + σε.
pub fn sample(n: usize, rng: &mut impl Rng) -> Result<Batch> {
    sample_with_sigma(n, SIGMA, rng)
}

/// Like `sample`, with another noise level (finite, ≥ 0; the tests use it to make precision
/// fail).
pub fn sample_with_sigma(n: usize, sigma: f64, rng: &mut impl Rng) -> Result<Batch> {
    if !(sigma.is_finite() && sigma >= 0.0) {
        return Err(Error::invalid(
            OP,
            format!("sigma must be finite and >= 0, got {sigma}"),
        ));
    }
    let centres = centres();
    let mut images = Vec::with_capacity(image_values(n)?);
    let mut classes = Vec::with_capacity(n);
    let mut modes = Vec::with_capacity(n);
    for _ in 0..n {
        let mode = rng.random_range(0..NUM_MODES);
        images.extend(centres[mode].iter().map(|&c| {
            let e: f64 = StandardNormal.sample(rng);
            c + sigma * e
        }));
        classes.push(class_of(mode));
        modes.push(mode);
    }
    Ok(Batch {
        images,
        classes,
        modes,
    })
}

/// One real sample per entry of `classes` (each < 10; position uniform), [classes.len(), PIXELS]
/// row-major: the data of a class-conditional batch.
pub fn sample_classes(classes: &[usize], rng: &mut impl Rng) -> Result<Vec<f64>> {
    for (i, &class) in classes.iter().enumerate() {
        check_class(&format!("classes[{i}] ="), class)?;
    }
    let mut images = Vec::with_capacity(image_values(classes.len())?);
    for &class in classes {
        let c = centre_of(class * NUM_POSITIONS + rng.random_range(0..NUM_POSITIONS));
        images.extend(c.iter().map(|&v| {
            let e: f64 = StandardNormal.sample(rng);
            v + SIGMA * e
        }));
    }
    Ok(images)
}

/// The metrics of DESIGN.md section 6.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// Share of samples with d ≤ 1.25.
    pub precision: f64,
    /// Share of the 40 modes holding at least a quarter of their expected count n/40.
    pub coverage: f64,
    /// Median d of the precise samples (1 ideal, below collapsed, above blurry). With no precise
    /// sample at all, the median d of every sample, so that it stays finite and flags the blur.
    pub spread: f64,
    /// Share of samples whose nearest centre has the requested class (1 when none were requested).
    pub class_accuracy: f64,
}

/// Nearest centre (mode index) and the normalised distance d of one image (PIXELS values) among
/// `centres` (at least one, each of PIXELS values).
pub fn nearest(image: &[f64], centres: &[Vec<f64>]) -> Result<(usize, f64)> {
    if image.len() != PIXELS {
        return Err(Error::invalid(
            OP,
            format!(
                "the image holds {} values, a {SIZE}×{SIZE} image has {PIXELS}",
                image.len()
            ),
        ));
    }
    if centres.is_empty() {
        return Err(Error::invalid(OP, "no centres to search"));
    }
    if let Some((m, c)) = centres.iter().enumerate().find(|(_, c)| c.len() != PIXELS) {
        return Err(Error::invalid(
            OP,
            format!("centre {m} holds {} values, expected {PIXELS}", c.len()),
        ));
    }
    Ok(nearest_unchecked(image, centres))
}

/// `nearest` for lengths known to agree.
fn nearest_unchecked(image: &[f64], centres: &[Vec<f64>]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (m, c) in centres.iter().enumerate() {
        let d2: f64 = image.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum();
        if d2 < best.1 {
            best = (m, d2);
        }
    }
    (best.0, best.1.sqrt() / (SIGMA * (PIXELS as f64).sqrt()))
}

/// The metrics of `images` (n·PIXELS values, n ≥ 1). `requested` holds the class each sample was
/// asked for (n classes, each < 10), or is `None` for unconditional samples. Non-finite images
/// count as imprecise, unassigned samples of infinite distance.
pub fn evaluate(images: &[f64], requested: Option<&[usize]>) -> Result<Metrics> {
    if images.is_empty() || images.len() % PIXELS != 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "evaluate needs one or more whole {SIZE}×{SIZE} images ({PIXELS} values each), \
                 got {} values",
                images.len()
            ),
        ));
    }
    let n = images.len() / PIXELS;
    if let Some(r) = requested {
        if r.len() != n {
            return Err(Error::invalid(
                OP,
                format!("{} requested classes for {n} images", r.len()),
            ));
        }
        for (i, &k) in r.iter().enumerate() {
            check_class(&format!("requested[{i}] ="), k)?;
        }
    }
    let centres = centres();
    let mut counts = [0usize; NUM_MODES];
    let mut precise_d = Vec::new();
    let mut all_d = Vec::with_capacity(n);
    let mut correct = 0usize;
    for (i, img) in images.chunks_exact(PIXELS).enumerate() {
        if img.iter().any(|v| !v.is_finite()) {
            all_d.push(f64::INFINITY);
            continue;
        }
        let (mode, d) = nearest_unchecked(img, &centres);
        counts[mode] += 1;
        all_d.push(d);
        if d <= PRECISION_RADIUS {
            precise_d.push(d);
        }
        if requested.is_some_and(|r| r[i] == class_of(mode)) {
            correct += 1;
        }
    }
    let expected = n as f64 / NUM_MODES as f64;
    let covered = counts
        .iter()
        .filter(|&&c| c as f64 >= expected / 4.0)
        .count();
    let spread = if precise_d.is_empty() {
        median(&mut all_d)
    } else {
        median(&mut precise_d)
    };
    Ok(Metrics {
        precision: precise_d.len() as f64 / n as f64,
        coverage: covered as f64 / NUM_MODES as f64,
        spread,
        class_accuracy: if requested.is_some() {
            correct as f64 / n as f64
        } else {
            1.0
        },
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The exact posterior mean E[x₀ | x_t] of the mixture under x_t = cos t·x₀ + sin t·z, given the
/// class (`Some`) or not: the ideal denoiser, to measure a trained one against and to check
/// samplers with. Every mode is Gaussian N(c, σ²I), so x_t given a mode is N(cos t·c, s²I) with
/// s² = cos²t·σ² + sin²t, and E[x₀ | x_t, mode] = c + (σ² cos t/s²)(x_t − cos t·c).
/// x holds PIXELS values, t is finite and a class is below 10, else an error naming the value.
pub fn posterior_mean(x: &[f64], t: f64, class: Option<usize>) -> Result<Vec<f64>> {
    if x.len() != PIXELS {
        return Err(Error::invalid(
            OP,
            format!(
                "posterior_mean: x holds {} values, a {SIZE}×{SIZE} image has {PIXELS}",
                x.len()
            ),
        ));
    }
    if !t.is_finite() {
        return Err(Error::invalid(
            OP,
            format!("posterior_mean: t must be finite, got {t}"),
        ));
    }
    if let Some(k) = class {
        check_class("posterior_mean: class", k)?;
    }
    let (c, s) = (t.cos(), t.sin());
    let var = c * c * SIGMA * SIGMA + s * s;
    let modes: Vec<usize> = match class {
        Some(k) => (0..NUM_POSITIONS).map(|p| k * NUM_POSITIONS + p).collect(),
        None => (0..NUM_MODES).collect(),
    };
    let centres: Vec<Vec<f64>> = modes.iter().map(|&m| centre_of(m)).collect();
    let logw: Vec<f64> = centres
        .iter()
        .map(|cm| {
            -x.iter()
                .zip(cm)
                .map(|(a, b)| (a - c * b) * (a - c * b))
                .sum::<f64>()
                / (2.0 * var)
        })
        .collect();
    let max = logw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logw.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = w.iter().sum();
    let gain = SIGMA * SIGMA * c / var;
    let mut out = vec![0.0; PIXELS];
    for (cm, wm) in centres.iter().zip(&w) {
        let p = wm / total;
        for k in 0..PIXELS {
            out[k] += p * (cm[k] + gain * (x[k] - c * cm[k]));
        }
    }
    Ok(out)
}
