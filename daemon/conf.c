/*
 * conf.c - the key table, the file parser, command-line overrides and
 * validation (see conf.h).
 *
 * Everything about a key lives in its table row: adding a key is adding a
 * row, a field in struct kvq_config, and a paragraph in kvqd.conf(5).
 * Defaults are written in the file's syntax and go through the same parser
 * as the file, so a default can never be a value the parser would refuse.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <arpa/inet.h>

#include "daemon/conf.h"
#include "engine/kvcache.h"
#include "engine/kvsmooth.h"
#include "engine/log.h"

#define MS_PER_S 1000u
#define DAY_MS (24u * 3600u * MS_PER_S)

static const struct kvq_config_choice log_levels[] = {
	{ "err", KVQ_LOG_ERR },
	{ "warning", KVQ_LOG_WARNING },
	{ "notice", KVQ_LOG_NOTICE },
	{ "info", KVQ_LOG_INFO },
	{ "debug", KVQ_LOG_DEBUG },
	{ NULL, 0 },
};

static const struct kvq_config_choice devices[] = {
	{ "auto", KVQ_DEVICE_AUTO },
	{ "cpu", KVQ_DEVICE_CPU },
	{ "cuda", KVQ_DEVICE_CUDA },
	{ NULL, 0 },
};

static const struct kvq_config_choice kv_smooth_modes[] = {
	{ "auto", KVQ_KV_SMOOTH_AUTO },
	{ "on", KVQ_KV_SMOOTH_ON },
	{ "off", KVQ_KV_SMOOTH_OFF },
	{ NULL, 0 },
};

static const struct kvq_config_choice key_roundings[] = {
	{ "nearest", 0 },
	{ "queries", 1 },
	{ NULL, 0 },
};

static const struct kvq_config_choice on_off[] = {
	{ "off", 0 },
	{ "on", 1 },
	{ NULL, 0 },
};

#define OFF(f) offsetof(struct kvq_config, f)

static const struct kvq_config_key keys[] = {
	{ "model", KVQ_CT_FILE, OFF(model), false, false, "", 0, 0, NULL,
	  "GGUF model file to serve" },
	{ "fim", KVQ_CT_STRING, OFF(fim), false, false, "", 0, 0, NULL,
	  "Fisher sidecar ranking the weights (default: MODEL.fim.gguf beside the model, when there)" },
	{ "listen", KVQ_CT_LISTEN, OFF(listen), false, false,
	  "127.0.0.1:8080", 0, 0, NULL,
	  "HTTP address, HOST:PORT or [IPV6]:PORT" },
	{ "api_key", KVQ_CT_STRING, OFF(api_key), true, true, "", 0, 0, NULL,
	  "require 'Authorization: Bearer KEY' on the API (empty: none)" },
	{ "admin_socket", KVQ_CT_SOCKET, OFF(admin_socket), false, false, "",
	  0, 0, NULL,
	  "admin unix socket (empty: $RUNTIME_DIRECTORY or state_dir)" },
	{ "state_dir", KVQ_CT_DIR, OFF(state_dir), false, false,
	  KVQ_CONFIG_DEFAULT_STATE_DIR, 0, 0, NULL,
	  "writable directory for kvqd's state ($STATE_DIRECTORY)" },
	{ "device", KVQ_CT_ENUM, OFF(device), false, false, "auto", 0, 0,
	  devices, "where to compute: auto, cpu or cuda" },
	{ "threads", KVQ_CT_UINT, OFF(threads), false, false, "0", 0, 1024,
	  NULL, "CPU threads for the forward pass (0: one per CPU)" },
	{ "n_ctx", KVQ_CT_UINT, OFF(n_ctx), false, false, "0", 0, 1u << 20,
	  NULL, "tokens per sequence (0: the model's, at most 4096)" },
	{ "kv_tokens", KVQ_CT_UINT, OFF(kv_tokens), false, false, "0", 0,
	  1u << 26, NULL, "KV cache capacity in tokens (0: n_ctx * max_running)" },
	{ "max_running", KVQ_CT_UINT, OFF(max_running), false, false, "16", 1,
	  1024, NULL, "requests decoded together in one batch" },
	{ "max_queued", KVQ_CT_UINT, OFF(max_queued), true, false, "64", 0,
	  1000000, NULL, "requests waiting beyond max_running (then 429)" },
	{ "max_tokens", KVQ_CT_UINT, OFF(max_tokens), true, false, "4096", 1,
	  1u << 20, NULL, "largest max_tokens a request may ask for" },
	{ "default_max_tokens", KVQ_CT_UINT, OFF(default_max_tokens), true,
	  false, "256", 1, 1u << 20, NULL,
	  "max_tokens of a request that gives none" },
	{ "prefill_chunk", KVQ_CT_UINT, OFF(prefill_chunk), false, false, "256",
	  1, 65536, NULL, "prompt tokens per sequence per step" },
	{ "max_body_bytes", KVQ_CT_SIZE, OFF(max_body_bytes), true, false,
	  "1M", 1024, 1ull << 30, NULL, "largest HTTP request body" },
	{ "max_header_bytes", KVQ_CT_SIZE, OFF(max_header_bytes), true, false,
	  "16K", 1024, 1u << 20, NULL, "largest HTTP request header block" },
	{ "idle_timeout", KVQ_CT_DURATION, OFF(idle_timeout_ms), true, false,
	  "60s", MS_PER_S, DAY_MS, NULL,
	  "close a connection silent for this long" },
	{ "request_timeout", KVQ_CT_DURATION, OFF(request_timeout_ms), true,
	  false, "10m", 100, DAY_MS, NULL,
	  "longest life of one request, queue included" },
	{ "queue_timeout", KVQ_CT_DURATION, OFF(queue_timeout_ms), true, false,
	  "60s", MS_PER_S, DAY_MS, NULL, "longest wait in the queue" },
	{ "drain_timeout", KVQ_CT_DURATION, OFF(drain_timeout_ms), true, false,
	  "30s", 0, 3600u * MS_PER_S, NULL,
	  "on SIGTERM, time running requests get to finish" },
	{ "log_level", KVQ_CT_ENUM, OFF(log_level), true, false, "info", 0, 0,
	  log_levels, "err, warning, notice, info or debug" },
	{ "kv_type_k", KVQ_CT_STRING, OFF(kv_type_k), false, false, "q8", 0, 0,
	  NULL, "precision of cached keys: f32, f16, q8, q4, one per layer comma-separated, or auto" },
	{ "kv_type_v", KVQ_CT_STRING, OFF(kv_type_v), false, false, "q4", 0, 0,
	  NULL, "precision of cached values: f32, f16, q8, q4, or one per layer comma-separated" },
	{ "kv_page_tokens", KVQ_CT_UINT, OFF(kv_page_tokens), false, false,
	  "16", 1, 1024, NULL, "tokens per KV page (a power of two)" },
	{ "kv_sink_tokens", KVQ_CT_UINT, OFF(kv_sink_tokens), false, false,
	  "0", 0, 65536, NULL, "first tokens of a sequence kept in f16" },
	{ "kv_smooth", KVQ_CT_ENUM, OFF(kv_smooth), false, false, "auto", 0, 0,
	  kv_smooth_modes,
	  "reshape keys/values for a quantized KV cache, folded into the weights at load: auto, on or off" },
	{ "kv_key_rounding", KVQ_CT_ENUM, OFF(kv_key_rounding), false, false,
	  "nearest", 0, 0, key_roundings,
	  "codes of q8/q4 keys: nearest, or queries (per RoPE pair, the error the queries read least; CPU only)" },
	{ "prefix_cache", KVQ_CT_ENUM, OFF(prefix_cache), false, false, "on", 0, 0,
	  on_off,
	  "keep finished sequences' KV to share with later prompts that start the same way: on or off" },
};

#define N_KEYS (sizeof(keys) / sizeof(keys[0]))
_Static_assert(N_KEYS <= KVQ_CONFIG_MAX_KEYS, "raise KVQ_CONFIG_MAX_KEYS");

size_t kvq_config_n_keys(void)
{
	return N_KEYS;
}

const struct kvq_config_key *kvq_config_key(size_t i)
{
	return i < N_KEYS ? &keys[i] : NULL;
}

int kvq_config_find(const char *name)
{
	size_t i, j;

	for (i = 0; i < N_KEYS; i++) {
		const char *k = keys[i].name;

		for (j = 0; k[j] && name[j]; j++) {
			char c = name[j] == '-' ? '_' : name[j];

			if (c != k[j])
				break;
		}
		if (!k[j] && !name[j])
			return (int)i;
	}
	return -1;
}

/* ------------------------------------------------------------ messages */

static void errf(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Appends one line to @err (keeps what is there; truncates quietly). */
static void errf(char *err, size_t errlen, const char *fmt, ...)
{
	size_t used;
	va_list ap;
	int n;

	if (!err || !errlen)
		return;
	used = strnlen(err, errlen);
	if (used + 1 >= errlen)
		return;
	va_start(ap, fmt);
	n = vsnprintf(err + used, errlen - used, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	used = strnlen(err, errlen);
	if (used + 1 < errlen) {
		err[used] = '\n';
		err[used + 1] = '\0';
	}
}

static void dashed(const char *name, char *buf, size_t len)
{
	size_t i;

	for (i = 0; name[i] && i + 1 < len; i++)
		buf[i] = name[i] == '_' ? '-' : name[i];
	buf[i] = '\0';
}

/* "FILE:LINE: key", "command line: --key", "FILE: key". */
static void prefix(char *buf, size_t len, int key,
		   struct kvq_config_origin o, const char *file)
{
	char opt[64];

	switch (o.src) {
	case KVQ_SRC_FILE:
		snprintf(buf, len, "%s:%d: %s", file, o.line, keys[key].name);
		break;
	case KVQ_SRC_CMDLINE:
		dashed(keys[key].name, opt, sizeof(opt));
		snprintf(buf, len, "command line: --%s", opt);
		break;
	case KVQ_SRC_ENV:
		snprintf(buf, len, "environment: %s", keys[key].name);
		break;
	default:
		snprintf(buf, len, "%s: %s", file && *file ? file : "defaults",
			 keys[key].name);
		break;
	}
}

/* ------------------------------------------------------------- parsers */

static int parse_u64(const char *s, uint64_t *out, const char **end)
{
	uint64_t v = 0;

	if (!isdigit((unsigned char)*s))
		return -EINVAL;
	for (; isdigit((unsigned char)*s); s++) {
		unsigned d = (unsigned)(*s - '0');

		if (v > (UINT64_MAX - d) / 10)
			return -ERANGE;
		v = v * 10 + d;
	}
	*out = v;
	*end = s;
	return 0;
}

static int mul_check(uint64_t v, uint64_t m, uint64_t *out)
{
	if (m && v > UINT64_MAX / m)
		return -ERANGE;
	*out = v * m;
	return 0;
}

/* "1048576", "1024K", "1M", "2G", "1MiB", "16KB" (all powers of 1024). */
static int parse_size(const char *s, uint64_t *out)
{
	const char *e;
	uint64_t v, m = 1;
	int ret;

	ret = parse_u64(s, &v, &e);
	if (ret)
		return ret;
	switch (toupper((unsigned char)*e)) {
	case '\0':
		break;
	case 'K':
		m = 1ull << 10;
		break;
	case 'M':
		m = 1ull << 20;
		break;
	case 'G':
		m = 1ull << 30;
		break;
	case 'T':
		m = 1ull << 40;
		break;
	case 'B':
		if (e[1])
			return -EINVAL;
		*out = v;
		return 0;
	default:
		return -EINVAL;
	}
	if (*e) {
		e++;
		if (!strcasecmp(e, "iB") || !strcasecmp(e, "B"))
			e += strlen(e);
		if (*e)
			return -EINVAL;
	}
	return mul_check(v, m, out);
}

/* "500ms", "30s", "5m", "1h"; a bare number is seconds.  Result in ms. */
static int parse_duration(const char *s, uint64_t *out)
{
	const char *e;
	uint64_t v, m;
	int ret;

	ret = parse_u64(s, &v, &e);
	if (ret)
		return ret;
	if (!*e || !strcmp(e, "s"))
		m = 1000;
	else if (!strcmp(e, "ms"))
		m = 1;
	else if (!strcmp(e, "m") || !strcmp(e, "min"))
		m = 60 * 1000;
	else if (!strcmp(e, "h"))
		m = 3600 * 1000;
	else
		return -EINVAL;
	return mul_check(v, m, out);
}

static bool valid_hostname(const char *h)
{
	size_t n = strlen(h), i;

	if (!n || n > 253)
		return false;
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)h[i];

		if (!isalnum(c) && c != '-' && c != '.')
			return false;
	}
	return h[0] != '-' && h[0] != '.';
}

/*
 * "HOST:PORT" or "[V6]:PORT" into a malloc'd host and a port.  Returns 0
 * or -EINVAL with @why set.
 */
static int parse_listen(const char *s, char **host, uint16_t *port,
			const char **why)
{
	const char *colon, *hs, *he, *e;
	struct in6_addr a6;
	uint64_t p;
	char *h;

	if (s[0] == '[') {
		hs = s + 1;
		he = strchr(hs, ']');
		if (!he || he[1] != ':') {
			*why = "expected [IPV6]:PORT";
			return -EINVAL;
		}
		colon = he + 1;
	} else {
		hs = s;
		colon = strrchr(s, ':');
		if (!colon) {
			*why = "expected HOST:PORT (e.g. 127.0.0.1:8080)";
			return -EINVAL;
		}
		he = colon;
		if (memchr(hs, ':', (size_t)(he - hs))) {
			*why = "an IPv6 address needs brackets: [::1]:8080";
			return -EINVAL;
		}
	}
	if (parse_u64(colon + 1, &p, &e) || *e || p < 1 || p > 65535) {
		*why = "the port must be a number from 1 to 65535";
		return -EINVAL;
	}
	h = strndup(hs, (size_t)(he - hs));
	if (!h)
		return -ENOMEM;
	if (s[0] == '[' ? inet_pton(AF_INET6, h, &a6) != 1
			: !valid_hostname(h)) {
		*why = s[0] == '[' ? "not an IPv6 address"
				   : "not an IPv4 address or host name";
		free(h);
		return -EINVAL;
	}
	*host = h;
	*port = (uint16_t)p;
	return 0;
}

static int find_choice(const struct kvq_config_choice *ch, const char *s,
		       int *out)
{
	for (; ch->name; ch++) {
		if (!strcasecmp(ch->name, s)) {
			*out = ch->value;
			return 0;
		}
	}
	return -EINVAL;
}

const char *kvq_config_enum_name(int key, int value)
{
	const struct kvq_config_choice *ch;

	if (key < 0 || (size_t)key >= N_KEYS || !keys[key].choices)
		return "?";
	for (ch = keys[key].choices; ch->name; ch++)
		if (ch->value == value)
			return ch->name;
	return "?";
}

static void choice_list(const struct kvq_config_choice *ch, char *buf,
			size_t len)
{
	size_t used = 0;

	buf[0] = '\0';
	for (; ch->name && used < len; ch++) {
		int n = snprintf(buf + used, len - used, "%s%s",
				 used ? ", " : "", ch->name);

		if (n < 0)
			break;
		used += (size_t)n;
	}
}

/* A copy of @path made absolute against @base_dir when relative. */
static char *resolve_path(const char *path, const char *base_dir)
{
	char *out;

	if (!*path || path[0] == '/' || !base_dir || !*base_dir)
		return strdup(path);
	if (asprintf(&out, "%s/%s", base_dir, path) < 0)
		return NULL;
	return out;
}

/* ------------------------------------------------------------- storing */

static char **str_field(struct kvq_config *c, int key)
{
	return (char **)((char *)c + keys[key].off);
}

static uint32_t *u32_field(struct kvq_config *c, int key)
{
	return (uint32_t *)((char *)c + keys[key].off);
}

static uint64_t *u64_field(struct kvq_config *c, int key)
{
	return (uint64_t *)((char *)c + keys[key].off);
}

static int *int_field(struct kvq_config *c, int key)
{
	return (int *)((char *)c + keys[key].off);
}

#define CFIELD(type, c, key) \
	((const type *)((const char *)(c) + keys[key].off))

static bool is_string_type(enum kvq_config_type t)
{
	return t == KVQ_CT_STRING || t == KVQ_CT_FILE || t == KVQ_CT_DIR ||
	       t == KVQ_CT_SOCKET || t == KVQ_CT_LISTEN;
}

static int set_string(struct kvq_config *c, int key, const char *value,
		      const char *base_dir, const char *pfx, char *err,
		      size_t errlen)
{
	const struct kvq_config_key *k = &keys[key];
	char *host = NULL, *copy;
	uint16_t port = 0;
	const char *why;
	const char *p;
	int ret;

	for (p = value; *p; p++) {
		if ((unsigned char)*p < 0x20 || *p == 0x7f) {
			errf(err, errlen, "%s: control characters are not allowed",
			     pfx);
			return -EINVAL;
		}
	}
	if (k->type == KVQ_CT_LISTEN) {
		ret = parse_listen(value, &host, &port, &why);
		if (ret == -EINVAL)
			errf(err, errlen, "%s: '%s': %s", pfx, value, why);
		if (ret)
			return ret;
	}
	if (k->type == KVQ_CT_FILE || k->type == KVQ_CT_DIR ||
	    k->type == KVQ_CT_SOCKET)
		copy = resolve_path(value, base_dir);
	else
		copy = strdup(value);
	if (!copy) {
		free(host);
		return -ENOMEM;
	}
	free(*str_field(c, key));
	*str_field(c, key) = copy;
	if (k->type == KVQ_CT_LISTEN) {
		free(c->listen_host);
		c->listen_host = host;
		c->listen_port = port;
	}
	return 0;
}

static void range_text(const struct kvq_config_key *k, uint64_t v, char *buf,
		       size_t len);

int kvq_config_set(struct kvq_config *c, int key, const char *value,
		   struct kvq_config_origin origin, const char *file,
		   const char *base_dir, char *err, size_t errlen)
{
	const struct kvq_config_key *k;
	char pfx[512], lo[32], hi[32], list[128];
	uint64_t v = 0;
	int ev = 0, ret = 0;

	if (key < 0 || (size_t)key >= N_KEYS)
		return -EINVAL;
	k = &keys[key];
	prefix(pfx, sizeof(pfx), key, origin, file);
	if (strlen(value) >= KVQ_CONFIG_MAX_LINE) {
		errf(err, errlen, "%s: value too long", pfx);
		return -EINVAL;
	}

	switch (k->type) {
	case KVQ_CT_UINT:
		{
			const char *e;

			ret = parse_u64(value, &v, &e);
			if (!ret && *e)
				ret = -EINVAL;
			if (ret) {
				errf(err, errlen,
				     "%s: '%s' is not a whole number", pfx,
				     value);
				return -EINVAL;
			}
		}
		break;
	case KVQ_CT_SIZE:
		if (parse_size(value, &v)) {
			errf(err, errlen,
			     "%s: '%s' is not a size (bytes, or a number with K, M or G)",
			     pfx, value);
			return -EINVAL;
		}
		break;
	case KVQ_CT_DURATION:
		if (parse_duration(value, &v)) {
			errf(err, errlen,
			     "%s: '%s' is not a duration (e.g. 500ms, 30s, 5m, 1h)",
			     pfx, value);
			return -EINVAL;
		}
		break;
	case KVQ_CT_ENUM:
		if (find_choice(k->choices, value, &ev)) {
			choice_list(k->choices, list, sizeof(list));
			errf(err, errlen, "%s: '%s' is not one of: %s", pfx,
			     value, list);
			return -EINVAL;
		}
		break;
	default:
		ret = set_string(c, key, value, base_dir, pfx, err, errlen);
		if (ret)
			return ret;
		break;
	}

	if (k->type == KVQ_CT_UINT || k->type == KVQ_CT_SIZE ||
	    k->type == KVQ_CT_DURATION) {
		if (v < k->min || v > k->max) {
			range_text(k, k->min, lo, sizeof(lo));
			range_text(k, k->max, hi, sizeof(hi));
			errf(err, errlen, "%s: %s is out of range (%s to %s)",
			     pfx, value, lo, hi);
			return -EINVAL;
		}
		if (k->type == KVQ_CT_SIZE)
			*u64_field(c, key) = v;
		else
			*u32_field(c, key) = (uint32_t)v;
	} else if (k->type == KVQ_CT_ENUM) {
		*int_field(c, key) = ev;
	}
	c->origin[key] = origin;
	return 0;
}

/* ------------------------------------------------------------ formatting */

static void fmt_size(uint64_t v, char *buf, size_t len)
{
	static const char units[] = "KMGT";
	int u = -1;

	while (v && v % 1024 == 0 && u < 3) {
		v /= 1024;
		u++;
	}
	if (u < 0)
		snprintf(buf, len, "%llu", (unsigned long long)v);
	else
		snprintf(buf, len, "%llu%c", (unsigned long long)v, units[u]);
}

static void fmt_duration(uint64_t ms, char *buf, size_t len)
{
	if (ms && ms % (3600 * 1000) == 0)
		snprintf(buf, len, "%lluh", (unsigned long long)(ms / 3600000));
	else if (ms && ms % (60 * 1000) == 0)
		snprintf(buf, len, "%llum", (unsigned long long)(ms / 60000));
	else if (ms % 1000 == 0)
		snprintf(buf, len, "%llus", (unsigned long long)(ms / 1000));
	else
		snprintf(buf, len, "%llums", (unsigned long long)ms);
}

static void range_text(const struct kvq_config_key *k, uint64_t v, char *buf,
		       size_t len)
{
	if (k->type == KVQ_CT_SIZE)
		fmt_size(v, buf, len);
	else if (k->type == KVQ_CT_DURATION)
		fmt_duration(v, buf, len);
	else
		snprintf(buf, len, "%llu", (unsigned long long)v);
}

void kvq_config_format(const struct kvq_config *c, int key, char *buf,
		       size_t len)
{
	const struct kvq_config_key *k;

	if (key < 0 || (size_t)key >= N_KEYS || !len)
		return;
	k = &keys[key];
	switch (k->type) {
	case KVQ_CT_UINT:
		snprintf(buf, len, "%u", *CFIELD(uint32_t, c, key));
		break;
	case KVQ_CT_SIZE:
		fmt_size(*CFIELD(uint64_t, c, key), buf, len);
		break;
	case KVQ_CT_DURATION:
		fmt_duration(*CFIELD(uint32_t, c, key), buf, len);
		break;
	case KVQ_CT_ENUM:
		snprintf(buf, len, "%s",
			 kvq_config_enum_name(key, *CFIELD(int, c, key)));
		break;
	default:
		snprintf(buf, len, "%s", *CFIELD(char *, c, key));
		break;
	}
}

void kvq_config_where(const struct kvq_config *c, int key, char *buf,
		      size_t len)
{
	struct kvq_config_origin o;

	if (key < 0 || (size_t)key >= N_KEYS || !len)
		return;
	o = c->origin[key];
	switch (o.src) {
	case KVQ_SRC_FILE:
		snprintf(buf, len, "%s:%d", c->path, o.line);
		break;
	case KVQ_SRC_CMDLINE:
		snprintf(buf, len, "command line");
		break;
	case KVQ_SRC_ENV:
		snprintf(buf, len, "environment");
		break;
	default:
		snprintf(buf, len, "default");
		break;
	}
}

bool kvq_config_equal(const struct kvq_config *a, const struct kvq_config *b,
		      int key)
{
	switch (keys[key].type) {
	case KVQ_CT_UINT:
	case KVQ_CT_DURATION:
		return *CFIELD(uint32_t, a, key) == *CFIELD(uint32_t, b, key);
	case KVQ_CT_SIZE:
		return *CFIELD(uint64_t, a, key) == *CFIELD(uint64_t, b, key);
	case KVQ_CT_ENUM:
		return *CFIELD(int, a, key) == *CFIELD(int, b, key);
	default:
		return !strcmp(*CFIELD(char *, a, key),
			       *CFIELD(char *, b, key));
	}
}

int kvq_config_copy_key(struct kvq_config *dst, const struct kvq_config *src,
			int key)
{
	const struct kvq_config_key *k = &keys[key];
	char *s, *host = NULL;

	switch (k->type) {
	case KVQ_CT_UINT:
	case KVQ_CT_DURATION:
		*u32_field(dst, key) = *CFIELD(uint32_t, src, key);
		break;
	case KVQ_CT_SIZE:
		*u64_field(dst, key) = *CFIELD(uint64_t, src, key);
		break;
	case KVQ_CT_ENUM:
		*int_field(dst, key) = *CFIELD(int, src, key);
		break;
	default:
		s = strdup(*CFIELD(char *, src, key));
		if (k->type == KVQ_CT_LISTEN)
			host = strdup(src->listen_host);
		if (!s || (k->type == KVQ_CT_LISTEN && !host)) {
			free(s);
			free(host);
			return -ENOMEM;
		}
		free(*str_field(dst, key));
		*str_field(dst, key) = s;
		if (k->type == KVQ_CT_LISTEN) {
			free(dst->listen_host);
			dst->listen_host = host;
			dst->listen_port = src->listen_port;
		}
		break;
	}
	dst->origin[key] = src->origin[key];
	return 0;
}

/* ------------------------------------------------------------ lifecycle */

void kvq_config_init(struct kvq_config *c)
{
	struct kvq_config_origin def = { KVQ_SRC_DEFAULT, 0 };
	size_t i;

	memset(c, 0, sizeof(*c));
	c->path = strdup("");
	c->listen_host = strdup("");
	for (i = 0; i < N_KEYS; i++) {
		if (is_string_type(keys[i].type))
			*str_field(c, (int)i) = strdup("");
		/* Defaults are part of the table and known to be valid. */
		kvq_config_set(c, (int)i, keys[i].def, def, NULL, NULL, NULL,
			       0);
	}
}

void kvq_config_fini(struct kvq_config *c)
{
	size_t i;

	for (i = 0; i < N_KEYS; i++) {
		if (is_string_type(keys[i].type)) {
			free(*str_field(c, (int)i));
			*str_field(c, (int)i) = NULL;
		}
	}
	free(c->listen_host);
	free(c->path);
	c->listen_host = NULL;
	c->path = NULL;
}

/* ---------------------------------------------------------------- files */

static char *trim(char *s)
{
	char *e;

	while (*s == ' ' || *s == '\t')
		s++;
	e = s + strlen(s);
	while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r' ||
			 e[-1] == '\n'))
		*--e = '\0';
	return s;
}

/*
 * Splits one line into key and value (in place).  Returns 1 for a
 * key/value line, 0 for a blank or comment line, -EINVAL with @why set.
 */
static int split_line(char *line, char **key, char **value, const char **why)
{
	char *s = trim(line), *eq, *v, *r, *w;

	if (!*s || *s == '#')
		return 0;
	eq = strchr(s, '=');
	if (!eq) {
		*why = "expected 'key = value'";
		return -EINVAL;
	}
	*eq = '\0';
	*key = trim(s);
	if (!**key) {
		*why = "missing key before '='";
		return -EINVAL;
	}
	v = trim(eq + 1);
	if (*v == '"') {
		for (w = v, r = v + 1; *r && *r != '"'; r++) {
			if (*r == '\\' && (r[1] == '"' || r[1] == '\\'))
				r++;
			*w++ = *r;
		}
		if (*r != '"') {
			*why = "unterminated quoted value";
			return -EINVAL;
		}
		if (*trim(r + 1)) {
			*why = "text after the closing quote";
			return -EINVAL;
		}
		*w = '\0';
	}
	*value = v;
	return 1;
}

static char *dir_of(const char *path)
{
	char buf[PATH_MAX], *slash, *abs;

	snprintf(buf, sizeof(buf), "%s", path);
	slash = strrchr(buf, '/');
	if (!slash)
		snprintf(buf, sizeof(buf), ".");
	else if (slash == buf)
		buf[1] = '\0';
	else
		*slash = '\0';
	abs = realpath(buf, NULL);
	return abs ? abs : strdup(buf);
}

int kvq_config_read_file(struct kvq_config *c, const char *path, char *err,
			 size_t errlen)
{
	int seen[KVQ_CONFIG_MAX_KEYS] = { 0 };
	char *line = NULL, *key, *value, *dir, *p;
	const char *why;
	size_t cap = 0;
	ssize_t n;
	int lineno = 0, bad = 0, k, ret;
	FILE *f;

	f = fopen(path, "re");
	if (!f)
		return -errno;
	p = realpath(path, NULL);
	if (!p)
		p = strdup(path);
	dir = dir_of(p ? p : path);
	if (!p || !dir) {
		fclose(f);
		free(p);
		free(dir);
		return -ENOMEM;
	}
	free(c->path);
	c->path = p;
	path = p;		/* messages name the file as resolved */

	while ((n = getline(&line, &cap, f)) >= 0) {
		struct kvq_config_origin o = { KVQ_SRC_FILE, ++lineno };

		if ((size_t)n != strlen(line)) {
			errf(err, errlen, "%s:%d: contains a NUL byte", path,
			     lineno);
			bad++;
			continue;
		}
		if (n >= KVQ_CONFIG_MAX_LINE) {
			errf(err, errlen, "%s:%d: line longer than %d bytes",
			     path, lineno, KVQ_CONFIG_MAX_LINE);
			bad++;
			continue;
		}
		ret = split_line(line, &key, &value, &why);
		if (ret == 0)
			continue;
		if (ret < 0) {
			errf(err, errlen, "%s:%d: %s", path, lineno, why);
			bad++;
			continue;
		}
		k = kvq_config_find(key);
		if (k < 0 || strchr(key, '-')) {
			errf(err, errlen, "%s:%d: unknown key '%s'", path,
			     lineno, key);
			bad++;
			continue;
		}
		if (seen[k]) {
			errf(err, errlen, "%s:%d: %s: already set on line %d",
			     path, lineno, keys[k].name, seen[k]);
			bad++;
			continue;
		}
		seen[k] = lineno;
		ret = kvq_config_set(c, k, value, o, path, dir, err, errlen);
		if (ret == -ENOMEM) {
			bad = -1;
			break;
		}
		if (ret)
			bad++;
	}
	ret = ferror(f) ? -EIO : 0;
	free(line);
	free(dir);
	fclose(f);
	if (bad < 0)
		return -ENOMEM;
	if (ret) {
		errf(err, errlen, "%s: read error", path);
		return ret;
	}
	return bad ? -EINVAL : 0;
}

int kvq_config_lookup(const char *path, const char *name, char **out)
{
	char *line = NULL, *key, *value, *dir;
	const char *why;
	size_t cap = 0;
	int ret = -ENOENT, k = kvq_config_find(name);
	FILE *f;

	f = fopen(path, "re");
	if (!f)
		return -errno;
	while (ret == -ENOENT && getline(&line, &cap, f) >= 0) {
		if (split_line(line, &key, &value, &why) != 1 ||
		    kvq_config_find(key) != k || k < 0)
			continue;
		if (keys[k].type == KVQ_CT_FILE || keys[k].type == KVQ_CT_DIR ||
		    keys[k].type == KVQ_CT_SOCKET) {
			dir = dir_of(path);
			*out = dir ? resolve_path(value, dir) : NULL;
			free(dir);
		} else {
			*out = strdup(value);
		}
		ret = *out ? 0 : -ENOMEM;
	}
	free(line);
	fclose(f);
	return ret;
}

/* --------------------------------------------------------- command line */

int kvq_config_parse_args(int argc, char **argv, struct kvq_args *a,
			  char *err, size_t errlen)
{
	char name[128];
	const char *arg, *eq, *value;
	int i, k;

	memset(a, 0, sizeof(*a));
	a->config_path = KVQ_CONFIG_DEFAULT_PATH;
	if (err && errlen)
		err[0] = '\0';

	for (i = 1; i < argc; i++) {
		arg = argv[i];
		if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
			a->help = true;
			continue;
		}
		if (!strcmp(arg, "-V") || !strcmp(arg, "--version")) {
			a->version = true;
			continue;
		}
		if (!strcmp(arg, "--check-config")) {
			a->check_config = true;
			continue;
		}
		if (!strcmp(arg, "-c")) {
			arg = "--config";
		} else if (strncmp(arg, "--", 2) || !arg[2]) {
			errf(err, errlen, "unexpected argument '%s' (see kvqd --help)",
			     arg);
			return -EINVAL;
		}
		eq = strchr(arg + 2, '=');
		snprintf(name, sizeof(name), "%.*s",
			 (int)(eq ? (size_t)(eq - arg - 2) : strlen(arg + 2)),
			 arg + 2);
		k = strcmp(name, "config") ? kvq_config_find(name) : 0;
		if (k < 0) {
			errf(err, errlen, "unknown option --%s (see kvqd --help)",
			     name);
			return -EINVAL;
		}
		if (eq) {
			value = eq + 1;
		} else if (i + 1 < argc) {
			value = argv[++i];
		} else {
			errf(err, errlen, "option --%s needs a value", name);
			return -EINVAL;
		}
		if (!strcmp(name, "config")) {
			a->config_path = value;
			a->config_given = true;
			continue;
		}
		if (a->n_over >= KVQ_ARGS_MAX_OVERRIDES) {
			errf(err, errlen, "too many options");
			return -EINVAL;
		}
		a->over[a->n_over].key = k;
		a->over[a->n_over].value = value;
		a->n_over++;
	}
	return 0;
}

/* ----------------------------------------------------------- validation */

static int env_first(const char *var, char *buf, size_t len)
{
	const char *v = getenv(var);
	size_t n;

	if (!v || !*v)
		return -ENOENT;
	n = strcspn(v, ":");
	if (n >= len)
		return -ENAMETOOLONG;
	memcpy(buf, v, n);
	buf[n] = '\0';
	return 0;
}

static int set_default_from(struct kvq_config *c, int key, const char *v,
			    enum kvq_config_src src, char *err, size_t errlen)
{
	struct kvq_config_origin o = { src, 0 };

	return kvq_config_set(c, key, v, o, c->path, NULL, err, errlen);
}

const char *kvq_config_default_model(void)
{
	static const char *const paths[] = {
		KVQ_MODELDIR "/" KVQ_BUNDLED_MODEL,
		KVQ_SRC_MODELDIR "/" KVQ_BUNDLED_MODEL,
	};
	size_t i;

	for (i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
		if (!access(paths[i], R_OK))
			return paths[i];
	return NULL;
}

int kvq_config_load(struct kvq_config *c, const struct kvq_args *a,
		    char *err, size_t errlen)
{
	struct kvq_config_origin cl = { KVQ_SRC_CMDLINE, 0 };
	char buf[PATH_MAX], *cwd;
	int i, ret, bad = 0;
	int k_state = kvq_config_find("state_dir");
	int k_sock = kvq_config_find("admin_socket");
	int k_def = kvq_config_find("default_max_tokens");

	if (err && errlen)
		err[0] = '\0';
	if (!env_first("STATE_DIRECTORY", buf, sizeof(buf)))
		bad |= set_default_from(c, k_state, buf, KVQ_SRC_ENV, err,
					errlen);

	ret = kvq_config_read_file(c, a->config_path, err, errlen);
	if (ret == -ENOENT && !a->config_given) {
		free(c->path);
		c->path = strdup(a->config_path);
		c->path_missing = true;
		if (!c->path)
			return -ENOMEM;
	} else if (ret == -ENOMEM) {
		return ret;
	} else if (ret && ret != -EINVAL) {
		errf(err, errlen, "%s: cannot read: %s", a->config_path,
		     strerror(-ret));
		bad = 1;
	} else if (ret) {
		bad = 1;
	}

	cwd = getcwd(NULL, 0);
	for (i = 0; i < a->n_over; i++) {
		ret = kvq_config_set(c, a->over[i].key, a->over[i].value, cl,
				     NULL, cwd, err, errlen);
		if (ret == -ENOMEM) {
			free(cwd);
			return ret;
		}
		if (ret)
			bad = 1;
	}
	free(cwd);

	if (!*c->admin_socket) {
		if (!env_first("RUNTIME_DIRECTORY", buf, sizeof(buf)) &&
		    strlen(buf) + sizeof(KVQ_ADMIN_SOCKET_NAME) + 1 < sizeof(buf)) {
			strcat(buf, "/" KVQ_ADMIN_SOCKET_NAME);
			bad |= set_default_from(c, k_sock, buf, KVQ_SRC_ENV,
						err, errlen);
		} else {
			snprintf(buf, sizeof(buf), "%s/%s", c->state_dir,
				 KVQ_ADMIN_SOCKET_NAME);
			bad |= set_default_from(c, k_sock, buf,
						KVQ_SRC_DEFAULT, err, errlen);
		}
	}
	/* No model named: the bundled one, installed or in the source tree. */
	if (c->origin[kvq_config_find("model")].src == KVQ_SRC_DEFAULT &&
	    !*c->model && kvq_config_default_model())
		bad |= set_default_from(c, kvq_config_find("model"),
					kvq_config_default_model(),
					KVQ_SRC_DEFAULT, err, errlen);
	/* A default that a smaller explicit max_tokens overtakes follows it. */
	if (c->origin[k_def].src == KVQ_SRC_DEFAULT &&
	    c->default_max_tokens > c->max_tokens)
		c->default_max_tokens = c->max_tokens;

	if (kvq_config_validate(c, err, errlen))
		bad = 1;
	return bad ? -EINVAL : 0;
}

static void vprefix(const struct kvq_config *c, const char *name, char *buf,
		    size_t len)
{
	int k = kvq_config_find(name);

	prefix(buf, len, k, c->origin[k], c->path_missing ? NULL : c->path);
}

static bool explicit(const struct kvq_config *c, const char *name)
{
	int k = kvq_config_find(name);

	return c->origin[k].src == KVQ_SRC_FILE ||
	       c->origin[k].src == KVQ_SRC_CMDLINE;
}

static int check_model(const struct kvq_config *c, char *err, size_t errlen)
{
	char pfx[512];
	struct stat st;

	vprefix(c, "model", pfx, sizeof(pfx));
	if (!*c->model) {
		errf(err, errlen,
		     "%s: no model set (add 'model = PATH' to %s%s or pass --model PATH)",
		     pfx, *c->path ? c->path : KVQ_CONFIG_DEFAULT_PATH,
		     c->path_missing ? ", which does not exist," : "");
		return -EINVAL;
	}
	if (stat(c->model, &st) || access(c->model, R_OK)) {
		errf(err, errlen, "%s: cannot read '%s': %s", pfx, c->model,
		     strerror(errno));
		return -EINVAL;
	}
	if (!S_ISREG(st.st_mode)) {
		errf(err, errlen, "%s: '%s' is not a regular file", pfx,
		     c->model);
		return -EINVAL;
	}
	return 0;
}

static int check_dir(const char *what, const char *dir, const char *pfx,
		     char *err, size_t errlen)
{
	struct stat st;

	if (stat(dir, &st)) {
		errf(err, errlen, "%s: %s '%s': %s", pfx, what, dir,
		     strerror(errno));
		return -EINVAL;
	}
	if (!S_ISDIR(st.st_mode)) {
		errf(err, errlen, "%s: %s '%s' is not a directory", pfx, what,
		     dir);
		return -EINVAL;
	}
	if (access(dir, W_OK | X_OK)) {
		errf(err, errlen, "%s: %s '%s' is not writable: %s", pfx, what,
		     dir, strerror(errno));
		return -EINVAL;
	}
	return 0;
}

static int check_paths(const struct kvq_config *c, char *err, size_t errlen)
{
	struct sockaddr_un sun;
	char pfx[512], *dir;
	int bad = 0;

	vprefix(c, "state_dir", pfx, sizeof(pfx));
	if (!*c->state_dir) {
		errf(err, errlen, "%s: must not be empty", pfx);
		bad = 1;
	} else if (check_dir("directory", c->state_dir, pfx, err, errlen)) {
		bad = 1;
	}
	/* A socket put in a bad state_dir by default: said once above. */
	if (bad && c->origin[kvq_config_find("admin_socket")].src ==
		   KVQ_SRC_DEFAULT)
		return -EINVAL;

	vprefix(c, "admin_socket", pfx, sizeof(pfx));
	if (strlen(c->admin_socket) >= sizeof(sun.sun_path)) {
		errf(err, errlen, "%s: '%s' is longer than %zu bytes", pfx,
		     c->admin_socket, sizeof(sun.sun_path) - 1);
		return -EINVAL;
	}
	dir = dir_of(c->admin_socket);
	if (!dir)
		return -ENOMEM;
	if (check_dir("socket directory", dir, pfx, err, errlen))
		bad = 1;
	free(dir);
	return bad ? -EINVAL : 0;
}

/*
 * A KV precision: one of f32, f16, q8, q4 (or "auto" for keys), or a
 * comma-separated list of those, one per layer (its length is checked
 * against the model when it loads).
 */
static int check_kv_types(const struct kvq_config *c, const char *key,
			  const char *v, bool allow_auto, char *err,
			  size_t errlen)
{
	enum kvq_kv_type t;
	char pfx[256], name[16];
	const char *p = v;

	vprefix(c, key, pfx, sizeof(pfx));
	if (allow_auto && !strcmp(v, "auto"))
		return 0;
	if (!*v) {
		errf(err, errlen, "%s: empty (expected f32, f16, q8, q4%s)", pfx,
		     allow_auto ? " or auto" : "");
		return -EINVAL;
	}
	while (*p) {
		size_t len = strcspn(p, ",");

		snprintf(name, sizeof(name), "%.*s", (int)(len < 15 ? len : 15), p);
		if (len >= sizeof(name) || kvq_kv_type_parse(name, &t)) {
			errf(err, errlen,
			     "%s: '%s' is not one of: f32, f16, q8, q4%s (or a comma-separated list of them, one per layer)",
			     pfx, name, allow_auto ? ", auto" : "");
			return -EINVAL;
		}
		p += len;
		if (*p == ',' && !*++p) {
			errf(err, errlen, "%s: the list ends with a comma", pfx);
			return -EINVAL;
		}
	}
	return 0;
}

static int check_limits(const struct kvq_config *c, char *err, size_t errlen)
{
	char pfx[512];
	const char *p;
	int bad = 0;

	if (c->n_ctx && c->max_tokens > c->n_ctx &&
	    explicit(c, "max_tokens")) {
		vprefix(c, "max_tokens", pfx, sizeof(pfx));
		errf(err, errlen, "%s: %u is more than n_ctx (%u)", pfx,
		     c->max_tokens, c->n_ctx);
		bad = 1;
	}
	if (c->default_max_tokens > c->max_tokens) {
		vprefix(c, "default_max_tokens", pfx, sizeof(pfx));
		errf(err, errlen, "%s: %u is more than max_tokens (%u)", pfx,
		     c->default_max_tokens, c->max_tokens);
		bad = 1;
	}
	if (c->kv_tokens && c->n_ctx && c->kv_tokens < c->n_ctx) {
		vprefix(c, "kv_tokens", pfx, sizeof(pfx));
		errf(err, errlen,
		     "%s: %u cannot hold one full sequence (n_ctx %u)", pfx,
		     c->kv_tokens, c->n_ctx);
		bad = 1;
	}
	if (check_kv_types(c, "kv_type_k", c->kv_type_k, true, err, errlen) ||
	    check_kv_types(c, "kv_type_v", c->kv_type_v, false, err, errlen))
		bad = 1;
	if (c->kv_page_tokens & (c->kv_page_tokens - 1)) {
		vprefix(c, "kv_page_tokens", pfx, sizeof(pfx));
		errf(err, errlen, "%s: %u is not a power of two", pfx,
		     c->kv_page_tokens);
		bad = 1;
	}
	if (c->n_ctx && c->kv_sink_tokens >= c->n_ctx) {
		vprefix(c, "kv_sink_tokens", pfx, sizeof(pfx));
		errf(err, errlen, "%s: %u must be less than n_ctx (%u)", pfx,
		     c->kv_sink_tokens, c->n_ctx);
		bad = 1;
	}
	for (p = c->api_key; *p; p++) {
		if (*p == ' ' || (unsigned char)*p > 0x7e) {
			vprefix(c, "api_key", pfx, sizeof(pfx));
			errf(err, errlen,
			     "%s: must be printable ASCII without spaces", pfx);
			bad = 1;
			break;
		}
	}
	return bad ? -EINVAL : 0;
}

int kvq_config_validate(const struct kvq_config *c, char *err, size_t errlen)
{
	int bad = 0;

	if (check_model(c, err, errlen))
		bad = 1;
	if (check_paths(c, err, errlen))
		bad = 1;
	if (check_limits(c, err, errlen))
		bad = 1;
	return bad ? -EINVAL : 0;
}
