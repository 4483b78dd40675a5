"""The embedded demo: a real trained model and real digits ship inside the package, and `espquant demo` runs."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from click.testing import CliRunner

from espquant.cli import main
from espquant.demo import demo_model_path, float_accuracy, load_demo_data


def test_demo_data_shapes_and_types():
    data = load_demo_data()
    assert data.calib_images.shape == (1000, 28, 28) and data.calib_images.dtype == np.uint8
    assert data.test_images.shape == (2000, 28, 28) and data.test_images.dtype == np.uint8
    assert data.test_labels.shape == (2000,) and set(np.unique(data.test_labels)) == set(range(10))
    inputs = data.test_inputs
    assert inputs.shape == (2000, 1, 28, 28) and inputs.dtype == np.float32
    assert inputs.min() >= 0.0 and inputs.max() < 1.0


def test_demo_model_has_the_promised_architecture():
    model = onnx.load(demo_model_path())
    ops = [n.op_type for n in model.graph.node]
    for op in ("Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Flatten", "Gemm"):
        assert op in ops, op
    depthwise = [
        n for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert depthwise
    assert ops[0] == "Conv"  # no normalisation inside the model
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_demo_model_is_really_trained():
    data = load_demo_data()
    assert float_accuracy(demo_model_path().read_bytes(), data.test_inputs, data.test_labels) >= 98.0


def test_demo_command(tmp_path):
    packaged = hashlib.sha256(demo_model_path().read_bytes()).hexdigest()
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "BatchNormalization -4" in result.output
    data = load_demo_data()
    accuracy = float_accuracy(demo_model_path().read_bytes(), data.test_inputs, data.test_labels)
    assert result.output.count(f"{accuracy:.2f}%") >= 2  # original and optimized, identical
    import re

    simulated = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"(int(?:8|16) on esp32\w+) \(simulated\)\s*│\s*([\d.]+)%", result.output)
    }
    assert len(simulated) == 6, result.output
    for label, value in simulated.items():  # the design's bar: int8 within 0.5 points, int16 within 0.05
        assert value >= accuracy - (0.5 if label.startswith("int8") else 0.05), label
    optimized = onnx.load(tmp_path / "demo" / "demo_mnist_cnn_optimized.onnx")
    assert "BatchNormalization" not in [n.op_type for n in optimized.graph.node]
    assert hashlib.sha256(demo_model_path().read_bytes()).hexdigest() == packaged
