/*
 * quant_avx2.c - AVX2/FMA/F16C dot products of quantized rows with f32
 * vectors.
 *
 * Why this file exists: matrix-vector products over the weights are the
 * decode hot path and are bound by memory bandwidth only if the weights are
 * expanded to f32 in registers as fast as they stream in.  The file is built
 * with the project's baseline flags; each function carries its own target
 * attribute and quant.c calls them only after kvq_quant_avx2_kernels() has
 * confirmed the CPU (and OS) support AVX2, FMA and F16C.  On other
 * architectures it compiles to nothing.
 *
 * The arithmetic is f32 throughout: quantized values are widened to int32
 * lanes, converted, and multiplied with x by FMA into several independent
 * accumulators, so FMA latency does not limit throughput.  Q4_K, whose
 * sub-blocks have a min, rebuilds each weight with one FMA of q, scale and
 * min; the others scale a sum per block or sub-block.
 *
 * The int8-activation kernels (opt-in, see quant.h) multiply in integers
 * instead and scale once per block of 32.
 */
#include "config.h"

#ifdef KVQ_HAVE_X86

#include <cpuid.h>
#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "engine/quant.h"
#include "engine/quant_impl.h"
#include "engine/simd_avx2.h"

#define KVQ_AVX2 __attribute__((target("avx2,fma,f16c")))

KVQ_AVX2 static inline float hsum4(__m256 a, __m256 b, __m256 c, __m256 d)
{
	return kvq_hsum8(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
}

/* 8 unsigned bytes at @p, widened to 8 int32 lanes. */
KVQ_AVX2 static inline __m256i load_u8x8(const uint8_t *p)
{
	return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

KVQ_AVX2 static inline __m256 to_f32(__m256i v)
{
	return _mm256_cvtepi32_ps(v);
}

/*
 * Software prefetch distance, in bytes ahead of the block being read, for
 * CPUs whose hardware prefetchers do not keep enough cache misses in
 * flight for one core to stream at full speed (Intel server parts gain
 * 20-60% with it); on others (AMD Zen) it costs a few percent, so the
 * table without it is used there.  The kernels take the distance as a
 * parameter that is a constant in each instance (0: no prefetch).
 */
#define KVQ_PREFETCH_BYTES 4096

KVQ_AVX2 static inline void prefetch(const void *p, int ahead)
{
	_mm_prefetch((const char *)p + ahead, _MM_HINT_T0);
}

/* ------------------------------------------------------------ float rows */

enum row_kind { ROW_F32, ROW_F16, ROW_BF16 };

/* 8 elements of a float row from element @i, as f32. */
KVQ_AVX2 static inline __m256 load_row8(const void *row, int64_t i,
					enum row_kind k)
{
	const uint16_t *h = (const uint16_t *)row + i;
	__m256i w;

	switch (k) {
	case ROW_F16:
		return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
	case ROW_BF16:	/* the top half of an f32: widen and shift */
		w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)h));
		return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
	default:
		return _mm256_loadu_ps((const float *)row + i);
	}
}

KVQ_AVX2 static inline float load_row1(const void *row, int64_t i,
				       enum row_kind k)
{
	switch (k) {
	case ROW_F16:
		return _cvtsh_ss(((const uint16_t *)row)[i]);
	case ROW_BF16:
		return kvq_bf16_to_f32(((const uint16_t *)row)[i]);
	default:
		return ((const float *)row)[i];
	}
}

/* Dot product of a float row with x: 32 elements per step, 4 sums. */
KVQ_AVX2 static inline float dot_row(const void *row, const float *x,
				     int64_t n, enum row_kind k, int pf)
{
	const int64_t esize = k == ROW_F32 ? 4 : 2;
	const char *p = row;
	__m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
	__m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
	int64_t i = 0;
	float sum;

	for (; i + 32 <= n; i += 32) {
		if (pf) {
			prefetch(p + i * esize, pf);
			if (esize == 4)
				prefetch(p + i * esize + 64, pf);
		}
		s0 = _mm256_fmadd_ps(load_row8(row, i, k),
				     _mm256_loadu_ps(x + i), s0);
		s1 = _mm256_fmadd_ps(load_row8(row, i + 8, k),
				     _mm256_loadu_ps(x + i + 8), s1);
		s2 = _mm256_fmadd_ps(load_row8(row, i + 16, k),
				     _mm256_loadu_ps(x + i + 16), s2);
		s3 = _mm256_fmadd_ps(load_row8(row, i + 24, k),
				     _mm256_loadu_ps(x + i + 24), s3);
	}
	for (; i + 8 <= n; i += 8)
		s0 = _mm256_fmadd_ps(load_row8(row, i, k),
				     _mm256_loadu_ps(x + i), s0);
	sum = hsum4(s0, s1, s2, s3);
	for (; i < n; i++)
		sum += load_row1(row, i, k) * x[i];
	return sum;
}

KVQ_AVX2 static inline float dot_f32_row(const void *row, const float *x,
					 int64_t n, int pf)
{
	return dot_row(row, x, n, ROW_F32, pf);
}

KVQ_AVX2 static inline float dot_f16_row(const void *row, const float *x,
					 int64_t n, int pf)
{
	return dot_row(row, x, n, ROW_F16, pf);
}

KVQ_AVX2 static inline float dot_bf16_row(const void *row, const float *x,
					  int64_t n, int pf)
{
	return dot_row(row, x, n, ROW_BF16, pf);
}

/* ------------------------------------------------------- Q8_0 and Q4_0 */

/*
 * Both formats have one scale per block of 32, so a block contributes
 * d * sum(q * x): four groups of 8 values widened to int32 and converted,
 * multiplied with x in two independent chains, then one FMA by d.  Two
 * blocks per step feed separate accumulators so that FMA does not
 * serialize consecutive blocks.
 */
KVQ_AVX2 static inline __m256 block_sum(__m256 q0, __m256 q1, __m256 q2,
					__m256 q3, const float *x)
{
	__m256 s = _mm256_mul_ps(q0, _mm256_loadu_ps(x));
	__m256 t = _mm256_mul_ps(q1, _mm256_loadu_ps(x + 8));

	s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + 16), s);
	t = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + 24), t);
	return _mm256_add_ps(s, t);
}

/* 8 signed bytes at @p as 8 floats. */
KVQ_AVX2 static inline __m256 load_i8x8_f32(const int8_t *p)
{
	return to_f32(_mm256_cvtepi8_epi32(
		_mm_loadl_epi64((const __m128i *)p)));
}

KVQ_AVX2 static inline __m256 q8_0_block(const struct kvq_block_q8_0 *b,
					 const float *x, __m256 acc)
{
	__m256 s = block_sum(load_i8x8_f32(b->qs), load_i8x8_f32(b->qs + 8),
			     load_i8x8_f32(b->qs + 16),
			     load_i8x8_f32(b->qs + 24), x);

	return _mm256_fmadd_ps(s, _mm256_set1_ps(_cvtsh_ss(b->d)), acc);
}

/*
 * Q4_0: the 16 bytes are widened to int32 in two halves of 8; in each lane
 * the low nibble is element j and the high nibble element j + 16.  The 8
 * is subtracted in the integer lanes, before conversion.
 */
KVQ_AVX2 static inline __m256 q4_0_block(const struct kvq_block_q4_0 *b,
					 const float *x, __m256 acc)
{
	const __m256i m4 = _mm256_set1_epi32(0x0f);
	const __m256i k8 = _mm256_set1_epi32(8);
	__m256i v0 = load_u8x8(b->qs);
	__m256i v1 = load_u8x8(b->qs + 8);
	__m256 q0 = to_f32(_mm256_sub_epi32(_mm256_and_si256(v0, m4), k8));
	__m256 q1 = to_f32(_mm256_sub_epi32(_mm256_and_si256(v1, m4), k8));
	__m256 q2 = to_f32(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), k8));
	__m256 q3 = to_f32(_mm256_sub_epi32(_mm256_srli_epi32(v1, 4), k8));
	__m256 s = block_sum(q0, q1, q2, q3, x);

	return _mm256_fmadd_ps(s, _mm256_set1_ps(_cvtsh_ss(b->d)), acc);
}

KVQ_AVX2 static inline float dot_q8_0_row(const void *row, const float *x,
					  int64_t n, int pf)
{
	const struct kvq_block_q8_0 *b = row;
	const int64_t nb = n / KVQ_QK8_0;
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	int64_t i = 0;

	for (; i + 2 <= nb; i += 2, x += 2 * KVQ_QK8_0) {
		if (pf)
			prefetch(b + i, pf);
		acc0 = q8_0_block(b + i, x, acc0);
		acc1 = q8_0_block(b + i + 1, x + KVQ_QK8_0, acc1);
	}
	if (i < nb)
		acc0 = q8_0_block(b + i, x, acc0);
	return kvq_hsum8(_mm256_add_ps(acc0, acc1));
}

KVQ_AVX2 static inline float dot_q4_0_row(const void *row, const float *x,
					  int64_t n, int pf)
{
	const struct kvq_block_q4_0 *b = row;
	const int64_t nb = n / KVQ_QK4_0;
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	int64_t i = 0;

	for (; i + 2 <= nb; i += 2, x += 2 * KVQ_QK4_0) {
		if (pf)
			prefetch(b + i, pf);
		acc0 = q4_0_block(b + i, x, acc0);
		acc1 = q4_0_block(b + i + 1, x + KVQ_QK4_0, acc1);
	}
	if (i < nb)
		acc0 = q4_0_block(b + i, x, acc0);
	return kvq_hsum8(_mm256_add_ps(acc0, acc1));
}

/* --------------------------------------------------------------- Q4_K */

/*
 * The 8 six-bit scales and mins of a Q4_K super-block as two groups of 8
 * bytes, with 32-bit word operations instead of a loop (same packing as
 * kvq_q4k_scale_min(): words 0 and 1 hold sc0-3 and m0-3 in their low 6
 * bits per byte and the top 2 bits of sc4-7 and m4-7 in bits 6-7; word 2
 * holds the low 4 bits of sc4-7 and m4-7 as nibbles).
 */
static inline void q4_k_unpack_scales(const uint8_t *p, uint64_t *sc,
				      uint64_t *mn)
{
	uint32_t u[3];
	uint32_t sc_hi, mn_hi;

	memcpy(u, p, sizeof(u));
	sc_hi = (u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030);
	mn_hi = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030);
	*sc = (u[0] & 0x3f3f3f3f) | (uint64_t)sc_hi << 32;
	*mn = (u[1] & 0x3f3f3f3f) | (uint64_t)mn_hi << 32;
}

/* 8 unsigned bytes packed in @v, times @scale, as 8 floats. */
KVQ_AVX2 static inline __m256 u8x8_times(uint64_t v, float scale)
{
	__m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)v));

	return _mm256_mul_ps(to_f32(w), _mm256_set1_ps(scale));
}

/*
 * Per super-block: the 8 sub-block scales d*sc and negated mins -dmin*m
 * are computed as two vectors and parked in small arrays (broadcast from
 * memory later costs a load, not a shuffle).  Then each 32-byte chunk c
 * gives, per 8 bytes, 8 weights of sub-block 2c (low nibbles) and 8 of
 * sub-block 2c+1 (high nibbles), each fma(q, d*sc, -dmin*m).
 */
KVQ_AVX2 static inline float dot_q4_k_row(const void *row, const float *x,
					  int64_t n, int pf)
{
	const struct kvq_block_q4_k *b = row;
	const int64_t nb = n / KVQ_QK_K;
	const __m256i m4 = _mm256_set1_epi32(0x0f);
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	__m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
	float dsc[8] __attribute__((aligned(32)));
	float nmin[8] __attribute__((aligned(32)));

	for (int64_t i = 0; i < nb; i++, b++, x += KVQ_QK_K) {
		uint64_t sc, mn;

		if (pf) {
			prefetch(b, pf);
			prefetch(b, pf + 64);
			prefetch(b, pf + 128);
		}
		q4_k_unpack_scales(b->scales, &sc, &mn);
		_mm256_store_ps(dsc, u8x8_times(sc, _cvtsh_ss(b->d)));
		_mm256_store_ps(nmin, u8x8_times(mn, -_cvtsh_ss(b->dmin)));
		for (int c = 0; c < 4; c++) {
			const uint8_t *q = b->qs + 32 * c;
			const float *xa = x + 64 * c;
			const float *xb = xa + 32;
			const __m256 da = _mm256_broadcast_ss(&dsc[2 * c]);
			const __m256 ma = _mm256_broadcast_ss(&nmin[2 * c]);
			const __m256 db = _mm256_broadcast_ss(&dsc[2 * c + 1]);
			const __m256 mb = _mm256_broadcast_ss(&nmin[2 * c + 1]);

			for (int l = 0; l < 32; l += 16) {
				__m256i v0 = load_u8x8(q + l);
				__m256i v1 = load_u8x8(q + l + 8);
				__m256 lo0 = to_f32(_mm256_and_si256(v0, m4));
				__m256 lo1 = to_f32(_mm256_and_si256(v1, m4));
				__m256 hi0 = to_f32(_mm256_srli_epi32(v0, 4));
				__m256 hi1 = to_f32(_mm256_srli_epi32(v1, 4));
				__m256 wa0 = _mm256_fmadd_ps(lo0, da, ma);
				__m256 wa1 = _mm256_fmadd_ps(lo1, da, ma);
				__m256 wb0 = _mm256_fmadd_ps(hi0, db, mb);
				__m256 wb1 = _mm256_fmadd_ps(hi1, db, mb);

				acc0 = _mm256_fmadd_ps(wa0,
					_mm256_loadu_ps(xa + l), acc0);
				acc1 = _mm256_fmadd_ps(wa1,
					_mm256_loadu_ps(xa + l + 8), acc1);
				acc2 = _mm256_fmadd_ps(wb0,
					_mm256_loadu_ps(xb + l), acc2);
				acc3 = _mm256_fmadd_ps(wb1,
					_mm256_loadu_ps(xb + l + 8), acc3);
			}
		}
	}
	return hsum4(acc0, acc1, acc2, acc3);
}

/* --------------------------------------------------------------- Q6_K */

/*
 * The 6-bit values of one half super-block (128 elements), minus 32, as
 * int8 in element order into @q.  The bit surgery runs on whole 32-byte
 * registers (32 elements per instruction): with l = 0..31 as the byte
 * lane, a = ql[l], c = ql[l + 32] and h = qh[l],
 *   element l      = (a & 15) | (h << 4 & 0x30)
 *   element l + 32 = (c & 15) | (h << 2 & 0x30)
 *   element l + 64 = (a >> 4) | (h & 0x30)
 *   element l + 96 = (c >> 4) | (h >> 2 & 0x30)
 * (16-bit shifts are fine: the masks drop the bits that cross bytes).
 */
KVQ_AVX2 static inline void q6_k_unpack_half(const uint8_t *ql,
					     const uint8_t *qh, int8_t *q)
{
	const __m256i m4 = _mm256_set1_epi8(0x0f);
	const __m256i m30 = _mm256_set1_epi8(0x30);
	const __m256i k32 = _mm256_set1_epi8(32);
	__m256i h = _mm256_loadu_si256((const __m256i *)qh);
	__m256i a = _mm256_loadu_si256((const __m256i *)ql);
	__m256i c = _mm256_loadu_si256((const __m256i *)(ql + 32));
	__m256i q1 = _mm256_or_si256(_mm256_and_si256(a, m4),
		_mm256_and_si256(_mm256_slli_epi16(h, 4), m30));
	__m256i q2 = _mm256_or_si256(_mm256_and_si256(c, m4),
		_mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
	__m256i q3 = _mm256_or_si256(
		_mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
		_mm256_and_si256(h, m30));
	__m256i q4 = _mm256_or_si256(
		_mm256_and_si256(_mm256_srli_epi16(c, 4), m4),
		_mm256_and_si256(_mm256_srli_epi16(h, 2), m30));

	_mm256_store_si256((__m256i *)q, _mm256_sub_epi8(q1, k32));
	_mm256_store_si256((__m256i *)(q + 32), _mm256_sub_epi8(q2, k32));
	_mm256_store_si256((__m256i *)(q + 64), _mm256_sub_epi8(q3, k32));
	_mm256_store_si256((__m256i *)(q + 96), _mm256_sub_epi8(q4, k32));
}

/*
 * Per super-block: the 256 values q-32 are unpacked into an int8 buffer in
 * element order (cheap byte-wide work, and the buffer stays in L1), the
 * 16 scales d*sc are computed with two vector multiplies, then each
 * sub-block of 16 contributes scale * sum((q-32) * x).
 */
KVQ_AVX2 static inline float dot_q6_k_row(const void *row, const float *x,
					  int64_t n, int pf)
{
	const struct kvq_block_q6_k *b = row;
	const int64_t nb = n / KVQ_QK_K;
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	__m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
	int8_t q[KVQ_QK_K] __attribute__((aligned(32)));
	float s[16] __attribute__((aligned(32)));

	for (int64_t i = 0; i < nb; i++, b++, x += KVQ_QK_K) {
		const __m256 d = _mm256_set1_ps(_cvtsh_ss(b->d));

		if (pf) {
			for (int off = 0; off < 256; off += 64)
				prefetch(b, pf + off);
		}
		_mm256_store_ps(s, _mm256_mul_ps(d, load_i8x8_f32(b->scales)));
		_mm256_store_ps(s + 8, _mm256_mul_ps(d,
			load_i8x8_f32(b->scales + 8)));
		q6_k_unpack_half(b->ql, b->qh, q);
		q6_k_unpack_half(b->ql + 64, b->qh + 32, q + 128);

		for (int j = 0; j < 16; j += 4) {
			const int8_t *p = q + 16 * j;
			const float *xs = x + 16 * j;
			__m256 t0 = _mm256_mul_ps(load_i8x8_f32(p),
						  _mm256_loadu_ps(xs));
			__m256 t1 = _mm256_mul_ps(load_i8x8_f32(p + 16),
						  _mm256_loadu_ps(xs + 16));
			__m256 t2 = _mm256_mul_ps(load_i8x8_f32(p + 32),
						  _mm256_loadu_ps(xs + 32));
			__m256 t3 = _mm256_mul_ps(load_i8x8_f32(p + 48),
						  _mm256_loadu_ps(xs + 48));

			t0 = _mm256_fmadd_ps(load_i8x8_f32(p + 8),
					     _mm256_loadu_ps(xs + 8), t0);
			t1 = _mm256_fmadd_ps(load_i8x8_f32(p + 24),
					     _mm256_loadu_ps(xs + 24), t1);
			t2 = _mm256_fmadd_ps(load_i8x8_f32(p + 40),
					     _mm256_loadu_ps(xs + 40), t2);
			t3 = _mm256_fmadd_ps(load_i8x8_f32(p + 56),
					     _mm256_loadu_ps(xs + 56), t3);
			acc0 = _mm256_fmadd_ps(t0, _mm256_broadcast_ss(&s[j]),
					       acc0);
			acc1 = _mm256_fmadd_ps(t1,
				_mm256_broadcast_ss(&s[j + 1]), acc1);
			acc2 = _mm256_fmadd_ps(t2,
				_mm256_broadcast_ss(&s[j + 2]), acc2);
			acc3 = _mm256_fmadd_ps(t3,
				_mm256_broadcast_ss(&s[j + 3]), acc3);
		}
	}
	return hsum4(acc0, acc1, acc2, acc3);
}

/* ------------------------------------------------- int8 activations */

/*
 * The integer kernels multiply 32 weight bytes with 32 activation bytes
 * per instruction: vpmaddubsw takes one unsigned and one signed operand
 * and adds adjacent products into 16 int16 lanes, vpmaddwd with ones (or
 * with scales) adds adjacent int16 lanes into 8 int32 lanes.  No int16
 * lane can saturate: the largest is 2 * 128 * 127 (Q8_0's -128 through
 * vpsignb), Q6_K's 2 * 63 * 127.  Every block's int32 lanes are converted
 * and multiplied by the product of the two block scales with one FMA.
 */

/* The int8 activation blocks, quantized 32 at a time. */
KVQ_AVX2 static void quantize_act(const float *x, int64_t n, void *dst)
{
	struct kvq_act_q8_view v = kvq_act_q8_view(dst, n);
	const __m256 sign = _mm256_set1_ps(-0.0f);
	const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);

	for (int64_t b = 0; b < n / KVQ_QK_ACT; b++, x += KVQ_QK_ACT) {
		__m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
		__m256 x2 = _mm256_loadu_ps(x + 16);
		__m256 x3 = _mm256_loadu_ps(x + 24);
		__m256 m = _mm256_max_ps(
			_mm256_max_ps(_mm256_andnot_ps(sign, x0),
				      _mm256_andnot_ps(sign, x1)),
			_mm256_max_ps(_mm256_andnot_ps(sign, x2),
				      _mm256_andnot_ps(sign, x3)));
		__m128 h = _mm_max_ps(_mm256_castps256_ps128(m),
				      _mm256_extractf128_ps(m, 1));
		__m256i q0, q1, q2, q3, s01, s23, q;
		__m256 id;
		float idf;

		h = _mm_max_ps(h, _mm_movehl_ps(h, h));
		h = _mm_max_ss(h, _mm_movehdup_ps(h));
		v.d[b] = kvq_act_block_scale(_mm_cvtss_f32(h), &idf);
		id = _mm256_set1_ps(idf);
		q0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, id));
		q1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, id));
		q2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, id));
		q3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, id));
		/* half-block sums from the int32 lanes */
		s01 = _mm256_add_epi32(q0, q1);
		s23 = _mm256_add_epi32(q2, q3);
		s01 = _mm256_hadd_epi32(s01, s23);
		s01 = _mm256_hadd_epi32(s01, s01);
		/* lanes 0 and 4: halves of sum(q0 + q1); 1 and 5: q2 + q3 */
		v.sum[2 * b] = (int16_t)(_mm256_extract_epi32(s01, 0) +
					 _mm256_extract_epi32(s01, 4));
		v.sum[2 * b + 1] = (int16_t)(_mm256_extract_epi32(s01, 1) +
					     _mm256_extract_epi32(s01, 5));
		/* packs work per 128-bit lane; the permute restores order */
		q = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1),
				       _mm256_packs_epi32(q2, q3));
		q = _mm256_permutevar8x32_epi32(q, order);
		_mm256_storeu_si256((__m256i *)(v.qs + b * KVQ_QK_ACT), q);
	}
}

/* Sum of signed bytes w[j] * x[j] in 8 int32 lanes. */
KVQ_AVX2 static inline __m256i dot_i8(__m256i w, __m256i x)
{
	__m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w),
					 _mm256_sign_epi8(x, w));

	return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* Sum of unsigned bytes w[j] times signed bytes x[j] in 8 int32 lanes. */
KVQ_AVX2 static inline __m256i dot_u8i8(__m256i w, __m256i x)
{
	return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x),
				 _mm256_set1_epi16(1));
}

KVQ_AVX2 static inline __m256i load_x32(const int8_t *p)
{
	return _mm256_loadu_si256((const __m256i *)p);
}

KVQ_AVX2 static inline __m256 q8a_q8_0_block(const struct kvq_block_q8_0 *b,
					     const int8_t *xq, float dx,
					     __m256 acc)
{
	__m256i w = _mm256_loadu_si256((const __m256i *)b->qs);
	__m256 s = to_f32(dot_i8(w, load_x32(xq)));

	return _mm256_fmadd_ps(s, _mm256_set1_ps(_cvtsh_ss(b->d) * dx), acc);
}

/* Q4_0: low nibbles are elements 0-15, high nibbles 16-31, minus 8. */
KVQ_AVX2 static inline __m256 q8a_q4_0_dot(const struct kvq_block_q4_0 *b,
					   const int8_t *xq)
{
	__m128i v = _mm_loadu_si128((const __m128i *)b->qs);
	__m256i w = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);

	w = _mm256_sub_epi8(_mm256_and_si256(w, _mm256_set1_epi8(0x0f)),
			    _mm256_set1_epi8(8));
	return to_f32(dot_i8(w, load_x32(xq)));
}

KVQ_AVX2 static inline __m256 q8a_q4_0_block(const struct kvq_block_q4_0 *b,
					     const int8_t *xq, float dx,
					     __m256 acc)
{
	return _mm256_fmadd_ps(q8a_q4_0_dot(b, xq),
			       _mm256_set1_ps(_cvtsh_ss(b->d) * dx), acc);
}

/*
 * The products d_w * d_x of four consecutive blocks with one f16
 * conversion and one multiply, parked for broadcasting from memory.
 */
KVQ_AVX2 static inline void q4_0_scales4(const struct kvq_block_q4_0 *b,
					 const float *dx, float *out)
{
	uint64_t h = (uint64_t)b[0].d | (uint64_t)b[1].d << 16 |
		     (uint64_t)b[2].d << 32 | (uint64_t)b[3].d << 48;
	__m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));

	_mm_store_ps(out, _mm_mul_ps(f, _mm_loadu_ps(dx)));
}

KVQ_AVX2 static float dot_q8a_q8_0(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q8_0 *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	const int64_t nb = n / KVQ_QK8_0;
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	int64_t i = 0;

	for (; i + 2 <= nb; i += 2) {
		acc0 = q8a_q8_0_block(b + i, v.qs + i * 32, v.d[i], acc0);
		acc1 = q8a_q8_0_block(b + i + 1, v.qs + i * 32 + 32,
				      v.d[i + 1], acc1);
	}
	if (i < nb)
		acc0 = q8a_q8_0_block(b + i, v.qs + i * 32, v.d[i], acc0);
	return kvq_hsum8(_mm256_add_ps(acc0, acc1));
}

KVQ_AVX2 static float dot_q8a_q4_0(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q4_0 *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	const int64_t nb = n / KVQ_QK4_0;
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	float s4[4] __attribute__((aligned(16)));
	int64_t i = 0;


	for (; i + 4 <= nb; i += 4) {
		const int8_t *xs = v.qs + i * 32;

		q4_0_scales4(b + i, v.d + i, s4);
		acc0 = _mm256_fmadd_ps(q8a_q4_0_dot(b + i, xs),
				       _mm256_broadcast_ss(&s4[0]), acc0);
		acc1 = _mm256_fmadd_ps(q8a_q4_0_dot(b + i + 1, xs + 32),
				       _mm256_broadcast_ss(&s4[1]), acc1);
		acc0 = _mm256_fmadd_ps(q8a_q4_0_dot(b + i + 2, xs + 64),
				       _mm256_broadcast_ss(&s4[2]), acc0);
		acc1 = _mm256_fmadd_ps(q8a_q4_0_dot(b + i + 3, xs + 96),
				       _mm256_broadcast_ss(&s4[3]), acc1);
	}
	for (; i + 2 <= nb; i += 2) {
		acc0 = q8a_q4_0_block(b + i, v.qs + i * 32, v.d[i], acc0);
		acc1 = q8a_q4_0_block(b + i + 1, v.qs + i * 32 + 32,
				      v.d[i + 1], acc1);
	}
	if (i < nb)
		acc0 = q8a_q4_0_block(b + i, v.qs + i * 32, v.d[i], acc0);
	return kvq_hsum8(_mm256_add_ps(acc0, acc1));
}

/*
 * Q4_K: chunk c's low nibbles are sub-block 2c, its high nibbles sub-block
 * 2c + 1, each lined up with one activation block.  The eight d*sc*dx
 * come from one vector product and are parked for broadcasting; the mins
 * need only the activation block sums: dmin * sum(m * dx * sum(qx)), one
 * vector FMA per super-block, subtracted at the end.
 */
KVQ_AVX2 static float dot_q8a_q4_k(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q4_k *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	const int64_t nb = n / KVQ_QK_K;
	const __m256i m4 = _mm256_set1_epi8(0x0f);
	const __m256i ones = _mm256_set1_epi16(1);
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	__m256 accm = _mm256_setzero_ps();
	float dsc[8] __attribute__((aligned(32)));

	for (int64_t i = 0; i < nb; i++, b++) {
		const int8_t *xs = v.qs + i * KVQ_QK_K;
		const __m256 dx = _mm256_loadu_ps(v.d + 8 * i);
		__m256i s32 = _mm256_madd_epi16(_mm256_loadu_si256(
			(const __m256i *)(v.sum + 16 * i)), ones);
		uint64_t sc, mn;

		q4_k_unpack_scales(b->scales, &sc, &mn);
		_mm256_store_ps(dsc, _mm256_mul_ps(
			u8x8_times(sc, _cvtsh_ss(b->d)), dx));
		accm = _mm256_fmadd_ps(_mm256_mul_ps(
			u8x8_times(mn, _cvtsh_ss(b->dmin)), dx),
			to_f32(s32), accm);
		for (int c = 0; c < 4; c++) {
			__m256i q = _mm256_loadu_si256(
				(const __m256i *)(b->qs + 32 * c));
			__m256i lo = _mm256_and_si256(q, m4);
			__m256i hi = _mm256_and_si256(
				_mm256_srli_epi16(q, 4), m4);
			__m256 plo = to_f32(dot_u8i8(lo,
				load_x32(xs + 64 * c)));
			__m256 phi = to_f32(dot_u8i8(hi,
				load_x32(xs + 64 * c + 32)));

			acc0 = _mm256_fmadd_ps(plo,
				_mm256_broadcast_ss(&dsc[2 * c]), acc0);
			acc1 = _mm256_fmadd_ps(phi,
				_mm256_broadcast_ss(&dsc[2 * c + 1]), acc1);
		}
	}
	return kvq_hsum8(_mm256_add_ps(acc0, acc1)) - kvq_hsum8(accm);
}

/*
 * The unsigned 6-bit values of one half super-block (128 elements) as four
 * registers of 32 consecutive elements (see q6_k_unpack_half()).
 */
KVQ_AVX2 static inline void q6_k_unpack_u(const uint8_t *ql,
					  const uint8_t *qh, __m256i q[4])
{
	const __m256i m4 = _mm256_set1_epi8(0x0f);
	const __m256i m30 = _mm256_set1_epi8(0x30);
	__m256i h = _mm256_loadu_si256((const __m256i *)qh);
	__m256i a = _mm256_loadu_si256((const __m256i *)ql);
	__m256i c = _mm256_loadu_si256((const __m256i *)(ql + 32));

	q[0] = _mm256_or_si256(_mm256_and_si256(a, m4),
		_mm256_and_si256(_mm256_slli_epi16(h, 4), m30));
	q[1] = _mm256_or_si256(_mm256_and_si256(c, m4),
		_mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
	q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
		_mm256_and_si256(h, m30));
	q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4),
		_mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
}

/*
 * Q6_K: each register of 32 unsigned values is one activation block and
 * two sub-blocks of 16.  vpmaddubsw leaves the first sub-block in the low
 * 128-bit lane and the second in the high one, so vpmaddwd with a vector
 * holding scale 2k in the low lane and 2k + 1 in the high one applies the
 * int8 scales in the integers.  The offset of 32 is subtracted once per
 * super-block: 32 * d * sum(dx * sc * sum16(qx)), again with vpmaddwd.
 */
KVQ_AVX2 static float dot_q8a_q6_k(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q6_k *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	const int64_t nb = n / KVQ_QK_K;
	__m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
	__m256 accc = _mm256_setzero_ps();
	float ddx[8] __attribute__((aligned(32)));
	__m256i pick[4];

	/* word 2k of each 128-bit lane into the low lane, 2k + 1 high */
	for (int k = 0; k < 4; k++)
		pick[k] = _mm256_set_m128i(
			_mm_set1_epi16((short)((4 * k + 3) << 8 | (4 * k + 2))),
			_mm_set1_epi16((short)((4 * k + 1) << 8 | (4 * k))));

	for (int64_t i = 0; i < nb; i++, b++) {
		const int8_t *xs = v.qs + i * KVQ_QK_K;
		const __m256 dx = _mm256_loadu_ps(v.d + 8 * i);
		const __m256 dd = _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(b->d)),
						dx);
		__m256i sc16 = _mm256_cvtepi8_epi16(
			_mm_loadu_si128((const __m128i *)b->scales));
		__m256i c32 = _mm256_madd_epi16(sc16, _mm256_loadu_si256(
			(const __m256i *)(v.sum + 16 * i)));

		_mm256_store_ps(ddx, dd);
		accc = _mm256_fmadd_ps(to_f32(c32), dd, accc);
		for (int h = 0; h < 2; h++) {
			__m256i sh = _mm256_broadcastsi128_si256(
				_mm_cvtepi8_epi16(_mm_loadl_epi64(
					(const __m128i *)(b->scales + 8 * h))));
			__m256i q[4];

			q6_k_unpack_u(b->ql + 64 * h, b->qh + 32 * h, q);
			for (int k = 0; k < 4; k += 2) {
				const int g = 4 * h + k;
				__m256i p0 = _mm256_maddubs_epi16(q[k],
					load_x32(xs + 32 * g));
				__m256i p1 = _mm256_maddubs_epi16(q[k + 1],
					load_x32(xs + 32 * g + 32));

				p0 = _mm256_madd_epi16(p0,
					_mm256_shuffle_epi8(sh, pick[k]));
				p1 = _mm256_madd_epi16(p1,
					_mm256_shuffle_epi8(sh, pick[k + 1]));
				acc0 = _mm256_fmadd_ps(to_f32(p0),
					_mm256_broadcast_ss(&ddx[g]), acc0);
				acc1 = _mm256_fmadd_ps(to_f32(p1),
					_mm256_broadcast_ss(&ddx[g + 1]), acc1);
			}
		}
	}
	return kvq_hsum8(_mm256_add_ps(acc0, acc1)) - 32.0f * kvq_hsum8(accc);
}

/* ---------------------------------------------------------------- tables */

/*
 * Each kernel in two instances, without and with software prefetch; the
 * distance is a constant in each, so the compiler drops the other branch.
 */
#define KVQ_AVX2_PAIR(type)						\
KVQ_AVX2 static float vec_dot_##type(const void *row, const float *x,	\
				     int64_t n)				\
{									\
	return dot_##type##_row(row, x, n, 0);				\
}									\
KVQ_AVX2 static float vec_dot_##type##_pf(const void *row,		\
					  const float *x, int64_t n)	\
{									\
	return dot_##type##_row(row, x, n, KVQ_PREFETCH_BYTES);		\
}

KVQ_AVX2_PAIR(f32)
KVQ_AVX2_PAIR(f16)
KVQ_AVX2_PAIR(bf16)
KVQ_AVX2_PAIR(q8_0)
KVQ_AVX2_PAIR(q4_0)
KVQ_AVX2_PAIR(q4_k)
KVQ_AVX2_PAIR(q6_k)

KVQ_AVX2 static float dot_f32(const float *a, const float *b, int64_t n)
{
	return dot_row(a, b, n, ROW_F32, 0);
}

KVQ_AVX2 static float dot_f32_pf(const float *a, const float *b, int64_t n)
{
	return dot_row(a, b, n, ROW_F32, KVQ_PREFETCH_BYTES);
}

static const struct kvq_quant_kernels kvq_avx2_kernels = {
	.name = "avx2+fma",
	.dot_f32 = dot_f32,
	.vec_dot = {
		[KVQ_TYPE_F32] = vec_dot_f32,
		[KVQ_TYPE_F16] = vec_dot_f16,
		[KVQ_TYPE_BF16] = vec_dot_bf16,
		[KVQ_TYPE_Q8_0] = vec_dot_q8_0,
		[KVQ_TYPE_Q4_0] = vec_dot_q4_0,
		[KVQ_TYPE_Q4_K] = vec_dot_q4_k,
		[KVQ_TYPE_Q6_K] = vec_dot_q6_k,
	},
	.quantize_act = quantize_act,
	.vec_dot_q8a = {
		[KVQ_TYPE_Q8_0] = dot_q8a_q8_0,
		[KVQ_TYPE_Q4_0] = dot_q8a_q4_0,
		[KVQ_TYPE_Q4_K] = dot_q8a_q4_k,
		[KVQ_TYPE_Q6_K] = dot_q8a_q6_k,
	},
};

static const struct kvq_quant_kernels kvq_avx2_pf_kernels = {
	.name = "avx2+fma",
	.dot_f32 = dot_f32_pf,
	.vec_dot = {
		[KVQ_TYPE_F32] = vec_dot_f32_pf,
		[KVQ_TYPE_F16] = vec_dot_f16_pf,
		[KVQ_TYPE_BF16] = vec_dot_bf16_pf,
		[KVQ_TYPE_Q8_0] = vec_dot_q8_0_pf,
		[KVQ_TYPE_Q4_0] = vec_dot_q4_0_pf,
		[KVQ_TYPE_Q4_K] = vec_dot_q4_k_pf,
		[KVQ_TYPE_Q6_K] = vec_dot_q6_k_pf,
	},
	.quantize_act = quantize_act,
	.vec_dot_q8a = {
		[KVQ_TYPE_Q8_0] = dot_q8a_q8_0,
		[KVQ_TYPE_Q4_0] = dot_q8a_q4_0,
		[KVQ_TYPE_Q4_K] = dot_q8a_q4_k,
		[KVQ_TYPE_Q6_K] = dot_q8a_q6_k,
	},
};

/* F16C from CPUID leaf 1 (not every compiler's __builtin_cpu_supports()
 * knows the name). */
static bool cpu_has_f16c(void)
{
	unsigned int eax, ebx, ecx, edx;

	if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
		return false;
	return (ecx & bit_F16C) != 0;
}

/*
 * kvq_quant_avx2_kernels() - see quant_impl.h.  F16C (vcvtph2ps) is part of
 * the requirement: every AVX2 processor has it, and the F16 row and the
 * block scales use it.  __builtin_cpu_supports("avx2") also checks that
 * the OS saves the AVX state.  Intel processors get the prefetching
 * instances.
 */
const struct kvq_quant_kernels *kvq_quant_avx2_kernels(void)
{
	__builtin_cpu_init();
	if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") ||
	    !cpu_has_f16c())
		return NULL;
	if (__builtin_cpu_is("intel"))
		return &kvq_avx2_pf_kernels;
	return &kvq_avx2_kernels;
}

#endif /* KVQ_HAVE_X86 */
