/*
 * kvsmooth.c - key/value shaping folded into the weights (see
 * kvsmooth.h): the public API, measuring the model on the calibration
 * prompts, centring the keys and folding the chosen transforms into the
 * weights.  Choosing them, each head's search, is kvsmooth_search.c's
 * (kvsmooth_impl.h holds what the two share).
 *
 * This file reaches into the loaded model (model_impl.h) for two things
 * the public API does not give: every layer's rotated queries and keys and
 * its values during a prefill (run_prompt() runs the layer loop of
 * kvq_step() over the same backend ops, with an f32 cache of its own), and
 * the weight handles it rewrites (fold()).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/kvcache.h"
#include "engine/kvcalib.h"
#include "engine/kvsmooth.h"
#include "engine/kvsmooth_impl.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/model_impl.h"
#include "engine/quant.h"
#include "engine/quant_impl.h"
#include "engine/tokenizer.h"

#define MAX_PROMPTS 16
/* Each calibration text (kvcalib.h) is cut at TEXT_TOKENS. */
#define TEXT_TOKENS 512
/*
 * auto shapes heads under AUTO_HEAD_DIM channels (the scale group is then
 * the whole head, smaller than the format's 32) when the predicted error
 * falls by min_gain; on shapes any head when it falls by ON_MIN_GAIN (a
 * smaller fall is noise).  Measured: stories260K (head_dim 8) q8/q8 KL
 * -30%, dPPL 0.29% -> 0.04%; the bundled model (head_dim 32) q8/q8 KL
 * -10%, q4/q4 -12%, q8/q4 +1.5%, dPPL unchanged: not worth a slower load.
 */
#define AUTO_HEAD_DIM 32
#define ON_MIN_GAIN 0.02
/* kvq_kv_key_moments() leaves out the first positions (the f16 sinks), as
 * the smoothing search does by default. */
#define KEY_MOMENTS_SKIP 4

static const char *const mode_names[] = {
	[KVQ_KV_SMOOTH_OFF] = "off",
	[KVQ_KV_SMOOTH_ON] = "on",
	[KVQ_KV_SMOOTH_AUTO] = "auto",
};

const char *kvq_kv_smooth_mode_name(int mode)
{
	if (mode < 0 || mode > KVQ_KV_SMOOTH_AUTO)
		return "?";
	return mode_names[mode];
}

int kvq_kv_smooth_mode_parse(const char *s, enum kvq_kv_smooth_mode *out)
{
	int i;

	for (i = 0; i <= KVQ_KV_SMOOTH_AUTO; i++) {
		if (!strcmp(s, mode_names[i])) {
			*out = (enum kvq_kv_smooth_mode)i;
			return 0;
		}
	}
	return -EINVAL;
}

void kvq_kv_smooth_opts_default(struct kvq_kv_smooth_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->mode = KVQ_KV_SMOOTH_AUTO;
	o->center = true;
	memset(o->type_k, KVQ_KV_Q8, sizeof(o->type_k));
	memset(o->type_v, KVQ_KV_Q4, sizeof(o->type_v));
	o->rotate = true;
	o->n_skip = 4;
	o->min_gain = 0.2;
}

/* ------------------------------------------------------- last report */

static pthread_mutex_t last_lock = PTHREAD_MUTEX_INITIALIZER;
static const struct kvq_model *last_model;
static struct kvq_kv_smooth_report last_rep;
static bool last_set;

bool kvq_kv_smooth_last(const struct kvq_model *m,
			struct kvq_kv_smooth_report *out)
{
	bool ok;

	pthread_mutex_lock(&last_lock);
	ok = last_set && (!m || m == last_model);
	if (ok)
		*out = last_rep;
	pthread_mutex_unlock(&last_lock);
	return ok;
}

static void set_last(const struct kvq_model *m,
		     const struct kvq_kv_smooth_report *r)
{
	pthread_mutex_lock(&last_lock);
	last_model = m;
	last_rep = *r;
	last_set = true;
	pthread_mutex_unlock(&last_lock);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* -------------------------------------------------------- measuring */

static void acts_free(struct acts *a)
{
	free(a->k);
	free(a->v);
	free(a->pos);
	free(a->wk);
	free(a->wv);
}

/* Adds the diagonal (and with @pairs the pair blocks) of x x^T of one
 * head row to @w. */
static void add_outer(const struct acts *a, double *w, const float *x,
		      bool pairs)
{
	uint32_t c, c2, hd = a->hd;

	for (c = 0; c < hd; c++) {
		w[c] += (double)x[c] * x[c];
		c2 = pairs ? rope_partner(a->hp, c) : c;
		if (c2 != c)
			w[hd + c] += (double)x[c] * x[c2];
	}
}

struct scratch {
	float *x, *xb, *q, *k, *v, *att, *hb, *hb2;
	uint32_t *pos;
};

static void scratch_free(struct scratch *s)
{
	free(s->x);
	free(s->xb);
	free(s->q);
	free(s->k);
	free(s->v);
	free(s->att);
	free(s->hb);
	free(s->hb2);
	free(s->pos);
}

static int scratch_alloc(struct scratch *s, const struct kvq_hparams *hp,
			 uint32_t n)
{
	size_t qd = (size_t)hp->n_heads * hp->head_dim;
	size_t kvd = (size_t)hp->n_kv_heads * hp->head_dim;

	memset(s, 0, sizeof(*s));
	s->x = malloc(n * hp->dim * sizeof(float));
	s->xb = malloc(n * (hp->dim > qd ? hp->dim : qd) * sizeof(float));
	s->q = malloc(n * qd * sizeof(float));
	s->k = malloc(n * kvd * sizeof(float));
	s->v = malloc(n * kvd * sizeof(float));
	s->att = malloc(n * qd * sizeof(float));
	s->hb = malloc(n * (size_t)hp->ffn_dim * sizeof(float));
	s->hb2 = malloc(n * (size_t)hp->ffn_dim * sizeof(float));
	s->pos = malloc(n * sizeof(*s->pos));
	if (!s->x || !s->xb || !s->q || !s->k || !s->v || !s->att ||
	    !s->hb || !s->hb2 || !s->pos) {
		scratch_free(s);
		return -ENOMEM;
	}
	return 0;
}

/* Records tokens [n_skip, n) of layer @l, just run, into @a. */
static void record(struct acts *a, uint32_t l, const struct scratch *s,
		   uint32_t n, uint32_t n_skip)
{
	const struct kvq_hparams *hp = a->hp;
	uint32_t G = hp->n_heads / hp->n_kv_heads, hd = a->hd, t, qh;

	for (t = n_skip; t < n; t++) {
		size_t row = (size_t)l * a->cap + a->n_tok + t - n_skip;
		const float *q = s->q + (size_t)t * hp->n_heads * hd;

		a->pos[a->n_tok + t - n_skip] = t;
		memcpy(a->k + row * a->kvd, s->k + (size_t)t * a->kvd,
		       a->kvd * sizeof(float));
		memcpy(a->v + row * a->kvd, s->v + (size_t)t * a->kvd,
		       a->kvd * sizeof(float));
		for (qh = 0; qh < hp->n_heads; qh++)
			add_outer(a, head_w(a, a->wk, l, qh / G), q + qh * hd,
				  true);
	}
}

/*
 * One prompt through @m with an f32 cache of its own: the layer loop of
 * kvq_step() (forward.c) for one sequence, recording every layer after
 * its attention op, when q and k are rotated and v is as stored.
 */
static int run_prompt(struct kvq_model *m, const int32_t *ids, uint32_t n,
		      uint32_t n_skip, struct acts *a)
{
	const struct kvq_hparams *hp = &m->hp;
	struct kvq_backend *be = &m->be;
	const struct kvq_backend_ops *op = be->ops;
	uint32_t qd = hp->n_heads * hp->head_dim, kvd = a->kvd, l, t;
	struct kvq_rope rope = { hp->rope_dim, hp->rope_base, hp->rope_neox };
	struct kvq_kv_opts ko = { 0 };
	struct kvq_kvcache *kv = NULL;
	struct kvq_attn_seq as = { 0 };
	struct kvq_kv_seq seq;
	struct scratch s;
	int ret;

	ret = scratch_alloc(&s, hp, n);
	if (ret)
		return ret;
	ko.n_layers = hp->n_layers;
	ko.n_kv_heads = hp->n_kv_heads;
	ko.head_dim = hp->head_dim;
	ko.page_tokens = 16;
	ko.n_pages = (n + 15) / 16 + 1;	/* types zeroed: f32 */
	ret = kvq_kv_create(&ko, &kv);
	if (ret)
		goto out;
	kvq_kv_seq_init(&seq);
	ret = kvq_kv_seq_reserve(kv, &seq, n);
	if (ret)
		goto out_kv;
	as.kv = &seq;
	as.n_new = n;
	for (t = 0; t < n; t++)
		s.pos[t] = t;
	ret = op->embed(be, m->tok_embd, ids, n, s.x);
	if (ret)
		goto out_seq;
	for (l = 0; l < hp->n_layers; l++) {
		struct kvq_layer *L = &m->layers[l];

		op->rmsnorm(be, s.x, L->attn_norm, s.xb, n, hp->dim,
			    hp->rms_eps);
		op->matmul(be, L->wq, s.xb, s.q, n);
		op->matmul(be, L->wk, s.xb, s.k, n);
		op->matmul(be, L->wv, s.xb, s.v, n);
		if (L->bq) {
			op->add_bias(be, s.q, L->bq, n, qd);
			op->add_bias(be, s.k, L->bk, n, kvd);
			op->add_bias(be, s.v, L->bv, n, kvd);
		}
		op->rope(be, s.q, s.pos, n, hp->n_heads, hp->head_dim,
			 hp->rope_dim, hp->rope_base, hp->rope_neox);
		op->attention(be, kv, l, &as, 1, s.q, s.k, s.v, s.att,
			      hp->n_heads, &rope);
		record(a, l, &s, n, n_skip);
		op->matmul(be, L->wo, s.att, s.xb, n);
		op->add(be, s.x, s.xb, (size_t)n * hp->dim);
		op->rmsnorm(be, s.x, L->ffn_norm, s.xb, n, hp->dim,
			    hp->rms_eps);
		op->matmul(be, L->w_gate, s.xb, s.hb, n);
		op->matmul(be, L->w_up, s.xb, s.hb2, n);
		op->swiglu(be, s.hb, s.hb2, (size_t)n * hp->ffn_dim);
		op->matmul(be, L->w_down, s.hb, s.xb, n);
		op->add(be, s.x, s.xb, (size_t)n * hp->dim);
	}
	a->n_tok += n - n_skip;
out_seq:
	kvq_kv_seq_release(kv, &seq);
out_kv:
	kvq_kv_destroy(kv);
out:
	scratch_free(&s);
	return ret;
}

/* W of the values: sum over Wo's rows of the group's column slices. */
static int value_weights(struct kvq_model *m, struct acts *a)
{
	const struct kvq_hparams *hp = &m->hp;
	uint32_t G = hp->n_heads / hp->n_kv_heads, hd = a->hd, l, r, qh;
	uint32_t qd = hp->n_heads * hd;
	float *row = malloc(qd * sizeof(float));

	if (!row)
		return -ENOMEM;
	for (l = 0; l < a->nl; l++) {
		struct kvq_weight *wo = m->layers[l].wo;
		size_t rb = wo->nbytes / wo->rows;

		for (r = 0; r < wo->rows; r++) {
			if (kvq_dequant_row(wo->type,
					    (const uint8_t *)wo->host + r * rb,
					    row, qd)) {
				free(row);
				return -EINVAL;
			}
			for (qh = 0; qh < hp->n_heads; qh++)
				add_outer(a, head_w(a, a->wv, l, qh / G),
					  row + qh * hd, false);
		}
	}
	free(row);
	return 0;
}

/* Tokenizes the calibration prompts and runs them; fills @a. */
static int measure(struct kvq_model *m, uint32_t n_skip, struct acts *a)
{
	const struct kvq_hparams *hp = &m->hp;
	struct kvq_tokenizer *tok = m->tok;
	int32_t bos = kvq_tokenizer_bos(tok);
	int32_t *ids[MAX_PROMPTS] = { 0 };
	uint32_t nid[MAX_PROMPTS] = { 0 }, total = 0, i;
	const char *pr[MAX_PROMPTS];
	const char *const *src;
	size_t np, nt, n_short;
	int ret = -ENOMEM;

	/* The prompts, then the texts: keys at the positions of a whole
	 * context, where RoPE's slow pairs have turned as they do in use. */
	src = kvq_kv_calib_prompts(&np);
	np = np < MAX_PROMPTS ? np : MAX_PROMPTS;
	memcpy(pr, src, np * sizeof(*pr));
	n_short = np;
	src = kvq_kv_calib_texts(&nt);
	for (i = 0; i < nt && np < MAX_PROMPTS; i++)
		pr[np++] = src[i];
	memset(a, 0, sizeof(*a));
	a->hp = hp;
	a->nl = hp->n_layers;
	a->nkv = hp->n_kv_heads;
	a->hd = hp->head_dim;
	a->kvd = a->nkv * a->hd;
	a->wsz = 2 * (size_t)a->hd;
	for (i = 0; i < np; i++) {
		size_t len = strlen(pr[i]);
		int k, n = 0;

		ids[i] = malloc((len + 2) * sizeof(int32_t));
		if (!ids[i])
			goto out;
		if (bos >= 0)
			ids[i][n++] = bos;
		k = kvq_tokenize(tok, pr[i], len, ids[i] + n, (int)len + 2 - n);
		if (k < 0 || k > (int)len + 2 - n)
			k = 0;
		n += k;
		if ((uint32_t)n > hp->ctx_len)
			n = (int)hp->ctx_len;
		if (i >= n_short && n > TEXT_TOKENS)
			n = TEXT_TOKENS;
		nid[i] = (uint32_t)n;
		if (nid[i] > n_skip)
			total += nid[i] - n_skip;
	}
	if (!total) {
		ret = -EINVAL;
		goto out;
	}
	a->cap = total;
	a->k = malloc((size_t)a->nl * total * a->kvd * sizeof(float));
	a->v = malloc((size_t)a->nl * total * a->kvd * sizeof(float));
	a->pos = malloc(total * sizeof(uint32_t));
	a->wk = calloc((size_t)a->nl * a->nkv * a->wsz, sizeof(double));
	a->wv = calloc((size_t)a->nl * a->nkv * a->wsz, sizeof(double));
	if (!a->k || !a->v || !a->pos || !a->wk || !a->wv)
		goto out;
	for (i = 0; i < np; i++) {
		if (nid[i] <= n_skip)
			continue;
		ret = run_prompt(m, ids[i], nid[i], n_skip, a);
		if (ret)
			goto out;
	}
	ret = value_weights(m, a);
out:
	for (i = 0; i < np; i++)
		free(ids[i]);
	if (ret) {
		acts_free(a);
		memset(a, 0, sizeof(*a));
	}
	return ret;
}

/* ---------------------------------------------------------- centring */

/*
 * Rotates each RoPE pair of one head row @x by position @p's angle (@inv:
 * by minus it), in place, with the cos/sin of the cache
 * (kvq_kv_rope_cs()).
 */
static void rope_row(const struct kvq_hparams *hp, float *x, uint32_t p,
		     bool inv)
{
	uint32_t i, a, b;
	float cs, sn;

	for (i = 0; i < hp->rope_dim / 2; i++) {
		float xa, xb;

		a = hp->rope_neox ? i : 2 * i;
		b = rope_partner(hp, a);
		kvq_kv_rope_cs(p, i, hp->rope_dim, hp->rope_base, &cs, &sn);
		if (inv)
			sn = -sn;
		xa = x[a];
		xb = x[b];
		x[a] = xa * cs - xb * sn;
		x[b] = xa * sn + xb * cs;
	}
}

/* @ctr [layer][kvd] = the mean pre-RoPE key of every head over @a's
 * tokens: the centre kvcache.h describes. */
static void key_centres(const struct acts *a, float *ctr)
{
	uint32_t l, t, h, c;
	double *sum = calloc(a->kvd, sizeof(double));
	float row[KVQ_KV_MAX_HEAD_DIM];

	if (!sum) {
		memset(ctr, 0, (size_t)a->nl * a->kvd * sizeof(float));
		return;
	}
	for (l = 0; l < a->nl; l++) {
		memset(sum, 0, a->kvd * sizeof(double));
		for (t = 0; t < a->n_tok; t++) {
			const float *k = a->k + ((size_t)l * a->cap + t) *
					 a->kvd;

			for (h = 0; h < a->nkv; h++) {
				memcpy(row, k + h * a->hd,
				       a->hd * sizeof(float));
				rope_row(a->hp, row, a->pos[t], true);
				for (c = 0; c < a->hd; c++)
					sum[h * a->hd + c] += row[c];
			}
		}
		for (c = 0; c < a->kvd; c++)
			ctr[(size_t)l * a->kvd + c] =
				a->n_tok ? (float)(sum[c] / a->n_tok) : 0.0f;
	}
	free(sum);
}

/* @a's keys as the cache stores them with centres @ctr: k - R_p c. */
static void centre_keys(struct acts *a, const float *ctr)
{
	uint32_t l, t, h, c;
	float row[KVQ_KV_MAX_HEAD_DIM];

	for (l = 0; l < a->nl; l++)
		for (t = 0; t < a->n_tok; t++) {
			float *k = a->k + ((size_t)l * a->cap + t) * a->kvd;

			for (h = 0; h < a->nkv; h++) {
				memcpy(row, ctr + (size_t)l * a->kvd +
				       h * a->hd, a->hd * sizeof(float));
				rope_row(a->hp, row, a->pos[t], false);
				for (c = 0; c < a->hd; c++)
					k[h * a->hd + c] -= row[c];
			}
		}
}

/* ----------------------------------------------------------- folding */

static uint16_t f16_scale(uint16_t h, int e, uint32_t *inexact)
{
	float g = ldexpf(kvq_f16_to_f32(h), e);
	uint16_t r = kvq_f32_to_f16(g);

	if (kvq_f16_to_f32(r) != g)
		(*inexact)++;
	return r;
}

static uint16_t bf16_scale(uint16_t h, int e, uint32_t *inexact)
{
	float g = ldexpf(kvq_bf16_to_f32(h), e);
	uint16_t r = kvq_f32_to_bf16(g);

	if (kvq_bf16_to_f32(r) != g)
		(*inexact)++;
	return r;
}

/* Multiplies @n elements of @type at @p (whole blocks) by 2^e. */
static void scale_elems(uint32_t type, void *p, uint32_t n, int e,
			uint32_t *inexact)
{
	uint32_t i;

	switch (type) {
	case KVQ_TYPE_F32: {
		float *f = p;

		for (i = 0; i < n; i++) {
			float g = ldexpf(f[i], e);

			if (f[i] != 0 && (!isnormal(g) ||
					  ldexpf(g, -e) != f[i]))
				(*inexact)++;
			f[i] = g;
		}
		break;
	}
	case KVQ_TYPE_F16:
		for (i = 0; i < n; i++)
			((uint16_t *)p)[i] = f16_scale(((uint16_t *)p)[i], e,
						       inexact);
		break;
	case KVQ_TYPE_BF16:
		for (i = 0; i < n; i++)
			((uint16_t *)p)[i] = bf16_scale(((uint16_t *)p)[i], e,
							inexact);
		break;
	case KVQ_TYPE_Q8_0: {
		struct kvq_block_q8_0 *b = p;

		for (i = 0; i < n / KVQ_QK8_0; i++)
			b[i].d = f16_scale(b[i].d, e, inexact);
		break;
	}
	case KVQ_TYPE_Q4_0: {
		struct kvq_block_q4_0 *b = p;

		for (i = 0; i < n / KVQ_QK4_0; i++)
			b[i].d = f16_scale(b[i].d, e, inexact);
		break;
	}
	case KVQ_TYPE_Q4_K: {
		struct kvq_block_q4_k *b = p;

		for (i = 0; i < n / KVQ_QK_K; i++) {
			b[i].d = f16_scale(b[i].d, e, inexact);
			b[i].dmin = f16_scale(b[i].dmin, e, inexact);
		}
		break;
	}
	case KVQ_TYPE_Q6_K: {
		struct kvq_block_q6_k *b = p;

		for (i = 0; i < n / KVQ_QK_K; i++)
			b[i].d = f16_scale(b[i].d, e, inexact);
		break;
	}
	default:
		break;
	}
}

static bool is_float_type(uint32_t type)
{
	return type == KVQ_TYPE_F32 || type == KVQ_TYPE_F16 ||
	       type == KVQ_TYPE_BF16;
}

static bool row_scalable(uint32_t type)
{
	return is_float_type(type) || type == KVQ_TYPE_Q8_0 ||
	       type == KVQ_TYPE_Q4_0 || type == KVQ_TYPE_Q4_K ||
	       type == KVQ_TYPE_Q6_K;
}

/* Writes @n floats into a row of float type @type (rounding once). */
static void put_row(uint32_t type, void *p, const float *x, uint32_t n)
{
	uint32_t i;

	if (type == KVQ_TYPE_F32) {
		memcpy(p, x, n * sizeof(float));
		return;
	}
	for (i = 0; i < n; i++)
		((uint16_t *)p)[i] = type == KVQ_TYPE_F16 ?
				     kvq_f32_to_f16(x[i]) :
				     kvq_f32_to_bf16(x[i]);
}

/* A weight and the owned copy that replaces its bytes. */
struct copy {
	struct kvq_weight *w;
	uint8_t *buf;
};

/* Owned copies of the attention matrices that change, all or nothing. */
struct fold {
	struct kvq_model *m;
	struct copy *cp;
	uint32_t n;
	float *ra, *rb;		/* two rows of the widest matrix */
	uint32_t inexact;
};

static uint8_t *copy_of(struct fold *f, struct kvq_weight *w)
{
	uint8_t *buf = malloc(w->nbytes);

	if (!buf)
		return NULL;
	memcpy(buf, w->host, w->nbytes);
	f->cp[f->n].w = w;
	f->cp[f->n].buf = buf;
	f->n++;
	return buf;
}

/*
 * Rotates rows @r and @rp of @w's copy @buf (and of @bias) by phase @ph,
 * then scales both by 2^x: the fold of one key pair into one head's rows.
 */
static void pair_rows(struct fold *f, struct kvq_weight *w, uint8_t *buf,
		      float *bias, uint32_t r, uint32_t rp, int ph, int x)
{
	size_t rb = w->nbytes / w->rows;
	uint32_t i;

	if (ph && r != rp) {
		double cs, sn;

		kvq_kv_smooth_phase(ph, &cs, &sn);

		kvq_dequant_row(w->type, buf + r * rb, f->ra, w->cols);
		kvq_dequant_row(w->type, buf + rp * rb, f->rb, w->cols);
		for (i = 0; i < w->cols; i++) {
			double a = f->ra[i], b = f->rb[i];

			f->ra[i] = (float)(cs * a - sn * b);
			f->rb[i] = (float)(sn * a + cs * b);
		}
		put_row(w->type, buf + r * rb, f->ra, w->cols);
		put_row(w->type, buf + rp * rb, f->rb, w->cols);
		if (bias) {
			double a = bias[r], b = bias[rp];

			bias[r] = (float)(cs * a - sn * b);
			bias[rp] = (float)(sn * a + cs * b);
		}
	}
	if (!x)
		return;
	scale_elems(w->type, buf + r * rb, w->cols, x, &f->inexact);
	if (bias)
		bias[r] = ldexpf(bias[r], x);
	if (rp != r) {
		scale_elems(w->type, buf + rp * rb, w->cols, x, &f->inexact);
		if (bias)
			bias[rp] = ldexpf(bias[rp], x);
	}
}

static bool shape_is_identity(const struct shape *s, uint32_t hd)
{
	uint32_t c;

	for (c = 0; c < hd; c++)
		if (s->e[c] || s->ph[c])
			return false;
	return true;
}

static bool layer_changes(const struct shape *s, uint32_t nkv, uint32_t hd)
{
	uint32_t h;

	for (h = 0; h < nkv; h++)
		if (!shape_is_identity(&s[h], hd))
			return true;
	return false;
}

/* Keys of layer @l into Wq, Wk (and their biases). */
static void fold_keys(struct fold *f, struct kvq_layer *L, uint8_t *bq,
		      uint8_t *bk, const struct shape *sk,
		      const struct kvq_hparams *hp)
{
	uint32_t hd = hp->head_dim, G = hp->n_heads / hp->n_kv_heads;
	uint32_t qh, c;

	for (qh = 0; qh < hp->n_heads; qh++) {
		const struct shape *s = &sk[qh / G];

		for (c = 0; c < hd; c++) {
			uint32_t p = rope_partner(hp, c);

			if (p < c)
				continue;
			pair_rows(f, L->wq, bq, L->bq, qh * hd + c,
				  qh * hd + p, s->ph[c], s->e[c]);
			if (qh % G == 0)
				pair_rows(f, L->wk, bk, L->bk,
					  qh / G * hd + c, qh / G * hd + p,
					  s->ph[c], -s->e[c]);
		}
	}
}

/* Centres @ctr ([layer][kvd]) moved the way fold_keys() moves the keys. */
static void shape_centres(const struct kvq_hparams *hp, const struct shape *sk,
			  float *ctr)
{
	uint32_t hd = hp->head_dim, l, h, c;

	for (l = 0; l < hp->n_layers; l++)
		for (h = 0; h < hp->n_kv_heads; h++) {
			const struct shape *s = &sk[l * hp->n_kv_heads + h];
			float *x = ctr + ((size_t)l * hp->n_kv_heads + h) * hd;

			for (c = 0; c < hd; c++) {
				uint32_t p = rope_partner(hp, c);
				double a = x[c], b = x[p];

				if (p < c)
					continue;
				if (p != c && s->ph[c]) {
					double cs, sn;

					kvq_kv_smooth_phase(s->ph[c], &cs, &sn);
					x[c] = (float)(cs * a - sn * b);
					x[p] = (float)(sn * a + cs * b);
				}
				x[c] = ldexpf(x[c], -s->e[c]);
				if (p != c)
					x[p] = ldexpf(x[p], -s->e[c]);
			}
		}
}

/* Values of layer @l into Wv (and bv) and Wo's columns. */
static void fold_values(struct fold *f, struct kvq_layer *L, uint8_t *bv,
			uint8_t *bo, const struct shape *sv,
			const struct kvq_hparams *hp)
{
	uint32_t hd = hp->head_dim, G = hp->n_heads / hp->n_kv_heads;
	size_t rb = L->wo->nbytes / L->wo->rows;
	size_t es = L->wo->type == KVQ_TYPE_F32 ? 4 : 2;
	uint32_t h, c, r, qh;

	for (h = 0; h < hp->n_kv_heads; h++)
		for (c = 0; c < hd; c++)
			pair_rows(f, L->wv, bv, L->bv, h * hd + c, h * hd + c,
				  0, -sv[h].e[c]);
	for (r = 0; r < L->wo->rows; r++)
		for (qh = 0; qh < hp->n_heads; qh++)
			for (c = 0; c < hd; c++)
				if (sv[qh / G].e[c])
					scale_elems(L->wo->type,
						    bo + r * rb +
						    (qh * hd + c) * es,
						    1, sv[qh / G].e[c],
						    &f->inexact);
}

/*
 * Folds the shapes into @m: copies of every matrix that changes are made
 * first; only when all exist are they transformed, biases included, and
 * the handles switched over.  Returns 0 or -ENOMEM (nothing changed).
 */
static int fold(struct kvq_model *m, const struct shape *sk,
		const struct shape *sv, uint32_t *inexact, uint64_t *bytes)
{
	const struct kvq_hparams *hp = &m->hp;
	uint32_t nl = hp->n_layers, nkv = hp->n_kv_heads, hd = hp->head_dim;
	uint32_t l, i, width = hp->dim > hp->n_heads * hd ? hp->dim :
			       hp->n_heads * hd;
	struct fold f = { .m = m };
	uint8_t *bufs[4];
	float **owned;
	int ret = -ENOMEM;

	f.cp = calloc(4 * (size_t)nl, sizeof(*f.cp));
	f.ra = malloc(width * sizeof(float));
	f.rb = malloc(width * sizeof(float));
	if (!f.cp || !f.ra || !f.rb)
		goto out;
	for (l = 0; l < nl; l++) {
		struct kvq_layer *L = &m->layers[l];

		if (sk && layer_changes(sk + l * nkv, nkv, hd) &&
		    (!copy_of(&f, L->wq) || !copy_of(&f, L->wk)))
			goto out;
		if (sv && layer_changes(sv + l * nkv, nkv, hd) &&
		    (!copy_of(&f, L->wv) || !copy_of(&f, L->wo)))
			goto out;
	}
	owned = realloc(m->owned, (m->n_owned + f.n) * sizeof(*owned));
	if (!owned)
		goto out;
	m->owned = owned;
	/* From here on nothing fails. */
	for (i = 0, l = 0; l < nl; l++) {
		struct kvq_layer *L = &m->layers[l];

		if (sk && layer_changes(sk + l * nkv, nkv, hd)) {
			bufs[0] = f.cp[i++].buf;
			bufs[1] = f.cp[i++].buf;
			fold_keys(&f, L, bufs[0], bufs[1], sk + l * nkv, hp);
		}
		if (sv && layer_changes(sv + l * nkv, nkv, hd)) {
			bufs[2] = f.cp[i++].buf;
			bufs[3] = f.cp[i++].buf;
			fold_values(&f, L, bufs[2], bufs[3], sv + l * nkv, hp);
		}
	}
	for (i = 0; i < f.n; i++) {
		f.cp[i].w->host = f.cp[i].buf;
		m->owned[m->n_owned++] = (float *)f.cp[i].buf;
		*bytes += f.cp[i].w->nbytes;
	}
	f.n = 0;
	*inexact = f.inexact;
	ret = 0;
out:
	for (i = 0; i < f.n; i++)
		free(f.cp[i].buf);
	free(f.cp);
	free(f.ra);
	free(f.rb);
	return ret;
}

/* ------------------------------------------------------------- apply */

/* true when some attention matrix of @m is already an owned copy. */
static bool already_folded(const struct kvq_model *m)
{
	uint32_t l, i, j;

	if (m->kv_center)
		return true;
	for (l = 0; l < m->hp.n_layers; l++) {
		const struct kvq_layer *L = &m->layers[l];
		const void *w[] = { L->wq->host, L->wk->host, L->wv->host,
				    L->wo->host };

		for (i = 0; i < 4; i++)
			for (j = 0; j < m->n_owned; j++)
				if (w[i] == (const void *)m->owned[j])
					return true;
	}
	return false;
}

/*
 * Per layer: may key pairs rotate, may values be shaped, may keys be
 * shaped at all.  Writes what is refused, and why, into @why.
 */
static void weight_types(const struct kvq_model *m, bool rotate,
			 bool *rot_ok, bool *v_ok, uint8_t *type_k,
			 char *why, size_t len)
{
	const char *rot_name = NULL, *v_name = NULL, *k_name = NULL;
	uint32_t rot_type = 0, v_type = 0, k_type = 0, l;

	*why = '\0';
	for (l = 0; l < m->hp.n_layers; l++) {
		const struct kvq_layer *L = &m->layers[l];

		rot_ok[l] = rotate && is_float_type(L->wq->type) &&
			    is_float_type(L->wk->type);
		if (rotate && !rot_ok[l] && !rot_name) {
			rot_name = is_float_type(L->wq->type) ? L->wk->name :
				   L->wq->name;
			rot_type = is_float_type(L->wq->type) ? L->wk->type :
				   L->wq->type;
		}
		v_ok[l] = row_scalable(L->wv->type) &&
			  is_float_type(L->wo->type);
		if (!v_ok[l] && !v_name) {
			v_name = L->wo->name;
			v_type = L->wo->type;
		}
		if (!row_scalable(L->wq->type) || !row_scalable(L->wk->type)) {
			type_k[l] = KVQ_KV_F16;	/* left alone */
			if (!k_name) {
				k_name = L->wk->name;
				k_type = L->wk->type;
			}
		}
	}
	if (k_name)
		snprintf(why + strlen(why), len - strlen(why),
			 "keys refused where a matrix cannot be scaled (%s is %s); ",
			 k_name, kvq_type_name(k_type));
	if (rot_name)
		snprintf(why + strlen(why), len - strlen(why),
			 "key pairs scaled, not rotated, where Wq/Wk are quantized (%s is %s); ",
			 rot_name, kvq_type_name(rot_type));
	if (v_name)
		snprintf(why + strlen(why), len - strlen(why),
			 "values refused where Wo is quantized (%s is %s: its columns would need requantizing); ",
			 v_name, kvq_type_name(v_type));
}

static bool any_quantized(const uint8_t *t, uint32_t n)
{
	uint32_t l;

	for (l = 0; l < n; l++)
		if (t[l] == KVQ_KV_Q8 || t[l] == KVQ_KV_Q4)
			return true;
	return false;
}

/*
 * Searches the keys again centred (kvcache.h) and keeps whichever of the
 * two plans predicts the smaller key error: @pl's key shapes and
 * @r->k_err_after become the centred search's when it wins, with
 * @r->centred set and the centres (before folding) in *@ctr.  @a's keys
 * are left centred.  Returns 0 or -ENOMEM.
 */
static int try_centres(struct kvq_model *m, struct plan *pl, struct acts *a,
		       float **ctr, struct kvq_kv_smooth_report *r)
{
	static const uint8_t none[KVQ_KV_MAX_LAYERS];	/* values: skip */
	struct plan pc = { .type_k = pl->type_k, .type_v = none,
			   .rot_ok = pl->rot_ok, .v_ok = pl->v_ok,
			   .search = true };
	struct shape *t;
	double k_err, v_err;
	int ret;

	*ctr = malloc((size_t)a->nl * a->kvd * sizeof(float));
	if (!*ctr)
		return -ENOMEM;
	key_centres(a, *ctr);
	centre_keys(a, *ctr);
	ret = kvq_kv_smooth_plan_run(m->pool, &pc, a);
	if (!ret) {
		/* Errors relative to the keys themselves, not to what
		 * is left of them once centred. */
		kvq_kv_smooth_plan_errors(&pc, pl, true, &k_err, &v_err);
		r->k_err_centred = k_err;
		if (k_err < r->k_err_after) {
			t = pl->sk;
			pl->sk = pc.sk;
			pc.sk = t;
			r->k_err_after = k_err;
			r->centred = true;
		}
	}
	kvq_kv_smooth_plan_free(&pc);
	return ret;
}

int kvq_kv_smooth_error(struct kvq_model *m, enum kvq_kv_type type_k,
			enum kvq_kv_type type_v, double *k_err, double *v_err)
{
	uint8_t tk[KVQ_KV_MAX_LAYERS], tv[KVQ_KV_MAX_LAYERS];
	bool rot[KVQ_KV_MAX_LAYERS], vok[KVQ_KV_MAX_LAYERS];
	struct plan pl = { .type_k = tk, .type_v = tv, .rot_ok = rot,
			   .v_ok = vok };
	struct acts a;
	uint32_t nl;
	int ret;

	if (!m->layers || m->hp.n_layers > KVQ_KV_MAX_LAYERS)
		return -EINVAL;
	nl = m->hp.n_layers;
	memset(tk, type_k, nl);
	memset(tv, type_v, nl);
	memset(rot, 0, sizeof(rot));
	memset(vok, 1, sizeof(vok));
	ret = measure(m, 4, &a);
	if (ret)
		return ret;
	ret = kvq_kv_smooth_plan_run(m->pool, &pl, &a);
	if (!ret && m->kv_center) {
		/* The error of the centred keys the cache stores, relative
		 * to the keys (as the search reports it). */
		struct plan pc = pl;

		pc.sk = pc.sv = NULL;
		pc.cost = NULL;
		centre_keys(&a, m->kv_center);
		ret = kvq_kv_smooth_plan_run(m->pool, &pc, &a);
		if (!ret)
			kvq_kv_smooth_plan_errors(&pc, &pl, false, k_err,
						  v_err);
		kvq_kv_smooth_plan_free(&pc);
	} else if (!ret) {
		plan_errors(&pl, false, k_err, v_err);
	}
	kvq_kv_smooth_plan_free(&pl);
	acts_free(&a);
	return ret;
}

int kvq_kv_smooth_apply(struct kvq_model *m, const struct kvq_kv_smooth_opts *o,
			struct kvq_kv_smooth_report *rep)
{
	const struct kvq_hparams *hp = &m->hp;
	struct kvq_kv_smooth_report r = { 0 };
	struct kvq_kv_smooth_opts d;
	uint8_t tk[KVQ_KV_MAX_LAYERS];
	bool rot[KVQ_KV_MAX_LAYERS], vok[KVQ_KV_MAX_LAYERS];
	struct plan pl = { .type_k = tk, .rot_ok = rot, .v_ok = vok,
			   .search = true };
	char refused[384] = "";
	struct acts a = { 0 };
	float *ctr = NULL;
	double t0 = now_s(), gain;
	bool want_k, want_v, has_k, has_v;
	size_t nh, i;
	int ret;

	if (!o) {
		kvq_kv_smooth_opts_default(&d);
		o = &d;
	}
	if (!m->layers || hp->n_layers > KVQ_KV_MAX_LAYERS)
		return -EINVAL;
	if (already_folded(m))
		return -EALREADY;
	r.mode = o->mode;
	memcpy(tk, o->type_k, hp->n_layers);
	pl.type_v = o->type_v;
	has_k = any_quantized(o->type_k, hp->n_layers);
	has_v = any_quantized(o->type_v, hp->n_layers);
	if (o->mode == KVQ_KV_SMOOTH_OFF || (!has_k && !has_v)) {
		snprintf(r.why, sizeof(r.why), "%s",
			 o->mode == KVQ_KV_SMOOTH_OFF ? "kv_smooth = off" :
			 "the KV cache is not quantized");
		goto done;
	}
	if (o->mode == KVQ_KV_SMOOTH_AUTO && hp->head_dim >= AUTO_HEAD_DIM) {
		snprintf(r.why, sizeof(r.why),
			 "head_dim %u: auto shapes heads under %u channels only (kv_smooth = on measures any)",
			 hp->head_dim, AUTO_HEAD_DIM);
		goto done;
	}
	weight_types(m, o->rotate, rot, vok, tk, refused, sizeof(refused));
	if (refused[0])
		kvq_notice("KV smoothing: %s", refused);
	ret = measure(m, o->n_skip, &a);
	if (ret == -EINVAL && o->mode == KVQ_KV_SMOOTH_AUTO) {
		kvq_warn("KV smoothing: the calibration prompts do not run on this model; weights left as they are");
		snprintf(r.why, sizeof(r.why),
			 "the calibration prompts do not run on this model");
		goto done;
	}
	if (ret) {
		kvq_err("KV smoothing: cannot measure the model: %s",
			strerror(-ret));
		return ret;
	}
	r.n_tokens = a.n_tok;
	ret = kvq_kv_smooth_plan_run(m->pool, &pl, &a);
	if (ret)
		goto out;
	plan_errors(&pl, false, &r.k_err_before, &r.v_err_before);
	plan_errors(&pl, true, &r.k_err_after, &r.v_err_after);
	if (has_k && o->center) {
		ret = try_centres(m, &pl, &a, &ctr, &r);
		if (ret)
			goto out;
	}
	gain = o->mode == KVQ_KV_SMOOTH_AUTO ? o->min_gain : ON_MIN_GAIN;
	want_k = r.k_err_before > 0 &&
		 r.k_err_after <= (1 - gain) * r.k_err_before;
	want_v = r.v_err_before > 0 &&
		 r.v_err_after <= (1 - gain) * r.v_err_before;
	nh = (size_t)a.nl * a.nkv;
	for (i = 0; want_k && i < nh; i++) {
		uint32_t c;

		for (c = 0; c < a.hd; c++)
			r.rotated |= pl.sk[i].ph[c] != 0;
	}
	if (want_k || want_v) {
		ret = fold(m, want_k ? pl.sk : NULL, want_v ? pl.sv : NULL,
			   &r.n_inexact, &r.owned_bytes);
		if (ret)
			goto out;
	}
	r.centred &= want_k;
	if (r.centred) {
		shape_centres(hp, pl.sk, ctr);
		m->kv_center = ctr;
		ctr = NULL;
	}
	r.keys = want_k;
	r.values = want_v;
	if (!want_k)
		r.rotated = false;
	snprintf(r.why, sizeof(r.why),
		 "%spredicted error keys %.4g -> %.4g%s%s, values %.4g -> %.4g%s",
		 refused, r.k_err_before, r.k_err_after,
		 r.centred ? " centred" : "",
		 !has_k ? " (not quantized)" : want_k ? "" :
		 " (gain too small)",
		 r.v_err_before, r.v_err_after,
		 !has_v ? " (not quantized)" : want_v ? "" :
		 " (gain too small)");
done:
	snprintf(r.state, sizeof(r.state), "%s",
		 r.keys && r.values ? "keys+values" : r.keys ? "keys" :
		 r.values ? "values" : "off");
	r.seconds = now_s() - t0;
	if (r.n_inexact)
		kvq_notice("KV smoothing: %u scaled weight values were rounded (they left the type's normal range)",
			 r.n_inexact);
	kvq_notice("KV smoothing (kv_smooth = %s): %s%s%s; %s; %u tokens, %.1f MiB of smoothed copies, %.3f s",
		   kvq_kv_smooth_mode_name(o->mode), r.state,
		   r.rotated ? ", key pairs rotated" : "",
		   r.centred ? ", keys centred" : "", r.why, r.n_tokens,
		   r.owned_bytes / 1048576.0, r.seconds);
	set_last(m, &r);
	if (rep)
		*rep = r;
	ret = 0;
out:
	free(ctr);
	kvq_kv_smooth_plan_free(&pl);
	acts_free(&a);
	return ret;
}

/* The layers' types of @spec; "auto" (keys only) counts as q4. */
static int spec_types(const char *spec, uint32_t nl, uint8_t *t, char *err,
		      size_t errlen)
{
	int r;

	if (nl > KVQ_KV_MAX_LAYERS)
		return -EINVAL;
	r = kvq_kv_types_parse(spec, nl, t, err, errlen);
	if (r == 1)
		memset(t, KVQ_KV_Q4, nl);
	return r < 0 ? r : 0;
}

int kvq_kv_key_moments(struct kvq_model *m)
{
	struct timespec t0, t1;
	struct acts a;
	float *w;
	size_t n, i;
	int ret;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	ret = measure(m, KEY_MOMENTS_SKIP, &a);
	if (ret)
		return ret;
	n = (size_t)a.nl * a.nkv * a.wsz;
	w = malloc(n * sizeof(float));
	if (!w) {
		acts_free(&a);
		return -ENOMEM;
	}
	for (i = 0; i < n; i++)
		w[i] = (float)a.wk[i];
	free(m->kv_key_moments);
	m->kv_key_moments = w;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	kvq_notice("KV keys: codes chosen against the queries' moments (kv_key_rounding = queries; %u calibration tokens, %.2f s)",
		 a.n_tok, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
	acts_free(&a);
	return 0;
}

int kvq_kv_smooth_load(struct kvq_model *m, int mode, const char *kv_type_k,
		       const char *kv_type_v, char *err, size_t errlen)
{
	uint32_t nl = kvq_model_hparams(m)->n_layers;
	struct kvq_kv_smooth_opts o;
	char e[256];
	int ret;

	if (nl > KVQ_KV_MAX_LAYERS)
		return 0;	/* no KV cache for it: refused when created */

	kvq_kv_smooth_opts_default(&o);
	o.mode = (enum kvq_kv_smooth_mode)mode;
	o.center = !getenv("KVQ_KV_NO_CENTER");
	/* A setting that does not parse leaves its half alone: whoever
	 * creates the cache refuses it, with the message that fits. */
	if (spec_types(kv_type_k, nl, o.type_k, e, sizeof(e)))
		memset(o.type_k, KVQ_KV_F16, sizeof(o.type_k));
	if (spec_types(kv_type_v, nl, o.type_v, e, sizeof(e)))
		memset(o.type_v, KVQ_KV_F16, sizeof(o.type_v));
	ret = kvq_kv_smooth_apply(m, &o, NULL);
	if (ret)
		snprintf(err, errlen, "kv_smooth = %s: %s",
			 kvq_kv_smooth_mode_name(mode), strerror(-ret));
	return ret;
}
