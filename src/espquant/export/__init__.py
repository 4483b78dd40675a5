"""Model files for the chip: reading (and, later, writing) ESP-DL's ``.espdl`` format."""

from espquant.export.espdl_reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue, read_espdl

__all__ = ["EspdlFile", "EspdlNode", "EspdlTensor", "EspdlValue", "read_espdl"]
