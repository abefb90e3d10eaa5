/*
 * attn_split.cu - split-KV attention over kvqd's paged KV cache for any
 * head size from 8 to 256 and every page type (f32, f16, q8, q4), for
 * prompt rows and decode rows alike.
 *
 * Why this file exists: kernels/attn_decode.cu serves decode with
 * tensor-core products but only for head_dim 128; models with other head
 * sizes (64 in most 1B models, 32 in the bundled one, 8 in stories260K)
 * and prompts (several rows of one sequence, each causal) need a kernel
 * that takes any shape.  This one works on CUDA cores: a position's head
 * row is read by D/8 lanes, eight channels (one load) each, every query
 * head of the KV head is scored against it (GQA: each page is read once
 * per block), partial scores meet by a butterfly, and the online softmax
 * runs in f32 (base 2).  Blocks take slices of a row's positions
 * (splits); a second kernel merges the slices.  The plain-C twin is
 * kvq_kv_attend().
 *
 * Key centring (engine/kvcache.h): where the pages hold k - R_p c, each
 * score gets q . R_p c back.  Per query head and rotated pair i (channels
 * a, b) that is A_i cos(p th_i) + B_i sin(p th_i) with A_i = q_a c_a +
 * q_b c_b and B_i = q_b c_a - q_a c_b, plus q_j c_j over the channels RoPE
 * leaves alone; A, B and that sum are made once per block, the cos and sin
 * of each position in double (the CPU's angles).  Kernels of their own
 * (page types read at run time) have it, so that the others keep their
 * registers.
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
constexpr int ATT_HC = 8;	/* query heads one block serves, at most */
constexpr int ATT_MAX_SPLITS = 128;
constexpr int ATT_MAX_BLOCKS = 8192;	/* split blocks of one launch, about */
constexpr int ATT_CTR = -2;	/* page types "any, keys centred" */

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
	uint32_t n_hc;		/* blocks of ATT_HC query heads per KV head */
	int pshift;		/* log2(P) when P is a power of two, else -1 */
	int pdl;		/* launched as a programmatic dependent */
	float scale;		/* softmax scale times log2(e) */
	uint32_t n_splits;
	float *ws;		/* partial results when n_splits > 1 */
	const float *ctr;	/* key centres [nkv][D], or NULL */
	uint32_t rope_dim;
	int neox;
	float base;
};

/*
 * A block's key-centring terms in shared memory: ab[g * (D + 1) + 2i] is
 * A_i and + 2i + 1 B_i of query head g (q scaled as the block's scores),
 * ab[g * (D + 1) + D] the unrotated channels' sum; fr[i] pair i's angle
 * per position.
 */
struct ctrs {
	const float *ab;
	const double *fr;
	uint32_t half;		/* rotated pairs */
};

/*
 * Adds this lane's share of q . R_t c to @s (every query head) for
 * position @t: pairs ci, ci + L, ... (at most four, as D/2 = 4L), and on
 * lane 0 of the position the unrotated channels' sum.  The butterfly
 * over the position's L lanes completes it.
 */
template <int D, int MG>
__device__ __forceinline__ void center_score(const ctrs &cz, uint32_t t,
					     uint32_t ci, float (&s)[MG])
{
	constexpr uint32_t L = D / 8;

	/* Rolled: four inlined double sincos cost registers the scores
	 * need. */
#pragma unroll 1
	for (uint32_t k = 0; k < 4; k++) {
		uint32_t i = ci + k * L;
		double sn, cn;

		if (i >= cz.half)
			break;
		/* kvq_kv_rope_cs(): the angle in double, cos and sin each
		 * rounded to float. */
		sincos((double)t * cz.fr[i], &sn, &cn);
		float c = (float)cn, sf = (float)sn;

#pragma unroll
		for (int g = 0; g < MG; g++)
			s[g] += cz.ab[g * (D + 1) + 2 * i] * c +
				cz.ab[g * (D + 1) + 2 * i + 1] * sf;
	}
	if (ci == 0)
#pragma unroll
		for (int g = 0; g < MG; g++)
			s[g] += cz.ab[g * (D + 1) + D];
}

/*
 * Eight channels of one row as loaded: up to 32 bytes (f32 uses all of
 * them, f16 the first 16, q8 8, q4 4) and the row's scale for them.
 */
struct raw8 {
	uint4 a, b;
	unsigned short s;
	bool sink;		/* the f16 sink copy, whatever the page type */
};

/* Loads channels c0..c0+7 of row @r of the page at @base (type @T); a
 * scale group is 32 channels, or the head when it is smaller. */
template <int D>
__device__ __forceinline__ void load8(int T, const uint8_t *base, uint32_t r,
				      uint32_t c0, uint32_t HP, raw8 *x)
{
	constexpr uint32_t GR = D < 32 ? D : 32, NG = D / GR;

	x->sink = false;
	if (T == KVQ_KV_F32) {
		const uint4 *p = (const uint4 *)((const float *)base +
						 (size_t)r * D + c0);

		x->a = p[0];
		x->b = p[1];
	} else if (T == KVQ_KV_F16) {
		x->a = *(const uint4 *)((const __half *)base + (size_t)r * D + c0);
	} else if (T == KVQ_KV_Q8) {
		uint2 u = *(const uint2 *)(base + (size_t)r * D + c0);

		x->a.x = u.x;
		x->a.y = u.y;
		x->s = ((const unsigned short *)(base + (size_t)HP * D))
			[(size_t)r * NG + c0 / GR];
	} else {
		x->a.x = *(const uint32_t *)(base + (size_t)r * (D / 2) + c0 / 2);
		x->s = ((const unsigned short *)(base + (size_t)HP * D / 2))
			[(size_t)r * NG + c0 / GR];
	}
}

/* The loaded channels as floats (codes, not yet scaled, for q8 and q4);
 * returns the scale that multiplies them. */
__device__ __forceinline__ float cvt8(int T, const raw8 &x, float f[8])
{
	if (x.sink || T == KVQ_KV_F16) {
		const __half2 *h = reinterpret_cast<const __half2 *>(&x.a);

#pragma unroll
		for (int i = 0; i < 4; i++) {
			float2 v = __half22float2(h[i]);

			f[2 * i] = v.x;
			f[2 * i + 1] = v.y;
		}
		return 1.0f;
	}
	if (T == KVQ_KV_F32) {
		f[0] = __uint_as_float(x.a.x);
		f[1] = __uint_as_float(x.a.y);
		f[2] = __uint_as_float(x.a.z);
		f[3] = __uint_as_float(x.a.w);
		f[4] = __uint_as_float(x.b.x);
		f[5] = __uint_as_float(x.b.y);
		f[6] = __uint_as_float(x.b.z);
		f[7] = __uint_as_float(x.b.w);
		return 1.0f;
	}
	float d = __half2float(__ushort_as_half(x.s));

	/* Codes enter the mantissa of 2^23 (exact), the bias comes off in
	 * one exact subtraction: no integer-to-float conversions. */
	if (T == KVQ_KV_Q8) {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			f[i] = __uint_as_float(0x4b000000u |
					       (((x.a.x >> (8 * i)) & 255u) ^ 128u)) -
			       8388736.0f;
			f[4 + i] = __uint_as_float(0x4b000000u |
						   (((x.a.y >> (8 * i)) & 255u) ^ 128u)) -
				   8388736.0f;
		}
		return d;
	}
#pragma unroll
	for (int i = 0; i < 8; i++)
		f[i] = __uint_as_float(0x4b000000u | ((x.a.x >> (4 * i)) & 15u)) -
		       8388616.0f;
	return d;
}

/* Bytes one lane loads per position for a page type (-1: any, 32). */
constexpr __host__ __device__ int lane_bytes(int t)
{
	return t == KVQ_KV_Q4 ? 4 : t == KVQ_KV_Q8 ? 8 : t == KVQ_KV_F16 ? 16 : 32;
}

/* Steps of a chunk: about 64 bytes of K and V loads in flight per lane. */
template <int KT, int VT> constexpr __host__ __device__ int steps()
{
	return 64 / (lane_bytes(KT) + lane_bytes(VT)) < 2 ? 2 :
	       64 / (lane_bytes(KT) + lane_bytes(VT)) > 4 ? 4 :
	       64 / (lane_bytes(KT) + lane_bytes(VT));
}

/* Row and scale bytes of one head row of a page type. */
__device__ __forceinline__ uint32_t row_bytes(int t, uint32_t D)
{
	return t == KVQ_KV_F32 ? 4 * D : t == KVQ_KV_F16 ? 2 * D :
	       t == KVQ_KV_Q8 ? D : D / 2;
}

/* Asks L2 for [p, p + n), the 16-byte-aligned part of it. */
__device__ __forceinline__ void l2_range(const uint8_t *p, size_t n)
{
	uintptr_t a = ((uintptr_t)p + 15) & ~(uintptr_t)15;
	uintptr_t e = ((uintptr_t)p + n) & ~(uintptr_t)15;

	if (e > a)
		kvq_prefetch_l2((const void *)a, (unsigned)(e - a));
}

/* One KV head's rows (and scales) of page @pg of a pool, into L2. */
__device__ __forceinline__ void l2_page(const kvhalf &k, size_t pg,
					uint32_t kh, uint32_t P, uint32_t HP,
					uint32_t D, uint32_t group)
{
	const uint8_t *base = k.pages + pg * k.page_bytes;
	uint32_t rb = row_bytes(k.type, D);

	l2_range(base + (size_t)kh * P * rb, (size_t)P * rb);
	if (k.type >= KVQ_KV_Q8) {
		uint32_t sb = D / group * 2;

		l2_range(base + (size_t)HP * rb + (size_t)kh * P * sb,
			 (size_t)P * sb);
	}
}

/*
 * One chunk of a warp: U steps of PP positions from t0 (below a1), each
 * position's row read by L lanes (this lane: channels c0..c0+7, position
 * gi of a step).  SINK: the positions are sink tokens, read from the f16
 * copies of the quantized halves.  CT: the keys are centred (@cz).
 */
template <int D, int MG, int U, bool SINK, bool CT>
__device__ __forceinline__ void chunk(const attp &p, int kt, int vt,
				      uint32_t t0, uint32_t a1, uint32_t gi,
				      uint32_t c0, uint32_t kh,
				      const int32_t *bt, const __half *sinkb,
				      const ctrs &cz,
				      const float (&qf)[MG][8], float (&m)[MG],
				      float (&l)[MG], float (&acc)[MG][8])
{
	constexpr int L = D / 8, PP = 32 / L;
	uint32_t HP = p.nkv * p.P;
	bool ksq = kt >= KVQ_KV_Q8, vsq = vt >= KVQ_KV_Q8;
	raw8 rk[U], rv[U];

#pragma unroll
	for (int u = 0; u < U; u++) {
		uint32_t t = t0 + u * PP + gi;

		rk[u].a = rv[u].a = make_uint4(0, 0, 0, 0);
		rk[u].b = rv[u].b = make_uint4(0, 0, 0, 0);
		rk[u].s = rv[u].s = 0;
		rk[u].sink = rv[u].sink = false;
		if (t >= a1)
			continue;
		uint32_t pi = p.pshift >= 0 ? t >> p.pshift : t / p.P;
		size_t pg = (size_t)bt[pi];
		const uint8_t *kb = p.k.pages + pg * p.k.page_bytes;
		const uint8_t *vb = p.v.pages + pg * p.v.page_bytes;
		uint32_t r = kh * p.P + (t - pi * p.P);

		if (SINK && ksq) {
			rk[u].a = *(const uint4 *)(sinkb +
				((size_t)t * p.nkv + kh) * D + c0);
			rk[u].sink = true;
		} else {
			load8<D>(kt, kb, r, c0, HP, &rk[u]);
		}
		if (SINK && vsq) {
			rv[u].a = *(const uint4 *)(sinkb +
				((size_t)(p.n_sink + t) * p.nkv + kh) * D + c0);
			rv[u].sink = true;
		} else {
			load8<D>(vt, vb, r, c0, HP, &rv[u]);
		}
	}
	/* Scores of the chunk's positions (summed over each one's L
	 * lanes), all independent; then one rescale per chunk. */
	float s[U][MG];

#pragma unroll
	for (int u = 0; u < U; u++) {
		float kf[8], d = cvt8(SINK && ksq ? (int)KVQ_KV_F16 : kt, rk[u], kf);
		bool ok = t0 + u * PP + gi < a1;

#pragma unroll
		for (int g = 0; g < MG; g++) {
			float x = 0.0f;

#pragma unroll
			for (int j = 0; j < 8; j++)
				x = fmaf(qf[g][j], kf[j], x);
			s[u][g] = ok ? x * d : -INFINITY;
		}
		if (CT && ok)
			center_score<D, MG>(cz, t0 + u * PP + gi, c0 / 8, s[u]);
	}
#pragma unroll
	for (int o = 1; o < L; o <<= 1)
#pragma unroll
		for (int u = 0; u < U; u++)
#pragma unroll
			for (int g = 0; g < MG; g++)
				s[u][g] += kvq_shfl_xor_f32(s[u][g], o);
#pragma unroll
	for (int g = 0; g < MG; g++) {
		float mx = s[0][g];

#pragma unroll
		for (int u = 1; u < U; u++)
			mx = fmaxf(mx, s[u][g]);
		float mn = fmaxf(m[g], mx);
		float corr = mn == -INFINITY ? 1.0f : exp2f(m[g] - mn);

		m[g] = mn;
		l[g] *= corr;
#pragma unroll
		for (int j = 0; j < 8; j++)
			acc[g][j] *= corr;
#pragma unroll
		for (int u = 0; u < U; u++) {
			float pr = mn == -INFINITY ? 0.0f : exp2f(s[u][g] - mn);

			l[g] += pr;
			s[u][g] = pr;
		}
	}
#pragma unroll
	for (int u = 0; u < U; u++) {
		float vf[8], d = cvt8(SINK && vsq ? (int)KVQ_KV_F16 : vt, rv[u], vf);

#pragma unroll
		for (int g = 0; g < MG; g++) {
			float pd = s[u][g] * d;

#pragma unroll
			for (int j = 0; j < 8; j++)
				acc[g][j] = fmaf(pd, vf[j], acc[g][j]);
		}
	}
}

/*
 * The key-centring terms of query heads h0..h0+Gc-1 (KV head @kh) of @row
 * into @sh (shared, 8-byte aligned, at least D + MG * (D + 1) floats), as
 * struct ctrs describes; the block's threads all call it (it ends with a
 * barrier).
 */
template <int D, int MG>
__device__ ctrs center_terms(const attp &p, uint32_t row, uint32_t kh,
			     uint32_t h0, uint32_t Gc, float *sh)
{
	double *fr = (double *)sh;
	float *ab = sh + D;	/* after D/2 doubles */
	const float *cc = p.ctr + (size_t)kh * D;
	const float *q = p.q + (size_t)row * p.qs + (size_t)h0 * D;
	uint32_t half = p.rope_dim / 2, tid = threadIdx.x, x;

	for (x = tid; x < half; x += blockDim.x)
		fr[x] = pow((double)p.base, -2.0 * x / p.rope_dim);
	for (x = tid; x < MG * half; x += blockDim.x) {
		uint32_t g = x / half, i = x % half;
		uint32_t a = p.neox ? i : 2 * i;
		uint32_t b = p.neox ? i + half : 2 * i + 1;
		float qa = 0.0f, qb = 0.0f;

		if (g < Gc) {
			qa = q[(size_t)g * D + a] * p.scale;
			qb = q[(size_t)g * D + b] * p.scale;
		}
		ab[g * (D + 1) + 2 * i] = qa * cc[a] + qb * cc[b];
		ab[g * (D + 1) + 2 * i + 1] = qb * cc[a] - qa * cc[b];
	}
	for (x = tid; x < MG; x += blockDim.x) {
		float k = 0.0f;

		for (uint32_t j = p.rope_dim; x < Gc && j < D; j++)
			k += q[(size_t)x * D + j] * p.scale * cc[j];
		ab[x * (D + 1) + D] = k;
	}
	__syncthreads();
	return ctrs{ ab, fr, half };
}

/*
 * Split-KV attention: block (split, KV head and head block, row) covers
 * one slice of the row's positions [0, pos] for up to MG query heads of
 * that KV head.  A position's head row is read by L = D/8 lanes, eight
 * channels each (one 4-, 8-, 16- or 32-byte load), so a warp takes 32/L
 * positions at a time and U such steps per chunk, every load of a chunk
 * issued before the first is used.  Each lane keeps its query channels in
 * registers; partial scores meet by a butterfly over the L lanes, and
 * each group of L lanes runs its own online softmax (f32, base 2) over
 * its positions, adding p * V into its eight channels.  Groups and warps
 * merge at the end, splits in attn_merge_kernel.
 */
template <int D, int MG, int KT, int VT>
__global__ void __launch_bounds__(128, KT < 0 ? 1 : MG <= 4 ? 4 : 2)
attn_split_kernel(attp p)
{
	constexpr int L = D / 8;		/* lanes per position */
	constexpr int PP = 32 / L;		/* positions per step */
	constexpr int U = steps<KT, VT>();	/* steps per chunk */
	constexpr int CH = U * PP;		/* positions per chunk */
	constexpr bool CT = KT == ATT_CTR;	/* centred keys */
	const int kt = KT >= 0 ? KT : p.k.type, vt = VT >= 0 ? VT : p.v.type;
	__shared__ float wm[4][MG], wl[4][MG];
	/* Also the key-centring terms (struct ctrs) until the end. */
	__shared__ __align__(8) float wo[4][MG][D];
	uint32_t split = blockIdx.x, row = blockIdx.z;
	uint32_t kh = blockIdx.y / p.n_hc, hc = blockIdx.y % p.n_hc;
	uint32_t tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
	uint32_t gi = lane / L, ci = lane % L, c0 = 8 * ci;
	uint32_t Gc = min((uint32_t)MG, p.G - hc * MG);
	uint32_t b = (uint32_t)p.row_seq[row];
	uint32_t n = (uint32_t)p.pos[row] + 1;
	uint32_t span = ((n + p.n_splits - 1) / p.n_splits + 15) & ~15u;
	uint32_t a0 = split * span, a1 = min(n, a0 + span);
	uint32_t HP = p.nkv * p.P, h0 = kh * p.G + hc * MG;
	const int32_t *bt = p.bt + (size_t)b * p.bt_stride;
	const __half *sinkb = p.sink && p.sink[b] ?
			      (const __half *)p.sink[b] : nullptr;
	bool ksq = kt >= KVQ_KV_Q8, vsq = vt >= KVQ_KV_Q8;
	float qf[MG][8], m[MG], l[MG], acc[MG][8];
	ctrs cz = { nullptr, nullptr, 0 };

	kvq_pdl_trigger();	/* the merge or the next product may start */
	/* The block's pages stream into L2 while the append before ends
	 * (the block table is the step's, copied before any kernel; the
	 * new token's row, written by the append, is read after the wait). */
	if (a1 > a0) {
		uint32_t pg1 = (a1 - 1) / p.P + 1;

		for (uint32_t i = a0 / p.P + tid; i < pg1; i += 128) {
			size_t pg = (size_t)bt[i];

			l2_page(p.k, pg, kh, p.P, HP, D, p.group);
			l2_page(p.v, pg, kh, p.P, HP, D, p.group);
		}
	}
	kvq_pdl_wait();
#pragma unroll
	for (int g = 0; g < MG; g++) {
		m[g] = -INFINITY;
		l[g] = 0.0f;
#pragma unroll
		for (int j = 0; j < 8; j++) {
			acc[g][j] = 0.0f;
			qf[g][j] = 0.0f;
		}
		if (g < (int)Gc) {
			const float4 *qp = (const float4 *)(p.q + (size_t)row * p.qs +
							    (size_t)(h0 + g) * D + c0);
			float4 x = qp[0], y = qp[1];

			qf[g][0] = x.x * p.scale;
			qf[g][1] = x.y * p.scale;
			qf[g][2] = x.z * p.scale;
			qf[g][3] = x.w * p.scale;
			qf[g][4] = y.x * p.scale;
			qf[g][5] = y.y * p.scale;
			qf[g][6] = y.z * p.scale;
			qf[g][7] = y.w * p.scale;
		}
	}
	if (CT)
		cz = center_terms<D, MG>(p, row, kh, h0, Gc, &wo[0][0][0]);
	/* Sink tokens of quantized halves first (split 0, the first
	 * chunk), then the pages. */
	uint32_t ns = sinkb && (ksq || vsq) ? min(p.n_sink, a1) : 0;

	for (uint32_t t0 = a0 + w * CH; t0 < ns; t0 += 4 * CH)
		chunk<D, MG, U, true, CT>(p, kt, vt, t0, ns, gi, c0, kh, bt,
					  sinkb, cz, qf, m, l, acc);
	for (uint32_t t0 = max(a0, ns) + w * CH; t0 < a1; t0 += 4 * CH)
		chunk<D, MG, U, false, CT>(p, kt, vt, t0, a1, gi, c0, kh, bt,
					   sinkb, cz, qf, m, l, acc);
	/* wo held the centring terms: every warp is done with them. */
	if (CT)
		__syncthreads();
	/* The warp's position groups merge into lanes 0..L-1. */
#pragma unroll
	for (int g = 0; g < MG; g++) {
		float M = m[g];

#pragma unroll
		for (int o = L; o < 32; o <<= 1)
			M = fmaxf(M, kvq_shfl_xor_f32(M, o));
		float e = M == -INFINITY ? 0.0f : exp2f(m[g] - M);

		l[g] *= e;
#pragma unroll
		for (int j = 0; j < 8; j++)
			acc[g][j] *= e;
#pragma unroll
		for (int o = L; o < 32; o <<= 1) {
			l[g] += kvq_shfl_xor_f32(l[g], o);
#pragma unroll
			for (int j = 0; j < 8; j++)
				acc[g][j] += kvq_shfl_xor_f32(acc[g][j], o);
		}
		if (lane < (uint32_t)L) {
			if (lane == 0) {
				wm[w][g] = M;
				wl[w][g] = l[g];
			}
#pragma unroll
			for (int j = 0; j < 8; j++)
				wo[w][g][c0 + j] = acc[g][j];
		}
	}
	__syncthreads();
	for (uint32_t i = tid; i < Gc * D; i += 128) {
		uint32_t g = i / D, c = i % D;
		float M = fmaxf(fmaxf(wm[0][g], wm[1][g]), fmaxf(wm[2][g], wm[3][g]));
		float o = 0.0f, Ls = 0.0f;

		if (M != -INFINITY) {
			for (int x = 0; x < 4; x++) {
				float e = exp2f(wm[x][g] - M);

				o += e * wo[x][g][c];
				Ls += e * wl[x][g];
			}
		}
		if (p.n_splits == 1) {
			p.out[(size_t)row * p.os + (size_t)(h0 + g) * D + c] = o / Ls;
		} else {
			size_t u = ((size_t)row * p.nkv + kh) * p.n_splits + split;
			float *ws = p.ws + u * p.G * (D + 2) +
				    (size_t)(hc * MG + g) * (D + 2);

			ws[2 + c] = o;
			if (c == 0) {
				ws[0] = M;
				ws[1] = Ls;
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

	kvq_pdl_trigger();
	kvq_pdl_wait();		/* the partials of the kernel before */

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

/* The kernel for any page types (ANY -1), or for centred keys of any
 * page types (ATT_CTR). */
template <int D, int MG, int ANY = -1>
void attn_any(const attp &p, dim3 grid, cudaStream_t st)
{
	/* A dependent of the append: its prologue overlaps that
	 * kernel's end. */
	kvq_launch(p.pdl, attn_split_kernel<D, MG, ANY, ANY>, grid, dim3(128),
		   0, st, p);
}

/* The common shapes (head_dim 64 and 128, 3 to 8 query heads per KV
 * head, f16 and quantized pages) get kernels built for their page types;
 * the rest take the page types at run time. */
template <int D, int MG>
void attn_typed(const attp &p, dim3 grid, cudaStream_t st)
{
#define ATT_KV(KT, VT) \
	if (p.k.type == KT && p.v.type == VT) { \
		kvq_launch(p.pdl, attn_split_kernel<D, MG, KT, VT>, grid, \
			   dim3(128), 0, st, p); \
		return; \
	}
	ATT_KV(KVQ_KV_Q4, KVQ_KV_Q4)
	ATT_KV(KVQ_KV_Q8, KVQ_KV_Q4)
	ATT_KV(KVQ_KV_Q8, KVQ_KV_Q8)
	ATT_KV(KVQ_KV_F16, KVQ_KV_F16)
	ATT_KV(KVQ_KV_Q4, KVQ_KV_Q8)
	ATT_KV(KVQ_KV_F16, KVQ_KV_Q4)
	ATT_KV(KVQ_KV_F16, KVQ_KV_Q8)
	ATT_KV(KVQ_KV_Q4, KVQ_KV_F16)
	ATT_KV(KVQ_KV_Q8, KVQ_KV_F16)
#undef ATT_KV
	attn_any<D, MG>(p, grid, st);
}

/* Head sizes without kernels built per page type. */
template <int D, bool TYPED> struct attn_pick {
	template <int MG> static void go(const attp &p, dim3 grid, cudaStream_t st)
	{
		attn_any<D, MG>(p, grid, st);
	}
};

template <int D> struct attn_pick<D, true> {
	template <int MG> static void go(const attp &p, dim3 grid, cudaStream_t st)
	{
		attn_typed<D, MG>(p, grid, st);
	}
};

template <int D>
void attn_go(const attp &p, dim3 grid, uint32_t G, cudaStream_t st)
{
	typedef attn_pick<D, D == 64 || D == 128> pick;

	if (p.ctr) {
		if (G == 1)
			attn_any<D, 1, ATT_CTR>(p, grid, st);
		else if (G == 2)
			attn_any<D, 2, ATT_CTR>(p, grid, st);
		else if (G <= 4)
			attn_any<D, 4, ATT_CTR>(p, grid, st);
		else
			attn_any<D, ATT_HC, ATT_CTR>(p, grid, st);
	} else if (G == 1)
		attn_any<D, 1>(p, grid, st);
	else if (G == 2)
		attn_any<D, 2>(p, grid, st);
	else if (G <= 4)
		pick::template go<4>(p, grid, st);
	else
		pick::template go<ATT_HC>(p, grid, st);
}

/*
 * Splits for @n_rows rows of @n_units KV heads (times head blocks) up to
 * @max_len positions: about four blocks a multiprocessor in all (one
 * wave at the typed kernels' occupancy), at least 64 positions a split.
 */
uint32_t n_splits(uint32_t n_rows, uint32_t n_units, uint32_t max_len)
{
	static int sms;
	uint32_t s, by_len = (max_len + 63) / 64;

	if (!sms) {
		int dev = 0, n = 0;

		cudaGetDevice(&dev);
		if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount,
					   dev) != cudaSuccess || n <= 0)
			n = 132;
		sms = n;
	}
	s = (uint32_t)(4 * sms) / (n_rows * n_units);
	if (s > by_len)
		s = by_len;
	if (s > ATT_MAX_SPLITS)
		s = ATT_MAX_SPLITS;
	if (s > ATT_MAX_BLOCKS / (n_rows * n_units))
		s = ATT_MAX_BLOCKS / (n_rows * n_units);
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
	if (a->k_center && (a->rope_dim % 2 || a->rope_dim > D ||
			    (a->rope_dim && !(a->rope_base > 0.0f))))
		return -EINVAL;
	S = n_splits(a->n_rows, a->n_kv_heads * (G <= 4 ? 1 :
			(G + ATT_HC - 1) / ATT_HC), a->max_len);
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
	p.pdl = kvq_pdl_allowed();
	p.pshift = (a->page_tokens & (a->page_tokens - 1)) ? -1 :
		   __builtin_ctz(a->page_tokens);
	p.n_hc = G <= 4 ? 1 : (G + ATT_HC - 1) / ATT_HC;
	p.n_splits = S;
	p.ws = a->workspace;
	p.ctr = a->k_center;
	p.rope_dim = a->rope_dim;
	p.neox = a->rope_neox != 0;
	p.base = a->rope_base;
	dim3 grid(S, a->n_kv_heads * p.n_hc, a->n_rows);

	switch (D) {
	case 8: attn_go<8>(p, grid, G, st); break;
	case 16: attn_go<16>(p, grid, G, st); break;
	case 32: attn_go<32>(p, grid, G, st); break;
	case 64: attn_go<64>(p, grid, G, st); break;
	case 128: attn_go<128>(p, grid, G, st); break;
	default: attn_go<256>(p, grid, G, st); break;
	}
	if (S > 1)
		/* A dependent of the split kernel for one row (measured on
		 * the H200, 1B shape: +1-2% at one sequence, -4% at four). */
		kvq_launch(p.pdl && a->n_rows == 1, attn_merge_kernel,
			   dim3(a->n_rows, a->n_q_heads), dim3(256), 0, st, p, D);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}
