"""The C++ text of legacy layers: the coefficient ``.cpp`` / ``.hpp`` pair, the model header, and the summary
table printed after an export."""

from __future__ import annotations

import logging
import re

import numpy as np

from espquant.export.cpp.layers import LegacyLayer, _ctype
from espquant.simulator.legacy import (
    PER_CHANNEL_BIAS_SHIFT,
)
from espquant.simulator.quantized_model import QuantizedModel

logger = logging.getLogger("espquant.export.cpp")


def _array(values: np.ndarray, per_line: int = 16) -> str:
    flat = [int(v) for v in np.asarray(values).reshape(-1)]
    lines = []
    for start in range(0, len(flat), per_line):
        lines.append("        " + ", ".join(f"{v:6d}" for v in flat[start : start + per_line]))
    return ",\n".join(lines)


def _shape(values: list[int]) -> str:
    """A C++ initializer list; one value is written ``{n,}`` as the legacy converter does."""
    text = ", ".join(str(int(v)) for v in values)
    return "{" + text + (",}" if len(values) == 1 else "}")


def _comment(text: str) -> str:
    """ONNX names inside a ``//`` comment: no line breaks or other control characters."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def _getter_types(layer: LegacyLayer) -> list[tuple[str, str]]:
    classes = {"filter": "Filter", "bias": "Bias", "activation": "Activation"}
    return [(kind, f"dl::{classes[kind]}<{c.ctype}>") for kind, c in layer.constants.items()]


def _render_hpp(layers: list[LegacyLayer], namespace: str, banner: str) -> str:
    out = [
        banner,
        "#pragma once",
        "",
        "#include <stddef.h>",  # NULL: dl_constant.hpp uses it without including a header that defines it
        "#include <stdint.h>",
        '#include "dl_constant.hpp"',
        "",
        f"namespace {namespace}",
        "{",
    ]
    for layer in layers:
        for kind, ctype in _getter_types(layer):
            out.append(f"    const {ctype} *get_{layer.name}_{kind}();")
    out += ["}", ""]
    return "\n".join(out)


def _render_cpp(layers: list[LegacyLayer], namespace: str, file_name: str, banner: str) -> str:
    classes = {"filter": "Filter", "bias": "Bias", "activation": "Activation"}
    out = [banner, f'#include "{file_name}.hpp"', "using namespace dl;", "", f"namespace {namespace}", "{"]
    for layer in layers:
        if not layer.constants:
            continue
        out.append(f"    // layer {layer.name}: ONNX node '{_comment(layer.node)}' ({layer.op_type}) -> {layer.cls}")
        for kind, c in layer.constants.items():
            var = f"{layer.name}_{kind}"
            cls = f"{classes[kind]}<{c.ctype}>"
            if c.elements is not None:
                out.append(f"    const static __attribute__((aligned(16))) {c.ctype} {var}_element[] = {{")
                out.append(_array(c.elements) + "};")
                out.append("")
            if kind == "filter":
                dilation = _shape(c.dilation or [1, 1])
                if isinstance(c.exponent, list):
                    values = ", ".join(str(e) for e in c.exponent)
                    out.append(f"    const static int8_t {var}_exponent[] = {{{values}}};")
                    out.append(
                        f"    const static {cls} {var}({var}_element, {var}_exponent, {len(c.exponent)}, "
                        f"{_shape(c.shape)}, {dilation});"
                    )
                else:
                    out.append(
                        f"    const static {cls} {var}({var}_element, {c.exponent}, {_shape(c.shape)}, {dilation});"
                    )
            elif kind == "bias":
                out.append(f"    const static {cls} {var}({var}_element, {c.exponent}, {_shape(c.shape)});")
            elif c.elements is None:
                out.append(f"    const static {cls} {var}({c.activation_type});")
            else:
                arguments = f"{c.activation_type}, {var}_element, {c.exponent}, {_shape(c.shape)}"
                out.append(f"    const static {cls} {var}({arguments});")
            out += [f"    const {cls} *get_{var}()", "    {", f"        return &{var};", "    }", ""]
    out += ["}", ""]
    return "\n".join(out)


def _class_name(namespace: str) -> str:
    camel = "".join(part[:1].upper() + part[1:] for part in namespace.split("_") if part)
    camel = camel if camel[:1].isalpha() else "M" + camel
    return camel if camel.endswith("Model") else camel + "Model"


def _storage(layers: list[LegacyLayer]) -> dict[str, str]:
    """Tensor -> the tensor whose memory it is: an in-place layer's output is its input's tensor, so the input is
    freed only after the last read of either."""
    storage: dict[str, str] = {}
    for layer in layers:
        if layer.in_place:
            storage[layer.output] = storage.get(layer.inputs[0], layer.inputs[0])
    return storage


def _render_model(
    layers: list[LegacyLayer], q: QuantizedModel, model_input: str, namespace: str, file_name: str, banner: str
) -> str:
    ctype = _ctype(q.bits)
    cls = _class_name(namespace)
    producer = {layer.output: layer for layer in layers}
    storage = _storage(layers)
    outputs = {storage.get(o, o) for o in q.outputs}
    last_use: dict[str, int] = {}
    for index, layer in enumerate(layers):
        for tensor in layer.inputs:
            last_use[storage.get(tensor, tensor)] = index

    def ref(tensor: str) -> str:
        return "input" if tensor == model_input else f"this->{producer[tensor].name}.get_output()"

    input_shape: tuple[int, ...] = ()
    for layer in layers:
        if model_input in layer.inputs:
            input_shape = layer.input_shapes[layer.inputs.index(model_input)]
            break
    out_layers = [producer[o] for o in q.outputs if o in producer]
    headers = ["dl_layer_model.hpp", *dict.fromkeys(layer.header for layer in layers)]
    out = [banner, "#pragma once", "", "#include <stddef.h>", "#include <stdint.h>"]
    out += [f'#include "{h}"' for h in headers]
    out += [f'#include "{file_name}.hpp"', ""]
    out += [
        "/**",
        f" * @brief {cls}: the quantized model as legacy ESP-DL layers, in graph order.",
        " *",
        f" * Input: a dl::Tensor<{ctype}> of shape {_shape(list(input_shape))} ([height, width, channel]),",
        f" *        exponent {q.exponent(model_input)} (value = int * 2^exponent); call forward(input).",
    ]
    for layer in out_layers:
        out.append(
            f" * Output: this->{layer.name}.get_output(), shape {_shape(list(layer.output_shape))}, exponent "
            f"{layer.output_exponent} (ESP-DL [H][W][C] element order)."
        )
    in_place = [layer.name for layer in layers if layer.in_place]
    if in_place:
        out.append(f" * In place (their input tensor is their output): {', '.join(in_place)}.")
    out += [
        " * Construct the model after static initialisation (e.g. inside app_main), as the legacy examples do:",
        " * the layers keep pointers to the coefficients of the generated .cpp.",
        " */",
        f"class {cls} : public dl::layer::Model<{ctype}>",
        "{",
        "public:",
        f"    static constexpr int input_exponent = {q.exponent(model_input)};",
        "",
    ]
    for layer in layers:
        out.append(f"    dl::layer::{layer.cls}<{layer.template}> {layer.name}; // {_comment(layer.node)}")
    out.append("")
    inits = []
    for layer in layers:
        args = [a.replace("{ns}", namespace) for a in layer.args] + [f'"{layer.name}"']
        args += ["true"] if layer.in_place else []  # the constructor's ``bool inplace`` after the name
        inits.append(f"{layer.name}({', '.join(args)})")
    out.append(f"    {cls}()")
    out.append("        : " + ",\n          ".join(inits))
    out += ["    {", "    }", ""]
    out += [f"    void build(dl::Tensor<{ctype}> &input)", "    {"]
    for layer in layers:
        if layer.cls == "Concat":
            refs = ", ".join(f"&{ref(t)}" for t in layer.inputs)
            out.append(f"        this->{layer.name}.build({{{refs}}});")
        else:
            out.append(f"        this->{layer.name}.build({', '.join(ref(t) for t in layer.inputs)});")
    out += ["    }", "", f"    void call(dl::Tensor<{ctype}> &input)", "    {"]
    for index, layer in enumerate(layers):
        if layer.cls == "Concat":
            refs = ", ".join(f"&{ref(t)}" for t in layer.inputs)
            out.append(f"        this->{layer.name}.call({{{refs}}});")
        else:
            out.append(f"        this->{layer.name}.call({', '.join(ref(t) for t in layer.inputs)});")
        for tensor in dict.fromkeys(storage.get(t, t) for t in layer.inputs):
            if last_use[tensor] == index and tensor not in outputs:
                out.append(f"        {ref(tensor)}.free_element();")
        out.append("")
    out[-1:] = ["    }", "};", ""]
    return "\n".join(out)


def _print_summary(layers: list[LegacyLayer], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def exps(layer: LegacyLayer, kind: str) -> str:
        c = layer.constants.get(kind)
        if c is None:
            return ""
        if isinstance(c.exponent, list):
            return f"{min(c.exponent)}..{max(c.exponent)} ({len(c.exponent)} ch)"
        filter_constant = layer.constants.get("filter")
        if kind == "bias" and filter_constant is not None and isinstance(filter_constant.exponent, list):
            return f"e_in+e_w+{PER_CHANNEL_BIAS_SHIFT}"  # the Bias object itself holds the unused -128
        return str(c.exponent)

    table = Table(title=title)
    for column in (
        "layer",
        "ESP-DL layer",
        "ONNX op",
        "input [H,W,C]",
        "output",
        "filter",
        "e filter",
        "e bias",
        "activation",
        "e out",
    ):
        table.add_column(column, no_wrap=column in ("layer", "ESP-DL layer"))
    for layer in layers:
        f = layer.constants.get("filter")
        table.add_row(
            layer.name,
            layer.cls,
            layer.op_type,
            " ".join(str(list(s)) for s in layer.input_shapes),
            str(list(layer.output_shape)),
            str(f.shape) if f is not None else "",
            exps(layer, "filter"),
            exps(layer, "bias") + (f" ({layer.saturated_bias} sat.)" if layer.saturated_bias else ""),
            layer.activation,
            str(layer.output_exponent),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    console.print(table)


# --- the entry point ----------------------------------------------------------------------------------------
