/*
 * kvcache.h - the paged KV cache.
 *
 * Why this file exists: long contexts and many concurrent sequences are
 * made of KV pages.  The cache is a pool of fixed-size pages; a page id
 * addresses page_tokens consecutive tokens of one sequence in EVERY layer
 * (each layer has its own page array, indexed by the same id), so a run of
 * pages of a sequence is one movable chunk across all layers.  Sequences own
 * a block table of page ids; pages carry reference counts so sequences with
 * a common prefix can share them read-only.
 *
 * Page layout (one layer, one page, K and V in separate arrays), f32:
 *   element [t][h][d] at ((t * n_kv_heads) + h) * head_dim + d
 * for token slot t < page_tokens, KV head h, channel d.
 */
#ifndef KVQ_KVCACHE_H
#define KVQ_KVCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_kv_opts {
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_dim;
	uint32_t page_tokens;	/* 0: 16 */
	uint32_t n_pages;
};

struct kvq_kvcache {
	struct kvq_kv_opts o;
	size_t page_elems;	/* page_tokens * n_kv_heads * head_dim */
	float **k;		/* [layer] -> n_pages * page_elems */
	float **v;
	int32_t *refcnt;	/* per page; 0 = free */
	int32_t *free_list;	/* stack of free page ids */
	uint32_t n_free;
};

/* A sequence's block table. */
struct kvq_kv_seq {
	int32_t *pages;
	uint32_t n_pages;
	uint32_t cap;
	uint32_t n_tokens;
};

int kvq_kv_create(const struct kvq_kv_opts *o, struct kvq_kvcache **out);
void kvq_kv_destroy(struct kvq_kvcache *c);

/* Bytes one token occupies over all layers (K and V). */
uint64_t kvq_kv_bytes_per_token(const struct kvq_kvcache *c);
/* Bytes of pages in use. */
uint64_t kvq_kv_bytes_used(const struct kvq_kvcache *c);

void kvq_kv_seq_init(struct kvq_kv_seq *s);
/* Releases every page reference of @s and empties it. */
void kvq_kv_seq_release(struct kvq_kvcache *c, struct kvq_kv_seq *s);
/*
 * Makes room for @n more tokens (allocating pages; copying a shared last
 * page before it is written).  Returns 0 or -ENOSPC with @s unchanged.
 * The tokens are not counted until kvq_kv_seq_commit().
 */
int kvq_kv_seq_reserve(struct kvq_kvcache *c, struct kvq_kv_seq *s,
		       uint32_t n);
void kvq_kv_seq_commit(struct kvq_kv_seq *s, uint32_t n);
/* Drops tokens from @pos on (pages no longer needed are released). */
void kvq_kv_seq_truncate(struct kvq_kvcache *c, struct kvq_kv_seq *s,
			 uint32_t pos);
/* Makes @dst share @src's first @n_tokens (whole pages shared, reference
 * counted; a partial last page is shared too and copied on write). */
int kvq_kv_seq_fork(struct kvq_kvcache *c, struct kvq_kv_seq *dst,
		    const struct kvq_kv_seq *src, uint32_t n_tokens);

/* Pointers to token @pos's K or V (all KV heads) in @layer.  The page must
 * have been reserved. */
static inline float *kvq_kv_k(const struct kvq_kvcache *c,
			      const struct kvq_kv_seq *s, uint32_t layer,
			      uint32_t pos)
{
	uint32_t pt = c->o.page_tokens;
	size_t tok = (size_t)c->o.n_kv_heads * c->o.head_dim;

	return c->k[layer] + (size_t)s->pages[pos / pt] * c->page_elems +
	       (pos % pt) * tok;
}

static inline float *kvq_kv_v(const struct kvq_kvcache *c,
			      const struct kvq_kv_seq *s, uint32_t layer,
			      uint32_t pos)
{
	uint32_t pt = c->o.page_tokens;
	size_t tok = (size_t)c->o.n_kv_heads * c->o.head_dim;

	return c->v[layer] + (size_t)s->pages[pos / pt] * c->page_elems +
	       (pos % pt) * tok;
}

/*
 * kvq_kv_attend() - one query head's attention over positions [0, n_ctx)
 * of @s in @layer, reading KV head @kvh: out = softmax(q.K^T * scale) V,
 * online softmax in f32.  @out has head_dim floats.
 */
void kvq_kv_attend(const struct kvq_kvcache *c, const struct kvq_kv_seq *s,
		   uint32_t layer, uint32_t kvh, const float *q, float scale,
		   uint32_t n_ctx, float *out);

#endif /* KVQ_KVCACHE_H */
