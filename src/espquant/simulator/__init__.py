"""The evaluator: a simulator of ESP-DL's integer arithmetic per target chip."""

from espquant.simulator.evaluator import Evaluator

__all__ = ["Evaluator"]
