/*
 * test_fisher.c - unit tests for the Fisher sidecar reader and the tensor
 * ranks (engine/fisher.c).
 *
 * Why this file exists: the ranks decide where every weight lives, and a
 * sidecar made for another model must never be taken for this one.  The
 * test writes a small model and sidecars for it as GGUF files (a writer of
 * its own, below), checks trace, density and rank arithmetic in the full
 * and row layouts, the tie rules, the default path beside the model and the
 * fallback order, and refuses every kind of bad sidecar: missing, extra,
 * mis-shaped or mistyped tensors, negative or non-finite values, a tensor
 * count mismatch, a sidecar of another model, and metadata it cannot read.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/fisher.h"
#include "engine/gguf.h"
#include "tap.h"

#define MAX_KV 16
#define MAX_T 24

/* ------------------------------------------------------------ writer */

struct kv {
	char key[64];
	enum kvq_gguf_vtype type;	/* U32, U64 or STRING */
	uint64_t u;
	char s[128];
};

struct tensor {
	char name[64];
	uint32_t type;
	uint32_t nd;
	uint64_t ne[KVQ_GGUF_MAX_DIMS];
	uint64_t nbytes;
	void *data;			/* nbytes, owned */
};

struct file {
	struct kv kv[MAX_KV];
	int nkv;
	struct tensor t[MAX_T];
	int nt;
};

static void *xcalloc(size_t n)
{
	void *p = calloc(1, n ? n : 1);

	if (!p) {
		perror("calloc");
		exit(99);
	}
	return p;
}

static void put(FILE *f, const void *p, size_t n)
{
	if (n && fwrite(p, 1, n, f) != n) {
		perror("fwrite");
		exit(99);
	}
}

static void put_le(FILE *f, uint64_t v, int width)
{
	uint8_t b[8];
	int i;

	for (i = 0; i < width; i++)
		b[i] = (uint8_t)(v >> (8 * i));
	put(f, b, width);
}

static void put_str(FILE *f, const char *s)
{
	put_le(f, strlen(s), 8);
	put(f, s, strlen(s));
}

static void pad(FILE *f, uint64_t *at, uint64_t align)
{
	static const uint8_t zero[32];
	uint64_t n = (align - *at % align) % align;

	put(f, zero, n);
	*at += n;
}

/* Writes @g as a GGUF v3 file: metadata, tensor infos, data 32-aligned. */
static void file_write(const struct file *g, const char *path)
{
	FILE *f = fopen(path, "wb");
	uint64_t off = 0, at;
	int i;
	uint32_t d;

	if (!f) {
		perror(path);
		exit(99);
	}
	put(f, "GGUF", 4);
	put_le(f, 3, 4);
	put_le(f, g->nt, 8);
	put_le(f, g->nkv, 8);
	for (i = 0; i < g->nkv; i++) {
		put_str(f, g->kv[i].key);
		put_le(f, g->kv[i].type, 4);
		if (g->kv[i].type == KVQ_GGUF_STRING)
			put_str(f, g->kv[i].s);
		else
			put_le(f, g->kv[i].u,
			       g->kv[i].type == KVQ_GGUF_U32 ? 4 : 8);
	}
	for (i = 0; i < g->nt; i++) {
		put_str(f, g->t[i].name);
		put_le(f, g->t[i].nd, 4);
		for (d = 0; d < g->t[i].nd; d++)
			put_le(f, g->t[i].ne[d], 8);
		put_le(f, g->t[i].type, 4);
		put_le(f, off, 8);
		off += (g->t[i].nbytes + 31) / 32 * 32;
	}
	at = (uint64_t)ftell(f);
	pad(f, &at, 32);
	for (i = 0; i < g->nt; i++) {
		put(f, g->t[i].data, g->t[i].nbytes);
		at += g->t[i].nbytes;
		pad(f, &at, 32);
	}
	if (fclose(f)) {
		perror(path);
		exit(99);
	}
}

static void file_free(struct file *g)
{
	int i;

	for (i = 0; i < g->nt; i++)
		free(g->t[i].data);
	g->nt = 0;
	g->nkv = 0;
}

static struct kv *kv_slot(struct file *g, const char *key)
{
	int i;

	for (i = 0; i < g->nkv; i++)
		if (!strcmp(g->kv[i].key, key))
			return &g->kv[i];
	if (g->nkv == MAX_KV)
		exit(99);
	snprintf(g->kv[g->nkv].key, sizeof(g->kv[0].key), "%s", key);
	return &g->kv[g->nkv++];
}

static void kv_str(struct file *g, const char *key, const char *s)
{
	struct kv *kv = kv_slot(g, key);

	kv->type = KVQ_GGUF_STRING;
	snprintf(kv->s, sizeof(kv->s), "%s", s);
}

static void kv_uint(struct file *g, const char *key, enum kvq_gguf_vtype t,
		    uint64_t u)
{
	struct kv *kv = kv_slot(g, key);

	kv->type = t;
	kv->u = u;
}

static void kv_del(struct file *g, const char *key)
{
	int i;

	for (i = 0; i < g->nkv; i++)
		if (!strcmp(g->kv[i].key, key)) {
			g->kv[i] = g->kv[--g->nkv];
			return;
		}
}

static uint64_t n_elems(const struct tensor *t)
{
	uint64_t n = 1;
	uint32_t d;

	for (d = 0; d < t->nd; d++)
		n *= t->ne[d];
	return n;
}

static struct tensor *add_tensor(struct file *g, const char *name,
				 uint32_t type, uint32_t nd, uint64_t ne0,
				 uint64_t ne1, uint64_t ne2)
{
	struct tensor *t;

	if (g->nt == MAX_T)
		exit(99);
	t = &g->t[g->nt++];
	snprintf(t->name, sizeof(t->name), "%s", name);
	t->type = type;
	t->nd = nd;
	t->ne[0] = ne0;
	t->ne[1] = nd > 1 ? ne1 : 1;
	t->ne[2] = nd > 2 ? ne2 : 1;
	t->ne[3] = 1;
	t->nbytes = kvq_type_row_bytes(type, ne0) * (n_elems(t) / ne0);
	t->data = xcalloc(t->nbytes);
	return t;
}

/* ------------------------------------------------------------ files */

/*
 * The model.  File order is not the fallback order; bytes as stored:
 * F16 2/element, Q8_0 34 per 32 elements, F32 4/element.
 */
static void model_file(struct file *g)
{
	memset(g, 0, sizeof(*g));
	kv_str(g, "general.architecture", "llama");
	kv_str(g, "general.name", "tiny");
	add_tensor(g, "token_embd.weight", KVQ_TYPE_F16, 2, 8, 16, 0);
	add_tensor(g, "blk.0.ffn_up.weight", KVQ_TYPE_Q8_0, 2, 32, 4, 0);
	add_tensor(g, "blk.0.attn_q.weight", KVQ_TYPE_F16, 2, 8, 8, 0);
	add_tensor(g, "blk.0.attn_norm.weight", KVQ_TYPE_F32, 1, 8, 0, 0);
	add_tensor(g, "blk.1.attn_q.weight", KVQ_TYPE_F16, 2, 8, 8, 0);
	add_tensor(g, "blk.1.ffn_up.weight", KVQ_TYPE_Q8_0, 2, 32, 4, 0);
	add_tensor(g, "blk.1.post_norm.weight", KVQ_TYPE_F32, 1, 8, 0, 0);
	add_tensor(g, "blk.2.attn_q.weight", KVQ_TYPE_F16, 2, 8, 8, 0);
	add_tensor(g, "blk.2.ffn_up.weight", KVQ_TYPE_Q8_0, 2, 32, 4, 0);
	add_tensor(g, "blk.3.attn_q.weight", KVQ_TYPE_F16, 2, 8, 8, 0);
	add_tensor(g, "blk.3.ffn_up.weight", KVQ_TYPE_Q8_0, 2, 32, 4, 0);
	add_tensor(g, "output_norm.weight", KVQ_TYPE_F32, 1, 8, 0, 0);
	add_tensor(g, "blk.2.ffn_gate_exps.weight", KVQ_TYPE_F32, 3, 8, 2, 3);
}

#define N_MODEL 13

/* Fallback order of the model above, as model file indices. */
static const int fallback_order[N_MODEL] = {
	11, 0,			/* outside the blocks, smaller first */
	3, 2, 1,		/* block 0: attention (small first), FFN */
	9, 10,			/* block 3: the other end */
	4, 5, 6,		/* block 1: attention, FFN, other */
	7, 8, 12,		/* block 2 */
};

/*
 * E[g²] of element @j of model tensor @i.  Tensors 0, 4 and 7 tie in
 * density (0.5 per F16 element = 0.25 per byte); tensor 1 holds 1 and then
 * 2^-30s, which a float accumulator would lose; the rest are small binary
 * fractions so every trace is exact in double.
 */
static float value(int i, uint64_t j)
{
	switch (i) {
	case 0: case 4: case 7:
		return 0.5f;
	case 1:
		return j ? ldexpf(1.0f, -30) : 1.0f;
	case 12:
		return (float)(j + 1) / 16.0f;
	default:
		return (float)(i + 1) / 64.0f * (float)(j % 4 + 1);
	}
}

static void sidecar_meta(struct file *s, const char *model_name, int count)
{
	kv_str(s, "general.type", "fim");
	kv_str(s, "general.name", "tiny Fisher diagonal");
	kv_uint(s, "fim.version", KVQ_GGUF_U32, 1);
	kv_str(s, "fim.source", "adam_exp_avg_sq");
	kv_uint(s, "fim.token_count", KVQ_GGUF_U64, 123456789012ull);
	kv_uint(s, "fim.step_count", KVQ_GGUF_U64, 1072);
	kv_str(s, "fim.dataset", "six novels");
	kv_str(s, "fim.model.name", model_name);
	kv_str(s, "fim.model.architecture", "llama");
	kv_uint(s, "fim.model.tensor_count", KVQ_GGUF_U32, count);
	kv_str(s, "fim.model.fingerprint", "0123abcd");
}

/* Row @row of model tensor @i summed as a tool would: double, then F32. */
static float row_sum(const struct file *m, int i, uint64_t row)
{
	uint64_t j, n = m->t[i].ne[0];
	double sum = 0.0;

	for (j = 0; j < n; j++)
		sum += value(i, row * n + j);
	return (float)sum;
}

/*
 * The sidecar of @m: full layout, or (@rows) per-row sums for tensors of
 * two or more dimensions.
 */
static void sidecar_file(struct file *s, const struct file *m, bool rows)
{
	int i;
	uint64_t j, n;

	memset(s, 0, sizeof(*s));
	sidecar_meta(s, "tiny", m->nt);
	for (i = 0; i < m->nt; i++) {
		const struct tensor *mt = &m->t[i];
		struct tensor *t;
		float *v;

		n = n_elems(mt);
		if (rows && mt->nd >= 2) {
			t = add_tensor(s, mt->name, KVQ_TYPE_F32, mt->nd - 1,
				       mt->ne[1], mt->ne[2], mt->ne[3]);
			v = t->data;
			for (j = 0; j < n / mt->ne[0]; j++)
				v[j] = row_sum(m, i, j);
		} else {
			t = add_tensor(s, mt->name, KVQ_TYPE_F32, mt->nd,
				       mt->ne[0], mt->ne[1], mt->ne[2]);
			v = t->data;
			for (j = 0; j < n; j++)
				v[j] = value(i, j);
		}
	}
}

static struct tensor *find(struct file *g, const char *name)
{
	int i;

	for (i = 0; i < g->nt; i++)
		if (!strcmp(g->t[i].name, name))
			return &g->t[i];
	return NULL;
}

static void drop(struct file *g, const char *name)
{
	struct tensor *t = find(g, name);

	if (!t)
		exit(99);
	free(t->data);
	*t = g->t[--g->nt];
}

/* ------------------------------------------------------------ harness */

static char tmpdir[] = "/tmp/test_fisher.XXXXXX";
static char model_path[64], default_path[64], bad_path[64];
static struct kvq_gguf *model;

#define SENTINEL ((struct kvq_fisher *)&tmpdir)

#define CHECK(cond)						\
	do {							\
		if (!(cond)) {					\
			tap_diag("failed: %s", #cond);		\
			ok = false;				\
		}						\
	} while (0)

/* Expected trace of model tensor @i: the double sum of what the sidecar
 * holds (elements, or F32 row sums with @rows). */
static double want_trace(const struct file *m, int i, bool rows)
{
	uint64_t j, n = n_elems(&m->t[i]);
	double sum = 0.0;

	if (rows && m->t[i].nd >= 2) {
		for (j = 0; j < n / m->t[i].ne[0]; j++)
			sum += row_sum(m, i, j);
		return sum;
	}
	for (j = 0; j < n; j++)
		sum += value(i, j);
	return sum;
}

/* Rank by the rule in fisher.h, worked out pairwise. */
static uint32_t want_rank(const double *dens, const struct file *m, int i)
{
	uint32_t r = 1;
	int j;

	for (j = 0; j < m->nt; j++) {
		if (j == i)
			continue;
		if (dens[j] > dens[i] ||
		    (dens[j] == dens[i] && m->t[j].nbytes < m->t[i].nbytes) ||
		    (dens[j] == dens[i] && m->t[j].nbytes == m->t[i].nbytes &&
		     j < i))
			r++;
	}
	return r;
}

static bool check_scores(const struct kvq_fisher *f, const struct file *m,
			 bool rows)
{
	const struct kvq_fisher_entry *e;
	double dens[MAX_T];
	bool ok = true;
	size_t n;
	int i;

	e = kvq_fisher_entries(f, &n);
	CHECK(n == (size_t)m->nt);
	if (n != (size_t)m->nt)
		return false;
	for (i = 0; i < m->nt; i++)
		dens[i] = want_trace(m, i, rows) / (double)m->t[i].nbytes;
	for (i = 0; i < m->nt; i++) {
		const struct kvq_fisher_entry *x = &e[i];

		CHECK(!strcmp(x->name, m->t[i].name));
		CHECK(x->index == (uint32_t)i);
		CHECK(x->bytes == m->t[i].nbytes);
		CHECK(x->n_elements == n_elems(&m->t[i]));
		CHECK(!strcmp(x->type, kvq_type_name(m->t[i].type)));
		CHECK(x->rows == (rows && m->t[i].nd >= 2));
		CHECK(x->trace == want_trace(m, i, rows));
		CHECK(x->density == dens[i]);
		CHECK(x->score == x->density);
		CHECK(x->rank == want_rank(dens, m, i));
		CHECK(kvq_fisher_ranked(f, x->rank) == x);
		CHECK(kvq_fisher_find(f, x->name) == x);
		if (!ok) {
			tap_diag("tensor %s: trace %.17g (want %.17g) rank %u (want %u)",
				 x->name, x->trace, want_trace(m, i, rows),
				 x->rank, want_rank(dens, m, i));
			break;
		}
	}
	return ok;
}

/* ------------------------------------------------------------ cases */

static void test_default_path(void)
{
	char buf[64];
	bool ok = true;

	CHECK(!kvq_fisher_default_path("dir/m.gguf", buf, sizeof(buf)) &&
	      !strcmp(buf, "dir/m.fim.gguf"));
	CHECK(!kvq_fisher_default_path("m.bin", buf, sizeof(buf)) &&
	      !strcmp(buf, "m.bin.fim.gguf"));
	CHECK(!kvq_fisher_default_path(".gguf", buf, sizeof(buf)) &&
	      !strcmp(buf, ".fim.gguf"));
	CHECK(kvq_fisher_default_path("dir/m.gguf", buf, 14) ==
	      -ENAMETOOLONG && buf[0] == '\0');
	CHECK(!kvq_fisher_default_path("dir/m.gguf", buf, 15));
	tap_ok(ok, "kvq_fisher_default_path_strips_gguf");
}

static void test_full(const struct file *m)
{
	const struct kvq_fisher_meta *mi;
	struct kvq_fisher *f = SENTINEL;
	struct file s;
	char err[512] = "";
	bool ok = true;
	int rc;

	sidecar_file(&s, m, false);
	file_write(&s, default_path);
	file_free(&s);
	rc = kvq_fisher_load_gguf(model, NULL, &f, err, sizeof(err));
	tap_ok(rc == 0 && f != SENTINEL,
	       "kvq_fisher_load_gguf_default_path_beside_model");
	if (rc) {
		tap_diag("%s", err);
		return;
	}
	tap_ok(check_scores(f, m, false), "kvq_fisher_load_gguf_full_layout");

	mi = kvq_fisher_meta(f);
	CHECK(!kvq_fisher_is_fallback(f));
	CHECK(!strcmp(kvq_fisher_source(f), "adam_exp_avg_sq"));
	CHECK(mi->source == KVQ_FISHER_SRC_ADAM);
	CHECK(mi->path && !strcmp(mi->path, default_path));
	CHECK(mi->token_count == 123456789012ull);
	CHECK(mi->step_count == 1072);
	CHECK(!strcmp(mi->dataset, "six novels"));
	CHECK(!strcmp(mi->model_name, "tiny"));
	tap_ok(ok, "kvq_fisher_meta_from_sidecar");

	ok = true;
	CHECK(kvq_fisher_ranked(f, 0) == NULL);
	CHECK(kvq_fisher_ranked(f, N_MODEL + 1) == NULL);
	CHECK(kvq_fisher_find(f, "nope.weight") == NULL);
	/* Ties: same density, smaller first; then same size, file order. */
	CHECK(kvq_fisher_find(f, "blk.1.attn_q.weight")->rank + 1 ==
	      kvq_fisher_find(f, "blk.2.attn_q.weight")->rank);
	CHECK(kvq_fisher_find(f, "blk.2.attn_q.weight")->rank + 1 ==
	      kvq_fisher_find(f, "token_embd.weight")->rank);
	/* 1 + 127 * 2^-30 survives: the sum is in double. */
	CHECK(kvq_fisher_find(f, "blk.0.ffn_up.weight")->trace ==
	      1.0 + 127.0 * ldexp(1.0, -30));
	tap_ok(ok, "kvq_fisher_ranked_ties_and_lookups");
	kvq_fisher_destroy(f);
}

static void test_rows(const struct file *m)
{
	struct kvq_fisher *f = SENTINEL;
	struct file s;
	char err[512] = "";
	int rc;

	sidecar_file(&s, m, true);
	file_write(&s, bad_path);
	file_free(&s);
	rc = kvq_fisher_load_gguf(model, bad_path, &f, err, sizeof(err));
	if (rc)
		tap_diag("%s", err);
	tap_ok(rc == 0 && check_scores(f, m, true),
	       "kvq_fisher_load_gguf_rows_layout");
	if (!rc)
		kvq_fisher_destroy(f);

	/* Mixed: rows for one tensor, full for the rest. */
	sidecar_file(&s, m, false);
	{
		struct tensor *t = find(&s, "blk.2.ffn_gate_exps.weight");
		float *v = xcalloc(6 * sizeof(float));
		uint64_t j;

		for (j = 0; j < 48; j++)
			v[j / 8] += ((float *)t->data)[j];
		free(t->data);
		t->data = v;
		t->nd = 2;
		t->ne[0] = 2;
		t->ne[1] = 3;
		t->ne[2] = 1;
		t->nbytes = 6 * sizeof(float);
	}
	file_write(&s, bad_path);
	file_free(&s);
	f = SENTINEL;
	rc = kvq_fisher_load_gguf(model, bad_path, &f, err, sizeof(err));
	if (rc)
		tap_diag("%s", err);
	tap_ok(rc == 0 && kvq_fisher_find(f, "blk.2.ffn_gate_exps.weight")->rows &&
	       !kvq_fisher_find(f, "blk.2.attn_q.weight")->rows &&
	       kvq_fisher_find(f, "blk.2.ffn_gate_exps.weight")->trace ==
	       want_trace(m, 12, true),
	       "kvq_fisher_load_gguf_mixed_layouts");
	if (!rc)
		kvq_fisher_destroy(f);
}

static void test_sources(const struct file *m)
{
	static const char *const names[] = {
		"calibration", "json_scores",
	};
	struct kvq_fisher *f;
	struct file s;
	char err[512];
	bool ok = true;
	size_t i;

	for (i = 0; i < 2; i++) {
		sidecar_file(&s, m, false);
		kv_str(&s, "fim.source", names[i]);
		kv_del(&s, "fim.dataset");
		kv_del(&s, "fim.step_count");
		kv_del(&s, "fim.version");
		file_write(&s, bad_path);
		file_free(&s);
		f = SENTINEL;
		if (kvq_fisher_load_gguf(model, bad_path, &f, err,
					 sizeof(err))) {
			tap_diag("%s", err);
			ok = false;
			continue;
		}
		CHECK(!strcmp(kvq_fisher_source(f), names[i]));
		CHECK(!strcmp(kvq_fisher_meta(f)->dataset, ""));
		CHECK(kvq_fisher_meta(f)->step_count == 0);
		kvq_fisher_destroy(f);
	}
	CHECK(!strcmp(kvq_fisher_source_name(KVQ_FISHER_SRC_FALLBACK),
		      "fallback"));
	CHECK(!strcmp(kvq_fisher_source_name(0), "unknown"));
	tap_ok(ok, "kvq_fisher_source_each_kind");
}

static void test_fallback(void)
{
	struct kvq_fisher *f = SENTINEL;
	const struct kvq_fisher_entry *e;
	char err[512] = "";
	bool ok = true;
	uint32_t r;
	int rc;

	unlink(default_path);
	rc = kvq_fisher_load_gguf(model, NULL, &f, err, sizeof(err));
	CHECK(rc == 0 && f != SENTINEL);
	if (rc) {
		tap_diag("%s", err);
		tap_ok(false, "kvq_fisher_load_gguf_no_sidecar_falls_back");
		return;
	}
	CHECK(kvq_fisher_is_fallback(f));
	CHECK(!strcmp(kvq_fisher_source(f), "fallback"));
	CHECK(kvq_fisher_meta(f)->path == NULL);
	tap_ok(ok, "kvq_fisher_load_gguf_no_sidecar_falls_back");

	ok = true;
	for (r = 1; r <= N_MODEL; r++) {
		e = kvq_fisher_ranked(f, r);
		CHECK(e && e->index == (uint32_t)fallback_order[r - 1]);
		CHECK(e && e->trace == 0.0 && e->density == 0.0);
		CHECK(e && e->score > 0.0 && e->score <= 1.0);
		if (r > 1)
			CHECK(e && e->score <
				   kvq_fisher_ranked(f, r - 1)->score);
		if (!ok) {
			tap_diag("rank %u: %s (want %s)", r, e ? e->name : "-",
				 kvq_fisher_entries(f, &(size_t){ 0 })
					 [fallback_order[r - 1]].name);
			break;
		}
	}
	tap_ok(ok, "kvq_fisher_fallback_order");
	kvq_fisher_destroy(f);

	f = SENTINEL;
	rc = kvq_fisher_load_gguf(model, default_path, &f, err, sizeof(err));
	tap_ok(rc == -ENOENT && f == SENTINEL &&
	       !strncmp(err, default_path, strlen(default_path)),
	       "kvq_fisher_load_gguf_explicit_path_missing");
}

/* Writes @s to bad_path, loads it and expects a refusal. */
static void expect_refused(struct file *s, const char *name, int want_rc,
			   const char *want1, const char *want2)
{
	struct kvq_fisher *f = SENTINEL;
	char err[512] = "";
	size_t plen = strlen(bad_path);
	bool ok;
	int rc;

	file_write(s, bad_path);
	file_free(s);
	rc = kvq_fisher_load_gguf(model, bad_path, &f, err, sizeof(err));
	ok = rc == want_rc && f == SENTINEL && !strncmp(err, bad_path, plen) &&
	     err[plen] == ':' && !strchr(err, '\n') &&
	     (!want1 || strstr(err, want1)) && (!want2 || strstr(err, want2));
	if (!ok || getenv("TEST_FISHER_VERBOSE"))
		tap_diag("rc %d (want %d): %s", rc, want_rc, err);
	if (!rc && f != SENTINEL)
		kvq_fisher_destroy(f);
	tap_ok(ok, "%s", name);
}

static void test_refusals(const struct file *m)
{
	struct file s, other;
	struct tensor *t;

	sidecar_file(&s, m, false);
	drop(&s, "blk.1.ffn_up.weight");
	expect_refused(&s, "kvq_fisher_load_gguf_missing_tensor", -EINVAL,
		       "tensor blk.1.ffn_up.weight", "missing");

	sidecar_file(&s, m, false);
	add_tensor(&s, "blk.9.attn_q.weight", KVQ_TYPE_F32, 2, 8, 8, 0);
	expect_refused(&s, "kvq_fisher_load_gguf_extra_tensor", -EINVAL,
		       "tensor blk.9.attn_q.weight", "not in the model");

	sidecar_file(&s, m, false);
	t = find(&s, "blk.3.ffn_up.weight");
	t->ne[0] = 4;
	t->ne[1] = 32;
	expect_refused(&s, "kvq_fisher_load_gguf_shape_mismatch", -EINVAL,
		       "tensor blk.3.ffn_up.weight: shape [4, 32] does not match the model's [32, 4] (full) or [4] (rows)",
		       NULL);

	/* Rows of a 2-D tensor the wrong way round: ne[0] kept, not ne[1]. */
	sidecar_file(&s, m, false);
	t = find(&s, "blk.0.ffn_up.weight");
	t->nd = 1;
	t->ne[1] = 1;
	t->nbytes = 32 * sizeof(float);
	expect_refused(&s, "kvq_fisher_load_gguf_rows_of_wrong_dimension",
		       -EINVAL, "tensor blk.0.ffn_up.weight: shape [32]",
		       "[4] (rows)");

	sidecar_file(&s, m, false);
	t = find(&s, "output_norm.weight");
	t->ne[0] = 4;
	t->nbytes = 4 * sizeof(float);
	expect_refused(&s, "kvq_fisher_load_gguf_vector_has_no_rows", -EINVAL,
		       "tensor output_norm.weight: shape [4] does not match the model's [8] (full)",
		       NULL);

	sidecar_file(&s, m, false);
	t = find(&s, "blk.2.attn_q.weight");
	t->type = KVQ_TYPE_F16;
	t->nbytes = 64 * 2;
	expect_refused(&s, "kvq_fisher_load_gguf_wrong_type", -EINVAL,
		       "tensor blk.2.attn_q.weight is F16", "F32");

	sidecar_file(&s, m, false);
	((float *)find(&s, "blk.1.post_norm.weight")->data)[5] = -0.25f;
	expect_refused(&s, "kvq_fisher_load_gguf_negative_value", -EINVAL,
		       "tensor blk.1.post_norm.weight: element 5 is -0.25",
		       "non-negative");

	sidecar_file(&s, m, false);
	((float *)find(&s, "token_embd.weight")->data)[100] = NAN;
	expect_refused(&s, "kvq_fisher_load_gguf_nan_value", -EINVAL,
		       "tensor token_embd.weight: element 100 is nan",
		       "finite");

	sidecar_file(&s, m, true);
	((float *)find(&s, "blk.2.ffn_gate_exps.weight")->data)[4] = INFINITY;
	expect_refused(&s, "kvq_fisher_load_gguf_infinite_row_sum", -EINVAL,
		       "tensor blk.2.ffn_gate_exps.weight: row 4 is inf",
		       "finite");

	sidecar_file(&s, m, false);
	kv_uint(&s, "fim.model.tensor_count", KVQ_GGUF_U32, N_MODEL + 1);
	expect_refused(&s, "kvq_fisher_load_gguf_tensor_count_mismatch",
		       -EINVAL, "fim.model.tensor_count is 14",
		       "has 13 tensors");

	/* Another model: other shapes, another name. */
	model_file(&other);
	other.t[0].ne[1] = 32;
	sidecar_file(&s, &other, false);
	kv_str(&s, "fim.model.name", "other");
	file_free(&other);
	expect_refused(&s, "kvq_fisher_load_gguf_sidecar_of_another_model",
		       -EINVAL,
		       "tensor token_embd.weight: shape [8, 32] does not match the model's [8, 16] (full) or [16] (rows)",
		       "written for \"other\"");

	sidecar_file(&s, m, false);
	kv_del(&s, "general.type");
	expect_refused(&s, "kvq_fisher_load_gguf_not_a_sidecar", -EINVAL,
		       "not a Fisher sidecar", NULL);

	sidecar_file(&s, m, false);
	kv_str(&s, "fim.source", "fallback");
	expect_refused(&s, "kvq_fisher_load_gguf_unknown_source", -EINVAL,
		       "fim.source \"fallback\"", NULL);

	sidecar_file(&s, m, false);
	kv_uint(&s, "fim.version", KVQ_GGUF_U32, 2);
	expect_refused(&s, "kvq_fisher_load_gguf_newer_version", -ENOTSUP,
		       "fim.version 2", NULL);

	sidecar_file(&s, m, false);
	kv_str(&s, "fim.token_count", "many");
	expect_refused(&s, "kvq_fisher_load_gguf_bad_metadata_type", -EINVAL,
		       "fim.token_count", NULL);
}

static void test_json_path(void)
{
	struct kvq_fisher *f = SENTINEL;
	char err[512] = "";
	int rc;

	rc = kvq_fisher_load_gguf(model, "scores.json", &f, err, sizeof(err));
	tap_ok(rc == -ENOTSUP && f == SENTINEL &&
	       !strncmp(err, "scores.json: ", 13) &&
	       strstr(err, "import-json"),
	       "kvq_fisher_load_gguf_json_map_points_to_import");
}

int main(void)
{
	struct file m;
	char err[512];

	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 99;
	}
	snprintf(model_path, sizeof(model_path), "%s/tiny.gguf", tmpdir);
	snprintf(default_path, sizeof(default_path), "%s/tiny.fim.gguf",
		 tmpdir);
	snprintf(bad_path, sizeof(bad_path), "%s/x.fim.gguf", tmpdir);

	model_file(&m);
	file_write(&m, model_path);
	if (kvq_gguf_open(model_path, &model, err, sizeof(err))) {
		tap_diag("%s", err);
		tap_ok(false, "model_file_opens");
		goto out;
	}

	test_default_path();
	test_full(&m);
	test_rows(&m);
	test_sources(&m);
	test_refusals(&m);
	test_json_path();
	test_fallback();

	kvq_gguf_close(model);
out:
	file_free(&m);
	unlink(model_path);
	unlink(default_path);
	unlink(bad_path);
	rmdir(tmpdir);
	return tap_done();
}
