// attention_bwd.cu: backward of the primal attention (preprocess, dK/dV, dQ) for v of the head dim of
// q and k (dv == d), d in {32, 64, 72, 96, 128}: 33 kernels. The kernels, launch shapes, shared memory
// and limits are described in attention_bwd.cuh; dv != d is instantiated in attention_bwd_dv.cu.
#include "common.cuh"
#include "attention_bwd.cuh"
#include "attention_bwd_tc.cuh"

FJ_FOR_EACH_DTYPE(FJ_ATTN_BWD_PRE)
FJ_ATTN_BWD_SAME(32)
FJ_ATTN_BWD_SAME(64)
FJ_ATTN_BWD_SAME(72)
FJ_ATTN_BWD_SAME(96)
FJ_ATTN_BWD_SAME(128)
