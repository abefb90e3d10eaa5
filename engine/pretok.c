/*
 * pretok.c - the pre-tokenizers of byte-level BPE: the regexes named by
 * tokenizer.ggml.pre, compiled with PCRE2 (UTF + UCP), cutting text into
 * the pieces BPE merges inside (see pretok.h).
 */
#define _GNU_SOURCE
#define PCRE2_CODE_UNIT_WIDTH 8

#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/pretok.h"
#include "engine/tokenizer.h"

/*
 * PCRE2 before 10.34 cannot match text with invalid UTF-8 in it; there the
 * pre-tokenizer refuses such text with -EILSEQ instead of passing its bytes
 * through.
 */
#ifndef PCRE2_MATCH_INVALID_UTF
#define PCRE2_MATCH_INVALID_UTF 0
#endif


/*
 * GPT-2's own regex ends in "|\s+" too; what that alternative would match
 * is left unmatched here and so becomes a piece of its own all the same.
 */
#define RE_GPT2 \
	"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+" \
	"|\\s+(?!\\S)"
#define RE_CONTRACTIONS_ANYCASE \
	"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RE_LLAMA3 \
	RE_CONTRACTIONS_ANYCASE "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" \
	"| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_QWEN2 \
	RE_CONTRACTIONS_ANYCASE "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" \
	"| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* CJK ideographs, U+0800 up to them, and Hangul syllables. */
#define RE_CJK "[\\x{4E00}-\\x{9FA5}\\x{0800}-\\x{4E00}\\x{AC00}-\\x{D7FF}]+"
/* deepseek-llm's letters: the cased letters of many scripts, listed. */
#define RE_DEEPSEEK_LETTERS \
	"\\s?[A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}" \
	"\\x{1BC}-\\x{1BF}\\x{1C4}-\\x{293}\\x{295}-\\x{2AF}\\x{370}-\\x{373}" \
	"\\x{376}\\x{377}\\x{37B}-\\x{37D}\\x{37F}\\x{386}\\x{388}-\\x{38A}" \
	"\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}\\x{3F7}-\\x{481}" \
	"\\x{48A}-\\x{52F}\\x{531}-\\x{556}\\x{10A0}-\\x{10C5}" \
	"\\x{13A0}-\\x{13F5}\\x{13F8}-\\x{13FD}\\x{1C90}-\\x{1CBA}" \
	"\\x{1CBD}-\\x{1CBF}\\x{1D00}-\\x{1D2B}\\x{1D6B}-\\x{1D77}" \
	"\\x{1D79}-\\x{1D9A}\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}" \
	"\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}\\x{1F59}" \
	"\\x{1F5B}\\x{1F5D}\\x{1F5F}-\\x{1F7D}\\x{1F80}-\\x{1FB4}" \
	"\\x{1FB6}-\\x{1FBC}\\x{1FBE}\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}" \
	"\\x{1FD0}-\\x{1FD3}\\x{1FD6}-\\x{1FDB}\\x{1FE0}-\\x{1FEC}" \
	"\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}" \
	"\\x{210A}-\\x{2113}\\x{2115}\\x{2119}-\\x{211D}\\x{2124}\\x{2126}" \
	"\\x{2128}\\x{212A}-\\x{212D}\\x{212F}-\\x{2134}\\x{2139}" \
	"\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}\\x{214E}\\x{2183}\\x{2184}" \
	"\\x{2C00}-\\x{2C7B}\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}" \
	"\\x{2CF3}\\x{A640}-\\x{A66D}\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}" \
	"\\x{A771}-\\x{A787}\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}" \
	"\\x{FB00}-\\x{FB06}\\x{FB13}-\\x{FB17}\\x{FF21}-\\x{FF3A}" \
	"\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}\\x{104B0}-\\x{104D3}" \
	"\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}" \
	"\\x{118A0}-\\x{118DF}\\x{1E900}-\\x{1E943}]+"

static const struct pretok_def pretok_defs[] = {
	{
		.names = { "default" },
		.re = { "[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+",
			"[0-9][0-9][0-9]" },
	},
	{
		.names = { "gpt-2", "phi-2", "mpt", "olmo", "jais" },
		.re = { RE_GPT2 },
	},
	{
		.names = { "llama-bpe", "llama3", "llama-v3" },
		.re = { RE_LLAMA3 },
		.ignore_merges = true,
		.add_bos = true,
	},
	{
		.names = { "dbrx", "smaug-bpe" },
		.re = { RE_LLAMA3 },
	},
	{
		.names = { "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez" },
		.re = { RE_QWEN2 },
	},
	{
		.names = { "smollm", "starcoder", "refact", "command-r",
			   "codeshell", "exaone", "minerva-7b" },
		.re = { "\\p{N}", RE_GPT2 },
	},
	{
		.names = { "falcon" },
		.re = { "[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2,
			"[0-9][0-9][0-9]" },
	},
	{
		.names = { "deepseek-llm" },
		.re = { "[\\r\\n]", RE_DEEPSEEK_LETTERS,
			"\\s?[!-/:-~\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}"
			"\\x{2018}-\\x{201F}\\x{3000}-\\x{3002}]+",
			"\\s+$", RE_CJK, "\\p{N}+" },
	},
	{
		.names = { "deepseek-coder" },
		.re = { "[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", RE_CJK,
			"\\p{N}" },
	},
};

int kvq_offs_push(struct offs *o, size_t x)
{
	size_t *v;

	if (o->n == o->cap) {
		size_t cap = o->cap ? 2 * o->cap : 64;

		v = realloc(o->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		o->v = v;
		o->cap = cap;
	}
	o->v[o->n++] = x;
	return 0;
}

static const struct pretok_def *pretok_lookup(const char *name)
{
	size_t i, j;

	for (i = 0; i < sizeof(pretok_defs) / sizeof(pretok_defs[0]); i++)
		for (j = 0; pretok_defs[i].names[j]; j++)
			if (!strcmp(pretok_defs[i].names[j], name))
				return &pretok_defs[i];
	return NULL;
}

void kvq_pretok_destroy(struct pretok *p)
{
	int i;

	if (!p)
		return;
	for (i = 0; i < p->n_re; i++)
		pcre2_code_free(p->re[i]);
	free(p);
}

/*
 * Compiles the regexes of pre-tokenizer @name.  Returns 0 and the compiled
 * set in *out, -ENOTSUP for an unknown name, -ENOMEM, or -EINVAL when PCRE2
 * refuses a regex (its message goes to @err).
 */
int kvq_pretok_create(const char *name, struct pretok **out, char *err,
		      size_t errlen)
{
	const uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY |
			      PCRE2_MATCH_INVALID_UTF;
	const struct pretok_def *def = pretok_lookup(name);
	PCRE2_UCHAR msg[128];
	PCRE2_SIZE erroff;
	struct pretok *p;
	int errcode;

	if (!def)
		return -ENOTSUP;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->def = def;
	for (; def->re[p->n_re]; p->n_re++) {
		pcre2_code *re;

		re = pcre2_compile((PCRE2_SPTR)def->re[p->n_re],
				   PCRE2_ZERO_TERMINATED, opts, &errcode,
				   &erroff, NULL);
		if (!re) {
			pcre2_get_error_message(errcode, msg, sizeof(msg));
			if (err)
				snprintf(err, errlen,
					 "pre-tokenizer %s regex %d: %s at %zu",
					 name, p->n_re, (char *)msg,
					 (size_t)erroff);
			kvq_pretok_destroy(p);
			return -EINVAL;
		}
		/* Without JIT the interpreter does the same, only slower. */
		pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
		p->re[p->n_re] = re;
	}
	*out = p;
	return 0;
}

/*
 * Finds the first match of @re in @s[0, @n) at or after @pos.  Returns 1 and
 * its bounds, 0 when there is none, or -errno.
 */
static int regex_find(const pcre2_code *re, pcre2_match_data *md,
		      const char *s, size_t n, size_t pos, size_t *ms,
		      size_t *me)
{
	PCRE2_SIZE *ov;
	int rc;

	rc = pcre2_match(re, (PCRE2_SPTR)s, n, pos, 0, md, NULL);
	/* A long backtrack can outgrow JIT's stack; the interpreter's grows. */
	if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
		rc = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_JIT, md,
				 NULL);
	if (rc == PCRE2_ERROR_NOMATCH)
		return 0;
	if (rc == PCRE2_ERROR_NOMEMORY || rc == PCRE2_ERROR_HEAPLIMIT)
		return -ENOMEM;
	if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)
		return -EILSEQ;
	if (rc < 0)
		return -E2BIG;
	ov = pcre2_get_ovector_pointer(md);
	*ms = ov[0];
	*me = ov[1];
	return 1;
}

/*
 * Cuts one piece @s[0, @n), which starts at @base in the whole text, at the
 * matches of @re; appends the end offsets of the new pieces to @out.
 */
static int split_piece(const pcre2_code *re, pcre2_match_data *md,
		       const char *s, size_t n, size_t base, struct offs *out)
{
	size_t pos = 0, last = 0, ms, me;
	int rc;

	while (pos < n) {
		rc = regex_find(re, md, s, n, pos, &ms, &me);
		if (rc < 0)
			return rc;
		if (rc == 0)
			break;
		if (me == ms) {
			/* An empty match cuts nothing: move one character. */
			pos = ms + 1;
			while (pos < n && (s[pos] & 0xc0) == 0x80)
				pos++;
			continue;
		}
		if (ms > last) {
			rc = kvq_offs_push(out, base + ms);
			if (rc)
				return rc;
		}
		rc = kvq_offs_push(out, base + me);
		if (rc)
			return rc;
		last = pos = me;
	}
	return last < n ? kvq_offs_push(out, base + n) : 0;
}

/*
 * Cuts @text into pieces with every regex of @p in turn.  On success *out
 * holds the end offset of each piece (out->n of them; none for empty text).
 */
int kvq_pretok_split(const struct pretok *p, const char *text, size_t len,
		     struct offs *out)
{
	struct offs cur = { 0 }, next = { 0 }, tmp;
	pcre2_match_data *md;
	size_t k, start;
	int i, rc;

	out->n = 0;
	if (!len)
		return 0;
	md = pcre2_match_data_create(1, NULL);
	if (!md)
		return -ENOMEM;
	rc = kvq_offs_push(&cur, len);
	for (i = 0; !rc && i < p->n_re; i++) {
		next.n = 0;
		start = 0;
		for (k = 0; !rc && k < cur.n; k++) {
			rc = split_piece(p->re[i], md, text + start,
					 cur.v[k] - start, start, &next);
			start = cur.v[k];
		}
		tmp = cur;
		cur = next;
		next = tmp;
	}
	pcre2_match_data_free(md);
	free(next.v);
	if (rc) {
		free(cur.v);
		return rc;
	}
	free(out->v);
	*out = cur;
	return 0;
}

int kvq_pretokenize(const char *pre, const char *text, size_t len,
		    size_t *ends, int cap)
{
	struct offs o = { 0 };
	struct pretok *p;
	size_t i;
	int rc;

	if (!pre || (!text && len) || cap < 0 || (cap && !ends))
		return -EINVAL;
	if (len > TOK_MAX_TEXT)
		return -E2BIG;
	rc = kvq_pretok_create(pre, &p, NULL, 0);
	if (rc)
		return rc;
	rc = kvq_pretok_split(p, text, len, &o);
	kvq_pretok_destroy(p);
	if (rc)
		return rc;
	for (i = 0; i < o.n && i < (size_t)cap; i++)
		ends[i] = o.v[i];
	rc = (int)o.n;
	free(o.v);
	return rc;
}

