/*
 * attn_prefill.cu - causal attention of prompt rows over kvqd's paged,
 * quantized KV cache on tensor cores, flash style (head_dim 64 and 128,
 * f16, q8 and q4 pages in any K/V pair, 1 to 8 query heads per KV head).
 *
 * Why this file exists: kvq_gpu_attn_split() treats every query row as a
 * decode row, so a prompt of T rows reads (and dequantizes) the cache T
 * times on CUDA cores.  Here a block takes a tile of 64 "M-rows" of one KV
 * head: BR = 64 / G query rows times the G query heads of that KV head
 * (M-row r * G + g).  It walks the KV positions up to its last row in
 * tiles of 64, the next tile's pages streaming into a staging buffer with
 * asynchronous copies while the current one is used; each tile is turned
 * into f16 operands in shared memory once, and each of the 4 warps (16
 * M-rows) computes S = Q K^T and O += P V with 16x8x16 f16 products, the
 * causal mask and an online softmax (f32, base 2) in between, and divides
 * by the softmax sum once at the end.
 *
 * Rows: row r belongs to sequence row_seq[r] at position row_pos[r], as
 * for the split kernel.  A block's rows are BR consecutive entries of the
 * row array; where they belong to several sequences (a prompt chunk next
 * to decode rows in one step) the block takes each run of one sequence
 * in turn.  Short prompts and long contexts split the positions as well
 * (grid.z, about two blocks a multiprocessor in all, as far as the
 * workspace allows): split s takes positions [s * span, (s + 1) * span),
 * the last one everything after; a row that ends in the first split is
 * written directly, the others are merged by prefill_merge().
 *
 * Precision.  The plain-C twin, kvq_kv_attend(), is f32 throughout; so is
 * everything here but the product inputs, and those lose nothing that
 * matters:
 *  - q8 and q4 codes are small integers, exact in f16, and the sink
 *    copies and f16 pages are f16 already.  Key scales are applied in f32
 *    outside the products: a score is summed per 32-channel scale group
 *    (two k16 steps) and that partial is multiplied by the key's scale.
 *  - The query, times scale * log2(e), enters as an f16 high half plus
 *    an f16 low half (two products): about 2^-22 relative.
 *  - P V: each probability times the value's scale (per position and
 *    group), brought into f16's range by the tile's power of two (x =
 *    p s 2^14 / Sref, Sref the power of two above the tile's largest V
 *    scale, so x < 2^14 and the unit back is exact), enters as high and
 *    low halves as well.  Codes then multiply exactly.
 *  - Tensor-core accumulation is not IEEE (addends aligned and truncated
 *    in the f32 accumulator).  Chains are kept short: 4 products for a
 *    score group, 8 for a group of 32 output channels over one tile, each
 *    into a fresh accumulator that is then added to the running scores or
 *    output in f32 with rounding to nearest, so truncation never adds up
 *    over a long context.
 * What is left is f32 rounding in another order than the CPU's, a few
 * 1e-7 of max|V|; the tests hold it to the split kernel's bound, 2e-5
 * max|V| + 1e-6 (f16 rounding of Q or of P alone shows as 1e-4 to 2e-4).
 *
 * Sinks: positions below n_sink of a quantized K (V) come from the
 * sequence's f16 copies, as in kvq_kv_attend(): they replace the codes in
 * the tile, with scale 1.
 *
 * The tile code wants 32-lane warps with native mma.sync / ldmatrix /
 * cp.async (compute capability 8.0 and up); on HIP gpu_compat.h emulates
 * those with shuffles, so there kvq_gpu_attn_prefill() declines and the
 * split kernel serves.
 */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/attn.h"
#include "engine/kvcache.h"

namespace {

constexpr int NTH = 128;		/* threads of a block: 4 warps */
constexpr int BM = 64;			/* M-rows of a block, 16 a warp */
constexpr int BN = 64;			/* KV positions of a tile */
constexpr int PAD = 8;			/* f16 padding of a shared row */
constexpr int MAXG = 8;			/* query heads per KV head */
constexpr int MAX_SPLITS = 64;
constexpr float PSCALE = 16384.0f;	/* 2^14: P V operands' range */

/* Bytes of a padded shared row of D f16 values: 16 bytes over a
 * multiple of 128, so the 8 rows of an ldmatrix hit 8 bank groups. */
template <int D> constexpr __host__ __device__ int rs()
{
	return (D + PAD) * 2;
}

/*
 * One pool's part of the shared memory.  Quantized: two staging buffers
 * (rows as stored, then their f16 scales), the f16 tile of codes and the
 * scales as f32 [group][position].  f16: two tiles, filled straight
 * from the pages.
 */
template <int D, int T> struct half_lay {
	static constexpr bool QT = T != KVQ_KV_F16;
	static constexpr int NG = D / 32;	/* scale groups of a row */
	static constexpr int RB = T == KVQ_KV_Q8 ? D :
				  T == KVQ_KV_Q4 ? D / 2 : 2 * D;
	static constexpr int TILE = BN * rs<D>();
	static constexpr int RAW = QT ? BN * (RB + 2 * NG) : TILE;
	static constexpr int TILE_OFF = 2 * RAW;
	static constexpr int SC_OFF = TILE_OFF + TILE;
	static constexpr int BYTES = QT ? SC_OFF + NG * BN * 4 : 2 * RAW;
};

/* The block's shared memory: Q high and low halves, K, V, the rows'
 * sequences and positions, the warps' largest V scales. */
template <int D, int KT, int VT> struct lay {
	static constexpr int Q_LO = BM * rs<D>();
	static constexpr int K = 2 * BM * rs<D>();
	static constexpr int V = K + half_lay<D, KT>::BYTES;
	static constexpr int ROWS = V + half_lay<D, VT>::BYTES;
	static constexpr int WMAX = ROWS + 2 * BM * 4;
	static constexpr int SMEM = WMAX + 4 * 4;
};

/*
 * The launch: its arguments as given (the workspace holds, when S > 1,
 * [row][KV head][split][G][max, sum, o[D]]) and what the launcher made of
 * them.
 */
struct pfp {
	struct kvq_gpu_split_args a;
	uint32_t G, BR;		/* query heads a KV head, rows a block */
	float scale;		/* softmax scale times log2(e) */
	uint32_t S, span;	/* position splits and their length */
};

__device__ __forceinline__ unsigned h2u(__half2 h)
{
	return *reinterpret_cast<unsigned *>(&h);
}

__device__ __forceinline__ __half2 u2h(unsigned u)
{
	return *reinterpret_cast<__half2 *>(&u);
}

/* x as high + low f16 halves: (x0, x1) of a pair into @hi, @lo. */
__device__ __forceinline__ void split2(float x0, float x1, unsigned &hi,
				       unsigned &lo)
{
	__half2 h = __floats2half2_rn(x0, x1);
	float2 f = __half22float2(h);

	hi = h2u(h);
	lo = h2u(__floats2half2_rn(x0 - f.x, x1 - f.y));
}

/*
 * Queues the copies of positions j0..j0+BN-1 of KV head @kh of one pool
 * into @dst: quantized rows and their scales as stored, f16 rows straight
 * into the padded tile.  Positions from @a1 on read nothing and are
 * zeros.  The sequence's block table is @bt.
 */
template <int D, int T>
__device__ __forceinline__ void issue(const pfp &p, const void *pool,
				      size_t pgb, const int32_t *bt,
				      uint32_t kh, uint32_t j0, uint32_t a1,
				      uint8_t *dst)
{
	typedef half_lay<D, T> H;
	constexpr int CPR = H::RB / 16;		/* 16-byte chunks a row */
	constexpr int WPR = H::NG / 2;		/* 4-byte scale words a row */
	const uint8_t *pages = (const uint8_t *)pool;
	uint32_t P = p.a.page_tokens;
	size_t hp = (size_t)p.a.n_kv_heads * P;

#pragma unroll 1
	for (int c = threadIdx.x; c < BN * CPR; c += NTH) {
		uint32_t i = c / CPR, part = c % CPR, t = j0 + i;
		const uint8_t *src = pages;

		if (t < a1) {
			uint32_t pi = t / P;

			src = pages + (size_t)bt[pi] * pgb +
			      ((size_t)kh * P + t - pi * P) * H::RB + 16 * part;
		}
		kvq_cp_async16_n(dst + (H::QT ? i * H::RB : i * rs<D>()) +
				 16 * part, src, t < a1 ? 16 : 0);
	}
#pragma unroll 1
	for (int c = threadIdx.x; H::QT && c < BN * WPR; c += NTH) {
		uint32_t i = c / WPR, t = j0 + i;
		uint8_t *d = dst + BN * H::RB + 4 * c;

		if (t < a1) {
			uint32_t pi = t / P;

			kvq_cp_async4(d, pages + (size_t)bt[pi] * pgb +
				      hp * H::RB + ((size_t)kh * P + t - pi * P) *
				      (2 * H::NG) + 4 * (c % WPR));
		} else {
			*(uint32_t *)d = 0;
		}
	}
}

/* q4: the pair (low, high nibble) of byte k of a word, from its low
 * nibbles @lo and high nibbles @hi, as exact f16 n - 8. */
__device__ __forceinline__ unsigned q4_pair(unsigned lo, unsigned hi, int k)
{
	unsigned x = __byte_perm(lo, hi, k | k << 4 | (4 + k) << 8 |
					 (4 + k) << 12);

	/* 1024 + n in f16, then 1032 off: exact. */
	return h2u(__hsub2(u2h(kvq_and_or(x, 0x000f000fu, 0x64006400u)),
			   u2h(0x64086408u)));
}

/* q8: bytes @sel of a word (already xor 0x80) as exact f16 values. */
__device__ __forceinline__ unsigned q8_pair(unsigned x, unsigned sel)
{
	/* 1024 + (q + 128) in f16, then 1152 off. */
	return h2u(__hsub2(u2h(__byte_perm(x, 0x64646464u, sel)),
			   u2h(0x64806480u)));
}

/*
 * The staged tile @raw of a quantized pool as f16 codes into the padded
 * @tile and its scales as f32 into @sc ([group][position]).  Positions
 * below @ns are sinks: their f16 copies (@srow: position 0 of the head,
 * @sst halves a position) with scale 1.  Returns the largest scale this
 * thread wrote.
 */
template <int D, int T>
__device__ __forceinline__ float convert(const uint8_t *raw, uint8_t *tile,
					 float *sc, const __half *srow,
					 size_t sst, uint32_t j0, uint32_t ns)
{
	typedef half_lay<D, T> H;
	constexpr int CPR = H::RB / 16;
	constexpr int CH = T == KVQ_KV_Q4 ? 32 : 16;	/* channels a chunk */
	float mx = 0.0f;

	for (int c = threadIdx.x; c < BN * CPR; c += NTH) {
		uint32_t i = c / CPR, part = c % CPR, t = j0 + i;
		uint4 *d = (uint4 *)(tile + i * rs<D>() + part * CH * 2);

		if (t < ns) {
			const uint4 *s = (const uint4 *)(srow + t * sst +
							 part * CH);

#pragma unroll
			for (int j = 0; j < CH / 8; j++)
				d[j] = s[j];
			continue;
		}
		uint4 x = *(const uint4 *)(raw + i * H::RB + 16 * part);
		unsigned w[4] = { x.x, x.y, x.z, x.w };

#pragma unroll
		for (int j = 0; j < 4; j++) {
			if (T == KVQ_KV_Q4) {
				unsigned lo = w[j] & 0x0f0f0f0fu;
				unsigned hi = (w[j] >> 4) & 0x0f0f0f0fu;

				d[j] = make_uint4(q4_pair(lo, hi, 0),
						  q4_pair(lo, hi, 1),
						  q4_pair(lo, hi, 2),
						  q4_pair(lo, hi, 3));
			} else if (j % 2 == 0) {
				unsigned a = w[j] ^ 0x80808080u;
				unsigned b = w[j + 1] ^ 0x80808080u;

				d[j / 2] = make_uint4(q8_pair(a, 0x4140),
						      q8_pair(a, 0x4342),
						      q8_pair(b, 0x4140),
						      q8_pair(b, 0x4342));
			}
		}
	}
	for (int c = threadIdx.x; c < BN * H::NG; c += NTH) {
		uint32_t i = c / H::NG, t = j0 + i;
		float s = t < ns ? 1.0f :
			  __half2float(((const __half *)(raw + BN * H::RB))[c]);

		sc[(c % H::NG) * BN + i] = s;
		mx = fmaxf(mx, s);
	}
	return mx;
}

/* Per-warp state of the online softmax: lane 4g+t owns M-rows g and g+8
 * of the warp (its channels 8n + 2t, +1 of each n-tile n). */
template <int D> struct wst {
	float o[D / 8][4];
	float m[2], l[2];	/* l: this lane's part of the sum */
};

/*
 * Scores of the warp's 16 M-rows against the tile's 64 positions, base
 * 2, into @s (n-tile n: positions 8n + 2t, +1 of rows g, g+8): per scale
 * group, Q high and low halves times the codes in a fresh accumulator,
 * then times the key scale (f32, @ksc) into @s.
 */
template <int D, bool KQ>
__device__ __forceinline__ void scores(const uint8_t *qh, const uint8_t *kt,
				       const float *ksc, float s[BN / 8][4])
{
	constexpr int R = rs<D>();
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5, t = lane & 3;
	const uint8_t *qa = qh + (16 * w + (lane & 7) + 8 * ((lane >> 3) & 1)) *
			    R + 16 * (lane >> 4);
	const uint8_t *ka = kt + ((lane & 7) + 8 * (lane >> 4)) * R +
			    16 * ((lane >> 3) & 1);

#pragma unroll
	for (int n = 0; n < BN / 8; n++)
		s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
	for (int G = 0; G < D / 32; G++) {
		unsigned ah[2][4], al[2][4];

#pragma unroll
		for (int k = 0; k < 2; k++) {
			kvq_ldsm4(ah[k], qa + 32 * (2 * G + k));
			kvq_ldsm4(al[k], qa + BM * R + 32 * (2 * G + k));
		}
#pragma unroll
		for (int n = 0; n < BN / 8; n += 2) {
			float c[2][4] = { { 0.0f, 0.0f, 0.0f, 0.0f },
					  { 0.0f, 0.0f, 0.0f, 0.0f } };

#pragma unroll
			for (int k = 0; k < 2; k++) {
				unsigned b[4];

				kvq_ldsm4(b, ka + 8 * n * R + 32 * (2 * G + k));
				kvq_mma_f16_16816(c[0], ah[k], b);
				kvq_mma_f16_16816(c[0], al[k], b);
				kvq_mma_f16_16816(c[1], ah[k], b + 2);
				kvq_mma_f16_16816(c[1], al[k], b + 2);
			}
#pragma unroll
			for (int j = 0; j < 2; j++) {
				const float *kp = ksc + G * BN + 8 * (n + j);
				float2 sc = make_float2(1.0f, 1.0f);
				float *x = s[n + j];

				if (KQ)
					sc = *(const float2 *)(kp + 2 * t);

				x[0] = fmaf(c[j][0], sc.x, x[0]);
				x[1] = fmaf(c[j][1], sc.y, x[1]);
				x[2] = fmaf(c[j][2], sc.x, x[2]);
				x[3] = fmaf(c[j][3], sc.y, x[3]);
			}
		}
	}
}

/*
 * The causal mask (position j0 + ... above a row's own: -inf; @pr: the
 * positions of rows g and g+8, -1 for rows not taken), then the online
 * softmax step: @s becomes the probabilities, @corr the factor the
 * output rows are rescaled by.
 */
template <int D>
__device__ __forceinline__ void softmax(wst<D> &st, float s[BN / 8][4],
					uint32_t j0, const int32_t pr[2],
					float corr[2])
{
	int t = threadIdx.x & 3;

#pragma unroll
	for (int r = 0; r < 2; r++) {
		float mx = -INFINITY, mn, base, sum = 0.0f;

#pragma unroll
		for (int n = 0; n < BN / 8; n++)
#pragma unroll
			for (int e = 0; e < 2; e++) {
				int32_t pos = (int32_t)(j0 + 8 * n + 2 * t + e);

				if (pos > pr[r])
					s[n][2 * r + e] = -INFINITY;
				mx = fmaxf(mx, s[n][2 * r + e]);
			}
		mx = fmaxf(mx, kvq_shfl_xor_f32(mx, 1));
		mx = fmaxf(mx, kvq_shfl_xor_f32(mx, 2));
		mn = fmaxf(st.m[r], mx);
		corr[r] = mn == -INFINITY ? 1.0f : exp2f(st.m[r] - mn);
		base = mn == -INFINITY ? 0.0f : mn;
		st.m[r] = mn;
#pragma unroll
		for (int n = 0; n < BN / 8; n++)
#pragma unroll
			for (int e = 0; e < 2; e++) {
				float x = exp2f(s[n][2 * r + e] - base);

				s[n][2 * r + e] = x;
				sum += x;
			}
		st.l[r] = st.l[r] * corr[r] + sum;
	}
}

/*
 * o = o * corr + P V for the tile, a group of 32 channels (four n-tiles)
 * at a time: P times the values' scales (@vsc, [group][position]; f16
 * values: none) times @vmul, as high and low halves, against the f16
 * values in a fresh accumulator, which comes back in units of @vunit.
 */
template <int D, bool VQ>
__device__ __forceinline__ void values(wst<D> &st, const float s[BN / 8][4],
				       const uint8_t *vt, const float *vsc,
				       float vmul, float vunit,
				       const float corr[2])
{
	constexpr int R = rs<D>();
	int lane = threadIdx.x & 31, t = lane & 3;
	const uint8_t *va = vt + ((lane & 7) + 8 * ((lane >> 3) & 1)) * R +
			    16 * (lane >> 4);

#pragma unroll
	for (int G = 0; G < D / 32; G++) {
		float acc[4][4];

#pragma unroll
		for (int j = 0; j < 4; j++)
			acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
		for (int ks = 0; ks < BN / 16; ks++) {
			float2 wa = make_float2(vmul, vmul), wb = wa;
			unsigned ah[4], al[4];

			const float *p0 = s[2 * ks], *p1 = s[2 * ks + 1];

			if (VQ) {
				const float *vp = vsc + G * BN + 16 * ks + 2 * t;

				wa = *(const float2 *)vp;
				wb = *(const float2 *)(vp + 8);
				wa.x *= vmul;
				wa.y *= vmul;
				wb.x *= vmul;
				wb.y *= vmul;
			}
			split2(p0[0] * wa.x, p0[1] * wa.y, ah[0], al[0]);
			split2(p0[2] * wa.x, p0[3] * wa.y, ah[1], al[1]);
			split2(p1[0] * wb.x, p1[1] * wb.y, ah[2], al[2]);
			split2(p1[2] * wb.x, p1[3] * wb.y, ah[3], al[3]);
#pragma unroll
			for (int h = 0; h < 2; h++) {
				unsigned b[4];

				/* Channels 32G + 16h.., positions 16ks.. */
				kvq_ldsm4_t(b, va + 16 * ks * R + 64 * G +
					    32 * h);
				kvq_mma_f16_16816(acc[2 * h], ah, b);
				kvq_mma_f16_16816(acc[2 * h], al, b);
				kvq_mma_f16_16816(acc[2 * h + 1], ah, b + 2);
				kvq_mma_f16_16816(acc[2 * h + 1], al, b + 2);
			}
		}
#pragma unroll
		for (int j = 0; j < 4; j++) {
			float *o = st.o[4 * G + j];

			o[0] = fmaf(acc[j][0], vunit, o[0] * corr[0]);
			o[1] = fmaf(acc[j][1], vunit, o[1] * corr[0]);
			o[2] = fmaf(acc[j][2], vunit, o[2] * corr[1]);
			o[3] = fmaf(acc[j][3], vunit, o[3] * corr[1]);
		}
	}
}

/*
 * The results of the warp's rows of one run: rows whose positions all
 * fell in this split (and every row with one split) are divided by their
 * sum and written to out; the others leave (max, sum, unnormalized o) in
 * the workspace for prefill_merge().
 */
template <int D>
__device__ __forceinline__ void finish(const pfp &p, wst<D> &st,
				       uint32_t r0, uint32_t kh,
				       uint32_t split, uint32_t a0,
				       const int32_t pr[2])
{
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	int g = lane >> 2, t = lane & 3;

#pragma unroll
	for (int r = 0; r < 2; r++) {
		uint32_t m = 16 * w + g + 8 * r, row = r0 + m / p.G;
		uint32_t h = kh * p.G + m % p.G;
		float l = st.l[r];

		l += kvq_shfl_xor_f32(l, 1);
		l += kvq_shfl_xor_f32(l, 2);
		if (pr[r] < (int32_t)a0)
			continue;
		if (p.S == 1 || (uint32_t)pr[r] < p.span) {
			float *o = p.a.out + (size_t)row * p.a.out_stride +
				   (size_t)h * D;
			float inv = 1.0f / l;

#pragma unroll
			for (int n = 0; n < D / 8; n++) {
				o[8 * n + 2 * t] = st.o[n][2 * r] * inv;
				o[8 * n + 2 * t + 1] = st.o[n][2 * r + 1] * inv;
			}
			continue;
		}
		size_t u = ((size_t)row * p.a.n_kv_heads + kh) * p.S + split;
		float *ws = p.a.workspace + (u * p.G + m % p.G) * (D + 2);

		if (t == 0) {
			ws[0] = st.m[r];
			ws[1] = l;
		}
#pragma unroll
		for (int n = 0; n < D / 8; n++) {
			ws[2 + 8 * n + 2 * t] = st.o[n][2 * r];
			ws[2 + 8 * n + 2 * t + 1] = st.o[n][2 * r + 1];
		}
	}
}

/* Queues both pools' positions j0..j0+BN-1 (zeros from @a1 on) into
 * staging buffer @b, as one commit group. */
template <int D, int KT, int VT>
__device__ __forceinline__ void stage(const pfp &p, uint8_t *sm,
				      const int32_t *bt, uint32_t kh,
				      uint32_t j0, uint32_t a1, uint32_t b)
{
	typedef lay<D, KT, VT> Y;

	issue<D, KT>(p, p.a.k_pages, p.a.k_page_bytes, bt, kh, j0, a1,
		     sm + Y::K + b * half_lay<D, KT>::RAW);
	issue<D, VT>(p, p.a.v_pages, p.a.v_page_bytes, bt, kh, j0, a1,
		     sm + Y::V + b * half_lay<D, VT>::RAW);
	kvq_cp_async_commit();
}

/* The K and V operands of the tile: quantized pools' staging buffer @b
 * converted (sinks from @sinkb, below @ns), f16 ones as staged. */
struct opnd {
	const uint8_t *k, *v;	/* padded f16 tiles */
	const float *ksc, *vsc;	/* scales [group][position] */
	float vmul, vunit;	/* P V into f16's range and back */
};

template <int D, int KT, int VT>
__device__ __forceinline__ opnd operands(const pfp &p, uint8_t *sm,
					 const __half *sinkb, uint32_t kh,
					 uint32_t j0, uint32_t ns, uint32_t b)
{
	typedef lay<D, KT, VT> Y;
	typedef half_lay<D, KT> HK;
	typedef half_lay<D, VT> HV;
	uint8_t *ks = sm + Y::K, *vs = sm + Y::V;
	float *wmax = (float *)(sm + Y::WMAX);
	size_t kvd = (size_t)p.a.n_kv_heads * D;
	opnd o = { ks + b * HK::RAW, vs + b * HV::RAW,
		   (const float *)(ks + HK::SC_OFF),
		   (const float *)(vs + HV::SC_OFF), PSCALE, 1.0f / PSCALE };

	if (HK::QT) {
		convert<D, KT>(o.k, ks + HK::TILE_OFF,
			       (float *)(ks + HK::SC_OFF), sinkb + kh * D, kvd,
			       j0, ns);
		o.k = ks + HK::TILE_OFF;
	}
	if (HV::QT) {
		float mx = convert<D, VT>(o.v, vs + HV::TILE_OFF,
					  (float *)(vs + HV::SC_OFF),
					  sinkb + p.a.n_sink * kvd + kh * D,
					  kvd, j0, ns);

		for (int x = 16; x > 0; x >>= 1)
			mx = fmaxf(mx, kvq_shfl_xor_f32(mx, x));
		if ((threadIdx.x & 31) == 0)
			wmax[threadIdx.x >> 5] = mx;
		o.v = vs + HV::TILE_OFF;
	}
	__syncthreads();
	if (HV::QT) {
		float mx = fmaxf(fmaxf(wmax[0], wmax[1]),
				 fmaxf(wmax[2], wmax[3]));
		int e = (int)((__float_as_uint(mx) >> 23) & 255) - 127;

		/* Sref = 2^(e+1) > mx: x = p s 2^(13-e) < 2^14, and the
		 * unit back is 2^(e-13). */
		if (mx > 0.0f) {
			o.vmul = __uint_as_float((uint32_t)(140 - e) << 23);
			o.vunit = __uint_as_float((uint32_t)(114 + e) << 23);
		}
	}
	return o;
}

/* Positions of the lane's two rows (-1: not a row of run s0..s1-1) and
 * the largest of the warp's rows. */
__device__ __forceinline__ int32_t row_pos(const pfp &p, const int32_t *rp,
					   uint32_t s0, uint32_t s1,
					   int32_t pr[2])
{
	int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
	int32_t last = -1;

	for (int m = 16 * w; m < 16 * w + 16; m++) {
		uint32_t r = m / p.G;
		int32_t x = r >= s0 && r < s1 ? rp[r] : -1;

		if (m == 16 * w + g)
			pr[0] = x;
		if (m == 16 * w + g + 8)
			pr[1] = x;
		last = max(last, x);
	}
	return last;
}

/*
 * One run of rows s0..s1-1 of the block (one sequence, @seq) over its
 * positions [a0, a1) of this split, tile by tile: wait for the staged
 * tile, queue the next one, turn the staged one into f16 operands, then
 * each warp with a row at or past the tile multiplies.
 */
template <int D, int KT, int VT>
__device__ void run(const pfp &p, uint8_t *sm, uint32_t r0, uint32_t kh,
		    uint32_t split, uint32_t s0, uint32_t s1, uint32_t seq,
		    uint32_t a0, uint32_t a1)
{
	typedef lay<D, KT, VT> Y;
	const int32_t *bt = p.a.block_table + (size_t)seq * p.a.bt_stride;
	const __half *sinkb = p.a.n_sink && p.a.sink && p.a.sink[seq] ?
			      (const __half *)p.a.sink[seq] : nullptr;
	uint32_t ns = sinkb ? min(p.a.n_sink, a1) : 0, j0, b;
	int32_t pr[2], last;
	wst<D> st;

	last = row_pos(p, (const int32_t *)(sm + Y::ROWS) + BM, s0, s1, pr);
	st.m[0] = st.m[1] = -INFINITY;
	st.l[0] = st.l[1] = 0.0f;
#pragma unroll
	for (int n = 0; n < D / 8; n++)
		st.o[n][0] = st.o[n][1] = st.o[n][2] = st.o[n][3] = 0.0f;

	/* The previous run's last tile is no longer read. */
	__syncthreads();
	stage<D, KT, VT>(p, sm, bt, kh, a0, a1, 0);
	for (j0 = a0, b = 0; j0 < a1; j0 += BN, b ^= 1) {
		float s[BN / 8][4], corr[2];
		opnd o;

		kvq_cp_async_wait<0>();
		__syncthreads();
		if (j0 + BN < a1)
			stage<D, KT, VT>(p, sm, bt, kh, j0 + BN, a1, b ^ 1);
		o = operands<D, KT, VT>(p, sm, sinkb, kh, j0, ns, b);
		if ((int32_t)j0 > last)
			continue;
		scores<D, KT != KVQ_KV_F16>(sm, o.k, o.ksc, s);
		softmax<D>(st, s, j0, pr, corr);
		values<D, VT != KVQ_KV_F16>(st, s, o.v, o.vsc, o.vmul, o.vunit,
					    corr);
	}
	finish<D>(p, st, r0, kh, split, a0, pr);
}

/*
 * Block (row tile, KV head, split); tiles in reverse, so that the last
 * rows of a prompt (the most positions) start first.  The query of the
 * tile goes to shared memory once as f16 high and low halves (times
 * scale * log2 e); then each run of rows of one sequence in the tile.
 */
template <int D, int KT, int VT>
__global__ void __launch_bounds__(NTH, 2) prefill_kernel(pfp p)
{
	typedef lay<D, KT, VT> Y;
	extern __shared__ __align__(16) uint8_t sm[];
	int32_t *rsq = (int32_t *)(sm + Y::ROWS), *rp = rsq + BM;
	uint32_t tile = gridDim.x - 1 - blockIdx.x, kh = blockIdx.y;
	uint32_t split = blockIdx.z, r0 = tile * p.BR;
	uint32_t nr = min(p.BR, p.a.n_rows - r0);

	kvq_pdl_wait();		/* q and the rows the append wrote */
	for (int i = threadIdx.x; i < BM * D / 4; i += NTH) {
		uint32_t m = i / (D / 4), c = 4 * (i % (D / 4));
		uint32_t r = m / p.G, h = kh * p.G + m % p.G;
		float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
		unsigned hi[2], lo[2];

		if (r < nr)
			x = *(const float4 *)(p.a.q + (size_t)(r0 + r) *
					      p.a.q_stride + (size_t)h * D + c);
		split2(x.x * p.scale, x.y * p.scale, hi[0], lo[0]);
		split2(x.z * p.scale, x.w * p.scale, hi[1], lo[1]);
		*(uint2 *)(sm + m * rs<D>() + 2 * c) = make_uint2(hi[0], hi[1]);
		*(uint2 *)(sm + Y::Q_LO + m * rs<D>() + 2 * c) =
			make_uint2(lo[0], lo[1]);
	}
	for (int i = threadIdx.x; i < BM; i += NTH) {
		rsq[i] = i < (int)nr ? p.a.row_seq[r0 + i] : -1;
		rp[i] = i < (int)nr ? p.a.row_pos[r0 + i] : -1;
	}
	__syncthreads();
	for (uint32_t s0 = 0, s1; s0 < nr; s0 = s1) {
		int32_t last = rp[s0];
		uint32_t a0 = split * p.span, a1;

		for (s1 = s0 + 1; s1 < nr && rsq[s1] == rsq[s0]; s1++)
			last = max(last, rp[s1]);
		if (last < (int32_t)a0)
			continue;
		a1 = split + 1 == p.S ? (uint32_t)last + 1 :
		     min(a0 + p.span, (uint32_t)last + 1);
		run<D, KT, VT>(p, sm, r0, kh, split, s0, s1, (uint32_t)rsq[s0],
			       a0, a1);
	}
}

/*
 * Rows that reach past the first split: block (row, query head), a
 * thread a channel, over the splits the row reaches.
 */
__global__ void __launch_bounds__(128) prefill_merge(pfp p, uint32_t D)
{
	uint32_t row = blockIdx.x, h = blockIdx.y, c = threadIdx.x, s;
	uint32_t n = min((uint32_t)p.a.row_pos[row] / p.span, p.S - 1) + 1;
	size_t st = (size_t)p.G * (D + 2);
	const float *ws = p.a.workspace + ((size_t)row * p.a.n_kv_heads +
					   h / p.G) * p.S * st +
			  (size_t)(h % p.G) * (D + 2);
	float M = -INFINITY, L = 0.0f, o = 0.0f;

	if (n < 2 || c >= D)
		return;
	for (s = 0; s < n; s++)
		M = fmaxf(M, ws[s * st]);
	for (s = 0; s < n; s++) {
		float e = exp2f(ws[s * st] - M);

		L += e * ws[s * st + 1];
		o += e * ws[s * st + 2 + c];
	}
	p.a.out[(size_t)row * p.a.out_stride + (size_t)h * D + c] = o / L;
}

/* ------------------------------------------------------------ the host */

typedef void (*kfn)(pfp);

/* A kernel and its shared memory, set up once (the opt-in above 48 KiB). */
struct kern {
	kfn fn;
	int smem;
	int state;		/* 0 not tried, 1 ready, -1 refused */
};

template <int D, int KT, int VT> constexpr kern mk()
{
	return kern{ prefill_kernel<D, KT, VT>, lay<D, KT, VT>::SMEM, 0 };
}

/* [head_dim 64, 128][K f16, q8, q4][V f16, q8, q4] */
#define PF_V(D, KT) { mk<D, KT, KVQ_KV_F16>(), mk<D, KT, KVQ_KV_Q8>(), \
		      mk<D, KT, KVQ_KV_Q4>() }
#define PF_KV(D) { PF_V(D, KVQ_KV_F16), PF_V(D, KVQ_KV_Q8), PF_V(D, KVQ_KV_Q4) }
kern kerns[2][3][3] = { PF_KV(64), PF_KV(128) };
#undef PF_KV
#undef PF_V

/* Compute capability major and multiprocessors of the current device,
 * asked once; 0 when it cannot be asked. */
int dev_major, dev_sms;

void dev_query(void)
{
	int dev = 0;

	if (dev_sms)
		return;
	if (cudaGetDevice(&dev) != cudaSuccess ||
	    cudaDeviceGetAttribute(&dev_major,
				   cudaDevAttrComputeCapabilityMajor, dev) !=
	    cudaSuccess ||
	    cudaDeviceGetAttribute(&dev_sms, cudaDevAttrMultiProcessorCount,
				   dev) != cudaSuccess || dev_sms <= 0) {
		(void)cudaGetLastError();
		dev_major = 0;
		dev_sms = 0;
	}
}

/* The kernel for @a's shape and page types (which must be served). */
kern *pick(const struct kvq_gpu_split_args *a)
{
	return &kerns[a->head_dim == 128][a->k_type - KVQ_KV_F16]
		     [a->v_type - KVQ_KV_F16];
}

/*
 * Position splits for @units blocks a split: about two blocks a
 * multiprocessor (the kernels' occupancy), at least 256 positions a
 * split, within @a's workspace.  Sets *@span (a multiple of BN).
 */
uint32_t plan(const struct kvq_gpu_split_args *a, uint32_t units,
	      uint32_t *span)
{
	uint32_t len = a->max_len ? a->max_len : 1, S = 1;
	size_t per = (size_t)a->n_rows * a->n_q_heads * (a->head_dim + 2) *
		     sizeof(float);

	if (units < 2 * (uint32_t)dev_sms) {
		uint32_t by_len = (len + 255) / 256;

		S = (2 * dev_sms + units - 1) / units;
		S = S < by_len ? S : by_len;
		S = S < MAX_SPLITS ? S : MAX_SPLITS;
		if (a->workspace && per * S > a->workspace_bytes)
			S = (uint32_t)(a->workspace_bytes / per);
		if (!a->workspace || S < 1)
			S = 1;
	}
	*span = ((len + S - 1) / S + BN - 1) / BN * BN;
	return (len + *span - 1) / *span;
}

} /* namespace */

extern "C" const char *
kvq_gpu_attn_prefill_refusal(const struct kvq_gpu_split_args *a)
{
	uint32_t G = a->n_kv_heads ? a->n_q_heads / a->n_kv_heads : 0;
	kern *k;

	if (KVQ_WARP_SIZE != 32)
		return "16x8x16 products and ldmatrix are emulated by shuffles "
		       "on 64-lane wavefronts (HIP): the split kernel is faster";
	if (a->head_dim != 64 && a->head_dim != 128)
		return "head_dim is not 64 or 128";
	if (G < 1 || G > MAXG)
		return "more than 8 query heads per KV head";
	if (a->k_type == KVQ_KV_F32 || a->v_type == KVQ_KV_F32)
		return "f32 pages (no f16 operands without rounding)";
	if (a->k_type < KVQ_KV_F16 || a->k_type > KVQ_KV_Q4 ||
	    a->v_type < KVQ_KV_F16 || a->v_type > KVQ_KV_Q4)
		return "unknown page type";
	if (a->k_center)
		return "centred keys (no q . R_p c term here)";
	if (a->q_stride % 4 || (uintptr_t)a->q % 16)
		return "query rows not 16-byte aligned";
	if (a->k_page_bytes % 16 || a->v_page_bytes % 16)
		return "page sizes not multiples of 16 bytes";
	if (a->n_kv_heads > 65535)
		return "more than 65535 KV heads";
	dev_query();
	if (dev_major < 8)
		return "compute capability below 8.0 (or no device)";
	k = pick(a);
	if (!k->state) {
		k->state = cudaFuncSetAttribute((const void *)k->fn,
				cudaFuncAttributeMaxDynamicSharedMemorySize,
				k->smem) == cudaSuccess ? 1 : -1;
		(void)cudaGetLastError();
	}
	if (k->state < 0)
		return "the device cannot give a block the shared memory it "
		       "needs";
	return NULL;
}

extern "C" int kvq_gpu_attn_prefill(const struct kvq_gpu_split_args *a,
				    void *stream)
{
	cudaStream_t st = (cudaStream_t)stream;
	dim3 grid;
	kern *k;
	pfp p;

	if (!a->n_kv_heads || !a->n_q_heads || a->n_q_heads % a->n_kv_heads ||
	    !a->page_tokens || !a->n_rows || a->n_sink > a->page_tokens ||
	    a->k_type < KVQ_KV_F32 || a->k_type > KVQ_KV_Q4 ||
	    a->v_type < KVQ_KV_F32 || a->v_type > KVQ_KV_Q4)
		return -EINVAL;
	if (kvq_gpu_attn_prefill_refusal(a))
		return -EOPNOTSUPP;
	p.a = *a;
	p.G = a->n_q_heads / a->n_kv_heads;
	p.BR = BM / p.G;
	p.scale = 1.4426950408889634f / sqrtf((float)a->head_dim);
	grid = dim3((a->n_rows + p.BR - 1) / p.BR, a->n_kv_heads);
	p.S = plan(a, grid.x * grid.y, &p.span);
	grid.z = p.S;
	k = pick(a);
	/* A dependent of the append: the launch overlaps its end. */
	kvq_launch(kvq_pdl_allowed(), k->fn, grid, dim3(NTH), k->smem, st, p);
	if (p.S > 1)
		kvq_launch(false, prefill_merge, dim3(a->n_rows, a->n_q_heads),
			   dim3(a->head_dim), 0, st, p, a->head_dim);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}
