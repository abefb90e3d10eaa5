/*
 * openai.c - parsing and validating OpenAI completion and chat bodies and
 * llama.cpp's tokenize/detokenize bodies; the shared pieces of answers.
 *
 * Why this file exists: see openai.h.  Every field is checked for type and
 * range here, each failure naming the field in OpenAI's "param", so the
 * server never sees a request it has to second-guess.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "proto/openai.h"

int kvq_oai_fail(struct kvq_oai_err *e, int status, const char *type,
		 const char *code, const char *param, const char *fmt, ...)
{
	va_list ap;

	e->status = status;
	e->type = type;
	e->code = code;
	snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
	va_end(ap);
	return -EINVAL;
}

int kvq_oai_bad(struct kvq_oai_err *e, const char *param, const char *fmt, ...)
{
	va_list ap;

	e->status = 400;
	e->type = "invalid_request_error";
	e->code = NULL;
	snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
	va_end(ap);
	return -EINVAL;
}

/* ------------------------------------------------------------- UTF-8 */

/* Length of the valid UTF-8 sequence at @s (at most @n bytes), 0 when it
 * is invalid, -1 when it is a valid but truncated prefix. */
static int utf8_seq(const unsigned char *s, size_t n)
{
	unsigned c = s[0];
	int len, i;
	unsigned cp;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) {
		len = 2;
		cp = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		len = 3;
		cp = c & 0x0f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		len = 4;
		cp = c & 0x07;
	} else {
		return 0;
	}
	for (i = 1; i < len; i++) {
		if ((size_t)i >= n)
			return -1;
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
		/* reject overlongs and surrogates as early as possible */
		if (i == 1 && len == 3 && c == 0xe0 && s[1] < 0xa0)
			return 0;
		if (i == 1 && len == 3 && c == 0xed && s[1] > 0x9f)
			return 0;
		if (i == 1 && len == 4 && c == 0xf0 && s[1] < 0x90)
			return 0;
		if (i == 1 && len == 4 && c == 0xf4 && s[1] > 0x8f)
			return 0;
	}
	(void)cp;
	return len;
}

bool kvq_utf8_valid(const char *s, size_t len)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;
	int k;

	while (i < len) {
		k = utf8_seq(p + i, len - i);
		if (k <= 0)
			return false;
		i += k;
	}
	return true;
}

size_t kvq_utf8_complete(const char *s, size_t len)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;
	int k;

	while (i < len) {
		k = utf8_seq(p + i, len - i);
		if (k < 0)
			return i;
		i += k ? k : 1;
	}
	return len;
}

json_t *kvq_json_text(const char *s, size_t len)
{
	const unsigned char *p = (const unsigned char *)s;
	json_t *j;
	char *buf;
	size_t i = 0, o = 0;
	int k;

	/* A choice that ended at its first token has no buffer yet: "". */
	if (!len)
		return json_string("");
	if (kvq_utf8_valid(s, len))
		return json_stringn(s, len);
	buf = malloc(len * 3 + 1);
	if (!buf)
		return NULL;
	while (i < len) {
		k = utf8_seq(p + i, len - i);
		if (k > 0) {
			memcpy(buf + o, s + i, k);
			o += k;
			i += k;
		} else {
			memcpy(buf + o, "\xef\xbf\xbd", 3);
			o += 3;
			i++;
		}
	}
	j = json_stringn(buf, o);
	free(buf);
	return j;
}

/* ------------------------------------------------------------- loading */

json_t *kvq_oai_load(const char *body, size_t len, struct kvq_oai_err *e)
{
	json_error_t jerr;
	json_t *root;

	if (!body || !len) {
		kvq_oai_bad(e, NULL, "the request body is empty; expected a "
			    "JSON object");
		return NULL;
	}
	if (!kvq_utf8_valid(body, len)) {
		kvq_oai_bad(e, NULL, "the request body is not valid UTF-8");
		return NULL;
	}
	root = json_loadb(body, len, 0, &jerr);
	if (!root) {
		kvq_oai_bad(e, NULL, "the request body is not valid JSON: %s "
			    "(line %d, column %d)", jerr.text, jerr.line,
			    jerr.column);
		return NULL;
	}
	if (!json_is_object(root)) {
		json_decref(root);
		kvq_oai_bad(e, NULL, "the request body must be a JSON object");
		return NULL;
	}
	return root;
}

/* ------------------------------------------------------------- fields */

static bool absent(const json_t *v)
{
	return !v || json_is_null(v);
}

static int get_bool(json_t *o, const char *key, bool *out,
		    struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, key);

	if (absent(v))
		return 0;
	if (!json_is_boolean(v))
		return kvq_oai_bad(e, key, "'%s' must be a boolean", key);
	*out = json_is_true(v);
	return 0;
}

static int get_int(json_t *o, const char *key, long long lo, long long hi,
		   long long *out, bool *set, struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, key);
	long long x;

	if (absent(v))
		return 0;
	if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
	    fabs(json_real_value(v)) < 9e15)
		x = (long long)json_real_value(v);
	else if (json_is_integer(v))
		x = json_integer_value(v);
	else
		return kvq_oai_bad(e, key, "'%s' must be an integer", key);
	if (x < lo || x > hi)
		return kvq_oai_bad(e, key, "'%s' is %lld; it must be between "
				   "%lld and %lld", key, x, lo, hi);
	*out = x;
	if (set)
		*set = true;
	return 0;
}

static int get_num(json_t *o, const char *key, double lo, double hi,
		   bool lo_open, float *out, struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, key);
	double x;

	if (absent(v))
		return 0;
	if (!json_is_number(v))
		return kvq_oai_bad(e, key, "'%s' must be a number", key);
	x = json_number_value(v);
	if (!(x >= lo && x <= hi) || (lo_open && x == lo))
		return kvq_oai_bad(e, key, "'%s' is %g; it must be %s %g and "
				   "at most %g", key, x,
				   lo_open ? "above" : "at least", lo, hi);
	*out = (float)x;
	return 0;
}

static int get_str(json_t *o, const char *key, char **out,
		   struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, key);

	if (absent(v))
		return 0;
	if (!json_is_string(v))
		return kvq_oai_bad(e, key, "'%s' must be a string", key);
	*out = strndup(json_string_value(v), json_string_length(v));
	if (!*out)
		return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				    "out of memory");
	return 0;
}

/* A field we do not implement: accepted only at its neutral value. */
static int neutral_num(json_t *o, const char *key, struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, key);

	if (absent(v))
		return 0;
	if (!json_is_number(v))
		return kvq_oai_bad(e, key, "'%s' must be a number", key);
	if (json_number_value(v) != 0)
		return kvq_oai_bad(e, key, "'%s' is not supported by this "
				   "server; leave it at 0", key);
	return 0;
}

static int neutral_empty(json_t *o, const char *key, struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, key);

	if (absent(v))
		return 0;
	if ((json_is_object(v) && !json_object_size(v)) ||
	    (json_is_array(v) && !json_array_size(v)) ||
	    (json_is_string(v) && !json_string_length(v)))
		return 0;
	return kvq_oai_bad(e, key, "'%s' is not supported by this server",
			   key);
}

static int parse_stop(json_t *o, struct kvq_oai_req *r, struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, "stop"), *s;
	size_t i;

	if (absent(v))
		return 0;
	if (json_is_string(v)) {
		if (!json_string_length(v))
			return 0;
		r->stop[0] = strdup(json_string_value(v));
		if (!r->stop[0])
			goto nomem;
		r->n_stop = 1;
		return 0;
	}
	if (!json_is_array(v))
		return kvq_oai_bad(e, "stop", "'stop' must be a string or an "
				   "array of strings");
	if (json_array_size(v) > KVQ_OAI_MAX_STOP)
		return kvq_oai_bad(e, "stop", "'stop' has %zu strings; at most "
				   "%d are allowed", json_array_size(v),
				   KVQ_OAI_MAX_STOP);
	json_array_foreach(v, i, s) {
		if (!json_is_string(s))
			return kvq_oai_bad(e, "stop", "'stop' must be a string "
					   "or an array of strings");
		if (!json_string_length(s))
			continue;
		r->stop[r->n_stop] = strdup(json_string_value(s));
		if (!r->stop[r->n_stop])
			goto nomem;
		r->n_stop++;
	}
	return 0;
nomem:
	return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
			    "out of memory");
}

static int token_array(json_t *a, int32_t n_vocab, int32_t **ids, int *n,
		       const char *param, struct kvq_oai_err *e)
{
	json_t *v;
	size_t i;
	int32_t *p;

	*ids = NULL;
	*n = 0;
	if (!json_array_size(a))
		return 0;
	p = malloc(sizeof(*p) * json_array_size(a));
	if (!p)
		return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				    "out of memory");
	json_array_foreach(a, i, v) {
		json_int_t x;

		if (!json_is_integer(v)) {
			free(p);
			return kvq_oai_bad(e, param, "'%s' must hold token ids "
					   "(integers)", param);
		}
		x = json_integer_value(v);
		if (x < 0 || x >= n_vocab) {
			free(p);
			return kvq_oai_bad(e, param, "token id %lld in '%s' is "
					   "out of range (vocabulary of %d)",
					   (long long)x, param, n_vocab);
		}
		p[i] = (int32_t)x;
	}
	*ids = p;
	*n = (int)json_array_size(a);
	return 0;
}

static int parse_prompt(json_t *o, int32_t n_vocab, struct kvq_oai_req *r,
			struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, "prompt"), *x;
	size_t i, n;
	int ret;

	if (absent(v))
		return kvq_oai_bad(e, "prompt", "'prompt' is required");
	if (json_is_string(v)) {
		n = 1;
	} else if (json_is_array(v)) {
		n = json_array_size(v);
		if (!n)
			return kvq_oai_bad(e, "prompt", "'prompt' is an empty "
					   "array");
		x = json_array_get(v, 0);
		if (json_is_integer(x))
			n = 1;		/* one prompt of token ids */
	} else {
		return kvq_oai_bad(e, "prompt", "'prompt' must be a string, an "
				   "array of strings, an array of token ids or "
				   "an array of token-id arrays");
	}
	if (n > KVQ_OAI_MAX_N)
		return kvq_oai_bad(e, "prompt", "'prompt' has %zu prompts; at "
				   "most %d are allowed", n, KVQ_OAI_MAX_N);
	r->prompts = calloc(n, sizeof(*r->prompts));
	if (!r->prompts)
		return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				    "out of memory");
	r->n_prompts = (int)n;

	if (json_is_string(v)) {
		r->prompts[0].text = strndup(json_string_value(v),
					     json_string_length(v));
		r->prompts[0].len = json_string_length(v);
		return r->prompts[0].text ? 0 :
		       kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				    "out of memory");
	}
	if (json_is_integer(json_array_get(v, 0))) {
		ret = token_array(v, n_vocab, &r->prompts[0].ids,
				  &r->prompts[0].n_ids, "prompt", e);
		return ret;
	}
	json_array_foreach(v, i, x) {
		struct kvq_oai_prompt *p = &r->prompts[i];

		if (json_is_string(x) &&
		    json_is_string(json_array_get(v, 0))) {
			p->text = strndup(json_string_value(x),
					  json_string_length(x));
			p->len = json_string_length(x);
			if (!p->text)
				return kvq_oai_fail(e, 500, "server_error",
						    NULL, NULL,
						    "out of memory");
		} else if (json_is_array(x) &&
			   json_is_array(json_array_get(v, 0))) {
			ret = token_array(x, n_vocab, &p->ids, &p->n_ids,
					  "prompt", e);
			if (ret)
				return ret;
			if (!p->n_ids)
				return kvq_oai_bad(e, "prompt", "prompt %zu is "
						   "an empty token array", i);
		} else {
			return kvq_oai_bad(e, "prompt", "'prompt' mixes "
					   "types; use an array of strings or "
					   "an array of token-id arrays");
		}
	}
	return 0;
}

/* Content of a chat message: a string, or an array of text parts. */
static int msg_content(json_t *c, struct kvq_oai_msg *m, size_t idx,
		       struct kvq_oai_err *e)
{
	json_t *part;
	size_t i, tot = 0;
	char *p;

	if (absent(c)) {
		m->content = strdup("");
		goto done;
	}
	if (json_is_string(c)) {
		m->content = strndup(json_string_value(c),
				     json_string_length(c));
		m->len = json_string_length(c);
		goto done;
	}
	if (!json_is_array(c))
		return kvq_oai_bad(e, "messages", "messages[%zu].content must "
				   "be a string or an array of text parts",
				   idx);
	json_array_foreach(c, i, part) {
		json_t *t = json_object_get(part, "type");
		json_t *x = json_object_get(part, "text");

		if (!json_is_string(t) || strcmp(json_string_value(t), "text") ||
		    !json_is_string(x))
			return kvq_oai_bad(e, "messages", "messages[%zu]."
					   "content[%zu]: only parts of type "
					   "\"text\" with a \"text\" string "
					   "are supported", idx, i);
		tot += json_string_length(x);
	}
	m->content = malloc(tot + 1);
	if (!m->content)
		goto done;
	p = m->content;
	json_array_foreach(c, i, part) {
		json_t *x = json_object_get(part, "text");

		memcpy(p, json_string_value(x), json_string_length(x));
		p += json_string_length(x);
	}
	*p = 0;
	m->len = tot;
done:
	if (!m->content)
		return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				    "out of memory");
	if (!m->len)
		m->len = strlen(m->content);
	return 0;
}

static int parse_messages(json_t *o, struct kvq_oai_req *r,
			  struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, "messages"), *m;
	size_t i;
	int ret;

	if (absent(v))
		return kvq_oai_bad(e, "messages", "'messages' is required");
	if (!json_is_array(v))
		return kvq_oai_bad(e, "messages", "'messages' must be an array "
				   "of message objects");
	if (!json_array_size(v))
		return kvq_oai_bad(e, "messages", "'messages' is empty");
	r->msgs = calloc(json_array_size(v), sizeof(*r->msgs));
	if (!r->msgs)
		return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				    "out of memory");
	json_array_foreach(v, i, m) {
		json_t *role = json_object_get(m, "role");
		const char *rs;

		if (!json_is_object(m))
			return kvq_oai_bad(e, "messages", "messages[%zu] must "
					   "be an object", i);
		if (!json_is_string(role))
			return kvq_oai_bad(e, "messages", "messages[%zu].role "
					   "must be a string", i);
		rs = json_string_value(role);
		if (!strcmp(rs, "developer"))
			rs = "system";
		if (strcmp(rs, "system") && strcmp(rs, "user") &&
		    strcmp(rs, "assistant"))
			return kvq_oai_bad(e, "messages", "messages[%zu].role "
					   "'%s' is not supported (system, "
					   "developer, user, assistant)", i,
					   json_string_value(role));
		if (!absent(json_object_get(m, "tool_calls")))
			return kvq_oai_bad(e, "messages", "messages[%zu]: tool "
					   "calls are not supported", i);
		r->msgs[i].role = strdup(rs);
		r->n_msgs = (int)i + 1;
		if (!r->msgs[i].role)
			return kvq_oai_fail(e, 500, "server_error", NULL, NULL,
					    "out of memory");
		ret = msg_content(json_object_get(m, "content"), &r->msgs[i],
				  i, e);
		if (ret)
			return ret;
	}
	return 0;
}

static int parse_common(json_t *o, struct kvq_oai_req *r,
			struct kvq_oai_err *e)
{
	json_t *so;
	long long x;
	bool set = false;
	int ret;

	if ((ret = get_str(o, "model", &r->model, e)) ||
	    (ret = get_str(o, "user", &r->user, e)) ||
	    (ret = get_bool(o, "stream", &r->stream, e)) ||
	    (ret = get_bool(o, "ignore_eos", &r->ignore_eos, e)) ||
	    (ret = get_num(o, "temperature", 0, 2, false,
			   &r->sp.temperature, e)) ||
	    (ret = get_num(o, "top_p", 0, 1, true, &r->sp.top_p, e)) ||
	    (ret = get_num(o, "min_p", 0, 1, false, &r->sp.min_p, e)) ||
	    (ret = neutral_num(o, "frequency_penalty", e)) ||
	    (ret = neutral_num(o, "presence_penalty", e)) ||
	    (ret = neutral_empty(o, "logit_bias", e)) ||
	    (ret = parse_stop(o, r, e)))
		return ret;

	x = 0;
	ret = get_int(o, "top_k", -1, 1 << 30, &x, NULL, e);
	if (ret)
		return ret;
	r->sp.top_k = x > 0 ? (int32_t)x : 0;

	x = 1;
	ret = get_int(o, "n", 1, KVQ_OAI_MAX_N, &x, NULL, e);
	if (ret)
		return ret;
	r->n = (int)x;

	ret = get_int(o, "seed", INT64_MIN, INT64_MAX, &x, &set, e);
	if (ret)
		return ret;
	if (set) {
		r->sp.seed = (uint64_t)x;
		r->has_seed = true;
	}

	so = json_object_get(o, "stream_options");
	if (!absent(so)) {
		if (!json_is_object(so))
			return kvq_oai_bad(e, "stream_options", "'stream_options'"
					   " must be an object");
		if (!r->stream)
			return kvq_oai_bad(e, "stream_options", "'stream_options'"
					   " is only allowed when 'stream' is "
					   "true");
		ret = get_bool(so, "include_usage", &r->include_usage, e);
		if (ret)
			return kvq_oai_bad(e, "stream_options.include_usage",
					   "'stream_options.include_usage' must "
					   "be a boolean");
	}
	return 0;
}

static int parse_max_tokens(json_t *o, const char *key, struct kvq_oai_req *r,
			    struct kvq_oai_err *e)
{
	json_t *v = json_object_get(o, key);
	long long x;

	if (absent(v))
		return 0;
	if (!json_is_integer(v))
		return kvq_oai_bad(e, key, "'%s' must be an integer", key);
	x = json_integer_value(v);
	if (x < 1)
		return kvq_oai_bad(e, key, "'%s' is %lld; it must be at least 1",
				   key, x);
	r->max_tokens = x > 0x7fffffff ? 0x7fffffff : (int)x;
	return 0;
}

static int parse_completion(json_t *o, int32_t n_vocab, struct kvq_oai_req *r,
			    struct kvq_oai_err *e)
{
	long long x;
	bool set = false;
	int ret;

	if ((ret = parse_prompt(o, n_vocab, r, e)) ||
	    (ret = parse_max_tokens(o, "max_tokens", r, e)) ||
	    (ret = get_bool(o, "echo", &r->echo, e)) ||
	    (ret = neutral_empty(o, "suffix", e)))
		return ret;
	ret = get_int(o, "logprobs", 0, KVQ_OAI_MAX_LOGPROBS, &x, &set, e);
	if (ret)
		return ret;
	r->logprobs = set ? (int)x : -1;
	set = false;
	ret = get_int(o, "best_of", 1, KVQ_OAI_MAX_N, &x, &set, e);
	if (ret)
		return ret;
	if (set && x != r->n)
		return kvq_oai_bad(e, "best_of", "'best_of' other than 'n' is "
				   "not supported");
	if (r->n_prompts * r->n > KVQ_OAI_MAX_N)
		return kvq_oai_bad(e, "n", "%d prompts times n=%d is more than "
				   "%d choices", r->n_prompts, r->n,
				   KVQ_OAI_MAX_N);
	return 0;
}

static int parse_chat(json_t *o, struct kvq_oai_req *r, struct kvq_oai_err *e)
{
	json_t *rf;
	bool lp = false, set = false;
	long long x = 0;
	int ret;

	if ((ret = parse_messages(o, r, e)) ||
	    (ret = parse_max_tokens(o, "max_tokens", r, e)) ||
	    (ret = parse_max_tokens(o, "max_completion_tokens", r, e)) ||
	    (ret = get_bool(o, "logprobs", &lp, e)) ||
	    (ret = neutral_empty(o, "tools", e)) ||
	    (ret = neutral_empty(o, "functions", e)))
		return ret;
	ret = get_int(o, "top_logprobs", 0, KVQ_OAI_MAX_LOGPROBS, &x, &set, e);
	if (ret)
		return ret;
	if (set && !lp)
		return kvq_oai_bad(e, "top_logprobs", "'top_logprobs' needs "
				   "'logprobs' set to true");
	r->logprobs = lp ? (int)x : -1;
	rf = json_object_get(o, "response_format");
	if (!absent(rf)) {
		json_t *t = json_object_get(rf, "type");

		if (!json_is_string(t) || strcmp(json_string_value(t), "text"))
			return kvq_oai_bad(e, "response_format", "only "
					   "'response_format' {\"type\": "
					   "\"text\"} is supported");
	}
	return 0;
}

int kvq_oai_parse(const char *body, size_t len, enum kvq_oai_kind kind,
		  int32_t n_vocab, struct kvq_oai_req *r,
		  struct kvq_oai_err *e)
{
	json_t *o;
	int ret;

	memset(r, 0, sizeof(*r));
	r->kind = kind;
	r->n = 1;
	r->logprobs = -1;
	r->sp.temperature = 1.0f;
	r->sp.top_p = 1.0f;
	r->sp.top_k = 0;
	r->sp.min_p = 0.0f;
	o = kvq_oai_load(body, len, e);
	if (!o)
		return -EINVAL;
	ret = parse_common(o, r, e);
	if (!ret)
		ret = kind == KVQ_OAI_CHAT ? parse_chat(o, r, e) :
		      parse_completion(o, n_vocab, r, e);
	json_decref(o);
	if (ret)
		kvq_oai_req_fini(r);
	return ret;
}

void kvq_oai_req_fini(struct kvq_oai_req *r)
{
	int i;

	for (i = 0; i < r->n_prompts; i++) {
		free(r->prompts[i].text);
		free(r->prompts[i].ids);
	}
	free(r->prompts);
	for (i = 0; i < r->n_msgs; i++) {
		free(r->msgs[i].role);
		free(r->msgs[i].content);
	}
	free(r->msgs);
	for (i = 0; i < r->n_stop; i++)
		free(r->stop[i]);
	free(r->model);
	free(r->user);
	memset(r, 0, sizeof(*r));
}

/* ------------------------------------------------------------- llama.cpp */

int kvq_oai_parse_tokenize(const char *body, size_t len,
			   struct kvq_oai_tokenize *t, struct kvq_oai_err *e)
{
	json_t *o, *c;
	int ret;

	memset(t, 0, sizeof(*t));
	t->add_special = true;
	o = kvq_oai_load(body, len, e);
	if (!o)
		return -EINVAL;
	c = json_object_get(o, "content");
	if (absent(c)) {
		ret = kvq_oai_bad(e, "content", "'content' is required");
		goto out;
	}
	if (!json_is_string(c)) {
		ret = kvq_oai_bad(e, "content", "'content' must be a string");
		goto out;
	}
	ret = get_bool(o, "add_special", &t->add_special, e);
	if (!ret)
		ret = get_bool(o, "with_pieces", &t->with_pieces, e);
	if (ret)
		goto out;
	t->len = json_string_length(c);
	t->content = strndup(json_string_value(c), t->len);
	if (!t->content)
		ret = kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				   "out of memory");
out:
	json_decref(o);
	return ret;
}

int kvq_oai_parse_detokenize(const char *body, size_t len, int32_t n_vocab,
			     int32_t **ids, int *n, struct kvq_oai_err *e)
{
	json_t *o, *a;
	int ret;

	*ids = NULL;
	*n = 0;
	o = kvq_oai_load(body, len, e);
	if (!o)
		return -EINVAL;
	a = json_object_get(o, "tokens");
	if (absent(a))
		ret = kvq_oai_bad(e, "tokens", "'tokens' is required");
	else if (!json_is_array(a))
		ret = kvq_oai_bad(e, "tokens", "'tokens' must be an array of "
				  "token ids");
	else
		ret = token_array(a, n_vocab, ids, n, "tokens", e);
	json_decref(o);
	return ret;
}

/* ------------------------------------------------------------- answers */

json_t *kvq_oai_error_json(const struct kvq_oai_err *e)
{
	return json_pack("{s:{s:s, s:s, s:o, s:o}}", "error",
			 "message", e->msg,
			 "type", e->type ? e->type : "invalid_request_error",
			 "param", e->param[0] ? json_string(e->param) :
			 json_null(),
			 "code", e->code ? json_string(e->code) : json_null());
}

json_t *kvq_oai_usage_json(int prompt, int completion, int cached)
{
	return json_pack("{s:i, s:i, s:i, s:{s:i}}",
			 "prompt_tokens", prompt,
			 "completion_tokens", completion,
			 "total_tokens", prompt + completion,
			 "prompt_tokens_details", "cached_tokens", cached);
}

void kvq_oai_make_id(enum kvq_oai_kind kind, char *buf, size_t len)
{
	unsigned char rnd[12];
	char hex[25];
	int i;

	if (getrandom(rnd, sizeof(rnd), GRND_NONBLOCK) != sizeof(rnd)) {
		struct timespec ts;
		uint64_t x;

		clock_gettime(CLOCK_REALTIME, &ts);
		x = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^
		    (uint64_t)ts.tv_sec;
		for (i = 0; i < (int)sizeof(rnd); i++) {
			x ^= x >> 29;
			x *= 0xbf58476d1ce4e5b9ull;
			rnd[i] = (unsigned char)(x >> 32);
		}
	}
	for (i = 0; i < (int)sizeof(rnd); i++)
		snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
	snprintf(buf, len, "%s-%s", kind == KVQ_OAI_CHAT ? "chatcmpl" : "cmpl",
		 hex);
}
