/*
 * log.c - stderr lines with syslog priority prefixes (see log.h).
 */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>

#include "engine/log.h"

static enum kvq_log_level log_level = KVQ_LOG_INFO;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

void kvq_log_set_level(enum kvq_log_level level)
{
	log_level = level;
}

enum kvq_log_level kvq_log_get_level(void)
{
	return log_level;
}

void kvq_log(enum kvq_log_level level, const char *fmt, ...)
{
	char buf[2048];
	va_list ap;
	int n;

	if (level > log_level)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	/* One write per line so concurrent threads do not interleave. */
	pthread_mutex_lock(&log_lock);
	fprintf(stderr, "<%d>%s\n", (int)level, buf);
	fflush(stderr);
	pthread_mutex_unlock(&log_lock);
}
