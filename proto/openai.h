/*
 * openai.h - OpenAI- and llama.cpp-compatible request bodies, parsed and
 * validated, and the JSON shapes of the answers.
 *
 * Why this file exists: the wire format is a contract with every OpenAI
 * client library.  Keeping the parsing and the response shapes apart from
 * the HTTP server lets them be tested without a socket and keeps http.c
 * about connections and streams.  Nothing here touches the engine except
 * through the tokenizer passed in.
 */
#ifndef KVQ_PROTO_OPENAI_H
#define KVQ_PROTO_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "engine/sampler.h"

#define KVQ_OAI_MAX_STOP 4
#define KVQ_OAI_MAX_LOGPROBS 5
#define KVQ_OAI_MAX_N 16

enum kvq_oai_kind {
	KVQ_OAI_COMPLETION = 1,		/* POST /v1/completions */
	KVQ_OAI_CHAT,			/* POST /v1/chat/completions */
};

/* One prompt: text, or token ids used as given. */
struct kvq_oai_prompt {
	char *text;			/* NUL-terminated, valid UTF-8; or NULL */
	size_t len;
	int32_t *ids;			/* when text is NULL */
	int n_ids;
};

struct kvq_oai_msg {
	char *role;			/* system, user, assistant (developer -> system) */
	char *content;			/* text parts joined */
	size_t len;
};

struct kvq_oai_req {
	enum kvq_oai_kind kind;
	char *model;			/* as sent, or NULL */
	struct kvq_oai_prompt *prompts;	/* completions: >= 1 */
	int n_prompts;
	struct kvq_oai_msg *msgs;	/* chat: >= 1 */
	int n_msgs;
	int max_tokens;			/* 0: the server's default */
	struct kvq_sampler_params sp;
	bool has_seed;
	char *stop[KVQ_OAI_MAX_STOP];
	int n_stop;
	bool stream;
	bool include_usage;
	int logprobs;			/* -1: none, else alternatives 0..5 */
	bool echo;
	int n;				/* choices per prompt, 1..16 */
	bool ignore_eos;
	char *user;
};

/* What is wrong with a request: HTTP status and OpenAI's error fields. */
struct kvq_oai_err {
	int status;
	const char *type;		/* "invalid_request_error", ... */
	const char *code;		/* or NULL */
	char param[64];			/* "" for null */
	char msg[320];
};

/* Fills @e; returns -EINVAL so callers can `return kvq_oai_fail(...)`. */
int kvq_oai_fail(struct kvq_oai_err *e, int status, const char *type,
		 const char *code, const char *param, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));
/* 400 invalid_request_error for @param. */
int kvq_oai_bad(struct kvq_oai_err *e, const char *param, const char *fmt,
		...) __attribute__((format(printf, 3, 4)));

/*
 * kvq_oai_parse() - parse and validate the JSON body of a completion or
 * chat request.  On success returns 0 with @r filled (free with
 * kvq_oai_req_fini()); defaults: temperature 1, top_p 1, top_k and min_p
 * off, n 1, no seed (has_seed false).  On failure returns -EINVAL with @e
 * set (status 400; the param that is wrong) and @r holding nothing.
 * Token ids are checked against @n_vocab (> 0) here.
 */
int kvq_oai_parse(const char *body, size_t len, enum kvq_oai_kind kind,
		  int32_t n_vocab, struct kvq_oai_req *r,
		  struct kvq_oai_err *e);
void kvq_oai_req_fini(struct kvq_oai_req *r);

/* POST /tokenize: {"content": str, "add_special": bool, "with_pieces": bool} */
struct kvq_oai_tokenize {
	char *content;
	size_t len;
	bool add_special;		/* default true */
	bool with_pieces;		/* default false */
};
int kvq_oai_parse_tokenize(const char *body, size_t len,
			   struct kvq_oai_tokenize *t, struct kvq_oai_err *e);
/* POST /detokenize: {"tokens": [int]}; *ids is malloc'd (may be NULL). */
int kvq_oai_parse_detokenize(const char *body, size_t len, int32_t n_vocab,
			     int32_t **ids, int *n, struct kvq_oai_err *e);

/* Loads @body as a JSON object, or fails with a 400 (malformed JSON,
 * invalid UTF-8, not an object). */
json_t *kvq_oai_load(const char *body, size_t len, struct kvq_oai_err *e);

/* ------------------------------------------------------------ answers */

/* {"error": {"message", "type", "param", "code"}}; new reference. */
json_t *kvq_oai_error_json(const struct kvq_oai_err *e);

/* Whether @s[0..len) is valid UTF-8 (no overlongs, no surrogates). */
bool kvq_utf8_valid(const char *s, size_t len);
/* Bytes of @s[0..len) that form complete UTF-8 sequences (a partial one
 * at the end is left out). */
size_t kvq_utf8_complete(const char *s, size_t len);

/* A JSON string of @len bytes that may contain invalid UTF-8 (each bad
 * byte becomes U+FFFD); new reference. */
json_t *kvq_json_text(const char *s, size_t len);

/* {"prompt_tokens", "completion_tokens", "total_tokens",
 *  "prompt_tokens_details": {"cached_tokens"}} */
json_t *kvq_oai_usage_json(int prompt, int completion, int cached);

/* "chatcmpl-" or "cmpl-" followed by 24 random hex digits, into @buf. */
void kvq_oai_make_id(enum kvq_oai_kind kind, char *buf, size_t len);

#endif /* KVQ_PROTO_OPENAI_H */
