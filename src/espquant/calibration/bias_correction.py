"""Bias correction (Nagel et al. 2019, section 4.2): undo the mean shift that rounding the weights causes.

Rounding a Conv's weights to ``W + dW`` moves every output channel's mean by ``dW . E[x]``: for a layer
whose input has a large mean (every layer after a Relu), the per-tensor grid of ESP32-S3 can shift a thin
channel's output by a sizeable fraction of its range, and the shift accumulates down the network. Knowing
the weight exponents (the table) and the mean of each input channel on the calibration data, the shift is
computed exactly (up to the padding border of the convolution, where the input is zero rather than its
mean) and subtracted from the float bias before quantization. The chip then runs the ordinary integer
arithmetic with a different bias: nothing it computes changes form.

The corrections are ``BiasShift``s: ``auto`` keeps them in the table (``QuantTable.model_for`` applies them,
as it applies the weight factors of equalization), so the user's model stays the one to evaluate and export;
a fixed method asked for bias correction writes the corrected float model instead (its table belongs to it).
"""

from __future__ import annotations

import numpy as np
import onnx

from espquant.calibration.plan import CalibrationPlan, WeightUse
from espquant.graph import BiasShift, GraphView, node_attributes, opset_version
from espquant.quant.rounding import round_float, saturate

__all__ = ["bias_shifts", "bias_corrected_inputs", "rounded_weights"]

ROUNDING = "half_even"  # weights are float: ties are measure-zero, so S3 (half-up) and P4 agree


def rounded_weights(values: np.ndarray, exponent: int | list[int], axis: int | None, bits: int) -> np.ndarray:
    """The weights as the chip stores them, back in float: ``sat(R(w 2^-e)) 2^e`` (per channel on ``axis``)."""
    if isinstance(exponent, list):
        shape = [1] * values.ndim
        shape[axis if axis is not None else 0] = len(exponent)
        step = (2.0 ** np.asarray(exponent, dtype=np.float64)).reshape(shape)
    else:
        step = np.float64(2.0**exponent)
    return saturate(round_float(values.astype(np.float64) / step, ROUNDING), bits) * step


def bias_corrected_inputs(model: onnx.ModelProto, plan: CalibrationPlan) -> list[tuple[str, WeightUse]]:
    """(layer input tensor, weight use) of every layer whose bias can be corrected: Conv, and Gemm with alpha = beta = 1
    and no transposed input, whose bias (if any) is a 1-D initializer read by that node only."""
    view = GraphView(model.graph)
    opset = opset_version(model)
    inits = {t.name: t for t in model.graph.initializer}
    result: list[tuple[str, WeightUse]] = []
    for use in plan.weights:
        node = use.node
        if node.op_type not in ("Conv", "Gemm") or use.position != 1 or node.input[1] not in inits:
            continue
        if node.op_type == "Gemm":
            attrs = node_attributes(node, opset)
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and (
            bias not in inits or len(inits[bias].dims) != 1 or any(r is not node for r in view.consumers[bias])
        ):
            continue
        result.append((node.input[0], use))
    return result


def _output_shift(node: onnx.NodeProto, delta_w: np.ndarray, mean: np.ndarray, trans_b: bool) -> np.ndarray:
    """``dW . E[x]`` per output channel (Conv: grouped, summed over the kernel; Gemm: a matrix product)."""
    if node.op_type == "Gemm":
        return delta_w @ mean if trans_b else mean @ delta_w
    group = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
    out_channels, per_group = delta_w.shape[0], delta_w.shape[1]
    summed = delta_w.reshape(out_channels, per_group, -1).sum(axis=2)  # [O, C/g]
    means = mean.reshape(group, per_group)[np.arange(out_channels) // (out_channels // group)]
    return (summed * means).sum(axis=1)


def bias_shifts(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    exponents: dict[str, int | list[int]],
    input_means: dict[str, np.ndarray],
    bits_of: dict[str, int],
) -> list[BiasShift]:
    """What each Conv / Gemm bias must lose to compensate the rounding of its weights (``shift_biases`` applies
    them; a table carries them).

    Args:
        plan: the model's calibration plan (``plan_calibration(model)``).
        exponents: the weight exponents of the table (``assign_exponents``).
        input_means: layer input tensor -> mean per channel (axis 1 for Conv, the last axis for Gemm).
        bits_of: weight tensor -> the width its layer runs at."""
    view = GraphView(model.graph)
    opset = opset_version(model)
    shifts = []
    for tensor, use in bias_corrected_inputs(model, plan):
        if tensor not in input_means or use.tensor not in exponents:
            continue
        node = use.node
        weight = view.array(use.tensor).astype(np.float64)
        axis = use.channel_axis if isinstance(exponents[use.tensor], list) else None
        delta = rounded_weights(weight, exponents[use.tensor], axis, bits_of.get(use.tensor, 8)) - weight
        trans_b = bool(node_attributes(node, opset).get("transB", 0)) if node.op_type == "Gemm" else False
        shift = _output_shift(node, delta, input_means[tensor].astype(np.float64), trans_b)
        if np.any(shift):
            shifts.append(BiasShift(node.output[0], shift))
    return shifts
