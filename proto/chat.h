/*
 * chat.h - chat templates: from messages to the prompt a chat model was
 * trained on.
 *
 * Why this file exists: a GGUF carries its chat template as Jinja source
 * (tokenizer.chat_template).  kvqd does not run Jinja; it recognises the
 * template families of the Llama 3, ChatML (Qwen2), Mistral and Llama 2
 * models and renders those itself, special tokens as ids.  A template of
 * any other family is refused rather than guessed at.
 */
#ifndef KVQ_PROTO_CHAT_H
#define KVQ_PROTO_CHAT_H

#include <stddef.h>
#include <stdint.h>

struct kvq_tokenizer;
struct kvq_oai_msg;
struct kvq_oai_err;

enum kvq_chat_family {
	KVQ_CHAT_NONE = 0,	/* the model has no template */
	KVQ_CHAT_UNKNOWN,	/* a template kvqd does not recognise */
	KVQ_CHAT_LLAMA3,
	KVQ_CHAT_CHATML,
	KVQ_CHAT_MISTRAL,
	KVQ_CHAT_LLAMA2,
};

/* "none", "unknown", "llama3", "chatml", "mistral", "llama2". */
const char *kvq_chat_family_name(enum kvq_chat_family f);

/* The family of Jinja source @tmpl (@len bytes; NULL: KVQ_CHAT_NONE). */
enum kvq_chat_family kvq_chat_detect(const char *tmpl, size_t len);

struct kvq_chat {
	enum kvq_chat_family fam;
	const struct kvq_tokenizer *tok;
	int32_t sp_start, sp_end, sp_end_hdr;	/* family's special ids */
	int32_t sp_inst, sp_inst_end;		/* [INST] tokens, or -1 */
	int32_t turn_end;	/* token ending an assistant turn, or -1 */
	char *default_system;	/* ChatML templates that add one, or NULL */
	char why[256];		/* when chat is refused: the reason */
};

/*
 * kvq_chat_init() - recognise @tmpl (may be NULL) for tokenizer @t.  Always
 * succeeds in the sense that @c is usable afterwards: when chat cannot be
 * served, c->fam is KVQ_CHAT_NONE or KVQ_CHAT_UNKNOWN (or the template
 * needs a token the vocabulary lacks) and c->why says why.  Returns 0, or
 * -ENOTSUP in those cases; -ENOMEM.
 */
int kvq_chat_init(struct kvq_chat *c, const struct kvq_tokenizer *t,
		  const char *tmpl, size_t len);
void kvq_chat_fini(struct kvq_chat *c);

/*
 * kvq_chat_render() - the prompt for @n messages @m, ending with the
 * assistant's turn opened.  Stores malloc'd token ids in *ids and their
 * count in *n_ids and returns 0; or -errno with @e set (unsupported
 * template: 500; bad roles: 400).
 */
int kvq_chat_render(const struct kvq_chat *c, const struct kvq_oai_msg *m,
		    int n, int32_t **ids, int *n_ids, struct kvq_oai_err *e);

/* For tests: Jinja source of ChatML's default system prompt, unescaped,
 * or NULL when the template adds none (malloc'd). */
char *kvq_chat_default_system(const char *tmpl, size_t len);

#endif /* KVQ_PROTO_CHAT_H */
