/*
 * kvcalib.h - deciding at load time whether a model's keys tolerate 4 bits.
 *
 * Why this file exists: values quantize to 4 bits with little loss on most
 * models, keys do not on some (outlier channels, key bias), and which kind
 * a model is can be measured in a second at start-up rather than guessed.
 *
 * Method (kv_type_k = auto).  A few calibration prompts are prefilled and
 * one token decoded, with values in f16 and keys in f16 (reference), q8 and
 * q4; the error of a setting is the largest |logit - reference logit| over
 * the prompts, divided by the reference logits' standard deviation.  The
 * ratio err(q4)/err(q8) is reported: quantization noise alone predicts
 * about 18 (127/7); a much larger ratio means 4-bit steps saturate on this
 * model's keys.  Keys go to q4 when err(q4) <= bound_q4 and the ratio is
 * at most ratio_max x 18; otherwise each layer is tried alone at q4 and
 * layers are moved to q4, least sensitive first, while the summed
 * per-layer error stays within bound_q4; the rest stay q8, or f16 when
 * even err(q8) exceeds bound_q8.
 */
#ifndef KVQ_KVCALIB_H
#define KVQ_KVCALIB_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/model.h"

struct kvq_kv_calib_report {
	double err_q8;		/* relative max logit error, all layers q8 */
	double err_q4;		/* all layers q4 */
	double ratio;		/* err_q4 / err_q8 */
	double err_final;	/* the chosen assignment */
	uint32_t n_q4;		/* layers given q4 keys */
	uint32_t n_q8;
	uint32_t n_f16;
	double seconds;
	char decision[64];	/* "q4", "q8", "f16", "mixed: 10 q4, 2 q8" */
};

struct kvq_kv_calib_opts {
	double bound_q4;	/* default 0.25 */
	double bound_q8;	/* default 0.25 */
	double ratio_max;	/* default 3.0 */
	bool per_layer;		/* default true */
};

void kvq_kv_calib_opts_default(struct kvq_kv_calib_opts *o);

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
