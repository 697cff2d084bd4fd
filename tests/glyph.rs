//! The glyph mixture and its metrics: real samples score as real data should, and each metric
//! fails when the samples have the defect it is there to catch.

mod common;

use flashjvp::data::glyph::{self, Metrics, NUM_CLASSES, NUM_MODES, PIXELS};

const N: usize = 2048;

fn real(seed: u64) -> glyph::Batch {
    glyph::sample(N, &mut common::rng(seed)).unwrap()
}

#[test]
fn font_is_ten_distinct_digits_with_ink_in_every_row() {
    let centres = glyph::centres();
    assert_eq!(centres.len(), NUM_MODES);
    for d in 0..NUM_CLASSES {
        for row in 0..7 {
            assert!(
                (0..5).any(|c| glyph::font_pixel(d, c, row).unwrap()),
                "digit {d} has an empty row {row}"
            );
        }
    }
    // Every pair of centres differs in at least one font pixel (4 image pixels of 1.6 each), so
    // nearest-centre assignment cannot confuse them at σ = 0.1.
    for a in 0..NUM_MODES {
        for b in a + 1..NUM_MODES {
            let d2: f64 = centres[a]
                .iter()
                .zip(&centres[b])
                .map(|(x, y)| (x - y) * (x - y))
                .sum();
            assert!(d2 >= 4.0 * 1.6 * 1.6 - 1e-9, "modes {a} and {b}: {d2}");
        }
    }
    // Values are exactly stroke or background; the 10×14 glyph fits at every offset.
    for c in &centres {
        assert!(c
            .iter()
            .all(|&v| v == glyph::STROKE || v == glyph::BACKGROUND));
    }
}

#[test]
fn centre_matches_the_scaled_font_at_its_offset() {
    // Digit 1, position 3 = x offset 5, y offset 2. Its top font row is 0b00100: ink in font
    // column 2 → image columns 5+4, 5+5 on image rows 2 and 3.
    let c = glyph::centre(1, 3).unwrap();
    let at = |x: usize, y: usize| c[y * 16 + x];
    assert_eq!(at(9, 2), glyph::STROKE);
    assert_eq!(at(10, 3), glyph::STROKE);
    assert_eq!(at(8, 2), glyph::BACKGROUND);
    assert_eq!(at(9, 1), glyph::BACKGROUND);
    assert_eq!(
        glyph::mode_class(glyph::mode_index(7, 2).unwrap()).unwrap(),
        7
    );
}

#[test]
fn real_samples_score_as_real_data() {
    let b = real(1);
    let m = glyph::evaluate(&b.images, Some(&b.classes)).unwrap();
    assert!(m.precision >= 0.99, "{m:?}");
    assert_eq!(m.coverage, 1.0, "{m:?}");
    assert!((m.spread - 1.0).abs() <= 0.05, "{m:?}");
    assert!(m.class_accuracy >= 0.99, "{m:?}");
}

#[test]
fn sampling_is_uniform_over_modes_and_seeded() {
    let a = real(2);
    let b = real(2);
    assert_eq!(a.images, b.images, "same seed, same samples");
    let mut counts = [0usize; NUM_MODES];
    for &m in &a.modes {
        counts[m] += 1;
    }
    // Expected 51.2 per mode; a binomial sd of about 7.
    assert!(counts.iter().all(|&c| (20..=90).contains(&c)), "{counts:?}");
    // Each sample sits at the centre it was drawn from.
    let centres = glyph::centres();
    for (img, &m) in a.images.chunks_exact(PIXELS).zip(&a.modes).take(50) {
        assert_eq!(glyph::nearest(img, &centres).unwrap().0, m);
    }
}

#[test]
fn collapse_to_one_mode_fails_coverage() {
    let mut rng = common::rng(3);
    let c = glyph::centre(4, 1).unwrap();
    let images: Vec<f64> = (0..N)
        .flat_map(|_| {
            let noise = common::randn(&[PIXELS], &mut rng).to_f64_vec();
            c.iter()
                .zip(noise)
                .map(|(a, e)| a + glyph::SIGMA * e)
                .collect::<Vec<_>>()
        })
        .collect();
    let m = glyph::evaluate(&images, None).unwrap();
    assert_eq!(m.coverage, 1.0 / 40.0, "{m:?}");
    assert!(m.precision >= 0.99, "collapse is still precise: {m:?}");
}

#[test]
fn blurry_samples_fail_precision_and_spread() {
    let b = glyph::sample_with_sigma(N, 0.3, &mut common::rng(4)).unwrap();
    let m = glyph::evaluate(&b.images, Some(&b.classes)).unwrap();
    assert!(m.precision < 0.05, "{m:?}");
    assert!(m.spread > 1.25, "{m:?}");
}

#[test]
fn slightly_blurry_samples_raise_spread() {
    let b = glyph::sample_with_sigma(N, 0.115, &mut common::rng(5)).unwrap();
    let m = glyph::evaluate(&b.images, None).unwrap();
    assert!(m.spread > 1.1, "{m:?}");
    // Collapsed samples (σ 0.05) have a small spread.
    let b = glyph::sample_with_sigma(N, 0.05, &mut common::rng(6)).unwrap();
    let m: Metrics = glyph::evaluate(&b.images, None).unwrap();
    assert!((m.spread - 0.5).abs() < 0.05, "{m:?}");
}

#[test]
fn wrong_classes_fail_class_accuracy() {
    let b = real(7);
    let wrong: Vec<usize> = b.classes.iter().map(|c| (c + 1) % NUM_CLASSES).collect();
    let m = glyph::evaluate(&b.images, Some(&wrong)).unwrap();
    assert_eq!(m.class_accuracy, 0.0, "{m:?}");
    // Half wrong → accuracy near one half.
    let half: Vec<usize> = b
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                *c
            } else {
                (c + 3) % NUM_CLASSES
            }
        })
        .collect();
    let m = glyph::evaluate(&b.images, Some(&half)).unwrap();
    assert!((m.class_accuracy - 0.5).abs() < 0.01, "{m:?}");
}

#[test]
fn non_finite_samples_count_as_imprecise() {
    let mut b = real(8);
    for v in &mut b.images[..PIXELS * N / 2] {
        *v = f64::NAN;
    }
    let m = glyph::evaluate(&b.images, Some(&b.classes)).unwrap();
    assert!((m.precision - 0.5).abs() < 0.01, "{m:?}");
    assert!(m.spread.is_finite(), "{m:?}");
}

#[test]
fn class_conditional_sampling_draws_the_requested_class() {
    let classes: Vec<usize> = (0..200).map(|i| i % NUM_CLASSES).collect();
    let images = glyph::sample_classes(&classes, &mut common::rng(9)).unwrap();
    let m = glyph::evaluate(&images, Some(&classes)).unwrap();
    assert_eq!(m.class_accuracy, 1.0, "{m:?}");
    assert!(m.precision >= 0.98, "{m:?}");
}

#[test]
fn posterior_mean_is_the_ideal_denoiser() {
    let b = glyph::sample(64, &mut common::rng(10)).unwrap();
    let mut rng = common::rng(11);
    // Almost no noise: the posterior mean is the noisy image itself.
    let t = 1e-4f64;
    for (img, &class) in b.images.chunks_exact(PIXELS).zip(&b.classes) {
        let z = common::randn(&[PIXELS], &mut rng).to_f64_vec();
        let x: Vec<f64> = img
            .iter()
            .zip(&z)
            .map(|(a, e)| t.cos() * a + t.sin() * e)
            .collect();
        let pm = glyph::posterior_mean(&x, t, Some(class)).unwrap();
        let err = pm
            .iter()
            .zip(img)
            .map(|(p, a)| (p - a).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-3, "{err}");
    }
    // Pure noise: the class-conditional mean is the average of the class's four centres; the
    // unconditional one the average of all forty.
    let x = common::randn(&[PIXELS], &mut rng).to_f64_vec();
    let t = std::f64::consts::FRAC_PI_2;
    let pm = glyph::posterior_mean(&x, t, Some(3)).unwrap();
    let mean3: Vec<f64> = (0..PIXELS)
        .map(|k| (0..4).map(|p| glyph::centre(3, p).unwrap()[k]).sum::<f64>() / 4.0)
        .collect();
    assert!(pm.iter().zip(&mean3).all(|(a, b)| (a - b).abs() < 1e-9));
    let pm = glyph::posterior_mean(&x, t, None).unwrap();
    let all: Vec<f64> = (0..PIXELS)
        .map(|k| glyph::centres().iter().map(|c| c[k]).sum::<f64>() / 40.0)
        .collect();
    assert!(pm.iter().zip(&all).all(|(a, b)| (a - b).abs() < 1e-9));
    // Mid noise: it beats the rescaled noisy image as an estimate of x₀ by far.
    let t = 0.5f64;
    let (mut e_pm, mut e_naive) = (0.0, 0.0);
    for (img, &class) in b.images.chunks_exact(PIXELS).zip(&b.classes) {
        let z = common::randn(&[PIXELS], &mut rng).to_f64_vec();
        let x: Vec<f64> = img
            .iter()
            .zip(&z)
            .map(|(a, e)| t.cos() * a + t.sin() * e)
            .collect();
        let pm = glyph::posterior_mean(&x, t, Some(class)).unwrap();
        for k in 0..PIXELS {
            e_pm += (pm[k] - img[k]).powi(2);
            e_naive += (x[k] / t.cos() - img[k]).powi(2);
        }
    }
    assert!(e_pm < 0.1 * e_naive, "{e_pm} vs {e_naive}");
}

#[test]
fn bad_arguments_are_errors_naming_the_value() {
    let msg = |e: flashjvp::Error| e.to_string();
    let mut rng = common::rng(12);
    let e = msg(glyph::font_pixel(0, 5, 0).unwrap_err());
    assert!(e.contains("column 5"), "{e}");
    let e = msg(glyph::font_pixel(10, 0, 0).unwrap_err());
    assert!(e.contains("digit 10"), "{e}");
    let e = msg(glyph::font_pixel(0, 0, 7).unwrap_err());
    assert!(e.contains("row 7"), "{e}");
    let e = msg(glyph::centre(10, 0).unwrap_err());
    assert!(e.contains("class 10"), "{e}");
    let e = msg(glyph::centre(0, 4).unwrap_err());
    assert!(e.contains("position 4"), "{e}");
    let e = msg(glyph::mode_index(3, 7).unwrap_err());
    assert!(e.contains("position 7"), "{e}");
    let e = msg(glyph::mode_class(NUM_MODES).unwrap_err());
    assert!(e.contains("mode 40"), "{e}");
    let e = msg(glyph::sample_classes(&[1, 10], &mut rng).unwrap_err());
    assert!(e.contains("classes[1] = 10"), "{e}");
    let e = msg(glyph::sample_with_sigma(4, f64::NAN, &mut rng).unwrap_err());
    assert!(e.contains("sigma"), "{e}");
    let e = msg(glyph::sample(usize::MAX / 2, &mut rng).unwrap_err());
    assert!(e.contains("overflow"), "{e}");

    let x = vec![0.0; PIXELS];
    let e = msg(glyph::posterior_mean(&x, 0.5, Some(10)).unwrap_err());
    assert!(e.contains("class 10"), "{e}");
    let e = msg(glyph::posterior_mean(&x[..PIXELS - 1], 0.5, None).unwrap_err());
    assert!(e.contains("255 values"), "{e}");
    let e = msg(glyph::posterior_mean(&x, f64::INFINITY, None).unwrap_err());
    assert!(e.contains("finite"), "{e}");

    // A short image is refused, not compared over its first values only.
    let centres = glyph::centres();
    let e = msg(glyph::nearest(&x[..10], &centres).unwrap_err());
    assert!(e.contains("10 values"), "{e}");
    let e = msg(glyph::nearest(&x, &[]).unwrap_err());
    assert!(e.contains("no centres"), "{e}");
    let e = msg(glyph::nearest(&x, &[x.clone(), vec![0.0; 3]]).unwrap_err());
    assert!(e.contains("centre 1 holds 3"), "{e}");

    let e = msg(glyph::evaluate(&x[..PIXELS - 1], None).unwrap_err());
    assert!(e.contains("255 values"), "{e}");
    let e = msg(glyph::evaluate(&[], None).unwrap_err());
    assert!(e.contains("got 0 values"), "{e}");
    let two = vec![0.0; 2 * PIXELS];
    let e = msg(glyph::evaluate(&two, Some(&[1])).unwrap_err());
    assert!(e.contains("1 requested classes for 2 images"), "{e}");
    let e = msg(glyph::evaluate(&two, Some(&[1, 10])).unwrap_err());
    assert!(e.contains("requested[1] = 10"), "{e}");
}
