"""``--data`` and ``--preprocess`` as ``calibrate``, ``evaluate`` and ``quantize`` share them: one help text,
one way to open the data (:func:`espquant.calibration.sources.open_data`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["DATA_HELP", "preprocess_option", "open_source", "model_inputs"]

DATA_HELP = (
    "Normalised float inputs: .npy (N, ...), .npz with one array per input, a folder of .npy files (one sample "
    "or one batch each), or a folder of images (.png .jpg .jpeg .bmp, with --preprocess; needs "
    "pip install 'espquant[images]'), read in sorted name order."
)


def preprocess_option(command: Any) -> Any:
    """``--preprocess``: how images of a ``--data`` folder become inputs (ignored for numpy data)."""
    return click.option(
        "--preprocess",
        metavar="SPEC",
        help="For a folder of images: resize=WxH,scale=1/255,mean=M[,M,M],std=S[,S,S],layout=NCHW|NHWC,"
        "color=RGB|BGR|L; each value is (pixel * scale - mean) / std. Unset keys follow the model's input "
        "(size, layout, 1 channel = L), else scale=1/255, mean=0, std=1, NCHW, RGB.",
    )(command)


def model_inputs(proto: Any) -> list[Any]:
    """The model's graph inputs (initializers excluded) as ``InputSpec``: names and declared shapes."""
    from espquant.calibration.dataset import InputSpec
    from espquant.graph import tensor_shape

    initializers = {t.name for t in proto.graph.initializer}
    return [
        InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in (tensor_shape(i) or [])))
        for i in proto.graph.input
        if i.name not in initializers
    ]


def open_source(path: Path, proto: Any, preprocess: str | None, batch_size: int, what: str = "--data") -> Any:
    """A ``DataSource`` over ``path`` for ``proto``; batches hold a multiple of the model's fixed batch, if any."""
    from espquant.calibration.dataset import Chunking
    from espquant.calibration.sources import open_data

    step = Chunking.of(proto).step(batch_size)
    return open_data(path, model_inputs(proto), preprocess=preprocess, batch_size=step, what=what)
