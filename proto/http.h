/*
 * http.h - kvqd's HTTP API on libevent's evhttp.
 *
 * Why this file exists: clients reach kvqd over JSON-over-HTTP
 * (OpenAI-compatible completions and chat, llama.cpp-compatible tokenize,
 * health and Prometheus metrics; see proto/PROTOCOL.md).  The server runs
 * on the caller's event loop; tokens come from the scheduler thread and
 * are handed to the loop thread through a locked queue and an event made
 * active from the scheduler thread.
 *
 * Threads: every function here is called on the event loop's thread.  The
 * caller must have called evthread_use_pthreads() before creating the
 * event base (kvq_http_create() fails otherwise).
 */
#ifndef KVQ_PROTO_HTTP_H
#define KVQ_PROTO_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct kvq_sched;
struct kvq_http;

/* A zero or NULL field takes the default shown. */
struct kvq_http_opts {
	const char *host;		/* "127.0.0.1" */
	uint16_t port;			/* 8080 */
	const char *api_key;		/* NULL or "": no key needed */
	const char *model_id;		/* id in /v1/models (the model's file
					 * name without ".gguf") */
	uint64_t max_body_bytes;	/* 8 MiB */
	uint64_t max_header_bytes;	/* 16 KiB */
	uint32_t idle_timeout_ms;	/* read/write idle per connection (30000) */
};

/*
 * kvq_http_create() - bind and listen on @base.  @sched may be NULL while
 * the model loads: /health then answers 503 and model endpoints 503 until
 * kvq_http_attach() and kvq_http_set_ready().  Returns 0 and stores the
 * server in *out, or -errno with a one-line message in @err (address in
 * use, bad address, no threading in libevent).
 */
int kvq_http_create(struct event_base *base, struct kvq_sched *sched,
		    const struct kvq_http_opts *o, struct kvq_http **out,
		    char *err, size_t errlen);

/*
 * kvq_http_destroy() - stop listening, cancel the requests in flight and
 * close their connections.  The scheduler must still exist (destroy the
 * server first, then the scheduler).  NULL is a no-op.
 */
void kvq_http_destroy(struct kvq_http *h);

/* Sets the scheduler requests go to (after the model is loaded). */
void kvq_http_attach(struct kvq_http *h, struct kvq_sched *sched);

/* Ready: /health answers 200 and requests are served; not ready: 503. */
void kvq_http_set_ready(struct kvq_http *h, bool ready);

/*
 * kvq_http_stop_accepting() - for a drain: new completion requests get
 * 503 while running streams go on.  /health answers 503 "draining".
 */
void kvq_http_stop_accepting(struct kvq_http *h);

/* Limits that may change live (SIGHUP): key, body and header sizes,
 * idle timeout.  Host and port are ignored (they need a restart). */
int kvq_http_set_limits(struct kvq_http *h, const struct kvq_http_opts *o);

/* Connections and requests in flight, for status output. */
struct kvq_http_stats {
	uint64_t requests_total;
	uint64_t by_status[6];		/* 1xx..5xx counted by first digit */
	uint32_t in_flight;		/* completions not yet answered */
	uint32_t streams;		/* of which streaming */
};
void kvq_http_stats(const struct kvq_http *h, struct kvq_http_stats *out);

#endif /* KVQ_PROTO_HTTP_H */
