#!/usr/bin/env python3
"""Count the SASS instructions of an attention kernel's steady key-tile loop (no GPU needed).

Without a GPU, the instructions a warp issues per key tile are the best measure of a softmax's cost:
on Hopper the two consumer warps of an SM sub-partition share one issue slot per cycle, against the
tensor cycles of the tile's products. This compiles one kernel file with NVRTC (as nvrtc_check.py
does), disassembles the cubin with nvdisasm, and for each named kernel finds the steady loop (the
backward branch whose body holds the most HGMMA/HMMA and no EXIT), leaves out the key-tail block (a
forward branch over code that sets -INF and holds no MUFU or matrix instruction: only the last tile
runs it), and prints the instruction count and mix. When the loop holds a vote-guarded if/else (the
softmax's rescale, SOFTMAX ARITHMETIC in attention_jvp_sm90.cu), it also prints the count on each arm.

Usage:
  python3 cuda/sass_loop.py [--arch sm_90a] FILE.cu KERNEL [KERNEL ...]
NVRTC library: $NVRTC_LIB (as nvrtc_check.py). nvdisasm: $NVDISASM, else on PATH; PyPI has it:
  python3 -m pip install --no-deps --target target/nvrtc nvidia-cuda-nvdisasm
  (then NVDISASM=target/nvrtc/nvidia/cu13/bin/nvdisasm). The counts in cuda/README.md came from
  NVRTC 13.0.88 and nvdisasm 13.5.37.
"""
import argparse
import collections
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvrtc_check  # noqa: E402

INSTR = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


def cubin_of(lib, path, arch):
    with open(path, "rb") as f:
        src = f.read()
    bodies = []
    for h in nvrtc_check.HEADERS:
        with open(os.path.join(nvrtc_check.HERE, h), "rb") as f:
            bodies.append(f.read())
    names = [h.encode() for h in nvrtc_check.HEADERS]
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), len(bodies),
                           (ctypes.c_char_p * len(bodies))(*bodies), (ctypes.c_char_p * len(names))(*names))
    opts = [f"--gpu-architecture={arch}", "-default-device", "--std=c++17", "-lineinfo"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts]))
    if rc != 0:
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, log)
        sys.exit(f"{path} [{arch}]: NVRTC failed:\n{log.value.decode(errors='replace')}")
    n = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw


def kernel_lines(sass, kernel):
    start = sass.find(f"\n.text.{kernel}:")
    if start < 0:
        sys.exit(f"kernel {kernel} not in the cubin")
    end = sass.find("\n.text.", start + 1)
    return sass[start:end if end > 0 else len(sass)].split("\n")


def steady_loop(lines):
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := LABEL.match(l))}
    best = None
    for i, l in enumerate(lines):
        m = BRANCH.search(l)
        if not m or labels.get(m.group(1), i) >= i:
            continue
        a = labels[m.group(1)]
        body = lines[a:i + 1]
        if any(" EXIT" in x for x in body):
            continue
        mma = sum(("HGMMA" in x or "HMMA" in x) for x in body)
        if mma and (best is None or mma > best[0]):
            best = (mma, a, i)
    if best is None:
        sys.exit("no loop with matrix instructions found")
    return labels, best


def count(lines, lo, hi, skip):
    c = collections.Counter()
    for i in range(lo, hi + 1):
        if i in skip:
            continue
        m = INSTR.match(lines[i])
        if m:
            c[m.group(2)] += 1
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("file")
    ap.add_argument("kernels", nargs="+")
    args = ap.parse_args()
    nvdisasm = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not nvdisasm:
        sys.exit("nvdisasm not found: set NVDISASM (see the header for the PyPI package)")
    cubin = cubin_of(nvrtc_check.load_nvrtc(), args.file, args.arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], check=True, capture_output=True, text=True).stdout
    for kernel in args.kernels:
        lines = kernel_lines(sass, kernel)
        labels, (mma, lo, hi) = steady_loop(lines)
        skip, arms = set(), None
        for i in range(lo, hi):
            m = BRANCH.search(lines[i])
            if not m or not (i < labels.get(m.group(1), -1) <= hi):
                continue
            target = labels[m.group(1)]
            block = lines[i + 1:target]
            if any("-INF" in x for x in block) and not any(("MUFU" in x or "MMA" in x) for x in block):
                skip.update(range(i + 1, target))  # the key tail: last tile only
        total = count(lines, lo, hi, skip)
        n = sum(total.values())
        # A vote-guarded if/else: "@P BRA else; <then>; BRA end; else: <else>; end:".
        vote = next((i for i in range(lo, hi) if " VOTE.ANY" in lines[i]), None)
        if vote is not None:
            for i in range(vote, hi):
                m = BRANCH.search(lines[i])
                if m and "@" in lines[i] and labels.get(m.group(1), -1) > i:
                    els = labels[m.group(1)]
                    j = els - 1
                    while j > i and not INSTR.match(lines[j]):
                        j -= 1
                    e = BRANCH.search(lines[j])
                    if e and "@" not in lines[j] and labels.get(e.group(1), -1) > els:
                        then_n = sum(1 for k in range(i + 1, j + 1) if INSTR.match(lines[k]))
                        else_n = sum(1 for k in range(els, labels[e.group(1)]) if INSTR.match(lines[k]))
                        arms = (n - else_n, n - then_n)
                        break
        print(f"{kernel} [{args.arch}]: steady loop {n} instructions, {mma} matrix instructions"
              f"{f' (key-tail block of {len(skip)} lines left out)' if skip else ''}")
        if arms:
            print(f"  on the vote-guarded arms: {arms[0]} (first arm) / {arms[1]} (second arm)")
        print("  " + "  ".join(f"{k} {v}" for k, v in total.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
