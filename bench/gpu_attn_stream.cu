/*
 * gpu_attn_stream.cu - a plain streaming-read kernel: the bandwidth
 * ceiling that bench/gpu_attn.py states decode attention against.
 *
 * Why this file exists: "effective GB/s" of a kernel that reads KV pages
 * means little without what a kernel doing nothing but 16-byte reads
 * reaches on the same card in the same run.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"

namespace {

constexpr int THREADS = 512;
constexpr int UNROLL = 4;

/* Sums every 16-byte word of @p (n16 of them) into one value per block,
 * so that no load can be dropped. */
__global__ void __launch_bounds__(THREADS) stream_read(const uint4 *p,
						       size_t n16,
						       unsigned *sink)
{
	size_t stride = (size_t)gridDim.x * THREADS;
	size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x;
	unsigned acc = 0;

	for (; i + (UNROLL - 1) * stride < n16; i += UNROLL * stride) {
		uint4 v[UNROLL];

#pragma unroll
		for (int u = 0; u < UNROLL; u++)
			v[u] = p[i + u * stride];
#pragma unroll
		for (int u = 0; u < UNROLL; u++)
			acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
	}
	for (; i < n16; i += stride) {
		uint4 v = p[i];

		acc ^= v.x ^ v.y ^ v.z ^ v.w;
	}
	if (acc == 0x9e3779b9u)
		sink[blockIdx.x] = acc;
}

} /* namespace */

/*
 * kvq_bench_stream_read() - queue one read of @bytes (a multiple of 16) at
 * device address @p on @stream; @sink is device scratch of 4 * blocks
 * bytes (blocks: 4 per multiprocessor).  Returns 0 or -EIO.
 */
extern "C" int kvq_bench_stream_read(const void *p, size_t bytes, void *sink,
				     int blocks, void *stream)
{
	stream_read<<<blocks, THREADS, 0, (cudaStream_t)stream>>>(
		(const uint4 *)p, bytes / 16, (unsigned *)sink);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}

/*
 * kvq_bench_read_gbps() - GB/s of the streaming read over a fresh device
 * buffer of @bytes, best of @reps timed passes; 0 on error.
 */
extern "C" double kvq_bench_read_gbps(size_t bytes, int reps)
{
	void *p = nullptr, *sink = nullptr;
	cudaEvent_t a, b;
	int dev = 0, sms = 0, i;
	float ms, best = 0.0f;

	bytes &= ~(size_t)15;
	if (cudaGetDevice(&dev) != cudaSuccess ||
	    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
	    cudaSuccess || cudaMalloc(&p, bytes) != cudaSuccess ||
	    cudaMalloc(&sink, (size_t)sms * 4 * 4) != cudaSuccess) {
		cudaFree(p);
		return 0.0;
	}
	cudaMemset(p, 1, bytes);
	cudaEventCreate(&a);
	cudaEventCreate(&b);
	for (i = 0; i <= reps; i++) {
		cudaEventRecord(a, 0);
		kvq_bench_stream_read(p, bytes, sink, sms * 4, nullptr);
		cudaEventRecord(b, 0);
		cudaEventSynchronize(b);
		cudaEventElapsedTime(&ms, a, b);
		if (i && (best == 0.0f || ms < best))
			best = ms;	/* the first pass warms up */
	}
	cudaEventDestroy(a);
	cudaEventDestroy(b);
	cudaFree(p);
	cudaFree(sink);
	return best > 0.0f ? bytes / (best * 1e-3) / 1e9 : 0.0;
}
