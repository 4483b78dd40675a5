"""Decode ESP-DL ``.espdl`` model files (ESPDL_FORMAT.md) into plain Python objects.

Both containers are read: ``EDL2`` (16-byte header, ``raw_data`` as 16-byte ``AlignedBytes``) and the
older ``EDL1`` (12-byte header, ``raw_data`` as plain bytes, scalars in the ONNX typed fields). The
FlatBuffers tables are read through the ``flatbuffers`` runtime with the slot numbers of the schema
(section 2): no generated code, so the reader stays one small module.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flatbuffers import number_types as N
from flatbuffers.table import Table

from espquant.errors import ModelError

__all__ = ["EspdlTensor", "EspdlValue", "EspdlNode", "EspdlFile", "MAX_TENSOR_ELEMENTS", "decode_espdl", "read_espdl"]

# The largest tensor any ESP32 can hold: 32 MB of PSRAM (ESP32-P4) as int8 elements.
MAX_TENSOR_ELEMENTS = 32 * 1024 * 1024

# TensorDataType (same numbers as ONNX) -> numpy dtype.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("u1"),
    3: np.dtype("i1"),
    4: np.dtype("<u2"),
    5: np.dtype("<i2"),
    6: np.dtype("<i4"),
    7: np.dtype("<i8"),
    9: np.dtype("?"),
    10: np.dtype("<f2"),
    11: np.dtype("<f8"),
    12: np.dtype("<u4"),
    13: np.dtype("<u8"),
}
_DTYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 9: "BOOL",
                10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64"}  # fmt: skip
# AttributeType
_FLOAT, _INT, _STRING, _TENSOR, _FLOATS, _INTS, _STRINGS = 1, 2, 3, 4, 6, 7, 8


class _Reader:
    """Slot-based access to one FlatBuffers table (slot i lives at vtable offset 4 + 2 i)."""

    def __init__(self, buf: bytes | bytearray, pos: int) -> None:
        self.table = Table(buf, pos)

    def _offset(self, slot: int) -> int:
        return self.table.Offset(4 + 2 * slot)

    def scalar(self, slot: int, kind: Any, default: Any = 0) -> Any:
        offset = self._offset(slot)
        return self.table.Get(kind, offset + self.table.Pos) if offset else default

    def string(self, slot: int) -> str:
        offset = self._offset(slot)
        return self.table.String(offset + self.table.Pos).decode("utf-8") if offset else ""

    def table_at(self, slot: int) -> _Reader | None:
        offset = self._offset(slot)
        if not offset:
            return None
        return _Reader(self.table.Bytes, self.table.Indirect(offset + self.table.Pos))

    def struct_pos(self, slot: int) -> int | None:
        """Position of an inline struct field (Attribute.f / Attribute.i)."""
        offset = self._offset(slot)
        return offset + self.table.Pos if offset else None

    def length(self, slot: int) -> int:
        offset = self._offset(slot)
        return self.table.VectorLen(offset) if offset else 0

    def tables(self, slot: int) -> list[_Reader]:
        offset = self._offset(slot)
        if not offset:
            return []
        start = self.table.Vector(offset)
        return [
            _Reader(self.table.Bytes, self.table.Indirect(start + 4 * i)) for i in range(self.table.VectorLen(offset))
        ]

    def strings(self, slot: int) -> list[str]:
        offset = self._offset(slot)
        if not offset:
            return []
        start = self.table.Vector(offset)
        return [self.table.String(start + 4 * i).decode("utf-8") for i in range(self.table.VectorLen(offset))]

    def array(self, slot: int, dtype: np.dtype, element_size: int | None = None) -> np.ndarray:
        """A vector of scalars (or of fixed-size structs, as raw bytes) as a numpy array (copied)."""
        offset = self._offset(slot)
        if not offset:
            return np.zeros(0, dtype)
        start = self.table.Vector(offset)
        count = self.table.VectorLen(offset) * (element_size or 1)
        nbytes = count if element_size else count * dtype.itemsize
        return np.frombuffer(bytes(self.table.Bytes[start : start + nbytes]), dtype=dtype).copy()


@dataclass
class EspdlTensor:
    """A constant or test value: integers (or floats) in the file's layout, with exponent(s)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    data: np.ndarray
    exponents: list[int]
    doc: str = ""

    @property
    def exponent(self) -> int:
        return self.exponents[0] if self.exponents else 0

    @property
    def per_channel(self) -> bool:
        return len(self.exponents) > 1


@dataclass
class EspdlValue:
    """A variable's declaration (value_info): dtype, shape in the file's layout, exponent."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None
    exponents: list[int]

    @property
    def exponent(self) -> int:
        return self.exponents[0] if self.exponents else 0


@dataclass
class EspdlNode:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def quant_type(self) -> str:
        return str(self.attributes.get("quant_type", ""))


@dataclass
class EspdlFile:
    """Everything an ``.espdl`` file holds, decoded."""

    path: str
    container: str  # "EDL1" or "EDL2"
    ir_version: int
    metadata: dict[str, str]
    graph_name: str
    nodes: list[EspdlNode]
    initializers: dict[str, EspdlTensor]
    inputs: list[EspdlValue]
    outputs: list[EspdlValue]
    values: dict[str, EspdlValue]
    test_inputs: dict[str, EspdlTensor]
    test_outputs: dict[str, EspdlTensor]

    @property
    def target(self) -> str | None:
        """The target chip named in the file's metadata, if any."""
        return self.metadata.get("target")


def _element_count(dims: tuple[int, ...], what: str) -> int:
    """The element count of ``dims``, refused when a dimension is negative or the tensor is larger than any
    ESP32 can hold (a damaged size must not make the reader or the simulator allocate gigabytes)."""
    count = 1
    for dim in dims:
        if dim < 0:
            raise ModelError(f"{what} has a negative dimension in {list(dims)}; the file is damaged")
        count *= dim
    if count > MAX_TENSOR_ELEMENTS:
        raise ModelError(
            f"{what} has {count} elements (dims {list(dims)[:8]}); no ESP32 holds more than {MAX_TENSOR_ELEMENTS}: "
            "the file is damaged"
        )
    return count


def _tensor(reader: _Reader, container: str) -> EspdlTensor:
    name = reader.string(6)
    data_type = reader.scalar(1, N.Int32Flags)
    dims = tuple(int(d) for d in reader.array(0, np.dtype("<i8")))
    dtype = _DTYPES.get(data_type)
    if dtype is None:
        raise ModelError(f"tensor {name!r}: unsupported data type {data_type}")
    count = _element_count(dims, f"tensor {name!r}")
    if reader.length(8):
        raw = reader.array(8, np.dtype("u1"), element_size=16 if container == "EDL2" else 1)
        data = np.frombuffer(raw.tobytes()[: count * dtype.itemsize], dtype=dtype)
    elif reader.length(2):
        data = reader.array(2, np.dtype("<f4")).astype(dtype)
    elif reader.length(3):
        data = reader.array(3, np.dtype("<i4")).astype(dtype)
    elif reader.length(5):
        data = reader.array(5, np.dtype("<i8")).astype(dtype)
    elif reader.length(11):
        data = reader.array(11, np.dtype("<f8")).astype(dtype)
    else:
        data = np.zeros(0, dtype)
    if data.size != count:
        raise ModelError(f"tensor {name!r}: {data.size} values stored for dims {list(dims)}; the file is damaged")
    exponents = [int(e) for e in reader.array(13, np.dtype("<i8"))]
    return EspdlTensor(
        name, _DTYPE_NAMES[data_type], dims, data.reshape(dims) if dims else data, exponents, reader.string(7)
    )


def _value(reader: _Reader) -> EspdlValue:
    name = reader.string(0)
    exponents = [int(e) for e in reader.array(3, np.dtype("<i8"))]
    dtype, shape = "UNDEFINED", None
    type_info = reader.table_at(1)
    if type_info is not None and type_info.scalar(0, N.Uint8Flags) == 1:
        tensor_type = type_info.table_at(1)
        if tensor_type is not None:
            dtype = _DTYPE_NAMES.get(tensor_type.scalar(0, N.Int32Flags), "UNDEFINED")
            shape_table = tensor_type.table_at(1)
            if shape_table is not None:
                dims = []
                for dimension in shape_table.tables(0):
                    value = dimension.table_at(0)
                    dims.append(int(value.scalar(1, N.Int64Flags)) if value is not None else -1)
                shape = tuple(dims)
                _element_count(tuple(d for d in shape if d != -1), f"value {name!r}")
    return EspdlValue(name, dtype, shape, exponents)


def _attribute(reader: _Reader, container: str) -> tuple[str, Any]:
    name = reader.string(0)
    kind = reader.scalar(3, N.Int32Flags)
    if kind == _FLOAT:
        pos = reader.struct_pos(4)
        return name, float(reader.table.Get(N.Float32Flags, pos)) if pos is not None else 0.0
    if kind == _INT:
        pos = reader.struct_pos(5)
        return name, int(reader.table.Get(N.Int64Flags, pos)) if pos is not None else 0
    if kind == _STRING:
        return name, reader.array(6, np.dtype("u1")).tobytes().decode("utf-8")
    if kind == _TENSOR:
        inner = reader.table_at(7)
        return name, _tensor(inner, container) if inner is not None else None
    if kind == _FLOATS:
        return name, [float(v) for v in reader.array(10, np.dtype("<f4"))]
    if kind == _INTS:
        return name, [int(v) for v in reader.array(11, np.dtype("<i8"))]
    if kind == _STRINGS:
        return name, reader.strings(12)
    return name, None


def read_espdl(path: str | os.PathLike[str]) -> EspdlFile:
    """Decode the ``.espdl`` file at ``path``.

    Raises:
        ModelError: a missing file, an unknown container, an encrypted payload, or damaged contents.
    """
    source = Path(path)
    if not source.is_file():
        raise ModelError(f"{source}: no such file. Give the path of an .espdl model.")
    return decode_espdl(source.read_bytes(), str(source))


def decode_espdl(data: bytes, source: str = "<bytes>") -> EspdlFile:
    """Decode the bytes of an ``.espdl`` file; ``source`` names it in errors.

    Every size read from the file is checked against the file itself before anything is allocated, and every
    decoding failure is a :class:`ModelError` naming the file: a damaged file never raises anything else."""
    magic = data[:4]
    if magic not in (b"EDL1", b"EDL2"):
        raise ModelError(
            f"{source}: not an ESP-DL model (magic {magic!r}; expected EDL1 or EDL2). Packed PDL files hold "
            "several models: unpack them first."
        )
    if len(data) < 16:
        raise ModelError(f"{source}: the file is truncated (only {len(data)} bytes).")
    container = magic.decode()
    mode, size = struct.unpack_from("<II", data, 4)
    if mode != 0:
        raise ModelError(f"{source}: the model is encrypted (AES-128-CTR); decrypt it with its key first.")
    header = 16 if container == "EDL2" else 12
    payload = data[header : header + size]
    if len(payload) < size or size < 8:
        raise ModelError(f"{source}: the file is truncated ({len(payload)} of {size} payload bytes).")
    try:
        return _decode_payload(payload, container, source)
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from exc
    except (struct.error, IndexError, ValueError, UnicodeDecodeError, TypeError, KeyError, OverflowError) as exc:
        raise ModelError(f"{source}: the FlatBuffers payload is damaged ({type(exc).__name__}: {exc}).") from exc
    except RecursionError as exc:
        raise ModelError(f"{source}: the FlatBuffers payload is damaged (nested too deeply).") from exc


def _decode_payload(payload: bytes, container: str, source: str) -> EspdlFile:
    root = _Reader(payload, struct.unpack_from("<I", payload, 0)[0])
    graph = root.table_at(7)
    if graph is None:
        raise ModelError("the model has no graph.")
    metadata = {entry.string(0): entry.string(1) for entry in root.tables(8)}
    nodes = []
    for node in graph.tables(0):
        attributes = dict(_attribute(a, container) for a in node.tables(5))
        nodes.append(EspdlNode(node.string(2), node.string(3), node.strings(0), node.strings(1), attributes))
    return EspdlFile(
        path=source,
        container=container,
        ir_version=int(root.scalar(0, N.Int32Flags)),
        metadata=metadata,
        graph_name=graph.string(1),
        nodes=nodes,
        initializers={t.name: t for t in (_tensor(r, container) for r in graph.tables(2))},
        inputs=[_value(r) for r in graph.tables(4)],
        outputs=[_value(r) for r in graph.tables(5)],
        values={v.name: v for v in (_value(r) for r in graph.tables(6))},
        test_inputs={t.name: t for t in (_tensor(r, container) for r in graph.tables(8))},
        test_outputs={t.name: t for t in (_tensor(r, container) for r in graph.tables(9))},
    )
