// attention_jvp.cu: the fused attention JVP, its constant-K/V variant and the primal forward for
// v of the head dim of q and k (dv == d), d in {32, 64, 72, 96, 128}: 45 kernels. The kernels, their
// tiling, launch shapes, shared memory and limits are described in attention_jvp.cuh; dv != d is
// instantiated in attention_jvp_dv.cu (a separate file so that the common case compiles alone).
#include "common.cuh"
#include "attention_jvp.cuh"

FJ_ATTN_SAME(32)
FJ_ATTN_SAME(64)
FJ_ATTN_SAME(72)
FJ_ATTN_SAME(96)
FJ_ATTN_SAME(128)
