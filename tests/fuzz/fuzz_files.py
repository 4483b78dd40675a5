"""Run by tests/test_hostile_files.py in a subprocess under a memory limit: mutate a file's bytes with
hypothesis and require an espquant error or the unchanged result, never another exception.

    python fuzz_files.py espdl FILE EXAMPLES     # decode, verify the digest, simulate the embedded test input
    python fuzz_files.py npy FILE EXAMPLES       # espquant.arrays.load_arrays

Prints one JSON line: counts per outcome, the first unexpected exceptions, the peak resident memory (KiB).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espquant.errors import EspquantError

KIND, SOURCE, EXAMPLES = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ORIGINAL = SOURCE.read_bytes()
OUTCOMES: dict[str, int] = {}
UNEXPECTED: list[str] = []
WORK = Path(tempfile.mkdtemp())


def _espdl(data: bytes) -> object:
    from espquant.espdl import decode_espdl, verify_digest
    from espquant.quant import get_target
    from espquant.simulator.espdl_model import EspdlModel

    decoded = decode_espdl(data, "fuzzed.espdl")
    if verify_digest(decoded) is False:
        raise EspquantError("digest mismatch")
    model = EspdlModel(decoded, get_target(decoded.target or "esp32c3"))
    inputs = {name: t.data for name, t in decoded.test_inputs.items()}
    return {name: value.tolist() for name, value in model.run(inputs).items()}


def _npy(data: bytes) -> object:
    from espquant.arrays import load_arrays

    path = WORK / SOURCE.name
    path.write_bytes(data)
    result = load_arrays(path, "--data")
    return np.asarray(result).tolist() if not isinstance(result, dict) else {k: v.tolist() for k, v in result.items()}


RUN = {"espdl": _espdl, "npy": _npy}[KIND]
EXPECTED = RUN(ORIGINAL)
HAS_DIGEST = KIND == "espdl" and b"espquant.digest" in ORIGINAL


def _outcome(data: bytes) -> str:
    try:
        result = RUN(data)
    except EspquantError:
        return "espquant error"
    except Exception:  # noqa: BLE001 - what the fuzzer is looking for
        UNEXPECTED.append(traceback.format_exc(limit=6)[-1500:])
        return "unexpected exception"
    if result == EXPECTED:
        return "unchanged result"
    return "changed result (digest)" if HAS_DIGEST else "changed result"


mutation = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.integers(0, len(ORIGINAL) - 1), st.integers(1, 255)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("truncate"), st.integers(0, len(ORIGINAL) - 1)),
)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(mutation)
def fuzz(change: tuple) -> None:
    kind, argument = change
    data = bytearray(ORIGINAL)
    if kind == "flip":
        for position, mask in argument:
            data[position] ^= mask
    else:
        data = data[:argument]
    outcome = _outcome(bytes(data))
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


fuzz()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcomes": OUTCOMES, "unexpected": UNEXPECTED[:3], "peak_kib": peak}))
