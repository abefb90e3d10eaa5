/*
 * kvcalib.h - deciding at load time whether a model's keys tolerate 4 bits.
 *
 * Why this file exists: values quantize to 4 bits with little loss on most
 * models, keys do not on some (outlier channels, key bias), and which kind
 * a model is can be measured in a second at start-up rather than guessed.
 *
 * Method (kv_type_k = auto).  A few calibration prompts are prefilled and
 * one token decoded, with values in f16 and keys in f16 (reference), q8 and
 * q4.  For each setting two errors are measured over the prompts: the
 * largest |logit - reference logit| divided by the reference logits'
 * standard deviation (reported), and the largest KL divergence of the
 * next-token distribution from the reference's (which decides: it is what
 * perplexity feels).  Keys go to q4 when KL(q4) <= kl_q4; otherwise each
 * layer is tried alone at q4 and layers move to q4, least sensitive first,
 * while their summed KL stays within kl_q4; the rest stay q8, or f16 when
 * even KL(q8) exceeds kl_q8.
 *
 * The ratio err(q4)/err(q8) is measured and reported too.  It does not
 * decide: while quantization noise is small the ratio is simply the ratio
 * of the step sizes (about 127/7 = 18) on sensitive and insensitive models
 * alike, and when 4-bit steps swamp the keys it falls, not rises (measured
 * on generated models with a growing key bias: 21, 19, 18, 4.7).  It only
 * vetoes q4 when it exceeds ratio_max x 18, a sign that err(q8) is
 * unrepresentatively small.
 */
#ifndef KVQ_KVCALIB_H
#define KVQ_KVCALIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"

struct kvq_kv_calib_report {
	double err_q8;		/* relative max logit error, all layers q8 */
	double err_q4;		/* all layers q4 */
	double ratio;		/* err_q4 / err_q8 */
	double err_final;	/* the chosen assignment */
	double kl_q8;		/* max KL against the reference, all q8 */
	double kl_q4;		/* all q4 */
	double kl_final;
	uint32_t n_q4;		/* layers given q4 keys */
	uint32_t n_q8;
	uint32_t n_f16;
	double seconds;
	char decision[64];	/* "q4", "q8", "f16", "mixed: 10 q4, 2 q8" */
};

struct kvq_kv_calib_opts {
	double kl_q4;		/* KL bound for q4 keys, default 0.005 */
	double kl_q8;		/* for q8 keys (else f16), default 0.005 */
	double ratio_max;	/* default 3.0 */
	bool per_layer;		/* default true */
};

void kvq_kv_calib_opts_default(struct kvq_kv_calib_opts *o);

/* The calibration prompts (ordinary English; kvsmooth.c measures on them
 * too): @n of them, static strings. */
const char *const *kvq_kv_calib_prompts(size_t *n);

/* Longer passages (a story each, a context long or more) that
 * kvsmooth.c measures on after the prompts: @n of them, static strings. */
const char *const *kvq_kv_calib_texts(size_t *n);

/*
 * kvq_kv_calibrate_keys() - runs the method above on @m with @base's
 * page/sink settings and V types, writing one key type per layer to
 * @types_k.  @co may be NULL (defaults); @rep may be NULL.  Returns 0 or
 * -errno (the model cannot run: then @types_k is set to q8).
 */
int kvq_kv_calibrate_keys(struct kvq_model *m, const struct kvq_ctx_opts *base,
			  uint8_t *types_k, struct kvq_kv_calib_report *rep);
int kvq_kv_calibrate_keys_opts(struct kvq_model *m,
			       const struct kvq_ctx_opts *base,
			       const struct kvq_kv_calib_opts *co,
			       uint8_t *types_k,
			       struct kvq_kv_calib_report *rep);

#endif /* KVQ_KVCALIB_H */
