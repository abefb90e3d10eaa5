/*
 * gpu_test_util.cu - device memory for the GPU tests, behind plain C.
 *
 * Why this file exists: the tests are C and compare against the C engine;
 * they need a handful of runtime calls (count, allocate, copy, fill,
 * synchronize) without seeing CUDA or HIP types.
 */
#include <stddef.h>
#include <stdio.h>

#include "kernels/gpu_compat.h"
#include "tests/gpu/gpu_test_util.h"

extern "C" int kvq_test_gpu_count(char *why, size_t len)
{
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);

	if (e != cudaSuccess) {
		snprintf(why, len, "%s", cudaGetErrorString(e));
		return 0;
	}
	if (!n)
		snprintf(why, len, "device count is 0");
	return n;
}

extern "C" void *kvq_test_gpu_alloc(size_t n)
{
	void *p = NULL;

	if (cudaMalloc(&p, n ? n : 1) != cudaSuccess)
		return NULL;
	return p;
}

extern "C" void kvq_test_gpu_free(void *p)
{
	cudaFree(p);
}

extern "C" int kvq_test_gpu_put(void *dst, const void *src, size_t n)
{
	return cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice) == cudaSuccess ?
	       0 : -1;
}

extern "C" int kvq_test_gpu_get(void *dst, const void *src, size_t n)
{
	return cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost) == cudaSuccess ?
	       0 : -1;
}

extern "C" int kvq_test_gpu_fill(void *dst, int byte, size_t n)
{
	return cudaMemset(dst, byte, n) == cudaSuccess ? 0 : -1;
}

extern "C" int kvq_test_gpu_sync(char *why, size_t len)
{
	cudaError_t e = cudaDeviceSynchronize();

	if (e == cudaSuccess)
		e = cudaGetLastError();
	if (e != cudaSuccess) {
		snprintf(why, len, "%s", cudaGetErrorString(e));
		return -1;
	}
	return 0;
}
