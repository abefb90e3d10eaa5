/*
 * attn_decode_tile.h - the device side of attn_decode.cu's fused decode
 * kernel below the kernel itself: page formats and their stage layout,
 * the kernel's parameters, the per-warp online-softmax state, the
 * asynchronous copies of a tile, and the tensor-core score and value
 * products of one tile.  attn_decode.cu (whose header comment describes
 * the work split and the fragment layouts) includes this once; compiled
 * by nvcc or hipcc only.
 */
#ifndef KVQ_ATTN_DECODE_TILE_H
#define KVQ_ATTN_DECODE_TILE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "engine/kvcache.h"

namespace {

constexpr int TT = 16;		/* tokens per tile */
/*
 * Warps per block (two blocks an SM at 128 registers a thread).  8
 * against 4 (four blocks an SM), H200, bench/gpu_attn.py, head_dim 128,
 * q4/q4, us: batch 1 / 4K 11.1 -> 9.7, 1 / 128K 56.3 -> 52.0, 16 / 1K
 * 16.6 -> 12.8, 16 / 128K 761 -> 688; but 1 / 1K 6.9 -> 7.2 and 64 / 1K
 * 29.0 -> 35.1.  kvqd's decode step (head_dim 64) within the runs'
 * spread.  16 warps (one block an SM): a little faster at long
 * contexts, 9.2 us at 1 / 1K (bench/gpu_attn_notes.md).
 */
constexpr int NW = 8;
constexpr int NCOL = 8;		/* query-head columns of one pass */
constexpr int MAX_SPLITS = 256;
constexpr int MERGE_U = 16;	/* partials a thread loads a merge round */
constexpr int CL_MAX = 8;	/* blocks a cluster, at most */
/*
 * The warps' partials in the epilogue: a row of SO_RS floats a warp and
 * head, channel c at so_ch(c) (a word skipped every 32).  A lane's
 * stores of a q4 warp then fall on distinct banks, and at most two to a
 * bank for the other value layouts (vch()); rows of HD words put a q4
 * warp's four heads on one bank (four ways), and the q8 and f16 ones
 * eight or sixteen ways.
 */
template <int HD> constexpr int SO_RS = HD == 128 ? 133 : 67;
__host__ __device__ constexpr int so_ch(int c)
{
	return c + (c >> 5);
}
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LAZY = 8.0f;	/* log2 headroom before a rescale */

/*
 * Per page type and head size (64 or 128): row bytes, scale bytes of a
 * row, and the shared-memory offset of a tile's row r, as K (rk) and as
 * V (rv); for swizzled rows (q4, q8 keys) at(r, c) is the offset of its
 * 16-byte chunk c.  Paddings or swizzles make every fragment read of
 * tile_scores() and tile_values() conflict-free, and a row's offset
 * grows by the same amount (swizzled: by 512 bytes, then one xor) over
 * the rows one copy step of the warp covers (512 / RB rows).
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
/* q8 keys: rows back to back, row r's 16-byte chunk c at c ^ sw(r) (a
 * swizzle of period 1024 bytes at head_dim 128, 512 at 64), as
 * fmt<q4> below; values padded. */
template <int HD> struct fmt<KVQ_KV_Q8, HD> {
	static constexpr int RB = HD, SB = HD / 16;
	static constexpr __host__ __device__ int sw(int r)
	{
		return HD == 128 ? r & 7 : (r >> 1) & 3;
	}
	static constexpr __host__ __device__ int at(int r, int c)
	{
		return r * RB + 16 * (c ^ sw(r));
	}
	static constexpr __host__ __device__ int rk(int r)
	{
		return r * RB;
	}
	static constexpr __host__ __device__ int rv(int r)
	{
		return r * RB + (r >> 1) * 32;
	}
};
/*
 * q4 rows lie back to back, and row r's 16-byte chunk c at chunk c ^
 * sw(r) (an xor swizzle of period 512 bytes at head_dim 128, 256 at 64),
 * so that every ldmatrix read of them is conflict-free without padding.
 */
template <int HD> struct fmt<KVQ_KV_Q4, HD> {
	static constexpr int RB = HD / 2, SB = HD / 16;
	static constexpr __host__ __device__ int sw(int r)
	{
		return HD == 128 ? (r >> 1) & 3 : (r >> 2) & 1;
	}
	static constexpr __host__ __device__ int at(int r, int c)
	{
		return r * RB + 16 * (c ^ sw(r));
	}
	static constexpr __host__ __device__ int rk(int r)
	{
		return r * RB;
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

/* Whether a stage's K (V: @v) rows of type T are swizzled (fmt<>::at). */
template <int T> __host__ __device__ constexpr bool swizzled(bool v)
{
	return T == KVQ_KV_Q4 || (T == KVQ_KV_Q8 && !v);
}

constexpr int align_up(int x, int a)
{
	return (x + a - 1) / a * a;
}

/*
 * One warp's stage: K rows, K scales, V rows, V scales of one tile; for
 * q4/q4 (ROWS1) K rows, V rows, K scales, V scales, the stage a multiple
 * of the rows' swizzle period (AL).  Swizzled rows (q4, q8 keys) start
 * at a multiple of 128 bytes in a stage of such a size, and the stages
 * PAD-aligned in shared memory, so that a warp's 16-byte copies of a
 * run of rows fill whole 128-byte lines (and the xors of
 * issue_tile() and tile_scores() stay inside a row).  H200,
 * bench/gpu_attn.py, head_dim 128, against the padded rows (stages
 * 16-byte aligned), two runs, us: q4/q4 batch 1 / 32K 16.7 -> 16.0-16.1,
 * batch 8 / 32K 83.7-84.2 -> 76.6-77.3, batch 16 / 32K 159.6-159.9 ->
 * 145.9-146.6, batch 64 / 32K 621-634 -> 580-584; q8/q4 batch 16 / 32K
 * 220.3-220.6 -> 206.7-207.2; batch 1 / 1K 0.1 us slower.  The padded
 * rows in aligned stages gained nothing, the swizzled rows in stages
 * 16-byte aligned lost 5-10% (bench/gpu_attn_notes.md).  q8 keys
 * swizzled too, two runs: q8/q4 batch 8 / 32K 109.8-110.2 -> 108.4-108.5,
 * q8/q8 batch 16 / 32K 336 -> 275.
 */
template <int KT, int VT, int HD> struct stage {
	static constexpr bool ROWS1 = KT == KVQ_KV_Q4 && VT == KVQ_KV_Q4;
	static constexpr int AL = HD == 128 ? 512 : 256;
	static constexpr int PAD = 512;
	static constexpr int K_OFF = 0;
	static constexpr int KS_OFF = ROWS1 ? 2 * TT * fmt<KT, HD>::RB :
				      up16(fmt<KT, HD>::rk(TT - 1) +
					   fmt<KT, HD>::RB);
	/* swizzled rows elsewhere: whole 128-byte lines */
	static constexpr bool SWZ = swizzled<KT>(false) || swizzled<VT>(true);
	static constexpr int V_OFF = ROWS1 ? TT * fmt<KT, HD>::RB :
				     align_up(KS_OFF + TT * fmt<KT, HD>::SB,
					      swizzled<VT>(true) ? 128 : 16);
	static constexpr int VS_OFF = ROWS1 ? KS_OFF + TT * fmt<KT, HD>::SB :
				      V_OFF + up16(fmt<VT, HD>::rv(TT - 1) +
						   fmt<VT, HD>::RB);
	static constexpr int BYTES = align_up(VS_OFF + TT * fmt<VT, HD>::SB,
					      ROWS1 ? AL : SWZ ? 128 : 16);
	/*
	 * Stages of a warp's ring: two for the small stages (q4/q4, q8/q4
	 * and the others of at most 2700 bytes), three for the middle ones.
	 * More stages were slower for the small ones (H200,
	 * bench/gpu_attn.py, q4/q4, four stages -> two, us: batch 1 / 32K
	 * 18.29 -> 16.87, batch 8 / 32K 87.9 -> 84.3, batch 16 / 1K 12.1 ->
	 * 9.8; the longest shapes within their spread), as was a fifth stage
	 * before.  q8/q4 at head_dim 128 (3328 bytes), three -> two, two
	 * runs: batch 1 / 32K 20.6-20.8 -> 19.9, batch 8 / 1K 10.2 -> 9.1,
	 * batch 8 / 8K 32.3 -> 31.7; batch 8-64 at 32K-128K within 1.6%.
	 * But q4/q4 at head_dim 64 (a tile of 1152 bytes: half the bytes in
	 * flight at two) takes three: kvqd's decode step (1B shape), two
	 * alternating runs, tokens/s: batch 16 at 32K 5172-5234 -> 5450-5460,
	 * batch 4 at 32K 2602-2631 -> 2677-2683, batch 16 at 1K 9593-9807 ->
	 * 9679-10033, batch 1 within 1%; four: no better.  At head_dim 128
	 * three and four stayed slower (bench/gpu_attn.py, batch 8 / 8K
	 * 23.9-24.1 -> 24.3-24.4 and 25.1 us).
	 */
	static constexpr int N = ROWS1 && HD == 64 ? 3 :
				 BYTES <= 2700 || (KT == KVQ_KV_Q8 &&
						   VT == KVQ_KV_Q4) ? 2 :
				 BYTES <= 4100 ? 3 : 2;
	static constexpr int SINK_OFF = NW * N * BYTES;	/* [NW][512] */
	static constexpr int PID_OFF = SINK_OFF + NW * 512;	/* [NW][64] */
	/* The query's fragments and biases: [HD/32][32] uint4, float2. */
	static constexpr int QF_OFF = PID_OFF + NW * 64 * 4;
	/* q8 and q4 keys: the integer query's, [HD/32][32] uint2, float */
	static constexpr int QI_OFF = QF_OFF + HD / 32 * 32 * 24;
	static constexpr int SMEM = QI_OFF +
				    (KT != KVQ_KV_F16 ? HD / 32 * 32 * 16 : 0);
	/* the warps' partials, maxima and sums (decode_kernel's epilogue) */
	static constexpr int MERGE = NW * NCOL * SO_RS<HD> * 4 +
				     2 * NW * NCOL * 4;
	/*
	 * CM: the partials the cluster's blocks push here (decode_kernel's
	 * epilogue), beyond everything the block itself uses: the items of
	 * this block's slice from each rank, then each rank's maxima and
	 * sums of every head.
	 */
	static constexpr int RCV_OFF = SMEM > MERGE ? SMEM : MERGE;
	static constexpr int RCV = (NCOL * HD + CL_MAX) * 4 +
				   2 * CL_MAX * NCOL * 4;
	/* and room to align the start to PAD */
	static constexpr int DYN = RCV_OFF + PAD;
	static constexpr int DYN_CM = RCV_OFF + RCV + PAD;
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
	int cl;			/* blocks a cluster: a sequence's splits */
	int *cnt;		/* [unit] */
	float *ws_m, *ws_l, *ws_o;
	/* The new rows to append first (kvq_gpu_attn_args.append), or NULL:
	 * [batch][hk * HD] K (unrotated) and V, f16 or f32; their rotation. */
	const void *nk, *nv;
	int n_f16, nrope, nneox;
	const float *ncs;	/* [batch][nrope / 2][2] (required with nrope) */
};

/* Per-warp online-softmax state; lane 4g+t owns query columns 2t, 2t+1
 * (with at most 4 heads both parts of head t: m[0], l[0] are head t's,
 * and its output is o's two columns added). */
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
	/* With hilo a lane's columns are both parts of head t: its values
	 * go to column 2t only. */
	float own1 = hilo ? 0.0f : 1.0f;

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
				acc += kvq_shfl_xor_f32(acc, 4);
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
				float x0 = (c & 1) ? h_hi(vu[c >> 1]) :
						     h_lo(vu[c >> 1]);
				float x1 = (d & 1) ? h_hi(vu[d >> 1]) :
						     h_lo(vu[d >> 1]);

				st.o[i][0] = st.o[i][0] * al[0] + pr[0] * x0;
				st.o[i][1] = st.o[i][1] * al[1] +
					     own1 * pr[1] * x0;
				st.o[i][2] = st.o[i][2] * al[0] + pr[0] * x1;
				st.o[i][3] = st.o[i][3] * al[1] +
					     own1 * pr[1] * x1;
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

/* Offset of row @r's 16-byte chunk @c in a stage's K (V: @v) rows. */
template <int T, int HD>
__host__ __device__ constexpr int chunk_at(bool v, int r, int c)
{
	if constexpr (T != KVQ_KV_F16)
		if (swizzled<T>(v))
			return fmt<T, HD>::at(r, c);
	return (v ? fmt<T, HD>::rv(r) : fmt<T, HD>::rk(r)) + 16 * c;
}

/*
 * A warp's copy step j covers rows 32 / (RB / 16) * j on: lane l's chunk
 * there is at its step-0 offset xor step_xor(j), plus step_add(j), the
 * same two constants for every lane (checked by step_ok()).  Swizzled
 * rows: 512 j and the swizzle's change; padded rows: the rows' offset.
 */
template <int T, int HD>
__host__ __device__ constexpr int step_xor(bool v, int j)
{
	return swizzled<T>(v) ?
	       chunk_at<T, HD>(v, 32 / (fmt<T, HD>::RB / 16) * j, 0) - 512 * j :
	       0;
}

template <int T, int HD>
__host__ __device__ constexpr int step_add(bool v, int j)
{
	return swizzled<T>(v) ? 512 * j :
	       chunk_at<T, HD>(v, 32 / (fmt<T, HD>::RB / 16) * j, 0) -
	       chunk_at<T, HD>(v, 0, 0);
}

template <int T, int HD>
__host__ __device__ constexpr bool step_ok(bool v)
{
	constexpr int CK = fmt<T, HD>::RB / 16;

	for (int j = 0; j < fmt<T, HD>::RB / 32; j++)
		for (int l = 0; l < 32; l++)
			if (chunk_at<T, HD>(v, 32 / CK * j + l / CK, l % CK) !=
			    ((chunk_at<T, HD>(v, l / CK, l % CK) ^
			      step_xor<T, HD>(v, j)) + step_add<T, HD>(v, j)))
				return false;
	return true;
}

struct lanes {
	unsigned ck, cv, cs;		/* copy sources within a page */
	int dk, dv, ds;			/* copy destinations */
	int rk, rks, rv, rvs;		/* fragment reads */
	int kx;		/* q8 keys: group G's bytes at rk + (32 G ^ kx) */
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

	L.dk = S::K_OFF + chunk_at<KT, HD>(false, lane / ck, lane % ck);
	L.dv = S::V_OFF + chunk_at<VT, HD>(true, lane / cv, lane % cv);
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
	 * are an xor of 32 away.  A q8 key lane reads 8 bytes at 32 G + 8 t
	 * of row g: chunk 2 G + (t >> 1), half t & 1. */
	int mrow = (lane & 7) + 8 * ((lane >> 3) & 1), mgrp = lane >> 4;

	if (KT == KVQ_KV_Q4)
		L.rk = S::K_OFF + chunk_at<KT, HD>(false, mrow, mgrp);
	else if (KT == KVQ_KV_Q8)
		L.rk = S::K_OFF + FK::rk(g) + 8 * (t & 1);
	else
		L.rk = S::K_OFF + FK::rk(g) + 16 * t;
	L.kx = 0;
	if constexpr (KT == KVQ_KV_Q8)
		L.kx = 16 * ((t >> 1) ^ FK::sw(g));
	L.rks = S::KS_OFF + FK::SB * g;
	if (VT == KVQ_KV_Q4) {
		L.rv = S::V_OFF + chunk_at<VT, HD>(true, mrow, mgrp);
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
	static_assert(stage<KT, VT, HD>::K_OFF % 128 == 0 &&
		      (!swizzled<VT>(true) ||
		       stage<KT, VT, HD>::V_OFF % 128 == 0),
		      "swizzled rows start a 128-byte line: the xors stay in it");
	static_assert(step_ok<KT, HD>(false) && step_ok<VT, HD>(true),
		      "a copy step: one xor and one add for every lane");
#pragma unroll
	for (int j = 0; j < FK::RB / 32; j++)
		kvq_cp_async16_n(st + ((L.dk ^ step_xor<KT, HD>(false, j)) +
				       step_add<KT, HD>(false, j)),
				 ks + 512 * j, n);
	if (C::NS && lane < C::NS)
		kvq_cp_async16_n(st + L.ds, ss, n);
#pragma unroll
	for (int j = 0; j < FV::RB / 32; j++)
		kvq_cp_async16_n(st + ((L.dv ^ step_xor<VT, HD>(true, j)) +
				       step_add<VT, HD>(true, j)),
				 vs + 512 * j, n);
}

/*
 * Scores of the tile's tokens g and g+8 for query columns 2t, 2t+1
 * (scaled, base 2), from stage @st.  Quantized keys enter the products
 * as exact biased integers (q4: 1024 + n or 64 + n, q8: 1152 + q); @kc
 * holds each group's bias times the column's query to start from, as
 * the accumulator fragment (columns 2t, 2t+1 of rows g and g+8).
 */
template <int KT, int VT, int HD, bool IQ>
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
	/* q8: rows g and g+8's 8 bytes of group G (channels 32G+8t..) */
	auto q8_rows = [&](int G, uint2 &r0, uint2 &r1) {
		int o = 32 * G ^ L.kx;

		r0 = *(const uint2 *)(kr + o);
		r1 = *(const uint2 *)(kr + o + R8);
	};

	if (KT == KVQ_KV_Q4) {
		kvq_ldsm4(kx, st + L.rk);
		if (NG == 4)
			kvq_ldsm4(kx + 4 * (NG / 4), st + (L.rk ^ 32));
	}
	if (IQ) {
		/*
		 * Keys against the integer query (query_int8()): one exact
		 * integer product a group.  q8: the stored bytes as they are
		 * (a lane's channels 32G+8t..+3 and +4..+7 are its k 4t.. and
		 * 16+4t..).  q4: each nibble as a signed byte 16 * (n - 8)
		 * (its high half xor 8): a word's even channels 8t+2j are k
		 * 4t+j, its odd ones k 16+4t+j.  qf[G] is the group's B
		 * fragment.  Columns 2t, 2t+1 are head t's hi and lo parts:
		 * 254 hi + lo is exact in int32 (at most 32 * 128 * 127 *
		 * 255), so each group takes one conversion and one scaling a
		 * token, and kc[0][0] (head t's factor) comes last.  s[0] and
		 * s[1] are then both token g's score, s[2] and s[3] token
		 * g+8's.
		 */
#pragma unroll
		for (int G = 0; G < NG; G++) {
			unsigned a[4];
			int c[4];

			if (KT == KVQ_KV_Q4) {
				unsigned w0 = kx[2 * G], w1 = kx[2 * G + 1];

				a[0] = kvq_and_xor(w0 << 4, 0xf0f0f0f0u,
						   0x80808080u);
				a[1] = kvq_and_xor(w1 << 4, 0xf0f0f0f0u,
						   0x80808080u);
				a[2] = kvq_and_xor(w0, 0xf0f0f0f0u, 0x80808080u);
				a[3] = kvq_and_xor(w1, 0xf0f0f0f0u, 0x80808080u);
			} else {
				uint2 r0, r1;

				q8_rows(G, r0, r1);
				a[0] = r0.x;
				a[1] = r1.x;
				a[2] = r0.y;
				a[3] = r1.y;
			}
			kvq_mma_s8_16832(c, a, qf[G]);
			s[0] += sg0[G] * (float)(254 * c[0] + c[1]);
			s[2] += sg1[G] * (float)(254 * c[2] + c[3]);
		}
		s[0] *= kc[0][0];
		s[2] *= kc[0][0];
		s[1] = s[0];
		s[3] = s[2];
		return;
	}
	const unsigned e1024 = 0x64646464u;	/* q8: bytes b -> 1024 + b */

#pragma unroll
	for (int G = 0; G < NG; G++) {
		unsigned e0[4], e1[4], a[4];
		float c[4];

		if (KT == KVQ_KV_Q4) {
			q4_pairs_biased(kx[2 * G], e0);
			q4_pairs_biased(kx[2 * G + 1], e1);
		} else {
			/* q8: adjacent channels, 1152 + q after the xor. */
			uint2 r0, r1;

			q8_rows(G, r0, r1);
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
	/* Groups 2 and 3 (head_dim 128): chunks 2 and 3 of the rows, an xor
	 * of 32 away in the swizzled rows (128-byte aligned). */
	int vo = KT == KVQ_KV_Q4 ? L.rk + (S::V_OFF - S::K_OFF) : L.rv;
	const uint8_t *vb = st + vo;
	const __half2 b_lo = u2h(0xe408e408u);	/* -1032 */
	const __half2 b_hi = u2h(0xd480d480u);	/* -72 */
	unsigned x[2 * NG], sp[NG], sq[NG];

	kvq_ldsm4_t(x, vb);
	if (NG == 4)
		kvq_ldsm4_t(x + 4 * (NG / 4), st + (vo ^ 32));

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
template <int KT, int VT, int HD, bool IQ, bool FULL>
__device__ __forceinline__ void tile(const uint8_t *st, const lanes &L,
				     const unsigned qf[][2],
				     const float kc[][4], bool hilo, int lo,
				     int hi, wstate<HD> &ws)
{
	int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	float s4[4];

	tile_scores<KT, VT, HD, IQ>(st, L, qf, kc, s4);
	/* With at most 4 heads (hilo; always with IQ, where tile_scores()
	 * has added them) columns 2t and 2t+1 are head t's two parts. */
	constexpr bool H = IQ;
	if (!IQ && hilo) {
		s4[0] = s4[1] = s4[0] + s4[1];
		s4[2] = s4[3] = s4[2] + s4[3];
	}
	if (!FULL) {
		if (!(g >= lo && g < hi))
			s4[0] = s4[1] = -INFINITY;
		if (!(g + 8 >= lo && g + 8 < hi))
			s4[2] = s4[3] = -INFINITY;
	}

	float mt0 = fmaxf(s4[0], s4[2]), mt1 = fmaxf(s4[1], s4[3]);

	/* Rare: some score exceeds its column's maximum by more than
	 * LAZY; only then the tile's column maxima are reduced. */
	if (kvq_any(mt0 > ws.th[0] || (!H && mt1 > ws.th[1]))) {
#pragma unroll
		for (int m = 4; m < 32; m <<= 1) {
			mt0 = fmaxf(mt0, kvq_shfl_xor_f32(mt0, m));
			if (!H)
				mt1 = fmaxf(mt1, kvq_shfl_xor_f32(mt1, m));
		}
		float n0 = fmaxf(ws.m[0], mt0), n1 = H ? n0 : fmaxf(ws.m[1], mt1);
		float a0 = ws.m[0] == -INFINITY ? 0.0f :
			   kvq_exp2_fast(ws.m[0] - n0);
		float a1 = H ? a0 : ws.m[1] == -INFINITY ? 0.0f :
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
	float p2 = kvq_exp2_fast(s4[2] - ws.m[0]);
	float p1 = H ? p0 : kvq_exp2_fast(s4[1] - ws.m[1]);
	float p3 = H ? p2 : kvq_exp2_fast(s4[3] - ws.m[1]);

	ws.l[0] += p0 + p2;
	ws.l[1] += p1 + p3;

	/*
	 * P^T's B fragment: column g of tokens 2t, 2t+1 (and +8) from lanes
	 * 8t + (g >> 1) and 8t + 4 + (g >> 1).  Such a lane (t' = g >> 1)
	 * sends one f16 pair a token: p of its columns 2t', 2t'+1, or with
	 * hilo the high and low f16 parts of p of head t'; the receiver
	 * takes the half of column g.
	 */
	__half2 hg = __floats2half2_rn(p0, p2);
	unsigned pk0, pk1;

	if (hilo) {
		float2 f = __half22float2(hg);
		unsigned lw = h2u(__floats2half2_rn(p0 - f.x, p2 - f.y));

		pk0 = __byte_perm(h2u(hg), lw, 0x5410);
		pk1 = __byte_perm(h2u(hg), lw, 0x7632);
	} else {
		pk0 = h2u(__floats2half2_rn(p0, p1));
		pk1 = h2u(__floats2half2_rn(p2, p3));
	}
	int tsrc = g >> 1;
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

} /* namespace */

#endif /* KVQ_ATTN_DECODE_TILE_H */
