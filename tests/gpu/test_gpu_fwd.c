/*
 * test_gpu_fwd.c - the GPU forward pass against the CPU engine, its twin.
 *
 * For each model given on the command line and each KV setting (f32/f32,
 * the default q8/q4, and f16/f16), one CPU and one GPU context run the same
 * prompt and then greedy decoding for 120 tokens:
 *   - the logits of every step agree: max|gpu - cpu| <= tol * max|cpu|
 *     (tol 1e-4 with an f32 cache; 2e-2 with a quantized one, where a key
 *     that differs in the last float bit may round to the neighbouring
 *     4-bit level).  F32 and F16 weights reach the GPU unchanged; Q8_0
 *     and Q4_0 (and with KVQ_GPU_WEIGHTS=compact Q4_K and Q6_K) stay
 *     4- or 8-bit but are multiplied as the f16 values of their weights,
 *     and the other types are converted to f16 once: either way each
 *     weight is rounded by up to 2^-11, and the tolerances are 1e-2 and
 *     8e-2.  A model of those four types (or a Q4_K_M mix) is run twice:
 *     Q8_0 and Q4_0 the second time converted to f16 at load
 *     (KVQ_GPU_WEIGHTS=f16), Q4_K and Q6_K, which the default converts,
 *     kept (KVQ_GPU_WEIGHTS=compact);
 *   - the greedy token ids are equal.  Should they differ, the CPU's top
 *     two logits at that step must lie within the logit tolerance of each
 *     other (a tie broken by rounding), and the test reports where.
 * Then a continuous-batching step: three sequences, one prefilling and two
 * decoding, in one GPU step, each matching its own CPU run; and a prompt
 * whose products (more than 16 tokens) go through cuBLAS where the weights
 * are f16, against the CPU and against the tiled kernel (KVQ_GPU_NO_CUBLAS),
 * every row's logits; and decode steps of 2 to 16 sequences on the
 * one-pass tensor-core product against the CPU and against cuBLAS
 * (skinny_case()).  A Q8_0, Q4_0, Q4_K or Q6_K model kept as it is
 * (KVQ_GPU_WEIGHTS=compact) against its copy in f16 (KVQ_GPU_WEIGHTS=f16):
 * the same logits, bit for bit (quant_values_case()); a Q4_K / Q6_K model
 * short of device memory (KVQ_GPU_FAULT=small-memory) kept 4/8-bit on its
 * own, with room converted (auto_compact_case()).  Logits buffers are
 * poisoned with NaN before every GPU step.
 *
 * The int8 dot mode (KVQ_DOT=int8) on models kept 8/4-bit: one-token
 * steps against the CPU's int8 mode, equal to it where nothing else
 * separates them, and apart from the exact mode (q8a_case()).
 *
 * Key centring: the greedy and batch cases again with random key centres
 * on the model (center_case()).  Weights beyond f16's range keep their
 * matrices f32 on the GPU, and the upload names the first
 * (f16_range_case(); the greedy cases check the logits).
 *
 * Without a GPU: "1..0 # SKIP no GPU" and exit status 77.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/forward_gpu.h"
#include "engine/kvcache.h"
#include "engine/kvsmooth.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/model_impl.h"
#include "engine/quant.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "kernels/attn.h"
#include "kernels/gpu.h"
#include "tests/gpu/fwd_util.h"
#include "tests/gpu/gpu_test_util.h"
#include "tap.h"

#define N_GEN 120

static const char prompt_text[] =
	"Once upon a time, there was a little girl who lived in a village near the forest.";

struct kvset {
	const char *name;
	uint8_t k, v;
	float tol;
};

static const struct kvset kvsets[] = {
	{ "f32/f32", KVQ_KV_F32, KVQ_KV_F32, 1e-4f },
	{ "q8/q4", KVQ_KV_Q8, KVQ_KV_Q4, 2e-2f },
	{ "f16/f16", KVQ_KV_F16, KVQ_KV_F16, 2e-3f },
};

static int argmax(const float *x, uint32_t n, float *margin)
{
	uint32_t i, b = 0, s = 1;

	if (x[1] > x[0]) {
		b = 1;
		s = 0;
	}
	for (i = 2; i < n; i++) {
		if (x[i] > x[b]) {
			s = b;
			b = i;
		} else if (x[i] > x[s]) {
			s = i;
		}
	}
	*margin = x[b] - x[s];
	return (int)b;
}

static float max_abs(const float *x, size_t n)
{
	float m = 0.0f;
	size_t i;

	for (i = 0; i < n; i++)
		if (fabsf(x[i]) > m)
			m = fabsf(x[i]);
	return m;
}

/* max |a - b| (NaN in a counts as infinite) */
static float max_diff(const float *a, const float *b, size_t n)
{
	float m = 0.0f;
	size_t i;

	for (i = 0; i < n; i++) {
		float d = fabsf(a[i] - b[i]);

		if (isnan(a[i]) || isnan(d))
			return INFINITY;
		if (d > m)
			m = d;
	}
	return m;
}

static void poison(float *x, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		x[i] = NAN;
}

static int prompt_tokens(struct kvq_model *m, int32_t *tok, int cap)
{
	int n = kvq_tokenize(kvq_model_tokenizer(m), prompt_text,
			     strlen(prompt_text), tok + 1, cap - 1);

	tok[0] = 1;
	return n < 0 ? 1 : n + 1;
}

/* The GPU holds this model's weights exactly as the file does: F32 and
 * F16 as they are, BF16 as f16 (every bf16 value in f16's normal range is
 * an f16 value; below it f16 subnormals are 2^-24 apart, beyond it the
 * matrix stays f32). */
static bool exact_weights(struct kvq_model *m)
{
	const char *d = kvq_model_desc(m);

	return strstr(d, ", F32,") || strstr(d, ", F16,") ||
	       strstr(d, ", BF16,");
}

/*
 * Weights beyond f16's range (those f16 rounds to infinity) in a type the
 * GPU multiplies as f16 values (every type but F32: converted at load,
 * or kept 8/4-bit and expanded to f16 in registers): their matrices go up
 * as f32, and kvq_model_gpu_weights() names the first.  The reference
 * scans every matrix's values on the host (kvq_dequant_row()).
 */
static void f16_range_case(struct kvq_model *m, const char *mname)
{
	const char *gw = kvq_model_gpu_weights(m), *at;
	bool named;
	int n_big;

	at = strstr(gw, "kept f32 (weights beyond f16's range, first ");
	n_big = fwd_wide_weights(m, at, &named);
	if (!*gw)
		return;		/* no GPU weights: the greedy cases said why */
	if (!n_big) {
		tap_ok(!at, "%s: no weight beyond f16's range, no matrix kept f32 (%s)",
		       mname, gw);
		return;
	}
	tap_ok(named,
	       "%s: %d weight tensors beyond f16's range, their matrices kept f32 and the first named (%s)",
	       mname, n_big, gw);
}

static void greedy_case(struct kvq_model *m, const char *mname,
			const struct kvset *ks0)
{
	struct kvset kss = *ks0, *ks = &kss;
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	struct kvq_ctx_opts o;
	struct kvq_ctx *cc = NULL, *gc = NULL;
	char err[256];
	int32_t tok[128];
	float *lc, *lg, worst = 0.0f;
	int n, i, sc, sg, diverged = -1, same = 0, ret;
	bool tie = false;

	if (!exact_weights(m))
		ks->tol = ks->k >= KVQ_KV_Q8 ? 8e-2f : 1e-2f;
	kvq_ctx_opts_default(&o);
	o.kv_type_k = ks->k;
	o.kv_type_v = ks->v;
	o.n_ctx = 512 < hp->ctx_len ? 512 : hp->ctx_len;
	o.max_seqs = 4;
	lc = malloc(hp->n_vocab * sizeof(float));
	lg = malloc(hp->n_vocab * sizeof(float));
	ret = kvq_ctx_create(m, &o, &cc, err, sizeof(err));
	if (!ret) {
		o.device = KVQ_CTX_GPU;
		ret = kvq_ctx_create(m, &o, &gc, err, sizeof(err));
	}
	if (ret) {
		tap_ok(0, "%s %s: context: %s", mname, ks->name, err);
		goto out;
	}
	n = prompt_tokens(m, tok, 128);
	sc = kvq_seq_create(cc);
	sg = kvq_seq_create(gc);
	for (i = 0; i <= N_GEN; i++) {
		float mc, mg, scale, d;
		int ac, ag;

		poison(lg, hp->n_vocab);
		if (one_step(cc, sc, tok, n, lc) || one_step(gc, sg, tok, n, lg)) {
			tap_ok(0, "%s %s: step %d failed", mname, ks->name, i);
			goto out;
		}
		scale = max_abs(lc, hp->n_vocab);
		d = max_diff(lg, lc, hp->n_vocab) / (scale > 0 ? scale : 1);
		if (d > worst)
			worst = d;
		ac = argmax(lc, hp->n_vocab, &mc);
		ag = argmax(lg, hp->n_vocab, &mg);
		if (ac != ag) {
			/* Only a near tie may be broken differently. */
			tie = mc <= 2.0f * ks->tol * scale;
			tap_diag("%s %s: token %d differs (cpu %d, gpu %d), cpu top-2 margin %g (%s)",
				 mname, ks->name, i, ac, ag, mc,
				 tie ? "a near tie" : "NOT a tie");
			diverged = i;
			break;
		}
		same++;
		tok[0] = ac;
		n = 1;
	}
	tap_ok(worst <= ks->tol, "%s %s: logits of %d steps within %g of the CPU's (worst %.3g)",
	   mname, ks->name, same + (diverged >= 0), ks->tol, worst);
	tap_ok(same == N_GEN + 1 || (diverged >= 0 && tie),
	       "%s %s: greedy ids equal the CPU's for %d tokens%s", mname,
	       ks->name, same, diverged >= 0 ? ", then a near tie broke the other way" : "");
out:
	kvq_ctx_destroy(cc);
	kvq_ctx_destroy(gc);
	free(lc);
	free(lg);
}

/*
 * The int8 dot mode (KVQ_DOT=int8) on a model whose weights the GPU keeps
 * 8- or 4-bit.  GPU contexts made in int8 mode (gate/up int8, the
 * default), in exact mode, and, where the GPU holds the embedding table
 * f32 (a weight beyond f16's range), in int8 mode with every one-token
 * product int8 (KVQ_GPU_INT8_PRODUCTS=all); CPU contexts in each mode (set
 * before each of their steps); all fed the same tokens one at a time from
 * the first (the int8 CPU's greedy choices), f32 caches.
 *   - int8 everywhere, where the GPU's embedding rows are exact: the GPU
 *     quantizes x as the CPU does and multiplies the same integer codes,
 *     so over the first Q8A_EQ steps its logits equal the int8 CPU's to
 *     1e-5 of the largest, while the exact CPU's lie at least 10 times as
 *     far; and so do a step of Q8A_SEQS new sequences (their first
 *     tokens, through the tensor-core products of several tokens, int8
 *     in that mode) against each sequence's first step on the CPU.
 *     (Only the first steps: there, nothing but f32 rounding
 *     separates the two inputs of a product; once one x value lies within
 *     rounding of a code's midpoint, the two round it apart, a change of
 *     d / 2 that the next steps carry.  With the embedding rows in f16
 *     that happens from the first step, and the chaos of a random model
 *     makes the two int8 runs no closer than int8 to exact.)
 *   - the default: the context says which products are int8, its logits
 *     move away from the exact GPU's, and stay within Q8A_TOL of the int8
 *     CPU's for Q8A_STEPS steps.
 */
#define Q8A_STEPS 24
#define Q8A_EQ 2
#define Q8A_TOL 8e-2f
#define Q8A_SEQS 3

static void q8a_case(struct kvq_model *m, const char *mname)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	struct kvq_ctx *c8 = NULL, *ce = NULL, *g8 = NULL, *ge = NULL;
	struct kvq_ctx *ga = NULL;
	struct kvq_ctx_opts o;
	float *l8, *le, *lg, *lh, *la = NULL;
	float w8 = 0.0f, wg = 0.0f, wa = 0.0f, wae = INFINITY;
	float wb = 0.0f, wbe = INFINITY;
	int32_t tok[128];
	char err[256], desc[512] = "";
	int i, s8, se, sg, sh, sa = -1, n, ret;

	l8 = malloc(hp->n_vocab * sizeof(float));
	le = malloc(hp->n_vocab * sizeof(float));
	lg = malloc(hp->n_vocab * sizeof(float));
	lh = malloc(hp->n_vocab * sizeof(float));
	f32_cache_opts(&o, hp);
	o.max_seqs = 1 + Q8A_SEQS;
	kvq_quant_set_dot_mode(KVQ_DOT_EXACT);
	o.device = KVQ_CTX_GPU;
	ret = kvq_ctx_create(m, &o, &ge, err, sizeof(err));
	kvq_quant_set_dot_mode(KVQ_DOT_INT8);
	if (!ret)
		ret = kvq_ctx_create(m, &o, &g8, err, sizeof(err));
	if (!ret && strstr(kvq_model_gpu_weights(m), "first token_embd")) {
		setenv("KVQ_GPU_INT8_PRODUCTS", "all", 1);
		ret = kvq_ctx_create(m, &o, &ga, err, sizeof(err));
		unsetenv("KVQ_GPU_INT8_PRODUCTS");
		la = malloc(Q8A_SEQS * (size_t)hp->n_vocab * sizeof(float));
	}
	o.device = KVQ_CTX_CPU;
	if (!ret)
		ret = kvq_ctx_create(m, &o, &c8, err, sizeof(err));
	if (!ret)
		ret = kvq_ctx_create(m, &o, &ce, err, sizeof(err));
	if (ret || !l8 || !le || !lg || !lh || (ga && !la)) {
		tap_ok(0, "%s int8 dot mode: context: %s", mname,
		       ret ? err : "out of memory");
		goto out;
	}
	kvq_ctx_describe(g8, desc, sizeof(desc));
	tap_ok(strstr(desc, "int8 x: one-token 8/4-bit gate/up") != NULL,
	       "%s int8 dot mode: the GPU context says which products (%s)",
	       mname, desc);
	if (ga) {
		kvq_ctx_describe(ga, desc, sizeof(desc));
		tap_ok(strstr(desc, "int8 x: one-token 8/4-bit products") != NULL,
		       "%s int8 dot mode, every product: the context says so (%s)",
		       mname, desc);
		sa = kvq_seq_create(ga);
	}
	n = prompt_tokens(m, tok, 128);
	s8 = kvq_seq_create(c8);
	se = kvq_seq_create(ce);
	sg = kvq_seq_create(g8);
	sh = kvq_seq_create(ge);
	for (i = 0; i < Q8A_STEPS; i++) {
		float scale, margin;
		int32_t t = i < n ? tok[i] : tok[n - 1];

		poison(lg, hp->n_vocab);
		poison(lh, hp->n_vocab);
		kvq_quant_set_dot_mode(KVQ_DOT_INT8);
		ret = one_step(c8, s8, &t, 1, l8);
		kvq_quant_set_dot_mode(KVQ_DOT_EXACT);
		ret = ret ? ret : one_step(ce, se, &t, 1, le);
		ret = ret ? ret : one_step(g8, sg, &t, 1, lg);
		ret = ret ? ret : one_step(ge, sh, &t, 1, lh);
		if (!ret && ga && i < Q8A_EQ) {
			poison(la, hp->n_vocab);
			ret = one_step(ga, sa, &t, 1, la);
		}
		if (ret) {
			tap_ok(0, "%s int8 dot mode: step %d failed", mname, i);
			goto out;
		}
		scale = max_abs(l8, hp->n_vocab);
		scale = scale > 0 ? scale : 1;
		w8 = fmaxf(w8, max_diff(lg, l8, hp->n_vocab) / scale);
		wg = fmaxf(wg, max_diff(lg, lh, hp->n_vocab) / scale);
		if (ga && i < Q8A_EQ) {
			wa = fmaxf(wa, max_diff(la, l8, hp->n_vocab) / scale);
			wae = fminf(wae, max_diff(la, le, hp->n_vocab) / scale);
		}
		/* past the prompt, the int8 CPU's greedy choice */
		if (i + 1 >= n)
			tok[n - 1] = argmax(l8, hp->n_vocab, &margin);
	}
	/* A step of new sequences: products of several tokens. */
	for (i = 0; ga && i < Q8A_SEQS; i++) {
		int sq[Q8A_SEQS], ns[Q8A_SEQS];
		int32_t tk[Q8A_SEQS];
		const int32_t *tp[Q8A_SEQS];
		struct kvq_batch b = { Q8A_SEQS, sq, ns, tp, false };
		float scale;

		for (int j = 0; j < Q8A_SEQS; j++) {
			tk[j] = (int32_t)((j * 37 + 5) % hp->n_vocab);
			tp[j] = &tk[j];
			ns[j] = 1;
		}
		if (!i) {
			for (int j = 0; j < Q8A_SEQS; j++)
				sq[j] = kvq_seq_create(ga);
			poison(la, Q8A_SEQS * (size_t)hp->n_vocab);
			if (kvq_step(ga, &b, la)) {
				tap_ok(0, "%s int8 dot mode: GPU step of %d sequences failed",
				       mname, Q8A_SEQS);
				goto out;
			}
		}
		kvq_quant_set_dot_mode(KVQ_DOT_INT8);
		ret = one_step(c8, kvq_seq_create(c8), &tk[i], 1, l8);
		kvq_quant_set_dot_mode(KVQ_DOT_EXACT);
		ret = ret ? ret : one_step(ce, kvq_seq_create(ce), &tk[i], 1,
					   le);
		if (ret) {
			tap_ok(0, "%s int8 dot mode: CPU step failed", mname);
			goto out;
		}
		scale = max_abs(l8, hp->n_vocab);
		scale = scale > 0 ? scale : 1;
		wb = fmaxf(wb, max_diff(la + (size_t)i * hp->n_vocab, l8,
					hp->n_vocab) / scale);
		wbe = fminf(wbe, max_diff(la + (size_t)i * hp->n_vocab, le,
					  hp->n_vocab) / scale);
	}
	if (ga)
		tap_ok(wb <= 1e-5f && wbe >= 10.0f * wb,
		       "%s int8 dot mode: a step of %d new sequences equals their first steps on the int8 CPU (%.3g), the exact CPU's %.3g away",
		       mname, Q8A_SEQS, wb, wbe);
	if (ga)
		tap_ok(wa <= 1e-5f && wae >= 10.0f * wa,
		       "%s int8 dot mode, every product: the first %d steps' logits equal the int8 CPU's (%.3g), the exact CPU's %.3g away",
		       mname, Q8A_EQ, wa, wae);
	tap_ok(wg > 1e-4f && w8 <= Q8A_TOL,
	       "%s int8 dot mode: logits %.3g from the exact GPU's, within %g of the int8 CPU's over %d one-token steps (worst %.3g)",
	       mname, wg, Q8A_TOL, Q8A_STEPS, w8);
out:
	kvq_quant_set_dot_mode(KVQ_DOT_EXACT);
	kvq_ctx_destroy(c8);
	kvq_ctx_destroy(ce);
	kvq_ctx_destroy(g8);
	kvq_ctx_destroy(ge);
	kvq_ctx_destroy(ga);
	free(l8);
	free(le);
	free(lg);
	free(lh);
	free(la);
}

/* Three sequences in one GPU step (a prompt and two decodes) against each
 * run on its own on the CPU. */
static void batch_case(struct kvq_model *m, const char *mname)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab;
	struct kvq_ctx_opts o;
	struct kvq_ctx *cc = NULL, *gc = NULL;
	char err[256];
	int32_t pa[64], pb[64], pc[64];
	int na, nb, nc, sa, sb, s3, ca, cb, c3, i;
	float *lc = malloc(3 * V * sizeof(float));
	float *lg = malloc(3 * V * sizeof(float));
	float worst = 0.0f;

	kvq_ctx_opts_default(&o);
	o.n_ctx = 256 < hp->ctx_len ? 256 : hp->ctx_len;
	o.max_seqs = 4;
	if (kvq_ctx_create(m, &o, &cc, err, sizeof(err)) ||
	    (o.device = KVQ_CTX_GPU,
	     kvq_ctx_create(m, &o, &gc, err, sizeof(err)))) {
		tap_ok(0, "%s batch: context: %s", mname, err);
		goto out;
	}
	nb = prompt_tokens(m, pb, 64);
	for (i = 0; i < 64; i++) {
		pa[i] = (int32_t)((i * 7 + 3) % V);
		pc[i] = (int32_t)((i * 13 + 5) % V);
	}
	na = 9;
	nc = 40;
	sa = kvq_seq_create(gc);
	sb = kvq_seq_create(gc);
	s3 = kvq_seq_create(gc);
	ca = kvq_seq_create(cc);
	cb = kvq_seq_create(cc);
	c3 = kvq_seq_create(cc);
	/* a and b get their prompts first; c comes in while they decode. */
	if (one_step(gc, sa, pa, na, lg) || one_step(gc, sb, pb, nb, lg) ||
	    one_step(cc, ca, pa, na, lc) || one_step(cc, cb, pb, nb, lc)) {
		tap_ok(0, "%s batch: prompts failed", mname);
		goto out;
	}
	{
		int seqs[3] = { sa, s3, sb };
		int ns[3] = { 1, nc, 1 };
		int32_t ta = 17 % V, tb = 23 % V;
		const int32_t *toks[3] = { &ta, pc, &tb };
		struct kvq_batch b = { 3, seqs, ns, toks, false };
		float *ref[3] = { lc, lc + V, lc + 2 * V };

		poison(lg, 3 * V);
		if (kvq_step(gc, &b, lg) || one_step(cc, ca, &ta, 1, ref[0]) ||
		    one_step(cc, c3, pc, nc, ref[1]) ||
		    one_step(cc, cb, &tb, 1, ref[2])) {
			tap_ok(0, "%s batch: mixed step failed", mname);
			goto out;
		}
		for (i = 0; i < 3; i++) {
			float s = max_abs(ref[i], V);
			float d = max_diff(lg + (size_t)i * V, ref[i], V) /
				  (s > 0 ? s : 1);

			if (d > worst)
				worst = d;
		}
	}
	tap_ok(worst <= (exact_weights(m) ? 2e-2f : 8e-2f), "%s: one GPU step of a prompt and two decodes matches three CPU runs (worst %.3g)",
	   mname, worst);
out:
	kvq_ctx_destroy(cc);
	kvq_ctx_destroy(gc);
	free(lc);
	free(lg);
}

/*
 * Decode of 8 sequences at once, 6 steps: the f16 products go to tensor
 * cores (gpu_blas.cu's one-pass kernel), the second step of a shape is
 * captured as a CUDA graph and the rest replay it.  Every row of every step against its sequence run alone
 * on the CPU.  The odd steps write their logits into the context's pinned
 * rows (kvq_ctx_logits_buffer(), no copy on the host), poisoned first: a
 * step that returned before their copy from the device had landed, or put
 * them in other rows, fails the comparison.
 */
static void decode8_case(struct kvq_model *m, const char *mname)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab;
	struct kvq_ctx_opts o;
	struct kvq_ctx *cc = NULL, *gc = NULL;
	float *lc = malloc(V * sizeof(float)), *lg = malloc(8 * V * sizeof(float));
	float tol = exact_weights(m) ? 2e-2f : 8e-2f, worst = 0.0f;
	int gs[8], cs[8], ns[8], i, k, step;
	int32_t pr[8][12], tk[8];
	const int32_t *tp[8];
	char err[256], desc[512];
	unsigned long long n_steps = 0, n_graph = 0;
	float *pin = NULL;
	size_t pin_rows = 0;
	int n_pin = 0;

	kvq_ctx_opts_default(&o);
	o.n_ctx = 64;
	o.max_seqs = 8;
	if (!lc || !lg || kvq_ctx_create(m, &o, &cc, err, sizeof(err)) ||
	    (o.device = KVQ_CTX_GPU,
	     kvq_ctx_create(m, &o, &gc, err, sizeof(err)))) {
		tap_ok(0, "%s decode x8: context: %s", mname, err);
		goto out;
	}
	for (i = 0; i < 8; i++) {
		for (k = 0; k < 12; k++)
			pr[i][k] = (int32_t)((i * 101 + k * 29 + 1) % V);
		gs[i] = kvq_seq_create(gc);
		cs[i] = kvq_seq_create(cc);
		if (one_step(gc, gs[i], pr[i], 5 + i, lg) ||
		    one_step(cc, cs[i], pr[i], 5 + i, lc)) {
			tap_ok(0, "%s decode x8: prompts failed", mname);
			goto out;
		}
		ns[i] = 1;
		tp[i] = &tk[i];
	}
	pin = kvq_ctx_logits_buffer(gc, &pin_rows);
	for (step = 0; step < 6; step++) {
		struct kvq_batch b = { 8, gs, ns, tp, false };
		float *out = (step & 1) && pin && pin_rows >= 8 ? pin : lg;

		for (i = 0; i < 8; i++)
			tk[i] = (int32_t)((step * 53 + i * 7 + 3) % V);
		poison(out, 8 * (size_t)V);
		n_pin += out == pin;
		if (kvq_step(gc, &b, out)) {
			tap_ok(0, "%s decode x8: step %d failed", mname, step);
			goto out;
		}
		for (i = 0; i < 8; i++) {
			float s, d;

			if (one_step(cc, cs[i], &tk[i], 1, lc)) {
				tap_ok(0, "%s decode x8: CPU step failed", mname);
				goto out;
			}
			s = max_abs(lc, V);
			d = max_diff(out + (size_t)i * V, lc, V) / (s > 0 ? s : 1);
			worst = d > worst ? d : worst;
		}
	}
	kvq_ctx_describe(gc, desc, sizeof(desc));
	sscanf(desc, "%llu steps (%llu as CUDA graphs", &n_steps, &n_graph);
	tap_ok(worst <= tol && n_graph >= 4 && n_pin == 3,
	       "%s: 6 decode steps of 8 sequences, %llu as CUDA graphs, %d into the context's pinned rows (%zu), match the CPU (worst %.3g, bound %.3g): %s",
	       mname, n_graph, n_pin, pin_rows, worst, tol, desc);
out:
	kvq_ctx_destroy(cc);
	kvq_ctx_destroy(gc);
	free(lc);
	free(lg);
}

/* A prefix shared on the GPU (kvq_seq_fork: pages shared, the partial page
 * copied on write, the sink copies copied) against the CPU computing each
 * sequence alone. */
static void fork_case(struct kvq_model *m, const char *mname)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab, i;
	struct kvq_ctx_opts o;
	struct kvq_ctx *cc = NULL, *gc = NULL;
	int32_t ta[41], tb[41];
	float *lg = malloc(V * sizeof(float)), *lc = malloc(V * sizeof(float));
	float tol = exact_weights(m) ? 2e-2f : 8e-2f, worst = 0.0f, s;
	char err[256];
	int a, b, c1, c2, ret = 0;

	kvq_ctx_opts_default(&o);
	o.n_ctx = 128;
	o.max_seqs = 4;
	if (kvq_ctx_create(m, &o, &cc, err, sizeof(err)) ||
	    (o.device = KVQ_CTX_GPU,
	     kvq_ctx_create(m, &o, &gc, err, sizeof(err)))) {
		tap_ok(0, "%s fork: context: %s", mname, err);
		goto out;
	}
	for (i = 0; i < 41; i++) {
		ta[i] = (int32_t)((i * 37 + 11) % V);
		tb[i] = i < 13 ? ta[i] : (int32_t)((i * 53 + 7) % V);
	}
	a = kvq_seq_create(gc);
	b = kvq_seq_create(gc);
	c1 = kvq_seq_create(cc);
	c2 = kvq_seq_create(cc);
	ret |= one_step(gc, a, ta, 40, lg);
	ret |= kvq_seq_fork(gc, b, a, 13);
	ret |= one_step(gc, b, tb + 13, 27, lg);
	poison(lg, V);
	ret |= one_step(gc, b, tb + 40, 1, lg);
	ret |= one_step(cc, c1, tb, 40, lc);
	ret |= one_step(cc, c1, tb + 40, 1, lc);
	s = max_abs(lc, V);
	worst = max_diff(lg, lc, V) / (s > 0 ? s : 1);
	poison(lg, V);
	ret |= one_step(gc, a, ta + 40, 1, lg);
	ret |= one_step(cc, c2, ta, 40, lc);
	ret |= one_step(cc, c2, ta + 40, 1, lc);
	s = max_abs(lc, V);
	s = max_diff(lg, lc, V) / (s > 0 ? s : 1);
	if (s > worst)
		worst = s;
	tap_ok(!ret && worst <= tol,
	       "%s: a prefix forked on the GPU gives both sequences the CPU's logits (worst %.3g)",
	       mname, worst);
out:
	kvq_ctx_destroy(cc);
	kvq_ctx_destroy(gc);
	free(lg);
	free(lc);
}

/* The GPU multiplies this model's matrices as f16 values (f16 rows, or
 * Q8_0 and Q4_0 rows expanded to them): every type but F32. */
static bool f16_on_gpu(struct kvq_model *m)
{
	return !strstr(kvq_model_desc(m), ", F32,");
}

/*
 * A Q4_K / Q6_K model whose weights in f16 would not fit in three quarters
 * of the free device memory (KVQ_GPU_FAULT=small-memory) is uploaded as
 * KVQ_GPU_WEIGHTS=compact would (the same device bytes, fewer than f16's);
 * with the memory it has, as f16.
 */
static void auto_compact_case(const char *path)
{
	const char *base = strrchr(path, '/');
	uint64_t bd, bs, bc, bf;
	bool q8, kq;
	uint32_t V;

	base = base ? base + 1 : path;
	if (!model_kind(path, &q8, &kq, &V) || !kq)
		return;
	bd = upload_bytes(path, NULL, NULL);
	bs = upload_bytes(path, NULL, "small-memory");
	bc = upload_bytes(path, "compact", NULL);
	bf = upload_bytes(path, "f16", NULL);
	tap_ok(bs && bs == bc && bs < bd && bd == bf,
	       "%s: short of device memory, Q4_K / Q6_K kept 4/8-bit on their own: %llu bytes (compact %llu), with room as f16: %llu (f16 %llu)",
	       base, (unsigned long long)bs, (unsigned long long)bc,
	       (unsigned long long)bd, (unsigned long long)bf);
}

/*
 * A Q8_0, Q4_0, Q4_K or Q6_K model's logits with its weights kept as they
 * are (KVQ_GPU_WEIGHTS=compact; the default for Q8_0 and Q4_0) and with
 * them converted to f16 at load (KVQ_GPU_WEIGHTS=f16):
 * the kernels multiply the f16 values of the weights, so every logit is
 * the same float, bit for bit.  A prompt of 3 tokens, 12 one-token steps (the
 * small product, the norm inside), then one step of 9 sequences (the
 * one-pass tensor-core product).  Other models: nothing.
 */
static void quant_values_case(const char *path)
{
	const char *base = strrchr(path, '/');
	size_t n, i, diff = 0;
	float *l[2];
	char err[256];
	uint32_t V;
	bool q8, kq;

	base = base ? base + 1 : path;
	if (!model_kind(path, &q8, &kq, &V) || !q8)
		return;
	n = (size_t)(QV_STEPS + 1 + QV_SEQS) * V;
	l[0] = malloc(n * sizeof(float));
	l[1] = malloc(n * sizeof(float));
	if (!l[0] || !l[1]) {
		tap_ok(0, "%s: 8/4-bit rows against f16: out of memory", base);
		goto done;
	}
	poison(l[0], n);
	poison(l[1], n);
	if (quant_values_run(path, false, l[0], V, err, sizeof(err)) ||
	    quant_values_run(path, true, l[1], V, err, sizeof(err))) {
		tap_ok(0, "%s: 8/4-bit rows against f16: %s", base, err);
		goto done;
	}
	for (i = 0; i < n; i++)
		diff += memcmp(&l[0][i], &l[1][i], sizeof(float)) != 0 ||
			isnan(l[0][i]);
	tap_ok(diff == 0,
	       "%s: kept as it is, the logits of its f16 copy bit for bit (%d steps of one token, one of %d sequences: %zu of %zu differ)",
	       base, QV_STEPS, QV_SEQS, diff, n);
done:
	free(l[0]);
	free(l[1]);
}

/* max over rows of max|a - b| / max|ref| in that row */
static float rows_diff(const float *a, const float *b, const float *ref,
		       int rows, uint32_t V)
{
	float worst = 0.0f;
	int r;

	for (r = 0; r < rows; r++) {
		size_t o = (size_t)r * V;
		float s = max_abs(ref + o, V);
		float d = max_diff(a + o, b + o, V) / (s > 0 ? s : 1);

		if (d > worst)
			worst = d;
	}
	return worst;
}

#define SK_SEQS 16

/*
 * Decode steps of 2, 5, 9 and 16 sequences with KVQ_GPU_MV_MAX=1, so
 * that every f16 product of them goes to the one-pass tensor-core kernel
 * of gpu_blas.cu (one and two 8-token tiles, a last tile part empty),
 * against each sequence run alone on the CPU (f32 cache: within 1e-4 of
 * the largest logit where the weights reach the GPU unchanged, 1e-2 where
 * they become f16) and against the same steps through cuBLAS
 * (KVQ_GPU_NO_TCMV=1, the same f16 weights and halves: within 1e-4).
 * Up to 8 tokens the product reads the activations itself and gate/up
 * writes SwiGLU's output; a third context takes the way of 9-16 tokens
 * there too (KVQ_GPU_TC_PREP=1: the halves from a kernel before each
 * product, gate/up's SwiGLU output from them), against cuBLAS within
 * 1e-4 as well.  The context must say which kernel it used.
 */
static void skinny_case(struct kvq_model *m, const char *mname)
{
	static const int sizes[] = { 2, 5, 9, 16 };
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab;
	float *lc = malloc(V * sizeof(float));
	float *lg[3] = { malloc(SK_SEQS * (size_t)V * sizeof(float)),
			 malloc(SK_SEQS * (size_t)V * sizeof(float)),
			 malloc(SK_SEQS * (size_t)V * sizeof(float)) };
	float tol = exact_weights(m) ? 1e-4f : 1e-2f;
	float worst[4] = { 0 }, vs[4] = { 0 }, vp[4] = { 0 };
	struct kvq_ctx_opts o;
	struct kvq_ctx *cc = NULL, *gc[3] = { NULL, NULL, NULL };
	int cs[SK_SEQS], gs[3][SK_SEQS], ns[SK_SEQS], i, k, r, z;
	int32_t pr[SK_SEQS][8], tk[SK_SEQS];
	const int32_t *tp[SK_SEQS];
	char err[256], desc[3][512];
	bool blas = false, said[2];

#ifdef KVQ_HAVE_CUDA
	blas = true;
#endif
	if (!f16_on_gpu(m) || !blas) {
		tap_diag("%s: no one-pass tensor-core products: %s", mname,
			 blas ? "the GPU does not hold f16 weights" :
			 "no cuBLAS in this build");
		goto out;
	}
	f32_cache_opts(&o, hp);
	o.n_ctx = 64 < hp->ctx_len ? 64 : hp->ctx_len;
	o.max_seqs = SK_SEQS;
	if (!lc || !lg[0] || !lg[1] || !lg[2] ||
	    kvq_ctx_create(m, &o, &cc, err, sizeof(err))) {
		tap_ok(0, "%s skinny: CPU context: %s", mname, err);
		goto out;
	}
	o.device = KVQ_CTX_GPU;
	setenv("KVQ_GPU_MV_MAX", "1", 1);
	for (r = 0; r < 3; r++) {
		if (r == 1)
			setenv("KVQ_GPU_NO_TCMV", "1", 1);
		if (r == 2) {
			unsetenv("KVQ_GPU_NO_TCMV");
			setenv("KVQ_GPU_TC_PREP", "1", 1);
		}
		if (kvq_ctx_create(m, &o, &gc[r], err, sizeof(err))) {
			tap_ok(0, "%s skinny: GPU context %d: %s", mname, r,
			       err);
			unsetenv("KVQ_GPU_NO_TCMV");
			unsetenv("KVQ_GPU_TC_PREP");
			unsetenv("KVQ_GPU_MV_MAX");
			goto out;
		}
	}
	unsetenv("KVQ_GPU_TC_PREP");
	unsetenv("KVQ_GPU_MV_MAX");
	for (i = 0; i < SK_SEQS; i++) {
		for (k = 0; k < 8; k++)
			pr[i][k] = (int32_t)((i * 67 + k * 31 + 2) % V);
		cs[i] = kvq_seq_create(cc);
		if (one_step(cc, cs[i], pr[i], 3 + i % 6, lc)) {
			tap_ok(0, "%s skinny: CPU prompt failed", mname);
			goto out;
		}
		for (r = 0; r < 3; r++) {
			gs[r][i] = kvq_seq_create(gc[r]);
			if (one_step(gc[r], gs[r][i], pr[i], 3 + i % 6,
				     lg[r])) {
				tap_ok(0, "%s skinny: GPU prompt failed", mname);
				goto out;
			}
		}
		ns[i] = 1;
		tp[i] = &tk[i];
	}
	for (z = 0; z < 4; z++) {
		int n = sizes[z];

		for (i = 0; i < n; i++)
			tk[i] = (int32_t)((z * 41 + i * 13 + 5) % V);
		for (r = 0; r < 3; r++) {
			struct kvq_batch b = { n, gs[r], ns, tp, false };

			poison(lg[r], (size_t)n * V);
			if (kvq_step(gc[r], &b, lg[r])) {
				tap_ok(0, "%s skinny: GPU step of %d failed",
				       mname, n);
				goto out;
			}
		}
		for (i = 0; i < n; i++) {
			float sc, d;

			if (one_step(cc, cs[i], &tk[i], 1, lc)) {
				tap_ok(0, "%s skinny: CPU step failed", mname);
				goto out;
			}
			sc = max_abs(lc, V);
			sc = sc > 0 ? sc : 1;
			d = max_diff(lg[0] + (size_t)i * V, lc, V) / sc;
			worst[z] = d > worst[z] ? d : worst[z];
			d = max_diff(lg[0] + (size_t)i * V,
				     lg[1] + (size_t)i * V, V) / sc;
			vs[z] = d > vs[z] ? d : vs[z];
			d = max_diff(lg[2] + (size_t)i * V,
				     lg[1] + (size_t)i * V, V) / sc;
			vp[z] = d > vp[z] ? d : vp[z];
		}
	}
	for (r = 0; r < 3; r++)
		kvq_ctx_describe(gc[r], desc[r], sizeof(desc[r]));
	said[0] = strstr(desc[0], "one pass over the weights") != NULL;
	said[1] = strstr(desc[1], "cuBLAS on tensor cores") &&
		  !strstr(desc[1], "one pass over the weights");
	for (z = 0; z < 4; z++)
		tap_ok(worst[z] <= tol && vs[z] <= 1e-4f && vp[z] <= 1e-4f &&
		       said[0],
		       "%s: a decode step of %d sequences on the one-pass tensor-core product: logits within %g of the CPU's (worst %.3g), within 1e-4 of cuBLAS's (%.3g; with KVQ_GPU_TC_PREP=1 %.3g)",
		       mname, sizes[z], tol, worst[z], vs[z], vp[z]);
	tap_ok(said[0] && said[1],
	       "%s: the contexts say which product they use (%s | %s)",
	       mname, desc[0], desc[1]);
out:
	kvq_ctx_destroy(cc);
	kvq_ctx_destroy(gc[0]);
	kvq_ctx_destroy(gc[1]);
	kvq_ctx_destroy(gc[2]);
	free(lc);
	free(lg[0]);
	free(lg[1]);
	free(lg[2]);
}

#define BLAS_A 100	/* prompt tokens, then */
#define BLAS_B 37	/* more of the same sequence */

/*
 * The products of a prompt (more than 16 tokens): through cuBLAS where the
 * GPU holds f16 weights in a CUDA build, through the tiled kernel with
 * KVQ_GPU_NO_CUBLAS set, and through the tiled kernel again when cuBLAS is
 * made to fail at creation (KVQ_GPU_FAULT=cublas), which the context must
 * say.  Every row's logits against the CPU's, with an f32 cache: within
 * 1e-4 where the weights reach the GPU unchanged (1e-2 where they become
 * f16); cuBLAS against the tiled kernel (the same f16 weights) within
 * 1e-4 always: rounding the activations to f16 would cost 2^-11 per
 * element, the split into two halves about 2^-22.
 */
static void blas_case(struct kvq_model *m, const char *mname)
{
	static const struct {
		const char *name, *env, *val;
	} runs[] = {
		{ "default", NULL, NULL },
		{ "KVQ_GPU_NO_CUBLAS=1", "KVQ_GPU_NO_CUBLAS", "1" },
		{ "KVQ_GPU_FAULT=cublas", "KVQ_GPU_FAULT", "cublas" },
	};
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab, i;
	size_t nl = (size_t)(BLAS_A + BLAS_B) * V;
	float *lc = malloc(nl * sizeof(float)), *lg = malloc(nl * sizeof(float));
	float *l0 = malloc(nl * sizeof(float));
	/*
	 * Weights beyond f16's range (matrices kept f32, f16_range_case())
	 * come with activations of as wide a range, which the prompt's f16
	 * K/V and f16 halves hold to about 1e-3 of the largest logit
	 * (llama-bf16-big: 6e-4 through cuBLAS, 3e-3 through the tiled
	 * kernel; its decode steps, f32 throughout, stay within 1e-6).
	 */
	bool wide = strstr(kvq_model_gpu_weights(m), "beyond f16's range");
	float tol = exact_weights(m) && !wide ? 1e-4f : 1e-2f;
	float tol0 = wide ? 1e-2f : 1e-4f;
	bool blas = false;
	struct kvq_ctx_opts o;
	struct kvq_ctx *cc = NULL;
	int32_t tok[BLAS_A + BLAS_B];
	char err[256], desc[512];
	int r, sq;

#ifdef KVQ_HAVE_CUDA
	blas = true;		/* HIP builds have no cuBLAS */
#endif
	blas = blas && f16_on_gpu(m);
	f32_cache_opts(&o, hp);
	for (i = 0; i < BLAS_A + BLAS_B; i++)
		tok[i] = (int32_t)((i * 29 + 5) % V);
	poison(l0, nl);	/* a first run that fails fails the others */
	if (o.n_ctx < BLAS_A + BLAS_B ||
	    kvq_ctx_create(m, &o, &cc, err, sizeof(err))) {
		tap_ok(0, "%s prompt products: CPU context: %s", mname,
		       o.n_ctx < BLAS_A + BLAS_B ? "context too short" : err);
		goto out;
	}
	sq = kvq_seq_create(cc);
	if (seq_step(cc, sq, tok, BLAS_A, true, lc) ||
	    seq_step(cc, sq, tok + BLAS_A, BLAS_B, true,
		     lc + (size_t)BLAS_A * V)) {
		tap_ok(0, "%s prompt products: CPU steps failed", mname);
		goto out;
	}
	for (r = 0; r < 3; r++) {
		struct kvq_ctx *gc = NULL;
		const char *fb;
		float worst, vs0 = 0.0f;
		bool said, ok;
		int ret;

		if (runs[r].env)
			setenv(runs[r].env, runs[r].val, 1);
		o.device = KVQ_CTX_GPU;
		ret = kvq_ctx_create(m, &o, &gc, err, sizeof(err));
		if (runs[r].env)
			unsetenv(runs[r].env);
		if (ret) {
			tap_ok(0, "%s prompt products (%s): context: %s", mname,
			       runs[r].name, err);
			continue;
		}
		sq = kvq_seq_create(gc);
		poison(lg, nl);
		ret = seq_step(gc, sq, tok, BLAS_A, true, lg) ||
		      seq_step(gc, sq, tok + BLAS_A, BLAS_B, true,
			       lg + (size_t)BLAS_A * V);
		worst = rows_diff(lg, lc, lc, BLAS_A + BLAS_B, V);
		fb = kvq_ctx_fallback(gc);
		kvq_ctx_describe(gc, desc, sizeof(desc));
		tap_diag("%s (%s): %s%s%s", mname, runs[r].name, desc,
			 fb ? "; fallback: " : "", fb ? fb : "");
		if (r == 0) {
			memcpy(l0, lg, nl * sizeof(float));
			said = !fb && strstr(desc, blas ? "cuBLAS on tensor cores" :
					     "tokens: tiled kernel");
		} else {
			vs0 = rows_diff(lg, l0, lc, BLAS_A + BLAS_B, V);
			said = strstr(desc, "tokens: tiled kernel") &&
			       (r == 1 || !blas ? !fb :
				fb && strstr(fb, "cuBLAS off"));
		}
		ok = !ret && worst <= tol && said && vs0 <= tol0;
		if (r)
			snprintf(err, sizeof(err), ", %s within %g of the first run's",
				 vs0 <= tol0 ? "and" : "NOT", tol0);
		tap_ok(ok, "%s: a prompt of %d + %d tokens, %s: %s, every row's logits within %g of the CPU's (worst %.3g)%s",
		       mname, BLAS_A, BLAS_B, runs[r].name,
		       r == 0 && blas ? "cuBLAS" : "tiled kernel", tol, worst,
		       r ? err : "");
		if (!said)
			tap_diag("%s (%s): the context does not say what it should (cuBLAS expected: %s)",
				 mname, runs[r].name, blas ? "yes" : "no");
		kvq_ctx_destroy(gc);
	}
out:
	kvq_ctx_destroy(cc);
	free(lc);
	free(lg);
	free(l0);
}

/*
 * Key centring (engine/kvcache.h): with centres on the model
 * (m->kv_center, where kvsmooth.c puts them; random ones in [-1, 1) unless
 * the model has its own, so that a score missing q . R_p c moves by about
 * a key's size), the CPU and GPU contexts centre their q8/q4 and q8/q8
 * caches alike and the logits agree as without centring: greedy_case()'s
 * prompt and 120 decode steps (head_dim 64 and 128 layers leave the fused
 * decode kernel for the split one) and batch_case()'s step of a prompt and
 * two decodes.  The model keeps the centres (it frees them).
 */
static void center_case(struct kvq_model *m, const char *mname)
{
	static const struct kvset sets[] = {
		{ "q8/q4 centred", KVQ_KV_Q8, KVQ_KV_Q4, 2e-2f },
		{ "q8/q8 centred", KVQ_KV_Q8, KVQ_KV_Q8, 2e-2f },
	};
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	size_t n = (size_t)hp->n_layers * hp->n_kv_heads * hp->head_dim, i;
	uint64_t x = 0x2545f4914f6cdd1dull;
	char name[340];

	snprintf(name, sizeof(name), "%s (%s key centres)", mname,
		 m->kv_center ? "its" : "random");
	if (!m->kv_center) {
		m->kv_center = malloc(n * sizeof(float));
		if (!m->kv_center) {
			tap_ok(0, "%s: out of memory", name);
			return;
		}
		for (i = 0; i < n; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			m->kv_center[i] = (float)(x >> 40) / 8388608.0f - 1.0f;
		}
	}
	for (i = 0; i < sizeof(sets) / sizeof(sets[0]); i++)
		greedy_case(m, name, &sets[i]);
	batch_case(m, name);
}

#ifdef KVQ_ATTN_GPU
/*
 * Decode while no CUDA graph can be made: first with instantiation made
 * to fail (KVQ_GPU_FAULT=graph), then with the device's memory really
 * full (another allocation holds all of it) when the step shapes repeat.
 * Every step must still succeed with the CPU's logits (kernel by kernel
 * when no graph could be made), the context must say why
 * (kvq_ctx_fallback()) when graphs were given up, a new context made while
 * the memory is held must either be refused with a message about memory
 * or work, and steps must go on once the memory is back.
 */
static void no_graph_case(struct kvq_model *m, const char *mname, int real)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab;
	struct kvq_ctx_opts o;
	struct kvq_ctx *cc = NULL, *gc = NULL, *gx = NULL;
	float *lg = malloc(V * sizeof(float)), *lc = malloc(V * sizeof(float));
	float tol = exact_weights(m) ? 1e-4f : 8e-2f, worst = 0.0f, d, sc;
	void *fill[4096];
	size_t n_fill = 0, chunk, held = 0;
	const char *fb;
	char err[256], desc[512];
	int32_t tok[128];
	int n, i, a, c, ret = 0, refused = 0;

	f32_cache_opts(&o, hp);
	if (!real)
		setenv("KVQ_GPU_FAULT", "graph", 1);
	if (kvq_ctx_create(m, &o, &cc, err, sizeof(err)) ||
	    (o.device = KVQ_CTX_GPU,
	     kvq_ctx_create(m, &o, &gc, err, sizeof(err)))) {
		unsetenv("KVQ_GPU_FAULT");
		tap_ok(0, "%s no graph: context: %s", mname, err);
		goto out;
	}
	unsetenv("KVQ_GPU_FAULT");
	n = prompt_tokens(m, tok, 64);
	a = kvq_seq_create(gc);
	c = kvq_seq_create(cc);
	for (i = 0; i < 10 && !ret; i++) {
		if (real && i == 2) {
			/* Take every byte the device will give. */
			for (chunk = (size_t)1 << 30; chunk >= 4096 &&
			     n_fill < 4096; ) {
				void *q = kvq_test_gpu_alloc(chunk);

				if (q) {
					fill[n_fill++] = q;
					held += chunk;
				} else {
					chunk /= 2;
				}
			}
			o.device = KVQ_CTX_GPU;
			if (kvq_ctx_create(m, &o, &gx, err, sizeof(err))) {
				refused = strstr(err, "memory") ? 1 : -1;
			} else {
				/* Its buffers fitted what was left. */
				int x = kvq_seq_create(gx);

				refused = one_step(gx, x, tok, n, lg) ? -1 : 0;
				snprintf(err, sizeof(err), "created, and it ran a step");
			}
			tap_diag("%s: holding %.1f GiB of device memory; a new context: %s",
				 mname, held / 1073741824.0, err);
		}
		poison(lg, V);
		ret |= one_step(gc, a, tok, n, lg);
		ret |= one_step(cc, c, tok, n, lc);
		sc = max_abs(lc, V);
		d = max_diff(lg, lc, V) / (sc > 0 ? sc : 1);
		if (d > worst)
			worst = d;
		tok[0] = argmax(lc, V, &sc);
		n = 1;
		if (real && i == 7) {
			while (n_fill)
				kvq_test_gpu_free(fill[--n_fill]);
		}
	}
	fb = kvq_ctx_fallback(gc);
	kvq_ctx_describe(gc, desc, sizeof(desc));
	tap_diag("%s: %s", mname, desc);
	if (real) {
		tap_ok(!ret && worst <= tol && refused >= 0 &&
		       (!fb || strstr(desc, "graphs off")),
		       "%s: decode with the device memory held: every step runs with the CPU's logits (worst %.3g), a new context %s, graphs: %s",
		       mname, worst, refused > 0 ? "is refused naming memory" :
		       refused == 0 ? "still fitted and ran" : "FAILED without a clear message",
		       fb ? fb : "made (instantiation needed no more memory)");
	} else {
		tap_ok(!ret && worst <= tol && fb && strstr(fb, "graphs off") &&
		       strstr(desc, "graphs off"),
		       "%s: decode with CUDA graphs failing: every step runs with the CPU's logits (worst %.3g) and the context says so (%s)",
		       mname, worst, fb ? fb : "nothing");
	}
out:
	while (n_fill)
		kvq_test_gpu_free(fill[--n_fill]);
	kvq_ctx_destroy(gx);
	kvq_ctx_destroy(cc);
	kvq_ctx_destroy(gc);
	free(lg);
	free(lc);
}

/*
 * Decode steps normalize inside the small products (mv_kernel(): the
 * residual add writes x * g for the next norm and the product after it
 * scales by 1 / rms) unless KVQ_GPU_NO_FUSED_NORM is set at context
 * creation, which brings back the separate norm kernel.  The two differ by
 * rounding only (the sum of squares in f32 against double, x * g before
 * the dot instead of after the scale): logits within 1e-5 of each other
 * over 20 greedy steps of the same tokens (f32 cache); and a second fused
 * context gives the same bits.
 */
static void fused_norm_case(struct kvq_model *m, const char *mname)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	struct kvq_ctx_opts o;
	struct kvq_ctx *gc[3] = { NULL, NULL, NULL };
	float *lg[3] = { NULL, NULL, NULL };
	float worst = 0.0f;
	int32_t tok[128];
	int seq[3], n, i, j, same = 1, ret = 0;
	char err[256];

	f32_cache_opts(&o, hp);	/* no KV rounding to amplify */
	o.device = KVQ_CTX_GPU;
	for (j = 0; j < 3 && !ret; j++) {
		if (j == 1)
			setenv("KVQ_GPU_NO_FUSED_NORM", "1", 1);
		ret = kvq_ctx_create(m, &o, &gc[j], err, sizeof(err));
		unsetenv("KVQ_GPU_NO_FUSED_NORM");
		lg[j] = malloc(hp->n_vocab * sizeof(float));
	}
	if (ret || !lg[0] || !lg[1] || !lg[2]) {
		tap_ok(0, "%s fused norm: context: %s", mname, ret ? err : "memory");
		goto out;
	}
	n = prompt_tokens(m, tok, 128);
	for (j = 0; j < 3; j++)
		seq[j] = kvq_seq_create(gc[j]);
	for (i = 0; i < 21; i++) {
		float scale, d;

		for (j = 0; j < 3; j++) {
			poison(lg[j], hp->n_vocab);
			if (one_step(gc[j], seq[j], tok, n, lg[j])) {
				tap_ok(0, "%s fused norm: step %d failed", mname, i);
				goto out;
			}
		}
		scale = max_abs(lg[1], hp->n_vocab);
		d = max_diff(lg[0], lg[1], hp->n_vocab) / (scale > 0 ? scale : 1);
		if (d > worst)
			worst = d;
		if (memcmp(lg[0], lg[2], hp->n_vocab * sizeof(float)))
			same = 0;
		tok[0] = argmax(lg[1], hp->n_vocab, &d);
		n = 1;
	}
	tap_ok(worst <= 1e-5f, "%s fused norm: 20 decode steps within 1e-5 of "
	       "the separate norm kernel's logits (worst %.3g)", mname, worst);
	tap_ok(same, "%s fused norm: a second context gives the same bits",
	       mname);
out:
	for (j = 0; j < 3; j++) {
		kvq_ctx_destroy(gc[j]);
		free(lg[j]);
	}
}
#endif /* KVQ_ATTN_GPU */

/*
 * kvq_step_sample() on the GPU.  Four sequences (greedy, the default
 * settings, top-p 0.9 at T 1.3, the whole vocabulary at T 1) decode 40
 * tokens chosen on the device.  Context A also takes the logits back:
 * every id must be what the host sampler picks from that row with the same
 * draw (a twin sampler's kvq_sampler_next_u()), unless u moved by 2e-6
 * relative picks it too.  Context B takes only the ids back and must
 * choose the same tokens.  A step refused for a full context leaves the
 * samplers' states as they were.
 */
#define N_SMP 4
#define N_SMP_STEPS 40

static void sample_case(struct kvq_model *m, const char *mname)
{
	static const struct kvq_sampler_params sp[N_SMP] = {
		{ 0.0f, 40, 0.95f, 0.05f, 11 },
		{ 0.8f, 40, 0.95f, 0.05f, 12 },
		{ 1.3f, 0, 0.9f, 0.0f, 13 },
		{ 1.0f, 0, 1.0f, 0.0f, 14 },
	};
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab;
	struct kvq_sampler sa[N_SMP], sb[N_SMP], tw[N_SMP];
	struct kvq_sampler *pa[N_SMP], *pb[N_SMP];
	struct kvq_ctx_opts o;
	struct kvq_ctx *ga = NULL, *gb = NULL, *gf = NULL;
	int seqa[N_SMP], seqb[N_SMP], sfs[N_SMP], one[N_SMP], i, k, n, ret;
	int32_t tok[128], cura[N_SMP], curb[N_SMP], ida[N_SMP], idb[N_SMP];
	const int32_t *ta[N_SMP], *tb[N_SMP];
	int bad = 0, near = 0, apart = 0, changes = 0, prev = -1;
	unsigned long long n_dev = 0;
	float *lg = malloc((size_t)N_SMP * V * sizeof(float));
	struct kvq_batch ba = { 0 }, bb = { 0 };
	uint64_t before[4];
	char err[256];

	kvq_ctx_opts_default(&o);
	o.n_ctx = 256 < hp->ctx_len ? 256 : hp->ctx_len;
	o.max_seqs = N_SMP;
	o.device = KVQ_CTX_GPU;
	ret = kvq_ctx_create(m, &o, &ga, err, sizeof(err));
	if (!ret)
		ret = kvq_ctx_create(m, &o, &gb, err, sizeof(err));
	if (ret || !lg) {
		tap_ok(0, "%s sampling: context: %s", mname, err);
		goto out;
	}
	n = prompt_tokens(m, tok, 128);
	for (i = 0; i < N_SMP; i++) {
		kvq_sampler_init(&sa[i], &sp[i], (int32_t)V);
		kvq_sampler_init(&sb[i], &sp[i], (int32_t)V);
		kvq_sampler_init(&tw[i], &sp[i], (int32_t)V);
		pa[i] = &sa[i];
		pb[i] = &sb[i];
		seqa[i] = kvq_seq_create(ga);
		seqb[i] = kvq_seq_create(gb);
		/* the prompt but its last token; that one starts the decode */
		ret |= seq_step(ga, seqa[i], tok, n - 1, false, lg);
		ret |= seq_step(gb, seqb[i], tok, n - 1, false, lg);
		cura[i] = curb[i] = tok[n - 1];
		one[i] = 1;
		ta[i] = &cura[i];
		tb[i] = &curb[i];
	}
	ba.n = bb.n = N_SMP;
	ba.seq = seqa;
	bb.seq = seqb;
	ba.n_tokens = bb.n_tokens = one;
	ba.tokens = ta;
	bb.tokens = tb;
	for (k = 0; k < N_SMP_STEPS && !ret; k++) {
		poison(lg, (size_t)N_SMP * V);
		ret = kvq_step_sample(ga, &ba, pa, ida, lg);
		ret |= kvq_step_sample(gb, &bb, pb, idb, NULL);
		for (i = 0; i < N_SMP && !ret; i++) {
			const float *row = lg + (size_t)i * V;
			double u = kvq_sampler_next_u(&tw[i]);
			int32_t ref = u < 0 ? kvq_argmax(row, (int32_t)V) :
				      kvq_sampler_sample_u(&tw[i], row, u);

			if (ida[i] != ref) {
				if (u >= 0 &&
				    (kvq_sampler_sample_u(&tw[i], row,
						u * (1 - 2e-6)) == ida[i] ||
				     kvq_sampler_sample_u(&tw[i], row,
						u * (1 + 2e-6)) == ida[i])) {
					near++;
				} else {
					bad++;
					tap_diag("%s sampling: step %d row %d: device %d, host %d (u %.9f)",
						 mname, k, i, ida[i], ref, u);
				}
			}
			apart += idb[i] != ida[i];
			if (i == 3) {
				changes += ida[i] != prev;
				prev = ida[i];
			}
			cura[i] = ida[i];
			curb[i] = idb[i];
		}
	}
	tap_ok(!ret && k == N_SMP_STEPS && !bad && near <= 2 && changes > 10,
	       "%s sampling: %d steps x %d rows sampled on the device equal the host sampler's choice from the same logits and draws (%d within 2e-6 of a boundary; %d changes of token at T 1)",
	       mname, k, N_SMP, near, changes);
	n_dev = kvq_ctx_device_sampled(gb);
	tap_ok(!ret && !apart && n_dev == (unsigned long long)N_SMP * k,
	       "%s sampling: ids alone (no logits back) give the same tokens; %llu counted as sampled on the device",
	       mname, n_dev);

	/* One row: on the device when it samples the whole vocabulary
	 * (sp[3]) or is greedy (sp[0]); with top-k 40 on the host. */
	{
		static const int which[3] = { 3, 1, 0 };
		unsigned long long before_n = n_dev;
		int got[3];

		bb.n = 1;
		for (i = 0; i < 3; i++) {
			bb.seq = &seqb[which[i]];
			bb.tokens = &tb[which[i]];
			ret |= kvq_step_sample(gb, &bb, &pb[which[i]], idb, NULL);
			got[i] = (int)(kvq_ctx_device_sampled(gb) - before_n);
			before_n += (unsigned long long)got[i];
		}
		tap_ok(!ret && got[0] == 1 && got[1] == 0 && got[2] == 1,
		       "%s sampling: a single row goes to the device for the whole vocabulary (%d) and greedy (%d), to the host for top-k 40 (%d)",
		       mname, got[0], got[2], got[1]);
		bb.n = N_SMP;
		bb.seq = seqb;
		bb.tokens = tb;
	}

	/* Full contexts refuse the step, and the draws are given back. */
	o.n_ctx = 16;
	ret = kvq_ctx_create(m, &o, &gf, err, sizeof(err));
	for (i = 0; i < 16; i++)
		tok[i] = (int32_t)((i * 7 + 3) % V);
	for (i = 0; i < N_SMP && !ret; i++) {
		sfs[i] = kvq_seq_create(gf);
		ret = seq_step(gf, sfs[i], tok, 16, false, lg);
	}
	memcpy(before, sa[1].rng, sizeof(before));
	ba.seq = sfs;
	ret = ret ? ret : kvq_step_sample(gf, &ba, pa, ida, NULL);
	tap_ok(ret == -ENOSPC && !memcmp(before, sa[1].rng, sizeof(before)),
	       "%s sampling: a step refused for full contexts (%d) leaves the samplers' states", mname, ret);
	for (i = 0; i < N_SMP; i++) {
		kvq_sampler_fini(&sa[i]);
		kvq_sampler_fini(&sb[i]);
		kvq_sampler_fini(&tw[i]);
	}
out:
	kvq_ctx_destroy(ga);
	kvq_ctx_destroy(gb);
	kvq_ctx_destroy(gf);
	free(lg);
}

/*
 * kv_key_rounding = queries is the CPU's: with the key moments on the
 * model, a GPU context is refused, naming the setting, and a CPU context
 * is still made.
 */
static void key_rounding_refused(struct kvq_model *m, const char *mname)
{
	struct kvq_ctx_opts o;
	struct kvq_ctx *c = NULL;
	char err[256] = "";
	int ret;

	kvq_ctx_opts_default(&o);
	o.n_ctx = 64;
	o.max_seqs = 1;
	ret = kvq_kv_key_moments(m);
	tap_ok(!ret, "%s key moments measured (%d)", mname, ret);
	if (ret)
		return;
	o.device = KVQ_CTX_GPU;
	ret = kvq_ctx_create(m, &o, &c, err, sizeof(err));
	tap_ok(ret == -EOPNOTSUPP && !c && strstr(err, "kv_key_rounding"),
	       "%s kv_key_rounding = queries: a GPU context is refused: %s",
	       mname, err);
	kvq_ctx_destroy(c);
	c = NULL;
	o.device = KVQ_CTX_CPU;
	ret = kvq_ctx_create(m, &o, &c, err, sizeof(err));
	tap_ok(!ret && c, "%s kv_key_rounding = queries: a CPU context is made%s%s",
	       mname, ret ? ": " : "", ret ? err : "");
	kvq_ctx_destroy(c);
}

int main(int argc, char **argv)
{
	struct kvq_gpu_info gi;
	char why[256];
	int i;

	if (kvq_gpu_probe(&gi, why, sizeof(why)) <= 0) {
		printf("1..0 # SKIP no GPU (%s)\n", why);
		return 77;
	}
	kvq_log_set_level(KVQ_LOG_WARNING);
	printf("# device: %s, %.1f GiB\n", gi.name, gi.total_mem / 1073741824.0);
	for (i = 1; i < argc; i++) {
		int pass;

		for (pass = 0; pass < 2; pass++) {
			struct kvq_model_opts mo = { 0 };
			struct kvq_model *m;
			const char *base = strrchr(argv[i], '/');
			char err[256], name[300];
			size_t k;

			base = base ? base + 1 : argv[i];
			unsetenv("KVQ_GPU_WEIGHTS");
			snprintf(name, sizeof(name), "%s", base);
			mo.n_threads = 2;
			if (kvq_model_load(argv[i], &mo, &m, err, sizeof(err))) {
				tap_ok(0, "%s: %s", name, err);
				break;
			}
			if (pass && !kept_quantized(m)) {
				kvq_model_destroy(m);
				break;
			}
			/* The second pass: what the default does not (the
			 * weights go to the GPU at the first context). */
			if (pass) {
				bool kq = k_quant(m);

				setenv("KVQ_GPU_WEIGHTS", kq ? "compact" : "f16", 1);
				snprintf(name, sizeof(name), "%s (%s)", base,
					 kq ? "compact" : "f16 at load");
			}
			for (k = 0; k < sizeof(kvsets) / sizeof(kvsets[0]); k++)
				greedy_case(m, name, &kvsets[k]);
			/* int8 where the GPU keeps the weights 8/4-bit: Q8_0
			 * and Q4_0 at first, Q4_K and Q6_K compact */
			if (pass ? k_quant(m) : kept_quantized(m) && !k_quant(m))
				q8a_case(m, name);
			batch_case(m, name);
			decode8_case(m, name);
			fork_case(m, name);
			if (!pass) {
				center_case(m, name);
				sample_case(m, name);
				f16_range_case(m, name);
			}
			blas_case(m, name);
			skinny_case(m, name);
#ifdef KVQ_ATTN_GPU
			if (!pass)
				fused_norm_case(m, name);
			if (i == 1 && !pass) {
				no_graph_case(m, name, 0);
				no_graph_case(m, name, 1);
			}
#endif
			/* last: it leaves the model with key moments */
			if (i == 1 && !pass)
				key_rounding_refused(m, name);
			kvq_model_destroy(m);
		}
	}
	unsetenv("KVQ_GPU_WEIGHTS");
	for (i = 1; i < argc; i++) {
		quant_values_case(argv[i]);
		auto_compact_case(argv[i]);
	}
	return tap_done();
}
