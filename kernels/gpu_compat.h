/*
 * gpu_compat.h - the one place that maps the CUDA names kvqd uses to HIP.
 *
 * Why this file exists: kernels are written once in CUDA; compiled by hipcc
 * the same sources use these names.  Nothing else in the tree tests for HIP.
 */
#ifndef KVQ_GPU_COMPAT_H
#define KVQ_GPU_COMPAT_H

#include <stdlib.h>

#if defined(__HIPCC__) || defined(KVQ_HIP)
#include <hip/hip_runtime.h>
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaErrorMemoryAllocation hipErrorOutOfMemory
#define cudaGetErrorString hipGetErrorString
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaDeviceProp hipDeviceProp_t
#define cudaMemGetInfo hipMemGetInfo
#define cudaSetDevice hipSetDevice
#define cudaGetDevice hipGetDevice
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaMemcpy hipMemcpy
#define cudaMemcpyHostToDevice hipMemcpyHostToDevice
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define cudaMemset hipMemset
#define cudaDeviceSynchronize hipDeviceSynchronize
#define cudaEvent_t hipEvent_t
#define cudaEventCreate hipEventCreate
#define cudaEventDestroy hipEventDestroy
#define cudaEventRecord hipEventRecord
#define cudaEventSynchronize hipEventSynchronize
#define cudaEventElapsedTime hipEventElapsedTime
#define cudaStream_t hipStream_t
#define cudaGetLastError hipGetLastError
#define cudaDeviceGetAttribute hipDeviceGetAttribute
#define cudaDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define cudaDevAttrComputeCapabilityMajor hipDeviceAttributeComputeCapabilityMajor
#define cudaFuncSetAttribute hipFuncSetAttribute
#define cudaFuncAttributeMaxDynamicSharedMemorySize \
	hipFuncAttributeMaxDynamicSharedMemorySize
#define cudaMemcpy2D hipMemcpy2D
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemcpy2DAsync hipMemcpy2DAsync
#define cudaMemsetAsync hipMemsetAsync
#define cudaMallocHost(p, n) hipHostMalloc((p), (n), 0)
#define cudaFreeHost hipHostFree
#define cudaStreamCreateWithFlags hipStreamCreateWithFlags
#define cudaStreamNonBlocking hipStreamNonBlocking
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaStreamDestroy hipStreamDestroy
#define cudaGraph_t hipGraph_t
#define cudaGraphExec_t hipGraphExec_t
#define cudaStreamBeginCapture hipStreamBeginCapture
#define cudaStreamEndCapture hipStreamEndCapture
#define cudaStreamCaptureModeThreadLocal hipStreamCaptureModeThreadLocal
#define cudaGraphInstantiate hipGraphInstantiateWithFlags
#define cudaGraphLaunch hipGraphLaunch
#define cudaGraphDestroy hipGraphDestroy
#define cudaGraphExecDestroy hipGraphExecDestroy
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor \
	hipOccupancyMaxActiveBlocksPerMultiprocessor
#include <hip/hip_fp16.h>
#define KVQ_WARP_SIZE 64
#define KVQ_GPU_BACKEND "hip"
/* No BLAS library is assumed on HIP hosts: f16 prompt products keep the
 * tiled kernel (kernels/gpu_blas.h). */
#define KVQ_GPU_BLAS 0
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#define KVQ_WARP_SIZE 32
#define KVQ_GPU_BACKEND "cuda"
/* cuBLAS runs f16 prompt products on tensor cores (kernels/gpu_blas.cu). */
#define KVQ_GPU_BLAS 1
#endif

/*
 * Device helpers of the attention kernels.  Their tiles are built for
 * groups of 32 lanes (the operand layout of a 16x8x16 f16 matrix product),
 * so every shuffle below stays inside such a group; on a 64-wide wavefront
 * the two halves are independent groups.
 */
#if defined(__CUDACC__) || defined(__HIPCC__)
#define KVQ_LANES 32

static __device__ __forceinline__ unsigned kvq_shfl_u32(unsigned v, int src)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return __shfl(v, src, KVQ_LANES);
#else
	return __shfl_sync(0xffffffffu, v, src, KVQ_LANES);
#endif
}

static __device__ __forceinline__ float kvq_shfl_xor_f32(float v, int m)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return __shfl_xor(v, m, KVQ_LANES);
#else
	return __shfl_xor_sync(0xffffffffu, v, m, KVQ_LANES);
#endif
}

/* Sum over the 32 lanes of a group, in every lane. */
static __device__ __forceinline__ float kvq_warp_sum(float v)
{
	for (int m = 16; m > 0; m >>= 1)
		v += kvq_shfl_xor_f32(v, m);
	return v;
}

static __device__ __forceinline__ double kvq_shfl_xor_f64(double v, int m)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return __shfl_xor(v, m, KVQ_LANES);
#else
	return __shfl_xor_sync(0xffffffffu, v, m, KVQ_LANES);
#endif
}

static __device__ __forceinline__ float kvq_shfl_f32(float v, int src)
{
	return __uint_as_float(kvq_shfl_u32(__float_as_uint(v), src));
}

/* c + the dot of the four signed bytes of @a with those of @b: dp4a on
 * CUDA; on HIP, the bytes one by one (no dot instruction assumed). */
static __device__ __forceinline__ int kvq_dp4a(int a, int b, int c)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	for (int i = 0; i < 32; i += 8)
		c += (int)(signed char)(a >> i) * (int)(signed char)(b >> i);
	return c;
#else
	return __dp4a(a, b, c);
#endif
}

static __device__ __forceinline__ const void *kvq_shfl_ptr(const void *p,
							    int src)
{
	unsigned long long u = (unsigned long long)p;
	unsigned lo = kvq_shfl_u32((unsigned)u, src);
	unsigned hi = kvq_shfl_u32((unsigned)(u >> 32), src);

	return (const void *)(((unsigned long long)hi << 32) | lo);
}

static __device__ __forceinline__ bool kvq_any(bool p)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return __any(p);
#else
	return __any_sync(0xffffffffu, p);
#endif
}

static __device__ __forceinline__ void kvq_syncwarp(void)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	__builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
	__builtin_amdgcn_wave_barrier();
	__builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
#else
	__syncwarp();
#endif
}

/* A load that skips the (non-coherent) L1: data other blocks wrote. */
static __device__ __forceinline__ float kvq_ld_cg(const float *p)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return __builtin_nontemporal_load(p);
#else
	return __ldcg(p);
#endif
}

static __device__ __forceinline__ float4 kvq_ld_cg4(const float4 *p)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	const float *f = (const float *)p;

	return make_float4(kvq_ld_cg(f), kvq_ld_cg(f + 1), kvq_ld_cg(f + 2),
			   kvq_ld_cg(f + 3));
#else
	return __ldcg(p);
#endif
}

/*
 * Adds @v to *@p at device scope with acquire and release order, and
 * returns the old value: the writes this thread saw (a block's, after a
 * barrier) are visible to whoever reads the count after it, and what
 * they wrote before their own add is visible here.
 */
static __device__ __forceinline__ int kvq_atomic_add_acq_rel(int *p, int v)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return __hip_atomic_fetch_add(p, v, __ATOMIC_ACQ_REL,
				      __HIP_MEMORY_SCOPE_AGENT);
#else
	int old;

	asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;"
		     : "=r"(old) : "l"(p), "r"(v) : "memory");
	return old;
#endif
}

/*
 * 16-byte asynchronous copies global -> shared, in commit groups; wait<N>
 * returns when at most N groups are still in flight.  HIP: plain copies.
 */
static __device__ __forceinline__ void kvq_cp_async16(void *smem,
						      const void *gmem)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	*(uint4 *)smem = *(const uint4 *)gmem;
#else
	unsigned s = (unsigned)__cvta_generic_to_shared(smem);

	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
		     :: "r"(s), "l"(gmem) : "memory");
#endif
}

/* The same with @n (0 or 16) bytes read and the rest of the 16 zeroed:
 * with n = 0, nothing is read. */
static __device__ __forceinline__ void kvq_cp_async16_n(void *smem,
							const void *gmem,
							unsigned n)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	*(uint4 *)smem = n ? *(const uint4 *)gmem : make_uint4(0, 0, 0, 0);
#else
	unsigned s = (unsigned)__cvta_generic_to_shared(smem);

	asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
		     :: "r"(s), "l"(gmem), "r"(n) : "memory");
#endif
}

static __device__ __forceinline__ void kvq_cp_async4(void *smem,
						     const void *gmem)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	*(unsigned *)smem = *(const unsigned *)gmem;
#else
	unsigned s = (unsigned)__cvta_generic_to_shared(smem);

	asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
		     :: "r"(s), "l"(gmem) : "memory");
#endif
}

static __device__ __forceinline__ void kvq_cp_async_commit(void)
{
#if !(defined(__HIPCC__) || defined(KVQ_HIP))
	asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
static __device__ __forceinline__ void kvq_cp_async_wait(void)
{
#if !(defined(__HIPCC__) || defined(KVQ_HIP))
	asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
#endif
}

/*
 * Four 8x8 matrices of 16-bit elements from shared memory: lane l gives
 * the address of row l & 7 of matrix l >> 3 (16 bytes, 16-byte aligned).
 * Lane 4g+t gets, of matrix j, r[j] = row g's bytes 4t..4t+3; with
 * _t (transposed), element g (bytes 2g, 2g+1) of row 2t in the low half
 * and of row 2t+1 in the high half.  HIP: the rows' addresses are passed
 * around by shuffles and read with plain loads.
 */
static __device__ __forceinline__ void kvq_ldsm4(unsigned r[4],
						 const void *row)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	int lane = threadIdx.x & (KVQ_LANES - 1), g = lane >> 2, t = lane & 3;
	unsigned long long a = (unsigned long long)row;

	for (int j = 0; j < 4; j++) {
		unsigned lo = kvq_shfl_u32((unsigned)a, 8 * j + g);
		unsigned hi = kvq_shfl_u32((unsigned)(a >> 32), 8 * j + g);
		const unsigned char *p = (const unsigned char *)
			(((unsigned long long)hi << 32) | lo);

		r[j] = *(const unsigned *)(p + 4 * t);
	}
#else
	unsigned s = (unsigned)__cvta_generic_to_shared(row);

	asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 "
		     "{%0,%1,%2,%3}, [%4];\n"
		     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
		     : "r"(s));
#endif
}

static __device__ __forceinline__ void kvq_ldsm4_t(unsigned r[4],
						   const void *row)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	int lane = threadIdx.x & (KVQ_LANES - 1), g = lane >> 2, t = lane & 3;
	unsigned long long a = (unsigned long long)row;

	for (int j = 0; j < 4; j++) {
		unsigned v[2];

		for (int e = 0; e < 2; e++) {
			int src = 8 * j + 2 * t + e;
			unsigned lo = kvq_shfl_u32((unsigned)a, src);
			unsigned hi = kvq_shfl_u32((unsigned)(a >> 32), src);
			const unsigned char *p = (const unsigned char *)
				(((unsigned long long)hi << 32) | lo);

			v[e] = *(const unsigned short *)(p + 2 * g);
		}
		r[j] = v[0] | (v[1] << 16);
	}
#else
	unsigned s = (unsigned)__cvta_generic_to_shared(row);

	asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 "
		     "{%0,%1,%2,%3}, [%4];\n"
		     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
		     : "r"(s));
#endif
}

/*
 * Eight 8-bit codes (int8 @u) as exact halves 1152 + q: each byte xor
 * 0x80 under the exponent of 1024.
 */
static __device__ __forceinline__ void kvq_q8_codes(uint2 u, unsigned w[4])
{
	unsigned a = u.x ^ 0x80808080u, b = u.y ^ 0x80808080u;

	w[0] = __byte_perm(a, 0x64646464u, 0x4140);
	w[1] = __byte_perm(a, 0x64646464u, 0x4342);
	w[2] = __byte_perm(b, 0x64646464u, 0x4140);
	w[3] = __byte_perm(b, 0x64646464u, 0x4342);
}

/*
 * Eight nibbles, the low ones (@hi false) or the high ones of the 8 bytes
 * @u, as exact halves 1024 + n.
 */
static __device__ __forceinline__ void kvq_q4_codes(uint2 u, bool hi,
						    unsigned w[4])
{
	unsigned a = hi ? u.x >> 4 : u.x, b = hi ? u.y >> 4 : u.y;
	unsigned p[4] = { __byte_perm(a, 0, 0x4140),
			  __byte_perm(a, 0, 0x4342),
			  __byte_perm(b, 0, 0x4140),
			  __byte_perm(b, 0, 0x4342) };

	for (int i = 0; i < 4; i++)
		w[i] = (p[i] & 0x000f000fu) | 0x64006400u;
}

/*
 * Eight weights from their codes @w (halves bias + q) as q * d, each
 * rounded once.
 */
static __device__ __forceinline__ uint4 kvq_codes_h8(const unsigned w[4],
						     unsigned short bias,
						     __half d)
{
	const __half2 b2 = __half2half2(__ushort_as_half(bias));
	const __half2 d2 = __half2half2(d);
	uint4 r;
	unsigned *o = &r.x;

	for (int i = 0; i < 4; i++) {
		const __half2 q = *reinterpret_cast<const __half2 *>(&w[i]);
		__half2 h = __hmul2(__hsub2(q, b2), d2);

		o[i] = *reinterpret_cast<unsigned *>(&h);
	}
	return r;
}

/*
 * Eight Q8 weights (int8 @u) of block scale @d as the f16 values q * d,
 * each rounded once: what the load writes for a Q8_0 weight kept in f16
 * (kvq_dequant_row()'s exact q * d, rounded to nearest), so a product of
 * Q8 rows equals, bit for bit, the same product of their f16 copy.
 */
static __device__ __forceinline__ uint4 kvq_q8_h8(uint2 u, __half d)
{
	unsigned w[4];

	kvq_q8_codes(u, w);
	return kvq_codes_h8(w, 0x6480, d);
}

/*
 * Eight Q4 weights of block scale @d, the low nibbles (@hi false) or the
 * high ones of the 8 bytes @u, as the f16 values (n - 8) * d, each
 * rounded once (as kvq_q8_h8(): what the load writes for a Q4_0 weight
 * kept in f16).
 */
static __device__ __forceinline__ uint4 kvq_q4_h8(uint2 u, bool hi, __half d)
{
	unsigned w[4];

	kvq_q4_codes(u, hi, w);
	return kvq_codes_h8(w, 0x6408, d);
}

/*
 * Eight weights from their codes q + b, the bytes of @a then @b (each
 * byte put under the exponent of 2^23 by a byte permute: the exact float
 * 2^23 + q + b; @bias is 2^23 + b): q * s + o in f32, one rounding, then
 * to f16.
 */
static __device__ __forceinline__ uint4 kvq_f32codes_h8(unsigned a, unsigned b,
							float bias, float2 so)
{
	unsigned x[8];
	uint4 r;
	unsigned *p = &r.x;

	for (int j = 0; j < 4; j++) {
		x[j] = __byte_perm(a, 0x4b000000u, 0x7440u | j);
		x[j + 4] = __byte_perm(b, 0x4b000000u, 0x7440u | j);
	}
	for (int i = 0; i < 4; i++) {
		float q0 = __fsub_rn(__uint_as_float(x[2 * i]), bias);
		float q1 = __fsub_rn(__uint_as_float(x[2 * i + 1]), bias);
		__half2 h = __floats2half2_rn(__fmaf_rn(q0, so.x, so.y),
					      __fmaf_rn(q1, so.x, so.y));

		p[i] = *reinterpret_cast<unsigned *>(&h);
	}
	return r;
}

/*
 * Eight Q4K weights (a Q4_K sub-block's nibbles, laid out as Q4's: the
 * low ones, @hi false, or the high ones of @u) as n * d1 + o1 in f32 then
 * f16: @so holds d1 = d * sc and o1 = -(dmin * m) as floats (exact), so
 * the value is the CPU's dequantization (the product exact, one rounding
 * in f32) and the f16 value of the copy in f16, bit for bit.
 */
static __device__ __forceinline__ uint4 kvq_q4k_h8(uint2 u, bool hi,
						   float2 so)
{
	return kvq_f32codes_h8((hi ? u.x >> 4 : u.x) & 0x0f0f0f0fu,
			       (hi ? u.y >> 4 : u.y) & 0x0f0f0f0fu,
			       8388608.0f, so);
}

/*
 * Eight Q8K weights (int8 codes q of one 16-column group) as q * s + o in
 * f32 then f16, @so holding s and o as floats: a Q6_K row's q - 32 with
 * d * scale and -0 (the CPU's (d * scale) * q, bit for bit), a Q4_K
 * row's n with Q4K's pair.
 */
static __device__ __forceinline__ uint4 kvq_q8k_h8(uint2 u, float2 so)
{
	return kvq_f32codes_h8(u.x ^ 0x80808080u, u.y ^ 0x80808080u,
			       8388736.0f, so);
}

/* (x & m) | c in one instruction (the compiler splits it when both m and
 * c are constants). */
static __device__ __forceinline__ unsigned kvq_and_or(unsigned x, unsigned m,
						     unsigned c)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return (x & m) | c;
#else
	unsigned r;

	asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(x), "r"(m), "r"(c));
	return r;
#endif
}

/* (x & m) ^ c in one instruction. */
static __device__ __forceinline__ unsigned kvq_and_xor(unsigned x, unsigned m,
						      unsigned c)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return (x & m) ^ c;
#else
	unsigned r;

	asm("lop3.b32 %0, %1, %2, %3, 0x6a;\n" : "=r"(r) : "r"(x), "r"(m), "r"(c));
	return r;
#endif
}

/* 2^x, approximate (about 2 ulp), subnormal results flushed to zero. */
static __device__ __forceinline__ float kvq_exp2_fast(float x)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return exp2f(x);
#else
	float r;

	asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
	return r;
#endif
}

#if defined(__HIPCC__) || defined(KVQ_HIP)
/*
 * For the shuffle forms of the tile products below: the A words of rows
 * g and g+8 that lane (g, @kk) holds (@ar), and the B words of columns 2t
 * (@b0) and 2t+1 (@b1) that lanes (2t, @kk) and (2t+1, @kk) hold.
 */
static __device__ __forceinline__ void kvq_mma_gather(const unsigned a[4],
						      const unsigned b[2],
						      int kk, unsigned ar[4],
						      unsigned b0[2],
						      unsigned b1[2])
{
	int lane = threadIdx.x & (KVQ_LANES - 1), g = lane >> 2, t = lane & 3;

	for (int j = 0; j < 4; j++)
		ar[j] = kvq_shfl_u32(a[j], g * 4 + kk);
	for (int j = 0; j < 2; j++) {
		b0[j] = kvq_shfl_u32(b[j], (2 * t) * 4 + kk);
		b1[j] = kvq_shfl_u32(b[j], (2 * t + 1) * 4 + kk);
	}
}
#endif

/*
 * c += A * B for one 16x8x16 tile: A 16x16 f16 (4 registers of two halves,
 * row-major fragment), B 16x8 f16 (2 registers), c 16x8 f32 (4 floats),
 * in the operand layout of PTX mma.m16n8k16: lane = 4 * g + t holds
 * A[g|g+8][2t..2t+1 | 2t+8..2t+9], B[2t..2t+1 | 2t+8..2t+9][g] and
 * C[g|g+8][2t..2t+1].  HIP: the same product computed with shuffles
 * (correct, slow; untested on AMD hardware).
 */
static __device__ __forceinline__ void kvq_mma_f16_16816(float c[4],
							 const unsigned a[4],
							 const unsigned b[2])
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	int kk, j;

	for (kk = 0; kk < 4; kk++) {
		unsigned ar[4], b0[2], b1[2];

		kvq_mma_gather(a, b, kk, ar, b0, b1);
		for (j = 0; j < 2; j++) {
			/* k = 2kk + {0,1} + 8j */
			float2 x0 = __half22float2(*(const __half2 *)&ar[2 * j]);
			float2 x1 = __half22float2(*(const __half2 *)&ar[2 * j + 1]);
			float2 y0 = __half22float2(*(const __half2 *)&b0[j]);
			float2 y1 = __half22float2(*(const __half2 *)&b1[j]);

			c[0] += x0.x * y0.x + x0.y * y0.y;
			c[1] += x0.x * y1.x + x0.y * y1.y;
			c[2] += x1.x * y0.x + x1.y * y0.y;
			c[3] += x1.x * y1.x + x1.y * y1.y;
		}
	}
#else
	asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
	    "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
	    : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
	    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
	      "r"(b[0]), "r"(b[1]));
#endif
}

/* d = A * B + c (c left unchanged). */
static __device__ __forceinline__ void kvq_mma_f16_16816_c(float d[4],
							   const unsigned a[4],
							   const unsigned b[2],
							   const float c[4])
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	d[0] = c[0];
	d[1] = c[1];
	d[2] = c[2];
	d[3] = c[3];
	kvq_mma_f16_16816(d, a, b);
#else
	asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
	    "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
	    : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
	    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
	      "r"(b[0]), "r"(b[1]),
	      "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
/* The dot product of two words of four signed bytes. */
static __device__ __forceinline__ int kvq_dot4_s8(unsigned a, unsigned b)
{
	int r = 0;

	for (int i = 0; i < 32; i += 8)
		r += (int)(signed char)(a >> i) * (int)(signed char)(b >> i);
	return r;
}

/*
 * c = A * B for one 16x8x32 tile of signed bytes, exact in int32: A 16x32
 * (4 registers of four bytes), B 32x8 (2 registers), c 16x8, in the layout
 * of PTX mma.m16n8k32: lane = 4 * g + t holds A[g|g+8][4t..4t+3 |
 * 16+4t..16+4t+3], B[4t..4t+3 | 16+4t..16+4t+3][g] and C[g|g+8][2t..2t+1].
 * HIP: computed with shuffles (correct, slow; untested on AMD hardware).
 */
static __device__ __forceinline__ void kvq_mma_s8_16832(int c[4],
							const unsigned a[4],
							const unsigned b[2])
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	c[0] = c[1] = c[2] = c[3] = 0;
	for (int kk = 0; kk < 4; kk++) {
		unsigned ar[4], b0[2], b1[2];

		kvq_mma_gather(a, b, kk, ar, b0, b1);
		for (int j = 0; j < 2; j++) {
			c[0] += kvq_dot4_s8(ar[2 * j], b0[j]);
			c[1] += kvq_dot4_s8(ar[2 * j], b1[j]);
			c[2] += kvq_dot4_s8(ar[2 * j + 1], b0[j]);
			c[3] += kvq_dot4_s8(ar[2 * j + 1], b1[j]);
		}
	}
#else
	asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
	    "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
	    : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
	    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
	      "r"(b[0]), "r"(b[1]), "r"(0));
#endif
}

/* The current device's compute capability major, asked once per file
 * that uses it; 0 where it cannot be read, and under HIP. */
static inline int kvq_cc_major(void)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	return 0;
#else
	static int major = -1;

	if (major < 0) {
		int dev = 0, m = 0;

		if (cudaGetDevice(&dev) != cudaSuccess ||
		    cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor,
					   dev) != cudaSuccess)
			m = 0;
		cudaGetLastError();
		major = m;
	}
	return major;
#endif
}

/*
 * Whether kernels may be launched as programmatic dependents (below):
 * CUDA, compute capability 9.0 and up, KVQ_GPU_NO_PDL unset.  Asked once
 * per file that uses it.
 */
static inline bool kvq_pdl_allowed(void)
{
	static int ok = -1;

	if (ok < 0)
		ok = kvq_cc_major() >= 9 && !getenv("KVQ_GPU_NO_PDL");
	return ok > 0;
}

/*
 * Launches @k on @st, as a programmatic dependent of the kernel before it
 * when @pdl (the kernel then orders itself with kvq_pdl_wait(), below);
 * a plain launch on HIP.  Errors are left for cudaGetLastError().
 */
template <typename... KA, typename... A>
static inline void kvq_launch_cl(bool pdl, unsigned cl, void (*k)(KA...),
				 dim3 grid, dim3 block, size_t smem,
				 cudaStream_t st, A... args)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	(void)pdl;
	(void)cl;
	k<<<grid, block, smem, st>>>(args...);
#else
	cudaLaunchConfig_t cfg = {};
	cudaLaunchAttribute at[2] = {};
	unsigned n = 0;

	cfg.gridDim = grid;
	cfg.blockDim = block;
	cfg.dynamicSmemBytes = smem;
	cfg.stream = st;
	if (pdl) {
		at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
		at[n++].val.programmaticStreamSerializationAllowed = 1;
	}
	if (cl > 1) {
		at[n].id = cudaLaunchAttributeClusterDimension;
		at[n].val.clusterDim.x = cl;
		at[n].val.clusterDim.y = 1;
		at[n++].val.clusterDim.z = 1;
	}
	cfg.attrs = at;
	cfg.numAttrs = n;
	cudaLaunchKernelEx(&cfg, k, args...);
#endif
}

template <typename... KA, typename... A>
static inline void kvq_launch(bool pdl, void (*k)(KA...), dim3 grid,
			      dim3 block, size_t smem, cudaStream_t st,
			      A... args)
{
	kvq_launch_cl(pdl, 1, k, grid, block, smem, st, args...);
}

/* Bytes from @p (shared memory) up to the next multiple of @a (a power of
 * two) in the shared window; 0 under HIP. */
static __device__ __forceinline__ unsigned kvq_smem_pad(const void *p,
							unsigned a)
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	(void)p;
	(void)a;
	return 0;
#else
	return (0u - (unsigned)__cvta_generic_to_shared(p)) & (a - 1);
#endif
}

/*
 * Programmatic dependent launch (sm_90): a kernel launched with the
 * programmatic-serialization attribute may start while the kernel before
 * it finishes.  kvq_pdl_trigger() lets the next kernel start (its blocks
 * still wait); kvq_pdl_wait() blocks until every kernel before has
 * finished and its writes are visible, and must come before any read of
 * their results or write to their inputs.  Without the attribute, on
 * older GPUs and on HIP, both do nothing.
 */
/* Device code compiled by nvcc for sm_90 and up. */
#if !(defined(__HIPCC__) || defined(KVQ_HIP)) && defined(__CUDA_ARCH__) && \
	__CUDA_ARCH__ >= 900
#define KVQ_SM90_CODE 1
#else
#define KVQ_SM90_CODE 0
#endif

static __device__ __forceinline__ void kvq_pdl_wait(void)
{
#if KVQ_SM90_CODE
	asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

static __device__ __forceinline__ void kvq_pdl_trigger(void)
{
#if KVQ_SM90_CODE
	asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

/*
 * Thread-block clusters (sm_90; a launch with kvq_launch_cl(), cl > 1).
 * A cluster barrier in two halves, run by every thread of every block
 * of the cluster in the same places: kvq_cluster_arrive() (@release: this
 * thread's earlier shared-memory writes, the remote ones too, become
 * visible to the cluster once the barrier completes; else no ordering),
 * then kvq_cluster_wait(), which returns when every thread has arrived
 * and acquires what they released.  kvq_cluster_st() stores @v at @p's
 * offset in block @rank's shared memory.  Not reached elsewhere (the host
 * launches clusters only on sm_90): they trap there.
 */
#if defined(__HIPCC__) || defined(KVQ_HIP)
#define KVQ_DEVICE_TRAP() __builtin_trap()
#else
#define KVQ_DEVICE_TRAP() __trap()
#endif

static __device__ __forceinline__ void kvq_cluster_arrive(bool release)
{
#if KVQ_SM90_CODE
	if (release)
		asm volatile("barrier.cluster.arrive.release.aligned;" :::
			     "memory");
	else
		asm volatile("barrier.cluster.arrive.relaxed.aligned;" :::);
#else
	(void)release;
	KVQ_DEVICE_TRAP();
#endif
}

static __device__ __forceinline__ void kvq_cluster_wait(void)
{
#if KVQ_SM90_CODE
	asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
	KVQ_DEVICE_TRAP();
#endif
}

static __device__ __forceinline__ void kvq_cluster_st(float *p,
						      unsigned rank, float v)
{
#if KVQ_SM90_CODE
	unsigned a = (unsigned)__cvta_generic_to_shared(p), r;

	asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
		     : "=r"(r) : "r"(a), "r"(rank));
	asm volatile("st.shared::cluster.f32 [%0], %1;"
		     :: "r"(r), "f"(v) : "memory");
#else
	(void)p;
	(void)rank;
	(void)v;
	KVQ_DEVICE_TRAP();
#endif
}

/* Starts bringing @n bytes at @p (16-byte aligned, n a multiple of 16)
 * into L2 (sm_90 bulk prefetch; nothing elsewhere). */
static __device__ __forceinline__ void kvq_prefetch_l2(const void *p,
						       unsigned n)
{
#if KVQ_SM90_CODE
	asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"
		     :: "l"(p), "r"(n) : "memory");
#else
	(void)p;
	(void)n;
#endif
}
#endif /* __CUDACC__ || __HIPCC__ */

#endif /* KVQ_GPU_COMPAT_H */
