"""GGUF v2/v3 reader: metadata of every value type, tensor infos, and
tensor data as numpy views of a read-only memory map."""

import struct

import numpy as np

from .constants import (DEFAULT_ALIGNMENT, GGUF_MAGIC, SCALAR_FORMATS,
                        TYPE_INFO, VType, type_name)


class GGUFError(Exception):
    pass


class GGUFValue:
    """A typed metadata value.

    vtype: the value type.  value: a Python int/float/bool/str for scalars;
    for arrays, a numpy array (numeric and bool elements), a list of str
    (string elements) or a list of GGUFValue (nested arrays).  subtype: the
    element type of an array, else None.
    """
    __slots__ = ("vtype", "value", "subtype")

    def __init__(self, vtype, value, subtype=None):
        self.vtype = vtype
        self.value = value
        self.subtype = subtype

    def plain(self):
        """The value with nested GGUFValues unwrapped to Python lists."""
        if self.vtype == VType.ARRAY:
            if self.subtype == VType.ARRAY:
                return [v.plain() for v in self.value]
            if isinstance(self.value, np.ndarray):
                return self.value.tolist()
            return list(self.value)
        return self.value

    def __eq__(self, other):
        if not isinstance(other, GGUFValue):
            return NotImplemented
        if (self.vtype, self.subtype) != (other.vtype, other.subtype):
            return False
        a, b = self.value, other.value
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.array_equal(np.asarray(a), np.asarray(b))
        if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
            return True
        return a == b

    def __repr__(self):
        if self.vtype == VType.ARRAY:
            return "GGUFValue(ARRAY[%s] x %d)" % (self.subtype, len(self.value))
        return "GGUFValue(%s, %r)" % (self.vtype, self.value)


class TensorInfo:
    """One tensor: name, ne (GGUF order, ne[0] = row length), shape (numpy
    order, reversed ne), ggml type, offset in the data section, absolute
    file offset, byte size and element count."""
    __slots__ = ("name", "ne", "type", "offset", "file_offset", "nbytes",
                 "n_elements")

    @property
    def shape(self):
        return tuple(reversed(self.ne))

    @property
    def type_name(self):
        return type_name(self.type)

    def __repr__(self):
        return "TensorInfo(%s, ne=%s, %s, off=%d)" % (
            self.name, list(self.ne), self.type_name, self.offset)


class _Cursor:
    def __init__(self, buf, size):
        self.buf = buf
        self.pos = 0
        self.size = size

    def need(self, n):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError("truncated file: need %d bytes at offset %d, "
                            "file has %d" % (n, self.pos, self.size))

    def unpack(self, fmt, n):
        self.need(n)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.unpack("Q", 8)
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="surrogateescape")


class GGUFReader:
    """Parse @path.  Attributes:

    version, alignment, fields (ordered dict key -> GGUFValue),
    tensors (list of TensorInfo in file order), data_offset (file offset of
    the tensor data section).  The file stays mapped until close().
    """

    def __init__(self, path):
        self.path = path
        try:
            self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        except ValueError:
            raise GGUFError("%s: empty file" % (path,))
        size = self._mm.shape[0]
        view = memoryview(self._mm)
        try:
            self._parse(_Cursor(view, size), size)
        finally:
            view.release()

    def _parse(self, cur, size):
        path = self.path
        cur.need(4)
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError("%s: not a GGUF file (magic %r)" % (path, magic))
        cur.pos = 4
        self.version = cur.unpack("I", 4)
        if self.version not in (2, 3):
            raise GGUFError("%s: unsupported GGUF version %d"
                            % (path, self.version))
        n_tensors = cur.unpack("Q", 8)
        n_kv = cur.unpack("Q", 8)
        self.fields = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("I", 4)
            if key in self.fields:
                raise GGUFError("%s: duplicate key %r" % (path, key))
            self.fields[key] = self._read_value(cur, vtype)
        align = self.fields.get("general.alignment")
        self.alignment = DEFAULT_ALIGNMENT
        if align is not None:
            self.alignment = int(align.value)
            if self.alignment <= 0 or self.alignment % 8:
                raise GGUFError("%s: bad alignment %d" % (path, self.alignment))
        self.tensors = []
        self._by_name = {}
        for _ in range(n_tensors):
            ti = TensorInfo()
            ti.name = cur.string()
            nd = cur.unpack("I", 4)
            if nd > 8:
                raise GGUFError("%s: tensor %s has %d dims" % (path, ti.name, nd))
            ti.ne = tuple(int(cur.unpack("Q", 8)) for _ in range(nd))
            ti.type = cur.unpack("I", 4)
            ti.offset = cur.unpack("Q", 8)
            n = 1
            for d in ti.ne:
                n *= d
            ti.n_elements = n
            if ti.type in TYPE_INFO:
                bs, ts = TYPE_INFO[ti.type]
                if ti.ne and ti.ne[0] % bs:
                    raise GGUFError("%s: tensor %s row length %d is not a "
                                    "multiple of the %s block size %d"
                                    % (path, ti.name, ti.ne[0],
                                       type_name(ti.type), bs))
                ti.nbytes = n // bs * ts
            else:
                ti.nbytes = None
            if ti.name in self._by_name:
                raise GGUFError("%s: duplicate tensor %r" % (path, ti.name))
            self.tensors.append(ti)
            self._by_name[ti.name] = ti
        pos = cur.pos
        self.data_offset = pos + (self.alignment - pos % self.alignment) % self.alignment
        for ti in self.tensors:
            ti.file_offset = self.data_offset + ti.offset
            if ti.offset % self.alignment:
                raise GGUFError("%s: tensor %s offset %d not aligned"
                                % (path, ti.name, ti.offset))
            if ti.nbytes is not None and ti.file_offset + ti.nbytes > size:
                raise GGUFError("%s: tensor %s data runs past end of file"
                                % (path, ti.name))

    def _read_value(self, cur, vtype):
        if vtype in SCALAR_FORMATS:
            fmt, dt = SCALAR_FORMATS[vtype]
            n = np.dtype(dt).itemsize
            v = cur.unpack(fmt, n)
            if vtype == VType.BOOL:
                v = bool(v)
            return GGUFValue(vtype, v)
        if vtype == VType.STRING:
            return GGUFValue(vtype, cur.string())
        if vtype == VType.ARRAY:
            sub = cur.unpack("I", 4)
            n = cur.unpack("Q", 8)
            if sub in SCALAR_FORMATS:
                dt = np.dtype(SCALAR_FORMATS[sub][1])
                cur.need(n * dt.itemsize)
                arr = np.frombuffer(cur.buf, dtype=dt, count=n,
                                    offset=cur.pos).copy()
                cur.pos += n * dt.itemsize
                if sub == VType.BOOL:
                    arr = arr.astype(bool)
                return GGUFValue(vtype, arr, sub)
            if sub == VType.STRING:
                return GGUFValue(vtype, [cur.string() for _ in range(n)], sub)
            if sub == VType.ARRAY:
                return GGUFValue(vtype, [self._read_value(cur, VType.ARRAY)
                                         for _ in range(n)], sub)
            raise GGUFError("%s: bad array element type %d" % (self.path, sub))
        raise GGUFError("%s: bad value type %d" % (self.path, vtype))

    # ---------------------------------------------------------------- access
    def get(self, key, default=None):
        """Plain Python value of @key (arrays as numpy arrays / lists)."""
        f = self.fields.get(key)
        return default if f is None else f.value

    def __contains__(self, key):
        return key in self.fields

    @property
    def metadata(self):
        return {k: v.value for k, v in self.fields.items()}

    def tensor(self, name):
        """TensorInfo of @name, or KeyError."""
        return self._by_name[name]

    def has_tensor(self, name):
        return name in self._by_name

    def tensor_bytes(self, name_or_info):
        """Raw bytes of a tensor, as a uint8 view of the mapping."""
        ti = name_or_info if isinstance(name_or_info, TensorInfo) \
            else self._by_name[name_or_info]
        if ti.nbytes is None:
            raise GGUFError("no block layout known for %s (tensor %s)"
                            % (ti.type_name, ti.name))
        return self._mm[ti.file_offset:ti.file_offset + ti.nbytes]

    def tensor_data(self, name_or_info, dtype=np.float32):
        """Tensor @name dequantized to a numpy array of numpy shape
        (reversed ne) and @dtype."""
        from .quants import dequantize
        ti = name_or_info if isinstance(name_or_info, TensorInfo) \
            else self._by_name[name_or_info]
        flat = dequantize(self.tensor_bytes(ti), ti.type, ti.n_elements)
        return flat.reshape(ti.shape).astype(dtype, copy=False)

    def close(self):
        mm = getattr(self, "_mm", None)
        if mm is not None:
            del self._mm
            if getattr(mm, "_mmap", None) is not None:
                try:
                    mm._mmap.close()
                except BufferError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
