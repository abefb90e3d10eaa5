/*
 * attn_cpu.c - CPU decode attention over the paged KV cache, per format.
 *
 * Prints one JSON document: for each context length and K/V format pair,
 * the time one decode token's attention takes in one layer (32 query heads,
 * 8 KV heads, head_dim 128 unless overridden), the KV bytes it reads and the
 * resulting GB/s, with f16/f16 in the same run as the baseline.
 *
 *   bench/attn_cpu [--heads 32] [--kv-heads 8] [--head-dim 128]
 *                  [--contexts 1024,4096,16384,32768] [--threads N]
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/kvcache.h"
#include "engine/threadpool.h"

struct job {
	struct kvq_kvcache *c;
	struct kvq_kv_seq *s;
	const float *q;
	float *out;
	uint32_t n_kv, group, hd, n_ctx;
};

static void worker(void *ctx, int part, int n)
{
	struct job *j = ctx;
	uint32_t h;

	for (h = (uint32_t)part; h < j->n_kv; h += (uint32_t)n)
		kvq_kv_attend(j->c, j->s, 0, h, j->q + (size_t)h * j->group * j->hd,
			      j->hd, j->group, 0.088f, j->n_ctx,
			      j->out + (size_t)h * j->group * j->hd, j->hd);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	static const enum kvq_kv_type pairs[][2] = {
		{ KVQ_KV_F16, KVQ_KV_F16 }, { KVQ_KV_Q8, KVQ_KV_Q8 },
		{ KVQ_KV_Q8, KVQ_KV_Q4 }, { KVQ_KV_Q4, KVQ_KV_Q4 },
	};
	uint32_t hq = 32, hk = 8, hd = 128, threads = 0;
	uint32_t ctxs[16] = { 1024, 4096, 16384, 32768 }, n_ctxs = 4;
	struct kvq_pool *pool;
	unsigned seed = 1;
	int i, first = 1;

	for (i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--heads"))
			hq = (uint32_t)atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--kv-heads"))
			hk = (uint32_t)atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--head-dim"))
			hd = (uint32_t)atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--threads"))
			threads = (uint32_t)atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--contexts")) {
			char *p = argv[i + 1];

			n_ctxs = 0;
			while (*p && n_ctxs < 16) {
				ctxs[n_ctxs++] = (uint32_t)strtoul(p, &p, 10);
				if (*p == ',')
					p++;
			}
		} else {
			fprintf(stderr, "attn_cpu: unknown option %s\n", argv[i]);
			return 2;
		}
	}
	pool = kvq_pool_create((int)threads);
	if (!pool || !hk || hq % hk)
		return 1;
	printf("{\"bench\": \"attn_cpu\", \"heads\": %u, \"kv_heads\": %u, \"head_dim\": %u, \"threads\": %d, \"results\": [",
	       hq, hk, hd, kvq_pool_size(pool));
	for (i = 0; i < (int)n_ctxs; i++) {
		uint32_t n = ctxs[i];
		double base_us = 0;
		size_t pi;

		for (pi = 0; pi < sizeof(pairs) / sizeof(pairs[0]); pi++) {
			struct kvq_kv_opts o = { .n_layers = 1, .n_kv_heads = hk,
						 .head_dim = hd, .page_tokens = 16,
						 .n_pages = n / 16 + 2, .n_sink = 4 };
			float *k = malloc(sizeof(float) * hk * hd);
			float *v = malloc(sizeof(float) * hk * hd);
			float *q = malloc(sizeof(float) * hq * hd);
			float *out = malloc(sizeof(float) * hq * hd);
			struct kvq_kvcache *c;
			struct kvq_kv_seq s;
			struct job j;
			double t0, best = 1e9, bytes;
			uint32_t t, x, rep, reps;

			o.type_k[0] = pairs[pi][0];
			o.type_v[0] = pairs[pi][1];
			if (kvq_kv_create(&o, &c))
				return 1;
			kvq_kv_seq_init(&s);
			kvq_kv_seq_reserve(c, &s, n);
			for (t = 0; t < n; t++) {
				for (x = 0; x < hk * hd; x++) {
					seed = seed * 1103515245u + 12345u;
					k[x] = ((seed >> 9) & 0xfff) / 2048.0f - 1;
					v[x] = ((seed >> 3) & 0xfff) / 2048.0f - 1;
				}
				kvq_kv_write(c, &s, 0, t, k, v);
			}
			kvq_kv_seq_commit(&s, n);
			for (x = 0; x < hq * hd; x++)
				q[x] = (x % 7) * 0.1f - 0.3f;
			j = (struct job){ c, &s, q, out, hk, hq / hk, hd, n };
			reps = n >= 16384 ? 5 : 20;
			for (rep = 0; rep < reps; rep++) {
				t0 = now_s();
				kvq_pool_run(pool, worker, &j);
				t0 = now_s() - t0;
				best = t0 < best ? t0 : best;
			}
			bytes = (double)kvq_kv_bytes_per_token(c) * n;
			if (pi == 0)
				base_us = best * 1e6;
			printf("%s\n  {\"context\": %u, \"k\": \"%s\", \"v\": \"%s\", \"us\": %.1f, \"kv_bytes\": %.0f, \"gbps\": %.2f, \"speedup_vs_f16\": %.3f}",
			       first ? "" : ",", n, kvq_kv_type_name(pairs[pi][0]),
			       kvq_kv_type_name(pairs[pi][1]), best * 1e6, bytes,
			       bytes / best / 1e9, base_us / (best * 1e6));
			first = 0;
			fflush(stdout);
			kvq_kv_seq_release(c, &s);
			kvq_kv_destroy(c);
			free(k);
			free(v);
			free(q);
			free(out);
		}
	}
	printf("\n]}\n");
	kvq_pool_destroy(pool);
	return 0;
}
