/*
 * kvqctl.c - inspect a running kvqd through its admin socket.
 *
 * Why this file exists: operators ask a running daemon what it is doing
 * (status, where tensors live, requests in flight, the configuration in
 * force) without touching the public HTTP port.  kvqctl sends one command
 * line to the admin socket (protocol in daemon/admin.h), then prints the
 * reply as a table, or as JSON with --json for scripts.  When it cannot
 * connect it says why in operator terms: daemon not running, or which
 * group the user lacks.
 *
 * Exit status: 0 success, 1 the daemon answered with an error or the reply
 * was unreadable, 2 usage, 3 kvqd is not running, 4 permission denied.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "daemon/conf.h"

#define EXIT_DAEMON 1
#define EXIT_USAGE 2
#define EXIT_NOT_RUNNING 3
#define EXIT_PERM 4

#define REPLY_MAX (64u << 20)

static int timeout_ms = 10000;

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: kvqctl [OPTIONS] COMMAND\n"
		"Ask a running kvqd what it is doing.\n"
		"\n"
		"Commands:\n"
		"  status     state, model, request counters, KV cache use\n"
		"  tiers      every tensor and KV chunk: tier, bytes, type, score\n"
		"  requests   queued and running requests\n"
		"  config     every configuration key, its value and source\n"
		"\n"
		"Options:\n"
		"  -s, --socket PATH   admin socket (default: admin_socket from the\n"
		"                      config file, else %s)\n"
		"  -c, --config FILE   config file to read admin_socket from\n"
		"                      (default %s)\n"
		"  -j, --json          print the daemon's JSON instead of a table\n"
		"  -t, --timeout SEC   wait this long for an answer (default 10)\n"
		"  -h, --help          this text\n"
		"  -V, --version       kvqctl's version\n",
		KVQ_ADMIN_DEFAULT_SOCKET, KVQ_CONFIG_DEFAULT_PATH);
}

/* ------------------------------------------------------------ the socket */

static bool exists(const char *path)
{
	struct stat st;

	return !stat(path, &st) || errno != ENOENT;
}

/*
 * Where the daemon listens: --socket, $KVQD_ADMIN_SOCKET, admin_socket in
 * the config file, the systemd runtime directory, then the state directory
 * (where kvqd puts it when not run by systemd).
 */
static char *resolve_socket(const char *opt, const char *config)
{
	char *v = NULL, *p;
	const char *env = getenv("KVQD_ADMIN_SOCKET");

	if (opt)
		return strdup(opt);
	if (env && *env)
		return strdup(env);
	if (!kvq_config_lookup(config, "admin_socket", &v) && *v)
		return v;
	free(v);
	v = NULL;
	if (exists(KVQ_ADMIN_DEFAULT_SOCKET))
		return strdup(KVQ_ADMIN_DEFAULT_SOCKET);
	if (!kvq_config_lookup(config, "state_dir", &v) && *v) {
		if (asprintf(&p, "%s/%s", v, KVQ_ADMIN_SOCKET_NAME) < 0)
			p = NULL;
		free(v);
		if (p && exists(p))
			return p;
		free(p);
	} else {
		free(v);
	}
	p = KVQ_CONFIG_DEFAULT_STATE_DIR "/" KVQ_ADMIN_SOCKET_NAME;
	if (exists(p))
		return strdup(p);
	return strdup(KVQ_ADMIN_DEFAULT_SOCKET);
}

static void explain_eacces(const char *path)
{
	struct stat st;
	struct group *gr;
	struct passwd *pw;
	char dir[PATH_MAX], *slash;
	char gname[64], uname[64];

	if (stat(path, &st)) {
		snprintf(dir, sizeof(dir), "%s", path);
		slash = strrchr(dir, '/');
		if (slash && slash != dir)
			*slash = '\0';
		fprintf(stderr,
			"kvqctl: permission denied: cannot reach %s (directory %s is not accessible to you); run as root or ask for access to that directory\n",
			path, dir);
		return;
	}
	gr = getgrgid(st.st_gid);
	pw = getpwuid(st.st_uid);
	if (gr)
		snprintf(gname, sizeof(gname), "%s", gr->gr_name);
	else
		snprintf(gname, sizeof(gname), "%u", (unsigned)st.st_gid);
	if (pw)
		snprintf(uname, sizeof(uname), "%s", pw->pw_name);
	else
		snprintf(uname, sizeof(uname), "%u", (unsigned)st.st_uid);
	fprintf(stderr,
		"kvqctl: permission denied on %s (owner %s:%s, mode %04o)\n"
		"kvqctl: connecting needs write permission: run as root or as a member of group '%s'\n"
		"kvqctl:   e.g. sudo usermod -aG %s $USER, then log in again\n",
		path, uname, gname, (unsigned)(st.st_mode & 07777), gname,
		gname);
}

/* Returns a connected fd, or -1 after printing why and setting *status. */
static int connect_admin(const char *path, int *status)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int fd, e;

	if (strlen(path) >= sizeof(sun.sun_path)) {
		fprintf(stderr, "kvqctl: socket path too long: %s\n", path);
		*status = EXIT_USAGE;
		return -1;
	}
	strcpy(sun.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		perror("kvqctl: socket");
		*status = EXIT_DAEMON;
		return -1;
	}
	if (!connect(fd, (struct sockaddr *)&sun, sizeof(sun)))
		return fd;
	e = errno;
	close(fd);
	switch (e) {
	case ENOENT:
		fprintf(stderr, "kvqctl: kvqd is not running (no socket at %s)\n",
			path);
		*status = EXIT_NOT_RUNNING;
		break;
	case ECONNREFUSED:
		fprintf(stderr,
			"kvqctl: kvqd is not running (no socket at %s accepts connections; the file is left from an earlier run)\n",
			path);
		*status = EXIT_NOT_RUNNING;
		break;
	case EACCES:
	case EPERM:
		explain_eacces(path);
		*status = EXIT_PERM;
		break;
	default:
		fprintf(stderr, "kvqctl: cannot connect to %s: %s\n", path,
			strerror(e));
		*status = EXIT_DAEMON;
		break;
	}
	return -1;
}

static int send_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Reads one reply line (malloc'd, without the newline) or NULL. */
static char *read_line(int fd, const char *path)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	size_t len = 0, cap = 4096;
	char *buf = malloc(cap), *nl;
	ssize_t n;
	int r;

	while (buf) {
		r = poll(&pfd, 1, timeout_ms);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			fprintf(stderr,
				"kvqctl: no answer from kvqd on %s within %d s\n",
				path, timeout_ms / 1000);
			break;
		}
		if (len + 1 >= cap) {
			char *nb = cap < REPLY_MAX ? realloc(buf, cap * 2)
						   : NULL;

			if (!nb) {
				fprintf(stderr, "kvqctl: reply too large\n");
				break;
			}
			buf = nb;
			cap *= 2;
		}
		n = recv(fd, buf + len, cap - len - 1, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr,
				"kvqctl: kvqd closed the connection without answering\n");
			break;
		}
		len += (size_t)n;
		buf[len] = '\0';
		nl = memchr(buf, '\n', len);
		if (nl) {
			*nl = '\0';
			return buf;
		}
	}
	free(buf);
	return NULL;
}

/* ------------------------------------------------------------- printing */

static void human_bytes(double b, char *buf, size_t len)
{
	static const char *const u[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	int i = 0;

	while (b >= 1024 && i < 4) {
		b /= 1024;
		i++;
	}
	if (i == 0)
		snprintf(buf, len, "%.0f B", b);
	else
		snprintf(buf, len, "%.1f %s", b, u[i]);
}

static void human_duration(double s, char *buf, size_t len)
{
	long t = (long)s;

	if (t < 60)
		snprintf(buf, len, "%.1fs", s);
	else if (t < 3600)
		snprintf(buf, len, "%ldm%02lds", t / 60, t % 60);
	else if (t < 86400)
		snprintf(buf, len, "%ldh%02ldm", t / 3600, (t / 60) % 60);
	else
		snprintf(buf, len, "%ldd%02ldh", t / 86400, (t / 3600) % 24);
}

#define TABLE_MAX_COLS 10

struct table {
	int ncol;
	int nrow;
	char **cell;			/* nrow * ncol, owned */
	bool right[TABLE_MAX_COLS];	/* right-aligned columns */
};

static void table_add(struct table *t, const char *const *row)
{
	char **nc = realloc(t->cell, sizeof(char *) *
			    (size_t)(t->nrow + 1) * (size_t)t->ncol);
	int i;

	if (!nc)
		return;
	t->cell = nc;
	for (i = 0; i < t->ncol; i++)
		nc[t->nrow * t->ncol + i] = strdup(row[i] ? row[i] : "");
	t->nrow++;
}

static void table_print(struct table *t)
{
	size_t w[TABLE_MAX_COLS] = { 0 };
	int r, c;

	for (r = 0; r < t->nrow; r++)
		for (c = 0; c < t->ncol; c++) {
			const char *s = t->cell[r * t->ncol + c];
			size_t l = s ? strlen(s) : 0;

			if (l > w[c])
				w[c] = l;
		}
	for (r = 0; r < t->nrow; r++) {
		for (c = 0; c < t->ncol; c++) {
			const char *s = t->cell[r * t->ncol + c];
			bool last = c == t->ncol - 1;

			if (!s)
				s = "";
			if (t->right[c])
				printf("%*s", (int)w[c], s);
			else if (last)
				printf("%s", s);
			else
				printf("%-*s", (int)w[c], s);
			if (!last)
				printf("  ");
		}
		printf("\n");
	}
	for (r = 0; r < t->nrow * t->ncol; r++)
		free(t->cell[r]);
	free(t->cell);
	t->cell = NULL;
	t->nrow = 0;
}

static const char *sget(json_t *o, const char *key)
{
	const char *s = json_string_value(json_object_get(o, key));

	return s ? s : "";
}

static long long iget(json_t *o, const char *key)
{
	return (long long)json_integer_value(json_object_get(o, key));
}

static double nget(json_t *o, const char *key)
{
	return json_number_value(json_object_get(o, key));
}

static void print_status(json_t *r)
{
	json_t *m = json_object_get(r, "model");
	json_t *q = json_object_get(r, "requests");
	json_t *kv = json_object_get(r, "kv");
	json_t *rl = json_object_get(r, "reloads");
	char up[32], used[32], cap[32];

	human_duration(nget(r, "uptime_s"), up, sizeof(up));
	printf("state:        %s\n", sget(r, "state"));
	printf("version:      %s (pid %lld, up %s)\n", sget(r, "version"),
	       iget(r, "pid"), up);
	if (json_object_get(m, "desc"))
		printf("model:        %s (%s)\n", sget(m, "path"),
		       sget(m, "desc"));
	else
		printf("model:        %s (loading)\n", sget(m, "path"));
	printf("device:       %s\n", sget(r, "device"));
	printf("listen:       %s\n", sget(r, "listen"));
	printf("admin socket: %s\n", sget(r, "admin_socket"));
	printf("config:       %s\n", sget(r, "config_file"));
	printf("log level:    %s\n", sget(r, "log_level"));
	if (json_object_get(q, "running")) {
		printf("requests:     %lld running (max %lld), %lld waiting (max %lld); %lld total, %lld rejected\n",
		       iget(q, "running"), iget(q, "max_running"),
		       iget(q, "waiting"), iget(q, "max_queued"),
		       iget(q, "total"), iget(q, "rejected"));
		printf("tokens:       %lld prompt (%lld shared from the prefix cache), %lld generated (%lld sampled on the GPU)\n",
		       iget(q, "prompt_tokens"), iget(kv, "prompt_tokens_cached"),
		       iget(q, "generated_tokens"),
		       iget(q, "generated_tokens_sampled_on_gpu"));
		if (nget(q, "device_seconds") > 0)
			printf("steps:        %lld, %.3f s; the GPU busy %.3f s of them (%.0f%%)\n",
			       iget(q, "steps"), nget(q, "step_seconds"),
			       nget(q, "device_seconds"),
			       nget(q, "step_seconds") > 0 ?
			       100.0 * nget(q, "device_seconds") /
			       nget(q, "step_seconds") : 0.0);
		else
			printf("steps:        %lld, %.3f s\n", iget(q, "steps"),
			       nget(q, "step_seconds"));
		if (json_is_true(json_object_get(kv, "prefix_cache")))
			printf("prefix cache: %lld finished sequences kept\n",
			       iget(kv, "prefix_cache_sequences"));
		else
			printf("prefix cache: off\n");
		human_bytes(nget(kv, "bytes_used"), used, sizeof(used));
		human_bytes(nget(kv, "bytes_capacity"), cap, sizeof(cap));
		printf("kv cache:     %s of %s in use (%s, %lld tokens, n_ctx %lld)\n",
		       used, cap, sget(kv, "tier"), iget(kv, "tokens"),
		       iget(kv, "n_ctx"));
		printf("kv format:    keys %s, values %s, %lld bytes per token; attention on %s\n",
		       sget(kv, "type_k"), sget(kv, "type_v"),
		       iget(kv, "bytes_per_token"), sget(kv, "attention"));
		if (json_object_get(kv, "gpu_weights"))
			printf("gpu weights:  %s\n", sget(kv, "gpu_weights"));
		if (json_object_get(kv, "dot_products"))
			printf("dot products: %s%s\n", sget(kv, "dot_products"),
			       !strcmp(sget(kv, "dot_products"), "int8") ?
			       " (8- and 4-bit weights times x quantized per 32 columns; KVQ_DOT)" :
			       "");
		if (json_object_get(kv, "gpu_fallback"))
			printf("gpu:          %s\n", sget(kv, "gpu_fallback"));
		if (json_object_get(kv, "calibration")) {
			json_t *cal = json_object_get(kv, "calibration");

			printf("kv calibration: keys chosen by calibration in %.2f s (KL q8 %.3g, q4 %.3g; max logit error / std: q8 %.4g, q4 %.4g; ratio %.3g)\n",
			       nget(cal, "seconds"), nget(cal, "kl_q8"),
			       nget(cal, "kl_q4"), nget(cal, "err_q8"),
			       nget(cal, "err_q4"), nget(cal, "ratio"));
		}
	}
	if (json_object_get(r, "kv_smooth")) {
		json_t *sm = json_object_get(r, "kv_smooth");

		printf("kv smoothing: %s%s%s (kv_smooth = %s) in %.2f s; predicted error keys %.4g -> %.4g, values %.4g -> %.4g\n",
		       sget(sm, "state"),
		       json_is_true(json_object_get(sm, "rotated")) ?
		       ", key pairs rotated" : "",
		       json_is_true(json_object_get(sm, "centred")) ?
		       ", keys centred" : "", sget(sm, "mode"),
		       nget(sm, "seconds"), nget(sm, "k_err_before"),
		       nget(sm, "k_err_after"), nget(sm, "v_err_before"),
		       nget(sm, "v_err_after"));
	}
	if (json_object_get(r, "http"))
		printf("http:         %lld requests, %lld in flight (%lld streaming)\n",
		       iget(json_object_get(r, "http"), "requests_total"),
		       iget(json_object_get(r, "http"), "in_flight"),
		       iget(json_object_get(r, "http"), "streams"));
	printf("reloads:      %lld (%lld failed; last: %s)\n",
	       iget(rl, "count"), iget(rl, "failed"),
	       *sget(rl, "last") ? sget(rl, "last") : "none");
}

static void print_tiers(json_t *r)
{
	struct table t = { .ncol = 5 };
	char b1[32], b2[32], n[32], score[32], bytes[32];
	json_t *tier, *obj;
	size_t i;

	t.right[1] = t.right[2] = t.right[3] = true;
	table_add(&t, (const char *[]){ "TIER", "OBJECTS", "WEIGHTS", "KV",
					"STATE" });
	json_array_foreach(json_object_get(r, "tiers"), i, tier) {
		snprintf(n, sizeof(n), "%lld", iget(tier, "objects"));
		human_bytes(nget(tier, "weight_bytes"), b1, sizeof(b1));
		human_bytes(nget(tier, "kv_bytes"), b2, sizeof(b2));
		table_add(&t, (const char *[]){ sget(tier, "name"), n, b1, b2,
						sget(tier, "state") });
	}
	table_print(&t);
	printf("\n");

	t.ncol = 6;
	memset(t.right, 0, sizeof(t.right));
	t.right[4] = t.right[5] = true;
	table_add(&t, (const char *[]){ "NAME", "KIND", "TIER", "TYPE",
					"BYTES", "SCORE" });
	json_array_foreach(json_object_get(r, "objects"), i, obj) {
		human_bytes(nget(obj, "bytes"), bytes, sizeof(bytes));
		snprintf(score, sizeof(score), "%.4f", nget(obj, "score"));
		table_add(&t, (const char *[]){ sget(obj, "name"),
						sget(obj, "kind"),
						sget(obj, "tier"),
						sget(obj, "type"), bytes,
						score });
	}
	table_print(&t);
	human_bytes(nget(json_object_get(r, "kv"), "bytes_used"), b1,
		    sizeof(b1));
	human_bytes(nget(json_object_get(r, "kv"), "bytes_capacity"), b2,
		    sizeof(b2));
	printf("\nkv cache: %s of %s in use, tier %s\n", b1, b2,
	       sget(json_object_get(r, "kv"), "tier"));
	printf("scores: %s\n", sget(r, "score_source"));
}

static void print_requests(json_t *r)
{
	struct table t = { .ncol = 8 };
	char c[6][32];
	json_t *q, *list = json_object_get(r, "requests");
	size_t i;

	if (!json_array_size(list)) {
		printf("no requests queued or running\n");
		return;
	}
	for (i = 1; i < 7; i++)
		t.right[i] = i != 1;
	table_add(&t, (const char *[]){ "ID", "STATE", "PROMPT", "PREFILLED",
					"GENERATED", "MAX", "AGE", "TAG" });
	json_array_foreach(list, i, q) {
		snprintf(c[0], 32, "%lld", iget(q, "id"));
		snprintf(c[1], 32, "%lld", iget(q, "prompt_tokens"));
		snprintf(c[2], 32, "%lld", iget(q, "prefilled_tokens"));
		snprintf(c[3], 32, "%lld", iget(q, "generated_tokens"));
		snprintf(c[4], 32, "%lld", iget(q, "max_tokens"));
		human_duration(nget(q, "age_s"), c[5], 32);
		table_add(&t, (const char *[]){ c[0], sget(q, "state"), c[1],
						c[2], c[3], c[4], c[5],
						sget(q, "tag") });
	}
	table_print(&t);
}

static void print_config(json_t *r)
{
	struct table t = { .ncol = 4 };
	json_t *k, *list = json_object_get(r, "keys");
	bool pending = false;
	size_t i;

	json_array_foreach(list, i, k)
		if (json_object_get(k, "pending_restart"))
			pending = true;
	if (pending)
		t.ncol = 5;
	table_add(&t, (const char *[]){ "KEY", "VALUE", "SOURCE", "SIGHUP",
					"AFTER RESTART" });
	json_array_foreach(list, i, k) {
		table_add(&t, (const char *[]){
			sget(k, "key"), sget(k, "value"), sget(k, "source"),
			json_is_true(json_object_get(k, "live")) ? "live"
								 : "restart",
			sget(k, "pending_restart") });
	}
	table_print(&t);
	if (json_is_true(json_object_get(r, "file_missing")))
		printf("\n(%s does not exist: defaults and command line only)\n",
		       sget(r, "file"));
}

static const struct {
	const char *name;
	void (*print)(json_t *result);
} commands[] = {
	{ "status", print_status },
	{ "tiers", print_tiers },
	{ "requests", print_requests },
	{ "config", print_config },
};

/* ----------------------------------------------------------------- main */

static int run(const char *path, const char *cmd, bool as_json,
	       void (*print)(json_t *))
{
	json_t *reply, *res, *err;
	json_error_t je;
	char req[128], *line, *out;
	int fd, status = 0;

	fd = connect_admin(path, &status);
	if (fd < 0)
		return status;
	snprintf(req, sizeof(req), "{\"cmd\":\"%s\"}\n", cmd);
	if (send_all(fd, req, strlen(req))) {
		fprintf(stderr, "kvqctl: sending to %s: %s\n", path,
			strerror(errno));
		close(fd);
		return EXIT_DAEMON;
	}
	line = read_line(fd, path);
	close(fd);
	if (!line)
		return EXIT_DAEMON;
	reply = json_loads(line, 0, &je);
	free(line);
	if (!reply) {
		fprintf(stderr, "kvqctl: unreadable reply from kvqd: %s\n",
			je.text);
		return EXIT_DAEMON;
	}
	res = json_object_get(reply, "result");
	if (!json_is_true(json_object_get(reply, "ok")) || !res) {
		err = json_object_get(reply, "error");
		fprintf(stderr, "kvqctl: kvqd: %s\n",
			*sget(err, "message") ? sget(err, "message")
					      : "request failed");
		json_decref(reply);
		return EXIT_DAEMON;
	}
	if (as_json) {
		out = json_dumps(res, JSON_INDENT(2));
		if (out)
			printf("%s\n", out);
		free(out);
	} else {
		print(res);
	}
	json_decref(reply);
	return fflush(stdout) ? EXIT_DAEMON : 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "config", required_argument, NULL, 'c' },
		{ "json", no_argument, NULL, 'j' },
		{ "timeout", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	const char *sock_opt = NULL, *config = KVQ_CONFIG_DEFAULT_PATH;
	bool as_json = false;
	char *path, *end;
	size_t i;
	long t;
	int c, ret;

	while ((c = getopt_long(argc, argv, "s:c:jt:hV", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			sock_opt = optarg;
			break;
		case 'c':
			config = optarg;
			break;
		case 'j':
			as_json = true;
			break;
		case 't':
			t = strtol(optarg, &end, 10);
			if (*end || t < 1 || t > 3600) {
				fprintf(stderr,
					"kvqctl: --timeout wants seconds from 1 to 3600\n");
				return EXIT_USAGE;
			}
			timeout_ms = (int)t * 1000;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("kvqctl %s\n", PACKAGE_VERSION);
			return 0;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (optind != argc - 1) {
		usage(stderr);
		return EXIT_USAGE;
	}
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (!strcmp(argv[optind], commands[i].name))
			break;
	if (i == sizeof(commands) / sizeof(commands[0])) {
		fprintf(stderr, "kvqctl: unknown command '%s'\n", argv[optind]);
		usage(stderr);
		return EXIT_USAGE;
	}
	path = resolve_socket(sock_opt, config);
	if (!path) {
		fprintf(stderr, "kvqctl: out of memory\n");
		return EXIT_DAEMON;
	}
	ret = run(path, commands[i].name, as_json, commands[i].print);
	free(path);
	return ret;
}
