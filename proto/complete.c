/*
 * complete.c - POST /v1/completions and /v1/chat/completions: from a
 * parsed request to scheduler requests, and from scheduler events to one
 * JSON body or a stream of server-sent events.
 *
 * Why this file exists: a completion outlives the callback that starts it.
 * Its state (struct hreq, one struct hchoice per choice) lives on the event
 * loop thread; the scheduler thread only appends copies of its events to
 * a locked queue and activates an event, whose callback applies them here.
 *
 * Life of a struct hreq (loop thread):
 *   1. created with every choice submitted (n_live = choices submitted);
 *   2. each scheduler DONE decrements n_live; when it reaches 0 the answer
 *      is completed (body, or last chunks and "data: [DONE]");
 *   3. a closed connection sets req to NULL and cancels the live choices;
 *   4. the hreq is freed when n_live is 0 -- never earlier, because the
 *      scheduler may still call the sinks that point into it.
 *
 * Delivery pace: waking the loop thread costs a system call on the
 * scheduler thread and a context switch that, on a machine whose cores all
 * decode, comes out of the engine steps -- unless it happens while the
 * scheduler samples a step's sequences one by one, when the engine's
 * workers idle.  So a step's first stream event wakes the loop only when
 * the last wake-up is FLUSH_NS old or more (or for a choice's first event,
 * or a final one); then the loop keeps up with the step's other events
 * while they are sampled, and after the step (on_step()) takes what is
 * left.  Events held back wait for a later step (struct evq).  A slow
 * model, or many streams, thus get every event within its step, and a
 * fast model with few streams gets its events in batches at most about
 * FLUSH_NS late.  Each wake-up writes one HTTP chunk per stream.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>

#include "daemon/sched.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "proto/http_impl.h"

/* Least time between two wake-ups of the loop for stream events. */
#define FLUSH_NS 1000000u

struct hchoice {
	struct hreq *hr;
	int index;
	int prompt;			/* which prompt */
	uint64_t id;			/* scheduler id */
	bool live;			/* submitted, DONE not yet seen */
	bool first_sent;		/* scheduler thread: an event queued */
	bool echo_pending;
	bool role_sent;
	enum kvq_finish finish;
	int completion_tokens;
	int cached_tokens;		/* of its prompt, from the prefix cache */
	int err;
	char errmsg[128];
	char *text;			/* non-streaming: the whole text */
	size_t len, cap;
	size_t text_pos;		/* bytes of text so far, for offsets */
	json_t *lp;			/* non-streaming logprobs */
};

struct hreq {
	struct kvq_http *h;
	struct hreq *prev, *next;
	struct evhttp_request *req;	/* NULL once answered or gone */
	struct evhttp_connection *conn;
	struct event *watch;		/* peer close, while answering */
	struct event *beat;		/* stream keep-alive timer */
	bool wrote;			/* a chunk went out since the last beat */
	struct evbuffer *out;		/* stream: events not yet sent */
	char *pre;			/* stream: event JSON to "choices" */
	size_t pre_len;
	bool error_sent;		/* a stream's error event is out */
	enum kvq_oai_kind kind;
	char id[48];
	long long created;
	bool stream;
	bool include_usage;
	int logprobs;
	int n_ch, n_live;
	struct hchoice *ch;
	int n_prompts;
	int *prompt_tokens;		/* per prompt */
	char **echo;			/* per prompt, when echo */
	size_t *echo_len;
};

/*
 * The pacing state of a server's event queue (h->qlock, h->qhead), hung
 * off h->qev's callback argument: struct kvq_http is shared with http.c.
 * All fields under h->qlock.
 */
struct evq {
	struct kvq_http *h;
	struct kvq_sched *sched;	/* loop thread: on_step() set on it */
	uint32_t n_held;		/* queued events that want the loop */
	bool woken;			/* qev made active, queue not yet taken */
	bool step_woke;			/* woken during the current step */
	uint64_t last_wake_ns;
};

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct evq *evq_of(struct kvq_http *h)
{
	return event_get_callback_arg(h->qev);
}

/* A scheduler event, copied for the loop thread. */
struct evitem {
	struct evitem *next;
	struct hchoice *c;
	enum kvq_sched_ev_kind kind;
	char *text;
	size_t len;
	struct kvq_sched_tok *tok;
	int n_tok;
	enum kvq_finish finish;
	struct kvq_sched_usage usage;
	int err;
	char errmsg[128];
};

static long long unix_now(void)
{
	return (long long)time(NULL);
}

/* ------------------------------------------------------------- sink */

/* Scheduler thread: copy @ev and wake the loop thread. */
static void sink_event(void *arg, const struct kvq_sched_event *ev)
{
	struct hchoice *c = arg;
	struct kvq_http *h = c->hr->h;
	struct evq *q = evq_of(h);
	size_t tb = sizeof(struct kvq_sched_tok) * ev->n_tok;
	struct evitem *it;
	uint64_t now;
	bool held, first, wake;

	it = malloc(sizeof(*it) + tb + ev->len + 1);
	if (!it) {
		if (ev->kind != KVQ_SCHED_EV_DONE)
			return;	/* text lost; the DONE below still ends it */
		it = calloc(1, sizeof(*it));
		if (!it) {
			kvq_err("http: out of memory delivering a final "
				"event; request %llu leaks",
				(unsigned long long)ev->req_id);
			return;
		}
		it->c = c;
		it->kind = ev->kind;
		it->finish = KVQ_FINISH_ERROR;
		it->err = -ENOMEM;
		snprintf(it->errmsg, sizeof(it->errmsg), "out of memory");
		goto queue;
	}
	memset(it, 0, sizeof(*it));
	it->c = c;
	it->kind = ev->kind;
	it->tok = (struct kvq_sched_tok *)(it + 1);
	it->n_tok = ev->n_tok;
	if (tb)
		memcpy(it->tok, ev->tok, tb);
	it->text = (char *)it->tok + tb;
	it->len = ev->len;
	if (ev->len)
		memcpy(it->text, ev->text, ev->len);
	it->text[ev->len] = 0;
	it->finish = ev->finish;
	it->usage = ev->usage;
	it->err = ev->err;
	if (ev->errmsg)
		snprintf(it->errmsg, sizeof(it->errmsg), "%s", ev->errmsg);
queue:
	/* a full-body answer needs the loop only for its end */
	held = c->hr->stream && ev->kind != KVQ_SCHED_EV_DONE;
	first = held && !c->first_sent;
	c->first_sent = c->first_sent || held;
	pthread_mutex_lock(&h->qlock);
	if (h->qtail)
		h->qtail->next = it;
	else
		h->qhead = it;
	h->qtail = it;
	q->n_held += held;
	wake = false;
	if (!q->woken && (held || ev->kind == KVQ_SCHED_EV_DONE)) {
		now = mono_ns();
		/* a final event may come outside a step: it goes at once;
		 * once a step has woken the loop, the loop keeps up with it */
		wake = !held || first || q->step_woke ||
		       now - q->last_wake_ns >= FLUSH_NS;
		if (wake) {
			q->woken = true;
			q->step_woke = q->step_woke || held;
			q->last_wake_ns = now;
		}
	}
	pthread_mutex_unlock(&h->qlock);
	if (wake)
		event_active(h->qev, EV_READ, 1);
}

/*
 * Scheduler thread, after each step (kvq_sched_set_step_cb()): wakes the
 * loop for the stream events it has not taken yet when the loop was woken
 * during this step (the rest of the step's events), or when it was last
 * woken FLUSH_NS ago or more (events held back by earlier steps).
 */
static void on_step(void *arg)
{
	struct evq *q = arg;
	struct kvq_http *h = q->h;
	uint64_t now;
	bool wake = false;

	pthread_mutex_lock(&h->qlock);
	if (q->n_held && !q->woken) {
		now = mono_ns();
		if (q->step_woke || now - q->last_wake_ns >= FLUSH_NS) {
			q->woken = true;
			q->last_wake_ns = now;
			wake = true;
		}
	}
	q->step_woke = false;
	pthread_mutex_unlock(&h->qlock);
	if (wake)
		event_active(h->qev, EV_READ, 1);
}

/* ------------------------------------------------------------- hreq */

static void hreq_free(struct hreq *hr)
{
	struct kvq_http *h = hr->h;
	int i;

	if (hr->prev)
		hr->prev->next = hr->next;
	else if (h->live == hr)
		h->live = hr->next;
	if (hr->next)
		hr->next->prev = hr->prev;
	for (i = 0; i < hr->n_ch; i++) {
		free(hr->ch[i].text);
		json_decref(hr->ch[i].lp);
	}
	for (i = 0; hr->echo && i < hr->n_prompts; i++)
		free(hr->echo[i]);
	free(hr->echo);
	free(hr->echo_len);
	free(hr->prompt_tokens);
	free(hr->ch);
	if (hr->out)
		evbuffer_free(hr->out);
	free(hr->pre);
	free(hr);
}

/* The answer is complete or abandoned: stop watching the connection. */
static void hreq_detach(struct hreq *hr)
{
	if (hr->watch) {
		event_free(hr->watch);
		hr->watch = NULL;
	}
	if (hr->beat) {
		event_free(hr->beat);
		hr->beat = NULL;
	}
	if (hr->conn)
		evhttp_connection_set_closecb(hr->conn, NULL, NULL);
	if (hr->req) {
		if (hr->stream && hr->h->st.streams)
			hr->h->st.streams--;
		if (hr->h->st.in_flight)
			hr->h->st.in_flight--;
	}
	hr->req = NULL;
	hr->conn = NULL;
}

static void cancel_live(struct hreq *hr)
{
	int i;

	for (i = 0; i < hr->n_ch; i++)
		if (hr->ch[i].live)
			kvq_sched_cancel(hr->h->sched, hr->ch[i].id);
}

/*
 * evhttp closed the connection (a failed write, a timeout).  It has already
 * let go of a request it was still answering; that request is ours to free.
 */
static void on_conn_close(struct evhttp_connection *conn, void *arg)
{
	struct hreq *hr = arg;
	struct evhttp_request *req = hr->req;

	if (!req)
		return;
	kvq_debug("http: %s: connection closed", hr->id);
	hreq_detach(hr);
	cancel_live(hr);
	if (!evhttp_request_get_connection(req))
		evhttp_request_free(req);
}

/*
 * The client closed its end while its answer is being computed (evhttp
 * itself reads nothing then, so it would only notice at the next write).
 * Cancel at once, which frees the KV, and drop the connection.
 */
static void on_peer_closed(evutil_socket_t fd, short what, void *arg)
{
	struct hreq *hr = arg;
	struct evhttp_connection *conn = hr->conn;

	kvq_debug("http: %s: client went away", hr->id);
	hreq_detach(hr);
	cancel_live(hr);
	if (conn)
		evhttp_connection_free(conn);
}

/*
 * A stream that is queued, or whose tokens come slowly, writes nothing for
 * a while; evhttp would then close it at the idle timeout.  An SSE comment
 * line (ignored by clients) keeps it alive, and keeps proxies from timing
 * it out too.
 */
static void on_beat(evutil_socket_t fd, short what, void *arg)
{
	struct hreq *hr = arg;
	struct evbuffer *b;

	if (!hr->req)
		return;
	if (hr->wrote) {
		hr->wrote = false;
		return;
	}
	b = evbuffer_new();
	if (!b)
		return;
	evbuffer_add_printf(b, ": keep-alive\n\n");
	evhttp_send_reply_chunk(hr->req, b);
	evbuffer_free(b);
}

static void start_beat(struct hreq *hr)
{
	uint32_t ms = hr->h->o.idle_timeout_ms / 3;
	struct timeval tv;

	if (ms < 200)
		ms = 200;
	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	hr->beat = event_new(hr->h->base, -1, EV_PERSIST, on_beat, hr);
	if (hr->beat && event_add(hr->beat, &tv)) {
		event_free(hr->beat);
		hr->beat = NULL;
	}
}

static void watch_peer(struct hreq *hr)
{
	struct bufferevent *bev;
	evutil_socket_t fd;

	if (!(event_base_get_features(hr->h->base) & EV_FEATURE_EARLY_CLOSE))
		return;
	bev = evhttp_connection_get_bufferevent(hr->conn);
	fd = bev ? bufferevent_getfd(bev) : -1;
	if (fd < 0)
		return;
	hr->watch = event_new(hr->h->base, fd, EV_CLOSED, on_peer_closed, hr);
	if (hr->watch && event_add(hr->watch, NULL)) {
		event_free(hr->watch);
		hr->watch = NULL;
	}
}

/* ------------------------------------------------------------- logprobs */

static json_t *piece_json(const struct kvq_tokenizer *t, int32_t id)
{
	const char *p = "";
	int n = kvq_token_piece(t, id, &p);

	return kvq_json_text(p, n > 0 ? n : 0);
}

static json_t *piece_bytes(const struct kvq_tokenizer *t, int32_t id)
{
	const char *p = "";
	int n = kvq_token_piece(t, id, &p), i;
	json_t *a = json_array();

	for (i = 0; i < n; i++)
		json_array_append_new(a, json_integer((unsigned char)p[i]));
	return a;
}

static json_t *lp_value(float v)
{
	return isnan(v) ? json_null() : json_real(isinf(v) ? -9999.0 : v);
}

/* Completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} */
static json_t *lp_completion_new(void)
{
	return json_pack("{s:[], s:[], s:[], s:[]}", "tokens",
			 "token_logprobs", "top_logprobs", "text_offset");
}

static void lp_completion_add(const struct kvq_tokenizer *t, json_t *lp,
			      const struct kvq_sched_tok *tok, int n,
			      size_t *pos)
{
	int i, j;

	for (i = 0; i < n; i++) {
		const struct kvq_sched_tok *k = &tok[i];
		const char *p = "";
		int pl = kvq_token_piece(t, k->id, &p);
		json_t *top;

		json_array_append_new(json_object_get(lp, "tokens"),
				      piece_json(t, k->id));
		json_array_append_new(json_object_get(lp, "token_logprobs"),
				      lp_value(k->logprob));
		if (isnan(k->logprob)) {
			top = json_null();
		} else {
			top = json_object();
			for (j = 0; j < k->n_top; j++) {
				json_t *s = piece_json(t, k->top[j].id);

				json_object_set_new(top, json_string_value(s),
						    lp_value(k->top[j].logprob));
				json_decref(s);
			}
			{
				json_t *s = piece_json(t, k->id);

				json_object_set_new(top, json_string_value(s),
						    lp_value(k->logprob));
				json_decref(s);
			}
		}
		json_array_append_new(json_object_get(lp, "top_logprobs"), top);
		json_array_append_new(json_object_get(lp, "text_offset"),
				      json_integer((json_int_t)*pos));
		*pos += pl > 0 ? pl : 0;
	}
}

/* Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs"}],
 * "refusal": null} */
static json_t *lp_chat_new(void)
{
	return json_pack("{s:[], s:n}", "content", "refusal");
}

static void lp_chat_add(const struct kvq_tokenizer *t, json_t *lp,
			const struct kvq_sched_tok *tok, int n)
{
	int i, j;

	for (i = 0; i < n; i++) {
		json_t *top = json_array();

		for (j = 0; j < tok[i].n_top; j++)
			json_array_append_new(top, json_pack("{s:o, s:o, s:o}",
				"token", piece_json(t, tok[i].top[j].id),
				"logprob", lp_value(tok[i].top[j].logprob),
				"bytes", piece_bytes(t, tok[i].top[j].id)));
		json_array_append_new(json_object_get(lp, "content"),
			json_pack("{s:o, s:o, s:o, s:o}",
				  "token", piece_json(t, tok[i].id),
				  "logprob", lp_value(tok[i].logprob),
				  "bytes", piece_bytes(t, tok[i].id),
				  "top_logprobs", top));
	}
}

/* ------------------------------------------------------------- answers */

static json_t *envelope(struct hreq *hr, bool chunk)
{
	const char *obj;

	if (hr->kind == KVQ_OAI_CHAT)
		obj = chunk ? "chat.completion.chunk" : "chat.completion";
	else
		obj = "text_completion";
	return json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", hr->id,
			 "object", obj, "created", (json_int_t)hr->created,
			 "model", hr->h->model_id,
			 "system_fingerprint", "kvqd");
}

/* Prompt tokens count once per prompt, and so do their cached tokens (the
 * most any of the prompt's choices shared). */
static void usage_totals(struct hreq *hr, int *prompt, int *completion,
			 int *cached)
{
	int i, j;

	*prompt = 0;
	*completion = 0;
	*cached = 0;
	for (i = 0; i < hr->n_prompts; i++) {
		int most = 0;

		*prompt += hr->prompt_tokens[i];
		for (j = 0; j < hr->n_ch; j++)
			if (hr->ch[j].prompt == i &&
			    hr->ch[j].cached_tokens > most)
				most = hr->ch[j].cached_tokens;
		*cached += most;
	}
	for (i = 0; i < hr->n_ch; i++)
		*completion += hr->ch[i].completion_tokens;
}

/* Queues one event with @j (reference stolen) for the next flush. */
static void sse_send(struct hreq *hr, json_t *j)
{
	char *s;

	if (!hr->req || !hr->out) {
		json_decref(j);
		return;
	}
	s = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	if (s)
		evbuffer_add_printf(hr->out, "data: %s\n\n", s);
	else
		kvq_warn("http: %s: out of memory; a stream event is lost",
			 hr->id);
	free(s);
}

/* Hands the queued events of @hr to evhttp as one chunk. */
static void sse_flush(struct hreq *hr)
{
	if (!hr->req || !hr->out || !evbuffer_get_length(hr->out))
		return;
	evhttp_send_reply_chunk(hr->req, hr->out);
	hr->wrote = true;
}

/*
 * @s as the inside of a JSON string, as jansson writes kvq_json_text(@s):
 * each byte that is not part of valid UTF-8 becomes U+FFFD; '"', '\\' and
 * control characters are escaped.  @out has room for 6 * @len bytes.
 * Returns the bytes written.
 */
static size_t json_escape(char *out, const char *s, size_t len)
{
	static const char hex[] = "0123456789ABCDEF";
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0, o = 0;
	int k;

	while (i < len) {
		unsigned char ch = p[i];

		if (ch >= 0x20 && ch < 0x80 && ch != '"' && ch != '\\') {
			out[o++] = ch;
			i++;
			continue;
		}
		if (ch >= 0x80) {
			/* the sequence's length from its first byte, then
			 * checked whole, as kvq_json_text() decides */
			k = ch >= 0xf0 ? (ch <= 0xf4 ? 4 : 0) :
			    ch >= 0xe0 ? 3 : ch >= 0xc2 ? 2 : 0;
			if (k && ((size_t)k > len - i ||
				  !kvq_utf8_valid(s + i, k)))
				k = 0;
			if (k > 0) {
				memcpy(out + o, s + i, k);
				o += k;
				i += k;
			} else {
				memcpy(out + o, "\xef\xbf\xbd", 3);
				o += 3;
				i++;
			}
			continue;
		}
		out[o++] = '\\';
		switch (ch) {
		case '"': out[o++] = '"'; break;
		case '\\': out[o++] = '\\'; break;
		case '\b': out[o++] = 'b'; break;
		case '\f': out[o++] = 'f'; break;
		case '\n': out[o++] = 'n'; break;
		case '\r': out[o++] = 'r'; break;
		case '\t': out[o++] = 't'; break;
		default:
			memcpy(out + o, "u00", 3);
			out[o + 3] = hex[ch >> 4];
			out[o + 4] = hex[ch & 15];
			o += 5;
		}
		i++;
	}
	return o;
}

/* Appends the string literal @lit at @o + *@n. */
#define PUT(o, n, lit) do {						\
		memcpy((o) + *(n), lit, sizeof(lit) - 1);		\
		*(n) += sizeof(lit) - 1;				\
	} while (0)

/*
 * The start of every event of a stream, up to the choices:
 * 'data: {"id":...,"system_fingerprint":"kvqd","choices":[' (the same
 * fields, in the same order, as envelope()).  Returns 0 or -ENOMEM.
 */
static int stream_prefix(struct hreq *hr)
{
	const char *model = hr->h->model_id;
	size_t il = strlen(hr->id), ml = strlen(model), n = 0;
	char *o;

	o = malloc(6 * (il + ml) + 160);
	if (!o)
		return -ENOMEM;
	PUT(o, &n, "data: {\"id\":\"");
	n += json_escape(o + n, hr->id, il);
	n += sprintf(o + n, "\",\"object\":\"%s\",\"created\":%lld,"
		     "\"model\":\"", hr->kind == KVQ_OAI_CHAT ?
		     "chat.completion.chunk" : "text_completion",
		     hr->created);
	n += json_escape(o + n, model, ml);
	PUT(o, &n, "\",\"system_fingerprint\":\"kvqd\",\"choices\":[");
	hr->pre = o;
	hr->pre_len = n;
	return 0;
}

/*
 * stream_chunk() for a stream without logprobs, written straight into
 * hr->out: the same JSON as envelope() and the choice built with jansson,
 * without building it, because it runs once per token and stream.
 */
static void stream_chunk_plain(struct hreq *hr, struct hchoice *c,
			       const char *text, size_t len,
			       const char *finish)
{
	bool content = len || !finish;
	struct evbuffer_iovec v;
	size_t n;
	char *o;

	if (!hr->req || !hr->out)
		return;
	if (evbuffer_reserve_space(hr->out, hr->pre_len + 6 * len + 192, &v,
				   1) < 1) {
		kvq_warn("http: %s: out of memory; a stream event is lost",
			 hr->id);
		return;
	}
	o = v.iov_base;
	memcpy(o, hr->pre, hr->pre_len);
	n = hr->pre_len;
	n += sprintf(o + n, "{\"index\":%d,", c->index);
	if (hr->kind == KVQ_OAI_CHAT) {
		PUT(o, &n, "\"delta\":{");
		if (!c->role_sent) {
			PUT(o, &n, "\"role\":\"assistant\"");
			if (content)
				PUT(o, &n, ",");
			c->role_sent = true;
		}
		if (content) {
			PUT(o, &n, "\"content\":\"");
			n += json_escape(o + n, text, len);
			PUT(o, &n, "\"");
		}
		PUT(o, &n, "},");
	} else {
		PUT(o, &n, "\"text\":\"");
		n += json_escape(o + n, text, len);
		PUT(o, &n, "\",");
	}
	PUT(o, &n, "\"logprobs\":null,\"finish_reason\":");
	if (finish)
		n += sprintf(o + n, "\"%s\"}]", finish);
	else
		PUT(o, &n, "null}]");
	if (hr->include_usage)
		PUT(o, &n, ",\"usage\":null");
	PUT(o, &n, "}\n\n");
	v.iov_len = n;
	evbuffer_commit_space(hr->out, &v, 1);
}

/* One streamed chunk for choice @c with @text and logprobs @tok. */
static void stream_chunk(struct hreq *hr, struct hchoice *c, const char *text,
			 size_t len, const struct kvq_sched_tok *tok, int n_tok,
			 const char *finish)
{
	const struct kvq_tokenizer *t = hr->h->tok;
	json_t *env, *choice, *lp;

	if (hr->logprobs < 0) {
		stream_chunk_plain(hr, c, text, len, finish);
		return;
	}
	env = envelope(hr, true);
	lp = json_null();
	if (n_tok || finish) {
		json_decref(lp);
		if (hr->kind == KVQ_OAI_CHAT) {
			lp = lp_chat_new();
			lp_chat_add(t, lp, tok, n_tok);
		} else {
			lp = lp_completion_new();
			lp_completion_add(t, lp, tok, n_tok, &c->text_pos);
		}
	}
	if (hr->kind == KVQ_OAI_CHAT) {
		json_t *delta = json_object();

		if (!c->role_sent) {
			json_object_set_new(delta, "role",
					    json_string("assistant"));
			c->role_sent = true;
		}
		if (len || !finish)
			json_object_set_new(delta, "content",
					    kvq_json_text(text, len));
		choice = json_pack("{s:i, s:o, s:o, s:o}", "index", c->index,
				   "delta", delta, "logprobs", lp,
				   "finish_reason",
				   finish ? json_string(finish) : json_null());
	} else {
		choice = json_pack("{s:i, s:o, s:o, s:o}", "index", c->index,
				   "text", kvq_json_text(text, len),
				   "logprobs", lp, "finish_reason",
				   finish ? json_string(finish) : json_null());
	}
	json_object_set_new(env, "choices", json_pack("[o]", choice));
	if (hr->include_usage)
		json_object_set_new(env, "usage", json_null());
	sse_send(hr, env);
}

static void stream_error(struct hreq *hr, int status, const char *type,
			 const char *code, const char *msg)
{
	struct kvq_oai_err e;

	kvq_oai_fail(&e, status, type, code, NULL, "%s", msg);
	sse_send(hr, kvq_oai_error_json(&e));
}

static void stream_end(struct hreq *hr)
{
	int p, c, k;

	if (!hr->req)
		return;
	if (hr->include_usage) {
		json_t *env = envelope(hr, true);

		usage_totals(hr, &p, &c, &k);
		json_object_set_new(env, "choices", json_array());
		json_object_set_new(env, "usage", kvq_oai_usage_json(p, c, k));
		sse_send(hr, env);
	}
	if (hr->out)
		evbuffer_add(hr->out, "data: [DONE]\n\n", 14);
	sse_flush(hr);
	{
		struct evhttp_request *req = hr->req;

		hreq_detach(hr);
		evhttp_send_reply_end(req);
	}
}

/* Status and error for a choice that did not finish normally. */
static bool choice_failed(const struct hchoice *c, struct kvq_oai_err *e)
{
	switch (c->finish) {
	case KVQ_FINISH_ERROR:
		kvq_oai_fail(e, 500, "server_error", NULL, NULL, "%s",
			     c->errmsg[0] ? c->errmsg : "generation failed");
		return true;
	case KVQ_FINISH_TIMEOUT:
		kvq_oai_fail(e, 504, "timeout_error", "request_timeout", NULL,
			     "the request took longer than the server allows");
		return true;
	case KVQ_FINISH_CANCELLED:
		kvq_oai_fail(e, 503, "unavailable_error", "cancelled", NULL,
			     "the request was cancelled (kvqd is shutting "
			     "down)");
		return true;
	default:
		return false;
	}
}

static void reply_full(struct hreq *hr)
{
	struct kvq_oai_err e;
	struct evhttp_request *req = hr->req;
	json_t *env, *choices;
	int i, p, c, k;

	for (i = 0; i < hr->n_ch; i++)
		if (choice_failed(&hr->ch[i], &e)) {
			hreq_detach(hr);
			kvq_http_reply_err(hr->h, req, &e);
			return;
		}
	env = envelope(hr, false);
	choices = json_array();
	for (i = 0; i < hr->n_ch; i++) {
		struct hchoice *ch = &hr->ch[i];
		const char *fin = kvq_finish_name(ch->finish);
		json_t *lp = ch->lp ? json_incref(ch->lp) : json_null();

		if (hr->kind == KVQ_OAI_CHAT)
			json_array_append_new(choices, json_pack(
				"{s:i, s:{s:s, s:o, s:n}, s:o, s:s?}",
				"index", ch->index, "message", "role",
				"assistant", "content",
				kvq_json_text(ch->text, ch->len), "refusal",
				"logprobs", lp, "finish_reason", fin));
		else
			json_array_append_new(choices, json_pack(
				"{s:o, s:i, s:o, s:s?}",
				"text", kvq_json_text(ch->text, ch->len),
				"index", ch->index, "logprobs", lp,
				"finish_reason", fin));
	}
	json_object_set_new(env, "choices", choices);
	usage_totals(hr, &p, &c, &k);
	json_object_set_new(env, "usage", kvq_oai_usage_json(p, c, k));
	hreq_detach(hr);
	kvq_http_reply_json(hr->h, req, 200, env);
}

static int text_add(struct hchoice *c, const char *s, size_t len)
{
	size_t cap = c->cap ? c->cap : 256;
	char *p;

	if (!len)
		return 0;
	while (cap < c->len + len + 1)
		cap *= 2;
	if (cap != c->cap) {
		p = realloc(c->text, cap);
		if (!p)
			return -ENOMEM;
		c->text = p;
		c->cap = cap;
	}
	memcpy(c->text + c->len, s, len);
	c->len += len;
	c->text[c->len] = 0;
	return 0;
}

/* Applies one scheduler event on the loop thread. */
static void apply(struct kvq_http *h, struct evitem *it)
{
	struct hchoice *c = it->c;
	struct hreq *hr = c->hr;
	const char *echo = NULL;
	size_t echo_len = 0;
	const struct kvq_sched_tok *tok = it->tok;
	int n_tok = it->n_tok;

	if (c->echo_pending) {
		echo = hr->echo[c->prompt];
		echo_len = hr->echo_len[c->prompt];
		c->echo_pending = false;
	}
	if (it->kind == KVQ_SCHED_EV_DONE) {
		c->live = false;
		hr->n_live--;
		c->finish = it->finish;
		c->completion_tokens = it->usage.completion_tokens;
		c->cached_tokens = it->usage.cached_tokens;
		c->err = it->err;
		snprintf(c->errmsg, sizeof(c->errmsg), "%s", it->errmsg);
	}
	if (!hr->req)
		goto out;

	if (hr->stream) {
		const char *fin = NULL;

		/* after its error event a stream only gets "data: [DONE]" */
		if (hr->error_sent)
			goto out;
		if (echo && (echo_len || it->kind == KVQ_SCHED_EV_PROMPT))
			stream_chunk(hr, c, echo, echo_len,
				     it->kind == KVQ_SCHED_EV_PROMPT ? tok :
				     NULL,
				     it->kind == KVQ_SCHED_EV_PROMPT ? n_tok :
				     0, NULL);
		if (it->kind == KVQ_SCHED_EV_PROMPT)
			goto out;
		if (it->kind == KVQ_SCHED_EV_DONE) {
			struct kvq_oai_err e;

			if (choice_failed(c, &e)) {
				stream_error(hr, e.status, e.type, e.code,
					     e.msg);
				hr->error_sent = true;
				hr->include_usage = false;
				/* the other choices' text has nowhere to go */
				cancel_live(hr);
				goto out;
			}
			fin = kvq_finish_name(c->finish);
		}
		if (it->len || n_tok || fin || (hr->kind == KVQ_OAI_CHAT &&
						!c->role_sent))
			stream_chunk(hr, c, it->text, it->len, tok, n_tok,
				     fin);
		goto out;
	}

	if (echo && text_add(c, echo, echo_len))
		c->err = -ENOMEM;
	if (text_add(c, it->text, it->len))
		c->err = -ENOMEM;
	if (hr->logprobs >= 0 && n_tok) {
		if (!c->lp)
			c->lp = hr->kind == KVQ_OAI_CHAT ? lp_chat_new() :
				lp_completion_new();
		if (hr->kind == KVQ_OAI_CHAT)
			lp_chat_add(h->tok, c->lp, tok, n_tok);
		else
			lp_completion_add(h->tok, c->lp, tok, n_tok,
					  &c->text_pos);
	}
out:
	if (it->kind == KVQ_SCHED_EV_DONE && !hr->n_live) {
		if (hr->req) {
			if (hr->stream)
				stream_end(hr);
			else
				reply_full(hr);
		}
		hreq_free(hr);
	}
}

/*
 * Loop thread: everything the scheduler sent since last time, then one
 * chunk per stream.
 */
static void on_events(evutil_socket_t fd, short what, void *arg)
{
	struct evq *q = arg;
	struct kvq_http *h = q->h;
	struct evitem *it, *next;
	struct hreq *hr;

	pthread_mutex_lock(&h->qlock);
	it = h->qhead;
	h->qhead = h->qtail = NULL;
	q->n_held = 0;
	q->woken = false;
	pthread_mutex_unlock(&h->qlock);
	if (!it)
		return;
	for (; it; it = next) {
		next = it->next;
		apply(h, it);
		free(it);
	}
	for (hr = h->live; hr; hr = hr->next)
		sse_flush(hr);
}

/* ------------------------------------------------------------- requests */

static int status_of(int err)
{
	switch (err) {
	case -EAGAIN:
		return 429;
	case -ESHUTDOWN:
		return 503;
	case -EINVAL:
	case -E2BIG:
		return 400;
	default:
		return 500;
	}
}

static void submit_error(struct kvq_oai_err *e, int err)
{
	switch (err) {
	case -EAGAIN:
		kvq_oai_fail(e, 429, "rate_limit_error", "rate_limit_exceeded",
			     NULL, "too many requests are queued; retry "
			     "later");
		break;
	case -ESHUTDOWN:
		kvq_oai_fail(e, 503, "unavailable_error", "draining", NULL,
			     "kvqd is shutting down");
		break;
	case -E2BIG:
		kvq_oai_bad(e, "max_tokens", "the prompt and max_tokens do not "
			    "fit in the context");
		break;
	case -EINVAL:
		kvq_oai_bad(e, NULL, "invalid sampling settings or token ids");
		break;
	default:
		kvq_oai_fail(e, status_of(err), "server_error", NULL, NULL,
			     "cannot queue the request: %s", strerror(-err));
	}
}

/* Tokens of prompt @p (BOS added to text the way the model wants). */
static int prompt_tokens(struct kvq_http *h, const struct kvq_oai_prompt *p,
			 int32_t **ids, int *n, struct kvq_oai_err *e)
{
	const struct kvq_tokenizer *t = h->tok;
	int32_t bos = kvq_tokenizer_bos(t);
	int lead = kvq_tokenizer_add_bos(t) && bos >= 0 ? 1 : 0;
	int cap = (int)p->len + 8, m;
	int32_t *v;

	if (!p->text) {
		*ids = malloc(sizeof(int32_t) * (p->n_ids ? p->n_ids : 1));
		if (!*ids)
			goto nomem;
		memcpy(*ids, p->ids, sizeof(int32_t) * p->n_ids);
		*n = p->n_ids;
		return 0;
	}
	for (;;) {
		v = malloc(sizeof(*v) * (cap + lead));
		if (!v)
			goto nomem;
		if (lead)
			v[0] = bos;
		m = p->len ? kvq_tokenize(t, p->text, p->len, v + lead, cap) :
		    0;
		if (m < 0) {
			free(v);
			return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
					    "tokenizing failed: %s",
					    strerror(-m));
		}
		if (m <= cap)
			break;
		free(v);
		cap = m;
	}
	*ids = v;
	*n = m + lead;
	return 0;
nomem:
	return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
			    "out of memory");
}

/* Prompt text for echo of a token-id prompt. */
static char *detok_all(const struct kvq_tokenizer *t, const int32_t *ids,
		       int n, size_t *len)
{
	struct kvq_detok d;
	size_t cap = 64, o = 0;
	char *s;
	int i, k;

	for (i = 0; i < n; i++) {
		const char *p;
		int pl = kvq_token_piece(t, ids[i], &p);

		cap += (pl > 0 ? pl : 0) + 8;
	}
	s = malloc(cap + 64);
	if (!s)
		return NULL;
	kvq_detok_init(&d, t);
	for (i = 0; i < n; i++) {
		k = kvq_detok_push(&d, ids[i], s + o, cap + 64 - o);
		if (k > 0)
			o += k;
	}
	k = kvq_detok_flush(&d, s + o, cap + 64 - o);
	if (k > 0)
		o += k;
	s[o] = 0;
	*len = o;
	return s;
}

static int check_limits(struct kvq_http *h, const struct kvq_oai_req *r,
			int n_prompt, struct kvq_oai_err *e)
{
	const struct kvq_sched_opts *so = kvq_sched_opts(h->sched);
	const char *mt = "max_tokens";

	if (n_prompt < 1)
		return kvq_oai_bad(e, r->kind == KVQ_OAI_CHAT ? "messages" :
				   "prompt", "the prompt is empty");
	if ((uint32_t)r->max_tokens > so->max_tokens_limit)
		return kvq_oai_bad(e, mt, "max_tokens is %d; this server allows "
				   "at most %u", r->max_tokens,
				   so->max_tokens_limit);
	if ((uint32_t)n_prompt >= so->n_ctx)
		return kvq_oai_fail(e, 400, "invalid_request_error",
				    "context_length_exceeded",
				    r->kind == KVQ_OAI_CHAT ? "messages" :
				    "prompt", "This model's maximum context "
				    "length is %u tokens, but the prompt has %d "
				    "tokens. Please shorten the prompt.",
				    so->n_ctx, n_prompt);
	if (r->max_tokens &&
	    (uint64_t)n_prompt + r->max_tokens > so->n_ctx)
		return kvq_oai_fail(e, 400, "invalid_request_error",
				    "context_length_exceeded", mt,
				    "This model's maximum context length is %u "
				    "tokens. However, you requested %lld tokens "
				    "(%d in the prompt, %d for the completion). "
				    "Please reduce the prompt or max_tokens.",
				    so->n_ctx,
				    (long long)n_prompt + r->max_tokens,
				    n_prompt, r->max_tokens);
	return 0;
}

static uint64_t random_seed(void)
{
	uint64_t s;

	if (getrandom(&s, sizeof(s), GRND_NONBLOCK) != sizeof(s))
		s = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^
		    (uint64_t)clock();
	return s;
}

/*
 * Builds the hreq for @r with prompts @ids and submits every choice.
 * Returns the hreq, or NULL with @e set; in that case choices already
 * submitted were cancelled and the hreq lives on until they are done.
 */
static struct hreq *start(struct kvq_http *h, struct evhttp_request *req,
			  const struct kvq_oai_req *r, int32_t **ids,
			  int *n_ids, struct kvq_oai_err *e)
{
	int n_prompts = r->kind == KVQ_OAI_CHAT ? 1 : r->n_prompts;
	const char *const *stop = (const char *const *)r->stop;
	struct kvq_sched_sink sink = { .event = sink_event };
	struct evq *eq = evq_of(h);
	struct hreq *hr;
	int i, p, k, ret = 0;

	if (eq->sched != h->sched) {
		/* stream events wait for the end of their step */
		kvq_sched_set_step_cb(h->sched, on_step, eq);
		eq->sched = h->sched;
	}
	hr = calloc(1, sizeof(*hr));
	if (!hr)
		goto nomem;
	hr->h = h;
	hr->kind = r->kind;
	hr->created = unix_now();
	hr->stream = r->stream;
	hr->include_usage = r->stream && r->include_usage;
	hr->logprobs = r->logprobs;
	hr->n_prompts = n_prompts;
	hr->n_ch = n_prompts * r->n;
	kvq_oai_make_id(r->kind, hr->id, sizeof(hr->id));
	hr->ch = calloc(hr->n_ch, sizeof(*hr->ch));
	hr->prompt_tokens = calloc(n_prompts, sizeof(int));
	if (!hr->ch || !hr->prompt_tokens)
		goto nomem_free;
	if (hr->stream && (!(hr->out = evbuffer_new()) || stream_prefix(hr)))
		goto nomem_free;
	if (r->echo) {
		hr->echo = calloc(n_prompts, sizeof(char *));
		hr->echo_len = calloc(n_prompts, sizeof(size_t));
		if (!hr->echo || !hr->echo_len)
			goto nomem_free;
		for (p = 0; p < n_prompts; p++) {
			const struct kvq_oai_prompt *op = &r->prompts[p];

			hr->echo[p] = op->text ? strdup(op->text) :
				      detok_all(h->tok, op->ids, op->n_ids,
						&hr->echo_len[p]);
			if (!hr->echo[p])
				goto nomem_free;
			if (op->text)
				hr->echo_len[p] = op->len;
		}
	}
	for (p = 0; p < n_prompts; p++)
		hr->prompt_tokens[p] = n_ids[p];

	hr->next = h->live;
	if (h->live)
		h->live->prev = hr;
	h->live = hr;

	for (p = 0; p < n_prompts && !ret; p++) {
		for (k = 0; k < r->n && !ret; k++) {
			struct hchoice *c = &hr->ch[p * r->n + k];
			struct kvq_sched_req q = { 0 };

			c->hr = hr;
			c->index = p * r->n + k;
			c->prompt = p;
			c->echo_pending = r->echo;
			q.prompt = ids[p];
			q.n_prompt = n_ids[p];
			q.max_tokens = r->max_tokens;
			q.sp = r->sp;
			q.sp.seed = r->has_seed ? r->sp.seed + (uint64_t)k :
				    random_seed();
			q.stop = stop;
			q.n_stop = r->n_stop;
			q.logprobs = r->logprobs;
			q.prompt_logprobs = r->echo && r->logprobs >= 0;
			q.ignore_eos = r->ignore_eos;
			if (r->kind == KVQ_OAI_CHAT && h->chat.turn_end >= 0) {
				q.eog = &h->chat.turn_end;
				q.n_eog = 1;
			}
			q.tag = hr->id;
			sink.arg = c;
			ret = kvq_sched_submit(h->sched, &q, &sink, &c->id,
					       NULL);
			if (!ret) {
				c->live = true;
				hr->n_live++;
			}
		}
	}
	if (ret) {
		submit_error(e, ret);
		for (i = 0; i < hr->n_ch; i++)
			if (hr->ch[i].live)
				kvq_sched_cancel(h->sched, hr->ch[i].id);
		if (!hr->n_live)
			hreq_free(hr);
		return NULL;
	}
	hr->req = req;
	hr->conn = evhttp_request_get_connection(req);
	if (hr->conn) {
		evhttp_connection_set_closecb(hr->conn, on_conn_close, hr);
		watch_peer(hr);
	}
	h->st.in_flight++;
	return hr;

nomem_free:
	for (p = 0; hr->echo && p < n_prompts; p++)
		free(hr->echo[p]);
	free(hr->echo);
	free(hr->echo_len);
	free(hr->prompt_tokens);
	free(hr->ch);
	if (hr->out)
		evbuffer_free(hr->out);
	free(hr->pre);
	free(hr);
nomem:
	kvq_oai_fail(e, 500, "server_error", NULL, NULL, "out of memory");
	return NULL;
}

void kvq_complete_handle(struct kvq_http *h, struct evhttp_request *req,
			 enum kvq_oai_kind kind)
{
	struct evbuffer *in = evhttp_request_get_input_buffer(req);
	size_t len = evbuffer_get_length(in);
	const char *body = len ? (const char *)evbuffer_pullup(in, -1) : "";
	struct kvq_oai_req r;
	struct kvq_oai_err e;
	int32_t **ids = NULL;
	int *n_ids = NULL;
	int i, n_prompts = 0;
	struct hreq *hr;

	if (h->draining) {
		kvq_oai_fail(&e, 503, "unavailable_error", "draining", NULL,
			     "kvqd is shutting down");
		kvq_http_reply_err(h, req, &e);
		return;
	}
	if (kvq_oai_parse(body, len, kind, kvq_tokenizer_n_vocab(h->tok), &r,
			  &e)) {
		kvq_http_reply_err(h, req, &e);
		return;
	}
	if (kind == KVQ_OAI_CHAT && r.echo) {
		kvq_oai_bad(&e, "echo", "'echo' is not supported for chat");
		goto fail;
	}
	n_prompts = kind == KVQ_OAI_CHAT ? 1 : r.n_prompts;
	ids = calloc(n_prompts, sizeof(*ids));
	n_ids = calloc(n_prompts, sizeof(*n_ids));
	if (!ids || !n_ids) {
		kvq_oai_fail(&e, 500, "server_error", NULL, NULL,
			     "out of memory");
		goto fail;
	}
	for (i = 0; i < n_prompts; i++) {
		int ret;

		if (kind == KVQ_OAI_CHAT)
			ret = kvq_chat_render(&h->chat, r.msgs, r.n_msgs,
					      &ids[0], &n_ids[0], &e);
		else
			ret = prompt_tokens(h, &r.prompts[i], &ids[i],
					    &n_ids[i], &e);
		if (ret || check_limits(h, &r, n_ids[i], &e))
			goto fail;
	}
	hr = start(h, req, &r, ids, n_ids, &e);
	if (!hr)
		goto fail;
	if (hr->stream) {
		struct evkeyvalq *oh = evhttp_request_get_output_headers(req);

		evhttp_add_header(oh, "Content-Type", "text/event-stream");
		evhttp_add_header(oh, "Cache-Control", "no-cache");
		evhttp_add_header(oh, "X-Accel-Buffering", "no");
		evhttp_send_reply_start(req, 200, "OK");
		kvq_http_count(h, 200);
		h->st.streams++;
		start_beat(hr);
	}
	goto out;
fail:
	kvq_http_reply_err(h, req, &e);
out:
	for (i = 0; ids && i < n_prompts; i++)
		free(ids[i]);
	free(ids);
	free(n_ids);
	kvq_oai_req_fini(&r);
}

/* ------------------------------------------------------------- setup */

int kvq_complete_init(struct kvq_http *h)
{
	struct evq *q;
	int ret;

	q = calloc(1, sizeof(*q));
	if (!q)
		return -ENOMEM;
	q->h = h;
	ret = -pthread_mutex_init(&h->qlock, NULL);
	if (ret)
		goto out_free;
	h->qev = event_new(h->base, -1, 0, on_events, q);
	if (!h->qev) {
		ret = -ENOMEM;
		goto out_mutex;
	}
	return 0;

out_mutex:
	pthread_mutex_destroy(&h->qlock);
out_free:
	free(q);
	return ret;
}

void kvq_complete_fini(struct kvq_http *h)
{
	struct evq *q = h->qev ? evq_of(h) : NULL;
	struct hreq *hr, *next;
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	int i, tries;

	if (!q)
		return;	/* kvq_complete_init() failed */

	for (hr = h->live; hr; hr = next) {
		next = hr->next;
		if (hr->req) {
			struct evhttp_request *req = hr->req;

			if (hr->stream) {
				stream_error(hr, 503, "unavailable_error",
					     "cancelled", "the request was "
					     "cancelled (kvqd is shutting "
					     "down)");
				hr->include_usage = false;
				stream_end(hr);
			} else {
				struct kvq_oai_err e;

				hreq_detach(hr);
				kvq_oai_fail(&e, 503, "unavailable_error",
					     "draining", NULL,
					     "kvqd is shutting down");
				kvq_http_reply_err(h, req, &e);
			}
		}
		for (i = 0; i < hr->n_ch; i++)
			if (hr->ch[i].live && h->sched)
				kvq_sched_cancel(h->sched, hr->ch[i].id);
	}
	/* the scheduler answers every cancel with a DONE; wait for them */
	for (tries = 0; h->live && tries < 2000; tries++) {
		on_events(-1, 0, q);
		if (h->live)
			nanosleep(&ts, NULL);
	}
	if (h->live)
		kvq_err("http: requests still live at shutdown; leaking them");
	if (q->sched)
		kvq_sched_set_step_cb(q->sched, NULL, NULL);
	event_free(h->qev);
	h->qev = NULL;
	pthread_mutex_destroy(&h->qlock);
	free(q);
}
