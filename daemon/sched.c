/*
 * sched.c - continuous batching: one thread, one engine context, many
 * requests.
 *
 * Why this file exists: see sched.h.  The scheduler thread is the only one
 * that touches the engine context; other threads reach the scheduler only
 * through the mutex-protected queue, the cancel flag and the counters.
 *
 * A request's tokens are one array: the prompt followed by what has been
 * generated.  Each step feeds a sequence the next run of tokens it has not
 * fed yet -- a prefill chunk of at most prefill_chunk tokens, or the one
 * token sampled last -- and when everything known has been fed, the step's
 * logits give the next token.  A request preempted because the KV cache is
 * full simply loses its sequence and feeds the whole array again later, so
 * it continues with the same tokens.
 *
 * Prefill chunks always start at multiples of prefill_chunk from the start
 * of the request's own array, whatever else is in the batch, so the pieces
 * a prompt is cut into never depend on other requests.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "daemon/sched.h"
#include "engine/forward_gpu.h"
#include "engine/kvcache.h"
#include "engine/kvcalib.h"
#include "engine/log.h"
#include "engine/model.h"
#include "engine/quant.h"
#include "engine/tokenizer.h"
#include "kernels/gpu.h"

const double kvq_sched_buckets[KVQ_SCHED_N_BUCKETS] = {
	0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
};

struct sreq {
	struct sreq *next;		/* queue link */
	uint64_t id;
	char tag[48];
	enum kvq_sched_state state;	/* written under s->lock */
	atomic_bool cancelled;

	int32_t *toks;			/* prompt, then generated */
	int n_prompt;
	int n_toks;
	int n_fed;			/* tokens in the KV sequence */
	int n_cached;			/* of those, shared from the prefix cache */
	int max_tokens;
	int seq;			/* -1 when none */

	struct kvq_sampler smp;
	int logprobs;
	bool prompt_logprobs;
	bool prompt_sent;
	bool ignore_eos;
	int32_t eog[KVQ_SCHED_MAX_EOG];
	int n_eog;
	char *stop[KVQ_SCHED_MAX_STOP];
	int n_stop;

	struct kvq_detok dt;
	char *text;			/* text not yet released */
	size_t tlen, tcap;
	struct kvq_sched_tok *ptok;	/* logprob entries not yet sent */
	int n_ptok, cap_ptok;

	struct kvq_sched_sink sink;
	double t_submit, t_first, t_last;
	enum kvq_finish finish;
	int err;
	char errmsg[128];

	/* copies for kvq_sched_snapshot(), under s->lock */
	int pub_fed, pub_gen;
};

struct kvq_sched {
	struct kvq_model *m;
	const struct kvq_tokenizer *tok;
	int32_t n_vocab;
	struct kvq_ctx *ctx;
	struct kvq_sched_opts o;
	uint64_t kv_token_bytes;
	uint8_t kv_k[KVQ_KV_MAX_LAYERS];	/* resolved KV types per layer */
	uint8_t kv_v[KVQ_KV_MAX_LAYERS];

	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake;		/* work for the thread */
	pthread_cond_t idle;		/* nothing queued or running */
	bool stop;
	bool draining;
	bool kv_full;			/* no admission until a request ends */
	uint64_t next_id;
	void (*step_cb)(void *arg);	/* kvq_sched_set_step_cb() */
	void *step_arg;

	struct sreq *qhead, *qtail;	/* waiting, FIFO */
	uint32_t n_queued;
	struct sreq **run;		/* running, admission order */
	uint32_t n_run;

	struct kvq_sched_stats st;

	/*
	 * Prefix cache (scheduler thread only): finished sequences whose KV
	 * is kept, with their tokens, least recently used first to go.
	 */
	struct pcent {
		int seq;
		int32_t *toks;
		int n;
		uint64_t used;
	} *pc;
	uint32_t n_pc, pc_cap;
	uint64_t pc_clock;

	/* scheduler-thread scratch */
	float *logits;
	size_t logits_cap;		/* floats */
	float *lg;	/* this step's logits: logits, or the GPU's pinned rows */
	int *b_seq, *b_n;
	const int32_t **b_tok;
	struct sreq **b_req;
	struct kvq_sampler **b_smp;	/* NULL: the entry's row is not sampled */
	int32_t *b_id;			/* tokens kvq_step_sample() chose */
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

const char *kvq_finish_name(enum kvq_finish f)
{
	switch (f) {
	case KVQ_FINISH_STOP:
		return "stop";
	case KVQ_FINISH_LENGTH:
		return "length";
	default:
		return NULL;
	}
}

const char *kvq_sched_state_name(enum kvq_sched_state st)
{
	static const char *const names[] = {
		"queued", "prefill", "decode", "finished",
	};

	if ((unsigned)st >= sizeof(names) / sizeof(names[0]))
		return "unknown";
	return names[st];
}

static void hist_add(struct kvq_sched_hist *h, double v)
{
	int i;

	for (i = 0; i < KVQ_SCHED_N_BUCKETS; i++)
		if (v <= kvq_sched_buckets[i])
			break;
	h->count[i]++;
	h->n++;
	h->sum += v;
}

/* ------------------------------------------------------------- requests */

static void sreq_free(struct sreq *r)
{
	int i;

	if (!r)
		return;
	for (i = 0; i < r->n_stop; i++)
		free(r->stop[i]);
	kvq_sampler_fini(&r->smp);
	free(r->toks);
	free(r->text);
	free(r->ptok);
	free(r);
}

static int text_reserve(struct sreq *r, size_t more)
{
	size_t cap = r->tcap ? r->tcap : 256;
	char *p;

	while (cap < r->tlen + more + 1)
		cap *= 2;
	if (cap == r->tcap)
		return 0;
	p = realloc(r->text, cap);
	if (!p)
		return -ENOMEM;
	r->text = p;
	r->tcap = cap;
	return 0;
}

static struct kvq_sched_tok *ptok_add(struct sreq *r)
{
	struct kvq_sched_tok *p;

	if (r->n_ptok == r->cap_ptok) {
		int cap = r->cap_ptok ? r->cap_ptok * 2 : 16;

		p = realloc(r->ptok, cap * sizeof(*p));
		if (!p)
			return NULL;
		r->ptok = p;
		r->cap_ptok = cap;
	}
	p = &r->ptok[r->n_ptok++];
	memset(p, 0, sizeof(*p));
	return p;
}

/*
 * Log-probability of @id and the @n_top most likely tokens under the
 * softmax of @logits at temperature 1.
 */
static void logprob_fill(const float *logits, int32_t n_vocab, int32_t id,
			 int n_top, struct kvq_sched_tok *t)
{
	double sum = 0;
	float mx = -INFINITY;
	float lse;
	int32_t i;
	int j, k;

	for (i = 0; i < n_vocab; i++)
		if (logits[i] > mx)
			mx = logits[i];
	for (i = 0; i < n_vocab; i++)
		if (!isnan(logits[i]))
			sum += exp((double)logits[i] - mx);
	lse = mx + (float)log(sum);
	t->id = id;
	t->logprob = logits[id] - lse;
	t->n_top = 0;
	if (n_top > KVQ_SCHED_MAX_TOP)
		n_top = KVQ_SCHED_MAX_TOP;
	for (i = 0; i < n_vocab && n_top > 0; i++) {
		float v = logits[i];

		if (isnan(v))
			continue;
		if (t->n_top == n_top && v <= t->top[n_top - 1].logprob)
			continue;
		j = t->n_top < n_top ? t->n_top++ : n_top - 1;
		for (k = j; k > 0 && t->top[k - 1].logprob < v; k--)
			t->top[k] = t->top[k - 1];
		t->top[k].id = i;
		t->top[k].logprob = v;
	}
	for (j = 0; j < t->n_top; j++)
		t->top[j].logprob -= lse;
}

/* ------------------------------------------------------------- delivery */

/* The final event of @r: what text is left, finish reason, usage. */
static void deliver_done(struct kvq_sched *s, struct sreq *r)
{
	struct kvq_sched_event ev = {
		.kind = KVQ_SCHED_EV_DONE,
		.req_id = r->id,
		.text = r->text,
		.len = r->tlen,
		.tok = r->ptok,
		.n_tok = r->n_ptok,
		.finish = r->finish,
		.err = r->err,
		.errmsg = r->errmsg[0] ? r->errmsg : NULL,
		.ttft_s = r->t_first > 0 ? r->t_first - r->t_submit : -1,
	};

	ev.usage.prompt_tokens = r->n_prompt;
	ev.usage.completion_tokens = r->n_toks - r->n_prompt;
	ev.usage.cached_tokens = r->n_cached;
	r->sink.event(r->sink.arg, &ev);
}

static void deliver_text(struct kvq_sched *s, struct sreq *r, size_t len)
{
	struct kvq_sched_event ev = {
		.kind = KVQ_SCHED_EV_TEXT,
		.req_id = r->id,
		.text = r->text,
		.len = len,
		.tok = r->ptok,
		.n_tok = r->n_ptok,
	};

	if (!len && !r->n_ptok)
		return;
	r->sink.event(r->sink.arg, &ev);
	memmove(r->text, r->text + len, r->tlen - len);
	r->tlen -= len;
	r->n_ptok = 0;
}

/* Frees the engine sequence (scheduler thread only). */
static void seq_drop(struct kvq_sched *s, struct sreq *r)
{
	if (r->seq >= 0) {
		kvq_seq_free(s->ctx, r->seq);
		r->seq = -1;
	}
	r->n_fed = 0;
}

/* ------------------------------------------------------- prefix cache */

/* Drops the least recently used cached sequence; false when none. */
static bool pc_evict(struct kvq_sched *s)
{
	uint32_t i, lru = 0;

	if (!s->n_pc)
		return false;
	for (i = 1; i < s->n_pc; i++)
		if (s->pc[i].used < s->pc[lru].used)
			lru = i;
	kvq_seq_free(s->ctx, s->pc[lru].seq);
	free(s->pc[lru].toks);
	s->pc[lru] = s->pc[--s->n_pc];
	s->st.cached_seqs = s->n_pc;
	return true;
}

/*
 * Keeps @r's sequence (the tokens it fed) for later prompts instead of
 * freeing it, when it holds at least one prefill chunk.  Scheduler thread.
 */
static void pc_keep(struct kvq_sched *s, struct sreq *r)
{
	struct pcent *e;
	int32_t *t;

	if (!s->pc_cap || r->seq < 0 || r->n_fed < (int)s->o.prefill_chunk)
		return;
	t = malloc((size_t)r->n_fed * sizeof(*t));
	if (!t)
		return;
	memcpy(t, r->toks, (size_t)r->n_fed * sizeof(*t));
	if (s->n_pc == s->pc_cap)
		pc_evict(s);
	e = &s->pc[s->n_pc++];
	e->seq = r->seq;
	e->toks = t;
	e->n = r->n_fed;
	e->used = ++s->pc_clock;
	s->st.cached_seqs = s->n_pc;
	r->seq = -1;
}

/*
 * Lets @r (just given the empty sequence r->seq) share the longest prefix
 * of its prompt found in the cache, cut to whole prefill chunks -- so the
 * rest is fed in the same chunks as without the cache and gives the same
 * tokens -- and leaving the prompt's last token to compute.
 */
static void pc_share(struct kvq_sched *s, struct sreq *r)
{
	int chunk = (int)s->o.prefill_chunk, best = 0, l, lim;
	struct pcent *be = NULL;
	uint32_t i;

	if (!s->n_pc || r->prompt_logprobs || r->n_prompt <= chunk)
		return;
	lim = r->n_prompt - 1;
	for (i = 0; i < s->n_pc; i++) {
		struct pcent *e = &s->pc[i];
		int n = e->n < lim ? e->n : lim;

		for (l = 0; l < n && e->toks[l] == r->toks[l]; l++)
			;
		l -= l % chunk;
		if (l > best) {
			best = l;
			be = e;
		}
	}
	if (!be || kvq_seq_fork(s->ctx, r->seq, be->seq, (uint32_t)best))
		return;
	be->used = ++s->pc_clock;
	r->n_fed = best;
	r->n_cached = best;
	s->st.prompt_tokens_cached += (uint64_t)best;
}

/*
 * End @r: release what is left of its text (unless cancelled), free its KV
 * sequence and tell the sink.  The request must already be out of the queue
 * and the running array.  Called without the lock.
 */
static void finish(struct kvq_sched *s, struct sreq *r, enum kvq_finish f)
{
	char buf[64];
	int n;

	/* A cancelled (client gone), timed-out or failed request frees its
	 * KV at once; one that ended normally may serve later prompts. */
	if (f == KVQ_FINISH_STOP || f == KVQ_FINISH_LENGTH)
		pc_keep(s, r);
	seq_drop(s, r);
	r->finish = f;
	if (f == KVQ_FINISH_CANCELLED || f == KVQ_FINISH_ERROR) {
		r->tlen = 0;
	} else if (f != KVQ_FINISH_STOP || !r->n_stop) {
		n = kvq_detok_flush(&r->dt, buf, sizeof(buf));
		if (n > 0 && !text_reserve(r, n)) {
			memcpy(r->text + r->tlen, buf, n);
			r->tlen += n;
		}
	}
	pthread_mutex_lock(&s->lock);
	r->state = KVQ_SCHED_FINISHED;
	/* Its pages are free now, before the finish is delivered. */
	s->st.kv_bytes_used = kvq_ctx_kv_bytes_used(s->ctx);
	s->kv_full = false;
	s->st.requests_finished[f]++;
	pthread_mutex_unlock(&s->lock);
	deliver_done(s, r);
	sreq_free(r);
}

/* ------------------------------------------------------------- submit */

static int sreq_build(struct kvq_sched *s, const struct kvq_sched_req *q,
		      int max_tokens, struct sreq **out)
{
	struct sreq *r;
	int i, ret;

	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->seq = -1;
	r->n_prompt = q->n_prompt;
	r->n_toks = q->n_prompt;
	r->max_tokens = max_tokens;
	r->logprobs = q->logprobs;
	r->prompt_logprobs = q->prompt_logprobs && q->logprobs >= 0;
	r->ignore_eos = q->ignore_eos;
	r->n_eog = q->n_eog;
	if (q->n_eog)
		memcpy(r->eog, q->eog, sizeof(int32_t) * q->n_eog);
	if (q->tag)
		snprintf(r->tag, sizeof(r->tag), "%s", q->tag);
	r->toks = malloc(sizeof(int32_t) * (q->n_prompt + max_tokens));
	if (!r->toks)
		goto out_nomem;
	memcpy(r->toks, q->prompt, sizeof(int32_t) * q->n_prompt);
	for (i = 0; i < q->n_stop; i++) {
		if (!q->stop[i] || !q->stop[i][0])
			continue;
		r->stop[r->n_stop] = strdup(q->stop[i]);
		if (!r->stop[r->n_stop])
			goto out_nomem;
		r->n_stop++;
	}
	ret = kvq_sampler_init(&r->smp, &q->sp, s->n_vocab);
	if (ret) {
		sreq_free(r);
		return ret;
	}
	kvq_detok_init(&r->dt, s->tok);
	r->dt.first = false;	/* a continuation keeps its leading space */
	*out = r;
	return 0;

out_nomem:
	sreq_free(r);
	return -ENOMEM;
}

int kvq_sched_submit(struct kvq_sched *s, const struct kvq_sched_req *q,
		     const struct kvq_sched_sink *sink, uint64_t *id,
		     int *r_max)
{
	struct sreq *r;
	int max_tokens, i, ret;

	if (!q || !sink || !sink->event || !q->prompt || q->n_prompt < 1 ||
	    q->n_stop < 0 || q->n_stop > KVQ_SCHED_MAX_STOP ||
	    q->logprobs > KVQ_SCHED_MAX_TOP || q->n_eog < 0 ||
	    q->n_eog > KVQ_SCHED_MAX_EOG || (q->n_eog && !q->eog))
		return -EINVAL;
	for (i = 0; i < q->n_prompt; i++)
		if (q->prompt[i] < 0 || q->prompt[i] >= s->n_vocab)
			return -EINVAL;

	pthread_mutex_lock(&s->lock);
	max_tokens = q->max_tokens;
	if (max_tokens <= 0) {
		max_tokens = s->o.max_tokens_default;
		if ((uint32_t)max_tokens > s->o.n_ctx - q->n_prompt &&
		    (uint32_t)q->n_prompt < s->o.n_ctx)
			max_tokens = s->o.n_ctx - q->n_prompt;
	}
	if ((uint32_t)max_tokens > s->o.max_tokens_limit ||
	    (uint64_t)q->n_prompt + max_tokens > s->o.n_ctx) {
		pthread_mutex_unlock(&s->lock);
		return -E2BIG;
	}
	if (s->stop || s->draining) {
		s->st.requests_rejected++;
		pthread_mutex_unlock(&s->lock);
		return -ESHUTDOWN;
	}
	if (s->n_queued >= s->o.max_queued &&
	    s->n_run + s->n_queued >= s->o.max_running + s->o.max_queued) {
		s->st.requests_rejected++;
		pthread_mutex_unlock(&s->lock);
		return -EAGAIN;
	}
	pthread_mutex_unlock(&s->lock);

	ret = sreq_build(s, q, max_tokens, &r);
	if (ret)
		return ret;
	r->sink = *sink;
	r->t_submit = now_s();

	pthread_mutex_lock(&s->lock);
	if (s->stop || s->draining) {
		s->st.requests_rejected++;
		pthread_mutex_unlock(&s->lock);
		sreq_free(r);
		return -ESHUTDOWN;
	}
	r->id = ++s->next_id;
	/* once the lock drops, @r may run, finish and be freed at once */
	if (id)
		*id = r->id;
	if (r_max)
		*r_max = max_tokens;
	r->state = KVQ_SCHED_QUEUED;
	if (s->qtail)
		s->qtail->next = r;
	else
		s->qhead = r;
	s->qtail = r;
	s->n_queued++;
	s->st.requests_total++;
	s->st.tokens_prompt_total += r->n_prompt;
	pthread_cond_signal(&s->wake);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

void kvq_sched_set_step_cb(struct kvq_sched *s, void (*fn)(void *arg),
			   void *arg)
{
	pthread_mutex_lock(&s->lock);
	s->step_cb = fn;
	s->step_arg = arg;
	pthread_mutex_unlock(&s->lock);
}

void kvq_sched_cancel(struct kvq_sched *s, uint64_t id)
{
	struct sreq *r;
	uint32_t i;

	pthread_mutex_lock(&s->lock);
	for (r = s->qhead; r; r = r->next)
		if (r->id == id)
			goto found;
	for (i = 0; i < s->n_run; i++)
		if (s->run[i]->id == id) {
			r = s->run[i];
			goto found;
		}
	pthread_mutex_unlock(&s->lock);
	return;
found:
	atomic_store(&r->cancelled, true);
	pthread_cond_signal(&s->wake);
	pthread_mutex_unlock(&s->lock);
}

/* ------------------------------------------------------------- the loop */

/* Removes running entry @i (lock held), keeping admission order. */
static struct sreq *run_remove(struct kvq_sched *s, uint32_t i)
{
	struct sreq *r = s->run[i];

	memmove(&s->run[i], &s->run[i + 1],
		(s->n_run - i - 1) * sizeof(s->run[0]));
	s->n_run--;
	return r;
}

/*
 * Takes cancelled and timed-out requests out of the queue and the running
 * array onto @dead (lock held).
 */
static void collect_dead(struct kvq_sched *s, struct sreq **dead, double t)
{
	struct sreq **pp = &s->qhead, *r;
	uint32_t i;

	s->qtail = NULL;
	while ((r = *pp)) {
		bool to = s->o.queue_timeout_ms &&
			  t - r->t_submit > s->o.queue_timeout_ms / 1e3;

		if (atomic_load(&r->cancelled) || to || s->stop) {
			*pp = r->next;
			s->n_queued--;
			r->finish = to && !atomic_load(&r->cancelled) ?
				    KVQ_FINISH_TIMEOUT : KVQ_FINISH_CANCELLED;
			r->next = *dead;
			*dead = r;
			continue;
		}
		s->qtail = r;
		pp = &r->next;
	}
	for (i = 0; i < s->n_run;) {
		bool to;

		r = s->run[i];
		to = s->o.total_timeout_ms &&
		     t - r->t_submit > s->o.total_timeout_ms / 1e3;
		if (atomic_load(&r->cancelled) || to || s->stop) {
			run_remove(s, i);
			r->finish = to && !atomic_load(&r->cancelled) ?
				    KVQ_FINISH_TIMEOUT : KVQ_FINISH_CANCELLED;
			r->next = *dead;
			*dead = r;
			continue;
		}
		i++;
	}
}

/*
 * Publishes the running requests' progress for snapshots and the KV bytes
 * in use (lock held; scheduler thread).
 */
static void publish(struct kvq_sched *s)
{
	uint64_t kv = 0;
	struct sreq *r;
	uint32_t k;

	for (k = 0; k < s->n_run; k++) {
		r = s->run[k];
		r->state = r->n_fed >= r->n_prompt ? KVQ_SCHED_DECODE :
			   KVQ_SCHED_PREFILL;
		r->pub_fed = r->n_fed;
		r->pub_gen = r->n_toks - r->n_prompt;
		kv += r->n_fed;
	}
	(void)kv;
	s->st.kv_bytes_used = kvq_ctx_kv_bytes_used(s->ctx);
	s->st.running = s->n_run;
	s->st.waiting = s->n_queued;
}

/* Moves queued requests into the running array while there is room. */
static void admit(struct kvq_sched *s)
{
	struct sreq *r;
	int seq;

	while (s->qhead && s->n_run < s->o.max_running && !s->kv_full) {
		seq = kvq_seq_create(s->ctx);
		if (seq < 0 && pc_evict(s))
			seq = kvq_seq_create(s->ctx);
		if (seq < 0)
			break;
		r = s->qhead;
		s->qhead = r->next;
		if (!s->qhead)
			s->qtail = NULL;
		r->next = NULL;
		s->n_queued--;
		r->seq = seq;
		r->n_fed = 0;
		r->n_cached = 0;
		pc_share(s, r);
		r->state = KVQ_SCHED_PREFILL;
		s->run[s->n_run++] = r;
	}
}

/*
 * Frees the KV of the most recently admitted request and puts it back at
 * the head of the queue; it will feed its whole token array again, once a
 * request has ended and freed KV.  Lock held.  Returns false when there is
 * nothing to preempt.
 */
static bool preempt_one(struct kvq_sched *s)
{
	struct sreq *r;

	if (s->n_run < 2)
		return false;
	r = run_remove(s, s->n_run - 1);
	seq_drop(s, r);
	if (!r->prompt_sent)
		r->n_ptok = 0;
	r->state = KVQ_SCHED_QUEUED;
	s->kv_full = true;
	r->next = s->qhead;
	s->qhead = r;
	if (!s->qtail)
		s->qtail = r;
	s->n_queued++;
	kvq_debug("sched: KV cache full, request %llu preempted",
		  (unsigned long long)r->id);
	return true;
}

/* Tokens @r feeds this step given @budget prefill tokens left. */
static int feed_count(const struct kvq_sched *s, const struct sreq *r,
		      int *budget)
{
	int left = r->n_toks - r->n_fed;
	int chunk = s->o.prefill_chunk;
	int n;

	if (left <= 1)
		return left;
	/* whole chunks aligned on the request's own start */
	n = chunk - r->n_fed % chunk;
	if (n > left)
		n = left;
	if (n > *budget)
		return 0;
	*budget -= n;
	return n;
}

static int ensure_logits(struct kvq_sched *s, size_t rows)
{
	size_t need = rows * (size_t)s->n_vocab, lr;
	float *p;

	/* On a GPU the context's pinned rows take them without a copy. */
	s->lg = kvq_ctx_logits_buffer(s->ctx, &lr);
	if (s->lg && rows <= lr)
		return 0;
	s->lg = s->logits;
	if (need <= s->logits_cap)
		return 0;
	p = realloc(s->logits, need * sizeof(float));
	if (!p)
		return -ENOMEM;
	s->logits = s->lg = p;
	s->logits_cap = need;
	return 0;
}

/* The prompt logprobs of one fed chunk; rows are its all-logits rows. */
static void prompt_logprobs(struct kvq_sched *s, struct sreq *r, int from,
			    int n, const float *rows)
{
	struct kvq_sched_tok *t;
	int i;

	if (from == 0) {
		t = ptok_add(r);
		if (t) {
			t->id = r->toks[0];
			t->logprob = NAN;
		}
	}
	for (i = 0; i < n; i++) {
		int pos = from + i + 1;

		if (pos >= r->n_prompt)
			break;
		t = ptok_add(r);
		if (!t)
			break;
		logprob_fill(rows + (size_t)i * s->n_vocab, s->n_vocab,
			     r->toks[pos], r->logprobs, t);
	}
}

/* Sends the prompt logprobs gathered so far (once the prompt is fed). */
static void send_prompt(struct kvq_sched *s, struct sreq *r)
{
	struct kvq_sched_event ev = {
		.kind = KVQ_SCHED_EV_PROMPT,
		.req_id = r->id,
		.tok = r->ptok,
		.n_tok = r->n_ptok,
	};

	r->sink.event(r->sink.arg, &ev);
	r->n_ptok = 0;
	r->prompt_sent = true;
}

static bool is_eog(const struct kvq_sched *s, const struct sreq *r,
		   int32_t id)
{
	int i;

	for (i = 0; i < r->n_eog; i++)
		if (r->eog[i] == id)
			return true;
	return kvq_tokenizer_is_eog(s->tok, id);
}

/*
 * Takes @id as the next token of @r (sampled from @logits first when @id
 * is negative; @logits may be NULL when it is not and no logprobs are
 * wanted) and works out what it means: text released, stop string, end of
 * generation.  Returns the finish reason, KVQ_FINISH_NONE to keep going.
 */
static enum kvq_finish take_token(struct kvq_sched *s, struct sreq *r,
				  int32_t id, const float *logits, double t)
{
	struct kvq_sched_tok *pt = NULL;
	char piece[1024];
	int n, gen;
	long at;
	size_t hold;

	if (id < 0 && logits)
		id = kvq_sampler_sample(&r->smp, logits, NULL);
	if (id < 0 || id >= s->n_vocab) {
		r->err = -EIO;
		snprintf(r->errmsg, sizeof(r->errmsg), "sampler failed");
		return KVQ_FINISH_ERROR;
	}
	r->toks[r->n_toks++] = id;
	gen = r->n_toks - r->n_prompt;

	pthread_mutex_lock(&s->lock);
	s->st.tokens_generated_total++;
	if (gen == 1) {
		r->t_first = t;
		hist_add(&s->st.ttft, t - r->t_submit);
	} else {
		hist_add(&s->st.itl, t - r->t_last);
	}
	pthread_mutex_unlock(&s->lock);
	r->t_last = t;

	if (r->logprobs >= 0 && logits && (pt = ptok_add(r)))
		logprob_fill(logits, s->n_vocab, id, r->logprobs, pt);

	if (!r->ignore_eos && is_eog(s, r, id))
		return KVQ_FINISH_STOP;

	n = kvq_detok_push(&r->dt, id, piece, sizeof(piece));
	if (n > 0) {
		if (text_reserve(r, n)) {
			r->err = -ENOMEM;
			return KVQ_FINISH_ERROR;
		}
		memcpy(r->text + r->tlen, piece, n);
		r->tlen += n;
		r->text[r->tlen] = 0;
	}
	if (r->n_stop) {
		at = kvq_stop_check(r->text, r->tlen, r->stop, r->n_stop);
		if (at >= 0) {
			r->tlen = at;
			return KVQ_FINISH_STOP;
		}
	}
	if (gen >= r->max_tokens || (uint32_t)r->n_toks >= s->o.n_ctx)
		return KVQ_FINISH_LENGTH;
	hold = r->n_stop ? kvq_stop_partial(r->text, r->tlen, r->stop,
					    r->n_stop) : 0;
	deliver_text(s, r, r->tlen - hold);
	return KVQ_FINISH_NONE;
}

/*
 * One engine step over the running array: feed, sample, deliver, and
 * finish the requests that ended.  When the engine fails, every running
 * request is finished with KVQ_FINISH_ERROR.
 */
static void do_step(struct kvq_sched *s)
{
	struct sreq *r, *dead = NULL;
	int budget = s->o.prefill_chunk;
	bool all = false;
	int n = 0, i, ret, rows = 0;
	bool want_logits = false;
	struct kvq_batch b;
	double t, t_step;
	uint32_t k;

	pthread_mutex_lock(&s->lock);
	for (k = 0; k < s->n_run; k++) {
		int c;

		r = s->run[k];
		c = feed_count(s, r, &budget);
		if (!c)
			continue;
		s->b_req[n] = r;
		s->b_seq[n] = r->seq;
		s->b_n[n] = c;
		s->b_tok[n] = r->toks + r->n_fed;
		if (r->prompt_logprobs && !r->prompt_sent &&
		    r->n_fed < r->n_prompt)
			all = true;
		/* The entry's last row gives a token once its prompt is in. */
		s->b_smp[n] = r->n_fed + c >= r->n_toks ? &r->smp : NULL;
		if (s->b_smp[n] && r->logprobs >= 0)
			want_logits = true;
		rows += c;
		n++;
	}
	pthread_mutex_unlock(&s->lock);
	if (!n)
		return;

	if (ensure_logits(s, all ? (size_t)rows : (size_t)n)) {
		ret = -ENOMEM;
		goto fail_all;
	}
	b.n = n;
	b.seq = s->b_seq;
	b.n_tokens = s->b_n;
	b.tokens = s->b_tok;
	b.all_logits = all;
	t_step = now_s();
	/* Without logits to show, the engine samples (on the GPU: only the
	 * tokens come back); prompt logprobs take every row to the host. */
	if (all)
		ret = kvq_step(s->ctx, &b, s->lg);
	else
		ret = kvq_step_sample(s->ctx, &b, s->b_smp, s->b_id,
				      want_logits ? s->lg : NULL);
	t_step = now_s() - t_step;
	if (!ret && s->st.on_gpu && !s->st.gpu_fallback[0] &&
	    kvq_ctx_fallback(s->ctx)) {
		pthread_mutex_lock(&s->lock);
		snprintf(s->st.gpu_fallback, sizeof(s->st.gpu_fallback), "%s",
			 kvq_ctx_fallback(s->ctx));
		pthread_mutex_unlock(&s->lock);
	}
	if (ret == -ENOSPC && pc_evict(s)) {
		/* Cached sequences give their pages back first. */
		pthread_mutex_lock(&s->lock);
		s->st.kv_bytes_used = kvq_ctx_kv_bytes_used(s->ctx);
		pthread_mutex_unlock(&s->lock);
		return;
	}
	if (ret == -ENOSPC) {
		pthread_mutex_lock(&s->lock);
		if (preempt_one(s)) {
			pthread_mutex_unlock(&s->lock);
			return;
		}
		pthread_mutex_unlock(&s->lock);
	}
	if (ret)
		goto fail_all;

	t = now_s();
	rows = 0;
	for (i = 0; i < n; i++) {
		const float *row;
		enum kvq_finish f = KVQ_FINISH_NONE;
		int from;

		r = s->b_req[i];
		from = r->n_fed;
		r->n_fed += s->b_n[i];
		if (all) {
			if (r->prompt_logprobs && !r->prompt_sent)
				prompt_logprobs(s, r, from, s->b_n[i],
						s->lg +
						(size_t)rows * s->n_vocab);
			rows += s->b_n[i];
			row = s->lg + (size_t)(rows - 1) * s->n_vocab;
		} else {
			row = s->lg + (size_t)i * s->n_vocab;
		}
		if (r->n_fed < r->n_toks)
			continue;	/* more prompt to feed */
		if (r->prompt_logprobs && !r->prompt_sent)
			send_prompt(s, r);
		f = take_token(s, r, all ? -1 : s->b_id[i],
			       all || want_logits ? row : NULL, t);
		if (f != KVQ_FINISH_NONE) {
			r->finish = f;
			r->next = dead;
			dead = r;
		}
	}

	pthread_mutex_lock(&s->lock);
	/* under the lock, for kvq_sched_set_step_cb()'s promise */
	if (s->step_cb)
		s->step_cb(s->step_arg);
	s->st.steps_total++;
	s->st.step_seconds += t_step;
	s->st.device_seconds = kvq_ctx_device_busy_us(s->ctx) * 1e-6;
	s->st.tokens_sampled_device = kvq_ctx_device_sampled(s->ctx);
	for (r = dead; r; r = r->next)
		for (k = 0; k < s->n_run; k++)
			if (s->run[k] == r) {
				run_remove(s, k);
				break;
			}
	publish(s);
	pthread_mutex_unlock(&s->lock);

	while ((r = dead)) {
		dead = r->next;
		finish(s, r, r->finish);
	}
	return;

fail_all:
	kvq_err("sched: engine step failed: %s", strerror(-ret));
	pthread_mutex_lock(&s->lock);
	while (s->n_run) {
		r = run_remove(s, s->n_run - 1);
		r->next = dead;
		dead = r;
	}
	publish(s);
	pthread_mutex_unlock(&s->lock);
	while ((r = dead)) {
		dead = r->next;
		r->err = ret;
		snprintf(r->errmsg, sizeof(r->errmsg), "engine step failed: %s",
			 strerror(-ret));
		finish(s, r, KVQ_FINISH_ERROR);
	}
}

static void *sched_main(void *arg)
{
	struct kvq_sched *s = arg;
	struct sreq *dead, *r;

	pthread_mutex_lock(&s->lock);
	for (;;) {
		dead = NULL;
		collect_dead(s, &dead, now_s());
		if (dead) {
			publish(s);
			pthread_mutex_unlock(&s->lock);
			while ((r = dead)) {
				dead = r->next;
				finish(s, r, r->finish);
			}
			pthread_mutex_lock(&s->lock);
			continue;
		}
		if (s->stop && !s->n_run && !s->qhead)
			break;
		admit(s);
		publish(s);
		if (!s->n_run) {
			pthread_cond_broadcast(&s->idle);
			pthread_cond_wait(&s->wake, &s->lock);
			continue;
		}
		pthread_mutex_unlock(&s->lock);
		do_step(s);
		pthread_mutex_lock(&s->lock);
	}
	s->st.running = 0;
	s->st.waiting = 0;
	pthread_cond_broadcast(&s->idle);
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

/* ------------------------------------------------------------- lifecycle */

static void opts_fill(struct kvq_sched_opts *o, const struct kvq_hparams *hp)
{
	if (!o->max_running)
		o->max_running = 16;
	if (!o->max_queued)
		o->max_queued = 64;
	if (!o->max_tokens_default)
		o->max_tokens_default = 256;
	if (!o->max_tokens_limit)
		o->max_tokens_limit = 4096;
	if (!o->prefill_chunk)
		o->prefill_chunk = 256;
	if (!o->n_ctx)
		o->n_ctx = hp->ctx_len && hp->ctx_len < 4096 ? hp->ctx_len :
			   4096;
	if (!o->kv_tokens)
		o->kv_tokens = o->n_ctx * o->max_running;
}

/* "q4" when every layer has one type, else a count per type. */
static void types_summary(const uint8_t *t, uint32_t n, char *out, size_t len)
{
	uint32_t cnt[KVQ_KV_NTYPES] = { 0 }, i;
	int k, w = 0;

	for (i = 0; i < n; i++)
		cnt[t[i] < KVQ_KV_NTYPES ? t[i] : 0]++;
	for (k = 0; k < KVQ_KV_NTYPES; k++) {
		if (cnt[k] == n) {
			snprintf(out, len, "%s", kvq_kv_type_name(k));
			return;
		}
	}
	w = snprintf(out, len, "mixed:");
	for (k = KVQ_KV_NTYPES - 1; k >= 0 && w > 0 && (size_t)w < len; k--)
		if (cnt[k])
			w += snprintf(out + w, len - w, " %u %s", cnt[k],
				      kvq_kv_type_name(k));
}

/*
 * Resolves the KV precision settings into @co (per-layer arrays owned by
 * the scheduler), calibrating keys when asked.
 */
static int kv_setup(struct kvq_sched *s, struct kvq_ctx_opts *co, char *err,
		    size_t errlen)
{
	uint32_t nl = kvq_model_hparams(s->m)->n_layers;
	const char *ks = s->o.kv_type_k ? s->o.kv_type_k : "q8";
	const char *vs = s->o.kv_type_v ? s->o.kv_type_v : "q4";
	char why[160];
	int r;

	if (nl > KVQ_KV_MAX_LAYERS) {
		snprintf(err, errlen, "the KV cache supports at most %d layers",
			 KVQ_KV_MAX_LAYERS);
		return -EINVAL;
	}
	co->kv_page_tokens = s->o.kv_page_tokens;
	co->kv_sink_tokens = s->o.kv_sink_tokens;
	r = kvq_kv_types_parse(vs, nl, s->kv_v, why, sizeof(why));
	if (r) {
		snprintf(err, errlen, "kv_type_v: %s", r == 1 ?
			 "\"auto\" applies to keys only" : why);
		return -EINVAL;
	}
	co->kv_types_v = s->kv_v;
	r = kvq_kv_types_parse(ks, nl, s->kv_k, why, sizeof(why));
	if (r < 0) {
		snprintf(err, errlen, "kv_type_k: %s", why);
		return -EINVAL;
	}
	if (r == 1) {
		struct kvq_kv_calib_report rep;

		r = kvq_kv_calibrate_keys(s->m, co, s->kv_k, &rep);
		if (r) {
			snprintf(err, errlen, "kv_type_k = auto: calibration failed: %s",
				 strerror(-r));
			return r;
		}
		s->st.kv_calibrated = true;
		s->st.kv_calib_err_q8 = rep.err_q8;
		s->st.kv_calib_err_q4 = rep.err_q4;
		s->st.kv_calib_ratio = rep.ratio;
		s->st.kv_calib_kl_q8 = rep.kl_q8;
		s->st.kv_calib_kl_q4 = rep.kl_q4;
		s->st.kv_calib_seconds = rep.seconds;
	}
	if (s->o.kv_calib) {
		const struct kvq_kv_calib_report *rep = s->o.kv_calib;

		s->st.kv_calibrated = true;
		s->st.kv_calib_err_q8 = rep->err_q8;
		s->st.kv_calib_err_q4 = rep->err_q4;
		s->st.kv_calib_ratio = rep->ratio;
		s->st.kv_calib_kl_q8 = rep->kl_q8;
		s->st.kv_calib_kl_q4 = rep->kl_q4;
		s->st.kv_calib_seconds = rep->seconds;
		s->o.kv_calib = NULL;	/* not kept: the caller owns it */
	}
	co->kv_types_k = s->kv_k;
	/* The strings belong to the caller's config, which a reload frees. */
	s->o.kv_type_k = NULL;
	s->o.kv_type_v = NULL;
	types_summary(s->kv_k, nl, s->st.kv_type_k, sizeof(s->st.kv_type_k));
	types_summary(s->kv_v, nl, s->st.kv_type_v, sizeof(s->st.kv_type_v));
	return 0;
}

/* The scheduler's arrays (kvq_sched_create() and _destroy()). */
static void free_arrays(struct kvq_sched *s)
{
	free(s->pc);
	free(s->run);
	free(s->b_req);
	free(s->b_seq);
	free(s->b_n);
	free(s->b_tok);
	free(s->b_smp);
	free(s->b_id);
	free(s->logits);
}

int kvq_sched_create(struct kvq_model *m, const struct kvq_sched_opts *o,
		     struct kvq_sched **out, char *err, size_t errlen)
{
	const struct kvq_hparams *hp = kvq_model_hparams(m);
	struct kvq_ctx_opts co = { 0 };
	struct kvq_sched *s;
	int ret;

	s = calloc(1, sizeof(*s));
	if (!s) {
		snprintf(err, errlen, "scheduler: out of memory");
		return -ENOMEM;
	}
	s->m = m;
	s->tok = kvq_model_tokenizer(m);
	s->n_vocab = hp->n_vocab;
	if (o)
		s->o = *o;
	opts_fill(&s->o, hp);

	co.n_ctx = s->o.n_ctx;
	co.kv_tokens = s->o.kv_tokens;
	co.max_batch = s->o.prefill_chunk + s->o.max_running;
	/* Cached sequences need slots of their own. */
	s->pc_cap = s->o.prefix_cache ? s->o.max_running : 0;
	co.max_seqs = s->o.max_running + s->pc_cap;
	co.device = s->o.device;
	ret = kv_setup(s, &co, err, errlen);
	if (ret)
		goto out_free;
	ret = kvq_ctx_create(m, &co, &s->ctx, err, errlen);
	if (ret)
		goto out_free;
	s->kv_token_bytes = kvq_ctx_kv_bytes_per_token(s->ctx);
	s->st.kv_bytes_per_token = s->kv_token_bytes;
	s->st.kv_bytes_capacity = (uint64_t)s->o.kv_tokens * s->kv_token_bytes;
	s->st.on_gpu = kvq_ctx_device(s->ctx) == KVQ_CTX_GPU;
	s->st.device_bytes = kvq_ctx_device_bytes(s->ctx);
	snprintf(s->st.gpu_weights, sizeof(s->st.gpu_weights), "%s",
		 kvq_model_gpu_weights(m));
	snprintf(s->st.dot, sizeof(s->st.dot), "%s",
		 kvq_quant_dot_mode_name(kvq_quant_dot_mode()));
	if (s->st.on_gpu)
		snprintf(s->st.backend, sizeof(s->st.backend), "%s",
			 kvq_gpu_backend_name());
	else
		snprintf(s->st.backend, sizeof(s->st.backend), "cpu (%s)",
			 kvq_quant_simd_name());

	ret = -ENOMEM;
	s->run = calloc(s->o.max_running, sizeof(*s->run));
	s->b_req = calloc(s->o.max_running, sizeof(*s->b_req));
	s->b_seq = calloc(s->o.max_running, sizeof(*s->b_seq));
	s->b_n = calloc(s->o.max_running, sizeof(*s->b_n));
	s->b_tok = calloc(s->o.max_running, sizeof(*s->b_tok));
	s->b_smp = calloc(s->o.max_running, sizeof(*s->b_smp));
	s->b_id = calloc(s->o.max_running, sizeof(*s->b_id));
	s->pc = calloc(s->pc_cap ? s->pc_cap : 1, sizeof(*s->pc));
	if (!s->run || !s->b_req || !s->b_seq || !s->b_n || !s->b_tok ||
	    !s->b_smp || !s->b_id || !s->pc ||
	    ensure_logits(s, s->o.max_running)) {
		snprintf(err, errlen, "scheduler: out of memory");
		goto out_ctx;
	}

	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->wake, NULL);
	pthread_cond_init(&s->idle, NULL);
	ret = -pthread_create(&s->thread, NULL, sched_main, s);
	if (ret) {
		snprintf(err, errlen, "scheduler: cannot start thread: %s",
			 strerror(-ret));
		goto out_sync;
	}
	*out = s;
	return 0;

out_sync:
	pthread_cond_destroy(&s->idle);
	pthread_cond_destroy(&s->wake);
	pthread_mutex_destroy(&s->lock);
out_ctx:
	free_arrays(s);
	kvq_ctx_destroy(s->ctx);
out_free:
	free(s);
	return ret;
}

void kvq_sched_destroy(struct kvq_sched *s)
{
	if (!s)
		return;
	pthread_mutex_lock(&s->lock);
	s->stop = true;
	s->draining = true;
	pthread_cond_signal(&s->wake);
	pthread_mutex_unlock(&s->lock);
	pthread_join(s->thread, NULL);
	pthread_cond_destroy(&s->idle);
	pthread_cond_destroy(&s->wake);
	pthread_mutex_destroy(&s->lock);
	while (s->n_pc)
		pc_evict(s);
	free_arrays(s);
	kvq_ctx_destroy(s->ctx);
	free(s);
}

int kvq_sched_drain(struct kvq_sched *s, int timeout_ms)
{
	struct timespec ts;
	int ret = 0;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (ts.tv_nsec >= 1000000000) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&s->lock);
	s->draining = true;
	s->st.draining = true;
	pthread_cond_signal(&s->wake);
	while ((s->n_run || s->qhead) && !ret)
		ret = -pthread_cond_timedwait(&s->idle, &s->lock, &ts);
	if (ret && !s->n_run && !s->qhead)
		ret = 0;
	pthread_mutex_unlock(&s->lock);
	return ret;
}

const struct kvq_sched_opts *kvq_sched_opts(const struct kvq_sched *s)
{
	return &s->o;
}

struct kvq_model *kvq_sched_model(const struct kvq_sched *s)
{
	return s->m;
}

void kvq_sched_set_limits(struct kvq_sched *s, const struct kvq_sched_opts *o)
{
	pthread_mutex_lock(&s->lock);
	if (o->max_queued)
		s->o.max_queued = o->max_queued;
	if (o->max_tokens_default)
		s->o.max_tokens_default = o->max_tokens_default;
	if (o->max_tokens_limit)
		s->o.max_tokens_limit = o->max_tokens_limit;
	s->o.queue_timeout_ms = o->queue_timeout_ms;
	s->o.total_timeout_ms = o->total_timeout_ms;
	pthread_mutex_unlock(&s->lock);
}

void kvq_sched_stats(struct kvq_sched *s, struct kvq_sched_stats *out)
{
	pthread_mutex_lock(&s->lock);
	*out = s->st;
	out->running = s->n_run;
	out->waiting = s->n_queued;
	out->draining = s->draining;
	pthread_mutex_unlock(&s->lock);
}

static void info_fill(struct kvq_sched_req_info *inf, const struct sreq *r,
		      double t)
{
	inf->id = r->id;
	snprintf(inf->tag, sizeof(inf->tag), "%s", r->tag);
	inf->state = r->state;
	inf->prompt_tokens = r->n_prompt;
	inf->prefilled_tokens = r->pub_fed < r->n_prompt ? r->pub_fed :
				r->n_prompt;
	inf->generated_tokens = r->pub_gen;
	inf->max_tokens = r->max_tokens;
	inf->age_s = t - r->t_submit;
}

int kvq_sched_snapshot(struct kvq_sched *s, struct kvq_sched_req_info **out,
		       size_t *n)
{
	struct kvq_sched_req_info *v = NULL;
	struct sreq *r;
	double t = now_s();
	size_t cnt, i = 0;
	uint32_t k;

	pthread_mutex_lock(&s->lock);
	cnt = s->n_run + s->n_queued;
	if (cnt) {
		v = calloc(cnt, sizeof(*v));
		if (!v) {
			pthread_mutex_unlock(&s->lock);
			return -ENOMEM;
		}
	}
	for (k = 0; k < s->n_run && i < cnt; k++)
		info_fill(&v[i++], s->run[k], t);
	for (r = s->qhead; r && i < cnt; r = r->next)
		info_fill(&v[i++], r, t);
	pthread_mutex_unlock(&s->lock);
	*out = v;
	*n = i;
	return 0;
}
