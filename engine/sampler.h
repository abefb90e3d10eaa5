/*
 * sampler.h - choosing the next token from logits.
 *
 * Why this file exists: sampling settings arrive per request (OpenAI fields
 * plus top_k and min_p) and must give the same tokens for the same seed
 * wherever the request runs, so the sampler owns its own random state and
 * never touches global state.
 */
#ifndef KVQ_SAMPLER_H
#define KVQ_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_sampler_params {
	float temperature;	/* <= 0: greedy */
	int32_t top_k;		/* <= 0: off */
	float top_p;		/* >= 1: off */
	float min_p;		/* <= 0: off */
	uint64_t seed;
};

/* Defaults matching common servers: temperature 0.8, top_k 40, top_p 0.95,
 * min_p 0.05, seed 0. */
void kvq_sampler_params_default(struct kvq_sampler_params *p);

struct kvq_sampler {
	struct kvq_sampler_params p;
	uint64_t rng[4];	/* xoshiro256** state, from the seed */
	int32_t n_vocab;
	/* scratch, owned: n_vocab of each */
	float *probs;		/* candidates' unnormalised weights */
	uint64_t *keys;		/* candidates as rank keys, see sampler.c */
};

/*
 * Checks sampling settings without touching any state: 0, or -EINVAL for a
 * NaN anywhere, an infinite temperature, top_p <= 0 or min_p > 1.  Values
 * that mean "off" (top_k <= 0, top_p >= 1, min_p <= 0) are valid.
 */
int kvq_sampler_params_check(const struct kvq_sampler_params *p);

/*
 * Sets up @s for a vocabulary of @n_vocab tokens with settings @p (NULL:
 * the defaults), seeding its random state from p->seed.  Returns 0, -EINVAL
 * (bad settings, n_vocab <= 0) or -ENOMEM.  On failure @s owns nothing and
 * kvq_sampler_fini() on it is harmless.
 */
int kvq_sampler_init(struct kvq_sampler *s, const struct kvq_sampler_params *p,
		     int32_t n_vocab);
/* Frees the scratch owned by @s; @s may be initialised again afterwards. */
void kvq_sampler_fini(struct kvq_sampler *s);

/* Picks a token from @logits (n_vocab values; not modified).  With
 * temperature <= 0 this is argmax (lowest id wins ties).  When @logprob is
 * not NULL, stores the log-probability of the chosen token under the
 * unfiltered softmax at temperature 1.
 *
 * Otherwise the filters apply in this order: top-k on the logits, softmax
 * at the temperature, top-p (the smallest set of most likely tokens whose
 * probability reaches top_p, at least one), then min-p (drop tokens below
 * min_p times the most likely one's probability); one token is then drawn
 * from what is left, in proportion to its probability: with u uniform in
 * [0, 1), the first token in rank order (higher logit first, lower id first
 * among equal logits) whose running weight exceeds u times the total weight
 * left.  Each call advances the random state by one draw (none for greedy
 * settings), the one kvq_sampler_next_u() returns, so a seed
 * gives the same tokens for the same logits whatever thread runs it.  NaN
 * logits count as -inf, -0 as +0. */
int32_t kvq_sampler_sample(struct kvq_sampler *s, const float *logits,
			   float *logprob);

/*
 * The same choice with @u (in [0, 1)) in place of the next random number;
 * @s's random state is left unchanged.  The plain-C twin of the GPU
 * sampler kvq_gpu_sample() (kernels/sample.h).
 */
int32_t kvq_sampler_sample_u(struct kvq_sampler *s, const float *logits,
			     double u);

/*
 * The uniform number in [0, 1) that kvq_sampler_sample() would draw next,
 * drawn now (the state advances by one draw), or -1 without drawing for
 * greedy settings:
 * kvq_sampler_sample(s, l, NULL) == kvq_sampler_sample_u(s, l,
 * kvq_sampler_next_u(s)).  This is how a token sampled elsewhere (the GPU
 * sampler) keeps the seed's sequence of draws.
 */
double kvq_sampler_next_u(struct kvq_sampler *s);

/* Whether @s's settings are greedy (argmax, no draw): temperature <= 0,
 * a reciprocal that overflows, or top_k == 1. */
bool kvq_sampler_greedy(const struct kvq_sampler *s);

/*
 * kvq_softmax() - probabilities of @n logits at @temperature into @out:
 * exp((l - max) / T) in f32 (1/T rounded to f32 first, as the sampler's
 * weights), normalised by their sum in double.  NaN logits count as -inf.
 * A row without a finite maximum shares probability 1 equally among the
 * logits equal to its maximum (every logit when all are -inf).  Returns 0,
 * or -EINVAL for n <= 0 or a temperature that is not positive and finite
 * with a finite reciprocal; @out is then unchanged.  The plain-C twin of
 * kvq_gpu_softmax().
 */
int kvq_softmax(const float *logits, int32_t n, float temperature,
		float *out);

/* argmax with lowest index on ties; NaN counts as -inf.  -1 when n <= 0. */
int32_t kvq_argmax(const float *x, int32_t n);

/*
 * Stop strings: kvq_stop_check() looks for any of @stops in @text (length
 * @len).  Returns the offset where the earliest stop string starts, or -1.
 * kvq_stop_partial() returns how many trailing bytes of @text could be the
 * start of a stop string (to be held back from a stream), 0 if none.
 */
long kvq_stop_check(const char *text, size_t len, char *const *stops,
		    int n_stops);
size_t kvq_stop_partial(const char *text, size_t len, char *const *stops,
			int n_stops);

#endif /* KVQ_SAMPLER_H */
