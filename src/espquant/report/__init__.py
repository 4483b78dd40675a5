"""When accuracy disappoints: the layer-wise error report (tables, JSON, and an HTML page with plots)."""

from espquant.report.analysis import Analysis, LayerError, analyze

__all__ = ["Analysis", "LayerError", "analyze"]
