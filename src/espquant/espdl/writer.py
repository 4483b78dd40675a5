"""Encode ``.espdl`` model files (ESPDL_FORMAT.md): the inverse of :mod:`espquant.espdl.reader`.

The writer takes the same plain objects the reader returns (:class:`EspdlFile` with its nodes, tensors and
value declarations), so ``read_espdl(write_espdl(f))`` gives ``f`` back and every file the reader understands
can be re-written. It emits what ESP-PPQ's current writer emits (section 3): the ``EDL2`` container with a
16-byte header, one FlatBuffers ``Model`` without file identifier, an empty ``opset_import``, attributes
sorted by name, every tensor payload in ``raw_data`` as 16-byte ``AlignedBytes`` (zero-padded), value_info
with ``TypeInfo{tensor_type}``, and the payload padded to a multiple of 16 bytes. Tables are built through
the ``flatbuffers`` runtime with the schema's slot numbers (section 2), like the reader: no generated code.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import flatbuffers
import numpy as np

from espquant.errors import ModelError
from espquant.espdl.reader import (
    _DTYPE_NAMES,
    _DTYPES,
    _FLOAT,
    _FLOATS,
    _INT,
    _INTS,
    _STRING,
    _STRINGS,
    EspdlFile,
    EspdlNode,
    EspdlTensor,
    EspdlValue,
)
from espquant.files import atomic_write_bytes

__all__ = ["encode_espdl", "write_espdl"]

# The reader's tables, turned around: dtype name -> TensorDataType code, and the numpy dtype of each name.
_DATA_TYPES = {name: code for code, name in _DTYPE_NAMES.items()}
_NUMPY = {name: _DTYPES[code] for name, code in _DATA_TYPES.items()}
_HEADER = 16


class _Writer:
    """Bottom-up construction of the FlatBuffers tables (children before parents, as the format needs)."""

    def __init__(self) -> None:
        self.builder = flatbuffers.Builder(1 << 16)

    # --- vectors ------------------------------------------------------------------------------------------------
    def offsets(self, items: list[int]) -> int:
        b = self.builder
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    def strings(self, values: list[str]) -> int:
        return self.offsets([self.builder.CreateString(v) for v in values])

    def numbers(self, values: Any, dtype: str) -> int:
        return self.builder.CreateNumpyVector(np.asarray(values, dtype=dtype))

    def aligned_bytes(self, payload: bytes) -> int:
        """``[AlignedBytes]``: the bytes zero-padded to whole 16-byte structs, the vector 16-byte aligned."""
        count = -(-len(payload) // 16)
        padded = payload.ljust(16 * count, b"\0")
        b = self.builder
        b.StartVector(16, count, 16)
        b.head -= len(padded)
        b.Bytes[b.head : b.head + len(padded)] = padded
        return b.EndVector()

    # --- tables -------------------------------------------------------------------------------------------------
    def tensor(self, tensor: EspdlTensor) -> int:
        if tensor.dtype not in _DATA_TYPES:
            raise ModelError(f"tensor {tensor.name!r}: data type {tensor.dtype} cannot be written")
        data = np.ascontiguousarray(np.asarray(tensor.data).reshape(-1), dtype=_NUMPY[tensor.dtype])
        dims = self.numbers(list(tensor.dims), "<i8")
        name = self.builder.CreateString(tensor.name)
        doc = self.builder.CreateString(tensor.doc) if tensor.doc else None
        raw = self.aligned_bytes(data.tobytes()) if data.size else None
        exponents = self.numbers(tensor.exponents or [0], "<i8")
        b = self.builder
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(0, dims, 0)
        b.PrependInt32Slot(1, _DATA_TYPES[tensor.dtype], 0)
        b.PrependUOffsetTRelativeSlot(6, name, 0)
        if doc is not None:
            b.PrependUOffsetTRelativeSlot(7, doc, 0)
        if raw is not None:
            b.PrependUOffsetTRelativeSlot(8, raw, 0)
        b.PrependUOffsetTRelativeSlot(13, exponents, 0)
        return b.EndObject()

    def value(self, value: EspdlValue) -> int:
        b = self.builder
        name = b.CreateString(value.name)
        type_info = None
        if value.dtype in _DATA_TYPES:
            shape = None
            if value.shape is not None:
                dimensions = []
                for size in value.shape:
                    b.StartObject(3)  # DimensionValue
                    b.PrependInt8Slot(0, 1, 0)  # VALUE
                    b.PrependInt64Slot(1, int(size), 0)
                    dimension_value = b.EndObject()
                    b.StartObject(2)  # Dimension
                    b.PrependUOffsetTRelativeSlot(0, dimension_value, 0)
                    dimensions.append(b.EndObject())
                dims = self.offsets(dimensions)
                b.StartObject(1)  # TensorShape
                b.PrependUOffsetTRelativeSlot(0, dims, 0)
                shape = b.EndObject()
            b.StartObject(2)  # TensorTypeAndShape
            b.PrependInt32Slot(0, _DATA_TYPES[value.dtype], 0)
            if shape is not None:
                b.PrependUOffsetTRelativeSlot(1, shape, 0)
            tensor_type = b.EndObject()
            b.StartObject(3)  # TypeInfo
            b.PrependUint8Slot(0, 1, 0)  # union tag: tensor_type
            b.PrependUOffsetTRelativeSlot(1, tensor_type, 0)
            type_info = b.EndObject()
        exponents = self.numbers(value.exponents or [0], "<i8")
        b.StartObject(4)
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        if type_info is not None:
            b.PrependUOffsetTRelativeSlot(1, type_info, 0)
        b.PrependUOffsetTRelativeSlot(3, exponents, 0)
        return b.EndObject()

    def attribute(self, node: str, name: str, value: Any) -> int:
        b = self.builder
        key = b.CreateString(name)
        payload: tuple[int, int] | None = None  # (slot, offset)
        if isinstance(value, (bool, int, np.integer)):
            kind = _INT
        elif isinstance(value, (float, np.floating)):
            kind = _FLOAT
        elif isinstance(value, str):
            kind, payload = _STRING, (6, b.CreateByteVector(value.encode("utf-8")))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
            kind, payload = _INTS, (11, self.numbers(list(value), "<i8"))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (float, np.floating)) for v in value):
            kind, payload = _FLOATS, (10, self.numbers(list(value), "<f4"))
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            kind, payload = _STRINGS, (12, self.strings(list(value)))
        else:
            raise ModelError(f"node {node!r}: attribute {name!r} has a value of type {type(value).__name__}")
        b.StartObject(16)
        b.PrependUOffsetTRelativeSlot(0, key, 0)
        b.PrependInt32Slot(3, kind, 0)
        if kind == _FLOAT:  # AttributeF, an inline struct: built right before its slot
            b.Prep(4, 0)
            b.PrependFloat32(float(value))
            b.PrependStructSlot(4, b.Offset(), 0)
        elif kind == _INT:  # AttributeI
            b.Prep(8, 0)
            b.PrependInt64(int(value))
            b.PrependStructSlot(5, b.Offset(), 0)
        elif payload is not None:
            b.PrependUOffsetTRelativeSlot(payload[0], payload[1], 0)
        return b.EndObject()

    def node(self, node: EspdlNode) -> int:
        b = self.builder
        inputs = self.strings(node.inputs)
        outputs = self.strings(node.outputs)
        name = b.CreateString(node.name)
        op_type = b.CreateString(node.op_type)
        attributes = self.offsets([self.attribute(node.name, k, node.attributes[k]) for k in sorted(node.attributes)])
        b.StartObject(7)
        b.PrependUOffsetTRelativeSlot(0, inputs, 0)
        b.PrependUOffsetTRelativeSlot(1, outputs, 0)
        b.PrependUOffsetTRelativeSlot(2, name, 0)
        b.PrependUOffsetTRelativeSlot(3, op_type, 0)
        b.PrependUOffsetTRelativeSlot(5, attributes, 0)
        return b.EndObject()

    def entry(self, key: str, value: str) -> int:
        b = self.builder
        k, v = b.CreateString(key), b.CreateString(value)
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, k, 0)
        b.PrependUOffsetTRelativeSlot(1, v, 0)
        return b.EndObject()

    def model(self, model: EspdlFile) -> bytes:
        b = self.builder
        nodes = self.offsets([self.node(n) for n in model.nodes])
        name = b.CreateString(model.graph_name)
        initializers = self.offsets([self.tensor(t) for t in model.initializers.values()])
        inputs = self.offsets([self.value(v) for v in model.inputs])
        outputs = self.offsets([self.value(v) for v in model.outputs])
        values = self.offsets([self.value(v) for v in model.values.values()])
        test_inputs = self.offsets([self.tensor(t) for t in model.test_inputs.values()])
        test_outputs = self.offsets([self.tensor(t) for t in model.test_outputs.values()])
        b.StartObject(10)
        b.PrependUOffsetTRelativeSlot(0, nodes, 0)
        b.PrependUOffsetTRelativeSlot(1, name, 0)
        b.PrependUOffsetTRelativeSlot(2, initializers, 0)
        b.PrependUOffsetTRelativeSlot(4, inputs, 0)
        b.PrependUOffsetTRelativeSlot(5, outputs, 0)
        b.PrependUOffsetTRelativeSlot(6, values, 0)
        if model.test_inputs:
            b.PrependUOffsetTRelativeSlot(8, test_inputs, 0)
            b.PrependUOffsetTRelativeSlot(9, test_outputs, 0)
        graph = b.EndObject()
        opset_import = self.offsets([])
        metadata = self.offsets([self.entry(k, v) for k, v in model.metadata.items()]) if model.metadata else None
        b.StartObject(10)
        b.PrependInt32Slot(0, model.ir_version, 0)
        b.PrependUOffsetTRelativeSlot(1, opset_import, 0)
        b.PrependUOffsetTRelativeSlot(7, graph, 0)
        if metadata is not None:
            b.PrependUOffsetTRelativeSlot(8, metadata, 0)
        b.Finish(b.EndObject())
        return bytes(b.Output())


def encode_espdl(model: EspdlFile) -> bytes:
    """The bytes of an ``EDL2`` file holding ``model`` (plain, not encrypted)."""
    payload = _Writer().model(model)
    payload = payload.ljust(-(-len(payload) // 16) * 16, b"\0")
    return b"EDL2" + struct.pack("<II", 0, len(payload)) + b"\0" * (_HEADER - 12) + payload


def write_espdl(model: EspdlFile, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` atomically (temporary file, then rename)."""
    atomic_write_bytes(path, encode_espdl(model))
