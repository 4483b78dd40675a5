"""``espquant run`` and ``espquant inspect``: ESP-DL ``.espdl`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from espquant.cli.app import force_option, main, out
from espquant.errors import ModelError, OptionError


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", metavar="CHIP", help="Target chip, for files that do not record it (ESP-DL 3.0.x).")
@click.option("--self-test", is_flag=True, help="Run the file's embedded test inputs and compare with its outputs.")
@click.option(
    "--input",
    "input_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Quantized input(s): NAME=file.npy, or file.npy for a single-input model.",
)
@click.option(
    "--float-input",
    is_flag=True,
    help="The --input files hold float values: quantize them with each input's exponent as the chip's caller "
    "would (without it, inputs must already be int8 / int16 integers).",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Save the simulated outputs to this .npz file.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@force_option
@click.pass_context
def run(
    ctx: click.Context,
    model: Path,
    target: str | None,
    self_test: bool,
    input_paths: tuple[Path, ...],
    float_input: bool,
    output: Path | None,
    as_json: bool,
    force: bool,
) -> None:
    """Simulate an ESP-DL .espdl model: the integers the chip computes, from the file alone.

    \b
    Examples:
      espquant run model.espdl --self-test
      espquant run old_model.espdl --target esp32p4 --self-test --json
      espquant run model.espdl --input x.npy -o outputs.npz
    """
    from espquant.files import guard_outputs
    from espquant.simulator.espdl_model import compare_output, load_espdl

    if self_test and input_paths:
        raise OptionError("give --self-test or --input, not both.")
    if output is not None:
        files = [Path(str(text).rpartition("=")[2]) for text in input_paths]
        guard_outputs([output], [model, *files], force)
    loaded = load_espdl(model, target)
    if self_test:
        values = loaded.test_values
        if values is None:
            raise OptionError(f"{model}: the file embeds no test values; give --input instead.")
        inputs, expected = values
        _check_digest(loaded.file)
        got = loaded.run(inputs, keep=True)
        if output is not None:
            _save_outputs(output, {name: got[name] for name in expected})
        rows = []
        for name, want in expected.items():
            equal, detail = compare_output(got[name], want)
            rows.append({"output": name, "equal": equal, "detail": detail})
        if as_json:
            click.echo(json.dumps({"model": str(model), "target": loaded.profile.name, "outputs": rows}, indent=2))
        else:
            table = Table(
                title=f"{model} on {loaded.profile.name}: simulation vs embedded outputs", title_justify="left"
            )
            for column in ("output", "equal", "detail"):
                table.add_column(column)
            for row in rows:
                table.add_row(row["output"], "[green]yes[/]" if row["equal"] else "[bold red]no[/]", row["detail"])
            out.print(table)
        if not all(row["equal"] for row in rows):
            ctx.exit(1)
        return
    if not input_paths:
        raise OptionError("give --input NAME=file.npy (or --self-test).")
    feeds = {}
    names = [v.name for v in loaded.inputs]
    for text in input_paths:
        name, _, file = str(text).rpartition("=")
        if not name:
            if len(names) != 1:
                raise OptionError(f"the model has inputs {names}: use --input NAME=file.npy.")
            name = names[0]
        if name not in names:
            raise OptionError(f"--input {text}: the model has no input {name!r} (its inputs: {names}).")
        feeds[name] = _input_array(loaded, name, Path(file), float_input)
    results = loaded.run(feeds)
    if output is not None:
        import io

        from espquant.files import atomic_write_bytes

        buffer = io.BytesIO()
        np.savez(buffer, **results)
        atomic_write_bytes(output, buffer.getvalue())
    if as_json:
        click.echo(json.dumps({name: value.tolist() for name, value in results.items()}))
    else:
        for name, value in results.items():
            declared = next(v for v in loaded.outputs if v.name == name)
            out.print(f"{name}: {value.dtype} {list(value.shape)}, exponent {declared.exponent}")
            out.print(np.array2string(value, threshold=64))


def _input_array(loaded: Any, name: str, path: Path, float_input: bool) -> np.ndarray:
    """One ``--input`` file as the integers the model's input takes: its declared width, range and size."""
    from espquant.arrays import load_arrays

    data = load_arrays(path, "--input")
    if isinstance(data, dict):
        raise OptionError(f"--input {path}: an archive of {len(data)} arrays; give one .npy per input.")
    data = np.asarray(data)
    declared = next(v for v in loaded.inputs if v.name == name)
    if declared.shape and -1 not in declared.shape and data.size != int(np.prod(declared.shape)):
        raise OptionError(
            f"--input {path}: shape {list(data.shape)} does not fit input {name!r} of shape {list(declared.shape)}"
        )
    if float_input:
        if data.dtype.kind not in "fiu":
            raise OptionError(f"--input {path}: {data.dtype} values are not numbers.")
        return loaded.quantized.quantize_input(name, data.astype(np.float32))
    bits = {"INT8": 8, "INT16": 16}.get(declared.dtype)
    if data.dtype.kind not in "iu":
        raise OptionError(
            f"--input {path}: {data.dtype} values for {declared.dtype} input {name!r}; give integers, or pass "
            "--float-input to quantize float values with the input's exponent."
        )
    if bits is not None and data.size and (int(data.min()) < -(2 ** (bits - 1)) or int(data.max()) >= 2 ** (bits - 1)):
        raise OptionError(
            f"--input {path}: values {int(data.min())}..{int(data.max())} do not fit input {name!r} "
            f"({declared.dtype}); quantize them first, or pass --float-input."
        )
    return data


def _check_digest(decoded: Any) -> None:
    """A file whose content digest (written by espquant's exporter) no longer matches is damaged: the embedded
    test values cover one input and may still agree, so refuse before comparing them."""
    from espquant.espdl import verify_digest

    if verify_digest(decoded) is False:
        raise ModelError(
            f"{decoded.path}: the contents no longer match the digest stored at export (espquant.digest): the "
            "file is damaged or was edited; export it again."
        )


def _save_outputs(path: Path, outputs: dict[str, np.ndarray]) -> None:
    """The simulated outputs as one ``.npz`` (one array per output name), written atomically."""
    import io

    from espquant.files import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **outputs)
    atomic_write_bytes(path, buffer.getvalue())


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the decoded file as JSON.")
def inspect(model: Path, as_json: bool) -> None:
    """Show what an ESP-DL .espdl file holds: nodes, exponents, constants and test values.

    Reads both containers (EDL2, and the EDL1 of ESP-DL 3.0.x).

    \b
    Examples:
      espquant inspect model.espdl
      espquant inspect model.espdl --json
    """
    from espquant.espdl import verify_digest
    from espquant.export import read_espdl

    decoded = read_espdl(model)
    verified = verify_digest(decoded)
    digest = {True: "verified", False: "MISMATCH (the file is damaged or was edited)", None: "none stored"}[verified]
    if as_json:
        click.echo(json.dumps({**_espdl_summary(decoded), "digest": digest}, indent=2))
        _check_digest(decoded)
        return
    out.print(
        f"[bold]{model}[/]: {decoded.container}, target {decoded.target or 'not recorded'}, "
        f"ir_version {decoded.ir_version}, graph {decoded.graph_name!r}, content digest {digest}"
    )
    nodes = Table(title=f"{len(decoded.nodes)} node(s)", title_justify="left")
    for column in ("node", "op", "quant", "inputs -> outputs", "attributes"):
        nodes.add_column(column, overflow="fold")
    for node in decoded.nodes:
        attrs = ", ".join(f"{k}={v}" for k, v in node.attributes.items() if k != "quant_type")
        nodes.add_row(
            node.name, node.op_type, node.quant_type, f"{', '.join(node.inputs)} -> {', '.join(node.outputs)}", attrs
        )
    out.print(nodes)
    tensors = Table(title="variables and constants", title_justify="left")
    for column in ("name", "kind", "dtype", "shape", "exponent(s)"):
        tensors.add_column(column, overflow="fold")
    for value in decoded.values.values():
        tensors.add_row(value.name, "variable", value.dtype, str(list(value.shape or [])), str(value.exponents))
    for tensor in decoded.initializers.values():
        layout = f" {tensor.doc}" if tensor.doc else ""
        tensors.add_row(tensor.name, f"constant{layout}", tensor.dtype, str(list(tensor.dims)), str(tensor.exponents))
    out.print(tensors)
    for label, values in (("test input", decoded.test_inputs), ("test output", decoded.test_outputs)):
        for tensor in values.values():
            out.print(
                f"{label} {tensor.name!r}: {tensor.dtype} {list(tensor.dims)}, exponent {tensor.exponent}, "
                f"values {np.array2string(tensor.data.reshape(-1)[:8], separator=' ')}"
                f"{' ...' if tensor.data.size > 8 else ''}"
            )
    _check_digest(decoded)


def _espdl_summary(decoded: Any) -> dict[str, Any]:
    def tensor(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": t.dtype, "dims": list(t.dims), "exponents": t.exponents, "doc": t.doc}

    return {
        "path": decoded.path,
        "container": decoded.container,
        "target": decoded.target,
        "ir_version": decoded.ir_version,
        "nodes": [
            {
                "name": n.name,
                "op_type": n.op_type,
                "inputs": n.inputs,
                "outputs": n.outputs,
                "attributes": {k: v for k, v in n.attributes.items() if not hasattr(v, "data")},
            }
            for n in decoded.nodes
        ],
        "values": [vars(v) for v in decoded.values.values()],
        "initializers": [tensor(t) for t in decoded.initializers.values()],
        "test_inputs": [tensor(t) for t in decoded.test_inputs.values()],
        "test_outputs": [tensor(t) for t in decoded.test_outputs.values()],
    }
