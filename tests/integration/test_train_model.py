#!/usr/bin/env python3
"""The bundled model, models/kvq-austen-5m.gguf, served by kvqd.

- the model and its sidecar fit the 32 MiB budget together;
- kvqd tokenizes the held-out text exactly as the training tokenizer
  (models/kvq-austen-5m.spm.model, SentencePiece) does;
- kvqd writes readable English from it (greedy, so repetition is allowed:
  at least 30 words, 12 distinct, 5 of them common English words, 90%
  of the whitespace-separated pieces plain words with punctuation);
- kvqd --perplexity on the start of the held-out text is within 2% of the
  figure the training script recorded (models/kvq-austen-5m.json, computed
  by tools/train/train.py eval with the PyTorch reference).  Set
  KVQ_TEST_SLOW=1 to measure the whole held-out text as well (about a
  minute and a half on two cores).
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

NAME = "kvq-austen-5m"
BUDGET = 32 << 20
PPL_TOL = 0.02
COMMON = ("the", "of", "and", "to", "a", "her", "was", "had", "she", "he",
          "in", "it", "not", "be", "that", "i", "you", "his", "with", "for",
          "as", "at", "by", "on", "so", "very", "which", "who", "is", "have",
          "been", "would", "could", "my", "but", "all", "man", "young")
PROMPTS = ("It was a truth universally acknowledged", "She had never",
           "Anne was")


def tokenizer(models):
    """(encode function, description): SentencePiece when installed, else
    the Python tokenizer built from the GGUF (tools/fim/tok.py)."""
    try:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(
            model_file=os.path.join(models, NAME + ".spm.model"))
        nl = sp.piece_to_id("<0x0A>")

        def enc(text):
            out = []
            for i, line in enumerate(text.split("\n")):
                if i:
                    out.append(nl)
                if line:
                    out.extend(sp.encode(line))
            return out
        return enc, "SentencePiece"
    except ImportError:
        from fim import tok
        from kvq_gguf import GGUFReader
        with GGUFReader(os.path.join(models, NAME + ".gguf")) as r:
            t = tok.from_gguf(r)
        return t.encode, "the GGUF's vocabulary in Python"


def check_tokenize(tap, kvqd, model, heldout, enc, how):
    with open(heldout, encoding="utf-8") as f:
        lines = f.read().split("\n")
    bad, n = 0, 0
    for i in range(0, len(lines), 40):
        text = "\n".join(lines[i:i + 40])
        if not text:
            continue
        rc, so, se = testing.run([kvqd, "--model", model, "--tokenize", text])
        want = enc(text)
        n += len(want)
        if rc != 0 or [int(x) for x in so.split()] != want:
            bad += 1
            if bad == 1:
                tap.diag("lines %d-%d differ: %s" % (i + 1, i + 40,
                                                      testing.tail(se, 3)))
    tap.ok(bad == 0, "kvqd tokenizes the held-out text like %s (%d tokens)"
           % (how, n))


def check_generate(tap, kvqd, model):
    for p in PROMPTS:
        rc, so, se = testing.run([kvqd, "--model", model, "--prompt", p,
                                  "--max-tokens", "64", "--temperature",
                                  "0"])
        words = re.findall(r"[A-Za-z']+", so.lower())
        common = set(words) & set(COMMON)
        plain = sum(1 for w in so.split()
                    if re.fullmatch(r"[\"'(]*[A-Za-z'-]+[.,;:!?\"')-]*", w))
        ratio = plain / max(1, len(so.split()))
        tap.diag("%s|%s" % (p, so.strip().replace("\n", " / ")))
        tap.ok(rc == 0 and len(words) >= 30 and len(common) >= 5
               and len(set(words)) >= 12 and ratio >= 0.9,
               "readable English after %r (%d words, %d distinct, %d common, "
               "%.0f%% plain)" % (p, len(words), len(set(words)), len(common),
                                  100 * ratio))


def ppl_of(kvqd, model, path):
    rc, so, se = testing.run([kvqd, "--model", model, "--perplexity", path],
                             timeout=900)
    for line in so.splitlines():
        if line.startswith("{"):
            return json.loads(line), se
    return None, testing.tail(so + se)


def check_ppl(tap, kvqd, model, heldout, rec, tmp):
    pre = rec["heldout_prefix"]
    with open(heldout, encoding="utf-8") as f:
        lines = f.read().split("\n")
    path = os.path.join(tmp, "prefix.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:pre["lines"]]) + "\n")
    res, err = ppl_of(kvqd, model, path)
    if res is None:
        tap.ok(False, "kvqd --perplexity on the held-out prefix")
        tap.diag(err)
        return
    rel = res["ppl"] / pre["ppl"] - 1
    tap.diag("held-out prefix (%d lines, %d tokens): kvqd %.4f (%s/%s "
             "cache), recorded %.4f" % (pre["lines"], res["tokens"],
                                        res["ppl"], res["kv_type_k"],
                                        res["kv_type_v"], pre["ppl"]))
    tap.ok(res["tokens"] == pre["tokens"] and abs(rel) <= PPL_TOL,
           "kvqd perplexity on the held-out prefix within %g%% of the "
           "recorded figure (%+.2f%%)" % (100 * PPL_TOL, 100 * rel))
    if not os.environ.get("KVQ_TEST_SLOW"):
        tap.skip("kvqd perplexity on the whole held-out text",
                 "set KVQ_TEST_SLOW=1")
        return
    full = rec["heldout"]
    res, err = ppl_of(kvqd, model, heldout)
    ok = res is not None and res["tokens"] == full["tokens"] and \
        abs(res["ppl"] / full["ppl"] - 1) <= PPL_TOL
    if res is not None:
        tap.diag("whole held-out text: kvqd %.4f, recorded %.4f"
                 % (res["ppl"], full["ppl"]))
    tap.ok(ok, "kvqd perplexity on the whole held-out text within %g%%"
           % (100 * PPL_TOL))


def main():
    models = os.path.join(testing.srcdir(), "models")
    model = os.path.join(models, NAME + ".gguf")
    side = os.path.join(models, NAME + ".fim.gguf")
    heldout = os.path.join(models, "austen-heldout.txt")
    for p in (model, side, heldout):
        if not os.path.exists(p):
            testing.skip_all("%s missing" % p)
    testing.setup_path()
    kvqd = testing.kvqd_path()
    if kvqd is None:
        testing.skip_all("kvqd binary not found (set KVQD)")
    miss = testing.missing_modules(("numpy",))
    if miss:
        testing.skip_all("python modules missing: %s" % ", ".join(miss))
    with open(os.path.join(models, NAME + ".json")) as f:
        rec = json.load(f)
    tap = testing.Tap()
    size = os.path.getsize(model) + os.path.getsize(side)
    tap.ok(size <= BUDGET, "model and sidecar together %.1f MiB <= 32 MiB"
           % (size / (1 << 20)))
    enc, how = tokenizer(models)
    check_tokenize(tap, kvqd, model, heldout, enc, how)
    check_generate(tap, kvqd, model)
    with testing.tempdir("kvq-bundled-") as tmp:
        check_ppl(tap, kvqd, model, heldout, rec, tmp)
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
