/*
 * tokenizer.h - text <-> token ids from a GGUF file's tokenizer metadata.
 *
 * Why this file exists: a model is only usable with exactly the tokenizer it
 * was trained with.  Two families are built from the metadata alone:
 * SentencePiece-style (tokenizer.ggml.model = "llama": scores, byte fallback,
 * leading space) and GPT-2-style byte-level BPE ("gpt2": merges, with the
 * pre-tokenizer named by tokenizer.ggml.pre).
 */
#ifndef KVQ_TOKENIZER_H
#define KVQ_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct kvq_gguf;
struct kvq_tokenizer;

enum kvq_tok_kind {
	KVQ_TOK_SPM = 1,	/* "llama" */
	KVQ_TOK_BPE = 2,	/* "gpt2" */
};

/*
 * kvq_tokenizer_create() - build the tokenizer described by @g's metadata.
 * The tokenizer copies what it needs; @g may be closed afterwards.
 * Returns 0 and stores it in *out, or -errno with a one-line message in
 * @err naming the file and field (unknown model or pre-tokenizer, missing
 * or inconsistent arrays).
 */
int kvq_tokenizer_create(const struct kvq_gguf *g, struct kvq_tokenizer **out,
			 char *err, size_t errlen);
void kvq_tokenizer_destroy(struct kvq_tokenizer *t);

enum kvq_tok_kind kvq_tokenizer_kind(const struct kvq_tokenizer *t);
int32_t kvq_tokenizer_n_vocab(const struct kvq_tokenizer *t);
/* Special tokens; -1 when the model has none. */
int32_t kvq_tokenizer_bos(const struct kvq_tokenizer *t);
int32_t kvq_tokenizer_eos(const struct kvq_tokenizer *t);
int32_t kvq_tokenizer_eot(const struct kvq_tokenizer *t);
/* Whether the metadata asks for BOS at the start of a prompt. */
bool kvq_tokenizer_add_bos(const struct kvq_tokenizer *t);
/* true for EOS, EOT and other end-of-generation tokens. */
bool kvq_tokenizer_is_eog(const struct kvq_tokenizer *t, int32_t id);

/*
 * kvq_tokenize() - encode @len bytes of @text (no BOS added, special tokens
 * not parsed; SentencePiece adds its leading space as the reference does).
 * User-defined tokens (token type 4) are still matched in the text, as the
 * reference does.  Bytes that are not valid UTF-8 are encoded as bytes.
 * Writes up to @cap ids to @out and returns the number of ids the text
 * needs (which may exceed @cap: call again with a larger buffer), or -errno
 * (-EINVAL for bad arguments, -E2BIG beyond INT_MAX / 4 bytes, -ENOMEM;
 * -EILSEQ for invalid UTF-8 given to byte-level BPE with PCRE2 < 10.34).
 * Safe to call from several threads on one tokenizer.
 */
int kvq_tokenize(const struct kvq_tokenizer *t, const char *text, size_t len,
		 int32_t *out, int cap);

/*
 * kvq_token_piece() - the bytes token @id stands for when decoding (byte
 * tokens become their byte, SentencePiece's U+2581 becomes a space, GPT-2's
 * byte-to-unicode mapping is inverted).  Returns the length and stores a
 * pointer valid for the tokenizer's lifetime; -EINVAL for a bad id.
 * Control tokens (BOS/EOS...) decode to nothing.
 */
int kvq_token_piece(const struct kvq_tokenizer *t, int32_t id,
		    const char **piece);

/* The raw vocabulary string of @id (as stored in the GGUF), or NULL. */
const char *kvq_token_text(const struct kvq_tokenizer *t, int32_t id);

/* The id whose vocabulary string is exactly @len bytes of @text, or -1. */
int32_t kvq_tokenizer_find(const struct kvq_tokenizer *t, const char *text,
			   size_t len);

/*
 * kvq_pretokenize() - cut @len bytes of @text the way byte-level BPE
 * pre-tokenizer @pre (a tokenizer.ggml.pre value: "gpt-2", "llama-bpe",
 * "qwen2", ...) does before merging.  Stores the end offset of each piece
 * in @ends (at most @cap of them) and returns the number of pieces, which
 * may exceed @cap; -ENOTSUP for a pre-tokenizer this build does not know,
 * -EINVAL for bad arguments, -ENOMEM.  Mostly for tests: a tokenizer keeps
 * its regexes compiled, this compiles them on every call.
 */
int kvq_pretokenize(const char *pre, const char *text, size_t len,
		    size_t *ends, int cap);

/*
 * Streaming detokenizer: feeds token ids and releases only complete UTF-8
 * sequences; bytes that cannot become valid UTF-8 come out as U+FFFD.  For
 * SentencePiece (with add_space_prefix) one leading space of the first piece
 * that decodes to anything is dropped, as the reference decoder does;
 * pieces that decode to nothing (BOS, other control tokens) do not count.
 * To continue text that was decoded elsewhere (generation after a prompt),
 * set d->first = false after kvq_detok_init().  Embedded, no allocation.
 */
struct kvq_detok {
	const struct kvq_tokenizer *t;
	bool first;
	unsigned char pend[8];
	int n_pend;
};
void kvq_detok_init(struct kvq_detok *d, const struct kvq_tokenizer *t);
/* Appends the bytes that became complete to @out (at most @cap; returns the
 * number written, or -ENOSPC when @cap is too small, with @d unchanged and
 * @out's contents unspecified; -EINVAL for a bad id).  3 * (3 + piece
 * length) is always enough; 64 + piece length is unless the piece is
 * malformed UTF-8. */
int kvq_detok_push(struct kvq_detok *d, int32_t id, char *out, size_t cap);
/* Whatever is still pending (an incomplete sequence at the end), emitted as
 * U+FFFD per the usual convention.  Returns bytes written (0 or 3), or
 * -ENOSPC when @cap < 3 and something is pending. */
int kvq_detok_flush(struct kvq_detok *d, char *out, size_t cap);

#endif /* KVQ_TOKENIZER_H */
