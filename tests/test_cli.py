"""The command line: help texts, recipes listing, train -> evaluate on the generated dataset,
error messages for bad overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hapkit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# one quick epoch on the generated dataset: 6 batches (one per pair of families), small eval
QUICK = ["--set", "train.epochs=1", "--set", "data.batches_per_super_tuple=1", "--set", "model.width=4",
         "--set", "data.batch_size=32", "--set", "eval.max_items=200", "--set", "eval.metrics=[H-AP, R@k]",
         "--set", "train.device=cpu", "--set", "train.amp=none"]


def test_python_dash_m_hapkit_shows_help():
    out = subprocess.run([sys.executable, "-m", "hapkit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "evaluate", "reproduce", "prepare-data", "recipes"):
        assert cmd in out.stdout


@pytest.mark.parametrize("cmd", ["train", "evaluate", "reproduce", "prepare-data", "recipes"])
def test_every_command_has_a_description(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([cmd, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: hapkit " + cmd in text and len(text) > 300


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_recipes_lists_and_filters(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 56 and any(line.startswith("happier_sop ") for line in lines)
    assert main(["recipes", "--dataset", "generated"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "happier_generated" in names and "happier_sop" not in names
    assert main(["recipes", "--show", "happier_sop"]) == 0
    assert "embedding_size: 512" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(capsys, tmp_path):
    code = main(["train", "--recipe", "happier", "--dataset", "generated", "--out", str(tmp_path),
                 "--set", "optim.lrr=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "Did you mean 'lr'" in err


def test_train_then_evaluate_on_the_generated_dataset(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "happier", "--dataset", "generated", "--out", str(run),
                 "--no-progress", *QUICK]) == 0
    out = capsys.readouterr().out
    assert "test/H-AP" in out and f"run directory: {run}" in out
    lines = (run / "metrics.jsonl").read_text().splitlines()
    trained = json.loads(lines[-1])
    assert trained["epoch"] == 1 and trained["step"] == 6

    assert main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--json", str(tmp_path / "m.json"),
                 "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated.keys() == {k for k in trained if k.startswith("test/")}
    for k, v in evaluated.items():
        assert v == pytest.approx(trained[k], abs=1e-6)


@pytest.mark.slow
def test_evaluate_under_torchrun_on_two_processes_equals_one_process(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "happier", "--dataset", "generated", "--out", str(run),
                 "--no-progress", *QUICK]) == 0
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--json", str(tmp_path / "one.json"),
                 "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "hapkit", "evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cpu",
         "--json", str(tmp_path / "two.json"), "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test/H-AP") == 1  # process 0 prints, once
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:  # each process embeds half of the set: the same embeddings up to float rounding
        assert two[k] == pytest.approx(one[k], abs=1e-6), k


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_prepare_data_for_a_missing_real_dataset_says_what_to_do(tmp_path, capsys, monkeypatch):
    from hapkit.data import DataError

    def refuse(name, root):
        raise DataError(f"download {name} by hand into {root}")

    monkeypatch.setattr("hapkit.data.prepare", refuse)
    assert main(["prepare-data", "sop", "--root", str(tmp_path)]) == 2
    assert f"download sop by hand into {tmp_path}" in capsys.readouterr().err
