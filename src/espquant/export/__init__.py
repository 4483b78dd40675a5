"""Model files for the chip and for other tools: ``.espdl`` for ESP-DL v3, QDQ ONNX, legacy C++.

The ``.espdl`` format itself lives in :mod:`espquant.espdl`; the exporters are imported lazily (they import
the simulator, which a plain ``import espquant.export`` should not load).
"""

from __future__ import annotations

from typing import Any

from espquant.espdl import EspdlFile, EspdlNode, EspdlTensor, EspdlValue, encode_espdl, read_espdl, write_espdl

__all__ = [
    "EspdlFile",
    "EspdlNode",
    "EspdlTensor",
    "EspdlValue",
    "read_espdl",
    "encode_espdl",
    "write_espdl",
    "build_espdl",
    "export_espdl",
    "export_qdq",
    "save_qdq",
    "qdq_agreement",
]

_LAZY = {
    "build_espdl": "espquant.export.espdl_export",
    "export_espdl": "espquant.export.espdl_export",
    "export_qdq": "espquant.export.qdq",
    "save_qdq": "espquant.export.qdq",
    "qdq_agreement": "espquant.export.qdq",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'espquant.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
