"""``export_coefficient_to_cpp``: check, plan, render and write the three C++ files, all or nothing."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx

from espquant._version import __version__
from espquant.errors import ModelError, OptionError, OutputError, QuantTableError, TargetError, UnsupportedModelError
from espquant.export.cpp.layers import _identifier
from espquant.export.cpp.planner import plan_legacy_layers
from espquant.export.cpp.render import _print_summary, _render_cpp, _render_hpp, _render_model
from espquant.export.cpp.versions import DEFAULT_LIBRARY_VERSION
from espquant.export.cpp.versions import library_version as library_version_entry
from espquant.files import write_files
from espquant.quant.profiles import LEGACY_TARGETS
from espquant.simulator.legacy import (
    legacy_profile,
)
from espquant.simulator.lowering import build_quantized_model
from espquant.table import QuantTable

logger = logging.getLogger("espquant.export.cpp")


def _table_bits(table: QuantTable, bits: int | None) -> int:
    recorded = table.metadata.get("bits")
    if bits is not None and bits not in (8, 16):
        raise OptionError(f"bits={bits!r}: use 8 or 16.")
    if recorded is not None and bits is not None and recorded != bits:
        raise QuantTableError(f"the table was calibrated for int{recorded}, not int{bits}.")
    value = recorded if recorded is not None else bits
    if value not in (8, 16):
        raise QuantTableError(
            "the table does not record its bit width (a table of the legacy toolkit?); pass bits=8 or bits=16."
        )
    return int(value)


def _output_folder(output_path: str | os.PathLike[str]) -> Path:
    folder = Path(output_path)
    if folder.exists() and not folder.is_dir():
        raise ModelError(f"{folder}: is a file, not a folder; pass the folder the C++ files should go to.")
    return folder


def legacy_target(target_chip: str) -> str:
    """The chip's name as the legacy library knows it (``ESP32-S3`` -> ``esp32s3``), or a TargetError."""
    key = str(target_chip).strip().lower().replace("-", "").replace("_", "")
    if key not in LEGACY_TARGETS:
        raise TargetError(
            f"target chip {target_chip!r} is not served by the legacy ESP-DL library; valid targets: "
            f"{', '.join(LEGACY_TARGETS)}."
        )
    return key


def cpp_file_paths(folder: str | os.PathLike[str], file_name: str) -> tuple[Path, Path, Path]:
    """The three files :func:`export_coefficient_to_cpp` writes: ``.cpp``, ``.hpp`` and ``_model.hpp``."""
    base = Path(folder)
    return base / f"{file_name}.cpp", base / f"{file_name}.hpp", base / f"{file_name}_model.hpp"


def _probe_writable(folder: Path) -> None:
    """Create the folder if needed and prove a file can be created in it, before the first real write."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".espquant-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write there ({exc.strerror or exc}); choose a writable folder.") from exc


def export_coefficient_to_cpp(
    model_proto: onnx.ModelProto,
    table: QuantTable | str | os.PathLike[str],
    target_chip: str,
    output_path: str | os.PathLike[str],
    file_name: str,
    print_model_info: bool = False,
    *,
    bits: int | None = None,
    library_version: str = DEFAULT_LIBRARY_VERSION,
) -> list[Path]:
    """Write ``<file_name>.cpp``, ``<file_name>.hpp`` and ``<file_name>_model.hpp`` for the legacy ESP-DL library.

    The legacy toolkit's ``Calibrator.export_coefficient_to_cpp``, plus a generated model class. Everything is
    checked and rendered before the first file is written, and the three files are written all or nothing
    (:func:`espquant.files.write_files`).

    The C++ is written for one release of the legacy library (``library_version``; class names and what each
    release can build: ``espquant.export.cpp.versions``). The default is ``"1.1"``: the legacy quantization
    toolkit this function re-implements shipped inside esp-dl at commit ``a95b00ea`` (November 2021, released as
    tag ``v1.1.0``), so the headers its users build against are v1.1's, which spell the activations ``ReLU`` /
    ``LeakyReLU`` / ``PReLU``. v1.1 cannot build Sub2D, Mul2D, LeakyReLU and PReLU (its headers do not compile)
    and builds ReLU / Flatten in place; ``"2.0"`` (``Relu`` / ``LeakyRelu`` / ``PRelu``, December 2021) builds
    every exported op.

    Args:
        model_proto: the (optimized) float model the table was calibrated on.
        table: its quantization table, or the path of one (pickle or JSON).
        target_chip: ``esp32``, ``esp32s2``, ``esp32c3`` or ``esp32s3`` (the filter byte order differs).
        output_path: the folder to write to (created when missing).
        file_name: base name of the files; also the C++ namespace (other characters become ``_``).
        print_model_info: print a per-layer summary table.
        bits: 8 or 16, for tables that do not record their bit width (legacy toolkit tables).
        library_version: ``"1.1"`` (default) or ``"2.0"``: the legacy ESP-DL release the C++ must compile against.

    Returns:
        The paths of the ``.cpp``, ``.hpp`` and ``_model.hpp`` files.

    Raises:
        TargetError: a target the legacy library does not serve.
        OptionError: a file name that is empty or contains a path separator; an unknown library version.
        QuantTableError: a table of another model or bit width.
        UnsupportedModelError: nodes the legacy library (that version) cannot express, all listed with the reason.
        ModelError: an output path that is a file, not a folder.
        OutputError: an output folder that cannot be written to.
    """
    key = legacy_target(target_chip)
    version = library_version_entry(library_version)
    if not isinstance(model_proto, onnx.ModelProto):
        raise ModelError(f"expected an onnx.ModelProto, got {type(model_proto).__name__}; load it with onnx.load.")
    name = str(file_name)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise OptionError(f"file_name {file_name!r}: give a plain base name such as 'mnist_coefficient'.")
    folder = _output_folder(output_path)
    quant_table = table if isinstance(table, QuantTable) else QuantTable.load(table)
    if quant_table.metadata.get("int16_layers"):
        raise OptionError("the legacy ESP-DL library runs one width per model: export an int8 or an int16 table.")
    width = _table_bits(quant_table, bits)
    # The layers and exponents come from the integer model; the legacy profile lets its int8 per-channel weights
    # through (the legacy library runs them on every chip it served); the constants are the legacy ones.
    q = build_quantized_model(model_proto, quant_table, legacy_profile(key), width)
    layers = plan_legacy_layers(q, model_proto, key, version)
    if not layers:
        raise UnsupportedModelError("the model has no layer to export.")
    namespace = _identifier(name, "coefficient")
    granularity = (
        "per-channel"
        if any(isinstance(layer.constants["filter"].exponent, list) for layer in layers if "filter" in layer.constants)
        else "per-tensor"
    )
    banner = (
        f"// Generated by espquant {__version__} for {key}, int{width} {granularity}, legacy ESP-DL v{version.name} "
        f"(esp-dl tag {version.tag}) layer API. Do not edit."
    )
    model_input = next(n for n in q.inputs if n not in q.float_tensors)
    cpp, hpp, model_hpp = cpp_file_paths(folder, name)
    texts = {
        cpp: _render_cpp(layers, namespace, name, banner),
        hpp: _render_hpp(layers, namespace, banner),
        model_hpp: _render_model(layers, q, model_input, namespace, name, banner),
    }
    _probe_writable(folder)
    written = write_files({path: text.encode() for path, text in texts.items()})
    if print_model_info:
        _print_summary(
            layers, f"{name}: {len(layers)} ESP-DL v{version.name} layers for {key}, int{width} {granularity}"
        )
    return written
