/*
 * daemon.c - kvqd as a service: configuration, modules, signals and the
 * main loop.
 *
 * Why this file exists: it is the one place that knows the order in which
 * kvqd's modules come up and go down, and what each signal means.
 *
 * Life cycle (all on the event loop's thread unless said otherwise):
 *
 *   START    config read and validated, log level set, device chosen,
 *            event loop, signals, admin socket, HTTP server (/health says
 *            503 until READY).
 *   LOADING  a loader thread maps and checks the model; the loop keeps
 *            answering the admin socket, sends STATUS= and
 *            EXTEND_TIMEOUT_USEC= to systemd every few seconds, and logs
 *            progress.  (model_loaded)
 *   READY    scheduler started, HTTP ready, READY=1 sent.
 *   DRAINING SIGTERM/SIGINT: STOPPING=1, HTTP stops accepting, a drain
 *            thread waits up to drain_timeout for running requests while
 *            the loop keeps streaming them.  (drained)
 *   EXIT     modules torn down in reverse order; exit status 0.
 *
 * SIGHUP in any state re-reads the config file (with the same command-line
 * overrides), validates it whole, and either applies the keys that can
 * change live or keeps the old config and logs why.  Keys that need a
 * restart keep their running value; the new value is reported as pending
 * by `kvqctl config`.
 *
 * A second SIGTERM/SIGINT while draining stops at once (running requests
 * are cancelled).
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/thread.h>

#include "daemon/admin.h"
#include "daemon/conf.h"
#include "daemon/daemon.h"
#include "daemon/notify.h"
#include "daemon/sched.h"
#include "engine/gguf.h"
#include "engine/fisher.h"
#include "engine/kvcache.h"
#include "engine/kvcalib.h"
#include "engine/kvsmooth.h"
#include "engine/log.h"
#include "engine/model.h"
#include "kernels/gpu.h"
#include "proto/http.h"

#define EXIT_CONFIG 1
#define EXIT_USAGE 2

/* While loading: how often to report, and how much time to ask for. */
#define LOAD_TICK_S 3
#define LOAD_EXTEND_USEC (4ull * LOAD_TICK_S * 1000000ull)
/* After a drain: how long to wait for answers to reach the sockets. */
#define FLUSH_POLL_MS 20
#define FLUSH_GRACE_MS 200
#define FLUSH_MAX_MS 2000

struct daemon {
	struct kvq_args args;
	struct kvq_config conf;		/* in force */
	struct kvq_config *pending;	/* file values awaiting a restart */
	bool conf_ready;

	struct event_base *base;
	struct event *ev_sig[3];	/* SIGHUP, SIGTERM, SIGINT */
	struct event *ev_loaded;	/* loader thread finished */
	struct event *ev_drained;	/* drain thread finished */
	struct event *ev_tick;		/* load progress */
	struct event *ev_flush;		/* answers written after a drain */

	struct kvq_admin *admin;
	struct kvq_admin_view view;
	char last_reload[512];
	char device[160];
	int ctx_device;		/* enum kvq_ctx_device of the scheduler */
	char status[512];		/* STATUS= while serving */

	pthread_t loader;
	bool loading;
	char *load_path;
	struct kvq_model_opts load_opts;
	int load_ret;
	char load_err[512];
	uint64_t load_start_usec;
	struct kvq_model *model;
	char *load_fim;			/* NULL: beside the model */
	struct kvq_fisher *fisher;
	/* kv_type_k = auto: the loader calibrates, off the event loop. */
	bool load_calibrate;
	char *load_kv_v;
	uint32_t load_kv_page, load_kv_sink;
	char calib_types[KVQ_KV_MAX_LAYERS * 4];	/* "q4,q8,..." */
	struct kvq_kv_calib_report calib;

	struct kvq_sched *sched;
	struct kvq_http *http;

	pthread_t drainer;
	bool draining;
	int drain_ret;
	uint64_t flush_start_usec;

	bool stopping;
	int exit_status;
};

/* ------------------------------------------------------------- helpers */

static double since_s(uint64_t usec)
{
	return (double)(kvq_notify_now_usec() - usec) / 1e6;
}

static void notify_checked(int ret, const char *what)
{
	static bool warned;

	if (ret && !warned) {
		kvq_warn("sd_notify %s: %s", what, strerror(-ret));
		warned = true;
	}
}

static void set_status(const char *fmt, ...)
	__attribute__((format(printf, 1, 2)));

static void set_status(const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	notify_checked(kvq_notify_status(buf), "STATUS");
}

/* Logs every line of a multi-line message at @level. */
static void log_lines(enum kvq_log_level level, const char *intro,
		      const char *msg)
{
	const char *p = msg, *nl;

	while (*p) {
		nl = strchr(p, '\n');
		if (!nl)
			nl = p + strlen(p);
		if (nl > p)
			kvq_log(level, "%s%.*s", intro, (int)(nl - p), p);
		p = *nl ? nl + 1 : nl;
	}
}

static void usage(FILE *f)
{
	const struct kvq_config_key *k;
	char opt[64], arg[32];
	size_t i, j;

	fprintf(f,
		"Usage: kvqd [--config FILE] [--check-config] [--KEY VALUE]...\n"
		"       kvqd --prompt TEXT --model FILE [...]   (one-shot modes, see kvqd(8))\n"
		"Serve a GGUF model over HTTP (OpenAI-compatible API) in the foreground.\n"
		"\n"
		"  -c, --config FILE     config file (default %s)\n"
		"      --check-config    check the config and the model file, then exit\n"
		"  -h, --help            this text\n"
		"  -V, --version         print the version\n"
		"\n"
		"Every key of the config file can be given on the command line, and\n"
		"wins over the file (see kvqd.conf(5)):\n",
		KVQ_CONFIG_DEFAULT_PATH);
	for (i = 0; i < kvq_config_n_keys(); i++) {
		k = kvq_config_key(i);
		for (j = 0; k->name[j] && j + 1 < sizeof(opt); j++)
			opt[j] = k->name[j] == '_' ? '-' : k->name[j];
		opt[j] = '\0';
		switch (k->type) {
		case KVQ_CT_FILE:
			snprintf(arg, sizeof(arg), "FILE");
			break;
		case KVQ_CT_DIR:
			snprintf(arg, sizeof(arg), "DIR");
			break;
		case KVQ_CT_SOCKET:
			snprintf(arg, sizeof(arg), "PATH");
			break;
		case KVQ_CT_LISTEN:
			snprintf(arg, sizeof(arg), "HOST:PORT");
			break;
		case KVQ_CT_SIZE:
			snprintf(arg, sizeof(arg), "BYTES");
			break;
		case KVQ_CT_DURATION:
			snprintf(arg, sizeof(arg), "TIME");
			break;
		case KVQ_CT_UINT:
			snprintf(arg, sizeof(arg), "N");
			break;
		default:
			snprintf(arg, sizeof(arg), "VALUE");
			break;
		}
		fprintf(f, "  --%s %s\n        %s%s%s%s\n", opt, arg, k->help,
			*k->def ? " (default " : "", k->def,
			*k->def ? ")" : "");
	}
}

/* ---------------------------------------------------------------- config */

static int load_config(struct daemon *d, bool check_only)
{
	char err[8192];
	int ret;

	kvq_config_init(&d->conf);
	d->conf_ready = true;
	ret = kvq_config_load(&d->conf, &d->args, err, sizeof(err));
	if (ret == -ENOMEM) {
		fprintf(stderr, "kvqd: out of memory\n");
		return EXIT_CONFIG;
	}
	if (!ret)
		return 0;
	if (check_only)
		fputs(err, stderr);
	else
		log_lines(KVQ_LOG_ERR, "", err);
	return EXIT_CONFIG;
}

/*
 * --check-config: everything kvq_config_load() checks, plus that the model
 * is a GGUF file kvqd can load (its metadata and tokenizer; the weights
 * are checked when served) and that the device can be used.
 */
static int check_config(struct daemon *d)
{
	struct kvq_model_opts mo = { .vocab_only = true };
	struct kvq_gpu_info gi;
	struct kvq_model *m;
	char err[1024] = "", why[256] = "", where[1100];
	int bad = load_config(d, true) != 0;
	const char *file = *d->conf.path ? d->conf.path : "defaults";

	kvq_config_where(&d->conf, kvq_config_find("model"), where,
			 sizeof(where));
	if (*d->conf.model && !access(d->conf.model, R_OK)) {
		if (kvq_model_load(d->conf.model, &mo, &m, err, sizeof(err))) {
			fprintf(stderr, "%s: model: %s\n", where, err);
			bad = 1;
		} else {
			uint32_t ctx = kvq_model_hparams(m)->ctx_len;

			if (d->conf.n_ctx > ctx)
				fprintf(stderr,
					"%s: n_ctx: warning: %u is more than the model was trained for (%u)\n",
					file, d->conf.n_ctx, ctx);
			kvq_model_destroy(m);
		}
	}
	if (d->conf.device == KVQ_DEVICE_CUDA &&
	    kvq_gpu_probe(&gi, why, sizeof(why)) <= 0) {
		fprintf(stderr, "%s: device: cuda is not usable: %s\n", file,
			why);
		bad = 1;
	}
	if (bad) {
		fprintf(stderr, "kvqd: configuration has errors\n");
		return EXIT_CONFIG;
	}
	printf("kvqd: configuration OK (%s%s)\n", file,
	       d->conf.path_missing ? " does not exist; defaults used" : "");
	return 0;
}

/* Says once how kvqd will compute; -errno when the config asks for the
 * impossible. */
static int choose_device(struct daemon *d)
{
	struct kvq_gpu_info gi;
	char why[256] = "";
	int n = kvq_gpu_probe(&gi, why, sizeof(why));

	if (d->conf.device == KVQ_DEVICE_CUDA && n <= 0) {
		kvq_err("device = cuda, but no GPU is usable: %s", why);
		return -ENODEV;
	}
	if (d->conf.device == KVQ_DEVICE_CPU) {
		snprintf(d->device, sizeof(d->device), "cpu");
		kvq_notice("device: cpu (as configured)");
		return 0;
	}
	if (n <= 0) {
		snprintf(d->device, sizeof(d->device), "cpu");
		kvq_notice("no GPU (%s): running on the CPU", why);
		return 0;
	}
	/* A GPU is present: the whole forward pass runs there. */
	d->ctx_device = KVQ_CTX_GPU;
	snprintf(d->device, sizeof(d->device), "%s: %s, %.1f GiB",
		 kvq_gpu_backend_name(), gi.name,
		 gi.total_mem / 1073741824.0);
	kvq_notice("device: %s GPU %s (compute %d.%d, %d SMs), %.1f GiB, %.1f GiB free; the forward pass and the KV cache run there%s",
		   kvq_gpu_backend_name(), gi.name, gi.cc_major, gi.cc_minor,
		   gi.n_sms, gi.total_mem / 1073741824.0,
		   gi.free_mem / 1073741824.0,
		   d->conf.device == KVQ_DEVICE_CUDA ? " (as configured)" : "");
	return 0;
}

/* -------------------------------------------------------------- HTTP */

static void http_opts(const struct kvq_config *c, struct kvq_http_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->host = c->listen_host;
	o->port = c->listen_port;
	o->api_key = c->api_key;
	o->max_body_bytes = (size_t)c->max_body_bytes;
	o->max_header_bytes = (size_t)c->max_header_bytes;
	o->idle_timeout_ms = c->idle_timeout_ms;
}

static void sched_opts(const struct kvq_config *c, struct kvq_sched_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->max_running = c->max_running;
	/* 0 means "the default" to the scheduler: the smallest queue is 1. */
	o->max_queued = c->max_queued ? c->max_queued : 1;
	o->max_tokens_default = c->default_max_tokens;
	o->max_tokens_limit = c->max_tokens;
	o->prefill_chunk = c->prefill_chunk;
	o->n_ctx = c->n_ctx;
	o->kv_tokens = c->kv_tokens;
	o->queue_timeout_ms = c->queue_timeout_ms;
	o->total_timeout_ms = c->request_timeout_ms;
	o->n_threads = (int)c->threads;
	o->kv_type_k = c->kv_type_k;
	o->kv_type_v = c->kv_type_v;
	o->kv_page_tokens = c->kv_page_tokens;
	o->kv_sink_tokens = c->kv_sink_tokens;
	o->prefix_cache = c->prefix_cache != 0;
}

/* ------------------------------------------------------------ loading */

/*
 * kv_type_k = auto, on the loader thread: measures which layers' keys
 * tolerate q4 (engine/kvcalib.h) and leaves the answer as a per-layer list
 * in d->calib_types for the scheduler.
 */
static int calibrate_keys(struct daemon *d)
{
	uint32_t nl = kvq_model_hparams(d->model)->n_layers, l;
	uint8_t tk[KVQ_KV_MAX_LAYERS], tv[KVQ_KV_MAX_LAYERS];
	struct kvq_ctx_opts co = { 0 };
	size_t w = 0;
	int ret;

	if (nl > KVQ_KV_MAX_LAYERS)
		return 0;	/* the scheduler refuses it with a message */
	ret = kvq_kv_types_parse(d->load_kv_v, nl, tv, d->load_err,
				 sizeof(d->load_err));
	if (ret)
		return 0;	/* likewise */
	co.kv_types_v = tv;
	co.kv_page_tokens = d->load_kv_page;
	co.kv_sink_tokens = d->load_kv_sink;
	kvq_info("kv_type_k = auto: calibrating key precision");
	ret = kvq_kv_calibrate_keys(d->model, &co, tk, &d->calib);
	if (ret) {
		snprintf(d->load_err, sizeof(d->load_err),
			 "kv_type_k = auto: calibration failed: %s",
			 strerror(-ret));
		return ret;
	}
	for (l = 0; l < nl; l++)
		w += (size_t)snprintf(d->calib_types + w,
				      sizeof(d->calib_types) - w, "%s%s",
				      l ? "," : "", kvq_kv_type_name(tk[l]));
	return 0;
}

/* Reads only what start_loading() set aside: the loop may reload d->conf. */
static void *loader_main(void *arg)
{
	struct daemon *d = arg;

	d->load_ret = kvq_model_load(d->load_path, &d->load_opts, &d->model,
				     d->load_err, sizeof(d->load_err));
	if (!d->load_ret)
		d->load_ret = kvq_fisher_load(d->model, d->load_fim, &d->fisher,
					      d->load_err, sizeof(d->load_err));
	/* Smoothing before calibration, which measures the result (kv_* keys
	 * are not live: reload never changes them under this thread). */
	if (!d->load_ret)
		d->load_ret = kvq_kv_smooth_load(d->model, d->conf.kv_smooth,
			d->conf.kv_type_k, d->conf.kv_type_v, d->load_err,
			sizeof(d->load_err));
	if (!d->load_ret && d->conf.kv_key_rounding) {
		d->load_ret = kvq_kv_key_moments(d->model);
		if (d->load_ret)
			snprintf(d->load_err, sizeof(d->load_err),
				 "kv_key_rounding = queries: cannot measure the model: %s",
				 strerror(-d->load_ret));
	}
	if (!d->load_ret && d->load_calibrate)
		d->load_ret = calibrate_keys(d);
	event_active(d->ev_loaded, EV_READ, 0);
	return NULL;
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
	struct daemon *d = arg;
	double s = since_s(d->load_start_usec);

	if (!d->loading)
		return;
	notify_checked(kvq_notify_extend_timeout(LOAD_EXTEND_USEC),
		       "EXTEND_TIMEOUT_USEC");
	set_status("Loading model %s (%.0f s)", d->conf.model, s);
	if ((int)s % 30 < LOAD_TICK_S)
		kvq_info("still loading %s (%.0f s)", d->conf.model, s);
}

static int start_serving(struct daemon *d)
{
	struct kvq_sched_opts so;
	char err[512] = "";
	int ret;

	sched_opts(&d->conf, &so);
	so.device = d->ctx_device;
	if (d->calib_types[0]) {
		so.kv_type_k = d->calib_types;
		so.kv_calib = &d->calib;
	}
	ret = kvq_sched_create(d->model, &so, &d->sched, err, sizeof(err));
	if (ret) {
		kvq_err("scheduler: %s", err);
		return ret;
	}
	d->view.sched = d->sched;
	so = *kvq_sched_opts(d->sched);
	kvq_info("scheduler: %u running, %u queued, n_ctx %u, KV %u tokens, prefill chunk %u",
		 so.max_running, so.max_queued, so.n_ctx, so.kv_tokens,
		 so.prefill_chunk);

	kvq_http_attach(d->http, d->sched);
	kvq_http_set_ready(d->http, true);
	return 0;
}

static void on_loaded(evutil_socket_t fd, short what, void *arg)
{
	struct daemon *d = arg;

	pthread_join(d->loader, NULL);
	d->loading = false;
	evtimer_del(d->ev_tick);
	if (d->load_ret) {
		kvq_err("model: %s", d->load_err);
		notify_checked(kvq_notifyf("STATUS=Failed to load %s\nERRNO=%d",
					   d->conf.model, -d->load_ret),
			       "STATUS");
		d->exit_status = 1;
		event_base_loopbreak(d->base);
		return;
	}
	kvq_info("model loaded: %s in %.2f s", kvq_model_desc(d->model),
		 since_s(d->load_start_usec));
	d->view.model = d->model;
	d->view.fisher = d->fisher;
	if (kvq_fisher_is_fallback(d->fisher))
		kvq_notice("no Fisher sidecar for %s: ranking by %s",
			   d->conf.model, KVQ_FISHER_FALLBACK_RULE);
	else
		kvq_info("Fisher scores: %s (%s)", kvq_fisher_meta(d->fisher)->path,
			 kvq_fisher_source(d->fisher));
	if (d->stopping) {
		event_base_loopbreak(d->base);
		return;
	}
	if (start_serving(d)) {
		notify_checked(kvq_notify_status("Failed to start serving"),
			       "STATUS");
		d->exit_status = 1;
		event_base_loopbreak(d->base);
		return;
	}
	d->view.state = "ready";
	snprintf(d->status, sizeof(d->status), "Serving %s on %s (%s)",
		 kvq_model_desc(d->model), d->conf.listen, d->device);
	notify_checked(kvq_notify_ready(d->status), "READY");
	kvq_notice("ready: %s", d->status);
}

static int start_loading(struct daemon *d)
{
	struct timeval tick = { LOAD_TICK_S, 0 };
	int ret;

	d->load_start_usec = kvq_notify_now_usec();
	d->load_path = strdup(d->conf.model);
	if (!d->load_path)
		return -ENOMEM;
	d->load_opts.n_threads = (int)d->conf.threads;
	if (!strcmp(d->conf.kv_type_k, "auto")) {
		d->load_calibrate = true;
		d->load_kv_v = strdup(d->conf.kv_type_v);
		if (!d->load_kv_v)
			return -ENOMEM;
		d->load_kv_page = d->conf.kv_page_tokens;
		d->load_kv_sink = d->conf.kv_sink_tokens;
	}
	if (d->conf.fim[0]) {
		d->load_fim = strdup(d->conf.fim);
		if (!d->load_fim)
			return -ENOMEM;
	}
	kvq_info("loading model %s", d->conf.model);
	set_status("Loading model %s", d->conf.model);
	notify_checked(kvq_notify_extend_timeout(LOAD_EXTEND_USEC),
		       "EXTEND_TIMEOUT_USEC");
	d->loading = true;
	ret = -pthread_create(&d->loader, NULL, loader_main, d);
	if (ret) {
		d->loading = false;
		kvq_err("model loader thread: %s", strerror(-ret));
		return ret;
	}
	evtimer_add(d->ev_tick, &tick);
	return 0;
}

/* ------------------------------------------------------------ reload */

/* Applies live key @k's new value from @next; logs the change. */
static int apply_live_key(struct daemon *d, const struct kvq_config *next,
			  int k)
{
	const struct kvq_config_key *key = kvq_config_key((size_t)k);
	char was[256], now[256];

	kvq_config_format(&d->conf, k, was, sizeof(was));
	kvq_config_format(next, k, now, sizeof(now));
	if (key->secret) {
		snprintf(was, sizeof(was), "%s", *was ? "(set)" : "(none)");
		snprintf(now, sizeof(now), "%s", *now ? "(a new key)" :
			 "(none)");
	}
	if (kvq_config_copy_key(&d->conf, next, k))
		return -ENOMEM;
	kvq_notice("reload: %s: %s -> %s", key->name, was, now);
	return 0;
}

static void reload(struct daemon *d)
{
	struct kvq_config *next;
	struct kvq_sched_opts so;
	struct kvq_http_opts ho;
	char err[8192], was[256], now[256];
	bool restart_needed = false;
	size_t i;
	int n_live = 0;

	d->view.reloads++;
	notify_checked(kvq_notify_reloading(), "RELOADING");
	kvq_info("SIGHUP: reloading %s", d->conf.path);
	next = malloc(sizeof(*next));
	if (!next) {
		kvq_err("reload: out of memory; keeping the old configuration");
		goto out_failed_nomsg;
	}
	kvq_config_init(next);
	if (kvq_config_load(next, &d->args, err, sizeof(err))) {
		log_lines(KVQ_LOG_ERR, "reload: ", err);
		kvq_err("reload: configuration refused; keeping the old one");
		snprintf(d->last_reload, sizeof(d->last_reload),
			 "refused: %.*s", (int)strcspn(err, "\n"), err);
		goto out_failed;
	}

	for (i = 0; i < kvq_config_n_keys(); i++) {
		const struct kvq_config_key *key = kvq_config_key(i);

		if (kvq_config_equal(&d->conf, next, (int)i))
			continue;
		if (key->live) {
			if (apply_live_key(d, next, (int)i)) {
				kvq_err("reload: out of memory");
				break;
			}
			n_live++;
			continue;
		}
		kvq_config_format(&d->conf, (int)i, was, sizeof(was));
		kvq_config_format(next, (int)i, now, sizeof(now));
		kvq_warn("reload: %s: changed to '%s', which needs a restart; still using '%s'",
			 key->name, now, was);
		restart_needed = true;
	}

	kvq_log_set_level((enum kvq_log_level)d->conf.log_level);
	if (d->sched) {
		sched_opts(&d->conf, &so);
		kvq_sched_set_limits(d->sched, &so);
	}
	if (d->http) {
		http_opts(&d->conf, &ho);
		if (kvq_http_set_limits(d->http, &ho))
			kvq_warn("reload: the HTTP server refused the new limits");
	}

	if (d->pending) {
		kvq_config_fini(d->pending);
		free(d->pending);
		d->pending = NULL;
	}
	if (restart_needed)
		d->pending = next;
	else {
		kvq_config_fini(next);
		free(next);
	}
	d->view.pending = d->pending;
	snprintf(d->last_reload, sizeof(d->last_reload), "ok (%d change%s%s)",
		 n_live, n_live == 1 ? "" : "s",
		 restart_needed ? "; some need a restart" : "");
	kvq_notice("reload: done, %d live change%s%s", n_live,
		   n_live == 1 ? "" : "s",
		   restart_needed ? "; restart kvqd for the others" : "");
	goto out_ready;

out_failed:
	kvq_config_fini(next);
	free(next);
out_failed_nomsg:
	d->view.reloads_failed++;
out_ready:
	if (d->stopping)
		return;
	if (d->loading)
		notify_checked(kvq_notifyf("READY=1\nSTATUS=Loading model %s",
					   d->conf.model), "READY");
	else
		notify_checked(kvq_notifyf("READY=1\nSTATUS=%s%s", d->status,
			strncmp(d->last_reload, "ok", 2) ?
			"; last reload refused (see the log)" : ""), "READY");
}

/* ------------------------------------------------------------ stopping */

/* Cancels every queued and running request. */
static void cancel_all(struct daemon *d)
{
	struct kvq_sched_req_info *info = NULL;
	size_t n = 0, i;

	if (!d->sched || kvq_sched_snapshot(d->sched, &info, &n))
		return;
	for (i = 0; i < n; i++)
		kvq_sched_cancel(d->sched, info[i].id);
	if (n)
		kvq_notice("cancelled %zu request%s", n, n == 1 ? "" : "s");
	free(info);
}

static const char *sig_name(int sig)
{
	return sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" :
	       sig == SIGHUP ? "SIGHUP" : "signal";
}

static void *drainer_main(void *arg)
{
	struct daemon *d = arg;

	d->drain_ret = kvq_sched_drain(d->sched, (int)d->conf.drain_timeout_ms);
	event_active(d->ev_drained, EV_READ, 0);
	return NULL;
}

/*
 * The scheduler is idle, but the last tokens may still be on their way to
 * the clients: wait until the HTTP server has handed over every answer,
 * then give the loop a moment to write them out before leaving it.
 */
static void on_flush(evutil_socket_t fd, short what, void *arg)
{
	struct daemon *d = arg;
	struct timeval poll = { 0, FLUSH_POLL_MS * 1000 };
	struct timeval grace = { 0, FLUSH_GRACE_MS * 1000 };
	struct kvq_http_stats hs = { 0 };

	if (d->http)
		kvq_http_stats(d->http, &hs);
	if (hs.in_flight &&
	    since_s(d->flush_start_usec) * 1000 < FLUSH_MAX_MS) {
		evtimer_add(d->ev_flush, &poll);
		return;
	}
	if (hs.in_flight)
		kvq_warn("drain: %u answers not delivered; closing", hs.in_flight);
	event_base_loopexit(d->base, &grace);
}

static void on_drained(evutil_socket_t fd, short what, void *arg)
{
	struct daemon *d = arg;
	struct kvq_sched_stats st;

	pthread_join(d->drainer, NULL);
	d->draining = false;
	if (d->drain_ret == -ETIMEDOUT) {
		kvq_sched_stats(d->sched, &st);
		kvq_warn("drain: timeout after %u ms; cancelling %u running and %u waiting requests",
			 d->conf.drain_timeout_ms, st.running, st.waiting);
	} else {
		kvq_info("drain: all requests finished");
	}
	d->flush_start_usec = kvq_notify_now_usec();
	on_flush(-1, 0, d);
}

static void stop(struct daemon *d, int sig)
{
	int ret;

	if (d->stopping) {
		kvq_notice("%s again: stopping now", sig_name(sig));
		if (d->draining)
			cancel_all(d);	/* the drain ends, on_drained exits */
		else
			event_base_loopbreak(d->base);
		return;
	}
	d->stopping = true;
	d->view.state = "draining";
	kvq_notice("%s: stopping", sig_name(sig));
	notify_checked(kvq_notify_stopping("Stopping"), "STOPPING");
	if (d->http) {
		kvq_http_set_ready(d->http, false);
		kvq_http_stop_accepting(d->http);
	}
	if (d->loading) {
		/* The load cannot be interrupted; exit as soon as it ends. */
		kvq_info("waiting for the model load to end");
		return;
	}
	if (!d->sched) {
		event_base_loopexit(d->base, NULL);
		return;
	}
	kvq_info("drain: waiting up to %u ms for running requests",
		 d->conf.drain_timeout_ms);
	set_status("Stopping: finishing running requests");
	ret = -pthread_create(&d->drainer, NULL, drainer_main, d);
	if (ret) {
		kvq_err("drain thread: %s; stopping now", strerror(-ret));
		event_base_loopexit(d->base, NULL);
		return;
	}
	d->draining = true;
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct daemon *d = arg;

	if (sig == SIGHUP)
		reload(d);
	else
		stop(d, (int)sig);
}

/* ----------------------------------------------------- setup/teardown */

static int setup_events(struct daemon *d)
{
	static const int sigs[3] = { SIGHUP, SIGTERM, SIGINT };
	int i;

	if (evthread_use_pthreads()) {
		kvq_err("libevent: no thread support");
		return -ENOSYS;
	}
	d->base = event_base_new();
	if (!d->base) {
		kvq_err("libevent: cannot create the event loop");
		return -ENOMEM;
	}
	for (i = 0; i < 3; i++) {
		d->ev_sig[i] = evsignal_new(d->base, sigs[i], on_signal, d);
		if (!d->ev_sig[i] || evsignal_add(d->ev_sig[i], NULL))
			goto out_nomem;
	}
	d->ev_loaded = event_new(d->base, -1, 0, on_loaded, d);
	d->ev_drained = event_new(d->base, -1, 0, on_drained, d);
	d->ev_tick = event_new(d->base, -1, EV_PERSIST, on_tick, d);
	d->ev_flush = evtimer_new(d->base, on_flush, d);
	if (!d->ev_loaded || !d->ev_drained || !d->ev_tick || !d->ev_flush)
		goto out_nomem;
	return 0;

out_nomem:
	kvq_err("libevent: cannot set up events");
	return -ENOMEM;
}

static void teardown_events(struct daemon *d)
{
	int i;

	for (i = 0; i < 3; i++)
		if (d->ev_sig[i])
			event_free(d->ev_sig[i]);
	if (d->ev_loaded)
		event_free(d->ev_loaded);
	if (d->ev_drained)
		event_free(d->ev_drained);
	if (d->ev_tick)
		event_free(d->ev_tick);
	if (d->ev_flush)
		event_free(d->ev_flush);
	if (d->base)
		event_base_free(d->base);
}

static int setup_admin(struct daemon *d)
{
	char err[512] = "";
	int ret;

	ret = kvq_admin_create(d->base, d->conf.admin_socket, &d->view,
			       &d->admin, err, sizeof(err));
	if (ret) {
		kvq_err("%s", err);
		return ret;
	}
	kvq_info("admin socket: %s", d->conf.admin_socket);
	return 0;
}

static int setup_http(struct daemon *d)
{
	struct kvq_http_opts ho;
	char err[512] = "";
	int ret;

	http_opts(&d->conf, &ho);
	ret = kvq_http_create(d->base, NULL, &ho, &d->http, err, sizeof(err));
	if (ret) {
		kvq_err("http: %s", err);
		return ret;
	}
	d->view.http = d->http;
	return 0;
}

static void teardown(struct daemon *d)
{
	bool loader_alive = d->loading;

	if (d->draining) {
		/* The loop left early: end the drain quickly, then wait. */
		cancel_all(d);
		pthread_join(d->drainer, NULL);
		d->draining = false;
	}
	kvq_http_destroy(d->http);
	d->http = NULL;
	d->view.http = NULL;
	kvq_sched_destroy(d->sched);
	d->sched = NULL;
	d->view.sched = NULL;
	if (loader_alive) {
		/*
		 * Stopped while the loader maps the model: it cannot be
		 * interrupted and only reads.  Leave it, its path, its event
		 * and the event base alone; the process exits right after.
		 */
		pthread_detach(d->loader);
		d->loading = false;
	} else {
		kvq_fisher_destroy(d->fisher);
		d->fisher = NULL;
		d->view.fisher = NULL;
		kvq_model_destroy(d->model);
		free(d->load_path);
		d->load_path = NULL;
		free(d->load_fim);
		d->load_fim = NULL;
		free(d->load_kv_v);
		d->load_kv_v = NULL;
	}
	d->model = NULL;
	d->view.model = NULL;
	kvq_admin_destroy(d->admin);
	d->admin = NULL;
	if (!loader_alive)
		teardown_events(d);
	if (d->pending) {
		kvq_config_fini(d->pending);
		free(d->pending);
	}
	if (d->conf_ready)
		kvq_config_fini(&d->conf);
}

int kvq_daemon_main(int argc, char **argv)
{
	static struct daemon dd;
	struct daemon *d = &dd;
	char err[512];

	if (kvq_config_parse_args(argc, argv, &d->args, err, sizeof(err))) {
		fprintf(stderr, "kvqd: %s", err);
		return EXIT_USAGE;
	}
	if (d->args.help) {
		usage(stdout);
		return 0;
	}
	if (d->args.version) {
		printf("kvqd %s\n", PACKAGE_VERSION);
		return 0;
	}
	if (d->args.check_config) {
		d->exit_status = check_config(d);
		kvq_config_fini(&d->conf);
		return d->exit_status;
	}

	if (load_config(d, false)) {
		d->exit_status = EXIT_CONFIG;
		goto out;
	}
	kvq_log_set_level((enum kvq_log_level)d->conf.log_level);
	kvq_notice("kvqd %s starting (pid %d, config %s%s)", PACKAGE_VERSION,
		   (int)getpid(), d->conf.path,
		   d->conf.path_missing ? ", not found: defaults" : "");
	d->view.state = "loading";
	d->view.started_usec = kvq_notify_now_usec();
	d->view.conf = &d->conf;
	d->view.last_reload = d->last_reload;
	d->view.device = d->device;

	/* SIGHUP before the loop runs would kill us; a reload can wait. */
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	d->exit_status = 1;
	if (choose_device(d) || setup_events(d) || setup_admin(d) ||
	    setup_http(d) || start_loading(d))
		goto out;
	d->exit_status = 0;

	if (event_base_dispatch(d->base) < 0) {
		kvq_err("event loop failed");
		d->exit_status = 1;
	}
	if (d->stopping)
		kvq_notice("stopped");

out:
	if (d->exit_status)
		notify_checked(kvq_notifyf("STATUS=Failed to start (see the log)\nERRNO=%d",
					   EINVAL), "STATUS");
	teardown(d);
	return d->exit_status;
}
