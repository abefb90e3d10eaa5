/*
 * attn_test.h - what the two files of the test_gpu_attn program share:
 * the host cache and device copy helpers and key centring of
 * test_gpu_attn.c, and the prompt (prefill) and append cases and tests of
 * test_gpu_attn_write.c that main() runs.  Include config.h first.
 */
#ifndef KVQ_ATTN_TEST_H
#define KVQ_ATTN_TEST_H

#include <stddef.h>
#include <stdint.h>

#include "engine/kvcache.h"
#include "kernels/attn.h"

#ifdef KVQ_ATTN_GPU

#define HD 128

/* ----------------------------------------------- test_gpu_attn.c */

/* Head size of the caches build() and dev_put() make (HD but for the
 * split-KV cases). */
extern uint32_t g_hd;

/* Uniform in [-1, 1). */
float frand(void);

/* The name of KV type @t. */
const char *tn(int t);

/* A host cache with @batch sequences of random tokens, interleaved so
 * that each sequence's pages are scattered over the pool. */
struct kvq_kvcache *build(int kt, int vt, uint32_t hk, uint32_t P,
			  uint32_t n_sink, uint32_t batch,
			  const uint32_t *lens, float kmag,
			  struct kvq_kv_seq *s);

/* Releases build()'s @batch sequences @s and destroys @c (NULL: nothing). */
void unbuild(struct kvq_kvcache *c, struct kvq_kv_seq *s, uint32_t batch);

/* Device copies of one layer-0 cache: pools, block table, sinks. */
struct dev {
	void *kp, *vp, *bt, *lens, *sinkv, *sinks[8];
	uint32_t bt_stride;
};

/* Frees what dev_put() made and zeroes @d. */
void dev_free(struct dev *d);

/* Copies layer 0 of host cache @c, with @batch sequences @s of @lens
 * tokens, into @d on the device: 0, or -1 (dev_free() frees what was
 * made). */
int dev_put(struct dev *d, const struct kvq_kvcache *c,
	    const struct kvq_kv_seq *s, uint32_t batch,
	    const uint32_t *lens);

/*
 * Key centring of a case (engine/kvcache.h): centres uniform in [-cmag,
 * cmag), ten times the keys' spread or more, so that a correction left
 * out moves scores (and stored bytes) far beyond any tolerance; RoPE over
 * rope_dim channels (0: all of them) with base (0: 10000), neox or
 * adjacent pairs.  cmag 0: not centred.
 */
struct centring {
	float cmag;
	uint32_t rope_dim;
	int neox;
	float base;
};

#define NO_CENTRING { 0.0f, 0, 0, 0.0f }

/* Random centres of @ce for @hk KV heads of g_hd channels, also the
 * centring of the caches build() makes until centring_off(); NULL when
 * @ce is not centred, *@fail set when out of memory. */
float *centring_on(const struct centring *ce, uint32_t hk, int *fail);

/* Frees centring_on()'s centres @c: build() makes plain caches again. */
void centring_off(float *c);

/* The case's centring in words for the test names into @buf ("" when
 * not centred). */
void centring_desc(const struct centring *ce, char *buf, size_t len);

/* Device copy of layer 0's centres of host cache @c (*@out NULL when the
 * layer is not centred): 0, or -1 on failure. */
int centring_dev(const struct kvq_kvcache *c, void **out);

/* ----------------------------------------- test_gpu_attn_write.c */

/*
 * A prompt case for kvq_gpu_attn_prefill(): @batch sequences with lens[b]
 * tokens in the cache, sequence b asking rows[b] query rows at its last
 * positions (rows[b] == lens[b]: a prompt from position 0; fewer: a later
 * chunk after one already cached, or with 1 a decode row beside the
 * prompt, as the scheduler mixes them).  Rows are grouped by sequence in
 * batch order, as the engine lays them out.
 */
struct pcase {
	const char *name;
	int kt, vt;
	uint32_t hd, hq, hk, P, n_sink, batch;
	uint32_t lens[6];
	uint32_t rows[6];
	float kmag;		/* key magnitude: larger is a peakier softmax */
	int no_ws;		/* no workspace: one block covers all positions */
};

/* kvq_gpu_attn_prefill() against kvq_kv_attend() on case @tc. */
void run_prefill(const struct pcase *tc);

/* What the prefill kernel declines (so the caller takes the split
 * kernel) and what it serves, with the reasons it gives. */
void prefill_refusals(void);

/* Not a test: the time of a @rows-row prompt's attention by the prefill
 * and the split kernel, whose results must agree. */
void prefill_speed(uint32_t rows, int kt, int vt);

/* An append case for kvq_gpu_attn_append() (see run_append()). */
struct acase {
	const char *name;
	int kt, vt;
	uint32_t rope_dim;
	int neox, table, in_f16;
	uint32_t hd;		/* 0: HD */
	struct centring ce;	/* its rope_dim, neox and base: the case's */
};

/* kvq_gpu_attn_append() on case @tc against the engine's rotation and
 * kvq_kv_write(): pools and sink copies equal byte for byte. */
void run_append(const struct acase *tc);

/* kvq_gpu_attn_decode() appending its rows itself against the append
 * kernel and then the decode kernel: the same bits, the same bytes. */
void run_fused_append(int kt, int vt, uint32_t D, uint32_t hq, int neox);

#endif /* KVQ_ATTN_GPU */

#endif /* KVQ_ATTN_TEST_H */
