/*
 * attn_decode.cu - fused split-KV decode attention over kvqd's paged,
 * quantized KV cache (f16, q8 and q4 pages, any K/V pair).
 *
 * Why this file exists: a decode step reads every KV page of every
 * sequence once, so the bytes of the pages are the speed.  This kernel
 * reads the pages in their stored format and dequantizes in registers;
 * q4 pages are 3.56x smaller than f16 ones.  Head sizes 64 and 128 (a
 * template parameter: 2 or 4 scale groups a row); others go to
 * attn_split.cu.  This file holds the kernel, its plan and its launch;
 * the page formats, the tile copies and the per-tile products are in
 * attn_decode_tile.h.
 *
 * Work split.  A block is (sequence, KV head, split): it owns a run of
 * 16-token tiles of one sequence and serves every query head of that KV
 * head (GQA), so each page is read once.  Each of its 8 warps streams its
 * own tiles through a private ring of shared-memory stages filled with
 * 16-byte asynchronous copies (several tiles in flight per warp), keeps
 * its own online-softmax state, and the warps are merged at the end.  The
 * number of splits is chosen so that a batch of one fills the GPU; when a
 * sequence has several splits, the last block to finish (an atomic
 * counter in the workspace) merges their partial results, so one launch
 * does everything.  On sm_90, where the grid is one wave, a sequence's
 * splits (at most 8) may run as one thread-block cluster instead: each
 * block pushes its partial of the others' slices of the output into their
 * shared memory, and after one cluster barrier combines its own.  On sm_90
 * the kernel is also a programmatic dependent: it reads the block table
 * and starts its first tiles into L2 while the kernels before it end.
 *
 * Arithmetic.  Scores and values go through 16x8x16 f16 matrix products
 * with f32 accumulation.  Keys: the tile's 16 tokens are the rows, the
 * query heads the 8 columns.  Where a KV head serves at most 4 query heads
 * (the usual GQA of 4 or less), q8 and q4 keys go through 16x8x32 int8
 * products instead (IQ): the query is held as two signed bytes a channel
 * (high and low part, 2^-16 of the head's largest value; query_int8()),
 * q8 codes enter as stored, a q4 code as the byte 16 (n - 8) (one shift
 * and one and-xor a word), each group's int32 sum is scaled in f32 and
 * the column factors come last; a q4 group then takes 6 logic
 * instructions and one product instead of 10 and two.  Otherwise key
 * codes enter as exact biased integers
 * made by one and-or (q4: 1024+n for low nibbles, 64+n for high ones;
 * q8: 1152+q from one byte permute with the exponent byte; or the stored
 * f16), one product per 32-channel scale group with the group's bias
 * times the query as the accumulator's initial value, and the group's
 * scale is applied to the f32 partial score.  The bias cancels in f32
 * (relative rounding about 2^-24 of 1032 * |q| for q4), so scores carry
 * no f16 rounding.  The query is pre-scaled by scale*log2(e) and split
 * into a high and a low f16 half; with at most 4 query heads per KV head
 * the two halves fill the 8 columns, so the query is exact to about
 * 2^-22.  Those columns are interleaved (column 2h: head h's high part,
 * 2h+1: its low part), so that the lane holding a head's scores holds
 * both parts and adds them itself (integer keys: 254 hi + lo in int32):
 * no shuffles a tile, and one softmax column a lane.  Values: V^T is the
 * left operand (channels x tokens), P^T the right operand, again split
 * into high and low f16 halves in interleaved columns.  q4 values
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
 * scales; q4 rows and q8 key rows lie back to back with their 16-byte
 * chunks swizzled, f16 rows and q8 value rows are padded, so that every
 * fragment read is free of bank conflicts and sits at a per-lane base
 * plus a constant or an xor (q4 rows are read with ldmatrix; the layouts
 * depend on the head size); the stages are aligned so that a warp's
 * copies of swizzled rows fill whole 128-byte lines, and the tile loop
 * is unrolled over the stages.  A tile's copies cost one wide
 * multiply per pool; page ids come from a per-warp ring in shared
 * memory, refilled 32 at a time.  The query's fragments are made once a
 * block (warp G makes group G's for every lane) and read from shared
 * memory by all warps; its loads are issued first after the dependent-
 * launch wait, so that their latency passes while the tile copies are
 * queued.
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
#include "kernels/attn_decode_tile.h"
#include "kernels/kv_put.h"
#include "engine/kvcache.h"

namespace {

struct plan {
	int n_splits;		/* grid.x */
	int tps;		/* most tiles a split (a sequence takes
				 * fewer: decode_kernel()) */
	int n_chunks;		/* query-head passes of 8 per KV head */
	int cl;			/* blocks a cluster */
	struct kinfo *kc;	/* cl > 1: the kernel that merges in them */
};

/* The query's elements @i..@i+7 (@i a multiple of 8) as stored, in one
 * (f16) or two (f32) 16-byte loads; zeros where !@ok.  The words stay
 * raw until q_floats(), so that nothing waits on the loads before the
 * tile copies are queued. */
__device__ __forceinline__ void load_q8(const kparams &p, bool ok, size_t i,
					uint4 r[2])
{
	const uint4 z = make_uint4(0u, 0u, 0u, 0u);

	if (!ok) {
		r[0] = r[1] = z;
	} else if (p.q_f16) {
		r[0] = *(const uint4 *)((const __half *)p.q + i);
		r[1] = z;
	} else {
		const uint4 *f = (const uint4 *)((const float *)p.q + i);

		r[0] = f[0];
		r[1] = f[1];
	}
}

/* load_q8()'s words as 8 floats. */
__device__ __forceinline__ void q_floats(const kparams &p, const uint4 r[2],
					 float x[8])
{
	unsigned w8[8] = { r[0].x, r[0].y, r[0].z, r[0].w,
			   r[1].x, r[1].y, r[1].z, r[1].w };

#pragma unroll
	for (int j = 0; j < 8; j++)
		x[j] = p.q_f16 ? ((j & 1) ? h_hi(w8[j >> 1]) : h_lo(w8[j >> 1])) :
				 __uint_as_float(w8[j]);
}

/*
 * Group @G of the query (channels 32G..32G+31; @qr: this lane's 8 of
 * them as load_q8() read them, for column g's head) as this lane's B
 * fragments of the two score products of the group (*@qo: products 2G,
 * 2G+1, two words each) and the group's bias times the query for this
 * lane's columns 2t, 2t+1 (*@ko).  Columns: with at most 4 heads
 * (@hilo) column g is head g >> 1's high (g even) or low (g odd) f16
 * part, so that a lane's columns 2t, 2t+1 are both parts of head t;
 * else column g is head g.  The whole warp calls it (shuffles).
 */
template <int KT, int HD>
__device__ __forceinline__ void query_group(const kparams &p, bool hilo,
					    const uint4 qr[2], uint4 *qo,
					    float2 *ko)
{
	int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	bool lo_part = hilo && (g & 1);
	float v[8], sum = 0.0f, s1 = 0.0f;
	unsigned f[2][2];

	q_floats(p, qr, v);
#pragma unroll
	for (int i = 0; i < 8; i++)
		v[i] *= p.qscale;
#pragma unroll
	for (int r = 0; r < 2; r++) {
		/* k-pairs of product r: q8 keys adjacent channels, q4 and
		 * f16 keys c, c+4. */
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
		f[r][0] = h2u(h0);
		f[r][1] = h2u(h1);
		sum += h_lo(h2u(h0)) + h_hi(h2u(h0));
		s1 += h_lo(h2u(h1)) + h_hi(h2u(h1));
	}
	/* The bias of column g's group (k-pair class 0 and 1), then that
	 * of this lane's columns 2t, 2t+1. */
	if (KT == KVQ_KV_Q4)
		sum = -(1032.0f * sum + 72.0f * s1);
	else
		sum = -1152.0f * (sum + s1);
	sum += kvq_shfl_xor_f32(sum, 1);
	sum += kvq_shfl_xor_f32(sum, 2);
	*qo = make_uint4(f[0][0], f[0][1], f[1][0], f[1][1]);
	*ko = make_float2(
		__uint_as_float(kvq_shfl_u32(__float_as_uint(sum), 8 * t)),
		__uint_as_float(kvq_shfl_u32(__float_as_uint(sum), 8 * t + 4)));
}

/*
 * The query for q8 and q4 keys on integer products (at most 4 heads a
 * block): each head's pre-scaled values v as sigma * (hi + lo / 254), hi
 * and lo signed bytes, sigma = max |v| / 127 over the head (v to about
 * 2^-16 of its largest value).  Column g of group @G's B fragment is head
 * g >> 1's hi (g even) or lo (g odd) bytes, so that a lane's score
 * columns 2t, 2t+1 are the two parts of head t (tile_scores() adds them
 * as 254 hi + lo); lane t holds channels 32G+8t.. in the keys' order: q8
 * +0..+3 then +4..+7, q4 the even ones then the odd ones (*@qo).  @qr:
 * this lane's 8 channels of every group of column g's head, as
 * load_q8() read them.  *@ko: head t's factor, sigma / 254, over 16 for
 * q4 (its codes enter as 16 (n - 8)).  The whole warp calls it.
 */
template <int KT, int HD>
__device__ __forceinline__ void query_int8(const kparams &p, int G,
					   const uint4 qr[][2], uint2 *qo,
					   float *ko)
{
	int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	float v[8], mx = 0.0f;
	unsigned wd[2] = { 0u, 0u };

#pragma unroll
	for (int GG = 0; GG < HD / 32; GG++) {
		float x[8];

		q_floats(p, qr[GG], x);
#pragma unroll
		for (int i = 0; i < 8; i++) {
			x[i] *= p.qscale;
			mx = fmaxf(mx, fabsf(x[i]));
			if (GG == 0 || GG == G)
				v[i] = x[i];
		}
	}
	mx = fmaxf(mx, kvq_shfl_xor_f32(mx, 1));
	mx = fmaxf(mx, kvq_shfl_xor_f32(mx, 2));
	float inv = mx > 0.0f ? 127.0f / mx : 0.0f, sig = mx / 127.0f;

#pragma unroll
	for (int i = 0; i < 8; i++) {
		float y = v[i] * inv, hi = rintf(y);
		int c = (g & 1) ? (int)rintf((y - hi) * 254.0f) : (int)hi;

		c = max(-127, min(127, c));
		if (KT == KVQ_KV_Q4)
			wd[i & 1] |= (unsigned)(c & 0xff) << (8 * (i >> 1));
		else
			wd[i >> 2] |= (unsigned)(c & 0xff) << (8 * (i & 3));
	}
	*qo = make_uint2(wd[0], wd[1]);
	*ko = __uint_as_float(kvq_shfl_u32(__float_as_uint(sig), 8 * t)) *
	      ((KT == KVQ_KV_Q4 ? 1.0f / 16.0f : 1.0f) / 254.0f);
}

/*
 * Partials held one a lane in aligned groups of G lanes, each with its
 * maximum @m (base 2; -inf: empty) and sum @l: *@M becomes the largest
 * of @M and the group's maxima, *@L the group's sum of exp2(m - *@M) * l,
 * and the lane's weight exp2(m - *@M) is returned.
 */
template <int G>
__device__ __forceinline__ float group_weigh(float m, float l, float *M,
					     float *L)
{
	float mx = fmaxf(*M, m), a, lw;

#pragma unroll
	for (int s = 1; s < G; s <<= 1)
		mx = fmaxf(mx, kvq_shfl_xor_f32(mx, s));
	a = m == -INFINITY ? 0.0f : exp2f(m - mx);
	lw = a * l;
#pragma unroll
	for (int s = 1; s < G; s <<= 1)
		lw += kvq_shfl_xor_f32(lw, s);
	*M = mx;
	*L = lw;
	return a;
}

/*
 * Sequence @b's new K and V rows of KV head @h (p.nk, p.nv) stored at
 * position @pos as the append kernel stores them (kvq_put_head()), by the
 * one warp that reads that position; @buf: 2 * HD floats of its ring,
 * free until its first copies.
 */
template <int KT, int VT, int HD>
__device__ __forceinline__ void append_new(const kparams &p, int b, int h,
					int pos, float *buf)
{
	int lane = threadIdx.x & 31;
	size_t kvd = (size_t)p.hk * HD, in = (size_t)b * kvd + (size_t)h * HD;
	size_t page = (unsigned)p.bt[(size_t)b * p.bt_stride + pos / p.P];
	size_t r = (size_t)h * p.P + pos % p.P;
	uint16_t *sink = p.sink && pos < p.n_sink ?
			 (uint16_t *)p.sink[b] : nullptr;

	for (int c = lane; c < 2 * HD; c += 32) {
		const void *src = c < HD ? p.nk : p.nv;
		size_t i = in + (c < HD ? c : c - HD);

		buf[c] = p.n_f16 ? __half2float(((const __half *)src)[i]) :
				   ((const float *)src)[i];
	}
	kvq_syncwarp();
#pragma unroll 1
	for (int half = 0; half < 2; half++) {
		int type = half ? VT : KT;
		uint8_t *pg = (uint8_t *)(half ? p.vp : p.kp) +
			      page * (half ? p.vpb : p.kpb);
		int rb = kvq_row_bytes(type, HD);
		kvq_put_rope rr;
		kvq_put_dst dst;

		rr.dim = half ? 0 : p.nrope;
		rr.neox = p.nneox != 0;
		rr.cs = p.ncs ? p.ncs + (size_t)b * p.nrope : nullptr;
		rr.base = 0.0f;		/* angles from the table only */
		rr.pos = pos;
		rr.ctr = nullptr;
		dst.type = type;
		dst.data = pg + r * rb;
		dst.scales = (uint16_t *)(pg + (size_t)p.hk * p.P * rb) +
			     r * (HD / 32);
		dst.sink = sink ? sink + ((size_t)half * p.n_sink + pos) * kvd +
				  (size_t)h * HD : nullptr;
		kvq_put_head<false>(buf + half * HD, HD, 32, rr, dst);
	}
	kvq_syncwarp();
}

/*
 * A split's fewest tiles, for @n_tiles over at most @ns splits (the
 * plan's bound, or a sequence's own length): two a warp at head_dim 64,
 * where a short context has more splits than work for them; one at 128,
 * or two where one would leave more than MERGE_U splits (a second round
 * of the merge).  H200, head_dim 128, q4/q4, bench/gpu_attn.py, us:
 * two a warp everywhere lost where one gives 16 splits or fewer (batch 1
 * / 1K 5.35 -> 5.87, 1 / 2K 5.43 -> 6.02); this rule, against one a
 * warp, batch 1 / 4K 6.99 -> 6.15 (32 -> 16 splits), 1K-2K and 8K-32K
 * unchanged; kvqd's decode step (dim 2048, 16 / 4 heads), batch 1 / 8K
 * 1107 -> 1125 tokens/s (bench/gpu_attn_notes.md, "Two tiles a warp at
 * head_dim 128 past 16 splits").
 */
template <int HD>
__host__ __device__ __forceinline__ int mt_min(long long n_tiles,
					       long long ns)
{
	long long t = (n_tiles + ns - 1) / ns;

	if (HD == 64)
		return 2 * NW;
	if (t < NW)
		t = NW;
	return (n_tiles + t - 1) / t > MERGE_U ? 2 * NW : NW;
}

/*
 * One block: sequence blockIdx.z, KV head blockIdx.y / n_chunks (query
 * heads of pass blockIdx.y % n_chunks), tiles [split * tps, + tps), tps
 * from the sequence's length.
 * IQ: q8 and q4 keys through integer products against query_int8()'s
 * query (at most 4 query heads a KV head).  FR: the new rows (p.nk) are
 * appended first; the kernels without it are those of before it, whose
 * calls it would slow by 0.5-3% (its code and registers).
 */
template <int KT, int VT, int HD, bool IQ, bool CM, bool FR>
__global__ void __launch_bounds__(NW * 32, 16 / NW) decode_kernel(kparams p)
{
	typedef stage<KT, VT, HD> S;
	constexpr int NG = HD / 32;
	constexpr int N = S::N;
	extern __shared__ __align__(16) uint8_t smem_raw[];
	uint8_t *smem = smem_raw + kvq_smem_pad(smem_raw, S::PAD);
	__shared__ int last;
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	int g = lane >> 2, t = lane & 3;
	int split = blockIdx.x, b = blockIdx.z;
	int h = blockIdx.y / p.n_chunks, hc = blockIdx.y % p.n_chunks;
	int hq0 = h * p.gqa + hc * NCOL;
	int nh = min(NCOL, p.gqa - hc * NCOL);
	bool hilo = IQ || nh <= 4;	/* IQ: at most 4 heads, known here */
	long long cap = (long long)p.n_splits * p.tps * TT;
	long long lim = (long long)p.bt_stride * p.P;
	const int32_t *bt = p.bt + (size_t)b * p.bt_stride;
	const bool kq = KT != KVQ_KV_F16, vq = VT != KVQ_KV_F16;

	if (CM)		/* started: the others may push to this block */
		kvq_cluster_arrive(false);
	const uint16_t *sinkp = (p.sink && (kq || vq)) ? p.sink[b] : nullptr;
	int len = p.lens[b], len_in = len;

	if (len < 0)
		len = 0;
	if (len > cap)
		len = (int)cap;
	if (len > lim)
		len = (int)lim;
	int n_tiles = (len + TT - 1) / TT;
	/*
	 * The plan's split count is for the step's longest length bucket
	 * (a power of two: up to twice the sequence); the sequence's tiles
	 * are dealt over those splits by its own length, at least mt_min()
	 * a split (the plan's rule) and at most p.tps.  H200, kvqd's
	 * decode step (1B shape, head_dim 64), against the plan's tiles a
	 * split: bench/gpu_decode_notes.md, "Tiles a split by the
	 * sequence's own length".
	 */
	int tps = (n_tiles + p.n_splits - 1) / p.n_splits;

	int mt = mt_min<HD>(n_tiles, p.n_splits);

	if (tps < mt)
		tps = mt;
	if (tps > p.tps)
		tps = p.tps;
	int t_begin = split * tps;
	/*
	 * Page ids of this warp's tiles k, in a ring of 64 in shared memory
	 * (entry k & 63), filled 32 at a time one batch ahead.  The first
	 * two batches are loaded with the sink pointer, before the wait.
	 */
	int *pids = (int *)(smem + S::PID_OFF) + w * 64;
	int pid0, pid1;
	{
		int t_cap = min(t_begin + tps, n_tiles);
		int n_cap = t_cap - t_begin > w ?
			    (t_cap - t_begin - w + NW - 1) / NW : 0;
		int k0 = lane, k1 = lane + 32;

		pid0 = k0 < n_cap ? bt[(t_begin + w + k0 * NW) >> p.tshift] : 0;
		pid1 = k1 < n_cap ? bt[(t_begin + w + k1 * NW) >> p.tshift] : 0;
	}
	int n_active = (n_tiles + tps - 1) / tps;

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

		if (lane < N - 1 && tk < n_tiles && tk < t_begin + tps) {
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
	/* Past the sequence's end; but a cluster that merges its splits
	 * keeps all of its blocks (those add nothing). */
	if (split >= n_active && (!CM || n_active == 1))
		return;

	int skip = sinkp ? min(p.n_sink, len) : 0;
	/*
	 * The query's loads first, for the warps that make its fragments
	 * below: their latency passes while the tile copies are queued.
	 * IQ: warps 0..NG-1 make the integer query and read all of their
	 * column's head; warps (IQ ? NG : 0) + G make group G's f16 query
	 * (with IQ only where sinks need it).
	 */
	int gf = IQ ? w - NG : w;
	bool f16q = !IQ || (t_begin == 0 && skip > 0);
	bool mk_f = gf >= 0 && gf < NG && f16q, mk_i = IQ && w < NG;
	uint4 qr[NG][2];
	{
		int hd = hilo ? g >> 1 : g;
		bool ok = hd < nh;
		size_t q0 = ((size_t)b * p.hq + hq0 + (ok ? hd : 0)) * HD +
			    8 * t;

#pragma unroll
		for (int G = 0; G < NG; G++)
			if (mk_i || (mk_f && G == 0))
				load_q8(p, ok, q0 + 32 * (mk_i ? G : gf), qr[G]);
	}
	int t_end = min(t_begin + tps, n_tiles);
	int n_my = t_end - t_begin > w ? (t_end - t_begin - w + NW - 1) / NW : 0;
	int t0 = t_begin + w;
	uint8_t *ring = smem + w * N * S::BYTES;
	lanes L;

	/*
	 * p.nk: the new token (the sequence's last position) is stored by
	 * the warp that copies it: a sink's reader in split 0, else the warp
	 * whose last tile holds it; its fence comes before that copy.
	 */
	bool fresh = false;

	if (FR && len == len_in) {
		int pos = len - 1, tl = pos / TT;

		fresh = pos < skip ? t_begin == 0 && w == pos % NW :
			tl < t_end && tl >= t0 && (tl - t0) % NW == 0;
		if (fresh)
			append_new<KT, VT, HD>(p, b, h, pos, (float *)ring);
		if (fresh && pos < skip) {
			__threadfence();
			kvq_syncwarp();
			fresh = false;
		}
	}

	lanes_init<KT, VT, HD>(p, h, (unsigned)(t0 & ((1 << p.tshift) - 1) &
					    (NW - 1)), L);
	pids[lane] = pid0;
	pids[32 + lane] = pid1;
	kvq_syncwarp();

	/* Tile k's copies (zeros past the warp's last tile). */
	auto issue = [&](int k, uint8_t *st) {
		bool ok = k < n_my;

		if (FR && fresh && k == n_my - 1) {	/* the new row's tile */
			__threadfence();
			kvq_syncwarp();
		}
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

	/*
	 * The query as B fragments (columns: query_group()), and each
	 * group's bias times the query (kc).  Every warp needs the same
	 * ones, so warp G makes those of group G for all lanes and leaves
	 * them in shared memory: a quarter of the chain each warp would
	 * otherwise run before its first tile.
	 */
	unsigned qf[2 * NG][2];
	float kc[NG][4];
	{
		uint4 *qsh = (uint4 *)(smem + S::QF_OFF);	/* [NG][32] */
		float2 *ksh = (float2 *)(smem + S::QF_OFF + NG * 32 * 16);

		/* IQ: warps NG.. make the f16 query, which serves the sink
		 * positions only, beside the integer one. */
		static_assert(NW >= 2 * NG, "a warp a group and form");
		if (mk_f)
			query_group<KT, HD>(p, hilo, qr[0],
					    qsh + 32 * gf + lane,
					    ksh + 32 * gf + lane);
		if (mk_i)
			query_int8<KT, HD>(p, w, qr,
					   (uint2 *)(smem + S::QI_OFF) +
					   32 * w + lane,
					   (float *)(smem + S::QI_OFF +
						     NG * 32 * 8) +
					   32 * w + lane);
		__syncthreads();
		if (f16q)
#pragma unroll
			for (int G = 0; G < NG; G++) {
				uint4 u = qsh[32 * G + lane];
				float2 c = ksh[32 * G + lane];

				qf[2 * G][0] = u.x;
				qf[2 * G][1] = u.y;
				qf[2 * G + 1][0] = u.z;
				qf[2 * G + 1][1] = u.w;
				kc[G][0] = kc[G][2] = c.x;
				kc[G][1] = kc[G][3] = c.y;
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
	if (IQ) {
		const uint2 *qi = (const uint2 *)(smem + S::QI_OFF);
		float f = ((const float *)(smem + S::QI_OFF + NG * 32 * 8))[lane];

#pragma unroll
		for (int G = 0; G < NG; G++) {
			uint2 u = qi[32 * G + lane];

			qf[G][0] = u.x;
			qf[G][1] = u.y;
		}
		kc[0][0] = f;
	}

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
			tile<KT, VT, HD, IQ, true>(st, L, qf, kc, hilo, 0,
						   TT, ws);
		} else {
			int tok0 = (t0 + k * NW) * TT;
			int lo = max(0, skip - tok0), hi = min(TT, len - tok0);

			if (lo < hi)
				tile<KT, VT, HD, IQ, false>(st, L, qf, kc,
							    hilo, lo, hi, ws);
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
				tile<KT, VT, HD, IQ, true>(ring + s * S::BYTES,
							   L, qf, kc, hilo, 0,
							   TT, ws);
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

	/* This warp's sums over its tokens; with hilo the two f16 parts
	 * (columns 2t, 2t+1) added: head t. */
#pragma unroll
	for (int m = 4; m < 32; m <<= 1) {
		ws.l[0] += kvq_shfl_xor_f32(ws.l[0], m);
		if (!hilo)
			ws.l[1] += kvq_shfl_xor_f32(ws.l[1], m);
	}

	kvq_cp_async_wait<0>();
	__syncthreads();	/* the rings are free: reuse them */
	float *sO = (float *)smem;
	float *sM = sO + NW * NCOL * SO_RS<HD>, *sL = sM + NW * NCOL;

#pragma unroll
	for (int e = 0; e < (hilo ? 1 : 2); e++) {
		int hd = hilo ? t : 2 * t + e;
		float *o = sO + (size_t)(w * NCOL + hd) * SO_RS<HD>;

#pragma unroll
		for (int i = 0; i < HD / 16; i++) {
			o[so_ch(vch<VT, HD>(i, 0, g))] =
				hilo ? ws.o[i][0] + ws.o[i][1] : ws.o[i][e];
			o[so_ch(vch<VT, HD>(i, 1, g))] =
				hilo ? ws.o[i][2] + ws.o[i][3] : ws.o[i][2 + e];
		}
		if (g == 0) {
			sM[w * NCOL + hd] = ws.m[e];
			sL[w * NCOL + hd] = ws.l[e];
		}
	}
	__syncthreads();

	/*
	 * Item i (head i / HD, channel i % HD) sums the warps' partials with
	 * each head's weights exp2(m_w - M): a warp's items share a head, so
	 * lane v of each group of 8 weighs warp v's partial (the maximum M
	 * and the sum over the warps by shuffles) and hands the weight to
	 * the others; no barrier between the warps' partials and the
	 * block's.
	 */
	size_t unit = ((size_t)b * p.hk + h) * p.n_chunks + hc;
	size_t part = unit * p.n_splits + split;

	/*
	 * CM: rank R's slice of the items is [R per, R per + per); the
	 * ranks push their partials of it into its receive region (S::RCV),
	 * which nothing else in any block uses, once every block of the
	 * cluster has started (the barrier's first half, at the start).
	 */
	float *rO = (float *)(smem + S::RCV_OFF);
	float *rM = rO + NCOL * HD + CL_MAX, *rL = rM + CL_MAX * NCOL;
	int c_per = CM ? (nh * HD + p.cl - 1) / p.cl : 1;
	int c_i0 = CM ? split * c_per : 0;
	int c_i1 = CM ? min(nh * HD, c_i0 + c_per) : 0;

	if (CM && n_active > 1)
		kvq_cluster_wait();
	static_assert(NW == 8, "a lane a warp in each group of 8");
	for (int i = threadIdx.x; i < nh * HD; i += NW * 32) {
		int hd = i / HD, ch = i % HD;
		float M = -INFINITY, L;
		float av = group_weigh<8>(sM[(lane & 7) * NCOL + hd],
					  sL[(lane & 7) * NCOL + hd], &M, &L);
		float o = 0.0f;

#pragma unroll
		for (int v = 0; v < NW; v++)
			o += kvq_shfl_f32(av, (lane & 24) + v) *
			     sO[(v * NCOL + hd) * SO_RS<HD> + so_ch(ch)];
		if (n_active == 1) {
			put_out(p, ((size_t)b * p.hq + hq0 + hd) * HD + ch,
				L > 0.0f ? o / L : 0.0f);
		} else if (CM) {
			/* item i to the rank whose slice holds it, this
			 * head's maximum and sum to every rank */
			int d = i / c_per;

			if (split < n_active) {
				kvq_cluster_st(rO + split * c_per + i - d * c_per,
					       (unsigned)d, o);
				if (ch == 0)
					for (int r = 0; r < p.cl; r++) {
						kvq_cluster_st(rM + split * NCOL + hd,
							       (unsigned)r, M);
						kvq_cluster_st(rL + split * NCOL + hd,
							       (unsigned)r, L);
					}
			}
		} else {
			p.ws_o[(part * NCOL + hd) * HD + ch] = o;
			if (ch == 0) {
				p.ws_m[part * NCOL + hd] = M;
				p.ws_l[part * NCOL + hd] = L;
			}
		}
	}
	if (n_active == 1)
		return;
	if (CM) {
		/*
		 * The cluster's barrier: the pushes above are visible to
		 * their ranks after it.  Then this block combines its slice
		 * from its own shared memory, rank by rank (rescaled as the
		 * maximum rises), and writes it.  Nothing is read from the
		 * other blocks, so none waits for another to end.
		 */
		kvq_cluster_arrive(true);
		kvq_cluster_wait();
		int nr = min(p.cl, n_active);	/* ranks with tiles */

		for (int i = c_i0 + threadIdx.x; i < c_i1; i += NW * 32) {
			int hd = i / HD;
			float M = -INFINITY, L = 0.0f, o = 0.0f;

			for (int r = 0; r < nr; r++) {
				float m = rM[r * NCOL + hd];

				if (m == -INFINITY)
					continue;
				if (m > M) {
					float c = exp2f(M - m);

					L *= c;
					o *= c;
					M = m;
				}
				float a = exp2f(m - M);

				L += a * rL[r * NCOL + hd];
				o += a * rO[r * c_per + i - c_i0];
			}
			put_out(p, ((size_t)b * p.hq + hq0 + hd) * HD + i % HD,
				L > 0.0f ? o / L : 0.0f);
		}
		return;
	}

	/*
	 * The last block of this sequence and head merges the splits.  One
	 * add with acquire and release order at device scope, after the
	 * barrier, publishes this block's partial and, in the last block,
	 * makes the others' visible to all of its threads after the next
	 * barrier (a fence before and after a plain add cost about 0.25 us
	 * more at batch 1: bench/gpu_attn.py, q4/q4, 1K 6.75 -> 6.49 us).
	 */
	__syncthreads();
	if (threadIdx.x == 0)
		last = kvq_atomic_add_acq_rel(&p.cnt[unit], 1) == n_active - 1;
	__syncthreads();
	if (!last)
		return;

	/*
	 * Lane i of a warp sums item i (a head's 4 channels) over the
	 * splits, 16 at a time: their partials, and in lane 16j + u split u's
	 * maximum and sum for the lanes' head, are loaded together; each
	 * group of 16 lanes finds the maximum so far M by shuffles, lane u
	 * weighs split u (exp2(m - M), the sums rescaled as M rises) and
	 * hands the weight to the others.  No barrier lies between the loads
	 * and the outputs.
	 */
	constexpr int U = MERGE_U;
	constexpr int C4 = HD / 4;
	static_assert(U == 16 && C4 % 16 == 0, "16 lanes a head's splits");
	size_t u0 = unit * p.n_splits;
	const size_t vstep = (size_t)NCOL * HD / 4;
	int gb = lane & 16, gs = lane & 15;

	for (int ib = w * 32; ib < nh * C4; ib += NW * 32) {
		int it = min(ib + lane, nh * C4 - 1);
		int hd = it / C4, c4 = it % C4;
		const float4 *src = (const float4 *)(p.ws_o + (u0 * NCOL + hd) *
						     HD) + c4;
		const float *pm = p.ws_m + u0 * NCOL + hd;
		const float *pl = p.ws_l + u0 * NCOL + hd;
		float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
		float M = -INFINITY, L = 0.0f;

		for (int v0 = 0; v0 < n_active; v0 += U) {
			float4 x[U];
			int vs = v0 + gs;
			float ms = -INFINITY, ls = 0.0f;

#pragma unroll
			for (int u = 0; u < U; u++)
				x[u] = kvq_ld_cg4(src + min(v0 + u, n_active - 1) *
							vstep);
			if (vs < n_active) {
				ms = kvq_ld_cg(pm + (size_t)vs * NCOL);
				ls = kvq_ld_cg(pl + (size_t)vs * NCOL);
			}
			float Mn = M, lw;
			float as = group_weigh<16>(ms, ls, &Mn, &lw);

			if (Mn > M) {
				float r = M == -INFINITY ? 0.0f : exp2f(M - Mn);

				o.x *= r;
				o.y *= r;
				o.z *= r;
				o.w *= r;
				L *= r;
				M = Mn;
			}
			L += lw;
#pragma unroll
			for (int u = 0; u < U; u++) {
				float a = kvq_shfl_f32(as, gb + u);

				o.x += a * x[u].x;
				o.y += a * x[u].y;
				o.z += a * x[u].z;
				o.w += a * x[u].w;
			}
		}
		if (ib + lane < nh * C4) {
			size_t oi = ((size_t)b * p.hq + hq0 + hd) * HD + 4 * c4;
			float r = L > 0.0f ? 1.0f / L : 0.0f;

			put_out(p, oi, o.x * r);
			put_out(p, oi + 1, o.y * r);
			put_out(p, oi + 2, o.z * r);
			put_out(p, oi + 3, o.w * r);
		}
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
	int clusters[CL_MAX + 1];	/* resident clusters of n blocks,
					 * 0: unknown, -1: none */
};

/* Index of a page type among f16, q8, q4; -1 for others. */
int tix(int t)
{
	return t == KVQ_KV_F16 ? 0 : t == KVQ_KV_Q8 ? 1 : t == KVQ_KV_Q4 ? 2 : -1;
}

/* CM: the splits merged in clusters (sm_90; the plain kernel on HIP,
 * where the host never asks for clusters).  FR: with the append. */
template <int KT, int VT, int HD, bool IQ, bool CM, bool FR>
kinfo make_info()
{
#if defined(__HIPCC__) || defined(KVQ_HIP)
	kinfo k = { decode_kernel<KT, VT, HD, IQ, false, FR>,
		    stage<KT, VT, HD>::DYN, 0, {} };
#else
	kinfo k = { decode_kernel<KT, VT, HD, IQ, CM, FR>,
		    CM ? stage<KT, VT, HD>::DYN_CM : stage<KT, VT, HD>::DYN,
		    0, {} };
#endif

	return k;
}

#define KVQ_DECODE_KINFOS(HD, CM, FR)                                         \
	{ { make_info<KVQ_KV_F16, KVQ_KV_F16, HD, false, CM, FR>(),           \
	    make_info<KVQ_KV_F16, KVQ_KV_Q8, HD, false, CM, FR>(),            \
	    make_info<KVQ_KV_F16, KVQ_KV_Q4, HD, false, CM, FR>() },          \
	  { make_info<KVQ_KV_Q8, KVQ_KV_F16, HD, false, CM, FR>(),            \
	    make_info<KVQ_KV_Q8, KVQ_KV_Q8, HD, false, CM, FR>(),             \
	    make_info<KVQ_KV_Q8, KVQ_KV_Q4, HD, false, CM, FR>() },           \
	  { make_info<KVQ_KV_Q4, KVQ_KV_F16, HD, false, CM, FR>(),            \
	    make_info<KVQ_KV_Q4, KVQ_KV_Q8, HD, false, CM, FR>(),             \
	    make_info<KVQ_KV_Q4, KVQ_KV_Q4, HD, false, CM, FR>() } }
#define KVQ_DECODE_KINFOS2(CM, FR)                                            \
	{ KVQ_DECODE_KINFOS(64, CM, FR), KVQ_DECODE_KINFOS(128, CM, FR) }

/* [append][clusters][head_dim 64, 128][K type][V type] */
kinfo kinfos[2][2][2][3][3] = {
	{ KVQ_DECODE_KINFOS2(false, false), KVQ_DECODE_KINFOS2(true, false) },
	{ KVQ_DECODE_KINFOS2(false, true), KVQ_DECODE_KINFOS2(true, true) } };
#define KVQ_DECODE_KINFOS_IQ(HD, KT, CM, FR)                                  \
	{ make_info<KT, KVQ_KV_F16, HD, true, CM, FR>(),                      \
	  make_info<KT, KVQ_KV_Q8, HD, true, CM, FR>(),                       \
	  make_info<KT, KVQ_KV_Q4, HD, true, CM, FR>() }
#define KVQ_DECODE_KINFOS_IQ2(CM, FR)                                         \
	{ { KVQ_DECODE_KINFOS_IQ(64, KVQ_KV_Q8, CM, FR),                      \
	    KVQ_DECODE_KINFOS_IQ(64, KVQ_KV_Q4, CM, FR) },                    \
	  { KVQ_DECODE_KINFOS_IQ(128, KVQ_KV_Q8, CM, FR),                     \
	    KVQ_DECODE_KINFOS_IQ(128, KVQ_KV_Q4, CM, FR) } }

/* q8 and q4 keys, at most 4 query heads a KV head, on integer products:
 * [append][clusters][head_dim 64, 128][K type q8, q4][V type] */
kinfo kinfos_iq[2][2][2][2][3] = {
	{ KVQ_DECODE_KINFOS_IQ2(false, false), KVQ_DECODE_KINFOS_IQ2(true, false) },
	{ KVQ_DECODE_KINFOS_IQ2(false, true), KVQ_DECODE_KINFOS_IQ2(true, true) } };
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

/*
 * Whether splits may be merged in clusters (CUDA, compute capability 9.0
 * and up, KVQ_GPU_NO_CLUSTER unset), once.
 */
bool clusters_allowed(void)
{
	static int ok = -1;

	if (ok < 0)
		ok = kvq_cc_major() >= 9 && !getenv("KVQ_GPU_NO_CLUSTER");
	return ok > 0;
}

/* How many clusters of @cl blocks of @k can be resident at once, once;
 * 0 where none (or clusters are not allowed). */
int resident_clusters(kinfo *k, int cl)
{
	if (!clusters_allowed() || cl < 2 || cl > CL_MAX)
		return 0;
#if !(defined(__HIPCC__) || defined(KVQ_HIP))
	if (!k->clusters[cl]) {
		cudaLaunchConfig_t cfg = {};
		cudaLaunchAttribute at[1] = {};
		int n = 0;

		cfg.gridDim = dim3(cl);
		cfg.blockDim = dim3(NW * 32);
		cfg.dynamicSmemBytes = k->dyn;
		at[0].id = cudaLaunchAttributeClusterDimension;
		at[0].val.clusterDim.x = cl;
		at[0].val.clusterDim.y = 1;
		at[0].val.clusterDim.z = 1;
		cfg.attrs = at;
		cfg.numAttrs = 1;
		if (cudaOccupancyMaxActiveClusters(&n, (const void *)k->fn,
						   &cfg) != cudaSuccess || n <= 0)
			n = -1;
		cudaGetLastError();
		k->clusters[cl] = n;
	}
#endif
	return k->clusters[cl] > 0 ? k->clusters[cl] : 0;
}

int row_bytes(int t, int d)
{
	return t == KVQ_KV_F16 ? 2 * d : t == KVQ_KV_Q8 ? d : d / 2;
}

int scale_bytes(int t, int d)
{
	return t == KVQ_KV_F16 ? 0 : 2 * (d / 32);
}

/* Checks @a and picks its kernel (the plain merge's; cluster_twin()
 * has the other); -EINVAL / -EOPNOTSUPP. */
int check(const struct kvq_gpu_attn_args *a, kinfo **k)
{
	int ki = tix(a->k_type), vi = tix(a->v_type), fr;
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
	if (a->append) {
		const struct kvq_gpu_append_args *ap = a->append;

		/* The rows this call appends go where it reads. */
		if (ap->n_rows != a->batch || !ap->k || !ap->v ||
		    ap->in_type < 0 || ap->in_type > 1 ||
		    ap->k_pages != a->k_pages || ap->v_pages != a->v_pages ||
		    ap->k_page_bytes != a->k_page_bytes ||
		    ap->v_page_bytes != a->v_page_bytes ||
		    ap->k_type != a->k_type || ap->v_type != a->v_type ||
		    ap->block_table != a->block_table ||
		    ap->bt_stride != a->bt_stride ||
		    (const void *)ap->sink != (const void *)a->sink ||
		    ap->n_sink != a->n_sink ||
		    ap->n_kv_heads != a->n_kv_heads ||
		    ap->head_dim != a->head_dim ||
		    ap->page_tokens != a->page_tokens ||
		    ap->rope_dim > a->head_dim || ap->rope_dim % 2)
			return -EINVAL;
		/* Rotation by the host's table only (as the step has it). */
		if (ap->k_center || (ap->rope_dim && !ap->rope_cs))
			return -EOPNOTSUPP;
	}
	fr = a->append != NULL;
	*k = ki > 0 && a->n_q_heads / a->n_kv_heads <= 4 ?
	     &kinfos_iq[fr][0][a->head_dim == 128][ki - 1][vi] :
	     &kinfos[fr][0][a->head_dim == 128][ki][vi];
	return 0;
}

/* The kernel of @k's page types, head size and append whose splits
 * merge in clusters: the same place in the next quarter of its table. */
kinfo *cluster_twin(kinfo *k)
{
	const size_t np = sizeof(kinfos[0][0]) / sizeof(kinfo);
	const size_t nq = sizeof(kinfos_iq[0][0]) / sizeof(kinfo);
	const kinfo *p0 = &kinfos[0][0][0][0][0];

	return k >= p0 && k < p0 + sizeof(kinfos) / sizeof(kinfo) ?
	       k + np : k + nq;
}

void make_plan(const struct kvq_gpu_attn_args *a, kinfo *k, plan *pl)
{
	long long units, n_tiles, cap, ns, tps, mt;
	kinfo *kc;

	pl->n_chunks = (int)((a->n_q_heads / a->n_kv_heads + NCOL - 1) / NCOL);
	units = (long long)a->batch * a->n_kv_heads * pl->n_chunks;
	n_tiles = ((long long)a->max_len + TT - 1) / TT;
	if (n_tiles < 1)
		n_tiles = 1;
	/*
	 * One wave of blocks, at both head sizes.  Two waves are slower:
	 * head_dim 128, bench/gpu_attn.py, q4/q4, batch 1 at 32K 25 -> 38
	 * us, batch 8 at 8K 35 -> 44 us; head_dim 64 (which took two waves
	 * where a warp got 8 tiles or more, until each sequence's tiles were
	 * dealt by its own length, see decode_kernel()), q4/q4, batch 4 at
	 * 32K 24.3 -> 28.0 us, batch 16 at 8K 24.2 -> 29.1, at 32K 77.2 ->
	 * 86.2 (bench/gpu_attn_notes.md).  Where the units alone take a wave
	 * or more, one split (the workspace's counts are sized for that:
	 * ws_layout()).
	 */
	cap = (long long)n_sms * k->per_sm;
	ns = cap / units;
	if (ns < 1)
		ns = 1;
	if (ns > MAX_SPLITS)
		ns = MAX_SPLITS;
	/*
	 * Past MERGE_U (16) splits, a multiple of it: the last block loads
	 * 16 splits' partials, maxima and sums a round, so 33 splits would
	 * take a round more than 32.  H200, bench/gpu_attn.py, q4/q4, batch
	 * 1 (33 -> 32 splits), us: 32K 19.07 -> 18.17, 128K 48.81 -> 47.95;
	 * 1K-16K unchanged (they have 32 splits or fewer already).
	 */
	if (ns > MERGE_U)
		ns -= ns % MERGE_U;
	tps = (n_tiles + ns - 1) / ns;
	/*
	 * But where the units alone give most SMs a block and a warp would
	 * get fewer than 16 tiles of its split, one split a unit: short
	 * splits cost more in the merge and in filling each block's
	 * pipeline than their extra blocks bring.  H200, kvqd's decode step
	 * (1B shape, head_dim 64, q4/q4), two alternating runs, tokens/s:
	 * batch 16 at 1K 9307-9439 -> 9845-9947, batch 32 10613-10773 ->
	 * 11230-11348; at 4K and 8K, and batch 8, within 1%;
	 * bench/gpu_attn.py (head_dim 128, batch 16 and 64, 1K-8K) within
	 * 2%.  Fewer splits where the batch does not cover the GPU lose
	 * (batch 4 at 1K with a quarter of them: 3358 -> 3200).
	 */
	if (units * 4 >= (long long)n_sms * 3 && tps < 16 * NW)
		tps = n_tiles;
	/*
	 * A warp's share of a split: two tiles at least at head_dim 64; at
	 * 128 one, or two past MERGE_U splits (mt_min()).  At head_dim 64,
	 * kvqd's decode step (1B shape, q4/q4), H200, three
	 * alternating runs, us a step: batch 1 at 1K 879-881 -> 871-875,
	 * batch 2 at 1K 1110-1112 -> 1091-1093; batch 4, and 4K, within 1%
	 * (four tiles a warp: no better, batch 1 at 1K 884-889).
	 */
	mt = a->head_dim == 64 ? mt_min<64>(n_tiles, ns) :
				 mt_min<128>(n_tiles, ns);
	if (tps < mt)
		tps = mt;
	ns = (n_tiles + tps - 1) / tps;
	pl->n_splits = (int)ns;
	pl->tps = (int)tps;
	/*
	 * A sequence's splits run as one cluster (at most CL_MAX of them)
	 * and merge in it, where the grid is one wave that gives every SM a
	 * block and its clusters fit at once.  H200, bench/gpu_attn.py,
	 * head_dim 128, q4/q4, us, against the kernel's own merge in the
	 * same runs: batch 16 / 8K (2 splits) 42.2-47.0 -> 41.1-43.8 in 13
	 * pairs, faster in 12; batch 16 / 32K 145-167 -> 145-154.  Grids of
	 * fewer blocks than SMs lose (batch 1 / 1K, 8 splits: 6.1-6.2 ->
	 * 6.8 us), two waves lose badly (kvqd's decode step at head_dim 64,
	 * 32K, tokens/s: batch 1 1015 -> 887, batch 16 5127 -> 3622: a
	 * block that ends early holds its SM at the cluster's barrier), and
	 * so did several clusters a sequence merged through the workspace
	 * (clusters of 2, batch 1 / 32K: 16.0 -> 19.0 us).  With 2 blocks
	 * an SM the H200 holds 30 clusters of 8, 62 of 4, 132 of 2, so
	 * batch 1 to 8 at head_dim 128 keep the plain merge
	 * (bench/gpu_attn_notes.md).
	 */
	pl->cl = 1;
	pl->kc = nullptr;
	if (ns > 1 && ns <= CL_MAX && units * ns >= n_sms &&
	    units * ns <= cap && clusters_allowed() &&
	    !setup(kc = cluster_twin(k)) &&
	    resident_clusters(kc, (int)ns) >= units) {
		pl->cl = (int)ns;
		pl->kc = kc;
	}
}

size_t ws_layout(const struct kvq_gpu_attn_args *a, const plan *pl,
		 size_t *off_m, size_t *off_l, size_t *off_o)
{
	size_t units = (size_t)a->batch * a->n_kv_heads * pl->n_chunks;
	size_t parts = units * pl->n_splits;
	/*
	 * The counts first, as many as any call can use: a unit has more
	 * than one split only where the units do not fill the GPU (at most
	 * 8 blocks of NW warps an SM), so that the partials of one call
	 * never lie where another call of the same workspace, with another
	 * batch, finds its counts (which each call leaves zeroed).
	 */
	size_t o = ((size_t)n_sms * (2048 / (NW * 32)) * sizeof(int) + 255) &
		   ~(size_t)255;

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
	if (pl.cl > 1)
		k = pl.kc;		/* set up by make_plan() */

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
	p.cl = pl.cl;
	p.cnt = (int *)a->workspace;
	p.ws_m = (float *)((uint8_t *)a->workspace + om);
	p.ws_l = (float *)((uint8_t *)a->workspace + ol);
	p.ws_o = (float *)((uint8_t *)a->workspace + oo);
	p.nk = p.nv = nullptr;
	p.ncs = nullptr;
	p.n_f16 = p.nrope = p.nneox = 0;
	if (a->append) {
		const struct kvq_gpu_append_args *ap = a->append;

		p.nk = ap->k;
		p.nv = ap->v;
		p.n_f16 = ap->in_type == KVQ_GPU_F16;
		p.nrope = (int)ap->rope_dim;
		p.nneox = ap->rope_neox != 0;
		p.ncs = ap->rope_cs;
	}

	dim3 grid(pl.n_splits, a->n_kv_heads * pl.n_chunks, a->batch);

	kvq_launch_cl(kvq_pdl_allowed(), (unsigned)pl.cl, k->fn, grid,
		      dim3(NW * 32), k->dyn, (cudaStream_t)stream, p);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}
