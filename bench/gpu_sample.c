/*
 * gpu_sample.c - the GPU sampler (kernels/sample.cu, one block a row)
 * against the host sampler (engine/sampler.c) on the same rows, settings
 * and draws (JSON).
 *
 * For vocabularies of 32000 and 152064 tokens, logits drawn from a normal
 * distribution of standard deviation 1 (flat, as a random-weight model's)
 * and 4 (peaky), 1 and 16 rows, and the settings greedy, top-k 40
 * (kvq_sampler_params_default()), the whole vocabulary at T 0.8 (the HTTP
 * API's defaults) and top-p 0.9 at T 1: the device's time per call (the
 * kernel alone, logits already on the device; median of 50) and the
 * host's time for the same rows (kvq_sampler_sample_u(), median of 9),
 * and how many ids differ (0 expected: they may differ only within about
 * 1e-6 of a boundary).
 *
 * Usage: gpu_sample [--reps N]
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/log.h"
#include "engine/sampler.h"
#include "kernels/gpu.h"
#include "kernels/sample.h"

double kvq_bench_sample(const float *l, uint32_t rows, uint32_t n_vocab,
			const struct kvq_gpu_sample_params *p, const float *u,
			int reps, int32_t *ids);

#define MAX_ROWS 16

static uint64_t rs = 0x853c49e6748fea9bull;

static double uni(void)
{
	rs ^= rs << 13;
	rs ^= rs >> 7;
	rs ^= rs << 17;
	return (double)(rs >> 11) * 0x1.0p-53;
}

static double gauss(void)
{
	double a = uni(), b = uni();

	return sqrt(-2.0 * log(a > 0 ? a : 1e-300)) * cos(6.283185307179586 * b);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

struct setting {
	const char *name;
	struct kvq_sampler_params p;
};

int main(int argc, char **argv)
{
	static const uint32_t vocabs[2] = { 32000, 152064 };
	static const float sigmas[2] = { 1.0f, 4.0f };
	static const uint32_t row_counts[2] = { 1, MAX_ROWS };
	static const struct setting st[4] = {
		{ "greedy", { 0.0f, 0, 1.0f, 0.0f, 1 } },
		{ "top_k_40", { 0.8f, 40, 0.95f, 0.05f, 1 } },
		{ "whole_vocab_t0.8", { 0.8f, 0, 1.0f, 0.0f, 1 } },
		{ "top_p_0.9", { 1.0f, 0, 0.9f, 0.0f, 1 } },
	};
	struct kvq_gpu_info gi;
	char why[256];
	int reps = 50, first = 1, a, vi, si, ri, k, r;

	for (a = 1; a < argc; a++) {
		if (!strcmp(argv[a], "--reps") && a + 1 < argc) {
			reps = atoi(argv[++a]);
		} else {
			fprintf(stderr, "usage: gpu_sample [--reps N]\n");
			return 2;
		}
	}
	if (reps < 1)
		reps = 1;
	if (kvq_gpu_probe(&gi, why, sizeof(why)) <= 0) {
		fprintf(stderr, "gpu_sample: %s\n", why);
		return 77;
	}
	kvq_log_set_level(KVQ_LOG_WARNING);
	printf("{\"device\": \"%s\", \"results\": [", gi.name);
	for (vi = 0; vi < 2; vi++) {
		uint32_t V = vocabs[vi];
		float *l = malloc((size_t)MAX_ROWS * V * sizeof(float));

		if (!l)
			return 1;
		for (int sg = 0; sg < 2; sg++) {
			for (size_t i = 0; i < (size_t)MAX_ROWS * V; i++)
				l[i] = (float)(gauss() * sigmas[sg]);
			for (si = 0; si < 4; si++) {
				for (ri = 0; ri < 2; ri++) {
					uint32_t rows = row_counts[ri];
					struct kvq_gpu_sample_params gp[MAX_ROWS];
					struct kvq_sampler smp;
					float u[MAX_ROWS];
					int32_t ids[MAX_ROWS];
					double dev, ht[9];
					int diff = 0;

					kvq_sampler_init(&smp, &st[si].p, (int32_t)V);
					for (r = 0; r < (int)rows; r++) {
						gp[r].temperature = st[si].p.temperature;
						gp[r].top_k = st[si].p.top_k;
						gp[r].top_p = st[si].p.top_p;
						gp[r].min_p = st[si].p.min_p;
						u[r] = (float)uni();
					}
					dev = kvq_bench_sample(l, rows, V, gp, u, reps,
							       ids);
					for (k = 0; k < 9; k++) {
						double t0 = now();

						for (r = 0; r < (int)rows; r++) {
							int32_t h = kvq_sampler_sample_u(&smp,
								l + (size_t)r * V, u[r]);

							if (!k && h != ids[r])
								diff++;
						}
						ht[k] = (now() - t0) * 1e6;
					}
					qsort(ht, 9, sizeof(double), cmp_d);
					kvq_sampler_fini(&smp);
					printf("%s\n  {\"vocab\": %u, \"sigma\": %g, \"setting\": \"%s\", \"rows\": %u, "
					       "\"device_us\": %.1f, \"host_us\": %.1f, \"ids_differ\": %d}",
					       first ? "" : ",", V, sigmas[sg],
					       st[si].name, rows, dev, ht[4], diff);
					first = 0;
					fflush(stdout);
				}
			}
		}
		free(l);
	}
	printf("\n]}\n");
	return 0;
}
