#!/usr/bin/env python3
"""Train kvqd's bundled model from scratch and export it with its Fisher
sidecar.

  train.py prepare --out DIR [--vocab N] [--text FILE]
      corpus (Jane Austen's novels from Debian's r-cran-janeaustenr, or
      FILE split the same way), SentencePiece tokenizer, token arrays
  train.py fit --data DIR --out CKPT [--preset default|tiny] [--set K=V]
               [--sweep K=V1,V2 ...] [--time-limit S]
      AdamW training; with --sweep, one run per combination, the best by
      validation loss kept.  CKPT holds the model and optimizer state
      dicts (exp_avg_sq included), parameter names in optimizer order,
      the configuration, the tokenizer, step and token counts
  train.py export --ckpt CKPT --out MODEL.gguf [--type f16|q8_0|f32]
      GGUF `llama` file and MODEL.fim.gguf beside it (exp_avg_sq)
  train.py eval --model MODEL.gguf --text FILE [--ctx N] [--lines N]
               [--protocol sliding|chunk]
      perplexity of a GGUF over a text (or its first lines), computed by
      kvq_ref (the PyTorch reference, float64) from the GGUF's weights
  train.py record --summary S --eval E [--eval E2] --out REC.json
      the fit summary and eval results in one record (models/*.json)
  train.py all --out DIR [--preset tiny] [--text FILE]
      prepare, fit, export and eval in one go

Perplexity.  The text is tokenized as a whole (no BOS added) and every
token is scored once, predicted after a BOS and the tokens before it in
its window.  "chunk" (what training reports): consecutive windows of ctx
tokens.  "sliding" (eval's default, the same windows as kvqd
--perplexity): ctx - 1 tokens after BOS, moving by ctx / 2, each window
scoring the tokens no earlier one scored.  Training windows are BOS plus
ctx - 1 tokens from random offsets, so both protocols see what training
saw.
"""

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.dirname(HERE)
for p in (HERE, TOOLS):
    if p not in sys.path:
        sys.path.insert(0, p)

PRESETS = {
    # The bundled model: about 5.2 M parameters, so that F16 weights and
    # an F32 exp_avg_sq sidecar stay under 32 MiB together.
    "default": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8,
                    n_kv_heads=4, ffn_dim=640, ctx_len=512, dropout=0.2,
                    batch=32, lr=2e-3, min_lr_frac=0.1, warmup=100,
                    weight_decay=0.1, beta1=0.9, beta2=0.99, epochs=30,
                    eval_every=50, patience=6, grad_clip=1.0, seed=1),
    # A CPU smoke test of the whole path in seconds.
    "tiny": dict(vocab_size=320, dim=32, n_layers=2, n_heads=4,
                 n_kv_heads=2, ffn_dim=64, ctx_len=64, dropout=0.0,
                 batch=8, lr=3e-3, min_lr_frac=0.1, warmup=5,
                 weight_decay=0.1, beta1=0.9, beta2=0.99, epochs=None,
                 steps=40, eval_every=20, patience=0, grad_clip=1.0,
                 seed=1),
}

DATASET = "Jane Austen, six novels (Debian r-cran-janeaustenr)"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ prepare
def cmd_prepare(a):
    import corpus
    import spm
    os.makedirs(a.out, exist_ok=True)
    if a.text:
        info = split_text(a.text, a.out)
    else:
        info = corpus.build(a.out, os.path.join(a.out, "deb"))
    t0 = time.time()
    spm.train(os.path.join(a.out, "train.txt"), os.path.join(a.out, "tok"),
              a.vocab)
    tk = spm.Tokenizer(os.path.join(a.out, "tok.model"))
    for split in ("train", "val", "heldout"):
        ids = tk.encode_file(os.path.join(a.out, split + ".txt"))
        ids.tofile(os.path.join(a.out, split + ".u16"))
        info[split + "_tokens"] = int(ids.size)
    info["vocab_size"] = tk.n_vocab
    info["tokenizer_seconds"] = round(time.time() - t0, 1)
    if not a.text:
        info["dataset"] = DATASET
    with open(os.path.join(a.out, "corpus.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(json.dumps(info, indent=1))
    return 0


def split_text(path, outdir):
    """Split an arbitrary text file (paragraphs on lines) like the corpus."""
    import corpus
    with open(path, encoding="utf-8") as f:
        paras = [l.strip() for l in f if l.strip()]
    parts = corpus.split_novel(paras, every=10, blocks=min(100, len(paras)))
    info = {"dataset": os.path.basename(path)}
    for key, p in zip(("train", "val", "heldout"), parts):
        if not p:
            raise SystemExit("%s: too few paragraphs for a %s split"
                             % (path, key))
        with open(os.path.join(outdir, key + ".txt"), "w",
                  encoding="utf-8") as f:
            f.write("\n".join(p) + "\n")
    return info


# ---------------------------------------------------------------------- fit
def parse_value(s):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(s.lower(), s)


def load_split(data, split):
    return np.fromfile(os.path.join(data, split + ".u16"), dtype=np.uint16)


def chunk_batches(ids, ctx, bos, batch):
    """The perplexity protocol's chunks as (x, y, n) numpy batches: x rows
    are [BOS] + chunk[:-1], y rows the chunk, padded with -100."""
    n = len(ids)
    starts = list(range(0, n, ctx))
    for i in range(0, len(starts), batch):
        rows = starts[i:i + batch]
        x = np.full((len(rows), ctx), bos, np.int64)
        y = np.full((len(rows), ctx), -100, np.int64)
        for r, s in enumerate(rows):
            c = ids[s:s + ctx].astype(np.int64)
            y[r, :len(c)] = c
            x[r, 1:len(c)] = c[:-1]
        yield x, y


def evaluate(model, ids, ctx, bos, device, batch=16, amp=None):
    """(mean NLL per token, token count) over @ids by the chunk protocol."""
    import torch
    import torch.nn.functional as F
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for x, y in chunk_batches(ids, ctx, bos, batch):
            x = torch.from_numpy(x).to(device)
            y = torch.from_numpy(y).to(device)
            with amp():
                logits = model(x)
            nll = F.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                  y.view(-1), ignore_index=-100,
                                  reduction="sum")
            tot += float(nll)
            cnt += int((y != -100).sum())
    model.train()
    return tot / cnt, cnt


def lr_at(step, hp, total):
    if step < hp["warmup"]:
        return hp["lr"] * (step + 1) / hp["warmup"]
    frac = min(1.0, (step - hp["warmup"]) / max(1, total - hp["warmup"]))
    lo = hp["lr"] * hp["min_lr_frac"]
    return lo + 0.5 * (hp["lr"] - lo) * (1 + math.cos(math.pi * frac))


def fit_one(hp, data, device, deadline, tag):
    """One training run; returns a result dict with the best state."""
    import contextlib
    import torch
    from model import Config, Llama, optimizer_groups

    torch.manual_seed(hp["seed"])
    rng = np.random.default_rng(hp["seed"])
    tr = torch.from_numpy(data["train"].astype(np.int64)).to(device)
    val = data["val"]
    bos = data["bos"]
    cfg = Config(**{k: hp[k] for k in Config.FIELDS if k in hp})
    model = Llama(cfg).to(device)
    groups, names = optimizer_groups(model, hp["weight_decay"])
    kw = dict(lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=1e-8)
    if device.type == "cuda":
        kw["fused"] = True
    opt = torch.optim.AdamW(groups, **kw)
    if device.type == "cuda":
        def amp():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        amp = contextlib.nullcontext
    L, B = cfg.ctx_len, hp["batch"]
    per_step = B * L
    if hp.get("steps"):
        total = int(hp["steps"])
    else:
        total = int(math.ceil(hp["epochs"] * len(tr) / per_step))
    span = len(tr) - L
    bos_col = torch.full((B, 1), bos, dtype=torch.long, device=device)
    best = {"val": float("inf"), "step": 0}
    bad = 0
    t0 = time.time()
    step = 0
    history = []
    model.train()
    while step < total:
        offs = torch.from_numpy(rng.integers(0, span + 1, size=B)).to(device)
        idx = offs[:, None] + torch.arange(L, device=device)[None, :]
        y = tr[idx]
        x = torch.cat([bos_col, y[:, :-1]], dim=1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, hp, total)
        with amp():
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hp["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        step += 1
        last = step == total or time.time() > deadline
        if step % hp["eval_every"] == 0 or last:
            v, _ = evaluate(model, val, L, bos, device, amp=amp)
            history.append((step, loss.item(), v))
            log("%s step %d/%d train %.4f val %.4f (ppl %.2f) %.0f s"
                % (tag, step, total, loss.item(), v, math.exp(v),
                   time.time() - t0))
            if v < best["val"]:
                best = {"val": v, "step": step,
                        "model": copy.deepcopy(model.state_dict()),
                        "opt": copy.deepcopy(opt.state_dict())}
                bad = 0
            else:
                bad += 1
                if hp["patience"] and bad >= hp["patience"]:
                    log("%s: no better for %d evaluations, stopping"
                        % (tag, bad))
                    break
        if last:
            break
    best.update(hp=hp, names=names, cfg=cfg, seconds=time.time() - t0,
                history=history, total_steps=total,
                tokens_seen=best["step"] * per_step)
    return best


def cmd_fit(a):
    import torch
    from model import ROPE_LAYOUT, Llama
    import spm

    hp = dict(PRESETS[a.preset])
    for kv in a.set or []:
        k, _, v = kv.partition("=")
        hp[k] = parse_value(v)
    with open(os.path.join(a.data, "corpus.json")) as f:
        cinfo = json.load(f)
    tk = spm.Tokenizer(os.path.join(a.data, "tok.model"))
    hp["vocab_size"] = tk.n_vocab
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available()
                                       else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = {s: load_split(a.data, s) for s in ("train", "val", "heldout")}
    data["bos"] = tk.bos_id
    sweep = []
    for item in a.sweep or []:
        k, _, vs = item.partition("=")
        sweep.append([(k, parse_value(v)) for v in vs.split(",")])
    combos = [dict(c) for c in itertools.product(*sweep)] if sweep else [{}]
    t_start = time.time()
    deadline_all = t_start + a.time_limit if a.time_limit else float("inf")
    results = []
    for i, c in enumerate(combos):
        h = dict(hp, **c)
        left = len(combos) - i
        deadline = time.time() + (deadline_all - time.time()) / left \
            if a.time_limit else float("inf")
        tag = "run %d/%d %s" % (i + 1, len(combos),
                                " ".join("%s=%s" % kv for kv in c.items()))
        r = fit_one(h, data, device, deadline, tag)
        log("%s: best val %.4f (ppl %.2f) at step %d, %.0f s"
            % (tag, r["val"], math.exp(r["val"]), r["step"], r["seconds"]))
        results.append((c, r))
        if len(combos) > 1:
            keep = min(results, key=lambda cr: cr[1]["val"])
            for cr in results:
                if cr is not keep:
                    cr[1].pop("model", None)
                    cr[1].pop("opt", None)
    c, best = min(results, key=lambda cr: cr[1]["val"])
    cfg = best["cfg"]
    model = Llama(cfg).to(device)
    model.load_state_dict(best["model"])
    import contextlib
    amp = contextlib.nullcontext        # the final figures in float32
    ho, n_ho = evaluate(model, data["heldout"], cfg.ctx_len, tk.bos_id,
                        device, amp=amp)
    va, _ = evaluate(model, data["val"], cfg.ctx_len, tk.bos_id, device,
                     amp=amp)
    summary = {
        "preset": a.preset, "chosen": c, "hparams": best["hp"],
        "config": cfg.to_dict(), "n_params": model.n_params(),
        "step": best["step"], "tokens_seen": best["tokens_seen"],
        "val_nll": va, "val_ppl": math.exp(va),
        "heldout_nll": ho, "heldout_ppl": math.exp(ho),
        "heldout_tokens": n_ho, "train_tokens": int(data["train"].size),
        "device": (torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu"),
        "torch": torch.__version__,
        "seconds_total": round(time.time() - t_start, 1),
        "runs": [{"set": cc, "best_val": rr["val"], "best_step": rr["step"],
                  "seconds": round(rr["seconds"], 1),
                  "history": rr["history"]} for cc, rr in results],
    }
    ck = {
        "model": {k: v.cpu() for k, v in best["model"].items()},
        "optimizer": _opt_to_cpu(best["opt"]),
        "param_names": best["names"],
        "config": cfg.to_dict(),
        "rope_layout": ROPE_LAYOUT,
        "step": best["step"],
        "tokens_seen": best["tokens_seen"],
        "dataset": cinfo.get("dataset", DATASET),
        "tokenizer": tk.proto(),
        "summary": summary,
    }
    torch.save(ck, a.out)
    log(json.dumps({k: v for k, v in summary.items() if k != "runs"},
                   indent=1))
    if a.summary:
        with open(a.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def _opt_to_cpu(sd):
    out = {"param_groups": sd["param_groups"], "state": {}}
    for k, st in sd["state"].items():
        out["state"][k] = {n: (v.cpu() if hasattr(v, "cpu") else v)
                           for n, v in st.items()}
    return out


# ------------------------------------------------------------------- export
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}


def cmd_export(a):
    import torch
    from kvq_gguf import GGMLType, GGUFWriter
    from fim import adam
    import spm
    from model import Config

    try:
        ck = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    except TypeError:
        ck = torch.load(a.ckpt, map_location="cpu")
    cfg = Config.from_dict(ck["config"])
    tk = spm.Tokenizer(model_proto=ck["tokenizer"])
    sd = ck["model"]
    wtype = {"f32": GGMLType.F32, "f16": GGMLType.F16,
             "q8_0": GGMLType.Q8_0}[a.type]
    from fim import names as nm
    w = GGUFWriter(a.out)
    arch = "llama"
    w.add_string("general.architecture", arch)
    w.add_string("general.name", a.name)
    w.add_uint32("general.file_type", FILE_TYPE[a.type])
    w.add_string("general.license", "MIT")
    w.add_string("general.source.dataset", ck.get("dataset", ""))
    w.add_uint32(arch + ".context_length", cfg.ctx_len)
    w.add_uint32(arch + ".embedding_length", cfg.dim)
    w.add_uint32(arch + ".block_count", cfg.n_layers)
    w.add_uint32(arch + ".feed_forward_length", cfg.ffn_dim)
    w.add_uint32(arch + ".attention.head_count", cfg.n_heads)
    w.add_uint32(arch + ".attention.head_count_kv", cfg.n_kv_heads)
    w.add_uint32(arch + ".rope.dimension_count", cfg.head_dim)
    w.add_float32(arch + ".rope.freq_base", cfg.rope_base)
    w.add_float32(arch + ".attention.layer_norm_rms_epsilon", cfg.rms_eps)
    w.add_uint32(arch + ".vocab_size", tk.n_vocab)
    for key, val, vt, sub in tk.gguf_metadata():
        w.add(key, val, vt, sub)
    order = ["model.embed_tokens.weight"]
    for i in range(cfg.n_layers):
        p = "model.layers.%d." % i
        order += [p + s for s in (
            "input_layernorm.weight", "self_attn.q_proj.weight",
            "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "post_attention_layernorm.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight")]
    order.append("model.norm.weight")
    missing = [n for n in order if n not in sd]
    if missing:
        raise SystemExit("checkpoint lacks %s" % ", ".join(missing))
    for n in order:
        t = sd[n].float().numpy()
        w.add_tensor(nm.to_gguf(n), t, wtype if t.ndim >= 2 else GGMLType.F32)
    w.write()
    fim_path = (a.out[:-5] if a.out.endswith(".gguf") else a.out) + ".fim.gguf"
    facts = adam.run(a.ckpt, a.out, fim_path)
    log("%s: %s weights; %s: exp_avg_sq after %d steps"
        % (a.out, a.type.upper(), fim_path, facts["step_count"]))
    return 0


# --------------------------------------------------------------------- eval
def windows(n, ctx, protocol):
    """[(start, length, first scored)] of the perplexity windows over @n
    text tokens; each window predicts ids[start:start+length] from BOS and
    the tokens before each, and scores those from index @first on.

    chunk:   consecutive chunks of ctx tokens, all scored (what training
             reports as val and held-out loss).
    sliding: kvqd --perplexity's windows: ctx - 1 text tokens after BOS,
             moving by ctx // 2; a window scores the tokens no earlier
             window scored."""
    out = []
    if protocol == "chunk":
        for s in range(0, n, ctx):
            out.append((s, min(ctx, n - s), s))
        return out
    if protocol != "sliding":
        raise ValueError("protocol %r: chunk or sliding" % protocol)
    ctx = min(ctx, n + 1)
    stride = ctx // 2
    start, until = 0, 0
    while True:
        length = min(n - start, ctx - 1)
        out.append((start, length, until))
        until = start + length
        if start + ctx - 1 >= n:
            break
        start += stride
    return out


def read_text(path, lines=None):
    """The text of @path, or its first @lines lines (what `head -n LINES`
    gives)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if lines:
        at = -1
        for _ in range(lines):
            at = text.find("\n", at + 1)
            if at < 0:
                return text
        text = text[:at + 1]
    return text


def perplexity(model_path, text_path, ctx=None, max_tokens=None, dtype=None,
               protocol="sliding", lines=None):
    """(ppl, nll, tokens scored) of the GGUF at @model_path over
    @text_path (its first @lines lines when given), with kvq_ref and the
    GGUF's own vocabulary."""
    import torch
    from kvq_gguf import GGUFReader
    from kvq_ref import RefModel
    from fim import tok as fimtok
    with GGUFReader(model_path) as r:
        tk = fimtok.from_gguf(r)
    ids = np.asarray(tk.encode(read_text(text_path, lines)), dtype=np.int64)
    if max_tokens:
        ids = ids[:max_tokens]
    m = RefModel(model_path, dtype=dtype or torch.float64)
    ctx = ctx or m.hp.ctx_len
    bos = int(m.hp.bos_id)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for start, length, first in windows(len(ids), ctx, protocol):
            c = ids[start:start + length]
            lg = m.forward([bos] + [int(t) for t in c[:-1]])
            lp = torch.log_softmax(lg, dim=-1)
            k = first - start
            tgt = torch.from_numpy(c[k:])
            tot -= float(lp[torch.arange(k, length), tgt].sum())
            cnt += length - k
    return math.exp(tot / cnt), tot / cnt, cnt


def cmd_eval(a):
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    ppl, nll, n = perplexity(a.model, a.text, a.ctx, a.max_tokens,
                             torch.float32 if a.float32 else torch.float64,
                             a.protocol, a.lines)
    res = {"model": os.path.basename(a.model),
           "text": os.path.basename(a.text), "lines": a.lines,
           "protocol": a.protocol, "ctx": a.ctx, "tokens": n, "nll": nll,
           "ppl": ppl, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(res))
    return 0


def cmd_record(a):
    """Merge the fit summary and eval results into one JSON record."""
    with open(a.summary) as f:
        summ = json.load(f)
    rec = {"model": a.model_name, "training": summ}
    for path in a.eval:
        with open(path) as f:
            ev = json.loads([l for l in f if l.startswith("{")][-1])
        key = "heldout_prefix" if ev.get("lines") else "heldout"
        if ev.get("protocol", "sliding") != "sliding":
            key += "_" + ev["protocol"]
        rec[key] = ev
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    return 0


# ---------------------------------------------------------------------- all
def cmd_all(a):
    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "data")
    ns = argparse.Namespace
    rc = cmd_prepare(ns(out=data, vocab=a.vocab or PRESETS[a.preset][
        "vocab_size"], text=a.text))
    ckpt = os.path.join(a.out, "ckpt.pt")
    rc = rc or cmd_fit(ns(data=data, out=ckpt, preset=a.preset, set=a.set,
                          sweep=None, device=a.device, threads=a.threads,
                          time_limit=a.time_limit,
                          summary=os.path.join(a.out, "summary.json")))
    model = os.path.join(a.out, "model.gguf")
    rc = rc or cmd_export(ns(ckpt=ckpt, out=model, type=a.type,
                             name="kvq-%s" % a.preset))
    rc = rc or cmd_eval(ns(model=model,
                           text=os.path.join(data, "heldout.txt"), ctx=None,
                           max_tokens=None, float32=False,
                           threads=a.threads, protocol="sliding",
                           lines=None))
    return rc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse
                                 .RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--text", help="train on this text instead of the corpus")
    p = sub.add_parser("fit")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--time-limit", type=float, help="seconds for all runs")
    p.add_argument("--summary", help="also write the summary JSON here")
    p = sub.add_parser("export")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--type", choices=sorted(FILE_TYPE), default="f16")
    p.add_argument("--name", default="kvq-austen-5m")
    p = sub.add_parser("eval")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--ctx", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--float32", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--protocol", choices=("sliding", "chunk"),
                   default="sliding")
    p.add_argument("--lines", type=int, help="only the first LINES lines")
    p = sub.add_parser("record")
    p.add_argument("--summary", required=True, help="fit --summary output")
    p.add_argument("--eval", action="append", required=True,
                   help="an eval output (JSON line)")
    p.add_argument("--model-name", default="kvq-austen-5m")
    p.add_argument("--out", required=True)
    p = sub.add_parser("all")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--text")
    p.add_argument("--vocab", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--type", choices=sorted(FILE_TYPE), default="f16")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--time-limit", type=float)
    a = ap.parse_args(argv)
    return {"prepare": cmd_prepare, "fit": cmd_fit, "export": cmd_export,
            "eval": cmd_eval, "record": cmd_record, "all": cmd_all}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
