// attention_jvp_dv.cu: the kernels of attention_jvp.cuh for a v head dim dv different from the head
// dim d of q and k: every ordered pair of distinct d, dv in {32, 64, 72, 96, 128} (20 pairs x 3
// variants x 3 dtypes = 180 kernels, named `..._d{D}_dv{DV}`). Kept apart from attention_jvp.cu so
// that a program using dv == d only never compiles these (NVRTC compiles a whole file on first use).
#include "common.cuh"
#include "attention_jvp.cuh"

FJ_ATTN_PAIR(32, 64)
FJ_ATTN_PAIR(32, 72)
FJ_ATTN_PAIR(32, 96)
FJ_ATTN_PAIR(32, 128)
FJ_ATTN_PAIR(64, 32)
FJ_ATTN_PAIR(64, 72)
FJ_ATTN_PAIR(64, 96)
FJ_ATTN_PAIR(64, 128)
FJ_ATTN_PAIR(72, 32)
FJ_ATTN_PAIR(72, 64)
FJ_ATTN_PAIR(72, 96)
FJ_ATTN_PAIR(72, 128)
FJ_ATTN_PAIR(96, 32)
FJ_ATTN_PAIR(96, 64)
FJ_ATTN_PAIR(96, 72)
FJ_ATTN_PAIR(96, 128)
FJ_ATTN_PAIR(128, 32)
FJ_ATTN_PAIR(128, 64)
FJ_ATTN_PAIR(128, 72)
FJ_ATTN_PAIR(128, 96)
