"""Reference forward pass of the GGUF `llama` and `qwen2` architectures in
PyTorch, float64 by default.

Every weight is dequantized from the GGUF blocks (kvq_gguf) and widened to
the compute dtype, so the reference sees exactly the values kvqd sees; the
arithmetic after that is plain and in double precision, independent of
summation order.
"""

import math

import numpy as np
import torch

from kvq_gguf import GGUFReader

ARCHS = ("llama", "qwen2")


class HParams:
    """Hyper-parameters read from the GGUF metadata."""

    def __init__(self, reader):
        arch = reader.get("general.architecture")
        if arch not in ARCHS:
            raise ValueError("%s: architecture %r not supported (want one of %s)"
                             % (reader.path, arch, ", ".join(ARCHS)))
        self.arch = arch

        def req(key):
            v = reader.get(arch + "." + key)
            if v is None:
                raise ValueError("%s: metadata key %s.%s missing"
                                 % (reader.path, arch, key))
            return v

        def opt(key, default):
            v = reader.get(arch + "." + key)
            return default if v is None else v

        self.dim = int(req("embedding_length"))
        self.n_layers = int(req("block_count"))
        self.n_heads = int(req("attention.head_count"))
        self.n_kv_heads = int(opt("attention.head_count_kv", self.n_heads))
        self.ffn_dim = int(req("feed_forward_length"))
        self.ctx_len = int(opt("context_length", 2048))
        self.rope_base = float(opt("rope.freq_base", 10000.0))
        self.rms_eps = float(req("attention.layer_norm_rms_epsilon"))
        if self.dim % self.n_heads:
            raise ValueError("embedding_length %d not divisible by head_count %d"
                             % (self.dim, self.n_heads))
        self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError("head_count %d not a multiple of head_count_kv %d"
                             % (self.n_heads, self.n_kv_heads))
        self.rope_dim = int(opt("rope.dimension_count", self.head_dim))
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise ValueError("bad rope.dimension_count %d (head_dim %d)"
                             % (self.rope_dim, self.head_dim))
        self.rope_neox = arch == "qwen2"
        self.qkv_bias = arch == "qwen2"
        tokens = reader.get("tokenizer.ggml.tokens")
        self.n_vocab = len(tokens) if tokens is not None else None
        self.bos_id = reader.get("tokenizer.ggml.bos_token_id")
        self.eos_id = reader.get("tokenizer.ggml.eos_token_id")

    def __repr__(self):
        return ("HParams(%s dim=%d layers=%d heads=%d kv=%d hd=%d ffn=%d "
                "ctx=%d rope_dim=%d base=%g eps=%g vocab=%s)" % (
                    self.arch, self.dim, self.n_layers, self.n_heads,
                    self.n_kv_heads, self.head_dim, self.ffn_dim, self.ctx_len,
                    self.rope_dim, self.rope_base, self.rms_eps, self.n_vocab))


class KVCache:
    """Per-layer keys and values (n_kv_heads, n_tokens, head_dim)."""

    def __init__(self, n_layers):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.n = 0


class RefModel:
    def __init__(self, path, dtype=torch.float64):
        self.path = path
        self.dtype = dtype
        with GGUFReader(path) as r:
            hp = HParams(r)
            self.hp = hp
            self.tokens = r.get("tokenizer.ggml.tokens")

            def w(name, shape=None, optional=False):
                if not r.has_tensor(name):
                    if optional:
                        return None
                    raise ValueError("%s: tensor %s missing" % (path, name))
                a = r.tensor_data(name, np.float32)
                if shape is not None and tuple(a.shape) != tuple(shape):
                    raise ValueError("%s: tensor %s has shape %s, expected %s"
                                     % (path, name, tuple(a.shape), tuple(shape)))
                return torch.from_numpy(np.array(a, dtype=np.float32)).to(dtype)

            D, hd = hp.dim, hp.head_dim
            qd, kvd = hp.n_heads * hd, hp.n_kv_heads * hd
            self.tok_embd = w("token_embd.weight")
            if hp.n_vocab is None:
                hp.n_vocab = self.tok_embd.shape[0]
            V = hp.n_vocab
            if tuple(self.tok_embd.shape) != (V, D):
                raise ValueError("%s: token_embd.weight shape %s, expected %s"
                                 % (path, tuple(self.tok_embd.shape), (V, D)))
            self.layers = []
            for i in range(hp.n_layers):
                p = "blk.%d." % i
                L = {
                    "attn_norm": w(p + "attn_norm.weight", (D,)),
                    "wq": w(p + "attn_q.weight", (qd, D)),
                    "wk": w(p + "attn_k.weight", (kvd, D)),
                    "wv": w(p + "attn_v.weight", (kvd, D)),
                    "wo": w(p + "attn_output.weight", (D, qd)),
                    "ffn_norm": w(p + "ffn_norm.weight", (D,)),
                    "w_gate": w(p + "ffn_gate.weight", (hp.ffn_dim, D)),
                    "w_up": w(p + "ffn_up.weight", (hp.ffn_dim, D)),
                    "w_down": w(p + "ffn_down.weight", (D, hp.ffn_dim)),
                }
                if hp.qkv_bias:
                    L["bq"] = w(p + "attn_q.bias", (qd,))
                    L["bk"] = w(p + "attn_k.bias", (kvd,))
                    L["bv"] = w(p + "attn_v.bias", (kvd,))
                self.layers.append(L)
            self.output_norm = w("output_norm.weight", (D,))
            self.output = w("output.weight", (V, D), optional=True)
            self.tied = self.output is None
            if self.tied:
                self.output = self.tok_embd
        # inverse frequencies theta_i = base^(-2i/rope_dim)
        i = torch.arange(0, hp.rope_dim // 2, dtype=torch.float64)
        self.inv_freq = (hp.rope_base ** (-2.0 * i / hp.rope_dim)).to(dtype)

    # ---------------------------------------------------------------- parts
    def rmsnorm(self, x, w):
        ms = (x * x).mean(dim=-1, keepdim=True)
        return x / torch.sqrt(ms + self.hp.rms_eps) * w

    def rope(self, x, pos):
        """x: (n_heads, n_tokens, head_dim); pos: (n_tokens,) positions."""
        hp = self.hp
        rd = hp.rope_dim
        ang = pos.to(self.dtype)[:, None] * self.inv_freq[None, :]   # (T, rd/2)
        cos, sin = torch.cos(ang), torch.sin(ang)
        out = x.clone()
        if hp.rope_neox:
            half = rd // 2
            x0 = x[..., 0:half]
            x1 = x[..., half:rd]
            out[..., 0:half] = x0 * cos - x1 * sin
            out[..., half:rd] = x0 * sin + x1 * cos
        else:
            x0 = x[..., 0:rd:2]
            x1 = x[..., 1:rd:2]
            out[..., 0:rd:2] = x0 * cos - x1 * sin
            out[..., 1:rd:2] = x0 * sin + x1 * cos
        return out

    def forward(self, ids, cache=None):
        """Run @ids (list of token ids) after what @cache holds; return
        logits (len(ids), n_vocab) in the compute dtype.  The cache is
        extended in place."""
        hp = self.hp
        if cache is None:
            cache = KVCache(hp.n_layers)
        ids = [int(t) for t in ids]
        for t in ids:
            if t < 0 or t >= hp.n_vocab:
                raise ValueError("token id %d out of range (vocab %d)"
                                 % (t, hp.n_vocab))
        T = len(ids)
        start = cache.n
        if start + T > hp.ctx_len:
            raise ValueError("%d tokens exceed the context length %d"
                             % (start + T, hp.ctx_len))
        pos = torch.arange(start, start + T)
        H, KH, hd = hp.n_heads, hp.n_kv_heads, hp.head_dim
        group = H // KH
        x = self.tok_embd[torch.tensor(ids, dtype=torch.long)]       # (T, D)
        scale = 1.0 / math.sqrt(hd)
        S = start + T
        # causal mask: query at position start+t sees keys 0..start+t
        kpos = torch.arange(S)
        mask = kpos[None, :] > pos[:, None]                           # (T, S)
        for li, L in enumerate(self.layers):
            h = self.rmsnorm(x, L["attn_norm"])
            q = h @ L["wq"].T
            k = h @ L["wk"].T
            v = h @ L["wv"].T
            if hp.qkv_bias:
                q = q + L["bq"]
                k = k + L["bk"]
                v = v + L["bv"]
            q = q.view(T, H, hd).transpose(0, 1)        # (H, T, hd)
            k = k.view(T, KH, hd).transpose(0, 1)       # (KH, T, hd)
            v = v.view(T, KH, hd).transpose(0, 1)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            if cache.k[li] is not None:
                k = torch.cat([cache.k[li], k], dim=1)
                v = torch.cat([cache.v[li], v], dim=1)
            cache.k[li], cache.v[li] = k, v
            kk = k.repeat_interleave(group, dim=0)      # head h -> kv h // group
            vv = v.repeat_interleave(group, dim=0)
            att = (q @ kk.transpose(1, 2)) * scale      # (H, T, S)
            att = att.masked_fill(mask[None], float("-inf"))
            att = torch.softmax(att, dim=-1)
            o = (att @ vv).transpose(0, 1).reshape(T, H * hd)
            x = x + o @ L["wo"].T
            h = self.rmsnorm(x, L["ffn_norm"])
            g = h @ L["w_gate"].T
            u = h @ L["w_up"].T
            x = x + (torch.nn.functional.silu(g) * u) @ L["w_down"].T
        cache.n = S
        h = self.rmsnorm(x, self.output_norm)
        return h @ self.output.T

    # ----------------------------------------------------------------- API
    @torch.no_grad()
    def logits(self, ids):
        """Logits for every position of @ids, numpy float64 (T, n_vocab)."""
        return self.forward(ids).to(torch.float64).numpy()

    @torch.no_grad()
    def greedy(self, prompt_ids, n, stop_at_eos=True, eos_id=None,
               return_logits=False):
        """Feed @prompt_ids, then take @n greedy (argmax) steps.  Returns
        the generated ids (prompt excluded); generation stops after the
        EOS id (which is not returned) when @stop_at_eos, or when the
        context is full.  With @return_logits, also returns the logits
        (float64 numpy) each generated token was chosen from."""
        if not prompt_ids:
            raise ValueError("greedy() needs at least one prompt token")
        if eos_id is None:
            eos_id = self.hp.eos_id
        cache = KVCache(self.hp.n_layers)
        out, rows = [], []
        lg = self.forward(prompt_ids, cache)[-1]
        for _ in range(n):
            t = int(torch.argmax(lg))
            if return_logits:
                rows.append(lg.to(torch.float64).numpy().copy())
            if stop_at_eos and eos_id is not None and t == eos_id:
                break
            out.append(t)
            if cache.n >= self.hp.ctx_len:
                break
            lg = self.forward([t], cache)[-1]
        if return_logits:
            return out, rows
        return out

    def detokenize(self, ids):
        """Text of @ids for SentencePiece vocabularies (U+2581 -> space,
        <0xXX> byte tokens), for debugging output."""
        if self.tokens is None:
            return " ".join(str(i) for i in ids)
        bs = bytearray()
        for i in ids:
            s = self.tokens[i]
            if len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
                try:
                    bs.append(int(s[3:5], 16))
                    continue
                except ValueError:
                    pass
            bs += s.replace("\u2581", " ").encode("utf-8", errors="surrogateescape")
        return bs.decode("utf-8", errors="replace")
