/*
 * test_config.c - the config file parser, command-line overrides and
 * validation (daemon/conf.c).
 *
 * Every class of bad input is checked for its message: it must name the
 * file, the line and the key ("FILE:LINE: key: why") or the option
 * ("command line: --key: why"), so an operator can fix it without
 * guessing.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon/conf.h"
#include "engine/forward_gpu.h"
#include "engine/log.h"
#include "tap.h"

static char dir[64];
static char conf_path[128];
static char model_path[128];
static char err[8192];

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	if (!f) {
		perror(path);
		exit(1);
	}
	fputs(text, f);
	fclose(f);
}

/* Writes @body as the config file, prefixed with good model/state lines. */
static void write_conf(const char *body)
{
	char buf[8192];

	snprintf(buf, sizeof(buf), "%s", body);
	write_file(conf_path, buf);
}

static struct kvq_args args_for(const char *path)
{
	struct kvq_args a;

	memset(&a, 0, sizeof(a));
	a.config_path = path;
	a.config_given = true;
	return a;
}

/* Loads @body with model and state_dir set on the "command line". */
static int load_body(struct kvq_config *c, const char *body)
{
	struct kvq_args a = args_for(conf_path);

	write_conf(body);
	a.over[0].key = kvq_config_find("state_dir");
	a.over[0].value = dir;
	a.n_over = 1;
	if (!strstr(body, "model")) {
		a.over[1].key = kvq_config_find("model");
		a.over[1].value = model_path;
		a.n_over = 2;
	}
	kvq_config_init(c);
	return kvq_config_load(c, &a, err, sizeof(err));
}

/* The body fails to load, and the message contains every one of @want. */
static void expect_error(const char *name, const char *body,
			 const char *want1, const char *want2)
{
	struct kvq_config c;
	int ret = load_body(&c, body);

	tap_ok(ret == -EINVAL && strstr(err, want1) &&
	       (!want2 || strstr(err, want2)), "%s", name);
	if (ret != -EINVAL || !strstr(err, want1) ||
	    (want2 && !strstr(err, want2)))
		tap_diag("ret %d, wanted '%s' and '%s' in: %s", ret, want1,
			 want2 ? want2 : "", err);
	kvq_config_fini(&c);
}

/* "PATH:LINE: key" for the config file. */
static const char *at(int line, const char *key)
{
	static char buf[8][256];
	static int i;

	i = (i + 1) % 8;
	snprintf(buf[i], sizeof(buf[i]), "%s:%d: %s", conf_path, line, key);
	return buf[i];
}

static void test_defaults(void)
{
	struct kvq_config c;

	kvq_config_init(&c);
	tap_ok(!strcmp(c.listen, "127.0.0.1:8080") &&
	       !strcmp(c.listen_host, "127.0.0.1") && c.listen_port == 8080,
	       "init_defaults_listen");
	tap_ok(c.max_running == 16 && c.max_queued == 64 &&
	       c.max_tokens == 4096 && c.default_max_tokens == 256 &&
	       c.prefill_chunk == 256, "init_defaults_limits");
	tap_ok(c.max_body_bytes == 1u << 20 && c.max_header_bytes == 16384,
	       "init_defaults_sizes");
	tap_ok(c.idle_timeout_ms == 60000 && c.request_timeout_ms == 600000 &&
	       c.drain_timeout_ms == 30000 && c.queue_timeout_ms == 60000,
	       "init_defaults_durations");
	tap_ok(c.log_level == KVQ_LOG_INFO && !strcmp(c.kv_type_k, "q8") &&
	       !strcmp(c.kv_type_v, "q4") && c.device == KVQ_DEVICE_AUTO &&
	       c.kv_page_tokens == 16, "init_defaults_enums");
	tap_ok(!strcmp(c.api_key, "") && !strcmp(c.model, "") &&
	       c.origin[kvq_config_find("model")].src == KVQ_SRC_DEFAULT,
	       "init_defaults_strings");
	kvq_config_fini(&c);
}

static void test_good_file(void)
{
	struct kvq_config c;
	char buf[256];
	int ret;

	ret = load_body(&c,
		"# a comment\n"
		"\n"
		"   # an indented comment\n"
		"listen = [::1]:9000\n"
		"threads=3\n"
		"\tmax_body_bytes = 2M   \n"
		"max_header_bytes = 8KiB\n"
		"idle_timeout = 1500ms\n"
		"request_timeout = 2h\n"
		"drain_timeout = 0\n"
		"queue_timeout = 5m\n"
		"log_level = DEBUG\n"
		"kv_type_k = f16\n"
		"kv_type_v = q8,q4\n"
		"device = cpu\n"
		"api_key = \"s3cr#t=\\\"x\\\\y\"\n"
		"n_ctx = 512\n"
		"kv_tokens = 1024\n"
		"max_tokens = 200\n"
		"kv_sink_tokens = 4\n"
		"kv_page_tokens = 32\n"
		"admin_socket = rel.sock\r\n");
	tap_ok(ret == 0, "read_file_good");
	if (ret)
		tap_diag("%s", err);
	tap_ok(!strcmp(c.listen_host, "::1") && c.listen_port == 9000,
	       "read_file_listen_ipv6");
	tap_ok(c.threads == 3 && c.n_ctx == 512 && c.kv_tokens == 1024,
	       "read_file_uint");
	tap_ok(c.max_body_bytes == 2u << 20 && c.max_header_bytes == 8192,
	       "read_file_size_suffixes");
	tap_ok(c.idle_timeout_ms == 1500 && c.request_timeout_ms == 7200000 &&
	       c.drain_timeout_ms == 0 && c.queue_timeout_ms == 300000,
	       "read_file_duration_suffixes");
	tap_ok(c.log_level == KVQ_LOG_DEBUG && !strcmp(c.kv_type_k, "f16") &&
	       !strcmp(c.kv_type_v, "q8,q4") && c.device == KVQ_DEVICE_CPU,
	       "read_file_enums_case_insensitive");
	tap_ok(!strcmp(c.api_key, "s3cr#t=\"x\\y"), "read_file_quoted_value");
	snprintf(buf, sizeof(buf), "%s/rel.sock", dir);
	tap_ok(!strcmp(c.admin_socket, buf),
	       "read_file_relative_path_from_file_dir");
	tap_ok(c.default_max_tokens == 200,
	       "load_default_max_tokens_follows_smaller_max_tokens");
	tap_ok(c.origin[kvq_config_find("threads")].src == KVQ_SRC_FILE &&
	       c.origin[kvq_config_find("threads")].line == 5,
	       "read_file_origin_line");
	{
		char want[256];

		kvq_config_where(&c, kvq_config_find("threads"), buf,
				 sizeof(buf));
		snprintf(want, sizeof(want), "%s:5", conf_path);
		tap_ok(!strcmp(buf, want), "config_where_file_line");
	}
	kvq_config_format(&c, kvq_config_find("max_body_bytes"), buf,
			  sizeof(buf));
	tap_ok(!strcmp(buf, "2M"), "config_format_size");
	kvq_config_format(&c, kvq_config_find("request_timeout"), buf,
			  sizeof(buf));
	tap_ok(!strcmp(buf, "2h"), "config_format_duration");
	kvq_config_format(&c, kvq_config_find("idle_timeout"), buf,
			  sizeof(buf));
	tap_ok(!strcmp(buf, "1500ms"), "config_format_duration_ms");
	kvq_config_format(&c, kvq_config_find("kv_type_k"), buf, sizeof(buf));
	tap_ok(!strcmp(buf, "f16"), "config_format_enum");
	kvq_config_fini(&c);
}

static void test_bad_values(void)
{
	expect_error("set_uint_not_a_number", "threads = abc\n",
		     at(1, "threads"), "not a whole number");
	expect_error("set_uint_negative", "\nmax_queued = -1\n",
		     at(2, "max_queued"), "not a whole number");
	expect_error("set_uint_out_of_range", "threads = 5000\n",
		     at(1, "threads"), "out of range (0 to 1024)");
	expect_error("set_uint_overflow", "n_ctx = 99999999999999999999999\n",
		     at(1, "n_ctx"), "not a whole number");
	expect_error("set_uint_trailing_garbage", "max_running = 4x\n",
		     at(1, "max_running"), NULL);
	expect_error("set_uint_zero_below_min", "max_running = 0\n",
		     at(1, "max_running"), "out of range");
	expect_error("set_size_bad_suffix", "max_body_bytes = 12Q\n",
		     at(1, "max_body_bytes"), "not a size");
	expect_error("set_size_too_small", "max_body_bytes = 10\n",
		     at(1, "max_body_bytes"), "out of range (1K to 1G)");
	expect_error("set_duration_bad_unit", "idle_timeout = 5 days\n",
		     at(1, "idle_timeout"), "not a duration");
	expect_error("set_duration_too_long", "drain_timeout = 2h\n",
		     at(1, "drain_timeout"), "out of range (0s to 1h)");
	expect_error("set_enum_unknown", "kv_type_k = q3\n",
		     at(1, "kv_type_k"), "'q3' is not one of: f32, f16, q8, q4, auto");
	expect_error("set_enum_log_level", "log_level = loud\n",
		     at(1, "log_level"), "err, warning, notice, info, debug");
	expect_error("set_enum_device", "device = tpu\n", at(1, "device"),
		     "auto, cpu, cuda");
	expect_error("set_listen_no_port", "listen = 127.0.0.1\n",
		     at(1, "listen"), "HOST:PORT");
	expect_error("set_listen_port_zero", "listen = 127.0.0.1:0\n",
		     at(1, "listen"), "1 to 65535");
	expect_error("set_listen_port_too_big", "listen = 127.0.0.1:70000\n",
		     at(1, "listen"), "1 to 65535");
	expect_error("set_listen_ipv6_without_brackets", "listen = ::1:80\n",
		     at(1, "listen"), "brackets");
	expect_error("set_listen_bad_ipv6", "listen = [zz::1]:80\n",
		     at(1, "listen"), "not an IPv6 address");
	expect_error("set_listen_bad_host", "listen = a b:80\n",
		     at(1, "listen"), "host name");
	expect_error("set_string_control_chars", "api_key = \"a\tb\"\n",
		     at(1, "api_key"), "control characters");
	expect_error("set_empty_number", "threads =\n", at(1, "threads"),
		     "not a whole number");
}

static void test_bad_lines(void)
{
	char want[256];

	expect_error("read_file_unknown_key", "\n\nbogus = 1\n",
		     at(3, "unknown key 'bogus'"), NULL);
	expect_error("read_file_dashed_key", "max-tokens = 1\n",
		     at(1, "unknown key 'max-tokens'"), NULL);
	expect_error("read_file_no_equals", "threads 4\n", conf_path,
		     ":1: expected 'key = value'");
	expect_error("read_file_no_key", " = 4\n", conf_path,
		     ":1: missing key");
	expect_error("read_file_duplicate_key", "threads = 1\nthreads = 2\n",
		     at(2, "threads"), "already set on line 1");
	expect_error("read_file_unterminated_quote", "api_key = \"abc\n",
		     conf_path, ":1: unterminated quoted value");
	expect_error("read_file_text_after_quote", "api_key = \"abc\" x\n",
		     conf_path, ":1: text after the closing quote");
	snprintf(want, sizeof(want), "%s:1: threads", conf_path);
	{
		/* Every bad line is reported, not only the first. */
		struct kvq_config c;
		int ret = load_body(&c, "threads = x\nbogus = 1\n"
					"kv_type_v = q9\nmax_queued = 3\n");
		int lines = 0;
		const char *p;

		for (p = err; *p; p++)
			lines += *p == '\n';
		tap_ok(ret == -EINVAL && lines == 3 && strstr(err, want) &&
		       strstr(err, at(2, "unknown key")) &&
		       strstr(err, at(3, "kv_type_v")) && c.max_queued == 3,
		       "read_file_reports_every_bad_line");
		if (lines != 3)
			tap_diag("%s", err);
		kvq_config_fini(&c);
	}
	{
		char buf[KVQ_CONFIG_MAX_LINE + 64];

		memset(buf, 'a', sizeof(buf));
		memcpy(buf, "api_key = ", 10);
		buf[sizeof(buf) - 2] = '\n';
		buf[sizeof(buf) - 1] = '\0';
		expect_error("read_file_line_too_long", buf, conf_path,
			     ":1: line longer than");
	}
}

static void test_validate(void)
{
	char body[512], path[256];

	snprintf(body, sizeof(body), "model = %s/missing.gguf\n", dir);
	expect_error("validate_model_missing", body, at(1, "model"),
		     "No such file or directory");
	expect_error("validate_model_unset", "model = \"\"\n",
		     at(1, "model"), "no model set");
	snprintf(body, sizeof(body), "model = %s\n", dir);
	expect_error("validate_model_is_dir", body, at(1, "model"),
		     "not a regular file");
	snprintf(body, sizeof(body), "model = %s\nadmin_socket = %s/no/x.sock\n",
		 model_path, dir);
	expect_error("validate_admin_socket_dir_missing", body,
		     at(2, "admin_socket"), "socket directory");
	snprintf(body, sizeof(body), "model = %s\nadmin_socket = /%0150d\n",
		 model_path, 7);
	expect_error("validate_admin_socket_too_long", body,
		     at(2, "admin_socket"), "longer than 107 bytes");
	expect_error("validate_max_tokens_over_n_ctx",
		     "n_ctx = 256\nmax_tokens = 512\n", at(2, "max_tokens"),
		     "more than n_ctx (256)");
	expect_error("validate_default_over_max_tokens",
		     "max_tokens = 100\ndefault_max_tokens = 200\n",
		     at(2, "default_max_tokens"), "more than max_tokens (100)");
	expect_error("validate_kv_tokens_under_n_ctx",
		     "n_ctx = 1024\nkv_tokens = 512\n", at(2, "kv_tokens"),
		     "cannot hold one full sequence");
	expect_error("validate_kv_page_not_power_of_two",
		     "kv_page_tokens = 24\n", at(1, "kv_page_tokens"),
		     "power of two");
	expect_error("validate_sink_over_n_ctx",
		     "n_ctx = 64\nkv_sink_tokens = 64\n",
		     at(2, "kv_sink_tokens"), "less than n_ctx");
	expect_error("validate_api_key_with_space", "api_key = \"a b\"\n",
		     at(1, "api_key"), "printable ASCII");
	{
		struct kvq_config c;
		struct kvq_args a = args_for(conf_path);

		snprintf(path, sizeof(path), "%s/nostate", dir);
		write_conf("threads = 1\n");
		a.over[0].key = kvq_config_find("state_dir");
		a.over[0].value = path;
		a.over[1].key = kvq_config_find("model");
		a.over[1].value = model_path;
		a.n_over = 2;
		kvq_config_init(&c);
		tap_ok(kvq_config_load(&c, &a, err, sizeof(err)) == -EINVAL &&
		       strstr(err, "command line: --state-dir: directory") &&
		       strstr(err, "nostate"),
		       "validate_state_dir_missing_names_option");
		kvq_config_fini(&c);
	}
	{
		/* n_ctx alone with the default max_tokens is not an error. */
		struct kvq_config c;

		tap_ok(load_body(&c, "n_ctx = 128\n") == 0,
		       "validate_default_max_tokens_not_blamed");
		kvq_config_fini(&c);
	}
}

static void test_args(void)
{
	char *argv1[] = { "kvqd", "--config", "/x.conf", "--model", "m.gguf",
			  "--max-tokens=5", "--check-config", "--log_level",
			  "debug", NULL };
	char *argv2[] = { "kvqd", "--bogus", "1", NULL };
	char *argv3[] = { "kvqd", "--model", NULL };
	char *argv6[] = { "kvqd", "--bogus", NULL };
	char *argv4[] = { "kvqd", "stray", NULL };
	char *argv5[] = { "kvqd", "-c", "/y.conf", "-h", "-V", NULL };
	struct kvq_args a;
	int ret;

	ret = kvq_config_parse_args(9, argv1, &a, err, sizeof(err));
	tap_ok(ret == 0 && a.config_given && !strcmp(a.config_path, "/x.conf") &&
	       a.check_config && a.n_over == 3 &&
	       a.over[0].key == kvq_config_find("model") &&
	       !strcmp(a.over[1].value, "5") &&
	       a.over[2].key == kvq_config_find("log_level"),
	       "parse_args_good");
	ret = kvq_config_parse_args(3, argv2, &a, err, sizeof(err));
	tap_ok(ret == -EINVAL && strstr(err, "unknown option --bogus"),
	       "parse_args_unknown_option");
	ret = kvq_config_parse_args(2, argv6, &a, err, sizeof(err));
	tap_ok(ret == -EINVAL && strstr(err, "unknown option --bogus"),
	       "parse_args_unknown_option_without_value");
	ret = kvq_config_parse_args(2, argv3, &a, err, sizeof(err));
	tap_ok(ret == -EINVAL && strstr(err, "--model needs a value"),
	       "parse_args_missing_value");
	ret = kvq_config_parse_args(2, argv4, &a, err, sizeof(err));
	tap_ok(ret == -EINVAL && strstr(err, "unexpected argument 'stray'"),
	       "parse_args_positional");
	ret = kvq_config_parse_args(5, argv5, &a, err, sizeof(err));
	tap_ok(ret == 0 && !strcmp(a.config_path, "/y.conf") && a.help &&
	       a.version, "parse_args_short_options");
	ret = kvq_config_parse_args(1, argv1, &a, err, sizeof(err));
	tap_ok(ret == 0 && !a.config_given &&
	       !strcmp(a.config_path, KVQ_CONFIG_DEFAULT_PATH),
	       "parse_args_default_config_path");
}

static void test_overrides(void)
{
	struct kvq_config c;
	struct kvq_args a = args_for(conf_path);
	int k = kvq_config_find("threads");
	int ret;

	write_conf("threads = 2\nmax_queued = 7\n");
	a.over[0].key = kvq_config_find("state_dir");
	a.over[0].value = dir;
	a.over[1].key = kvq_config_find("model");
	a.over[1].value = model_path;
	a.over[2].key = k;
	a.over[2].value = "3";
	a.n_over = 3;
	kvq_config_init(&c);
	ret = kvq_config_load(&c, &a, err, sizeof(err));
	tap_ok(ret == 0 && c.threads == 3 && c.max_queued == 7 &&
	       c.origin[k].src == KVQ_SRC_CMDLINE,
	       "load_command_line_wins_over_file");
	kvq_config_fini(&c);

	a.over[2].value = "many";
	kvq_config_init(&c);
	ret = kvq_config_load(&c, &a, err, sizeof(err));
	tap_ok(ret == -EINVAL && strstr(err, "command line: --threads: 'many'"),
	       "load_bad_override_names_option");
	kvq_config_fini(&c);

	a.config_path = "/nonexistent/kvqd.conf";
	a.n_over = 2;
	kvq_config_init(&c);
	ret = kvq_config_load(&c, &a, err, sizeof(err));
	tap_ok(ret == -EINVAL && strstr(err, "/nonexistent/kvqd.conf: cannot read"),
	       "load_missing_given_file_is_an_error");
	kvq_config_fini(&c);

	a.config_given = false;
	kvq_config_init(&c);
	ret = kvq_config_load(&c, &a, err, sizeof(err));
	tap_ok(ret == 0 && c.path_missing, "load_missing_default_file_is_fine");
	kvq_config_fini(&c);
}

static void test_environment(void)
{
	struct kvq_config c;
	struct kvq_args a = args_for(conf_path);
	char want[256];
	int ret;

	write_conf("threads = 1\n");
	a.over[0].key = kvq_config_find("model");
	a.over[0].value = model_path;
	a.n_over = 1;
	setenv("STATE_DIRECTORY", dir, 1);
	setenv("RUNTIME_DIRECTORY", dir, 1);
	kvq_config_init(&c);
	ret = kvq_config_load(&c, &a, err, sizeof(err));
	snprintf(want, sizeof(want), "%s/kvqd.sock", dir);
	tap_ok(ret == 0 && !strcmp(c.state_dir, dir) &&
	       !strcmp(c.admin_socket, want) &&
	       c.origin[kvq_config_find("state_dir")].src == KVQ_SRC_ENV,
	       "load_systemd_directories");
	if (ret)
		tap_diag("%s", err);
	kvq_config_fini(&c);
	unsetenv("RUNTIME_DIRECTORY");
	kvq_config_init(&c);
	ret = kvq_config_load(&c, &a, err, sizeof(err));
	tap_ok(ret == 0 && !strcmp(c.admin_socket, want),
	       "load_admin_socket_in_state_dir");
	kvq_config_fini(&c);
	unsetenv("STATE_DIRECTORY");
}

/* The GPU's KVQ_GPU_MV_MAX switch: whole numbers 1-16 only. */
static void test_gpu_env(void)
{
	static const char *const bad[] = { "", "0", "17", "-3", "4x", "abc",
					   " ", "2.5" };
	uint32_t v = 99;
	size_t i;
	int refused = 1;

	tap_ok(!kvq_gpu_mv_max_parse("1", &v) && v == 1 &&
	       !kvq_gpu_mv_max_parse("16", &v) && v == 16,
	       "gpu_mv_max_accepts_1_to_16");
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		v = 7;
		if (kvq_gpu_mv_max_parse(bad[i], &v) != -EINVAL || v != 7) {
			tap_diag("KVQ_GPU_MV_MAX=\"%s\" was taken", bad[i]);
			refused = 0;
		}
	}
	tap_ok(refused && kvq_gpu_mv_max_parse(NULL, &v) == -EINVAL,
	       "gpu_mv_max_refuses_others_and_keeps_the_value");
}

static void test_copy_lookup(void)
{
	struct kvq_config a, b;
	struct kvq_config_origin o = { KVQ_SRC_CMDLINE, 0 };
	int kl = kvq_config_find("listen"), kk = kvq_config_find("api_key");
	char *v = NULL;

	kvq_config_init(&a);
	kvq_config_init(&b);
	kvq_config_set(&b, kl, "10.0.0.1:99", o, NULL, NULL, err, sizeof(err));
	kvq_config_set(&b, kk, "k", o, NULL, NULL, err, sizeof(err));
	tap_ok(!kvq_config_equal(&a, &b, kl) && kvq_config_equal(&a, &b, 0),
	       "config_equal");
	tap_ok(kvq_config_copy_key(&a, &b, kl) == 0 && a.listen_port == 99 &&
	       !strcmp(a.listen_host, "10.0.0.1") &&
	       kvq_config_equal(&a, &b, kl) && a.origin[kl].src == KVQ_SRC_CMDLINE,
	       "config_copy_key_listen");
	err[0] = '\0';
	tap_ok(kvq_config_set(&a, kl, "nope", o, NULL, NULL, err,
			      sizeof(err)) == -EINVAL &&
	       a.listen_port == 99, "config_set_failure_leaves_value");
	kvq_config_fini(&a);
	kvq_config_fini(&b);

	write_conf("# x\nadmin_socket = s/k.sock\nbogus line\n");
	tap_ok(kvq_config_lookup(conf_path, "admin_socket", &v) == 0 && v &&
	       strstr(v, "/s/k.sock") && v[0] == '/',
	       "config_lookup_resolves_path");
	free(v);
	v = NULL;
	tap_ok(kvq_config_lookup(conf_path, "state_dir", &v) == -ENOENT,
	       "config_lookup_absent");
	tap_ok(kvq_config_lookup("/nonexistent", "state_dir", &v) == -ENOENT,
	       "config_lookup_no_file");
	tap_ok(kvq_config_find("max-queued") == kvq_config_find("max_queued") &&
	       kvq_config_find("max_queue") < 0, "config_find_dashes");
}

int main(void)
{
	char cmd[128];

	snprintf(dir, sizeof(dir), "/tmp/kvq-test-config.XXXXXX");
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	snprintf(conf_path, sizeof(conf_path), "%s/kvqd.conf", dir);
	snprintf(model_path, sizeof(model_path), "%s/model.gguf", dir);
	write_file(model_path, "GGUF");
	unsetenv("STATE_DIRECTORY");
	unsetenv("RUNTIME_DIRECTORY");

	test_defaults();
	test_good_file();
	test_bad_values();
	test_bad_lines();
	test_validate();
	test_args();
	test_overrides();
	test_environment();
	test_gpu_env();
	test_copy_lookup();

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd))
		tap_diag("could not remove %s", dir);
	return tap_done();
}
