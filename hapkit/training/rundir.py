"""The run directory: what ``hapkit train`` writes there, and the rules that keep it safe.

A run directory holds ``config.yaml`` (the resolved recipe), ``run.json`` (the invocation: recipe,
every override, data root, seed, device, versions, and each later resume with what it changed),
``metrics.jsonl`` (one line per epoch) and ``checkpoint.pt`` with its previous copy and digests
(:mod:`hapkit.training.checkpoint`). A directory that holds a run is never trained into again from
scratch by accident: :func:`claim_run_dir` refuses, naming ``--resume`` and ``--overwrite``, and
overwriting moves the old run aside instead of deleting it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from hapkit.errors import HapkitError
from hapkit.training.checkpoint import CHECKPOINT_NAME, previous_path

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "CONFIG_NAME",
    "INVOCATION_NAME",
    "RunExistsError",
    "holds_run",
    "claim_run_dir",
    "move_aside",
    "read_invocation",
    "write_invocation",
    "recorded_recipe",
    "resume_command",
]

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.yaml"
INVOCATION_NAME = "run.json"


class RunExistsError(HapkitError, FileExistsError):
    """Training from scratch into a directory that already holds a run."""


def holds_run(run_dir) -> bool:
    """Whether ``run_dir`` holds (part of) a training run: a checkpoint, its previous copy, or
    logged epochs."""
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    metrics = run_dir / METRICS_NAME
    return ckpt.is_file() or previous_path(ckpt).is_file() or (metrics.is_file() and metrics.stat().st_size > 0)


def move_aside(run_dir) -> Path:
    """Rename ``run_dir`` to a free ``<name>.replaced-<date>-<time>[-N]`` beside it; returns the new path."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    os.replace(run_dir, target)
    return target


def claim_run_dir(run_dir, overwrite: bool = False, main_process: bool = True) -> Path | None:
    """Make ``run_dir`` ready for a run from scratch. A directory holding a run is refused
    (:class:`RunExistsError`) unless ``overwrite``, which moves it aside (returned); only the main
    process moves, every process refuses alike."""
    run_dir = Path(run_dir)
    if not holds_run(run_dir):
        return None
    if not overwrite:
        raise RunExistsError(
            f"{run_dir} already holds a training run; continue it with --resume (library: resume=True), "
            f"train into another --out, or pass --overwrite (overwrite=True) to move it aside and start again"
        )
    return move_aside(run_dir) if main_process else None


def read_invocation(run_dir) -> dict | None:
    """The invocation recorded in ``run_dir`` (None when there is none)."""
    path = Path(run_dir) / INVOCATION_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HapkitError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore it or remove it") from e


def write_invocation(run_dir, record: dict) -> Path:
    """Write the invocation record atomically (a temporary file renamed into place)."""
    path = Path(run_dir) / INVOCATION_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def new_invocation(cfg_dict: dict, device: str, world_size: int, invocation: dict | None) -> dict:
    """The record of a run started now: what the caller says (CLI arguments) and what the recipe,
    the machine and the versions are."""
    import torch

    from hapkit import __version__

    train = cfg_dict.get("train", {})
    return {
        "recipe": cfg_dict.get("name"),
        **(invocation or {}),
        "seed": cfg_dict.get("seed"),
        "data_root": cfg_dict.get("data", {}).get("root"),
        "device": train.get("device"),
        "device_used": device,
        "world_size": world_size,
        "hapkit_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumes": [],
    }


def recorded_recipe(run_dir) -> dict | None:
    """The resolved recipe a run was trained with: ``config.yaml``, else the checkpoint's."""
    import yaml

    run_dir = Path(run_dir)
    config = run_dir / CONFIG_NAME
    if config.is_file():
        data = yaml.safe_load(config.read_text())
        if isinstance(data, dict):
            return data
    for ckpt in (run_dir / CHECKPOINT_NAME, previous_path(run_dir / CHECKPOINT_NAME)):
        if ckpt.is_file():
            from hapkit.training.checkpoint import CheckpointError, load_checkpoint

            try:
                return load_checkpoint(ckpt).get("recipe")
            except CheckpointError:
                continue
    return None


def resume_command(run_dir, world_size: int = 1) -> str:
    """The command that continues the run in ``run_dir`` with everything it was started with
    (the run directory records it)."""
    launcher = f"torchrun --nproc_per_node={world_size} -m hapkit" if world_size > 1 else "hapkit"
    return f"{launcher} train --out {run_dir} --resume"
