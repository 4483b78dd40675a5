"""The quantization table: tensor name -> exponent, written by the calibrator and read by everything after.

On disk it is a pickled plain dict in one of two formats, and a JSON twin for humans and other tools:

- ``exponents`` (espquant's): ``name -> int``, or a list of ints for per-channel weights, plus one reserved
  metadata entry;
- ``legacy`` (the original ESP-DL toolkit's): ``name -> scale`` as float64 ``2 ** exponent`` (numpy arrays of
  scales per channel), nothing else, so the original ``Evaluator`` and ``export_coefficient_to_cpp`` read it;
  the metadata then lives in the JSON twin only.

Both load. Pickles are read only through a restricted unpickler that admits plain containers, numbers,
strings and size-bounded numpy arrays, so a tampered file can neither run code nor allocate gigabytes. Every
value is checked when the table is read: exponents are small integers (or powers of two as scales), one
per channel at most ``MAX_CHANNELS``, and the metadata follows its schema; a checksum tells a table edited
after calibration apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espquant.errors import OptionError, QuantTableError
from espquant.files import write_files
from espquant.graph import BiasShift, WeightFactor, scale_initializers, shift_biases

__all__ = [
    "factors_metadata",
    "QuantTable",
    "graph_hash",
    "table_paths",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "TABLE_FORMATS",
    "MAX_CHANNELS",
    "restricted_loads",
]

FORMAT_VERSION = 1
METADATA_KEY = "__espquant_metadata__"
TABLE_FORMATS = ("exponents", "legacy")
# Any exponent beyond this is damage, not a choice (biases reach e_in + e_w, about -60 at the extreme); the
# stricter range ESP-DL uses for activations is checked where the model is lowered (pot.EXPONENT_LIMIT).
_PLAUSIBLE_EXPONENT = 64
MAX_CHANNELS = 1 << 16  # per-channel exponents: more than any layer an ESP32 runs has channels
_MAX_ARRAY_ELEMENTS = 1 << 20  # what a table's pickle may make numpy allocate, per array
_SHOWN = 4  # values quoted in a message

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
    ("numpy", "array"),  # the legacy format's arrays (_PortablePickler); its data is in the pickle itself
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowed list."""


def _check_size(shape: Any) -> None:
    """Refuse a shape larger than ``_MAX_ARRAY_ELEMENTS``: a few pickle bytes can ask for any shape, and numpy
    would allocate it before anything reads the values."""
    dims = [shape] if isinstance(shape, int) else list(shape) if isinstance(shape, (tuple, list)) else []
    count = 1
    for dim in dims:
        count *= int(dim)
    if count > _MAX_ARRAY_ELEMENTS:
        raise _ForbiddenGlobal(f"an array of {count} elements (a table holds at most {_MAX_ARRAY_ELEMENTS})")


class _BoundedArray(np.ndarray):
    """``numpy.ndarray`` as a pickle may call it, with the size checked first (it stays a type, as numpy's
    ``_reconstruct`` needs)."""

    def __new__(cls, shape: Any, *args: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[misc]
        _check_size(shape)
        return np.ndarray.__new__(np.ndarray, shape, *args, **kwargs)


def _bounded_reconstruct(reconstruct: Any) -> Any:
    def build(subtype: Any, shape: Any, *args: Any) -> Any:
        _check_size(shape)
        return reconstruct(subtype, shape, *args)

    return build


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global outside the short list above, so loading never executes foreign code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f"forbidden object {module}.{name}")
        if name == "ndarray":
            return _BoundedArray
        found = super().find_class(module, name)
        return _bounded_reconstruct(found) if name == "_reconstruct" else found


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


def _short(value: Any) -> str:
    """At most a few values of ``value`` for a message (a table may hold millions)."""
    if isinstance(value, np.ndarray):
        flat = value.reshape(-1)
        return f"array{list(value.shape)} {flat[:_SHOWN].tolist()}{' ...' if flat.size > _SHOWN else ''}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_short(v) for v in value[:_SHOWN])
        return f"[{inner}{', ...' if len(value) > _SHOWN else ''}] ({len(value)} values)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _exponent_of(value: Any, name: str, source: str) -> int:
    """One exponent from an int (espquant) or a power-of-two float scale (the legacy toolkit)."""
    if isinstance(value, bool):
        raise QuantTableError(f"{source}: the exponent of {name!r} is a bool ({value!r}).")
    if isinstance(value, (int, np.integer)):
        exponent = int(value)
    elif isinstance(value, (float, np.floating)):
        scale = float(value)
        if not (np.isfinite(scale) and scale > 0):
            raise QuantTableError(f"{source}: the scale of {name!r} is {scale!r}, not a positive number.")
        mantissa, power = np.frexp(scale)
        if mantissa != 0.5:
            raise QuantTableError(
                f"{source}: the scale of {name!r} is {scale!r}, not a power of two; ESP-DL numbers are "
                "int * 2^exponent. Calibrate with espquant, or round the scale to a power of two."
            )
        exponent = int(power) - 1
    else:
        raise QuantTableError(
            f"{source}: the exponent of {name!r} must be an int (or a power-of-two scale), not {_short(value)}."
        )
    if abs(exponent) > _PLAUSIBLE_EXPONENT:
        raise QuantTableError(
            f"{source}: the exponent of {name!r} is {exponent}; an ESP-DL exponent is a small integer (at most "
            f"{_PLAUSIBLE_EXPONENT} either way). Calibrate again."
        )
    return exponent


def _plain(value: Any, name: str, source: str) -> int | list[int]:
    """An exponent as a Python int, or a list of ints for per-channel tensors."""
    if isinstance(value, np.ndarray):
        if value.ndim > 1 or value.size > MAX_CHANNELS:
            raise QuantTableError(f"{source}: the exponents of {name!r} are {_short(value)}; expected one per channel.")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value or len(value) > MAX_CHANNELS:
            raise QuantTableError(f"{source}: the exponents of {name!r} are {_short(value)}; expected one per channel.")
        exponents = [_exponent_of(v, name, source) for v in value]
        return exponents[0] if len(exponents) == 1 else exponents  # the original stores one weight scale as [s]
    return _exponent_of(value, name, source)


def _list_of(kind: type) -> Any:
    return lambda v: isinstance(v, list) and all(isinstance(x, kind) for x in v)


_REQUANTIZE_FIELDS = {"node": str, "position": int, "tensor": str, "from_exponent": int, "to_exponent": int}
# The metadata espquant writes, key -> a test of its value. Unknown keys are kept (newer versions may add some).
_METADATA_SCHEMA: dict[str, Any] = {
    "format_version": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= FORMAT_VERSION,
    "bits": lambda v: v in (8, 16) and not isinstance(v, bool),
    "granularity": lambda v: v in ("per-tensor", "per-channel"),
    "method": lambda v: isinstance(v, str),
    "target_independent": lambda v: isinstance(v, bool),
    "graph_hash": lambda v: isinstance(v, str) and len(v) == 64,
    "samples": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "espquant_version": lambda v: isinstance(v, str),
    "float_tensors": _list_of(str),
    "int16_layers": _list_of(str),
    "int8_fallback": _list_of(str),
    "requantize": lambda v: (
        isinstance(v, list)
        and all(
            isinstance(r, dict)
            and set(r) == set(_REQUANTIZE_FIELDS)
            and all(isinstance(r[k], t) and not isinstance(r[k], bool) for k, t in _REQUANTIZE_FIELDS.items())
            for r in v
        )
    ),
    "checksum": lambda v: isinstance(v, str),
    "weight_factors": lambda v: isinstance(v, list) and all(_valid_factor(f) for f in v),
    "bias_shifts": lambda v: isinstance(v, list) and all(_valid_shift(s) for s in v),
}

MAX_FACTOR_VALUES = 1 << 24  # one factor's values: a weight's input channels by its output channels at most


def _valid_factor(entry: Any) -> bool:
    """A weight factor as the table stores it: ``{"tensor", "shape", "values"}``, positive finite values."""
    if (
        not isinstance(entry, dict)
        or set(entry) != {"tensor", "shape", "values"}
        or not isinstance(entry["tensor"], str)
    ):
        return False
    shape, values = entry["shape"], entry["values"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        return False
    if not isinstance(values, list) or len(values) > MAX_FACTOR_VALUES or len(values) != math.prod(shape):
        return False
    return all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in values)


def _valid_shift(entry: Any) -> bool:
    """A bias shift as the table stores it: ``{"layer", "values"}``, finite values, at most
    ``MAX_FACTOR_VALUES`` of them."""
    if not isinstance(entry, dict) or set(entry) != {"layer", "values"} or not isinstance(entry["layer"], str):
        return False
    values = entry["values"]
    if not isinstance(values, list) or not 0 < len(values) <= MAX_FACTOR_VALUES:
        return False
    return all(isinstance(x, float) and math.isfinite(x) for x in values)


def shifts_metadata(shifts: Iterable[BiasShift]) -> list[dict[str, Any]]:
    """Bias shifts as a table's ``bias_shifts`` metadata (JSON: floats round-trip exactly)."""
    return [{"layer": s.layer, "values": np.ravel(s.values).astype(float).tolist()} for s in shifts]


def factors_metadata(factors: Iterable[WeightFactor]) -> list[dict[str, Any]]:
    """Weight factors as a table's ``weight_factors`` metadata (JSON: floats round-trip exactly)."""
    return [
        {"tensor": f.tensor, "shape": list(np.shape(f.values)), "values": np.ravel(f.values).astype(float).tolist()}
        for f in factors
    ]


def _check_metadata(metadata: dict[str, Any], source: str) -> None:
    for key, valid in _METADATA_SCHEMA.items():
        if key in metadata and not valid(metadata[key]):
            hint = " (this espquant reads format 1: upgrade espquant)" if key == "format_version" else ""
            raise QuantTableError(f"{source}: metadata {key!r} = {_short(metadata[key])} is not valid{hint}.")


def _checksum(exponents: dict[str, int | list[int]], metadata: dict[str, Any]) -> str:
    """A digest of exponents and metadata: a table edited after calibration is told apart. Exponents are taken
    as reading gives them back (``_plain``: one channel's ``[e]`` is ``e``), so a per-channel table with a
    one-channel weight (a detector's last Conv) still matches its checksum when loaded."""
    plain = {name: e[0] if isinstance(e, list) and len(e) == 1 else e for name, e in exponents.items()}
    content = {"exponents": plain, "metadata": {k: v for k, v in metadata.items() if k != "checksum"}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


class _PortablePickler(pickle.Pickler):
    """Pickles numpy arrays as ``numpy.array(list, dtype)``: numpy 2 writes ``numpy._core`` paths that the
    original toolkit's numpy 1.21 cannot import, ``numpy.array`` every numpy has."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return np.array, (obj.tolist(), str(obj.dtype))
        return NotImplemented


def _legacy_pickle(stored: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    _PortablePickler(buffer, protocol=2).dump(stored)  # protocol 2: what CPython 3.7 and every numpy read
    return buffer.getvalue()


def _twin_metadata(source: Path, exponents: dict[str, int | list[int]]) -> dict[str, Any]:
    """The metadata of a legacy-format pickle from its JSON twin, when the twin describes these exponents
    (empty for the original toolkit's tables)."""
    twin = source.with_suffix(".json")
    if not twin.is_file() or twin == source:
        return {}
    try:
        document = json.loads(twin.read_text())
    except (ValueError, OSError):
        return {}
    if not isinstance(document, dict) or document.get("exponents") != exponents:
        return {}
    metadata = document.get("metadata")
    return dict(metadata) if isinstance(metadata, dict) else {}


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

    def save(
        self,
        path: str | os.PathLike[str],
        table_format: str = "exponents",
        legacy_scales: Mapping[str, Any] | None = None,
    ) -> tuple[Path, Path]:
        """Write the pickle and its ``.json`` twin, both or neither (atomically); returns both paths.

        ``table_format``: ``exponents`` (espquant's) or ``legacy`` (scales the original toolkit reads).
        ``legacy_scales``: the legacy pickle's contents when the caller knows the model (weights as arrays,
        biases at the legacy library's exponent: ``simulator.legacy.original_table_scales``); without it every
        exponent becomes its scale as it is."""
        if table_format not in TABLE_FORMATS:
            raise OptionError(f"table format {table_format!r}: use one of {', '.join(TABLE_FORMATS)}.")
        target, twin = table_paths(path)
        stored: dict[str, Any]
        exponents = self.exponents
        if table_format == "legacy":  # what the original Calibrator pickled: float64 2**e, arrays per channel
            stored = (
                dict(legacy_scales)
                if legacy_scales is not None
                else {
                    name: np.power(2.0, np.asarray(e, dtype=np.float64)) if isinstance(e, list) else float(2.0**e)
                    for name, e in self.exponents.items()
                }
            )
            # What reading the pickle back gives (legacy bias exponents included): the twin and the checksum
            # describe that, so the metadata is found again and the check holds.
            exponents = {name: _plain(value, name, str(target)) for name, value in stored.items()}
        metadata = {**self.metadata, "checksum": _checksum(exponents, self.metadata)}
        if table_format != "legacy":
            stored = {**self.exponents, METADATA_KEY: metadata}
        document = {"metadata": metadata, "exponents": exponents, "table_format": table_format}
        text = json.dumps(document, indent=1, sort_keys=True)
        payload = _legacy_pickle(stored) if table_format == "legacy" else pickle.dumps(stored, protocol=4)
        write_files({target: payload, twin: text.encode()})
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
            metadata = raw.pop(METADATA_KEY, None)
            if metadata is not None and not isinstance(metadata, dict):
                raise QuantTableError(f"{source}: the metadata entry is not a dict.")
        exponents = {str(name): _plain(value, str(name), str(source)) for name, value in raw.items()}
        if metadata is None:  # a legacy-format table: its metadata, if espquant wrote it, is in the twin
            metadata = _twin_metadata(source, exponents)
        _check_metadata(metadata, str(source))
        stored = metadata.get("checksum")
        if stored is not None and stored != _checksum(exponents, metadata):
            raise QuantTableError(
                f"{source}: the table was changed after calibration (its checksum no longer matches). If you "
                "edited it on purpose, delete the metadata entry 'checksum'; otherwise calibrate again."
            )
        return cls(exponents, metadata)

    def check_channels(self, name: str, channels: int, source: str = "the table") -> None:
        """Per-channel exponents of ``name`` must number its ``channels``."""
        value = self.exponents.get(name)
        if isinstance(value, list) and len(value) not in (1, channels):
            raise QuantTableError(
                f"{source} has {len(value)} exponents for {name!r}, which has {channels} channels. Calibrate again."
            )

    @property
    def weight_factors(self) -> list[WeightFactor]:
        """The factors calibration applied to the float weights (cross-layer equalization), in order."""
        return [
            WeightFactor(f["tensor"], np.asarray(f["values"], dtype=np.float64).reshape(f["shape"]))
            for f in self.metadata.get("weight_factors") or []
        ]

    @property
    def bias_shifts(self) -> list[BiasShift]:
        """What calibration took off the float biases (bias correction), applied after the weight factors."""
        stored = self.metadata.get("bias_shifts") or []
        return [BiasShift(s["layer"], np.asarray(s["values"], dtype=np.float64)) for s in stored]

    def model_for(
        self, model: onnx.ModelProto, needed: Iterable[str] = (), source: str = "the table"
    ) -> onnx.ModelProto:
        """The float model this table's integers are made from: ``model`` (checked by ``check_model``) with the
        table's weight factors and then its bias shifts applied; ``model`` itself when the table has neither.

        ``auto`` calibration equalizes per-tensor weights by rescaling channels (``optimizer/equalize.py``) and
        corrects the biases for the rounding of the weights (``calibration/bias_correction.py``). It records
        both here instead of writing another model, so the user's model stays the one to evaluate and export:
        every consumer rebuilds the same weights from it."""
        self.check_model(model, needed, source)
        changed = model
        for what, items, apply in (
            ("weight factors", self.weight_factors, scale_initializers),
            ("bias shifts", self.bias_shifts, shift_biases),
        ):
            try:
                changed = apply(changed, items) if items else changed
            except ValueError as error:
                raise QuantTableError(f"{source}: its {what} do not fit the model ({error}).") from error
        return changed

    def check_model(self, model: onnx.ModelProto, needed: Iterable[str], source: str = "the table") -> None:
        """Refuse a table made for another model, or one that misses tensors the model needs."""
        expected = self.metadata.get("graph_hash")
        if expected is not None and expected != graph_hash(model):
            calibrated = self.metadata.get("calibrated_model")
            hint = (
                f" Calibration changed the float weights ({', '.join(self.metadata.get('model_transforms') or [])})"
                f" and wrote the model this table is for as {calibrated!r}, next to the table: use that model."
                if isinstance(calibrated, str)
                else " Calibrate this model again."
            )
            raise QuantTableError(f"{source} was calibrated for another model (graph hash differs).{hint}")
        missing = [name for name in needed if name not in self.exponents]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise QuantTableError(
                f"{source} has no exponent for {len(missing)} tensor(s) the model needs: {shown}. "
                "Calibrate this model again."
            )
