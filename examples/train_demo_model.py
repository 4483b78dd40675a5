#!/usr/bin/env python3
"""Train the small MNIST CNN shipped with espquant and export it to ONNX.

How to run (from the repository root; torch is needed only here, so keep it
out of the project's own environment, e.g. in a separate venv)::

    pip install torch==2.13.0 onnx onnxruntime
    python examples/fetch_mnist.py && python examples/train_demo_model.py

Why this model looks the way it does
------------------------------------
The model is the demo/test fixture for the quantizer, so it is small (about
22k parameters, well under 300 KB as ONNX) yet covers the op types an ESP-DL
model typically has: ``Conv``, unfused ``BatchNormalization`` (as exported
from training code; folding BN is the quantizer's job), ``Relu``,
``MaxPool``, a residual ``Add``, a depthwise ``Conv`` (groups == channels),
``Flatten`` and ``Gemm``.

Preprocessing is part of the contract and lives outside the model: the input
is ``float32 = uint8 pixels / 256.0`` with shape ``(N, 1, 28, 28)``; the
first node is a ``Conv`` on the input, with no normalization in between.

Export uses the TorchScript exporter (``dynamo=False``) with constant
folding off: the newer dynamo exporter folds BN into the Conv and turns
``Flatten`` into ``Reshape``, which would hide exactly what the quantizer is
meant to handle. After export the script checks the graph (BN present,
``onnx.checker``, single file), compares onnxruntime against torch and reports
accuracy on the full official 10k test set and on the 2000 shipped images.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "examples" / ".cache" / "mnist_full.npz"
DEFAULT_DEMO = REPO_ROOT / "src" / "espquant" / "data" / "demo_mnist.npz"
DEFAULT_OUT = REPO_ROOT / "src" / "espquant" / "data" / "demo_mnist_cnn.onnx"

OPSET = 17
"""Widely supported by ESP-DL tooling; no op here differs in 17 vs. 18."""

PIXEL_SCALE = 256.0
"""Input = uint8 / 256, matching how the original pickle stored the pixels."""

REQUIRED_OPS = {"Conv", "BatchNormalization", "Relu", "MaxPool", "Add", "Flatten", "Gemm"}


def to_input(images_u8: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Apply the model's fixed preprocessing: (N,28,28) uint8 -> (N,1,28,28)."""
    return (images_u8.astype(np.float32) / np.float32(PIXEL_SCALE))[:, None]


class ConvBNReLU(nn.Sequential):
    """Conv -> BatchNorm -> ReLU, the usual training-time block."""

    def __init__(self, cin: int, cout: int, k: int, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResidualDW(nn.Module):
    """``relu(x + f(x))`` with f = depthwise 3x3 -> BN -> ReLU -> 1x1 -> BN.

    Shapes match on both branches, so the ``Add`` needs no projection; the
    depthwise conv (groups == channels) is the case ESP-DL handles specially.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = ConvBNReLU(channels, channels, 3, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.pw_bn(self.pw(self.dw(x))))


class DemoCNN(nn.Module):
    """28x28 digits -> 10 logits; about 22k parameters."""

    def __init__(self, c1: int = 16, c2: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(1, c1, 3),  # 28x28, first node is a Conv on the input
            nn.MaxPool2d(2),  # 14x14
            ConvBNReLU(c1, c2, 3),
            nn.MaxPool2d(2),  # 7x7
            ResidualDW(c2),
        )
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.1)  # identity in eval, absent from ONNX
        self.fc = nn.Linear(c2 * 7 * 7, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.flatten(self.features(x))))


def seed_everything(seed: int) -> None:
    """Seed every RNG used so reruns give the same model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill).

    Cheap augmentation that reliably adds a few tenths of a percent on MNIST.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return padded[idx_n, 0, rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def torch_predict(model: nn.Module, x: NDArray[np.float32], batch: int = 1000) -> NDArray[np.float32]:
    """Logits of ``model`` (in eval mode) for preprocessed inputs ``x``."""
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def accuracy(logits: NDArray[np.float32], labels: NDArray[np.integer]) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(axis=1) == labels).mean())


def train(
    model: nn.Module, data: dict[str, NDArray], epochs: int, batch: int, lr: float, seed: int
) -> tuple[nn.Module, int, float]:
    """Train with AdamW + one-cycle LR; return the best-validation weights."""
    x_train = torch.from_numpy(to_input(data["train_images"]))
    y_train = torch.from_numpy(data["train_labels"].astype(np.int64))
    x_val = to_input(data["val_images"])
    y_val = data["val_labels"]

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)

    best_state, best_epoch, best_val = copy.deepcopy(model.state_dict()), 0, -1.0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total_loss = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            xb = random_shift(x_train[idx], 2, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
        val_acc = accuracy(torch_predict(model, x_val), y_val)
        print(
            f"epoch {epoch:2d}/{epochs}: loss {total_loss / len(perm):.4f} "
            f"val acc {val_acc:.4f} ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        if val_acc >= best_val:  # ties go to the later (lower-LR) epoch
            best_state, best_epoch, best_val = copy.deepcopy(model.state_dict()), epoch, val_acc
    model.load_state_dict(best_state)
    model.eval()
    return model, best_epoch, best_val


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export to a single ONNX file, keeping BatchNormalization unfused.

    ``do_constant_folding=False`` stops the TorchScript exporter from folding
    BN into the preceding Conv in eval mode. The file is written to a temp
    file next to ``path`` and moved into place atomically.
    """
    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # The TorchScript exporter is chosen on purpose (see module doc).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            tmp,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
        )
        proto = onnx.load(tmp)
        proto.doc_string = (
            "espquant demo MNIST CNN. Input 'input': float32 "
            "(N,1,28,28) = uint8 pixels / 256.0, no other "
            "normalization. Output 'logits': (N,10)."
        )
        onnx.save(proto, tmp)  # small model: weights stay inside the file
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_onnx(path: Path, n_bn_modules: int) -> list[str]:
    """Structural checks on the exported file; returns the node op types."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]

    domains = {n.domain for n in proto.graph.node} | {o.domain for o in proto.opset_import}
    assert domains <= {"", "ai.onnx"}, f"non-default domains: {domains}"
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in proto.graph.initializer), (
        "external data found"
    )
    assert ops[0] == "Conv" and proto.graph.node[0].input[0] == "input", "the model must start with a Conv on the input"
    missing = REQUIRED_OPS - set(ops)
    assert not missing, f"missing op types: {missing}"
    assert ops.count("BatchNormalization") == n_bn_modules, (
        f"{ops.count('BatchNormalization')} BN nodes for {n_bn_modules} BN modules"
    )
    depthwise = [
        n for n in proto.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert depthwise, "no depthwise Conv found"

    (inp,), (out,) = proto.graph.input, proto.graph.output
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert inp.name == "input" and in_dims == ["N", 1, 28, 28], (inp.name, in_dims)
    assert out.name == "logits" and out_dims == ["N", 10], (out.name, out_dims)
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    return ops


def ort_predict(path: Path, x: NDArray[np.float32], batch: int = 1000) -> NDArray[np.float32]:
    """Logits from onnxruntime (CPU), batched to exercise the dynamic N."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [sess.run(["logits"], {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def main(argv: list[str] | None = None) -> int:
    """Train, export, verify, summarize."""
    parser = argparse.ArgumentParser(description="Train and export the espquant demo CNN.")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="full MNIST from fetch_mnist.py (default: %(default)s)",
    )
    parser.add_argument(
        "--demo",
        type=Path,
        default=DEFAULT_DEMO,
        help="shipped subset from fetch_mnist.py (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="ONNX file to write (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    if not args.cache.exists():
        print(f"{args.cache} not found: run examples/fetch_mnist.py first", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    # Denormal floats show up in the first iterations and make CPU kernels
    # 10-20x slower; flushing them to zero keeps training at ~2 minutes.
    torch.set_flush_denormal(True)
    seed_everything(args.seed)
    with np.load(args.cache) as npz:
        data = {k: npz[k] for k in npz.files}
    with np.load(args.demo) as npz:
        demo = {k: npz[k] for k in npz.files}
    # The shipped test images must be the head of the official test set.
    assert np.array_equal(demo["test_images"], data["test_images"][: len(demo["test_images"])])
    assert np.array_equal(demo["test_labels"], data["test_labels"][: len(demo["test_labels"])])

    model = DemoCNN()
    n_params = sum(p.numel() for p in model.parameters())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    print(
        f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime "
        f"{ort.__version__}; {n_params} parameters, {n_bn} BatchNorm layers"
    )

    t0 = time.perf_counter()
    model, best_epoch, best_val = train(model, data, args.epochs, args.batch, args.lr, args.seed)
    train_s = time.perf_counter() - t0
    print(f"training took {train_s:.0f}s; best validation acc {best_val:.4f} at epoch {best_epoch}")

    x_test = to_input(data["test_images"])
    y_test = data["test_labels"]
    torch_logits = torch_predict(model, x_test)

    export_onnx(model, args.out)
    ops = check_onnx(args.out, n_bn)
    ort_logits = ort_predict(args.out, x_test)
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    assert max_diff < 1e-4, f"onnxruntime vs torch max abs diff {max_diff}"

    x_demo = to_input(demo["test_images"])
    ort_demo = ort_predict(args.out, x_demo, batch=len(x_demo))
    acc_full_torch = accuracy(torch_logits, y_test)
    acc_full = accuracy(ort_logits, y_test)
    acc_demo = accuracy(ort_demo, demo["test_labels"])
    assert acc_full >= 0.98, f"test accuracy {acc_full:.4f} below 98%"

    print(f"\nONNX graph: {len(ops)} nodes, opset {OPSET}")
    print("  node op types in order: " + " ".join(ops))
    print("  counts: " + ", ".join(f"{k}={v}" for k, v in sorted(Counter(ops).items())))
    print("\n=== summary ===")
    print(f"parameters:                    {n_params}")
    print(
        f"training time:                 {train_s:.0f}s ({args.epochs} epochs, "
        f"{args.threads} threads), best epoch {best_epoch}"
    )
    print(f"val acc (10k, torch):          {best_val:.4f}")
    print(f"test acc (10k, torch):         {acc_full_torch:.4f}")
    print(f"test acc (10k, onnxruntime):   {acc_full:.4f}")
    print(f"test acc (2000 shipped, ort):  {acc_demo:.4f}")
    print(f"max |ort - torch| logits:      {max_diff:.2e}")
    print(
        f"{args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out}: "
        f"{args.out.stat().st_size / 1024:.1f} KB"
    )
    print(
        f"{args.demo.relative_to(REPO_ROOT) if args.demo.is_relative_to(REPO_ROOT) else args.demo}: "
        f"{args.demo.stat().st_size / 1024:.1f} KB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
