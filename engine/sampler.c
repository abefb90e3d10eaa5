/*
 * sampler.c - next-token selection: greedy, temperature, top-k, top-p,
 * min-p, and stop-string matching for the text that comes out.
 *
 * Why this file exists: one request's tokens must depend on its seed and
 * logits alone, not on which thread or batch slot ran it, and choosing a
 * token must stay cheap next to the forward pass even for vocabularies of
 * 150K tokens.  So the random generator lives in the sampler (xoshiro256**,
 * seeded through splitmix64), and no step sorts the whole vocabulary when a
 * smaller selection does.
 *
 * Ranking.  Candidates are handled as 64-bit keys: the logit, mapped to an
 * order-preserving unsigned integer and inverted, in the high half, and the
 * token id in the low half.  Sorting keys in ascending order ranks tokens by
 * descending logit, lowest id first among equal logits, with plain integer
 * compares and no pointer chasing into the logits.
 *
 * Filter order (what the caller sees, see sampler.h): top-k, softmax at the
 * temperature, top-p, min-p.  What runs is cheaper but gives the same set:
 * top-p and min-p each keep a prefix of the ranking, and min-p's threshold
 * (a fraction of the largest probability) is not changed by top-p's
 * renormalisation.  So min-p is applied first as a plain threshold, which
 * usually leaves a handful of tokens, and top-p is then measured with the
 * normaliser from before min-p, which is what running it first would use.
 *
 * The draw.  One uniform number u in [0, 1) picks the token: the tokens left
 * are walked in rank order and the first whose running weight exceeds u
 * times their total is taken.  Rank order, not the order the candidates
 * happen to be in, so that the token for a given u is a property of the
 * logits and settings alone; kernels/sample.cu computes the same function
 * on the GPU and kvq_sampler_sample_u() is its reference.  Unranked lists
 * find that point with the same radix selection as top-p.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampler.h"

/* Top-p narrows candidates by 10-bit digits of their weights ... */
#define TOP_P_DIGITS 1024
/* ... until this few are left to sort. */
#define TOP_P_SORT_MAX 256

void kvq_sampler_params_default(struct kvq_sampler_params *p)
{
	p->temperature = 0.8f;
	p->top_k = 40;
	p->top_p = 0.95f;
	p->min_p = 0.05f;
	p->seed = 0;
}

int kvq_sampler_params_check(const struct kvq_sampler_params *p)
{
	if (isnan(p->temperature) || isinf(p->temperature))
		return -EINVAL;
	if (isnan(p->top_p) || p->top_p <= 0.0f)
		return -EINVAL;
	if (isnan(p->min_p) || p->min_p > 1.0f)
		return -EINVAL;
	return 0;
}

/* ------------------------------------------------------------ random */

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t *s)
{
	uint64_t out = rotl64(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl64(s[3], 45);
	return out;
}

/* Uniform in [0, 1), from the top 53 bits. */
static double rng_uniform(uint64_t *s)
{
	return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53;
}

static void rng_seed(uint64_t *s, uint64_t seed)
{
	int i;

	for (i = 0; i < 4; i++)
		s[i] = splitmix64(&seed);
}

/* ------------------------------------------------------------ set up */

int kvq_sampler_init(struct kvq_sampler *s, const struct kvq_sampler_params *p,
		     int32_t n_vocab)
{
	struct kvq_sampler_params def;
	int ret;

	memset(s, 0, sizeof(*s));
	if (!p) {
		kvq_sampler_params_default(&def);
		p = &def;
	}
	ret = kvq_sampler_params_check(p);
	if (ret)
		return ret;
	if (n_vocab <= 0)
		return -EINVAL;

	s->probs = malloc(sizeof(*s->probs) * (size_t)n_vocab);
	if (!s->probs)
		return -ENOMEM;
	s->keys = malloc(sizeof(*s->keys) * (size_t)n_vocab);
	if (!s->keys)
		goto out_free_probs;

	s->p = *p;
	s->n_vocab = n_vocab;
	rng_seed(s->rng, p->seed);
	return 0;

out_free_probs:
	free(s->probs);
	s->probs = NULL;
	return -ENOMEM;
}

void kvq_sampler_fini(struct kvq_sampler *s)
{
	free(s->probs);
	free(s->keys);
	s->probs = NULL;
	s->keys = NULL;
	s->n_vocab = 0;
}

/* ------------------------------------------------------------ ranking */

/* NaN ranks as -inf, and -0 as +0 so that equal logits tie on id. */
static inline float clean_logit(float f)
{
	if (isnan(f))
		return -INFINITY;
	if (f == 0.0f)
		return 0.0f;
	return f;
}

static inline uint64_t rank_key(float logit, int32_t id)
{
	uint32_t u;

	logit = clean_logit(logit);
	memcpy(&u, &logit, sizeof(u));
	/* order-preserving map of the float onto uint32, then inverted */
	u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
	return ((uint64_t)~u << 32) | (uint32_t)id;
}

static inline int32_t key_id(uint64_t key)
{
	return (int32_t)(uint32_t)key;
}

static void swap_keys(uint64_t *a, size_t i, size_t j)
{
	uint64_t t = a[i];

	a[i] = a[j];
	a[j] = t;
}

/* Restores the max-heap property of a[0..n) below @i. */
static void heap_sift_down(uint64_t *a, size_t n, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, big = i;

		if (l < n && a[l] > a[big])
			big = l;
		if (r < n && a[r] > a[big])
			big = r;
		if (big == i)
			return;
		swap_keys(a, i, big);
		i = big;
	}
}

static void heapify(uint64_t *a, size_t n)
{
	size_t i;

	for (i = n / 2; i-- > 0;)
		heap_sift_down(a, n, i);
}

static int cmp_key(const void *pa, const void *pb)
{
	uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;

	return (a > b) - (a < b);
}

/* The @k best tokens of @logits, ranked, into keys[0..k), k < n. */
static void top_k_keys(uint64_t *keys, const float *logits, int32_t n,
		       int32_t k)
{
	int32_t i;
	float worst;

	for (i = 0; i < k; i++)
		keys[i] = rank_key(logits[i], i);
	/* a max-heap: its root is the worst of the best k so far */
	heapify(keys, (size_t)k);
	worst = clean_logit(logits[key_id(keys[0])]);
	for (; i < n; i++) {
		/* equal logits never displace: the kept ids are lower */
		if (!(logits[i] > worst))
			continue;
		keys[0] = rank_key(logits[i], i);
		heap_sift_down(keys, (size_t)k, 0);
		worst = clean_logit(logits[key_id(keys[0])]);
	}
	qsort(keys, (size_t)k, sizeof(*keys), cmp_key);
}

int32_t kvq_argmax(const float *x, int32_t n)
{
	int32_t i, best = 0;
	float bv;

	if (n <= 0)
		return -1;
	bv = clean_logit(x[0]);
	for (i = 1; i < n; i++) {
		if (x[i] > bv) {
			bv = x[i];
			best = i;
		}
	}
	return best;
}

/* log softmax at temperature 1 of token @tok over all of @logits. */
static float full_logprob(const float *logits, int32_t n, int32_t tok)
{
	float lmax = clean_logit(logits[kvq_argmax(logits, n)]);
	double sum = 0.0;
	int32_t i;

	if (!isfinite(lmax))
		return logits[tok] == lmax ? 0.0f : -INFINITY;
	for (i = 0; i < n; i++)
		sum += expf(clean_logit(logits[i]) - lmax);
	return (float)((double)(clean_logit(logits[tok]) - lmax) - log(sum));
}

int kvq_softmax(const float *logits, int32_t n, float temperature,
		float *out)
{
	float lmax, inv_t;
	double z = 0.0;
	int32_t i, n_max = 0;

	if (n <= 0 || !(temperature > 0.0f) || isinf(temperature))
		return -EINVAL;
	inv_t = 1.0f / temperature;
	if (isinf(inv_t))
		return -EINVAL;
	lmax = clean_logit(logits[kvq_argmax(logits, n)]);
	if (!isfinite(lmax)) {
		for (i = 0; i < n; i++)
			n_max += clean_logit(logits[i]) == lmax;
		for (i = 0; i < n; i++)
			out[i] = clean_logit(logits[i]) == lmax ?
				 1.0f / (float)n_max : 0.0f;
		return 0;
	}
	for (i = 0; i < n; i++) {
		out[i] = expf((clean_logit(logits[i]) - lmax) * inv_t);
		z += out[i];
	}
	for (i = 0; i < n; i++)
		out[i] = (float)((double)out[i] / z);
	return 0;
}

/* ------------------------------------------------------------ sampling */

/*
 * Candidate list: keys[0..n) with weights w[0..n) = exp((l - lmax) / T).
 * @sorted says whether keys[0..n) is already ranked.
 */
struct cand {
	uint64_t *keys;
	float *w;
	size_t n;
	bool sorted;
};

/* Drops candidates with weight below @min_w, keeping their order. */
static void apply_min_p(struct cand *c, float min_w)
{
	size_t i, out = 0;

	for (i = 0; i < c->n; i++) {
		if (c->w[i] >= min_w) {
			c->keys[out] = c->keys[i];
			c->w[out] = c->w[i];
			out++;
		}
	}
	c->n = out;
}

static void swap_cand(struct cand *c, size_t i, size_t j)
{
	float t = c->w[i];

	c->w[i] = c->w[j];
	c->w[j] = t;
	swap_keys(c->keys, i, j);
}

/*
 * Weights lie in [0, 1], where a float's bit pattern orders like its value;
 * read as a number in base 1024, its three digits rank the weights coarsely,
 * then finer, then exactly.
 */
static inline unsigned int weight_digit(float w, int level)
{
	uint32_t u;

	memcpy(&u, &w, sizeof(u));
	return (u >> (20 - 10 * level)) & (TOP_P_DIGITS - 1);
}

/* Whether a running weight @acc has reached @target: top-p asks for a
 * prefix that reaches its share (>=), the draw for one that passes u * total
 * (>, strict). */
static inline bool reached(double acc, double target, bool strict)
{
	return strict ? acc > target : acc >= target;
}

/*
 * Finds the digit of c->w[lo..hi) holding the boundary: the highest digit
 * whose mass, added to *@above and to that of all higher digits, reaches
 * @target (or the lowest digit present).  Adds the mass of the higher
 * digits to *@above.
 */
static unsigned int boundary_digit(const struct cand *c, size_t lo, size_t hi,
				   int level, double target, bool strict,
				   double *above)
{
	double mass[TOP_P_DIGITS] = { 0 };
	size_t count[TOP_P_DIGITS] = { 0 };
	unsigned int d, last = 0;
	size_t i;

	for (i = lo; i < hi; i++) {
		d = weight_digit(c->w[i], level);
		mass[d] += c->w[i];
		count[d]++;
	}
	for (d = TOP_P_DIGITS; d-- > 0;) {
		if (!count[d])
			continue;
		if (reached(*above + mass[d], target, strict))
			return d;
		*above += mass[d];
		last = d;
	}
	*above -= mass[last];
	return last;
}

/*
 * Keeps the shortest ranked prefix whose weight reaches @target (strict:
 * exceeds it) and returns true; its lowest-ranked candidate is then the
 * last.  Keeps all candidates and returns false when their total falls
 * short (for the draw: only by rounding).  Unsorted lists are narrowed
 * digit by digit (a radix selection): candidates above the boundary digit
 * are in whatever their order, those below it are out, and only those that
 * share it go on; once few are left they are ranked and walked.  No step
 * sorts more than TOP_P_SORT_MAX candidates unless their weights are equal.
 */
static bool ranked_prefix(struct cand *c, const float *logits, float lmax,
			  float inv_t, double target, bool strict)
{
	size_t in = 0, hi = c->n, i, lt, gt;
	double above = 0.0;
	unsigned int d, bd;
	int level;

	for (i = 0; i < c->n; i++)
		above += c->w[i];
	if (!reached(above, target, strict))
		return false;
	above = 0.0;

	for (level = 0; level < 3 && !c->sorted; level++) {
		if (hi - in <= TOP_P_SORT_MAX)
			break;
		bd = boundary_digit(c, in, hi, level, target, strict, &above);
		/* three-way partition of [in, hi): > bd, == bd, < bd */
		lt = in;
		gt = hi;
		i = in;
		while (i < gt) {
			d = weight_digit(c->w[i], level);
			if (d > bd)
				swap_cand(c, lt++, i++);
			else if (d < bd)
				swap_cand(c, i, --gt);
			else
				i++;
		}
		in = lt;
		hi = gt;
	}

	if (!c->sorted) {
		qsort(c->keys + in, hi - in, sizeof(*c->keys), cmp_key);
		for (i = in; i < hi; i++) {
			float l = clean_logit(logits[key_id(c->keys[i])]);

			c->w[i] = expf((l - lmax) * inv_t);
		}
	}
	for (i = in; i < hi; i++) {
		above += c->w[i];
		if (reached(above, target, strict)) {
			c->n = i + 1;
			return true;
		}
	}
	c->n = hi;
	return false;
}

/*
 * Draws one candidate with the uniform number @u: the first in rank order
 * whose running weight exceeds u times the total.  Should rounding leave
 * that point unreached, the lowest-ranked candidate of positive weight.
 * (Zero weights add nothing, so the first to pass is never one of them.)
 */
static int32_t draw(struct cand *c, const float *logits, float lmax,
		    float inv_t, double u)
{
	double total = 0.0;
	uint64_t last = 0;
	size_t i;

	for (i = 0; i < c->n; i++)
		total += c->w[i];
	if (ranked_prefix(c, logits, lmax, inv_t, u * total, true))
		return key_id(c->keys[c->n - 1]);
	for (i = 0; i < c->n; i++)
		if (c->w[i] > 0.0f && c->keys[i] > last)
			last = c->keys[i];
	return last ? key_id(last) : key_id(c->keys[0]);
}

/* Top-k on the logits, then weights at the temperature; sorted list. */
static double weigh_top_k(struct cand *c, const float *logits, int32_t n,
			  int32_t k, float inv_t, float *lmax)
{
	double z = 0.0;
	size_t j;

	top_k_keys(c->keys, logits, n, k);
	c->n = (size_t)k;
	c->sorted = true;
	*lmax = clean_logit(logits[key_id(c->keys[0])]);
	for (j = 0; j < c->n && isfinite(*lmax); j++) {
		float l = clean_logit(logits[key_id(c->keys[j])]);

		c->w[j] = expf((l - *lmax) * inv_t);
		z += c->w[j];
	}
	return z;
}

/*
 * Weights of the whole vocabulary at the temperature, in one pass that
 * also keeps only those of weight @min_w or more (min-p, see the top of
 * this file).  Returns the total weight before that filter.
 */
static double weigh_all(struct cand *c, const float *logits, int32_t n,
			float inv_t, float min_w, float *lmax)
{
	double z = 0.0;
	size_t m = 0;
	int32_t i;
	float l, w;

	*lmax = clean_logit(logits[kvq_argmax(logits, n)]);
	for (i = 0; i < n && isfinite(*lmax); i++) {
		l = clean_logit(logits[i]);
		w = expf((l - *lmax) * inv_t);
		z += w;
		if (w >= min_w) {
			c->keys[m] = rank_key(l, i);
			c->w[m] = w;
			m++;
		}
	}
	c->n = m;
	c->sorted = false;
	return z;
}

/* The filtered draw with the uniform number @u. */
static int32_t sample_filtered(struct kvq_sampler *s, const float *logits,
			       double u)
{
	const struct kvq_sampler_params *p = &s->p;
	struct cand c = { .keys = s->keys, .w = s->probs };
	float lmax, inv_t = 1.0f / p->temperature;
	/* the best token weighs exp(0) = 1, so min_p is the threshold */
	float min_w = p->min_p > 0.0f ? p->min_p : 0.0f;
	int32_t n = s->n_vocab;
	double z;

	if (p->top_k > 0 && p->top_k < n) {
		z = weigh_top_k(&c, logits, n, p->top_k, inv_t, &lmax);
		if (min_w > 0.0f)
			apply_min_p(&c, min_w);
	} else {
		z = weigh_all(&c, logits, n, inv_t, min_w, &lmax);
	}
	if (!isfinite(lmax))
		return kvq_argmax(logits, n);
	if (p->top_p < 1.0f)
		ranked_prefix(&c, logits, lmax, inv_t, (double)p->top_p * z,
			      false);
	return draw(&c, logits, lmax, inv_t, u);
}

/*
 * Greedy settings: temperature <= 0, a temperature so small that its
 * reciprocal overflows, or top_k == 1 (one candidate whatever the rest).
 */
static bool is_greedy(const struct kvq_sampler_params *p)
{
	return p->temperature <= 0.0f || p->top_k == 1 ||
	       isinf(1.0f / p->temperature);
}

int32_t kvq_sampler_sample(struct kvq_sampler *s, const float *logits,
			   float *logprob)
{
	int32_t tok;

	if (is_greedy(&s->p))
		tok = kvq_argmax(logits, s->n_vocab);
	else
		tok = sample_filtered(s, logits, kvq_sampler_next_u(s));
	if (logprob)
		*logprob = full_logprob(logits, s->n_vocab, tok);
	return tok;
}

int32_t kvq_sampler_sample_u(struct kvq_sampler *s, const float *logits,
			     double u)
{
	if (is_greedy(&s->p))
		return kvq_argmax(logits, s->n_vocab);
	return sample_filtered(s, logits, u);
}

double kvq_sampler_next_u(struct kvq_sampler *s)
{
	return is_greedy(&s->p) ? -1.0 : rng_uniform(s->rng);
}

bool kvq_sampler_greedy(const struct kvq_sampler *s)
{
	return is_greedy(&s->p);
}

/* ------------------------------------------------------------ stop strings */

long kvq_stop_check(const char *text, size_t len, char *const *stops,
		    int n_stops)
{
	long best = -1;
	const char *hit;
	size_t slen;
	int i;

	for (i = 0; i < n_stops; i++) {
		if (!stops[i] || !stops[i][0])
			continue;
		slen = strlen(stops[i]);
		hit = memmem(text, len, stops[i], slen);
		if (hit && (best < 0 || hit - text < best))
			best = hit - text;
	}
	return best;
}

/*
 * Only proper prefixes count: a whole stop string at the end of @text is
 * kvq_stop_check()'s to report.
 */
size_t kvq_stop_partial(const char *text, size_t len, char *const *stops,
			int n_stops)
{
	size_t best = 0, slen, k;
	int i;

	for (i = 0; i < n_stops; i++) {
		if (!stops[i])
			continue;
		slen = strlen(stops[i]);
		k = slen ? slen - 1 : 0;
		if (k > len)
			k = len;
		for (; k > best; k--) {
			if (!memcmp(text + len - k, stops[i], k)) {
				best = k;
				break;
			}
		}
	}
	return best;
}
