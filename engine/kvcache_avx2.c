/*
 * kvcache_avx2.c - AVX2 twins of the KV row dequantization and of the
 * value accumulation in attention.
 *
 * Why this file exists: decode attention over a long context is bound by
 * how fast pages are read; reading q4 pages only pays off when turning
 * their nibbles back into floats costs less than the bytes saved.  The
 * scalar code in kvcache.c is the reference these functions must equal
 * exactly (the same products in the same order per element).
 */
#include "config.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/kvcache_impl.h"
#include "engine/quant.h"

#ifdef KVQ_HAVE_X86
#include <immintrin.h>

__attribute__((target("avx2,fma,f16c")))
static void dequant_q4(const uint8_t *data, const uint16_t *scales,
		       uint32_t d, uint32_t group, float *out)
{
	const __m128i m4 = _mm_set1_epi8(15);
	const __m256i eight = _mm256_set1_epi32(8);
	uint32_t g;

	for (g = 0; g < d / 32; g++) {
		__m256 sc = _mm256_set1_ps(kvq_f16_to_f32(scales[g]));
		__m128i b = _mm_loadu_si128((const __m128i *)(data + g * 16));
		__m128i lo = _mm_and_si128(b, m4);
		__m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
		/* channel order: lo0 hi0 lo1 hi1 ... */
		__m128i c0 = _mm_unpacklo_epi8(lo, hi);
		__m128i c1 = _mm_unpackhi_epi8(lo, hi);
		__m128i parts[4] = { c0, _mm_srli_si128(c0, 8), c1,
				     _mm_srli_si128(c1, 8) };
		int i;

		for (i = 0; i < 4; i++) {
			__m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[i]),
						     eight);

			_mm256_storeu_ps(out + g * 32 + i * 8,
					 _mm256_mul_ps(sc, _mm256_cvtepi32_ps(q)));
		}
	}
}

__attribute__((target("avx2,fma,f16c")))
static void dequant_q8(const uint8_t *data, const uint16_t *scales,
		       uint32_t d, uint32_t group, float *out)
{
	uint32_t g, i;

	for (g = 0; g < d / 32; g++) {
		__m256 sc = _mm256_set1_ps(kvq_f16_to_f32(scales[g]));

		for (i = 0; i < 4; i++) {
			__m128i b = _mm_loadl_epi64(
				(const __m128i *)(data + g * 32 + i * 8));
			__m256i q = _mm256_cvtepi8_epi32(b);

			_mm256_storeu_ps(out + g * 32 + i * 8,
					 _mm256_mul_ps(sc, _mm256_cvtepi32_ps(q)));
		}
	}
}

__attribute__((target("avx2,fma,f16c")))
static void dequant_f16(const uint8_t *data, uint32_t d, float *out)
{
	uint32_t i;

	for (i = 0; i < d; i += 8)
		_mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(
					   (const __m128i *)(data + 2 * i))));
}

bool kvq_kv_dequant_row_avx2(enum kvq_kv_type t, const uint8_t *data,
			     const uint16_t *scales, uint32_t d,
			     uint32_t group, float *out)
{
	if (group != 32 && t != KVQ_KV_F16)
		return false;
	switch (t) {
	case KVQ_KV_Q4:
		dequant_q4(data, scales, d, group, out);
		return true;
	case KVQ_KV_Q8:
		dequant_q8(data, scales, d, group, out);
		return true;
	case KVQ_KV_F16:
		if (d % 8)
			return false;
		dequant_f16(data, d, out);
		return true;
	default:
		return false;
	}
}

/* o = o * a + w * v, the same per element as the scalar loop when a is 1
 * (FMA rounds once where the scalar code rounds twice: both are within
 * the attention tolerance, and the scalar twin is what tests compare). */
__attribute__((target("avx2,fma")))
void kvq_kv_axpy_avx2(float *o, float w, const float *v, uint32_t d)
{
	__m256 wv = _mm256_set1_ps(w);
	uint32_t j = 0;

	for (; j + 8 <= d; j += 8)
		_mm256_storeu_ps(o + j, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + j),
							_mm256_loadu_ps(o + j)));
	for (; j < d; j++)
		o[j] += w * v[j];
}


/* Eight channels [c, c+8) of one row as floats. */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline __m256 load8(enum kvq_kv_type t, const uint8_t *row,
			   const uint16_t *sc, uint32_t c)
{
	switch (t) {
	case KVQ_KV_F32:
		return _mm256_loadu_ps((const float *)row + c);
	case KVQ_KV_F16:
		return _mm256_cvtph_ps(_mm_loadu_si128(
			(const __m128i *)(row + 2 * c)));
	case KVQ_KV_Q8: {
		__m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
			(const __m128i *)(row + c)));

		return _mm256_mul_ps(_mm256_set1_ps(kvq_f16_to_f32(sc[c / 32])),
				     _mm256_cvtepi32_ps(q));
	}
	default: {	/* KVQ_KV_Q4 */
		int32_t w;
		__m128i b, lo, hi;
		__m256i q;

		memcpy(&w, row + c / 2, 4);
		b = _mm_cvtsi32_si128(w);
		lo = _mm_and_si128(b, _mm_set1_epi8(15));
		hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
		q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)),
				     _mm256_set1_epi32(8));
		return _mm256_mul_ps(_mm256_set1_ps(kvq_f16_to_f32(sc[c / 32])),
				     _mm256_cvtepi32_ps(q));
	}
	}
}

__attribute__((target("avx2,fma,f16c")))
static inline float hsum8(__m256 v)
{
	__m128 lo = _mm256_castps256_ps128(v);
	__m128 hi = _mm256_extractf128_ps(v, 1);

	lo = _mm_add_ps(lo, hi);
	lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
	lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
	return _mm_cvtss_f32(lo);
}

/* Instantiated per type so the switch in load8 folds away. */
#define PAGE_SCORES(T)							\
__attribute__((target("avx2,fma,f16c")))				\
static void scores_##T(const uint8_t *rows, const uint16_t *scales,	\
		       uint32_t ng, uint32_t rb, uint32_t d, uint32_t t0, \
		       uint32_t t1, const float *q, size_t qs, uint32_t n_q, \
		       float scale, float *sc)				\
{									\
	uint32_t t, c, i;						\
									\
	for (t = t0; t < t1; t++) {					\
		const uint8_t *row = rows + (size_t)t * rb;		\
		const uint16_t *s = scales ? scales + (size_t)t * ng : NULL; \
		__m256 acc[KVQ_KV_SIMD_MAX_Q];				\
									\
		for (i = 0; i < n_q; i++)				\
			acc[i] = _mm256_setzero_ps();			\
		for (c = 0; c < d; c += 8) {				\
			__m256 k8 = load8(T, row, s, c);		\
									\
			for (i = 0; i < n_q; i++)			\
				acc[i] = _mm256_fmadd_ps(		\
					_mm256_loadu_ps(q + i * qs + c), \
					k8, acc[i]);			\
		}							\
		for (i = 0; i < n_q; i++)				\
			sc[i * KVQ_KV_SC_STRIDE + t] = hsum8(acc[i]) * scale; \
	}								\
}

#define PAGE_VALUES(T)							\
__attribute__((target("avx2,fma,f16c")))				\
static void values_##T(const uint8_t *rows, const uint16_t *scales,	\
		       uint32_t ng, uint32_t rb, uint32_t d, uint32_t t0, \
		       uint32_t t1, const float *w, uint32_t n_q,	\
		       float *out, size_t os)				\
{									\
	uint32_t t, c, i;						\
									\
	for (c = 0; c < d; c += 8) {					\
		__m256 acc[KVQ_KV_SIMD_MAX_Q];				\
									\
		for (i = 0; i < n_q; i++)				\
			acc[i] = _mm256_loadu_ps(out + i * os + c);	\
		for (t = t0; t < t1; t++) {				\
			__m256 v8 = load8(T, rows + (size_t)t * rb,	\
					  scales ? scales + (size_t)t * ng : NULL, c); \
									\
			for (i = 0; i < n_q; i++)			\
				acc[i] = _mm256_fmadd_ps(		\
					_mm256_set1_ps(w[i * KVQ_KV_SC_STRIDE + t]), \
					v8, acc[i]);			\
		}							\
		for (i = 0; i < n_q; i++)				\
			_mm256_storeu_ps(out + i * os + c, acc[i]);	\
	}								\
}

PAGE_SCORES(KVQ_KV_F32)
PAGE_SCORES(KVQ_KV_F16)
PAGE_SCORES(KVQ_KV_Q8)
PAGE_SCORES(KVQ_KV_Q4)
PAGE_VALUES(KVQ_KV_F32)
PAGE_VALUES(KVQ_KV_F16)
PAGE_VALUES(KVQ_KV_Q8)
PAGE_VALUES(KVQ_KV_Q4)

bool kvq_kv_page_scores_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *q, size_t qs, uint32_t n_q,
			     float scale, float *sc)
{
	if (d % 8 || n_q > KVQ_KV_SIMD_MAX_Q || (ng && d % 32))
		return false;
	switch (t) {
	case KVQ_KV_F32: scores_KVQ_KV_F32(rows, scales, ng, rb, d, t0, t1, q, qs, n_q, scale, sc); return true;
	case KVQ_KV_F16: scores_KVQ_KV_F16(rows, scales, ng, rb, d, t0, t1, q, qs, n_q, scale, sc); return true;
	case KVQ_KV_Q8: scores_KVQ_KV_Q8(rows, scales, ng, rb, d, t0, t1, q, qs, n_q, scale, sc); return true;
	case KVQ_KV_Q4: scores_KVQ_KV_Q4(rows, scales, ng, rb, d, t0, t1, q, qs, n_q, scale, sc); return true;
	default: return false;
	}
}

bool kvq_kv_page_values_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *w, uint32_t n_q, float *out,
			     size_t os)
{
	if (d % 8 || n_q > KVQ_KV_SIMD_MAX_Q || (ng && d % 32))
		return false;
	switch (t) {
	case KVQ_KV_F32: values_KVQ_KV_F32(rows, scales, ng, rb, d, t0, t1, w, n_q, out, os); return true;
	case KVQ_KV_F16: values_KVQ_KV_F16(rows, scales, ng, rb, d, t0, t1, w, n_q, out, os); return true;
	case KVQ_KV_Q8: values_KVQ_KV_Q8(rows, scales, ng, rb, d, t0, t1, w, n_q, out, os); return true;
	case KVQ_KV_Q4: values_KVQ_KV_Q4(rows, scales, ng, rb, d, t0, t1, w, n_q, out, os); return true;
	default: return false;
	}
}

bool kvq_kv_have_avx2(void)
{
	static int cached = -1;

	if (cached < 0)
		cached = __builtin_cpu_supports("avx2") &&
			 __builtin_cpu_supports("fma") &&
			 __builtin_cpu_supports("f16c");
	return cached;
}
#else
bool kvq_kv_page_scores_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *q, size_t qs, uint32_t n_q,
			     float scale, float *sc)
{
	return false;
}

bool kvq_kv_page_values_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *w, uint32_t n_q, float *out,
			     size_t os)
{
	return false;
}

bool kvq_kv_dequant_row_avx2(enum kvq_kv_type t, const uint8_t *data,
			     const uint16_t *scales, uint32_t d,
			     uint32_t group, float *out)
{
	return false;
}

void kvq_kv_axpy_avx2(float *o, float w, const float *v, uint32_t d)
{
	uint32_t j;

	for (j = 0; j < d; j++)
		o[j] += w * v[j];
}

bool kvq_kv_have_avx2(void)
{
	return false;
}
#endif
