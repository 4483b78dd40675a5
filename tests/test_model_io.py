"""Bad input gets a clear error naming the path, the input model is never modified, writes are atomic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from espquant import optimize_fp_model
from espquant.errors import EspquantError, ModelError, OptionError, OutputError
from espquant.files import atomic_write_bytes
from espquant.model_io import load_model
from espquant.optimizer import convert_model_batch_to_dynamic, fix_input_shapes
from helpers import bn_node, bn_params, make_model, op_types, tensor


def _conv_bn_model(rng) -> onnx.ModelProto:
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), **bn_params(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y")]
    return make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])], inits)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_optimize_fp_model_writes_next_to_input_and_keeps_input(tmp_path, rng):
    source = tmp_path / "net.onnx"
    onnx.save(_conv_bn_model(rng), source)
    before = _digest(source)
    out = optimize_fp_model(str(source))
    assert out == str(tmp_path / "net_optimized.onnx")
    assert _digest(source) == before
    assert op_types(onnx.load(out)) == ["Conv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net_optimized.onnx"]  # no temp files


def test_optimize_fp_model_with_output_path(tmp_path, rng):
    source = tmp_path / "net.onnx"
    onnx.save(_conv_bn_model(rng), source)
    target = tmp_path / "out" / "clean.onnx"
    target.parent.mkdir()
    assert optimize_fp_model(source, target) == str(target)
    assert target.is_file()


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.onnx: no such file"):
        optimize_fp_model(tmp_path / "nope.onnx")


def test_not_an_onnx_path(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match=r"weights\.pt: expected an ONNX model file ending in '\.onnx'"):
        load_model(path)


def test_folder_and_empty_file(tmp_path):
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    with pytest.raises(ModelError, match="is a folder"):
        load_model(folder)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model(empty)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"this is not a protobuf \xff\xfe\x00 at all" * 10)
    with pytest.raises(ModelError, match=r"corrupt\.onnx: .*(corrupt|truncated)"):
        load_model(path)


@pytest.mark.parametrize(
    "op_type, opset, expected",
    [
        # tf2onnx --tflite on MediaPipe's selfie segmentation: its TFLite custom op, written in the ONNX domain
        ("TFL_Convolution2DTransposeBias", 14, r"TFL_Convolution2DTransposeBias is not an ONNX operator.*cannot run"),
        # tf2onnx --opset 13 writes HardSwish, which ONNX has only from opset 14
        ("HardSwish", 13, r"HardSwish is an ONNX operator only from opset 14.*opset 14 or later"),
    ],
)
def test_an_operator_onnx_does_not_know_is_named(tmp_path, op_type, opset, expected):
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x"], ["y"], name="n")],
        "g",
        [tensor("x", [1, 3, 4, 4])],
        [tensor("y", [1, 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / "converted.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=expected) as raised:
        load_model(path)
    assert "truncated" not in str(raised.value)


def test_truncated_file(tmp_path, rng):
    data = _conv_bn_model(rng).SerializeToString()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError, match=f"cut{cut}.onnx"):
            load_model(path)


def test_missing_external_data(tmp_path, rng):
    model = _conv_bn_model(rng)
    path = tmp_path / "ext.onnx"
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.weights",
        size_threshold=0,
    )
    assert load_model(path).graph.initializer  # loads fine with its data
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(ModelError, match=r"ext\.onnx: external weight data not found.*ext\.weights"):
        load_model(path)


def test_model_without_graph_inputs(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["w"], ["y"])],
        "g",
        [],
        [tensor("y", [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")],
    )
    path = tmp_path / "noinput.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelError, match=r"noinput\.onnx: the graph has no inputs"):
        load_model(path)


def test_output_equal_to_input_is_refused(tmp_path, rng):
    source = tmp_path / "net.onnx"
    onnx.save(_conv_bn_model(rng), source)
    before = _digest(source)
    with pytest.raises(OutputError, match="never overwrites its input"):
        optimize_fp_model(source, source)
    with pytest.raises(OutputError, match="never overwrites its input"):
        optimize_fp_model(source, tmp_path / "." / "net.onnx")
    assert _digest(source) == before


def test_output_folder_missing(tmp_path, rng):
    source = tmp_path / "net.onnx"
    onnx.save(_conv_bn_model(rng), source)
    with pytest.raises(OutputError, match="does not exist"):
        optimize_fp_model(source, tmp_path / "missing" / "out.onnx")


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_every_error_is_an_espquant_error():
    assert issubclass(ModelError, EspquantError) and issubclass(OptionError, EspquantError)


# --- shapes -------------------------------------------------------------------------------------------------


def test_convert_model_batch_to_dynamic(rng):
    model = _conv_bn_model(rng)
    dynamic = convert_model_batch_to_dynamic(model)
    assert dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert dynamic.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # argument untouched
    from helpers import run

    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    assert run(dynamic, {"x": x})[0].shape == (3, 4, 8, 8)


def test_fix_input_shapes_pins_dynamic_dims(rng):
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(
        nodes,
        [tensor("x", ["N", 3, "H", "W"])],
        [tensor("y", ["N", 4, "H", "W"])],
        {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)},
    )
    fixed = fix_input_shapes(model, {"x": [1, 3, 48, 192]})
    dims = [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 48, 192]
    assert [d.dim_value for d in fixed.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 48, 192]


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"y": [1, 3, 4, 4]}, "no such input; its inputs are x"),
        ({"x": [1, 3, 4]}, "rank 3 but the input has rank 4"),
        ({"x": [1, 5, 4, 4]}, "dimension 1 is fixed to 3"),
        ({"x": [1, 3, 0, 4]}, "non-positive"),
    ],
)
def test_fix_input_shapes_rejects_bad_shapes(rng, shapes, message):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor("x", ["N", 3, "H", "W"])],
        [tensor("y", ["N", 3, "H", "W"])],
    )
    with pytest.raises(OptionError, match=message):
        fix_input_shapes(model, shapes)


def test_convert_model_batch_to_dynamic_warns_about_batch_pinning_reshape(rng, caplog):
    nodes = [helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = make_model(nodes, [tensor("x", [1, 3, 4])], [tensor("y", [1, 12])], {"target": np.array([1, 12])})
    with caplog.at_level("WARNING", logger="espquant.optimizer.shapes"):
        convert_model_batch_to_dynamic(model)
    assert "fixes the batch to 1" in caplog.text


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """The temporary file is created 0600; the result must be readable like any file the user writes."""
    import os

    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"data")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644


def test_a_minus_one_dimension_is_dynamic_and_can_be_pinned_or_kept_as_n(tmp_path):
    """paddle2onnx writes a dynamic dimension as -1 (``[-1, 3, ?, ?]``): pinning it works, and 'N' keeps the
    batch dynamic while the plane becomes static."""
    from espquant.cli import main
    from espquant.graph import tensor_shape
    from espquant.optimizer.shapes import parse_input_shape

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert tensor_shape(model.graph.input[0]) == [None, 3, "h", "w"]
    pinned = fix_input_shapes(model, dict([parse_input_shape("x:1,3,48,192")]))
    assert tensor_shape(pinned.graph.input[0]) == [1, 3, 48, 192]
    batch = fix_input_shapes(model, dict([parse_input_shape("x:N,3,48,192")]))
    assert tensor_shape(batch.graph.input[0]) == ["N", 3, 48, 192]
    onnx.save(model, tmp_path / "ocr.onnx")
    result = CliRunner().invoke(main, ["optimize", str(tmp_path / "ocr.onnx"), "--input-shape", "x:N,3,48,192"])
    assert result.exit_code == 0, result.output
    assert tensor_shape(onnx.load(tmp_path / "ocr_optimized.onnx").graph.input[0]) == ["N", 3, 48, 192]
    with pytest.raises(OptionError, match="input:N,3,48,192"):
        parse_input_shape("x:1,3,4.5,2")
