/*
 * fwd_util.c - what test_gpu_fwd.c's cases share that reports nothing
 * itself (tap.h keeps its counts in each file): steps of one sequence,
 * the f32-cache options, what a model's weights are, and runs of a model
 * under a weight setting.  See fwd_util.h.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/forward_gpu.h"
#include "engine/gguf.h"
#include "engine/kvcache.h"
#include "engine/model.h"
#include "engine/model_impl.h"
#include "engine/quant.h"
#include "tests/gpu/fwd_util.h"

int seq_step(struct kvq_ctx *c, int seq, const int32_t *tok, int n, bool all,
	     float *logits)
{
	struct kvq_batch b = { 0 };

	b.n = 1;
	b.seq = &seq;
	b.n_tokens = &n;
	b.tokens = &tok;
	b.all_logits = all;
	return kvq_step(c, &b, logits);
}

int one_step(struct kvq_ctx *c, int seq, const int32_t *tok, int n,
	     float *logits)
{
	return seq_step(c, seq, tok, n, false, logits);
}

void f32_cache_opts(struct kvq_ctx_opts *o, const struct kvq_hparams *hp)
{
	kvq_ctx_opts_default(o);
	o->kv_type_k = KVQ_KV_F32;
	o->kv_type_v = KVQ_KV_F32;
	o->n_ctx = 256 < hp->ctx_len ? 256 : hp->ctx_len;
	o->max_seqs = 2;
}

bool k_quant(struct kvq_model *m)
{
	const char *d = kvq_model_desc(m);

	return strstr(d, ", Q4_K,") || strstr(d, ", Q6_K,");
}

bool kept_quantized(struct kvq_model *m)
{
	const char *d = kvq_model_desc(m);

	return strstr(d, ", Q8_0,") || strstr(d, ", Q4_0,") || k_quant(m);
}

bool model_kind(const char *path, bool *q8, bool *kq, uint32_t *V)
{
	struct kvq_model_opts mo = { 0 };
	struct kvq_model *m;
	char err[256];

	mo.n_threads = 2;
	if (kvq_model_load(path, &mo, &m, err, sizeof(err)))
		return false;
	*q8 = kept_quantized(m);
	*kq = k_quant(m);
	*V = kvq_model_hparams(m)->n_vocab;
	kvq_model_destroy(m);
	return true;
}

uint64_t upload_bytes(const char *path, const char *w, const char *fault)
{
	struct kvq_model_opts mo = { 0 };
	struct kvq_model *m = NULL;
	struct kvq_ctx *gc = NULL;
	struct kvq_ctx_opts o;
	uint64_t b = 0;
	char err[256];

	if (w)
		setenv("KVQ_GPU_WEIGHTS", w, 1);
	if (fault)
		setenv("KVQ_GPU_FAULT", fault, 1);
	mo.n_threads = 2;
	if (!kvq_model_load(path, &mo, &m, err, sizeof(err))) {
		f32_cache_opts(&o, kvq_model_hparams(m));
		o.device = KVQ_CTX_GPU;
		if (!kvq_ctx_create(m, &o, &gc, err, sizeof(err)))
			b = kvq_model_gpu_bytes(m);
	}
	kvq_ctx_destroy(gc);
	kvq_model_destroy(m);
	unsetenv("KVQ_GPU_WEIGHTS");
	unsetenv("KVQ_GPU_FAULT");
	return b;
}

int quant_values_run(const char *path, bool f16, float *out, uint32_t V,
		     char *err, size_t errlen)
{
	struct kvq_model_opts mo = { 0 };
	struct kvq_model *m = NULL;
	struct kvq_ctx *gc = NULL;
	struct kvq_ctx_opts o;
	int32_t tok[3] = { 1, 7, 11 }, t1, tb[QV_SEQS];
	int32_t nb[QV_SEQS], sb[QV_SEQS];
	const int32_t *tp[QV_SEQS];
	struct kvq_batch b = { 0 };
	int ret, sq, i;

	setenv("KVQ_GPU_WEIGHTS", f16 ? "f16" : "compact", 1);
	mo.n_threads = 2;
	ret = kvq_model_load(path, &mo, &m, err, errlen);
	if (ret)
		goto out;
	f32_cache_opts(&o, kvq_model_hparams(m));
	o.max_seqs = QV_SEQS + 1;
	o.device = KVQ_CTX_GPU;
	ret = kvq_ctx_create(m, &o, &gc, err, errlen);
	if (ret)
		goto out;
	sq = kvq_seq_create(gc);
	ret = one_step(gc, sq, tok, 3, out);
	for (i = 0; !ret && i < QV_STEPS; i++) {
		t1 = (int32_t)((i * 37 + 3) % V);
		ret = one_step(gc, sq, &t1, 1, out + (size_t)(i + 1) * V);
	}
	for (i = 0; !ret && i < QV_SEQS; i++) {
		sb[i] = kvq_seq_create(gc);
		tb[i] = (int32_t)((i * 53 + 5) % V);
		tp[i] = &tb[i];
		nb[i] = 1;
		if (sb[i] < 0)
			ret = -ENOMEM;
	}
	if (!ret) {
		b.n = QV_SEQS;
		b.seq = sb;
		b.n_tokens = nb;
		b.tokens = tp;
		ret = kvq_step(gc, &b, out + (size_t)(QV_STEPS + 1) * V);
	}
	if (ret)
		snprintf(err, errlen, "a step failed (%d)", ret);
out:
	kvq_ctx_destroy(gc);
	kvq_model_destroy(m);
	unsetenv("KVQ_GPU_WEIGHTS");
	return ret;
}

int fwd_wide_weights(struct kvq_model *m, const char *at, bool *named)
{
	uint32_t i, r, c;
	float *row = NULL;
	int n_big = 0;

	*named = false;
	for (i = 0; i < m->n_weights; i++) {
		struct kvq_weight *w = &m->weights[i];
		const uint8_t *src;
		bool big = false;

		if (w->rows < 2 || w->type == KVQ_TYPE_F32)
			continue;
		free(row);
		row = malloc(w->cols * sizeof(float));
		if (!row)
			break;
		src = kvq_weight_get(w);
		for (r = 0; r < w->rows && !big; r++) {
			if (kvq_dequant_row(w->type, src + kvq_type_row_bytes(
						    w->type, w->cols) * r,
					    row, w->cols))
				break;
			for (c = 0; c < w->cols; c++)
				big |= (kvq_f32_to_f16(row[c]) & 0x7fff) ==
				       0x7c00 && isfinite(row[c]);
		}
		kvq_weight_put(w);
		if (!big)
			continue;
		n_big++;
		/* the one named: a tensor beyond the range */
		c = (uint32_t)strlen(w->name);
		*named |= at && !strncmp(at + 44, w->name, c) && at[44 + c] == ')';
	}
	free(row);
	return n_big;
}
