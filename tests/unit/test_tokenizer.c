/*
 * test_tokenizer.c - unit tests for engine/tokenizer.c.
 *
 * Why this file exists: a tokenizer that is off by one id produces a model
 * that quietly answers worse.  The reference vectors in the shared test data
 * (produced by llama.cpp for real vocabularies) pin encoding; round trips pin
 * decoding; pre-tokenizers without a vocabulary file are checked split by
 * split against hand-derived expectations; small GGUF files written here
 * check the metadata handling and error messages.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "tap.h"

#define VEC_SEP "\n__ggml_vocab_test__\n"
#define MAX_IDS 4096

static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long n;

	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 ||
	    fseek(f, 0, SEEK_SET))
		goto out_close;
	buf = malloc(n + 1);
	if (!buf)
		goto out_close;
	if (fread(buf, 1, n, f) != (size_t)n) {
		free(buf);
		buf = NULL;
		goto out_close;
	}
	buf[n] = '\0';
	*len = n;
out_close:
	fclose(f);
	return buf;
}

static struct kvq_tokenizer *open_path(const char *path, char *err,
				       size_t errlen, int *rc)
{
	struct kvq_tokenizer *t = NULL;
	struct kvq_gguf *g;

	*rc = kvq_gguf_open(path, &g, err, errlen);
	if (*rc)
		return NULL;
	*rc = kvq_tokenizer_create(g, &t, err, errlen);
	kvq_gguf_close(g);
	return *rc ? NULL : t;
}

/* The tokenizer of shared vocabulary @name, or NULL when it is missing. */
static struct kvq_tokenizer *open_vocab(const char *name)
{
	char rel[256], path[1024], err[512];
	struct kvq_tokenizer *t;
	int rc;

	snprintf(rel, sizeof(rel), "vocab/%s.gguf", name);
	if (!tap_testdata(rel, path, sizeof(path)))
		return NULL;
	t = open_path(path, err, sizeof(err), &rc);
	if (!t)
		tap_diag("%s: %d %s", path, rc, err);
	return t;
}

static void skip(const char *name)
{
	tap_ok(1, "%s # SKIP missing file", name);
}

/* Encodes @s fully into a new array; returns the count or -errno. */
static int encode(const struct kvq_tokenizer *t, const char *s, size_t len,
		  int32_t **ids)
{
	int n = kvq_tokenize(t, s, len, NULL, 0);

	*ids = NULL;
	if (n < 0)
		return n;
	*ids = malloc((n ? n : 1) * sizeof(**ids));
	if (!*ids)
		return -ENOMEM;
	return kvq_tokenize(t, s, len, *ids, n);
}

/* Decodes @ids with the streaming detokenizer into a new string. */
static char *decode(const struct kvq_tokenizer *t, const int32_t *ids, int n,
		    size_t *len)
{
	struct kvq_detok d;
	size_t cap = 64, w = 0, need;
	char *out = malloc(cap);
	const char *p;
	int i, r, pl;

	kvq_detok_init(&d, t);
	for (i = 0; out && i <= n; i++) {
		pl = i < n ? kvq_token_piece(t, ids[i], &p) : 0;
		need = w + 3 * (3 + (size_t)(pl > 0 ? pl : 0));
		if (need > cap) {
			if (need < 2 * cap)
				need = 2 * cap;
			char *q = realloc(out, need);

			if (!q)
				break;
			out = q;
			cap = need;
		}
		r = i < n ? kvq_detok_push(&d, ids[i], out + w, cap - w) :
			    kvq_detok_flush(&d, out + w, cap - w);
		if (r < 0) {
			free(out);
			return NULL;
		}
		w += r;
	}
	if (!out || i <= n) {
		free(out);
		return NULL;
	}
	*len = w;
	return out;
}

static void ids_to_str(const int32_t *ids, int n, char *buf, size_t len)
{
	size_t w = 0;
	int i;

	buf[0] = '\0';
	for (i = 0; i < n && w + 12 < len; i++)
		w += snprintf(buf + w, len - w, " %d", ids[i]);
}

/* ------------------------------------------------------ reference vectors */

static void check_vector(const struct kvq_tokenizer *t, const char *name,
			 int idx, const char *s, size_t len, const char *want)
{
	char got[MAX_IDS * 8];
	int32_t *ids;
	char *back;
	size_t blen = 0;
	int n;

	n = encode(t, s, len, &ids);
	if (n >= 0)
		ids_to_str(ids, n, got, sizeof(got));
	tap_ok(n >= 0 && !strcmp(got, want),
	       "kvq_tokenize_matches_reference %s #%d", name, idx);
	if (n < 0 || strcmp(got, want))
		tap_diag("want:%s\n#  got:%s (%d)", want, n >= 0 ? got : "",
			 n);
	back = n >= 0 ? decode(t, ids, n, &blen) : NULL;
	tap_ok(back && blen == len && !memcmp(back, s, len),
	       "kvq_detok_roundtrips_vector %s #%d", name, idx);
	free(back);
	free(ids);
}

static void test_vectors(const char *name, int expect)
{
	char rel[256], pin[1024], pout[1024], label[300];
	struct kvq_tokenizer *t;
	char *inp = NULL, *out = NULL, *s, *o, *e, *oe;
	size_t ni, no;
	int idx = 0;

	snprintf(label, sizeof(label), "kvq_tokenize_matches_reference %s",
		 name);
	snprintf(rel, sizeof(rel), "vocab/%s.gguf.inp", name);
	if (!tap_testdata(rel, pin, sizeof(pin))) {
		skip(label);
		return;
	}
	snprintf(rel, sizeof(rel), "vocab/%s.gguf.out", name);
	if (!tap_testdata(rel, pout, sizeof(pout))) {
		skip(label);
		return;
	}
	t = open_vocab(name);
	if (!t) {
		skip(label);
		return;
	}
	inp = slurp(pin, &ni);
	out = slurp(pout, &no);
	if (!inp || !out) {
		tap_ok(0, "%s (reading the vectors)", label);
		goto out_free;
	}
	/* Every string is followed by the separator; ids: one line each. */
	s = inp;
	o = out;
	while ((e = strstr(s, VEC_SEP)) && *o) {
		oe = strchr(o, '\n');
		if (oe)
			*oe = '\0';
		check_vector(t, name, idx++, s, e - s, o);
		s = e + strlen(VEC_SEP);
		o = oe ? oe + 1 : o + strlen(o);
	}
	tap_ok(idx == expect, "kvq_tokenize_covers_all_vectors %s (%d/%d)",
	       name, idx, expect);
out_free:
	free(inp);
	free(out);
	kvq_tokenizer_destroy(t);
}

/* ------------------------------------------------------- SentencePiece */

#define SPM_BAD_OUT "a\xef\xbf\xbd\xef\xbf\xbd(b"

static void test_spm(void)
{
	struct kvq_tokenizer *t = open_vocab("ggml-vocab-llama-spm");
	int32_t ids[16], all[64], byte_c3, byte_a9, id, *v;
	char buf[64];
	const char *p;
	struct kvq_detok d;
	size_t len;
	char *s;
	int n, m, r;

	if (!t) {
		skip("kvq_tokenizer_create_spm");
		return;
	}
	tap_ok(kvq_tokenizer_kind(t) == KVQ_TOK_SPM &&
	       kvq_tokenizer_n_vocab(t) == 32000,
	       "kvq_tokenizer_create_spm_kind_and_size");
	tap_ok(kvq_tokenizer_bos(t) == 1 && kvq_tokenizer_eos(t) == 2 &&
	       kvq_tokenizer_add_bos(t),
	       "kvq_tokenizer_bos_eos_from_metadata spm");
	tap_ok(kvq_tokenizer_is_eog(t, 2) && !kvq_tokenizer_is_eog(t, 1) &&
	       !kvq_tokenizer_is_eog(t, -1) &&
	       !kvq_tokenizer_is_eog(t, 32000),
	       "kvq_tokenizer_is_eog_eos_only spm");

	n = kvq_token_piece(t, 1, &p);
	tap_ok(n == 0, "kvq_token_piece_control_is_empty");
	id = kvq_tokenizer_find(t, "<0x41>", 6);
	n = kvq_token_piece(t, id, &p);
	tap_ok(id >= 0 && n == 1 && p[0] == 'A', "kvq_token_piece_byte_token");
	id = kvq_tokenizer_find(t, "\xe2\x96\x81Hello", 8);
	n = kvq_token_piece(t, id, &p);
	tap_ok(id == 15043 && n == 6 && !memcmp(p, " Hello", 6),
	       "kvq_token_piece_spm_space_mark");
	tap_ok(kvq_token_piece(t, -1, &p) == -EINVAL &&
	       kvq_token_piece(t, 32000, &p) == -EINVAL &&
	       !kvq_token_text(t, 32000),
	       "kvq_token_piece_bad_id_refused");
	tap_ok(kvq_token_text(t, 1) && !strcmp(kvq_token_text(t, 1), "<s>"),
	       "kvq_token_text_raw_string");

	/* Capacity: the count is the whole, the buffer is not overrun. */
	n = kvq_tokenize(t, "Hello world, again", 18, all, 64);
	ids[2] = 0x5a5a5a5a;
	m = kvq_tokenize(t, "Hello world, again", 18, ids, 2);
	tap_ok(n > 2 && m == n && ids[0] == all[0] && ids[1] == all[1] &&
	       ids[2] == 0x5a5a5a5a, "kvq_tokenize_short_buffer_counts_all");
	tap_ok(kvq_tokenize(t, "", 0, ids, 16) == 0 &&
	       kvq_tokenize(t, NULL, 0, NULL, 0) == 0,
	       "kvq_tokenize_empty_text_no_ids");
	tap_ok(kvq_tokenize(t, "x", 1, NULL, 4) == -EINVAL &&
	       kvq_tokenize(t, "x", 1, ids, -1) == -EINVAL,
	       "kvq_tokenize_bad_arguments_refused");

	/* Invalid UTF-8 goes through byte fallback, decodes as U+FFFD. */
	n = encode(t, "a\xff\xc3(b", 5, &v);
	s = n > 0 ? decode(t, v, n, &len) : NULL;
	tap_ok(s && len == sizeof(SPM_BAD_OUT) - 1 &&
	       !memcmp(s, SPM_BAD_OUT, len),
	       "kvq_detok_invalid_bytes_become_replacement spm");
	free(s);
	free(v);

	/* A two-byte character split over two byte tokens. */
	byte_c3 = kvq_tokenizer_find(t, "<0xC3>", 6);
	byte_a9 = kvq_tokenizer_find(t, "<0xA9>", 6);
	kvq_detok_init(&d, t);
	r = kvq_detok_push(&d, byte_c3, buf, sizeof(buf));
	m = kvq_detok_push(&d, byte_a9, buf, sizeof(buf));
	tap_ok(r == 0 && m == 2 && !memcmp(buf, "\xc3\xa9", 2),
	       "kvq_detok_push_holds_incomplete_character");
	kvq_detok_init(&d, t);
	r = kvq_detok_push(&d, byte_c3, buf, sizeof(buf));
	m = kvq_detok_flush(&d, buf, sizeof(buf));
	tap_ok(r == 0 && m == 3 && !memcmp(buf, "\xef\xbf\xbd", 3) &&
	       kvq_detok_flush(&d, buf, sizeof(buf)) == 0,
	       "kvq_detok_flush_incomplete_is_replacement");
	kvq_detok_init(&d, t);
	r = kvq_detok_push(&d, byte_a9, buf, sizeof(buf));
	tap_ok(r == 3 && !memcmp(buf, "\xef\xbf\xbd", 3),
	       "kvq_detok_push_stray_continuation_is_replacement");

	/* Leading space: dropped once, after BOS too; kept when asked. */
	n = kvq_tokenize(t, "Hello world", 11, all + 1, 63);
	all[0] = 1;
	s = decode(t, all + 1, n, &len);
	tap_ok(s && len == 11 && !memcmp(s, "Hello world", 11),
	       "kvq_detok_push_spm_drops_leading_space");
	free(s);
	s = decode(t, all, n + 1, &len);
	tap_ok(s && len == 11 && !memcmp(s, "Hello world", 11),
	       "kvq_detok_push_spm_bos_does_not_count");
	free(s);
	kvq_detok_init(&d, t);
	d.first = false;
	r = kvq_detok_push(&d, all[1], buf, sizeof(buf));
	tap_ok(r == 6 && !memcmp(buf, " Hello", 6),
	       "kvq_detok_push_continuation_keeps_space");

	/* -ENOSPC leaves the state alone. */
	kvq_detok_init(&d, t);
	r = kvq_detok_push(&d, all[1], buf, 2);
	m = kvq_detok_push(&d, all[1], buf, sizeof(buf));
	tap_ok(r == -ENOSPC && m == 5 && !memcmp(buf, "Hello", 5),
	       "kvq_detok_push_small_buffer_enospc");
	kvq_tokenizer_destroy(t);
}

/* --------------------------------------------------------- byte-level BPE */

static void test_bpe(void)
{
	struct kvq_tokenizer *t = open_vocab("ggml-vocab-gpt-2");
	const char *llama = "\xf0\x9f\xa6\x99";	/* U+1F999, 4 bytes */
	struct kvq_detok d;
	char buf[64], *big, *back;
	const char *p;
	int32_t *ids = NULL, id;
	size_t len, i, blen;
	int n, k, r, ok;

	if (!t) {
		skip("kvq_tokenizer_create_bpe");
		return;
	}
	tap_ok(kvq_tokenizer_kind(t) == KVQ_TOK_BPE &&
	       kvq_tokenizer_n_vocab(t) == 50257,
	       "kvq_tokenizer_create_bpe_kind_and_size");
	tap_ok(kvq_tokenizer_eos(t) == 50256 && kvq_tokenizer_is_eog(t, 50256)
	       && !kvq_tokenizer_add_bos(t),
	       "kvq_tokenizer_bos_eos_from_metadata gpt-2");
	id = kvq_tokenizer_find(t, "\xc4\xa0world", 7);
	n = kvq_token_piece(t, id, &p);
	tap_ok(id == 995 && n == 6 && !memcmp(p, " world", 6),
	       "kvq_token_piece_bpe_byte_alphabet");
	tap_ok(kvq_token_piece(t, 50256, &p) == 0,
	       "kvq_token_piece_bpe_control_is_empty");

	/* A 4-byte character spread over three tokens comes out whole. */
	n = encode(t, llama, 4, &ids);
	ok = n >= 2;
	kvq_detok_init(&d, t);
	for (k = 0; ok && k < n; k++) {
		r = kvq_detok_push(&d, ids[k], buf, sizeof(buf));
		ok = k < n - 1 ? r == 0 : r == 4 && !memcmp(buf, llama, 4);
	}
	tap_ok(ok, "kvq_detok_push_holds_split_character bpe (%d ids)", n);
	free(ids);

	/* Bytes that are not UTF-8 still encode and come back unchanged. */
	n = encode(t, "x\xff\xfe y\x80", 6, &ids);
	back = n > 0 ? decode(t, ids, n, &blen) : NULL;
	tap_ok(back && blen == 6 + 3 * 2 &&
	       !memcmp(back, "x\xef\xbf\xbd\xef\xbf\xbd y\xef\xbf\xbd", 12),
	       "kvq_tokenize_invalid_utf8_passes_bytes bpe");
	{
		/* The concatenated pieces are the input bytes themselves. */
		size_t w = 0;

		for (k = 0; k < n; k++) {
			int pl = kvq_token_piece(t, ids[k], &p);

			if (pl > 0 && w + pl <= sizeof(buf))
				memcpy(buf + w, p, pl);
			w += pl > 0 ? pl : 0;
		}
		tap_ok(w == 6 && !memcmp(buf, "x\xff\xfe y\x80", 6),
		       "kvq_token_piece_concatenation_is_input bpe");
	}
	free(back);
	free(ids);

	/* Large input: long runs of spaces and text, round trip. */
	len = 300000;
	big = malloc(len);
	for (i = 0; big && i < len; i++)
		big[i] = i < 100000 ? ' ' : "Hello, world! 12 \n\t"[i % 19];
	n = big ? encode(t, big, len, &ids) : -ENOMEM;
	back = n > 0 ? decode(t, ids, n, &blen) : NULL;
	tap_ok(back && blen == len && !memcmp(back, big, len),
	       "kvq_tokenize_large_input_roundtrips (%d ids)", n);
	free(back);
	free(ids);
	free(big);
	kvq_tokenizer_destroy(t);
}

/* --------------------------------------------------------- pre-tokenizers */

/* Checks that @pre cuts @text into exactly the pieces in @want. */
static void check_split(const char *pre, const char *text,
			const char *const *want, const char *what)
{
	size_t ends[64], len = strlen(text), start = 0, wl;
	int n, i, nw = 0;
	bool ok;

	while (want[nw])
		nw++;
	n = kvq_pretokenize(pre, text, len, ends, 64);
	ok = n == nw;
	for (i = 0; ok && i < n; i++) {
		wl = strlen(want[i]);
		ok = ends[i] - start == wl &&
		     !memcmp(text + start, want[i], wl);
		start = ends[i];
	}
	tap_ok(ok, "kvq_pretokenize_%s %s", what, pre);
	if (!ok) {
		start = 0;
		for (i = 0; i < n && i < 64; i++) {
			tap_diag("piece %d: [%.*s]", i,
				 (int)(ends[i] - start), text + start);
			start = ends[i];
		}
		tap_diag("got %d pieces, want %d", n, nw);
	}
}

#define SPLIT(pre, text, what, ...) \
	check_split(pre, text, (const char *const[]){ __VA_ARGS__, NULL }, what)

static void test_pretokenizers(void)
{
	size_t ends[8];
	const char *bad = "a\xff\xfe b\xc3";
	int n, i;
	bool ok;

	SPLIT("llama-bpe", "12345", "digits_in_threes", "123", "45");
	SPLIT("llama-bpe", "1234567", "digits_in_threes", "123", "456", "7");
	SPLIT("llama-bpe", "I'M here", "contractions_any_case",
	      "I", "'M", " here");
	SPLIT("llama-bpe", "don'T", "contractions_any_case", "don", "'T");
	SPLIT("llama-bpe", "a\n\nb", "newlines_together", "a", "\n\n", "b");
	SPLIT("llama-bpe", "hello  world", "space_before_word",
	      "hello", " ", " world");
	SPLIT("llama-bpe", "x?!\n", "punctuation_takes_newline", "x", "?!\n");
	SPLIT("llama3", "\tab", "alias_and_prefix_char", "\tab");

	SPLIT("qwen2", "abc123", "single_digits", "abc", "1", "2", "3");
	SPLIT("qwen2", "I'M", "contractions_any_case", "I", "'M");

	SPLIT("gpt-2", "I'm", "contractions", "I", "'m");
	SPLIT("gpt-2", "I'M", "contractions_case_sensitive", "I", "'", "M");
	SPLIT("gpt-2", "Hello world", "space_letters", "Hello", " world");
	SPLIT("gpt-2", "a   ", "trailing_spaces", "a", "   ");
	SPLIT("gpt-2", "a   b", "spaces_before_word", "a", "  ", " b");
	SPLIT("gpt-2", "x 12345", "digits_together", "x", " 12345");
	SPLIT("gpt-2", "hello!!! world", "punctuation_run",
	      "hello", "!!!", " world");

	SPLIT("smollm", "abc123 x", "single_digits",
	      "abc", "1", "2", "3", " x");
	SPLIT("deepseek-coder", "hello, world", "punctuation_apart",
	      "hello", ",", " world");
	SPLIT("deepseek-llm", "Hello 123", "letters_then_numbers",
	      "Hello", " ", "123");
	SPLIT("default", "Hello, world!!", "punctuation_first",
	      "Hello", ",", " world", "!!");
	SPLIT("default", "x 12345", "digit_triples", "x", " ", "123", "45");

	tap_ok(kvq_pretokenize("no-such-pre", "abc", 3, ends, 8) == -ENOTSUP,
	       "kvq_pretokenize_unknown_name_refused");
	tap_ok(kvq_pretokenize("gpt-2", "", 0, ends, 8) == 0,
	       "kvq_pretokenize_empty_text_no_pieces");
	n = kvq_pretokenize("llama-bpe", bad, strlen(bad), ends, 8);
	ok = n > 0 && n <= 8 && ends[n - 1] == strlen(bad);
	for (i = 1; ok && i < n; i++)
		ok = ends[i] > ends[i - 1];
	tap_ok(ok, "kvq_pretokenize_invalid_utf8_covers_input (%d)", n);
}

/* ------------------------------------------------- synthetic GGUF files */

struct gbuf {
	unsigned char *p;
	size_t n, cap;
	uint64_t nkv;
};

static void gb_put(struct gbuf *b, const void *d, size_t n)
{
	if (b->n + n > b->cap) {
		size_t cap = (b->n + n) * 2 + 256;
		unsigned char *q = realloc(b->p, cap);

		if (!q)
			abort();
		b->p = q;
		b->cap = cap;
	}
	memcpy(b->p + b->n, d, n);
	b->n += n;
}

static void gb_u32(struct gbuf *b, uint32_t v)
{
	gb_put(b, &v, 4);
}

static void gb_str(struct gbuf *b, const char *s)
{
	uint64_t n = strlen(s);

	gb_put(b, &n, 8);
	gb_put(b, s, n);
}

static void gb_key(struct gbuf *b, const char *key, uint32_t type)
{
	gb_str(b, key);
	gb_u32(b, type);
	b->nkv++;
}

static void kv_str(struct gbuf *b, const char *key, const char *v)
{
	gb_key(b, key, KVQ_GGUF_STRING);
	gb_str(b, v);
}

static void kv_u32(struct gbuf *b, const char *key, uint32_t v)
{
	gb_key(b, key, KVQ_GGUF_U32);
	gb_u32(b, v);
}

static void kv_arr(struct gbuf *b, const char *key, uint32_t type, uint64_t n)
{
	gb_key(b, key, KVQ_GGUF_ARRAY);
	gb_u32(b, type);
	gb_put(b, &n, 8);
}

static void kv_strs(struct gbuf *b, const char *key, const char *const *v)
{
	uint64_t n = 0, i;

	while (v[n])
		n++;
	kv_arr(b, key, KVQ_GGUF_STRING, n);
	for (i = 0; i < n; i++)
		gb_str(b, v[i]);
}

static void kv_i32s(struct gbuf *b, const char *key, const int32_t *v,
		    uint64_t n)
{
	kv_arr(b, key, KVQ_GGUF_I32, n);
	gb_put(b, v, 4 * n);
}

static void kv_f32s(struct gbuf *b, const char *key, const float *v,
		    uint64_t n)
{
	kv_arr(b, key, KVQ_GGUF_F32, n);
	gb_put(b, v, 4 * n);
}

/* Writes a tensor-less GGUF v3 file with the kvs in @b; frees @b. */
static int gb_write(struct gbuf *b, char *path, size_t len)
{
	static const unsigned char zero[32];
	const char *dir = getenv("TMPDIR");
	uint64_t zero64 = 0;
	size_t total;
	FILE *f;
	int fd;

	snprintf(path, len, "%s/kvq_tok_XXXXXX", dir ? dir : "/tmp");
	fd = mkstemp(path);
	f = fd >= 0 ? fdopen(fd, "wb") : NULL;
	if (!f) {
		if (fd >= 0)
			close(fd);
		free(b->p);
		return -1;
	}
	fwrite("GGUF", 1, 4, f);
	fwrite(&(uint32_t){ 3 }, 4, 1, f);
	fwrite(&zero64, 8, 1, f);
	fwrite(&b->nkv, 8, 1, f);
	if (b->n)
		fwrite(b->p, 1, b->n, f);
	total = 24 + b->n;
	fwrite(zero, 1, (32 - total % 32) % 32, f);
	free(b->p);
	return fclose(f) ? -1 : 0;
}

/* Creates a tokenizer from the kvs in @b (freed); returns its rc. */
static int try_create(struct gbuf *b, struct kvq_tokenizer **t, char *err,
		      size_t errlen)
{
	char path[512];
	int rc;

	*t = NULL;
	err[0] = '\0';
	if (gb_write(b, path, sizeof(path))) {
		snprintf(err, errlen, "cannot write a temporary file");
		return -EIO;
	}
	*t = open_path(path, err, errlen, &rc);
	unlink(path);
	return rc;
}

static void test_errors(void)
{
	static const char *const toks[] = { "a", "b", "ab", NULL };
	struct kvq_tokenizer *t;
	struct gbuf b = { 0 };
	char err[512];
	float sc[2] = { 0, 0 };
	int rc;

	kv_str(&b, "tokenizer.ggml.model", "bert");
	kv_strs(&b, "tokenizer.ggml.tokens", toks);
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc == -ENOTSUP && strstr(err, "tokenizer.ggml.model") &&
	       strstr(err, "bert") && strstr(err, "kvq_tok_"),
	       "kvq_tokenizer_create_unknown_model_refused");
	tap_diag("%s", err);
	kvq_tokenizer_destroy(t);

	memset(&b, 0, sizeof(b));
	kv_str(&b, "tokenizer.ggml.model", "gpt2");
	kv_str(&b, "tokenizer.ggml.pre", "made-up-pre");
	kv_strs(&b, "tokenizer.ggml.tokens", toks);
	kv_strs(&b, "tokenizer.ggml.merges",
		(const char *const[]){ "a b", NULL });
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc == -ENOTSUP && strstr(err, "tokenizer.ggml.pre") &&
	       strstr(err, "made-up-pre"),
	       "kvq_tokenizer_create_unknown_pre_refused");
	tap_diag("%s", err);
	kvq_tokenizer_destroy(t);

	memset(&b, 0, sizeof(b));
	kv_str(&b, "tokenizer.ggml.model", "llama");
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc < 0 && strstr(err, "tokenizer.ggml.tokens"),
	       "kvq_tokenizer_create_missing_tokens_refused");
	kvq_tokenizer_destroy(t);

	memset(&b, 0, sizeof(b));
	kv_str(&b, "tokenizer.ggml.model", "llama");
	kv_strs(&b, "tokenizer.ggml.tokens", toks);
	kv_f32s(&b, "tokenizer.ggml.scores", sc, 2);
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc == -EINVAL && strstr(err, "tokenizer.ggml.scores"),
	       "kvq_tokenizer_create_short_scores_refused");
	kvq_tokenizer_destroy(t);

	memset(&b, 0, sizeof(b));
	kv_str(&b, "tokenizer.ggml.model", "gpt2");
	kv_str(&b, "tokenizer.ggml.pre", "gpt-2");
	kv_strs(&b, "tokenizer.ggml.tokens", toks);
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc == -EINVAL && strstr(err, "tokenizer.ggml.merges"),
	       "kvq_tokenizer_create_missing_merges_refused");
	kvq_tokenizer_destroy(t);

	memset(&b, 0, sizeof(b));
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc < 0 && strstr(err, "tokenizer.ggml.model"),
	       "kvq_tokenizer_create_no_tokenizer_refused");
	kvq_tokenizer_destroy(t);
}

/* A tiny SentencePiece vocabulary with a user-defined token. */
static void test_user_defined_spm(void)
{
	static const char *const toks[] = {
		"<unk>", "<s>", "</s>", "\xe2\x96\x81", "a", "b",
		"\xe2\x96\x81" "a", "\xe2\x96\x81" "b", "<sep>", "<0x0A>",
		NULL,
	};
	static const int32_t types[] = { 2, 3, 3, 1, 1, 1, 1, 1, 4, 6 };
	static const float scores[] = { 0, 0, 0, -1, -2, -2, -1, -1, 0, 0 };
	struct kvq_tokenizer *t;
	struct gbuf b = { 0 };
	int32_t ids[16];
	char err[512], *s;
	size_t len;
	int n, rc;

	kv_str(&b, "tokenizer.ggml.model", "llama");
	kv_strs(&b, "tokenizer.ggml.tokens", toks);
	kv_f32s(&b, "tokenizer.ggml.scores", scores, 10);
	kv_i32s(&b, "tokenizer.ggml.token_type", types, 10);
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc == 0, "kvq_tokenizer_create_small_spm");
	if (rc) {
		tap_diag("%d %s", rc, err);
		return;
	}
	n = kvq_tokenize(t, "a<sep>b\n", 8, ids, 16);
	tap_ok(n == 4 && ids[0] == 6 && ids[1] == 8 && ids[2] == 7 &&
	       ids[3] == 9, "kvq_tokenize_user_defined_token_cut_spm");
	/* As in the reference, text after a token got a space prefix. */
	s = decode(t, ids, n, &len);
	tap_ok(s && len == 9 && !memcmp(s, "a<sep> b\n", 9),
	       "kvq_detok_user_defined_then_prefixed_text_spm");
	free(s);
	/* No byte token for 'c' and no <unk> id in the file: <unk> is 0. */
	n = kvq_tokenize(t, "c", 1, ids, 16);
	tap_ok(n == 2 && ids[0] == 3 && ids[1] == 0,
	       "kvq_tokenize_unknown_byte_falls_back_to_unk");
	kvq_tokenizer_destroy(t);
}

/* A tiny byte-level BPE vocabulary with user-defined and EOT tokens. */
static void test_user_defined_bpe(void)
{
	static const char *const toks[] = {
		"a", "b", "ab", "\xc4\xa0", "\xc4\xa0" "a", "<|endoftext|>",
		"<tag>", "<|im_end|>", NULL,
	};
	static const int32_t types[] = { 1, 1, 1, 1, 1, 3, 4, 1 };
	struct kvq_tokenizer *t;
	struct gbuf b = { 0 };
	int32_t ids[16];
	char err[512];
	const char *p;
	int n, rc;

	kv_str(&b, "tokenizer.ggml.model", "gpt2");
	kv_str(&b, "tokenizer.ggml.pre", "qwen2");
	kv_strs(&b, "tokenizer.ggml.tokens", toks);
	kv_i32s(&b, "tokenizer.ggml.token_type", types, 8);
	kv_strs(&b, "tokenizer.ggml.merges",
		(const char *const[]){ "a b", "\xc4\xa0 a", NULL });
	kv_u32(&b, "tokenizer.ggml.eos_token_id", 5);
	rc = try_create(&b, &t, err, sizeof(err));
	tap_ok(rc == 0, "kvq_tokenizer_create_small_bpe");
	if (rc) {
		tap_diag("%d %s", rc, err);
		return;
	}
	n = kvq_tokenize(t, "ab<tag> a", 9, ids, 16);
	tap_ok(n == 3 && ids[0] == 2 && ids[1] == 6 && ids[2] == 4,
	       "kvq_tokenize_user_defined_token_cut_bpe");
	n = kvq_token_piece(t, 6, &p);
	tap_ok(n == 5 && !memcmp(p, "<tag>", 5),
	       "kvq_token_piece_user_defined_is_raw_text");
	tap_ok(kvq_tokenizer_is_eog(t, 5) && kvq_tokenizer_is_eog(t, 7) &&
	       !kvq_tokenizer_is_eog(t, 6) && kvq_tokenizer_eot(t) == 5 &&
	       kvq_token_piece(t, 7, &p) == 0,
	       "kvq_tokenizer_is_eog_end_of_turn_texts");
	tap_ok(kvq_tokenizer_bos(t) == -1 && !kvq_tokenizer_add_bos(t),
	       "kvq_tokenizer_bos_absent_is_none");
	kvq_tokenizer_destroy(t);
}

int main(void)
{
	test_vectors("ggml-vocab-llama-spm", 46);
	test_vectors("ggml-vocab-gpt-2", 46);
	test_spm();
	test_bpe();
	test_pretokenizers();
	test_errors();
	test_user_defined_spm();
	test_user_defined_bpe();
	return tap_done();
}
