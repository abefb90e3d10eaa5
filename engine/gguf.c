/*
 * gguf.c - map a GGUF v2/v3 file and validate all of it before anyone reads it.
 *
 * Why this file exists: a GGUF file comes from outside kvqd, and a loader that
 * believed its counts and offsets could be steered into reading anywhere.  So
 * one forward pass over the mapping checks every count, length, offset,
 * alignment, shape and type against the bytes that are really there, before
 * the value is used to index, to allocate or to do arithmetic.  Once
 * kvq_gguf_open() has returned 0, every pointer and length in the reader lies
 * inside the mapping and the rest of the engine may use them as they are.
 *
 * Layout (ggml's docs/gguf.md; every integer little-endian):
 *
 *	"GGUF"  u32 version  u64 n_tensors  u64 n_kv
 *	n_kv      x { string key, u32 value type, value }
 *	n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 type,
 *		      u64 offset }
 *	zero padding up to general.alignment (32 when absent)
 *	tensor data; each offset is relative to here and aligned
 *
 * A string is a u64 byte count and the bytes, with no NUL.  An array value is
 * a u32 element type, a u64 element count and the elements.  v1 had 32-bit
 * counts and lengths and is refused; v2 and v3 read the same way (v3 only
 * allowed big-endian files, which are refused too).
 *
 * Invariants once open has succeeded:
 *  1. data_offset + t->offset + t->nbytes <= size for every tensor, and the
 *     tensors' byte ranges are pairwise disjoint.
 *  2. Every string and array (and every element of a STRING array) lies
 *     inside [0, size).
 *  3. Keys are unique, tensor names are unique, and neither contains a NUL.
 *  4. No allocation is larger than a small multiple of the file size.
 */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/gguf.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_HEADER_BYTES 24

/*
 * Smallest encodings, used to refuse a count the file cannot hold before
 * anything is allocated for it: a kv is a key length (8), a type (4) and a
 * value of at least one byte; a tensor info is a name length (8), n_dims (4),
 * one dimension (8), a type (4) and an offset (8).
 */
#define GGUF_MIN_KV_BYTES 13
#define GGUF_MIN_TENSOR_BYTES 32

/*
 * The ggml tensor types.  Block sizes follow the block structs in ggml's
 * ggml-common.h; where gguf-py's table disagrees (it gives Q8_1 40 bytes) the
 * struct is what ggml writes and reads, so it wins (Q8_1: two halves and 32
 * quants, 36 bytes).  Numbers 4, 5 and 31..33, 36..38 were retired by ggml.
 */
static const struct kvq_type_info kvq_types[KVQ_TYPE_COUNT] = {
	[KVQ_TYPE_F32]		= { "F32",	  1,   4 },
	[KVQ_TYPE_F16]		= { "F16",	  1,   2 },
	[KVQ_TYPE_Q4_0]		= { "Q4_0",	 32,  18 },
	[KVQ_TYPE_Q4_1]		= { "Q4_1",	 32,  20 },
	[KVQ_TYPE_Q5_0]		= { "Q5_0",	 32,  22 },
	[KVQ_TYPE_Q5_1]		= { "Q5_1",	 32,  24 },
	[KVQ_TYPE_Q8_0]		= { "Q8_0",	 32,  34 },
	[KVQ_TYPE_Q8_1]		= { "Q8_1",	 32,  36 },
	[KVQ_TYPE_Q2_K]		= { "Q2_K",	256,  84 },
	[KVQ_TYPE_Q3_K]		= { "Q3_K",	256, 110 },
	[KVQ_TYPE_Q4_K]		= { "Q4_K",	256, 144 },
	[KVQ_TYPE_Q5_K]		= { "Q5_K",	256, 176 },
	[KVQ_TYPE_Q6_K]		= { "Q6_K",	256, 210 },
	[KVQ_TYPE_Q8_K]		= { "Q8_K",	256, 292 },
	[KVQ_TYPE_IQ2_XXS]	= { "IQ2_XXS",	256,  66 },
	[KVQ_TYPE_IQ2_XS]	= { "IQ2_XS",	256,  74 },
	[KVQ_TYPE_IQ3_XXS]	= { "IQ3_XXS",	256,  98 },
	[KVQ_TYPE_IQ1_S]	= { "IQ1_S",	256,  50 },
	[KVQ_TYPE_IQ4_NL]	= { "IQ4_NL",	 32,  18 },
	[KVQ_TYPE_IQ3_S]	= { "IQ3_S",	256, 110 },
	[KVQ_TYPE_IQ2_S]	= { "IQ2_S",	256,  82 },
	[KVQ_TYPE_IQ4_XS]	= { "IQ4_XS",	256, 136 },
	[KVQ_TYPE_I8]		= { "I8",	  1,   1 },
	[KVQ_TYPE_I16]		= { "I16",	  1,   2 },
	[KVQ_TYPE_I32]		= { "I32",	  1,   4 },
	[KVQ_TYPE_I64]		= { "I64",	  1,   8 },
	[KVQ_TYPE_F64]		= { "F64",	  1,   8 },
	[KVQ_TYPE_IQ1_M]	= { "IQ1_M",	256,  56 },
	[KVQ_TYPE_BF16]		= { "BF16",	  1,   2 },
	[KVQ_TYPE_TQ1_0]	= { "TQ1_0",	256,  54 },
	[KVQ_TYPE_TQ2_0]	= { "TQ2_0",	256,  66 },
	[KVQ_TYPE_MXFP4]	= { "MXFP4",	 32,  17 },
};

/* Encoded size of each metadata value type; 0 for STRING and ARRAY. */
static const uint8_t vtype_bytes[KVQ_GGUF_VTYPE_COUNT] = {
	[KVQ_GGUF_U8] = 1,	[KVQ_GGUF_I8] = 1,
	[KVQ_GGUF_U16] = 2,	[KVQ_GGUF_I16] = 2,
	[KVQ_GGUF_U32] = 4,	[KVQ_GGUF_I32] = 4,
	[KVQ_GGUF_F32] = 4,	[KVQ_GGUF_BOOL] = 1,
	[KVQ_GGUF_U64] = 8,	[KVQ_GGUF_I64] = 8,
	[KVQ_GGUF_F64] = 8,
};

static const char *const vtype_names[KVQ_GGUF_VTYPE_COUNT] = {
	"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string",
	"array", "u64", "i64", "f64",
};

/*
 * The reader as allocated: the public struct plus indexes sorted by key and
 * by name, built to find duplicates and kept for O(log n) lookups.
 */
struct gguf_file {
	struct kvq_gguf pub;
	struct kvq_gguf_kv **kv_by_key;
	struct kvq_gguf_tensor **t_by_name;
};

static const struct gguf_file *to_file(const struct kvq_gguf *g)
{
	return (const struct gguf_file *)((const char *)g -
					  offsetof(struct gguf_file, pub));
}

/* Where the parse is, and what it is reading (for messages). */
struct gguf_cursor {
	const char *path;
	const uint8_t *base;
	uint64_t size;
	uint64_t pos;
	char what[160];		/* "kv 3 (general.name)", "tensor info 2" */
	char *err;
	size_t errlen;
};

/* ------------------------------------------------------------ types */

const struct kvq_type_info *kvq_type_info(uint32_t type)
{
	if (type >= KVQ_TYPE_COUNT || !kvq_types[type].name)
		return NULL;
	return &kvq_types[type];
}

const char *kvq_type_name(uint32_t type)
{
	const struct kvq_type_info *ti = kvq_type_info(type);

	return ti ? ti->name : "unknown";
}

uint64_t kvq_type_row_bytes(uint32_t type, uint64_t n)
{
	const struct kvq_type_info *ti = kvq_type_info(type);
	uint64_t bytes;

	if (!ti || n % ti->block_elems)
		return 0;
	if (__builtin_mul_overflow(n / ti->block_elems, ti->block_bytes,
				   &bytes))
		return 0;
	return bytes;
}

/* ----------------------------------------------------------- errors */

/* Replaces control bytes so that a name from the file cannot break the
 * message into several lines. */
static void one_line(char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = '?';
}

static void verr(char *err, size_t errlen, const char *path, const char *fmt,
		 va_list ap)
{
	int n;

	if (!err || !errlen)
		return;
	n = snprintf(err, errlen, "%s: ", path);
	if (n >= 0 && (size_t)n < errlen)
		vsnprintf(err + n, errlen - n, fmt, ap);
	one_line(err);
}

static int __attribute__((format(printf, 5, 6)))
open_err(char *err, size_t errlen, const char *path, int rc,
	 const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verr(err, errlen, path, fmt, ap);
	va_end(ap);
	return rc;
}

static int __attribute__((format(printf, 3, 4)))
parse_err(struct gguf_cursor *c, int rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verr(c->err, c->errlen, c->path, fmt, ap);
	va_end(ap);
	return rc;
}

static int truncated(struct gguf_cursor *c, const char *field)
{
	return parse_err(c, -EINVAL,
			 "truncated: %s %s extends past end of file (size %" PRIu64 ")",
			 c->what, field, c->size);
}

/* ----------------------------------------------------------- cursor */

static uint16_t le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
	       (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
	return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static uint64_t left(const struct gguf_cursor *c)
{
	return c->size - c->pos;
}

static int cur_u32(struct gguf_cursor *c, const char *field, uint32_t *v)
{
	if (left(c) < 4)
		return truncated(c, field);
	*v = le32(c->base + c->pos);
	c->pos += 4;
	return 0;
}

static int cur_u64(struct gguf_cursor *c, const char *field, uint64_t *v)
{
	if (left(c) < 8)
		return truncated(c, field);
	*v = le64(c->base + c->pos);
	c->pos += 8;
	return 0;
}

static int cur_str(struct gguf_cursor *c, const char *field,
		   struct kvq_gguf_str *s)
{
	uint64_t len = 0;
	int rc;

	rc = cur_u64(c, field, &len);
	if (rc)
		return rc;
	if (len > left(c))
		return parse_err(c, -EINVAL,
				 "truncated: %s %s of %" PRIu64 " bytes extends past end of file (size %" PRIu64 ")",
				 c->what, field, len, c->size);
	s->ptr = (const char *)c->base + c->pos;
	s->len = len;
	c->pos += len;
	return 0;
}

/* A key or a tensor name: read, refused if it holds a NUL, copied with one. */
static int cur_name(struct gguf_cursor *c, const char *field, char **out)
{
	struct kvq_gguf_str s;
	char *name;
	int rc;

	rc = cur_str(c, field, &s);
	if (rc)
		return rc;
	if (memchr(s.ptr, 0, s.len))
		return parse_err(c, -EINVAL, "%s: %s contains a NUL byte",
				 c->what, field);
	/* s.len < size <= SIZE_MAX, so the + 1 cannot wrap */
	name = malloc(s.len + 1);
	if (!name)
		return parse_err(c, -ENOMEM, "out of memory");
	memcpy(name, s.ptr, s.len);
	name[s.len] = '\0';
	*out = name;
	return 0;
}

/* ------------------------------------------------------------- kv */

static void load_scalar(struct kvq_gguf_kv *kv, const uint8_t *p)
{
	uint32_t b32;
	uint64_t b64;
	float f;
	double d;

	switch (kv->type) {
	case KVQ_GGUF_U8:
	case KVQ_GGUF_BOOL:
		kv->v.u64 = p[0];
		break;
	case KVQ_GGUF_I8:
		kv->v.i64 = (int8_t)p[0];
		break;
	case KVQ_GGUF_U16:
		kv->v.u64 = le16(p);
		break;
	case KVQ_GGUF_I16:
		kv->v.i64 = (int16_t)le16(p);
		break;
	case KVQ_GGUF_U32:
		kv->v.u64 = le32(p);
		break;
	case KVQ_GGUF_I32:
		kv->v.i64 = (int32_t)le32(p);
		break;
	case KVQ_GGUF_F32:
		b32 = le32(p);
		memcpy(&f, &b32, sizeof(f));
		kv->v.f64 = f;
		break;
	case KVQ_GGUF_U64:
		kv->v.u64 = le64(p);
		break;
	case KVQ_GGUF_I64:
		kv->v.i64 = (int64_t)le64(p);
		break;
	case KVQ_GGUF_F64:
		b64 = le64(p);
		memcpy(&d, &b64, sizeof(d));
		kv->v.f64 = d;
		break;
	default:
		break;
	}
}

static int parse_scalar(struct gguf_cursor *c, struct kvq_gguf_kv *kv)
{
	uint64_t n = vtype_bytes[kv->type];
	const uint8_t *p = c->base + c->pos;

	if (left(c) < n)
		return truncated(c, "value");
	if (kv->type == KVQ_GGUF_BOOL && p[0] > 1)
		return parse_err(c, -EINVAL, "%s: bool value %u is not 0 or 1",
				 c->what, p[0]);
	load_scalar(kv, p);
	c->pos += n;
	return 0;
}

/*
 * Every element is at least its 8-byte length, so @n is bounded by the bytes
 * left before str_offsets is allocated; then each element is checked and its
 * offset recorded, so kvq_gguf_arr_str() need not check again.
 */
static int parse_str_array(struct gguf_cursor *c, struct kvq_gguf_kv *kv)
{
	uint64_t n = kv->v.arr.n, i, len;
	uint64_t *offs;

	if (n > left(c) / 8)
		return parse_err(c, -EINVAL,
				 "truncated: %s array of %" PRIu64 " strings extends past end of file (size %" PRIu64 ")",
				 c->what, n, c->size);
	offs = malloc((n ? n : 1) * sizeof(*offs));
	if (!offs)
		return parse_err(c, -ENOMEM, "out of memory");
	kv->v.arr.str_offsets = offs;

	for (i = 0; i < n; i++) {
		if (left(c) < 8)
			goto out_truncated;
		len = le64(c->base + c->pos);
		if (len > left(c) - 8)
			goto out_truncated;
		offs[i] = c->pos;
		c->pos += 8 + len;
	}
	return 0;

out_truncated:
	return parse_err(c, -EINVAL,
			 "truncated: %s string %" PRIu64 " of %" PRIu64 " extends past end of file (size %" PRIu64 ")",
			 c->what, i, n, c->size);
}

static int parse_array(struct gguf_cursor *c, struct kvq_gguf_kv *kv)
{
	uint32_t et;
	uint64_t n, esz, i;
	const uint8_t *p;
	int rc;

	rc = cur_u32(c, "array element type", &et);
	if (rc)
		return rc;
	if (et >= KVQ_GGUF_VTYPE_COUNT)
		return parse_err(c, -EINVAL,
				 "%s: unknown array element type %" PRIu32,
				 c->what, et);
	/* the spec allows nesting; no file kvqd reads uses it */
	if (et == KVQ_GGUF_ARRAY)
		return parse_err(c, -ENOTSUP,
				 "%s: arrays of arrays are not supported",
				 c->what);
	rc = cur_u64(c, "array length", &n);
	if (rc)
		return rc;
	kv->v.arr.type = et;
	kv->v.arr.n = n;
	kv->v.arr.data = c->base + c->pos;
	if (et == KVQ_GGUF_STRING)
		return parse_str_array(c, kv);

	esz = vtype_bytes[et];
	if (n > left(c) / esz)
		return parse_err(c, -EINVAL,
				 "truncated: %s array of %" PRIu64 " %s extends past end of file (size %" PRIu64 ")",
				 c->what, n, vtype_names[et], c->size);
	p = c->base + c->pos;
	if (et == KVQ_GGUF_BOOL)
		for (i = 0; i < n; i++)
			if (p[i] > 1)
				return parse_err(c, -EINVAL,
						 "%s: bool element %" PRIu64 " is %u, not 0 or 1",
						 c->what, i, p[i]);
	c->pos += n * esz;
	return 0;
}

static int parse_kv(struct gguf_cursor *c, uint64_t i, struct kvq_gguf_kv *kv)
{
	uint32_t type;
	int rc;

	snprintf(c->what, sizeof(c->what), "kv %" PRIu64, i);
	rc = cur_name(c, "key", &kv->key);
	if (rc)
		return rc;
	snprintf(c->what, sizeof(c->what), "kv %" PRIu64 " (%s)", i, kv->key);
	rc = cur_u32(c, "value type", &type);
	if (rc)
		return rc;
	if (type >= KVQ_GGUF_VTYPE_COUNT)
		return parse_err(c, -EINVAL, "%s: unknown value type %" PRIu32,
				 c->what, type);
	kv->type = type;
	switch (type) {
	case KVQ_GGUF_STRING:
		return cur_str(c, "value", &kv->v.str);
	case KVQ_GGUF_ARRAY:
		return parse_array(c, kv);
	default:
		return parse_scalar(c, kv);
	}
}

static int cmp_kv(const void *a, const void *b)
{
	const struct kvq_gguf_kv *const *x = a, *const *y = b;

	return strcmp((*x)->key, (*y)->key);
}

static int cmp_key_kv(const void *key, const void *elem)
{
	const struct kvq_gguf_kv *const *e = elem;

	return strcmp(key, (*e)->key);
}

static int index_kv(struct gguf_cursor *c, struct gguf_file *f)
{
	struct kvq_gguf *g = &f->pub;
	struct kvq_gguf_kv **idx;
	uint64_t i;

	idx = malloc((g->n_kv ? g->n_kv : 1) * sizeof(*idx));
	if (!idx)
		return parse_err(c, -ENOMEM, "out of memory");
	f->kv_by_key = idx;
	for (i = 0; i < g->n_kv; i++)
		idx[i] = &g->kv[i];
	qsort(idx, g->n_kv, sizeof(*idx), cmp_kv);
	for (i = 1; i < g->n_kv; i++)
		if (!strcmp(idx[i - 1]->key, idx[i]->key))
			return parse_err(c, -EINVAL,
					 "duplicate key \"%s\" (kv %td and kv %td)",
					 idx[i]->key, idx[i - 1] - g->kv,
					 idx[i] - g->kv);
	return 0;
}

static int read_alignment(struct gguf_cursor *c, struct kvq_gguf *g)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, "general.alignment");

	g->alignment = KVQ_GGUF_DEFAULT_ALIGNMENT;
	if (!kv)
		return 0;
	if (kv->type != KVQ_GGUF_U32)
		return parse_err(c, -EINVAL,
				 "general.alignment has type %s, expected u32",
				 vtype_names[kv->type]);
	if (!kv->v.u64 || (kv->v.u64 & (kv->v.u64 - 1)))
		return parse_err(c, -EINVAL,
				 "general.alignment %" PRIu64 " is not a power of two",
				 kv->v.u64);
	g->alignment = (uint32_t)kv->v.u64;
	return 0;
}

/* --------------------------------------------------------- tensors */

/* Shape and type of one tensor info: sets n_elements and nbytes. */
static int check_shape(struct gguf_cursor *c, struct kvq_gguf_tensor *t,
		       uint32_t type)
{
	const struct kvq_type_info *ti = kvq_type_info(type);
	uint64_t n = 1, rows = 1, bytes;
	uint32_t d;

	for (d = 0; d < t->n_dims; d++)
		if (!t->ne[d])
			return parse_err(c, -EINVAL, "%s: dimension %" PRIu32 " is 0",
					 c->what, d);
	if (!ti)
		return parse_err(c, -EINVAL,
				 "unknown tensor type %" PRIu32 " in tensor %s",
				 type, t->name);
	t->type = type;
	if (t->ne[0] % ti->block_elems)
		return parse_err(c, -EINVAL,
				 "%s: row length %" PRIu64 " is not a multiple of the %s block size %" PRIu32,
				 c->what, t->ne[0], ti->name, ti->block_elems);
	/* ggml counts elements in int64_t, so stay below INT64_MAX too */
	for (d = 0; d < KVQ_GGUF_MAX_DIMS; d++)
		if (__builtin_mul_overflow(n, t->ne[d], &n) || n > INT64_MAX)
			goto out_overflow;
	for (d = 1; d < KVQ_GGUF_MAX_DIMS; d++)
		rows *= t->ne[d];	/* divides n: cannot overflow */
	bytes = kvq_type_row_bytes(type, t->ne[0]);
	if (!bytes || __builtin_mul_overflow(bytes, rows, &bytes))
		goto out_overflow;
	t->n_elements = n;
	t->nbytes = bytes;
	return 0;

out_overflow:
	return parse_err(c, -EINVAL,
			 "%s: shape [%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64 "] overflows",
			 c->what, t->ne[0], t->ne[1], t->ne[2], t->ne[3]);
}

static int parse_tensor(struct gguf_cursor *c, uint64_t i,
			struct kvq_gguf_tensor *t)
{
	uint32_t d, type;
	int rc;

	snprintf(c->what, sizeof(c->what), "tensor info %" PRIu64, i);
	rc = cur_name(c, "name", &t->name);
	if (rc)
		return rc;
	snprintf(c->what, sizeof(c->what), "tensor info %" PRIu64 " (%s)", i,
		 t->name);
	rc = cur_u32(c, "n_dims", &t->n_dims);
	if (rc)
		return rc;
	if (t->n_dims < 1 || t->n_dims > KVQ_GGUF_MAX_DIMS)
		return parse_err(c, -EINVAL, "%s: n_dims %" PRIu32 " is not in 1..%d",
				 c->what, t->n_dims, KVQ_GGUF_MAX_DIMS);
	for (d = 0; d < KVQ_GGUF_MAX_DIMS; d++) {
		t->ne[d] = 1;
		if (d < t->n_dims) {
			rc = cur_u64(c, "dimension", &t->ne[d]);
			if (rc)
				return rc;
		}
	}
	rc = cur_u32(c, "type", &type);
	if (rc)
		return rc;
	rc = cur_u64(c, "offset", &t->offset);
	if (rc)
		return rc;
	return check_shape(c, t, type);
}

/* Tensor data inside the file and aligned; sets data. */
static int place_tensor(struct gguf_cursor *c, const struct kvq_gguf *g,
			struct kvq_gguf_tensor *t, uint64_t i)
{
	uint64_t room = g->size - g->data_offset;

	if (t->offset % g->alignment)
		return parse_err(c, -EINVAL,
				 "tensor %" PRIu64 " (%s): data offset %" PRIu64 " is not a multiple of the alignment %" PRIu32,
				 i, t->name, t->offset, g->alignment);
	if (t->offset > room || t->nbytes > room - t->offset)
		return parse_err(c, -EINVAL,
				 "truncated: tensor %" PRIu64 " (%s) data (%" PRIu64 " bytes at file offset %" PRIu64 " + %" PRIu64 ") extends past end of file (size %" PRIu64 ")",
				 i, t->name, t->nbytes, g->data_offset,
				 t->offset, g->size);
	t->data = (const uint8_t *)g->map + g->data_offset + t->offset;
	return 0;
}

static int cmp_tensor_name(const void *a, const void *b)
{
	const struct kvq_gguf_tensor *const *x = a, *const *y = b;

	return strcmp((*x)->name, (*y)->name);
}

static int cmp_name_tensor(const void *key, const void *elem)
{
	const struct kvq_gguf_tensor *const *e = elem;

	return strcmp(key, (*e)->name);
}

static int cmp_tensor_offset(const void *a, const void *b)
{
	const struct kvq_gguf_tensor *const *x = a, *const *y = b;

	if ((*x)->offset != (*y)->offset)
		return (*x)->offset < (*y)->offset ? -1 : 1;
	return *x < *y ? -1 : *x > *y;
}

static int check_overlap(struct gguf_cursor *c, struct kvq_gguf *g)
{
	struct kvq_gguf_tensor **by_off, *a, *b;
	uint64_t i;
	int rc = 0;

	if (g->n_tensors < 2)
		return 0;
	by_off = malloc(g->n_tensors * sizeof(*by_off));
	if (!by_off)
		return parse_err(c, -ENOMEM, "out of memory");
	for (i = 0; i < g->n_tensors; i++)
		by_off[i] = &g->tensors[i];
	qsort(by_off, g->n_tensors, sizeof(*by_off), cmp_tensor_offset);
	for (i = 1; i < g->n_tensors; i++) {
		a = by_off[i - 1];
		b = by_off[i];
		/* a->offset + a->nbytes <= size: no overflow */
		if (a->offset + a->nbytes > b->offset) {
			rc = parse_err(c, -EINVAL,
				       "tensors %s (%" PRIu64 " bytes at %" PRIu64 ") and %s (at %" PRIu64 ") overlap",
				       a->name, a->nbytes, a->offset, b->name,
				       b->offset);
			break;
		}
	}
	free(by_off);
	return rc;
}

static int index_tensors(struct gguf_cursor *c, struct gguf_file *f)
{
	struct kvq_gguf *g = &f->pub;
	struct kvq_gguf_tensor **idx;
	uint64_t i;

	idx = malloc((g->n_tensors ? g->n_tensors : 1) * sizeof(*idx));
	if (!idx)
		return parse_err(c, -ENOMEM, "out of memory");
	f->t_by_name = idx;
	for (i = 0; i < g->n_tensors; i++)
		idx[i] = &g->tensors[i];
	qsort(idx, g->n_tensors, sizeof(*idx), cmp_tensor_name);
	for (i = 1; i < g->n_tensors; i++)
		if (!strcmp(idx[i - 1]->name, idx[i]->name))
			return parse_err(c, -EINVAL,
					 "duplicate tensor name \"%s\" (tensor %td and tensor %td)",
					 idx[i]->name, idx[i - 1] - g->tensors,
					 idx[i] - g->tensors);
	return 0;
}

/* ----------------------------------------------------------- header */

static int parse_header(struct gguf_cursor *c, struct kvq_gguf *g,
			uint64_t *n_tensors, uint64_t *n_kv)
{
	const uint8_t *p = c->base;
	uint32_t v;
	int rc;

	snprintf(c->what, sizeof(c->what), "header");
	if (c->size < 4)
		return truncated(c, "magic");
	if (memcmp(p, GGUF_MAGIC, 4))
		return parse_err(c, -EINVAL,
				 "bad magic %02x %02x %02x %02x (not a GGUF file)",
				 p[0], p[1], p[2], p[3]);
	c->pos = 4;
	rc = cur_u32(c, "version", &v);
	if (rc)
		return rc;
	if (v == 1)
		return parse_err(c, -ENOTSUP,
				 "GGUF v1 is not supported (file predates v2, which widened counts and lengths to 64 bits; convert it again)");
	/* a big-endian file has the version's bytes in the high half */
	if (!(v & 0xffff) && __builtin_bswap32(v) >= 1 &&
	    __builtin_bswap32(v) <= 3)
		return parse_err(c, -ENOTSUP,
				 "big-endian GGUF (version %" PRIu32 " with its bytes swapped) is not supported; only little-endian files are",
				 __builtin_bswap32(v));
	if (v != 2 && v != 3)
		return parse_err(c, -ENOTSUP,
				 "GGUF version %" PRIu32 " is not supported (only v2 and v3)",
				 v);
	g->version = v;
	rc = cur_u64(c, "tensor count", n_tensors);
	if (rc)
		return rc;
	rc = cur_u64(c, "kv count", n_kv);
	if (rc)
		return rc;

	if (*n_kv > left(c) / GGUF_MIN_KV_BYTES)
		return parse_err(c, -EINVAL,
				 "truncated: %" PRIu64 " kv pairs cannot fit in the file (size %" PRIu64 ")",
				 *n_kv, c->size);
	if (*n_tensors > (left(c) - *n_kv * GGUF_MIN_KV_BYTES) /
			 GGUF_MIN_TENSOR_BYTES)
		return parse_err(c, -EINVAL,
				 "truncated: %" PRIu64 " tensor infos cannot fit in the file (size %" PRIu64 ")",
				 *n_tensors, c->size);
	return 0;
}

/* --------------------------------------------------------- the pass */

static int gguf_parse(struct gguf_file *f, char *err, size_t errlen)
{
	struct kvq_gguf *g = &f->pub;
	struct gguf_cursor c = {
		.path = g->path,
		.base = g->map,
		.size = g->size,
		.err = err,
		.errlen = errlen,
	};
	uint64_t n_tensors, n_kv, i, pad;
	int rc;

	rc = parse_header(&c, g, &n_tensors, &n_kv);
	if (rc)
		return rc;

	/* both counts are bounded by the file size, so are these */
	g->kv = calloc(n_kv ? n_kv : 1, sizeof(*g->kv));
	g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(*g->tensors));
	if (!g->kv || !g->tensors)
		return parse_err(&c, -ENOMEM, "out of memory");
	g->n_kv = n_kv;
	g->n_tensors = n_tensors;

	for (i = 0; i < n_kv; i++) {
		rc = parse_kv(&c, i, &g->kv[i]);
		if (rc)
			return rc;
	}
	rc = index_kv(&c, f);
	if (rc)
		return rc;
	rc = read_alignment(&c, g);
	if (rc)
		return rc;

	for (i = 0; i < n_tensors; i++) {
		rc = parse_tensor(&c, i, &g->tensors[i]);
		if (rc)
			return rc;
	}

	pad = (g->alignment - c.pos % g->alignment) % g->alignment;
	if (pad > left(&c)) {
		/*
		 * Writers may leave out the padding when no tensor data
		 * follows; data_offset then stays at the end of the file.
		 */
		if (n_tensors)
			return parse_err(&c, -EINVAL,
					 "truncated: padding before tensor data at %" PRIu64 " extends past end of file (size %" PRIu64 ")",
					 c.pos, c.size);
		pad = left(&c);
	}
	g->data_offset = c.pos + pad;

	for (i = 0; i < n_tensors; i++) {
		rc = place_tensor(&c, g, &g->tensors[i], i);
		if (rc)
			return rc;
	}
	rc = index_tensors(&c, f);
	if (rc)
		return rc;
	return check_overlap(&c, g);
}

/* ------------------------------------------------------ open, close */

static void gguf_free(struct gguf_file *f)
{
	struct kvq_gguf *g = &f->pub;
	uint64_t i;

	if (g->kv) {
		for (i = 0; i < g->n_kv; i++) {
			free(g->kv[i].key);
			if (g->kv[i].type == KVQ_GGUF_ARRAY)
				free(g->kv[i].v.arr.str_offsets);
		}
		free(g->kv);
	}
	if (g->tensors) {
		for (i = 0; i < g->n_tensors; i++)
			free(g->tensors[i].name);
		free(g->tensors);
	}
	free(f->kv_by_key);
	free(f->t_by_name);
	if (g->map)
		munmap(g->map, g->size);
	free(g->path);
	free(f);
}

/* -errno after a failed call, never 0 even if errno was left unset. */
static int neg_errno(void)
{
	return errno ? -errno : -EIO;
}

/* Maps @path read-only; the descriptor is closed before returning. */
static int gguf_map(const char *path, void **map, size_t *size, char *err,
		    size_t errlen)
{
	struct stat st;
	int fd, rc;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		rc = neg_errno();
		return open_err(err, errlen, path, rc, "cannot open: %s",
				strerror(-rc));
	}
	if (fstat(fd, &st) < 0) {
		rc = neg_errno();
		open_err(err, errlen, path, rc, "cannot stat: %s",
			 strerror(-rc));
		goto out_close;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = open_err(err, errlen, path, -EINVAL,
			      "not a regular file");
		goto out_close;
	}
	if (st.st_size == 0) {
		rc = open_err(err, errlen, path, -EINVAL,
			      "truncated: file is empty");
		goto out_close;
	}
	if ((uint64_t)st.st_size > SIZE_MAX) {
		rc = open_err(err, errlen, path, -EFBIG,
			      "too large to map (%jd bytes)",
			      (intmax_t)st.st_size);
		goto out_close;
	}
	*map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (*map == MAP_FAILED) {
		rc = neg_errno();
		open_err(err, errlen, path, rc, "cannot map: %s",
			 strerror(-rc));
		goto out_close;
	}
	*size = (size_t)st.st_size;
	rc = 0;
out_close:
	close(fd);
	return rc;
}

/*
 * kvq_gguf_open() - map @path read-only and validate every byte of its
 * structure.  Takes nothing from the caller; on success the reader owns the
 * mapping and every copy it made, and kvq_gguf_close() releases them all.  On
 * failure nothing stays allocated or mapped and *out is untouched.
 */
int kvq_gguf_open(const char *path, struct kvq_gguf **out, char *err,
		  size_t errlen)
{
	struct gguf_file *f;
	size_t size = 0;
	void *map = NULL;
	int rc;

	rc = gguf_map(path, &map, &size, err, errlen);
	if (rc)
		return rc;

	f = calloc(1, sizeof(*f));
	if (!f) {
		rc = open_err(err, errlen, path, -ENOMEM, "out of memory");
		goto out_unmap;
	}
	f->pub.map = map;	/* from here gguf_free() unmaps */
	f->pub.size = size;
	f->pub.path = strdup(path);
	if (!f->pub.path) {
		rc = open_err(err, errlen, path, -ENOMEM, "out of memory");
		goto out_free;
	}
	rc = gguf_parse(f, err, errlen);
	if (rc)
		goto out_free;
	*out = &f->pub;
	return 0;

out_free:
	gguf_free(f);
	return rc;
out_unmap:
	munmap(map, size);
	return rc;
}

/* kvq_gguf_close() - unmap and free @g and everything it returned; NULL is
 * a no-op.  Pointers into the mapping are invalid afterwards. */
void kvq_gguf_close(struct kvq_gguf *g)
{
	if (g)
		gguf_free((struct gguf_file *)to_file(g));
}

/* ---------------------------------------------------------- lookups */

const struct kvq_gguf_kv *kvq_gguf_find(const struct kvq_gguf *g,
					const char *key)
{
	struct kvq_gguf_kv **hit;

	if (!g || !key || !g->n_kv)
		return NULL;
	hit = bsearch(key, to_file(g)->kv_by_key, g->n_kv,
		      sizeof(*hit), cmp_key_kv);
	return hit ? *hit : NULL;
}

const struct kvq_gguf_tensor *kvq_gguf_tensor(const struct kvq_gguf *g,
					      const char *name)
{
	struct kvq_gguf_tensor **hit;

	if (!g || !name || !g->n_tensors)
		return NULL;
	hit = bsearch(name, to_file(g)->t_by_name, g->n_tensors,
		      sizeof(*hit), cmp_name_tensor);
	return hit ? *hit : NULL;
}

/* ---------------------------------------------------------- getters */

static int kv_u64(const struct kvq_gguf_kv *kv, uint64_t *out)
{
	switch (kv->type) {
	case KVQ_GGUF_U8:
	case KVQ_GGUF_U16:
	case KVQ_GGUF_U32:
	case KVQ_GGUF_U64:
		*out = kv->v.u64;
		return 0;
	case KVQ_GGUF_I8:
	case KVQ_GGUF_I16:
	case KVQ_GGUF_I32:
	case KVQ_GGUF_I64:
		if (kv->v.i64 < 0)
			return -EINVAL;
		*out = (uint64_t)kv->v.i64;
		return 0;
	default:
		return -EINVAL;
	}
}

int kvq_gguf_get_u64(const struct kvq_gguf *g, const char *key, uint64_t *out)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, key);

	if (!kv)
		return -ENOENT;
	return kv_u64(kv, out);
}

int kvq_gguf_get_u32(const struct kvq_gguf *g, const char *key, uint32_t *out)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, key);
	uint64_t v;
	int rc;

	if (!kv)
		return -ENOENT;
	rc = kv_u64(kv, &v);
	if (rc)
		return rc;
	if (v > UINT32_MAX)
		return -EINVAL;
	*out = (uint32_t)v;
	return 0;
}

int kvq_gguf_get_f32(const struct kvq_gguf *g, const char *key, float *out)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, key);

	if (!kv)
		return -ENOENT;
	switch (kv->type) {
	case KVQ_GGUF_F32:
	case KVQ_GGUF_F64:
		/* an F64 that a float cannot hold is an error, not inf */
		if (isfinite(kv->v.f64) && fabs(kv->v.f64) > FLT_MAX)
			return -EINVAL;
		*out = (float)kv->v.f64;
		return 0;
	case KVQ_GGUF_U8:
	case KVQ_GGUF_U16:
	case KVQ_GGUF_U32:
	case KVQ_GGUF_U64:
		*out = (float)kv->v.u64;
		return 0;
	case KVQ_GGUF_I8:
	case KVQ_GGUF_I16:
	case KVQ_GGUF_I32:
	case KVQ_GGUF_I64:
		*out = (float)kv->v.i64;
		return 0;
	default:
		return -EINVAL;
	}
}

int kvq_gguf_get_bool(const struct kvq_gguf *g, const char *key, bool *out)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, key);

	if (!kv)
		return -ENOENT;
	if (kv->type != KVQ_GGUF_BOOL)
		return -EINVAL;
	*out = kv->v.u64 != 0;
	return 0;
}

int kvq_gguf_get_str(const struct kvq_gguf *g, const char *key,
		     const char **out, uint64_t *len)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, key);

	if (!kv)
		return -ENOENT;
	if (kv->type != KVQ_GGUF_STRING)
		return -EINVAL;
	*out = kv->v.str.ptr;
	*len = kv->v.str.len;
	return 0;
}

const struct kvq_gguf_kv *kvq_gguf_get_arr(const struct kvq_gguf *g,
					   const char *key)
{
	const struct kvq_gguf_kv *kv = kvq_gguf_find(g, key);

	return kv && kv->type == KVQ_GGUF_ARRAY ? kv : NULL;
}

struct kvq_gguf_str kvq_gguf_arr_str(const struct kvq_gguf *g,
				     const struct kvq_gguf_kv *kv, uint64_t i)
{
	struct kvq_gguf_str s = { NULL, 0 };
	const uint8_t *p;

	/* cheap to check, and a wrong index should not read anywhere */
	if (!g || !kv || kv->type != KVQ_GGUF_ARRAY ||
	    kv->v.arr.type != KVQ_GGUF_STRING || i >= kv->v.arr.n)
		return s;
	p = (const uint8_t *)g->map + kv->v.arr.str_offsets[i];
	s.len = le64(p);
	s.ptr = (const char *)p + 8;
	return s;
}
