/*
 * sched.h - the request scheduler: continuous batching over one engine
 * context.
 *
 * Why this file exists: many clients share one model.  A scheduler thread
 * owns the engine context (struct kvq_ctx) and, step after step, admits
 * queued requests, builds one batch mixing prefill chunks and one decode
 * token per running sequence, runs the forward pass, samples each sequence
 * with its own sampler, detokenizes, applies stop strings and delivers the
 * results to each request's sink.  Requests join and leave between steps.
 *
 * Threads: kvq_sched_submit(), kvq_sched_cancel(), the getters,
 * kvq_sched_set_step_cb() and kvq_sched_drain() may be called from any
 * thread.  Sinks are called on the
 * scheduler thread and must not block; they copy what they need.
 *
 * Request states (struct kvq_sched_req_info.state):
 *   QUEUED   --admit-->   PREFILL  --last prompt chunk stepped-->  DECODE
 *   DECODE   --EOS, stop string, max_tokens, n_ctx-->  FINISHED
 *   any      --kvq_sched_cancel(), timeout, engine error-->  FINISHED
 * Invariants:
 *   1. A request's sink gets exactly one final event (KVQ_SCHED_EV_DONE);
 *      after it the sink is never called again for that request.
 *   2. A request's KV sequence exists only in PREFILL and DECODE; it is
 *      freed in the same scheduler iteration that finishes the request.
 *   3. A request's tokens depend only on its prompt, its sampling settings
 *      and its seed -- never on which other requests share its steps.
 */
#ifndef KVQ_SCHED_H
#define KVQ_SCHED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/sampler.h"

struct kvq_model;
struct kvq_sched;

/* Limits; a zero field takes the default shown (timeouts: none). */
struct kvq_kv_calib_report;

struct kvq_sched_opts {
	uint32_t max_running;		/* sequences in the batch (16) */
	uint32_t max_queued;		/* waiting beyond those (64) */
	uint32_t max_tokens_default;	/* when a request gives none (256) */
	uint32_t max_tokens_limit;	/* largest max_tokens accepted (4096) */
	uint32_t prefill_chunk;		/* prompt tokens per sequence per step (256) */
	uint32_t n_ctx;			/* tokens per sequence (model's, capped 4096) */
	uint32_t kv_tokens;		/* KV capacity over all sequences (n_ctx * max_running) */
	uint32_t queue_timeout_ms;	/* longest wait in the queue (0: none) */
	uint32_t total_timeout_ms;	/* longest life of a request (0: none) */
	int n_threads;			/* unused by the scheduler; for the engine */
	/* KV cache precision: "f32", "f16", "q8", "q4", a comma-separated
	 * list with one per layer, or (keys) "auto" to calibrate at start-up.
	 * NULL: keys q8, values q4. */
	const char *kv_type_k;
	const char *kv_type_v;
	uint32_t kv_page_tokens;	/* 0: 16 */
	uint32_t kv_sink_tokens;	/* f16 sink tokens (default 4 via conf) */
	/* When kv_type_k is a per-layer list that calibration chose (the
	 * daemon calibrates while loading), its report, for the stats. */
	const struct kvq_kv_calib_report *kv_calib;
	int device;			/* enum kvq_ctx_device: where steps run */
	bool prefix_cache;		/* share finished requests' prompt KV */
};

/* ------------------------------------------------------------- requests */

#define KVQ_SCHED_MAX_STOP 4
#define KVQ_SCHED_MAX_TOP 5
#define KVQ_SCHED_MAX_EOG 4

/* What to generate.  Everything is copied by kvq_sched_submit(). */
struct kvq_sched_req {
	const int32_t *prompt;		/* token ids, BOS included if wanted */
	int n_prompt;			/* >= 1 */
	int max_tokens;			/* <= 0: the default */
	struct kvq_sampler_params sp;
	const char *const *stop;	/* up to KVQ_SCHED_MAX_STOP strings */
	int n_stop;
	int logprobs;			/* -1: none; 0..5: chosen + N alternatives */
	bool prompt_logprobs;		/* also the prompt's tokens (echo) */
	bool ignore_eos;
	const int32_t *eog;		/* more end-of-generation ids (chat turn end) */
	int n_eog;			/* up to KVQ_SCHED_MAX_EOG */
	const char *tag;		/* client label shown in snapshots (copied, may be NULL) */
};

enum kvq_finish {
	KVQ_FINISH_NONE = 0,
	KVQ_FINISH_STOP,		/* EOS or a stop string */
	KVQ_FINISH_LENGTH,		/* max_tokens or the context is full */
	KVQ_FINISH_CANCELLED,		/* kvq_sched_cancel() */
	KVQ_FINISH_TIMEOUT,		/* queue or total timeout */
	KVQ_FINISH_ERROR,		/* engine failure; see err/errmsg */
};

/* "stop", "length", or NULL for the others (OpenAI has no name for them). */
const char *kvq_finish_name(enum kvq_finish f);

struct kvq_sched_alt {
	int32_t id;
	float logprob;
};

/* One token, for logprobs. */
struct kvq_sched_tok {
	int32_t id;
	float logprob;			/* NAN for the first prompt token */
	int n_top;
	struct kvq_sched_alt top[KVQ_SCHED_MAX_TOP];
};

struct kvq_sched_usage {
	int prompt_tokens;
	int completion_tokens;
	int cached_tokens;
};

enum kvq_sched_ev_kind {
	KVQ_SCHED_EV_PROMPT = 1,	/* prompt token logprobs (once, if asked) */
	KVQ_SCHED_EV_TEXT,		/* new text and the tokens behind it */
	KVQ_SCHED_EV_DONE,		/* final: finish reason, usage, last text */
};

/*
 * One event.  Pointers are valid only during the sink call.  For TEXT and
 * DONE, @text holds the bytes released since the previous event: complete
 * UTF-8 only, with any tail that may begin a stop string held back, and
 * cut at a stop string (which is not included).  @tok lists the tokens
 * sampled since the previous event when logprobs were asked (their pieces
 * may not line up with @text byte for byte).  DONE carries @finish,
 * @usage, and for KVQ_FINISH_ERROR @err (-errno) and @errmsg.
 */
struct kvq_sched_event {
	enum kvq_sched_ev_kind kind;
	uint64_t req_id;
	const char *text;
	size_t len;
	const struct kvq_sched_tok *tok;
	int n_tok;
	enum kvq_finish finish;
	struct kvq_sched_usage usage;
	int err;
	const char *errmsg;
	double ttft_s;			/* DONE: submit to first token, < 0 if none */
};

struct kvq_sched_sink {
	void (*event)(void *arg, const struct kvq_sched_event *ev);
	void *arg;
};

/* ------------------------------------------------------------- lifecycle */

/*
 * kvq_sched_create() - make the engine context for @m with @o's limits and
 * start the scheduler thread.  @m must outlive the scheduler.  Returns 0
 * and stores the scheduler in *out, or -errno with a one-line message in
 * @err; nothing is left running on failure.
 */
int kvq_sched_create(struct kvq_model *m, const struct kvq_sched_opts *o,
		     struct kvq_sched **out, char *err, size_t errlen);

/*
 * kvq_sched_destroy() - cancel everything still queued or running (each
 * sink gets its DONE with KVQ_FINISH_CANCELLED), stop the thread, free the
 * context.  NULL is a no-op.
 */
void kvq_sched_destroy(struct kvq_sched *s);

/*
 * kvq_sched_drain() - stop admitting (new submits get -ESHUTDOWN; queued
 * requests are still run) and wait up to @timeout_ms for every request to
 * finish.  Returns 0 when idle, -ETIMEDOUT otherwise (the caller then
 * destroys, which cancels what is left).  Draining cannot be undone.
 */
int kvq_sched_drain(struct kvq_sched *s, int timeout_ms);

/* The limits in force (defaults filled in). */
const struct kvq_sched_opts *kvq_sched_opts(const struct kvq_sched *s);
struct kvq_model *kvq_sched_model(const struct kvq_sched *s);

/*
 * kvq_sched_set_limits() - change max_queued, max_tokens_default,
 * max_tokens_limit (zero: keep) and the timeouts (zero: none) live
 * (SIGHUP); other fields of @o are ignored.  Requests already admitted keep
 * their max_tokens.
 */
void kvq_sched_set_limits(struct kvq_sched *s, const struct kvq_sched_opts *o);

/*
 * kvq_sched_set_step_cb() - have @fn(@arg) called on the scheduler thread
 * after each engine step, once the step's events have been passed to the
 * sinks (its final events excepted: they may come later), so that sinks
 * may hold events and pass them on in one go.  @fn must not call back into
 * the scheduler.  NULL removes it; once this returns, the previous @fn is
 * not running and will not be called again.
 */
void kvq_sched_set_step_cb(struct kvq_sched *s, void (*fn)(void *arg),
			   void *arg);

/* ------------------------------------------------------------- requests */

/*
 * kvq_sched_submit() - queue @r; events go to @sink until its DONE.
 * Returns 0 and stores the request's id in *id, or without calling the sink:
 *   -EINVAL     bad field (no prompt, bad token id, bad sampler values)
 *   -E2BIG      prompt + max_tokens do not fit in n_ctx, or max_tokens >
 *               max_tokens_limit
 *   -EAGAIN     the queue is full (HTTP 429)
 *   -ESHUTDOWN  draining or stopped (HTTP 503)
 *   -ENOMEM
 * @r's max_tokens may be filled in by the scheduler: pass it in *r_max (may
 * be NULL) to learn the value used.
 */
int kvq_sched_submit(struct kvq_sched *s, const struct kvq_sched_req *r,
		     const struct kvq_sched_sink *sink, uint64_t *id,
		     int *r_max);

/*
 * kvq_sched_cancel() - finish request @id with KVQ_FINISH_CANCELLED and
 * free its KV before the next step.  Unknown or finished ids are ignored.
 * The sink may still be called (ending with DONE) from the scheduler thread
 * after this returns.
 */
void kvq_sched_cancel(struct kvq_sched *s, uint64_t id);

/* ------------------------------------------------------------- metrics */

/* Histogram bucket upper bounds, in seconds (+Inf is implicit). */
#define KVQ_SCHED_N_BUCKETS 12
extern const double kvq_sched_buckets[KVQ_SCHED_N_BUCKETS];

struct kvq_sched_hist {
	uint64_t count[KVQ_SCHED_N_BUCKETS + 1];	/* non-cumulative; last is +Inf */
	uint64_t n;
	double sum;
};

struct kvq_sched_stats {
	uint32_t running;
	uint32_t waiting;
	uint64_t requests_total;	/* admitted to the queue */
	uint64_t requests_rejected;	/* refused by submit (queue full, draining) */
	uint64_t requests_finished[KVQ_FINISH_ERROR + 1];	/* by finish reason */
	uint64_t tokens_prompt_total;
	uint64_t tokens_generated_total;
	uint64_t tokens_sampled_device;	/* of those, chosen on the GPU */
	uint64_t steps_total;
	double step_seconds;	/* wall time of the forward passes */
	/* device time of them (GPU: from each step's first upload to its
	 * last copy back; 0 on the CPU) */
	double device_seconds;
	uint64_t kv_bytes_used;
	uint64_t kv_bytes_capacity;
	uint64_t kv_bytes_per_token;	/* the format's arithmetic */
	char kv_type_k[48];		/* "q8", or "mixed: 10 q4, 2 q8, 0 f16" */
	char kv_type_v[48];
	bool kv_calibrated;		/* keys chosen by calibration */
	double kv_calib_err_q8;		/* its measurements (kvcalib.h) */
	double kv_calib_err_q4;
	double kv_calib_ratio;
	double kv_calib_kl_q8;		/* KL of the next-token distribution */
	double kv_calib_kl_q4;
	double kv_calib_seconds;
	char backend[64];		/* "cpu (avx2+fma)": where steps run */
	char dot[16];			/* kvq_quant_dot_mode_name() at start */
	bool on_gpu;			/* weights and KV pages in device memory */
	char gpu_fallback[192];		/* kvq_ctx_fallback(), or "" */
	char gpu_weights[384];		/* kvq_model_gpu_weights(), or "" */
	uint64_t prompt_tokens_cached;	/* prompt tokens served from the prefix cache */
	uint32_t cached_seqs;		/* finished sequences kept for sharing */
	uint64_t device_bytes;		/* of the context: KV pages, activations */
	struct kvq_sched_hist ttft;
	struct kvq_sched_hist itl;	/* inter-token latency */
	bool draining;
};

/* A consistent copy of the counters. */
void kvq_sched_stats(struct kvq_sched *s, struct kvq_sched_stats *out);

enum kvq_sched_state {
	KVQ_SCHED_QUEUED = 0,
	KVQ_SCHED_PREFILL,
	KVQ_SCHED_DECODE,
	KVQ_SCHED_FINISHED,
};
/* "queued", "prefill", "decode", "finished". */
const char *kvq_sched_state_name(enum kvq_sched_state st);

struct kvq_sched_req_info {
	uint64_t id;
	char tag[48];
	enum kvq_sched_state state;
	int prompt_tokens;
	int prefilled_tokens;
	int generated_tokens;
	int max_tokens;
	double age_s;
};

/*
 * kvq_sched_snapshot() - every queued and running request.  Stores a
 * malloc'd array in *out (caller frees; NULL when empty) and its length in
 * *n.  Returns 0 or -ENOMEM (*out, *n unchanged).
 */
int kvq_sched_snapshot(struct kvq_sched *s, struct kvq_sched_req_info **out,
		       size_t *n);

#endif /* KVQ_SCHED_H */
