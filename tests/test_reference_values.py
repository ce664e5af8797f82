"""The authors' reference values travel with the repository, and their absence is a failure."""

import re

import pytest

from reference_values import DATA, load_reference


def test_every_file_the_readme_lists_is_in_the_repository():
    listed = re.findall(r"`(\w+\.json)`", (DATA / "README.md").read_text())
    assert sorted(set(listed)) == sorted(p.name for p in DATA.glob("*.json"))
    for name in listed:
        data = load_reference(name)
        assert data["what"] and data["embeddings"] and data["labels"]


def test_a_missing_reference_file_fails_instead_of_skipping():
    with pytest.raises(pytest.fail.Exception, match="tests/data"):
        load_reference("no_such_reference.json")
