#!/usr/bin/env python3
"""Write a random-weight llama / qwen2 model as GGUF, for testing kvqd.

2-D weight matrices (token_embd and output included) use --type; norms and
biases are F32.  --type Q4_K_M mixes as that file type does: Q4_K, with
Q6_K for output and for attn_v and ffn_down in the first and last eighth
of the layers and every third layer between.  The tokenizer metadata
(every tokenizer.* key) is copied from --vocab-from, whose token count
sets the vocabulary size.  Tensors are
generated and written one at a time (in row chunks), so large models never
sit in memory.

Example:
  gen_model.py --out m.gguf --arch qwen2 --type Q4_K --dim 256 --layers 2 \\
      --heads 8 --kv-heads 4 --ffn 512 --ctx 256 --seed 1
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kvq_gguf import (GGMLType, GGUFReader, GGUFWriter, block_size,  # noqa: E402
                      encode, random_blocks, type_from_name)

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q4_K_M")

# general.file_type values ("mostly X"), as the GGUF spec and llama.cpp use.
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K": 15,
             "Q4_K_M": 15, "Q6_K": 18, "BF16": 32}


def base_type(name):
    """The ggml type of most weights of --type @name."""
    return type_from_name("Q4_K" if name == "Q4_K_M" else name)


def more_bits(i, n):
    """Layer @i of @n takes Q6_K for attn_v and ffn_down in a Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VOCAB = os.path.join(
    os.environ.get("KVQ_TESTDATA")
    or os.path.join(REPO_ROOT, "..", "shared", "testdata"),
    "stories260K.gguf")

# Elements generated per chunk of a large tensor.
CHUNK_ELEMS = 1 << 22


class ArgError(Exception):
    pass


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Write a random-weight llama/qwen2 GGUF model.")
    ap.add_argument("--out", required=True, help="output GGUF file")
    ap.add_argument("--arch", required=True, choices=("llama", "qwen2"))
    ap.add_argument("--type", required=True, type=str.upper, choices=TYPES,
                    help="type of the 2-D weight matrices")
    ap.add_argument("--dim", type=int, required=True, help="embedding length")
    ap.add_argument("--layers", type=int, required=True, help="block count")
    ap.add_argument("--heads", type=int, required=True, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="key/value heads (default: --heads)")
    ap.add_argument("--ffn", type=int, required=True, help="feed-forward length")
    ap.add_argument("--ctx", type=int, default=2048, help="context length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tied", action="store_true",
                    help="no output.weight: the output projection is token_embd")
    ap.add_argument("--rope-base", type=float, default=None,
                    help="rope.freq_base (default 10000 for llama, "
                    "1000000 for qwen2)")
    ap.add_argument("--rope-dim", type=int, default=None,
                    help="rope.dimension_count (default: head dim)")
    ap.add_argument("--eps", type=float, default=None,
                    help="RMS norm epsilon (default 1e-5 llama, 1e-6 qwen2)")
    ap.add_argument("--vocab-from", default=DEFAULT_VOCAB,
                    help="GGUF whose tokenizer.* keys are copied "
                    "(default: ../shared/testdata/stories260K.gguf)")
    ap.add_argument("--outlier", action="append", default=[],
                    metavar="TENSOR[@ROW]=VALUE",
                    help="the first element of weight TENSOR (of its row ROW, "
                    "default 0) is VALUE (F32, "
                    "F16, BF16, Q8_0 and Q4_0 weights, the rest of a "
                    "quantized first block zero; repeatable): weights beyond "
                    "f16's range, for tests")
    ap.add_argument("--quiet", "-q", action="store_true")
    a = ap.parse_args(argv)
    if a.kv_heads is None:
        a.kv_heads = a.heads
    return a


def validate(a):
    """Raise ArgError with a clear message for inconsistent arguments."""
    t = base_type(a.type)
    bs = block_size(t)
    for name in ("dim", "layers", "heads", "kv_heads", "ffn", "ctx"):
        if getattr(a, name) < 1:
            raise ArgError("--%s must be >= 1 (got %d)"
                           % (name.replace("_", "-"), getattr(a, name)))
    if a.dim % a.heads:
        raise ArgError("--dim %d is not divisible by --heads %d"
                       % (a.dim, a.heads))
    hd = a.dim // a.heads
    if hd % 2:
        raise ArgError("head dim %d (= dim/heads) must be even for RoPE" % hd)
    if a.heads % a.kv_heads:
        raise ArgError("--heads %d is not a multiple of --kv-heads %d"
                       % (a.heads, a.kv_heads))
    if a.rope_dim is not None and (a.rope_dim < 2 or a.rope_dim > hd
                                   or a.rope_dim % 2):
        raise ArgError("--rope-dim %d must be even and in 2..%d (head dim)"
                       % (a.rope_dim, hd))
    if a.dim % bs:
        raise ArgError("--dim %d must be a multiple of the %s block size %d "
                       "(weight rows have dim elements)" % (a.dim, a.type, bs))
    if a.ffn % bs:
        raise ArgError("--ffn %d must be a multiple of the %s block size %d "
                       "(ffn_down rows have ffn elements)" % (a.ffn, a.type, bs))
    if not os.path.isfile(a.vocab_from):
        raise ArgError("--vocab-from %s: no such file" % a.vocab_from)
    a.outliers = {}
    for o in a.outlier:
        name, eq, val = o.partition("=")
        name, at, row = name.partition("@")
        try:
            v = float(val)
            r = int(row) if at else 0
        except ValueError:
            v = r = None
        if (not eq or not name or v is None or not np.isfinite(v) or
                r is None or r < 0):
            raise ArgError("--outlier %s: expected TENSOR=VALUE or "
                           "TENSOR@ROW=VALUE with a finite number" % o)
        if t not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16,
                     GGMLType.Q8_0, GGMLType.Q4_0) or a.type == "Q4_K_M":
            raise ArgError("--outlier needs F32, F16, BF16, Q8_0 or Q4_0 "
                           "weights (not %s)" % a.type)
        if t == GGMLType.F16 and abs(v) > 65504.0:
            raise ArgError("--outlier %s: beyond F16's range" % o)
        a.outliers[name] = (r, v)
    names = [n for n, _, _, k in tensor_plan(a, 1) if k == "weight"]
    for name in a.outliers:
        if name not in names:
            raise ArgError("--outlier %s: no such weight in this model" % name)


def weight_std(in_features):
    """Standard deviation of a random weight matrix's elements: about
    1/sqrt(in), kept within [0.02, 0.1]."""
    return float(min(0.1, max(0.02, 1.0 / np.sqrt(in_features))))


def tensor_plan(a, n_vocab):
    """[(name, numpy shape, ggml type, kind)] in file order; kind is
    'weight', 'norm' or 'bias'."""
    wt = base_type(a.type)
    mix = a.type == "Q4_K_M"
    hd = a.dim // a.heads
    qd, kvd = a.heads * hd, a.kv_heads * hd
    plan = [("token_embd.weight", (n_vocab, a.dim), wt, "weight")]
    for i in range(a.layers):
        p = "blk.%d." % i
        wv = GGMLType.Q6_K if mix and more_bits(i, a.layers) else wt
        plan.append((p + "attn_norm.weight", (a.dim,), GGMLType.F32, "norm"))
        plan.append((p + "attn_q.weight", (qd, a.dim), wt, "weight"))
        plan.append((p + "attn_k.weight", (kvd, a.dim), wt, "weight"))
        plan.append((p + "attn_v.weight", (kvd, a.dim), wv, "weight"))
        if a.arch == "qwen2":
            plan.append((p + "attn_q.bias", (qd,), GGMLType.F32, "bias"))
            plan.append((p + "attn_k.bias", (kvd,), GGMLType.F32, "bias"))
            plan.append((p + "attn_v.bias", (kvd,), GGMLType.F32, "bias"))
        plan.append((p + "attn_output.weight", (a.dim, qd), wt, "weight"))
        plan.append((p + "ffn_norm.weight", (a.dim,), GGMLType.F32, "norm"))
        plan.append((p + "ffn_gate.weight", (a.ffn, a.dim), wt, "weight"))
        plan.append((p + "ffn_up.weight", (a.ffn, a.dim), wt, "weight"))
        plan.append((p + "ffn_down.weight", (a.dim, a.ffn), wv, "weight"))
    plan.append(("output_norm.weight", (a.dim,), GGMLType.F32, "norm"))
    if not a.tied:
        plan.append(("output.weight", (n_vocab, a.dim),
                     GGMLType.Q6_K if mix else wt, "weight"))
    return plan


def gen_chunks(shape, ggml_type, kind, rng, outlier=None):
    """Yield the bytes of one tensor in pieces of whole rows; where
    @outlier is (ROW, VALUE), the first element of row ROW is VALUE (a
    float type's, or the first block of a Q8_0 / Q4_0 one, whose other
    weights are then 0)."""
    if kind == "norm":
        x = (1.0 + 0.1 * rng.standard_normal(shape[0])).astype("<f4")
        yield x
        return
    if kind == "bias":
        yield (0.2 * rng.standard_normal(shape[0])).astype("<f4")
        return
    rows, cols = shape
    std = weight_std(cols)
    step = max(1, CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        b = random_blocks(ggml_type, n * cols, rng, std=std)
        if outlier is not None and r0 <= outlier[0] < r0 + n:
            b = b.copy()
            first = [outlier[1]] + [0.0] * (block_size(ggml_type) - 1)
            e = encode(first, ggml_type)
            at = (outlier[0] - r0) * (len(b) // n)
            b[at:at + len(e)] = e
        yield b


def write_model(a, log=None):
    validate(a)
    with GGUFReader(a.vocab_from) as vr:
        tok_fields = [(k, v) for k, v in vr.fields.items()
                      if k.startswith("tokenizer.")]
        tokens = vr.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ArgError("--vocab-from %s has no tokenizer.ggml.tokens"
                       % a.vocab_from)
    n_vocab = len(tokens)
    hd = a.dim // a.heads
    arch = a.arch
    rope_base = a.rope_base if a.rope_base is not None else \
        (10000.0 if arch == "llama" else 1000000.0)
    eps = a.eps if a.eps is not None else (1e-5 if arch == "llama" else 1e-6)
    wt = base_type(a.type)
    plan = tensor_plan(a, n_vocab)
    rows = {n: shape[0] for n, shape, _, k in plan if k == "weight"}
    for name, (r, _) in a.outliers.items():
        if r >= rows[name]:
            raise ArgError("--outlier %s@%d: the weight has %d rows"
                           % (name, r, rows[name]))

    w = GGUFWriter(a.out)
    w.add_string("general.architecture", arch)
    w.add_string("general.name", "kvq-random-%s-%s" % (arch, a.type))
    w.add_uint32("general.alignment", 32)
    w.add_uint32("general.file_type", FILE_TYPE[a.type])
    if wt not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        w.add_uint32("general.quantization_version", 2)
    w.add_uint32(arch + ".context_length", a.ctx)
    w.add_uint32(arch + ".embedding_length", a.dim)
    w.add_uint32(arch + ".block_count", a.layers)
    w.add_uint32(arch + ".feed_forward_length", a.ffn)
    w.add_uint32(arch + ".attention.head_count", a.heads)
    w.add_uint32(arch + ".attention.head_count_kv", a.kv_heads)
    w.add_uint32(arch + ".rope.dimension_count",
                 a.rope_dim if a.rope_dim is not None else hd)
    w.add_float32(arch + ".rope.freq_base", rope_base)
    w.add_float32(arch + ".attention.layer_norm_rms_epsilon", eps)
    w.add_uint32(arch + ".vocab_size", n_vocab)
    for k, v in tok_fields:
        w.add(k, v)

    for name, shape, t, _ in plan:
        w.add_tensor_info(name, shape, t)
    t0 = time.time()
    w.write_header()
    try:
        for idx, (name, shape, t, kind) in enumerate(plan):
            rng = np.random.default_rng([a.seed, idx])
            w.write_tensor_stream(name, gen_chunks(shape, t, kind, rng,
                                                   a.outliers.get(name)))
    except BaseException:
        w.abort()
        try:
            os.unlink(a.out)
        except OSError:
            pass
        raise
    w.close()
    n_params = sum(int(np.prod(s)) for _, s, _, _ in plan)
    if log:
        log("%s: %s %s, %d layers, dim %d, %d heads (%d kv), ffn %d, vocab %d, "
            "%s params, %d bytes, %.1f s" % (
                a.out, arch, a.type, a.layers, a.dim, a.heads,
                a.kv_heads, a.ffn, n_vocab, "{:,}".format(n_params),
                os.path.getsize(a.out), time.time() - t0))
    return plan


def main(argv=None):
    a = parse_args(argv)
    try:
        write_model(a, None if a.quiet else
                    (lambda s: print(s, file=sys.stderr)))
    except ArgError as e:
        print("gen_model.py: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
