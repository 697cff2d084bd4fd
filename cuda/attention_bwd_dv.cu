// attention_bwd_dv.cu: dK/dV and dQ of attention_bwd.cuh for a v head dim dv different from the head
// dim d of q and k: every ordered pair of distinct d, dv in {32, 64, 72, 96, 128} (20 pairs x 2
// kernels x 3 dtypes = 120 kernels, named `..._d{D}_dv{DV}`; the preprocess kernel, which takes dv at
// run time, is attention_bwd.cu's).
#include "common.cuh"
#include "attention_bwd.cuh"
#include "attention_bwd_tc.cuh"

FJ_ATTN_BWD_PAIR(32, 64)
FJ_ATTN_BWD_PAIR(32, 72)
FJ_ATTN_BWD_PAIR(32, 96)
FJ_ATTN_BWD_PAIR(32, 128)
FJ_ATTN_BWD_PAIR(64, 32)
FJ_ATTN_BWD_PAIR(64, 72)
FJ_ATTN_BWD_PAIR(64, 96)
FJ_ATTN_BWD_PAIR(64, 128)
FJ_ATTN_BWD_PAIR(72, 32)
FJ_ATTN_BWD_PAIR(72, 64)
FJ_ATTN_BWD_PAIR(72, 96)
FJ_ATTN_BWD_PAIR(72, 128)
FJ_ATTN_BWD_PAIR(96, 32)
FJ_ATTN_BWD_PAIR(96, 64)
FJ_ATTN_BWD_PAIR(96, 72)
FJ_ATTN_BWD_PAIR(96, 128)
FJ_ATTN_BWD_PAIR(128, 32)
FJ_ATTN_BWD_PAIR(128, 64)
FJ_ATTN_BWD_PAIR(128, 72)
FJ_ATTN_BWD_PAIR(128, 96)
