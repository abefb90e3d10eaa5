/*
 * model.h - a loaded llama-family model and the step function that runs it.
 *
 * Why this file exists: the forward pass is written once, over a backend ops
 * table (engine/backend.h), for a batch of sequences.  Callers (one-shot
 * mode, the scheduler, the perplexity tool, tests) only see this API:
 * load a model, create a context (KV cache + scratch), create sequences,
 * and step a batch of new tokens through the model.
 */
#ifndef KVQ_MODEL_H
#define KVQ_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_gguf;
struct kvq_tokenizer;
struct kvq_pool;

enum kvq_arch {
	KVQ_ARCH_LLAMA = 1,
	KVQ_ARCH_QWEN2 = 2,
};

/* Hyper-parameters, every one read from the GGUF metadata. */
struct kvq_hparams {
	enum kvq_arch arch;
	char arch_name[32];
	uint32_t n_vocab;
	uint32_t dim;
	uint32_t n_layers;
	uint32_t n_heads;
	uint32_t n_kv_heads;
	uint32_t head_dim;
	uint32_t ffn_dim;
	uint32_t ctx_len;	/* context length the model was trained for */
	uint32_t rope_dim;	/* dimensions rotated per head */
	float rope_base;
	float rms_eps;
	bool rope_neox;		/* half-split pairs (qwen2) vs adjacent pairs */
	bool tied_output;	/* output projection is token_embd */
	bool qkv_bias;
};

struct kvq_model_opts {
	int n_threads;		/* <= 0: one per CPU */
	bool vocab_only;	/* tokenizer only, no weights */
};

struct kvq_model;

/*
 * kvq_model_load() - map @path, validate it, build the tokenizer and the
 * weight handles.  Returns 0 and stores the model in *out, or -errno with
 * a one-line message naming the file and what is wrong in @err.
 */
int kvq_model_load(const char *path, const struct kvq_model_opts *o,
		   struct kvq_model **out, char *err, size_t errlen);
void kvq_model_destroy(struct kvq_model *m);

const struct kvq_hparams *kvq_model_hparams(const struct kvq_model *m);
struct kvq_tokenizer *kvq_model_tokenizer(const struct kvq_model *m);
const struct kvq_gguf *kvq_model_gguf(const struct kvq_model *m);
/* Bytes of weights as stored (mapped). */
uint64_t kvq_model_weight_bytes(const struct kvq_model *m);
/* Short description: "llama 5L dim 64 F32 (260K params)". */
const char *kvq_model_desc(const struct kvq_model *m);

/* ------------------------------------------------------------ contexts */

struct kvq_ctx_opts {
	uint32_t n_ctx;		/* max tokens of one sequence (0: model's) */
	uint32_t kv_tokens;	/* total KV capacity over all sequences (0: n_ctx) */
	uint32_t max_batch;	/* max tokens in one step (0: 512) */
	uint32_t max_seqs;	/* max live sequences (0: 16) */
	/* KV cache precision (enum kvq_kv_type); zero-initialised options
	 * mean f32 everywhere (exact, for reference runs);
	 * kvq_ctx_opts_default() gives the serving defaults. */
	uint8_t kv_type_k;
	uint8_t kv_type_v;
	const uint8_t *kv_types_k;	/* per layer, overrides kv_type_k */
	const uint8_t *kv_types_v;
	uint32_t kv_page_tokens;	/* 0: 16 (at most 64) */
	uint32_t kv_sink_tokens;	/* first tokens kept in f16 */
	int device;		/* enum kvq_ctx_device */
};

/* Where a context computes.  KVQ_CTX_GPU uploads the model's weights on
 * first use and keeps the KV pages and activations in device memory; it
 * fails (never falls back) when the build or the machine has no GPU. */
enum kvq_ctx_device {
	KVQ_CTX_CPU = 0,
	KVQ_CTX_GPU = 1,
};

/* Serving defaults: K q8, V q4, 4 f16 sink tokens, 16-token pages. */
void kvq_ctx_opts_default(struct kvq_ctx_opts *o);

struct kvq_ctx;

int kvq_ctx_create(struct kvq_model *m, const struct kvq_ctx_opts *o,
		   struct kvq_ctx **out, char *err, size_t errlen);
void kvq_ctx_destroy(struct kvq_ctx *c);

/* KV bytes in use, KV bytes per token, the context and batch limits. */
uint64_t kvq_ctx_kv_bytes_used(const struct kvq_ctx *c);
uint64_t kvq_ctx_kv_bytes_per_token(const struct kvq_ctx *c);
uint32_t kvq_ctx_n_ctx(const struct kvq_ctx *c);
struct kvq_kvcache *kvq_ctx_kvcache(const struct kvq_ctx *c);
uint32_t kvq_ctx_max_batch(const struct kvq_ctx *c);

/* KVQ_CTX_CPU or KVQ_CTX_GPU. */
int kvq_ctx_device(const struct kvq_ctx *c);
/* Device bytes the context holds (0 on the CPU). */
uint64_t kvq_ctx_device_bytes(const struct kvq_ctx *c);
/* One line about how the context computes (backend, kernels, graphs). */
void kvq_ctx_describe(const struct kvq_ctx *c, char *buf, size_t len);
/* What the device stopped doing after a failure, or NULL (see
 * kvq_ctx_gpu_fallback()). */
const char *kvq_ctx_fallback(const struct kvq_ctx *c);

/* Tokens kvq_step_sample() had the GPU choose (0 on the CPU). */
uint64_t kvq_ctx_device_sampled(const struct kvq_ctx *c);
/* Device time of the steps so far, in microseconds, each step from its
 * first upload to its last copy back (0 on the CPU). */
double kvq_ctx_device_busy_us(const struct kvq_ctx *c);
/*
 * A buffer of *@rows rows of n_vocab floats that kvq_step() fills without
 * a copy on the host (the GPU context's pinned memory), or NULL (on the
 * CPU).  Owned by @c; its contents last until the next step.
 */
float *kvq_ctx_logits_buffer(struct kvq_ctx *c, size_t *rows);

/* A new empty sequence: returns its id (>= 0) or -ENOSPC. */
int kvq_seq_create(struct kvq_ctx *c);
/* Frees the sequence's KV pages at once. */
void kvq_seq_free(struct kvq_ctx *c, int seq);
/* Tokens already in the sequence's KV cache. */
int kvq_seq_len(const struct kvq_ctx *c, int seq);
/* Drops tokens from position @pos on (pos <= len). */
int kvq_seq_truncate(struct kvq_ctx *c, int seq, int pos);
/*
 * kvq_seq_fork() - makes the empty sequence @dst share the first @n tokens
 * of @src's KV cache (a common prompt prefix): whole pages are shared and
 * reference counted, a partial last page is copied when either side writes
 * into it.  Returns 0, -EINVAL (bad ids, @dst not empty, @n beyond @src),
 * -ENOMEM, or -EIO when the GPU copy failed (@dst left empty).
 */
int kvq_seq_fork(struct kvq_ctx *c, int dst, int src, uint32_t n);
/*
 * For benchmarks: appends @n tokens of pseudo-random keys and values to
 * the sequence's cache in every layer without running the model (a long
 * context in seconds instead of a prefill).  GPU contexts only; -ENOSYS
 * on the CPU, -ENOSPC when the cache is full.
 */
int kvq_seq_fill_synthetic(struct kvq_ctx *c, int seq, uint32_t n);

/*
 * One step: for each entry i, append n_tokens[i] tokens of sequence
 * seq[i] and compute logits.  Sequences in one batch are distinct.
 * @logits receives, per entry, n_vocab floats for its last token -- or, when
 * @all_logits is set, n_vocab floats for every token of every entry in
 * order.  Returns 0, -ENOSPC when the KV cache or a sequence's context is
 * full (nothing appended), -E2BIG when the batch has more tokens than
 * the context's max_batch (callers chunk long prompts), -EINVAL for a bad
 * token id or batch, -EIO when the GPU failed (logged; nothing appended).
 */
struct kvq_batch {
	int n;
	const int *seq;
	const int *n_tokens;
	const int32_t *const *tokens;
	bool all_logits;
};
int kvq_step(struct kvq_ctx *c, const struct kvq_batch *b, float *logits);

struct kvq_sampler;

/*
 * kvq_step_sample() - kvq_step(), then entry i's next token from its last
 * row with @smp[i]: @ids[i] = kvq_sampler_sample(smp[i], row, NULL), or -1
 * where smp[i] is NULL (a prompt chunk whose logits nobody wants).
 * all_logits must be off.  @logits (may be NULL) also receives the rows.
 *
 * On a GPU context the tokens are chosen on the device by kvq_gpu_sample()
 * with the uniform numbers the samplers draw (kvq_sampler_next_u()), and
 * only the ids are copied back when @logits is NULL: the same tokens as
 * sampling the rows on the host, except where a running weight lies within
 * about 1e-6 (relative) of its boundary.  Steps of fewer than 4 entries
 * that all sample with a top-k of at most 64 (not greedy) are sampled on
 * the host, which is faster there.  A step that fails leaves the samplers' states
 * as they were.  Returns as kvq_step(), and -ENOMEM.
 */
int kvq_step_sample(struct kvq_ctx *c, const struct kvq_batch *b,
		    struct kvq_sampler *const *smp, int32_t *ids,
		    float *logits);

#endif /* KVQ_MODEL_H */
