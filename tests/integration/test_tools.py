#!/usr/bin/env python3
"""Unit tests of the Python test tooling: the GGUF reader/writer, the block
dequantizers (against hand-computed values), the random block generators,
gen_model.py and the PyTorch reference's internal consistency."""

import os
import struct
import subprocess
import sys

sys.path.insert(0, os.path.join(
    os.environ.get("KVQ_SRCDIR")
    or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
    "tools"))

from kvq_ref import testing  # noqa: E402


def f16_bytes(v):
    """Little-endian IEEE half of @v (exactly representable values only)."""
    return struct.pack("<e", v)


# ---------------------------------------------------------------- GGUF I/O
def test_roundtrip(tap, np, tmp):
    import kvq_gguf as g
    V = g.VType
    path = os.path.join(tmp, "rt.gguf")
    scalars = [
        ("t.u8", V.UINT8, 255), ("t.i8", V.INT8, -128),
        ("t.u16", V.UINT16, 65535), ("t.i16", V.INT16, -32768),
        ("t.u32", V.UINT32, 4294967295), ("t.i32", V.INT32, -2147483648),
        ("t.f32", V.FLOAT32, 0.15625), ("t.bool_t", V.BOOL, True),
        ("t.bool_f", V.BOOL, False), ("t.str", V.STRING, "h\u00e9llo \u2581w"),
        ("t.str_empty", V.STRING, ""),
        ("t.u64", V.UINT64, 18446744073709551615),
        ("t.i64", V.INT64, -9223372036854775808),
        ("t.f64", V.FLOAT64, -1.0000000000000002),
    ]
    arrays = [
        ("a.u8", V.UINT8, np.array([0, 1, 255], np.uint8)),
        ("a.i8", V.INT8, np.array([-128, 0, 127], np.int8)),
        ("a.u16", V.UINT16, np.array([1, 65535], np.uint16)),
        ("a.i16", V.INT16, np.array([-32768, 7], np.int16)),
        ("a.u32", V.UINT32, np.array([4294967295, 0, 5], np.uint32)),
        ("a.i32", V.INT32, np.array([-1, 2, -3], np.int32)),
        ("a.f32", V.FLOAT32, np.array([1.5, -0.0, 3e38], np.float32)),
        ("a.bool", V.BOOL, np.array([True, False, True])),
        ("a.u64", V.UINT64, np.array([2 ** 64 - 1], np.uint64)),
        ("a.i64", V.INT64, np.array([-2 ** 63, 1], np.int64)),
        ("a.f64", V.FLOAT64, np.array([0.1, -2.5], np.float64)),
        ("a.empty", V.INT32, np.array([], np.int32)),
    ]
    strs = ["a", "", "\u2581the", "<0x0A>", "\u4f60\u597d"]
    nested = [g.GGUFValue(V.ARRAY, np.array([1, 2], np.int32), V.INT32),
              g.GGUFValue(V.ARRAY, ["x", "yz"], V.STRING)]
    w = g.GGUFWriter(path)
    for k, t, v in scalars:
        w.add(k, v, t)
    for k, t, v in arrays:
        w.add_array(k, v, t)
    w.add_array("a.str", strs, V.STRING)
    w.add_array("a.nested", nested, V.ARRAY)
    w.add("infer.int", 7)
    w.add("infer.neg", -7)
    w.add("infer.float", 0.5)
    w.add("infer.list", [1, 2, 3])
    rng = np.random.default_rng(5)
    tensors = {}
    for i, t in enumerate(g.SUPPORTED_TYPES):
        bs = g.block_size(t)
        shape = (3, 2 * bs) if bs > 1 else (5, 7)
        raw = g.random_blocks(t, shape[0] * shape[1], rng)
        name = "tensor.%s" % g.type_name(t)
        w.add_tensor(name, raw, t, shape=shape)
        tensors[name] = (t, shape, raw)
    w.add_tensor("vec.f32", np.arange(3, dtype=np.float32))
    w.write()

    r = g.GGUFReader(path)
    tap.ok(r.version == 3 and open(path, "rb").read(4) == b"GGUF",
           "round trip: magic GGUF, version 3")
    bad = []
    for k, t, v in scalars:
        f = r.fields.get(k)
        if f is None or f.vtype != t or f.value != v or \
                type(f.value) is not type(v):
            bad.append((k, f))
    tap.ok(not bad, "round trip: 13 scalar value types (%d keys)%s"
           % (len(scalars), (" bad: %r" % bad) if bad else ""))
    bad = []
    for k, t, v in arrays:
        f = r.fields.get(k)
        if f is None or f.vtype != V.ARRAY or f.subtype != t or \
                not np.array_equal(f.value, v) or len(f.value) != len(v):
            bad.append((k, f))
    tap.ok(not bad, "round trip: numeric/bool arrays of every element type%s"
           % ((" bad: %r" % bad) if bad else ""))
    f = r.fields.get("a.str")
    tap.ok(f is not None and f.subtype == V.STRING and f.value == strs,
           "round trip: string array (UTF-8, empty string)")
    f = r.fields.get("a.nested")
    tap.ok(f is not None and f.subtype == V.ARRAY and f.plain() ==
           [[1, 2], ["x", "yz"]] and f.value[0].subtype == V.INT32 and
           f.value[1].subtype == V.STRING, "round trip: nested arrays")
    tap.ok(r.fields["infer.int"].vtype == V.UINT32 and
           r.fields["infer.neg"].vtype == V.INT32 and
           r.fields["infer.float"].vtype == V.FLOAT32 and
           r.fields["infer.list"].subtype == V.UINT32,
           "writer infers uint32/int32/float32/array types")
    tap.ok(list(r.fields)[:len(scalars)] == [k for k, _, _ in scalars],
           "metadata keys keep their order")
    bad = []
    for name, (t, shape, raw) in tensors.items():
        ti = r.tensor(name)
        got = np.asarray(r.tensor_bytes(ti))
        if ti.type != t or ti.shape != shape or \
                ti.ne != tuple(reversed(shape)) or not np.array_equal(got, raw):
            bad.append(name)
    tap.ok(not bad, "round trip: tensor infos and data of %s%s"
           % (", ".join(g.type_name(t) for t in g.SUPPORTED_TYPES),
              (" bad: %s" % bad) if bad else ""))
    tap.ok(all(ti.offset % 32 == 0 for ti in r.tensors) and
           r.data_offset % 32 == 0 and
           np.array_equal(r.tensor_data("vec.f32"), [0, 1, 2]),
           "tensor data aligned to 32 bytes")
    # header byte layout written by hand
    raw = open(path, "rb").read()
    n_t, n_kv = struct.unpack_from("<QQ", raw, 8)
    klen = struct.unpack_from("<Q", raw, 24)[0]
    key = raw[32:32 + klen]
    vt = struct.unpack_from("<I", raw, 32 + klen)[0]
    val = raw[36 + klen]
    tap.ok(n_t == len(tensors) + 1 and n_kv == len(r.fields) and
           key == b"t.u8" and vt == 0 and val == 255,
           "header layout: counts, first key string, type tag, value")
    r.close()

    # non-default alignment
    path2 = os.path.join(tmp, "al.gguf")
    w = g.GGUFWriter(path2, alignment=64)
    w.add_tensor("a", np.ones(3, np.float32))
    w.add_tensor("b", np.ones(5, np.float32))
    w.write()
    with g.GGUFReader(path2) as r2:
        tap.ok(r2.alignment == 64 and r2.get("general.alignment") == 64 and
               r2.tensor("b").offset == 64 and r2.data_offset % 64 == 0,
               "general.alignment 64 honoured by writer and reader")
    # errors
    bad_path = os.path.join(tmp, "bad.gguf")
    with open(bad_path, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 100))
    try:
        g.GGUFReader(bad_path)
        ok = False
    except g.GGUFError as e:
        ok = "truncated" in str(e)
    tap.ok(ok, "reader rejects a truncated file")


def test_stories_reader(tap, np):
    import kvq_gguf as g
    p = testing.testdata("stories260K.gguf")
    if p is None:
        tap.skip("reader on stories260K.gguf", "test data missing")
        return
    with g.GGUFReader(p) as r:
        tap.ok(r.get("general.architecture") == "llama" and
               r.get("llama.embedding_length") == 64 and
               r.get("llama.block_count") == 5 and
               r.get("llama.attention.head_count_kv") == 4 and
               len(r.get("tokenizer.ggml.tokens")) == 512 and
               len(r.tensors) == 48 and
               r.tensor("blk.0.ffn_down.weight").shape == (64, 172),
               "reader: stories260K.gguf metadata and tensor shapes")


# ------------------------------------------------------- dequantization
def test_dequant_hand(tap, np):
    import kvq_gguf as g
    T = g.GGMLType

    raw = struct.pack("<4f", 1.0, -2.5, 0.0, 3.25)
    got = g.dequantize(raw, T.F32)
    tap.ok(got.tolist() == [1.0, -2.5, 0.0, 3.25], "dequant F32")

    raw = struct.pack("<6H", 0x3C00, 0xC000, 0x0001, 0x7BFF, 0x3555, 0x8400)
    got = g.dequantize(raw, T.F16)
    want = [1.0, -2.0, 2.0 ** -24, 65504.0, 0.333251953125, -2.0 ** -14]
    tap.ok(got.tolist() == want, "dequant F16 (normal, subnormal, max)")

    raw = struct.pack("<4H", 0x3F80, 0xC040, 0x3E20, 0x0001)
    got = g.dequantize(raw, T.BF16)
    want = [1.0, -3.0, 0.15625, float(np.float32(2.0 ** -133))]
    tap.ok(got.tolist() == want, "dequant BF16")
    bits = g.f32_to_bf16_bits(np.array([1.0, 1.00390625, 1.01171875, -3.0],
                                       np.float32))
    tap.ok(bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC040],
           "f32 -> bf16 rounds to nearest even")

    # Q8_0: d = 0.125, q = -128, -1, 0, 1, 127, then 5 6 7 ...
    q = [-128, -1, 0, 1, 127] + list(range(5, 32))
    raw = f16_bytes(0.125) + struct.pack("<32b", *q)
    got = g.dequantize(raw, T.Q8_0)
    tap.ok(got[:5].tolist() == [-16.0, -0.125, 0.0, 0.125, 15.875] and
           got[5:].tolist() == [0.125 * v for v in range(5, 32)],
           "dequant Q8_0 (hand-built block)")

    # Q4_0: d = -1.5; byte 0 = 0xF0 -> x0 = (0-8)*d = 12, x16 = (15-8)*d;
    # byte 15 = 0x98 -> x15 = (8-8)*d = 0, x31 = (9-8)*d = -1.5;
    # bytes 1..14 = 0x3A -> x1..14 = (10-8)*d = -3, x17..30 = (3-8)*d = 7.5
    qs = bytes([0xF0] + [0x3A] * 14 + [0x98])
    raw = f16_bytes(-1.5) + qs
    got = g.dequantize(raw, T.Q4_0).tolist()
    want = [12.0] + [-3.0] * 14 + [0.0] + [-10.5] + [7.5] * 14 + [-1.5]
    tap.ok(got == want, "dequant Q4_0 (low nibbles first, then high)")

    # Q4_K: d = 1, dmin = 0.5.  scales bytes:
    #   s0 = 0x43: sc0 = 3, top bits 01 -> sc4 bits 4-5
    #   s1 = 0xC1: sc1 = 1, top bits 11 -> sc5 bits 4-5
    #   s4 = 0x85: m0 = 5, top bits 10 -> m4 bits 4-5
    #   s8 = 0x97: sc4 = 7 | 1<<4 = 23, m4 = 9 | 2<<4 = 41
    #   all else 0: sc2 = sc3 = sc6 = sc7 = 0, m1..m3 = m5..m7 = 0,
    #   sc5 = 0 | 3<<4 = 48
    # qs: chunk c (32 bytes) = sub-block 2c (low nibbles), 2c+1 (high)
    #   qs[0] = 0xA3: x0 = 3 (sb0), x32 = 10 (sb1)
    #   qs[64] = 0x5C: x128 = 12 (sb4), x160 = 5 (sb5)
    sc = bytearray(12)
    sc[0], sc[1], sc[4], sc[8] = 0x43, 0xC1, 0x85, 0x97
    qs = bytearray(128)
    qs[0], qs[64] = 0xA3, 0x5C
    raw = f16_bytes(1.0) + f16_bytes(0.5) + bytes(sc) + bytes(qs)
    got = g.dequantize(raw, T.Q4_K)
    want = np.zeros(256)
    want[0:32] = -2.5                  # sb0: 3*q - 0.5*5, q = 0
    want[0] = 1 * 3 * 3 - 0.5 * 5      # 6.5
    want[32] = 1 * 1 * 10              # sb1: sc 1, m 0
    want[128:160] = -0.5 * 41          # sb4: 23*q - 20.5
    want[128] = 23 * 12 - 0.5 * 41     # 255.5
    want[160] = 48 * 5                 # sb5: sc 48, m 0
    tap.ok(got.tolist() == want.tolist() and got[0] == 6.5 and
           got[128] == 255.5 and got[160] == 240.0,
           "dequant Q4_K (6-bit scale/min packing, nibble order)")

    # Q6_K: d = 0.5, scales sc[0]=2 sc[1]=-3 sc[2]=4 sc[4]=1 sc[6]=-1
    # sc[8]=5, others 0.  q = (4 low bits from ql) | (2 bits of qh) << 4.
    #   ql[0] = 0x21, ql[32] = 0x7F, qh[0] = 0xE4 (bits 00 01 10 11):
    #     x0  = (1 | 0<<4) - 32 = -31,  * 0.5*2   = -31
    #     x32 = (15 | 1<<4) - 32 = -1,  * 0.5*4   = -2
    #     x64 = (2 | 2<<4) - 32 = 2,    * 0.5*1   = 1
    #     x96 = (7 | 3<<4) - 32 = 23,   * 0.5*-1  = -11.5
    #   second half: ql[64] = 0x0F, qh[32] = 0x03:
    #     x128 = (15 | 3<<4) - 32 = 31, * 0.5*5 = 77.5
    #   every other quant is 0 - 32 = -32, times its scale sc[e // 16]
    ql = bytearray(128)
    qh = bytearray(64)
    ql[0], ql[32], qh[0] = 0x21, 0x7F, 0xE4
    ql[64], qh[32] = 0x0F, 0x03
    scales = [2, -3, 4, 0, 1, 0, -1, 0, 5, 0, 0, 0, 0, 0, 0, 0]
    raw = bytes(ql) + bytes(qh) + struct.pack("<16b", *scales) + f16_bytes(0.5)
    got = g.dequantize(raw, T.Q6_K)
    want = np.array([0.5 * scales[e // 16] * -32 for e in range(256)])
    want[0], want[32], want[64], want[96], want[128] = -31, -2, 1, -11.5, 77.5
    tap.ok(got.tolist() == want.tolist() and got[16] == 48.0,
           "dequant Q6_K (ql/qh bit planes, signed scales)")

    # the hand-block builders agree with the raw layouts above
    b = g.make_q4_k_block(1.0, 0.5, [3, 1, 0, 0, 23, 48, 0, 0],
                          [5, 0, 0, 0, 41, 0, 0, 0],
                          [3 if e == 0 else 10 if e == 32 else 12 if e == 128
                           else 5 if e == 160 else 0 for e in range(256)])
    q6 = [0] * 256
    q6[0], q6[32], q6[64], q6[96], q6[128] = 1, 31, 34, 55, 63
    b6 = g.make_q6_k_block(0.5, scales, q6)
    tap.ok(g.dequantize(b, T.Q4_K).tolist() ==
           g.dequantize(f16_bytes(1.0) + f16_bytes(0.5) + bytes(sc) + bytes(qs),
                        T.Q4_K).tolist() and
           g.dequantize(b6, T.Q6_K).tolist() == want.tolist(),
           "make_q4_k_block / make_q6_k_block build the same blocks")

    # multi-block rows: blocks are independent and in order
    r2 = g.dequantize(raw + raw, T.Q6_K)
    tap.ok(r2.shape == (512,) and r2[256:].tolist() == want.tolist(),
           "dequant of several consecutive blocks")


def test_quantizers(tap, np):
    import kvq_gguf as g
    T = g.GGMLType
    rng = np.random.default_rng(1)
    x = rng.standard_normal(32 * 64).astype(np.float32)
    y = g.dequantize(g.quantize_q8_0(x), T.Q8_0)
    d = np.abs(x.reshape(-1, 32)).max(axis=1) / 127
    err = np.abs(y - x).reshape(-1, 32).max(axis=1)
    # half a step, plus the f16 rounding of d times the largest quant
    tap.ok(bool((err <= d * (0.5 + 127 * 2.0 ** -11)).all()),
           "quantize_q8_0 error within half a step (max %.3g)" % err.max())
    y = g.dequantize(g.quantize_q4_0(x), T.Q4_0)
    xb = x.reshape(-1, 32)
    m = xb[np.arange(xb.shape[0]), np.abs(xb).argmax(axis=1)]
    d = np.abs(m) / 8
    err = np.abs(y - x).reshape(-1, 32)
    clipped = (xb / (m / -8)[:, None] + 8.5) >= 16
    lim = d[:, None] * (0.5 + 8 * 2.0 ** -11)
    tap.ok(bool((err[~clipped] <= np.broadcast_to(lim, err.shape)[~clipped]).all()
                and (err <= 2 * lim).all()),
           "quantize_q4_0 error within half a step (a step where q clips "
           "at 15) (max %.3g)" % err.max())
    z = g.dequantize(g.quantize_q4_0(np.zeros(32, np.float32)), T.Q4_0)
    tap.ok(not z.any(), "quantize_q4_0 of zeros is zeros")


def test_random_blocks(tap, np):
    import kvq_gguf as g
    rng = np.random.default_rng(2)
    bad = []
    for t in g.SUPPORTED_TYPES:
        n = 256 * 64
        raw = g.random_blocks(t, n, rng, std=0.05)
        if raw.dtype != np.uint8 or raw.size != g.tensor_nbytes(t, n):
            bad.append("%s size" % g.type_name(t))
            continue
        x = g.dequantize(raw, t)
        s = float(x.std())
        if not np.isfinite(x).all() or not (0.025 <= s <= 0.1) or \
                abs(float(x.mean())) > 0.02:
            bad.append("%s std %.3g mean %.3g" % (g.type_name(t), s, x.mean()))
    tap.ok(not bad, "random_blocks: valid blocks, weights ~N(0, 0.05)%s"
           % ((" bad: %s" % bad) if bad else ""))
    a = g.random_blocks(g.GGMLType.Q4_K, 512, np.random.default_rng(9))
    b = g.random_blocks(g.GGMLType.Q4_K, 512, np.random.default_rng(9))
    tap.ok(np.array_equal(a, b), "random_blocks is deterministic per seed")


# ------------------------------------------------------------ gen_model
def test_gen_model(tap, np, tmp):
    import kvq_gguf as g
    import gen_model
    stories = testing.testdata("stories260K.gguf")
    if stories is None:
        tap.skip("gen_model", "test data missing: stories260K.gguf")
        return
    gm = os.path.join(testing.srcdir(), "tools", "gen_model.py")
    out = os.path.join(tmp, "g.gguf")
    cmd = [sys.executable, gm, "--out", out, "--arch", "qwen2", "--type",
           "Q4_K", "--dim", "256", "--layers", "2", "--heads", "4",
           "--kv-heads", "2", "--ffn", "512", "--ctx", "64", "--seed", "3",
           "--tied", "--vocab-from", stories, "--quiet"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ok = p.returncode == 0
    if ok:
        with g.GGUFReader(out) as r, g.GGUFReader(stories) as v:
            names = [t.name for t in r.tensors]
            ok = (r.get("general.architecture") == "qwen2" and
                  r.get("qwen2.embedding_length") == 256 and
                  r.get("qwen2.attention.head_count_kv") == 2 and
                  r.get("qwen2.rope.dimension_count") == 64 and
                  "output.weight" not in names and
                  r.tensor("blk.1.attn_k.weight").shape == (128, 256) and
                  r.tensor("blk.1.attn_k.weight").type == g.GGMLType.Q4_K and
                  r.tensor("blk.1.attn_k.bias").type == g.GGMLType.F32 and
                  r.tensor("blk.0.ffn_down.weight").shape == (256, 512) and
                  r.tensor("token_embd.weight").shape == (512, 256) and
                  all(r.fields[k] == f for k, f in v.fields.items()
                      if k.startswith("tokenizer.")))
    tap.ok(ok, "gen_model.py writes a tied qwen2 Q4_K model with the "
           "tokenizer copied%s" % ("" if p.returncode == 0 else
                                   ": " + p.stderr.decode()[-200:]))
    out = os.path.join(tmp, "km.gguf")
    p = subprocess.run([sys.executable, gm, "--out", out, "--arch", "llama",
                        "--type", "Q4_K_M", "--dim", "256", "--layers", "8",
                        "--heads", "4", "--ffn", "512", "--ctx", "64",
                        "--vocab-from", stories, "--quiet"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = want = None
    if p.returncode == 0:
        with g.GGUFReader(out) as r:
            got = {t.name: t.type for t in r.tensors if t.type not in
                   (g.GGMLType.F32,)}
        q6 = ["output.weight"] + ["blk.%d.%s.weight" % (i, n)
                                  for i in (0, 3, 6, 7)
                                  for n in ("attn_v", "ffn_down")]
        want = {n: (g.GGMLType.Q6_K if n in q6 else g.GGMLType.Q4_K)
                for n in got}
    tap.ok(got is not None and got == want and len(got) == 2 + 8 * 7,
           "gen_model.py --type Q4_K_M: Q6_K for output and for attn_v and "
           "ffn_down of layers 0, 3, 6 and 7 of 8, Q4_K elsewhere%s" %
           ("" if p.returncode == 0 else ": " + p.stderr.decode()[-200:]))
    cmd2 = [sys.executable, gm, "--out", os.path.join(tmp, "x.gguf"),
            "--arch", "llama", "--type", "Q6_K", "--dim", "320", "--layers",
            "1", "--heads", "4", "--ffn", "512", "--vocab-from", stories]
    p = subprocess.run(cmd2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = p.stderr.decode()
    tap.ok(p.returncode == 2 and "multiple of the Q6_K block size 256" in err
           and not os.path.exists(os.path.join(tmp, "x.gguf")),
           "gen_model.py rejects --dim not a multiple of the block size")
    def outlier_model(name, typ, layers, outlier):
        """gen_model.py --outlier run: (its result, the path written)."""
        path = os.path.join(tmp, name)
        return subprocess.run(
            [sys.executable, gm, "--out", path, "--arch", "llama", "--type",
             typ, "--dim", "64", "--layers", str(layers), "--heads", "4",
             "--ffn", "128", "--vocab-from", stories, "--outlier", outlier,
             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE), path

    p, out = outlier_model("big.gguf", "BF16", 2,
                           "blk.1.ffn_down.weight=100000")
    big = rest = None
    if p.returncode == 0:
        with g.GGUFReader(out) as r:
            d = r.tensor_data("blk.1.ffn_down.weight")
            big = float(d[0, 0])
            rest = float(np.abs(d).reshape(-1)[1:].max())
            rest = max(rest, float(np.abs(
                r.tensor_data("blk.0.ffn_down.weight")).max()))
    tap.ok(big is not None and abs(big - 100000.0) <= 512.0 and rest < 1.0,
           "gen_model.py --outlier: the tensor's first weight is the value "
           "(bf16: %s), the others stay small (largest %s)%s" %
           (big, rest, "" if p.returncode == 0 else
            ": " + p.stderr.decode()[-200:]))
    p, out = outlier_model("bigq8.gguf", "Q8_0", 1,
                           "blk.0.attn_q.weight=-70000")
    blk = None
    if p.returncode == 0:
        with g.GGUFReader(out) as r:
            blk = r.tensor_data("blk.0.attn_q.weight")[0, :32].tolist()
    tap.ok(blk is not None and abs(blk[0] + 70000.0) <= 70000.0 / 254 and
           not any(blk[1:]),
           "gen_model.py --outlier on Q8_0: the first block holds the value "
           "(%s) and zeros%s" % (blk and blk[0], "" if p.returncode == 0
                                  else ": " + p.stderr.decode()[-200:]))
    p, out = outlier_model("rowq8.gguf", "Q8_0", 1,
                           "token_embd.weight@3=70000")
    rows = None
    if p.returncode == 0:
        with g.GGUFReader(out) as r:
            e = r.tensor_data("token_embd.weight")
            rows = [i for i in range(e.shape[0]) if np.abs(e[i]).max() > 1.0]
            blk = e[3, :32].tolist()
    tap.ok(rows == [3] and abs(blk[0] - 70000.0) <= 70000.0 / 254 and
           not any(blk[1:]),
           "gen_model.py --outlier TENSOR@ROW: row 3 of the embedding holds "
           "the value and zeros in its first block, no other row a large "
           "weight (rows with a weight past 1: %s)%s" % (rows, "" if p.returncode == 0
                                             else ": " + p.stderr.decode()[-200:]))
    p, out = outlier_model("rowbad.gguf", "Q8_0", 1,
                           "blk.0.attn_q.weight@64=1")
    tap.ok(p.returncode == 2 and b"has 64 rows" in p.stderr and
           not os.path.exists(out),
           "gen_model.py --outlier rejects a row past the weight's rows, "
           "writing nothing (%s)" % p.stderr.decode().strip()[-120:])
    for bad, what in ((["--heads", "5"], "divisible"),
                      (["--kv-heads", "3"], "multiple of --kv-heads"),
                      (["--outlier", "blk.0.attn_q.weight"], "TENSOR=VALUE"),
                      (["--outlier", "blk.0.attn_q.weight@x=1"], "TENSOR@ROW"),
                      (["--outlier", "blk.7.attn_q.weight=1e5"],
                       "no such weight"),
                      (["--outlier", "blk.0.attn_q.weight=nan"],
                       "finite number")):
        a = gen_model.parse_args(["--out", os.path.join(tmp, "y.gguf"),
                                  "--arch", "llama", "--type", "F32", "--dim",
                                  "64", "--layers", "1", "--heads", "4",
                                  "--ffn", "64", "--vocab-from", stories] + bad)
        try:
            gen_model.validate(a)
            msg = ""
        except gen_model.ArgError as e:
            msg = str(e)
        tap.ok(what in msg, "gen_model.py rejects %s (%s)" % (" ".join(bad),
                                                              msg or "accepted"))


# ------------------------------------------------------------ reference
def test_reference(tap, np, tmp):
    import torch
    import kvq_gguf as g
    import gen_model
    from kvq_ref import KVCache, RefModel
    stories = testing.testdata("stories260K.gguf")
    if stories is None:
        tap.skip("reference on stories260K", "test data missing")
        return
    m = RefModel(stories)
    ids = m.greedy([1], 30)
    text = m.detokenize(ids)
    tap.ok(text.strip().startswith("Once upon a time"),
           "reference: stories260K greedy from BOS reads %r" % text[:40])
    seq = [1] + ids[:20]
    full = m.logits(seq)
    c = KVCache(m.hp.n_layers)
    inc = np.concatenate([m.forward(seq[:7], c).numpy(),
                          m.forward(seq[7:8], c).numpy(),
                          m.forward(seq[8:], c).numpy()])
    tap.ok(np.abs(full - inc).max() < 1e-12,
           "reference: KV-cache steps equal a full recompute")
    m32 = RefModel(stories, dtype=torch.float32)
    d32 = np.abs(m32.logits(seq) - full).max()
    tap.ok(d32 < 1e-4, "reference: float32 run within %.2g of float64" % d32)

    # qwen2 (half-split RoPE) against llama (adjacent pairs): a qwen2 model
    # whose q/k rows are the llama rows regrouped (row 2i -> i, 2i+1 ->
    # i+hd/2 in each head) and whose biases are zero computes the same
    # logits, because q.k is invariant under the same permutation of q
    # and k.
    src = os.path.join(tmp, "llama.gguf")
    gen_model.write_model(gen_model.parse_args(
        ["--out", src, "--arch", "llama", "--type", "F32", "--dim", "64",
         "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "128",
         "--ctx", "64", "--seed", "4", "--rope-base", "10000",
         "--vocab-from", stories, "--quiet"]))
    dst = os.path.join(tmp, "qwen2.gguf")
    with g.GGUFReader(src) as r:
        hd = 16
        perm = np.concatenate([np.arange(0, hd, 2), np.arange(1, hd, 2)])
        w = g.GGUFWriter(dst)
        for k, f in r.fields.items():
            if k.startswith("llama."):
                k = "qwen2." + k[len("llama."):]
            w.add(k, "qwen2" if k == "general.architecture" else f,
                  None if k != "general.architecture" else g.VType.STRING)
        for ti in r.tensors:
            a = np.array(r.tensor_data(ti))
            if ti.name.endswith(("attn_q.weight", "attn_k.weight")):
                nh = a.shape[0] // hd
                idx = np.concatenate([h * hd + perm for h in range(nh)])
                a = a[idx]
            w.add_tensor(ti.name, a)
            if ti.name.endswith(("attn_q.weight", "attn_k.weight",
                                 "attn_v.weight")):
                w.add_tensor(ti.name.replace(".weight", ".bias"),
                             np.zeros(a.shape[0], np.float32))
        w.write()
    ids2 = [1, 50, 300, 7, 99, 420, 13, 256, 3, 17, 18, 211]
    la = RefModel(src).logits(ids2)
    lq = RefModel(dst).logits(ids2)
    tap.ok(np.abs(la - lq).max() < 1e-10,
           "reference: qwen2 half-split RoPE == llama adjacent-pair RoPE "
           "on permuted q/k rows (diff %.2g)" % np.abs(la - lq).max())
    # and RoPE really matters (positions change the logits)
    tap.ok(np.abs(la[3] - RefModel(src).logits([ids2[3]])[0]).max() > 1e-3,
           "reference: logits depend on context")

    # GQA: a model with kv heads duplicated to n_heads gives the same logits
    dup = os.path.join(tmp, "mha.gguf")
    with g.GGUFReader(src) as r:
        w = g.GGUFWriter(dup)
        for k, f in r.fields.items():
            w.add(k, 4 if k == "llama.attention.head_count_kv" else f,
                  g.VType.UINT32 if k == "llama.attention.head_count_kv"
                  else None)
        for ti in r.tensors:
            a = np.array(r.tensor_data(ti))
            if ti.name.endswith(("attn_k.weight", "attn_v.weight")):
                a = a.reshape(2, hd, -1).repeat(2, axis=0).reshape(4 * hd, -1)
            w.add_tensor(ti.name, a)
        w.write()
    lm = RefModel(dup).logits(ids2)
    tap.ok(np.abs(la - lm).max() < 1e-10,
           "reference: GQA (query head h uses kv head h // group) equals "
           "MHA with duplicated kv heads")


def main():
    miss = testing.missing_modules()
    if miss:
        testing.skip_all("python modules missing: %s" % ", ".join(miss))
    import numpy as np
    tap = testing.Tap()
    with testing.tempdir() as tmp:
        test_roundtrip(tap, np, tmp)
        test_stories_reader(tap, np)
        test_dequant_hand(tap, np)
        test_quantizers(tap, np)
        test_random_blocks(tap, np)
        test_gen_model(tap, np, tmp)
        test_reference(tap, np, tmp)
    return tap.done()


if __name__ == "__main__":
    sys.exit(main())
