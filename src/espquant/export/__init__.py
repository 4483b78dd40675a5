"""Model files for the chip and for other tools: reading and writing ESP-DL's ``.espdl`` format, QDQ ONNX.

The writers are imported lazily: the simulator imports the reader, and the exporters import the simulator.
"""

from __future__ import annotations

from typing import Any

from espquant.export.espdl_reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue, read_espdl

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
    "encode_espdl": "espquant.export.espdl_writer",
    "write_espdl": "espquant.export.espdl_writer",
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
