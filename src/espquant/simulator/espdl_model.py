"""Run ESP-DL ``.espdl`` models with the simulator: what the chip computes, from the file alone.

``load_espdl(path, target=None)`` decodes the file, binds it to a target profile (from the file's ``target``
metadata, or the ``target`` argument) and lowers it to the same integer model the ONNX front end builds
(:class:`~espquant.simulator.quantized_model.QuantizedModel`), so one set of kernels, and the compiled fast
path, runs both. The lowering only translates what the file says into ONNX semantics:

- weights in the target's byte order become plain ONNX arrays (``OIHW`` convolutions, ``(K, N)`` matrices);
- ops that the file runs channels-last (Conv, pools, Resize) get a Transpose to channels-first and back, so
  the integer model keeps ONNX's layout rules; every other op already works on the file's layout;
- ``quant_type``, ``activation`` (a fused Relu), ``lut`` (a stored table) become node fields;
- widths and exponents come from the file's value declarations, never from guesses.

Tables follow the runtime version of the file's container: ``EDL2`` files (ESP-DL 3.1 and later) use a stored
table at int8, and an int16 table only in ``LUT`` / ``Gelu`` nodes (nearest neighbour, ARITHMETIC.md 8.2); an
int16 Sigmoid / Sqrt / ... with a ``lut`` attribute computes in float32 (8.3). ``EDL1`` files (3.0.0-rc.2)
use every named table, int16 ones by linear interpolation (8.6).
"""

from __future__ import annotations

import os

import numpy as np

from espquant.errors import ModelError, TargetError, UnsupportedOpError
from espquant.espdl.layouts import decode_conv_weight, decode_depthwise_weight, decode_kn_matrix
from espquant.espdl.reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue, read_espdl
from espquant.quant.profiles import TargetProfile, get_target
from espquant.runtime import ONNXRUNTIME_ERRORS
from espquant.simulator.activations import TABLE_ONLY
from espquant.simulator.espdl_bounds import check_node_bounds
from espquant.simulator.interpreter import UNBLOCK_MATRIX, simulated_ops
from espquant.simulator.quantized_model import QNode, QuantizedModel

__all__ = ["EspdlModel", "load_espdl", "lower_espdl", "compare_output", "FLOAT_ULP"]


# Float outputs stored in reference files are host (PyTorch) values: compared within this many float32 ulp.
FLOAT_ULP = 8

_WIDTHS = {"INT8": 8, "INT16": 16}
_INT_DTYPES = {"INT8": np.int8, "INT16": np.int16}
_PROFILE_ALIASES = {"c": "esp32"}
# Ops the runtime computes channels-last (NHWC / NWC): lowered between two Transposes.
_CHANNELS_LAST = frozenset(
    {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "DepthToSpace", "SpaceToDepth"}
)
# What numpy and the kernels raise on a graph whose shapes, indices or attributes disagree: from a decoded file
# that is damage, reported as a ModelError naming the file (onnxruntime raises its own classes for the compiled
# parts).
_DAMAGE = (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, OverflowError, *ONNXRUNTIME_ERRORS)
# Nodes the runtime always runs through a table (ARITHMETIC.md 8.2), int16 included.
_TABLE_ONLY = TABLE_ONLY | {"LUT"}


class EspdlModel:
    """A decoded ``.espdl`` file bound to a target profile, runnable with the integer kernels."""

    def __init__(self, decoded: EspdlFile, profile: TargetProfile) -> None:
        self.file = decoded
        self.profile = profile

    @property
    def profile(self) -> TargetProfile:
        """The arithmetic the file is simulated with; setting another lowers the file again for it."""
        return self._profile

    @profile.setter
    def profile(self, profile: TargetProfile) -> None:
        self._profile = profile
        self.quantized = lower_espdl(self.file, profile)

    @property
    def inputs(self) -> list[EspdlValue]:
        return self.file.inputs

    @property
    def outputs(self) -> list[EspdlValue]:
        return self.file.outputs

    @property
    def compiled(self) -> bool:
        """Whether provably exact node runs execute as onnxruntime graphs (False: the numpy reference)."""
        return self.quantized.compiled

    @compiled.setter
    def compiled(self, value: bool) -> None:
        self.quantized.compiled = value

    @property
    def test_values(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """The embedded test inputs and expected outputs, or None when the file has none."""
        if not self.file.test_inputs:
            return None
        return (
            {name: t.data for name, t in self.file.test_inputs.items()},
            {name: t.data for name, t in self.file.test_outputs.items()},
        )

    def reset(self) -> None:
        """Start a new stream: StreamingCache nodes forget the frames of earlier runs."""
        self.quantized.reset()

    def onnx_layout(self, name: str) -> tuple[int, ...] | None:
        """For a graph input or output of a file espquant exported: the permutation that takes the ONNX
        model's tensor to the file's layout (``np.transpose(onnx_array, perm)``), e.g. ``(0, 2, 3, 1)`` for
        an NHWC image; None when the file does not say (other writers)."""
        value = self.file.metadata.get(f"espquant.layout:{name}")
        return tuple(int(p) for p in value.split(",")) if value else None

    def run(self, int_inputs: dict[str, np.ndarray], keep: bool = False) -> dict[str, np.ndarray]:
        """Run the graph on quantized inputs (the file's layout) and return the graph outputs.

        With ``keep`` every intermediate variable of the file is returned too.
        """
        feeds = {}
        for declared in self.file.inputs:
            if declared.name not in int_inputs:
                raise ModelError(f"no value for model input {declared.name!r}")
            data = np.asarray(int_inputs[declared.name])
            if declared.shape and int(np.prod(declared.shape)) == data.size:
                data = data.reshape(declared.shape)
            feeds[declared.name] = data
        try:
            results = self.quantized.run(feeds, keep=keep)
        except _DAMAGE as exc:  # a file whose shapes and attributes disagree with each other
            raise ModelError(
                f"{self.file.path}: the graph cannot run ({type(exc).__name__}: {str(exc)[:200]}); its shapes or "
                "attributes are inconsistent: the file is damaged"
            ) from exc
        names = [n for n in results if n in self._file_tensors] if keep else [o.name for o in self.file.outputs]
        return {name: self._as_declared(name, results[name]) for name in names}

    @property
    def _file_tensors(self) -> set[str]:
        names = set(self.file.values) | {v.name for v in self.file.inputs} | {v.name for v in self.file.outputs}
        return names | {o for node in self.file.nodes for o in node.outputs}

    def _as_declared(self, name: str, data: np.ndarray) -> np.ndarray:
        value = self.file.values.get(name) or next((v for v in self.file.outputs if v.name == name), None)
        if value is not None and value.dtype in _INT_DTYPES:
            return data.astype(_INT_DTYPES[value.dtype])
        return data


# --- lowering ---------------------------------------------------------------------------------------------------


def _declarations(decoded: EspdlFile) -> dict[str, EspdlValue]:
    declared = dict(decoded.values)
    for value in (*decoded.inputs, *decoded.outputs):
        declared.setdefault(value.name, value)
    return declared


def _exponent_of(tensor: EspdlTensor) -> int | list[int]:
    if len(tensor.exponents) > 1:
        return [int(e) for e in tensor.exponents]
    return int(tensor.exponents[0]) if tensor.exponents else 0


class _Lowering:
    """Builds the integer model of one file (see the module docstring)."""

    def __init__(self, decoded: EspdlFile, profile: TargetProfile) -> None:
        self.file = decoded
        self.profile = profile
        self.declared = _declarations(decoded)
        self.nodes: list[QNode] = []
        self.constants: dict[str, np.ndarray] = {}
        self.exponents: dict[str, int | list[int]] = {}
        self.widths: dict[str, int] = {}
        self.float_tensors: set[str] = set()
        self.rc2 = decoded.container == "EDL1"  # ESP-DL 3.0.0-rc.2 semantics for stored tables (8.6)
        for name, value in self.declared.items():
            self.exponents[name] = value.exponent
            if value.dtype in _WIDTHS:
                self.widths[name] = _WIDTHS[value.dtype]
            elif value.dtype in ("FLOAT", "DOUBLE", "FLOAT16"):
                self.float_tensors.add(name)
        for name, tensor in decoded.initializers.items():
            self.exponents[name] = _exponent_of(tensor)
            self.constants[name] = tensor.data.astype(np.float32 if tensor.data.dtype.kind == "f" else np.int64)
            if tensor.dtype in _WIDTHS:
                self.widths[name] = _WIDTHS[tensor.dtype]

    def width(self, name: str) -> int:
        return self.widths.get(name, 8)

    def alias(self, name: str, like: str) -> str:
        """A new tensor name with ``like``'s exponent and width (the channels-first twin of a file tensor)."""
        self.exponents[name] = self.exponents.get(like, 0)
        if like in self.widths:
            self.widths[name] = self.widths[like]
        if like in self.float_tensors:
            self.float_tensors.add(name)
        return name

    def transpose(self, source: str, target: str, perm: list[int], node: str) -> None:
        self.nodes.append(QNode("Transpose", f"{node}::{target}", [source], [target], {"perm": perm}))

    def add(self, node: EspdlNode) -> None:
        check_node_bounds(node, self.declared, self.file.initializers)
        op_type = node.op_type
        attrs = {k: v for k, v in node.attributes.items() if k not in ("quant_type", "lut", "activation")}
        outputs = list(node.outputs)
        bits = self.width(outputs[0]) if outputs else 8
        qnode = QNode(op_type, node.name, list(node.inputs), outputs, attrs, bits=bits)
        qnode.relu = node.attributes.get("activation") == "Relu"
        table = node.attributes.get("lut")
        if table and (bits == 8 or self.rc2 or op_type in _TABLE_ONLY):
            qnode.table = self.constants[table].reshape(-1)
            if bits == 16:
                qnode.attrs["int16_lut_interpolate"] = self.rc2
        elif op_type in _TABLE_ONLY:
            raise UnsupportedOpError(f"node {node.name!r}: {op_type} runs only through a table, and it has none")
        if op_type == "Conv":
            self._conv_weight(qnode)
        elif op_type == "Gemm" or op_type == "MatMul" and qnode.inputs[1] in self.constants:
            self._matrix(qnode, qnode.inputs[1])
        elif op_type == "MatMul":  # B computed at run time: the graph before it wrote the blocked byte order
            plain = self.alias(f"{qnode.inputs[1]}::plain", qnode.inputs[1])
            attrs = {"bits": self.width(qnode.inputs[1]), "blocked": int(self.profile.simd)}
            self.nodes.append(QNode(UNBLOCK_MATRIX, f"{node.name}::unblock", [qnode.inputs[1]], [plain], attrs))
            qnode.inputs[1] = plain
        elif op_type == "Transpose" and "perm" in attrs:
            rank = len(attrs["perm"])
            qnode.attrs["perm"] = [int(p) % rank for p in attrs["perm"]]
        elif op_type == "SpaceToDepth":
            qnode.attrs["channel_major"] = 1  # ESP-DL's output channel order (interpreter._space_to_depth)
        elif op_type == "DepthToSpace":
            self._check_dcr(node)
        elif op_type == "PRelu":
            slope = qnode.inputs[1]
            self._check_slope(node, qnode.table is not None)
            self.constants[slope] = self.constants[slope].reshape(-1)  # one per channel, channels last
        elif op_type == "Reshape":
            self._check_allowzero(node)
        if op_type in _CHANNELS_LAST:
            self._channels_first(qnode)
        else:
            self.nodes.append(qnode)

    def _parameter(self, node: EspdlNode) -> EspdlTensor | None:
        """The file's constant at the node's second input (a PRelu slope, a Reshape shape), if it stores one."""
        return self.file.initializers.get(node.inputs[1]) if len(node.inputs) > 1 else None

    def _check_slope(self, node: EspdlNode, looked_up: bool) -> None:
        """ESP-DL builds a PRelu without a table only from a ``[C, 1, 1]`` slope: ``PRelu::deserialize`` asserts
        it (dl_module_prelu.hpp), so the chip aborts while loading any other (ESP-PPQ 1.3.12 writes ``[C]``
        after a Gemm)."""
        slope = self._parameter(node)
        if not looked_up and slope is not None and len(slope.dims) != 3:
            raise UnsupportedOpError(
                f"node {node.name!r}: PRelu slope of shape {list(slope.dims)}: ESP-DL loads a PRelu without a table "
                "only with a [C, 1, 1] slope (dl_module_prelu.hpp asserts it), so the chip aborts when it loads "
                "this file; re-export the model with the slope as [C, 1, 1]"
            )

    def _check_allowzero(self, node: EspdlNode) -> None:
        """ESP-DL's ``Reshape::deserialize`` reads ``allowzero`` into an uninitialised int when the file omits it
        (dl_module_reshape.hpp), and a 0 in the shape is then copied, kept or asserted on at random: what the
        chip computes is not defined."""
        shape = self._parameter(node)
        if shape is not None and "allowzero" not in node.attributes and (shape.data == 0).any():
            raise UnsupportedOpError(
                f"node {node.name!r}: Reshape to {shape.data.tolist()} without an allowzero attribute: ESP-DL reads "
                "allowzero uninitialised (dl_module_reshape.hpp), so what a 0 in the shape does on the chip is not "
                "defined; re-export with allowzero = 0 or with the dimension written out"
            )

    def _check_dcr(self, node: EspdlNode) -> None:
        """ESP-DL's DCR loop writes output channel ``c % blocksize`` (dl_module_depth_to_space.hpp): with other
        than ``blocksize`` output channels it overwrites some outputs and leaves others unwritten."""
        if node.attributes.get("mode", "DCR") != "DCR":
            return
        declared = self.declared.get(node.inputs[0])
        size = int(node.attributes.get("blocksize", 1))
        if declared is not None and declared.shape and size > 1:
            channels = declared.shape[-1] // (size * size)
            if channels != size:
                raise UnsupportedOpError(
                    f"node {node.name!r}: DepthToSpace DCR with {channels} output channels and blocksize {size}: "
                    "ESP-DL's loop leaves part of the output unwritten (dl_module_depth_to_space.hpp), so what the "
                    "chip computes is not defined"
                )

    def _channels_first(self, qnode: QNode) -> None:
        """``x (N, ..., C) -> Transpose -> op (ONNX layout) -> Transpose -> y (N, ..., C)``."""
        source, target = qnode.inputs[0], qnode.outputs[0]
        declared = self.declared.get(source)
        rank = len(declared.shape) if declared is not None and declared.shape else 4  # undeclared: an image
        to_first = [0, rank - 1, *range(1, rank - 1)]
        to_last = [0, *range(2, rank), 1]
        inner_in = f"{source}::channels_first"
        if inner_in not in self.exponents:  # one Transpose per tensor, however many convolutions read it
            self.transpose(source, self.alias(inner_in, source), to_first, qnode.name)
        inner_out = self.alias(f"{target}::channels_first", target)
        qnode.inputs[0], qnode.outputs[0] = inner_in, inner_out
        self.nodes.append(qnode)
        self.transpose(inner_out, target, to_last, qnode.name)

    def _conv_weight(self, qnode: QNode) -> None:
        """The file's weight bytes as an ONNX ``OIHW`` (depthwise ``O1HW``) array, 1-D convolutions as ``OIW``."""
        name = qnode.inputs[1]
        tensor = self.file.initializers[name]
        source = qnode.inputs[0]
        shape = self.declared[source].shape if source in self.declared else None
        one_d = shape is not None and len(shape) == 3
        kernel = list(qnode.attrs.get("kernel_shape", tensor.dims[:-2]))
        kh, kw = (1, kernel[0]) if one_d else (kernel[0], kernel[1])
        group = int(qnode.attrs.get("group", 1))
        bits = self.width(name)
        blocked = self.profile.simd
        if group == 1:
            n = tensor.dims[-1]
            channels = shape[-1] if shape else tensor.data.size // (n * kh * kw)
            weight = decode_conv_weight(tensor.data, n, kh, kw, channels, bits, blocked).transpose(0, 3, 1, 2)
        else:
            n = tensor.dims[-2]
            weight = decode_depthwise_weight(tensor.data, n, kh, kw, bits, blocked)[:, None]
        self.constants[name] = np.ascontiguousarray(weight[:, :, 0] if one_d else weight).astype(np.int64)

    def _matrix(self, qnode: QNode, name: str) -> None:
        """A Gemm / constant-MatMul weight as plain ``(..., K, N)`` (the file stores every slice blocked)."""
        tensor = self.file.initializers[name]
        data = tensor.data.reshape(tensor.dims) if tensor.dims else tensor.data
        k, n = tensor.dims[-2], tensor.dims[-1]
        slices = data.reshape(-1, k * n)
        bits = self.width(name)
        plain = np.stack([decode_kn_matrix(s, k, n, bits, self.profile.simd) for s in slices])
        dims = (k, n) if qnode.op_type == "Gemm" else (*tensor.dims[:-2], k, n)  # Gemm: leading 1s only label
        self.constants[name] = plain.reshape(dims).astype(np.int64)

    def model(self) -> QuantizedModel:
        for node in self.file.nodes:
            self.add(node)
        missing = sorted({n.op_type for n in self.nodes} - simulated_ops())
        if missing:
            raise UnsupportedOpError(
                f"{self.file.path}: the simulator has no kernel for {', '.join(missing)} yet "
                f"(`espquant ops` lists what it runs)"
            )
        return QuantizedModel(
            nodes=self.nodes,
            constants=self.constants,
            exponents=self.exponents,
            inputs=[v.name for v in self.file.inputs],
            outputs=[v.name for v in self.file.outputs],
            profile=self.profile,
            bits=8,
            float_tensors=self.float_tensors,
            widths={k: v for k, v in self.widths.items() if v != 8},
        )


def lower_espdl(decoded: EspdlFile, profile: TargetProfile) -> QuantizedModel:
    """The integer model of a decoded ``.espdl`` file for ``profile`` (see the module docstring)."""
    try:
        return _Lowering(decoded, profile).model()
    except _DAMAGE as exc:
        raise ModelError(
            f"{decoded.path}: the graph cannot be built ({type(exc).__name__}: {str(exc)[:200]}); the file is damaged"
        ) from exc


def compare_output(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    """Simulated vs stored output: integers must be equal, floats within ``FLOAT_ULP`` float32 ulp (NaN where
    both are NaN and equal infinities count as equal: an overflowing int8 Softmax gives them on the chip)."""
    got = np.asarray(got).reshape(want.shape)
    if want.dtype.kind == "f":
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        special = (np.isnan(got64) & np.isnan(want64)) | (np.isinf(want64) & (got64 == want64))
        spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        with np.errstate(invalid="ignore"):
            ulp = np.where(special, 0.0, np.abs(got64 - want64) / spacing)
        worst = float(np.nan_to_num(ulp, nan=np.inf).max(initial=0))
        return worst <= FLOAT_ULP, f"max {worst:.1f} float32 ulp"
    differ = int((got.astype(np.int64) != want.astype(np.int64)).sum())
    return differ == 0, f"{differ}/{want.size} elements differ"


def load_espdl(path: str | os.PathLike[str], target: str | None = None) -> EspdlModel:
    """Decode an ``.espdl`` file and bind it to its target chip's arithmetic.

    Args:
        path: the model file (EDL1 or EDL2 container).
        target: the chip, needed when the file records none (files of ESP-DL 3.0.x); a file that records a
            target different from this one is refused.
    """
    decoded = read_espdl(path)
    recorded = decoded.target
    if recorded is not None:
        recorded = _PROFILE_ALIASES.get(recorded, recorded)
        if target is not None and get_target(target).family != get_target(recorded).family:
            raise TargetError(f"{path}: the file was exported for {recorded}, not {target}.")
        return EspdlModel(decoded, get_target(recorded))
    if target is None:
        raise TargetError(
            f"{path}: the file does not record its target chip; pass target= (on the command line --target), "
            "e.g. 'esp32s3'."
        )
    return EspdlModel(decoded, get_target(target))
