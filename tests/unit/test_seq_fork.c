/*
 * test_seq_fork.c - kvq_seq_fork(): a sequence that shares another's
 * prompt prefix gives the logits of one that computed it alone.
 *
 * On stories260K (16-token pages, 4 f16 sink tokens, the default q8/q4
 * cache and an f32 one): sequence A takes a 40-token prompt; B forks A's
 * first n tokens (n = 13, inside a page; 32, on a page boundary; 3, inside
 * the sink tokens), then takes a different rest of the prompt and one
 * decode step; C computes B's tokens alone, D A's.  B's logits must equal
 * C's within float rounding (the prompt is cut differently, so products
 * sum in another order), A's next step must equal D's (the shared partial
 * page was copied when B wrote its own tokens into it), and right after
 * the fork the cache holds no more bytes than A alone.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/log.h"
#include "engine/model.h"
#include "tap.h"

#define N_PROMPT 40

static int step(struct kvq_ctx *c, int seq, const int32_t *tok, int n,
		float *logits)
{
	struct kvq_batch b = { 0 };

	b.n = 1;
	b.seq = &seq;
	b.n_tokens = &n;
	b.tokens = &tok;
	return kvq_step(c, &b, logits);
}

static float rel_diff(const float *a, const float *b, uint32_t n)
{
	float m = 0.0f, s = 0.0f;
	uint32_t i;

	for (i = 0; i < n; i++) {
		if (fabsf(a[i] - b[i]) > m || isnan(a[i] - b[i]))
			m = isnan(a[i] - b[i]) ? INFINITY : fabsf(a[i] - b[i]);
		if (fabsf(b[i]) > s)
			s = fabsf(b[i]);
	}
	return m / (s > 0.0f ? s : 1.0f);
}

static void fork_case(struct kvq_model *m, uint8_t kt, uint8_t vt,
		      uint32_t n_fork)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	uint32_t V = hp->n_vocab;
	struct kvq_ctx_opts o;
	struct kvq_ctx *c = NULL;
	int32_t tok[N_PROMPT + 1], tokb[N_PROMPT + 1];
	float *la = malloc(V * sizeof(float)), *lb = malloc(V * sizeof(float));
	float *lc = malloc(V * sizeof(float)), *la2 = malloc(V * sizeof(float));
	float *ld = malloc(V * sizeof(float));
	uint64_t one, shared;
	char err[256];
	int a, b, cc, dd, i, ret;
	const char *kn = kvq_kv_type_name(kt), *vn = kvq_kv_type_name(vt);

	kvq_ctx_opts_default(&o);
	o.kv_type_k = kt;
	o.kv_type_v = vt;
	o.n_ctx = 128;
	o.max_seqs = 4;
	if (kvq_ctx_create(m, &o, &c, err, sizeof(err))) {
		tap_ok(0, "%s/%s fork %u: context: %s", kn, vn, n_fork, err);
		goto out;
	}
	for (i = 0; i <= N_PROMPT; i++) {
		tok[i] = (int32_t)((i * 37 + 11) % V);
		tokb[i] = (uint32_t)i < n_fork ? tok[i] :
			  (int32_t)((i * 53 + 7) % V);
	}
	a = kvq_seq_create(c);
	b = kvq_seq_create(c);
	cc = kvq_seq_create(c);
	dd = kvq_seq_create(c);
	/* A: the prompt, then one decode step. */
	ret = step(c, a, tok, N_PROMPT, la);
	one = kvq_ctx_kv_bytes_used(c);
	ret |= kvq_seq_fork(c, b, a, n_fork);
	shared = kvq_ctx_kv_bytes_used(c);
	tap_ok(!ret && kvq_seq_len(c, b) == (int)n_fork && shared == one,
	       "%s/%s fork %u: B holds %u tokens sharing A's pages (%llu bytes, one sequence's %llu)",
	       kn, vn, n_fork, n_fork, (unsigned long long)shared,
	       (unsigned long long)one);
	/* B: its own rest of the prompt and a decode step. */
	ret = step(c, b, tokb + n_fork, N_PROMPT - (int)n_fork, lb);
	ret |= step(c, b, tokb + N_PROMPT, 1, lb);
	/* C: B's tokens alone; D: A's. */
	ret |= step(c, cc, tokb, N_PROMPT, lc);
	ret |= step(c, cc, tokb + N_PROMPT, 1, lc);
	ret |= step(c, dd, tok, N_PROMPT, ld);
	ret |= step(c, dd, tok + N_PROMPT, 1, ld);
	tap_ok(!ret && rel_diff(lb, lc, V) <= 1e-5f,
	       "%s/%s fork %u: the forked sequence's logits equal a full computation's (%.3g)",
	       kn, vn, n_fork, rel_diff(lb, lc, V));
	/* A after B wrote beyond the fork: its own pages are intact. */
	ret = step(c, a, tok + N_PROMPT, 1, la2);
	tap_ok(!ret && rel_diff(la2, ld, V) <= 1e-5f,
	       "%s/%s fork %u: the source sequence is unchanged (%.3g)", kn, vn,
	       n_fork, rel_diff(la2, ld, V));
	/* Bad forks. */
	tap_ok(kvq_seq_fork(c, b, a, 1) == -EINVAL &&
	       kvq_seq_fork(c, a, a, 1) == -EINVAL &&
	       kvq_seq_fork(c, 99, a, 1) == -EINVAL,
	       "%s/%s fork %u: a non-empty, same or unknown target is refused",
	       kn, vn, n_fork);
	kvq_seq_free(c, b);
	kvq_seq_free(c, cc);
	{
		int d = kvq_seq_create(c);

		tap_ok(kvq_seq_fork(c, d, a, N_PROMPT + 5) == -EINVAL &&
		       kvq_seq_len(c, d) == 0,
		       "%s/%s fork %u: a fork longer than the source is refused",
		       kn, vn, n_fork);
	}
out:
	kvq_ctx_destroy(c);
	free(la);
	free(lb);
	free(lc);
	free(la2);
	free(ld);
}

int main(void)
{
	struct kvq_model_opts mo = { 0 };
	struct kvq_model *m;
	char path[512], err[256];
	const char *p = tap_testdata("stories260K.gguf", path, sizeof(path));
	static const uint32_t forks[] = { 13, 32, 3 };
	size_t i;

	if (!p)
		return tap_skip_all("stories260K.gguf not found (KVQ_TESTDATA)");
	kvq_log_set_level(KVQ_LOG_WARNING);
	mo.n_threads = 2;
	if (kvq_model_load(p, &mo, &m, err, sizeof(err))) {
		tap_ok(0, "load: %s", err);
		return tap_done();
	}
	for (i = 0; i < sizeof(forks) / sizeof(forks[0]); i++) {
		fork_case(m, KVQ_KV_Q8, KVQ_KV_Q4, forks[i]);
		fork_case(m, KVQ_KV_F32, KVQ_KV_F32, forks[i]);
	}
	kvq_model_destroy(m);
	return tap_done();
}
