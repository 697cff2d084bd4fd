#!/usr/bin/env bash
# A short measurement call (about 2 minutes), for tuning between full runs of check.sh:
#
#   ../shared/gpu/stage.sh                       # on the build machine
#   device run, carry [".gpu"]:  bash scripts/gpu/quick.sh
#
# QUICK=ln_mlp (the default): the layernorm, MLP and DiT tests on the GPU, then the benchmarks of both
# layernorm JVP kernels (layernorm.rs: FLASHJVP_LN_JVP_ROWS), of the MLP with each step of its
# forward and JVP timed alone (FLASHJVP_BENCH_STEPS=1) and without cuBLASLt's epilogues, and of the
# DiT block with its steps.
# QUICK=bwd: the Hopper attention backward (attention_bwd_sm90.cu, FLASHJVP_ATTENTION_BWD_PATH=sm90a):
# its tests against the reference (the watchdog build if they hang), gpu_ops' backward tests and gpu_dit
# with it, compute-sanitizer memcheck and racecheck over gpu_sanitize's attention tests with it, then
# `bench attention` at the issue's shapes (bwd and bwd_sm90a rows side by side) and the DiT block on
# both backward paths.
# QUICK=split: gpu_attention_sm90 on the Hopper kernels built with the split wgmma schedule
# (FLASHJVP_SM90_SCHEDULE=split, cuda/hopper.cuh SCHEDULE), then `bench attention` at the issue's shapes
# on both schedules, one after the other.
# QUICK=vf16: the f16 value products of the bf16 JVP (FLASHJVP_ATTENTION_VALUES=f16): their tests (gpu_ops'
# on both paths and gpu_attention_sm90's own, the host entry points at the aim, the DiT), memcheck over gpu_sanitize's
# attention tests with them, then `bench attention` at the issue's shapes (jvp and jvp_vf16 rows).
# QUICK=softmax: the attention kernels after the softmax changes of 2026-11-27 (cuda/README.md): the Hopper
# tests (and the JVP ones on the d64/d72 kernels built with 64-key tiles, FLASHJVP_SM90_KEYS=64), gpu_ops'
# attention tests, memcheck and racecheck over gpu_sanitize's attention tests, then `bench attention` at
# the issue's shapes (each on both key tiles: at d128 only the forward's differs) and PyTorch's cuDNN forward
# at the same shapes, for the ratios.
# Everything in one file back: $OUT/quick.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
G=.gpu B=.gpu/bin/flashjvp
[ -x "$B" ] || { echo "no $B: run ../shared/gpu/stage.sh first" >&2; exit 2; }
export FLASHJVP_REQUIRE_GPU=1 FLASHJVP_EMULATOR=off FLASHJVP_KERNEL_CACHE=/tmp/flashjvp-kernels RUST_BACKTRACE=1
. scripts/gpu/libs.sh
# Each command bounded by LIMIT seconds (default 60), its ERR lines dropped; returns its exit status.
run() {
  echo "=== $* ($(date +%T))"
  timeout --kill-after=5 "${LIMIT:-60}" "$@" 2>&1 | grep -v '^ERR '
  return "${PIPESTATUS[0]}"
}
# QUICK=bwd (see the header).
quick_bwd() {
  if ! LIMIT=60 run "$G/bin/tests/gpu_attention_sm90" --test-threads=1 backward; then
    # Failed or hung: where (the watchdog build names a stuck wait), and nothing more on this kernel.
    LIMIT=40 run env FLASHJVP_SM90_WATCHDOG=2000 "$G/bin/tests/gpu_attention_sm90" --test-threads=1 backward
    echo "the Hopper backward failed its tests: the rest of QUICK=bwd skipped"
    return 1
  fi
  export FLASHJVP_ATTENTION_BWD_PATH=sm90a
  run "$G/bin/tests/gpu_ops" --test-threads=1 attention_backward
  run "$G/bin/tests/gpu_dit" --test-threads=1
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$SAN" ]; then
    LIMIT=100 run "$SAN" --tool memcheck --error-exitcode 1 --leak-check no "$G/bin/tests/gpu_sanitize" \
      --test-threads=1 attention
    LIMIT=100 run "$SAN" --tool racecheck --error-exitcode 1 "$G/bin/tests/gpu_sanitize" --test-threads=1 attention
  fi
  for shape in 1,12,4096,4096,128 1,12,16384,16384,64 2,12,4096,4096,128 1,12,8192,8192,128; do
    run "$B" bench attention --shape "$shape" --dtype bf16
  done
  LIMIT=90 run "$B" bench dit_block --dtype bf16
  LIMIT=90 run env -u FLASHJVP_ATTENTION_BWD_PATH "$B" bench dit_block --dtype bf16
}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  # Kernels compile on first use (NVRTC, ~1 minute for all): fill the cache before the timed steps.
  LIMIT=150 run "$B" kernels
  case "${QUICK:-ln_mlp}" in
  bwd) quick_bwd ;;
  vf16)
    run "$G/bin/tests/gpu_ops" --test-threads=1 attention_jvp_f16_values
    run "$G/bin/tests/gpu_attention_sm90" --test-threads=1 f16_values
    run env FLASHJVP_ATTENTION_PATH=sm80 "$G/bin/tests/gpu_ops" --test-threads=1 attention_jvp_f16_values
    run env FLASHJVP_ATTENTION_VALUES=f16 "$G/bin/tests/gpu_attention_sm90" --test-threads=1 host_ops packed_qkv
    run env FLASHJVP_ATTENTION_VALUES=f16 "$G/bin/tests/gpu_dit" --test-threads=1 bf16
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    [ -n "$SAN" ] && LIMIT=100 run env FLASHJVP_ATTENTION_VALUES=f16 "$SAN" --tool memcheck --error-exitcode 1 \
      --leak-check no "$G/bin/tests/gpu_sanitize" --test-threads=1 attention
    for shape in 1,12,4096,4096,128 1,12,16384,16384,64 1,12,4096,4096,64 2,12,4096,4096,128; do
      run "$B" bench attention --shape "$shape" --dtype bf16
    done
    ;;
  softmax)
    # The softmax changes of 2026-11-27 (cuda/README.md, SOFTMAX ARITHMETIC) and the d64/d72 key tiles: the
    # JVP tests on both tiles, memcheck and racecheck over the attention kernels, then the bench at the
    # issue's shapes with the d64 and d72 ones also on 64-key tiles, and PyTorch's cuDNN forward beside them.
    run "$G/bin/tests/gpu_attention_sm90" --test-threads=1
    run env FLASHJVP_SM90_KEYS=64 "$G/bin/tests/gpu_attention_sm90" --test-threads=1 jvp early_max
    run "$G/bin/tests/gpu_ops" --test-threads=1 attention
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -n "$SAN" ]; then
      LIMIT=100 run "$SAN" --tool memcheck --error-exitcode 1 --leak-check no "$G/bin/tests/gpu_sanitize" \
        --test-threads=1 attention
      LIMIT=100 run "$SAN" --tool racecheck --error-exitcode 1 "$G/bin/tests/gpu_sanitize" --test-threads=1 attention
    fi
    for shape in 1,12,4096,4096,64 1,12,16384,16384,64 1,12,4096,4096,72 2,16,4096,4096,72; do
      run "$B" bench attention --shape "$shape" --dtype bf16
      run env FLASHJVP_SM90_KEYS=64 "$B" bench attention --shape "$shape" --dtype bf16
    done
    # d128: only the forward's tile differs (128 keys by default).
    for shape in 1,12,4096,4096,128 1,12,16384,16384,128; do
      run "$B" bench attention --shape "$shape" --dtype bf16
      run env FLASHJVP_SM90_KEYS=64 "$B" bench attention --shape "$shape" --dtype bf16
    done
    LIMIT=120 run python3 - <<'PY'
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
for (b, h, n, d) in [(1, 12, 4096, 64), (1, 12, 16384, 64), (1, 12, 4096, 128), (1, 12, 16384, 128),
                     (1, 12, 4096, 72), (2, 16, 4096, 72)]:
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(20):
            s.record(); F.scaled_dot_product_attention(q, k, v); e.record(); torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
    ts.sort()
    print(f"cudnn forward {(b, h, n, n, d)}: {ts[len(ts) // 2]:.3f} ms")
PY
    ;;
  split)
    if LIMIT=90 run env FLASHJVP_SM90_SCHEDULE=split "$G/bin/tests/gpu_attention_sm90" --test-threads=1; then
      for shape in 1,12,4096,4096,64 1,12,16384,16384,64 1,12,4096,4096,128 1,12,16384,16384,128; do
        run "$B" bench attention --shape "$shape" --dtype bf16
        run env FLASHJVP_SM90_SCHEDULE=split "$B" bench attention --shape "$shape" --dtype bf16
      done
    fi
    ;;
  *)
    run "$G/bin/tests/gpu_ops" --test-threads=1 layernorm mlp
    run "$G/bin/tests/gpu_dit" --test-threads=1
    run "$B" bench layernorm_mod --dtype bf16
    run env FLASHJVP_LN_JVP_ROWS=wide "$B" bench layernorm_mod --dtype bf16
    run env FLASHJVP_LN_JVP_ROWS=pipe "$G/bin/tests/gpu_ops" --test-threads=1 layernorm
    run env FLASHJVP_LN_JVP_ROWS=pipe "$B" bench layernorm_mod --dtype bf16
    run env FLASHJVP_BENCH_STEPS=1 "$B" bench mlp --dtype bf16
    run env FLASHJVP_GEMM_EPILOGUE=off "$B" bench mlp --dtype bf16
    LIMIT=120 run env FLASHJVP_BENCH_STEPS=1 "$B" bench dit_block --dtype bf16
    ;;
  esac
} > "$OUT/quick.log" 2>&1
tail -n 150 "$OUT/quick.log"
