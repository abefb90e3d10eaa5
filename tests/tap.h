/*
 * tap.h - the Test Anything Protocol for kvqd's C unit tests.
 *
 * Why this file exists: `make check` runs every test through automake's TAP
 * driver; each test program prints "ok N - name" or "not ok N - name" per
 * case and a plan at the end.  Header-only so every test links alone.
 */
#ifndef KVQ_TAP_H
#define KVQ_TAP_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/*
 * A program of several files counts its cases once: each file defines
 * TAP_SHARED before this header, and one of them (the one with main())
 * also TAP_COUNTS, which defines the counts.
 */
#if defined(TAP_SHARED)
#if defined(TAP_COUNTS)
int tap_n;
int tap_failed;
#else
extern int tap_n;
extern int tap_failed;
#endif
#else
static int tap_n;
static int tap_failed;
#endif

static inline void tap_ok(int cond, const char *fmt, ...)
{
	va_list ap;

	tap_n++;
	if (!cond)
		tap_failed++;
	printf("%sok %d - ", cond ? "" : "not ", tap_n);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static inline void tap_diag(const char *fmt, ...)
{
	va_list ap;

	printf("# ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

/* Skips the whole program: TAP plan with a reason, exit 0 (TAP skip). */
static inline int tap_skip_all(const char *why)
{
	printf("1..0 # SKIP %s\n", why);
	return 0;
}

static inline int tap_done(void)
{
	printf("1..%d\n", tap_n);
	return tap_failed ? 1 : 0;
}

/* Path of a file in the shared test data, or NULL when it is missing. */
static inline const char *tap_testdata(const char *name, char *buf, size_t len)
{
	const char *dir = getenv("KVQ_TESTDATA");
	FILE *f;

	if (!dir)
		dir = "../shared/testdata";
	snprintf(buf, len, "%s/%s", dir, name);
	f = fopen(buf, "rb");
	if (!f)
		return NULL;
	fclose(f);
	return buf;
}

#endif /* KVQ_TAP_H */
