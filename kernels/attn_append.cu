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

__device__ __forceinline__ int rbytes(int t, int d)
{
	return t == KVQ_KV_F32 ? 4 * d : t == KVQ_KV_F16 ? 2 * d :
	       t == KVQ_KV_Q8 ? d : d / 2;
}

__device__ __forceinline__ unsigned short f16_bits(float x)
{
	__half h = __float2half_rn(x);

	return *reinterpret_cast<unsigned short *>(&h);
}

/*
 * Quantizes this lane's channels c..c+3 (values x, valid when @on) of one
 * head row and stores them, as kvq_kv_quant_row() does.
 */
__device__ void put_row(int type, const float x[4], int c, bool on,
			int group, uint8_t *data, uint16_t *scales)
{
	float amax = 0.0f;

	if (type == KVQ_KV_F32) {
		if (on)
			*(float4 *)(data + 4 * c) = make_float4(x[0], x[1],
								x[2], x[3]);
		return;
	}
	if (type == KVQ_KV_F16) {
		if (on) {
			uint2 w;

			w.x = f16_bits(x[0]) | ((unsigned)f16_bits(x[1]) << 16);
			w.y = f16_bits(x[2]) | ((unsigned)f16_bits(x[3]) << 16);
			*(uint2 *)(data + 2 * c) = w;
		}
		return;
	}
	if (on)
		for (int i = 0; i < 4; i++)
			amax = fmaxf(amax, fabsf(x[i]));
	/* A group is group/4 consecutive lanes (8 for 32 channels, 2 for a
	 * head of 8). */
	for (int m = 1; m < group / 4; m <<= 1)
		amax = fmaxf(amax, kvq_shfl_xor_f32(amax, m));
	if (!on)
		return;

	int qmax = type == KVQ_KV_Q8 ? 127 : 7;
	unsigned short sb = f16_bits(amax / (float)qmax);
	float sc = __half2float(*reinterpret_cast<__half *>(&sb));
	float inv = sc > 0.0f ? 1.0f / sc : 0.0f;
	int q[4];

	for (int i = 0; i < 4; i++) {
		int v = (int)roundf(__fmul_rn(x[i], inv));

		if (type == KVQ_KV_Q8)
			q[i] = v < -127 ? -127 : v > 127 ? 127 : v;
		else
			q[i] = v < -8 ? -8 : v > 7 ? 7 : v;
	}
	if (c % group == 0)
		scales[c / group] = sb;
	if (type == KVQ_KV_Q8) {
		unsigned w = (unsigned)(q[0] & 255) | ((unsigned)(q[1] & 255) << 8) |
			     ((unsigned)(q[2] & 255) << 16) |
			     ((unsigned)(q[3] & 255) << 24);

		*(unsigned *)(data + c) = w;
	} else {
		unsigned short w = (unsigned short)((q[0] + 8) | ((q[1] + 8) << 4) |
						    ((q[2] + 8) << 8) |
						    ((q[3] + 8) << 12));

		*(unsigned short *)(data + c / 2) = w;
	}
}

/* (cos, sin) of pair @i at position @pos, as the CPU engine computes it. */
__device__ __forceinline__ float2 rope_cs(const aparams &p, int row, int pos,
					  int i)
{
	if (p.cs) {
		const float *e = p.cs + ((size_t)row * (p.rope_dim / 2) + i) * 2;

		return make_float2(e[0], e[1]);
	}
	double th = (double)(unsigned)pos *
		    pow((double)p.base, -2.0 * i / p.rope_dim);

	return make_float2((float)cos(th), (float)sin(th));
}

/*
 * Element of pair (x0, x1) rotated by (cos, sin) @e, the first or the
 * second: each product rounded on its own and never fused, as the CPU's
 * RoPE (and its centring, kvcache.c) computes it.
 */
__device__ __forceinline__ float rot(float x0, float x1, float2 e, bool first)
{
	return first ? __fsub_rn(__fmul_rn(x0, e.x), __fmul_rn(x1, e.y)) :
		       __fadd_rn(__fmul_rn(x0, e.y), __fmul_rn(x1, e.x));
}

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
			int rb = rbytes(type, p.d);
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
			for (int c0 = 0; c0 < p.d; c0 += 128) {
				int c = c0 + 4 * lane;
				bool on = c < p.d;
				float x[4];

				for (int i = 0; i < 4; i++) {
					int ch = c + i;
					float v = on ? buf[w][ch] : 0.0f;

					if (on && !half && ch < p.rope_dim) {
						int hr = p.rope_dim / 2, j, a, b;
						bool first;

						if (p.neox) {
							first = ch < hr;
							j = first ? ch : ch - hr;
							a = j;
							b = j + hr;
						} else {
							first = !(ch & 1);
							j = ch >> 1;
							a = 2 * j;
							b = a + 1;
						}
						float2 e = rope_cs(p, row, pos, j);

						v = rot(buf[w][a], buf[w][b], e,
							first);
						/* Key centring: k - R_pos c,
						 * c turned by the key's angle. */
						if (ctr)
							v = __fsub_rn(v,
								rot(ctr[a], ctr[b],
								    e, first));
					} else if (on && ctr && !half) {
						v = __fsub_rn(v, ctr[ch]);
					}
					x[i] = v;
				}
				put_row(type, x, c, on, p.group, data, scales);
				if (on && sink && type >= KVQ_KV_Q8 && pos < p.n_sink) {
					uint16_t *s = sink + ((size_t)half * p.n_sink + pos) * kvd +
						      (size_t)h * p.d + c;

					for (int i = 0; i < 4; i++)
						s[i] = f16_bits(x[i]);
				}
			}
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
