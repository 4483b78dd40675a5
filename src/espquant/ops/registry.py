"""The operator registry: one explicit entry per ONNX op type ESP-DL can run, and what to say about the rest.

Entries are declared in the family modules and listed here by hand (no scanning of module globals), so
adding an op is a visible decision. The checker, the calibrator, the simulator and the exporters all read
this one place.
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from espquant.ops import activations, data_movement, elementwise, linear, misc, pooling
from espquant.ops.spec import OpSpec

__all__ = ["REGISTRY", "get_op_spec", "UNREGISTERED_HINTS"]


# The layers of the legacy ESP-DL library (v1.1 / v2.0) that ``export --format cpp`` writes (export/cpp.py).
_LEGACY_LAYERS = frozenset(
    {"Conv", "Gemm", "MatMul", "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "Add",
     "Sub", "Mul", "Concat", "Flatten", "Reshape", "Identity", "RequantizeLinear"}
)  # fmt: skip


def _build(*families: tuple[OpSpec, ...]) -> MappingProxyType[str, OpSpec]:
    registry: dict[str, OpSpec] = {}
    for family in families:
        for spec in family:
            if spec.op_type in registry:
                raise RuntimeError(f"operator {spec.op_type} is declared twice in the registry")
            registry[spec.op_type] = replace(spec, legacy_layer=spec.op_type in _LEGACY_LAYERS)
    return MappingProxyType(registry)


REGISTRY = _build(
    linear.SPECS,
    elementwise.SPECS,
    activations.SPECS,
    pooling.SPECS,
    data_movement.SPECS,
    misc.SPECS,
)


def get_op_spec(op_type: str) -> OpSpec | None:
    """The registry entry of ``op_type`` (exact ONNX spelling), or None when ESP-DL cannot run it."""
    return REGISTRY.get(op_type)


_OPTIMIZE = "run `espquant optimize` first"
_SHAPE_CHAIN = (
    "a shape computation at run time; run `espquant optimize` (with --input-shape for dynamic inputs) to fold it "
    "into constants"
)

# Why an op type outside the registry is refused, and what the user can do about it.
UNREGISTERED_HINTS: MappingProxyType[str, str] = MappingProxyType(
    {
        "BatchNormalization": f"{_OPTIMIZE}: it folds into the preceding Conv/Gemm or becomes Mul + Add",
        "Dropout": f"{_OPTIMIZE}: Dropout is an identity at inference and is removed",
        "Constant": f"{_OPTIMIZE}: Constant nodes become initializers",
        "Sum": f"{_OPTIMIZE}: a two-input Sum becomes Add",
        "Shape": _SHAPE_CHAIN,
        "Size": _SHAPE_CHAIN,
        "ConstantOfShape": _SHAPE_CHAIN,
        "Range": _SHAPE_CHAIN,
        "Expand": _SHAPE_CHAIN,
        "Cast": "ESP-DL has no Cast; remove dtype changes from the float model (after optimization most disappear)",
        "GlobalMaxPool": "not registered in the ESP-DL runtime; use ReduceMax over the spatial axes (keepdims=1)",
        "Max": "ESP-DL v3.3.9 has a Max module but does not register it (dl_module_creator.hpp: the runtime "
        "refuses the file); for a constant bound use Clip",
        "Min": "ESP-DL v3.3.9 has a Min module but does not register it (dl_module_creator.hpp: the runtime "
        "refuses the file); for a constant bound use Clip",
        **{
            op: f"ESP-DL v3.3.9 has a {op} module but does not register it (dl_module_creator.hpp: the runtime "
            "refuses the file); compute the mask with a comparison instead"
            for op in ("And", "Or", "Xor", "Not")
        },
        "LRN": "ESP-DL has no local response normalisation; remove it (it rarely matters after training)",
        "If": "control flow cannot run on ESP-DL; export the branch you need",
        "Loop": "control flow cannot run on ESP-DL; unroll the loop when exporting",
        "Scan": "control flow cannot run on ESP-DL; unroll the scan when exporting",
        "InstanceNormalization": "ESP-DL has no InstanceNormalization",
    }
)
