/*
 * admin.c - the admin socket's server and its commands (see admin.h).
 *
 * The server is a libevent listener on a unix stream socket and one
 * bufferevent per client; each complete line is one command, answered at
 * once with one line.  The commands only read: the model's tensor table,
 * the scheduler's counters and snapshot, and the configuration.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "daemon/admin.h"
#include "daemon/conf.h"
#include "daemon/notify.h"
#include "daemon/sched.h"
#include "engine/fisher.h"
#include "engine/gguf.h"
#include "engine/log.h"
#include "engine/kvsmooth.h"
#include "engine/model.h"
#include "proto/http.h"

#define ADMIN_IDLE_S 60

struct admin_client {
	struct kvq_admin *a;
	struct bufferevent *bev;
	struct admin_client *next;
	bool closing;			/* reply queued, close when flushed */
};

struct kvq_admin {
	struct event_base *base;
	struct evconnlistener *lev;
	const struct kvq_admin_view *view;
	char *path;
	dev_t dev;
	ino_t ino;
	struct admin_client *clients;
	int n_clients;
};

/* ------------------------------------------------------------- helpers */

static double uptime_s(const struct kvq_admin_view *v)
{
	return (double)(kvq_notify_now_usec() - v->started_usec) / 1e6;
}

/* json_object_set_new() that reports a failed allocation. */
static int set(json_t *o, const char *key, json_t *val)
{
	if (!val || json_object_set_new(o, key, val))
		return -ENOMEM;
	return 0;
}

static json_t *jstr(const char *s)
{
	return json_string(s ? s : "");
}

/*
 * Layer of a tensor from its GGUF name ("blk.3.attn_q.weight"), or -1 for
 * the tensors outside the layers (embeddings, output, final norm).
 */
static int tensor_layer(const char *name)
{
	if (strncmp(name, "blk.", 4))
		return -1;
	return atoi(name + 4);
}

/*
 * Without a Fisher sidecar every tensor is ranked by position: tensors
 * outside the layers (used on every token) first, then layers from the
 * first to the last, each layer a little less than the one before.
 */
static double position_score(const char *name, uint32_t n_layers)
{
	int l = tensor_layer(name);

	if (l < 0 || !n_layers)
		return 1.0;
	return 1.0 - 0.5 * (double)l / (double)n_layers;
}

/* ------------------------------------------------------------ commands */

static json_t *cmd_status(const struct kvq_admin_view *v, int *code,
			  char *err, size_t errlen)
{
	json_t *o = json_object(), *m, *r, *kv, *rl;
	struct kvq_sched_stats st;
	struct kvq_kv_smooth_report sr;
	const struct kvq_hparams *hp;
	int bad = 0;

	if (!o)
		return NULL;
	bad |= set(o, "state", jstr(v->state));
	bad |= set(o, "version", json_string(PACKAGE_VERSION));
	bad |= set(o, "pid", json_integer(getpid()));
	bad |= set(o, "uptime_s", json_real(uptime_s(v)));
	bad |= set(o, "device", jstr(v->device));
	bad |= set(o, "listen", jstr(v->conf->listen));
	bad |= set(o, "admin_socket", jstr(v->conf->admin_socket));
	bad |= set(o, "config_file", jstr(v->conf->path));
	bad |= set(o, "log_level",
		   jstr(kvq_config_enum_name(kvq_config_find("log_level"),
					     kvq_log_get_level())));

	m = json_object();
	bad |= set(o, "model", m);
	if (m) {
		bad |= set(m, "path", jstr(v->conf->model));
		if (v->model) {
			hp = kvq_model_hparams(v->model);
			bad |= set(m, "desc", jstr(kvq_model_desc(v->model)));
			bad |= set(m, "arch", jstr(hp->arch_name));
			bad |= set(m, "n_layers", json_integer(hp->n_layers));
			bad |= set(m, "n_vocab", json_integer(hp->n_vocab));
			bad |= set(m, "ctx_len", json_integer(hp->ctx_len));
			bad |= set(m, "weight_bytes", json_integer(
				(json_int_t)kvq_model_weight_bytes(v->model)));
			bad |= set(m, "n_tensors", json_integer((json_int_t)
				kvq_model_gguf(v->model)->n_tensors));
		}
	}
	if (v->model && kvq_kv_smooth_last(v->model, &sr)) {
		json_t *sm = json_object();

		bad |= set(o, "kv_smooth", sm);
		if (sm) {
			bad |= set(sm, "mode", jstr(kvq_kv_smooth_mode_name(sr.mode)));
			bad |= set(sm, "state", jstr(sr.state));
			bad |= set(sm, "rotated", json_boolean(sr.rotated));
			bad |= set(sm, "centred", json_boolean(sr.centred));
			bad |= set(sm, "k_err_before", json_real(sr.k_err_before));
			bad |= set(sm, "k_err_after", json_real(sr.k_err_after));
			bad |= set(sm, "v_err_before", json_real(sr.v_err_before));
			bad |= set(sm, "v_err_after", json_real(sr.v_err_after));
			bad |= set(sm, "seconds", json_real(sr.seconds));
			bad |= set(sm, "why", jstr(sr.why));
		}
	}

	r = json_object();
	kv = json_object();
	bad |= set(o, "requests", r);
	bad |= set(o, "kv", kv);
	if (v->sched && r && kv) {
		const struct kvq_sched_opts *so = kvq_sched_opts(v->sched);

		kvq_sched_stats(v->sched, &st);
		bad |= set(r, "running", json_integer(st.running));
		bad |= set(r, "waiting", json_integer(st.waiting));
		bad |= set(r, "max_running", json_integer(so->max_running));
		bad |= set(r, "max_queued", json_integer(so->max_queued));
		bad |= set(r, "total", json_integer((json_int_t)
						     st.requests_total));
		bad |= set(r, "rejected", json_integer((json_int_t)
							st.requests_rejected));
		bad |= set(r, "prompt_tokens", json_integer((json_int_t)
			st.tokens_prompt_total));
		bad |= set(r, "generated_tokens", json_integer((json_int_t)
			st.tokens_generated_total));
		bad |= set(r, "generated_tokens_sampled_on_gpu",
			   json_integer((json_int_t)st.tokens_sampled_device));
		bad |= set(r, "steps", json_integer((json_int_t)
						     st.steps_total));
		bad |= set(r, "step_seconds", json_real(st.step_seconds));
		bad |= set(r, "device_seconds", json_real(st.device_seconds));
		bad |= set(kv, "tier", json_string(st.on_gpu ? "hbm" : "host"));
		bad |= set(kv, "n_ctx", json_integer(so->n_ctx));
		bad |= set(kv, "tokens", json_integer(so->kv_tokens));
		bad |= set(kv, "bytes_used", json_integer((json_int_t)
			st.kv_bytes_used));
		bad |= set(kv, "bytes_capacity", json_integer((json_int_t)
			st.kv_bytes_capacity));
		bad |= set(kv, "bytes_per_token", json_integer((json_int_t)
			st.kv_bytes_per_token));
		bad |= set(kv, "type_k", jstr(st.kv_type_k));
		bad |= set(kv, "type_v", jstr(st.kv_type_v));
		bad |= set(kv, "attention", jstr(st.backend));
		bad |= set(kv, "dot_products", jstr(st.dot));
		if (st.gpu_fallback[0])
			bad |= set(kv, "gpu_fallback", jstr(st.gpu_fallback));
		if (st.gpu_weights[0])
			bad |= set(kv, "gpu_weights", jstr(st.gpu_weights));
		bad |= set(kv, "prefix_cache", json_boolean(so->prefix_cache));
		bad |= set(kv, "prefix_cache_sequences",
			   json_integer(st.cached_seqs));
		bad |= set(kv, "prompt_tokens_cached", json_integer(
			(json_int_t)st.prompt_tokens_cached));
		if (st.kv_calibrated) {
			json_t *cal = json_object();

			bad |= set(kv, "calibration", cal);
			if (cal) {
				bad |= set(cal, "err_q8", json_real(st.kv_calib_err_q8));
				bad |= set(cal, "err_q4", json_real(st.kv_calib_err_q4));
				bad |= set(cal, "ratio", json_real(st.kv_calib_ratio));
				bad |= set(cal, "kl_q8", json_real(st.kv_calib_kl_q8));
				bad |= set(cal, "kl_q4", json_real(st.kv_calib_kl_q4));
				bad |= set(cal, "seconds", json_real(st.kv_calib_seconds));
			}
		}
	}

	if (v->http) {
		struct kvq_http_stats hs;
		json_t *h = json_object();

		kvq_http_stats(v->http, &hs);
		bad |= set(o, "http", h);
		if (h) {
			bad |= set(h, "requests_total", json_integer(
				(json_int_t)hs.requests_total));
			bad |= set(h, "in_flight", json_integer(hs.in_flight));
			bad |= set(h, "streams", json_integer(hs.streams));
		}
	}

	rl = json_object();
	bad |= set(o, "reloads", rl);
	if (rl) {
		bad |= set(rl, "count", json_integer(v->reloads));
		bad |= set(rl, "failed", json_integer(v->reloads_failed));
		bad |= set(rl, "last", jstr(v->last_reload));
	}
	if (bad) {
		json_decref(o);
		*code = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	return o;
}

static int tiers_weights(const struct kvq_admin_view *v, json_t *list,
			 const char *tier, uint64_t *bytes)
{
	const struct kvq_gguf *g = kvq_model_gguf(v->model);
	uint32_t n_layers = kvq_model_hparams(v->model)->n_layers;
	uint64_t i;
	int bad = 0;

	for (i = 0; i < g->n_tensors && !bad; i++) {
		const struct kvq_gguf_tensor *t = &g->tensors[i];
		json_t *o = json_object();

		if (!o || json_array_append_new(list, o))
			return -ENOMEM;
		bad |= set(o, "name", json_string(t->name));
		bad |= set(o, "kind", json_string("weight"));
		bad |= set(o, "tier", json_string(tier));
		bad |= set(o, "bytes", json_integer((json_int_t)t->nbytes));
		bad |= set(o, "type", json_string(kvq_type_name(t->type)));
		bad |= set(o, "layer", json_integer(tensor_layer(t->name)));
		if (v->fisher && kvq_fisher_find(v->fisher, t->name)) {
			const struct kvq_fisher_entry *e =
				kvq_fisher_find(v->fisher, t->name);

			bad |= set(o, "score", json_real(e->score));
			bad |= set(o, "rank", json_integer(e->rank));
			if (!kvq_fisher_is_fallback(v->fisher))
				bad |= set(o, "trace", json_real(e->trace));
		} else {
			bad |= set(o, "score", json_real(
				position_score(t->name, n_layers)));
		}
		bad |= set(o, "state", json_string("resident"));
		bad |= set(o, "pins", json_integer(0));
		*bytes += t->nbytes;
	}
	return bad ? -ENOMEM : 0;
}

/*
 * KV chunks: one per live sequence.  The scheduler reports tokens per
 * request and bytes for the whole cache; a chunk's bytes are its tokens
 * times the cache's bytes per token.
 */
static int tiers_kv(const struct kvq_admin_view *v, json_t *list,
		    json_t *kv)
{
	const struct kvq_sched_opts *so = kvq_sched_opts(v->sched);
	struct kvq_sched_req_info *info = NULL;
	struct kvq_sched_stats st;
	double per_tok;
	size_t n = 0, i;
	int bad = 0;

	kvq_sched_stats(v->sched, &st);
	per_tok = so->kv_tokens ? (double)st.kv_bytes_capacity /
				  (double)so->kv_tokens : 0.0;
	bad |= set(kv, "tier", json_string(st.on_gpu ? "hbm" : "host"));
	bad |= set(kv, "bytes_used", json_integer((json_int_t)
						   st.kv_bytes_used));
	bad |= set(kv, "bytes_capacity", json_integer((json_int_t)
		st.kv_bytes_capacity));
	bad |= set(kv, "bytes_per_token", json_real(per_tok));
	if (kvq_sched_snapshot(v->sched, &info, &n))
		return -ENOMEM;
	for (i = 0; i < n && !bad; i++) {
		int toks = info[i].prefilled_tokens + info[i].generated_tokens;
		char name[64];
		json_t *o;

		if (info[i].state != KVQ_SCHED_PREFILL &&
		    info[i].state != KVQ_SCHED_DECODE)
			continue;
		o = json_object();
		if (!o || json_array_append_new(list, o)) {
			bad = 1;
			break;
		}
		snprintf(name, sizeof(name), "kv.req%llu",
			 (unsigned long long)info[i].id);
		bad |= set(o, "name", json_string(name));
		bad |= set(o, "kind", json_string("kv"));
		bad |= set(o, "tier", json_string(st.on_gpu ? "hbm" : "host"));
		bad |= set(o, "bytes", json_integer((json_int_t)
						     (per_tok * toks)));
		bad |= set(o, "type", json_string("kv"));
		bad |= set(o, "request", json_integer((json_int_t)
						       info[i].id));
		bad |= set(o, "tokens", json_integer(toks));
		bad |= set(o, "score", json_real(1.0));
		bad |= set(o, "state", json_string("resident"));
		bad |= set(o, "pins", json_integer(1));
	}
	free(info);
	return bad ? -ENOMEM : 0;
}

static json_t *cmd_tiers(const struct kvq_admin_view *v, int *code,
			 char *err, size_t errlen)
{
	json_t *o, *tiers, *host, *objs, *kv;
	struct kvq_sched_stats st;
	uint64_t wbytes = 0;
	const char *tier;
	int bad = 0;

	if (!v->model || !v->sched) {
		*code = -EAGAIN;
		snprintf(err, errlen, "the model is still loading");
		return NULL;
	}
	/* On a GPU the weights and the KV pages the steps use are in device
	 * memory (the model file stays mapped on the host as their source). */
	kvq_sched_stats(v->sched, &st);
	tier = st.on_gpu ? "hbm" : "host";
	o = json_object();
	tiers = json_array();
	host = json_object();
	objs = json_array();
	kv = json_object();
	if (!o || !tiers || !host || !objs || !kv ||
	    json_array_append_new(tiers, host)) {
		json_decref(host);
		goto out_nomem;
	}
	if (v->fisher && !kvq_fisher_is_fallback(v->fisher)) {
		char src[512];

		snprintf(src, sizeof(src), "fisher: %s (%s)",
			 kvq_fisher_source(v->fisher),
			 kvq_fisher_meta(v->fisher)->path);
		bad |= set(o, "score_source", json_string(src));
	} else {
		bad |= set(o, "score_source", json_string(
			"fallback (no Fisher sidecar): " KVQ_FISHER_FALLBACK_RULE));
	}
	bad |= set(o, "tiers", tiers);
	tiers = NULL;
	bad |= tiers_weights(v, objs, tier, &wbytes);
	bad |= tiers_kv(v, objs, kv);
	bad |= set(host, "name", json_string(tier));
	bad |= set(host, "weight_bytes", json_integer((json_int_t)wbytes));
	bad |= set(host, "kv_bytes", json_integer(
		json_integer_value(json_object_get(kv, "bytes_used"))));
	bad |= set(host, "objects", json_integer((json_int_t)
						  json_array_size(objs)));
	bad |= set(host, "state", json_string("ok"));
	bad |= set(o, "kv", kv);
	kv = NULL;
	bad |= set(o, "objects", objs);
	objs = NULL;
	if (bad)
		goto out_nomem;
	return o;

out_nomem:
	json_decref(o);
	json_decref(tiers);
	json_decref(objs);
	json_decref(kv);
	*code = -ENOMEM;
	snprintf(err, errlen, "out of memory");
	return NULL;
}

static json_t *cmd_requests(const struct kvq_admin_view *v, int *code,
			    char *err, size_t errlen)
{
	struct kvq_sched_req_info *info = NULL;
	json_t *o, *list;
	size_t n = 0, i;
	int bad = 0;

	if (!v->sched) {
		*code = -EAGAIN;
		snprintf(err, errlen, "the model is still loading");
		return NULL;
	}
	if (kvq_sched_snapshot(v->sched, &info, &n))
		goto out_nomem;
	o = json_object();
	list = json_array();
	if (!o || !list) {
		json_decref(o);
		json_decref(list);
		free(info);
		goto out_nomem;
	}
	bad |= set(o, "requests", list);
	for (i = 0; i < n && !bad; i++) {
		json_t *r = json_object();

		if (!r || json_array_append_new(list, r)) {
			bad = 1;
			break;
		}
		bad |= set(r, "id", json_integer((json_int_t)info[i].id));
		bad |= set(r, "tag", json_string(info[i].tag));
		bad |= set(r, "state",
			   json_string(kvq_sched_state_name(info[i].state)));
		bad |= set(r, "prompt_tokens",
			   json_integer(info[i].prompt_tokens));
		bad |= set(r, "prefilled_tokens",
			   json_integer(info[i].prefilled_tokens));
		bad |= set(r, "generated_tokens",
			   json_integer(info[i].generated_tokens));
		bad |= set(r, "max_tokens", json_integer(info[i].max_tokens));
		bad |= set(r, "age_s", json_real(info[i].age_s));
	}
	free(info);
	if (bad) {
		json_decref(o);
		goto out_nomem;
	}
	return o;

out_nomem:
	*code = -ENOMEM;
	snprintf(err, errlen, "out of memory");
	return NULL;
}

static json_t *config_key(const struct kvq_admin_view *v, int k)
{
	const struct kvq_config_key *key = kvq_config_key((size_t)k);
	char val[4096], where[4200];
	json_t *o = json_object();
	int bad = 0;

	if (!o)
		return NULL;
	kvq_config_format(v->conf, k, val, sizeof(val));
	kvq_config_where(v->conf, k, where, sizeof(where));
	if (key->secret && *val)
		snprintf(val, sizeof(val), "(set)");
	bad |= set(o, "key", json_string(key->name));
	bad |= set(o, "value", json_string(val));
	bad |= set(o, "source", json_string(where));
	bad |= set(o, "live", json_boolean(key->live));
	if (v->pending && !key->live && !kvq_config_equal(v->conf, v->pending,
							   k)) {
		kvq_config_format(v->pending, k, val, sizeof(val));
		if (key->secret)
			snprintf(val, sizeof(val), "(set)");
		bad |= set(o, "pending_restart", json_string(val));
	}
	if (bad) {
		json_decref(o);
		return NULL;
	}
	return o;
}

static json_t *cmd_config(const struct kvq_admin_view *v, int *code,
			  char *err, size_t errlen)
{
	json_t *o = json_object(), *list = json_array();
	size_t i;
	int bad = 0;

	if (!o || !list) {
		json_decref(list);
		goto out_nomem;
	}
	bad |= set(o, "file", jstr(v->conf->path));
	bad |= set(o, "file_missing", json_boolean(v->conf->path_missing));
	bad |= set(o, "keys", list);
	for (i = 0; i < kvq_config_n_keys() && !bad; i++) {
		json_t *k = config_key(v, (int)i);

		if (!k || json_array_append_new(list, k))
			bad = 1;
	}
	if (!bad)
		return o;
out_nomem:
	json_decref(o);
	*code = -ENOMEM;
	snprintf(err, errlen, "out of memory");
	return NULL;
}

static json_t *cmd_help(const struct kvq_admin_view *v, int *code,
			char *err, size_t errlen);

static const struct {
	const char *name;
	json_t *(*fn)(const struct kvq_admin_view *v, int *code, char *err,
		      size_t errlen);
	const char *help;
} commands[] = {
	{ "status", cmd_status, "state, model, request counters, KV use" },
	{ "tiers", cmd_tiers, "every tensor and KV chunk: tier, bytes, score" },
	{ "requests", cmd_requests, "queued and running requests" },
	{ "config", cmd_config, "every key, its value and where it came from" },
	{ "help", cmd_help, "this list" },
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

static json_t *cmd_help(const struct kvq_admin_view *v, int *code,
			char *err, size_t errlen)
{
	json_t *o = json_object();
	size_t i;

	for (i = 0; o && i < N_COMMANDS; i++) {
		if (set(o, commands[i].name, json_string(commands[i].help))) {
			json_decref(o);
			o = NULL;
		}
	}
	if (!o) {
		*code = -ENOMEM;
		snprintf(err, errlen, "out of memory");
	}
	return o;
}

json_t *kvq_admin_command(const struct kvq_admin_view *view, const char *cmd,
			  int *code, char *err, size_t errlen)
{
	size_t i;

	*code = 0;
	for (i = 0; i < N_COMMANDS; i++)
		if (!strcmp(cmd, commands[i].name))
			return commands[i].fn(view, code, err, errlen);
	*code = -ENOENT;
	snprintf(err, errlen, "unknown command '%s' (try 'help')", cmd);
	return NULL;
}

/* ---------------------------------------------------------------- wire */

static const char *code_name(int code)
{
	switch (code) {
	case -ENOENT:
		return "unknown_command";
	case -EAGAIN:
		return "unavailable";
	case -EINVAL:
		return "bad_request";
	default:
		return "internal";
	}
}

/* The reply line for one request line. */
static char *handle_line(struct kvq_admin *a, const char *line)
{
	json_t *req = NULL, *res = NULL, *reply;
	const char *cmd = NULL;
	char err[256] = "";
	int code = 0;
	char *out;

	while (*line == ' ' || *line == '\t')
		line++;
	if (*line == '{') {
		json_error_t je;

		req = json_loads(line, JSON_REJECT_DUPLICATES, &je);
		if (!req || !json_is_object(req)) {
			code = -EINVAL;
			snprintf(err, sizeof(err), "malformed JSON: %s",
				 req ? "not an object" : je.text);
		} else if (!json_is_string(json_object_get(req, "cmd"))) {
			code = -EINVAL;
			snprintf(err, sizeof(err),
				 "missing string field \"cmd\"");
		} else {
			cmd = json_string_value(json_object_get(req, "cmd"));
		}
	} else {
		cmd = line;
	}
	if (cmd)
		res = kvq_admin_command(a->view, cmd, &code, err, sizeof(err));
	if (res)
		reply = json_pack("{s:b, s:s, s:o}", "ok", 1, "cmd", cmd,
				  "result", res);
	else
		reply = json_pack("{s:b, s:{s:s, s:s}}", "ok", 0, "error",
				  "code", code_name(code), "message", err);
	json_decref(req);
	if (!reply)
		return NULL;
	out = json_dumps(reply, JSON_COMPACT);
	json_decref(reply);
	return out;
}

static void client_free(struct admin_client *c)
{
	struct kvq_admin *a = c->a;
	struct admin_client **pp;

	for (pp = &a->clients; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	a->n_clients--;
	bufferevent_free(c->bev);
	free(c);
}

static void client_write(struct bufferevent *bev, void *arg)
{
	struct admin_client *c = arg;

	if (c->closing)
		client_free(c);
}

/*
 * Queues a last reply (when @msg is set) and closes once it is written.
 * Returns true when @c was freed already.
 */
static bool client_close_after(struct admin_client *c, const char *msg)
{
	struct evbuffer *out = bufferevent_get_output(c->bev);

	if (msg)
		evbuffer_add_printf(out,
			"{\"ok\":false,\"error\":{\"code\":\"bad_request\",\"message\":\"%s\"}}\n",
			msg);
	c->closing = true;
	bufferevent_disable(c->bev, EV_READ);
	if (evbuffer_get_length(out))
		return false;
	client_free(c);
	return true;
}

/* Answers every complete line.  Returns true when @c was freed. */
static bool client_process(struct admin_client *c)
{
	struct evbuffer *in = bufferevent_get_input(c->bev);
	struct evbuffer *out = bufferevent_get_output(c->bev);
	char *line, *reply;
	size_t n;

	while ((line = evbuffer_readln(in, &n, EVBUFFER_EOL_LF))) {
		if (n && line[n - 1] == '\r')
			line[--n] = '\0';
		if (strlen(line) != n) {
			free(line);
			return client_close_after(c, "NUL byte in request");
		}
		if (!n) {
			free(line);
			continue;
		}
		reply = handle_line(c->a, line);
		free(line);
		if (!reply)
			return client_close_after(c, "out of memory");
		evbuffer_add(out, reply, strlen(reply));
		evbuffer_add(out, "\n", 1);
		free(reply);
	}
	if (evbuffer_get_length(in) > KVQ_ADMIN_MAX_LINE)
		return client_close_after(c, "request line too long");
	return false;
}

static void client_read(struct bufferevent *bev, void *arg)
{
	client_process(arg);
}

static void client_event(struct bufferevent *bev, short what, void *arg)
{
	struct admin_client *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);

	if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)))
		return;
	if ((what & BEV_EVENT_EOF) && !c->closing) {
		/* The client is done sending: answer, then close. */
		if (evbuffer_get_length(in)) {
			evbuffer_add(in, "\n", 1);
			if (client_process(c))
				return;
		}
		if (!c->closing)
			client_close_after(c, NULL);
		return;
	}
	client_free(c);
}

static void on_accept(struct evconnlistener *lev, evutil_socket_t fd,
		      struct sockaddr *sa, int salen, void *arg)
{
	struct kvq_admin *a = arg;
	struct timeval idle = { ADMIN_IDLE_S, 0 };
	struct admin_client *c;

	if (a->n_clients >= KVQ_ADMIN_MAX_CLIENTS) {
		kvq_warn("admin: too many clients (%d), closing a new one",
			 a->n_clients);
		evutil_closesocket(fd);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		evutil_closesocket(fd);
		return;
	}
	c->bev = bufferevent_socket_new(a->base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (!c->bev) {
		evutil_closesocket(fd);
		free(c);
		return;
	}
	c->a = a;
	c->next = a->clients;
	a->clients = c;
	a->n_clients++;
	bufferevent_setcb(c->bev, client_read, client_write, client_event, c);
	bufferevent_set_timeouts(c->bev, &idle, &idle);
	bufferevent_setwatermark(c->bev, EV_READ, 0, KVQ_ADMIN_MAX_LINE + 2);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

/* ----------------------------------------------------------- lifecycle */

/*
 * Removes a socket file that no process listens on.  Returns 0 when the
 * path is free, -EADDRINUSE when a server answers, -EEXIST when something
 * that is not a socket is there.
 */
static int clear_stale(const char *path, const struct sockaddr_un *sun,
		       socklen_t len)
{
	struct stat st;
	int fd, ret;

	if (lstat(path, &st))
		return errno == ENOENT ? 0 : -errno;
	if (!S_ISSOCK(st.st_mode))
		return -EEXIST;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	ret = connect(fd, (const struct sockaddr *)sun, len);
	close(fd);
	if (!ret)
		return -EADDRINUSE;
	if (unlink(path) && errno != ENOENT)
		return -errno;
	return 0;
}

int kvq_admin_create(struct event_base *base, const char *path,
		     const struct kvq_admin_view *view, struct kvq_admin **out,
		     char *err, size_t errlen)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	socklen_t len = sizeof(sun);
	struct kvq_admin *a;
	struct stat st;
	mode_t old;
	int fd, ret;

	if (strlen(path) >= sizeof(sun.sun_path)) {
		snprintf(err, errlen, "admin socket '%s': path too long", path);
		return -ENAMETOOLONG;
	}
	strcpy(sun.sun_path, path);
	a = calloc(1, sizeof(*a));
	if (!a)
		return -ENOMEM;
	a->base = base;
	a->view = view;
	a->path = strdup(path);
	if (!a->path) {
		ret = -ENOMEM;
		goto out_free;
	}

	ret = clear_stale(path, &sun, len);
	if (ret) {
		snprintf(err, errlen, "admin socket '%s': %s", path,
			 ret == -EADDRINUSE ? "another kvqd is listening there" :
			 ret == -EEXIST ? "exists and is not a socket" :
			 strerror(-ret));
		goto out_free;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		ret = -errno;
		snprintf(err, errlen, "admin socket: %s", strerror(-ret));
		goto out_free;
	}
	/* Never a moment with wider permissions than 0660. */
	old = umask(0117);
	ret = bind(fd, (struct sockaddr *)&sun, len) ? -errno : 0;
	umask(old);
	if (!ret && chmod(path, 0660))
		ret = -errno;
	if (!ret && listen(fd, 16))
		ret = -errno;
	if (!ret && stat(path, &st))
		ret = -errno;
	if (ret) {
		snprintf(err, errlen, "admin socket '%s': %s", path,
			 strerror(-ret));
		goto out_close;
	}
	a->dev = st.st_dev;
	a->ino = st.st_ino;
	a->lev = evconnlistener_new(base, on_accept, a, LEV_OPT_CLOSE_ON_FREE,
				    0, fd);
	if (!a->lev) {
		ret = -ENOMEM;
		snprintf(err, errlen, "admin socket '%s': event setup failed",
			 path);
		goto out_unlink;
	}
	*out = a;
	return 0;

out_unlink:
	unlink(path);
out_close:
	close(fd);
out_free:
	free(a->path);
	free(a);
	return ret;
}

void kvq_admin_destroy(struct kvq_admin *a)
{
	struct stat st;

	if (!a)
		return;
	while (a->clients)
		client_free(a->clients);
	evconnlistener_free(a->lev);
	/* Remove the file only if it is still ours. */
	if (!stat(a->path, &st) && st.st_dev == a->dev && st.st_ino == a->ino)
		unlink(a->path);
	free(a->path);
	free(a);
}
