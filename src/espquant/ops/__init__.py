"""The ESP-DL operator registry: what each ONNX op becomes on the chip."""

from espquant.ops.broadcast import merged_broadcast_shapes
from espquant.ops.registry import REGISTRY, UNREGISTERED_HINTS, get_op_spec
from espquant.ops.spec import Constraint, ExponentRule, InputSpec, NodeContext, OpSpec, Role

__all__ = [
    "REGISTRY",
    "UNREGISTERED_HINTS",
    "Constraint",
    "ExponentRule",
    "InputSpec",
    "NodeContext",
    "OpSpec",
    "Role",
    "get_op_spec",
    "merged_broadcast_shapes",
]
