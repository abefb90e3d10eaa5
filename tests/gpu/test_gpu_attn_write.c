/*
 * test_gpu_attn_write.c - the prompt (prefill) attention kernel and the
 * KV append kernel (kernels/attn.h) against their C twins, on the device;
 * part of the test_gpu_attn program, whose main() in test_gpu_attn.c runs
 * these tests (what the two files share: attn_test.h).
 *
 * Prefill: kvq_gpu_attn_prefill() against kvq_kv_attend() for every row
 * and query head (the bound is at run_prefill()), what it declines, and
 * its time beside the split kernel's.
 *
 * Append: after the GPU append, the K and V pools and the sink copies
 * must equal, byte for byte, the host cache after RoPE
 * (kvq_attn_ref_rope) and kvq_kv_write() of the same rows.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/kvcache.h"
#include "engine/quant.h"
#include "kernels/attn.h"
#include "tests/gpu/attn_test.h"
#include "tests/gpu/gpu_test_util.h"
#define TAP_SHARED
#include "tap.h"

#ifdef KVQ_ATTN_GPU

/* ------------------------------------------------------------ prefill */

/* Host cache, device copies, rows and buffers of one prompt case. */
struct pset {
	struct kvq_kv_seq s[6];
	struct kvq_kvcache *c;
	struct dev d;
	struct kvq_gpu_split_args a;
	int32_t *rseq, *rpos;
	float *q;
	void *dq, *dout, *ws, *dseq, *dpos;
	size_t nq;		/* floats of q (and of out) */
	uint32_t n_rows, maxl;
};

static void pset_fini(struct pset *ps, uint32_t batch)
{
	uint32_t b;

	kvq_test_gpu_free(ps->dq);
	kvq_test_gpu_free(ps->dout);
	kvq_test_gpu_free(ps->ws);
	kvq_test_gpu_free(ps->dseq);
	kvq_test_gpu_free(ps->dpos);
	dev_free(&ps->d);
	if (ps->c) {
		for (b = 0; b < batch; b++)
			kvq_kv_seq_release(ps->c, &ps->s[b]);
		kvq_kv_destroy(ps->c);
	}
	free(ps->rseq);
	free(ps->rpos);
	free(ps->q);
	g_hd = HD;
}

/*
 * Builds @tc's cache and random queries (q row stride hq * hd + 8: the
 * kernels must not assume packed rows) and copies them to the device;
 * @ps->a is ready for either kernel.  -1 with @what set on failure
 * (pset_fini() frees what was made).
 */
static int pset_init(struct pset *ps, const struct pcase *tc,
		     const char **what)
{
	struct kvq_gpu_split_args *a = &ps->a;
	uint32_t D = tc->hd, qs = tc->hq * D + 8, b, r, n = 0;
	size_t wsb = 0, i;

	memset(ps, 0, sizeof(*ps));
	g_hd = D;
	for (b = 0; b < tc->batch; b++) {
		n += tc->rows[b];
		if (tc->lens[b] > ps->maxl)
			ps->maxl = tc->lens[b];
	}
	ps->n_rows = n;
	ps->nq = (size_t)n * qs;
	*what = "host set-up";
	ps->rseq = malloc(n * sizeof(int32_t));
	ps->rpos = malloc(n * sizeof(int32_t));
	ps->q = malloc(ps->nq * sizeof(float));
	ps->c = build(tc->kt, tc->vt, tc->hk, tc->P, tc->n_sink, tc->batch,
		      tc->lens, tc->kmag, ps->s);
	if (!ps->rseq || !ps->rpos || !ps->q || !ps->c)
		return -1;
	for (b = 0, n = 0; b < tc->batch; b++)
		for (r = 0; r < tc->rows[b]; r++, n++) {
			ps->rseq[n] = (int32_t)b;
			ps->rpos[n] = (int32_t)(tc->lens[b] - tc->rows[b] + r);
		}
	for (i = 0; i < ps->nq; i++)
		ps->q[i] = frand();
	*what = "device set-up";
	if (dev_put(&ps->d, ps->c, ps->s, tc->batch, tc->lens))
		return -1;
	if (!tc->no_ws)
		wsb = kvq_gpu_attn_split_workspace_bytes(ps->n_rows, tc->hq,
							 tc->hk, D);
	ps->dq = kvq_test_gpu_alloc(ps->nq * 4);
	ps->dout = kvq_test_gpu_alloc(ps->nq * 4);
	ps->dseq = kvq_test_gpu_alloc(ps->n_rows * 4);
	ps->dpos = kvq_test_gpu_alloc(ps->n_rows * 4);
	ps->ws = wsb ? kvq_test_gpu_alloc(wsb) : NULL;
	*what = "device buffers";
	if (!ps->dq || !ps->dout || !ps->dseq || !ps->dpos ||
	    (wsb && !ps->ws) || kvq_test_gpu_put(ps->dq, ps->q, ps->nq * 4) ||
	    kvq_test_gpu_put(ps->dseq, ps->rseq, ps->n_rows * 4) ||
	    kvq_test_gpu_put(ps->dpos, ps->rpos, ps->n_rows * 4))
		return -1;
	a->q = ps->dq;
	a->q_stride = qs;
	a->out = ps->dout;
	a->out_stride = qs;
	a->k_pages = ps->d.kp;
	a->v_pages = ps->d.vp;
	a->k_page_bytes = ps->c->layers[0].k.page_bytes;
	a->v_page_bytes = ps->c->layers[0].v.page_bytes;
	a->k_type = tc->kt;
	a->v_type = tc->vt;
	a->row_seq = ps->dseq;
	a->row_pos = ps->dpos;
	a->block_table = ps->d.bt;
	a->bt_stride = ps->d.bt_stride;
	a->sink = tc->n_sink ? (uint16_t *const *)ps->d.sinkv : NULL;
	a->n_sink = ps->c->o.n_sink;
	a->n_rows = ps->n_rows;
	a->n_q_heads = tc->hq;
	a->n_kv_heads = tc->hk;
	a->head_dim = D;
	a->page_tokens = tc->P;
	a->max_len = ps->maxl;
	a->workspace = ps->ws;
	a->workspace_bytes = wsb;
	return 0;
}

/*
 * One launch of the prefill (@split 0) or the split kernel (1) into
 * @out (poisoned with NaN first).  0, or the launcher's error with
 * @why set.
 */
static int pset_run(struct pset *ps, int split, float *out, char *why,
		    size_t len)
{
	int ret;

	kvq_test_gpu_fill(ps->dout, 0xff, ps->nq * 4);
	ret = split ? kvq_gpu_attn_split(&ps->a, NULL) :
		      kvq_gpu_attn_prefill(&ps->a, NULL);
	if (ret) {
		const char *r = split ? NULL :
				kvq_gpu_attn_prefill_refusal(&ps->a);

		snprintf(why, len, "returned %d%s%s", ret, r ? ": " : "",
			 r ? r : "");
		return ret;
	}
	if (kvq_test_gpu_sync(why, len))
		return -EIO;
	return kvq_test_gpu_get(out, ps->dout, ps->nq * 4) ? -EIO : 0;
}

/* The largest |V| attention sees in @ps's cache (dequantized, sinks
 * included): the scale the error bound is relative to. */
static double pset_vmax(const struct pset *ps, const struct pcase *tc)
{
	float *row = malloc(tc->hd * sizeof(float));
	double mx = 0.0;
	uint32_t b, t, h, j;

	for (b = 0; row && b < tc->batch; b++)
		for (t = 0; t < tc->lens[b]; t++)
			for (h = 0; h < tc->hk; h++) {
				kvq_kv_read(ps->c, &ps->s[b], 0, t, h, true, row);
				for (j = 0; j < tc->hd; j++)
					if (fabs(row[j]) > mx)
						mx = fabs(row[j]);
			}
	free(row);
	return mx;
}

/*
 * kvq_gpu_attn_prefill() against kvq_kv_attend() for every row and query
 * head, output poisoned first, two runs that must agree bit for bit.
 *
 * Bound: |gpu - ref| <= 2e-5 * max|V| + 1e-6, the split kernel's.  Codes,
 * sink copies and f16 pages enter the products exactly, scales are
 * applied in f32, and the query and the scaled probabilities are split
 * into f16 high and low halves (about 2^-22 each), so what differs from
 * the CPU is f32 rounding in another order plus the tensor cores'
 * truncating accumulation over chains of at most 8 products, each
 * added to an f32 running sum: an error of a few 1e-7 of max|V| is
 * expected, below 1e-6 even with every addend of every product
 * truncated to 24 bits (the split kernel, f32 on CUDA cores, is printed
 * beside it on the same case).  The high halves alone would not pass:
 * f16 rounding of the query costs about 1e-4 of max|V| on the 300-row
 * q4 prompt, of P about 2e-4; a wrong scale, position or mask errs by
 * 1e-2 or more.
 */
void run_prefill(const struct pcase *tc)
{
	struct pset ps;
	const char *what;
	float *ref = NULL, *got = NULL, *gotb = NULL, *spl = NULL;
	uint32_t D = tc->hd, gqa = tc->hq / tc->hk, r, h, wr = 0, wi = 0;
	size_t i, bad = 0, nan = 0, qs;
	double maxerr = 0.0, serr = 0.0, vmax, tol;
	char why[256] = "", name[160], sp[300];
	int same = 1;

	snprintf(name, sizeof(name), "kvq_gpu_attn_prefill_%s_%s_%s_d%u_g%u",
		 tc->name, tn(tc->kt), tn(tc->vt), D, gqa);
	if (pset_init(&ps, tc, &what)) {
		tap_ok(0, "%s: %s", name, what);
		goto out;
	}
	qs = ps.a.q_stride;
	ref = calloc(ps.nq, 4);
	got = malloc(ps.nq * 4);
	gotb = malloc(ps.nq * 4);
	spl = malloc(ps.nq * 4);
	if (!ref || !got || !gotb || !spl) {
		tap_ok(0, "%s: host buffers", name);
		goto out;
	}
	if (pset_run(&ps, 0, got, why, sizeof(why)) ||
	    pset_run(&ps, 0, gotb, why, sizeof(why))) {
		tap_ok(0, "%s: launch (%s)", name, why);
		goto out;
	}
	for (r = 0; r < ps.n_rows; r++)
		for (h = 0; h < tc->hk; h++) {
			size_t off = (size_t)r * qs + (size_t)h * gqa * D;

			kvq_kv_attend(ps.c, &ps.s[ps.rseq[r]], 0, h, ps.q + off,
				      D, gqa, 1.0f / sqrtf((float)D),
				      (uint32_t)ps.rpos[r] + 1, ref + off, D);
		}
	vmax = pset_vmax(&ps, tc);
	tol = 2e-5 * vmax + 1e-6;
	for (r = 0; r < ps.n_rows; r++)
		for (i = 0; i < (size_t)tc->hq * D; i++) {
			size_t k = (size_t)r * qs + i;
			double e = fabs((double)got[k] - ref[k]);

			if (isnan(got[k])) {
				nan++;
			} else if (e > tol) {
				bad++;
			}
			if (isnan(got[k]) || e > maxerr) {
				maxerr = isnan(got[k]) ? INFINITY : e;
				wr = r;
				wi = (uint32_t)i;
			}
			if (memcmp(&got[k], &gotb[k], 4))
				same = 0;
		}
	if (pset_run(&ps, 1, spl, why, sizeof(why))) {
		snprintf(sp, sizeof(sp), "not run: %s", why);
	} else {
		for (r = 0; r < ps.n_rows; r++)
			for (i = 0; i < (size_t)tc->hq * D; i++) {
				size_t k = (size_t)r * qs + i;
				double e = fabs((double)spl[k] - ref[k]);

				serr = e > serr || isnan(e) ? e : serr;
			}
		snprintf(sp, sizeof(sp), "%.2e", serr);
	}
	tap_ok(!bad && !nan, "%s (P %u, sinks %u, %u rows of %u sequences, max "
	       "len %u%s; max err %.2e = %.2e max|V| (%.3f), bound %.2e, split "
	       "kernel %s; %zu over, %zu unwritten; worst: row %u (seq %d pos "
	       "%d) head %u ch %u got %.7g want %.7g)", name, tc->P, tc->n_sink,
	       ps.n_rows, tc->batch, ps.maxl, tc->no_ws ? ", no workspace" : "",
	       maxerr, maxerr / (vmax > 0 ? vmax : 1), vmax, tol, sp, bad, nan,
	       wr, ps.rseq[wr], ps.rpos[wr], wi / D, wi % D,
	       got[(size_t)wr * qs + wi], ref[(size_t)wr * qs + wi]);
	tap_ok(same, "%s_repeatable", name);
out:
	free(ref);
	free(got);
	free(gotb);
	free(spl);
	pset_fini(&ps, tc->batch);
}

/* What the prefill kernel declines (so the caller takes the split
 * kernel) and what it serves, with the reasons it gives. */
void prefill_refusals(void)
{
	static const float ctr[64];
	static const struct {
		const char *name;
		uint32_t hd, hq;
		int kt, vt, centred;
	} no[] = {
		{ "head_dim_32", 32, 32, KVQ_KV_Q4, KVQ_KV_Q4, 0 },
		{ "head_dim_256", 256, 32, KVQ_KV_Q4, KVQ_KV_Q4, 0 },
		{ "gqa16", 64, 128, KVQ_KV_Q4, KVQ_KV_Q4, 0 },
		{ "f32_keys", 64, 32, KVQ_KV_F32, KVQ_KV_Q4, 0 },
		{ "f32_values", 64, 32, KVQ_KV_Q8, KVQ_KV_F32, 0 },
		{ "centred_keys", 64, 32, KVQ_KV_Q4, KVQ_KV_Q4, 1 },
	};
	struct kvq_gpu_split_args a = {
		.n_rows = 16, .n_q_heads = 32, .n_kv_heads = 8, .head_dim = 64,
		.page_tokens = 16, .k_type = KVQ_KV_Q4, .v_type = KVQ_KV_Q4,
		.k_page_bytes = 1 << 20, .v_page_bytes = 1 << 20,
	};
	const char *why;
	size_t i;
	int ret;

	why = kvq_gpu_attn_prefill_refusal(&a);
	tap_ok(!why, "kvq_gpu_attn_prefill_serves_d64_g4_q4 (%s)",
	       why ? why : "served");
	for (i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
		a.head_dim = no[i].hd;
		a.n_q_heads = no[i].hq;
		a.k_type = no[i].kt;
		a.v_type = no[i].vt;
		a.k_center = no[i].centred ? ctr : NULL;
		a.rope_dim = no[i].centred ? 64 : 0;
		a.rope_base = 10000.0f;
		why = kvq_gpu_attn_prefill_refusal(&a);
		ret = kvq_gpu_attn_prefill(&a, NULL);
		tap_ok(ret == -EOPNOTSUPP && why, "kvq_gpu_attn_prefill_%s_declined "
		       "(%d: %s)", no[i].name, ret, why ? why : "no reason");
	}
	a.head_dim = 64;
	a.n_q_heads = 30;
	a.k_type = a.v_type = KVQ_KV_Q4;
	a.k_center = NULL;
	tap_ok(kvq_gpu_attn_prefill(&a, NULL) == -EINVAL,
	       "kvq_gpu_attn_prefill_heads_not_multiple_rejected");
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/*
 * Milliseconds of one launch of the prefill (@split 0) or split kernel,
 * the best of five after a warm-up; -1 on failure (@why set).
 */
static double pset_time(struct pset *ps, int split, char *why, size_t len)
{
	double best = -1.0;
	int k;

	for (k = 0; k < 6; k++) {
		double t0 = now_ms(), t;
		int ret = split ? kvq_gpu_attn_split(&ps->a, NULL) :
				  kvq_gpu_attn_prefill(&ps->a, NULL);

		if (ret || kvq_test_gpu_sync(why, len)) {
			if (ret)
				snprintf(why, len, "returned %d", ret);
			return -1.0;
		}
		t = now_ms() - t0;
		if (k && (best < 0 || t < best))
			best = t;
	}
	return best;
}

/*
 * Not a test: the time of one prompt's attention (head_dim 64, 32 query
 * and 8 KV heads, one layer) by the prefill and the split kernel, as a
 * diagnostic; the two results must agree within twice run_prefill()'s
 * bound (no CPU reference at these sizes).
 */
void prefill_speed(uint32_t rows, int kt, int vt)
{
	struct pcase tc = { "speed", kt, vt, 64, 32, 8, 16, 4, 1, { rows },
			    { rows }, 1.0f, 0 };
	struct pset ps;
	const char *what;
	float *a = NULL, *b = NULL;
	double tp, ts, diff = 0.0, tol = 0.0;
	char why[256] = "";
	size_t i, nan = 0;

	if (pset_init(&ps, &tc, &what)) {
		tap_ok(0, "prefill speed %u rows: %s", rows, what);
		goto out;
	}
	a = malloc(ps.nq * 4);
	b = malloc(ps.nq * 4);
	if (!a || !b || pset_run(&ps, 0, a, why, sizeof(why)) ||
	    pset_run(&ps, 1, b, why, sizeof(why))) {
		tap_ok(0, "prefill speed %u rows: %s", rows,
		       a && b ? why : "host buffers");
		goto out;
	}
	tol = 2 * (2e-5 * pset_vmax(&ps, &tc) + 1e-6);
	for (i = 0; i < ps.nq; i++) {
		double e = fabs((double)a[i] - b[i]);

		if (i % ps.a.q_stride >= (size_t)tc.hq * tc.hd)
			continue;
		if (isnan(e))
			nan++;
		else if (e > diff)
			diff = e;
	}
	tap_ok(diff <= tol && !nan, "kvq_gpu_attn_prefill_matches_split_%u_rows_"
	       "%s_%s (max diff %.2e, bound %.2e, %zu not numbers)", rows,
	       tn(kt), tn(vt), diff, tol, nan);
	tp = pset_time(&ps, 0, why, sizeof(why));
	ts = pset_time(&ps, 1, why, sizeof(why));
	tap_diag("attention of a %u-row prompt (head_dim 64, 32/8 heads, "
		 "%s/%s, one layer): prefill %.3f ms, split %.3f ms, %.1fx%s%s",
		 rows, tn(kt), tn(vt), tp, ts, tp > 0 ? ts / tp : 0.0,
		 tp < 0 || ts < 0 ? "; " : "", tp < 0 || ts < 0 ? why : "");
out:
	free(a);
	free(b);
	pset_fini(&ps, tc.batch);
}

/* ------------------------------------------------------------- append */

/*
 * Append arguments for layer 0 of host cache @c on device copy @d: its
 * pools, block table, sinks and geometry, RoPE over @rope_dim at base
 * 10000.  The rows, their positions, the angles and the centres are the
 * caller's.
 */
static void append_at(struct kvq_gpu_append_args *a,
		      const struct kvq_kvcache *c, const struct dev *d, int kt,
		      int vt, uint32_t hk, uint32_t D, uint32_t P,
		      uint32_t n_sink, uint32_t rope_dim, int neox)
{
	memset(a, 0, sizeof(*a));
	a->k_pages = d->kp;
	a->v_pages = d->vp;
	a->k_page_bytes = c->layers[0].k.page_bytes;
	a->v_page_bytes = c->layers[0].v.page_bytes;
	a->k_type = kt;
	a->v_type = vt;
	a->block_table = d->bt;
	a->bt_stride = d->bt_stride;
	a->sink = (uint16_t *const *)d->sinkv;
	a->n_sink = n_sink;
	a->n_kv_heads = hk;
	a->head_dim = D;
	a->page_tokens = P;
	a->rope_dim = rope_dim;
	a->rope_base = 10000.0f;
	a->rope_neox = neox;
}

/*
 * kvq_gpu_attn_append() of two new rows for each of four sequences (one
 * empty, one in a sink, one at a page end, one long) against the engine's
 * rotation and kvq_kv_write() of the same rows: the K and V pools and the
 * sink copies must be equal byte for byte.  With centring the host cache
 * and the kernel take R_pos c off each rotated key (centres ten times the
 * keys: a missing or wrong correction changes nearly every byte).
 */
void run_append(const struct acase *tc)
{
	enum { B = 4, NEW = 2 };
	const uint32_t hk = 8, P = 16, n_sink = 4;
	const uint32_t D = tc->hd ? tc->hd : HD;
	uint32_t lens[B] = { 0, 3, 15, 40 }, b, j, r, nrows = B * NEW;
	struct kvq_kv_seq s[B];
	struct kvq_kvcache *c = NULL;
	struct kvq_gpu_append_args a;
	struct dev d;
	struct centring ce = tc->ce;
	size_t kvd = (size_t)hk * D, kb, vb, sinkn, i, diff = 0;
	float *kr = malloc(nrows * kvd * 4), *vr = malloc(nrows * kvd * 4);
	float *cs = malloc((size_t)nrows * D * 4), *tmp = malloc(kvd * 4);
	float *ctr;
	uint16_t *k16 = malloc(nrows * kvd * 2), *v16 = malloc(nrows * kvd * 2);
	int32_t rseq[B * NEW], rpos[B * NEW];
	uint32_t upos[B * NEW];
	void *dk = NULL, *dv = NULL, *dseq = NULL, *dpos = NULL, *dcs = NULL;
	void *dctr = NULL;
	uint8_t *back = NULL;
	char why[256] = "", cd[96];
	int ret, fail;

	g_hd = D;
	ce.rope_dim = tc->rope_dim;
	ce.neox = tc->neox;
	ce.base = 10000.0f;
	centring_desc(&ce, cd, sizeof(cd));
	ctr = centring_on(&ce, hk, &fail);
	if (!fail)
		c = build(tc->kt, tc->vt, hk, P, n_sink, B, lens, 1.0f, s);
	if (!c || !kr || !vr || !cs || !tmp || !k16 || !v16) {
		tap_ok(0, "append %s%s: host set-up", tc->name, cd);
		goto out_host;
	}
	if (ctr && !c->layers[0].center)
		snprintf(cd, sizeof(cd), " centres given, %s keys stay as they are",
			 tn(tc->kt));
	for (b = 0; b < B; b++)
		if (kvq_kv_seq_reserve(c, &s[b], NEW)) {
			tap_ok(0, "append %s%s: reserve", tc->name, cd);
			goto out_host;
		}
	for (r = 0; r < nrows; r++) {
		rseq[r] = (int32_t)(r % B);
		rpos[r] = (int32_t)(lens[r % B] + r / B);
		upos[r] = (uint32_t)rpos[r];
	}
	for (i = 0; i < nrows * kvd; i++) {
		kr[i] = 2.0f * frand();
		vr[i] = 2.0f * frand();
		k16[i] = kvq_f32_to_f16(kr[i]);
		v16[i] = kvq_f32_to_f16(vr[i]);
		if (tc->in_f16) {
			kr[i] = kvq_f16_to_f32(k16[i]);
			vr[i] = kvq_f16_to_f32(v16[i]);
		}
	}
	/* Exact .5 ties of the quantizer now and then. */
	for (r = 0; r < nrows; r++)
		vr[r * kvd + 5] = 0.5f * vr[r * kvd + 7];
	if (tc->in_f16)
		for (r = 0; r < nrows; r++)
			v16[r * kvd + 5] = kvq_f32_to_f16(vr[r * kvd + 5]);
	kvq_attn_ref_rope_table(upos, nrows, tc->rope_dim ? tc->rope_dim : 2,
				10000.0f, cs);
	/* The device gets the cache as it is before the append. */
	if (dev_put(&d, c, s, B, lens) || centring_dev(c, &dctr)) {
		tap_ok(0, "append %s%s: device set-up", tc->name, cd);
		goto out_dev;
	}
	kb = c->layers[0].k.page_bytes * c->o.n_pages;
	vb = c->layers[0].v.page_bytes * c->o.n_pages;
	sinkn = 2 * n_sink * kvd;
	dk = kvq_test_gpu_alloc(nrows * kvd * 4);
	dv = kvq_test_gpu_alloc(nrows * kvd * 4);
	dseq = kvq_test_gpu_alloc(sizeof(rseq));
	dpos = kvq_test_gpu_alloc(sizeof(rpos));
	dcs = kvq_test_gpu_alloc((size_t)nrows * D * 4);
	back = malloc(kb > vb ? kb : vb);
	if (!dk || !dv || !dseq || !dpos || !dcs || !back ||
	    kvq_test_gpu_put(dk, tc->in_f16 ? (void *)k16 : (void *)kr,
			     nrows * kvd * (tc->in_f16 ? 2 : 4)) ||
	    kvq_test_gpu_put(dv, tc->in_f16 ? (void *)v16 : (void *)vr,
			     nrows * kvd * (tc->in_f16 ? 2 : 4)) ||
	    kvq_test_gpu_put(dseq, rseq, sizeof(rseq)) ||
	    kvq_test_gpu_put(dpos, rpos, sizeof(rpos)) ||
	    kvq_test_gpu_put(dcs, cs, (size_t)nrows * (tc->rope_dim / 2) * 8)) {
		tap_ok(0, "append %s%s: device buffers", tc->name, cd);
		goto out_dev;
	}
	append_at(&a, c, &d, tc->kt, tc->vt, hk, D, P, n_sink, tc->rope_dim,
		  tc->neox);
	a.k = dk;
	a.v = dv;
	a.in_type = tc->in_f16 ? KVQ_GPU_F16 : KVQ_GPU_F32;
	a.n_rows = nrows;
	a.row_seq = dseq;
	a.row_pos = dpos;
	a.rope_cs = tc->table ? dcs : NULL;
	a.k_center = dctr;
	ret = kvq_gpu_attn_append(&a, NULL);
	if (ret || kvq_test_gpu_sync(why, sizeof(why))) {
		tap_ok(0, "append %s%s: launch (%d %s)", tc->name, cd, ret,
		       why);
		goto out_dev;
	}
	/* The twin: the engine's rotation, then kvq_kv_write() (which
	 * centres the key where the layer is centred). */
	for (r = 0; r < nrows; r++) {
		memcpy(tmp, kr + r * kvd, kvd * 4);
		kvq_attn_ref_rope(tmp, hk, D, tc->rope_dim, tc->neox,
				  cs + (size_t)r * (tc->rope_dim / 2) * 2);
		kvq_kv_write(c, &s[rseq[r]], 0, upos[r], tmp, vr + r * kvd);
	}
	kvq_test_gpu_get(back, d.kp, kb);
	for (i = 0; i < kb; i++)
		diff += back[i] != c->layers[0].k.mem[i];
	kvq_test_gpu_get(back, d.vp, vb);
	for (i = 0; i < vb; i++)
		diff += back[i] != c->layers[0].v.mem[i];
	for (b = 0; b < B; b++) {
		kvq_test_gpu_get(back, d.sinks[b], sinkn * 2);
		for (j = 0; j < sinkn * 2; j++)
			diff += back[j] != ((uint8_t *)s[b].sink)[j];
	}
	tap_ok(diff == 0, "kvq_gpu_attn_append_%s%s_%s_%s_d%u_bytes_equal (rope "
	       "%u %s, %s angles, %s input%s; %zu bytes differ)", tc->name,
	       ctr ? "_centred" : "", tn(tc->kt), tn(tc->vt), D, tc->rope_dim,
	       tc->neox ? "neox" : "adjacent", tc->table ? "host" : "device",
	       tc->in_f16 ? "f16" : "f32", cd, diff);
out_dev:
	kvq_test_gpu_free(dk);
	kvq_test_gpu_free(dv);
	kvq_test_gpu_free(dseq);
	kvq_test_gpu_free(dpos);
	kvq_test_gpu_free(dcs);
	kvq_test_gpu_free(dctr);
	dev_free(&d);
out_host:
	unbuild(c, s, B);
	free(back);
	free(kr);
	free(vr);
	free(cs);
	free(tmp);
	free(k16);
	free(v16);
	centring_off(ctr);
	g_hd = HD;
}

/* ------------------------------------------------- append in the decode */

/* Points append @ap and attention @a at device copy @d and workspace @ws. */
static void fused_at(struct kvq_gpu_append_args *ap,
		     struct kvq_gpu_attn_args *a, const struct dev *d, void *ws)
{
	ap->k_pages = d->kp;
	ap->v_pages = d->vp;
	ap->block_table = d->bt;
	ap->sink = (uint16_t *const *)d->sinkv;
	a->k_pages = d->kp;
	a->v_pages = d->vp;
	a->block_table = d->bt;
	a->sink = (const uint16_t *const *)d->sinkv;
	a->seq_lens = d->lens;
	a->workspace = ws;
}

/* Bytes that differ between device buffers @p and @q of @n bytes, read
 * back through host buffers @x and @y. */
static size_t dev_bytes_differ(const void *p, const void *q, size_t n,
			       uint8_t *x, uint8_t *y)
{
	size_t i, diff = 0;

	kvq_test_gpu_get(x, p, n);
	kvq_test_gpu_get(y, q, n);
	for (i = 0; i < n; i++)
		diff += x[i] != y[i];
	return diff;
}

/*
 * kvq_gpu_attn_decode() with kvq_gpu_attn_args.append against the append
 * kernel and then the decode kernel, on two device copies of one cache:
 * five sequences, each with one new token (in a sink, in a sink with
 * tokens before it, at a page end, past a few splits, and longer), GQA
 * @hq / 8.  The outputs must be the same bits, and the K and V pools and
 * the sink copies the same bytes; a second call with the append gives
 * the same bits again.  Then arguments the fused form does not take.
 */
void run_fused_append(int kt, int vt, uint32_t D, uint32_t hq, int neox)
{
	enum { B = 5 };
	const uint32_t hk = 8, P = 16, n_sink = 4;
	uint32_t before[B] = { 0, 2, 15, 700, 3000 }, after[B], b, maxl = 0;
	struct kvq_kv_seq s[B];
	struct kvq_kvcache *c = NULL;
	struct kvq_gpu_append_args ap;
	struct kvq_gpu_attn_args a;
	struct dev d[2];
	size_t kvd = (size_t)hk * D, nq = (size_t)B * hq * D, kb, vb, sinkn;
	size_t i, wsb, diff = 0, odiff = 0, rdiff = 0;
	float *kr = malloc(B * kvd * 4), *vr = malloc(B * kvd * 4);
	float *q = malloc(nq * 4), *cs = malloc((size_t)B * D * 4);
	float *o[3] = { malloc(nq * 4), malloc(nq * 4), malloc(nq * 4) };
	int32_t rpos[B];
	uint32_t upos[B];
	void *dk = NULL, *dv = NULL, *dpos = NULL, *dcs = NULL, *dq = NULL;
	void *dout = NULL, *ws[2] = { NULL, NULL };
	uint8_t *x = NULL, *y = NULL;
	char why[256] = "", name[96];
	int r1, r2, r3;

	snprintf(name, sizeof(name), "%s_%s_d%u_gqa%u%s", tn(kt), tn(vt), D,
		 hq / hk, neox ? "_neox" : "");
	memset(d, 0, sizeof(d));
	g_hd = D;
	for (b = 0; b < B; b++) {
		after[b] = before[b] + 1;
		rpos[b] = (int32_t)before[b];
		upos[b] = before[b];
		if (after[b] > maxl)
			maxl = after[b];
	}
	c = build(kt, vt, hk, P, n_sink, B, before, 1.0f, s);
	if (!c || !kr || !vr || !q || !cs || !o[0] || !o[1] || !o[2]) {
		tap_ok(0, "fused append %s: host set-up", name);
		goto out_host;
	}
	for (b = 0; b < B; b++)
		if (kvq_kv_seq_reserve(c, &s[b], 1)) {
			tap_ok(0, "fused append %s: reserve", name);
			goto out_host;
		}
	for (i = 0; i < B * kvd; i++) {
		kr[i] = 2.0f * frand();
		vr[i] = 2.0f * frand();
	}
	for (i = 0; i < nq; i++)
		q[i] = frand();
	kvq_attn_ref_rope_table(upos, B, D, 10000.0f, cs);
	if (dev_put(&d[0], c, s, B, after) || dev_put(&d[1], c, s, B, after)) {
		tap_ok(0, "fused append %s: device set-up", name);
		goto out_dev;
	}
	kb = c->layers[0].k.page_bytes * c->o.n_pages;
	vb = c->layers[0].v.page_bytes * c->o.n_pages;
	sinkn = 2 * n_sink * kvd;
	dk = kvq_test_gpu_alloc(B * kvd * 4);
	dv = kvq_test_gpu_alloc(B * kvd * 4);
	dpos = kvq_test_gpu_alloc(sizeof(rpos));
	dcs = kvq_test_gpu_alloc((size_t)B * D * 4);
	dq = kvq_test_gpu_alloc(nq * 4);
	dout = kvq_test_gpu_alloc(nq * 4);
	x = malloc(kb > vb ? kb : vb);
	y = malloc(kb > vb ? kb : vb);
	if (!dk || !dv || !dpos || !dcs || !dq || !dout || !x || !y ||
	    kvq_test_gpu_put(dk, kr, B * kvd * 4) ||
	    kvq_test_gpu_put(dv, vr, B * kvd * 4) ||
	    kvq_test_gpu_put(dpos, rpos, sizeof(rpos)) ||
	    kvq_test_gpu_put(dcs, cs, (size_t)B * D * 4) ||
	    kvq_test_gpu_put(dq, q, nq * 4)) {
		tap_ok(0, "fused append %s: device buffers", name);
		goto out_dev;
	}
	append_at(&ap, c, &d[0], kt, vt, hk, D, P, n_sink, D, neox);
	ap.k = dk;
	ap.v = dv;
	ap.in_type = KVQ_GPU_F32;
	ap.n_rows = B;
	ap.row_pos = dpos;
	ap.rope_cs = dcs;
	memset(&a, 0, sizeof(a));
	a.q = dq;
	a.out = dout;
	a.q_type = a.out_type = KVQ_GPU_F32;
	a.k_page_bytes = ap.k_page_bytes;
	a.v_page_bytes = ap.v_page_bytes;
	a.k_type = kt;
	a.v_type = vt;
	a.bt_stride = d[0].bt_stride;
	a.max_len = maxl;
	a.n_sink = n_sink;
	a.batch = B;
	a.n_q_heads = hq;
	a.n_kv_heads = hk;
	a.head_dim = D;
	a.page_tokens = P;
	a.scale = 1.0f / sqrtf((float)D);
	wsb = kvq_gpu_attn_workspace_bytes(&a);
	ws[0] = wsb ? kvq_test_gpu_alloc(wsb) : NULL;
	ws[1] = wsb ? kvq_test_gpu_alloc(wsb) : NULL;
	if (!ws[0] || !ws[1] || kvq_test_gpu_fill(ws[0], 0, wsb) ||
	    kvq_test_gpu_fill(ws[1], 0, wsb)) {
		tap_ok(0, "fused append %s: workspace", name);
		goto out_dev;
	}
	a.workspace_bytes = wsb;
	/* The two launches on copy 0 ... */
	fused_at(&ap, &a, &d[0], ws[0]);
	kvq_test_gpu_fill(dout, 0xff, nq * 4);
	r1 = kvq_gpu_attn_append(&ap, NULL);
	if (!r1)
		r1 = kvq_gpu_attn_decode(&a, NULL);
	if (!r1 && !kvq_test_gpu_sync(why, sizeof(why)))
		kvq_test_gpu_get(o[0], dout, nq * 4);
	/* ... and the one on copy 1, twice. */
	fused_at(&ap, &a, &d[1], ws[1]);
	a.append = &ap;
	kvq_test_gpu_fill(dout, 0xff, nq * 4);
	r2 = kvq_gpu_attn_decode(&a, NULL);
	if (!r2 && !kvq_test_gpu_sync(why, sizeof(why)))
		kvq_test_gpu_get(o[1], dout, nq * 4);
	kvq_test_gpu_fill(dout, 0xff, nq * 4);
	r3 = kvq_gpu_attn_decode(&a, NULL);
	if (!r3 && !kvq_test_gpu_sync(why, sizeof(why)))
		kvq_test_gpu_get(o[2], dout, nq * 4);
	if (r1 || r2 || r3 || why[0]) {
		tap_ok(0, "fused append %s: launches (%d %d %d %s)", name, r1,
		       r2, r3, why);
		goto out_dev;
	}
	odiff = memcmp(o[0], o[1], nq * 4) != 0;
	rdiff = memcmp(o[1], o[2], nq * 4) != 0;
	for (i = 0; i < nq; i++)
		if (o[1][i] != o[1][i]) {
			odiff = 1;	/* NaN: an output left unwritten */
			break;
		}
	diff = dev_bytes_differ(d[0].kp, d[1].kp, kb, x, y) +
	       dev_bytes_differ(d[0].vp, d[1].vp, vb, x, y);
	for (b = 0; b < B; b++)
		if (d[0].sinks[b])
			diff += dev_bytes_differ(d[0].sinks[b], d[1].sinks[b],
						 sinkn * 2, x, y);
	tap_ok(!odiff && !rdiff && !diff,
	       "kvq_gpu_attn_decode_fused_append_%s_same_bits (outputs %s, "
	       "again %s, %zu page and sink bytes differ)", name,
	       odiff ? "differ" : "equal", rdiff ? "differ" : "equal", diff);

	/* What it does not take: centred keys, angles without a table,
	 * rows that go elsewhere. */
	{
		float ctr = 0.0f;

		ap.k_center = &ctr;
		r1 = kvq_gpu_attn_decode(&a, NULL);
		ap.k_center = NULL;
		ap.rope_cs = NULL;
		r2 = kvq_gpu_attn_decode(&a, NULL);
		ap.rope_cs = dcs;
		ap.k_pages = d[0].kp;
		r3 = kvq_gpu_attn_decode(&a, NULL);
		tap_ok(r1 == -EOPNOTSUPP && r2 == -EOPNOTSUPP && r3 == -EINVAL,
		       "kvq_gpu_attn_decode_fused_append_%s_args_checked "
		       "(centred %d, no table %d, other pages %d)", name, r1,
		       r2, r3);
	}
out_dev:
	kvq_test_gpu_free(dk);
	kvq_test_gpu_free(dv);
	kvq_test_gpu_free(dpos);
	kvq_test_gpu_free(dcs);
	kvq_test_gpu_free(dq);
	kvq_test_gpu_free(dout);
	kvq_test_gpu_free(ws[0]);
	kvq_test_gpu_free(ws[1]);
	dev_free(&d[0]);
	dev_free(&d[1]);
out_host:
	unbuild(c, s, B);
	free(x);
	free(y);
	free(kr);
	free(vr);
	free(q);
	free(cs);
	for (i = 0; i < 3; i++)
		free(o[i]);
	g_hd = HD;
}

#endif /* KVQ_ATTN_GPU */
