/*
 * fisher.c - check a Fisher sidecar against its model and rank the model's
 * tensors by Fisher density (see fisher.h for the format and the rules).
 *
 * Why this file exists: the sidecar is the one input that decides where
 * every weight lives, and it is made by separate tools, possibly for another
 * model.  So it is matched against the model name by name and shape, every
 * value is checked, and only then are traces, densities and ranks computed
 * once, into an immutable table the daemon, the one-shot --ranks mode and
 * the admin interface read.
 *
 * The sidecar's fim.model.fingerprint (a sha256 of the model's tensor names
 * and shapes written by the Python tools) is not recomputed here: the names,
 * the shapes and fim.model.tensor_count are compared directly, which checks
 * the same facts and names the tensor at fault.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/fisher.h"
#include "engine/gguf.h"
#include "engine/model.h"

struct kvq_fisher {
	struct kvq_fisher_meta meta;
	size_t n;
	struct kvq_fisher_entry *e;	/* model file order */
	uint32_t *by_rank;		/* by_rank[r - 1]: index into e */
	char *path;
	char *dataset;
	char *model_name;
	char *names;			/* the entries' names, NUL-separated */
};

static const char *const source_names[] = {
	[KVQ_FISHER_SRC_ADAM] = "adam_exp_avg_sq",
	[KVQ_FISHER_SRC_CALIBRATION] = "calibration",
	[KVQ_FISHER_SRC_JSON] = "json_scores",
	[KVQ_FISHER_SRC_FALLBACK] = "fallback",
};

const char *kvq_fisher_source_name(enum kvq_fisher_source s)
{
	if ((unsigned)s >= sizeof(source_names) / sizeof(source_names[0]) ||
	    !source_names[s])
		return "unknown";
	return source_names[s];
}

__attribute__((format(printf, 4, 5)))
static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
	va_list ap;

	if (err && errlen) {
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return rc;
}

int kvq_fisher_default_path(const char *model_path, char *buf, size_t len)
{
	size_t n = strlen(model_path);
	int w;

	if (n >= 5 && !strcmp(model_path + n - 5, ".gguf"))
		n -= 5;
	if (n > INT32_MAX)
		goto too_long;
	w = snprintf(buf, len, "%.*s.fim.gguf", (int)n, model_path);
	if (w < 0 || (size_t)w >= len)
		goto too_long;
	return 0;
too_long:
	if (len)
		buf[0] = '\0';
	return -ENAMETOOLONG;
}

/* "[256, 512]" */
static void fmt_shape(char *buf, size_t len, const uint64_t *ne, uint32_t nd)
{
	size_t at = 0;
	uint32_t d;

	buf[0] = '\0';
	for (d = 0; d < nd && at < len; d++)
		at += snprintf(buf + at, len - at, "%s%" PRIu64, d ? ", " : "[",
			       ne[d]);
	if (at < len)
		snprintf(buf + at, len - at, nd ? "]" : "[]");
}

/* N of "blk.N.rest", with *rest pointing after the dot; -1 otherwise. */
static int32_t layer_of(const char *name, const char **rest)
{
	unsigned long l;
	char *end;

	*rest = name;
	if (strncmp(name, "blk.", 4) || name[4] < '0' || name[4] > '9')
		return -1;
	errno = 0;
	l = strtoul(name + 4, &end, 10);
	if (errno || *end != '.' || l > INT32_MAX)
		return -1;
	*rest = end + 1;
	return (int32_t)l;
}

/* Allocates the table and fills what does not depend on the sidecar. */
static int fisher_alloc(const struct kvq_gguf *model, struct kvq_fisher **out)
{
	struct kvq_fisher *f;
	size_t i, name_bytes = 0;
	char *p;

	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->n = model->n_tensors;
	for (i = 0; i < f->n; i++)
		name_bytes += strlen(model->tensors[i].name) + 1;
	f->e = calloc(f->n ? f->n : 1, sizeof(*f->e));
	f->by_rank = calloc(f->n ? f->n : 1, sizeof(*f->by_rank));
	f->names = malloc(name_bytes ? name_bytes : 1);
	if (!f->e || !f->by_rank || !f->names) {
		kvq_fisher_destroy(f);
		return -ENOMEM;
	}
	p = f->names;
	for (i = 0; i < f->n; i++) {
		const struct kvq_gguf_tensor *t = &model->tensors[i];
		struct kvq_fisher_entry *e = &f->e[i];
		const char *rest;
		size_t len = strlen(t->name) + 1;

		memcpy(p, t->name, len);
		e->name = p;
		p += len;
		e->type = kvq_type_name(t->type);
		e->index = (uint32_t)i;
		e->layer = layer_of(t->name, &rest);
		e->n_elements = t->n_elements;
		e->bytes = t->nbytes;
		f->by_rank[i] = (uint32_t)i;
	}
	f->meta.dataset = "";
	f->meta.model_name = "";
	*out = f;
	return 0;
}

void kvq_fisher_destroy(struct kvq_fisher *f)
{
	if (!f)
		return;
	free(f->e);
	free(f->by_rank);
	free(f->names);
	free(f->path);
	free(f->dataset);
	free(f->model_name);
	free(f);
}

/* ------------------------------------------------------------ ranking */

static int cmp_density(const void *a, const void *b, void *arg)
{
	const struct kvq_fisher_entry *e = arg;
	const struct kvq_fisher_entry *x = &e[*(const uint32_t *)a];
	const struct kvq_fisher_entry *y = &e[*(const uint32_t *)b];

	if (x->density != y->density)
		return x->density > y->density ? -1 : 1;
	if (x->bytes != y->bytes)
		return x->bytes < y->bytes ? -1 : 1;
	return x->index < y->index ? -1 : x->index > y->index;
}

/* Fallback sort key: steps 1-3 of the rule in fisher.h. */
struct fallback_key {
	uint32_t group;		/* 0 outside the blocks, 1 inside */
	uint32_t dist;		/* from the nearer end of the stack */
	uint32_t layer;
	uint32_t role;		/* 0 attention, 1 FFN, 2 other */
};

static struct fallback_key fallback_key(const struct kvq_fisher_entry *e,
					int32_t n_layers)
{
	struct fallback_key k = { 0 };
	const char *rest;

	if (layer_of(e->name, &rest) < 0)
		return k;
	k.group = 1;
	k.layer = (uint32_t)e->layer;
	k.dist = (uint32_t)(e->layer < n_layers - 1 - e->layer ?
			    e->layer : n_layers - 1 - e->layer);
	if (!strncmp(rest, "attn", 4))
		k.role = 0;
	else if (!strncmp(rest, "ffn", 3))
		k.role = 1;
	else
		k.role = 2;
	return k;
}

struct fallback_sort {
	const struct kvq_fisher_entry *e;
	int32_t n_layers;
};

static int cmp_fallback(const void *a, const void *b, void *arg)
{
	const struct fallback_sort *s = arg;
	const struct kvq_fisher_entry *x = &s->e[*(const uint32_t *)a];
	const struct kvq_fisher_entry *y = &s->e[*(const uint32_t *)b];
	struct fallback_key kx = fallback_key(x, s->n_layers);
	struct fallback_key ky = fallback_key(y, s->n_layers);

	if (kx.group != ky.group)
		return kx.group < ky.group ? -1 : 1;
	if (kx.dist != ky.dist)
		return kx.dist < ky.dist ? -1 : 1;
	if (kx.layer != ky.layer)
		return kx.layer < ky.layer ? -1 : 1;
	if (kx.role != ky.role)
		return kx.role < ky.role ? -1 : 1;
	if (x->bytes != y->bytes)
		return x->bytes < y->bytes ? -1 : 1;
	return x->index < y->index ? -1 : x->index > y->index;
}

static void assign_ranks(struct kvq_fisher *f)
{
	size_t r;

	for (r = 0; r < f->n; r++)
		f->e[f->by_rank[r]].rank = (uint32_t)(r + 1);
}

static void rank_by_density(struct kvq_fisher *f)
{
	size_t i;

	for (i = 0; i < f->n; i++)
		f->e[i].score = f->e[i].density;
	qsort_r(f->by_rank, f->n, sizeof(*f->by_rank), cmp_density, f->e);
	assign_ranks(f);
}

static void rank_by_fallback(struct kvq_fisher *f)
{
	struct fallback_sort s = { .e = f->e, .n_layers = 0 };
	size_t i;

	for (i = 0; i < f->n; i++)
		if (f->e[i].layer >= s.n_layers)
			s.n_layers = f->e[i].layer + 1;
	qsort_r(f->by_rank, f->n, sizeof(*f->by_rank), cmp_fallback, &s);
	assign_ranks(f);
	for (i = 0; i < f->n; i++)
		f->e[i].score = (double)(f->n - f->e[i].rank + 1) /
				(double)f->n;
}

int kvq_fisher_fallback(const struct kvq_gguf *model, struct kvq_fisher **out,
			char *err, size_t errlen)
{
	struct kvq_fisher *f;
	int rc;

	rc = fisher_alloc(model, &f);
	if (rc)
		return fail(err, errlen, rc, "%s: out of memory", model->path);
	f->meta.source = KVQ_FISHER_SRC_FALLBACK;
	rank_by_fallback(f);
	*out = f;
	return 0;
}

/* ------------------------------------------------------------ sidecar */

/* A copy of string key @key, "" when absent; -EINVAL when not a string. */
static int meta_str(const struct kvq_gguf *g, const char *key, char **out,
		    char *err, size_t errlen)
{
	const char *s;
	uint64_t len;
	int rc;

	rc = kvq_gguf_get_str(g, key, &s, &len);
	if (rc == -ENOENT) {
		s = "";
		len = 0;
	} else if (rc) {
		return fail(err, errlen, -EINVAL, "%s: key %s is not a string",
			    g->path, key);
	}
	*out = strndup(s, (size_t)len);
	if (!*out)
		return fail(err, errlen, -ENOMEM, "%s: out of memory", g->path);
	return 0;
}

/* Unsigned key @key into *out (left alone when absent). */
static int meta_u64(const struct kvq_gguf *g, const char *key, uint64_t *out,
		    char *err, size_t errlen)
{
	int rc = kvq_gguf_get_u64(g, key, out);

	if (rc && rc != -ENOENT)
		return fail(err, errlen, -EINVAL,
			    "%s: key %s is not a non-negative integer",
			    g->path, key);
	return 0;
}

static int read_meta(struct kvq_fisher *f, const struct kvq_gguf *sc,
		     uint64_t *tensor_count, char *err, size_t errlen)
{
	const char *s;
	uint64_t len, version = KVQ_FISHER_VERSION;
	int rc, i;

	if (kvq_gguf_get_str(sc, "general.type", &s, &len) || len != 3 ||
	    memcmp(s, "fim", 3))
		return fail(err, errlen, -EINVAL,
			    "%s: not a Fisher sidecar (general.type is not \"fim\")",
			    sc->path);
	if (kvq_gguf_get_str(sc, "fim.source", &s, &len))
		return fail(err, errlen, -EINVAL,
			    "%s: key fim.source is missing or not a string",
			    sc->path);
	for (i = KVQ_FISHER_SRC_ADAM; i < KVQ_FISHER_SRC_FALLBACK; i++)
		if (strlen(source_names[i]) == len &&
		    !memcmp(source_names[i], s, len))
			f->meta.source = i;
	if (!f->meta.source)
		return fail(err, errlen, -EINVAL,
			    "%s: fim.source \"%.*s\" is not adam_exp_avg_sq, calibration or json_scores",
			    sc->path, len > 64 ? 64 : (int)len, s);
	rc = meta_u64(sc, "fim.version", &version, err, errlen);
	if (rc)
		return rc;
	if (version > KVQ_FISHER_VERSION)
		return fail(err, errlen, -ENOTSUP,
			    "%s: fim.version %" PRIu64 " is newer than this kvqd reads (%d)",
			    sc->path, version, KVQ_FISHER_VERSION);
	rc = meta_u64(sc, "fim.token_count", &f->meta.token_count, err, errlen);
	if (!rc)
		rc = meta_u64(sc, "fim.step_count", &f->meta.step_count, err,
			      errlen);
	if (!rc)
		rc = meta_u64(sc, "fim.model.tensor_count", tensor_count, err,
			      errlen);
	if (!rc)
		rc = meta_str(sc, "fim.dataset", &f->dataset, err, errlen);
	if (!rc)
		rc = meta_str(sc, "fim.model.name", &f->model_name, err,
			      errlen);
	if (rc)
		return rc;
	f->meta.dataset = f->dataset;
	f->meta.model_name = f->model_name;
	return 0;
}

/* " (the sidecar was written for \"NAME\")" when the names differ. */
static void other_model_hint(const struct kvq_fisher *f,
			     const struct kvq_gguf *model, char *buf,
			     size_t len)
{
	const char *s;
	uint64_t n;

	buf[0] = '\0';
	if (!f->model_name || !f->model_name[0])
		return;
	if (!kvq_gguf_get_str(model, "general.name", &s, &n) &&
	    strlen(f->model_name) == n && !memcmp(f->model_name, s, n))
		return;
	snprintf(buf, len, " (the sidecar was written for \"%.64s\")",
		 f->model_name);
}

/* Full layout: the model tensor's shape.  Rows: the shape without ne[0]. */
static int match_layout(const struct kvq_gguf_tensor *mt,
			const struct kvq_gguf_tensor *st, bool *rows)
{
	uint32_t d;

	if (st->n_dims == mt->n_dims) {
		for (d = 0; d < mt->n_dims; d++)
			if (st->ne[d] != mt->ne[d])
				return -EINVAL;
		*rows = false;
		return 0;
	}
	if (mt->n_dims >= 2 && st->n_dims == mt->n_dims - 1) {
		for (d = 0; d < st->n_dims; d++)
			if (st->ne[d] != mt->ne[d + 1])
				return -EINVAL;
		*rows = true;
		return 0;
	}
	return -EINVAL;
}

/* Checks one sidecar tensor's values and sums them into e->trace. */
static int sum_values(struct kvq_fisher_entry *e,
		      const struct kvq_gguf_tensor *st, const char *path,
		      char *err, size_t errlen)
{
	const unsigned char *p = st->data;
	double sum = 0.0;
	uint64_t i;

	for (i = 0; i < st->n_elements; i++) {
		float v;

		memcpy(&v, p + i * sizeof(v), sizeof(v));
		if (!(v >= 0.0f) || isinf(v))
			return fail(err, errlen, -EINVAL,
				    "%s: tensor %s: %s %" PRIu64 " is %g; E[g^2] must be finite and non-negative",
				    path, e->name, e->rows ? "row" : "element",
				    i, (double)v);
		sum += v;
	}
	e->trace = sum;
	e->density = sum / (double)e->bytes;
	return 0;
}

static int check_tensors(struct kvq_fisher *f, const struct kvq_gguf *model,
			 const struct kvq_gguf *sc, uint64_t tensor_count,
			 char *err, size_t errlen)
{
	char hint[128], have[96], full[96], rows[96];
	uint64_t i;
	int rc;

	other_model_hint(f, model, hint, sizeof(hint));
	for (i = 0; i < model->n_tensors; i++) {
		const struct kvq_gguf_tensor *mt = &model->tensors[i];
		const struct kvq_gguf_tensor *st;
		struct kvq_fisher_entry *e = &f->e[i];

		st = kvq_gguf_tensor(sc, mt->name);
		if (!st)
			return fail(err, errlen, -EINVAL,
				    "%s: tensor %s of the model %s is missing%s",
				    sc->path, mt->name, model->path, hint);
		if (st->type != KVQ_TYPE_F32)
			return fail(err, errlen, -EINVAL,
				    "%s: tensor %s is %s; sidecar tensors are F32",
				    sc->path, mt->name,
				    kvq_type_name(st->type));
		if (match_layout(mt, st, &e->rows)) {
			fmt_shape(have, sizeof(have), st->ne, st->n_dims);
			fmt_shape(full, sizeof(full), mt->ne, mt->n_dims);
			if (mt->n_dims >= 2)
				fmt_shape(rows, sizeof(rows), mt->ne + 1,
					  mt->n_dims - 1);
			return fail(err, errlen, -EINVAL,
				    "%s: tensor %s: shape %s does not match the model's %s (full)%s%s%s%s",
				    sc->path, mt->name, have, full,
				    mt->n_dims >= 2 ? " or " : "",
				    mt->n_dims >= 2 ? rows : "",
				    mt->n_dims >= 2 ? " (rows)" : "", hint);
		}
		rc = sum_values(e, st, sc->path, err, errlen);
		if (rc)
			return rc;
	}
	for (i = 0; i < sc->n_tensors; i++)
		if (!kvq_gguf_tensor(model, sc->tensors[i].name))
			return fail(err, errlen, -EINVAL,
				    "%s: tensor %s is not in the model %s%s",
				    sc->path, sc->tensors[i].name,
				    model->path,
				    hint[0] ? hint :
				    " (a sidecar for another model?)");
	if (tensor_count != UINT64_MAX && tensor_count != model->n_tensors)
		return fail(err, errlen, -EINVAL,
			    "%s: fim.model.tensor_count is %" PRIu64 " but the model %s has %" PRIu64 " tensors%s",
			    sc->path, tensor_count, model->path,
			    model->n_tensors, hint);
	return 0;
}

static bool ends_with(const char *s, const char *tail)
{
	size_t n = strlen(s), m = strlen(tail);

	return n >= m && !strcmp(s + n - m, tail);
}

int kvq_fisher_load_gguf(const struct kvq_gguf *model, const char *path,
			 struct kvq_fisher **out, char *err, size_t errlen)
{
	uint64_t tensor_count = UINT64_MAX;
	struct kvq_gguf *sc = NULL;
	struct kvq_fisher *f = NULL;
	char def[4096];
	struct stat st;
	int rc;

	if (!path) {
		rc = kvq_fisher_default_path(model->path, def, sizeof(def));
		if (rc)
			return fail(err, errlen, rc,
				    "%s: path too long for a sidecar beside it",
				    model->path);
		if (stat(def, &st) && errno == ENOENT)
			return kvq_fisher_fallback(model, out, err, errlen);
		path = def;
	}
	if (ends_with(path, ".json"))
		return fail(err, errlen, -ENOTSUP,
			    "%s: a JSON score map; convert it with `kvq-fim import-json %s MODEL` and pass the sidecar it writes",
			    path, path);
	rc = kvq_gguf_open(path, &sc, err, errlen);
	if (rc)
		return rc;
	rc = fisher_alloc(model, &f);
	if (rc) {
		fail(err, errlen, rc, "%s: out of memory", path);
		goto out_close;
	}
	f->path = strdup(path);
	if (!f->path) {
		rc = fail(err, errlen, -ENOMEM, "%s: out of memory", path);
		goto out_destroy;
	}
	f->meta.path = f->path;
	rc = read_meta(f, sc, &tensor_count, err, errlen);
	if (rc)
		goto out_destroy;
	rc = check_tensors(f, model, sc, tensor_count, err, errlen);
	if (rc)
		goto out_destroy;
	rank_by_density(f);
	kvq_gguf_close(sc);
	*out = f;
	return 0;

out_destroy:
	kvq_fisher_destroy(f);
out_close:
	kvq_gguf_close(sc);
	return rc;
}

int kvq_fisher_load(const struct kvq_model *m, const char *path,
		    struct kvq_fisher **out, char *err, size_t errlen)
{
	return kvq_fisher_load_gguf(kvq_model_gguf(m), path, out, err, errlen);
}

/* ------------------------------------------------------------ lookups */

const struct kvq_fisher_entry *kvq_fisher_entries(const struct kvq_fisher *f,
						  size_t *n)
{
	*n = f->n;
	return f->e;
}

const struct kvq_fisher_entry *kvq_fisher_ranked(const struct kvq_fisher *f,
						 uint32_t rank)
{
	if (rank < 1 || rank > f->n)
		return NULL;
	return &f->e[f->by_rank[rank - 1]];
}

const struct kvq_fisher_entry *kvq_fisher_find(const struct kvq_fisher *f,
					       const char *name)
{
	size_t i;

	for (i = 0; i < f->n; i++)
		if (!strcmp(f->e[i].name, name))
			return &f->e[i];
	return NULL;
}

const struct kvq_fisher_meta *kvq_fisher_meta(const struct kvq_fisher *f)
{
	return &f->meta;
}

const char *kvq_fisher_source(const struct kvq_fisher *f)
{
	return kvq_fisher_source_name(f->meta.source);
}

bool kvq_fisher_is_fallback(const struct kvq_fisher *f)
{
	return f->meta.source == KVQ_FISHER_SRC_FALLBACK;
}
