"""What a training step costs: its peak memory and its time per image, each configuration measured
in a fresh process.

A process's peak memory is a high-water mark: once a large step has run, a smaller one measured in
the same process would report the large one's peak. :func:`measure_step` therefore starts a new
Python process for every configuration; the process trains the recipe for a few steps through
:class:`hapkit.training.engine.Trainer` and reports

- on a CPU, the peak resident set size (Linux ``VmHWM``: interpreter, torch, model, data, step);
- on CUDA, ``torch.cuda.max_memory_allocated`` (the tensors, not the caching allocator's reserve);

and, with the same measure, the memory already in use when the first step starts, so that the
step's own share is ``peak_mb - before_mb``. The images are random pixels at the recipe's training
crop size, generated per index (memory does not depend on what the pixels show, and no dataset has
to be prepared), in classes of ``data.samples_per_class`` images drawn by the m-per-class sampler.

:func:`multistage_gradient_difference` checks, on one small batch, that the multi-stage step
(``train.sub_batch``) computes the gradient of the plain one.

>>> fp = measure_step("listwise_ap_generated_large", batch_size=256, sub_batch=64)   # doctest: +SKIP
>>> fp.peak_mb, fp.ms_per_image                                                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from hapkit.errors import HapkitError

__all__ = [
    "StepFootprint",
    "FootprintError",
    "measure_step",
    "measure_steps",
    "multistage_gradient_difference",
    "footprint_recipe",
    "SyntheticImages",
]

LEVEL_FACTORS = (1, 4, 16)  # synthetic hierarchy: fine classes, groups of 4, groups of 16


class FootprintError(HapkitError, RuntimeError):
    """The measuring process failed (out of memory, a recipe the synthetic data cannot train...)."""


@dataclasses.dataclass(frozen=True)
class StepFootprint:
    """Peak memory (MB) and time per image (ms) of ``steps`` training steps of one configuration."""

    recipe: str
    batch_size: int
    sub_batch: int | None  # None: the plain step (the network sees the whole batch at once)
    steps: int
    device: str
    peak_mb: float  # peak of the measure over the process (CPU: resident set; CUDA: allocated)
    before_mb: float  # the same measure when the first step starts (CPU: the peak until then)
    ms_per_image: float  # median over the steps after the first (the first allocates); the first if alone

    @property
    def step_mb(self) -> float:
        """What the training steps added to the memory in use before them."""
        return self.peak_mb - self.before_mb

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "step_mb": self.step_mb}


class SyntheticImages(torch.utils.data.Dataset):
    """``n`` random images (3, size, size), the same for an index whatever the order, in classes of
    ``per_class`` consecutive images; labels (n, 3): fine class, groups of 4 and of 16 classes."""

    def __init__(self, n: int, size: int, per_class: int, seed: int = 0):
        fine = np.arange(n) // per_class
        self.labels = np.stack([fine // f for f in LEVEL_FACTORS], axis=1).astype(np.int64)
        self.size, self.seed = int(size), int(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        return torch.rand(3, self.size, self.size, generator=g), torch.from_numpy(self.labels[index].copy())


def footprint_recipe(recipe, batch_size: int, sub_batch: int | None, device: str = "cpu", overrides: Sequence[str] = ()):
    """The recipe as :func:`measure_step` trains it: ``batch_size`` images per step drawn by the
    m-per-class sampler from the synthetic set, ``sub_batch`` images per network pass, no evaluation,
    on ``device``. Raises ``ConfigError`` for a recipe or an override that does not exist."""
    from hapkit.training.config import Recipe, apply_overrides
    from hapkit.training.recipes import load_recipe

    settings = [
        *overrides, f"data.batch_size={batch_size}", "data.sampler=m_per_class", "data.m_per_class_fill=packed",
        "data.num_workers=0", "train.epochs=1", f"train.device={device}", "train.log_every=1",
        "train.checkpoint_every=0", "eval.every=0", "eval.at_end=false",
        f"train.sub_batch={sub_batch if sub_batch else 'null'}",
    ]
    if isinstance(recipe, Recipe):
        return apply_overrides(recipe, settings)
    return load_recipe(str(recipe), overrides=settings)


def _synthetic_set(cfg, steps: int) -> SyntheticImages:
    return SyntheticImages(steps * cfg.data.batch_size, cfg.data.train_transform.crop, cfg.data.samples_per_class,
                           seed=cfg.seed)


def _check_arguments(batch_size, sub_batch, steps, device) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 (a ranking needs two images), got {batch_size!r}")
    if sub_batch is not None and (not isinstance(sub_batch, (int, np.integer)) or not 1 <= sub_batch <= batch_size):
        raise ValueError(
            f"sub_batch must be None (the plain step) or an integer between 1 and batch_size={batch_size}, "
            f"got {sub_batch!r}"
        )
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device here; measure on device='cpu'")


def measure_step(
    recipe="listwise_ap_generated_large",
    batch_size: int = 256,
    sub_batch: int | None = None,
    steps: int = 2,
    overrides: Sequence[str] = (),
    device: str = "cpu",
    threads: int | None = None,
    timeout: float | None = None,
) -> StepFootprint:
    """Train ``steps`` steps of ``recipe`` at ``batch_size`` (multi-stage with ``sub_batch`` images
    per network pass; None = plain) in a fresh process and return its :class:`StepFootprint`.

    Args:
        recipe: a bundled recipe name, a YAML path or a Recipe.
        overrides: recipe changes (``"model.width=16"``, ``"data.samples_per_class=16"``: the
            images per class, which must divide ``batch_size``).
        device: ``cpu`` or ``cuda[:N]``.
        threads: torch threads of the measuring process (default: torch's).
        timeout: seconds before the process is stopped (FootprintError).

    Raises ValueError for bad arguments, ``ConfigError`` for a recipe that cannot make such
    batches (both before any process starts), :class:`FootprintError` when the measuring process
    fails (out of memory, for instance).
    """
    from hapkit.training.config import to_dict
    from hapkit.training.engine import build_sampler

    _check_arguments(batch_size, sub_batch, steps, device)
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    cfg = footprint_recipe(recipe, int(batch_size), sub_batch, device, overrides)
    build_sampler(cfg, _synthetic_set(cfg, int(steps)).labels)  # a batch the sampler cannot make fails here
    job = {"recipe": to_dict(cfg), "steps": int(steps), "threads": threads}
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very hapkit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "hapkit.training.footprint"], input=json.dumps(job),
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise FootprintError(f"batch {batch_size}, sub_batch {sub_batch}: no result within {timeout} s") from e
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        how = "killed (out of memory?)" if proc.returncode < 0 else f"exit status {proc.returncode}"
        raise FootprintError(f"batch {batch_size}, sub_batch {sub_batch}: the measuring process failed, {how}: {tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return StepFootprint(recipe=cfg.name, batch_size=int(batch_size), sub_batch=sub_batch, steps=int(steps),
                         device=str(device), **out)


def measure_steps(
    configs: Iterable[tuple[int, int | None]],
    recipe="listwise_ap_generated_large",
    steps: int = 2,
    errors: str = "raise",
    progress: bool = True,
    **options,
) -> pd.DataFrame:
    """:func:`measure_step` for each ``(batch_size, sub_batch)``, one row each (``batch_size``,
    ``sub_batch``, ``peak_mb``, ``before_mb``, ``step_mb``, ``ms_per_image``, ``note``).

    ``errors="record"`` turns a failed measurement into a row of missing values whose ``note`` says
    why (``"raise"``: the error propagates). ``options`` go to :func:`measure_step`.
    """
    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    rows = []
    configs = list(configs)
    for batch_size, sub_batch in tqdm(configs, desc="footprint", unit="config", disable=not progress):
        try:
            fp = measure_step(recipe, batch_size, sub_batch, steps, **options)
            rows.append({**fp.as_dict(), "note": ""})
        except FootprintError as e:
            if errors == "raise":
                raise
            rows.append({"batch_size": batch_size, "sub_batch": sub_batch, "peak_mb": np.nan, "before_mb": np.nan,
                         "step_mb": np.nan, "ms_per_image": np.nan, "note": f"failed: {e}"})
    columns = ["batch_size", "sub_batch", "peak_mb", "before_mb", "step_mb", "ms_per_image", "note"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["sub_batch"] = frame["sub_batch"].astype("Int64")  # None stays missing: the plain step
    return frame


def multistage_gradient_difference(
    recipe="listwise_ap_generated_large",
    batch_size: int = 64,
    sub_batch: int = 16,
    overrides: Sequence[str] = (),
) -> dict:
    """Parameter gradients of one batch, plain and multi-stage, compared (in this process).

    The recipe's network at its initialisation (model and loss seeded by the recipe) in training
    mode, one batch of :class:`SyntheticImages`; the plain gradient comes from one backward pass
    through the whole batch, the multi-stage one from
    :func:`hapkit.losses.listwise_ap.multistage_backward` with ``sub_batch`` images per pass, both
    from the same weights and batch-norm statistics. Returns ``max_abs_difference`` (over every
    parameter of the network and the loss), ``max_abs_gradient`` (its scale) and both loss values.
    With batch-norm in training mode each sub-batch is normalised by its own statistics, so the
    two differ unless the recipe freezes batch-norm (``model.freeze_batchnorm=true``).
    """
    from hapkit.losses.listwise_ap import multistage_backward
    from hapkit.training.checkpoint import rng_state, seed_everything, set_rng_state
    from hapkit.training.engine import build_loss
    from hapkit.training.models import build_model

    _check_arguments(batch_size, sub_batch, 1, "cpu")
    if sub_batch is None:
        raise ValueError("sub_batch must be an integer: the multi-stage step is what is compared")
    cfg = footprint_recipe(recipe, int(batch_size), sub_batch, "cpu", overrides)
    data = _synthetic_set(cfg, 1)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.from_numpy(data.labels)
    saved = rng_state()
    try:
        seed_everything(cfg.seed)
        model = build_model(cfg.model).train()
        loss_fn = build_loss(cfg, data.labels, embedding_size=model.embedding_size).train()
        params = [*model.parameters(), *loss_fn.parameters()]
        start = {k: v.clone() for k, v in model.state_dict().items()}

        def gradients(backward) -> tuple[list[torch.Tensor], float]:
            model.load_state_dict(start)  # the same batch-norm statistics for both
            for p in params:
                p.grad = None
            value = float(backward())
            return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params], value

        def plain():
            loss = loss_fn(model(images).float(), labels)
            loss.backward()
            return loss.detach()

        plain_grads, plain_loss = gradients(plain)
        staged_grads, staged_loss = gradients(
            lambda: multistage_backward(model, images, labels, loss_fn, int(sub_batch)))
    finally:
        set_rng_state(saved)
    return {
        "max_abs_difference": max(float((a - b).abs().max()) for a, b in zip(plain_grads, staged_grads)),
        "max_abs_gradient": max(float(a.abs().max()) for a in plain_grads),
        "loss_plain": plain_loss,
        "loss_multistage": staged_loss,
    }


# ------------------------------------------------------------------------- measuring process


def _peak_resident_mb() -> float:
    """Peak resident set of this process's own memory since it started (Linux: VmHWM).

    Not ``ru_maxrss``: Linux carries that high-water mark over ``fork`` and ``exec``, so a child
    started from a large process (a notebook kernel) would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def _memory_mb(device: torch.device, peak: bool) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**20
    return _peak_resident_mb()


def _run_job(job: dict) -> dict:
    """Train the job's steps in this process; the measures as a dict (the child's side)."""
    import tempfile

    from hapkit.training.config import Recipe, from_dict
    from hapkit.training.engine import Callback, Trainer

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    cfg = from_dict(Recipe, job["recipe"])
    steps = int(job["steps"])

    class Meter(Callback):
        """Times each step and reads the peak after the last one (before any checkpoint is written)."""

        def __init__(self):
            self.marks, self.peak_mb = [], None

        def on_step_end(self, trainer):
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            self.marks.append(time.perf_counter())
            if len(self.marks) == steps:
                self.peak_mb = _memory_mb(trainer.device, peak=True)

    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out_dir=out, train_set=_synthetic_set(cfg, steps), progress=False, callbacks=[meter],
                          stop_after_steps=steps)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
            torch.cuda.reset_peak_memory_stats(trainer.device)
        before = _memory_mb(trainer.device, peak=False)
        start = time.perf_counter()
        trainer.fit()
    if len(meter.marks) < steps:
        raise RuntimeError(f"only {len(meter.marks)} of {steps} steps ran")
    durations = np.diff([start, *meter.marks])
    timed = durations[1:] if steps > 1 else durations
    return {"peak_mb": float(meter.peak_mb), "before_mb": float(before),
            "ms_per_image": 1000 * float(np.median(timed)) / cfg.data.batch_size}


if __name__ == "__main__":
    print(json.dumps(_run_job(json.loads(sys.stdin.read()))))
