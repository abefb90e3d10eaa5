/*
 * threadpool.c - persistent worker threads for kvq_pool_run().
 *
 * Why this file exists: the CPU backend hands the pool about ten parallel
 * loops per layer per token, each a few tens of microseconds of work on a
 * small model, so what matters is how fast a run reaches the workers and
 * how fast their completion reaches the caller.  Waking a thread from a
 * condition variable costs tens of microseconds on a virtual machine; so
 * both sides first spin for a few microseconds on a shared counter and
 * only then sleep.
 *
 * Protocol:
 *  - The caller publishes fn and ctx, sets @remaining to the number of
 *    parts and @next to 0, and bumps @gen.  Workers remember the last @gen
 *    they served and treat any other value as "new work" (or "stop" when
 *    @stop is set).
 *  - Parts are claimed, not assigned: every thread, the caller first,
 *    takes the next part from @next until none is left, runs it and
 *    decrements @remaining; the caller then waits for @remaining to reach
 *    0.  A worker the kernel has descheduled (another process wants the
 *    CPU) thus delays nobody: the caller runs its part instead of waiting
 *    a time slice for it.  Which thread runs a part changes nothing in its
 *    result.
 *  - A waiter that stops spinning announces itself (@sleepers for workers,
 *    @caller_sleeping for the caller) under @lock and re-checks its counter
 *    before waiting.  The other side changes the counter, then reads the
 *    announcement, and signals under @lock only when someone sleeps.  All
 *    four accesses are sequentially consistent, so at least one side sees
 *    the other's write and no wake-up is lost.
 *
 * Invariants:
 *  1. At most one run is in flight (@run_lock); @fn, @ctx, @remaining and
 *     @next are written only once every part of the previous run is done.
 *  2. A thread reads @fn and @ctx only after claiming a part below @n: the
 *     claim reads the reset of @next that follows their writes.  A worker
 *     late for a run finds @next at @n or beyond and claims nothing.
 */
#include "config.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "engine/threadpool.h"

/*
 * How long a waiter spins before it sleeps.  A decode step runs ~170
 * matrix products back to back with short serial work between them; if
 * workers fall asleep in those gaps, every product pays a futex wake-up
 * (measured: decode of a 24-layer dim-1024 Q8_0 model went from 56 to 80
 * tokens/s on 2 cores when the spin grew from 5 to 200 us).  An idle pool
 * spins 200 us once after its last job, then sleeps.
 */
#define POOL_SPIN_NS 200000
/* After this long a spinning worker yields the CPU between looks. */
#define POOL_YIELD_NS 20000
/* Spin iterations between two looks at the clock. */
#define POOL_SPIN_CHECK 32
/* Upper bound on the pool size, whatever is asked for. */
#define POOL_MAX_THREADS 1024

struct kvq_worker {
	struct kvq_pool *pool;
	pthread_t thread;
	int part;
};

struct kvq_pool {
	int n;			/* parts per run: workers + caller */
	struct kvq_worker *workers;	/* n - 1 of them */
	pthread_mutex_t run_lock;	/* invariant 1 */
	pthread_mutex_t lock;	/* orders sleeping against waking */
	pthread_cond_t work_cond;
	pthread_cond_t done_cond;
	kvq_pool_fn fn;
	void *ctx;

	/* read by spinning workers: kept apart from what they write */
	_Alignas(64) atomic_uint gen;
	atomic_bool stop;
	atomic_int sleepers;

	_Alignas(64) atomic_int remaining;
	atomic_bool caller_sleeping;
	_Alignas(64) atomic_int next;	/* the next part to claim */
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Spins until @gen differs from @seen or the spin time is up. */
static bool spin_for_gen(struct kvq_pool *p, unsigned int seen)
{
	uint64_t t0 = now_ns(), el;
	unsigned int i;

	for (;;) {
		for (i = 0; i < POOL_SPIN_CHECK; i++) {
			if (atomic_load_explicit(&p->gen, memory_order_acquire)
			    != seen)
				return true;
			kvq_cpu_relax();
		}
		el = now_ns() - t0;
		if (el > POOL_SPIN_NS)
			return false;
		/* A long wait lets other threads (the HTTP loop) run. */
		if (el > POOL_YIELD_NS)
			sched_yield();
	}
}

/* Returns the next generation after @seen, sleeping if it is slow. */
static unsigned int wait_for_work(struct kvq_pool *p, unsigned int seen)
{
	if (!spin_for_gen(p, seen)) {
		pthread_mutex_lock(&p->lock);
		atomic_fetch_add(&p->sleepers, 1);
		while (atomic_load(&p->gen) == seen)
			pthread_cond_wait(&p->work_cond, &p->lock);
		atomic_fetch_sub(&p->sleepers, 1);
		pthread_mutex_unlock(&p->lock);
	}
	return atomic_load(&p->gen);
}

/* Claims and runs parts of the current run until none is left. */
static void run_parts(struct kvq_pool *p)
{
	int part;

	for (;;) {
		part = atomic_fetch_add_explicit(&p->next, 1,
						 memory_order_acq_rel);
		if (part >= p->n)
			return;
		p->fn(p->ctx, part, p->n);
		if (atomic_fetch_sub(&p->remaining, 1) == 1 &&
		    atomic_load(&p->caller_sleeping)) {
			pthread_mutex_lock(&p->lock);
			pthread_cond_signal(&p->done_cond);
			pthread_mutex_unlock(&p->lock);
		}
	}
}

static void *worker_main(void *arg)
{
	struct kvq_worker *w = arg;
	struct kvq_pool *p = w->pool;
	unsigned int seen = 0;

	for (;;) {
		seen = wait_for_work(p, seen);
		if (atomic_load(&p->stop))
			break;
		run_parts(p);
	}
	return NULL;
}

/* Publishes a new generation and wakes the workers that sleep. */
static void bump_gen(struct kvq_pool *p)
{
	atomic_fetch_add(&p->gen, 1);
	if (atomic_load(&p->sleepers)) {
		pthread_mutex_lock(&p->lock);
		pthread_cond_broadcast(&p->work_cond);
		pthread_mutex_unlock(&p->lock);
	}
}

static void wait_done(struct kvq_pool *p)
{
	uint64_t t0 = now_ns();
	unsigned int i;

	for (;;) {
		for (i = 0; i < POOL_SPIN_CHECK; i++) {
			if (!atomic_load_explicit(&p->remaining,
						  memory_order_acquire))
				return;
			kvq_cpu_relax();
		}
		if (now_ns() - t0 > POOL_SPIN_NS)
			break;
	}
	pthread_mutex_lock(&p->lock);
	atomic_store(&p->caller_sleeping, true);
	while (atomic_load(&p->remaining))
		pthread_cond_wait(&p->done_cond, &p->lock);
	atomic_store(&p->caller_sleeping, false);
	pthread_mutex_unlock(&p->lock);
}

void kvq_pool_run(struct kvq_pool *p, kvq_pool_fn fn, void *ctx)
{
	if (!p || p->n == 1) {
		fn(ctx, 0, 1);
		return;
	}
	pthread_mutex_lock(&p->run_lock);
	p->fn = fn;
	p->ctx = ctx;
	atomic_store(&p->remaining, p->n);
	atomic_store_explicit(&p->next, 0, memory_order_release);
	bump_gen(p);
	run_parts(p);
	wait_done(p);
	pthread_mutex_unlock(&p->run_lock);
}

int kvq_pool_size(const struct kvq_pool *p)
{
	return p ? p->n : 1;
}

/* Online CPUs, or fewer when the affinity mask allows fewer. */
static int cpu_count(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	cpu_set_t set;
	int allowed;

	if (sched_getaffinity(0, sizeof(set), &set) == 0) {
		allowed = CPU_COUNT(&set);
		if (allowed > 0 && (n <= 0 || allowed < n))
			n = allowed;
	}
	if (n < 1)
		n = 1;
	if (n > POOL_MAX_THREADS)
		n = POOL_MAX_THREADS;
	return (int)n;
}

/* Tells the first @n_started workers to stop, and joins them. */
static void stop_workers(struct kvq_pool *p, int n_started)
{
	int i;

	atomic_store(&p->stop, true);
	bump_gen(p);
	for (i = 0; i < n_started; i++)
		pthread_join(p->workers[i].thread, NULL);
}

/* Starts the workers with every signal blocked; 0 or -errno. */
static int start_workers(struct kvq_pool *p)
{
	sigset_t all, old;
	int i, ret = 0;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (i = 0; i < p->n - 1; i++) {
		p->workers[i].pool = p;
		p->workers[i].part = i + 1;
		ret = -pthread_create(&p->workers[i].thread, NULL, worker_main,
				      &p->workers[i]);
		if (ret)
			break;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret)
		stop_workers(p, i);
	return ret;
}

struct kvq_pool *kvq_pool_create(int n_threads)
{
	struct kvq_pool *p;

	if (n_threads <= 0)
		n_threads = cpu_count();
	if (n_threads > POOL_MAX_THREADS)
		n_threads = POOL_MAX_THREADS;

	p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->n = n_threads;
	p->workers = calloc((size_t)n_threads, sizeof(*p->workers));
	if (!p->workers)
		goto out_free_pool;
	if (pthread_mutex_init(&p->run_lock, NULL))
		goto out_free_workers;
	if (pthread_mutex_init(&p->lock, NULL))
		goto out_destroy_run_lock;
	if (pthread_cond_init(&p->work_cond, NULL))
		goto out_destroy_lock;
	if (pthread_cond_init(&p->done_cond, NULL))
		goto out_destroy_work_cond;
	atomic_init(&p->gen, 0);
	atomic_init(&p->stop, false);
	atomic_init(&p->sleepers, 0);
	atomic_init(&p->remaining, 0);
	atomic_init(&p->caller_sleeping, false);
	atomic_init(&p->next, n_threads);
	if (start_workers(p))
		goto out_destroy_done_cond;
	return p;

out_destroy_done_cond:
	pthread_cond_destroy(&p->done_cond);
out_destroy_work_cond:
	pthread_cond_destroy(&p->work_cond);
out_destroy_lock:
	pthread_mutex_destroy(&p->lock);
out_destroy_run_lock:
	pthread_mutex_destroy(&p->run_lock);
out_free_workers:
	free(p->workers);
out_free_pool:
	free(p);
	return NULL;
}

void kvq_pool_destroy(struct kvq_pool *p)
{
	if (!p)
		return;
	stop_workers(p, p->n - 1);
	pthread_cond_destroy(&p->done_cond);
	pthread_cond_destroy(&p->work_cond);
	pthread_mutex_destroy(&p->lock);
	pthread_mutex_destroy(&p->run_lock);
	free(p->workers);
	free(p);
}
