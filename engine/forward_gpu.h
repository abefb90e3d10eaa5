/*
 * forward_gpu.h - the engine's side of the GPU forward pass: uploading a
 * model's weights and running kvq_step() on the device.
 *
 * Why this file exists: forward.c keeps the host bookkeeping of a context
 * (sequences, block tables, page reference counts) for both devices; this
 * interface turns that bookkeeping into the plain arrays of
 * kernels/gpu_fwd.h.  Nothing here needs CUDA headers; a build without a
 * GPU backend gets -ENOSYS and a message saying so.
 */
#ifndef KVQ_FORWARD_GPU_H
#define KVQ_FORWARD_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_model;
struct kvq_kvcache;
struct kvq_batch;
struct kvq_attn_seq;
struct kvq_ctx_gpu;
struct kvq_gpu_sample_params;

/*
 * KVQ_GPU_MV_MAX's value: the tokens up to which a step keeps f16 products
 * on the CUDA cores (off tensor cores), a whole number from 1 to 16 into
 * @out; -EINVAL (and @out untouched) for anything else, which the context
 * refuses with a warning.
 */
int kvq_gpu_mv_max_parse(const char *s, uint32_t *out);

/*
 * One Q4_K or Q6_K row of @cols (a multiple of 256) in the device format
 * @wt (kernels/gpu_fwd.h: KVQ_GPU_W_Q4K, Q4_K only, or KVQ_GPU_W_Q8K):
 * @codes cols/2 or cols bytes, @pairs cols/32 or cols/16 pairs of floats
 * (scale, offset) such that each weight, code * scale + offset in f32, is
 * the CPU's dequantized value bit for bit.  -EINVAL for anything else.
 * Plain C (no GPU needed), so the layout is tested everywhere.
 */
int kvq_gpu_kquant_row(uint32_t type, int wt, const void *row, uint32_t cols,
		       uint8_t *codes, float *pairs);

/*
 * How @m's weights sit on the device ("968.9 MiB: Q8_0, Q4_0 and Q4_K
 * kept 8- and 4-bit, ..." and why, where the upload chose so itself), or
 * "" before the upload and without a GPU.
 */
const char *kvq_model_gpu_weights(const struct kvq_model *m);

/* Uploads @m's weights once (later calls return 0 at once). */
int kvq_model_gpu_upload(struct kvq_model *m, char *err, size_t errlen);
void kvq_model_gpu_release(struct kvq_model *m);
/* Device bytes of the weights (0 before the upload or without a GPU). */
uint64_t kvq_model_gpu_bytes(const struct kvq_model *m);
/* Device weight bytes one decode step reads (0 before the upload). */
uint64_t kvq_model_gpu_step_bytes(const struct kvq_model *m);

int kvq_ctx_gpu_create(struct kvq_model *m, struct kvq_kvcache *kv,
		       uint32_t max_batch, uint32_t max_seqs, uint32_t n_ctx,
		       struct kvq_ctx_gpu **out, char *err, size_t errlen);
void kvq_ctx_gpu_destroy(struct kvq_ctx_gpu *g);
/* Device bytes of the context (pages, sinks, activations). */
uint64_t kvq_ctx_gpu_bytes(const struct kvq_ctx_gpu *g);

/*
 * Runs one step whose pages are reserved: entry i is sequence slot
 * @slots[i] with @aseq[i] (positions and rows); @pos holds every row's
 * position.  Logits as kvq_step() defines them, not copied back when
 * @logits is NULL.  With @ids set (all_logits off), output row i's token
 * is chosen on the device by kvq_gpu_sample() with settings @sp[i] and
 * uniform number @u[i] into @ids[i].
 */
int kvq_ctx_gpu_step(struct kvq_ctx_gpu *g, const struct kvq_batch *b,
		     const int *slots, const struct kvq_attn_seq *aseq,
		     const uint32_t *pos, uint32_t n_tok, float *logits,
		     const struct kvq_gpu_sample_params *sp, const float *u,
		     int32_t *ids);

/* Copies sequence slot @src's f16 sink copies to slot @dst (a fork). */
int kvq_ctx_gpu_copy_sinks(struct kvq_ctx_gpu *g, int dst, int src);

/* For benchmarks: appends @n pseudo-random tokens to the sequence's
 * cache on the device without running the model (pages reserved). */
int kvq_ctx_gpu_fill(struct kvq_ctx_gpu *g, int slot, const int32_t *pages,
		     uint32_t n_pages, uint32_t from, uint32_t to);

/* One line about the GPU state: steps, graphs, decode kernel. */
void kvq_ctx_gpu_describe(const struct kvq_ctx_gpu *g, char *buf,
			  size_t len);

/* Tokens chosen by the device sampler so far. */
uint64_t kvq_ctx_gpu_sampled(const struct kvq_ctx_gpu *g);
/* Device time of the steps so far (kvq_gpu_stats.busy_us). */
double kvq_ctx_gpu_busy_us(const struct kvq_ctx_gpu *g);
/* The pinned buffer a step's logits reach without a copy (*rows rows),
 * or NULL (kvq_gpu_ctx_logits()). */
float *kvq_ctx_gpu_logits(struct kvq_ctx_gpu *g, uint32_t *rows);

/* What the GPU context stopped doing after a failure ("CUDA graphs off:
 * ..."), or NULL. */
const char *kvq_ctx_gpu_fallback(const struct kvq_ctx_gpu *g);

#endif /* KVQ_FORWARD_GPU_H */
