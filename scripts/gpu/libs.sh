# Sourced by check.sh and quick.sh on the GPU machine: the directories of pip's CUDA wheels (PyTorch's) that
# hold NVRTC and cuBLAS(Lt), appended to LD_LIBRARY_PATH after the system's; $extra names them.
extra=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for lib in ("libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13"):
        for p in glob.glob(os.path.join(sp, "nvidia", "**", lib), recursive=True):
            dirs.add(os.path.dirname(p))
print(":".join(sorted(dirs)))
PY
)
if [ -n "$extra" ]; then
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$extra"
fi
