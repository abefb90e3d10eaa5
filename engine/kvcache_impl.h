/*
 * kvcache_impl.h - the SIMD entry points kvcache.c dispatches to.
 */
#ifndef KVQ_KVCACHE_IMPL_H
#define KVQ_KVCACHE_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/kvcache.h"

/* false when this row shape has no SIMD version (caller uses scalar). */
bool kvq_kv_dequant_row_avx2(enum kvq_kv_type t, const uint8_t *data,
			     const uint16_t *scales, uint32_t d,
			     uint32_t group, float *out);
void kvq_kv_axpy_avx2(float *o, float w, const float *v, uint32_t d);

/* Attention over one page of one head: the most query heads the SIMD page
 * kernels take at once, and the row stride of the score matrix. */
#define KVQ_KV_SIMD_MAX_Q 8
#define KVQ_KV_SC_STRIDE 64

/*
 * Scores sc[i * KVQ_KV_SC_STRIDE + t] = dot(q_i, K_t) * scale for tokens
 * t0 <= t < t1 of one page; rows/scales point at token 0 of the head in
 * the page.  false when the shape has no SIMD kernel.
 */
bool kvq_kv_page_scores_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *q, size_t qs, uint32_t n_q,
			     float scale, float *sc);
/* out_i += sum_t w[i * KVQ_KV_SC_STRIDE + t] * V_t. */
bool kvq_kv_page_values_avx2(enum kvq_kv_type t, const uint8_t *rows,
			     const uint16_t *scales, uint32_t ng, uint32_t rb,
			     uint32_t d, uint32_t t0, uint32_t t1,
			     const float *w, uint32_t n_q, float *out,
			     size_t os);

/*
 * x[i] = exp(x[i] - mx) for i < n, returning their sum: the softmax
 * weights of one page.  Relative error of each exp below 2e-7 (a
 * polynomial, not libm); inputs are <= 0.
 */
float kvq_kv_exp_sum_avx2(float *x, uint32_t n, float mx);

#endif /* KVQ_KVCACHE_IMPL_H */
