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

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

BASE = ("Once upon a time, there was a little girl named Lily. She loved to "
        "play outside in the sun with her dog. One day, she saw a big red "
        "ball in the park and ran to get it. ")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    def __init__(self, kvqd, model, tmp, name, extra):
        self.port = free_port()
        d = os.path.join(tmp, name)
        os.makedirs(d, exist_ok=True)
        self.log = open(os.path.join(d, "log"), "w+")
        self.p = subprocess.Popen(
            [kvqd, "--model", model, "--listen", "127.0.0.1:%d" % self.port,
             "--admin-socket", os.path.join(d, "admin.sock"),
             "--state-dir", d, "--prefill-chunk", "32"] + extra,
            stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(400):
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=2):
                    return
            except Exception:
                if self.p.poll() is not None:
                    break
                time.sleep(0.05)
        self.log.seek(0)
        raise RuntimeError("kvqd did not become ready: " +
                           testing.tail(self.log.read()))

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def complete(self, prompt):
        body = json.dumps({"prompt": prompt, "max_tokens": 24,
                           "temperature": 0}).encode()
        rq = urllib.request.Request(self.url("/v1/completions"), data=body,
                                    headers={"Content-Type":
                                             "application/json"})
        with urllib.request.urlopen(rq, timeout=60) as f:
            return json.load(f)

    def n_tokens(self, text):
        rq = urllib.request.Request(self.url("/tokenize"),
                                    data=json.dumps({"content": text}).encode(),
                                    headers={"Content-Type":
                                             "application/json"})
        with urllib.request.urlopen(rq, timeout=10) as f:
            return len(json.load(f)["tokens"])

    def metric(self, name):
        with urllib.request.urlopen(self.url("/metrics"), timeout=10) as f:
            for line in f.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def cached(r):
    return r["usage"]["prompt_tokens_details"]["cached_tokens"]


def main():
    tap = testing.Tap()
    model = testing.testdata("stories260K.gguf")
    if not model:
        return testing.skip_all("stories260K.gguf not found")
    kvqd = testing.kvqd_path()
    with testing.tempdir() as tmp:
        on = Daemon(kvqd, model, tmp, "on", [])
        off = Daemon(kvqd, model, tmp, "off", ["--prefix-cache", "off"])
        try:
            prompt = BASE
            while on.n_tokens(prompt) < 100:
                prompt += "The sun was warm. "
            n = on.n_tokens(prompt)
            r1 = on.complete(prompt)
            r2 = on.complete(prompt)
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
            r3 = on.complete(other)
            r3off = off.complete(other)
            tap.ok(cached(r3) >= want and cached(r3) % 32 == 0 and
                   cached(r3) < on.n_tokens(other),
                   "a longer prompt with the same start shares %d tokens"
                   % cached(r3))
            tap.ok(r3["choices"][0]["text"] == r3off["choices"][0]["text"],
                   "and gives the text of a daemon without the cache")
            tap.ok(cached(r3off) == 0 and cached(off.complete(other)) == 0,
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
