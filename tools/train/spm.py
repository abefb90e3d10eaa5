"""The bundled model's tokenizer: a SentencePiece BPE model trained on the
training split, and its description as GGUF `tokenizer.ggml.*` metadata.

Options are chosen so that kvqd's SentencePiece-style tokenizer (llama.cpp's
algorithm: highest-score merge first, leftmost on ties, <0xXX> byte
fallback) gives the same ids as SentencePiece itself:

- BPE, not unigram (unigram encodes by Viterbi search, which score-ordered
  merging does not reproduce);
- identity normalization, no whitespace clean-up: the text is tokenized
  as written;
- no dummy prefix (GGUF add_space_prefix = false): a word that starts the
  text or a line is spelt the same way everywhere, and a newline is the
  byte token <0x0A>;
- digits split, byte fallback on.
"""

import os

import numpy as np

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6


def _sp():
    try:
        import sentencepiece
    except ImportError:
        raise RuntimeError("SentencePiece is missing: install Debian's "
                           "python3-sentencepiece")
    return sentencepiece


def train(text_path, prefix, vocab_size, threads=None, max_lines=None):
    """Train a BPE model on @text_path (one paragraph a line) and write
    @prefix.model / @prefix.vocab.  Returns the .model path."""
    spm = _sp()
    kw = dict(
        input=text_path, model_prefix=prefix, model_type="bpe",
        vocab_size=vocab_size, character_coverage=1.0,
        byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    if max_lines:
        kw["input_sentence_size"] = max_lines
        kw["shuffle_input_sentence"] = True
    spm.SentencePieceTrainer.train(**kw)
    return prefix + ".model"


class Tokenizer:
    """A trained SentencePiece model: encoding and GGUF metadata."""

    def __init__(self, model_path=None, model_proto=None):
        spm = _sp()
        if model_proto is not None:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        else:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.n_vocab = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.nl_id = self.sp.piece_to_id("<0x0A>")

    def proto(self):
        """The serialized model (bytes), to keep inside a checkpoint."""
        return self.sp.serialized_model_proto()

    def encode(self, text):
        """Ids of @text (no BOS).  Lines are encoded one at a time and
        joined by the newline byte token: nothing merges across a newline,
        so this is what encoding the whole text at once gives."""
        out = []
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if i:
                out.append(self.nl_id)
            if line:
                out.extend(self.sp.encode(line))
        return out

    def encode_file(self, path, dtype=np.uint16):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ids = self.encode(text)
        if self.n_vocab > np.iinfo(dtype).max + 1:
            raise ValueError("vocabulary of %d does not fit %s"
                             % (self.n_vocab, np.dtype(dtype).name))
        return np.asarray(ids, dtype=dtype)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def token_type(self, i):
        sp = self.sp
        if sp.is_unknown(i):
            return TT_UNKNOWN
        if sp.is_control(i):
            return TT_CONTROL
        if sp.is_byte(i):
            return TT_BYTE
        if sp.is_unused(i):
            return TT_UNUSED
        return TT_NORMAL

    def gguf_metadata(self):
        """[(key, value, vtype-or-None, subtype-or-None)] for the GGUF
        writer."""
        from kvq_gguf import VType
        sp = self.sp
        n = self.n_vocab
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = np.array([sp.get_score(i) for i in range(n)], np.float32)
        types = np.array([self.token_type(i) for i in range(n)], np.int32)
        return [
            ("tokenizer.ggml.model", "llama", VType.STRING, None),
            ("tokenizer.ggml.pre", "default", VType.STRING, None),
            ("tokenizer.ggml.tokens", tokens, VType.ARRAY, VType.STRING),
            ("tokenizer.ggml.scores", scores, VType.ARRAY, VType.FLOAT32),
            ("tokenizer.ggml.token_type", types, VType.ARRAY, VType.INT32),
            ("tokenizer.ggml.bos_token_id", self.bos_id, VType.UINT32, None),
            ("tokenizer.ggml.eos_token_id", self.eos_id, VType.UINT32, None),
            ("tokenizer.ggml.unknown_token_id", self.unk_id, VType.UINT32,
             None),
            ("tokenizer.ggml.add_bos_token", True, VType.BOOL, None),
            ("tokenizer.ggml.add_eos_token", False, VType.BOOL, None),
            ("tokenizer.ggml.add_space_prefix", False, VType.BOOL, None),
        ]
