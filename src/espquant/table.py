"""The quantization table: tensor name -> exponent, written by the calibrator and read by everything after.

On disk it is what the legacy ESP-DL toolkit wrote, a pickled plain dict (``name -> int``, or a list of
ints for per-channel weights), plus one reserved metadata entry, and a JSON twin for humans and other
tools. Pickles are read only through a restricted unpickler that admits plain containers, numbers,
strings and numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espquant.errors import OptionError, QuantTableError
from espquant.files import write_files

__all__ = ["QuantTable", "graph_hash", "table_paths", "FORMAT_VERSION", "METADATA_KEY", "restricted_loads"]

FORMAT_VERSION = 1
METADATA_KEY = "__espquant_metadata__"

# Globals a pickled table may reference: numpy's array and scalar reconstruction, nothing else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowed list."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global outside the short list above, so loading never executes foreign code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"forbidden object {module}.{name}")


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` admitting only plain containers, numbers, strings and numpy arrays."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except _ForbiddenGlobal as exc:
        raise QuantTableError(
            f"{source}: refused to load the pickle ({exc}); a quantization table holds only names and numbers. "
            "Regenerate the table with `espquant calibrate`."
        ) from exc
    except Exception as exc:  # truncated or not a pickle at all
        raise QuantTableError(f"{source}: not a readable quantization table ({type(exc).__name__}: {exc}).") from exc


def table_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The pickle a table is saved to and its JSON twin beside it (``t.pickle`` -> ``t.json``).

    The path names the pickle; a ``.json`` path would make the twin the pickle itself, so it is refused.
    """
    target = Path(path)
    if target.suffix.lower() == ".json":
        raise OptionError(
            f"{target}: name the table's pickle (for example {target.with_suffix('.pickle').name}); its JSON twin "
            f"{target.name} is written beside it."
        )
    return target, target.with_suffix(".json")


def graph_hash(model: onnx.ModelProto) -> str:
    """A digest of the graph's structure and weights: a table made for another model is told apart."""
    digest = hashlib.sha256()
    graph = model.graph
    for node in graph.node:
        digest.update(node.SerializeToString(deterministic=True))
    for info in [*graph.input, *graph.output]:
        digest.update(f"{info.name}:{info.type.tensor_type.elem_type};".encode())
    for tensor in graph.initializer:
        digest.update(f"{tensor.name}:{tensor.data_type}:{list(tensor.dims)};".encode())
        digest.update(onnx.numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()


def _plain(value: Any, name: str, source: str) -> int | list[int]:
    """An exponent as a Python int, or a list of ints for per-channel tensors."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            raise QuantTableError(
                f"{source}: the exponent of {name!r} must be an int or a list of ints, not {value!r}."
            )
        return [int(v) for v in value]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise QuantTableError(f"{source}: the exponent of {name!r} must be an int or a list of ints, not {value!r}.")


@dataclass
class QuantTable:
    """Exponents per tensor plus metadata (format version, bits, granularity, method, graph hash)."""

    exponents: dict[str, int | list[int]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int | None:
        return self.metadata.get("bits")

    def __getitem__(self, name: str) -> int | list[int]:
        return self.exponents[name]

    def __contains__(self, name: object) -> bool:
        return name in self.exponents

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write the pickle and its ``.json`` twin, both or neither (atomically); returns both paths."""
        target, twin = table_paths(path)
        legacy = {name: exponent for name, exponent in self.exponents.items()}
        legacy[METADATA_KEY] = dict(self.metadata)
        text = json.dumps({"metadata": self.metadata, "exponents": self.exponents}, indent=1, sort_keys=True)
        write_files({target: pickle.dumps(legacy, protocol=4), twin: text.encode()})
        return target, twin

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> QuantTable:
        """Read a table written by espquant or by the legacy toolkit (a plain dict), safely."""
        source = Path(path)
        if not source.is_file():
            raise QuantTableError(f"{source}: no such quantization table. Create it with `espquant calibrate`.")
        if source.suffix == ".json":
            try:
                data = json.loads(source.read_text())
                raw, metadata = dict(data["exponents"]), dict(data.get("metadata", {}))
            except (ValueError, KeyError, TypeError) as exc:
                raise QuantTableError(f"{source}: not a quantization table in JSON ({exc}).") from exc
        else:
            raw = restricted_loads(source.read_bytes(), str(source))
            if not isinstance(raw, dict):
                raise QuantTableError(
                    f"{source}: a quantization table is a dict, this pickle holds a {type(raw).__name__}."
                )
            raw = dict(raw)
            metadata = raw.pop(METADATA_KEY, {})
            if not isinstance(metadata, dict):
                raise QuantTableError(f"{source}: the metadata entry is not a dict.")
        exponents = {str(name): _plain(value, str(name), str(source)) for name, value in raw.items()}
        return cls(exponents, metadata)

    def check_model(self, model: onnx.ModelProto, needed: Iterable[str], source: str = "the table") -> None:
        """Refuse a table made for another model, or one that misses tensors the model needs."""
        expected = self.metadata.get("graph_hash")
        if expected is not None and expected != graph_hash(model):
            raise QuantTableError(
                f"{source} was calibrated for another model (graph hash differs). Calibrate this model again."
            )
        missing = [name for name in needed if name not in self.exponents]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise QuantTableError(
                f"{source} has no exponent for {len(missing)} tensor(s) the model needs: {shown}. "
                "Calibrate this model again."
            )
