"""MkDocs hook: pages generated from the code at build time, so that they cannot go stale.

``mkdocs.yml`` loads this file (``hooks:``). Two markers are replaced in the Markdown sources:

* ``<!-- espquant:ops-matrix -->`` -> the operator support matrix, ``espquant ops --markdown``
  (``espquant.cli.ops.markdown_matrix(support_rows())``), built from the operator registry;
* ``<!-- espquant:cli-reference -->`` -> every command of ``espquant`` (walked from the click group
  ``espquant.cli.main``) with its ``--help`` text.

``tests/test_docs.py`` calls :func:`cli_reference` and :func:`ops_matrix` directly.
"""

from __future__ import annotations

import click

OPS_MARKER = "<!-- espquant:ops-matrix -->"
CLI_MARKER = "<!-- espquant:cli-reference -->"
HELP_WIDTH = 100  # the width `espquant` sets for its own help (max_content_width)


def ops_matrix() -> str:
    """The operator matrix exactly as ``espquant ops --markdown`` prints it."""
    from espquant.cli.ops import markdown_matrix, support_rows

    return markdown_matrix(support_rows())


def _commands(group: click.Group, ctx: click.Context) -> list[tuple[str, click.Command, click.Context]]:
    """Every command below ``group``, depth first, in the order ``--help`` lists them."""
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        sub_ctx = click.Context(command, info_name=name, parent=ctx, terminal_width=HELP_WIDTH)
        found.append((sub_ctx.command_path, command, sub_ctx))
        if isinstance(command, click.Group):
            found += _commands(command, sub_ctx)
    return found


def command_paths() -> list[str]:
    """``["espquant", "espquant calibrate", ...]``: the commands the CLI reference documents."""
    from espquant.cli import main

    root = click.Context(main, info_name="espquant", terminal_width=HELP_WIDTH)
    return ["espquant"] + [path for path, _, _ in _commands(main, root)]


def cli_reference() -> str:
    """Markdown for every command: a heading, its one-line summary and its full ``--help`` output."""
    from espquant.cli import main

    root = click.Context(main, info_name="espquant", terminal_width=HELP_WIDTH)
    entries = [("espquant", main, root)] + _commands(main, root)
    parts = ["Commands: " + ", ".join(f"[`{path}`](#{_anchor(path)})" for path, _, _ in entries[1:]) + ".\n"]
    for path, command, ctx in entries:
        summary = command.get_short_help_str(limit=200)
        parts.append(f"## `{path}` {{#{_anchor(path)}}}\n\n{summary}\n\n```text\n{command.get_help(ctx)}\n```\n")
    return "\n".join(parts)


def _anchor(path: str) -> str:
    return path.replace(" ", "-")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs' hook signature
    if OPS_MARKER in markdown:
        markdown = markdown.replace(OPS_MARKER, ops_matrix())
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown
