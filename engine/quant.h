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

/* "avx2+fma" or "scalar": what kvq_vec_dot() uses now. */
const char *kvq_quant_simd_name(void);
/*
 * Force the scalar path (true) or go back to the run-time choice (false).
 * The choice is made once, on first use: the SIMD path when the CPU has
 * AVX2, FMA and F16C, unless the environment variable KVQ_NO_SIMD is set
 * to anything but "" or "0".
 * Safe to call from any thread; calls in flight finish on the old path.
 */
void kvq_quant_force_scalar(bool on);

#endif /* KVQ_QUANT_H */
