"""The ``.espdl`` file format of ESP-DL v3, alone: decoded objects, the reader, the writer, the weight byte
orders per target (ESPDL_FORMAT.md). It imports nothing of the simulator or the exporters, which both build
on it."""

from espquant.espdl.digest import DIGEST_KEY, content_digest, verify_digest
from espquant.espdl.reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue, decode_espdl, read_espdl
from espquant.espdl.writer import encode_espdl, write_espdl

__all__ = [
    "EspdlFile",
    "EspdlNode",
    "EspdlTensor",
    "EspdlValue",
    "read_espdl",
    "decode_espdl",
    "encode_espdl",
    "write_espdl",
    "DIGEST_KEY",
    "content_digest",
    "verify_digest",
]
