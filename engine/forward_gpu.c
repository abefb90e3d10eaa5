/*
 * forward_gpu.c - uploads a model to the GPU and runs kvq_step() there.
 *
 * Why this file exists: see forward_gpu.h.  Weight formats on the device:
 * F32 stays f32 (exact); Q8_0 and Q4_0 stay 8- and 4-bit (about a half and
 * a quarter of the bytes of f16), and their kernels expand each row in
 * registers to the f16 values that a copy in f16 would hold (kvq_wload8()),
 * so every product equals the f16 copy's (one-token and batch products bit
 * for bit; prompts of more than 16 tokens go to cuBLAS a slice of expanded
 * rows at a time); every other type becomes f16 once at load.  H200, 1B
 * Q8_0, q4/q4, against f16 at load: decode faster by 5-10% at batch 1 to
 * 4, a 1024-token prompt slower by a fifth (the expansion), the device
 * memory of the weights halved (bench/gpu_decode_notes.md).
 *
 * Q4_K and Q6_K become f16 at load too, unless the weights would then
 * take more than three quarters of the device's free memory (or
 * KVQ_GPU_WEIGHTS=compact): then Q4_K rows stay 4-bit (Q4's nibble
 * layout, a pair of floats d * sc, -(dmin * m) a 32 columns: 6 bits a
 * weight) and Q6_K rows 8-bit (q - 32, a pair d * scale, -0 a 16
 * columns: 12 bits), and so do stacks that mix the two (a Q4_K_M file's
 * QKV), its Q4_K rows as 8-bit codes with their pair
 * (kvq_gpu_kquant_row()).  code * scale + offset in f32 is the CPU's
 * dequantized weight bit for bit, so these products too equal the f16
 * copy's.  H200, 1B Q4_K_M, q4/q4, against f16 at load: 0.47 of the
 * bytes, decode 5-9% slower at batch 1 to 4 (the f32 arithmetic), the
 * same at 16 (bench/gpu_decode_notes.md).  KVQ_GPU_WEIGHTS=f16 converts
 * every type to f16 at load (F32 too).
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
#include "engine/quant_impl.h"
#include "kernels/gpu_fwd.h"

int kvq_gpu_mv_max_parse(const char *s, uint32_t *out)
{
	char *end;
	long v;

	if (!s)
		return -EINVAL;
	v = strtol(s, &end, 10);
	if (end == s || *end || v < 1 || v > 16)
		return -EINVAL;
	*out = (uint32_t)v;
	return 0;
}

/* Q6_K block @k of a row as Q8K: codes @c (256), pairs @p (16). */
static void q6k_block(const struct kvq_block_q6_k *k, uint8_t *c, float *p)
{
	float d = kvq_f16_to_f32(k->d);
	uint8_t w[KVQ_QK_K];
	int i;

	kvq_q6k_codes(k, w);
	for (i = 0; i < KVQ_QK_K; i++)
		c[i] = (uint8_t)(w[i] - 32);
	for (i = 0; i < 16; i++) {
		p[2 * i] = d * k->scales[i];
		p[2 * i + 1] = -0.0f;
	}
}

/*
 * Q4_K block @k of a row as Q4K (@q4: codes @c 128 bytes in Q4's layout,
 * pairs @p 8) or Q8K (codes 256, pairs 16: each sub-block's twice).
 */
static void q4k_block(const struct kvq_block_q4_k *k, bool q4, uint8_t *c,
		      float *p)
{
	float d = kvq_f16_to_f32(k->d), dmin = kvq_f16_to_f32(k->dmin);
	int i, j;

	for (j = 0; j < 8; j++) {
		const uint8_t *q = k->qs + 32 * (j / 2);
		int sh = 4 * (j & 1);
		uint8_t sc, mn;
		float pr[2];

		kvq_q4k_scale_min(j, k->scales, &sc, &mn);
		pr[0] = d * sc;
		pr[1] = -(dmin * mn);
		if (q4) {
			/* a Q4 block: columns 0-15 low, 16-31 high */
			memcpy(&p[2 * j], pr, sizeof(pr));
			for (i = 0; i < 16; i++)
				c[16 * j + i] = ((q[i] >> sh) & 15) |
						((q[i + 16] >> sh) & 15) << 4;
			continue;
		}
		memcpy(&p[4 * j], pr, sizeof(pr));
		memcpy(&p[4 * j + 2], pr, sizeof(pr));
		for (i = 0; i < 32; i++)
			c[32 * j + i] = (q[i] >> sh) & 15;
	}
}

int kvq_gpu_kquant_row(uint32_t type, int wt, const void *row, uint32_t cols,
		       uint8_t *codes, float *pairs)
{
	bool q4 = wt == KVQ_GPU_W_Q4K;
	uint32_t b;

	if (cols % KVQ_QK_K ||
	    (type != KVQ_TYPE_Q4_K && type != KVQ_TYPE_Q6_K) ||
	    (wt != KVQ_GPU_W_Q8K && (!q4 || type != KVQ_TYPE_Q4_K)))
		return -EINVAL;
	for (b = 0; b < cols / KVQ_QK_K; b++) {
		if (type == KVQ_TYPE_Q6_K)
			q6k_block((const struct kvq_block_q6_k *)row + b,
				  codes + b * KVQ_QK_K, pairs + 32 * b);
		else
			q4k_block((const struct kvq_block_q4_k *)row + b, q4,
				  codes + b * (q4 ? 128 : KVQ_QK_K),
				  pairs + b * (q4 ? 16 : 32));
	}
	return 0;
}

const char *kvq_model_gpu_weights(const struct kvq_model *m)
{
	return m->gpu ? m->gpu_weights : "";
}

#if defined(KVQ_HAVE_CUDA) || defined(KVQ_HAVE_HIP)

#include "kernels/attn.h"
#include "kernels/gpu.h"

struct kvq_ctx_gpu {
	struct kvq_model *m;
	struct kvq_kvcache *kv;
	struct kvq_gpu_ctx *c;
	uint32_t max_batch, max_seqs, bt_stride;
	int32_t *tokens, *pos, *row_seq, *slot, *bt, *seq_len, *out_rows;
	float *cs;
	uint64_t graph_failures;	/* seen (and logged) so far */
	uint64_t blas_failures;		/* likewise */
	char fallback[192];		/* kvq_ctx_gpu_fallback() */
};

/* How the upload keeps Q4_K and Q6_K weights. */
enum wmode {
	WM_DEFAULT,	/* f16, unless that would not fit (weights_mode()) */
	WM_F16,		/* KVQ_GPU_WEIGHTS=f16: every type as f16 */
	WM_COMPACT,	/* Q4_K and Q6_K kept 4- and 8-bit */
};

/* Device format a weight of GGUF @type takes. */
static int gpu_wtype(uint32_t type, enum wmode mode)
{
	if (mode == WM_F16)
		return KVQ_GPU_W_F16;
	if (type == KVQ_TYPE_F32)
		return KVQ_GPU_W_F32;
	if (type == KVQ_TYPE_Q8_0)
		return KVQ_GPU_W_Q8;
	if (type == KVQ_TYPE_Q4_0)
		return KVQ_GPU_W_Q4;
	if (mode == WM_COMPACT && type == KVQ_TYPE_Q4_K)
		return KVQ_GPU_W_Q4K;
	if (mode == WM_COMPACT && type == KVQ_TYPE_Q6_K)
		return KVQ_GPU_W_Q8K;
	return KVQ_GPU_W_F16;
}

/* Finite weight @v, whose f16 is @h, past f16's range (|v| >= 65520:
 * rounded to infinity). */
static bool past_f16(float v, uint16_t h)
{
	return (h & 0x7fff) == 0x7c00 && isfinite(v);
}

/*
 * Whether a row of GGUF @type kept 8- or 4-bit holds a weight beyond f16's
 * range: the products take its weights as their f16 values (kvq_wload8()),
 * so such a row must go up f32.  A bound from each block's scales first;
 * only a row past it is dequantized and its values checked.
 */
static bool row_past_f16(uint32_t type, const uint8_t *row, uint32_t cols,
			 float *tmp)
{
	const float lim = 65504.0f;
	bool maybe = false;
	uint32_t b, i;

	if (type == KVQ_TYPE_Q8_0 || type == KVQ_TYPE_Q4_0) {
		uint32_t bs = type == KVQ_TYPE_Q8_0 ?
			      sizeof(struct kvq_block_q8_0) :
			      sizeof(struct kvq_block_q4_0);
		float qmax = type == KVQ_TYPE_Q8_0 ? 128.0f : 8.0f;

		for (b = 0; b < cols / 32 && !maybe; b++) {
			uint16_t d;

			memcpy(&d, row + b * bs, 2);
			maybe = fabsf(kvq_f16_to_f32(d)) * qmax > lim;
		}
	} else if (type == KVQ_TYPE_Q4_K || type == KVQ_TYPE_Q6_K) {
		for (b = 0; b < cols / KVQ_QK_K && !maybe; b++) {
			if (type == KVQ_TYPE_Q4_K) {
				const struct kvq_block_q4_k *k =
					(const struct kvq_block_q4_k *)row + b;

				/* scales and mins are 6-bit, codes 4-bit */
				maybe = fabsf(kvq_f16_to_f32(k->d)) * 63 * 15 +
					fabsf(kvq_f16_to_f32(k->dmin)) * 63 >
					lim;
			} else {
				const struct kvq_block_q6_k *k =
					(const struct kvq_block_q6_k *)row + b;

				maybe = fabsf(kvq_f16_to_f32(k->d)) * 128 * 32 >
					lim;
			}
		}
	}
	if (!maybe || kvq_dequant_row(type, row, tmp, cols))
		return false;
	for (i = 0; i < cols; i++)
		if (past_f16(tmp[i], kvq_f32_to_f16(tmp[i])))
			return true;
	return false;
}

/*
 * Converts @w's rows into the device format @wt at row offset @r0 of the
 * host buffers (@data: halves, int8 or nibbles; @scales: halves, or
 * float pairs for Q4K and Q8K).  -ERANGE: a weight beyond f16's range in
 * a format whose products take f16 values (the caller goes f32).
 */
static int convert(struct kvq_weight *w, int wt, uint32_t r0, uint8_t *data,
		   void *scales, float *tmp)
{
	uint64_t rb = kvq_type_row_bytes(w->type, w->cols);
	const uint8_t *src = kvq_weight_get(w);
	uint32_t cols = w->cols, nb = cols / 32, r, b, i;
	int ret = 0;

	for (r = 0; r < w->rows && !ret; r++) {
		const uint8_t *row = src + rb * r;
		size_t o = (size_t)(r0 + r);

		if (wt != KVQ_GPU_W_F32 && wt != KVQ_GPU_W_F16 &&
		    row_past_f16(w->type, row, cols, tmp)) {
			ret = -ERANGE;
			break;
		}
		if (wt == KVQ_GPU_W_F32) {
			ret = kvq_dequant_row(w->type, row,
					      (float *)data + o * cols, cols);
		} else if (wt == KVQ_GPU_W_F16) {
			uint16_t *d = (uint16_t *)data + o * cols;

			if (w->type == KVQ_TYPE_F16) {
				memcpy(d, row, (size_t)cols * 2);
				continue;
			}
			ret = kvq_dequant_row(w->type, row, tmp, cols);
			for (i = 0; !ret && i < cols; i++) {
				d[i] = kvq_f32_to_f16(tmp[i]);
				/* the caller keeps the stack f32 instead */
				if (past_f16(tmp[i], d[i]))
					ret = -ERANGE;
			}
		} else if (wt == KVQ_GPU_W_Q8) {
			/* Q8_0 block: f16 d, 32 int8. */
			for (b = 0; b < nb; b++) {
				memcpy((uint16_t *)scales + o * nb + b,
				       row + b * 34, 2);
				memcpy(data + o * cols + b * 32, row + b * 34 + 2,
				       32);
			}
		} else if (wt == KVQ_GPU_W_Q4K) {
			ret = kvq_gpu_kquant_row(w->type, wt, row, cols,
						 data + o * (cols / 2),
						 (float *)scales +
						 o * (cols / 32) * 2);
		} else if (wt == KVQ_GPU_W_Q8K) {
			ret = kvq_gpu_kquant_row(w->type, wt, row, cols,
						 data + o * cols,
						 (float *)scales +
						 o * (cols / 16) * 2);
		} else {
			/* Q4_0 block: f16 d, 16 bytes of nibbles. */
			for (b = 0; b < nb; b++) {
				memcpy((uint16_t *)scales + o * nb + b,
				       row + b * 18, 2);
				memcpy(data + o * (cols / 2) + b * 16,
				       row + b * 18 + 2, 16);
			}
		}
	}
	kvq_weight_put(w);
	return ret;
}

/* Matrices kept f32 on the GPU because f16 cannot hold their weights. */
struct f32_note {
	int n;
	char first[96];
};

/*
 * Uploads the row-stack of @n weights (same cols) into one device matrix.
 * A stack bound for f16 with a weight beyond f16's range (a BF16 or F32
 * tensor's, or a quantized block's) goes up as f32 instead, noted in @fn.
 */
static int upload_stack(struct kvq_gpu_model *g, int layer, int slot,
			struct kvq_weight **ws, int n, enum wmode mode,
			struct f32_note *fn, char *err, size_t errlen)
{
	uint32_t rows = 0, cols = ws[0]->cols, r0 = 0;
	int wt = gpu_wtype(ws[0]->type, mode), i, ret = 0;
	size_t db, sb;
	uint8_t *data;
	void *scales = NULL;
	float *tmp;

	for (i = 0; i < n; i++) {
		int t = gpu_wtype(ws[i]->type, mode);

		rows += ws[i]->rows;
		/* a mix: Q8K holds Q4_K and Q6_K rows, f16 any */
		if (t != wt)
			wt = (t == KVQ_GPU_W_Q4K || t == KVQ_GPU_W_Q8K) &&
			     (wt == KVQ_GPU_W_Q4K || wt == KVQ_GPU_W_Q8K) ?
			     KVQ_GPU_W_Q8K : KVQ_GPU_W_F16;
		if (ws[i]->cols != cols) {
			snprintf(err, errlen, "tensor %s: %u columns, expected %u",
				 ws[i]->name, ws[i]->cols, cols);
			return -EINVAL;
		}
	}
	if ((wt == KVQ_GPU_W_Q4K || wt == KVQ_GPU_W_Q8K) && cols % KVQ_QK_K)
		wt = KVQ_GPU_W_F16;
again:
	db = wt == KVQ_GPU_W_F32 ? (size_t)rows * cols * 4 :
	     wt == KVQ_GPU_W_F16 ? (size_t)rows * cols * 2 :
	     wt == KVQ_GPU_W_Q8 || wt == KVQ_GPU_W_Q8K ? (size_t)rows * cols :
	     (size_t)rows * cols / 2;
	/* a half a 32 columns (Q8, Q4), two floats a 32 (Q4K) or a 16 (Q8K) */
	sb = wt == KVQ_GPU_W_F32 || wt == KVQ_GPU_W_F16 ? 0 :
	     (size_t)rows * (cols / 32) * 2 *
	     (wt == KVQ_GPU_W_Q4K ? 4 : wt == KVQ_GPU_W_Q8K ? 8 : 1);
	data = malloc(db);
	tmp = malloc((size_t)cols * sizeof(float));
	if (sb)
		scales = malloc(sb);
	if (!data || !tmp || (sb && !scales)) {
		snprintf(err, errlen, "out of host memory converting %s",
			 ws[0]->name);
		ret = -ENOMEM;
		goto out;
	}
	for (i = 0; i < n && !ret; i++) {
		ret = convert(ws[i], wt, r0, data, scales, tmp);
		if (ret == -ERANGE && wt != KVQ_GPU_W_F32) {
			kvq_warn("gpu: tensor %s holds weights beyond f16's range: its %u x %u matrix stays f32 on the GPU (4 bytes a weight, products on CUDA cores)",
				 ws[i]->name, rows, cols);
			if (!fn->n++)
				snprintf(fn->first, sizeof(fn->first), "%s",
					 ws[i]->name);
			free(data);
			free(tmp);
			free(scales);
			scales = NULL;
			wt = KVQ_GPU_W_F32;
			r0 = 0;
			ret = 0;
			goto again;
		}
		if (ret)
			snprintf(err, errlen, "tensor %s: cannot convert type %u for the GPU",
				 ws[i]->name, ws[i]->type);
		r0 += ws[i]->rows;
	}
	if (!ret)
		ret = kvq_gpu_model_set_matrix(g, layer, slot, wt, rows, cols,
					       data, scales, err, errlen);
out:
	free(data);
	free(tmp);
	free(scales);
	return ret;
}

/* Device bytes of @n weights of GGUF @type as gpu_wtype() keeps them. */
static uint64_t device_bytes(uint32_t type, uint64_t n, enum wmode mode)
{
	switch (gpu_wtype(type, mode)) {
	case KVQ_GPU_W_F32:
		return 4 * n;
	case KVQ_GPU_W_Q8:
		return n + n / 16;
	case KVQ_GPU_W_Q4:
		return n / 2 + n / 16;
	case KVQ_GPU_W_Q4K:
		return n / 2 + n / 4;
	case KVQ_GPU_W_Q8K:
		return n + n / 2;
	}
	return 2 * n;
}

/*
 * How the upload keeps @m's Q4_K and Q6_K weights: as KVQ_GPU_WEIGHTS says
 * (f16 or compact); else f16 (decode is 5-9% faster that way at 1 to 4
 * tokens a step, bench/gpu_decode_notes.md), unless the weights would
 * then take more than three quarters of the device's free memory and
 * keeping those types 4- and 8-bit (exact all the same) takes less:
 * @why then says so.  KVQ_GPU_FAULT=small-memory makes the free memory
 * look that small, for tests.
 */
static enum wmode weights_mode(const struct kvq_model *m, char *why,
			       size_t len)
{
	const char *e = getenv("KVQ_GPU_WEIGHTS");
	const char *fault = getenv("KVQ_GPU_FAULT");
	uint64_t def = 0, kept = 0, avail;
	struct kvq_gpu_info gi;
	char pw[64];
	uint32_t i;

	*why = 0;
	if (e && !strcmp(e, "f16"))
		return WM_F16;
	if (e && !strcmp(e, "compact"))
		return WM_COMPACT;
	for (i = 0; i < m->n_weights; i++) {
		const struct kvq_weight *w = &m->weights[i];
		uint64_t n = (uint64_t)w->rows * w->cols;

		if (w->rows < 2)
			continue;
		def += device_bytes(w->type, n, WM_DEFAULT);
		kept += device_bytes(w->type, n, WM_COMPACT);
	}
	if (kept >= def || kvq_gpu_probe(&gi, pw, sizeof(pw)) <= 0)
		return WM_DEFAULT;
	avail = fault && !strcmp(fault, "small-memory") ? def : gi.free_mem;
	if (def <= avail / 4 * 3)
		return WM_DEFAULT;
	snprintf(why, len,
		 "in f16 the weights would take %.1f MiB of the %.1f MiB free%s",
		 def / 1048576.0, avail / 1048576.0,
		 fault && !strcmp(fault, "small-memory") ?
		 " (injected: KVQ_GPU_FAULT=small-memory)" : "");
	return WM_COMPACT;
}

int kvq_model_gpu_upload(struct kvq_model *m, char *err, size_t errlen)
{
	const struct kvq_hparams *hp = &m->hp;
	struct kvq_gpu_model_desc d = { 0 };
	struct kvq_gpu_model *g;
	uint32_t qd = hp->n_heads * hp->head_dim;
	uint32_t kvd = hp->n_kv_heads * hp->head_dim, l;
	float *bias = NULL;
	enum wmode mode;
	struct f32_note fn = { 0 };
	char why[256], f32s[160] = "";
	int ret;

	if (m->gpu)
		return 0;
	mode = weights_mode(m, why, sizeof(why));
	d.n_layers = hp->n_layers;
	d.dim = hp->dim;
	d.n_heads = hp->n_heads;
	d.n_kv_heads = hp->n_kv_heads;
	d.head_dim = hp->head_dim;
	d.ffn_dim = hp->ffn_dim;
	d.n_vocab = hp->n_vocab;
	d.rope_dim = hp->rope_dim;
	d.rope_neox = hp->rope_neox;
	d.rope_base = hp->rope_base;
	d.rms_eps = hp->rms_eps;
	ret = kvq_gpu_model_create(&d, &g, err, errlen);
	if (ret)
		return ret;
	for (l = 0; l < hp->n_layers && !ret; l++) {
		struct kvq_layer *L = &m->layers[l];
		struct kvq_weight *qkv[3] = { L->wq, L->wk, L->wv };
		struct kvq_weight *gu[2] = { L->w_gate, L->w_up };

		ret = upload_stack(g, l, KVQ_GPU_M_QKV, qkv, 3, mode, &fn,
				   err, errlen);
		if (!ret)
			ret = upload_stack(g, l, KVQ_GPU_M_O, &L->wo, 1, mode,
					   &fn, err, errlen);
		if (!ret)
			ret = upload_stack(g, l, KVQ_GPU_M_GATEUP, gu, 2, mode,
					   &fn, err, errlen);
		if (!ret)
			ret = upload_stack(g, l, KVQ_GPU_M_DOWN, &L->w_down, 1,
					   mode, &fn, err, errlen);
		if (!ret)
			ret = kvq_gpu_model_set_vector(g, l, KVQ_GPU_V_ATTN_NORM,
						       L->attn_norm, hp->dim,
						       err, errlen);
		if (!ret)
			ret = kvq_gpu_model_set_vector(g, l, KVQ_GPU_V_FFN_NORM,
						       L->ffn_norm, hp->dim,
						       err, errlen);
		if (!ret && L->bq) {
			bias = malloc((size_t)(qd + 2 * kvd) * sizeof(float));
			if (!bias) {
				ret = -ENOMEM;
				break;
			}
			memcpy(bias, L->bq, qd * sizeof(float));
			memcpy(bias + qd, L->bk, kvd * sizeof(float));
			memcpy(bias + qd + kvd, L->bv, kvd * sizeof(float));
			ret = kvq_gpu_model_set_vector(g, l, KVQ_GPU_V_QKV_BIAS,
						       bias, qd + 2 * kvd, err,
						       errlen);
			free(bias);
		}
	}
	if (!ret)
		ret = upload_stack(g, -1, KVQ_GPU_M_EMBED, &m->tok_embd, 1,
				   mode, &fn, err, errlen);
	if (!ret) {
		if (m->output == m->tok_embd)
			kvq_gpu_model_tie_output(g);
		else
			ret = upload_stack(g, -1, KVQ_GPU_M_OUTPUT, &m->output,
					   1, mode, &fn, err, errlen);
	}
	if (!ret)
		ret = kvq_gpu_model_set_vector(g, -1, KVQ_GPU_V_OUTPUT_NORM,
					       m->output_norm, hp->dim, err,
					       errlen);
	if (!ret)
		ret = kvq_gpu_model_ready(g, err, errlen);
	if (ret) {
		kvq_gpu_model_destroy(g);
		return ret;
	}
	m->gpu = g;
	if (getenv("KVQ_GPU_WEIGHTS") && strcmp(getenv("KVQ_GPU_WEIGHTS"), "f16") &&
	    strcmp(getenv("KVQ_GPU_WEIGHTS"), "compact"))
		kvq_warn("gpu: KVQ_GPU_WEIGHTS=%s is not f16 or compact: ignored",
			 getenv("KVQ_GPU_WEIGHTS"));
	if (fn.n)
		snprintf(f32s, sizeof(f32s),
			 "; %d matri%s kept f32 (weights beyond f16's range, first %s)",
			 fn.n, fn.n == 1 ? "x" : "ces", fn.first);
	snprintf(m->gpu_weights, sizeof(m->gpu_weights), "%.1f MiB: %s%s%s%s",
		 kvq_gpu_model_bytes(g) / 1048576.0,
		 mode == WM_F16 ? "all as f16 (KVQ_GPU_WEIGHTS=f16)" :
		 mode == WM_COMPACT ?
		 "Q8_0, Q4_0 and Q4_K kept 8- and 4-bit, Q6_K 8-bit, F32 as f32, other types as f16" :
		 "Q8_0 and Q4_0 kept 8- and 4-bit, F32 as f32, other types as f16",
		 f32s, *why ? "; " : "", why);
	if (*why)
		kvq_notice("gpu: Q4_K and Q6_K kept 4- and 8-bit: %s", why);
	kvq_info("gpu: weights uploaded, %s", m->gpu_weights);
	return 0;
}

void kvq_model_gpu_release(struct kvq_model *m)
{
	kvq_gpu_model_destroy(m->gpu);
	m->gpu = NULL;
}

uint64_t kvq_model_gpu_step_bytes(const struct kvq_model *m)
{
	return m->gpu ? kvq_gpu_model_step_bytes(m->gpu) : 0;
}

uint64_t kvq_model_gpu_bytes(const struct kvq_model *m)
{
	return m->gpu ? kvq_gpu_model_bytes(m->gpu) : 0;
}

static void gpu_copy_page(void *arg, int32_t dst, int32_t src)
{
	struct kvq_ctx_gpu *g = arg;

	if (kvq_gpu_ctx_copy_page(g->c, dst, src))
		kvq_err("gpu: copy of KV page %d failed", src);
}

/* Logs "@what off (@why): @then" when @n failures are more than @seen,
 * and keeps it for kvq_ctx_gpu_fallback(). */
static void note_failures(struct kvq_ctx_gpu *g, uint64_t n, uint64_t *seen,
			  const char *what, const char *why, const char *then)
{
	if (n <= *seen)
		return;
	*seen = n;
	snprintf(g->fallback, sizeof(g->fallback), "%s off (%s): %s", what, why,
		 then);
	kvq_warn("gpu: %s", g->fallback);
}

/* What the device gave up after a failure, said once a failure. */
static void note_fallback(struct kvq_ctx_gpu *g)
{
	struct kvq_gpu_stats st;

	kvq_gpu_ctx_stats(g->c, &st);
	note_failures(g, st.blas_failures, &g->blas_failures, "cuBLAS",
		      st.blas_error,
		      "f16 products of several tokens use the CUDA-core kernels");
	note_failures(g, st.graph_failures, &g->graph_failures, "CUDA graphs",
		      st.graph_error, "decode launches kernel by kernel");
}

int kvq_ctx_gpu_create(struct kvq_model *m, struct kvq_kvcache *kv,
		       uint32_t max_batch, uint32_t max_seqs, uint32_t n_ctx,
		       struct kvq_ctx_gpu **out, char *err, size_t errlen)
{
	const struct kvq_hparams *hp = &m->hp;
	struct kvq_gpu_ctx_desc d = { 0 };
	uint8_t tk[KVQ_KV_MAX_LAYERS], tv[KVQ_KV_MAX_LAYERS];
	size_t kpb[KVQ_KV_MAX_LAYERS], vpb[KVQ_KV_MAX_LAYERS];
	const float *ctr[KVQ_KV_MAX_LAYERS];
	struct kvq_ctx_gpu *g;
	const char *mv;
	uint32_t l;
	int ret;

	ret = kvq_model_gpu_upload(m, err, errlen);
	if (ret)
		return ret;
	g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->m = m;
	g->kv = kv;
	g->max_batch = max_batch;
	g->max_seqs = max_seqs;
	g->bt_stride = (n_ctx + kv->o.page_tokens - 1) / kv->o.page_tokens + 1;
	for (l = 0; l < hp->n_layers; l++) {
		tk[l] = kv->layers[l].k.type;
		tv[l] = kv->layers[l].v.type;
		kpb[l] = kv->layers[l].k.page_bytes;
		vpb[l] = kv->layers[l].v.page_bytes;
		ctr[l] = kv->layers[l].center;
		if (ctr[l])
			d.k_center = ctr;
	}
	/* The device turns the centres with the model's RoPE. */
	if (d.k_center && (kv->o.rope_dim != hp->rope_dim ||
			   kv->o.rope_base != hp->rope_base ||
			   kv->o.rope_neox != hp->rope_neox)) {
		snprintf(err, errlen,
			 "the KV cache's key centres use another RoPE than the model");
		kvq_ctx_gpu_destroy(g);
		return -EINVAL;
	}
	d.max_batch = max_batch;
	d.max_seqs = max_seqs;
	d.bt_stride = g->bt_stride;
	d.n_pages = kv->o.n_pages;
	d.page_tokens = kv->o.page_tokens;
	d.n_sink = kv->o.n_sink;
	d.max_ctx = n_ctx;
	d.type_k = tk;
	d.type_v = tv;
	d.k_page_bytes = kpb;
	d.v_page_bytes = vpb;
	d.use_graphs = !getenv("KVQ_GPU_NO_GRAPHS");
	d.dot_int8 = kvq_quant_dot_mode() == KVQ_DOT_INT8;
	mv = getenv("KVQ_GPU_INT8_PRODUCTS");
	if (d.dot_int8 && mv && !strcmp(mv, "all"))
		d.dot_int8 = 2;
	else if (mv && *mv && strcmp(mv, "gateup") && strcmp(mv, "all"))
		kvq_warn("gpu: KVQ_GPU_INT8_PRODUCTS=%s is not gateup or all: gate/up only",
			 mv);
	mv = getenv("KVQ_GPU_MV_MAX");
	if (mv && kvq_gpu_mv_max_parse(mv, &d.mv_max))
		kvq_warn("gpu: KVQ_GPU_MV_MAX=%s is not a token count from 1 to 16; the default threshold holds",
			 mv);
	g->tokens = malloc(max_batch * sizeof(int32_t));
	g->pos = malloc(max_batch * sizeof(int32_t));
	g->row_seq = malloc(max_batch * sizeof(int32_t));
	g->out_rows = malloc(max_batch * sizeof(int32_t));
	g->slot = malloc(max_seqs * sizeof(int32_t));
	g->seq_len = malloc(max_seqs * sizeof(int32_t));
	g->bt = calloc((size_t)max_seqs * g->bt_stride, sizeof(int32_t));
	g->cs = malloc((size_t)max_batch * (hp->rope_dim / 2 + 1) * 2 *
		       sizeof(float));
	if (!g->tokens || !g->pos || !g->row_seq || !g->out_rows ||
	    !g->slot || !g->seq_len || !g->bt || !g->cs) {
		snprintf(err, errlen, "out of memory");
		kvq_ctx_gpu_destroy(g);
		return -ENOMEM;
	}
	ret = kvq_gpu_ctx_create(m->gpu, &d, &g->c, err, errlen);
	if (ret) {
		kvq_ctx_gpu_destroy(g);
		return ret;
	}
	kv->copy_page = gpu_copy_page;
	kv->copy_arg = g;
	note_fallback(g);
	if (d.dot_int8)
		kvq_info("gpu: int8 dot mode: one-token %s and the products of steps of 2-8 tokens of 8- and 4-bit weights take x as int8 per 32 columns; %sQ6_K rows, longer steps and f16 weights stay exact",
			 d.dot_int8 > 1 ? "products" : "gate/up products",
			 d.dot_int8 > 1 ? "" : "the other one-token products, ");
	*out = g;
	return 0;
}

void kvq_ctx_gpu_destroy(struct kvq_ctx_gpu *g)
{
	if (!g)
		return;
	if (g->kv && g->kv->copy_arg == g) {
		g->kv->copy_page = NULL;
		g->kv->copy_arg = NULL;
	}
	kvq_gpu_ctx_destroy(g->c);
	free(g->tokens);
	free(g->pos);
	free(g->row_seq);
	free(g->out_rows);
	free(g->slot);
	free(g->seq_len);
	free(g->bt);
	free(g->cs);
	free(g);
}

uint64_t kvq_ctx_gpu_bytes(const struct kvq_ctx_gpu *g)
{
	return kvq_gpu_ctx_bytes(g->c);
}

int kvq_ctx_gpu_step(struct kvq_ctx_gpu *g, const struct kvq_batch *b,
		     const int *slots, const struct kvq_attn_seq *aseq,
		     const uint32_t *pos, uint32_t n_tok, float *logits,
		     const struct kvq_gpu_sample_params *sp, const float *u,
		     int32_t *ids)
{
	const struct kvq_hparams *hp = &g->m->hp;
	struct kvq_gpu_step s = { 0 };
	char err[256];
	uint32_t t, row = 0, n_out = 0;
	int i, ret;

	for (i = 0; i < b->n; i++) {
		const struct kvq_attn_seq *a = &aseq[i];

		if (a->kv->n_pages > g->bt_stride)
			return -EINVAL;
		memcpy(g->bt + (size_t)i * g->bt_stride, a->kv->pages,
		       a->kv->n_pages * sizeof(int32_t));
		g->slot[i] = slots[i];
		g->seq_len[i] = (int32_t)(a->pos0 + a->n_new);
		for (t = 0; t < a->n_new; t++, row++) {
			g->tokens[row] = b->tokens[i][t];
			g->pos[row] = (int32_t)pos[row];
			g->row_seq[row] = i;
			if (b->all_logits || t == a->n_new - 1)
				g->out_rows[n_out++] = (int32_t)row;
		}
	}
	if (hp->rope_dim)
		kvq_attn_ref_rope_table(pos, n_tok, hp->rope_dim,
					hp->rope_base, g->cs);
	s.n_tok = n_tok;
	s.n_seqs = (uint32_t)b->n;
	s.n_out = n_out;
	s.tokens = g->tokens;
	s.pos = g->pos;
	s.row_seq = g->row_seq;
	s.seq_slot = g->slot;
	s.block_table = g->bt;
	s.seq_len = g->seq_len;
	s.out_rows = g->out_rows;
	s.rope_cs = g->cs;
	s.logits = logits;
	s.sample = sp;
	s.sample_u = u;
	s.ids = ids;
	ret = kvq_gpu_forward(g->c, &s, err, sizeof(err));
	if (ret)
		kvq_err("gpu: %s", err);
	note_fallback(g);
	return ret;
}

int kvq_ctx_gpu_copy_sinks(struct kvq_ctx_gpu *g, int dst, int src)
{
	return kvq_gpu_ctx_copy_sinks(g->c, (uint32_t)dst, (uint32_t)src);
}

int kvq_ctx_gpu_fill(struct kvq_ctx_gpu *g, int slot, const int32_t *pages,
		     uint32_t n_pages, uint32_t from, uint32_t to)
{
	return kvq_gpu_ctx_fill_random(g->c, pages, n_pages, (uint32_t)slot,
				       from, to, 12345u + (uint32_t)slot);
}

void kvq_ctx_gpu_describe(const struct kvq_ctx_gpu *g, char *buf, size_t len)
{
	struct kvq_gpu_stats st;
	bool centred = false;
	char skinny[128], dot[160] = "";
	uint32_t l;

	kvq_gpu_ctx_stats(g->c, &st);
	if (st.dot_int8)
		snprintf(dot, sizeof(dot),
			 ", int8 x: one-token 8/4-bit %s and steps of 2-8 tokens but Q6_K rows%s%.0u%s",
			 st.dot_int8 > 1 ? "products" : "gate/up",
			 st.q8a_exact_cols ? " (rows of " : "",
			 st.q8a_exact_cols,
			 st.q8a_exact_cols ? " columns: exact)" : "");
	for (l = 0; l < g->kv->o.n_layers; l++)
		centred |= g->kv->layers[l].center != NULL;
	if (st.skinny_max)
		snprintf(skinny, sizeof(skinny),
			 "tensor cores (up to %u tokens in one pass over the weights, then cuBLAS on tensor cores)",
			 st.skinny_max);
	else
		snprintf(skinny, sizeof(skinny), "cuBLAS on tensor cores");
	snprintf(buf, len,
		 "%llu steps (%llu as CUDA graphs, %llu graphs%s%s), %llu tokens sampled on the device, decode attention: %s%s, f16 products of more than %u tokens: %s%s",
		 (unsigned long long)st.steps,
		 (unsigned long long)st.graph_steps,
		 (unsigned long long)st.graphs,
		 st.graph_failures ? "; graphs off after a failure: " : "",
		 st.graph_failures ? st.graph_error : "",
		 (unsigned long long)st.sampled_rows,
		 st.decode_kernel ? "fused split-KV kernel" :
		 "generic kernel (head_dim or page type outside the fused kernel)",
		 st.decode_kernel && centred ?
		 " (centred layers: generic kernel)" : "",
		 st.prompt_blas ? st.blas_above : 16,
		 !st.prompt_blas ? "tiled kernel" : skinny, dot);
}

const char *kvq_ctx_gpu_fallback(const struct kvq_ctx_gpu *g)
{
	return g->fallback[0] ? g->fallback : NULL;
}

uint64_t kvq_ctx_gpu_sampled(const struct kvq_ctx_gpu *g)
{
	struct kvq_gpu_stats st;

	kvq_gpu_ctx_stats(g->c, &st);
	return st.sampled_rows;
}

double kvq_ctx_gpu_busy_us(const struct kvq_ctx_gpu *g)
{
	struct kvq_gpu_stats st;

	kvq_gpu_ctx_stats(g->c, &st);
	return st.busy_us;
}

float *kvq_ctx_gpu_logits(struct kvq_ctx_gpu *g, uint32_t *rows)
{
	return kvq_gpu_ctx_logits(g->c, rows);
}

#else /* no GPU backend */

static const char nogpu[] = "this kvqd was built without a GPU backend (configure --with-cuda or --with-hip)";

int kvq_model_gpu_upload(struct kvq_model *m, char *err, size_t errlen)
{
	(void)m;
	snprintf(err, errlen, "%s", nogpu);
	return -ENOSYS;
}

void kvq_model_gpu_release(struct kvq_model *m)
{
	(void)m;
}

int kvq_ctx_gpu_create(struct kvq_model *m, struct kvq_kvcache *kv,
		       uint32_t max_batch, uint32_t max_seqs, uint32_t n_ctx,
		       struct kvq_ctx_gpu **out, char *err, size_t errlen)
{
	(void)m;
	(void)kv;
	(void)max_batch;
	(void)max_seqs;
	(void)n_ctx;
	*out = NULL;
	snprintf(err, errlen, "%s", nogpu);
	return -ENOSYS;
}

void kvq_ctx_gpu_destroy(struct kvq_ctx_gpu *g)
{
	(void)g;
}

uint64_t kvq_model_gpu_step_bytes(const struct kvq_model *m)
{
	(void)m;
	return 0;
}

uint64_t kvq_model_gpu_bytes(const struct kvq_model *m)
{
	(void)m;
	return 0;
}

uint64_t kvq_ctx_gpu_bytes(const struct kvq_ctx_gpu *g)
{
	(void)g;
	return 0;
}

int kvq_ctx_gpu_step(struct kvq_ctx_gpu *g, const struct kvq_batch *b,
		     const int *slots, const struct kvq_attn_seq *aseq,
		     const uint32_t *pos, uint32_t n_tok, float *logits,
		     const struct kvq_gpu_sample_params *sp, const float *u,
		     int32_t *ids)
{
	(void)g;
	(void)b;
	(void)slots;
	(void)aseq;
	(void)pos;
	(void)n_tok;
	(void)logits;
	(void)sp;
	(void)u;
	(void)ids;
	return -ENOSYS;
}

int kvq_ctx_gpu_copy_sinks(struct kvq_ctx_gpu *g, int dst, int src)
{
	(void)g;
	(void)dst;
	(void)src;
	return -ENOSYS;
}

int kvq_ctx_gpu_fill(struct kvq_ctx_gpu *g, int slot, const int32_t *pages,
		     uint32_t n_pages, uint32_t from, uint32_t to)
{
	(void)g;
	(void)slot;
	(void)pages;
	(void)n_pages;
	(void)from;
	(void)to;
	return -ENOSYS;
}

void kvq_ctx_gpu_describe(const struct kvq_ctx_gpu *g, char *buf, size_t len)
{
	(void)g;
	snprintf(buf, len, "%s", nogpu);
}

const char *kvq_ctx_gpu_fallback(const struct kvq_ctx_gpu *g)
{
	(void)g;
	return NULL;
}

uint64_t kvq_ctx_gpu_sampled(const struct kvq_ctx_gpu *g)
{
	(void)g;
	return 0;
}

double kvq_ctx_gpu_busy_us(const struct kvq_ctx_gpu *g)
{
	(void)g;
	return 0.0;
}

float *kvq_ctx_gpu_logits(struct kvq_ctx_gpu *g, uint32_t *rows)
{
	(void)g;
	*rows = 0;
	return NULL;
}

#endif
