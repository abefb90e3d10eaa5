/*
 * test_step_sample.c - kvq_step_sample() on the CPU: the engine step that
 * also picks each entry's next token.
 *
 * On stories260K, three sequences (greedy, the default settings, T 1 over
 * the whole vocabulary) decode 30 tokens in one context through
 * kvq_step_sample() and, in a twin context, through kvq_step() and
 * kvq_sampler_sample() on the rows with samplers seeded alike.  The ids,
 * the logits it hands back and the samplers' states must be equal; an
 * entry without a sampler gets -1 and draws nothing; all_logits is
 * refused.  (The GPU path is checked by tests/gpu/test_gpu_fwd.c.)
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/log.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "tap.h"

#define N_SEQ 3
#define N_STEPS 30

static void run(struct kvq_model *m)
{
	static const struct kvq_sampler_params sp[N_SEQ] = {
		{ 0.0f, 40, 0.95f, 0.05f, 1 },
		{ 0.8f, 40, 0.95f, 0.05f, 2 },
		{ 1.0f, 0, 1.0f, 0.0f, 3 },
	};
	uint32_t V = kvq_model_hparams(m)->n_vocab;
	struct kvq_sampler sa[N_SEQ], sb[N_SEQ], *pa[N_SEQ];
	struct kvq_ctx_opts o;
	struct kvq_ctx *ca = NULL, *cb = NULL;
	struct kvq_batch ba = { 0 }, bb = { 0 };
	int seqa[N_SEQ], seqb[N_SEQ], one[N_SEQ], i, k, ret = 0;
	int32_t cura[N_SEQ], curb[N_SEQ], ids[N_SEQ];
	const int32_t *ta[N_SEQ], *tb[N_SEQ];
	float *la = malloc((size_t)N_SEQ * V * sizeof(float));
	float *lb = malloc((size_t)N_SEQ * V * sizeof(float));
	int same_ids = 1, same_logits = 1, changes = 0;
	uint64_t before[4];
	char err[256];

	kvq_ctx_opts_default(&o);
	o.n_ctx = 64;
	o.max_seqs = N_SEQ;
	if (kvq_ctx_create(m, &o, &ca, err, sizeof(err)) ||
	    kvq_ctx_create(m, &o, &cb, err, sizeof(err)) || !la || !lb) {
		tap_ok(0, "context: %s", err);
		goto out;
	}
	for (i = 0; i < N_SEQ; i++) {
		kvq_sampler_init(&sa[i], &sp[i], (int32_t)V);
		kvq_sampler_init(&sb[i], &sp[i], (int32_t)V);
		pa[i] = &sa[i];
		seqa[i] = kvq_seq_create(ca);
		seqb[i] = kvq_seq_create(cb);
		cura[i] = curb[i] = 1 + i;
		one[i] = 1;
		ta[i] = &cura[i];
		tb[i] = &curb[i];
	}
	ba.n = bb.n = N_SEQ;
	ba.seq = seqa;
	bb.seq = seqb;
	ba.n_tokens = bb.n_tokens = one;
	ba.tokens = ta;
	bb.tokens = tb;
	for (k = 0; k < N_STEPS && !ret; k++) {
		/* logits back on odd steps only */
		ret = kvq_step_sample(ca, &ba, pa, ids, (k & 1) ? la : NULL);
		ret |= kvq_step(cb, &bb, lb);
		for (i = 0; i < N_SEQ && !ret; i++) {
			int32_t want = kvq_sampler_sample(&sb[i],
							  lb + (size_t)i * V,
							  NULL);

			same_ids &= ids[i] == want;
			changes += i == 2 && ids[i] != cura[i];
			cura[i] = ids[i];
			curb[i] = want;
		}
		if (!ret && (k & 1))
			same_logits &= !memcmp(la, lb,
					       (size_t)N_SEQ * V * sizeof(float));
	}
	tap_ok(!ret && same_ids && changes > 5,
	       "%d steps of %d sequences: kvq_step_sample()'s ids equal sampling kvq_step()'s rows (%d changes at T 1)",
	       k, N_SEQ, changes);
	tap_ok(!ret && same_logits, "the logits it returns equal kvq_step()'s");
	for (i = 0; i < N_SEQ; i++)
		if (memcmp(sa[i].rng, sb[i].rng, sizeof(sa[i].rng)))
			same_ids = 0;
	tap_ok(same_ids, "the samplers' states advance alike");

	/* No sampler: -1 and no draw. */
	memcpy(before, sa[1].rng, sizeof(before));
	pa[1] = NULL;
	ids[1] = 12345;
	ret = kvq_step_sample(ca, &ba, pa, ids, NULL);
	tap_ok(!ret && ids[1] == -1 && ids[0] >= 0 &&
	       !memcmp(before, sa[1].rng, sizeof(before)),
	       "an entry without a sampler gets -1 and draws nothing");
	pa[1] = &sa[1];
	ba.all_logits = true;
	tap_ok(kvq_step_sample(ca, &ba, pa, ids, la) == -EINVAL,
	       "all_logits is refused");
	for (i = 0; i < N_SEQ; i++) {
		kvq_sampler_fini(&sa[i]);
		kvq_sampler_fini(&sb[i]);
	}
out:
	kvq_ctx_destroy(ca);
	kvq_ctx_destroy(cb);
	free(la);
	free(lb);
}

int main(void)
{
	struct kvq_model_opts mo = { 0 };
	struct kvq_model *m;
	char path[512], err[256];
	const char *p = tap_testdata("stories260K.gguf", path, sizeof(path));

	if (!p)
		return tap_skip_all("stories260K.gguf not found (KVQ_TESTDATA)");
	kvq_log_set_level(KVQ_LOG_WARNING);
	mo.n_threads = 2;
	if (kvq_model_load(p, &mo, &m, err, sizeof(err))) {
		tap_ok(0, "load: %s", err);
		return tap_done();
	}
	run(m);
	kvq_model_destroy(m);
	return tap_done();
}
