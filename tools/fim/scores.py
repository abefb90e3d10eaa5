"""import-json: per-tensor scores, {"by_tensor": {name: score}} with
Hugging Face or GGUF names, written as a Fisher sidecar.

A score is a tensor's trace (sum of E[g^2]); with nothing known about how
it spreads inside the tensor it is spread evenly: tensors of two or more
dimensions get the row-sum layout with score / rows in every row, vectors
get score / length in every element.  Other top-level keys are kept as
the dataset description when they are strings ("dataset", "source").
"""

import json
import math

import numpy as np

from . import names as nm
from . import sidecar
from kvq_gguf import GGUFReader


def load(path):
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise sidecar.SidecarError("%s: not JSON: %s" % (path, e))
    if not isinstance(doc, dict) or not isinstance(doc.get("by_tensor"), dict):
        raise sidecar.SidecarError('%s: want an object {"by_tensor": '
                                   '{name: score, ...}}' % path)
    return doc


def collect(doc, model_path):
    with GGUFReader(model_path) as r:
        tensors = sidecar.model_tensors(r)
    shapes = dict(tensors)
    scores = {}
    for name, score in doc["by_tensor"].items():
        g = nm.to_gguf(name)
        if g is None or g not in shapes:
            raise sidecar.SidecarError("tensor %s%s is not in the model %s"
                                       % (name, "" if g in (None, name)
                                          else " (%s)" % g, model_path))
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise sidecar.SidecarError("tensor %s: score %r is not a number"
                                       % (name, score))
        if not math.isfinite(score) or score < 0:
            raise sidecar.SidecarError("tensor %s: score %r is not finite "
                                       "and non-negative" % (name, score))
        if g in scores:
            raise sidecar.SidecarError("tensor %s is given twice (as %s)"
                                       % (g, name))
        scores[g] = float(score)
    vals = {}
    for name, shape in tensors:
        if name not in scores:
            raise sidecar.SidecarError("tensor %s of the model has no score "
                                       "in the JSON map" % name)
        if len(shape) >= 2:
            rows = shape[:-1]
            n = int(np.prod(rows))
        else:
            rows = shape
            n = int(shape[0])
        vals[name] = np.full(rows, scores[name] / n, dtype=np.float32)
    return vals


def run(json_path, model_path, out_path, dataset=None):
    doc = load(json_path)
    vals = collect(doc, model_path)
    if dataset is None:
        dataset = doc.get("dataset") if isinstance(doc.get("dataset"), str) \
            else "scores from %s" % json_path
    tokens = doc.get("token_count", 0)
    if not isinstance(tokens, int) or tokens < 0:
        tokens = 0
    sidecar.write(out_path, model_path, vals, "json_scores",
                  token_count=tokens, step_count=0, dataset=dataset)
    return {"tensors": len(vals)}
