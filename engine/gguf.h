/*
 * gguf.h - read-only view of a GGUF v2/v3 file.
 *
 * Why this file exists: every model, vocabulary and Fisher sidecar kvqd reads
 * is a GGUF file.  The reader maps the file and validates every count, length,
 * offset, alignment and type against the file size before anything else in
 * kvqd touches it, so the rest of the engine may trust what it gets here.
 *
 * All strings and arrays returned point into the mapping (strings are NOT
 * NUL-terminated in the file; use the len field) except kv keys and tensor
 * names, which are copied and NUL-terminated for convenience.
 */
#ifndef KVQ_GGUF_H
#define KVQ_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ggml tensor types (numbering from the GGUF specification). */
enum kvq_type {
	KVQ_TYPE_F32 = 0,
	KVQ_TYPE_F16 = 1,
	KVQ_TYPE_Q4_0 = 2,
	KVQ_TYPE_Q4_1 = 3,
	KVQ_TYPE_Q5_0 = 6,
	KVQ_TYPE_Q5_1 = 7,
	KVQ_TYPE_Q8_0 = 8,
	KVQ_TYPE_Q8_1 = 9,
	KVQ_TYPE_Q2_K = 10,
	KVQ_TYPE_Q3_K = 11,
	KVQ_TYPE_Q4_K = 12,
	KVQ_TYPE_Q5_K = 13,
	KVQ_TYPE_Q6_K = 14,
	KVQ_TYPE_Q8_K = 15,
	KVQ_TYPE_IQ2_XXS = 16,
	KVQ_TYPE_IQ2_XS = 17,
	KVQ_TYPE_IQ3_XXS = 18,
	KVQ_TYPE_IQ1_S = 19,
	KVQ_TYPE_IQ4_NL = 20,
	KVQ_TYPE_IQ3_S = 21,
	KVQ_TYPE_IQ2_S = 22,
	KVQ_TYPE_IQ4_XS = 23,
	KVQ_TYPE_I8 = 24,
	KVQ_TYPE_I16 = 25,
	KVQ_TYPE_I32 = 26,
	KVQ_TYPE_I64 = 27,
	KVQ_TYPE_F64 = 28,
	KVQ_TYPE_IQ1_M = 29,
	KVQ_TYPE_BF16 = 30,
	KVQ_TYPE_TQ1_0 = 34,
	KVQ_TYPE_TQ2_0 = 35,
	KVQ_TYPE_MXFP4 = 39,
	KVQ_TYPE_COUNT = 40,
};

/* Metadata value types. */
enum kvq_gguf_vtype {
	KVQ_GGUF_U8 = 0,
	KVQ_GGUF_I8 = 1,
	KVQ_GGUF_U16 = 2,
	KVQ_GGUF_I16 = 3,
	KVQ_GGUF_U32 = 4,
	KVQ_GGUF_I32 = 5,
	KVQ_GGUF_F32 = 6,
	KVQ_GGUF_BOOL = 7,
	KVQ_GGUF_STRING = 8,
	KVQ_GGUF_ARRAY = 9,
	KVQ_GGUF_U64 = 10,
	KVQ_GGUF_I64 = 11,
	KVQ_GGUF_F64 = 12,
	KVQ_GGUF_VTYPE_COUNT = 13,
};

#define KVQ_GGUF_MAX_DIMS 4
#define KVQ_GGUF_DEFAULT_ALIGNMENT 32

struct kvq_gguf_str {
	const char *ptr;	/* into the mapping, not NUL-terminated */
	uint64_t len;
};

struct kvq_gguf_kv {
	char *key;			/* NUL-terminated copy */
	enum kvq_gguf_vtype type;
	union {
		uint64_t u64;		/* any unsigned integer type, bool */
		int64_t i64;		/* any signed integer type */
		double f64;		/* F32 and F64 */
		struct kvq_gguf_str str;
		struct {
			enum kvq_gguf_vtype type; /* element type, never ARRAY */
			uint64_t n;
			const void *data; /* first element in the mapping */
			/*
			 * For STRING arrays: offsets of each element's length
			 * prefix (n entries), validated; NULL otherwise.
			 */
			uint64_t *str_offsets;
		} arr;
	} v;
};

struct kvq_gguf_tensor {
	char *name;			/* NUL-terminated copy */
	uint32_t n_dims;
	uint64_t ne[KVQ_GGUF_MAX_DIMS];	/* ne[0] is the row length; unused = 1 */
	enum kvq_type type;
	uint64_t offset;		/* relative to the data section */
	uint64_t n_elements;
	uint64_t nbytes;
	const void *data;		/* into the mapping */
};

struct kvq_gguf {
	char *path;
	void *map;
	size_t size;
	uint32_t version;
	uint64_t n_kv;
	struct kvq_gguf_kv *kv;
	uint64_t n_tensors;
	struct kvq_gguf_tensor *tensors;
	uint32_t alignment;
	uint64_t data_offset;		/* file offset of the tensor data section */
};

/* Properties of a tensor type: name ("Q4_K"), elements per block, bytes per
 * block.  Returns NULL for a number that is not a known ggml type. */
struct kvq_type_info {
	const char *name;
	uint32_t block_elems;
	uint32_t block_bytes;
};
const struct kvq_type_info *kvq_type_info(uint32_t type);
/* "Q4_K", or "unknown" for a number that is not a known ggml type. */
const char *kvq_type_name(uint32_t type);
/* Bytes of a row of n elements; 0 when n is not a multiple of the block,
 * the type is unknown or the size does not fit in 64 bits. */
uint64_t kvq_type_row_bytes(uint32_t type, uint64_t n);

/*
 * kvq_gguf_open() - map and validate @path.
 * On success returns 0 and stores a new reader in *out (free with
 * kvq_gguf_close()).  On failure returns -errno (-EINVAL for a malformed
 * file, -ENOTSUP for what the format allows but this reader refuses: v1,
 * big-endian files, other versions, arrays of arrays) and writes one line
 * naming the file and what is wrong into @err (may be NULL); *out is left
 * unchanged.
 */
int kvq_gguf_open(const char *path, struct kvq_gguf **out, char *err,
		  size_t errlen);
void kvq_gguf_close(struct kvq_gguf *g);

/* Lookups; NULL when absent. */
const struct kvq_gguf_kv *kvq_gguf_find(const struct kvq_gguf *g,
					const char *key);
const struct kvq_gguf_tensor *kvq_gguf_tensor(const struct kvq_gguf *g,
					      const char *name);

/*
 * Typed getters.  Each returns 0 and stores the value, -ENOENT when the key
 * is absent, -EINVAL when it has a type that cannot be converted (integers
 * convert between widths when the value fits; floats accept F32/F64 and
 * integers).  Nothing is stored on failure.
 */
int kvq_gguf_get_u64(const struct kvq_gguf *g, const char *key, uint64_t *out);
int kvq_gguf_get_u32(const struct kvq_gguf *g, const char *key, uint32_t *out);
int kvq_gguf_get_f32(const struct kvq_gguf *g, const char *key, float *out);
int kvq_gguf_get_bool(const struct kvq_gguf *g, const char *key, bool *out);
/* String value; *out points into the mapping, *len its length. */
int kvq_gguf_get_str(const struct kvq_gguf *g, const char *key,
		     const char **out, uint64_t *len);
/* Array of any element type: returns the kv (NULL if absent or not an
 * array). */
const struct kvq_gguf_kv *kvq_gguf_get_arr(const struct kvq_gguf *g,
					   const char *key);
/* Element i of a STRING array (i < n checked by the caller). */
struct kvq_gguf_str kvq_gguf_arr_str(const struct kvq_gguf *g,
				     const struct kvq_gguf_kv *kv, uint64_t i);

#endif /* KVQ_GGUF_H */
