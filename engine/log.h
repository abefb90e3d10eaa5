/*
 * log.h - kvqd's one logging call.
 *
 * Why this file exists: kvqd runs under systemd, which keeps log levels when
 * each stderr line starts with a syslog priority prefix ("<3>" for errors).
 * Library code logs through here and never prints to stdout (stdout belongs
 * to the one-shot modes' output).
 */
#ifndef KVQ_LOG_H
#define KVQ_LOG_H

enum kvq_log_level {
	KVQ_LOG_ERR = 3,
	KVQ_LOG_WARNING = 4,
	KVQ_LOG_NOTICE = 5,
	KVQ_LOG_INFO = 6,
	KVQ_LOG_DEBUG = 7,
};

/* Messages above @level are dropped (default KVQ_LOG_INFO). */
void kvq_log_set_level(enum kvq_log_level level);
enum kvq_log_level kvq_log_get_level(void);

void kvq_log(enum kvq_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#define kvq_err(...) kvq_log(KVQ_LOG_ERR, __VA_ARGS__)
#define kvq_warn(...) kvq_log(KVQ_LOG_WARNING, __VA_ARGS__)
#define kvq_notice(...) kvq_log(KVQ_LOG_NOTICE, __VA_ARGS__)
#define kvq_info(...) kvq_log(KVQ_LOG_INFO, __VA_ARGS__)
#define kvq_debug(...) kvq_log(KVQ_LOG_DEBUG, __VA_ARGS__)

#endif /* KVQ_LOG_H */
