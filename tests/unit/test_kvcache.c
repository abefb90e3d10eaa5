/*
 * test_kvcache.c - page pool, block tables, copy-on-write sharing and
 * attention over pages against a flat reference.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"
#include "tap.h"

static float frand(unsigned *s)
{
	*s = *s * 1103515245u + 12345u;
	return ((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* softmax(q.K^T * scale) V over flat arrays, in double. */
static void ref_attend(const float *K, const float *V, int n, int hd,
		       int stride, const float *q, float scale, float *out)
{
	double *w = malloc(n * sizeof(double)), mx = -1e300, sum = 0;
	int i, d;

	for (i = 0; i < n; i++) {
		double s = 0;

		for (d = 0; d < hd; d++)
			s += (double)q[d] * K[i * stride + d];
		w[i] = s * scale;
		if (w[i] > mx)
			mx = w[i];
	}
	for (i = 0; i < n; i++)
		sum += (w[i] = exp(w[i] - mx));
	for (d = 0; d < hd; d++) {
		double acc = 0;

		for (i = 0; i < n; i++)
			acc += w[i] * V[i * stride + d];
		out[d] = (float)(acc / sum);
	}
	free(w);
}

static void fill_seq(struct kvq_kvcache *c, struct kvq_kv_seq *s, int n,
		     float *K, float *V, unsigned *seed)
{
	size_t tok = (size_t)c->o.n_kv_heads * c->o.head_dim;
	int t, l;
	size_t i;

	for (t = 0; t < n; t++) {
		int base = s->n_tokens;

		if (kvq_kv_seq_reserve(c, s, 1))
			return;
		for (l = 0; l < (int)c->o.n_layers; l++) {
			for (i = 0; i < tok; i++) {
				float k = frand(seed), v = frand(seed);

				kvq_kv_k(c, s, l, base)[i] = k;
				kvq_kv_v(c, s, l, base)[i] = v;
				if (l == 1) {
					K[(size_t)base * tok + i] = k;
					V[(size_t)base * tok + i] = v;
				}
			}
		}
		kvq_kv_seq_commit(s, 1);
	}
}

static void attend_matches_reference(void)
{
	static const int lens[] = { 1, 15, 16, 17, 32, 33, 100 };
	struct kvq_kv_opts o = { .n_layers = 2, .n_kv_heads = 2,
				 .head_dim = 64, .page_tokens = 16,
				 .n_pages = 64 };
	struct kvq_kvcache *c;
	unsigned seed = 7;
	size_t li;

	if (kvq_kv_create(&o, &c)) {
		tap_ok(0, "kvq_kv_create");
		return;
	}
	for (li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
		int n = lens[li], h, d;
		float *K = calloc((size_t)n * 128, sizeof(float));
		float *V = calloc((size_t)n * 128, sizeof(float));
		float q[64], out[64], ref[64];
		struct kvq_kv_seq s;
		double maxd = 0;

		kvq_kv_seq_init(&s);
		fill_seq(c, &s, n, K, V, &seed);
		for (h = 0; h < 2; h++) {
			for (d = 0; d < 64; d++)
				q[d] = frand(&seed) * 2;
			kvq_kv_attend(c, &s, 1, h, q, 0.125f, n, out);
			ref_attend(K + h * 64, V + h * 64, n, 64, 128, q,
				   0.125f, ref);
			for (d = 0; d < 64; d++)
				if (fabs(out[d] - ref[d]) > maxd)
					maxd = fabs(out[d] - ref[d]);
		}
		tap_ok(maxd < 1e-5, "kvq_kv_attend_matches_reference_len_%d (max diff %.2g)",
		       n, maxd);
		kvq_kv_seq_release(c, &s);
		free(K);
		free(V);
	}
	tap_ok(c->n_free == o.n_pages, "kvq_kv_seq_release_returns_every_page");
	kvq_kv_destroy(c);
}

static void pool_accounting(void)
{
	struct kvq_kv_opts o = { .n_layers = 1, .n_kv_heads = 1,
				 .head_dim = 8, .page_tokens = 4,
				 .n_pages = 4 };
	struct kvq_kvcache *c;
	struct kvq_kv_seq a, b;

	if (kvq_kv_create(&o, &c)) {
		tap_ok(0, "kvq_kv_create");
		return;
	}
	kvq_kv_seq_init(&a);
	kvq_kv_seq_init(&b);
	tap_ok(kvq_kv_seq_reserve(c, &a, 10) == 0 && a.n_pages == 3,
	       "kvq_kv_seq_reserve_allocates_ceil_pages");
	tap_ok(kvq_kv_seq_reserve(c, &b, 8) == -ENOSPC && b.n_pages == 0 &&
	       c->n_free == 1, "kvq_kv_seq_reserve_full_pool_fails_unchanged");
	kvq_kv_seq_commit(&a, 10);
	tap_ok(kvq_kv_bytes_used(c) == 3ull * 4 * 2 * 8 * 4,
	       "kvq_kv_bytes_used_counts_pages");
	kvq_kv_seq_truncate(c, &a, 5);
	tap_ok(a.n_pages == 2 && a.n_tokens == 5 && c->n_free == 2,
	       "kvq_kv_seq_truncate_releases_tail_pages");
	/* Share the first 5 tokens: 2 pages, the second one partial. */
	tap_ok(kvq_kv_seq_fork(c, &b, &a, 5) == 0 && c->refcnt[a.pages[0]] == 2 &&
	       c->refcnt[a.pages[1]] == 2 && c->n_free == 2,
	       "kvq_kv_seq_fork_shares_pages");
	kvq_kv_k(c, &a, 0, 4)[0] = 42.0f;
	/* b writes token 5 into the shared partial page: it must copy it. */
	tap_ok(kvq_kv_seq_reserve(c, &b, 1) == 0 && b.pages[1] != a.pages[1] &&
	       c->refcnt[a.pages[1]] == 1 && b.pages[0] == a.pages[0],
	       "kvq_kv_seq_reserve_copies_shared_page_on_write");
	tap_ok(kvq_kv_k(c, &b, 0, 4)[0] == 42.0f,
	       "kvq_kv_seq_reserve_copy_keeps_contents");
	kvq_kv_seq_commit(&b, 1);
	kvq_kv_seq_release(c, &a);
	kvq_kv_seq_release(c, &b);
	tap_ok(c->n_free == 4, "kvq_kv_seq_release_shared_pages_freed_once");
	kvq_kv_destroy(c);
}

int main(void)
{
	attend_matches_reference();
	pool_accounting();
	return tap_done();
}
