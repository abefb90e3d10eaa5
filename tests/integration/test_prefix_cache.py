#!/usr/bin/env python3
"""The prefix cache (prefix_cache = on) through the HTTP API.

kvqd serves stories260K with 32-token prefill chunks.  A greedy completion
of a ~100-token prompt computes everything (cached_tokens 0); the same
prompt again shares the finished request's KV for whole chunks
(cached_tokens 96, a multiple of 32, leaving the last token to compute) and
must give the same text; a prompt with the same start and another ending
shares the common chunks and gives the text a daemon without the cache
gives.  /metrics counts the shared tokens.  With prefix_cache = off nothing
is shared.
"""

import os
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

BASE = ("Once upon a time, there was a little girl named Lily. She loved to "
        "play outside in the sun with her dog. One day, she saw a big red "
        "ball in the park and ran to get it. ")


def greedy(d, prompt):
    return d.complete({"prompt": prompt, "max_tokens": 24, "temperature": 0})


def cached(r):
    return r["usage"]["prompt_tokens_details"]["cached_tokens"]


def main():
    tap = testing.Tap()
    model = testing.testdata("stories260K.gguf")
    if not model:
        return testing.skip_all("stories260K.gguf not found")
    kvqd = testing.kvqd_path()
    with testing.tempdir() as tmp:
        on = testing.Daemon(kvqd, model, tmp, "on", ["--prefill-chunk", "32"])
        off = testing.Daemon(kvqd, model, tmp, "off",
                             ["--prefill-chunk", "32", "--prefix-cache", "off"])
        try:
            prompt = BASE
            while on.n_tokens(prompt) < 100:
                prompt += "The sun was warm. "
            n = on.n_tokens(prompt)
            r1 = greedy(on, prompt)
            r2 = greedy(on, prompt)
            want = ((n - 1) // 32) * 32
            tap.ok(cached(r1) == 0,
                   "first request computes its %d-token prompt (cached %d)"
                   % (n, cached(r1)))
            tap.ok(cached(r2) == want,
                   "the same prompt again shares %d tokens, whole 32-token "
                   "chunks (got %d)" % (want, cached(r2)))
            tap.ok(r2["choices"][0]["text"] == r1["choices"][0]["text"],
                   "and gives the same text")
            other = prompt + "Then a bird sang in the tall tree."
            r3 = greedy(on, other)
            r3off = greedy(off, other)
            tap.ok(cached(r3) >= want and cached(r3) % 32 == 0 and
                   cached(r3) < on.n_tokens(other),
                   "a longer prompt with the same start shares %d tokens"
                   % cached(r3))
            tap.ok(r3["choices"][0]["text"] == r3off["choices"][0]["text"],
                   "and gives the text of a daemon without the cache")
            tap.ok(cached(r3off) == 0 and cached(greedy(off, other)) == 0,
                   "prefix_cache = off shares nothing")
            m = on.metric("kvqd_prompt_tokens_cached_total")
            tap.ok(m == cached(r2) + cached(r3),
                   "kvqd_prompt_tokens_cached_total counts them (%s)" % m)
        finally:
            on.stop()
            off.stop()
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
