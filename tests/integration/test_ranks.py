#!/usr/bin/env python3
"""Fisher ranks end to end: `kvqd --model FILE --ranks [--json] [--fim F]`.

1. The bundled model (models/kvq-austen-5m.gguf with its sidecar beside
   it): --ranks --json is the same on two runs; every trace equals the sum
   of the sidecar tensor computed here with numpy, density = trace / bytes
   as stored, ranks order densities; the table names the source.
2. Calibration sidecars written by `python3 -m fim calibrate` for
   stories260K load (beside the model and through --fim), with finite,
   positive traces for every tensor; the Spearman correlation of the traces
   of two calibrations with different seeds is reported and >= 0.8.
3. A sidecar for another model is refused, naming the file and the tensor,
   as `kvq-fim verify` refuses it.
4. Without a sidecar kvqd announces the fallback rule once and still ranks
   every tensor.
"""

import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402

BUNDLED = "kvq-austen-5m"


def ranks_json(tap, kvqd, model, what, fim=None):
    """--ranks --json of @model: (document or None, rc, stdout, stderr)."""
    cmd = [kvqd, "--model", model, "--ranks", "--json"]
    if fim:
        cmd += ["--fim", fim]
    rc, so, se = testing.run(cmd)
    try:
        doc = json.loads(so)
    except ValueError:
        tap.ok(False, "%s: --ranks --json prints one JSON document (rc %s): %s"
               % (what, rc, testing.tail(so + se, 5)))
        return None, rc, so, se
    return doc, rc, so, se


def check_doc(doc, model_tensors):
    """Problems of a ranks document against the model's tensors
    {name: (type name, bytes)}; [] when it is consistent."""
    bad = []
    ts = doc.get("tensors", [])
    for k in ("model", "source", "token_count", "step_count", "dataset"):
        if k not in doc:
            bad.append("key %s missing" % k)
    if sorted(t["name"] for t in ts) != sorted(model_tensors):
        bad.append("tensor names differ from the model's")
        return bad
    if [t["rank"] for t in ts] != list(range(1, len(ts) + 1)):
        bad.append("tensors are not listed by rank 1..n")
    for t in ts:
        typ, nbytes = model_tensors[t["name"]]
        if t["type"] != typ or t["bytes"] != nbytes:
            bad.append("%s: type/bytes %s/%s, model %s/%s"
                       % (t["name"], t["type"], t["bytes"], typ, nbytes))
    return bad


def spearman(a, b):
    """Spearman's rho of two equal-length sequences (average ranks for
    ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r
    x, y = ranks(a), ranks(b)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((p - mx) * (q - my) for p, q in zip(x, y))
    sxx = sum((p - mx) ** 2 for p in x)
    syy = sum((q - my) ** 2 for q in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def model_tensors(path):
    from kvq_gguf import GGUFReader
    with GGUFReader(path) as r:
        return {t.name: (t.type_name, t.nbytes) for t in r.tensors}


def fim_tool(args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(testing.srcdir(), "tools") + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return testing.run([sys.executable, "-m", "fim"] + args, timeout=600,
                       env=env)


def bundled_cases(tap, kvqd, srcdir):
    import numpy as np
    from kvq_gguf import GGUFReader

    model = os.path.join(srcdir, "models", BUNDLED + ".gguf")
    fim = os.path.join(srcdir, "models", BUNDLED + ".fim.gguf")
    if not (os.path.isfile(model) and os.path.isfile(fim)):
        tap.skip("ranks of the bundled model", "models/%s.gguf or its "
                 "sidecar is missing" % BUNDLED)
        return
    docs = []
    for i in range(2):
        doc, rc, so, se = ranks_json(tap, kvqd, model, "bundled model")
        if doc is None:
            return
        docs.append((rc, so, doc))
    (rc1, so1, doc), (rc2, so2, _) = docs
    tensors = model_tensors(model)
    bad = check_doc(doc, tensors)
    tap.ok(rc1 == 0 and rc2 == 0 and not bad,
           "bundled model: --ranks --json lists all %d tensors by rank, "
           "types and bytes as stored%s" % (len(tensors),
                                            ": " + "; ".join(bad[:3])
                                            if bad else ""))
    tap.ok(so1 == so2, "bundled model: ranks identical on two runs")
    with GGUFReader(fim) as r:
        meta = dict(r.metadata)
        want = {t.name: float(np.asarray(r.tensor_data(t),
                                         dtype=np.float64).sum())
                for t in r.tensors}
    tap.ok(doc["source"] == meta["fim.source"] == "adam_exp_avg_sq"
           and doc["token_count"] == meta["fim.token_count"]
           and doc["step_count"] == meta["fim.step_count"]
           and doc["dataset"] == meta["fim.dataset"]
           and os.path.samefile(doc["sidecar"], fim),
           "bundled model: source %s, %d tokens, %d steps, dataset and "
           "sidecar path from its metadata" % (doc["source"],
                                               doc["token_count"],
                                               doc["step_count"]))
    worst, worst_name = 0.0, ""
    for t in doc["tensors"]:
        w = want.get(t["name"], float("nan"))
        err = abs(t["trace"] - w) / max(abs(w), 1e-300)
        if not err <= worst:
            worst, worst_name = err, t["name"]
    tap.ok(worst <= 1e-9, "bundled model: traces equal the numpy sums of "
           "the sidecar tensors (worst relative difference %.3g%s)"
           % (worst, " at " + worst_name if worst_name else ""))
    dens_ok = all(t["density"] == t["trace"] / t["bytes"]
                  and t["score"] == t["density"] for t in doc["tensors"])
    order_ok = all(
        (a["density"], -a["bytes"]) >= (b["density"], -b["bytes"])
        for a, b in zip(doc["tensors"], doc["tensors"][1:]))
    tap.ok(dens_ok and order_ok, "bundled model: density = trace / bytes, "
           "ranks by density (top: %s)" % doc["tensors"][0]["name"])
    rc, so, se = testing.run([kvqd, "--model", model, "--ranks"])
    lines = so.splitlines()
    tap.ok(rc == 0 and lines and lines[0].startswith("# source: "
                                                     "adam_exp_avg_sq")
           and len(lines) == len(tensors) + 2
           and lines[2].split()[0] == doc["tensors"][0]["name"]
           and lines[2].split()[-1] == "1" and not se.strip(),
           "bundled model: --ranks table: header naming the source, one "
           "line per tensor from rank 1, nothing on stderr")


def calibration_cases(tap, kvqd, tmp):
    stories = testing.testdata("stories260K.gguf")
    if not stories:
        tap.skip("calibration sidecars for stories260K",
                 "stories260K.gguf missing")
        return None
    if testing.missing_modules(("torch",)):
        tap.skip("calibration sidecars for stories260K", "torch is missing")
        return None
    model = os.path.join(tmp, "stories260K.gguf")
    shutil.copyfile(stories, model)
    beside = os.path.join(tmp, "stories260K.fim.gguf")
    other = os.path.join(tmp, "seed1.fim.gguf")
    traces = []
    for seed, out in ((0, beside), (1, other)):
        rc, so, se = fim_tool(["calibrate", model, "-o", out, "--sequences",
                               "16", "--seq-len", "256", "--seed", str(seed),
                               "-q"])
        if not tap.ok(rc == 0, "kvq-fim calibrate stories260K seed %d: %s"
                      % (seed, testing.tail(so + se, 2).strip())):
            return None
    tensors = model_tensors(model)
    for what, fim in (("beside the model", None), ("--fim", other)):
        doc, rc, so, se = ranks_json(tap, kvqd, model, what, fim)
        if doc is None:
            return None
        bad = check_doc(doc, tensors)
        finite = all(t["trace"] is not None and math.isfinite(t["trace"])
                     and t["trace"] > 0 for t in doc["tensors"])
        tap.ok(rc == 0 and not bad and finite
               and doc["source"] == "calibration"
               and doc["token_count"] == 16 * 256
               and "no Fisher sidecar" not in se,
               "stories260K calibration sidecar %s loads: %d tensors, "
               "finite positive traces, source %s%s"
               % (what, len(doc["tensors"]), doc["source"],
                  ": " + "; ".join(bad[:3]) if bad else ""))
        traces.append({t["name"]: t["trace"] for t in doc["tensors"]})
    names = sorted(traces[0])
    rho = spearman([traces[0][n] for n in names],
                   [traces[1][n] for n in names])
    tap.diag("Spearman correlation of stories260K traces, seed 0 vs seed 1: "
             "%.4f over %d tensors" % (rho, len(names)))
    tap.ok(rho >= 0.8, "calibrations with two seeds agree: Spearman %.4f "
           ">= 0.8" % rho)
    return beside


def foreign_cases(tap, kvqd, srcdir, foreign):
    model = os.path.join(srcdir, "models", BUNDLED + ".gguf")
    if not foreign or not os.path.isfile(model):
        tap.skip("a sidecar for another model is refused",
                 "no bundled model or no stories260K sidecar")
        return
    rc, so, se = testing.run([kvqd, "--model", model, "--ranks", "--fim",
                              foreign])
    tap.ok(rc == 1 and not so and foreign + ": tensor " in se
           and "does not match the model's" in se and len(
               se.strip().splitlines()) == 1,
           "stories260K sidecar for the bundled model is refused: "
           + testing.tail(se, 1).strip())
    rc2, so2, se2 = fim_tool(["verify", foreign, model])
    tap.ok(rc2 == 1 and rc == 1, "kvq-fim verify refuses it too: "
           + testing.tail(se2, 1).strip())


def fallback_cases(tap, kvqd, tmp):
    stories = testing.testdata("stories260K.gguf")
    if not stories:
        tap.skip("fallback ranks", "stories260K.gguf missing")
        return
    d = os.path.join(tmp, "bare")
    os.mkdir(d)
    model = os.path.join(d, "stories260K.gguf")
    shutil.copyfile(stories, model)
    doc, rc, so, se = ranks_json(tap, kvqd, model, "no sidecar")
    if doc is None:
        return
    notes = [ln for ln in se.splitlines() if "no Fisher sidecar" in ln]
    tap.ok(rc == 0 and len(notes) == 1 and model in notes[0]
           and "ranking by position and role" in notes[0],
           "no sidecar: announced once on stderr: "
           + (notes[0] if notes else testing.tail(se, 1)))
    tensors = model_tensors(model)
    bad = check_doc(doc, tensors)
    first = doc["tensors"][0]["name"] if doc["tensors"] else ""
    tap.ok(not bad and doc["source"] == "fallback" and doc["sidecar"] is None
           and all(t["trace"] is None for t in doc["tensors"])
           and "fallback_rule" in doc
           and not first.startswith("blk."),
           "no sidecar: source fallback, every tensor ranked, embedding/"
           "output first (%s)%s" % (first, ": " + "; ".join(bad[:3])
                                    if bad else ""))
    rc, so, se = testing.run([kvqd, "--model", model, "--ranks"])
    tap.ok(rc == 0 and so.startswith("# source: fallback"),
           "no sidecar: the table's header says fallback")
    missing = os.path.join(d, "nope.fim.gguf")
    rc, so, se = testing.run([kvqd, "--model", model, "--ranks", "--fim",
                              missing])
    tap.ok(rc == 1 and not so and missing in se,
           "--fim naming a missing file is an error, not a fallback")


def main():
    tap = testing.Tap()
    kvqd = testing.kvqd_path()
    if not kvqd:
        return testing.skip_all("kvqd is not built")
    if testing.missing_modules(("numpy",)):
        return testing.skip_all("numpy is missing")
    srcdir = testing.srcdir()
    bundled_cases(tap, kvqd, srcdir)
    with testing.tempdir() as tmp:
        foreign = calibration_cases(tap, kvqd, tmp)
        foreign_cases(tap, kvqd, srcdir, foreign)
        fallback_cases(tap, kvqd, tmp)
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
