/*
 * kv_put.h - one new token's K or V head row rotated, quantized and
 * stored into a KV page, as kvq_kv_write() does on the CPU: the device
 * code shared by the append kernel (attn_append.cu) and the decode
 * attention that appends its own sequence's new row (attn_decode.cu).
 *
 * The bytes written equal those of the CPU path: the same float
 * operations in the same order, no contraction into fused multiply-adds,
 * IEEE division, roundf, and the f16 conversions rounding to nearest
 * even.  Lane L owns channels 4L..4L+3 of each 128-channel slice, so a
 * 32-channel scale group is 8 lanes and its maximum is three shuffles.
 */
#ifndef KVQ_KV_PUT_H
#define KVQ_KV_PUT_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/gpu_compat.h"
#include "engine/kvcache.h"

/* Bytes of one head row of @t at head size @d (its scales apart). */
__device__ __forceinline__ int kvq_row_bytes(int t, int d)
{
	return t == KVQ_KV_F32 ? 4 * d : t == KVQ_KV_F16 ? 2 * d :
	       t == KVQ_KV_Q8 ? d : d / 2;
}

__device__ __forceinline__ unsigned short kvq_f16_bits(float x)
{
	__half h = __float2half_rn(x);

	return *reinterpret_cast<unsigned short *>(&h);
}

/*
 * Quantizes this lane's channels c..c+3 (values x, valid when @on) of one
 * head row and stores them, as kvq_kv_quant_row() does.
 */
__device__ __forceinline__ void kvq_put_row(int type, const float x[4],
					    int c, bool on, int group,
					    uint8_t *data, uint16_t *scales)
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

			w.x = kvq_f16_bits(x[0]) |
			      ((unsigned)kvq_f16_bits(x[1]) << 16);
			w.y = kvq_f16_bits(x[2]) |
			      ((unsigned)kvq_f16_bits(x[3]) << 16);
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
	unsigned short sb = kvq_f16_bits(amax / (float)qmax);
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

/*
 * Element of pair (x0, x1) rotated by (cos, sin) @e, the first or the
 * second: each product rounded on its own and never fused, as the CPU's
 * RoPE (and its centring, kvcache.c) computes it.
 */
__device__ __forceinline__ float kvq_rot(float x0, float x1, float2 e,
					 bool first)
{
	return first ? __fsub_rn(__fmul_rn(x0, e.x), __fmul_rn(x1, e.y)) :
		       __fadd_rn(__fmul_rn(x0, e.y), __fmul_rn(x1, e.x));
}

/* Where one new row goes, and how it is rotated. */
struct kvq_put_dst {
	int type;		/* enum kvq_kv_type of the page */
	uint8_t *data;		/* the row's codes (or values) */
	uint16_t *scales;	/* its scales (quantized types) */
	uint16_t *sink;		/* its f16 sink copy, or NULL */
};

struct kvq_put_rope {
	int dim;		/* rotated channels (0: none: a V row) */
	bool neox;
	const float *cs;	/* [dim / 2][2] (cos, sin) of the row, or NULL */
	float base;		/* for the angles without @cs */
	int pos;
	const float *ctr;	/* key centre of the head, or NULL */
};

/* (cos, sin) of pair @i: the host's table, or (ANGLES) the same formula
 * in double precision. */
template <bool ANGLES>
__device__ __forceinline__ float2 kvq_put_cs(const kvq_put_rope &r, int i)
{
	if (!ANGLES || r.cs)
		return make_float2(r.cs[2 * i], r.cs[2 * i + 1]);
	double th = (double)(unsigned)r.pos *
		    pow((double)r.base, -2.0 * i / r.dim);

	return make_float2((float)cos(th), (float)sin(th));
}

/*
 * One warp stores head row @buf (@d f32 values in shared memory, read by
 * the whole warp) at @dst: rotated (and centred) by @r first, then
 * quantized in groups of @group channels, and its f16 copy to dst.sink
 * for a quantized type.  Without ANGLES, r.cs must be given where r.dim
 * is not 0.
 */
template <bool ANGLES>
__device__ __forceinline__ void kvq_put_head(const float *buf, int d,
					     int group, const kvq_put_rope &r,
					     const kvq_put_dst &dst)
{
	int lane = threadIdx.x & 31;

	for (int c0 = 0; c0 < d; c0 += 128) {
		int c = c0 + 4 * lane;
		bool on = c < d;
		float x[4];

		for (int i = 0; i < 4; i++) {
			int ch = c + i;
			float v = on ? buf[ch] : 0.0f;

			if (on && ch < r.dim) {
				int hr = r.dim / 2, j, a, b;
				bool first;

				if (r.neox) {
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
				float2 e = kvq_put_cs<ANGLES>(r, j);

				v = kvq_rot(buf[a], buf[b], e, first);
				/* Key centring: k - R_pos c, c turned by the
				 * key's angle. */
				if (r.ctr)
					v = __fsub_rn(v, kvq_rot(r.ctr[a],
								 r.ctr[b], e,
								 first));
			} else if (on && r.ctr) {
				v = __fsub_rn(v, r.ctr[ch]);
			}
			x[i] = v;
		}
		kvq_put_row(dst.type, x, c, on, group, dst.data, dst.scales);
		if (on && dst.sink && dst.type >= KVQ_KV_Q8)
			for (int i = 0; i < 4; i++)
				dst.sink[c + i] = kvq_f16_bits(x[i]);
	}
}

#endif /* KVQ_KV_PUT_H */
