/*
 * gpu_model.cu - a model's weights in device memory: upload, formats,
 * the checks that a step finds everything it needs.
 *
 * Why this file exists: the step (kernels/gpu_fwd.cu) reads the matrices
 * this file places; keeping the upload apart keeps each file about one
 * thing.  Formats are described in kernels/gpu_fwd.h.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/gpu_fwd_impl.h"

extern "C" int kvq_gpu_model_create(const struct kvq_gpu_model_desc *d,
				    struct kvq_gpu_model **out, char *err,
				    size_t errlen)
{
	struct kvq_gpu_model *g;

	if (!d->n_layers || !d->dim || !d->n_heads || !d->n_kv_heads ||
	    d->n_heads % d->n_kv_heads || !d->head_dim || !d->ffn_dim ||
	    !d->n_vocab || d->rope_dim > d->head_dim || d->rope_dim % 2)
		return set_err(err, errlen, -EINVAL, "GPU model: bad shape");
	g = (struct kvq_gpu_model *)calloc(1, sizeof(*g));
	if (!g)
		return set_err(err, errlen, -ENOMEM, "out of memory");
	g->d = *d;
	g->m = (dmat *)calloc((size_t)d->n_layers * KVQ_GPU_M_NLAYER,
			      sizeof(dmat));
	g->v = (float **)calloc((size_t)d->n_layers * KVQ_GPU_V_NLAYER,
				sizeof(float *));
	if (!g->m || !g->v) {
		kvq_gpu_model_destroy(g);
		return set_err(err, errlen, -ENOMEM, "out of memory");
	}
	*out = g;
	return 0;
}

static void dmat_free(dmat *m)
{
	cudaFree(m->d);
	cudaFree(m->s);
	memset(m, 0, sizeof(*m));
}

extern "C" void kvq_gpu_model_destroy(struct kvq_gpu_model *g)
{
	size_t i;

	if (!g)
		return;
	for (i = 0; g->m && i < (size_t)g->d.n_layers * KVQ_GPU_M_NLAYER; i++)
		dmat_free(&g->m[i]);
	for (i = 0; g->v && i < (size_t)g->d.n_layers * KVQ_GPU_V_NLAYER; i++)
		cudaFree(g->v[i]);
	dmat_free(&g->embed);
	if (!g->tied)
		dmat_free(&g->output);
	cudaFree(g->out_norm);
	free(g->m);
	free(g->v);
	free(g);
}

extern "C" int kvq_gpu_model_set_matrix(struct kvq_gpu_model *g, int layer,
					int slot, int wtype, uint32_t rows,
					uint32_t cols, const void *data,
					const void *scales, char *err,
					size_t errlen)
{
	dmat *m, nm = {};
	size_t db, sb = 0;
	int ret;

	if (layer >= 0 && (uint32_t)layer < g->d.n_layers &&
	    slot >= 0 && slot < KVQ_GPU_M_NLAYER)
		m = &g->m[(size_t)layer * KVQ_GPU_M_NLAYER + slot];
	else if (layer < 0 && slot == KVQ_GPU_M_EMBED)
		m = &g->embed;
	else if (layer < 0 && slot == KVQ_GPU_M_OUTPUT)
		m = &g->output;
	else
		return set_err(err, errlen, -EINVAL, "GPU model: bad slot");
	bool flt = wtype == KVQ_GPU_W_F16 || wtype == KVQ_GPU_W_F32;
	size_t es = wtype == KVQ_GPU_W_F32 ? 4 : 2;

	if (!rows || !cols || (!flt && cols % 32) || wtype < 0 ||
	    wtype > KVQ_GPU_W_Q8K || (!flt && !scales))
		return set_err(err, errlen, -EINVAL,
			       "GPU model: bad matrix %u x %u of type %d",
			       rows, cols, wtype);
	nm.type = wtype;
	nm.rows = rows;
	nm.cols = cols;
	if (flt) {
		nm.ld = pad32(cols);
		db = (size_t)rows * nm.ld * es;
	} else {
		/* codes: a byte or a nibble a weight; scales: a half a 32
		 * columns (Q8, Q4), two floats a 32 (Q4K) or a 16 (Q8K) */
		nm.ld = cols;
		db = wtype == KVQ_GPU_W_Q8 || wtype == KVQ_GPU_W_Q8K ?
		     (size_t)rows * cols : (size_t)rows * cols / 2;
		sb = (size_t)rows * (cols / 32) * 2 *
		     (wtype == KVQ_GPU_W_Q4K ? 4 :
		      wtype == KVQ_GPU_W_Q8K ? 8 : 1);
	}
	ret = dalloc(&nm.d, db, "weights", err, errlen);
	if (!ret && sb)
		ret = dalloc((void **)&nm.s, sb, "weight scales", err, errlen);
	if (ret) {
		dmat_free(&nm);
		return ret;
	}
	if (flt && nm.ld != cols) {
		if (cudaMemset(nm.d, 0, db) != cudaSuccess ||
		    cudaMemcpy2D(nm.d, (size_t)nm.ld * es, data, (size_t)cols * es,
				 (size_t)cols * es, rows,
				 cudaMemcpyHostToDevice) != cudaSuccess)
			ret = -EIO;
	} else if (cudaMemcpy(nm.d, data, db, cudaMemcpyHostToDevice) !=
		   cudaSuccess) {
		ret = -EIO;
	}
	if (!ret && sb && cudaMemcpy(nm.s, scales, sb,
				     cudaMemcpyHostToDevice) != cudaSuccess)
		ret = -EIO;
	if (ret) {
		dmat_free(&nm);
		return set_err(err, errlen, ret, "GPU model: upload failed: %s",
			       cudaGetErrorString(cudaGetLastError()));
	}
	if (m->d) {
		g->bytes -= m->bytes;
		dmat_free(m);
	}
	nm.bytes = db + sb;
	g->bytes += nm.bytes;
	*m = nm;
	return 0;
}

extern "C" void kvq_gpu_model_tie_output(struct kvq_gpu_model *g)
{
	if (!g->tied)
		dmat_free(&g->output);
	g->output = g->embed;
	g->tied = true;
}

extern "C" int kvq_gpu_model_set_vector(struct kvq_gpu_model *g, int layer,
					int slot, const float *v, uint32_t n,
					char *err, size_t errlen)
{
	float **dst, *p;
	size_t nb = (size_t)pad32(n) * sizeof(float);
	int ret;

	if (layer >= 0 && (uint32_t)layer < g->d.n_layers && slot >= 0 &&
	    slot < KVQ_GPU_V_NLAYER)
		dst = &g->v[(size_t)layer * KVQ_GPU_V_NLAYER + slot];
	else if (layer < 0 && slot == KVQ_GPU_V_OUTPUT_NORM)
		dst = &g->out_norm;
	else
		return set_err(err, errlen, -EINVAL, "GPU model: bad vector slot");
	ret = dalloc((void **)&p, nb, "norm weights", err, errlen);
	if (ret)
		return ret;
	if (cudaMemset(p, 0, nb) != cudaSuccess ||
	    cudaMemcpy(p, v, (size_t)n * sizeof(float),
		       cudaMemcpyHostToDevice) != cudaSuccess) {
		cudaFree(p);
		return set_err(err, errlen, -EIO, "GPU model: upload failed");
	}
	cudaFree(*dst);
	*dst = p;
	g->bytes += nb;
	return 0;
}

extern "C" uint64_t kvq_gpu_model_bytes(const struct kvq_gpu_model *g)
{
	return g->bytes;
}

extern "C" uint64_t kvq_gpu_model_step_bytes(const struct kvq_gpu_model *g)
{
	return g->tied ? g->bytes : g->bytes - g->embed.bytes;
}

extern "C" int kvq_gpu_model_ready(const struct kvq_gpu_model *g, char *err,
				   size_t errlen)
{
	const struct kvq_gpu_model_desc *d = &g->d;
	uint32_t qd = d->n_heads * d->head_dim, kvd = d->n_kv_heads * d->head_dim;
	uint32_t l;

	if (!g->embed.d || !g->output.d || !g->out_norm)
		return set_err(err, errlen, -EINVAL,
			       "GPU model: embedding, output or output norm missing");
	for (l = 0; l < d->n_layers; l++) {
		const dmat *m = &g->m[(size_t)l * KVQ_GPU_M_NLAYER];

		if (!m[KVQ_GPU_M_QKV].d || !m[KVQ_GPU_M_O].d ||
		    !m[KVQ_GPU_M_GATEUP].d || !m[KVQ_GPU_M_DOWN].d ||
		    !g->v[(size_t)l * KVQ_GPU_V_NLAYER + KVQ_GPU_V_ATTN_NORM] ||
		    !g->v[(size_t)l * KVQ_GPU_V_NLAYER + KVQ_GPU_V_FFN_NORM])
			return set_err(err, errlen, -EINVAL,
				       "GPU model: layer %u incomplete", l);
		if (m[KVQ_GPU_M_QKV].rows != qd + 2 * kvd ||
		    m[KVQ_GPU_M_QKV].cols != d->dim ||
		    m[KVQ_GPU_M_O].rows != d->dim || m[KVQ_GPU_M_O].cols != qd ||
		    m[KVQ_GPU_M_GATEUP].rows != 2 * d->ffn_dim ||
		    m[KVQ_GPU_M_GATEUP].cols != d->dim ||
		    m[KVQ_GPU_M_DOWN].rows != d->dim ||
		    m[KVQ_GPU_M_DOWN].cols != d->ffn_dim)
			return set_err(err, errlen, -EINVAL,
				       "GPU model: layer %u has a matrix of the wrong shape", l);
	}
	if (g->embed.cols != d->dim || g->embed.rows != d->n_vocab ||
	    g->output.cols != d->dim || g->output.rows != d->n_vocab)
		return set_err(err, errlen, -EINVAL,
			       "GPU model: embedding or output of the wrong shape");
	return 0;
}

