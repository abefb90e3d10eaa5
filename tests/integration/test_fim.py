#!/usr/bin/env python3
"""The Fisher sidecar tools (tools/fim) on small models.

- a sidecar written in both layouts reads back unchanged and verifies;
- calibrate on stories260K: every trace finite and positive, and the
  Spearman correlation of the traces between two seeds reported and
  >= 0.8;
- import-adam: a real AdamW state with Hugging Face names (half-split
  Q/K rows) lands on the right GGUF tensors, rows reordered; names come
  from the model state_dict when the optimizer has none;
- import-json: Hugging Face and GGUF names, traces equal to the scores;
- bad input (missing tensor, shape mismatch, sidecar for another model)
  fails with exit status 1 and a message naming the tensor;
- the bundled model's sidecar matches the bundled model.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

CAL_SEQ, CAL_LEN = 12, 256
MIN_SPEARMAN = 0.8
BUNDLED = "kvq-austen-5m"


def spearman(a, b):
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):          # average ranks of ties
            idx = np.where(x == v)[0]
            if len(idx) > 1:
                r[idx] = r[idx].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def fim_cmd(*args):
    py = os.environ.get("PYTHON3") or sys.executable
    return [py, "-m", "fim"] + [str(a) for a in args]


def fim_env():
    env = dict(os.environ)
    tools = os.path.join(testing.srcdir(), "tools")
    env["PYTHONPATH"] = tools + (os.pathsep + env["PYTHONPATH"]
                                 if env.get("PYTHONPATH") else "")
    return env


def run_fim(*args, timeout=600):
    return testing.run(fim_cmd(*args), timeout=timeout, env=fim_env())


def hf_name(gguf):
    """Hugging Face name of a stories260K tensor."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf in top:
        return top[gguf]
    _, n, rest = gguf.split(".", 2)
    m = {"attn_norm.weight": "input_layernorm.weight",
         "attn_q.weight": "self_attn.q_proj.weight",
         "attn_k.weight": "self_attn.k_proj.weight",
         "attn_v.weight": "self_attn.v_proj.weight",
         "attn_output.weight": "self_attn.o_proj.weight",
         "ffn_norm.weight": "post_attention_layernorm.weight",
         "ffn_gate.weight": "mlp.gate_proj.weight",
         "ffn_up.weight": "mlp.up_proj.weight",
         "ffn_down.weight": "mlp.down_proj.weight"}[rest]
    return "model.layers.%s.%s" % (n, m)


def test_round_trip(tap, stories, tmp):
    import numpy as np
    from fim import sidecar
    from kvq_gguf import GGUFReader
    with GGUFReader(stories) as r:
        tensors = sidecar.model_tensors(r)
    rng = np.random.default_rng(7)
    vals = {}
    for i, (name, shape) in enumerate(tensors):
        full = rng.random(shape, dtype=np.float32)
        vals[name] = sidecar.row_sums(full) if i % 2 and len(shape) > 1 \
            else full
    out = os.path.join(tmp, "rt.fim.gguf")
    sidecar.write(out, stories, vals, "calibration", token_count=123,
                  step_count=4, dataset="random",
                  extra=sidecar.extra_calibration(5, 64))
    meta, back = sidecar.read(out)
    same = set(back) == set(vals) and all(
        back[k].shape == vals[k].shape and np.array_equal(back[k], vals[k])
        for k in vals)
    tap.ok(same, "round trip: %d tensors (full and row-sum layouts) read "
           "back bit for bit" % len(vals))
    tap.ok(meta.get("fim.source") == "calibration"
           and meta.get("fim.token_count") == 123
           and meta.get("fim.step_count") == 4
           and meta.get("fim.dataset") == "random"
           and meta.get("fim.layout") == "mixed"
           and meta.get("fim.version") == 1,
           "round trip: metadata kept")
    try:
        sidecar.verify(out, stories)
        ok = True
    except sidecar.SidecarError as e:
        tap.diag(str(e))
        ok = False
    tap.ok(ok, "round trip: verify accepts the sidecar")


def test_calibrate(tap, stories, tmp):
    from fim import sidecar
    outs = []
    for seed in (1, 2):
        out = os.path.join(tmp, "cal%d.fim.gguf" % seed)
        rc, so, se = run_fim("calibrate", stories, "-o", out, "--sequences",
                             CAL_SEQ, "--seq-len", CAL_LEN, "--seed", seed,
                             "-q")
        if not tap.ok(rc == 0, "calibrate stories260K, seed %d" % seed):
            tap.diag(testing.tail(so + se))
            return
        outs.append(out)
    tr = []
    for out in outs:
        meta, vals = sidecar.read(out)
        tr.append(sidecar.traces(vals))
    bad = [n for t in tr for n, v in t.items()
           if not (v > 0 and v < float("inf"))]
    tap.ok(not bad and len(tr[0]) == 48,
           "calibrate: %d traces, all finite and positive%s"
           % (len(tr[0]), "" if not bad else " (not: %s)" % ", ".join(bad)))
    names = sorted(tr[0])
    rho = spearman([tr[0][n] for n in names], [tr[1][n] for n in names])
    tap.diag("Spearman correlation of per-tensor traces, seed 1 vs seed 2: "
             "%.4f" % rho)
    tap.ok(rho >= MIN_SPEARMAN, "calibrate: Spearman between seeds %.3f "
           ">= %.1f" % (rho, MIN_SPEARMAN))
    tap.ok(meta.get("fim.source") == "calibration"
           and meta.get("fim.token_count") == CAL_SEQ * CAL_LEN
           and meta.get("fim.calibration.seed") == 2,
           "calibrate: metadata names the source, tokens and seed")


def adam_checkpoint(stories, path, with_names, wrong_shape=None):
    """A real AdamW state over Hugging Face-named parameters shaped like
    stories260K's tensors, one step on known gradients.  Returns
    {gguf name: expected exp_avg_sq in GGUF row order}."""
    import numpy as np
    import torch
    from fim import names as nm
    from kvq_gguf import GGUFReader
    with GGUFReader(stories) as r:
        shapes = [(t.name, tuple(t.shape)) for t in r.tensors]
        n_head = r.get("llama.attention.head_count")
        n_kv = r.get("llama.attention.head_count_kv")
    params, grads, expect = [], [], {}
    sd = {}
    for i, (g, shape) in enumerate(shapes):
        if g == wrong_shape:
            shape = (shape[0] + 1,) + shape[1:]
        p = torch.nn.Parameter(torch.zeros(shape))
        # row r of every matrix gets gradient (r + 1) * (i + 1) / 100
        rows = torch.arange(1, shape[0] + 1, dtype=torch.float32)
        gr = (rows * (i + 1) / 100.0).reshape(-1, *([1] * (len(shape) - 1)))
        p.grad = gr.expand(shape).clone()
        params.append(p)
        grads.append(p.grad.numpy().copy())
        sd[hf_name(g)] = p.detach()
        e = (1 - 0.999) * grads[-1].astype(np.float64) ** 2
        which = nm.needs_permute(g)
        if which:
            e = nm.permute_rows_hf_to_gguf(e, n_head if which == "q" else n_kv)
        expect[g] = e
    # Two groups, matrices first, like a weight-decay split.
    mats = [p for p in params if p.dim() >= 2]
    vecs = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": mats}, {"params": vecs,
                                                "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999))
    opt.step()
    ck = {"model": sd, "optimizer": opt.state_dict(), "tokens_seen": 999,
          "dataset": "synthetic"}
    if with_names:
        order = [hf_name(g) for (g, s), p in zip(shapes, params)
                 if p.dim() >= 2]
        order += [hf_name(g) for (g, s), p in zip(shapes, params)
                  if p.dim() < 2]
        ck["param_names"] = order
    torch.save(ck, path)
    return expect


def test_import_adam(tap, stories, tmp):
    import numpy as np
    from fim import sidecar
    for with_names in (True, False):
        how = "param_names" if with_names else "names from the state_dict"
        ck = os.path.join(tmp, "adam%d.pt" % with_names)
        expect = adam_checkpoint(stories, ck, with_names)
        out = os.path.join(tmp, "adam%d.fim.gguf" % with_names)
        rc, so, se = run_fim("import-adam", ck, stories, "-o", out)
        if not tap.ok(rc == 0, "import-adam (%s)" % how):
            tap.diag(testing.tail(so + se))
            continue
        meta, vals = sidecar.read(out)
        worst = max(float(np.max(np.abs(vals[k] - expect[k])
                                 / (np.abs(expect[k]) + 1e-30)))
                    for k in expect)
        tap.ok(set(vals) == set(expect) and worst < 1e-5,
               "import-adam (%s): every tensor's exp_avg_sq in GGUF row "
               "order (worst relative error %.2g)" % (how, worst))
        tap.ok(meta.get("fim.source") == "adam_exp_avg_sq"
               and meta.get("fim.step_count") == 1
               and meta.get("fim.token_count") == 999,
               "import-adam (%s): source, step and token counts" % how)
    ck = os.path.join(tmp, "adam-bad.pt")
    adam_checkpoint(stories, ck, True, wrong_shape="blk.2.ffn_up.weight")
    rc, so, se = run_fim("import-adam", ck, stories, "-o",
                         os.path.join(tmp, "bad.fim.gguf"))
    tap.ok(rc == 1 and "blk.2.ffn_up.weight" in se and "shape" in se,
           "import-adam: a shape mismatch is refused naming the tensor")
    tap.diag(se.strip())


def test_import_json(tap, stories, tmp):
    from fim import sidecar
    from kvq_gguf import GGUFReader
    with GGUFReader(stories) as r:
        names = [t.name for t in r.tensors]
    scores = {}
    for i, n in enumerate(names):
        scores[hf_name(n) if i % 2 else n] = (i + 1) * 1e-3
    js = os.path.join(tmp, "scores.json")
    with open(js, "w") as f:
        json.dump({"by_tensor": scores}, f)
    out = os.path.join(tmp, "json.fim.gguf")
    rc, so, se = run_fim("import-json", js, stories, "-o", out)
    if tap.ok(rc == 0, "import-json with Hugging Face and GGUF names"):
        meta, vals = sidecar.read(out)
        tr = sidecar.traces(vals)
        worst = max(abs(tr[n] - (i + 1) * 1e-3) / ((i + 1) * 1e-3)
                    for i, n in enumerate(names))
        tap.ok(worst < 1e-5 and meta.get("fim.source") == "json_scores",
               "import-json: traces equal the scores (worst relative "
               "error %.2g)" % worst)
    else:
        tap.diag(testing.tail(so + se))
    del scores["model.layers.3.self_attn.v_proj.weight"
               if "model.layers.3.self_attn.v_proj.weight" in scores
               else "blk.3.attn_v.weight"]
    with open(js, "w") as f:
        json.dump({"by_tensor": scores}, f)
    rc, so, se = run_fim("import-json", js, stories, "-o", out)
    tap.ok(rc == 1 and "blk.3.attn_v.weight" in se,
           "import-json: a missing tensor is refused naming it")
    tap.diag(se.strip())


def test_other_model(tap, stories, tmp):
    """A sidecar of stories260K checked against a model of another shape."""
    import numpy as np
    from kvq_gguf import GGMLType, GGUFReader, GGUFWriter
    other = os.path.join(tmp, "other.gguf")
    with GGUFReader(stories) as r:
        w = GGUFWriter(other)
        for k, v in r.fields.items():
            if k != "general.alignment":
                w.add(k, v)
        for t in r.tensors:
            a = np.array(r.tensor_data(t))
            if t.name == "blk.0.ffn_gate.weight":
                a = np.concatenate([a, a[:32]])
            w.add_tensor(t.name, a, GGMLType.F32)
        w.write()
    side = os.path.join(tmp, "cal1.fim.gguf")
    if not os.path.exists(side):
        tap.skip("verify refuses a sidecar for another model",
                 "no calibration sidecar")
        return
    rc, so, se = run_fim("verify", side, other)
    tap.ok(rc == 1 and "blk.0.ffn_gate.weight" in se,
           "verify: a sidecar for another model is refused naming the "
           "tensor")
    tap.diag(se.strip())


def test_bundled(tap):
    from fim import sidecar
    mdir = os.path.join(testing.srcdir(), "models")
    model = os.path.join(mdir, BUNDLED + ".gguf")
    side = os.path.join(mdir, BUNDLED + ".fim.gguf")
    if not (os.path.exists(model) and os.path.exists(side)):
        tap.skip("bundled sidecar matches the bundled model",
                 "models/%s.gguf or its sidecar missing" % BUNDLED)
        return
    try:
        meta = sidecar.verify(side, model)
        ok = True
    except sidecar.SidecarError as e:
        tap.diag(str(e))
        ok = False
    tap.ok(ok, "bundled sidecar matches the bundled model")
    if ok:
        _, vals = sidecar.read(side)
        tr = sidecar.traces(vals)
        tap.ok(meta.get("fim.source") == "adam_exp_avg_sq"
               and meta.get("fim.step_count", 0) > 0
               and meta.get("fim.token_count", 0) > 0
               and meta.get("fim.layout") == "full"
               and all(0 < v < float("inf") for v in tr.values()),
               "bundled sidecar: Adam's exp_avg_sq, full diagonals, step "
               "and token counts, positive traces")


def main():
    miss = testing.missing_modules()
    if miss:
        testing.skip_all("python modules missing: %s" % ", ".join(miss))
    stories = testing.testdata("stories260K.gguf")
    if stories is None:
        testing.skip_all("test data missing: %s"
                         % os.path.join(testing.testdata_dir(),
                                        "stories260K.gguf"))
    testing.setup_path()
    tap = testing.Tap()
    with testing.tempdir("kvq-fim-") as tmp:
        test_round_trip(tap, stories, tmp)
        test_calibrate(tap, stories, tmp)
        test_import_adam(tap, stories, tmp)
        test_import_json(tap, stories, tmp)
        test_other_model(tap, stories, tmp)
    test_bundled(tap)
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
