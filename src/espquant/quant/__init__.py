"""Power-of-two arithmetic and the target chips' arithmetic profiles."""

from espquant.quant.profiles import TARGETS, TargetProfile, get_target, target_names

__all__ = ["TARGETS", "TargetProfile", "get_target", "target_names"]
