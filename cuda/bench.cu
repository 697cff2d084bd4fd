// bench.cu: a kernel for the GPU benchmark only (src/cuda/bench.rs, time_plans).
//
// bench_busy(i64 iters, float* sink): keeps the GPU busy for a time proportional to iters, with no
// memory traffic: one warp runs a dependent chain of iters FMAs. time_plans queues it in front of its
// timed loop, so that the host queues every timed run (event, plan, event) while the GPU is still busy,
// and the runs then execute back to back: each event pair measures the GPU's time, not the host's
// launch overhead (which would dominate an op that takes less time on the GPU than its launch on the
// host, and the first runs after a synchronisation). sink (one float) is written only if the chain
// is NaN, which it never is for these constants: the store keeps the compiler from dropping the loop.
//
// LAUNCH: grid (1,1,1), block (32,1,1), no shared memory.
#include "common.cuh"

extern "C" __global__ void bench_busy(fj_i64 iters, float* sink) {
    float x = (float)threadIdx.x * 1e-3f;
    for (fj_i64 i = 0; i < iters; ++i) x = fmaf(x, 0.999999f, 1e-7f);
    if (x != x) sink[0] = x;
}
FJ_REGISTER(bench_busy)
