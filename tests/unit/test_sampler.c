/*
 * test_sampler.c - unit tests for engine/sampler.c.
 *
 * Why this file exists: the sampler's promises (greedy is argmax, a seed
 * fixes the tokens, each filter keeps exactly the tokens it documents, and
 * sampling follows the renormalised probabilities) are checked here on
 * small, known distributions and on a large random vocabulary.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tap.h"
#include "engine/sampler.h"

#define BIG_VOCAB 150000
#define N_DRAWS 10000

static uint64_t test_rng = 88172645463325252ull;

/* xorshift64: the tests' own randomness, apart from the sampler's. */
static double test_uniform(void)
{
	test_rng ^= test_rng << 13;
	test_rng ^= test_rng >> 7;
	test_rng ^= test_rng << 17;
	return (double)(test_rng >> 11) * 0x1.0p-53;
}

static void random_logits(float *x, int n, float scale)
{
	int i;

	for (i = 0; i < n; i++)
		x[i] = (float)((test_uniform() * 2.0 - 1.0) * scale);
}

static struct kvq_sampler_params params(float temp, int top_k, float top_p,
					float min_p, uint64_t seed)
{
	struct kvq_sampler_params p = {
		.temperature = temp,
		.top_k = top_k,
		.top_p = top_p,
		.min_p = min_p,
		.seed = seed,
	};

	return p;
}

static void test_argmax_ties(void)
{
	float x[8] = { 0.5f, 2.0f, -1.0f, 3.0f, 3.0f, 1.0f, 3.0f, -0.0f };
	float z[3] = { -0.0f, 0.0f, -1.0f };
	float nan_first[3] = { NAN, -5.0f, -5.0f };

	tap_ok(kvq_argmax(x, 8) == 3, "argmax_ties_lowest_id");
	tap_ok(kvq_argmax(z, 3) == 0, "argmax_signed_zeros_tie");
	tap_ok(kvq_argmax(nan_first, 3) == 1, "argmax_nan_ignored");
}

static void test_greedy(void)
{
	struct kvq_sampler_params p = params(0.0f, 40, 0.9f, 0.1f, 7);
	struct kvq_sampler s;
	float *x = malloc(sizeof(*x) * BIG_VOCAB);
	bool ok = true;
	int r;

	kvq_sampler_init(&s, &p, BIG_VOCAB);
	for (r = 0; r < 20; r++) {
		random_logits(x, BIG_VOCAB, 10.0f);
		x[BIG_VOCAB - 1] = 20.0f;
		x[r * 1000 + 17] = 20.0f;	/* tie: lower id must win */
		if (kvq_sampler_sample(&s, x, NULL) != r * 1000 + 17)
			ok = false;
	}
	tap_ok(ok, "sample_greedy_is_argmax_with_ties");
	kvq_sampler_fini(&s);
	free(x);
}

static void test_top_k_one_is_greedy(void)
{
	static const float temps[] = { 0.1f, 0.7f, 1.0f, 3.0f, 50.0f };
	struct kvq_sampler_params p;
	struct kvq_sampler s;
	float *x = malloc(sizeof(*x) * BIG_VOCAB);
	bool ok = true;
	unsigned int t;
	int r, tok;

	for (t = 0; t < sizeof(temps) / sizeof(temps[0]); t++) {
		p = params(temps[t], 1, 0.5f, 0.0f, t);
		kvq_sampler_init(&s, &p, BIG_VOCAB);
		for (r = 0; r < 10; r++) {
			random_logits(x, BIG_VOCAB, 4.0f);
			x[(r * 7919) % BIG_VOCAB] = 4.5f;
			x[(r * 7919 + 5) % BIG_VOCAB] = 4.5f;
			tok = kvq_sampler_sample(&s, x, NULL);
			if (tok != kvq_argmax(x, BIG_VOCAB))
				ok = false;
		}
		kvq_sampler_fini(&s);
	}
	tap_ok(ok, "sample_top_k_1_equals_greedy_any_temperature");
	free(x);
}

/* Draws @n tokens with seed @seed into @out. */
static void draw_sequence(uint64_t seed, const float *x, int n_vocab,
			  int32_t *out, int n)
{
	struct kvq_sampler_params p = params(1.5f, 0, 1.0f, 0.0f, seed);
	struct kvq_sampler s;
	int i;

	kvq_sampler_init(&s, &p, n_vocab);
	for (i = 0; i < n; i++)
		out[i] = kvq_sampler_sample(&s, x, NULL);
	kvq_sampler_fini(&s);
}

static void test_seeds(void)
{
	enum { N = 200, V = 5000 };
	int32_t a[N], b[N], c[N];
	float x[V];

	random_logits(x, V, 1.0f);
	draw_sequence(1234, x, V, a, N);
	draw_sequence(1234, x, V, b, N);
	draw_sequence(1235, x, V, c, N);
	tap_ok(!memcmp(a, b, sizeof(a)), "sample_same_seed_same_tokens");
	tap_ok(memcmp(a, c, sizeof(a)) != 0,
	       "sample_different_seed_different_tokens");
}

/* Softmax of @x in double precision. */
static void softmax(const float *x, int n, double *p)
{
	double m = -INFINITY, z = 0.0;
	int i;

	for (i = 0; i < n; i++)
		m = x[i] > m ? x[i] : m;
	for (i = 0; i < n; i++)
		z += (p[i] = exp((double)x[i] - m));
	for (i = 0; i < n; i++)
		p[i] /= z;
}

/*
 * Samples @N_DRAWS tokens and checks that each lands where @expect > 0 and
 * that frequencies are within @tol of @expect.
 */
static void check_frequencies(struct kvq_sampler *s, const float *x, int n,
			      const double *expect, double tol,
			      const char *name)
{
	int *count = calloc((size_t)n, sizeof(*count));
	bool inside = true, close = true;
	double worst = 0.0, d;
	int i, tok;

	for (i = 0; i < N_DRAWS; i++) {
		tok = kvq_sampler_sample(s, x, NULL);
		if (tok < 0 || tok >= n || expect[tok] <= 0.0) {
			inside = false;
			continue;
		}
		count[tok]++;
	}
	for (i = 0; i < n; i++) {
		d = fabs((double)count[i] / N_DRAWS - expect[i]);
		if (d > worst)
			worst = d;
		if (d > tol)
			close = false;
	}
	tap_ok(inside, "%s_only_allowed_tokens", name);
	tap_ok(close, "%s_frequencies_within_%.3f (worst %.4f)", name, tol,
	       worst);
	free(count);
}

static void test_top_p_known(void)
{
	enum { V = 1000 };
	/* ids chosen apart from the ends, with the tail spread over the rest */
	static const int ids[5] = { 700, 3, 512, 999, 42 };
	static const double pr[5] = { 0.4, 0.3, 0.15, 0.1, 0.04 };
	struct kvq_sampler_params p = params(1.0f, 0, 0.8f, 0.0f, 99);
	struct kvq_sampler s;
	double expect[V] = { 0 };
	float x[V];
	int i;

	for (i = 0; i < V; i++)
		x[i] = (float)log(0.01 / (V - 5));
	for (i = 0; i < 5; i++)
		x[ids[i]] = (float)log(pr[i]);
	/* nucleus at 0.8: 0.4 + 0.3 + 0.15, renormalised */
	for (i = 0; i < 3; i++)
		expect[ids[i]] = pr[i] / 0.85;
	kvq_sampler_init(&s, &p, V);
	check_frequencies(&s, x, V, expect, 0.02, "top_p_known");
	kvq_sampler_fini(&s);
}

/* A nucleus wider than the sampler's first chunk, with top-k off. */
static void test_top_p_wide(void)
{
	enum { V = 4096, KEEP = 300 };
	struct kvq_sampler_params p = params(1.0f, 0, 0.0f, 0.0f, 5);
	struct kvq_sampler s;
	double prob[V], expect[V] = { 0 }, cum = 0.0;
	int order[V], i, j, t;
	float x[V];

	for (i = 0; i < V; i++)
		order[i] = i;
	for (i = V - 1; i > 0; i--) {
		j = (int)(test_uniform() * (i + 1));
		t = order[i];
		order[i] = order[j];
		order[j] = t;
	}
	/* rank r at a random id, logits falling slowly with r */
	for (i = 0; i < V; i++)
		x[order[i]] = -0.002f * (float)i;
	softmax(x, V, prob);
	for (i = 0; i < KEEP; i++)
		cum += prob[order[i]];
	/* top_p halfway into the KEEP-th token: exactly KEEP tokens stay */
	p.top_p = (float)(cum - prob[order[KEEP - 1]] / 2);
	for (i = 0; i < KEEP; i++)
		expect[order[i]] = prob[order[i]] / cum;
	kvq_sampler_init(&s, &p, V);
	check_frequencies(&s, x, V, expect, 0.01, "top_p_wide");
	kvq_sampler_fini(&s);
}

static const float *cmp_logits;

/* Ranking order: higher logit first, lower id first among equals. */
static int cmp_rank(const void *pa, const void *pb)
{
	int a = *(const int *)pa, b = *(const int *)pb;

	if (cmp_logits[a] != cmp_logits[b])
		return cmp_logits[a] > cmp_logits[b] ? -1 : 1;
	return a - b;
}

/*
 * 150K logits on a coarse grid (so that many tie, also across the
 * boundary), checked against a nucleus found by sorting everything.
 */
static void test_top_p_big_ties(void)
{
	struct kvq_sampler_params p = params(0.9f, 0, 0.6f, 0.0f, 21);
	struct kvq_sampler s;
	float *x = malloc(sizeof(*x) * BIG_VOCAB);
	int *order = malloc(sizeof(*order) * BIG_VOCAB);
	char *in = calloc(BIG_VOCAB, 1);
	double z = 0.0, cum = 0.0;
	int i, tok, n_in = 0, hit_last = 0;
	bool ok = true;

	for (i = 0; i < BIG_VOCAB; i++) {
		x[i] = roundf((float)(test_uniform() * 12.0)) * 0.5f;
		order[i] = i;
	}
	cmp_logits = x;
	qsort(order, BIG_VOCAB, sizeof(*order), cmp_rank);
	for (i = 0; i < BIG_VOCAB; i++)
		z += expf((x[order[i]] - x[order[0]]) / 0.9f);
	for (i = 0; i < BIG_VOCAB && cum < 0.6 * z; i++) {
		cum += expf((x[order[i]] - x[order[0]]) / 0.9f);
		in[order[i]] = 1;
		n_in++;
	}
	kvq_sampler_init(&s, &p, BIG_VOCAB);
	for (i = 0; i < 3000; i++) {
		tok = kvq_sampler_sample(&s, x, NULL);
		if (tok < 0 || tok >= BIG_VOCAB || !in[tok])
			ok = false;
		else if (x[tok] == x[order[n_in - 1]])
			hit_last++;
	}
	tap_ok(ok, "top_p_150k_ties_only_nucleus (%d tokens)", n_in);
	tap_ok(hit_last > 0, "top_p_150k_ties_boundary_group_reached");
	kvq_sampler_fini(&s);
	free(in);
	free(order);
	free(x);
}

static void test_min_p(void)
{
	enum { V = 64 };
	static const double pr[5] = { 0.5, 0.3, 0.15, 0.04, 0.01 };
	struct kvq_sampler_params p = params(1.0f, 0, 1.0f, 0.1f, 3);
	struct kvq_sampler s;
	double expect[V] = { 0 };
	float x[V];
	int i;

	for (i = 0; i < V; i++)
		x[i] = -INFINITY;
	for (i = 0; i < 5; i++)
		x[10 * i + 1] = (float)log(pr[i]);
	/* 0.1 * 0.5 = 0.05: 0.04 and 0.01 go */
	for (i = 0; i < 3; i++)
		expect[10 * i + 1] = pr[i] / 0.95;
	kvq_sampler_init(&s, &p, V);
	check_frequencies(&s, x, V, expect, 0.02, "min_p");
	kvq_sampler_fini(&s);
}

/* top-k, then temperature: only the k best, at their tempered odds. */
static void test_top_k_temperature(void)
{
	enum { V = 2000 };
	struct kvq_sampler_params p = params(2.0f, 3, 1.0f, 0.0f, 11);
	struct kvq_sampler s;
	double expect[V] = { 0 }, z = 0.0;
	float x[V];
	int i;

	random_logits(x, V, 1.0f);
	x[1500] = 3.0f;
	x[20] = 2.5f;
	x[777] = 2.0f;
	for (i = 0; i < 3; i++) {
		int id = i == 0 ? 1500 : i == 1 ? 20 : 777;

		expect[id] = exp(x[id] / 2.0);
		z += expect[id];
	}
	for (i = 0; i < V; i++)
		expect[i] /= z;
	kvq_sampler_init(&s, &p, V);
	check_frequencies(&s, x, V, expect, 0.02, "top_k_3_temperature_2");
	kvq_sampler_fini(&s);
}

/* Defaults on a 150K vocabulary: never picks outside the top 40. */
static void test_defaults_big(void)
{
	struct kvq_sampler s;
	float *x = malloc(sizeof(*x) * BIG_VOCAB);
	float *sorted = malloc(sizeof(*x) * BIG_VOCAB);
	bool ok = true;
	float cut;
	int i, tok, j;

	tap_ok(kvq_sampler_init(&s, NULL, BIG_VOCAB) == 0,
	       "sampler_init_null_params_defaults");
	tap_ok(s.p.top_k == 40 && fabsf(s.p.temperature - 0.8f) < 1e-6f,
	       "params_default_values");
	random_logits(x, BIG_VOCAB, 8.0f);
	memcpy(sorted, x, sizeof(*x) * BIG_VOCAB);
	/* the 40th largest value, by partial selection sort */
	for (i = 0; i < 40; i++) {
		int best = i;

		for (j = i + 1; j < BIG_VOCAB; j++)
			if (sorted[j] > sorted[best])
				best = j;
		cut = sorted[best];
		sorted[best] = sorted[i];
		sorted[i] = cut;
	}
	for (i = 0; i < 500; i++) {
		tok = kvq_sampler_sample(&s, x, NULL);
		if (tok < 0 || tok >= BIG_VOCAB || x[tok] < cut)
			ok = false;
	}
	tap_ok(ok, "sample_defaults_150k_within_top_40");
	kvq_sampler_fini(&s);
	free(sorted);
	free(x);
}

static void test_logprob(void)
{
	enum { V = 1000 };
	struct kvq_sampler_params p = params(0.7f, 20, 0.9f, 0.05f, 8);
	struct kvq_sampler s;
	double prob[V];
	float x[V], lp;
	bool ok = true;
	int i, tok;

	random_logits(x, V, 5.0f);
	softmax(x, V, prob);
	kvq_sampler_init(&s, &p, V);
	for (i = 0; i < 100; i++) {
		tok = kvq_sampler_sample(&s, x, &lp);
		if (fabs(lp - log(prob[tok])) > 1e-4)
			ok = false;
	}
	kvq_sampler_fini(&s);
	tap_ok(ok, "sample_logprob_unfiltered_temperature_1");

	p.temperature = 0.0f;
	kvq_sampler_init(&s, &p, V);
	tok = kvq_sampler_sample(&s, x, &lp);
	tap_ok(fabs(lp - log(prob[tok])) < 1e-4, "sample_logprob_greedy");
	kvq_sampler_fini(&s);
}

static void test_odd_logits(void)
{
	enum { V = 100 };
	struct kvq_sampler_params p = params(1.0f, 0, 0.9f, 0.0f, 2);
	struct kvq_sampler s;
	float x[V];
	bool ok = true;
	int i, tok;

	for (i = 0; i < V; i++)
		x[i] = (i % 3) ? NAN : -INFINITY;
	x[37] = 1.0f;
	x[38] = 1.0f;
	kvq_sampler_init(&s, &p, V);
	for (i = 0; i < 200; i++) {
		tok = kvq_sampler_sample(&s, x, NULL);
		if (tok != 37 && tok != 38)
			ok = false;
	}
	tap_ok(ok, "sample_nan_and_inf_logits_never_chosen");
	for (i = 0; i < V; i++)
		x[i] = -INFINITY;
	tap_ok(kvq_sampler_sample(&s, x, NULL) == 0,
	       "sample_all_minus_inf_gives_token_0");
	kvq_sampler_fini(&s);
}

/* The draw walks rank order: u picks the token whose share it falls in. */
static void test_sample_u_rank_order(void)
{
	/* probabilities 0.1, 0.5, 0.4: rank order is 1, 2, 0 */
	float x[3] = { logf(0.1f), logf(0.5f), logf(0.4f) };
	struct kvq_sampler_params p = params(1.0f, 0, 1.0f, 0.0f, 4);
	struct kvq_sampler s;
	uint64_t before[4];
	bool ok;

	kvq_sampler_init(&s, &p, 3);
	memcpy(before, s.rng, sizeof(before));
	ok = kvq_sampler_sample_u(&s, x, 0.0) == 1 &&
	     kvq_sampler_sample_u(&s, x, 0.49) == 1 &&
	     kvq_sampler_sample_u(&s, x, 0.51) == 2 &&
	     kvq_sampler_sample_u(&s, x, 0.89) == 2 &&
	     kvq_sampler_sample_u(&s, x, 0.91) == 0 &&
	     kvq_sampler_sample_u(&s, x, 1.0 - 0x1p-53) == 0;
	tap_ok(ok, "sample_u_walks_rank_order");
	tap_ok(!memcmp(before, s.rng, sizeof(before)),
	       "sample_u_leaves_random_state");
	kvq_sampler_fini(&s);
}

/*
 * The same on 5000 random logits, unsorted candidates (no top-k) with and
 * without top-p, and with top-k: u at the middle of a token's share in
 * rank order must give that token.
 */
static void test_sample_u_big(void)
{
	enum { V = 5000, PICKS = 40 };
	static const struct { int k; float p; } set[3] = {
		{ 0, 1.0f }, { 0, 0.9f }, { 400, 1.0f },
	};
	int *order = malloc(sizeof(*order) * V);
	double *cum = malloc(sizeof(*cum) * (V + 1));
	float x[V];
	int i, j, n_keep, bad = 0;

	random_logits(x, V, 3.0f);
	for (i = 0; i < V; i++)
		order[i] = i;
	cmp_logits = x;
	qsort(order, V, sizeof(*order), cmp_rank);
	for (j = 0; j < 3; j++) {
		struct kvq_sampler_params p = params(1.0f, set[j].k, set[j].p,
						     0.0f, 1);
		struct kvq_sampler s;
		double z = 0.0;

		cum[0] = 0.0;
		n_keep = set[j].k ? set[j].k : V;
		for (i = 0; i < n_keep; i++)
			z += exp((double)x[order[i]] - x[order[0]]);
		for (i = 0; i < n_keep; i++) {
			cum[i + 1] = cum[i] + exp((double)x[order[i]] -
						  x[order[0]]);
			if (cum[i] >= set[j].p * z) {
				n_keep = i;
				break;
			}
		}
		kvq_sampler_init(&s, &p, V);
		for (i = 0; i < PICKS; i++) {
			int r = (int)(test_uniform() * n_keep);
			double u = (cum[r] + cum[r + 1]) / 2 / cum[n_keep];

			bad += kvq_sampler_sample_u(&s, x, u) != order[r];
		}
		kvq_sampler_fini(&s);
	}
	tap_ok(!bad, "sample_u_5000_middle_of_share_gives_token (%d wrong)",
	       bad);
	free(cum);
	free(order);
}

/*
 * kvq_sampler_next_u() is the draw kvq_sampler_sample() takes: a twin
 * seeded alike and fed those numbers through kvq_sampler_sample_u()
 * chooses the same tokens, for filtered settings and for a row with no
 * finite logit (which still takes one draw); greedy settings draw nothing.
 */
static void test_next_u(void)
{
	enum { V = 3000 };
	struct kvq_sampler_params p = params(0.9f, 50, 0.9f, 0.02f, 77);
	struct kvq_sampler_params g = params(0.0f, 50, 0.9f, 0.02f, 77);
	struct kvq_sampler a, b;
	uint64_t before[4];
	bool same = true, ranged = true;
	float *x = malloc(V * sizeof(*x));
	int i, n_diff = 0, prev = -1, tok;
	double u;

	kvq_sampler_init(&a, &p, V);
	kvq_sampler_init(&b, &p, V);
	random_logits(x, V, 6.0f);
	for (i = 0; i < 300; i++) {
		if (i == 150)
			for (int j = 0; j < V; j++)
				x[j] = (j & 1) ? NAN : -INFINITY;
		if (i == 151)
			random_logits(x, V, 6.0f);
		tok = kvq_sampler_sample(&a, x, NULL);
		u = kvq_sampler_next_u(&b);
		if (!(u >= 0.0 && u < 1.0))
			ranged = false;
		if (kvq_sampler_sample_u(&b, x, u) != tok)
			same = false;
		n_diff += tok != prev;
		prev = tok;
	}
	tap_ok(same && ranged && n_diff > 100,
	       "next_u_gives_the_draws_of_sample (%d changes of token)",
	       n_diff);
	tap_ok(!memcmp(a.rng, b.rng, sizeof(a.rng)),
	       "next_u_advances_the_state_as_sample_does");
	tap_ok(!kvq_sampler_greedy(&a), "greedy_false_for_filtered_settings");
	kvq_sampler_fini(&b);
	kvq_sampler_init(&b, &g, V);
	memcpy(before, b.rng, sizeof(before));
	tap_ok(kvq_sampler_greedy(&b) && kvq_sampler_next_u(&b) == -1.0 &&
	       !memcmp(before, b.rng, sizeof(before)),
	       "next_u_greedy_draws_nothing");
	kvq_sampler_fini(&a);
	kvq_sampler_fini(&b);
	free(x);
}

static void test_softmax(void)
{
	float x[4] = { 1.0f, 2.0f, NAN, -INFINITY }, p[4], q[3];
	float inf[3] = { INFINITY, 0.0f, INFINITY };
	float none[3] = { NAN, -INFINITY, -INFINITY };
	double z = exp(-0.5) + 1.0;

	tap_ok(kvq_softmax(x, 4, 2.0f, p) == 0 &&
	       fabs(p[0] - exp(-0.5) / z) < 1e-7 &&
	       fabs(p[1] - 1.0 / z) < 1e-7 && p[2] == 0.0f && p[3] == 0.0f,
	       "softmax_temperature_2_nan_and_inf_zero");
	tap_ok(kvq_softmax(inf, 3, 1.0f, q) == 0 && q[0] == 0.5f &&
	       q[1] == 0.0f && q[2] == 0.5f, "softmax_plus_inf_share");
	tap_ok(kvq_softmax(none, 3, 1.0f, q) == 0 && q[0] == 1.0f / 3 &&
	       q[2] == 1.0f / 3, "softmax_no_finite_uniform");
	p[0] = 7.0f;
	tap_ok(kvq_softmax(x, 4, 0.0f, p) == -EINVAL &&
	       kvq_softmax(x, 4, NAN, p) == -EINVAL &&
	       kvq_softmax(x, 0, 1.0f, p) == -EINVAL &&
	       kvq_softmax(x, 4, 1e-45f, p) == -EINVAL && p[0] == 7.0f,
	       "softmax_bad_arguments_einval_unchanged");
}

static void test_bad_params(void)
{
	struct kvq_sampler_params p;
	struct kvq_sampler s;

	p = params(NAN, 0, 1.0f, 0.0f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == -EINVAL,
	       "sampler_init_nan_temperature_einval");
	p = params(INFINITY, 0, 1.0f, 0.0f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == -EINVAL,
	       "sampler_init_inf_temperature_einval");
	p = params(1.0f, 0, NAN, 0.0f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == -EINVAL,
	       "sampler_init_nan_top_p_einval");
	p = params(1.0f, 0, -0.5f, 0.0f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == -EINVAL,
	       "sampler_init_negative_top_p_einval");
	p = params(1.0f, 0, 0.0f, 0.0f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == -EINVAL,
	       "sampler_init_zero_top_p_einval");
	p = params(1.0f, 0, 1.0f, NAN, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == -EINVAL,
	       "sampler_init_nan_min_p_einval");
	p = params(1.0f, 0, 1.0f, 1.5f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == -EINVAL,
	       "sampler_init_min_p_above_1_einval");
	p = params(1.0f, 0, 1.0f, 0.0f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 0) == -EINVAL,
	       "sampler_init_empty_vocab_einval");
	kvq_sampler_fini(&s);

	p = params(1.0f, -3, 1.5f, -1.0f, 0);
	tap_ok(kvq_sampler_init(&s, &p, 10) == 0,
	       "sampler_init_off_values_accepted");
	kvq_sampler_fini(&s);
	p = params(-1.0f, 0, 1.0f, 0.0f, 0);
	tap_ok(kvq_sampler_params_check(&p) == 0,
	       "params_check_negative_temperature_is_greedy");
}

static void test_stop(void)
{
	char *stops[] = { "wor", "lo", "", "</s>" };
	char *nul[] = { NULL, "x" };
	const char *t = "hello world";

	tap_ok(kvq_stop_check(t, strlen(t), stops, 4) == 3,
	       "stop_check_earliest_wins");
	tap_ok(kvq_stop_check(t, 4, stops, 4) == -1,
	       "stop_check_respects_len");
	tap_ok(kvq_stop_check("abc", 3, stops, 4) == -1, "stop_check_none");
	tap_ok(kvq_stop_check("abc", 3, stops, 0) == -1,
	       "stop_check_no_stops");
	tap_ok(kvq_stop_check("axb", 3, nul, 2) == 1,
	       "stop_check_null_entry_skipped");
	tap_ok(kvq_stop_check("ok</s>", 6, stops, 4) == 2,
	       "stop_check_at_end");

	tap_ok(kvq_stop_partial("abc</", 5, stops, 4) == 2,
	       "stop_partial_two_bytes");
	tap_ok(kvq_stop_partial("abc<", 4, stops, 4) == 1,
	       "stop_partial_one_byte");
	tap_ok(kvq_stop_partial("abc", 3, stops, 4) == 0,
	       "stop_partial_none");
	tap_ok(kvq_stop_partial("</s", 3, stops, 4) == 3,
	       "stop_partial_whole_text");
	tap_ok(kvq_stop_partial("he wo", 5, stops, 4) == 2,
	       "stop_partial_longest_of_several");
	tap_ok(kvq_stop_partial("hel", 3, stops, 4) == 1,
	       "stop_partial_short_stop");
	tap_ok(kvq_stop_partial("", 0, stops, 4) == 0,
	       "stop_partial_empty_text");
}

int main(void)
{
	test_argmax_ties();
	test_greedy();
	test_top_k_one_is_greedy();
	test_seeds();
	test_top_p_known();
	test_top_p_wide();
	test_top_p_big_ties();
	test_min_p();
	test_top_k_temperature();
	test_defaults_big();
	test_logprob();
	test_odd_logits();
	test_sample_u_rank_order();
	test_sample_u_big();
	test_next_u();
	test_softmax();
	test_bad_params();
	test_stop();
	return tap_done();
}
