/*
 * test_gemm.c - the blocked GEMM kernel against its scalar twin and a
 * double-precision reference, over shapes that hit every edge path.
 */
#include "config.h"

#include <math.h>
#include <stdlib.h>

#include "engine/gemm.h"
#include "tap.h"

static float frand(unsigned *s)
{
	*s = *s * 1103515245u + 12345u;
	return ((*s >> 8) & 0xffff) / 32768.0f - 1.0f;
}

int main(void)
{
	static const unsigned shapes[][3] = {
		/* rows, tokens, cols */
		{ 4, 3, 8 }, { 5, 4, 13 }, { 64, 7, 256 }, { 1, 1, 1 },
		{ 9, 2, 100 }, { 33, 31, 64 },
	};
	unsigned seed = 1;
	size_t si;

	for (si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
		unsigned R = shapes[si][0], T = shapes[si][1], C = shapes[si][2];
		float *w = malloc(sizeof(float) * R * C);
		float *x = malloc(sizeof(float) * T * C);
		float *y = malloc(sizeof(float) * T * R);
		float *ys = malloc(sizeof(float) * T * R);
		double maxe = 0, maxs = 0;
		unsigned i, r, t, c;

		for (i = 0; i < R * C; i++)
			w[i] = frand(&seed);
		for (i = 0; i < T * C; i++)
			x[i] = frand(&seed);
		for (i = 0; i < T * R; i++)
			y[i] = ys[i] = NAN;	/* poisoned */
		kvq_gemm_f32(w, C, R, x, C, T, y, R, C);
		kvq_gemm_f32_scalar(w, C, R, x, C, T, ys, R, C);
		for (t = 0; t < T; t++) {
			for (r = 0; r < R; r++) {
				double ref = 0, mag = 0;

				for (c = 0; c < C; c++) {
					ref += (double)w[r * C + c] * x[t * C + c];
					mag += fabs((double)w[r * C + c] * x[t * C + c]);
				}
				mag = mag > 1 ? mag : 1;
				if (!(fabs(y[t * R + r] - ref) / mag <= maxe))
					maxe = isnan(y[t * R + r]) ? INFINITY :
					       fabs(y[t * R + r] - ref) / mag;
				if (!(fabs(ys[t * R + r] - ref) / mag <= maxs))
					maxs = isnan(ys[t * R + r]) ? INFINITY :
					       fabs(ys[t * R + r] - ref) / mag;
			}
		}
		tap_ok(maxe < 1e-5, "kvq_gemm_f32_%ux%ux%u_matches_reference (rel err %.2g)",
		       R, T, C, maxe);
		tap_ok(maxs < 1e-5, "kvq_gemm_f32_scalar_%ux%ux%u_matches_reference (rel err %.2g)",
		       R, T, C, maxs);
		free(w);
		free(x);
		free(y);
		free(ys);
	}
	return tap_done();
}
