/*
 * metrics.h - /metrics in the Prometheus text exposition format.
 *
 * Why this file exists: operators scrape kvqd like any other service.  The
 * renderer takes plain snapshots of the counters (scheduler, HTTP, tiers)
 * so it can be tested without a server and never holds a lock while
 * formatting.
 */
#ifndef KVQ_PROTO_METRICS_H
#define KVQ_PROTO_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_sched_stats;
struct kvq_http_stats;

/* Bytes per tier; a tier that does not exist on this host reports 0. */
struct kvq_tier_bytes {
	uint64_t hbm;
	uint64_t host;
	uint64_t nvme;
};

/*
 * kvq_metrics_render() - the exposition text: HELP and TYPE lines for
 * every family, then its samples.  @st is NULL while the model loads (the
 * scheduler's families are then reported as zero).  Returns a malloc'd
 * NUL-terminated string and its length in *len, or NULL.
 */
char *kvq_metrics_render(const struct kvq_sched_stats *st,
			 const struct kvq_http_stats *hs,
			 const struct kvq_tier_bytes *tb, bool ready,
			 size_t *len);

#endif /* KVQ_PROTO_METRICS_H */
