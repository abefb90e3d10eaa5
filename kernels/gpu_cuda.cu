/*
 * gpu_cuda.cu - device discovery for the CUDA (and HIP) backend.
 *
 * Why this file exists: kvqd states the device, its memory and the backend
 * at start-up, and decides once whether the GPU backend can run.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "kernels/gpu_compat.h"
#include "kernels/gpu.h"

extern "C" const char *kvq_gpu_backend_name(void)
{
	return KVQ_GPU_BACKEND;
}

extern "C" int kvq_gpu_probe(struct kvq_gpu_info *info, char *why,
			     size_t whylen)
{
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);
	cudaDeviceProp p;
	size_t fr = 0, tot = 0;

	if (e != cudaSuccess || n == 0) {
		if (why)
			snprintf(why, whylen, "no GPU device: %s",
				 e != cudaSuccess ? cudaGetErrorString(e) :
				 "device count is 0");
		return 0;
	}
	if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
		if (why)
			snprintf(why, whylen, "cannot read device 0 properties");
		return 0;
	}
	memset(info, 0, sizeof(*info));
	snprintf(info->name, sizeof(info->name), "%s", p.name);
	info->cc_major = p.major;
	info->cc_minor = p.minor;
	info->n_sms = p.multiProcessorCount;
	cudaSetDevice(0);
	if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) {
		info->free_mem = fr;
		info->total_mem = tot;
	} else {
		info->total_mem = p.totalGlobalMem;
	}
	return n;
}
