"""The graph optimizer: clean a float ONNX model before quantization.

Batch-norm, bias and pad fusion, MatMul+Add to Gemm (any batch size), ceil-mode pools to explicit end pads,
written-out hard-sigmoid / hard-swish to one node, no-op elimination, constant folding, opset upgrade,
naming and shape inference, built on onnxoptimizer plus espquant's own passes.
"""

from espquant.optimizer.core import (
    PASSES,
    normalization_warnings,
    optimize_file,
    optimize_fp_model,
    optimize_model,
    optimize_model_with_report,
)
from espquant.optimizer.pipeline import OptimizationReport, OptimizerPass, PassResult
from espquant.optimizer.shapes import convert_model_batch_to_dynamic, fix_input_shapes, infer_shapes

__all__ = [
    "PASSES",
    "OptimizationReport",
    "OptimizerPass",
    "PassResult",
    "convert_model_batch_to_dynamic",
    "fix_input_shapes",
    "infer_shapes",
    "normalization_warnings",
    "optimize_file",
    "optimize_fp_model",
    "optimize_model",
    "optimize_model_with_report",
]
