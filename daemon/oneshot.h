/*
 * oneshot.h - kvqd's one-shot modes for scripts and tests.
 *
 * Why this file exists: `kvqd --model F --prompt TEXT` generates and exits,
 * `--tokenize TEXT` prints token ids, `--dump-logits` writes raw logits for
 * the reference tests.  They share the engine with the daemon but none of
 * its machinery.
 */
#ifndef KVQ_ONESHOT_H
#define KVQ_ONESHOT_H

#include <stdbool.h>

/* true when @argv asks for a one-shot mode. */
bool kvq_oneshot_wanted(int argc, char **argv);
/* Runs it; returns the process exit status. */
int kvq_oneshot_main(int argc, char **argv);

#endif /* KVQ_ONESHOT_H */
