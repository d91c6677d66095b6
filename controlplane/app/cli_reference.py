"""docs/cli.md, the `modelguard` command reference, generated from the parser itself so it
cannot drift from `--help`: every subcommand (nested ones included) with its usage, its
description and every flag with its help. `python -m controlplane.app.cli_reference` writes
it; tests/unit/test_cli.py fails when it is stale and prints that command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
WIDTH = "100"  # argparse wraps help to $COLUMNS: one width, so the file is the same anywhere


def render() -> str:
    """The reference, as docs/cli.md holds it."""
    from controlplane.app.cli import build_parser
    from controlplane.app.cliutil import commands

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        parser.prog = "modelguard"
        out = [
            "# `modelguard` command reference",
            "",
            "Generated from the command's own parser (`python -m controlplane.app.cli_reference`;",
            "a test fails when this file is stale). The README shows the commands in use.",
            "",
        ]
        for path, command in commands(parser):
            title = " ".join(("modelguard", *path))
            out += [f"## `{title}`", "", "```", command.format_help().rstrip(), "```", ""]
        return "\n".join(out)
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    text = render()
    if check:
        if not REFERENCE.is_file() or REFERENCE.read_text() != text:
            print(f"{REFERENCE} is stale: run python -m controlplane.app.cli_reference",
                  file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
