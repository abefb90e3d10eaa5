/*
 * gemm.h - f32 matrix products for prompt processing.
 *
 * Why this file exists: decode multiplies each weight row with one vector
 * (engine/quant.h dot products, bandwidth bound), but a prompt multiplies it
 * with many: there the work is compute bound, and a register-blocked kernel
 * that reuses each loaded weight and activation several times is what
 * keeps prefill fast.  Quantized rows are dequantized once per block of
 * rows into f32 and then multiplied here.
 */
#ifndef KVQ_GEMM_H
#define KVQ_GEMM_H

#include <stddef.h>
#include <stdint.h>

/*
 * kvq_gemm_f32() - y[t * ldy + r] = dot(w + r * ldw, x + t * ldx) over
 * @cols elements, for r < n_rows and t < n_tok.  f32 accumulation.
 */
void kvq_gemm_f32(const float *w, size_t ldw, uint32_t n_rows,
		  const float *x, size_t ldx, uint32_t n_tok, float *y,
		  size_t ldy, uint32_t cols);

/* The scalar twin, for tests. */
void kvq_gemm_f32_scalar(const float *w, size_t ldw, uint32_t n_rows,
			 const float *x, size_t ldx, uint32_t n_tok, float *y,
			 size_t ldy, uint32_t cols);

#endif /* KVQ_GEMM_H */
