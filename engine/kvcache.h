/*
 * kvcache.h - the paged, quantized KV cache.
 *
 * Why this file exists: long contexts and many concurrent sequences are
 * made of KV pages, and every decode step reads all of a sequence's pages,
 * so their size is the decode speed.  The cache is a pool of fixed-size
 * pages; a page id addresses page_tokens consecutive tokens of one sequence
 * in EVERY layer (each layer has its own page arrays for K and for V,
 * indexed by the same id), so a run of pages of a sequence is one movable
 * chunk across all layers.  Sequences own a block table of page ids; pages
 * carry reference counts so sequences with a common prefix share them
 * read-only and copy on write.
 *
 * Precision is chosen per layer and separately for K and V:
 *   f32  4 bytes a value (exact; reference runs)
 *   f16  IEEE half
 *   q8   int8, symmetric, one f16 scale amax/127 per group
 *   q4   int4, symmetric, one f16 scale amax/7 per group, stored q+8 (q is
 *        clamped to [-8, 7]), two values a byte, the even channel in the
 *        low nibble
 * A group is 32 consecutive channels of one head of one token, or the whole
 * head when head_dim < 32 (head_dim must then divide evenly: 32 % hd == 0
 * is not needed, the group is simply head_dim).
 *
 * Byte layout of one page of one layer's K (V is the same with its type),
 * P = page_tokens, H = n_kv_heads, D = head_dim, G = group, R = row bytes
 * (f32: 4D, f16: 2D, q8: D, q4: D/2):
 *
 *   offset 0:            data[h][t] rows of R bytes, h < H, t < P
 *                        (a head's P tokens are contiguous: P*R bytes)
 *   offset H*P*R:        scales[h][t][g], f16, g < D/G   (q8 and q4 only)
 *
 * Page bytes = H*P*R + H*P*(D/G)*2 for q8/q4, H*P*R otherwise, rounded
 * up to a multiple of 64 so that every page starts 64-byte aligned.
 *
 * Sink tokens: the first n_sink positions of a sequence are also kept in
 * f16 beside the sequence (not in the shared page), and layers whose K or
 * V is quantized read those positions from there.
 *
 * Key centring.  A model's keys may carry a large vector that is nearly
 * the same for every token before RoPE (a learned position bias: the slow
 * pairs of stories260K's heads hold 13-19 against a spread of 3-4).  In a
 * q4/q8 group it sets the one scale and swamps what varies.  With a centre
 * c per layer and KV head (pre-RoPE, calibrated: kvsmooth.c), a layer whose
 * K is q8/q4 stores k - R_p c instead of the rotated key k of position p
 * (R_p: RoPE's rotation at p; the sink copies too), and attention adds
 * q . R_p c back into every score, so each score is q . k as before up to
 * rounding.  R_p c rotates each pair (a, b) of c, (2i, 2i+1) or (i, i +
 * rope_dim/2) for neox, by the angle p th_i, th_i = base^(-2i / rope_dim):
 *   (c_a cos - c_b sin, c_a sin + c_b cos)
 * with cos and sin as the CPU RoPE computes them (double, rounded to
 * float: kvq_kv_rope_cs()); channels past rope_dim are c as it is.
 * Nothing changes in the page format: kvq_kv_read() returns what is stored
 * (the centred key).
 */
#ifndef KVQ_KVCACHE_H
#define KVQ_KVCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum kvq_kv_type {
	KVQ_KV_F32 = 0,
	KVQ_KV_F16 = 1,
	KVQ_KV_Q8 = 2,
	KVQ_KV_Q4 = 3,
	KVQ_KV_NTYPES = 4,
};

/* "f32", "f16", "q8", "q4". */
const char *kvq_kv_type_name(enum kvq_kv_type t);
/* Parses a name; -EINVAL when unknown. */
int kvq_kv_type_parse(const char *s, enum kvq_kv_type *out);

#define KVQ_KV_MAX_LAYERS 256
#define KVQ_KV_MAX_HEAD_DIM 1024
#define KVQ_KV_MAX_GQA 64	/* query heads per KV head */

/*
 * kvq_kv_types_parse() - a precision setting: one name for every layer
 * ("q4"), or a comma-separated list with exactly @n_layers names.  Fills
 * @out[0..n_layers).  Returns 0; 1 when the setting is "auto" (@out
 * untouched: the caller calibrates); -EINVAL with a message in @err.
 */
int kvq_kv_types_parse(const char *spec, uint32_t n_layers, uint8_t *out,
		       char *err, size_t errlen);

struct kvq_kv_opts {
	uint32_t n_layers;
	uint32_t n_kv_heads;
	uint32_t head_dim;
	uint32_t page_tokens;	/* 0: 16 */
	uint32_t n_pages;
	uint32_t n_sink;	/* f16 sink tokens (<= page_tokens) */
	uint8_t type_k[KVQ_KV_MAX_LAYERS];	/* enum kvq_kv_type */
	uint8_t type_v[KVQ_KV_MAX_LAYERS];
	/* Key centres [layer][kv head][head_dim] (copied), or NULL; used by
	 * layers whose K is q8/q4.  With them, RoPE's rope_dim, base and
	 * layout (neox: pairs (i, i + rope_dim/2), else (2i, 2i+1)). */
	const float *k_center;
	/* The queries' second moments a KV head ([layer][kv head][2 *
	 * head_dim]: W[c][c] at c, W[c][c'] at head_dim + c for c' = c's RoPE
	 * partner; copied), or NULL: keys of q8/q4 layers then take, per
	 * rotated pair, the codes (each within one of the nearest) whose
	 * error d minimises d^T W d -- the error as those queries read it --
	 * instead of the nearest codes.  Same format, same scales. */
	const float *k_moments;
	uint32_t max_pos;	/* positions a sequence reaches (0: unknown):
				 * with centres, their cos/sin are tabled */
	uint32_t rope_dim;
	float rope_base;
	bool rope_neox;
};

struct kvq_kv_half {
	enum kvq_kv_type type;
	uint32_t row_bytes;	/* data bytes of one token of one head */
	uint32_t n_groups;	/* scale groups per head (0 for f32/f16) */
	size_t page_bytes;
	uint8_t *mem;		/* n_pages * page_bytes */
};

struct kvq_kv_layer {
	struct kvq_kv_half k, v;
	const float *center;	/* [kv head][head_dim], NULL: not centred */
	const float *moments;	/* [kv head][2 * head_dim], or NULL */
};

struct kvq_kvcache {
	struct kvq_kv_opts o;
	uint32_t group;		/* channels per scale group */
	bool simd;		/* AVX2 row paths (false: the scalar twin) */
	struct kvq_kv_layer *layers;
	float *centers;		/* owned copy of o.k_center, or NULL */
	float *moments;		/* owned copy of o.k_moments, or NULL */
	float *center_cs;	/* [max_pos][rope_dim]: kvq_kv_rope_cs() */
	int32_t *refcnt;	/* per page; 0 = free */
	int32_t *free_list;	/* stack of free page ids */
	uint32_t n_free;
	/* Where the page bytes live elsewhere (a GPU backend keeps them in
	 * device memory and the host arrays stay untouched, never faulted
	 * in), a copy on write calls this instead of copying host bytes. */
	void (*copy_page)(void *arg, int32_t dst, int32_t src);
	void *copy_arg;
};

/* A sequence's block table and its f16 sink copies. */
struct kvq_kv_seq {
	int32_t *pages;
	uint32_t n_pages;
	uint32_t cap;
	uint32_t n_tokens;
	uint16_t *sink;		/* [layer][k|v][n_sink][H*D] f16, or NULL */
};

/*
 * kvq_kv_create() - allocate the pool.  Returns 0, -EINVAL for bad options
 * (an unknown type, head_dim not a multiple of the group), -ENOMEM.
 */
int kvq_kv_create(const struct kvq_kv_opts *o, struct kvq_kvcache **out);
void kvq_kv_destroy(struct kvq_kvcache *c);

/* Bytes one token occupies over all layers (K and V, data and scales). */
uint64_t kvq_kv_bytes_per_token(const struct kvq_kvcache *c);
/* Bytes of pages in use. */
uint64_t kvq_kv_bytes_used(const struct kvq_kvcache *c);

void kvq_kv_seq_init(struct kvq_kv_seq *s);
/* Releases every page reference of @s and empties it. */
void kvq_kv_seq_release(struct kvq_kvcache *c, struct kvq_kv_seq *s);
/*
 * Makes room for @n more tokens (allocating pages; copying a shared last
 * page before it is written).  Returns 0, or -ENOSPC / -ENOMEM with the
 * token count unchanged.  The tokens count once kvq_kv_seq_commit()ed.
 */
int kvq_kv_seq_reserve(struct kvq_kvcache *c, struct kvq_kv_seq *s,
		       uint32_t n);
void kvq_kv_seq_commit(struct kvq_kv_seq *s, uint32_t n);
/* Drops tokens from @pos on; pos == n_tokens releases pages reserved but
 * never committed. */
void kvq_kv_seq_truncate(struct kvq_kvcache *c, struct kvq_kv_seq *s,
			 uint32_t pos);
/* Makes empty @dst share @src's first @n_tokens (pages reference counted;
 * a partial last page is copied when either side writes into it). */
int kvq_kv_seq_fork(struct kvq_kvcache *c, struct kvq_kv_seq *dst,
		    const struct kvq_kv_seq *src, uint32_t n_tokens);

/*
 * kvq_kv_write() - store token @pos's K and V (H*D floats each, K already
 * rotated) into @layer, quantizing to the layer's types.  The page must be
 * reserved.
 */
void kvq_kv_write(struct kvq_kvcache *c, struct kvq_kv_seq *s, uint32_t layer,
		  uint32_t pos, const float *k, const float *v);

/*
 * kvq_kv_read() - dequantize token @pos, head @h of @layer's K (@v false)
 * or V into @out (D floats), exactly as attention sees it.
 */
void kvq_kv_read(const struct kvq_kvcache *c, const struct kvq_kv_seq *s,
		 uint32_t layer, uint32_t pos, uint32_t h, bool v, float *out);

/*
 * kvq_kv_attend() - attention of @n_q query heads that share KV head @kvh
 * (GQA) over positions [0, n_ctx) of @s in @layer: out[i] = softmax(q[i] .
 * K^T * scale) V, online softmax in f32, dequantizing inside the loop.
 * @q and @out hold n_q rows of head_dim floats; @q_stride / @out_stride
 * are the distances between rows.
 */
void kvq_kv_attend(const struct kvq_kvcache *c, const struct kvq_kv_seq *s,
		   uint32_t layer, uint32_t kvh, const float *q,
		   size_t q_stride, uint32_t n_q, float scale, uint32_t n_ctx,
		   float *out, size_t out_stride);

/*
 * kvq_kv_rope_cs() - cos and sin of RoPE's angle for rotated pair @i at
 * position @pos, exactly as the CPU backend's RoPE computes them: in double,
 * pos * base^(-2i / rope_dim), each rounded to float.
 */
void kvq_kv_rope_cs(uint32_t pos, uint32_t i, uint32_t rope_dim, float base,
		    float *cs, float *sn);

/*
 * kvq_kv_center_at() - R_pos c for every KV head of centred @layer (H*D
 * floats into @out): what kvq_kv_write() subtracts from the key of @pos.
 * false (nothing written) when the layer is not centred.
 */
bool kvq_kv_center_at(const struct kvq_kvcache *c, uint32_t layer,
		      uint32_t pos, float *out);

/* Quantize / dequantize one head row of D values (exposed for tests and
 * for the GPU reference twins).  @data gets row_bytes, @scales n_groups
 * f16 values. */
void kvq_kv_quant_row(enum kvq_kv_type t, const float *x, uint32_t d,
		      uint32_t group, uint8_t *data, uint16_t *scales);
void kvq_kv_dequant_row(enum kvq_kv_type t, const uint8_t *data,
			const uint16_t *scales, uint32_t d, uint32_t group,
			float *out);
/*
 * Re-chooses the codes of a q8/q4 head row @x that kvq_kv_quant_row()
 * stored (@data, @scales unchanged): per rotated pair (c, c') -- (2i,
 * 2i+1), or (i, i + rope_dim/2) for neox -- the codes within one of the
 * stored ones whose error minimises the 2x2 form of @w (2 d floats, as
 * kvq_kv_opts.k_moments).  Ties keep the nearer codes.
 */
void kvq_kv_round_pairs(enum kvq_kv_type t, const float *x, uint32_t d,
			uint32_t group, uint32_t rope_dim, bool neox,
			const float *w, uint8_t *data,
			const uint16_t *scales);

#endif /* KVQ_KVCACHE_H */
