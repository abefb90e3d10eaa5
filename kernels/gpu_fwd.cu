/*
 * gpu_fwd.cu - the forward pass on the GPU: weights, activations and the
 * paged KV cache in device memory, one stream, CUDA graphs for decode.
 *
 * Why this file exists: a decode step reads every weight once; on a GPU
 * that is a few hundred microseconds, so the step must not pay host round
 * trips or launch latency per operation.  Activations stay f32 (as on the
 * CPU path, so greedy output matches it), weights (placed by
 * gpu_model.cu) are f32, f16 or kept 8/4-bit (Q8/Q4, dequantized in
 * registers), and the per-layer work is six to nine kernels: RMSNorm
 * (at one token none: the residual add before writes x * g and the next
 * product scales by 1 / rms, see mv_kernel()), the stacked QKV product
 * (which rotates the queries itself for adjacent-pair RoPE up to 16
 * tokens; else a RoPE kernel follows), the fused rotate-quantize-append of
 * K and V (attn_append.cu), attention (attn_decode.cu for decode at
 * head_dim 64 and 128, attn_prefill.cu for steps of 16 prompt rows and
 * more at those sizes, attn_split.cu for the rest), the output projection
 * with the residual add, RMSNorm, gate and up with SwiGLU, and the down
 * projection with the residual add.
 *
 * The kernels are in kernels/gpu_fwd_kernels.h; this file plans the step,
 * owns the device memory and launches them.
 *
 * Matrix products: a warp streams a weight row with 16-byte loads and
 * dots it with every token (decode is bound by weight bytes): f16 weights
 * up to mv_max tokens (1), the other formats up to 16.  More tokens of f16
 * weights go to tensor cores (gpu_blas.cu): up to 16 in one pass over the
 * weights with the RMSNorm or SwiGLU before the product folded into its
 * input pass, more through cuBLAS.  The rest, on HIP, and with
 * KVQ_GPU_NO_CUBLAS set, go through a shared-memory tiled product.
 * Kernels are launched as programmatic dependents (sm_90): each lets the
 * next one launch at its start and waits for the one before only when it
 * needs its results, so launch latency hides behind the kernel before.
 * Plain-C twins: the CPU engine (engine/backend_cpu.c) computes the same
 * step; tests/gpu/test_gpu_fwd.c compares the two.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/gpu_compat.h"
#include "kernels/attn.h"
#include "kernels/gpu_fwd.h"
#include "kernels/gpu_fwd_impl.h"
#include "kernels/gpu_fwd_kernels.h"
#include "kernels/gpu_blas.h"
#include "kernels/sample.h"
#include "engine/kvcache.h"

namespace {

constexpr int MV_MAXBLAS = 1;	/* tokens the small product takes when
				 * tensor cores serve f16 weights */
constexpr int MAX_GRAPHS = 48;

bool g_pdl;		/* programmatic dependent launches (launch()) */

/* ---------------------------------------------------------------- ctx */

enum { PROF_EMBED, PROF_NORM, PROF_QKV, PROF_ROPE, PROF_APPEND, PROF_ATTN,
       PROF_O, PROF_GATEUP, PROF_DOWN, PROF_OUTPUT, PROF_N };
const char *const prof_names[PROF_N] = {
	"embed", "rmsnorm", "qkv", "rope", "append", "attention", "wo",
	"gate_up", "down", "output",
};

struct graph_ent {
	uint32_t n_tok, n_seqs, n_out, bucket;
	cudaGraphExec_t exec;
	uint64_t last;
};

/* Offsets (bytes) of the per-step arrays in the staging buffers. */
struct stage_layout {
	size_t tokens, pos, row_seq, seq_len, out_rows, sinkp;	/* part 1 */
	size_t part1;
	size_t cs, bt;
	size_t smp, su, ids;	/* sampling settings and draws; tokens */
	size_t total;
};

} /* namespace */

struct kvq_gpu_ctx {
	struct kvq_gpu_model *g;
	struct kvq_gpu_ctx_desc d;
	uint8_t *type_k, *type_v;
	size_t *kpb, *vpb;
	uint8_t **kpages, **vpages;	/* per layer */
	float *ctr;		/* key centres on the device, or NULL */
	const float **kctr;	/* per layer: into ctr, or NULL (not centred) */
	uint16_t *sinks;	/* [slot][layer][k|v][n_sink][kvd] */
	size_t sink_per_slot;	/* elements */
	cudaStream_t st;
	/* activations */
	float *x, *xn, *qkv, *qb, *kb, *vb, *att, *gu, *h, *logits;
	uint32_t xs, qkvs, qs, as, gus, hs;
	void *ws;
	size_t ws_bytes;
	float *aws;		/* split attention partials */
	size_t aws_bytes;
	bool fast_decode;	/* the split-KV kernel serves every layer */
	/* It also appends the step's K and V rows (no append launch before
	 * it); KVQ_GPU_NO_FUSED_APPEND=1: the append kernel, to compare. */
	bool fused_append;
	/* f16 products of more than mv_max tokens, when stats.prompt_blas
	 * is set (it is cleared when cuBLAS fails: the tiled kernel) */
	struct kvq_gpu_blas *blas;
	/* 8/4-bit rows (Q8, Q4, Q4_K, Q6_K) of a product of more than 16
	 * tokens, expanded to their f16 values exp_rows at a time for cuBLAS
	 * (NULL: none) */
	__half *exp_f16;
	uint32_t exp_rows;
	/* Largest token count the small product takes while gpu_blas.cu
	 * serves; more go to tensor cores (its one-pass kernel up to 16
	 * tokens, cuBLAS beyond).  H200, 1B F16, q4/q4, 1K, tokens/s, small
	 * product -> tensor cores, three runs: batch 2 1557-1573 -> 1755-1780,
	 * 3 about 2640 either way (bench/gpu_decode_notes.md).  The
	 * descriptor's mv_max (KVQ_GPU_MV_MAX) sets it. */
	uint32_t mv_max;
	/*
	 * RMSNorm inside the small products (mv_kernel()): norm_next is the
	 * norm after the next EPI_ADD product, which then writes x * g into
	 * xn; norm_ready the norm whose x * g xn holds for the rows of x.
	 * fused_norm: KVQ_GPU_NO_FUSED_NORM unset.
	 */
	const float *norm_next, *norm_ready;
	bool fused_norm;
	/* This step's attention goes to attn_prefill.cu: 16 rows or more,
	 * none of them a sequence's only row.  A decode row there costs
	 * more than in the split kernel (H200, 1B, q4/q4, every decode step
	 * through it: batch 1 at 32K 679 -> 416 tok/s, at 1K 1000 -> 885),
	 * so a step that mixes a prompt chunk with decode rows stays with
	 * the split kernel. */
	bool tc_prompt;
	const char *mm_fail;	/* why a product of this step failed, or NULL */
	bool fault_graph;	/* KVQ_GPU_FAULT=graph: instantiation fails */
	stage_layout sl;
	uint8_t *hstage, *dstage;
	float *hlogits;
	graph_ent graphs[MAX_GRAPHS];
	uint32_t n_graphs;
	uint64_t clock;
	struct kvq_gpu_stats stats;
	uint64_t bytes;
	/* the previous decode key, seen once: captured when seen again */
	uint32_t seen_key[4];
	/* KVQ_GPU_PROFILE: events between the kernels of a step (no graphs) */
	bool prof;
	cudaEvent_t pev[512];
	int pcat[512];
	int npev;
	double pms[PROF_N];
	uint64_t psteps;
	/* A step's first upload and last copy: its device time (stats) */
	cudaEvent_t sev[2];
	bool sev_ok;
};

static void mark(struct kvq_gpu_ctx *c, int cat)
{
	if (!c->prof || c->npev >= 512)
		return;
	cudaEventRecord(c->pev[c->npev], c->st);
	c->pcat[c->npev++] = cat;
}

extern "C" void kvq_gpu_ctx_destroy(struct kvq_gpu_ctx *c)
{
	uint32_t l, i;

	if (!c)
		return;
	if (c->st)
		cudaStreamSynchronize(c->st);
	if (c->prof) {
		const char *pf = getenv("KVQ_GPU_PROFILE");
		FILE *f = pf && *pf == '/' ? fopen(pf, "a") : nullptr;
		double tot = 0.0;

		if (!f)
			f = stderr;
		for (i = 0; i < PROF_N; i++)
			tot += c->pms[i];
		fprintf(f, "kvqd gpu profile over %llu steps, us per step:",
			(unsigned long long)c->psteps);
		for (i = 0; i < PROF_N; i++)
			fprintf(f, " %s %.1f", prof_names[i],
				c->psteps ? c->pms[i] * 1e3 / c->psteps : 0.0);
		fprintf(f, " total %.1f\n",
			c->psteps ? tot * 1e3 / c->psteps : 0.0);
		if (f != stderr)
			fclose(f);
		for (i = 0; i < 512; i++)
			cudaEventDestroy(c->pev[i]);
	}
	if (c->sev_ok) {
		cudaEventDestroy(c->sev[0]);
		cudaEventDestroy(c->sev[1]);
	}
	for (i = 0; i < c->n_graphs; i++)
		cudaGraphExecDestroy(c->graphs[i].exec);
	kvq_gpu_blas_destroy(c->blas);
	cudaFree(c->exp_f16);
	for (l = 0; c->kpages && l < c->g->d.n_layers; l++) {
		cudaFree(c->kpages[l]);
		cudaFree(c->vpages[l]);
	}
	cudaFree(c->sinks);
	cudaFree(c->x);
	cudaFree(c->xn);
	cudaFree(c->qkv);
	cudaFree(c->qb);
	cudaFree(c->kb);
	cudaFree(c->vb);
	cudaFree(c->att);
	cudaFree(c->gu);
	cudaFree(c->h);
	cudaFree(c->logits);
	cudaFree(c->ws);
	cudaFree(c->aws);
	cudaFree(c->dstage);
	if (c->hstage)
		cudaFreeHost(c->hstage);
	if (c->hlogits)
		cudaFreeHost(c->hlogits);
	if (c->st)
		cudaStreamDestroy(c->st);
	free(c->kpages);
	free(c->vpages);
	cudaFree(c->ctr);
	free(c->kctr);
	free(c->type_k);
	free(c->type_v);
	free(c->kpb);
	free(c->vpb);
	free(c);
}

static size_t al256(size_t n)
{
	return (n + 255) & ~(size_t)255;
}

/* Decode-kernel arguments of layer @l for a batch of @batch at @max_len
 * (pointers filled by the caller where it launches). */
static void decode_args(const struct kvq_gpu_ctx *c, uint32_t l,
			uint32_t batch, uint32_t max_len,
			struct kvq_gpu_attn_args *a)
{
	const struct kvq_gpu_model_desc *d = &c->g->d;

	memset(a, 0, sizeof(*a));
	a->q_type = KVQ_GPU_F32;
	a->out_type = KVQ_GPU_F32;
	a->k_page_bytes = c->kpb[l];
	a->v_page_bytes = c->vpb[l];
	a->k_type = c->type_k[l];
	a->v_type = c->type_v[l];
	a->bt_stride = c->d.bt_stride;
	a->max_len = max_len;
	a->n_sink = c->d.n_sink;
	a->batch = batch;
	a->n_q_heads = d->n_heads;
	a->n_kv_heads = d->n_kv_heads;
	a->head_dim = d->head_dim;
	a->page_tokens = c->d.page_tokens;
	a->scale = 1.0f / sqrtf((float)d->head_dim);
}

static uint32_t len_bucket(uint32_t n, uint32_t max_ctx)
{
	uint32_t b = 256;

	while (b < n)
		b *= 2;
	(void)max_ctx;
	return b;
}

/*
 * cuBLAS for the products of more than mv_max tokens with f16 weights,
 * where a step can have them: unless KVQ_GPU_NO_CUBLAS is set (the tiled
 * kernel then serves, to compare the two) or the build has no BLAS (HIP).
 * Should cuBLAS not start, the tiled kernel serves and the stats say why
 * (the engine logs it, kvqctl status shows it); KVQ_GPU_FAULT=cublas makes
 * that happen, for tests.  Device memory that cannot be had fails the
 * context, as for every other buffer.
 */
static int blas_setup(struct kvq_gpu_ctx *c, char *err, size_t errlen)
{
	const struct kvq_gpu_model *g = c->g;
	size_t i, nm = (size_t)g->d.n_layers * KVQ_GPU_M_NLAYER, bytes = 0;
	const char *fault = getenv("KVQ_GPU_FAULT");
	uint32_t max_ld = 0, exp_cols = 0, exp_max = 0;
	char why[256];
	int ret;

	for (i = 0; i <= nm; i++) {
		const dmat *m = i < nm ? &g->m[i] : &g->output;

		if (m->type != KVQ_GPU_W_F32 && m->ld > max_ld)
			max_ld = m->ld;
		if (m->type != KVQ_GPU_W_F16 && m->type != KVQ_GPU_W_F32 &&
		    m->rows) {
			exp_cols = m->cols > exp_cols ? m->cols : exp_cols;
			exp_max = m->rows > exp_max ? m->rows : exp_max;
		}
	}
	c->fused_norm = !getenv("KVQ_GPU_NO_FUSED_NORM");
	c->mv_max = c->d.mv_max >= 1 && c->d.mv_max <= MV_MAXT ?
		    c->d.mv_max : MV_MAXBLAS;
	if (!KVQ_GPU_BLAS || !max_ld || c->d.max_batch <= c->mv_max ||
	    getenv("KVQ_GPU_NO_CUBLAS"))
		return 0;
	if (fault && !strcmp(fault, "cublas"))
		ret = set_err(why, sizeof(why), -EIO,
			      "cublasCreate: injected (KVQ_GPU_FAULT=cublas)");
	else
		ret = kvq_gpu_blas_create(c->st, c->d.max_batch, max_ld,
					  &c->blas, &bytes, why, sizeof(why));
	if (ret == -ENOMEM)
		return set_err(err, errlen, ret, "%s", why);
	if (ret) {
		snprintf(c->stats.blas_error, sizeof(c->stats.blas_error),
			 "%s", why);
		c->stats.blas_failures++;
		return 0;
	}
	if (exp_cols) {
		/* 64 MiB of f16 rows at most, a multiple of 16 of them. */
		uint32_t r = (uint32_t)((64u << 20) / (2 * (size_t)exp_cols)) & ~15u;

		c->exp_rows = r < 16 ? 16 : r > exp_max ? (exp_max + 15) & ~15u : r;
		ret = dalloc((void **)&c->exp_f16,
			     (size_t)c->exp_rows * exp_cols * 2,
			     "f16 rows of 8- and 4-bit weights for prompts", err, errlen);
		if (ret) {
			kvq_gpu_blas_destroy(c->blas);
			c->blas = nullptr;
			return ret;
		}
		bytes += (size_t)c->exp_rows * exp_cols * 2;
	}
	c->stats.prompt_blas = 1;
	c->stats.blas_above = c->mv_max;
	c->stats.skinny_max = kvq_gpu_blas_skinny_max(c->blas);
	c->bytes += bytes;
	return 0;
}

/* Device copies of the key centres of the layers that have them
 * (kvq_gpu_ctx_desc.k_center), made here: a step never allocates. */
static int upload_centers(struct kvq_gpu_ctx *c, const float *const *ctr,
			  char *err, size_t errlen)
{
	const struct kvq_gpu_model_desc *md = &c->g->d;
	size_t kvd = (size_t)md->n_kv_heads * md->head_dim;
	uint32_t L = md->n_layers, l;
	int ret;

	c->kctr = (const float **)calloc(L, sizeof(*c->kctr));
	if (!c->kctr)
		return set_err(err, errlen, -ENOMEM, "out of memory");
	ret = dalloc((void **)&c->ctr, L * kvd * 4, "key centres", err, errlen);
	if (ret)
		return ret;
	c->bytes += L * kvd * 4;
	for (l = 0; l < L; l++) {
		if (!ctr[l])
			continue;
		if (cudaMemcpy(c->ctr + l * kvd, ctr[l], kvd * 4,
			       cudaMemcpyHostToDevice) != cudaSuccess)
			return set_err(err, errlen, -EIO,
				       "cannot copy the key centres to the device: %s",
				       cudaGetErrorString(cudaGetLastError()));
		c->kctr[l] = c->ctr + l * kvd;
	}
	return 0;
}

extern "C" int kvq_gpu_ctx_create(struct kvq_gpu_model *g,
				  const struct kvq_gpu_ctx_desc *d,
				  struct kvq_gpu_ctx **out, char *err,
				  size_t errlen)
{
	const struct kvq_gpu_model_desc *md = &g->d;
	uint32_t L = md->n_layers, qd = md->n_heads * md->head_dim;
	uint32_t kvd = md->n_kv_heads * md->head_dim, B = d->max_batch, l;
	uint32_t G = md->n_heads / md->n_kv_heads;
	struct kvq_gpu_ctx *c;
	stage_layout *sl;
	int ret;

	ret = kvq_gpu_model_ready(g, err, errlen);
	if (ret)
		return ret;
	if (!B || !d->max_seqs || !d->bt_stride || !d->n_pages ||
	    !d->page_tokens || d->n_sink > d->page_tokens)
		return set_err(err, errlen, -EINVAL, "GPU context: bad sizes");
	for (l = 0; l < L; l++) {
		if (d->type_k[l] >= KVQ_KV_NTYPES || d->type_v[l] >= KVQ_KV_NTYPES)
			return set_err(err, errlen, -EINVAL,
				       "GPU context: bad KV type");
		if ((d->type_k[l] >= KVQ_KV_Q8 || d->type_v[l] >= KVQ_KV_Q8) &&
		    (md->head_dim >= 32 ? md->head_dim % 32 :
		     (md->head_dim & (md->head_dim - 1)) || md->head_dim < 4))
			return set_err(err, errlen, -EOPNOTSUPP,
				       "the GPU KV append cannot quantize heads of %u channels",
				       md->head_dim);
	}
	if (!kvq_gpu_attn_split_workspace_bytes(1, md->n_heads, md->n_kv_heads,
						md->head_dim))
		return set_err(err, errlen, -EOPNOTSUPP,
			       "the GPU backend supports head_dim 8 to 256 (a power of two) and up to 16 query heads per KV head, 8 at 256 (model: %u, %u)",
			       md->head_dim, G);
	c = (struct kvq_gpu_ctx *)calloc(1, sizeof(*c));
	if (!c)
		return set_err(err, errlen, -ENOMEM, "out of memory");
	c->g = g;
	c->d = *d;
	c->stats.dot_int8 = d->dot_int8;
	c->type_k = (uint8_t *)malloc(L);
	c->type_v = (uint8_t *)malloc(L);
	c->kpb = (size_t *)malloc(L * sizeof(size_t));
	c->vpb = (size_t *)malloc(L * sizeof(size_t));
	c->kpages = (uint8_t **)calloc(L, sizeof(uint8_t *));
	c->vpages = (uint8_t **)calloc(L, sizeof(uint8_t *));
	if (!c->type_k || !c->type_v || !c->kpb || !c->vpb || !c->kpages ||
	    !c->vpages) {
		ret = set_err(err, errlen, -ENOMEM, "out of memory");
		goto fail;
	}
	memcpy(c->type_k, d->type_k, L);
	memcpy(c->type_v, d->type_v, L);
	memcpy(c->kpb, d->k_page_bytes, L * sizeof(size_t));
	memcpy(c->vpb, d->v_page_bytes, L * sizeof(size_t));
	c->d.type_k = c->type_k;
	c->d.type_v = c->type_v;
	c->d.k_page_bytes = c->kpb;
	c->d.v_page_bytes = c->vpb;
	c->d.k_center = nullptr;	/* the caller's; c->kctr from here on */
	{
		cudaError_t e = cudaStreamCreateWithFlags(&c->st,
							  cudaStreamNonBlocking);
		size_t fr = 0, tot = 0;

		if (e != cudaSuccess) {
			c->st = nullptr;
			cudaGetLastError();
			cudaMemGetInfo(&fr, &tot);
			ret = set_err(err, errlen,
				      e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO,
				      "cannot create a CUDA stream: %s (device memory: %.1f MiB free of %.1f MiB)",
				      cudaGetErrorString(e), fr / 1048576.0,
				      tot / 1048576.0);
			goto fail;
		}
	}
	for (l = 0; l < L; l++) {
		ret = dalloc((void **)&c->kpages[l], c->kpb[l] * d->n_pages,
			     "KV cache pages", err, errlen);
		if (!ret)
			ret = dalloc((void **)&c->vpages[l],
				     c->vpb[l] * d->n_pages, "KV cache pages",
				     err, errlen);
		if (ret)
			goto fail;
		c->bytes += (c->kpb[l] + c->vpb[l]) * d->n_pages;
	}
	if (d->k_center) {
		ret = upload_centers(c, d->k_center, err, errlen);
		if (ret)
			goto fail;
	}
	c->sink_per_slot = (size_t)L * 2 * d->n_sink * kvd;
	if (d->n_sink) {
		size_t nb = c->sink_per_slot * d->max_seqs * 2;

		ret = dalloc((void **)&c->sinks, nb, "KV sink copies", err,
			     errlen);
		if (ret)
			goto fail;
		cudaMemset(c->sinks, 0, nb);
		c->bytes += nb;
	}
	c->xs = pad32(md->dim);
	c->qkvs = qd + 2 * kvd;
	c->qs = pad32(qd);
	c->as = pad32(qd);
	c->gus = 2 * md->ffn_dim;
	c->hs = pad32(md->ffn_dim);
	{
		struct {
			float **p;
			size_t n;
		} bufs[] = {
			{ &c->x, (size_t)B * c->xs }, { &c->xn, (size_t)B * c->xs },
			{ &c->qkv, (size_t)B * c->qkvs }, { &c->qb, (size_t)B * c->qs },
			{ &c->kb, (size_t)B * kvd }, { &c->vb, (size_t)B * kvd },
			{ &c->att, (size_t)B * c->as }, { &c->gu, (size_t)B * c->gus },
			{ &c->h, (size_t)B * c->hs },
			{ &c->logits, (size_t)B * md->n_vocab },
		};

		for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++) {
			ret = dalloc((void **)bufs[i].p, bufs[i].n * 4,
				     "activations", err, errlen);
			if (ret)
				goto fail;
			/* Padding columns stay zero: products read them. */
			cudaMemset(*bufs[i].p, 0, bufs[i].n * 4);
			c->bytes += bufs[i].n * 4;
		}
	}
	/* The split-KV decode kernel, where every layer's shape suits it. */
	c->fast_decode = true;
	c->fused_append = !getenv("KVQ_GPU_NO_FUSED_APPEND");
	for (l = 0; l < L; l++) {
		struct kvq_gpu_attn_args a;

		decode_args(c, l, 1, len_bucket(d->max_ctx, d->max_ctx), &a);
		if (!kvq_gpu_attn_workspace_bytes(&a))
			c->fast_decode = false;
	}
	if (c->fast_decode) {
		uint32_t b;

		for (l = 0; l < L; l++) {
			for (b = 1; b <= d->max_seqs; b++) {
				struct kvq_gpu_attn_args a;
				size_t w;

				decode_args(c, l, b, len_bucket(d->max_ctx,
								d->max_ctx), &a);
				w = kvq_gpu_attn_workspace_bytes(&a);
				if (w > c->ws_bytes)
					c->ws_bytes = w;
			}
		}
		ret = dalloc(&c->ws, c->ws_bytes, "attention workspace", err,
			     errlen);
		if (ret)
			goto fail;
		cudaMemset(c->ws, 0, c->ws_bytes);
		c->bytes += c->ws_bytes;
	}
	c->stats.decode_kernel = c->fast_decode;
	c->aws_bytes = kvq_gpu_attn_split_workspace_bytes(B, md->n_heads,
							  md->n_kv_heads,
							  md->head_dim);
	ret = dalloc((void **)&c->aws, c->aws_bytes, "attention partials", err,
		     errlen);
	if (ret)
		goto fail;
	c->bytes += c->aws_bytes;
	ret = blas_setup(c, err, errlen);
	if (ret)
		goto fail;
	sl = &c->sl;
	sl->tokens = 0;
	sl->pos = al256(sl->tokens + (size_t)B * 4);
	sl->row_seq = al256(sl->pos + (size_t)B * 4);
	sl->out_rows = al256(sl->row_seq + (size_t)B * 4);
	sl->seq_len = al256(sl->out_rows + (size_t)B * 4);
	sl->sinkp = al256(sl->seq_len + (size_t)d->max_seqs * 4);
	sl->part1 = al256(sl->sinkp + (size_t)L * d->max_seqs * sizeof(void *));
	sl->cs = sl->part1;
	sl->bt = al256(sl->cs + (size_t)B * (md->rope_dim / 2 + 1) * 8);
	sl->smp = al256(sl->bt + (size_t)d->max_seqs * d->bt_stride * 4);
	sl->su = sl->smp + (size_t)B * sizeof(struct kvq_gpu_sample_params);
	sl->ids = al256(sl->su + (size_t)B * 4);
	sl->total = al256(sl->ids + (size_t)B * 4);
	ret = dalloc((void **)&c->dstage, sl->total, "step arrays", err,
		     errlen);
	if (ret)
		goto fail;
	if (cudaMallocHost((void **)&c->hstage, sl->total) != cudaSuccess ||
	    cudaMallocHost((void **)&c->hlogits,
			   (size_t)B * md->n_vocab * 4) != cudaSuccess) {
		c->hstage = nullptr;
		ret = set_err(err, errlen, -ENOMEM,
			      "cannot allocate pinned host memory for step arrays");
		goto fail;
	}
	memset(c->hstage, 0, sl->total);
	g_pdl = kvq_pdl_allowed();
	c->fault_graph = getenv("KVQ_GPU_FAULT") &&
			 !strcmp(getenv("KVQ_GPU_FAULT"), "graph");
	c->sev_ok = cudaEventCreate(&c->sev[0]) == cudaSuccess;
	if (c->sev_ok && cudaEventCreate(&c->sev[1]) != cudaSuccess) {
		cudaEventDestroy(c->sev[0]);
		c->sev_ok = false;
	}
	if (getenv("KVQ_GPU_PROFILE")) {
		c->prof = true;
		c->d.use_graphs = 0;
		for (l = 0; l < 512; l++)
			cudaEventCreate(&c->pev[l]);
	}
	if (cudaDeviceSynchronize() != cudaSuccess) {
		ret = set_err(err, errlen, -EIO, "GPU context: %s",
			      cudaGetErrorString(cudaGetLastError()));
		goto fail;
	}
	*out = c;
	return 0;
fail:
	kvq_gpu_ctx_destroy(c);
	return ret;
}

extern "C" uint64_t kvq_gpu_ctx_bytes(const struct kvq_gpu_ctx *c)
{
	return c->bytes;
}

extern "C" void kvq_gpu_ctx_stats(const struct kvq_gpu_ctx *c,
				  struct kvq_gpu_stats *st)
{
	*st = c->stats;
}

extern "C" float *kvq_gpu_ctx_logits(struct kvq_gpu_ctx *c, uint32_t *rows)
{
	*rows = c->d.max_batch;
	return c->hlogits;
}

extern "C" int kvq_gpu_ctx_copy_page(struct kvq_gpu_ctx *c, int32_t dst,
				     int32_t src)
{
	uint32_t l;

	for (l = 0; l < c->g->d.n_layers; l++) {
		copy_page_kernel<<<32, 256, 0, c->st>>>(c->kpages[l], c->kpb[l],
							dst, src);
		copy_page_kernel<<<32, 256, 0, c->st>>>(c->vpages[l], c->vpb[l],
							dst, src);
	}
	return cudaStreamSynchronize(c->st) == cudaSuccess ? 0 : -EIO;
}

extern "C" int kvq_gpu_ctx_copy_sinks(struct kvq_gpu_ctx *c, uint32_t dst,
				      uint32_t src)
{
	if (!c->sinks || dst == src)
		return 0;
	if (dst >= c->d.max_seqs || src >= c->d.max_seqs)
		return -EINVAL;
	if (cudaMemcpyAsync(c->sinks + c->sink_per_slot * dst,
			    c->sinks + c->sink_per_slot * src,
			    c->sink_per_slot * 2, cudaMemcpyDeviceToDevice,
			    c->st) != cudaSuccess)
		return -EIO;
	return cudaStreamSynchronize(c->st) == cudaSuccess ? 0 : -EIO;
}

extern "C" int kvq_gpu_ctx_clear_sinks(struct kvq_gpu_ctx *c, uint32_t slot)
{
	if (!c->sinks || slot >= c->d.max_seqs)
		return 0;
	return cudaMemsetAsync(c->sinks + c->sink_per_slot * slot, 0,
			       c->sink_per_slot * 2, c->st) == cudaSuccess ?
	       0 : -EIO;
}

/* Launches @k on @st, a programmatic dependent when g_pdl is set. */
template <typename... KA, typename... A>
static void launch(void (*k)(KA...), dim3 grid, dim3 block, size_t smem,
		   cudaStream_t st, A... args)
{
	kvq_launch(g_pdl, k, grid, block, smem, st, args...);
}

/* @T tokens go through the small product (its epilogues included). */
static bool small_product(const struct kvq_gpu_ctx *c, uint32_t T)
{
	return T <= MV_MAXT && (T <= c->mv_max || !c->stats.prompt_blas);
}

/*
 * Warps sharing each row of the small product of @w at @n tokens (KS of
 * mv_kernel()): one for short rows; for rows of 4096 and up, and at one
 * token of 2048 and up, the block (more loads in flight; measured +1% at
 * 1B), except two for the QKV product (its RoPE pairs stay in a block)
 * and, at one token, two for the output projection (EPI_ADD of short
 * rows) and for gate/up of f16 or 8/4-bit rows (whose rows row_dot_h1()
 * reads together), and one for the vocabulary product (rows by the ten
 * thousand): fewer, fuller blocks.  H200, 1B F16, q4/q4, batch 1, three
 * alternating runs: the output projection and the vocabulary +0.9% each
 * at 1K, +0.5% at 32K (one warp a row for the output projection lost 2%);
 * row_dot_h1() +1.6% at 1K and 32K, two warps for gate/up +1.3% more
 * (one: +0.8%).
 */
static int mv_warps_a_row(const struct kvq_gpu_ctx *c, const dmat &w,
			  uint32_t n, int epi)
{
	if (!(w.cols >= 4096 || (n == 1 && w.cols >= 2048)))
		return 1;
	if (epi == EPI_QKV)
		return 2;
	if (n == 1 && &w == &c->g->output)
		return 1;
	if (n == 1 && w.cols < 4096 &&
	    (epi == EPI_ADD || (epi == EPI_SWIGLU && w.type != KVQ_GPU_W_F32)))
		return 2;
	return MV_WARPS;
}

/* @n tokens of @w go to gpu_blas.cu's skinny tensor-core product. */
static bool skinny(const struct kvq_gpu_ctx *c, const dmat &w, uint32_t n)
{
	return !small_product(c, n) && c->stats.prompt_blas &&
	       kvq_gpu_blas_skinny(c->blas, &w, n);
}

/* A product through gpu_blas.cu; a failure fails the step and sends the
 * products to the tiled kernel from then on (as a cuBLAS one does). */
static int blas_result(struct kvq_gpu_ctx *c, int ret)
{
	if (!ret)
		return 0;
	c->stats.prompt_blas = 0;
	c->stats.blas_failures++;
	c->mm_fail = c->stats.blas_error;
	return -EIO;
}

/* y (+)= W f(x) on the skinny product; f: in (KVQ_SKINNY_*); with @qkv,
 * the rows go there instead of y. */
static int skinny_mm(struct kvq_gpu_ctx *c, const dmat &w, const float *x,
		     uint32_t xs, const int32_t *xrows, int in,
		     const float *norm, float *y, uint32_t ys, uint32_t n,
		     bool add, const float *bias,
		     const struct qkv_out *qkv = nullptr, bool swiglu = false)
{
	struct kvq_gpu_skinny_mm a;

	memset(&a, 0, sizeof(a));
	a.w = &w;
	a.x = x;
	a.xs = xs;
	a.xrows = xrows;
	a.in = in;
	a.norm = norm;
	a.eps = c->g->d.rms_eps;
	a.y = y;
	a.ys = ys;
	a.n = n;
	a.add = add;
	a.bias = bias;
	a.qkv = qkv;
	a.swiglu = swiglu;
	a.q8a = c->d.dot_int8 != 0;
	c->norm_ready = c->norm_next = nullptr;
	return blas_result(c, kvq_gpu_blas_skinny_mm(c->blas, &a,
			   c->stats.blas_error, sizeof(c->stats.blas_error)));
}

/*
 * One token of gate/up over 8- and 4-bit rows with the norm inside,
 * through mv_pairs_kernel(), where its rows take at most four loads a
 * lane: as many blocks as the GPU holds at once, each group at most
 * MV_RUN pairs.  H200, 1B at batch 1 / 1K, against mv_kernel() in the
 * same run: Q8_0 1355-1357 -> 1397-1411 tokens/s, Q4_0 1375-1390 ->
 * 1440-1441 (bench/gpu_decode_notes.md).  QKV's single rows stay with
 * mv_kernel(), and so do f16 pairs: through this kernel neither was
 * faster.
 */
/*
 * Blocks of the one-wave kernel @k for @units units of runs (mv_run): as
 * many as the GPU holds at once (the occupancy API, asked once per kernel
 * through @fit), more where runs would be longer than @upr units, fewer
 * where a group would have none.
 */
template <typename K>
static uint32_t wave_blocks(K k, int &fit, uint32_t units, uint32_t groups,
			    uint32_t upr)
{
	uint32_t nb;

	if (!fit) {
		int n = 0, dev = 0, sms = 0;

		if (cudaGetDevice(&dev) != cudaSuccess ||
		    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
					   dev) != cudaSuccess ||
		    cudaOccupancyMaxActiveBlocksPerMultiprocessor(
			    &n, k, MV_WARPS * 32, 0) != cudaSuccess || n <= 0 ||
		    sms <= 0) {
			cudaGetLastError();
			n = sms = 1;
		}
		fit = n * sms;
	}
	nb = max((uint32_t)fit, (units + groups * upr - 1) / (groups * upr));
	return min(nb, (units + groups - 1) / groups);
}

template <int WT, int KS>
static void mv_pairs_go(const struct kvq_gpu_ctx *c, const mmp &p)
{
	static int fit;

	launch(mv_pairs_kernel<WT, KS, 4>,
	       dim3(wave_blocks(mv_pairs_kernel<WT, KS, 4>, fit, p.out_rows,
				MV_WARPS / KS, MV_RUN)),
	       dim3(MV_WARPS * 32), 0, c->st, p);
}

static bool mv_pairs(const struct kvq_gpu_ctx *c, const dmat &w, int epi,
		     int ks, const mmp &p)
{
	if (epi != EPI_SWIGLU || w.type == KVQ_GPU_W_F16 ||
	    w.type == KVQ_GPU_W_F32 || ks > 2 ||
	    w.cols > 4u * 256u * (uint32_t)ks)
		return false;
	kvq_wt_switch(w.type, [&](auto wt) {
		constexpr int WT = decltype(wt)::value;

		if constexpr (WT != KVQ_GPU_W_F16 && WT != KVQ_GPU_W_F32) {
			if (ks == 2)
				mv_pairs_go<WT, 2>(c, p);
			else
				mv_pairs_go<WT, 1>(c, p);
		}
	});
	return true;
}

/*
 * One token of an 8- or 4-bit product in the int8 dot mode
 * (mv_q8a_kernel()): KS warps a row as cols needs for at most eight
 * chunks a lane (single rows: sixteen past 8192 columns), two at least
 * for SwiGLU's pairs (their weights fetched ahead take twice the
 * registers), one wave of blocks.  false: rows longer than 16384 columns
 * (8192 for pairs, which would spill) or not of 32-column blocks, which
 * stay exact (stats.q8a_exact_cols says so).
 */
template <int WT, int KS, int CH, bool PAIR>
static void mv_q8a_go(const struct kvq_gpu_ctx *c, const mmp &p)
{
	static int fit;
	/* QKV's runs hold whole RoPE pairs */
	uint32_t us = p.epi == EPI_QKV && !PAIR ? 2 : 1;

	launch(mv_q8a_kernel<WT, KS, CH, PAIR>,
	       dim3(wave_blocks(mv_q8a_kernel<WT, KS, CH, PAIR>, fit,
				p.out_rows / us, MV_WARPS / KS, MV_RUN / us)),
	       dim3(MV_WARPS * 32), 0, c->st, p);
}

static bool mv_q8a(struct kvq_gpu_ctx *c, const dmat &w, int epi,
		   const mmp &p)
{
	bool pair = epi == EPI_SWIGLU;
	uint32_t cols = w.cols;
	bool done = false;

	if (!c->d.dot_int8 || w.type == KVQ_GPU_W_F16 ||
	    w.type == KVQ_GPU_W_F32)
		return false;
	/* The other products took longer with int8 x in this kernel
	 * (bench/gpu_decode_notes.md): gate/up only, unless asked. */
	if (c->d.dot_int8 < 2 && epi != EPI_SWIGLU)
		return false;
	if (cols % 32 || cols > (pair ? 8192u : 16384u)) {
		c->stats.q8a_exact_cols = max(c->stats.q8a_exact_cols, cols);
		return false;
	}
	kvq_wt_switch(w.type, [&](auto wt) {
		constexpr int WT = decltype(wt)::value;

		if constexpr (WT != KVQ_GPU_W_F16 && WT != KVQ_GPU_W_F32) {
			if (pair && cols <= 2048)
				mv_q8a_go<WT, 2, 4, true>(c, p);
			else if (pair && cols <= 4096)
				mv_q8a_go<WT, 4, 4, true>(c, p);
			else if (pair)
				mv_q8a_go<WT, 4, 8, true>(c, p);
			else if (cols <= 2048)
				mv_q8a_go<WT, 1, 8, false>(c, p);
			else if (cols <= 4096)
				mv_q8a_go<WT, 2, 8, false>(c, p);
			else if (cols <= 8192)
				mv_q8a_go<WT, 4, 8, false>(c, p);
			else
				mv_q8a_go<WT, 4, 16, false>(c, p);
			done = true;
		}
	});
	return done;
}

/*
 * Launches y = W x with the epilogue, small or tiled by token count.
 * @norm: x is RMSNorm'ed with these weights first (into c->xn); @xrows:
 * token t is row xrows[t] of x (device), or NULL.
 */
static int mm(struct kvq_gpu_ctx *c, const dmat &w, const float *x,
	      uint32_t xs, float *y, uint32_t ys, uint32_t n, int epi,
	      const float *bias, const float *norm = nullptr,
	      const int32_t *xrows = nullptr, const qkv_out *qo = nullptr)
{
	mmp p;
	/* f16 and 8/4-bit weights go to tensor cores; F32 keeps the small
	 * product up to MV_MAXT tokens. */
	bool small = small_product(c, n) ||
		     (n <= MV_MAXT && w.type == KVQ_GPU_W_F32);
	/* x * g already in xn (the product before wrote it): the small
	 * product scales by 1 / rms itself. */
	bool fnorm = norm && small && n == 1 && !xrows && x == c->x &&
		     c->norm_ready == norm && !(w.cols & 3) && !(xs & 3);

	/* The norm goes into the skinny product's input pass. */
	if ((epi == EPI_STORE || epi == EPI_ADD) && skinny(c, w, n))
		return skinny_mm(c, w, x, xs, xrows,
				 norm ? KVQ_SKINNY_NORM : KVQ_SKINNY_PLAIN,
				 norm, y, ys, n, epi == EPI_ADD, bias);
	memset(&p, 0, sizeof(p));
	c->norm_ready = nullptr;
	if (fnorm) {
		p.ssx = x;
		p.ssxs = xs;
		p.eps = c->g->d.rms_eps;
		x = c->xn;
		xs = c->xs;
	} else if (norm) {
		launch(rmsnorm_kernel, dim3(n), dim3(1024), 0, c->st, x, xs,
		       xrows, norm, c->xn, c->xs, w.cols, c->g->d.rms_eps);
		mark(c, PROF_NORM);
		x = c->xn;
		xs = c->xs;
	}
	if (epi == EPI_ADD && small && c->norm_next && y == c->x) {
		p.gn = c->norm_next;
		p.xg = c->xn;
		p.xgs = c->xs;
		c->norm_ready = c->norm_next;
	}
	c->norm_next = nullptr;
	p.w = w;
	p.x = x;
	p.xs = xs;
	p.y = y;
	p.ys = ys;
	p.n = n;
	p.epi = epi;
	p.bias = bias;
	p.out_rows = epi == EPI_SWIGLU ? w.rows / 2 : w.rows;
	if (qo)
		p.q = *qo;
	if (small) {
		int ks = mv_warps_a_row(c, w, n, epi);
		dim3 grid((p.out_rows * ks + MV_WARPS - 1) / MV_WARPS);
		int nt = n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : 16;

		if (n == 1 && mv_q8a(c, w, epi, p))
			return 0;
		if (fnorm && mv_pairs(c, w, epi, ks, p))
			return 0;

/* The norm inside the product only at one token (fnorm needs n == 1); for
 * 8- and 4-bit rows, a kernel of its own for SwiGLU's pairs of rows
 * (mv_kernel()'s NORM). */
#define MV_K(WT, NT, KS) \
		(!fnorm ? mv_kernel<WT, NT, KS, 0> : \
		 epi == EPI_SWIGLU ? mv_kernel<WT, NT, KS, NT == 1 ? 2 : 0> : \
		 mv_kernel<WT, NT, KS, NT != 1 ? 0 : \
			   mv_ahead<WT, NT, KS>() == 1 ? 2 : 1>)
#define MV_GO(WT, NT) \
		do { \
			if (ks == MV_WARPS) \
				launch(MV_K(WT, NT, MV_WARPS), grid, \
				       dim3(MV_WARPS * 32), 0, c->st, p); \
			else if (ks == 2) \
				launch(MV_K(WT, NT, 2), grid, \
				       dim3(MV_WARPS * 32), 0, c->st, p); \
			else \
				launch(MV_K(WT, NT, 1), grid, \
				       dim3(MV_WARPS * 32), 0, c->st, p); \
		} while (0)
#define MV_LAUNCH(WT) \
		switch (nt) { \
		case 1: MV_GO(WT, 1); break; \
		case 2: MV_GO(WT, 2); break; \
		case 4: MV_GO(WT, 4); break; \
		case 8: MV_GO(WT, 8); break; \
		default: MV_GO(WT, 16); break; \
		}
		kvq_wt_switch<true>(w.type, [&](auto wt) {
			MV_LAUNCH(decltype(wt)::value)
		});
#undef MV_LAUNCH
#undef MV_GO
#undef MV_K
		return 0;
	}
	if (epi == EPI_SWIGLU || epi == EPI_QKV)
		return -EINVAL;
	/*
	 * f16 weights go to tensor cores, and so do Q8, Q4, Q4_K and Q6_K
	 * ones as their f16 values, a slice of rows at a time (gpu_blas.cu);
	 * F32 stays in the tiled kernel to stay exact.  A product cuBLAS
	 * refuses fails the step (y may be half updated) and the tiled kernel
	 * takes the products from then on; the stats say why.
	 */
	if (w.type != KVQ_GPU_W_F32 && (w.type == KVQ_GPU_W_F16 || c->exp_f16) &&
	    c->stats.prompt_blas) {
		struct kvq_gpu_blas_mm a = { &w, x, xs, y, ys, n,
					     epi == EPI_ADD, bias, c->exp_f16,
					     c->exp_rows };

		return blas_result(c, kvq_gpu_blas_mm(c->blas, &a,
				   c->stats.blas_error,
				   sizeof(c->stats.blas_error)));
	}
	dim3 grid((w.rows + GT - 1) / GT, (n + GT - 1) / GT);

	launch(gemm_kernel, grid, dim3(256), 0, c->st, p);
	return 0;
}

/* Some sequence of @s has a single row in the step (a decode row). */
static bool one_row_seq(const struct kvq_gpu_step *s)
{
	uint32_t i, run = 1;

	/* A sequence's rows are consecutive (kvq_gpu_forward's contract). */
	for (i = 1; i <= s->n_tok; i++) {
		if (i < s->n_tok && s->row_seq[i] == s->row_seq[i - 1]) {
			run++;
			continue;
		}
		if (run == 1)
			return true;
		run = 1;
	}
	return false;
}

/* Every kernel of one step, on c->st (captured into a graph or not). */
static int launch_step(struct kvq_gpu_ctx *c, uint32_t T, uint32_t n_seqs,
		       uint32_t n_out, bool decode, uint32_t bucket)
{
	struct kvq_gpu_model *g = c->g;
	const struct kvq_gpu_model_desc *md = &g->d;
	uint32_t F = md->ffn_dim, l;
	uint8_t *ds = c->dstage;
	const int32_t *tok = (const int32_t *)(ds + c->sl.tokens);
	const int32_t *pos = (const int32_t *)(ds + c->sl.pos);
	const int32_t *row_seq = (const int32_t *)(ds + c->sl.row_seq);
	const int32_t *seq_len = (const int32_t *)(ds + c->sl.seq_len);
	const int32_t *out_rows = (const int32_t *)(ds + c->sl.out_rows);
	uint16_t *const *sinkp = (uint16_t *const *)(ds + c->sl.sinkp);
	const float *cs = (const float *)(ds + c->sl.cs);
	const int32_t *bt = (const int32_t *)(ds + c->sl.bt);
	int ret;

	c->mm_fail = nullptr;
	c->norm_next = c->norm_ready = nullptr;
	mark(c, -1);
	launch(embed_kernel, dim3(T), dim3(256), 0, c->st, g->embed, tok,
	       c->x, c->xs);
	mark(c, PROF_EMBED);
	for (l = 0; l < md->n_layers; l++) {
		const dmat *m = &g->m[(size_t)l * KVQ_GPU_M_NLAYER];
		float *const *v = &g->v[(size_t)l * KVQ_GPU_V_NLAYER];
		uint16_t *const *lsink = c->d.n_sink ?
			sinkp + (size_t)l * c->d.max_seqs : nullptr;
		const float *lctr = c->kctr ? c->kctr[l] : nullptr;
		struct kvq_gpu_append_args ap;
		qkv_out qo;

		qo.qb = c->qb;
		qo.kb = c->kb;
		qo.vb = c->vb;
		qo.cs = cs;
		qo.qs = c->qs;
		qo.qd = md->n_heads * md->head_dim;
		qo.kvd = md->n_kv_heads * md->head_dim;
		qo.hd = md->head_dim;
		qo.rope_dim = md->rope_dim;
		if (small_product(c, T) && !md->rope_neox) {
			/* The product writes q (rotated), k and v itself. */
			mm(c, m[KVQ_GPU_M_QKV], c->x, c->xs, c->qkv, c->qkvs, T,
			   EPI_QKV, v[KVQ_GPU_V_QKV_BIAS], v[KVQ_GPU_V_ATTN_NORM],
			   nullptr, &qo);
			mark(c, PROF_QKV);
		} else if (skinny(c, m[KVQ_GPU_M_QKV], T) && !md->rope_neox) {
			/* Likewise on tensor cores. */
			skinny_mm(c, m[KVQ_GPU_M_QKV], c->x, c->xs, nullptr,
				  KVQ_SKINNY_NORM, v[KVQ_GPU_V_ATTN_NORM],
				  nullptr, 0, T, false, v[KVQ_GPU_V_QKV_BIAS],
				  &qo);
			mark(c, PROF_QKV);
		} else {
			mm(c, m[KVQ_GPU_M_QKV], c->x, c->xs, c->qkv, c->qkvs, T,
			   EPI_STORE, v[KVQ_GPU_V_QKV_BIAS], v[KVQ_GPU_V_ATTN_NORM]);
			mark(c, PROF_QKV);
			launch(rope_split_kernel, dim3(T, (c->qkvs + 255) / 256),
			       dim3(256), 0, c->st, (const float *)c->qkv, c->qkvs,
			       c->qb, c->qs, c->kb, c->vb, md->n_heads,
			       md->n_kv_heads, md->head_dim, md->rope_dim,
			       md->rope_neox, cs);
		}
		mark(c, PROF_ROPE);
		memset(&ap, 0, sizeof(ap));
		ap.k = c->kb;
		ap.v = c->vb;
		ap.in_type = KVQ_GPU_F32;
		ap.n_rows = T;
		ap.row_seq = row_seq;
		ap.row_pos = pos;
		ap.k_pages = c->kpages[l];
		ap.v_pages = c->vpages[l];
		ap.k_page_bytes = c->kpb[l];
		ap.v_page_bytes = c->vpb[l];
		ap.k_type = c->type_k[l];
		ap.v_type = c->type_v[l];
		ap.block_table = bt;
		ap.bt_stride = c->d.bt_stride;
		ap.sink = lsink;
		ap.n_sink = c->d.n_sink;
		ap.n_kv_heads = md->n_kv_heads;
		ap.head_dim = md->head_dim;
		ap.page_tokens = c->d.page_tokens;
		ap.rope_dim = md->rope_dim;
		ap.rope_base = md->rope_base > 0.0f ? md->rope_base : 10000.0f;
		ap.rope_neox = md->rope_neox;
		ap.rope_cs = cs;
		ap.k_center = lctr;
		/* The fused decode kernel has no key centring; it appends the
		 * rows itself (a row a sequence in a decode step). */
		bool fast = decode && c->fast_decode && !lctr;

		ret = fast && c->fused_append ? 0 :
		      kvq_gpu_attn_append(&ap, c->st);
		if (ret)
			return ret;
		mark(c, PROF_APPEND);
		if (fast) {
			struct kvq_gpu_attn_args a;

			decode_args(c, l, n_seqs, bucket, &a);
			a.append = c->fused_append ? &ap : nullptr;
			a.q = c->qb;
			a.out = c->att;
			a.k_pages = c->kpages[l];
			a.v_pages = c->vpages[l];
			a.block_table = bt;
			a.seq_lens = seq_len;
			a.sink = lsink;
			a.workspace = c->ws;
			a.workspace_bytes = c->ws_bytes;
			ret = kvq_gpu_attn_decode(&a, c->st);
			if (ret)
				return ret;
		} else {
			struct kvq_gpu_split_args sa;

			memset(&sa, 0, sizeof(sa));
			sa.q = c->qb;
			sa.q_stride = c->qs;
			sa.out = c->att;
			sa.out_stride = c->as;
			sa.k_pages = c->kpages[l];
			sa.v_pages = c->vpages[l];
			sa.k_page_bytes = c->kpb[l];
			sa.v_page_bytes = c->vpb[l];
			sa.k_type = c->type_k[l];
			sa.v_type = c->type_v[l];
			sa.row_seq = row_seq;
			sa.row_pos = pos;
			sa.block_table = bt;
			sa.bt_stride = c->d.bt_stride;
			sa.sink = lsink;
			sa.n_sink = c->d.n_sink;
			sa.n_rows = T;
			sa.n_q_heads = md->n_heads;
			sa.n_kv_heads = md->n_kv_heads;
			sa.head_dim = md->head_dim;
			sa.page_tokens = c->d.page_tokens;
			sa.max_len = bucket;
			sa.workspace = c->aws;
			sa.workspace_bytes = c->aws_bytes;
			sa.k_center = lctr;
			sa.rope_dim = md->rope_dim;
			sa.rope_base = md->rope_base;
			sa.rope_neox = md->rope_neox;
			/* Prompt rows on tensor cores where the shape allows
			 * (attn_prefill.cu), else the split kernel. */
			ret = !c->tc_prompt ? -EOPNOTSUPP :
			      kvq_gpu_attn_prefill(&sa, c->st);
			if (ret == -EOPNOTSUPP)
				ret = kvq_gpu_attn_split(&sa, c->st);
			if (ret)
				return ret;
		}
		mark(c, PROF_ATTN);
		/* The FFN norm's x * g comes with the residual add (and the
		 * next layer's attention norm's with the one below). */
		if (c->fused_norm && T == 1)
			c->norm_next = v[KVQ_GPU_V_FFN_NORM];
		mm(c, m[KVQ_GPU_M_O], c->att, c->as, c->x, c->xs, T, EPI_ADD,
		   nullptr);
		mark(c, PROF_O);
		/* The skinny product takes SwiGLU into its input: decided
		 * once, for the gate/up product and the down one alike.  Up
		 * to 8 tokens the gate/up product writes SwiGLU's h itself
		 * and down reads it as it is (no kernel between them). */
		bool skinny_down = skinny(c, m[KVQ_GPU_M_DOWN], T);
		bool sw_h = skinny_down && skinny(c, m[KVQ_GPU_M_GATEUP], T) &&
			    kvq_gpu_blas_skinny_swiglu(c->blas,
						       &m[KVQ_GPU_M_GATEUP], T);

		if (small_product(c, T)) {
			mm(c, m[KVQ_GPU_M_GATEUP], c->x, c->xs, c->h, c->hs, T,
			   EPI_SWIGLU, nullptr, v[KVQ_GPU_V_FFN_NORM]);
		} else if (sw_h) {
			skinny_mm(c, m[KVQ_GPU_M_GATEUP], c->x, c->xs, nullptr,
				  KVQ_SKINNY_NORM, v[KVQ_GPU_V_FFN_NORM], c->h,
				  c->hs, T, false, nullptr, nullptr, true);
		} else {
			mm(c, m[KVQ_GPU_M_GATEUP], c->x, c->xs, c->gu, c->gus,
			   T, EPI_STORE, nullptr, v[KVQ_GPU_V_FFN_NORM]);
			if (!skinny_down)
				launch(swiglu_kernel, dim3((F + 255) / 256, T),
				       dim3(256), 0, c->st,
				       (const float *)c->gu, c->gus, c->h,
				       c->hs, F);
		}
		mark(c, PROF_GATEUP);
		if (c->fused_norm && T == 1 && l + 1 < md->n_layers)
			c->norm_next = g->v[(size_t)(l + 1) * KVQ_GPU_V_NLAYER +
					    KVQ_GPU_V_ATTN_NORM];
		if (sw_h)
			skinny_mm(c, m[KVQ_GPU_M_DOWN], c->h, c->hs, nullptr,
				  KVQ_SKINNY_PLAIN, nullptr, c->x, c->xs, T,
				  true, nullptr);
		else if (skinny_down)
			skinny_mm(c, m[KVQ_GPU_M_DOWN], c->gu, c->gus,
				  nullptr, KVQ_SKINNY_SWIGLU, nullptr, c->x,
				  c->xs, T, true, nullptr);
		else
			mm(c, m[KVQ_GPU_M_DOWN], c->h, c->hs, c->x, c->xs, T,
			   EPI_ADD, nullptr);
		mark(c, PROF_DOWN);
	}
	mm(c, g->output, c->x, c->xs, c->logits, md->n_vocab, n_out,
	   EPI_STORE, nullptr, g->out_norm, out_rows);
	mark(c, PROF_OUTPUT);
	if (c->mm_fail)
		return -EIO;
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}

static graph_ent *graph_find(struct kvq_gpu_ctx *c, uint32_t T, uint32_t ns,
			     uint32_t no, uint32_t bucket)
{
	for (uint32_t i = 0; i < c->n_graphs; i++) {
		graph_ent *e = &c->graphs[i];

		if (e->n_tok == T && e->n_seqs == ns && e->n_out == no &&
		    e->bucket == bucket)
			return e;
	}
	return nullptr;
}

static int graph_capture(struct kvq_gpu_ctx *c, uint32_t T, uint32_t ns,
			 uint32_t no, uint32_t bucket, graph_ent **out)
{
	cudaGraph_t graph;
	cudaGraphExec_t exec;
	graph_ent *e;
	int ret;

	cudaError_t ce;

	if ((ce = cudaStreamBeginCapture(c->st, cudaStreamCaptureModeThreadLocal)) !=
	    cudaSuccess) {
		cudaGetLastError();
		snprintf(c->stats.graph_error, sizeof(c->stats.graph_error),
			 "capture: %s", cudaGetErrorString(ce));
		return -EIO;
	}
	ret = launch_step(c, T, ns, no, true, bucket);
	ce = cudaStreamEndCapture(c->st, &graph);
	if (ce != cudaSuccess || ret) {
		cudaGetLastError();
		if (ce == cudaSuccess)
			cudaGraphDestroy(graph);
		snprintf(c->stats.graph_error, sizeof(c->stats.graph_error),
			 "capture: %s", ret ? "a launch failed" :
			 cudaGetErrorString(ce));
		return ret ? ret : -EIO;
	}
	ce = c->fault_graph ? cudaErrorMemoryAllocation :
	     cudaGraphInstantiate(&exec, graph, 0);
	if (ce != cudaSuccess) {
		cudaGraphDestroy(graph);
		cudaGetLastError();
		snprintf(c->stats.graph_error, sizeof(c->stats.graph_error),
			 "instantiate: %s%s", cudaGetErrorString(ce),
			 c->fault_graph ? " (injected: KVQ_GPU_FAULT=graph)" : "");
		return ce == cudaErrorMemoryAllocation ? -ENOMEM : -EIO;
	}
	cudaGraphDestroy(graph);
	if (c->n_graphs < MAX_GRAPHS) {
		e = &c->graphs[c->n_graphs++];
	} else {
		e = &c->graphs[0];
		for (uint32_t i = 1; i < MAX_GRAPHS; i++)
			if (c->graphs[i].last < e->last)
				e = &c->graphs[i];
		cudaGraphExecDestroy(e->exec);
	}
	e->n_tok = T;
	e->n_seqs = ns;
	e->n_out = no;
	e->bucket = bucket;
	e->exec = exec;
	c->stats.graphs++;
	*out = e;
	return 0;
}

/*
 * Queues the sampling of the step's n_out logits rows on the device: the
 * settings and draws go up, kvq_gpu_sample() picks, the ids come back to
 * the staging buffer (read after the stream's sync).
 */
static int sample_rows(struct kvq_gpu_ctx *c, const struct kvq_gpu_step *s)
{
	uint8_t *hs = c->hstage, *ds = c->dstage;
	size_t n = s->n_out;
	int ret;

	memcpy(hs + c->sl.smp, s->sample, n * sizeof(*s->sample));
	memcpy(hs + c->sl.su, s->sample_u, n * 4);
	if (cudaMemcpyAsync(ds + c->sl.smp, hs + c->sl.smp,
			    c->sl.su + n * 4 - c->sl.smp,
			    cudaMemcpyHostToDevice, c->st) != cudaSuccess)
		return -EIO;
	ret = kvq_gpu_sample(c->logits, s->n_out, c->g->d.n_vocab,
			     (const struct kvq_gpu_sample_params *)(ds + c->sl.smp),
			     (const float *)(ds + c->sl.su),
			     (int32_t *)(ds + c->sl.ids), c->st);
	if (ret)
		return ret;
	if (cudaMemcpyAsync(hs + c->sl.ids, ds + c->sl.ids, n * 4,
			    cudaMemcpyDeviceToHost, c->st) != cudaSuccess)
		return -EIO;
	return 0;
}

extern "C" int kvq_gpu_forward(struct kvq_gpu_ctx *c,
			       const struct kvq_gpu_step *s, char *err,
			       size_t errlen)
{
	const struct kvq_gpu_model_desc *md = &c->g->d;
	uint32_t T = s->n_tok, i, l, maxlen = 0, half = md->rope_dim / 2;
	uint8_t *hs = c->hstage;
	bool decode;
	uint32_t bucket;
	graph_ent *ge = nullptr;
	cudaError_t e;
	int ret = 0;

	if (!T || T > c->d.max_batch || !s->n_seqs ||
	    s->n_seqs > c->d.max_seqs || !s->n_out || s->n_out > T ||
	    (s->ids && (!s->sample || !s->sample_u)))
		return set_err(err, errlen, -EINVAL, "GPU step: bad batch");
	memcpy(hs + c->sl.tokens, s->tokens, T * 4);
	memcpy(hs + c->sl.pos, s->pos, T * 4);
	memcpy(hs + c->sl.row_seq, s->row_seq, T * 4);
	memcpy(hs + c->sl.out_rows, s->out_rows, s->n_out * 4);
	memcpy(hs + c->sl.seq_len, s->seq_len, s->n_seqs * 4);
	for (i = 0; i < s->n_seqs; i++) {
		if ((uint32_t)s->seq_len[i] > maxlen)
			maxlen = (uint32_t)s->seq_len[i];
		if ((uint32_t)s->seq_slot[i] >= c->d.max_seqs)
			return set_err(err, errlen, -EINVAL,
				       "GPU step: bad sequence slot");
	}
	if (c->sinks) {
		uint16_t **sp = (uint16_t **)(hs + c->sl.sinkp);

		for (l = 0; l < md->n_layers; l++)
			for (i = 0; i < s->n_seqs; i++)
				sp[(size_t)l * c->d.max_seqs + i] = c->sinks +
					c->sink_per_slot * s->seq_slot[i] +
					(size_t)l * 2 * c->d.n_sink *
					md->n_kv_heads * md->head_dim;
	}
	memcpy(hs + c->sl.cs, s->rope_cs, (size_t)T * half * 8);
	/*
	 * Of each sequence's block-table row, the pages it has after the
	 * step (no kernel reads past them): one strided copy of the widest
	 * row's count instead of whole rows (a row holds max_ctx / P ids, 32
	 * KiB at 128K tokens of 16).
	 */
	size_t bw = ((size_t)maxlen + c->d.page_tokens - 1) / c->d.page_tokens;
	size_t bp = (size_t)c->d.bt_stride * 4;

	if (bw > c->d.bt_stride)
		bw = c->d.bt_stride;
	if (!bw)
		bw = 1;
	for (i = 0; i < s->n_seqs; i++)
		memcpy(hs + c->sl.bt + i * bp, s->block_table +
		       (size_t)i * c->d.bt_stride, bw * 4);
	if (c->sev_ok)
		cudaEventRecord(c->sev[0], c->st);
	if (cudaMemcpyAsync(c->dstage, hs, c->sl.part1, cudaMemcpyHostToDevice,
			    c->st) != cudaSuccess ||
	    (half && cudaMemcpyAsync(c->dstage + c->sl.cs, hs + c->sl.cs,
				     (size_t)T * half * 8,
				     cudaMemcpyHostToDevice, c->st) !=
	     cudaSuccess) ||
	    cudaMemcpy2DAsync(c->dstage + c->sl.bt, bp, hs + c->sl.bt, bp,
			      bw * 4, s->n_seqs, cudaMemcpyHostToDevice,
			      c->st) != cudaSuccess)
		return set_err(err, errlen, -EIO, "GPU step: upload failed: %s",
			       cudaGetErrorString(cudaGetLastError()));
	decode = T == s->n_seqs;
	bucket = len_bucket(maxlen, c->d.max_ctx);
	c->tc_prompt = !decode && T >= 16 && !one_row_seq(s);
	if (decode && c->d.use_graphs) {
		uint32_t key[4] = { T, s->n_seqs, s->n_out, bucket };

		ge = graph_find(c, T, s->n_seqs, s->n_out, bucket);
		if (!ge && !memcmp(key, c->seen_key, sizeof(key)) &&
		    !c->stats.graph_failures)
			ret = graph_capture(c, T, s->n_seqs, s->n_out, bucket,
					    &ge);
		memcpy(c->seen_key, key, sizeof(key));
		if (ret) {
			/* No graph (device memory, most likely): this step and
			 * the next launch kernel by kernel; the engine logs it
			 * and kvqctl shows it. */
			c->stats.graph_failures++;
			ge = nullptr;
			ret = 0;
		}
	}
	if (ge) {
		ge->last = ++c->clock;
		if (cudaGraphLaunch(ge->exec, c->st) != cudaSuccess)
			return set_err(err, errlen, -EIO,
				       "GPU step: graph launch failed: %s",
				       cudaGetErrorString(cudaGetLastError()));
		c->stats.graph_steps++;
	} else {
		ret = launch_step(c, T, s->n_seqs, s->n_out, decode, bucket);
		if (ret)
			return set_err(err, errlen, ret,
				       "GPU step: a kernel launch failed: %s",
				       c->mm_fail ? c->mm_fail :
				       cudaGetErrorString(cudaGetLastError()));
	}
	c->stats.steps++;
	if (s->ids) {
		ret = sample_rows(c, s);
		if (ret)
			return set_err(err, errlen, ret,
				       "GPU step: sampling failed: %s",
				       cudaGetErrorString(cudaGetLastError()));
	}
	if (s->logits &&
	    cudaMemcpyAsync(c->hlogits, c->logits,
			    (size_t)s->n_out * md->n_vocab * 4,
			    cudaMemcpyDeviceToHost, c->st) != cudaSuccess)
		return set_err(err, errlen, -EIO, "GPU step: download failed");
	if (c->sev_ok)
		cudaEventRecord(c->sev[1], c->st);
	e = cudaStreamSynchronize(c->st);
	if (e != cudaSuccess)
		return set_err(err, errlen, -EIO, "GPU step failed: %s",
			       cudaGetErrorString(e));
	if (c->sev_ok) {
		float ms = 0.0f;

		if (cudaEventElapsedTime(&ms, c->sev[0], c->sev[1]) ==
		    cudaSuccess)
			c->stats.busy_us += ms * 1e3;
	}
	if (s->logits && s->logits != c->hlogits)
		memcpy(s->logits, c->hlogits,
		       (size_t)s->n_out * md->n_vocab * 4);
	if (s->ids) {
		memcpy(s->ids, hs + c->sl.ids, s->n_out * 4);
		c->stats.sampled_rows += s->n_out;
	}
	if (c->prof) {
		for (int e = 1; e < c->npev; e++) {
			float ms = 0.0f;

			cudaEventElapsedTime(&ms, c->pev[e - 1], c->pev[e]);
			c->pms[c->pcat[e]] += ms;
		}
		c->npev = 0;
		c->psteps++;
	}
	return 0;
}

extern "C" int kvq_gpu_ctx_fill_random(struct kvq_gpu_ctx *c,
				       const int32_t *pages, uint32_t n_pages,
				       uint32_t slot, uint32_t from,
				       uint32_t to, uint32_t seed)
{
	const struct kvq_gpu_model_desc *md = &c->g->d;
	uint32_t kvd = md->n_kv_heads * md->head_dim, chunk = 1024, l, t0, i;
	float *buf = nullptr;
	int32_t *dpos = nullptr, *dseq = nullptr, *dbt = nullptr, *hpos;
	uint16_t **dsink = nullptr;
	int ret = 0;

	if (to <= from)
		return 0;
	if ((to + c->d.page_tokens - 1) / c->d.page_tokens > n_pages ||
	    slot >= c->d.max_seqs)
		return -EINVAL;
	hpos = (int32_t *)malloc(chunk * 4);
	if (!hpos || cudaMalloc(&buf, (size_t)chunk * kvd * 2 * 4) != cudaSuccess ||
	    cudaMalloc(&dpos, chunk * 4) != cudaSuccess ||
	    cudaMalloc(&dseq, chunk * 4) != cudaSuccess ||
	    cudaMalloc(&dbt, (size_t)n_pages * 4) != cudaSuccess ||
	    cudaMalloc(&dsink, 8) != cudaSuccess) {
		ret = -ENOMEM;
		goto out;
	}
	cudaMemcpy(dbt, pages, (size_t)n_pages * 4, cudaMemcpyHostToDevice);
	cudaMemset(dseq, 0, chunk * 4);	/* every row is of sequence 0 */
	for (t0 = from; t0 < to && !ret; t0 += chunk) {
		uint32_t n = to - t0 < chunk ? to - t0 : chunk;

		for (i = 0; i < n; i++)
			hpos[i] = (int32_t)(t0 + i);
		cudaMemcpy(dpos, hpos, n * 4, cudaMemcpyHostToDevice);
		for (l = 0; l < md->n_layers && !ret; l++) {
			struct kvq_gpu_append_args ap;
			uint16_t *sp = c->sinks ? c->sinks + c->sink_per_slot * slot +
				       (size_t)l * 2 * c->d.n_sink * kvd : nullptr;

			fill_kernel<<<256, 256, 0, c->st>>>(buf, (size_t)n * kvd * 2,
							    seed + l * 7919 + t0);
			cudaMemcpyAsync(dsink, &sp, 8, cudaMemcpyHostToDevice,
					c->st);
			memset(&ap, 0, sizeof(ap));
			ap.k = buf;
			ap.v = buf + (size_t)n * kvd;
			ap.in_type = KVQ_GPU_F32;
			ap.n_rows = n;
			ap.row_seq = dseq;
			ap.row_pos = dpos;
			ap.k_pages = c->kpages[l];
			ap.v_pages = c->vpages[l];
			ap.k_page_bytes = c->kpb[l];
			ap.v_page_bytes = c->vpb[l];
			ap.k_type = c->type_k[l];
			ap.v_type = c->type_v[l];
			ap.block_table = dbt;
			ap.bt_stride = n_pages;
			ap.sink = sp ? dsink : nullptr;
			ap.n_sink = sp ? c->d.n_sink : 0;
			ap.n_kv_heads = md->n_kv_heads;
			ap.head_dim = md->head_dim;
			ap.page_tokens = c->d.page_tokens;
			ap.rope_dim = 0;
			ret = kvq_gpu_attn_append(&ap, c->st);
			cudaStreamSynchronize(c->st);
		}
	}
	if (!ret && cudaStreamSynchronize(c->st) != cudaSuccess)
		ret = -EIO;
out:
	free(hpos);
	cudaFree(buf);
	cudaFree(dpos);
	cudaFree(dseq);
	cudaFree(dbt);
	cudaFree(dsink);
	return ret;
}
