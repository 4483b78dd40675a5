"""The ``espquant`` command group: consoles, logging, and the error handling every subcommand shares.

Errors that espquant explains (bad paths, bad options, models it cannot handle) print as one line on stderr
with exit code 1; bad usage exits with 2; neither shows a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from espquant._version import __version__
from espquant.errors import EspquantError, OptionError

logger = logging.getLogger("espquant")


def _console(stderr: bool = False) -> Console:
    """A console that is 120 columns wide when output goes to a file or pipe (rich's default is 80)."""
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal or "COLUMNS" in os.environ else 120
    return Console(stderr=stderr, highlight=False, width=width)


out = _console()
err = _console(stderr=True)


class EspquantGroup(click.Group):
    """A click group that turns espquant errors into one clear line and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OptionError as exc:
            err.print(f"[bold red]espquant: usage error:[/] {exc}", soft_wrap=True)
            ctx.exit(2)
        except EspquantError as exc:
            err.print(f"[bold red]espquant: error:[/] {exc}", soft_wrap=True)
            ctx.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            err.print(
                f"[bold red]espquant: internal error:[/] {type(exc).__name__}: {exc}. "
                "Run again with --debug for the traceback and please report it.",
                soft_wrap=True,
            )
            ctx.exit(1)


@click.group(cls=EspquantGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="espquant")
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for unexpected errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Quantize ONNX models for Espressif ESP-DL chips and know what the chip will compute.

    \b
    Typical flow:
      espquant demo                                  # everything on a bundled MNIST model
      espquant quantize model.onnx --data calib/ --target esp32s3   # all the steps below in one
      espquant optimize model.onnx                   # -> model_optimized.onnx
      espquant check model_optimized.onnx --target all
      espquant calibrate model_optimized.onnx --data calib.npy -o t.pickle
      espquant evaluate model_optimized.onnx --table t.pickle --data test.npy --labels y.npy --target esp32s3
      espquant report model_optimized.onnx --table t.pickle --data test.npy -o report/   # if accuracy drops
      espquant export model_optimized.onnx --table t.pickle --target esp32s3 -o model.espdl
      espquant run model.espdl --self-test           # re-load the file and check its embedded outputs
      espquant ops                                   # which ONNX ops each part of espquant takes
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.ERROR if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(level)
    logging.getLogger("espquant.data").setLevel(min(level, logging.WARNING))  # hints about the user's data
    logging.getLogger("espquant.advice").setLevel(min(level, logging.WARNING))  # what calibration chose and why


def table_option(command: Any) -> Any:
    """``--table``: the quantization table a command reads (evaluate, export, report)."""
    return click.option(
        "--table",
        "table_path",
        required=True,
        type=click.Path(path_type=Path),
        help="Quantization table from `espquant calibrate` (.pickle or .json).",
    )(command)


def data_option(help_text: str) -> Any:
    """``--data``: normalised float inputs as .npy / .npz (``load_array_data``)."""
    return click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help=help_text)


def force_option(command: Any) -> Any:
    """``--force``: the one switch that lets a command replace outputs that already exist (never its inputs)."""
    return click.option(
        "--force", is_flag=True, help="Replace output files that already exist (inputs are never replaced)."
    )(command)


def table_files(path: Path) -> list[Path]:
    """A table and its twin (``t.pickle`` and ``t.json``): outputs must replace neither."""
    return [path, path.with_suffix(".json"), path.with_suffix(".pickle")]
