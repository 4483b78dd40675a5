"""The test suite itself runs the same way on a fresh clone as on a developer's machine.

pytest puts ``tests/`` on ``sys.path`` (rootdir conftest, no ``__init__.py``), so shared helpers are imported
as ``helpers``. ``from tests.helpers import ...`` resolves only when the checkout root happens to be on
``sys.path`` too (``python -m pytest`` from the root), and fails under the README's plain ``pytest`` in CI.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_helpers_are_imported_as_pytest_puts_them_on_the_path():
    offenders = [
        f"{path.relative_to(TESTS)}:{number}"
        for path in sorted(TESTS.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if re.match(r"\s*(from|import)\s+tests(\.|\s|$)", line)
    ]
    assert not offenders, f"import helpers as `helpers`, not `tests.helpers`: {offenders}"
