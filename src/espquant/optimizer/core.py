"""The optimizer: the ordered list of passes and the public entry points.

``optimize_model`` works on a ModelProto in memory; ``optimize_fp_model`` is the legacy file-to-file
form. Both run the same pipeline: prepare (opset, constants, graph inputs, shapes), fuse and clean until
nothing changes, then name, infer shapes and check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import onnx

from espquant.errors import ModelError
from espquant.files import check_distinct_paths
from espquant.graph import GraphView
from espquant.model_io import load_model, save_model
from espquant.optimizer.activations import fuse_hard_sigmoid, fuse_hard_swish
from espquant.optimizer.affine import fold_affine
from espquant.optimizer.batchnorm import batchnorm_to_mul_add, fold_batchnorm
from espquant.optimizer.cleanup import (
    eliminate_inference_dropout,
    name_nodes,
    nop_cast_to_identity,
    reshape_prelu_slopes,
    sum_to_add,
    upgrade_opset,
)
from espquant.optimizer.constants import (
    constants_to_initializers,
    fold_constants,
    remove_initializer_inputs,
    reshape_copy_dims,
)
from espquant.optimizer.external import ONNXOPTIMIZER_PASSES as OX
from espquant.optimizer.gemm import fuse_matmul_add_into_gemm
from espquant.optimizer.pipeline import (
    OptimizationReport,
    OptimizerPass,
    PassResult,
    run_pipeline,
    select_passes,
)
from espquant.optimizer.pooling import resolve_same_auto_pad, rewrite_ceil_mode_pools
from espquant.optimizer.shapes import fix_input_shapes, infer_shapes_pass

__all__ = [
    "PASSES",
    "optimize_model",
    "optimize_model_with_report",
    "optimize_fp_model",
    "normalization_warnings",
]

logger = logging.getLogger(__name__)


def check_model_proto(model: onnx.ModelProto) -> PassResult:
    """Run ``onnx.checker`` on the result; a failure here is a bug worth reporting, so it raises."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(
            f"the optimized model fails onnx.checker ({exc}). Please report this with the model; "
            "meanwhile run with --passes to leave out the pass at fault."
        ) from exc
    except ValueError:
        return PassResult(warnings=("model over 2 GiB: onnx.checker skipped",))
    return PassResult(0, ("onnx.checker passed",))


PASSES: list[OptimizerPass] = [
    OptimizerPass("upgrade_opset", upgrade_opset, "convert opsets below 13 up to 13", "prepare"),
    OptimizerPass("constants_to_initializers", constants_to_initializers, "Constant nodes -> initializers", "prepare"),
    OptimizerPass(
        "remove_initializer_inputs",
        remove_initializer_inputs,
        "drop initializers from graph inputs",
        "prepare",
    ),
    OptimizerPass(
        "refresh_shapes",
        infer_shapes_pass,
        "shape inference at the start of each round, for the passes that read shapes",
        "fixpoint",
    ),
    OptimizerPass("fold_constants", fold_constants, "evaluate constant subgraphs and static Shape chains"),
    OptimizerPass(
        "reshape_copy_dims", reshape_copy_dims, "Reshape targets computed from shapes (dynamic batch) -> constant"
    ),
    OptimizerPass(
        "resolve_same_auto_pad",
        resolve_same_auto_pad,
        "Conv / MaxPool / AveragePool auto_pad=SAME_UPPER / SAME_LOWER -> explicit pads (static sizes)",
    ),
    OptimizerPass(
        "rewrite_ceil_mode_pools",
        rewrite_ceil_mode_pools,
        "MaxPool / AveragePool ceil_mode=1 -> ceil_mode=0 with explicit end pads, where exact",
    ),
    OptimizerPass("nop_cast_to_identity", nop_cast_to_identity, "Cast to the type its input has -> Identity"),
    OX["eliminate_identity"],
    OptimizerPass("eliminate_inference_dropout", eliminate_inference_dropout, "remove Dropout (identity at inference)"),
    OX["eliminate_nop_dropout"],
    OX["eliminate_nop_flatten"],
    OX["eliminate_nop_pad"],
    OX["eliminate_nop_transpose"],
    OX["fuse_pad_into_conv"],
    OX["fuse_bn_into_conv"],
    OptimizerPass("fold_batchnorm", fold_batchnorm, "fold BatchNormalization into Conv/ConvTranspose/Gemm"),
    OptimizerPass("batchnorm_to_mul_add", batchnorm_to_mul_add, "lone BatchNormalization -> Mul + Add"),
    OX["fuse_add_bias_into_conv"],
    OptimizerPass(
        "fuse_matmul_add_bias_into_gemm",
        fuse_matmul_add_into_gemm,
        "turn MatMul (2-D input, any batch size) + Add(constant) into Gemm",
    ),
    OX["fuse_transpose_into_gemm"],
    OptimizerPass(
        "fuse_hard_sigmoid",
        fuse_hard_sigmoid,
        "Clip(x/6 + 0.5, 0, 1), Clip(x + 3, 0, 6) / 6 and other written-out hard-sigmoids -> HardSigmoid",
    ),
    OptimizerPass(
        "fuse_hard_swish",
        fuse_hard_swish,
        "x * Clip(x + 3, 0, 6) / 6, x * HardSigmoid(x) -> HardSwish (raises the opset to 14 when needed)",
    ),
    OptimizerPass(
        "fold_affine",
        fold_affine,
        "constant per-channel Mul / Div / Add / Sub next to a Conv / Gemm -> its weights and bias (after the "
        "activation fusions: their written-out patterns hold such nodes)",
    ),
    OptimizerPass("sum_to_add", sum_to_add, "two-input Sum -> Add"),
    OptimizerPass("reshape_prelu_slopes", reshape_prelu_slopes, "PRelu slopes -> (C, 1, 1)"),
    OX["eliminate_deadend"],
    OX["eliminate_unused_initializer"],
    OX["eliminate_duplicate_initializer"],
    OptimizerPass("name_nodes", name_nodes, "give every node a unique, stable name", "finish"),
    OptimizerPass("infer_shapes", infer_shapes_pass, "final shape inference", "finish"),
    OptimizerPass("check", check_model_proto, "onnx.checker on the result", "finish"),
]


def normalization_warnings(model: onnx.ModelProto) -> list[str]:
    """Warn when the first nodes after an input look like input normalisation by constants.

    The legacy ESP-DL toolkit asks users to normalise outside the model: the chip would otherwise spend
    a quantized Sub/Div/Mul/Add per pixel, and its exponent would be calibrated on raw pixels.
    """
    view = GraphView(model.graph)
    warnings = []
    for name in sorted(view.graph_inputs):
        for node in view.consumers.get(name, []):
            if node.op_type in ("Sub", "Div", "Mul", "Add") and len(node.input) == 2:
                other = node.input[1] if node.input[0] == name else node.input[0]
                if view.is_constant(other):
                    warnings.append(
                        f"input {name!r} is normalised inside the model by {node.op_type} node {node.name!r} with "
                        "a constant: remove that step from the model and apply it to your data before "
                        "calibration (ESP-DL expects normalisation outside the model)"
                    )
    return warnings


def optimize_model_with_report(
    model_proto: onnx.ModelProto, passes: Sequence[str] | None = None
) -> tuple[onnx.ModelProto, OptimizationReport]:
    """Optimize a copy of ``model_proto`` and report what every pass changed.

    Args:
        model_proto: the float model; it is not modified.
        passes: names of the passes to run (in pipeline order); None runs them all.
    """
    selected = select_passes(PASSES, passes)
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    report = run_pipeline(model, selected)
    for message in normalization_warnings(model):
        logger.warning(message)
        report.warnings.append(message)
    return model, report


def optimize_model(model_proto: onnx.ModelProto, passes: Sequence[str] | None = None) -> onnx.ModelProto:
    """Optimize ``model_proto`` in memory and return the new model (the argument is left untouched)."""
    return optimize_model_with_report(model_proto, passes)[0]


def default_output_path(model_path: str | os.PathLike[str]) -> Path:
    """``<stem>_optimized.onnx`` next to the input, the legacy toolkit's naming."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}_optimized.onnx")


def optimize_fp_model(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str] | None = None) -> str:
    """Optimize the model file at ``model_path`` and write the result; returns the output path.

    The output goes to ``output_path`` or ``<stem>_optimized.onnx`` beside the input, written atomically.
    The input file is never modified.
    """
    return optimize_file(model_path, output_path)[0]


def optimize_file(
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    passes: Sequence[str] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
) -> tuple[str, OptimizationReport]:
    """File-to-file optimization with the report, as the CLI uses it."""
    target = Path(output_path) if output_path is not None else default_output_path(model_path)
    check_distinct_paths(model_path, target)
    if target.suffix.lower() != ".onnx":
        raise ModelError(f"{target}: output model paths must end in '.onnx'.")
    model = load_model(model_path)
    if input_shapes:
        model = fix_input_shapes(model, input_shapes)
    optimized, report = optimize_model_with_report(model, passes)
    save_model(optimized, target)
    return str(target), report
