"""Weight rounding by layer output (the aim of AdaRound, Nagel et al. 2020): round each weight down or up so
that the layer's output on the calibration data moves least, instead of to the nearest integer on its own.

For a layer ``y = W x + b`` whose weights the chip holds as ``(W + D)`` (integers times ``2^e``), output channel
``o`` is off by ``d_o . x_q - w_o . (x - x_q)``, with ``x`` the float model's layer input and ``x_q`` the one
the chip computes (the simulated, dequantized input). The bias takes the weights' own mean shift
(``b_o - d_o . E[x_q]``, as bias correction does; also taking the inputs' mean error ``w_o . E[x_q - x]`` out at
every layer at once over-corrects: on PP-OCRv4 det the outputs collapsed), and what is left is a quadratic in
``d_o``::

    d_o^T H d_o - 2 d_o^T C w_o + const,   H = Cov(x_q),   C = Cov(x_q, x - x_q).

Each ``d_o[k]`` takes one of two values (``w / 2^e`` rounded down or up, within the integer range). Starting
from nearest rounding, sweeps over the taps flip a weight to its other side where that lowers the quadratic
(coordinate descent; the gradient ``H d - C w`` is updated in place, all output channels of a group at once),
at most ``SWEEPS`` sweeps. The quadratic never grows, so on the calibration data the chosen rounding is never
worse than nearest rounding by this measure; whether the model's outputs gain is measured by the caller
(``auto`` keeps it only when they do).

A Conv's inputs are the patches its kernel reads (pads, strides, dilations; one problem per group, so a
depthwise layer is one 9- or 25-tap problem per channel), sampled at up to ``ROWS`` positions; a Gemm's are
the rows of its input. The result is a new float model whose weights lie on the chip's grid (``q 2^e``: the
chip's rounding gives back ``q``) and whose biases hold the correction; its table is its own (graph hash)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

from espquant.calibration.bias_correction import bias_corrected_inputs
from espquant.calibration.plan import CalibrationPlan
from espquant.graph import node_attributes, opset_version, subtract_from_bias
from espquant.quant.pot import qmax, qmin

__all__ = ["choose_rounding", "layer_patches", "rounded_weight_model", "RoundingStats", "SWEEPS", "ROWS"]

SWEEPS = 2
ROWS = 8192  # input positions sampled per layer
ELEMENTS = 6_000_000  # at most this many values per sampled array (fewer positions for layers with many taps)
MIN_ROWS_PER_TAP = 4  # fewer positions per tap estimate the covariance too loosely: that layer keeps nearest


@dataclass
class RoundingStats:
    """What the rounding changed: layers, weights moved off nearest, and the summed quadratic before / after."""

    layers: int = 0
    flipped: int = 0
    weights: int = 0
    cost_nearest: float = 0.0
    cost_chosen: float = 0.0


def choose_rounding(
    weights: np.ndarray,
    step: np.ndarray,
    hessian: np.ndarray,
    linear: np.ndarray | None,
    low: int,
    high: int,
    sweeps: int = SWEEPS,
) -> np.ndarray:
    """The integers ``q`` (``[G, O, K]``) for weights ``[G, O, K]`` on grids ``step`` (``[G, O, 1]``): each is
    ``floor`` or ``ceil`` of ``w / step`` within ``[low, high]``, chosen by coordinate descent on
    ``d^T H d - 2 d^T (C w)`` per output row (``hessian`` ``[G, K, K]``; ``linear`` = ``C w`` ``[G, O, K]``,
    None for zero) from nearest rounding."""
    ratio = weights / step
    down = np.floor(ratio)
    q = np.clip(np.round(ratio), low, high)
    gradient = ((q - ratio) * step) @ hessian
    if linear is not None:
        gradient = gradient - linear
    diagonal = np.einsum("gkk->gk", hessian)
    plane = step[:, :, 0]
    for _ in range(sweeps):
        changed = False
        for k in range(weights.shape[2]):
            current = q[:, :, k]
            other = np.where(current == down[:, :, k], down[:, :, k] + 1, down[:, :, k])
            move = (other - current) * plane
            gain = 2 * move * gradient[:, :, k] + move * move * diagonal[:, k][:, None]
            flip = (other >= low) & (other <= high) & (other != current) & (gain < 0)
            if flip.any():
                changed = True
                q[:, :, k] = np.where(flip, other, current)
                gradient += (move * flip)[:, :, None] * hessian[:, k, :][:, None, :]
        if not changed:
            break
    return q


def _quadratic(delta: np.ndarray, hessian: np.ndarray, linear: np.ndarray | None) -> float:
    value = float(np.einsum("gok,gkl,gol->", delta, hessian, delta))
    if linear is not None:
        value -= 2 * float(np.einsum("gok,gok->", delta, linear))
    return value


def layer_patches(arrays: list[np.ndarray], node: onnx.NodeProto, opset: int, rows: int) -> list[np.ndarray]:
    """What each output position of a 2-D Conv reads, ``[groups, rows, taps]`` per array (taps in the weight's
    ``(C / g, kh, kw)`` order), at the same ``rows`` positions of ``(N, Ho, Wo)`` for every array (all of them
    when there are fewer)."""
    attrs = node_attributes(node, opset)
    kernel = [int(k) for k in attrs["kernel_shape"]]
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in attrs.get("dilations", [1, 1])]
    groups = int(attrs.get("group", 1))
    span = [(kernel[i] - 1) * dilations[i] + 1 for i in range(2)]
    result, chosen = [], None
    for x in arrays:
        padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        windows = sliding_window_view(padded, span, axis=(2, 3))[
            :, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]
        ]
        batch, channels, height, width = windows.shape[:4]
        if chosen is None:
            chosen = _sampled(batch * height * width, rows)
        n, h, w = np.unravel_index(chosen, (batch, height, width))
        patches = windows[n, :, h, w]  # [R, C, kh, kw]
        taps = channels // groups * kernel[0] * kernel[1]
        result.append(patches.reshape(len(chosen), groups, taps).transpose(1, 0, 2).astype(np.float64))
    return result


def _sampled(total: int, rows: int) -> np.ndarray:
    """``rows`` of ``total`` positions, the same ones on every run (all when there are fewer)."""
    if total <= rows:
        return np.arange(total)
    return np.sort(np.random.default_rng(0).choice(total, rows, replace=False))


def _layer_inputs(
    node: onnx.NodeProto, opset: int, x: np.ndarray, x_q: np.ndarray, rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(float, simulated)`` inputs of a 2-D Conv or a Gemm as ``[groups, rows, taps]``, sampled alike."""
    if node.op_type == "Conv":
        patches, patches_q = layer_patches([x, x_q], node, opset, rows)
        return patches, patches_q
    flat, flat_q = x.reshape(-1, x.shape[-1]), x_q.reshape(-1, x_q.shape[-1])
    chosen = _sampled(len(flat), rows)
    return flat[chosen][None].astype(np.float64), flat_q[chosen][None].astype(np.float64)


def rounded_weight_model(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    exponents: dict[str, int | list[int]],
    float_inputs: Mapping[str, np.ndarray],
    simulated_inputs: dict[str, np.ndarray],
    bits_of: dict[str, int],
) -> tuple[onnx.ModelProto, RoundingStats]:
    """A copy of ``model`` whose Conv / Gemm weights are rounded by layer output (module docstring).

    Args:
        plan: the model's calibration plan.
        exponents: the table's weight exponents (``assign_exponents``).
        float_inputs / simulated_inputs: each layer input tensor on the same samples, from the float model and
            from the simulated chip (dequantized).
        bits_of: weight tensor -> the width its layer runs at.

    Returns:
        ``(rounded, stats)``; ``model`` is not modified."""
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    inits = {t.name: t for t in rounded.graph.initializer}
    nodes = {id(a): b for a, b in zip(model.graph.node, rounded.graph.node)}
    opset = opset_version(model)
    stats = RoundingStats()
    for tensor, use in bias_corrected_inputs(model, plan):
        exponent = exponents.get(use.tensor)
        if exponent is None or tensor not in float_inputs or tensor not in simulated_inputs:
            continue
        node = nodes[id(use.node)]
        weight = numpy_helper.to_array(inits[use.tensor]).astype(np.float64)
        if node.op_type == "Conv" and weight.ndim != 4:
            continue
        attrs = node_attributes(node, opset)
        trans_b = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        rows = weight if node.op_type == "Conv" or trans_b else weight.T  # [O, K] per output channel
        groups = int(attrs.get("group", 1)) if node.op_type == "Conv" else 1
        matrix = rows.reshape(groups, rows.shape[0] // groups, -1)
        positions = min(ROWS, ELEMENTS // (groups * matrix.shape[2]))
        if positions < MIN_ROWS_PER_TAP * matrix.shape[2]:
            continue
        x, x_q = _layer_inputs(
            node, opset, np.asarray(float_inputs[tensor]), np.asarray(simulated_inputs[tensor]), positions
        )
        if x.shape[1] < MIN_ROWS_PER_TAP * matrix.shape[2]:  # fewer samples than the bound allowed
            continue
        channel_exponents = np.broadcast_to(np.asarray(exponent, dtype=np.float64).reshape(-1), (rows.shape[0],))
        step = (2.0**channel_exponents).reshape(groups, -1, 1)
        mean_q = x_q.mean(axis=1)
        centred_q = x_q - mean_q[:, None, :]
        error = x - x_q
        hessian = centred_q.transpose(0, 2, 1) @ centred_q / x.shape[1]
        cross = centred_q.transpose(0, 2, 1) @ (error - error.mean(axis=1)[:, None, :]) / x.shape[1]
        linear = matrix @ cross.transpose(0, 2, 1)  # C w per output row
        bits = bits_of.get(use.tensor, 8)
        q = choose_rounding(matrix, step, hessian, linear, qmin(bits), qmax(bits))
        nearest = np.clip(np.round(matrix / step), qmin(bits), qmax(bits))
        delta = q * step - matrix
        stats.layers += 1
        stats.flipped += int((q != nearest).sum())
        stats.weights += int(q.size)
        stats.cost_nearest += _quadratic(nearest * step - matrix, hessian, linear)
        stats.cost_chosen += _quadratic(delta, hessian, linear)
        new_rows = (q * step).reshape(rows.shape)
        new_weight = new_rows if node.op_type == "Conv" or trans_b else new_rows.T
        on_grid = new_weight.reshape(weight.shape).astype(np.float32)
        inits[use.tensor].CopyFrom(numpy_helper.from_array(on_grid, use.tensor))
        shift = np.einsum("gok,gk->go", delta, mean_q).reshape(-1)
        subtract_from_bias(rounded, node, inits, shift, "rounded_bias")
    return rounded, stats
