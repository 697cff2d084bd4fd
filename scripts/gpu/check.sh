#!/usr/bin/env bash
# The ONE command a GPU session runs, after staging the binaries here:
#
#   ../shared/gpu/stage.sh                                  # on the build machine
#   device run, carry [".gpu"], timeout_s 600:  bash scripts/gpu/check.sh
#
# Steps (each bounded by `timeout` and all together by a 570 s deadline so that the summary always
# prints inside the device tool's 600 s; each log under $OUT, a summary table at the end, ~8 minutes):
#   1. info     the GPU, driver, libraries; `flashjvp info` and `flashjvp kernels` (resources; it also
#               loads every module on the GPU and fills the kernel cache, so the tests start warm)
#   2. tests    every staged gpu_* test binary as its own step (so that a hang costs its own limit,
#               not the other binaries' time), FLASHJVP_REQUIRE_GPU=1: first gpu_attention_sm90 (the
#               Hopper attention path and the sm80 fallback against the reference, MAX lines, after
#               the layout probe's PROBE lines: TMA image, S, O of one tile per swizzle); if it
#               hangs or a kernel faults (a CUDA error, not merely a tolerance missed), every later
#               step runs with FLASHJVP_ATTENTION_PATH=sm80, so that the rest is still checked on
#               this GPU (the summary says so); after a hang it first reruns them on the kernels'
#               watchdog build (FLASHJVP_SM90_WATCHDOG=2000: a stuck mbarrier wait prints where and
#               traps). Then gpu_ops (every op
#               against the f64 CPU reference, ERR lines), gpu_dit (the GPU DiT against the CPU DiT,
#               the toy rCM pipeline on cuda; again on sm80 attention if both it and
#               gpu_attention_sm90 failed without a hang; with FLASHJVP_SYNC_STEPS=1 after a fault, so that
#               the error names the faulting kernel), gpu_sanitize. gpu_plans needs NVRTC only: CI runs it.
#      bwd_sm90a: on Hopper, the Hopper attention backward (attention_bwd_sm90.cu, opt-in through
#               FLASHJVP_ATTENTION_BWD_PATH=sm90a): gpu_attention_sm90's backward tests (skipped in its
#               main step, so that a hang there costs only this step; the watchdog build after a hang),
#               then gpu_ops' attention backward tests and gpu_dit with it. If all pass, every later step
#               (sanitizers, benchmarks) runs with FLASHJVP_ATTENTION_BWD_PATH=sm90a, and dit_block_bwd80
#               times the DiT block once more on the sm_80 backward.
#      sm90_split: on Hopper, all of gpu_attention_sm90 on the kernels built with the split wgmma schedule
#               (FLASHJVP_SM90_SCHEDULE=split, cuda/hopper.cuh SCHEDULE); if it passes, compare.py also
#               times them (--split-schedule: "Hopper schedule" table in compare.log).
#      sm90_keys64: on Hopper, gpu_attention_sm90's JVP tests on the d64 and d72 kernels built with 64-key
#               tiles (FLASHJVP_SM90_KEYS=64; the defaults are 96 and 80, and 128 for the forward at every
#               head dim, whose 64-key build the H200 ran); if they pass, compare.py times them (--keys64:
#               "Hopper key tile" table; a speed-up above 1 favours 64 keys).
#      vf16_host, vf16_sm80, vf16_dit: the f16 value products (FLASHJVP_ATTENTION_VALUES=f16): on Hopper
#               the host entry points' tests at the tangent aim of 1.7e-3 and gpu_ops' test of them on the
#               sm_80 kernels (FLASHJVP_ATTENTION_PATH=sm80), on any GPU gpu_dit's bf16 tests
#      mlp_unfused: gpu_ops' MLP tests with FLASHJVP_GEMM_EPILOGUE=off (the GELU by our kernels)
#      ln_pipe: gpu_ops' layernorm tests on the pipelined JVP kernel (FLASHJVP_LN_JVP_ROWS=pipe); if they
#               pass, compare.py times it (--ln-pipe: a "(pipe)" row beside the layernorm JVP)
#   3. memcheck compute-sanitizer memcheck over gpu_sanitize (B1 H2 N300 d72 and friends)
#   4. racecheck compute-sanitizer racecheck over gpu_sanitize, cuBLAS (the MLP) skipped
#   5. compare  scripts/gpu/compare.py: the CLI on cuda against cpu, `flashjvp bench --json`
#               against PyTorch's cuDNN attention forward (path per row, sm90a beside sm80, the
#               issue's JVP/cuDNN targets) and our backward against PyTorch's fused SDPA backward,
#               a device copy and the MLP's forward
#   6. dit_block `flashjvp bench dit_block` (bf16): one DiT block's passes and training steps
#   7. ncu (if there and the deadline allows): hardware counters of one launch each of the attention
#      JVP at the issue's two shapes and of the layernorm JVP (ncu.log)
#   8. on Hopper, memcheck and racecheck again over gpu_sanitize's attention tests with
#      FLASHJVP_ATTENTION_PATH=sm80 (the sm_80 kernels, which the dispatcher no longer picks there;
#      racecheck over them takes over a minute); memcheck_vf16: memcheck over them with
#      FLASHJVP_ATTENTION_VALUES=f16 (the f16 copies' kernels and the vf16 JVP kernels); on any GPU
#      memcheck_ln_pipe, racecheck_ln_pipe: both over gpu_sanitize's layernorm test with
#      FLASHJVP_LN_JVP_ROWS=pipe
#   9. rcm_gpu: the rCM example's `--preset gpu`, shortened to about a minute (rcm_gpu/results.md)
# CHECK_SKIP="name ..." skips those steps (e.g. a sanitizer run already clean on the same kernels);
# CHECK_DEADLINE (default 570 s) bounds them all.
# CHECK_DRY_RUN=1 runs the same steps on a machine without a GPU: every binary on the kernel emulator
# (FLASHJVP_EMULATE=sm_90a unless set: the Hopper path and its sm_80 fallback both run), compare.py
# --dry-run, a small dit_block shape. It checks this script, its steps and its summary, not a GPU.
# Files back (the tool returns at most 8): summary.txt, compare.log, compare.json and logs.tar.gz with every
# other log: gpu_attention_sm90.log (gpu_attention_sm90_watchdog.log after a hang) gpu_attention_bwd_sm90.log
# gpu_ops_bwd_sm90.log gpu_dit_bwd_sm90.log gpu_ops.log gpu_dit.log
# (gpu_dit_sync.log after a fault) gpu_sanitize.log mlp_unfused.log sanitize.log ncu.log
set -uo pipefail
cd "$(dirname "$0")/../.."          # the repository root
export OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
G=.gpu
[ -x "$G/bin/flashjvp" ] || { echo "no $G/bin/flashjvp: run ../shared/gpu/stage.sh first" >&2; exit 2; }
export FLASHJVP_REQUIRE_GPU=1 RUST_BACKTRACE=1 PYTHONUNBUFFERED=1
DRY=${CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
  export FLASHJVP_EMULATE=${FLASHJVP_EMULATE:-sm_90a}
  echo "CHECK_DRY_RUN=1: every step on the kernel emulator (FLASHJVP_EMULATE=$FLASHJVP_EMULATE), no GPU"
else
  # The CPU kernel emulator is for machines without a GPU: never spend device time building it here.
  export FLASHJVP_EMULATOR=off
fi
# One kernel cache for every process of this call (each test binary, each sanitizer run).
export FLASHJVP_KERNEL_CACHE=/tmp/flashjvp-kernels
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"
rows=()
last_rc=0
DEADLINE=${CHECK_DEADLINE:-570}
step() { # name, timeout seconds, log file, command...
  local name=$1 limit=$2 log=$3; shift 3
  if [[ " ${CHECK_SKIP:-} " == *" $name "* ]]; then
    last_rc=skipped  # not a pass: steps that hang on this one's result do not run
    rows+=("$(printf '%-10s skipped (CHECK_SKIP)' "$name")"); return 0
  fi
  local left=$((DEADLINE - SECONDS - 15))
  if [ "$left" -lt 10 ]; then
    last_rc=skipped
    rows+=("$(printf '%-10s not run (deadline)' "$name")"); return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "=== $name ($(date +%T), limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  last_rc=$rc
  local dt=$((SECONDS - t0))
  tail -n 25 "$log"
  rows+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$dt" "$(basename "$log")")")
  return 0
}

# ---- 1. info (and the libraries on the loader path: add pip's CUDA wheels if needed)
{
  echo "## $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
  for lib in libcuda.so.1 libnvrtc.so.13 libcublasLt.so.13 libcublas.so.13; do
    if ldconfig -p | grep -q "$lib"; then echo "$lib: on the loader path"; else echo "$lib: NOT on the loader path"; fi
  done
} >>"$SUMMARY" 2>&1
. scripts/gpu/libs.sh
[ -n "$extra" ] && echo "LD_LIBRARY_PATH += $extra (pip's CUDA libraries, after the system's)" >>"$SUMMARY"
"$G/bin/flashjvp" info >>"$SUMMARY" 2>&1
# FLASHJVP_DEVICE one past the last device: `info` must say "none usable" with the driver's count.
ndev=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
echo "FLASHJVP_DEVICE=$ndev (past the last device): $(FLASHJVP_DEVICE=$ndev "$G/bin/flashjvp" info 2>&1 | grep '^GPU: ')" >>"$SUMMARY"
step kernels 120 "$SUMMARY" "$G/bin/flashjvp" kernels

# ---- 2. the GPU tests, one binary per step (GPU required); the Hopper attention path first
test_step() { # binary name, limit seconds, test-binary arguments...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$OUT/$name.log" "$G/bin/tests/$name" --test-threads=1 "$@"
}
# Every later step on the sm_80 attention kernels, saying why in the summary.
use_sm80() {
  export FLASHJVP_ATTENTION_PATH=sm80
  echo "$1" | tee -a "$SUMMARY"
  rows+=("$1")
}
# (Its backward tests run apart, below: a new kernel that hangs there must not take the JVP's step.)
test_step gpu_attention_sm90 90 --skip backward
sm90_rc=$last_rc
if [ "$sm90_rc" = 124 ] || [ "$sm90_rc" = 137 ]; then
  # A hang: the same tests again on the kernels' diagnostic build, where a wait on an mbarrier longer
  # than 2 s prints its source line, barrier, parity, block and warp ("flashjvp sm90 watchdog" lines)
  # and traps instead of hanging.
  step sm90_watchdog 75 "$OUT/gpu_attention_sm90_watchdog.log" env FLASHJVP_SM90_WATCHDOG=2000 \
    "$G/bin/tests/gpu_attention_sm90" --test-threads=1 --skip backward
fi
if [ "$sm90_rc" = 124 ] || [ "$sm90_rc" = 137 ] || grep -qs "CUDA_ERROR" "$OUT/gpu_attention_sm90.log"; then
  use_sm80 "gpu_attention_sm90 hung or faulted (rc=$sm90_rc): every later step runs with FLASHJVP_ATTENTION_PATH=sm80"
fi
test_step gpu_ops 150
test_step gpu_dit 90
if [ "$last_rc" != 0 ] && [ "$last_rc" != skipped ] && [ "$sm90_rc" != 0 ] && [ "$sm90_rc" != skipped ] \
   && [ "${FLASHJVP_ATTENTION_PATH:-}" != sm80 ]; then
  # The Hopper kernels missed a tolerance (no hang, no fault) and the DiT failed too: the DiT once
  # more on the sm_80 attention kernels, so that its other parts (layernorm, MLP, cuBLASLt) are
  # judged apart from the attention path.
  step gpu_dit_sm80 90 "$OUT/gpu_dit_sm80.log" env FLASHJVP_ATTENTION_PATH=sm80 \
    "$G/bin/tests/gpu_dit" --test-threads=1
fi
if grep -qs "CUDA_ERROR" "$OUT/gpu_dit.log"; then
  # A fault inside the DiT's passes surfaces at a later download: once more with every step waited
  # for, so that the error names the kernel (or GEMM) that faulted.
  step gpu_dit_sync 60 "$OUT/gpu_dit_sync.log" env FLASHJVP_SYNC_STEPS=1 "$G/bin/tests/gpu_dit" --test-threads=1
fi
# The Hopper backward (attention_bwd_sm90.cu, opt-in: FLASHJVP_ATTENTION_BWD_PATH=sm90a): its own tests
# against the reference and beside the sm_80 backward, then gpu_ops' backward tests and the DiT through
# the dispatcher with it; the watchdog build after a hang. The sanitizers and the DiT bench take it too
# when these pass.
bwd90_ok=0
if [ "$DRY" = 1 ] || [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)" = "9.0" ]; then
  step bwd_sm90a 60 "$OUT/gpu_attention_bwd_sm90.log" "$G/bin/tests/gpu_attention_sm90" --test-threads=1 backward
  bwd90_rc=$last_rc
  if [ "$bwd90_rc" = 124 ] || [ "$bwd90_rc" = 137 ]; then
    step bwd_sm90a_watchdog 40 "$OUT/gpu_attention_bwd_sm90_watchdog.log" env FLASHJVP_SM90_WATCHDOG=2000 \
      "$G/bin/tests/gpu_attention_sm90" --test-threads=1 backward
  elif [ "$bwd90_rc" = 0 ]; then
    step bwd_sm90a_ops 60 "$OUT/gpu_ops_bwd_sm90.log" env FLASHJVP_ATTENTION_BWD_PATH=sm90a \
      "$G/bin/tests/gpu_ops" --test-threads=1 attention_backward
    ops_rc=$last_rc
    step bwd_sm90a_dit 90 "$OUT/gpu_dit_bwd_sm90.log" env FLASHJVP_ATTENTION_BWD_PATH=sm90a \
      "$G/bin/tests/gpu_dit" --test-threads=1
    [ "$ops_rc" = 0 ] && [ "$last_rc" = 0 ] && bwd90_ok=1
  fi
fi
[ "$bwd90_ok" = 1 ] && [ "${FLASHJVP_ATTENTION_PATH:-}" != sm80 ] && export FLASHJVP_ATTENTION_BWD_PATH=sm90a
# The Hopper kernels built with the split wgmma schedule (FLASHJVP_SM90_SCHEDULE=split, cuda/hopper.cuh
# SCHEDULE; compiled on first use): all of gpu_attention_sm90 on them; if that passes, compare.py times
# them beside the default schedule.
split_args=()
if [ "$DRY" = 1 ] || [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)" = "9.0" ]; then
  if [ "${FLASHJVP_ATTENTION_PATH:-}" != sm80 ]; then
    step sm90_split 90 "$OUT/gpu_attention_sm90_split.log" env FLASHJVP_SM90_SCHEDULE=split \
      "$G/bin/tests/gpu_attention_sm90" --test-threads=1
    [ "$last_rc" = 0 ] && split_args=(--split-schedule)
    # The JVP at d 64 and 72 on 64-key tiles (FLASHJVP_SM90_KEYS=64; the defaults are 96 and 80, and 128
    # for every forward): its JVP tests, and if they pass compare.py times it beside the default.
    step sm90_keys64 60 "$OUT/gpu_attention_sm90_keys64.log" env FLASHJVP_SM90_KEYS=64 \
      "$G/bin/tests/gpu_attention_sm90" --test-threads=1 jvp
    [ "$last_rc" = 0 ] && split_args+=(--keys64)
  fi
fi
# f16 value products (FLASHJVP_ATTENTION_VALUES=f16: bf16 JVPs with dv == d; gpu_ops and gpu_attention_sm90
# above ran their plans' own tests): on Hopper the host entry points at the aim (1.7e-3), and on any GPU
# the DiT through them.
if [ "$DRY" = 1 ] || [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)" = "9.0" ]; then
  if [ "${FLASHJVP_ATTENTION_PATH:-}" != sm80 ]; then
    step vf16_host 40 "$OUT/gpu_attention_vf16.log" env FLASHJVP_ATTENTION_VALUES=f16 \
      "$G/bin/tests/gpu_attention_sm90" --test-threads=1 host_ops packed_qkv
    # The sm_80 kernels' f16 value products, which the dispatcher gives only d 32 on Hopper.
    step vf16_sm80 40 "$OUT/gpu_ops_vf16_sm80.log" env FLASHJVP_ATTENTION_PATH=sm80 \
      "$G/bin/tests/gpu_ops" --test-threads=1 attention_jvp_f16_values
  fi
fi
step vf16_dit 60 "$OUT/gpu_dit_vf16.log" env FLASHJVP_ATTENTION_VALUES=f16 "$G/bin/tests/gpu_dit" --test-threads=1 bf16
test_step gpu_sanitize 60
for t in "$G"/bin/tests/gpu_*; do  # any other GPU test binary (gpu_plans: NVRTC only, CI runs it)
  name=$(basename "$t")
  case "$name" in gpu_attention_sm90|gpu_ops|gpu_dit|gpu_sanitize|gpu_plans) continue ;; esac
  test_step "$name" 60
done
# The layernorm kernels' other configurations (layernorm.rs: the wide JVP kernel, 8 rows per block),
# timed by compare.py, also against the reference.
step ln_variants 60 "$OUT/ln_variants.log" env FLASHJVP_LN_JVP_ROWS=wide FLASHJVP_LN_ROWS_PER_BLOCK=8 \
  "$G/bin/tests/gpu_ops" --test-threads=1 layernorm
# The pipelined layernorm JVP kernel (FLASHJVP_LN_JVP_ROWS=pipe: rows through shared memory by cp.async,
# not yet timed): its tests, then compare.py times it beside the default.
ln_args=()
step ln_pipe 40 "$OUT/ln_pipe.log" env FLASHJVP_LN_JVP_ROWS=pipe "$G/bin/tests/gpu_ops" --test-threads=1 layernorm
[ "$last_rc" = 0 ] && ln_args=(--ln-pipe)
# The MLP once more with its GELU outside cuBLASLt's epilogues (elementwise kernels after plain GEMMs):
# if the tests above fail on the MLP and these pass, cuBLASLt's GELU_AUX/DGELU differ from our contract.
step mlp_unfused 40 "$OUT/mlp_unfused.log" env FLASHJVP_GEMM_EPILOGUE=off "$G/bin/tests/gpu_ops" mlp

# ---- 3./4. compute-sanitizer on the small odd workload
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  step memcheck 100 "$OUT/sanitize.log" "$SAN" --tool memcheck --error-exitcode 1 --leak-check no \
    "$G/bin/tests/gpu_sanitize" --test-threads=1
  step racecheck 100 "$OUT/sanitize.log" "$SAN" --tool racecheck --error-exitcode 1 \
    "$G/bin/tests/gpu_sanitize" --test-threads=1 --skip mlp
else
  echo "compute-sanitizer not found" | tee -a "$OUT/sanitize.log"
  rows+=("memcheck   not run (no compute-sanitizer)")
fi

# ---- 5. benchmarks against PyTorch
# compare.py keeps its attention timings (one process per shape, sm_80 after a hang) inside its limit.
cmp_limit=$((DEADLINE - SECONDS - 15)); [ "$cmp_limit" -gt 200 ] && cmp_limit=200
dry_args=(); [ "$DRY" = 1 ] && dry_args=(--dry-run)
step compare 200 "$OUT/compare.log" python3 scripts/gpu/compare.py --bin "$G/bin/flashjvp" --json "$OUT/compare.json" \
  --time-limit-s "$cmp_limit" ${dry_args[@]+"${dry_args[@]}"} ${split_args[@]+"${split_args[@]}"} \
  ${ln_args[@]+"${ln_args[@]}"}
if grep -q "^attention bench hung" "$OUT/compare.log" && [ "${FLASHJVP_ATTENTION_PATH:-}" != sm80 ]; then
  use_sm80 "the attention bench hung on the sm_90a kernels: dit_block and ncu run with FLASHJVP_ATTENTION_PATH=sm80"
fi

# ---- 6. one DiT block (B2 N4096 C1536 12 heads; B8 N1024 C1152 16 heads) in bf16: forward, JVP,
#         backward, forward+backward against dual forward+backward, then each step of the forward and
#         the JVP timed alone (FLASHJVP_BENCH_STEPS=1: where the time goes; ~30 s; lines in compare.log)
dit_shape=(); [ "$DRY" = 1 ] && dit_shape=(--shape 1,64,128,2)
step dit_block 90 "$OUT/compare.log" env FLASHJVP_BENCH_STEPS=1 "$G/bin/flashjvp" bench dit_block --dtype bf16 \
  ${dit_shape[@]+"${dit_shape[@]}"}
if [ "${FLASHJVP_ATTENTION_BWD_PATH:-}" = sm90a ]; then
  # The block's backward on the sm_80 attention backward too, for the Hopper backward's gain.
  step dit_block_bwd80 60 "$OUT/compare.log" env -u FLASHJVP_ATTENTION_BWD_PATH "$G/bin/flashjvp" bench dit_block \
    --dtype bf16 ${dit_shape[@]+"${dit_shape[@]}"}
fi

# ---- 7. with the time left, hardware counters of the kernels the targets hang on, for tuning without
#         a GPU afterwards (ncu reads them on Firecracker machines, not on gVisor; clocks left alone):
#         one launch each of the JVP at (1,12,4096,d128) and (1,12,16384,d64), the layernorm JVP
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  ncu_step() { # name, kernel regex, bench args...
    local name=$1 kern=$2; shift 2
    step "$name" 60 "$OUT/ncu.log" "$NCU" --clock-control none -k "regex:$kern" --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section Occupancy --section SchedulerStats --section WarpStateStats --section LaunchStats \
      "$G/bin/flashjvp" bench "$@"
  }
  ncu_step ncu_jvp128 '^attention_jvp_(sm90_)?bf16_d128' attention --shape 1,12,4096,4096,128 --dtype bf16
  ncu_step ncu_jvp64 '^attention_jvp_(sm90_)?bf16_d64' attention --shape 1,12,16384,16384,64 --dtype bf16
  ncu_step ncu_ln '^layernorm_mod_jvp_bf16' layernorm_mod --shape 8192,1536,2 --dtype bf16
else
  rows+=("ncu        not run (no ncu)")
fi

# ---- 8. on Hopper, the sm_80 attention kernels under the sanitizers too (the dispatcher gives bf16/f16
#         at d64/d72/d96/d128 to the sm_90a kernels, so steps 3/4 do not reach the sm_80 ones there)
if [ -n "$SAN" ] && [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)" = "9.0" ] \
   && [ "${FLASHJVP_ATTENTION_PATH:-}" != sm80 ]; then
  step memcheck_sm80 60 "$OUT/sanitize.log" env FLASHJVP_ATTENTION_PATH=sm80 "$SAN" --tool memcheck \
    --error-exitcode 1 --leak-check no "$G/bin/tests/gpu_sanitize" --test-threads=1 attention
  step racecheck_sm80 150 "$OUT/sanitize.log" env FLASHJVP_ATTENTION_PATH=sm80 "$SAN" --tool racecheck \
    --error-exitcode 1 "$G/bin/tests/gpu_sanitize" --test-threads=1 attention
  # The f16 value products: the copies' kernels and the vf16 JVP kernels (bf16) under memcheck.
  step memcheck_vf16 60 "$OUT/sanitize.log" env FLASHJVP_ATTENTION_VALUES=f16 "$SAN" --tool memcheck \
    --error-exitcode 1 --leak-check no "$G/bin/tests/gpu_sanitize" --test-threads=1 attention
fi
# The pipelined layernorm JVP kernel (cp.async into shared memory) under both sanitizers.
if [ -n "$SAN" ]; then
  step memcheck_ln_pipe 40 "$OUT/sanitize.log" env FLASHJVP_LN_JVP_ROWS=pipe "$SAN" --tool memcheck \
    --error-exitcode 1 --leak-check no "$G/bin/tests/gpu_sanitize" --test-threads=1 layernorm
  step racecheck_ln_pipe 40 "$OUT/sanitize.log" env FLASHJVP_LN_JVP_ROWS=pipe "$SAN" --tool racecheck \
    --error-exitcode 1 "$G/bin/tests/gpu_sanitize" --test-threads=1 layernorm
fi

# ---- 9. the rCM example's GPU preset (never run on a GPU before), shortened to about a minute: the
#         teacher, one rCM student and the evaluation at 300 / 60 steps and 256 samples. rcm_gpu/results.md
#         (in logs.tar.gz) has the losses, the metrics and each phase's seconds: the cost per step on this
#         card, to size the full preset. The dry run takes the toy preset at 2 / 1 steps instead.
if [ "$DRY" = 1 ]; then
  rcm_args=(--preset toy --hidden 64 --heads 2 --patch 2 --teacher-steps 2 --student-steps 1 --eval-n 8)
else
  rcm_args=(--preset gpu --teacher-steps 300 --student-steps 60 --eval-n 256)
fi
step rcm_gpu 120 "$OUT/rcm_gpu.log" "$G/bin/examples/rcm" "${rcm_args[@]}" --device cuda --quiet \
  --out "$OUT/rcm_gpu"
rm -f "$OUT"/rcm_gpu/*.safetensors  # the weights: not worth the transfer

# ---- summary
{
  echo
  echo "=== relative errors (gpu_ops, gpu_dit and gpu_attention_sm90 ERR lines): worst 15 by error / tolerance"
  python3 - "$OUT/gpu_ops.log" "$OUT/gpu_dit.log" "$OUT/gpu_attention_sm90.log" "$OUT/gpu_attention_sm90_watchdog.log" \
    "$OUT/gpu_attention_bwd_sm90.log" "$OUT/gpu_attention_bwd_sm90_watchdog.log" "$OUT/gpu_ops_bwd_sm90.log" \
    "$OUT/gpu_dit_bwd_sm90.log" "$OUT/gpu_attention_sm90_split.log" "$OUT/gpu_attention_sm90_keys64.log" <<'PY'
import re, sys
rows = []
text = ""
for path in sys.argv[1:]:
    try:
        text += open(path, errors="replace").read()
    except OSError:
        pass
for m in re.finditer(r"^ERR (.*?): rel ([0-9.e+-]+) \(tol ([0-9.e+-]+)\)(.*)$", text, re.M):
    rows.append((float(m.group(2)) / float(m.group(3)), m.group(0)))
nonfinite = re.findall(r"^ERR .*non-finite.*$", text, re.M)
print(f"{len(rows)} errors measured, {sum(1 for r in rows if 'FAIL' in r[1])} over tolerance, {len(nonfinite)} with non-finite output")
for line in nonfinite[:10]:
    print(line)
for _, line in sorted(rows, reverse=True)[:15]:
    print(line)
for line in re.findall(r"^(?:MAX|PROBE) .*$", text, re.M):
    print(line)
watchdog = re.findall(r"^flashjvp sm90 watchdog: .*$", text, re.M)
if watchdog:
    print(f"{len(watchdog)} sm90 watchdog reports (where the Hopper kernels hung; the first 10):")
    for line in watchdog[:10]:
        print(line)
PY
  echo
  echo "=== test results"
  for f in "$OUT"/gpu_*.log; do
    [ -f "$f" ] && echo "$(basename "$f" .log): $(grep -h '^test result:' "$f" | tail -1)"
  done
  echo "failed tests (first 30):"
  grep -h ' \.\.\. FAILED$' "$OUT"/gpu_*.log 2>/dev/null | head -30
  echo
  echo "=== sanitizer verdicts"
  grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY|Error: ' "$OUT/sanitize.log" 2>/dev/null | head -20
  echo
  echo "=== steps"
  printf '%s\n' "${rows[@]}"
} | tee -a "$SUMMARY"

# ---- the device tool brings back at most 8 files: every log in one archive, the summary and the
#      benchmark's table and JSON beside it
(cd "$OUT" && logs=$(ls | grep -vxE 'summary\.txt|compare\.log|compare\.json|logs\.tar\.gz') \
  && [ -n "$logs" ] && tar czf logs.tar.gz $logs && rm -rf $logs)
ls -l "$OUT"
