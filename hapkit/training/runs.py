"""Training runs as the notebooks and the command line use them: cached training of a recipe,
loading a checkpoint, embedding a split, writing a run's metrics.

- :func:`train_cached` trains a recipe with :func:`hapkit.training.engine.train` unless a finished
  run is cached under ``<cache_dir>/runs/<recipe>-e<epochs>-seed<seed>-<hash>`` (the hash covers
  every recipe value), so that a second notebook asking for the same run reuses the first one's.
- :func:`load_model` is the one checkpoint -> model loader; :func:`initial_model` is the network
  of a recipe at its random initialisation (the baseline that shows what training changed);
  :func:`load_loss` gives the trained loss of a checkpoint (its proxies or class weights).
- :func:`embed_split` embeds a split with the recipe's test transform; :func:`trained_embeddings`
  / :func:`untrained_embeddings` do the above and cache the embeddings beside the run.
- :func:`write_run_metrics` writes a finished run's ``metrics.json`` (:mod:`hapkit.results`).
- :func:`grid_run` finds a run of the batch grid (``hapkit reproduce``) so that the notebooks
  read the grid's models instead of training their own; :func:`cached_grid` builds the same
  ``runs/<name>/seed<k>/metrics.json`` layout from cached runs when no grid has been run;
  :func:`evaluate_checkpoint` evaluates a checkpoint with its recipe's protocol.

>>> emb = trained_embeddings("happier_generated", epochs=1, max_items=2048)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from hapkit.errors import MissingFileError
from hapkit.data import EmbeddingSet, build_split, build_train_set, spread_indices
from hapkit.data.base import default_cache_dir
from hapkit.data.builder import evaluation_split, recipe_transform, with_transform
from hapkit.evaluate import extract_embeddings
from hapkit.results import headline_metrics, write_metrics
from hapkit.training.checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_verified,
    rng_state,
    seed_everything,
    set_rng_state,
)
from hapkit.training.config import Recipe, apply_overrides, from_dict, to_dict
from hapkit.training.models import build_model
from hapkit.training.whitening import ensure_whitening

__all__ = [
    "DEFAULT_RECIPE",
    "resolve_recipe",
    "run_key",
    "train_cached",
    "load_model",
    "load_loss",
    "initial_model",
    "embed_split",
    "trained_embeddings",
    "untrained_embeddings",
    "write_run_metrics",
    "grid_run",
    "evaluate_checkpoint",
    "cached_grid",
    "grid_runs",
]

DEFAULT_RECIPE = "happier_generated"
EMBEDDINGS_FORMAT = 1  # bump when the cached embedding files change meaning


def resolve_recipe(recipe=DEFAULT_RECIPE, epochs: int | None = None, seed: int | None = None, overrides=()):
    """The :class:`hapkit.training.config.Recipe` for a name, method, YAML path or Recipe, with
    ``epochs``, ``seed`` and ``overrides`` (``"section.key=value"`` strings) applied.

    The engine's own evaluation is switched off (``eval.every=0``, ``eval.at_end=false``): the
    callers of this module evaluate the embeddings themselves.
    """
    from hapkit.training.recipes import load_recipe

    settings = [*list(overrides), "eval.every=0", "eval.at_end=false"]
    if epochs is not None:
        if int(epochs) < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        settings.append(f"train.epochs={int(epochs)}")
    if seed is not None:
        settings.append(f"seed={int(seed)}")
    if isinstance(recipe, Recipe):
        return apply_overrides(recipe, settings)
    return load_recipe(str(recipe), overrides=settings)


def run_key(cfg, dataset_options: Mapping | None = None) -> str:
    """Cache folder name of a training run: readable prefix plus a hash of every recipe value
    (and of the dataset loader options, when any)."""
    blob = json.dumps([to_dict(cfg), dict(dataset_options or {})], sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{cfg.name}-e{cfg.train.epochs}-seed{cfg.seed}-{digest}"


def _cache_root(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def train_cached(cfg, cache_dir=None, data_root=None, dataset_options: Mapping | None = None, progress: bool = True) -> Path:
    """Train ``cfg`` with :func:`hapkit.training.engine.train` unless a finished run is cached;
    returns the run directory ``<cache_dir>/runs/<run_key(cfg)>`` (``checkpoint.pt``,
    ``metrics.jsonl``). ``dataset_options`` go to the dataset loader (e.g.
    ``{"images_per_class": 8}`` for "generated").

    The run trains in a temporary folder beside the cache and is renamed into place when it has
    finished, so a run that was interrupted, or two notebooks training the same key at once, never
    leave a half-trained model under the final name (the second finisher discards its copy).
    ``cache_dir`` defaults to ``$HAPKIT_CACHE`` or ``~/.cache/hapkit``.
    """
    from hapkit.training.engine import CHECKPOINT_NAME, train

    runs = _cache_root(cache_dir) / "runs"
    final = runs / run_key(cfg, dataset_options)
    if (final / CHECKPOINT_NAME).is_file():
        return final
    train_set = build_train_set(cfg.data, root=data_root, options=dataset_options) if dataset_options else None
    runs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".partial-", dir=runs))
    try:
        result = train(cfg, out_dir=tmp, data_root=data_root, progress=progress, train_set=train_set)
        if result.interrupted:
            raise RuntimeError(f"training of {cfg.name} was interrupted; nothing cached")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / CHECKPOINT_NAME).is_file():
                raise
            # another process finished the same run first: keep its copy
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(checkpoint, device=None):
    """The model and recipe of a checkpoint written by ``hapkit train`` (or of a run directory).

    Returns ``(model, cfg)``, the model in eval mode on ``device`` (default CPU). The weights come
    from the checkpoint, so no ImageNet weights are fetched.
    """
    state, path = load_verified(checkpoint)
    if "model" not in state or "recipe" not in state:
        raise CheckpointError(f"{path} is not a hapkit training checkpoint (it has no 'model' and 'recipe' entries)")
    cfg = from_dict(Recipe, state["recipe"])
    model = build_model(dataclasses.replace(cfg.model, pretrained=False))
    ensure_whitening(model, state["model"])  # a whitening learned after training (landmark recipes)
    model.load_state_dict(state["model"])
    return model.to(device or "cpu").eval(), cfg


def load_loss(checkpoint, data_root=None, dataset_options: Mapping | None = None, device=None):
    """The trained loss of a checkpoint (or run directory) and its recipe: ``(loss, cfg)``.

    The loss is rebuilt from the recipe and the training labels (read from the recipe's dataset,
    with ``data_root`` / ``dataset_options`` as for training), then given the checkpoint's loss
    state: learned proxies, class weights, a learned hierarchy and its record.
    """
    from hapkit.training.engine import build_loss

    state, path = load_verified(checkpoint)
    if "loss" not in state or "recipe" not in state:
        raise CheckpointError(f"{path} is not a hapkit training checkpoint (it has no 'loss' and 'recipe' entries)")
    cfg = from_dict(Recipe, state["recipe"])
    train_labels = build_train_set(cfg.data, root=data_root, options=dataset_options).labels
    # the loss was sized by the built model (a model without a linear head embeds its pooled features)
    embedding_size = build_model(dataclasses.replace(cfg.model, pretrained=False)).embedding_size
    loss = build_loss(cfg, train_labels, embedding_size=embedding_size)
    loss.load_state_dict(state["loss"])
    return loss.to(device or "cpu").eval(), cfg


def initial_model(cfg, device=None):
    """The recipe's network as training starts it: same seed, hence the same random weights as
    the first step of :func:`hapkit.training.engine.train` (ImageNet weights when the recipe uses
    them). The global random generators are left as they were."""
    saved = rng_state()
    try:
        seed_everything(cfg.seed)
        model = build_model(cfg.model)
    finally:
        set_rng_state(saved)
    return model.to(device or "cpu").eval()


def _embedding_set(raw, emb, labels, idx, cfg, split, max_items, source, run_dir=None) -> EmbeddingSet:
    return EmbeddingSet(
        embeddings=emb, labels=labels, indices=idx, level_names=list(raw.level_names), class_names=raw.class_names,
        dataset=raw, source=source, run_dir=run_dir, recipe=cfg.name,
        info={"split": split, "dataset": cfg.data.dataset, "max_items": max_items},
    )


def embed_split(
    model,
    cfg,
    split: str | None = None,
    max_items: int | None = None,
    data_root=None,
    batch_size: int | None = None,
    device=None,
    progress: bool = True,
    source: str = "",
    dataset_options: Mapping | None = None,
) -> EmbeddingSet:
    """Embed ``max_items`` images (evenly spread; None = all) of a split of the recipe's dataset
    with the recipe's test transform; see :func:`hapkit.evaluate.extract_embeddings`.
    ``dataset_options`` go to the dataset loader."""
    split = split or evaluation_split(cfg.data.dataset)
    raw = build_split(cfg.data, split, root=data_root, options=dataset_options, transform=None)
    idx = spread_indices(len(raw), max_items)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(with_transform(raw, recipe_transform(cfg.data, train=False)), idx.tolist()),
        batch_size=batch_size or cfg.data.eval_batch_size,
        shuffle=False,
        num_workers=0,
    )
    emb, labels = extract_embeddings(model, loader, device=device, progress=progress)
    return _embedding_set(raw, emb.numpy().astype(np.float32, copy=False), labels.numpy(), idx, cfg, split,
                          max_items, source)


def _cache_file(run_dir: Path, kind: str, split: str, max_items) -> Path:
    return run_dir / f"embeddings-{kind}-{split}-n{max_items if max_items is not None else 'all'}.npz"


def _save_npz(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, raw):
    """The cached (embeddings, labels, indices) when readable and still matching the rows of
    ``raw`` (the dataset split they were computed on), else None."""
    try:
        with np.load(path) as f:
            if int(f["format"]) != EMBEDDINGS_FORMAT:
                return None
            emb, labels, idx = f["embeddings"], f["labels"], f["indices"]
    except (OSError, ValueError, KeyError, EOFError):
        return None  # unreadable (interrupted write of an older version, foreign file): embed again
    if idx.size == 0 or int(idx.max()) >= len(raw) or not np.array_equal(raw.labels[idx], labels):
        return None
    return emb, labels, idx


def _cached_embeddings(run_dir: Path, kind: str, model_fn, cfg, split, max_items, data_root, device, progress,
                       dataset_options=None, source: str | None = None):
    """Embeddings of ``model_fn()`` cached in ``run_dir``, one file per (kind, split, max_items)."""
    split = split or evaluation_split(cfg.data.dataset)
    source = source or kind
    path = _cache_file(run_dir, kind, split, max_items)
    if path.is_file():
        raw = build_split(cfg.data, split, root=data_root, options=dataset_options, transform=None)
        hit = _load_cached(path, raw)
        if hit is not None:
            return _embedding_set(raw, *hit, cfg, split, max_items, source, run_dir)
    out = embed_split(model_fn(), cfg, split, max_items, data_root, device=device, progress=progress, source=source,
                      dataset_options=dataset_options)
    out.run_dir = run_dir
    try:
        _save_npz(path, format=np.int64(EMBEDDINGS_FORMAT), embeddings=out.embeddings, labels=out.labels,
                  indices=out.indices)
    except OSError:
        pass  # a read-only run folder: the embeddings are computed again next time
    return out


def _checkpoint_tag(checkpoint: Path) -> str:
    """Short tag of a checkpoint file's identity (size and modification time): embeddings cached
    beside a run that is later trained further are computed again."""
    stat = checkpoint.stat()
    return hashlib.sha256(f"{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest()[:8]


def grid_run(runs_dir, recipe, seed: int = 0) -> Path | None:
    """The finished run of the batch grid for ``recipe`` and ``seed``, or None.

    ``hapkit reproduce`` trains each (method, dataset, seed) into
    ``<out>/runs/<method>_<dataset>/seed<seed>/``; ``runs_dir`` is that ``<out>/runs`` folder and
    ``recipe`` a bundled recipe name (``"happier_generated"``), a method with the dataset in
    the name, or a Recipe. A run counts as finished when its ``metrics.json`` and checkpoint exist.
    """
    from hapkit.results import METRICS_FILE
    from hapkit.training.engine import CHECKPOINT_NAME

    if runs_dir is None:
        return None
    name = recipe.name if isinstance(recipe, Recipe) else Path(str(recipe)).stem
    run_dir = Path(runs_dir).expanduser() / name / f"seed{int(seed)}"
    if (run_dir / METRICS_FILE).is_file() and (run_dir / CHECKPOINT_NAME).is_file():
        return run_dir
    return None


def trained_embeddings(
    recipe=DEFAULT_RECIPE,
    epochs: int | None = 1,
    seed: int = 0,
    checkpoint=None,
    runs_dir=None,
    cache_dir=None,
    overrides: Sequence[str] = (),
    max_items: int | None = None,
    split: str | None = None,
    data_root=None,
    dataset_options: Mapping | None = None,
    device=None,
    progress: bool = True,
) -> EmbeddingSet:
    """Test-set embeddings of a trained model, training (and caching) a run when needed.

    Args:
        recipe: bundled recipe name (default ``happier_generated``: HAPPIER, Ramzi et al. ECCV
            2022, on the embedded generated dataset), a YAML path or a Recipe.
        epochs: training length (default 1, a CI-sized run; None keeps the recipe's).
        seed: the run's seed.
        checkpoint: a ``checkpoint.pt`` (or run directory) from ``hapkit train`` or notebook 03;
            when given, nothing is trained and ``recipe``/``epochs``/``seed`` are ignored.
        runs_dir: the ``runs/`` folder of a ``hapkit reproduce`` output; when it holds a finished
            run of ``recipe`` and ``seed`` (:func:`grid_run`), that run is used as ``checkpoint``
            (whatever its training length), else the run is trained here as without it.
        cache_dir: where runs and their embeddings are cached (default ``$HAPKIT_CACHE`` or
            ``~/.cache/hapkit``); the key covers every recipe value, so changing any of them
            trains a new run.
        overrides: recipe changes, ``"section.key=value"`` strings.
        max_items: embed this many test images, evenly spread (None = all).
        split: the split to embed (default ``"test"``: classes unseen in training).
        data_root: folder of a prepared real dataset.
        dataset_options: options of the dataset loader (e.g. ``{"images_per_class": 8}``).
        device: where to run the model (default CPU).
        progress: tqdm progress bars.
    """
    if checkpoint is None and runs_dir is not None:
        checkpoint = grid_run(runs_dir, resolve_recipe(recipe, epochs, seed, overrides).name, seed)
    if checkpoint is not None:
        file = checkpoint_file(checkpoint)
        if not file.is_file():
            raise MissingFileError(f"no checkpoint at {file}: pass a checkpoint.pt written by `hapkit train` or its run folder")
        cfg = from_dict(Recipe, load_verified(file)[0]["recipe"])
        return _cached_embeddings(
            file.parent, f"checkpoint-{_checkpoint_tag(file)}", lambda: load_model(file, device)[0], cfg, split,
            max_items, data_root, device, progress, dataset_options, source="checkpoint",
        )
    cfg = resolve_recipe(recipe, epochs, seed, overrides)
    run_dir = train_cached(cfg, cache_dir, data_root=data_root, dataset_options=dataset_options, progress=progress)
    return _cached_embeddings(
        run_dir, "trained", lambda: load_model(run_dir, device)[0], cfg, split, max_items, data_root, device,
        progress, dataset_options,
    )


def untrained_embeddings(
    recipe=DEFAULT_RECIPE,
    seed: int = 0,
    checkpoint=None,
    cache_dir=None,
    overrides: Sequence[str] = (),
    max_items: int | None = None,
    split: str | None = None,
    data_root=None,
    dataset_options: Mapping | None = None,
    device=None,
    progress: bool = True,
) -> EmbeddingSet:
    """The same images embedded by the recipe's network before training (its initial weights, see
    :func:`initial_model`); with ``checkpoint``, the network of the checkpoint's recipe.

    Cached like :func:`trained_embeddings`, under ``<cache_dir>/runs/<key>-init`` (the training
    length is not part of that key: it does not change the initial weights).
    """
    if checkpoint is not None:
        _, cfg = load_model(checkpoint)
    else:
        cfg = resolve_recipe(recipe, None, seed, overrides)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=0))
    run_dir = _cache_root(cache_dir) / "runs" / f"{run_key(cfg, dataset_options)}-init"
    run_dir.mkdir(parents=True, exist_ok=True)
    return _cached_embeddings(
        run_dir, "initial", lambda: initial_model(cfg, device), cfg, split, max_items, data_root, device,
        progress, dataset_options,
    )


def write_run_metrics(output_dir, result, cfg, dataset: str | None = None, seed: int | None = None,
                      level_names=None) -> Path:
    """Write ``metrics.json`` of a finished training run (read back by :func:`hapkit.results.collect_runs`)."""
    return write_metrics(
        output_dir,
        result.metrics,
        recipe=cfg.name,
        method=cfg.method,
        dataset=dataset or cfg.data.dataset,
        seed=cfg.seed if seed is None else seed,
        epochs=cfg.train.epochs,
        steps=int(result.global_step),
        level_names=list(level_names) if level_names is not None else None,
        headline=headline_metrics(result.metrics),
        reported=dict(cfg.reported),
        train_time_s=float(result.history["time_s"].sum()) if "time_s" in result.history else None,
        config=to_dict(cfg),
    )


def evaluate_checkpoint(checkpoint, device=None, data_root=None, dataset_options: Mapping | None = None,
                        progress: bool = True, distributed: bool = False) -> dict:
    """Evaluate a checkpoint (or run directory) as its recipe's training evaluates: its eval sets,
    metrics, label columns and k values; returns flat ``{"<set>/<metric>": value}``.
    ``dataset_options`` go to the dataset loader; ``distributed``: every process of a
    ``torchrun`` job embeds its share and they rank together (see
    :func:`hapkit.training.engine.evaluate_model`)."""
    from hapkit.data import build_eval_sets
    from hapkit.training.engine import evaluate_model, resolve_amp

    model, cfg = load_model(checkpoint, device)
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
    with torch.no_grad():
        return evaluate_model(
            model, build_eval_sets(cfg.data, options=dataset_options), batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
            device=device, amp=resolve_amp(cfg.train.amp, torch.device(device or "cpu")) is not None,
            metrics=cfg.eval.metrics, max_items=cfg.eval.max_items, progress=progress,
            columns=cfg.eval.columns, ks=cfg.eval.ks, overall=cfg.eval.overall, distributed=distributed,
            scales=cfg.eval.scales, scale_power=cfg.eval.scale_power, query_expansion=cfg.eval.query_expansion,
        )


def _training_summary(run_dir: Path) -> tuple[int | None, float | None]:
    """(steps, training seconds) of a finished run, from its ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = max((int(r["step"]) for r in lines if "step" in r), default=None)
    seconds = sum(float(r["time_s"]) for r in lines if "time_s" in r) or None
    return steps, seconds


def cached_grid(recipes: Sequence[str], seeds: Sequence[int] = (0,), epochs: int | None = None, out="results",
                cache_dir=None, overrides: Sequence[str] = (), data_root=None, dataset_options: Mapping | None = None,
                device=None, progress: bool = True) -> list[Path]:
    """The reproduction grid through the run cache: train each recipe and seed with
    :func:`train_cached` (nothing is trained twice, and a notebook that trained the same run
    already did the work), evaluate it with :func:`evaluate_checkpoint`, and write its
    ``metrics.json`` to ``<out>/runs/<recipe>/seed<seed>/``, the layout of ``hapkit reproduce``
    that :func:`hapkit.results.collect_runs` reads. Returns the run folders.
    """
    from tqdm.auto import tqdm

    from hapkit.data import get_dataset

    folders = []
    plan = [(name, int(seed)) for seed in seeds for name in recipes]
    for name, seed in tqdm(plan, desc="grid", disable=not progress):
        cfg = resolve_recipe(name, epochs, seed, overrides)
        cached = train_cached(cfg, cache_dir, data_root=data_root, dataset_options=dataset_options, progress=progress)
        metrics = evaluate_checkpoint(cached, device=device, data_root=data_root, dataset_options=dataset_options,
                                      progress=progress)
        steps, seconds = _training_summary(cached)
        levels = get_dataset(cfg.data.dataset, root=data_root, split=evaluation_split(cfg.data.dataset)).level_names
        folder = Path(out) / "runs" / cfg.name / f"seed{seed}"
        write_metrics(
            folder, metrics, recipe=cfg.name, method=cfg.method, dataset=cfg.data.dataset, seed=seed,
            epochs=cfg.train.epochs, steps=steps, level_names=list(levels), headline=headline_metrics(metrics),
            reported=dict(cfg.reported), train_time_s=seconds, checkpoint=str(cached / "checkpoint.pt"),
            config=to_dict(cfg),
        )
        folders.append(folder)
    return folders


def grid_runs(results_dir=None, recipes: Sequence[str] = (), seeds: Sequence[int] = (0,), epochs: int | None = None,
              out="results", cache_dir=None, progress: bool = True):
    """The runs table (:func:`hapkit.results.collect_runs`) of a ``hapkit reproduce`` output, with
    the embedded-dataset grid built when it has none.

    Reads ``results_dir`` (None or a folder without runs: nothing); when no run of the generated
    dataset is among them, ``recipes`` x ``seeds`` are trained and evaluated through the cache
    (:func:`cached_grid`, into ``out``) and added. The ``source`` column says where each row comes
    from: ``"results"`` or ``"cache"``.
    """
    import pandas as pd

    from hapkit.results import collect_runs

    found = collect_runs(results_dir) if results_dir is not None and Path(results_dir).is_dir() else pd.DataFrame()
    if not found.empty:
        found = found.assign(source="results")
    if recipes and (found.empty or not (found["dataset"] == "generated").any()):
        folders = cached_grid(recipes, seeds, epochs, out=out, cache_dir=cache_dir, progress=progress)
        built = collect_runs(out, folders).assign(source="cache")
        found = pd.concat([found, built], ignore_index=True) if not found.empty else built
    return found
