"""The legacy ESP-DL toolkit's facades, on top of the engines: ``Calibrator`` and ``Evaluator``."""

from espquant.api.calibrator import Calibrator
from espquant.api.evaluator import Evaluator

__all__ = ["Calibrator", "Evaluator"]
