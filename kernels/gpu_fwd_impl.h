/*
 * gpu_fwd_impl.h - what kernels/gpu_fwd.cu (the step) and
 * kernels/gpu_model.cu (the weights) share: a device weight matrix, the
 * model, and two host helpers.  Compiled by nvcc or hipcc only; the rest
 * of kvqd sees kernels/gpu_fwd.h.
 */
#ifndef KVQ_GPU_FWD_IMPL_H
#define KVQ_GPU_FWD_IMPL_H

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "kernels/gpu_compat.h"
#include "kernels/gpu_fwd.h"

/* Rows of f16/f32 matrices and activations are padded to this. */
static __host__ __device__ inline uint32_t pad32(uint32_t n)
{
	return (n + 31) & ~31u;
}

/* The CPU engine's RMSNorm of one element: x * (1 / rms), then * g, each
 * product rounded (no contraction). */
static __device__ __forceinline__ float norm_val(float x, float inv, float g)
{
	return __fmul_rn(__fmul_rn(x, inv), g);
}

/* The CPU engine's SwiGLU of one element: silu(g) * u. */
static __device__ __forceinline__ float silu_mul(float g, float u)
{
	return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

/*
 * Where a QKV product's rows go (gpu_fwd_kernels.h's EPI_QKV, gpu_blas.cu's
 * skinny product): q (rows below qd) rotated by RoPE's adjacent pairs with
 * the step's table @cs ([token][rope_dim]: cos, sin a pair) into qb
 * (stride qs), k and v (kvd rows each) into kb and vb (stride kvd), as
 * rope_split_kernel() writes them.
 */
struct qkv_out {
	float *qb, *kb, *vb;
	const float *cs;
	uint32_t qs, qd, kvd, hd, rope_dim;
};

/*
 * Row @r of the stacked QKV product for token @t, @v its sum with the
 * bias: a query row, rotated with its RoPE pair r ^ 1 (whose value
 * other() gives, read only where needed) for channels below rope_dim, a
 * key row or a value row, where rope_split_kernel() would put it.
 */
template <typename O>
static __device__ __forceinline__ void qkv_put(const qkv_out &q, uint32_t r, int t,
					float v, O other)
{
	if (r < q.qd) {
		uint32_t c = r % q.hd;

		if (c < q.rope_dim) {
			const float *e = q.cs + (size_t)t * q.rope_dim;
			float co = e[c & ~1u], si = e[c | 1u];
			float o = other();
			float a = (c & 1) ? o : v, b = (c & 1) ? v : o;

			v = (c & 1) ? __fadd_rn(__fmul_rn(a, si), __fmul_rn(b, co)) :
				      __fsub_rn(__fmul_rn(a, co), __fmul_rn(b, si));
		}
		q.qb[(size_t)t * q.qs + r] = v;
	} else if (r < q.qd + q.kvd) {
		q.kb[(size_t)t * q.kvd + (r - q.qd)] = v;
	} else {
		q.vb[(size_t)t * q.kvd + (r - q.qd - q.kvd)] = v;
	}
}

/* A weight matrix in device memory (formats: kernels/gpu_fwd.h). */
struct dmat {
	int type;		/* enum kvq_gpu_wtype */
	uint32_t rows, cols, ld;	/* ld: elements a row (F16) */
	void *d;
	__half *s;		/* halves (Q8, Q4), float pairs (Q4K, Q8K) */
	size_t bytes;
};

/*
 * Where column @c0 of row @r of an 8- or 4-bit matrix lies: the bytes of
 * its codes (@q: 8 bytes, the 8-bit codes or the bytes whose low or high
 * nibbles hold the column's 4-bit ones) and of its block's scale (@s).
 * The codes of columns c0 + dc and of the next row are constant offsets
 * from them, so that a loop over a lane's columns and rows
 * (mv_pairs_kernel()) does no index arithmetic a load; kvq_wfetch8() is
 * fetch(0).
 */
template <int WT>
struct kvq_wrow {
	const uint8_t *q, *s;
	static constexpr bool NIB = WT == KVQ_GPU_W_Q4 || WT == KVQ_GPU_W_Q4K;
	static constexpr bool PAIRS = WT == KVQ_GPU_W_Q4K || WT == KVQ_GPU_W_Q8K;
	static constexpr uint32_t GS = WT == KVQ_GPU_W_Q8K ? 16 : 32;	/* columns a scale */
	static constexpr uint32_t SB = PAIRS ? 8 : 2;	/* bytes a scale */

	__device__ __forceinline__ kvq_wrow(const dmat &m, uint32_t r,
					    uint32_t c0)
	{
		q = (const uint8_t *)m.d + (size_t)r * (NIB ? m.cols / 2 : m.cols) +
		    (NIB ? (c0 / 32) * 16 + (c0 & 15) : c0);
		s = (const uint8_t *)m.s + ((size_t)r * (m.cols / GS) + c0 / GS) * SB;
	}
	/* the next row: @cols columns on */
	__device__ __forceinline__ void next(uint32_t cols)
	{
		q += NIB ? cols / 2 : cols;
		s += (cols / GS) * SB;
	}
	/* column c0 + dc (dc a multiple of 32): the codes (x, y) and the
	 * block's scale (z, and w for the pairs of Q4K and Q8K) */
	__device__ __forceinline__ uint4 fetch(uint32_t dc) const
	{
		uint2 c = __ldg((const uint2 *)(q + (NIB ? dc / 2 : dc)));
		uint4 u;

		u.x = c.x;
		u.y = c.y;
		if (PAIRS) {
			float2 so = __ldg((const float2 *)(s + (dc / GS) * SB));

			u.z = __float_as_uint(so.x);
			u.w = __float_as_uint(so.y);
		} else {
			u.z = __half_as_ushort(
				__ldg((const __half *)(s + (dc / GS) * SB)));
			u.w = 0;
		}
		return u;
	}
};

/*
 * Eight columns of x as int8 in the int8 dot mode (kvq_quant_dot_mode();
 * mv_q8a_kernel(), gpu_blas.cu's tcq_kernel()): a 32-column block of x lies in four neighbouring lanes' chunks, which
 * find its largest magnitude by shuffles (every lane calls this, in and
 * out of the row: lanes past its end give zeros) and quantize as the
 * CPU's kvq_quantize_act_q8() does: d = amax / 127, q = x / d rounded to
 * nearest even, 0 for a block too small for 1 / d.  q: the codes, four
 * bytes a word; d: the block's scale; the return: the sum of the eight
 * codes (for 4-bit weights' offsets).
 */
static __device__ __forceinline__ int q8a_quant8(float4 a, float4 b, int q[2],
					  float &d)
{
	float v[8] = { a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w };
	float m = 0.0f, id = 0.0f;
	int s = 0;

#pragma unroll
	for (int j = 0; j < 8; j++)
		m = fmaxf(m, fabsf(v[j]));
	m = fmaxf(m, kvq_shfl_xor_f32(m, 1));
	m = fmaxf(m, kvq_shfl_xor_f32(m, 2));
	d = 0.0f;
	if (m >= 1e-30f) {
		d = __fdiv_rn(m, 127.0f);
		id = __fdiv_rn(1.0f, d);
	}
	q[0] = q[1] = 0;
#pragma unroll
	for (int j = 0; j < 8; j++) {
		int c = __float2int_rn(__fmul_rn(v[j], id));

		s += c;
		q[j / 4] |= (c & 255) << (8 * (j % 4));
	}
	return s;
}

/*
 * Eight weights of row @r of @m from column @c (a multiple of 8) as f16
 * values: f16 rows as they are; Q8, Q4, Q4K and Q8K rows expanded in
 * registers (kvq_q8_h8(), kvq_q4_h8(), kvq_q4k_h8(), kvq_q8k_h8()).  A
 * 4-bit block's 16 bytes hold its columns 0-15 in the low nibbles and
 * 16-31 in the high ones.  Each gives the f16 value that the weight's
 * copy in f16 holds.
 *
 * kvq_wload8() in two halves, so that a loop can have all its loads in
 * flight before it expands the first: kvq_wfetch8() loads the 16 bytes
 * of f16 rows, or the codes (x, y) and the block's scale (z, and w for
 * the pairs of Q4K and Q8K) of the others; kvq_wexpand8() makes the f16
 * values from them.
 */
template <int WT>
static __device__ __forceinline__ uint4 kvq_wfetch8(const dmat &m, uint32_t r,
						    uint32_t c)
{
	if (WT == KVQ_GPU_W_Q8 || WT == KVQ_GPU_W_Q4 ||
	    WT == KVQ_GPU_W_Q4K || WT == KVQ_GPU_W_Q8K)
		return kvq_wrow<WT>(m, r, c).fetch(0);
	return __ldg((const uint4 *)((const __half *)m.d + (size_t)r * m.ld +
				     c));
}

template <int WT>
static __device__ __forceinline__ uint4 kvq_wexpand8(uint4 u, uint32_t c)
{
	uint2 q = make_uint2(u.x, u.y);

	if (WT == KVQ_GPU_W_Q8)
		return kvq_q8_h8(q, __ushort_as_half((unsigned short)u.z));
	if (WT == KVQ_GPU_W_Q4)
		return kvq_q4_h8(q, (c & 16) != 0,
				 __ushort_as_half((unsigned short)u.z));
	if (WT == KVQ_GPU_W_Q4K)
		return kvq_q4k_h8(q, (c & 16) != 0,
				  make_float2(__uint_as_float(u.z),
					      __uint_as_float(u.w)));
	if (WT == KVQ_GPU_W_Q8K)
		return kvq_q8k_h8(q, make_float2(__uint_as_float(u.z),
						 __uint_as_float(u.w)));
	return u;
}

template <int WT>
static __device__ __forceinline__ uint4 kvq_wload8(const dmat &m, uint32_t r,
						   uint32_t c)
{
	return kvq_wexpand8<WT>(kvq_wfetch8<WT>(m, r, c), c);
}

/*
 * Calls @f with std::integral_constant<int, WT>() for device weight type
 * @t, so that a launcher instantiates its kernel once per type in one
 * place: F16 and the 8/4-bit types, and F32 where @f32 (types kept f32
 * otherwise go nowhere: F16 stands in, the callers' checks keep them out).
 */
template <bool F32 = false, typename F>
static inline void kvq_wt_switch(int t, F &&f)
{
	switch (t) {
	case KVQ_GPU_W_Q8:
		f(std::integral_constant<int, KVQ_GPU_W_Q8>());
		break;
	case KVQ_GPU_W_Q4:
		f(std::integral_constant<int, KVQ_GPU_W_Q4>());
		break;
	case KVQ_GPU_W_Q4K:
		f(std::integral_constant<int, KVQ_GPU_W_Q4K>());
		break;
	case KVQ_GPU_W_Q8K:
		f(std::integral_constant<int, KVQ_GPU_W_Q8K>());
		break;
	case KVQ_GPU_W_F32:
		if (F32) {
			f(std::integral_constant<int, F32 ? KVQ_GPU_W_F32 :
					      KVQ_GPU_W_F16>());
			break;
		}
		/* fall through */
	default:
		f(std::integral_constant<int, KVQ_GPU_W_F16>());
	}
}

struct kvq_gpu_model {
	struct kvq_gpu_model_desc d;
	dmat *m;		/* [n_layers][KVQ_GPU_M_NLAYER] */
	dmat embed, output;
	bool tied;
	float **v;		/* [n_layers][KVQ_GPU_V_NLAYER] */
	float *out_norm;
	uint64_t bytes;
};

static inline int set_err(char *err, size_t errlen, int ret,
			  const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static inline int set_err(char *err, size_t errlen, int ret,
			  const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return ret;
}

/* cudaMalloc with a message naming what and how much when it fails. */
static inline int dalloc(void **p, size_t n, const char *what, char *err,
			 size_t errlen)
{
	size_t fr = 0, tot = 0;

	*p = nullptr;
	if (!n)
		n = 16;
	if (cudaMalloc(p, n) == cudaSuccess)
		return 0;
	cudaGetLastError();
	cudaMemGetInfo(&fr, &tot);
	*p = nullptr;
	return set_err(err, errlen, -ENOMEM,
		       "cannot allocate %.1f MiB of device memory for %s (%.1f MiB free of %.1f MiB)",
		       n / 1048576.0, what, fr / 1048576.0, tot / 1048576.0);
}

#endif /* KVQ_GPU_FWD_IMPL_H */
