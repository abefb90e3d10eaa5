/*
 * tokenizer.c - SentencePiece-style and GPT-2-style byte-level BPE
 * tokenizers built from GGUF metadata (see tokenizer.h).
 *
 * Why this file exists: a prompt must become exactly the ids the model was
 * trained on, and generated ids must become text again.  The behaviour is
 * llama.cpp's, whose tokenizer produced the reference vectors the unit test
 * compares against:
 *
 *  - Text is first cut at user-defined tokens (token type 4), matched
 *    literally, longest first; they are not "special" and are recognised
 *    even though special tokens are never parsed from text.
 *  - SentencePiece ("llama"): spaces become U+2581, one more U+2581 goes in
 *    front of a piece of text that starts the input or follows a token
 *    (add_space_prefix), then neighbouring symbols (single UTF-8 characters
 *    to begin with) are merged into the vocabulary entry with the highest
 *    score, leftmost first on ties, until nothing merges; a symbol that is
 *    not in the vocabulary falls back to its <0xXX> byte tokens.
 *  - Byte-level BPE ("gpt2"): the text is cut into pieces by the regexes of
 *    the pre-tokenizer named in tokenizer.ggml.pre (PCRE2, UTF + UCP), each
 *    piece's bytes are spelt in GPT-2's byte alphabet, and neighbouring
 *    symbols merge by merge rank, lowest first, leftmost on ties.
 *
 * A tokenizer is immutable once created: any number of threads may encode
 * and decode with it at the same time (each call allocates its own scratch).
 */
#define _GNU_SOURCE
#define PCRE2_CODE_UNIT_WIDTH 8

#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/pretok.h"
#include "engine/tokenizer.h"
#include "engine/unicode.h"


#define KEY_MODEL "tokenizer.ggml.model"
#define KEY_PRE "tokenizer.ggml.pre"
#define KEY_TOKENS "tokenizer.ggml.tokens"
#define KEY_SCORES "tokenizer.ggml.scores"
#define KEY_TYPES "tokenizer.ggml.token_type"
#define KEY_MERGES "tokenizer.ggml.merges"
#define KEY_ADD_BOS "tokenizer.ggml.add_bos_token"
#define KEY_ADD_SPACE "tokenizer.ggml.add_space_prefix"


/* tokenizer.ggml.token_type values. */
enum tok_type {
	TT_UNDEFINED = 0,
	TT_NORMAL = 1,
	TT_UNKNOWN = 2,
	TT_CONTROL = 3,
	TT_USER = 4,
	TT_UNUSED = 5,
	TT_BYTE = 6,
};

/* ------------------------------------------------------------ hash maps */

/* A string in one of the tokenizer's pools. */
struct tok_str {
	uint32_t off;
	uint32_t len;
};

/*
 * Open addressing, linear probing, at most half full.  Keys are strings of
 * a pool (token texts, or merges "A B" looked up as the pair A, B); a slot
 * holds the key's index in @str and its hash.
 */
struct strmap {
	uint32_t mask;
	uint32_t *hash;
	int32_t *val;			/* -1: empty slot */
	const char *pool;
	const struct tok_str *str;
	const uint32_t *split;		/* pairs: the length of A */
};

struct key {
	const char *a, *b;		/* b is NULL for a plain string */
	size_t alen, blen;
	uint32_t hash;
};

#define FNV_SEED 2166136261u

static uint32_t fnv1a(uint32_t h, const char *s, size_t n)
{
	while (n--) {
		h ^= (unsigned char)*s++;
		h *= 16777619u;
	}
	return h;
}

static struct key key_str(const char *s, size_t n)
{
	struct key k = { .a = s, .alen = n };

	k.hash = fnv1a(FNV_SEED, s, n);
	return k;
}

static struct key key_pair(const char *a, size_t an, const char *b,
			   size_t bn)
{
	struct key k = { .a = a, .alen = an, .b = b, .blen = bn };

	k.hash = fnv1a(fnv1a(fnv1a(FNV_SEED, a, an), " ", 1), b, bn);
	return k;
}

static bool strmap_eq(const struct strmap *m, int32_t idx, const struct key *k)
{
	const struct tok_str *s = &m->str[idx];
	const char *p = m->pool + s->off;

	if (!k->b)
		return s->len == k->alen && !memcmp(p, k->a, k->alen);
	return m->split[idx] == k->alen && s->len == k->alen + 1 + k->blen &&
	       !memcmp(p, k->a, k->alen) &&
	       !memcmp(p + k->alen + 1, k->b, k->blen);
}

/* The slot holding @k, or the empty slot where it would go. */
static uint32_t strmap_slot(const struct strmap *m, const struct key *k)
{
	uint32_t i = k->hash & m->mask;

	while (m->val[i] >= 0) {
		if (m->hash[i] == k->hash && strmap_eq(m, m->val[i], k))
			break;
		i = (i + 1) & m->mask;
	}
	return i;
}

static int32_t strmap_find(const struct strmap *m, const struct key *k)
{
	return m->val[strmap_slot(m, k)];
}

/* Adds key @idx unless an equal key is there already (the first one stays). */
static void strmap_add(struct strmap *m, int32_t idx, const struct key *k)
{
	uint32_t i = strmap_slot(m, k);

	if (m->val[i] < 0) {
		m->val[i] = idx;
		m->hash[i] = k->hash;
	}
}

static int strmap_init(struct strmap *m, size_t n, const char *pool,
		       const struct tok_str *str, const uint32_t *split)
{
	size_t cap = 16;

	while (cap < 2 * n)
		cap <<= 1;
	m->hash = malloc(cap * sizeof(*m->hash));
	m->val = malloc(cap * sizeof(*m->val));
	if (!m->hash || !m->val)
		return -ENOMEM;
	memset(m->val, 0xff, cap * sizeof(*m->val));
	m->mask = (uint32_t)(cap - 1);
	m->pool = pool;
	m->str = str;
	m->split = split;
	return 0;
}

static void strmap_fini(struct strmap *m)
{
	free(m->hash);
	free(m->val);
}

/* ------------------------------------------------------------ tokenizer */

struct kvq_tokenizer {
	enum kvq_tok_kind kind;
	int32_t n_vocab;
	char *text_pool;		/* token texts, NUL-terminated */
	struct tok_str *text;
	char *piece_pool;		/* decoded pieces, same offsets */
	uint32_t *piece_len;
	float *score;
	uint8_t *type;
	bool *eog;
	struct strmap vocab;

	int32_t n_merges;
	char *merge_pool;
	struct tok_str *merge;
	uint32_t *merge_split;
	struct strmap merges;
	struct pretok *pretok;

	int32_t byte_tok[256];		/* fallback id per byte, or -1 */
	int32_t *user;			/* user-defined, longest first */
	int32_t n_user;

	int32_t bos, eos, eot, eom, unk, pad;
	bool add_bos;
	bool add_space_prefix;		/* SentencePiece only, as the reference */
};

static int32_t vocab_find(const struct kvq_tokenizer *t, const char *s,
			  size_t n)
{
	struct key k = key_str(s, n);

	return strmap_find(&t->vocab, &k);
}

static int32_t merge_rank(const struct kvq_tokenizer *t, const char *a,
			  size_t an, const char *b, size_t bn)
{
	struct key k = key_pair(a, an, b, bn);

	return strmap_find(&t->merges, &k);
}

static const char *tok_text(const struct kvq_tokenizer *t, int32_t id)
{
	return t->text_pool + t->text[id].off;
}

__attribute__((format(printf, 5, 6)))
static int fail(char *err, size_t errlen, int rc, const struct kvq_gguf *g,
		const char *fmt, ...)
{
	va_list ap;
	int n;

	if (!err || !errlen)
		return rc;
	n = snprintf(err, errlen, "%s: ", g->path ? g->path : "(gguf)");
	if (n < 0 || (size_t)n >= errlen)
		return rc;
	va_start(ap, fmt);
	vsnprintf(err + n, errlen - n, fmt, ap);
	va_end(ap);
	return rc;
}

/* Reads element @i of a numeric array as a double (unaligned-safe). */
static double arr_num(const struct kvq_gguf_kv *kv, uint64_t i)
{
	const unsigned char *p = kv->v.arr.data;
	int32_t i32;
	uint32_t u32;
	float f;

	switch (kv->v.arr.type) {
	case KVQ_GGUF_F32:
		memcpy(&f, p + 4 * i, 4);
		return f;
	case KVQ_GGUF_I32:
		memcpy(&i32, p + 4 * i, 4);
		return i32;
	case KVQ_GGUF_U32:
		memcpy(&u32, p + 4 * i, 4);
		return u32;
	case KVQ_GGUF_I8:
		return (int8_t)p[i];
	case KVQ_GGUF_U8:
		return p[i];
	default:
		return 0;
	}
}

/*
 * The optional per-token array @key: NULL when absent, else it must be an
 * array of one of the element types in @ok (a -1 terminated list) with at
 * least n_vocab elements.
 */
static int optional_array(const struct kvq_gguf *g, const char *key,
			  const int *ok, uint64_t n,
			  const struct kvq_gguf_kv **out, char *err,
			  size_t errlen)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, key);

	*out = NULL;
	if (!kv)
		return 0;
	if (kv->type != KVQ_GGUF_ARRAY)
		return fail(err, errlen, -EINVAL, g, "%s is not an array", key);
	for (; *ok >= 0; ok++)
		if ((int)kv->v.arr.type == *ok)
			break;
	if (*ok < 0)
		return fail(err, errlen, -EINVAL, g,
			    "%s has element type %d, not a number", key,
			    (int)kv->v.arr.type);
	if (kv->v.arr.n < n)
		return fail(err, errlen, -EINVAL, g,
			    "%s has %llu entries for %llu tokens", key,
			    (unsigned long long)kv->v.arr.n,
			    (unsigned long long)n);
	*out = kv;
	return 0;
}

/* Copies a STRING array's elements into one NUL-separated pool. */
static int copy_strings(const struct kvq_gguf *g, const struct kvq_gguf_kv *kv,
			const char *key, char **pool, struct tok_str **strs,
			char *err, size_t errlen)
{
	uint64_t i, n = kv->v.arr.n, total = 0;
	struct kvq_gguf_str s;

	for (i = 0; i < n; i++) {
		total += kvq_gguf_arr_str(g, kv, i).len + 1;
		if (total > UINT32_MAX)
			return fail(err, errlen, -EFBIG, g,
				    "%s: strings too long", key);
	}
	*pool = malloc(total ? total : 1);
	*strs = malloc((n ? n : 1) * sizeof(**strs));
	if (!*pool || !*strs)
		return -ENOMEM;
	total = 0;
	for (i = 0; i < n; i++) {
		s = kvq_gguf_arr_str(g, kv, i);
		memcpy(*pool + total, s.ptr, s.len);
		(*pool)[total + s.len] = '\0';
		(*strs)[i].off = (uint32_t)total;
		(*strs)[i].len = (uint32_t)s.len;
		total += s.len + 1;
	}
	return 0;
}

static int load_tokens(struct kvq_tokenizer *t, const struct kvq_gguf *g,
		       char *err, size_t errlen)
{
	static const int score_types[] = { KVQ_GGUF_F32, KVQ_GGUF_I32, -1 };
	static const int type_types[] = { KVQ_GGUF_I32, KVQ_GGUF_U32,
					  KVQ_GGUF_I8, KVQ_GGUF_U8, -1 };
	const struct kvq_gguf_kv *kv, *scores, *types;
	uint64_t pool_len;
	struct key k;
	int32_t i;
	int rc;

	kv = kvq_gguf_find(g, KEY_TOKENS);
	if (!kv)
		return fail(err, errlen, -EINVAL, g, "%s is missing",
			    KEY_TOKENS);
	if (kv->type != KVQ_GGUF_ARRAY || kv->v.arr.type != KVQ_GGUF_STRING)
		return fail(err, errlen, -EINVAL, g,
			    "%s is not an array of strings", KEY_TOKENS);
	if (kv->v.arr.n == 0 || kv->v.arr.n > INT32_MAX)
		return fail(err, errlen, -EINVAL, g, "%s has %llu entries",
			    KEY_TOKENS, (unsigned long long)kv->v.arr.n);
	t->n_vocab = (int32_t)kv->v.arr.n;
	rc = optional_array(g, KEY_SCORES, score_types, t->n_vocab, &scores,
			    err, errlen);
	if (!rc)
		rc = optional_array(g, KEY_TYPES, type_types, t->n_vocab,
				    &types, err, errlen);
	if (!rc)
		rc = copy_strings(g, kv, KEY_TOKENS, &t->text_pool, &t->text,
				  err, errlen);
	if (rc)
		return rc;

	pool_len = t->text[t->n_vocab - 1].off + t->text[t->n_vocab - 1].len
		   + 1;
	t->piece_pool = malloc(pool_len);
	t->piece_len = calloc(t->n_vocab, sizeof(*t->piece_len));
	t->score = calloc(t->n_vocab, sizeof(*t->score));
	t->type = calloc(t->n_vocab, sizeof(*t->type));
	t->eog = calloc(t->n_vocab, sizeof(*t->eog));
	if (!t->piece_pool || !t->piece_len || !t->score || !t->type ||
	    !t->eog)
		return -ENOMEM;
	rc = strmap_init(&t->vocab, t->n_vocab, t->text_pool, t->text, NULL);
	if (rc)
		return rc;
	for (i = 0; i < t->n_vocab; i++) {
		int ty = types ? (int)arr_num(types, i) : TT_NORMAL;

		t->score[i] = scores ? (float)arr_num(scores, i) : 0.0f;
		t->type[i] = ty >= TT_NORMAL && ty <= TT_BYTE ? ty :
								TT_UNDEFINED;
		/* An empty entry can never be produced; keep it out. */
		if (t->text[i].len == 0)
			continue;
		k = key_str(tok_text(t, i), t->text[i].len);
		strmap_add(&t->vocab, i, &k);
	}
	return 0;
}

static int load_merges(struct kvq_tokenizer *t, const struct kvq_gguf *g,
		       char *err, size_t errlen)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, KEY_MERGES);
	struct key k;
	int32_t i;
	int rc;

	if (!kv)
		return fail(err, errlen, -EINVAL, g,
			    "%s is missing (needed by a gpt2 tokenizer)",
			    KEY_MERGES);
	if (kv->type != KVQ_GGUF_ARRAY || kv->v.arr.type != KVQ_GGUF_STRING)
		return fail(err, errlen, -EINVAL, g,
			    "%s is not an array of strings", KEY_MERGES);
	if (kv->v.arr.n > INT32_MAX)
		return fail(err, errlen, -EINVAL, g, "%s has %llu entries",
			    KEY_MERGES, (unsigned long long)kv->v.arr.n);
	t->n_merges = (int32_t)kv->v.arr.n;
	rc = copy_strings(g, kv, KEY_MERGES, &t->merge_pool, &t->merge, err,
			  errlen);
	if (rc)
		return rc;
	t->merge_split = malloc((t->n_merges ? t->n_merges : 1) *
				sizeof(*t->merge_split));
	if (!t->merge_split)
		return -ENOMEM;
	rc = strmap_init(&t->merges, t->n_merges, t->merge_pool, t->merge,
			 t->merge_split);
	if (rc)
		return rc;
	/* "A B": A ends at the first space after its first byte. */
	for (i = 0; i < t->n_merges; i++) {
		const char *s = t->merge_pool + t->merge[i].off;
		const char *sp = t->merge[i].len > 1 ?
				 memchr(s + 1, ' ', t->merge[i].len - 1) : NULL;
		uint32_t at;

		t->merge_split[i] = UINT32_MAX;
		if (!sp)
			continue;
		at = (uint32_t)(sp - s);
		t->merge_split[i] = at;
		k = key_pair(s, at, sp + 1, t->merge[i].len - at - 1);
		strmap_add(&t->merges, i, &k);
	}
	return 0;
}

/*
 * Special token id @key into *id.  An absent key leaves the default; an id
 * outside the vocabulary (some files store -1 or 2^32-1 for "none") means
 * no such token.  A key that is not an integer is an error.
 */
static bool is_signed_int(enum kvq_gguf_vtype type)
{
	return type == KVQ_GGUF_I8 || type == KVQ_GGUF_I16 ||
	       type == KVQ_GGUF_I32 || type == KVQ_GGUF_I64;
}

static int load_special(struct kvq_tokenizer *t, const struct kvq_gguf *g,
			const char *key, int32_t *id, char *err,
			size_t errlen)
{
	const struct kvq_gguf_kv *kv;
	uint64_t v;
	int rc;

	if (*id >= t->n_vocab)
		*id = -1;
	rc = kvq_gguf_get_u64(g, key, &v);
	if (rc == -ENOENT)
		return 0;
	if (rc == -EINVAL) {
		kv = kvq_gguf_find(g, key);
		if (kv && is_signed_int(kv->type)) {
			*id = -1;
			return 0;
		}
	}
	if (rc)
		return fail(err, errlen, rc, g, "%s is not an integer", key);
	*id = v < (uint64_t)t->n_vocab ? (int32_t)v : -1;
	return 0;
}

static int load_bool(const struct kvq_gguf *g, const char *key, bool *out,
		     char *err, size_t errlen)
{
	int rc = kvq_gguf_get_bool(g, key, out);

	if (rc == -ENOENT)
		return 0;
	if (rc)
		return fail(err, errlen, rc, g, "%s is not a boolean", key);
	return 0;
}

/* Texts of tokens that end a turn in the chat formats in use. */
static const char *const eog_texts[] = {
	"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
	"<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
	"<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
	NULL,
};

static bool is_eog_text(const char *s)
{
	int i;

	for (i = 0; eog_texts[i]; i++)
		if (!strcmp(s, eog_texts[i]))
			return true;
	return false;
}

static int load_specials(struct kvq_tokenizer *t, const struct kvq_gguf *g,
			 char *err, size_t errlen)
{
	static const struct {
		const char *key;
		size_t off;
	} ids[] = {
		{ "tokenizer.ggml.bos_token_id",
		  offsetof(struct kvq_tokenizer, bos) },
		{ "tokenizer.ggml.eos_token_id",
		  offsetof(struct kvq_tokenizer, eos) },
		{ "tokenizer.ggml.eot_token_id",
		  offsetof(struct kvq_tokenizer, eot) },
		{ "tokenizer.ggml.eom_token_id",
		  offsetof(struct kvq_tokenizer, eom) },
		{ "tokenizer.ggml.unknown_token_id",
		  offsetof(struct kvq_tokenizer, unk) },
		{ "tokenizer.ggml.padding_token_id",
		  offsetof(struct kvq_tokenizer, pad) },
	};
	size_t i;
	int32_t id;
	int rc;

	for (i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
		rc = load_special(t, g, ids[i].key,
				  (int32_t *)((char *)t + ids[i].off), err,
				  errlen);
		if (rc)
			return rc;
	}
	rc = load_bool(g, KEY_ADD_BOS, &t->add_bos, err, errlen);
	if (!rc)
		rc = load_bool(g, KEY_ADD_SPACE, &t->add_space_prefix, err,
			       errlen);
	if (rc)
		return rc;

	/*
	 * End-of-generation: EOS, EOT, EOM and the usual end-of-turn texts,
	 * which are made control tokens (decoding to nothing) if the file
	 * did not say so.  Without an EOT id the first such text is EOT.
	 */
	for (id = 0; id < t->n_vocab; id++) {
		if (!is_eog_text(tok_text(t, id)))
			continue;
		t->eog[id] = true;
		t->type[id] = TT_CONTROL;
		if (t->eot < 0)
			t->eot = id;
	}
	if (t->eos >= 0)
		t->eog[t->eos] = true;
	if (t->eot >= 0)
		t->eog[t->eot] = true;
	if (t->eom >= 0)
		t->eog[t->eom] = true;
	return 0;
}

/* The decoded form of token @id, written at @dst; returns its length. */
static uint32_t build_piece(const struct kvq_tokenizer *t, int32_t id,
			    char *dst)
{
	const char *s = tok_text(t, id);
	uint32_t n = t->text[id].len, i = 0, w = 0;
	unsigned int hex;
	uint32_t cp;
	int len, b;

	switch (t->type[id]) {
	case TT_USER:
		memcpy(dst, s, n);
		return n;
	case TT_BYTE:
		if (n == 6 && sscanf(s, "<0x%2x>", &hex) == 1) {
			dst[0] = (char)hex;
			return 1;
		}
		memcpy(dst, s, n);
		return n;
	case TT_NORMAL:
		break;
	default:
		return 0;
	}
	while (i < n) {
		if (t->kind == KVQ_TOK_SPM) {
			if (n - i >= 3 && !memcmp(s + i, "\xe2\x96\x81", 3)) {
				dst[w++] = ' ';
				i += 3;
			} else {
				dst[w++] = s[i++];
			}
			continue;
		}
		len = kvq_utf8_decode(s + i, n - i, &cp);
		if (len < 0) {
			dst[w++] = s[i++];
			continue;
		}
		b = kvq_cp_to_byte(cp);
		if (b >= 0) {
			dst[w++] = (char)b;
		} else {
			memcpy(dst + w, s + i, len);
			w += len;
		}
		i += len;
	}
	return w;
}

static void build_byte_tokens(struct kvq_tokenizer *t)
{
	char buf[8];
	int b, n;

	for (b = 0; b < 256; b++) {
		if (t->kind == KVQ_TOK_SPM) {
			snprintf(buf, sizeof(buf), "<0x%02X>", b);
			t->byte_tok[b] = vocab_find(t, buf, 6);
			if (t->byte_tok[b] < 0) {
				buf[0] = (char)b;
				t->byte_tok[b] = vocab_find(t, buf, 1);
			}
		} else {
			n = kvq_utf8_encode(kvq_byte_to_cp(b), buf);
			t->byte_tok[b] = vocab_find(t, buf, n);
		}
	}
}

struct len_id {
	uint32_t len;
	int32_t id;
};

static int cmp_len_id(const void *a, const void *b)
{
	const struct len_id *x = a, *y = b;

	if (x->len != y->len)
		return x->len > y->len ? -1 : 1;
	return (x->id > y->id) - (x->id < y->id);
}

static int build_user_tokens(struct kvq_tokenizer *t)
{
	struct len_id *v;
	int32_t i, n = 0;

	for (i = 0; i < t->n_vocab; i++)
		if (t->type[i] == TT_USER && t->text[i].len)
			n++;
	if (!n)
		return 0;
	v = malloc(n * sizeof(*v));
	t->user = malloc(n * sizeof(*t->user));
	if (!v || !t->user) {
		free(v);
		return -ENOMEM;
	}
	n = 0;
	for (i = 0; i < t->n_vocab; i++)
		if (t->type[i] == TT_USER && t->text[i].len)
			v[n++] = (struct len_id){ t->text[i].len, i };
	qsort(v, n, sizeof(*v), cmp_len_id);
	for (i = 0; i < n; i++)
		t->user[i] = v[i].id;
	t->n_user = n;
	free(v);
	return 0;
}

/* tokenizer.ggml.model and, for gpt2, the pre-tokenizer and its defaults. */
static int load_kind(struct kvq_tokenizer *t, const struct kvq_gguf *g,
		     char *err, size_t errlen)
{
	char pre[64], msg[160];
	const char *s;
	uint64_t len;
	int rc;

	rc = kvq_gguf_get_str(g, KEY_MODEL, &s, &len);
	if (rc == -ENOENT)
		return fail(err, errlen, -EINVAL, g,
			    "%s is missing (no tokenizer in this file)",
			    KEY_MODEL);
	if (rc)
		return fail(err, errlen, rc, g, "%s is not a string",
			    KEY_MODEL);
	if (len == 5 && !memcmp(s, "llama", 5)) {
		t->kind = KVQ_TOK_SPM;
		/* Llama's conventions when the file does not say. */
		t->bos = 1;
		t->eos = 2;
		t->unk = 0;
		t->add_bos = true;
		t->add_space_prefix = true;
		return 0;
	}
	if (len != 4 || memcmp(s, "gpt2", 4))
		return fail(err, errlen, -ENOTSUP, g,
			    "%s '%.*s' is not supported (only llama, gpt2)",
			    KEY_MODEL, (int)(len > 64 ? 64 : len), s);
	t->kind = KVQ_TOK_BPE;

	/* A file without the key predates it: the reference uses default. */
	rc = kvq_gguf_get_str(g, KEY_PRE, &s, &len);
	if (rc == -ENOENT) {
		s = "default";
		len = 7;
	} else if (rc) {
		return fail(err, errlen, rc, g, "%s is not a string", KEY_PRE);
	}
	if (len >= sizeof(pre) || memchr(s, '\0', len))
		return fail(err, errlen, -ENOTSUP, g,
			    "%s is not a known pre-tokenizer", KEY_PRE);
	memcpy(pre, s, len);
	pre[len] = '\0';
	rc = kvq_pretok_create(pre, &t->pretok, msg, sizeof(msg));
	if (rc == -ENOTSUP)
		return fail(err, errlen, rc, g,
			    "%s '%s' is not a known pre-tokenizer", KEY_PRE,
			    pre);
	if (rc == -EINVAL)
		return fail(err, errlen, rc, g, "%s: %s", KEY_PRE, msg);
	if (rc)
		return rc;
	t->add_bos = t->pretok->def->add_bos;
	return 0;
}

int kvq_tokenizer_create(const struct kvq_gguf *g, struct kvq_tokenizer **out,
			 char *err, size_t errlen)
{
	struct kvq_tokenizer *t;
	int32_t i;
	int rc;

	if (!g || !out)
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->bos = t->eos = t->eot = t->eom = t->unk = t->pad = -1;

	rc = load_kind(t, g, err, errlen);
	if (rc)
		goto out_destroy;
	rc = load_tokens(t, g, err, errlen);
	if (rc)
		goto out_destroy;
	if (t->kind == KVQ_TOK_BPE) {
		rc = load_merges(t, g, err, errlen);
		if (rc)
			goto out_destroy;
	}
	rc = load_specials(t, g, err, errlen);
	if (rc)
		goto out_destroy;
	rc = build_user_tokens(t);
	if (rc)
		goto out_destroy;
	build_byte_tokens(t);
	for (i = 0; i < t->n_vocab; i++)
		t->piece_len[i] = build_piece(t, i,
					      t->piece_pool + t->text[i].off);
	*out = t;
	return 0;

out_destroy:
	if (rc == -ENOMEM)
		fail(err, errlen, rc, g, "out of memory for the tokenizer");
	kvq_tokenizer_destroy(t);
	return rc;
}

void kvq_tokenizer_destroy(struct kvq_tokenizer *t)
{
	if (!t)
		return;
	kvq_pretok_destroy(t->pretok);
	strmap_fini(&t->merges);
	free(t->merge_split);
	free(t->merge);
	free(t->merge_pool);
	strmap_fini(&t->vocab);
	free(t->user);
	free(t->eog);
	free(t->type);
	free(t->score);
	free(t->piece_len);
	free(t->piece_pool);
	free(t->text);
	free(t->text_pool);
	free(t);
}

/* ------------------------------------------------------------- encoding */

/* Where ids go: the caller's buffer, counting past its end. */
struct idbuf {
	int32_t *ids;
	size_t cap;
	size_t n;
};

static void emit(struct idbuf *o, int32_t id)
{
	if (o->n < o->cap)
		o->ids[o->n] = id;
	o->n++;
}

/* A run of bytes of the work buffer, linked to its neighbours. */
struct sym {
	int prev, next;
	size_t off, n;
};

/* Two neighbouring symbols that could merge; lower key merges first. */
struct bigram {
	int left, right;
	double key;
	size_t size;
};

/* Scratch space of one kvq_tokenize() call. */
struct work {
	char *buf;
	size_t buf_cap;
	struct sym *sym;
	size_t sym_cap;
	struct bigram *heap;
	size_t n_heap, heap_cap;
	struct offs pieces;
};

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
	void *q;

	if (need <= *cap)
		return 0;
	q = realloc(*p, need * elem);
	if (!q)
		return -ENOMEM;
	*p = q;
	*cap = need;
	return 0;
}

static void work_fini(struct work *w)
{
	free(w->buf);
	free(w->sym);
	free(w->heap);
	free(w->pieces.v);
}

static bool bigram_before(const struct bigram *a, const struct bigram *b)
{
	return a->key < b->key || (a->key == b->key && a->left < b->left);
}

static int heap_push(struct work *w, const struct bigram *b)
{
	size_t i, parent;
	int rc;

	if (w->n_heap == w->heap_cap) {
		rc = grow((void **)&w->heap, &w->heap_cap,
			  w->heap_cap ? 2 * w->heap_cap : 64,
			  sizeof(*w->heap));
		if (rc)
			return rc;
	}
	i = w->n_heap++;
	while (i > 0) {
		parent = (i - 1) / 2;
		if (!bigram_before(b, &w->heap[parent]))
			break;
		w->heap[i] = w->heap[parent];
		i = parent;
	}
	w->heap[i] = *b;
	return 0;
}

static struct bigram heap_pop(struct work *w)
{
	struct bigram top = w->heap[0], last = w->heap[--w->n_heap];
	size_t i = 0, c, n = w->n_heap;

	while ((c = 2 * i + 1) < n) {
		if (c + 1 < n && bigram_before(&w->heap[c + 1], &w->heap[c]))
			c++;
		if (!bigram_before(&w->heap[c], &last))
			break;
		w->heap[i] = w->heap[c];
		i = c;
	}
	if (n)
		w->heap[i] = last;
	return top;
}

/*
 * Queues the merge of symbols @left and @right if the vocabulary has one:
 * SentencePiece merges into a token, scored by the token's score; BPE
 * merges a listed pair, by its rank.
 */
static int try_bigram(const struct kvq_tokenizer *t, struct work *w,
		      int left, int right)
{
	const struct sym *l, *r;
	struct bigram b;
	int32_t v;

	if (left < 0 || right < 0)
		return 0;
	l = &w->sym[left];
	r = &w->sym[right];
	if (t->kind == KVQ_TOK_SPM) {
		v = vocab_find(t, w->buf + l->off, l->n + r->n);
		if (v < 0)
			return 0;
		b.key = -(double)t->score[v];
	} else {
		v = merge_rank(t, w->buf + l->off, l->n, w->buf + r->off,
			       r->n);
		if (v < 0)
			return 0;
		b.key = v;
	}
	b.left = left;
	b.right = right;
	b.size = l->n + r->n;
	return heap_push(w, &b);
}

/* Ids for a symbol that is not a token: bytes (SPM) or characters (BPE). */
static void emit_fallback(const struct kvq_tokenizer *t, const char *s,
			  size_t n, struct idbuf *o)
{
	size_t i, len;
	int32_t id;

	for (i = 0; i < n; i += len) {
		if (t->kind == KVQ_TOK_SPM) {
			len = 1;
			id = t->byte_tok[(unsigned char)s[i]];
		} else {
			len = kvq_utf8_len((unsigned char)s[i]);
			if (len > n - i)
				len = n - i;
			id = vocab_find(t, s + i, len);
		}
		if (id < 0)
			id = t->unk;
		if (id >= 0)
			emit(o, id);
	}
}

/* Merges w->buf[0, @n) as far as it goes and emits the resulting ids. */
static int merge_and_emit(const struct kvq_tokenizer *t, struct work *w,
			  size_t n, struct idbuf *o)
{
	struct sym *l, *r;
	struct bigram b;
	size_t off, len;
	int i, nsym = 0, rc = 0;
	int32_t id;

	if (!n)
		return 0;
	rc = grow((void **)&w->sym, &w->sym_cap, n, sizeof(*w->sym));
	if (rc)
		return rc;
	for (off = 0; off < n; off += len) {
		len = kvq_utf8_len((unsigned char)w->buf[off]);
		if (len > n - off)
			len = n - off;
		w->sym[nsym] = (struct sym){ nsym - 1,
					     off + len < n ? nsym + 1 : -1,
					     off, len };
		nsym++;
	}
	w->n_heap = 0;
	for (i = 1; i < nsym && !rc; i++)
		rc = try_bigram(t, w, i - 1, i);
	while (w->n_heap && !rc) {
		b = heap_pop(w);
		l = &w->sym[b.left];
		r = &w->sym[b.right];
		/* Stale: one side has merged with something else since. */
		if (!l->n || !r->n || l->n + r->n != b.size)
			continue;
		l->n += r->n;
		r->n = 0;
		l->next = r->next;
		if (r->next >= 0)
			w->sym[r->next].prev = b.left;
		rc = try_bigram(t, w, l->prev, b.left);
		if (!rc)
			rc = try_bigram(t, w, b.left, l->next);
	}
	if (rc)
		return rc;
	for (i = 0; i >= 0; i = w->sym[i].next) {
		id = vocab_find(t, w->buf + w->sym[i].off, w->sym[i].n);
		if (id >= 0)
			emit(o, id);
		else
			emit_fallback(t, w->buf + w->sym[i].off, w->sym[i].n,
				      o);
	}
	return 0;
}

static int spm_encode(const struct kvq_tokenizer *t, struct work *w,
		      const char *s, size_t len, bool prefix,
		      struct idbuf *o)
{
	size_t i, n = 0;
	int rc;

	rc = grow((void **)&w->buf, &w->buf_cap, 3 * len + 3, 1);
	if (rc)
		return rc;
	if (prefix) {
		memcpy(w->buf, "\xe2\x96\x81", 3);
		n = 3;
	}
	for (i = 0; i < len; i++) {
		if (s[i] == ' ') {
			memcpy(w->buf + n, "\xe2\x96\x81", 3);
			n += 3;
		} else {
			w->buf[n++] = s[i];
		}
	}
	return merge_and_emit(t, w, n, o);
}

static int bpe_encode(const struct kvq_tokenizer *t, struct work *w,
		      const char *s, size_t len, struct idbuf *o)
{
	size_t k, i, start = 0, n;
	int32_t id;
	int rc;

	rc = kvq_pretok_split(t->pretok, s, len, &w->pieces);
	for (k = 0; !rc && k < w->pieces.n; k++) {
		size_t end = w->pieces.v[k];

		rc = grow((void **)&w->buf, &w->buf_cap, 2 * (end - start), 1);
		if (rc)
			break;
		n = 0;
		for (i = start; i < end; i++)
			n += kvq_utf8_encode(kvq_byte_to_cp((uint8_t)s[i]),
					     w->buf + n);
		start = end;
		if (t->pretok->def->ignore_merges) {
			id = vocab_find(t, w->buf, n);
			if (id >= 0) {
				emit(o, id);
				continue;
			}
		}
		rc = merge_and_emit(t, w, n, o);
	}
	return rc;
}

/* A piece of the input: plain text (id -1) or a user-defined token. */
struct frag {
	size_t off, len;
	int32_t id;
};

struct frags {
	struct frag *v;
	size_t n, cap;
};

static int frag_push(struct frags *f, size_t off, size_t len, int32_t id)
{
	int rc = 0;

	if (f->n == f->cap)
		rc = grow((void **)&f->v, &f->cap, f->cap ? 2 * f->cap : 16,
			  sizeof(*f->v));
	if (rc)
		return rc;
	f->v[f->n++] = (struct frag){ off, len, id };
	return 0;
}

/* Cuts the text pieces of @in at each occurrence of user token @id. */
static int cut_at(const struct kvq_tokenizer *t, const char *text,
		  const struct frags *in, int32_t id, struct frags *out)
{
	const char *s = tok_text(t, id);
	size_t slen = t->text[id].len, k, pos, end, m;
	const char *hit;
	int rc = 0;

	out->n = 0;
	for (k = 0; k < in->n && !rc; k++) {
		const struct frag *f = &in->v[k];

		if (f->id >= 0) {
			rc = frag_push(out, f->off, f->len, f->id);
			continue;
		}
		pos = f->off;
		end = f->off + f->len;
		while (!rc && (hit = memmem(text + pos, end - pos, s, slen))) {
			m = hit - text;
			if (m > pos)
				rc = frag_push(out, pos, m - pos, -1);
			if (!rc)
				rc = frag_push(out, m, slen, id);
			pos = m + slen;
		}
		if (!rc && pos < end)
			rc = frag_push(out, pos, end - pos, -1);
	}
	return rc;
}

static int partition(const struct kvq_tokenizer *t, const char *text,
		     size_t len, struct frags *out)
{
	struct frags a = { 0 }, b = { 0 }, tmp;
	int32_t u;
	int rc;

	rc = frag_push(&a, 0, len, -1);
	for (u = 0; u < t->n_user && !rc; u++) {
		rc = cut_at(t, text, &a, t->user[u], &b);
		tmp = a;
		a = b;
		b = tmp;
	}
	free(b.v);
	if (rc) {
		free(a.v);
		return rc;
	}
	*out = a;
	return 0;
}

int kvq_tokenize(const struct kvq_tokenizer *t, const char *text, size_t len,
		 int32_t *out, int cap)
{
	struct idbuf o = { out, cap > 0 ? (size_t)cap : 0, 0 };
	struct frags f = { 0 };
	struct work w = { 0 };
	bool after_token = true;
	size_t k;
	int rc;

	if (!t || (!text && len) || cap < 0 || (cap && !out))
		return -EINVAL;
	if (len > TOK_MAX_TEXT)
		return -E2BIG;
	if (!len)
		return 0;
	rc = partition(t, text, len, &f);
	for (k = 0; !rc && k < f.n; k++) {
		const struct frag *p = &f.v[k];

		if (p->id >= 0) {
			emit(&o, p->id);
			after_token = true;
			continue;
		}
		if (t->kind == KVQ_TOK_SPM)
			rc = spm_encode(t, &w, text + p->off, p->len,
					t->add_space_prefix && after_token,
					&o);
		else
			rc = bpe_encode(t, &w, text + p->off, p->len, &o);
		after_token = false;
	}
	work_fini(&w);
	free(f.v);
	if (rc)
		return rc;
	return o.n > INT_MAX ? -EOVERFLOW : (int)o.n;
}

/* ------------------------------------------------------------- decoding */

int kvq_token_piece(const struct kvq_tokenizer *t, int32_t id,
		    const char **piece)
{
	if (!t || id < 0 || id >= t->n_vocab)
		return -EINVAL;
	*piece = t->piece_pool + t->text[id].off;
	return (int)t->piece_len[id];
}

const char *kvq_token_text(const struct kvq_tokenizer *t, int32_t id)
{
	if (!t || id < 0 || id >= t->n_vocab)
		return NULL;
	return tok_text(t, id);
}

int32_t kvq_tokenizer_find(const struct kvq_tokenizer *t, const char *text,
			   size_t len)
{
	if (!t || (!text && len))
		return -1;
	return vocab_find(t, text, len);
}

void kvq_detok_init(struct kvq_detok *d, const struct kvq_tokenizer *t)
{
	memset(d, 0, sizeof(*d));
	d->t = t;
	d->first = true;
}

static unsigned char detok_byte(const struct kvq_detok *d, const char *p,
				size_t i)
{
	return i < (size_t)d->n_pend ? d->pend[i] :
				       (unsigned char)p[i - d->n_pend];
}

int kvq_detok_push(struct kvq_detok *d, int32_t id, char *out, size_t cap)
{
	unsigned char c[4];
	size_t total, i = 0, w = 0, k, avail;
	const char *p;
	bool first;
	int n, r;

	n = kvq_token_piece(d->t, id, &p);
	if (n < 0)
		return n;
	first = d->first && n > 0;
	if (first && d->t->kind == KVQ_TOK_SPM && d->t->add_space_prefix &&
	    p[0] == ' ') {
		p++;
		n--;
	}
	total = d->n_pend + (size_t)n;
	while (i < total) {
		avail = total - i < 4 ? total - i : 4;
		for (k = 0; k < avail; k++)
			c[k] = detok_byte(d, p, i + k);
		r = kvq_utf8_check(c, avail);
		if (r == 0)
			break;	/* the start of a character: hold it */
		if (r > 0 && w + r <= cap) {
			memcpy(out + w, c, r);
			w += r;
			i += r;
		} else if (r < 0 && w + KVQ_UTF8_REPLACEMENT_LEN <= cap) {
			memcpy(out + w, KVQ_UTF8_REPLACEMENT,
			       KVQ_UTF8_REPLACEMENT_LEN);
			w += KVQ_UTF8_REPLACEMENT_LEN;
			i += -r;
		} else {
			return -ENOSPC;
		}
	}
	/* Only now is the state changed: -ENOSPC above left it as it was. */
	for (k = 0; i + k < total; k++)
		c[k] = detok_byte(d, p, i + k);
	memcpy(d->pend, c, k);
	d->n_pend = (int)k;
	if (first)
		d->first = false;
	return (int)w;
}

int kvq_detok_flush(struct kvq_detok *d, char *out, size_t cap)
{
	if (!d->n_pend)
		return 0;
	if (cap < KVQ_UTF8_REPLACEMENT_LEN)
		return -ENOSPC;
	memcpy(out, KVQ_UTF8_REPLACEMENT, KVQ_UTF8_REPLACEMENT_LEN);
	d->n_pend = 0;
	return KVQ_UTF8_REPLACEMENT_LEN;
}

/* ------------------------------------------------------------ accessors */

enum kvq_tok_kind kvq_tokenizer_kind(const struct kvq_tokenizer *t)
{
	return t->kind;
}

int32_t kvq_tokenizer_n_vocab(const struct kvq_tokenizer *t)
{
	return t->n_vocab;
}

int32_t kvq_tokenizer_bos(const struct kvq_tokenizer *t)
{
	return t->bos;
}

int32_t kvq_tokenizer_eos(const struct kvq_tokenizer *t)
{
	return t->eos;
}

int32_t kvq_tokenizer_eot(const struct kvq_tokenizer *t)
{
	return t->eot;
}

bool kvq_tokenizer_add_bos(const struct kvq_tokenizer *t)
{
	return t->add_bos && t->bos >= 0;
}

bool kvq_tokenizer_is_eog(const struct kvq_tokenizer *t, int32_t id)
{
	return id >= 0 && id < t->n_vocab && t->eog[id];
}
