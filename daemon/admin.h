/*
 * admin.h - the admin unix socket that kvqctl talks to.
 *
 * Why this file exists: operators need to see what a running kvqd is doing
 * (its state, where every tensor lives, which requests are in flight, the
 * configuration in force) without exposing any of it on the TCP port.  The
 * socket is created with mode 0660, so only root and members of kvqd's
 * group may connect.
 *
 * Protocol (newline-delimited JSON, one reply line per request line, the
 * connection may carry many):
 *   request:  {"cmd": "status"}            (a bare word "status" also works)
 *   reply:    {"ok": true, "cmd": "status", "result": {...}}
 *         or  {"ok": false, "error": {"code": "unknown_command",
 *                                     "message": "..."}}
 * Commands: status, tiers, requests, config, help.  The shape of each
 * result is documented in kvqctl(1).
 *
 * Threads: everything here runs on the event loop's thread; the view is
 * read on that thread only, so the daemon may change it between events
 * without locking.
 */
#ifndef KVQ_ADMIN_H
#define KVQ_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

struct event_base;
struct kvq_config;
struct kvq_model;
struct kvq_sched;
struct kvq_http;

/* Lines longer than this are refused and the connection closed. */
#define KVQ_ADMIN_MAX_LINE (64 * 1024)
#define KVQ_ADMIN_MAX_CLIENTS 16

/* What the commands report: owned by the daemon, read on the loop thread. */
struct kvq_admin_view {
	const char *state;		/* "loading", "ready", "draining" */
	const char *device;		/* "cpu", or the GPU's name */
	uint64_t started_usec;		/* CLOCK_MONOTONIC at start-up */
	const struct kvq_config *conf;	/* the configuration in force */
	/*
	 * The file as last read by a good reload, when it differs from @conf
	 * in keys that need a restart; NULL otherwise.
	 */
	const struct kvq_config *pending;
	struct kvq_model *model;	/* NULL until loaded */
	const struct kvq_fisher *fisher;	/* weight scores, with the model */
	struct kvq_sched *sched;	/* NULL until running */
	struct kvq_http *http;		/* NULL until listening */
	unsigned reloads;		/* SIGHUPs handled */
	unsigned reloads_failed;	/* ... whose config was refused */
	const char *last_reload;	/* "ok", or why the last one failed */
};

struct kvq_admin;
struct kvq_fisher;

/*
 * kvq_admin_create() - listen on the unix socket @path with mode 0660.
 * A stale socket file left by a dead kvqd is replaced; a live one is not
 * (-EADDRINUSE).  @view must outlive the admin socket.  Returns 0 and
 * stores the server in *out, or -errno with a line naming the path in
 * @err; nothing is left behind on failure.
 */
int kvq_admin_create(struct event_base *base, const char *path,
		     const struct kvq_admin_view *view, struct kvq_admin **out,
		     char *err, size_t errlen);

/* Closes every connection and removes the socket file.  NULL is a no-op. */
void kvq_admin_destroy(struct kvq_admin *a);

/*
 * kvq_admin_command() - run command @cmd against @view.  Returns a new
 * reference to the result object, or NULL with a message in @err (and
 * -errno in *code: -ENOENT unknown command, -EAGAIN not available yet,
 * -ENOMEM).
 */
json_t *kvq_admin_command(const struct kvq_admin_view *view, const char *cmd,
			  int *code, char *err, size_t errlen);

#endif /* KVQ_ADMIN_H */
