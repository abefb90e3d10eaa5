/*
 * fwd_util.h - helpers of test_gpu_fwd.c that report nothing themselves
 * (fwd_util.c): the cases that use them say ok or not ok.
 */
#ifndef KVQ_FWD_UTIL_H
#define KVQ_FWD_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"

/* One step of @n tokens of sequence @seq; with @all, the logits of every
 * row, else of the last. */
int seq_step(struct kvq_ctx *c, int seq, const int32_t *tok, int n, bool all,
	     float *logits);
int one_step(struct kvq_ctx *c, int seq, const int32_t *tok, int n,
	     float *logits);

/* Options of a context with an f32 cache (products are what is compared),
 * 256 positions and two sequences. */
void f32_cache_opts(struct kvq_ctx_opts *o, const struct kvq_hparams *hp);

/* The model's matrices are Q4_K or Q6_K: kept as they are only with
 * KVQ_GPU_WEIGHTS=compact. */
bool k_quant(struct kvq_model *m);
/* The model's matrices are of a type the GPU can keep as it is (and
 * multiply as its f16 values). */
bool kept_quantized(struct kvq_model *m);
/* What the model at @path is: its weights of a type the GPU keeps 4/8-bit
 * (*@q8), Q4_K / Q6_K (*@kq), its vocabulary (*@V).  false when it does
 * not load. */
bool model_kind(const char *path, bool *q8, bool *kq, uint32_t *V);
/* Device bytes of @path's weights uploaded with KVQ_GPU_WEIGHTS @w and
 * KVQ_GPU_FAULT @fault (NULL: unset); 0 on a failure. */
uint64_t upload_bytes(const char *path, const char *w, const char *fault);

/* quant_values_run(): a prompt of 3 tokens, QV_STEPS one-token steps, one
 * step of QV_SEQS sequences, with KVQ_GPU_WEIGHTS f16 (@f16) or compact;
 * (QV_STEPS + 1 + QV_SEQS) rows of @V logits into @out. */
#define QV_STEPS 12
#define QV_SEQS 9
int quant_values_run(const char *path, bool f16, float *out, uint32_t V,
		     char *err, size_t errlen);

/* Weight tensors of @m past f16's range (those f16 rounds to infinity;
 * F32 ones aside), from every value on the host (kvq_dequant_row());
 * *@named: whether one is the tensor named at @at (the weights line from
 * "kept f32 (weights beyond f16's range, first "). */
int fwd_wide_weights(struct kvq_model *m, const char *at, bool *named);

#endif /* KVQ_FWD_UTIL_H */
