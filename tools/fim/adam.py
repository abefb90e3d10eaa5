"""import-adam: a PyTorch optimizer checkpoint's exp_avg_sq, mapped to
GGUF tensor names, written as a Fisher sidecar.

Where the names come from (the optimizer's own state_dict only has
indices), first that applies:

1. param_groups[*]["param_names"] (PyTorch >= 2.6 when the optimizer was
   built from named_parameters());
2. a list "param_names" at the top of the checkpoint, in optimizer
   order (what tools/train writes);
3. a file given with --param-names (one name a line, optimizer order);
4. the model state_dict stored beside the optimizer ("model",
   "model_state_dict" or "state_dict"): each group's parameters are
   matched in order to the not-yet-used entries of the state_dict with
   the same shape.  This is how parameters reach an optimizer when it is
   built from model.parameters() or from groups filtered out of
   named_parameters() in order; say --param-names otherwise.
"""

import numpy as np

from . import names as nm
from . import sidecar
from kvq_gguf import GGUFReader

_MODEL_KEYS = ("model", "model_state_dict", "state_dict")
_OPT_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")


def _torch():
    try:
        import torch
    except ImportError:
        raise sidecar.SidecarError("PyTorch is missing: install Debian's "
                                   "python3-torch")
    return torch


def load_checkpoint(path):
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:
        return torch.load(path, map_location="cpu")


def split_checkpoint(ck):
    """(optimizer state_dict, model state_dict or None) of a loaded
    checkpoint, which may also be a bare optimizer state_dict."""
    if not isinstance(ck, dict):
        raise sidecar.SidecarError("checkpoint is a %s, not a dict"
                                   % type(ck).__name__)
    if "state" in ck and "param_groups" in ck:
        return ck, None
    opt = None
    for k in _OPT_KEYS:
        if isinstance(ck.get(k), dict) and "state" in ck[k]:
            opt = ck[k]
            break
    if opt is None:
        raise sidecar.SidecarError("checkpoint holds no optimizer state_dict "
                                   "(looked for keys %s, or state + "
                                   "param_groups at the top)"
                                   % ", ".join(_OPT_KEYS))
    model = None
    for k in _MODEL_KEYS:
        if isinstance(ck.get(k), dict):
            model = ck[k]
            break
    return opt, model


def _ordered_ids(opt):
    ids = []
    for g in opt["param_groups"]:
        ids.extend(g["params"])
    return ids


def param_names(ck, opt, model_sd, names_file=None):
    """[(optimizer state key, parameter name)] in optimizer order."""
    ids = _ordered_ids(opt)
    if all("param_names" in g for g in opt["param_groups"]):
        names = []
        for g in opt["param_groups"]:
            names.extend(g["param_names"])
        return list(zip(ids, names))
    names = None
    if names_file:
        with open(names_file, encoding="utf-8") as f:
            names = [l.strip() for l in f if l.strip()]
    elif isinstance(ck, dict) and isinstance(ck.get("param_names"), list):
        names = ck["param_names"]
    if names is not None:
        if len(names) != len(ids):
            raise sidecar.SidecarError("%d parameter names for %d optimizer "
                                       "parameters" % (len(names), len(ids)))
        return list(zip(ids, names))
    if model_sd is None:
        raise sidecar.SidecarError("the optimizer state has no parameter "
                                   "names and the checkpoint no model "
                                   "state_dict: give --param-names")
    entries = [(k, tuple(v.shape)) for k, v in model_sd.items()
               if hasattr(v, "shape") and v.is_floating_point()]
    used = [False] * len(entries)
    state = opt["state"]
    out = []
    for pid in ids:
        st = state.get(pid)
        if st is None or "exp_avg_sq" not in st:
            continue
        shape = tuple(st["exp_avg_sq"].shape)
        for i, (k, s) in enumerate(entries):
            if not used[i] and s == shape:
                used[i] = True
                out.append((pid, k))
                break
        else:
            raise sidecar.SidecarError("optimizer parameter %s (shape %s) "
                                       "matches no unused model state_dict "
                                       "entry: give --param-names"
                                       % (pid, shape))
    return out


def collect(ck, model_path, names_file=None, rope_layout=None,
            bias_correct=False):
    """{GGUF name: exp_avg_sq array (float32, GGUF row order)} and a dict
    of facts (step count, beta2, rope layout) from the loaded checkpoint
    @ck, for the model at @model_path."""
    opt, model_sd = split_checkpoint(ck)
    pairs = param_names(ck, opt, model_sd, names_file)
    with GGUFReader(model_path) as r:
        arch = r.get("general.architecture")
        n_head = r.get("%s.attention.head_count" % arch)
        n_kv = r.get("%s.attention.head_count_kv" % arch, n_head)
        shapes = dict(sidecar.model_tensors(r))
    if rope_layout is None:
        rope_layout = ck.get("rope_layout", "hf") if isinstance(ck, dict) \
            else "hf"
    if rope_layout not in ("hf", "gguf"):
        raise sidecar.SidecarError("rope layout %r: want hf or gguf"
                                   % rope_layout)
    beta2 = None
    for g in opt["param_groups"]:
        if "betas" in g:
            beta2 = float(g["betas"][1])
    state = opt["state"]
    out, steps = {}, 0
    for pid, pname in pairs:
        st = state.get(pid)
        if st is None or "exp_avg_sq" not in st:
            raise sidecar.SidecarError("parameter %s has no exp_avg_sq in the "
                                       "optimizer state (not an Adam-family "
                                       "optimizer, or never stepped)" % pname)
        g = nm.to_gguf(pname)
        if g is None:
            raise sidecar.SidecarError("parameter %s has no GGUF counterpart "
                                       "in the llama/qwen2 layouts" % pname)
        if g not in shapes:
            if g == "output.weight" and "output.weight" not in shapes:
                raise sidecar.SidecarError(
                    "parameter %s (output.weight) is not in the model, "
                    "whose output is tied to token_embd: sidecar for "
                    "another model?" % pname)
            raise sidecar.SidecarError("parameter %s -> tensor %s is not in "
                                       "the model %s" % (pname, g, model_path))
        if g in out:
            raise sidecar.SidecarError("parameters map twice to tensor %s"
                                       % g)
        a = st["exp_avg_sq"].detach().to("cpu").float().numpy()
        if tuple(a.shape) != tuple(shapes[g]):
            raise sidecar.SidecarError("tensor %s (parameter %s): exp_avg_sq "
                                       "shape %s, model tensor shape %s"
                                       % (g, pname, tuple(a.shape),
                                          tuple(shapes[g])))
        step = st.get("step", 0)
        step = int(step.item() if hasattr(step, "item") else step)
        steps = max(steps, step)
        if bias_correct and beta2 is not None and step > 0:
            a = a / (1.0 - beta2 ** step)
        if rope_layout == "hf" and arch == "llama":
            which = nm.needs_permute(g)
            if which:
                a = nm.permute_rows_hf_to_gguf(a, n_head if which == "q"
                                               else n_kv)
        out[g] = np.ascontiguousarray(a, dtype=np.float32)
    facts = {"step_count": steps, "beta2": beta2, "rope_layout": rope_layout}
    return out, facts


def run(checkpoint, model_path, out_path, names_file=None, rope_layout=None,
        rows=False, bias_correct=False, token_count=None, dataset=None):
    """import-adam end to end; returns the facts dict."""
    ck = load_checkpoint(checkpoint)
    vals, facts = collect(ck, model_path, names_file, rope_layout,
                          bias_correct)
    if rows:
        vals = {k: (sidecar.row_sums(v) if v.ndim >= 2 else v)
                for k, v in vals.items()}
    if token_count is None and isinstance(ck, dict):
        token_count = ck.get("tokens_seen", 0)
    if dataset is None and isinstance(ck, dict):
        dataset = ck.get("dataset", "")
    extra = sidecar.extra_adam(facts["beta2"] or 0.0, bias_correct)
    sidecar.write(out_path, model_path, vals, "adam_exp_avg_sq",
                  token_count=token_count or 0,
                  step_count=facts["step_count"], dataset=dataset or "",
                  extra=extra)
    return facts
