"""Verified, atomic checkpoints that load without running code, and random-number-generator states.

Writing (:func:`save_atomic`): the state is serialised in memory, written to ``<path>.tmp``,
fsynced, read back and compared with what was serialised, and only then renamed over ``<path>``
(:func:`os.replace` is atomic on POSIX and Windows). Its SHA-256 digest is kept beside it in
``<path>.sha256``. The checkpoint it replaces is kept as :func:`previous_path` - but only once it
has been verified against its own digest: a damaged file is moved to ``<stem>.damaged<suffix>``
and never rotated over the last good one. A run killed at any point of a save leaves ``<path>``
or its previous copy complete.

Reading (:func:`load_checkpoint`): the digest is checked when present, then the file is read with
``torch.load(weights_only=True)``: tensors and plain Python values only, so loading a checkpoint
someone shared cannot execute code from it. :func:`load_verified` falls back to the previous
checkpoint, with a warning naming the damaged file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from hapkit.errors import HapkitError, MissingFileError

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "checkpoint_file",
    "save_atomic",
    "load_checkpoint",
    "load_verified",
    "previous_path",
    "digest_path",
    "damaged_path",
    "rng_state",
    "set_rng_state",
    "seed_everything",
]

CHECKPOINT_NAME = "checkpoint.pt"

try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

# Plain values a checkpoint may hold besides tensors; MultiStepLR keeps its milestones in a Counter.
# The numpy entries read checkpoints of earlier hapkit versions, whose numpy RNG key was a uint32
# array: numeric arrays only (an object array needs globals that stay refused).
_SAFE_GLOBALS = [collections.Counter, collections.OrderedDict,
                 _np_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
_PLAIN = (int, float, str, bool, bytes, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


class CheckpointError(HapkitError, RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupted, unsafe, not a checkpoint)."""


def checkpoint_file(path) -> Path:
    """A checkpoint file, or the ``checkpoint.pt`` of a run directory."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def previous_path(path) -> Path:
    """Where the checkpoint replaced by the last save of ``path`` is kept: ``<stem>.prev<suffix>``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def digest_path(path) -> Path:
    """The SHA-256 digest written beside a checkpoint: ``<name>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def damaged_path(path) -> Path:
    """Where a checkpoint found damaged at the next save is kept for inspection."""
    path = Path(path)
    return path.with_name(f"{path.stem}.damaged{path.suffix}")


def _unsafe_leaf(obj, where: str = "state") -> str | None:
    """The first value of ``obj`` that ``torch.load(weights_only=True)`` would refuse, or None."""
    if isinstance(obj, _PLAIN):
        return None
    if isinstance(obj, dict):
        if type(obj) not in (dict, *_SAFE_GLOBALS):
            return f"{where} ({type(obj).__name__})"
        for k, v in obj.items():
            bad = _unsafe_leaf(k, where) or _unsafe_leaf(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            bad = _unsafe_leaf(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(folder: Path) -> None:
    # a rename is durable once the directory entry is on disk (not possible on Windows)
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_digest(path: Path) -> None:
    """Raise :class:`CheckpointError` when ``path`` does not match the digest written with it."""
    sidecar = digest_path(path)
    if not sidecar.is_file():
        return  # written by an older hapkit, or killed between the rename and the digest: load decides
    expected = sidecar.read_text().split()[0] if sidecar.stat().st_size else ""
    if _file_digest(path) != expected:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its content does not match the SHA-256 digest written with it ({sidecar})"
        )


def _is_intact(path: Path) -> bool:
    try:
        if digest_path(path).is_file():
            _verify_digest(path)
        else:
            load_checkpoint(path)
        return True
    except (CheckpointError, FileNotFoundError):
        return False


def save_atomic(obj, path, keep_previous: bool = False) -> Path:
    """Write ``obj`` to ``path`` verified and atomically (see the module docstring); with
    ``keep_previous`` the intact file it replaces is moved to :func:`previous_path` first.

    ``obj`` may hold tensors and plain Python values (dict, list, tuple, numbers, strings, None):
    anything else is refused here, when it is written, rather than when it is loaded."""
    path = Path(path)
    bad = _unsafe_leaf(obj)
    if bad:
        raise CheckpointError(
            f"cannot save {bad} in checkpoint {path}: a checkpoint holds tensors and plain Python values only "
            f"(so that loading it never runs code); convert it first"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, data)
    if _file_digest(tmp) != digest:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"writing checkpoint {path} failed: the file read back differs from what was written "
            f"(disk full or failing?); the previous checkpoint is untouched"
        )
    sidecar = digest_path(path)
    if path.is_file():
        if keep_previous and _is_intact(path):
            # a crash between these renames leaves no `path` but an intact previous checkpoint
            digest_path(previous_path(path)).unlink(missing_ok=True)
            os.replace(path, previous_path(path))
            if sidecar.is_file():
                os.replace(sidecar, digest_path(previous_path(path)))
        elif keep_previous:
            warnings.warn(
                f"checkpoint {path} was damaged; kept as {damaged_path(path)}, the previous checkpoint "
                f"{previous_path(path)} stays", RuntimeWarning, stacklevel=2,
            )
            sidecar.unlink(missing_ok=True)
            os.replace(path, damaged_path(path))
    sidecar.unlink(missing_ok=True)  # never a digest of another file beside `path`
    os.replace(tmp, path)
    _write_synced(sidecar.with_name(sidecar.name + ".tmp"), f"{digest}  {path.name}\n".encode())
    os.replace(sidecar.with_name(sidecar.name + ".tmp"), sidecar)
    _sync_dir(path.parent)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by hapkit (a dict of tensors and plain Python values), checking
    its digest, without running code from the file (``weights_only=True``).

    Raises FileNotFoundError when there is no file and :class:`CheckpointError`, naming the file,
    when it is damaged, unreadable, or holds anything but tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {path}")
    _verify_digest(path)
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe(_SAFE_GLOBALS):
                state = torch.load(path, map_location=map_location, weights_only=True)
        else:  # torch < 2.5
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain values; hapkit loads checkpoints "
                f"without running code from them, so it refuses this file (re-save it from trusted code as "
                f"tensors and plain values)"
            ) from e
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated or damaged") from e
    except Exception as e:  # truncated zip, wrong file type: all mean "unreadable"
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {reason}); it is truncated or damaged"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a hapkit checkpoint (it holds a {type(state).__name__}, not a dict)")
    return state


def load_verified(path, map_location="cpu") -> tuple[dict, Path]:
    """The state of checkpoint ``path`` (a file or a run directory), or of the previous checkpoint
    kept beside it when ``path`` is missing or damaged (with a warning naming the damaged file).
    Returns ``(state, file read)``; raises :class:`CheckpointError` (both files named, with what
    to do) when neither can be read, FileNotFoundError when neither exists."""
    path = checkpoint_file(path)
    prev = previous_path(path)
    try:
        return load_checkpoint(path, map_location), path
    except (FileNotFoundError, CheckpointError) as error:
        if not prev.is_file():
            if isinstance(error, FileNotFoundError):
                raise
            raise CheckpointError(
                f"{error}. No previous checkpoint ({prev}) to fall back to: start the run again in a new "
                f"output directory, or move {path} away to start this one from scratch."
            ) from error
        try:
            state = load_checkpoint(prev, map_location)
        except CheckpointError as older:
            raise CheckpointError(
                f"{error}; the previous checkpoint is unreadable too ({older}). Start the run again in a new "
                f"output directory, or move both files away to start this one from scratch."
            ) from older
        warnings.warn(f"{error}; using the previous checkpoint {prev} instead", RuntimeWarning, stacklevel=2)
        return state, prev



def rng_state() -> dict:
    """The states of every generator a training step may draw from, as tensors and plain values
    (numpy's key becomes an int64 tensor) so that a checkpoint loads with ``weights_only=True``."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
