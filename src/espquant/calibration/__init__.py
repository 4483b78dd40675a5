"""The calibrator: exponents for every tensor from a calibration set."""

from espquant.calibration.calibrator import CALIBRATION_METHODS, Calibrator

__all__ = ["CALIBRATION_METHODS", "Calibrator"]
