/*
 * attn.h - the plain-C face of the GPU decode-attention and KV-append
 * kernels (kernels/attn_decode.cu, kernels/attn_append.cu).
 *
 * Why this file exists: the GPU backend reads and writes kvqd's paged KV
 * cache (engine/kvcache.h) in place.  Callers hand over device pointers to
 * one layer's K and V page pools, the block tables and the sequence
 * lengths; no CUDA or HIP type appears here.  Every function returns 0 or
 * -errno and changes nothing on failure, except where it says otherwise.
 *
 * Formats are those of engine/kvcache.h, byte for byte: a page of P tokens
 * holds data[h][t] rows, then f16 scales[h][t][g] for q8/q4; page_bytes is
 * the engine's (64-byte multiple).  The plain-C twins are kvq_kv_attend()
 * and kvq_kv_write() in engine/kvcache.c (and kvq_attn_ref_rope() in
 * kernels/attn_ref.c for the rotation).
 */
#ifndef KVQ_ATTN_H
#define KVQ_ATTN_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

/* Callers include config.h first; the kernels themselves are compiled by
 * nvcc or hipcc. */
#if defined(KVQ_HAVE_CUDA) || defined(KVQ_HAVE_HIP) || \
	defined(__CUDACC__) || defined(__HIPCC__)
#define KVQ_ATTN_GPU 1
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of q / out / new k and v rows. */
enum kvq_gpu_dtype {
	KVQ_GPU_F32 = 0,
	KVQ_GPU_F16 = 1,
};

/*
 * One decode-attention launch: every sequence of the batch attends with
 * one query token over positions [0, seq_lens[b]) of one layer.
 *
 * Query head i uses KV head i / (n_q_heads / n_kv_heads).  Supported:
 * head_dim 64 or 128; page_tokens 16 times a power of two; K and V types
 * f16, q8, q4 in any pair (f32 pages are not read here: -EOPNOTSUPP).
 */
struct kvq_gpu_append_args;

struct kvq_gpu_attn_args {
	const void *q;		/* [batch][n_q_heads][head_dim], q_type */
	void *out;		/* [batch][n_q_heads][head_dim], out_type */
	int q_type, out_type;	/* enum kvq_gpu_dtype */

	const void *k_pages;	/* one layer's K pool: n_pages * k_page_bytes */
	const void *v_pages;
	size_t k_page_bytes, v_page_bytes;
	int k_type, v_type;	/* enum kvq_kv_type */

	const int32_t *block_table;	/* [batch][bt_stride] page ids */
	uint32_t bt_stride;
	const int32_t *seq_lens;	/* [batch] tokens attended, device */
	uint32_t max_len;	/* host-side bound on seq_lens (split plan) */

	/*
	 * Sink tokens: sink[b] points at sequence b's f16 copies for this
	 * layer, [k|v][n_sink][n_kv_heads * head_dim] (the layer's slice of
	 * struct kvq_kv_seq.sink), or is NULL.  Positions below n_sink of a
	 * quantized K (V) are read from there, as kvq_kv_attend() does.  A
	 * NULL array means no sequence has sinks.
	 */
	const uint16_t *const *sink;
	uint32_t n_sink;

	uint32_t batch, n_q_heads, n_kv_heads, head_dim, page_tokens;
	float scale;		/* usually 1/sqrt(head_dim) */

	/* Device scratch of kvq_gpu_attn_workspace_bytes(); zero-filled
	 * once before first use, the kernel leaves it zeroed. */
	void *workspace;
	size_t workspace_bytes;

	/*
	 * Optional (sm_90 decode step): the same call first appends each
	 * sequence's new token, as kvq_gpu_attn_append(@append) would store
	 * it, bit for bit: row b of append->k and ->v is sequence b's token
	 * at position seq_lens[b] - 1 (append->row_seq and ->row_pos are not
	 * read; rope_cs, when given, has a row a sequence).  The pages, page
	 * types, sinks and shape must be this call's; no key centring.  The
	 * warp that reads the new row stores it, so no launch stands between
	 * the step's K and V and its attention.
	 */
	const struct kvq_gpu_append_args *append;
};

/*
 * kvq_gpu_attn_workspace_bytes() - device scratch @a needs (split-KV
 * partial results and merge counters), from its shape fields and max_len.
 * Returns 0 only for an unsupported shape.
 */
#ifdef KVQ_ATTN_GPU
size_t kvq_gpu_attn_workspace_bytes(const struct kvq_gpu_attn_args *a);
#else
static inline size_t
kvq_gpu_attn_workspace_bytes(const struct kvq_gpu_attn_args *a)
{
	(void)a;
	return 0;
}
#endif

/*
 * kvq_gpu_attn_decode() - launch decode attention on @stream (a
 * cudaStream_t / hipStream_t, NULL for the default stream).  Returns 0
 * once queued; -EINVAL for inconsistent arguments, -EOPNOTSUPP for shapes
 * or types this kernel does not cover, -ENOSPC when the workspace is too
 * small, -EIO when the launch fails.  @a->out is written by the kernel
 * (every element, also for sequences of length 0, which get zeros).
 */
#ifdef KVQ_ATTN_GPU
int kvq_gpu_attn_decode(const struct kvq_gpu_attn_args *a, void *stream);
#else
static inline int kvq_gpu_attn_decode(const struct kvq_gpu_attn_args *a,
				      void *stream)
{
	(void)a;
	(void)stream;
	return -ENOSYS;
}
#endif

/*
 * One append launch: RoPE on each new key row, then K and V quantized
 * exactly as kvq_kv_quant_row() does and stored at their positions (and
 * the f16 sink copies for positions below n_sink of a quantized type, as
 * kvq_kv_write() does).  The pages must be reserved.  Supported: page
 * types f32, f16, q8, q4; head_dim a multiple of 32 (up to 512), or 4, 8
 * or 16 (one scale group per head).
 */
struct kvq_gpu_append_args {
	const void *k;		/* [n_rows][n_kv_heads * head_dim], not rotated */
	const void *v;
	int in_type;		/* enum kvq_gpu_dtype */
	uint32_t n_rows;
	const int32_t *row_seq;	/* [n_rows] sequence index; NULL: row i is seq i */
	const int32_t *row_pos;	/* [n_rows] position in its sequence */

	void *k_pages, *v_pages;
	size_t k_page_bytes, v_page_bytes;
	int k_type, v_type;
	const int32_t *block_table;
	uint32_t bt_stride;
	uint16_t *const *sink;	/* as in kvq_gpu_attn_args, or NULL */
	uint32_t n_sink;

	uint32_t n_kv_heads, head_dim, page_tokens;
	uint32_t rope_dim;	/* rotated channels per head (even, <= head_dim) */
	float rope_base;
	int rope_neox;		/* half-split pairs instead of adjacent pairs */
	/*
	 * Optional [n_rows][rope_dim / 2][2] (cos, sin) as f32, computed on
	 * the host by kvq_attn_ref_rope_table(); the rotation is then
	 * bit-identical to the CPU engine's.  NULL: the kernel computes the
	 * angles itself in double precision (the same formula; a cos/sin
	 * may differ in the last float bit in rare cases).
	 */
	const float *rope_cs;
	/*
	 * Key centring (engine/kvcache.h), or NULL: this layer's centres,
	 * [n_kv_heads][head_dim] f32 on the device, pre-RoPE.  R_pos c,
	 * rotated with the key's own cos and sin (rope_cs, or the kernel's
	 * angles), is subtracted from each rotated key before it is
	 * quantized and before its f16 sink copy, as kvq_kv_write() does
	 * for a layer whose kvq_kv_layer.center is set.
	 */
	const float *k_center;
};

/* kvq_gpu_attn_append() - launch the append on @stream.  Returns 0 once
 * queued, -EINVAL / -EOPNOTSUPP / -EIO as kvq_gpu_attn_decode().
 * Without a GPU backend in the build, both launchers return -ENOSYS. */
#ifdef KVQ_ATTN_GPU
int kvq_gpu_attn_append(const struct kvq_gpu_append_args *a, void *stream);
#else
static inline int kvq_gpu_attn_append(const struct kvq_gpu_append_args *a,
				      void *stream)
{
	(void)a;
	(void)stream;
	return -ENOSYS;
}
#endif

/*
 * Split-KV attention (kernels/attn_split.cu) of n_rows query rows: row r
 * belongs to batch entry row_seq[r] and attends causally over its
 * positions [0, row_pos[r]].  Serves every page type and head sizes 8 to
 * 256 (a power of two) with up to 16 query heads per KV head (8 at 256):
 * prompts, and decode where kvq_gpu_attn_decode() does not apply (also
 * every layer with centred keys: that kernel has no centring).  q and
 * out are f32, q already rotated; sink and block table as for decode.
 */
struct kvq_gpu_split_args {
	const float *q;		/* [n_rows][q_stride] */
	uint32_t q_stride;
	float *out;		/* [n_rows][out_stride] */
	uint32_t out_stride;
	const void *k_pages, *v_pages;
	size_t k_page_bytes, v_page_bytes;
	int k_type, v_type;	/* enum kvq_kv_type */
	const int32_t *row_seq, *row_pos;	/* [n_rows], device */
	const int32_t *block_table;
	uint32_t bt_stride;
	uint16_t *const *sink;	/* per batch entry, this layer's copies */
	uint32_t n_sink;
	uint32_t n_rows, n_q_heads, n_kv_heads, head_dim, page_tokens;
	uint32_t max_len;	/* host bound on row_pos + 1 (split plan) */
	float *workspace;	/* kvq_gpu_attn_split_workspace_bytes() */
	size_t workspace_bytes;
	/*
	 * Key centring (engine/kvcache.h), or NULL: the centres the append
	 * took off this layer's keys ([n_kv_heads][head_dim] f32, device).
	 * Each score then gets scale * (q . R_p c) back, with RoPE's
	 * rope_dim (even, <= head_dim; 0: no channel rotated), rope_base and
	 * layout, cos and sin of position p computed on the device in double
	 * as kvq_kv_rope_cs() does.  Centred layers take kernels of their
	 * own that read the page types at run time (slower than the typed
	 * ones at head_dim 64 and 128).
	 */
	const float *k_center;
	uint32_t rope_dim;
	float rope_base;
	int rope_neox;
};

/* Device scratch for up to @max_rows rows; 0 for a shape the kernel does
 * not serve. */
#ifdef KVQ_ATTN_GPU
size_t kvq_gpu_attn_split_workspace_bytes(uint32_t max_rows,
					  uint32_t n_q_heads,
					  uint32_t n_kv_heads,
					  uint32_t head_dim);
/* Launches it on @stream: 0, -EINVAL, -EOPNOTSUPP, -ENOSPC, -EIO. */
int kvq_gpu_attn_split(const struct kvq_gpu_split_args *a, void *stream);

/*
 * Prompt attention on tensor cores (kernels/attn_prefill.cu), the same
 * arguments and results as kvq_gpu_attn_split(): every row attends
 * causally over [0, row_pos[r]] of its sequence, each K/V tile read once
 * for up to 64 rows x query heads of a KV head.  Serves head_dim 64 and
 * 128, 1 to 8 query heads per KV head, f16, q8 and q4 pages in any pair,
 * sinks, any page size, rows of several sequences (best where each
 * sequence's rows are consecutive entries at consecutive positions).
 * The workspace (kvq_gpu_attn_split_workspace_bytes()) lets short prompts
 * split their positions over more blocks; any size, also none, works.
 * Matches kvq_kv_attend() to within f32 rounding (attn_prefill.cu says
 * why).
 *
 * kvq_gpu_attn_prefill_refusal() - why kvq_gpu_attn_prefill() answers
 * -EOPNOTSUPP for @a (a constant string: a shape, a page type, centred
 * keys, the device or the backend), or NULL when it serves @a.
 *
 * kvq_gpu_attn_prefill() - launches on @stream.  Returns 0 once queued;
 * -EINVAL for inconsistent arguments, -EOPNOTSUPP where the refusal above
 * says why (nothing is launched: call kvq_gpu_attn_split() instead),
 * -EIO when a launch fails.
 */
const char *kvq_gpu_attn_prefill_refusal(const struct kvq_gpu_split_args *a);
int kvq_gpu_attn_prefill(const struct kvq_gpu_split_args *a, void *stream);
#endif

/* ------------------------------------------------ plain-C reference twins */

/*
 * kvq_attn_ref_rope_table() - (cos, sin) pairs of @n positions for
 * rope_dim channels, exactly as the CPU engine computes them: @cs gets
 * n * rope_dim/2 pairs.
 */
void kvq_attn_ref_rope_table(const uint32_t *pos, uint32_t n,
			     uint32_t rope_dim, float base, float *cs);

/*
 * kvq_attn_ref_rope() - rotates @n_heads heads of @head_dim floats of one
 * row in place with one position's table @cs (from the function above),
 * with the same float operations as the CPU engine and the GPU kernel.
 */
void kvq_attn_ref_rope(float *x, uint32_t n_heads, uint32_t head_dim,
		       uint32_t rope_dim, int neox, const float *cs);

#ifdef __cplusplus
}
#endif

#endif /* KVQ_ATTN_H */
