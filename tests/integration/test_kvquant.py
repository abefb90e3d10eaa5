#!/usr/bin/env python3
"""The quantized KV cache, end to end through kvqd.

1. --perplexity on held-out text (tests/data/heldout_story.txt) with
   stories260K for f32/f32, f16/f16, q8/q8, q8/q4, q4/q4 with
   --kl-against f16: the JSON line is complete, bytes per token equal the
   format's arithmetic, f32 against f16 is near zero KL, and quantization
   costs grow as precision falls.
2. kv_type_k = auto: calibration chooses q4 keys on a generated qwen2 model
   without key bias, keeps keys at q8 (or above) when a large key bias makes
   them sensitive, and per layer keeps only the biased layer above q4.
3. A KV type kvqd does not know is refused with a clear message.
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


def kv_bytes_per_token(n_layers, n_kv, hd, tk, tv):
    def half(t):
        g = hd // min(32, hd)
        return {"f32": 4 * hd, "f16": 2 * hd, "q8": hd + 2 * g,
                "q4": hd // 2 + 2 * g}[t]
    return n_layers * n_kv * (half(tk) + half(tv))


def perplexity_cases(tap, kvqd, srcdir):
    model = testing.testdata("stories260K.gguf")
    text = os.path.join(srcdir, "tests", "data", "heldout_story.txt")
    if not model:
        tap.skip("perplexity on stories260K", "stories260K.gguf missing")
        return
    res = {}
    for tk, tv in (("f32", "f32"), ("f16", "f16"), ("q8", "q8"),
                   ("q8", "q4"), ("q4", "q4")):
        cmd = [kvqd, "--model", model, "--perplexity", text, "--ctx", "128",
               "--kv-type-k", tk, "--kv-type-v", tv, "--kl-against", "f16"]
        rc, so, se = testing.run(cmd)
        try:
            r = json.loads(so)
        except ValueError:
            tap.ok(False, "--perplexity %s/%s prints one JSON object (rc %d): %s"
                   % (tk, tv, rc, testing.tail(so + se, 5)))
            continue
        res[(tk, tv)] = r
        want = kv_bytes_per_token(5, 4, 8, tk, tv)
        tap.ok(rc == 0 and r["kv_bytes_per_token"] == want and r["ppl"] > 1
               and r["scored"] > 200,
               "--perplexity %s/%s: ppl %.4f (f16 %.4f, %+.3f%%), KL %.3g, "
               "%d B/token = arithmetic %d" % (
                   tk, tv, r["ppl"], r["ref_ppl"], r["delta_ppl_pct"],
                   r["kl_mean"], r["kv_bytes_per_token"], want))
    if len(res) == 5:
        f32, q8, q84, q4 = (res[("f32", "f32")], res[("q8", "q8")],
                            res[("q8", "q4")], res[("q4", "q4")])
        tap.ok(f32["kl_mean"] < 1e-4 and abs(f32["delta_ppl_pct"]) < 0.05,
               "f32 against f16 cache: KL %.3g, dPPL %+.4f%% (both ~0)"
               % (f32["kl_mean"], f32["delta_ppl_pct"]))
        tap.ok(res[("f16", "f16")]["kl_mean"] == 0,
               "f16 against itself: KL exactly 0")
        tap.ok(0 < q8["kl_mean"] < q84["kl_mean"] < q4["kl_mean"],
               "KL grows as precision falls: q8/q8 %.3g < q8/q4 %.3g < q4/q4 %.3g"
               % (q8["kl_mean"], q84["kl_mean"], q4["kl_mean"]))
        tap.ok(abs(q8["delta_ppl_pct"]) < 1.0,
               "q8/q8 perplexity within 1%% of f16 (%+.3f%%)"
               % q8["delta_ppl_pct"])


def calib_decision(kvqd, model):
    rc, so, se = testing.run([kvqd, "--model", model, "--prompt", "Once upon",
                              "--max-tokens", "1", "--kv-type-k", "auto",
                              "--verbose"])
    m = re.search(r"KV key calibration: keys (.*?) \(err q8 ([0-9.e+-]+), "
                  r"q4 ([0-9.e+-]+)", se)
    return rc, m, se


def set_key_bias(path, value, layers):
    import numpy as np
    from kvq_gguf import GGUFReader
    r = GGUFReader(path)
    todo = [(t.file_offset, t.n_elements) for t in r.tensors
            if t.name.endswith("attn_k.bias")
            and int(t.name.split(".")[1]) in layers]
    r.close()
    with open(path, "r+b") as f:
        for off, n in todo:
            b = np.zeros(n, dtype="<f4")
            b[::32] = value     # one large channel per 32-channel group
            f.seek(off)
            f.write(b.tobytes())


def calibration_cases(tap, kvqd, srcdir, tmp):
    gen = os.path.join(srcdir, "tools", "gen_model.py")
    base = os.path.join(tmp, "qwen2.gguf")
    rc, so, se = testing.run([sys.executable, gen, "--out", base, "--arch",
                              "qwen2", "--type", "F32", "--dim", "256",
                              "--layers", "2", "--heads", "4", "--kv-heads",
                              "2", "--ffn", "512", "--ctx", "512", "--seed",
                              "1", "-q"])
    if rc != 0:
        tap.ok(False, "gen_model for calibration: " + testing.tail(se, 5))
        return
    set_key_bias(base, 0.0, (0, 1))
    rc, m, se = calib_decision(kvqd, base)
    tap.ok(rc == 0 and m and m.group(1) == "q4",
           "auto: keys without bias go to q4 (%s)"
           % (m.group(0) if m else testing.tail(se, 3)))
    biased = os.path.join(tmp, "qwen2-bias.gguf")
    with open(base, "rb") as a, open(biased, "wb") as b:
        b.write(a.read())
    set_key_bias(biased, 20.0, (0, 1))
    rc, m, se = calib_decision(kvqd, biased)
    tap.ok(rc == 0 and m and m.group(1) in ("q8", "f16"),
           "auto: a large key bias keeps keys at q8 or above (%s)"
           % (m.group(0) if m else testing.tail(se, 3)))
    one = os.path.join(tmp, "qwen2-bias1.gguf")
    with open(base, "rb") as a, open(one, "wb") as b:
        b.write(a.read())
    set_key_bias(one, 20.0, (1,))
    rc, m, se = calib_decision(kvqd, one)
    tap.ok(rc == 0 and m and m.group(1).startswith("mixed: 1 q4"),
           "auto per layer: only the biased layer stays above q4 (%s)"
           % (m.group(0) if m else testing.tail(se, 3)))


def main():
    tap = testing.Tap()
    if testing.missing_modules(("numpy",)):
        return testing.skip_all("numpy is missing")
    kvqd = testing.kvqd_path()
    srcdir = testing.srcdir()
    with testing.tempdir() as tmp:
        perplexity_cases(tap, kvqd, srcdir)
        calibration_cases(tap, kvqd, srcdir, tmp)
    model = testing.testdata("stories260K.gguf")
    if model:
        rc, so, se = testing.run([kvqd, "--model", model, "--prompt", "x",
                                  "--kv-type-k", "q5"])
        tap.ok(rc != 0 and "unknown KV cache type" in se and "q5" in se,
               "--kv-type-k q5 is refused: " + testing.tail(se, 1).strip())
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
