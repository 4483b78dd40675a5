"""The layer-wise report on disk: Markdown and JSON always, a self-contained HTML page with plots when the
``plot`` extra (matplotlib) is installed.

The page has the per-layer SQNR chart (accumulated, own and added error in graph order) and, for the worst
layers, histograms of the float values with the range the chosen exponent keeps marked, so a clipped tail
or a range wasted on one outlier is visible at a glance. Images are embedded as base64 PNGs: one file to
open, attach or publish.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
from pathlib import Path

from espquant.errors import OutputError
from espquant.files import write_files
from espquant.quant.pot import qmax, qmin
from espquant.report.analysis import Analysis, LayerError

__all__ = ["COLUMNS", "PLOT_HINT", "layer_row", "markdown_table", "report_paths", "write_report"]

PLOT_HINT = "install the plot extra for the HTML page with charts: pip install 'espquant[plot]'"
COLUMNS = ("tensor", "op", "exp", "added dB", "own dB", "accum. dB", "cosine", "max err", "clipped")


def _db(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else ("-inf" if math.isinf(value) else f"{value:.2f}")


def layer_row(layer: LayerError) -> list[str]:
    return [
        layer.tensor,
        layer.op_type,
        str(layer.exponent),
        _db(layer.added_sqnr_db),
        _db(layer.own_sqnr_db),
        _db(layer.sqnr_db),
        f"{layer.cosine:.5f}",
        f"{layer.max_abs_error:.4g}",
        f"{100 * layer.clipped_fraction:.2f}%",
    ]


def markdown_table(analysis: Analysis, count: int | None = None) -> str:
    """The worst layers first, as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(layer_row(layer)) + " |" for layer in analysis.worst(count)]
    return "\n".join(lines)


def _markdown(analysis: Analysis) -> str:
    return (
        f"# Layer-wise quantization error ({analysis.target}, int{analysis.bits}, {analysis.samples} samples)\n\n"
        "Worst first by the error each layer adds on its own (its own SQNR against what quantizing its inputs "
        "already cost). *accum.*: the full simulation up to that tensor; *clipped*: float values outside the "
        "exponent's range.\n\n" + markdown_table(analysis) + "\n"
    )


def _png(figure) -> str:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(value: float, floor: float = -10.0, ceiling: float = 90.0) -> float:
    return min(max(value, floor), ceiling) if math.isfinite(value) else (ceiling if value > 0 else floor)


def _html(analysis: Analysis) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = analysis.layers
    figure, axis = plt.subplots(figsize=(max(8, 0.35 * len(layers)), 4.5))
    positions = range(len(layers))
    axis.plot(positions, [_finite(v.sqnr_db) for v in layers], "o-", label="accumulated (full simulation)")
    axis.plot(positions, [_finite(v.own_sqnr_db) for v in layers], "s--", label="own (layer alone)")
    added = [_finite(v.added_sqnr_db) if math.isfinite(v.added_sqnr_db) else math.nan for v in layers]
    axis.bar(positions, added, alpha=0.25, label="added by the layer (none: adds no error)")
    axis.set_xticks(list(positions), [f"{v.op_type}\n{v.tensor[-18:]}" for v in layers], rotation=90, fontsize=7)
    axis.set_ylabel("SQNR (dB, higher is better; capped at 90)")
    axis.set_title(f"SQNR per layer, {analysis.target} int{analysis.bits}")
    axis.legend(loc="best", fontsize=8)
    axis.grid(alpha=0.3)
    chart = _png(figure)
    plt.close(figure)
    sections = []
    for layer in analysis.worst(len(analysis.histograms)):
        if layer.tensor not in analysis.histograms:
            continue
        counts, edges = analysis.histograms[layer.tensor]
        figure, axis = plt.subplots(figsize=(7, 3))
        axis.stairs(counts, edges, fill=True, alpha=0.6)
        low, high = qmin(analysis.bits) * 2.0**layer.exponent, qmax(analysis.bits) * 2.0**layer.exponent
        for bound in (low, high):
            axis.axvline(bound, color="red", linestyle="--")
        axis.set_yscale("log")
        axis.set_title(f"{layer.tensor} ({layer.op_type}): kept range [{low:.4g}, {high:.4g}]", fontsize=9)
        axis.set_xlabel("float value")
        sections.append(
            f"<h3>{html.escape(layer.tensor)}</h3><p>added {_db(layer.added_sqnr_db)} dB, own "
            f"{_db(layer.own_sqnr_db)} dB, clipped {100 * layer.clipped_fraction:.2f}%</p>"
            f'<img alt="histogram" src="data:image/png;base64,{_png(figure)}">'
        )
        plt.close(figure)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in layer_row(v)) + "</tr>" for v in analysis.worst()
    )
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>espquant layer report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%}}</style></head><body>
<h1>Layer-wise quantization error</h1>
<p>{html.escape(analysis.target)}, int{analysis.bits}, {analysis.samples} samples. Worst first by the error each
layer adds on its own.</p>
<img alt="SQNR per layer" src="data:image/png;base64,{chart}">
<h2>Layers, worst first</h2><table><tr>{head}</tr>{rows}</table>
<h2>Float values of the worst layers (red: the range the exponent keeps)</h2>{"".join(sections)}
</body></html>
"""


def report_paths(directory: str | Path) -> dict[str, Path]:
    """The files :func:`write_report` may write into ``directory``, by kind."""
    folder = Path(directory)
    return {"markdown": folder / "report.md", "json": folder / "report.json", "html": folder / "index.html"}


def write_report(analysis: Analysis, directory: str | Path) -> dict[str, Path | str]:
    """Write ``report.md``, ``report.json`` and, with matplotlib, ``index.html`` into ``directory``, all or none.

    Returns the written paths by kind; without matplotlib the ``"html"`` entry is the hint to install it.
    """
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; the report is a folder (report.md, report.json, index.html).")
    paths = report_paths(folder)
    contents = {
        paths["markdown"]: _markdown(analysis).encode(),
        paths["json"]: json.dumps(analysis.to_dict(), indent=1).encode(),
    }
    with contextlib.suppress(ImportError):
        contents[paths["html"]] = _html(analysis).encode()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the report folder ({exc.strerror or exc}).") from exc
    write_files(contents)
    return {kind: path if path in contents else PLOT_HINT for kind, path in paths.items()}
