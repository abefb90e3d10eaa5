/*
 * notify.h - telling the service manager how start-up, reloads and
 * shutdown are going (the sd_notify protocol), without libsystemd.
 *
 * Why this file exists: with Type=notify, systemd considers kvqd started
 * only when it says READY=1, shows its STATUS= line in `systemctl status`,
 * and waits for it during long model loads when asked with
 * EXTEND_TIMEOUT_USEC=.  The protocol is one datagram of "KEY=VALUE" lines
 * sent to the unix socket named by $NOTIFY_SOCKET (a path, or an abstract
 * name written with a leading '@').  Without the variable every call here
 * does nothing and returns 0, so the daemon runs the same by hand.
 */
#ifndef KVQ_NOTIFY_H
#define KVQ_NOTIFY_H

#include <stdbool.h>
#include <stdint.h>

/*
 * kvq_notify() - send @state ("READY=1\nSTATUS=...") as one datagram.
 * Returns 0 when sent or when $NOTIFY_SOCKET is unset, or -errno (the
 * caller logs it; the daemon runs on).
 */
int kvq_notify(const char *state);

/* printf-style kvq_notify(). */
int kvq_notifyf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* True when $NOTIFY_SOCKET is set. */
bool kvq_notify_enabled(void);

/* READY=1 with a STATUS= line. */
int kvq_notify_ready(const char *status);
/* RELOADING=1 with MONOTONIC_USEC= (the clock systemd compares against). */
int kvq_notify_reloading(void);
/* STOPPING=1 with a STATUS= line. */
int kvq_notify_stopping(const char *status);
/* STATUS= alone. */
int kvq_notify_status(const char *status);
/* Asks for @usec more of the start/stop timeout from now. */
int kvq_notify_extend_timeout(uint64_t usec);

/* CLOCK_MONOTONIC in microseconds. */
uint64_t kvq_notify_now_usec(void);

#endif /* KVQ_NOTIFY_H */
