/*
 * attn_ref.c - plain-C reference twins of the GPU attention kernels that
 * engine/kvcache.c does not already provide.
 *
 * Why this file exists: the append kernel rotates keys before it
 * quantizes them; its twin is this rotation followed by kvq_kv_write().
 * The decode kernel's twin is kvq_kv_attend() itself.
 */
#include "config.h"

#include <math.h>
#include <stdint.h>

#include "kernels/attn.h"

void kvq_attn_ref_rope_table(const uint32_t *pos, uint32_t n,
			     uint32_t rope_dim, float base, float *cs)
{
	uint32_t half = rope_dim / 2, t, i;

	/* The CPU engine's angles: double precision, rounded once. */
	for (t = 0; t < n; t++) {
		for (i = 0; i < half; i++) {
			double th = pos[t] * pow(base, -2.0 * i / rope_dim);

			cs[((size_t)t * half + i) * 2] = (float)cos(th);
			cs[((size_t)t * half + i) * 2 + 1] = (float)sin(th);
		}
	}
}

void kvq_attn_ref_rope(float *x, uint32_t n_heads, uint32_t head_dim,
		       uint32_t rope_dim, int neox, const float *cs)
{
	uint32_t half = rope_dim / 2, h, i;

	for (h = 0; h < n_heads; h++) {
		float *v = x + (size_t)h * head_dim;

		for (i = 0; i < half; i++) {
			uint32_t a = neox ? i : 2 * i;
			uint32_t b = neox ? i + half : 2 * i + 1;
			float c = cs[2 * i], s = cs[2 * i + 1];
			/* Each product rounded on its own, never fused: the
			 * kernel does the same, bit for bit. */
			volatile float p0 = v[a] * c, p1 = v[b] * s;
			volatile float p2 = v[a] * s, p3 = v[b] * c;

			v[a] = p0 - p1;
			v[b] = p2 + p3;
		}
	}
}
