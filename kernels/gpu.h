/*
 * gpu.h - the plain-C face of the GPU backend.
 *
 * Why this file exists: the rest of kvqd is C and must not see CUDA or HIP
 * types.  Every function returns 0 or -errno and takes plain pointers; a
 * build without a GPU toolkit links kernels/gpu_stub.c, whose functions say
 * "no GPU backend" instead.
 */
#ifndef KVQ_GPU_H
#define KVQ_GPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct kvq_gpu_info {
	char name[128];
	uint64_t total_mem;
	uint64_t free_mem;
	int cc_major, cc_minor;
	int n_sms;
};

/* "cuda", "hip" or "none": which backend this build contains. */
const char *kvq_gpu_backend_name(void);

/*
 * kvq_gpu_probe() - look for a usable device.
 * Returns the number of devices (>= 1) and fills @info for device 0, 0 when
 * the backend is built but no device is present, or -ENOSYS when this build
 * has no GPU backend.  @why receives a one-line reason when 0 or < 0.
 */
int kvq_gpu_probe(struct kvq_gpu_info *info, char *why, size_t whylen);

#ifdef __cplusplus
}
#endif

#endif /* KVQ_GPU_H */
