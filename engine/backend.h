/*
 * backend.h - the operations a forward pass is made of, as a table.
 *
 * Why this file exists: the model code (engine/model.c) is written once over
 * this ops table; the CPU implementation is engine/backend_cpu.c and a GPU
 * implementation plugs in beside it.  Model code never calls SIMD or GPU
 * code directly, and reaches weights only through handles bracketed by
 * kvq_weight_get()/kvq_weight_put(), so a tiering engine can decide where a
 * weight lives while it is not in use.
 */
#ifndef KVQ_BACKEND_H
#define KVQ_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_pool;
struct kvq_kvcache;
struct kvq_kv_seq;

/* A weight tensor as the model sees it: a handle, not a pointer. */
struct kvq_weight {
	const char *name;
	uint32_t type;		/* enum kvq_type */
	uint32_t cols;		/* elements per row (ne[0]) */
	uint32_t rows;		/* ne[1] (1 for vectors) */
	uint64_t nbytes;
	const void *host;	/* mapped bytes */
	int32_t pins;		/* > 0 while a step holds it */
};

/* Returns the weight's bytes in the backend's memory, valid until the
 * matching put; the weight is not moved while held. */
static inline const void *kvq_weight_get(struct kvq_weight *w)
{
	__atomic_add_fetch(&w->pins, 1, __ATOMIC_ACQUIRE);
	return w->host;
}

static inline void kvq_weight_put(struct kvq_weight *w)
{
	__atomic_sub_fetch(&w->pins, 1, __ATOMIC_RELEASE);
}

/* One sequence's part of a step, as the attention op sees it. */
struct kvq_attn_seq {
	struct kvq_kv_seq *kv;
	uint32_t pos0;		/* position of the first new token */
	uint32_t n_new;		/* new tokens (rows of q/out from row0) */
	uint32_t row0;
};

/* RoPE parameters of a model. */
struct kvq_rope {
	uint32_t dim;		/* rotated dimensions per head */
	float base;
	bool neox;		/* half-split pairs instead of adjacent pairs */
};

struct kvq_backend;

struct kvq_backend_ops {
	const char *name;
	/* y[t][r] = sum_c W[r][c] * x[t][c] for t < n_tok. */
	void (*matmul)(struct kvq_backend *be, struct kvq_weight *w,
		       const float *x, float *y, uint32_t n_tok);
	/* y[t] = x[t] / rms(x[t]) * g, rows of @dim. y may equal x. */
	void (*rmsnorm)(struct kvq_backend *be, const float *x, const float *g,
			float *y, uint32_t n_tok, uint32_t dim, float eps);
	/* Rotates @n_heads heads of @head_dim in each of n_tok rows of x
	 * (row stride n_heads*head_dim) at positions pos[t]. */
	void (*rope)(struct kvq_backend *be, float *x, const uint32_t *pos,
		     uint32_t n_tok, uint32_t n_heads, uint32_t head_dim,
		     uint32_t rope_dim, float base, bool neox);
	/* gate[i] = silu(gate[i]) * up[i]. */
	void (*swiglu)(struct kvq_backend *be, float *gate, const float *up,
		       size_t n);
	/* y[i] += x[i]. */
	void (*add)(struct kvq_backend *be, float *y, const float *x,
		    size_t n);
	/* y[t] (row of n elements) += b, for each of n_tok rows. */
	void (*add_bias)(struct kvq_backend *be, float *y, const float *b,
			 uint32_t n_tok, uint32_t n);
	/* out[t] = row tok[t] of the embedding table. */
	int (*embed)(struct kvq_backend *be, struct kvq_weight *w,
		     const int32_t *tok, uint32_t n_tok, float *out);
	/* For each sequence's new tokens: rotates the k rows (RoPE at the
	 * token's position, as @rope says), quantizes k and v and appends
	 * them to @layer of the cache in one pass; then computes causal
	 * attention of q (rows of n_heads*head_dim, already rotated) into
	 * out.  k is modified (rotated in place). */
	void (*attention)(struct kvq_backend *be, struct kvq_kvcache *kv,
			  uint32_t layer, const struct kvq_attn_seq *seqs,
			  uint32_t n_seqs, const float *q, float *k,
			  const float *v, float *out, uint32_t n_heads,
			  const struct kvq_rope *rope);
};

struct kvq_backend {
	const struct kvq_backend_ops *ops;
	struct kvq_pool *pool;
	void *priv;
};

/* The CPU backend over @pool (borrowed). */
void kvq_backend_cpu_init(struct kvq_backend *be, struct kvq_pool *pool);

#endif /* KVQ_BACKEND_H */
