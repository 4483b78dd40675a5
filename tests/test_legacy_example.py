"""Espressif's legacy quantization example, run as written against espquant.

``tools/quantization_tool/examples/example.py`` of esp-dl (commit a95b00ea, November 2021) optimizes
``mnist_model_example.onnx`` (a tf2onnx MLP: input ``[unk__9, 28, 28]``, Reshape to ``[-1, 784]``, three
MatMul + Add layers with Relu between them), calibrates it at int16, exports C++ coefficients for the ESP32-S3
and compares the simulated chip's accuracy with the float model's. Its body is repeated below call for call,
with ``from espquant import *`` in place of the legacy ``optimizer`` / ``calibrator`` / ``evaluator`` modules
(the legacy ``from optimizer import *`` also brought ``pickle``; here it is imported).

The model is built in code with the same graph, names and dynamic batch as Espressif's file, with weights that
classify a synthetic ten-class image set; when the original file is available (``shared/legacy-toolkit``) it is
run too.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as rt
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import shared_dir
from espquant import *  # noqa: F403 - the legacy example's import style is what is under test

_LAYERS = (("dense", 784, 128), ("dense_1", 128, 64), ("dense_2", 64, 10))
_IMAGES = 5000  # the example calibrates on test_images[0:5000:50]: 100 of them, as with MNIST


def _synthetic_digits(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` uint8 28x28 images of ten classes (a blurred random stroke pattern each, shifted by up to two
    pixels, with varying contrast and noise) and their labels."""
    prototypes = rng.random((10, 30, 30)) ** 4
    for _ in range(2):  # blur, so shifted images of one class stay alike
        prototypes = (prototypes + np.roll(prototypes, 1, 1) + np.roll(prototypes, 1, 2)) / 3
    prototypes /= prototypes.max(axis=(1, 2), keepdims=True)
    labels = rng.integers(0, 10, count)
    dy, dx = rng.integers(0, 3, count), rng.integers(0, 3, count)
    images = np.stack([prototypes[c, y : y + 28, x : x + 28] for c, y, x in zip(labels, dy, dx)])
    images = images * rng.uniform(180, 255, (count, 1, 1)) + rng.normal(0, 70, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _fit_weights(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Dense weights that classify ``images``, without a training loop: the first layer projects on the 64
    principal directions (both signs, so its Relu loses nothing), the second is random (He init), and the
    output layer is the least-squares fit of one-hot logits on the second layer's features."""
    x = images.reshape(len(images), -1) / 255.0
    mean = x.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    principal = vectors[:, ::-1][:, :64]
    w1 = np.hstack([principal, -principal])
    b1 = -mean @ w1
    w2, b2 = rng.normal(0, np.sqrt(2.0 / 128), (128, 64)), rng.normal(0, 0.05, 64)
    features = np.maximum(np.maximum(x @ w1 + b1, 0) @ w2 + b2, 0)
    features = np.hstack([features, np.ones((len(x), 1))])
    targets = np.eye(10)[labels] * 4 - 2  # logits of about +-2
    solution = np.linalg.solve(features.T @ features + 1e-2 * np.eye(features.shape[1]), features.T @ targets)
    return _like_espressif([w1, b1, w2, b2, solution[:-1], solution[-1]])


def _like_espressif(weights: list[np.ndarray]) -> list[np.ndarray]:
    """The same classifier with every layer's largest weight at 0.75, as in Espressif's trained file (all three
    filters at int16 exponent -15): layer l scaled by a_l / a_(l-1), its bias by a_l. Relu commutes with
    positive scales, so hidden activations scale by a_l and the logits by a_3: the argmax does not change."""
    scaled, previous = [], 1.0
    for w, b in zip(weights[::2], weights[1::2]):
        factor = 0.75 * previous / np.abs(w).max()
        scaled += [w * factor / previous, b * factor]
        previous = factor
    return [w.astype(np.float32) for w in scaled]


def _tf2onnx_mlp(weights: list[np.ndarray]) -> onnx.ModelProto:
    """The graph of Espressif's ``mnist_model_example.onnx`` as tf2onnx 1.8.4 wrote it (names included)."""
    nodes = [helper.make_node("Reshape", ["input", "const_fold_opt__8"], ["sequential/flatten/Reshape:0"])]
    nodes[0].name = "sequential/flatten/Reshape"
    inits = [numpy_helper.from_array(np.array([-1, 784], np.int64), "const_fold_opt__8")]
    previous = "sequential/flatten/Reshape:0"
    for index, (layer, _, _) in enumerate(_LAYERS):
        scope = f"sequential/{layer}"
        weight, bias = f"{scope}/MatMul/ReadVariableOp:0", f"{scope}/BiasAdd/ReadVariableOp:0"
        inits += [
            numpy_helper.from_array(weights[2 * index], weight),
            numpy_helper.from_array(weights[2 * index + 1], bias),
        ]
        last = index == len(_LAYERS) - 1
        added = "output" if last else f"{scope}/BiasAdd:0"
        nodes += [
            helper.make_node("MatMul", [previous, weight], [f"{scope}/MatMul:0"], name=f"{scope}/MatMul"),
            helper.make_node("Add", [f"{scope}/MatMul:0", bias], [added], name=f"{scope}/BiasAdd"),
        ]
        previous = added
        if not last:
            nodes.append(helper.make_node("Relu", [added], [f"{scope}/Relu:0"], name=f"{scope}/Relu"))
            previous = f"{scope}/Relu:0"
    graph = helper.make_graph(
        nodes,
        "tf2onnx",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["unk__9", 28, 28])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["unk__10", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    model.producer_version = "1.8.4"
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _legacy_example() -> tuple[float, float, Any, Any]:
    """The body of Espressif's ``example.py`` (``if __name__ == "__main__":``), call for call; returns the int16
    and float accuracies it prints, its Evaluator and its onnxruntime session."""
    # Optimize the onnx model
    model_path = "mnist_model_example.onnx"
    optimized_model_path = optimize_fp_model(model_path)  # noqa: F405

    # Calibration
    with open("mnist_test_data.pickle", "rb") as f:
        (test_images, test_labels) = pickle.load(f)
    test_images = test_images / 255.0

    # Prepare the calibration dataset
    calib_dataset = test_images[0:5000:50]
    pickle_file_path = "mnist_calib.pickle"
    model_proto = onnx.load(optimized_model_path)

    print("Generating the quantization table:")
    calib = Calibrator("int16", "per-tensor", "minmax")  # noqa: F405
    calib.set_providers(["CPUExecutionProvider"])
    calib.generate_quantization_table(model_proto, calib_dataset, pickle_file_path)
    calib.export_coefficient_to_cpp(model_proto, pickle_file_path, "esp32s3", ".", "test_mnist", True)

    # Evaluate the performance
    print("Evaluating the performance on esp32s3:")
    eva = Evaluator("int16", "per-tensor", "esp32s3")  # noqa: F405
    eva.set_providers(["CPUExecutionProvider"])
    eva.generate_quantized_model(model_proto, pickle_file_path)

    output_names = [n.name for n in model_proto.graph.output]
    providers = ["CPUExecutionProvider"]
    m = rt.InferenceSession(optimized_model_path, providers=providers)

    batch_size = 100
    batch_num = int(len(test_images) / batch_size)
    res = 0
    fp_res = 0
    input_name = m.get_inputs()[0].name
    for i in range(batch_num):
        # int8_model
        [outputs, _] = eva.evalute_quantized_model(test_images[i * batch_size : (i + 1) * batch_size], False)
        res = res + sum(np.argmax(outputs[0], axis=1) == test_labels[i * batch_size : (i + 1) * batch_size])

        # floating-point model
        fp_outputs = m.run(
            output_names, {input_name: test_images[i * batch_size : (i + 1) * batch_size].astype(np.float32)}
        )
        fp_res = fp_res + sum(np.argmax(fp_outputs[0], axis=1) == test_labels[i * batch_size : (i + 1) * batch_size])

    print("accuracy of int8 model is: %f" % (res / len(test_images)))
    print("accuracy of fp32 model is: %f" % (fp_res / len(test_images)))
    return res / len(test_images), fp_res / len(test_images), eva, m


def _espressif_model() -> Path | None:
    path = shared_dir() / "legacy-toolkit" / "examples" / "mnist_model_example.onnx"
    return path if path.is_file() else None


@pytest.mark.parametrize("source", ["built", "espressif"])
def test_legacy_mnist_example_runs_as_written(tmp_path, monkeypatch, source):
    rng = np.random.default_rng(2021)
    images, labels = _synthetic_digits(rng, _IMAGES + 2000)
    test_images, test_labels = images[:_IMAGES], labels[:_IMAGES]
    fit = (images[_IMAGES:], labels[_IMAGES:])
    if source == "built":
        model = _tf2onnx_mlp(_fit_weights(rng, *fit))
        onnx.save(model, tmp_path / "mnist_model_example.onnx")
    else:
        original = _espressif_model()
        if original is None:
            pytest.skip("shared/legacy-toolkit (Espressif's original example model) is not available")
        shutil.copyfile(original, tmp_path / "mnist_model_example.onnx")
        (tmp_path / "mnist_model_example.onnx").chmod(0o644)
        # No MNIST here: label the synthetic images with the float model's own answers.
        session = rt.InferenceSession(str(original), providers=["CPUExecutionProvider"])
        test_labels = np.argmax(session.run(None, {"input": test_images / np.float32(255.0)})[0], axis=1)
    with open(tmp_path / "mnist_test_data.pickle", "wb") as f:
        pickle.dump((test_images, test_labels), f)
    monkeypatch.chdir(tmp_path)

    int16_accuracy, float_accuracy, eva, session = _legacy_example()

    optimized = onnx.load(tmp_path / "mnist_model_example_optimized.onnx")
    assert [n.op_type for n in optimized.graph.node] == ["Reshape", "Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert optimized.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays dynamic
    for name in ("mnist_calib.pickle", "test_mnist.cpp", "test_mnist.hpp", "test_mnist_model.hpp"):
        assert (tmp_path / name).stat().st_size > 0, name
    model_header = (tmp_path / "test_mnist_model.hpp").read_text()
    assert model_header.count("dl::layer::FullyConnected<int16_t>") == 3 and "Flatten<int16_t>" in model_header
    assert "{28, 28, 1}" in model_header  # the [unk__9, 28, 28] input is one channel of 28 x 28
    assert float_accuracy >= (0.93 if source == "built" else 1.0)
    assert int16_accuracy >= float_accuracy - 0.005
    # The simulated int16 chip computes the float logits up to its rounding, sample by sample.
    x = test_images / 255.0
    [quantized], _ = eva.evalute_quantized_model(x, True)
    [expected] = session.run(None, {"input": x.astype(np.float32)})
    # (a few samples lie outside the 100 calibration samples' range and saturate: the median, not the maximum)
    assert np.median(np.abs(quantized - expected)) <= 1e-3 * np.abs(expected).max()
    assert np.mean(np.argmax(quantized, axis=1) == np.argmax(expected, axis=1)) >= 0.995


def test_unfused_bias_add_is_refused_with_its_real_shapes(tmp_path):
    # Without the MatMul + Add fusion the legacy exporter meets an Add of a (batch, 128) tensor and a constant
    # (128,) bias; its message shows those ONNX shapes, not the batch-less [(128,), ()] it used to print.
    from espquant.errors import UnsupportedModelError
    from espquant.optimizer import PASSES, optimize_model

    rng = np.random.default_rng(7)
    images, labels = _synthetic_digits(rng, 300)
    model = _tf2onnx_mlp(_fit_weights(rng, images[100:], labels[100:]))
    unfused = optimize_model(model, [p.name for p in PASSES if p.name != "fuse_matmul_add_bias_into_gemm"])
    assert "Gemm" not in [n.op_type for n in unfused.graph.node]
    table = tmp_path / "t.pickle"
    calib = Calibrator("int16", "per-tensor", "minmax")  # noqa: F405
    calib.generate_quantization_table(unfused, images[:100] / 255.0, table)
    with pytest.raises(UnsupportedModelError, match=r"input shapes \[\w+, 128\] and \[128\]: the legacy Add2D"):
        calib.export_coefficient_to_cpp(unfused, table, "esp32s3", tmp_path, "unfused")
