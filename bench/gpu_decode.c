/*
 * gpu_decode.c - end-to-end decode tokens/s of kvqd's GPU forward pass,
 * against the memory-bandwidth bound measured in the same run (JSON).
 *
 * For each model, KV setting, batch and context: a GPU context holds
 * `batch` sequences, each filled with `ctx` tokens of synthetic KV (the
 * kvq_seq_fill_synthetic() shortcut: a real prefill of 32K tokens would
 * only add minutes to the run, and decode cost does not depend on the
 * values), then `steps` decode steps through kvq_step() -- the same call
 * the daemon makes, logits copied back to the host every step (into the
 * context's pinned rows, kvq_ctx_logits_buffer(), as the daemon has them)
 * -- are timed.  The bound is (weight bytes a step reads + KV bytes of every
 * sequence) / the streaming-read bandwidth of this GPU, measured here.
 * "device_us_per_step" is the device's own time a step (events at its
 * first upload and last copy back); step_us less that is what the
 * host's turn between steps leaves the GPU idle.
 *
 * Then, per model and KV setting, prefill: a prompt of `prefill` tokens
 * (default 1024) fed in steps of `prefill-chunk` tokens (default 256, the
 * daemon's prefill_chunk) on one new sequence, timed to the last step's
 * logits; with cuBLAS for the f16 products and with KVQ_GPU_NO_CUBLAS (the
 * tiled kernel), the two alternating, best of five each ("prefill" in the
 * JSON; --prefill 0 skips it).
 *
 * With --sample, each decode run also times, after those steps, steps
 * that choose tokens two ways, alternating in blocks of 8 steps: on the
 * host from the copied logits (kvq_step() then kvq_sampler_sample() per
 * row, "host_sample_tok_s") and as kvqd does (kvq_step_sample(): on the
 * device, ids alone copied back, where it judges that faster;
 * "step_sample_tok_s"); `steps` steps each with kvq_sampler_params_default()
 * (T 0.8, top-k 40, top-p 0.95, min-p 0.05), then as many over the whole
 * vocabulary at T 0.8 (the HTTP API's defaults; "..._full_tok_s"), then
 * greedy ("..._greedy_tok_s").
 *
 * Usage: gpu_decode --model F [--model F ...] [--batch 1,4,16]
 *                   [--ctx 1024,32768] [--kv q4/q4,f16/f16] [--steps 64]
 *                   [--prefill 1024] [--prefill-chunk 256] [--sample]
 *                   [--dot exact,int8]
 *
 * --dot: each decode run once per dot mode (engine/quant.h; on the GPU,
 * int8 applies to one-token products of 8- and 4-bit weights), the modes
 * in turn at each shape so that they share the GPU's state; "dot" in the
 * JSON.  Default: exact.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/forward_gpu.h"
#include "engine/kvcache.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/quant.h"
#include "engine/sampler.h"
#include "kernels/gpu.h"

double kvq_bench_read_gbps(size_t bytes, int reps);

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_list(const char *s, long *out, int cap)
{
	int n = 0;

	while (*s && n < cap) {
		char *e;

		out[n++] = strtol(s, &e, 10);
		s = *e == ',' ? e + 1 : e;
		if (e == s && *s)
			break;
	}
	return n;
}

static void usage(void)
{
	fprintf(stderr, "usage: gpu_decode --model F [--model F ...] [--batch 1,4,16] [--ctx 1024,32768] [--kv q4/q4,f16/f16] [--steps N] [--prefill N] [--prefill-chunk N] [--sample] [--dot exact,int8]\n");
	exit(2);
}

/* Context options with the KV types of @kv ("q4/q4"); -EINVAL if bad. */
static int kv_opts(const char *kv, struct kvq_ctx_opts *o)
{
	char kt[8], vt[8];
	enum kvq_kv_type k, v;

	if (sscanf(kv, "%7[^/]/%7s", kt, vt) != 2 ||
	    kvq_kv_type_parse(kt, &k) || kvq_kv_type_parse(vt, &v)) {
		fprintf(stderr, "gpu_decode: bad --kv %s\n", kv);
		return -EINVAL;
	}
	kvq_ctx_opts_default(o);
	o->kv_type_k = k;
	o->kv_type_v = v;
	return 0;
}

/*
 * --sample: @steps steps sampling with settings @p on the host and as
 * many through kvq_step_sample(), alternating blocks of 8; tokens/s of
 * each into @tps[0] (host) and @tps[1] (kvq_step_sample()).  Returns 0 or
 * -errno.
 */
static int time_sampling(struct kvq_ctx *c, struct kvq_batch *b,
			 int32_t *toks, uint32_t n_vocab, float *logits,
			 int steps, struct kvq_sampler_params p, double tps[2])
{
	struct kvq_sampler smp[64], *sp[64];
	double t[2] = { 0, 0 }, t0;
	int32_t ids[64];
	int i, s, k, ret = 0;

	for (i = 0; i < b->n; i++) {
		p.seed = 1000 + (uint64_t)i;
		ret |= kvq_sampler_init(&smp[i], &p, (int32_t)n_vocab);
		sp[i] = &smp[i];
	}
	for (s = 0; s < steps && !ret; s += 8) {
		for (k = 0; k < 2 && !ret; k++) {
			t0 = now();
			for (int j = 0; j < 8 && !ret; j++) {
				if (k) {
					ret = kvq_step_sample(c, b, sp, ids, NULL);
				} else {
					ret = kvq_step(c, b, logits);
					for (i = 0; i < b->n && !ret; i++)
						ids[i] = kvq_sampler_sample(&smp[i],
							logits + (size_t)i * n_vocab, NULL);
				}
				for (i = 0; i < b->n; i++)
					toks[i] = ids[i];
			}
			t[k] += now() - t0;
		}
	}
	for (i = 0; i < b->n; i++)
		kvq_sampler_fini(&smp[i]);
	for (k = 0; k < 2; k++)
		tps[k] = t[k] > 0 ? (double)((steps + 7) / 8 * 8) * b->n / t[k] :
			 0.0;
	return ret;
}

/* One run; prints its JSON object.  Returns 0 or -errno. */
static int run(struct kvq_model *m, const char *mname, const char *kv,
	       int batch, int ctx, int steps, int sample, double gbps,
	       int *first)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	struct kvq_ctx_opts o;
	struct kvq_ctx *c = NULL;
	char err[256], desc[512];
	int seqs[64], ns[64], i, s, ret;
	int32_t toks[64];
	const int32_t *tp[64];
	struct kvq_batch b = { 0 };
	float *logits = NULL, *lgp;
	size_t lr;
	double t0, dt, kvb, wb, bound, tps[2] = { 0, 0 }, tpf[2] = { 0, 0 };
	double tpg[2] = { 0, 0 }, busy;
	struct kvq_sampler_params sp;
	char sjson[384] = "";

	if (kv_opts(kv, &o))
		return -EINVAL;
	o.n_ctx = (uint32_t)(ctx + (sample ? 7 : 1) * (steps + 8) + 8);
	o.kv_tokens = o.n_ctx * (uint32_t)batch;
	o.max_seqs = (uint32_t)batch;
	o.max_batch = 64;
	o.device = KVQ_CTX_GPU;
	ret = kvq_ctx_create(m, &o, &c, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "gpu_decode: %s batch %d ctx %d: %s\n", kv, batch,
			ctx, err);
		return ret;
	}
	logits = malloc((size_t)batch * hp->n_vocab * sizeof(float));
	/* As kvqd's scheduler: the context's pinned rows where it has them
	 * (the logits reach them without a copy on the host). */
	lgp = kvq_ctx_logits_buffer(c, &lr);
	if (!lgp || lr < (size_t)batch)
		lgp = logits;
	for (i = 0; i < batch; i++) {
		seqs[i] = kvq_seq_create(c);
		ret = kvq_seq_fill_synthetic(c, seqs[i], (uint32_t)ctx);
		if (ret)
			goto out;
		ns[i] = 1;
		toks[i] = (int32_t)((i * 31 + 7) % hp->n_vocab);
		tp[i] = &toks[i];
	}
	b.n = batch;
	b.seq = seqs;
	b.n_tokens = ns;
	b.tokens = tp;
	/* Warm-up: the first steps capture the CUDA graphs. */
	for (s = 0; s < 4; s++) {
		ret = kvq_step(c, &b, lgp);
		if (ret)
			goto out;
	}
	busy = kvq_ctx_device_busy_us(c);
	t0 = now();
	for (s = 0; s < steps; s++) {
		ret = kvq_step(c, &b, lgp);
		if (ret)
			goto out;
	}
	dt = now() - t0;
	busy = kvq_ctx_device_busy_us(c) - busy;
	if (sample) {
		kvq_sampler_params_default(&sp);
		ret = time_sampling(c, &b, toks, hp->n_vocab, lgp, steps,
				    sp, tps);
		sp.top_k = 0;
		sp.top_p = 1.0f;
		sp.min_p = 0.0f;
		ret = ret ? ret : time_sampling(c, &b, toks, hp->n_vocab, lgp,
						steps, sp, tpf);
		sp.temperature = 0.0f;
		ret = ret ? ret : time_sampling(c, &b, toks, hp->n_vocab, lgp,
						steps, sp, tpg);
		if (ret)
			goto out;
		snprintf(sjson, sizeof(sjson),
			 ", \"host_sample_tok_s\": %.1f, \"step_sample_tok_s\": %.1f"
			 ", \"host_sample_full_tok_s\": %.1f, \"step_sample_full_tok_s\": %.1f"
			 ", \"host_sample_greedy_tok_s\": %.1f, \"step_sample_greedy_tok_s\": %.1f",
			 tps[0], tps[1], tpf[0], tpf[1], tpg[0], tpg[1]);
	}
	wb = (double)kvq_model_gpu_step_bytes(m);
	kvb = (double)kvq_ctx_kv_bytes_per_token(c) * (ctx + 4 + steps / 2.0) *
	      batch;
	bound = gbps * 1e9 / (wb + kvb) * batch;
	kvq_ctx_describe(c, desc, sizeof(desc));
	printf("%s\n  {\"model\": \"%s\", \"kv\": \"%s\", \"dot\": \"%s\", \"batch\": %d, \"ctx\": %d, \"steps\": %d, "
	       "\"step_us\": %.1f, \"tok_s\": %.1f, \"weight_bytes_per_step\": %.0f, "
	       "\"kv_bytes_per_step\": %.0f, \"bound_tok_s\": %.1f, \"pct_of_bound\": %.1f, "
	       "\"device_us_per_step\": %.1f%s, \"gpu\": \"%s\"}",
	       *first ? "" : ",", mname, kv,
	       kvq_quant_dot_mode_name(kvq_quant_dot_mode()), batch, ctx,
	       steps, dt / steps * 1e6,
	       steps * batch / dt, wb, kvb, bound,
	       100.0 * (steps * batch / dt) / bound, busy / steps, sjson, desc);
	*first = 0;
	fflush(stdout);
out:
	if (ret)
		fprintf(stderr, "gpu_decode: %s batch %d ctx %d: error %d\n", kv,
			batch, ctx, ret);
	free(logits);
	kvq_ctx_destroy(c);
	return ret;
}

/* Seconds to prefill @tok (@n tokens) on a new sequence of @c, in steps
 * of @chunk; negative on failure. */
static double prefill_once(struct kvq_ctx *c, const int32_t *tok, int n,
			   int chunk, float *logits)
{
	struct kvq_batch b = { 0 };
	int seq = kvq_seq_create(c), p, k, ret = 0;
	const int32_t *tp;
	double t0 = now();

	if (seq < 0)
		return -1.0;
	b.n = 1;
	b.seq = &seq;
	b.n_tokens = &k;
	b.tokens = &tp;
	for (p = 0; p < n && !ret; p += k) {
		k = n - p < chunk ? n - p : chunk;
		tp = tok + p;
		ret = kvq_step(c, &b, logits);
	}
	t0 = now() - t0;
	kvq_seq_free(c, seq);
	return ret ? -1.0 : t0;
}

/*
 * Prefill of @n tokens with cuBLAS and with the tiled kernel
 * (KVQ_GPU_NO_CUBLAS, read when a context is made); prints one JSON object
 * to @out.  Returns 0 or -errno.
 */
static int prefill(struct kvq_model *m, const char *mname, const char *kv,
		   int n, int chunk, FILE *out, int *first)
{
	static const char *const side[2] = { "cublas", "tiled" };
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	struct kvq_ctx_opts o;
	struct kvq_ctx *c[2] = { NULL, NULL };
	double best[2] = { 1e30, 1e30 }, t;
	char err[256], desc[2][512];
	float *logits = malloc(hp->n_vocab * sizeof(float));
	int32_t *tok = malloc((size_t)n * sizeof(int32_t));
	int i, r, ret = 0;

	if (!logits || !tok || kv_opts(kv, &o)) {
		ret = -EINVAL;
		goto out;
	}
	for (i = 0; i < n; i++)
		tok[i] = (int32_t)((i * 31 + 7) % hp->n_vocab);
	o.n_ctx = (uint32_t)n + 8;
	o.kv_tokens = o.n_ctx;
	o.max_seqs = 1;
	o.max_batch = (uint32_t)chunk;
	o.device = KVQ_CTX_GPU;
	for (i = 0; i < 2 && !ret; i++) {
		if (i)
			setenv("KVQ_GPU_NO_CUBLAS", "1", 1);
		ret = kvq_ctx_create(m, &o, &c[i], err, sizeof(err));
		unsetenv("KVQ_GPU_NO_CUBLAS");
		if (ret)
			fprintf(stderr, "gpu_decode: prefill %s %s: %s\n", kv,
				side[i], err);
	}
	/* One untimed prefill each: cuBLAS picks and loads its kernels. */
	for (r = -1; r < 5 && !ret; r++) {
		for (i = 0; i < 2 && !ret; i++) {
			t = prefill_once(c[i], tok, n, chunk, logits);
			if (t < 0)
				ret = -EIO;
			else if (r >= 0 && t < best[i])
				best[i] = t;
		}
	}
	if (ret)
		goto out;
	for (i = 0; i < 2; i++)
		kvq_ctx_describe(c[i], desc[i], sizeof(desc[i]));
	fprintf(out, "%s\n  {\"model\": \"%s\", \"kv\": \"%s\", \"prompt\": %d, \"chunk\": %d, "
		"\"cublas_ms\": %.2f, \"cublas_tok_s\": %.0f, \"tiled_ms\": %.2f, \"tiled_tok_s\": %.0f, "
		"\"speedup\": %.2f, \"gpu_cublas\": \"%s\", \"gpu_tiled\": \"%s\"}",
		*first ? "" : ",", mname, kv, n, chunk, best[0] * 1e3,
		n / best[0], best[1] * 1e3, n / best[1], best[1] / best[0],
		desc[0], desc[1]);
	*first = 0;
out:
	if (ret)
		fprintf(stderr, "gpu_decode: prefill %s: error %d\n", kv, ret);
	kvq_ctx_destroy(c[0]);
	kvq_ctx_destroy(c[1]);
	free(logits);
	free(tok);
	return ret;
}

int main(int argc, char **argv)
{
	const char *models[8], *kvs = "q4/q4,q8/q4,f16/f16";
	long batches[8] = { 1, 4, 16 }, ctxs[8] = { 1024, 32768 };
	int n_models = 0, nb = 3, nc = 2, steps = 64, i, j, k, first = 1;
	int n_pre = 1024, chunk = 256, pfirst = 1, sample = 0, nd = 1, d;
	enum kvq_dot_mode dots[4] = { KVQ_DOT_EXACT };
	struct kvq_gpu_info gi;
	char why[256], kvbuf[256], *pjson = NULL;
	size_t plen = 0;
	FILE *pout;
	double gbps;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--model") && i + 1 < argc && n_models < 8)
			models[n_models++] = argv[++i];
		else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
			nb = parse_list(argv[++i], batches, 8);
		else if (!strcmp(argv[i], "--ctx") && i + 1 < argc)
			nc = parse_list(argv[++i], ctxs, 8);
		else if (!strcmp(argv[i], "--kv") && i + 1 < argc)
			kvs = argv[++i];
		else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
			steps = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--prefill") && i + 1 < argc)
			n_pre = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--prefill-chunk") && i + 1 < argc)
			chunk = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--sample"))
			sample = 1;
		else if (!strcmp(argv[i], "--dot") && i + 1 < argc) {
			char buf[64], *t;

			snprintf(buf, sizeof(buf), "%s", argv[++i]);
			for (nd = 0, t = strtok(buf, ","); t && nd < 4;
			     t = strtok(NULL, ","))
				if (kvq_quant_parse_dot_mode(t, &dots[nd++]))
					usage();
			if (!nd)
				usage();
		} else
			usage();
	}
	if (!n_models || steps <= 0 || n_pre < 0 || chunk <= 0)
		usage();
	if (kvq_gpu_probe(&gi, why, sizeof(why)) <= 0) {
		fprintf(stderr, "gpu_decode: %s\n", why);
		return 77;
	}
	kvq_log_set_level(KVQ_LOG_WARNING);
	/* Prefill objects are printed after the decode results. */
	pout = open_memstream(&pjson, &plen);
	if (!pout)
		return 1;
	gbps = kvq_bench_read_gbps((size_t)4 << 30, 5);
	printf("{\"device\": \"%s\", \"read_gbps\": %.1f,\n"
	       " \"peers_published\": {\"note\": \"llama.cpp CUDA, flash attention, f16 KV, on this H200 for the 1B F16 shape; not run here\", "
	       "\"batch1_short\": 514, \"batch1_1k\": 355, \"batch1_32k\": 92, \"batch4_32k_aggregate\": 218},\n"
	       " \"results\": [", gi.name, gbps);
	for (i = 0; i < n_models; i++) {
		struct kvq_model_opts mo = { 0 };
		struct kvq_model *m;
		const char *name = strrchr(models[i], '/');
		char err[256];

		name = name ? name + 1 : models[i];
		mo.n_threads = 2;
		if (kvq_model_load(models[i], &mo, &m, err, sizeof(err))) {
			fprintf(stderr, "gpu_decode: %s\n", err);
			return 1;
		}
		snprintf(kvbuf, sizeof(kvbuf), "%s", kvs);
		for (char *kv = strtok(kvbuf, ","); kv; kv = strtok(NULL, ",")) {
			for (j = 0; j < nc; j++)
				for (k = 0; k < nb; k++)
					for (d = 0; d < nd; d++) {
						kvq_quant_set_dot_mode(dots[d]);
						run(m, name, kv, (int)batches[k],
						    (int)ctxs[j], steps, sample,
						    gbps, &first);
					}
			kvq_quant_set_dot_mode(dots[0]);
			if (n_pre)
				prefill(m, name, kv, n_pre, chunk, pout,
					&pfirst);
		}
		kvq_model_destroy(m);
	}
	fclose(pout);
	printf("\n],\n \"prefill\": [%s\n]}\n", pjson ? pjson : "");
	free(pjson);
	return 0;
}
