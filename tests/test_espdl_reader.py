"""The .espdl reader on Espressif's own files (../shared/vectors), plus damaged and foreign files."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from conftest import shared_dir
from espquant.errors import ModelError
from espquant.export import read_espdl

VECTORS = shared_dir() / "vectors"
FILES = sorted(VECTORS.glob("*/*.espdl")) if VECTORS.is_dir() else []
needs_vectors = pytest.mark.skipif(
    not FILES, reason=f"Espressif's reference vectors not found at {VECTORS} (set ESPQUANT_SHARED to the shared folder)"
)
_BYTES = {"INT8": 1, "UINT8": 1, "INT16": 2, "INT32": 4, "INT64": 8, "FLOAT": 4, "DOUBLE": 8, "BOOL": 1}


@needs_vectors
@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_every_vector_file_decodes_consistently(path):
    model = read_espdl(path)
    assert model.container == ("EDL2" if path.parent.name == "espdl-gemm" else "EDL1")
    assert model.nodes and model.inputs and model.outputs
    known = set(model.values) | set(model.initializers) | {v.name for v in model.inputs}
    for node in model.nodes:
        assert node.op_type
        for name in node.inputs:
            assert not name or name in known, f"{node.name}: input {name!r} undeclared"
    assert model.test_inputs and model.test_outputs
    for tensor in [*model.test_inputs.values(), *model.test_outputs.values()]:
        declared = model.values.get(tensor.name) or next(v for v in model.inputs if v.name == tensor.name)
        assert tensor.dtype == declared.dtype, tensor.name
        if tensor.dtype in ("INT8", "INT16"):
            assert tensor.exponents == declared.exponents[:1], tensor.name
        if declared.shape:
            assert int(np.prod(tensor.dims)) == int(np.prod(declared.shape)), tensor.name
    for tensor in model.initializers.values():
        assert tensor.data.size == int(np.prod(tensor.dims)) if tensor.dims else True
        assert tensor.exponents, tensor.name


def _round_shift(acc: np.ndarray, shift: int, half_even: bool) -> np.ndarray:
    """SR(a, s) of ARITHMETIC.md section 3, in Python integers."""
    out = []
    for a in acc.tolist():
        q, r = divmod(a, 1 << shift)
        half = 1 << (shift - 1)
        if r > half or (r == half and (not half_even or q % 2 == 1)):
            q += 1
        out.append(q)
    return np.array(out, dtype=np.int64)


@needs_vectors
@pytest.mark.parametrize("target", ["c", "esp32s3", "esp32p4"])
def test_gemm_weights_decode_to_the_layout_the_spec_describes(target):
    # Decoding is right if the spec's arithmetic (section 4.5) reproduces the stored outputs exactly.
    model = read_espdl(VECTORS / "espdl-gemm" / f"{target}_linear_ishap_1_31_kshap_32_31_relu_s8.espdl")
    assert model.target == target
    node = model.nodes[0]
    weight, bias = model.initializers[node.inputs[1]], model.initializers[node.inputs[2]]
    k, n = weight.dims[2], weight.dims[3]
    flat = weight.data.reshape(-1).astype(np.int64)
    if target == "c":
        w = flat.reshape(n, k)  # [N][K]
    else:  # (N/16)HWC16: blocks of 16 output channels interleaved per input channel, then a plain tail
        lanes, blocks = 16, n // 16
        head = flat[: blocks * lanes * k].reshape(blocks, k, lanes).transpose(0, 2, 1).reshape(blocks * lanes, k)
        w = np.concatenate([head, flat[blocks * lanes * k :].reshape(n - blocks * lanes, k)])
    x_tensor = next(iter(model.test_inputs.values()))
    y_tensor = next(iter(model.test_outputs.values()))
    x = x_tensor.data.reshape(-1).astype(np.int64)
    shift = y_tensor.exponent - x_tensor.exponent - weight.exponent
    assert bias.exponent == x_tensor.exponent + weight.exponent
    acc = w @ x + bias.data.astype(np.int64)
    y = np.clip(np.maximum(_round_shift(acc, shift, half_even=target == "esp32p4"), 0), -128, 127)
    np.testing.assert_array_equal(y, y_tensor.data.reshape(-1))


def test_missing_wrong_truncated_and_encrypted_files(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        read_espdl(tmp_path / "none.espdl")
    foreign = tmp_path / "model.espdl"
    foreign.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ModelError, match="not an ESP-DL model"):
        read_espdl(foreign)
    truncated = tmp_path / "cut.espdl"
    truncated.write_bytes(b"EDL2" + struct.pack("<II", 0, 4096) + bytes(20))
    with pytest.raises(ModelError, match="truncated"):
        read_espdl(truncated)
    encrypted = tmp_path / "secret.espdl"
    encrypted.write_bytes(b"EDL2" + struct.pack("<II", 1, 16) + bytes(20))
    with pytest.raises(ModelError, match="encrypted"):
        read_espdl(encrypted)


@needs_vectors
def test_damaged_payload_is_a_model_error(tmp_path):
    data = bytearray((VECTORS / "espdl-gemm" / "c_linear_ishap_1_16_kshap_16_16_relu_s8.espdl").read_bytes())
    data[20:60] = b"\xff" * 40  # corrupt the root table
    broken = tmp_path / "broken.espdl"
    broken.write_bytes(bytes(data))
    with pytest.raises(ModelError):
        read_espdl(broken)


@needs_vectors
def test_cli_inspect(tmp_path):
    import json

    from click.testing import CliRunner

    from espquant.cli import main

    path = VECTORS / "espdl-gemm" / "esp32p4_linear_ishap_1_31_kshap_32_31_relu_s8.espdl"
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "EDL2, target esp32p4" in result.output and "(N/16)HWC16" in result.output
    report = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    assert report["nodes"][0]["op_type"] == "Gemm" and report["nodes"][0]["attributes"]["activation"] == "Relu"
    bad = tmp_path / "bad.espdl"
    bad.write_bytes(b"nope" * 10)
    result = CliRunner().invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 1 and "not an ESP-DL model" in result.output
