"""Calibration data the way people have it: image folders with --preprocess, .npy folders, iterables, tensors.

Preprocessing is held against a numpy reference; a damaged image is named; folders and generators stream
(one batch decoded at a time, a generator read once); calibrate and evaluate take every form."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from espquant.calibration.dataset import InputSpec
from espquant.calibration.preprocess import Preprocess, parse_preprocess
from espquant.calibration.sources import ArraySource, FileSource, IterableSource, open_data, to_numpy
from espquant.cli import main
from espquant.errors import DatasetError, OptionError
from helpers import make_model, tensor

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SPEC = "resize=6x5,scale=1/255,mean=0.5,0.4,0.3,std=0.2,0.25,0.5,layout=NCHW,color=RGB"


def _images(folder, count=7, size=(9, 7), seed=0):
    """PNG files of random pixels with names whose sorted order is not their creation order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for name in rng.permutation(count):
        image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"img_{name:03d}.png")
    return folder


def _reference(path, spec: Preprocess) -> np.ndarray:
    """The preprocessing written out in numpy (PIL only decodes and resizes)."""
    image = Image.open(path).convert("L" if spec.color == "L" else "RGB")
    if spec.resize:
        image = image.resize(spec.resize, Image.Resampling.BILINEAR)
    x = np.asarray(image).astype(np.float64)
    x = x[:, :, None] if x.ndim == 2 else x
    if spec.color == "BGR":
        x = x[:, :, ::-1]
    x = (x * spec.scale - np.asarray(spec.mean)) / np.asarray(spec.std)
    return (x.transpose(2, 0, 1) if spec.layout == "NCHW" else x).astype(np.float32)


@pytest.mark.parametrize(
    "spec",
    [SPEC, "resize=6x5,layout=NHWC,color=BGR,mean=10/255,std=2", "resize=4x4,color=L,scale=0.5,mean=1,std=3"],
)
def test_image_folder_matches_the_numpy_reference(tmp_path, spec):
    folder = _images(tmp_path / "imgs")
    parsed = parse_preprocess(spec).for_input(None)
    shape = (None, *(_reference(next(folder.iterdir()), parsed).shape))
    source = open_data(folder, [InputSpec("x", shape)], preprocess=spec, batch_size=3)
    batches = [inputs for inputs, _ in source.batches()]
    assert [len(b) for b in batches] == [3, 3, 1] and source.samples == 7
    got = np.concatenate(batches)
    want = np.stack([_reference(p, parsed) for p in sorted(folder.iterdir())])  # sorted name order
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    assert got.dtype == np.float32


def test_unset_keys_follow_the_model_input(tmp_path):
    folder = _images(tmp_path / "imgs", count=2)
    source = open_data(folder, [InputSpec("x", (None, 8, 10, 1))], batch_size=4)  # NHWC, grayscale, 10 wide
    ((batch, _),) = source.batches()
    assert batch.shape == (2, 8, 10, 1)
    spec = Preprocess(resize=(10, 8), scale=1 / 255, mean=(0.0,), std=(1.0,), layout="NHWC", color="L")
    np.testing.assert_allclose(batch[0], _reference(sorted(folder.iterdir())[0], spec), atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resize=96", "WIDTHxHEIGHT"),
        ("resize=0x4", "WIDTHxHEIGHT"),
        ("scale=abc", "not a number"),
        ("scale=1/0", "not a number"),
        ("mean=0.5,std=0", "divides by zero"),
        ("layout=CHW", "use NCHW or NHWC"),
        ("color=CMYK", "use RGB, BGR or L"),
        ("size=3x3", "unknown key 'size'"),
        ("0.5,scale=1", "expected KEY=VALUE"),
        ("scale=1,scale=2", "given twice"),
        ("layout=NCHW,NHWC", "takes one value"),
    ],
)
def test_bad_preprocess_specs_say_what_is_wrong(spec, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        parse_preprocess(spec)


def test_channel_count_mismatch_names_the_image(tmp_path):
    folder = _images(tmp_path / "imgs", count=1)
    source = open_data(folder, [InputSpec("x", (None, 3, 4, 4))], preprocess="mean=1,2")
    with pytest.raises(DatasetError, match="img_000.png.*mean has 2 values for 3 channel"):
        list(source.batches())


def test_an_unreadable_image_is_named(tmp_path):
    folder = _images(tmp_path / "imgs", count=3)
    (folder / "img_001.png").write_bytes(b"not a png at all")
    source = open_data(folder, [InputSpec("x", (None, 3, 7, 9))], batch_size=1)
    with pytest.raises(DatasetError, match=r"img_001\.png: cannot read this image"):
        list(source.batches())


def test_without_pillow_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    folder = _images(tmp_path / "imgs", count=1)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DatasetError, match=r"pip install 'espquant\[images\]'"):
        open_data(folder, [InputSpec("x", (None, 3, 7, 9))])


def test_image_folders_stream_one_batch_at_a_time(tmp_path, monkeypatch):
    import espquant.calibration.sources as sources

    folder = _images(tmp_path / "imgs", count=9)
    decoded = []
    real = sources.load_image
    monkeypatch.setattr(sources, "load_image", lambda path, spec: decoded.append(path) or real(path, spec))
    source = open_data(folder, [InputSpec("x", (None, 3, 7, 9))], batch_size=2)
    assert decoded == []  # opening lists file names only
    batches = source.batches()
    next(batches)
    assert len(decoded) == 2
    next(batches)
    assert len(decoded) == 4


def test_npy_folders_of_samples_and_of_batches(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.random((7, 2, 3)).astype(np.float32)
    samples, batches = tmp_path / "samples", tmp_path / "batches"
    samples.mkdir()
    batches.mkdir()
    for k, sample in enumerate(data):
        np.save(samples / f"s{k:02d}.npy", sample)
    np.save(batches / "a.npy", data[:4])
    np.save(batches / "b.npy", data[4:])
    for folder in (samples, batches):
        source = open_data(folder, [InputSpec("x", (None, 2, 3))], batch_size=3)
        assert source.samples == 7
        np.testing.assert_array_equal(np.concatenate([b for b, _ in source.batches()]), data)
        calib, held = source.split(0.2)
        got = np.concatenate([b for b, _ in held.batches()])
        assert len(got) >= 2 and np.array_equal(got, data[-len(got) :])
        assert calib.samples + held.samples == 7
    np.save(samples / "bad.npy", np.zeros((2, 2, 2, 3), np.float32))
    with pytest.raises(DatasetError, match="bad.npy: rank 4"):
        list(open_data(samples, [InputSpec("x", (None, 2, 3))]).batches())


def test_a_folder_without_data_or_with_both_kinds_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_data(tmp_path / "empty", [InputSpec("x", (None, 3))])
    mixed = _images(tmp_path / "mixed", count=1)
    np.save(mixed / "a.npy", np.zeros(3, np.float32))
    with pytest.raises(DatasetError, match="both images and .npy"):
        open_data(mixed, [InputSpec("x", (None, 3))])


def test_arrays_split_off_their_last_fifth():
    data = np.arange(12, dtype=np.float32)[:, None]
    calib, held = ArraySource(data, "x", 5).split(0.2)
    assert calib.samples == 9 and held.samples == 3  # ceil(2.4)
    assert np.array_equal(calib.calibration_data(), data[:9])
    assert np.array_equal(np.concatenate([b for b, _ in held.batches()]), data[9:])
    calib, held = ArraySource(data, "x", 5).split(0.2, multiple=4)  # a model with a fixed batch of 4
    assert (calib.samples, held.samples) == (8, 4)
    one = ArraySource(data[:1], "x")
    assert one.split(0.2) == (one, one)  # too small to hold out: used for both


class FakeTensor:
    """What torch tensors look like to espquant: detach().cpu().numpy(); torch is never imported."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.value


def test_tensor_batches_and_labelled_pairs_by_duck_typing():
    had_torch = "torch" in sys.modules
    loader = [(FakeTensor(np.ones((2, 3))), FakeTensor([1, 0])), (FakeTensor(np.zeros((1, 3))), FakeTensor([2]))]
    source = open_data(loader, [InputSpec("x", (None, 3))])
    (x0, y0), (x1, y1) = source.batches()
    assert x0.shape == (2, 3) and list(y0) == [1, 0] and list(y1) == [2]
    assert isinstance(to_numpy({"a": FakeTensor([1.0])})["a"], np.ndarray)
    calib, held = source.split(0.2)  # a sized, re-iterable loader: split by batch
    assert [len(b) for b, _ in calib.batches()] == [2] and [len(b) for b, _ in held.batches()] == [1]
    assert ("torch" in sys.modules) == had_torch  # duck typing: torch was not imported


def test_a_generator_is_read_once_and_lazily():
    pulled = []

    def stream():
        for k in range(10):
            pulled.append(k)
            yield np.full((2, 3), k, np.float32)

    source = open_data(stream(), [InputSpec("x", (None, 3))])
    assert isinstance(source, IterableSource) and pulled == []
    calib, held = source.split(0.2)
    assert pulled == []
    batches = calib.batches()
    first = next(batches)[0]
    assert first[0, 0] == 0 and len(pulled) <= 3  # it reads ahead only the part it holds back
    rest = [b[0, 0] for b, _ in batches]
    assert pulled == list(range(10))  # each batch produced exactly once
    kept = [b[0, 0] for b, _ in held.batches()]
    assert sorted([0, *rest, *kept]) == list(range(10)) and kept == [8, 9]


def test_a_file_source_is_sized_without_reading_images(tmp_path, monkeypatch):
    folder = _images(tmp_path / "imgs", count=5)
    source = open_data(folder, [InputSpec("x", (None, 3, 7, 9))])
    assert isinstance(source, FileSource) and source.samples == 5
    calib, held = source.split(0.2)
    assert (calib.samples, held.samples) == (4, 1)


@pytest.fixture
def image_model(tmp_path):
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W2", "b2"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "W": rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(0, 0.1, 6).astype(np.float32),
        "W2": rng.normal(0, 0.5, (4, 6)).astype(np.float32),
        "b2": np.zeros(4, np.float32),
    }
    path = tmp_path / "img_net.onnx"
    onnx.save(make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 4])], inits), path)
    return path


def test_calibrate_and_evaluate_take_an_image_folder(tmp_path, image_model):
    """An image folder calibrates to the same table as the same images preprocessed into one .npy file."""
    folder = _images(tmp_path / "imgs", count=6)
    spec = "resize=6x6,mean=0.5,std=0.25"
    parsed = parse_preprocess(spec).for_input((None, 3, 6, 6))
    np.save(tmp_path / "same.npy", np.stack([_reference(p, parsed) for p in sorted(folder.iterdir())]))
    runner = CliRunner()
    args = ["calibrate", str(image_model), "--preprocess", spec, "--json"]
    from_images = runner.invoke(main, [*args, "--data", str(folder), "-o", str(tmp_path / "a.pickle")])
    from_npy = runner.invoke(main, [*args, "--data", str(tmp_path / "same.npy"), "-o", str(tmp_path / "b.pickle")])
    assert from_images.exit_code == 0 and from_npy.exit_code == 0, from_images.output + from_npy.output
    a, b = json.loads(from_images.stdout), json.loads(from_npy.stdout)
    assert a["exponents"] == b["exponents"]
    np.save(tmp_path / "labels.npy", np.arange(6) % 4)
    evaluated = runner.invoke(
        main,
        ["evaluate", str(image_model), "--table", str(tmp_path / "a.pickle"), "--data", str(folder),
         "--preprocess", spec, "--labels", str(tmp_path / "labels.npy"), "--json"],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    document = json.loads(evaluated.stdout)
    assert document["samples"] == 6 and document["float_accuracy"] is not None
    bad = runner.invoke(main, [*args, "--data", str(folder), "--preprocess", "resize=6", "-o", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "WIDTHxHEIGHT" in bad.output
