/*
 * simd_avx2.h - the small AVX2 helpers the engine's SIMD files share.
 *
 * Why this file exists: quant_avx2.c, kvcache_avx2.c and gemm.c each need
 * a horizontal sum; one copy here keeps their results identical.
 */
#ifndef KVQ_SIMD_AVX2_H
#define KVQ_SIMD_AVX2_H

#include "config.h"

#ifdef KVQ_HAVE_X86
#include <immintrin.h>

/* Sum of the 8 lanes of @v. */
__attribute__((target("avx2,fma,f16c")))
static inline float kvq_hsum8(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v),
			      _mm256_extractf128_ps(v, 1));

	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}
#endif

#endif /* KVQ_SIMD_AVX2_H */
