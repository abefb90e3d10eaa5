/*
 * test_proto.c - the HTTP API's request parsing and validation, chat
 * template recognition and rendering, and the shapes of shared answer
 * pieces, without a server.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/thread.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/sched.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "proto/chat.h"
#include "proto/http.h"
#include "proto/metrics.h"
#include "proto/openai.h"
#include "tap.h"

#define NV 512

static int parse(enum kvq_oai_kind k, const char *body, struct kvq_oai_req *r,
		 struct kvq_oai_err *e)
{
	memset(e, 0, sizeof(*e));
	return kvq_oai_parse(body, strlen(body), k, NV, r, e);
}

/* Parses @body, expects a 400 naming @param ("" for null). */
static void bad(enum kvq_oai_kind k, const char *name, const char *body,
		const char *param)
{
	struct kvq_oai_req r;
	struct kvq_oai_err e;
	int ret = parse(k, body, &r, &e);

	tap_ok(ret < 0 && e.status == 400 &&
	       !strcmp(e.type, "invalid_request_error") &&
	       !strcmp(e.param, param) && e.msg[0],
	       "%s (status %d param '%s': %s)", name, e.status, e.param, e.msg);
	if (!ret)
		kvq_oai_req_fini(&r);
}

static void test_completion_fields(void)
{
	struct kvq_oai_req r;
	struct kvq_oai_err e;
	int ret;

	ret = parse(KVQ_OAI_COMPLETION, "{\"prompt\":\"Once upon\"}", &r, &e);
	tap_ok(!ret && r.n_prompts == 1 && r.prompts[0].text &&
	       !strcmp(r.prompts[0].text, "Once upon") && r.n == 1 &&
	       r.max_tokens == 0 && r.sp.temperature == 1.0f &&
	       r.sp.top_p == 1.0f && r.sp.top_k == 0 && r.sp.min_p == 0.0f &&
	       !r.has_seed && !r.stream && r.logprobs == -1 && !r.echo &&
	       r.n_stop == 0,
	       "kvq_oai_parse_string_prompt_defaults");
	if (!ret)
		kvq_oai_req_fini(&r);

	ret = parse(KVQ_OAI_COMPLETION,
		    "{\"model\":\"x\",\"prompt\":[\"a\",\"b\"],\"max_tokens\":7,"
		    "\"temperature\":0,\"top_p\":0.5,\"top_k\":40,\"min_p\":0.1,"
		    "\"stop\":[\"\\n\",\"END\"],\"seed\":-3,\"stream\":true,"
		    "\"stream_options\":{\"include_usage\":true},\"logprobs\":2,"
		    "\"echo\":true,\"n\":2,\"user\":\"u\"}", &r, &e);
	tap_ok(!ret && r.n_prompts == 2 && !strcmp(r.prompts[1].text, "b") &&
	       r.max_tokens == 7 && r.sp.temperature == 0 &&
	       r.sp.top_p == 0.5f && r.sp.top_k == 40 &&
	       fabsf(r.sp.min_p - 0.1f) < 1e-6 && r.n_stop == 2 &&
	       !strcmp(r.stop[0], "\n") && r.has_seed &&
	       r.sp.seed == (uint64_t)-3 && r.stream && r.include_usage &&
	       r.logprobs == 2 && r.echo && r.n == 2 && !strcmp(r.model, "x"),
	       "kvq_oai_parse_all_fields");
	if (!ret)
		kvq_oai_req_fini(&r);

	ret = parse(KVQ_OAI_COMPLETION, "{\"prompt\":[1,2,3]}", &r, &e);
	tap_ok(!ret && r.n_prompts == 1 && !r.prompts[0].text &&
	       r.prompts[0].n_ids == 3 && r.prompts[0].ids[2] == 3,
	       "kvq_oai_parse_token_prompt");
	if (!ret)
		kvq_oai_req_fini(&r);

	ret = parse(KVQ_OAI_COMPLETION, "{\"prompt\":[[1,2],[3]]}", &r, &e);
	tap_ok(!ret && r.n_prompts == 2 && r.prompts[1].n_ids == 1 &&
	       r.prompts[1].ids[0] == 3, "kvq_oai_parse_token_prompts");
	if (!ret)
		kvq_oai_req_fini(&r);

	ret = parse(KVQ_OAI_COMPLETION, "{\"prompt\":\"x\",\"stop\":\"###\","
		    "\"top_k\":-1,\"seed\":null,\"max_tokens\":null}", &r, &e);
	tap_ok(!ret && r.n_stop == 1 && !strcmp(r.stop[0], "###") &&
	       r.sp.top_k == 0 && !r.has_seed && r.max_tokens == 0,
	       "kvq_oai_parse_stop_string_and_nulls");
	if (!ret)
		kvq_oai_req_fini(&r);

	ret = parse(KVQ_OAI_COMPLETION, "{\"prompt\":\"\"}", &r, &e);
	tap_ok(!ret && r.prompts[0].len == 0,
	       "kvq_oai_parse_empty_string_prompt_is_parsed");
	if (!ret)
		kvq_oai_req_fini(&r);
}

static void test_completion_errors(void)
{
	enum kvq_oai_kind C = KVQ_OAI_COMPLETION;

	bad(C, "kvq_oai_parse_malformed_json", "{\"prompt\":", "");
	bad(C, "kvq_oai_parse_not_object", "[1,2]", "");
	bad(C, "kvq_oai_parse_empty_body", "", "");
	bad(C, "kvq_oai_parse_invalid_utf8", "{\"prompt\":\"\xff\xfe\"}", "");
	bad(C, "kvq_oai_parse_overlong_utf8", "{\"prompt\":\"\xc0\xaf\"}", "");
	bad(C, "kvq_oai_parse_lone_surrogate_escape",
	    "{\"prompt\":\"\\ud800\"}", "");
	bad(C, "kvq_oai_parse_missing_prompt", "{\"max_tokens\":3}", "prompt");
	bad(C, "kvq_oai_parse_null_prompt", "{\"prompt\":null}", "prompt");
	bad(C, "kvq_oai_parse_prompt_number", "{\"prompt\":5}", "prompt");
	bad(C, "kvq_oai_parse_prompt_empty_array", "{\"prompt\":[]}", "prompt");
	bad(C, "kvq_oai_parse_prompt_mixed", "{\"prompt\":[\"a\",[1]]}",
	    "prompt");
	bad(C, "kvq_oai_parse_prompt_bad_token", "{\"prompt\":[1,512]}",
	    "prompt");
	bad(C, "kvq_oai_parse_prompt_negative_token", "{\"prompt\":[-1]}",
	    "prompt");
	bad(C, "kvq_oai_parse_prompt_empty_token_array",
	    "{\"prompt\":[[1],[]]}", "prompt");
	bad(C, "kvq_oai_parse_max_tokens_string",
	    "{\"prompt\":\"x\",\"max_tokens\":\"5\"}", "max_tokens");
	bad(C, "kvq_oai_parse_max_tokens_negative",
	    "{\"prompt\":\"x\",\"max_tokens\":-1}", "max_tokens");
	bad(C, "kvq_oai_parse_max_tokens_zero",
	    "{\"prompt\":\"x\",\"max_tokens\":0}", "max_tokens");
	bad(C, "kvq_oai_parse_max_tokens_float",
	    "{\"prompt\":\"x\",\"max_tokens\":1e30}", "max_tokens");
	bad(C, "kvq_oai_parse_temperature_string",
	    "{\"prompt\":\"x\",\"temperature\":\"hot\"}", "temperature");
	bad(C, "kvq_oai_parse_temperature_range",
	    "{\"prompt\":\"x\",\"temperature\":2.5}", "temperature");
	bad(C, "kvq_oai_parse_top_p_zero", "{\"prompt\":\"x\",\"top_p\":0}",
	    "top_p");
	bad(C, "kvq_oai_parse_min_p_range", "{\"prompt\":\"x\",\"min_p\":1.5}",
	    "min_p");
	bad(C, "kvq_oai_parse_top_k_range", "{\"prompt\":\"x\",\"top_k\":-2}",
	    "top_k");
	bad(C, "kvq_oai_parse_stream_string",
	    "{\"prompt\":\"x\",\"stream\":\"yes\"}", "stream");
	bad(C, "kvq_oai_parse_stream_options_without_stream",
	    "{\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}",
	    "stream_options");
	bad(C, "kvq_oai_parse_include_usage_type",
	    "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":"
	    "{\"include_usage\":1}}", "stream_options.include_usage");
	bad(C, "kvq_oai_parse_stop_number", "{\"prompt\":\"x\",\"stop\":3}",
	    "stop");
	bad(C, "kvq_oai_parse_stop_too_many",
	    "{\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}",
	    "stop");
	bad(C, "kvq_oai_parse_stop_array_of_numbers",
	    "{\"prompt\":\"x\",\"stop\":[1]}", "stop");
	bad(C, "kvq_oai_parse_seed_string", "{\"prompt\":\"x\",\"seed\":\"1\"}",
	    "seed");
	bad(C, "kvq_oai_parse_logprobs_range",
	    "{\"prompt\":\"x\",\"logprobs\":6}", "logprobs");
	bad(C, "kvq_oai_parse_echo_type", "{\"prompt\":\"x\",\"echo\":1}",
	    "echo");
	bad(C, "kvq_oai_parse_n_zero", "{\"prompt\":\"x\",\"n\":0}", "n");
	bad(C, "kvq_oai_parse_n_too_big", "{\"prompt\":\"x\",\"n\":17}", "n");
	bad(C, "kvq_oai_parse_prompts_times_n",
	    "{\"prompt\":[\"a\",\"b\",\"c\"],\"n\":6}", "n");
	bad(C, "kvq_oai_parse_best_of_unsupported",
	    "{\"prompt\":\"x\",\"best_of\":3}", "best_of");
	bad(C, "kvq_oai_parse_frequency_penalty_unsupported",
	    "{\"prompt\":\"x\",\"frequency_penalty\":0.5}",
	    "frequency_penalty");
	bad(C, "kvq_oai_parse_logit_bias_unsupported",
	    "{\"prompt\":\"x\",\"logit_bias\":{\"1\":5}}", "logit_bias");
	bad(C, "kvq_oai_parse_suffix_unsupported",
	    "{\"prompt\":\"x\",\"suffix\":\"end\"}", "suffix");
	bad(C, "kvq_oai_parse_model_number", "{\"prompt\":\"x\",\"model\":1}",
	    "model");
}

static void test_chat(void)
{
	enum kvq_oai_kind K = KVQ_OAI_CHAT;
	struct kvq_oai_req r;
	struct kvq_oai_err e;
	int ret;

	ret = parse(K, "{\"messages\":[{\"role\":\"developer\",\"content\":"
		    "\"be brief\"},{\"role\":\"user\",\"content\":[{\"type\":"
		    "\"text\",\"text\":\"hel\"},{\"type\":\"text\",\"text\":"
		    "\"lo\"}]},{\"role\":\"assistant\",\"content\":null}],"
		    "\"max_completion_tokens\":9,\"logprobs\":true,"
		    "\"top_logprobs\":3}", &r, &e);
	tap_ok(!ret && r.n_msgs == 3 && !strcmp(r.msgs[0].role, "system") &&
	       !strcmp(r.msgs[1].content, "hello") && r.msgs[1].len == 5 &&
	       !strcmp(r.msgs[2].content, "") && r.max_tokens == 9 &&
	       r.logprobs == 3, "kvq_oai_parse_chat_messages");
	if (!ret)
		kvq_oai_req_fini(&r);

	ret = parse(K, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
		    "\"logprobs\":true}", &r, &e);
	tap_ok(!ret && r.logprobs == 0, "kvq_oai_parse_chat_logprobs_bool");
	if (!ret)
		kvq_oai_req_fini(&r);

	bad(K, "kvq_oai_parse_chat_missing_messages", "{}", "messages");
	bad(K, "kvq_oai_parse_chat_messages_object", "{\"messages\":{}}",
	    "messages");
	bad(K, "kvq_oai_parse_chat_messages_empty", "{\"messages\":[]}",
	    "messages");
	bad(K, "kvq_oai_parse_chat_message_not_object", "{\"messages\":[1]}",
	    "messages");
	bad(K, "kvq_oai_parse_chat_bad_role",
	    "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}",
	    "messages");
	bad(K, "kvq_oai_parse_chat_role_missing",
	    "{\"messages\":[{\"content\":\"x\"}]}", "messages");
	bad(K, "kvq_oai_parse_chat_content_number",
	    "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", "messages");
	bad(K, "kvq_oai_parse_chat_image_part",
	    "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":"
	    "\"image_url\",\"image_url\":{\"url\":\"x\"}}]}]}", "messages");
	bad(K, "kvq_oai_parse_chat_top_logprobs_without_logprobs",
	    "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
	    "\"top_logprobs\":2}", "top_logprobs");
	bad(K, "kvq_oai_parse_chat_tools_unsupported",
	    "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
	    "\"tools\":[{\"type\":\"function\"}]}", "tools");
	bad(K, "kvq_oai_parse_chat_json_mode_unsupported",
	    "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
	    "\"response_format\":{\"type\":\"json_object\"}}",
	    "response_format");
}

static void test_llama_cpp_bodies(void)
{
	struct kvq_oai_tokenize t;
	struct kvq_oai_err e;
	int32_t *ids;
	int n, ret;

	ret = kvq_oai_parse_tokenize("{\"content\":\"hi\"}", 16, &t, &e);
	tap_ok(!ret && !strcmp(t.content, "hi") && t.add_special &&
	       !t.with_pieces, "kvq_oai_parse_tokenize_defaults");
	if (!ret)
		free(t.content);
	{
		const char *b = "{\"content\":\"\",\"add_special\":false,"
				"\"with_pieces\":true}";

		ret = kvq_oai_parse_tokenize(b, strlen(b), &t, &e);
	}
	tap_ok(!ret && t.len == 0 && !t.add_special && t.with_pieces,
	       "kvq_oai_parse_tokenize_flags");
	if (!ret)
		free(t.content);
	ret = kvq_oai_parse_tokenize("{\"content\":1}", 13, &t, &e);
	tap_ok(ret < 0 && e.status == 400 && !strcmp(e.param, "content"),
	       "kvq_oai_parse_tokenize_content_number");
	ret = kvq_oai_parse_tokenize("{}", 2, &t, &e);
	tap_ok(ret < 0 && !strcmp(e.param, "content"),
	       "kvq_oai_parse_tokenize_missing_content");

	ret = kvq_oai_parse_detokenize("{\"tokens\":[1,2,511]}", 20, NV, &ids,
				       &n, &e);
	tap_ok(!ret && n == 3 && ids[2] == 511, "kvq_oai_parse_detokenize_ok");
	if (!ret)
		free(ids);
	ret = kvq_oai_parse_detokenize("{\"tokens\":[]}", 13, NV, &ids, &n, &e);
	tap_ok(!ret && n == 0, "kvq_oai_parse_detokenize_empty");
	ret = kvq_oai_parse_detokenize("{\"tokens\":[600]}", 16, NV, &ids, &n,
				       &e);
	tap_ok(ret < 0 && !strcmp(e.param, "tokens"),
	       "kvq_oai_parse_detokenize_out_of_range");
	ret = kvq_oai_parse_detokenize("{\"tokens\":\"1\"}", 14, NV, &ids, &n,
				       &e);
	tap_ok(ret < 0 && !strcmp(e.param, "tokens"),
	       "kvq_oai_parse_detokenize_wrong_type");
}

static void test_utf8_and_json(void)
{
	struct kvq_oai_err e;
	json_t *j, *err;
	char *s;

	tap_ok(kvq_utf8_valid("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80", 15),
	       "kvq_utf8_valid_accepts_1_to_4_byte_sequences");
	tap_ok(!kvq_utf8_valid("\xed\xa0\x80", 3),
	       "kvq_utf8_valid_rejects_surrogates");
	tap_ok(!kvq_utf8_valid("\xe0\x80\xaf", 3),
	       "kvq_utf8_valid_rejects_overlong");
	tap_ok(!kvq_utf8_valid("\xf4\x90\x80\x80", 4),
	       "kvq_utf8_valid_rejects_above_u10ffff");
	tap_ok(!kvq_utf8_valid("ab\xe2\x82", 4),
	       "kvq_utf8_valid_rejects_truncated");
	tap_ok(kvq_utf8_complete("ab\xe2\x82", 4) == 2 &&
	       kvq_utf8_complete("ab\xe2\x82\xac", 5) == 5,
	       "kvq_utf8_complete_holds_back_partial_tail");

	/* A choice that stopped at its first token has no text buffer:
	 * its text is "", not a missing value (which would drop the choice
	 * from the reply). */
	j = kvq_json_text(NULL, 0);
	tap_ok(j && json_is_string(j) && !strcmp(json_string_value(j), ""),
	       "kvq_json_text_empty_without_buffer");
	json_decref(j);

	j = kvq_json_text("a\xff" "b", 3);
	tap_ok(j && !strcmp(json_string_value(j), "a\xef\xbf\xbd" "b"),
	       "kvq_json_text_replaces_bad_bytes");
	json_decref(j);

	kvq_oai_bad(&e, NULL, "nope %d", 1);
	err = kvq_oai_error_json(&e);
	j = json_object_get(err, "error");
	tap_ok(json_object_size(j) == 4 &&
	       !strcmp(json_string_value(json_object_get(j, "message")),
		       "nope 1") &&
	       !strcmp(json_string_value(json_object_get(j, "type")),
		       "invalid_request_error") &&
	       json_is_null(json_object_get(j, "param")) &&
	       json_is_null(json_object_get(j, "code")),
	       "kvq_oai_error_json_shape");
	json_decref(err);

	kvq_oai_fail(&e, 429, "rate_limit_error", "rate_limit_exceeded", "n",
		     "busy");
	err = kvq_oai_error_json(&e);
	j = json_object_get(err, "error");
	tap_ok(!strcmp(json_string_value(json_object_get(j, "param")), "n") &&
	       !strcmp(json_string_value(json_object_get(j, "code")),
		       "rate_limit_exceeded"), "kvq_oai_error_json_param_code");
	json_decref(err);

	j = kvq_oai_usage_json(5, 7, 2);
	s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	tap_ok(s && !strcmp(s, "{\"completion_tokens\":7,\"prompt_tokens\":5,"
			    "\"prompt_tokens_details\":{\"cached_tokens\":2},"
			    "\"total_tokens\":12}"),
	       "kvq_oai_usage_json_shape (%s)", s ? s : "NULL");
	free(s);
	json_decref(j);

	{
		char a[48], b[48];

		kvq_oai_make_id(KVQ_OAI_COMPLETION, a, sizeof(a));
		kvq_oai_make_id(KVQ_OAI_CHAT, b, sizeof(b));
		tap_ok(!strncmp(a, "cmpl-", 5) && strlen(a) == 29 &&
		       !strncmp(b, "chatcmpl-", 9) && strcmp(a + 5, b + 9),
		       "kvq_oai_make_id_prefixes (%s %s)", a, b);
	}
}

static const char T_LLAMA3[] =
	"{% set loop_messages = messages %}{% for message in loop_messages %}"
	"{% set content = '<|start_header_id|>' + message['role'] + "
	"'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
	"{{ content }}{% endfor %}";
static const char T_CHATML[] =
	"{% for message in messages %}{% if loop.first and messages[0]['role'] "
	"!= 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant."
	"<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + "
	"'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
static const char T_MISTRAL[] =
	"{{ bos_token }}{% for message in messages %}{% if message['role'] == "
	"'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
	"message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
	"{% endif %}{% endfor %}";
static const char T_LLAMA2[] =
	"{% if messages[0]['role'] == 'system' %}{% set system_message = "
	"'<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
	"{% endif %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}";
static const char T_GEMMA[] =
	"{% for message in messages %}{{ '<start_of_turn>' + role + '\n' + "
	"message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}";

static void test_chat_detect(void)
{
	char *sys;

	tap_ok(kvq_chat_detect(T_LLAMA3, strlen(T_LLAMA3)) == KVQ_CHAT_LLAMA3,
	       "kvq_chat_detect_llama3");
	tap_ok(kvq_chat_detect(T_CHATML, strlen(T_CHATML)) == KVQ_CHAT_CHATML,
	       "kvq_chat_detect_chatml");
	tap_ok(kvq_chat_detect(T_MISTRAL, strlen(T_MISTRAL)) ==
	       KVQ_CHAT_MISTRAL, "kvq_chat_detect_mistral");
	tap_ok(kvq_chat_detect(T_LLAMA2, strlen(T_LLAMA2)) == KVQ_CHAT_LLAMA2,
	       "kvq_chat_detect_llama2");
	tap_ok(kvq_chat_detect(T_GEMMA, strlen(T_GEMMA)) == KVQ_CHAT_UNKNOWN,
	       "kvq_chat_detect_unknown_family");
	tap_ok(kvq_chat_detect(NULL, 0) == KVQ_CHAT_NONE,
	       "kvq_chat_detect_no_template");
	sys = kvq_chat_default_system(T_CHATML, strlen(T_CHATML));
	tap_ok(sys && !strcmp(sys, "You are a helpful assistant."),
	       "kvq_chat_default_system_literal (%s)", sys ? sys : "NULL");
	free(sys);
	sys = kvq_chat_default_system(T_LLAMA3, strlen(T_LLAMA3));
	tap_ok(!sys, "kvq_chat_default_system_none");
	free(sys);
}

/* Rendering needs a tokenizer: the shared stories260K vocabulary. */
static void test_chat_render(void)
{
	struct kvq_model_opts mo = { .vocab_only = true };
	struct kvq_oai_msg msgs[3] = {
		{ "system", "Be kind.", 8 },
		{ "user", "Hi", 2 },
		{ "assistant", "Hello", 5 },
	};
	struct kvq_oai_msg turn = { "user", "More", 4 };
	struct kvq_oai_msg all[4];
	struct kvq_model *m = NULL;
	const struct kvq_tokenizer *t;
	struct kvq_oai_err e;
	struct kvq_chat c;
	char path[512], err[256];
	int32_t *ids;
	int n, ret, i, bos_count = 0, eos_count = 0;

	if (!tap_testdata("stories260K.gguf", path, sizeof(path))) {
		tap_diag("skipping chat rendering: stories260K.gguf not found");
		return;
	}
	if (kvq_model_load(path, &mo, &m, err, sizeof(err))) {
		tap_ok(0, "kvq_model_load vocab_only (%s)", err);
		return;
	}
	t = kvq_model_tokenizer(m);

	ret = kvq_chat_init(&c, t, NULL, 0);
	tap_ok(ret == -ENOTSUP && c.fam == KVQ_CHAT_NONE && strstr(c.why,
	       "no chat template"), "kvq_chat_init_no_template");
	ret = kvq_chat_render(&c, msgs, 3, &ids, &n, &e);
	tap_ok(ret < 0 && e.status == 400 && e.code &&
	       !strcmp(e.code, "chat_template_missing"),
	       "kvq_chat_render_no_template_is_400");
	kvq_chat_fini(&c);

	ret = kvq_chat_init(&c, t, T_GEMMA, strlen(T_GEMMA));
	tap_ok(ret == -ENOTSUP && c.fam == KVQ_CHAT_UNKNOWN,
	       "kvq_chat_init_unknown_family");
	ret = kvq_chat_render(&c, msgs, 3, &ids, &n, &e);
	tap_ok(ret < 0 && e.status == 500 && e.code &&
	       !strcmp(e.code, "chat_template_unsupported"),
	       "kvq_chat_render_unknown_family_is_500");
	kvq_chat_fini(&c);

	ret = kvq_chat_init(&c, t, T_CHATML, strlen(T_CHATML));
	tap_ok(ret == -ENOTSUP && strstr(c.why, "<|im_start|>"),
	       "kvq_chat_init_missing_special_token (%s)", c.why);
	kvq_chat_fini(&c);

	ret = kvq_chat_init(&c, t, T_LLAMA2, strlen(T_LLAMA2));
	tap_ok(!ret && c.fam == KVQ_CHAT_LLAMA2 &&
	       c.turn_end == kvq_tokenizer_eos(t), "kvq_chat_init_llama2");
	memcpy(all, msgs, sizeof(msgs));
	all[3] = turn;
	ret = kvq_chat_render(&c, all, 4, &ids, &n, &e);
	for (i = 0; !ret && i < n; i++) {
		bos_count += ids[i] == kvq_tokenizer_bos(t);
		eos_count += ids[i] == kvq_tokenizer_eos(t);
	}
	tap_ok(!ret && n > 10 && ids[0] == kvq_tokenizer_bos(t) &&
	       bos_count == 2 && eos_count == 1 &&
	       ids[n - 1] != kvq_tokenizer_eos(t),
	       "kvq_chat_render_llama2_turns (%d tokens)", n);
	if (!ret)
		free(ids);
	ret = kvq_chat_render(&c, &msgs[1], 2, &ids, &n, &e);
	if (!ret)
		free(ids);
	tap_ok(ret < 0 || n > 0, "kvq_chat_render_llama2_without_system");
	{
		struct kvq_oai_msg late[2] = { msgs[1], msgs[0] };

		ret = kvq_chat_render(&c, late, 2, &ids, &n, &e);
		tap_ok(ret < 0 && e.status == 400,
		       "kvq_chat_render_llama2_late_system_is_400");
	}
	kvq_chat_fini(&c);

	ret = kvq_chat_init(&c, t, T_MISTRAL, strlen(T_MISTRAL));
	bos_count = 0;
	if (!ret)
		ret = kvq_chat_render(&c, all, 4, &ids, &n, &e);
	for (i = 0; !ret && i < n; i++)
		bos_count += ids[i] == kvq_tokenizer_bos(t);
	tap_ok(!ret && ids[0] == kvq_tokenizer_bos(t) && bos_count == 1,
	       "kvq_chat_render_mistral_one_bos");
	if (!ret)
		free(ids);
	kvq_chat_fini(&c);
	kvq_model_destroy(m);
}

static void test_metrics(void)
{
	struct kvq_sched_stats st;
	struct kvq_http_stats hs = { 0 };
	struct kvq_tier_bytes tb = { 0, 1000, 0 };
	char *s, line[256];
	size_t len;

	memset(&st, 0, sizeof(st));
	st.running = 3;
	st.waiting = 2;
	st.tokens_prompt_total = 11;
	st.tokens_generated_total = 22;
	st.kv_bytes_used = 4096;
	st.ttft.count[0] = 1;
	st.ttft.count[3] = 2;
	st.ttft.count[KVQ_SCHED_N_BUCKETS] = 1;
	st.ttft.n = 4;
	st.ttft.sum = 100.5;
	s = kvq_metrics_render(&st, &hs, &tb, true, &len);
	tap_ok(s && len == strlen(s), "kvq_metrics_render_returns_text");
	if (!s)
		return;
	tap_ok(strstr(s, "\nkvqd_requests_running 3\n") &&
	       strstr(s, "\nkvqd_requests_waiting 2\n") &&
	       strstr(s, "\nkvqd_tokens_prompt_total 11\n") &&
	       strstr(s, "\nkvqd_tokens_generated_total 22\n") &&
	       strstr(s, "\nkvqd_kv_bytes_used 4096\n") &&
	       strstr(s, "kvqd_tier_bytes{tier=\"host\"} 1000\n") &&
	       strstr(s, "kvqd_tier_bytes{tier=\"hbm\"} 0\n") &&
	       strstr(s, "kvqd_tier_bytes{tier=\"nvme\"} 0\n"),
	       "kvq_metrics_render_values");
	tap_ok(strstr(s, "# TYPE kvqd_ttft_seconds histogram\n") &&
	       strstr(s, "# HELP kvqd_inter_token_seconds ") &&
	       strstr(s, "# TYPE kvqd_tokens_generated_total counter\n") &&
	       strstr(s, "# TYPE kvqd_requests_running gauge\n"),
	       "kvq_metrics_render_help_and_type");
	snprintf(line, sizeof(line), "kvqd_ttft_seconds_bucket{le=\"%g\"} 3\n",
		 kvq_sched_buckets[3]);
	tap_ok(strstr(s, line) &&
	       strstr(s, "kvqd_ttft_seconds_bucket{le=\"+Inf\"} 4\n") &&
	       strstr(s, "kvqd_ttft_seconds_count 4\n") &&
	       strstr(s, "kvqd_ttft_seconds_sum 100.5\n"),
	       "kvq_metrics_render_histogram_cumulative");
	free(s);
	s = kvq_metrics_render(NULL, NULL, NULL, false, &len);
	tap_ok(s && strstr(s, "kvqd_ready 0\n") &&
	       strstr(s, "kvqd_requests_running 0\n"),
	       "kvq_metrics_render_while_loading");
	free(s);
}

/* ------------------------------------------------ server without a model */

struct answer {
	struct event_base *base;
	int status;
	char body[4096];
};

static void on_answer(struct evhttp_request *req, void *arg)
{
	struct answer *a = arg;
	struct evbuffer *b;
	size_t n;

	a->status = req ? evhttp_request_get_response_code(req) : -1;
	if (req) {
		b = evhttp_request_get_input_buffer(req);
		n = evbuffer_get_length(b);
		if (n >= sizeof(a->body))
			n = sizeof(a->body) - 1;
		evbuffer_remove(b, a->body, n);
		a->body[n] = 0;
	}
	event_base_loopexit(a->base, NULL);
}

static void ask(struct event_base *base, uint16_t port,
		enum evhttp_cmd_type m, const char *path, struct answer *a)
{
	struct evhttp_connection *c;
	struct evhttp_request *req;

	memset(a, 0, sizeof(*a));
	a->base = base;
	a->status = -1;
	c = evhttp_connection_base_new(base, NULL, "127.0.0.1", port);
	req = evhttp_request_new(on_answer, a);
	evhttp_add_header(evhttp_request_get_output_headers(req), "Host", "x");
	if (m == EVHTTP_REQ_POST)
		evbuffer_add_printf(evhttp_request_get_output_buffer(req),
				    "{\"prompt\":\"x\"}");
	evhttp_make_request(c, req, m, path);
	event_base_dispatch(base);
	evhttp_connection_free(c);
}

static uint16_t free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t len = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	uint16_t port = 0;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd >= 0 && !bind(fd, (struct sockaddr *)&sa, sizeof(sa)) &&
	    !getsockname(fd, (struct sockaddr *)&sa, &len))
		port = ntohs(sa.sin_port);
	if (fd >= 0)
		close(fd);
	return port;
}

static void test_http_loading(void)
{
	struct kvq_http_opts o = { .host = "127.0.0.1" };
	struct kvq_http *h = NULL, *h2 = NULL;
	struct event_base *base;
	struct answer a;
	char err[256] = "";
	int ret;

	evthread_use_pthreads();
	base = event_base_new();
	o.port = free_port();
	ret = kvq_http_create(base, NULL, &o, &h, err, sizeof(err));
	tap_ok(!ret, "kvq_http_create_without_model (%s)", ret ? err : "ok");
	if (ret) {
		event_base_free(base);
		return;
	}
	ret = kvq_http_create(base, NULL, &o, &h2, err, sizeof(err));
	tap_ok(ret < 0 && strstr(err, "cannot listen"),
	       "kvq_http_create_port_in_use (%s)", err);

	ask(base, o.port, EVHTTP_REQ_GET, "/health", &a);
	tap_ok(a.status == 503 && strstr(a.body, "\"code\":\"loading\"") &&
	       strstr(a.body, "\"type\":\"unavailable_error\""),
	       "health_while_loading_is_503_json (%d %s)", a.status, a.body);
	ask(base, o.port, EVHTTP_REQ_POST, "/v1/completions", &a);
	tap_ok(a.status == 503 && strstr(a.body, "\"loading\""),
	       "completions_while_loading_is_503");
	ask(base, o.port, EVHTTP_REQ_GET, "/v1/nope", &a);
	tap_ok(a.status == 404 && strstr(a.body, "\"not_found\""),
	       "unknown_path_is_404");
	ask(base, o.port, EVHTTP_REQ_PUT, "/v1/completions", &a);
	tap_ok(a.status == 405 && strstr(a.body, "\"method_not_allowed\""),
	       "wrong_method_is_405");
	ask(base, o.port, EVHTTP_REQ_GET, "/metrics", &a);
	tap_ok(a.status == 200 && strstr(a.body, "\nkvqd_ready 0\n"),
	       "metrics_while_loading");
	kvq_http_set_ready(h, true);
	ask(base, o.port, EVHTTP_REQ_GET, "/health", &a);
	tap_ok(a.status == 503, "health_ready_without_scheduler_is_503");
	kvq_http_stop_accepting(h);
	ask(base, o.port, EVHTTP_REQ_GET, "/health", &a);
	tap_ok(a.status == 503 && strstr(a.body, "\"draining\""),
	       "health_while_draining_is_503");
	kvq_http_destroy(h);
	event_base_free(base);
}

int main(void)
{
	test_completion_fields();
	test_completion_errors();
	test_chat();
	test_llama_cpp_bodies();
	test_utf8_and_json();
	test_chat_detect();
	test_chat_render();
	test_metrics();
	test_http_loading();
	return tap_done();
}
