#!/usr/bin/python3
"""http_bench.py - kvqd serving speed over HTTP against the one-shot engine.

Why this file exists: the daemon wraps the engine in an HTTP server and a
continuous-batching scheduler.  This benchmark measures what that costs and
what it buys, in one invocation per model:

  - one-shot decode tokens/s (`kvqd --prompt ... --bench-json`), with the
    same prompt and max_tokens as the streams below;
  - GET /health requests per second (several keep-alive connections for a
    few seconds; wrk when installed, else Python);
  - for 1, 4 and 16 simultaneous streaming completions of max_tokens tokens
    each (ignore_eos, temperature 0): aggregate generated tokens over wall
    time, aggregate decode tokens/s, per-stream TTFT and inter-token latency
    medians, engine steps and tokens per step from /metrics, and the CPU
    time the daemon used;

and prints one JSON document with the serving overhead at one stream against
the one-shot figure and the aggregate decode speed-up per concurrency.

Usage: bench/http_bench.py [--model F]... [--prompt TEXT] [--max-tokens N]
           [--streams "1 4 16"] [--runs N] [--run-budget S] [--threads N]
           [--health-seconds S] [--health-conns N]
Run it from a build directory after `make bench`, or point it at kvqd:
  KVQD            the kvqd binary (default ./kvqd)
Without --model the bundled model (SRCDIR/models/kvq-austen-5m.gguf) is
measured; --model may be given several times.  --max-tokens defaults to
about 1.5 s of one-shot decoding per stream (16..256, fitted to the
context).

Fairness and stability: both sides decode the same prompt to the same
max_tokens (ignore_eos, temperature 0) with the same --threads.  Each side
is warmed up first (a short one-shot run, a short stream), then each figure
is measured --runs times (default 5; once when a run takes longer than
--run-budget seconds, default 8), the one-shot runs alternating with the
one-stream runs so that both see the same share of a CPU that other jobs
may be using, and the median run counts (all runs are listed, with the
best).  The JSON goes to stdout and progress to stderr.

Definitions, per concurrency N (all streams are released together):
  aggregate_tps         sum of completion_tokens / (last [DONE] - first send)
  aggregate_decode_tps  sum of (completion_tokens - 1) / (last token event -
                        first token event): the decode phase, as the one-shot
                        decode_tps (which also excludes the first token)
  server_decode_tps     streams * inter-token count / inter-token seconds
                        from /metrics (kvqd_inter_token_seconds): the
                        scheduler's decode speed, without delivery
  serving_overhead_pct  100 * (1 - the median over the one-stream runs of
                        aggregate_decode_tps / the mean of the one-shot
                        decode_tps measured just before and just after it):
                        paired, so that a CPU whose speed drifts (other
                        jobs, clocks) weighs on both sides alike; pairs
                        whose two one-shot runs differ by more than 10%
                        are left out (serving_overhead_pairs_steady)
  serving_overhead_medians_pct  the same from the medians of both sides
  scheduler_overhead_pct  the paired figure from server_decode_tps: what
                        serving costs the decode steps themselves
Token counts come from usage (stream_options.include_usage), not from events.
Inter-token latency: itl_ms_* are the gaps between events as the client
reads them (kvqd may write several events at once, see PROTOCOL.md, so the
median can be 0); server_itl_ms_mean is the scheduler's own.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SRCDIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(SRCDIR, "models", "kvq-austen-5m.gguf")
PROMPT = ("It is a truth universally acknowledged, that a single man in "
          "possession of a good fortune, must be in want of a wife.")
HOST = "127.0.0.1"
# One-shot runs just before and after a stream run that differ by more than
# this fraction saw the CPU change speed: that pair is left out (unless all
# are).
STEADY = 0.10


def log(msg):
    sys.stderr.write("http_bench.py: %s\n" % msg)
    sys.stderr.flush()


def median(xs):
    return statistics.median(xs) if xs else None


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]


def r3(x, nd=3):
    return None if x is None else round(x, nd)


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------- one-shot

def oneshot(kvqd, model, prompt, max_tokens, threads):
    """One `kvqd --bench-json` run: its JSON line, or raises."""
    cmd = [kvqd, "--model", model, "--prompt", prompt,
           "--max-tokens", str(max_tokens), "--temperature", "0",
           "--ignore-eos", "--bench-json", "--threads", str(threads)]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=600)
    found = None
    for line in p.stderr.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{") and "decode_tps" in line:
            try:
                found = json.loads(line)
            except ValueError:
                pass
    if p.returncode != 0 or found is None:
        raise RuntimeError("one-shot kvqd exited %d: %s" % (
            p.returncode, p.stderr.decode(errors="replace")[-500:]))
    return found


# --------------------------------------------------------------- daemon

def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    def __init__(self, kvqd, model, threads, max_running):
        self.dir = tempfile.mkdtemp(prefix="kvq-http-bench.")
        self.port = free_port()
        self.logpath = os.path.join(self.dir, "kvqd.log")
        self.logf = open(self.logpath, "wb")
        cmd = [kvqd, "--model", model, "--listen", "%s:%d" % (HOST, self.port),
               "--state-dir", self.dir, "--threads", str(threads),
               "--max-running", str(max_running),
               "--max-queued", str(max(64, max_running))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=self.logf)
        deadline = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("kvqd exited %d at start: %s" % (
                    self.proc.returncode, self.log_tail()))
            try:
                st, _, body = http_request(self.port, "GET", "/health")
                if st == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("kvqd not ready after 120 s: " +
                                   self.log_tail())
            time.sleep(0.05)

    def log_tail(self, n=8):
        try:
            with open(self.logpath, errors="replace") as f:
                return " | ".join(l.rstrip() for l in f.readlines()[-n:])
        except OSError:
            return ""

    def cpu_s(self):
        """User + system CPU seconds the daemon has used so far."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tck

    def metrics(self):
        """Counters of /metrics as {name: value} (unlabelled samples)."""
        st, _, body = http_request(self.port, "GET", "/metrics")
        out = {}
        for line in body.decode(errors="replace").splitlines():
            m = re.match(r"^([a-z_]+) ([0-9.eE+-]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------ raw HTTP

def read_response_head(sock, buf):
    """Read until the end of the header block; (status, headers, rest)."""
    while b"\r\n\r\n" not in buf:
        d = sock.recv(65536)
        if not d:
            raise OSError("connection closed before the response head")
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def dechunk(data):
    """Body of a chunked transfer (as far as it is complete)."""
    out = bytearray()
    i = 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            break
        size = int(data[i:j].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[j + 2:j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)


def read_body(sock, headers, rest):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            d = sock.recv(65536)
            if not d:
                break
            rest += d
        return dechunk(rest)
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        d = sock.recv(65536)
        if not d:
            break
        rest += d
    return rest[:n]


def http_request(port, method, path, body=None):
    """One request on a fresh connection: (status, headers, body)."""
    s = socket.create_connection((HOST, port), timeout=30)
    try:
        s.sendall(request_bytes(method, path, body, close=True))
        st, hd, rest = read_response_head(s, b"")
        return st, hd, read_body(s, hd, rest)
    finally:
        s.close()


def request_bytes(method, path, body=None, close=False):
    h = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, HOST)
    if body is not None:
        h += ("Content-Type: application/json\r\nContent-Length: %d\r\n"
              % len(body))
    if close:
        h += "Connection: close\r\n"
    return (h + "\r\n").encode() + (body or b"")


# -------------------------------------------------------------- /health

def health_python(port, seconds, conns):
    req = request_bytes("GET", "/health")
    stop_at = [0.0]
    results = []
    lock = threading.Lock()
    barrier = threading.Barrier(conns + 1)

    def worker():
        n, errs, lat = 0, 0, []
        s = socket.create_connection((HOST, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        barrier.wait()
        buf = b""
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                s.sendall(req)
                st, hd, rest = read_response_head(s, buf)
                n_body = int(hd.get("content-length", "0"))
                while len(rest) < n_body:
                    rest += s.recv(65536)
                buf = rest[n_body:]
            except OSError:
                errs += 1
                s.close()
                s = socket.create_connection((HOST, port), timeout=10)
                buf = b""
                continue
            if st == 200:
                n += 1
            else:
                errs += 1
            if len(lat) < 200000:
                lat.append(time.perf_counter() - t0)
            if hd.get("connection", "").lower() == "close":
                s.close()
                s = socket.create_connection((HOST, port), timeout=10)
                buf = b""
        s.close()
        with lock:
            results.append((n, errs, lat))

    ths = [threading.Thread(target=worker) for _ in range(conns)]
    for t in ths:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    barrier.wait()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    n = sum(r[0] for r in results)
    lat = [x for r in results for x in r[2]]
    return {
        "client": "python (%d threads, keep-alive, one process)" % conns,
        "connections": conns,
        "seconds": round(wall, 3),
        "requests": n,
        "errors": sum(r[1] for r in results),
        "rps": round(n / wall, 1),
        "latency_ms_p50": r3(median(lat) * 1e3 if lat else None),
        "latency_ms_p99": r3(pct(lat, 99) * 1e3 if lat else None),
    }


def health_wrk(wrk, port, seconds, conns):
    threads = max(1, min(conns, os.cpu_count() or 1))
    cmd = [wrk, "-t%d" % threads, "-c%d" % conns, "-d%ds" % seconds,
           "--latency", "http://%s:%d/health" % (HOST, port)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=seconds + 60)
    out = p.stdout.decode(errors="replace")
    m = re.search(r"Requests/sec:\s*([0-9.]+)", out)
    if p.returncode != 0 or not m:
        raise RuntimeError("wrk failed: " + out[-300:])
    res = {"client": "wrk -t%d -c%d" % (threads, conns),
           "connections": conns, "seconds": seconds,
           "rps": float(m.group(1))}
    m = re.search(r"(\d+) requests in", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    res["errors"] = int(m.group(1)) if m else 0
    for q, key in (("50%", "latency_ms_p50"), ("99%", "latency_ms_p99")):
        m = re.search(r"^\s*%s\s+([0-9.]+)(us|ms|s)\s*$" % re.escape(q),
                      out, re.M)
        if m:
            mult = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            res[key] = round(float(m.group(1)) * mult, 3)
    return res


def health(port, seconds, conns):
    wrk = shutil.which("wrk")
    if wrk:
        try:
            return health_wrk(wrk, port, seconds, conns)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log("%s; measuring /health with Python" % e)
    return health_python(port, seconds, conns)


# ------------------------------------------------------------- streams

def stream_one(port, body, barrier, out):
    """One streaming completion; fills out with times and the parsed end."""
    try:
        stream_one_(port, body, barrier, out)
    except (OSError, ValueError, IndexError) as e:
        out.update(status=None, body=str(e).encode())


def stream_one_(port, body, barrier, out):
    s = socket.create_connection((HOST, port), timeout=300)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = request_bytes("POST", "/v1/completions", body, close=True)
    barrier.wait()
    t_send = time.perf_counter()
    s.sendall(req)
    st, hd, rest = read_response_head(s, b"")
    # (time, events seen so far) per read; an event line starts "\ndata: ".
    marks = []
    raw = bytearray(rest)
    n_ev = raw.count(b"\ndata: ")
    if n_ev:
        marks.append((time.perf_counter(), n_ev))
    while st == 200 and b"data: [DONE]" not in raw[-64:]:
        d = s.recv(65536)
        t = time.perf_counter()
        if not d:
            break
        tail = len(raw)
        raw += d
        n = raw.count(b"\ndata: ", max(0, tail - 6))
        if n:
            n_ev += n
            marks.append((t, n_ev))
    t_done = time.perf_counter()
    s.close()
    body_bytes = dechunk(bytes(raw)) if "chunked" in hd.get(
        "transfer-encoding", "") else bytes(raw)
    out.update(status=st, t_send=t_send, t_done=t_done, marks=marks,
               body=body_bytes)


def event_time(marks, k):
    """Arrival time of event k (0-based)."""
    for t, n in marks:
        if n > k:
            return t
    return None


def analyse_stream(o):
    """Per-stream figures from what stream_one recorded."""
    if o.get("status") != 200:
        return {"error": "HTTP %s: %s" % (o.get("status"),
                                          o.get("body", b"")[:200])}
    events = []
    for block in o["body"].decode(errors="replace").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                events.append(line[6:])
    usage, token_ev, finish, err = None, [], None, None
    for i, e in enumerate(events):
        if e == "[DONE]":
            continue
        j = json.loads(e)
        if "error" in j:
            err = j["error"]
            continue
        if j.get("usage"):
            usage = j["usage"]
        ch = j.get("choices") or []
        if ch:
            token_ev.append(i)
            if ch[0].get("finish_reason"):
                finish = ch[0]["finish_reason"]
    if err or usage is None or not token_ev:
        return {"error": err or "no usage or no tokens in the stream"}
    times = [event_time(o["marks"], i) for i in token_ev]
    return {
        "t_send": o["t_send"], "t_done": o["t_done"],
        "t_first": times[0], "t_last": times[-1],
        "ttft": times[0] - o["t_send"],
        "gaps": [b - a for a, b in zip(times, times[1:])],
        "completion_tokens": usage["completion_tokens"],
        "prompt_tokens": usage["prompt_tokens"],
        "token_events": len(token_ev),
        "finish_reason": finish,
    }


def run_streams(d, n, prompt, max_tokens):
    body = json.dumps({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }).encode()
    m0, cpu0, la0 = d.metrics(), d.cpu_s(), os.getloadavg()[0]
    me0 = os.times()
    barrier = threading.Barrier(n)
    outs = [dict() for _ in range(n)]
    ths = [threading.Thread(target=stream_one,
                            args=(d.port, body, barrier, outs[i]))
           for i in range(n)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    cpu1, me1, m1 = d.cpu_s(), os.times(), d.metrics()
    res = [analyse_stream(o) for o in outs]
    bad = [r["error"] for r in res if "error" in r]
    if bad:
        return {"streams": n, "errors": len(bad), "first_error": str(bad[0])}
    t0 = min(r["t_send"] for r in res)
    t1 = max(r["t_done"] for r in res)
    f0 = min(r["t_first"] for r in res)
    f1 = max(r["t_last"] for r in res)
    toks = sum(r["completion_tokens"] for r in res)
    dec = sum(r["completion_tokens"] - 1 for r in res)
    gaps = [g for r in res for g in r["gaps"]]
    steps = m1.get("kvqd_engine_steps_total", 0) - \
        m0.get("kvqd_engine_steps_total", 0)
    gen = m1.get("kvqd_tokens_generated_total", 0) - \
        m0.get("kvqd_tokens_generated_total", 0)
    # the scheduler's own inter-token times: decode speed without delivery
    itl_n = m1.get("kvqd_inter_token_seconds_count", 0) - \
        m0.get("kvqd_inter_token_seconds_count", 0)
    itl_s = m1.get("kvqd_inter_token_seconds_sum", 0) - \
        m0.get("kvqd_inter_token_seconds_sum", 0)
    return {
        "streams": n,
        "wall_s": r3(t1 - t0),
        "completion_tokens": toks,
        "prompt_tokens_each": res[0]["prompt_tokens"],
        "token_events": sum(r["token_events"] for r in res),
        "finish_reasons": sorted(set(r["finish_reason"] for r in res)),
        "aggregate_tps": r3(toks / (t1 - t0), 2),
        "aggregate_decode_tps": r3(dec / (f1 - f0), 2) if f1 > f0 else None,
        "per_stream_decode_tps_median": r3(median(
            [(r["completion_tokens"] - 1) / (r["t_last"] - r["t_first"])
             for r in res if r["t_last"] > r["t_first"]]), 2),
        "ttft_ms_median": r3(median([r["ttft"] for r in res]) * 1e3),
        "ttft_ms_max": r3(max(r["ttft"] for r in res) * 1e3),
        "itl_ms_median": r3(median(gaps) * 1e3 if gaps else None),
        "itl_ms_p90": r3(pct(gaps, 90) * 1e3 if gaps else None),
        "server_decode_tps": r3(n * itl_n / itl_s, 2) if itl_s > 0 else None,
        "server_itl_ms_mean": r3(itl_s * 1e3 / itl_n) if itl_n else None,
        "engine_steps": int(steps),
        "tokens_per_step": r3(gen / steps, 2) if steps else None,
        "daemon_cpu_s": r3(cpu1 - cpu0),
        "daemon_cpu_ms_per_token": r3((cpu1 - cpu0) * 1e3 / toks),
        "client_cpu_s": r3((me1[0] + me1[1]) - (me0[0] + me0[1])),
        "loadavg_1m_before": round(la0, 2),
    }


def best(runs, key):
    ok = [r for r in runs if r.get(key) is not None]
    return max(ok, key=lambda r: r[key]) if ok else None


def median_run(runs, key):
    """The run whose @key is the median (the lower one of an even count)."""
    ok = sorted((r for r in runs if r.get(key) is not None),
                key=lambda r: r[key])
    return ok[(len(ok) - 1) // 2] if ok else None


# ------------------------------------------------------------------ main

def bench_model(a, model):
    log("model %s" % model)
    doc = {"model": model, "file_bytes": os.path.getsize(model)}
    probe = oneshot(a.kvqd, model, a.prompt, 16, a.threads)
    n_ctx_model = None
    max_tokens = a.max_tokens
    if not max_tokens:
        max_tokens = int(probe["decode_tps"] * 1.5)
        max_tokens = max(16, min(256, max_tokens))
    d = Daemon(a.kvqd, model, a.threads, max(a.streams))
    try:
        st, _, body = http_request(d.port, "GET", "/v1/models")
        meta = json.loads(body)["data"][0].get("meta", {})
        n_ctx_model = meta.get("n_ctx")
        if n_ctx_model:
            max_tokens = min(max_tokens, n_ctx_model - probe["prompt_tokens"]
                             - 1)
        doc.update(model_id=json.loads(body)["data"][0]["id"],
                   weight_bytes=probe.get("weight_bytes"), n_ctx=n_ctx_model,
                   prompt_tokens=probe["prompt_tokens"],
                   max_tokens=max_tokens, simd=probe.get("simd"))

        # Warm-up: page cache, allocator and first connections on both
        # sides (the probe above warmed the one-shot binary).
        log("  warm-up stream")
        run_streams(d, 1, a.prompt, 16)

        # The one-shot runs alternate with the one-stream runs, so that both
        # see the same share of a CPU that other jobs may be using.
        shots, one = [], []
        for i in range(a.runs):
            log("  one-shot run %d (max_tokens %d)" % (i + 1, max_tokens))
            t = time.time()
            j = oneshot(a.kvqd, model, a.prompt, max_tokens, a.threads)
            shots.append({"decode_tps": j["decode_tps"],
                          "decode_tokens": j.get("decode_tokens"),
                          "prompt_tps": j.get("prompt_tps"),
                          "loadavg_1m": round(os.getloadavg()[0], 2)})
            if 1 in a.streams:
                log("  1 stream run %d" % (i + 1))
                one.append(run_streams(d, 1, a.prompt, max_tokens))
            if time.time() - t > a.run_budget:
                break
        if one:
            # one more, so that every stream run has a one-shot run after it
            log("  one-shot run %d" % (len(shots) + 1))
            j = oneshot(a.kvqd, model, a.prompt, max_tokens, a.threads)
            shots.append({"decode_tps": j["decode_tps"],
                          "decode_tokens": j.get("decode_tokens"),
                          "prompt_tps": j.get("prompt_tps"),
                          "loadavg_1m": round(os.getloadavg()[0], 2)})

        log("  /health for %g s" % a.health_seconds)
        doc["health"] = health(d.port, a.health_seconds, a.health_conns)

        levels = {}
        for n in a.streams:
            runs = one if n == 1 else []
            for i in range(a.runs if n != 1 else 0):
                log("  %d streams run %d" % (n, i + 1))
                t = time.time()
                runs.append(run_streams(d, n, a.prompt, max_tokens))
                if time.time() - t > a.run_budget:
                    break
            b = median_run(runs, "aggregate_decode_tps")
            levels[str(n)] = {
                "median": b,
                "best_aggregate_decode_tps": (best(
                    runs, "aggregate_decode_tps") or {}).get(
                    "aggregate_decode_tps"),
                "aggregate_decode_tps_runs": [r.get("aggregate_decode_tps")
                                              for r in runs],
                "aggregate_tps_runs": [r.get("aggregate_tps") for r in runs],
                "runs": runs,
            }
    finally:
        d.stop()

    bs = median_run(shots, "decode_tps")
    doc["oneshot"] = {"decode_tps": bs["decode_tps"],
                      "best_decode_tps": best(shots, "decode_tps")[
                          "decode_tps"],
                      "decode_tokens": bs["decode_tokens"],
                      "prompt_tps": bs["prompt_tps"],
                      "decode_tps_runs": [s["decode_tps"] for s in shots],
                      "loadavg_1m_runs": [s["loadavg_1m"] for s in shots]}
    doc["streams"] = levels

    base = levels.get("1", {}).get("median")
    if base and base.get("aggregate_decode_tps"):
        ov_med = 100.0 * (1 - base["aggregate_decode_tps"] / bs["decode_tps"])
        ratios, sratios, steady = [], [], []
        for i, r in enumerate(one):
            near = [x["decode_tps"] for x in shots[i:i + 2]]
            ref = sum(near) / len(near)
            if not r.get("aggregate_decode_tps"):
                continue
            # a pair whose one-shot runs disagree saw the CPU change speed
            steady.append(max(near) - min(near) <= STEADY * ref)
            ratios.append(r["aggregate_decode_tps"] / ref)
            if r.get("server_decode_tps"):
                sratios.append(r["server_decode_tps"] / ref)
        keep = [x for x, k in zip(ratios, steady) if k] or ratios
        skeep = [x for x, k in zip(sratios, steady) if k] or sratios
        ov = 100.0 * (1 - median(keep))
        ov_e2e = 100.0 * (1 - base["aggregate_tps"] / bs["decode_tps"])
        ov_best = 100.0 * (1 - levels["1"]["best_aggregate_decode_tps"] /
                           doc["oneshot"]["best_decode_tps"])
        doc["serving_overhead_pct"] = round(ov, 2)
        doc["serving_overhead_ok"] = ov <= 5.0
        doc["serving_overhead_runs_pct"] = [round(100.0 * (1 - x), 2)
                                            for x in ratios]
        doc["serving_overhead_pairs_steady"] = steady
        doc["serving_overhead_medians_pct"] = round(ov_med, 2)
        if sratios:
            doc["scheduler_overhead_pct"] = round(
                100.0 * (1 - median(skeep)), 2)
        doc["serving_overhead_e2e_pct"] = round(ov_e2e, 2)
        doc["serving_overhead_best_vs_best_pct"] = round(ov_best, 2)
    curve = []
    for n in a.streams:
        b = levels[str(n)]["median"]
        if not b or not b.get("aggregate_decode_tps"):
            continue
        curve.append({
            "streams": n,
            "aggregate_decode_tps": b["aggregate_decode_tps"],
            "aggregate_tps": b["aggregate_tps"],
            "vs_oneshot": round(b["aggregate_decode_tps"] / bs["decode_tps"],
                                3),
            "vs_1_stream": round(b["aggregate_decode_tps"] /
                                 base["aggregate_decode_tps"], 3)
            if base else None,
            "tokens_per_step": b["tokens_per_step"],
            "ttft_ms_median": b["ttft_ms_median"],
            "itl_ms_median": b["itl_ms_median"],
            "server_itl_ms_mean": b["server_itl_ms_mean"],
        })
    doc["curve"] = curve
    tps = [c["aggregate_decode_tps"] for c in curve]
    doc["rises_with_concurrency"] = all(y > x for x, y in zip(tps, tps[1:]))
    return doc


def main():
    ap = argparse.ArgumentParser(
        description="kvqd HTTP serving benchmark (JSON on stdout)")
    ap.add_argument("--model", action="append",
                    help="GGUF model (repeatable; default the bundled one)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-tokens", type=int, default=0,
                    help="tokens per stream (0: about 1.5 s of one-shot "
                         "decoding, 16..256)")
    ap.add_argument("--streams", default="1 4 16",
                    help="concurrency levels (default \"1 4 16\")")
    ap.add_argument("--runs", type=int, default=5,
                    help="runs per figure; the median counts (default 5)")
    ap.add_argument("--run-budget", type=float, default=8.0,
                    help="a figure whose run took longer than this many "
                         "seconds is not repeated (default 8)")
    ap.add_argument("--threads", type=int, default=0,
                    help="kvqd --threads (0: one per CPU)")
    ap.add_argument("--health-seconds", type=float, default=3.0)
    ap.add_argument("--health-conns", type=int, default=4)
    a = ap.parse_args()
    a.kvqd = os.environ.get("KVQD", "./kvqd")
    a.streams = [int(x) for x in a.streams.replace(",", " ").split()]
    a.models = a.model or [BUNDLED]
    a.runs = max(1, a.runs)
    if not (os.path.isfile(a.kvqd) and os.access(a.kvqd, os.X_OK)):
        log("%s not found or not executable (make bench, or set KVQD)"
            % a.kvqd)
        return 1
    for m in a.models:
        if not os.path.isfile(m):
            log("model %s not found" % m)
            return 1

    t0 = time.time()
    la0 = loadavg()
    models = []
    for m in a.models:
        try:
            models.append(bench_model(a, m))
        except (RuntimeError, OSError, ValueError) as e:
            log("%s: %s" % (m, e))
            models.append({"model": m, "error": str(e)})
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = {
        "bench": "http",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "loadavg_start": la0, "loadavg_end": loadavg()},
        "kvqd": os.path.abspath(a.kvqd),
        "threads": a.threads,
        "runs": a.runs,
        "run_budget_s": a.run_budget,
        "prompt": a.prompt,
        "streams": a.streams,
        "seconds": round(time.time() - t0, 1),
        "children_cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
        "models": models,
    }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if all("error" not in m for m in models) else 1


if __name__ == "__main__":
    sys.exit(main())
