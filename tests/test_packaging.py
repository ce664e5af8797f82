"""The environment files and the stored notebooks stay consistent with pyproject.toml."""

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# pip name -> conda-forge name, where they differ
CONDA_NAME = {"torch": "pytorch", "faiss-cpu": "faiss"}


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower()


def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def every_requirement() -> list[str]:
    """The core dependencies and every extra's."""
    project = pyproject()
    return list(project["dependencies"]) + [r for reqs in project["optional-dependencies"].values() for r in reqs]


def conda_env(path):
    env = yaml.safe_load(path.read_text())
    conda, pip = set(), []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip.extend(dep.get("pip", []))
        else:
            conda.add(requirement_name(dep))
    return env, conda, pip


def covered(name, conda, torch_variant):
    name = CONDA_NAME.get(name, name)
    if name == "pytorch":
        return torch_variant in conda
    if name == "faiss":
        return bool({"faiss-cpu", "faiss-gpu"} & conda)
    return name in conda


@pytest.mark.parametrize(
    "path, torch_variant, faiss, editable",
    [
        ("binder/environment.yml", "pytorch-cpu", "faiss-cpu", "-e .."),
        ("environment.yml", "pytorch-gpu", "faiss-gpu", "-e ."),
    ],
)
def test_conda_environments_cover_every_dependency_and_extra(path, torch_variant, faiss, editable):
    env, conda, pip = conda_env(ROOT / path)
    assert "conda-forge" in env["channels"]
    missing = [
        requirement_name(r) for r in every_requirement()
        if not covered(requirement_name(r), conda, torch_variant)
    ]
    assert not missing, f"{path} lacks {missing}"
    assert faiss in conda
    assert editable in pip, f"{path} must install hapkit itself with `{editable}` in its pip list"


# What only the notebooks need; the library must import without them.
NOTEBOOK_ONLY = ("plotly", "ipywidgets", "umap", "papermill")


def test_the_core_install_is_the_library_and_the_extras_hold_the_rest():
    project = pyproject()
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    assert {"torch", "torchmetrics", "pytorch-metric-learning", "pandas", "tqdm", "pyyaml"} <= core
    assert not core & {"jupyterlab", "ipywidgets", "anywidget", "plotly", "umap-learn", "papermill", "nbval", "ipykernel"}
    assert {"jupyterlab", "plotly", "umap-learn", "papermill", "nbval"} <= extras["notebooks"]
    assert extras["faiss"] == {"faiss-cpu"} and extras["timm"] == {"timm"}
    makefile = (ROOT / "Makefile").read_text()
    assert f'-e ".[{",".join(sorted(extras, key=["notebooks", "faiss", "timm", "test"].index))}]"' in makefile


def test_the_library_imports_none_of_the_notebook_extras():
    modules = "hapkit, hapkit.metrics, hapkit.evaluate, hapkit.losses, hapkit.data, hapkit.training.engine"
    code = (
        f"import sys; import {modules}; import hapkit.losses.happier, hapkit.losses.proxies; "
        f"print(sorted(m for m in {NOTEBOOK_ONLY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"importing the library loads {out.stdout.strip()}"


def test_binder_is_cpu_only():
    _, conda, _ = conda_env(ROOT / "binder/environment.yml")
    assert not any("gpu" in name or "cuda" in name for name in conda)


def test_torch_range_allows_the_local_wheels_and_nothing_newer():
    deps = {requirement_name(r): r for r in pyproject()["dependencies"]}
    assert "<2.15" in deps["torch"] and "<0.30" in deps["torchvision"]


def test_notebooks_are_stored_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebook found"
    for nb_path in notebooks:
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, nb_path.name


def test_every_notebook_has_one_parameters_cell():
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name}: {len(tagged)} cells tagged 'parameters'"


@pytest.mark.skipif(shutil.which("nbstripout") is None and not (Path(sys.prefix) / "bin/nbstripout").exists(), reason="nbstripout not installed")
def test_nbstripout_verify():
    exe = shutil.which("nbstripout") or str(Path(sys.prefix) / "bin/nbstripout")
    notebooks = [str(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))]
    result = subprocess.run([exe, "--verify", *notebooks], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_missing_extra_is_named_with_its_install_command():
    from hapkit._lazy import require_extra

    require_extra("notebooks", "json", what="a figure")  # installed: nothing happens
    with pytest.raises(ImportError, match=r"pip install -e '\.\[notebooks\]'") as info:
        require_extra("notebooks", "json", "no_such_module_xyz", what="a figure")
    assert "a figure needs no_such_module_xyz, which" in str(info.value)  # only the missing one
