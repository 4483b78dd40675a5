"""The original legacy toolkit's Evaluator (shared/legacy-toolkit, CPython 3.7 only) as a reference the tests run
in a subprocess: where its venv lives, how it is built (once, into a cache folder outside the repo), and how a
model, its exponents and inputs go in and every tensor of its quantized graph comes out.

Nothing here is espquant: the original is only ever run, never copied. Tests skip when the folder, a CPython 3.7
or the venv (built offline) is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from conftest import shared_dir

VENV = Path(os.environ.get("ESPQUANT_LEGACY_VENV", Path.home() / ".cache" / "espquant-legacy-venv37"))

# Runs under the venv's CPython 3.7: feeds the model, the scales and the inputs to the original Evaluator and
# saves its outputs plus every intermediate tensor of the quantized graph it builds (and the quantized input).
_RUNNER = r"""
import json, pickle, sys
import numpy as np, onnx
toolkit, model_path, table_path, bits, granularity, x_path, out_path = sys.argv[1:8]
sys.path[:0] = [toolkit + '/linux', toolkit]
from evaluator import Evaluator
scales = {k: (np.power(2.0, np.asarray(v, dtype=np.float64)) if array else 2.0 ** v[0])
          for k, (v, array) in json.load(open(table_path)).items()}
pickle_path = table_path + '.pickle'
pickle.dump(scales, open(pickle_path, 'wb'))
evaluator = Evaluator('int' + bits, granularity, 'esp32s3')
evaluator.generate_quantized_model(onnx.load(model_path), pickle_path)
graph = evaluator.quant_onnx_model.model.graph
declared = {o.name for o in graph.output}
for node in list(graph.node):
    for name in node.output:
        if name not in declared:
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
constants = {i.name for i in graph.initializer}
for info in list(graph.input):
    if info.name not in constants:
        graph.node.insert(0, onnx.helper.make_node('Identity', [info.name], [info.name + '::quantized']))
        graph.output.append(onnx.helper.make_tensor_value_info(info.name + '::quantized', onnx.TensorProto.FLOAT, None))
outputs, names = evaluator.evalute_quantized_model(np.load(x_path), False)
np.savez(out_path, **{'t%d' % i: v for i, v in enumerate(outputs)})
json.dump(names, open(out_path + '.names.json', 'w'))
"""


def toolkit_dir() -> Path:
    return shared_dir() / "legacy-toolkit"


def _python37() -> Path | None:
    found = os.environ.get("PY37")
    candidates = [Path(found)] if found else sorted((Path.home() / ".pyenv" / "versions").glob("3.7*/bin/python"))
    return next((c for c in candidates if c.is_file()), None)


def legacy_python() -> tuple[Path | None, str]:
    """The venv's python, building the venv with the toolkit's ``setup_venv.sh`` when missing; else None and
    the reason (the caller skips)."""
    python = VENV / "bin" / "python"
    toolkit = toolkit_dir()
    if not (toolkit / "linux" / "evaluator.so").is_file():
        return None, f"{toolkit} (the original legacy toolkit) is not available"
    if python.is_file() and _imports(python, toolkit):
        return python, ""
    py37 = _python37()
    if py37 is None:
        return None, "no CPython 3.7 to run the original toolkit (set PY37)"
    try:
        subprocess.run(
            ["bash", str(toolkit / "setup_venv.sh"), str(VENV)],
            env={**os.environ, "PY37": str(py37)},
            capture_output=True,
            timeout=900,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"could not build the CPython 3.7 venv for the original toolkit ({type(exc).__name__})"
    if not _imports(python, toolkit):
        return None, "the CPython 3.7 venv does not import the original toolkit"
    return python, ""


def _imports(python: Path, toolkit: Path) -> bool:
    code = f"import sys; sys.path[:0] = [{str(toolkit / 'linux')!r}]; import evaluator"
    return subprocess.run([str(python), "-c", code], capture_output=True, timeout=120).returncode == 0


def for_original(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in the form the original accepts: IR 7, opset 13 (the op semantics of these tests' ops do
    not change between 13 and 17), every Gemm attribute spelled out (it reads ``transB`` from the node)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = min(copy.ir_version, 7)
    for opset in copy.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 13
    for node in copy.graph.node:
        present = {a.name for a in node.attribute}
        if node.op_type == "Gemm":
            for name, value in (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0)):
                if name not in present:
                    node.attribute.append(onnx.helper.make_attribute(name, value))
    return copy


def run_original(
    python: Path,
    model: onnx.ModelProto,
    scales: dict[str, tuple[list[int], bool]],
    bits: int,
    granularity: str,
    x: np.ndarray,
    folder: Path,
) -> dict[str, np.ndarray]:
    """Every tensor the original Evaluator computes for ``x`` (outputs, intermediates, ``<input>::quantized``).

    ``scales``: tensor name -> (exponents, whether the original wants an array), as 2**exponent."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in ("model.onnx", "table.json", "x.npy", "out.npz", "runner.py")}
    onnx.save(for_original(model), paths["model.onnx"])
    paths["table.json"].write_text(json.dumps(scales))
    np.save(paths["x.npy"], np.asarray(x, dtype=np.float32))
    paths["runner.py"].write_text(_RUNNER)
    args = [str(paths[n]) for n in ("model.onnx", "table.json")]
    args = [str(python), str(paths["runner.py"]), str(toolkit_dir()), *args, str(bits), granularity]
    done = subprocess.run(
        [*args, str(paths["x.npy"]), str(paths["out.npz"])], capture_output=True, text=True, timeout=600
    )
    if done.returncode:
        raise RuntimeError(f"the original Evaluator failed:\n{done.stderr[-3000:]}")
    names = json.loads(Path(str(paths["out.npz"]) + ".names.json").read_text())
    with np.load(paths["out.npz"]) as saved:
        return {name: saved[f"t{i}"] for i, name in enumerate(names)}


if __name__ == "__main__":  # build the venv ahead of a test run: python tests/legacy_reference.py
    found, reason = legacy_python()
    print(found or reason)
    sys.exit(0 if found else 1)
