/*
 * quant.h - the weight tensor types kvqd computes with on the CPU.
 *
 * Why this file exists: weights stay in the block format the GGUF file holds
 * (mapped, never copied), so every matrix product dequantizes blocks on the
 * fly.  This file owns the block layouts of F32, F16, BF16, Q8_0, Q4_0, Q4_K
 * and Q6_K: dequantization bit-exact with the GGUF specification, and dot
 * products of a quantized row with an f32 vector (f32 accumulation), in a
 * scalar version and an AVX2/FMA version chosen once at run time.
 */
#ifndef KVQ_QUANT_H
#define KVQ_QUANT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/gguf.h"

/* true when this file can dequantize and multiply @type. */
bool kvq_quant_supported(uint32_t type);

/*
 * IEEE half <-> float and bfloat16 <-> float.  Widening is exact; narrowing
 * rounds to nearest, ties to even, and keeps subnormals, infinities, signed
 * zeros and NaN (a NaN stays a quiet NaN of the same sign).
 */
float kvq_f16_to_f32(uint16_t h);
uint16_t kvq_f32_to_f16(float f);
float kvq_bf16_to_f32(uint16_t h);
uint16_t kvq_f32_to_bf16(float f);

/*
 * kvq_dequant_row() - expand @n elements of @type starting at @src into @dst.
 * @n must be a multiple of the type's block size.  Returns 0, or -EINVAL
 * for an unsupported type or a bad @n (dst untouched).
 */
int kvq_dequant_row(uint32_t type, const void *src, float *dst, int64_t n);

/*
 * kvq_vec_dot() - dot product of one row of @type (n elements at @row) with
 * the f32 vector @x.  @n must be a multiple of the block size and the type
 * supported (checked at model load, not here: this is the hot path).  The
 * weights are dequantized in registers and everything accumulates in f32;
 * the result is not bit-identical to kvq_vec_dot_scalar() (different
 * summation order).  An unsupported type gives NaN.
 */
float kvq_vec_dot(uint32_t type, const void *row, const float *x, int64_t n);

/* f32 dot product (used by attention and by matmul after dequantizing). */
float kvq_dot_f32(const float *a, const float *b, int64_t n);

/* Same, always the scalar path: the reference twin of the SIMD code. */
float kvq_vec_dot_scalar(uint32_t type, const void *row, const float *x,
			 int64_t n);
float kvq_dot_f32_scalar(const float *a, const float *b, int64_t n);

/*
 * Reference quantizers (deterministic, for tools and tests).  @n is a
 * multiple of 32 (a partial last block is ignored); @dst receives n/32
 * blocks (34 bytes each for Q8_0, 18 for Q4_0).  With id = 1/d:
 * Q8_0: d = amax/127, q = round(x * id), halves away from zero.
 * Q4_0: d = v/-8 where v is the first element of largest magnitude,
 * q = min(15, trunc(x * id + 8.5)), stored as a nibble.
 * Both store d as f16 but compute q from the unrounded f32 d.
 */
void kvq_quantize_row_q8_0(const float *x, void *dst, int64_t n);
void kvq_quantize_row_q4_0(const float *x, void *dst, int64_t n);

/*
 * Int8 activations (the fast, inexact decode path).
 *
 * A matrix-vector product can quantize its f32 input vector once to blocks
 * of 32 int8 values with one f32 scale each (d = amax/127, q = x/d rounded
 * to nearest, ties to even) and then dot every quantized weight row with it
 * in integer arithmetic, scaling per block in f32.  The weights are not
 * touched; the only new error is that of rounding x to 8 bits: at most
 * sum|w_i| * d_i / 2 per product (d_i the scale of x_i's block), in
 * practice under 0.2% of sum|w*x| for random data and up to about 1.3%
 * when a block holds an outlier 30x its neighbours (tests/unit/
 * test_quant_act.c checks these bounds).
 *
 * The buffer that kvq_quantize_act_q8() fills is opaque: the int8 values in
 * element order, then the block scales, then the sum of the int8 values of
 * each half block (16 elements) as int16.  Its size depends only on @n.
 */

/* Bytes that kvq_quantize_act_q8() writes for @n elements (n % 32 == 0). */
size_t kvq_act_q8_bytes(int64_t n);

/*
 * kvq_quantize_act_q8() - quantize the @n f32 values at @x into @dst
 * (kvq_act_q8_bytes(n) bytes, any alignment).  Returns 0, or -EINVAL when
 * @n is not a positive multiple of 32 (dst untouched).  NaN or infinite
 * inputs give an unspecified (but memory-safe) result.
 */
int kvq_quantize_act_q8(const float *x, int64_t n, void *dst);

/* true when kvq_vec_dot_q8act() can multiply rows of @type. */
bool kvq_q8act_supported(uint32_t type);

/*
 * kvq_vec_dot_q8act() - dot product of one row of @type (n elements at @row)
 * with a vector quantized by kvq_quantize_act_q8() with the same @n.
 * Q8_0, Q4_0, Q4_K and Q6_K are supported; for any other type the result is
 * NaN (the caller checks kvq_q8act_supported() once and uses kvq_vec_dot()
 * otherwise).  Integer products are exact; the per-block f32 scaling and
 * summation order differ between the SIMD and scalar versions.
 */
float kvq_vec_dot_q8act(uint32_t type, const void *row, const void *xq,
			int64_t n);

/* The scalar twins of the two above, whatever kvq_quant_simd_name() says. */
int kvq_quantize_act_q8_scalar(const float *x, int64_t n, void *dst);
float kvq_vec_dot_q8act_scalar(uint32_t type, const void *row, const void *xq,
			       int64_t n);

/*
 * How the CPU backend computes matrix-vector products of quantized weights:
 * EXACT dequantizes to f32 (kvq_vec_dot()), INT8 quantizes the input vector
 * and uses kvq_vec_dot_q8act() for the types it supports.
 */
enum kvq_dot_mode {
	KVQ_DOT_EXACT,
	KVQ_DOT_INT8,
};

/*
 * kvq_quant_dot_mode() - the mode in force.  Until kvq_quant_set_dot_mode()
 * is called, the environment variable KVQ_DOT decides ("int8" or "exact",
 * read once; unset, empty or anything else: EXACT, with a warning for a
 * value it does not know).  Safe from any thread.
 */
enum kvq_dot_mode kvq_quant_dot_mode(void);
/* Set the mode for every later product (overrides KVQ_DOT). */
void kvq_quant_set_dot_mode(enum kvq_dot_mode mode);
/* "exact" or "int8". */
const char *kvq_quant_dot_mode_name(enum kvq_dot_mode mode);
/* Parse "exact" or "int8" into *@mode: 0, or -EINVAL (*mode unchanged). */
int kvq_quant_parse_dot_mode(const char *s, enum kvq_dot_mode *mode);

/* "avx2+fma" or "scalar": what kvq_vec_dot() uses now. */
const char *kvq_quant_simd_name(void);

/*
 * true when the AVX2/FMA/F16C kernels are in use (the CPU has them and
 * neither KVQ_NO_SIMD nor kvq_quant_force_scalar() turned them off).  Every
 * other SIMD path of the engine follows this one switch.
 */
bool kvq_quant_simd(void);
/*
 * Force the scalar path (true) or go back to the run-time choice (false).
 * The choice is made once, on first use: the SIMD path when the CPU has
 * AVX2, FMA and F16C, unless the environment variable KVQ_NO_SIMD is set
 * to anything but "" or "0".
 * Safe to call from any thread; calls in flight finish on the old path.
 */
void kvq_quant_force_scalar(bool on);

#endif /* KVQ_QUANT_H */
