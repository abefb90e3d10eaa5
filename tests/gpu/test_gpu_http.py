#!/usr/bin/env python3
"""kvqd on a GPU through the HTTP API: steps of four sequences choose their
tokens with the device sampler.

Two daemons serve stories260K, one with --device cuda and one with
--device cpu.  Four prompts in one request decode together (4 rows a
step), so the GPU daemon samples on the device:
  - greedy, 40 tokens each: the texts equal the CPU daemon's, and
    kvqd_tokens_sampled_gpu_total counts the 160 tokens (greedy tokens are
    always chosen on the device);
  - with logprobs (the logits also come back): the same texts, and each
    token's logprob is a log-probability;
  - sampled (T 0.8, a seed): the same request twice gives the same texts.
Then a third daemon serves a small Q4_K model as if the device were short
of memory (KVQ_GPU_FAULT=small-memory): it keeps the weights 4-bit on its
own, and /metrics (kvqd_gpu_weights_kquant_compact) and kvqctl status say
so, where the stories260K daemon says they are not.
Skipped without a GPU (tests/gpu/test_gpu_fwd probes for one).
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went",
           "One day, a big"]
N = 40


def texts(r):
    ch = sorted(r["choices"], key=lambda c: c["index"])
    return [c["text"] for c in ch]


def compact_case(tap, kvqd, tmp, vocab):
    """A Q4_K model short of device memory: kept 4-bit, and said so."""
    src = os.environ.get("KVQ_SRCDIR") or \
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    q4k = os.path.join(tmp, "q4k.gguf")
    rc, _, err = testing.run([sys.executable,
                              os.path.join(src, "tools", "gen_model.py"),
                              "-q", "--out", q4k, "--arch", "llama",
                              "--type", "Q4_K", "--dim", "256", "--layers",
                              "2", "--heads", "4", "--ffn", "512", "--ctx",
                              "512", "--vocab-from", vocab])
    if rc:
        tap.ok(False, "gen_model.py Q4_K: %s" % err)
        return
    os.environ["KVQ_GPU_FAULT"] = "small-memory"
    try:
        d = testing.Daemon(kvqd, q4k, tmp, "q4k", ["--device", "cuda"], 60)
    finally:
        del os.environ["KVQ_GPU_FAULT"]
    try:
        out = d.complete({"prompt": "Once upon", "max_tokens": 8,
                          "temperature": 0})
        tap.ok(out["usage"]["completion_tokens"] == 8 and
               d.metric("kvqd_gpu_weights_kquant_compact") == 1,
               "Q4_K short of device memory: served, and "
               "kvqd_gpu_weights_kquant_compact 1")
        ctl = os.path.join(os.environ.get("KVQ_BUILDDIR", "."), "kvqctl")
        rc, out, _ = testing.run([ctl, "--socket",
                                  os.path.join(tmp, "q4k", "admin.sock"),
                                  "status"])
        line = [x for x in out.splitlines() if x.startswith("gpu weights:")]
        tap.ok(rc == 0 and len(line) == 1 and "Q4_K kept" in line[0] and
               "would take" in line[0],
               "kvqctl status: %s" % (line[0] if line else out[-200:]))
    finally:
        d.stop()


def main():
    tap = testing.Tap()
    model = testing.testdata("stories260K.gguf")
    if not model:
        return testing.skip_all("stories260K.gguf not found")
    probe = os.path.join(os.environ.get("KVQ_BUILDDIR", "."), "tests", "gpu",
                         "test_gpu_fwd")
    if not os.path.exists(probe) or \
            subprocess.run([probe], stdout=subprocess.DEVNULL).returncode == 77:
        return testing.skip_all("no GPU")
    kvqd = testing.kvqd_path()
    greedy = {"prompt": PROMPTS, "max_tokens": N, "temperature": 0,
              "ignore_eos": True}
    with testing.tempdir() as tmp:
        gpu = testing.Daemon(kvqd, model, tmp, "gpu",
                             ["--device", "cuda", "--max-running", "4"], 60)
        cpu = testing.Daemon(kvqd, model, tmp, "cpu",
                             ["--device", "cpu", "--max-running", "4"])
        try:
            g = gpu.complete(greedy)
            c = cpu.complete(greedy)
            tap.ok(texts(g) == texts(c) and
                   g["usage"]["completion_tokens"] == 4 * N,
                   "4 greedy sequences decoded together on the GPU give the "
                   "CPU's texts (%d tokens)" % g["usage"]["completion_tokens"])
            n_gpu = gpu.metric("kvqd_tokens_sampled_gpu_total")
            tap.ok(n_gpu == 4 * N,
                   "kvqd_tokens_sampled_gpu_total counts the %d tokens "
                   "(%s)" % (4 * N, n_gpu))
            tap.ok(cpu.metric("kvqd_tokens_sampled_gpu_total") == 0,
                   "and is 0 on the CPU daemon")
            busy = gpu.metric("kvqd_gpu_busy_seconds_total")
            wall = gpu.metric("kvqd_engine_step_seconds_total")
            tap.ok(busy is not None and wall is not None and
                   0 < busy <= wall,
                   "kvqd_gpu_busy_seconds_total counts the device's time "
                   "within the steps' (%s of %s s)" % (busy, wall))
            lp = gpu.complete(dict(greedy, logprobs=2))
            lps = [x for ch in lp["choices"]
                   for x in ch["logprobs"]["token_logprobs"]]
            tap.ok(texts(lp) == texts(g) and len(lps) == 4 * N and
                   all(x is not None and x <= 0.0 for x in lps),
                   "with logprobs (logits back as well): the same texts, "
                   "%d logprobs <= 0" % len(lps))
            n2 = gpu.metric("kvqd_tokens_sampled_gpu_total") - n_gpu
            tap.ok(n2 == 4 * N,
                   "and those tokens were sampled on the GPU too (%s)" % n2)
            smp = {"prompt": PROMPTS, "max_tokens": N, "temperature": 0.8,
                   "seed": 7, "ignore_eos": True}
            s1 = gpu.complete(smp)
            s2 = gpu.complete(smp)
            sc = cpu.complete(smp)
            tap.ok(texts(s1) == texts(s2) and texts(s1) != texts(g),
                   "sampled (T 0.8, seed 7): the same request twice gives "
                   "the same texts, not the greedy ones")
            same = sum(a == b for a, b in zip(texts(s1), texts(sc)))
            tap.diag("sampled texts equal to the CPU daemon's: %d of 4 "
                     "(rounding may part them)" % same)
            tap.ok(gpu.metric("kvqd_gpu_weights_kquant_compact") == 0,
                   "stories260K: kvqd_gpu_weights_kquant_compact 0")
        finally:
            gpu.stop()
            cpu.stop()
        compact_case(tap, kvqd, tmp, model)
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
