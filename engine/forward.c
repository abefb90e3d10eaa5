/*
 * forward.c - contexts, sequences and the batched forward step.
 *
 * Why this file exists: one step serves every active sequence.  Tokens of
 * all entries in a batch are stacked into one activation matrix, so the
 * weight matrices are read once per step whatever the batch holds; only
 * attention is per sequence, over that sequence's KV pages.  Per-sequence
 * results do not depend on what else is in the batch (rows are computed
 * independently), which is what makes a seeded request reproducible beside
 * any number of others.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/forward_gpu.h"
#include "engine/kvcache.h"
#include "engine/model.h"
#include "engine/model_impl.h"
#include "engine/sampler.h"
#include "kernels/sample.h"

struct kvq_ctx_seq {
	bool used;
	struct kvq_kv_seq kv;
};

struct kvq_ctx {
	struct kvq_model *m;
	struct kvq_kvcache *kv;
	struct kvq_ctx_seq *seqs;
	uint32_t max_seqs;
	uint32_t n_ctx;
	uint32_t max_batch;
	/* scratch for max_batch tokens */
	float *x, *xb, *q, *k, *v, *att, *hb, *hb2;
	uint32_t *pos;
	struct kvq_attn_seq *aseq;
	struct kvq_rope rope;
	struct kvq_ctx_opts opts;	/* as resolved at creation */
	struct kvq_ctx_gpu *gpu;	/* the step runs on the GPU */
	int *slots;			/* per batch entry, for the GPU */
	/* kvq_step_sample(): per batch entry, the settings and uniform
	 * numbers for the GPU sampler and the sampler's state before the
	 * draw; logits when the caller wants none (host sampling: max_batch
	 * rows, allocated on first use) */
	struct kvq_gpu_sample_params *gsp;
	float *gu;
	uint64_t (*grng)[4];
	float *slogits;
};

int kvq_ctx_create(struct kvq_model *m, const struct kvq_ctx_opts *o,
		   struct kvq_ctx **out, char *err, size_t errlen)
{
	const struct kvq_hparams *hp = &m->hp;
	struct kvq_ctx_opts d = { 0 };
	struct kvq_kv_opts ko = { 0 };
	size_t B, qd, kvd;
	struct kvq_ctx *c;
	uint32_t l;
	int ret;

	if (!o)
		o = &d;
	if (!m->layers) {
		snprintf(err, errlen, "model has no weights (vocabulary only)");
		return -EINVAL;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->m = m;
	c->n_ctx = o->n_ctx ? o->n_ctx : hp->ctx_len;
	c->max_batch = o->max_batch ? o->max_batch : 512;
	c->max_seqs = o->max_seqs ? o->max_seqs : 16;
	c->rope.dim = hp->rope_dim;
	c->rope.base = hp->rope_base;
	c->rope.neox = hp->rope_neox;
	if (hp->n_layers > KVQ_KV_MAX_LAYERS ||
	    hp->head_dim > KVQ_KV_MAX_HEAD_DIM ||
	    hp->n_heads / hp->n_kv_heads > KVQ_KV_MAX_GQA) {
		snprintf(err, errlen,
			 "the KV cache supports at most %d layers, head_dim %d and %d query heads per KV head",
			 KVQ_KV_MAX_LAYERS, KVQ_KV_MAX_HEAD_DIM, KVQ_KV_MAX_GQA);
		ret = -EINVAL;
		goto out_free;
	}
	ko.n_layers = hp->n_layers;
	ko.n_kv_heads = hp->n_kv_heads;
	ko.head_dim = hp->head_dim;
	ko.page_tokens = o->kv_page_tokens ? o->kv_page_tokens : 16;
	ko.n_sink = o->kv_sink_tokens;
	ko.k_center = m->kv_center;
	ko.k_moments = m->kv_key_moments;
	ko.max_pos = c->n_ctx;
	ko.rope_dim = hp->rope_dim;
	ko.rope_base = hp->rope_base;
	ko.rope_neox = hp->rope_neox;
	if (ko.page_tokens > 64 || ko.n_sink > ko.page_tokens) {
		snprintf(err, errlen,
			 "kv_page_tokens must be 1..64 and kv_sink_tokens at most kv_page_tokens (got %u and %u)",
			 ko.page_tokens, ko.n_sink);
		ret = -EINVAL;
		goto out_free;
	}
	for (l = 0; l < hp->n_layers; l++) {
		ko.type_k[l] = o->kv_types_k ? o->kv_types_k[l] : o->kv_type_k;
		ko.type_v[l] = o->kv_types_v ? o->kv_types_v[l] : o->kv_type_v;
		if (ko.type_k[l] >= KVQ_KV_NTYPES || ko.type_v[l] >= KVQ_KV_NTYPES ||
		    (hp->head_dim >= 32 && hp->head_dim % 32 &&
		     (ko.type_k[l] >= KVQ_KV_Q8 || ko.type_v[l] >= KVQ_KV_Q8))) {
			snprintf(err, errlen,
				 "layer %u: KV types %s/%s cannot be used with head_dim %u",
				 l, kvq_kv_type_name(ko.type_k[l]),
				 kvq_kv_type_name(ko.type_v[l]), hp->head_dim);
			ret = -EINVAL;
			goto out_free;
		}
	}
	/* Every sequence may hold a partial last page. */
	ko.n_pages = ((o->kv_tokens ? o->kv_tokens : c->n_ctx) +
		      ko.page_tokens - 1) / ko.page_tokens + c->max_seqs;
	ret = kvq_kv_create(&ko, &c->kv);
	if (ret) {
		snprintf(err, errlen, "cannot allocate the KV cache (%u pages)",
			 ko.n_pages);
		goto out_free;
	}
	c->opts = *o;
	B = c->max_batch;
	qd = (size_t)hp->n_heads * hp->head_dim;
	kvd = (size_t)hp->n_kv_heads * hp->head_dim;
	c->seqs = calloc(c->max_seqs, sizeof(*c->seqs));
	c->x = malloc(B * hp->dim * sizeof(float));
	c->xb = malloc(B * (hp->dim > qd ? hp->dim : qd) * sizeof(float));
	c->q = malloc(B * qd * sizeof(float));
	c->k = malloc(B * kvd * sizeof(float));
	c->v = malloc(B * kvd * sizeof(float));
	c->att = malloc(B * qd * sizeof(float));
	c->hb = malloc(B * hp->ffn_dim * sizeof(float));
	c->hb2 = malloc(B * hp->ffn_dim * sizeof(float));
	c->pos = malloc(B * sizeof(*c->pos));
	c->aseq = malloc(B * sizeof(*c->aseq));
	c->slots = malloc(B * sizeof(*c->slots));
	c->gsp = malloc(B * sizeof(*c->gsp));
	c->gu = malloc(B * sizeof(*c->gu));
	c->grng = malloc(B * sizeof(*c->grng));
	if (!c->seqs || !c->x || !c->xb || !c->q || !c->k || !c->v ||
	    !c->att || !c->hb || !c->hb2 || !c->pos || !c->aseq ||
	    !c->slots || !c->gsp || !c->gu || !c->grng) {
		snprintf(err, errlen, "out of memory for activations");
		ret = -ENOMEM;
		goto out_free;
	}
	if (o->device == KVQ_CTX_GPU && m->kv_key_moments) {
		/* Its bytes would differ from the GPU append kernel's. */
		snprintf(err, errlen,
			 "kv_key_rounding = queries runs on the CPU only: the GPU backend stores the nearest codes (use kv_key_rounding = nearest, or --device cpu)");
		ret = -EOPNOTSUPP;
		goto out_free;
	}
	if (o->device == KVQ_CTX_GPU) {
		/* The logits of a step are at most max_batch rows. */
		ret = kvq_ctx_gpu_create(m, c->kv, c->max_batch, c->max_seqs,
					 c->n_ctx, &c->gpu, err, errlen);
		if (ret)
			goto out_free;
	} else if (o->device != KVQ_CTX_CPU) {
		snprintf(err, errlen, "unknown device %d", o->device);
		ret = -EINVAL;
		goto out_free;
	}
	*out = c;
	return 0;

out_free:
	kvq_ctx_destroy(c);
	return ret;
}

void kvq_ctx_destroy(struct kvq_ctx *c)
{
	uint32_t i;

	if (!c)
		return;
	for (i = 0; c->seqs && i < c->max_seqs; i++)
		if (c->seqs[i].used)
			kvq_kv_seq_release(c->kv, &c->seqs[i].kv);
	kvq_ctx_gpu_destroy(c->gpu);
	kvq_kv_destroy(c->kv);
	free(c->seqs);
	free(c->x);
	free(c->xb);
	free(c->q);
	free(c->k);
	free(c->v);
	free(c->att);
	free(c->hb);
	free(c->hb2);
	free(c->pos);
	free(c->aseq);
	free(c->slots);
	free(c->gsp);
	free(c->gu);
	free(c->grng);
	free(c->slogits);
	free(c);
}

int kvq_ctx_device(const struct kvq_ctx *c)
{
	return c->gpu ? KVQ_CTX_GPU : KVQ_CTX_CPU;
}

uint64_t kvq_ctx_device_bytes(const struct kvq_ctx *c)
{
	return c->gpu ? kvq_ctx_gpu_bytes(c->gpu) : 0;
}

const char *kvq_ctx_fallback(const struct kvq_ctx *c)
{
	return c->gpu ? kvq_ctx_gpu_fallback(c->gpu) : NULL;
}

uint64_t kvq_ctx_device_sampled(const struct kvq_ctx *c)
{
	return c->gpu ? kvq_ctx_gpu_sampled(c->gpu) : 0;
}

double kvq_ctx_device_busy_us(const struct kvq_ctx *c)
{
	return c->gpu ? kvq_ctx_gpu_busy_us(c->gpu) : 0.0;
}

float *kvq_ctx_logits_buffer(struct kvq_ctx *c, size_t *rows)
{
	uint32_t n = 0;
	float *p = c->gpu ? kvq_ctx_gpu_logits(c->gpu, &n) : NULL;

	*rows = p ? n : 0;
	return p;
}

void kvq_ctx_describe(const struct kvq_ctx *c, char *buf, size_t len)
{
	if (c->gpu)
		kvq_ctx_gpu_describe(c->gpu, buf, len);
	else
		snprintf(buf, len, "cpu backend");
}

int kvq_seq_create(struct kvq_ctx *c)
{
	uint32_t i;

	for (i = 0; i < c->max_seqs; i++) {
		if (!c->seqs[i].used) {
			c->seqs[i].used = true;
			kvq_kv_seq_init(&c->seqs[i].kv);
			return (int)i;
		}
	}
	return -ENOSPC;
}

static struct kvq_ctx_seq *seq_get(const struct kvq_ctx *c, int seq)
{
	if (seq < 0 || (uint32_t)seq >= c->max_seqs || !c->seqs[seq].used)
		return NULL;
	return &c->seqs[seq];
}

void kvq_seq_free(struct kvq_ctx *c, int seq)
{
	struct kvq_ctx_seq *s = seq_get(c, seq);

	if (!s)
		return;
	kvq_kv_seq_release(c->kv, &s->kv);
	s->used = false;
}

int kvq_seq_len(const struct kvq_ctx *c, int seq)
{
	struct kvq_ctx_seq *s = seq_get(c, seq);

	return s ? (int)s->kv.n_tokens : -EINVAL;
}

int kvq_seq_truncate(struct kvq_ctx *c, int seq, int pos)
{
	struct kvq_ctx_seq *s = seq_get(c, seq);

	if (!s || pos < 0 || (uint32_t)pos > s->kv.n_tokens)
		return -EINVAL;
	kvq_kv_seq_truncate(c->kv, &s->kv, (uint32_t)pos);
	return 0;
}

int kvq_seq_fork(struct kvq_ctx *c, int dst, int src, uint32_t n)
{
	struct kvq_ctx_seq *d = seq_get(c, dst), *s = seq_get(c, src);
	int ret;

	if (!d || !s || d == s || d->kv.n_tokens || d->kv.n_pages ||
	    n > s->kv.n_tokens)
		return -EINVAL;
	ret = kvq_kv_seq_fork(c->kv, &d->kv, &s->kv, n);
	if (!ret && c->gpu)
		ret = kvq_ctx_gpu_copy_sinks(c->gpu, dst, src);
	if (ret)
		kvq_kv_seq_release(c->kv, &d->kv);
	return ret;
}

int kvq_seq_fill_synthetic(struct kvq_ctx *c, int seq, uint32_t n)
{
	struct kvq_ctx_seq *s = seq_get(c, seq);
	uint32_t from;
	int ret;

	if (!s)
		return -EINVAL;
	if (!c->gpu)
		return -ENOSYS;
	from = s->kv.n_tokens;
	if (from + n > c->n_ctx)
		return -ENOSPC;
	ret = kvq_kv_seq_reserve(c->kv, &s->kv, n);
	if (ret)
		return ret;
	ret = kvq_ctx_gpu_fill(c->gpu, seq, s->kv.pages, s->kv.n_pages, from,
			       from + n);
	if (ret) {
		kvq_kv_seq_truncate(c->kv, &s->kv, from);
		return ret;
	}
	kvq_kv_seq_commit(&s->kv, n);
	return 0;
}

uint64_t kvq_ctx_kv_bytes_used(const struct kvq_ctx *c)
{
	return kvq_kv_bytes_used(c->kv);
}

uint64_t kvq_ctx_kv_bytes_per_token(const struct kvq_ctx *c)
{
	return kvq_kv_bytes_per_token(c->kv);
}

struct kvq_kvcache *kvq_ctx_kvcache(const struct kvq_ctx *c)
{
	return c->kv;
}

uint32_t kvq_ctx_n_ctx(const struct kvq_ctx *c)
{
	return c->n_ctx;
}

uint32_t kvq_ctx_max_batch(const struct kvq_ctx *c)
{
	return c->max_batch;
}

static int check_batch(struct kvq_ctx *c, const struct kvq_batch *b,
		       uint32_t *total)
{
	uint32_t n_vocab = c->m->hp.n_vocab;
	int i, j, t;

	*total = 0;
	if (b->n <= 0)
		return -EINVAL;
	for (i = 0; i < b->n; i++) {
		struct kvq_ctx_seq *s = seq_get(c, b->seq[i]);

		if (!s || b->n_tokens[i] <= 0)
			return -EINVAL;
		for (j = 0; j < i; j++)
			if (b->seq[j] == b->seq[i])
				return -EINVAL;
		for (t = 0; t < b->n_tokens[i]; t++)
			if (b->tokens[i][t] < 0 ||
			    (uint32_t)b->tokens[i][t] >= n_vocab)
				return -EINVAL;
		if (s->kv.n_tokens + (uint32_t)b->n_tokens[i] > c->n_ctx)
			return -ENOSPC;
		*total += (uint32_t)b->n_tokens[i];
	}
	if (*total > c->max_batch)
		return -E2BIG;
	return 0;
}

/* Sampling on the device: per entry settings, uniform numbers, ids. */
struct dev_sample {
	const struct kvq_gpu_sample_params *sp;
	const float *u;
	int32_t *ids;
};

static int step_run(struct kvq_ctx *c, const struct kvq_batch *b,
		    float *logits, const struct dev_sample *ds)
{
	struct kvq_model *m = c->m;
	const struct kvq_hparams *hp = &m->hp;
	struct kvq_backend *be = &m->be;
	const struct kvq_backend_ops *op = be->ops;
	uint32_t qd = hp->n_heads * hp->head_dim;
	uint32_t kvd = hp->n_kv_heads * hp->head_dim;
	uint32_t T, row = 0, n_out, l, t;
	int i, ret;

	ret = check_batch(c, b, &T);
	if (ret)
		return ret;
	for (i = 0; i < b->n; i++) {
		struct kvq_ctx_seq *s = &c->seqs[b->seq[i]];

		ret = kvq_kv_seq_reserve(c->kv, &s->kv, b->n_tokens[i]);
		if (ret) {
			/* Give back what earlier entries reserved. */
			while (i-- > 0) {
				s = &c->seqs[b->seq[i]];
				kvq_kv_seq_truncate(c->kv, &s->kv,
						    s->kv.n_tokens);
			}
			return ret;
		}
	}
	for (i = 0; i < b->n; i++) {
		struct kvq_ctx_seq *s = &c->seqs[b->seq[i]];
		struct kvq_attn_seq *a = &c->aseq[i];

		a->kv = &s->kv;
		a->pos0 = s->kv.n_tokens;
		a->n_new = (uint32_t)b->n_tokens[i];
		a->row0 = row;
		for (t = 0; t < a->n_new; t++)
			c->pos[row + t] = a->pos0 + t;
		if (!c->gpu) {
			ret = op->embed(be, m->tok_embd, b->tokens[i],
					a->n_new, c->x + (size_t)row * hp->dim);
			if (ret)
				goto out_unreserve;
		}
		row += a->n_new;
	}
	if (c->gpu) {
		for (i = 0; i < b->n; i++)
			c->slots[i] = b->seq[i];
		ret = kvq_ctx_gpu_step(c->gpu, b, c->slots, c->aseq, c->pos, T,
				       logits, ds ? ds->sp : NULL,
				       ds ? ds->u : NULL, ds ? ds->ids : NULL);
		if (ret) {
			ret = -EIO;
			goto out_unreserve;
		}
		goto commit;
	}

	for (l = 0; l < hp->n_layers; l++) {
		struct kvq_layer *L = &m->layers[l];

		op->rmsnorm(be, c->x, L->attn_norm, c->xb, T, hp->dim,
			    hp->rms_eps);
		op->matmul(be, L->wq, c->xb, c->q, T);
		op->matmul(be, L->wk, c->xb, c->k, T);
		op->matmul(be, L->wv, c->xb, c->v, T);
		if (L->bq) {
			op->add_bias(be, c->q, L->bq, T, qd);
			op->add_bias(be, c->k, L->bk, T, kvd);
			op->add_bias(be, c->v, L->bv, T, kvd);
		}
		op->rope(be, c->q, c->pos, T, hp->n_heads, hp->head_dim,
			 hp->rope_dim, hp->rope_base, hp->rope_neox);
		op->attention(be, c->kv, l, c->aseq, (uint32_t)b->n, c->q,
			      c->k, c->v, c->att, hp->n_heads, &c->rope);
		op->matmul(be, L->wo, c->att, c->xb, T);
		op->add(be, c->x, c->xb, (size_t)T * hp->dim);

		op->rmsnorm(be, c->x, L->ffn_norm, c->xb, T, hp->dim,
			    hp->rms_eps);
		op->matmul(be, L->w_gate, c->xb, c->hb, T);
		op->matmul(be, L->w_up, c->xb, c->hb2, T);
		op->swiglu(be, c->hb, c->hb2, (size_t)T * hp->ffn_dim);
		op->matmul(be, L->w_down, c->hb, c->xb, T);
		op->add(be, c->x, c->xb, (size_t)T * hp->dim);
	}

	/* Only the rows whose logits are wanted go through the output. */
	if (b->all_logits) {
		n_out = T;
	} else {
		n_out = 0;
		for (i = 0; i < b->n; i++) {
			uint32_t last = c->aseq[i].row0 + c->aseq[i].n_new - 1;

			if (last != n_out)
				memcpy(c->x + (size_t)n_out * hp->dim,
				       c->x + (size_t)last * hp->dim,
				       hp->dim * sizeof(float));
			n_out++;
		}
	}
	op->rmsnorm(be, c->x, m->output_norm, c->xb, n_out, hp->dim,
		    hp->rms_eps);
	op->matmul(be, m->output, c->xb, logits, n_out);

commit:
	for (i = 0; i < b->n; i++)
		kvq_kv_seq_commit(&c->seqs[b->seq[i]].kv, c->aseq[i].n_new);
	return 0;

out_unreserve:
	for (i = 0; i < b->n; i++) {
		struct kvq_ctx_seq *s = &c->seqs[b->seq[i]];

		kvq_kv_seq_truncate(c->kv, &s->kv, s->kv.n_tokens);
	}
	return ret;
}

int kvq_step(struct kvq_ctx *c, const struct kvq_batch *b, float *logits)
{
	return step_run(c, b, logits, NULL);
}

/* Entry i's sampler as settings for kvq_gpu_sample(), and its draw. */
static void dev_params(struct kvq_sampler *smp,
		       struct kvq_gpu_sample_params *sp, float *u)
{
	if (!smp || kvq_sampler_greedy(smp)) {
		sp->temperature = 0.0f;
		sp->top_k = 1;
		sp->top_p = 1.0f;
		sp->min_p = 0.0f;
		*u = 0.0f;
		return;
	}
	sp->temperature = smp->p.temperature;
	sp->top_k = smp->p.top_k;
	sp->top_p = smp->p.top_p;
	sp->min_p = smp->p.min_p;
	*u = (float)kvq_sampler_next_u(smp);
}

/*
 * Where a GPU step's tokens are chosen.  The device sampler gives a row
 * one block; the host pays for the logits' copy and a pass over the
 * vocabulary, which is cheap with a small top-k and dear without one.
 * H200, 1B F16, q4/q4, 1K context, tokens/s with sampling on the host /
 * on the device: top-k 40 (kvq_sampler_params_default()) batch 1 1039 /
 * 982, batch 4 1822 / 1950, batch 16 4718 / 6159; the whole vocabulary at
 * T 0.8 (the HTTP API's defaults), one request through kvqd: 580 / 985.
 * One row of 32000 logits alone (bench/gpu_sample): greedy 49 us on the
 * host, 9 us on the device; top-k 40 26-41 us against 55-68 us.  So the
 * host keeps only steps of fewer than DEV_SAMPLE_MIN_ROWS rows whose
 * rows all draw from at most HOST_SAMPLE_TOP_K candidates.
 */
#define DEV_SAMPLE_MIN_ROWS 4
#define HOST_SAMPLE_TOP_K 64

static bool sample_on_device(const struct kvq_ctx *c,
			     const struct kvq_batch *b,
			     struct kvq_sampler *const *smp)
{
	int i;

	if (!c->gpu)
		return false;
	if (b->n >= DEV_SAMPLE_MIN_ROWS)
		return true;
	for (i = 0; i < b->n; i++)
		if (smp[i] && (kvq_sampler_greedy(smp[i]) ||
			       !(smp[i]->p.top_k > 0 &&
				 smp[i]->p.top_k <= HOST_SAMPLE_TOP_K)))
			return true;
	return false;
}

int kvq_step_sample(struct kvq_ctx *c, const struct kvq_batch *b,
		    struct kvq_sampler *const *smp, int32_t *ids,
		    float *logits)
{
	uint32_t V = c->m->hp.n_vocab;
	struct dev_sample ds;
	int i, ret;

	if (b->all_logits || b->n <= 0 || (uint32_t)b->n > c->max_batch)
		return -EINVAL;
	if (!sample_on_device(c, b, smp)) {
		size_t lr;

		/* The GPU's pinned rows take the logits without a copy. */
		if (!logits) {
			logits = kvq_ctx_logits_buffer(c, &lr);
			if (lr < (size_t)b->n)
				logits = NULL;
		}
		if (!logits) {
			if (!c->slogits)
				c->slogits = malloc((size_t)c->max_batch * V *
						    sizeof(float));
			if (!c->slogits)
				return -ENOMEM;
			logits = c->slogits;
		}
		ret = kvq_step(c, b, logits);
		if (ret)
			return ret;
		for (i = 0; i < b->n; i++)
			ids[i] = smp[i] ? kvq_sampler_sample(smp[i],
					logits + (size_t)i * V, NULL) : -1;
		return 0;
	}
	/* The draws are taken before the step and given back if it fails,
	 * so that a retried step draws the same numbers. */
	for (i = 0; i < b->n; i++) {
		if (smp[i])
			memcpy(c->grng[i], smp[i]->rng, sizeof(c->grng[i]));
		dev_params(smp[i], &c->gsp[i], &c->gu[i]);
	}
	ds.sp = c->gsp;
	ds.u = c->gu;
	ds.ids = ids;
	ret = step_run(c, b, logits, &ds);
	for (i = 0; i < b->n; i++) {
		if (ret && smp[i])
			memcpy(smp[i]->rng, c->grng[i], sizeof(c->grng[i]));
		else if (!smp[i])
			ids[i] = -1;
	}
	return ret;
}

void kvq_ctx_opts_default(struct kvq_ctx_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->kv_type_k = KVQ_KV_Q8;
	o->kv_type_v = KVQ_KV_Q4;
	o->kv_page_tokens = 16;
	o->kv_sink_tokens = 4;
}
