"""Mixed precision after training: give int16 to the layers that lose the most, measure what it buys.

The layer report ranks layers by the error they add on their own. ``suggest_int16`` turns the worst of them
into int16 layers (re-calibrating, since an int16 tensor takes its own exponent), simulates the mixed model
on the user's data and reports accuracy and weight size for each step: either a fixed number of layers
(``count``) or one layer at a time until the accuracy drop against the float model is within ``budget``
points (or everything, the model inputs included, is int16). Accuracy is top-1 against labels when given,
else top-1 agreement with the float model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from espquant.calibration.dataset import Chunking
from espquant.errors import OptionError
from espquant.ops import get_op_spec
from espquant.report.analysis import analyze
from espquant.table import QuantTable

__all__ = ["PrecisionStep", "MixedPrecision", "suggest_int16", "weight_bytes"]

_STEP = 256  # samples per simulated slice (a multiple of a fixed batch)


@dataclass
class PrecisionStep:
    """One evaluated configuration: its int16 layers, accuracy (percent) and weight + bias bytes."""

    int16_layers: list[str]
    accuracy: float
    weight_bytes: int


@dataclass
class MixedPrecision:
    metric: str  # "accuracy" (labels) or "agreement" (top-1 agreement with the float model)
    float_accuracy: float
    steps: list[PrecisionStep] = field(default_factory=list)
    table: QuantTable | None = None  # the last step's table

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "float_accuracy": self.float_accuracy,
            "steps": [vars(step) for step in self.steps],
        }


def weight_bytes(quantized: Any) -> int:
    """Bytes of the integer weights and biases the chip stores (int8 / int16 weights, int32 / int64 biases)."""
    total = 0
    for node in quantized.nodes:
        spec = get_op_spec(node.op_type)
        if spec is None:
            continue
        for position in spec.weight_inputs:
            if position < len(node.inputs) and node.inputs[position] in quantized.constants:
                total += quantized.constants[node.inputs[position]].size * node.bits // 8
        for position in spec.bias_inputs:
            if position < len(node.inputs) and node.inputs[position] in quantized.constants:
                total += quantized.constants[node.inputs[position]].size * (4 if node.bits == 8 else 8)
    return total


def _top1(model: onnx.ModelProto, table: QuantTable, target: str, data: np.ndarray, reference: np.ndarray) -> tuple:
    from espquant.simulator.lowering import lower_for_target
    from espquant.simulator.simulate import simulate

    quantized = lower_for_target(model, table, target)
    step = Chunking.of(model).step(_STEP)
    predicted = np.concatenate(
        [simulate(quantized, model, data[i : i + step])[0][0].argmax(axis=-1) for i in range(0, len(data), step)]
    )
    return 100.0 * float((predicted == reference).mean()), weight_bytes(quantized)


def suggest_int16(
    model: onnx.ModelProto,
    table: QuantTable | str,
    data: np.ndarray,
    target: str = "esp32s3",
    *,
    count: int | None = None,
    budget: float | None = None,
    labels: np.ndarray | None = None,
    calibration_data: np.ndarray | None = None,
) -> MixedPrecision:
    """Pick int16 layers by their own error and measure each step (module docstring).

    Args:
        table: the int8 table to start from (its granularity and method are reused for re-calibration).
        data: evaluation inputs (one-input models), also the calibration data unless ``calibration_data``.
        count: make exactly the ``count`` worst layers int16; or
        budget: add layers worst-first until the drop against the float model is at most ``budget`` points.
    """
    from espquant.calibration.engine import calibrate_model
    from espquant.runtime import create_session

    if (count is None) == (budget is None):
        raise OptionError("give either count (--suggest-int16 K) or budget (--budget POINTS), not both or neither.")
    table = table if isinstance(table, QuantTable) else QuantTable.load(table)
    if table.metadata.get("bits", 8) != 8:
        raise OptionError("mixed precision starts from an int8 table; this one is int16 already.")
    session = create_session(model)
    name = session.get_inputs()[0].name
    chunking = Chunking.of(model)  # a fixed batch B: B samples per run (dataset.Chunking)
    chunking.check_total(len(data))
    step = chunking.step(_STEP)
    float_top1 = np.concatenate(
        [
            chunking.run(lambda f: session.run(None, f), {name: data[i : i + step].astype(np.float32)})[0].argmax(-1)
            for i in range(0, len(data), step)
        ]
    )
    reference = labels if labels is not None else float_top1
    metric = "accuracy" if labels is not None else "agreement"
    float_accuracy = 100.0 * float((float_top1 == reference).mean())
    result = MixedPrecision(metric, float_accuracy)
    # Worst own error first; layers that add nothing measurable and finally the inputs themselves come last, so
    # a budget can end with everything int16.
    ranking = [layer.tensor for layer in analyze(model, table, data, target).worst()]
    ranking += [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    granularity, method = table.metadata.get("granularity", "per-tensor"), table.metadata.get("method", "minmax")
    calibration = calibration_data if calibration_data is not None else data

    def calibrate(int16_layers: list[str]) -> QuantTable:
        return calibrate_model(model, calibration, 8, granularity, method, int16_layers=int16_layers).table

    # The all-int8 baseline is calibrated on the same data as every mixed step, so the steps compare fairly.
    accuracy, size = _top1(model, calibrate([]), target, data, reference)
    result.steps.append(PrecisionStep([], accuracy, size))
    plan = ranking[:count] if count is not None else ranking
    chosen: list[str] = []
    for layer in plan:
        if budget is not None and float_accuracy - result.steps[-1].accuracy <= budget:
            break
        chosen.append(layer)
        if count is not None and len(chosen) < len(plan):
            continue  # a fixed count is evaluated once, with all its layers
        result.table = calibrate(chosen)
        accuracy, size = _top1(model, result.table, target, data, reference)
        result.steps.append(PrecisionStep(list(chosen), accuracy, size))
    return result
