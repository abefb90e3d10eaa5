/*
 * test_quant_act.c - unit tests for the int8-activation dot products of
 * engine/quant.h and the CPU backend's int8 dot mode.
 *
 * Why this file exists: the int8 mode trades exactness for speed, so its
 * error must stay bounded and visible.  Checked here: the quantized vector
 * against its definition (every element within half a step, sums exact);
 * the SIMD kernels against their scalar twins; every kernel against a
 * double-precision product of the dequantized row with the dequantized
 * activations (the integer arithmetic must be exact, leaving only f32
 * scaling error); the whole approximation against the exact product (at
 * most 1% of sum|w*x|); the mode switch; and, end to end, the CPU backend
 * and the stories260K model with its weights requantized, whose next-token
 * choice must not change.
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

#include "engine/backend.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/model_impl.h"
#include "engine/quant.h"
#include "engine/threadpool.h"
#include "tap.h"

#define QA	32		/* activation block */
#define QKK	256

/* Error of the f32 scaling and summation, relative to sum|w*x|. */
#define KERNEL_REL_TOL	1e-5
/* SIMD against scalar twin, relative to sum|w*x|. */
#define TWIN_REL_TOL	1e-6
/*
 * int8 against exact, relative to sum|w*x|, for vectors without outliers
 * (the stated bound; observed worst about 0.4%).  With outliers the only
 * bound is the rigorous one: |error| <= sum|w_i| * d_i / 2 (d_i the scale
 * of x_i's block) plus f32 rounding, checked on every product.
 */
#define APPROX_REL_TOL	1e-2

static const uint32_t act_types[] = {
	KVQ_TYPE_Q8_0, KVQ_TYPE_Q4_0, KVQ_TYPE_Q4_K, KVQ_TYPE_Q6_K,
};

static const char *type_name(uint32_t t)
{
	switch (t) {
	case KVQ_TYPE_Q8_0: return "Q8_0";
	case KVQ_TYPE_Q4_0: return "Q4_0";
	case KVQ_TYPE_Q4_K: return "Q4_K";
	case KVQ_TYPE_Q6_K: return "Q6_K";
	case KVQ_TYPE_F16: return "F16";
	case KVQ_TYPE_F32: return "F32";
	default: return "?";
	}
}

/* ------------------------------------------------------------- helpers */

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

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

/*
 * A test vector: uniform, with one block of zeros and one of tiny values;
 * with @outliers, also a few elements 30x larger (as real activations
 * have), which make the other elements of their block coarse.
 */
static void fill_x_(float *x, int64_t n, float scale, int outliers)
{
	for (int64_t i = 0; i < n; i++)
		x[i] = frand() * scale;
	if (n >= 3 * QA) {
		memset(x + QA, 0, QA * sizeof(float));
		for (int j = 0; j < QA; j++)
			x[2 * QA + j] = frand() * 1e-20f;
	}
	for (int k = 0; outliers && k < 3; k++)
		x[rng() % n] = 30 * scale * (rng() & 1 ? 1 : -1);
}

static void fill_x(float *x, int64_t n, float scale)
{
	fill_x_(x, n, scale, 1);
}

/* Bytes of a row of @n elements. */
static size_t row_bytes(uint32_t type, int64_t n)
{
	switch (type) {
	case KVQ_TYPE_Q8_0: return (size_t)n / 32 * 34;
	case KVQ_TYPE_Q4_0: return (size_t)n / 32 * 18;
	case KVQ_TYPE_Q4_K: return (size_t)n / QKK * 144;
	case KVQ_TYPE_Q6_K: return (size_t)n / QKK * 210;
	case KVQ_TYPE_F16: return (size_t)n * 2;
	default: return (size_t)n * 4;
	}
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = v & 0xff;
	p[1] = v >> 8;
}

/*
 * A random row: Q8_0 and Q4_0 from the reference quantizers, the K-quants
 * as random bytes with moderate f16 scales (every bit pattern of the
 * quants and packed scales is valid).
 */
static void fill_row(uint32_t type, uint8_t *row, int64_t n)
{
	size_t nbytes = row_bytes(type, n);
	float *w;

	switch (type) {
	case KVQ_TYPE_Q8_0:
	case KVQ_TYPE_Q4_0:
		w = malloc((size_t)n * sizeof(float));
		for (int64_t i = 0; i < n; i++)
			w[i] = frand();
		if (type == KVQ_TYPE_Q8_0)
			kvq_quantize_row_q8_0(w, row, n);
		else
			kvq_quantize_row_q4_0(w, row, n);
		free(w);
		return;
	case KVQ_TYPE_F16:
		for (int64_t i = 0; i < n; i++)
			put16(row + 2 * i, kvq_f32_to_f16(frand()));
		return;
	default:
		break;
	}
	for (size_t i = 0; i < nbytes; i++)
		row[i] = (uint8_t)rng();
	for (int64_t b = 0; b < n / QKK; b++) {
		if (type == KVQ_TYPE_Q4_K) {
			uint8_t *p = row + b * 144;

			put16(p, kvq_f32_to_f16(frand() * 0.02f));
			put16(p + 2, kvq_f32_to_f16(frand() * 0.02f));
		} else {
			uint8_t *p = row + b * 210;

			put16(p + 208, kvq_f32_to_f16(frand() * 0.002f));
		}
	}
}

/* The quantized activation buffer, decoded from the layout in quant.h. */
struct act {
	const int8_t *qs;
	float d[4096 / QA];
	int16_t sum[2 * 4096 / QA];
};

static void act_decode(const void *buf, int64_t n, struct act *a)
{
	const uint8_t *p = buf;
	int64_t nb = n / QA;

	a->qs = (const int8_t *)p;
	memcpy(a->d, p + n, (size_t)nb * sizeof(float));
	memcpy(a->sum, p + n + 4 * nb, (size_t)nb * 2 * sizeof(int16_t));
}

/* ----------------------------------------------------- quantization */

static void test_act_bytes(void)
{
	uint8_t buf[80];
	float x[64] = { 0 };

	tap_ok(kvq_act_q8_bytes(32) == 40 && kvq_act_q8_bytes(4096) == 5120,
	       "kvq_act_q8_bytes_per_block: 40 bytes per 32 elements");
	memset(buf, 0xa5, sizeof(buf));
	tap_ok(kvq_quantize_act_q8(x, 31, buf) == -EINVAL &&
	       kvq_quantize_act_q8(x, 0, buf) == -EINVAL &&
	       kvq_quantize_act_q8(x, -32, buf) == -EINVAL &&
	       kvq_quantize_act_q8_scalar(x, 48, buf) == -EINVAL &&
	       buf[0] == 0xa5 && buf[79] == 0xa5,
	       "kvq_quantize_act_q8_bad_n: -EINVAL, buffer untouched");
}

/*
 * Every element within half a step of its value (d/2, plus the f32
 * rounding of x/d), |q| <= 127, d = amax/127, the half-block sums exact,
 * zero and tiny blocks all zero.
 */
static int check_act(const float *x, int64_t n, const void *buf,
		     const char *what)
{
	struct act a;

	act_decode(buf, n, &a);
	for (int64_t b = 0; b < n / QA; b++) {
		float amax = 0.0f;
		int s[2] = { 0, 0 };

		for (int j = 0; j < QA; j++)
			amax = fmaxf(amax, fabsf(x[b * QA + j]));
		if (amax < 1e-30f ? a.d[b] != 0.0f : a.d[b] != amax / 127) {
			tap_diag("%s: block %lld: d %g, amax %g", what,
				 (long long)b, a.d[b], amax);
			return 0;
		}
		for (int j = 0; j < QA; j++) {
			int q = a.qs[b * QA + j];
			double e = fabs((double)x[b * QA + j] -
					(double)a.d[b] * q);

			s[j / 16] += q;
			if (q < -127 || q > 127 ||
			    e > a.d[b] * (0.5 + 1e-6)) {
				tap_diag("%s: element %lld: x %g, q %d, d %g",
					 what, (long long)(b * QA + j),
					 x[b * QA + j], q, a.d[b]);
				return 0;
			}
		}
		if (s[0] != a.sum[2 * b] || s[1] != a.sum[2 * b + 1]) {
			tap_diag("%s: block %lld: sums %d %d, stored %d %d",
				 what, (long long)b, s[0], s[1],
				 a.sum[2 * b], a.sum[2 * b + 1]);
			return 0;
		}
	}
	return 1;
}

static void test_quantize_act(void)
{
	const int64_t n = 4096;
	size_t nbytes = kvq_act_q8_bytes(n);
	float *x = malloc(n * sizeof(float));
	uint8_t *simd = malloc(nbytes), *scal = malloc(nbytes);
	int ok_simd = 1, ok_scal = 1, same = 1;

	for (int it = 0; it < 50; it++) {
		fill_x(x, n, it % 2 ? 1e-3f : 3.0f);
		kvq_quantize_act_q8(x, n, simd);
		kvq_quantize_act_q8_scalar(x, n, scal);
		ok_simd &= check_act(x, n, simd, "simd");
		ok_scal &= check_act(x, n, scal, "scalar");
		same &= !memcmp(simd, scal, nbytes);
	}
	tap_ok(ok_scal, "kvq_quantize_act_q8_scalar_round_trip: |x - d*q| <= d/2, sums exact");
	tap_ok(ok_simd, "kvq_quantize_act_q8_round_trip (%s): |x - d*q| <= d/2, sums exact",
	       kvq_quant_simd_name());
	tap_ok(same, "kvq_quantize_act_q8_simd_equals_scalar: bit-identical buffers");
	free(x);
	free(simd);
	free(scal);
}

/* ------------------------------------------------------ dot products */

struct dot_stats {
	double twin, kernel, approx, outl;	/* worst error / sum|w*x| */
	int ok_twin, ok_kernel, ok_approx, ok_bound;
};

static void dot_case(uint32_t type, int64_t n, int outliers,
		     struct dot_stats *st)
{
	size_t rb = row_bytes(type, n);
	uint8_t *row = malloc(rb), *xq = malloc(kvq_act_q8_bytes(n));
	float *x = malloc(n * sizeof(float)), *w = malloc(n * sizeof(float));
	double exact = 0, viaq = 0, mag = 0, magq = 0, bound = 0;
	float got, twin;
	struct act a;

	fill_row(type, row, n);
	fill_x_(x, n, rng() & 1 ? 1.0f : 20.0f, outliers);
	kvq_dequant_row(type, row, w, n);
	kvq_quantize_act_q8(x, n, xq);
	act_decode(xq, n, &a);
	for (int64_t i = 0; i < n; i++) {
		double xd = (double)a.d[i / QA] * a.qs[i];

		exact += (double)w[i] * x[i];
		mag += fabs((double)w[i] * x[i]);
		viaq += (double)w[i] * xd;
		magq += fabs((double)w[i] * xd);
		bound += fabs((double)w[i]) * a.d[i / QA] / 2;
	}
	got = kvq_vec_dot_q8act(type, row, xq, n);
	twin = kvq_vec_dot_q8act_scalar(type, row, xq, n);
	if (mag > 0) {
		double et = fabs((double)got - twin) / mag;
		double ek = fabs((double)twin - viaq) / (magq > 0 ? magq : 1);
		double ea = fabs((double)got - exact) / mag;

		if (!(et <= TWIN_REL_TOL) && st->ok_twin) {
			tap_diag("%s n %lld: simd %.9g scalar %.9g (sum|wx| %g)",
				 type_name(type), (long long)n, got, twin, mag);
			st->ok_twin = 0;
		}
		if (!(ek <= KERNEL_REL_TOL) && st->ok_kernel) {
			tap_diag("%s n %lld: scalar %.9g, dequantized %.9g",
				 type_name(type), (long long)n, twin, viaq);
			st->ok_kernel = 0;
		}
		if (!(fabs((double)got - exact) <= bound + 1e-5 * mag) &&
		    st->ok_bound) {
			tap_diag("%s n %lld: int8 %.9g, exact %.9g, bound %g",
				 type_name(type), (long long)n, got, exact,
				 bound);
			st->ok_bound = 0;
		}
		if (outliers) {
			st->outl = fmax(st->outl, ea);
			goto out;
		}
		if (!(ea <= APPROX_REL_TOL) && st->ok_approx) {
			tap_diag("%s n %lld: int8 %.9g, exact %.9g (sum|wx| %g)",
				 type_name(type), (long long)n, got, exact, mag);
			st->ok_approx = 0;
		}
		st->twin = fmax(st->twin, et);
		st->kernel = fmax(st->kernel, ek);
		st->approx = fmax(st->approx, ea);
	}
out:
	free(row);
	free(xq);
	free(x);
	free(w);
}

static void test_dots(void)
{
	for (size_t t = 0; t < sizeof(act_types) / sizeof(act_types[0]); t++) {
		uint32_t type = act_types[t];
		struct dot_stats st = { 0, 0, 0, 0, 1, 1, 1, 1 };
		int64_t step = type == KVQ_TYPE_Q4_K ||
			       type == KVQ_TYPE_Q6_K ? QKK : QA;

		for (int it = 0; it < 200; it++) {
			int64_t n = step * (1 + (int64_t)(rng() % (4096 / step)));

			if (it < 3)	/* odd block counts, shortest rows */
				n = step * (1 + 2 * it);
			dot_case(type, n, it % 2, &st);
		}
		tap_ok(kvq_q8act_supported(type), "kvq_q8act_supported_%s",
		       type_name(type));
		tap_ok(st.ok_kernel,
		       "kvq_vec_dot_q8act_scalar_%s_integer_exact: vs double on dequantized operands, worst %.2g <= %g of sum|w*xq|",
		       type_name(type), st.kernel, KERNEL_REL_TOL);
		tap_ok(st.ok_twin,
		       "kvq_vec_dot_q8act_%s_simd_vs_scalar (%s): worst %.2g <= %g of sum|w*x|",
		       type_name(type), kvq_quant_simd_name(), st.twin,
		       TWIN_REL_TOL);
		tap_ok(st.ok_bound,
		       "kvq_vec_dot_q8act_%s_error_bound: |int8 - exact| <= sum|w|*d/2 (with outliers: worst %.2g of sum|w*x|)",
		       type_name(type), st.outl);
		tap_ok(st.ok_approx,
		       "kvq_vec_dot_q8act_%s_vs_exact: worst %.2g <= %g of sum|w*x| (no outliers)",
		       type_name(type), st.approx, APPROX_REL_TOL);
	}
}

/* Forcing the scalar table gives exactly the scalar twin. */
static void test_force_scalar(void)
{
	const int64_t n = 1024;
	uint8_t *row = malloc(row_bytes(KVQ_TYPE_Q4_K, n));
	uint8_t *xq = malloc(kvq_act_q8_bytes(n));
	float *x = malloc(n * sizeof(float));
	float a, b;

	fill_row(KVQ_TYPE_Q4_K, row, n);
	fill_x(x, n, 1.0f);
	kvq_quantize_act_q8(x, n, xq);
	kvq_quant_force_scalar(true);
	a = kvq_vec_dot_q8act(KVQ_TYPE_Q4_K, row, xq, n);
	kvq_quant_force_scalar(false);
	b = kvq_vec_dot_q8act_scalar(KVQ_TYPE_Q4_K, row, xq, n);
	tap_ok(memcmp(&a, &b, sizeof(a)) == 0,
	       "kvq_vec_dot_q8act_forced_scalar: same bits as the twin");
	free(row);
	free(xq);
	free(x);
}

static void test_unsupported(void)
{
	static const uint32_t none[] = {
		KVQ_TYPE_F32, KVQ_TYPE_F16, KVQ_TYPE_BF16, KVQ_TYPE_COUNT,
		0xffffffffu,
	};
	uint8_t row[256] = { 0 }, xq[80] = { 0 };
	int ok = 1;

	for (size_t i = 0; i < sizeof(none) / sizeof(none[0]); i++)
		ok &= !kvq_q8act_supported(none[i]) &&
		      isnan(kvq_vec_dot_q8act(none[i], row, xq, 64)) &&
		      isnan(kvq_vec_dot_q8act_scalar(none[i], row, xq, 64));
	tap_ok(ok, "kvq_vec_dot_q8act_unsupported: not supported, NaN");
}

/* ------------------------------------------------------------- mode */

/* KVQ_DOT is read on first use: check it in fresh processes. */
static int mode_in_child(const char *env)
{
	pid_t pid = fork();
	int st;

	if (pid == 0) {
		if (env)
			setenv("KVQ_DOT", env, 1);
		else
			unsetenv("KVQ_DOT");
		_exit(kvq_quant_dot_mode() == KVQ_DOT_INT8 ? 8 : 1);
	}
	if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
		return -1;
	return WEXITSTATUS(st);
}

static void test_mode(void)
{
	enum kvq_dot_mode m = KVQ_DOT_INT8;

	tap_ok(mode_in_child(NULL) == 1 && mode_in_child("exact") == 1 &&
	       mode_in_child("int8") == 8 && mode_in_child("fast") == 1,
	       "kvq_quant_dot_mode_env: unset/exact/unknown give exact, int8 gives int8");
	tap_ok(kvq_quant_parse_dot_mode("exact", &m) == 0 &&
	       m == KVQ_DOT_EXACT &&
	       kvq_quant_parse_dot_mode("int8", &m) == 0 &&
	       m == KVQ_DOT_INT8 &&
	       kvq_quant_parse_dot_mode("INT8", &m) == -EINVAL &&
	       kvq_quant_parse_dot_mode(NULL, &m) == -EINVAL &&
	       m == KVQ_DOT_INT8,
	       "kvq_quant_parse_dot_mode: exact, int8, else -EINVAL");
	kvq_quant_set_dot_mode(KVQ_DOT_INT8);
	m = kvq_quant_dot_mode();
	kvq_quant_set_dot_mode(KVQ_DOT_EXACT);
	tap_ok(m == KVQ_DOT_INT8 && kvq_quant_dot_mode() == KVQ_DOT_EXACT &&
	       !strcmp(kvq_quant_dot_mode_name(KVQ_DOT_INT8), "int8"),
	       "kvq_quant_set_dot_mode: takes effect at once");
}

/* --------------------------------------------------- CPU backend */

/*
 * The backend in both modes on one weight: up to 8 tokens the int8 mode
 * must differ from exact (it is in use) but stay within the bound; 9
 * tokens and unsupported types must be bit-identical (exact path).
 */
static void backend_case(struct kvq_backend *be, uint32_t type,
			 uint32_t n_tok, int want_int8)
{
	const uint32_t rows = 37, cols = 512;
	size_t rb = row_bytes(type, cols);
	uint8_t *data = malloc(rb * rows);
	float *x = malloc((size_t)n_tok * cols * sizeof(float));
	float *ye = malloc((size_t)n_tok * rows * sizeof(float));
	float *yi = malloc((size_t)n_tok * rows * sizeof(float));
	float *wd = malloc(cols * sizeof(float));
	struct kvq_weight w = {
		.name = "w", .type = type, .cols = cols, .rows = rows,
		.nbytes = rb * rows, .host = data,
	};
	int ok = 1, differs = 0;

	for (uint32_t r = 0; r < rows; r++)
		fill_row(type, data + r * rb, cols);
	for (uint32_t i = 0; i < n_tok * cols; i++)
		x[i] = frand();
	be->ops->matmul(be, &w, x, ye, n_tok);
	kvq_quant_set_dot_mode(KVQ_DOT_INT8);
	for (uint32_t i = 0; i < n_tok * rows; i++)
		yi[i] = NAN;
	be->ops->matmul(be, &w, x, yi, n_tok);
	kvq_quant_set_dot_mode(KVQ_DOT_EXACT);
	for (uint32_t r = 0; r < rows; r++) {
		kvq_dequant_row(type, data + r * rb, wd, cols);
		for (uint32_t t = 0; t < n_tok; t++) {
			size_t k = (size_t)t * rows + r;
			double mag = 0;

			for (uint32_t i = 0; i < cols; i++)
				mag += fabs((double)wd[i] * x[t * cols + i]);
			if (memcmp(&ye[k], &yi[k], sizeof(float)))
				differs = 1;
			if (!(fabs((double)yi[k] - ye[k]) <=
			      APPROX_REL_TOL * mag))
				ok = 0;
		}
	}
	if (want_int8)
		tap_ok(ok && differs,
		       "cpu_matmul_int8_%s_%u_tokens: within %g of sum|w*x| of exact, not identical",
		       type_name(type), n_tok, APPROX_REL_TOL);
	else
		tap_ok(!differs,
		       "cpu_matmul_int8_%s_%u_tokens_falls_back: identical to exact",
		       type_name(type), n_tok);
	free(data);
	free(x);
	free(ye);
	free(yi);
	free(wd);
}

static void test_backend(void)
{
	struct kvq_pool *pool = kvq_pool_create(2);
	struct kvq_backend be;

	if (!pool) {
		tap_ok(0, "kvq_pool_create");
		return;
	}
	kvq_backend_cpu_init(&be, pool);
	backend_case(&be, KVQ_TYPE_Q4_0, 1, 1);
	backend_case(&be, KVQ_TYPE_Q4_K, 1, 1);
	backend_case(&be, KVQ_TYPE_Q6_K, 3, 1);
	backend_case(&be, KVQ_TYPE_Q8_0, 8, 1);
	backend_case(&be, KVQ_TYPE_Q8_0, 9, 0);
	backend_case(&be, KVQ_TYPE_F16, 1, 0);
	kvq_pool_destroy(pool);
}

/* ------------------------------------------------ stories260K model */

static const int32_t story_ids[] = {
	1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395,
	317, 426, 338, 401, 396, 267,
};
#define N_STORY ((int)(sizeof(story_ids) / sizeof(story_ids[0])))

/*
 * The weights of the loaded model replaced by @type copies (each matrix
 * whose rows are whole blocks; the others stay F32, which also exercises
 * the fallback).  The copies are freed by the caller.
 */
static int requantize(struct kvq_model *m, uint32_t type, void **bufs)
{
	int n = 0;

	for (uint32_t i = 0; i < m->n_weights; i++) {
		struct kvq_weight *w = &m->weights[i];
		size_t rb = row_bytes(type, w->cols);
		uint8_t *q;

		bufs[i] = NULL;
		if (w->type != KVQ_TYPE_F32 || w->rows < 2 || w->cols % 32)
			continue;
		q = malloc(rb * w->rows);
		if (!q)
			return -ENOMEM;
		for (uint32_t r = 0; r < w->rows; r++) {
			const float *src = (const float *)w->host +
					   (size_t)r * w->cols;

			if (type == KVQ_TYPE_Q8_0)
				kvq_quantize_row_q8_0(src, q + r * rb, w->cols);
			else
				kvq_quantize_row_q4_0(src, q + r * rb, w->cols);
		}
		bufs[i] = q;
		w->type = type;
		w->host = q;
		w->nbytes = rb * w->rows;
		n++;
	}
	return n;
}

/* Logits of every position, one token per step (the decode path). */
static int story_logits(struct kvq_model *m, float *lg, uint32_t nv)
{
	struct kvq_ctx_opts o = { .n_ctx = 64 };
	struct kvq_ctx *c;
	char err[256];
	int seq, ret;

	ret = kvq_ctx_create(m, &o, &c, err, sizeof(err));
	if (ret) {
		tap_diag("kvq_ctx_create: %s", err);
		return ret;
	}
	seq = kvq_seq_create(c);
	for (int i = 0; i < N_STORY && seq >= 0; i++) {
		int one = 1;
		const int32_t *tp = &story_ids[i];
		struct kvq_batch b = {
			.n = 1, .seq = &seq, .n_tokens = &one, .tokens = &tp,
		};

		ret = kvq_step(c, &b, lg + (size_t)i * nv);
		if (ret)
			break;
	}
	kvq_ctx_destroy(c);
	return seq < 0 ? seq : ret;
}

static void test_model(uint32_t type)
{
	struct kvq_model_opts mo = { .n_threads = 2 };
	struct kvq_model *m;
	char path[4096], err[256];
	void **bufs;
	float *le, *li;
	uint32_t nv;
	int nq, agree = 0, ok = 1;
	double maxd = 0, spread = 0;

	if (!tap_testdata("stories260K.gguf", path, sizeof(path))) {
		printf("ok %d - model_%s # SKIP stories260K.gguf missing\n",
		       ++tap_n, type_name(type));
		return;
	}
	if (kvq_model_load(path, &mo, &m, err, sizeof(err))) {
		tap_ok(0, "kvq_model_load: %s", err);
		return;
	}
	nv = kvq_model_hparams(m)->n_vocab;
	bufs = calloc(m->n_weights, sizeof(*bufs));
	le = malloc((size_t)N_STORY * nv * sizeof(float));
	li = malloc((size_t)N_STORY * nv * sizeof(float));
	nq = requantize(m, type, bufs);
	if (nq <= 0 || story_logits(m, le, nv)) {
		ok = 0;
	} else {
		kvq_quant_set_dot_mode(KVQ_DOT_INT8);
		ok = !story_logits(m, li, nv);
		kvq_quant_set_dot_mode(KVQ_DOT_EXACT);
	}
	for (int p = 0; ok && p < N_STORY; p++) {
		const float *a = le + (size_t)p * nv, *b = li + (size_t)p * nv;
		uint32_t ia = 0, ib = 0;
		float lo = a[0];

		for (uint32_t v = 0; v < nv; v++) {
			ia = a[v] > a[ia] ? v : ia;
			ib = b[v] > b[ib] ? v : ib;
			lo = fminf(lo, a[v]);
			maxd = fmax(maxd, fabs((double)a[v] - b[v]));
		}
		spread = fmax(spread, a[ia] - lo);
		agree += ia == ib;
	}
	tap_ok(ok && agree == N_STORY && maxd <= 0.02 * spread,
	       "model_stories260K_%s_int8_decode: argmax agrees at %d/%d positions, max|diff| %.3g <= 2%% of logit range %.3g (%d matrices requantized)",
	       type_name(type), agree, N_STORY, maxd, spread, nq);
	for (uint32_t i = 0; i < m->n_weights; i++)
		free(bufs[i]);
	free(bufs);
	free(le);
	free(li);
	kvq_model_destroy(m);
}

int main(void)
{
	test_mode();
	test_act_bytes();
	test_quantize_act();
	test_dots();
	test_force_scalar();
	test_unsupported();
	test_backend();
	test_model(KVQ_TYPE_Q8_0);
	test_model(KVQ_TYPE_Q4_0);
	return tap_done();
}
