/*
 * fisher.h - per-tensor importance from the Fisher sidecar (DESIGN.md §6).
 *
 * Why this file exists: kvqd places and keeps weights by how much each
 * tensor matters to the loss.  The measure is the diagonal Fisher
 * information E[g²], shipped beside the model as MODEL.fim.gguf: one F32
 * tensor per model tensor, under the same name, holding either the full
 * diagonal (the model tensor's shape) or its per-row sums (the shape without
 * ne[0]).  This module checks a sidecar against its model and turns it into
 * one score per tensor:
 *
 *   trace    sum of E[g²] over the tensor's elements (double accumulation)
 *   density  trace / bytes of the tensor as stored in the model
 *   rank     1 = highest density; ties go to the smaller tensor, then to
 *            the one earlier in the model file
 *
 * Without a sidecar the ranks come from a fallback rule that only looks at
 * names and sizes (KVQ_FISHER_FALLBACK_RULE):
 *
 *   1. tensors outside the blocks first (token_embd, output, output_norm,
 *      anything not named "blk.N.*"): the embedding and the output
 *      projection touch every token;
 *   2. then the blocks from both ends inward: a block's distance from the
 *      nearer end (0 for the first and the last block) orders them, and of
 *      two blocks at the same distance the earlier one goes first;
 *   3. within a block, attention tensors ("attn_*") before FFN tensors
 *      ("ffn_*") before anything else;
 *   4. ties (and everything within step 1) by smaller size first, then by
 *      position in the model file.
 *
 * Fallback entries have trace and density 0; their score (below) falls
 * evenly from 1 (rank 1) towards 0 so that a consumer ordering by score
 * needs no special case.  A caller that gets a fallback logs once:
 * "no Fisher sidecar for MODEL: ranking by " KVQ_FISHER_FALLBACK_RULE.
 *
 * A loaded struct kvq_fisher is immutable: any number of threads may read
 * it while its owner keeps it alive.
 */
#ifndef KVQ_FISHER_H
#define KVQ_FISHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_gguf;
struct kvq_model;

#define KVQ_FISHER_FALLBACK_RULE \
	"position and role (embedding and output first, then blocks from " \
	"both ends inward, attention before FFN, smaller tensors first)"

/* The sidecar format version this reader understands (fim.version). */
#define KVQ_FISHER_VERSION 1

enum kvq_fisher_source {
	KVQ_FISHER_SRC_ADAM = 1,	/* "adam_exp_avg_sq" */
	KVQ_FISHER_SRC_CALIBRATION,	/* "calibration" */
	KVQ_FISHER_SRC_JSON,		/* "json_scores" */
	KVQ_FISHER_SRC_FALLBACK,	/* "fallback": no sidecar */
};

struct kvq_fisher_entry {
	const char *name;	/* the model tensor's name */
	const char *type;	/* its stored type: "F16", "Q4_K" */
	uint32_t index;		/* position in the model file */
	int32_t layer;		/* N of "blk.N.", -1 outside the blocks */
	uint64_t n_elements;
	uint64_t bytes;		/* as stored in the model */
	bool rows;		/* the sidecar held row sums */
	double trace;		/* sum of E[g²]; 0 for a fallback */
	double density;		/* trace / bytes; 0 for a fallback */
	double score;		/* density, or the fallback's, in (0, 1] */
	uint32_t rank;		/* 1 = most important */
};

struct kvq_fisher_meta {
	enum kvq_fisher_source source;
	const char *path;	/* the sidecar read; NULL for a fallback */
	uint64_t token_count;	/* fim.token_count, 0 when unknown */
	uint64_t step_count;	/* fim.step_count, 0 when unknown */
	const char *dataset;	/* fim.dataset, "" when absent */
	const char *model_name;	/* fim.model.name, "" when absent */
};

struct kvq_fisher;

/*
 * kvq_fisher_default_path() - "DIR/NAME.fim.gguf" for the model
 * "DIR/NAME.gguf" (a model path not ending in ".gguf" just gets
 * ".fim.gguf" appended).  Returns 0, or -ENAMETOOLONG when @len is too
 * small (@buf then holds an empty string).
 */
int kvq_fisher_default_path(const char *model_path, char *buf, size_t len);

/*
 * kvq_fisher_load_gguf() - scores for the model read by @model.
 *
 * @path names the sidecar.  With @path NULL the default path beside the
 * model (kvq_fisher_default_path() of @model->path) is tried, and when no
 * file is there the fallback ranks are returned (kvq_fisher_is_fallback()).
 * A sidecar that exists but is unreadable, malformed or made for another
 * model is always refused, as is an explicit @path that does not exist.
 *
 * The sidecar must hold, for every model tensor, an F32 tensor of the same
 * name in the full or row layout with finite, non-negative values, and
 * nothing else; its fim.model.tensor_count, when present, must equal the
 * model's tensor count.
 *
 * Returns 0 and stores a new object in *out (free with
 * kvq_fisher_destroy(); it copies what it keeps, so @model may be closed
 * first).  On failure returns -errno (-ENOENT: no such sidecar, -EINVAL:
 * it does not match the model or is malformed, -ENOTSUP: a newer format
 * version, -ENOMEM) and writes one line naming the sidecar file and, where
 * one is at fault, the tensor into @err (may be NULL); *out is unchanged.
 */
int kvq_fisher_load_gguf(const struct kvq_gguf *model, const char *path,
			 struct kvq_fisher **out, char *err, size_t errlen);

/* kvq_fisher_load_gguf() for a loaded model (its GGUF reader). */
int kvq_fisher_load(const struct kvq_model *m, const char *path,
		    struct kvq_fisher **out, char *err, size_t errlen);

/*
 * kvq_fisher_fallback() - the fallback ranks for @model, whether or not a
 * sidecar exists.  Same return and ownership rules as kvq_fisher_load_gguf().
 */
int kvq_fisher_fallback(const struct kvq_gguf *model, struct kvq_fisher **out,
			char *err, size_t errlen);

void kvq_fisher_destroy(struct kvq_fisher *f);

/* Entries in model file order (entry i is model tensor i); *n gets the
 * count.  Valid until kvq_fisher_destroy(). */
const struct kvq_fisher_entry *kvq_fisher_entries(const struct kvq_fisher *f,
						  size_t *n);
/* The entry of rank @rank (1-based), NULL when out of range. */
const struct kvq_fisher_entry *kvq_fisher_ranked(const struct kvq_fisher *f,
						 uint32_t rank);
/* The entry of tensor @name, NULL when the model has none. */
const struct kvq_fisher_entry *kvq_fisher_find(const struct kvq_fisher *f,
					       const char *name);

const struct kvq_fisher_meta *kvq_fisher_meta(const struct kvq_fisher *f);
/* "adam_exp_avg_sq", "calibration", "json_scores" or "fallback". */
const char *kvq_fisher_source(const struct kvq_fisher *f);
const char *kvq_fisher_source_name(enum kvq_fisher_source s);
bool kvq_fisher_is_fallback(const struct kvq_fisher *f);

#endif /* KVQ_FISHER_H */
