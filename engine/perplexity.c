/*
 * perplexity.c - sliding-window perplexity and KL divergence (see
 * perplexity.h).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/perplexity.h"
#include "engine/tokenizer.h"

/* log-softmax normaliser: log(sum exp(x)). */
static double log_sum_exp(const float *x, uint32_t n)
{
	float mx = x[0];
	double s = 0;
	uint32_t i;

	for (i = 1; i < n; i++)
		mx = x[i] > mx ? x[i] : mx;
	for (i = 0; i < n; i++)
		s += exp((double)x[i] - mx);
	return mx + log(s);
}

/* KL(p || q) for logits a (p) and b (q). */
static double kl_div(const float *a, const float *b, uint32_t n)
{
	double la = log_sum_exp(a, n), lb = log_sum_exp(b, n), kl = 0;
	uint32_t i;

	for (i = 0; i < n; i++) {
		double lpa = a[i] - la, lpb = b[i] - lb;

		kl += exp(lpa) * (lpa - lpb);
	}
	return kl > 0 ? kl : 0;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Runs one window through @ctx in chunks; all logits into @lg. */
static int run_window(struct kvq_ctx *ctx, const int32_t *w, uint32_t len,
		      float *lg, uint32_t nv)
{
	uint32_t chunk = kvq_ctx_max_batch(ctx), done = 0;
	int seq = kvq_seq_create(ctx), ret = 0;

	if (seq < 0)
		return seq;
	while (done < len) {
		int k = (int)(len - done < chunk ? len - done : chunk);
		const int32_t *tp = w + done;
		struct kvq_batch b = {
			.n = 1, .seq = &seq, .n_tokens = &k, .tokens = &tp,
			.all_logits = true,
		};

		ret = kvq_step(ctx, &b, lg + (size_t)done * nv);
		if (ret)
			break;
		done += (uint32_t)k;
	}
	kvq_seq_free(ctx, seq);
	return ret;
}

int kvq_perplexity(struct kvq_model *m, const struct kvq_ctx_opts *opts,
		   const struct kvq_ctx_opts *ref_opts, const int32_t *ids,
		   uint32_t n, uint32_t window, struct kvq_ppl_result *res,
		   kvq_ppl_progress_fn progress, void *arg, char *err,
		   size_t errlen)
{
	return kvq_perplexity_ref(m, opts, NULL, ref_opts, ids, n, window,
				  res, progress, arg, err, errlen);
}

int kvq_perplexity_ref(struct kvq_model *m, const struct kvq_ctx_opts *opts,
		       struct kvq_model *ref_m,
		       const struct kvq_ctx_opts *ref_opts, const int32_t *ids,
		       uint32_t n, uint32_t window, struct kvq_ppl_result *res,
		       kvq_ppl_progress_fn progress, void *arg, char *err,
		       size_t errlen)
{
	uint32_t nv = kvq_model_hparams(m)->n_vocab;
	int32_t bos = kvq_tokenizer_bos(kvq_model_tokenizer(m));
	struct kvq_ctx_opts o = *opts, ro;
	struct kvq_ctx *ctx = NULL, *rctx = NULL;
	float *lg = NULL, *rlg = NULL;
	int32_t *w = NULL;
	double nll = 0, rnll = 0, t0 = now_s();
	uint32_t stride, start, total, done = 0, scored_until = 0;
	int ret = -ENOMEM;

	memset(res, 0, sizeof(*res));
	if (window < 4 || n < 2) {
		snprintf(err, errlen, "need at least 2 tokens of text and a window of 4 (got %u tokens, window %u)",
			 n, window);
		return -EINVAL;
	}
	if (window > n + 1)
		window = n + 1;
	stride = window / 2;
	o.n_ctx = window;
	o.max_seqs = 1;
	ret = kvq_ctx_create(m, &o, &ctx, err, errlen);
	if (ret)
		return ret;
	res->kv_bytes_per_token = kvq_ctx_kv_bytes_per_token(ctx);
	if (ref_opts) {
		if (!ref_m)
			ref_m = m;
		if (kvq_model_hparams(ref_m)->n_vocab != nv) {
			snprintf(err, errlen, "the reference model has %u tokens, the model %u",
				 kvq_model_hparams(ref_m)->n_vocab, nv);
			ret = -EINVAL;
			goto out;
		}
		ro = *ref_opts;
		ro.n_ctx = window;
		ro.max_seqs = 1;
		ret = kvq_ctx_create(ref_m, &ro, &rctx, err, errlen);
		if (ret)
			goto out;
	}
	ret = -ENOMEM;
	lg = malloc((size_t)window * nv * sizeof(float));
	rlg = rctx ? malloc((size_t)window * nv * sizeof(float)) : NULL;
	w = malloc(window * sizeof(*w));
	if (!lg || !w || (rctx && !rlg)) {
		snprintf(err, errlen, "out of memory for %u x %u logits", window, nv);
		goto out;
	}
	/* Window j covers text tokens [start, start + window - 1) after BOS
	 * (or [start, start + window) without one). */
	total = 0;
	for (start = 0;; start += stride) {
		total++;
		if (start + window - (bos >= 0) >= n)
			break;
	}
	for (start = 0; done < total; start += stride) {
		uint32_t off = bos >= 0 ? 1 : 0, len, i;

		len = n - start < window - off ? n - start : window - off;
		if (off)
			w[0] = bos;
		memcpy(w + off, ids + start, len * sizeof(*w));
		len += off;
		ret = run_window(ctx, w, len, lg, nv);
		if (!ret && rctx)
			ret = run_window(rctx, w, len, rlg, nv);
		if (ret) {
			snprintf(err, errlen, "evaluation failed at window %u: %s",
				 done, strerror(-ret));
			goto out;
		}
		/* Score each text token once: the predictions of tokens no
		 * earlier window scored (the second half of a window). */
		for (i = 0; i + 1 < len; i++) {
			const float *row = lg + (size_t)i * nv;
			uint32_t tix = start + i + 1 - off;

			if (tix < scored_until)
				continue;
			nll += log_sum_exp(row, nv) - row[w[i + 1]];
			if (rctx) {
				const float *rrow = rlg + (size_t)i * nv;
				double kl = kl_div(rrow, row, nv);
				uint32_t v;

				rnll += log_sum_exp(rrow, nv) - rrow[w[i + 1]];
				res->kl_mean += kl;
				if (kl > res->kl_max)
					res->kl_max = kl;
				for (v = 0; v < nv; v++) {
					double e = fabs(row[v] - rrow[v]);

					if (e > res->max_logit_err)
						res->max_logit_err = e;
				}
			}
			res->n_scored++;
		}
		scored_until = start + len - off;
		done++;
		if (progress)
			progress(arg, done, total);
	}
	res->n_windows = total;
	res->ppl = exp(nll / res->n_scored);
	if (rctx) {
		res->ref_ppl = exp(rnll / res->n_scored);
		res->kl_mean /= res->n_scored;
	}
	res->seconds = now_s() - t0;
	ret = 0;
out:
	free(lg);
	free(rlg);
	free(w);
	kvq_ctx_destroy(ctx);
	kvq_ctx_destroy(rctx);
	return ret;
}
