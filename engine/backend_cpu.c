/*
 * backend_cpu.c - the CPU implementation of the backend ops table.
 *
 * Why this file exists: it is the reference every other backend is compared
 * with, and the backend a host without a GPU runs.  Work is split over the
 * thread pool by rows (matrix products) or by (token, head) (attention);
 * the per-element math lives in engine/quant.c (dot products per tensor
 * type) and engine/kvcache.c (attention over pages).  Matrix-vector
 * products are exact unless the int8 dot mode is on (kvq_quant_dot_mode()).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/gemm.h"
#include "engine/gguf.h"
#include "engine/kvcache.h"
#include "engine/log.h"
#include "engine/quant.h"
#include "engine/threadpool.h"

/* ------------------------------------------------------------- matmul */

struct mm_job {
	struct kvq_weight *w;
	const void *data;
	const float *x;
	const uint8_t *xq;	/* x as int8 blocks, or NULL: exact path */
	size_t xq_bytes;	/* per token */
	float *y;
	uint32_t n_tok;
	uint64_t row_bytes;
};

/*
 * Up to this many tokens (decode steps, small batches of sequences), the
 * int8 dot mode (kvq_quant_dot_mode()) dots each row with every token in
 * turn while the row is in L1; longer batches (prompts) keep the exact
 * path, dequantization and the f32 GEMM.
 */
#define MM_INT8_MAX_TOK 8

/* Multiply-adds below which a product runs on the calling thread alone. */
#define MM_INLINE_MACS (128 * 1024)

/* Up to this many tokens the exact path also dots rows token by token
 * (measured on 2 cores: faster than dequantizing for the GEMM below 6). */
#define MM_SMALL_TOK 5

/* Rows are split in multiples of 4 so neighbouring threads do not share
 * output cache lines at one token. */
static void mm_range(uint32_t rows, int i, int n, uint32_t *r0, uint32_t *r1)
{
	uint32_t per = (rows + n - 1) / n;

	per = (per + 3) & ~3u;
	*r0 = per * i < rows ? per * i : rows;
	*r1 = *r0 + per < rows ? *r0 + per : rows;
}

static void mm_worker(void *ctx, int i, int n)
{
	struct mm_job *j = ctx;
	uint32_t cols = j->w->cols, rows = j->w->rows;
	uint32_t type = j->w->type;
	const uint8_t *base = j->data;
	uint32_t r0, r1, r, t, rb, tb;
	float *tmp = NULL;

	mm_range(rows, i, n, &r0, &r1);
	if (r0 >= r1)
		return;
	if (j->xq) {
		for (r = r0; r < r1; r++)
			for (t = 0; t < j->n_tok; t++)
				j->y[(size_t)t * rows + r] = kvq_vec_dot_q8act(
					type, base + r * j->row_bytes,
					j->xq + t * j->xq_bytes, cols);
		return;
	}
	if (j->n_tok == 1) {
		for (r = r0; r < r1; r++)
			j->y[r] = kvq_vec_dot(type, base + r * j->row_bytes,
					      j->x, cols);
		return;
	}
	/* A few tokens: each row is read once and dotted with each token
	 * while it is in L1 (the blocked GEMM needs 3 tokens a block). */
	if (j->n_tok <= MM_SMALL_TOK) {
		for (r = r0; r < r1; r++)
			for (t = 0; t < j->n_tok; t++)
				j->y[(size_t)t * rows + r] = kvq_vec_dot(
					type, base + r * j->row_bytes,
					j->x + (size_t)t * cols, cols);
		return;
	}
	/*
	 * Prompt tokens: dequantize a block of rows once (sized to stay in
	 * L2), then multiply it with every token through the blocked kernel.
	 */
	rb = (uint32_t)(256 * 1024 / ((size_t)cols * sizeof(float)));
	rb = rb < 4 ? 4 : rb > 64 ? 64 : rb & ~3u;
	tb = (uint32_t)(384 * 1024 / ((size_t)cols * sizeof(float)));
	tb = tb < 6 ? 6 : tb - tb % 3;
	if (type != KVQ_TYPE_F32) {
		tmp = malloc((size_t)rb * cols * sizeof(float));
		if (!tmp) {
			/* Without scratch, dot each row in place. */
			for (r = r0; r < r1; r++)
				for (t = 0; t < j->n_tok; t++)
					j->y[(size_t)t * rows + r] = kvq_vec_dot(
						type, base + r * j->row_bytes,
						j->x + (size_t)t * cols, cols);
			return;
		}
	}
	for (r = r0; r < r1; r += rb) {
		uint32_t nb = r1 - r < rb ? r1 - r : rb, k;
		const float *wr = (const float *)(base + r * j->row_bytes);

		if (tmp) {
			for (k = 0; k < nb; k++)
				kvq_dequant_row(type,
						base + (r + k) * j->row_bytes,
						tmp + (size_t)k * cols, cols);
			wr = tmp;
		}
		/* Tokens in chunks that stay in L2 beside the row block. */
		for (t = 0; t < j->n_tok; t += tb) {
			uint32_t nt = j->n_tok - t < tb ? j->n_tok - t : tb;

			kvq_gemm_f32(wr, cols, nb, j->x + (size_t)t * cols,
				     cols, nt, j->y + (size_t)t * rows + r,
				     rows, cols);
		}
	}
	free(tmp);
}

/*
 * In the int8 dot mode, quantize the n_tok input vectors once for all
 * threads; returns the buffer (the caller frees it) or NULL for the exact
 * path: another mode, a type without int8 kernels, too many tokens, or no
 * memory.
 */
static uint8_t *mm_quantize_x(struct mm_job *j)
{
	uint32_t cols = j->w->cols, t;
	uint8_t *buf;

	if (j->n_tok > MM_INT8_MAX_TOK || cols % 32 ||
	    kvq_quant_dot_mode() != KVQ_DOT_INT8 ||
	    !kvq_q8act_supported(j->w->type))
		return NULL;
	j->xq_bytes = kvq_act_q8_bytes(cols);
	buf = malloc(j->xq_bytes * j->n_tok);
	if (!buf)
		return NULL;
	for (t = 0; t < j->n_tok; t++)
		kvq_quantize_act_q8(j->x + (size_t)t * cols, cols,
				    buf + t * j->xq_bytes);
	return buf;
}

static void cpu_matmul(struct kvq_backend *be, struct kvq_weight *w,
		       const float *x, float *y, uint32_t n_tok)
{
	struct mm_job j = {
		.w = w, .x = x, .y = y, .n_tok = n_tok,
		.row_bytes = kvq_type_row_bytes(w->type, w->cols),
	};
	uint8_t *xq = mm_quantize_x(&j);

	j.xq = xq;
	j.data = kvq_weight_get(w);
	/* A product this small costs less than waking the pool. */
	if ((uint64_t)w->rows * w->cols * n_tok < MM_INLINE_MACS)
		mm_worker(&j, 0, 1);
	else
		kvq_pool_run(be->pool, mm_worker, &j);
	kvq_weight_put(w);
	free(xq);
}

/* ------------------------------------------------------- element-wise */

static void cpu_rmsnorm(struct kvq_backend *be, const float *x,
			const float *g, float *y, uint32_t n_tok, uint32_t dim,
			float eps)
{
	uint32_t t, i;

	for (t = 0; t < n_tok; t++) {
		const float *xr = x + (size_t)t * dim;
		float *yr = y + (size_t)t * dim;
		double ss = 0.0;
		float s;

		for (i = 0; i < dim; i++)
			ss += (double)xr[i] * xr[i];
		s = (float)(1.0 / sqrt(ss / dim + eps));
		for (i = 0; i < dim; i++)
			yr[i] = xr[i] * s * g[i];
	}
}

static void cpu_rope(struct kvq_backend *be, float *x, const uint32_t *pos,
		     uint32_t n_tok, uint32_t n_heads, uint32_t head_dim,
		     uint32_t rope_dim, float base, bool neox)
{
	uint32_t half = rope_dim / 2, t, h, i;
	/* rope_dim <= head_dim <= KVQ_KV_MAX_HEAD_DIM (checked at context
	 * creation): the cos/sin table fits on the stack. */
	float cs[KVQ_KV_MAX_HEAD_DIM];
	for (t = 0; t < n_tok; t++) {
		float *row = x + (size_t)t * n_heads * head_dim;

		for (i = 0; i < half; i++) {
			double th = pos[t] * pow(base, -2.0 * i / rope_dim);

			cs[2 * i] = (float)cos(th);
			cs[2 * i + 1] = (float)sin(th);
		}
		for (h = 0; h < n_heads; h++) {
			float *v = row + (size_t)h * head_dim;

			for (i = 0; i < half; i++) {
				uint32_t a = neox ? i : 2 * i;
				uint32_t b = neox ? i + half : 2 * i + 1;
				float x0 = v[a], x1 = v[b];
				float c = cs[2 * i], s = cs[2 * i + 1];

				v[a] = x0 * c - x1 * s;
				v[b] = x0 * s + x1 * c;
			}
		}
	}
}

static void cpu_swiglu(struct kvq_backend *be, float *gate, const float *up,
		       size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		float g = gate[i];

		gate[i] = g / (1.0f + expf(-g)) * up[i];
	}
}

static void cpu_add(struct kvq_backend *be, float *y, const float *x,
		    size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		y[i] += x[i];
}

static void cpu_add_bias(struct kvq_backend *be, float *y, const float *b,
			 uint32_t n_tok, uint32_t n)
{
	uint32_t t, i;

	for (t = 0; t < n_tok; t++)
		for (i = 0; i < n; i++)
			y[(size_t)t * n + i] += b[i];
}

static int cpu_embed(struct kvq_backend *be, struct kvq_weight *w,
		     const int32_t *tok, uint32_t n_tok, float *out)
{
	uint64_t rb = kvq_type_row_bytes(w->type, w->cols);
	const uint8_t *base;
	uint32_t t;
	int ret = 0;

	base = kvq_weight_get(w);
	for (t = 0; t < n_tok; t++) {
		if (tok[t] < 0 || (uint32_t)tok[t] >= w->rows) {
			ret = -EINVAL;
			break;
		}
		ret = kvq_dequant_row(w->type, base + rb * tok[t],
				      out + (size_t)t * w->cols, w->cols);
		if (ret)
			break;
	}
	kvq_weight_put(w);
	return ret;
}

/* ---------------------------------------------------------- attention */

struct attn_job {
	struct kvq_kvcache *kv;
	uint32_t layer;
	const struct kvq_attn_seq *seqs;
	uint32_t n_seqs;
	const float *q;
	float *out;
	uint32_t n_heads;
	uint32_t n_items;	/* total new tokens * KV heads */
};

/* Work items are (token, KV head): the query heads of a group share every
 * K and V row they dequantize. */
static void attn_worker(void *ctx, int part, int n_parts)
{
	struct attn_job *j = ctx;
	uint32_t hd = j->kv->o.head_dim, nkv = j->kv->o.n_kv_heads;
	uint32_t group = j->n_heads / nkv;
	uint32_t per = (j->n_items + n_parts - 1) / n_parts;
	uint32_t it0 = per * part, it1 = it0 + per, it, s = 0, before = 0;
	float scale = 1.0f / sqrtf((float)hd);

	if (it1 > j->n_items)
		it1 = j->n_items;
	for (it = it0; it < it1; it++) {
		uint32_t tok = it / nkv, kh = it % nkv;
		uint32_t row, tj;
		const struct kvq_attn_seq *sq;
		size_t off;

		while (tok >= before + j->seqs[s].n_new) {
			before += j->seqs[s].n_new;
			s++;
		}
		sq = &j->seqs[s];
		tj = tok - before;
		row = sq->row0 + tj;
		off = ((size_t)row * j->n_heads + (size_t)kh * group) * hd;
		kvq_kv_attend(j->kv, sq->kv, j->layer, kh, j->q + off, hd,
			      group, scale, sq->pos0 + tj + 1, j->out + off,
			      hd);
	}
}

static void cpu_attention(struct kvq_backend *be, struct kvq_kvcache *kv,
			  uint32_t layer, const struct kvq_attn_seq *seqs,
			  uint32_t n_seqs, const float *q, float *k,
			  const float *v, float *out, uint32_t n_heads,
			  const struct kvq_rope *rope)
{
	size_t kvd = (size_t)kv->o.n_kv_heads * kv->o.head_dim;
	struct attn_job j = {
		.kv = kv, .layer = layer, .seqs = seqs, .n_seqs = n_seqs,
		.q = q, .out = out, .n_heads = n_heads,
	};
	uint32_t s, t;

	for (s = 0; s < n_seqs; s++) {
		for (t = 0; t < seqs[s].n_new; t++) {
			uint32_t row = seqs[s].row0 + t, pos = seqs[s].pos0 + t;
			float *kr = k + row * kvd;

			/* Rotate and quantize the new key in one pass. */
			cpu_rope(be, kr, &pos, 1, kv->o.n_kv_heads,
				 kv->o.head_dim, rope->dim, rope->base,
				 rope->neox);
			kvq_kv_write(kv, seqs[s].kv, layer, pos, kr,
				     v + row * kvd);
		}
		j.n_items += seqs[s].n_new * kv->o.n_kv_heads;
	}
	kvq_pool_run(be->pool, attn_worker, &j);
}

static const struct kvq_backend_ops cpu_ops = {
	.name = "cpu",
	.matmul = cpu_matmul,
	.rmsnorm = cpu_rmsnorm,
	.rope = cpu_rope,
	.swiglu = cpu_swiglu,
	.add = cpu_add,
	.add_bias = cpu_add_bias,
	.embed = cpu_embed,
	.attention = cpu_attention,
};

void kvq_backend_cpu_init(struct kvq_backend *be, struct kvq_pool *pool)
{
	enum kvq_dot_mode mode = kvq_quant_dot_mode();

	be->ops = &cpu_ops;
	be->pool = pool;
	be->priv = NULL;
	kvq_info("cpu backend: %s dot products, %s matrix-vector mode%s",
		 kvq_quant_simd_name(), kvq_quant_dot_mode_name(mode),
		 mode == KVQ_DOT_INT8 ?
		 " (int8 activations for Q8_0, Q4_0, Q4_K, Q6_K)" : "");
}
