"""onnxruntime sessions: the one place espquant hands a graph to onnxruntime.

The installed ``onnx`` package stamps the graphs it builds with its own newest IR version, and an older
onnxruntime refuses those outright ("Unsupported model IR version: 14, max supported IR version: 11"; pip
pairs onnx 1.23 with onnxruntime 1.23 on Python 3.10). So every session is made here, and a model is first
brought to what the installed onnxruntime runs: the IR version is lowered to onnxruntime's newest when the
model's opsets do not need a newer one (the IR number only stamps which file features a model may use;
espquant's graphs and ordinary exports use none of the newer ones). A model whose opset, or whose opsets'
minimum IR version, is newer than onnxruntime runs gets a clear error naming both versions and what to
upgrade. What onnxruntime runs is asked of onnxruntime itself, once per process, with tiny probe models.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from espquant.errors import ModelError, OptionError

__all__ = [
    "RuntimeLimits",
    "ONNXRUNTIME_ERRORS",
    "runtime_limits",
    "for_runtime",
    "create_session",
    "runner",
    "validate_providers",
]


def _onnxruntime_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own exception classes (they derive from Exception directly, not from RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [getattr(state, name, None) for name in dir(state)]
    return tuple(c for c in found if isinstance(c, type) and issubclass(c, Exception))


# What a session may raise on a graph it cannot build or run: callers translate it into their own errors.
ONNXRUNTIME_ERRORS: tuple[type[Exception], ...] = _onnxruntime_errors()

logger = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class RuntimeLimits:
    """The newest IR version and default-domain opset the installed onnxruntime loads."""

    ir_version: int
    opset: int
    version: str


def _loads(ir_version: int, opset: int) -> bool:
    """Whether onnxruntime creates a session for an Identity model with this IR version and opset."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=list(DEFAULT_PROVIDERS))
    except Exception:  # onnxruntime raises its own Fail / InvalidGraph types
        return False
    return True


def _newest(candidates: range, accepted: Callable[[int], bool]) -> int:
    """The largest value in ``candidates`` for which ``accepted(value)`` holds (they are accepted up to a limit)."""
    low, high = candidates.start, candidates.stop - 1
    while low < high:
        middle = (low + high + 1) // 2
        if accepted(middle):
            low = middle
        else:
            high = middle - 1
    return low


@functools.lru_cache(maxsize=1)
def runtime_limits() -> RuntimeLimits:
    """Ask the installed onnxruntime which IR versions and opsets it loads (cached for the process)."""
    newest_opset = onnx.defs.onnx_opset_version()
    ir = _newest(range(7, onnx.IR_VERSION + 1), lambda v: _loads(v, 13))
    opset = _newest(range(13, newest_opset + 1), lambda v: _loads(ir, v))
    return RuntimeLimits(ir, opset, ort.__version__)


def _needed_ir(model: onnx.ModelProto) -> int:
    """The lowest IR version the model's opset imports require."""
    try:
        return int(helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    except (TypeError, ValueError):  # onnx builds without the ignore_unknown argument
        known = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        return int(helper.find_min_ir_version_for(known)) if known else 3


def _default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def for_runtime(model: onnx.ModelProto, what: str = "the model") -> onnx.ModelProto:
    """``model`` as the installed onnxruntime can load it: the same object when nothing needs changing.

    Raises:
        ModelError: the model's opset (or the IR version its opsets need) is newer than onnxruntime runs.
    """
    limits = runtime_limits()
    opset = _default_opset(model)
    upgrade = f"upgrade onnxruntime (pip install -U onnxruntime) or export the model with opset <= {limits.opset}"
    if opset > limits.opset:
        raise ModelError(
            f"{what} uses ONNX opset {opset}; the installed onnxruntime {limits.version} runs opsets up to "
            f"{limits.opset}: {upgrade}."
        )
    if model.ir_version <= limits.ir_version:
        return model
    needed = _needed_ir(model)
    if needed > limits.ir_version:
        raise ModelError(
            f"{what} has IR version {model.ir_version} and its opsets need at least {needed}; the installed "
            f"onnxruntime {limits.version} loads IR versions up to {limits.ir_version}: {upgrade}."
        )
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = max(needed, limits.ir_version)
    logger.debug("IR version %d -> %d for onnxruntime %s", model.ir_version, copy.ir_version, limits.version)
    return copy


def create_session(
    model: onnx.ModelProto | bytes,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    what: str = "the model",
    optimize: bool = True,
    optimized_path: str | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime session for ``model``, with quiet logging and the model brought within the runtime's limits.

    Args:
        model: the graph (a ModelProto, or its serialised bytes).
        providers: execution providers (default: CPU).
        threads: intra-op threads (default: onnxruntime's choice).
        what: how to name the model in an error message.
        optimize: let onnxruntime fuse and reorder (off only where a test needs the plain graph, or for a graph
            onnxruntime has already optimized).
        optimized_path: where onnxruntime saves the graph it optimized (for this machine only: its blocked
            layouts follow the CPU's vector width).
        spinning: whether onnxruntime's idle intra-op workers spin (its default) or sleep between ops. Spinning
            workers keep their cores busy after every run, against whatever the process computes next, and a
            session with spinning workers took about 38 ms to close here (2 cores, default threads; 0.15 ms
            without). Sessions whose runs alternate with other work of the process pass False: a compiled program's
            segments between native steps (``compile_program``), the interpreter's convolution sums, the float
            model beside the simulator (``api.measure``, ``report.analysis``).

    Raises:
        ModelError: onnxruntime cannot load the model; the message names the model and onnxruntime's reason.
    """
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    proto = for_runtime(proto, what)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach the user as espquant errors, not as red log lines
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(
            proto.SerializeToString(), options, providers=list(providers or DEFAULT_PROVIDERS)
        )
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ModelError(
            f"onnxruntime {ort.__version__} cannot load {what}: {first}. Check it with "
            "`python -c \"import onnx; onnx.checker.check_model('model.onnx', full_check=True)\"`."
        ) from exc


def runner(session: ort.InferenceSession) -> Callable[[list[str], dict[str, Any]], list[Any]]:
    """``session.run`` without the Python wrapper's per-call checks (input names, graph-capture state): about
    17 us per call with onnxruntime 1.32, as much as a small model's whole run at batch 1. Only for graphs whose
    callers feed exactly the inputs the graph declares (espquant's compiled simulator segments), so the checks
    have nothing to find. An onnxruntime without the inner binding gets the wrapper's ``run``."""
    inner = getattr(getattr(session, "_sess", None), "run", None)
    if inner is None:
        return session.run
    return lambda names, feeds: inner(names, feeds, None)


def validate_providers(providers: Sequence[str]) -> list[str]:
    """Check that every provider is available in this onnxruntime build; returns them as a list."""
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if not providers or missing:
        raise OptionError(
            f"execution provider(s) {', '.join(missing) or '(none given)'} not available in this onnxruntime; "
            f"available: {', '.join(available)}."
        )
    return list(providers)
