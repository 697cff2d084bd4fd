#!/usr/bin/env python3
"""Compile every flashjvp kernel with NVRTC (no CUDA toolkit, no GPU needed) and report resources.

For each cuda/*.cu file and each target (sm_80, sm_90a; files named *_sm90.cu for sm_90a only) this
creates an NVRTC program with every cuda/*.cuh handed over as a header by name, compiles it down to a
CUBIN with the assembler's
verbose report, and prints, per kernel and arch: registers, spill bytes (stores + loads), stack
frame, static shared memory.

Exit status is non-zero when any compile fails, when no CUBIN comes back, or when an attention
kernel (any kernel whose name starts with "attention_") spills at all.

Usage: python3 cuda/nvrtc_check.py [--arch sm_80 --arch sm_90a] [--quiet] [file.cu ...]
NVRTC library: $NVRTC_LIB, default /opt/nvrtc/nvidia/cu13/lib/libnvrtc.so.13.
"""
import argparse
import ctypes
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_LIB = "/opt/nvrtc/nvidia/cu13/lib/libnvrtc.so.13"
HEADERS = sorted(f for f in os.listdir(HERE) if f.endswith(".cuh"))  # every header, by name


def load_nvrtc():
    path = os.environ.get("NVRTC_LIB", DEFAULT_LIB)
    # NVRTC dlopens libnvrtc-builtins at compile time; load it from beside libnvrtc first so that no
    # LD_LIBRARY_PATH is needed.
    libdir = os.path.dirname(path)
    if libdir and os.path.isdir(libdir):
        for f in sorted(os.listdir(libdir)):
            if f.startswith("libnvrtc-builtins.so"):
                ctypes.CDLL(os.path.join(libdir, f), mode=ctypes.RTLD_GLOBAL)
                break
    lib = ctypes.CDLL(path)
    p = ctypes.c_void_p
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcCompileProgram.argtypes = [p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcGetProgramLogSize.argtypes = [p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetProgramLog.argtypes = [p, ctypes.c_char_p]
    lib.nvrtcGetCUBINSize.argtypes = [p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetCUBIN.argtypes = [p, ctypes.c_char_p]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(p)]
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    return lib


def compile_one(lib, src_path, arch):
    """Returns (ok, log, cubin_size)."""
    with open(src_path, "rb") as f:
        src = f.read()
    names = [h.encode() for h in HEADERS]
    bodies = []
    for h in HEADERS:
        with open(os.path.join(HERE, h), "rb") as f:
            bodies.append(f.read())
    hdr_arr = (ctypes.c_char_p * len(bodies))(*bodies)
    name_arr = (ctypes.c_char_p * len(names))(*names)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(src_path).encode(), len(bodies),
                                hdr_arr, name_arr)
    if rc != 0:
        return False, "nvrtcCreateProgram: " + lib.nvrtcGetErrorString(rc).decode(), 0
    opts = [f"--gpu-architecture={arch}", "-default-device", "--std=c++17", "-lineinfo",
            "--ptxas-options=-v", "--ptxas-options=-warn-spills", "--ptxas-options=-warn-lmem-usage"]
    opt_arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), opt_arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, buf)
    log = buf.value.decode(errors="replace")
    cubin_size = 0
    if rc == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        cubin_size = n.value
        if cubin_size:
            cb = ctypes.create_string_buffer(cubin_size)
            lib.nvrtcGetCUBIN(prog, cb)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if rc != 0:
        return False, "nvrtcCompileProgram: " + lib.nvrtcGetErrorString(rc).decode() + "\n" + log, 0
    return cubin_size > 0, log, cubin_size


ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def parse_report(log):
    """Kernel name -> dict(regs, spill_st, spill_ld, stack, smem), from the ptxas -v lines."""
    out = {}
    cur = None
    for line in log.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, dict(regs=None, spill_st=0, spill_ld=0, stack=0, smem=0))
            continue
        m = PROPS.search(line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, dict(regs=None, spill_st=0, spill_ld=0, stack=0, smem=0))
            continue
        if cur is None:
            continue
        m = FRAME.search(line)
        if m:
            out[cur]["stack"] = int(m.group(1))
            out[cur]["spill_st"] = int(m.group(2))
            out[cur]["spill_ld"] = int(m.group(3))
        m = USED.search(line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            s = SMEM.search(line)
            out[cur]["smem"] = int(s.group(1)) if s else 0
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--arch", action="append")
    ap.add_argument("--quiet", action="store_true", help="no per-kernel lines, only failures and summary")
    ap.add_argument("--markdown", action="store_true", help="print the resource table as markdown")
    args = ap.parse_args()
    archs = args.arch or ["sm_80", "sm_90a"]
    files = args.files or sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".cu"))
    lib = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value}")

    failures = []
    rows = []
    for path in files:
        for arch in archs:
            name = os.path.basename(path)
            if name.endswith("_sm90.cu") and not arch.endswith("_90a"):
                print(f"skip {name} [{arch}]: built for sm_90a only (wgmma, setmaxnreg)")
                continue
            ok, log, size = compile_one(lib, path, arch)
            if not ok:
                failures.append(f"{name} [{arch}]: compile failed")
                print(f"FAIL {name} [{arch}]\n{log}")
                continue
            warn = [l for l in log.splitlines() if "warning" in l.lower()]
            for w in warn:
                print(f"WARN {name} [{arch}]: {w}")
            rep = parse_report(log)
            if not rep:
                failures.append(f"{name} [{arch}]: no ptxas report in the log")
            for kern in sorted(rep):
                r = rep[kern]
                spill = r["spill_st"] + r["spill_ld"]
                rows.append((kern, arch, r["regs"], r["spill_st"], r["spill_ld"], r["stack"], r["smem"], name))
                bad = kern.startswith("attention_") and (spill > 0 or r["stack"] > 0)
                if bad:
                    failures.append(f"{kern} [{arch}]: spills {r['spill_st']}+{r['spill_ld']} bytes, stack {r['stack']}")
                if not args.quiet and not args.markdown:
                    flag = "SPILL" if bad else "ok"
                    print(f"{flag:5} {arch:7} {kern:40} regs {r['regs']:>3}  spill {r['spill_st']}+{r['spill_ld']}"
                          f"  stack {r['stack']}  smem {r['smem']}")
            print(f"compiled {name} [{arch}]: cubin {size} bytes, {len(rep)} kernels")
    if args.markdown:
        # one row per kernel, one column group per arch: regs / spill stores+loads / stack / static smem
        by_kernel = {}
        for k, a, rg, st, ld, stk, sm, f in rows:
            by_kernel.setdefault((f, k), {})[a] = f"{rg} / {st}+{ld} / {stk} / {sm}"
        print("| file | kernel | " + " | ".join(f"{a}: regs / spill / stack / smem" for a in archs) + " |")
        print("|---|---|" + "---|" * len(archs))
        for (f, k) in sorted(by_kernel):
            cells = [by_kernel[(f, k)].get(a, "-") for a in archs]
            print(f"| {f} | {k} | " + " | ".join(cells) + " |")
    if failures:
        print("\nFAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    print(f"\nall ok: {len(rows)} kernel builds, no attention spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
