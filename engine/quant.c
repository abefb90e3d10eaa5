/*
 * quant.c - tensor types: conversions, dequantization, scalar dot products
 * and the run-time choice between the scalar and SIMD kernels.
 *
 * Why this file exists: it is the portable half of engine/quant.h.  The
 * dequantizers here are the reference: they reproduce the GGUF
 * specification's formulas operation for operation in f32, so their output
 * is bit-identical to any other conforming reader.  The scalar dot products
 * are the plain-C twins of quant_avx2.c and are what a CPU without AVX2 runs.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "engine/log.h"
#include "engine/quant.h"
#include "engine/quant_impl.h"

static inline uint32_t f32_bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline float bits_f32(uint32_t u)
{
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/* ------------------------------------------------------------------ f16 */

/* kvq_f16_to_f32() - exact widening of an IEEE binary16 bit pattern. */
float kvq_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f;
	uint32_t mant = h & 0x3ff;
	int shift;

	if (exp == 0x1f)		/* inf, NaN (payload kept) */
		return bits_f32(sign | 0x7f800000 | (mant << 13));
	if (exp != 0)			/* normal: rebias 15 -> 127 */
		return bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
	if (mant == 0)
		return bits_f32(sign);
	/*
	 * Subnormal: mant * 2^-24.  Move the leading one to bit 10 (the
	 * implicit bit position) and lower the exponent by the same amount.
	 */
	shift = __builtin_clz(mant) - 21;
	mant = (mant << shift) & 0x3ff;
	return bits_f32(sign | ((uint32_t)(113 - shift) << 23) | (mant << 13));
}

/* kvq_f32_to_f16() - narrowing, round to nearest, ties to even. */
uint16_t kvq_f32_to_f16(float f)
{
	uint32_t x = f32_bits(f);
	uint16_t sign = (x >> 16) & 0x8000;
	uint32_t m, r, rem, half;
	int shift;

	x &= 0x7fffffff;
	/* NaN: stays quiet NaN, top payload bits kept */
	if (x > 0x7f800000)
		return sign | 0x7e00 | ((x >> 13) & 0x3ff);
	/* 65520 and up (incl. inf) round to inf */
	if (x >= 0x477ff000)
		return sign | 0x7c00;
	/* from 2^-14: normal half; a carry into the exponent is right */
	if (x >= 0x38800000) {
		r = ((x >> 23) - 112) << 10 | ((x >> 13) & 0x3ff);
		rem = x & 0x1fff;
		if (rem > 0x1000 || (rem == 0x1000 && (r & 1)))
			r++;
		return sign | r;
	}
	/* up to 2^-25 (a tie with zero, which is even): zero */
	if (x <= 0x33000000)
		return sign;
	/*
	 * Subnormal half: the result counts units of 2^-24.  With the
	 * implicit bit, x is m * 2^(e-150), i.e. m >> (126 - e) units.
	 * Rounding up to 0x400 yields the smallest normal, also correct.
	 */
	m = (x & 0x7fffff) | 0x800000;
	shift = 126 - (int)(x >> 23);
	r = m >> shift;
	rem = m & ((1u << shift) - 1);
	half = 1u << (shift - 1);
	if (rem > half || (rem == half && (r & 1)))
		r++;
	return sign | r;
}

/* kvq_bf16_to_f32() - exact: bfloat16 is the top half of an f32. */
float kvq_bf16_to_f32(uint16_t h)
{
	return bits_f32((uint32_t)h << 16);
}

/* kvq_f32_to_bf16() - round to nearest even; NaN stays a quiet NaN. */
uint16_t kvq_f32_to_bf16(float f)
{
	uint32_t x = f32_bits(f);

	if ((x & 0x7fffffff) > 0x7f800000)
		return (x >> 16) | 0x40;
	return (x + 0x7fff + ((x >> 16) & 1)) >> 16;
}

/* -------------------------------------------------------- dequantization */

/*
 * The reference rounds d*sc*q to f32 before it subtracts the min.  A build
 * whose target fuses multiply-add (-mfma, -march=native) would otherwise be
 * allowed to contract the two, so there the product goes through memory.
 */
#ifdef __FP_FAST_FMAF
static inline float rounded_f32(float v)
{
	volatile float r = v;

	return r;
}
#else
#define rounded_f32(v) (v)
#endif

static void dequant_f32(const void *src, float *dst, int64_t nb)
{
	memcpy(dst, src, (size_t)nb * sizeof(float));
}

static void dequant_f16(const void *src, float *dst, int64_t nb)
{
	const uint16_t *h = src;

	for (int64_t i = 0; i < nb; i++)
		dst[i] = kvq_f16_to_f32(h[i]);
}

static void dequant_bf16(const void *src, float *dst, int64_t nb)
{
	const uint16_t *h = src;

	for (int64_t i = 0; i < nb; i++)
		dst[i] = kvq_bf16_to_f32(h[i]);
}

static void dequant_q8_0(const void *src, float *dst, int64_t nb)
{
	const struct kvq_block_q8_0 *b = src;

	for (int64_t i = 0; i < nb; i++, b++, dst += KVQ_QK8_0) {
		const float d = kvq_f16_to_f32(b->d);

		for (int j = 0; j < KVQ_QK8_0; j++)
			dst[j] = b->qs[j] * d;
	}
}

static void dequant_q4_0(const void *src, float *dst, int64_t nb)
{
	const struct kvq_block_q4_0 *b = src;

	for (int64_t i = 0; i < nb; i++, b++, dst += KVQ_QK4_0) {
		const float d = kvq_f16_to_f32(b->d);

		for (int j = 0; j < KVQ_QK4_0 / 2; j++) {
			dst[j] = ((b->qs[j] & 0x0f) - 8) * d;
			dst[j + KVQ_QK4_0 / 2] = ((b->qs[j] >> 4) - 8) * d;
		}
	}
}

static void dequant_q4_k(const void *src, float *dst, int64_t nb)
{
	const struct kvq_block_q4_k *b = src;

	for (int64_t i = 0; i < nb; i++, b++) {
		const float d = kvq_f16_to_f32(b->d);
		const float dmin = kvq_f16_to_f32(b->dmin);
		const uint8_t *q = b->qs;

		for (int c = 0; c < 4; c++, q += 32, dst += 64) {
			uint8_t sc, m;
			float d1, m1, d2, m2;

			kvq_q4k_scale_min(2 * c, b->scales, &sc, &m);
			d1 = d * sc;
			m1 = dmin * m;
			kvq_q4k_scale_min(2 * c + 1, b->scales, &sc, &m);
			d2 = d * sc;
			m2 = dmin * m;
			for (int l = 0; l < 32; l++) {
				int lo = q[l] & 0x0f, hi = q[l] >> 4;

				dst[l] = rounded_f32(d1 * lo) - m1;
				dst[l + 32] = rounded_f32(d2 * hi) - m2;
			}
		}
	}
}

static void dequant_q6_k(const void *src, float *dst, int64_t nb)
{
	const struct kvq_block_q6_k *b = src;

	for (int64_t i = 0; i < nb; i++, b++) {
		const float d = kvq_f16_to_f32(b->d);
		const uint8_t *ql = b->ql;
		const uint8_t *qh = b->qh;
		const int8_t *sc = b->scales;

		for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8) {
			for (int l = 0; l < 32; l++) {
				int s = l / 16;
				int q1 = ((ql[l] & 0x0f) |
					  ((qh[l] & 0x03) << 4)) - 32;
				int q2 = ((ql[l + 32] & 0x0f) |
					  (((qh[l] >> 2) & 0x03) << 4)) - 32;
				int q3 = ((ql[l] >> 4) |
					  (((qh[l] >> 4) & 0x03) << 4)) - 32;
				int q4 = ((ql[l + 32] >> 4) |
					  (((qh[l] >> 6) & 0x03) << 4)) - 32;

				/* (d * scale) * q, in this order */
				dst[l] = d * sc[s] * q1;
				dst[l + 32] = d * sc[s + 2] * q2;
				dst[l + 64] = d * sc[s + 4] * q3;
				dst[l + 96] = d * sc[s + 6] * q4;
			}
			dst += 128;
		}
	}
}

/* What quant.c knows about each supported type; zeroed entries: none. */
struct kvq_type_desc {
	uint32_t block_elems;
	uint32_t block_bytes;
	void (*dequant)(const void *src, float *dst, int64_t nblocks);
};

static const struct kvq_type_desc kvq_types[KVQ_TYPE_COUNT] = {
	[KVQ_TYPE_F32] = { 1, 4, dequant_f32 },
	[KVQ_TYPE_F16] = { 1, 2, dequant_f16 },
	[KVQ_TYPE_BF16] = { 1, 2, dequant_bf16 },
	[KVQ_TYPE_Q8_0] = { KVQ_QK8_0, sizeof(struct kvq_block_q8_0),
			    dequant_q8_0 },
	[KVQ_TYPE_Q4_0] = { KVQ_QK4_0, sizeof(struct kvq_block_q4_0),
			    dequant_q4_0 },
	[KVQ_TYPE_Q4_K] = { KVQ_QK_K, sizeof(struct kvq_block_q4_k),
			    dequant_q4_k },
	[KVQ_TYPE_Q6_K] = { KVQ_QK_K, sizeof(struct kvq_block_q6_k),
			    dequant_q6_k },
};

static const struct kvq_type_desc *type_desc(uint32_t type)
{
	if (type >= KVQ_TYPE_COUNT || !kvq_types[type].dequant)
		return NULL;
	return &kvq_types[type];
}

/* kvq_quant_supported() - see quant.h. */
bool kvq_quant_supported(uint32_t type)
{
	return type_desc(type) != NULL;
}

/* kvq_dequant_row() - see quant.h. */
int kvq_dequant_row(uint32_t type, const void *src, float *dst, int64_t n)
{
	const struct kvq_type_desc *t = type_desc(type);

	if (!t || n < 0 || n % t->block_elems)
		return -EINVAL;
	if (kvq_dequant_row_avx2(type, src, dst, n))
		return 0;
	t->dequant(src, dst, n / t->block_elems);
	return 0;
}

/* ------------------------------------------------------- scalar kernels */

/*
 * kvq_dot_f32_scalar() - see quant.h.  Eight running sums, element i going
 * to sum i % 8, then added pairwise: the order is fixed (no -ffast-math
 * needed), the compiler may keep the eight sums in vector lanes, and the
 * rounding error grows more slowly than with a single sum.
 */
float kvq_dot_f32_scalar(const float *a, const float *b, int64_t n)
{
	float acc[8] = { 0 };
	int64_t i = 0;
	float sum;

	for (; i + 8 <= n; i += 8)
		for (int k = 0; k < 8; k++)
			acc[k] += a[i + k] * b[i + k];
	sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
	      ((acc[4] + acc[5]) + (acc[6] + acc[7]));
	for (; i < n; i++)
		sum += a[i] * b[i];
	return sum;
}

/*
 * The scalar dot product is literally "dequantize, then dot": up to 256
 * elements at a time go through the reference dequantizer into a stack
 * buffer, and the per-chunk sums add up in f32.
 */
#define SCALAR_CHUNK 256

static float vec_dot_generic(const struct kvq_type_desc *t, const void *row,
			     const float *x, int64_t n)
{
	const int64_t chunk = SCALAR_CHUNK / t->block_elems * t->block_elems;
	const uint8_t *src = row;
	float buf[SCALAR_CHUNK];
	float sum = 0.0f;

	for (int64_t i = 0; i < n; i += chunk) {
		int64_t m = n - i < chunk ? n - i : chunk;
		int64_t nb = m / t->block_elems;

		t->dequant(src, buf, nb);
		sum += kvq_dot_f32_scalar(buf, x + i, m);
		src += nb * t->block_bytes;
	}
	return sum;
}

#define SCALAR_VEC_DOT(name, type)					\
static float name(const void *row, const float *x, int64_t n)		\
{									\
	return vec_dot_generic(&kvq_types[type], row, x, n);		\
}

static float vec_dot_f32_scalar(const void *row, const float *x, int64_t n)
{
	return kvq_dot_f32_scalar(row, x, n);
}

SCALAR_VEC_DOT(vec_dot_f16_scalar, KVQ_TYPE_F16)
SCALAR_VEC_DOT(vec_dot_bf16_scalar, KVQ_TYPE_BF16)
SCALAR_VEC_DOT(vec_dot_q8_0_scalar, KVQ_TYPE_Q8_0)
SCALAR_VEC_DOT(vec_dot_q4_0_scalar, KVQ_TYPE_Q4_0)
SCALAR_VEC_DOT(vec_dot_q4_k_scalar, KVQ_TYPE_Q4_K)
SCALAR_VEC_DOT(vec_dot_q6_k_scalar, KVQ_TYPE_Q6_K)

/* --------------------------------------------- scalar int8 activations */

/*
 * kvq_quantize_act_q8_scalar's worker: per block, d from the largest
 * magnitude, q = x * (1/d) rounded to nearest even (lrintf in the default
 * rounding mode, as vcvtps2dq), and the two half-block sums.
 */
static void quantize_act_scalar(const float *x, int64_t n, void *dst)
{
	struct kvq_act_q8_view v = kvq_act_q8_view(dst, n);

	for (int64_t b = 0; b < n / KVQ_QK_ACT; b++, x += KVQ_QK_ACT) {
		int8_t *q = v.qs + b * KVQ_QK_ACT;
		float amax = 0.0f, id;
		int s0 = 0, s1 = 0;

		for (int j = 0; j < KVQ_QK_ACT; j++)
			amax = fmaxf(amax, fabsf(x[j]));
		v.d[b] = kvq_act_block_scale(amax, &id);
		for (int j = 0; j < KVQ_QK_ACT; j++)
			q[j] = (int8_t)lrintf(x[j] * id);
		for (int j = 0; j < KVQ_QK_ACT / 2; j++) {
			s0 += q[j];
			s1 += q[j + KVQ_QK_ACT / 2];
		}
		v.sum[2 * b] = (int16_t)s0;
		v.sum[2 * b + 1] = (int16_t)s1;
	}
}

/*
 * The scalar dot products compute every block's integer sum exactly and
 * scale it in f32: sum += (d_w * d_x) * isum, in block order.
 */
static float dot_q8a_q8_0_scalar(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q8_0 *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	float sum = 0.0f;

	for (int64_t i = 0; i < n / KVQ_QK8_0; i++, b++) {
		const int8_t *q = v.qs + i * KVQ_QK8_0;
		int32_t isum = 0;

		for (int j = 0; j < KVQ_QK8_0; j++)
			isum += b->qs[j] * q[j];
		sum += kvq_f16_to_f32(b->d) * v.d[i] * (float)isum;
	}
	return sum;
}

static float dot_q8a_q4_0_scalar(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q4_0 *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	float sum = 0.0f;

	for (int64_t i = 0; i < n / KVQ_QK4_0; i++, b++) {
		const int8_t *q = v.qs + i * KVQ_QK4_0;
		int32_t isum = 0;

		for (int j = 0; j < KVQ_QK4_0 / 2; j++) {
			isum += ((b->qs[j] & 0x0f) - 8) * q[j];
			isum += ((b->qs[j] >> 4) - 8) * q[j + KVQ_QK4_0 / 2];
		}
		sum += kvq_f16_to_f32(b->d) * v.d[i] * (float)isum;
	}
	return sum;
}

/*
 * Q4_K: sub-block s of super-block i lines up with activation block
 * 8i + s; its weights are d*sc*q - dmin*m, so it adds
 * d*sc*dx * sum(q * qx) - dmin*m*dx * sum(qx).
 */
static float dot_q8a_q4_k_scalar(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q4_k *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	float sum = 0.0f, msum = 0.0f;

	for (int64_t i = 0; i < n / KVQ_QK_K; i++, b++) {
		const float d = kvq_f16_to_f32(b->d);
		const float dmin = kvq_f16_to_f32(b->dmin);

		for (int s = 0; s < 8; s++) {
			int64_t ab = 8 * i + s;
			const int8_t *q = v.qs + ab * KVQ_QK_ACT;
			const uint8_t *w = b->qs + 32 * (s / 2);
			int shift = 4 * (s & 1);
			int32_t isum = 0;
			uint8_t sc, m;

			kvq_q4k_scale_min(s, b->scales, &sc, &m);
			for (int l = 0; l < 32; l++)
				isum += ((w[l] >> shift) & 0x0f) * q[l];
			sum += d * sc * v.d[ab] * (float)isum;
			msum += dmin * m * v.d[ab] *
				(float)(v.sum[2 * ab] + v.sum[2 * ab + 1]);
		}
	}
	return sum - msum;
}

/*
 * Q6_K: sub-blocks of 16, two per activation block; weights
 * d*sc*(q - 32) with q unsigned, so sub-block s adds
 * d*dx * sc * (sum(q * qx) - 32 * sum(qx)), all but d*dx in integers.
 */
static float dot_q8a_q6_k_scalar(const void *row, const void *xq, int64_t n)
{
	const struct kvq_block_q6_k *b = row;
	struct kvq_act_q8_view v = kvq_act_q8_view(xq, n);
	float sum = 0.0f;

	for (int64_t i = 0; i < n / KVQ_QK_K; i++, b++) {
		const float d = kvq_f16_to_f32(b->d);
		uint8_t w[KVQ_QK_K];

		kvq_q6k_codes(b, w);
		for (int g = 0; g < 8; g++) {
			int64_t ab = 8 * i + g;
			const int8_t *q = v.qs + ab * KVQ_QK_ACT;
			int32_t isum = 0;

			for (int h = 0; h < 2; h++) {
				int s = 2 * g + h;
				int32_t t = 0;

				for (int l = 16 * h; l < 16 * h + 16; l++)
					t += w[32 * g + l] * q[l];
				isum += b->scales[s] *
					(t - 32 * v.sum[2 * ab + h]);
			}
			sum += d * v.d[ab] * (float)isum;
		}
	}
	return sum;
}

static const struct kvq_quant_kernels kvq_scalar_kernels = {
	.name = "scalar",
	.dot_f32 = kvq_dot_f32_scalar,
	.vec_dot = {
		[KVQ_TYPE_F32] = vec_dot_f32_scalar,
		[KVQ_TYPE_F16] = vec_dot_f16_scalar,
		[KVQ_TYPE_BF16] = vec_dot_bf16_scalar,
		[KVQ_TYPE_Q8_0] = vec_dot_q8_0_scalar,
		[KVQ_TYPE_Q4_0] = vec_dot_q4_0_scalar,
		[KVQ_TYPE_Q4_K] = vec_dot_q4_k_scalar,
		[KVQ_TYPE_Q6_K] = vec_dot_q6_k_scalar,
	},
	.quantize_act = quantize_act_scalar,
	.vec_dot_q8a = {
		[KVQ_TYPE_Q8_0] = dot_q8a_q8_0_scalar,
		[KVQ_TYPE_Q4_0] = dot_q8a_q4_0_scalar,
		[KVQ_TYPE_Q4_K] = dot_q8a_q4_k_scalar,
		[KVQ_TYPE_Q6_K] = dot_q8a_q6_k_scalar,
	},
};

/* kvq_vec_dot_scalar() - see quant.h. */
float kvq_vec_dot_scalar(uint32_t type, const void *row, const float *x,
			 int64_t n)
{
	if (!type_desc(type))
		return NAN;
	return kvq_scalar_kernels.vec_dot[type](row, x, n);
}

/* ------------------------------------------------------------- dispatch */

/*
 * kvq_best is written once under kvq_once; kvq_active is what the hot path
 * reads (NULL until the first call) and what kvq_quant_force_scalar()
 * swaps.  Both tables are immutable and static, so publishing the pointer
 * with release/acquire is all a caller needs to see one complete table.
 */
static pthread_once_t kvq_once = PTHREAD_ONCE_INIT;
static const struct kvq_quant_kernels *kvq_best;
static _Atomic(const struct kvq_quant_kernels *) kvq_active;

static void kvq_quant_choose(void)
{
	const struct kvq_quant_kernels *k = kvq_quant_avx2_kernels();
	const char *env = getenv("KVQ_NO_SIMD");

	if (!k || (env && env[0] && strcmp(env, "0") != 0))
		k = &kvq_scalar_kernels;
	kvq_best = k;
	atomic_store_explicit(&kvq_active, k, memory_order_release);
}

static inline const struct kvq_quant_kernels *kernels(void)
{
	const struct kvq_quant_kernels *k;

	k = atomic_load_explicit(&kvq_active, memory_order_acquire);
	if (__builtin_expect(k == NULL, 0)) {
		pthread_once(&kvq_once, kvq_quant_choose);
		k = atomic_load_explicit(&kvq_active, memory_order_acquire);
	}
	return k;
}

bool kvq_quant_simd(void)
{
	return kernels() != &kvq_scalar_kernels;
}

/* kvq_quant_force_scalar() - see quant.h. */
void kvq_quant_force_scalar(bool on)
{
	pthread_once(&kvq_once, kvq_quant_choose);
	atomic_store_explicit(&kvq_active, on ? &kvq_scalar_kernels : kvq_best,
			      memory_order_release);
}

/* kvq_quant_simd_name() - see quant.h. */
const char *kvq_quant_simd_name(void)
{
	return kernels()->name;
}

/* kvq_vec_dot() - see quant.h. */
float kvq_vec_dot(uint32_t type, const void *row, const float *x, int64_t n)
{
	kvq_vec_dot_fn fn;

	if (type >= KVQ_TYPE_COUNT)
		return NAN;
	fn = kernels()->vec_dot[type];
	return fn ? fn(row, x, n) : NAN;
}

/* kvq_dot_f32() - see quant.h. */
float kvq_dot_f32(const float *a, const float *b, int64_t n)
{
	return kernels()->dot_f32(a, b, n);
}

/* ---------------------------------------------------- int8 activations */

/* kvq_act_q8_bytes() - see quant.h. */
size_t kvq_act_q8_bytes(int64_t n)
{
	int64_t nb = n > 0 ? n / KVQ_QK_ACT : 0;

	return (size_t)nb * (KVQ_QK_ACT + sizeof(float) + 2 * sizeof(int16_t));
}

static bool act_n_ok(int64_t n)
{
	return n > 0 && n % KVQ_QK_ACT == 0;
}

/* kvq_quantize_act_q8() - see quant.h. */
int kvq_quantize_act_q8(const float *x, int64_t n, void *dst)
{
	if (!act_n_ok(n))
		return -EINVAL;
	kernels()->quantize_act(x, n, dst);
	return 0;
}

/* kvq_quantize_act_q8_scalar() - see quant.h. */
int kvq_quantize_act_q8_scalar(const float *x, int64_t n, void *dst)
{
	if (!act_n_ok(n))
		return -EINVAL;
	quantize_act_scalar(x, n, dst);
	return 0;
}

/* kvq_q8act_supported() - see quant.h. */
bool kvq_q8act_supported(uint32_t type)
{
	return type < KVQ_TYPE_COUNT && kvq_scalar_kernels.vec_dot_q8a[type];
}

/* kvq_vec_dot_q8act() - see quant.h. */
float kvq_vec_dot_q8act(uint32_t type, const void *row, const void *xq,
			int64_t n)
{
	kvq_vec_dot_q8a_fn fn;

	if (type >= KVQ_TYPE_COUNT)
		return NAN;
	fn = kernels()->vec_dot_q8a[type];
	return fn ? fn(row, xq, n) : NAN;
}

/* kvq_vec_dot_q8act_scalar() - see quant.h. */
float kvq_vec_dot_q8act_scalar(uint32_t type, const void *row, const void *xq,
			       int64_t n)
{
	if (!kvq_q8act_supported(type))
		return NAN;
	return kvq_scalar_kernels.vec_dot_q8a[type](row, xq, n);
}

/*
 * The dot mode: -1 until first read or set.  The first reader parses
 * KVQ_DOT and publishes the result with a compare-exchange, so a
 * concurrent kvq_quant_set_dot_mode() is never overwritten by it.
 */
static _Atomic int kvq_dot_mode_v = -1;

/* kvq_quant_parse_dot_mode() - see quant.h. */
int kvq_quant_parse_dot_mode(const char *s, enum kvq_dot_mode *mode)
{
	if (!s)
		return -EINVAL;
	if (!strcmp(s, "exact"))
		*mode = KVQ_DOT_EXACT;
	else if (!strcmp(s, "int8"))
		*mode = KVQ_DOT_INT8;
	else
		return -EINVAL;
	return 0;
}

/* kvq_quant_dot_mode_name() - see quant.h. */
const char *kvq_quant_dot_mode_name(enum kvq_dot_mode mode)
{
	return mode == KVQ_DOT_INT8 ? "int8" : "exact";
}

/* kvq_quant_dot_mode() - see quant.h. */
enum kvq_dot_mode kvq_quant_dot_mode(void)
{
	int m = atomic_load_explicit(&kvq_dot_mode_v, memory_order_relaxed);
	enum kvq_dot_mode parsed = KVQ_DOT_EXACT;
	const char *env;

	if (__builtin_expect(m >= 0, 1))
		return (enum kvq_dot_mode)m;
	env = getenv("KVQ_DOT");
	if (env && env[0] && kvq_quant_parse_dot_mode(env, &parsed))
		kvq_warn("KVQ_DOT=%s: expected \"int8\" or \"exact\"; using exact",
			 env);
	if (atomic_compare_exchange_strong(&kvq_dot_mode_v, &m, (int)parsed))
		return parsed;
	return (enum kvq_dot_mode)m;
}

/* kvq_quant_set_dot_mode() - see quant.h. */
void kvq_quant_set_dot_mode(enum kvq_dot_mode mode)
{
	atomic_store_explicit(&kvq_dot_mode_v, (int)mode,
			      memory_order_relaxed);
}

/* ----------------------------------------------------------- quantizers */

/* kvq_quantize_row_q8_0() - see quant.h. */
void kvq_quantize_row_q8_0(const float *x, void *dst, int64_t n)
{
	struct kvq_block_q8_0 *b = dst;

	for (int64_t i = 0; i < n / KVQ_QK8_0; i++, b++, x += KVQ_QK8_0) {
		float amax = 0.0f;
		float d, id;

		for (int j = 0; j < KVQ_QK8_0; j++)
			amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
		d = amax / 127;
		id = d != 0.0f ? 1.0f / d : 0.0f;
		b->d = kvq_f32_to_f16(d);
		for (int j = 0; j < KVQ_QK8_0; j++)
			b->qs[j] = (int8_t)roundf(x[j] * id);
	}
}

/* kvq_quantize_row_q4_0() - see quant.h. */
void kvq_quantize_row_q4_0(const float *x, void *dst, int64_t n)
{
	struct kvq_block_q4_0 *b = dst;

	for (int64_t i = 0; i < n / KVQ_QK4_0; i++, b++, x += KVQ_QK4_0) {
		float amax = 0.0f, max = 0.0f;
		float d, id;

		for (int j = 0; j < KVQ_QK4_0; j++) {
			if (amax < fabsf(x[j])) {
				amax = fabsf(x[j]);
				max = x[j];
			}
		}
		/* The extreme maps to -8 exactly; its opposite clamps to 15. */
		d = max / -8;
		id = d != 0.0f ? 1.0f / d : 0.0f;
		b->d = kvq_f32_to_f16(d);
		for (int j = 0; j < KVQ_QK4_0 / 2; j++) {
			int q0 = (int)(x[j] * id + 8.5f);
			int q1 = (int)(x[j + KVQ_QK4_0 / 2] * id + 8.5f);

			q0 = q0 < 0 ? 0 : q0 > 15 ? 15 : q0;
			q1 = q1 < 0 ? 0 : q1 > 15 ? 15 : q1;
			b->qs[j] = (uint8_t)(q0 | q1 << 4);
		}
	}
}
