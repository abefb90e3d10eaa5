/*
 * attn_split.cu - split-KV attention over kvqd's paged KV cache for any
 * head size from 8 to 256 and every page type (f32, f16, q8, q4), for
 * prompt rows and decode rows alike.
 *
 * Why this file exists: kernels/attn_decode.cu serves decode with
 * tensor-core products but only for head_dim 128; models with other head
 * sizes (64 in most 1B models, 32 in the bundled one, 8 in stories260K)
 * and prompts (several rows of one sequence, each causal) need a kernel
 * that takes any shape.  This one works on CUDA cores: lane j of a warp
 * scores position t0 + j of a 32-position chunk against every query head
 * of its KV head, the chunk's probabilities pass lane to lane while each
 * lane accumulates its channel pairs of V, and the online softmax runs in
 * f32 (base 2).  Blocks take slices of a row's positions (splits); a
 * second kernel merges the slices.  The plain-C twin is kvq_kv_attend().
 */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/attn.h"
#include "engine/kvcache.h"

namespace {

constexpr int ATT_MAXD = 256;	/* head sizes 8..256, powers of two */
constexpr int ATT_MAXG = 16;	/* query heads per KV head (8 at 256) */
constexpr int ATT_SPLIT_TOK = 128;	/* positions per split, about */
constexpr int ATT_MAX_SPLITS = 128;
constexpr int ATT_MAX_BLOCKS = 8192;	/* split blocks of one launch, about */

struct kvhalf {
	const uint8_t *pages;
	size_t page_bytes;
	int type;
};

struct attp {
	const float *q;
	uint32_t qs;
	float *out;
	uint32_t os;
	kvhalf k, v;
	const int32_t *row_seq, *pos, *bt;
	uint32_t bt_stride;
	uint16_t *const *sink;	/* per batch entry, this layer's copies */
	uint32_t n_sink;
	uint32_t nh, nkv, P, G, group;
	float scale;		/* softmax scale times log2(e) */
	uint32_t n_splits;
	float *ws;		/* partial results when n_splits > 1 */
};

/* Page base and row of position @t of batch entry @b's head @h. */
__device__ __forceinline__ const uint8_t *kv_row(const attp &p, const kvhalf &k,
						 uint32_t b, uint32_t t,
						 uint32_t h, size_t *r)
{
	int32_t pg = p.bt[(size_t)b * p.bt_stride + t / p.P];

	*r = (size_t)h * p.P + t % p.P;
	return k.pages + (size_t)pg * k.page_bytes;
}

/* The f16 sink copy of position @t (a quantized half), or NULL. */
__device__ __forceinline__ const __half *kv_sink(const attp &p, int type,
						 int half, uint32_t b,
						 uint32_t t, uint32_t h,
						 uint32_t D)
{
	if (t >= p.n_sink || type < KVQ_KV_Q8 || !p.sink || !p.sink[b])
		return nullptr;
	return (const __half *)p.sink[b] +
	       ((size_t)half * p.n_sink + t) * p.nkv * D + (size_t)h * D;
}

/* Channels c, c+1 of a row (c even) of a page of type T, dequantized. */
template <int D, int T>
__device__ __forceinline__ float2 kv_pair(const uint8_t *base, size_t r,
					  uint32_t c, uint32_t HP,
					  uint32_t group)
{
	if (T == KVQ_KV_F32)
		return *(const float2 *)((const float *)base + r * D + c);
	if (T == KVQ_KV_F16)
		return __half22float2(*(const __half2 *)((const __half *)base +
							 r * D + c));
	if (T == KVQ_KV_Q8) {
		const __half *sc = (const __half *)(base + (size_t)HP * D);
		float d = __half2float(sc[r * (D / group) + c / group]);
		char2 q = *(const char2 *)(base + r * D + c);

		return make_float2((float)q.x * d, (float)q.y * d);
	}
	const __half *sc = (const __half *)(base + (size_t)HP * D / 2);
	float d = __half2float(sc[r * (D / group) + c / group]);
	uint8_t q = base[r * (D / 2) + c / 2];

	return make_float2((float)((q & 15) - 8) * d,
			   (float)((q >> 4) - 8) * d);
}

/*
 * Scores of this lane's position (row @r of page @base, or the f16 sink
 * copy @sk) against the query heads in qsm, read a 32-bit word at a time.
 */
template <int D, int MG, int T>
__device__ __forceinline__ void k_score(const uint8_t *base, size_t r,
					const __half *sk, uint32_t HP,
					uint32_t group, const float (*qsm)[D],
					uint32_t G, float s[MG])
{
	if (sk || T == KVQ_KV_F16) {
		const __half2 *row = sk ? (const __half2 *)sk :
				     (const __half2 *)((const __half *)base + r * D);

		for (uint32_t c = 0; c < D; c += 2) {
			float2 k = __half22float2(row[c / 2]);
#pragma unroll
			for (int g = 0; g < MG; g++)
				if (g < (int)G)
					s[g] += qsm[g][c] * k.x + qsm[g][c + 1] * k.y;
		}
		return;
	}
	if (T == KVQ_KV_F32) {
		const float *row = (const float *)base + r * D;

		for (uint32_t c = 0; c < D; c++) {
			float k = row[c];
#pragma unroll
			for (int g = 0; g < MG; g++)
				if (g < (int)G)
					s[g] += qsm[g][c] * k;
		}
		return;
	}
	const __half *sc = (const __half *)(base + (size_t)HP *
					    (T == KVQ_KV_Q8 ? D : D / 2)) +
			   r * (D / group);
	if (T == KVQ_KV_Q8) {
		const uint32_t *row = (const uint32_t *)(base + r * D);

		for (uint32_t w = 0; w < D / 4; w++) {
			uint32_t u = row[w];
			float d = __half2float(sc[4 * w / group]);
			float k0 = (float)(int8_t)(u & 255) * d;
			float k1 = (float)(int8_t)((u >> 8) & 255) * d;
			float k2 = (float)(int8_t)((u >> 16) & 255) * d;
			float k3 = (float)(int8_t)(u >> 24) * d;
#pragma unroll
			for (int g = 0; g < MG; g++)
				if (g < (int)G)
					s[g] += qsm[g][4 * w] * k0 +
						qsm[g][4 * w + 1] * k1 +
						qsm[g][4 * w + 2] * k2 +
						qsm[g][4 * w + 3] * k3;
		}
		return;
	}
	const uint32_t *row = (const uint32_t *)(base + r * (D / 2));

	for (uint32_t w = 0; w < D / 8; w++) {
		uint32_t u = row[w];
		float d = __half2float(sc[8 * w / group]);
		float k[8];

		for (int i = 0; i < 8; i++)
			k[i] = (float)((int)((u >> (4 * i)) & 15) - 8) * d;
#pragma unroll
		for (int g = 0; g < MG; g++)
			if (g < (int)G) {
				float a = 0.0f;

				for (int i = 0; i < 8; i++)
					a += qsm[g][8 * w + i] * k[i];
				s[g] += a;
			}
	}
}

/*
 * Adds the chunk's @cnt positions, p[g] (lane j holds position j's) times
 * V, into this lane's channel pairs.  Each lane located its own position's
 * row beforehand (@vb, @vr, or the sink copy @vs); here they pass lane to
 * lane, so the loads of consecutive positions do not wait on each other.
 */
template <int D, int MG, int T, int NP>
__device__ __forceinline__ void v_accum(const uint8_t *vb, uint32_t vr,
					const __half *vs, uint32_t HP,
					uint32_t group, uint32_t lane,
					const float s[MG], uint32_t cnt,
					uint32_t G, float acc[MG][NP][2])
{
#pragma unroll 8
	for (uint32_t j = 0; j < cnt; j++) {
		const uint8_t *base = (const uint8_t *)kvq_shfl_ptr(vb, j);
		const __half *sv = (const __half *)kvq_shfl_ptr(vs, j);
		uint32_t r = kvq_shfl_u32(vr, j);
		float pj[MG];

#pragma unroll
		for (int g = 0; g < MG; g++)
			pj[g] = kvq_shfl_f32(s[g], j);
#pragma unroll
		for (int i = 0; i < NP; i++) {
			uint32_t pi = lane + 32 * i;

			if (pi >= D / 2)
				break;
			float2 v = sv ? __half22float2(*(const __half2 *)(sv + 2 * pi)) :
				   kv_pair<D, T>(base, r, 2 * pi, HP, group);
#pragma unroll
			for (int g = 0; g < MG; g++) {
				acc[g][i][0] += pj[g] * v.x;
				acc[g][i][1] += pj[g] * v.y;
			}
		}
	}
	(void)G;
}

/*
 * Split-KV attention: block (split, KV head, row) covers one slice of the
 * row's positions [0, pos] for the query heads of that KV head.  Lane j of
 * a warp scores position t0 + j of a 32-position chunk; the chunk's
 * probabilities then go lane to lane while each lane accumulates its
 * channel pairs of V.  Online softmax in f32 (base 2); warps merge in
 * shared memory, splits in attn_merge_kernel.
 */
template <int D, int MG>
__global__ void __launch_bounds__(128) attn_split_kernel(attp p)
{
	constexpr int NP = (D / 2 + 31) / 32;	/* channel pairs per lane */
	__shared__ float qsm[MG][D];
	__shared__ float wm[4][MG], wl[4][MG];
	__shared__ float wo[4][MG][D];
	uint32_t split = blockIdx.x, kh = blockIdx.y, row = blockIdx.z;
	uint32_t G = p.G, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
	uint32_t b = (uint32_t)p.row_seq[row];
	uint32_t n = (uint32_t)p.pos[row] + 1;
	uint32_t span = ((n + p.n_splits - 1) / p.n_splits + 31) & ~31u;
	uint32_t a0 = split * span, a1 = min(n, a0 + span);
	uint32_t HP = p.nkv * p.P;
	float m[MG], l[MG], acc[MG][NP][2];

	for (uint32_t i = tid; i < G * D; i += 128)
		qsm[i / D][i % D] = p.q[(size_t)row * p.qs +
					 ((size_t)kh * G + i / D) * D + i % D] *
				    p.scale;
#pragma unroll
	for (int g = 0; g < MG; g++) {
		m[g] = -INFINITY;
		l[g] = 0.0f;
#pragma unroll
		for (int i = 0; i < NP; i++)
			acc[g][i][0] = acc[g][i][1] = 0.0f;
	}
	__syncthreads();
	for (uint32_t c0 = a0 + 32 * w; c0 < a1; c0 += 128) {
		uint32_t t = c0 + lane;
		bool valid = t < a1;
		float s[MG];

#pragma unroll
		for (int g = 0; g < MG; g++)
			s[g] = 0.0f;
		const uint8_t *kb = nullptr, *vb = nullptr;
		const __half *sk = nullptr, *vs = nullptr;
		size_t kr = 0, vr = 0;

		if (valid) {
			sk = kv_sink(p, p.k.type, 0, b, t, kh, D);
			vs = kv_sink(p, p.v.type, 1, b, t, kh, D);
			kb = kv_row(p, p.k, b, t, kh, &kr);
			vb = kv_row(p, p.v, b, t, kh, &vr);
			switch (p.k.type) {
			case KVQ_KV_F32:
				k_score<D, MG, KVQ_KV_F32>(kb, kr, sk, HP, p.group, qsm, G, s);
				break;
			case KVQ_KV_F16:
				k_score<D, MG, KVQ_KV_F16>(kb, kr, sk, HP, p.group, qsm, G, s);
				break;
			case KVQ_KV_Q8:
				k_score<D, MG, KVQ_KV_Q8>(kb, kr, sk, HP, p.group, qsm, G, s);
				break;
			default:
				k_score<D, MG, KVQ_KV_Q4>(kb, kr, sk, HP, p.group, qsm, G, s);
				break;
			}
		}
#pragma unroll
		for (int g = 0; g < MG; g++) {
			if (g >= (int)G)
				break;
			float v = valid ? s[g] : -INFINITY, mc = v;

			for (int o = 16; o > 0; o >>= 1)
				mc = fmaxf(mc, kvq_shfl_xor_f32(mc, o));
			float mn = fmaxf(m[g], mc);
			float corr = exp2f(m[g] - mn);
			float pr = valid ? exp2f(v - mn) : 0.0f;

			l[g] = l[g] * corr + pr;
			m[g] = mn;
#pragma unroll
			for (int i = 0; i < NP; i++) {
				acc[g][i][0] *= corr;
				acc[g][i][1] *= corr;
			}
			s[g] = pr;
		}
		uint32_t cnt = min(32u, a1 - c0);

		switch (p.v.type) {
		case KVQ_KV_F32:
			v_accum<D, MG, KVQ_KV_F32, NP>(vb, (uint32_t)vr, vs, HP, p.group, lane, s, cnt, G, acc);
			break;
		case KVQ_KV_F16:
			v_accum<D, MG, KVQ_KV_F16, NP>(vb, (uint32_t)vr, vs, HP, p.group, lane, s, cnt, G, acc);
			break;
		case KVQ_KV_Q8:
			v_accum<D, MG, KVQ_KV_Q8, NP>(vb, (uint32_t)vr, vs, HP, p.group, lane, s, cnt, G, acc);
			break;
		default:
			v_accum<D, MG, KVQ_KV_Q4, NP>(vb, (uint32_t)vr, vs, HP, p.group, lane, s, cnt, G, acc);
			break;
		}
	}
#pragma unroll
	for (int g = 0; g < MG; g++) {
		if (g >= (int)G)
			break;
		float ls = kvq_warp_sum(l[g]);

		if (lane == 0) {
			wm[w][g] = m[g];
			wl[w][g] = ls;
		}
#pragma unroll
		for (int i = 0; i < NP; i++) {
			uint32_t pi = lane + 32 * i;

			if (pi < D / 2) {
				wo[w][g][2 * pi] = acc[g][i][0];
				wo[w][g][2 * pi + 1] = acc[g][i][1];
			}
		}
	}
	__syncthreads();
	for (uint32_t i = tid; i < G * D; i += 128) {
		uint32_t g = i / D, c = i % D;
		float M = fmaxf(fmaxf(wm[0][g], wm[1][g]), fmaxf(wm[2][g], wm[3][g]));
		float o = 0.0f, L = 0.0f;

		if (M != -INFINITY) {
			for (int x = 0; x < 4; x++) {
				float e = exp2f(wm[x][g] - M);

				o += e * wo[x][g][c];
				L += e * wl[x][g];
			}
		}
		if (p.n_splits == 1) {
			p.out[(size_t)row * p.os + ((size_t)kh * G + g) * D + c] = o / L;
		} else {
			size_t u = ((size_t)row * p.nkv + kh) * p.n_splits + split;
			float *ws = p.ws + u * G * (D + 2);

			ws[g * (D + 2) + 2 + c] = o;
			if (c == 0) {
				ws[g * (D + 2)] = M;
				ws[g * (D + 2) + 1] = L;
			}
		}
	}
}

/*
 * Merges the splits of attn_split_kernel: one block of 256 threads per
 * (row, head).  The split weights 2^(m_s - M) are computed once into shared
 * memory; each channel's sum over splits is cut into 256 / D strided parts
 * so the loads of many splits are in flight at once.
 */
__global__ void __launch_bounds__(256) attn_merge_kernel(attp p, uint32_t D)
{
	__shared__ float e[ATT_MAX_SPLITS];
	__shared__ float red[256];
	uint32_t row = blockIdx.x, h = blockIdx.y, G = p.G, tid = threadIdx.x;
	uint32_t kh = h / G, g = h % G, S = p.n_splits, st = G * (D + 2);
	const float *ws = p.ws + ((size_t)row * p.nkv + kh) * S * st + g * (D + 2);
	float M = -INFINITY, L = 0.0f;

	for (uint32_t s = tid; s < S; s += 256)
		M = fmaxf(M, ws[(size_t)s * st]);
	red[tid] = M;
	__syncthreads();
	for (uint32_t o = 128; o > 0; o >>= 1) {
		if (tid < o)
			red[tid] = fmaxf(red[tid], red[tid + o]);
		__syncthreads();
	}
	M = red[0];
	__syncthreads();
	for (uint32_t s = tid; s < S; s += 256) {
		float m = ws[(size_t)s * st];
		float w = m == -INFINITY ? 0.0f : exp2f(m - M);

		e[s] = w;
		L += w * ws[(size_t)s * st + 1];
	}
	red[tid] = L;
	__syncthreads();
	for (uint32_t o = 128; o > 0; o >>= 1) {
		if (tid < o)
			red[tid] += red[tid + o];
		__syncthreads();
	}
	L = red[0];
	__syncthreads();
	uint32_t parts = 256 / D ? 256 / D : 1;
	uint32_t c = tid % D, part = tid / D;
	float o = 0.0f;

	if (part < parts && c < D) {
#pragma unroll 8
		for (uint32_t s = part; s < S; s += parts)
			o += e[s] * ws[(size_t)s * st + 2 + c];
	}
	red[tid] = o;
	__syncthreads();
	if (tid < D) {
		float sum = 0.0f;

		for (uint32_t q = 0; q < parts; q++)
			sum += red[q * D + tid];
		p.out[(size_t)row * p.os + (size_t)h * D + tid] = sum / L;
	}
	/* D = 256 takes one part; its channels beyond 256 threads: none. */
}

template <int D>
void attn_go(const attp &p, dim3 grid, uint32_t G, cudaStream_t st)
{
	if (G <= 4)
		attn_split_kernel<D, 4><<<grid, 128, 0, st>>>(p);
	else if (G <= 8 || D == 256)
		attn_split_kernel<D, 8><<<grid, 128, 0, st>>>(p);
	else
		attn_split_kernel<D, (D == 256 ? 8 : 16)><<<grid, 128, 0, st>>>(p);
}

/* Splits for @n_rows rows of @n_kv_heads heads up to @max_len positions. */
uint32_t n_splits(uint32_t n_rows, uint32_t n_kv_heads, uint32_t max_len)
{
	uint32_t s = (max_len + ATT_SPLIT_TOK - 1) / ATT_SPLIT_TOK;
	uint32_t cap = ATT_MAX_BLOCKS / (n_rows * n_kv_heads);

	if (s > cap)
		s = cap;
	if (s > ATT_MAX_SPLITS)
		s = ATT_MAX_SPLITS;
	return s < 1 ? 1 : s;
}

bool supported(uint32_t head_dim, uint32_t gqa)
{
	return head_dim >= 8 && head_dim <= ATT_MAXD &&
	       !(head_dim & (head_dim - 1)) && gqa >= 1 &&
	       gqa <= (head_dim == 256 ? 8u : (uint32_t)ATT_MAXG);
}

} /* namespace */

extern "C" size_t kvq_gpu_attn_split_workspace_bytes(uint32_t max_rows,
						     uint32_t n_q_heads,
						     uint32_t n_kv_heads,
						     uint32_t head_dim)
{
	size_t units = (size_t)max_rows * n_kv_heads;

	if (!n_kv_heads || n_q_heads % n_kv_heads ||
	    !supported(head_dim, n_q_heads / n_kv_heads))
		return 0;
	/* n_splits() keeps rows * heads * splits under ATT_MAX_BLOCKS, or
	 * at rows * heads when that alone is more. */
	if (units < ATT_MAX_BLOCKS)
		units = ATT_MAX_BLOCKS;
	return units * (n_q_heads / n_kv_heads) * (head_dim + 2) *
	       sizeof(float);
}

extern "C" int kvq_gpu_attn_split(const struct kvq_gpu_split_args *a,
				  void *stream)
{
	uint32_t D = a->head_dim, G, S;
	cudaStream_t st = (cudaStream_t)stream;
	attp p;

	if (!a->n_kv_heads || !a->n_q_heads || a->n_q_heads % a->n_kv_heads ||
	    !a->page_tokens || !a->n_rows || a->n_sink > a->page_tokens)
		return -EINVAL;
	G = a->n_q_heads / a->n_kv_heads;
	if (!supported(D, G) || a->k_type < KVQ_KV_F32 ||
	    a->k_type > KVQ_KV_Q4 || a->v_type < KVQ_KV_F32 ||
	    a->v_type > KVQ_KV_Q4)
		return -EOPNOTSUPP;
	S = n_splits(a->n_rows, a->n_kv_heads, a->max_len);
	if (S > 1 && a->workspace_bytes <
	    (size_t)a->n_rows * a->n_kv_heads * S * G * (D + 2) * sizeof(float))
		return -ENOSPC;
	p.q = a->q;
	p.qs = a->q_stride;
	p.out = a->out;
	p.os = a->out_stride;
	p.k.pages = (const uint8_t *)a->k_pages;
	p.k.page_bytes = a->k_page_bytes;
	p.k.type = a->k_type;
	p.v.pages = (const uint8_t *)a->v_pages;
	p.v.page_bytes = a->v_page_bytes;
	p.v.type = a->v_type;
	p.row_seq = a->row_seq;
	p.pos = a->row_pos;
	p.bt = a->block_table;
	p.bt_stride = a->bt_stride;
	p.sink = a->n_sink ? a->sink : nullptr;
	p.n_sink = a->n_sink;
	p.nh = a->n_q_heads;
	p.nkv = a->n_kv_heads;
	p.P = a->page_tokens;
	p.G = G;
	p.group = D < 32 ? D : 32;
	p.scale = 1.4426950408889634f / sqrtf((float)D);
	p.n_splits = S;
	p.ws = a->workspace;
	dim3 grid(S, a->n_kv_heads, a->n_rows);

	switch (D) {
	case 8: attn_go<8>(p, grid, G, st); break;
	case 16: attn_go<16>(p, grid, G, st); break;
	case 32: attn_go<32>(p, grid, G, st); break;
	case 64: attn_go<64>(p, grid, G, st); break;
	case 128: attn_go<128>(p, grid, G, st); break;
	default: attn_go<256>(p, grid, G, st); break;
	}
	if (S > 1)
		attn_merge_kernel<<<dim3(a->n_rows, a->n_q_heads), 256, 0, st>>>(p, D);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}
