/*
 * dequant_avx2.c - AVX2 row dequantization for the common weight types.
 *
 * Why this file exists: prompt processing (and batches of many sequences)
 * dequantizes every weight row once per step before the f32 GEMM; done one
 * element at a time that costs as much as the GEMM itself.  These versions
 * produce bit for bit what the reference dequantizers in quant.c produce:
 * the same single conversion or multiply per element.
 */
#include "config.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/quant.h"
#include "engine/quant_impl.h"

#ifdef KVQ_HAVE_X86
#include <immintrin.h>

__attribute__((target("avx2,fma,f16c")))
static void deq_f16(const uint16_t *h, float *dst, int64_t n)
{
	int64_t i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
					  (const __m128i *)(h + i))));
	for (; i < n; i++)
		dst[i] = kvq_f16_to_f32(h[i]);
}

__attribute__((target("avx2,fma,f16c")))
static void deq_bf16(const uint16_t *h, float *dst, int64_t n)
{
	int64_t i = 0;

	for (; i + 8 <= n; i += 8) {
		__m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(
			(const __m128i *)(h + i)));

		_mm256_storeu_ps(dst + i, _mm256_castsi256_ps(
					 _mm256_slli_epi32(v, 16)));
	}
	for (; i < n; i++)
		dst[i] = kvq_bf16_to_f32(h[i]);
}

__attribute__((target("avx2,fma,f16c")))
static void deq_q8_0(const struct kvq_block_q8_0 *b, float *dst, int64_t nb)
{
	for (int64_t i = 0; i < nb; i++, b++, dst += KVQ_QK8_0) {
		__m256 d = _mm256_set1_ps(kvq_f16_to_f32(b->d));
		int k;

		for (k = 0; k < KVQ_QK8_0; k += 8) {
			__m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
				(const __m128i *)(b->qs + k)));

			_mm256_storeu_ps(dst + k, _mm256_mul_ps(
					 _mm256_cvtepi32_ps(q), d));
		}
	}
}

__attribute__((target("avx2,fma,f16c")))
static void deq_q4_0(const struct kvq_block_q4_0 *b, float *dst, int64_t nb)
{
	const __m128i m4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);

	for (int64_t i = 0; i < nb; i++, b++, dst += KVQ_QK4_0) {
		__m256 d = _mm256_set1_ps(kvq_f16_to_f32(b->d));
		__m128i raw = _mm_loadu_si128((const __m128i *)b->qs);
		/* elements 0..15: low nibbles, 16..31: high nibbles */
		__m128i lo = _mm_sub_epi8(_mm_and_si128(raw, m4), eight);
		__m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4),
							m4), eight);
		__m128i parts[4] = { lo, _mm_srli_si128(lo, 8), hi,
				     _mm_srli_si128(hi, 8) };
		int k;

		for (k = 0; k < 4; k++)
			_mm256_storeu_ps(dst + 8 * k, _mm256_mul_ps(
				_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k])),
				d));
	}
}

bool kvq_dequant_row_avx2(uint32_t type, const void *src, float *dst,
			  int64_t n)
{
	if (!kvq_quant_simd())
		return false;
	switch (type) {
	case KVQ_TYPE_F16:
		deq_f16(src, dst, n);
		return true;
	case KVQ_TYPE_BF16:
		deq_bf16(src, dst, n);
		return true;
	case KVQ_TYPE_Q8_0:
		deq_q8_0(src, dst, n / KVQ_QK8_0);
		return true;
	case KVQ_TYPE_Q4_0:
		deq_q4_0(src, dst, n / KVQ_QK4_0);
		return true;
	default:
		return false;
	}
}
#else
bool kvq_dequant_row_avx2(uint32_t type, const void *src, float *dst,
			  int64_t n)
{
	return false;
}
#endif
