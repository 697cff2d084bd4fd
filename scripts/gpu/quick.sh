#!/usr/bin/env bash
# A short measurement call (about 2 minutes), for tuning between full runs of check.sh:
#
#   ../shared/gpu/stage.sh                       # on the build machine
#   device run, carry [".gpu"]:  bash scripts/gpu/quick.sh
#
# The layernorm, MLP and DiT tests on the GPU, then the benchmarks of both layernorm JVP kernels
# (layernorm.rs: FLASHJVP_LN_JVP_ROWS), of the MLP with each step of its
# forward and JVP timed alone (FLASHJVP_BENCH_STEPS=1) and without cuBLASLt's epilogues, and of the
# DiT block with its steps. Everything in one file back: $OUT/quick.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
G=.gpu B=.gpu/bin/flashjvp
[ -x "$B" ] || { echo "no $B: run ../shared/gpu/stage.sh first" >&2; exit 2; }
export FLASHJVP_REQUIRE_GPU=1 FLASHJVP_EMULATOR=off FLASHJVP_KERNEL_CACHE=/tmp/flashjvp-kernels RUST_BACKTRACE=1
. scripts/gpu/libs.sh
run() { echo "=== $* ($(date +%T))"; timeout --kill-after=5 "${LIMIT:-60}" "$@" 2>&1 | grep -v '^ERR '; }
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  # Kernels compile on first use (NVRTC, ~1 minute for all): fill the cache before the timed steps.
  LIMIT=150 run "$B" kernels
  run "$G/bin/tests/gpu_ops" --test-threads=1 layernorm mlp
  run "$G/bin/tests/gpu_dit" --test-threads=1
  run "$B" bench layernorm_mod --dtype bf16
  run env FLASHJVP_LN_JVP_ROWS=wide "$B" bench layernorm_mod --dtype bf16
  run env FLASHJVP_BENCH_STEPS=1 "$B" bench mlp --dtype bf16
  run env FLASHJVP_GEMM_EPILOGUE=off "$B" bench mlp --dtype bf16
  LIMIT=120 run env FLASHJVP_BENCH_STEPS=1 "$B" bench dit_block --dtype bf16
} > "$OUT/quick.log" 2>&1
tail -n 150 "$OUT/quick.log"
