"""onnxruntime execution providers, validated once for the Calibrator and the Evaluator."""

from __future__ import annotations

from collections.abc import Sequence

import onnxruntime as ort

from espquant.errors import OptionError

__all__ = ["validate_providers"]


def validate_providers(providers: Sequence[str]) -> list[str]:
    """Check that every provider is available in this onnxruntime build; returns them as a list."""
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if not providers or missing:
        raise OptionError(
            f"execution provider(s) {', '.join(missing) or '(none given)'} not available in this onnxruntime; "
            f"available: {', '.join(available)}."
        )
    return list(providers)
