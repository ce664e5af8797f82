"""The notebooks' claims are the definitions of hapkit.claims (which the margin benchmark measures),
and a claim's margin is the signed distance by which its quantity clears its threshold."""

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from hapkit.claims import CLAIMS, Claim, check, margins
from hapkit.results import ClaimNotMet

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def code_of(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def claim_calls(source: str) -> list[tuple]:
    """(notebook, group, input names) of every ``check(...)`` call in one cell's code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "check":
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            found.append((*args, frozenset(k.arg for k in node.keywords)))
    return found


def calls_by_notebook() -> dict[str, list[tuple]]:
    return {p.stem: [call for cell in code_of(p) for call in claim_calls(cell)] for p in sorted(NOTEBOOKS.glob("*.ipynb"))}


def test_every_notebook_claim_is_a_shared_definition():
    """No notebook states a claim of its own (check_claims on a dict, or an assert of a result
    inside a check): each calls hapkit.claims.check with its own name and a group of CLAIMS."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        for cell in code_of(path):
            assert "check_claims(" not in cell, f"{path.name} checks claims of its own: use hapkit.claims.check"
    calls = calls_by_notebook()
    for notebook, found in calls.items():
        for name, group, _ in found:
            assert name == notebook, f"{notebook} checks the claims of {name}"
            assert group in CLAIMS.get(notebook, {}), f"{notebook} checks an unknown group {group!r}"


def test_every_definition_is_checked_once_by_its_notebook_with_the_inputs_it_needs():
    calls = calls_by_notebook()
    assert set(CLAIMS) <= set(calls), "every notebook of CLAIMS exists"
    for notebook, groups in CLAIMS.items():
        used = [group for _, group, _ in calls[notebook]]
        assert sorted(used) == sorted(groups), f"{notebook}: groups checked {used}, defined {sorted(groups)}"
        for _, group, given in calls[notebook]:
            for claim in groups[group]:
                import inspect

                needed = set(inspect.signature(claim.quantity).parameters)
                assert needed <= given, f"{notebook}/{group}: {claim.text!r} needs {sorted(needed - given)}"


def test_margin_is_the_signed_distance_to_the_threshold():
    assert Claim("a above 3", lambda a: a, ">", 3).margin(a=5.5) == 2.5
    assert Claim("a above 3", lambda a: a, ">", 3).margin(a=1) == -2
    assert Claim("a below 3", lambda a: a, "<", 3).margin(a=1) == 2
    assert Claim("a equals 3", lambda a: a, "==", 3).margin(a=3.25) == -0.25
    strict, loose = Claim("", lambda a: a, ">", 0), Claim("", lambda a: a, ">=", 0)
    assert not strict.holds(a=0) and loose.holds(a=0) and not loose.holds(a=-1e-9)
    assert not Claim("", lambda a: a, "<", 1).holds(a=float("nan"))
    with pytest.raises(ValueError):
        Claim("", lambda a: a, "=>", 0)


def test_a_notebook_claim_on_a_hand_made_case(capsys):
    # notebook 04's organisation claims: gaps of HAPPIER - SupAP per level, in points
    gap = pd.Series({"variant": -1.0, "shape": 7.0, "family": 4.5})
    ap_gap = pd.Series({"variant": 2.0, "shape": 5.0, "family": 12.0})
    names = dict(fine="variant", middle="shape", coarse="family")
    got = margins("04_embedding_space", "organisation", gap=gap, ap_gap=ap_gap, **names)
    assert got == {
        "family and shape neighbours: HAPPIER above SupAP by more than 3 points": 1.5,  # min(7, 4.5) - 3
        "variant level: the two within 5 points": 3.0,  # 5 - max(|-1|, |2|)
    }
    assert all(check("04_embedding_space", "organisation", gap=gap, ap_gap=ap_gap, **names).values())
    capsys.readouterr()
    with pytest.raises(ClaimNotMet, match="variant level"):
        check("04_embedding_space", "organisation", gap=gap, ap_gap=ap_gap.replace(2.0, -5.5), **names)
    with pytest.raises(TypeError, match="needs the inputs"):
        margins("04_embedding_space", "organisation", gap=gap, **names)
