"""calibrate: E[g^2] of every tensor of a GGUF model, from forward and
backward passes over calibration text.

Every tensor is dequantized to float32 (kvq_ref), the text is tokenized
with the model's own vocabulary (fim.tok), and @n_seq windows of @seq_len
tokens are drawn at offsets chosen by @seed; each window is [BOS] + the
next seq_len - 1 tokens of the text, predicting the seq_len tokens that
follow BOS.  For each window g is the gradient of its mean next-token
cross-entropy (the text's own next tokens: the empirical Fisher), and
the sidecar holds the mean of g*g over the windows.
"""

import os
import sys
import time

import numpy as np

from . import sidecar
from . import tok as fimtok
from kvq_gguf import GGUFReader

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "sample.txt")

# Full diagonals up to this many elements in the whole model, else row
# sums for every tensor of two or more dimensions.
AUTO_FULL_LIMIT = 1 << 26


def _torch():
    try:
        import torch
    except ImportError:
        raise sidecar.SidecarError("PyTorch is missing: install Debian's "
                                   "python3-torch")
    return torch


def _named_weights(m):
    """{GGUF tensor name: torch tensor} of a kvq_ref RefModel."""
    out = {"token_embd.weight": m.tok_embd,
           "output_norm.weight": m.output_norm}
    if not m.tied:
        out["output.weight"] = m.output
    keys = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight",
            "wk": "attn_k.weight", "wv": "attn_v.weight",
            "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight",
            "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight",
            "w_down": "ffn_down.weight", "bq": "attn_q.bias",
            "bk": "attn_k.bias", "bv": "attn_v.bias"}
    for i, L in enumerate(m.layers):
        for k, v in L.items():
            out["blk.%d.%s" % (i, keys[k])] = v
    return out


def windows(ids, n_seq, seq_len, seed):
    """Start offsets of @n_seq windows of @seq_len tokens in @ids (each
    window reads ids[o : o + seq_len])."""
    span = len(ids) - seq_len
    if span < 0:
        raise sidecar.SidecarError("calibration text has %d tokens, fewer "
                                   "than one window of %d" % (len(ids),
                                                              seq_len))
    rng = np.random.default_rng(seed)
    return [int(o) for o in rng.integers(0, span + 1, size=n_seq)]


def run(model_path, out_path, text_path=None, n_seq=64, seq_len=512,
        seed=0, layout="auto", threads=None, log=None):
    """Calibrate the model at @model_path and write the sidecar to
    @out_path.  Returns a dict of facts (tokens, seconds, layout)."""
    torch = _torch()
    from kvq_ref import RefModel
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    text_path = text_path or SAMPLE
    with open(text_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    with GGUFReader(model_path) as r:
        tk = fimtok.from_gguf(r)
        tensors = sidecar.model_tensors(r)
    m = RefModel(model_path, dtype=torch.float32)
    hp = m.hp
    if hp.bos_id is None:
        raise sidecar.SidecarError("%s has no BOS token id" % model_path)
    if seq_len > hp.ctx_len:
        raise sidecar.SidecarError("sequence length %d exceeds the model's "
                                   "context length %d" % (seq_len, hp.ctx_len))
    ids = tk.encode(text)
    if len(ids) <= seq_len:
        raise sidecar.SidecarError("%s gives %d tokens; a window needs %d"
                                   % (text_path, len(ids), seq_len))
    weights = _named_weights(m)
    for w in weights.values():
        w.requires_grad_(True)
    acc = {n: torch.zeros_like(w) for n, w in weights.items()}
    offs = windows(ids, n_seq, seq_len, seed)
    t0 = time.time()
    loss_sum = 0.0
    for k, o in enumerate(offs):
        seq = [int(hp.bos_id)] + ids[o:o + seq_len - 1]
        tgt = torch.tensor(ids[o:o + seq_len], dtype=torch.long)
        for w in weights.values():
            w.grad = None
        logits = m.forward(seq)
        loss = torch.nn.functional.cross_entropy(logits, tgt)
        loss.backward()
        loss_sum += float(loss)
        with torch.no_grad():
            for n, w in weights.items():
                if w.grad is not None:
                    acc[n].add_(w.grad * w.grad)
        if log and (k + 1) % max(1, n_seq // 8) == 0:
            log("calibrate: %d/%d windows, mean loss %.4f, %.1f s"
                % (k + 1, n_seq, loss_sum / (k + 1), time.time() - t0))
    total = sum(int(np.prod(s)) for _, s in tensors)
    if layout == "auto":
        layout = "full" if total <= AUTO_FULL_LIMIT else "rows"
    vals = {}
    for name, shape in tensors:
        if name in acc:
            a = (acc[name] / n_seq).detach().numpy().astype(np.float32)
        else:
            a = np.zeros(shape, np.float32)
            if log:
                log("calibrate: tensor %s is not used by the forward pass; "
                    "its E[g^2] is zero" % name)
        if layout == "rows" and a.ndim >= 2:
            a = sidecar.row_sums(a)
        vals[name] = a
    dataset = "built-in sample (tools/fim/sample.txt)" \
        if text_path == SAMPLE else os.path.basename(text_path)
    sidecar.write(out_path, model_path, vals, "calibration",
                  token_count=n_seq * seq_len, step_count=n_seq,
                  dataset=dataset,
                  extra=sidecar.extra_calibration(seed, seq_len))
    return {"tokens": n_seq * seq_len, "seconds": time.time() - t0,
            "layout": layout, "mean_loss": loss_sum / n_seq,
            "text_tokens": len(ids)}


def stderr_log(msg):
    print(msg, file=sys.stderr, flush=True)
