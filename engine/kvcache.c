/*
 * kvcache.c - page pool, block tables, quantized pages and attention over
 * them (see kvcache.h for the formats and the byte layout).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/kvcache_impl.h"
#include "engine/quant.h"

static const char *const type_names[KVQ_KV_NTYPES] = {
	"f32", "f16", "q8", "q4",
};

const char *kvq_kv_type_name(enum kvq_kv_type t)
{
	return (unsigned)t < KVQ_KV_NTYPES ? type_names[t] : "?";
}

int kvq_kv_type_parse(const char *s, enum kvq_kv_type *out)
{
	int i;

	for (i = 0; i < KVQ_KV_NTYPES; i++) {
		if (!strcmp(s, type_names[i])) {
			*out = (enum kvq_kv_type)i;
			return 0;
		}
	}
	return -EINVAL;
}

int kvq_kv_types_parse(const char *spec, uint32_t n_layers, uint8_t *out,
		       char *err, size_t errlen)
{
	enum kvq_kv_type t;
	uint32_t n = 0, i;
	const char *p = spec;
	char name[8];

	if (!strcmp(spec, "auto"))
		return 1;
	if (!strchr(spec, ',')) {
		if (kvq_kv_type_parse(spec, &t))
			goto bad_name;
		for (i = 0; i < n_layers; i++)
			out[i] = (uint8_t)t;
		return 0;
	}
	while (*p) {
		size_t len = strcspn(p, ",");

		if (len >= sizeof(name) || n >= n_layers)
			goto bad_list;
		memcpy(name, p, len);
		name[len] = '\0';
		if (kvq_kv_type_parse(name, &t)) {
			spec = name;
			goto bad_name;
		}
		out[n++] = (uint8_t)t;
		p += len;
		if (*p == ',')
			p++;
	}
	if (n != n_layers)
		goto bad_list;
	return 0;

bad_name:
	snprintf(err, errlen,
		 "unknown KV cache type \"%s\" (expected f32, f16, q8, q4 or auto)",
		 spec);
	return -EINVAL;
bad_list:
	snprintf(err, errlen,
		 "a per-layer KV type list needs exactly %u comma-separated names",
		 n_layers);
	return -EINVAL;
}

/* ----------------------------------------------------- row formats */

static uint32_t row_bytes(enum kvq_kv_type t, uint32_t d)
{
	switch (t) {
	case KVQ_KV_F32: return 4 * d;
	case KVQ_KV_F16: return 2 * d;
	case KVQ_KV_Q8: return d;
	case KVQ_KV_Q4: return d / 2;
	default: return 0;
	}
}

static bool is_quant(enum kvq_kv_type t)
{
	return t == KVQ_KV_Q8 || t == KVQ_KV_Q4;
}

void kvq_kv_quant_row(enum kvq_kv_type t, const float *x, uint32_t d,
		      uint32_t group, uint8_t *data, uint16_t *scales)
{
	uint32_t g, i;

	switch (t) {
	case KVQ_KV_F32:
		memcpy(data, x, d * sizeof(float));
		return;
	case KVQ_KV_F16:
		for (i = 0; i < d; i++) {
			uint16_t h = kvq_f32_to_f16(x[i]);

			memcpy(data + 2 * i, &h, 2);
		}
		return;
	case KVQ_KV_Q8:
	case KVQ_KV_Q4:
		break;
	default:
		return;
	}
	for (g = 0; g < d / group; g++) {
		const float *xg = x + g * group;
		float amax = 0.0f, sc, inv;
		int qmax = t == KVQ_KV_Q8 ? 127 : 7;

		for (i = 0; i < group; i++)
			amax = fabsf(xg[i]) > amax ? fabsf(xg[i]) : amax;
		scales[g] = kvq_f32_to_f16(amax / qmax);
		sc = kvq_f16_to_f32(scales[g]);
		inv = sc > 0.0f ? 1.0f / sc : 0.0f;
		for (i = 0; i < group; i++) {
			int q = (int)roundf(xg[i] * inv);

			if (t == KVQ_KV_Q8) {
				q = q < -127 ? -127 : q > 127 ? 127 : q;
				data[g * group + i] = (uint8_t)(int8_t)q;
			} else {
				uint8_t *b = data + (g * group + i) / 2;

				q = q < -8 ? -8 : q > 7 ? 7 : q;
				if (i % 2 == 0)
					*b = (uint8_t)(q + 8);
				else
					*b |= (uint8_t)((q + 8) << 4);
			}
		}
	}
}

void kvq_kv_dequant_row(enum kvq_kv_type t, const uint8_t *data,
			const uint16_t *scales, uint32_t d, uint32_t group,
			float *out)
{
	uint32_t g, i;

	switch (t) {
	case KVQ_KV_F32:
		memcpy(out, data, d * sizeof(float));
		return;
	case KVQ_KV_F16:
		for (i = 0; i < d; i++) {
			uint16_t h;

			memcpy(&h, data + 2 * i, 2);
			out[i] = kvq_f16_to_f32(h);
		}
		return;
	case KVQ_KV_Q8:
		for (g = 0; g < d / group; g++) {
			float sc = kvq_f16_to_f32(scales[g]);

			for (i = 0; i < group; i++)
				out[g * group + i] =
					sc * (float)(int8_t)data[g * group + i];
		}
		return;
	case KVQ_KV_Q4:
		for (g = 0; g < d / group; g++) {
			float sc = kvq_f16_to_f32(scales[g]);
			const uint8_t *b = data + g * group / 2;

			for (i = 0; i < group / 2; i++) {
				out[g * group + 2 * i] =
					sc * (float)((b[i] & 15) - 8);
				out[g * group + 2 * i + 1] =
					sc * (float)((b[i] >> 4) - 8);
			}
		}
		return;
	default:
		return;
	}
}

/* ---------------------------------------------------------- the pool */

static int half_init(struct kvq_kvcache *c, struct kvq_kv_half *hf,
		     uint8_t type)
{
	size_t hp = (size_t)c->o.n_kv_heads * c->o.page_tokens;

	if (type >= KVQ_KV_NTYPES)
		return -EINVAL;
	hf->type = (enum kvq_kv_type)type;
	hf->row_bytes = row_bytes(hf->type, c->o.head_dim);
	hf->n_groups = is_quant(hf->type) ? c->o.head_dim / c->group : 0;
	hf->page_bytes = hp * hf->row_bytes + hp * hf->n_groups * 2;
	/* 64-byte aligned pages keep 16-byte vector loads aligned. */
	hf->page_bytes = (hf->page_bytes + 63) & ~(size_t)63;
	/* Pages never written stay virtual. */
	hf->mem = malloc(hf->page_bytes * c->o.n_pages);
	return hf->mem ? 0 : -ENOMEM;
}

static void center_cs_calc(const struct kvq_kvcache *c, uint32_t pos,
			   float *cs);

int kvq_kv_create(const struct kvq_kv_opts *o, struct kvq_kvcache **out)
{
	struct kvq_kvcache *c;
	uint32_t l, i;
	int ret = -ENOMEM;

	if (!o->n_layers || o->n_layers > KVQ_KV_MAX_LAYERS ||
	    !o->n_kv_heads || !o->head_dim || o->head_dim % 2 ||
	    o->head_dim > KVQ_KV_MAX_HEAD_DIM || !o->n_pages ||
	    o->page_tokens > KVQ_KV_SC_STRIDE)
		return -EINVAL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->o = *o;
	if (!c->o.page_tokens)
		c->o.page_tokens = 16;
	if (c->o.n_sink > c->o.page_tokens)
		c->o.n_sink = c->o.page_tokens;
	c->group = o->head_dim < 32 ? o->head_dim : 32;
	c->simd = kvq_quant_simd();
	if (o->head_dim % c->group) {
		ret = -EINVAL;
		goto out_free;
	}
	if (o->k_center && (!o->rope_dim || o->rope_dim % 2 ||
			    o->rope_dim > o->head_dim)) {
		ret = -EINVAL;
		goto out_free;
	}
	c->o.k_center = NULL;
	c->o.k_moments = NULL;
	c->layers = calloc(o->n_layers, sizeof(*c->layers));
	c->refcnt = calloc(o->n_pages, sizeof(*c->refcnt));
	c->free_list = malloc(o->n_pages * sizeof(*c->free_list));
	if (!c->layers || !c->refcnt || !c->free_list)
		goto out_free;
	if (o->k_center) {
		size_t n = (size_t)o->n_layers * o->n_kv_heads * o->head_dim;

		c->centers = malloc(n * sizeof(float));
		if (!c->centers)
			goto out_free;
		memcpy(c->centers, o->k_center, n * sizeof(float));
		/* Attention wants R_p c at every position of every step:
		 * the angles once, here, rather than a sincos each time. */
		if (o->max_pos && (uint64_t)o->max_pos * o->rope_dim <=
				  (64u << 20)) {
			c->center_cs = malloc((size_t)o->max_pos *
					      o->rope_dim * sizeof(float));
			for (i = 0; c->center_cs && i < o->max_pos; i++)
				center_cs_calc(c, i, c->center_cs +
					       (size_t)i * o->rope_dim);
		}
	}
	if (o->k_moments) {
		size_t n = (size_t)o->n_layers * o->n_kv_heads * 2 *
			   o->head_dim;

		c->moments = malloc(n * sizeof(float));
		if (!c->moments)
			goto out_free;
		memcpy(c->moments, o->k_moments, n * sizeof(float));
	}
	for (l = 0; l < o->n_layers; l++) {
		ret = half_init(c, &c->layers[l].k, o->type_k[l]);
		if (!ret)
			ret = half_init(c, &c->layers[l].v, o->type_v[l]);
		if (ret)
			goto out_free;
		if (c->centers && is_quant(c->layers[l].k.type))
			c->layers[l].center = c->centers +
				(size_t)l * o->n_kv_heads * o->head_dim;
		if (c->moments && is_quant(c->layers[l].k.type))
			c->layers[l].moments = c->moments +
				(size_t)l * o->n_kv_heads * 2 * o->head_dim;
	}
	/* Lowest ids are handed out first. */
	for (i = 0; i < o->n_pages; i++)
		c->free_list[i] = (int32_t)(o->n_pages - 1 - i);
	c->n_free = o->n_pages;
	*out = c;
	return 0;

out_free:
	kvq_kv_destroy(c);
	return ret;
}

void kvq_kv_destroy(struct kvq_kvcache *c)
{
	uint32_t l;

	if (!c)
		return;
	for (l = 0; c->layers && l < c->o.n_layers; l++) {
		free(c->layers[l].k.mem);
		free(c->layers[l].v.mem);
	}
	free(c->layers);
	free(c->centers);
	free(c->moments);
	free(c->center_cs);
	free(c->refcnt);
	free(c->free_list);
	free(c);
}

uint64_t kvq_kv_bytes_per_token(const struct kvq_kvcache *c)
{
	uint64_t per = 0;
	uint32_t l;

	/* Format arithmetic: data plus scales, without page padding. */
	for (l = 0; l < c->o.n_layers; l++) {
		const struct kvq_kv_layer *L = &c->layers[l];

		per += (uint64_t)c->o.n_kv_heads *
		       (L->k.row_bytes + 2 * L->k.n_groups +
			L->v.row_bytes + 2 * L->v.n_groups);
	}
	return per;
}

uint64_t kvq_kv_bytes_used(const struct kvq_kvcache *c)
{
	uint64_t per_page = 0;
	uint32_t l;

	for (l = 0; l < c->o.n_layers; l++)
		per_page += c->layers[l].k.page_bytes +
			    c->layers[l].v.page_bytes;
	return (uint64_t)(c->o.n_pages - c->n_free) * per_page;
}

/* --------------------------------------------------------- sequences */

void kvq_kv_seq_init(struct kvq_kv_seq *s)
{
	memset(s, 0, sizeof(*s));
}

static size_t sink_elems(const struct kvq_kvcache *c)
{
	return (size_t)c->o.n_layers * 2 * c->o.n_sink * c->o.n_kv_heads *
	       c->o.head_dim;
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
	free(s->sink);
	kvq_kv_seq_init(s);
}

static void page_copy(struct kvq_kvcache *c, int32_t dst, int32_t src)
{
	uint32_t l;

	if (c->copy_page) {
		c->copy_page(c->copy_arg, dst, src);
		return;
	}
	for (l = 0; l < c->o.n_layers; l++) {
		struct kvq_kv_half *k = &c->layers[l].k, *v = &c->layers[l].v;

		memcpy(k->mem + dst * k->page_bytes,
		       k->mem + src * k->page_bytes, k->page_bytes);
		memcpy(v->mem + dst * v->page_bytes,
		       v->mem + src * v->page_bytes, v->page_bytes);
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
	if (!s->sink && c->o.n_sink && s->n_tokens < c->o.n_sink) {
		s->sink = calloc(sink_elems(c), sizeof(uint16_t));
		if (!s->sink)
			return -ENOMEM;
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
		int32_t *p = realloc(dst->pages, np * sizeof(*p));

		if (!p)
			return -ENOMEM;
		dst->pages = p;
		dst->cap = np;
	}
	if (src->sink) {
		if (!dst->sink)
			dst->sink = malloc(sink_elems(c) * sizeof(uint16_t));
		if (!dst->sink)
			return -ENOMEM;
		memcpy(dst->sink, src->sink, sink_elems(c) * sizeof(uint16_t));
	}
	for (i = 0; i < np; i++) {
		dst->pages[i] = src->pages[i];
		c->refcnt[src->pages[i]]++;
	}
	dst->n_pages = np;
	dst->n_tokens = n_tokens;
	return 0;
}

/* ------------------------------------------------------- rows of pages */

static inline uint8_t *row_data(const struct kvq_kvcache *c,
				const struct kvq_kv_half *hf, int32_t page,
				uint32_t t, uint32_t h)
{
	return hf->mem + (size_t)page * hf->page_bytes +
	       ((size_t)h * c->o.page_tokens + t) * hf->row_bytes;
}

static inline uint16_t *row_scales(const struct kvq_kvcache *c,
				   const struct kvq_kv_half *hf, int32_t page,
				   uint32_t t, uint32_t h)
{
	size_t hp = (size_t)c->o.n_kv_heads * c->o.page_tokens;

	return (uint16_t *)(hf->mem + (size_t)page * hf->page_bytes +
			    hp * hf->row_bytes) +
	       ((size_t)h * c->o.page_tokens + t) * hf->n_groups;
}

static inline uint16_t *sink_row(const struct kvq_kvcache *c,
				 const struct kvq_kv_seq *s, uint32_t layer,
				 bool v, uint32_t pos)
{
	size_t kvd = (size_t)c->o.n_kv_heads * c->o.head_dim;

	return s->sink + (((size_t)layer * 2 + v) * c->o.n_sink + pos) * kvd;
}

void kvq_kv_rope_cs(uint32_t pos, uint32_t i, uint32_t rope_dim, float base,
		    float *cs, float *sn)
{
	double th = pos * pow(base, -2.0 * i / rope_dim);

	*cs = (float)cos(th);
	*sn = (float)sin(th);
}

/* Channels of rotated pair @i of @rope_dim (neox: i, i + rope_dim / 2). */
static inline void pair_channels(uint32_t rope_dim, bool neox, uint32_t i,
				 uint32_t *a, uint32_t *b)
{
	*a = neox ? i : 2 * i;
	*b = neox ? i + rope_dim / 2 : 2 * i + 1;
}

static inline void pair_of(const struct kvq_kvcache *c, uint32_t i,
			   uint32_t *a, uint32_t *b)
{
	pair_channels(c->o.rope_dim, c->o.rope_neox, i, a, b);
}

/* cs[2i], cs[2i+1]: cos, sin of pair i at @pos. */
static void center_cs_calc(const struct kvq_kvcache *c, uint32_t pos,
			   float *cs)
{
	uint32_t i;

	for (i = 0; i < c->o.rope_dim / 2; i++)
		kvq_kv_rope_cs(pos, i, c->o.rope_dim, c->o.rope_base,
			       &cs[2 * i], &cs[2 * i + 1]);
}

/* The same, from the table where it has @pos; @buf otherwise. */
static const float *center_cs(const struct kvq_kvcache *c, uint32_t pos,
			      float *buf)
{
	if (c->center_cs && pos < c->o.max_pos)
		return c->center_cs + (size_t)pos * c->o.rope_dim;
	center_cs_calc(c, pos, buf);
	return buf;
}

/* y = R_p x for one head's centre @x, with @cs from center_cs(). */
static void center_head(const struct kvq_kvcache *c, const float *x,
			const float *cs, float *y)
{
	uint32_t i, a, b;

	memcpy(y, x, c->o.head_dim * sizeof(float));
	for (i = 0; i < c->o.rope_dim / 2; i++) {
		/* Each product rounded on its own, never fused into a
		 * multiply-add: the GPU append computes the same bits. */
		volatile float p0, p1, p2, p3;

		pair_of(c, i, &a, &b);
		p0 = x[a] * cs[2 * i];
		p1 = x[b] * cs[2 * i + 1];
		p2 = x[a] * cs[2 * i + 1];
		p3 = x[b] * cs[2 * i];
		y[a] = p0 - p1;
		y[b] = p2 + p3;
	}
}

bool kvq_kv_center_at(const struct kvq_kvcache *c, uint32_t layer,
		      uint32_t pos, float *out)
{
	const float *ctr = c->layers[layer].center, *cs;
	uint32_t d = c->o.head_dim, h;
	float buf[KVQ_KV_MAX_HEAD_DIM];

	if (!ctr)
		return false;
	cs = center_cs(c, pos, buf);
	for (h = 0; h < c->o.n_kv_heads; h++)
		center_head(c, ctr + (size_t)h * d, cs, out + (size_t)h * d);
	return true;
}

static int get_code(enum kvq_kv_type t, const uint8_t *data, uint32_t i)
{
	if (t == KVQ_KV_Q8)
		return (int8_t)data[i];
	return (i % 2 ? data[i / 2] >> 4 : data[i / 2] & 15) - 8;
}

static void put_code(enum kvq_kv_type t, uint8_t *data, uint32_t i, int q)
{
	if (t == KVQ_KV_Q8)
		data[i] = (uint8_t)(int8_t)q;
	else if (i % 2)
		data[i / 2] = (uint8_t)((data[i / 2] & 0x0f) | ((q + 8) << 4));
	else
		data[i / 2] = (uint8_t)((data[i / 2] & 0xf0) | (q + 8));
}

void kvq_kv_round_pairs(enum kvq_kv_type t, const float *x, uint32_t d,
			uint32_t group, uint32_t rope_dim, bool neox,
			const float *w, uint8_t *data,
			const uint16_t *scales)
{
	int lo = t == KVQ_KV_Q8 ? -127 : -8, hi = t == KVQ_KV_Q8 ? 127 : 7;
	uint32_t p, i, j;

	if (!is_quant(t))
		return;
	for (p = 0; p < rope_dim / 2; p++) {
		float si, sj, best = 0.0f;
		int q0, q1, b0, b1, a;

		pair_channels(rope_dim, neox, p, &i, &j);
		if (j >= d)
			continue;
		si = kvq_f16_to_f32(scales[i / group]);
		sj = kvq_f16_to_f32(scales[j / group]);
		if (!(si > 0.0f) || !(sj > 0.0f))
			continue;
		q0 = b0 = get_code(t, data, i);
		q1 = b1 = get_code(t, data, j);
		/* the nearest codes, then the eight around them (a tie keeps
		 * the nearest) */
		for (a = 0; a < 10; a++) {
			int c0 = q0 + (a == 0 ? 0 : (a - 1) % 3 - 1);
			int c1 = q1 + (a == 0 ? 0 : (a - 1) / 3 - 1);
			float di, dj, cost;

			if (c0 < lo || c0 > hi || c1 < lo || c1 > hi)
				continue;
			di = x[i] - (float)c0 * si;
			dj = x[j] - (float)c1 * sj;
			cost = w[i] * di * di + w[j] * dj * dj +
			       2.0f * w[d + i] * di * dj;
			if (a == 0 || cost < best) {
				best = cost;
				b0 = c0;
				b1 = c1;
			}
		}
		put_code(t, data, i, b0);
		put_code(t, data, j, b1);
	}
}

/* Stores one half of token @pos; @ctr: subtract R_pos ctr[h] from each
 * head first (key centring), or NULL. */
static void write_half(struct kvq_kvcache *c, struct kvq_kv_half *hf,
		       struct kvq_kv_seq *s, uint32_t layer, bool is_v,
		       uint32_t pos, const float *x, const float *ctr)
{
	uint32_t pt = c->o.page_tokens, d = c->o.head_dim, h, i;
	int32_t page = s->pages[pos / pt];
	bool sink = is_quant(hf->type) && pos < c->o.n_sink && s->sink;
	uint16_t *dst = sink ? sink_row(c, s, layer, is_v, pos) : NULL;
	float buf[KVQ_KV_MAX_HEAD_DIM], row[KVQ_KV_MAX_HEAD_DIM];
	const float *cs = ctr ? center_cs(c, pos, buf) : NULL;

	for (h = 0; h < c->o.n_kv_heads; h++) {
		const float *xh = x + (size_t)h * d;

		if (ctr) {
			center_head(c, ctr + (size_t)h * d, cs, row);
			for (i = 0; i < d; i++)
				row[i] = xh[i] - row[i];
			xh = row;
		}
		kvq_kv_quant_row(hf->type, xh, d, c->group,
				 row_data(c, hf, page, pos % pt, h),
				 hf->n_groups ? row_scales(c, hf, page,
							   pos % pt, h) : NULL);
		if (!is_v && c->layers[layer].moments)
			kvq_kv_round_pairs(hf->type, xh, d, c->group,
					   c->o.rope_dim, c->o.rope_neox,
					   c->layers[layer].moments +
					   (size_t)h * 2 * d,
					   row_data(c, hf, page, pos % pt, h),
					   row_scales(c, hf, page, pos % pt, h));
		for (i = 0; sink && i < d; i++)
			dst[(size_t)h * d + i] = kvq_f32_to_f16(xh[i]);
	}
}

void kvq_kv_write(struct kvq_kvcache *c, struct kvq_kv_seq *s, uint32_t layer,
		  uint32_t pos, const float *k, const float *v)
{
	write_half(c, &c->layers[layer].k, s, layer, false, pos, k,
		   c->layers[layer].center);
	write_half(c, &c->layers[layer].v, s, layer, true, pos, v, NULL);
}

/*
 * Dequantized row, or a pointer straight into the page for f32.
 * Returns the pointer to use (@tmp or the page).
 */
static inline const float *get_row(const struct kvq_kvcache *c,
				   const struct kvq_kv_half *hf,
				   const struct kvq_kv_seq *s, uint32_t layer,
				   bool is_v, int32_t page, uint32_t pos,
				   uint32_t h, float *tmp)
{
	uint32_t pt = c->o.page_tokens, d = c->o.head_dim, i;

	if (pos < c->o.n_sink && s->sink && is_quant(hf->type)) {
		const uint16_t *src = sink_row(c, s, layer, is_v, pos) +
				      (size_t)h * d;

		for (i = 0; i < d; i++)
			tmp[i] = kvq_f16_to_f32(src[i]);
		return tmp;
	}
	if (hf->type == KVQ_KV_F32)
		return (const float *)row_data(c, hf, page, pos % pt, h);
	if (c->simd && kvq_kv_dequant_row_avx2(hf->type,
			row_data(c, hf, page, pos % pt, h),
			hf->n_groups ? row_scales(c, hf, page, pos % pt, h) :
			NULL, d, c->group, tmp))
		return tmp;
	kvq_kv_dequant_row(hf->type, row_data(c, hf, page, pos % pt, h),
			   hf->n_groups ? row_scales(c, hf, page, pos % pt, h) :
			   NULL, d, c->group, tmp);
	return tmp;
}

void kvq_kv_read(const struct kvq_kvcache *c, const struct kvq_kv_seq *s,
		 uint32_t layer, uint32_t pos, uint32_t h, bool v, float *out)
{
	const struct kvq_kv_half *hf = v ? &c->layers[layer].v :
					   &c->layers[layer].k;
	const float *r = get_row(c, hf, s, layer, v,
				 s->pages[pos / c->o.page_tokens], pos, h, out);

	if (r != out)
		memcpy(out, r, c->o.head_dim * sizeof(float));
}

/* ---------------------------------------------------------- attention */



#define CENTER_TERMS 2048	/* floats of query terms on the stack */

/*
 * q . R_p c for @n_q queries as sum_j a[j] cs[j] + a[rd] over
 * center_cs()'s cos/sin list: per pair (ca, cb) a = qa ca + qb cb next to
 * cos, qb ca - qa cb next to sin, and a[rd] = q . c over the channels
 * RoPE leaves.  @ab gets n_q * (rope_dim + 1) floats.
 */
static void center_terms(const struct kvq_kvcache *c, const float *ctr,
			 const float *q, size_t q_stride, uint32_t n_q,
			 float *ab)
{
	uint32_t r = c->o.rope_dim, d = c->o.head_dim, i, j, a, b;

	for (i = 0; i < n_q; i++) {
		const float *qi = q + i * q_stride;
		float *t = ab + (size_t)i * (r + 1), rest = 0.0f;

		for (j = 0; j < r / 2; j++) {
			pair_of(c, j, &a, &b);
			t[2 * j] = qi[a] * ctr[a] + qi[b] * ctr[b];
			t[2 * j + 1] = qi[b] * ctr[a] - qi[a] * ctr[b];
		}
		for (j = r; j < d; j++)	/* both layouts rotate [0, r) */
			rest += qi[j] * ctr[j];
		t[r] = rest;
	}
}

/*
 * Adds the centre each key of a page gave up, scale * q . R_p c, to the
 * scores sc[i][t0..t1) (@pos0: the position of slot t0).  @ab holds every query's terms when @ready, else room
 * for CENTER_TERMS floats: then they are made here, as many queries at a
 * time as fit (rope_dim <= 1024, so at least one).
 */
static void add_center(const struct kvq_kvcache *c, const float *ctr,
		       const float *q, size_t q_stride, uint32_t n_q,
		       float scale, uint32_t pos0, uint32_t t0, uint32_t t1,
		       float (*sc)[KVQ_KV_SC_STRIDE], float *ab, bool ready)
{
	uint32_t rd = c->o.rope_dim, qc = CENTER_TERMS / (rd + 1), i0, i, j, t;
	float buf[KVQ_KV_MAX_HEAD_DIM];

	for (i0 = 0; i0 < n_q; i0 += qc) {
		uint32_t n = n_q - i0 < qc ? n_q - i0 : qc;

		if (!ready)
			center_terms(c, ctr, q + i0 * q_stride, q_stride, n,
				     ab);
		for (t = t0; t < t1; t++) {
			const float *cs = center_cs(c, pos0 + t - t0, buf);

			for (i = 0; i < n; i++) {
				const float *a = ab + (size_t)i * (rd + 1);
				float sum = a[rd];

				for (j = 0; j < rd; j++)
					sum += a[j] * cs[j];
				sc[i0 + i][t] += sum * scale;
			}
		}
	}
}

void kvq_kv_attend(const struct kvq_kvcache *c, const struct kvq_kv_seq *s,
		   uint32_t layer, uint32_t kvh, const float *q,
		   size_t q_stride, uint32_t n_q, float scale, uint32_t n_ctx,
		   float *out, size_t out_stride)
{
	const struct kvq_kv_layer *L = &c->layers[layer];
	uint32_t d = c->o.head_dim, pt = c->o.page_tokens;
	float m[KVQ_KV_MAX_GQA], l[KVQ_KV_MAX_GQA];
	float sc[KVQ_KV_MAX_GQA][KVQ_KV_SC_STRIDE];
	float tmp[KVQ_KV_MAX_HEAD_DIM];
	float ab[CENTER_TERMS];
	const float *ctr = L->center ? L->center + (size_t)kvh * d : NULL;
	/* Every query's centre terms made once, where they fit. */
	bool ready = ctr && (size_t)n_q * (c->o.rope_dim + 1) <= CENTER_TERMS;
	uint32_t pos = 0, i, t, j;
	bool fast;

	/* Options are checked at creation (page_tokens <= 64, head_dim <=
	 * KVQ_KV_MAX_HEAD_DIM) and by the caller (n_q <= KVQ_KV_MAX_GQA). */
	if (ready)
		center_terms(c, ctr, q, q_stride, n_q, ab);
	for (i = 0; i < n_q; i++) {
		m[i] = -INFINITY;
		l[i] = 0.0f;
		memset(out + i * out_stride, 0, d * sizeof(float));
	}
	/* Page by page: scores of the page's tokens, then one rescale of the
	 * running sums, then the weighted values. */
	while (pos < n_ctx) {
		int32_t page = s->pages[pos / pt];
		uint32_t t0 = pos % pt, t1 = pt;

		if (n_ctx - pos < pt - t0)
			t1 = t0 + (n_ctx - pos);
		fast = c->simd && !(s->sink && pos < c->o.n_sink);
		if (!fast || !kvq_kv_page_scores_avx2(L->k.type,
				row_data(c, &L->k, page, 0, kvh),
				L->k.n_groups ? row_scales(c, &L->k, page, 0, kvh) : NULL,
				L->k.n_groups, L->k.row_bytes, d, t0, t1, q,
				q_stride, n_q, scale, &sc[0][0])) {
			for (t = t0; t < t1; t++) {
				const float *kr = get_row(c, &L->k, s, layer,
							  false, page,
							  pos + t - t0, kvh, tmp);

				for (i = 0; i < n_q; i++)
					sc[i][t] = kvq_dot_f32(q + i * q_stride,
							       kr, d) * scale;
			}
		}
		if (ctr)
			add_center(c, ctr, q, q_stride, n_q, scale, pos, t0, t1,
				   sc, ab, ready);
		for (i = 0; i < n_q; i++) {
			float mx = m[i], a;

			for (t = t0; t < t1; t++)
				mx = sc[i][t] > mx ? sc[i][t] : mx;
			a = expf(m[i] - mx);	/* 0 on the first page */
			if (a != 1.0f) {
				float *o = out + i * out_stride;

				for (j = 0; j < d; j++)
					o[j] *= a;
				l[i] *= a;
			}
			m[i] = mx;
			if (fast) {
				l[i] += kvq_kv_exp_sum_avx2(&sc[i][t0], t1 - t0, mx);
				continue;
			}
			for (t = t0; t < t1; t++) {
				sc[i][t] = expf(sc[i][t] - mx);
				l[i] += sc[i][t];
			}
		}
		if (fast && kvq_kv_page_values_avx2(L->v.type,
				row_data(c, &L->v, page, 0, kvh),
				L->v.n_groups ? row_scales(c, &L->v, page, 0, kvh) : NULL,
				L->v.n_groups, L->v.row_bytes, d, t0, t1,
				&sc[0][0], n_q, out, out_stride)) {
			pos += t1 - t0;
			continue;
		}
		for (t = t0; t < t1; t++) {
			const float *vr = get_row(c, &L->v, s, layer, true,
						  page, pos + t - t0, kvh, tmp);

			for (i = 0; i < n_q; i++) {
				float w = sc[i][t], *o = out + i * out_stride;

				for (j = 0; j < d; j++)
					o[j] += w * vr[j];
			}
		}
		pos += t1 - t0;
	}
	for (i = 0; i < n_q; i++) {
		float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f, *o;

		o = out + i * out_stride;
		for (j = 0; j < d; j++)
			o[j] *= inv;
	}
}
