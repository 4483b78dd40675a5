"""Tiny-model builders and an onnxruntime runner shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from espquant.runtime import create_session

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, value_info=()) -> onnx.ModelProto:
    """A checked model from helper-made pieces; initializers given as {name: array}."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()]
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits, value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if all(o.type.tensor_type.HasField("shape") for o in outputs):
        onnx.checker.check_model(model)
    return model


def tensor(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime's outputs without its graph optimisations (through espquant's session factory, so a test
    model stamped with the installed onnx's newest IR version also runs on an older onnxruntime)."""
    return create_session(model, optimize=False).run(None, feeds)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol=1e-5) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * max(1.0, float(np.abs(x).max())))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def bn_params(rng: np.random.Generator, channels: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {
        f"{prefix}_gamma": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        f"{prefix}_beta": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}_mean": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


def bn_node(x: str, y: str, prefix: str = "bn", epsilon: float = 1e-3) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}_gamma", f"{prefix}_beta", f"{prefix}_mean", f"{prefix}_var"],
        [y],
        epsilon=epsilon,
        name=f"{prefix}_node",
    )


RELU6_BOUND = 6.0


def relu6_block(rng: np.random.Generator) -> onnx.ModelProto:
    """A MobileNetV2-style block whose depthwise channels differ ~100x in range (BatchNorm folding does that),
    four stem channels reaching the ReLU6's clamp on N(0.5, 1) inputs:
    ``x[N,3,12,12] -> Conv -> Clip(0, 6) -> depthwise Conv -> Relu -> Conv -> y[N,4,12,12]``."""

    def conv(name: str, x: str, y: str, group: int = 1) -> onnx.NodeProto:
        return helper.make_node(
            "Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, kernel_shape=[3, 3], pads=[1] * 4, group=group
        )

    def clip(x: str, y: str) -> onnx.NodeProto:
        return helper.make_node("Clip", [x, "zero", "six"], [y], name=f"clip_{y}")

    w1 = rng.normal(0, 0.05, (16, 3, 3, 3)).astype(np.float32)
    w1[:4] *= 40  # channels that reach the clamp on the data
    w2 = rng.normal(0, 1, (16, 1, 3, 3)) * np.logspace(-2, 0, 16)[rng.permutation(16)].reshape(-1, 1, 1, 1)
    inits = {
        "c1.w": w1,
        "c1.b": rng.normal(0, 0.05, 16).astype(np.float32),
        "c2.w": w2.astype(np.float32),
        "c2.b": rng.normal(0, 0.05, 16).astype(np.float32),
        "c3.w": rng.normal(0, 0.2, (4, 16, 3, 3)).astype(np.float32),
        "c3.b": rng.normal(0, 0.05, 4).astype(np.float32),
        "zero": np.float32(0.0),
        "six": np.float32(RELU6_BOUND),
    }
    nodes = [
        conv("c1", "x", "a"),
        clip("a", "a6"),
        conv("c2", "a6", "b", group=16),
        helper.make_node("Relu", ["b"], ["b6"], name="relu_b"),
        conv("c3", "b6", "y"),
    ]
    return make_model(nodes, [tensor("x", ["N", 3, 12, 12])], [tensor("y", ["N", 4, 12, 12])], inits)
