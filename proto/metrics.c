/*
 * metrics.c - formatting kvqd's counters as Prometheus text (format
 * version 0.0.4).
 *
 * Why this file exists: see metrics.h.  Histograms are cumulative on the
 * wire (le="..." buckets, +Inf equal to _count); the scheduler keeps them
 * per bucket.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/sched.h"
#include "engine/kvsmooth.h"
#include "proto/http.h"
#include "proto/metrics.h"

static void head(FILE *f, const char *name, const char *type,
		 const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void one(FILE *f, const char *name, const char *type,
		const char *help, unsigned long long v)
{
	head(f, name, type, help);
	fprintf(f, "%s %llu\n", name, v);
}

static void hist(FILE *f, const char *name, const char *help,
		 const struct kvq_sched_hist *h)
{
	unsigned long long cum = 0;
	int i;

	head(f, name, "histogram", help);
	for (i = 0; i < KVQ_SCHED_N_BUCKETS; i++) {
		cum += h ? h->count[i] : 0;
		fprintf(f, "%s_bucket{le=\"%g\"} %llu\n", name,
			kvq_sched_buckets[i], cum);
	}
	cum += h ? h->count[KVQ_SCHED_N_BUCKETS] : 0;
	fprintf(f, "%s_bucket{le=\"+Inf\"} %llu\n", name, cum);
	fprintf(f, "%s_sum %.9g\n", name, h ? h->sum : 0.0);
	fprintf(f, "%s_count %llu\n", name, cum);
}

char *kvq_metrics_render(const struct kvq_sched_stats *st,
			 const struct kvq_http_stats *hs,
			 const struct kvq_tier_bytes *tb, bool ready,
			 size_t *len)
{
	static const char *const reasons[] = {
		[KVQ_FINISH_STOP] = "stop",
		[KVQ_FINISH_LENGTH] = "length",
		[KVQ_FINISH_CANCELLED] = "cancelled",
		[KVQ_FINISH_TIMEOUT] = "timeout",
		[KVQ_FINISH_ERROR] = "error",
	};
	struct kvq_sched_stats z;
	char *buf = NULL;
	size_t n = 0;
	FILE *f;
	int i;

	if (!st) {
		memset(&z, 0, sizeof(z));
		st = &z;
	}
	f = open_memstream(&buf, &n);
	if (!f)
		return NULL;

	one(f, "kvqd_ready", "gauge",
	    "1 when the model is loaded and requests are served.", ready);
	one(f, "kvqd_requests_running", "gauge",
	    "Requests in the running batch.", st->running);
	one(f, "kvqd_requests_waiting", "gauge",
	    "Requests queued for the running batch.", st->waiting);
	one(f, "kvqd_requests_total", "counter",
	    "Requests accepted by the scheduler.", st->requests_total);
	one(f, "kvqd_requests_rejected_total", "counter",
	    "Requests refused because the queue was full or kvqd was "
	    "draining.", st->requests_rejected);
	head(f, "kvqd_requests_finished_total", "counter",
	     "Requests finished, by reason.");
	for (i = KVQ_FINISH_STOP; i <= KVQ_FINISH_ERROR; i++)
		fprintf(f, "kvqd_requests_finished_total{reason=\"%s\"} %llu\n",
			reasons[i],
			(unsigned long long)st->requests_finished[i]);
	one(f, "kvqd_tokens_prompt_total", "counter",
	    "Prompt tokens of accepted requests.", st->tokens_prompt_total);
	one(f, "kvqd_tokens_generated_total", "counter",
	    "Tokens generated.", st->tokens_generated_total);
	one(f, "kvqd_tokens_sampled_gpu_total", "counter",
	    "Generated tokens chosen by the GPU sampler (on a GPU: all but steps of fewer than 4 sequences that all use a top-k of at most 64).",
	    st->tokens_sampled_device);
	one(f, "kvqd_prompt_tokens_cached_total", "counter",
	    "Prompt tokens shared from the prefix cache instead of computed.",
	    st->prompt_tokens_cached);
	one(f, "kvqd_prefix_cache_sequences", "gauge",
	    "Finished sequences whose KV the prefix cache keeps.",
	    st->cached_seqs);
	one(f, "kvqd_engine_steps_total", "counter",
	    "Forward passes run by the scheduler.", st->steps_total);
	head(f, "kvqd_engine_step_seconds_total", "counter",
	     "Wall time of the forward passes (sampling and copies included).");
	fprintf(f, "kvqd_engine_step_seconds_total %.9g\n", st->step_seconds);
	head(f, "kvqd_gpu_busy_seconds_total", "counter",
	     "Device time of the forward passes, each from its first upload to its last copy back (0 on the CPU); against kvqd_engine_step_seconds_total, the share the host's work between steps leaves idle.");
	fprintf(f, "kvqd_gpu_busy_seconds_total %.9g\n", st->device_seconds);
	hist(f, "kvqd_ttft_seconds",
	     "Time from accepting a request to its first generated token.",
	     &st->ttft);
	hist(f, "kvqd_inter_token_seconds",
	     "Time between consecutive generated tokens of a request.",
	     &st->itl);
	one(f, "kvqd_kv_bytes_used", "gauge",
	    "Bytes of KV cache holding tokens of live sequences.",
	    st->kv_bytes_used);
	one(f, "kvqd_kv_bytes_capacity", "gauge",
	    "Bytes of KV cache configured.", st->kv_bytes_capacity);
	one(f, "kvqd_kv_bytes_per_token", "gauge",
	    "KV cache bytes one token takes over all layers (data and scales).",
	    st->kv_bytes_per_token);
	head(f, "kvqd_kv_format_info", "gauge",
	     "Precision of the KV cache (1 for the configuration in use).");
	fprintf(f, "kvqd_kv_format_info{k=\"%s\",v=\"%s\",calibrated=\"%s\"} 1\n",
		st->kv_type_k[0] ? st->kv_type_k : "none",
		st->kv_type_v[0] ? st->kv_type_v : "none",
		st->kv_calibrated ? "yes" : "no");
	if (st->kv_calibrated) {
		head(f, "kvqd_kv_calibration_error", "gauge",
		     "Key calibration: max logit error over the logits' std, by key bits.");
		fprintf(f, "kvqd_kv_calibration_error{bits=\"8\"} %.6g\n",
			st->kv_calib_err_q8);
		fprintf(f, "kvqd_kv_calibration_error{bits=\"4\"} %.6g\n",
			st->kv_calib_err_q4);
		head(f, "kvqd_kv_calibration_kl", "gauge",
		     "Key calibration: KL divergence of the next-token distribution from f16 keys, by key bits.");
		fprintf(f, "kvqd_kv_calibration_kl{bits=\"8\"} %.6g\n",
			st->kv_calib_kl_q8);
		fprintf(f, "kvqd_kv_calibration_kl{bits=\"4\"} %.6g\n",
			st->kv_calib_kl_q4);
		head(f, "kvqd_kv_calibration_seconds", "gauge",
		     "Time the key calibration took at start-up.");
		fprintf(f, "kvqd_kv_calibration_seconds %.6f\n",
			st->kv_calib_seconds);
	}
	{
		struct kvq_kv_smooth_report sr;

		if (kvq_kv_smooth_last(NULL, &sr)) {
			head(f, "kvqd_kv_smoothing_info", "gauge",
			     "Key/value smoothing folded into the weights at load (1 for the state in use).");
			fprintf(f, "kvqd_kv_smoothing_info{mode=\"%s\",state=\"%s\",rotated=\"%s\",centred=\"%s\"} 1\n",
				kvq_kv_smooth_mode_name(sr.mode), sr.state,
				sr.rotated ? "yes" : "no",
				sr.centred ? "yes" : "no");
			head(f, "kvqd_kv_smoothing_error", "gauge",
			     "Predicted relative error of the quantized KV cache on the calibration prompts, before and after smoothing.");
			fprintf(f, "kvqd_kv_smoothing_error{half=\"k\",when=\"before\"} %.6g\n",
				sr.k_err_before);
			fprintf(f, "kvqd_kv_smoothing_error{half=\"k\",when=\"after\"} %.6g\n",
				sr.k_err_after);
			fprintf(f, "kvqd_kv_smoothing_error{half=\"v\",when=\"before\"} %.6g\n",
				sr.v_err_before);
			fprintf(f, "kvqd_kv_smoothing_error{half=\"v\",when=\"after\"} %.6g\n",
				sr.v_err_after);
			head(f, "kvqd_kv_smoothing_seconds", "gauge",
			     "Time the smoothing took at start-up.");
			fprintf(f, "kvqd_kv_smoothing_seconds %.6f\n",
				sr.seconds);
		}
	}
	head(f, "kvqd_backend_info", "gauge",
	     "Where forward passes and attention run (1 for the one in use).");
	fprintf(f, "kvqd_backend_info{device=\"%s\"} 1\n",
		st->backend[0] ? st->backend : "none");
	head(f, "kvqd_dot_products_info", "gauge",
	     "How products of 8- and 4-bit weights treat their input (1 for the mode in use): exact, or int8 (KVQ_DOT=int8: x quantized per 32 columns; on the CPU for steps of up to 8 tokens, on the GPU for one-token gate/up products and steps of 2-8 tokens).");
	fprintf(f, "kvqd_dot_products_info{mode=\"%s\"} 1\n",
		st->dot[0] ? st->dot : "exact");
	head(f, "kvqd_gpu_fallback", "gauge",
	     "1 when the GPU stopped using CUDA graphs after a failure (kvqctl status says why).");
	fprintf(f, "kvqd_gpu_fallback %d\n", st->gpu_fallback[0] ? 1 : 0);
	head(f, "kvqd_gpu_weights_kquant_compact", "gauge",
	     "1 when Q4_K and Q6_K weights sit on the GPU 4- and 8-bit (KVQ_GPU_WEIGHTS=compact, or f16 would not fit: kvqctl status says which).");
	fprintf(f, "kvqd_gpu_weights_kquant_compact %d\n",
		strstr(st->gpu_weights, "Q4_K kept") ? 1 : 0);
	head(f, "kvqd_tier_bytes", "gauge",
	     "Bytes of weights and KV cache resident in each memory tier.");
	fprintf(f, "kvqd_tier_bytes{tier=\"hbm\"} %llu\n",
		(unsigned long long)(tb ? tb->hbm : 0));
	fprintf(f, "kvqd_tier_bytes{tier=\"host\"} %llu\n",
		(unsigned long long)(tb ? tb->host : 0));
	fprintf(f, "kvqd_tier_bytes{tier=\"nvme\"} %llu\n",
		(unsigned long long)(tb ? tb->nvme : 0));
	if (hs) {
		head(f, "kvqd_http_requests_total", "counter",
		     "HTTP requests answered, by status class.");
		for (i = 1; i <= 5; i++)
			fprintf(f, "kvqd_http_requests_total{code=\"%dxx\"} "
				"%llu\n", i,
				(unsigned long long)hs->by_status[i]);
		one(f, "kvqd_http_streams", "gauge",
		    "Streaming responses in progress.", hs->streams);
	}
	if (fclose(f)) {
		free(buf);
		return NULL;
	}
	*len = n;
	return buf;
}
