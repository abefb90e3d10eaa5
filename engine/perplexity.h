/*
 * perplexity.h - measuring a model (and its KV cache precision) on text.
 *
 * Why this file exists: the quality cost of a quantized KV cache is a
 * number, measured the way model quality is usually measured: perplexity
 * over held-out text in sliding windows, and the KL divergence of every
 * next-token distribution against a reference cache in the same run.
 */
#ifndef KVQ_PERPLEXITY_H
#define KVQ_PERPLEXITY_H

#include <stdint.h>

#include "engine/model.h"

struct kvq_ppl_result {
	double ppl;		/* exp(mean NLL) with the test cache */
	double ref_ppl;		/* with the reference cache (0 when none) */
	double kl_mean;		/* mean KL(ref || test) per scored token */
	double kl_max;
	double max_logit_err;	/* max |logit_test - logit_ref| */
	uint64_t n_scored;
	uint32_t n_windows;
	double seconds;
	uint64_t kv_bytes_per_token;	/* of the test cache */
};

/* Called after each window with (done, total). */
typedef void (*kvq_ppl_progress_fn)(void *arg, uint32_t done, uint32_t total);

/*
 * kvq_perplexity() - windows of @window tokens over @ids (n tokens), moving
 * by window/2; each window starts with BOS (when the model has one) and
 * scores the tokens of its second half (the whole first window).  With
 * @ref_opts, a second context with those options runs the same windows and
 * the KL divergence is measured.  Returns 0 or -errno (message in @err).
 */
int kvq_perplexity(struct kvq_model *m, const struct kvq_ctx_opts *opts,
		   const struct kvq_ctx_opts *ref_opts, const int32_t *ids,
		   uint32_t n, uint32_t window, struct kvq_ppl_result *res,
		   kvq_ppl_progress_fn progress, void *arg, char *err,
		   size_t errlen);

/*
 * kvq_perplexity_ref() - the same, with the reference run on another
 * model, @ref_m (NULL: @m), which must have the same vocabulary: the
 * unsmoothed model as the baseline of a smoothed one (kvsmooth.h).
 */
int kvq_perplexity_ref(struct kvq_model *m, const struct kvq_ctx_opts *opts,
		       struct kvq_model *ref_m,
		       const struct kvq_ctx_opts *ref_opts, const int32_t *ids,
		       uint32_t n, uint32_t window, struct kvq_ppl_result *res,
		       kvq_ppl_progress_fn progress, void *arg, char *err,
		       size_t errlen);

#endif /* KVQ_PERPLEXITY_H */
