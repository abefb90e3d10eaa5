#!/usr/bin/env python3
"""gpu_attn.py - GPU decode attention over the paged KV cache, per format,
against PyTorch SDPA (flash, fp16, enable_gqa=True) in the same run.

Prints one JSON document: for each K/V format, batch and context, the time
of one layer's decode attention (kvq_gpu_attn_decode), the bytes of pages
and scales it reads, effective GB/s, and SDPA's time on the same shapes
with the speedup; plus the GB/s of a plain streaming-read kernel as the
ceiling.  Every timing is the median over graph replays, each replay
running at least 16 calls over several copies of the data so that the
working set exceeds the L2 cache (a copy is read twice in a row only
when it alone is over 256 MiB), and so that the replay's own launch is
spread over many calls.

  python3 bench/gpu_attn.py --lib path/to/libkvqgpuattn.so
      [--heads 32] [--kv-heads 8] [--batches 1,8,16,64]
      [--contexts 1024,4096,32768,131072] [--shapes 1:1024,16:32768]
      [--formats q4/q4,q8/q4,f16/f16] [--pages random|ordered]
      [--page-tokens 16] [--head-dim 128]
      [--min-calls 16]

The library is kernels/attn_decode.cu, kernels/attn_append.cu and
bench/gpu_attn_stream.cu built with -shared.  --lib may be given more
than once as NAME=PATH (two builds of the kernel, say): every library is
timed on every shape against the same SDPA measurement, and each run
names its library.  --shapes (batch:context pairs) replaces the product
of --batches and --contexts.  --pages ordered gives each sequence
consecutive pages of the pool (random by default: scattered pages).
"""
import argparse
import ctypes as C
import json
import math
import sys

import torch
import torch.nn.functional as F

KV = {"f16": 1, "q8": 2, "q4": 3}
HD = 128
P = 16
N_SINK = 4
WORKING_SET = 256 << 20
PAGES = "random"
MIN_CALLS = 16


class Args(C.Structure):
    _fields_ = [
        ("q", C.c_void_p), ("out", C.c_void_p),
        ("q_type", C.c_int), ("out_type", C.c_int),
        ("k_pages", C.c_void_p), ("v_pages", C.c_void_p),
        ("k_page_bytes", C.c_size_t), ("v_page_bytes", C.c_size_t),
        ("k_type", C.c_int), ("v_type", C.c_int),
        ("block_table", C.c_void_p), ("bt_stride", C.c_uint32),
        ("seq_lens", C.c_void_p), ("max_len", C.c_uint32),
        ("sink", C.c_void_p), ("n_sink", C.c_uint32),
        ("batch", C.c_uint32), ("n_q_heads", C.c_uint32),
        ("n_kv_heads", C.c_uint32), ("head_dim", C.c_uint32),
        ("page_tokens", C.c_uint32), ("scale", C.c_float),
        ("workspace", C.c_void_p), ("workspace_bytes", C.c_size_t),
        ("append", C.c_void_p),
    ]


def row_bytes(t):
    return {"f16": 2 * HD, "q8": HD, "q4": HD // 2}[t]


def scale_bytes(t):
    return 0 if t == "f16" else 2 * (HD // 32)


def page_bytes(t, hk):
    n = hk * P * (row_bytes(t) + scale_bytes(t))
    return (n + 63) // 64 * 64


def fill_pool(pool, t, hk, n_pages):
    """Random codes, sane random scales (never zeros, never NaN)."""
    pb = pool.numel() // n_pages
    v = pool.view(n_pages, pb)
    data = hk * P * row_bytes(t)
    if t == "f16":
        v[:, :data].view(torch.float16).normal_()
        return
    v[:, :data].random_(0, 256)
    v[:, data:data + hk * P * scale_bytes(t)].view(torch.float16).uniform_(
        0.005, 0.05)


def time_graph(fn, copies, reps):
    """Median time of one call, from graph replays of at least MIN_CALLS
    calls cycling over `copies`.  A replay's launch is paid once per
    replay: with one or two long calls in the graph (a working set over
    WORKING_SET) it would be counted as kernel time (about 17 us on the
    H200)."""
    calls = copies * max(1, math.ceil(MIN_CALLS / copies))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(copies, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % copies)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    ts.sort()
    return ts[len(ts) // 2], ts[0], ts[-1]


def n_copies(nbytes):
    return max(1, min(64, math.ceil(WORKING_SET / max(nbytes, 1))))


def bench_kvq(lib, kt, vt, hq, hk, batch, ctx):
    pps = ctx // P
    one = batch * pps
    bytes_read = batch * ctx * hk * (row_bytes(kt) + scale_bytes(kt) +
                                     row_bytes(vt) + scale_bytes(vt))
    copies = n_copies(bytes_read)
    n_pages = one * copies
    kpb, vpb = page_bytes(kt, hk), page_bytes(vt, hk)
    dev = "cuda"
    kpool = torch.empty(n_pages * kpb, dtype=torch.uint8, device=dev)
    vpool = torch.empty(n_pages * vpb, dtype=torch.uint8, device=dev)
    fill_pool(kpool, kt, hk, n_pages)
    fill_pool(vpool, vt, hk, n_pages)
    if PAGES == "ordered":
        perm = torch.arange(n_pages, device=dev, dtype=torch.int64)
    else:
        perm = torch.randperm(n_pages, device=dev, dtype=torch.int64)
    bt = perm.to(torch.int32).view(copies, batch, pps).contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    sinks = torch.randn(batch, 2, N_SINK, hk * HD, device=dev).half()
    sink_ptrs = torch.tensor([sinks[b].data_ptr() for b in range(batch)],
                             dtype=torch.int64, device=dev)
    q = torch.randn(batch, hq, HD, device=dev).half()
    out = torch.empty(batch, hq, HD, device=dev, dtype=torch.float16)
    a = Args()
    a.q, a.out, a.q_type, a.out_type = q.data_ptr(), out.data_ptr(), 1, 1
    a.k_pages, a.v_pages = kpool.data_ptr(), vpool.data_ptr()
    a.k_page_bytes, a.v_page_bytes = kpb, vpb
    a.k_type, a.v_type = KV[kt], KV[vt]
    a.bt_stride, a.seq_lens, a.max_len = pps, lens.data_ptr(), ctx
    a.sink, a.n_sink = sink_ptrs.data_ptr(), N_SINK
    a.batch, a.n_q_heads, a.n_kv_heads = batch, hq, hk
    a.head_dim, a.page_tokens, a.scale = HD, P, 1.0 / math.sqrt(HD)
    wsb = lib.kvq_gpu_attn_workspace_bytes(C.byref(a))
    if not wsb:
        raise RuntimeError("workspace size 0")
    ws = torch.zeros(wsb, dtype=torch.uint8, device=dev)
    a.workspace, a.workspace_bytes = ws.data_ptr(), wsb
    bases = [bt[i].data_ptr() for i in range(copies)]

    def call(i):
        a.block_table = bases[i % copies]
        r = lib.kvq_gpu_attn_decode(
            C.byref(a), C.c_void_p(torch.cuda.current_stream().cuda_stream))
        if r:
            raise RuntimeError("kvq_gpu_attn_decode: %d" % r)

    reps = 30 if bytes_read * copies < (8 << 30) else 10
    med, lo, hi = time_graph(call, copies, reps)
    if not torch.isfinite(out.float()).all():
        raise RuntimeError("non-finite output")
    del kpool, vpool, ws
    torch.cuda.empty_cache()
    return {"us": med, "us_min": lo, "us_max": hi, "bytes": bytes_read,
            "gbs": bytes_read / med / 1e3, "copies": copies}


def bench_sdpa(hq, hk, batch, ctx):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    nbytes = batch * hk * ctx * HD * 2 * 2
    copies = n_copies(nbytes)
    dev = "cuda"
    q = torch.randn(batch, hq, 1, HD, device=dev).half()
    ks = [torch.randn(batch, hk, ctx, HD, device=dev).half()
          for _ in range(copies)]
    vs = [torch.randn(batch, hk, ctx, HD, device=dev).half()
          for _ in range(copies)]
    how = "flash enable_gqa"

    def gqa(i):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, ks[i], vs[i],
                                                  enable_gqa=True)

    qg = q.view(batch, hk, hq // hk, HD)

    def grouped(i):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qg, ks[i], vs[i])

    fn = gqa
    try:
        gqa(0)
        torch.cuda.synchronize()
    except Exception:
        fn, how = grouped, "flash, query heads of a KV head as rows"
    reps = 30 if nbytes * copies < (8 << 30) else 10
    med, lo, hi = time_graph(fn, copies, reps)
    del ks, vs
    torch.cuda.empty_cache()
    return {"us": med, "us_min": lo, "us_max": hi, "bytes": nbytes,
            "gbs": nbytes / med / 1e3, "how": how}


def bench_stream(lib):
    n = 4 << 30
    buf = torch.empty(n, dtype=torch.uint8, device="cuda")
    buf.random_(0, 256)
    props = torch.cuda.get_device_properties(0)
    blocks = props.multi_processor_count * 4
    sink = torch.zeros(blocks, dtype=torch.int32, device="cuda")

    def call(i):
        r = lib.kvq_bench_stream_read(
            C.c_void_p(buf.data_ptr()), C.c_size_t(n),
            C.c_void_p(sink.data_ptr()), blocks,
            C.c_void_p(torch.cuda.current_stream().cuda_stream))
        if r:
            raise RuntimeError("stream read: %d" % r)

    med, lo, hi = time_graph(call, 1, 20)
    del buf
    torch.cuda.empty_cache()
    return {"bytes": n, "us": med, "gbs": n / med / 1e3}


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError("%r is not a whole number >= 1" % s)
    return v


def main():
    global PAGES, MIN_CALLS, P, HD
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, action="append",
                    help="PATH or NAME=PATH; repeat to compare builds")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--batches", default="1,8,16,64")
    ap.add_argument("--contexts", default="1024,4096,32768,131072")
    ap.add_argument("--formats", default="q4/q4,q8/q4,f16/f16")
    ap.add_argument("--shapes", default="",
                    help="batch:context pairs, comma-separated")
    ap.add_argument("--page-tokens", type=positive_int, default=P,
                    help="tokens a page (a power of two, >= 16)")
    ap.add_argument("--head-dim", type=int, choices=(64, 128), default=HD,
                    help="channels a head (the fused kernel's two sizes)")
    ap.add_argument("--pages", choices=("random", "ordered"),
                    default="random",
                    help="page order in the pool: random (each sequence's "
                    "pages scattered) or ordered (consecutive)")
    ap.add_argument("--min-calls", type=positive_int, default=MIN_CALLS,
                    help="calls in one timed graph replay (at least; 1: a "
                    "replay of one long call also counts its launch)")
    ap.add_argument("--max-gib", type=float, default=100.0,
                    help="skip shapes whose data would exceed this")
    o = ap.parse_args()
    PAGES = o.pages
    P = o.page_tokens
    HD = o.head_dim
    if P < 16 or P & (P - 1):
        ap.error("--page-tokens: %d is not a power of two >= 16" % P)
    MIN_CALLS = o.min_calls
    libs = []
    for spec in o.lib:
        name, _, path = spec.rpartition("=")
        lib = C.CDLL(path)
        lib.kvq_gpu_attn_workspace_bytes.restype = C.c_size_t
        lib.kvq_gpu_attn_workspace_bytes.argtypes = [C.POINTER(Args)]
        lib.kvq_gpu_attn_decode.restype = C.c_int
        lib.kvq_gpu_attn_decode.argtypes = [C.POINTER(Args), C.c_void_p]
        lib.kvq_bench_stream_read.restype = C.c_int
        lib.kvq_bench_stream_read.argtypes = [C.c_void_p, C.c_size_t,
                                              C.c_void_p, C.c_int,
                                              C.c_void_p]
        libs.append((name or "kvq", lib))
    lib = libs[0][1]
    if o.shapes:
        shapes = [tuple(int(x) for x in sh.split(":"))
                  for sh in o.shapes.split(",")]
    else:
        shapes = [(b, c) for b in [int(x) for x in o.batches.split(",")]
                  for c in [int(x) for x in o.contexts.split(",")]]
    torch.manual_seed(0)
    hq, hk = o.heads, o.kv_heads
    res = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "shape": {"n_q_heads": hq, "n_kv_heads": hk, "head_dim": HD,
                  "page_tokens": P, "n_sink": N_SINK,
                  "io": "f16 q and out"},
        "method": "median of CUDA-graph replays; each replay runs >= %d "
                  "calls cycling over copies totalling >= 256 MiB" %
                  MIN_CALLS,
        "pages": PAGES,
        "stream_read": bench_stream(lib),
        "libs": [n for n, _ in libs],
        "runs": [],
    }
    ceil = res["stream_read"]["gbs"]
    print("stream read: %.0f GB/s" % ceil, file=sys.stderr)
    fmts = [f.split("/") for f in o.formats.split(",")]
    for batch, ctx in shapes:
        f16_bytes = batch * hk * ctx * HD * 4
        if f16_bytes * 2.2 > o.max_gib * (1 << 30):
            res["runs"].append({"batch": batch, "context": ctx,
                                "skipped": "does not fit"})
            continue
        try:
            sd = bench_sdpa(hq, hk, batch, ctx)
        except Exception as e:  # noqa: BLE001 - report and go on
            sd = {"error": str(e)}
        for kt, vt in fmts:
            for name, lb in libs:
                try:
                    r = bench_kvq(lb, kt, vt, hq, hk, batch, ctx)
                except Exception as e:  # noqa: BLE001
                    r = {"error": str(e)}
                run = {"batch": batch, "context": ctx,
                       "format": kt + "/" + vt, "lib": name, "kvq": r,
                       "sdpa": sd}
                if "us" in r and "us" in sd:
                    run["speedup"] = sd["us"] / r["us"]
                    run["of_stream_read"] = r["gbs"] / ceil
                res["runs"].append(run)
                if "us" in r:
                    print("b%-3d ctx %-6d %-7s %-5s %8.2f us %6.0f GB/s "
                          "(%.0f%%)  sdpa %8.2f us  x%.2f" % (
                              batch, ctx, kt + "/" + vt, name, r["us"],
                              r["gbs"], 100 * r["gbs"] / ceil,
                              sd.get("us", -1), run.get("speedup", 0)),
                          file=sys.stderr)
                else:
                    print("b%d ctx %d %s/%s %s: %s" % (
                        batch, ctx, kt, vt, name, r.get("error")),
                        file=sys.stderr)
    json.dump(res, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
