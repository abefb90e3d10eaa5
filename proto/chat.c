/*
 * chat.c - recognising and rendering the chat template families kvqd
 * serves.
 *
 * Why this file exists: see chat.h.  Each family is written down once as
 * a sequence of special tokens and text pieces; text pieces are tokenized
 * on their own, as a tokenizer that parses special tokens inside text would
 * split them.
 *
 *   llama3   <|begin_of_text|> then per message
 *            <|start_header_id|>ROLE<|end_header_id|>"\n\n"TRIMMED<|eot_id|>
 *            and <|start_header_id|>assistant<|end_header_id|>"\n\n"
 *   chatml   per message <|im_start|>ROLE"\n"CONTENT<|im_end|>"\n" and
 *            <|im_start|>"assistant\n"; a default system message when the
 *            template has one and the conversation does not
 *   llama2   <s>"[INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\nUSER [/INST]"
 *            " ASSISTANT "</s><s>"[INST] USER [/INST]" ...
 *   mistral  <s>"[INST] " SYSTEM"\n\n"USER " [/INST]" ASSISTANT</s> ...
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "proto/chat.h"
#include "proto/openai.h"

static const char *const fam_names[] = {
	"none", "unknown", "llama3", "chatml", "mistral", "llama2",
};

const char *kvq_chat_family_name(enum kvq_chat_family f)
{
	if ((unsigned)f >= sizeof(fam_names) / sizeof(fam_names[0]))
		return "unknown";
	return fam_names[f];
}

static bool has(const char *s, size_t len, const char *needle)
{
	return memmem(s, len, needle, strlen(needle)) != NULL;
}

enum kvq_chat_family kvq_chat_detect(const char *tmpl, size_t len)
{
	if (!tmpl || !len)
		return KVQ_CHAT_NONE;
	if (has(tmpl, len, "<|start_header_id|>") &&
	    has(tmpl, len, "<|end_header_id|>") && has(tmpl, len, "<|eot_id|>"))
		return KVQ_CHAT_LLAMA3;
	if (has(tmpl, len, "<|im_start|>") && has(tmpl, len, "<|im_end|>"))
		return KVQ_CHAT_CHATML;
	if (has(tmpl, len, "[INST]") && has(tmpl, len, "<<SYS>>"))
		return KVQ_CHAT_LLAMA2;
	if (has(tmpl, len, "[INST]") && has(tmpl, len, "[/INST]"))
		return KVQ_CHAT_MISTRAL;
	return KVQ_CHAT_UNKNOWN;
}

char *kvq_chat_default_system(const char *tmpl, size_t len)
{
	static const char key[] = "<|im_start|>system\\n";
	const char *p, *end, *q;
	char *out, *o;

	if (!tmpl)
		return NULL;
	p = memmem(tmpl, len, key, sizeof(key) - 1);
	if (!p)
		return NULL;
	p += sizeof(key) - 1;
	end = memmem(p, tmpl + len - p, "<|im_end|>", 10);
	if (!end || end <= p)
		return NULL;
	for (q = p; q < end; q++)
		if (*q == '{' || *q == '}' || *q == '\'' || *q == '"' ||
		    *q == '+')
			return NULL;	/* an expression, not a literal */
	out = malloc((size_t)(end - p) + 1);
	if (!out)
		return NULL;
	for (o = out, q = p; q < end; q++) {
		if (q[0] == '\\' && q + 1 < end && q[1] == 'n') {
			*o++ = '\n';
			q++;
		} else {
			*o++ = *q;
		}
	}
	*o = 0;
	return out;
}

/* Id of the vocabulary entry spelled exactly @text, or -1. */
static int32_t find_token(const struct kvq_tokenizer *t, const char *text)
{
	int32_t i, n = kvq_tokenizer_n_vocab(t);
	const char *s;

	for (i = 0; i < n; i++) {
		s = kvq_token_text(t, i);
		if (s && !strcmp(s, text))
			return i;
	}
	return -1;
}

static int need(struct kvq_chat *c, int32_t *out, const char *text)
{
	*out = find_token(c->tok, text);
	if (*out >= 0)
		return 0;
	snprintf(c->why, sizeof(c->why), "the model's chat template is of "
		 "the %s family but its vocabulary has no %s token",
		 kvq_chat_family_name(c->fam), text);
	return -ENOTSUP;
}

int kvq_chat_init(struct kvq_chat *c, const struct kvq_tokenizer *t,
		  const char *tmpl, size_t len)
{
	int ret = 0;

	memset(c, 0, sizeof(*c));
	c->tok = t;
	c->sp_start = c->sp_end = c->sp_end_hdr = -1;
	c->sp_inst = c->sp_inst_end = -1;
	c->turn_end = -1;
	c->fam = kvq_chat_detect(tmpl, len);
	switch (c->fam) {
	case KVQ_CHAT_NONE:
		snprintf(c->why, sizeof(c->why), "this model has no chat "
			 "template (tokenizer.chat_template); use "
			 "/v1/completions");
		return -ENOTSUP;
	case KVQ_CHAT_UNKNOWN:
		snprintf(c->why, sizeof(c->why), "this model's chat template "
			 "is not one kvqd recognises (Llama 3, ChatML/Qwen2, "
			 "Mistral, Llama 2); use /v1/completions");
		return -ENOTSUP;
	case KVQ_CHAT_LLAMA3:
		if ((ret = need(c, &c->sp_start, "<|start_header_id|>")) ||
		    (ret = need(c, &c->sp_end_hdr, "<|end_header_id|>")) ||
		    (ret = need(c, &c->sp_end, "<|eot_id|>")))
			break;
		c->turn_end = c->sp_end;
		break;
	case KVQ_CHAT_CHATML:
		if ((ret = need(c, &c->sp_start, "<|im_start|>")) ||
		    (ret = need(c, &c->sp_end, "<|im_end|>")))
			break;
		c->turn_end = c->sp_end;
		c->default_system = kvq_chat_default_system(tmpl, len);
		break;
	case KVQ_CHAT_MISTRAL:
	case KVQ_CHAT_LLAMA2:
		if (kvq_tokenizer_bos(t) < 0 || kvq_tokenizer_eos(t) < 0) {
			snprintf(c->why, sizeof(c->why), "the model's chat "
				 "template needs BOS and EOS tokens, which its "
				 "vocabulary lacks");
			ret = -ENOTSUP;
			break;
		}
		c->sp_inst = find_token(t, "[INST]");
		c->sp_inst_end = find_token(t, "[/INST]");
		if (c->sp_inst < 0 || c->sp_inst_end < 0)
			c->sp_inst = c->sp_inst_end = -1;
		c->turn_end = kvq_tokenizer_eos(t);
		break;
	}
	if (ret)
		c->fam = KVQ_CHAT_UNKNOWN;
	return ret;
}

void kvq_chat_fini(struct kvq_chat *c)
{
	free(c->default_system);
	c->default_system = NULL;
}

/* ------------------------------------------------------------- rendering */

struct tokbuf {
	int32_t *v;
	int n, cap;
	int err;
};

static void tb_grow(struct tokbuf *b, int more)
{
	int cap = b->cap ? b->cap : 256;
	int32_t *p;

	if (b->err || b->n + more <= b->cap)
		return;
	while (cap < b->n + more)
		cap *= 2;
	p = realloc(b->v, sizeof(*p) * cap);
	if (!p) {
		b->err = -ENOMEM;
		return;
	}
	b->v = p;
	b->cap = cap;
}

static void tb_id(struct tokbuf *b, int32_t id)
{
	tb_grow(b, 1);
	if (!b->err)
		b->v[b->n++] = id;
}

static void tb_text(struct tokbuf *b, const struct kvq_tokenizer *t,
		    const char *s, size_t len)
{
	int n;

	if (!len || b->err)
		return;
	tb_grow(b, (int)len + 8);
	if (b->err)
		return;
	n = kvq_tokenize(t, s, len, b->v + b->n, b->cap - b->n);
	if (n > b->cap - b->n) {
		tb_grow(b, n);
		if (b->err)
			return;
		n = kvq_tokenize(t, s, len, b->v + b->n, b->cap - b->n);
	}
	if (n < 0) {
		b->err = n;
		return;
	}
	b->n += n;
}

static void tb_str(struct tokbuf *b, const struct kvq_tokenizer *t,
		   const char *s)
{
	tb_text(b, t, s, strlen(s));
}

/* @s without leading and trailing white space, as Jinja's trim. */
static const char *trimmed(const char *s, size_t *len)
{
	size_t n = *len;

	while (n && isspace((unsigned char)*s)) {
		s++;
		n--;
	}
	while (n && isspace((unsigned char)s[n - 1]))
		n--;
	*len = n;
	return s;
}

static void render_llama3(const struct kvq_chat *c, struct tokbuf *b,
			  const struct kvq_oai_msg *m, int n)
{
	int i;

	if (kvq_tokenizer_bos(c->tok) >= 0)
		tb_id(b, kvq_tokenizer_bos(c->tok));
	for (i = 0; i < n; i++) {
		size_t len = m[i].len;
		const char *s = trimmed(m[i].content, &len);

		tb_id(b, c->sp_start);
		tb_str(b, c->tok, m[i].role);
		tb_id(b, c->sp_end_hdr);
		tb_str(b, c->tok, "\n\n");
		tb_text(b, c->tok, s, len);
		tb_id(b, c->sp_end);
	}
	tb_id(b, c->sp_start);
	tb_str(b, c->tok, "assistant");
	tb_id(b, c->sp_end_hdr);
	tb_str(b, c->tok, "\n\n");
}

static void chatml_turn(const struct kvq_chat *c, struct tokbuf *b,
			const char *role, const char *s, size_t len)
{
	tb_id(b, c->sp_start);
	tb_str(b, c->tok, role);
	tb_str(b, c->tok, "\n");
	tb_text(b, c->tok, s, len);
	tb_id(b, c->sp_end);
	tb_str(b, c->tok, "\n");
}

static void render_chatml(const struct kvq_chat *c, struct tokbuf *b,
			  const struct kvq_oai_msg *m, int n)
{
	int i;

	if (kvq_tokenizer_add_bos(c->tok) && kvq_tokenizer_bos(c->tok) >= 0)
		tb_id(b, kvq_tokenizer_bos(c->tok));
	if (c->default_system && strcmp(m[0].role, "system"))
		chatml_turn(c, b, "system", c->default_system,
			    strlen(c->default_system));
	for (i = 0; i < n; i++)
		chatml_turn(c, b, m[i].role, m[i].content, m[i].len);
	tb_id(b, c->sp_start);
	tb_str(b, c->tok, "assistant\n");
}

/* "[INST] " ... " [/INST]" as text, or as the vocabulary's own tokens. */
static void inst_open(const struct kvq_chat *c, struct tokbuf *b)
{
	if (c->sp_inst >= 0)
		tb_id(b, c->sp_inst);
	else
		tb_str(b, c->tok, "[INST] ");
}

static void inst_close(const struct kvq_chat *c, struct tokbuf *b)
{
	if (c->sp_inst_end >= 0)
		tb_id(b, c->sp_inst_end);
	else
		tb_str(b, c->tok, " [/INST]");
}

/*
 * Llama 2 and Mistral: the system message (if any) goes into the first
 * user turn; each user turn opens with BOS (Llama 2) or only the first
 * (Mistral); each assistant turn ends with EOS.
 */
static int render_inst(const struct kvq_chat *c, struct tokbuf *b,
		       const struct kvq_oai_msg *m, int n,
		       struct kvq_oai_err *e)
{
	bool llama2 = c->fam == KVQ_CHAT_LLAMA2;
	int32_t bos = kvq_tokenizer_bos(c->tok), eos = kvq_tokenizer_eos(c->tok);
	const struct kvq_oai_msg *sys = NULL;
	bool first = true;
	char *buf;
	size_t len;
	int i;

	for (i = 0; i < n; i++) {
		const char *s = m[i].content;

		len = m[i].len;
		if (!strcmp(m[i].role, "system")) {
			if (i)
				return kvq_oai_bad(e, "messages", "this model's "
						   "chat template accepts a "
						   "system message only first");
			sys = &m[i];
			continue;
		}
		if (llama2)
			s = trimmed(s, &len);
		if (!strcmp(m[i].role, "assistant")) {
			tb_str(b, c->tok, llama2 ? " " : "");
			tb_text(b, c->tok, s, len);
			if (llama2)
				tb_str(b, c->tok, " ");
			tb_id(b, eos);
			continue;
		}
		if (llama2 || first)
			tb_id(b, bos);
		inst_open(c, b);
		if (sys && first) {
			size_t sl = sys->len;
			const char *ss = llama2 ? trimmed(sys->content, &sl) :
					 sys->content;

			buf = malloc(sl + len + 32);
			if (!buf) {
				b->err = -ENOMEM;
				break;
			}
			if (llama2)
				len = sprintf(buf, "<<SYS>>\n%.*s\n<</SYS>>\n\n"
					      "%.*s", (int)sl, ss, (int)len, s);
			else
				len = sprintf(buf, "%.*s\n\n%.*s", (int)sl, ss,
					      (int)len, s);
			tb_text(b, c->tok, buf, len);
			free(buf);
		} else {
			tb_text(b, c->tok, s, len);
		}
		inst_close(c, b);
		first = false;
	}
	if (first)
		return kvq_oai_bad(e, "messages", "'messages' needs at least "
				   "one user message for this model's chat "
				   "template");
	return 0;
}

int kvq_chat_render(const struct kvq_chat *c, const struct kvq_oai_msg *m,
		    int n, int32_t **ids, int *n_ids, struct kvq_oai_err *e)
{
	struct tokbuf b = { 0 };
	int ret = 0;

	*ids = NULL;
	*n_ids = 0;
	switch (c->fam) {
	case KVQ_CHAT_LLAMA3:
		render_llama3(c, &b, m, n);
		break;
	case KVQ_CHAT_CHATML:
		render_chatml(c, &b, m, n);
		break;
	case KVQ_CHAT_MISTRAL:
	case KVQ_CHAT_LLAMA2:
		ret = render_inst(c, &b, m, n, e);
		break;
	case KVQ_CHAT_NONE:
		return kvq_oai_fail(e, 400, "invalid_request_error",
				    "chat_template_missing", NULL, "%s",
				    c->why);
	default:
		return kvq_oai_fail(e, 500, "server_error",
				    "chat_template_unsupported", NULL, "%s",
				    c->why);
	}
	if (!ret && b.err)
		ret = kvq_oai_fail(e, 500, "server_error", NULL, NULL,
				   "rendering the chat prompt failed: %s",
				   strerror(-b.err));
	if (ret) {
		free(b.v);
		return ret;
	}
	*ids = b.v;
	*n_ids = b.n;
	return 0;
}
