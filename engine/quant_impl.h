/*
 * quant_impl.h - block layouts and kernel tables shared by quant.c and
 * quant_avx2.c.
 *
 * Why this file exists: the portable code (quant.c) and the AVX2 code
 * (quant_avx2.c, compiled for the baseline ISA with per-function target
 * attributes) must agree on the byte layout of every block and on the shape
 * of the kernel table that quant.c picks at run time.  Nothing outside
 * engine/quant*.c includes this header.
 *
 * Include "config.h" before this file: KVQ_HAVE_X86 decides whether the AVX2
 * table exists or is a stub that reports "not available".
 */
#ifndef KVQ_QUANT_IMPL_H
#define KVQ_QUANT_IMPL_H

#include <stdint.h>
#include <string.h>

#include "engine/gguf.h"

#define KVQ_QK8_0	32	/* elements per Q8_0 block */
#define KVQ_QK4_0	32	/* elements per Q4_0 block */
#define KVQ_QK_K	256	/* elements per K-quant super-block */
#define KVQ_K_SCALE_BYTES 12	/* packed 6-bit scales/mins of Q4_K */

/*
 * Block layouts, exactly as they lie in a GGUF file (little-endian; the f16
 * fields are IEEE binary16 bit patterns).  Every member has alignment 1 or 2
 * and the sizes below leave no padding, so the structs map file bytes 1:1.
 */

/* Q8_0: x[j] = d * qs[j]. */
struct kvq_block_q8_0 {
	uint16_t d;
	int8_t qs[KVQ_QK8_0];
};

/* Q4_0: x[j] = d * ((qs[j] & 15) - 8), x[j + 16] = d * ((qs[j] >> 4) - 8). */
struct kvq_block_q4_0 {
	uint16_t d;
	uint8_t qs[KVQ_QK4_0 / 2];
};

/*
 * Q4_K: 8 sub-blocks of 32.  Sub-block s has a 6-bit scale sc[s] and a 6-bit
 * min m[s] packed in scales[] (see kvq_q4k_scale_min()); x = d*sc*q - dmin*m.
 * qs[] holds 4 chunks of 32 bytes: chunk c carries sub-block 2c in its low
 * nibbles and sub-block 2c+1 in its high nibbles.
 */
struct kvq_block_q4_k {
	uint16_t d;
	uint16_t dmin;
	uint8_t scales[KVQ_K_SCALE_BYTES];
	uint8_t qs[KVQ_QK_K / 2];
};

/*
 * Q6_K: 16 sub-blocks of 16 with signed 8-bit scales; x = d*scales[s]*(q-32).
 * The super-block is two halves of 128; in half h, for l in 0..31:
 *   element  l      : low nibble of ql[64h + l],      bits 0-1 of qh[32h + l]
 *   element  l + 32 : low nibble of ql[64h + l + 32], bits 2-3 of qh[32h + l]
 *   element  l + 64 : high nibble of ql[64h + l],     bits 4-5 of qh[32h + l]
 *   element  l + 96 : high nibble of ql[64h + l + 32],bits 6-7 of qh[32h + l]
 * (the qh bits are the top two bits of the 6-bit q).
 */
struct kvq_block_q6_k {
	uint8_t ql[KVQ_QK_K / 2];
	uint8_t qh[KVQ_QK_K / 4];
	int8_t scales[KVQ_QK_K / 16];
	uint16_t d;
};

_Static_assert(sizeof(struct kvq_block_q8_0) == 34, "Q8_0 block size");
_Static_assert(sizeof(struct kvq_block_q4_0) == 18, "Q4_0 block size");
_Static_assert(sizeof(struct kvq_block_q4_k) == 144, "Q4_K block size");
_Static_assert(sizeof(struct kvq_block_q6_k) == 210, "Q6_K block size");

/*
 * kvq_q4k_scale_min() - 6-bit scale and min of sub-block @j (0..7) from the
 * 12 packed bytes @q.  Sub-blocks 0-3 keep their scale in the low 6 bits of
 * q[j] and their min in the low 6 bits of q[j + 4]; sub-blocks 4-7 keep the
 * low 4 bits of both in q[j + 4] (scale low nibble, min high nibble) and the
 * top 2 bits in the spare top bits of q[j - 4] (scale) and q[j] (min).
 */
static inline void kvq_q4k_scale_min(int j, const uint8_t *q, uint8_t *sc,
				     uint8_t *m)
{
	if (j < 4) {
		*sc = q[j] & 63;
		*m = q[j + 4] & 63;
	} else {
		*sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
		*m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
	}
}

/*
 * kvq_q6k_codes() - the 6-bit codes q (0..63) of Q6_K block @b in element
 * order: @w[e] for element e, whose weight is d * scales[e / 16] * (q - 32).
 */
static inline void kvq_q6k_codes(const struct kvq_block_q6_k *b,
				 uint8_t w[KVQ_QK_K])
{
	for (int h = 0; h < 2; h++) {
		const uint8_t *ql = b->ql + 64 * h;
		const uint8_t *qh = b->qh + 32 * h;
		uint8_t *o = w + 128 * h;

		for (int l = 0; l < 32; l++) {
			o[l] = (ql[l] & 0x0f) | (qh[l] & 3) << 4;
			o[l + 32] = (ql[l + 32] & 0x0f) | (qh[l] >> 2 & 3) << 4;
			o[l + 64] = (ql[l] >> 4) | (qh[l] >> 4 & 3) << 4;
			o[l + 96] = (ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4;
		}
	}
}

/*
 * An activation vector quantized by kvq_quantize_act_q8(), n elements in
 * nb = n/32 blocks: x[32b + j] ~= d[b] * qs[32b + j].  The three arrays lie
 * one after the other in this order (n + 4*nb + 4*nb bytes): the int8
 * values first, so that SIMD code reads them 32 at a time; the scales
 * next, so that the eight scales of a 256-element super-block are one
 * vector load; and last sum[2b] and sum[2b + 1], the sums of qs over the
 * first and second 16 elements of block b (|sum| <= 16 * 127), which turn
 * the offset of an unsigned weight format (Q4_K's min, Q6_K's 32) into one
 * integer product per half block.
 */
#define KVQ_QK_ACT	32	/* elements per activation block */

struct kvq_act_q8_view {
	int8_t *qs;
	float *d;
	int16_t *sum;
};

static inline struct kvq_act_q8_view kvq_act_q8_view(const void *buf,
						     int64_t n)
{
	uint8_t *p = (uint8_t *)buf;
	int64_t nb = n / KVQ_QK_ACT;
	struct kvq_act_q8_view v = {
		.qs = (int8_t *)p,
		.d = (float *)(p + n),
		.sum = (int16_t *)(p + n + 4 * nb),
	};

	return v;
}

/* Dot product of n elements of one row with an f32 vector. */
typedef float (*kvq_vec_dot_fn)(const void *row, const float *x, int64_t n);
/* Dot product of n elements of one row with a quantized activation. */
typedef float (*kvq_vec_dot_q8a_fn)(const void *row, const void *xq,
				    int64_t n);

/* One implementation of the hot-path kernels (scalar or a SIMD flavour). */
struct kvq_quant_kernels {
	const char *name;
	float (*dot_f32)(const float *a, const float *b, int64_t n);
	kvq_vec_dot_fn vec_dot[KVQ_TYPE_COUNT];	/* NULL: unsupported */
	/* n a positive multiple of 32, checked by the caller */
	void (*quantize_act)(const float *x, int64_t n, void *dst);
	kvq_vec_dot_q8a_fn vec_dot_q8a[KVQ_TYPE_COUNT]; /* NULL: none */
};

/*
 * kvq_act_block_scale() - the scale of one activation block from its
 * largest magnitude, and its inverse; both 0 for a block that is all zero
 * or so small that 1/d would overflow.  Shared so that the scalar and SIMD
 * quantizers agree bit for bit.
 */
static inline float kvq_act_block_scale(float amax, float *id)
{
	float d;

	if (!(amax >= 1e-30f)) {
		*id = 0.0f;
		return 0.0f;
	}
	d = amax / 127;
	*id = 1.0f / d;
	return d;
}

#ifdef KVQ_HAVE_X86
/*
 * kvq_quant_avx2_kernels() - the AVX2/FMA/F16C table, or NULL when this CPU
 * lacks one of those extensions.  Safe to call from any thread.
 */
const struct kvq_quant_kernels *kvq_quant_avx2_kernels(void);
#else
static inline const struct kvq_quant_kernels *kvq_quant_avx2_kernels(void)
{
	return NULL;
}
#endif

/* AVX2 row dequantization (dequant_avx2.c), bit-exact with the reference
 * dequantizers; false when the type or CPU has no SIMD version. */
bool kvq_dequant_row_avx2(uint32_t type, const void *src, float *dst,
			  int64_t n);

#endif /* KVQ_QUANT_IMPL_H */
