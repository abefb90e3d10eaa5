/*
 * kvsmooth_impl.h - what the two halves of KV smoothing share.
 *
 * kvsmooth.c measures the model (struct acts), centres the keys and folds
 * the chosen transforms into the weights; kvsmooth_search.c chooses each
 * head's transform (struct shape) from what was measured, as a struct
 * plan.  Nothing outside engine/kvsmooth*.c includes this header.
 */
#ifndef KVQ_KVSMOOTH_IMPL_H
#define KVQ_KVSMOOTH_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/kvcache.h"
#include "engine/model.h"

struct kvq_pool;

/* Channel paired with @c by RoPE, or @c itself when c is not rotated. */
static inline uint32_t rope_partner(const struct kvq_hparams *hp, uint32_t c)
{
	uint32_t half = hp->rope_dim / 2;

	if (c >= hp->rope_dim)
		return c;
	if (hp->rope_neox)
		return c < half ? c + half : c - half;
	return c ^ 1;
}

/*
 * What the calibration prefill leaves: per layer the rotated keys and the
 * values of tokens at positions >= n_skip (rows of kvd floats), and per
 * layer and KV head the 2x2 pair blocks of each half's W: W[c][c] at c,
 * W[c][partner(c)] at hd + c.
 */
struct acts {
	const struct kvq_hparams *hp;
	uint32_t nl, nkv, hd, kvd, n_tok, cap;
	size_t wsz;		/* doubles of W per head: 2 hd */
	float *k, *v;		/* [layer][token][kvd] */
	uint32_t *pos;		/* [token]: its position in its prompt */
	double *wk, *wv;	/* [layer][kv head][wsz] */
};

static inline double *head_w(const struct acts *a, double *w, uint32_t l,
			     uint32_t h)
{
	return w + ((size_t)l * a->nkv + h) * a->wsz;
}

/* One head's transform: exponent and phase index per channel (a pair's
 * two channels hold the same). */
struct shape {
	int8_t e[KVQ_KV_MAX_HEAD_DIM];
	uint8_t ph[KVQ_KV_MAX_HEAD_DIM];
};

/* What the search works on and what it leaves. */
struct plan {
	const struct acts *a;
	const uint8_t *type_k, *type_v;	/* per layer; 0: leave alone */
	const bool *rot_ok, *v_ok;	/* per layer */
	bool search;			/* false: measure the identity */
	struct shape *sk, *sv;		/* [layer][kv head] */
	double *cost;			/* [layer][kv head][half][before,
					 * after, norm] */
	int err;			/* a worker's -ENOMEM */
};

/*
 * Runs the search (or, with pl->search false, only costs the identity)
 * over @a's tokens for every layer and KV head @pl's types select, on
 * @pool's threads.  Sets pl->a; allocates pl->sk, pl->sv (a head left
 * alone gets the identity) and pl->cost, which the caller frees with
 * kvq_kv_smooth_plan_free() whatever this returns.  @a is left unchanged.
 * Returns 0 or -ENOMEM.
 */
int kvq_kv_smooth_plan_run(struct kvq_pool *pool, struct plan *pl,
			   const struct acts *a);

/* Frees what kvq_kv_smooth_plan_run() allocated (pl->sk/sv/cost). */
void kvq_kv_smooth_plan_free(struct plan *pl);

/*
 * Relative errors of both halves: @pl's costs (@after picks the column)
 * over the norms of @ref (another plan over the same tokens, or @pl).
 */
void kvq_kv_smooth_plan_errors(const struct plan *pl, const struct plan *ref,
			       bool after, double *k_err, double *v_err);

static inline void plan_errors(const struct plan *pl, bool after,
			       double *k_err, double *v_err)
{
	kvq_kv_smooth_plan_errors(pl, pl, after, k_err, v_err);
}

/* cos and sin of phase @ph (0 <= ph < the search's phase count): the
 * rotation of a key pair that struct shape's ph[] names. */
void kvq_kv_smooth_phase(unsigned int ph, double *cs, double *sn);

#endif
