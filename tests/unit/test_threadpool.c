/*
 * test_threadpool.c - unit tests for engine/threadpool.c.
 *
 * Why this file exists: a lost wake-up or a part run twice would corrupt
 * every matrix product silently, so these tests run many thousands of
 * dispatches, both back to back (workers spinning) and with pauses between
 * them (workers asleep), and check that each part ran exactly once.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tap.h"
#include "engine/threadpool.h"

#define MAX_PARTS 64

struct hits {
	atomic_int count[MAX_PARTS];
	atomic_int bad_n;
	int expect_n;
	int pause_part;		/* this part sleeps a little; -1: none */
};

static void count_part(void *ctx, int i, int n)
{
	struct hits *h = ctx;

	if (n != h->expect_n || i < 0 || i >= n || i >= MAX_PARTS) {
		atomic_fetch_add(&h->bad_n, 1);
		return;
	}
	if (i == h->pause_part)
		usleep(100);
	atomic_fetch_add(&h->count[i], 1);
}

/* Runs @runs dispatches; between runs sleeps @gap_us (0: none). */
static bool each_part_once(struct kvq_pool *p, int runs, int gap_us,
			   int pause_part)
{
	struct hits h = { .expect_n = kvq_pool_size(p),
			  .pause_part = pause_part };
	bool ok = true;
	int r, i;

	for (r = 0; r < runs; r++) {
		for (i = 0; i < MAX_PARTS; i++)
			atomic_store(&h.count[i], 0);
		kvq_pool_run(p, count_part, &h);
		for (i = 0; i < h.expect_n; i++)
			if (atomic_load(&h.count[i]) != 1)
				ok = false;
		if (gap_us)
			usleep((useconds_t)gap_us);
	}
	return ok && !atomic_load(&h.bad_n);
}

struct sum_job {
	const int64_t *v;
	int64_t n;
	int64_t part_sum[MAX_PARTS];	/* plain: the pool orders them */
};

static void sum_part(void *ctx, int i, int n)
{
	struct sum_job *j = ctx;
	int64_t lo = j->n * i / n, hi = j->n * (i + 1) / n, k, s = 0;

	for (k = lo; k < hi; k++)
		s += j->v[k];
	j->part_sum[i] = s;
}

static bool sums_right(struct kvq_pool *p, int runs)
{
	struct sum_job j;
	int64_t *v, k, total;
	bool ok = true;
	int r, i;

	j.n = 100003;
	v = malloc(sizeof(*v) * (size_t)j.n);
	for (k = 0; k < j.n; k++)
		v[k] = k + 1;
	j.v = v;
	for (r = 0; r < runs; r++) {
		memset(j.part_sum, 0xff, sizeof(j.part_sum));
		kvq_pool_run(p, sum_part, &j);
		total = 0;
		for (i = 0; i < kvq_pool_size(p); i++)
			total += j.part_sum[i];
		if (total != j.n * (j.n + 1) / 2)
			ok = false;
	}
	free(v);
	return ok;
}

static void test_sizes(void)
{
	static const int sizes[] = { 1, 2, 7 };
	struct kvq_pool *p;
	unsigned int s;
	int n;

	for (s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
		n = sizes[s];
		p = kvq_pool_create(n);
		tap_ok(p && kvq_pool_size(p) == n, "pool_create_%d_threads", n);
		if (!p)
			continue;
		tap_ok(each_part_once(p, 20000, 0, -1),
		       "pool_run_%d_each_part_once_back_to_back", n);
		tap_ok(each_part_once(p, 300, 200, -1),
		       "pool_run_%d_each_part_once_after_sleeping", n);
		tap_ok(each_part_once(p, 300, 0, n - 1),
		       "pool_run_%d_each_part_once_slow_worker", n);
		tap_ok(each_part_once(p, 300, 0, 0),
		       "pool_run_%d_each_part_once_slow_caller", n);
		tap_ok(sums_right(p, 200), "pool_run_%d_sums", n);
		kvq_pool_destroy(p);
	}
}

static void test_default_size(void)
{
	struct kvq_pool *p = kvq_pool_create(0);
	long online = sysconf(_SC_NPROCESSORS_ONLN);

	tap_ok(p && kvq_pool_size(p) >= 1 && kvq_pool_size(p) <= online,
	       "pool_create_default_size_cpu_count (%d)", kvq_pool_size(p));
	tap_ok(each_part_once(p, 1000, 0, -1), "pool_run_default_each_once");
	kvq_pool_destroy(p);
}

static void test_null_pool(void)
{
	struct hits h = { .expect_n = 1, .pause_part = -1 };

	kvq_pool_run(NULL, count_part, &h);
	tap_ok(atomic_load(&h.count[0]) == 1 && !atomic_load(&h.bad_n) &&
	       kvq_pool_size(NULL) == 1, "pool_run_null_runs_on_caller");
	kvq_pool_destroy(NULL);
}

static void test_create_destroy(void)
{
	struct kvq_pool *p;
	bool ok = true;
	int i;

	for (i = 0; i < 200; i++) {
		p = kvq_pool_create(1 + i % 5);
		if (!p) {
			ok = false;
			break;
		}
		if (i % 2 && !each_part_once(p, 3, 0, -1))
			ok = false;
		if (i % 3 == 0)
			usleep(50);	/* let the workers fall asleep */
		kvq_pool_destroy(p);
	}
	tap_ok(ok, "pool_create_destroy_repeatedly");
}

struct racer {
	struct kvq_pool *pool;
	bool ok;
};

static void *race_main(void *arg)
{
	struct racer *r = arg;

	r->ok = each_part_once(r->pool, 2000, 0, -1);
	return NULL;
}

/* Two threads sharing one pool take turns. */
static void test_two_callers(void)
{
	struct racer r[2];
	pthread_t t[2];
	struct kvq_pool *p = kvq_pool_create(3);
	int i;

	for (i = 0; i < 2; i++) {
		r[i].pool = p;
		r[i].ok = false;
		pthread_create(&t[i], NULL, race_main, &r[i]);
	}
	for (i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	tap_ok(r[0].ok && r[1].ok, "pool_run_two_callers_take_turns");
	kvq_pool_destroy(p);
}

static void nop(void *ctx, int i, int n)
{
}

struct who {
	pthread_t caller;
	atomic_int on_caller;	/* parts other than 0 the caller ran */
};

static void who_part(void *ctx, int i, int n)
{
	struct who *w = ctx;

	if (i && pthread_equal(pthread_self(), w->caller))
		atomic_fetch_add(&w->on_caller, 1);
}

/*
 * Parts are claimed, not assigned: with the workers asleep (a pause longer
 * than their spin), a worker needs a wake-up before it can take its part,
 * and the caller, done with part 0, takes the next one itself instead of
 * waiting -- as it does for a worker the system has descheduled.  With
 * parts bound to threads the caller never runs part 1.
 */
static void test_caller_takes_late_parts(void)
{
	struct kvq_pool *p = kvq_pool_create(2);
	struct who w = { .caller = pthread_self() };
	int i;

	for (i = 0; i < 20; i++) {
		usleep(2000);
		kvq_pool_run(p, who_part, &w);
	}
	tap_ok(atomic_load(&w.on_caller) > 0,
	       "pool_run_caller_takes_a_sleeping_workers_part (%d of 20 runs)",
	       atomic_load(&w.on_caller));
	kvq_pool_destroy(p);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Not a pass/fail figure: reported so that regressions stand out. */
static void report_latency(void)
{
	struct kvq_pool *p = kvq_pool_create(0);
	double t0;
	int i, runs = 20000;

	for (i = 0; i < 1000; i++)
		kvq_pool_run(p, nop, NULL);
	t0 = now_s();
	for (i = 0; i < runs; i++)
		kvq_pool_run(p, nop, NULL);
	tap_diag("empty run, %d threads: %.2f us", kvq_pool_size(p),
		 (now_s() - t0) / runs * 1e6);
	kvq_pool_destroy(p);
}

int main(void)
{
	test_sizes();
	test_default_size();
	test_null_pool();
	test_create_destroy();
	test_two_callers();
	test_caller_takes_late_parts();
	report_latency();
	return tap_done();
}
