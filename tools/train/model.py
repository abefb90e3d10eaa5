"""The bundled model's architecture in PyTorch: the Llama layout kvqd reads
(RMSNorm, grouped-query attention with RoPE, SwiGLU feed-forward, tied
output embedding), with Hugging Face parameter names so that tools/fim's
name map applies to its checkpoints unchanged.

RoPE rotates ADJACENT pairs (x[2i], x[2i+1]) -- the order GGUF `llama`
files and kvqd use -- so the exported Q/K weights need no row permutation.
Checkpoints say so with rope_layout = "gguf".

Runs on PyTorch 1.13 (Debian, CPU) and 2.x (GPU); on 2.x attention goes
through scaled_dot_product_attention.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_LAYOUT = "gguf"


class Config:
    FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
              "ffn_dim", "ctx_len", "rope_base", "rms_eps", "dropout")

    def __init__(self, vocab_size, dim, n_layers, n_heads, n_kv_heads,
                 ffn_dim, ctx_len, rope_base=10000.0, rms_eps=1e-5,
                 dropout=0.0):
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError("dim %d, heads %d, kv heads %d do not divide"
                             % (dim, n_heads, n_kv_heads))
        if (dim // n_heads) % 2:
            raise ValueError("head dimension must be even for RoPE")
        self.vocab_size = int(vocab_size)
        self.dim = int(dim)
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.n_kv_heads = int(n_kv_heads)
        self.ffn_dim = int(ffn_dim)
        self.ctx_len = int(ctx_len)
        self.rope_base = float(rope_base)
        self.rms_eps = float(rms_eps)
        self.dropout = float(dropout)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def to_dict(self):
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: d[k] for k in cls.FIELDS if k in d})

    def __repr__(self):
        return "Config(%s)" % ", ".join("%s=%s" % (k, getattr(self, k))
                                         for k in self.FIELDS)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim, n_pos, base, device=None):
    """cos and sin, each (n_pos, head_dim/2), float32."""
    i = torch.arange(0, head_dim // 2, dtype=torch.float64, device=device)
    inv = base ** (-2.0 * i / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64, device=device)[:, None] * inv
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); pairs (x[2i], x[2i+1]) rotate by angle pos*inv[i]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        g = self.n_heads // self.n_kv
        if g > 1:
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        if hasattr(F, "scaled_dot_product_attention"):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            o = att @ v
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))


class Body(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_eps)


class Llama(nn.Module):
    """Parameters are named model.embed_tokens.weight,
    model.layers.N.{input_layernorm,self_attn.{q,k,v,o}_proj,
    post_attention_layernorm,mlp.{gate,up,down}_proj}.weight and
    model.norm.weight; the output projection is the embedding (tied)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        cos, sin = rope_tables(cfg.head_dim, cfg.ctx_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids, targets=None):
        """ids (B, T) -> logits (B, T, V) float32, or the mean
        cross-entropy against @targets (B, T) when given."""
        T = ids.shape[1]
        if T > self.cfg.ctx_len:
            raise ValueError("%d tokens exceed the context length %d"
                             % (T, self.cfg.ctx_len))
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.drop(self.model.embed_tokens(ids))
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.model.norm(x)
        logits = F.linear(x, self.model.embed_tokens.weight).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]),
                               targets.reshape(-1))

    def n_params(self):
        return sum(p.numel() for p in self.parameters())


def optimizer_groups(model, weight_decay):
    """AdamW parameter groups (matrices decay, norms do not) and the names
    of the parameters in optimizer order (state index i <-> names[i])."""
    decay, no_decay, dn, nn_ = [], [], [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            decay.append(p)
            dn.append(name)
        else:
            no_decay.append(p)
            nn_.append(name)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return groups, dn + nn_
