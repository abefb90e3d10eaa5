"""Block layouts of F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K in numpy:
dequantization (float32, with the same float32 operation order as the
scalar ggml code, so results are bit-identical to it), random valid blocks
for test models, and simple Q8_0 / Q4_0 quantizers.

Layouts (little endian, f16 = IEEE binary16):
  Q8_0  32 elements, 34 bytes:  f16 d, int8 q[32];            x = d*q
  Q4_0  32 elements, 18 bytes:  f16 d, u8 qs[16]; element j is the low
        nibble of qs[j], element j+16 the high nibble;       x = d*(q-8)
  Q4_K  256 elements, 144 bytes: f16 d, f16 dmin, u8 scales[12],
        u8 qs[128].  Eight sub-blocks of 32 with 6-bit scale sc[i] and
        6-bit min m[i] packed in scales[]: for i < 4, sc = scales[i] & 63,
        m = scales[i+4] & 63; for i >= 4, sc = (scales[i+4] & 15) |
        (scales[i-4] >> 6) << 4, m = (scales[i+4] >> 4) | (scales[i] >> 6)
        << 4.  qs is four 32-byte chunks; chunk c holds sub-block 2c in its
        low nibbles and sub-block 2c+1 in its high nibbles.
        x = (d*sc)*q - (dmin*m)
  Q6_K  256 elements, 210 bytes: u8 ql[128], u8 qh[64], int8 sc[16], f16 d.
        Two halves of 128 elements; half h uses ql[64h:64h+64],
        qh[32h:32h+32].  For l < 32 in a half: element l = low nibble of
        ql[l] | bits 0-1 of qh[l] << 4; element l+32 = low nibble of
        ql[l+32] | bits 2-3 of qh[l] << 4; element l+64 = high nibble of
        ql[l] | bits 4-5 of qh[l] << 4; element l+96 = high nibble of
        ql[l+32] | bits 6-7 of qh[l] << 4.  Element e of the block uses
        scale sc[e // 16].                                x = (d*sc)*(q-32)
"""

import numpy as np

from .constants import GGMLType, QK_K, TYPE_INFO, tensor_nbytes, type_name

SUPPORTED_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0,
                   GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K)


def _as_u8(data):
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    a = np.asarray(data)
    if a.dtype != np.uint8:
        a = a.view(np.uint8)
    return a.reshape(-1)


def _f16(col):
    """Two-byte columns (n, 2) of little-endian f16 -> float32 (n,)."""
    return np.ascontiguousarray(col).view("<f2").reshape(-1).astype(np.float32)


# ----------------------------------------------------------- scalar formats
def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even
    (NaN kept quiet)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + r) >> 16).astype(np.uint16)
    if nan.any():
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def bf16_bits_to_f32(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------ dequantize
def _q4k_scales_mins(sc12):
    """(nb, 12) packed bytes -> (nb, 8) scales and (nb, 8) mins, uint8."""
    s = sc12.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty((s.shape[0], 8), dtype=np.uint8)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _q4k_pack_scales_mins(sc, mn):
    """Inverse of _q4k_scales_mins: (nb, 8) 6-bit values -> (nb, 12) bytes."""
    sc = np.asarray(sc, dtype=np.uint8)
    mn = np.asarray(mn, dtype=np.uint8)
    if (sc > 63).any() or (mn > 63).any():
        raise ValueError("Q4_K scales and mins are 6-bit (0..63)")
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def _deq_q8_0(b):
    d = _f16(b[:, 0:2])
    q = b[:, 2:34].view(np.int8).astype(np.float32)
    return q * d[:, None]


def _deq_q4_0(b):
    d = _f16(b[:, 0:2])
    qs = b[:, 2:18]
    q = np.concatenate([(qs & 0x0F), (qs >> 4)], axis=1).astype(np.int8) - 8
    return q.astype(np.float32) * d[:, None]


def _deq_q4_k(b):
    nb = b.shape[0]
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _q4k_scales_mins(b[:, 4:16])
    d1 = d[:, None] * sc.astype(np.float32)           # (nb, 8)
    m1 = dmin[:, None] * mn.astype(np.float32)
    qs = b[:, 16:144].reshape(nb, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32)
    y = d1[:, :, None] * q.astype(np.float32) - m1[:, :, None]
    return y.reshape(nb, QK_K)


def _q6k_quants(b):
    """(nb, 210) -> (nb, 256) int8 quants in 0..63 (before the -32)."""
    nb = b.shape[0]
    q = np.empty((nb, 2, 4, 32), dtype=np.uint8)
    ql = b[:, 0:128].reshape(nb, 2, 64)
    qh = b[:, 128:192].reshape(nb, 2, 32)
    q[:, :, 0] = (ql[:, :, 0:32] & 0x0F) | (((qh >> 0) & 3) << 4)
    q[:, :, 1] = (ql[:, :, 32:64] & 0x0F) | (((qh >> 2) & 3) << 4)
    q[:, :, 2] = (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    q[:, :, 3] = (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    return q.reshape(nb, QK_K)


def _deq_q6_k(b):
    nb = b.shape[0]
    d = _f16(b[:, 208:210])
    sc = b[:, 192:208].view(np.int8).astype(np.float32)   # (nb, 16)
    ds = d[:, None] * sc                                   # (nb, 16)
    q = (_q6k_quants(b).astype(np.int16) - 32).astype(np.float32)
    y = ds[:, :, None] * q.reshape(nb, 16, 16)
    return y.reshape(nb, QK_K)


_DEQ = {
    GGMLType.Q8_0: _deq_q8_0,
    GGMLType.Q4_0: _deq_q4_0,
    GGMLType.Q4_K: _deq_q4_k,
    GGMLType.Q6_K: _deq_q6_k,
}


def dequantize(data, ggml_type, n_elements=None):
    """Raw bytes of @n_elements of @ggml_type -> float32 array (n,).
    @n_elements defaults to everything in @data."""
    raw = _as_u8(data)
    bs, ts = TYPE_INFO.get(ggml_type, (None, None))
    if bs is None or (ggml_type not in SUPPORTED_TYPES):
        raise ValueError("cannot dequantize %s" % type_name(ggml_type))
    if n_elements is None:
        if raw.size % ts:
            raise ValueError("%d bytes is not a whole number of %s blocks"
                             % (raw.size, type_name(ggml_type)))
        n_elements = raw.size // ts * bs
    nbytes = tensor_nbytes(ggml_type, n_elements)
    if raw.size < nbytes:
        raise ValueError("need %d bytes for %d %s elements, have %d"
                         % (nbytes, n_elements, type_name(ggml_type), raw.size))
    raw = raw[:nbytes]
    if ggml_type == GGMLType.F32:
        return np.frombuffer(np.ascontiguousarray(raw), dtype="<f4").astype(np.float32)
    if ggml_type == GGMLType.F16:
        return np.frombuffer(np.ascontiguousarray(raw), dtype="<f2").astype(np.float32)
    if ggml_type == GGMLType.BF16:
        return bf16_bits_to_f32(np.frombuffer(np.ascontiguousarray(raw), dtype="<u2"))
    blocks = np.ascontiguousarray(raw).reshape(-1, ts)
    out = np.empty((blocks.shape[0], bs), dtype=np.float32)
    step = 1 << 16
    fn = _DEQ[ggml_type]
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = fn(blocks[i:i + step])
    return out.reshape(-1)


# ------------------------------------------------------------- quantize
def _round_away(x):
    """C roundf(): half away from zero."""
    return np.trunc(x + np.copysign(np.float32(0.5), x))


def quantize_q8_0(x):
    """float array (n multiple of 32) -> Q8_0 bytes, d = max|x|/127."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(x).max(axis=1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        idn = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = _round_away(x * idn[:, None]).clip(-127, 127).astype(np.int8)
    out = np.empty((x.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(-1)


def quantize_q4_0(x):
    """float array (n multiple of 32) -> Q4_0 bytes; d = m / -8 where m is
    the element of largest magnitude, q = min(15, trunc(x/d + 8.5))."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    idx = np.abs(x).argmax(axis=1)
    m = x[np.arange(x.shape[0]), idx]
    d = m / np.float32(-8)
    with np.errstate(divide="ignore", invalid="ignore"):
        idn = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.trunc(x * idn[:, None] + np.float32(8.5)).clip(0, 15).astype(np.uint8)
    out = np.empty((x.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:18] = q[:, 0:16] | (q[:, 16:32] << 4)
    return out.reshape(-1)


def encode(x, ggml_type):
    """float array -> bytes of @ggml_type (F32, F16, BF16, Q8_0, Q4_0)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if ggml_type == GGMLType.F32:
        return x.astype("<f4").view(np.uint8)
    if ggml_type == GGMLType.F16:
        return x.astype("<f2").view(np.uint8)
    if ggml_type == GGMLType.BF16:
        return f32_to_bf16_bits(x).astype("<u2").view(np.uint8)
    if ggml_type == GGMLType.Q8_0:
        return quantize_q8_0(x)
    if ggml_type == GGMLType.Q4_0:
        return quantize_q4_0(x)
    raise ValueError("no quantizer for %s" % type_name(ggml_type))


# ------------------------------------------------------- random blocks
def _rand_f16(rng, n, lo, hi, signed=False):
    """n positive (or random-sign) f16 values, log-uniform in [lo, hi]."""
    v = np.exp(rng.uniform(np.log(lo), np.log(hi), size=n)).astype(np.float32)
    if signed:
        v *= np.where(rng.random(n) < 0.5, -1, 1).astype(np.float32)
    return v.astype("<f2").view(np.uint8).reshape(n, 2)


def _put_cols(blocks, at, cols):
    blocks[:, at:at + cols.shape[1]] = cols


# Standard deviation of the raw quant pattern each format draws from
# uniform random bytes (used to scale d so weights come out ~N(0, std)).
_Q8_STD = 73.9       # int8 uniform in [-128, 127]
_Q4_STD = 4.61       # uniform in [-8, 7]
_Q4K_STD = 245.0     # sc*q - 7.5*m, sc, m in 0..63, q in 0..15
_Q6K_STD = 18.5 * 73.9  # (q-32) uniform, int8 scales uniform


def random_blocks(ggml_type, n_elements, rng, std=0.05):
    """Random valid data of @n_elements of @ggml_type, as a uint8 array.

    Float types hold N(0, std) values.  Quantized types hold uniformly
    random quant bytes (every bit pattern, including the 6-bit Q4_K scale
    packing and negative Q6_K scales) and super-block scales drawn as f16
    log-uniformly from [0.5, 2] times the value that gives weights of
    standard deviation @std.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        x = rng.standard_normal(n_elements, dtype=np.float32)
        x *= np.float32(std)
        return encode(x, ggml_type)
    nbytes = tensor_nbytes(ggml_type, n_elements)
    bs, ts = TYPE_INFO[ggml_type]
    nb = n_elements // bs
    blocks = np.frombuffer(bytearray(rng.bytes(nbytes)), dtype=np.uint8).reshape(nb, ts)
    lo, hi = 0.5, 2.0
    if ggml_type == GGMLType.Q8_0:
        base = std / _Q8_STD
        _put_cols(blocks, 0, _rand_f16(rng, nb, base * lo, base * hi))
    elif ggml_type == GGMLType.Q4_0:
        base = std / _Q4_STD
        _put_cols(blocks, 0, _rand_f16(rng, nb, base * lo, base * hi, signed=True))
    elif ggml_type == GGMLType.Q4_K:
        base = std / _Q4K_STD
        d = _rand_f16(rng, nb, base * lo, base * hi)
        _put_cols(blocks, 0, d)
        dm = d.view("<f2").astype(np.float32).reshape(-1) * np.float32(7.5)
        dm *= rng.uniform(0.8, 1.25, size=nb).astype(np.float32)
        _put_cols(blocks, 2, dm.astype("<f2").view(np.uint8).reshape(nb, 2))
    elif ggml_type == GGMLType.Q6_K:
        base = std / _Q6K_STD
        _put_cols(blocks, 208, _rand_f16(rng, nb, base * lo, base * hi))
    else:
        raise ValueError("no random generator for %s" % type_name(ggml_type))
    return blocks.reshape(-1)


# --------------------------------------------------- hand-built blocks
def make_q8_0_block(d, q):
    """One Q8_0 block from f16 scale @d and 32 int8 quants."""
    b = np.zeros(34, dtype=np.uint8)
    b[0:2] = np.array([d], dtype="<f2").view(np.uint8)
    b[2:] = np.asarray(q, dtype=np.int8).view(np.uint8)
    return b


def make_q4_0_block(d, q):
    """One Q4_0 block from f16 scale @d and 32 quants in 0..15."""
    q = np.asarray(q, dtype=np.uint8)
    b = np.zeros(18, dtype=np.uint8)
    b[0:2] = np.array([d], dtype="<f2").view(np.uint8)
    b[2:18] = (q[0:16] & 15) | ((q[16:32] & 15) << 4)
    return b


def make_q4_k_block(d, dmin, scales, mins, q):
    """One Q4_K block: f16 @d, @dmin, 8 6-bit @scales and @mins, 256 quants
    in 0..15 (element order)."""
    q = np.asarray(q, dtype=np.uint8).reshape(4, 2, 32)
    b = np.zeros(144, dtype=np.uint8)
    b[0:2] = np.array([d], dtype="<f2").view(np.uint8)
    b[2:4] = np.array([dmin], dtype="<f2").view(np.uint8)
    b[4:16] = _q4k_pack_scales_mins(np.asarray(scales).reshape(1, 8),
                                    np.asarray(mins).reshape(1, 8))[0]
    b[16:144] = ((q[:, 0, :] & 15) | ((q[:, 1, :] & 15) << 4)).reshape(-1)
    return b


def make_q6_k_block(d, scales, q):
    """One Q6_K block: f16 @d, 16 int8 @scales, 256 quants in 0..63
    (element order, before the -32 offset)."""
    q = np.asarray(q, dtype=np.uint8).reshape(2, 4, 32)
    b = np.zeros(210, dtype=np.uint8)
    ql = np.empty((2, 64), dtype=np.uint8)
    ql[:, 0:32] = (q[:, 0] & 15) | ((q[:, 2] & 15) << 4)
    ql[:, 32:64] = (q[:, 1] & 15) | ((q[:, 3] & 15) << 4)
    qh = ((q[:, 0] >> 4) & 3) | (((q[:, 1] >> 4) & 3) << 2) | \
        (((q[:, 2] >> 4) & 3) << 4) | (((q[:, 3] >> 4) & 3) << 6)
    b[0:128] = ql.reshape(-1)
    b[128:192] = qh.reshape(-1)
    b[192:208] = np.asarray(scales, dtype=np.int8).view(np.uint8)
    b[208:210] = np.array([d], dtype="<f2").view(np.uint8)
    return b
