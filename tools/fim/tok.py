"""Tokenizing calibration text in Python from a GGUF file's tokenizer
metadata.

SentencePiece-style vocabularies (tokenizer.ggml.model = "llama") are
encoded the way kvqd and llama.cpp do it: spaces become U+2581, one more
goes in front when add_space_prefix is set, then neighbouring symbols
(single characters to begin with) merge into the vocabulary entry of the
highest score, leftmost first on ties, until nothing merges; a character
that is not in the vocabulary becomes its <0xXX> byte tokens.

Byte-level BPE vocabularies ("gpt2") are split with the GPT-2 pattern
(the `regex` module's \\p classes when it is installed, otherwise
Python's \\w-based classes, which agree on most text), spelt in GPT-2's
byte alphabet and merged by rank.  Calibration needs plausible ids, not
the exact ids of every pre-tokenizer.
"""

import heapq
import re

SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerError(Exception):
    pass


def _byte_alphabet():
    """GPT-2's map from bytes to printable characters."""
    keep = (list(range(ord("!"), ord("~") + 1)) +
            list(range(ord("\xa1"), ord("\xac") + 1)) +
            list(range(ord("\xae"), ord("\xff") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class SPMTokenizer:
    def __init__(self, tokens, scores, add_space_prefix):
        self.vocab = {}
        for i, t in enumerate(tokens):
            self.vocab.setdefault(t, i)
        self.scores = list(scores) if scores is not None else [0.0] * len(tokens)
        self.add_space_prefix = add_space_prefix
        self.byte_ids = {}
        for i, t in enumerate(tokens):
            m = _BYTE_TOKEN.match(t)
            if m:
                self.byte_ids[int(m.group(1), 16)] = i

    def encode(self, text):
        if not text:
            return []
        s = text.replace(" ", SPACE)
        if self.add_space_prefix:
            s = SPACE + s
        sym = list(s)
        n = len(sym)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j < 0:
                return
            tid = self.vocab.get(sym[i] + sym[j])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], i, sym[i], sym[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or sym[i] != a or sym[j] != b:
                continue
            sym[i] = a + b
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            if prev[i] >= 0:
                push(prev[i])
            push(i)
        out = []
        i = 0
        while i >= 0:
            tid = self.vocab.get(sym[i])
            if tid is not None:
                out.append(tid)
            else:
                for byte in sym[i].encode("utf-8"):
                    if byte not in self.byte_ids:
                        raise TokenizerError("character %r is not in the "
                                             "vocabulary and it has no byte "
                                             "tokens" % sym[i])
                    out.append(self.byte_ids[byte])
            i = nxt[i]
        return out


_GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"
                 r"| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_GPT2_PATTERN_RE = (r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+"
                    r"| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


class BPETokenizer:
    def __init__(self, tokens, merges):
        self.vocab = {}
        for i, t in enumerate(tokens):
            self.vocab.setdefault(t, i)
        self.ranks = {}
        for r, m in enumerate(merges):
            a, _, b = m.partition(" ")
            self.ranks[(a, b)] = r
        self.alpha = _byte_alphabet()
        try:
            import regex
            self.split = regex.compile(_GPT2_PATTERN).findall
        except ImportError:
            self.split = re.compile(_GPT2_PATTERN_RE).findall
        self.cache = {}

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            best, at = None, -1
            for k in range(len(parts) - 1):
                r = self.ranks.get((parts[k], parts[k + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, k
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        return parts

    def encode(self, text):
        out = []
        for piece in self.split(text):
            ids = self.cache.get(piece)
            if ids is None:
                spelt = "".join(self.alpha[b] for b in piece.encode("utf-8"))
                ids = []
                for p in self._bpe(spelt):
                    if p not in self.vocab:
                        raise TokenizerError("BPE piece %r is not in the "
                                             "vocabulary" % p)
                    ids.append(self.vocab[p])
                self.cache[piece] = ids
            out.extend(ids)
        return out


def from_gguf(reader):
    """A tokenizer for the vocabulary of the open GGUFReader @reader."""
    model = reader.get("tokenizer.ggml.model")
    tokens = reader.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise TokenizerError("%s has no tokenizer.ggml.tokens" % reader.path)
    if model == "llama":
        scores = reader.get("tokenizer.ggml.scores")
        asp = reader.get("tokenizer.ggml.add_space_prefix")
        return SPMTokenizer(tokens, scores, True if asp is None else bool(asp))
    if model == "gpt2":
        merges = reader.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("%s has no tokenizer.ggml.merges"
                                 % reader.path)
        return BPETokenizer(tokens, merges)
    raise TokenizerError("%s: tokenizer model %r not supported"
                         % (reader.path, model))
