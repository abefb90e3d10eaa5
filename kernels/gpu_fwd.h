/*
 * gpu_fwd.h - the plain-C face of the GPU forward pass (kernels/gpu_fwd.cu).
 *
 * Why this file exists: on a GPU host the whole step runs on the device:
 * weights are uploaded once, activations and the paged KV cache stay in
 * device memory, and a step costs one upload of its small index arrays,
 * the kernels (replayed as a CUDA graph once a decode shape repeats) and
 * one download of the logits.  The engine (engine/forward_gpu.c) keeps the
 * page bookkeeping (block tables, reference counts) on the host and hands
 * this file plain arrays; no CUDA type appears here.
 *
 * Weights arrive in one of three device formats:
 *   F16  row-major halves, rows padded to a multiple of 32 elements
 *   F32  the same in floats (f32 models stay exact)
 *   Q8   int8 [rows][cols] and f16 scales [rows][cols/32] (GGUF Q8_0
 *        blocks taken apart so that 16-byte loads stay aligned)
 *   Q4   16 bytes a 32-block [rows][cols/32][16] (GGUF Q4_0's nibble
 *        order: element j in the low nibble of byte j, j+16 in the high
 *        one, value (q - 8) * d) and f16 scales [rows][cols/32]
 * Every function returns 0 or -errno with a one-line reason in @err.
 */
#ifndef KVQ_GPU_FWD_H
#define KVQ_GPU_FWD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum kvq_gpu_wtype {
	KVQ_GPU_W_F16 = 0,
	KVQ_GPU_W_Q8 = 1,	/* Q8_0: int8 rows, f16 scales apart */
	KVQ_GPU_W_Q4 = 2,	/* Q4_0: nibble rows, f16 scales apart */
	KVQ_GPU_W_F32 = 3,
	/* Q4_K: nibble rows as Q4, a pair of floats a 32 columns apart
	 * (d * sc and -(dmin * m) of the sub-block) */
	KVQ_GPU_W_Q4K = 4,
	/* Q6_K, or a stack of Q4_K and Q6_K: int8 rows, a pair of floats a
	 * 16 columns apart (d * scale and -0; a Q4_K row's pair as Q4K's) */
	KVQ_GPU_W_Q8K = 5,
};

/* Matrices of a layer (QKV stacks wq, wk, wv by rows; GATEUP stacks
 * w_gate over w_up), and the model-wide ones (layer -1). */
enum kvq_gpu_mslot {
	KVQ_GPU_M_QKV = 0,
	KVQ_GPU_M_O,
	KVQ_GPU_M_GATEUP,
	KVQ_GPU_M_DOWN,
	KVQ_GPU_M_NLAYER,
	KVQ_GPU_M_EMBED = 8,	/* layer -1 */
	KVQ_GPU_M_OUTPUT,	/* layer -1 */
};

/* f32 vectors: norms of a layer, the stacked q/k/v bias, the output norm
 * (layer -1). */
enum kvq_gpu_vslot {
	KVQ_GPU_V_ATTN_NORM = 0,
	KVQ_GPU_V_FFN_NORM,
	KVQ_GPU_V_QKV_BIAS,
	KVQ_GPU_V_NLAYER,
	KVQ_GPU_V_OUTPUT_NORM = 8,	/* layer -1 */
};

struct kvq_gpu_model_desc {
	uint32_t n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim;
	uint32_t n_vocab;
	uint32_t rope_dim;
	int rope_neox;
	float rope_base;
	float rms_eps;
};

struct kvq_gpu_model;

int kvq_gpu_model_create(const struct kvq_gpu_model_desc *d,
			 struct kvq_gpu_model **out, char *err, size_t errlen);
void kvq_gpu_model_destroy(struct kvq_gpu_model *g);
/*
 * Uploads a matrix of @rows x @cols in @wtype: F16 (F32) @data holds
 * rows*cols halves (floats), unpadded; Q8 @data rows*cols int8 and @scales
 * rows*cols/32 halves; Q4 @data rows*cols/2 bytes and @scales likewise;
 * Q4K @data as Q4's and @scales rows*cols/32 pairs of floats (scale,
 * offset); Q8K @data as Q8's and @scales rows*cols/16 such pairs.
 */
int kvq_gpu_model_set_matrix(struct kvq_gpu_model *g, int layer, int slot,
			     int wtype, uint32_t rows, uint32_t cols,
			     const void *data, const void *scales,
			     char *err, size_t errlen);
/* The output projection is the embedding table. */
void kvq_gpu_model_tie_output(struct kvq_gpu_model *g);
int kvq_gpu_model_set_vector(struct kvq_gpu_model *g, int layer, int slot,
			     const float *v, uint32_t n, char *err,
			     size_t errlen);
/* Device bytes of the weights; and of those a decode step reads (all
 * but the embedding table, of which it reads one row a token). */
uint64_t kvq_gpu_model_bytes(const struct kvq_gpu_model *g);
uint64_t kvq_gpu_model_step_bytes(const struct kvq_gpu_model *g);
/* Checks that every slot the step needs was set. */
int kvq_gpu_model_ready(const struct kvq_gpu_model *g, char *err,
			size_t errlen);

struct kvq_gpu_ctx_desc {
	uint32_t max_batch;	/* tokens of one step */
	uint32_t max_seqs;	/* sequence slots (sink copies) and batch entries */
	uint32_t bt_stride;	/* block-table entries of one sequence */
	uint32_t n_pages, page_tokens, n_sink;
	uint32_t max_ctx;	/* longest sequence */
	const uint8_t *type_k, *type_v;	/* per layer, enum kvq_kv_type */
	const size_t *k_page_bytes, *v_page_bytes;	/* per layer */
	int use_graphs;		/* replay decode steps as CUDA graphs */
	/* Steps of up to this many tokens (1-16) keep f16 products off
	 * tensor cores; 0: the measured default. */
	uint32_t mv_max;
	/* Key centring (engine/kvcache.h): NULL, or per layer NULL (not
	 * centred) or [n_kv_heads][head_dim] pre-RoPE centres for the
	 * model's RoPE, copied to the device by kvq_gpu_ctx_create(). */
	const float *const *k_center;
	/* The int8 dot mode (engine/quant.h's kvq_quant_dot_mode()): 1, the
	 * one-token gate/up products of 8- and 4-bit rows quantize x to int8
	 * per 32 columns and multiply in integers; 2, every one-token product
	 * of such rows does (slower on the H200: for tests); 0, or steps of
	 * several tokens, or f16 and f32 rows: exact. */
	int dot_int8;
};

struct kvq_gpu_ctx;

int kvq_gpu_ctx_create(struct kvq_gpu_model *g,
		       const struct kvq_gpu_ctx_desc *d,
		       struct kvq_gpu_ctx **out, char *err, size_t errlen);
void kvq_gpu_ctx_destroy(struct kvq_gpu_ctx *c);
/* Device bytes of the KV pages, sinks and activations. */
uint64_t kvq_gpu_ctx_bytes(const struct kvq_gpu_ctx *c);
/* Copies page @src to @dst in every layer (copy on write). */
int kvq_gpu_ctx_copy_page(struct kvq_gpu_ctx *c, int32_t dst, int32_t src);
/* Copies slot @src's sink copies to slot @dst (a fork); waits for it. */
int kvq_gpu_ctx_copy_sinks(struct kvq_gpu_ctx *c, uint32_t dst, uint32_t src);
/* Zeroes sequence slot @slot's sink copies (a new sequence). */
int kvq_gpu_ctx_clear_sinks(struct kvq_gpu_ctx *c, uint32_t slot);

/*
 * One step.  Rows are the new tokens of every batch entry, entry by entry;
 * row r belongs to entry row_seq[r] at position pos[r].  Entry b's pages
 * are block_table[b * bt_stride ...] (reserved by the caller), its length
 * after the step seq_len[b], and its sink copies live in slot seq_slot[b].
 * @rope_cs holds n_tok * rope_dim/2 (cos, sin) pairs
 * (kvq_attn_ref_rope_table()).  Logits of rows out_rows[0..n_out) land in
 * @logits (host, n_out * n_vocab floats).
 */
struct kvq_gpu_sample_params;

struct kvq_gpu_step {
	uint32_t n_tok, n_seqs, n_out;
	const int32_t *tokens, *pos, *row_seq;
	const int32_t *seq_slot, *block_table, *seq_len;
	const int32_t *out_rows;
	const float *rope_cs;
	float *logits;		/* n_out rows back to the host, or NULL */
	/* When @ids is set: output row i's token, chosen on the device by
	 * kvq_gpu_sample() with settings sample[i] and uniform sample_u[i]
	 * (n_out of each, host memory). */
	const struct kvq_gpu_sample_params *sample;
	const float *sample_u;
	int32_t *ids;
};

int kvq_gpu_forward(struct kvq_gpu_ctx *c, const struct kvq_gpu_step *s,
		    char *err, size_t errlen);

/* Counters: steps run, of which replayed graphs; graphs captured. */
struct kvq_gpu_stats {
	uint64_t steps, graph_steps, graphs;
	uint64_t sampled_rows;	/* tokens chosen by the device sampler */
	int decode_kernel;	/* 1: the fused split-KV kernel serves decode */
	int dot_int8;		/* the descriptor's dot_int8 (0-2) */
	/* In that mode, the longest rows (columns) of a one-token product
	 * that stayed exact: more than 16384 columns (8192 for SwiGLU's
	 * pairs), or not of 32-column blocks (0: none). */
	uint32_t q8a_exact_cols;
	/* CUDA graphs that could not be made (e.g. device memory full when
	 * one is instantiated): decode then launches kernel by kernel and
	 * captures no more.  graph_error: the last reason. */
	uint64_t graph_failures;
	char graph_error[96];
	/* Products of more than 4 tokens with f16 weights: 1 while cuBLAS
	 * runs them on tensor cores, 0 when the tiled kernel does (HIP,
	 * KVQ_GPU_NO_CUBLAS, no f16 weights, or cuBLAS failed: counted in
	 * blas_failures, the last reason in blas_error). */
	int prompt_blas;
	uint32_t blas_above;	/* products of more tokens than this */
	/* and up to this many tokens (0: none) in one pass over the weights
	 * (gpu_blas.cu's skinny kernel), not through cuBLAS */
	uint32_t skinny_max;
	uint64_t blas_failures;
	char blas_error[96];
	/* Device time of the steps, each from its first upload to its last
	 * copy back (events): against the steps' wall time, what the host's
	 * turn between steps leaves idle. */
	double busy_us;
};
void kvq_gpu_ctx_stats(const struct kvq_gpu_ctx *c, struct kvq_gpu_stats *st);

/*
 * The context's pinned host buffer of *@rows rows of n_vocab floats,
 * where a step's logits arrive: a step whose @logits is this buffer
 * leaves them there (no copy on the host; 128 KiB a row at a 32000-token
 * vocabulary), until the next step.
 */
float *kvq_gpu_ctx_logits(struct kvq_gpu_ctx *c, uint32_t *rows);

/*
 * For benchmarks: fills positions [from, to) of the sequence whose pages
 * are @pages with pseudo-random keys and values (as if appended), in every
 * layer, without running the model.
 */
int kvq_gpu_ctx_fill_random(struct kvq_gpu_ctx *c, const int32_t *pages,
			    uint32_t n_pages, uint32_t slot, uint32_t from,
			    uint32_t to, uint32_t seed);

#ifdef __cplusplus
}
#endif

#endif /* KVQ_GPU_FWD_H */
