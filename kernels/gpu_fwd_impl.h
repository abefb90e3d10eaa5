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
	__half *s;
	size_t bytes;
};

/*
 * A small integer @n (< 2^23) as a float: n under the exponent of 2^23,
 * less 2^23 (exact; one and-or and an add, against the conversion unit's
 * quarter rate).
 */
static __device__ __forceinline__ float kvq_small_f32(unsigned n)
{
	return __fsub_rn(__uint_as_float(0x4b000000u | n), 8388608.0f);
}

/*
 * Eight Q4_K weights of the 144-byte block @blk (d, dmin, 12 bytes of
 * 6-bit scales and mins: one 16-byte load) -- the low (@hi false) or
 * high nibbles of the 8 bytes @u, sub-block @is -- as the f16 values of
 * the CPU's dequantization: d1 * n - m1 with d1 = d * sc and m1 = dmin *
 * m (exact products), the product d1 * n exact too, so one rounding (here
 * a fused multiply-add), then once more to f16.
 */
static __device__ __forceinline__ uint4 kvq_q4k_h8(uint2 u, bool hi,
						   const uint8_t *blk, int is)
{
	uint4 hd = __ldg((const uint4 *)blk);
	/* scales[k] is byte k of the 12 after d and dmin */
	unsigned sw[3] = { hd.y, hd.z, hd.w };
	auto sb = [&](int k) -> unsigned {
		return (sw[k >> 2] >> (8 * (k & 3))) & 0xffu;
	};
	float d = __half2float(__ushort_as_half((unsigned short)hd.x));
	float dmin = __half2float(__ushort_as_half((unsigned short)(hd.x >> 16)));
	unsigned sc, mn;

	if (is < 4) {
		sc = sb(is) & 63;
		mn = sb(is + 4) & 63;
	} else {
		sc = (sb(is + 4) & 15) | ((sb(is - 4) >> 6) << 4);
		mn = (sb(is + 4) >> 4) | ((sb(is) >> 6) << 4);
	}
	float d1 = __fmul_rn(d, kvq_small_f32(sc));
	float m1 = __fmul_rn(dmin, kvq_small_f32(mn));
	unsigned w[2] = { hi ? u.x >> 4 : u.x, hi ? u.y >> 4 : u.y };
	uint4 r;
	unsigned *o = &r.x;

	for (int i = 0; i < 4; i++) {
		unsigned x = w[i >> 1] >> (16 * (i & 1));
		float f0 = __fmaf_rn(d1, kvq_small_f32(x & 15), -m1);
		float f1 = __fmaf_rn(d1, kvq_small_f32((x >> 8) & 15), -m1);
		__half2 h = __floats2half2_rn(f0, f1);

		o[i] = *reinterpret_cast<unsigned *>(&h);
	}
	return r;
}

/*
 * Eight Q6_K weights (columns j .. j + 7 of the block, j % 8 == 0) of the
 * block @blk (210 bytes, padded to 216: ql[128], qh[64], scales[16], d)
 * as the f16 values of the CPU's dequantization (d * scale * (q - 32),
 * in that order), rounded once to f16.
 */
static __device__ __forceinline__ uint4 kvq_q6k_h8(const uint8_t *blk,
						   uint32_t j)
{
	uint32_t h = j / 128, k = (j % 128) / 32, l0 = j % 32;
	uint2 ql = __ldg((const uint2 *)(blk + h * 64 + (k & 1) * 32 + l0));
	uint2 qh = __ldg((const uint2 *)(blk + 128 + h * 32 + l0));
	float d = __half2float(__ldg((const __half *)(blk + 208)));
	float ds = __fmul_rn(d, (float)(int8_t)__ldg(blk + 192 + h * 8 +
						     l0 / 16 + 2 * k));
	unsigned lw[2] = { k >= 2 ? ql.x >> 4 : ql.x, k >= 2 ? ql.y >> 4 : ql.y };
	unsigned hw[2] = { qh.x >> (2 * k), qh.y >> (2 * k) };
	uint4 r;
	unsigned *o = &r.x;

	for (int i = 0; i < 4; i++) {
		unsigned a = lw[i >> 1] >> (16 * (i & 1));
		unsigned b = hw[i >> 1] >> (16 * (i & 1));
		/* q - 32 as a float: exact (q < 64) */
		float q0 = __fsub_rn(kvq_small_f32((a & 15) | ((b & 3) << 4)),
				     32.0f);
		float q1 = __fsub_rn(kvq_small_f32(((a >> 8) & 15) |
						   (((b >> 8) & 3) << 4)), 32.0f);
		__half2 hv = __floats2half2_rn(__fmul_rn(ds, q0),
					       __fmul_rn(ds, q1));

		o[i] = *reinterpret_cast<unsigned *>(&hv);
	}
	return r;
}

/*
 * Eight weights of row @r of @m from column @c (a multiple of 8) as f16
 * values: f16 rows as they are, Q8, Q4, Q4_K and Q6_K rows expanded in
 * registers (kvq_q8_h8(), kvq_q4_h8(), kvq_q4k_h8(), kvq_q6k_h8()) to the
 * f16 values their copy in f16 holds.  A Q4 block's 16 bytes hold its
 * columns 0-15 in the low nibbles and 16-31 in the high ones.
 */
template <int WT>
static __device__ __forceinline__ uint4 kvq_wload8(const dmat &m, uint32_t r,
						   uint32_t c)
{
	if (WT == KVQ_GPU_W_Q8)
		return kvq_q8_h8(__ldg((const uint2 *)((const int8_t *)m.d +
						   (size_t)r * m.cols + c)),
			     m.s[(size_t)r * (m.cols / 32) + c / 32]);
	if (WT == KVQ_GPU_W_Q4)
		return kvq_q4_h8(__ldg((const uint2 *)((const uint8_t *)m.d +
						   (size_t)r * (m.cols / 2) +
						   (c / 32) * 16 + (c & 15))),
			     (c & 16) != 0,
			     m.s[(size_t)r * (m.cols / 32) + c / 32]);
	if (WT == KVQ_GPU_W_Q4K) {
		const uint8_t *blk = (const uint8_t *)m.d +
				     ((size_t)r * (m.cols / 256) + c / 256) *
				     KVQ_GPU_Q4K_BLOCK;
		uint32_t j = c % 256, q = j / 64, hi = (j / 32) & 1;

		return kvq_q4k_h8(__ldg((const uint2 *)(blk + 16 + q * 32 +
							 j % 32)),
				  hi != 0, blk, (int)(2 * q + hi));
	}
	if (WT == KVQ_GPU_W_Q6K)
		return kvq_q6k_h8((const uint8_t *)m.d +
				  ((size_t)r * (m.cols / 256) + c / 256) *
				  KVQ_GPU_Q6K_BLOCK, c % 256);
	return __ldg((const uint4 *)((const __half *)m.d + (size_t)r * m.ld +
				     c));
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
