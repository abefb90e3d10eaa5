/*
 * gpu_blas.h - the matrix products of f16 weights with more than one
 * token on tensor cores, for kernels/gpu_fwd.cu: decode batches in one
 * pass over the weights (the skinny kernel), prompts through cuBLAS.
 *
 * Why this file exists: past one token the CUDA-core products of
 * gpu_fwd.cu spend more issue slots on f32 arithmetic than the weight
 * bytes take to arrive (gpu_fwd.cu's mv_max: more than 1 token comes
 * here).  Tensor cores multiply f16 operands; activations stay f32 by
 * being split into two halves (gpu_blas.cu says how and what it costs in
 * precision).  cuBLAS multiplies by each half in turn, reading the weights
 * twice, which a prompt's arithmetic hides and a decode batch's does not:
 * up to 16 tokens the skinny kernel takes both halves in one read.  CUDA
 * only (KVQ_GPU_BLAS, kernels/gpu_compat.h): in a HIP build the functions
 * below are stubs and the tiled kernel serves.
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
	/* 8/4-bit rows of w: expanded to their f16 values (kvq_wload8())
	 * into exp_buf, exp_rows of them (a multiple of 16) at a time */
	__half *exp_buf;
	uint32_t exp_rows;
};

/* How the skinny product's input comes from x (columns: W's). */
enum {
	KVQ_SKINNY_PLAIN,	/* x itself */
	KVQ_SKINNY_NORM,	/* RMSNorm(x) with weights @norm */
	KVQ_SKINNY_SWIGLU,	/* silu(gate) * up of x = [gate | up] */
};

/* y = W f(x) (+ bias), or y += that with @add, for @n tokens. */
struct kvq_gpu_skinny_mm {
	const dmat *w;
	const float *x;
	uint32_t xs;
	const int32_t *xrows;	/* token t is row xrows[t] of x, or NULL */
	int in;			/* KVQ_SKINNY_* */
	const float *norm;
	float eps;
	float *y;
	uint32_t ys;
	uint32_t n;
	bool add;
	const float *bias;
	const struct qkv_out *qkv;	/* the rows go there, not to y; or NULL */
	/* W = [gate; up] (rows / 2 each): y = silu(gate) * up, rows / 2
	 * columns a token (no add, bias or qkv; up to 8 tokens) */
	bool swiglu;
	/* the int8 dot mode: up to 8 tokens of Q8, Q4 and Q4K rows read
	 * from f32 x take it as int8 per 32 columns (tcq_kernel()) */
	bool q8a;
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
 * Launches one product through cuBLAS on the stream (n <= max_tok, W's ld
 * <= max_ld; F16 rows, or 8/4-bit rows with exp_buf, which go through
 * cuBLAS as their f16 values a slice at a time, x's halves made once); the
 * caller sends what kvq_gpu_blas_skinny() takes to kvq_gpu_blas_skinny_mm()
 * instead.  Returns 0, or -EIO with @err set when cuBLAS refused a call; y
 * may then be half updated (with add) and the step must fail.
 */
int kvq_gpu_blas_mm(struct kvq_gpu_blas *b, const struct kvq_gpu_blas_mm *a,
		    char *err, size_t errlen);
/*
 * Whether a product of @n tokens with @w goes to the skinny tensor-core
 * kernel of gpu_blas.cu (one read of W for both halves) rather than to
 * cuBLAS: 16 tokens or fewer, F16, Q8 or Q4 rows in whole 16-row tiles and
 * 32-column chunks, KVQ_GPU_NO_TCMV unset.
 */
bool kvq_gpu_blas_skinny(const struct kvq_gpu_blas *b, const dmat *w,
			 uint32_t n);
/* Whether the skinny product of @n tokens with @w = [gate; up] can write
 * SwiGLU's output itself (kvq_gpu_skinny_mm's swiglu): up to 8 tokens,
 * rows in pairs of 16-row tiles. */
bool kvq_gpu_blas_skinny_swiglu(const struct kvq_gpu_blas *b, const dmat *w,
				uint32_t n);
/* The most tokens the skinny kernel takes (0: KVQ_GPU_NO_TCMV set). */
uint32_t kvq_gpu_blas_skinny_max(const struct kvq_gpu_blas *b);
/*
 * Launches a skinny product (kvq_gpu_blas_skinny() must hold): two
 * kernels, the input's halves at a scale a token and one pass over W.
 * Returns 0, or -EINVAL with @err set for a shape it does not take.
 */
int kvq_gpu_blas_skinny_mm(struct kvq_gpu_blas *b,
			   const struct kvq_gpu_skinny_mm *a, char *err,
			   size_t errlen);
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

static inline bool kvq_gpu_blas_skinny(const struct kvq_gpu_blas *b,
				       const dmat *w, uint32_t n)
{
	(void)b;
	(void)w;
	(void)n;
	return false;
}

static inline bool kvq_gpu_blas_skinny_swiglu(const struct kvq_gpu_blas *b,
					      const dmat *w, uint32_t n)
{
	return kvq_gpu_blas_skinny(b, w, n);
}

static inline uint32_t kvq_gpu_blas_skinny_max(const struct kvq_gpu_blas *b)
{
	(void)b;
	return 0;
}

static inline int kvq_gpu_blas_skinny_mm(struct kvq_gpu_blas *b,
					 const struct kvq_gpu_skinny_mm *a,
					 char *err, size_t errlen)
{
	(void)b;
	(void)a;
	return set_err(err, errlen, -EOPNOTSUPP,
		       "this build has no GPU BLAS library");
}
#endif

#endif /* KVQ_GPU_BLAS_H */
