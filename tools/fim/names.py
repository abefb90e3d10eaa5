"""Hugging Face parameter names of the llama and qwen2 layouts, mapped to
GGUF tensor names, and the Q/K row order GGUF llama files use.

Hugging Face llama checkpoints rotate the two HALVES of each head
(x[i], x[i + d/2]); GGUF `llama` files rotate ADJACENT pairs
(x[2i], x[2i+1]), so converters reorder the rows of attn_q and attn_k
head by head: within a head of d rows, new row 2i+j is old row i + j*d/2.
Any per-row quantity (weights, biases, E[g^2], row sums) follows the same
reordering.  qwen2 GGUF files keep the halves (kvqd uses NeoX rotation
for them): no reordering.
"""

import re

import numpy as np

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

_TOP_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

_GGUF_NAME = re.compile(r"^(token_embd|output_norm|output)\.weight$|"
                        r"^blk\.\d+\.[a-z_]+\.(weight|bias)$")

# Prefixes that wrappers put in front of parameter names (DDP, torch.compile).
_WRAPPERS = ("module.", "_orig_mod.")


def strip_wrappers(name):
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name = name[len(w):]
                changed = True
    return name


def is_gguf_name(name):
    return bool(_GGUF_NAME.match(name))


def to_gguf(name):
    """GGUF tensor name of @name (a Hugging Face or GGUF name), or None
    when it is neither."""
    name = strip_wrappers(name)
    if is_gguf_name(name):
        return name
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return "blk.%s.%s" % (m.group(1), _LAYER_MAP[m.group(2)])
    return None


def permute_rows_hf_to_gguf(a, n_heads):
    """Reorder the rows (axis 0) of a Q or K projection's per-row data
    @a, given in Hugging Face half-split order, into GGUF llama's
    adjacent-pair order.  @n_heads: heads of that projection (the KV head
    count for K)."""
    a = np.asarray(a)
    rows = a.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError("%d rows do not split into %d heads of even size"
                         % (rows, n_heads))
    hd = rows // n_heads
    rest = a.shape[1:]
    return (a.reshape(n_heads, 2, hd // 2, *rest)
            .swapaxes(1, 2).reshape(rows, *rest))


def needs_permute(gguf_name):
    """Whether @gguf_name is a Q or K projection (weight or bias); returns
    'q', 'k' or None."""
    if gguf_name.endswith((".attn_q.weight", ".attn_q.bias")):
        return "q"
    if gguf_name.endswith((".attn_k.weight", ".attn_k.bias")):
        return "k"
    return None
