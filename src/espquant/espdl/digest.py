"""A content digest of an ``.espdl`` file: what the chip would run, hashed, so a damaged file is told apart.

The embedded test values cover one input; a flipped byte in a weight or an attribute can leave that one output
unchanged. The exporter stores this digest in the file's metadata (``espquant.digest``); ``inspect`` and
``run --self-test`` recompute it from the decoded contents and compare. It hashes the decoded graph (nodes with
their attributes, constants with dims, data and exponents, declared values, inputs, outputs and test values),
not the FlatBuffers bytes, so it is independent of how the writer laid the buffer out.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from espquant.espdl.reader import EspdlFile, EspdlTensor, EspdlValue

__all__ = ["DIGEST_KEY", "content_digest", "verify_digest"]

DIGEST_KEY = "espquant.digest"
_ALGORITHM = "sha256"


def _feed(hasher: Any, *parts: Any) -> None:
    for part in parts:
        hasher.update(repr(part).encode("utf-8"))
        hasher.update(b"\x00")


def _tensor(hasher: Any, tensor: EspdlTensor) -> None:
    _feed(hasher, tensor.name, tensor.dtype, tuple(tensor.dims), tuple(tensor.exponents))
    hasher.update(np.ascontiguousarray(tensor.data).tobytes())


def _value(hasher: Any, value: EspdlValue) -> None:
    _feed(hasher, value.name, value.dtype, value.shape, tuple(value.exponents))


def _attribute(value: Any) -> Any:
    if isinstance(value, EspdlTensor):
        return ("tensor", value.name, value.dtype, tuple(value.dims), np.asarray(value.data).tobytes())
    return value


def content_digest(decoded: EspdlFile) -> str:
    """``sha256:<hex>`` of the decoded contents (the metadata itself is not hashed but for the target)."""
    hasher = hashlib.new(_ALGORITHM)
    _feed(hasher, decoded.container, decoded.graph_name, decoded.metadata.get("target"))
    for node in decoded.nodes:
        attributes = tuple(sorted((k, _attribute(v)) for k, v in node.attributes.items()))
        _feed(hasher, node.name, node.op_type, tuple(node.inputs), tuple(node.outputs), attributes)
    for group in (decoded.initializers, decoded.test_inputs, decoded.test_outputs):
        _feed(hasher, len(group))
        for name in sorted(group):
            _tensor(hasher, group[name])
    for values in (decoded.inputs, decoded.outputs, [decoded.values[k] for k in sorted(decoded.values)]):
        _feed(hasher, len(values))
        for value in values:
            _value(hasher, value)
    return f"{_ALGORITHM}:{hasher.hexdigest()}"


def verify_digest(decoded: EspdlFile) -> bool | None:
    """True when the stored digest matches the contents, False when it does not, None when none is stored."""
    stored = decoded.metadata.get(DIGEST_KEY)
    if stored is None:  # a damaged key (or value) must not make a signed file look unsigned
        stored = next((v for k, v in decoded.metadata.items() if _damaged_digest_entry(k, v)), None)
    if stored is None:
        return None
    return stored == content_digest(decoded)


def _damaged_digest_entry(key: str, value: Any) -> bool:
    """A metadata entry that was the digest before some bytes changed: its value still starts as a digest
    does, or its key differs from ``DIGEST_KEY`` in a few characters only."""
    if isinstance(value, str) and value.startswith(f"{_ALGORITHM}:"):
        return True
    return len(key) == len(DIGEST_KEY) and sum(a != b for a, b in zip(key, DIGEST_KEY)) <= len(DIGEST_KEY) // 3
