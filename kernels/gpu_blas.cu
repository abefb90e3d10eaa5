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

/* Device scalars: alpha (1/s of the current product), the betas, then
 * the partial maxima. */
enum { SC_ALPHA = 0, SC_ZERO = 1, SC_ONE = 2, SC_PART = 32 };

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

/* The largest @m over the block (THREADS threads), in every thread. */
__device__ float block_max(float m, float *red)
{
	for (int o = 16; o > 0; o >>= 1)
		m = fmaxf(m, kvq_shfl_xor_f32(m, o));
	if ((threadIdx.x & 31) == 0)
		red[threadIdx.x >> 5] = m;
	__syncthreads();
	m = 0.0f;
	for (int w = 0; w < THREADS / 32; w++)
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
	b->ws_bytes = workspace_bytes();
	ret = dalloc(&b->ws, b->ws_bytes, "the cuBLAS workspace", err, errlen);
	if (!ret)
		ret = dalloc((void **)&b->hi, 2 * hb * sizeof(__half),
			     "f16 halves of prompt activations", err, errlen);
	if (!ret)
		ret = dalloc((void **)&b->sc,
			     (SC_PART + AMAX_BLOCKS) * sizeof(float),
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
		 (SC_PART + AMAX_BLOCKS) * sizeof(float);
	*out = b;
	return 0;
fail:
	kvq_gpu_blas_destroy(b);
	return ret;
}

/* C = op(A) op(B) with A = W (row-major rows x ld, so column-major
 * ld x rows: op T), B = the halves (column-major ld x n), C = y
 * (column-major rows x n, ldc ys); alpha 1/s, beta from device memory. */
static cublasStatus_t gemm(struct kvq_gpu_blas *b,
			   const struct kvq_gpu_blas_mm *a, const __half *xh,
			   int beta)
{
	const dmat *w = a->w;

	return cublasGemmEx(b->h, CUBLAS_OP_T, CUBLAS_OP_N, (int)w->rows,
			    (int)a->n, (int)w->ld, b->sc + SC_ALPHA, w->d,
			    CUDA_R_16F, (int)w->ld, xh, CUDA_R_16F, (int)w->ld,
			    b->sc + beta, a->y, CUDA_R_32F, (int)a->ys,
			    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

int kvq_gpu_blas_mm(struct kvq_gpu_blas *b, const struct kvq_gpu_blas_mm *a,
		    char *err, size_t errlen)
{
	const dmat *w = a->w;
	split_args s;
	cublasStatus_t cs;

	if (w->type != KVQ_GPU_W_F16 || !a->n || a->n > b->max_tok ||
	    w->ld > b->max_ld || a->ys < w->rows)
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
	cs = gemm(b, a, b->hi, a->add || a->bias ? SC_ONE : SC_ZERO);
	if (cs == CUBLAS_STATUS_SUCCESS)
		cs = gemm(b, a, b->lo, SC_ONE);
	if (cs != CUBLAS_STATUS_SUCCESS)
		return set_err(err, errlen, -EIO,
			       "cublasGemmEx %u x %u, %u tokens: %s", w->rows,
			       w->cols, a->n, cublasGetStatusString(cs));
	return 0;
}
#endif /* KVQ_GPU_BLAS */
