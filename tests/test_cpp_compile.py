"""The exported C++ compiles against the legacy ESP-DL library's own headers, per library version.

For every op the legacy exporter writes (``_HANDLERS`` of export/cpp/planner.py), a tiny ONNX model is calibrated
(int8, int16, int8 per-channel for the weighted layers), exported for each library version (``1.1``: esp-dl tag
``v1.1.0``, whose ``include/layer`` equals commit ``a95b00ea``; ``2.0``: tag ``v2.0``) and compiled with the host
g++ against that tag's ``include/`` tree, extracted from esp-dl's git history (``$ESPDL_GIT``, default the mirror
below): the coefficient ``.cpp`` and a main ``.cpp`` that includes the model header, builds and calls the model as
the legacy examples do. What a version refuses must be refused by the exporter, naming the version and the
header, and the refusal must be real: the same layer, spelled for that version, does not compile there.

Host adaptations, both declarations only: the ESP-IDF headers the library includes are stubbed (``_STUBS``), and
the library's ``(uint32_t)pointer`` casts (cache preload in Conv2D and the pools; fine on the 32-bit chips, an
error on a 64-bit host) are the one error tolerated, and only inside the library's headers.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from espquant import Calibrator
from espquant.errors import UnsupportedModelError
from espquant.export.cpp import LIBRARY_VERSIONS, export_coefficient_to_cpp
from espquant.export.cpp.planner import _HANDLERS
from helpers import make_model, tensor

ESPDL_GIT = Path(os.environ.get("ESPDL_GIT", "/work/.mirror/espressif+esp-dl/repo"))
GXX = shutil.which("g++")
GIT = shutil.which("git")

pytestmark = [
    pytest.mark.heavy,  # minutes of g++ on two cores: with the heavy checks (`pytest -m heavy`, run by .ci/run)
    pytest.mark.skipif(GXX is None, reason="g++ is not installed: the generated C++ cannot be compiled here"),
    pytest.mark.skipif(GIT is None, reason="git is not installed: the legacy headers cannot be extracted"),
    pytest.mark.skipif(
        not (ESPDL_GIT / "HEAD").exists() and not (ESPDL_GIT / ".git").exists(),
        reason=f"no esp-dl git repository at {ESPDL_GIT} (set ESPDL_GIT): the legacy headers are not available",
    ),
]

# The include directories esp-dl's CMakeLists.txt (v1.1.0, v2.0) adds, relative to the component.
_INCLUDE_DIRS = ["include", "include/tool", "include/typedef", "include/image", "include/math", "include/nn",
                 "include/layer", "include/detect", "include/model_zoo"]  # fmt: skip

# Minimal ESP-IDF headers, declarations only: what the legacy headers use from them.
_STUBS = {
    "esp_system.h": "#pragma once\n// ESP-IDF's esp_system.h reaches these through esp_err.h.\n"
    "#include <stddef.h>\n#include <stdint.h>\n",
    "esp_timer.h": '#pragma once\n#include <stdint.h>\nextern "C" int64_t esp_timer_get_time(void);\n',
    "esp_heap_caps.h": "#pragma once\n#include <stddef.h>\n#include <stdint.h>\n"
    "#define MALLOC_CAP_8BIT (1 << 2)\n#define MALLOC_CAP_SPIRAM (1 << 10)\n#define MALLOC_CAP_INTERNAL (1 << 11)\n"
    'extern "C" {\nvoid *heap_caps_malloc(size_t size, uint32_t caps);\n'
    "void *heap_caps_aligned_alloc(size_t alignment, size_t size, uint32_t caps);\n"
    "void heap_caps_free(void *ptr);\nsize_t heap_caps_get_free_size(uint32_t caps);\n}\n",
    # ESP-IDF's FreeRTOS.h reaches esp_heap_caps.h through its port layer (portmacro.h).
    "freertos/FreeRTOS.h": '#pragma once\n#include "esp_heap_caps.h"\n',
    "esp32s3/rom/cache.h": "#pragma once\n",  # included by dl_tool_cache.hpp on ESP32-S3; nothing used
    "soc/extmem_reg.h": "#pragma once\n",
}
_SDKCONFIG = {"esp32": "CONFIG_IDF_TARGET_ESP32", "esp32s3": "CONFIG_IDF_TARGET_ESP32S3"}
_TOLERATED = re.compile(r"error: cast from '[^']*\*' to 'uint32_t' \{aka '[^']*'\} loses precision \[-fpermissive\]")


# --- the legacy headers and the stubs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def headers(tmp_path_factory) -> dict[str, Path]:
    """version -> the root of its extracted esp-dl ``include/`` tree (``git archive <tag> include``)."""
    roots = {}
    for name, version in LIBRARY_VERSIONS.items():
        root = tmp_path_factory.mktemp(f"esp-dl-{version.tag}")
        archive = subprocess.run(
            [GIT, "-C", str(ESPDL_GIT), "archive", version.tag, "include"], capture_output=True, timeout=120
        )
        if archive.returncode != 0:
            pytest.skip(f"{ESPDL_GIT} has no tag {version.tag}: {archive.stderr.decode(errors='replace')[:200]}")
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python < 3.10.12: no filters
            tar.extractall(root, **safe)  # noqa: S202 - our own git archive of one tag
        roots[name] = root
    return roots


def _stubs(folder: Path, target: str) -> Path:
    stubs = folder / "idf_stubs"
    for name, text in {**_STUBS, "sdkconfig.h": f"#pragma once\n#define {_SDKCONFIG[target]} 1\n"}.items():
        (stubs / name).parent.mkdir(parents=True, exist_ok=True)
        (stubs / name).write_text(text)
    return stubs


def compile_errors(root: Path, folder: Path, sources: list[Path], target: str) -> list[str]:
    """g++ -fsyntax-only on ``sources`` against the headers under ``root``: the error lines, minus the tolerated
    pointer casts inside the library. The generated files (``-I folder``) compile with -Wall -Werror; the library's
    own host warnings (``%d`` for size_t ...) are not the exporter's and are silenced as system headers."""
    includes = [f"-isystem{root / d}" for d in _INCLUDE_DIRS if (root / d).is_dir()]
    command = [GXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-isystem{_stubs(folder, target)}",
               *includes, f"-I{folder}", *map(str, sources)]  # fmt: skip
    env = {**os.environ, "LC_ALL": "C"}  # plain quotes in the diagnostics
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in result.stderr.splitlines() if ": error:" in line or ": fatal error:" in line]
    left = [e for e in errors if not (e.startswith(str(root)) and _TOLERATED.search(e))]
    if result.returncode != 0 and not errors:
        left = result.stderr.splitlines() or [f"g++ exited with {result.returncode}"]
    return left


def write_main(folder: Path, file_name: str) -> Path:
    """A main.cpp as the legacy examples write it: the model built once, then called, on a tensor of the input
    shape and exponent the model header documents."""
    text = (folder / f"{file_name}_model.hpp").read_text()
    cls, ctype = re.search(r"^class (\w+) : public dl::layer::Model<(\w+)>", text, re.M).groups()
    shape = re.search(r"Input: a dl::Tensor<\w+> of shape (\{[\d, ]+,?\})", text).group(1)
    main = folder / "main.cpp"
    main.write_text(
        f'#include "{file_name}_model.hpp"\n\n'
        "int main()\n{\n"
        f"    dl::Tensor<{ctype}> input;\n"
        f"    input.set_exponent({cls}::input_exponent).set_shape({shape}).malloc_element();\n"
        f"    {cls} model;\n"
        "    model.build(input);\n"
        "    model.call(input);\n"
        "    return 0;\n}\n"
    )
    return main


# --- one tiny model per exported op ------------------------------------------------------------------------------


def _w(rng, *shape: int) -> np.ndarray:
    return rng.normal(0, 0.3, shape).astype(np.float32)


def _model(rng, op: str) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A tiny model around ``op`` (a name of OPS) and its input shape without the batch dimension."""
    x4, y4 = tensor("x", ["N", 4, 6, 6]), lambda c=4, s=6: tensor("y", ["N", c, s, s])
    conv = helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="conv_a", kernel_shape=[1, 1])
    conv_b = helper.make_node("Conv", ["x", "Wb"], ["b"], name="conv_b", kernel_shape=[1, 1])
    pair = {"Wa": _w(rng, 4, 4, 1, 1), "Ba": _w(rng, 4), "Wb": _w(rng, 4, 4, 1, 1)}
    if op == "conv":  # Conv2D with padding, stride, bias and a fused Relu
        nodes = [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ]
        return make_model(nodes, [x4], [y4(3, 3)], {"W": _w(rng, 3, 4, 3, 3), "B": _w(rng, 3)}), (4, 6, 6)
    if op == "depthwise":
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="dw", group=4, pads=[1, 1, 1, 1])
        return make_model([node], [x4], [y4()], {"W": _w(rng, 4, 1, 3, 3), "B": _w(rng, 4)}), (4, 6, 6)
    if op in ("gemm", "matmul"):
        node = (
            helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", transB=1)
            if op == "gemm"
            else helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
        )
        inits = {"W": _w(rng, 5, 8), "B": _w(rng, 5)} if op == "gemm" else {"W": _w(rng, 8, 5)}
        return make_model([node], [tensor("x", ["N", 8])], [tensor("y", ["N", 5])], inits), (8,)
    if op in ("add", "sub", "mul"):
        node = helper.make_node(op.capitalize(), ["a", "b"], ["y"], name=op)
        return make_model([conv, conv_b, node], [x4], [y4()], pair), (4, 6, 6)
    if op == "relu":  # after an Add: a Relu after a Conv is fused into it
        nodes = [
            conv,
            conv_b,
            helper.make_node("Add", ["a", "b"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["y"], name="relu"),
        ]
        return make_model(nodes, [x4], [y4()], pair), (4, 6, 6)
    if op in ("leaky_relu", "prelu"):  # on the (non-negative) input, so that the exponent stays as the layer needs
        if op == "leaky_relu":
            node, inits = helper.make_node("LeakyRelu", ["x"], ["y"], name="leaky", alpha=0.125), {}
        else:
            node = helper.make_node("PRelu", ["x", "slope"], ["y"], name="prelu")
            inits = {"slope": np.full((4, 1, 1), 0.25, np.float32)}
        return make_model([node], [x4], [y4()], inits), (4, 6, 6)
    if op in ("max_pool", "avg_pool"):
        kind = "MaxPool" if op == "max_pool" else "AveragePool"
        node = helper.make_node(kind, ["a"], ["y"], name=op, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        if op == "avg_pool":
            node.attribute.append(helper.make_attribute("count_include_pad", 1))
        inits = {k: v for k, v in pair.items() if k != "Wb"}
        return make_model([conv, node], [x4], [y4(4, 3)], inits), (4, 6, 6)
    if op == "global_avg_pool":
        node = helper.make_node("GlobalAveragePool", ["a"], ["y"], name="gap")
        inits = {k: v for k, v in pair.items() if k != "Wb"}
        return make_model([conv, node], [x4], [y4(4, 1)], inits), (4, 6, 6)
    if op == "concat":
        node = helper.make_node("Concat", ["a", "a"], ["y"], name="concat", axis=1)
        inits = {k: v for k, v in pair.items() if k != "Wb"}
        return make_model([conv, node], [x4], [y4(8)], inits), (4, 6, 6)
    if op in ("flatten", "reshape"):  # then a FullyConnected, as in a classifier
        first = (
            helper.make_node("Flatten", ["a"], ["f"], name="flatten")
            if op == "flatten"
            else helper.make_node("Reshape", ["a", "shape"], ["f"], name="reshape")
        )
        inits = {k: v for k, v in pair.items() if k != "Wb"}
        inits |= {"Wf": _w(rng, 144, 3)} | ({"shape": np.array([-1, 144], np.int64)} if op == "reshape" else {})
        nodes = [conv, first, helper.make_node("MatMul", ["f", "Wf"], ["y"], name="fc")]
        return make_model(nodes, [x4], [tensor("y", ["N", 3])], inits), (4, 6, 6)
    raise AssertionError(op)


# op -> the legacy layer kinds its model exports (the planner's names); every handler in _HANDLERS is covered.
OPS = {
    "conv": ("Conv2D",),
    "depthwise": ("DepthwiseConv2D",),
    "gemm": ("FullyConnected",),
    "matmul": ("FullyConnected",),
    "add": ("Conv2D", "Add2D"),
    "sub": ("Conv2D", "Sub2D"),
    "mul": ("Conv2D", "Mul2D"),
    "relu": ("Conv2D", "Add2D", "Relu"),
    "leaky_relu": ("LeakyRelu",),
    "prelu": ("PRelu",),
    "max_pool": ("Conv2D", "MaxPool2D"),
    "avg_pool": ("Conv2D", "AvgPool2D"),
    "global_avg_pool": ("Conv2D", "GlobalAveragePool2D"),
    "concat": ("Conv2D", "Concat"),
    "flatten": ("Conv2D", "Flatten", "FullyConnected"),
    "reshape": ("Conv2D", "Flatten", "FullyConnected"),
}
_ONNX_OPS = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool",
             "GlobalAveragePool", "Concat", "Flatten", "Reshape"}  # fmt: skip
# Calibration modes: int8 and int16 for every op, int8 per-channel where a layer has weights; esp32 (plain filter
# order, its own sdkconfig) next to esp32s3 (SIMD-blocked order) for the weighted layers at int8.
_WEIGHTED = ("conv", "depthwise", "gemm", "matmul")
MODES = [("int8", "per-tensor"), ("int16", "per-tensor"), ("int8", "per-channel")]
CASES = [
    (version, op, bits, granularity, target)
    for version in LIBRARY_VERSIONS
    for op in OPS
    for bits, granularity in MODES
    if granularity == "per-tensor" or op in _WEIGHTED
    for target in (["esp32s3", "esp32"] if op in _WEIGHTED and bits == "int8" else ["esp32s3"])
]


def test_every_exported_op_is_covered():
    """Each handler of the planner is exercised here (Identity / RequantizeLinear write no layer)."""
    assert set(_HANDLERS) - {"Identity", "RequantizeLinear"} == _ONNX_OPS


def _export(tmp_path: Path, op: str, bits: str, granularity: str, target: str, version: str) -> Path:
    rng = np.random.default_rng(7)
    model, shape = _model(rng, op)
    # Non-negative data: the pass-through layers (Relu, LeakyRelu, PRelu, MaxPool ...) keep their exponent.
    data = rng.uniform(0, 1, (16, *shape)).astype(np.float32)
    table = Calibrator(bits, granularity, "minmax").calibrate(model, data).table
    out = tmp_path / "out"
    export_coefficient_to_cpp(model, table, target, out, f"{op}_coefficient", library_version=version)
    return out


@pytest.mark.parametrize("version,op,bits,granularity,target", CASES, ids=["-".join(case) for case in CASES])
def test_exported_op_compiles_or_is_refused(headers, tmp_path, version, op, bits, granularity, target):
    refused = {kind: api.refused for kind in OPS[op] if (api := LIBRARY_VERSIONS[version].api(kind)).refused}
    if refused:
        with pytest.raises(UnsupportedModelError) as info:
            _export(tmp_path, op, bits, granularity, target, version)
        for reason in refused.values():
            assert reason in str(info.value)
            assert re.search(r"ESP-DL v\d\.\d's \w+ does not compile \(dl_layer_\w+\.hpp:\d+", reason)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        return
    out = _export(tmp_path, op, bits, granularity, target, version)
    name = f"{op}_coefficient"
    model_hpp = (out / f"{name}_model.hpp").read_text()
    api = LIBRARY_VERSIONS[version]
    for kind in OPS[op]:
        assert f"dl::layer::{api.api(kind).cls}<" in model_hpp
        assert f'#include "{api.api(kind).header}"' in model_hpp
    errors = compile_errors(headers[version], out, [out / f"{name}.cpp", write_main(out, name)], target)
    assert not errors, f"{op} for ESP-DL v{version} ({bits} {granularity}, {target}) does not compile:\n" + "\n".join(
        errors
    )


@pytest.mark.parametrize("op", [op for op in OPS if any(LIBRARY_VERSIONS["1.1"].api(k).refused for k in OPS[op])])
def test_refused_layers_really_do_not_compile_in_that_version(headers, tmp_path, op):
    """The v2.0 export of a layer v1.1 refuses, with the class spelled as v1.1 spells it, fails to compile against
    the v1.1 headers inside the header the refusal names (not in the generated code); it compiles against v2.0's."""
    out = _export(tmp_path, op, "int8", "per-tensor", "esp32s3", "2.0")
    name = f"{op}_coefficient"
    main = write_main(out, name)
    assert not compile_errors(headers["2.0"], out, [main], "esp32s3")
    model_hpp = out / f"{name}_model.hpp"
    text = model_hpp.read_text()
    for kind in OPS[op]:
        text = text.replace(f"dl::layer::{kind}<", f"dl::layer::{LIBRARY_VERSIONS['1.1'].api(kind).cls}<")
    model_hpp.write_text(text)
    errors = compile_errors(headers["1.1"], out, [main], "esp32s3")
    kind = next(k for k in OPS[op] if LIBRARY_VERSIONS["1.1"].api(k).refused)
    header, line = re.search(r"\((dl_layer_\w+\.hpp):(\d+)", LIBRARY_VERSIONS["1.1"].api(kind).refused).groups()
    assert errors, f"{op}: v1.1's {kind} compiled"
    assert all(f"/include/layer/{header}:" in e for e in errors), "\n".join(errors)
    assert any(f"/include/layer/{header}:{line}:" in e for e in errors), "\n".join(errors)


def test_v11_builds_relu_and_flatten_in_place(tmp_path):
    """v1.1's ReLU / Flatten allocate no output out of place (versions.py): the exporter passes ``inplace = true``
    (the constructor's argument after the name) and frees the shared tensor once, after its last reader."""
    out = _export(tmp_path, "relu", "int8", "per-tensor", "esp32s3", "1.1")
    text = (out / "relu_coefficient_model.hpp").read_text()
    assert re.search(r'relu\("relu", true\)', text)
    assert "dl::layer::ReLU<int8_t> relu;" in text
    assert "this->relu.get_output().free_element();" not in text  # the output: the Add's tensor, kept
    out = _export(tmp_path / "f", "flatten", "int8", "per-tensor", "esp32s3", "1.1")
    text = (out / "flatten_coefficient_model.hpp").read_text()
    assert re.search(r'flatten\("flatten", true\)', text)
    call = text[text.index("void call(") :]
    assert call.index("this->fc.call(this->flatten.get_output());") < call.index(
        "this->conv_a.get_output().free_element();"
    )
    assert "this->flatten.get_output().free_element();" not in call
