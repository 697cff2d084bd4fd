//! The DiT seen from the pipeline: images and times in f64 in, the velocity F in f64 out. The
//! network computes in its own dtype (f32 on the CPU) or, when the run chose the GPU, in f32 on
//! the GPU (`crate::dit::gpu`); all wrapper and loss math stays in f64 on the host.
//!
//! Device dispatch lives here so the training code is the same for both devices: [`use_device`]
//! (called by `rcm::run`) picks the device for the duration of a run, and every call below goes to
//! the CPU passes or to the GPU passes. On the GPU, each network's parameters are uploaded once per
//! generation (`Dit::generation` changes whenever the optimizer takes `params_mut`), so the frozen
//! teacher is uploaded once and a student once per update, not once per call; the host keeps the
//! master weights, AdamW and the EMA (they cost O(parameters) per step, small beside the passes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::data::glyph::{NUM_CLASSES, PIXELS, SIZE};
use crate::device::Device;
use crate::dit::{Dit, DitCache};
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

use super::trigflow;

/// True while a run has chosen the GPU.
static ON_GPU: AtomicBool = AtomicBool::new(false);
/// One run at a time chooses the device (the choice is process-wide).
static RUN: Mutex<()> = Mutex::new(());

/// While alive, every call of this module runs on `device`; other runs in the process wait.
pub struct DeviceGuard {
    _run: std::sync::MutexGuard<'static, ()>,
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        ON_GPU.store(false, Ordering::SeqCst);
    }
}

/// Chooses the device of the DiT calls until the guard drops (waiting for another run's guard).
pub fn use_device(device: Device) -> DeviceGuard {
    let run = RUN.lock().unwrap_or_else(|e| e.into_inner());
    ON_GPU.store(device == Device::Cuda, Ordering::SeqCst);
    DeviceGuard { _run: run }
}

/// The device the DiT calls run on now.
pub fn device() -> Device {
    if ON_GPU.load(Ordering::SeqCst) {
        Device::Cuda
    } else {
        Device::Cpu
    }
}

/// Ok when the GPU passes take this DiT (its head dim among the attention kernels'), else why not.
pub fn gpu_takes(dit: &crate::dit::DitConfig) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        crate::dit::gpu::check_config(dit)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dit;
        Err(crate::device::cuda_not_built())
    }
}

/// What the backward needs from a forward, on the device that ran it.
pub enum NetCache {
    /// From the CPU passes.
    Cpu(Box<DitCache>),
    /// From the GPU passes (`crate::dit::gpu::GpuDitCache`).
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::dit::gpu::GpuDitCache>),
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::{Arc, Mutex, MutexGuard};

    use crate::dit::gpu::GpuDit;
    use crate::dit::Dit;
    use crate::error::Result;

    /// Device copies of the most recent parameter generations (teacher, student, fake score, EMA
    /// snapshots): a few networks at a time.
    const KEEP: usize = 6;
    static NETS: Mutex<Vec<Arc<GpuDit>>> = Mutex::new(Vec::new());
    /// GPU passes run one at a time (the evaluation calls from several threads).
    static CALLS: Mutex<()> = Mutex::new(());

    /// The device copy of `net`'s current parameters (uploaded now if it has none) and the
    /// lock that serialises GPU passes.
    pub fn net(net: &Dit) -> Result<(Arc<GpuDit>, MutexGuard<'static, ()>)> {
        let calls = CALLS.lock().unwrap_or_else(|e| e.into_inner());
        let mut nets = NETS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = nets.iter().position(|g| g.generation() == net.generation()) {
            let g = nets.remove(i);
            nets.push(g.clone());
            return Ok((g, calls));
        }
        let g = Arc::new(GpuDit::upload(net)?);
        nets.push(g.clone());
        if nets.len() > KEEP {
            nets.remove(0);
        }
        Ok((g, calls))
    }
}

/// The (dual) forward on the chosen device: output, its tangent (if any input carried one), cache.
fn run(net: &Dit, x: &Dual, t: &Dual, class: &[usize]) -> Result<(Dual, NetCache)> {
    match device() {
        Device::Cpu => {
            let (y, cache) = net.forward_dual(x, t, class)?;
            Ok((y, NetCache::Cpu(Box::new(cache))))
        }
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let (g, _calls) = gpu::net(net)?;
                let (y, cache) = g.forward_dual(x, t, class)?;
                Ok((y, NetCache::Gpu(Box::new(cache))))
            }
            #[cfg(not(feature = "cuda"))]
            Err(crate::device::cuda_not_built())
        }
    }
}

/// The forward alone (no backward will follow): on the GPU, block activations are freed as the
/// pass goes.
fn run_inference(net: &Dit, x: &Dual, t: &Dual, class: &[usize]) -> Result<Dual> {
    match device() {
        Device::Cpu => net.forward_dual(x, t, class).map(|(y, _)| y),
        Device::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let (g, _calls) = gpu::net(net)?;
                g.jvp(x, t, class)
            }
            #[cfg(not(feature = "cuda"))]
            Err(crate::device::cuda_not_built())
        }
    }
}

/// The class index that means "no class" (classifier-free guidance's unconditional branch).
pub const NULL_CLASS: usize = NUM_CLASSES;

/// The dtype of the network's parameters (f32 when it has none).
pub fn dtype(net: &Dit) -> DType {
    net.params().first().map_or(DType::F32, |p| p.dtype())
}

/// Images as the network's input [B, 1, 16, 16].
pub fn image_tensor(x: &[f64], dtype: DType) -> Result<Tensor> {
    let b = x.len() / PIXELS;
    Tensor::from_f64_vec(x.to_vec(), &[b, 1, SIZE, SIZE], dtype)
}

/// Times as the network's input \[B\].
pub fn time_tensor(t: &[f64], dtype: DType) -> Result<Tensor> {
    Tensor::from_f64_vec(t.to_vec(), &[t.len()], dtype)
}

/// F(x, t, class).
pub fn velocity(net: &Dit, x: &[f64], t: &[f64], class: &[usize]) -> Result<Vec<f64>> {
    let dt = dtype(net);
    let x = Dual::constant(image_tensor(x, dt)?);
    let t = Dual::constant(time_tensor(t, dt)?);
    let y = run_inference(net, &x, &t, class)?;
    Ok(y.primal.to_f64_vec())
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
    trigflow::guide(cond, uncond, w)
}

/// The denoiser f = cos t·x − sin t·F (guided with w).
pub fn denoised(net: &Dit, x: &[f64], t: &[f64], class: &[usize], w: f64) -> Result<Vec<f64>> {
    let f = velocity_guided(net, x, t, class, w)?;
    trigflow::denoise(x, &f, t, PIXELS)
}

/// F with the cache the backward needs.
pub fn velocity_train(
    net: &Dit,
    x: &[f64],
    t: &[f64],
    class: &[usize],
) -> Result<(Vec<f64>, NetCache)> {
    let dt = dtype(net);
    let x = Dual::constant(image_tensor(x, dt)?);
    let t = Dual::constant(time_tensor(t, dt)?);
    let (y, cache) = run(net, &x, &t, class)?;
    Ok((y.primal.to_f64_vec(), cache))
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
) -> Result<(Vec<f64>, Vec<f64>, NetCache)> {
    let dt = dtype(net);
    let xd = Dual::new(image_tensor(x, dt)?, image_tensor(x_dot, dt)?)?;
    let td = Dual::new(time_tensor(t, dt)?, time_tensor(t_dot, dt)?)?;
    let (y, cache) = run(net, &xd, &td, class)?;
    let tangent = match &y.tangent {
        Some(tt) => tt.to_f64_vec(),
        None => vec![0.0; y.primal.numel()],
    };
    Ok((y.primal.to_f64_vec(), tangent, cache))
}

/// Parameter gradients for an output cotangent given in f64, on the device that ran the forward.
pub fn backward(net: &Dit, cache: &NetCache, gout: &[f64]) -> Result<Vec<Tensor>> {
    let gout = image_tensor(gout, dtype(net))?;
    match cache {
        NetCache::Cpu(c) => net.backward(c, &gout),
        #[cfg(feature = "cuda")]
        NetCache::Gpu(c) => {
            let (g, _calls) = gpu::net(net)?;
            g.backward(c, &gout)
        }
    }
}

/// Adds `b` into `a` elementwise (gradients of two losses on the same parameters).
/// [`Error::Invalid`] when the counts, a shape or a dtype differ; nothing in `a` changes then.
pub fn add_grads(a: &mut [Tensor], b: &[Tensor]) -> Result<()> {
    if a.len() != b.len() {
        return Err(Error::invalid(
            "rcm",
            format!(
                "add_grads: {} gradients plus {} gradients",
                a.len(),
                b.len()
            ),
        ));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x.shape() != y.shape() || x.dtype() != y.dtype() {
            return Err(Error::invalid(
                "rcm",
                format!(
                    "add_grads: gradient {i} is {:?} {} in one and {:?} {} in the other",
                    x.shape(),
                    x.dtype(),
                    y.shape(),
                    y.dtype()
                ),
            ));
        }
    }
    let sums = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let sum: Vec<f64> = x
                .to_f64_vec()
                .iter()
                .zip(y.to_f64_vec())
                .map(|(p, q)| p + q)
                .collect();
            Tensor::from_f64_vec(sum, x.shape(), x.dtype())
        })
        .collect::<Result<Vec<_>>>()?;
    for (x, s) in a.iter_mut().zip(sums) {
        *x = s;
    }
    Ok(())
}

/// A network with the given parameters (canonical order): [`Dit::from_params`], which checks
/// the config and every parameter's shape and dtype against the layout (all in one dtype, f32
/// or f64), so a checkpoint mixing dtypes is an error, not a network that breaks that rule.
pub fn dit_with_params(config: crate::dit::DitConfig, params: Vec<Tensor>) -> Result<Dit> {
    Dit::from_params(config, params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn toy() -> crate::dit::DitConfig {
        super::super::RcmConfig::preset(super::super::Preset::Toy).dit
    }

    #[test]
    fn add_grads_checks_everything_before_adding() {
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), &[v.len()]).unwrap();
        let a0 = vec![t(vec![1.0, 2.0]), t(vec![3.0])];
        let mut a = a0.clone();
        add_grads(&mut a, &[t(vec![1.0, 1.0]), t(vec![1.0])]).unwrap();
        assert_eq!(a, vec![t(vec![2.0, 3.0]), t(vec![4.0])]);
        // One tensor short used to add the first and skip the rest; a bad second tensor used
        // to leave the first one added.
        let mut a = a0.clone();
        assert!(add_grads(&mut a, &[t(vec![1.0, 1.0])]).is_err());
        let e = add_grads(&mut a, &[t(vec![1.0, 1.0]), t(vec![1.0, 1.0])]).unwrap_err();
        assert!(e.to_string().contains("gradient 1"), "{e}");
        let f64s = vec![a0[0].clone(), a0[1].to_dtype(DType::F64)];
        assert!(add_grads(&mut a, &f64s).is_err());
        assert_eq!(a, a0);
    }

    #[test]
    fn mixed_dtype_parameters_are_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let net = Dit::new(toy(), DType::F32, &mut rng).unwrap();
        let same = dit_with_params(toy(), net.params().to_vec()).unwrap();
        assert_eq!(same.params(), net.params());
        let mut mixed = net.params().to_vec();
        let last = mixed.len() - 1;
        mixed[last] = mixed[last].to_dtype(DType::F64);
        let e = dit_with_params(toy(), mixed).unwrap_err().to_string();
        assert!(e.contains("f64") || e.contains("F64"), "{e}");
        let mut short = net.params().to_vec();
        short.pop();
        assert!(dit_with_params(toy(), short).is_err());
    }
}
