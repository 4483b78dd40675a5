"""Reading and writing ONNX models safely.

Two promises live here: the user's input model is never modified, and every output appears atomically
(written to a temporary file in the destination folder, then renamed over the target), so an interrupted
run never leaves a half-written model behind. Every failure becomes a :class:`ModelError` that names the
path and says what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from espquant.errors import ModelError
from espquant.files import atomic_write_bytes

__all__ = ["load_model", "save_model"]

# Protobuf refuses to serialise a message of 2 GiB or more; above this, weights go to an external file.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX model from ``path``, with its external data, or raise a clear :class:`ModelError`.

    Args:
        path: a ``.onnx`` file.

    Returns:
        The model, with any external tensor data loaded into memory.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file. Check the path to the .onnx model.")
    if p.is_dir():
        raise ModelError(f"{p}: is a folder, not an ONNX model file. Pass the path of the .onnx file.")
    if p.suffix.lower() != ".onnx":
        raise ModelError(
            f"{p}: expected an ONNX model file ending in '.onnx'. Export your network to ONNX first "
            "(for example with torch.onnx.export or tf2onnx)."
        )
    if p.stat().st_size == 0:
        raise ModelError(f"{p}: the file is empty. Export the model again.")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(
            f"{p}: not a readable ONNX model, the file is corrupt or truncated ({exc}). Export it again."
        ) from exc
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{p}: the file parsed but holds no graph nodes; it is truncated or not an ONNX model.")
    _load_external_data(model, p)
    _validate_structure(model, p)
    _check_valid(model, p)
    return model


def _check_valid(model: onnx.ModelProto, path: Path) -> None:
    """Run ``onnx.checker``; graph outputs declared without a shape are given their inferred one first
    (hand-built models often omit it, and it is the one thing the checker rejects that is easy to repair)."""
    try:
        onnx.checker.check_model(model)
        return
    except ValueError:
        return  # over 2 GiB: the in-memory checker cannot take it; later steps report real problems
    except onnx.checker.ValidationError as exc:
        error = exc
    if "shape" in str(error) and any(not o.type.tensor_type.HasField("shape") for o in model.graph.output):
        _infer_output_types(model)
        try:
            onnx.checker.check_model(model)
            return
        except onnx.checker.ValidationError as exc:
            error = exc
    first = str(error).strip().splitlines()[0]
    unknown = re.search(r"No Op registered for (\S+) with domain_version of (\d+)", first)
    if unknown:
        raise ModelError(_unknown_op_message(path, unknown.group(1), int(unknown.group(2)))) from error
    raise ModelError(
        f"{path}: the model is not valid ONNX ({first}); the file is truncated or was exported incorrectly. "
        "Export it again."
    ) from error


def _unknown_op_message(path: Path, op_type: str, opset: int) -> str:
    """Why a node whose op ONNX does not know at the model's opset stops everything, and what to do.

    Converters write a source framework's custom op as such a node (tf2onnx's ``TFL_Convolution2DTransposeBias``
    for MediaPipe's TFLite custom op), or an op that needs a newer opset (tf2onnx's HardSwish at opset 13)."""
    known = [v for v in range(opset + 1, onnx.defs.onnx_opset_version() + 1) if _has_schema(op_type, v)]
    if known:
        return (
            f"{path}: {op_type} is an ONNX operator only from opset {known[0]}, and this model imports opset "
            f"{opset}; export it again with opset {known[0]} or later."
        )
    return (
        f"{path}: {op_type} is not an ONNX operator (the converter kept a custom operator of the source "
        "framework); neither onnxruntime nor ESP-DL can run it, so this model cannot run on the chip as exported. "
        "Replace that layer with standard operators in the source model, or export without it."
    )


def _has_schema(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return False
    return True


def _infer_output_types(model: onnx.ModelProto) -> None:
    """Give graph outputs declared without a type the one ONNX shape inference finds (never raises)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # onnx raises InferenceError and plain RuntimeErrors; the checker reports the rest
        return
    found = {o.name: o for o in inferred.graph.output}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape") and output.name in found:
            output.type.CopyFrom(found[output.name].type)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Load tensors stored in side files, naming the missing file when one is absent."""
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model, uses_external_data

    missing = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if not (path.parent / location).is_file():
                missing.append(f"{tensor.name!r} -> {location!r}")
    if missing:
        raise ModelError(
            f"{path}: external weight data not found next to the model: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. Keep the data file(s) in the same folder as the .onnx file."
        )
    try:
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{path}: could not read its external weight data ({exc}).") from exc


def _validate_structure(model: onnx.ModelProto, path: Path | str) -> None:
    """Reject models espquant cannot work on at all, before any pass touches them."""
    initializer_names = {t.name for t in model.graph.initializer}
    real_inputs = [i.name for i in model.graph.input if i.name not in initializer_names]
    if not real_inputs:
        raise ModelError(
            f"{path}: the graph has no inputs (every declared input is a constant initializer). "
            "espquant needs at least one data input to feed; export the model with its input tensor."
        )
    if not model.graph.output:
        raise ModelError(f"{path}: the graph declares no outputs; export the model with its output tensor(s).")


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Save ``model`` atomically; weights go to ``<name>.data`` beside it when the model exceeds 2 GiB."""
    target = Path(path)
    if target.suffix.lower() != ".onnx":
        raise ModelError(f"{target}: output model paths must end in '.onnx'.")
    if model.ByteSize() < _PROTOBUF_LIMIT:
        atomic_write_bytes(target, model.SerializeToString())
        return
    from onnx.external_data_helper import convert_model_to_external_data

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    data_name = target.name + ".data"
    tmp_data = target.parent / f".{data_name}.tmp"
    convert_model_to_external_data(copy, all_tensors_to_one_file=True, location=tmp_data.name)
    onnx.external_data_helper.write_external_data_tensors(copy, str(target.parent))
    for tensor in onnx.external_data_helper._get_all_tensors(copy):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    os.replace(tmp_data, target.parent / data_name)
    atomic_write_bytes(target, copy.SerializeToString())
