"""Write docs/cli.md, the CLI reference, from the `robint` parser itself:

    python docs/make_cli.py > docs/cli.md

tests/test_docs.py checks that every command and option of the parser is in docs/cli.md."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["COLUMNS"] = "110"  # argparse wraps its help to the terminal: a fixed width for the page

from robint_ray.cli import COMMANDS, build_parser  # noqa: E402


def subcommands():
    """name -> the subcommand's ArgumentParser."""
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")  # argparse keeps subparsers here only
    return {name: action.choices[name] for name in COMMANDS}


def main() -> None:
    print("# CLI reference\n")
    print(
        "Every `robint` command and its options, as `robint COMMAND --help` prints them (made by "
        "`python docs/make_cli.py > docs/cli.md`). Bad input prints one line on stderr and exits with "
        "status 2; a cluster that cannot run the job (no room within `--wait-timeout`, a GPU that torch "
        "cannot see) one line and status 1.\n"
    )
    for name, parser in subcommands().items():
        print(f"- [`robint {name}`](#robint-{name}): {COMMANDS[name]}")
    for name, parser in subcommands().items():
        print(f"\n## robint {name}\n\n```\n{parser.format_help().rstrip()}\n```")


if __name__ == "__main__":
    main()
