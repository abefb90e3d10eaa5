/*
 * test_kvcache.c - the paged, quantized KV cache: exact packing (golden
 * bytes), round-trip error bounds per format, page pool accounting,
 * copy-on-write sharing, sink tokens, and attention over every format
 * against a double-precision reference on the dequantized values.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kvcache.h"
#include "engine/kvcache_impl.h"
#include "engine/quant.h"
#include "tap.h"

static unsigned seed = 12345;

static float frand(void)
{
	seed = seed * 1103515245u + 12345u;
	return ((seed >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* ------------------------------------------------------ golden bytes */

static void quant_row_golden_bytes(void)
{
	float x[32];
	uint8_t data[32];
	uint16_t sc[1];
	int i, ok = 1;

	/* amax 7 -> q4 scale exactly 1.0: q = x, stored q + 8. */
	for (i = 0; i < 32; i++)
		x[i] = (float)((i % 15) - 7);
	kvq_kv_quant_row(KVQ_KV_Q4, x, 32, 32, data, sc);
	tap_ok(sc[0] == 0x3c00, "kvq_kv_quant_row_q4_scale_is_amax_over_7 (0x%04x)",
	       sc[0]);
	for (i = 0; i < 16; i++) {
		uint8_t want = (uint8_t)(((2 * i) % 15 + 1) |
					 (((2 * i + 1) % 15 + 1) << 4));

		if (data[i] != want)
			ok = 0;
	}
	tap_ok(ok, "kvq_kv_quant_row_q4_even_channel_in_low_nibble");
	/* data[0]: x0=-7 -> 1, x1=-6 -> 2: 0x21; data[7]: 7 -> 15, -7 -> 1. */
	tap_ok(data[0] == 0x21 && data[7] == 0x1f,
	       "kvq_kv_quant_row_q4_golden_bytes (0x%02x 0x%02x)", data[0],
	       data[7]);

	/* amax 127 -> q8 scale 1.0, values stored as int8. */
	for (i = 0; i < 32; i++)
		x[i] = (float)(i * 8 - 127 < 127 ? i * 8 - 127 : 127);
	kvq_kv_quant_row(KVQ_KV_Q8, x, 32, 32, data, sc);
	tap_ok(sc[0] == 0x3c00 && data[0] == (uint8_t)-127 &&
	       data[16] == 1 && data[31] == 121,
	       "kvq_kv_quant_row_q8_golden_bytes (0x%04x %d %d %d)", sc[0],
	       (int8_t)data[0], (int8_t)data[16], (int8_t)data[31]);

	/* An all-zero group: scale 0, codes 8 (q4) / 0 (q8). */
	memset(x, 0, sizeof(x));
	kvq_kv_quant_row(KVQ_KV_Q4, x, 32, 32, data, sc);
	tap_ok(sc[0] == 0 && data[0] == 0x88 && data[15] == 0x88,
	       "kvq_kv_quant_row_q4_zero_group");
}

/* Page layout: data[h][t] rows first, then scales[h][t][g]. */
static void page_layout_golden(void)
{
	struct kvq_kv_opts o = { .n_layers = 1, .n_kv_heads = 2,
				 .head_dim = 64, .page_tokens = 4,
				 .n_pages = 2 };
	struct kvq_kvcache *c;
	struct kvq_kv_seq s;
	float k[128], v[128];
	const uint8_t *pg;
	uint16_t s0;
	int i;

	o.type_k[0] = KVQ_KV_Q4;
	o.type_v[0] = KVQ_KV_Q8;
	if (kvq_kv_create(&o, &c)) {
		tap_ok(0, "kvq_kv_create_q4_q8");
		return;
	}
	kvq_kv_seq_init(&s);
	kvq_kv_seq_reserve(c, &s, 2);
	for (i = 0; i < 128; i++) {
		k[i] = 0.0f;
		v[i] = 0.0f;
	}
	kvq_kv_write(c, &s, 0, 0, k, v);
	/* token 1, head 1, channel 33 (group 1, odd -> high nibble). */
	k[64 + 33] = 7.0f;
	v[64 + 40] = -127.0f;
	kvq_kv_write(c, &s, 0, 1, k, v);
	kvq_kv_seq_commit(&s, 2);
	pg = c->layers[0].k.mem + (size_t)s.pages[0] * c->layers[0].k.page_bytes;
	/* row (h=1, t=1) at (1*4 + 1) * 32 bytes; channel 33 in byte 16. */
	tap_ok(pg[(1 * 4 + 1) * 32 + 16] == 0xf8,
	       "kvq_kv_write_q4_row_at_head_major_offset (0x%02x)",
	       pg[(1 * 4 + 1) * 32 + 16]);
	/* scales after 2*4*32 data bytes; (h=1,t=1,g=1) is entry 11. */
	memcpy(&s0, pg + 2 * 4 * 32 + 2 * ((1 * 4 + 1) * 2 + 1), 2);
	tap_ok(s0 == 0x3c00, "kvq_kv_write_q4_scale_after_data (0x%04x)", s0);
	pg = c->layers[0].v.mem + (size_t)s.pages[0] * c->layers[0].v.page_bytes;
	tap_ok((int8_t)pg[(1 * 4 + 1) * 64 + 40] == -127,
	       "kvq_kv_write_q8_row_at_head_major_offset");
	/* data + scales, rounded up to 64 bytes */
	tap_ok(c->layers[0].k.page_bytes == ((2 * 4 * 32 + 2 * 4 * 2 * 2 + 63) & ~63) &&
	       c->layers[0].v.page_bytes == ((2 * 4 * 64 + 2 * 4 * 2 * 2 + 63) & ~63),
	       "kvq_kv_page_bytes_match_layout (%zu %zu)",
	       c->layers[0].k.page_bytes, c->layers[0].v.page_bytes);
	/* bytes per token: H * (D/2 + 2*2) + H * (D + 2*2) */
	tap_ok(kvq_kv_bytes_per_token(c) == 2 * (32 + 4) + 2 * (64 + 4),
	       "kvq_kv_bytes_per_token_is_format_arithmetic (%llu)",
	       (unsigned long long)kvq_kv_bytes_per_token(c));
	kvq_kv_seq_release(c, &s);
	kvq_kv_destroy(c);
}

/* ---------------------------------------------------- round trips */

static void round_trip_bounds(void)
{
	static const enum kvq_kv_type types[] = { KVQ_KV_F32, KVQ_KV_F16,
						  KVQ_KV_Q8, KVQ_KV_Q4 };
	size_t ti;
	int outl;

	for (outl = 0; outl < 2; outl++) {
		for (ti = 0; ti < 4; ti++) {
			float x[128], y[128];
			uint8_t data[512];
			uint16_t sc[4];
			double worst = 0;
			int r, i, g;

			for (r = 0; r < 200; r++) {
				for (i = 0; i < 128; i++)
					x[i] = frand();
				if (outl)	/* outlier channels */
					for (i = 0; i < 128; i += 37)
						x[i] *= 50.0f;
				kvq_kv_quant_row(types[ti], x, 128, 32, data, sc);
				kvq_kv_dequant_row(types[ti], data, sc, 128, 32, y);
				for (g = 0; g < 4; g++) {
					float amax = 0;

					for (i = 0; i < 32; i++)
						amax = fmaxf(amax, fabsf(x[g * 32 + i]));
					for (i = 0; i < 32; i++) {
						double e = fabs(x[g * 32 + i] -
								y[g * 32 + i]) /
							   (amax > 0 ? amax : 1);

						if (e > worst)
							worst = e;
					}
				}
			}
			/* Bounds: half a step of amax/qmax (+ f16 scale
			 * rounding); f16 relative 2^-11. */
			{
				double bound = types[ti] == KVQ_KV_F32 ? 0 :
					       types[ti] == KVQ_KV_F16 ? 4.9e-4 :
					       types[ti] == KVQ_KV_Q8 ? 0.5 / 127 * 1.01 :
					       0.5 / 7 * 1.01;

				tap_ok(worst <= bound,
				       "kvq_kv_round_trip_%s_%s_within_bound (%.3g <= %.3g)",
				       kvq_kv_type_name(types[ti]),
				       outl ? "outliers" : "uniform", worst, bound);
			}
		}
	}
}

/* ------------------------------------------------------- attention */

/* Reference: softmax over rows read back through kvq_kv_read (the
 * dequantized values attention must use), in double. */
static double attend_check(struct kvq_kvcache *c, struct kvq_kv_seq *s,
			   uint32_t layer, uint32_t kvh, uint32_t n_ctx)
{
	uint32_t d = c->o.head_dim, n_q = 2, i, t, j;
	float *q = malloc(sizeof(float) * n_q * d);
	float *out = malloc(sizeof(float) * n_q * d);
	float *kr = malloc(sizeof(float) * d), *vr = malloc(sizeof(float) * d);
	double *w = malloc(sizeof(double) * n_ctx), worst = 0;

	for (i = 0; i < n_q * d; i++) {
		q[i] = frand();
		out[i] = NAN;	/* poisoned */
	}
	kvq_kv_attend(c, s, layer, kvh, q, d, n_q, 0.125f, n_ctx, out, d);
	for (i = 0; i < n_q; i++) {
		double mx = -1e300, sum = 0;

		for (t = 0; t < n_ctx; t++) {
			double sc = 0;

			kvq_kv_read(c, s, layer, t, kvh, false, kr);
			for (j = 0; j < d; j++)
				sc += (double)q[i * d + j] * kr[j];
			w[t] = sc * 0.125;
			mx = w[t] > mx ? w[t] : mx;
		}
		for (t = 0; t < n_ctx; t++)
			sum += (w[t] = exp(w[t] - mx));
		for (j = 0; j < d; j++) {
			double acc = 0, e;

			for (t = 0; t < n_ctx; t++) {
				kvq_kv_read(c, s, layer, t, kvh, true, vr);
				acc += w[t] * vr[j];
			}
			e = fabs(out[i * d + j] - acc / sum);
			if (!(e <= worst))
				worst = isnan(e) ? INFINITY : e;
		}
	}
	free(q);
	free(out);
	free(kr);
	free(vr);
	free(w);
	return worst;
}

static void fill(struct kvq_kvcache *c, struct kvq_kv_seq *s, uint32_t n)
{
	uint32_t kvd = c->o.n_kv_heads * c->o.head_dim, t, l, i;
	float *k = malloc(sizeof(float) * kvd), *v = malloc(sizeof(float) * kvd);

	if (kvq_kv_seq_reserve(c, s, n))
		goto out;
	for (t = 0; t < n; t++) {
		for (l = 0; l < c->o.n_layers; l++) {
			for (i = 0; i < kvd; i++) {
				k[i] = frand() * 2;
				v[i] = frand();
			}
			kvq_kv_write(c, s, l, s->n_tokens + t, k, v);
		}
	}
	kvq_kv_seq_commit(s, n);
out:
	free(k);
	free(v);
}

static void attend_every_format(void)
{
	static const uint32_t lens[] = { 1, 3, 15, 16, 17, 32, 33, 100 };
	static const enum kvq_kv_type pairs[][2] = {
		{ KVQ_KV_F32, KVQ_KV_F32 }, { KVQ_KV_F16, KVQ_KV_F16 },
		{ KVQ_KV_Q8, KVQ_KV_Q8 }, { KVQ_KV_Q8, KVQ_KV_Q4 },
		{ KVQ_KV_Q4, KVQ_KV_Q4 },
	};
	size_t pi, li;

	for (pi = 0; pi < sizeof(pairs) / sizeof(pairs[0]); pi++) {
		struct kvq_kv_opts o = { .n_layers = 2, .n_kv_heads = 2,
					 .head_dim = 64, .page_tokens = 16,
					 .n_pages = 64, .n_sink = 4 };
		struct kvq_kvcache *c;
		double worst = 0;

		o.type_k[0] = o.type_k[1] = pairs[pi][0];
		o.type_v[0] = o.type_v[1] = pairs[pi][1];
		if (kvq_kv_create(&o, &c)) {
			tap_ok(0, "kvq_kv_create");
			continue;
		}
		for (li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
			struct kvq_kv_seq s;
			double e;

			kvq_kv_seq_init(&s);
			fill(c, &s, lens[li]);
			e = attend_check(c, &s, 1, 1, lens[li]);
			worst = e > worst ? e : worst;
			kvq_kv_seq_release(c, &s);
		}
		tap_ok(worst < 2e-6,
		       "kvq_kv_attend_%s_%s_matches_reference_all_lengths (max diff %.2g)",
		       kvq_kv_type_name(pairs[pi][0]),
		       kvq_kv_type_name(pairs[pi][1]), worst);
		tap_ok(c->n_free == o.n_pages, "kvq_kv_seq_release_returns_pages_%s_%s",
		       kvq_kv_type_name(pairs[pi][0]),
		       kvq_kv_type_name(pairs[pi][1]));
		kvq_kv_destroy(c);
	}
}

/* Sink tokens: quantized layers read the first tokens back in f16. */
static void sink_tokens_kept_f16(void)
{
	struct kvq_kv_opts o = { .n_layers = 1, .n_kv_heads = 1,
				 .head_dim = 32, .page_tokens = 16,
				 .n_pages = 4, .n_sink = 4 };
	struct kvq_kvcache *c;
	struct kvq_kv_seq s;
	float k[32], v[32], r[32];
	double e4 = 0, e5 = 0;
	int t, i;

	o.type_k[0] = KVQ_KV_Q4;
	o.type_v[0] = KVQ_KV_Q4;
	if (kvq_kv_create(&o, &c))
		return;
	kvq_kv_seq_init(&s);
	kvq_kv_seq_reserve(c, &s, 6);
	for (t = 0; t < 6; t++) {
		for (i = 0; i < 32; i++)
			k[i] = v[i] = 0.1f * i - 1.3f + 0.01f * t;
		kvq_kv_write(c, &s, 0, t, k, v);
		kvq_kv_read(c, &s, 0, t, 0, false, r);
		for (i = 0; i < 32; i++) {
			double e = fabs(r[i] - k[i]);

			if (t < 4)
				e4 = e > e4 ? e : e4;
			else
				e5 = e > e5 ? e : e5;
		}
	}
	kvq_kv_seq_commit(&s, 6);
	tap_ok(e4 < 1e-3 && e5 > 1e-2,
	       "kvq_kv_read_sink_tokens_f16_others_q4 (sink err %.2g, q4 err %.2g)",
	       e4, e5);
	kvq_kv_seq_release(c, &s);
	kvq_kv_destroy(c);
}

/* ---------------------------------------------------- key centring */

/* R_p x for one head, by the formula of kvcache.h, written out here. */
static void rot_head(const float *x, float *y, uint32_t d, uint32_t rd,
		     bool neox, float base, uint32_t p)
{
	uint32_t i;

	memcpy(y, x, d * sizeof(float));
	for (i = 0; i < rd / 2; i++) {
		uint32_t a = neox ? i : 2 * i, b = neox ? i + rd / 2 : 2 * i + 1;
		double th = p * pow(base, -2.0 * i / rd);
		float cs = (float)cos(th), sn = (float)sin(th);

		y[a] = x[a] * cs - x[b] * sn;
		y[b] = x[a] * sn + x[b] * cs;
	}
}

/*
 * A q4 layer with large centres: keys near R_p c are stored as k - R_p c
 * (read back within the q4 step of what is left, far below the centre's),
 * attention of @n_q query heads over them equals the reference over the
 * uncentred keys, and an f16 layer of the same cache is not centred.
 * (20 queries at rope_dim 128 make more centre terms than kvq_kv_attend()
 * holds at once.)
 */
static void centred_keys(uint32_t d, uint32_t rd, bool neox, uint32_t n_q)
{
	struct kvq_kv_opts o = { .n_layers = 2, .n_kv_heads = 2,
				 .head_dim = d, .page_tokens = 16,
				 .n_pages = 16, .n_sink = 4, .rope_dim = rd,
				 .rope_base = 10000.0f, .rope_neox = neox };
	uint32_t kvd = 2 * d, n = 75, t, i, h, j;
	float *ctr = malloc(sizeof(float) * 2 * kvd);
	float *keys = malloc(sizeof(float) * n * kvd), *v = malloc(sizeof(float) * kvd);
	float pre[KVQ_KV_MAX_HEAD_DIM], r[KVQ_KV_MAX_HEAD_DIM];
	float *q = malloc(sizeof(float) * n_q * d);
	float *out = malloc(sizeof(float) * n_q * d);
	float at[2 * KVQ_KV_MAX_HEAD_DIM];
	double rd_err = 0, ct_err = 0, att_err = 0, big = 0;
	struct kvq_kvcache *c;
	struct kvq_kv_seq s;

	o.type_k[0] = KVQ_KV_Q4;
	o.type_v[0] = KVQ_KV_Q8;
	o.type_k[1] = o.type_v[1] = KVQ_KV_F16;
	for (i = 0; i < 2 * kvd; i++)
		ctr[i] = 10.0f * frand();
	o.k_center = ctr;
	if (kvq_kv_create(&o, &c)) {
		tap_ok(0, "kvq_kv_create_centred");
		goto out;
	}
	ctr[0] += 100.0f;	/* the cache holds its own copy */
	kvq_kv_seq_init(&s);
	kvq_kv_seq_reserve(c, &s, n);
	for (t = 0; t < n; t++) {
		for (h = 0; h < 2; h++) {
			for (i = 0; i < d; i++)
				pre[i] = ctr[h * d + i] - 100.0f * (h + i == 0) +
					 0.5f * frand();
			rot_head(pre, keys + t * kvd + h * d, d, rd, neox,
				 10000.0f, t);
		}
		for (i = 0; i < kvd; i++)
			v[i] = frand();
		kvq_kv_write(c, &s, 0, t, keys + t * kvd, v);
		kvq_kv_write(c, &s, 1, t, keys + t * kvd, v);
	}
	ctr[0] -= 100.0f;
	kvq_kv_seq_commit(&s, n);
	for (t = 0; t < n; t++) {
		float want[2 * KVQ_KV_MAX_HEAD_DIM];

		kvq_kv_center_at(c, 0, t, at);
		for (h = 0; h < 2; h++) {
			rot_head(ctr + h * d, want + h * d, d, rd, neox,
				 10000.0f, t);
			kvq_kv_read(c, &s, 0, t, h, false, r);
			for (i = 0; i < d; i++) {
				double e = fabs(r[i] + want[h * d + i] -
						keys[t * kvd + h * d + i]);

				rd_err = e > rd_err ? e : rd_err;
				e = fabs(at[h * d + i] - want[h * d + i]);
				ct_err = e > ct_err ? e : ct_err;
				big = fabs(want[h * d + i]) > big ?
				      fabs(want[h * d + i]) : big;
			}
		}
	}
	tap_ok(c->layers[0].center && !c->layers[1].center &&
	       !kvq_kv_center_at(c, 1, 3, at),
	       "key_centring_only_in_quantized_layers_hd%u", d);
	/* q4 of what is left: |k - R_p c| < 1.3, a step of at most 0.19. */
	tap_ok(rd_err < 0.1 && ct_err < 1e-5 && big > 5,
	       "centred_q4_key_reads_back_k_minus_R_p_c_hd%u_rd%u%s (err %.3g, centre %.3g, R_p c %.2g)",
	       d, rd, neox ? "_neox" : "", rd_err, big, ct_err);
	for (i = 0; i < n_q * d; i++) {
		q[i] = frand();
		out[i] = NAN;
	}
	kvq_kv_attend(c, &s, 0, 1, q, d, n_q, 0.25f, n, out, d);
	for (j = 0; j < n_q; j++) {
		double w[128], mx = -1e300, sum = 0;

		for (t = 0; t < n; t++) {
			double sc = 0;

			rot_head(ctr + d, at, d, rd, neox, 10000.0f, t);
			kvq_kv_read(c, &s, 0, t, 1, false, r);
			for (i = 0; i < d; i++)
				sc += (double)q[j * d + i] * (r[i] + at[i]);
			w[t] = sc * 0.25;
			mx = w[t] > mx ? w[t] : mx;
		}
		for (t = 0; t < n; t++)
			sum += (w[t] = exp(w[t] - mx));
		for (i = 0; i < d; i++) {
			double acc = 0, e;

			for (t = 0; t < n; t++) {
				kvq_kv_read(c, &s, 0, t, 1, true, r);
				acc += w[t] * r[i];
			}
			e = fabs(out[j * d + i] - acc / sum);
			att_err = !(e <= att_err) ? (isnan(e) ? INFINITY : e) :
				  att_err;
		}
	}
	tap_ok(att_err < 2e-5,
	       "centred_attention_matches_reference_hd%u_rd%u%s_q%u (max diff %.2g)",
	       d, rd, neox ? "_neox" : "", n_q, att_err);
	kvq_kv_seq_release(c, &s);
	kvq_kv_destroy(c);
out:
	free(ctr);
	free(keys);
	free(v);
	free(q);
	free(out);
}

/* ---------------------------------------------------- pool accounting */

static void pool_accounting(void)
{
	struct kvq_kv_opts o = { .n_layers = 1, .n_kv_heads = 1,
				 .head_dim = 8, .page_tokens = 4,
				 .n_pages = 4 };
	struct kvq_kvcache *c;
	struct kvq_kv_seq a, b;
	float k[8] = { 42 }, v[8] = { 0 }, r[8];

	if (kvq_kv_create(&o, &c)) {
		tap_ok(0, "kvq_kv_create");
		return;
	}
	kvq_kv_seq_init(&a);
	kvq_kv_seq_init(&b);
	tap_ok(kvq_kv_seq_reserve(c, &a, 10) == 0 && a.n_pages == 3,
	       "kvq_kv_seq_reserve_allocates_ceil_pages");
	tap_ok(kvq_kv_seq_reserve(c, &b, 8) == -ENOSPC && b.n_pages == 0 &&
	       c->n_free == 1, "kvq_kv_seq_reserve_full_pool_fails_unchanged");
	kvq_kv_seq_commit(&a, 10);
	tap_ok(kvq_kv_bytes_used(c) == 3ull * 2 * (4 * 8 * 4),
	       "kvq_kv_bytes_used_counts_pages (%llu)",
	       (unsigned long long)kvq_kv_bytes_used(c));
	kvq_kv_seq_truncate(c, &a, 5);
	tap_ok(a.n_pages == 2 && a.n_tokens == 5 && c->n_free == 2,
	       "kvq_kv_seq_truncate_releases_tail_pages");
	kvq_kv_write(c, &a, 0, 4, k, v);
	/* Share the first 5 tokens: 2 pages, the second one partial. */
	tap_ok(kvq_kv_seq_fork(c, &b, &a, 5) == 0 && c->refcnt[a.pages[0]] == 2 &&
	       c->refcnt[a.pages[1]] == 2 && c->n_free == 2,
	       "kvq_kv_seq_fork_shares_pages");
	/* b writes token 5 into the shared partial page: it must copy it. */
	tap_ok(kvq_kv_seq_reserve(c, &b, 1) == 0 && b.pages[1] != a.pages[1] &&
	       c->refcnt[a.pages[1]] == 1 && b.pages[0] == a.pages[0],
	       "kvq_kv_seq_reserve_copies_shared_page_on_write");
	kvq_kv_read(c, &b, 0, 4, 0, false, r);
	tap_ok(r[0] == 42.0f, "kvq_kv_seq_reserve_copy_keeps_contents");
	kvq_kv_seq_commit(&b, 1);
	kvq_kv_seq_release(c, &a);
	kvq_kv_seq_release(c, &b);
	tap_ok(c->n_free == 4, "kvq_kv_seq_release_shared_pages_freed_once");
	kvq_kv_destroy(c);
}

/* Attention over a shared prefix equals attention over a private copy. */
static void shared_prefix_attention(void)
{
	struct kvq_kv_opts o = { .n_layers = 1, .n_kv_heads = 1,
				 .head_dim = 64, .page_tokens = 16,
				 .n_pages = 16, .n_sink = 4 };
	struct kvq_kvcache *c;
	struct kvq_kv_seq a, b;
	double e;

	o.type_k[0] = KVQ_KV_Q8;
	o.type_v[0] = KVQ_KV_Q4;
	if (kvq_kv_create(&o, &c))
		return;
	kvq_kv_seq_init(&a);
	kvq_kv_seq_init(&b);
	fill(c, &a, 40);
	kvq_kv_seq_fork(c, &b, &a, 40);
	fill(c, &b, 9);
	fill(c, &a, 3);
	e = attend_check(c, &b, 0, 0, 49);
	tap_ok(e < 2e-6 && b.pages[0] == a.pages[0] && b.pages[2] != a.pages[2],
	       "kvq_kv_attend_shared_prefix_pages (max diff %.2g)", e);
	kvq_kv_seq_release(c, &a);
	kvq_kv_seq_release(c, &b);
	kvq_kv_destroy(c);
}

static void bad_options_refused(void)
{
	struct kvq_kv_opts o = { .n_layers = 1, .n_kv_heads = 1,
				 .head_dim = 48, .page_tokens = 16,
				 .n_pages = 4 };
	struct kvq_kvcache *c = NULL;
	enum kvq_kv_type t;

	o.type_k[0] = KVQ_KV_Q4;
	tap_ok(kvq_kv_create(&o, &c) == -EINVAL,
	       "kvq_kv_create_head_dim_not_multiple_of_group_refused");
	o.head_dim = 64;
	o.type_k[0] = 9;
	tap_ok(kvq_kv_create(&o, &c) == -EINVAL, "kvq_kv_create_unknown_type_refused");
	{
		float ctr[64] = { 0 };
		uint32_t rds[] = { 0, 7, 66 };	/* none, odd, past head_dim */
		size_t i;
		bool all = true;

		o.type_k[0] = KVQ_KV_Q4;
		o.k_center = ctr;
		for (i = 0; i < sizeof(rds) / sizeof(rds[0]); i++) {
			o.rope_dim = rds[i];
			all &= kvq_kv_create(&o, &c) == -EINVAL;
		}
		o.rope_dim = 64;
		if (kvq_kv_create(&o, &c) == 0)
			kvq_kv_destroy(c);
		else
			all = false;
		tap_ok(all, "kvq_kv_create_centres_need_a_valid_rope_dim");
		o.k_center = NULL;
	}
	tap_ok(kvq_kv_type_parse("q4", &t) == 0 && t == KVQ_KV_Q4 &&
	       kvq_kv_type_parse("q5", &t) == -EINVAL,
	       "kvq_kv_type_parse_names");
}

/* The AVX2 row dequantization equals the scalar twin bit for bit. */
static void simd_rows_match_scalar(void)
{
	static const enum kvq_kv_type types[] = { KVQ_KV_F16, KVQ_KV_Q8,
						  KVQ_KV_Q4 };
	size_t ti;

	if (!kvq_quant_simd()) {
		tap_ok(1, "kvq_kv_dequant_row_avx2_matches_scalar # SKIP no AVX2 (or KVQ_NO_SIMD)");
		return;
	}
	for (ti = 0; ti < 3; ti++) {
		float x[128], a[128], b[128];
		uint8_t data[512];
		uint16_t sc[4];
		int r, i, same = 1;

		for (r = 0; r < 100; r++) {
			for (i = 0; i < 128; i++)
				x[i] = frand() * (1 + r);
			kvq_kv_quant_row(types[ti], x, 128, 32, data, sc);
			kvq_kv_dequant_row(types[ti], data, sc, 128, 32, a);
			for (i = 0; i < 128; i++)
				b[i] = NAN;
			if (!kvq_kv_dequant_row_avx2(types[ti], data, sc, 128,
						     32, b) ||
			    memcmp(a, b, sizeof(a)))
				same = 0;
		}
		tap_ok(same, "kvq_kv_dequant_row_avx2_%s_matches_scalar_bitwise",
		       kvq_kv_type_name(types[ti]));
	}
}

/* The page softmax's exp: close to exp() in double, sum included. */
static void exp_sum_accuracy(void)
{
	float x[61];
	double worst = 0, sum = 0, got;
	int i;

	for (i = 0; i < 61; i++)
		x[i] = i == 0 ? 0.0f : i == 60 ? -100.0f : frand() * 40 - 45;
	for (i = 0; i < 61; i++)
		sum += exp((double)x[i] - 0.5);
	got = kvq_kv_exp_sum_avx2(x, 61, 0.5f);
	worst = fabs(got - sum) / sum;
	tap_ok(worst < 1e-6 && x[60] < 1e-37f,
	       "kvq_kv_exp_sum_avx2_relative_error (%.2g)", worst);
}

/* One code of a q8/q4 row as kvq_kv_quant_row() packs it. */
static int code_at(enum kvq_kv_type t, const uint8_t *data, uint32_t i)
{
	if (t == KVQ_KV_Q8)
		return (int8_t)data[i];
	return (i % 2 ? data[i / 2] >> 4 : data[i / 2] & 15) - 8;
}

/*
 * kvq_kv_round_pairs(): per RoPE pair the codes within one of the nearest
 * with the least error under the pair's 2x2 form, scales untouched; the
 * nearest codes where the form is the identity (they are optimal then);
 * and, with a form that reads only the pair's sum, a pair whose nearest
 * codes both err by +0.4 of a step moves one code (error 0.8 -> 0.2).
 */
static void round_pairs(void)
{
	static const enum kvq_kv_type types[2] = { KVQ_KV_Q8, KVQ_KV_Q4 };
	const uint32_t d = 64, group = 32;
	int k, n, i;

	for (k = 0; k < 2; k++) {
		enum kvq_kv_type t = types[k];
		int lo = t == KVQ_KV_Q8 ? -127 : -8, hi = t == KVQ_KV_Q8 ? 127 : 7;
		int bad_range = 0, bad_min = 0, bad_id = 0, moved = 0, bad_sc = 0;

		for (n = 0; n < 200; n++) {
			float x[64], w[128], wi[128];
			uint8_t near[64], got[64], idd[64];
			uint16_t sc[2], sc2[2], sc3[2];

			for (i = 0; i < (int)d; i++)
				x[i] = frand() * (i % 8 == 0 ? 6.0f : 1.0f);
			for (i = 0; i < (int)d; i += 2) {
				/* a random positive semi-definite 2x2 form */
				float a = frand(), b = frand(), c = frand(), e = frand();

				w[i] = a * a + b * b;
				w[i + 1] = c * c + e * e;
				w[d + i] = w[d + i + 1] = a * c + b * e;
				wi[i] = wi[i + 1] = 1.0f;
				wi[d + i] = wi[d + i + 1] = 0.0f;
			}
			kvq_kv_quant_row(t, x, d, group, near, sc);
			kvq_kv_quant_row(t, x, d, group, got, sc2);
			kvq_kv_quant_row(t, x, d, group, idd, sc3);
			kvq_kv_round_pairs(t, x, d, group, d, false, w, got, sc2);
			kvq_kv_round_pairs(t, x, d, group, d, false, wi, idd, sc3);
			bad_sc += memcmp(sc, sc2, sizeof(sc)) != 0;
			bad_id += memcmp(near, idd, t == KVQ_KV_Q8 ? d : d / 2) != 0;
			for (i = 0; i < (int)d; i += 2) {
				float si = kvq_f16_to_f32(sc[i / group]);
				int n0 = code_at(t, near, i), n1 = code_at(t, near, i + 1);
				int g0 = code_at(t, got, i), g1 = code_at(t, got, i + 1);
				float best = 1e30f, cost;
				int a0, a1;

				if (g0 < lo || g0 > hi || g1 < lo || g1 > hi ||
				    abs(g0 - n0) > 1 || abs(g1 - n1) > 1)
					bad_range++;
				moved += g0 != n0 || g1 != n1;
				for (a0 = n0 - 1; a0 <= n0 + 1; a0++) {
					for (a1 = n1 - 1; a1 <= n1 + 1; a1++) {
						double d0 = x[i] - a0 * si, d1 = x[i + 1] - a1 * si;

						if (a0 < lo || a0 > hi || a1 < lo || a1 > hi)
							continue;
						cost = (float)(w[i] * d0 * d0 + w[i + 1] * d1 * d1 +
							       2 * w[d + i] * d0 * d1);
						best = cost < best ? cost : best;
					}
				}
				{
					double d0 = x[i] - g0 * si, d1 = x[i + 1] - g1 * si;

					cost = (float)(w[i] * d0 * d0 + w[i + 1] * d1 * d1 +
						       2 * w[d + i] * d0 * d1);
				}
				if (cost > best * (1 + 1e-4f) + 1e-12f)
					bad_min++;
			}
		}
		tap_ok(!bad_range && !bad_min && !bad_sc && moved > 0,
		       "kvq_kv_round_pairs_%s_least_pair_error (%d out of range, %d above the least, %d scales changed, %d pairs moved)",
		       t == KVQ_KV_Q8 ? "q8" : "q4", bad_range, bad_min, bad_sc,
		       moved);
		tap_ok(!bad_id, "kvq_kv_round_pairs_%s_identity_keeps_nearest (%d rows differ)",
		       t == KVQ_KV_Q8 ? "q8" : "q4", bad_id);
	}
	{
		/* q4, head of 8 (one group); amax 7 -> step 1; the pair
		 * (2, 3) is 2.4 and 3.4: nearest 2 and 3, errors +0.4 each,
		 * their sum 0.8; 2 and 4 (or 3 and 3) make it -0.2. */
		float x[8] = { 7.0f, 0.0f, 2.4f, 3.4f, 0.0f, 0.0f, 0.0f, 0.0f };
		float w[16] = { 0 };
		uint8_t data[4];
		uint16_t sc;
		int s0, s1;

		for (i = 0; i < 8; i++)
			w[i] = 1.0f;
		w[8 + 2] = w[8 + 3] = 1.0f;
		kvq_kv_quant_row(KVQ_KV_Q4, x, 8, 8, data, &sc);
		s0 = code_at(KVQ_KV_Q4, data, 2);
		s1 = code_at(KVQ_KV_Q4, data, 3);
		kvq_kv_round_pairs(KVQ_KV_Q4, x, 8, 8, 8, false, w, data, &sc);
		tap_ok(s0 == 2 && s1 == 3 && code_at(KVQ_KV_Q4, data, 2) +
		       code_at(KVQ_KV_Q4, data, 3) == 6 && sc == 0x3c00 &&
		       code_at(KVQ_KV_Q4, data, 0) == 7,
		       "kvq_kv_round_pairs_moves_a_code_when_the_sum_is_read (%d %d -> %d %d)",
		       s0, s1, code_at(KVQ_KV_Q4, data, 2),
		       code_at(KVQ_KV_Q4, data, 3));

		/* neox: the pair of channel 2 is channel 6; channel 3's
		 * neighbour 2 is not its pair and stays nearest */
		x[3] = 0.0f;
		x[6] = 3.4f;
		x[7] = 1.4f;
		w[8 + 3] = w[8 + 7] = 0.0f;
		w[8 + 2] = w[8 + 6] = 1.0f;
		kvq_kv_quant_row(KVQ_KV_Q4, x, 8, 8, data, &sc);
		kvq_kv_round_pairs(KVQ_KV_Q4, x, 8, 8, 8, true, w, data, &sc);
		tap_ok(code_at(KVQ_KV_Q4, data, 2) + code_at(KVQ_KV_Q4, data, 6) == 6 &&
		       code_at(KVQ_KV_Q4, data, 3) == 0 &&
		       code_at(KVQ_KV_Q4, data, 7) == 1,
		       "kvq_kv_round_pairs_neox_pairs_i_and_i_plus_half (%d %d)",
		       code_at(KVQ_KV_Q4, data, 2), code_at(KVQ_KV_Q4, data, 6));
	}
}

int main(void)
{
	exp_sum_accuracy();
	simd_rows_match_scalar();
	quant_row_golden_bytes();
	page_layout_golden();
	round_trip_bounds();
	attend_every_format();
	sink_tokens_kept_f16();
	centred_keys(8, 8, false, 2);
	centred_keys(64, 64, false, 2);
	centred_keys(64, 32, true, 2);
	centred_keys(128, 128, false, 20);
	pool_accounting();
	shared_prefix_attention();
	bad_options_refused();
	round_pairs();
	return tap_done();
}
