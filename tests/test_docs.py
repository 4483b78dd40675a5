"""The documentation site (mkdocs.yml, docs/, docs_hooks.py) documents every command and every public name.

The site itself is built by `.ci/run` with `mkdocs build --strict` (a broken link or docstring reference fails
there); these tests check, without building it, that nothing public is left out:

* every click command (walked from ``espquant.cli.main``) is in the generated CLI reference;
* every name in ``espquant.__all__`` has a mkdocstrings entry (``::: espquant.NAME``) in docs/;
* the generated operator page is ``espquant ops --markdown``;
* every page in the nav exists, and the README links only to files
  that exist.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import espquant
from espquant.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("docs_hooks", module)
    spec.loader.exec_module(module)
    return module


def _sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")) )


def _all_commands(group: click.Group, prefix: str = "espquant") -> list[str]:
    ctx = click.Context(group, info_name=prefix)
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        found.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            found += _all_commands(command, f"{prefix} {name}")
    return found


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:") :]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.MULTILINE)


def test_every_command_has_its_section_in_the_cli_reference():
    hooks = _hooks()
    reference = hooks.cli_reference()
    commands = _all_commands(main)
    assert "espquant calibrate" in commands and "espquant export" in commands
    for path in commands:
        assert f"## `{path}` {{#{path.replace(' ', '-')}}}" in reference, path
        command = main
        for part in path.split()[1:]:
            command = command.get_command(click.Context(command), part)
        # the section holds the command's own --help, options included
        first_option = next((p for p in command.params if isinstance(p, click.Option)), None)
        if first_option is not None:
            assert first_option.opts[0] in reference.split(f"## `{path}`", 1)[1], (path, first_option.opts[0])
    assert hooks.command_paths() == ["espquant", *commands]
    assert hooks.CLI_MARKER in (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")


def test_every_public_name_has_an_api_entry():
    sources = _sources()
    entries = set(re.findall(r"^::: (espquant[\w.]*)", sources, flags=re.MULTILINE))
    missing = [name for name in espquant.__all__ if f"espquant.{name}" not in entries]
    assert not missing, f"add '::: espquant.NAME' to docs/reference/api/index.md for: {missing}"
    for module in (
        "espquant.api",
        "espquant.optimizer",
        "espquant.checker",
        "espquant.table",
        "espquant.simulator.espdl_model",
        "espquant.export",
        "espquant.report",
    ):
        assert module in entries, module


def test_the_operator_page_is_the_generated_matrix():
    hooks = _hooks()
    result = CliRunner().invoke(main, ["ops", "--markdown"])
    assert result.exit_code == 0, result.output
    assert hooks.ops_matrix() == result.output
    assert hooks.OPS_MARKER in (DOCS / "reference" / "operators.md").read_text(encoding="utf-8")


def test_the_nav_pages_exist_and_none_is_a_placeholder():
    pages = _nav_pages()
    assert "index.md" in pages and "reference/cli.md" in pages
    for page in pages:
        text = (DOCS / page).read_text(encoding="utf-8")
        assert re.search(r"\bTODO\b|\bTBD\b|lorem ipsum", text, flags=re.IGNORECASE) is None, page
        assert len(text) > 200, page
    for hook_or_config in ("docs_hooks.py", "mkdocs.yml"):
        assert (ROOT / hook_or_config).is_file()


def test_the_readme_links_only_to_files_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert any(t.startswith("docs/") for t in local)
    for target in local:
        assert (ROOT / target).exists(), target
    # the matrix lives on the generated docs page, not in the README
    assert "ops-matrix:start" not in text


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_mkdocs_loads_the_configuration():
    """The configuration parses with the installed plugins (the build itself runs in .ci/run: ~20 s)."""
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"))
    assert config["strict"] is True
    assert "mkdocstrings" in config["plugins"]


def test_the_version_is_written_in_one_place():
    """pyproject.toml reads the version from espquant/_version.py; `espquant --version` prints it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "espquant._version.__version__"}
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"espquant, version {espquant.__version__}\n"
