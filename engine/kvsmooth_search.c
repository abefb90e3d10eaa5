/*
 * kvsmooth_search.c - the per-head transform search of KV smoothing (see
 * kvsmooth.h): from the keys, values and weights kvsmooth.c recorded
 * (struct acts), each KV head's exponent and phase per channel (struct
 * shape) that most lowers the predicted quantization error, by coordinate
 * descent.  kvsmooth.c folds what is chosen into the weights; what the
 * two share is in kvsmooth_impl.h.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/kvsmooth_impl.h"
#include "engine/quant.h"
#include "engine/threadpool.h"

#define N_PHASE 8	/* pair rotations tried: k * pi/16, k < N_PHASE */
#define E_RANGE 4	/* exponents tried: -E_RANGE..E_RANGE */
#define N_SWEEP 3	/* coordinate descent passes at most */
/*
 * The search looks at up to SEARCH_CHANNELS / head_dim calibration tokens
 * (512 for a head of 8, 128 for 32), every n-th of them so that every
 * prompt and every position range is seen: its time grows with tokens x
 * channels.
 */
#define SEARCH_CHANNELS 4096
#define MIN_SEARCH_TOKENS 128

static double cos_ph[N_PHASE], sin_ph[N_PHASE];
static double pow2_tab[4 * E_RANGE + 1];	/* 2^e, |e| <= 2 E_RANGE */
static pthread_once_t phase_once = PTHREAD_ONCE_INIT;

static void phase_init(void)
{
	int i;

	for (i = 0; i < N_PHASE; i++) {
		cos_ph[i] = cos(i * M_PI / 16);
		sin_ph[i] = sin(i * M_PI / 16);
	}
	for (i = -2 * E_RANGE; i <= 2 * E_RANGE; i++)
		pow2_tab[i + 2 * E_RANGE] = ldexp(1.0, i);
}

/* ldexp(x, e), by a table while e is small (the same result: exact). */
static inline double scale2(double x, int e)
{
	if (e >= -2 * E_RANGE && e <= 2 * E_RANGE)
		return x * pow2_tab[e + 2 * E_RANGE];
	return ldexp(x, e);
}

/*
 * One head of one half, as the search sees it.  A unit is a channel, or
 * a rotated pair (c, p = part[c] > c); W is block diagonal, so the cost of
 * a token is a sum over units, each depending only on its own values and
 * on the scale of its channels' groups.
 */
struct head {
	const float *x;		/* first row; rows @stride apart */
	size_t stride;
	uint32_t n_tok, hd, group;
	const double *w;	/* W[c][c] at c, W[c][part(c)] at hd + c */
	enum kvq_kv_type type;	/* q8 or q4 */
	int qmax, qmin;
	bool rotate;		/* phases other than 0 allowed */
	uint32_t part[KVQ_KV_MAX_HEAD_DIM];
	float *in;		/* [n_tok][hd]: x as stored under the shape */
	double *rest;		/* [n_tok]: see search_unit() */
	float *amr;		/* [n_tok][2] */
};

/* The f16 group scale the cache derives from @amax. */
static inline float group_scale(const struct head *h, float amax)
{
	return kvq_f16_to_f32(kvq_f32_to_f16(amax / h->qmax));
}

/* What the cache reads back for @v stored with scale @sc. */
static inline float dequant(const struct head *h, float v, float sc)
{
	float inv = sc > 0.0f ? 1.0f / sc : 0.0f;
	int q = (int)roundf(v * inv);

	q = q < h->qmin ? h->qmin : q > h->qmax ? h->qmax : q;
	return sc * (float)q;
}

/* The unit (c, p)'s stored values for original values @xc, @xp. */
static inline void unit_in(const struct shape *s, uint32_t c, uint32_t p,
			   float xc, float xp, float *a, float *b)
{
	double u = xc, v = xp;

	if (p != c && s->ph[c]) {
		u = cos_ph[s->ph[c]] * xc - sin_ph[s->ph[c]] * xp;
		v = sin_ph[s->ph[c]] * xc + cos_ph[s->ph[c]] * xp;
	}
	*a = (float)scale2(u, -s->e[c]);
	*b = (float)scale2(v, -s->e[c]);
}

/* d^T W d of unit (c, p) stored as (a, b) with scales (sa, sb). */
static inline double unit_cost(const struct head *h, const struct shape *s,
			       uint32_t c, uint32_t p, float a, float b,
			       float sa, float sb)
{
	double da = scale2((double)a - dequant(h, a, sa), s->e[c]), db, t;

	if (p == c)
		return h->w[c] * da * da;
	db = scale2((double)b - dequant(h, b, sb), s->e[c]);
	if (s->ph[c]) {		/* back to the original basis */
		t = cos_ph[s->ph[c]] * da + sin_ph[s->ph[c]] * db;
		db = -sin_ph[s->ph[c]] * da + cos_ph[s->ph[c]] * db;
		da = t;
	}
	return h->w[c] * da * da + h->w[p] * db * db +
	       2 * h->w[h->hd + c] * da * db;
}

/* Cost of token row @in (stored values under @s). */
static double row_cost(const struct head *h, const struct shape *s,
		       const float *in)
{
	float sc[KVQ_KV_MAX_HEAD_DIM / 2];
	uint32_t c, g, ng = h->hd / h->group;
	double sum = 0;

	for (g = 0; g < ng; g++) {
		float amax = 0;

		for (c = g * h->group; c < (g + 1) * h->group; c++)
			amax = fabsf(in[c]) > amax ? fabsf(in[c]) : amax;
		sc[g] = group_scale(h, amax);
	}
	for (c = 0; c < h->hd; c++) {
		uint32_t p = h->part[c];

		if (p >= c)
			sum += unit_cost(h, s, c, p, in[c], in[p],
					 sc[c / h->group], sc[p / h->group]);
	}
	return sum;
}

/* Stored values of every token under @s, and the total cost. */
static double fill_in(struct head *h, const struct shape *s)
{
	uint32_t t, c;
	double sum = 0;

	for (t = 0; t < h->n_tok; t++) {
		const float *x = h->x + t * h->stride;
		float *in = h->in + (size_t)t * h->hd;

		for (c = 0; c < h->hd; c++) {
			uint32_t p = h->part[c];

			if (p >= c)
				unit_in(s, c, p, x[c], x[p], &in[c], &in[p]);
		}
		sum += row_cost(h, s, in);
	}
	return sum;
}

/*
 * The best exponent and phase for unit (c, p), the rest of @s held;
 * @best is the cost of @s on entry and of the result on return.
 *
 * For each token, rest[t] is the cost of every other unit when the
 * groups of c and p are scaled by the largest other value in them
 * (amr[t]).  A candidate whose values stay within amr leaves those scales
 * alone and costs rest[t] + its own unit: O(1) a token; one that becomes
 * its group's largest value changes the group's scale and the token is
 * costed in full.  A candidate is dropped as soon as its running sum
 * passes the best.
 */
static bool search_unit(struct head *h, struct shape *s, uint32_t c,
			double *best)
{
	uint32_t p = h->part[c], gc = c / h->group, gp = p / h->group, t, i;
	int nph = h->rotate && p != c ? N_PHASE : 1, x, f;
	int be = s->e[c], bf = s->ph[c];
	float row[KVQ_KV_MAX_HEAD_DIM];
	bool changed = false;

	for (t = 0; t < h->n_tok; t++) {
		const float *in = h->in + (size_t)t * h->hd;
		float sc[KVQ_KV_MAX_HEAD_DIM / 2], am[2] = { 0, 0 };
		uint32_t g, ng = h->hd / h->group, k;
		double sum = 0;

		for (g = 0; g < ng; g++) {
			float amax = 0;

			for (k = g * h->group; k < (g + 1) * h->group; k++) {
				if (g != gc && g != gp)
					amax = fmaxf(amax, fabsf(in[k]));
				else if (k != c && k != p)
					amax = fmaxf(amax, fabsf(in[k]));
			}
			sc[g] = group_scale(h, amax);
			if (g == gc)
				am[0] = amax;
			if (g == gp)
				am[1] = amax;
		}
		for (k = 0; k < h->hd; k++) {
			uint32_t q = h->part[k];

			if (q >= k && k != c)
				sum += unit_cost(h, s, k, q, in[k], in[q],
						 sc[k / h->group],
						 sc[q / h->group]);
		}
		h->rest[t] = sum;
		h->amr[2 * t] = am[0];
		h->amr[2 * t + 1] = am[1];
	}
	for (f = 0; f < nph; f++) {
		for (x = -E_RANGE; x <= E_RANGE; x++) {
			double sum = 0;

			if (x == be && f == bf)
				continue;
			s->e[c] = s->e[p] = (int8_t)x;
			s->ph[c] = s->ph[p] = (uint8_t)f;
			for (t = 0; t < h->n_tok && sum < *best; t++) {
				const float *xr = h->x + t * h->stride;
				float a, b, ac = h->amr[2 * t],
				      ap = h->amr[2 * t + 1];

				unit_in(s, c, p, xr[c], xr[p], &a, &b);
				if (fabsf(a) <= ac && fabsf(b) <= ap &&
				    (gc != gp || fabsf(b) <= ac)) {
					sum += h->rest[t] + unit_cost(h, s, c,
						p, a, b, group_scale(h, ac),
						group_scale(h, ap));
					continue;
				}
				memcpy(row, h->in + (size_t)t * h->hd,
				       h->hd * sizeof(float));
				row[c] = a;
				row[p] = b;
				sum += row_cost(h, s, row);
			}
			if (sum < *best * (1 - 1e-9)) {
				*best = sum;
				be = x;
				bf = f;
				changed = true;
			}
		}
	}
	s->e[c] = s->e[p] = (int8_t)be;
	s->ph[c] = s->ph[p] = (uint8_t)bf;
	for (i = 0; changed && i < h->n_tok; i++) {
		const float *xr = h->x + i * h->stride;
		float *in = h->in + (size_t)i * h->hd;

		unit_in(s, c, p, xr[c], xr[p], &in[c], &in[p]);
	}
	return changed;
}

/* sum x^T W x: the scale of the costs. */
static double head_norm(const struct head *h)
{
	uint32_t t, c;
	double sum = 0;

	for (t = 0; t < h->n_tok; t++) {
		const float *x = h->x + t * h->stride;

		for (c = 0; c < h->hd; c++)
			sum += x[c] * (h->w[c] * x[c] +
				       h->w[h->hd + c] * x[h->part[c]]);
	}
	return sum;
}

/*
 * Coordinate descent from the identity: each unit in turn gets its best
 * exponent and phase, the others held, until a pass changes nothing.
 * Exponents end centred on 0.  Costs before and after, and the norm, go
 * to @cost[0..2].  Returns 0 or -ENOMEM.
 */
static int search(struct head *h, struct shape *s, bool run, double *cost)
{
	uint32_t c, sweep;
	double best;
	long sum = 0;
	int ret = -ENOMEM;

	memset(s, 0, sizeof(*s));
	h->in = malloc((size_t)h->n_tok * h->hd * sizeof(float));
	h->rest = malloc(h->n_tok * sizeof(double));
	h->amr = malloc(2 * (size_t)h->n_tok * sizeof(float));
	if (!h->in || !h->rest || !h->amr)
		goto out;
	best = fill_in(h, s);
	cost[0] = best;
	cost[2] = head_norm(h);
	for (sweep = 0; run && sweep < N_SWEEP && best > 0; sweep++) {
		bool changed = false;

		for (c = 0; c < h->hd; c++)
			if (h->part[c] >= c)
				changed |= search_unit(h, s, c, &best);
		if (!changed)
			break;
	}
	for (c = 0; c < h->hd; c++)
		sum += s->e[c];
	/* Scaling a whole head by 2^m changes no cost: centre the
	 * exponents so the weights keep their magnitude. */
	sum = lround((double)sum / h->hd);
	for (c = 0; c < h->hd; c++)
		s->e[c] = (int8_t)(s->e[c] - sum);
	cost[1] = best;
	ret = 0;
out:
	free(h->in);
	free(h->rest);
	free(h->amr);
	return ret;
}

static void plan_head(struct plan *pl, uint32_t j)
{
	const struct acts *a = pl->a;
	uint32_t l = j / (2 * a->nkv), h = (j / 2) % a->nkv, c;
	bool v = j % 2;
	uint8_t ty = v ? pl->type_v[l] : pl->type_k[l];
	double *cost = pl->cost + 3 * (size_t)j;
	struct shape *s = (v ? pl->sv : pl->sk) + (size_t)l * a->nkv + h;
	struct head hh = { 0 };
	uint32_t max_tok = SEARCH_CHANNELS / a->hd, step;

	memset(s, 0, sizeof(*s));
	if ((ty != KVQ_KV_Q8 && ty != KVQ_KV_Q4) || (v && !pl->v_ok[l]))
		return;
	max_tok = max_tok > MIN_SEARCH_TOKENS ? max_tok : MIN_SEARCH_TOKENS;
	step = a->n_tok > max_tok ? (a->n_tok + max_tok - 1) / max_tok : 1;
	hh.x = (v ? a->v : a->k) + (size_t)l * a->cap * a->kvd + h * a->hd;
	hh.stride = (size_t)a->kvd * step;
	hh.n_tok = a->n_tok / step;
	hh.hd = a->hd;
	hh.group = a->hd < 32 ? a->hd : 32;
	hh.w = head_w(a, v ? a->wv : a->wk, l, h);
	hh.type = (enum kvq_kv_type)ty;
	hh.qmax = ty == KVQ_KV_Q8 ? 127 : 7;
	hh.qmin = ty == KVQ_KV_Q8 ? -127 : -8;
	hh.rotate = !v && pl->rot_ok[l];
	for (c = 0; c < a->hd; c++)
		hh.part[c] = v ? c : rope_partner(a->hp, c);
	if (search(&hh, s, pl->search, cost))
		__atomic_store_n(&pl->err, -ENOMEM, __ATOMIC_RELAXED);
}

static void plan_worker(void *arg, int i, int n)
{
	struct plan *pl = arg;
	uint32_t j, total = 2 * pl->a->nl * pl->a->nkv;

	for (j = (uint32_t)i; j < total; j += (uint32_t)n)
		plan_head(pl, j);
}

void kvq_kv_smooth_plan_errors(const struct plan *pl, const struct plan *ref,
			       bool after, double *k_err, double *v_err)
{
	double num[2] = { 0, 0 }, den[2] = { 0, 0 };
	uint32_t j, total = 2 * pl->a->nl * pl->a->nkv;

	for (j = 0; j < total; j++) {
		num[j % 2] += pl->cost[3 * j + (after ? 1 : 0)];
		den[j % 2] += ref->cost[3 * j + 2];
	}
	*k_err = den[0] > 0 ? sqrt(num[0] / den[0]) : 0;
	*v_err = den[1] > 0 ? sqrt(num[1] / den[1]) : 0;
}

int kvq_kv_smooth_plan_run(struct kvq_pool *pool, struct plan *pl,
			   const struct acts *a)
{
	size_t nh = (size_t)a->nl * a->nkv;

	pthread_once(&phase_once, phase_init);
	pl->a = a;
	pl->sk = calloc(nh, sizeof(*pl->sk));
	pl->sv = calloc(nh, sizeof(*pl->sv));
	pl->cost = calloc(nh * 2 * 3, sizeof(double));
	if (!pl->sk || !pl->sv || !pl->cost)
		return -ENOMEM;
	kvq_pool_run(pool, plan_worker, pl);
	return pl->err;
}

void kvq_kv_smooth_plan_free(struct plan *pl)
{
	free(pl->sk);
	free(pl->sv);
	free(pl->cost);
}

void kvq_kv_smooth_phase(unsigned int ph, double *cs, double *sn)
{
	pthread_once(&phase_once, phase_init);
	*cs = cos_ph[ph];
	*sn = sin_ph[ph];
}
