/*
 * gpu_compat.h - the one place that maps the CUDA names kvqd uses to HIP.
 *
 * Why this file exists: kernels are written once in CUDA; compiled by hipcc
 * the same sources use these names.  Nothing else in the tree tests for HIP.
 */
#ifndef KVQ_GPU_COMPAT_H
#define KVQ_GPU_COMPAT_H

#if defined(__HIPCC__) || defined(KVQ_HIP)
#include <hip/hip_runtime.h>
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaGetErrorString hipGetErrorString
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaDeviceProp hipDeviceProp_t
#define cudaMemGetInfo hipMemGetInfo
#define cudaSetDevice hipSetDevice
#define KVQ_WARP_SIZE 64
#define KVQ_GPU_BACKEND "hip"
#else
#include <cuda_runtime.h>
#define KVQ_WARP_SIZE 32
#define KVQ_GPU_BACKEND "cuda"
#endif

#endif /* KVQ_GPU_COMPAT_H */
