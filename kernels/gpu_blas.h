/*
 * gpu_blas.h - the matrix products of prompts with f16 weights on tensor
 * cores (cuBLAS), for kernels/gpu_fwd.cu.
 *
 * Why this file exists: past a few tokens a product is bound by
 * arithmetic, not by weight bytes, and the kernels of gpu_fwd.cu do it on
 * the CUDA cores in f32 (gpu_fwd.cu's mv_max: more than 4 tokens come
 * here, decode batches included).  Tensor cores multiply f16 operands; activations stay
 * f32 by being split into two halves (gpu_blas.cu says how and what it
 * costs in precision).  CUDA only (KVQ_GPU_BLAS, kernels/gpu_compat.h): in
 * a HIP build the functions below are stubs and the tiled kernel serves.
 * Compiled by nvcc or hipcc; the rest of kvqd sees none of it.
 */
#ifndef KVQ_GPU_BLAS_H
#define KVQ_GPU_BLAS_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/gpu_fwd_impl.h"

struct kvq_gpu_blas;

/* y = W x (+ bias) for @n tokens; with @add, y += that instead.  Token t
 * is x + t * xs and y + t * ys (floats); W is F16, ys >= W's rows. */
struct kvq_gpu_blas_mm {
	const dmat *w;
	const float *x;
	uint32_t xs;
	float *y;
	uint32_t ys;
	uint32_t n;
	bool add;
	const float *bias;	/* [rows] or NULL */
};

#if KVQ_GPU_BLAS
/*
 * Makes a cuBLAS handle that runs on @st, with every byte it will use
 * allocated here (its workspace, and the halves of up to @max_tok tokens
 * of @max_ld columns), so that no product allocates, be it captured into
 * a CUDA graph or not.  Returns 0, -ENOMEM (device memory: @err names how
 * much) or -EIO (cuBLAS itself failed: @err says how); nothing is left
 * allocated on failure.  @bytes gets the device bytes held.
 */
int kvq_gpu_blas_create(cudaStream_t st, uint32_t max_tok, uint32_t max_ld,
			struct kvq_gpu_blas **out, size_t *bytes, char *err,
			size_t errlen);
/* Waits for nothing: the caller has synchronized its stream. */
void kvq_gpu_blas_destroy(struct kvq_gpu_blas *b);
/*
 * Launches one product on the stream (n <= max_tok, W's ld <= max_ld).
 * Returns 0, or -EIO with @err set when cuBLAS refused a call; y may then
 * be half updated (with add) and the step must fail.
 */
int kvq_gpu_blas_mm(struct kvq_gpu_blas *b, const struct kvq_gpu_blas_mm *a,
		    char *err, size_t errlen);
#else
static inline int kvq_gpu_blas_create(cudaStream_t st, uint32_t max_tok,
				      uint32_t max_ld,
				      struct kvq_gpu_blas **out,
				      size_t *bytes, char *err, size_t errlen)
{
	(void)st;
	(void)max_tok;
	(void)max_ld;
	*out = nullptr;
	*bytes = 0;
	return set_err(err, errlen, -EOPNOTSUPP,
		       "this build has no GPU BLAS library");
}

static inline void kvq_gpu_blas_destroy(struct kvq_gpu_blas *b)
{
	(void)b;
}

static inline int kvq_gpu_blas_mm(struct kvq_gpu_blas *b,
				  const struct kvq_gpu_blas_mm *a, char *err,
				  size_t errlen)
{
	(void)b;
	(void)a;
	return set_err(err, errlen, -EOPNOTSUPP,
		       "this build has no GPU BLAS library");
}
#endif

#endif /* KVQ_GPU_BLAS_H */
