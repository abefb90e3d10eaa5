/*
 * test_gpu_attn.c - the GPU attention and KV append kernels
 * (kernels/attn.h) against their C twins, on the device: the decode and
 * split-KV kernels here, the prompt (prefill) and append kernels in
 * test_gpu_attn_write.c (what the two files share: attn_test.h); main()
 * runs them all.
 *
 * Decode: pages are built on the host by kvq_kv_write() from fresh random
 * rows and copied to the device byte for byte; the output is poisoned
 * (NaN) before each launch; the result is compared with kvq_kv_attend()
 * over the same pages.  Tolerance: |gpu - ref| <= 1e-3 * max|V| + 1e-5
 * (+ 1e-3 * |ref| for f16 output).  The kernel's only rounding beyond f32
 * is V's n*scale held in f16 (2^-11 relative), so the bound has 2x
 * headroom; keys, the query and the softmax weights are exact to f32.
 * Each case runs twice and must give identical bits (no race, and the
 * split-merge counters are left zeroed).
 *
 * Without a GPU: "1..0 # SKIP no GPU" and exit status 77.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/quant.h"
#include "kernels/attn.h"
#include "tests/gpu/attn_test.h"
#include "tests/gpu/gpu_test_util.h"
#define TAP_SHARED
#define TAP_COUNTS
#include "tap.h"

#ifdef KVQ_ATTN_GPU

/* Head size of the caches build() and dev_put() make (HD but for the
 * split-KV cases). */
uint32_t g_hd = HD;

/* Key centring of the caches build() makes: centres [kv head][g_hd] and
 * the RoPE they turn with, or g_ctr NULL (see struct centring). */
static const float *g_ctr;
static uint32_t g_rope_dim;
static int g_neox;
static float g_base;

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint32_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)(rng >> 16);
}

/* Uniform in [-1, 1). */
float frand(void)
{
	return (float)(rnd() & 0xffffff) / 8388608.0f - 1.0f;
}

const char *tn(int t)
{
	return kvq_kv_type_name((enum kvq_kv_type)t);
}

struct dcase {
	const char *name;
	int kt, vt;
	uint32_t hq, hk, P, n_sink, batch;
	uint32_t lens[8];
	float scale;		/* 0: 1/sqrt(head_dim) */
	float kmag;		/* key magnitude: larger is a peakier softmax */
	int q_f16, out_f16;
	uint32_t plan_len;	/* 0: the longest length; else the split plan's
				 * bound, as a decode step's length bucket */
};

/* A host cache with @batch sequences of random tokens, interleaved so
 * that each sequence's pages are scattered over the pool. */
struct kvq_kvcache *build(int kt, int vt, uint32_t hk, uint32_t P,
			  uint32_t n_sink, uint32_t batch,
			  const uint32_t *lens, float kmag,
			  struct kvq_kv_seq *s)
{
	struct kvq_kv_opts o;
	struct kvq_kvcache *c;
	uint32_t b, pos, maxl = 0, pages = 1, i;
	size_t kvd = (size_t)hk * g_hd;
	float *k = malloc(kvd * sizeof(float)), *v = malloc(kvd * sizeof(float));

	for (b = 0; b < batch; b++) {
		pages += (lens[b] + P - 1) / P + 1;
		if (lens[b] > maxl)
			maxl = lens[b];
	}
	memset(&o, 0, sizeof(o));
	o.n_layers = 1;
	o.n_kv_heads = hk;
	o.head_dim = g_hd;
	o.page_tokens = P;
	o.n_pages = pages;
	o.n_sink = n_sink;
	o.type_k[0] = (uint8_t)kt;
	o.type_v[0] = (uint8_t)vt;
	o.k_center = g_ctr;
	o.rope_dim = g_rope_dim;
	o.rope_base = g_base;
	o.rope_neox = g_neox;
	if (!k || !v || kvq_kv_create(&o, &c)) {
		free(k);
		free(v);
		return NULL;
	}
	/* Pages never written hold garbage; make it loud (NaN patterns). */
	memset(c->layers[0].k.mem, 0xff, c->layers[0].k.page_bytes * pages);
	memset(c->layers[0].v.mem, 0xff, c->layers[0].v.page_bytes * pages);
	for (b = 0; b < batch; b++)
		kvq_kv_seq_init(&s[b]);
	for (pos = 0; pos < maxl; pos++) {
		for (b = 0; b < batch; b++) {
			if (pos >= lens[b])
				continue;
			for (i = 0; i < kvd; i++) {
				k[i] = frand() * kmag;
				v[i] = frand();
			}
			/* An outlier channel now and then, as real keys have. */
			if (rnd() % 7 == 0)
				k[rnd() % kvd] *= 6.0f;
			if (kvq_kv_seq_reserve(c, &s[b], 1))
				goto fail;
			kvq_kv_write(c, &s[b], 0, pos, k, v);
			kvq_kv_seq_commit(&s[b], 1);
		}
	}
	free(k);
	free(v);
	return c;
fail:
	free(k);
	free(v);
	unbuild(c, s, batch);
	return NULL;
}

void unbuild(struct kvq_kvcache *c, struct kvq_kv_seq *s, uint32_t batch)
{
	if (!c)
		return;
	for (uint32_t b = 0; b < batch; b++)
		kvq_kv_seq_release(c, &s[b]);
	kvq_kv_destroy(c);
}

void dev_free(struct dev *d)
{
	int i;

	kvq_test_gpu_free(d->kp);
	kvq_test_gpu_free(d->vp);
	kvq_test_gpu_free(d->bt);
	kvq_test_gpu_free(d->lens);
	kvq_test_gpu_free(d->sinkv);
	for (i = 0; i < 8; i++)
		kvq_test_gpu_free(d->sinks[i]);
	memset(d, 0, sizeof(*d));
}

int dev_put(struct dev *d, const struct kvq_kvcache *c,
	    const struct kvq_kv_seq *s, uint32_t batch,
	    const uint32_t *lens)
{
	const struct kvq_kv_layer *L = &c->layers[0];
	size_t kb = L->k.page_bytes * c->o.n_pages;
	size_t vb = L->v.page_bytes * c->o.n_pages;
	size_t sinkn = (size_t)2 * c->o.n_sink * c->o.n_kv_heads * g_hd;
	int32_t *bt, *ln;
	void *ptrs[8] = { 0 };
	uint32_t b, i, w = 1;
	int ret = -1;

	memset(d, 0, sizeof(*d));
	for (b = 0; b < batch; b++)
		if (s[b].n_pages > w)
			w = s[b].n_pages;
	d->bt_stride = w;
	bt = calloc((size_t)batch * w, sizeof(*bt));
	ln = calloc(batch, sizeof(*ln));
	if (!bt || !ln)
		goto out;
	for (b = 0; b < batch; b++) {
		for (i = 0; i < s[b].n_pages; i++)
			bt[b * w + i] = s[b].pages[i];
		ln[b] = (int32_t)lens[b];
	}
	d->kp = kvq_test_gpu_alloc(kb);
	d->vp = kvq_test_gpu_alloc(vb);
	d->bt = kvq_test_gpu_alloc((size_t)batch * w * sizeof(*bt));
	d->lens = kvq_test_gpu_alloc(batch * sizeof(*ln));
	d->sinkv = kvq_test_gpu_alloc(8 * sizeof(void *));
	if (!d->kp || !d->vp || !d->bt || !d->lens || !d->sinkv)
		goto out;
	if (kvq_test_gpu_put(d->kp, L->k.mem, kb) ||
	    kvq_test_gpu_put(d->vp, L->v.mem, vb) ||
	    kvq_test_gpu_put(d->bt, bt, (size_t)batch * w * sizeof(*bt)) ||
	    kvq_test_gpu_put(d->lens, ln, batch * sizeof(*ln)))
		goto out;
	for (b = 0; b < batch && c->o.n_sink; b++) {
		if (!s[b].sink)
			continue;
		d->sinks[b] = kvq_test_gpu_alloc(sinkn * 2);
		if (!d->sinks[b] ||
		    kvq_test_gpu_put(d->sinks[b], s[b].sink, sinkn * 2))
			goto out;
		ptrs[b] = d->sinks[b];
	}
	if (kvq_test_gpu_put(d->sinkv, ptrs, sizeof(ptrs)))
		goto out;
	ret = 0;
out:
	free(bt);
	free(ln);
	return ret;
}

/* A workspace the decode cases share (zeroed once), as the engine's
 * layers and batches do; NULL: each case allocates its own. */
static void *g_ws;
static size_t g_ws_bytes;

static int run_decode(const struct dcase *tc)
{
	struct kvq_kv_seq s[8];
	struct kvq_kvcache *c;
	struct kvq_gpu_attn_args a;
	struct dev d;
	uint32_t gqa = tc->hq / tc->hk, b, h, maxl = 0;
	const uint32_t D = g_hd;	/* 64 or 128: the fused kernel's sizes */
	size_t nq = (size_t)tc->batch * tc->hq * D, i, bad = 0, nan = 0;
	size_t esz = tc->out_f16 ? 2 : 4, wsb;
	float *q = malloc(nq * sizeof(float)), *ref = malloc(nq * sizeof(float));
	float *got = malloc(nq * sizeof(float));
	uint16_t *q16 = malloc(nq * 2), *o16 = malloc(nq * 2), *o16b = malloc(nq * 2);
	float *gotb = malloc(nq * sizeof(float));
	void *dq = NULL, *dout = NULL, *ws = NULL;
	double maxerr = 0.0, maxref = 0.0;
	float scale = tc->scale ? tc->scale : 1.0f / sqrtf((float)D);
	char why[256] = "";
	int ret, same = 1, ok;

	c = build(tc->kt, tc->vt, tc->hk, tc->P, tc->n_sink, tc->batch,
		  tc->lens, tc->kmag, s);
	if (!c || !q || !ref || !got || !q16 || !o16 || !o16b || !gotb) {
		tap_ok(0, "%s: host set-up", tc->name);
		goto out_host;
	}
	for (i = 0; i < nq; i++) {
		q[i] = frand();
		q16[i] = kvq_f32_to_f16(q[i]);
		if (tc->q_f16)
			q[i] = kvq_f16_to_f32(q16[i]);
	}
	for (b = 0; b < tc->batch; b++)
		if (tc->lens[b] > maxl)
			maxl = tc->lens[b];
	if (dev_put(&d, c, s, tc->batch, tc->lens)) {
		tap_ok(0, "%s: device set-up", tc->name);
		goto out_dev;
	}
	memset(&a, 0, sizeof(a));
	a.q_type = tc->q_f16 ? KVQ_GPU_F16 : KVQ_GPU_F32;
	a.out_type = tc->out_f16 ? KVQ_GPU_F16 : KVQ_GPU_F32;
	a.k_pages = d.kp;
	a.v_pages = d.vp;
	a.k_page_bytes = c->layers[0].k.page_bytes;
	a.v_page_bytes = c->layers[0].v.page_bytes;
	a.k_type = tc->kt;
	a.v_type = tc->vt;
	a.block_table = d.bt;
	a.bt_stride = d.bt_stride;
	a.seq_lens = d.lens;
	a.max_len = tc->plan_len > maxl ? tc->plan_len : maxl;
	a.sink = tc->n_sink ? (const uint16_t *const *)d.sinkv : NULL;
	a.n_sink = c->o.n_sink;
	a.batch = tc->batch;
	a.n_q_heads = tc->hq;
	a.n_kv_heads = tc->hk;
	a.head_dim = D;
	a.page_tokens = tc->P;
	a.scale = scale;
	wsb = kvq_gpu_attn_workspace_bytes(&a);
	dq = kvq_test_gpu_alloc(nq * 4);
	dout = kvq_test_gpu_alloc(nq * esz);
	if (!g_ws)
		ws = kvq_test_gpu_alloc(wsb);
	if (!wsb || !dq || !dout || (g_ws ? wsb > g_ws_bytes :
	    !ws || kvq_test_gpu_fill(ws, 0, wsb)) ||
	    kvq_test_gpu_put(dq, tc->q_f16 ? (void *)q16 : (void *)q,
			     nq * (tc->q_f16 ? 2 : 4))) {
		tap_ok(0, "%s: device buffers (workspace %zu)", tc->name, wsb);
		goto out_dev;
	}
	a.q = dq;
	a.out = dout;
	a.workspace = g_ws ? g_ws : ws;
	a.workspace_bytes = g_ws ? g_ws_bytes : wsb;

	for (int run = 0; run < 2; run++) {
		float *dst = run ? gotb : got;
		uint16_t *d16 = run ? o16b : o16;

		kvq_test_gpu_fill(dout, 0xff, nq * esz);	/* NaN */
		ret = kvq_gpu_attn_decode(&a, NULL);
		if (ret || kvq_test_gpu_sync(why, sizeof(why))) {
			tap_ok(0, "%s: launch (%d %s)", tc->name, ret, why);
			goto out_dev;
		}
		kvq_test_gpu_get(tc->out_f16 ? (void *)d16 : (void *)dst, dout,
				 nq * esz);
		if (tc->out_f16)
			for (i = 0; i < nq; i++)
				dst[i] = kvq_f16_to_f32(d16[i]);
	}
	for (b = 0; b < tc->batch; b++)
		for (h = 0; h < tc->hk; h++) {
			size_t off = ((size_t)b * tc->hq + h * gqa) * D;

			kvq_kv_attend(c, &s[b], 0, h, q + off, D, gqa, scale,
				      tc->lens[b], ref + off, D);
		}
	for (i = 0; i < nq; i++) {
		double e = fabs((double)got[i] - ref[i]);
		double tol = 1e-3 + 1e-5 + (tc->out_f16 ? 1e-3 * fabs(ref[i]) : 0);

		if (isnan(got[i]))
			nan++;
		else if (e > tol)
			bad++;
		if (e > maxerr)
			maxerr = e;
		if (fabs(ref[i]) > maxref)
			maxref = fabs(ref[i]);
		if (memcmp(&got[i], &gotb[i], sizeof(float)))
			same = 0;
	}
	ok = !bad && !nan;
	tap_ok(ok, "kvq_gpu_attn_decode_%s_%s_%s_d%u (max err %.2e, max |ref| "
	       "%.3f, %zu over tolerance, %zu unwritten)", tc->name,
	       tn(tc->kt), tn(tc->vt), D, maxerr, maxref, bad, nan);
	tap_ok(same, "kvq_gpu_attn_decode_%s_%s_%s_d%u_repeatable", tc->name,
	       tn(tc->kt), tn(tc->vt), D);
out_dev:
	kvq_test_gpu_free(dq);
	kvq_test_gpu_free(dout);
	kvq_test_gpu_free(ws);
	dev_free(&d);
out_host:
	unbuild(c, s, tc->batch);
	free(q);
	free(ref);
	free(got);
	free(gotb);
	free(q16);
	free(o16);
	free(o16b);
	return 0;
}

/* ---------------------------------------------------------- centring */

/*
 * Random centres of @ce for @hk KV heads of g_hd channels, also set as
 * the centring of the caches build() makes until centring_off().  NULL
 * when @ce is not centred; *@fail set when out of memory.
 */
float *centring_on(const struct centring *ce, uint32_t hk, int *fail)
{
	size_t n = (size_t)hk * g_hd, i;
	float *c;

	*fail = 0;
	if (!ce->cmag)
		return NULL;
	c = malloc(n * sizeof(float));
	if (!c) {
		*fail = 1;
		return NULL;
	}
	for (i = 0; i < n; i++)
		c[i] = ce->cmag * frand();
	g_ctr = c;
	g_rope_dim = ce->rope_dim ? ce->rope_dim : g_hd;
	g_neox = ce->neox;
	g_base = ce->base ? ce->base : 10000.0f;
	return c;
}

void centring_off(float *c)
{
	free(c);
	g_ctr = NULL;
	g_rope_dim = 0;
	g_neox = 0;
	g_base = 0.0f;
}

/* The case's centring in words for the test names into @buf ("" when
 * not centred). */
void centring_desc(const struct centring *ce, char *buf, size_t len)
{
	if (!ce->cmag)
		snprintf(buf, len, "%s", "");
	else
		snprintf(buf, len, " centred x%g rope %u/%u %s base %g",
			 ce->cmag, ce->rope_dim ? ce->rope_dim : g_hd, g_hd,
			 ce->neox ? "neox" : "adjacent",
			 ce->base ? ce->base : 10000.0f);
}

/*
 * Device copy of layer 0's centres of host cache @c, the way the engine
 * hands them over (kvq_kv_layer.center: set only where K is q8/q4).
 * Returns 0 with *@out NULL when the layer is not centred, -1 on failure.
 */
int centring_dev(const struct kvq_kvcache *c, void **out)
{
	size_t n = (size_t)c->o.n_kv_heads * c->o.head_dim * sizeof(float);

	*out = NULL;
	if (!c->layers[0].center)
		return 0;
	*out = kvq_test_gpu_alloc(n);
	return *out && !kvq_test_gpu_put(*out, c->layers[0].center, n) ? 0 : -1;
}

/* ---------------------------------------------------------- split-KV */

struct scase {
	const char *name;
	int kt, vt;
	uint32_t hd, hq, hk, P, n_sink, batch;
	uint32_t lens[4];
	uint32_t rows;		/* query rows per sequence, the last ones */
	struct centring ce;
};

/*
 * kvq_gpu_attn_split() against kvq_kv_attend(): each sequence gets
 * @rows query rows at its last positions (a prompt's causal rows; 1 is
 * decode), f32 queries and output.  The kernel's arithmetic is f32
 * throughout (codes times scales, as the host), so the bound is f32
 * rounding of sums over up to 32K positions: 2e-5 * max|V| + 1e-6.
 * With centred keys each score also carries q . R_p c, summed in another
 * order than the host's (pairs' A cos + B sin against q . (R_p c) with
 * R_p c rounded per channel): a score may differ by a few units in the
 * last place of S = scale * sum |q_j c_j|, and the output by twice that
 * times max|V|, so the bound grows by 2e-6 * S (S is printed; a missing
 * correction errs by O(S)).
 */
static void run_split(const struct scase *tc)
{
	struct kvq_kv_seq s[4];
	struct kvq_kvcache *c;
	struct kvq_gpu_split_args a;
	struct dev d;
	uint32_t D = tc->hd, gqa = tc->hq / tc->hk, b, h, r, n_rows = 0;
	uint32_t maxl = 0, qs = tc->hq * D + 8;
	int32_t rseq[64], rpos[64];
	size_t nq, i, j, bad = 0, nan = 0, wsb;
	float *q = NULL, *ref = NULL, *got = NULL, *gotb = NULL, *ctr;
	void *dq = NULL, *dout = NULL, *ws = NULL, *dseq = NULL, *dpos = NULL;
	void *dctr = NULL;
	double maxerr = 0.0, smax = 0.0, tol = 2e-5 + 1e-6;
	float scale = 1.0f / sqrtf((float)D);
	char why[256] = "", cd[96];
	int ret, same = 1, fail;

	g_hd = D;
	centring_desc(&tc->ce, cd, sizeof(cd));
	ctr = centring_on(&tc->ce, tc->hk, &fail);
	for (b = 0; b < tc->batch; b++) {
		if (tc->lens[b] > maxl)
			maxl = tc->lens[b];
		for (r = 0; r < tc->rows && r < tc->lens[b]; r++) {
			rseq[n_rows] = (int32_t)b;
			rpos[n_rows] = (int32_t)(tc->lens[b] - tc->rows + r);
			if (tc->lens[b] < tc->rows)
				rpos[n_rows] = (int32_t)r;
			n_rows++;
		}
	}
	nq = (size_t)n_rows * qs;
	c = fail ? NULL : build(tc->kt, tc->vt, tc->hk, tc->P, tc->n_sink,
				tc->batch, tc->lens, 1.0f, s);
	q = malloc(nq * 4);
	ref = calloc(nq, 4);
	got = malloc(nq * 4);
	gotb = malloc(nq * 4);
	if (!c || !q || !ref || !got || !gotb) {
		tap_ok(0, "split %s%s: host set-up", tc->name, cd);
		goto out_host;
	}
	for (i = 0; i < nq; i++)
		q[i] = frand();
	/* The largest centring term a score carries, for the bound. */
	for (r = 0; c->layers[0].center && r < n_rows; r++)
		for (h = 0; h < tc->hq; h++) {
			const float *qh = q + (size_t)r * qs + (size_t)h * D;
			const float *ch = c->layers[0].center +
					  (size_t)(h / gqa) * D;
			double sum = 0.0;

			for (j = 0; j < D; j++)
				sum += fabs((double)qh[j] * ch[j]);
			if (sum * scale > smax)
				smax = sum * scale;
		}
	tol += 2e-6 * smax;
	if (dev_put(&d, c, s, tc->batch, tc->lens) || centring_dev(c, &dctr)) {
		tap_ok(0, "split %s%s: device set-up", tc->name, cd);
		goto out_dev;
	}
	memset(&a, 0, sizeof(a));
	a.q_stride = qs;
	a.out_stride = qs;
	a.k_pages = d.kp;
	a.v_pages = d.vp;
	a.k_page_bytes = c->layers[0].k.page_bytes;
	a.v_page_bytes = c->layers[0].v.page_bytes;
	a.k_type = tc->kt;
	a.v_type = tc->vt;
	a.block_table = d.bt;
	a.bt_stride = d.bt_stride;
	a.sink = tc->n_sink ? (uint16_t *const *)d.sinkv : NULL;
	a.n_sink = c->o.n_sink;
	a.n_rows = n_rows;
	a.n_q_heads = tc->hq;
	a.n_kv_heads = tc->hk;
	a.head_dim = D;
	a.page_tokens = tc->P;
	a.max_len = maxl;
	a.k_center = dctr;
	a.rope_dim = c->o.rope_dim;
	a.rope_base = c->o.rope_base;
	a.rope_neox = c->o.rope_neox;
	wsb = kvq_gpu_attn_split_workspace_bytes(n_rows, tc->hq, tc->hk, D);
	dq = kvq_test_gpu_alloc(nq * 4);
	dout = kvq_test_gpu_alloc(nq * 4);
	ws = kvq_test_gpu_alloc(wsb);
	dseq = kvq_test_gpu_alloc(n_rows * 4);
	dpos = kvq_test_gpu_alloc(n_rows * 4);
	if (!wsb || !dq || !dout || !ws || !dseq || !dpos ||
	    kvq_test_gpu_put(dq, q, nq * 4) ||
	    kvq_test_gpu_put(dseq, rseq, n_rows * 4) ||
	    kvq_test_gpu_put(dpos, rpos, n_rows * 4)) {
		tap_ok(0, "split %s%s: device buffers", tc->name, cd);
		goto out_dev;
	}
	a.q = dq;
	a.out = dout;
	a.row_seq = dseq;
	a.row_pos = dpos;
	a.workspace = ws;
	a.workspace_bytes = wsb;
	for (int run = 0; run < 2; run++) {
		kvq_test_gpu_fill(dout, 0xff, nq * 4);	/* NaN */
		ret = kvq_gpu_attn_split(&a, NULL);
		if (ret || kvq_test_gpu_sync(why, sizeof(why))) {
			tap_ok(0, "split %s%s: launch (%d %s)", tc->name, cd,
			       ret, why);
			goto out_dev;
		}
		kvq_test_gpu_get(run ? gotb : got, dout, nq * 4);
	}
	for (r = 0; r < n_rows; r++)
		for (h = 0; h < tc->hk; h++) {
			size_t off = (size_t)r * qs + (size_t)h * gqa * D;

			kvq_kv_attend(c, &s[rseq[r]], 0, h, q + off, D, gqa,
				      scale, (uint32_t)rpos[r] + 1, ref + off,
				      D);
		}
	for (r = 0; r < n_rows; r++)
		for (i = 0; i < (size_t)tc->hq * D; i++) {
			size_t k = (size_t)r * qs + i;
			double e = fabs((double)got[k] - ref[k]);

			if (isnan(got[k]))
				nan++;
			else if (e > tol)
				bad++;
			if (e > maxerr)
				maxerr = e;
			if (memcmp(&got[k], &gotb[k], 4))
				same = 0;
		}
	tap_ok(!bad && !nan, "kvq_gpu_attn_split_%s_%s_%s_d%u_g%u (P %u, sinks "
	       "%u, %u rows, max len %u%s; max err %.2e, bound %.2e, S %.3g, "
	       "%zu over, %zu unwritten)", tc->name, tn(tc->kt), tn(tc->vt),
	       D, gqa, tc->P, tc->n_sink, n_rows, maxl, cd, maxerr, tol, smax,
	       bad, nan);
	tap_ok(same, "kvq_gpu_attn_split_%s_%s_%s_d%u_g%u_repeatable",
	       tc->name, tn(tc->kt), tn(tc->vt), D, gqa);
out_dev:
	kvq_test_gpu_free(dq);
	kvq_test_gpu_free(dout);
	kvq_test_gpu_free(ws);
	kvq_test_gpu_free(dseq);
	kvq_test_gpu_free(dpos);
	kvq_test_gpu_free(dctr);
	dev_free(&d);
out_host:
	unbuild(c, s, tc->batch);
	free(q);
	free(ref);
	free(got);
	free(gotb);
	centring_off(ctr);
	g_hd = HD;
}

static void args_rejected(void)
{
	struct kvq_gpu_attn_args a;

	memset(&a, 0, sizeof(a));
	a.batch = 1;
	a.n_q_heads = 32;
	a.n_kv_heads = 8;
	a.head_dim = 96;
	a.page_tokens = 16;
	a.k_type = KVQ_KV_Q4;
	a.v_type = KVQ_KV_Q4;
	a.k_page_bytes = a.v_page_bytes = 1 << 20;
	tap_ok(kvq_gpu_attn_decode(&a, NULL) == -EOPNOTSUPP,
	       "kvq_gpu_attn_decode_head_dim_96_unsupported");
	a.head_dim = 128;
	a.k_type = KVQ_KV_F32;
	tap_ok(kvq_gpu_attn_decode(&a, NULL) == -EOPNOTSUPP,
	       "kvq_gpu_attn_decode_f32_pages_unsupported");
	a.k_type = KVQ_KV_Q4;
	a.n_q_heads = 30;
	tap_ok(kvq_gpu_attn_decode(&a, NULL) == -EINVAL,
	       "kvq_gpu_attn_decode_heads_not_multiple_rejected");
}

/* Centring parameters the split kernel cannot follow (checked before any
 * pointer is used: the centres here are a host address). */
static void split_center_args_rejected(void)
{
	float ctr[64] = { 0 };
	struct kvq_gpu_split_args a = {
		.n_rows = 1, .n_q_heads = 8, .n_kv_heads = 4, .head_dim = 64,
		.page_tokens = 16, .k_type = KVQ_KV_Q4, .v_type = KVQ_KV_Q4,
		.k_center = ctr, .rope_dim = 63, .rope_base = 10000.0f,
	};

	tap_ok(kvq_gpu_attn_split(&a, NULL) == -EINVAL,
	       "kvq_gpu_attn_split_center_odd_rope_dim_rejected");
	a.rope_dim = 128;
	tap_ok(kvq_gpu_attn_split(&a, NULL) == -EINVAL,
	       "kvq_gpu_attn_split_center_rope_dim_over_head_dim_rejected");
	a.rope_dim = 64;
	a.rope_base = 0.0f;
	tap_ok(kvq_gpu_attn_split(&a, NULL) == -EINVAL,
	       "kvq_gpu_attn_split_center_without_rope_base_rejected");
}

/*
 * The fused decode kernel at head size g_hd.  Every pair: ragged batch,
 * tokens below and across page ends, sinks; then the common pairs over
 * long and mixed sequences (one alone: 64 splits and more to merge),
 * GQA 1-16, pages of 32 and 64, no sinks, an empty sequence and f16
 * input and output.
 */
static void decode_suite(void)
{
	static const int types[3] = { KVQ_KV_F16, KVQ_KV_Q8, KVQ_KV_Q4 };
	static const int main_pairs[4][2] = {
		{ KVQ_KV_Q4, KVQ_KV_Q4 }, { KVQ_KV_Q8, KVQ_KV_Q4 },
		{ KVQ_KV_Q8, KVQ_KV_Q8 }, { KVQ_KV_F16, KVQ_KV_F16 },
	};
	int i, j;

	for (i = 0; i < 3; i++)
		for (j = 0; j < 3; j++) {
			struct dcase tc = {
				"ragged", types[i], types[j], 32, 8, 16, 4, 6,
				{ 1, 4, 5, 16, 17, 300 }, 0, 1.0f, 0, 0,
			};
			run_decode(&tc);
		}
	for (i = 0; i < 4; i++) {
		int kt = main_pairs[i][0], vt = main_pairs[i][1];
		struct dcase cases[] = {
			{ "long", kt, vt, 32, 8, 16, 4, 3,
			  { 32768, 8191, 33 }, 0, 1.0f, 0, 0 },
			/* one sequence: a wave of splits to merge, over 16
			 * loads in flight a thread */
			{ "long1", kt, vt, 32, 8, 16, 4, 1, { 30001 }, 0, 1.0f,
			  0, 0 },
			/* 8 and 16 query heads a KV head (one and two
			 * passes) with a wave of splits, the shorter
			 * sequence leaving some of them empty */
			{ "gqa8_long", kt, vt, 32, 4, 16, 4, 2, { 20000, 9001 },
			  0, 1.0f, 0, 0 },
			{ "gqa16_long", kt, vt, 64, 4, 16, 4, 2, { 9001, 20000 },
			  0, 1.0f, 0, 0 },
			/* 56 and 112 merge units: at head_dim 128 on the
			 * H200, 4 and 2 splits a sequence merged in
			 * clusters, some of a cluster's blocks past a
			 * sequence's end (or all: lengths 100, 0, 3) */
			{ "ragged7", kt, vt, 32, 8, 16, 4, 7,
			  { 16000, 6000, 9000, 100, 0, 12001, 3 }, 0, 1.0f, 0, 0 },
			{ "ragged7_gqa8", kt, vt, 64, 8, 16, 4, 7,
			  { 16000, 6000, 9000, 100, 0, 12001, 3 }, 0, 1.0f, 0, 0 },
			{ "ragged7_gqa16", kt, vt, 128, 8, 16, 4, 7,
			  { 6000, 16000, 9000, 100, 0, 12001, 3 }, 0, 1.0f, 0, 0 },
			{ "batch8_mixed", kt, vt, 32, 8, 16, 4, 8,
			  { 4096, 2, 1023, 4097, 64, 15, 2048, 511 }, 0, 1.0f,
			  0, 0 },
			{ "gqa1", kt, vt, 8, 8, 16, 4, 2, { 100, 37 }, 0, 1.0f, 0, 0 },
			{ "gqa2", kt, vt, 16, 8, 16, 4, 2, { 100, 37 }, 0, 1.0f, 0, 0 },
			{ "gqa6", kt, vt, 48, 8, 16, 4, 2, { 100, 37 }, 0, 1.0f, 0, 0 },
			{ "gqa8", kt, vt, 32, 4, 16, 4, 2, { 100, 37 }, 0, 1.0f, 0, 0 },
			{ "gqa16", kt, vt, 64, 4, 16, 4, 2, { 100, 37 }, 0, 1.0f, 0, 0 },
			{ "page32", kt, vt, 32, 8, 32, 20, 4, { 1, 31, 33, 200 },
			  0, 1.0f, 0, 0 },
			{ "page64", kt, vt, 32, 8, 64, 4, 4, { 3, 64, 65, 700 },
			  0, 1.0f, 0, 0 },
			{ "no_sinks", kt, vt, 32, 8, 16, 0, 2, { 3, 50 }, 0, 1.0f,
			  0, 0 },
			{ "empty_seq", kt, vt, 32, 8, 16, 4, 3, { 0, 10, 2 }, 0,
			  1.0f, 0, 0 },
			{ "f16_io_peaky", kt, vt, 32, 8, 16, 4, 2, { 2000, 129 },
			  0.5f, 3.0f, 1, 1 },
			/* large scores in f32: a query's low f16 (or int8)
			 * part left out moves them by more than the
			 * tolerance */
			{ "peaky", kt, vt, 32, 8, 16, 4, 2, { 2000, 129 },
			  0.5f, 3.0f, 0, 0 },
			/* planned for the length bucket above every length,
			 * as kvqd's decode steps are: each sequence's tiles
			 * dealt over the splits by its own length (32K + 1
			 * fills about half of the 64K bucket's splits) */
			{ "bucket", kt, vt, 32, 8, 16, 4, 3, { 32769, 9000, 1 },
			  0, 1.0f, 0, 0, 65536 },
			{ "bucket8", kt, vt, 32, 8, 16, 4, 8,
			  { 8193, 5000, 4097, 300, 0, 17, 8000, 2 }, 0, 1.0f,
			  0, 0, 16384 },
			{ "bucket1", kt, vt, 32, 8, 16, 4, 1, { 1025 }, 0, 1.0f,
			  0, 0, 2048 },
		};
		for (j = 0; j < (int)(sizeof(cases) / sizeof(cases[0])); j++)
			run_decode(&cases[j]);
	}
}

/*
 * One workspace for calls of different batches, one after another, as
 * kvqd's decode steps use it: a call's partial results must not lie
 * where a later call with more sequences (16 KV heads: 16 and 128
 * merge units here) finds its split counts.  Both shapes have several
 * splits a sequence; each runs twice in turn.
 */
static void shared_workspace_suite(void)
{
	struct dcase one = { "ws_shared_b1", KVQ_KV_Q4, KVQ_KV_Q4, 64, 16, 16,
			     4, 1, { 20000 }, 0, 1.0f, 0, 0 };
	struct dcase eight = { "ws_shared_b8", KVQ_KV_Q4, KVQ_KV_Q4, 64, 16,
			       16, 4, 8, { 4500, 4500, 4500, 4500, 4500, 4500,
					   4500, 4500 }, 0, 1.0f, 0, 0 };
	int r;

	g_ws_bytes = (size_t)64 << 20;
	g_ws = kvq_test_gpu_alloc(g_ws_bytes);
	if (!g_ws || kvq_test_gpu_fill(g_ws, 0, g_ws_bytes)) {
		tap_ok(0, "shared workspace: %zu bytes", g_ws_bytes);
	} else {
		for (r = 0; r < 2; r++) {
			run_decode(&one);
			run_decode(&eight);
		}
	}
	kvq_test_gpu_free(g_ws);
	g_ws = NULL;
}

int main(void)
{
	static const int types[3] = { KVQ_KV_F16, KVQ_KV_Q8, KVQ_KV_Q4 };
	static const int main_pairs[4][2] = {
		{ KVQ_KV_Q4, KVQ_KV_Q4 }, { KVQ_KV_Q8, KVQ_KV_Q4 },
		{ KVQ_KV_Q8, KVQ_KV_Q8 }, { KVQ_KV_F16, KVQ_KV_F16 },
	};
	char why[256] = "";
	int i, j, k;

	if (kvq_test_gpu_count(why, sizeof(why)) <= 0) {
		printf("1..0 # SKIP no GPU (%s)\n", why);
		return 77;
	}
	args_rejected();
	split_center_args_rejected();

	/* The fused decode kernel at both its head sizes: 128 (Llama-3-8B-
	 * like heads) and 64 (1B-like). */
	g_hd = 128;
	decode_suite();
	shared_workspace_suite();
	g_hd = 64;
	decode_suite();
	shared_workspace_suite();
	g_hd = HD;
	for (i = 0; i < 4; i++) {
		run_fused_append(main_pairs[i][0], main_pairs[i][1], 64, 32, 0);
		run_fused_append(main_pairs[i][0], main_pairs[i][1], 128, 32,
				 i == 0);
	}
	run_fused_append(KVQ_KV_Q4, KVQ_KV_Q4, 128, 64, 0);
	run_fused_append(KVQ_KV_Q8, KVQ_KV_F16, 64, 8, 1);

	/* Split-KV: every page type pair at head sizes 8 to 256, GQA 1 to
	 * 16 (the typed kernels at 64 and 128 with 3-8 heads, the generic
	 * one elsewhere), decode rows and prompt rows, sinks, a page size
	 * that is not a power of two. */
	{
		static const int all[4] = { KVQ_KV_F32, KVQ_KV_F16, KVQ_KV_Q8,
					    KVQ_KV_Q4 };
		static const uint32_t dims[6] = { 8, 16, 32, 64, 128, 256 };

		for (i = 0; i < 4; i++)
			for (j = 0; j < 4; j++) {
				struct scase tc = { "pairs", all[i], all[j], 64,
						    32, 8, 16, 4, 3,
						    { 1, 300, 17 }, 1,
						    NO_CENTRING };
				run_split(&tc);
			}
		for (i = 0; i < 6; i++) {
			uint32_t D = dims[i];
			struct scase cases[] = {
				{ "decode_gqa4", KVQ_KV_Q4, KVQ_KV_Q4, D, 32, 8,
				  16, 4, 3, { 5000, 33, 1 }, 1, NO_CENTRING },
				{ "decode_gqa1", KVQ_KV_Q8, KVQ_KV_Q4, D, 4, 4,
				  16, 4, 2, { 700, 16 }, 1, NO_CENTRING },
				{ "decode_gqa2", KVQ_KV_F16, KVQ_KV_Q8, D, 8, 4,
				  16, 0, 2, { 129, 64 }, 1, NO_CENTRING },
				{ "prompt_gqa8", KVQ_KV_Q8, KVQ_KV_Q8, D, 32, 4,
				  16, 4, 2, { 40, 9 }, 12, NO_CENTRING },
				{ "decode_gqa16", KVQ_KV_Q4, KVQ_KV_Q8, D, 64, 4,
				  16, 4, 1, { 1000 }, 1, NO_CENTRING },
				{ "page20_gqa6", KVQ_KV_Q4, KVQ_KV_Q4, D, 24, 4,
				  20, 4, 2, { 333, 41 }, 3, NO_CENTRING },
			};
			for (j = 0; j < (int)(sizeof(cases) / sizeof(cases[0])); j++) {
				if (D == 256 && cases[j].hq / cases[j].hk > 8)
					continue;
				run_split(&cases[j]);
			}
		}
		{
			struct scase tc = { "long", KVQ_KV_Q4, KVQ_KV_Q4, 64, 32,
					    8, 16, 4, 2, { 32768, 8190 }, 1,
					    NO_CENTRING };
			run_split(&tc);
		}
	}

	/*
	 * Split-KV over centred keys: every score gets q . R_p c back.  The
	 * quantized K pairs at head sizes 8, 32 and 64 (at 64 with 4 and 8
	 * query heads a KV head: shapes of the typed kernels, which must
	 * hand centred layers to the generic one), decode and prompt rows,
	 * sinks, pages of 16 and 20 tokens, both pair layouts and two RoPE
	 * bases; then contexts of 32K (angles up to 32767 rad), RoPE over
	 * part of the head, GQA 1 and 16, no sinks, f16 V, head sizes 16,
	 * 128 and 256.
	 */
	{
		static const int cpairs[3][2] = {
			{ KVQ_KV_Q4, KVQ_KV_Q4 }, { KVQ_KV_Q8, KVQ_KV_Q4 },
			{ KVQ_KV_Q8, KVQ_KV_Q8 },
		};
		static const uint32_t cdims[3] = { 8, 32, 64 };
		const int Q4 = KVQ_KV_Q4, Q8 = KVQ_KV_Q8, F16 = KVQ_KV_F16;

		for (i = 0; i < 3; i++)
			for (j = 0; j < 3; j++) {
				int kt = cpairs[i][0], vt = cpairs[i][1];
				uint32_t D = cdims[j];
				struct scase cases[] = {
					{ "ctr_decode_gqa4", kt, vt, D, 16, 4, 16,
					  4, 3, { 700, 33, 1 }, 1,
					  { 10.0f, 0, 0, 0.0f } },
					{ "ctr_prompt_gqa2_page20", kt, vt, D, 8,
					  4, 20, 4, 2, { 45, 9 }, 12,
					  { 10.0f, 0, 1, 0.0f } },
					{ "ctr_decode_gqa8_page20", kt, vt, D, 32,
					  4, 20, 3, 2, { 1000, 21 }, 1,
					  { 10.0f, 0, 1, 500000.0f } },
				};
				for (k = 0; k < (int)(sizeof(cases) / sizeof(cases[0])); k++)
					run_split(&cases[k]);
			}
		{
			struct scase cases[] = {
				{ "ctr_long", Q4, Q4, 64, 32, 4, 16, 4, 2,
				  { 32768, 20000 }, 1, { 10.0f, 0, 1, 500000.0f } },
				{ "ctr_long_d8", Q8, Q4, 8, 8, 4, 16, 4, 1,
				  { 32768 }, 3, { 10.0f, 0, 0, 0.0f } },
				{ "ctr_long_d32", Q4, Q4, 32, 8, 4, 20, 4, 1,
				  { 32000 }, 2, { 10.0f, 0, 1, 0.0f } },
				{ "ctr_partial_rope_neox", Q8, Q8, 64, 16, 4, 16, 4,
				  2, { 300, 50 }, 5, { 10.0f, 32, 1, 0.0f } },
				{ "ctr_partial_rope_adjacent", Q4, Q4, 32, 8, 2, 20,
				  4, 2, { 90, 7 }, 4, { 10.0f, 16, 0, 0.0f } },
				{ "ctr_partial_rope_d8", Q8, Q4, 8, 8, 4, 16, 4, 1,
				  { 200 }, 2, { 10.0f, 4, 1, 0.0f } },
				{ "ctr_gqa1", Q4, Q8, 32, 4, 4, 16, 4, 2, { 500, 3 },
				  1, { 10.0f, 0, 0, 0.0f } },
				{ "ctr_gqa16", Q4, Q4, 64, 64, 4, 16, 4, 1, { 1000 },
				  2, { 10.0f, 0, 1, 0.0f } },
				{ "ctr_no_sinks", Q8, Q4, 32, 8, 4, 16, 0, 2,
				  { 129, 64 }, 1, { 10.0f, 0, 0, 0.0f } },
				{ "ctr_v_f16", Q4, F16, 64, 16, 4, 16, 4, 2,
				  { 300, 17 }, 1, { 10.0f, 0, 0, 0.0f } },
				{ "ctr_d16", Q8, Q4, 16, 12, 2, 16, 4, 2, { 400, 5 },
				  3, { 10.0f, 0, 1, 0.0f } },
				{ "ctr_d128_gqa4", Q4, Q4, 128, 32, 8, 16, 4, 2,
				  { 2000, 40 }, 1, { 10.0f, 0, 1, 0.0f } },
				{ "ctr_d256_gqa8", Q4, Q8, 256, 16, 2, 16, 4, 1,
				  { 500 }, 2, { 10.0f, 0, 0, 0.0f } },
			};
			for (i = 0; i < (int)(sizeof(cases) / sizeof(cases[0])); i++)
				run_split(&cases[i]);
		}
	}

	/*
	 * Prompts on tensor cores (kvq_gpu_attn_prefill): what it declines;
	 * the four common page pairs at head_dim 64 and 128 over prompts of
	 * 16, 17, 100 and 300 rows, a second chunk after one already cached,
	 * several sequences (with a decode row among them), GQA 1, 4 and 8,
	 * sinks on and off, pages of 16 and 20; then 1024-row prompts, the
	 * other pairs, GQA 2, 3 and 6, position splits with and without a
	 * workspace, decode rows beside a prompt, a peaky softmax, sinks over
	 * a whole page, pages of 64; and the time against the split kernel.
	 */
	prefill_refusals();
	{
		static const int ppairs[4][2] = {
			{ KVQ_KV_Q4, KVQ_KV_Q4 }, { KVQ_KV_Q8, KVQ_KV_Q4 },
			{ KVQ_KV_Q8, KVQ_KV_Q8 }, { KVQ_KV_F16, KVQ_KV_F16 },
		};
		const int Q4 = KVQ_KV_Q4, Q8 = KVQ_KV_Q8, F16 = KVQ_KV_F16;

		for (i = 0; i < 4; i++)
			for (j = 0; j < 2; j++) {
				int kt = ppairs[i][0], vt = ppairs[i][1];
				uint32_t D = j ? 128 : 64;
				struct pcase cases[] = {
					{ "p16_gqa4", kt, vt, D, 32, 8, 16, 4, 1,
					  { 16 }, { 16 }, 1.0f, 0 },
					{ "p17_gqa1_page20_no_sinks", kt, vt, D, 8,
					  8, 20, 0, 1, { 17 }, { 17 }, 1.0f, 0 },
					{ "p100_gqa8", kt, vt, D, 32, 4, 16, 4, 1,
					  { 100 }, { 100 }, 1.0f, 0 },
					{ "p300_second_chunk_page20", kt, vt, D, 32,
					  8, 20, 4, 1, { 556 }, { 300 }, 1.0f, 0 },
					{ "seqs5_chunks_and_decode", kt, vt, D, 32,
					  8, 16, 4, 5, { 300, 1000, 517, 40, 0 },
					  { 300, 1, 261, 17, 0 }, 1.0f, 0 },
				};
				for (k = 0; k < (int)(sizeof(cases) / sizeof(cases[0])); k++)
					run_prefill(&cases[k]);
			}
		{
			struct pcase cases[] = {
				{ "p1024_gqa4", Q4, Q4, 64, 32, 8, 16, 4, 1,
				  { 1024 }, { 1024 }, 1.0f, 0 },
				{ "p1024_gqa8_page20", F16, F16, 128, 32, 4, 20,
				  0, 1, { 1024 }, { 1024 }, 1.0f, 0 },
				{ "p1024_gqa1", Q8, Q4, 128, 8, 8, 16, 4, 1,
				  { 1024 }, { 1024 }, 1.0f, 0 },
				{ "k_f16_v_q8", F16, Q8, 128, 32, 8, 16, 4, 2,
				  { 300, 90 }, { 300, 45 }, 1.0f, 0 },
				{ "k_f16_v_q4", F16, Q4, 64, 32, 8, 20, 4, 2,
				  { 300, 90 }, { 300, 45 }, 1.0f, 0 },
				{ "k_q4_v_q8", Q4, Q8, 64, 16, 8, 16, 4, 2,
				  { 129, 70 }, { 129, 70 }, 1.0f, 0 },
				{ "k_q4_v_f16", Q4, F16, 128, 32, 8, 16, 4, 2,
				  { 200, 33 }, { 100, 33 }, 1.0f, 0 },
				{ "k_q8_v_f16", Q8, F16, 64, 32, 8, 20, 4, 2,
				  { 200, 33 }, { 100, 33 }, 1.0f, 0 },
				{ "gqa2", Q4, Q4, 128, 16, 8, 16, 4, 2,
				  { 150, 64 }, { 150, 64 }, 1.0f, 0 },
				{ "gqa3", Q4, Q8, 64, 24, 8, 20, 4, 2,
				  { 200, 90 }, { 200, 45 }, 1.0f, 0 },
				{ "gqa6", Q8, Q8, 128, 48, 8, 16, 4, 2,
				  { 130, 77 }, { 130, 77 }, 1.0f, 0 },
				{ "splits_16_rows_at_5000", Q4, Q4, 128, 32, 8, 16,
				  4, 1, { 5016 }, { 16 }, 1.0f, 0 },
				{ "splits_chunk_at_3000", Q8, Q4, 64, 32, 4, 20, 4,
				  2, { 3040, 40 }, { 40, 40 }, 1.0f, 0 },
				{ "long_16_rows_no_workspace", Q4, Q4, 128, 32, 8,
				  16, 4, 1, { 5016 }, { 16 }, 1.0f, 1 },
				{ "decode_rows_beside_prompt", Q8, Q4, 64, 32, 4,
				  16, 4, 6, { 2000, 3, 300, 4097, 1, 64 },
				  { 1, 1, 300, 1, 1, 64 }, 1.0f, 0 },
				{ "peaky", Q4, Q4, 64, 32, 8, 16, 4, 2,
				  { 700, 333 }, { 200, 333 }, 3.0f, 0 },
				{ "sinks_whole_page20", Q4, Q8, 64, 32, 8, 20, 20,
				  2, { 150, 21 }, { 150, 21 }, 1.0f, 0 },
				{ "page64", Q8, Q4, 128, 32, 8, 64, 4, 2,
				  { 260, 64 }, { 130, 64 }, 1.0f, 0 },
			};
			for (i = 0; i < (int)(sizeof(cases) / sizeof(cases[0])); i++)
				run_prefill(&cases[i]);
		}
		prefill_speed(1024, Q4, Q4);
		prefill_speed(4096, Q4, Q4);
		prefill_speed(4096, F16, F16);
	}

	for (i = 0; i < 3; i++)
		for (j = 0; j < 3; j++) {
			struct acase tc = { "adjacent_table", types[i], types[j],
					    HD, 0, 1, 0, 0, NO_CENTRING };
			run_append(&tc);
		}
	/* Each case twice: as it is, and with centred keys, where R_pos c
	 * comes off each rotated key and its sink copy as kvq_kv_write()
	 * does (f16 keys stay as they are, as in the engine). */
	for (k = 0; k < 2; k++)
		for (i = 0; i < 4; i++) {
			int kt = main_pairs[i][0], vt = main_pairs[i][1];
			struct acase cases[] = {
				{ "neox_table", kt, vt, HD, 1, 1, 0, 0,
				  NO_CENTRING },
				{ "neox_partial64", kt, vt, 64, 1, 1, 0, 0,
				  NO_CENTRING },
				{ "adjacent_partial32_f16_in", kt, vt, 32, 0, 1,
				  1, 0, NO_CENTRING },
				{ "adjacent_device_angles", kt, vt, HD, 0, 0, 0,
				  0, NO_CENTRING },
				{ "neox_device_angles", kt, vt, HD, 1, 0, 0, 0,
				  NO_CENTRING },
				{ "neox_table", kt, vt, 64, 1, 1, 0, 64,
				  NO_CENTRING },
				{ "adjacent_table", kt, vt, 32, 0, 1, 0, 32,
				  NO_CENTRING },
				{ "neox_partial16_device_angles", kt, vt, 16, 1,
				  0, 0, 32, NO_CENTRING },
				{ "adjacent_table", kt, vt, 8, 0, 1, 0, 8,
				  NO_CENTRING },
				{ "neox_device_angles", kt, vt, 8, 1, 0, 0, 8,
				  NO_CENTRING },
				{ "adjacent_partial4_f16_in", kt, vt, 4, 0, 1, 1,
				  8, NO_CENTRING },
			};
			for (j = 0; j < (int)(sizeof(cases) / sizeof(cases[0])); j++) {
				cases[j].ce.cmag = k ? 20.0f : 0.0f;
				run_append(&cases[j]);
			}
		}
	return tap_done();
}
#else /* !KVQ_ATTN_GPU */

int main(void)
{
	printf("1..0 # SKIP no GPU (this build has no GPU backend)\n");
	return 77;
}
#endif /* KVQ_ATTN_GPU */
