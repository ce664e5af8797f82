"""The command line's import budget: help texts, the recipes listing and the parsing of every verb
import neither torch nor the scientific stack nor the dataset loaders, so that they answer at once.
Each case runs in a fresh interpreter, where sys.modules shows what the command really imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# what a command that only parses its arguments or lists recipes must not import
HEAVY = (
    "torch", "torchvision", "torchmetrics", "pytorch_metric_learning", "numpy", "pandas", "scipy", "sklearn",
    "PIL", "tqdm", "plotly", "papermill", "nbformat", "matplotlib",
    "hapkit.data.base", "hapkit.data.builder", "hapkit.data.samplers", "hapkit.data.embeddings",
    "hapkit.data.preparation", "hapkit.data.download", "hapkit.data.generated", "hapkit.data.sop",
    "hapkit.data.inaturalist", "hapkit.data.dyml", "hapkit.data.cub", "hapkit.data.cifar100",
    "hapkit.data.revisited", "hapkit.data.sfm120k", "hapkit.data.gldv2",
    "hapkit.training.engine", "hapkit.training.models", "hapkit.training.runs", "hapkit.training.checkpoint",
    "hapkit.training.distributed", "hapkit.evaluate", "hapkit.metrics", "hapkit.losses", "hapkit.viz",
    "hapkit.reproduce", "hapkit.results",
)

# `python -m hapkit ARGS`, reporting its exit code, its output and every module it imported
SCRIPT = """
import contextlib, io, json, runpy, sys
sys.argv = ["hapkit", *json.loads(sys.argv[1])]
out = io.StringIO()
code = 0
try:
    with contextlib.redirect_stdout(out):
        runpy.run_module("hapkit", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "stdout": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def run_cli(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def heavy_imports(modules: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


VERBS = ["train", "evaluate", "reproduce", "prepare-data", "recipes"]

CASES = {
    "help": (["--help"], "usage: hapkit"),
    "version": (["--version"], "hapkit "),
    "recipes": (["recipes"], "happier_generated"),
    "recipes-filtered": (["recipes", "--method", "happier", "--dataset", "sop"], "happier_sop"),
    **{f"{verb}-help": ([verb, "--help"], f"usage: hapkit {verb}") for verb in VERBS},
}


@pytest.mark.parametrize("case", list(CASES))
def test_command_imports_nothing_heavy(case):
    args, expected = CASES[case]
    result = run_cli(args)
    assert result["code"] == 0
    assert expected in result["stdout"]  # the command did run to its end
    assert "hapkit.cli" in result["modules"]
    assert heavy_imports(result["modules"]) == []


def test_prepare_data_help_lists_every_dataset_without_loading_one():
    from hapkit.data.registry import dataset_names

    result = run_cli(["prepare-data", "--help"])
    text = " ".join(result["stdout"].split())
    for name in dataset_names():
        assert name in text
    assert heavy_imports(result["modules"]) == []


def test_the_budget_sees_a_heavy_import():
    """The check itself: a command that loads a dataset module is caught."""
    assert heavy_imports(["hapkit.cli", "hapkit.data.registry", "hapkit.data.sop", "torch._C"]) == [
        "hapkit.data.sop", "torch._C"]
    assert heavy_imports(["hapkit.data.registry", "hapkit.data.transforms", "torchvisionx"]) == []


def test_bundled_recipes_read_the_same_with_both_yaml_parsers():
    """`hapkit recipes` parses the bundled files with libyaml when it is there: it must read each
    of them exactly as the pure-Python parser does."""
    from hapkit.training.recipes import RECIPE_DIR, _parse, list_recipes

    names = list_recipes()
    assert len(names) > 10
    for name in names:
        path = RECIPE_DIR / f"{name}.yaml"
        assert _parse(path) == yaml.safe_load(path.read_text()), name


def test_a_broken_bundled_recipe_is_reported_by_the_reference_parser(tmp_path, monkeypatch):
    import hapkit.training.recipes as recipes
    from hapkit.training.config import ConfigError

    (tmp_path / "broken_generated.yaml").write_text("method: happier\ndata: {dataset: generated\n")
    monkeypatch.setattr(recipes, "RECIPE_DIR", tmp_path.resolve())
    with pytest.raises(ConfigError) as caught:
        recipes.read_recipe_dict("broken_generated")
    try:
        yaml.safe_load((tmp_path / "broken_generated.yaml").read_text())
    except yaml.YAMLError as e:
        expected = recipes._one_line(e)
    assert str(caught.value).endswith(f"is not valid YAML: {expected}")
