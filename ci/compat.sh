#!/usr/bin/env bash
# The supported range, as a user meets it: for each Python espquant claims (beside the one .ci/run already
# tests) and once with the lowest dependency versions pyproject.toml allows, a fresh venv gets `pip install .`
# (not editable, as a user installs it), then `espquant demo` and a fast subset of the tests run there.
# An interpreter that is not on the machine is skipped, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Tests that touch every onnxruntime path (calibration, compiled simulator, export, runtime limits) in ~30 s.
subset=(tests/test_runtime.py tests/test_files.py tests/test_table.py tests/test_demo.py tests/test_compiled.py
        tests/test_kernels.py tests/test_cli_outputs.py tests/test_evaluator.py tests/test_calibrator.py)

find_python() {
    local version="$1" candidate
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python "$(command -v "python$version" || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

check() {
    local label="$1" python="$2" constraints="${3:-}"
    local venv="$work/$label"
    echo "== $label: $("$python" --version 2>&1)${constraints:+ with $(basename "$constraints")}"
    "$python" -m venv "$venv"
    local log="$work/pip-$label.log"
    { "$venv/bin/python" -m pip install --quiet --upgrade pip &&
      "$venv/bin/pip" install --quiet ${constraints:+-c "$constraints"} "$root" pytest hypothesis; } > "$log" 2>&1 \
        || { cat "$log"; echo "== $label: pip install FAILED"; return 1; }
    "$venv/bin/pip" list 2>/dev/null | grep -E '^(numpy|onnx|onnxruntime|onnxoptimizer|click|rich|flatbuffers) ' \
        | tr -s ' ' | paste -sd ',' | sed 's/^/   /'
    (cd "$work" && "$venv/bin/espquant" demo --workdir "$work/demo-$label" > "$work/demo-$label.log") \
        || { cat "$work/demo-$label.log"; echo "== $label: espquant demo FAILED"; return 1; }
    echo "   espquant demo passed"
    # `import espquant` finds the installed package: src/ is not on the path (no editable install here).
    "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" "${subset[@]/#/$root/}"
}

status=0
for version in 3.10 3.12 3.13; do
    if python="$(find_python "$version")"; then
        check "py$version" "$python" || status=1
    else
        echo "== py$version: no interpreter on this machine, skipped"
    fi
done
if python="$(find_python 3.10)"; then
    check "minimum-versions" "$python" "$root/ci/constraints-min.txt" || status=1
else
    echo "== minimum-versions: no Python 3.10 on this machine, skipped"
fi
exit $status
