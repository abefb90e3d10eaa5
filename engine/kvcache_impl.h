/*
 * kvcache_impl.h - the SIMD entry points kvcache.c dispatches to.
 */
#ifndef KVQ_KVCACHE_IMPL_H
#define KVQ_KVCACHE_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/kvcache.h"

/* false when this row shape has no SIMD version (caller uses scalar). */
bool kvq_kv_dequant_row_avx2(enum kvq_kv_type t, const uint8_t *data,
			     const uint16_t *scales, uint32_t d,
			     uint32_t group, float *out);
void kvq_kv_axpy_avx2(float *o, float w, const float *v, uint32_t d);
bool kvq_kv_have_avx2(void);

#endif /* KVQ_KVCACHE_IMPL_H */
