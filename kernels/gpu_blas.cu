/*
 * gpu_blas.cu - the f16-weight products of prompts on tensor cores, through
 * cuBLAS.
 *
 * Why this file exists: see gpu_blas.h.  Tensor cores take f16 operands
 * and accumulate in f32.  Rounding the f32 activations to f16 would keep
 * 11 of their 24 bits (the CPU engine, the twin the GPU pass is tested
 * against, keeps all 24), so each activation is split in two halves:
 *
 *   x s = hi + lo + e,   hi = (half)(x s),   lo = (half)(x s - hi)
 *
 * s is a power of two chosen per product so that max |x s| lies in
 * [2^14, 2^15): no half overflows (their largest is 65504), and every
 * element within 2^17 of the largest keeps hi and lo normal, so
 * |e| <= 2^-22 |x s| (x s - hi is exact in f32, lo rounds it to 11 bits).
 * Elements smaller than that lose at most 2^-25 in scaled units, 2^-40 of
 * the largest element, far below what an f32 sum with it resolves.  Then
 *
 *   y = (W hi) / s + (W lo) / s
 *
 * is two cublasGemmEx calls (f16 A and B, f32 C, CUBLAS_COMPUTE_32F): the
 * product of two halves is exact in f32, the sums are f32, and 1/s is a
 * power of two, so scaling back is exact.  Against f32 arithmetic the
 * error is about 2^-22 sum |w x|; two f32 sums of the same terms in
 * different orders already differ by up to 2^-24 k sum |w x|.
 *
 * The products go straight into y: the first with beta 0 (a store) or 1
 * (a residual add, or a bias written into y first), the second with beta
 * 1.  Each such add rounds a partial result no larger than |y| + |W lo| in
 * f32, i.e. it costs an ulp of y, as the CPU's own y += W x rounds once;
 * so no scratch the size of y is needed.
 *
 * Cost: twice the tensor-core work of one f16 product, plus a read of x
 * for its largest element and a read of x and write of the halves.
 * Every device byte is allocated in kvq_gpu_blas_create(), cuBLAS's
 * workspace included, so products may be captured into CUDA graphs (a
 * decode step of more than 16 sequences is).  alpha (1/s) is computed on
 * the device and read by cuBLAS from device memory (pointer mode device),
 * so a replayed graph uses the scale of its own step.
 */
#include <errno.h>
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/gpu_compat.h"
#include "kernels/gpu_blas.h"

#if KVQ_GPU_BLAS
#include <cublas_v2.h>

namespace {

constexpr int THREADS = 256;
constexpr int AMAX_BLOCKS = 128;	/* partial maxima of |x| */

/* Device scalars: alpha (1/s of the current product), the betas, the
 * partial maxima, then the skinny products' alphas (one a token). */
enum { SC_ALPHA = 0, SC_ZERO = 1, SC_ONE = 2, SC_PART = 32,
       SC_TOK = SC_PART + AMAX_BLOCKS };

struct split_args {
	const float *x;
	uint32_t xs, cols, ld;	/* ld: halves a token (W's ld) */
	float *sc;
	__half *hi, *lo;
	const float *bias;
	float *y;
	uint32_t ys, rows;
	bool add;
};

/* The largest @m over the block, in every thread (@red: a float a warp). */
__device__ float block_max(float m, float *red)
{
	for (int o = 16; o > 0; o >>= 1)
		m = fmaxf(m, kvq_shfl_xor_f32(m, o));
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x >> 5] = m;
	__syncthreads();
	m = 0.0f;
	for (uint32_t w = 0; w < blockDim.x / 32; w++)
		m = fmaxf(m, red[w]);
	return m;
}

/* The power of two that brings @m (max |x|) into [2^14, 2^15); 1 for
 * zero and infinity (which then propagates as on the CPU).  NaN never
 * reaches here: fmaxf() drops it, and the element itself stays NaN. */
__device__ float pow2_scale(float m)
{
	int e;

	if (!(m > 0.0f) || m > FLT_MAX)
		return 1.0f;
	frexpf(m, &e);		/* m < 2^e */
	e = 15 - e;
	e = e < -100 ? -100 : e > 100 ? 100 : e;
	return ldexpf(1.0f, e);
}

/* pow2_scale() from the bits of @m, and its inverse (both powers of 2). */
__device__ __forceinline__ void pow2_scale2(float m, float &s, float &is)
{
	uint32_t b = __float_as_uint(m), x = (b >> 23) & 255;
	int e;

	if (!(m > 0.0f) || x == 255) {
		s = is = 1.0f;
		return;
	}
	/* m < 2^(x - 126), so e = 15 - (x - 126); subnormals (x = 0) go to
	 * the clamp as frexpf's exponent does. */
	e = x ? 141 - (int)x : 100;
	e = e < -100 ? -100 : e > 100 ? 100 : e;
	s = __uint_as_float((uint32_t)(127 + e) << 23);
	is = __uint_as_float((uint32_t)(127 - e) << 23);
}

/* part[block] = max |x| over tokens block, block + AMAX_BLOCKS, ... */
__global__ void __launch_bounds__(THREADS)
amax_kernel(const float *x, uint32_t xs, uint32_t cols, uint32_t n,
	    float *part)
{
	__shared__ float red[THREADS / 32];
	float m = 0.0f;

	kvq_pdl_trigger();
	kvq_pdl_wait();
	for (uint32_t t = blockIdx.x; t < n; t += gridDim.x)
		for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
			m = fmaxf(m, fabsf(x[(size_t)t * xs + c]));
	m = block_max(m, red);
	if (threadIdx.x == 0)
		part[blockIdx.x] = m;
}

/*
 * One block a token: hi and lo of x s (zero past cols, up to ld: the
 * weights' padding columns are zero too), alpha = 1/s, and the bias
 * written into (or added to) y.
 */
__global__ void __launch_bounds__(THREADS) split_kernel(split_args a)
{
	__shared__ float red[THREADS / 32];
	uint32_t t = blockIdx.x, i;
	float m = 0.0f, s;

	kvq_pdl_trigger();
	kvq_pdl_wait();
	for (i = threadIdx.x; i < AMAX_BLOCKS; i += blockDim.x)
		m = fmaxf(m, a.sc[SC_PART + i]);
	s = pow2_scale(block_max(m, red));
	if (t == 0 && threadIdx.x == 0)
		a.sc[SC_ALPHA] = 1.0f / s;

	const float *xr = a.x + (size_t)t * a.xs;
	__half2 *hr = (__half2 *)(a.hi + (size_t)t * a.ld);
	__half2 *lr = (__half2 *)(a.lo + (size_t)t * a.ld);

	for (i = threadIdx.x; i < a.ld / 2; i += blockDim.x) {
		uint32_t c = 2 * i;
		float v0 = c < a.cols ? xr[c] * s : 0.0f;
		float v1 = c + 1 < a.cols ? xr[c + 1] * s : 0.0f;
		__half2 h = __floats2half2_rn(v0, v1);
		float2 hf = __half22float2(h);

		hr[i] = h;
		lr[i] = __floats2half2_rn(v0 - hf.x, v1 - hf.y);
	}
	if (!a.bias)
		return;
	for (i = threadIdx.x; i < a.rows; i += blockDim.x) {
		float *y = a.y + (size_t)t * a.ys + i;

		*y = a.add ? *y + a.bias[i] : a.bias[i];
	}
}

/*
 * Skinny products (up to TC_MAXT tokens: decode batches) on tensor cores
 * without cuBLAS: one pass over W for both halves.  cuBLAS reads W once
 * per half, and for a few tokens a product is bound by W's bytes, so its
 * two calls cost twice the time one read of W takes.
 *
 * A warp owns MT 16-row tiles and every KW-th 32-column chunk of them; a
 * block of KW warps covers whole rows, and the warps' sums meet in
 * shared memory.  Each lane reads 16 bytes of a row (8 columns) and of
 * each half, and the 16x8x16 products take those 8 columns as their k
 * slots in the order the lane holds them: the order of k does not change
 * a dot product, and W and x use the same one.  Column j of the product
 * only reads token j, so the tokens past n of the last 8-token tile
 * (read from token n - 1) are computed and never stored.  The weight
 * loads of the first chunks go out before the dependent-launch wait:
 * W does not depend on the kernels before.
 */
constexpr uint32_t TC_MAXT = 16;
/* Up to this many tokens (one 8-token tile) the product reads x itself
 * and gate/up may write SwiGLU's output (kvq_gpu_blas_skinny_mm()). */
constexpr uint32_t TC_READ_MAXT = 8;

struct tc_args {
	dmat w;			/* f16, Q8 or Q4 rows (kvq_wload8()) */
	uint32_t rows, ld;
	const __half *hi, *lo;
	uint32_t n;
	const float *alpha;	/* [n]: 1/s of each token */
	float *y;
	uint32_t ys;
	bool acc;		/* y += (prep_kernel wrote bias, or kept y) */
	/* A QKV product's rows go to qkv (y unused): q rotated, k, v. */
	bool to_qkv;
	struct qkv_out qkv;
	const float *bias;	/* with to_qkv: added here, not by prep */
	/* f32 input read by the product itself (tc_kernel's IN > 0): row
	 * xrows[t] (or t) of x, RMSNorm weights g (IN 2); y (+)= bias. */
	const float *x;
	uint32_t xs, cols;
	const int32_t *xrows;
	const float *g;
	float eps;
	bool add;
	/* W = [gate; up]: tile 0 of a block's gate rows, tile 1 the same
	 * rows of up (half = rows / 2 on), y = silu(gate) * up */
	bool swiglu;
	uint32_t half;
	/* the int8 dot mode: Q8, Q4 and Q4K rows through tcq_kernel() */
	bool q8a;
};

/* Chunks @kc, @kc + KW, ... (U of them, those below @nch) of the warp's
 * rows g and g + 8 of each 16-row tile: row @r[m] (and r[m] + 8), the
 * lane's 8 columns from 8 t.  Q8 and Q4 rows come as the f16 values of
 * their copy in f16 (a chunk of 32 columns is one block), so the products
 * are those of f16 weights to the bit; with RAW as stored (kvq_wfetch8():
 * the codes and the block's scale, for tcq_kernel()). */
template <int WT, int MT, int KW, int U, bool RAW = false>
__device__ __forceinline__ void tc_load_w(uint4 (&A)[U][MT][2],
					  const tc_args &a,
					  const uint32_t (&r)[MT], uint32_t t,
					  uint32_t kc, uint32_t nch)
{
#pragma unroll
	for (int u = 0; u < U; u++) {
		uint32_t ch = kc + u * KW;

		if (ch >= nch)
			break;
#pragma unroll
		for (int m = 0; m < MT; m++) {
			uint32_t c = ch * 32 + 8 * t;

			A[u][m][0] = RAW ? kvq_wfetch8<WT>(a.w, r[m], c) :
				     kvq_wload8<WT>(a.w, r[m], c);
			A[u][m][1] = RAW ? kvq_wfetch8<WT>(a.w, r[m] + 8, c) :
				     kvq_wload8<WT>(a.w, r[m] + 8, c);
		}
	}
}

/* The same chunks of the halves (hi, lo) of the lane's token a tile; or,
 * XS = 64, of its f32 values (8 from the lane's column, as two runs of 4). */
template <int NT, int KW, int U, int XS>
__device__ __forceinline__ void tc_load_x(uint4 (&B)[U][NT][2],
					  const __half *const (&xr)[NT][2],
					  uint32_t kc, uint32_t nch)
{
#pragma unroll
	for (int u = 0; u < U; u++) {
		size_t o = (size_t)(kc + u * KW) * XS;

		if (kc + u * KW >= nch)
			break;
#pragma unroll
		for (int j = 0; j < NT; j++) {
			B[u][j][0] = *(const uint4 *)(xr[j][0] + o);
			B[u][j][1] = *(const uint4 *)(xr[j][1] + o);
		}
	}
}

/* One slot's next chunk @ch (none past @nch): rows and halves. */
template <int WT, int MT, int NT, int XS>
__device__ __forceinline__ void tc_refill(uint4 (&A)[MT][2],
					  uint4 (&B)[NT][2], const tc_args &a,
					  const uint32_t (&r)[MT],
					  const __half *const (&xr)[NT][2],
					  uint32_t t, uint32_t ch, uint32_t nch)
{
	if (ch >= nch)
		return;
#pragma unroll
	for (int m = 0; m < MT; m++) {
		A[m][0] = kvq_wload8<WT>(a.w, r[m], ch * 32 + 8 * t);
		A[m][1] = kvq_wload8<WT>(a.w, r[m] + 8, ch * 32 + 8 * t);
	}
#pragma unroll
	for (int j = 0; j < NT; j++) {
		B[j][0] = *(const uint4 *)(xr[j][0] + (size_t)ch * XS);
		B[j][1] = *(const uint4 *)(xr[j][1] + (size_t)ch * XS);
	}
}

/*
 * The f32 values of one chunk of a token (IN > 0) into the halves of
 * the chunk's own scale: v = x (IN 1) or x g (IN 2, g from @gs), s =
 * pow2_scale() of max |v| over the chunk's 32 columns (the four lanes of
 * the token), B[0] = hi, B[1] = lo as prep_kernel() makes them; @ss gains
 * the squares of x (IN 2); returns 1/s.
 */
template <int IN>
__device__ __forceinline__ float tc_halves(uint4 (&B)[2], const float *gs,
					   double &ss)
{
	float v[8], mx = 0.0f, sc, is;
	union { uint4 u4; __half2 h[4]; } hi, lo;
	int k;

	v[0] = __uint_as_float(B[0].x); v[1] = __uint_as_float(B[0].y);
	v[2] = __uint_as_float(B[0].z); v[3] = __uint_as_float(B[0].w);
	v[4] = __uint_as_float(B[1].x); v[5] = __uint_as_float(B[1].y);
	v[6] = __uint_as_float(B[1].z); v[7] = __uint_as_float(B[1].w);
	if (IN == 2) {
		const float4 g0 = *(const float4 *)gs, g1 = *(const float4 *)(gs + 4);
		const float gv[8] = { g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w };

#pragma unroll
		for (k = 0; k < 8; k++) {
			ss += (double)v[k] * v[k];
			v[k] = __fmul_rn(v[k], gv[k]);
		}
	}
#pragma unroll
	for (k = 0; k < 8; k++)
		mx = fmaxf(mx, fabsf(v[k]));
	mx = fmaxf(mx, kvq_shfl_xor_f32(mx, 1));
	mx = fmaxf(mx, kvq_shfl_xor_f32(mx, 2));
	pow2_scale2(mx, sc, is);
#pragma unroll
	for (k = 0; k < 4; k++) {
		float v0 = v[2 * k] * sc, v1 = v[2 * k + 1] * sc;
		float2 hf;

		hi.h[k] = __floats2half2_rn(v0, v1);
		hf = __half22float2(hi.h[k]);
		lo.h[k] = __floats2half2_rn(v0 - hf.x, v1 - hf.y);
	}
	B[0] = hi.u4;
	B[1] = lo.u4;
	return is;
}

/*
 * The end of tc_kernel() and tcq_kernel(): the warps' sums c (rows of
 * their tiles, tokens of theirs) meet in shared memory (@red, KW * E
 * floats), with IN 2 the squares @ss in @ssw and 1 / rms into @fac, and
 * go through the epilogue: SwiGLU's pairs, QKV's rows, or y (+)= with
 * the bias.
 */
template <int MT, int NT, int KW, int IN>
__device__ __forceinline__ void tc_finish(const tc_args &a,
					  const float (&c)[MT][NT][4],
					  const double (&ss)[NT], float *red,
					  double *ssw, float *fac, uint32_t r0)
{
	constexpr int E = MT * NT * 128;
	const uint32_t lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
	const uint32_t g = lane >> 2, t = lane & 3;
	uint32_t e;
	int m, j;

#pragma unroll
	for (m = 0; m < MT; m++)
#pragma unroll
		for (j = 0; j < NT; j++)
#pragma unroll
			for (int r = 0; r < 4; r++)
				red[wid * E + ((m * NT + j) * 4 + r) * 32 + lane] =
					c[m][j][r];
	if (IN == 2)
#pragma unroll
		for (j = 0; j < NT; j++) {
			double v = ss[j];

			v += kvq_shfl_xor_f64(v, 1);
			v += kvq_shfl_xor_f64(v, 2);
			if (!t)
				ssw[(wid * NT + j) * 8 + g] = v;
		}
	__syncthreads();
	if (IN && threadIdx.x < NT * 8) {
		float f = 1.0f;

		if (IN == 2) {
			double v = 0.0;

			for (int w = 0; w < KW; w++)
				v += ssw[w * NT * 8 + threadIdx.x];
			f = (float)(1.0 / sqrt(v / a.cols + a.eps));
		}
		fac[threadIdx.x] = f;
	}
	if (IN)
		__syncthreads();
	/* SwiGLU (MT 2): entry e of tile 0 (gate) meets e + E / 2 (up) */
	for (e = threadIdx.x; MT == 2 && a.swiglu && e < (uint32_t)E / 2;
	     e += KW * 32) {
		uint32_t l = e & 31, r = (e >> 5) & 3, j2 = e >> 7;
		uint32_t row = r0 + (l >> 2) + (r >= 2 ? 8 : 0);
		uint32_t tok = 8 * j2 + 2 * (l & 3) + (r & 1);
		float sg = 0.0f, su = 0.0f, f = IN ? fac[tok] : a.alpha[tok];

		for (int w = 0; w < KW; w++) {
			sg += red[w * E + e];
			su += red[w * E + E / 2 + e];
		}
		if (tok < a.n)
			a.y[(size_t)tok * a.ys + row] = silu_mul(f * sg, f * su);
	}
	if (a.swiglu)
		return;
	for (e = threadIdx.x; e < (uint32_t)E; e += KW * 32) {
		uint32_t l = e & 31, r = (e >> 5) & 3, mj = e >> 7;
		uint32_t row = r0 + 16 * (mj / NT) + (l >> 2) + (r >= 2 ? 8 : 0);
		uint32_t tok = 8 * (mj % NT) + 2 * (l & 3) + (r & 1);
		float sum = 0.0f, f = IN ? fac[tok] : a.alpha[tok];

		for (int w = 0; w < KW; w++)
			sum += red[w * E + e];
		if (a.to_qkv) {
			/* Whole warps run this loop; the partner row is the
			 * entry of lane ^ 4. */
			float v = f * sum, pv;

			if (a.bias)
				v += a.bias[row];
			pv = kvq_shfl_xor_f32(v, 4);
			if (tok < a.n)
				qkv_put(a.qkv, row, (int)tok, v,
					[pv] { return pv; });
			continue;
		}
		if (tok >= a.n)
			continue;
		float *y = a.y + (size_t)tok * a.ys + row;

		if (IN) {
			/* prep_kernel()'s bias, then the product, in its
			 * order: (y + bias) + f sum */
			if (a.add || a.bias) {
				float b = a.add ? *y : 0.0f;

				if (a.bias)
					b = a.add ? b + a.bias[row] : a.bias[row];
				*y = b + f * sum;
			} else {
				*y = f * sum;
			}
			continue;
		}
		*y = a.acc ? *y + f * sum : f * sum;
	}
}

/*
 * IN: where the tokens come from.  0: the halves prep_kernel() wrote
 * (one scale a token, alpha).  1 (x itself) and 2 (RMSNorm(x)): the f32
 * rows of x, which each warp turns into halves chunk by chunk at a
 * scale of the chunk's own (tc_halves()); the chunk's products go to a
 * scratch accumulator and into c times 1/s, and with IN 2 the block
 * sums the squares of x over its warps' chunks (every column of the row)
 * and scales by 1 / rms at the end, as y = W (x g) / rms is
 * RMSNorm(x)'s product.  No kernel before the product, so a decode
 * step of several tokens has one launch a product instead of two.
 */
/* RMSNorm read by the product: its weights in shared memory (a.ld
 * floats), within the 48 KiB a launch gets without asking, beside the
 * kernel's own (red, ssw, fac: checked below). */
constexpr uint32_t TC_NORM_LD = 4096;

template <int WT, int MT, int NT, int KW, int U, int IN>
__global__ void __launch_bounds__(KW * 32) tc_kernel(tc_args a)
{
	constexpr int E = MT * NT * 128;	/* accumulators a warp */
	static_assert(IN != 2 || KW * E * sizeof(float) +
			  KW * NT * 8 * sizeof(double) + NT * 8 * sizeof(float) +
			  TC_NORM_LD * sizeof(float) <= 48 * 1024,
		      "RMSNorm weights and the sums in 48 KiB");
	constexpr int XS = IN ? 64 : 32;	/* halves a chunk, for xr */
	__shared__ float red[KW * E];
	__shared__ double ssw[IN == 2 ? KW * NT * 8 : 1];
	__shared__ float fac[NT * 8];
	extern __shared__ float gsm[];		/* IN 2: g, a.ld floats */
	const uint32_t lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
	const uint32_t g = lane >> 2, t = lane & 3, nch = a.ld / 32;
	const uint32_t r0 = blockIdx.x * 16 * (a.swiglu ? 1 : MT);
	uint32_t wr[MT];
	const __half *xr[NT][2];
	float c[MT][NT][4];
	double ss[NT];
	uint4 A[U][MT][2], B[U][NT][2];
	uint32_t kc = wid, e;
	int m, j, u;

	for (m = 0; m < MT; m++) {
		wr[m] = r0 + (a.swiglu ? m * a.half : 16 * m) + g;
		for (j = 0; j < NT; j++)
			c[m][j][0] = c[m][j][1] = c[m][j][2] = c[m][j][3] = 0.0f;
	}
	for (j = 0; j < NT; j++)
		ss[j] = 0.0;
	kvq_pdl_trigger();
	if (IN == 2)
		for (e = threadIdx.x * 4; e < a.ld; e += KW * 32 * 4)
			*(float4 *)(gsm + e) = *(const float4 *)(a.g + e);
	tc_load_w<WT, MT, KW, U>(A, a, wr, t, kc, nch);
	kvq_pdl_wait();
	for (j = 0; j < NT; j++) {
		uint32_t tok = 8 * j + g < a.n ? 8 * j + g : a.n - 1;

		if (IN) {
			const float *xf = a.x + (size_t)(a.xrows ?
				(uint32_t)a.xrows[tok] : tok) * a.xs + 8 * t;

			xr[j][0] = (const __half *)xf;
			xr[j][1] = (const __half *)(xf + 4);
		} else {
			xr[j][0] = a.hi + (size_t)tok * a.ld + 8 * t;
			xr[j][1] = a.lo + (size_t)tok * a.ld + 8 * t;
		}
	}
	tc_load_x<NT, KW, U, XS>(B, xr, kc, nch);
	if (IN == 2)
		__syncthreads();	/* gsm */
	for (; kc < nch; kc += KW * U) {
#pragma unroll
		for (u = 0; u < U; u++) {
			if (kc + u * KW >= nch)
				break;
#pragma unroll
			for (j = 0; j < NT; j++) {
				float i0 = 1.0f, i1 = 1.0f;

				if (IN) {
					float is = tc_halves<IN>(B[u][j],
						gsm + (kc + u * KW) * 32 + 8 * t,
						ss[j]);

					/* 1/s of the tokens of the lane's
					 * columns of c: 8j + 2t, 8j + 2t + 1 */
					i0 = kvq_shfl_f32(is, (int)(8 * t));
					i1 = kvq_shfl_f32(is, (int)(8 * t + 4));
				}
#pragma unroll
				for (m = 0; m < MT; m++) {
					const uint4 &p = A[u][m][0], &q = A[u][m][1];
					const unsigned a1[4] = { p.x, q.x, p.y, q.y };
					const unsigned a2[4] = { p.z, q.z, p.w, q.w };
					float tm[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
					float *acc = IN ? tm : c[m][j];

#pragma unroll
					for (int h = 0; h < 2; h++) {
						const uint4 &b = B[u][j][h];
						const unsigned b1[2] = { b.x, b.y };
						const unsigned b2[2] = { b.z, b.w };

						kvq_mma_f16_16816(acc, a1, b1);
						kvq_mma_f16_16816(acc, a2, b2);
					}
					if (IN) {
						c[m][j][0] += i0 * tm[0];
						c[m][j][1] += i1 * tm[1];
						c[m][j][2] += i0 * tm[2];
						c[m][j][3] += i1 * tm[3];
					}
				}
			}
			/*
			 * f16 rows: slot u's next chunk goes out as soon as
			 * its products are issued, so U - 1 chunks stay in
			 * flight while the warp multiplies.  The 8/4-bit rows
			 * are expanded as they arrive (kvq_wload8()), which
			 * would wait on each refill here: they load U chunks
			 * together after the loop body.
			 */
			if (WT == KVQ_GPU_W_F16)
				tc_refill<WT, MT, NT, XS>(A[u], B[u], a, wr, xr,
							  t, kc + (U + u) * KW,
							  nch);
		}
		if (WT != KVQ_GPU_W_F16) {
			tc_load_w<WT, MT, KW, U>(A, a, wr, t, kc + KW * U, nch);
			tc_load_x<NT, KW, U, XS>(B, xr, kc + KW * U, nch);
		}
	}
	tc_finish<MT, NT, KW, IN>(a, c, ss, red, ssw, fac, r0);
}

/*
 * The int8 dot mode's product of up to 8 tokens (one tile of tokens) on
 * tensor cores, x read by the product itself (IN 1, or 2: RMSNorm(x) as
 * x g scaled by 1 / rms at the end): each chunk of 32 columns is one
 * block of the weights and of x's quantization.  A lane (g, t) holds the
 * codes of rows g and g + 8 of its tiles at columns 8 t .. 8 t + 7 of the
 * chunk (kvq_wfetch8(): as stored, with the block's scale) and of token
 * g's x at the same columns, which it quantizes with the token's three
 * other lanes as the CPU's kvq_quantize_act_q8() does (q8a_quant8());
 * one mma.m16n8k32 over signed bytes multiplies them (the columns taken
 * in the same order on both sides), and each product of the tile is
 * scaled into the sums: d_w dx isum for Q8, d_w dx (isum - 8 sx) for Q4's
 * nibbles, dx (s isum + o sx) for Q4K (sx: the sum of the token's codes
 * over the block).  Q8K rows (16-column scales) stay with tc_kernel().
 */
template <int WT>
__device__ __forceinline__ void tcq_codes(uint4 u, bool hi, unsigned &c0,
					  unsigned &c1)
{
	c0 = u.x;
	c1 = u.y;
	if (kvq_wrow<WT>::NIB) {
		c0 = (hi ? u.x >> 4 : u.x) & 0x0f0f0f0fu;
		c1 = (hi ? u.y >> 4 : u.y) & 0x0f0f0f0fu;
	}
}

/* The weight block's scale of fetch @u as (s, o): s * isum + o * sx. */
template <int WT>
__device__ __forceinline__ float2 tcq_scale(uint4 u)
{
	if (WT == KVQ_GPU_W_Q8)
		return make_float2(__half2float(__ushort_as_half(
					   (unsigned short)u.z)), 0.0f);
	if (WT == KVQ_GPU_W_Q4) {
		float d = __half2float(__ushort_as_half((unsigned short)u.z));

		return make_float2(d, -8.0f * d);
	}
	return make_float2(__uint_as_float(u.z), __uint_as_float(u.w));
}

template <int WT, int MT, int KW, int U, int IN>
__global__ void __launch_bounds__(KW * 32) tcq_kernel(tc_args a)
{
	constexpr int E = MT * 128;
	static_assert(IN != 2 || KW * E * sizeof(float) +
			  KW * 8 * sizeof(double) + 8 * sizeof(float) +
			  TC_NORM_LD * sizeof(float) <= 48 * 1024,
		      "RMSNorm weights and the sums in 48 KiB");
	__shared__ float red[KW * E];
	__shared__ double ssw[IN == 2 ? KW * 8 : 1];
	__shared__ float fac[8];
	extern __shared__ float gsm[];		/* IN 2: g, a.ld floats */
	const uint32_t lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
	const uint32_t g = lane >> 2, t = lane & 3, nch = a.ld / 32;
	const uint32_t r0 = blockIdx.x * 16 * (a.swiglu ? 1 : MT);
	const bool hi = (8 * t) & 16;
	uint32_t wr[MT], kc = wid, e;
	const float *xf;
	float c[MT][1][4];
	double ss[1] = { 0.0 };
	uint4 A[U][MT][2], B[U][2];
	int m, u;

	for (m = 0; m < MT; m++) {
		wr[m] = r0 + (a.swiglu ? m * a.half : 16 * m) + g;
		c[m][0][0] = c[m][0][1] = c[m][0][2] = c[m][0][3] = 0.0f;
	}
	auto load_x = [&](uint32_t k0) {
#pragma unroll
		for (int v = 0; v < U; v++) {
			uint32_t ch = k0 + v * KW;

			if (ch >= nch)
				break;
			B[v][0] = *(const uint4 *)(xf + ch * 32);
			B[v][1] = *(const uint4 *)(xf + ch * 32 + 4);
		}
	};

	kvq_pdl_trigger();
	if (IN == 2)
		for (e = threadIdx.x * 4; e < a.ld; e += KW * 32 * 4)
			*(float4 *)(gsm + e) = *(const float4 *)(a.g + e);
	tc_load_w<WT, MT, KW, U, true>(A, a, wr, t, kc, nch);
	kvq_pdl_wait();
	{
		uint32_t tok = g < a.n ? g : a.n - 1;

		xf = a.x + (size_t)(a.xrows ? (uint32_t)a.xrows[tok] : tok) *
			   a.xs + 8 * t;
	}
	load_x(kc);
	if (IN == 2)
		__syncthreads();	/* gsm */
	for (; kc < nch; kc += KW * U) {
#pragma unroll
		for (u = 0; u < U; u++) {
			uint32_t ch = kc + u * KW;

			if (ch >= nch)
				break;
			float4 xa = make_float4(__uint_as_float(B[u][0].x),
						__uint_as_float(B[u][0].y),
						__uint_as_float(B[u][0].z),
						__uint_as_float(B[u][0].w));
			float4 xb = make_float4(__uint_as_float(B[u][1].x),
						__uint_as_float(B[u][1].y),
						__uint_as_float(B[u][1].z),
						__uint_as_float(B[u][1].w));
			int xq[2];
			float dx, d0, d1, sx, s0, s1;

			if (IN == 2) {
				const float *gs = gsm + ch * 32 + 8 * t;
				const float4 g0 = *(const float4 *)gs;
				const float4 g1 = *(const float4 *)(gs + 4);

				ss[0] += (double)xa.x * xa.x + (double)xa.y * xa.y +
					 (double)xa.z * xa.z + (double)xa.w * xa.w +
					 (double)xb.x * xb.x + (double)xb.y * xb.y +
					 (double)xb.z * xb.z + (double)xb.w * xb.w;
				xa = make_float4(__fmul_rn(xa.x, g0.x),
						 __fmul_rn(xa.y, g0.y),
						 __fmul_rn(xa.z, g0.z),
						 __fmul_rn(xa.w, g0.w));
				xb = make_float4(__fmul_rn(xb.x, g1.x),
						 __fmul_rn(xb.y, g1.y),
						 __fmul_rn(xb.z, g1.z),
						 __fmul_rn(xb.w, g1.w));
			}
			/* the token's block sum of codes (integers, exact in
			 * f32), then tokens 2t and 2t + 1's scales and sums
			 * (lanes 8t and 8t + 4) */
			sx = (float)q8a_quant8(xa, xb, xq, dx);
			sx += kvq_shfl_xor_f32(sx, 1);
			sx += kvq_shfl_xor_f32(sx, 2);
			d0 = kvq_shfl_f32(dx, (int)(8 * t));
			d1 = kvq_shfl_f32(dx, (int)(8 * t + 4));
			s0 = kvq_shfl_f32(sx, (int)(8 * t));
			s1 = kvq_shfl_f32(sx, (int)(8 * t + 4));
#pragma unroll
			for (m = 0; m < MT; m++) {
				unsigned ar[4], br[2] = { (unsigned)xq[0],
							  (unsigned)xq[1] };
				float2 wg = tcq_scale<WT>(A[u][m][0]);
				float2 w8 = tcq_scale<WT>(A[u][m][1]);
				int ci[4];

				tcq_codes<WT>(A[u][m][0], hi, ar[0], ar[2]);
				tcq_codes<WT>(A[u][m][1], hi, ar[1], ar[3]);
				kvq_mma_s8_16832(ci, ar, br);
				c[m][0][0] += d0 * (wg.x * (float)ci[0] + wg.y * s0);
				c[m][0][1] += d1 * (wg.x * (float)ci[1] + wg.y * s1);
				c[m][0][2] += d0 * (w8.x * (float)ci[2] + w8.y * s0);
				c[m][0][3] += d1 * (w8.x * (float)ci[3] + w8.y * s1);
			}
		}
		tc_load_w<WT, MT, KW, U, true>(A, a, wr, t, kc + KW * U, nch);
		load_x(kc + KW * U);
	}
	tc_finish<MT, 1, KW, IN>(a, c, ss, red, ssw, fac, r0);
}

/*
 * Tilings (rows a warp MT x 16, warps a block KW, chunks in flight U), by
 * the rows of W.  H200, 1B F16, q4/q4, one run over every tiling of
 * MT 1-2, KW 4-32, U 1-8 (bench/gpu_decode_notes.md): rows of 8192 and
 * more (gate/up, the vocabulary) fastest at 2 x 8 x 1, the QKV product
 * at 2 x 16 x 2, 2048 rows (output projection, down) at 1 x 16 x 4.
 * With f16 rows refilled slot by slot, the long rows take 2 chunks in
 * flight at 16 tokens (two 8-token tiles): batch 16 1571 -> 1530 us a
 * step, but batch 8 1237 -> 1275, so 1 there.
 */
/* tcq_kernel() in tc_launch_nt()'s tilings. */
template <int WT, int IN>
void tcq_launch(bool pdl, cudaStream_t st, const tc_args &a)
{
	bool two = a.rows % 32 == 0 && a.rows > 2048;
	uint32_t blocks = a.rows / (two ? 32 : 16);
	size_t sm = IN == 2 ? a.ld * sizeof(float) : 0;

	if (a.swiglu)
		kvq_launch(pdl, tcq_kernel<WT, 2, 8, 1, IN>,
			   dim3(a.half / 16), dim3(8 * 32), sm, st, a);
	else if (two && a.rows >= 8192)
		kvq_launch(pdl, tcq_kernel<WT, 2, 8, 1, IN>, dim3(blocks),
			   dim3(8 * 32), sm, st, a);
	else if (two)
		kvq_launch(pdl, tcq_kernel<WT, 2, 16, 2, IN>, dim3(blocks),
			   dim3(16 * 32), sm, st, a);
	else
		kvq_launch(pdl, tcq_kernel<WT, 1, 16, 4, IN>, dim3(blocks),
			   dim3(16 * 32), sm, st, a);
}

template <int WT, int NT, int IN>
void tc_launch_nt(bool pdl, cudaStream_t st, const tc_args &a)
{
	constexpr int UL = WT == KVQ_GPU_W_F16 && NT == 2 ? 2 : 1;
	bool two = a.rows % 32 == 0 && a.rows > 2048;
	uint32_t blocks = a.rows / (two ? 32 : 16);
	size_t sm = IN == 2 ? a.ld * sizeof(float) : 0;

	if (a.swiglu)		/* two tiles a warp: a gate and an up */
		kvq_launch(pdl, tc_kernel<WT, 2, NT, 8, UL, IN>,
			   dim3(a.half / 16), dim3(8 * 32), sm, st, a);
	else if (two && a.rows >= 8192)
		kvq_launch(pdl, tc_kernel<WT, 2, NT, 8, UL, IN>, dim3(blocks),
			   dim3(8 * 32), sm, st, a);
	else if (two)
		kvq_launch(pdl, tc_kernel<WT, 2, NT, 16, 2, IN>, dim3(blocks),
			   dim3(16 * 32), sm, st, a);
	else
		kvq_launch(pdl, tc_kernel<WT, 1, NT, 16, 4, IN>, dim3(blocks),
			   dim3(16 * 32), sm, st, a);
}

/* Launches tc_kernel for @a's weight type and input @in (its IN; 0
 * past 8 tokens) with the tiling for its shape. */
void tc_launch(bool pdl, cudaStream_t st, const tc_args &a, int in)
{
	kvq_wt_switch(a.w.type, [&](auto wt) {
		constexpr int W = decltype(wt)::value;

		constexpr bool Q = W == KVQ_GPU_W_Q8 || W == KVQ_GPU_W_Q4 ||
				   W == KVQ_GPU_W_Q4K;

		if (Q && a.q8a && a.n <= 8 && in == 2)
			tcq_launch<Q ? W : KVQ_GPU_W_Q8, 2>(pdl, st, a);
		else if (Q && a.q8a && a.n <= 8 && in == 1)
			tcq_launch<Q ? W : KVQ_GPU_W_Q8, 1>(pdl, st, a);
		else if (a.n > 8)
			tc_launch_nt<W, 2, 0>(pdl, st, a);
		else if (in == 2)
			tc_launch_nt<W, 1, 2>(pdl, st, a);
		else if (in == 1)
			tc_launch_nt<W, 1, 1>(pdl, st, a);
		else
			tc_launch_nt<W, 1, 0>(pdl, st, a);
	});
}

/*
 * The skinny products' input, one block a token: the token's values v
 * (x, RMSNorm(x) as rmsnorm_kernel() computes it, or SwiGLU of the gate
 * and up halves of x), their halves at a scale s of the token's own
 * (pow2_scale() of max |v|: the same precision argument as above, per
 * token), alpha[t] = 1/s, and the bias written into (or added to) y.
 * The row is read once, into registers, with every load issued before
 * the first is used: with one block a token, the kernel's time is its
 * chain of latencies.
 */
constexpr int PREP_THREADS = 1024;
constexpr int PREP_SLOTS = 4;		/* so W's ld <= 32768 */

struct prep_args {
	const float *x;
	uint32_t xs, cols, ld;
	const int32_t *xrows;	/* token t is row xrows[t] of x, or NULL */
	int in;			/* KVQ_SKINNY_* */
	const float *g;		/* KVQ_SKINNY_NORM */
	float eps;
	float *alpha;
	__half *hi, *lo;
	const float *bias;
	float *y;
	uint32_t ys, rows;
	bool add;
};

/* Eight values of a row from column @c (a multiple of 8), zero from
 * @cols on; @vec: the row is 16-byte aligned and @cols a multiple of 4. */
__device__ __forceinline__ void load8(const float *r, uint32_t c,
				      uint32_t cols, bool vec, float v[8])
{
	if (vec && c + 8 <= cols) {
		float4 p = *(const float4 *)(r + c);
		float4 q = *(const float4 *)(r + c + 4);

		v[0] = p.x; v[1] = p.y; v[2] = p.z; v[3] = p.w;
		v[4] = q.x; v[5] = q.y; v[6] = q.z; v[7] = q.w;
		return;
	}
	for (int k = 0; k < 8; k++)
		v[k] = c + k < cols ? r[c + k] : 0.0f;
}

/* The sum of @v over the block, in every thread (@part: a double a warp). */
__device__ double block_sum(double v, double *part)
{
	for (int o = 16; o > 0; o >>= 1)
		v += kvq_shfl_xor_f64(v, o);
	if ((threadIdx.x & 31) == 0)
		part[threadIdx.x >> 5] = v;
	__syncthreads();
	v = 0.0;
	for (uint32_t w = 0; w < blockDim.x / 32; w++)
		v += part[w];
	return v;
}

/* PREP_THREADS threads; a thread holds PREP_SLOTS runs of 8 columns, all
 * loaded at once (a decode step's rows are latency, not work). */
__global__ void __launch_bounds__(PREP_THREADS) prep_kernel(prep_args a)
{
	__shared__ float red[PREP_THREADS / 32];
	__shared__ double part[PREP_THREADS / 32];
	const uint32_t t = blockIdx.x;
	float v[PREP_SLOTS][8], u[8], inv = 1.0f, m = 0.0f, s;
	uint32_t i;
	int q, k;

	kvq_pdl_trigger();
	kvq_pdl_wait();
	const float *xr = a.x + (size_t)(a.xrows ? (uint32_t)a.xrows[t] : t) *
				a.xs;
	const bool vec = !((uintptr_t)xr & 15) && !(a.cols & 3);

#pragma unroll
	for (q = 0; q < PREP_SLOTS; q++) {
		uint32_t c = (q * PREP_THREADS + threadIdx.x) * 8;

		if (c >= a.ld)
			break;
		load8(xr, c, a.cols, vec, v[q]);
		if (a.in != KVQ_SKINNY_SWIGLU)
			continue;
		load8(xr + a.cols, c, a.cols, vec, u);
		for (k = 0; k < 8; k++)
			v[q][k] = silu_mul(v[q][k], u[k]);	/* 0 past cols */
	}
	if (a.in == KVQ_SKINNY_NORM) {
		double ss = 0.0;

#pragma unroll
		for (q = 0; q < PREP_SLOTS; q++) {
			if ((q * PREP_THREADS + threadIdx.x) * 8 >= a.ld)
				break;
			for (k = 0; k < 8; k++)
				ss += (double)v[q][k] * v[q][k];
		}
		inv = (float)(1.0 / sqrt(block_sum(ss, part) / a.cols +
					 a.eps));
#pragma unroll
		for (q = 0; q < PREP_SLOTS; q++) {
			uint32_t c = (q * PREP_THREADS + threadIdx.x) * 8;

			if (c >= a.ld)
				break;
			load8(a.g, c, a.cols, !(a.cols & 3), u);
			for (k = 0; k < 8; k++)
				v[q][k] = norm_val(v[q][k], inv, u[k]);
		}
	}
#pragma unroll
	for (q = 0; q < PREP_SLOTS; q++) {
		if ((q * PREP_THREADS + threadIdx.x) * 8 >= a.ld)
			break;
		for (k = 0; k < 8; k++)
			m = fmaxf(m, fabsf(v[q][k]));
	}
	s = pow2_scale(block_max(m, red));
	if (threadIdx.x == 0)
		a.alpha[t] = 1.0f / s;
#pragma unroll
	for (q = 0; q < PREP_SLOTS; q++) {
		uint32_t c = (q * PREP_THREADS + threadIdx.x) * 8;
		union { uint4 u4; __half2 h[4]; } hi, lo;

		if (c >= a.ld)
			break;
		for (k = 0; k < 4; k++) {
			float v0 = v[q][2 * k] * s, v1 = v[q][2 * k + 1] * s;
			float2 hf;

			hi.h[k] = __floats2half2_rn(v0, v1);
			hf = __half22float2(hi.h[k]);
			lo.h[k] = __floats2half2_rn(v0 - hf.x, v1 - hf.y);
		}
		*(uint4 *)(a.hi + (size_t)t * a.ld + c) = hi.u4;
		*(uint4 *)(a.lo + (size_t)t * a.ld + c) = lo.u4;
	}
	if (!a.bias)
		return;
	for (i = threadIdx.x; i < a.rows; i += PREP_THREADS) {
		float *y = a.y + (size_t)t * a.ys + i;

		*y = a.add ? *y + a.bias[i] : a.bias[i];
	}
}

/* cuBLAS's recommended workspace: 32 MiB on sm_90 and up, else 4 MiB. */
size_t workspace_bytes(void)
{
	int dev = 0, major = 0;

	if (cudaGetDevice(&dev) != cudaSuccess ||
	    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
				   dev) != cudaSuccess)
		major = 0;
	cudaGetLastError();
	return (size_t)(major >= 9 ? 32 : 4) << 20;
}

} /* namespace */

struct kvq_gpu_blas {
	cublasHandle_t h;
	cudaStream_t st;
	uint32_t max_tok, max_ld;
	bool pdl;		/* kvq_pdl_allowed() */
	void *ws;		/* cuBLAS's workspace */
	size_t ws_bytes;
	__half *hi, *lo;	/* [max_tok][max_ld] each */
	float *sc;		/* SC_* */
	bool no_tc;		/* KVQ_GPU_NO_TCMV: skinny products to cuBLAS */
	bool no_fuse;		/* KVQ_GPU_TC_PREP: x through prep_kernel() */
};

void kvq_gpu_blas_destroy(struct kvq_gpu_blas *b)
{
	if (!b)
		return;
	if (b->h)
		cublasDestroy(b->h);
	cudaFree(b->ws);
	cudaFree(b->hi);
	cudaFree(b->sc);
	free(b);
}

static int blas_fail(char *err, size_t errlen, const char *what,
		     cublasStatus_t st)
{
	return set_err(err, errlen, -EIO, "%s: %s", what,
		       cublasGetStatusString(st));
}

int kvq_gpu_blas_create(cudaStream_t st, uint32_t max_tok, uint32_t max_ld,
			struct kvq_gpu_blas **out, size_t *bytes, char *err,
			size_t errlen)
{
	const float consts[SC_ONE + 1] = { 1.0f, 0.0f, 1.0f };
	size_t hb = (size_t)max_tok * max_ld;
	const char *tc_env;
	struct kvq_gpu_blas *b;
	cublasStatus_t cs;
	int ret;

	*out = nullptr;
	*bytes = 0;
	b = (struct kvq_gpu_blas *)calloc(1, sizeof(*b));
	if (!b)
		return set_err(err, errlen, -ENOMEM, "out of memory");
	b->st = st;
	b->max_tok = max_tok;
	b->max_ld = max_ld;
	b->pdl = kvq_pdl_allowed();
	tc_env = getenv("KVQ_GPU_NO_TCMV");
	b->no_tc = tc_env && *tc_env && strcmp(tc_env, "0");
	tc_env = getenv("KVQ_GPU_TC_PREP");
	b->no_fuse = tc_env && *tc_env && strcmp(tc_env, "0");
	b->ws_bytes = workspace_bytes();
	ret = dalloc(&b->ws, b->ws_bytes, "the cuBLAS workspace", err, errlen);
	if (!ret)
		ret = dalloc((void **)&b->hi, 2 * hb * sizeof(__half),
			     "f16 halves of activations", err, errlen);
	if (!ret)
		ret = dalloc((void **)&b->sc,
			     (SC_TOK + max_tok) * sizeof(float),
			     "product scales", err, errlen);
	if (ret)
		goto fail;
	b->lo = b->hi + hb;
	if (cudaMemcpy(b->sc, consts, sizeof(consts),
		       cudaMemcpyHostToDevice) != cudaSuccess) {
		ret = set_err(err, errlen, -EIO, "product scales: %s",
			      cudaGetErrorString(cudaGetLastError()));
		goto fail;
	}
	cs = cublasCreate(&b->h);
	if (cs != CUBLAS_STATUS_SUCCESS) {
		b->h = nullptr;
		ret = blas_fail(err, errlen, "cublasCreate", cs);
		goto fail;
	}
	/* The stream first: setting it puts back the default workspace. */
	cs = cublasSetStream(b->h, st);
	if (cs == CUBLAS_STATUS_SUCCESS)
		cs = cublasSetWorkspace(b->h, b->ws, b->ws_bytes);
	if (cs == CUBLAS_STATUS_SUCCESS)
		cs = cublasSetPointerMode(b->h, CUBLAS_POINTER_MODE_DEVICE);
	/* f16 operands on tensor cores, every sum in f32. */
	if (cs == CUBLAS_STATUS_SUCCESS)
		cs = cublasSetMathMode(b->h, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
			CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
	if (cs != CUBLAS_STATUS_SUCCESS) {
		ret = blas_fail(err, errlen, "cuBLAS handle setup", cs);
		goto fail;
	}
	*bytes = b->ws_bytes + 2 * hb * sizeof(__half) +
		 (SC_TOK + max_tok) * sizeof(float);
	*out = b;
	return 0;
fail:
	kvq_gpu_blas_destroy(b);
	return ret;
}

bool kvq_gpu_blas_skinny(const struct kvq_gpu_blas *b, const dmat *w,
			 uint32_t n)
{
	return !b->no_tc && n <= TC_MAXT && w->type != KVQ_GPU_W_F32 &&
	       w->rows % 16 == 0 && w->ld % 32 == 0 &&
	       w->ld <= PREP_THREADS * PREP_SLOTS * 8 &&
	       !((uintptr_t)w->d & 15);
}

bool kvq_gpu_blas_skinny_swiglu(const struct kvq_gpu_blas *b,
				const dmat *w, uint32_t n)
{
	return kvq_gpu_blas_skinny(b, w, n) && n <= TC_READ_MAXT &&
	       !(w->rows % 32);
}

uint32_t kvq_gpu_blas_skinny_max(const struct kvq_gpu_blas *b)
{
	return b->no_tc ? 0 : TC_MAXT;
}

/* C = op(A) op(B) with A = @rows f16 rows at @w (row-major rows x ld, so
 * column-major ld x rows: op T), B = the halves (column-major ld x n), C
 * = @y (column-major rows x n, ldc ys); alpha 1/s, beta from device
 * memory. */
static cublasStatus_t gemm(struct kvq_gpu_blas *b,
			   const struct kvq_gpu_blas_mm *a, const void *w,
			   uint32_t rows, float *y, const __half *xh,
			   int beta)
{
	uint32_t ld = a->w->ld;

	return cublasGemmEx(b->h, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows,
			    (int)a->n, (int)ld, b->sc + SC_ALPHA, w,
			    CUDA_R_16F, (int)ld, xh, CUDA_R_16F, (int)ld,
			    b->sc + beta, y, CUDA_R_32F, (int)a->ys,
			    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

/* Rows r0 .. r0 + rows - 1 of 8/4-bit @w as their f16 values
 * (kvq_wload8()), into @dst (rows of w.cols halves); a thread a run of 8
 * columns. */
template <int WT>
__global__ void __launch_bounds__(THREADS)
quant_rows_kernel(dmat w, uint32_t r0, uint32_t rows, __half *dst)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	uint32_t gpr = w.cols / 8;

	kvq_pdl_trigger();
	kvq_pdl_wait();		/* dst: the product before may still read it */
	if (i >= (size_t)rows * gpr)
		return;
	*(uint4 *)(dst + i * 8) = kvq_wload8<WT>(w, r0 + (uint32_t)(i / gpr),
						  (uint32_t)(i % gpr) * 8);
}


int kvq_gpu_blas_mm(struct kvq_gpu_blas *b, const struct kvq_gpu_blas_mm *a,
		    char *err, size_t errlen)
{
	const dmat *w = a->w;
	split_args s;
	cublasStatus_t cs;

	bool quant = w->type != KVQ_GPU_W_F16 && w->type != KVQ_GPU_W_F32;

	if ((w->type != KVQ_GPU_W_F16 &&
	     !(quant && a->exp_buf && a->exp_rows && !(a->exp_rows % 16) &&
	       w->ld == w->cols)) ||
	    !a->n || a->n > b->max_tok || w->ld > b->max_ld || a->ys < w->rows)
		return set_err(err, errlen, -EINVAL,
			       "cuBLAS product: bad shape %u x %u, %u tokens",
			       w->rows, w->cols, a->n);
	kvq_launch(b->pdl, amax_kernel, dim3(AMAX_BLOCKS), dim3(THREADS), 0,
		   b->st, a->x, a->xs, w->cols, a->n, b->sc + SC_PART);
	s.x = a->x;
	s.xs = a->xs;
	s.cols = w->cols;
	s.ld = w->ld;
	s.sc = b->sc;
	s.hi = b->hi;
	s.lo = b->lo;
	s.bias = a->bias;
	s.y = a->y;
	s.ys = a->ys;
	s.rows = w->rows;
	s.add = a->add;
	kvq_launch(b->pdl, split_kernel, dim3(a->n), dim3(THREADS), 0, b->st,
		   s);
	cs = CUBLAS_STATUS_SUCCESS;
	for (uint32_t r0 = 0; r0 < w->rows && cs == CUBLAS_STATUS_SUCCESS;) {
		uint32_t nr = w->rows;
		const void *wd = w->d;

		if (quant) {
			size_t groups;
			dim3 grid;

			nr = w->rows - r0 < a->exp_rows ? w->rows - r0 :
			     a->exp_rows;
			groups = (size_t)nr * (w->cols / 8);
			grid = dim3((unsigned)((groups + THREADS - 1) / THREADS));
			kvq_wt_switch(w->type, [&](auto wt) {
				kvq_launch(b->pdl,
					   quant_rows_kernel<decltype(wt)::value>,
					   grid, dim3(THREADS), 0, b->st, *w, r0,
					   nr, a->exp_buf);
			});
			wd = a->exp_buf;
		}
		cs = gemm(b, a, wd, nr, a->y + r0, b->hi,
			  a->add || a->bias ? SC_ONE : SC_ZERO);
		if (cs == CUBLAS_STATUS_SUCCESS)
			cs = gemm(b, a, wd, nr, a->y + r0, b->lo, SC_ONE);
		r0 += nr;
	}
	if (cs != CUBLAS_STATUS_SUCCESS)
		return set_err(err, errlen, -EIO,
			       "cublasGemmEx %u x %u, %u tokens: %s", w->rows,
			       w->cols, a->n, cublasGetStatusString(cs));
	return 0;
}

int kvq_gpu_blas_skinny_mm(struct kvq_gpu_blas *b,
			   const struct kvq_gpu_skinny_mm *a, char *err,
			   size_t errlen)
{
	const dmat *w = a->w;
	prep_args p;
	tc_args t;
	bool fused;

	if (!kvq_gpu_blas_skinny(b, w, a->n) || !a->n || a->n > b->max_tok ||
	    w->ld > b->max_ld || (!a->qkv && !a->swiglu && a->ys < w->rows) ||
	    (a->qkv && (a->add || a->qkv->rope_dim % 2 ||
			a->qkv->qd + 2 * a->qkv->kvd != w->rows)) ||
	    (a->in == KVQ_SKINNY_NORM && !a->norm) ||
	    (a->swiglu && (a->qkv || a->add || a->bias ||
			   !kvq_gpu_blas_skinny_swiglu(b, w, a->n) ||
			   a->ys < w->rows / 2)))
		return set_err(err, errlen, -EINVAL,
			       "skinny product: bad shape %u x %u, %u tokens",
			       w->rows, w->cols, a->n);
	/*
	 * Up to 8 tokens the product reads x itself (tc_kernel()'s IN 1 and
	 * 2) where x's rows and the norm weights are whole 16-byte runs.
	 * SwiGLU, whose input is twice the row, keeps prep_kernel() (the
	 * halves), and so do 9-16 tokens, where the conversion's registers
	 * cost the products their chunks in flight.  H200, 1B F16, q4/q4,
	 * us a step at 1K (two runs; prep_kernel() for all, then fused):
	 * batch 2 1036, 1037 -> 945, 950; 4 1098 -> 1026, 1011; 8 1239,
	 * 1212 -> 1153, 1128; but 16 1524, 1523 -> 1595, 1588.
	 */
	fused = !b->no_fuse && a->n <= TC_READ_MAXT &&
		a->in != KVQ_SKINNY_SWIGLU &&
		w->cols == w->ld && !(a->xs & 3) && !((uintptr_t)a->x & 15) &&
		(a->in != KVQ_SKINNY_NORM ||
		 (w->ld <= TC_NORM_LD && !((uintptr_t)a->norm & 15)));
	if (!fused) {
		p.x = a->x;
		p.xs = a->xs;
		p.cols = w->cols;
		p.ld = w->ld;
		p.xrows = a->xrows;
		p.in = a->in;
		p.g = a->norm;
		p.eps = a->eps;
		p.alpha = b->sc + SC_TOK;
		p.hi = b->hi;
		p.lo = b->lo;
		p.bias = a->qkv ? nullptr : a->bias;
		p.y = a->y;
		p.ys = a->ys;
		p.rows = w->rows;
		p.add = a->add;
		kvq_launch(b->pdl, prep_kernel, dim3(a->n),
			   dim3(PREP_THREADS), 0, b->st, p);
	}
	memset(&t, 0, sizeof(t));
	t.w = *w;
	t.rows = w->rows;
	t.ld = w->ld;
	t.hi = b->hi;
	t.lo = b->lo;
	t.n = a->n;
	t.alpha = b->sc + SC_TOK;
	t.y = a->y;
	t.ys = a->ys;
	t.acc = !fused && !a->qkv && (a->add || a->bias);
	t.to_qkv = a->qkv != nullptr;
	if (a->qkv)
		t.qkv = *a->qkv;
	t.bias = a->bias;
	t.swiglu = a->swiglu;
	t.half = w->rows / 2;
	/* read by the kernel only where it reads x itself (IN > 0; it adds
	 * the bias then, and acc is the input pass's) */
	t.x = a->x;
	t.xs = a->xs;
	t.cols = w->cols;
	t.xrows = a->xrows;
	t.g = a->norm;
	t.eps = a->eps;
	t.add = a->add;
	t.q8a = a->q8a && fused;
	tc_launch(b->pdl, b->st, t,
		  !fused ? 0 : a->in == KVQ_SKINNY_NORM ? 2 : 1);
	return 0;
}
#endif /* KVQ_GPU_BLAS */
