/*
 * attn_decode.cu - fused split-KV decode attention over kvqd's paged,
 * quantized KV cache (f16, q8 and q4 pages, any K/V pair).
 *
 * Why this file exists: a decode step reads every KV page of every
 * sequence once, so the bytes of the pages are the speed.  This kernel
 * reads the pages in their stored format and dequantizes in registers;
 * q4 pages are 3.56x smaller than f16 ones.  Head sizes 64 and 128 (a
 * template parameter: 2 or 4 scale groups a row); others go to
 * attn_split.cu.
 *
 * Work split.  A block is (sequence, KV head, split): it owns a run of
 * 16-token tiles of one sequence and serves every query head of that KV
 * head (GQA), so each page is read once.  Each of its 4 warps streams its
 * own tiles through a private ring of shared-memory stages filled with
 * 16-byte asynchronous copies (several tiles in flight per warp), keeps
 * its own online-softmax state, and the warps are merged at the end.  The
 * number of splits is chosen so that a batch of one fills the GPU; when a
 * sequence has several splits, the last block to finish (an atomic
 * counter in the workspace) merges their partial results, so one launch
 * does everything.  On sm_90 the kernel is a programmatic dependent: it
 * reads the block table and starts its first tiles into L2 while the
 * kernels before it end.
 *
 * Arithmetic.  Scores and values go through 16x8x16 f16 matrix products
 * with f32 accumulation.  Keys: the tile's 16 tokens are the rows, the
 * query heads the 8 columns.  Key codes enter as exact biased integers
 * made by one and-or (q4: 1024+n for low nibbles, 64+n for high ones;
 * q8: 1152+q from one byte permute with the exponent byte; or the stored
 * f16), one product per 32-channel scale group with the group's bias
 * times the query as the accumulator's initial value, and the group's
 * scale is applied to the f32 partial score.  The bias cancels in f32
 * (relative rounding about 2^-24 of 1032 * |q| for q4), so scores carry
 * no f16 rounding.  The query is pre-scaled by scale*log2(e) and split
 * into a high and a low f16 half; with at most 4 query heads per KV head
 * the two halves fill the 8 columns, so the query is exact to about
 * 2^-22.  Values: V^T is the left operand (channels x tokens), P^T the
 * right operand, again split into high and low f16 halves.  q4 values
 * enter as exact n-8 and the m-tiles are group-pure, so each group's
 * scales multiply P^T (f16 rounding of p*s, 2^-11 relative); q8 and f16
 * values carry the scale themselves (f16 rounding of n*s).  The softmax
 * is f32 and base 2; the running maximum is raised lazily (only when a
 * score exceeds it by 2^8, found without a reduction) to skip most
 * rescales.
 *
 * Sinks: positions below n_sink of a quantized K or V come from the
 * sequence's f16 copies, as in kvq_kv_attend(); split 0's warps take
 * them first (position w for warp w), in plain f32, and the tile pass
 * masks them out.
 *
 * Shared memory: each stage holds a tile's K rows, K scales, V rows and V
 * scales; rows are padded so that every fragment read is free of bank
 * conflicts and sits at a per-lane base plus a constant (q4 rows are read
 * with ldmatrix; the paddings depend on the head size), and the tile
 * loop is unrolled over the stages.  A
 * tile's copies cost one wide multiply per pool; page ids come from a
 * per-warp ring in shared memory, refilled 32 at a time.
 *
 * Operand layouts (lane = 4g + t): keys, group G, k-step 2G+r: lane t
 * holds channels 32G+8t+{2r, 2r+4 | 2r+1, 2r+5} of tokens g and g+8 (q8:
 * 32G+8t+4r+{0, 1 | 2, 3}); that is one 32-bit word of q4 codes per token
 * and group.  Values, q4: m-tile 2G+a has channel 32G+4g+2a in row g and
 * the next one in row g+8; q8 and f16 (C = head_dim / 8 channels a
 * lane): lane g holds channels Cg..Cg+C-1 of tokens 2t, 2t+1, 2t+8, 2t+9,
 * m-tile 4q+j has channel Cg+8q+j in row g and Cg+8q+j+4 in row g+8.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/attn.h"
#include "engine/kvcache.h"

namespace {

constexpr int TT = 16;		/* tokens per tile */
constexpr int NW = 4;		/* warps per block */
constexpr int NCOL = 8;		/* query-head columns of one pass */
constexpr int MAX_SPLITS = 256;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LAZY = 8.0f;	/* log2 headroom before a rescale */

/*
 * Per page type and head size (64 or 128): row bytes, scale bytes of a
 * row, and the padded shared-memory offset of a tile's row r, as K (rk)
 * and as V (rv).  The paddings make every fragment read of tile_scores()
 * and tile_values() conflict-free, and a row's offset grows by the same
 * amount over the rows one copy step of the warp covers (512 / RB rows).
 */
template <int T, int HD> struct fmt;
template <int HD> struct fmt<KVQ_KV_F16, HD> {
	static constexpr int RB = 2 * HD, SB = 0;
	static constexpr __host__ __device__ int rk(int r)
	{
		return r * (RB + 64);
	}
	static constexpr __host__ __device__ int rv(int r)
	{
		return HD == 128 ? r * 256 + ((r >> 1) & 1) * 16 +
				   ((r >> 2) & 1) * 64 + (r >> 3) * 96 :
				   r * 128 + (r >> 1) * 32;
	}
};
template <int HD> struct fmt<KVQ_KV_Q8, HD> {
	static constexpr int RB = HD, SB = HD / 16;
	static constexpr __host__ __device__ int rk(int r)
	{
		return r * (RB + 32);
	}
	static constexpr __host__ __device__ int rv(int r)
	{
		return r * RB + (r >> 1) * 32;
	}
};
template <int HD> struct fmt<KVQ_KV_Q4, HD> {
	static constexpr int RB = HD / 2, SB = HD / 16;
	static constexpr __host__ __device__ int rk(int r)
	{
		return HD == 128 ? r * 64 + (r >> 1) * 16 :
				   r * 32 + (r >> 2) * 16;
	}
	static constexpr __host__ __device__ int rv(int r)
	{
		return rk(r);
	}
};

constexpr int up16(int x)
{
	return (x + 15) & ~15;
}

/* One warp's stage: K rows, K scales, V rows, V scales of one tile. */
template <int KT, int VT, int HD> struct stage {
	static constexpr int K_OFF = 0;
	static constexpr int KS_OFF = up16(fmt<KT, HD>::rk(TT - 1) +
					   fmt<KT, HD>::RB);
	static constexpr int V_OFF = KS_OFF + TT * fmt<KT, HD>::SB;
	static constexpr int VS_OFF = V_OFF + up16(fmt<VT, HD>::rv(TT - 1) +
						   fmt<VT, HD>::RB);
	static constexpr int BYTES = VS_OFF + TT * fmt<VT, HD>::SB;
	static constexpr int N = BYTES <= 2700 ? 4 : BYTES <= 4100 ? 3 : 2;
	static constexpr int SINK_OFF = NW * N * BYTES;	/* [NW][512] */
	static constexpr int PID_OFF = SINK_OFF + 2048;	/* [NW][64] */
	static constexpr int SMEM = PID_OFF + NW * 64 * 4;
	static constexpr int MERGE = NW * NCOL * HD * 4 + 2 * NW * NCOL * 4;
	static constexpr int SPLIT = (2 * MAX_SPLITS + 1) * NCOL * 4;
	static constexpr int DYN = SMEM > MERGE ? (SMEM > SPLIT ? SMEM : SPLIT) :
				   (MERGE > SPLIT ? MERGE : SPLIT);
};

__device__ __forceinline__ unsigned h2u(__half2 h)
{
	return *reinterpret_cast<unsigned *>(&h);
}

__device__ __forceinline__ __half2 u2h(unsigned u)
{
	return *reinterpret_cast<__half2 *>(&u);
}

/*
 * The pairs (n0,n4) (n1,n5) (n2,n6) (n3,n7) of a word of 8 q4 codes,
 * biased, exact, without f16 arithmetic: a low nibble
 * lands in mantissa bits 0-3 of 1024.0 (1024 + n, pairs 0 and 2), a high
 * one in bits 4-7 of 64.0 (64 + n, pairs 1 and 3); the unit there is 1.
 */
__device__ __forceinline__ void q4_pairs_biased(unsigned w, unsigned h[4])
{
	unsigned w2 = w >> 8;

	h[0] = kvq_and_or(w, 0x000f000fu, 0x64006400u);
	h[1] = kvq_and_or(w, 0x00f000f0u, 0x54005400u);
	h[2] = kvq_and_or(w2, 0x000f000fu, 0x64006400u);
	h[3] = kvq_and_or(w2, 0x00f000f0u, 0x54005400u);
}

/* Bytes at selector positions of two words (already xor 0x80) as f16. */
__device__ __forceinline__ unsigned q8_pair(unsigned a, unsigned b,
					    unsigned sel)
{
	const __half2 bias = u2h(0x64806480u);	/* 1152 */
	unsigned x = __byte_perm(a, b, sel);

	return h2u(__hsub2(u2h(kvq_and_or(x, 0x00ff00ffu, 0x64006400u)), bias));
}

__device__ __forceinline__ float h_lo(unsigned u)
{
	return __low2float(u2h(u));
}

__device__ __forceinline__ float h_hi(unsigned u)
{
	return __high2float(u2h(u));
}

struct plan {
	int n_splits;		/* grid.x */
	int tps;		/* tiles per split */
	int n_chunks;		/* query-head passes of 8 per KV head */
};

struct kparams {
	const void *q;
	void *out;
	int q_f16, out_f16;
	const uint8_t *kp, *vp;
	unsigned kpb, vpb;	/* page bytes (< 4 GiB) */
	const int32_t *bt;
	int bt_stride;
	const int32_t *lens;
	const uint16_t *const *sink;
	int n_sink;
	int hq, hk, gqa, P;
	int tshift;		/* log2(page_tokens / 16) */
	int vmask;		/* (page_tokens / 16 - 1) / NW */
	float qscale;		/* scale * log2(e) */
	int n_splits, tps, n_chunks;
	int *cnt;
	float *ws_m, *ws_l, *ws_o;
};

__device__ __forceinline__ float load_q(const kparams &p, size_t i)
{
	if (p.q_f16)
		return __half2float(((const __half *)p.q)[i]);
	return ((const float *)p.q)[i];
}

/* Per-warp online-softmax state; lane 4g+t owns query columns 2t, 2t+1. */
template <int HD> struct wstate {
	float o[HD / 16][4];	/* O^T fragments of the m-tiles */
	float m[2], l[2];
	float th[2];		/* m + LAZY: a score above it raises m */
};

/* Queue the copies of sink position @p into @buf: its K row (the first
 * HD / 8 lanes) at 0 and its V row (the next HD / 8) at 256, f16. */
template <int HD>
__device__ __forceinline__ void sink_copy(int p, const uint16_t *sk,
					  const uint16_t *sv, int ks, int vs,
					  uint8_t *buf)
{
	constexpr int RL = HD / 8;	/* lanes a row */
	int lane = threadIdx.x & 31, c = lane % RL;

	if (lane < 2 * RL) {
		const uint16_t *src = lane < RL ? sk + (size_t)p * ks + 8 * c :
					      sv + (size_t)p * vs + 8 * c;

		kvq_cp_async16(buf + (lane < RL ? 0 : 256) + 16 * c, src);
	}
}

/*
 * Sink positions w, w + NW, ... below ns of the head, for warp w: keys and
 * values as f16 rows (from the sink copies or, for an unquantized half,
 * from page 0, @ks / @vs halves apart), in f32, one position at a time
 * staged in @buf (512 bytes of shared memory); the copies of the first
 * are already queued.  Scores use the query fragments @qf, so they equal
 * the tile pass's to f32 rounding.
 */
template <int KT, int VT, int HD>
__device__ void sink_pass(wstate<HD> &st, const unsigned qf[][2], bool hilo,
			  int ns, int w, const uint16_t *sk,
			  const uint16_t *sv, int ks, int vs, uint8_t *buf)
{
	int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	bool own = !hilo || t < 2;

	for (int p = w; p < ns; p += NW) {
		if (p != w) {
			sink_copy<HD>(p, sk, sv, ks, vs, buf);
			kvq_cp_async_commit();
		}
		kvq_cp_async_wait<0>();
		kvq_syncwarp();
		{
			constexpr int NG = HD / 32, CPL = HD / 8;
			const uint8_t *kr = buf;
			const uint4 *vr = (const uint4 *)(buf + 256 + 2 * CPL * g);
			float acc = 0.0f, sc[2], pr[2], al[2];

			/* Column g's partial score over channels 32G+8t+i,
			 * one sum per group. */
			float ag[NG];

#pragma unroll
			for (int G = 0; G < NG; G++)
				ag[G] = 0.0f;
#pragma unroll
			for (int G = 0; G < NG; G++) {
				uint4 k8 = *(const uint4 *)(kr + 2 * (32 * G + 8 * t));
				unsigned kw[4] = { k8.x, k8.y, k8.z, k8.w };

#pragma unroll
				for (int r = 0; r < 2; r++) {
					unsigned q0 = qf[2 * G + r][0];
					unsigned q1 = qf[2 * G + r][1];

					if (KT == KVQ_KV_Q8)
						/* (c4r, c4r+1), (c4r+2, c4r+3) */
						ag[G] += h_lo(q0) * h_lo(kw[2 * r]) +
						       h_hi(q0) * h_hi(kw[2 * r]) +
						       h_lo(q1) * h_lo(kw[2 * r + 1]) +
						       h_hi(q1) * h_hi(kw[2 * r + 1]);
					else
						/* (c2r, c2r+4), (c2r+1, c2r+5) */
						ag[G] += h_lo(q0) * h_lo(kw[r]) +
						       h_hi(q0) * h_lo(kw[r + 2]) +
						       h_lo(q1) * h_hi(kw[r]) +
						       h_hi(q1) * h_hi(kw[r + 2]);
				}
			}
			acc = NG == 4 ? (ag[0] + ag[1]) + (ag[2] + ag[3]) :
					ag[0] + ag[1];
			acc += kvq_shfl_xor_f32(acc, 1);
			acc += kvq_shfl_xor_f32(acc, 2);
			if (hilo)
				acc += kvq_shfl_xor_f32(acc, 16);
			sc[0] = __uint_as_float(kvq_shfl_u32(__float_as_uint(acc), 8 * t));
			sc[1] = __uint_as_float(kvq_shfl_u32(__float_as_uint(acc), 8 * t + 4));
#pragma unroll
			for (int e = 0; e < 2; e++) {
				float nm = fmaxf(st.m[e], sc[e]);

				al[e] = st.m[e] == -INFINITY ? 0.0f :
					exp2f(st.m[e] - nm);
				pr[e] = exp2f(sc[e] - nm);
				st.m[e] = nm;
				st.th[e] = nm + LAZY;
				st.l[e] = st.l[e] * al[e] +
					  (g == 0 ? pr[e] : 0.0f);
			}
			/* The lane's CPL channels, in the order of vch(). */
			unsigned vu[CPL / 2];

			if (VT == KVQ_KV_Q4) {
				const uint8_t *vrow = buf + 256 + 8 * g;

#pragma unroll
				for (int G = 0; G < NG; G++) {
					uint2 x = *(const uint2 *)(vrow + 64 * G);

					vu[2 * G] = x.x;
					vu[2 * G + 1] = x.y;
				}
			} else {
#pragma unroll
				for (int u = 0; u < CPL / 8; u++) {
					uint4 v0 = vr[u];

					vu[4 * u] = v0.x;
					vu[4 * u + 1] = v0.y;
					vu[4 * u + 2] = v0.z;
					vu[4 * u + 3] = v0.w;
				}
			}
#pragma unroll
			for (int i = 0; i < HD / 16; i++) {
				/* Offsets of rows g, g+8 among the 16. */
				int c = VT == KVQ_KV_Q4 ? 4 * (i >> 1) + 2 * (i & 1) :
					8 * (i >> 2) + (i & 3);
				int d = VT == KVQ_KV_Q4 ? c + 1 : c + 4;
				float x0 = own ? ((c & 1) ? h_hi(vu[c >> 1]) :
						  h_lo(vu[c >> 1])) : 0.0f;
				float x1 = own ? ((d & 1) ? h_hi(vu[d >> 1]) :
						  h_lo(vu[d >> 1])) : 0.0f;

				st.o[i][0] = st.o[i][0] * al[0] + pr[0] * x0;
				st.o[i][1] = st.o[i][1] * al[1] + pr[1] * x0;
				st.o[i][2] = st.o[i][2] * al[0] + pr[0] * x1;
				st.o[i][3] = st.o[i][3] * al[1] + pr[1] * x1;
			}
		}
		kvq_syncwarp();
	}
}

/*
 * Per-lane constants of the copies into a stage and of the reads from it.
 * A tile's copies are one 16-byte chunk per lane and step: K rows and V
 * rows at a fixed stride, and the scale rows of K (lanes 0-7) and V (the
 * next 8 lanes) in one more step, each lane from its own pool.  A source
 * is the lane's byte on page 0 plus page * page bytes: one wide multiply-
 * add per pool.
 */
template <int KT, int VT, int HD> struct copy_shape {
	static constexpr int NKS = TT * fmt<KT, HD>::SB / 16;
	static constexpr int NVS = TT * fmt<VT, HD>::SB / 16;
	static constexpr int NS = NKS + NVS;	/* lanes copying scales */
};

struct lanes {
	unsigned ck, cv, cs;		/* copy sources within a page */
	int dk, dv, ds;			/* copy destinations */
	int rk, rks, rv, rvs;		/* fragment reads */
};

/*
 * @sub0: the 16-token row block, within its page, of the warp's tiles
 * (the same for all of them when a page holds at most NW tiles; the part
 * that changes is added per tile, see issue_tile()).
 */
template <int KT, int VT, int HD>
__device__ __forceinline__ void lanes_init(const kparams &p, int h,
					   unsigned sub0, lanes &L)
{
	typedef stage<KT, VT, HD> S;
	typedef fmt<KT, HD> FK;
	typedef fmt<VT, HD> FV;
	typedef copy_shape<KT, VT, HD> C;
	constexpr int CPL = HD / 8;	/* q8/f16 value channels a lane */
	int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	int ck = FK::RB / 16, cv = FV::RB / 16;	/* chunks per row */
	size_t hp = (size_t)h * p.P;

	L.dk = S::K_OFF + FK::rk(lane / ck) + 16 * (lane % ck);
	L.dv = S::V_OFF + FV::rv(lane / cv) + 16 * (lane % cv);
	L.ck = (unsigned)((hp + TT * sub0) * FK::RB + 16 * lane);
	L.cv = (unsigned)((hp + TT * sub0) * FV::RB + 16 * lane);
	if (lane < C::NKS) {
		L.cs = (unsigned)((size_t)p.hk * p.P * FK::RB +
				  (hp + TT * sub0) * FK::SB + 16 * lane);
		L.ds = S::KS_OFF + 16 * lane;
	} else {
		int l2 = lane - C::NKS;

		L.cs = (unsigned)((size_t)p.hk * p.P * FV::RB +
				  (hp + TT * sub0) * FV::SB + 16 * l2);
		L.ds = S::VS_OFF + 16 * l2;
	}
	/* q4 rows are read with ldmatrix: lane l gives row l & 7 of
	 * matrix l >> 3, the 16 bytes of group (l >> 4) of token
	 * (l & 7) + 8 * ((l >> 3) & 1); at head_dim 128 two more groups
	 * are 32 bytes on. */
	int mrow = (lane & 7) + 8 * ((lane >> 3) & 1), mgrp = lane >> 4;

	if (KT == KVQ_KV_Q4)
		L.rk = S::K_OFF + FK::rk(mrow) + 16 * mgrp;
	else if (KT == KVQ_KV_Q8)
		L.rk = S::K_OFF + FK::rk(g) + 8 * t;
	else
		L.rk = S::K_OFF + FK::rk(g) + 16 * t;
	L.rks = S::KS_OFF + FK::SB * g;
	if (VT == KVQ_KV_Q4) {
		L.rv = S::V_OFF + FV::rv(mrow) + 16 * mgrp;
		L.rvs = S::VS_OFF + 2 * FV::SB * t;
	} else {
		L.rv = S::V_OFF + FV::rv(2 * t) +
		       (VT == KVQ_KV_Q8 ? CPL : 2 * CPL) * g;
		L.rvs = S::VS_OFF + 2 * FV::SB * t + 2 * (g / (32 / CPL));
	}
}

/*
 * Queue the 16-byte copies of one tile of @page, or with @n = 0 only
 * zeros (nothing is read).  VAR: pages of more than NW tiles, where the
 * tile's row block is NW * @sub beyond the warp's sub0.
 */
template <int KT, int VT, int HD, bool VAR>
__device__ __forceinline__ void issue_tile(const kparams &p, const lanes &L,
					   uint8_t *st, unsigned page,
					   unsigned sub, unsigned n)
{
	typedef fmt<KT, HD> FK;
	typedef fmt<VT, HD> FV;
	typedef copy_shape<KT, VT, HD> C;
	int lane = threadIdx.x & 31;
	const uint8_t *ks = p.kp + ((size_t)page * p.kpb + L.ck);
	const uint8_t *vs = p.vp + ((size_t)page * p.vpb + L.cv);
	const uint8_t *ss = lane < C::NKS ?
			    p.kp + ((size_t)page * p.kpb + L.cs) :
			    p.vp + ((size_t)page * p.vpb + L.cs);

	if (VAR) {
		ks += sub * (NW * TT * FK::RB);
		vs += sub * (NW * TT * FV::RB);
		ss += sub * (NW * TT * (lane < C::NKS ? FK::SB : FV::SB));
	}
#pragma unroll
	for (int j = 0; j < FK::RB / 32; j++)
		kvq_cp_async16_n(st + L.dk + (FK::rk(j * 32 / (FK::RB / 16)) -
					      FK::rk(0)),
				 ks + 512 * j, n);
	if (C::NS && lane < C::NS)
		kvq_cp_async16_n(st + L.ds, ss, n);
#pragma unroll
	for (int j = 0; j < FV::RB / 32; j++)
		kvq_cp_async16_n(st + L.dv + (FV::rv(j * 32 / (FV::RB / 16)) -
					      FV::rv(0)),
				 vs + 512 * j, n);
}

/*
 * Scores of the tile's tokens g and g+8 for query columns 2t, 2t+1
 * (scaled, base 2), from stage @st.  Quantized keys enter the products
 * as exact biased integers (q4: 1024 + n or 64 + n, q8: 1152 + q); @kc
 * holds each group's bias times the column's query to start from, as
 * the accumulator fragment (columns 2t, 2t+1 of rows g and g+8).
 */
template <int KT, int VT, int HD>
__device__ __forceinline__ void tile_scores(const uint8_t *st,
					    const lanes &L,
					    const unsigned qf[][2],
					    const float kc[][4], float s[4])
{
	typedef fmt<KT, HD> FK;
	constexpr int NG = HD / 32;
	const uint8_t *kr = st + L.rk;
	constexpr int R8 = FK::rk(8) - FK::rk(0);	/* row g -> g+8 */

	s[0] = s[1] = s[2] = s[3] = 0.0f;
	if (KT == KVQ_KV_F16) {
#pragma unroll
		for (int G = 0; G < NG; G++) {
			uint4 r0 = *(const uint4 *)(kr + 64 * G);
			uint4 r1 = *(const uint4 *)(kr + 64 * G + R8);
			unsigned a[4];

			a[0] = __byte_perm(r0.x, r0.z, 0x5410);
			a[1] = __byte_perm(r1.x, r1.z, 0x5410);
			a[2] = __byte_perm(r0.x, r0.z, 0x7632);
			a[3] = __byte_perm(r1.x, r1.z, 0x7632);
			kvq_mma_f16_16816(s, a, qf[2 * G]);
			a[0] = __byte_perm(r0.y, r0.w, 0x5410);
			a[1] = __byte_perm(r1.y, r1.w, 0x5410);
			a[2] = __byte_perm(r0.y, r0.w, 0x7632);
			a[3] = __byte_perm(r1.y, r1.w, 0x7632);
			kvq_mma_f16_16816(s, a, qf[2 * G + 1]);
		}
		return;
	}
	/* Rows g and g+8's group scales. */
	float sg0[NG], sg1[NG];

	if (NG == 4) {
		uint2 sr0 = *(const uint2 *)(st + L.rks);
		uint2 sr1 = *(const uint2 *)(st + L.rks + 8 * FK::SB);

		sg0[0] = h_lo(sr0.x);
		sg0[1] = h_hi(sr0.x);
		sg0[NG - 2] = h_lo(sr0.y);
		sg0[NG - 1] = h_hi(sr0.y);
		sg1[0] = h_lo(sr1.x);
		sg1[1] = h_hi(sr1.x);
		sg1[NG - 2] = h_lo(sr1.y);
		sg1[NG - 1] = h_hi(sr1.y);
	} else {
		unsigned sr0 = *(const unsigned *)(st + L.rks);
		unsigned sr1 = *(const unsigned *)(st + L.rks + 8 * FK::SB);

		sg0[0] = h_lo(sr0);
		sg0[1] = h_hi(sr0);
		sg1[0] = h_lo(sr1);
		sg1[1] = h_hi(sr1);
	}
	unsigned kx[2 * NG];	/* q4: group G's words of rows g, g+8 */
	const unsigned e1024 = 0x64646464u;	/* q8: bytes b -> 1024 + b */

	if (KT == KVQ_KV_Q4) {
		kvq_ldsm4(kx, st + L.rk);
		if (NG == 4)
			kvq_ldsm4(kx + 4 * (NG / 4), st + L.rk + 32);
	}

#pragma unroll
	for (int G = 0; G < NG; G++) {
		unsigned e0[4], e1[4], a[4];
		float c[4];

		if (KT == KVQ_KV_Q4) {
			q4_pairs_biased(kx[2 * G], e0);
			q4_pairs_biased(kx[2 * G + 1], e1);
		} else {
			/* q8: adjacent channels, 1152 + q after the xor. */
			uint2 r0 = *(const uint2 *)(kr + 32 * G);
			uint2 r1 = *(const uint2 *)(kr + 32 * G + R8);

			r0.x ^= 0x80808080u;
			r0.y ^= 0x80808080u;
			r1.x ^= 0x80808080u;
			r1.y ^= 0x80808080u;
			e0[0] = __byte_perm(r0.x, e1024, 0x4140);
			e0[1] = __byte_perm(r0.x, e1024, 0x4342);
			e0[2] = __byte_perm(r0.y, e1024, 0x4140);
			e0[3] = __byte_perm(r0.y, e1024, 0x4342);
			e1[0] = __byte_perm(r1.x, e1024, 0x4140);
			e1[1] = __byte_perm(r1.x, e1024, 0x4342);
			e1[2] = __byte_perm(r1.y, e1024, 0x4140);
			e1[3] = __byte_perm(r1.y, e1024, 0x4342);
		}
		a[0] = e0[0];
		a[1] = e1[0];
		a[2] = e0[1];
		a[3] = e1[1];
		kvq_mma_f16_16816_c(c, a, qf[2 * G], kc[G]);
		a[0] = e0[2];
		a[1] = e1[2];
		a[2] = e0[3];
		a[3] = e1[3];
		kvq_mma_f16_16816(c, a, qf[2 * G + 1]);
		s[0] += sg0[G] * c[0];
		s[1] += sg0[G] * c[1];
		s[2] += sg1[G] * c[2];
		s[3] += sg1[G] * c[3];
	}
}

/*
 * Operands of m-tiles 4q..4q+3 for the token pair (A, B) of q8 or f16
 * values: hf[j][0] holds (A, B) of channel 16g+8q+j, hf[j][1] of channel
 * 16g+8q+j+4, scaled by @sc (the pair's scales; f16 pages have none).
 */
template <int VT>
__device__ __forceinline__ void v_pair(const unsigned *ra, const unsigned *rb,
				       int q, unsigned sc, unsigned hf[4][2])
{
	if (VT == KVQ_KV_Q8) {
		unsigned a0 = ra[2 * q] ^ 0x80808080u;
		unsigned b0 = rb[2 * q] ^ 0x80808080u;
		unsigned a1 = ra[2 * q + 1] ^ 0x80808080u;
		unsigned b1 = rb[2 * q + 1] ^ 0x80808080u;

#pragma unroll
		for (int j = 0; j < 4; j++) {
			unsigned sel = j | ((4 + j) << 8);

			hf[j][0] = q8_pair(a0, b0, sel);
			hf[j][1] = q8_pair(a1, b1, sel);
		}
	} else {
#pragma unroll
		for (int j = 0; j < 4; j++) {
			int c = 8 * q + j, d = c + 4;

			hf[j][0] = __byte_perm(ra[c >> 1], rb[c >> 1],
					       (c & 1) ? 0x7632 : 0x5410);
			hf[j][1] = __byte_perm(ra[d >> 1], rb[d >> 1],
					       (d & 1) ? 0x7632 : 0x5410);
		}
	}
	if (VT != KVQ_KV_F16) {
#pragma unroll
		for (int j = 0; j < 4; j++) {
			hf[j][0] = h2u(__hmul2(u2h(hf[j][0]), u2h(sc)));
			hf[j][1] = h2u(__hmul2(u2h(hf[j][1]), u2h(sc)));
		}
	}
}

/*
 * o += V^T P^T for a tile of q4 values.  The m-tiles are group-pure:
 * m-tile 2G+a holds channels 32G+4g+2a (row g) and 32G+4g+2a+1 (row
 * g+8), so group G's scales scale P^T's fragment (tokens 2t, 2t+1 and
 * 2t+8, 2t+9 of column g) and the codes enter as exact n-8.  A
 * transposed ldmatrix gives lane 4g+t, per group and 8-token half, the
 * word [A.b, A.b', B.b, B.b'] of tokens A=2t, B=2t+1 (+8), bytes
 * b=2g, b'=2g+1 of the group's 16 bytes: channels 4g..4g+3.
 */
template <int KT, int VT, int HD>
__device__ __forceinline__ void tile_values_q4(const uint8_t *st,
					       const lanes &L,
					       const unsigned pb[2], int vm,
					       float o[][4])
{
	typedef stage<KT, VT, HD> S;
	constexpr int NG = HD / 32, SB = fmt<VT, HD>::SB;
	const uint8_t *vb = KT == KVQ_KV_Q4 ?
			    st + L.rk + (S::V_OFF - S::K_OFF) : st + L.rv;
	const __half2 b_lo = u2h(0xe408e408u);	/* -1032 */
	const __half2 b_hi = u2h(0xd480d480u);	/* -72 */
	unsigned x[2 * NG], sp[NG], sq[NG];

	kvq_ldsm4_t(x, vb);
	if (NG == 4)
		kvq_ldsm4_t(x + 4 * (NG / 4), vb + 32);

	/* Group G's scales of tokens (2t, 2t+1) and (2t+8, 2t+9). */
	if (NG == 4) {
		uint4 sa = *(const uint4 *)(st + L.rvs);
		uint4 sb = *(const uint4 *)(st + L.rvs + 8 * SB);

		sp[0] = __byte_perm(sa.x, sa.z, 0x5410);
		sp[1] = __byte_perm(sa.x, sa.z, 0x7632);
		sp[NG - 2] = __byte_perm(sa.y, sa.w, 0x5410);
		sp[NG - 1] = __byte_perm(sa.y, sa.w, 0x7632);
		sq[0] = __byte_perm(sb.x, sb.z, 0x5410);
		sq[1] = __byte_perm(sb.x, sb.z, 0x7632);
		sq[NG - 2] = __byte_perm(sb.y, sb.w, 0x5410);
		sq[NG - 1] = __byte_perm(sb.y, sb.w, 0x7632);
	} else {
		uint2 sa = *(const uint2 *)(st + L.rvs);
		uint2 sb = *(const uint2 *)(st + L.rvs + 8 * SB);

		sp[0] = __byte_perm(sa.x, sa.y, 0x5410);
		sp[1] = __byte_perm(sa.x, sa.y, 0x7632);
		sq[0] = __byte_perm(sb.x, sb.y, 0x5410);
		sq[1] = __byte_perm(sb.x, sb.y, 0x7632);
	}
	if (vm != 15) {
		unsigned ma = ((vm & 1) ? 0xffffu : 0u) |
			      ((vm & 2) ? 0xffff0000u : 0u);
		unsigned mb = ((vm & 4) ? 0xffffu : 0u) |
			      ((vm & 8) ? 0xffff0000u : 0u);

#pragma unroll
		for (int G = 0; G < NG; G++) {
			sp[G] &= ma;
			sq[G] &= mb;
		}
	}
#pragma unroll
	for (int G = 0; G < NG; G++) {
		unsigned b[2] = { h2u(__hmul2(u2h(pb[0]), u2h(sp[G]))),
				  h2u(__hmul2(u2h(pb[1]), u2h(sq[G]))) };
		unsigned xl = x[2 * G], xh = x[2 * G + 1];
		unsigned yl = xl >> 8, yh = xh >> 8;
		unsigned a0[4] = {
			h2u(__hadd2(u2h(kvq_and_or(xl, 0x000f000fu, 0x64006400u)), b_lo)),
			h2u(__hadd2(u2h(kvq_and_or(xl, 0x00f000f0u, 0x54005400u)), b_hi)),
			h2u(__hadd2(u2h(kvq_and_or(xh, 0x000f000fu, 0x64006400u)), b_lo)),
			h2u(__hadd2(u2h(kvq_and_or(xh, 0x00f000f0u, 0x54005400u)), b_hi)),
		};
		unsigned a1[4] = {
			h2u(__hadd2(u2h(kvq_and_or(yl, 0x000f000fu, 0x64006400u)), b_lo)),
			h2u(__hadd2(u2h(kvq_and_or(yl, 0x00f000f0u, 0x54005400u)), b_hi)),
			h2u(__hadd2(u2h(kvq_and_or(yh, 0x000f000fu, 0x64006400u)), b_lo)),
			h2u(__hadd2(u2h(kvq_and_or(yh, 0x00f000f0u, 0x54005400u)), b_hi)),
		};

		kvq_mma_f16_16816(o[2 * G], a0, b);
		kvq_mma_f16_16816(o[2 * G + 1], a1, b);
	}
}

/*
 * Channel of row g (up = 0) or g+8 (up = 1) of the values' m-tile i:
 * group-pure for q4 (see tile_values_q4()), else lane g's channels are
 * CPL g .. CPL g + CPL - 1 (CPL = head_dim / 8).
 */
template <int VT, int HD>
__device__ __forceinline__ int vch(int i, int up, int g)
{
	if (VT == KVQ_KV_Q4)
		return 32 * (i >> 1) + 4 * g + 2 * (i & 1) + up;
	return (HD / 8) * g + 8 * (i >> 2) + (i & 3) + 4 * up;
}

/*
 * o += V^T P^T for the tile: @pb is P^T's fragment; @vm has bit i set
 * when the lane's token i (2t, 2t+1, 2t+8, 2t+9) is valid (the others
 * contribute zero even when their bytes are not numbers).
 */
template <int KT, int VT, int HD>
__device__ __forceinline__ void tile_values(const uint8_t *st,
					    const lanes &L,
					    const unsigned pb[2], int vm,
					    float o[][4])
{
	typedef fmt<VT, HD> FV;

	if (VT == KVQ_KV_Q4) {
		tile_values_q4<KT, VT, HD>(st, L, pb, vm, o);
		return;
	}
	const uint8_t *vr = st + L.rv;
	const int dt[4] = { 0, FV::rv(1) - FV::rv(0), FV::rv(8) - FV::rv(0),
			    FV::rv(9) - FV::rv(0) };
	unsigned w[4][HD / 16], sc[2] = { 0u, 0u };

#pragma unroll
	for (int i = 0; i < 4; i++) {
		bool ok = (vm >> i) & 1;

		if (VT == KVQ_KV_Q8 && HD == 64) {
			uint2 x = *(const uint2 *)(vr + dt[i]);

			w[i][0] = x.x;
			w[i][1] = x.y;
		} else if (VT == KVQ_KV_Q8) {
			uint4 x = *(const uint4 *)(vr + dt[i]);

			w[i][0] = x.x;
			w[i][1] = x.y;
			w[i][2] = x.z;
			w[i][3] = x.w;
		} else {
#pragma unroll
			for (int c = 0; c < HD / 64; c++) {
				uint4 x = *(const uint4 *)(vr + dt[i] + 16 * c);

				w[i][4 * c] = ok ? x.x : 0u;
				w[i][4 * c + 1] = ok ? x.y : 0u;
				w[i][4 * c + 2] = ok ? x.z : 0u;
				w[i][4 * c + 3] = ok ? x.w : 0u;
			}
		}
		if (VT != KVQ_KV_F16) {
			const int so[4] = { 0, FV::SB, 8 * FV::SB, 9 * FV::SB };
			unsigned s = *(const unsigned short *)(st + L.rvs + so[i]);

			sc[i >> 1] |= (ok ? s : 0u) << (16 * (i & 1));
		}
	}
#pragma unroll
	for (int q = 0; q < HD / 64; q++) {
		unsigned h0[4][2], h1[4][2];

		v_pair<VT>(w[0], w[1], q, sc[0], h0);
		v_pair<VT>(w[2], w[3], q, sc[1], h1);
#pragma unroll
		for (int j = 0; j < 4; j++) {
			unsigned a[4] = { h0[j][0], h0[j][1], h1[j][0], h1[j][1] };

			kvq_mma_f16_16816(o[4 * q + j], a, pb);
		}
	}
}

/* out[b][hq][ch] = v in the caller's element type. */
__device__ __forceinline__ void put_out(const kparams &p, size_t i, float v)
{
	if (p.out_f16)
		((__half *)p.out)[i] = __float2half_rn(v);
	else
		((float *)p.out)[i] = v;
}

/*
 * One tile from stage @st: scores, online softmax, values.  Tokens
 * [lo, hi) of the tile are valid.
 */
template <int KT, int VT, int HD, bool FULL>
__device__ __forceinline__ void tile(const uint8_t *st, const lanes &L,
				     const unsigned qf[][2],
				     const float kc[][4], bool hilo, int lo,
				     int hi, wstate<HD> &ws)
{
	int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	float s4[4];

	tile_scores<KT, VT, HD>(st, L, qf, kc, s4);
	if (hilo)
#pragma unroll
		for (int i = 0; i < 4; i++)
			s4[i] += kvq_shfl_xor_f32(s4[i], 2);
	if (!FULL) {
		if (!(g >= lo && g < hi))
			s4[0] = s4[1] = -INFINITY;
		if (!(g + 8 >= lo && g + 8 < hi))
			s4[2] = s4[3] = -INFINITY;
	}

	float mt0 = fmaxf(s4[0], s4[2]), mt1 = fmaxf(s4[1], s4[3]);

	/* Rare: some score exceeds its column's maximum by more than
	 * LAZY; only then the tile's column maxima are reduced. */
	if (kvq_any(mt0 > ws.th[0] || mt1 > ws.th[1])) {
#pragma unroll
		for (int m = 4; m < 32; m <<= 1) {
			mt0 = fmaxf(mt0, kvq_shfl_xor_f32(mt0, m));
			mt1 = fmaxf(mt1, kvq_shfl_xor_f32(mt1, m));
		}
		float n0 = fmaxf(ws.m[0], mt0), n1 = fmaxf(ws.m[1], mt1);
		float a0 = ws.m[0] == -INFINITY ? 0.0f :
			   kvq_exp2_fast(ws.m[0] - n0);
		float a1 = ws.m[1] == -INFINITY ? 0.0f :
			   kvq_exp2_fast(ws.m[1] - n1);

		ws.m[0] = n0;
		ws.m[1] = n1;
		ws.th[0] = n0 + LAZY;
		ws.th[1] = n1 + LAZY;
		ws.l[0] *= a0;
		ws.l[1] *= a1;
#pragma unroll
		for (int i = 0; i < HD / 16; i++) {
			ws.o[i][0] *= a0;
			ws.o[i][1] *= a1;
			ws.o[i][2] *= a0;
			ws.o[i][3] *= a1;
		}
	}
	float p0 = kvq_exp2_fast(s4[0] - ws.m[0]);
	float p1 = kvq_exp2_fast(s4[1] - ws.m[1]);
	float p2 = kvq_exp2_fast(s4[2] - ws.m[0]);
	float p3 = kvq_exp2_fast(s4[3] - ws.m[1]);

	ws.l[0] += p0 + p2;
	ws.l[1] += p1 + p3;

	__half2 hg = __floats2half2_rn(p0, p1), hg8 = __floats2half2_rn(p2, p3);
	unsigned pk0 = h2u(hg), pk1 = h2u(hg8);

	if (hilo && t >= 2) {
		float2 f0 = __half22float2(hg), f1 = __half22float2(hg8);

		pk0 = h2u(__floats2half2_rn(p0 - f0.x, p1 - f0.y));
		pk1 = h2u(__floats2half2_rn(p2 - f1.x, p3 - f1.y));
	}
	int tsrc = hilo ? (((g & 3) >> 1) | ((g >> 2) << 1)) : (g >> 1);
	unsigned sel = (g & 1) ? 0x7632u : 0x5410u;
	unsigned x0 = kvq_shfl_u32(pk0, 8 * t + tsrc);
	unsigned x1 = kvq_shfl_u32(pk0, 8 * t + 4 + tsrc);
	unsigned x2 = kvq_shfl_u32(pk1, 8 * t + tsrc);
	unsigned x3 = kvq_shfl_u32(pk1, 8 * t + 4 + tsrc);
	unsigned pb[2] = { __byte_perm(x0, x1, sel), __byte_perm(x2, x3, sel) };
	int vm = 15;

	if (!FULL) {
		vm = 0;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			int tk = 2 * t + (i & 1) + 8 * (i >> 1);

			vm |= (tk >= lo && tk < hi) << i;
		}
	}
	tile_values<KT, VT, HD>(st, L, pb, vm, ws.o);
}

/*
 * One block: sequence blockIdx.z, KV head blockIdx.y / n_chunks (query
 * heads of pass blockIdx.y % n_chunks), tiles [split * tps, + tps).
 */
template <int KT, int VT, int HD>
__global__ void __launch_bounds__(NW * 32, 4) decode_kernel(kparams p)
{
	typedef stage<KT, VT, HD> S;
	constexpr int NG = HD / 32;
	constexpr int N = S::N;
	extern __shared__ __align__(16) uint8_t smem[];
	__shared__ int last;
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	int g = lane >> 2, t = lane & 3;
	int split = blockIdx.x, b = blockIdx.z;
	int h = blockIdx.y / p.n_chunks, hc = blockIdx.y % p.n_chunks;
	int hq0 = h * p.gqa + hc * NCOL;
	int nh = min(NCOL, p.gqa - hc * NCOL);
	bool hilo = nh <= 4;
	long long cap = (long long)p.n_splits * p.tps * TT;
	long long lim = (long long)p.bt_stride * p.P;
	const int32_t *bt = p.bt + (size_t)b * p.bt_stride;
	int t_begin = split * p.tps;
	const bool kq = KT != KVQ_KV_F16, vq = VT != KVQ_KV_F16;

	/*
	 * Page ids of this warp's tiles k, in a ring of 64 in shared memory
	 * (entry k & 63), filled 32 at a time one batch ahead.  The first
	 * two batches are loaded before the sequence length is known (any
	 * tile of the split that the block table can hold), so that they,
	 * the length and the sink pointer arrive together.
	 */
	int *pids = (int *)(smem + S::PID_OFF) + w * 64;
	int pid0, pid1;
	{
		long long tl = (lim + TT - 1) / TT;
		int t_cap = (int)(t_begin + p.tps < tl ? t_begin + p.tps : tl);
		int n_cap = t_cap - t_begin > w ?
			    (t_cap - t_begin - w + NW - 1) / NW : 0;
		int k0 = lane, k1 = lane + 32;

		pid0 = k0 < n_cap ? bt[(t_begin + w + k0 * NW) >> p.tshift] : 0;
		pid1 = k1 < n_cap ? bt[(t_begin + w + k1 * NW) >> p.tshift] : 0;
	}
	const uint16_t *sinkp = (p.sink && (kq || vq)) ? p.sink[b] : nullptr;
	int len = p.lens[b];

	if (len < 0)
		len = 0;
	if (len > cap)
		len = (int)cap;
	if (len > lim)
		len = (int)lim;
	int n_tiles = (len + TT - 1) / TT;
	int n_active = (n_tiles + p.tps - 1) / p.tps;

	/*
	 * Everything above is the step's own (block table, lengths, sink
	 * pointers: copied before any kernel); pages, sinks and the query
	 * are written by the kernels before, and the output and workspace
	 * may still be read by them.  Meanwhile the warp's first tiles start
	 * into L2 (the new token's row is copied after the wait).
	 */
	{
		typedef fmt<KT, HD> FK;
		typedef fmt<VT, HD> FV;
		int tk = t_begin + w + lane * NW;

		if (lane < N - 1 && tk < n_tiles && tk < t_begin + p.tps) {
			size_t row = (size_t)h * p.P +
				     TT * (tk & ((1 << p.tshift) - 1));
			const uint8_t *kb = p.kp + (size_t)(unsigned)pid0 * p.kpb;
			const uint8_t *vb = p.vp + (size_t)(unsigned)pid0 * p.vpb;

			kvq_prefetch_l2(kb + row * FK::RB, TT * FK::RB);
			kvq_prefetch_l2(vb + row * FV::RB, TT * FV::RB);
			if (FK::SB)
				kvq_prefetch_l2(kb + (size_t)p.hk * p.P * FK::RB +
						row * FK::SB, TT * FK::SB);
			if (FV::SB)
				kvq_prefetch_l2(vb + (size_t)p.hk * p.P * FV::RB +
						row * FV::SB, TT * FV::SB);
		}
	}
	kvq_pdl_wait();
	if (len == 0) {
		if (split == 0)
			for (int i = threadIdx.x; i < nh * HD; i += NW * 32)
				put_out(p, ((size_t)b * p.hq + hq0) * HD + i, 0.0f);
		return;
	}
	if (split >= n_active)
		return;

	int skip = sinkp ? min(p.n_sink, len) : 0;
	int t_end = min(t_begin + p.tps, n_tiles);
	int n_my = t_end - t_begin > w ? (t_end - t_begin - w + NW - 1) / NW : 0;
	int t0 = t_begin + w;
	uint8_t *ring = smem + w * N * S::BYTES;
	lanes L;

	lanes_init<KT, VT, HD>(p, h, (unsigned)(t0 & ((1 << p.tshift) - 1) &
					    (NW - 1)), L);
	pids[lane] = pid0;
	pids[32 + lane] = pid1;
	kvq_syncwarp();

	/* Tile k's copies (zeros past the warp's last tile). */
	auto issue = [&](int k, uint8_t *st) {
		bool ok = k < n_my;
		unsigned pg = ok ? (unsigned)pids[k & 63] : 0u;
		unsigned n = ok ? 16u : 0u;

		if (p.vmask)
			issue_tile<KT, VT, HD, true>(p, L, st, pg,
						     (unsigned)((t0 / NW + k) &
								p.vmask), n);
		else
			issue_tile<KT, VT, HD, false>(p, L, st, pg, 0, n);
	};
	/* Page ids of batch b (tiles 32b..32b+31) into the ring; called
	 * once batch b-2, whose entries they take, has been issued. */
	auto refill = [&](int b) {
		int kn = 32 * b + lane;

		if (kn < n_my)
			kvq_cp_async4(pids + (kn & 63),
				      bt + ((t0 + kn * NW) >> p.tshift));
	};

	/* Split 0's warps share the sinks, position w first; its rows
	 * travel with the first tiles. */
	bool sinks = skip > w && t_begin == 0;
	uint8_t *sbuf = smem + S::SINK_OFF + 512 * w;
	const uint16_t *sk = nullptr, *sv = nullptr;
	int ks = 0, vs = 0;

	if (sinks) {
		size_t pg0 = (unsigned)(w ? bt[0] : pids[0]);

		if (kq) {
			sk = sinkp + (size_t)h * HD;
			ks = p.hk * HD;
		} else {
			sk = (const uint16_t *)(p.kp + pg0 * p.kpb) +
			     (size_t)h * p.P * HD;
			ks = HD;
		}
		if (vq) {
			sv = sinkp + ((size_t)p.n_sink * p.hk + h) * HD;
			vs = p.hk * HD;
		} else {
			sv = (const uint16_t *)(p.vp + pg0 * p.vpb) +
			     (size_t)h * p.P * HD;
			vs = HD;
		}
		sink_copy<HD>(w, sk, sv, ks, vs, sbuf);
	}
#pragma unroll
	for (int s = 0; s < N - 1; s++) {
		issue(s, ring + s * S::BYTES);
		kvq_cp_async_commit();
	}

	/* The query as B fragments: column g is head g (or, with at most 4
	 * heads, head g&3's high (g<4) or low (g>=4) f16 part). */
	unsigned qf[2 * NG][2];
	float kc[NG][4];
	{
		int hd = hilo ? (g & 3) : g;
		bool lo_part = hilo && g >= 4;
		bool ok = hd < nh;
		size_t qo = ((size_t)b * p.hq + hq0 + (ok ? hd : 0)) * HD;

#pragma unroll
		for (int G = 0; G < NG; G++) {
			float v[8], sum = 0.0f;

#pragma unroll
			for (int i = 0; i < 8; i++)
				v[i] = ok ? load_q(p, qo + 32 * G + 8 * t + i) *
					    p.qscale : 0.0f;
			float s1 = 0.0f;

#pragma unroll
			for (int r = 0; r < 2; r++) {
				/* k-pairs of product r: q8 keys adjacent
				 * channels, q4 and f16 keys c, c+4. */
				float x[4];

				if (KT == KVQ_KV_Q8) {
					x[0] = v[4 * r];
					x[1] = v[4 * r + 1];
					x[2] = v[4 * r + 2];
					x[3] = v[4 * r + 3];
				} else {
					x[0] = v[2 * r];
					x[1] = v[2 * r + 4];
					x[2] = v[2 * r + 1];
					x[3] = v[2 * r + 5];
				}
				__half2 h0 = __floats2half2_rn(x[0], x[1]);
				__half2 h1 = __floats2half2_rn(x[2], x[3]);

				if (lo_part) {
					float2 f0 = __half22float2(h0);
					float2 f1 = __half22float2(h1);

					h0 = __floats2half2_rn(x[0] - f0.x, x[1] - f0.y);
					h1 = __floats2half2_rn(x[2] - f1.x, x[3] - f1.y);
				}
				qf[2 * G + r][0] = h2u(h0);
				qf[2 * G + r][1] = h2u(h1);
				sum += h_lo(h2u(h0)) + h_hi(h2u(h0));
				s1 += h_lo(h2u(h1)) + h_hi(h2u(h1));
			}
			/* The bias of column g's group (k-pair class 0 and
			 * 1), then that of this lane's columns 2t, 2t+1. */
			if (KT == KVQ_KV_Q4)
				sum = -(1032.0f * sum + 72.0f * s1);
			else
				sum = -1152.0f * (sum + s1);
			sum += kvq_shfl_xor_f32(sum, 1);
			sum += kvq_shfl_xor_f32(sum, 2);
			kc[G][0] = __uint_as_float(
				kvq_shfl_u32(__float_as_uint(sum), 8 * t));
			kc[G][1] = __uint_as_float(
				kvq_shfl_u32(__float_as_uint(sum), 8 * t + 4));
			kc[G][2] = kc[G][0];
			kc[G][3] = kc[G][1];
		}
	}

	wstate<HD> ws;
#pragma unroll
	for (int i = 0; i < HD / 16; i++)
#pragma unroll
		for (int e = 0; e < 4; e++)
			ws.o[i][e] = 0.0f;
	ws.m[0] = ws.m[1] = -INFINITY;
	ws.th[0] = ws.th[1] = -INFINITY;
	ws.l[0] = ws.l[1] = 0.0f;

	if (sinks)
		sink_pass<KT, VT, HD>(ws, qf, hilo, skip, w, sk, sv, ks, vs, sbuf);

	/*
	 * Tiles k of this warp: [0, k_lo) hold sink positions, [k_hi, n_my)
	 * the sequence's ragged end.  Runs of N full tiles starting at a
	 * multiple of N go through the unrolled loop (stages fixed at compile
	 * time); the others, before and after, through step() with the stage
	 * picked at run time.  Each step issues tile k + N - 1 and commits
	 * one group, so the wait leaves tile k complete.
	 */
	int k_lo = 0, k_hi = n_my;
	{
		int ts = (skip + TT - 1) / TT;

		if (ts > t0)
			k_lo = min(n_my, (ts - t0 + NW - 1) / NW);
		if ((len & (TT - 1)) && n_my &&
		    t0 + (n_my - 1) * NW == n_tiles - 1)
			k_hi = n_my - 1;
		if (k_hi < k_lo)
			k_hi = k_lo;
	}
	auto step = [&](int k) {
		int i = k + N - 1;

		issue(i, ring + (i % N) * S::BYTES);
		if (!(i & 31) && i >= 32)
			refill(i / 32 + 1);
		kvq_cp_async_commit();
		kvq_cp_async_wait<N - 1>();
		kvq_syncwarp();

		const uint8_t *st = ring + (k % N) * S::BYTES;

		if (k >= k_lo && k < k_hi) {
			tile<KT, VT, HD, true>(st, L, qf, kc, hilo, 0, TT,
					       ws);
		} else {
			int tok0 = (t0 + k * NW) * TT;
			int lo = max(0, skip - tok0), hi = min(TT, len - tok0);

			if (lo < hi)
				tile<KT, VT, HD, false>(st, L, qf, kc, hilo,
							lo, hi, ws);
		}
		kvq_syncwarp();
	};
	int k = 0;
	int k_a = min((k_lo + N - 1) / N * N, n_my);

#pragma unroll 1
	for (int ph = 0; ph < 2; ph++) {
		for (int ke = ph ? n_my : k_a; k < ke; k++)
			step(k);
		if (ph)
			break;
		for (; k + N <= k_hi; k += N) {
#pragma unroll
			for (int s = 0; s < N; s++) {
				issue(k + s + N - 1,
				      ring + ((s + N - 1) % N) * S::BYTES);
				kvq_cp_async_commit();
				kvq_cp_async_wait<N - 1>();
				kvq_syncwarp();
				tile<KT, VT, HD, true>(ring + s * S::BYTES, L,
						       qf, kc, hilo, 0, TT,
						       ws);
				kvq_syncwarp();
			}
			/* A batch boundary 32b among this run's issues:
			 * batch b-1 is used up, batch b+1 takes its place. */
			int b1 = (k + 2 * N - 2) >> 5;

			if (b1 != (k + N - 2) >> 5 && b1 >= 1)
				refill(b1 + 1);
		}
	}

	kvq_pdl_trigger();	/* the next kernel may start; it waits for this */

	/* This warp's sums over its tokens; the two f16 parts added. */
#pragma unroll
	for (int m = 4; m < 32; m <<= 1) {
		ws.l[0] += kvq_shfl_xor_f32(ws.l[0], m);
		ws.l[1] += kvq_shfl_xor_f32(ws.l[1], m);
	}
	if (hilo)
#pragma unroll
		for (int i = 0; i < HD / 16; i++)
#pragma unroll
			for (int e = 0; e < 4; e++)
				ws.o[i][e] += kvq_shfl_xor_f32(ws.o[i][e], 2);

	kvq_cp_async_wait<0>();
	__syncthreads();	/* the rings are free: reuse them */
	float *sO = (float *)smem;
	float *sM = sO + NW * NCOL * HD, *sL = sM + NW * NCOL;

	if (!hilo || t < 2) {
#pragma unroll
		for (int e = 0; e < 2; e++) {
			int hd = 2 * t + e;
			float *o = sO + (size_t)(w * NCOL + hd) * HD;

#pragma unroll
			for (int i = 0; i < HD / 16; i++) {
				o[vch<VT, HD>(i, 0, g)] = ws.o[i][e];
				o[vch<VT, HD>(i, 1, g)] = ws.o[i][2 + e];
			}
			if (g == 0) {
				sM[w * NCOL + hd] = ws.m[e];
				sL[w * NCOL + hd] = ws.l[e];
			}
		}
	}
	__syncthreads();

	size_t unit = ((size_t)b * p.hk + h) * p.n_chunks + hc;
	size_t part = unit * p.n_splits + split;

	for (int i = threadIdx.x; i < nh * HD; i += NW * 32) {
		int hd = i / HD, ch = i % HD;
		float M = -INFINITY, o = 0.0f, L2 = 0.0f;

		for (int v = 0; v < NW; v++)
			M = fmaxf(M, sM[v * NCOL + hd]);
		for (int v = 0; v < NW; v++) {
			float mv = sM[v * NCOL + hd];

			if (mv != -INFINITY) {
				float a = exp2f(mv - M);

				o += a * sO[(v * NCOL + hd) * HD + ch];
				L2 += a * sL[v * NCOL + hd];
			}
		}
		if (n_active == 1) {
			put_out(p, ((size_t)b * p.hq + hq0 + hd) * HD + ch,
				L2 > 0.0f ? o / L2 : 0.0f);
		} else {
			p.ws_o[(part * NCOL + hd) * HD + ch] = o;
			if (ch == 0) {
				p.ws_m[part * NCOL + hd] = M;
				p.ws_l[part * NCOL + hd] = L2;
			}
		}
	}
	if (n_active == 1)
		return;

	/* The last block of this sequence and head merges the splits. */
	__syncthreads();
	if (threadIdx.x == 0) {
		__threadfence();
		last = atomicAdd(&p.cnt[unit], 1) == n_active - 1;
	}
	__syncthreads();
	if (!last)
		return;
	__threadfence();

	/*
	 * Thread i sums item i (a head's 4 channels) over the splits, 16
	 * splits' loads in flight at a time; the first 16 are loaded
	 * together with the maxima and sums.
	 */
	constexpr int U = 16;
	constexpr int C4 = HD / 4;
	size_t u0 = unit * p.n_splits;
	float *wa = (float *)smem;			/* [split][head] weights */
	float *wl = wa + MAX_SPLITS * NCOL;		/* [split][head] sums */
	float *hl = wl + MAX_SPLITS * NCOL;		/* [head] 1 / sum */
	const size_t vstep = (size_t)NCOL * HD / 4;
	float4 pre[U];
	int it0 = threadIdx.x;

	if (it0 < nh * C4) {
		const float4 *src = (const float4 *)(p.ws_o + (u0 * NCOL +
					it0 / C4) * HD) + it0 % C4;

#pragma unroll
		for (int v = 0; v < U; v++)
			pre[v] = kvq_ld_cg4(src + min(v, n_active - 1) * vstep);
	}
	for (int i = threadIdx.x; i < n_active * NCOL; i += NW * 32) {
		wa[i] = kvq_ld_cg(&p.ws_m[u0 * NCOL + i]);
		wl[i] = kvq_ld_cg(&p.ws_l[u0 * NCOL + i]);
	}
	__syncthreads();
	/* Warp w: heads w and w + 4; lanes stride over the splits. */
	for (int hd = w; hd < nh; hd += NW) {
		float M = -INFINITY, L2 = 0.0f;

		for (int v = lane; v < n_active; v += 32)
			M = fmaxf(M, wa[v * NCOL + hd]);
#pragma unroll
		for (int m = 16; m; m >>= 1)
			M = fmaxf(M, kvq_shfl_xor_f32(M, m));
		for (int v = lane; v < n_active; v += 32) {
			float mv = wa[v * NCOL + hd];
			float a = mv == -INFINITY ? 0.0f : exp2f(mv - M);

			wa[v * NCOL + hd] = a;
			L2 += a * wl[v * NCOL + hd];
		}
#pragma unroll
		for (int m = 16; m; m >>= 1)
			L2 += kvq_shfl_xor_f32(L2, m);
		if (lane == 0)
			hl[hd] = L2 > 0.0f ? 1.0f / L2 : 0.0f;
	}
	__syncthreads();
	for (int it = it0; it < nh * C4; it += NW * 32) {
		int hd = it / C4, c4 = it % C4;
		const float4 *src = (const float4 *)(p.ws_o + (u0 * NCOL + hd) * HD) + c4;
		float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
		int v0 = 0;

		if (it == it0) {
#pragma unroll
			for (int v = 0; v < U; v++) {
				if (v < n_active) {
					float a = wa[v * NCOL + hd];

					o.x += a * pre[v].x;
					o.y += a * pre[v].y;
					o.z += a * pre[v].z;
					o.w += a * pre[v].w;
				}
			}
			v0 = U;
		}
		for (; v0 < n_active; v0 += U) {
			float4 x[U];

#pragma unroll
			for (int u = 0; u < U; u++)
				x[u] = kvq_ld_cg4(src + min(v0 + u, n_active - 1) *
							vstep);
#pragma unroll
			for (int u = 0; u < U; u++) {
				if (v0 + u < n_active) {
					float a = wa[(v0 + u) * NCOL + hd];

					o.x += a * x[u].x;
					o.y += a * x[u].y;
					o.z += a * x[u].z;
					o.w += a * x[u].w;
				}
			}
		}
		size_t oi = ((size_t)b * p.hq + hq0 + hd) * HD + 4 * c4;
		float r = hl[hd];

		put_out(p, oi, o.x * r);
		put_out(p, oi + 1, o.y * r);
		put_out(p, oi + 2, o.z * r);
		put_out(p, oi + 3, o.w * r);
	}
	if (threadIdx.x == 0)
		p.cnt[unit] = 0;
}

/* --------------------------------------------------------------- host */

typedef void (*kfn)(kparams);

struct kinfo {
	kfn fn;
	int dyn;		/* dynamic shared memory bytes */
	int per_sm;		/* resident blocks per multiprocessor, 0: unknown */
};

/* Index of a page type among f16, q8, q4; -1 for others. */
int tix(int t)
{
	return t == KVQ_KV_F16 ? 0 : t == KVQ_KV_Q8 ? 1 : t == KVQ_KV_Q4 ? 2 : -1;
}

template <int KT, int VT, int HD> kinfo make_info()
{
	kinfo k = { decode_kernel<KT, VT, HD>, stage<KT, VT, HD>::DYN, 0 };

	return k;
}

#define KVQ_DECODE_KINFOS(HD)                                                 \
	{ { make_info<KVQ_KV_F16, KVQ_KV_F16, HD>(),                          \
	    make_info<KVQ_KV_F16, KVQ_KV_Q8, HD>(),                           \
	    make_info<KVQ_KV_F16, KVQ_KV_Q4, HD>() },                         \
	  { make_info<KVQ_KV_Q8, KVQ_KV_F16, HD>(),                           \
	    make_info<KVQ_KV_Q8, KVQ_KV_Q8, HD>(),                            \
	    make_info<KVQ_KV_Q8, KVQ_KV_Q4, HD>() },                          \
	  { make_info<KVQ_KV_Q4, KVQ_KV_F16, HD>(),                           \
	    make_info<KVQ_KV_Q4, KVQ_KV_Q8, HD>(),                            \
	    make_info<KVQ_KV_Q4, KVQ_KV_Q4, HD>() } }

/* [head_dim 64, 128][K type][V type] */
kinfo kinfos[2][3][3] = { KVQ_DECODE_KINFOS(64), KVQ_DECODE_KINFOS(128) };
int n_sms;

/* Shared-memory limit and occupancy of one kernel, once.  -EIO on error. */
int setup(kinfo *k)
{
	int dev, per = 0;

	if (k->per_sm)
		return 0;
	if (!n_sms) {
		if (cudaGetDevice(&dev) != cudaSuccess ||
		    cudaDeviceGetAttribute(&n_sms, cudaDevAttrMultiProcessorCount,
					   dev) != cudaSuccess || n_sms <= 0) {
			n_sms = 0;
			return -EIO;
		}
	}
	if (cudaFuncSetAttribute((const void *)k->fn,
				 cudaFuncAttributeMaxDynamicSharedMemorySize,
				 k->dyn) != cudaSuccess)
		return -EIO;
	if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, k->fn,
							  NW * 32, k->dyn) !=
	    cudaSuccess || per <= 0)
		return -EIO;
	k->per_sm = per;
	return 0;
}

int row_bytes(int t, int d)
{
	return t == KVQ_KV_F16 ? 2 * d : t == KVQ_KV_Q8 ? d : d / 2;
}

int scale_bytes(int t, int d)
{
	return t == KVQ_KV_F16 ? 0 : 2 * (d / 32);
}

/* Checks @a and picks its kernel; -EINVAL / -EOPNOTSUPP. */
int check(const struct kvq_gpu_attn_args *a, kinfo **k)
{
	int ki = tix(a->k_type), vi = tix(a->v_type);
	size_t hp;

	if (!a->n_kv_heads || !a->n_q_heads || a->n_q_heads % a->n_kv_heads ||
	    !a->page_tokens || !a->batch || a->n_sink > a->page_tokens)
		return -EINVAL;
	if ((a->k_type == KVQ_KV_F32 || a->v_type == KVQ_KV_F32) ||
	    ki < 0 || vi < 0)
		return ki < 0 && a->k_type != KVQ_KV_F32 ? -EINVAL :
		       vi < 0 && a->v_type != KVQ_KV_F32 ? -EINVAL :
		       -EOPNOTSUPP;
	if ((a->head_dim != 64 && a->head_dim != 128) || a->page_tokens % TT ||
	    (a->page_tokens / TT) & (a->page_tokens / TT - 1) ||
	    a->batch > 65535 || a->n_kv_heads * ((a->n_q_heads / a->n_kv_heads +
	    NCOL - 1) / NCOL) > 65535)
		return -EOPNOTSUPP;
	hp = (size_t)a->n_kv_heads * a->page_tokens;
	if (a->k_page_bytes < hp * (row_bytes(a->k_type, a->head_dim) +
				    scale_bytes(a->k_type, a->head_dim)) ||
	    a->v_page_bytes < hp * (row_bytes(a->v_type, a->head_dim) +
				    scale_bytes(a->v_type, a->head_dim)) ||
	    a->k_page_bytes % 16 || a->v_page_bytes % 16)
		return -EINVAL;
	if (a->k_page_bytes >= ((size_t)1 << 32) ||
	    a->v_page_bytes >= ((size_t)1 << 32))
		return -EOPNOTSUPP;
	if (a->q_type < 0 || a->q_type > 1 || a->out_type < 0 ||
	    a->out_type > 1)
		return -EINVAL;
	*k = &kinfos[a->head_dim == 128][ki][vi];
	return 0;
}

void make_plan(const struct kvq_gpu_attn_args *a, const kinfo *k, plan *pl)
{
	long long units, n_tiles, cap, ns, tps;

	pl->n_chunks = (int)((a->n_q_heads / a->n_kv_heads + NCOL - 1) / NCOL);
	units = (long long)a->batch * a->n_kv_heads * pl->n_chunks;
	n_tiles = ((long long)a->max_len + TT - 1) / TT;
	if (n_tiles < 1)
		n_tiles = 1;
	/*
	 * One wave of blocks; but at head_dim 64, where that gives a warp 8
	 * tiles or more, two waves of half as many tiles.  Measured on the
	 * H200 in kvqd's decode step (1B shape, q4/q4, 32K): batch 1 +3%, 4
	 * +6%, 16 +28% tokens/s; at 1K (below the threshold) two waves cost
	 * 2%.  At head_dim 128 two waves are slower (bench/gpu_attn.py, q4/q4:
	 * batch 1 at 32K 25 -> 38 us, batch 8 at 8K 35 -> 44 us), so one.
	 */
	cap = (long long)n_sms * k->per_sm;
	ns = cap / units;
	if (ns < 1)
		ns = 1;
	if (a->head_dim == 64 && (n_tiles + ns - 1) / ns >= 8 * NW)
		ns *= 2;
	if (ns > MAX_SPLITS)
		ns = MAX_SPLITS;
	tps = (n_tiles + ns - 1) / ns;
	if (tps < NW)
		tps = NW;
	ns = (n_tiles + tps - 1) / tps;
	pl->n_splits = (int)ns;
	pl->tps = (int)tps;
}

size_t ws_layout(const struct kvq_gpu_attn_args *a, const plan *pl,
		 size_t *off_m, size_t *off_l, size_t *off_o)
{
	size_t units = (size_t)a->batch * a->n_kv_heads * pl->n_chunks;
	size_t parts = units * pl->n_splits;
	size_t o = (units * sizeof(int) + 255) & ~(size_t)255;

	*off_m = o;
	o += (parts * NCOL * sizeof(float) + 255) & ~(size_t)255;
	*off_l = o;
	o += (parts * NCOL * sizeof(float) + 255) & ~(size_t)255;
	*off_o = o;
	o += parts * NCOL * a->head_dim * sizeof(float);
	return o;
}

} /* namespace */

extern "C" size_t kvq_gpu_attn_workspace_bytes(const struct kvq_gpu_attn_args *a)
{
	kinfo *k;
	plan pl;
	size_t om, ol, oo;

	if (check(a, &k) || setup(k))
		return 0;
	make_plan(a, k, &pl);
	return ws_layout(a, &pl, &om, &ol, &oo);
}

extern "C" int kvq_gpu_attn_decode(const struct kvq_gpu_attn_args *a,
				   void *stream)
{
	kinfo *k;
	plan pl;
	kparams p;
	size_t om, ol, oo, need;
	int ret;

	ret = check(a, &k);
	if (ret)
		return ret;
	if (!a->q || !a->out || !a->k_pages || !a->v_pages ||
	    !a->block_table || !a->seq_lens || !a->bt_stride)
		return -EINVAL;
	ret = setup(k);
	if (ret)
		return ret;
	make_plan(a, k, &pl);
	need = ws_layout(a, &pl, &om, &ol, &oo);
	if (!a->workspace || a->workspace_bytes < need)
		return -ENOSPC;

	p.q = a->q;
	p.out = a->out;
	p.q_f16 = a->q_type == KVQ_GPU_F16;
	p.out_f16 = a->out_type == KVQ_GPU_F16;
	p.kp = (const uint8_t *)a->k_pages;
	p.vp = (const uint8_t *)a->v_pages;
	p.kpb = (unsigned)a->k_page_bytes;
	p.vpb = (unsigned)a->v_page_bytes;
	p.bt = a->block_table;
	p.bt_stride = (int)a->bt_stride;
	p.lens = a->seq_lens;
	p.sink = a->n_sink ? a->sink : nullptr;
	p.n_sink = (int)a->n_sink;
	p.hq = (int)a->n_q_heads;
	p.hk = (int)a->n_kv_heads;
	p.gqa = (int)(a->n_q_heads / a->n_kv_heads);
	p.P = (int)a->page_tokens;
	p.tshift = 0;
	while ((TT << p.tshift) < p.P)
		p.tshift++;
	p.vmask = ((1 << p.tshift) - 1) / NW;
	p.qscale = a->scale * LOG2E;
	p.n_splits = pl.n_splits;
	p.tps = pl.tps;
	p.n_chunks = pl.n_chunks;
	p.cnt = (int *)a->workspace;
	p.ws_m = (float *)((uint8_t *)a->workspace + om);
	p.ws_l = (float *)((uint8_t *)a->workspace + ol);
	p.ws_o = (float *)((uint8_t *)a->workspace + oo);

	dim3 grid(pl.n_splits, a->n_kv_heads * pl.n_chunks, a->batch);

	kvq_launch(kvq_pdl_allowed(), k->fn, grid, dim3(NW * 32), k->dyn,
		   (cudaStream_t)stream, p);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}
