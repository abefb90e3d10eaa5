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

/* IEEE half <-> float (round to nearest even), and bfloat16 -> float. */
float kvq_f16_to_f32(uint16_t h);
uint16_t kvq_f32_to_f16(float f);
float kvq_bf16_to_f32(uint16_t h);

/*
 * kvq_dequant_row() - expand @n elements of @type starting at @src into @dst.
 * @n must be a multiple of the type's block size.  Returns 0, or -EINVAL
 * for an unsupported type or a bad @n (dst untouched).
 */
int kvq_dequant_row(uint32_t type, const void *src, float *dst, int64_t n);

/*
 * kvq_vec_dot() - dot product of one row of @type (n elements at @row) with
 * the f32 vector @x.  @n must be a multiple of the block size and the type
 * supported (checked at model load, not here: this is the hot path).
 */
float kvq_vec_dot(uint32_t type, const void *row, const float *x, int64_t n);

/* f32 dot product (used by attention and by matmul after dequantizing). */
float kvq_dot_f32(const float *a, const float *b, int64_t n);

/* Same, always the scalar path: the reference twin of the SIMD code. */
float kvq_vec_dot_scalar(uint32_t type, const void *row, const float *x,
			 int64_t n);
float kvq_dot_f32_scalar(const float *a, const float *b, int64_t n);

/* "avx2+fma" or "scalar": what kvq_vec_dot() uses on this CPU. */
const char *kvq_quant_simd_name(void);
/* Force the scalar path (tests, and the KVQ_NO_SIMD environment variable). */
void kvq_quant_force_scalar(bool on);

#endif /* KVQ_QUANT_H */
