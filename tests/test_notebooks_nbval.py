"""The notebooks' pytest settings (notebooks/conftest.py) reach the cells nbval collects."""

import json
from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "notebooks" / "conftest.py"
OUTPUT_WAIT_S = 120  # notebooks/conftest.py's value


def test_nbval_output_wait_raised_for_every_cell(pytester):
    """notebooks/conftest.py lifts nbval's fixed 5 s wait for a cell's outputs on every cell."""
    pytester.makeconftest(CONFTEST.read_text())
    pytester.path.joinpath("tiny.ipynb").write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": [s]}
                  for s in ("x = 1", "x + 1")],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
    }))
    items, _ = pytester.inline_genitems("--nbval-lax", "tiny.ipynb")
    assert [type(item).__name__ for item in items] == ["IPyNbCell", "IPyNbCell"]
    assert [item.output_timeout for item in items] == [OUTPUT_WAIT_S, OUTPUT_WAIT_S]
