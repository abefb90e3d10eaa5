/*
 * gpu_fwd_kernels.h - the device side of one forward step on the GPU:
 * embedding, RMSNorm, the small (matrix-vector) and tiled matrix products
 * with their epilogues, SwiGLU, RoPE, page copies and fills.
 * kernels/gpu_fwd.cu, which plans and launches them, includes this once;
 * compiled by nvcc or hipcc only.
 */
#ifndef KVQ_GPU_FWD_KERNELS_H
#define KVQ_GPU_FWD_KERNELS_H

#include <math.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/gpu_fwd_impl.h"

namespace {

constexpr int MV_WARPS = 4;	/* rows (warps) per block of the small product */
constexpr int MV_MAXT = 16;	/* tokens the small product takes */
constexpr int GT = 64;		/* tiled product: rows and tokens per tile */
constexpr int GK = 32;		/* and depth */

/* ------------------------------------------------------ device helpers */

__device__ __forceinline__ float h2f(__half h)
{
	return __half2float(h);
}

/* Element (r, c) of a weight matrix. */
__device__ __forceinline__ float wval(const dmat &m, uint32_t r, uint32_t c)
{
	if (m.type == KVQ_GPU_W_F16)
		return h2f(((const __half *)m.d)[(size_t)r * m.ld + c]);
	if (m.type == KVQ_GPU_W_F32)
		return ((const float *)m.d)[(size_t)r * m.ld + c];
	if (m.type == KVQ_GPU_W_Q4K || m.type == KVQ_GPU_W_Q8K) {
		uint4 u = m.type == KVQ_GPU_W_Q4K ?
			  kvq_wload8<KVQ_GPU_W_Q4K>(m, r, c & ~7u) :
			  kvq_wload8<KVQ_GPU_W_Q8K>(m, r, c & ~7u);

		return h2f(reinterpret_cast<const __half *>(&u)[c & 7]);
	}
	float d = h2f(m.s[(size_t)r * (m.cols / 32) + c / 32]);

	/* Q8, Q4: the f16 value of the weight, as kvq_wload8() and the
	 * load make it. */
	if (m.type == KVQ_GPU_W_Q8)
		return h2f(__float2half_rn(
			(float)((const int8_t *)m.d)[(size_t)r * m.cols + c] * d));
	const uint8_t *b = (const uint8_t *)m.d + (size_t)r * (m.cols / 2) +
			   (c / 32) * 16;
	uint32_t j = c % 32;
	int q = j < 16 ? (b[j] & 15) : (b[j - 16] >> 4);

	return h2f(__float2half_rn((float)(q - 8) * d));
}

__device__ __forceinline__ void unpack_h8(uint4 u, float f[8])
{
	const __half2 *h = reinterpret_cast<const __half2 *>(&u);

	for (int i = 0; i < 4; i++) {
		float2 v = __half22float2(h[i]);

		f[2 * i] = v.x;
		f[2 * i + 1] = v.y;
	}
}

/* ------------------------------------------------------------- kernels */

__global__ void embed_kernel(dmat e, const int32_t *tok, float *x,
			     uint32_t xs)
{
	uint32_t t = blockIdx.x, r;

	kvq_pdl_trigger();
	kvq_pdl_wait();
	r = (uint32_t)tok[t];

	for (uint32_t c = threadIdx.x; c < e.cols; c += blockDim.x)
		x[(size_t)t * xs + c] = wval(e, r, c);
}

/* y[i] = x[rows ? rows[i] : i] / rms * g, as the CPU engine (the sum of
 * squares in double). */
__global__ void rmsnorm_kernel(const float *x, uint32_t xs,
			       const int32_t *rows, const float *g, float *y,
			       uint32_t ys, uint32_t dim, float eps)
{
	__shared__ double part[32];
	uint32_t i = blockIdx.x, r;
	const float *xr;
	double ss = 0.0;

	/* 1024 threads: a decode step's norm is one row, so latency. */
	kvq_pdl_trigger();
	kvq_pdl_wait();
	r = rows ? (uint32_t)rows[i] : i;
	xr = x + (size_t)r * xs;

	for (uint32_t c = threadIdx.x; c < dim; c += blockDim.x)
		ss += (double)xr[c] * xr[c];
	for (int m = 16; m > 0; m >>= 1)
		ss += kvq_shfl_xor_f64(ss, m);
	if ((threadIdx.x & 31) == 0)
		part[threadIdx.x >> 5] = ss;
	__syncthreads();
	if (threadIdx.x == 0) {
		double t = 0.0;

		for (uint32_t w = 0; w < blockDim.x / 32; w++)
			t += part[w];
		part[0] = t;
	}
	__syncthreads();
	float s = (float)(1.0 / sqrt(part[0] / dim + eps));

	for (uint32_t c = threadIdx.x; c < dim; c += blockDim.x)
		y[(size_t)i * ys + c] = norm_val(xr[c], s, g[c]);
}

enum { EPI_STORE = 0, EPI_ADD = 1, EPI_SWIGLU = 2, EPI_QKV = 3 };

struct mmp {
	dmat w;
	const float *x;
	uint32_t xs;
	float *y;
	uint32_t ys;
	uint32_t n;		/* tokens */
	int epi;
	const float *bias;	/* [rows] or NULL */
	uint32_t out_rows;	/* rows written (half of w.rows for SWIGLU) */
	qkv_out q;		/* EPI_QKV */
	/*
	 * RMSNorm without its own kernel (small products, see mv_kernel()):
	 * an EPI_ADD product with gn also writes xg[t][r] = y[t][r] * gn[r]
	 * (the next norm's weights), and the product after it reads x = xg
	 * with ssx set to the raw rows, whose squares give the scale.
	 */
	const float *gn;
	float *xg;
	uint32_t xgs;
	const float *ssx;
	uint32_t ssxs;
	float eps;
};

/* Eight weights f dotted with eight values of x (a, b): one expression
 * for every product, so that sums from x in registers (mv_pairs_kernel())
 * round as those from x in memory. */
__device__ __forceinline__ float dot8v(const float f[8], float4 a, float4 b)
{
	return f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w +
	       f[4] * b.x + f[5] * b.y + f[6] * b.z + f[7] * b.w;
}

/* acc[t] += eight weights f dotted with x[t][0..8), for t < n. */
template <int NT>
__device__ __forceinline__ void dot8(const float f[8], const float *x,
				     uint32_t xs, uint32_t n, float acc[NT])
{
#pragma unroll
	for (int t = 0; t < NT; t++) {
		if (t < (int)n) {
			const float4 *xp = (const float4 *)(x + (size_t)t * xs);

			acc[t] += dot8v(f, xp[0], xp[1]);
		}
	}
}

/* The squares of eight values (a, b) into ss, in row_dot_h1()'s order. */
__device__ __forceinline__ void sq8(float &ss, float4 s0, float4 s1)
{
	ss = fmaf(s0.x, s0.x, fmaf(s0.y, s0.y, fmaf(s0.z, s0.z,
	     fmaf(s0.w, s0.w, ss))));
	ss = fmaf(s1.x, s1.x, fmaf(s1.y, s1.y, fmaf(s1.z, s1.z,
	     fmaf(s1.w, s1.w, ss))));
}

/*
 * Weight loads a lane has in flight before it multiplies the first, for
 * one token's rows of type WT shared by KS warps.  8- and 4-bit rows come
 * 8 bytes of codes a load, so one load at a time left their products
 * bound by the loads' latency (a 2048-column row in four round trips, as
 * long as an f16 row's); four at a time made gate/up and QKV faster, down
 * (KS = MV_WARPS) slower.  f16 rows and batches keep one: four in flight
 * made the f16 products slower (bench/gpu_decode_notes.md).
 */
template <int WT, int NT, int KS>
__host__ __device__ constexpr int mv_ahead()
{
	return NT > 1 || WT == KVQ_GPU_W_F16 || WT == KVQ_GPU_W_F32 ||
	       KS == MV_WARPS ? 1 : 4;
}

/* Row @r's unexpanded weights (kvq_wfetch8()) of columns c0 + u * st,
 * u < U, into wr[u], those below the row's end. */
template <int WT, int U>
__device__ __forceinline__ void fetch_ahead(const dmat &m, uint32_t r,
					    uint32_t c0, uint32_t st,
					    uint4 wr[U])
{
#pragma unroll
	for (int u = 0; u < U; u++)
		if (c0 + u * st < m.cols)
			wr[u] = kvq_wfetch8<WT>(m, r, c0 + u * st);
}

/* Dot of weight row @r with tokens 0..n-1: lane @li of @nl lanes sharing
 * the row takes every nl-th 16-byte load, U of them at a time
 * (mv_ahead()); acc ends as the warp's sum. */
template <int WT, int NT, int U>
__device__ __forceinline__ void row_dot(const mmp &p, uint32_t r, uint32_t li,
					uint32_t nl, float acc[NT])
{
	const float *x = p.x;
	uint32_t xs = p.xs, cols = p.w.cols, st = nl * 8;

	if (WT == KVQ_GPU_W_F32) {
		const float *w = (const float *)p.w.d + (size_t)r * p.w.ld;

#pragma unroll 4
		for (uint32_t c = li * 8; c < cols; c += st) {
			float4 u0 = __ldg((const float4 *)(w + c));
			float4 u1 = __ldg((const float4 *)(w + c + 4));
			float f[8] = { u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w };

			dot8<NT>(f, x + c, xs, p.n, acc);
		}
	} else if (U == 1) {
		/* f16 rows, and Q8 and Q4 ones as their f16 values: the same
		 * columns a lane, so the same sums. */
#pragma unroll 4
		for (uint32_t c = li * 8; c < cols; c += st) {
			float f[8];

			unpack_h8(kvq_wload8<WT>(p.w, r, c), f);
			dot8<NT>(f, x + c, xs, p.n, acc);
		}
	} else {
		/* The same columns in the same order, U loads ahead. */
		for (uint32_t c0 = li * 8; c0 < cols; c0 += U * st) {
			uint4 wr[U];

			fetch_ahead<WT, U>(p.w, r, c0, st, wr);
#pragma unroll
			for (int u = 0; u < U; u++) {
				uint32_t c = c0 + u * st;
				float f[8];

				if (c >= cols)
					break;
				unpack_h8(kvq_wexpand8<WT>(wr[u], c), f);
				dot8<NT>(f, x + c, xs, p.n, acc);
			}
		}
	}
#pragma unroll
	for (int t = 0; t < NT; t++)
		acc[t] = kvq_warp_sum(acc[t]);
}

/*
 * One token, f16 (or Q8 and Q4, as kvq_wload8()) rows, the norm inside
 * the product (mv_kernel()'s NORM path): row @r0 -- and @r1 when PAIR, the
 * up row of a SwiGLU product -- and, where SS, the squares of the raw
 * row p.ssx over as many columns, in one loop,
 * so that both rows' loads and the row of x are in flight together
 * instead of one after another.  acc, acc2 and ss end as the warp's sums.
 */
template <int WT, bool PAIR, bool SS, int U>
__device__ __forceinline__ void row_dot_h1(const mmp &p, uint32_t r0,
					   uint32_t r1, uint32_t li,
					   uint32_t nl, float &acc,
					   float &acc2, float &ss)
{
	const float *xr = p.ssx;
	uint32_t cols = p.w.cols, st = nl * 8;
	float a0[1] = { 0.0f }, a1[1] = { 0.0f };
	/* column @c's weights w0 (and w1) into the sums */
	auto step = [&](uint32_t c, uint4 w0, uint4 w1) {
		float f[8];

		if (SS) {
			sq8(ss, *(const float4 *)(xr + c),
			    *(const float4 *)(xr + c + 4));
		}
		unpack_h8(w0, f);
		dot8<1>(f, p.x + c, p.xs, 1, a0);
		if (PAIR) {
			unpack_h8(w1, f);
			dot8<1>(f, p.x + c, p.xs, 1, a1);
		}
	};

	if (U == 1) {
#pragma unroll 8
		for (uint32_t c = li * 8; c < cols; c += st) {
			uint4 w0 = kvq_wload8<WT>(p.w, r0, c), w1;

			if (PAIR)
				w1 = kvq_wload8<WT>(p.w, r1, c);
			step(c, w0, w1);
		}
	} else {
		for (uint32_t c0 = li * 8; c0 < cols; c0 += U * st) {
			uint4 w0[U], w1[U];

			fetch_ahead<WT, U>(p.w, r0, c0, st, w0);
			if (PAIR)
				fetch_ahead<WT, U>(p.w, r1, c0, st, w1);
#pragma unroll
			for (int u = 0; u < U; u++) {
				uint32_t c = c0 + u * st;

				if (c >= cols)
					break;
				step(c, kvq_wexpand8<WT>(w0[u], c),
				     PAIR ? kvq_wexpand8<WT>(w1[u], c) : w0[u]);
			}
		}
	}
	acc = kvq_warp_sum(a0[0]);
	acc2 = PAIR ? kvq_warp_sum(a1[0]) : 0.0f;
	ss = SS ? kvq_warp_sum(ss) : 0.0f;
}

/* Row @r's sums for tokens 0..n-1 through the epilogue (not EPI_QKV). */
template <int NT>
__device__ __forceinline__ void put_rows(const mmp &p, uint32_t r,
					 const float acc[NT],
					 const float acc2[NT])
{
#pragma unroll
	for (int t = 0; t < NT; t++) {
		if (t >= (int)p.n)
			break;
		float *y = p.y + (size_t)t * p.ys + r;
		float v = acc[t] + (p.bias ? p.bias[r] : 0.0f);

		if (p.epi == EPI_SWIGLU) {
			*y = silu_mul(acc[t], acc2[t]);
		} else if (p.epi == EPI_ADD) {
			float nv = *y + v;

			*y = nv;
			if (NT == 1 && p.xg)	/* set at one token only */
				p.xg[(size_t)t * p.xgs + r] = nv * p.gn[r];
		} else {
			*y = v;
		}
	}
}

/*
 * mv_kernel() at KS = 1 and MV_WARPS without the norm: one row a warp or
 * a block, as before KS = 2 and the norm came (kept apart: merged with
 * them, NT = 4 spilled and batch 4 lost 5%).
 */
template <int WT, int NT, int KS>
__device__ __forceinline__ void mv_plain(const mmp &p)
{
	constexpr int U = mv_ahead<WT, NT, KS>();
	__shared__ float red[2][MV_WARPS][NT];
	uint32_t lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	uint32_t r = KS == 1 ? blockIdx.x * MV_WARPS + w : blockIdx.x;
	uint32_t li = KS == 1 ? lane : w * 32 + lane;
	bool live = r < p.out_rows;
	float acc[NT], acc2[NT];

	kvq_pdl_trigger();
	kvq_pdl_wait();
	if (!live && (KS > 1 || p.epi != EPI_QKV))
		return;
#pragma unroll
	for (int t = 0; t < NT; t++)
		acc[t] = acc2[t] = 0.0f;
	if (live)
		row_dot<WT, NT, U>(p, r, li, 32 * KS, acc);
	if (p.epi == EPI_SWIGLU)
		row_dot<WT, NT, U>(p, r + p.out_rows, li, 32 * KS, acc2);
	if (KS > 1) {
		if (lane == 0) {
#pragma unroll
			for (int t = 0; t < NT; t++) {
				red[0][w][t] = acc[t];
				red[1][w][t] = acc2[t];
			}
		}
		__syncthreads();
		if (w)
			return;
#pragma unroll
		for (int t = 0; t < NT; t++) {
			acc[t] = acc2[t] = 0.0f;
			for (int x = 0; x < KS; x++) {
				acc[t] += red[0][x][t];
				acc2[t] += red[1][x][t];
			}
		}
	}
	if (KS == 1 && p.epi == EPI_QKV) {
		/* Rows r and r ^ 1 (warps w and w ^ 1) are a RoPE pair. */
		if (lane == 0) {
#pragma unroll
			for (int t = 0; t < NT; t++)
				red[0][w][t] = live ? acc[t] + (p.bias ? p.bias[r] : 0.0f) :
					       0.0f;
		}
		__syncthreads();
		if (!live || lane)
			return;
#pragma unroll
		for (int t = 0; t < NT; t++) {
			if (t >= (int)p.n)
				break;
			qkv_put(p.q, r, t, red[0][w][t],
				[&] { return red[0][w ^ 1u][t]; });
		}
		return;
	}
	if (lane)
		return;
	put_rows<NT>(p, r, acc, acc2);
}

/*
 * KS warps share each row, MV_WARPS / KS rows a block.  KS = 1: a warp per
 * row.  KS = MV_WARPS: the block's warps share one long row (the down
 * projection), so that more loads of it are in flight at once.  KS = 2:
 * two rows a block, for the stacked QKV product, whose RoPE pairs rows r
 * and r ^ 1 (the pair stays in one block) at twice the loads in flight of
 * KS = 1.  Partial sums meet in shared memory.
 *
 * NORM (p.ssx set): the product is of RMSNorm(x): x already holds x * g (written
 * by the EPI_ADD product before, p.xg), and each row's sums are scaled by
 * 1 / rms of the raw rows at p.ssx, whose squares the row's warps gather
 * after their dot products (the rows are in L2), or beside them for f16,
 * Q8 and Q4 weights at one token (row_dot_h1()).  The scale is computed
 * as rmsnorm_kernel() computes it (1 / sqrt in double) from an f32 sum in
 * a fixed order: results repeat bit for bit and differ from the separate
 * norm's by rounding.  NORM is 2 where the kernel may take a SwiGLU
 * product's pairs of rows, 1 where it takes single rows only: the
 * launcher gives 8- and 4-bit rows a kernel apiece, so that the pairs
 * fetched ahead for gate/up (mv_ahead()) do not take the registers of
 * QKV's single rows (Q4_0 at batch 1 / 1K: 1346-1367 -> 1399-1400
 * tokens/s); f16 rows one for both, as the two measured faster.
 *
 * Launched as a programmatic dependent: the launch and the block start-up
 * overlap the kernel before.
 */
template <int WT, int NT, int KS, int NORM>
__global__ void __launch_bounds__(MV_WARPS * 32) mv_kernel(mmp p)
{
	if (!NORM && KS != 2) {
		mv_plain<WT, NT, KS>(p);
		return;
	}
	constexpr int RPB = MV_WARPS / KS;	/* rows a block */
	constexpr int U = mv_ahead<WT, NT, KS>();
	__shared__ float red[3][MV_WARPS][NT];
	uint32_t lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	uint32_t r = blockIdx.x * RPB + w / KS;
	uint32_t li = (w % KS) * 32 + lane;
	bool live = r < p.out_rows;
	bool shared_red = KS > 1 || p.epi == EPI_QKV;
	/* f16 at one token: rows and squares in one loop (row_dot_h1()) */
	constexpr bool H1 = NORM && NT == 1 && WT != KVQ_GPU_W_F32;
	float acc[NT], acc2[NT], ss[NT];

	kvq_pdl_trigger();
	kvq_pdl_wait();
	/* A dead row's warps stay for the block's barrier where there is
	 * one (they add nothing). */
	if (!live && (!shared_red || blockIdx.x * RPB >= p.out_rows))
		return;
#pragma unroll
	for (int t = 0; t < NT; t++)
		acc[t] = acc2[t] = ss[t] = 0.0f;
	/* The raw row's squares: where the rows' sums meet in shared
	 * memory, the first row's warps take them for the block. */
	bool do_ss = NORM && (!shared_red || w < KS);
	bool pair = NORM == 2 && p.epi == EPI_SWIGLU;

	if (H1 && pair && live && do_ss)
		row_dot_h1<WT, true, true, U>(p, r, r + p.out_rows, li,
					  32 * KS, acc[0], acc2[0], ss[0]);
	else if (H1 && pair && live)
		row_dot_h1<WT, true, false, U>(p, r, r + p.out_rows, li,
					   32 * KS, acc[0], acc2[0], ss[0]);
	else if (H1 && live && do_ss)
		row_dot_h1<WT, false, true, U>(p, r, r, li, 32 * KS, acc[0],
					   acc2[0], ss[0]);
	else if (H1 && live)
		row_dot_h1<WT, false, false, U>(p, r, r, li, 32 * KS, acc[0],
					    acc2[0], ss[0]);
	if (!H1 && live)
		row_dot<WT, NT, U>(p, r, li, 32 * KS, acc);
	if (!H1 && live && p.epi == EPI_SWIGLU)
		row_dot<WT, NT, U>(p, r + p.out_rows, li, 32 * KS, acc2);
	if (NORM && !H1 && do_ss) {
#pragma unroll
		for (int t = 0; t < NT; t++) {
			if (t < (int)p.n) {
				const float4 *xr = (const float4 *)(p.ssx +
								    (size_t)t * p.ssxs);

				for (uint32_t c = li; c < p.w.cols / 4; c += 32 * KS) {
					float4 a = xr[c];

					ss[t] = fmaf(a.x, a.x, fmaf(a.y, a.y,
						fmaf(a.z, a.z, fmaf(a.w, a.w, ss[t]))));
				}
			}
			ss[t] = kvq_warp_sum(ss[t]);
		}
	}
	if (shared_red) {
		if (lane == 0) {
#pragma unroll
			for (int t = 0; t < NT; t++) {
				red[0][w][t] = acc[t];
				red[1][w][t] = acc2[t];
				if (NORM)
					red[2][w][t] = ss[t];
			}
		}
		__syncthreads();
		if (w % KS || !live)
			return;
#pragma unroll
		for (int t = 0; t < NT; t++) {
			acc[t] = acc2[t] = ss[t] = 0.0f;
#pragma unroll
			for (int x = 0; x < KS; x++) {
				acc[t] += red[0][w + x][t];
				acc2[t] += red[1][w + x][t];
				if (NORM)
					ss[t] += red[2][x][t];
			}
		}
	}
	/* RMSNorm here: scale by 1 / rms of each token's raw row, which
	 * ss then holds. */
	if (NORM) {
#pragma unroll
		for (int t = 0; t < NT; t++) {
			ss[t] = (float)(1.0 / sqrt((double)ss[t] / p.w.cols +
						   p.eps));
			acc[t] *= ss[t];
			acc2[t] *= ss[t];
		}
	}
	if (p.epi == EPI_QKV) {
		/* Rows r and r ^ 1 are a RoPE pair: the other's sums are the
		 * KS partials of its warps (out_rows is even, so it is live). */
		if (lane)
			return;
		uint32_t wo = (w / KS ^ 1u) * KS;
#pragma unroll
		for (int t = 0; t < NT; t++) {
			if (t >= (int)p.n)
				break;
			qkv_put(p.q, r, t, acc[t] + (p.bias ? p.bias[r] : 0.0f),
				[&] {
					float o = 0.0f;

#pragma unroll
					for (int x = 0; x < KS; x++)
						o += red[0][wo + x][t];
					if (NORM)
						o *= ss[t];
					return o + (p.bias ? p.bias[r ^ 1u] : 0.0f);
				});
		}
		return;
	}
	if (lane)
		return;
	put_rows<NT>(p, r, acc, acc2);
}

constexpr int MV_RUN = 32;

/*
 * A group's run of rows in the one-wave kernels (mv_pairs_kernel(),
 * mv_q8a_kernel()): MV_WARPS / KS groups of KS warps a block, the grid's
 * groups splitting @units units of @us rows each in order.  r0 .. r0 +
 * nr - 1: the group's rows (nr <= MV_RUN, the launcher's grid); bl: the
 * block's units (0: nothing to do).  A lane takes columns c0 + k * st, k
 * < CH, of each row: fetch() loads them for the rows at pa (and pb where
 * @two, the up rows of a pair), x8() one chunk of x -- zeros past the
 * row's end -- and adds the raw row's squares where @ss.
 */
template <int WT, int KS, int CH>
struct mv_run {
	uint32_t lane, w, r0, nr, bl, li, st, cols, c0;

	__device__ __forceinline__ mv_run(const mmp &p, uint32_t units,
					  uint32_t us)
	{
		constexpr uint32_t G = MV_WARPS / KS;
		uint32_t ng = gridDim.x * G, gi;

		lane = threadIdx.x & 31;
		w = threadIdx.x >> 5;
		gi = blockIdx.x * G + w / KS;
		r0 = (uint32_t)((uint64_t)gi * units / ng) * us;
		nr = (uint32_t)((uint64_t)(gi + 1) * units / ng) * us - r0;
		bl = (uint32_t)((uint64_t)(blockIdx.x + 1) * G * units / ng) -
		     (uint32_t)((uint64_t)blockIdx.x * G * units / ng);
		li = (w % KS) * 32 + lane;
		st = 32 * KS * 8;
		cols = p.w.cols;
		c0 = li * 8;
	}
	__device__ __forceinline__ void fetch(const kvq_wrow<WT> &pa,
					      const kvq_wrow<WT> &pb, bool two,
					      uint4 *ra, uint4 *rb) const
	{
#pragma unroll
		for (int k = 0; k < CH; k++) {
			if (c0 + k * st < cols) {
				ra[k] = pa.fetch(k * st);
				if (two)
					rb[k] = pb.fetch(k * st);
			}
		}
	}
	__device__ __forceinline__ void x8(const mmp &p, int k, bool ss_on,
					   float &ss, float4 &a,
					   float4 &b) const
	{
		uint32_t c = c0 + k * st;

		a = b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
		if (c < cols) {
			a = *(const float4 *)(p.x + c);
			b = *(const float4 *)(p.x + c + 4);
			if (ss_on)
				sq8(ss, *(const float4 *)(p.ssx + c),
				    *(const float4 *)(p.ssx + c + 4));
		}
	}
	/* After row i's warp sums (a0, a1: the pair's up row) are in, lane
	 * 0 puts them into @red. */
	__device__ __forceinline__ void put(float (&red)[2][MV_WARPS][MV_RUN],
					    uint32_t i, float a0,
					    float a1) const
	{
		if (lane == 0) {
			red[0][w][i] = a0;
			red[1][w][i] = a1;
		}
	}
	/* After the rows: the warps' squares @ss meet in @sred; lane i of
	 * the group's first warp gets row i's sums of its KS warps from
	 * @red into acc (acc2: the pair's up row) and the squares' total
	 * into ss, and true; the other lanes false. */
	__device__ __forceinline__ bool gather(const float (&red)[2][MV_WARPS][MV_RUN],
					       float *sred, bool ss_on,
					       float &ss, float &acc,
					       float &acc2) const
	{
		float t = 0.0f;

		if (ss_on)
			ss = kvq_warp_sum(ss);
		if (lane == 0)
			sred[w] = ss;
		__syncthreads();
		if (w % KS || lane >= nr)
			return false;
		acc = acc2 = 0.0f;
#pragma unroll
		for (int x = 0; x < KS; x++) {
			acc += red[0][w + x][lane];
			acc2 += red[1][w + x][lane];
			t += sred[x];
		}
		ss = t;
		return true;
	}
};

/*
 * One token of gate/up (SwiGLU) over 8- and 4-bit rows with the norm
 * inside (mv_kernel()'s NORM path at NT = 1), x held in registers: KS
 * warps share each pair of rows (r, r + out_rows) of a run of consecutive
 * pairs, and MV_WARPS / KS such groups make a block.  The grid is one
 * wave (the launcher's) and the groups split the pairs between them in
 * runs of at most MV_RUN.  A lane takes the columns li * 8 + k * st, k <
 * CH, of every row, so its x (and, for the block's first group, the raw
 * row's squares) is loaded once for the run, and pair i + 1's weights are
 * fetched before pair i is expanded and multiplied: the next loads stay
 * in flight while a warp computes, and no block waits for a slot.  Each
 * lane sums its columns in row_dot_h1()'s order and the sums meet as
 * mv_kernel()'s do, so the results are the same bit for bit.  cols <= CH
 * * st (the launcher's check).
 */
template <int WT, int KS, int CH>
__global__ void __launch_bounds__(MV_WARPS * 32) mv_pairs_kernel(mmp p)
{
	__shared__ float red[2][MV_WARPS][MV_RUN], sred[MV_WARPS];
	/* the group's pairs r0 .. r0 + nr - 1 */
	const mv_run<WT, KS, CH> u(p, p.out_rows, 1);
	uint32_t lane = u.lane, w = u.w, r0 = u.r0, nr = u.nr;
	uint32_t st = u.st, cols = u.cols, c0 = u.c0;
	bool do_ss = w < KS;	/* the first group's warps: the squares */
	kvq_wrow<WT> pa(p.w, r0, c0), pb(p.w, r0 + p.out_rows, c0);
	float4 xa[CH], xb[CH];
	uint4 wa[CH], wb[CH];
	float ss = 0.0f;

	kvq_pdl_trigger();
	kvq_pdl_wait();
	if (!u.bl)
		return;
	if (nr)
		u.fetch(pa, pb, true, wa, wb);
#pragma unroll
	for (int k = 0; k < CH; k++)
		u.x8(p, k, do_ss, ss, xa[k], xb[k]);
#pragma unroll 2
	for (uint32_t i = 0; i < nr; i++) {
		uint4 na[CH], nb[CH];
		float a0 = 0.0f, a1 = 0.0f;

		if (i + 1 < nr) {
			pa.next(cols);
			pb.next(cols);
			u.fetch(pa, pb, true, na, nb);
		}
#pragma unroll
		for (int k = 0; k < CH; k++) {
			uint32_t c = c0 + k * st;
			float f[8];

			if (c >= cols)
				break;
			unpack_h8(kvq_wexpand8<WT>(wa[k], c), f);
			a0 += dot8v(f, xa[k], xb[k]);
			unpack_h8(kvq_wexpand8<WT>(wb[k], c), f);
			a1 += dot8v(f, xa[k], xb[k]);
		}
		u.put(red, i, kvq_warp_sum(a0), kvq_warp_sum(a1));
#pragma unroll
		for (int k = 0; k < CH; k++) {
			wa[k] = na[k];
			wb[k] = nb[k];
		}
	}
	/* Lane i of the group's first warp: pair r0 + i, as mv_kernel(). */
	float acc, acc2, s;

	if (!u.gather(red, sred, do_ss, ss, acc, acc2))
		return;
	s = (float)(1.0 / sqrt((double)ss / cols + p.eps));
	acc *= s;
	acc2 *= s;
	put_rows<1>(p, r0 + lane, &acc, &acc2);
}

/*
 * A lane's eight weights (kvq_wrow::fetch()'s @u) dotted with its eight
 * int8 x (q, scale dx, code sum sx): the codes in integers, one scaling.
 * Q8: d * dx * sum(q w); Q4: d * dx * (sum(q w) - 8 sx) (the nibbles of
 * the chunk's half of the block: @hi); Q4K and Q8K: their weights are
 * s * w + o, so dx * (s * sum(q w) + o * sx).
 */
template <int WT>
__device__ __forceinline__ float q8a_dot8(uint4 u, const int q[2], float dx,
					  int sx, bool hi)
{
	int a = (int)u.x, b = (int)u.y, is;

	if (kvq_wrow<WT>::NIB) {
		a = (int)((hi ? u.x >> 4 : u.x) & 0x0f0f0f0fu);
		b = (int)((hi ? u.y >> 4 : u.y) & 0x0f0f0f0fu);
	}
	is = kvq_dp4a(a, q[0], kvq_dp4a(b, q[1], 0));
	if (WT == KVQ_GPU_W_Q8)
		return h2f(__ushort_as_half((unsigned short)u.z)) * dx *
		       (float)is;
	if (WT == KVQ_GPU_W_Q4)
		return h2f(__ushort_as_half((unsigned short)u.z)) * dx *
		       (float)(is - 8 * sx);
	return dx * (__uint_as_float(u.z) * (float)is +
		     __uint_as_float(u.w) * (float)sx);
}

/*
 * One token of an 8- or 4-bit product in the int8 dot mode: x quantized
 * per 32 columns (q8a_quant8()) and each row's codes dotted with it in
 * integers (q8a_dot8()), as the CPU's kvq_vec_dot_q8act() computes it up
 * to the order of the f32 sums.  The grid is one wave (the launcher's),
 * as mv_pairs_kernel()'s: KS warps share each row -- PAIR: each SwiGLU
 * pair r, r + out_rows -- of a run of consecutive rows (whole RoPE pairs
 * for the QKV product), MV_WARPS / KS such groups a block.  A lane's CH
 * chunks of eight columns of x are loaded and quantized once for the run
 * and stay in registers, and row i + 1's codes are fetched before row i
 * is multiplied.  Where p.ssx is set the norm is inside: x holds x * g,
 * which is what gets quantized (the codes of the normalized row up to
 * rounding: the scale of a block follows its values), the first group's
 * warps sum the raw row's squares, and the sums are scaled by 1 / rms.
 * Any epilogue; cols <= CH * 256 * KS and a multiple of 32 (the
 * launcher's checks).
 */
template <int WT, int KS, int CH, bool PAIR>
__global__ void __launch_bounds__(MV_WARPS * 32) mv_q8a_kernel(mmp p)
{
	__shared__ float red[2][MV_WARPS][MV_RUN], sred[MV_WARPS];
	/* rows a unit of the runs: a RoPE pair for QKV */
	uint32_t us = !PAIR && p.epi == EPI_QKV ? 2 : 1;
	const mv_run<WT, KS, CH> u(p, p.out_rows / us, us);
	uint32_t lane = u.lane, w = u.w, r0 = u.r0, nr = u.nr;
	uint32_t st = u.st, cols = u.cols, c0 = u.c0;
	bool do_ss = p.ssx && w < KS, hi = (c0 & 16) != 0;
	kvq_wrow<WT> pa(p.w, r0, c0), pb(p.w, r0 + p.out_rows, c0);
	int xq[CH][2], xsum[CH];
	float xd[CH], ss = 0.0f;
	uint4 wa[CH], wb[CH];

	kvq_pdl_trigger();
	kvq_pdl_wait();
	if (!u.bl)
		return;
	if (nr)
		u.fetch(pa, pb, PAIR, wa, wb);
#pragma unroll
	for (int k = 0; k < CH; k++) {
		float4 a, b;

		u.x8(p, k, do_ss, ss, a, b);
		xsum[k] = q8a_quant8(a, b, xq[k], xd[k]);
	}
#pragma unroll 2
	for (uint32_t i = 0; i < nr; i++) {
		uint4 na[CH], nb[CH];
		float a0 = 0.0f, a1 = 0.0f;

		if (i + 1 < nr) {
			pa.next(cols);
			if (PAIR)
				pb.next(cols);
			u.fetch(pa, pb, PAIR, na, nb);
		}
#pragma unroll
		for (int k = 0; k < CH; k++) {
			if (c0 + k * st >= cols)
				break;
			a0 += q8a_dot8<WT>(wa[k], xq[k], xd[k], xsum[k], hi);
			if (PAIR)
				a1 += q8a_dot8<WT>(wb[k], xq[k], xd[k],
						   xsum[k], hi);
		}
		u.put(red, i, kvq_warp_sum(a0), PAIR ? kvq_warp_sum(a1) : 0.0f);
#pragma unroll
		for (int k = 0; k < CH; k++) {
			wa[k] = na[k];
			if (PAIR)
				wb[k] = nb[k];
		}
	}
	/* Lane i of the group's first warp: row (pair) r0 + i. */
	float acc, acc2, s = 1.0f;
	uint32_t r = r0 + lane;

	if (!u.gather(red, sred, do_ss, ss, acc, acc2))
		return;
	if (p.ssx) {
		s = (float)(1.0 / sqrt((double)ss / cols + p.eps));
		acc *= s;
		acc2 *= s;
	}
	if (!PAIR && p.epi == EPI_QKV) {
		qkv_put(p.q, r, 0, acc + (p.bias ? p.bias[r] : 0.0f), [&] {
			float o = 0.0f;

#pragma unroll
			for (int x = 0; x < KS; x++)
				o += red[0][w + x][lane ^ 1u];
			if (p.ssx)
				o *= s;
			return o + (p.bias ? p.bias[r ^ 1u] : 0.0f);
		});
		return;
	}
	put_rows<1>(p, r, &acc, &acc2);
}

/* Tiled product for many tokens: a 64x64 (rows x tokens) tile per block,
 * each thread 4x4, weights dequantized into shared memory as f32 (wval(),
 * by the matrix's type). */
__global__ void __launch_bounds__(256) gemm_kernel(mmp p)
{
	__shared__ float ws[GK][GT + 4];
	__shared__ float xsm[GK][GT + 4];
	int tid = threadIdx.x;
	uint32_t r0 = blockIdx.x * GT, t0 = blockIdx.y * GT;
	int tr = (tid % 16) * 4, tt = (tid / 16) * 4;
	float acc[4][4] = {};
	uint32_t kend = pad32(p.w.cols);

	kvq_pdl_trigger();
	kvq_pdl_wait();

	for (uint32_t k0 = 0; k0 < kend; k0 += GK) {
		/* 64 rows x 32 depth: thread loads 8 values of one row. */
		int lr = tid / 4, lc = (tid % 4) * 8;
		uint32_t r = r0 + lr;

		for (int i = 0; i < 8; i++) {
			uint32_t c = k0 + lc + i;

			ws[lc + i][lr] = (r < p.w.rows && c < p.w.cols) ?
					 wval(p.w, r, c) : 0.0f;
		}
		uint32_t t = t0 + lr;

		for (int i = 0; i < 8; i++) {
			uint32_t c = k0 + lc + i;

			xsm[lc + i][lr] = (t < p.n && c < p.w.cols) ?
					  p.x[(size_t)t * p.xs + c] : 0.0f;
		}
		__syncthreads();
#pragma unroll 8
		for (int k = 0; k < GK; k++) {
			float a[4], b[4];

			for (int i = 0; i < 4; i++) {
				a[i] = ws[k][tr + i];
				b[i] = xsm[k][tt + i];
			}
			for (int i = 0; i < 4; i++)
				for (int j = 0; j < 4; j++)
					acc[i][j] += a[i] * b[j];
		}
		__syncthreads();
	}
	for (int j = 0; j < 4; j++) {
		uint32_t t = t0 + tt + j;

		if (t >= p.n)
			break;
		for (int i = 0; i < 4; i++) {
			uint32_t r = r0 + tr + i;

			if (r >= p.w.rows)
				break;
			float *y = p.y + (size_t)t * p.ys + r;
			float v = acc[i][j] + (p.bias ? p.bias[r] : 0.0f);

			if (p.epi == EPI_ADD)
				*y += v;
			else
				*y = v;
		}
	}
}

__global__ void swiglu_kernel(const float *gu, uint32_t gs, float *h,
			      uint32_t hs, uint32_t f)
{
	uint32_t t = blockIdx.y;

	kvq_pdl_trigger();
	kvq_pdl_wait();
	for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < f;
	     c += gridDim.x * blockDim.x)
		h[(size_t)t * hs + c] = silu_mul(gu[(size_t)t * gs + c],
						 gu[(size_t)t * gs + f + c]);
}

/* Splits the stacked QKV rows: q rotated (as the CPU engine's RoPE, no
 * contraction) into qb, k and v copied into kb and vb.  One element a
 * thread over a (row, slice) grid: a decode step is one row, so the kernel
 * is latency, not work. */
__global__ void rope_split_kernel(const float *qkv, uint32_t qkvs, float *qb,
				  uint32_t qs, float *kb, float *vb,
				  uint32_t nh, uint32_t nkv, uint32_t hd,
				  uint32_t rope_dim, int neox, const float *cs)
{
	uint32_t t = blockIdx.x, qd = nh * hd, kvd = nkv * hd;
	uint32_t half = rope_dim / 2;
	uint32_t i = blockIdx.y * blockDim.x + threadIdx.x;
	const float *row = qkv + (size_t)t * qkvs;
	const float *e = cs + (size_t)t * half * 2;

	kvq_pdl_trigger();
	kvq_pdl_wait();

	if (i < qd) {
		uint32_t h = i / hd, c = i % hd;
		const float *v = row + (size_t)h * hd;
		float o = v[c];

		if (c < rope_dim) {
			uint32_t j = neox ? (c < half ? c : c - half) : c / 2;
			bool first = neox ? c < half : !(c & 1);
			uint32_t a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
			float co = e[2 * j], si = e[2 * j + 1];

			o = first ? __fsub_rn(__fmul_rn(v[a], co), __fmul_rn(v[b], si)) :
				    __fadd_rn(__fmul_rn(v[a], si), __fmul_rn(v[b], co));
		}
		qb[(size_t)t * qs + i] = o;
	} else if (i < qd + kvd) {
		kb[(size_t)t * kvd + (i - qd)] = row[i];
	} else if (i < qd + 2 * kvd) {
		vb[(size_t)t * kvd + (i - qd - kvd)] = row[i];
	}
}

__global__ void copy_page_kernel(uint8_t *base, size_t pb, int32_t dst,
				 int32_t src)
{
	const uint4 *s = (const uint4 *)(base + (size_t)src * pb);
	uint4 *d = (uint4 *)(base + (size_t)dst * pb);

	for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < pb / 16;
	     i += (size_t)gridDim.x * blockDim.x)
		d[i] = s[i];
}

__global__ void fill_kernel(float *x, size_t n, uint32_t seed)
{
	for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
	     i += (size_t)gridDim.x * blockDim.x) {
		uint32_t h = (uint32_t)i * 2654435761u ^ seed;

		h ^= h >> 15;
		h *= 2246822519u;
		h ^= h >> 13;
		x[i] = ((float)(h & 0xffff) / 32768.0f - 1.0f);
	}
}

} /* namespace */

#endif /* KVQ_GPU_FWD_KERNELS_H */
