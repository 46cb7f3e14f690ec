"""A GGUF file reader: metadata parsed with `struct` in one pass, tensor data as zero-copy numpy
views of a read-only memory map.

Why not `gguf.GGUFReader`: it builds a numpy view for every part of every metadata value, so the
262,144-entry vocabulary of Gemma 3 (strings, scores, token types) takes ~40 s to open on the CPU
box, most of a first `jaxgen serve`. This reader opens the same file in well under a second.
The `gguf` package is still what dequantizes tensors (`gguf.quants`) and names tensor types.

A module of its own, importing no other jaxgen module: checkpoints read a GGUF's tensors and
config, the tokenizer its vocabulary, and the tokenizer need not import checkpoints (the arrow
between the two runs checkpoints -> tokenizer only).

Format (little-endian, versions 2 and 3): magic `GGUF`, u32 version, u64 tensor count, u64
metadata count; metadata as (string key, u32 value type, value), strings as u64 length + UTF-8,
arrays as (u32 element type, u64 count, elements); tensor infos as (string name, u32 n_dims,
u64 dims[n_dims] innermost first, u32 ggml type, u64 offset); the data section starts at the
next multiple of `general.alignment` (default 32), each tensor at its offset within it.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Metadata value types: code -> (struct format, size) for the fixed-size ones.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_UINT32 = 4

# ggml tensor types stored as plain numpy elements (all others are quantized blocks, as bytes).
_PLAIN_TENSORS = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2",
                  "I32": "<i4", "I64": "<i8"}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands (names the offset and the cause)."""


@dataclasses.dataclass(frozen=True)
class Field:
    """One metadata entry: `contents()` is its Python value (str, int, float, bool or a list)."""

    key: str
    value: Any
    value_type: int  # GGUF value type code; for arrays, ARRAY (9)
    element_type: int | None = None  # arrays: the elements' type code

    def contents(self) -> Any:
        return self.value


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor's description and its bytes. `shape` is in ggml order (innermost first, as the
    file stores it); `data` is a read-only numpy view of the file, in numpy order (outermost
    first): the element dtype for plain types, uint8 rows of blocks for quantized ones (what
    `gguf.quants.dequantize` takes)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    """`fields` (dict key -> Field, in file order) and `tensors` (list, in file order) of a GGUF
    file. The memory map stays open as long as any tensor's `data` is referenced."""

    def __init__(self, path: str | os.PathLike):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFFormatError(f"{size} bytes: too short for a GGUF header (24 bytes)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        self._size = size
        if buf[:4] != MAGIC:
            raise GGUFFormatError(f"magic {bytes(buf[:4])!r} at offset 0: expected {MAGIC!r}")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise GGUFFormatError(f"version {version}{hint}: supported versions are "
                                  f"{', '.join(map(str, VERSIONS))}")
        self.version = version
        tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        self.fields: dict[str, Field] = {}
        for _ in range(kv_count):
            key, pos = self._string(pos)
            (vtype,) = self._unpack("<I", pos)
            pos += 4
            if vtype == _ARRAY:
                (etype, count) = self._unpack("<IQ", pos)
                value, pos = self._array(etype, count, pos + 12, key)
                self.fields[key] = Field(key, value, vtype, etype)
            else:
                value, pos = self._value(vtype, pos, key)
                self.fields[key] = Field(key, value, vtype)
        infos = []
        for _ in range(tensor_count):
            name, pos = self._string(pos)
            (n_dims,) = self._unpack("<I", pos)
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name!r}: n_dims={n_dims} > 8")
            dims = self._unpack(f"<{n_dims}Q", pos + 4)
            pos += 4 + 8 * n_dims
            raw_type, offset = self._unpack("<IQ", pos)
            pos += 12
            infos.append((name, tuple(int(d) for d in dims), raw_type, offset))
        alignment = DEFAULT_ALIGNMENT
        align_field = self.fields.get("general.alignment")
        if align_field is not None:
            alignment = align_field.value
            if align_field.value_type != _UINT32 or alignment <= 0 or alignment & (alignment - 1):
                raise GGUFFormatError(f"general.alignment={alignment!r}: must be a power-of-two u32")
        self.alignment = alignment
        self.data_offset = -(-pos // alignment) * alignment
        self.tensors: list[Tensor] = []
        seen = set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise GGUFFormatError(f"tensor {name!r} appears twice")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFFormatError(f"tensor {name!r}: unknown ggml type {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elements = int(np.prod(dims, dtype=np.int64))
            if dims and dims[0] % block:
                raise GGUFFormatError(f"tensor {name!r}: innermost dim {dims[0]} is not a "
                                      f"multiple of {qtype.name}'s block of {block}")
            n_bytes = n_elements // block * type_size
            start = self.data_offset + offset
            if start + n_bytes > size:
                raise GGUFFormatError(f"tensor {name!r}: bytes {start}..{start + n_bytes} past "
                                      f"the end of the file ({size} bytes): truncated?")
            np_shape = tuple(reversed(dims))
            plain = _PLAIN_TENSORS.get(qtype.name)
            if plain is not None:
                data = np.frombuffer(buf, plain, n_elements, start).reshape(np_shape)
            else:
                row_bytes = dims[0] // block * type_size if dims else type_size
                data = np.frombuffer(buf, np.uint8, n_bytes, start).reshape(
                    np_shape[:-1] + (row_bytes,))
            self.tensors.append(Tensor(name, dims, qtype, start, n_bytes, data))

    # -- parsing ------------------------------------------------------------------------------

    def _unpack(self, fmt: str, pos: int):
        need = struct.calcsize(fmt)
        if pos + need > self._size:
            raise GGUFFormatError(f"offset {pos}: {need} bytes past the end of the file "
                                  f"({self._size} bytes): truncated?")
        return struct.unpack_from(fmt, self._map, pos)

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = self._unpack("<Q", pos)
        end = pos + 8 + n
        if end > self._size:
            raise GGUFFormatError(f"offset {pos}: a string of {n} bytes runs past the end of the "
                                  f"file ({self._size} bytes): truncated?")
        return self._decode(self._map[pos + 8:end], pos), end

    @staticmethod
    def _decode(raw: bytes, pos: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"offset {pos}: a string is not valid UTF-8 ({e})") from None

    def _value(self, vtype: int, pos: int, key: str):
        if vtype == _STRING:
            return self._string(pos)
        scalar = _SCALARS.get(vtype)
        if scalar is None:
            raise GGUFFormatError(f"metadata {key!r}: unknown value type {vtype} at offset {pos}")
        return self._unpack(scalar[0], pos)[0], pos + scalar[1]

    def _array(self, etype: int, count: int, pos: int, key: str):
        if etype == _STRING:
            buf, size, out = self._map, self._size, []
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                if pos + 8 > size:
                    raise GGUFFormatError(f"metadata {key!r}: array runs past the end of the file "
                                          f"({size} bytes): truncated?")
                (n,) = unpack(buf, pos)
                end = pos + 8 + n
                if end > size:
                    raise GGUFFormatError(f"metadata {key!r}: array runs past the end of the "
                                          f"file ({size} bytes): truncated?")
                out.append(self._decode(buf[pos + 8:end], pos))
                pos = end
            return out, pos
        if etype == _ARRAY:  # nested arrays: rare, parsed element by element
            out = []
            for _ in range(count):
                (inner_type, inner_count) = self._unpack("<IQ", pos)
                value, pos = self._array(inner_type, inner_count, pos + 12, key)
                out.append(value)
            return out, pos
        dtype = _NUMPY.get(etype)
        if dtype is None:
            raise GGUFFormatError(f"metadata {key!r}: unknown array element type {etype}")
        nbytes = count * np.dtype(dtype).itemsize
        if pos + nbytes > self._size:
            raise GGUFFormatError(f"metadata {key!r}: array runs past the end of the file "
                                  f"({self._size} bytes): truncated?")
        return np.frombuffer(self._map, dtype, count, pos).tolist(), pos + nbytes
