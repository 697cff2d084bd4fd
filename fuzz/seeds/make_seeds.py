"""Writes small valid safetensors inputs for each op of the CLI contract, the seed corpus of the
safetensors_input fuzz target (run: python3 make_seeds.py; the outputs are committed)."""
import json
import random
import struct

DTYPES = {"F32": ("<f", 4), "F64": ("<d", 8), "BF16": (None, 2)}


def encode(values, dtype):
    fmt, _ = DTYPES[dtype]
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in values)
    return b"".join(struct.pack(fmt, v) for v in values)


def write(path, tensors, dtype, fixed=None):
    """Random normal values, except the tensors named in `fixed` (name -> list of values)."""
    header, data = {}, b""
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        values = (fixed or {}).get(name) or [random.gauss(0, 1) for _ in range(n)]
        raw = encode(values, dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


random.seed(1)
B, H, NQ, NK, D, DV, T, C, HD = 1, 2, 3, 4, 2, 3, 2, 3, 4
attention = [("q", [B, H, NQ, D]), ("k", [B, H, NK, D]), ("v", [B, H, NK, DV]), ("tq", [B, H, NQ, D]),
             ("tk", [B, H, NK, D]), ("tv", [B, H, NK, DV]), ("go", [B, H, NQ, DV]), ("scale", [])]
layernorm = [("x", [T, C]), ("tx", [T, C]), ("scale", [C]), ("shift", [T, C]), ("tscale", [C]),
             ("tshift", [T, C]), ("gy", [T, C]), ("eps", [1])]
mlp = [("x", [T, C]), ("tx", [T, C]), ("w1", [HD, C]), ("b1", [HD]), ("w2", [C, HD]), ("b2", [C]),
       ("gy", [T, C])]
for dtype in DTYPES:
    write(f"safetensors_input/attention_{dtype.lower()}", attention, dtype)
    write(f"safetensors_input/layernorm_mod_{dtype.lower()}", layernorm, dtype)
    write(f"safetensors_input/mlp_{dtype.lower()}", mlp, dtype)
# Padded keys: batch 2, entry 0 attends to 2 of its 4 keys, entry 1 to all 4.
keyed = [(n, [2] + s[1:] if s else s) for n, s in attention] + [("key_lens", [2])]
write("safetensors_input/attention_key_lens_f32", keyed, "F32", {"key_lens": [2.0, 4.0]})
# RMSNorm and rotary embeddings (rope with per-batch tables and the rotate-half pairing).
rms = [("x", [T, C]), ("tx", [T, C]), ("w", [C]), ("tw", [C]), ("gy", [T, C]), ("eps", [])]
rope = [("x", [2, 3, H, 4]), ("tx", [2, 3, H, 4]), ("cos", [2, 3, 2]), ("sin", [2, 3, 2]),
        ("gy", [2, 3, H, 4]), ("halves", [1])]
for dtype in DTYPES:
    write(f"safetensors_input/rms_norm_{dtype.lower()}", rms, dtype)
    write(f"safetensors_input/rope_{dtype.lower()}", rope, dtype, {"halves": [1.0]})
