#!/usr/bin/env bash
# Builds the host emulator of flashjvp's CUDA kernels: OUT_DIR/libfjemu.so (README.md in this folder).
#
#   bash cuda/emu/build.sh OUT_DIR              the library (quiet on success; the compiler's
#                                               message and a non-zero exit on failure)
#   bash cuda/emu/build.sh --selftest OUT_DIR   the library, then cuda/emu/selftest.cpp linked against
#                                               it, run (prints its report; non-zero exit on failure)
#
# Environment: CXX (default c++), FJ_EMU_JOBS (parallel compiles, default 2), FJ_EMU_OPT (optimisation
# of the kernel files, default -O1; the runtime is always -O2).
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
KERNELS="attention_jvp_dv attention_bwd_dv attention_jvp attention_bwd elementwise layernorm_mod dit"
# The runtime includes fj_emu.h itself, after the system headers; the kernel files get it forced in first.
COMMON=(-std=c++17 -fPIC -pthread -DFJ_HOST_EMU -I cuda -fno-strict-aliasing -fvisibility=hidden)
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
    if ! $CXX -std=c++17 -O1 -pthread -DFJ_HOST_EMU -I cuda -fno-strict-aliasing \
        cuda/emu/selftest.cpp -o "$OUT/fjemu_selftest" -L"$OUT" -lfjemu -Wl,-rpath,"$OUT" \
        >"$OBJ/selftest.log" 2>&1; then
        echo "fj_emu build: compiling the selftest failed:" >&2
        cat "$OBJ/selftest.log" >&2
        exit 1
    fi
    "$OUT/fjemu_selftest"
    exit $?
fi
exit 0
