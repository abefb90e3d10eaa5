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

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/kvcache_impl.h"
#include "engine/quant.h"
#include "engine/simd_avx2.h"

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

		return _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(sc[c / 32])),
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
		return _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(sc[c / 32])),
				     _mm256_cvtepi32_ps(q));
	}
	}
}

/* Eight channels [c, c+8) of a q8 or q4 row as unscaled codes (q8: the
 * int8 value, q4: the nibble - 8). */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline __m256 codes8(enum kvq_kv_type t, const uint8_t *row,
			    uint32_t c)
{
	if (t == KVQ_KV_Q8)
		return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
			_mm_loadl_epi64((const __m128i *)(row + c))));
	{
		int32_t w;
		__m128i b, lo, hi;

		memcpy(&w, row + c / 2, 4);
		b = _mm_cvtsi32_si128(w);
		lo = _mm_and_si128(b, _mm_set1_epi8(15));
		hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
		return _mm256_cvtepi32_ps(_mm256_sub_epi32(
			_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)),
			_mm256_set1_epi32(8)));
	}
}

/*
 * Scores of NQ query heads (a compile-time constant at every call site, so
 * the accumulators live in registers).  For q8/q4 each 32-channel group is
 * summed on the raw codes and scaled once.
 */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void scores_impl(enum kvq_kv_type T, const uint32_t NQ,
			       const uint8_t *rows, const uint16_t *scales,
			       uint32_t ng, uint32_t rb, uint32_t d,
			       uint32_t t0, uint32_t t1, const float *q,
			       size_t qs, float scale, float *sc)
{
	uint32_t t, c, g, i;

	for (t = t0; t < t1; t++) {
		const uint8_t *row = rows + (size_t)t * rb;
		__m256 acc[8];

		for (i = 0; i < NQ; i++)
			acc[i] = _mm256_setzero_ps();
		if (T == KVQ_KV_Q8 || T == KVQ_KV_Q4) {
			const uint16_t *s = scales + (size_t)t * ng;

			for (g = 0; g < d / 32; g++) {
				__m256 ga[8], sg;

				for (i = 0; i < NQ; i++)
					ga[i] = _mm256_setzero_ps();
				for (c = g * 32; c < g * 32 + 32; c += 8) {
					__m256 v = codes8(T, row, c);

					for (i = 0; i < NQ; i++)
						ga[i] = _mm256_fmadd_ps(
							_mm256_loadu_ps(q + i * qs + c),
							v, ga[i]);
				}
				sg = _mm256_set1_ps(_cvtsh_ss(s[g]));
				for (i = 0; i < NQ; i++)
					acc[i] = _mm256_fmadd_ps(ga[i], sg, acc[i]);
			}
		} else {
			for (c = 0; c < d; c += 8) {
				__m256 k8 = load8(T, row, NULL, c);

				for (i = 0; i < NQ; i++)
					acc[i] = _mm256_fmadd_ps(
						_mm256_loadu_ps(q + i * qs + c),
						k8, acc[i]);
			}
		}
		for (i = 0; i < NQ; i++)
			sc[i * KVQ_KV_SC_STRIDE + t] = kvq_hsum8(acc[i]) * scale;
	}
}

/*
 * out_i += sum_t w_i[t] * V_t for NQ heads.  For q8/q4 the weights are
 * first multiplied by each token's group scale (ws), so the inner loop
 * is convert + FMA.
 */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void values_impl(enum kvq_kv_type T, const uint32_t NQ,
			       const uint8_t *rows, const uint16_t *scales,
			       uint32_t ng, uint32_t rb, uint32_t d,
			       uint32_t t0, uint32_t t1, const float *w,
			       float *out, size_t os)
{
	uint32_t t, c, i;

	for (c = 0; c < d; c += 8) {
		__m256 acc[8];
		uint32_t g = c / 32;

		for (i = 0; i < NQ; i++)
			acc[i] = _mm256_loadu_ps(out + i * os + c);
		for (t = t0; t < t1; t++) {
			const uint8_t *row = rows + (size_t)t * rb;

			if (T == KVQ_KV_Q8 || T == KVQ_KV_Q4) {
				__m256 v = codes8(T, row, c);
				float s = _cvtsh_ss(scales[(size_t)t * ng + g]);

				for (i = 0; i < NQ; i++)
					acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(
						w[i * KVQ_KV_SC_STRIDE + t] * s),
						v, acc[i]);
			} else {
				__m256 v = load8(T, row, NULL, c);

				for (i = 0; i < NQ; i++)
					acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(
						w[i * KVQ_KV_SC_STRIDE + t]),
						v, acc[i]);
			}
		}
		for (i = 0; i < NQ; i++)
			_mm256_storeu_ps(out + i * os + c, acc[i]);
	}
}

/* One function per (type, head count); the switch picks it. */
#define PAGE_KERNELS(T, NQ)						\
__attribute__((target("avx2,fma,f16c")))				\
static void scores_##T##_##NQ(const uint8_t *rows, const uint16_t *scales, \
			      uint32_t ng, uint32_t rb, uint32_t d,	\
			      uint32_t t0, uint32_t t1, const float *q,	\
			      size_t qs, float scale, float *sc)	\
{									\
	scores_impl(T, NQ, rows, scales, ng, rb, d, t0, t1, q, qs, scale, sc); \
}									\
__attribute__((target("avx2,fma,f16c")))				\
static void values_##T##_##NQ(const uint8_t *rows, const uint16_t *scales, \
			      uint32_t ng, uint32_t rb, uint32_t d,	\
			      uint32_t t0, uint32_t t1, const float *w,	\
			      float *out, size_t os)			\
{									\
	values_impl(T, NQ, rows, scales, ng, rb, d, t0, t1, w, out, os); \
}

#define PAGE_KERNELS_ALL(T)						\
	PAGE_KERNELS(T, 1) PAGE_KERNELS(T, 2) PAGE_KERNELS(T, 4)	\
	PAGE_KERNELS(T, 8)

PAGE_KERNELS_ALL(KVQ_KV_F32)
PAGE_KERNELS_ALL(KVQ_KV_F16)
PAGE_KERNELS_ALL(KVQ_KV_Q8)
PAGE_KERNELS_ALL(KVQ_KV_Q4)

typedef void (*scores_fn)(const uint8_t *, const uint16_t *, uint32_t,
			  uint32_t, uint32_t, uint32_t, uint32_t,
			  const float *, size_t, float, float *);
typedef void (*values_fn)(const uint8_t *, const uint16_t *, uint32_t,
			  uint32_t, uint32_t, uint32_t, uint32_t,
			  const float *, float *, size_t);

static const scores_fn scores_tab[KVQ_KV_NTYPES][4] = {
	[KVQ_KV_F32] = { scores_KVQ_KV_F32_1, scores_KVQ_KV_F32_2, scores_KVQ_KV_F32_4, scores_KVQ_KV_F32_8 },
	[KVQ_KV_F16] = { scores_KVQ_KV_F16_1, scores_KVQ_KV_F16_2, scores_KVQ_KV_F16_4, scores_KVQ_KV_F16_8 },
	[KVQ_KV_Q8] = { scores_KVQ_KV_Q8_1, scores_KVQ_KV_Q8_2, scores_KVQ_KV_Q8_4, scores_KVQ_KV_Q8_8 },
	[KVQ_KV_Q4] = { scores_KVQ_KV_Q4_1, scores_KVQ_KV_Q4_2, scores_KVQ_KV_Q4_4, scores_KVQ_KV_Q4_8 },
};
static const values_fn values_tab[KVQ_KV_NTYPES][4] = {
	[KVQ_KV_F32] = { values_KVQ_KV_F32_1, values_KVQ_KV_F32_2, values_KVQ_KV_F32_4, values_KVQ_KV_F32_8 },
	[KVQ_KV_F16] = { values_KVQ_KV_F16_1, values_KVQ_KV_F16_2, values_KVQ_KV_F16_4, values_KVQ_KV_F16_8 },
	[KVQ_KV_Q8] = { values_KVQ_KV_Q8_1, values_KVQ_KV_Q8_2, values_KVQ_KV_Q8_4, values_KVQ_KV_Q8_8 },
	[KVQ_KV_Q4] = { values_KVQ_KV_Q4_1, values_KVQ_KV_Q4_2, values_KVQ_KV_Q4_4, values_KVQ_KV_Q4_8 },
};

/* The largest kernel width (8, 4, 2, 1) not above @n, as a table index. */
static inline int width_index(uint32_t n, uint32_t *width)
{
	if (n >= 8) { *width = 8; return 3; }
	if (n >= 4) { *width = 4; return 2; }
	if (n >= 2) { *width = 2; return 1; }
	*width = 1;
	return 0;
}

bool kvq_kv_page_scores_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *q, size_t qs, uint32_t n_q,
			     float scale, float *sc)
{
	uint32_t h = 0, wdt;

	if (d % 8 || (unsigned)t >= KVQ_KV_NTYPES || (ng && d % 32))
		return false;
	while (h < n_q) {
		int k = width_index(n_q - h, &wdt);

		scores_tab[t][k](rows, scales, ng, rb, d, t0, t1, q + h * qs,
				 qs, scale, sc + h * KVQ_KV_SC_STRIDE);
		h += wdt;
	}
	return true;
}

bool kvq_kv_page_values_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *w, uint32_t n_q, float *out,
			     size_t os)
{
	uint32_t h = 0, wdt;

	if (d % 8 || (unsigned)t >= KVQ_KV_NTYPES || (ng && d % 32))
		return false;
	while (h < n_q) {
		int k = width_index(n_q - h, &wdt);

		values_tab[t][k](rows, scales, ng, rb, d, t0, t1,
				 w + h * KVQ_KV_SC_STRIDE, out + h * os, os);
		h += wdt;
	}
	return true;
}

/* exp(x) for x in [-87, 0]: 2^n * e^r with |r| <= ln2/2 and a degree-6
 * Taylor polynomial for e^r (truncation below 1.3e-7 relative); below
 * -87 the result is 0. */
__attribute__((target("avx2,fma")))
static inline __m256 exp8(__m256 x)
{
	const __m256 lo = _mm256_set1_ps(-87.0f);
	__m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
	__m256 n, r, p;
	__m256i e;

	x = _mm256_max_ps(x, lo);
	n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
			    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
	r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
	p = _mm256_set1_ps(1.0f / 720);
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
	e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
	p = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
	return _mm256_andnot_ps(under, p);
}

__attribute__((target("avx2,fma")))
float kvq_kv_exp_sum_avx2(float *x, uint32_t n, float mx)
{
	__m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
	float sum;
	uint32_t i = 0;

	for (; i + 8 <= n; i += 8) {
		__m256 v = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));

		_mm256_storeu_ps(x + i, v);
		acc = _mm256_add_ps(acc, v);
	}
	sum = kvq_hsum8(acc);
	for (; i < n; i++) {
		x[i] = expf(x[i] - mx);
		sum += x[i];
	}
	return sum;
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

float kvq_kv_exp_sum_avx2(float *x, uint32_t n, float mx)
{
	float sum = 0;
	uint32_t i;

	for (i = 0; i < n; i++)
		sum += (x[i] = expf(x[i] - mx));
	return sum;
}

void kvq_kv_axpy_avx2(float *o, float w, const float *v, uint32_t d)
{
	uint32_t j;

	for (j = 0; j < d; j++)
		o[j] += w * v[j];
}
#endif
