/*
 * conf.h - kvqd's configuration: one file of "key = value" lines, every
 * key overridable on the command line as --key-with-dashes VALUE.
 *
 * Why this file exists: the daemon, `kvqd --check-config`, the admin
 * socket's "config" command, `kvqd --help` and kvqd.conf(5) all speak about
 * the same set of keys.  They are described once, in a table (conf.c),
 * that says each key's type, range, default, and whether SIGHUP may change
 * it in a running daemon.
 *
 * Precedence: built-in defaults < the config file < the command line.
 * Every value is checked when it is set (type, range) and the whole is
 * checked by kvq_config_validate() (files exist, keys agree with each
 * other).  Errors name where the value came from: "FILE:LINE: key: why",
 * "command line: --key: why", or "FILE: key: why" for a key left unset.
 */
#ifndef KVQ_CONF_H
#define KVQ_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef KVQ_SYSCONFDIR
#define KVQ_SYSCONFDIR "/etc"
#endif
#define KVQ_CONFIG_DEFAULT_PATH KVQ_SYSCONFDIR "/kvqd/kvqd.conf"
#define KVQ_CONFIG_DEFAULT_STATE_DIR "/var/lib/kvqd"
#define KVQ_ADMIN_SOCKET_NAME "kvqd.sock"
#define KVQ_ADMIN_DEFAULT_SOCKET "/run/kvqd/" KVQ_ADMIN_SOCKET_NAME

/* Upper bound of keys in the table; checked at compile time in conf.c. */
#define KVQ_CONFIG_MAX_KEYS 48
/* Longest line of a config file, and longest value. */
#define KVQ_CONFIG_MAX_LINE 4096

enum kvq_device {
	KVQ_DEVICE_AUTO = 0,	/* a GPU when one is usable, else the CPU */
	KVQ_DEVICE_CPU,
	KVQ_DEVICE_CUDA,
};

/* Where a key's value came from. */
enum kvq_config_src {
	KVQ_SRC_DEFAULT = 0,
	KVQ_SRC_ENV,		/* default taken from the environment */
	KVQ_SRC_FILE,
	KVQ_SRC_CMDLINE,
};

struct kvq_config_origin {
	enum kvq_config_src src;
	int line;		/* KVQ_SRC_FILE: 1-based line */
};

/*
 * The effective configuration.  Strings are owned (malloc'd, never NULL
 * after kvq_config_init()); durations are in milliseconds; sizes in bytes.
 */
struct kvq_config {
	char *path;			/* the file read; "" when none */
	bool path_missing;		/* the default file did not exist */

	char *model;
	char *fim;			/* Fisher sidecar; "": MODEL.fim.gguf if there */
	char *listen;			/* "HOST:PORT" as written */
	char *listen_host;		/* parsed: no brackets around IPv6 */
	uint16_t listen_port;
	char *api_key;			/* "": no key required */
	char *admin_socket;		/* resolved: never "" after load */
	char *state_dir;
	uint32_t threads;		/* 0: one per CPU */
	uint32_t n_ctx;			/* 0: the model's (capped) */
	uint32_t kv_tokens;		/* 0: n_ctx * max_running */
	uint32_t max_running;
	uint32_t max_queued;
	uint32_t max_tokens;		/* largest max_tokens a request may ask */
	uint32_t default_max_tokens;	/* when a request gives none */
	uint32_t prefill_chunk;
	uint64_t max_body_bytes;
	uint64_t max_header_bytes;
	uint32_t idle_timeout_ms;	/* 0: none */
	uint32_t request_timeout_ms;	/* 0: none */
	uint32_t queue_timeout_ms;	/* 0: none */
	uint32_t drain_timeout_ms;
	int log_level;			/* enum kvq_log_level */
	char *kv_type_k;		/* a type, a per-layer list, or "auto" */
	char *kv_type_v;		/* a type or a per-layer list */
	uint32_t kv_page_tokens;
	uint32_t kv_sink_tokens;
	int kv_smooth;			/* enum kvq_kv_smooth_mode */
	int kv_key_rounding;		/* 1: keys' codes against the
					 * queries (kvq_kv_key_moments()) */
	int prefix_cache;		/* 1: share prompt prefixes' KV */
	int device;			/* enum kvq_device */

	struct kvq_config_origin origin[KVQ_CONFIG_MAX_KEYS];
};

enum kvq_config_type {
	KVQ_CT_STRING,		/* any text, may be empty */
	KVQ_CT_FILE,		/* path of a readable regular file */
	KVQ_CT_DIR,		/* path of a writable directory */
	KVQ_CT_SOCKET,		/* path of a unix socket to create */
	KVQ_CT_LISTEN,		/* HOST:PORT or [V6]:PORT */
	KVQ_CT_UINT,		/* decimal integer in [min, max] */
	KVQ_CT_SIZE,		/* bytes, with optional K/M/G (1024) suffix */
	KVQ_CT_DURATION,	/* ms, s, m, h suffix; bare number: seconds */
	KVQ_CT_ENUM,		/* one of the names in choices */
};

struct kvq_config_choice {
	const char *name;
	int value;
};

/* One key of the table. */
struct kvq_config_key {
	const char *name;
	enum kvq_config_type type;
	size_t off;			/* into struct kvq_config */
	bool live;			/* SIGHUP applies it without a restart */
	bool secret;			/* never shown (api_key) */
	const char *def;		/* default, in the file's syntax */
	uint64_t min, max;		/* UINT, SIZE, DURATION (in ms) */
	const struct kvq_config_choice *choices;	/* ENUM, NULL-ended */
	const char *help;		/* one line for --help */
};

/* The table: kvq_config_n_keys() entries, in documentation order. */
size_t kvq_config_n_keys(void);
const struct kvq_config_key *kvq_config_key(size_t i);
/* Index of the key called @name ("max_tokens" or "max-tokens"), or -1. */
int kvq_config_find(const char *name);

/* ------------------------------------------------------- command line */

#define KVQ_ARGS_MAX_OVERRIDES 64

struct kvq_args {
	const char *config_path;	/* --config, or the default */
	bool config_given;		/* --config was passed */
	bool check_config;		/* --check-config */
	bool help;			/* -h, --help */
	bool version;			/* -V, --version */
	int n_over;
	struct {
		int key;		/* index in the table */
		const char *value;	/* points into argv */
	} over[KVQ_ARGS_MAX_OVERRIDES];
};

/*
 * kvq_config_parse_args() - read kvqd's options: --config FILE,
 * --check-config, --help, --version and --KEY VALUE / --KEY=VALUE for
 * every key of the table.  Values are not checked here (that happens when
 * they are applied), only that the option exists and has a value.
 * Returns 0, or -EINVAL with one line in @err; @a is filled either way.
 * @argv is not modified and must outlive @a.
 */
int kvq_config_parse_args(int argc, char **argv, struct kvq_args *a,
			  char *err, size_t errlen);

/* -------------------------------------------------------------- values */

/* Defaults for every key (no file read, no environment looked at). */
void kvq_config_init(struct kvq_config *c);
void kvq_config_fini(struct kvq_config *c);

/*
 * kvq_config_set() - parse @value for key number @key and store it with
 * @origin.  @base_dir (may be NULL) resolves relative paths: the config
 * file's directory for values from the file.  On failure returns -EINVAL,
 * appends "PREFIX: key: why" to @err (PREFIX names the origin, @file being
 * the file for KVQ_SRC_FILE) and leaves @c unchanged.
 */
int kvq_config_set(struct kvq_config *c, int key, const char *value,
		   struct kvq_config_origin origin, const char *file,
		   const char *base_dir, char *err, size_t errlen);

/*
 * kvq_config_read_file() - apply every "key = value" line of @path.
 * Blank lines and lines whose first non-blank character is '#' are
 * ignored; a value may be put in double quotes (\" and \\ inside) to keep
 * blanks or to be empty.  Every bad line is reported (not only the first)
 * as "PATH:LINE: ...".  Returns 0, -EINVAL (some lines were bad; the good
 * ones are applied), or the -errno of opening/reading the file.
 */
int kvq_config_read_file(struct kvq_config *c, const char *path, char *err,
			 size_t errlen);

/*
 * kvq_config_load() - the whole thing: defaults, the environment's
 * defaults ($STATE_DIRECTORY, $RUNTIME_DIRECTORY), the file @a names (a
 * missing default file is fine, a missing --config file is not), the
 * command-line overrides, then kvq_config_validate().  @c must be
 * kvq_config_init()'ed; it is filled even on failure (for messages).
 * Returns 0 or -EINVAL with every problem in @err, one per line.
 */
/*
 * The bundled model: KVQ_MODELDIR/KVQ_BUNDLED_MODEL once installed, else
 * the copy in the source tree; NULL when neither is readable.  A config
 * without a model uses it.
 */
const char *kvq_config_default_model(void);

int kvq_config_load(struct kvq_config *c, const struct kvq_args *a,
		    char *err, size_t errlen);

/*
 * kvq_config_validate() - checks that need the whole config or the file
 * system: the model file is readable, the state directory is writable,
 * the admin socket's directory exists, limits agree (max_tokens <= n_ctx,
 * kv_tokens >= n_ctx, ...).  Appends every problem to @err.  Returns 0 or
 * -EINVAL.
 */
int kvq_config_validate(const struct kvq_config *c, char *err, size_t errlen);

/* ------------------------------------------------------------- helpers */

/* The value of key @key in the file's syntax ("30s", "1M", "q8"). */
void kvq_config_format(const struct kvq_config *c, int key, char *buf,
		       size_t len);
/* "default", "environment", "command line", "FILE:LINE". */
void kvq_config_where(const struct kvq_config *c, int key, char *buf,
		      size_t len);
bool kvq_config_equal(const struct kvq_config *a, const struct kvq_config *b,
		      int key);

/*
 * kvq_config_copy_key() - copy key @key's value and origin from @src into
 * @dst.  Returns 0 or -ENOMEM (@dst unchanged).
 */
int kvq_config_copy_key(struct kvq_config *dst, const struct kvq_config *src,
			int key);

/* Name of a value of an enum key ("q8", "info"), "?" when unknown. */
const char *kvq_config_enum_name(int key, int value);

/*
 * kvq_config_lookup() - the raw value of @name in the file @path without
 * checking the rest of the file (kvqctl reads admin_socket this way).
 * Returns 0 and a malloc'd copy in *out, -ENOENT when the key is absent,
 * or the -errno of reading the file.
 */
int kvq_config_lookup(const char *path, const char *name, char **out);

#endif /* KVQ_CONF_H */
