/*
 * gpu_test_util.h - device memory helpers of the GPU tests (plain C).
 */
#ifndef KVQ_GPU_TEST_UTIL_H
#define KVQ_GPU_TEST_UTIL_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of devices; 0 with a reason in @why. */
int kvq_test_gpu_count(char *why, size_t len);
void *kvq_test_gpu_alloc(size_t n);
void kvq_test_gpu_free(void *p);
int kvq_test_gpu_put(void *dst, const void *src, size_t n);
int kvq_test_gpu_get(void *dst, const void *src, size_t n);
int kvq_test_gpu_fill(void *dst, int byte, size_t n);
/* Waits for the device; -1 with the error in @why. */
int kvq_test_gpu_sync(char *why, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* KVQ_GPU_TEST_UTIL_H */
