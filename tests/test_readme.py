"""The README's zoo table is the manifest's."""

from pathlib import Path

from snzoo.zoo import zoo_table_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_zoo_table_matches_the_manifest():
    text = README.read_text()
    start, end = "<!-- zoo-table:start -->\n", "<!-- zoo-table:end -->"
    assert start in text and end in text
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table == zoo_table_markdown(), "README table is stale: regenerate it with `snzoo list --markdown`"


def test_readme_names_the_two_set_up_commands():
    text = README.read_text()
    assert "make test" in text
