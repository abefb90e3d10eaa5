/*
 * kvsmooth.h - reshaping keys and values for the quantized KV cache,
 * folded into the attention weights at load.
 *
 * Why this file exists: a q8/q4 KV group shares one scale (amax/127,
 * amax/7) across up to 32 channels of one head of one token.  Keys are
 * lopsided: RoPE's slow pairs carry a large, nearly constant vector whose
 * small component across it is what q . k reads (a learned position
 * bias), so the step the big channel sets swamps what matters.  With a
 * small head (stories260K: head_dim 8, the group is the whole head) there
 * is nowhere for that to average out.  This file reshapes what the cache
 * stores without touching the page format or the kernels that read it.
 *
 * Transforms (exact in real arithmetic: every q . k and every attention
 * output is unchanged).  For KV head h:
 *   keys:   per rotated channel pair (c, c') -- (2i, 2i+1), or (i, i +
 *           rope_dim/2) for neox -- a rotation by phi in the pair's plane
 *           and a scale 2^-e, k <- 2^-e R(phi) k, with q <- 2^e R(phi) q
 *           for every query head that shares h (GQA).  Plane rotations
 *           commute with RoPE's, and (R q) . (R k) = q . k.  Channels
 *           beyond rope_dim have a scale only.  Folded as: rows of Wk (and
 *           bk) rotated and scaled by 2^-e, rows of Wq (and bq) rotated and
 *           scaled by 2^e.
 *   values: per channel a scale 2^-e: rows of Wv (and bv) scaled by 2^-e,
 *           column qh*head_dim + c of Wo by 2^e for each query head qh of
 *           h's group.
 * Scales are powers of two, so a fold with scales only is exact in
 * floating point too (rounding commutes with scaling by 2^e while nothing
 * overflows or goes subnormal; values that do not scale exactly are
 * counted and logged): an f32 or f16 cache then computes the same logits.
 * A rotation rounds each rotated weight once, to its type; and an f16
 * cache, which rounds each channel relative to its own size, then gives
 * the small channel of a lopsided pair the big one's rounding (stories260K:
 * the largest logit difference to the unsmoothed f16 cache is 0.06, f16
 * against f32 cache 0.014).  Only f16 layers and the f16 sink tokens see
 * that; pairs are rotated only in layers whose cache is q8/q4.
 *
 * Choosing them.  The calibration prompts of kvcalib.c, then its longer
 * texts (cut at 512 tokens), are prefilled with an f32 cache, recording
 * each layer's rotated keys, its values and the second moments of what
 * reads them: the queries sharing the head (sum of q q^T) for keys, Wo's
 * columns (sum of Wo^T Wo over the group) for values.  The cost of a
 * head is then the error the cache's own type (q8 or q4, per layer) would
 * make, as it would be read:
 *   sum over tokens of d^T W d,  d = x - dequant(quant(x))
 * in the original basis, relative to sum x^T W x (its square root is the
 * "predicted error" reported).  Coordinate descent over the pairs
 * (exponents -4..4, eight phases 0..7pi/16) from the identity minimises
 * it; the first positions (the f16 sink tokens) are left out, and of the
 * rest it looks at every n-th token, 4096 / head_dim of them at most.
 * Heads of more than 16 channels use W's 2x2 pair blocks only (cross
 * terms between pairs of different frequencies average out).  The texts
 * are there for the positions: the prompts alone end by position 80, where
 * the slower pairs have barely turned, and a search on them misjudges
 * keys and queries as they meet later in a context (stories260K, q4/q4:
 * KL 0.041 -> 0.031 with the texts; rotating the prompts' keys to later
 * positions instead did less, with their queries too it did harm).
 * Four texts rather than two lower the KL on every story measured
 * (stories260K q4/q4, held-out text and four stories sampled from the
 * model, dPPL / KL: two texts +2.78/0.031, +3.36/0.029, +2.63/0.036,
 * +4.11/0.032, +3.15/0.030; four +2.58/0.030, +3.25/0.028, +2.23/0.034,
 * +3.63/0.029, +3.40/0.026).  dPPL moves within the spread between
 * near-equal plans: other choices of two more texts ranged over +-0.5
 * points per story, and six texts gave +3.29/0.030, +2.83/0.026,
 * +2.88/0.033, +3.28/0.029, +2.98/0.027.
 *
 * What a fold cannot do, and centring.  When every pair of a head turns
 * at its own frequency, the exact folds that commute with RoPE are per
 * pair a scale and a rotation (k -> z k, q -> q / conj(z) for a complex z)
 * and nothing more.  A pair whose key is large and is read by a large
 * query sets its group's step, and the error it then makes in q . k is
 * about |q| |k| / (7 sqrt 2) a step (q4) whatever z is.  stories260K's
 * slowest pairs are like that: a key of about 19 along one axis, nearly
 * the same for every token before RoPE, read by a query of about 12 along
 * the other (a learned position bias).  So the search is run a second time
 * on centred keys (kvcache.h: the cache stores k - R_p c and attention
 * adds q . R_p c back, c the head's mean pre-RoPE key on the calibration
 * prompts), and the plan with the smaller predicted error is kept; when it
 * is the centred one, the centres, moved by the key fold, go to the model
 * (m->kv_center) and every cache made for it uses them.  Errors are
 * relative to the uncentred keys in both plans.  Measured on stories260K
 * (held-out text, 512-token windows): q4/q4 +116% perplexity unsmoothed,
 * +86% smoothed, +4.5% smoothed and centred (KL 0.84 -> 0.63 -> 0.041),
 * +2.8% with two calibration texts (KL 0.031; two other stories +3.4%,
 * +3.2%), +2.6% with four (KL 0.030); q8/q8 KL 0.00155 -> 0.00118
 * (smoothed) -> 0.00012 (and centred) -> 0.00009 (and the texts).
 * What is left at q4 is the spread of 8 channels under one scale: after
 * the search each head's relative q4 error is 0.07-0.10, about what 4 bits
 * give 8 Gaussian channels under their common maximum, and the slowest
 * pair still carries half to three quarters of it.  Richer searches
 * lower the predicted error by 2-5% but do not move perplexity beyond
 * the spread between near-equal plans (about 0.5 points of dPPL from one
 * text to another; stories260K q4/q4 on three stories, dPPL / KL,
 * with two calibration texts +2.78/0.031, +3.36/0.029, +2.63/0.036):
 *   scales in quarter powers of two (f32 weights):
 *     +3.40/0.031, +3.55/0.029, +2.56/0.034;
 *   and 16 phases of pi/32: +2.26/0.031, +3.45/0.028, +1.91/0.035;
 *   32 phases of pi/64 instead: +3.19/0.035, +3.52/0.027, +2.88/0.034;
 *   every calibration token searched (not 4096 / head_dim):
 *     +2.84/0.030, +2.91/0.029, +2.86/0.038;
 *   a W per key, weighted by the attention it gets (a_tj^2 |v_j - o_t|^2):
 *     +3.19/0.031, +3.35/0.028, +2.65/0.037.
 * None of them is kept; the search of quarter scales and 16 phases also
 * takes 3 times as long (0.4 s -> 1.3 s and more).
 *
 * Weight types.  Row scaling by 2^e is exact for every supported type:
 * float types element by element, Q8_0/Q4_0/Q4_K/Q6_K through their f16
 * block scales (d, and dmin for Q4_K), codes untouched.  Rotations mix two
 * rows and Wo's column scaling cuts across blocks: both would need
 * requantizing, so for quantized weights key pairs get scales only and
 * values are left alone; both refusals are logged.  Smoothed matrices
 * become owned copies of the same type and size (the GGUF mapping is
 * read-only); the model frees them.
 */
#ifndef KVQ_KVSMOOTH_H
#define KVQ_KVSMOOTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/kvcache.h"
#include "engine/model.h"

enum kvq_kv_smooth_mode {
	KVQ_KV_SMOOTH_OFF = 0,
	KVQ_KV_SMOOTH_ON = 1,	/* every quantized half it can fold */
	KVQ_KV_SMOOTH_AUTO = 2,	/* small heads, where it helps enough */
};

/* "off", "on", "auto"; "?" for anything else. */
const char *kvq_kv_smooth_mode_name(int mode);
/* Parses a mode name: 0, or -EINVAL (*out unchanged). */
int kvq_kv_smooth_mode_parse(const char *s, enum kvq_kv_smooth_mode *out);

struct kvq_kv_smooth_opts {
	enum kvq_kv_smooth_mode mode;
	/* The cache's types per layer (enum kvq_kv_type): layers whose K
	 * (V) is q8 or q4 are shaped for that type, the others left alone. */
	uint8_t type_k[KVQ_KV_MAX_LAYERS];
	uint8_t type_v[KVQ_KV_MAX_LAYERS];
	bool rotate;		/* rotate key pairs too; default true */
	/* Also search with the keys centred (kvcache.h) and keep that when
	 * it predicts a smaller error; default true. */
	bool center;
	uint32_t n_skip;	/* leading positions left out; default 4 */
	/* auto: a half is folded when its predicted error falls by at least
	 * this fraction; default 0.2 */
	double min_gain;
};

/* mode auto, K q8 and V q4 in every layer (the serving defaults),
 * rotations on. */
void kvq_kv_smooth_opts_default(struct kvq_kv_smooth_opts *o);

struct kvq_kv_smooth_report {
	enum kvq_kv_smooth_mode mode;
	bool keys;		/* folded into the weights */
	bool values;
	bool rotated;		/* some key pair was rotated */
	bool centred;		/* keys centred (the model's kv_center) */
	/* Predicted relative error (see above) before and after, over the
	 * layers with a quantized type; 0 when not measured. */
	double k_err_before, k_err_after;
	double v_err_before, v_err_after;
	double k_err_centred;	/* the centred search's, 0: not tried */
	uint32_t n_tokens;	/* calibration tokens in the statistics */
	uint32_t n_inexact;	/* scaled weight values rounded */
	uint64_t owned_bytes;	/* memory of the smoothed copies */
	double seconds;
	char state[16];		/* "off", "keys", "values", "keys+values" */
	char why[256];		/* what decided it, one line */
};

/*
 * kvq_kv_smooth_apply() - measures @m on the calibration prompts and, as
 * @o says, folds key and/or value shaping into its weights (see above).
 * @o may be NULL (defaults).  Logs one line with the decision and the
 * time it took.  @rep may be NULL.  Returns 0 (also when nothing was
 * folded: the report says why), -EALREADY when @m's attention weights are
 * no longer the file's, -ENOMEM, or -EINVAL when the model cannot run.
 * On failure no weight is changed.  Not safe while @m runs steps.
 */
int kvq_kv_smooth_apply(struct kvq_model *m, const struct kvq_kv_smooth_opts *o,
			struct kvq_kv_smooth_report *rep);

/*
 * kvq_kv_smooth_error() - the predicted relative error of @m's keys in
 * @type_k and values in @type_v (q8 or q4) as it stands, measured the way
 * kvq_kv_smooth_apply() measures it, without changing anything: after a
 * fold it equals the report's *_after.  Returns 0 or -errno.
 */
int kvq_kv_smooth_error(struct kvq_model *m, enum kvq_kv_type type_k,
			enum kvq_kv_type type_v, double *k_err, double *v_err);

/*
 * kvq_kv_smooth_load() - the load-time step as kvqd runs it: @mode
 * (enum kvq_kv_smooth_mode) with the KV cache settings @kv_type_k ("q8",
 * a per-layer list, or "auto", taken as q4: calibration may choose it)
 * and @kv_type_v.  Call it after kvq_model_load() and before kv_type_k =
 * auto calibration, which then measures the shaped model.  Returns 0 or
 * -errno with a message in @err.
 */
int kvq_kv_smooth_load(struct kvq_model *m, int mode, const char *kv_type_k,
		       const char *kv_type_v, char *err, size_t errlen);

/*
 * kvq_kv_key_moments() - kv_key_rounding = queries: measures @m as it
 * stands (after any fold) on the calibration prompts and texts, and keeps
 * per KV head the second moments of the queries that read it, over RoPE
 * pairs (m->kv_key_moments), for every KV cache made for @m afterwards:
 * their q8/q4 keys then take, per pair, the codes whose error those
 * queries read least (kvcache.h, kvq_kv_round_pairs()).  Same format and
 * scales; the CPU backend only.  stories260K q4/q4, dPPL / KL against
 * f16, held-out story and four stories sampled from the model: nearest
 * +2.57/0.030, +3.25, +2.23, +3.63, +3.40; queries +1.95/0.022, +2.57,
 * +1.66, +2.82, +1.59.  Logs the time.  Returns 0 or -errno.
 */
int kvq_kv_key_moments(struct kvq_model *m);

/*
 * kvq_kv_smooth_last() - the report of the last kvq_kv_smooth_apply() in
 * this process, for status pages (kvqd holds one model).  With @m not
 * NULL, only if it was about @m.  Returns true and fills @out, or false
 * when there is none.
 */
bool kvq_kv_smooth_last(const struct kvq_model *m,
			struct kvq_kv_smooth_report *out);

#endif /* KVQ_KVSMOOTH_H */
