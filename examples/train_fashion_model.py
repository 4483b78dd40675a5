#!/usr/bin/env python3
"""Train a small depthwise-separable CNN on Fashion-MNIST and export it to ONNX (for the layer-report example).

How to run (torch is needed only here; keep it out of the project's environment)::

    sudo apt-get install dataset-fashion-mnist          # the standard idx files, no internet download
    pip install torch==2.13.0 onnx onnxruntime
    python examples/train_fashion_model.py              # -> examples/.cache/fashion_dsconv.onnx + data
    python examples/fashion_mnist_report.py             # then analyse it with espquant

The network is the MobileNet pattern at MNIST scale: a 3x3 stem, three depthwise 3x3 + pointwise 1x1 blocks
with BatchNormalization and ReLU6 (``Clip``), global average pooling and a linear classifier. Depthwise layers
are where int8 usually hurts (few weights per channel, ranges that differ a lot between channels), which is
what the report is meant to show. Inputs are ``pixels / 256`` with shape ``(N, 1, 28, 28)``.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET = Path("/usr/share/datasets/fashion-mnist")
CACHE = REPO_ROOT / "examples" / ".cache"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST container): magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    _, kind, rank = struct.unpack_from(">HBB", data, 0)
    if kind != 0x08:
        raise ValueError(f"{path}: not uint8 idx data")
    dims = struct.unpack_from(f">{rank}I", data, 4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(dims)


def load(folder: Path) -> dict[str, np.ndarray]:
    if not folder.is_dir():
        raise SystemExit(f"{folder}: Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist`.")
    return {
        "train_images": read_idx(folder / "train-images-idx3-ubyte.gz"),
        "train_labels": read_idx(folder / "train-labels-idx1-ubyte.gz"),
        "test_images": read_idx(folder / "t10k-images-idx3-ubyte.gz"),
        "test_labels": read_idx(folder / "t10k-labels-idx1-ubyte.gz"),
    }


def block(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(inputs, inputs, 3, stride, 1, groups=inputs, bias=False),
        nn.BatchNorm2d(inputs),
        nn.ReLU6(),
        nn.Conv2d(inputs, outputs, 1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU6(),
    ]


def network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        *block(16, 32, 2),
        *block(32, 64, 2),
        *block(64, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = load(DATASET)
    train_x = torch.from_numpy(data["train_images"][:, None].astype(np.float32) / 256.0)
    train_y = torch.from_numpy(data["train_labels"].astype(np.int64))
    model = network()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * (len(train_x) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for i in range(0, len(order) - 127, 128):
            index = order[i : i + 128]
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "fashion_dsconv.onnx"
    example = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(
        model, example, path, input_names=["image"], output_names=["logits"], opset_version=17,
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, dynamo=False,
    )  # fmt: skip
    onnx.checker.check_model(onnx.load(path))
    test_x = data["test_images"][:, None].astype(np.float32) / 256.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"image": test_x[i : i + 500]})[0] for i in range(0, len(test_x), 500)])
    accuracy = float((logits.argmax(axis=1) == data["test_labels"]).mean())
    np.savez_compressed(
        CACHE / "fashion_data.npz",
        calib_images=data["train_images"][:1000],
        test_images=data["test_images"],
        test_labels=data["test_labels"],
    )
    print(f"wrote {path}: float accuracy {100 * accuracy:.2f}% on the 10,000 Fashion-MNIST test images")


if __name__ == "__main__":
    main()
