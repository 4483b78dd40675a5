#!/usr/bin/env bash
# Packaging, as a release would be installed: `python -m build` makes the sdist and, from it, the wheel
# (build's default, so a file missing from the sdist fails here too); the wheel goes into a fresh venv with its
# dependencies and runs `espquant demo`. (The README's `pip install . && espquant demo` runs in ci/compat.sh,
# once per supported Python.)
# After each install `espquant --version` must print the version in src/espquant/_version.py.
# Uses the active Python (.ci/run's venv) for `python -m build`.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
step() { echo "   $(date +%T) $*"; }

python -m pip install --quiet build > "$work/pip-build.log" 2>&1 \
    || { cat "$work/pip-build.log"; echo "== package: could not install build"; exit 1; }
python -m build --outdir "$work/dist" "$root" > "$work/build.log" 2>&1 \
    || { cat "$work/build.log"; echo "== package: python -m build FAILED"; exit 1; }
version="$(python -c 'import runpy, sys; print(runpy.run_path(sys.argv[1])["__version__"])' \
    "$root/src/espquant/_version.py")"
sdist="$(ls "$work"/dist/espquant-*.tar.gz)"
wheel="$(ls "$work"/dist/espquant-*.whl)"
step "built $(basename "$sdist") and $(basename "$wheel")"

venv="$work/venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
name="$(basename "$wheel")"
"$venv/bin/pip" install --quiet "$wheel" > "$work/pip-wheel.log" 2>&1 \
    || { cat "$work/pip-wheel.log"; echo "== package: pip install $name FAILED"; exit 1; }
step "installed $name"
printed="$(cd "$work" && "$venv/bin/espquant" --version)"
[ "$printed" = "espquant, version $version" ] \
    || { echo "== package: $name says '$printed', _version.py says $version"; exit 1; }
(cd "$work" && "$venv/bin/espquant" demo --workdir "$work/demo" > "$work/demo.log" 2>&1) \
    || { cat "$work/demo.log"; echo "== package: espquant demo from $name FAILED"; exit 1; }
step "espquant demo passed"
echo "== package: $name installs in a fresh venv, prints version $version and runs espquant demo"
