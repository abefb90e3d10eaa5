/*
 * test_gpu_sample.c - the GPU sampling helpers (kernels/sample.h) against
 * their C twins in engine/sampler.c, on the device.
 *
 * Every case is a batch of rows of fresh random logits of one kind (wide,
 * LLM-like, coarse ties, -inf and NaN entries, a huge range, a tiny range
 * with signed zeros, all equal, one peak, no finite value, +inf) at vocab
 * sizes 1, 7, 32000 and 151936.  Outputs are poisoned before each launch
 * (ids -1, probabilities NaN).  One TAP line per case and helper:
 *
 *   argmax:  ids equal kvq_argmax()'s exactly.
 *   softmax: |gpu - ref| <= 2e-6 * ref + 1e-37 against kvq_softmax(), at
 *	      temperatures 1 and 0.6.  Both compute expf of the same f32
 *	      argument; the GPU's expf is within 2 ulp, glibc's within 1, the
 *	      sum (double, other order) and the division add about 1 ulp: at
 *	      most 4 ulp = 4.8e-7, so the bound has 4x headroom.  The absolute
 *	      term covers subnormal results.
 *   sample:  each row has its own settings (greedy, top-k, top-p, min-p
 *	      and mixes, temperatures 0.05 to 5) and uniform number u; the id
 *	      must equal kvq_sampler_sample_u()'s for that u, or else be a
 *	      near-tie: the twin gives the GPU's id when u moves by
 *	      +-NEAR_EPS, or top_p or min_p by a factor 1 +- NEAR_EPS.  The
 *	      GPU's running weights differ from the twin's by expf (2 + 1
 *	      ulp), fixed-point rounding (2^-41 a token) and dropped weights
 *	      below 2^-41, together under 1e-6 of the total for 152K tokens;
 *	      NEAR_EPS = 4e-6.  Near-ties are counted and printed and must
 *	      stay under 1% of the sampled rows; greedy rows must be exact.
 *	      One case runs twice and must give the same ids.
 *
 * Without a GPU: "1..0 # SKIP no GPU" and exit status 77.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampler.h"
#include "kernels/sample.h"
#include "tests/gpu/gpu_test_util.h"
#include "tap.h"

#ifdef KVQ_SAMPLE_GPU

#define NEAR_EPS 4e-6
#define SM_REL 2e-6
#define SM_ABS 1e-37

static uint64_t rng = 0x2545f4914f6cdd1dull;

static uint32_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)(rng >> 16);
}

/* Uniform in [0, 1). */
static float frand(void)
{
	return (float)(rnd() & 0xffffff) / 16777216.0f;
}

static float gauss(void)
{
	float a = frand() + 1e-7f, b = frand();

	return sqrtf(-2.0f * logf(a)) * cosf(6.2831853f * b);
}

enum kind {
	K_WIDE, K_LLM, K_TIES, K_NEG_INF, K_HUGE, K_TINY, K_EQUAL, K_PEAK,
	K_NO_FINITE, K_POS_INF, N_KINDS
};

static const char *const kind_name[N_KINDS] = {
	"wide", "llm", "ties", "neg_inf", "huge_range", "tiny_range",
	"all_equal", "one_peak", "no_finite", "pos_inf",
};

static void fill_row(float *x, uint32_t n, enum kind k)
{
	uint32_t i;

	for (i = 0; i < n; i++) {
		switch (k) {
		case K_WIDE:
			x[i] = 16.0f * frand() - 8.0f;
			break;
		case K_LLM:
			x[i] = 2.0f * gauss();
			break;
		case K_TIES:
			x[i] = roundf(frand() * 12.0f) * 0.5f;
			break;
		case K_NEG_INF:
			x[i] = rnd() % 10 < 3 ? -INFINITY :
			       rnd() % 50 == 0 ? NAN : 8.0f * frand() - 4.0f;
			break;
		case K_HUGE:
			x[i] = 2e4f * frand() - 1e4f;
			break;
		case K_TINY:
			x[i] = rnd() % 16 == 0 ? (rnd() & 1 ? -0.0f : 0.0f) :
			       1e-6f * frand() - 0.5e-6f;
			break;
		case K_EQUAL:
			x[i] = 3.0f;
			break;
		case K_PEAK:
			x[i] = 10.0f * frand() - 5.0f;
			break;
		case K_NO_FINITE:
			x[i] = rnd() & 1 ? NAN : -INFINITY;
			break;
		case K_POS_INF:
			x[i] = 8.0f * frand() - 4.0f;
			break;
		default:
			break;
		}
	}
	if (k == K_LLM)	/* a few clear favourites, as models have */
		for (i = 0; i < 20 && i < n; i++)
			x[rnd() % n] = 5.0f + 10.0f * frand();
	if (k == K_PEAK)
		x[rnd() % n] = 40.0f;
	if (k == K_POS_INF) {
		x[rnd() % n] = INFINITY;
		x[rnd() % n] = INFINITY;
	}
}

/* Per-row settings: every row of a launch takes the next of these. */
static const struct kvq_gpu_sample_params settings[] = {
	{ 1.0f, 0, 1.0f, 0.0f },	/* temperature only */
	{ 0.8f, 40, 0.95f, 0.05f },	/* the CPU sampler's defaults */
	{ 0.7f, 0, 0.9f, 0.0f },	/* top-p */
	{ 1.3f, 0, 1.0f, 0.1f },	/* min-p */
	{ 1.0f, 1000, 0.5f, 0.0f },	/* top-k, top-p */
	{ 2.0f, 50000, 0.99f, 0.001f },	/* wide everything */
	{ 0.0f, 40, 0.9f, 0.1f },	/* greedy by temperature */
	{ 1.0f, 1, 0.9f, 0.0f },	/* greedy by top-k */
	{ 0.05f, 0, 0.9f, 0.0f },	/* cold */
	{ 5.0f, 0, 0.999f, 0.0f },	/* hot, flat */
	{ 1.0f, 3, 1.0f, 0.0f },	/* small top-k */
	{ 1.0f, 100000, 1.0f, 0.0f },	/* top-k only */
	{ 0.9f, 0, 0.3f, 0.02f },	/* top-p, min-p */
};
#define N_SETTINGS (sizeof(settings) / sizeof(settings[0]))

static int is_greedy(const struct kvq_gpu_sample_params *g)
{
	return g->temperature <= 0.0f || g->top_k == 1;
}

static int32_t twin(const float *x, uint32_t n,
		    const struct kvq_gpu_sample_params *g, double u)
{
	struct kvq_sampler_params p = {
		.temperature = g->temperature,
		.top_k = g->top_k,
		.top_p = g->top_p,
		.min_p = g->min_p > 1.0f ? 1.0f : g->min_p,
		.seed = 1,
	};
	struct kvq_sampler s;
	int32_t tok;

	if (kvq_sampler_init(&s, &p, (int32_t)n))
		return -2;
	tok = kvq_sampler_sample_u(&s, x, u);
	kvq_sampler_fini(&s);
	return tok;
}

/* Whether the twin gives @got when u, top_p or min_p moves by NEAR_EPS. */
static int near_tie(const float *x, uint32_t n,
		    const struct kvq_gpu_sample_params *g, float u, int32_t got)
{
	struct kvq_gpu_sample_params q;
	double du;
	int sgn;

	for (sgn = -1; sgn <= 1; sgn += 2) {
		du = (double)u + sgn * NEAR_EPS;
		if (du < 0.0)
			du = 0.0;
		if (du >= 1.0)
			du = 1.0 - 0x1p-53;
		if (twin(x, n, g, du) == got)
			return 1;
		q = *g;
		q.top_p = (float)(g->top_p * (1.0 + sgn * NEAR_EPS));
		if (g->top_p < 1.0f && twin(x, n, &q, u) == got)
			return 1;
		q = *g;
		q.min_p = (float)(g->min_p * (1.0 + sgn * NEAR_EPS));
		if (g->min_p > 0.0f && twin(x, n, &q, u) == got)
			return 1;
	}
	return 0;
}

struct dbuf {
	float *logits, *probs, *u;
	int32_t *ids;
	struct kvq_gpu_sample_params *params;
};

static void dbuf_free(struct dbuf *d)
{
	kvq_test_gpu_free(d->logits);
	kvq_test_gpu_free(d->probs);
	kvq_test_gpu_free(d->u);
	kvq_test_gpu_free(d->ids);
	kvq_test_gpu_free(d->params);
	memset(d, 0, sizeof(*d));
}

static int dbuf_alloc(struct dbuf *d, uint32_t rows, uint32_t n)
{
	size_t cells = (size_t)rows * n;

	d->logits = kvq_test_gpu_alloc(cells * sizeof(float));
	d->probs = kvq_test_gpu_alloc(cells * sizeof(float));
	d->u = kvq_test_gpu_alloc(rows * sizeof(float));
	d->ids = kvq_test_gpu_alloc(rows * sizeof(int32_t));
	d->params = kvq_test_gpu_alloc(rows * sizeof(*d->params));
	if (!d->logits || !d->probs || !d->u || !d->ids || !d->params) {
		dbuf_free(d);
		return -1;
	}
	return 0;
}

/* Totals over all cases, for the near-tie line. */
static unsigned long g_sampled, g_near;

/* Launches @what on the device, waits, and says why it failed if so. */
static int finish(int ret, const char *what, const char *name)
{
	char why[256] = "";

	if (!ret && !kvq_test_gpu_sync(why, sizeof(why)))
		return 0;
	tap_ok(0, "%s %s: launch (%d %s)", what, name, ret, why);
	return -1;
}

static void run_case(enum kind k, uint32_t n, uint32_t reps)
{
	uint32_t rows = N_SETTINGS * reps, r, i;
	size_t cells = (size_t)rows * n;
	float *x = malloc(cells * sizeof(float));
	float *pg = malloc(cells * sizeof(float));
	float *pr = malloc((size_t)n * sizeof(float));
	float *u = malloc(rows * sizeof(float));
	int32_t *ids = malloc(rows * sizeof(int32_t));
	struct kvq_gpu_sample_params *sp = malloc(rows * sizeof(*sp));
	unsigned long am_bad = 0, eq = 0, near = 0, other = 0, sampled = 0;
	double max_rel = 0.0, max_abs = 0.0, max_sum = 0.0;
	int sm_bad = 0, t;
	char name[64];
	struct dbuf d;

	snprintf(name, sizeof(name), "%s_v%u", kind_name[k], n);
	if (!x || !pg || !pr || !u || !ids || !sp ||
	    dbuf_alloc(&d, rows, n)) {
		tap_ok(0, "%s: buffers", name);
		goto out_host;
	}
	for (r = 0; r < rows; r++) {
		fill_row(x + (size_t)r * n, n, k);
		sp[r] = settings[r % N_SETTINGS];
		u[r] = frand();
	}
	u[0] = 0.0f;
	u[rows - 1] = 0x1.fffffep-1f;	/* the largest float below 1 */
	if (kvq_test_gpu_put(d.logits, x, cells * sizeof(float)) ||
	    kvq_test_gpu_put(d.u, u, rows * sizeof(float)) ||
	    kvq_test_gpu_put(d.params, sp, rows * sizeof(*sp))) {
		tap_ok(0, "%s: upload", name);
		goto out_dev;
	}

	/* argmax */
	kvq_test_gpu_fill(d.ids, 0xff, rows * sizeof(int32_t));
	if (finish(kvq_gpu_argmax(d.logits, rows, n, d.ids, NULL), "argmax",
		   name) ||
	    kvq_test_gpu_get(ids, d.ids, rows * sizeof(int32_t)))
		goto out_dev;
	for (r = 0; r < rows; r++)
		am_bad += ids[r] != kvq_argmax(x + (size_t)r * n, (int32_t)n);
	tap_ok(!am_bad, "kvq_gpu_argmax_%s (%u rows, %lu differ)", name, rows,
	       am_bad);

	/* softmax at two temperatures */
	for (t = 0; t < 2; t++) {
		float temp = t ? 0.6f : 1.0f;

		kvq_test_gpu_fill(d.probs, 0xff, cells * sizeof(float));
		if (finish(kvq_gpu_softmax(d.logits, rows, n, temp, d.probs,
					   NULL), "softmax", name) ||
		    kvq_test_gpu_get(pg, d.probs, cells * sizeof(float)))
			goto out_dev;
		for (r = 0; r < rows; r++) {
			const float *g = pg + (size_t)r * n;
			double sum = 0.0;

			kvq_softmax(x + (size_t)r * n, (int32_t)n, temp, pr);
			for (i = 0; i < n; i++) {
				double e = fabs((double)g[i] - pr[i]);

				if (isnan(g[i]) || e > SM_REL * pr[i] + SM_ABS)
					sm_bad++;
				if (e > max_abs)
					max_abs = e;
				if (pr[i] > 1e-30f && e / pr[i] > max_rel)
					max_rel = e / pr[i];
				sum += g[i];
			}
			if (fabs(sum - 1.0) > max_sum)
				max_sum = fabs(sum - 1.0);
		}
	}
	tap_ok(!sm_bad && !(max_sum > 1e-4),
	       "kvq_gpu_softmax_%s (T 1 and 0.6, %u rows: max rel err %.2e, "
	       "max abs err %.2e, max |sum - 1| %.1e, %d over tolerance)",
	       name, rows, max_rel, max_abs, max_sum, sm_bad);

	/* filtered sampling, per-row settings */
	kvq_test_gpu_fill(d.ids, 0xff, rows * sizeof(int32_t));
	if (finish(kvq_gpu_sample(d.logits, rows, n, d.params, d.u, d.ids,
				  NULL), "sample", name) ||
	    kvq_test_gpu_get(ids, d.ids, rows * sizeof(int32_t)))
		goto out_dev;
	for (r = 0; r < rows; r++) {
		const float *row = x + (size_t)r * n;
		int32_t want = twin(row, n, &sp[r], u[r]);

		if (!is_greedy(&sp[r]))
			sampled++;
		if (ids[r] == want) {
			eq++;
		} else if (!is_greedy(&sp[r]) && ids[r] >= 0 &&
			   (uint32_t)ids[r] < n &&
			   near_tie(row, n, &sp[r], u[r], ids[r])) {
			near++;
			tap_diag("near-tie %s row %u (settings %u, u %.9g): "
				 "gpu %d, twin %d", name, r, r % N_SETTINGS,
				 u[r], ids[r], want);
		} else {
			other++;
			tap_diag("%s row %u (settings %u, u %.9g): gpu %d, "
				 "twin %d", name, r, r % N_SETTINGS, u[r],
				 ids[r], want);
		}
	}
	g_sampled += sampled;
	g_near += near;
	tap_ok(!other, "kvq_gpu_sample_%s (%u rows: %lu equal, %lu near-ties "
	       "within %.0e, %lu differ)", name, rows, eq, near, NEAR_EPS,
	       other);

	/* the same launch again gives the same ids */
	if (k == K_LLM && n > 1000) {
		int32_t *again = malloc(rows * sizeof(int32_t));

		kvq_test_gpu_fill(d.ids, 0xff, rows * sizeof(int32_t));
		if (again && !finish(kvq_gpu_sample(d.logits, rows, n,
						     d.params, d.u, d.ids,
						     NULL), "sample", name) &&
		    !kvq_test_gpu_get(again, d.ids, rows * sizeof(int32_t)))
			tap_ok(!memcmp(again, ids, rows * sizeof(int32_t)),
			       "kvq_gpu_sample_%s_repeatable", name);
		free(again);
	}
out_dev:
	dbuf_free(&d);
out_host:
	free(x);
	free(pg);
	free(pr);
	free(u);
	free(ids);
	free(sp);
}

static void args_rejected(void)
{
	struct kvq_gpu_sample_params sp = { 1.0f, 0, 1.0f, 0.0f };
	float *L = kvq_test_gpu_alloc(64 * sizeof(float));
	float *P = kvq_test_gpu_alloc(64 * sizeof(float));
	int32_t *ids = kvq_test_gpu_alloc(4 * sizeof(int32_t));
	void *prm = kvq_test_gpu_alloc(sizeof(sp));

	tap_ok(kvq_gpu_argmax(L, 1, 0, ids, NULL) == -EINVAL,
	       "kvq_gpu_argmax_empty_vocab_einval");
	tap_ok(kvq_gpu_argmax(L, 1, KVQ_GPU_SAMPLE_MAX_VOCAB + 1, ids,
			      NULL) == -EINVAL,
	       "kvq_gpu_argmax_vocab_too_big_einval");
	tap_ok(kvq_gpu_argmax(L, 0, 64, ids, NULL) == 0,
	       "kvq_gpu_argmax_no_rows_ok");
	tap_ok(kvq_gpu_softmax(L, 1, 64, 0.0f, P, NULL) == -EINVAL,
	       "kvq_gpu_softmax_zero_temperature_einval");
	tap_ok(kvq_gpu_softmax(L, 1, 64, 1e-45f, P, NULL) == -EINVAL,
	       "kvq_gpu_softmax_reciprocal_overflows_einval");
	tap_ok(kvq_gpu_softmax(L, 1, 64, NAN, P, NULL) == -EINVAL,
	       "kvq_gpu_softmax_nan_temperature_einval");
	tap_ok(kvq_gpu_sample(L, 1, 64, NULL, P, ids, NULL) == -EINVAL,
	       "kvq_gpu_sample_no_params_einval");
	tap_ok(kvq_gpu_sample(L, 1, 64, prm, NULL, ids, NULL) == -EINVAL,
	       "kvq_gpu_sample_no_u_einval");
	kvq_test_gpu_free(L);
	kvq_test_gpu_free(P);
	kvq_test_gpu_free(ids);
	kvq_test_gpu_free(prm);
}

int main(void)
{
	static const uint32_t vocab[4] = { 1, 7, 32000, 151936 };
	static const uint32_t reps[4] = { 4, 16, 3, 2 };
	char why[256] = "";
	int v, k;

	if (kvq_test_gpu_count(why, sizeof(why)) <= 0) {
		printf("1..0 # SKIP no GPU (%s)\n", why);
		return 77;
	}
	args_rejected();
	for (v = 0; v < 4; v++)
		for (k = 0; k < N_KINDS; k++)
			run_case((enum kind)k, vocab[v], reps[v]);
	tap_ok(g_near * 100 <= g_sampled,
	       "kvq_gpu_sample_near_ties_rare (%lu of %lu sampled rows, "
	       "at most 1%%)", g_near, g_sampled);
	return tap_done();
}
#else /* !KVQ_SAMPLE_GPU */

int main(void)
{
	printf("1..0 # SKIP no GPU (this build has no GPU backend)\n");
	return 77;
}
#endif /* KVQ_SAMPLE_GPU */
