"""Atomic checkpoints and random-number-generator states.

A checkpoint is written to ``<path>.tmp``, flushed to disk, and only then put in place with
:func:`os.replace` (atomic on POSIX and Windows): a run killed while saving never leaves a
truncated file under ``<path>``. The checkpoint it replaces is kept as ``<previous_path(path)>``,
so that a checkpoint damaged later (a full disk, a copy cut short) still leaves one good state to
resume from (:func:`load_resumable`).
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from hapkit.errors import HapkitError

__all__ = [
    "CheckpointError",
    "save_atomic",
    "load_checkpoint",
    "load_resumable",
    "previous_path",
    "rng_state",
    "set_rng_state",
    "seed_everything",
]


class CheckpointError(HapkitError, RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupted, not a checkpoint)."""


def previous_path(path) -> Path:
    """Where the checkpoint replaced by the last save of ``path`` is kept: ``<stem>.prev<suffix>``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_atomic(obj, path, keep_previous: bool = False) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``; with
    ``keep_previous`` the file it replaces is moved to :func:`previous_path` first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.is_file():
        # a crash between the two renames leaves no `path` but a complete previous checkpoint
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by hapkit (a dict of tensors and plain Python values).

    Raises FileNotFoundError when there is no file and :class:`CheckpointError`, naming the file,
    when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # weights_only=False: checkpoints hold numpy and python RNG states, which are not tensors
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, wrong file type: all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated or damaged"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a hapkit checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def load_resumable(path, map_location="cpu") -> tuple[dict, Path]:
    """The state to resume from: ``path``, or the previous checkpoint kept beside it when ``path``
    is missing or unreadable. Returns ``(state, file read)``; raises :class:`CheckpointError`
    (both files named, with what to do) when neither can be read."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return load_checkpoint(path, map_location), path
    except (FileNotFoundError, CheckpointError) as error:
        if not prev.is_file():
            if isinstance(error, FileNotFoundError):
                raise
            raise CheckpointError(
                f"{error}. No previous checkpoint ({prev}) to fall back to: start the run again in a new "
                f"output directory, or delete {path} to start this one from scratch."
            ) from error
        try:
            state = load_checkpoint(prev, map_location)
        except CheckpointError as older:
            raise CheckpointError(
                f"{error}; the previous checkpoint is unreadable too ({older}). Start the run again in a new "
                f"output directory, or delete both files to start this one from scratch."
            ) from older
        warnings.warn(f"{error}; resuming from the previous checkpoint {prev} instead", RuntimeWarning, stacklevel=2)
        return state, prev


def rng_state() -> dict:
    """The states of every generator a training step may draw from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
