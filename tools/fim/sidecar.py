"""The Fisher sidecar, MODEL.fim.gguf (DESIGN.md section 6): writing,
reading and checking it against its model.

Format.  A GGUF v3 file with one F32 tensor per tensor of the model, under
the same name, holding E[g^2] for that tensor's elements in one of two
layouts, told apart by the shape:

  full      the model tensor's shape: one value per element;
  row sums  the model tensor's shape without its last (row-length)
            dimension: one value per row, the sum of E[g^2] over the row.
            Only for tensors of two or more dimensions.

The trace of a tensor (sum of E[g^2] over its elements) is the sum of its
sidecar tensor in either layout.

Metadata (every key is written by every tool):

  general.type             "fim"
  general.name             "<model name> Fisher diagonal"
  fim.version              uint32, 1
  fim.source               "adam_exp_avg_sq" | "calibration" | "json_scores"
  fim.token_count          uint64, tokens the estimate is over (0 if unknown)
  fim.step_count           uint64, optimizer steps (adam), sequences
                           (calibration), 0 (json)
  fim.dataset              string, what the tokens were
  fim.model.name           general.name of the model
  fim.model.architecture   general.architecture of the model
  fim.model.tensor_count   uint32
  fim.model.fingerprint    sha256 (hex) of the model's tensor names and
                           shapes in file order: a sidecar for another
                           model is refused even where names agree
  fim.layout               "full" | "rows" | "mixed" (informational)

and, per source, fim.adam.beta2 / fim.adam.bias_corrected (the values are
the optimizer's raw exp_avg_sq unless bias_corrected is true) or
fim.calibration.seed / fim.calibration.seq_len.
"""

import hashlib

import numpy as np

from kvq_gguf import GGMLType, GGUFReader, GGUFWriter, VType

SOURCES = ("adam_exp_avg_sq", "calibration", "json_scores")
VERSION = 1


class SidecarError(Exception):
    """Bad input: the message names the tensor or key at fault."""


def model_tensors(reader):
    """[(name, numpy shape)] of a model, in file order."""
    return [(t.name, tuple(t.shape)) for t in reader.tensors]


def fingerprint(tensors):
    h = hashlib.sha256()
    for name, shape in tensors:
        h.update(("%s:%s;" % (name, ",".join(str(s) for s in shape)))
                 .encode())
    return h.hexdigest()


def layout_of(model_shape, shape):
    """'full', 'rows' or None (@shape fits neither)."""
    model_shape, shape = tuple(model_shape), tuple(shape)
    if shape == model_shape:
        return "full"
    if len(model_shape) >= 2 and shape == model_shape[:-1]:
        return "rows"
    return None


def row_sums(a):
    """Per-row sums of a full-layout array (float64 accumulation)."""
    a = np.asarray(a, dtype=np.float64)
    return a.sum(axis=-1).astype(np.float32)


def _check_values(name, a):
    if not np.all(np.isfinite(a)):
        raise SidecarError("tensor %s: E[g^2] has non-finite values" % name)
    if np.any(a < 0):
        raise SidecarError("tensor %s: E[g^2] has negative values" % name)


def write(path, model_path, values, source, token_count=0, step_count=0,
          dataset="", extra=None):
    """Write the sidecar for the model at @model_path.

    @values: {GGUF tensor name: float array in the full or row-sum layout}
    covering every model tensor and nothing else.  @extra: further
    metadata {key: (value, vtype)}.  Raises SidecarError naming the first
    tensor that is missing, unknown, of the wrong shape or not finite and
    non-negative; nothing is written then."""
    if source not in SOURCES:
        raise SidecarError("fim.source %r is not one of %s"
                           % (source, ", ".join(SOURCES)))
    with GGUFReader(model_path) as r:
        tensors = model_tensors(r)
        mname = r.get("general.name", "") or ""
        march = r.get("general.architecture", "") or ""
    known = dict(tensors)
    for name in values:
        if name not in known:
            raise SidecarError("tensor %s is not in the model %s"
                               % (name, model_path))
    layouts = set()
    arrays = []
    for name, shape in tensors:
        if name not in values:
            raise SidecarError("tensor %s of the model has no E[g^2] values"
                               % name)
        a = np.asarray(values[name], dtype=np.float32)
        lay = layout_of(shape, a.shape)
        if lay is None:
            raise SidecarError("tensor %s: E[g^2] shape %s matches neither "
                               "the model tensor %s nor its rows %s"
                               % (name, a.shape, shape, shape[:-1]))
        _check_values(name, a)
        layouts.add(lay)
        arrays.append((name, np.ascontiguousarray(a)))
    w = GGUFWriter(path)
    w.add_string("general.type", "fim")
    w.add_string("general.name", ("%s Fisher diagonal" % mname).strip())
    w.add_uint32("fim.version", VERSION)
    w.add_string("fim.source", source)
    w.add_uint64("fim.token_count", int(token_count))
    w.add_uint64("fim.step_count", int(step_count))
    w.add_string("fim.dataset", dataset or "")
    w.add_string("fim.model.name", mname)
    w.add_string("fim.model.architecture", march)
    w.add_uint32("fim.model.tensor_count", len(tensors))
    w.add_string("fim.model.fingerprint", fingerprint(tensors))
    w.add_string("fim.layout", layouts.pop() if len(layouts) == 1
                 else "mixed")
    for key, (val, vtype) in (extra or {}).items():
        w.add(key, val, vtype)
    for name, a in arrays:
        w.add_tensor(name, a, GGMLType.F32)
    w.write()


def read(path):
    """(metadata {key: value}, {name: float32 array}) of a sidecar."""
    with GGUFReader(path) as r:
        if r.get("general.type") != "fim" or "fim.source" not in r:
            raise SidecarError("%s is not a Fisher sidecar (no general.type "
                               "= fim / fim.source)" % path)
        meta = dict(r.metadata)
        vals = {}
        for t in r.tensors:
            if t.type != GGMLType.F32:
                raise SidecarError("%s: tensor %s is %s, sidecars hold F32"
                                   % (path, t.name, t.type_name))
            vals[t.name] = np.array(r.tensor_data(t), dtype=np.float32)
    return meta, vals


def verify(path, model_path):
    """Check the sidecar at @path against the model at @model_path: same
    fingerprint, every tensor present with a full or row-sum shape, values
    finite and non-negative.  Returns the metadata; raises SidecarError
    naming the first problem."""
    meta, vals = read(path)
    with GGUFReader(model_path) as r:
        tensors = model_tensors(r)
    fp = fingerprint(tensors)
    want = dict(tensors)
    for name, shape in tensors:
        if name not in vals:
            raise SidecarError("%s: tensor %s of the model %s is missing"
                               % (path, name, model_path))
        if layout_of(shape, vals[name].shape) is None:
            raise SidecarError("%s: tensor %s has shape %s; the model's is "
                               "%s (rows %s)" % (path, name,
                                                 vals[name].shape, shape,
                                                 shape[:-1]))
        _check_values(name, vals[name])
    for name in vals:
        if name not in want:
            raise SidecarError("%s: tensor %s is not in the model %s "
                               "(sidecar for another model?)"
                               % (path, name, model_path))
    if meta.get("fim.model.fingerprint") != fp:
        raise SidecarError("%s was written for another model (%s, "
                           "fingerprint %s); %s has fingerprint %s"
                           % (path, meta.get("fim.model.name"),
                              meta.get("fim.model.fingerprint"),
                              model_path, fp))
    return meta


def traces(vals):
    """{name: trace} (float64 sums)."""
    return {n: float(np.asarray(a, dtype=np.float64).sum())
            for n, a in vals.items()}


def extra_adam(beta2, bias_corrected):
    return {"fim.adam.beta2": (float(beta2), VType.FLOAT32),
            "fim.adam.bias_corrected": (bool(bias_corrected), VType.BOOL)}


def extra_calibration(seed, seq_len):
    return {"fim.calibration.seed": (int(seed), VType.UINT32),
            "fim.calibration.seq_len": (int(seq_len), VType.UINT32)}
