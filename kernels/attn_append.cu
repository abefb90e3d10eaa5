/*
 * attn_append.cu - rotate, quantize and store the new K and V rows of a
 * step into kvqd's paged KV cache, one launch per layer.
 *
 * Why this file exists: every decode step appends one token per sequence
 * to every layer; doing RoPE, the group quantization and the page stores
 * in one kernel keeps the step at one small launch per layer.  The bytes
 * written equal those of the CPU path (kvq_kv_write() after the engine's
 * RoPE): the same float operations in the same order, no contraction into
 * fused multiply-adds, IEEE division, roundf, and the f16 conversions
 * rounding to nearest even.  Key centring (engine/kvcache.h) takes R_pos c
 * off each rotated key in the same way.
 *
 * A warp serves one KV head of one row at a time; lane L owns channels
 * 4L..4L+3 of each 128-channel slice, so a 32-channel scale group is 8
 * lanes and its maximum is three shuffles.
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "kernels/attn.h"
#include "kernels/kv_put.h"
#include "engine/kvcache.h"

namespace {

constexpr int NWA = 4;		/* warps per block */
constexpr int MAX_D = 512;

struct aparams {
	const void *k, *v;
	int in_f16;
	const int32_t *row_seq, *row_pos;
	uint8_t *kp, *vp;
	size_t kpb, vpb;
	int kt, vt;
	const int32_t *bt;
	int bt_stride;
	uint16_t *const *sink;
	int n_sink;
	int hk, d, P, group;
	int rope_dim, neox;
	float base;
	const float *cs;
	const float *ctr;	/* key centres [hk][d], or NULL */
};

__global__ void __launch_bounds__(NWA * 32) append_kernel(aparams p)
{
	__shared__ float buf[NWA][MAX_D];
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
	int row = blockIdx.x;
	int seq = p.row_seq ? p.row_seq[row] : row;
	int pos = p.row_pos[row];
	int page = p.bt[(size_t)seq * p.bt_stride + pos / p.P];
	int tok = pos % p.P;
	uint16_t *sink = p.sink ? p.sink[seq] : nullptr;
	size_t kvd = (size_t)p.hk * p.d;

	kvq_pdl_trigger();	/* attention may start: it waits for this */
	kvq_pdl_wait();		/* k and v come from the kernel before */
	/* One warp per (KV head, K or V) of the row. */
	for (int hh = blockIdx.y * NWA + w; hh < 2 * p.hk;
	     hh += NWA * gridDim.y) {
		int h = hh >> 1;
		{
			int half = hh & 1;
			int type = half ? p.vt : p.kt;
			const void *src = half ? p.v : p.k;
			uint8_t *pg = (half ? p.vp : p.kp) +
				      (size_t)page * (half ? p.vpb : p.kpb);
			int rb = kvq_row_bytes(type, p.d);
			size_t r = (size_t)h * p.P + tok;
			uint8_t *data = pg + r * rb;
			uint16_t *scales = (uint16_t *)(pg + (size_t)p.hk * p.P * rb) +
					   r * (p.d / p.group);
			size_t in = (size_t)row * kvd + (size_t)h * p.d;
			const float *ctr = p.ctr ? p.ctr + (size_t)h * p.d :
					       nullptr;

			for (int c = lane; c < p.d; c += 32)
				buf[w][c] = p.in_f16 ?
					__half2float(((const __half *)src)[in + c]) :
					((const float *)src)[in + c];
			kvq_syncwarp();

			kvq_put_rope rr;
			kvq_put_dst dst;

			rr.dim = half ? 0 : p.rope_dim;
			rr.neox = p.neox;
			rr.cs = p.cs ? p.cs + (size_t)row * p.rope_dim : nullptr;
			rr.base = p.base;
			rr.pos = pos;
			rr.ctr = half ? nullptr : ctr;
			dst.type = type;
			dst.data = data;
			dst.scales = scales;
			dst.sink = sink && pos < p.n_sink ?
				   sink + ((size_t)half * p.n_sink + pos) * kvd +
				   (size_t)h * p.d : nullptr;
			kvq_put_head<true>(buf[w], p.d, p.group, rr, dst);
			kvq_syncwarp();
		}
	}
}

} /* namespace */

extern "C" int kvq_gpu_attn_append(const struct kvq_gpu_append_args *a,
				   void *stream)
{
	aparams p;
	int ok_k, ok_v;

	ok_k = a->k_type >= KVQ_KV_F32 && a->k_type <= KVQ_KV_Q4;
	ok_v = a->v_type >= KVQ_KV_F32 && a->v_type <= KVQ_KV_Q4;
	if (!a->n_kv_heads || !a->head_dim || !a->page_tokens ||
	    a->rope_dim > a->head_dim || a->rope_dim % 2 ||
	    a->n_sink > a->page_tokens || a->in_type < 0 || a->in_type > 1)
		return -EINVAL;
	/* A scale group is 32 channels, or the whole head below 32 (then a
	 * power-of-two number of 4-channel lanes). */
	if (!ok_k || !ok_v || a->head_dim % 4 || a->head_dim > MAX_D ||
	    (a->head_dim >= 32 ? a->head_dim % 32 != 0 :
	     (a->head_dim & (a->head_dim - 1)) != 0))
		return -EOPNOTSUPP;
	if (!a->n_rows)
		return 0;
	if (!a->k || !a->v || !a->row_pos || !a->k_pages || !a->v_pages ||
	    !a->block_table || !a->bt_stride || (a->rope_dim && !(a->rope_base > 0.0f)))
		return -EINVAL;

	p.k = a->k;
	p.v = a->v;
	p.in_f16 = a->in_type == KVQ_GPU_F16;
	p.row_seq = a->row_seq;
	p.row_pos = a->row_pos;
	p.kp = (uint8_t *)a->k_pages;
	p.vp = (uint8_t *)a->v_pages;
	p.kpb = a->k_page_bytes;
	p.vpb = a->v_page_bytes;
	p.kt = a->k_type;
	p.vt = a->v_type;
	p.bt = a->block_table;
	p.bt_stride = (int)a->bt_stride;
	p.sink = a->n_sink ? a->sink : nullptr;
	p.n_sink = (int)a->n_sink;
	p.hk = (int)a->n_kv_heads;
	p.d = (int)a->head_dim;
	p.P = (int)a->page_tokens;
	p.group = a->head_dim < 32 ? (int)a->head_dim : 32;
	p.rope_dim = (int)a->rope_dim;
	p.neox = a->rope_neox != 0;
	p.base = a->rope_base;
	p.cs = a->rope_cs;
	p.ctr = a->k_center;
	/* One warp per KV head and half of a row: a decode step is a few
	 * rows, so the launch is latency. */
	dim3 grid(a->n_rows, (2 * a->n_kv_heads + NWA - 1) / NWA);

	/* A programmatic dependent of the kernel before (sm_90): it launches
	 * while that one ends and waits for its k and v.  One row only:
	 * measured on the H200 (1B shape), +1-2% at one sequence, -4% at
	 * four. */
	kvq_launch(a->n_rows == 1 && kvq_pdl_allowed(), append_kernel, grid,
		   dim3(NWA * 32), 0, (cudaStream_t)stream, p);
	return cudaGetLastError() == cudaSuccess ? 0 : -EIO;
}
