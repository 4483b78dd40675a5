"""The espquant error hierarchy.

Every failure a user can cause (a bad path, a model the chip cannot run, a broken data set, a table that
belongs to another model, an unknown target) raises a subclass of :class:`EspquantError`. The message names
the thing at fault and says what to do, so the command line can print it as one line and exit with 1
instead of showing a traceback.
"""

from __future__ import annotations

__all__ = [
    "EspquantError",
    "ModelError",
    "UnsupportedOpError",
    "UnsupportedModelError",
    "DatasetError",
    "QuantTableError",
    "TargetError",
    "OptionError",
    "OutputError",
]


class EspquantError(Exception):
    """Base class of every error espquant raises on purpose."""


class ModelError(EspquantError):
    """The model file or ModelProto cannot be read, is malformed, or cannot be written."""


class UnsupportedOpError(EspquantError):
    """An operator (or one of its attributes) is something ESP-DL cannot run."""


class UnsupportedModelError(UnsupportedOpError):
    """A model has one or more problems that keep it off the chip; the message lists all of them."""


class DatasetError(EspquantError):
    """The calibration or evaluation data is empty, mis-shaped, of the wrong dtype, or not finite."""


class QuantTableError(EspquantError):
    """A quantization table is unreadable, incomplete, unsafe to load, or belongs to another model."""


class TargetError(EspquantError):
    """An unknown target chip, or a request the target's runtime cannot honour."""


class OptionError(EspquantError):
    """An option value (pass name, input shape, method, bit width...) is not one espquant accepts."""


class OutputError(EspquantError):
    """An output cannot be written: its folder is missing or read-only, the disk is full, or it would replace
    one of the command's own inputs."""
