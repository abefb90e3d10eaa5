/*
 * oneshot.c - generate, tokenize or dump logits, then exit (see oneshot.h).
 *
 * Output contract: stdout carries only the result (generated text, token
 * ids); everything else goes to stderr through the log.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "daemon/conf.h"
#include "daemon/oneshot.h"
#include "engine/fisher.h"
#include "engine/log.h"
#include "engine/kvcache.h"
#include "engine/kvcalib.h"
#include "engine/kvsmooth.h"
#include "engine/model.h"
#include "engine/perplexity.h"
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
	int ctx_device;		/* enum kvq_ctx_device, from --device */
	const char *perplexity;
	const char *kl_against;
	const char *kv_type_k;
	const char *kv_type_v;
	const char *fim;
	int kv_sink_tokens;
	int kv_page_tokens;
	int kv_smooth;		/* enum kvq_kv_smooth_mode */
	struct kvq_kv_smooth_report smooth;
	bool key_queries;	/* --kv-key-rounding queries */
	int max_tokens;
	int threads;
	int n_ctx;
	bool print_ids;
	bool bench_json;
	bool ignore_eos;
	bool verbose;
	bool ranks;
	bool json;
	struct kvq_sampler_params sp;
	char *stops[MAX_STOPS];
	int n_stops;
};

enum {
	OPT_PROMPT = 256, OPT_TOKENIZE, OPT_DUMP_LOGITS, OPT_PROMPT_IDS,
	OPT_MAX_TOKENS, OPT_TEMPERATURE, OPT_SEED, OPT_TOP_K, OPT_TOP_P,
	OPT_MIN_P, OPT_STOP, OPT_PRINT_IDS, OPT_BENCH_JSON, OPT_IGNORE_EOS,
	OPT_THREADS, OPT_CTX, OPT_MODEL, OPT_VERBOSE, OPT_DEVICE,
	OPT_PERPLEXITY, OPT_KL_AGAINST, OPT_KV_TYPE_K, OPT_KV_TYPE_V,
	OPT_KV_SINK, OPT_KV_PAGE, OPT_RANKS, OPT_JSON, OPT_FIM, OPT_DOT,
	OPT_KV_SMOOTH, OPT_KV_KEY_ROUNDING,
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
	{ "perplexity", required_argument, NULL, OPT_PERPLEXITY },
	{ "kl-against", required_argument, NULL, OPT_KL_AGAINST },
	{ "kv-type-k", required_argument, NULL, OPT_KV_TYPE_K },
	{ "kv-type-v", required_argument, NULL, OPT_KV_TYPE_V },
	{ "kv-sink-tokens", required_argument, NULL, OPT_KV_SINK },
	{ "kv-page-tokens", required_argument, NULL, OPT_KV_PAGE },
	{ "ranks", no_argument, NULL, OPT_RANKS },
	{ "json", no_argument, NULL, OPT_JSON },
	{ "fim", required_argument, NULL, OPT_FIM },
	{ "dot", required_argument, NULL, OPT_DOT },
	{ "kv-smooth", required_argument, NULL, OPT_KV_SMOOTH },
	{ "kv-key-rounding", required_argument, NULL, OPT_KV_KEY_ROUNDING },
	{ NULL, 0, NULL, 0 },
};

bool kvq_oneshot_wanted(int argc, char **argv)
{
	static const char *const modes[] = {
		"--prompt", "--tokenize", "--dump-logits", "--perplexity",
		"--ranks",
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
	o->kv_type_k = "q8";
	o->kv_type_v = "q4";
	o->kv_sink_tokens = 4;
	o->kv_page_tokens = 16;
	o->kv_smooth = KVQ_KV_SMOOTH_AUTO;
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
		case OPT_PERPLEXITY: o->perplexity = optarg; break;
		case OPT_KL_AGAINST: o->kl_against = optarg; break;
		case OPT_KV_TYPE_K: o->kv_type_k = optarg; break;
		case OPT_KV_TYPE_V: o->kv_type_v = optarg; break;
		case OPT_RANKS: o->ranks = true; break;
		case OPT_JSON: o->json = true; break;
		case OPT_FIM: o->fim = optarg; break;
		case OPT_DOT: {
			enum kvq_dot_mode mode;

			/* int8: quantized activations in matrix-vector products */
			if (kvq_quant_parse_dot_mode(optarg, &mode)) {
				fprintf(stderr, "kvqd: --dot: expected int8 or exact, got \"%s\"\n",
					optarg);
				return -EINVAL;
			}
			kvq_quant_set_dot_mode(mode);
			break;
		}
		case OPT_KV_SMOOTH: {
			enum kvq_kv_smooth_mode mode;

			if (kvq_kv_smooth_mode_parse(optarg, &mode)) {
				fprintf(stderr, "kvqd: --kv-smooth: expected auto, on or off, got \"%s\"\n",
					optarg);
				return -EINVAL;
			}
			o->kv_smooth = (int)mode;
			break;
		}
		case OPT_KV_KEY_ROUNDING:
			if (strcmp(optarg, "nearest") && strcmp(optarg, "queries")) {
				fprintf(stderr, "kvqd: --kv-key-rounding: expected nearest or queries, got \"%s\"\n",
					optarg);
				return -EINVAL;
			}
			o->key_queries = !strcmp(optarg, "queries");
			break;
		case OPT_KV_SINK:
			if (parse_num("kv-sink-tokens", optarg, 0, 64, &v))
				return -EINVAL;
			o->kv_sink_tokens = (int)v;
			break;
		case OPT_KV_PAGE:
			if (parse_num("kv-page-tokens", optarg, 1, 64, &v))
				return -EINVAL;
			o->kv_page_tokens = (int)v;
			break;
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
	if ((o->json || o->fim) && !o->ranks) {
		fprintf(stderr, "kvqd: --json and --fim go with --ranks\n");
		return -EINVAL;
	}
	return 0;
}

/* Per-layer type arrays for the context options (static: one model). */
static uint8_t kv_k[KVQ_KV_MAX_LAYERS], kv_v[KVQ_KV_MAX_LAYERS];

/*
 * Resolves the --kv-* settings for @m into @co (n_ctx from --ctx).  With
 * @k_spec/@v_spec NULL the command-line settings are used.
 */
static int ctx_opts(struct kvq_model *m, const struct oneshot *o,
		    const char *k_spec, const char *v_spec, uint8_t *kb,
		    uint8_t *vb, struct kvq_ctx_opts *co)
{
	uint32_t nl = kvq_model_hparams(m)->n_layers;
	char err[256];
	int r;

	memset(co, 0, sizeof(*co));
	co->device = o->ctx_device;
	co->n_ctx = (uint32_t)o->n_ctx;
	co->kv_page_tokens = (uint32_t)o->kv_page_tokens;
	co->kv_sink_tokens = (uint32_t)o->kv_sink_tokens;
	if (nl > KVQ_KV_MAX_LAYERS) {
		fprintf(stderr, "kvqd: the model has too many layers (%u)\n", nl);
		return -EINVAL;
	}
	r = kvq_kv_types_parse(k_spec ? k_spec : o->kv_type_k, nl, kb, err,
			       sizeof(err));
	if (r == 1) {
		r = kvq_kv_calibrate_keys(m, co, kb, NULL);
		if (r < 0)
			snprintf(err, sizeof(err), "calibration failed: %s",
				 strerror(-r));
	}
	if (r < 0) {
		fprintf(stderr, "kvqd: --kv-type-k: %s\n", err);
		return r;
	}
	r = kvq_kv_types_parse(v_spec ? v_spec : o->kv_type_v, nl, vb, err,
			       sizeof(err));
	if (r) {
		fprintf(stderr, "kvqd: --kv-type-v: %s\n",
			r == 1 ? "\"auto\" applies to keys only" : err);
		return -EINVAL;
	}
	co->kv_types_k = kb;
	co->kv_types_v = vb;
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
	struct kvq_ctx_opts co;
	struct kvq_ctx *ctx = NULL;
	float *logits = NULL;
	int32_t *ids = NULL;
	char err[512];
	int n = 0, seq, ret = 1;
	FILE *f = NULL;

	if (ctx_opts(m, o, NULL, NULL, kv_k, kv_v, &co))
		return 1;

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
	struct kvq_ctx_opts co;
	struct kvq_ctx *ctx = NULL;
	struct kvq_sampler smp, *sp = &smp;
	struct kvq_detok dt;
	float *logits = NULL;
	int32_t *ids = NULL, next;
	char *text = NULL;
	size_t tlen = 0, tcap = 0, emitted = 0;
	char err[512], piece[512];
	int n = 0, cap, seq, gen = 0, ret = 1, k;
	double t0, t1, t2;
	bool stopped = false;

	if (ctx_opts(m, o, NULL, NULL, kv_k, kv_v, &co))
		return 1;
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
	/* Generated text continues the prompt: keep its first space. */
	if (o->prompt[0])
		dt.first = false;
	/* The first token from the prompt's logits; the next ones from
	 * kvq_step_sample() (on a GPU, sampled there). */
	next = kvq_sampler_sample(&smp, logits, NULL);
	while (gen < o->max_tokens && !stopped) {
		int32_t id = next;
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
		if (kvq_step_sample(ctx, &b, &sp, &next, NULL)) {
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
			"\"simd\": \"%s\", \"dot\": \"%s\"}\n",
			n, t1 - t0, n / (t1 - t0), gen > 0 ? gen - 1 : 0, t2 - t1,
			gen > 1 ? (gen - 1) / (t2 - t1) : 0.0,
			(unsigned long long)kvq_model_weight_bytes(m),
			(unsigned long long)kvq_ctx_kv_bytes_used(ctx),
			(unsigned long long)ru.ru_maxrss * 1024ull,
			kvq_quant_simd_name(),
			kvq_quant_dot_mode_name(kvq_quant_dot_mode()));
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

static void ppl_progress(void *arg, uint32_t done, uint32_t total)
{
	if (isatty(STDERR_FILENO))
		fprintf(stderr, "\rperplexity: window %u/%u", done, total);
	if (done == total && isatty(STDERR_FILENO))
		fprintf(stderr, "\n");
}

/* Reads a whole text file into a NUL-terminated buffer. */
static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long sz;

	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (sz = ftell(f)) >= 0 &&
	    fseek(f, 0, SEEK_SET) == 0) {
		buf = malloc((size_t)sz + 1);
		if (buf && fread(buf, 1, (size_t)sz, f) == (size_t)sz) {
			buf[sz] = '\0';
			*len = (size_t)sz;
		} else {
			free(buf);
			buf = NULL;
		}
	}
	fclose(f);
	return buf;
}

/*
 * The reference of --kl-against: the model as the file has it.  When
 * smoothing changed @m's weights, a second, unsmoothed copy is loaded
 * (mapped: cheap) so that the baseline is the unsmoothed model; else @m.
 */
static int ref_model(struct kvq_model *m, struct oneshot *o,
		     struct kvq_model **out)
{
	struct kvq_model_opts mo = { .n_threads = o->threads };
	char err[512];

	*out = m;
	if (!o->smooth.keys && !o->smooth.values)
		return 0;
	if (kvq_model_load(o->model, &mo, out, err, sizeof(err))) {
		fprintf(stderr, "kvqd: reference model: %s\n", err);
		return -EINVAL;
	}
	return 0;
}

static int do_perplexity(struct kvq_model *m, struct oneshot *o)
{
	static uint8_t rk[KVQ_KV_MAX_LAYERS], rv[KVQ_KV_MAX_LAYERS];
	struct kvq_model *rm = m;
	struct kvq_ctx_opts co, ro;
	struct kvq_ppl_result res, sres;
	int32_t *ids = NULL;
	size_t len = 0;
	char *text, err[512];
	int n, ret = 1;
	uint32_t window;

	text = read_file(o->perplexity, &len);
	if (!text) {
		fprintf(stderr, "kvqd: %s: cannot read: %s\n", o->perplexity,
			strerror(errno));
		return 1;
	}
	if (ctx_opts(m, o, NULL, NULL, kv_k, kv_v, &co) ||
	    (o->kl_against && (ref_model(m, o, &rm) ||
			       ctx_opts(rm, o, o->kl_against, o->kl_against,
					rk, rv, &ro))))
		goto out;
	ids = malloc((len + 16) * sizeof(*ids));
	if (!ids)
		goto out;
	n = kvq_tokenize(kvq_model_tokenizer(m), text, len, ids, (int)len + 16);
	if (n < 0 || (size_t)n > len + 16) {
		fprintf(stderr, "kvqd: %s: cannot tokenize\n", o->perplexity);
		goto out;
	}
	window = o->n_ctx ? (uint32_t)o->n_ctx : kvq_model_hparams(m)->ctx_len;
	if (kvq_perplexity_ref(m, &co, rm, o->kl_against ? &ro : NULL, ids,
			       (uint32_t)n, window, &res, ppl_progress, NULL,
			       err, sizeof(err))) {
		fprintf(stderr, "kvqd: %s: %s\n", o->perplexity, err);
		goto out;
	}
	/* What the fold alone costs: the smoothed model with the reference
	 * cache against the unsmoothed one (about 0: the fold is exact). */
	if (rm != m && kvq_perplexity_ref(m, &ro, rm, &ro, ids, (uint32_t)n,
					  window, &sres, NULL, NULL, err,
					  sizeof(err))) {
		fprintf(stderr, "kvqd: %s: %s\n", o->perplexity, err);
		goto out;
	}
	printf("{\"file\": \"%s\", \"tokens\": %d, \"scored\": %llu, \"window\": %u, "
	       "\"kv_type_k\": \"%s\", \"kv_type_v\": \"%s\", "
	       "\"kv_bytes_per_token\": %llu, \"kv_smooth\": \"%s\", "
	       "\"smoothed\": \"%s\", \"kv_key_rounding\": \"%s\", "
	       "\"ppl\": %.6f",
	       o->perplexity, n, (unsigned long long)res.n_scored, window,
	       o->kv_type_k, o->kv_type_v,
	       (unsigned long long)res.kv_bytes_per_token,
	       kvq_kv_smooth_mode_name(o->kv_smooth), o->smooth.state,
	       o->key_queries ? "queries" : "nearest", res.ppl);
	if (o->kl_against)
		printf(", \"ref\": \"%s\", \"ref_model\": \"%s\", \"ref_ppl\": %.6f, "
		       "\"delta_ppl_pct\": %.4f, "
		       "\"kl_mean\": %.6g, \"kl_max\": %.6g, \"max_logit_err\": %.6g",
		       o->kl_against, rm == m ? "same" : "unsmoothed",
		       res.ref_ppl,
		       100.0 * (res.ppl - res.ref_ppl) / res.ref_ppl,
		       res.kl_mean, res.kl_max, res.max_logit_err);
	if (rm != m)
		printf(", \"smoothed_ref_ppl\": %.6f, \"smoothed_ref_kl_mean\": %.6g, "
		       "\"smoothed_ref_max_logit_err\": %.6g",
		       sres.ppl, sres.kl_mean, sres.max_logit_err);
	printf(", \"seconds\": %.3f}\n", res.seconds);
	ret = 0;
out:
	if (rm != m)
		kvq_model_destroy(rm);
	free(ids);
	free(text);
	return ret;
}

/* One tensor of the --ranks --json document. */
static json_t *rank_json(const struct kvq_fisher_entry *e, bool fallback)
{
	return json_pack("{s:s, s:s, s:I, s:I, s:s?, s:o, s:o, s:f, s:i}",
			 "name", e->name, "type", e->type,
			 "bytes", (json_int_t)e->bytes,
			 "elements", (json_int_t)e->n_elements,
			 "layout", fallback ? NULL : e->rows ? "rows" : "full",
			 "trace", fallback ? json_null() : json_real(e->trace),
			 "density", fallback ? json_null() :
					       json_real(e->density),
			 "score", e->score, "rank", (int)e->rank);
}

static int print_ranks_json(const struct kvq_fisher *f, const char *model)
{
	const struct kvq_fisher_meta *mi = kvq_fisher_meta(f);
	bool fb = kvq_fisher_is_fallback(f);
	json_t *doc, *arr;
	uint32_t r;
	size_t n;
	int ret = 1;

	kvq_fisher_entries(f, &n);
	arr = json_array();
	doc = json_pack("{s:s, s:s, s:s?, s:s*, s:I, s:I, s:s, s:o}",
			"model", model, "source", kvq_fisher_source(f),
			"sidecar", mi->path,
			"fallback_rule", fb ? KVQ_FISHER_FALLBACK_RULE : NULL,
			"token_count", (json_int_t)mi->token_count,
			"step_count", (json_int_t)mi->step_count,
			"dataset", mi->dataset, "tensors", arr);
	if (!doc)
		goto out;
	for (r = 1; r <= n; r++)
		if (json_array_append_new(arr, rank_json(kvq_fisher_ranked(f, r),
							 fb)))
			goto out;
	if (json_dumpf(doc, stdout, JSON_INDENT(1) | JSON_REAL_PRECISION(17)))
		goto out;
	printf("\n");
	ret = 0;
out:
	if (ret)
		fprintf(stderr, "kvqd: --ranks: cannot build the JSON document\n");
	json_decref(doc);
	return ret;
}

static void print_ranks_table(const struct kvq_fisher *f)
{
	const struct kvq_fisher_meta *mi = kvq_fisher_meta(f);
	const struct kvq_fisher_entry *e;
	int w = (int)strlen("tensor");
	uint32_t r;
	size_t n;

	kvq_fisher_entries(f, &n);
	for (r = 1; r <= n; r++)
		if ((int)strlen(kvq_fisher_ranked(f, r)->name) > w)
			w = (int)strlen(kvq_fisher_ranked(f, r)->name);
	if (kvq_fisher_is_fallback(f))
		printf("# source: fallback (no Fisher sidecar): ranking by %s\n",
		       KVQ_FISHER_FALLBACK_RULE);
	else
		printf("# source: %s (%s); %llu tokens, %llu steps; dataset: %s\n",
		       kvq_fisher_source(f), mi->path,
		       (unsigned long long)mi->token_count,
		       (unsigned long long)mi->step_count,
		       mi->dataset[0] ? mi->dataset : "(unknown)");
	printf("%-*s  %-6s %12s %13s %13s %5s\n", w, "tensor", "type", "bytes",
	       "trace", "density", "rank");
	for (r = 1; r <= n; r++) {
		e = kvq_fisher_ranked(f, r);
		if (kvq_fisher_is_fallback(f))
			printf("%-*s  %-6s %12llu %13s %13s %5u\n", w, e->name,
			       e->type, (unsigned long long)e->bytes, "-", "-",
			       e->rank);
		else
			printf("%-*s  %-6s %12llu %13.6e %13.6e %5u\n", w,
			       e->name, e->type, (unsigned long long)e->bytes,
			       e->trace, e->density, e->rank);
	}
}

/* --ranks: the model's tensors by Fisher density (or the fallback rule). */
static int do_ranks(struct kvq_model *m, struct oneshot *o)
{
	struct kvq_fisher *f;
	char err[512];
	int ret;

	if (kvq_fisher_load(m, o->fim, &f, err, sizeof(err))) {
		fprintf(stderr, "kvqd: %s\n", err);
		return 1;
	}
	if (kvq_fisher_is_fallback(f))
		kvq_warn("no Fisher sidecar for %s: ranking by %s", o->model,
			 KVQ_FISHER_FALLBACK_RULE);
	if (o->json) {
		ret = print_ranks_json(f, o->model);
	} else {
		print_ranks_table(f);
		ret = 0;
	}
	if (fflush(stdout))
		ret = 1;
	kvq_fisher_destroy(f);
	return ret;
}

int kvq_oneshot_main(int argc, char **argv)
{
	struct kvq_model_opts mo = { 0 };
	struct kvq_model *m = NULL;
	struct oneshot o = { 0 };
	char err[512], dev[384];
	int ret;

	if (parse_args(&o, argc, argv))
		return 2;
	kvq_log_set_level(o.verbose ? KVQ_LOG_INFO : KVQ_LOG_WARNING);
	if (!o.model)
		o.model = kvq_config_default_model();
	if (!o.model) {
		fprintf(stderr, "kvqd: no --model FILE given and the bundled model (%s) is not installed\n",
			KVQ_BUNDLED_MODEL);
		return 2;
	}
	if (!strcmp(o.device, "cuda") || !strcmp(o.device, "auto")) {
		struct kvq_gpu_info gi;
		char why[256] = "";

		if (kvq_gpu_probe(&gi, why, sizeof(why)) > 0) {
			o.ctx_device = KVQ_CTX_GPU;
			snprintf(dev, sizeof(dev),
				 "%s GPU %s, %.1f GiB (%.1f GiB free)",
				 kvq_gpu_backend_name(), gi.name,
				 gi.total_mem / 1073741824.0,
				 gi.free_mem / 1073741824.0);
		} else if (!strcmp(o.device, "cuda")) {
			fprintf(stderr, "kvqd: --device cuda: no usable GPU: %s\n",
				why);
			return 2;
		} else {
			snprintf(dev, sizeof(dev),
				 "cpu (%s dot products; no GPU: %s)",
				 kvq_quant_simd_name(), why);
		}
	} else if (!strcmp(o.device, "cpu")) {
		snprintf(dev, sizeof(dev), "cpu (%s dot products)",
			 kvq_quant_simd_name());
	} else {
		fprintf(stderr, "kvqd: --device %s: expected auto, cpu or cuda\n",
			o.device);
		return 2;
	}
	mo.n_threads = o.threads;
	mo.vocab_only = o.tokenize != NULL;
	ret = kvq_model_load(o.model, &mo, &m, err, sizeof(err));
	if (ret) {
		fprintf(stderr, "kvqd: %s\n", err);
		return 1;
	}
	kvq_info("model: %s (%s)", o.model, kvq_model_desc(m));
	kvq_info("device: %s", dev);
	/* Smoothing first: kv_type_k = auto calibrates the smoothed model. */
	if (!o.ranks && !o.tokenize &&
	    kvq_kv_smooth_load(m, o.kv_smooth, o.kv_type_k, o.kv_type_v, err,
			       sizeof(err))) {
		fprintf(stderr, "kvqd: %s\n", err);
		kvq_model_destroy(m);
		return 1;
	}
	kvq_kv_smooth_last(m, &o.smooth);
	if (!o.ranks && !o.tokenize && o.key_queries &&
	    (ret = kvq_kv_key_moments(m))) {
		fprintf(stderr, "kvqd: --kv-key-rounding queries: cannot measure the model: %s\n",
			strerror(-ret));
		kvq_model_destroy(m);
		return 1;
	}
	if (o.ranks)
		ret = do_ranks(m, &o);
	else if (o.tokenize)
		ret = do_tokenize(kvq_model_tokenizer(m), o.tokenize);
	else if (o.dump_logits)
		ret = do_dump_logits(m, &o);
	else if (o.perplexity)
		ret = do_perplexity(m, &o);
	else
		ret = do_generate(m, &o);
	kvq_model_destroy(m);
	return ret;
}
