"""Batch reproduction: the grid runs a notebook with papermill per (method, dataset, seed), skips
complete runs, reports failures, and tabulates mean +/- std beside the published numbers.

The papermill tests run a stand-in for the training notebook (same parameters, instant) so that
they check the machinery in seconds; the real notebook 03 is executed by the notebook tests."""

import json
import math

import nbformat
import pandas as pd
import pytest

from hapkit import reproduce
from hapkit.cli import main
from hapkit.reproduce import plan_grid, run_grid, run_notebooks
from hapkit.results import collect_runs

FAKE_BODY = '''
import json, pathlib
out = pathlib.Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
if recipe == "csl":
    raise RuntimeError("this run fails on purpose")
with open(out.parents[2] / "executions.txt", "a") as f:
    f.write(f"{recipe} {seed}\\n")
base = {"happier": 0.6, "supap": 0.5}[recipe]
metrics = {"test/R@1@0": base + 0.02 * seed, "test/AP@0": 0.4, "test/AP@1": base / 2,
           "test/H-AP": base - 0.1 + 0.01 * seed, "test/ASI": 0.3, "test/NDCG": 0.8, "test/P@1@0": 0.1}
json.dump({"method": recipe, "dataset": dataset, "seed": seed, "level_names": ["fine", "coarse"],
           "metrics": metrics, "reported": {"test/R@1@0": 81.0} if recipe == "happier" else {}},
          open(out / "metrics.json", "w"))
'''

PARAMS = '''recipe = "happier"
dataset = "generated"
data_root = None
seed = 0
epochs = None
output_dir = None
overrides = []
progress = True'''


def write_notebook(path, *sources, params=PARAMS):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, str(path))
    return path


def test_a_grid_on_missing_data_says_how_to_prepare_it(tmp_path, capsys):
    from hapkit.reproduce import DataNotPrepared, check_datasets

    with pytest.raises(DataNotPrepared) as info:
        check_datasets(["generated", "sop", "cub"], data_root=tmp_path)
    message = str(info.value)
    assert "hapkit prepare-data sop" in message and "hapkit prepare-data cub" in message
    assert main(["reproduce", "--methods", "happier", "--datasets", "sop", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "results")]) == 2
    assert "hapkit prepare-data sop" in capsys.readouterr().err
    assert not (tmp_path / "results" / "runs").exists()  # nothing was run


def test_plan_grid_is_seed_major_and_checks_recipes(tmp_path):
    specs = plan_grid(["happier", "supap"], ["generated"], 2, out=tmp_path, epochs=3, overrides=["optim.lr=1e-3"])
    assert [s.name for s in specs] == ["happier_generated/seed0", "supap_generated/seed0",
                                        "happier_generated/seed1", "supap_generated/seed1"]
    p = specs[-1].parameters
    assert p["recipe"] == "supap" and p["seed"] == 1 and p["epochs"] == 3 and p["overrides"] == ["optim.lr=1e-3"]
    assert p["output_dir"] == str((tmp_path / "runs" / "supap_generated" / "seed1").resolve())
    from hapkit.training.config import ConfigError

    with pytest.raises(ConfigError, match="no recipe named 'nope_generated'"):
        plan_grid(["nope"], ["generated"], 1, out=tmp_path)


def test_training_notebook_parameters_are_the_ones_the_grid_passes():
    import papermill

    params = papermill.inspect_notebook(str(reproduce.find_notebook()))
    spec = plan_grid(["happier"], ["generated"], 1)[0]
    assert set(spec.parameters) <= set(params)
    assert params["recipe"]["default"] == '"happier"' and params["dataset"]["default"] == '"generated"'


@pytest.mark.slow
def test_grid_runs_skips_and_reports_failures(tmp_path, capsys):
    nb = write_notebook(tmp_path / "fake.ipynb", FAKE_BODY)
    out = tmp_path / "results"
    summary = run_grid(["happier"], ["generated"], seeds=2, out=out, jobs=2, notebook=nb, progress=False)
    assert sorted((out / "executions.txt").read_text().split("\n")[:-1]) == ["happier 0", "happier 1"]
    s = summary.set_index("method")
    assert s.loc["happier", "R@1"] == pytest.approx(61.0) and s.loc["happier", "R@1 std"] == pytest.approx(2 ** 0.5)
    assert s.loc["happier", "AP@1"] == pytest.approx(30.0) and s.loc["happier", "seeds"] == 2
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and (runs["duration_s"] > 0).all()  # papermill's recorded durations
    assert set(runs["seed"]) == {0, 1}
    assert pd.read_csv(out / "summary.csv").shape[0] == 1
    summary_md = (out / "summary.md").read_text()
    assert "test/R@1@0 81" in summary_md and "61.00 ± 1.41" in summary_md  # published beside measured
    assert pd.read_csv(out / "published.csv")["paper"].tolist() == [81.0]
    executed = json.loads((out / "runs" / "happier_generated" / "seed1" / "notebook.ipynb").read_text())
    assert executed["metadata"]["papermill"]["parameters"]["seed"] == 1

    # a second call skips the complete runs (through the command line) ...
    assert main(["reproduce", "--methods", "happier", "--seeds", "2", "--out", str(out), "--notebook", str(nb)]) == 0
    assert len((out / "executions.txt").read_text().splitlines()) == 2
    assert "2 of 2 runs already complete" in capsys.readouterr().out
    # ... and a failing run is reported after the others are tabulated
    with pytest.raises(RuntimeError, match=r"(?s)1 run\(s\) failed.*csl_generated/seed0: RuntimeError: this run fails on purpose"):
        run_grid(["happier", "csl"], ["generated"], seeds=1, out=out, notebook=nb, progress=False)
    assert len(collect_runs(out)) == 2


@pytest.mark.slow
def test_run_notebooks_executes_every_notebook_once(tmp_path):
    src = tmp_path / "notebooks"
    src.mkdir()
    write_notebook(src / "01_a.ipynb", "x = 1 + 1", params="size = 3")
    write_notebook(src / "02_b.ipynb", "import pathlib\npathlib.Path(output_dir).mkdir(parents=True)\n"
                   "(pathlib.Path(output_dir) / 'done.txt').write_text(f'{size} {progress}')",
                   params="size = 3\noutput_dir = None\nprogress = True")
    outputs = run_notebooks(src, out=tmp_path / "results", progress=False)
    assert [p.name for p in outputs] == ["01_a.ipynb", "02_b.ipynb"]
    assert (tmp_path / "results" / "notebooks" / "02_b" / "done.txt").read_text() == "3 False"
    stamp = outputs[0].stat().st_mtime_ns
    run_notebooks(src, out=tmp_path / "results", progress=False)  # complete: not executed again
    assert outputs[0].stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_reproduce_all_trains_the_grid_before_the_notebooks_that_read_it(tmp_path):
    """The notebooks run after the grid and get its runs folder and results folder."""
    training = write_notebook(tmp_path / "03_training.ipynb", FAKE_BODY)
    src = tmp_path / "notebooks"
    src.mkdir()
    write_notebook(src / "04_reader.ipynb",
                   "import pathlib\n"
                   "found = (pathlib.Path(runs_dir) / 'happier_generated' / 'seed0' / 'metrics.json').is_file()\n"
                   "pathlib.Path(output_dir).mkdir(parents=True)\n"
                   "(pathlib.Path(output_dir) / 'seen.txt').write_text(f'{found} {pathlib.Path(results_dir).name}')",
                   params="runs_dir = None\nresults_dir = None\noutput_dir = None")
    out = tmp_path / "results"
    summary = reproduce.reproduce_all(out=out, methods=["happier"], notebook=training, notebooks_dir=src,
                                      progress=False)
    assert summary["method"].tolist() == ["happier"]
    assert (out / "notebooks" / "04_reader" / "seen.txt").read_text() == "True results"
