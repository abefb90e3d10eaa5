/*
 * kvcalib.c - key precision calibration at load (see kvcalib.h).
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/kvcache.h"
#include "engine/kvcalib.h"
#include "engine/log.h"
#include "engine/tokenizer.h"

/* Ordinary English: what a served model meets first. */
static const char *const calib_prompts[] = {
	"Once upon a time, there was a little girl who lived in a village near the forest. Every morning she walked to the well to fetch water, and",
	"The committee met on Tuesday to review the budget for the coming year. After a long discussion about roads and schools, the members agreed that",
	"To make bread, mix flour, water, salt and yeast in a large bowl. Knead the dough for ten minutes until it is smooth, then",
	"In 1969 two astronauts walked on the Moon while a third orbited above them. Millions of people watched the pictures on television and",
};
#define N_PROMPTS (sizeof(calib_prompts) / sizeof(calib_prompts[0]))

/*
 * Longer passages for KV smoothing (kvsmooth.c), written for kvqd: keys
 * and queries at positions across a whole context, where RoPE's slow
 * pairs have turned as far as they do in use.  kvsmooth.c cuts each at
 * 512 tokens (or the model's context).
 */
static const char *const calib_texts[] = {
	"Tom had a red kite. One windy day he took it to the hill behind "
	"his house. His sister Mia came too, with a jar of lemonade and two "
	"cups. Tom ran as fast as he could, and the kite went up and up "
	"until it was only a small red dot in the sky. \"Look, Mia!\" he "
	"shouted. \"It is flying higher than the birds!\" Mia laughed and "
	"clapped her hands. Then the wind grew strong, and the string "
	"slipped out of Tom's fingers. The kite floated away over the "
	"trees. Tom sat down on the grass and felt sad. Mia gave him a cup "
	"of lemonade and said, \"Let us go and find it.\" They walked down "
	"the hill, past the old barn and the pond where the ducks swam. An "
	"old man was fixing his fence near the pond. He had a long grey "
	"beard and a kind face. \"Have you seen a red kite?\" asked Mia. "
	"The old man smiled and pointed to a tall tree. The kite was stuck "
	"in the branches. The man fetched a ladder from his barn, climbed "
	"up slowly and brought the kite down. Tom said thank you three "
	"times. The man told them that when he was a boy, he had a kite "
	"too, a blue one, and he lost it in the same tree. They all "
	"laughed. On the way home the sun went down and the sky turned pink "
	"and orange. Tom held the string tight with both hands. That night "
	"he put the kite next to his bed, and he dreamed of flying over the "
	"hills, the barn, the pond and the tall tree, all the way to the "
	"sea. In the morning Tom woke up early. The kite was still there, a "
	"little torn at one corner. He showed it to his mother at "
	"breakfast. She found a needle, some thread and a scrap of red "
	"cloth, and together they mended the hole. \"Now it is even "
	"stronger than before,\" she said. After school Tom and Mia went "
	"back to the hill. This time Tom tied the string around his wrist, "
	"just to be safe.",
	"Every Saturday the market opens early in the square by the river. "
	"Farmers bring apples, carrots, eggs and fresh bread, and the baker "
	"sells warm rolls from a cart with a green roof. A girl named Lily "
	"went there with her father to buy food for the week. She carried "
	"the basket, and he carried the money. First they stopped at the "
	"egg stall, where a woman with a big straw hat counted twelve brown "
	"eggs into a box. Then Lily saw a puppy sleeping under a table full "
	"of cheese. It was small and white with one black ear. \"Can I pet "
	"him?\" she asked. The cheese man nodded and said the puppy was "
	"called Button. Button woke up, licked her hand and wagged his "
	"tail. Lily giggled. Her father bought a piece of yellow cheese and "
	"some honey, and they walked on. Near the fountain a boy was "
	"playing a little song on a flute. People dropped coins in his hat. "
	"Lily asked her father for a coin, and she put it in the hat very "
	"carefully. The boy smiled and played a faster song, and two old "
	"ladies began to dance. When the basket was full and heavy, they "
	"sat on a bench to rest. Her father cut an apple in half and gave "
	"her the bigger part. The sun was warm, the river was bright, and "
	"the bells of the church rang ten times. On the way home Lily "
	"talked about Button all the time. She wanted a puppy of her own. "
	"Her father said they would think about it. Lily knew that meant "
	"maybe, and maybe was almost yes. A week later her father came home "
	"with a large cardboard box. Something inside it was scratching and "
	"whining. Lily opened the lid very slowly. Two brown eyes looked up "
	"at her, and a small nose sniffed the air. It was not Button, but "
	"it was a puppy just like him, white with one brown ear. Lily "
	"hugged her father so hard that he almost fell over. She named the "
	"puppy Pepper, and Pepper slept at the end of her bed every night.",
	"It snowed all night, and when Ben woke up the whole garden was "
	"white. The fence, the shed and the old apple tree wore soft white "
	"hats. Ben put on his boots, his blue coat and the striped scarf "
	"his grandpa had given him, and ran outside. The snow came up to "
	"his knees. \"Grandpa, come and see!\" he called. Grandpa came out "
	"slowly with a cup of tea in his hand. He looked at the snow and "
	"smiled. \"This is good snow for a snowman,\" he said. \"It is wet "
	"and it sticks.\" Ben made a small ball and rolled it across the "
	"lawn. It grew bigger and bigger until he could not push it any "
	"more. Grandpa helped him make a second ball for the middle and a "
	"third one for the head. Lifting the head was hard. They both "
	"puffed and laughed, and at last it sat on top. Ben ran into the "
	"kitchen and came back with a carrot for the nose. Grandpa found "
	"two black stones for the eyes and a row of little pebbles for the "
	"mouth. \"He needs arms,\" said Ben, and he took two sticks from "
	"under the tree. Then Ben took off his striped scarf and wrapped "
	"it around the snowman's neck. \"Now he will not be cold,\" he "
	"said. Grandpa said that was very kind. They called the snowman Mr "
	"Frost. In the afternoon a robin landed on Mr Frost's head and "
	"sang a short song. Ben threw some bread crumbs on the snow, and "
	"the robin hopped down to eat them. When it grew dark, Grandpa "
	"made hot soup, and they ate it by the window so they could watch "
	"Mr Frost in the light of the moon. The next day the sun came out "
	"and the snow began to melt. Drip, drip, drip went the roof. Mr "
	"Frost got thinner and his carrot nose fell into the grass. Ben "
	"felt a little sad. Grandpa put his arm around him. \"Snow always "
	"goes away,\" he said, \"but it always comes back, too.\" Ben "
	"picked up his scarf, shook off the water, and hung it by the fire "
	"to dry for next winter.",
	"Deep in the woods, under the roots of a big oak, lived a small "
	"brown bear called Bruno. Every autumn all the bears went to sleep "
	"until spring, but this year Bruno could not sleep at all. He "
	"turned left, he turned right, he counted the stars he could see "
	"through a crack in the roof, and still his eyes stayed open. \"I "
	"will ask my friends,\" he said at last, and he went out into the "
	"cold night. First he found Owl, who sat on a branch with her big "
	"round eyes. \"Owl, how do you fall asleep?\" asked Bruno. \"I do "
	"not,\" said Owl. \"I sleep in the day. At night I am wide "
	"awake.\" That did not help. Next he met Fox, who was trotting "
	"along the path with his bushy tail in the air. \"Fox, how do you "
	"fall asleep?\" Fox thought for a moment. \"I curl up in a ball "
	"and put my tail over my nose,\" he said. Bruno tried it, but his "
	"tail was far too short to reach his nose, and he rolled over in "
	"the leaves. Fox laughed, but not in a mean way. Then Bruno came "
	"to the river, where an old Beaver was mending her dam. \"Beaver, "
	"how do you fall asleep?\" Beaver put down her stick. \"I work "
	"hard all day,\" she said, \"and when the work is done, I am so "
	"tired that I sleep as soon as I lie down.\" So Bruno helped her. "
	"He carried sticks and mud and stones until the moon was low and "
	"his paws were heavy. The dam was strong and neat. \"Thank you, "
	"Bruno,\" said Beaver. \"Now go home.\" Bruno walked back to the "
	"oak tree, yawning all the way. He climbed into his bed of dry "
	"leaves and pulled the moss over his ears. Outside, the first "
	"snowflakes began to fall. Owl hooted softly, Fox curled up in his "
	"den, and Beaver slept in her lodge. Bruno did not count a single "
	"star. He was fast asleep before the snow had covered the path, "
	"and he did not wake up until the birds sang in spring.",
};
#define N_TEXTS (sizeof(calib_texts) / sizeof(calib_texts[0]))

const char *const *kvq_kv_calib_prompts(size_t *n)
{
	*n = N_PROMPTS;
	return calib_prompts;
}

const char *const *kvq_kv_calib_texts(size_t *n)
{
	*n = N_TEXTS;
	return calib_texts;
}

void kvq_kv_calib_opts_default(struct kvq_kv_calib_opts *o)
{
	o->kl_q4 = 0.005;
	o->kl_q8 = 0.005;
	o->ratio_max = 3.0;
	o->per_layer = true;
}

struct calib {
	struct kvq_model *m;
	struct kvq_ctx_opts base;
	uint32_t nv, nl;
	int32_t *ids[N_PROMPTS];
	int n_ids[N_PROMPTS];
	float *ref[N_PROMPTS];	/* reference logits of the decoded token */
	double ref_std[N_PROMPTS];
	float *lg;
	uint8_t tv[KVQ_KV_MAX_LAYERS];
};

/* Logits of the last token of prompt @p with key types @tk. */
static int run_prompt(struct calib *c, int p, const uint8_t *tk, float *out)
{
	struct kvq_ctx_opts o = c->base;
	struct kvq_ctx *ctx;
	char err[256];
	int seq, n = c->n_ids[p] - 1, one = 1, ret;
	const int32_t *tp = c->ids[p], *last = c->ids[p] + n;
	struct kvq_batch b = { .n = 1, .seq = &seq, .n_tokens = &n,
			       .tokens = &tp };

	o.kv_types_k = tk;
	o.kv_types_v = c->tv;
	o.n_ctx = (uint32_t)c->n_ids[p] + 1;
	o.kv_tokens = o.n_ctx;
	o.max_seqs = 1;
	o.max_batch = (uint32_t)c->n_ids[p];
	ret = kvq_ctx_create(c->m, &o, &ctx, err, sizeof(err));
	if (ret)
		return ret;
	seq = kvq_seq_create(ctx);
	/* Prefill, then decode the last token alone: the decode path. */
	ret = kvq_step(ctx, &b, out);
	if (!ret) {
		b.n_tokens = &one;
		b.tokens = &last;
		ret = kvq_step(ctx, &b, out);
	}
	kvq_ctx_destroy(ctx);
	return ret;
}

/* log(sum(exp(x))) over n logits. */
static double log_sum_exp(const float *x, uint32_t n)
{
	double mx = x[0], s = 0;
	uint32_t i;

	for (i = 1; i < n; i++)
		mx = x[i] > mx ? x[i] : mx;
	for (i = 0; i < n; i++)
		s += exp(x[i] - mx);
	return mx + log(s);
}

/*
 * Key types @tk against the reference over all prompts: the largest
 * |logit error| / std(reference logits) in *err, and the largest
 * KL(reference || test) of the next-token distributions in *kl.
 */
static int measure(struct calib *c, const uint8_t *tk, double *err,
		   double *kl)
{
	uint32_t p, v;
	int ret;

	*err = 0;
	*kl = 0;
	for (p = 0; p < N_PROMPTS; p++) {
		double e = 0, k = 0, la, lb;

		if (!c->ids[p])
			continue;
		ret = run_prompt(c, (int)p, tk, c->lg);
		if (ret)
			return ret;
		la = log_sum_exp(c->ref[p], c->nv);
		lb = log_sum_exp(c->lg, c->nv);
		for (v = 0; v < c->nv; v++) {
			double d = fabs((double)c->lg[v] - c->ref[p][v]);
			double lpa = c->ref[p][v] - la, lpb = c->lg[v] - lb;

			if (d > e)
				e = d;
			k += exp(lpa) * (lpa - lpb);
		}
		e /= c->ref_std[p] > 0 ? c->ref_std[p] : 1.0;
		if (e > *err)
			*err = e;
		if (k > *kl)
			*kl = k;
	}
	return 0;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct layer_err {
	uint32_t layer;
	double err;
};

static int cmp_err(const void *a, const void *b)
{
	const struct layer_err *x = a, *y = b;

	return x->err < y->err ? -1 : x->err > y->err;
}

int kvq_kv_calibrate_keys_opts(struct kvq_model *m,
			       const struct kvq_ctx_opts *base,
			       const struct kvq_kv_calib_opts *co,
			       uint8_t *types_k,
			       struct kvq_kv_calib_report *rep)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	struct kvq_tokenizer *tok = kvq_model_tokenizer(m);
	struct kvq_kv_calib_report r = { 0 };
	uint8_t tk[KVQ_KV_MAX_LAYERS];
	struct layer_err *le = NULL;
	struct calib c = { .m = m, .base = *base };
	double t0 = now_s(), sum, dummy;
	uint32_t l, p, v;
	int ret = -ENOMEM, have = 0;

	c.nv = hp->n_vocab;
	c.nl = hp->n_layers;
	for (l = 0; l < c.nl; l++) {
		types_k[l] = KVQ_KV_Q8;
		c.tv[l] = KVQ_KV_F16;
	}
	c.lg = malloc(c.nv * sizeof(float));
	if (!c.lg)
		goto out;
	for (p = 0; p < N_PROMPTS; p++) {
		size_t len = strlen(calib_prompts[p]);
		int n = 0, k;

		c.ids[p] = malloc((len + 2) * sizeof(int32_t));
		c.ref[p] = malloc(c.nv * sizeof(float));
		if (!c.ids[p] || !c.ref[p])
			goto out;
		if (kvq_tokenizer_bos(tok) >= 0)
			c.ids[p][n++] = kvq_tokenizer_bos(tok);
		k = kvq_tokenize(tok, calib_prompts[p], len, c.ids[p] + n,
				 (int)len + 2 - n);
		if (k < 0 || k > (int)len + 2 - n)
			k = 0;
		n += k;
		if (hp->ctx_len && (uint32_t)n + 1 > hp->ctx_len)
			n = (int)hp->ctx_len - 1;
		c.n_ids[p] = n;
		if (n < 4) {
			free(c.ids[p]);
			c.ids[p] = NULL;
			continue;
		}
		/* Reference: keys in f16. */
		for (l = 0; l < c.nl; l++)
			tk[l] = KVQ_KV_F16;
		ret = run_prompt(&c, (int)p, tk, c.ref[p]);
		if (ret)
			goto out;
		{
			double s = 0, s2 = 0;

			for (v = 0; v < c.nv; v++) {
				s += c.ref[p][v];
				s2 += (double)c.ref[p][v] * c.ref[p][v];
			}
			s /= c.nv;
			c.ref_std[p] = sqrt(fmax(s2 / c.nv - s * s, 0));
		}
		have++;
	}
	ret = -EINVAL;
	if (!have)
		goto out;

	for (l = 0; l < c.nl; l++)
		tk[l] = KVQ_KV_Q8;
	if ((ret = measure(&c, tk, &r.err_q8, &r.kl_q8)))
		goto out;
	for (l = 0; l < c.nl; l++)
		tk[l] = KVQ_KV_Q4;
	if ((ret = measure(&c, tk, &r.err_q4, &r.kl_q4)))
		goto out;
	r.ratio = r.err_q8 > 0 ? r.err_q4 / r.err_q8 : INFINITY;

	if (r.kl_q4 <= co->kl_q4 && r.ratio <= co->ratio_max * 127.0 / 7.0) {
		memcpy(types_k, tk, c.nl);
		r.err_final = r.err_q4;
		r.kl_final = r.kl_q4;
	} else {
		uint8_t hi = r.kl_q8 <= co->kl_q8 ? KVQ_KV_Q8 : KVQ_KV_F16;

		for (l = 0; l < c.nl; l++)
			types_k[l] = hi;
		r.err_final = hi == KVQ_KV_Q8 ? r.err_q8 : 0;
		r.kl_final = hi == KVQ_KV_Q8 ? r.kl_q8 : 0;
		if (co->per_layer && c.nl > 1) {
			le = calloc(c.nl, sizeof(*le));
			if (!le)
				goto out;
			for (l = 0; l < c.nl; l++) {
				uint32_t j;

				for (j = 0; j < c.nl; j++)
					tk[j] = hi;
				tk[l] = KVQ_KV_Q4;
				le[l].layer = l;
				if ((ret = measure(&c, tk, &dummy, &le[l].err)))
					goto out;
			}
			/* Least sensitive first, while the summed KL stays
			 * within the q4 bound. */
			qsort(le, c.nl, sizeof(*le), cmp_err);
			sum = 0;
			for (l = 0; l < c.nl; l++) {
				if (sum + le[l].err > co->kl_q4)
					break;
				sum += le[l].err;
				types_k[le[l].layer] = KVQ_KV_Q4;
			}
			if (l > 0)
				if ((ret = measure(&c, types_k, &r.err_final,
						   &r.kl_final)))
					goto out;
		}
	}
	for (l = 0; l < c.nl; l++) {
		r.n_q4 += types_k[l] == KVQ_KV_Q4;
		r.n_q8 += types_k[l] == KVQ_KV_Q8;
		r.n_f16 += types_k[l] == KVQ_KV_F16;
	}
	if (r.n_q4 == c.nl)
		snprintf(r.decision, sizeof(r.decision), "q4");
	else if (r.n_q8 == c.nl)
		snprintf(r.decision, sizeof(r.decision), "q8");
	else if (r.n_f16 == c.nl)
		snprintf(r.decision, sizeof(r.decision), "f16");
	else
		snprintf(r.decision, sizeof(r.decision),
			 "mixed: %u q4, %u q8, %u f16", r.n_q4, r.n_q8, r.n_f16);
	r.seconds = now_s() - t0;
	kvq_notice("KV key calibration: keys %s (err q8 %.4g, q4 %.4g, ratio %.3g; KL q8 %.3g, q4 %.3g, final %.3g; %.2f s)",
		   r.decision, r.err_q8, r.err_q4, r.ratio, r.kl_q8, r.kl_q4,
		   r.kl_final, r.seconds);
	if (rep)
		*rep = r;
	ret = 0;
out:
	if (ret)
		for (l = 0; l < c.nl; l++)
			types_k[l] = KVQ_KV_Q8;
	for (p = 0; p < N_PROMPTS; p++) {
		free(c.ids[p]);
		free(c.ref[p]);
	}
	free(c.lg);
	free(le);
	return ret;
}

int kvq_kv_calibrate_keys(struct kvq_model *m, const struct kvq_ctx_opts *base,
			  uint8_t *types_k, struct kvq_kv_calib_report *rep)
{
	struct kvq_kv_calib_opts co;

	kvq_kv_calib_opts_default(&co);
	return kvq_kv_calibrate_keys_opts(m, base, &co, types_k, rep);
}
