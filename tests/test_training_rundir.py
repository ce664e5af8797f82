"""Nothing lost: a run directory is never trained over, `--resume` alone restores the whole
invocation, checkpoints are verified and load without running code, a damaged checkpoint is never
rotated over the last good one, and a run killed anywhere (inside a checkpoint write included)
finishes exactly as the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hapkit.cli import main
from hapkit.training.checkpoint import (
    CheckpointError,
    damaged_path,
    digest_path,
    load_checkpoint,
    load_verified,
    previous_path,
    save_atomic,
)
from hapkit.training.engine import Callback, Trainer
from hapkit.training.rundir import RunExistsError, read_invocation
from test_training_engine import TinySet, assert_same_state, eval_sets, run, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--set", "data.batches_per_super_tuple=1", "--set", "model.width=4", "--set", "data.batch_size=32",
         "--set", "eval.max_items=200", "--set", "eval.metrics=[H-AP, R@k]", "--set", "train.device=cpu",
         "--set", "train.amp=none", "--no-progress"]


def cli_train(out, *args):
    return main(["train", "--out", str(out), *args])


def files(run_dir):
    return {p.name: p.read_bytes() for p in Path(run_dir).iterdir() if p.is_file()}


# ------------------------------------------------------------------- never trained over


def test_training_into_a_directory_that_holds_a_run_is_refused_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_train(out, "--recipe", "happier_generated", "--set", "train.epochs=2", *QUICK) == 0
    before = files(out)
    capsys.readouterr()
    assert cli_train(out, "--recipe", "happier_generated", "--set", "train.epochs=1", *QUICK) == 2
    err = capsys.readouterr().err
    assert err.startswith("hapkit train: error:") and err.count("\n") == 1
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert files(out) == before  # metrics.jsonl, checkpoints and records untouched


def test_the_library_refuses_too_and_overwrite_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "run"
    run(out, "train.epochs=1", "eval.every=0", "eval.at_end=false")
    before = files(out)
    with pytest.raises(RunExistsError, match="already holds a training run"):
        run(out, "train.epochs=1", "eval.every=0", "eval.at_end=false")
    assert files(out) == before
    run(out, "train.epochs=1", "eval.every=0", "eval.at_end=false", "seed=1", overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and files(aside[0]) == before  # moved, not deleted
    assert load_checkpoint(out / "checkpoint.pt")["recipe"]["seed"] == 1


# ------------------------------------------------------------------- resume restores everything


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.global_step == self.step:
            trainer.request_stop()  # what the SIGTERM handler does


def stop_cli_run_at(monkeypatch, step):
    init = Trainer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.callbacks.append(StopAt(step))

    monkeypatch.setattr(Trainer, "__init__", patched)


def test_resume_alone_restores_every_option_of_the_run(tmp_path, capsys, monkeypatch):
    out, data = tmp_path / "run", tmp_path / "data"
    with monkeypatch.context() as m:
        stop_cli_run_at(m, 3)
        assert cli_train(out, "--recipe", "happier", "--dataset", "generated", "--seed", "4",
                         "--data-root", str(data), "--set", "train.epochs=2", *QUICK) == 0
    printed = capsys.readouterr().out
    command = f"hapkit train --out {out} --resume"
    assert f"stopped at step 3; resume with: {command}" in printed
    record = read_invocation(out)
    assert record["recipe"] == "happier_generated" and record["seed"] == 4 and record["data_root"] == str(data)
    assert "train.epochs=2" in record["overrides"] and record["hapkit_version"] and record["device_used"] == "cpu"

    assert main(command.split()[1:]) == 0  # the printed command, word for word
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["finished"] and state["epoch"] == 2 and state["global_step"] == 12  # not the recipe's 10 epochs
    assert state["recipe"]["seed"] == 4 and state["recipe"]["data"]["root"] == str(data)
    assert state["recipe"]["model"]["width"] == 4 and state["recipe"]["data"]["batch_size"] == 32


def test_resume_flags_change_only_what_continuing_allows_and_say_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_train(out, "--recipe", "happier_generated", "--set", "train.epochs=1", *QUICK) == 0
    capsys.readouterr()
    assert cli_train(out, "--resume", "--set", "train.epochs=2", "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "resumed with train.epochs: 1 -> 2" in printed
    assert read_invocation(out)["resumes"][-1]["changes"] == {"train.epochs": [1, 2]}
    for bad, named in ((["--set", "optim.lr=0.5"], "optim.lr 0.001 -> 0.5"), (["--seed", "3"], "seed 0 -> 3"),
                       (["--set", "train.epochs=1"], "already trained 2 epochs"),
                       (["--recipe", "supap_generated"], "trains happier_generated")):
        before = files(out)
        assert cli_train(out, "--resume", *bad) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
        assert files(out) == before


def test_resume_finds_the_default_run_directory_of_a_recipe(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--recipe", "happier_generated", "--set", "train.epochs=1", *QUICK]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "happier_generated-seed0"
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1
    capsys.readouterr()
    assert main(["train", "--recipe", "happier_generated", "--resume", "--set", "train.epochs=2", "--no-progress"]) == 0
    assert "resumed with train.epochs: 1 -> 2" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2
    assert main(["train", "--resume"]) == 2  # neither a recipe nor a run directory
    assert "--recipe is required" in capsys.readouterr().err


# ------------------------------------------------------------------- verified checkpoints


def test_a_damaged_checkpoint_is_never_rotated_over_the_last_good_one(tmp_path):
    out = tmp_path / "run"
    extra = ("train.epochs=3", "eval.every=0", "eval.at_end=false")
    full = run(tmp_path / "full", *extra)
    run(out, *extra, stop_after_steps=4)  # checkpoints of epochs 1 and 2
    ckpt = out / "checkpoint.pt"
    assert load_checkpoint(previous_path(ckpt))["epoch"] == 1
    ckpt.write_bytes(ckpt.read_bytes()[:-200])  # damaged after it was written (a copy cut short)
    with pytest.warns(RuntimeWarning, match=r"checkpoint\.pt is damaged.*using the previous checkpoint"):
        resumed = run(out, *extra, resume=True)
    assert resumed.global_step == full.global_step
    assert_same_state(load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"], load_checkpoint(ckpt)["model"])
    # the damaged file was kept aside, never rotated into the previous copy
    assert damaged_path(ckpt).is_file()
    assert load_checkpoint(previous_path(ckpt))["epoch"] == 2


def test_evaluate_names_a_damaged_checkpoint_and_uses_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_train(out, "--recipe", "happier_generated", "--set", "train.epochs=2", *QUICK) == 0
    ckpt = out / "checkpoint.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: only the digest sees it
    ckpt.write_bytes(bytes(raw))
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match=rf"{ckpt.name} is damaged.*using the previous checkpoint .*checkpoint\.prev\.pt"):
        assert main(["evaluate", "--checkpoint", str(ckpt), "--no-progress"]) == 0
    assert "test/H-AP" in capsys.readouterr().out


def test_a_checkpoint_is_loaded_without_running_code_from_it(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "shared.pt"
    torch.save({"model": {}, "recipe": {}, "extra": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refuses this file"):
        load_checkpoint(evil)
    assert not marker.exists()
    assert main(["evaluate", "--checkpoint", str(evil)]) == 2
    assert not marker.exists()


def test_checkpoints_of_earlier_versions_still_load_but_object_arrays_do_not(tmp_path):
    import numpy as np

    legacy = tmp_path / "legacy.pt"
    state = {"rng": [{"numpy": ("MT19937", np.arange(624, dtype=np.uint32), 624, 0, 0.0)}]}
    torch.save(state, legacy)  # an earlier hapkit stored numpy's RNG key as an array
    assert load_checkpoint(legacy)["rng"][0]["numpy"][1].dtype == np.uint32
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": np.array([Payload()], dtype=object)}, tmp_path / "objects.pt")
    with pytest.raises(CheckpointError, match="refuses this file"):
        load_checkpoint(tmp_path / "objects.pt")
    assert not marker.exists()


def test_a_checkpoint_holds_only_what_loads_safely(tmp_path):
    with pytest.raises(CheckpointError, match=r"cannot save state\['x'\] \(.*Path\)"):
        save_atomic({"x": tmp_path}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()
    run(tmp_path / "run", "train.epochs=1", "eval.every=0", "eval.at_end=false")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["global_step"] == 2


# ------------------------------------------------------------------- SIGKILL soak

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import hapkit.training.checkpoint as ck
    from hapkit.training.engine import Callback, train
    from test_training_engine import TinySet, eval_sets, tiny_cfg

    kill = os.environ.get("KILL_AT", "")
    where, _, nth = kill.partition(":")
    calls = {{"write": 0, "replace": 0, "step": 0}}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    write, replace = ck._write_synced, ck.os.replace

    def killing_write(path, data):
        calls["write"] += 1
        if where == "write" and calls["write"] == int(nth):
            with open(path, "wb") as f:  # half of the file reaches the disk, then the process dies
                f.write(bytes(data[: len(data) // 2]))
                f.flush()
                os.fsync(f.fileno())
            die()
        write(path, data)

    class KillingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, a, b):
            calls["replace"] += 1
            if where == "replace" and calls["replace"] == int(nth):
                die()
            replace(a, b)

    class KillingStep(Callback):
        def on_step_end(self, trainer):  # killed between two checkpoints, in the middle of an epoch
            calls["step"] += 1
            if where == "step" and calls["step"] == int(nth):
                die()

    ck._write_synced, ck.os = killing_write, KillingOs()
    train(tiny_cfg(*{overrides!r}), out_dir=sys.argv[1], resume=True, progress=False,
          train_set=TinySet(), eval_sets=eval_sets(), callbacks=[KillingStep()])
    print("finished")
""")

SOAK = ["train.epochs=3", "train.checkpoint_every=1"]


@pytest.mark.slow
def test_training_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed runs use one thread: same kernels, same bits
    try:
        full = run(tmp_path / "full", *SOAK)
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "soak.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), overrides=SOAK))
    out = tmp_path / "killed"
    # per save: two writes (the checkpoint, then its digest) and up to four renames (the previous
    # checkpoint and digest aside, the new checkpoint, its digest): every stage is hit, counted from
    # the start of each process, plus kills between two checkpoints
    kill_points = ["write:1", "replace:1", "step:2", "write:2", "replace:2", "write:3", "replace:3"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def launch(point):
        return subprocess.run([sys.executable, str(script), str(out)], env={**env, "KILL_AT": point},
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    for point in kill_points:
        proc = launch(point)
        assert proc.returncode == -signal.SIGKILL, f"{point}: not killed ({proc.returncode}): {proc.stderr[-1500:]}"
        if (out / "checkpoint.pt").exists() or previous_path(out / "checkpoint.pt").exists():
            load_verified(out)  # a kill never leaves the directory without a loadable checkpoint
    proc = launch("")
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr[-2000:]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["finished"] and state["global_step"] == full.global_step
    assert_same_state(load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"], state["model"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["test/H-AP"] for r in lines] == list(full.history["test/H-AP"])
    assert digest_path(out / "checkpoint.pt").is_file()


# ------------------------------------------------------------------- one line, never a traceback


def one_line_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hapkit {argv[0]}: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    # a malformed annotation line of a real dataset format: the file, the line and its content
    sop = tmp_path / "sop"
    sop.mkdir()
    (sop / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n1 1 bicycle_final/a.JPG\n")
    (sop / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    one_line_error(capsys, ["train", "--recipe", "happier_sop", "--data-root", str(sop), "--out", str(tmp_path / "a"),
                            "--no-progress"], "Ebay_train.txt", "line 2")
    # ImageNet weights that cannot be fetched (offline)
    import hapkit.training.models as models

    def offline(url):
        raise OSError("network is unreachable")

    monkeypatch.setattr(models, "_fetch_state_dict", offline)
    one_line_error(capsys, ["train", "--recipe", "happier_generated", "--out", str(tmp_path / "b"), "--set",
                            "model.backbone=resnet18", "--set", "model.pretrained=required", "--no-progress"],
                   "could not load ImageNet weights", "model.pretrained=false")
    # a missing extra names the pip extra
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    one_line_error(capsys, ["train", "--recipe", "happier_generated", "--out", str(tmp_path / "c"), "--set",
                            "model.backbone=timm:resnet18", "--no-progress"], "hapkit[timm]")
    # a CUDA device on a machine without one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--device", "cuda"], "cuda")
    # nonsense settings: nothing is written
    one_line_error(capsys, ["train", "--recipe", "happier_generated", "--out", str(tmp_path / "d"), "--set",
                            "train.epochs=-1"], "train.epochs=-1")
    assert not (tmp_path / "d").exists()
    # --debug: the same error with its traceback
    with pytest.raises(RunExistsError):
        (tmp_path / "e").mkdir()
        (tmp_path / "e" / "metrics.jsonl").write_text('{"epoch": 1}\n')
        main(["train", "--recipe", "happier_generated", "--out", str(tmp_path / "e"), "--debug"])
