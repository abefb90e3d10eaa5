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

/* n_threads <= 0: one per online CPU.  Returns NULL on failure. */
struct kvq_pool *kvq_pool_create(int n_threads);
void kvq_pool_destroy(struct kvq_pool *p);
int kvq_pool_size(const struct kvq_pool *p);
/* Splits the work into pool-size parts: fn(ctx, part, n_parts). */
void kvq_pool_run(struct kvq_pool *p, kvq_pool_fn fn, void *ctx);

#endif /* KVQ_THREADPOOL_H */
