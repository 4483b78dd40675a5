"""The calibrator engine: exponents for every tensor from a calibration set."""

from espquant.calibration.engine import CALIBRATION_METHODS, CalibrationResult, calibrate_model

__all__ = ["CALIBRATION_METHODS", "CalibrationResult", "calibrate_model"]
