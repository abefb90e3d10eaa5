/*
 * notify.c - the sd_notify datagram protocol (see notify.h).
 *
 * A fresh socket per message: messages are rare (start, reload, stop, a
 * progress line every few seconds while loading), and a fresh socket
 * needs no locking between the threads that may send.
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "daemon/notify.h"

#define NOTIFY_MAX 4096

bool kvq_notify_enabled(void)
{
	const char *p = getenv("NOTIFY_SOCKET");

	return p && *p;
}

/*
 * Fills @sun from $NOTIFY_SOCKET.  Returns the address length, 0 when the
 * variable is unset, or -errno for a name kvqd cannot use.
 */
static int notify_addr(struct sockaddr_un *sun)
{
	const char *p = getenv("NOTIFY_SOCKET");
	size_t n;

	if (!p || !*p)
		return 0;
	n = strlen(p);
	if (p[0] != '/' && p[0] != '@')
		return -EAFNOSUPPORT;	/* e.g. vsock: addresses */
	if (n >= sizeof(sun->sun_path))
		return -ENAMETOOLONG;
	memset(sun, 0, sizeof(*sun));
	sun->sun_family = AF_UNIX;
	memcpy(sun->sun_path, p, n);
	if (p[0] == '@') {
		/* Abstract namespace: a leading NUL, no terminator. */
		sun->sun_path[0] = '\0';
		return (int)(offsetof(struct sockaddr_un, sun_path) + n);
	}
	return (int)(offsetof(struct sockaddr_un, sun_path) + n + 1);
}

int kvq_notify(const char *state)
{
	struct sockaddr_un sun;
	size_t len = strlen(state);
	ssize_t n;
	int fd, alen, ret = 0;

	alen = notify_addr(&sun);
	if (alen <= 0)
		return alen;
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	do {
		n = sendto(fd, state, len, MSG_NOSIGNAL,
			   (struct sockaddr *)&sun, (socklen_t)alen);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		ret = -errno;
	else if ((size_t)n != len)
		ret = -EMSGSIZE;
	close(fd);
	return ret;
}

int kvq_notifyf(const char *fmt, ...)
{
	char buf[NOTIFY_MAX];
	va_list ap;
	int n;

	if (!kvq_notify_enabled())
		return 0;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return -EINVAL;
	return kvq_notify(buf);
}

uint64_t kvq_notify_now_usec(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* STATUS= takes one line: newlines in @s would start new assignments. */
static void one_line(const char *s, char *buf, size_t len)
{
	size_t i;

	for (i = 0; s[i] && i + 1 < len; i++)
		buf[i] = s[i] == '\n' ? ' ' : s[i];
	buf[i] = '\0';
}

int kvq_notify_ready(const char *status)
{
	char line[1024];

	one_line(status, line, sizeof(line));
	return kvq_notifyf("READY=1\nSTATUS=%s", line);
}

int kvq_notify_reloading(void)
{
	return kvq_notifyf("RELOADING=1\nSTATUS=Reloading configuration\n"
			   "MONOTONIC_USEC=%llu",
			   (unsigned long long)kvq_notify_now_usec());
}

int kvq_notify_stopping(const char *status)
{
	char line[1024];

	one_line(status, line, sizeof(line));
	return kvq_notifyf("STOPPING=1\nSTATUS=%s", line);
}

int kvq_notify_status(const char *status)
{
	char line[1024];

	one_line(status, line, sizeof(line));
	return kvq_notifyf("STATUS=%s", line);
}

int kvq_notify_extend_timeout(uint64_t usec)
{
	return kvq_notifyf("EXTEND_TIMEOUT_USEC=%llu",
			   (unsigned long long)usec);
}
