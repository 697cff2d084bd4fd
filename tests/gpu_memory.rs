//! The device allocator's cache of freed memory, alone in its test binary so that no other test
//! allocates or frees while it measures. Without a GPU it says "skipped: no CUDA device"; with
//! FLASHJVP_REQUIRE_GPU=1 it fails instead.
#![cfg(feature = "cuda")]

use flashjvp::cuda::require_gpu_or_skip;
use flashjvp::{DType, Tensor};

#[test]
fn freed_memory_stays_cached_until_released() {
    let Some(gpu) = require_gpu_or_skip() else {
        return;
    };
    const BYTES: u64 = 64 << 20;
    let t = gpu.alloc(&[(BYTES / 4) as usize], DType::F32).unwrap();
    drop(t);
    gpu.synchronize().unwrap();
    let before = gpu.cached_memory_bytes().unwrap();
    gpu.release_cached_memory().unwrap();
    let after = gpu.cached_memory_bytes().unwrap();
    if gpu.is_emulated() {
        // No pool there: host buffers are freed at once.
        assert_eq!((before, after), (0, 0));
    } else {
        // The pool keeps freed memory across a synchronisation (release threshold raised at
        // start-up) and gives it back when asked.
        assert!(before >= BYTES, "64 MiB freed, {before} bytes cached");
        assert!(
            after < BYTES,
            "{after} bytes still cached after the release"
        );
    }
    // The allocator works as before afterwards.
    let again = gpu
        .upload(
            &Tensor::from_vec(vec![1.5f32; 1024], &[1024]).unwrap(),
            DType::F32,
        )
        .unwrap();
    assert_eq!(again.download().unwrap().to_f64_vec(), vec![1.5; 1024]);
}
