/*
 * oneshot.c - generate, tokenize or dump logits, then exit (see oneshot.h).
 *
 * Output contract: stdout carries only the result (generated text, token
 * ids); everything else goes to stderr through the log.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "daemon/oneshot.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/quant.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "kernels/gpu.h"

#define MAX_STOPS 8

struct oneshot {
	const char *model;
	const char *prompt;
	const char *tokenize;
	const char *dump_logits;
	const char *prompt_ids;
	const char *device;
	int max_tokens;
	int threads;
	int n_ctx;
	bool print_ids;
	bool bench_json;
	bool ignore_eos;
	bool verbose;
	struct kvq_sampler_params sp;
	char *stops[MAX_STOPS];
	int n_stops;
};

enum {
	OPT_PROMPT = 256, OPT_TOKENIZE, OPT_DUMP_LOGITS, OPT_PROMPT_IDS,
	OPT_MAX_TOKENS, OPT_TEMPERATURE, OPT_SEED, OPT_TOP_K, OPT_TOP_P,
	OPT_MIN_P, OPT_STOP, OPT_PRINT_IDS, OPT_BENCH_JSON, OPT_IGNORE_EOS,
	OPT_THREADS, OPT_CTX, OPT_MODEL, OPT_VERBOSE, OPT_DEVICE,
};

static const struct option oneshot_opts[] = {
	{ "model", required_argument, NULL, OPT_MODEL },
	{ "prompt", required_argument, NULL, OPT_PROMPT },
	{ "tokenize", required_argument, NULL, OPT_TOKENIZE },
	{ "dump-logits", required_argument, NULL, OPT_DUMP_LOGITS },
	{ "prompt-ids", required_argument, NULL, OPT_PROMPT_IDS },
	{ "max-tokens", required_argument, NULL, OPT_MAX_TOKENS },
	{ "temperature", required_argument, NULL, OPT_TEMPERATURE },
	{ "seed", required_argument, NULL, OPT_SEED },
	{ "top-k", required_argument, NULL, OPT_TOP_K },
	{ "top-p", required_argument, NULL, OPT_TOP_P },
	{ "min-p", required_argument, NULL, OPT_MIN_P },
	{ "stop", required_argument, NULL, OPT_STOP },
	{ "print-ids", no_argument, NULL, OPT_PRINT_IDS },
	{ "bench-json", no_argument, NULL, OPT_BENCH_JSON },
	{ "ignore-eos", no_argument, NULL, OPT_IGNORE_EOS },
	{ "threads", required_argument, NULL, OPT_THREADS },
	{ "ctx", required_argument, NULL, OPT_CTX },
	{ "device", required_argument, NULL, OPT_DEVICE },
	{ "verbose", no_argument, NULL, OPT_VERBOSE },
	{ NULL, 0, NULL, 0 },
};

bool kvq_oneshot_wanted(int argc, char **argv)
{
	static const char *const modes[] = {
		"--prompt", "--tokenize", "--dump-logits",
	};
	int i;
	size_t j;

	for (i = 1; i < argc; i++)
		for (j = 0; j < sizeof(modes) / sizeof(modes[0]); j++)
			if (!strncmp(argv[i], modes[j], strlen(modes[j])) &&
			    (argv[i][strlen(modes[j])] == '\0' ||
			     argv[i][strlen(modes[j])] == '='))
				return true;
	return false;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int parse_num(const char *opt, const char *s, double lo, double hi,
		     double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= lo && v <= hi)) {
		fprintf(stderr, "kvqd: --%s: invalid value \"%s\" (expected %g..%g)\n",
			opt, s, lo, hi);
		return -EINVAL;
	}
	*out = v;
	return 0;
}

static int parse_args(struct oneshot *o, int argc, char **argv)
{
	double v;
	int c;

	kvq_sampler_params_default(&o->sp);
	o->max_tokens = 128;
	o->device = "auto";
	optind = 1;
	while ((c = getopt_long(argc, argv, "", oneshot_opts, NULL)) != -1) {
		switch (c) {
		case OPT_MODEL: o->model = optarg; break;
		case OPT_PROMPT: o->prompt = optarg; break;
		case OPT_TOKENIZE: o->tokenize = optarg; break;
		case OPT_DUMP_LOGITS: o->dump_logits = optarg; break;
		case OPT_PROMPT_IDS: o->prompt_ids = optarg; break;
		case OPT_PRINT_IDS: o->print_ids = true; break;
		case OPT_BENCH_JSON: o->bench_json = true; break;
		case OPT_IGNORE_EOS: o->ignore_eos = true; break;
		case OPT_VERBOSE: o->verbose = true; break;
		case OPT_DEVICE: o->device = optarg; break;
		case OPT_STOP:
			if (o->n_stops == MAX_STOPS) {
				fprintf(stderr, "kvqd: --stop: at most %d stop strings\n",
					MAX_STOPS);
				return -EINVAL;
			}
			o->stops[o->n_stops++] = optarg;
			break;
		case OPT_MAX_TOKENS:
			if (parse_num("max-tokens", optarg, 0, 1 << 24, &v))
				return -EINVAL;
			o->max_tokens = (int)v;
			break;
		case OPT_TEMPERATURE:
			if (parse_num("temperature", optarg, 0, 100, &v))
				return -EINVAL;
			o->sp.temperature = (float)v;
			break;
		case OPT_SEED:
			if (parse_num("seed", optarg, 0, 18446744073709551615.0, &v))
				return -EINVAL;
			o->sp.seed = strtoull(optarg, NULL, 10);
			break;
		case OPT_TOP_K:
			if (parse_num("top-k", optarg, 0, 1 << 30, &v))
				return -EINVAL;
			o->sp.top_k = (int32_t)v;
			break;
		case OPT_TOP_P:
			if (parse_num("top-p", optarg, 0, 1, &v))
				return -EINVAL;
			o->sp.top_p = (float)v;
			break;
		case OPT_MIN_P:
			if (parse_num("min-p", optarg, 0, 1, &v))
				return -EINVAL;
			o->sp.min_p = (float)v;
			break;
		case OPT_THREADS:
			if (parse_num("threads", optarg, 0, 1024, &v))
				return -EINVAL;
			o->threads = (int)v;
			break;
		case OPT_CTX:
			if (parse_num("ctx", optarg, 1, 1 << 24, &v))
				return -EINVAL;
			o->n_ctx = (int)v;
			break;
		default:
			fprintf(stderr, "kvqd: unknown option in one-shot mode: %s\n",
				argv[optind - 1]);
			return -EINVAL;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "kvqd: unexpected argument \"%s\"\n", argv[optind]);
		return -EINVAL;
	}
	return 0;
}

/* Parses "1 2 3" into a new array. */
static int parse_ids(const char *s, int32_t **out, int *n)
{
	int cap = 64, k = 0;
	int32_t *ids = malloc(cap * sizeof(*ids));
	char *end;

	if (!ids)
		return -ENOMEM;
	for (;;) {
		long v;

		while (*s == ' ' || *s == ',' || *s == '\t' || *s == '\n')
			s++;
		if (!*s)
			break;
		errno = 0;
		v = strtol(s, &end, 10);
		if (end == s || errno || v < 0 || v > INT32_MAX) {
			fprintf(stderr, "kvqd: --prompt-ids: bad token id at \"%.16s\"\n", s);
			free(ids);
			return -EINVAL;
		}
		if (k == cap) {
			int32_t *p = realloc(ids, (cap *= 2) * sizeof(*ids));

			if (!p) {
				free(ids);
				return -ENOMEM;
			}
			ids = p;
		}
		ids[k++] = (int32_t)v;
		s = end;
	}
	*out = ids;
	*n = k;
	return 0;
}

static int do_tokenize(struct kvq_tokenizer *tok, const char *text)
{
	size_t len = strlen(text);
	int cap = (int)len + 16, n, i;
	int32_t *ids = malloc(cap * sizeof(*ids));

	if (!ids)
		return 1;
	n = kvq_tokenize(tok, text, len, ids, cap);
	if (n < 0) {
		fprintf(stderr, "kvqd: cannot tokenize: %s\n", strerror(-n));
		free(ids);
		return 1;
	}
	for (i = 0; i < n; i++)
		printf("%s%d", i ? " " : "", ids[i]);
	printf("\n");
	free(ids);
	return 0;
}

/* Runs @n tokens of one sequence through the model in max_batch chunks;
 * logits of the last token (or of every token, when @all) land in @logits. */
static int prefill(struct kvq_ctx *ctx, int seq, const int32_t *ids, int n,
		   bool all, float *logits, uint32_t n_vocab)
{
	int chunk = (int)kvq_ctx_max_batch(ctx), done = 0;

	while (done < n) {
		int k = n - done < chunk ? n - done : chunk;
		const int32_t *tp = ids + done;
		struct kvq_batch b = {
			.n = 1, .seq = &seq, .n_tokens = &k, .tokens = &tp,
			.all_logits = all,
		};
		int ret = kvq_step(ctx, &b, all ? logits + (size_t)done * n_vocab
					       : logits);

		if (ret)
			return ret;
		done += k;
	}
	return 0;
}

static int do_dump_logits(struct kvq_model *m, struct oneshot *o)
{
	uint32_t nv = kvq_model_hparams(m)->n_vocab;
	struct kvq_ctx_opts co = { .n_ctx = (uint32_t)o->n_ctx };
	struct kvq_ctx *ctx = NULL;
	float *logits = NULL;
	int32_t *ids = NULL;
	char err[512];
	int n = 0, seq, ret = 1;
	FILE *f = NULL;

	if (!o->prompt_ids) {
		fprintf(stderr, "kvqd: --dump-logits needs --prompt-ids\n");
		return 1;
	}
	if (parse_ids(o->prompt_ids, &ids, &n))
		return 1;
	if (!n) {
		fprintf(stderr, "kvqd: --prompt-ids: no token ids\n");
		goto out;
	}
	if (kvq_ctx_create(m, &co, &ctx, err, sizeof(err))) {
		fprintf(stderr, "kvqd: %s\n", err);
		goto out;
	}
	logits = malloc((size_t)n * nv * sizeof(float));
	seq = kvq_seq_create(ctx);
	if (!logits || seq < 0)
		goto out;
	if (prefill(ctx, seq, ids, n, true, logits, nv)) {
		fprintf(stderr, "kvqd: --prompt-ids: a token id is outside the vocabulary (%u) or the context is too short\n",
			nv);
		goto out;
	}
	f = fopen(o->dump_logits, "wb");
	if (!f || fwrite(logits, sizeof(float), (size_t)n * nv, f) !=
			  (size_t)n * nv || fclose(f)) {
		fprintf(stderr, "kvqd: %s: cannot write: %s\n", o->dump_logits,
			strerror(errno));
		f = NULL;
		goto out;
	}
	f = NULL;
	ret = 0;
out:
	if (f)
		fclose(f);
	free(logits);
	free(ids);
	kvq_ctx_destroy(ctx);
	return ret;
}

static int do_generate(struct kvq_model *m, struct oneshot *o)
{
	struct kvq_tokenizer *tok = kvq_model_tokenizer(m);
	uint32_t nv = kvq_model_hparams(m)->n_vocab;
	struct kvq_ctx_opts co = { .n_ctx = (uint32_t)o->n_ctx };
	struct kvq_ctx *ctx = NULL;
	struct kvq_sampler smp;
	struct kvq_detok dt;
	float *logits = NULL;
	int32_t *ids = NULL;
	char *text = NULL;
	size_t tlen = 0, tcap = 0, emitted = 0;
	char err[512], piece[512];
	int n = 0, cap, seq, gen = 0, ret = 1, k;
	double t0, t1, t2;
	bool stopped = false;

	if (kvq_sampler_init(&smp, &o->sp, (int32_t)nv)) {
		fprintf(stderr, "kvqd: invalid sampling parameters\n");
		return 1;
	}
	cap = (int)strlen(o->prompt) + 16;
	ids = malloc(cap * sizeof(*ids));
	if (!ids)
		goto out;
	if (!o->prompt[0] || kvq_tokenizer_add_bos(tok)) {
		if (kvq_tokenizer_bos(tok) < 0 && !o->prompt[0]) {
			fprintf(stderr, "kvqd: empty prompt and the model has no BOS token\n");
			goto out;
		}
		if (kvq_tokenizer_bos(tok) >= 0)
			ids[n++] = kvq_tokenizer_bos(tok);
	}
	k = kvq_tokenize(tok, o->prompt, strlen(o->prompt), ids + n, cap - n);
	if (k < 0 || k > cap - n) {
		fprintf(stderr, "kvqd: cannot tokenize the prompt\n");
		goto out;
	}
	n += k;
	if (kvq_ctx_create(m, &co, &ctx, err, sizeof(err))) {
		fprintf(stderr, "kvqd: %s\n", err);
		goto out;
	}
	if ((uint32_t)n >= kvq_ctx_n_ctx(ctx)) {
		fprintf(stderr, "kvqd: the prompt has %d tokens; the context holds %u\n",
			n, kvq_ctx_n_ctx(ctx));
		goto out;
	}
	logits = malloc(nv * sizeof(float));
	seq = kvq_seq_create(ctx);
	if (!logits || seq < 0)
		goto out;
	t0 = now_s();
	if (prefill(ctx, seq, ids, n, false, logits, nv)) {
		fprintf(stderr, "kvqd: prompt processing failed\n");
		goto out;
	}
	t1 = now_s();
	kvq_detok_init(&dt, tok);
	while (gen < o->max_tokens && !stopped) {
		int32_t id = kvq_sampler_sample(&smp, logits, NULL);
		int pl, one = 1;
		const int32_t *tp = &id;
		struct kvq_batch b = {
			.n = 1, .seq = &seq, .n_tokens = &one, .tokens = &tp,
		};

		if (!o->ignore_eos && kvq_tokenizer_is_eog(tok, id))
			break;
		gen++;
		if (o->print_ids) {
			printf("%s%d", gen > 1 ? " " : "", id);
		} else {
			pl = kvq_detok_push(&dt, id, piece, sizeof(piece));
			if (pl > 0) {
				if (tlen + pl + 1 > tcap) {
					char *p;

					tcap = (tlen + pl + 1) * 2;
					p = realloc(text, tcap);
					if (!p)
						goto out;
					text = p;
				}
				memcpy(text + tlen, piece, pl);
				tlen += pl;
				if (o->n_stops) {
					long at = kvq_stop_check(text, tlen,
						o->stops, o->n_stops);

					if (at >= 0) {
						tlen = (size_t)at;
						stopped = true;
					}
				}
				/* Hold back what may start a stop string. */
				{
					size_t hold = o->n_stops ? kvq_stop_partial(
						text, tlen, o->stops, o->n_stops) : 0;

					if (stopped)
						hold = 0;
					if (tlen - hold > emitted) {
						fwrite(text + emitted, 1,
						       tlen - hold - emitted, stdout);
						emitted = tlen - hold;
					}
				}
			}
			if (!o->bench_json)
				fflush(stdout);
		}
		if (stopped || gen == o->max_tokens)
			break;
		if ((uint32_t)kvq_seq_len(ctx, seq) >= kvq_ctx_n_ctx(ctx)) {
			kvq_warn("context of %u tokens is full; stopping",
				 kvq_ctx_n_ctx(ctx));
			break;
		}
		if (kvq_step(ctx, &b, logits)) {
			fprintf(stderr, "kvqd: decode step failed\n");
			goto out;
		}
	}
	if (!o->print_ids && !stopped) {
		k = kvq_detok_flush(&dt, piece, sizeof(piece));
		if (tlen > emitted)
			fwrite(text + emitted, 1, tlen - emitted, stdout);
		if (k > 0)
			fwrite(piece, 1, k, stdout);
	}
	printf("\n");
	fflush(stdout);
	t2 = now_s();
	if (o->bench_json) {
		struct rusage ru;

		getrusage(RUSAGE_SELF, &ru);
		fprintf(stderr,
			"{\"prompt_tokens\": %d, \"prompt_s\": %.6f, \"prompt_tps\": %.3f, "
			"\"decode_tokens\": %d, \"decode_s\": %.6f, \"decode_tps\": %.3f, "
			"\"weight_bytes\": %llu, \"kv_bytes\": %llu, \"peak_rss_bytes\": %llu, "
			"\"simd\": \"%s\"}\n",
			n, t1 - t0, n / (t1 - t0), gen > 0 ? gen - 1 : 0, t2 - t1,
			gen > 1 ? (gen - 1) / (t2 - t1) : 0.0,
			(unsigned long long)kvq_model_weight_bytes(m),
			(unsigned long long)kvq_ctx_kv_bytes_used(ctx),
			(unsigned long long)ru.ru_maxrss * 1024ull,
			kvq_quant_simd_name());
	}
	ret = 0;
out:
	kvq_sampler_fini(&smp);
	free(text);
	free(logits);
	free(ids);
	kvq_ctx_destroy(ctx);
	return ret;
}

int kvq_oneshot_main(int argc, char **argv)
{
	struct kvq_model_opts mo = { 0 };
	struct kvq_model *m = NULL;
	struct oneshot o = { 0 };
	char err[512];
	int ret;

	if (parse_args(&o, argc, argv))
		return 2;
	kvq_log_set_level(o.verbose ? KVQ_LOG_INFO : KVQ_LOG_WARNING);
	if (!o.model) {
		fprintf(stderr, "kvqd: --model FILE is required in one-shot mode\n");
		return 2;
	}
	if (strcmp(o.device, "auto") && strcmp(o.device, "cpu")) {
		fprintf(stderr, "kvqd: --device %s: this build runs models on the CPU only (GPU backend: %s)\n",
			o.device, kvq_gpu_backend_name());
		return 2;
	}
	mo.n_threads = o.threads;
	mo.vocab_only = o.tokenize != NULL;
	ret = kvq_model_load(o.model, &mo, &m, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "kvqd: %s\n", err);
		return 1;
	}
	kvq_info("model: %s", kvq_model_desc(m));
	kvq_info("device: cpu (%s dot products)", kvq_quant_simd_name());
	if (o.tokenize)
		ret = do_tokenize(kvq_model_tokenizer(m), o.tokenize);
	else if (o.dump_logits)
		ret = do_dump_logits(m, &o);
	else
		ret = do_generate(m, &o);
	kvq_model_destroy(m);
	return ret;
}
