"""The documentation and the code agree: docs/configuration.md documents every setting and
flag spout.py accepts and nothing else, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

import spout

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
CONFIGURATION = ROOT / "docs" / "configuration.md"


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The rows of every Markdown table whose first column is headed first_header."""
    rows, inside = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == first_header:
            inside = True
        elif inside and not re.fullmatch(r":?-+:?", cells[0]):
            rows.append(cells)
    return rows


def documented() -> tuple[set[str], set[str]]:
    variables, flags = set(), set()
    for row in table_rows(CONFIGURATION.read_text(), "variable"):
        variables |= set(re.findall(r"`([A-Z][A-Z0-9_<>]*)`", row[0]))
        flags |= {flag.split()[0] for flag in re.findall(r"`(-[^`]+)`", row[1])}
    return variables, flags


def test_configuration_documents_every_setting_and_nothing_else():
    variables, _ = documented()
    known = {setting.env for setting in spout.SETTINGS} | {"KAFKA_<OPTION>",
                                                             "KAFKA_<OPTION>_FILE"}
    assert variables - known == set(), "documented, but spout.py knows no such setting"
    assert known - variables == set(), "spout.py takes it, docs/configuration.md lacks it"


def test_configuration_documents_every_flag_and_nothing_else():
    _, flags = documented()
    accepted = {option for action in spout.build_arg_parser()._actions
                for option in action.option_strings}
    assert flags - accepted == set(), "documented, but spout.py takes no such flag"
    assert accepted - flags == set(), "spout.py takes it, docs/configuration.md lacks it"


def test_each_setting_is_documented_with_its_own_flag():
    rows = table_rows(CONFIGURATION.read_text(), "variable")
    for setting in spout.SETTINGS:
        row = next(row for row in rows if f"`{setting.env}`" in row[0])
        assert f"`{setting.flag}`" in row[1], setting.env


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to
    '-'. Headings inside indented or fenced code are none."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6} (.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower().replace("`", ""))
            found.add(text.replace(" ", "-"))
    return found


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    for target in links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        assert resolved.exists(), f"{page.name}: {target}: no such file"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target}: no such heading"


def test_the_readme_is_the_short_path_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260
    assert "make test" in readme and "make demo" in readme and "make try" in readme
    linked = {Path(target.partition("#")[0]).name for target in links(ROOT / "README.md")}
    assert {page.name for page in DOCS} <= linked


def test_the_anchor_rule_matches_githubs():
    assert "two-modes-which-one" in anchors(ROOT / "docs" / "guarantees.md")
    assert "segments-json-lines-and-parquet" in anchors(ROOT / "docs" / "formats.md")
    assert "the-commit-record-pachyderm-2x" in anchors(ROOT / "docs" / "guarantees.md")
