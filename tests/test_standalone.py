"""The repository stands alone: nothing in it points outside it, every section of
docs/definitions.md that is cited exists, and the licence and citation files are there and agree
with pyproject.toml."""

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = ROOT / "docs" / "definitions.md"
# "docs/definitions.md, '<section>'", the form every citation of a section takes
CITATION = re.compile(r"docs/definitions\.md, '([^'\n]+)'")
# Built from pieces so that this file does not contain the strings it looks for.
FORBIDDEN = ("../" + "shared", "SPEC" + ".md", "DESIGN" + ".md")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:  # listed but absent (deleted in the work tree)
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def headings() -> set[str]:
    found = set()
    for line in DEFINITIONS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            found.add(m.group(1))
    return found


def test_no_tracked_file_points_outside_the_repository():
    bad = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for needle in FORBIDDEN:
            for n, line in enumerate(text.splitlines(), 1):
                if needle in line:
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {needle}")
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def test_definitions_is_tracked_and_has_sections():
    assert DEFINITIONS in tracked_files()
    assert {"Notation", "Metrics", "Batch surrogates", "Official training recipes"} <= headings()


def test_every_cited_section_exists():
    sections = headings()
    missing = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for m in CITATION.finditer(text):
            if m.group(1) not in sections and not re.fullmatch(r"<[^>]*>", m.group(1)):  # <placeholder>
                missing.append(f"{path.relative_to(ROOT)}: '{m.group(1)}'")
    assert not missing, "sections cited but absent from docs/definitions.md:\n" + "\n".join(missing)


def test_the_citation_pattern_finds_the_recipe_citations():
    recipe = (ROOT / "hapkit/training/recipes/roadmap_sop.yaml").read_text(encoding="utf-8")
    assert "Official training recipes" in CITATION.findall(recipe)


def test_license_matches_pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["license"]
    declared = declared if isinstance(declared, str) else declared.get("text", "")
    license_file = ROOT / "LICENSE"
    assert license_file.is_file()
    text = license_file.read_text(encoding="utf-8")
    assert declared == "MIT"
    assert text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text


def test_citation_cff_parses():
    data = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert str(data["cff-version"]).startswith("1.")
    assert data["title"]
    assert data.get("license") in (None, "MIT")
