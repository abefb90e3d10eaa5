/*
 * kvcache.c - page pool, block tables and attention over pages (see
 * kvcache.h for the layout).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/quant.h"

int kvq_kv_create(const struct kvq_kv_opts *o, struct kvq_kvcache **out)
{
	struct kvq_kvcache *c;
	uint32_t l, i;
	size_t bytes;

	if (!o->n_layers || !o->n_kv_heads || !o->head_dim || !o->n_pages)
		return -EINVAL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->o = *o;
	if (!c->o.page_tokens)
		c->o.page_tokens = 16;
	c->page_elems = (size_t)c->o.page_tokens * o->n_kv_heads * o->head_dim;
	bytes = c->page_elems * sizeof(float) * o->n_pages;
	c->k = calloc(o->n_layers, sizeof(*c->k));
	c->v = calloc(o->n_layers, sizeof(*c->v));
	c->refcnt = calloc(o->n_pages, sizeof(*c->refcnt));
	c->free_list = malloc(o->n_pages * sizeof(*c->free_list));
	if (!c->k || !c->v || !c->refcnt || !c->free_list)
		goto out_free;
	for (l = 0; l < o->n_layers; l++) {
		/* Untouched pages stay virtual until first written. */
		c->k[l] = malloc(bytes);
		c->v[l] = malloc(bytes);
		if (!c->k[l] || !c->v[l])
			goto out_free;
	}
	/* Lowest ids are handed out first. */
	for (i = 0; i < o->n_pages; i++)
		c->free_list[i] = (int32_t)(o->n_pages - 1 - i);
	c->n_free = o->n_pages;
	*out = c;
	return 0;

out_free:
	kvq_kv_destroy(c);
	return -ENOMEM;
}

void kvq_kv_destroy(struct kvq_kvcache *c)
{
	uint32_t l;

	if (!c)
		return;
	for (l = 0; c->k && l < c->o.n_layers; l++)
		free(c->k[l]);
	for (l = 0; c->v && l < c->o.n_layers; l++)
		free(c->v[l]);
	free(c->k);
	free(c->v);
	free(c->refcnt);
	free(c->free_list);
	free(c);
}

uint64_t kvq_kv_bytes_per_token(const struct kvq_kvcache *c)
{
	return 2ull * c->o.n_layers * c->o.n_kv_heads * c->o.head_dim *
	       sizeof(float);
}

uint64_t kvq_kv_bytes_used(const struct kvq_kvcache *c)
{
	return (uint64_t)(c->o.n_pages - c->n_free) * c->o.page_tokens *
	       kvq_kv_bytes_per_token(c);
}

void kvq_kv_seq_init(struct kvq_kv_seq *s)
{
	memset(s, 0, sizeof(*s));
}

static void page_put(struct kvq_kvcache *c, int32_t p)
{
	if (--c->refcnt[p] == 0)
		c->free_list[c->n_free++] = p;
}

static int32_t page_alloc(struct kvq_kvcache *c)
{
	int32_t p;

	if (!c->n_free)
		return -1;
	p = c->free_list[--c->n_free];
	c->refcnt[p] = 1;
	return p;
}

void kvq_kv_seq_release(struct kvq_kvcache *c, struct kvq_kv_seq *s)
{
	uint32_t i;

	for (i = 0; i < s->n_pages; i++)
		page_put(c, s->pages[i]);
	free(s->pages);
	kvq_kv_seq_init(s);
}

static void page_copy(struct kvq_kvcache *c, int32_t dst, int32_t src)
{
	size_t n = c->page_elems * sizeof(float);
	uint32_t l;

	for (l = 0; l < c->o.n_layers; l++) {
		memcpy(c->k[l] + (size_t)dst * c->page_elems,
		       c->k[l] + (size_t)src * c->page_elems, n);
		memcpy(c->v[l] + (size_t)dst * c->page_elems,
		       c->v[l] + (size_t)src * c->page_elems, n);
	}
}

int kvq_kv_seq_reserve(struct kvq_kvcache *c, struct kvq_kv_seq *s,
		       uint32_t n)
{
	uint32_t pt = c->o.page_tokens;
	uint32_t need = (s->n_tokens + n + pt - 1) / pt;
	uint32_t add = need > s->n_pages ? need - s->n_pages : 0;
	bool cow = false;
	uint32_t i;

	/* A shared page that will be written must be copied first. */
	if (n && (s->n_tokens % pt) &&
	    c->refcnt[s->pages[s->n_tokens / pt]] > 1)
		cow = true;
	if (add + cow > c->n_free)
		return -ENOSPC;
	if (need > s->cap) {
		uint32_t cap = s->cap ? s->cap : 4;
		int32_t *np;

		while (cap < need)
			cap *= 2;
		np = realloc(s->pages, cap * sizeof(*np));
		if (!np)
			return -ENOMEM;
		s->pages = np;
		s->cap = cap;
	}
	if (cow) {
		uint32_t idx = s->n_tokens / pt;
		int32_t p = page_alloc(c);

		page_copy(c, p, s->pages[idx]);
		page_put(c, s->pages[idx]);
		s->pages[idx] = p;
	}
	for (i = 0; i < add; i++)
		s->pages[s->n_pages++] = page_alloc(c);
	return 0;
}

void kvq_kv_seq_commit(struct kvq_kv_seq *s, uint32_t n)
{
	s->n_tokens += n;
}

void kvq_kv_seq_truncate(struct kvq_kvcache *c, struct kvq_kv_seq *s,
			 uint32_t pos)
{
	uint32_t pt = c->o.page_tokens;
	uint32_t keep = (pos + pt - 1) / pt;

	/* pos == n_tokens releases pages reserved but never committed. */
	if (pos > s->n_tokens)
		return;
	while (s->n_pages > keep)
		page_put(c, s->pages[--s->n_pages]);
	s->n_tokens = pos;
}

int kvq_kv_seq_fork(struct kvq_kvcache *c, struct kvq_kv_seq *dst,
		    const struct kvq_kv_seq *src, uint32_t n_tokens)
{
	uint32_t pt = c->o.page_tokens;
	uint32_t np = (n_tokens + pt - 1) / pt;
	uint32_t i;

	if (n_tokens > src->n_tokens || dst->n_pages)
		return -EINVAL;
	if (np > dst->cap) {
		int32_t *p = realloc(dst->pages, (np ? np : 1) * sizeof(*p));

		if (!p)
			return -ENOMEM;
		dst->pages = p;
		dst->cap = np ? np : 1;
	}
	for (i = 0; i < np; i++) {
		dst->pages[i] = src->pages[i];
		c->refcnt[src->pages[i]]++;
	}
	dst->n_pages = np;
	dst->n_tokens = n_tokens;
	return 0;
}

/* acc = acc * a + w * v over n channels. */
static inline void axpby(float *acc, float a, const float *v, float w, int n)
{
	int i;

	for (i = 0; i < n; i++)
		acc[i] = acc[i] * a + w * v[i];
}

void kvq_kv_attend(const struct kvq_kvcache *c, const struct kvq_kv_seq *s,
		   uint32_t layer, uint32_t kvh, const float *q, float scale,
		   uint32_t n_ctx, float *out)
{
	uint32_t hd = c->o.head_dim, pt = c->o.page_tokens;
	size_t tok = (size_t)c->o.n_kv_heads * hd;
	float m = -INFINITY, l = 0.0f;
	uint32_t pos = 0, i;

	memset(out, 0, hd * sizeof(float));
	while (pos < n_ctx) {
		size_t base = (size_t)s->pages[pos / pt] * c->page_elems;
		const float *kp = c->k[layer] + base + kvh * hd;
		const float *vp = c->v[layer] + base + kvh * hd;
		uint32_t t0 = pos % pt, t1 = pt;

		if (n_ctx - pos < pt - t0)
			t1 = t0 + (n_ctx - pos);
		for (i = t0; i < t1; i++) {
			float sc = kvq_dot_f32(q, kp + i * tok, hd) * scale;

			if (sc > m) {
				float a = expf(m - sc);

				l = l * a + 1.0f;
				axpby(out, a, vp + i * tok, 1.0f, hd);
				m = sc;
			} else {
				float w = expf(sc - m);

				l += w;
				axpby(out, 1.0f, vp + i * tok, w, hd);
			}
		}
		pos += t1 - t0;
	}
	if (l > 0.0f) {
		float inv = 1.0f / l;

		for (i = 0; i < hd; i++)
			out[i] *= inv;
	}
}
