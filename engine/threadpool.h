/*
 * threadpool.h - a fixed pool of worker threads for data-parallel loops.
 *
 * Why this file exists: every matrix product and attention call of the CPU
 * backend splits its rows over the cores; creating threads per call would
 * cost more than the work on small models.  The pool is sized from the CPU
 * count at creation and reused for the process's lifetime.
 */
#ifndef KVQ_THREADPOOL_H
#define KVQ_THREADPOOL_H

struct kvq_pool;

/* Runs fn(ctx, i, n) for i in [0, n) on the pool, caller included.
 * Returns when all have finished. */
typedef void (*kvq_pool_fn)(void *ctx, int i, int n);

/*
 * Starts @n_threads - 1 worker threads (the caller of kvq_pool_run() is the
 * last one).  n_threads <= 0: one per online CPU, or per CPU this process
 * may run on when its affinity mask is smaller.  Workers block all signals.
 * Returns the pool, owned by the caller, or NULL on failure with no thread
 * left running.
 */
struct kvq_pool *kvq_pool_create(int n_threads);
/* Stops and joins the workers and frees @p (NULL: nothing).  No run may be
 * in progress. */
void kvq_pool_destroy(struct kvq_pool *p);
/* Number of parts each run is split into, caller included (NULL: 1). */
int kvq_pool_size(const struct kvq_pool *p);
/*
 * Splits the work into pool-size parts: fn(ctx, part, n_parts), each part
 * run once, by whichever thread claims it first (the caller included: a
 * worker the system has descheduled is not waited for), and returns once
 * every part has returned; what the parts wrote is then visible to the
 * caller.  Runs from several threads take turns; @fn must not call
 * kvq_pool_run() on the same pool.  A NULL pool runs fn(ctx, 0, 1) here.
 */
void kvq_pool_run(struct kvq_pool *p, kvq_pool_fn fn, void *ctx);

/* One step of a spin-wait loop: tells the CPU that it is spinning. */
#if defined(__x86_64__) || defined(__i386__)
static inline void kvq_cpu_relax(void)
{
	__builtin_ia32_pause();
}
#elif defined(__aarch64__)
static inline void kvq_cpu_relax(void)
{
	__asm__ __volatile__("yield" ::: "memory");
}
#else
static inline void kvq_cpu_relax(void)
{
	__asm__ __volatile__("" ::: "memory");
}
#endif

#endif /* KVQ_THREADPOOL_H */
