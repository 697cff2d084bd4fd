// selftest_mutant.cpp: the JVP d72 kernel of a mutated copy of attention_jvp.cuh, for section 5 of
// selftest.cpp. build.sh --selftest writes each mutated header (one bug each) and compiles this file once
// per mutant with -DFJ_MUT_HEADER='"mutN.cuh"' -DFJ_MUT_NS=fj_attn_mutN -DFJ_MUT_NAME=selftest_mutN
// -DFJ_MUT_F32=0|1 (fj_emu.h force-included, as for the kernel files). The namespace is renamed so that
// the mutated templates never meet the library's.
#include "common.cuh"
#define fj_attn FJ_MUT_NS
#include FJ_MUT_HEADER

#define FJ_MUT_REGISTER(n) FJ_REGISTER(n)
#if FJ_MUT_F32
extern "C" __global__ void FJ_MUT_NAME(const float* q, const float* k, const float* v, const float* tq, const float* tk,
                                       const float* tv, float* o, float* to, float* lse, float* tlse, int Nq, int Nk,
                                       float scale, FJ_ATTN_LAYOUT) {
    fj_attn::attn_f32<72, 72, fj_attn::FULL>(q, k, v, tq, tk, tv, o, to, lse, tlse, Nq, Nk, scale, FJ_ATTN_LAYOUT_ARGS);
}
#else
extern "C" __global__ void FJ_MUT_NAME(const fj_u16* q, const fj_u16* k, const fj_u16* v, const fj_u16* tq,
                                       const fj_u16* tk, const fj_u16* tv, fj_u16* o, fj_u16* to, float* lse,
                                       float* tlse, int Nq, int Nk, float scale, FJ_ATTN_LAYOUT) {
    fj_attn::attn_tc<FjBF16, 72, 72, fj_attn::FULL>(q, k, v, tq, tk, tv, o, to, lse, tlse, Nq, Nk, scale,
                                                    FJ_ATTN_LAYOUT_ARGS);
}
#endif
FJ_MUT_REGISTER(FJ_MUT_NAME)
