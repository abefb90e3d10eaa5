/*
 * sample.h - the plain-C face of the GPU sampling helpers
 * (kernels/sample.cu): argmax, softmax at a temperature, and the CPU
 * sampler's filtered draw, over rows of f32 logits in device memory.
 *
 * Why this file exists: a decode step on the GPU should hand the host one
 * token id per sequence rather than a vocabulary of logits, and must pick
 * the token the CPU sampler would pick.  No CUDA or HIP type appears here;
 * every function returns 0 or -errno, queues its work on @stream (a
 * cudaStream_t / hipStream_t, NULL for the default stream) and leaves its
 * outputs unwritten when it fails.
 *
 * Rows are contiguous: row r of @logits starts at logits + r * n_vocab.
 * NaN logits count as -inf and -0 as +0 everywhere, as in engine/sampler.c.
 * The plain-C twins are kvq_argmax(), kvq_softmax() and
 * kvq_sampler_sample_u() of engine/sampler.h.
 */
#ifndef KVQ_SAMPLE_H
#define KVQ_SAMPLE_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

/* Callers include config.h first; the kernels are compiled by nvcc or
 * hipcc. */
#if defined(KVQ_HAVE_CUDA) || defined(KVQ_HAVE_HIP) || \
	defined(__CUDACC__) || defined(__HIPCC__)
#define KVQ_SAMPLE_GPU 1
#endif

/* Largest vocabulary: weights are summed as 2^-40 fixed-point integers in
 * 64 bits (see sample.cu). */
#define KVQ_GPU_SAMPLE_MAX_VOCAB ((1u << 24) - 1)

#ifdef __cplusplus
extern "C" {
#endif

/*
 * One row's sampling settings, with the meaning of the same fields of
 * struct kvq_sampler_params (engine/sampler.h): temperature <= 0 or
 * top_k == 1 is greedy; top_k <= 0 or >= n_vocab, top_p >= 1 and
 * min_p <= 0 are off.  Settings that kvq_sampler_params_check() rejects
 * (NaN, infinite temperature, top_p <= 0, min_p > 1) give the argmax.
 * Sixteen bytes, the same in C and CUDA.
 */
struct kvq_gpu_sample_params {
	float temperature;
	int32_t top_k;
	float top_p;
	float min_p;
};

#ifdef KVQ_SAMPLE_GPU
/*
 * kvq_gpu_argmax() - @ids[r] = the index of row r's largest logit, lowest
 * index among equal ones; a row of only NaN and -inf gives 0 (kvq_argmax()).
 * Returns 0 once queued (also for n_rows 0, which queues nothing); -EINVAL
 * for NULL pointers or n_vocab outside [1, KVQ_GPU_SAMPLE_MAX_VOCAB]; -EIO
 * when the launch fails.
 */
int kvq_gpu_argmax(const float *logits, uint32_t n_rows, uint32_t n_vocab,
		   int32_t *ids, void *stream);

/*
 * kvq_gpu_softmax() - @probs (n_rows * n_vocab floats, device) gets each
 * row's softmax at @temperature, as kvq_softmax() computes it: weights
 * expf((l - max) * (1/T)) in f32, normalised by their sum in double.
 * Errors as kvq_gpu_argmax(), and -EINVAL for a temperature that is not
 * positive and finite with a finite reciprocal.
 */
int kvq_gpu_softmax(const float *logits, uint32_t n_rows, uint32_t n_vocab,
		    float temperature, float *probs, void *stream);

/*
 * kvq_gpu_sample() - @ids[r] = the token that kvq_sampler_sample_u()
 * chooses for row r with settings @params[r] and uniform number @u[r]
 * (both device arrays of n_rows; u in [0, 1), values outside are clamped):
 * top-k on the logits, softmax at the temperature, top-p measured before
 * min-p's renormalisation, min-p, then the first token in rank order whose
 * running weight passes u times what is left.  The result may differ from
 * the twin's only where a running weight lies within about 1e-6 (relative)
 * of its boundary, see sample.cu.  Errors as kvq_gpu_argmax().
 */
int kvq_gpu_sample(const float *logits, uint32_t n_rows, uint32_t n_vocab,
		   const struct kvq_gpu_sample_params *params, const float *u,
		   int32_t *ids, void *stream);
#else
static inline int kvq_gpu_argmax(const float *logits, uint32_t n_rows,
				 uint32_t n_vocab, int32_t *ids, void *stream)
{
	(void)logits;
	(void)n_rows;
	(void)n_vocab;
	(void)ids;
	(void)stream;
	return -ENOSYS;
}

static inline int kvq_gpu_softmax(const float *logits, uint32_t n_rows,
				  uint32_t n_vocab, float temperature,
				  float *probs, void *stream)
{
	(void)logits;
	(void)n_rows;
	(void)n_vocab;
	(void)temperature;
	(void)probs;
	(void)stream;
	return -ENOSYS;
}

static inline int kvq_gpu_sample(const float *logits, uint32_t n_rows,
				 uint32_t n_vocab,
				 const struct kvq_gpu_sample_params *params,
				 const float *u, int32_t *ids, void *stream)
{
	(void)logits;
	(void)n_rows;
	(void)n_vocab;
	(void)params;
	(void)u;
	(void)ids;
	(void)stream;
	return -ENOSYS;
}
#endif /* KVQ_SAMPLE_GPU */

#ifdef __cplusplus
}
#endif

#endif /* KVQ_SAMPLE_H */
