/*
 * test_sched.c - the scheduler against the real engine and the shared
 * stories260K model: a request gives the same tokens alone or beside 15
 * others, cancellation frees the KV at once, queue and context limits,
 * stop strings, drain, snapshots.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/sched.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "tap.h"

#define MAX_TOK 1024

struct run {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int32_t tok[MAX_TOK];
	int n_tok;
	char text[8192];
	size_t len;
	bool done;
	int n_events;
	enum kvq_finish fin;
	struct kvq_sched_usage usage;
};

static void run_init(struct run *r)
{
	memset(r, 0, sizeof(*r));
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cond, NULL);
}

static void run_fini(struct run *r)
{
	pthread_mutex_destroy(&r->lock);
	pthread_cond_destroy(&r->cond);
}

static void sink(void *arg, const struct kvq_sched_event *ev)
{
	struct run *r = arg;
	int i;

	pthread_mutex_lock(&r->lock);
	r->n_events++;
	for (i = 0; ev->kind != KVQ_SCHED_EV_PROMPT && i < ev->n_tok &&
	     r->n_tok < MAX_TOK; i++)
		r->tok[r->n_tok++] = ev->tok[i].id;
	if (ev->len && r->len + ev->len < sizeof(r->text)) {
		memcpy(r->text + r->len, ev->text, ev->len);
		r->len += ev->len;
		r->text[r->len] = 0;
	}
	if (ev->kind == KVQ_SCHED_EV_DONE) {
		r->done = true;
		r->fin = ev->finish;
		r->usage = ev->usage;
		pthread_cond_broadcast(&r->cond);
	}
	pthread_mutex_unlock(&r->lock);
}

static bool run_wait(struct run *r, int secs)
{
	struct timespec ts;
	bool done;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += secs;
	pthread_mutex_lock(&r->lock);
	while (!r->done &&
	       pthread_cond_timedwait(&r->cond, &r->lock, &ts) == 0)
		;
	done = r->done;
	pthread_mutex_unlock(&r->lock);
	return done;
}

/* Waits until @r has at least @n tokens (or is done). */
static void run_wait_tokens(struct run *r, int n)
{
	struct timespec ts = { 0, 2 * 1000 * 1000 };
	int i;

	for (i = 0; i < 5000; i++) {
		pthread_mutex_lock(&r->lock);
		if (r->n_tok >= n || r->done) {
			pthread_mutex_unlock(&r->lock);
			return;
		}
		pthread_mutex_unlock(&r->lock);
		nanosleep(&ts, NULL);
	}
}

static int tokenize(const struct kvq_tokenizer *t, const char *s, int32_t *out,
		    int cap)
{
	int n = 0;

	if (kvq_tokenizer_add_bos(t) && kvq_tokenizer_bos(t) >= 0)
		out[n++] = kvq_tokenizer_bos(t);
	return n + kvq_tokenize(t, s, strlen(s), out + n, cap - n);
}

static int submit(struct kvq_sched *s, const int32_t *p, int n, int max,
		  uint64_t seed, float temp, const char *stop, struct run *r,
		  uint64_t *id)
{
	struct kvq_sched_req q = { 0 };
	struct kvq_sched_sink k = { sink, r };
	const char *stops[1] = { stop };

	q.prompt = p;
	q.n_prompt = n;
	q.max_tokens = max;
	q.sp.temperature = temp;
	q.sp.top_k = 40;
	q.sp.top_p = 0.95f;
	q.sp.min_p = 0.0f;
	q.sp.seed = seed;
	q.stop = stops;
	q.n_stop = stop ? 1 : 0;
	q.logprobs = 0;
	q.tag = "test";
	return kvq_sched_submit(s, &q, &k, id, NULL);
}

#define N_REQ 16

static void test_batch_invariance(struct kvq_model *m)
{
	static const char *const words[] = {
		"Once upon a time", "The little dog", "Lily and Tom went",
		"One day, a big bird",
	};
	const struct kvq_tokenizer *t = kvq_model_tokenizer(m);
	struct kvq_sched_opts o = {
		.max_running = N_REQ, .max_queued = 4, .prefill_chunk = 8,
		.n_ctx = 256,
	};
	static struct run alone[N_REQ], both[N_REQ];
	int32_t prompt[N_REQ][200];
	int n_prompt[N_REQ];
	struct kvq_sched *s;
	char err[256], text[600];
	int i, j, same = 0, total = 0, ret;
	uint64_t id;

	ret = kvq_sched_create(m, &o, &s, err, sizeof(err));
	tap_ok(!ret, "kvq_sched_create (%s)", ret ? err : "ok");
	if (ret)
		return;
	for (i = 0; i < N_REQ; i++) {
		/* prompts from 4 to ~80 tokens: several prefill chunks */
		text[0] = 0;
		for (j = 0; j <= i % 6; j++) {
			strcat(text, words[(i + j) % 4]);
			strcat(text, j % 2 ? ". " : ", and ");
		}
		n_prompt[i] = tokenize(t, text, prompt[i], 200);
	}
	for (i = 0; i < N_REQ; i++) {
		run_init(&alone[i]);
		ret = submit(s, prompt[i], n_prompt[i], 40, 1000 + i, 0.9f,
			     NULL, &alone[i], &id);
		if (ret || !run_wait(&alone[i], 60))
			break;
	}
	tap_ok(i == N_REQ, "kvq_sched_submit_alone_runs_finish");
	for (i = 0; i < N_REQ; i++) {
		run_init(&both[i]);
		ret = submit(s, prompt[i], n_prompt[i], 40, 1000 + i, 0.9f,
			     NULL, &both[i], &id);
		if (ret)
			break;
	}
	tap_ok(i == N_REQ, "kvq_sched_submit_16_at_once");
	for (i = 0; i < N_REQ; i++) {
		total++;
		if (!run_wait(&both[i], 60))
			continue;
		if (alone[i].n_tok == both[i].n_tok &&
		    !memcmp(alone[i].tok, both[i].tok,
			    sizeof(int32_t) * alone[i].n_tok) &&
		    alone[i].len == both[i].len &&
		    !memcmp(alone[i].text, both[i].text, alone[i].len))
			same++;
		else
			tap_diag("request %d differs: alone %d tokens \"%s\", "
				 "batched %d tokens \"%s\"", i, alone[i].n_tok,
				 alone[i].text, both[i].n_tok, both[i].text);
	}
	tap_ok(same == total && total == N_REQ,
	       "kvq_sched_same_tokens_alone_and_beside_15_others (%d/%d)",
	       same, total);
	tap_ok(alone[0].usage.prompt_tokens == n_prompt[0] &&
	       alone[0].usage.completion_tokens == alone[0].n_tok &&
	       alone[0].n_tok > 0, "kvq_sched_usage_counts");
	for (i = 0; i < N_REQ; i++) {
		run_fini(&alone[i]);
		run_fini(&both[i]);
	}
	kvq_sched_destroy(s);
}

static void test_limits(struct kvq_model *m)
{
	const struct kvq_tokenizer *t = kvq_model_tokenizer(m);
	struct kvq_sched_opts o = {
		.max_running = 1, .max_queued = 1, .n_ctx = 128,
		.max_tokens_limit = 100,
	};
	struct kvq_sched_stats st;
	struct kvq_sched_req_info *info = NULL;
	struct run a, b, c;
	struct kvq_sched *s;
	int32_t p[64];
	int n, ret;
	size_t ni = 0;
	uint64_t ida, idb, idc;
	char err[256];

	if (kvq_sched_create(m, &o, &s, err, sizeof(err))) {
		tap_ok(0, "kvq_sched_create (%s)", err);
		return;
	}
	n = tokenize(t, "Once upon a time", p, 64);
	run_init(&a);
	run_init(&b);
	run_init(&c);

	ret = submit(s, p, n, 200, 1, 0.8f, NULL, &c, &idc);
	tap_ok(ret == -E2BIG, "kvq_sched_submit_max_tokens_over_limit");
	ret = submit(s, p, n, 128 - n + 1, 1, 0.8f, NULL, &c, &idc);
	tap_ok(ret == -E2BIG, "kvq_sched_submit_context_overflow");

	ret = submit(s, p, n, 100, 1, 0.8f, NULL, &a, &ida);
	ret |= submit(s, p, n, 100, 2, 0.8f, NULL, &b, &idb);
	tap_ok(!ret, "kvq_sched_submit_fills_running_and_queue");
	run_wait_tokens(&a, 3);
	ret = submit(s, p, n, 10, 3, 0.8f, NULL, &c, &idc);
	tap_ok(ret == -EAGAIN, "kvq_sched_submit_queue_full_is_eagain");

	kvq_sched_snapshot(s, &info, &ni);
	tap_ok(ni == 2 && info && info[0].id == ida &&
	       info[0].state != KVQ_SCHED_QUEUED && info[1].id == idb &&
	       info[1].state == KVQ_SCHED_QUEUED &&
	       !strcmp(info[0].tag, "test") && info[0].prompt_tokens == n,
	       "kvq_sched_snapshot_lists_running_and_queued");
	free(info);

	kvq_sched_cancel(s, ida);
	tap_ok(run_wait(&a, 10) && a.fin == KVQ_FINISH_CANCELLED,
	       "kvq_sched_cancel_finishes_with_cancelled");
	kvq_sched_cancel(s, idb);
	run_wait(&b, 10);
	kvq_sched_stats(s, &st);
	tap_ok(st.running == 0 && st.waiting == 0 && st.kv_bytes_used == 0,
	       "kvq_sched_cancel_frees_kv (running %u, waiting %u, kv %llu)",
	       st.running, st.waiting, (unsigned long long)st.kv_bytes_used);
	tap_ok(st.requests_finished[KVQ_FINISH_CANCELLED] == 2 &&
	       st.requests_rejected == 1, "kvq_sched_stats_counts");

	run_fini(&a);
	run_fini(&b);
	run_fini(&c);
	kvq_sched_destroy(s);
}

static void test_stop_and_drain(struct kvq_model *m)
{
	const struct kvq_tokenizer *t = kvq_model_tokenizer(m);
	struct kvq_sched_opts o = { .n_ctx = 256 };
	struct run a, b;
	struct kvq_sched *s;
	char err[256], stop[32] = "";
	const char *sp;
	int32_t p[64];
	int n, ret;
	uint64_t id;

	if (kvq_sched_create(m, &o, &s, err, sizeof(err))) {
		tap_ok(0, "kvq_sched_create (%s)", err);
		return;
	}
	n = tokenize(t, "Once upon a time", p, 64);
	run_init(&a);
	submit(s, p, n, 60, 0, 0.0f, NULL, &a, &id);
	run_wait(&a, 30);
	/* stop at the second space-led word of the greedy continuation */
	sp = strchr(a.text + 1, ' ');
	if (sp)
		sp = strchr(sp + 1, ' ');
	if (sp) {
		size_t k = strcspn(sp + 1, " ,.");

		snprintf(stop, sizeof(stop), " %.*s", (int)k, sp + 1);
	}
	run_init(&b);
	submit(s, p, n, 60, 0, 0.0f, stop[0] ? stop : NULL, &b, &id);
	run_wait(&b, 30);
	tap_ok(stop[0] && b.fin == KVQ_FINISH_STOP &&
	       b.len == (size_t)(sp - a.text) && !memcmp(a.text, b.text, b.len),
	       "kvq_sched_stop_string_cuts_text (\"%s\" stop \"%s\" -> \"%s\")",
	       a.text, stop, b.text);
	run_fini(&a);
	run_fini(&b);

	run_init(&a);
	ret = submit(s, p, n, 50, 5, 0.8f, NULL, &a, &id);
	ret |= kvq_sched_drain(s, 30000);
	tap_ok(!ret && a.done && a.fin != KVQ_FINISH_CANCELLED,
	       "kvq_sched_drain_finishes_running");
	run_init(&b);
	ret = submit(s, p, n, 5, 5, 0.8f, NULL, &b, &id);
	tap_ok(ret == -ESHUTDOWN, "kvq_sched_submit_after_drain_is_eshutdown");
	run_fini(&a);
	run_fini(&b);
	kvq_sched_destroy(s);
}

int main(void)
{
	struct kvq_model_opts mo = { .n_threads = 2 };
	struct kvq_model *m;
	char path[512], err[256];

	if (!tap_testdata("stories260K.gguf", path, sizeof(path)))
		return tap_skip_all("stories260K.gguf not found in "
				    "KVQ_TESTDATA");
	if (kvq_model_load(path, &mo, &m, err, sizeof(err))) {
		tap_ok(0, "kvq_model_load (%s)", err);
		return tap_done();
	}
	test_batch_invariance(m);
	test_limits(m);
	test_stop_and_drain(m);
	kvq_model_destroy(m);
	return tap_done();
}
