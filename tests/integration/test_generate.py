#!/usr/bin/env python3
"""Greedy generation on stories260K.gguf: kvqd against the PyTorch
reference.

  $KVQD --model stories260K.gguf --prompt "" --max-tokens 200 \
        --temperature 0 --print-ids
(plus the arguments selecting an exact f32 KV cache, as in test_logits.py)
prints the generated ids (BOS not included).  They must equal the
reference's greedy ids (BOS, then 200 argmax steps; both stop at EOS, a
trailing EOS id printed by kvqd is accepted).  The same command without
--print-ids prints text, which must read as English.
"""

import os
import re
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

N_TOKENS = 200
COMMON_WORDS = ("the", "was", "and")
MIN_PLAIN_RATIO = 0.9


def kvqd_cmd(kvqd, model, print_ids):
    cmd = [kvqd, "--model", model, "--prompt", "", "--max-tokens",
           str(N_TOKENS), "--temperature", "0"]
    cmd += testing.exact_kv_args()
    if print_ids:
        cmd.append("--print-ids")
    return cmd


def main():
    stories, kvqd = testing.require_reference_setup("stories260K.gguf")

    import numpy as np
    from kvq_ref import RefModel

    tap = testing.Tap()
    m = RefModel(stories)
    bos = int(m.hp.bos_id) if m.hp.bos_id is not None else 1
    eos = int(m.hp.eos_id) if m.hp.eos_id is not None else 2
    ref, rows = m.greedy([bos], N_TOKENS, stop_at_eos=True, eos_id=eos,
                         return_logits=True)
    tap.diag("reference: %d ids%s; text: %r"
             % (len(ref), " (stopped at EOS)" if len(ref) < N_TOKENS else "",
                m.detokenize(ref)[:100]))

    # ------------------------------------------------------------ ids
    cmd = kvqd_cmd(kvqd, stories, True)
    rc, so, se = testing.run(cmd, timeout=300)
    desc = "kvqd --print-ids: greedy ids equal the reference's (%d)" % len(ref)
    if rc != 0:
        tap.ok(False, "%s: kvqd exited with %s" % (desc, rc))
        tap.diag("  command: %s" % " ".join(repr(c) for c in cmd))
        tap.diag(testing.tail(se))
    else:
        toks = so.split()
        bad = [t for t in toks if not re.fullmatch(r"-?\d+", t)]
        if bad:
            tap.ok(False, "%s: non-numeric output %r" % (desc, bad[:5]))
        else:
            got = [int(t) for t in toks]
            if len(got) == len(ref) + 1 and got[-1] == eos:
                got = got[:-1]
            same = got == ref
            tap.ok(same, desc)
            if not same:
                k = 0
                while k < min(len(got), len(ref)) and got[k] == ref[k]:
                    k += 1
                tap.diag("  kvqd printed %d ids, reference has %d; first "
                         "difference at generated index %d" % (len(got),
                                                               len(ref), k))
                tap.diag("  reference: %s" % " ".join(map(str, ref[k:k + 10])))
                tap.diag("  kvqd:      %s" % " ".join(map(str, got[k:k + 10])))
                if k < len(rows) and k < len(got):
                    lg = rows[k]
                    top = np.argsort(lg)[::-1][:3]
                    tap.diag("  reference logits there: " + ", ".join(
                        "%d:%.6f" % (t, lg[t]) for t in top) +
                        "; kvqd's pick %d has %.6f (margin %.3g)"
                        % (got[k], lg[got[k]] if 0 <= got[k] < len(lg)
                           else float("nan"), lg[top[0]] - lg[top[1]]))

    # ------------------------------------------------------------ text
    cmd = kvqd_cmd(kvqd, stories, False)
    rc, so, se = testing.run(cmd, timeout=300)
    if rc != 0:
        tap.ok(False, "kvqd text generation: exited with %s" % rc)
        tap.diag(testing.tail(se))
        tap.ok(False, "kvqd text contains common English words")
        return tap.done()
    text = so
    tap.diag("kvqd text: %r" % text[:200])
    n = len(text)
    letters = sum(1 for c in text if c.isascii() and (c.isalpha() or c == " "))
    plain = sum(1 for c in text if c.isascii() and
                (c.isalnum() or c in " \n.,!?'\"-:;"))
    lratio = letters / n if n else 0.0
    pratio = plain / n if n else 0.0
    tap.ok(n >= 100 and lratio >= MIN_PLAIN_RATIO - 0.05 and
           pratio >= MIN_PLAIN_RATIO,
           "kvqd text is readable: %d chars, %.0f%% ASCII letters/spaces, "
           "%.0f%% plain ASCII text" % (n, 100 * lratio, 100 * pratio))
    words = set(re.findall(r"[a-z]+", text.lower()))
    found = [w for w in COMMON_WORDS if w in words]
    tap.ok(len(found) >= 2, "kvqd text contains common English words "
           "(%s of %s)" % (", ".join(found) or "none", "/".join(COMMON_WORDS)))
    want = m.detokenize(ref)
    if text.strip() != want.strip():
        tap.diag("note: kvqd text differs from the reference ids' "
                 "detokenization: %r" % want[:200])
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
