/*
 * gpu_sample_dev.cu - the device side of bench/gpu_sample.c: rows of
 * logits uploaded once, kvq_gpu_sample() launched again and again, timed
 * with events.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/sample.h"

/*
 * kvq_bench_sample() - microseconds a kvq_gpu_sample() call over @rows rows
 * of @n_vocab host logits @l takes on the device (the median of @reps
 * timed calls after 5 untimed ones; the upload is not timed), with
 * settings @p and draws @u (host arrays of @rows); the ids of the last
 * call into @ids.  Negative on failure.
 */
extern "C" double kvq_bench_sample(const float *l, uint32_t rows,
				   uint32_t n_vocab,
				   const struct kvq_gpu_sample_params *p,
				   const float *u, int reps, int32_t *ids)
{
	size_t nl = (size_t)rows * n_vocab * sizeof(float);
	float *dl = nullptr, *du = nullptr, ms, *t = nullptr;
	struct kvq_gpu_sample_params *dp = nullptr;
	int32_t *di = nullptr;
	cudaEvent_t e0, e1;
	double out = -1.0;
	int i, j;

	if (reps < 1 || cudaMalloc((void **)&dl, nl) != cudaSuccess ||
	    cudaMalloc((void **)&dp, rows * sizeof(*dp)) != cudaSuccess ||
	    cudaMalloc((void **)&du, rows * sizeof(float)) != cudaSuccess ||
	    cudaMalloc((void **)&di, rows * sizeof(int32_t)) != cudaSuccess)
		goto out;
	if (cudaMemcpy(dl, l, nl, cudaMemcpyHostToDevice) != cudaSuccess ||
	    cudaMemcpy(dp, p, rows * sizeof(*dp), cudaMemcpyHostToDevice) !=
	    cudaSuccess ||
	    cudaMemcpy(du, u, rows * sizeof(float), cudaMemcpyHostToDevice) !=
	    cudaSuccess)
		goto out;
	t = new float[reps];
	cudaEventCreate(&e0);
	cudaEventCreate(&e1);
	for (i = -5; i < reps; i++) {
		cudaEventRecord(e0, 0);
		if (kvq_gpu_sample(dl, rows, n_vocab, dp, du, di, nullptr))
			break;
		cudaEventRecord(e1, 0);
		if (cudaEventSynchronize(e1) != cudaSuccess)
			break;
		cudaEventElapsedTime(&ms, e0, e1);
		if (i >= 0)
			t[i] = ms;
	}
	if (i == reps &&
	    cudaMemcpy(ids, di, rows * sizeof(int32_t), cudaMemcpyDeviceToHost) ==
	    cudaSuccess) {
		/* median, by insertion sort (reps is small) */
		for (i = 1; i < reps; i++)
			for (j = i; j > 0 && t[j - 1] > t[j]; j--) {
				float x = t[j];

				t[j] = t[j - 1];
				t[j - 1] = x;
			}
		out = t[reps / 2] * 1e3;
	}
	cudaEventDestroy(e0);
	cudaEventDestroy(e1);
out:
	delete[] t;
	cudaFree(dl);
	cudaFree(dp);
	cudaFree(du);
	cudaFree(di);
	return out;
}
