"""The docs stay true to the code: every command and option in the CLI reference, every relative link
of the README and docs/ pointing at a file that exists, and a README a newcomer can read."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_and_option_is_in_the_cli_reference():
    spec = importlib.util.spec_from_file_location("make_cli", ROOT / "docs" / "make_cli.py")
    make_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_cli)
    page = (ROOT / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"\n## robint (\w+)\n\n```\n(.*?)\n```", page, flags=re.S))
    missing = []
    for name, parser in make_cli.subcommands().items():
        options = {o for action in parser._actions for o in action.option_strings if o.startswith("--")}
        missing += (
            [f"robint {name}"]
            if name not in sections
            else [f"robint {name} {o}" for o in sorted(options) if o not in sections[name]]
        )
    assert not missing, f"docs/cli.md is out of date (python docs/make_cli.py > docs/cli.md): {missing}"


def test_relative_links_point_at_files_that_exist():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
