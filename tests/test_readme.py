"""The README's zoo table is the manifest's, and its set-up commands are the Makefile's and CI's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from snzoo.zoo import zoo_table_markdown

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"
CI_SCRIPT = REPO / ".ci" / "run"


def test_readme_zoo_table_matches_the_manifest():
    text = README.read_text()
    start, end = "<!-- zoo-table:start -->\n", "<!-- zoo-table:end -->"
    assert start in text and end in text
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table == zoo_table_markdown(), "README table is stale: regenerate it with `snzoo list --markdown`"


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a Markdown text, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def _shell_commands(script: str) -> list[str]:
    """The commands of a shell snippet: one per line, comments and blank lines dropped."""
    commands = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(" ".join(words))
    return commands


def _makefile_rules(text: str) -> dict[str, list[str]]:
    """Every explicit target of a Makefile with its recipe lines (tab-indented lines under the rule)."""
    rules: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            current.append(line.strip())
            continue
        # `target: prerequisites`, but not a variable assignment (`X := ...`, `X ?= ...`) or a special target.
        rule = re.match(r"^([^\s:#=]+(?:\s+[^\s:#=]+)*)\s*:(?![:=])", line)
        if rule and not rule.group(1).startswith("."):
            current = []
            for target in rule.group(1).split():
                rules[target] = current
        elif line.strip() and not line.startswith("#"):
            current = None
    return rules


def test_readme_set_up_is_the_two_make_commands_that_the_makefile_and_ci_run():
    quick_start = _section(README.read_text(), "Quick start")
    assert "two commands" in quick_start
    blocks = re.findall(r"^```bash\n(.*?)^```", quick_start, re.M | re.S)
    assert len(blocks) == 1, f"the Quick start section should have one bash block, found {len(blocks)}"
    commands = _shell_commands(blocks[0])
    assert commands == ["make demo", "make test"], commands

    rules = _makefile_rules(MAKEFILE.read_text())
    for command in commands:
        target = command.split()[1]
        assert target in rules, f"README says `{command}` but the Makefile has no `{target}` target"
    # Each target does what the README's comment beside it says.
    assert any("snzoo eval" in line for line in rules["demo"]), rules["demo"]
    assert any("-m pytest" in line for line in rules["test"]), rules["test"]

    # CI runs exactly the README's test command, as its last step.
    ci_commands = _shell_commands(CI_SCRIPT.read_text())
    (readme_test_command,) = [c for c in commands if c.split()[1] == "test"]
    assert ci_commands[-1] == readme_test_command, ci_commands
