#!/usr/bin/env python3
"""kvqd's logits against the PyTorch float64 reference (tools/kvq_ref).

1. stories260K.gguf (a real trained llama model, all F32): a 20-token
   prompt starting with BOS; every position's logits must match the
   reference within 1e-4 absolute.
2. Random-weight models written by tools/gen_model.py for llama and qwen2
   and every weight type kvqd supports (F32 F16 BF16 Q8_0 Q4_0 Q4_K Q6_K),
   some with the output projection tied to token_embd.  The reference
   dequantizes the very same blocks, so the only difference left is kvqd's
   float32 arithmetic: tolerance 1e-4 * max(1, max|logit|).

kvqd is run as: $KVQD --model FILE --dump-logits OUT --prompt-ids "1 2 ..."
plus the arguments that select an exact f32 KV cache (kvqd's one-shot
default is the quantized serving cache; see kvq_ref.testing.exact_kv_args),
and must write n_tokens x n_vocab float32 little-endian, one row per
position.  kvqd's default (quantized) KV cache is measured on stories260K
and reported as a diagnostic only.
"""

import os
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

STORIES_IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421,
               395, 317, 426, 338, 401, 396, 267]
STORIES_TOL = 1e-4
REL_TOL = 1e-4
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K")
ARCHS = ("llama", "qwen2")
N_PROMPT = 24
N_LONG = 140
SMALL = ["--dim", "256", "--layers", "2", "--heads", "8", "--kv-heads", "4",
         "--ffn", "512", "--ctx", "256"]
LARGE = ["--dim", "512", "--layers", "3", "--heads", "8", "--kv-heads", "2",
         "--ffn", "768", "--ctx", "512"]


def dump_logits(kvqd, model, ids, out, exact=True):
    cmd = [kvqd, "--model", model, "--dump-logits", out,
           "--prompt-ids", " ".join(str(i) for i in ids)]
    if exact:
        cmd += testing.exact_kv_args()
    rc, so, se = testing.run(cmd, timeout=300)
    return cmd, rc, so, se


def compare(tap, np, desc, ref, got_path, n_vocab, tol_fn, tol_text):
    """One TAP line comparing reference logits with kvqd's dump."""
    T = ref.shape[0]
    try:
        got = np.fromfile(got_path, dtype="<f4")
    except OSError as e:
        tap.ok(False, "%s: cannot read kvqd's logits (%s)" % (desc, e))
        return
    if got.size != T * n_vocab:
        tap.ok(False, "%s: kvqd wrote %d floats, expected %d x %d = %d"
               % (desc, got.size, T, n_vocab, T * n_vocab))
        return
    got = got.reshape(T, n_vocab).astype(np.float64)
    finite = np.isfinite(got).all()
    diff = np.abs(got - ref)
    if not finite:
        diff = np.where(np.isfinite(got), diff, np.inf)
    maxdiff = float(diff.max())
    maxlogit = float(np.abs(ref).max())
    tol = tol_fn(maxlogit)
    good = finite and maxdiff <= tol
    tap.ok(good, "%s: max|diff| %.3g <= %s = %.3g (max|logit| %.3g)"
           % (desc, maxdiff, tol_text, tol, maxlogit))
    per_pos = diff.max(axis=1)
    agree = int((got.argmax(axis=1) == ref.argmax(axis=1)).sum())
    if not good:
        tap.diag("  per-position max|diff|: " +
                 " ".join("%d:%.2g" % (i, d) for i, d in enumerate(per_pos)))
        p = int(per_pos.argmax())
        v = int(diff[p].argmax())
        tap.diag("  worst: position %d, token %d: kvqd %.6g, reference %.6g"
                 % (p, v, got[p, v], ref[p, v]))
        first = [i for i, d in enumerate(per_pos) if d > tol]
        tap.diag("  first position over tolerance: %d; argmax agrees at "
                 "%d/%d positions" % (first[0] if first else -1, agree, T))
        if per_pos[0] > tol:
            tap.diag("  position 0 already differs: the error is not in "
                     "attention over past positions (embedding, matmul, "
                     "norm, rope at pos 0 or output)")
        elif first:
            tap.diag("  position 0 matches: suspect attention/RoPE/KV "
                     "cache (positions > 0)")


def main():
    stories, kvqd = testing.require_reference_setup("stories260K.gguf")

    import numpy as np
    import gen_model
    from kvq_ref import RefModel

    tap = testing.Tap()
    tap.diag("kvqd: %s (KV cache arguments: %s)"
             % (kvqd, " ".join(testing.exact_kv_args()) or "none"))
    tap.diag("tolerance: stories260K max|diff| <= %g; random models "
             "max|diff| <= %g * max(1, max|reference logit|)"
             % (STORIES_TOL, REL_TOL))

    with testing.tempdir() as tmp:
        # ------------------------------------------------ stories260K
        ref = RefModel(stories).logits(STORIES_IDS)
        out = os.path.join(tmp, "stories.bin")
        cmd, rc, so, se = dump_logits(kvqd, stories, STORIES_IDS, out)
        desc = "stories260K F32, %d tokens" % len(STORIES_IDS)
        if rc != 0:
            tap.ok(False, "%s: kvqd exited with %s" % (desc, rc))
            tap.diag("  command: %s" % " ".join(cmd))
            tap.diag(testing.tail(se))
        else:
            compare(tap, np, desc, ref, out, ref.shape[1],
                    lambda m: STORIES_TOL, "1e-4")
        cmd, rc, so, se = dump_logits(kvqd, stories, STORIES_IDS, out,
                                      exact=False)
        if rc == 0 and os.path.getsize(out) == ref.size * 4:
            got = np.fromfile(out, dtype="<f4").reshape(ref.shape)
            tap.diag("for information, kvqd's default KV cache on "
                     "stories260K: max|diff| %.3g, argmax agrees at %d/%d "
                     "positions" % (np.abs(got - ref).max(),
                                    (got.argmax(1) == ref.argmax(1)).sum(),
                                    ref.shape[0]))

        # ------------------------------------------------ random models
        cases = []
        for arch in ARCHS:
            for ti, typ in enumerate(TYPES):
                extra = []
                if ti % 3 == 1:
                    extra.append("--tied")
                if arch == "qwen2" and ti % 2 == 0:
                    extra += ["--rope-base", "10000"]
                cases.append((arch, typ, SMALL, extra, N_PROMPT, ""))
        # longer prompts (several KV pages and batches), 4 query heads per
        # kv head, two super-blocks per row, partial RoPE
        cases.append(("llama", "Q4_K", LARGE, [], N_LONG, ", dim 512"))
        cases.append(("qwen2", "Q6_K", LARGE, ["--rope-dim", "32"], N_LONG,
                      ", dim 512, rope_dim 32"))
        for case, (arch, typ, shape, extra, n_ids, note) in enumerate(cases):
            path = os.path.join(tmp, "m%d.gguf" % case)
            argv = ["--out", path, "--arch", arch, "--type", typ] + shape + \
                ["--seed", str(100 + case), "--vocab-from", stories,
                 "--quiet"] + extra
            desc = "%s %s%s%s, %d tokens" % (
                arch, typ, " tied" if "--tied" in extra else "", note, n_ids)
            try:
                gen_model.write_model(gen_model.parse_args(argv))
            except Exception as e:
                tap.ok(False, "%s: gen_model failed: %s" % (desc, e))
                continue
            rs = np.random.default_rng(case)
            m = RefModel(path)
            ids = [1] + [int(i) for i in rs.integers(3, m.hp.n_vocab, n_ids - 1)]
            ref = m.logits(ids)
            del m
            out = os.path.join(tmp, "m%d.bin" % case)
            cmd, rc, so, se = dump_logits(kvqd, path, ids, out)
            if rc != 0:
                tap.ok(False, "%s: kvqd exited with %s" % (desc, rc))
                tap.diag("  command: %s" % " ".join(cmd))
                tap.diag(testing.tail(se))
            else:
                compare(tap, np, desc, ref, out, ref.shape[1],
                        lambda mx: REL_TOL * max(1.0, mx),
                        "1e-4*max(1,max|logit|)")
            for f in (path, out):
                if os.path.exists(f):
                    os.unlink(f)
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
