"""The import rules of the layout (README.md, 'Layout'), read from the code with ast.

Core (hierarchy -> metrics -> evaluate) imports no wing; losses/ and data/ and results.py build on
the core alone; claims.py (the notebooks' claims, as data) on results.py alone; training/ and viz/ never import each other; nothing below the top imports the
command line or the batch runner.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hapkit"

CORE_ORDER = ("errors", "_lazy", "inputs", "hierarchy", "metrics", "evaluate")  # each may import those before it
ALLOWED = {
    "losses": {"core", "losses"},
    "data": {"core", "data"},
    "results": {"core"},
    "claims": {"results"},
    "training": {"core", "losses", "data", "results", "training"},
    "viz": {"core", "losses", "data", "results", "viz"},
    "reproduce": {"core", "data", "results", "training"},
    "cli": {"core", "losses", "data", "results", "training", "viz", "reproduce"},
    "__main__": {"cli"},
    "__init__": set(),
}


def wing(module: str) -> str:
    """hapkit.data.sop -> data; hapkit.metrics -> core; hapkit -> __init__."""
    parts = module.split(".")
    if parts[0] != "hapkit":
        return ""
    if len(parts) == 1:
        return "__init__"
    return "core" if parts[1] in CORE_ORDER else parts[1]


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every hapkit module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # from hapkit import viz
    return {m for m in found if m.split(".")[0] == "hapkit"}


def violations(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        own = wing(mod)
        if own == "__init__" and mod != "hapkit":
            own = mod.split(".")[1]
        for imp in sorted(imports_of(path, root)):
            head = imp.split(".")[1] if "." in imp else ""
            if not head or not ((root / head).is_dir() or (root / f"{head}.py").is_file()):
                continue  # the package itself (hapkit, hapkit.__version__)
            target = wing(imp)
            if target == "core" and own == "core":
                # within the core, only downwards: hierarchy <- metrics <- evaluate
                a, b = mod.split(".")[1], imp.split(".")[1]
                if CORE_ORDER.index(b) > CORE_ORDER.index(a):
                    out.append(f"{mod} imports {imp} (core modules import only those below them)")
                continue
            if own == "core":
                out.append(f"{mod} imports {imp} (the core imports no wing)")
            elif target != own and target not in ALLOWED.get(own, set()):
                out.append(f"{mod} imports {imp} ({own} may import {sorted(ALLOWED.get(own, set()))})")
    return out


def test_the_package_keeps_the_import_rules():
    assert violations(PACKAGE) == []


def test_the_rules_catch_a_figure_that_trains(tmp_path):
    pkg = tmp_path / "hapkit"
    for sub in ("viz", "training", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "metrics.py").write_text("from hapkit import evaluate\n")
    (pkg / "evaluate.py").write_text("import hapkit.metrics\n")
    (pkg / "viz" / "fig.py").write_text("def f():\n    from hapkit.training.engine import train\n")
    (pkg / "training" / "engine.py").write_text("from ..viz import fig\n")
    (pkg / "data" / "sop.py").write_text("import plotly\nfrom hapkit.viz.fig import f\n")
    found = violations(pkg)
    assert any("hapkit.viz.fig imports hapkit.training.engine" in v for v in found)
    assert any("hapkit.training.engine imports hapkit.viz" in v for v in found)
    assert any("hapkit.data.sop imports hapkit.viz.fig" in v for v in found)
    assert any("hapkit.metrics imports hapkit.evaluate" in v for v in found)
    assert not any("hapkit.evaluate imports" in v for v in found)  # evaluate may use metrics


@pytest.mark.parametrize("wing_dir", ["data", "losses"])
def test_no_plotly_or_widgets_below_the_figures(wing_dir):
    for path in (PACKAGE / wing_dir).rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"plotly", "ipywidgets", "umap"}, path


def test_the_engine_names_no_loss_class():
    """The engine knows losses by what they declare (HapkitLoss attributes), not by their names."""
    source = (PACKAGE / "training" / "engine.py").read_text()
    for name in ("HierarchicalProxyLoss", "CSLLoss", "ClusterLoss", "HAPPIER", "ROADMAP", "SupAP"):
        assert f'"{name}"' not in source and f"'{name}'" not in source, name
