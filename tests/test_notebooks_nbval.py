"""The notebooks' pytest settings (notebooks/conftest.py) reach the cells nbval collects."""

import json
from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "notebooks" / "conftest.py"


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
    namespace = {}
    exec(compile(CONFTEST.read_text(), str(CONFTEST), "exec"), namespace)
    assert all(item.output_timeout == namespace["OUTPUT_WAIT_S"] > 5 for item in items)
