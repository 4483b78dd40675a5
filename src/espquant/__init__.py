"""espquant: quantize ONNX models for Espressif's ESP-DL and know what the chip will compute.

The public API keeps the names of the legacy ESP-DL quantization toolkit, so switching is one import.
"""

from espquant._version import __version__  # noqa: E402
from espquant.api import Calibrator, Evaluator
from espquant.api.quantize import QuantizeResult, quantize
from espquant.api.torch_export import quantize_torch
from espquant.checker import CheckReport, check_model
from espquant.errors import (
    DatasetError,
    EspquantError,
    ModelError,
    OptionError,
    QuantTableError,
    TargetError,
    UnsupportedModelError,
    UnsupportedOpError,
)
from espquant.optimizer import (
    convert_model_batch_to_dynamic,
    fix_input_shapes,
    optimize_fp_model,
    optimize_model,
)
from espquant.quant import get_target, target_names
from espquant.simulator.espdl_model import load_espdl

__all__ = [
    "Calibrator",
    "CheckReport",
    "Evaluator",
    "QuantizeResult",
    "quantize",
    "quantize_torch",
    "check_model",
    "load_espdl",
    "get_target",
    "target_names",
    "DatasetError",
    "EspquantError",
    "ModelError",
    "OptionError",
    "QuantTableError",
    "TargetError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "__version__",
    "convert_model_batch_to_dynamic",
    "fix_input_shapes",
    "optimize_fp_model",
    "optimize_model",
]
