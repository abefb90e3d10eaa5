/*
 * sample.cu - sampling on the GPU: argmax, softmax at a temperature, and
 * the CPU sampler's filtered draw (top-k, min-p, top-p), one block of
 * SMP_THREADS threads per row of f32 logits.
 *
 * Why this file exists: a decode step should hand the host one token id per
 * sequence, not a vocabulary of logits, and the GPU must choose the token
 * the CPU sampler would choose for the same logits, settings and random
 * number.  The plain-C twins are kvq_argmax(), kvq_softmax() and
 * kvq_sampler_sample_u() (engine/sampler.c); tests/gpu/test_gpu_sample.c
 * compares them.
 *
 * The draw.  The CPU sampler's choice is a chain of "the first token in
 * rank order where a running sum reaches a target": top-k (the count
 * reaches k), top-p (the weight reaches top_p times the total before
 * min-p), the draw (the kept weight passes u times its total).  Rank order
 * is that of a 64-bit key, the logit as an order-preserving integer,
 * inverted, then the token id, so each selection ends on one exact key and
 * each filter becomes "key <= limit" (min-p stays a per-token test).
 * A block does, for its row:
 *   1. one pass for the largest logit and its id (greedy rows stop here);
 *   2. one pass that puts every token in a bin by x = (l - max) / T, 32
 *      bins per unit of x down to x = -28.5 (below it exp(x) < 2^-41: the
 *      token weighs nothing here), and adds up per bin the tokens, their
 *      weights exp(x) and the weights min-p keeps, as integers in units of
 *      2^-40.  Bins follow rank order, so a selection first finds its bin
 *      from these sums;
 *   3. one more pass gathers the keys of that bin and of as many bins above
 *      it as fit in SMP_CAP, sorts them (bitonic, shared memory) and walks
 *      them with a block-wide prefix sum.  The next selections lie at or
 *      above the last one, so they usually find their bin already sorted:
 *      with top-k the top-k set is gathered once.  A bin of more tokens
 *      than SMP_CAP (equal or nearly equal logits) is narrowed by radix
 *      passes, 8 key bits below the part's common prefix at a time.
 * Why this way: sorting a 150K vocabulary costs much more than the 3 to 5
 * passes over a row that sits in L2, and integer sums compared against
 * exact keys make the result deterministic and the CPU sampler's rules
 * (ties to the lower id, top-p before min-p's renormalisation, the draw's
 * strict comparison) exact.  What differs from the twin is arithmetic: the
 * GPU's expf (within 2 ulp) against glibc's, fixed point against double
 * sums, and the zero weight of tokens below 2^-41, each at most about 1e-7
 * of a running sum for 152K tokens; so a token can differ only where u,
 * top_p or min_p lies within about 1e-6 (relative) of a boundary.  One
 * block per row leaves most of the GPU idle at batch 1: bench/gpu_sample
 * on an H200, a row of 32000 logits, 9 us greedy, 68 us with top-k 40
 * (the host: 26-41 us), 80 us over the whole vocabulary at T 0.8 (the
 * host: 590-930 us); 16 rows take as long as one.  So the engine samples
 * on the host steps of few rows with small top-k (engine/forward.c).
 *
 * Warps are taken as groups of KVQ_LANES (32) lanes, also on 64-wide HIP
 * wavefronts, whose halves then work as two groups.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/sample.h"

namespace {

typedef unsigned long long u64;

constexpr int SMP_THREADS = 512;
constexpr int SMP_GROUPS = SMP_THREADS / KVQ_LANES;
constexpr int SMP_BINS = 1024;			/* 912 used: 28.5 * 32 */
constexpr int SMP_BPT = SMP_BINS / SMP_THREADS;	/* bins a thread scans */
constexpr float SMP_BIN_SCALE = 32.0f;
constexpr float SMP_X_MIN = -28.5f;		/* exp(-28.5) < 2^-41 */
constexpr float SMP_FIX = 1099511627776.0f;	/* 2^40 */
constexpr int SMP_CAP = 2048;			/* keys sorted at once */
constexpr int SMP_EPT = SMP_CAP / SMP_THREADS;
constexpr int SMP_DIGITS = 256;

enum { MODE_COUNT, MODE_KEEP };

/* A token as the passes see it. */
struct elem {
	u64 key;	/* rank key: ascending = descending logit, then id */
	u64 f;		/* weight in units of 2^-40; 0 below the bins */
	int bin;	/* -1 below SMP_X_MIN */
	bool km;	/* min-p keeps it */
};

struct rowctx {
	const float *L;
	float lmax, inv_t, min_w;
	uint32_t n;
};

/* Running count, weight and kept weight up to some key. */
struct triple {
	u64 c, m, k;
};

/* The tokens of bins [blo, bhi] whose key starts with the plen bits pfx. */
struct seg {
	int blo, bhi;
	int plen;
	u64 pfx;
};

struct smem {
	unsigned cnt[SMP_BINS];
	u64 mass[SMP_BINS];	/* all weight (needed for top-k's total) */
	u64 keep[SMP_BINS];	/* weight kept: min-p, within the cuts */
	union {
		u64 keys[SMP_CAP];	/* the sorted part */
		struct {
			unsigned cnt[SMP_DIGITS];
			u64 mass[SMP_DIGITS], keep[SMP_DIGITS];
		} dig;		/* narrowing (buf is then invalid) */
	} u;
	u64 red[SMP_GROUPS];
	float redf[SMP_GROUPS];
	int redi[SMP_GROUPS];
	seg buf;		/* what u.keys holds */
	int nbuf;
	int fbin;
	u64 fval;
	int found;
	u64 fkey;
	triple fat;
};

/* ------------------------------------------------------ block helpers */

__device__ __forceinline__ int lane_id(void)
{
	return threadIdx.x & (KVQ_LANES - 1);
}

__device__ __forceinline__ int group_id(void)
{
	return threadIdx.x / KVQ_LANES;
}

__device__ __forceinline__ u64 shfl_u64(u64 v, int src)
{
	unsigned lo = kvq_shfl_u32((unsigned)v, src);
	unsigned hi = kvq_shfl_u32((unsigned)(v >> 32), src);

	return ((u64)hi << 32) | lo;
}

__device__ __forceinline__ double shfl_f64(double v, int src)
{
	return __longlong_as_double((long long)shfl_u64(
		(u64)__double_as_longlong(v), src));
}

/* Sum over the block, in every thread.  Every thread must call. */
__device__ u64 block_sum(u64 v, u64 *red)
{
	int m, i;

	for (m = KVQ_LANES / 2; m > 0; m >>= 1)
		v += shfl_u64(v, lane_id() ^ m);
	if (lane_id() == 0)
		red[group_id()] = v;
	__syncthreads();
	v = 0;
	for (i = 0; i < SMP_GROUPS; i++)
		v += red[i];
	__syncthreads();
	return v;
}

/* The same in double, in a fixed order (so deterministic). */
__device__ double block_sum_f64(double v, double *red)
{
	int m, i;

	for (m = KVQ_LANES / 2; m > 0; m >>= 1)
		v += shfl_f64(v, lane_id() ^ m);
	if (lane_id() == 0)
		red[group_id()] = v;
	__syncthreads();
	v = 0.0;
	for (i = 0; i < SMP_GROUPS; i++)
		v += red[i];
	__syncthreads();
	return v;
}

__device__ u64 block_min(u64 v, u64 *red)
{
	int m, i;

	for (m = KVQ_LANES / 2; m > 0; m >>= 1) {
		u64 o = shfl_u64(v, lane_id() ^ m);

		v = o < v ? o : v;
	}
	if (lane_id() == 0)
		red[group_id()] = v;
	__syncthreads();
	for (i = 0; i < SMP_GROUPS; i++)
		v = red[i] < v ? red[i] : v;
	__syncthreads();
	return v;
}

__device__ u64 block_max(u64 v, u64 *red)
{
	int m, i;

	for (m = KVQ_LANES / 2; m > 0; m >>= 1) {
		u64 o = shfl_u64(v, lane_id() ^ m);

		v = o > v ? o : v;
	}
	if (lane_id() == 0)
		red[group_id()] = v;
	__syncthreads();
	for (i = 0; i < SMP_GROUPS; i++)
		v = red[i] > v ? red[i] : v;
	__syncthreads();
	return v;
}

/*
 * Exclusive prefix sum of @v over the threads in order; *@total gets the
 * block's sum.  Every thread must call.
 */
__device__ u64 block_scan(u64 v, u64 *total, u64 *red)
{
	int lane = lane_id(), g = group_id(), d, i;
	u64 x = v, off = 0, tot = 0;

	for (d = 1; d < KVQ_LANES; d <<= 1) {
		u64 t = shfl_u64(x, (lane - d) & (KVQ_LANES - 1));

		if (lane >= d)
			x += t;
	}
	if (lane == KVQ_LANES - 1)
		red[g] = x;
	__syncthreads();
	for (i = 0; i < SMP_GROUPS; i++) {
		if (i < g)
			off += red[i];
		tot += red[i];
	}
	__syncthreads();
	*total = tot;
	return off + x - v;
}

/* ------------------------------------------------------ tokens */

/* NaN ranks as -inf, -0 as +0 (clean_logit() of engine/sampler.c). */
__device__ __forceinline__ float clean(float f)
{
	if (isnan(f))
		return -INFINITY;
	return f == 0.0f ? 0.0f : f;
}

/* rank_key() of engine/sampler.c. */
__device__ __forceinline__ u64 rank_key(float l, uint32_t id)
{
	unsigned u = __float_as_uint(l);

	u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
	return ((u64)~u << 32) | id;
}

__device__ __forceinline__ bool better(float v, int i, float bv, int bi)
{
	return v > bv || (v == bv && i < bi);
}

/*
 * f(i, L[i]) for this thread's tokens of the row @L of @n logits: 16-byte
 * loads, four in flight, where the row allows them (a pass with one
 * 4-byte load at a time waits on each).  Which thread takes which token
 * changes no result: every pass sums integers, keeps extremes with ties
 * broken by id, or gathers keys that are sorted afterwards.
 */
template <typename F>
__device__ __forceinline__ void for_tokens(const float *L, uint32_t n, F f)
{
	uint32_t t;

	if (!(n & 3) && !((uintptr_t)L & 15)) {
		const float4 *L4 = (const float4 *)L;

#pragma unroll 4
		for (t = threadIdx.x; t < n / 4; t += SMP_THREADS) {
			float4 v = L4[t];

			f(4 * t, v.x);
			f(4 * t + 1, v.y);
			f(4 * t + 2, v.z);
			f(4 * t + 3, v.w);
		}
		return;
	}
	for (t = threadIdx.x; t < n; t += SMP_THREADS)
		f(t, L[t]);
}

/* The largest clean logit of @L and its lowest index, in every thread. */
__device__ void block_argmax(const float *L, uint32_t n, float *redf,
			     int *redi, float *lmax, int *amax)
{
	float bv = -INFINITY;
	int bi = INT_MAX, m, i;

	for_tokens(L, n, [&](uint32_t j, float l) {
		float v = clean(l);

		if (better(v, (int)j, bv, bi)) {
			bv = v;
			bi = (int)j;
		}
	});
	for (m = KVQ_LANES / 2; m > 0; m >>= 1) {
		float ov = kvq_shfl_xor_f32(bv, m);
		int oi = (int)kvq_shfl_u32((unsigned)bi, lane_id() ^ m);

		if (better(ov, oi, bv, bi)) {
			bv = ov;
			bi = oi;
		}
	}
	if (lane_id() == 0) {
		redf[group_id()] = bv;
		redi[group_id()] = bi;
	}
	__syncthreads();
	bv = redf[0];
	bi = redi[0];
	for (i = 1; i < SMP_GROUPS; i++) {
		if (better(redf[i], redi[i], bv, bi)) {
			bv = redf[i];
			bi = redi[i];
		}
	}
	__syncthreads();
	*lmax = bv;
	*amax = bi;
}

/*
 * Token @i of the row: the CPU sampler's weight expf((l - max) * (1/T)),
 * as the same f32 operations, then in fixed point.
 */
__device__ __forceinline__ elem eval_l(const rowctx &r, uint32_t i, float raw)
{
	float l = clean(raw);
	float x = (l - r.lmax) * r.inv_t;
	elem e;

	e.key = rank_key(l, i);
	e.bin = -1;
	e.f = 0;
	e.km = false;
	if (x >= SMP_X_MIN) {
		float w = expf(x);

		e.bin = (int)(-x * SMP_BIN_SCALE);
		e.f = (u64)rintf(w * SMP_FIX);
		e.km = w >= r.min_w;
	}
	return e;
}

__device__ __forceinline__ elem eval(const rowctx &r, uint32_t i)
{
	return eval_l(r, i, r.L[i]);
}

__device__ __forceinline__ bool in_seg(const elem &e, const seg &s)
{
	if (e.bin < s.blo || e.bin > s.bhi)
		return false;
	return !s.plen || (e.key >> (64 - s.plen)) == s.pfx;
}

__device__ __forceinline__ bool reached(u64 acc, u64 target, bool strict)
{
	return strict ? acc > target : acc >= target;
}

/* ------------------------------------------------------ selection */

/*
 * The first bin whose running count (MODE_COUNT) or kept weight
 * (MODE_KEEP) reaches @target, or -1.
 */
__device__ int find_bin(smem &sm, int mode, u64 target, bool strict)
{
	int b0 = threadIdx.x * SMP_BPT, j, b;
	u64 v[SMP_BPT], s = 0, pre, tot;

	for (j = 0; j < SMP_BPT; j++) {
		v[j] = mode == MODE_COUNT ? sm.cnt[b0 + j] : sm.keep[b0 + j];
		s += v[j];
	}
	if (threadIdx.x == 0)
		sm.fbin = -1;
	pre = block_scan(s, &tot, sm.red);
	for (j = 0; j < SMP_BPT; j++) {
		if (reached(pre + v[j], target, strict) &&
		    !reached(pre, target, strict))
			sm.fbin = b0 + j;
		pre += v[j];
	}
	__syncthreads();
	b = sm.fbin;
	__syncthreads();
	return b;
}

/* Counts, weights and kept weights of the bins below @lim. */
__device__ triple bins_below(smem &sm, int lim)
{
	u64 c = 0, m = 0, k = 0;
	triple t;
	int b;

	for (b = threadIdx.x; b < lim; b += SMP_THREADS) {
		c += sm.cnt[b];
		m += sm.mass[b];
		k += sm.keep[b];
	}
	t.c = block_sum(c, sm.red);
	t.m = block_sum(m, sm.red);
	t.k = block_sum(k, sm.red);
	return t;
}

/* The first bin l <= @b such that bins l..b hold at most SMP_CAP tokens
 * (b itself when it alone holds more). */
__device__ int gather_start(smem &sm, int b)
{
	int b0 = threadIdx.x * SMP_BPT, j, lo;
	u64 v[SMP_BPT], s = 0, pre, tot;
	long long thr;

	for (j = 0; j < SMP_BPT; j++) {
		v[j] = sm.cnt[b0 + j];
		s += v[j];
	}
	if (threadIdx.x == 0)
		sm.fbin = b;
	pre = block_scan(s, &tot, sm.red);
	for (j = 0; j < SMP_BPT; j++) {
		if (b0 + j == b)
			sm.fval = pre + v[j];
		pre += v[j];
	}
	__syncthreads();
	thr = (long long)sm.fval - SMP_CAP;
	pre -= s;
	for (j = 0; j < SMP_BPT; j++) {
		if (b0 + j <= b && (long long)pre >= thr)
			atomicMin(&sm.fbin, b0 + j);
		pre += v[j];
	}
	__syncthreads();
	lo = sm.fbin;
	__syncthreads();
	return lo;
}

/* Puts the keys of segment @s (at most SMP_CAP) into sm.u.keys, sorted. */
__device__ void gather(smem &sm, const rowctx &r, seg s)
{
	int m, p, i, k, j;

	if (threadIdx.x == 0)
		sm.nbuf = 0;
	__syncthreads();
	for_tokens(r.L, r.n, [&](uint32_t t, float l) {
		elem e = eval_l(r, t, l);

		if (in_seg(e, s)) {
			int slot = atomicAdd(&sm.nbuf, 1);

			if (slot < SMP_CAP)
				sm.u.keys[slot] = e.key;
		}
	});
	__syncthreads();
	m = sm.nbuf < SMP_CAP ? sm.nbuf : SMP_CAP;
	for (p = 1; p < m; p <<= 1)
		;
	for (i = m + threadIdx.x; i < p; i += SMP_THREADS)
		sm.u.keys[i] = ~0ull;	/* no token has this key */
	__syncthreads();
	/* bitonic sort, ascending */
	for (k = 2; k <= p; k <<= 1) {
		for (j = k >> 1; j > 0; j >>= 1) {
			for (i = threadIdx.x; i < p; i += SMP_THREADS) {
				int x = i ^ j;

				if (x > i) {
					u64 a = sm.u.keys[i], b = sm.u.keys[x];
					bool up = !(i & k);

					if ((a > b) == up) {
						sm.u.keys[i] = b;
						sm.u.keys[x] = a;
					}
				}
			}
			__syncthreads();
		}
	}
	if (threadIdx.x == 0) {
		sm.nbuf = m;
		sm.buf = s;
	}
	__syncthreads();
}

/*
 * Narrows bin @b, too big to sort at once, to the part of at most SMP_CAP
 * tokens holding the selection's boundary, by the key's bits below the
 * part's common prefix, 8 a pass.  *@base enters as the running sums
 * before bin b and leaves as those before the part.
 */
__device__ seg narrow(smem &sm, const rowctx &r, u64 klim, int mode,
		      u64 target, bool strict, int b, triple *base)
{
	seg s = { b, b, 0, 0 };
	u64 n_in = sm.cnt[b];

	while (n_in > SMP_CAP) {
		u64 mn = ~0ull, mx = 0, v, pc, pm, pk, tot, dmask;
		int cp, dbits, shift, d;

		for_tokens(r.L, r.n, [&](uint32_t t, float l) {
			elem e = eval_l(r, t, l);

			if (in_seg(e, s)) {
				mn = e.key < mn ? e.key : mn;
				mx = e.key > mx ? e.key : mx;
			}
		});
		mn = block_min(mn, sm.red);
		mx = block_max(mx, sm.red);
		if (mn == mx)
			break;	/* one token: never more than SMP_CAP */
		cp = __clzll((long long)(mn ^ mx));
		dbits = 64 - cp < 8 ? 64 - cp : 8;
		shift = 64 - cp - dbits;
		dmask = (1ull << dbits) - 1;
		for (d = threadIdx.x; d < SMP_DIGITS; d += SMP_THREADS) {
			sm.u.dig.cnt[d] = 0;
			sm.u.dig.mass[d] = 0;
			sm.u.dig.keep[d] = 0;
		}
		if (threadIdx.x == 0)
			sm.buf.blo = -1;	/* the keys are overwritten */
		__syncthreads();
		for_tokens(r.L, r.n, [&](uint32_t t, float l) {
			elem e = eval_l(r, t, l);

			if (in_seg(e, s)) {
				int dd = (int)((e.key >> shift) & dmask);

				atomicAdd(&sm.u.dig.cnt[dd], 1u);
				atomicAdd(&sm.u.dig.mass[dd], e.f);
				if (e.key <= klim && e.km)
					atomicAdd(&sm.u.dig.keep[dd], e.f);
			}
		});
		__syncthreads();
		/* digits in order: one a thread (SMP_THREADS >= 256) */
		d = threadIdx.x;
		v = d < SMP_DIGITS ? sm.u.dig.cnt[d] : 0;
		pc = block_scan(v, &tot, sm.red);
		pm = block_scan(d < SMP_DIGITS ? sm.u.dig.mass[d] : 0, &tot,
				sm.red);
		pk = block_scan(d < SMP_DIGITS ? sm.u.dig.keep[d] : 0, &tot,
				sm.red);
		if (threadIdx.x == 0)
			sm.fbin = -1;
		__syncthreads();
		if (d < SMP_DIGITS) {
			u64 before = mode == MODE_COUNT ? base->c + pc :
					base->k + pk;
			u64 after = before + (mode == MODE_COUNT ? v :
					      sm.u.dig.keep[d]);

			if (reached(after, target, strict) &&
			    !reached(before, target, strict)) {
				sm.fbin = d;
				sm.fat.c = pc;
				sm.fat.m = pm;
				sm.fat.k = pk;
			}
		}
		__syncthreads();
		d = sm.fbin;
		if (d < 0)
			break;	/* sums and tokens disagree: never */
		base->c += sm.fat.c;
		base->m += sm.fat.m;
		base->k += sm.fat.k;
		n_in = sm.u.dig.cnt[d];
		s.pfx = ((mn >> shift) & ~dmask) | (u64)d;
		s.plen = 64 - shift;
		__syncthreads();
	}
	return s;
}

/*
 * Walks the sorted keys, whose running sums start at @base, to the first
 * where the running count or kept weight (tokens with key <= @klim that
 * min-p keeps) reaches @target.  Returns whether there is one, with its
 * key and the running sums through it.
 */
__device__ bool walk(smem &sm, const rowctx &r, u64 klim, int mode,
		     u64 target, bool strict, triple base, u64 *key,
		     triple *at)
{
	int nb = sm.nbuf, j0 = threadIdx.x * SMP_EPT, e, found;
	u64 m[SMP_EPT], k[SMP_EPT], sum_m = 0, sum_k = 0, tot;
	triple run;

	for (e = 0; e < SMP_EPT; e++) {
		m[e] = 0;
		k[e] = 0;
		if (j0 + e < nb) {
			u64 kk = sm.u.keys[j0 + e];
			elem el = eval(r, (uint32_t)kk);

			m[e] = el.f;
			k[e] = kk <= klim && el.km ? el.f : 0;
		}
		sum_m += m[e];
		sum_k += k[e];
	}
	run.m = base.m + block_scan(sum_m, &tot, sm.red);
	run.k = base.k + block_scan(sum_k, &tot, sm.red);
	run.c = base.c + (u64)(j0 < nb ? j0 : nb);
	if (threadIdx.x == 0)
		sm.found = 0;
	__syncthreads();
	for (e = 0; e < SMP_EPT && j0 + e < nb; e++) {
		triple nx = { run.c + 1, run.m + m[e], run.k + k[e] };
		u64 before = mode == MODE_COUNT ? run.c : run.k;
		u64 after = mode == MODE_COUNT ? nx.c : nx.k;

		if (reached(after, target, strict) &&
		    !reached(before, target, strict)) {
			sm.found = 1;
			sm.fkey = sm.u.keys[j0 + e];
			sm.fat = nx;
		}
		run = nx;
	}
	__syncthreads();
	found = sm.found;
	*key = sm.fkey;
	*at = sm.fat;
	__syncthreads();
	return found;
}

/*
 * The first key in rank order where the row's running count (MODE_COUNT)
 * or kept weight (MODE_KEEP) reaches @target.  Returns whether found (the
 * callers' targets always are), with the key, its bin and the running
 * sums through it.
 */
__device__ bool select_key(smem &sm, const rowctx &r, u64 klim, int mode,
		       u64 target, bool strict, u64 *key, int *bin,
		       triple *at)
{
	int b = find_bin(sm, mode, target, strict);
	seg s = sm.buf;
	triple base;

	if (b < 0)
		return false;
	*bin = b;
	if (!s.plen && s.blo <= b && b <= s.bhi) {
		base = bins_below(sm, s.blo);
	} else if (sm.cnt[b] <= SMP_CAP) {
		s.blo = gather_start(sm, b);
		s.bhi = b;
		s.plen = 0;
		s.pfx = 0;
		gather(sm, r, s);
		base = bins_below(sm, s.blo);
	} else {
		base = bins_below(sm, b);
		s = narrow(sm, r, klim, mode, target, strict, b, &base);
		if (sm.buf.blo != s.blo || sm.buf.plen != s.plen ||
		    sm.buf.pfx != s.pfx)
			gather(sm, r, s);
	}
	return walk(sm, r, klim, mode, target, strict, base, key, at);
}

/*
 * After a cut at the key with running kept weight @k_at in bin @b: bin b
 * keeps the weight up to the cut, the bins below it none.
 */
__device__ void cut_bins(smem &sm, int b, u64 k_at)
{
	triple below = bins_below(sm, b);
	int i;

	if (threadIdx.x == 0)
		sm.keep[b] = k_at - below.k;
	for (i = b + 1 + threadIdx.x; i < SMP_BINS; i += SMP_THREADS)
		sm.keep[i] = 0;
	__syncthreads();
}

/* Greedy settings, and those the CPU sampler rejects. */
__device__ bool greedy(const struct kvq_gpu_sample_params &p)
{
	if (!(p.temperature > 0.0f) || isinf(p.temperature) ||
	    isinf(1.0f / p.temperature))
		return true;
	if (!(p.top_p > 0.0f) || !(p.min_p <= 1.0f))
		return true;
	return p.top_k == 1;
}

/* One block a row, few rows: room for the registers of for_tokens()'s
 * unrolled passes (without the 1, ptxas held it to 64 and spilled). */
__global__ void __launch_bounds__(SMP_THREADS, 1)
sample_kernel(const float *logits, uint32_t n,
	      const struct kvq_gpu_sample_params *params, const float *uu,
	      int32_t *ids)
{
	__shared__ smem sm;
	struct kvq_gpu_sample_params p = params[blockIdx.x];
	rowctx r;
	u64 z = 0, klim = ~0ull, t2, key, rr;
	triple at;
	int amax, b, i, topk;
	bool topp, need_mass;
	double rd;

	r.L = logits + (size_t)blockIdx.x * n;
	r.n = n;
	block_argmax(r.L, n, sm.redf, sm.redi, &r.lmax, &amax);
	if (greedy(p) || !isfinite(r.lmax)) {
		if (threadIdx.x == 0)
			ids[blockIdx.x] = amax;
		return;
	}
	r.inv_t = 1.0f / p.temperature;
	r.min_w = p.min_p > 0.0f ? p.min_p : 0.0f;
	topk = p.top_k > 0 && (uint32_t)p.top_k < n;
	topp = p.top_p < 1.0f;
	need_mass = topk && topp;

	for (i = threadIdx.x; i < SMP_BINS; i += SMP_THREADS) {
		sm.cnt[i] = 0;
		sm.mass[i] = 0;
		sm.keep[i] = 0;
	}
	if (threadIdx.x == 0) {
		sm.buf.blo = -1;
		sm.buf.bhi = -2;
		sm.buf.plen = 0;
		sm.buf.pfx = 0;
	}
	__syncthreads();
	for_tokens(r.L, n, [&](uint32_t t, float l) {
		elem e = eval_l(r, t, l);

		if (e.bin < 0)
			return;
		atomicAdd(&sm.cnt[e.bin], 1u);
		if (need_mass)
			atomicAdd(&sm.mass[e.bin], e.f);
		if (e.km)
			atomicAdd(&sm.keep[e.bin], e.f);
		z += e.f;
	});
	__syncthreads();
	z = block_sum(z, sm.red);

	/* top-k: the k-th key; when it lies below the bins, every binned
	 * token is in, and those below weigh nothing here */
	if (topk && select_key(sm, r, klim, MODE_COUNT, (u64)p.top_k, false,
			   &key, &b, &at)) {
		klim = key;
		z = at.m;
		cut_bins(sm, b, at.k);
	}
	t2 = 0;
	for (i = 0; i < SMP_BPT; i++)
		t2 += sm.keep[threadIdx.x * SMP_BPT + i];
	t2 = block_sum(t2, sm.red);

	/* top-p over what min-p keeps, against the total before min-p */
	if (topp) {
		u64 tgt = (u64)ceil((double)p.top_p * (double)z);

		if (!tgt)
			tgt = 1;
		if (t2 >= tgt && select_key(sm, r, klim, MODE_KEEP, tgt, false,
					&key, &b, &at)) {
			klim = key;
			t2 = at.k;
			cut_bins(sm, b, at.k);
		}
	}

	/* the draw: the first kept key whose running weight passes u * t2 */
	rd = floor((double)uu[blockIdx.x] * (double)t2);
	rr = !(rd > 0.0) ? 0 : rd >= (double)t2 ? t2 - 1 : (u64)rd;
	if (t2 && select_key(sm, r, klim, MODE_KEEP, rr, true, &key, &b, &at))
		amax = (int)(uint32_t)key;
	if (threadIdx.x == 0)
		ids[blockIdx.x] = amax;
}

__global__ void __launch_bounds__(SMP_THREADS)
argmax_kernel(const float *logits, uint32_t n, int32_t *ids)
{
	__shared__ float redf[SMP_GROUPS];
	__shared__ int redi[SMP_GROUPS];
	float lmax;
	int amax;

	block_argmax(logits + (size_t)blockIdx.x * n, n, redf, redi, &lmax,
		     &amax);
	if (threadIdx.x == 0)
		ids[blockIdx.x] = amax;
}

__global__ void __launch_bounds__(SMP_THREADS)
softmax_kernel(const float *logits, uint32_t n, float inv_t, float *probs)
{
	__shared__ float redf[SMP_GROUPS];
	__shared__ int redi[SMP_GROUPS];
	__shared__ u64 red[SMP_GROUPS];
	__shared__ double redd[SMP_GROUPS];
	const float *L = logits + (size_t)blockIdx.x * n;
	float *P = probs + (size_t)blockIdx.x * n, lmax;
	double z = 0.0;
	uint32_t i;
	int amax;

	block_argmax(L, n, redf, redi, &lmax, &amax);
	if (!isfinite(lmax)) {
		/* the logits equal to the maximum share probability 1 */
		u64 c = 0;
		float q;

		for (i = threadIdx.x; i < n; i += SMP_THREADS)
			c += clean(L[i]) == lmax;
		c = block_sum(c, red);
		q = 1.0f / (float)c;
		for (i = threadIdx.x; i < n; i += SMP_THREADS)
			P[i] = clean(L[i]) == lmax ? q : 0.0f;
		return;
	}
	for (i = threadIdx.x; i < n; i += SMP_THREADS)
		z += expf((clean(L[i]) - lmax) * inv_t);
	z = block_sum_f64(z, redd);
	for (i = threadIdx.x; i < n; i += SMP_THREADS)
		P[i] = (float)((double)expf((clean(L[i]) - lmax) * inv_t) / z);
}

int check_rows(const float *logits, uint32_t n_vocab, const void *out)
{
	if (!logits || !out || !n_vocab || n_vocab > KVQ_GPU_SAMPLE_MAX_VOCAB)
		return -EINVAL;
	return 0;
}

} /* namespace */

extern "C" int kvq_gpu_argmax(const float *logits, uint32_t n_rows,
			      uint32_t n_vocab, int32_t *ids, void *stream)
{
	int ret = check_rows(logits, n_vocab, ids);

	if (ret)
		return ret;
	if (n_rows > INT_MAX)
		return -EINVAL;
	if (!n_rows)
		return 0;
	argmax_kernel<<<n_rows, SMP_THREADS, 0, (cudaStream_t)stream>>>(
		logits, n_vocab, ids);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}

extern "C" int kvq_gpu_softmax(const float *logits, uint32_t n_rows,
			       uint32_t n_vocab, float temperature,
			       float *probs, void *stream)
{
	int ret = check_rows(logits, n_vocab, probs);
	float inv_t;

	if (ret)
		return ret;
	if (!(temperature > 0.0f) || isinf(temperature))
		return -EINVAL;
	inv_t = 1.0f / temperature;
	if (isinf(inv_t) || n_rows > INT_MAX)
		return -EINVAL;
	if (!n_rows)
		return 0;
	softmax_kernel<<<n_rows, SMP_THREADS, 0, (cudaStream_t)stream>>>(
		logits, n_vocab, inv_t, probs);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}

extern "C" int kvq_gpu_sample(const float *logits, uint32_t n_rows,
			      uint32_t n_vocab,
			      const struct kvq_gpu_sample_params *params,
			      const float *u, int32_t *ids, void *stream)
{
	int ret = check_rows(logits, n_vocab, ids);

	if (ret)
		return ret;
	if (!params || !u || n_rows > INT_MAX)
		return -EINVAL;
	if (!n_rows)
		return 0;
	sample_kernel<<<n_rows, SMP_THREADS, 0, (cudaStream_t)stream>>>(
		logits, n_vocab, params, u, ids);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}
