"""Images to model inputs: the ``--preprocess`` spec and the one transform it describes.

ESP-DL expects normalisation outside the model, so a folder of JPEGs is only useful for calibration once the
same steps the application runs on the chip (resize, scale, mean / std, channel order, layout) are applied here.
The spec is one comma-separated string so that it fits a command line and a config file alike::

    resize=96x96,scale=1/255,mean=0.5,0.5,0.5,std=0.5,0.5,0.5,layout=NCHW,color=RGB

``resize`` is WIDTHxHEIGHT (bilinear, as PIL's ``Image.resize``); every value is ``(pixel * scale - mean) / std``
per channel, in float32. Keys left out are taken from the model's input when it declares them (the height
and width to resize to, the layout, 1 channel = grayscale), else: no resize, ``scale=1/255``, ``mean=0``,
``std=1``, ``NCHW``, ``RGB``. Pillow is an optional dependency (``pip install 'espquant[images]'``) imported
only when an image is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from espquant.errors import DatasetError, OptionError

__all__ = ["Preprocess", "parse_preprocess", "IMAGE_SUFFIXES", "load_image", "require_pillow"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_KEYS = ("resize", "scale", "mean", "std", "layout", "color")
_COLORS = {"RGB": "RGB", "BGR": "RGB", "L": "L", "GRAY": "L", "GREY": "L"}


@dataclass(frozen=True)
class Preprocess:
    """What turns one decoded image into one float32 sample (module docstring); None fields are not set yet."""

    resize: tuple[int, int] | None = None  # (width, height)
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None  # "NCHW" or "NHWC"
    color: str | None = None  # "RGB", "BGR" or "L"

    def for_input(self, shape: tuple[int | None, ...] | None) -> Preprocess:
        """Fill what the spec left out from the model input's declared shape (rank 4), then the defaults."""
        layout, color, size = self.layout, self.color, self.resize
        if shape is not None and len(shape) == 4:
            nchw = shape[1] in (1, 3) or (shape[3] not in (1, 3) and shape[1] is not None)
            layout = layout or ("NCHW" if nchw else "NHWC")
            if layout == "NCHW":
                channels, height, width = shape[1], shape[2], shape[3]
            else:
                height, width, channels = shape[1], shape[2], shape[3]
            color = color or ("L" if channels == 1 else None)
            if size is None and isinstance(height, int) and isinstance(width, int):
                size = (width, height)
        return replace(
            self,
            resize=size,
            scale=1 / 255 if self.scale is None else self.scale,
            mean=self.mean or (0.0,),
            std=self.std or (1.0,),
            layout=layout or "NCHW",
            color=color or "RGB",
        )

    def apply(self, image: Any, where: str) -> np.ndarray:
        """One PIL image -> one float32 sample ``(C, H, W)`` or ``(H, W, C)`` (filled by :meth:`for_input`)."""
        from PIL import Image

        color = self.color or "RGB"
        image = image.convert(_COLORS[color])
        if self.resize is not None and image.size != self.resize:
            image = image.resize(self.resize, Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if color == "BGR":
            pixels = pixels[:, :, ::-1]
        channels = pixels.shape[2]
        mean = _per_channel(self.mean or (0.0,), channels, "mean", where)
        std = _per_channel(self.std or (1.0,), channels, "std", where)
        values = (pixels * np.float32(1 / 255 if self.scale is None else self.scale) - mean) / std
        if (self.layout or "NCHW") == "NCHW":
            values = values.transpose(2, 0, 1)
        return np.ascontiguousarray(values, dtype=np.float32)


def _per_channel(values: tuple[float, ...], channels: int, key: str, where: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise DatasetError(f"{where}: --preprocess {key} has {len(values)} values for {channels} channel(s).")
    return np.asarray(values, dtype=np.float32)


def _number(text: str, key: str) -> float:
    """``0.5``, ``1/255`` or ``255``: a finite number, fractions written as a/b."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise OptionError(f"--preprocess {key}={text!r}: not a number (write 0.5, 1/255 ...).") from None
    if not np.isfinite(value):
        raise OptionError(f"--preprocess {key}={text!r}: give a finite number.")
    return value


def parse_preprocess(spec: str | None) -> Preprocess:
    """The spec string as a :class:`Preprocess`; every mistake is an :class:`OptionError` saying which key.

    Values with several numbers continue after commas (``mean=0.5,0.5,0.5``): a comma-separated part without
    ``=`` belongs to the key before it."""
    if spec is None or not spec.strip():
        return Preprocess()
    fields: dict[str, list[str]] = {}
    key: str | None = None
    for part in (p.strip() for p in spec.split(",")):
        if "=" in part:
            key, _, value = (s.strip() for s in part.partition("="))
            key = key.lower()
            if key not in _KEYS:
                raise OptionError(f"--preprocess: unknown key {key!r}; the keys are {', '.join(_KEYS)}.")
            if key in fields:
                raise OptionError(f"--preprocess: {key} is given twice.")
            fields[key] = [value]
        elif key is None or not part:
            raise OptionError(f"--preprocess {spec!r}: expected KEY=VALUE,... (e.g. resize=96x96,scale=1/255).")
        else:
            fields[key].append(part)
    parsed: dict[str, Any] = {}
    for key, values in fields.items():
        if key in ("mean", "std"):
            numbers = tuple(_number(v, key) for v in values)
            if key == "std" and any(v == 0 for v in numbers):
                raise OptionError("--preprocess std: a standard deviation of 0 divides by zero.")
            parsed[key] = numbers
            continue
        if len(values) != 1:
            raise OptionError(f"--preprocess {key}: takes one value, got {','.join(values)!r}.")
        value = values[0]
        if key == "resize":
            width, sep, height = value.lower().partition("x")
            if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
                raise OptionError(f"--preprocess resize={value!r}: write WIDTHxHEIGHT, e.g. resize=96x96.")
            parsed[key] = (int(width), int(height))
        elif key == "scale":
            parsed[key] = _number(value, key)
        elif key == "layout":
            if value.upper() not in ("NCHW", "NHWC"):
                raise OptionError(f"--preprocess layout={value!r}: use NCHW or NHWC.")
            parsed[key] = value.upper()
        else:  # color
            if value.upper() not in _COLORS:
                raise OptionError(f"--preprocess color={value!r}: use RGB, BGR or L (grayscale).")
            parsed[key] = "L" if _COLORS[value.upper()] == "L" else value.upper()
    return Preprocess(**parsed)


def require_pillow() -> None:
    """Pillow is optional: say how to get it instead of failing on an import deep inside the data loop."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DatasetError(
            "reading images needs Pillow, an optional dependency: pip install 'espquant[images]'."
        ) from None


def load_image(path: Path, preprocess: Preprocess) -> np.ndarray:
    """Decode one image file and preprocess it; a file Pillow cannot read is a DatasetError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return preprocess.apply(image, str(path))
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"{path}: cannot read this image ({type(exc).__name__}: {exc}); fix or remove it.") from exc
