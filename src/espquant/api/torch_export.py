"""``espquant.quantize_torch``: a PyTorch module in, the same pipeline as :func:`espquant.quantize` out.

torch is an optional extra (``pip install 'espquant[torch]'``) and is imported only inside this function, so
``import espquant`` never loads it. The module is exported with ``torch.onnx.export`` to a temporary file and that
file is quantized: one code path for ONNX and PyTorch users, as ESP-PPQ's ``espdl_quantize_torch`` is a thin
wrapper over its ONNX entry.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

from espquant.api.quantize import QuantizeResult, quantize
from espquant.errors import OptionError

__all__ = ["quantize_torch"]


def quantize_torch(
    module: Any,
    example_input: Any,
    calib_dataloader: object,
    espdl_export_file: str | os.PathLike[str],
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    **options: Any,
) -> QuantizeResult:
    """Export ``module`` (in eval mode) to ONNX with ``example_input`` and run :func:`espquant.quantize` on it.

    Args:
        module: a ``torch.nn.Module``.
        example_input: one tensor (or a tuple of tensors) of the shape the model takes.
        calib_dataloader, espdl_export_file, options: as :func:`espquant.quantize` (``target``, ``num_of_bits``,
            ``calib_steps``, ``workdir`` ...). The output path is required: there is no model file to name it after.
        opset: the ONNX opset for ``torch.onnx.export``.
        dynamic_batch: export the first dimension of every input and output as dynamic.
    """
    try:
        import torch
    except ImportError:
        raise OptionError("quantize_torch needs PyTorch: pip install 'espquant[torch]'.") from None
    if not isinstance(module, torch.nn.Module):
        raise OptionError(f"module of type {type(module).__name__}: give a torch.nn.Module.")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    module.eval()
    with tempfile.TemporaryDirectory(prefix="espquant-torch-") as folder:
        path = Path(folder) / "model.onnx"
        axes = {name: {0: "N"} for name in names} if dynamic_batch else None
        # torch 2.9 and later default to the dynamo exporter, which needs onnxscript (not a dependency) and
        # writes other graphs; the TorchScript exporter is what the optimizer and ESP-PPQ users know.
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(path), input_names=names, opset_version=opset, dynamic_axes=axes, **legacy
            )
        if "workdir" not in options or options["workdir"] is None:  # intermediates beside the output, not in tmp
            options["workdir"] = Path(espdl_export_file).parent if options.get("format") != "cpp" else None
        return quantize(path, calib_dataloader, espdl_export_file, **options)
