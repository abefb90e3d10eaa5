/*
 * gemm.c - register-blocked f32 matrix products (see gemm.h).
 *
 * The AVX2 kernel computes a 4-row x 3-token block with twelve 8-wide
 * accumulators: per 8 columns it loads 3 activation and 4 weight vectors
 * for 12 FMAs.  Rows or tokens left over at the edges go through the dot
 * product of engine/quant.c.
 */
#include "config.h"

#include <stdbool.h>

#include "engine/gemm.h"
#include "engine/quant.h"
#include "engine/simd_avx2.h"

#ifdef KVQ_HAVE_X86
#include <immintrin.h>
#endif

void kvq_gemm_f32_scalar(const float *w, size_t ldw, uint32_t n_rows,
			 const float *x, size_t ldx, uint32_t n_tok, float *y,
			 size_t ldy, uint32_t cols)
{
	uint32_t r, t;

	for (t = 0; t < n_tok; t++)
		for (r = 0; r < n_rows; r++)
			y[t * ldy + r] = kvq_dot_f32_scalar(w + r * ldw,
							    x + t * ldx, cols);
}

#ifdef KVQ_HAVE_X86
__attribute__((target("avx2,fma")))
static void block_4x3(const float *w, size_t ldw, const float *x, size_t ldx,
		      float *y, size_t ldy, uint32_t cols)
{
	__m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00;
	__m256 a10 = a00, a11 = a00, a12 = a00;
	__m256 a20 = a00, a21 = a00, a22 = a00;
	__m256 a30 = a00, a31 = a00, a32 = a00;
	const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw,
		    *w3 = w + 3 * ldw;
	const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx;
	uint32_t k, c8 = cols & ~7u;
	float out[4][3];
	int r, t;

	for (k = 0; k < c8; k += 8) {
		__m256 v0 = _mm256_loadu_ps(x0 + k);
		__m256 v1 = _mm256_loadu_ps(x1 + k);
		__m256 v2 = _mm256_loadu_ps(x2 + k);
		__m256 u;

		u = _mm256_loadu_ps(w0 + k);
		a00 = _mm256_fmadd_ps(u, v0, a00);
		a01 = _mm256_fmadd_ps(u, v1, a01);
		a02 = _mm256_fmadd_ps(u, v2, a02);
		u = _mm256_loadu_ps(w1 + k);
		a10 = _mm256_fmadd_ps(u, v0, a10);
		a11 = _mm256_fmadd_ps(u, v1, a11);
		a12 = _mm256_fmadd_ps(u, v2, a12);
		u = _mm256_loadu_ps(w2 + k);
		a20 = _mm256_fmadd_ps(u, v0, a20);
		a21 = _mm256_fmadd_ps(u, v1, a21);
		a22 = _mm256_fmadd_ps(u, v2, a22);
		u = _mm256_loadu_ps(w3 + k);
		a30 = _mm256_fmadd_ps(u, v0, a30);
		a31 = _mm256_fmadd_ps(u, v1, a31);
		a32 = _mm256_fmadd_ps(u, v2, a32);
	}
	out[0][0] = kvq_hsum8(a00); out[0][1] = kvq_hsum8(a01); out[0][2] = kvq_hsum8(a02);
	out[1][0] = kvq_hsum8(a10); out[1][1] = kvq_hsum8(a11); out[1][2] = kvq_hsum8(a12);
	out[2][0] = kvq_hsum8(a20); out[2][1] = kvq_hsum8(a21); out[2][2] = kvq_hsum8(a22);
	out[3][0] = kvq_hsum8(a30); out[3][1] = kvq_hsum8(a31); out[3][2] = kvq_hsum8(a32);
	for (r = 0; r < 4; r++) {
		for (t = 0; t < 3; t++) {
			float s = out[r][t];

			for (k = c8; k < cols; k++)
				s += w[r * ldw + k] * x[t * ldx + k];
			y[t * ldy + r] = s;
		}
	}
}

#endif

void kvq_gemm_f32(const float *w, size_t ldw, uint32_t n_rows,
		  const float *x, size_t ldx, uint32_t n_tok, float *y,
		  size_t ldy, uint32_t cols)
{
	uint32_t r = 0, t;

#ifdef KVQ_HAVE_X86
	if (kvq_quant_simd()) {
		for (; r + 4 <= n_rows; r += 4) {
			for (t = 0; t + 3 <= n_tok; t += 3)
				block_4x3(w + r * ldw, ldw, x + t * ldx, ldx,
					  y + t * ldy + r, ldy, cols);
			for (; t < n_tok; t++) {
				uint32_t i;

				for (i = 0; i < 4; i++)
					y[t * ldy + r + i] = kvq_dot_f32(
						w + (r + i) * ldw, x + t * ldx,
						cols);
			}
		}
	}
#endif
	for (; r < n_rows; r++)
		for (t = 0; t < n_tok; t++)
			y[t * ldy + r] = kvq_dot_f32(w + r * ldw, x + t * ldx,
						     cols);
}
