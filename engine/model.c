/*
 * model.c - loading a llama-family GGUF model and running a step.
 *
 * Why this file exists: it is the forward pass, written once over the
 * backend ops table (engine/backend.h) for a batch of sequences: RMSNorm,
 * Q/K/V projections (+ bias for qwen2), RoPE (adjacent pairs for llama,
 * half-split for qwen2), grouped-query attention over the paged KV cache,
 * the output projection, SwiGLU feed-forward, residuals; f32 activations.
 * Every hyper-parameter comes from the file's metadata and every tensor's
 * type and shape is checked at load, so the step never meets a surprise.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/forward_gpu.h"
#include "engine/gguf.h"
#include "engine/kvcache.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/model_impl.h"
#include "engine/quant.h"
#include "engine/threadpool.h"
#include "engine/tokenizer.h"

/* ------------------------------------------------------------- loading */

static int hp_u32(const struct kvq_gguf *g, const char *arch,
		  const char *key, uint32_t *out, bool required, char *err,
		  size_t errlen)
{
	char k[128];
	int ret;

	snprintf(k, sizeof(k), "%s.%s", arch, key);
	ret = kvq_gguf_get_u32(g, k, out);
	if (ret == -ENOENT && !required)
		return 0;
	if (ret)
		snprintf(err, errlen, "%s: metadata %s: %s", g->path, k,
			 ret == -ENOENT ? "missing" : "not an integer");
	return ret;
}

static int hp_f32(const struct kvq_gguf *g, const char *arch,
		  const char *key, float *out, char *err, size_t errlen)
{
	char k[128];
	int ret;

	snprintf(k, sizeof(k), "%s.%s", arch, key);
	ret = kvq_gguf_get_f32(g, k, out);
	if (ret == -ENOENT)
		return 0;
	if (ret)
		snprintf(err, errlen, "%s: metadata %s: not a number", g->path,
			 k);
	return ret;
}

static int read_hparams(const struct kvq_gguf *g, struct kvq_hparams *hp,
			char *err, size_t errlen)
{
	const char *arch;
	uint64_t alen;
	uint32_t key_len = 0;
	int ret;

	memset(hp, 0, sizeof(*hp));
	if (kvq_gguf_get_str(g, "general.architecture", &arch, &alen)) {
		snprintf(err, errlen, "%s: metadata general.architecture: missing",
			 g->path);
		return -EINVAL;
	}
	if (alen >= sizeof(hp->arch_name))
		alen = sizeof(hp->arch_name) - 1;
	memcpy(hp->arch_name, arch, alen);
	if (!strcmp(hp->arch_name, "llama")) {
		hp->arch = KVQ_ARCH_LLAMA;
	} else if (!strcmp(hp->arch_name, "qwen2")) {
		hp->arch = KVQ_ARCH_QWEN2;
		hp->rope_neox = true;
		hp->qkv_bias = true;
	} else {
		snprintf(err, errlen,
			 "%s: unsupported architecture \"%s\" (supported: llama, qwen2)",
			 g->path, hp->arch_name);
		return -ENOTSUP;
	}
	arch = hp->arch_name;
	if ((ret = hp_u32(g, arch, "embedding_length", &hp->dim, true, err, errlen)) ||
	    (ret = hp_u32(g, arch, "block_count", &hp->n_layers, true, err, errlen)) ||
	    (ret = hp_u32(g, arch, "feed_forward_length", &hp->ffn_dim, true, err, errlen)) ||
	    (ret = hp_u32(g, arch, "attention.head_count", &hp->n_heads, true, err, errlen)))
		return ret;
	hp->n_kv_heads = hp->n_heads;
	hp->ctx_len = 2048;
	hp->rope_base = 10000.0f;
	hp->rms_eps = 1e-5f;
	if ((ret = hp_u32(g, arch, "attention.head_count_kv", &hp->n_kv_heads, false, err, errlen)) ||
	    (ret = hp_u32(g, arch, "context_length", &hp->ctx_len, false, err, errlen)) ||
	    (ret = hp_u32(g, arch, "attention.key_length", &key_len, false, err, errlen)) ||
	    (ret = hp_f32(g, arch, "rope.freq_base", &hp->rope_base, err, errlen)) ||
	    (ret = hp_f32(g, arch, "attention.layer_norm_rms_epsilon", &hp->rms_eps, err, errlen)))
		return ret;
	if (!hp->dim || !hp->n_layers || !hp->ffn_dim || !hp->n_heads ||
	    !hp->n_kv_heads || hp->n_heads % hp->n_kv_heads ||
	    (!key_len && hp->dim % hp->n_heads)) {
		snprintf(err, errlen,
			 "%s: inconsistent hyper-parameters (dim %u, heads %u, kv heads %u, layers %u, ffn %u)",
			 g->path, hp->dim, hp->n_heads, hp->n_kv_heads,
			 hp->n_layers, hp->ffn_dim);
		return -EINVAL;
	}
	hp->head_dim = key_len ? key_len : hp->dim / hp->n_heads;
	hp->rope_dim = hp->head_dim;
	if ((ret = hp_u32(g, arch, "rope.dimension_count", &hp->rope_dim, false, err, errlen)))
		return ret;
	if (hp->head_dim % 2 || hp->rope_dim > hp->head_dim || hp->rope_dim % 2 ||
	    !(hp->rope_base > 0.0f) || !(hp->rms_eps > 0.0f) || !hp->ctx_len) {
		snprintf(err, errlen,
			 "%s: bad attention parameters (head_dim %u, rope dims %u, rope base %g, rms eps %g, context %u)",
			 g->path, hp->head_dim, hp->rope_dim, hp->rope_base,
			 hp->rms_eps, hp->ctx_len);
		return -EINVAL;
	}
	return 0;
}

/* Finds tensor @name with the given shape (rows 0 = a vector). */
static int find_tensor(struct kvq_model *m, const char *name, uint32_t cols,
		       uint32_t rows, bool optional, struct kvq_weight **out,
		       char *err, size_t errlen)
{
	const struct kvq_gguf_tensor *t = kvq_gguf_tensor(m->g, name);
	uint32_t i;

	*out = NULL;
	if (!t) {
		if (optional)
			return 0;
		snprintf(err, errlen, "%s: tensor %s: missing", m->g->path,
			 name);
		return -EINVAL;
	}
	if (t->ne[0] != cols || (rows ? t->n_dims != 2 || t->ne[1] != rows :
				 t->n_dims != 1)) {
		snprintf(err, errlen,
			 "%s: tensor %s: shape [%llu, %llu] (%u dims), expected [%u, %u]",
			 m->g->path, name, (unsigned long long)t->ne[0],
			 (unsigned long long)t->ne[1], t->n_dims, cols,
			 rows ? rows : 1);
		return -EINVAL;
	}
	if (!kvq_quant_supported(t->type)) {
		snprintf(err, errlen,
			 "%s: unsupported tensor type %s in tensor %s",
			 m->g->path, kvq_type_name(t->type), name);
		return -ENOTSUP;
	}
	for (i = 0; i < m->n_weights; i++) {
		if (!strcmp(m->weights[i].name, name)) {
			*out = &m->weights[i];
			return 0;
		}
	}
	return -EINVAL;
}

/* A vector tensor (norm, bias) dequantized into an owned f32 array. */
static int load_vec(struct kvq_model *m, const char *name, uint32_t n,
		    bool optional, float **out, char *err, size_t errlen)
{
	struct kvq_weight *w;
	float *v;
	int ret;

	*out = NULL;
	ret = find_tensor(m, name, n, 0, optional, &w, err, errlen);
	if (ret || !w)
		return ret;
	v = malloc(n * sizeof(float));
	if (!v)
		return -ENOMEM;
	ret = kvq_dequant_row(w->type, w->host, v, n);
	if (ret) {
		free(v);
		snprintf(err, errlen, "%s: tensor %s: cannot dequantize",
			 m->g->path, name);
		return ret;
	}
	m->owned[m->n_owned++] = v;
	*out = v;
	return 0;
}

static int load_weights(struct kvq_model *m, char *err, size_t errlen)
{
	const struct kvq_hparams *hp = &m->hp;
	uint32_t qd = hp->n_heads * hp->head_dim;
	uint32_t kvd = hp->n_kv_heads * hp->head_dim;
	const struct kvq_gguf_tensor *te;
	char nm[96];
	uint32_t i, l;
	int ret;

	m->weights = calloc(m->g->n_tensors ? m->g->n_tensors : 1,
			    sizeof(*m->weights));
	m->layers = calloc(hp->n_layers, sizeof(*m->layers));
	m->owned = calloc(1 + 5 * (size_t)hp->n_layers, sizeof(float *));
	if (!m->weights || !m->layers || !m->owned)
		return -ENOMEM;
	for (i = 0; i < m->g->n_tensors; i++) {
		const struct kvq_gguf_tensor *t = &m->g->tensors[i];
		struct kvq_weight *w = &m->weights[m->n_weights++];

		w->name = t->name;
		w->type = t->type;
		w->cols = (uint32_t)t->ne[0];
		w->rows = t->n_dims >= 2 ? (uint32_t)t->ne[1] : 1;
		w->nbytes = t->nbytes;
		w->host = t->data;
		m->weight_bytes += t->nbytes;
	}

	te = kvq_gguf_tensor(m->g, "token_embd.weight");
	if (!te || te->n_dims != 2) {
		snprintf(err, errlen, "%s: tensor token_embd.weight: %s",
			 m->g->path, te ? "not 2-dimensional" : "missing");
		return -EINVAL;
	}
	m->hp.n_vocab = (uint32_t)te->ne[1];
	if ((ret = find_tensor(m, "token_embd.weight", hp->dim, hp->n_vocab,
			       false, &m->tok_embd, err, errlen)) ||
	    (ret = find_tensor(m, "output.weight", hp->dim, hp->n_vocab, true,
			       &m->output, err, errlen)) ||
	    (ret = load_vec(m, "output_norm.weight", hp->dim, false,
			    &m->output_norm, err, errlen)))
		return ret;
	if (!m->output) {
		m->output = m->tok_embd;
		m->hp.tied_output = true;
	}
	for (l = 0; l < hp->n_layers; l++) {
		struct kvq_layer *L = &m->layers[l];
		struct {
			const char *n;
			uint32_t cols, rows;
			struct kvq_weight **w;
		} mats[] = {
			{ "attn_q", hp->dim, qd, &L->wq },
			{ "attn_k", hp->dim, kvd, &L->wk },
			{ "attn_v", hp->dim, kvd, &L->wv },
			{ "attn_output", qd, hp->dim, &L->wo },
			{ "ffn_gate", hp->dim, hp->ffn_dim, &L->w_gate },
			{ "ffn_up", hp->dim, hp->ffn_dim, &L->w_up },
			{ "ffn_down", hp->ffn_dim, hp->dim, &L->w_down },
		};
		struct {
			const char *n;
			uint32_t len;
			bool opt;
			float **v;
		} vecs[] = {
			{ "attn_norm.weight", hp->dim, false, &L->attn_norm },
			{ "ffn_norm.weight", hp->dim, false, &L->ffn_norm },
			{ "attn_q.bias", qd, !hp->qkv_bias, &L->bq },
			{ "attn_k.bias", kvd, !hp->qkv_bias, &L->bk },
			{ "attn_v.bias", kvd, !hp->qkv_bias, &L->bv },
		};

		for (i = 0; i < sizeof(mats) / sizeof(mats[0]); i++) {
			snprintf(nm, sizeof(nm), "blk.%u.%s.weight", l,
				 mats[i].n);
			ret = find_tensor(m, nm, mats[i].cols, mats[i].rows,
					  false, mats[i].w, err, errlen);
			if (ret)
				return ret;
		}
		for (i = 0; i < sizeof(vecs) / sizeof(vecs[0]); i++) {
			snprintf(nm, sizeof(nm), "blk.%u.%s", l, vecs[i].n);
			ret = load_vec(m, nm, vecs[i].len, vecs[i].opt,
				       vecs[i].v, err, errlen);
			if (ret)
				return ret;
		}
	}
	return 0;
}

static void model_describe(struct kvq_model *m)
{
	const struct kvq_hparams *hp = &m->hp;
	uint64_t params = 0;
	uint32_t i;
	const char *ty = kvq_type_name(m->layers[0].wq->type);

	for (i = 0; i < m->g->n_tensors; i++)
		params += m->g->tensors[i].n_elements;
	snprintf(m->desc, sizeof(m->desc),
		 "%s, %u layers, dim %u, %u/%u heads, ffn %u, vocab %u, %s, %.2fM parameters, %.1f MiB",
		 hp->arch_name, hp->n_layers, hp->dim, hp->n_heads,
		 hp->n_kv_heads, hp->ffn_dim, hp->n_vocab, ty, params / 1e6,
		 m->weight_bytes / 1048576.0);
}

int kvq_model_load(const char *path, const struct kvq_model_opts *o,
		   struct kvq_model **out, char *err, size_t errlen)
{
	struct kvq_model_opts defo = { 0 };
	struct kvq_model *m;
	int ret;

	if (!o)
		o = &defo;
	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	ret = kvq_gguf_open(path, &m->g, err, errlen);
	if (ret)
		goto out_free;
	ret = kvq_tokenizer_create(m->g, &m->tok, err, errlen);
	if (ret)
		goto out_free;
	if (o->vocab_only) {
		m->hp.n_vocab = (uint32_t)kvq_tokenizer_n_vocab(m->tok);
		snprintf(m->desc, sizeof(m->desc), "vocabulary only, %u tokens",
			 m->hp.n_vocab);
		*out = m;
		return 0;
	}
	ret = read_hparams(m->g, &m->hp, err, errlen);
	if (ret)
		goto out_free;
	ret = load_weights(m, err, errlen);
	if (ret == -ENOMEM)
		snprintf(err, errlen, "%s: out of memory", path);
	if (ret)
		goto out_free;
	if (m->hp.n_vocab != (uint32_t)kvq_tokenizer_n_vocab(m->tok))
		kvq_warn("%s: token_embd has %u rows but the vocabulary has %d tokens",
			 path, m->hp.n_vocab, kvq_tokenizer_n_vocab(m->tok));
	m->pool = kvq_pool_create(o->n_threads);
	if (!m->pool) {
		snprintf(err, errlen, "cannot create the thread pool");
		ret = -ENOMEM;
		goto out_free;
	}
	kvq_backend_cpu_init(&m->be, m->pool);
	model_describe(m);
	*out = m;
	return 0;

out_free:
	kvq_model_destroy(m);
	return ret;
}

void kvq_model_destroy(struct kvq_model *m)
{
	uint32_t i;

	if (!m)
		return;
	kvq_model_gpu_release(m);
	kvq_pool_destroy(m->pool);
	for (i = 0; i < m->n_owned; i++)
		free(m->owned[i]);
	free(m->owned);
	free(m->kv_center);
	free(m->kv_key_moments);
	free(m->layers);
	free(m->weights);
	kvq_tokenizer_destroy(m->tok);
	kvq_gguf_close(m->g);
	free(m);
}

const struct kvq_hparams *kvq_model_hparams(const struct kvq_model *m)
{
	return &m->hp;
}

struct kvq_tokenizer *kvq_model_tokenizer(const struct kvq_model *m)
{
	return m->tok;
}

const struct kvq_gguf *kvq_model_gguf(const struct kvq_model *m)
{
	return m->g;
}

uint64_t kvq_model_weight_bytes(const struct kvq_model *m)
{
	return m->weight_bytes;
}

const char *kvq_model_desc(const struct kvq_model *m)
{
	return m->desc;
}
