"""The authors' reference values stored in tests/data (see its README), for the tests that
reproduce them. A missing or unreadable file fails the test: these tests must never be skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"


def load_reference(name: str) -> dict:
    """The JSON file ``tests/data/<name>``; fails the calling test when it is missing."""
    path = DATA / name
    if not path.is_file():
        pytest.fail(
            f"reference values {path} are missing: they belong to the repository (tests/data, "
            f"see its README); restore them with `git checkout -- tests/data`"
        )
    return json.loads(path.read_text())


def reference_batch(name: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(data, float32 embeddings, integer labels) of a reference file."""
    data = load_reference(name)
    return data, torch.tensor(data["embeddings"], dtype=torch.float32), torch.tensor(data["labels"])
