#!/usr/bin/env python3
"""The bundled model's training path, end to end on the CPU with the tiny
configuration: tools/train/train.py all on tools/fim/sample.txt prepares
the text and a SentencePiece tokenizer, trains with AdamW, exports a GGUF
and its Fisher sidecar, and measures held-out perplexity from the GGUF.

Checks: each step succeeds; the sidecar holds exp_avg_sq for every tensor
(step and token counts as trained); the GGUF's perplexity (kvq_ref)
agrees with the one training measured; the Python tokenizer built from
the GGUF gives SentencePiece's ids; kvqd (when built) loads the model,
tokenizes like SentencePiece and generates.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

PPL_TOL = 0.01


def main():
    miss = testing.missing_modules(("numpy", "torch", "sentencepiece"))
    if miss:
        testing.skip_all("python modules missing: %s" % ", ".join(miss))
    testing.setup_path()
    src = testing.srcdir()
    train_py = os.path.join(src, "tools", "train", "train.py")
    sample = os.path.join(src, "tools", "fim", "sample.txt")
    py = os.environ.get("PYTHON3") or sys.executable
    tap = testing.Tap()
    with testing.tempdir("kvq-train-") as tmp:
        rc, so, se = testing.run([py, train_py, "all", "--out", tmp,
                                  "--preset", "tiny", "--text", sample,
                                  "--threads", "2"], timeout=300)
        if not tap.ok(rc == 0, "train.py all --preset tiny"):
            tap.diag(testing.tail(so + se, 30))
            return tap.done()
        model = os.path.join(tmp, "model.gguf")
        side = os.path.join(tmp, "model.fim.gguf")
        with open(os.path.join(tmp, "summary.json")) as f:
            summ = json.load(f)
        check_sidecar(tap, model, side, summ)
        check_ppl(tap, tmp, so, summ)
        check_tokenizer(tap, tmp, model)
        check_kvqd(tap, tmp, model)
    return tap.done()


def check_sidecar(tap, model, side, summ):
    from fim import sidecar
    try:
        meta = sidecar.verify(side, model)
    except sidecar.SidecarError as e:
        tap.ok(False, "sidecar matches the exported model")
        tap.diag(str(e))
        return
    tap.ok(True, "sidecar matches the exported model")
    _, vals = sidecar.read(side)
    tr = sidecar.traces(vals)
    hp = summ["hparams"]
    tap.ok(meta["fim.source"] == "adam_exp_avg_sq"
           and meta["fim.step_count"] == summ["step"]
           and meta["fim.token_count"] == summ["step"] * hp["batch"]
           * hp["ctx_len"]
           and all(0 < v < float("inf") for v in tr.values()),
           "sidecar: exp_avg_sq of all %d tensors after %d steps, %d tokens"
           % (len(tr), meta["fim.step_count"], meta["fim.token_count"]))


def check_ppl(tap, tmp, stdout, summ):
    sys.path.insert(0, os.path.join(testing.srcdir(), "tools", "train"))
    import train
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    ev = json.loads(lines[-1]) if lines else {}
    tap.ok(ev.get("tokens") == summ["heldout_tokens"],
           "eval scores every held-out token (%s of %d)"
           % (ev.get("tokens"), summ["heldout_tokens"]))
    ppl, _, n = train.perplexity(os.path.join(tmp, "model.gguf"),
                                 os.path.join(tmp, "data", "heldout.txt"),
                                 protocol="chunk")
    tap.diag("held-out perplexity: training %.4f, GGUF %.4f (chunks), "
             "GGUF %.4f (kvqd's sliding windows)"
             % (summ["heldout_ppl"], ppl, ev.get("ppl", float("nan"))))
    tap.ok(abs(ppl / summ["heldout_ppl"] - 1) < PPL_TOL,
           "the exported GGUF's held-out perplexity is training's within "
           "%g%%" % (100 * PPL_TOL))


def check_tokenizer(tap, tmp, model):
    import numpy as np
    sys.path.insert(0, os.path.join(testing.srcdir(), "tools", "train"))
    import spm
    from fim import tok
    from kvq_gguf import GGUFReader
    sp = spm.Tokenizer(os.path.join(tmp, "data", "tok.model"))
    with GGUFReader(model) as r:
        py = tok.from_gguf(r)
    ok = True
    for split in ("train", "val", "heldout"):
        with open(os.path.join(tmp, "data", split + ".txt")) as f:
            text = f.read()
        ids = np.fromfile(os.path.join(tmp, "data", split + ".u16"),
                          dtype=np.uint16).tolist()
        if py.encode(text) != ids or sp.encode(text) != ids:
            ok = False
            tap.diag("%s: token ids differ" % split)
    tap.ok(ok, "GGUF vocabulary tokenizes like SentencePiece (all splits)")


def check_kvqd(tap, tmp, model):
    kvqd = testing.kvqd_path()
    if kvqd is None:
        tap.skip("kvqd tokenizes like SentencePiece", "kvqd not built")
        tap.skip("kvqd generates from the trained model", "kvqd not built")
        return
    sys.path.insert(0, os.path.join(testing.srcdir(), "tools", "train"))
    import spm
    sp = spm.Tokenizer(os.path.join(tmp, "data", "tok.model"))
    with open(os.path.join(tmp, "data", "heldout.txt")) as f:
        text = f.read()
    rc, so, se = testing.run([kvqd, "--model", model, "--tokenize", text])
    got = so.split()
    want = [str(i) for i in sp.encode(text)]
    if not tap.ok(rc == 0 and got == want,
                  "kvqd tokenizes the held-out text like SentencePiece "
                  "(%d tokens)" % len(want)):
        tap.diag(testing.tail(se))
    rc, so, se = testing.run([kvqd, "--model", model, "--prompt", "Once",
                              "--max-tokens", "16", "--temperature", "0",
                              "--print-ids"])
    ids = so.split()
    if not tap.ok(rc == 0 and 0 < len(ids) <= 17
                  and all(i.isdigit() and int(i) < sp.n_vocab for i in ids),
                  "kvqd generates from the trained model (%d ids)"
                  % len(ids)):
        tap.diag(testing.tail(so + se))


if __name__ == "__main__":
    sys.exit(main())
