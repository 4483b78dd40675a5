"""The legacy ESP-DL C++ layer API per library version: one table of class names, headers and what a version
cannot build, read off (and compiled against) the library's own headers in the esp-dl git history.

The two versions differ only where this table says (``git diff v1.1.0 v2.0 -- include/layer``); every other
constructor the exporter writes has the same argument order, types, defaults, namespace (``dl::layer``) and
header path (``include/layer/dl_layer_<op>.hpp``) in both:

- v1.1 (tag ``v1.1.0``, commit ``46addd12``, 2021-11-26; its ``include/layer`` equals that of ``a95b00ea``, the
  commit the legacy quantization toolkit ships with): the activations are spelled ``ReLU``, ``LeakyReLU``, ``PReLU``.
  Four layer headers do not compile once a model instantiates them (g++ -std=c++17, int8 and int16):
  ``dl_layer_sub2d.hpp:119`` calls ``this->output.malloc_element()`` on a pointer (and :124 / :134 pass it to
  ``nn::sub2d`` as a reference), ``dl_layer_mul2d.hpp:143`` calls ``nn::mul2d<true>`` with the output tensor
  where that template takes the output exponent, ``dl_layer_leakyrelu.hpp:133`` calls ``nn::leakyrelu<true>``
  with five arguments (the template takes four), and ``dl_layer_prelu.hpp:43`` initialises its non-const
  ``feature_t *activation_element`` from the constructor's ``const feature_t *``. Two more compile but fail at
  run time unless built in place: ``ReLU::build`` and ``Flatten::build`` allocate their output only
  ``if (this->output != NULL)`` (``dl_layer_relu.hpp:64``, ``dl_layer_flatten.hpp:62``), so ``ReLU``'s output,
  initialised to NULL, is never allocated and dereferenced, and ``Flatten``'s, which its constructor
  (``dl_layer_flatten.hpp:35``) leaves uninitialised, is used as whatever the memory held. Their
  ``inplace = true`` path (output = the input tensor) is correct, so the exporter builds them that way, where the
  input is read by no later layer and is no graph output.
- v2.0 (tag ``v2.0``, commit ``b6783aee``; the layer changes landed in ``d1415029``, 2021-12-06: ``Relu``,
  Flatten / Sub2D fixes, and ``925c72e6``, 2021-12-16: ``LeakyRelu``, ``PRelu``, Mul2D fix): ``Relu``,
  ``LeakyRelu``, ``PRelu``; the four headers and the inverted NULL checks are fixed (``Flatten`` initialises
  ``output(NULL)``). Everything the exporter writes compiles and is built out of place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from espquant.errors import OptionError

DEFAULT_LIBRARY_VERSION = "1.1"


@dataclass(frozen=True)
class LayerApi:
    """How one legacy layer kind is spelled and built in one library version."""

    cls: str  # the C++ class in namespace dl::layer
    header: str  # its header in include/layer/
    in_place: bool = False  # construct with ``inplace = true`` (the version's only working path)
    refused: str = ""  # why this version cannot build the layer ("" when it can)


@dataclass(frozen=True)
class LibraryVersion:
    """One legacy ESP-DL release the exporter can write for."""

    name: str  # what users pass: "1.1" / "2.0"
    tag: str  # its git tag in esp-dl
    layers: dict[str, LayerApi] = field(default_factory=dict)  # keyed by espquant's layer kind

    def api(self, kind: str) -> LayerApi:
        return self.layers[kind]


# espquant's layer kinds (the planner's names; the v2.0 spelling) and their headers, the same in both versions.
_HEADERS = {
    "Conv2D": "dl_layer_conv2d.hpp",
    "DepthwiseConv2D": "dl_layer_depthwise_conv2d.hpp",
    "FullyConnected": "dl_layer_fullyconnected.hpp",
    "MaxPool2D": "dl_layer_max_pool2d.hpp",
    "AvgPool2D": "dl_layer_avg_pool2d.hpp",
    "GlobalAveragePool2D": "dl_layer_global_avg_pool2d.hpp",
    "Add2D": "dl_layer_add2d.hpp",
    "Sub2D": "dl_layer_sub2d.hpp",
    "Mul2D": "dl_layer_mul2d.hpp",
    "Relu": "dl_layer_relu.hpp",
    "LeakyRelu": "dl_layer_leakyrelu.hpp",
    "PRelu": "dl_layer_prelu.hpp",
    "Flatten": "dl_layer_flatten.hpp",
    "Concat": "dl_layer_concat.hpp",
}

_V11_BROKEN = {
    "Sub2D": "dl_layer_sub2d.hpp:119 calls malloc_element() with '.' on the output pointer",
    "Mul2D": "dl_layer_mul2d.hpp:143 calls nn::mul2d<true> with the output tensor where it takes the output exponent",
    "LeakyRelu": "dl_layer_leakyrelu.hpp:133 calls nn::leakyrelu<true> with five arguments; it takes four",
    "PRelu": "dl_layer_prelu.hpp:43 initialises a non-const element pointer from a const one",
}
_V11_NAMES = {"Relu": "ReLU", "LeakyRelu": "LeakyReLU", "PRelu": "PReLU"}
_V11_IN_PLACE = ("Relu", "Flatten")  # their out-of-place build() never allocates the output (inverted NULL check)


def _v11_layer(kind: str, header: str) -> LayerApi:
    refused = ""
    if kind in _V11_BROKEN:
        refused = (
            f"ESP-DL v1.1's {_V11_NAMES.get(kind, kind)} does not compile ({_V11_BROKEN[kind]}); "
            "export with library_version='2.0' (--library-version 2.0) or replace the op"
        )
    return LayerApi(_V11_NAMES.get(kind, kind), header, in_place=kind in _V11_IN_PLACE, refused=refused)


LIBRARY_VERSIONS: dict[str, LibraryVersion] = {
    "1.1": LibraryVersion("1.1", "v1.1.0", {kind: _v11_layer(kind, header) for kind, header in _HEADERS.items()}),
    "2.0": LibraryVersion("2.0", "v2.0", {kind: LayerApi(kind, header) for kind, header in _HEADERS.items()}),
}


def library_version(name: str | None) -> LibraryVersion:
    """The table entry for ``name`` ("1.1", "v1.1.0", "2.0", ...; None: the default), or an OptionError."""
    if name is None:
        name = DEFAULT_LIBRARY_VERSION
    key = str(name).strip().lower().removeprefix("v")
    key = {"1.1.0": "1.1", "2": "2.0", "2.0.0": "2.0"}.get(key, key)
    if key not in LIBRARY_VERSIONS:
        raise OptionError(f"library_version {name!r}: use one of {', '.join(LIBRARY_VERSIONS)}.")
    return LIBRARY_VERSIONS[key]
