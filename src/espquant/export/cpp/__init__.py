"""Export a quantized model as C++ coefficient files for the legacy ESP-DL library (v1.1 / v2.0).

The legacy toolkit's ``Calibrator.export_coefficient_to_cpp`` wrote ``<name>.cpp`` / ``<name>.hpp`` holding each
layer's quantized filter, bias and activation as constant arrays with getters (``get_<layer>_filter()`` ...), in
the form the C++ layer classes of ESP-DL v1.x / v2.0 take (``dl::Filter<T>``, ``dl::Bias<T>``,
``dl::Activation<T>``, ``dl::layer::Conv2D<T>`` ...). This module writes the same two files from espquant's
:class:`QuantizedModel`, so the integers are exactly the simulator's, plus ``<name>_model.hpp``: a
``dl::layer::Model<T>`` subclass that declares, builds and calls the layers in graph order.

Legacy facts relied on (ESP-DL git history, tag ``v2.0`` unless stated; v1.1.0 has the same signatures except
that ``Relu`` / ``LeakyRelu`` / ``PRelu`` were spelled ``ReLU`` / ``LeakyReLU`` / ``PReLU`` and that some of its
layer headers are broken: ``versions.py`` holds the per-version table and the evidence, ``library_version=``
picks one, default ``"1.1"``; v1.0.0 lacks the explicit ``padding`` argument, ``FullyConnected``, ``Flatten``
and ``Concat`` and is not a target):

- ``include/typedef/dl_constant.hpp``: ``Filter<T>(element, exponent, shape, dilation = {1, 1})`` with shape
  ``[filter_height, filter_width, input_channel, output_channel]`` (depthwise: ``[.., .., channels, 1]``) and the
  note that "the element sequence depends on optimization method"; the per-channel form
  ``Filter<T>(element, const int8_t *channel_exponent, channel_exponent_size, shape, dilation)``;
  ``Bias<T>(element, exponent, shape)``; ``Activation<T>(type, element = NULL, exponent = 0, shape = {0})`` with
  ``type`` one of ``Linear, ReLU, LeakyReLU, PReLU`` (``include/dl_define.hpp``, also ``padding_type_t``:
  ``PADDING_NOT_SET, PADDING_VALID, PADDING_SAME_BEGIN, PADDING_SAME_END``).
- ``include/layer/dl_layer_conv2d.hpp`` / ``dl_layer_depthwise_conv2d.hpp``: ``template <feature_t, bias_t =
  feature_t>``, ``(output_exponent, filter, bias, activation, padding_type, padding [top, bottom, left, right],
  stride_y, stride_x, name)``; ``bias_t`` is ``int16_t`` "for int16 quantization and int8 per-channel
  quantization". ``dl_layer_fullyconnected.hpp``: ``(output_exponent, filter [1, 1, in, out], bias, activation,
  flatten = true, name)``. Pools, ``Add2D`` / ``Sub2D`` / ``Mul2D`` (``output_exponent``, activation, name),
  ``Relu``, ``LeakyRelu(alpha, alpha_exponent, name)``, ``PRelu(element, exponent, name)``, ``Flatten``,
  ``Concat(axis, name)`` and ``dl_layer_model.hpp`` (``build`` / ``call`` / ``forward``): same folder.
- ``docs/en/tools/quantization-toolkit/quantization-specification.rst``: int16 is per-tensor only; per-tensor
  biases are stored at the **output** exponent in the feature type (int8 / int16); int8 per-channel biases are
  int16 at ``input_exponent + weight_exponent + 4``; ReLU, MaxPool, Flatten, Concat, LeakyReLU, PReLU keep the
  input exponent ("Input and output must have the same exponent"); Add2D / Sub2D / Mul2D / AvgPool2D /
  GlobalAveragePool2D carry no such restriction and their layer classes take an ``output_exponent``.
- ``tutorial/quantization_tool_example`` (``example.py`` calls ``calib.export_coefficient_to_cpp(model_proto,
  pickle_file_path, 'esp32s3', '.', 'mnist_coefficient', True)``) and its generated ``mnist_coefficient.cpp`` /
  ``.hpp``: ``const static __attribute__((aligned(16))) int16_t <layer>_filter_element[] = {..}``, ``const
  static Filter<int16_t> <layer>_filter(<layer>_filter_element, -15, {1, 1, 784, 128}, {1, 1})``, a getter
  returning its address, the same for ``_bias`` (exponent = output exponent) and ``Activation<int16_t>
  <layer>_activation(ReLU)``; the hand-written ``mnist_model.hpp`` shows the Model subclass pattern.
  Re-quantizing that example's ONNX weights reproduces its arrays bit for bit with the ESP32-S3 order below.
- ``tools/convert_tool`` (its logic ships compiled; its strings name ``transpose_with_tie728`` for ESP32-S3 and
  ``transpose_without_tie`` for the others). Running that v2.0 converter on index-valued filters gives the
  element orders (the tests keep some of its outputs as literals):

  * esp32 / esp32s2 / esp32c3: Conv2D / FullyConnected ``[N][H][W][C]``; DepthwiseConv2D ``[H][W][C]``.
  * esp32s3: lanes of 16 bytes, i.e. ``L = 16`` (int8) or ``8`` (int16) channels. Conv2D / FullyConnected:
    for each full block of ``L`` output channels ``[H][W][C][L]``, then each remaining output channel
    ``[H][W][C]``. DepthwiseConv2D: each full block of ``L`` channels ``[H][W][L]``, then the remaining
    channels together ``[H][W][rest]``.
  * per-channel: ``const static int8_t <layer>_filter_exponent[] = {..}``, ``Bias<int16_t>`` with values at
    ``e_in + e_w[n] + 4`` and ``-128`` in the (unused) exponent field; same layout as per-tensor.
  * LeakyReLU: one alpha element, shape ``{1,}``; PReLU: one alpha per channel, shape ``{C,}``.

Every target exports the same ops (``EXPORTABLE_OPS``; library v1.1 refuses Sub / Mul / LeakyRelu / PRelu):
Conv (group 1 -> Conv2D, depthwise -> DepthwiseConv2D, with a fused Relu as ``Activation(ReLU)``), Gemm and
MatMul by a constant matrix -> FullyConnected, Relu, LeakyRelu, PRelu, MaxPool -> MaxPool2D, AveragePool ->
AvgPool2D, GlobalAveragePool -> GlobalAveragePool2D, Add / Sub / Mul -> Add2D / Sub2D / Mul2D, Concat, Flatten
and Reshape-to-2-D -> Flatten; Identity and a RequantizeLinear before Add / Sub / Mul need no layer. Anything
else is reported, node by node.

The constants are the legacy toolkit's, as the legacy runtime profile simulates them (simulator/legacy.py,
docs/LEGACY_ARITHMETIC.md; read off the original toolkit's Evaluator and checked against it bit for bit):

- filters: the float weights at the table's exponent(s), rounded half to even and saturated;
- biases: from the float bias, rounded half to even: at the output exponent in the feature type (int8 / int16)
  per tensor, int16 at ``e_in + e_w[n] + 4`` per channel, saturated. An int8 per-tensor bias can saturate: a
  warning names the layer (the legacy profile simulates the clipped value);
- LeakyReLU's alpha and PReLU's slopes: truncated toward zero to ``bits - 1`` fraction bits (exponent ``-7`` /
  ``-15``), not saturated;
- a RequantizeLinear the simulator inserts before Add / Sub / Mul is dropped: the legacy layers rescale each
  input from its own exponent to the output exponent. Anywhere else a RequantizeLinear cannot be expressed;
- Flatten / Reshape-to-2-D of a ``(1, C, H, W)`` tensor runs on ESP-DL's ``[H][W][C]`` data, so the rows of a
  following FullyConnected are permuted from ONNX's ``C, H, W`` order to ``H, W, C``;
- LeakyRelu, PRelu, Relu keep their input exponent (else: not expressible). The batch dimension is dropped.
"""

from espquant.export.cpp.layers import LegacyConstant, LegacyLayer, legacy_filter_elements
from espquant.export.cpp.planner import _HANDLERS, EXPORTABLE_OPS, plan_legacy_layers
from espquant.export.cpp.versions import DEFAULT_LIBRARY_VERSION, LIBRARY_VERSIONS, LibraryVersion, library_version
from espquant.export.cpp.writer import cpp_file_paths, export_coefficient_to_cpp, legacy_target
from espquant.quant.profiles import LEGACY_TARGETS
from espquant.simulator.legacy import PER_CHANNEL_BIAS_SHIFT

__all__ = [
    "DEFAULT_LIBRARY_VERSION",
    "LIBRARY_VERSIONS",
    "LibraryVersion",
    "library_version",
    "LEGACY_TARGETS",
    "EXPORTABLE_OPS",
    "PER_CHANNEL_BIAS_SHIFT",
    "LegacyConstant",
    "LegacyLayer",
    "cpp_file_paths",
    "export_coefficient_to_cpp",
    "legacy_filter_elements",
    "legacy_target",
    "plan_legacy_layers",
    "_HANDLERS",
]
