/*
 * http_impl.h - what the HTTP server's files share: the server object and
 * the reply helpers.  Not part of kvqd's API; only proto/ includes it.
 */
#ifndef KVQ_PROTO_HTTP_IMPL_H
#define KVQ_PROTO_HTTP_IMPL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "proto/chat.h"
#include "proto/http.h"
#include "proto/openai.h"

struct evhttp;
struct evhttp_request;
struct evhttp_bound_socket;
struct event;
struct kvq_model;
struct kvq_tokenizer;
struct hreq;
struct evitem;

struct kvq_http {
	struct event_base *base;
	struct evhttp *http;
	struct evhttp_bound_socket *sock;
	struct kvq_sched *sched;
	struct kvq_model *model;
	const struct kvq_tokenizer *tok;
	struct kvq_chat chat;
	bool chat_init;

	struct kvq_http_opts o;		/* strings below are owned copies */
	char *host;
	char *api_key;
	char *model_id;
	bool model_id_set;		/* given in the options, not derived */
	long long created;		/* unix time the server started */
	bool ready;
	bool draining;
	struct kvq_http_stats st;

	/* completion requests in flight (loop thread only) */
	struct hreq *live;

	/* events from the scheduler thread */
	pthread_mutex_t qlock;
	struct evitem *qhead, *qtail;
	struct event *qev;
};

/* Sends @j (reference stolen) as the JSON body with @status. */
void kvq_http_reply_json(struct kvq_http *h, struct evhttp_request *req,
			 int status, json_t *j);
/* Sends the OpenAI error body for @e. */
void kvq_http_reply_err(struct kvq_http *h, struct evhttp_request *req,
			const struct kvq_oai_err *e);
/* Counts an answer with @status in the stats. */
void kvq_http_count(struct kvq_http *h, int status);

/* complete.c: POST /v1/completions and /v1/chat/completions. */
void kvq_complete_handle(struct kvq_http *h, struct evhttp_request *req,
			 enum kvq_oai_kind kind);
int kvq_complete_init(struct kvq_http *h);
/* Cancels every request in flight and frees what is left once the
 * scheduler has acknowledged them. */
void kvq_complete_fini(struct kvq_http *h);

#endif /* KVQ_PROTO_HTTP_IMPL_H */
