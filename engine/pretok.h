/*
 * pretok.h - byte-level BPE pre-tokenizers, shared by tokenizer.c and
 * pretok.c only.
 */
#ifndef KVQ_PRETOK_H
#define KVQ_PRETOK_H

#define PCRE2_CODE_UNIT_WIDTH 8

#include <limits.h>
#include <pcre2.h>
#include <stdbool.h>
#include <stddef.h>

/* Longest input accepted, so that every size computed from it fits. */
#define TOK_MAX_TEXT ((size_t)INT_MAX / 4)

#define PRETOK_MAX_RE 6

/*
 * A pre-tokenizer: its names in tokenizer.ggml.pre and its regexes, applied
 * one after the other, each one cutting the pieces the previous ones left.
 * Text a regex does not match stays a piece of its own.
 */
struct pretok_def {
	const char *names[8];
	const char *re[PRETOK_MAX_RE + 1];
	bool ignore_merges;	/* a piece that is a token is used whole */
	bool add_bos;		/* when add_bos_token is absent */
};

struct pretok {
	const struct pretok_def *def;
	pcre2_code *re[PRETOK_MAX_RE];
	int n_re;
};

/* A growable array of offsets. */
struct offs {
	size_t *v;
	size_t n, cap;
};

/* Appends @x; 0 or -ENOMEM. */
int kvq_offs_push(struct offs *o, size_t x);

/*
 * Compiles the regexes of pre-tokenizer @name.  Returns 0 and the compiled
 * set in *out, -ENOTSUP for an unknown name, -ENOMEM, or -EINVAL when PCRE2
 * refuses a regex (its message goes to @err).
 */
int kvq_pretok_create(const char *name, struct pretok **out, char *err,
		      size_t errlen);
void kvq_pretok_destroy(struct pretok *p);

/*
 * Cuts @text into pieces with every regex of @p in turn.  On success *out
 * holds the end offset of each piece (out->n of them; none for empty text).
 */
int kvq_pretok_split(const struct pretok *p, const char *text, size_t len,
		     struct offs *out);

#endif /* KVQ_PRETOK_H */
