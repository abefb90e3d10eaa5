/*
 * gpu_stub.c - the GPU backend of a build without CUDA or HIP.
 *
 * Why this file exists: kvqd links and runs everywhere; without a toolkit at
 * build time it reports "no GPU backend" rather than failing to link.
 */
#include <errno.h>
#include <stdio.h>

#include "kernels/gpu.h"

const char *kvq_gpu_backend_name(void)
{
	return "none";
}

int kvq_gpu_probe(struct kvq_gpu_info *info, char *why, size_t whylen)
{
	(void)info;
	if (why)
		snprintf(why, whylen, "no GPU backend in this build (configured without CUDA or HIP)");
	return -ENOSYS;
}
