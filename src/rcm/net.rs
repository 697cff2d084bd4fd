//! The DiT seen from the pipeline: images and times in f64 in, the velocity F in f64 out. The
//! network computes in its own dtype (f32 on the CPU); all wrapper and loss math stays in f64.

use crate::data::glyph::{NUM_CLASSES, PIXELS, SIZE};
use crate::dit::{Dit, DitCache};
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

use super::trigflow;

/// The class index that means "no class" (classifier-free guidance's unconditional branch).
pub const NULL_CLASS: usize = NUM_CLASSES;

pub fn dtype(net: &Dit) -> DType {
    net.params().first().map_or(DType::F32, |p| p.dtype())
}

/// Images as the network's input [B, 1, 16, 16].
pub fn image_tensor(x: &[f64], dtype: DType) -> Result<Tensor> {
    let b = x.len() / PIXELS;
    Tensor::from_f64_vec(x.to_vec(), &[b, 1, SIZE, SIZE], dtype)
}

pub fn time_tensor(t: &[f64], dtype: DType) -> Result<Tensor> {
    Tensor::from_f64_vec(t.to_vec(), &[t.len()], dtype)
}

/// F(x, t, class).
pub fn velocity(net: &Dit, x: &[f64], t: &[f64], class: &[usize]) -> Result<Vec<f64>> {
    let dt = dtype(net);
    let y = net.forward(&image_tensor(x, dt)?, &time_tensor(t, dt)?, class)?;
    Ok(y.to_f64_vec())
}

/// The guided velocity F_u + w·(F_c − F_u), both branches in one forward of a doubled batch;
/// w = 1 is the conditional model alone (one forward of the batch).
pub fn velocity_guided(
    net: &Dit,
    x: &[f64],
    t: &[f64],
    class: &[usize],
    w: f64,
) -> Result<Vec<f64>> {
    if w == 1.0 {
        return velocity(net, x, t, class);
    }
    let mut x2 = x.to_vec();
    x2.extend_from_slice(x);
    let mut t2 = t.to_vec();
    t2.extend_from_slice(t);
    let mut c2 = class.to_vec();
    c2.extend(std::iter::repeat_n(NULL_CLASS, class.len()));
    let f = velocity(net, &x2, &t2, &c2)?;
    let (cond, uncond) = f.split_at(x.len());
    Ok(trigflow::guide(cond, uncond, w))
}

/// The denoiser f = cos t·x − sin t·F (guided with w).
pub fn denoised(net: &Dit, x: &[f64], t: &[f64], class: &[usize], w: f64) -> Result<Vec<f64>> {
    let f = velocity_guided(net, x, t, class, w)?;
    Ok(trigflow::denoise(x, &f, t, PIXELS))
}

/// F with the cache the backward needs.
pub fn velocity_train(
    net: &Dit,
    x: &[f64],
    t: &[f64],
    class: &[usize],
) -> Result<(Vec<f64>, DitCache)> {
    let dt = dtype(net);
    let (y, cache) = net.forward_train(&image_tensor(x, dt)?, &time_tensor(t, dt)?, class)?;
    Ok((y.to_f64_vec(), cache))
}

/// The dual forward with tangents ẋ on the image and ṫ on the time: F (the primal), its tangent
/// and the cache for the backward through the primal.
pub fn velocity_dual(
    net: &Dit,
    x: &[f64],
    x_dot: &[f64],
    t: &[f64],
    t_dot: &[f64],
    class: &[usize],
) -> Result<(Vec<f64>, Vec<f64>, DitCache)> {
    let dt = dtype(net);
    let xd = Dual::new(image_tensor(x, dt)?, image_tensor(x_dot, dt)?)?;
    let td = Dual::new(time_tensor(t, dt)?, time_tensor(t_dot, dt)?)?;
    let (y, cache) = net.forward_dual(&xd, &td, class)?;
    let tangent = match &y.tangent {
        Some(tt) => tt.to_f64_vec(),
        None => vec![0.0; y.primal.numel()],
    };
    Ok((y.primal.to_f64_vec(), tangent, cache))
}

/// Parameter gradients for an output cotangent given in f64.
pub fn backward(net: &Dit, cache: &DitCache, gout: &[f64]) -> Result<Vec<Tensor>> {
    net.backward(cache, &image_tensor(gout, dtype(net))?)
}

/// Adds `b` into `a` elementwise (gradients of two losses on the same parameters).
pub fn add_grads(a: &mut [Tensor], b: &[Tensor]) -> Result<()> {
    for (x, y) in a.iter_mut().zip(b) {
        let sum: Vec<f64> = x
            .to_f64_vec()
            .iter()
            .zip(y.to_f64_vec())
            .map(|(p, q)| p + q)
            .collect();
        *x = Tensor::from_f64_vec(sum, x.shape(), x.dtype())?;
    }
    Ok(())
}

/// A network with the given parameters (canonical order), checked against the layout.
pub fn dit_with_params(
    config: crate::dit::DitConfig,
    params: Vec<Tensor>,
    rng: &mut impl rand::Rng,
) -> Result<Dit> {
    let dt = params.first().map_or(DType::F32, |p| p.dtype());
    let mut net = Dit::new(config, dt, rng)?;
    if net.params().len() != params.len() {
        return Err(Error::invalid(
            "rcm",
            format!(
                "the DiT has {} parameter tensors but {} were given",
                net.params().len(),
                params.len()
            ),
        ));
    }
    for (i, (p, q)) in net.params_mut().iter_mut().zip(params).enumerate() {
        if p.shape() != q.shape() {
            return Err(Error::invalid(
                "rcm",
                format!(
                    "parameter {i} has shape {:?}, expected {:?}",
                    q.shape(),
                    p.shape()
                ),
            ));
        }
        *p = q;
    }
    Ok(net)
}
