/*
 * test_gguf.c - unit tests for the GGUF reader (engine/gguf.c).
 *
 * Why this file exists: the reader is what stands between a damaged or
 * hostile model file and the rest of the engine.  So besides writing a small
 * valid file and reading every value back, this test lies about each count,
 * length, offset, shape and type in turn, cuts the file at every length, and
 * flips random bytes; every bad file must be refused with the right code and
 * one line naming the file, without a crash, an overread or a leak (the test
 * also runs under AddressSanitizer).  Last, the real GGUF files in the shared
 * test data are opened and checked against facts known about them.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/gguf.h"
#include "tap.h"

/* ------------------------------------------------------------ writer */

struct buf {
	uint8_t *p;
	size_t len;
	size_t cap;
};

static void *xmalloc(size_t n)
{
	void *p = malloc(n);

	if (!p) {
		perror("malloc");
		exit(99);
	}
	return p;
}

static void put(struct buf *b, const void *src, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap * 2 : 256;

		while (cap < b->len + n)
			cap *= 2;
		b->p = realloc(b->p, cap);
		if (!b->p) {
			perror("realloc");
			exit(99);
		}
		b->cap = cap;
	}
	memcpy(b->p + b->len, src, n);
	b->len += n;
}

static void put_le(struct buf *b, uint64_t v, int width)
{
	uint8_t tmp[8];
	int i;

	for (i = 0; i < width; i++)
		tmp[i] = (uint8_t)(v >> (8 * i));
	put(b, tmp, width);
}

static void put_u8(struct buf *b, uint8_t v)
{
	put_le(b, v, 1);
}

static void put_u32(struct buf *b, uint32_t v)
{
	put_le(b, v, 4);
}

static void put_u64(struct buf *b, uint64_t v)
{
	put_le(b, v, 8);
}

static void put_f32(struct buf *b, float f)
{
	uint32_t v;

	memcpy(&v, &f, sizeof(v));
	put_u32(b, v);
}

static void put_f64(struct buf *b, double d)
{
	uint64_t v;

	memcpy(&v, &d, sizeof(v));
	put_u64(b, v);
}

static void put_str(struct buf *b, const char *s)
{
	put_u64(b, strlen(s));
	put(b, s, strlen(s));
}

static void pad_to(struct buf *b, size_t align)
{
	while (b->len % align)
		put_u8(b, 0);
}

static void patch_le(uint8_t *p, size_t off, uint64_t v, int width)
{
	int i;

	for (i = 0; i < width; i++)
		p[off + i] = (uint8_t)(v >> (8 * i));
}

/* --------------------------------------------------- the test file */

#define ALIGN 64
#define N_TENSORS 3

/* File offsets of the fields the malformed cases rewrite. */
struct layout {
	size_t version, n_tensors, n_kv;
	size_t arch_len;		/* general.architecture value length */
	size_t align_type, align_val;	/* general.alignment */
	size_t u8_type;			/* test.u8 value type */
	size_t u16_key, i16_key;	/* first byte of the key text */
	size_t bool_val;		/* test.bool value */
	size_t strs_etype, strs_n;	/* test.strs element type, length */
	size_t ints_n;			/* test.ints length */
	size_t t_name[N_TENSORS], t_ndims[N_TENSORS], t_type[N_TENSORS];
	size_t t_ne[N_TENSORS][4], t_off[N_TENSORS];
	size_t data;			/* start of the tensor data */
};

enum {
	MK_NO_TENSORS = 1,	/* metadata only, no padding at the end */
	MK_NO_ALIGN_KEY = 2,	/* leave general.alignment out (32) */
};

static const char *const strs[] = { "alpha", "", "gamma delta" };

static const struct {
	const char *name;
	uint32_t type, n_dims;
	uint64_t ne[2], offset, nbytes;
} tspec[N_TENSORS] = {
	{ "a.f32", KVQ_TYPE_F32, 2, { 8, 2 }, 0, 64 },
	{ "b.f16", KVQ_TYPE_F16, 2, { 4, 3 }, 64, 24 },
	{ "c.q80", KVQ_TYPE_Q8_0, 1, { 64, 1 }, 128, 68 },
};

static uint8_t tensor_byte(int t, uint64_t i)
{
	return (uint8_t)(t * 89 + i * 7 + 1);
}

static uint64_t kv_count;

/* Writes a key and its value type; returns where the type is. */
static size_t key_hdr(struct buf *b, const char *key, uint32_t type)
{
	size_t at;

	put_str(b, key);
	at = b->len;
	put_u32(b, type);
	kv_count++;
	return at;
}

static void build(struct buf *b, struct layout *l, unsigned flags)
{
	size_t align = flags & MK_NO_ALIGN_KEY ? 32 : ALIGN;
	int n_tensors = flags & MK_NO_TENSORS ? 0 : N_TENSORS;
	uint64_t i;
	int t, d;

	memset(b, 0, sizeof(*b));
	memset(l, 0, sizeof(*l));
	put(b, "GGUF", 4);
	l->version = b->len;
	put_u32(b, 3);
	l->n_tensors = b->len;
	put_u64(b, n_tensors);
	l->n_kv = b->len;
	put_u64(b, 0);		/* patched when the count is known */
	kv_count = 0;

	key_hdr(b, "general.architecture", KVQ_GGUF_STRING);
	l->arch_len = b->len;
	put_str(b, "llama");
	if (!(flags & MK_NO_ALIGN_KEY)) {
		l->align_type = key_hdr(b, "general.alignment", KVQ_GGUF_U32);
		l->align_val = b->len;
		put_u32(b, ALIGN);
	}
	l->u8_type = key_hdr(b, "test.u8", KVQ_GGUF_U8);
	put_u8(b, 200);
	key_hdr(b, "test.i8", KVQ_GGUF_I8);
	put_u8(b, (uint8_t)-5);
	l->u16_key = b->len + 8;
	key_hdr(b, "test.u16", KVQ_GGUF_U16);
	put_le(b, 60000, 2);
	l->i16_key = b->len + 8;
	key_hdr(b, "test.i16", KVQ_GGUF_I16);
	put_le(b, (uint16_t)-30000, 2);
	key_hdr(b, "test.u32", KVQ_GGUF_U32);
	put_u32(b, 4000000000u);
	key_hdr(b, "test.i32", KVQ_GGUF_I32);
	put_u32(b, (uint32_t)-2000000000);
	key_hdr(b, "test.u64", KVQ_GGUF_U64);
	put_u64(b, 1ull << 40);
	key_hdr(b, "test.i64", KVQ_GGUF_I64);
	put_u64(b, (uint64_t)-(1ll << 40));
	key_hdr(b, "test.f32", KVQ_GGUF_F32);
	put_f32(b, 1.5f);
	key_hdr(b, "test.f64", KVQ_GGUF_F64);
	put_f64(b, 0.25);
	key_hdr(b, "test.f64big", KVQ_GGUF_F64);
	put_f64(b, 1e300);
	key_hdr(b, "test.bool", KVQ_GGUF_BOOL);
	l->bool_val = b->len;
	put_u8(b, 1);
	key_hdr(b, "test.strs", KVQ_GGUF_ARRAY);
	l->strs_etype = b->len;
	put_u32(b, KVQ_GGUF_STRING);
	l->strs_n = b->len;
	put_u64(b, 3);
	for (i = 0; i < 3; i++)
		put_str(b, strs[i]);
	key_hdr(b, "test.ints", KVQ_GGUF_ARRAY);
	put_u32(b, KVQ_GGUF_I32);
	l->ints_n = b->len;
	put_u64(b, 3);
	put_u32(b, 1);
	put_u32(b, (uint32_t)-2);
	put_u32(b, 3);
	key_hdr(b, "test.empty", KVQ_GGUF_ARRAY);
	put_u32(b, KVQ_GGUF_U8);
	put_u64(b, 0);
	key_hdr(b, "test.bools", KVQ_GGUF_ARRAY);
	put_u32(b, KVQ_GGUF_BOOL);
	put_u64(b, 3);
	put_u8(b, 1);
	put_u8(b, 0);
	put_u8(b, 1);
	key_hdr(b, "test.name", KVQ_GGUF_STRING);
	put_str(b, "h\xc3\xa9llo");
	key_hdr(b, "test.i16b", KVQ_GGUF_I16);
	put_le(b, 1234, 2);
	patch_le(b->p, l->n_kv, kv_count, 8);

	for (t = 0; t < n_tensors; t++) {
		l->t_name[t] = b->len + 8;
		put_str(b, tspec[t].name);
		l->t_ndims[t] = b->len;
		put_u32(b, tspec[t].n_dims);
		for (d = 0; d < (int)tspec[t].n_dims; d++) {
			l->t_ne[t][d] = b->len;
			put_u64(b, tspec[t].ne[d]);
		}
		l->t_type[t] = b->len;
		put_u32(b, tspec[t].type);
		l->t_off[t] = b->len;
		put_u64(b, tspec[t].offset);
	}
	if (!n_tensors)
		return;
	pad_to(b, align);
	l->data = b->len;
	for (t = 0; t < n_tensors; t++) {
		while (b->len < l->data + tspec[t].offset)
			put_u8(b, 0);
		for (i = 0; i < tspec[t].nbytes; i++)
			put_u8(b, tensor_byte(t, i));
	}
}

/* ------------------------------------------------------- harness */

static char tmpdir[] = "/tmp/test_gguf.XXXXXX";
static char tmpfile_path[64];

static int write_file(const void *p, size_t n)
{
	FILE *f = fopen(tmpfile_path, "wb");

	if (!f)
		return -1;
	if (n && fwrite(p, 1, n, f) != n) {
		fclose(f);
		return -1;
	}
	return fclose(f);
}

#define SENTINEL ((struct kvq_gguf *)&tmpdir)

/* Writes @n bytes and opens them; *g is a sentinel unless open succeeds. */
static int open_bytes(const uint8_t *p, size_t n, struct kvq_gguf **g,
		      char *err, size_t errlen)
{
	*g = SENTINEL;
	err[0] = '\0';
	if (write_file(p, n)) {
		snprintf(err, errlen, "cannot write %s", tmpfile_path);
		return -EIO;
	}
	return kvq_gguf_open(tmpfile_path, g, err, errlen);
}

/* The failure contract: code, *out untouched, one line naming the file. */
static bool failed_well(int rc, int want_rc, struct kvq_gguf *g,
			const char *err, const char *want_sub)
{
	size_t plen = strlen(tmpfile_path);

	return rc == want_rc && g == SENTINEL &&
	       !strncmp(err, tmpfile_path, plen) && err[plen] == ':' &&
	       !strchr(err, '\n') && (!want_sub || strstr(err, want_sub));
}

static void expect_fail(const char *name, const uint8_t *p, size_t n,
			int want_rc, const char *want_sub)
{
	struct kvq_gguf *g;
	char err[512];
	int rc;
	bool ok;

	rc = open_bytes(p, n, &g, err, sizeof(err));
	ok = failed_well(rc, want_rc, g, err, want_sub);
	if (ok && getenv("TEST_GGUF_VERBOSE"))
		tap_diag("%s", err);
	if (!ok)
		tap_diag("%s: rc %d (want %d), err \"%s\" (want \"%s\")", name,
			 rc, want_rc, err, want_sub ? want_sub : "");
	if (rc == 0 && g != SENTINEL)
		kvq_gguf_close(g);
	tap_ok(ok, "%s", name);
}

/* The good file with one little-endian field of @width bytes rewritten. */
static void expect_patched(const char *name, const struct buf *good,
			   size_t off, int width, uint64_t v, int want_rc,
			   const char *want_sub)
{
	uint8_t *p = xmalloc(good->len);

	memcpy(p, good->p, good->len);
	patch_le(p, off, v, width);
	expect_fail(name, p, good->len, want_rc, want_sub);
	free(p);
}

/* ------------------------------------------------------- the cases */

/* For the many-check cases: notes what failed and clears the local ok. */
#define CHECK(cond)						\
	do {							\
		if (!(cond)) {					\
			tap_diag("failed: %s", #cond);		\
			ok = false;				\
		}						\
	} while (0)

static void test_type_table(void)
{
	static const struct {
		uint32_t type;
		const char *name;
		uint32_t be, bb;
	} want[] = {
		{ 0, "F32", 1, 4 },		{ 1, "F16", 1, 2 },
		{ 2, "Q4_0", 32, 18 },		{ 3, "Q4_1", 32, 20 },
		{ 6, "Q5_0", 32, 22 },		{ 7, "Q5_1", 32, 24 },
		{ 8, "Q8_0", 32, 34 },		{ 9, "Q8_1", 32, 36 },
		{ 10, "Q2_K", 256, 84 },	{ 11, "Q3_K", 256, 110 },
		{ 12, "Q4_K", 256, 144 },	{ 13, "Q5_K", 256, 176 },
		{ 14, "Q6_K", 256, 210 },	{ 15, "Q8_K", 256, 292 },
		{ 16, "IQ2_XXS", 256, 66 },	{ 17, "IQ2_XS", 256, 74 },
		{ 18, "IQ3_XXS", 256, 98 },	{ 19, "IQ1_S", 256, 50 },
		{ 20, "IQ4_NL", 32, 18 },	{ 21, "IQ3_S", 256, 110 },
		{ 22, "IQ2_S", 256, 82 },	{ 23, "IQ4_XS", 256, 136 },
		{ 24, "I8", 1, 1 },		{ 25, "I16", 1, 2 },
		{ 26, "I32", 1, 4 },		{ 27, "I64", 1, 8 },
		{ 28, "F64", 1, 8 },		{ 29, "IQ1_M", 256, 56 },
		{ 30, "BF16", 1, 2 },		{ 34, "TQ1_0", 256, 54 },
		{ 35, "TQ2_0", 256, 66 },	{ 39, "MXFP4", 32, 17 },
	};
	static const uint32_t unknown[] = { 4, 5, 31, 32, 33, 36, 37, 38, 40,
					    1000, UINT32_MAX };
	const struct kvq_type_info *ti;
	size_t i;
	bool ok = true;

	for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		ti = kvq_type_info(want[i].type);
		if (!ti || strcmp(ti->name, want[i].name) ||
		    ti->block_elems != want[i].be ||
		    ti->block_bytes != want[i].bb ||
		    strcmp(kvq_type_name(want[i].type), want[i].name)) {
			tap_diag("type %u wrong", want[i].type);
			ok = false;
		}
	}
	tap_ok(ok, "kvq_type_info_known_types");

	ok = true;
	for (i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++)
		if (kvq_type_info(unknown[i]) ||
		    strcmp(kvq_type_name(unknown[i]), "unknown") ||
		    kvq_type_row_bytes(unknown[i], 256))
			ok = false;
	tap_ok(ok, "kvq_type_info_unknown_types");

	tap_ok(kvq_type_row_bytes(KVQ_TYPE_Q4_K, 4096) == 16 * 144 &&
	       kvq_type_row_bytes(KVQ_TYPE_F32, 7) == 28 &&
	       kvq_type_row_bytes(KVQ_TYPE_Q8_0, 64) == 68 &&
	       kvq_type_row_bytes(KVQ_TYPE_Q8_0, 0) == 0 &&
	       kvq_type_row_bytes(KVQ_TYPE_Q4_K, 100) == 0 &&
	       kvq_type_row_bytes(KVQ_TYPE_I64, 1ull << 62) == 0,
	       "kvq_type_row_bytes_values");
}

static bool check_values(const struct kvq_gguf *g)
{
	const struct kvq_gguf_kv *kv;
	struct kvq_gguf_str s;
	const char *str;
	uint64_t u64, len, i;
	uint32_t u32;
	float f;
	bool b, ok = true;

	CHECK(g->n_kv == 20 && g->version == 3);
	CHECK(!kvq_gguf_get_str(g, "general.architecture", &str, &len) &&
	      len == 5 && !memcmp(str, "llama", 5));
	CHECK(!kvq_gguf_get_u32(g, "general.alignment", &u32) && u32 == ALIGN);
	CHECK(!kvq_gguf_get_u32(g, "test.u8", &u32) && u32 == 200);
	CHECK(!kvq_gguf_get_u64(g, "test.u16", &u64) && u64 == 60000);
	CHECK(!kvq_gguf_get_u32(g, "test.u32", &u32) && u32 == 4000000000u);
	CHECK(!kvq_gguf_get_u64(g, "test.u64", &u64) && u64 == 1ull << 40);
	CHECK(!kvq_gguf_get_u32(g, "test.i16b", &u32) && u32 == 1234);
	kv = kvq_gguf_find(g, "test.i8");
	CHECK(kv && kv->type == KVQ_GGUF_I8 && kv->v.i64 == -5);
	kv = kvq_gguf_find(g, "test.i16");
	CHECK(kv && kv->type == KVQ_GGUF_I16 && kv->v.i64 == -30000);
	kv = kvq_gguf_find(g, "test.i32");
	CHECK(kv && kv->type == KVQ_GGUF_I32 && kv->v.i64 == -2000000000);
	kv = kvq_gguf_find(g, "test.i64");
	CHECK(kv && kv->type == KVQ_GGUF_I64 && kv->v.i64 == -(1ll << 40));
	CHECK(!kvq_gguf_get_f32(g, "test.f32", &f) && f == 1.5f);
	CHECK(!kvq_gguf_get_f32(g, "test.f64", &f) && f == 0.25f);
	CHECK(!kvq_gguf_get_f32(g, "test.u8", &f) && f == 200.0f);
	CHECK(!kvq_gguf_get_f32(g, "test.i8", &f) && f == -5.0f);
	CHECK(!kvq_gguf_get_bool(g, "test.bool", &b) && b);
	CHECK(!kvq_gguf_get_str(g, "test.name", &str, &len) && len == 6 &&
	      !memcmp(str, "h\xc3\xa9llo", 6));

	kv = kvq_gguf_get_arr(g, "test.strs");
	CHECK(kv && kv->v.arr.type == KVQ_GGUF_STRING && kv->v.arr.n == 3 &&
	      kv->v.arr.str_offsets);
	for (i = 0; kv && i < 3; i++) {
		s = kvq_gguf_arr_str(g, kv, i);
		CHECK(s.ptr && s.len == strlen(strs[i]) &&
		      !memcmp(s.ptr, strs[i], s.len));
	}
	if (kv) {
		s = kvq_gguf_arr_str(g, kv, 3);
		CHECK(!s.ptr && !s.len);
	}
	kv = kvq_gguf_get_arr(g, "test.ints");
	CHECK(kv && kv->v.arr.type == KVQ_GGUF_I32 && kv->v.arr.n == 3 &&
	      !kv->v.arr.str_offsets);
	if (kv) {
		int32_t v[3];

		memcpy(v, kv->v.arr.data, sizeof(v));
		CHECK(v[0] == 1 && v[1] == -2 && v[2] == 3);
		s = kvq_gguf_arr_str(g, kv, 0);
		CHECK(!s.ptr);
	}
	kv = kvq_gguf_get_arr(g, "test.empty");
	CHECK(kv && kv->v.arr.type == KVQ_GGUF_U8 && kv->v.arr.n == 0);
	kv = kvq_gguf_get_arr(g, "test.bools");
	CHECK(kv && kv->v.arr.n == 3 &&
	      !memcmp(kv->v.arr.data, "\x01\x00\x01", 3));
	CHECK(!kvq_gguf_get_arr(g, "test.u8"));
	CHECK(!kvq_gguf_get_arr(g, "no.such.key"));
	CHECK(!kvq_gguf_find(g, "no.such.key"));
	CHECK(!kvq_gguf_find(g, "test"));
	return ok;
}

static bool check_getter_errors(const struct kvq_gguf *g)
{
	uint64_t u64 = 7;
	uint32_t u32 = 7;
	float f = 7;
	bool b = false, ok = true;
	const char *str = "x";
	uint64_t len = 7;

	CHECK(kvq_gguf_get_u64(g, "absent", &u64) == -ENOENT);
	CHECK(kvq_gguf_get_u32(g, "absent", &u32) == -ENOENT);
	CHECK(kvq_gguf_get_f32(g, "absent", &f) == -ENOENT);
	CHECK(kvq_gguf_get_bool(g, "absent", &b) == -ENOENT);
	CHECK(kvq_gguf_get_str(g, "absent", &str, &len) == -ENOENT);
	/* does not fit, negative, wrong kind */
	CHECK(kvq_gguf_get_u32(g, "test.u64", &u32) == -EINVAL);
	CHECK(kvq_gguf_get_u32(g, "test.i32", &u32) == -EINVAL);
	CHECK(kvq_gguf_get_u64(g, "test.i8", &u64) == -EINVAL);
	CHECK(kvq_gguf_get_u64(g, "test.f32", &u64) == -EINVAL);
	CHECK(kvq_gguf_get_u64(g, "test.bool", &u64) == -EINVAL);
	CHECK(kvq_gguf_get_u64(g, "general.architecture", &u64) == -EINVAL);
	CHECK(kvq_gguf_get_f32(g, "test.f64big", &f) == -EINVAL);
	CHECK(kvq_gguf_get_f32(g, "test.strs", &f) == -EINVAL);
	CHECK(kvq_gguf_get_bool(g, "test.u8", &b) == -EINVAL);
	CHECK(kvq_gguf_get_str(g, "test.u8", &str, &len) == -EINVAL);
	CHECK(kvq_gguf_get_str(g, "test.strs", &str, &len) == -EINVAL);
	/* nothing stored on failure */
	CHECK(u64 == 7 && u32 == 7 && f == 7 && !b && !strcmp(str, "x") &&
	      len == 7);
	return ok;
}

static bool check_tensors(const struct kvq_gguf *g)
{
	const struct kvq_gguf_tensor *t;
	const uint8_t *map = g->map;
	uint64_t i;
	int k;
	bool ok = true;

	if (g->n_tensors != N_TENSORS || g->alignment != ALIGN ||
	    g->data_offset % ALIGN)
		return false;
	for (k = 0; k < N_TENSORS; k++) {
		t = kvq_gguf_tensor(g, tspec[k].name);
		if (!t || t != &g->tensors[k] ||
		    strcmp(t->name, tspec[k].name) ||
		    t->type != tspec[k].type || t->n_dims != tspec[k].n_dims ||
		    t->ne[0] != tspec[k].ne[0] || t->ne[1] != tspec[k].ne[1] ||
		    t->ne[2] != 1 || t->ne[3] != 1 ||
		    t->offset != tspec[k].offset ||
		    t->nbytes != tspec[k].nbytes ||
		    t->n_elements != tspec[k].ne[0] * tspec[k].ne[1] ||
		    (const uint8_t *)t->data !=
		    map + g->data_offset + t->offset ||
		    ((const uint8_t *)t->data - map) % ALIGN) {
			tap_diag("tensor %s wrong", tspec[k].name);
			ok = false;
			continue;
		}
		for (i = 0; i < t->nbytes; i++)
			if (((const uint8_t *)t->data)[i] != tensor_byte(k, i))
				ok = false;
	}
	if (kvq_gguf_tensor(g, "absent") || kvq_gguf_tensor(g, "a.f3"))
		ok = false;
	return ok;
}

static void test_good_file(const struct buf *good, const struct layout *l)
{
	struct kvq_gguf *g;
	char err[512];
	uint8_t *p;
	int rc;

	rc = open_bytes(good->p, good->len, &g, err, sizeof(err));
	tap_ok(rc == 0 && g != SENTINEL, "gguf_open_valid_v3");
	if (rc) {
		tap_diag("%s", err);
		return;
	}
	tap_ok(!strcmp(g->path, tmpfile_path) && g->size == good->len &&
	       g->data_offset == l->data, "gguf_open_valid_layout");
	tap_ok(check_values(g), "gguf_open_valid_values_round_trip");
	tap_ok(check_getter_errors(g), "gguf_get_conversion_errors");
	tap_ok(check_tensors(g), "gguf_open_valid_tensors_round_trip");
	kvq_gguf_close(g);
	kvq_gguf_close(NULL);

	/* v2 reads the same way as v3 */
	p = xmalloc(good->len);
	memcpy(p, good->p, good->len);
	patch_le(p, l->version, 2, 4);
	rc = open_bytes(p, good->len, &g, err, sizeof(err));
	tap_ok(rc == 0 && g->version == 2, "gguf_open_valid_v2");
	if (!rc)
		kvq_gguf_close(g);
	free(p);
}

static void test_variants(void)
{
	struct kvq_gguf *g;
	struct layout l;
	struct buf b;
	char err[512];
	int rc;

	build(&b, &l, MK_NO_ALIGN_KEY);
	rc = open_bytes(b.p, b.len, &g, err, sizeof(err));
	tap_ok(rc == 0 && g->alignment == 32 && g->data_offset % 32 == 0 &&
	       !kvq_gguf_find(g, "general.alignment"),
	       "gguf_open_default_alignment");
	if (!rc)
		kvq_gguf_close(g);
	else
		tap_diag("%s", err);
	free(b.p);

	build(&b, &l, MK_NO_TENSORS);
	rc = open_bytes(b.p, b.len, &g, err, sizeof(err));
	tap_ok(rc == 0 && g->n_tensors == 0 && g->data_offset <= g->size &&
	       !kvq_gguf_tensor(g, "a.f32"), "gguf_open_no_tensors_unpadded");
	if (!rc)
		kvq_gguf_close(g);
	else
		tap_diag("%s", err);
	free(b.p);
}

static void test_every_prefix(const struct buf *good)
{
	struct kvq_gguf *g;
	char err[512];
	size_t n, bad = 0;
	int rc;

	for (n = 0; n < good->len; n++) {
		rc = open_bytes(good->p, n, &g, err, sizeof(err));
		if (failed_well(rc, -EINVAL, g, err, "truncated"))
			continue;
		if (bad++ < 5)
			tap_diag("prefix %zu: rc %d, \"%s\"", n, rc, err);
		if (!rc)
			kvq_gguf_close(g);
	}
	tap_ok(bad == 0, "gguf_open_truncated_every_prefix (%zu lengths)",
	       good->len);
}

static void test_malformed(const struct buf *good, const struct layout *l)
{
	const uint64_t big = 1ull << 63;
	uint8_t *p;

	expect_fail("gguf_open_empty_file", good->p, 0, -EINVAL, "empty");
	expect_patched("gguf_open_bad_magic", good, 0, 1, 'g', -EINVAL,
		       "bad magic");
	expect_patched("gguf_open_v1", good, l->version, 4, 1, -ENOTSUP,
		       "GGUF v1 is not supported (file predates v2");
	expect_patched("gguf_open_v4", good, l->version, 4, 4, -ENOTSUP,
		       "version 4 is not supported");
	expect_patched("gguf_open_v0", good, l->version, 4, 0, -ENOTSUP,
		       "version 0 is not supported");
	expect_patched("gguf_open_big_endian", good, l->version, 4,
		       0x03000000, -ENOTSUP, "big-endian");

	expect_patched("gguf_open_huge_n_kv", good, l->n_kv, 8, big, -EINVAL,
		       "kv pairs cannot fit");
	expect_patched("gguf_open_max_n_kv", good, l->n_kv, 8, UINT64_MAX,
		       -EINVAL, "kv pairs cannot fit");
	expect_patched("gguf_open_huge_n_tensors", good, l->n_tensors, 8, big,
		       -EINVAL, "tensor infos cannot fit");
	expect_patched("gguf_open_n_tensors_plus_one", good, l->n_tensors, 8,
		       N_TENSORS + 1, -EINVAL, NULL);
	expect_patched("gguf_open_huge_string_length", good, l->arch_len, 8,
		       big, -EINVAL, "extends past end of file");
	expect_patched("gguf_open_max_string_length", good, l->arch_len, 8,
		       UINT64_MAX, -EINVAL, "extends past end of file");
	expect_patched("gguf_open_huge_key_length", good, l->u16_key - 8, 8,
		       UINT64_MAX - 3, -EINVAL, "key of");
	expect_patched("gguf_open_huge_string_array_length", good, l->strs_n,
		       8, big, -EINVAL, "strings extends past end of file");
	expect_patched("gguf_open_string_array_length_wraps", good, l->strs_n,
		       8, 1ull << 61, -EINVAL, "extends past end of file");
	expect_patched("gguf_open_string_array_one_too_many", good, l->strs_n,
		       8, 4, -EINVAL, NULL);
	expect_patched("gguf_open_huge_array_length", good, l->ints_n, 8, big,
		       -EINVAL, "extends past end of file");
	expect_patched("gguf_open_array_bytes_wrap", good, l->ints_n, 8,
		       1ull << 62, -EINVAL, "extends past end of file");

	expect_patched("gguf_open_unknown_value_type", good, l->u8_type, 4, 13,
		       -EINVAL, "unknown value type 13");
	expect_patched("gguf_open_unknown_value_type_max", good, l->u8_type, 4,
		       UINT32_MAX, -EINVAL, "unknown value type 4294967295");
	expect_patched("gguf_open_unknown_array_type", good, l->strs_etype, 4,
		       13, -EINVAL, "unknown array element type 13");
	expect_patched("gguf_open_nested_array", good, l->strs_etype, 4,
		       KVQ_GGUF_ARRAY, -ENOTSUP, "arrays of arrays");
	expect_patched("gguf_open_bad_bool", good, l->bool_val, 1, 2, -EINVAL,
		       "bool value 2");

	expect_patched("gguf_open_alignment_zero", good, l->align_val, 4, 0,
		       -EINVAL, "general.alignment 0 is not a power of two");
	expect_patched("gguf_open_alignment_three", good, l->align_val, 4, 3,
		       -EINVAL, "general.alignment 3 is not a power of two");
	expect_patched("gguf_open_alignment_wrong_type", good, l->align_type, 4,
		       KVQ_GGUF_I32, -EINVAL, "expected u32");

	expect_patched("gguf_open_misaligned_offset", good, l->t_off[1], 8, 65,
		       -EINVAL, "offset 65 is not a multiple of the alignment 64");
	expect_patched("gguf_open_offset_aligned_to_32_only", good,
		       l->t_off[1], 8, 32, -EINVAL, "not a multiple");
	expect_patched("gguf_open_offset_past_end", good, l->t_off[2], 8,
		       1ull << 40, -EINVAL, "extends past end of file");
	expect_patched("gguf_open_offset_wraps", good, l->t_off[2], 8,
		       UINT64_MAX - 63, -EINVAL, "extends past end of file");
	expect_patched("gguf_open_data_past_end", good, l->t_off[2], 8, 192,
		       -EINVAL, "(c.q80) data");
	expect_patched("gguf_open_overlapping_tensors", good, l->t_off[1], 8, 0,
		       -EINVAL, "overlap");
	expect_patched("gguf_open_overlapping_tensors_partly", good,
		       l->t_off[2], 8, 64, -EINVAL, "overlap");

	expect_patched("gguf_open_unknown_tensor_type", good, l->t_type[1], 4,
		       99, -EINVAL, "unknown tensor type 99 in tensor b.f16");
	expect_patched("gguf_open_retired_tensor_type", good, l->t_type[0], 4,
		       4, -EINVAL, "unknown tensor type 4 in tensor a.f32");
	expect_patched("gguf_open_n_dims_0", good, l->t_ndims[0], 4, 0,
		       -EINVAL, "n_dims 0");
	expect_patched("gguf_open_n_dims_5", good, l->t_ndims[0], 4, 5,
		       -EINVAL, "n_dims 5");
	expect_patched("gguf_open_n_dims_huge", good, l->t_ndims[2], 4,
		       UINT32_MAX, -EINVAL, "n_dims 4294967295");
	expect_patched("gguf_open_zero_dimension", good, l->t_ne[0][1], 8, 0,
		       -EINVAL, "dimension 1 is 0");
	expect_patched("gguf_open_zero_row_length", good, l->t_ne[2][0], 8, 0,
		       -EINVAL, "dimension 0 is 0");
	expect_patched("gguf_open_dimension_product_overflow", good,
		       l->t_ne[0][1], 8, 1ull << 62, -EINVAL, "overflows");
	expect_patched("gguf_open_elements_past_int64", good, l->t_ne[0][1], 8,
		       1ull << 60, -EINVAL, "overflows");
	expect_patched("gguf_open_bytes_overflow", good, l->t_ne[0][1], 8,
		       1ull << 59, -EINVAL, "overflows");
	expect_patched("gguf_open_large_shape_past_end", good, l->t_ne[0][1],
		       8, 1ull << 40, -EINVAL, "extends past end of file");
	expect_patched("gguf_open_row_not_block_multiple", good, l->t_ne[2][0],
		       8, 48, -EINVAL, "not a multiple of the Q8_0 block size 32");

	p = xmalloc(good->len);
	memcpy(p, good->p, good->len);
	memcpy(p + l->t_name[1], "a.f32", 5);
	expect_fail("gguf_open_duplicate_tensor_name", p, good->len, -EINVAL,
		    "duplicate tensor name \"a.f32\"");
	memcpy(p, good->p, good->len);
	memcpy(p + l->i16_key, "test.u16", 8);
	expect_fail("gguf_open_duplicate_key", p, good->len, -EINVAL,
		    "duplicate key \"test.u16\"");
	memcpy(p, good->p, good->len);
	p[l->u16_key + 4] = '\0';
	expect_fail("gguf_open_nul_in_key", p, good->len, -EINVAL,
		    "NUL byte");
	memcpy(p, good->p, good->len);
	p[l->t_name[0] + 1] = '\n';
	patch_le(p, l->t_type[0], 99, 4);
	expect_fail("gguf_open_error_is_one_line", p, good->len, -EINVAL,
		    "unknown tensor type 99 in tensor a?f32");
	free(p);
}

static void test_open_errors(const struct buf *good)
{
	struct kvq_gguf *g = SENTINEL;
	char err[512], small[8];
	char path[600];
	int rc;

	snprintf(path, sizeof(path), "%s/absent.gguf", tmpdir);
	rc = kvq_gguf_open(path, &g, err, sizeof(err));
	tap_ok(rc == -ENOENT && g == SENTINEL &&
	       !strncmp(err, path, strlen(path)),
	       "gguf_open_missing_file");

	rc = kvq_gguf_open(tmpdir, &g, err, sizeof(err));
	tap_ok(rc == -EINVAL && g == SENTINEL && strstr(err, tmpdir) &&
	       strstr(err, "not a regular file"), "gguf_open_directory");

	write_file(good->p, 30);
	rc = kvq_gguf_open(tmpfile_path, &g, NULL, 0);
	tap_ok(rc == -EINVAL && g == SENTINEL, "gguf_open_null_err_buffer");

	memset(small, 'x', sizeof(small));
	rc = kvq_gguf_open(tmpfile_path, &g, small, sizeof(small));
	tap_ok(rc == -EINVAL && memchr(small, '\0', sizeof(small)),
	       "gguf_open_small_err_buffer");
}

/* Every element of a STRING array lies inside the mapping. */
static bool strings_inside(const struct kvq_gguf *g,
			   const struct kvq_gguf_kv *kv)
{
	const char *lo = g->map, *hi = lo + g->size;
	struct kvq_gguf_str s;
	uint64_t i;

	for (i = 0; i < kv->v.arr.n; i++) {
		s = kvq_gguf_arr_str(g, kv, i);
		if (!s.ptr || s.ptr < lo || s.ptr > hi ||
		    s.len > (uint64_t)(hi - s.ptr))
			return false;
	}
	return true;
}

/*
 * Random damage: whatever the reader accepts must still keep its
 * invariants; whatever it refuses must be refused cleanly.  AddressSanitizer
 * catches the reads that a check forgot.
 */
static void test_random_damage(const struct buf *good)
{
	uint64_t x = 0x9e3779b97f4a7c15ull, i;
	uint8_t *p = xmalloc(good->len);
	struct kvq_gguf *g;
	char err[512];
	bool ok = true;
	int iter, flips, rc, want;

	for (iter = 0; iter < 2000; iter++) {
		memcpy(p, good->p, good->len);
		for (flips = 0; flips < 1 + iter % 4; flips++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			p[(x >> 8) % good->len] ^= (uint8_t)(1u << (x & 7));
		}
		rc = open_bytes(p, good->len, &g, err, sizeof(err));
		if (rc) {
			want = rc == -ENOTSUP ? -ENOTSUP : -EINVAL;
			if (!failed_well(rc, want, g, err, NULL)) {
				tap_diag("iteration %d: rc %d \"%s\"", iter, rc,
					 err);
				ok = false;
			}
			continue;
		}
		for (i = 0; i < g->n_tensors; i++) {
			const struct kvq_gguf_tensor *t = &g->tensors[i];

			if (g->data_offset + t->offset + t->nbytes > g->size ||
			    kvq_gguf_tensor(g, t->name) != t)
				ok = false;
		}
		for (i = 0; i < g->n_kv; i++) {
			const struct kvq_gguf_kv *kv = &g->kv[i];

			if (kvq_gguf_find(g, kv->key) != kv)
				ok = false;
			if (kv->type != KVQ_GGUF_ARRAY ||
			    kv->v.arr.type != KVQ_GGUF_STRING)
				continue;
			if (!strings_inside(g, kv))
				ok = false;
		}
		kvq_gguf_close(g);
	}
	free(p);
	tap_ok(ok, "gguf_open_random_damage_is_safe");
}

/* ----------------------------------------------------- real files */

static void skip(const char *name)
{
	tap_ok(1, "%s # SKIP file missing", name);
}

static bool str_is(const struct kvq_gguf *g, const char *key, const char *want)
{
	const char *s;
	uint64_t len;

	return !kvq_gguf_get_str(g, key, &s, &len) && len == strlen(want) &&
	       !memcmp(s, want, len);
}

static struct kvq_gguf *open_real(const char *name, const char *file)
{
	struct kvq_gguf *g;
	char path[4096], err[512];
	int rc;

	if (!tap_testdata(file, path, sizeof(path))) {
		skip(name);
		return NULL;
	}
	rc = kvq_gguf_open(path, &g, err, sizeof(err));
	tap_ok(rc == 0, "%s", name);
	if (rc) {
		tap_diag("%s", err);
		return NULL;
	}
	return g;
}

static void test_stories(void)
{
	const struct kvq_gguf_kv *kv;
	const struct kvq_gguf_tensor *t;
	struct kvq_gguf *g;
	uint32_t u32;
	uint64_t i;
	bool ok = true;

	g = open_real("gguf_open_real_stories260k", "stories260K.gguf");
	if (!g) {
		skip("gguf_real_stories260k_metadata");
		skip("gguf_real_stories260k_tensors");
		return;
	}
	kv = kvq_gguf_get_arr(g, "tokenizer.ggml.tokens");
	tap_ok(str_is(g, "general.architecture", "llama") &&
	       !kvq_gguf_get_u32(g, "llama.embedding_length", &u32) &&
	       u32 == 64 &&
	       !kvq_gguf_get_u32(g, "llama.block_count", &u32) && u32 == 5 &&
	       kv && kv->v.arr.type == KVQ_GGUF_STRING &&
	       kv->v.arr.n == 512 && strings_inside(g, kv),
	       "gguf_real_stories260k_metadata");

	for (i = 0; i < g->n_tensors; i++) {
		t = &g->tensors[i];
		if (t->type != KVQ_TYPE_F32 ||
		    t->nbytes != t->n_elements * 4 ||
		    (const uint8_t *)t->data + t->nbytes >
		    (const uint8_t *)g->map + g->size ||
		    ((const uint8_t *)t->data - (const uint8_t *)g->map) %
		    g->alignment)
			ok = false;
	}
	t = kvq_gguf_tensor(g, "token_embd.weight");
	tap_ok(ok && g->n_tensors > 0 && t && t->ne[0] == 64 &&
	       t->ne[1] == 512, "gguf_real_stories260k_tensors");
	kvq_gguf_close(g);
}

static void test_vocab(const char *name, const char *file, uint64_t n_tokens,
		       uint64_t n_merges)
{
	const struct kvq_gguf_kv *tok, *merges;
	char case_name[128];
	struct kvq_gguf *g;

	snprintf(case_name, sizeof(case_name), "gguf_open_real_%s", name);
	g = open_real(case_name, file);
	snprintf(case_name, sizeof(case_name), "gguf_real_%s_vocab", name);
	if (!g) {
		skip(case_name);
		return;
	}
	tok = kvq_gguf_get_arr(g, "tokenizer.ggml.tokens");
	merges = kvq_gguf_get_arr(g, "tokenizer.ggml.merges");
	tap_ok(tok && tok->v.arr.type == KVQ_GGUF_STRING &&
	       tok->v.arr.n == n_tokens && strings_inside(g, tok) &&
	       (n_merges ? merges && merges->v.arr.n == n_merges &&
			   strings_inside(g, merges)
			 : !merges) && g->n_tensors == 0,
	       "%s", case_name);
	kvq_gguf_close(g);
}

int main(void)
{
	struct layout l;
	struct buf good;

	if (!mkdtemp(tmpdir)) {
		perror("mkdtemp");
		return 99;
	}
	snprintf(tmpfile_path, sizeof(tmpfile_path), "%s/t.gguf", tmpdir);
	build(&good, &l, 0);

	test_type_table();
	test_good_file(&good, &l);
	test_variants();
	test_malformed(&good, &l);
	test_every_prefix(&good);
	test_open_errors(&good);
	test_random_damage(&good);

	test_stories();
	test_vocab("llama_spm", "vocab/ggml-vocab-llama-spm.gguf", 32000, 0);
	test_vocab("gpt2", "vocab/ggml-vocab-gpt-2.gguf", 50257, 50000);

	free(good.p);
	unlink(tmpfile_path);
	rmdir(tmpdir);
	return tap_done();
}
