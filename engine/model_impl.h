/*
 * model_impl.h - the inside of a loaded model, shared by the loader
 * (model.c) and the forward pass (forward.c).  Nothing else includes it.
 */
#ifndef KVQ_MODEL_IMPL_H
#define KVQ_MODEL_IMPL_H

#include "engine/backend.h"
#include "engine/model.h"

struct kvq_layer {
	float *attn_norm;
	float *ffn_norm;
	float *bq, *bk, *bv;	/* qwen2 only */
	struct kvq_weight *wq, *wk, *wv, *wo;
	struct kvq_weight *w_gate, *w_up, *w_down;
};

struct kvq_gpu_model;

struct kvq_model {
	struct kvq_gguf *g;
	struct kvq_hparams hp;
	struct kvq_tokenizer *tok;
	struct kvq_pool *pool;
	struct kvq_backend be;
	struct kvq_weight *weights;	/* every weight tensor, by GGUF order */
	uint32_t n_weights;
	struct kvq_weight *tok_embd;
	struct kvq_weight *output;
	float *output_norm;
	struct kvq_layer *layers;
	float **owned;			/* f32 copies of norms and biases */
	uint32_t n_owned;
	uint64_t weight_bytes;
	char desc[160];
	struct kvq_gpu_model *gpu;	/* device copy of the weights, or NULL */
	char gpu_weights[384];		/* kvq_model_gpu_weights() */
	/* Key centres for the quantized KV cache ([layer][kv head][head_dim],
	 * pre-RoPE; see kvcache.h), set by kvsmooth.c, or NULL. */
	float *kv_center;
	/* The queries' second moments a KV head for kv_key_rounding =
	 * queries ([layer][kv head][2 * head_dim], kvcache.h's k_moments),
	 * set by kvq_kv_key_moments(), or NULL. */
	float *kv_key_moments;
};

#endif /* KVQ_MODEL_IMPL_H */
