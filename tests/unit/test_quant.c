/*
 * test_quant.c - unit tests for engine/quant.h.
 *
 * Why this file exists: the block formats must decode exactly as the GGUF
 * specification says, the f16/bf16 conversions must round correctly for
 * every input, and the SIMD dot products must agree with the scalar twins
 * and with a double-precision reference.  Expected block values are
 * computed here from the layout description, element by element, never by
 * calling the code under test.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/forward_gpu.h"
#include "engine/quant.h"
#include "kernels/gpu_fwd.h"
#include "tap.h"

#define QK	32
#define QKK	256
#define Q8_0_BYTES 34
#define Q4_0_BYTES 18
#define Q4_K_BYTES 144
#define Q6_K_BYTES 210

/* ------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	uint64_t x = rng_state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545f4914f6cdd1dull;
}

/* Uniform in [-1, 1). */
static float frand(void)
{
	return (float)((double)(rng() >> 11) / 4503599627370496.0 - 1.0);
}

static uint32_t bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static float from_bits(uint32_t u)
{
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/* Forces an f32 rounding step, whatever the compiler may fuse. */
static float rnd(float v)
{
	volatile float r = v;

	return r;
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = v & 0xff;
	p[1] = v >> 8;
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

/* IEEE binary16 decoded from its definition, in double. */
static double half_value(uint16_t h)
{
	int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
	double v;

	if (exp == 31)
		v = mant ? NAN : INFINITY;
	else if (exp == 0)
		v = ldexp(mant, -24);
	else
		v = ldexp(mant + 1024, exp - 25);
	return sign ? -v : v;
}

/* A random f16 scale: either sign, magnitudes from subnormal to ~100. */
static uint16_t rand_scale(void)
{
	uint16_t h;

	switch (rng() % 4) {
	case 0:			/* subnormal or tiny */
		h = (uint16_t)(1 + rng() % 0x07ff);
		break;
	case 1:			/* around 1e-3 .. 1 */
		h = (uint16_t)(0x1400 + rng() % 0x2800);
		break;
	default:		/* anything finite and non-zero */
		h = (uint16_t)(1 + rng() % 0x7bfe);
		break;
	}
	return h | (rng() & 1 ? 0x8000 : 0);
}

/* Compares @n floats bit for bit; reports the first difference. */
static int same_bits(const float *got, const float *want, int64_t n,
		     const char *what)
{
	for (int64_t i = 0; i < n; i++) {
		if (bits(got[i]) != bits(want[i])) {
			tap_diag("%s: element %lld: got %.9g (0x%08x), want "
				 "%.9g (0x%08x)", what, (long long)i, got[i],
				 bits(got[i]), want[i], bits(want[i]));
			return 0;
		}
	}
	return 1;
}

/* ----------------------------------------------- expected dequantization */

/* Q8_0: block = f16 d, 32 x int8; x = d * q. */
static float want_q8_0(const uint8_t *row, int64_t i)
{
	const uint8_t *b = row + (i / QK) * Q8_0_BYTES;
	float d = (float)half_value(get16(b));
	int q = (int8_t)b[2 + i % QK];

	return rnd((float)q * d);
}

/* Q4_0: f16 d, 16 bytes; element j low nibble of byte j, j+16 high nibble. */
static float want_q4_0(const uint8_t *row, int64_t i)
{
	const uint8_t *b = row + (i / QK) * Q4_0_BYTES;
	float d = (float)half_value(get16(b));
	int j = i % QK;
	int q = j < 16 ? b[2 + j] & 15 : b[2 + j - 16] >> 4;

	return rnd((float)(q - 8) * d);
}

/*
 * Q4_K: f16 d, f16 dmin, 12 scale bytes, 128 q bytes.  Scale bytes: 0-3
 * hold sc0-3 in their low 6 bits, 4-7 hold m0-3; 8-11 hold the low 4 bits
 * of sc4-7 (low nibble) and m4-7 (high nibble), whose top 2 bits are the
 * top 2 bits of bytes 0-3 (sc) and 4-7 (m).
 */
static void unpack_q4k_scales(const uint8_t *s, int sc[8], int mn[8])
{
	for (int j = 0; j < 4; j++) {
		sc[j] = s[j] & 63;
		mn[j] = s[4 + j] & 63;
		sc[4 + j] = (s[8 + j] & 15) | (s[j] >> 6) << 4;
		mn[4 + j] = (s[8 + j] >> 4) | (s[4 + j] >> 6) << 4;
	}
}

/*
 * Element e of a super-block is in sub-block e/32; sub-blocks 2c and 2c+1
 * share q bytes 32c..32c+31, low nibbles for the even one.
 */
static float want_q4_k(const uint8_t *row, int64_t i)
{
	const uint8_t *b = row + (i / QKK) * Q4_K_BYTES;
	int e = i % QKK, sub = e / 32, c = e / 64;
	int byte = b[16 + 32 * c + e % 32];
	int q = sub % 2 ? byte >> 4 : byte & 15;
	float d = (float)half_value(get16(b));
	float dmin = (float)half_value(get16(b + 2));
	int sc[8], mn[8];

	unpack_q4k_scales(b + 4, sc, mn);
	return rnd(rnd(rnd(d * (float)sc[sub]) * (float)q) -
		   rnd(dmin * (float)mn[sub]));
}

/*
 * Q6_K: ql[128], qh[64], int8 scales[16], f16 d.  Element e: half h = e/128,
 * r = e%128, quarter k = r/32, l = r%32.  Low 4 bits: ql[64h + l + 32(k&1)],
 * the high nibble for k >= 2; top 2 bits: bits 2k..2k+1 of qh[32h + l].
 * Scale: scales[8h + 2k + l/16].  x = d * scale * (q - 32).
 */
static float want_q6_k(const uint8_t *row, int64_t i)
{
	const uint8_t *b = row + (i / QKK) * Q6_K_BYTES;
	int e = i % QKK, h = e / 128, r = e % 128, k = r / 32, l = r % 32;
	int lo = b[64 * h + l + 32 * (k & 1)];
	int hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
	int q = (k >= 2 ? lo >> 4 : lo & 15) | hi << 4;
	int sc = (int8_t)b[192 + 8 * h + 2 * k + l / 16];
	float d = (float)half_value(get16(b + 208));

	return rnd(rnd(d * (float)sc) * (float)(q - 32));
}

/* ---------------------------------------------------- type descriptions */

struct qtype {
	uint32_t type;
	const char *name;
	int block;		/* elements */
	int bytes;		/* per block */
};

static const struct qtype types[] = {
	{ KVQ_TYPE_F32, "f32", 1, 4 },
	{ KVQ_TYPE_F16, "f16", 1, 2 },
	{ KVQ_TYPE_BF16, "bf16", 1, 2 },
	{ KVQ_TYPE_Q8_0, "q8_0", QK, Q8_0_BYTES },
	{ KVQ_TYPE_Q4_0, "q4_0", QK, Q4_0_BYTES },
	{ KVQ_TYPE_Q4_K, "q4_k", QKK, Q4_K_BYTES },
	{ KVQ_TYPE_Q6_K, "q6_k", QKK, Q6_K_BYTES },
};

#define N_TYPES (sizeof(types) / sizeof(types[0]))

/* Fills a row of @n elements with random bytes and random valid scales. */
static void rand_row(const struct qtype *t, uint8_t *row, int64_t n)
{
	int64_t nb = n / t->block;

	for (int64_t i = 0; i < nb * t->bytes; i++)
		row[i] = (uint8_t)rng();
	for (int64_t i = 0; i < nb; i++) {
		uint8_t *b = row + i * t->bytes;
		float scale = ldexpf(1.0f, (int)(rng() % 40) - 20);

		switch (t->type) {
		case KVQ_TYPE_F32:
			memcpy(b, &(float){ frand() * scale }, 4);
			break;
		case KVQ_TYPE_F16:
			put16(b, kvq_f32_to_f16(frand() * (scale / 64)));
			break;
		case KVQ_TYPE_BF16:
			put16(b, kvq_f32_to_bf16(frand() * scale));
			break;
		case KVQ_TYPE_Q8_0:
		case KVQ_TYPE_Q4_0:
			put16(b, rand_scale());
			break;
		case KVQ_TYPE_Q4_K:
			put16(b, rand_scale());
			put16(b + 2, rand_scale());
			break;
		case KVQ_TYPE_Q6_K:
			put16(b + 208, rand_scale());
			break;
		}
	}
}

/* ------------------------------------------------------- golden bytes */

static void test_golden_q8_0(void)
{
	uint8_t blk[2 * Q8_0_BYTES] = { 0 };
	float got[2 * QK], want[2 * QK];
	int ok;

	put16(blk, 0x3800);			/* d = 0.5 */
	blk[2 + 0] = 0x80;			/* -128 */
	blk[2 + 1] = 0xff;			/* -1 */
	blk[2 + 2] = 0x01;
	blk[2 + 31] = 0x7f;			/* 127 */
	put16(blk + Q8_0_BYTES, 0xc000);	/* d = -2 */
	blk[Q8_0_BYTES + 2 + 5] = 3;
	ok = kvq_dequant_row(KVQ_TYPE_Q8_0, blk, got, 2 * QK) == 0;
	ok = ok && got[0] == -64.0f && got[1] == -0.5f && got[2] == 0.5f &&
	     got[3] == 0.0f && got[31] == 63.5f && got[QK + 5] == -6.0f &&
	     bits(got[QK]) == 0x80000000u;	/* 0 * -2 = -0 */
	tap_ok(ok, "kvq_dequant_row_q8_0_known_values");

	for (int i = 0; i < 2 * Q8_0_BYTES; i++)
		blk[i] = (uint8_t)rng();
	put16(blk, rand_scale());
	put16(blk + Q8_0_BYTES, rand_scale());
	for (int i = 0; i < 2 * QK; i++)
		want[i] = want_q8_0(blk, i);
	ok = kvq_dequant_row(KVQ_TYPE_Q8_0, blk, got, 2 * QK) == 0 &&
	     same_bits(got, want, 2 * QK, "q8_0");
	tap_ok(ok, "kvq_dequant_row_q8_0_formula");
}

static void test_golden_q4_0(void)
{
	uint8_t blk[3 * Q4_0_BYTES] = { 0 };
	float got[3 * QK], want[3 * QK];
	int ok;

	put16(blk, 0x4000);			/* d = 2 */
	blk[2 + 0] = 0x1f;			/* e0 = 15, e16 = 1 */
	blk[2 + 15] = 0x80;			/* e15 = 0, e31 = 8 */
	ok = kvq_dequant_row(KVQ_TYPE_Q4_0, blk, got, QK) == 0;
	ok = ok && got[0] == 14.0f && got[16] == -14.0f &&
	     got[15] == -16.0f && got[31] == 0.0f && got[1] == -16.0f;
	tap_ok(ok, "kvq_dequant_row_q4_0_known_values");

	for (int i = 0; i < 3 * Q4_0_BYTES; i++)
		blk[i] = (uint8_t)rng();
	for (int i = 0; i < 3; i++)
		put16(blk + i * Q4_0_BYTES, rand_scale());
	for (int i = 0; i < 3 * QK; i++)
		want[i] = want_q4_0(blk, i);
	ok = kvq_dequant_row(KVQ_TYPE_Q4_0, blk, got, 3 * QK) == 0 &&
	     same_bits(got, want, 3 * QK, "q4_0");
	tap_ok(ok, "kvq_dequant_row_q4_0_formula");
}

static void test_golden_q4_k(void)
{
	uint8_t blk[2 * Q4_K_BYTES] = { 0 };
	float got[2 * QKK], want[2 * QKK];
	int ok;

	put16(blk, 0x3c00);		/* d = 1 */
	put16(blk + 2, 0x3800);		/* dmin = 0.5 */
	blk[4 + 0] = 2;			/* sc0 = 2 */
	blk[4 + 4] = 4;			/* m0 = 4 */
	blk[4 + 1] = 3;			/* sc1 = 3, m1 = 0 */
	/* sub-block 5: sc5 = 0x25 (37), m5 = 0x3a (58) */
	blk[4 + 9] = 0xa5;		/* low nibbles: sc 5, m 10 */
	blk[4 + 1] |= 2 << 6;		/* sc5 top bits 2 -> 0x20 | 5 */
	blk[4 + 5] = 3 << 6;		/* m5 top bits 3 -> 0x30 | 10 */
	blk[16 + 0] = 0x53;		/* e0: q 3 (sb0), e32: q 5 (sb1) */
	blk[16 + 64 + 7] = 0x9f;	/* e135: q 15 (sb4), e167: q 9 (sb5) */
	ok = kvq_dequant_row(KVQ_TYPE_Q4_K, blk, got, QKK) == 0;
	/* e0 = 1*2*3 - 0.5*4; e32 = 1*3*5 - 0; e167 = 37*9 - 0.5*58 */
	ok = ok && got[0] == 4.0f && got[32] == 15.0f &&
	     got[167] == 333.0f - 29.0f && got[1] == -2.0f &&
	     got[135] == 0.0f;
	tap_ok(ok, "kvq_dequant_row_q4_k_known_values");

	for (int i = 0; i < 2 * Q4_K_BYTES; i++)
		blk[i] = (uint8_t)rng();
	for (int i = 0; i < 2; i++) {
		put16(blk + i * Q4_K_BYTES, rand_scale());
		put16(blk + i * Q4_K_BYTES + 2, rand_scale());
	}
	for (int i = 0; i < 2 * QKK; i++)
		want[i] = want_q4_k(blk, i);
	ok = kvq_dequant_row(KVQ_TYPE_Q4_K, blk, got, 2 * QKK) == 0 &&
	     same_bits(got, want, 2 * QKK, "q4_k");
	tap_ok(ok, "kvq_dequant_row_q4_k_formula");
}

static void test_golden_q6_k(void)
{
	uint8_t blk[2 * Q6_K_BYTES] = { 0 };
	float got[2 * QKK], want[2 * QKK];
	int ok;

	put16(blk + 208, 0x3400);	/* d = 0.25 */
	blk[192 + 0] = 4;		/* scale of e0..15 */
	blk[192 + 2] = 0xfc;		/* -4: e32..47 */
	blk[192 + 4] = 1;		/* e64..79 */
	blk[192 + 8 + 6] = 2;		/* second half, e224..239 */
	blk[0] = 0x21;			/* e0 low 1, e64 low 2 */
	blk[32] = 0x0f;			/* e32 low 15 */
	blk[128] = 0x1b;		/* e0 hi 3, e32 hi 2, e64 hi 1 */
	blk[64 + 32 + 3] = 0x70;	/* e227 low 7 */
	blk[128 + 32 + 3] = 0x80;	/* e227 hi 2 */
	ok = kvq_dequant_row(KVQ_TYPE_Q6_K, blk, got, QKK) == 0;
	/* e0: q 0x31 = 49 -> 0.25*4*17; e32: q 0x2f = 47 -> -1*15;
	 * e64: q 0x12 = 18 -> 0.25*(-14); e227: q 0x27 = 39 -> 0.5*7;
	 * e1: q 0 -> 0.25*4*(-32) */
	ok = ok && got[0] == 17.0f && got[32] == -15.0f &&
	     got[64] == -3.5f && got[227] == 3.5f && got[1] == -32.0f;
	tap_ok(ok, "kvq_dequant_row_q6_k_known_values");

	for (int i = 0; i < 2 * Q6_K_BYTES; i++)
		blk[i] = (uint8_t)rng();
	put16(blk + 208, rand_scale());
	put16(blk + Q6_K_BYTES + 208, rand_scale());
	for (int i = 0; i < 2 * QKK; i++)
		want[i] = want_q6_k(blk, i);
	ok = kvq_dequant_row(KVQ_TYPE_Q6_K, blk, got, 2 * QKK) == 0 &&
	     same_bits(got, want, 2 * QKK, "q6_k");
	tap_ok(ok, "kvq_dequant_row_q6_k_formula");
}

static void test_golden_float_rows(void)
{
	uint8_t h[8];
	float got[4], f[3] = { 1.5f, -0.0f, 1e-40f };
	int ok;

	put16(h, 0x3c00);		/* 1 */
	put16(h + 2, 0xc500);		/* -5 */
	put16(h + 4, 0x0001);		/* 2^-24 */
	put16(h + 6, 0x7bff);		/* 65504 */
	ok = kvq_dequant_row(KVQ_TYPE_F16, h, got, 4) == 0 &&
	     got[0] == 1.0f && got[1] == -5.0f &&
	     got[2] == ldexpf(1.0f, -24) && got[3] == 65504.0f;
	tap_ok(ok, "kvq_dequant_row_f16_known_values");

	put16(h, 0x3f80);		/* 1 */
	put16(h + 2, 0xc0a0);		/* -5 */
	put16(h + 4, 0x0001);		/* smallest subnormal bf16 */
	put16(h + 6, 0x7f80);		/* inf */
	ok = kvq_dequant_row(KVQ_TYPE_BF16, h, got, 4) == 0 &&
	     got[0] == 1.0f && got[1] == -5.0f &&
	     got[2] == ldexpf(1.0f, -133) && isinf(got[3]);
	tap_ok(ok, "kvq_dequant_row_bf16_known_values");

	ok = kvq_dequant_row(KVQ_TYPE_F32, f, got, 3) == 0 &&
	     same_bits(got, f, 3, "f32");
	tap_ok(ok, "kvq_dequant_row_f32_copies");
}

/* ------------------------------------------------------ f16 and bf16 */

static void test_f16_to_f32_exhaustive(void)
{
	int bad = 0;

	for (uint32_t h = 0; h < 65536; h++) {
		float got = kvq_f16_to_f32((uint16_t)h);
		double want = half_value((uint16_t)h);
		int ok;

		if (isnan(want))
			ok = isnan(got) && (bits(got) >> 31) == (h >> 15);
		else
			ok = (double)got == want &&
			     (bits(got) >> 31) == (h >> 15);
		if (!ok && bad++ < 5)
			tap_diag("half 0x%04x: got %.9g", h, got);
	}
	tap_ok(!bad, "kvq_f16_to_f32_exhaustive");
}

static void test_f16_roundtrip_exhaustive(void)
{
	int bad = 0;

	for (uint32_t h = 0; h < 65536; h++) {
		uint16_t back = kvq_f32_to_f16(kvq_f16_to_f32((uint16_t)h));
		int nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
		int ok;

		if (nan)	/* stays a NaN of the same sign */
			ok = (back & 0x7c00) == 0x7c00 && (back & 0x3ff) &&
			     (back & 0x8000) == (h & 0x8000);
		else
			ok = back == h;
		if (!ok && bad++ < 5)
			tap_diag("half 0x%04x came back as 0x%04x", h, back);
	}
	tap_ok(!bad, "kvq_f32_to_f16_roundtrip_exhaustive");
}

/*
 * Every midpoint between two adjacent halves (exact in f32) must round to
 * the even one, and the floats just either side of it to the nearer one.
 */
static void test_f16_ties_exhaustive(void)
{
	int bad = 0;

	for (uint32_t h = 0; h < 0x7c00; h++) {
		for (int s = 0; s < 2; s++) {
			uint16_t sign = s ? 0x8000 : 0;
			/* past 65504 the next step would be 65536 */
			double next = h + 1 == 0x7c00 ? 65536.0 :
				      half_value((uint16_t)(h + 1));
			float mid = (float)((half_value((uint16_t)h) + next) /
					    2);
			float below, above;
			uint16_t even = (h & 1) ? h + 1 : h;

			if (s)
				mid = -mid;
			below = nextafterf(mid, 0.0f);
			above = nextafterf(mid, s ? -INFINITY : INFINITY);
			if (kvq_f32_to_f16(mid) != (even | sign) ||
			    kvq_f32_to_f16(below) != (h | sign) ||
			    kvq_f32_to_f16(above) != ((h + 1) | sign)) {
				if (bad++ < 5)
					tap_diag("tie after 0x%04x (sign %d)",
						 h, s);
			}
		}
	}
	tap_ok(!bad, "kvq_f32_to_f16_ties_to_even_exhaustive");
}

static void test_f16_known(void)
{
	static const struct {
		float f;
		uint16_t h;
	} k[] = {
		{ 1.0f, 0x3c00 }, { -2.0f, 0xc000 }, { 0.0f, 0x0000 },
		{ -0.0f, 0x8000 }, { 65504.0f, 0x7bff },
		{ 65519.99f, 0x7bff }, { 65520.0f, 0x7c00 },
		{ 1e10f, 0x7c00 }, { -1e10f, 0xfc00 },
		{ INFINITY, 0x7c00 }, { -INFINITY, 0xfc00 },
		{ 0x1p-14f, 0x0400 }, { 0x1p-24f, 0x0001 },
		{ 0x1p-25f, 0x0000 }, { 0x1.000002p-25f, 0x0001 },
		{ -0x1p-26f, 0x8000 }, { 0x1.8p-24f, 0x0002 },
		{ 0x1.ff8p-15f, 0x03ff }, { 0x1.ffcp-15f, 0x0400 },
		{ 1e-30f, 0x0000 },
		{ 0.1f, 0x2e66 }, { 1.0f / 3, 0x3555 }, { 3.140625f, 0x4248 },
		{ 2049.0f, 0x6800 }, { 2051.0f, 0x6802 },
	};
	int bad = 0;
	uint16_t n;

	for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
		uint16_t got = kvq_f32_to_f16(k[i].f);

		if (got != k[i].h && bad++ < 5)
			tap_diag("%a: got 0x%04x want 0x%04x", k[i].f, got,
				 k[i].h);
	}
	n = kvq_f32_to_f16(from_bits(0xffc00001));
	if ((n & 0xfc00) != 0xfc00 || !(n & 0x3ff))
		bad++;
	n = kvq_f32_to_f16(from_bits(0x7f800001));	/* signalling NaN */
	if ((n & 0xfc00) != 0x7c00 || !(n & 0x200))
		bad++;
	tap_ok(!bad, "kvq_f32_to_f16_known_values");
}

#ifdef __FLT16_MAX__
/* The compiler's own _Float16 conversion is an independent oracle. */
static void test_f16_vs_float16(void)
{
	int bad = 0;

	for (int i = 0; i < 2000000; i++) {
		uint32_t u = (uint32_t)rng();
		float f;
		_Float16 ref;
		uint16_t want;

		/* every other one in (or near) the range of halves */
		if (i & 1)
			u = (u & 0x80ffffff) |
			    (uint32_t)(0x30 + i % 0x18) << 24;
		f = from_bits(u);
		if (isnan(f))
			continue;
		ref = (_Float16)f;
		memcpy(&want, &ref, sizeof(want));
		if (kvq_f32_to_f16(f) != want && bad++ < 5)
			tap_diag("%a: got 0x%04x want 0x%04x", f,
				 kvq_f32_to_f16(f), want);
	}
	tap_ok(!bad, "kvq_f32_to_f16_matches_float16_random");
}
#endif

static void test_bf16(void)
{
	static const struct {
		uint32_t f;
		uint16_t h;
	} k[] = {
		{ 0x3f800000, 0x3f80 }, { 0xc0000000, 0xc000 },
		{ 0x40490fdb, 0x4049 },		/* pi */
		{ 0x3f808000, 0x3f80 },		/* tie, even below */
		{ 0x3f818000, 0x3f82 },		/* tie, even above */
		{ 0x3f808001, 0x3f81 },
		{ 0x7f7fffff, 0x7f80 },		/* max float -> inf */
		{ 0xff800000, 0xff80 }, { 0x80000000, 0x8000 },
		{ 0x00000001, 0x0000 },		/* tiny -> +0 */
		{ 0x00018000, 0x0002 },		/* subnormal tie, even */
	};
	int bad = 0;
	uint16_t n;

	for (uint32_t h = 0; h < 65536; h++) {
		float f = kvq_bf16_to_f32((uint16_t)h);
		int nan = (h & 0x7f80) == 0x7f80 && (h & 0x7f);

		if (bits(f) != h << 16 && bad++ < 5)
			tap_diag("bf16 0x%04x widened to 0x%08x", h, bits(f));
		if (!nan && kvq_f32_to_bf16(f) != h && bad++ < 5)
			tap_diag("bf16 0x%04x came back wrong", h);
	}
	tap_ok(!bad, "kvq_bf16_to_f32_exhaustive_roundtrip");

	bad = 0;
	for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
		uint16_t got = kvq_f32_to_bf16(from_bits(k[i].f));

		if (got != k[i].h && bad++ < 5)
			tap_diag("0x%08x: got 0x%04x want 0x%04x", k[i].f,
				 got, k[i].h);
	}
	n = kvq_f32_to_bf16(from_bits(0x7f800001));	/* NaN, not inf */
	if ((n & 0x7f80) != 0x7f80 || !(n & 0x7f))
		bad++;
	n = kvq_f32_to_bf16(from_bits(0xffffffff));
	if ((n & 0xff80) != 0xff80 || !(n & 0x7f))
		bad++;
	tap_ok(!bad, "kvq_f32_to_bf16_known_values");
}

/* ---------------------------------------------------------- dot products */

#define TOL 1e-5

/*
 * For one type and length: several random rows; the SIMD result (whatever
 * kvq_vec_dot() picked), the scalar twin and a double-precision dot of the
 * dequantized row must agree within TOL * sum|w*x|.
 */
static void test_vec_dot(const struct qtype *t, int64_t n)
{
	int64_t bytes = n / t->block * t->bytes;
	uint8_t *row = malloc((size_t)bytes);
	float *x = malloc((size_t)n * sizeof(float));
	float *w = malloc((size_t)n * sizeof(float));
	double worst_simd = 0, worst_scalar = 0;
	int ok = row && x && w;

	for (int trial = 0; ok && trial < 12; trial++) {
		double ref = 0, mag = 0, e1, e2;
		float simd, scalar;

		rand_row(t, row, n);
		for (int64_t i = 0; i < n; i++)
			x[i] = frand() * (trial % 3 ? 1.0f : 1e-3f);
		if (kvq_dequant_row(t->type, row, w, n) != 0) {
			ok = 0;
			break;
		}
		for (int64_t i = 0; i < n; i++) {
			ref += (double)w[i] * x[i];
			mag += fabs((double)w[i] * x[i]);
		}
		simd = kvq_vec_dot(t->type, row, x, n);
		scalar = kvq_vec_dot_scalar(t->type, row, x, n);
		e1 = mag > 0 ? fabs(simd - ref) / mag : fabs(simd - ref);
		e2 = mag > 0 ? fabs(scalar - ref) / mag : fabs(scalar - ref);
		worst_simd = fmax(worst_simd, e1);
		worst_scalar = fmax(worst_scalar, e2);
		if (!(e1 <= TOL) || !(e2 <= TOL)) {
			tap_diag("%s n=%lld: ref %.9g simd %.9g scalar %.9g "
				 "sum|wx| %.9g", t->name, (long long)n, ref,
				 simd, scalar, mag);
			ok = 0;
		}
	}
	tap_ok(ok, "kvq_vec_dot_%s_n%lld_matches_reference", t->name,
	       (long long)n);
	if (ok && n >= 4096)
		tap_diag("%s n=%lld: worst relative error simd %.2e, "
			 "scalar %.2e", t->name, (long long)n, worst_simd,
			 worst_scalar);
	free(row);
	free(x);
	free(w);
}

static void test_vec_dots(void)
{
	static const int64_t small[] = { 1, 7, 8, 31, 33, 100, 4096, 11008 };
	static const int64_t q32[] = { 32, 64, 96, 416, 4096, 11008 };
	static const int64_t qk[] = { 256, 512, 768, 4096, 11008 };

	for (size_t i = 0; i < N_TYPES; i++) {
		const int64_t *len = types[i].block == 1 ? small :
				     types[i].block == QK ? q32 : qk;
		size_t nlen = types[i].block == 1 ? 8 :
			      types[i].block == QK ? 6 : 5;

		for (size_t j = 0; j < nlen; j++)
			test_vec_dot(&types[i], len[j]);
	}
}

static void test_dot_f32(void)
{
	static const int64_t len[] = { 0, 1, 5, 8, 9, 31, 32, 33, 63, 1000,
				       4099 };
	int ok = 1;

	for (size_t j = 0; j < sizeof(len) / sizeof(len[0]); j++) {
		int64_t n = len[j];
		float a[4099], b[4099];
		double ref = 0, mag = 0;
		float s1, s2;

		for (int64_t i = 0; i < n; i++) {
			a[i] = frand();
			b[i] = frand() * 100;
			ref += (double)a[i] * b[i];
			mag += fabs((double)a[i] * b[i]);
		}
		s1 = kvq_dot_f32(a, b, n);
		s2 = kvq_dot_f32_scalar(a, b, n);
		if (fabs(s1 - ref) > TOL * mag || fabs(s2 - ref) > TOL * mag) {
			tap_diag("n=%lld: ref %.9g got %.9g / %.9g",
				 (long long)n, ref, s1, s2);
			ok = 0;
		}
	}
	tap_ok(ok, "kvq_dot_f32_matches_reference");
}

/* The SIMD row dequantizers give the reference's bits for every type. */
static void test_dequant_simd_bitwise(void)
{
	for (size_t ti = 0; ti < N_TYPES; ti++) {
		const struct qtype *t = &types[ti];
		int64_t n = 4 * QKK + (t->block == 1 ? 7 : 0);
		uint8_t *row = malloc((size_t)(n / t->block) * t->bytes);
		float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
		int same = 1;

		for (int trial = 0; trial < 50; trial++) {
			rand_row(t, row, n);
			for (int64_t i = 0; i < n; i++)
				a[i] = b[i] = NAN;
			kvq_quant_force_scalar(true);
			kvq_dequant_row(t->type, row, a, n);
			kvq_quant_force_scalar(false);
			kvq_dequant_row(t->type, row, b, n);
			for (int64_t i = 0; i < n; i++) {
				uint32_t x, y;

				memcpy(&x, &a[i], 4);
				memcpy(&y, &b[i], 4);
				/* NaN payloads from random f16/bf16 bits may differ
				 * only in quietness; everything else must match. */
				if (x != y && !(isnan(a[i]) && isnan(b[i])))
					same = 0;
			}
		}
		tap_ok(same, "kvq_dequant_row_%s_simd_equals_scalar_bitwise (%s)",
		       t->name, kvq_quant_simd_name());
		free(row);
		free(a);
		free(b);
	}
}

/* With the scalar path forced, kvq_vec_dot() is the scalar twin exactly. */
static void test_force_scalar(void)
{
	const char *before = kvq_quant_simd_name();
	uint8_t row[4 * Q6_K_BYTES];
	float x[4 * QKK];
	int ok = 1;

	kvq_quant_force_scalar(true);
	ok = strcmp(kvq_quant_simd_name(), "scalar") == 0;
	for (size_t i = 0; ok && i < N_TYPES; i++) {
		int64_t n = types[i].block == 1 ? 100 : 4 * types[i].block;

		rand_row(&types[i], row, n);
		for (int64_t j = 0; j < n; j++)
			x[j] = frand();
		if (bits(kvq_vec_dot(types[i].type, row, x, n)) !=
		    bits(kvq_vec_dot_scalar(types[i].type, row, x, n)))
			ok = 0;
	}
	kvq_quant_force_scalar(false);
	ok = ok && strcmp(kvq_quant_simd_name(), before) == 0;
	tap_ok(ok, "kvq_quant_force_scalar_switches_path");
}

/* KVQ_NO_SIMD=1 is read on first use: check it in a fresh process. */
static void test_env_no_simd(const char *argv0)
{
	const char *self = access("/proc/self/exe", X_OK) == 0 ?
			   "/proc/self/exe" : argv0;
	char buf[64] = "";
	int fd[2], status = 0;
	ssize_t got = 0;
	pid_t pid;

	if (pipe(fd) != 0) {
		tap_ok(0, "kvq_quant_simd_name_env_no_simd (pipe)");
		return;
	}
	pid = fork();
	if (pid == 0) {
		dup2(fd[1], 1);
		close(fd[0]);
		setenv("KVQ_NO_SIMD", "1", 1);
		execl(self, self, "--simd-name", (char *)NULL);
		_exit(127);
	}
	close(fd[1]);
	if (pid > 0)
		got = read(fd[0], buf, sizeof(buf) - 1);
	close(fd[0]);
	if (pid > 0)
		waitpid(pid, &status, 0);
	buf[got > 0 ? got : 0] = 0;
	tap_ok(pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 &&
	       strcmp(buf, "scalar\n") == 0,
	       "kvq_quant_simd_name_env_no_simd");
}

/*
 * The GPU's 4- and 8-bit forms of Q4_K and Q6_K rows (kvq_gpu_kquant_row(),
 * kernels/gpu_fwd.h): each weight, rebuilt as the device's loader does
 * (code * scale + offset, one fused rounding in f32), equals the CPU's
 * dequantized value bit for bit, on random rows with scales from
 * subnormal to large.  A wrong nibble, byte, group or pair fails it.
 */
static void test_gpu_kquant_rows(void)
{
	enum { COLS = 4 * QKK };
	static uint8_t row[4 * Q6_K_BYTES], codes[COLS];
	static float pairs[2 * (COLS / 16)], got[COLS], want[COLS];
	const struct qtype *tq[2] = { NULL, NULL };

	for (size_t t = 0; t < N_TYPES; t++) {
		if (types[t].type == KVQ_TYPE_Q4_K)
			tq[0] = &types[t];
		if (types[t].type == KVQ_TYPE_Q6_K)
			tq[1] = &types[t];
	}
	for (int k = 0; k < 3; k++) {
		const struct qtype *t = tq[k == 2];
		int wt = k == 0 ? KVQ_GPU_W_Q4K : KVQ_GPU_W_Q8K;
		int ok = 1;
		char what[64];

		snprintf(what, sizeof(what), "%s as %s", t->name,
			 wt == KVQ_GPU_W_Q4K ? "Q4K" : "Q8K");
		for (int r = 0; r < 50 && ok; r++) {
			rand_row(t, row, COLS);
			memset(codes, 0xa5, sizeof(codes));
			ok = kvq_gpu_kquant_row(t->type, wt, row, COLS, codes,
						pairs) == 0 &&
			     kvq_dequant_row(t->type, row, want, COLS) == 0;
			for (int c = 0; ok && c < COLS; c++) {
				float q;
				const float *p;

				if (wt == KVQ_GPU_W_Q4K) {
					uint8_t b = codes[c / 32 * 16 + c % 16];

					q = (float)(c & 16 ? b >> 4 : b & 15);
					p = &pairs[2 * (c / 32)];
				} else {
					q = (float)(int8_t)codes[c];
					p = &pairs[2 * (c / 16)];
				}
				got[c] = fmaf(q, p[0], p[1]);
			}
			ok = ok && same_bits(got, want, COLS, what);
		}
		tap_ok(ok, "kvq_gpu_kquant_row: %s, 50 random rows of %d, every weight the CPU's bit for bit",
		       what, COLS);
	}
	tap_ok(kvq_gpu_kquant_row(KVQ_TYPE_Q6_K, KVQ_GPU_W_Q4K, row, COLS, codes,
				  pairs) == -EINVAL &&
	       kvq_gpu_kquant_row(KVQ_TYPE_Q8_0, KVQ_GPU_W_Q8K, row, COLS, codes,
				  pairs) == -EINVAL &&
	       kvq_gpu_kquant_row(KVQ_TYPE_Q4_K, KVQ_GPU_W_Q8K, row, 100, codes,
				  pairs) == -EINVAL,
	       "kvq_gpu_kquant_row: Q6_K as Q4K, Q8_0, or a row not of whole blocks: -EINVAL");
}

/* ------------------------------------------------------- bad arguments */

static void test_unsupported(void)
{
	static const uint32_t bad_types[] = {
		KVQ_TYPE_Q4_1, KVQ_TYPE_Q5_0, KVQ_TYPE_Q2_K, KVQ_TYPE_Q5_K,
		KVQ_TYPE_Q8_K, KVQ_TYPE_IQ2_XXS, KVQ_TYPE_I8, KVQ_TYPE_F64,
		KVQ_TYPE_TQ2_0, KVQ_TYPE_COUNT, 1000, UINT32_MAX,
	};
	uint8_t src[512] = { 0 };
	float dst[256], x[256] = { 0 };
	int ok = 1, supported = 1;

	for (size_t i = 0; i < sizeof(bad_types) / sizeof(bad_types[0]); i++) {
		memset(dst, 0x5a, sizeof(dst));
		if (kvq_dequant_row(bad_types[i], src, dst, 256) != -EINVAL)
			ok = 0;
		for (int j = 0; j < 256; j++)
			if (bits(dst[j]) != 0x5a5a5a5a)
				ok = 0;
		if (kvq_quant_supported(bad_types[i]))
			supported = 0;
	}
	tap_ok(ok, "kvq_dequant_row_unsupported_type_einval");
	tap_ok(supported, "kvq_quant_supported_rejects_others");

	ok = 1;
	for (size_t i = 0; i < sizeof(bad_types) / sizeof(bad_types[0]); i++)
		if (!isnan(kvq_vec_dot(bad_types[i], src, x, 256)) ||
		    !isnan(kvq_vec_dot_scalar(bad_types[i], src, x, 256)))
			ok = 0;
	tap_ok(ok, "kvq_vec_dot_unsupported_type_nan");

	for (size_t i = 0; i < N_TYPES; i++)
		if (!kvq_quant_supported(types[i].type))
			supported = 0;
	tap_ok(supported, "kvq_quant_supported_accepts_seven_types");

	memset(dst, 0x5a, sizeof(dst));
	ok = kvq_dequant_row(KVQ_TYPE_Q4_0, src, dst, 31) == -EINVAL &&
	     kvq_dequant_row(KVQ_TYPE_Q4_K, src, dst, 128) == -EINVAL &&
	     kvq_dequant_row(KVQ_TYPE_Q8_0, src, dst, -32) == -EINVAL &&
	     bits(dst[0]) == 0x5a5a5a5a &&
	     kvq_dequant_row(KVQ_TYPE_Q8_0, src, dst, 0) == 0;
	tap_ok(ok, "kvq_dequant_row_bad_n_einval");
}

/* -------------------------------------------------------- quantizers */

#define QN 4096

static void fill_blocks(float *x, int64_t n)
{
	for (int64_t b = 0; b < n / QK; b++) {
		float scale = b % 17 == 0 ? 0.0f :
			      ldexpf(1.0f, (int)(rng() % 30) - 15);

		for (int j = 0; j < QK; j++)
			x[b * QK + j] = frand() * scale;
		if (b % 5 == 1)		/* a negative extreme */
			x[b * QK + rng() % QK] = -1.5f * scale;
	}
}

static void test_quantize_q8_0(void)
{
	static float x[QN], y[QN];
	static uint8_t q[QN / QK * Q8_0_BYTES];
	int ok = 1;

	fill_blocks(x, QN);
	kvq_quantize_row_q8_0(x, q, QN);
	ok = kvq_dequant_row(KVQ_TYPE_Q8_0, q, y, QN) == 0;
	for (int b = 0; ok && b < QN / QK; b++) {
		float amax = 0;
		double d, d16, bound;

		for (int j = 0; j < QK; j++)
			amax = fmaxf(amax, fabsf(x[b * QK + j]));
		d = amax / 127.0f;
		d16 = half_value(get16(q + b * Q8_0_BYTES));
		if (get16(q + b * Q8_0_BYTES) != kvq_f32_to_f16((float)d))
			ok = 0;
		bound = 0.5 * d * (1 + 1e-6) + 127 * fabs(d - d16);
		for (int j = 0; j < QK; j++) {
			if (fabs(x[b * QK + j] - y[b * QK + j]) > bound) {
				tap_diag("q8_0 block %d elem %d: %g -> %g", b,
					 j, x[b * QK + j], y[b * QK + j]);
				ok = 0;
				break;
			}
		}
	}
	tap_ok(ok, "kvq_quantize_row_q8_0_roundtrip_error_bound");

	/* Values on the grid of a power-of-two scale come back exactly. */
	for (int j = 0; j < QK; j++)
		x[j] = (float)((int)(rng() % 255) - 127) / 16;
	x[3] = 127.0f / 16;
	kvq_quantize_row_q8_0(x, q, QK);
	kvq_dequant_row(KVQ_TYPE_Q8_0, q, y, QK);
	tap_ok(memcmp(x, y, QK * sizeof(float)) == 0,
	       "kvq_quantize_row_q8_0_grid_exact");
}

static void test_quantize_q4_0(void)
{
	static float x[QN], y[QN];
	static uint8_t q[QN / QK * Q4_0_BYTES];
	int ok = 1;

	fill_blocks(x, QN);
	kvq_quantize_row_q4_0(x, q, QN);
	ok = kvq_dequant_row(KVQ_TYPE_Q4_0, q, y, QN) == 0;
	for (int b = 0; ok && b < QN / QK; b++) {
		float amax = 0, max = 0;
		double d, d16, step;

		for (int j = 0; j < QK; j++) {
			if (fabsf(x[b * QK + j]) > amax) {
				amax = fabsf(x[b * QK + j]);
				max = x[b * QK + j];
			}
		}
		d = max / -8.0f;
		d16 = half_value(get16(q + b * Q4_0_BYTES));
		if (get16(q + b * Q4_0_BYTES) != kvq_f32_to_f16((float)d))
			ok = 0;
		for (int j = 0; j < QK; j++) {
			double v = d != 0 ? x[b * QK + j] / d : 0;
			/* rounding to nearest, except the clamp at +7 */
			step = (v < 7.5 ? 0.5 : 1.0) * fabs(d) * (1 + 1e-6) +
			       8 * fabs(d - d16);
			if (fabs(x[b * QK + j] - y[b * QK + j]) > step) {
				tap_diag("q4_0 block %d elem %d: %g -> %g", b,
					 j, x[b * QK + j], y[b * QK + j]);
				ok = 0;
				break;
			}
		}
	}
	tap_ok(ok, "kvq_quantize_row_q4_0_roundtrip_error_bound");

	/* The extreme element is stored as nibble 0, i.e. exactly -8 * d. */
	for (int j = 0; j < QK; j++)
		x[j] = (float)((int)(rng() % 15) - 7) / 4;
	x[20] = -2.0f;
	kvq_quantize_row_q4_0(x, q, QK);
	kvq_dequant_row(KVQ_TYPE_Q4_0, q, y, QK);
	tap_ok(memcmp(x, y, QK * sizeof(float)) == 0 &&
	       get16(q) == 0x3400 && (q[2 + 4] >> 4) == 0,
	       "kvq_quantize_row_q4_0_grid_exact");
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--simd-name") == 0) {
		printf("%s\n", kvq_quant_simd_name());
		return 0;
	}
	tap_diag("dot product path: %s", kvq_quant_simd_name());

	test_golden_q8_0();
	test_golden_q4_0();
	test_golden_q4_k();
	test_golden_q6_k();
	test_golden_float_rows();

	test_f16_to_f32_exhaustive();
	test_f16_roundtrip_exhaustive();
	test_f16_ties_exhaustive();
	test_f16_known();
#ifdef __FLT16_MAX__
	test_f16_vs_float16();
#endif
	test_bf16();

	test_vec_dots();
	test_dot_f32();
	test_force_scalar();
	test_dequant_simd_bitwise();
	test_env_no_simd(argv[0]);

	test_gpu_kquant_rows();
	test_unsupported();

	test_quantize_q8_0();
	test_quantize_q4_0();
	return tap_done();
}
