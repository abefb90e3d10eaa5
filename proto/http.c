/*
 * http.c - the evhttp server: listening, limits, routing, authentication
 * and the small endpoints (health, models, tokenize, detokenize, metrics).
 *
 * Why this file exists: see http.h.  Completions live in complete.c; this
 * file decides who may call what and answers everything that does not
 * need the scheduler.  It also watches every connection while evhttp reads
 * a request (struct conn, below), because evhttp 2.1 silently drops a
 * client that stalls half-way through one and kvqd answers it with 408.
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>

#include "daemon/sched.h"
#include "engine/forward_gpu.h"
#include "engine/gguf.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "proto/http_impl.h"
#include "proto/metrics.h"

#define DEF_HOST "127.0.0.1"
#define DEF_PORT 8080
#define DEF_MODEL_ID "kvqd"
#define DEF_MAX_BODY (8ull << 20)
#define BODY_READ_CAP (64ull << 20)	/* see set_limits() */
#define DEF_MAX_HEADERS (16ull << 10)
#define DEF_IDLE_MS 30000

/* ------------------------------------------------------------- replies */

void kvq_http_count(struct kvq_http *h, int status)
{
	int c = status / 100;

	h->st.requests_total++;
	if (c >= 1 && c <= 5)
		h->st.by_status[c]++;
}

static const char *reason(int status)
{
	switch (status) {
	case 200: return "OK";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 413: return "Payload Too Large";
	case 429: return "Too Many Requests";
	case 500: return "Internal Server Error";
	case 503: return "Service Unavailable";
	case 504: return "Gateway Timeout";
	default: return NULL;
	}
}

void kvq_http_reply_json(struct kvq_http *h, struct evhttp_request *req,
			 int status, json_t *j)
{
	struct evbuffer *b = evbuffer_new();
	char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;

	json_decref(j);
	if (!s) {
		status = 500;
		s = strdup("{\"error\":{\"message\":\"out of memory\","
			   "\"type\":\"server_error\",\"param\":null,"
			   "\"code\":null}}");
	}
	if (b && s) {
		evbuffer_add(b, s, strlen(s));
		evbuffer_add(b, "\n", 1);
	}
	free(s);
	evhttp_add_header(evhttp_request_get_output_headers(req),
			  "Content-Type", "application/json");
	evhttp_send_reply(req, status, reason(status), b);
	kvq_http_count(h, status);
	if (b)
		evbuffer_free(b);
}

void kvq_http_reply_err(struct kvq_http *h, struct evhttp_request *req,
			const struct kvq_oai_err *e)
{
	if (e->status == 401)
		evhttp_add_header(evhttp_request_get_output_headers(req),
				  "WWW-Authenticate", "Bearer");
	if (e->status == 500)
		kvq_warn("http: %d %s", e->status, e->msg);
	else
		kvq_debug("http: %d %s", e->status, e->msg);
	kvq_http_reply_json(h, req, e->status, kvq_oai_error_json(e));
}

static void reply_text(struct kvq_http *h, struct evhttp_request *req,
		       const char *type, const char *s, size_t len)
{
	struct evbuffer *b = evbuffer_new();

	if (b)
		evbuffer_add(b, s, len);
	evhttp_add_header(evhttp_request_get_output_headers(req),
			  "Content-Type", type);
	evhttp_send_reply(req, 200, "OK", b);
	kvq_http_count(h, 200);
	if (b)
		evbuffer_free(b);
}

/* Body of @req as a contiguous buffer (NUL-terminated copy not needed:
 * jansson takes a length). */
static const char *body_of(struct evhttp_request *req, size_t *len)
{
	struct evbuffer *in = evhttp_request_get_input_buffer(req);

	*len = evbuffer_get_length(in);
	if (!*len)
		return "";
	return (const char *)evbuffer_pullup(in, -1);
}

/* ------------------------------------------------------------- endpoints */

static void on_health(struct kvq_http *h, struct evhttp_request *req)
{
	struct kvq_oai_err e;

	if (h->draining) {
		kvq_oai_fail(&e, 503, "unavailable_error", "draining", NULL,
			     "kvqd is shutting down");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	if (!h->ready || !h->sched) {
		kvq_oai_fail(&e, 503, "unavailable_error", "loading", NULL,
			     "the model is loading");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	kvq_http_reply_json(h, req, 200, json_pack("{s:s}", "status", "ok"));
}

static void on_models(struct kvq_http *h, struct evhttp_request *req)
{
	const struct kvq_hparams *hp = kvq_model_hparams(h->model);
	json_t *m;

	m = json_pack("{s:s, s:s, s:I, s:s, s:{s:s, s:i, s:i, s:I, s:s}}",
		      "id", h->model_id, "object", "model",
		      "created", (json_int_t)h->created, "owned_by", "kvqd",
		      "meta", "arch", hp->arch_name, "n_vocab", hp->n_vocab,
		      "n_ctx", (int)kvq_sched_opts(h->sched)->n_ctx,
		      "weight_bytes",
		      (json_int_t)kvq_model_weight_bytes(h->model),
		      "chat_template", kvq_chat_family_name(h->chat.fam));
	kvq_http_reply_json(h, req, 200,
			    json_pack("{s:s, s:[o]}", "object", "list",
				      "data", m));
}

/* Tokens of @text with BOS first when @add_special and the model wants
 * one; malloc'd into *out.  Returns the count or -errno. */
static int tokenize_all(const struct kvq_tokenizer *t, const char *text,
			size_t len, bool add_special, int32_t **out)
{
	int32_t bos = kvq_tokenizer_bos(t);
	bool want_bos = add_special && kvq_tokenizer_add_bos(t) && bos >= 0;
	int n, m, cap = (int)len + 8;
	int32_t *v;

	for (;;) {
		v = malloc(sizeof(*v) * (cap + 1));
		if (!v)
			return -ENOMEM;
		n = want_bos ? 1 : 0;
		if (want_bos)
			v[0] = bos;
		m = len ? kvq_tokenize(t, text, len, v + n, cap) : 0;
		if (m < 0) {
			free(v);
			return m;
		}
		if (m <= cap)
			break;
		free(v);
		cap = m;
	}
	*out = v;
	return n + m;
}

static void on_tokenize(struct kvq_http *h, struct evhttp_request *req)
{
	struct kvq_oai_tokenize t;
	struct kvq_oai_err e;
	const char *body;
	int32_t *ids = NULL;
	json_t *arr;
	size_t len;
	int n, i;

	body = body_of(req, &len);
	if (kvq_oai_parse_tokenize(body, len, &t, &e)) {
		kvq_http_reply_err(h, req, &e);
		return;
	}
	n = tokenize_all(h->tok, t.content, t.len, t.add_special, &ids);
	free(t.content);
	if (n < 0) {
		kvq_oai_fail(&e, 500, "server_error", NULL, NULL,
			     "tokenizing failed: %s", strerror(-n));
		kvq_http_reply_err(h, req, &e);
		return;
	}
	arr = json_array();
	for (i = 0; i < n; i++) {
		if (t.with_pieces) {
			const char *p = "";
			int pl = kvq_token_piece(h->tok, ids[i], &p);

			json_array_append_new(arr, json_pack("{s:i, s:o}",
				"id", ids[i],
				"piece", kvq_json_text(p, pl > 0 ? pl : 0)));
		} else {
			json_array_append_new(arr, json_integer(ids[i]));
		}
	}
	free(ids);
	kvq_http_reply_json(h, req, 200, json_pack("{s:o}", "tokens", arr));
}

static void on_detokenize(struct kvq_http *h, struct evhttp_request *req)
{
	struct kvq_oai_err e;
	struct kvq_detok d;
	const char *body;
	int32_t *ids;
	char *out;
	size_t len, cap, o = 0;
	int n, i, k;

	body = body_of(req, &len);
	if (kvq_oai_parse_detokenize(body, len, kvq_tokenizer_n_vocab(h->tok),
				     &ids, &n, &e)) {
		kvq_http_reply_err(h, req, &e);
		return;
	}
	cap = 64;
	for (i = 0; i < n; i++) {
		const char *p;
		int pl = kvq_token_piece(h->tok, ids[i], &p);

		cap += (pl > 0 ? pl : 0) + 8;
	}
	out = malloc(cap + 64);
	if (!out) {
		free(ids);
		kvq_oai_fail(&e, 500, "server_error", NULL, NULL,
			     "out of memory");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	kvq_detok_init(&d, h->tok);
	for (i = 0; i < n; i++) {
		k = kvq_detok_push(&d, ids[i], out + o, cap + 64 - o);
		if (k > 0)
			o += k;
	}
	k = kvq_detok_flush(&d, out + o, cap + 64 - o);
	if (k > 0)
		o += k;
	free(ids);
	kvq_http_reply_json(h, req, 200,
			    json_pack("{s:o}", "content", kvq_json_text(out, o)));
	free(out);
}

static void on_metrics(struct kvq_http *h, struct evhttp_request *req)
{
	struct kvq_sched_stats st;
	struct kvq_tier_bytes tb = { 0 };
	struct kvq_http_stats hs = h->st;
	char *s;
	size_t len;

	if (h->sched) {
		kvq_sched_stats(h->sched, &st);
		/* On a GPU the KV pages and the weights the steps read are in
		 * device memory; the model file stays mapped on the host. */
		if (st.on_gpu)
			tb.hbm = st.kv_bytes_used;
		else
			tb.host = st.kv_bytes_used;
	}
	if (h->model) {
		tb.host += kvq_model_weight_bytes(h->model);
		tb.hbm += kvq_model_gpu_bytes(h->model);
	}
	hs.requests_total++;
	hs.by_status[2]++;	/* this answer */
	s = kvq_metrics_render(h->sched ? &st : NULL, &hs, &tb, h->ready,
			       &len);
	if (!s) {
		struct kvq_oai_err e;

		kvq_oai_fail(&e, 500, "server_error", NULL, NULL,
			     "cannot format metrics");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	reply_text(h, req, "text/plain; version=0.0.4; charset=utf-8", s, len);
	free(s);
}

static void on_chat(struct kvq_http *h, struct evhttp_request *req)
{
	kvq_complete_handle(h, req, KVQ_OAI_CHAT);
}

static void on_completions(struct kvq_http *h, struct evhttp_request *req)
{
	kvq_complete_handle(h, req, KVQ_OAI_COMPLETION);
}

/* ------------------------------------------------------------- connections */

/*
 * evhttp 2.1 drops a connection whose request stops half-way (part of the
 * header, or fewer body bytes than Content-Length) at its read timeout,
 * without a word.  kvqd answers such a client with 408 and its JSON error
 * instead.  evhttp has no hook for that, so every connection's socket
 * bufferevent is made here (evhttp_set_bevcb()) and watched through its
 * buffers' callbacks; the read-side idle timeout is taken over from evhttp.
 *
 * States of a struct conn (all on the loop thread):
 *   NEW      --first timer run (evhttp has set its timeouts)-->  WATCHED
 *   WATCHED  --idle_timeout with no byte in or out while evhttp waits
 *              for a request-->  CLOSING (408 first when bytes of an
 *              incomplete request arrived, else just closed)
 *   any      --evhttp let go of the bufferevent-->  freed
 * That evhttp let go is noticed when the socket reports a shutdown (the
 * peer's or ours, EV_CLOSED), else at the next timer run, at most
 * idle_timeout later; until then the socket stays open.
 * Invariants:
 *   1. A conn holds one reference to its bufferevent, so @bev is valid for
 *      the conn's whole life; the socket closes (BEV_OPT_CLOSE_ON_FREE)
 *      only when that reference is dropped, so the descriptor that @closed
 *      watches is never another connection's.
 *   2. evhttp has let go of @bev exactly when all three of its callbacks
 *      are NULL (bufferevent_free() clears them); it never sets them again.
 *   3. @n_in counts bytes received since the last complete request (or
 *      since the last answer began): a connection with @n_in == 0 that
 *      goes quiet is idle, not stalled.
 */
struct conn {
	struct conn *prev, *next;
	struct http_server *srv;
	struct bufferevent *bev;
	struct event *timer;		/* idle deadline; also "check now" */
	struct event *closed;		/* EV_CLOSED on the socket, or NULL */
	struct evbuffer_cb_entry *in_cb, *out_cb;
	uint64_t n_in;			/* invariant 3 */
	uint64_t last_ns;		/* last byte read or written */
	bool watched;			/* evhttp's read timeout replaced */
	bool req_open;			/* a complete request, no answer yet */
	bool closing;			/* shut down here */
};

/* The server and the connections it watches; kvq_http comes first so that
 * the struct kvq_http pointers handed out are this object. */
struct http_server {
	struct kvq_http h;
	struct conn *conns;
};

static struct http_server *srv_of(struct kvq_http *h)
{
	return (struct http_server *)h;
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t idle_ns(const struct conn *c)
{
	return (uint64_t)c->srv->h.o.idle_timeout_ms * 1000000u;
}

static struct timeval ns_tv(uint64_t ns)
{
	struct timeval tv = {
		.tv_sec = ns / 1000000000u,
		.tv_usec = (ns % 1000000000u) / 1000,
	};

	return tv;
}

static void conn_arm(struct conn *c, uint64_t ns)
{
	struct timeval tv = ns_tv(ns);

	event_add(c->timer, &tv);
}

static void conn_free(struct conn *c)
{
	struct http_server *srv = c->srv;

	if (c->prev)
		c->prev->next = c->next;
	else
		srv->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	if (c->closed)
		event_free(c->closed);
	event_free(c->timer);
	evbuffer_remove_cb_entry(bufferevent_get_input(c->bev), c->in_cb);
	evbuffer_remove_cb_entry(bufferevent_get_output(c->bev), c->out_cb);
	bufferevent_decref(c->bev);
	free(c);
}

/* Invariant 2. */
static bool conn_dropped(struct conn *c)
{
	bufferevent_data_cb rd, wr;
	bufferevent_event_cb ev;

	bufferevent_getcb(c->bev, &rd, &wr, &ev, NULL);
	return !rd && !wr && !ev;
}

/* evhttp is waiting for (more of) a request: reading, with no request of
 * this connection in kvqd's hands. */
static bool conn_reading(struct conn *c)
{
	bufferevent_data_cb rd;

	bufferevent_getcb(c->bev, &rd, NULL, NULL, NULL);
	return rd && (bufferevent_get_enabled(c->bev) & EV_READ) &&
	       !c->req_open;
}

static void conn_in(struct evbuffer *b, const struct evbuffer_cb_info *info,
		    void *arg)
{
	struct conn *c = arg;

	if (info->n_added) {
		c->n_in += info->n_added;
		c->last_ns = mono_ns();
	}
}

static void conn_out(struct evbuffer *b, const struct evbuffer_cb_info *info,
		     void *arg)
{
	struct conn *c = arg;

	if (info->n_added) {
		/* an answer begins: its request was complete */
		c->req_open = false;
		c->n_in = evbuffer_get_length(bufferevent_get_input(c->bev));
	}
	if (info->n_added || info->n_deleted)
		c->last_ns = mono_ns();
}

/*
 * The 408, written straight to the socket: evhttp is reading and has
 * nothing queued to write, and the connection is shut down right after,
 * so nothing of evhttp's can follow it on the wire.
 */
static void conn_send_408(struct conn *c, evutil_socket_t fd)
{
	struct kvq_http *h = &c->srv->h;
	struct kvq_oai_err e;
	char head[160], *body;
	json_t *j;
	ssize_t n;
	size_t bl;
	int hl;

	kvq_oai_fail(&e, 408, "timeout_error", "request_timeout", NULL,
		     "the request was incomplete when the client fell silent "
		     "for idle_timeout (%u ms); the connection is closed",
		     h->o.idle_timeout_ms);
	j = kvq_oai_error_json(&e);
	body = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	if (!body) {
		kvq_warn("http: out of memory writing a 408; closing the "
			 "connection without it");
		return;
	}
	bl = strlen(body);
	hl = snprintf(head, sizeof(head), "HTTP/1.1 408 Request Timeout\r\n"
		      "Content-Type: application/json\r\n"
		      "Content-Length: %zu\r\nConnection: close\r\n\r\n",
		      bl + 1);
	body[bl] = '\n';	/* replaces the NUL; length kept in bl + 1 */
	n = send(fd, head, hl, MSG_NOSIGNAL | MSG_DONTWAIT);
	if (n == hl)
		n = send(fd, body, bl + 1, MSG_NOSIGNAL | MSG_DONTWAIT);
	free(body);
	if (n < 0)
		kvq_debug("http: 408 not delivered: %s", strerror(errno));
	kvq_debug("http: 408 to a client silent mid-request (%llu bytes)",
		  (unsigned long long)c->n_in);
	kvq_http_count(h, 408);
}

/* The socket saw its peer's (or our own) shutdown: check once evhttp has
 * handled the same wake-up, i.e. after the callbacks already active. */
static void conn_on_closed(evutil_socket_t fd, short what, void *arg)
{
	struct conn *c = arg;

	event_active(c->timer, EV_TIMEOUT, 1);
}

/* evhttp has set its timeouts: take over the read side. */
static void conn_watch(struct conn *c)
{
	struct event_base *base = c->srv->h.base;
	evutil_socket_t fd = bufferevent_getfd(c->bev);
	struct timeval wr = ns_tv(idle_ns(c));

	c->watched = true;
	/* writing to a client that reads nothing still times out in evhttp */
	bufferevent_set_timeouts(c->bev, NULL, &wr);
	if (fd < 0 || !(event_base_get_features(base) & EV_FEATURE_EARLY_CLOSE))
		return;
	c->closed = event_new(base, fd, EV_CLOSED, conn_on_closed, c);
	if (c->closed && event_add(c->closed, NULL)) {
		event_free(c->closed);
		c->closed = NULL;
	}
}

static void conn_timer(evutil_socket_t unused, short what, void *arg)
{
	struct conn *c = arg;
	uint64_t idle, quiet;
	evutil_socket_t fd;

	if (conn_dropped(c)) {
		conn_free(c);
		return;
	}
	if (!c->watched)
		conn_watch(c);
	idle = idle_ns(c);
	quiet = mono_ns() - c->last_ns;
	fd = bufferevent_getfd(c->bev);
	if (c->closing || fd < 0 || !conn_reading(c)) {
		conn_arm(c, idle);
		return;
	}
	if (quiet < idle) {
		conn_arm(c, idle - quiet);
		return;
	}
	if (c->n_in && !evbuffer_get_length(bufferevent_get_output(c->bev)))
		conn_send_408(c, fd);
	else if (c->n_in)
		kvq_debug("http: a client silent mid-request is closed without "
			  "a 408 (evhttp has output queued)");
	/* evhttp reads EOF and frees its side of the connection */
	shutdown(fd, SHUT_RDWR);
	c->closing = true;
	if (c->closed)
		event_add(c->closed, NULL);
	conn_arm(c, idle);
}

/*
 * evhttp_set_bevcb() callback: the bufferevent of a new connection, and
 * the conn that watches it.  Without memory for the conn the connection is
 * served unwatched (a stalled client is then dropped without a 408, as
 * evhttp does); without a bufferevent, evhttp makes its own.
 */
static struct bufferevent *conn_new(struct event_base *base, void *arg)
{
	static const struct timeval now;
	struct http_server *srv = arg;
	struct bufferevent *bev;
	struct conn *c;

	bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
	c = calloc(1, sizeof(*c));
	if (!bev || !c)
		goto out_unwatched;
	c->srv = srv;
	c->bev = bev;
	c->last_ns = mono_ns();
	c->timer = evtimer_new(base, conn_timer, c);
	c->in_cb = evbuffer_add_cb(bufferevent_get_input(bev), conn_in, c);
	c->out_cb = evbuffer_add_cb(bufferevent_get_output(bev), conn_out, c);
	if (!c->timer || !c->in_cb || !c->out_cb)
		goto out_unwatched;
	/* runs once evhttp has set the connection up (its timeouts too) */
	if (event_add(c->timer, &now))
		goto out_unwatched;
	bufferevent_incref(bev);
	c->next = srv->conns;
	if (srv->conns)
		srv->conns->prev = c;
	srv->conns = c;
	return bev;

out_unwatched:
	kvq_warn("http: out of memory watching a new connection; a client "
		 "that stalls on it is dropped without a 408");
	if (c) {
		if (c->in_cb)
			evbuffer_remove_cb_entry(bufferevent_get_input(bev),
						 c->in_cb);
		if (c->out_cb)
			evbuffer_remove_cb_entry(bufferevent_get_output(bev),
						 c->out_cb);
		if (c->timer)
			event_free(c->timer);
		free(c);
	}
	return bev;
}

/* A complete request arrived on @req's connection (invariant 3).  The
 * scan is linear in the open connections, a few pointer compares each. */
static void conn_request(struct kvq_http *h, struct evhttp_request *req)
{
	struct evhttp_connection *ec = evhttp_request_get_connection(req);
	struct bufferevent *bev;
	struct conn *c;

	bev = ec ? evhttp_connection_get_bufferevent(ec) : NULL;
	for (c = srv_of(h)->conns; c && bev; c = c->next) {
		if (c->bev != bev)
			continue;
		c->req_open = true;
		c->n_in = evbuffer_get_length(bufferevent_get_input(bev));
		return;
	}
}

/* ------------------------------------------------------------- routing */

enum {
	R_PUBLIC = 1 << 0,	/* no API key needed */
	R_MODEL = 1 << 1,	/* needs the model loaded */
};

struct route {
	const char *path;
	enum evhttp_cmd_type method;
	unsigned flags;
	void (*fn)(struct kvq_http *h, struct evhttp_request *req);
};

static const struct route routes[] = {
	{ "/health", EVHTTP_REQ_GET, R_PUBLIC, on_health },
	{ "/metrics", EVHTTP_REQ_GET, 0, on_metrics },
	{ "/v1/models", EVHTTP_REQ_GET, R_MODEL, on_models },
	{ "/v1/completions", EVHTTP_REQ_POST, R_MODEL, on_completions },
	{ "/v1/chat/completions", EVHTTP_REQ_POST, R_MODEL, on_chat },
	{ "/tokenize", EVHTTP_REQ_POST, R_MODEL, on_tokenize },
	{ "/detokenize", EVHTTP_REQ_POST, R_MODEL, on_detokenize },
};

static const char *method_name(enum evhttp_cmd_type m)
{
	switch (m) {
	case EVHTTP_REQ_GET: return "GET";
	case EVHTTP_REQ_POST: return "POST";
	case EVHTTP_REQ_HEAD: return "HEAD";
	case EVHTTP_REQ_PUT: return "PUT";
	case EVHTTP_REQ_DELETE: return "DELETE";
	case EVHTTP_REQ_OPTIONS: return "OPTIONS";
	case EVHTTP_REQ_TRACE: return "TRACE";
	case EVHTTP_REQ_CONNECT: return "CONNECT";
	case EVHTTP_REQ_PATCH: return "PATCH";
	default: return "?";
	}
}

/* Constant-time comparison of the bearer token with the key. */
static bool key_ok(const struct kvq_http *h, struct evhttp_request *req)
{
	const char *a = evhttp_find_header(evhttp_request_get_input_headers(req),
					   "Authorization");
	const unsigned char *k = (const unsigned char *)h->api_key;
	const unsigned char *t;
	size_t kl = strlen(h->api_key), tl, i;
	unsigned diff;

	if (!a || strncasecmp(a, "Bearer ", 7))
		return false;
	t = (const unsigned char *)a + 7;
	tl = strlen((const char *)t);
	diff = tl != kl;
	for (i = 0; i < kl; i++)
		diff |= k[i] ^ (i < tl ? t[i] : 0);
	return diff == 0;
}

static void on_request(struct evhttp_request *req, void *arg)
{
	struct kvq_http *h = arg;
	enum evhttp_cmd_type m = evhttp_request_get_command(req);
	const char *uri = evhttp_request_get_uri(req);
	const struct route *r = NULL;
	struct kvq_oai_err e;
	char path[256];
	size_t i, n;
	bool path_known = false;

	conn_request(h, req);
	n = evbuffer_get_length(evhttp_request_get_input_buffer(req));
	if (n > h->o.max_body_bytes) {
		kvq_oai_fail(&e, 413, "invalid_request_error", "body_too_large",
			     NULL,
			     "request body of %zu bytes is larger than max_body_bytes (%llu)",
			     n, (unsigned long long)h->o.max_body_bytes);
		kvq_http_reply_err(h, req, &e);
		return;
	}
	n = strcspn(uri, "?#");
	if (n >= sizeof(path))
		n = sizeof(path) - 1;
	memcpy(path, uri, n);
	path[n] = 0;
	while (n > 1 && path[n - 1] == '/')
		path[--n] = 0;

	for (i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		if (strcmp(routes[i].path, path))
			continue;
		path_known = true;
		if (routes[i].method == m ||
		    (m == EVHTTP_REQ_HEAD && routes[i].method == EVHTTP_REQ_GET))
			r = &routes[i];
	}
	if (!path_known) {
		kvq_oai_fail(&e, 404, "invalid_request_error", "not_found",
			     NULL, "Unknown request URL: %s %s",
			     method_name(m), path);
		kvq_http_reply_err(h, req, &e);
		return;
	}
	if (!r) {
		for (i = 0; i < sizeof(routes) / sizeof(routes[0]); i++)
			if (!strcmp(routes[i].path, path))
				evhttp_add_header(
					evhttp_request_get_output_headers(req),
					"Allow", method_name(routes[i].method));
		kvq_oai_fail(&e, 405, "invalid_request_error",
			     "method_not_allowed", NULL,
			     "%s is not allowed on %s", method_name(m), path);
		kvq_http_reply_err(h, req, &e);
		return;
	}
	if (!(r->flags & R_PUBLIC) && h->api_key && h->api_key[0] &&
	    !key_ok(h, req)) {
		kvq_oai_fail(&e, 401, "invalid_request_error",
			     "invalid_api_key", NULL, "a valid API key is "
			     "required: send the header 'Authorization: "
			     "Bearer KEY'");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	if ((r->flags & R_MODEL) && h->draining) {
		kvq_oai_fail(&e, 503, "unavailable_error", "draining", NULL,
			     "kvqd is shutting down");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	if ((r->flags & R_MODEL) && (!h->ready || !h->sched)) {
		kvq_oai_fail(&e, 503, "unavailable_error", "loading", NULL,
			     "the model is loading; retry shortly");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	r->fn(h, req);
}

/* ------------------------------------------------------------- lifecycle */

static int set_limits(struct kvq_http *h, const struct kvq_http_opts *o)
{
	struct timeval tv;
	char *key = NULL;

	if (o->api_key && o->api_key[0]) {
		key = strdup(o->api_key);
		if (!key)
			return -ENOMEM;
	}
	free(h->api_key);
	h->api_key = key;
	h->o.max_body_bytes = o->max_body_bytes ? o->max_body_bytes :
			      DEF_MAX_BODY;
	h->o.max_header_bytes = o->max_header_bytes ? o->max_header_bytes :
				DEF_MAX_HEADERS;
	h->o.idle_timeout_ms = o->idle_timeout_ms ? o->idle_timeout_ms :
			       DEF_IDLE_MS;
	/*
	 * libevent answers a body over its own limit with an HTML page; to
	 * answer with the JSON error, bodies up to BODY_READ_CAP are read
	 * and refused in on_request().  Larger ones still get libevent's
	 * 413 (PROTOCOL.md says so).
	 */
	evhttp_set_max_body_size(h->http, (ev_ssize_t)(h->o.max_body_bytes >
				 BODY_READ_CAP ? h->o.max_body_bytes :
				 BODY_READ_CAP));
	evhttp_set_max_headers_size(h->http,
				    (ev_ssize_t)h->o.max_header_bytes);
	tv.tv_sec = h->o.idle_timeout_ms / 1000;
	tv.tv_usec = (h->o.idle_timeout_ms % 1000) * 1000;
	evhttp_set_timeout_tv(h->http, &tv);
	return 0;
}

int kvq_http_set_limits(struct kvq_http *h, const struct kvq_http_opts *o)
{
	return set_limits(h, o);
}

static void chat_setup(struct kvq_http *h)
{
	const char *tmpl = NULL;
	uint64_t len = 0;

	if (h->chat_init)
		kvq_chat_fini(&h->chat);
	if (kvq_gguf_get_str(kvq_model_gguf(h->model),
			     "tokenizer.chat_template", &tmpl, &len))
		tmpl = NULL;
	if (kvq_chat_init(&h->chat, h->tok, tmpl, len))
		kvq_notice("http: chat completions unavailable: %s",
			   h->chat.why);
	else
		kvq_info("http: chat template: %s",
			 kvq_chat_family_name(h->chat.fam));
	h->chat_init = true;
}

/* The model's file name without directory and ".gguf", as its id. */
static void model_id_from_path(struct kvq_http *h)
{
	const struct kvq_gguf *g = kvq_model_gguf(h->model);
	const char *base;
	size_t n;
	char *id;

	if (!g || !g->path)
		return;
	base = strrchr(g->path, '/');
	base = base ? base + 1 : g->path;
	n = strlen(base);
	if (n > 5 && !strcmp(base + n - 5, ".gguf"))
		n -= 5;
	if (!n)
		return;
	id = strndup(base, n);
	if (!id)
		return;
	free(h->model_id);
	h->model_id = id;
	h->o.model_id = id;
}

void kvq_http_attach(struct kvq_http *h, struct kvq_sched *sched)
{
	h->sched = sched;
	h->model = sched ? kvq_sched_model(sched) : NULL;
	h->tok = h->model ? kvq_model_tokenizer(h->model) : NULL;
	if (!h->model)
		return;
	if (!h->model_id_set)
		model_id_from_path(h);
	chat_setup(h);
}

void kvq_http_set_ready(struct kvq_http *h, bool ready)
{
	h->ready = ready;
}

void kvq_http_stop_accepting(struct kvq_http *h)
{
	h->draining = true;
}

void kvq_http_stats(const struct kvq_http *h, struct kvq_http_stats *out)
{
	*out = h->st;
}

int kvq_http_create(struct event_base *base, struct kvq_sched *sched,
		    const struct kvq_http_opts *o, struct kvq_http **out,
		    char *err, size_t errlen)
{
	static const struct kvq_http_opts none;
	struct http_server *srv;
	struct kvq_http *h;
	int ret = -ENOMEM;

	if (!o)
		o = &none;
	if (evthread_make_base_notifiable(base) < 0) {
		snprintf(err, errlen, "http: the event base has no thread "
			 "support (evthread_use_pthreads() was not called)");
		return -EINVAL;
	}
	srv = calloc(1, sizeof(*srv));
	if (!srv)
		goto out_nomem;
	h = &srv->h;
	h->base = base;
	h->created = (long long)time(NULL);
	h->o.port = o->port ? o->port : DEF_PORT;
	h->host = strdup(o->host && o->host[0] ? o->host : DEF_HOST);
	h->model_id_set = o->model_id && o->model_id[0];
	h->model_id = strdup(h->model_id_set ? o->model_id : DEF_MODEL_ID);
	if (!h->host || !h->model_id)
		goto out_free;
	h->o.host = h->host;
	h->o.model_id = h->model_id;

	h->http = evhttp_new(base);
	if (!h->http)
		goto out_free;
	if (set_limits(h, o))
		goto out_http;
	evhttp_set_allowed_methods(h->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST |
				   EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT |
				   EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
				   EVHTTP_REQ_PATCH);
	/* read and drop the rest of an oversized body, so that a client that
	 * sends it without "Expect: 100-continue" still sees the 413 */
	evhttp_set_flags(h->http, EVHTTP_SERVER_LINGERING_CLOSE);
	evhttp_set_gencb(h->http, on_request, h);
	evhttp_set_bevcb(h->http, conn_new, srv);
	ret = kvq_complete_init(h);
	if (ret)
		goto out_http;

	errno = 0;
	h->sock = evhttp_bind_socket_with_handle(h->http, h->host, h->o.port);
	if (!h->sock) {
		ret = errno ? -errno : -EADDRNOTAVAIL;
		snprintf(err, errlen, "http: cannot listen on %s:%u: %s",
			 h->host, h->o.port, strerror(-ret));
		goto out_complete;
	}
	kvq_http_attach(h, sched);
	kvq_info("http: listening on %s:%u", h->host, h->o.port);
	*out = h;
	return 0;

out_complete:
	kvq_complete_fini(h);
out_http:
	evhttp_free(h->http);
out_free:
	free(h->host);
	free(h->model_id);
	free(h->api_key);
	free(srv);
out_nomem:
	if (ret == -ENOMEM)
		snprintf(err, errlen, "http: out of memory");
	return ret;
}

void kvq_http_destroy(struct kvq_http *h)
{
	struct http_server *srv;

	if (!h)
		return;
	srv = srv_of(h);
	kvq_complete_fini(h);
	evhttp_free(h->http);
	/* evhttp has let go of every bufferevent (invariant 2) */
	while (srv->conns)
		conn_free(srv->conns);
	if (h->chat_init)
		kvq_chat_fini(&h->chat);
	free(h->host);
	free(h->model_id);
	free(h->api_key);
	free(srv);
}
