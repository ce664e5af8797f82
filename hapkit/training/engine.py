"""The training loop: one recipe in, a trained model, a checkpoint and metrics.jsonl out.

The loop is written for a GPU and runs the same on a CPU:

- mixed precision with ``torch.autocast`` (bfloat16, or float16 with a gradient scaler),
  channels-last images on CUDA, pinned memory and persistent loader workers;
- few host synchronisations per step: the loss is summed on the device and read once per
  ``train.log_every`` steps, when the finiteness guard also looks at it; the loss checks its
  labels and positives at its first call only (the sampler validated the training labels; see
  ``HapkitLoss.check_labels``); a rank loss reads the sizes of its smoothed-rank blocks once per
  call (one synchronisation: they shape its index tensors); with float16, torch's gradient
  scaler reads its overflow flag once per optimiser; resumed optimisers keep their step counters
  on the host, where torch's Adam reads them. ``benchmarks/gpu_check.py`` counts them on a GPU;
- one optimiser and per-epoch schedule per parameter group (backbone, head, loss parameters),
  warm-up epochs with the backbone frozen, optional gradient clipping;
- evaluation every ``eval.every`` epochs with :mod:`hapkit.evaluate` on the dataset's eval sets;
  one JSON line per epoch in ``<run>/metrics.jsonl``;
- atomic checkpoints holding everything needed to resume mid-epoch bit for bit on a CPU: model,
  optimisers, schedulers, gradient scaler, sampler position, random generator states;
- several processes with ``torchrun``: DistributedDataParallel, the sampler's global batch split
  between processes and embeddings all-gathered with gradient (see :mod:`hapkit.training.distributed`),
  so the rank losses see the global batch; every process embeds its share of the eval sets and
  they rank together (``hapkit.evaluate.evaluate(distributed=True)``); logging happens on rank 0.

>>> from hapkit.training.recipes import load_recipe
>>> from hapkit.training.engine import train
>>> result = train(load_recipe("happier_generated"), out_dir="runs/happier")   # doctest: +SKIP
>>> result.history[["epoch", "loss", "test/H-AP"]]                              # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from hapkit.data import build_eval_sets, build_train_set, spread_subset
from hapkit.errors import NonFiniteError
from hapkit.losses.base import HapkitLoss
from hapkit.training.checkpoint import (
    CHECKPOINT_NAME,
    load_verified,
    previous_path,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
)
from hapkit.training.config import ConfigError, Recipe, to_dict
from hapkit.training.distributed import (
    DistContext,
    all_gather_nograd,
    all_reduce_mean,
    barrier,
    contiguous_share,
    gather_with_grad,
    init_distributed,
)
from hapkit.training.config import network_groups
from hapkit.training.loading import make_train_loader
from hapkit.training.memory import TrainingMemory
from hapkit.training.models import build_model
from hapkit.training.rundir import (
    CONFIG_NAME,
    METRICS_NAME,
    claim_run_dir,
    new_invocation,
    read_invocation,
    write_invocation,
)
from hapkit.training.optim import build_optimizers
from hapkit.training.whitening import PCAWhitening, ensure_whitening, remove_whitening

__all__ = [
    "Trainer",
    "TrainResult",
    "Callback",
    "NonFiniteError",
    "train",
    "build_loss",
    "build_sampler",
    "evaluate_model",
    "resolve_amp",
    "read_history",
    "loss_names",
    "CHECKPOINT_NAME",
]

# Recipe keys that may differ between a checkpoint and the recipe that resumes it.
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.checkpoint_every", "train.device",
                     "data.num_workers", "data.root", "data.eval_batch_size", "eval.")


class Callback:
    """Hooks called by :class:`Trainer`; override the ones you need (all are no-ops here)."""

    def on_step_end(self, trainer: "Trainer") -> None:
        """After each optimiser step; ``trainer.global_step`` counts completed steps."""

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        """After each epoch, with the record written to metrics.jsonl."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    history: pd.DataFrame  # one row per epoch (loss, learning rates, timing, eval metrics)
    metrics: dict  # final evaluation, flat "<eval set>/<metric>" keys
    checkpoint: Path
    interrupted: bool = False
    global_step: int = 0


# --------------------------------------------------------------------------------- helpers


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a recipe's ``train.amp`` on ``device`` (None = full precision)."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type != "cuda":
            return None  # CPU autocast is slower than float32 for these models
        return torch.bfloat16 if _native_bf16() else torch.float16
    raise ConfigError(f"train.amp must be auto, bf16, fp16 or none, got {amp!r}")


def _native_bf16() -> bool:
    """Whether the GPU computes bf16 natively: recent torch also reports emulated bf16 (much
    slower than float16) as supported unless asked not to."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the keyword reports native support only
        return torch.cuda.is_bf16_supported()


def loss_names() -> list[str]:
    """The loss classes of :mod:`hapkit.losses` a recipe's ``loss.name`` can name."""
    import hapkit.losses as losses

    return [n for n in losses.__all__ if isinstance(getattr(losses, n), type)
            and issubclass(getattr(losses, n), HapkitLoss) and getattr(losses, n) is not HapkitLoss]


def build_loss(cfg: Recipe, train_labels: np.ndarray, seed: int | None = None,
               embedding_size: int | None = None) -> HapkitLoss:
    """The recipe's loss. What comes from the training data (class counts, embedding size,
    hierarchy, seed) is filled by the loss class itself (:meth:`HapkitLoss.training_kwargs`) when
    the recipe leaves it out; ``embedding_size`` is the built model's (default
    ``model.embedding_size``).

    ``cfg.loss.name`` is a loss class of :mod:`hapkit.losses` (HAPPIER, ROADMAP, SupAP, SmoothAP,
    ListwiseAP, SupRecall, SupNDCG, HierarchicalProxyLoss, CSLLoss, ...).
    """
    import hapkit.losses as losses

    name = cfg.loss.name
    names = loss_names()
    if name not in names:
        raise ConfigError(f"loss.name={name!r} is not a hapkit loss; choose one of {', '.join(names)}")
    cls = getattr(losses, name)
    params = inspect.signature(cls.__init__).parameters
    takes_var = any(p.kind is p.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p not in ("self",) and params[p].kind not in (params[p].VAR_POSITIONAL, params[p].VAR_KEYWORD)]
    unknown = [k for k in cfg.loss.kwargs if k not in params]
    if unknown and not takes_var:
        raise ConfigError(
            f"loss.kwargs: {name} has no argument {', '.join(map(repr, unknown))}; its arguments are {', '.join(valid)}"
        )
    kwargs = cls.training_kwargs(dict(cfg.loss.kwargs), np.asarray(train_labels),
                                 cfg.model.embedding_size if embedding_size is None else embedding_size,
                                 cfg.seed if seed is None else seed)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"loss {name}: {e}; its arguments are {', '.join(valid)}") from e


def build_sampler(cfg: Recipe, labels: np.ndarray, rank: int = 0, world_size: int = 1):
    """The recipe's batch sampler over the training labels (hapkit.data samplers); with several
    processes, each takes its slice of every global batch. A sampler the training set cannot
    serve (too few fine classes in a super-class, too few classes) is a :class:`ConfigError`
    raised before any training, saying which recipe values to change."""
    from hapkit.data import HierarchicalBatchSampler, MPerClassBatchSampler

    d = cfg.data
    try:
        if d.sampler == "hierarchical":
            if labels.shape[1] < 2:
                raise ConfigError("data.sampler=hierarchical needs at least two label levels; use m_per_class")
            return HierarchicalBatchSampler(
                labels,
                batch_size=d.batch_size,
                samples_per_class=d.samples_per_class,
                super_classes_per_batch=d.super_classes_per_batch,
                batches_per_super_tuple=d.batches_per_super_tuple,
                seed=cfg.seed,
                column=d.sampler_column,
                num_replicas=world_size,
                rank=rank,
            )
        if d.sampler == "m_per_class":
            # the reference samplers skip the classes with fewer than m images: say how many
            sampler = MPerClassBatchSampler(
                labels, batch_size=d.batch_size, m=d.samples_per_class, seed=cfg.seed, drop_small_classes=True,
                fill=d.m_per_class_fill, max_per_class=d.max_per_class, num_replicas=world_size, rank=rank,
            )
            if sampler.dropped_classes:
                warnings.warn(
                    f"m_per_class sampler: {sampler.dropped_classes} training class(es) have fewer than "
                    f"{d.samples_per_class} images and are never sampled (as in the reference samplers)",
                    RuntimeWarning, stacklevel=2,
                )
            return sampler
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"recipe {cfg.name}: data.sampler={d.sampler} cannot make batches from this training set of "
            f"{d.dataset}: {e}. Change the recipe's data.batch_size, data.samples_per_class or "
            f"data.super_classes_per_batch (--set data.batch_size=...), or use data.sampler=m_per_class."
        ) from e
    raise ConfigError(f"data.sampler must be hierarchical or m_per_class, got {d.sampler!r}")


def parameter_groups(cfg: Recipe, model: nn.Module, loss_fn: nn.Module) -> dict[str, list]:
    """The recipe's parameter groups: ``backbone`` and ``head`` (or ``net``, the whole network,
    with ``optim.network: single``) and the loss's own group when it has learnable parameters."""
    if network_groups(cfg.optim) == ("net",):
        groups = {"net": list(model.parameters())}
    else:
        groups = {"backbone": list(model.backbone_parameters()), "head": list(model.head_parameters())}
    groups[loss_fn.parameter_group] = list(loss_fn.parameters())
    return groups


def _dataset_labels(dataset) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise TypeError("the training dataset must expose .labels, an (N, L) integer array finest first")
    labels = np.asarray(labels)
    return labels[:, None] if labels.ndim == 1 else labels


def evaluate_model(
    model: nn.Module,
    eval_sets: Iterable,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    amp: bool = True,
    metrics=None,
    max_items: int | None = None,
    progress: bool = True,
    columns=None,
    ks=(1, 4, 16),
    overall: bool = False,
    distributed: bool = False,
    scales=None,
    scale_power: float = 3.0,
    query_expansion=None,
) -> dict:
    """Embed each eval set with ``model`` and evaluate it; returns flat ``{"<set>/<metric>": value}``.

    An eval set has ``name``, ``query``, ``gallery`` (None = same-set protocol) and
    ``label_column`` (None = the label columns ``columns``, default all) like
    :class:`hapkit.data.EvalSet`; when its gallery holds the queries (DyML), each query's own copy
    is left out of its ranking. With several sets (DyML's per-level benchmarks) an
    ``overall/<metric>`` mean over the sets is added; with one set and ``overall``, the mean of
    each binary metric over the evaluated columns (``overall/AP``, ``overall/R@10``, ...), as the
    official ``overall_accuracy`` hooks do.

    ``distributed``: every process of the initialised process group calls this; each embeds its
    contiguous share of every set and :func:`hapkit.evaluate.evaluate` ranks them together
    (``distributed=True``), so every process returns the same metrics.

    A landmark benchmark (an eval set with a ground truth ``gnd``) is scored with the revisited
    protocol by :func:`hapkit.training.landmarks.evaluate_landmark_set` (``<set>/mAP@medium``,
    ``<set>/mP@5@hard``, ...; ``ks`` are the k of mP@k), embedded at ``scales`` (None: one scale,
    combined with the power mean of ``scale_power``) with alpha-query expansion
    ``query_expansion`` = (k, alpha) when given; with ``distributed`` every process embeds its
    share of its queries, gallery and distractors and scores the gathered embeddings, and
    ``max_items`` does not apply (the ground truth indexes the whole gallery).
    """
    from hapkit.evaluate import evaluate, extract_embeddings

    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    def share(n: int) -> tuple[int, int]:
        return n * rank // world, n * (rank + 1) // world

    def embed(ds):
        # an empty share still embeds one item, for the label levels the collectives compare
        ds, empty = contiguous_share(spread_subset(ds, max_items), rank, world)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            pin_memory=torch.device(device or "cpu").type == "cuda",
        )
        emb, lab = extract_embeddings(model, loader, device=device, amp=amp, progress=progress and rank == 0)
        return (emb[:0], lab[:0]) if empty else (emb, lab)

    out: dict = {}
    per_set = []
    for es in eval_sets:
        if getattr(es, "gnd", None) is not None:
            from hapkit.training.landmarks import evaluate_landmark_set

            res = evaluate_landmark_set(model, es, batch_size=batch_size, device=device, scales=scales,
                                        power=scale_power, query_expansion=query_expansion, ks=ks,
                                        progress=progress and rank == 0, amp=amp, num_workers=num_workers,
                                        distributed=distributed)
            summary = {k: float(v) for k, v in res.summary.items()}
            per_set.append(summary)
            out.update({f"{es.name}/{k}": v for k, v in summary.items()})
            continue
        q_emb, q_lab = embed(es.query)
        g_emb = g_lab = None
        options = {}
        if getattr(es, "gallery", None) is not None:
            g_emb, g_lab = embed(es.gallery)
            own = es.gallery_exclude() if hasattr(es, "gallery_exclude") else None
            if own is not None:
                exclude = _subset_exclusion(own, len(es.query), len(es.gallery), max_items)
                lo, hi = share(len(exclude))  # the copies of this process's own queries
                options["gallery_exclude"] = exclude[lo:hi]
        column = getattr(es, "label_column", None)
        res = evaluate(
            q_emb, q_lab, gallery_embeddings=g_emb, gallery_labels=g_lab, metrics=metrics,
            columns=columns if column is None else [column], ks=ks, device=device, progress=progress and rank == 0,
            distributed=distributed, **options,
        )
        summary = {k: float(v) for k, v in res.summary.items()}
        per_set.append(summary)
        out.update({f"{es.name}/{k}": v for k, v in summary.items()})
    if len(per_set) > 1:
        common = set.intersection(*(set(s) for s in per_set))
        for k in sorted(common):
            out[f"overall/{k}"] = float(np.mean([s[k] for s in per_set]))
    elif overall and per_set:
        out.update({f"overall/{k}": v for k, v in column_means(per_set[0]).items()})
    return out


def column_means(summary: dict) -> dict:
    """Mean of each binary metric over the label columns it was computed at: ``AP@0``, ``AP@1``
    -> ``AP``; ``R@10@0``, ``R@10@1`` -> ``R@10`` (graded metrics such as H-AP are left out)."""
    groups: dict[str, list[float]] = {}
    for name, value in summary.items():
        head, sep, col = name.rpartition("@")
        if sep and col.isdigit() and head:
            groups.setdefault(head, []).append(value)
    return {head: float(np.mean(values)) for head, values in groups.items() if len(values) > 1}


def _subset_exclusion(own: np.ndarray, n_query: int, n_gallery: int, max_items) -> np.ndarray:
    """The own-copy indices of the evenly spread query / gallery subsets that are evaluated."""
    from hapkit.data import spread_indices

    q_idx, g_idx = spread_indices(n_query, max_items), spread_indices(n_gallery, max_items)
    position = np.full(n_gallery, -1, dtype=np.int64)
    position[g_idx] = np.arange(len(g_idx))
    picked = own[q_idx]
    return np.where(picked >= 0, position[np.clip(picked, 0, None)], -1)


def read_history(run_dir) -> pd.DataFrame:
    """The per-epoch records of a run's metrics.jsonl as a DataFrame (empty if none yet)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return pd.DataFrame()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        path = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict) and not path.endswith("kwargs"):
            keys += _flat_diff(va, vb, path + ".")
        elif va != vb:
            keys.append(path)
    return keys


# ---------------------------------------------------------------------------------- trainer


class Trainer:
    """Trains the model of a recipe; see the module docstring for what it does.

    Parameters
    ----------
    cfg : the recipe (:func:`hapkit.training.recipes.load_recipe`).
    out_dir : run directory (checkpoint.pt, metrics.jsonl, config.yaml); default
        ``runs/<recipe name>-seed<seed>``.
    data_root : overrides ``cfg.data.root``.
    train_set, eval_sets : datasets to use instead of ``hapkit.data.get_dataset`` /
        ``get_eval_sets`` (the training set needs ``.labels``; eval sets are EvalSet-like).
    progress : show tqdm progress bars.
    callbacks : :class:`Callback` instances.
    stop_after_steps : checkpoint and stop after this many optimiser steps in total (to split a
        long run into jobs, or to test resumption).
    invocation : what the caller was asked (the command line's recipe, dataset and overrides),
        recorded in ``run.json`` with the seed, data root, device and versions.
    """

    def __init__(
        self,
        cfg: Recipe,
        out_dir=None,
        data_root=None,
        train_set=None,
        eval_sets=None,
        progress: bool = True,
        callbacks: Iterable[Callback] = (),
        stop_after_steps: int | None = None,
        invocation: dict | None = None,
    ):
        if data_root is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
        self.cfg = cfg
        self.progress = progress
        self.callbacks = list(callbacks)
        self.stop_after_steps = stop_after_steps
        self.invocation = invocation
        self.resumed_changes: dict[str, tuple] = {}  # recipe key -> (checkpoint's value, this run's)
        self._stop_requested = False
        self.dist: DistContext = init_distributed(cfg.train.device)
        self.device = self.dist.device
        self.run_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"{cfg.name}-seed{cfg.seed}"
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.amp_dtype = resolve_amp(cfg.train.amp, self.device)
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda"

        seed_everything(cfg.seed)
        self.train_set = train_set if train_set is not None else self._default_train_set()
        self.train_labels = _dataset_labels(self.train_set)
        self._eval_sets = eval_sets

        self.model = build_model(cfg.model)
        if self.dist.enabled and self.device.type == "cuda" and not cfg.model.freeze_batchnorm:
            # batch statistics over the global batch, as in a single-process run
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg, self.train_labels, embedding_size=self.model.embedding_size).to(self.device)
        self.loss_fn.check_finite = False  # _track_finite reports NaN without a host sync per step
        # the training labels were validated with the dataset: only the loss's first call checks them
        self.loss_fn.check_labels = False
        self.memory = TrainingMemory.from_recipe(cfg.train.memory, self.loss_fn, self.model.embedding_size,
                                                 self.train_labels.shape[1], cfg.data.batch_size, self.device)

        self.group_params = parameter_groups(cfg, self.model, self.loss_fn)
        self.optimizers, self.schedulers = build_optimizers(cfg.optim, self.group_params, cfg.train.epochs)
        unknown = [g for g in cfg.train.warmup_frozen if g not in self.group_params] if cfg.train.warmup_epochs else []
        if unknown:
            raise ConfigError(
                f"train.warmup_frozen names {unknown}, not parameter groups of this recipe "
                f"({', '.join(self.group_params)})"
            )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._params = [p for p in self.model.parameters()] + [p for p in self.loss_fn.parameters()]

        self.sampler = build_sampler(cfg, self.train_labels, self.dist.rank, self.dist.world_size)
        pin = self.device.type == "cuda"
        self.loader = make_train_loader(
            self.train_set, self.sampler, cfg.seed, num_workers=cfg.data.num_workers, pin_memory=pin,
        )

        self.epoch = 0  # epoch in progress (0-based)
        self.batch_in_epoch = 0  # batches of that epoch already done
        self.global_step = 0
        self.history: list[dict] = []
        self._epoch_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self._epoch_steps = 0
        self._bad_step = torch.full((), -1, device=self.device, dtype=torch.long)
        self._bad_kind = torch.zeros((), device=self.device, dtype=torch.long)
        self._ddp = None
        self._ddp_frozen = None
        self._probe_unused = False
        self._control_group = None

    # ------------------------------------------------------------------------------ data

    def _default_train_set(self):
        return build_train_set(self.cfg.data)

    @property
    def eval_sets(self) -> list:
        if self._eval_sets is None:
            self._eval_sets = build_eval_sets(self.cfg.data)
        return self._eval_sets

    # ----------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def state_dict(self) -> dict:
        rng = rng_state()
        if self.dist.enabled:
            per_rank = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, rng)
            rng = per_rank
        else:
            rng = [rng]
        return {
            "format": 1,
            "recipe": to_dict(self.cfg),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            # the sampler is a function of (seed, epoch): its position is all there is to save
            "sampler": {"epoch": self.epoch, "start_batch": self.batch_in_epoch, "seed": self.sampler.seed},
            "epoch_loss": self._epoch_loss.cpu(),
            "epoch_steps": self._epoch_steps,
            "history": list(self.history),
            "rng": rng,
            "world_size": self.dist.world_size,
            "memory": None if self.memory is None else self.memory.state_dict(),
            "finished": self.epoch >= self.cfg.train.epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        now = to_dict(self.cfg)
        diff = _flat_diff(state["recipe"], now)
        blocking = [k for k in diff if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]
        if blocking:
            shown = ", ".join(f"{k} {_lookup(state['recipe'], k)!r} -> {_lookup(now, k)!r}" for k in blocking)
            raise ConfigError(
                f"cannot resume the run in {self.run_dir} with a different recipe ({shown}); only "
                f"{', '.join(r.rstrip('.') for r in RESUMABLE_CHANGES)} may change on resume. "
                f"Drop those settings, or train into another --out."
            )
        if self.cfg.train.epochs < state["epoch"]:
            raise ConfigError(
                f"cannot resume the run in {self.run_dir} with train.epochs={self.cfg.train.epochs}: it has "
                f"already trained {state['epoch']} epochs; ask for {state['epoch']} or more"
            )
        self.resumed_changes = {k: (_lookup(state["recipe"], k), _lookup(now, k)) for k in diff}
        ensure_whitening(self.model, state["model"])
        self.model.load_state_dict(state["model"])
        if state["epoch"] < self.cfg.train.epochs and isinstance(self.model.whitening, PCAWhitening):
            remove_whitening(self.model)  # training goes on (more epochs): learned again at the end
        self.loss_fn.load_state_dict(state["loss"])
        from hapkit.training.optim import steps_on_host

        for k, o in self.optimizers.items():
            o.load_state_dict(steps_on_host(state["optimizers"][k]))
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self._epoch_loss = state["epoch_loss"].to(self.device)
        self._epoch_steps = state["epoch_steps"]
        self.history = list(state["history"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:
            warnings.warn(
                f"resuming a {len(rng)}-process run with {self.dist.world_size} process(es): "
                f"data order is preserved, other random draws are not", RuntimeWarning,
            )
            set_rng_state(rng[0])

    def save_checkpoint(self) -> Path:
        state = self.state_dict()  # collective with several processes: every rank builds it
        if self.dist.is_main:
            save_atomic(state, self.checkpoint_path, keep_previous=True)
        barrier(self.dist)
        return self.checkpoint_path

    def _trim_metrics_log(self) -> None:
        """Drop records written after the checkpoint a run resumes from."""
        path = self.run_dir / METRICS_NAME
        if not (self.dist.is_main and path.is_file()):
            return
        keep = [json.dumps(r) for r in self.history]
        path.write_text("".join(line + "\n" for line in keep))

    # ----------------------------------------------------------------------------- train

    def request_stop(self) -> None:
        """Checkpoint and stop after the current step (e.g. from a SIGTERM handler); with several
        processes, all stop after the step in which any of them asked."""
        self._stop_requested = True

    def _should_stop(self) -> bool:
        """Whether to checkpoint and stop now: the same answer on every process."""
        if self.dist.enabled:
            # a signal reaches the processes at different steps: agree on it, over a gloo group so
            # that reading the flag never waits for the GPU
            if self._control_group is None:
                self._control_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            flag = torch.tensor([int(self._stop_requested)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control_group)
            self._stop_requested = bool(flag.item())
        return (self.stop_after_steps is not None and self.global_step >= self.stop_after_steps) or self._stop_requested

    def _set_warmup(self, frozen: bool) -> None:
        # a group frozen for warm-up computes no gradient at all (the official loops compute its
        # gradient and do not step its optimiser: the parameters move the same way)
        for group in self.cfg.train.warmup_frozen:
            for p in self.group_params.get(group, ()):
                p.requires_grad_(not frozen)
        if self.dist.enabled and self._ddp_frozen != frozen:
            # DDP registers the parameters that require grad when it is built: rebuild per phase.
            # Whether some get no gradient (a timm head norm after avg pooling) is only known after a
            # backward pass: the first step of a phase looks for them, and DDP is built again
            # without the per-step graph search when there are none
            self._build_ddp(find_unused=True)
            self._probe_unused = True
            self._ddp_frozen = frozen

    def _build_ddp(self, find_unused: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = None  # the previous wrapper's hooks go before the new one registers its own
        self._ddp = DDP(self.model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused)

    def _settle_unused_parameters(self) -> None:
        """After the first backward pass of a phase: keep DDP's search for unused parameters only
        if some parameter got no gradient (DDP leaves a gradient of None only on a parameter that
        no process used, so every process decides alike)."""
        self._probe_unused = False
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if not unused:
            self._build_ddp(find_unused=False)

    def _average_batchnorm_buffers(self) -> None:
        # Without SyncBatchNorm (CUDA only) each process updates its running statistics from its own
        # slice: their mean over processes keeps one set, the one evaluation embeds every share
        # with and the checkpoint saves; equal slices make the running mean the global batch's
        buffers = [b for m in self.model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                   and m.training and m.track_running_stats
                   for b in (m.running_mean, m.running_var) if b is not None]
        if not buffers:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = _flatten_dense_tensors(buffers)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.dist.world_size)
        with torch.no_grad():
            for b, avg in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
                b.copy_(avg)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self._ddp if self._ddp is not None else self.model
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                return net(images)
        return net(images)

    def compute_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, embeddings) for this process's slice of the batch, the global batch as reference."""
        emb = self._forward(images).float()
        return self.loss_from_embeddings(emb, labels), emb

    def loss_from_embeddings(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of this process's embeddings, ranked against the global batch when the loss
        takes a reference set (gathered with gradient across processes)."""
        if self.dist.enabled and self.loss_fn.takes_reference_set:
            ref = gather_with_grad(emb)
            ref_labels = all_gather_nograd(labels)
            # this process's queries sit in the gathered batch at its slot: the loss must know
            # them to leave each out of its own ranking (exclude_self), as in one process
            loss = self.loss_fn(emb, labels, ref_emb=ref, ref_labels=ref_labels,
                                query_offset=self.dist.rank * emb.shape[0])
        else:
            ref, ref_labels = emb, labels
            loss = self.loss_fn(emb, labels)
        if self.memory is not None:  # the global batch enters the memory, this process's queries rank against it
            loss = self.memory.combine(loss, emb, labels, ref, ref_labels, self.epoch)
        return loss

    def _backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one batch; (loss, embeddings), both detached. With
        ``train.sub_batch`` the network runs on ``sub_batch`` images at a time (multi-stage
        backpropagation) and the loss still sees the whole batch."""
        sub = self.cfg.train.sub_batch
        if not sub or sub >= images.shape[0]:
            loss, emb = self.compute_loss(images, labels)
            self.scaler.scale(loss).backward()
            return loss.detach(), emb.detach()
        from hapkit.losses.listwise_ap import multistage_backward

        net = self._ddp if self._ddp is not None else self.model
        box = {}

        def loss_fn(embeddings, labels):
            box["emb"] = embeddings.detach()
            return self.loss_from_embeddings(embeddings, labels)

        loss = multistage_backward(
            net, images, labels, loss_fn, sub, scaler=self.scaler, forward=lambda x: self._forward(x).float(),
        )
        return loss, box["emb"]

    def _optimizer_step(self, frozen: bool) -> None:
        if self.dist.enabled:
            if self._probe_unused:
                self._settle_unused_parameters()
            self._average_batchnorm_buffers()
            # the loss's own parameters are outside DDP: average their gradients by hand
            for p in self.loss_fn.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    p.grad.div_(self.dist.world_size)
        active = [o for g, o in self.optimizers.items() if not (frozen and g in self.cfg.train.warmup_frozen)]
        if self.cfg.optim.grad_clip:
            for o in active:
                self.scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_([p for p in self._params if p.grad is not None], self.cfg.optim.grad_clip)
        for o in active:
            self.scaler.step(o)
        self.scaler.update()
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)

    def _track_finite(self, loss: torch.Tensor, emb: torch.Tensor) -> None:
        # device-side bookkeeping: remember the first bad step without synchronising
        kind = (~torch.isfinite(emb).all()).long() + 2 * (~torch.isfinite(loss)).long()
        first = (self._bad_step < 0) & (kind > 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, self.global_step), self._bad_step)
        self._bad_kind = torch.where(first, kind, self._bad_kind)

    def _check_finite(self) -> None:
        step, kind = self._bad_step, self._bad_kind
        if self.dist.enabled:
            # one decision for all processes: the first bad step of any, and what went bad; a
            # process raising alone would leave the others waiting in the next collective
            none = torch.iinfo(torch.long).max
            flags = torch.stack([-torch.where(step < 0, torch.full_like(step, none), step), kind & 1, kind >> 1 & 1])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            first, emb_bad, loss_bad = flags.tolist()
            step, kind = (-1 if -first == none else -first), emb_bad + 2 * loss_bad
        step = int(step)
        if step < 0:
            return
        kind = int(kind)
        what = {1: "the embeddings", 2: "the loss", 3: "the embeddings and the loss"}[kind]
        saved = (
            f" The last good checkpoint is {self.checkpoint_path}." if self.checkpoint_path.is_file() else ""
        )
        raise NonFiniteError(
            f"{what} became NaN or infinite at step {step} (epoch {self.epoch + 1}); training stopped."
            f"{saved} Check the input images for NaN, then the usual fixes: lower the learning rate "
            f"(--set optim.lr=...), clip gradients (--set optim.grad_clip=10), or train in full "
            f"precision (--set train.amp=none)."
        )

    def _new_invocation(self) -> dict:
        return new_invocation(to_dict(self.cfg), str(self.device), self.dist.world_size, self.invocation)

    def _lrs(self) -> dict:
        return {f"lr/{g}": o.param_groups[0]["lr"] for g, o in self.optimizers.items()}

    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train to ``cfg.train.epochs``, continuing from the run's checkpoint if ``resume``.

        Without ``resume``, a run directory that already holds a run is refused
        (:class:`hapkit.training.rundir.RunExistsError`) unless ``overwrite``, which moves the old
        run aside (``<dir>.replaced-<date>-<time>``) instead of deleting it."""
        cfg = self.cfg
        if resume and (self.checkpoint_path.is_file() or previous_path(self.checkpoint_path).is_file()):
            state, _ = load_verified(self.checkpoint_path, map_location=self.device)
            self.load_state_dict(state)
            self._trim_metrics_log()
            record = read_invocation(self.run_dir) or self._new_invocation()
            record.setdefault("resumes", []).append({
                "at_step": self.global_step,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "changes": {k: list(v) for k, v in self.resumed_changes.items()},
            })
        else:
            claim_run_dir(self.run_dir, overwrite=overwrite, main_process=self.dist.is_main)
            barrier(self.dist)
            record = self._new_invocation()
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / METRICS_NAME).write_text("")
        if self.dist.is_main:
            import yaml

            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            write_invocation(self.run_dir, record)
        barrier(self.dist)

        self.sampler.set_epoch(self.epoch)
        per_epoch = self.sampler.batches_per_epoch
        if per_epoch == 0:
            raise ConfigError(
                f"the sampler yields no batch for {len(self.train_set)} training images with "
                f"batch_size={cfg.data.batch_size}: lower data.batch_size"
            )
        total = cfg.train.epochs * per_epoch
        bar = tqdm(total=total, initial=min(self.global_step, total), desc="train", unit="step",
                   disable=not (self.progress and self.dist.is_main), dynamic_ncols=True)
        log_every = max(1, cfg.train.log_every)
        try:
            while self.epoch < cfg.train.epochs:
                interrupted = self._run_epoch(bar, per_epoch, log_every)
                if interrupted:
                    if self.batch_in_epoch:  # a finished epoch has just been saved
                        self.save_checkpoint()
                    return self._result(interrupted=True)
        finally:
            bar.close()
        return self._result(interrupted=False)

    def _run_epoch(self, bar, per_epoch: int, log_every: int) -> bool:
        cfg = self.cfg
        frozen = self.epoch < cfg.train.warmup_epochs
        self._set_warmup(frozen)
        self.model.train()
        self.loss_fn.train()
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        bar.set_description(f"epoch {self.epoch + 1}/{cfg.train.epochs}" + (" (warm-up)" if frozen else ""))
        t0 = time.perf_counter()
        n_images = 0
        non_blocking = self.device.type == "cuda"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=non_blocking, memory_format=fmt)
            labels = labels.to(self.device, non_blocking=non_blocking)
            loss, emb = self._backward(images, labels)
            self._optimizer_step(frozen)

            self._track_finite(loss, emb)
            self._epoch_loss += all_reduce_mean(loss.detach()).double()
            self._epoch_steps += 1
            self.batch_in_epoch += 1
            self.global_step += 1
            n_images += images.shape[0] * self.dist.world_size
            bar.update(1)
            if self.global_step % log_every == 0:
                self._check_finite()
                bar.set_postfix(loss=f"{float(self._epoch_loss) / self._epoch_steps:.4f}")
            for cb in self.callbacks:
                cb.on_step_end(self)
            if self._should_stop():
                if self.batch_in_epoch < per_epoch:
                    self._check_finite()
                    return True
                self._finish_epoch(t0, n_images)
                return True
            every = cfg.train.checkpoint_every
            if every and self.global_step % every == 0 and self.batch_in_epoch < per_epoch:
                self._check_finite()
                self.save_checkpoint()
        self._finish_epoch(t0, n_images)
        return False

    def _finish_epoch(self, t0: float, n_images: int) -> None:
        cfg = self.cfg
        self._check_finite()
        elapsed = time.perf_counter() - t0
        steps = max(1, self._epoch_steps)
        record = {
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "loss": float(self._epoch_loss) / steps,
            **self._lrs(),
            "time_s": elapsed,
            "images_per_s": n_images / elapsed if elapsed > 0 else float("nan"),
        }
        if self.epoch + 1 > cfg.train.warmup_epochs or cfg.train.warmup_schedules:
            with warnings.catch_warnings():
                # a group frozen for warm-up has not stepped its optimiser (warmup_schedules=true)
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                for s in self.schedulers.values():
                    s.step()
        last = self.epoch + 1 == cfg.train.epochs
        if last and cfg.train.whitening.learn:
            self.learn_whitening()
        every = cfg.eval.every
        if (every and (self.epoch + 1) % every == 0) or (last and cfg.eval.at_end):
            record.update(self.evaluate())
        self.history.append(record)
        if self.dist.is_main:
            with open(self.run_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        self.epoch += 1
        self.batch_in_epoch = 0
        self._epoch_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self._epoch_steps = 0
        self.save_checkpoint()

    @torch.no_grad()
    def learn_whitening(self):
        """Learn the recipe's PCA-whitening (``train.whitening``) on the training set and attach it
        to the model (:func:`hapkit.training.landmarks.learn_recipe_whitening`); with several
        processes, each embeds its share of the training images and rank 0's fit of the gathered
        embeddings is given to every process."""
        from hapkit.training.landmarks import learn_recipe_whitening

        with torch.random.fork_rng(devices=[]):
            whitening = learn_recipe_whitening(self.model, self.cfg, self.train_set, device=self.device,
                                               progress=self.progress and self.dist.is_main,
                                               distributed=self.dist.enabled)
        if self.dist.enabled:
            # every process fitted the same rows; the broadcast rules out a last-bit difference
            # between their eigendecompositions
            for buffer in whitening.buffers():
                dist.broadcast(buffer, 0)
        return whitening

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Evaluate the current model on the eval sets; with several processes each embeds its
        share of every set and they rank together (every process gets the same metrics)."""
        was_training = self.model.training
        self.model.eval()
        # evaluation must not consume the training random streams (resumed runs stay identical)
        with torch.random.fork_rng(devices=[]):
            out = evaluate_model(
                self.model,
                self.eval_sets,
                batch_size=self.cfg.data.eval_batch_size,
                num_workers=self.cfg.data.num_workers,
                device=self.device,
                # the training's dtype (bf16 stays bf16) on CUDA; CPU evaluation stays in float32
                amp=(self.amp_dtype or False) if self.device.type == "cuda" else False,
                metrics=self.cfg.eval.metrics,
                max_items=self.cfg.eval.max_items,
                progress=self.progress and self.dist.is_main,
                columns=self.cfg.eval.columns,
                ks=self.cfg.eval.ks,
                overall=self.cfg.eval.overall,
                distributed=self.dist.enabled,
                scales=self.cfg.eval.scales,
                scale_power=self.cfg.eval.scale_power,
                query_expansion=self.cfg.eval.query_expansion,
            )
        self.model.train(was_training)
        barrier(self.dist)
        return out

    def _result(self, interrupted: bool) -> TrainResult:
        metrics = {}
        for rec in reversed(self.history):
            evals = {k: v for k, v in rec.items() if "/" in k and not k.startswith("lr/")}
            if evals:
                metrics = evals
                break
        return TrainResult(
            run_dir=self.run_dir,
            history=pd.DataFrame(self.history),
            metrics=metrics,
            checkpoint=self.checkpoint_path,
            interrupted=interrupted,
            global_step=self.global_step,
        )


def train(
    cfg: Recipe,
    out_dir=None,
    resume: bool = False,
    data_root=None,
    progress: bool = True,
    callbacks: Iterable[Callback] = (),
    stop_after_steps: int | None = None,
    train_set=None,
    eval_sets=None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a recipe end to end; see :class:`Trainer` for the arguments and
    :meth:`Trainer.fit` for ``resume`` and ``overwrite``."""
    trainer = Trainer(
        cfg, out_dir=out_dir, data_root=data_root, train_set=train_set, eval_sets=eval_sets,
        progress=progress, callbacks=callbacks, stop_after_steps=stop_after_steps,
    )
    return trainer.fit(resume=resume, overwrite=overwrite)
