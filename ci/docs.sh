#!/usr/bin/env bash
# The documentation site: `mkdocs build --strict` (every warning is an error: a broken link, a docstring
# reference mkdocstrings cannot resolve, a page missing from the nav) into a temporary folder, never the repo.
# Needs the docs extra in the active environment (.ci/run installs it: pip install -e '.[docs]').
set -euo pipefail
cd "$(dirname "$0")/.."
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$site"
pages=$(find "$site" -name index.html | wc -l)
echo "mkdocs build --strict: $pages pages"
