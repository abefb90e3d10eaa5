"""GGUF v3 writer (little endian).

Usage, streaming (tensor data never all in memory):

    w = GGUFWriter(path)
    w.add_string("general.architecture", "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_tensor_info("token_embd.weight", (n_vocab, dim), GGMLType.Q8_0)
    ...
    w.write_header()
    w.write_tensor_data("token_embd.weight", raw_bytes)   # declared order
    ...
    w.close()

or, for small files, add_tensor(name, array_or_bytes, ...) and write().

Shapes are given in numpy order (rows, cols); the file stores them reversed
(ne[0] = row length).
"""

import struct

import numpy as np

from .constants import (DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION,
                        SCALAR_FORMATS, GGMLType, VType, block_size,
                        tensor_nbytes, type_name)
from .reader import GGUFValue


def _enc_string(s):
    if isinstance(s, str):
        b = s.encode("utf-8", errors="surrogateescape")
    else:
        b = bytes(s)
    return struct.pack("<Q", len(b)) + b


def _infer_scalar_type(v):
    if isinstance(v, (bool, np.bool_)):
        return VType.BOOL
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if 0 <= v < 1 << 32:
            return VType.UINT32
        if -(1 << 31) <= v < 0:
            return VType.INT32
        if 0 <= v < 1 << 64:
            return VType.UINT64
        return VType.INT64
    if isinstance(v, (float, np.floating)):
        return VType.FLOAT32
    if isinstance(v, str):
        return VType.STRING
    raise TypeError("cannot infer a GGUF type for %r" % (v,))


_NP_TO_VTYPE = {
    np.dtype(np.uint8): VType.UINT8, np.dtype(np.int8): VType.INT8,
    np.dtype(np.uint16): VType.UINT16, np.dtype(np.int16): VType.INT16,
    np.dtype(np.uint32): VType.UINT32, np.dtype(np.int32): VType.INT32,
    np.dtype(np.float32): VType.FLOAT32, np.dtype(np.bool_): VType.BOOL,
    np.dtype(np.uint64): VType.UINT64, np.dtype(np.int64): VType.INT64,
    np.dtype(np.float64): VType.FLOAT64,
}


def encode_value(vtype, value, subtype=None):
    """Bytes of a metadata value of @vtype (without the type tag)."""
    if isinstance(value, GGUFValue):
        return encode_value(value.vtype, value.value, value.subtype)
    if vtype in SCALAR_FORMATS:
        fmt = SCALAR_FORMATS[vtype][0]
        if vtype == VType.BOOL:
            return struct.pack("<B", 1 if value else 0)
        if vtype in (VType.FLOAT32, VType.FLOAT64):
            return struct.pack("<" + fmt, float(value))
        return struct.pack("<" + fmt, int(value))
    if vtype == VType.STRING:
        return _enc_string(value)
    if vtype == VType.ARRAY:
        if subtype is None:
            subtype = _infer_array_subtype(value)
        head = struct.pack("<IQ", subtype, len(value))
        if subtype in SCALAR_FORMATS:
            dt = SCALAR_FORMATS[subtype][1]
            arr = np.asarray(value)
            if subtype == VType.BOOL:
                arr = arr.astype(bool).astype(np.uint8)
            return head + np.ascontiguousarray(arr, dtype=dt).tobytes()
        if subtype == VType.STRING:
            return head + b"".join(_enc_string(s) for s in value)
        if subtype == VType.ARRAY:
            parts = []
            for v in value:
                if isinstance(v, GGUFValue):
                    parts.append(encode_value(VType.ARRAY, v.value, v.subtype))
                else:
                    parts.append(encode_value(VType.ARRAY, v))
            return head + b"".join(parts)
        raise ValueError("bad array element type %r" % (subtype,))
    raise ValueError("bad value type %r" % (vtype,))


def _infer_array_subtype(value):
    if isinstance(value, np.ndarray):
        if value.dtype not in _NP_TO_VTYPE:
            raise TypeError("no GGUF type for numpy dtype %s" % value.dtype)
        return _NP_TO_VTYPE[value.dtype]
    if len(value) == 0:
        return VType.UINT32
    if isinstance(value[0], (list, tuple, np.ndarray, GGUFValue)):
        return VType.ARRAY
    kinds = set(_infer_scalar_type(v) for v in value)
    if kinds == {VType.BOOL}:
        return VType.BOOL
    if kinds == {VType.STRING}:
        return VType.STRING
    if VType.STRING in kinds or VType.BOOL in kinds:
        raise TypeError("mixed element types in array")
    if VType.FLOAT32 in kinds:
        return VType.FLOAT32
    lo = min(int(v) for v in value)
    hi = max(int(v) for v in value)
    if lo >= 0:
        return VType.UINT32 if hi < 1 << 32 else VType.UINT64
    return VType.INT32 if lo >= -(1 << 31) and hi < 1 << 31 else VType.INT64


class _PendingTensor:
    __slots__ = ("name", "ne", "type", "offset", "nbytes", "data")


class GGUFWriter:
    def __init__(self, path, alignment=DEFAULT_ALIGNMENT, write_alignment_key=None):
        if alignment <= 0 or alignment % 8:
            raise ValueError("alignment must be a positive multiple of 8")
        self.path = path
        self.alignment = alignment
        self._kv = []          # (key, vtype, encoded bytes)
        self._keys = set()
        self._tensors = []
        self._by_name = {}
        self._data_size = 0
        self._f = None
        self._next = 0
        self._pos = 0
        if write_alignment_key or (write_alignment_key is None
                                   and alignment != DEFAULT_ALIGNMENT):
            self.add_uint32("general.alignment", alignment)

    # ------------------------------------------------------------ metadata
    def add(self, key, value, vtype=None, subtype=None):
        """Add @key.  @value may be a GGUFValue (types taken from it), or a
        plain value whose type is @vtype or inferred (bool -> BOOL, int ->
        UINT32/INT32/UINT64/INT64, float -> FLOAT32, str -> STRING,
        list/ndarray -> ARRAY)."""
        if self._f is not None:
            raise RuntimeError("header already written")
        if key in self._keys:
            raise ValueError("duplicate key %r" % key)
        if isinstance(value, GGUFValue):
            vtype, subtype, value = value.vtype, value.subtype, value.value
        if vtype is None:
            if isinstance(value, (list, tuple, np.ndarray)):
                vtype = VType.ARRAY
            else:
                vtype = _infer_scalar_type(value)
        self._kv.append((key, vtype, encode_value(vtype, value, subtype)))
        self._keys.add(key)

    def add_uint8(self, k, v): self.add(k, v, VType.UINT8)
    def add_int8(self, k, v): self.add(k, v, VType.INT8)
    def add_uint16(self, k, v): self.add(k, v, VType.UINT16)
    def add_int16(self, k, v): self.add(k, v, VType.INT16)
    def add_uint32(self, k, v): self.add(k, v, VType.UINT32)
    def add_int32(self, k, v): self.add(k, v, VType.INT32)
    def add_uint64(self, k, v): self.add(k, v, VType.UINT64)
    def add_int64(self, k, v): self.add(k, v, VType.INT64)
    def add_float32(self, k, v): self.add(k, v, VType.FLOAT32)
    def add_float64(self, k, v): self.add(k, v, VType.FLOAT64)
    def add_bool(self, k, v): self.add(k, v, VType.BOOL)
    def add_string(self, k, v): self.add(k, v, VType.STRING)

    def add_array(self, k, values, subtype=None):
        self.add(k, values, VType.ARRAY, subtype)

    # -------------------------------------------------------------- tensors
    def add_tensor_info(self, name, shape, ggml_type):
        """Declare a tensor of numpy @shape (rows..., row length) and type.
        Its data is written later with write_tensor_data(), in the order
        the tensors were declared."""
        if self._f is not None:
            raise RuntimeError("header already written")
        if name in self._by_name:
            raise ValueError("duplicate tensor %r" % name)
        if len(name.encode()) > 64:
            raise ValueError("tensor name %r longer than 64 bytes" % name)
        shape = tuple(int(s) for s in shape)
        if not shape or len(shape) > 4:
            raise ValueError("tensor %s: 1 to 4 dimensions" % name)
        n = 1
        for s in shape:
            n *= s
        try:
            nbytes = tensor_nbytes(ggml_type, n)
            if shape[-1] % block_size(ggml_type):
                raise ValueError("row length %d not a multiple of the block size %d"
                                 % (shape[-1], block_size(ggml_type)))
        except ValueError as e:
            raise ValueError("tensor %s (%s, shape %s): %s"
                             % (name, type_name(ggml_type), shape, e))
        t = _PendingTensor()
        t.name = name
        t.ne = tuple(reversed(shape))
        t.type = ggml_type
        t.offset = self._data_size
        t.nbytes = nbytes
        t.data = None
        self._data_size += nbytes
        self._data_size += (self.alignment - self._data_size % self.alignment) % self.alignment
        self._tensors.append(t)
        self._by_name[name] = t
        return t

    def add_tensor(self, name, data, ggml_type=None, shape=None):
        """Declare a tensor and keep its data for write().

        @data: a float numpy array (encoded to @ggml_type, default F32; the
        quantizers exist for F32/F16/BF16/Q8_0/Q4_0), or raw bytes / a uint8
        array already in @ggml_type's layout, in which case @shape (numpy
        order) is required."""
        from .quants import encode
        if ggml_type is None:
            ggml_type = GGMLType.F32
        if isinstance(data, (bytes, bytearray, memoryview)) or \
                (isinstance(data, np.ndarray) and data.dtype == np.uint8 and shape is not None):
            if shape is None:
                raise ValueError("raw data for %s needs a shape" % name)
            raw = np.frombuffer(bytes(data), dtype=np.uint8) \
                if not isinstance(data, np.ndarray) else data.reshape(-1)
        else:
            arr = np.asarray(data)
            shape = arr.shape if shape is None else shape
            raw = encode(arr, ggml_type)
        t = self.add_tensor_info(name, shape, ggml_type)
        if raw.size != t.nbytes:
            raise ValueError("tensor %s: %d bytes of data, layout needs %d"
                             % (name, raw.size, t.nbytes))
        t.data = raw
        return t

    # --------------------------------------------------------------- output
    def write_header(self):
        if self._f is not None:
            raise RuntimeError("header already written")
        parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION,
                                         len(self._tensors), len(self._kv))]
        for key, vtype, enc in self._kv:
            parts.append(_enc_string(key))
            parts.append(struct.pack("<I", vtype))
            parts.append(enc)
        for t in self._tensors:
            parts.append(_enc_string(t.name))
            parts.append(struct.pack("<I", len(t.ne)))
            parts.append(struct.pack("<%dQ" % len(t.ne), *t.ne))
            parts.append(struct.pack("<IQ", t.type, t.offset))
        head = b"".join(parts)
        pad = (self.alignment - len(head) % self.alignment) % self.alignment
        self._f = open(self.path, "wb")
        self._f.write(head + b"\0" * pad)
        self._pos = 0
        self._next = 0

    def write_tensor_data(self, name, data):
        """Write the raw bytes of the next declared tensor (@name must be
        it).  @data: bytes or any numpy array (its bytes are written as is;
        give little-endian dtypes)."""
        self.write_tensor_stream(name, [data])

    def write_tensor_stream(self, name, chunks):
        """Like write_tensor_data(), with the bytes given as an iterable of
        consecutive pieces (so a large tensor need not be in memory)."""
        if self._f is None:
            raise RuntimeError("write_header() first")
        if self._next >= len(self._tensors):
            raise RuntimeError("all tensors already written")
        t = self._tensors[self._next]
        if t.name != name:
            raise RuntimeError("tensor %s written out of order (expected %s)"
                               % (name, t.name))
        assert self._pos == t.offset
        done = 0
        for data in chunks:
            if isinstance(data, np.ndarray):
                buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            else:
                buf = np.frombuffer(bytes(data), dtype=np.uint8)
            if done + buf.size > t.nbytes:
                raise ValueError("tensor %s: more than the %d bytes its layout "
                                 "needs" % (name, t.nbytes))
            self._f.write(memoryview(buf))
            done += buf.size
        if done != t.nbytes:
            raise ValueError("tensor %s: %d bytes, layout needs %d"
                             % (name, done, t.nbytes))
        self._pos += done
        pad = (self.alignment - self._pos % self.alignment) % self.alignment
        if pad:
            self._f.write(b"\0" * pad)
            self._pos += pad
        self._next += 1

    def close(self):
        if self._f is None:
            return
        f, self._f = self._f, None
        f.close()
        if self._next != len(self._tensors):
            raise RuntimeError("%s: %d of %d tensors written"
                               % (self.path, self._next, len(self._tensors)))

    def abort(self):
        """Close the file without the completeness check (after an error)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def write(self):
        """Header plus the data kept by add_tensor(), then close."""
        self.write_header()
        try:
            for t in self._tensors:
                if t.data is None:
                    raise RuntimeError("tensor %s has no data" % t.name)
                self.write_tensor_data(t.name, t.data)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._f is not None:
            if exc[0] is None:
                self.close()
            else:
                self.abort()
        return False
