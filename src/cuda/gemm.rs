//! Matrix products for the MLP: cuBLASLt (seen doing bf16 GEMMs with epilogues on the lent H200)
//! with f32 accumulation and f32 scaling for bf16, f16 and f32 storage (f32 in full precision:
//! `CUBLAS_COMPUTE_32F`, no TF32), an optional bias added to every row by the epilogue, and an
//! optional GELU in it ([`GemmAct`]: GELU, GELU_AUX saving the pre-activation, DGELU applying the
//! derivative at a saved pre-activation).
//!
//! If cuBLASLt has no algorithm for a case (an odd leading dimension of a 16-bit matrix, say) the
//! product falls back to cuBLAS's `cublasGemmEx`, the bias to a rank-1 product (bias times a
//! row of ones) into C followed by the product accumulated onto it (beta = 1), and the GELU to the
//! elementwise kernels; `FLASHJVP_GEMM_EPILOGUE=off` forces that path for the activations.
//!
//! Row-major to column-major: a row-major C[m, n] is the column-major Cᵀ[n, m], so
//! C = op(A) op(B) is computed as Cᵀ = op(B)ᵀ op(A)ᵀ, with B's storage as cuBLAS's first operand.
//! The heuristic's algorithm is cached per problem (sizes, dtype, transposes, bias, alignments).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublas::sys as bsys;
use cudarc::cublaslt::sys as lsys;
use cudarc::driver::{CudaSlice, CudaStream};

use super::context::Gpu;
use super::elementwise as ew;
use super::launch::{dtype_suffix, Gemm, GemmAct};
use super::tensor::one_bits;
use crate::error::{Error, Result};
use crate::tensor::DType;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    bias: bool,
    act: u8,
    /// Alignments of A, B, C, the bias and the aux matrix.
    align: [u32; 5],
}

/// The aux matrix of an epilogue, if it has one.
fn aux_of(act: GemmAct) -> Option<u64> {
    match act {
        GemmAct::GeluAux { aux } | GemmAct::DGelu { aux } => Some(aux),
        GemmAct::None | GemmAct::Gelu => None,
    }
}

/// cuBLASLt's epilogue for a bias and an activation.
fn epilogue(bias: bool, act: GemmAct) -> Option<lsys::cublasLtEpilogue_t> {
    use lsys::cublasLtEpilogue_t as E;
    Some(match (act, bias) {
        (GemmAct::None, false) => return None,
        (GemmAct::None, true) => E::CUBLASLT_EPILOGUE_BIAS,
        (GemmAct::Gelu, false) => E::CUBLASLT_EPILOGUE_GELU,
        (GemmAct::Gelu, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        (GemmAct::GeluAux { .. }, false) => E::CUBLASLT_EPILOGUE_GELU_AUX,
        (GemmAct::GeluAux { .. }, true) => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
        (GemmAct::DGelu { .. }, _) => E::CUBLASLT_EPILOGUE_DGELU,
    })
}

/// cuBLASLt (and, on demand, cuBLAS) state: handles, a workspace, cached algorithms.
pub(crate) struct Blas {
    lt: Option<lsys::cublasLtHandle_t>,
    workspace: CudaSlice<u8>,
    workspace_bytes: usize,
    /// `None`: cuBLASLt has no algorithm for this problem, use cuBLAS.
    algos: HashMap<Key, Option<lsys::cublasLtMatmulAlgo_t>>,
    cublas: Option<bsys::cublasHandle_t>,
    /// A vector of ones per dtype (for the fallback's bias), grown as needed.
    ones: HashMap<DType, (CudaSlice<u8>, usize)>,
}

// SAFETY: the handles are used under the Gpu's mutex only, from one thread at a time.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handles were created by this struct and are destroyed once.
        unsafe {
            if let Some(h) = self.lt.take() {
                let _ = lsys::cublasLtDestroy(h);
            }
            if let Some(h) = self.cublas.take() {
                let _ = bsys::cublasDestroy_v2(h);
            }
        }
    }
}

fn lt_err(what: &str, s: lsys::cublasStatus_t) -> Error {
    Error::Cuda(format!("cuBLASLt {what}: {s:?}"))
}

fn blas_err(what: &str, s: bsys::cublasStatus_t) -> Error {
    Error::Cuda(format!("cuBLAS {what}: {s:?}"))
}

fn lt_check(what: &str, s: lsys::cublasStatus_t) -> Result<()> {
    if s == lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(lt_err(what, s))
    }
}

fn blas_check(what: &str, s: bsys::cublasStatus_t) -> Result<()> {
    if s == bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(blas_err(what, s))
    }
}

/// Errors unless the product's dtype is one the GEMMs take (bf16, f16, f32): cuBLAS would be told
/// f32 for any other (`lt_type`), and read f64 buffers as f32 without a word.
pub(crate) fn check_gemm_dtype(g: &Gemm) -> Result<()> {
    dtype_suffix(g.dtype).map(|_| ()).map_err(|_| {
        Error::Unsupported(format!(
            "a matrix product [{}, {}] x [{}, {}] in {}: the GPU's GEMMs take bf16, f16 or f32 \
             (use the CPU for f64)",
            g.m, g.k, g.k, g.n, g.dtype
        ))
    })
}

/// The largest power of two (up to 256) dividing the address: the alignment cuBLASLt may assume.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

fn lt_type(d: DType) -> lsys::cudaDataType {
    match d {
        DType::BF16 => lsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => lsys::cudaDataType::CUDA_R_16F,
        _ => lsys::cudaDataType::CUDA_R_32F,
    }
}

fn blas_type(d: DType) -> bsys::cudaDataType {
    match d {
        DType::BF16 => bsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => bsys::cudaDataType::CUDA_R_16F,
        _ => bsys::cudaDataType::CUDA_R_32F,
    }
}

/// A cuBLASLt descriptor set: destroyed on drop.
struct LtDescs {
    desc: lsys::cublasLtMatmulDesc_t,
    a: lsys::cublasLtMatrixLayout_t,
    b: lsys::cublasLtMatrixLayout_t,
    c: lsys::cublasLtMatrixLayout_t,
}

impl Drop for LtDescs {
    fn drop(&mut self) {
        // SAFETY: created in `LtDescs::new`, destroyed once; null ones were never created.
        unsafe {
            if !self.desc.is_null() {
                let _ = lsys::cublasLtMatmulDescDestroy(self.desc);
            }
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lsys::cublasLtMatrixLayoutDestroy(l);
                }
            }
        }
    }
}

/// The column-major problem cuBLAS sees for a row-major [`Gemm`]: Cᵀ[n, m] = op(B)ᵀ op(A)ᵀ.
pub(crate) struct ColMajor {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// First operand (B's storage): transposed?, leading dimension, stored rows x cols.
    pub(crate) trans_1: bool,
    pub(crate) ld_1: usize,
    pub(crate) rows_1: usize,
    pub(crate) cols_1: usize,
    /// Second operand (A's storage).
    pub(crate) trans_2: bool,
    pub(crate) ld_2: usize,
    pub(crate) rows_2: usize,
    pub(crate) cols_2: usize,
}

pub(crate) fn col_major(g: &Gemm) -> ColMajor {
    let (m, n, k) = (g.n, g.m, g.k);
    // B row-major [k, n] is column-major [n, k] (ld n) = op(B)ᵀ as is; row-major [n, k] is
    // column-major [k, n] (ld k), transposed.
    let (trans_1, ld_1, rows_1, cols_1) = if g.trans_b {
        (true, k, k, m)
    } else {
        (false, m, m, k)
    };
    // A row-major [m_rm, k] = column-major [k, m_rm] (ld k) = op(A)ᵀ as is; [k, m_rm] transposed.
    let (trans_2, ld_2, rows_2, cols_2) = if g.trans_a {
        (true, n, n, k)
    } else {
        (false, k, k, n)
    };
    ColMajor {
        m,
        n,
        k,
        trans_1,
        ld_1,
        rows_1,
        cols_1,
        trans_2,
        ld_2,
        rows_2,
        cols_2,
    }
}

impl Blas {
    pub(crate) fn new(gpu: &Gpu) -> Result<Blas> {
        let lt = if super::cublaslt_present() {
            let mut h: lsys::cublasLtHandle_t = std::ptr::null_mut();
            // SAFETY: the library is loaded; `h` is a valid out-pointer.
            lt_check("create", unsafe { lsys::cublasLtCreate(&mut h) })?;
            Some(h)
        } else if super::cublas_present() {
            None
        } else {
            return Err(Error::Unsupported(
                "cuBLASLt (libcublasLt.so.13) not found: the MLP's matrix products need it".into(),
            ));
        };
        // NVIDIA's recommendation: 32 MiB on Hopper, 4 MiB elsewhere.
        let workspace_bytes = if gpu.info().capability.0 >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        let workspace = gpu.alloc_cuda_bytes(workspace_bytes)?;
        Ok(Blas {
            lt,
            workspace,
            workspace_bytes,
            algos: HashMap::new(),
            cublas: None,
            ones: HashMap::new(),
        })
    }

    pub(crate) fn gemm(&mut self, gpu: &Gpu, stream: &CudaStream, g: &Gemm) -> Result<()> {
        check_gemm_dtype(g)?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if g.k == 0 {
            return Err(Error::Unsupported("a matrix product with k = 0".into()));
        }
        if matches!(g.act, GemmAct::DGelu { .. }) && g.bias.is_some() {
            return Err(Error::Unsupported(
                "a matrix product with a DGELU epilogue takes no bias".into(),
            ));
        }
        let key = Key {
            dtype: g.dtype,
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            bias: g.bias.is_some(),
            act: match g.act {
                GemmAct::None => 0,
                GemmAct::Gelu => 1,
                GemmAct::GeluAux { .. } => 2,
                GemmAct::DGelu { .. } => 3,
            },
            align: [
                alignment(g.a),
                alignment(g.b),
                alignment(g.c),
                alignment(g.bias.unwrap_or(0)),
                alignment(aux_of(g.act).unwrap_or(0)),
            ],
        };
        // FLASHJVP_GEMM_EPILOGUE=off keeps activations out of cuBLASLt (diagnosis on a new GPU);
        // read once per process.
        static EPILOGUE_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *EPILOGUE_OFF
            .get_or_init(|| std::env::var("FLASHJVP_GEMM_EPILOGUE").is_ok_and(|v| v == "off"));
        // cuBLASLt wants the GELU aux matrix's leading dimension (C's row length) a multiple of 8.
        let aux_ld_ok = aux_of(g.act).is_none() || col_major(g).m % 8 == 0;
        let fused_ok = g.act == GemmAct::None || (!off && aux_ld_ok);
        if let (Some(lt), true) = (self.lt, fused_ok) {
            let algo = match self.algos.get(&key) {
                Some(a) => *a,
                None => {
                    let a = self.heuristic(lt, g, &key)?;
                    self.algos.insert(key, a);
                    a
                }
            };
            if let Some(algo) = algo {
                return self.lt_matmul(lt, stream, g, &algo);
            }
        }
        self.unfused(gpu, stream, g)
    }

    /// Without a cuBLASLt algorithm for the epilogue: the product by cuBLAS, then the activation by
    /// the elementwise kernels (one more pass over C).
    fn unfused(&mut self, gpu: &Gpu, stream: &CudaStream, g: &Gemm) -> Result<()> {
        let plain = Gemm {
            act: GemmAct::None,
            ..*g
        };
        let n = g.m * g.n;
        match g.act {
            GemmAct::None => self.gemm_ex(gpu, stream, g),
            GemmAct::Gelu => {
                self.gemm_ex(gpu, stream, &plain)?;
                gpu.run_on(
                    stream,
                    &ew::plan_activation_fwd(ew::Activation::Gelu, g.dtype, n, g.c, g.c)?,
                )
            }
            GemmAct::GeluAux { aux } => {
                self.gemm_ex(gpu, stream, &Gemm { c: aux, ..plain })?;
                gpu.run_on(
                    stream,
                    &ew::plan_activation_fwd(ew::Activation::Gelu, g.dtype, n, aux, g.c)?,
                )
            }
            GemmAct::DGelu { aux } => {
                self.gemm_ex(gpu, stream, &plain)?;
                gpu.run_on(stream, &ew::plan_gelu_tangent(g.dtype, n, aux, g.c, g.c)?)
            }
        }
    }

    /// Matrix layouts and the operation descriptor of a product.
    fn descs(&self, g: &Gemm) -> Result<LtDescs> {
        let cm = col_major(g);
        let ty = lt_type(g.dtype);
        let mut d = LtDescs {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
        };
        // SAFETY: out-pointers are valid; attribute buffers live across each call and have the
        // sizes cuBLASLt documents (int32 transposes and epilogue, a 64-bit bias pointer).
        unsafe {
            lt_check(
                "matmul descriptor",
                lsys::cublasLtMatmulDescCreate(
                    &mut d.desc,
                    lsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    lsys::cudaDataType::CUDA_R_32F,
                ),
            )?;
            let layout = |out: &mut lsys::cublasLtMatrixLayout_t, rows: usize, cols: usize, ld| {
                lt_check(
                    "matrix layout",
                    lsys::cublasLtMatrixLayoutCreate(out, ty, rows as u64, cols as u64, ld as i64),
                )
            };
            layout(&mut d.a, cm.rows_1, cm.cols_1, cm.ld_1)?;
            layout(&mut d.b, cm.rows_2, cm.cols_2, cm.ld_2)?;
            layout(&mut d.c, cm.m, cm.n, cm.m)?;
            let set = |attr, v: *const c_void, size| {
                lt_check(
                    "matmul attribute",
                    lsys::cublasLtMatmulDescSetAttribute(d.desc, attr, v, size),
                )
            };
            let ta: i32 = cm.trans_1 as i32;
            let tb: i32 = cm.trans_2 as i32;
            set(
                lsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const i32 as *const c_void,
                4,
            )?;
            set(
                lsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                &tb as *const i32 as *const c_void,
                4,
            )?;
            if let Some(epi) = epilogue(g.bias.is_some(), g.act) {
                set(
                    lsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &epi as *const lsys::cublasLtEpilogue_t as *const c_void,
                    std::mem::size_of::<lsys::cublasLtEpilogue_t>(),
                )?;
            }
            if let Some(bias) = g.bias {
                set(
                    lsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    8,
                )?;
            }
            if let Some(aux) = aux_of(g.act) {
                // The aux matrix has D's column-major shape (cm.m x cm.n), leading dimension cm.m.
                let ld = cm.m as i64;
                set(
                    lsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                    &aux as *const u64 as *const c_void,
                    8,
                )?;
                set(
                    lsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    &ld as *const i64 as *const c_void,
                    8,
                )?;
            }
        }
        Ok(d)
    }

    /// cuBLASLt's best algorithm for the problem, or `None` when it has none.
    fn heuristic(
        &self,
        lt: lsys::cublasLtHandle_t,
        g: &Gemm,
        key: &Key,
    ) -> Result<Option<lsys::cublasLtMatmulAlgo_t>> {
        let d = self.descs(g)?;
        let mut pref: lsys::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: as in `descs`; the preference is destroyed on every path.
        unsafe {
            lt_check(
                "preference",
                lsys::cublasLtMatmulPreferenceCreate(&mut pref),
            )?;
            let r = (|| {
                let ws = self.workspace_bytes as u64;
                lt_check(
                    "workspace preference",
                    lsys::cublasLtMatmulPreferenceSetAttribute(
                        pref,
                        lsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &ws as *const u64 as *const c_void,
                        8,
                    ),
                )?;
                // The first operand is B's storage, the second A's (see `col_major`).
                let aligns = [
                    (
                        lsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        key.align[1],
                    ),
                    (
                        lsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        key.align[0],
                    ),
                    (
                        lsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        key.align[2],
                    ),
                    (
                        lsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                        key.align[2],
                    ),
                ];
                for (attr, v) in aligns {
                    lt_check(
                        "alignment preference",
                        lsys::cublasLtMatmulPreferenceSetAttribute(
                            pref,
                            attr,
                            &v as *const u32 as *const c_void,
                            4,
                        ),
                    )?;
                }
                let mut result =
                    std::mem::MaybeUninit::<lsys::cublasLtMatmulHeuristicResult_t>::zeroed();
                let mut count: i32 = 0;
                let s = lsys::cublasLtMatmulAlgoGetHeuristic(
                    lt,
                    d.desc,
                    d.a,
                    d.b,
                    d.c,
                    d.c,
                    pref,
                    1,
                    result.as_mut_ptr(),
                    &mut count,
                );
                if s != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || count < 1 {
                    return Ok(None);
                }
                let result = result.assume_init();
                if result.state != lsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    return Ok(None);
                }
                Ok(Some(result.algo))
            })();
            let _ = lsys::cublasLtMatmulPreferenceDestroy(pref);
            r
        }
    }

    fn lt_matmul(
        &self,
        lt: lsys::cublasLtHandle_t,
        stream: &CudaStream,
        g: &Gemm,
        algo: &lsys::cublasLtMatmulAlgo_t,
    ) -> Result<()> {
        let d = self.descs(g)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ws = {
            use cudarc::driver::DevicePtr;
            let (p, _guard) = self.workspace.device_ptr(stream);
            p
        };
        // SAFETY: every pointer is a live device allocation of the size the layouts describe
        // (checked by the plan builders); alpha/beta are host f32 (scale type 32F).
        let s = unsafe {
            lsys::cublasLtMatmul(
                lt,
                d.desc,
                &alpha as *const f32 as *const c_void,
                g.b as *const c_void,
                d.a,
                g.a as *const c_void,
                d.b,
                &beta as *const f32 as *const c_void,
                g.c as *const c_void,
                d.c,
                g.c as *mut c_void,
                d.c,
                algo,
                ws as *mut c_void,
                self.workspace_bytes,
                stream.cu_stream() as lsys::cudaStream_t,
            )
        };
        lt_check(
            &format!(
                "matmul {}x{}x{} {} (bias {})",
                g.m,
                g.n,
                g.k,
                g.dtype,
                g.bias.is_some()
            ),
            s,
        )
    }

    /// The cuBLAS handle (created on first use), set to queue on `stream`.
    fn cublas(&mut self, stream: &CudaStream) -> Result<bsys::cublasHandle_t> {
        let h = match self.cublas {
            Some(h) => h,
            None => {
                if !super::cublas_present() {
                    return Err(Error::Unsupported(
                        "cuBLASLt has no algorithm for this product and cuBLAS (libcublas.so.13) \
                         is not there to fall back on"
                            .into(),
                    ));
                }
                let mut h: bsys::cublasHandle_t = std::ptr::null_mut();
                // SAFETY: the library is loaded; `h` is a valid out-pointer.
                unsafe { blas_check("create", bsys::cublasCreate_v2(&mut h))? };
                self.cublas = Some(h);
                h
            }
        };
        // SAFETY: `h` is a live handle and the stream belongs to the Gpu's context.
        unsafe {
            blas_check(
                "set stream",
                bsys::cublasSetStream_v2(h, stream.cu_stream() as bsys::cudaStream_t),
            )?;
        }
        Ok(h)
    }

    /// A device vector of at least `n` ones in `dtype`.
    fn ones(&mut self, gpu: &Gpu, stream: &CudaStream, dtype: DType, n: usize) -> Result<u64> {
        use cudarc::driver::DevicePtr;
        let grow = self.ones.get(&dtype).is_none_or(|(_, len)| *len < n);
        if grow {
            let len = n.next_power_of_two().max(256);
            let buf = gpu.alloc_cuda_bytes(len * dtype.size_in_bytes())?;
            let (width, bits) = one_bits(dtype);
            let p = buf.device_ptr(stream).0;
            // Filled on the Gpu's stream, where it was allocated; the product that reads it may
            // run on another (Gpu::run_on_stream), which then waits for both.
            gpu.run(&[super::launch::Step::Fill {
                ptr: p,
                width,
                count: len,
                bits,
            }])?;
            stream
                .join(gpu.stream()?)
                .map_err(|e| Error::Cuda(format!("ordering a product after its ones: {e:?}")))?;
            self.ones.insert(dtype, (buf, len));
        }
        let (buf, _) = &self.ones[&dtype];
        let (p, _g) = buf.device_ptr(stream);
        Ok(p)
    }

    /// The cuBLAS fallback: bias (if any) by a rank-1 product into C, then C += op(A) op(B).
    fn gemm_ex(&mut self, gpu: &Gpu, stream: &CudaStream, g: &Gemm) -> Result<()> {
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| {
                Error::Unsupported(format!("matrix dimension {v} is too large for cuBLAS"))
            })
        };
        let cm = col_major(g);
        // Every dimension converted before anything is written: a product refused after the bias
        // broadcast would have left C half-written.
        let (m, n, k) = (int(cm.m)?, int(cm.n)?, int(cm.k)?);
        let (ld_1, ld_2) = (int(cm.ld_1)?, int(cm.ld_2)?);
        let ty = blas_type(g.dtype);
        let mut beta = 0.0f32;
        if let Some(bias) = g.bias {
            let ones = self.ones(gpu, stream, g.dtype, cm.n)?;
            let h = self.cublas(stream)?;
            let (one, zero) = (1.0f32, 0.0f32);
            // Cᵀ[n_out, m_rows] = bias[n_out, 1] · ones[1, m_rows]
            // SAFETY: bias holds cm.m elements, ones at least cm.n, C cm.m * cm.n.
            let s = unsafe {
                bsys::cublasGemmEx(
                    h,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    m,
                    n,
                    1,
                    &one as *const f32 as *const c_void,
                    bias as *const c_void,
                    ty,
                    m,
                    ones as *const c_void,
                    ty,
                    1,
                    &zero as *const f32 as *const c_void,
                    g.c as *mut c_void,
                    ty,
                    m,
                    bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            };
            blas_check("bias broadcast", s)?;
            beta = 1.0;
        }
        let h = self.cublas(stream)?;
        let alpha = 1.0f32;
        let op = |t: bool| {
            if t {
                bsys::cublasOperation_t::CUBLAS_OP_T
            } else {
                bsys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // SAFETY: as in `lt_matmul`.
        let s = unsafe {
            bsys::cublasGemmEx(
                h,
                op(cm.trans_1),
                op(cm.trans_2),
                m,
                n,
                k,
                &alpha as *const f32 as *const c_void,
                g.b as *const c_void,
                ty,
                ld_1,
                g.a as *const c_void,
                ty,
                ld_2,
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                ty,
                m,
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        blas_check(&format!("GemmEx {}x{}x{} {}", g.m, g.n, g.k, g.dtype), s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Gemm {
        Gemm {
            dtype: DType::F32,
            m,
            n,
            k,
            a: 0,
            trans_a,
            b: 0,
            trans_b,
            c: 0,
            bias: None,
            act: GemmAct::None,
        }
    }

    /// Computes the column-major product cuBLAS would, on the host, and compares with a row-major
    /// reference: the mapping of `col_major` (operand order, transposes, leading dimensions).
    #[test]
    fn column_major_mapping_computes_the_row_major_product() {
        for (m, n, k) in [(3, 5, 4), (1, 7, 2), (6, 1, 3)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
                let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
                // Row-major element (r, c) of op(A) [m, k] and op(B) [k, n].
                let ea = |r: usize, c: usize| if ta { a[c * m + r] } else { a[r * k + c] };
                let eb = |r: usize, c: usize| if tb { b[c * k + r] } else { b[r * n + c] };
                let cm = col_major(&g(m, n, k, ta, tb));
                assert_eq!((cm.m, cm.n, cm.k), (n, m, k));
                // Column-major stored element (r, c) with leading dimension ld.
                let s1 = |r: usize, c: usize| b[c * cm.ld_1 + r];
                let s2 = |r: usize, c: usize| a[c * cm.ld_2 + r];
                let op1 = |i: usize, l: usize| if cm.trans_1 { s1(l, i) } else { s1(i, l) };
                let op2 = |l: usize, j: usize| if cm.trans_2 { s2(j, l) } else { s2(l, j) };
                assert_eq!(
                    (cm.rows_1 * cm.cols_1, cm.rows_2 * cm.cols_2),
                    (k * n, m * k)
                );
                for i in 0..cm.m {
                    for j in 0..cm.n {
                        let got: f64 = (0..cm.k).map(|l| op1(i, l) * op2(l, j)).sum();
                        // Cᵀ(i, j) = C(j, i)
                        let want: f64 = (0..k).map(|l| ea(j, l) * eb(l, i)).sum();
                        assert!((got - want).abs() < 1e-12, "{m}x{n}x{k} {ta} {tb}");
                    }
                }
            }
        }
    }

    #[test]
    fn alignment_of_addresses() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
    }
}
