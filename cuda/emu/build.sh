#!/usr/bin/env bash
# Builds the host emulator of flashjvp's CUDA kernels: OUT_DIR/libfjemu.so (README.md in this folder).
#
#   bash cuda/emu/build.sh OUT_DIR              the library (quiet on success; the compiler's
#                                               message and a non-zero exit on failure)
#   bash cuda/emu/build.sh --selftest OUT_DIR   the library, then cuda/emu/selftest.cpp linked against
#                                               it, run (prints its report; non-zero exit on failure)
#
# Environment: CXX (default c++), FJ_EMU_JOBS (parallel compiles, default 2), FJ_EMU_OPT (optimisation
# of the kernel files, default -O1; the runtime is always -O2), FJ_EMU_CXXFLAGS (extra flags for every
# compile, e.g. -DFJ_EMU_UCONTEXT to use the ucontext fiber switch on x86-64 too).
# Run from anywhere; the repository root is found from this script's location.
set -u -o pipefail

selftest=0
if [ "${1:-}" = "--selftest" ]; then
    selftest=1
    shift
fi
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash cuda/emu/build.sh [--selftest] OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 1
OUT=$(cd "$1" && pwd) || exit 1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd) || exit 1
cd "$ROOT" || exit 1

CXX=${CXX:-c++}
JOBS=${FJ_EMU_JOBS:-2}
OPT=${FJ_EMU_OPT:--O1}
KERNELS="attention_jvp_sm90 attention_bwd_sm90 attention_jvp_dv attention_bwd_dv attention_jvp attention_bwd elementwise layernorm_mod rmsnorm rope dit bench"
# The runtime includes fj_emu.h itself, after the system headers; the kernel files get it forced in first.
COMMON=(-std=c++17 -fPIC -pthread -DFJ_HOST_EMU -I cuda -fno-strict-aliasing -fvisibility=hidden ${FJ_EMU_CXXFLAGS:-})
OBJ="$OUT/obj"
mkdir -p "$OBJ" || exit 1

# One compile per line (the largest files first, so that the two jobs end close together).
jobs_file="$OBJ/jobs.txt"
: >"$jobs_file"
for f in $KERNELS; do
    printf '%s\n' "$f" >>"$jobs_file"
done
printf '%s\n' "runtime" >>"$jobs_file"

export CXX OPT OBJ
export COMMON_STR="${COMMON[*]}"

# xargs runs the compiles JOBS at a time; each writes its log and exit status.
rm -f "$OBJ"/*.rc
xargs -P "$JOBS" -n 1 bash -c '
    COMMON=($COMMON_STR)
    name=$1
    log="$OBJ/$name.log"
    if [ "$name" = runtime ]; then
        $CXX "${COMMON[@]}" -O2 -c cuda/emu/runtime.cpp -o "$OBJ/$name.o" >"$log" 2>&1
    else
        $CXX "${COMMON[@]}" $OPT -include cuda/emu/fj_emu.h -x c++ -c "cuda/$name.cu" -o "$OBJ/$name.o" >"$log" 2>&1
    fi
    echo $? >"$OBJ/$name.rc"
' fj_emu_compile <"$jobs_file"

failed=0
objs=()
while read -r name; do
    rc=$(cat "$OBJ/$name.rc" 2>/dev/null || echo 1)
    if [ "$rc" != 0 ]; then
        echo "fj_emu build: compiling $name failed:" >&2
        cat "$OBJ/$name.log" >&2
        failed=1
    fi
    objs+=("$OBJ/$name.o")
done <"$jobs_file"
[ $failed = 0 ] || exit 1

if ! $CXX -shared -pthread -o "$OUT/libfjemu.so.tmp" "${objs[@]}" >"$OBJ/link.log" 2>&1; then
    echo "fj_emu build: linking libfjemu.so failed:" >&2
    cat "$OBJ/link.log" >&2
    exit 1
fi
mv -f "$OUT/libfjemu.so.tmp" "$OUT/libfjemu.so" || exit 1

if [ $selftest = 1 ]; then
    # Mutants of attention_jvp.cuh, one bug each (selftest.cpp section 5 expects all to be caught).
    MUT="$OBJ/mut"
    mkdir -p "$MUT" || exit 1
    src=cuda/attention_jvp.cuh
    mutations=(
        '/fj_cp_async_wait<1>();  \/\/ everything but the prefetch/{n;s/__syncthreads();/\/* mutant: barrier removed *\//;}'
        's/fj_cp_async_wait<1>();  \/\/ everything but the prefetch.*/fj_cp_async_wait<2>();  \/\/ mutant/'
        's/__syncthreads();  \/\/ stage j&1 is refilled.*/\/* mutant: barrier removed *\//'
        's/fj_mma16816<F16>(s\[2 \* n2\], a, b\[0\], b\[1\]);/fj_mma16816<F16>(s[2 * n2], a, b[1], b[0]);/'
        's/(e & 1) >= Nk) {/(e \& 1) > Nk) {/'
        's/const int k_off = ((lane & 7) + (lane >> 4) \* 8) \* SS + ((lane >> 3) & 1) \* 8;/const int k_off = ((lane \& 7) + ((lane >> 3) \& 1) * 8) * SS + (lane >> 4) * 8;/'
        's/__syncthreads();  \/\/ previous tile fully consumed.*/\/* mutant: barrier removed *\//'
    )
    f32_of=(0 0 0 0 0 0 1)
    mut_objs=()
    pids=()
    for i in "${!mutations[@]}"; do
        n=$((i + 1))
        sed -e "${mutations[$i]}" "$src" >"$MUT/mut$n.cuh" || exit 1
        if cmp -s "$src" "$MUT/mut$n.cuh"; then
            echo "fj_emu build: selftest mutation $n no longer changes $src (update it in build.sh)" >&2
            exit 1
        fi
        $CXX "${COMMON[@]}" $OPT -include cuda/emu/fj_emu.h -I "$MUT" -DFJ_MUT_HEADER="\"mut$n.cuh\"" \
            -DFJ_MUT_NS=fj_attn_mut$n -DFJ_MUT_NAME=selftest_mut$n -DFJ_MUT_F32=${f32_of[$i]} \
            -c cuda/emu/selftest_mutant.cpp -o "$MUT/mut$n.o" >"$MUT/mut$n.log" 2>&1 &
        pids+=($!)
        mut_objs+=("$MUT/mut$n.o")
    done
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            echo "fj_emu build: compiling selftest mutant $((i + 1)) failed:" >&2
            cat "$MUT/mut$((i + 1)).log" >&2
            exit 1
        fi
    done
    if ! $CXX -std=c++17 -O1 -pthread -DFJ_HOST_EMU -I cuda -fno-strict-aliasing ${FJ_EMU_CXXFLAGS:-} \
        cuda/emu/selftest.cpp "${mut_objs[@]}" -o "$OUT/fjemu_selftest" -L"$OUT" -lfjemu -Wl,-rpath,"$OUT" \
        >"$OBJ/selftest.log" 2>&1; then
        echo "fj_emu build: compiling the selftest failed:" >&2
        cat "$OBJ/selftest.log" >&2
        exit 1
    fi
    "$OUT/fjemu_selftest"
    exit $?
fi
exit 0
