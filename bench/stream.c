/*
 * stream.c - STREAM-style triad bandwidth, on the kvq thread pool.
 *
 * Why this file exists: CPU decoding streams every weight once per token,
 * so its speed is bounded by memory bandwidth.  This measures what this
 * machine sustains for a[i] = b[i] + s * c[i] over arrays much larger than
 * the caches, split over the same pool the engine uses, so that decode
 * figures can be stated as a fraction of it.
 *
 * Usage: stream [--mib N] [--threads N] [--reps N]
 *   --mib      size of each of the three arrays in MiB (default 256)
 *   --threads  pool size (default: one per CPU, as the engine picks)
 *   --reps     timed repetitions; the best one is reported (default 5)
 * Prints one JSON object on stdout.  Bytes count as STREAM counts them:
 * two arrays read and one written per repetition.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "engine/threadpool.h"

#define TRIAD_SCALAR 3.0
/* Parts start on 64-byte boundaries so no cache line is shared. */
#define PART_ALIGN 8

struct triad {
	double *a;
	double *b;
	double *c;
	size_t n;
	double s;
};

static void part_range(size_t n, int i, int parts, size_t *lo, size_t *hi)
{
	size_t blocks = (n + PART_ALIGN - 1) / PART_ALIGN;

	*lo = blocks * (size_t)i / (size_t)parts * PART_ALIGN;
	*hi = blocks * (size_t)(i + 1) / (size_t)parts * PART_ALIGN;
	if (*lo > n)
		*lo = n;
	if (*hi > n)
		*hi = n;
}

/* First touch in parallel, so each part's pages are near its thread. */
static void fill_part(void *ctx, int i, int parts)
{
	struct triad *t = ctx;
	size_t k, lo, hi;

	part_range(t->n, i, parts, &lo, &hi);
	for (k = lo; k < hi; k++) {
		t->a[k] = 0.0;
		t->b[k] = 1.0;
		t->c[k] = 2.0;
	}
}

static void triad_part(void *ctx, int i, int parts)
{
	struct triad *t = ctx;
	double *restrict a = t->a;
	const double *restrict b = t->b;
	const double *restrict c = t->c;
	const double s = t->s;
	size_t k, lo, hi;

	part_range(t->n, i, parts, &lo, &hi);
	for (k = lo; k < hi; k++)
		a[k] = b[k] + s * c[k];
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double *alloc_array(size_t bytes)
{
	void *p;

	if (posix_memalign(&p, 2u << 20, bytes))
		return NULL;
	madvise(p, bytes, MADV_HUGEPAGE);	/* a hint; failure is fine */
	return p;
}

static int parse_args(int argc, char **argv, long *mib, int *threads,
		      int *reps)
{
	static const struct option opts[] = {
		{ "mib", required_argument, NULL, 'm' },
		{ "threads", required_argument, NULL, 't' },
		{ "reps", required_argument, NULL, 'r' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'm':
			*mib = strtol(optarg, NULL, 10);
			break;
		case 't':
			*threads = (int)strtol(optarg, NULL, 10);
			break;
		case 'r':
			*reps = (int)strtol(optarg, NULL, 10);
			break;
		default:
			return -EINVAL;
		}
	}
	if (*mib < 1 || *mib > 65536 || *reps < 1)
		return -EINVAL;
	return 0;
}

int main(int argc, char **argv)
{
	struct triad t = { .s = TRIAD_SCALAR };
	long mib = 256;
	int threads = 0, reps = 5, r, ret = 1;
	double best = 1e30, t0, dt;
	struct kvq_pool *pool;
	size_t bytes;

	if (parse_args(argc, argv, &mib, &threads, &reps)) {
		fprintf(stderr,
			"usage: stream [--mib N] [--threads N] [--reps N]\n");
		return 2;
	}
	bytes = (size_t)mib << 20;
	t.n = bytes / sizeof(double);

	pool = kvq_pool_create(threads);
	if (!pool) {
		fprintf(stderr, "stream: cannot start the thread pool\n");
		return 1;
	}
	t.a = alloc_array(bytes);
	t.b = alloc_array(bytes);
	t.c = alloc_array(bytes);
	if (!t.a || !t.b || !t.c) {
		fprintf(stderr, "stream: cannot allocate 3 x %ld MiB\n", mib);
		goto out_free;
	}

	kvq_pool_run(pool, fill_part, &t);
	kvq_pool_run(pool, triad_part, &t);	/* warm-up, not timed */
	for (r = 0; r < reps; r++) {
		t0 = now_s();
		kvq_pool_run(pool, triad_part, &t);
		dt = now_s() - t0;
		if (dt < best)
			best = dt;
	}
	if (t.a[0] != 1.0 + TRIAD_SCALAR * 2.0 ||
	    t.a[t.n - 1] != t.a[0] || t.a[t.n / 2] != t.a[0]) {
		fprintf(stderr, "stream: triad result is wrong\n");
		goto out_free;
	}

	printf("{\"bench\": \"stream\", \"kernel\": \"triad\", "
	       "\"threads\": %d, \"array_bytes\": %zu, \"reps\": %d, "
	       "\"best_s\": %.6f, \"triad_gbps\": %.2f}\n",
	       kvq_pool_size(pool), bytes, reps, best,
	       3.0 * (double)bytes / best / 1e9);
	ret = 0;

out_free:
	free(t.a);
	free(t.b);
	free(t.c);
	kvq_pool_destroy(pool);
	return ret;
}
