"""Looking at an embedding space: trained embeddings for the notebooks, UMAP projections, figures.

Two concerns, kept apart:

- **Getting embeddings.** :func:`trained_embeddings` returns the test-set embeddings of a model
  trained on a recipe (by default HAPPIER on the embedded generated dataset). Without a
  checkpoint it trains a short run with :func:`hapkit.engine.train` and caches the run under
  ``<cache_dir>/runs/<recipe>-e<epochs>-seed<seed>-<hash>`` (the hash covers every recipe
  value), together with the embeddings it computed, so that a second notebook asking for the same
  (recipe, epochs, seed) reuses the first one's work. :func:`untrained_embeddings` embeds the same
  images with the same network at its random initialisation, the baseline that shows what
  training changed.
- **Looking at them.** :func:`umap_projection` maps embeddings to 2-D with UMAP (McInnes et al.,
  2018) on cosine distances, deterministic with ``random_state``; :func:`projection_frame` joins
  the coordinates with readable labels; :func:`embedding_figure` draws a plotly scatter coloured
  by a level of the hierarchy with every label in the hover text; :func:`projection_mosaic` lays
  thumbnails out on a grid over the projection.

>>> emb = trained_embeddings("happier_generated", epochs=1, max_items=2048)   # doctest: +SKIP
>>> frame = projection_frame(umap_projection(emb.embeddings), emb)           # doctest: +SKIP
>>> embedding_figure(frame, color="shape")                                     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = [
    "EmbeddingSet",
    "resolve_recipe",
    "run_key",
    "train_cached",
    "load_model",
    "initial_model",
    "embed_split",
    "trained_embeddings",
    "untrained_embeddings",
    "spread_indices",
    "label_frame",
    "to_rgb_array",
    "umap_projection",
    "projection_frame",
    "embedding_figure",
    "projection_mosaic",
    "mosaic_figure",
    "metrics_table",
    "write_metrics",
]

DEFAULT_RECIPE = "happier_generated"
EMBEDDINGS_FORMAT = 1  # bump when the cached embedding files change meaning


# ------------------------------------------------------------------------------ the data


@dataclass
class EmbeddingSet:
    """Embeddings of some images of a dataset, with everything needed to show them.

    Attributes:
        embeddings: (N, D) float32 array, L2-normalised by the model.
        labels: (N, L) int64 tree labels, finest level first.
        indices: (N,) rows of ``dataset`` the embeddings belong to.
        level_names: names of the label columns, finest first.
        class_names: one list of readable class names per level (None when the dataset has none).
        dataset: the split the images come from, without transform (``load_image`` gives the raw
            image), for thumbnails.
        source: what produced the embeddings (``"trained"``, ``"initial"`` or ``"checkpoint"``).
        run_dir: the training run (checkpoint, metrics.jsonl) when there is one.
        recipe: the recipe's name.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    level_names: list[str]
    class_names: list[list[str]] | None = None
    dataset: object = None
    source: str = ""
    run_dir: Path | None = None
    recipe: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.labels.shape[1])

    def images(self) -> np.ndarray:
        """The raw images as a uint8 (N, H, W, 3) array (thumbnails; all the same size)."""
        if self.dataset is None:
            raise ValueError("this EmbeddingSet has no dataset to take images from")
        stored = getattr(self.dataset, "images", None)
        if isinstance(stored, np.ndarray) and stored.dtype == np.uint8 and stored.ndim == 4:
            return stored[self.indices]  # in-memory datasets: one fancy-indexing copy
        return np.stack([to_rgb_array(self.dataset.load_image(int(i))) for i in self.indices])

    def label_names(self) -> pd.DataFrame:
        """One column per level (finest first) with each item's class name (or id)."""
        return label_frame(self.labels, self.level_names, self.class_names)


def label_frame(labels, level_names: Sequence[str] | None = None, class_names=None) -> pd.DataFrame:
    """Readable labels: one column per level, the class name when known, else the class id."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    names = list(level_names) if level_names is not None else [f"level {c}" for c in range(labels.shape[1])]
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} level name(s) {names} for labels with {labels.shape[1]} column(s)")
    cols = {}
    for c, name in enumerate(names):
        if class_names is not None:
            table = np.asarray(class_names[c], dtype=object)
            cols[name] = table[labels[:, c]]
        else:
            cols[name] = labels[:, c].astype(str)
    return pd.DataFrame(cols)


def to_rgb_array(img) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array: a PIL image, a CxHxW tensor (as a dataset's
    ``load_image`` returns) or an (H, W[, C]) array; floats are taken to lie in [0, 1]."""
    if hasattr(img, "convert"):  # PIL
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if isinstance(img, torch.Tensor):
        arr = img.detach().cpu()
        if arr.dim() == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    else:
        arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def spread_indices(n: int, max_items: int | None) -> np.ndarray:
    """``max_items`` row indices evenly spread over ``range(n)`` (all of them when None or >= n).

    Datasets are stored class by class, so an even spread keeps every class with about the same
    number of items, unlike taking the first rows.
    """
    if max_items is None or max_items >= n:
        return np.arange(n)
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    return np.unique(np.linspace(0, n - 1, int(max_items)).round().astype(np.int64))


# ---------------------------------------------------------------------- models and runs


def resolve_recipe(recipe=DEFAULT_RECIPE, epochs: int | None = None, seed: int | None = None, overrides=()):
    """The :class:`hapkit.config.Recipe` for a name, method, YAML path or Recipe, with ``epochs``,
    ``seed`` and ``overrides`` (``"section.key=value"`` strings) applied.

    The engine's own evaluation is switched off (``eval.every=0``, ``eval.at_end=false``): the
    callers of this module evaluate the embeddings themselves.
    """
    from hapkit.config import Recipe, apply_overrides
    from hapkit.recipes import load_recipe

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
    from hapkit.config import to_dict

    blob = json.dumps([to_dict(cfg), dict(dataset_options or {})], sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"{cfg.name}-e{cfg.train.epochs}-seed{cfg.seed}-{digest}"


def _default_cache_dir() -> Path:
    from hapkit.data.base import default_cache_dir

    return default_cache_dir()


def train_cached(cfg, cache_dir=None, data_root=None, dataset_options: Mapping | None = None, progress: bool = True) -> Path:
    """Train ``cfg`` with :func:`hapkit.engine.train` unless a finished run is cached; returns the
    run directory ``<cache_dir>/runs/<run_key(cfg)>`` (``checkpoint.pt``, ``metrics.jsonl``).
    ``dataset_options`` go to the dataset loader (e.g. ``{"images_per_class": 8}`` for
    "generated").

    The run trains in a temporary folder beside the cache and is renamed into place when it has
    finished, so a run that was interrupted, or two notebooks training the same key at once, never
    leave a half-trained model under the final name (the second finisher discards its copy).
    ``cache_dir`` defaults to ``$HAPKIT_CACHE`` or ``~/.cache/hapkit``.
    """
    from hapkit.engine import CHECKPOINT_NAME, train

    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    runs = root / "runs"
    final = runs / run_key(cfg, dataset_options)
    if (final / CHECKPOINT_NAME).is_file():
        return final
    train_set = None
    if dataset_options:
        from hapkit.data import get_dataset
        from hapkit.data.transforms import build_transforms

        d = cfg.data
        transform = build_transforms(d.transform, train=True, resize=d.resize, crop=d.crop)
        root = data_root if data_root is not None else d.root
        train_set = get_dataset(d.dataset, root=root, split="train", transform=transform, **dataset_options)
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
    """The model and recipe of a checkpoint written by ``hapkit train`` (or a run directory).

    Returns ``(model, cfg)``, the model in eval mode on ``device`` (default CPU). The weights come
    from the checkpoint, so no ImageNet weights are fetched.
    """
    from hapkit.checkpoint import load_checkpoint
    from hapkit.config import Recipe, from_dict
    from hapkit.engine import CHECKPOINT_NAME
    from hapkit.models import build_model

    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    state = load_checkpoint(path)
    if "model" not in state or "recipe" not in state:
        raise ValueError(f"{path} is not a hapkit training checkpoint (it has no 'model' and 'recipe' entries)")
    cfg = from_dict(Recipe, state["recipe"])
    model = build_model(dataclasses.replace(cfg.model, pretrained=False))
    model.load_state_dict(state["model"])
    return model.to(device or "cpu").eval(), cfg


def initial_model(cfg, device=None):
    """The recipe's network as training starts it: same seed, hence the same random weights as
    the first step of :func:`hapkit.engine.train` (ImageNet weights when the recipe uses them).

    The global random generators are left as they were.
    """
    from hapkit.checkpoint import rng_state, seed_everything, set_rng_state
    from hapkit.models import build_model

    saved = rng_state()
    try:
        seed_everything(cfg.seed)
        model = build_model(cfg.model)
    finally:
        set_rng_state(saved)
    return model.to(device or "cpu").eval()


def _test_split(cfg) -> str:
    from hapkit.data.registry import dataset_info

    splits = dataset_info(cfg.data.dataset).splits
    if "test" in splits:
        return "test"
    raise ValueError(
        f"dataset {cfg.data.dataset!r} has no 'test' split (splits: {splits}); pass split= explicitly"
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
    from hapkit.data import get_dataset
    from hapkit.data.transforms import build_transforms
    from hapkit.evaluate import extract_embeddings

    d = cfg.data
    split = split or _test_split(cfg)
    root = data_root if data_root is not None else d.root
    raw = get_dataset(d.dataset, root=root, split=split, **dict(dataset_options or {}))
    transformed = copy.copy(raw)  # shares the images; only the transform differs
    transformed.transform = build_transforms(d.transform, train=False, resize=d.resize, crop=d.crop)
    idx = spread_indices(len(raw), max_items)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(transformed, idx.tolist()),
        batch_size=batch_size or d.eval_batch_size,
        shuffle=False,
        num_workers=0,
    )
    emb, labels = extract_embeddings(model, loader, device=device, progress=progress)
    return EmbeddingSet(
        embeddings=emb.numpy().astype(np.float32, copy=False),
        labels=labels.numpy(),
        indices=idx,
        level_names=list(raw.level_names),
        class_names=raw.class_names,
        dataset=raw,
        source=source,
        recipe=cfg.name,
        info={"split": split, "dataset": d.dataset, "max_items": max_items},
    )


def _cache_file(run_dir: Path, kind: str, split: str, max_items) -> Path:
    return run_dir / f"embeddings-{kind}-{split}-n{max_items if max_items is not None else 'all'}.npz"


def _save_npz(path: Path, **arrays) -> None:
    # temp file then rename: a reader never sees half an array
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
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
                       dataset_options=None):
    """Embeddings of ``model_fn()`` cached in ``run_dir``, one file per (kind, split, max_items)."""
    from hapkit.data import get_dataset

    split = split or _test_split(cfg)
    path = _cache_file(run_dir, kind, split, max_items)
    if path.is_file():
        root = data_root if data_root is not None else cfg.data.root
        raw = get_dataset(cfg.data.dataset, root=root, split=split, **dict(dataset_options or {}))
        hit = _load_cached(path, raw)
        if hit is not None:
            emb, labels, idx = hit
            return EmbeddingSet(
                embeddings=emb, labels=labels, indices=idx, level_names=list(raw.level_names),
                class_names=raw.class_names, dataset=raw, source=kind, run_dir=run_dir, recipe=cfg.name,
                info={"split": split, "dataset": cfg.data.dataset, "max_items": max_items},
            )
    out = embed_split(model_fn(), cfg, split, max_items, data_root, device=device, progress=progress, source=kind,
                      dataset_options=dataset_options)
    out.run_dir = run_dir
    _save_npz(path, format=np.int64(EMBEDDINGS_FORMAT), embeddings=out.embeddings, labels=out.labels, indices=out.indices)
    return out


def trained_embeddings(
    recipe=DEFAULT_RECIPE,
    epochs: int | None = 1,
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
    """Test-set embeddings of a trained model, training (and caching) a short run when needed.

    Args:
        recipe: bundled recipe name (default ``happier_generated``: HAPPIER, Ramzi et al. ECCV
            2022, on the embedded generated dataset), a YAML path or a Recipe.
        epochs: training length (default 1, a CI-sized run; None keeps the recipe's).
        seed: the run's seed.
        checkpoint: a ``checkpoint.pt`` (or run directory) from ``hapkit train`` or notebook 03;
            when given, nothing is trained and ``recipe``/``epochs``/``seed`` are ignored.
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
    if checkpoint is not None:
        model, cfg = load_model(checkpoint, device)
        out = embed_split(model, cfg, split, max_items, data_root, device=device, progress=progress,
                          source="checkpoint", dataset_options=dataset_options)
        out.run_dir = Path(checkpoint).parent if Path(checkpoint).is_file() else Path(checkpoint)
        return out
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
    # the initial weights do not depend on the training length
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=0))
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    run_dir = root / "runs" / f"{run_key(cfg, dataset_options)}-init"
    run_dir.mkdir(parents=True, exist_ok=True)
    return _cached_embeddings(
        run_dir, "initial", lambda: initial_model(cfg, device), cfg, split, max_items, data_root, device,
        progress, dataset_options,
    )


# ------------------------------------------------------------------------- projections


def umap_projection(
    embeddings,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    n_epochs: int | None = 200,
    random_state: int | None = 0,
    **kwargs,
) -> np.ndarray:
    """2-D UMAP projection (McInnes, Healy & Melville, 2018) of (N, D) embeddings; (N, 2) float32.

    Defaults: 15 neighbours, min_dist 0.1, cosine distance (the retrieval similarity), 200
    optimisation epochs, ``random_state=0``, which makes the result deterministic (UMAP then runs
    single-threaded; ``n_jobs=1`` is passed so that it does not warn about it). The first call in
    a process compiles numba code (about 15 s); a few thousand points then take seconds.
    """
    x = embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values; UMAP cannot project them")
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    if n_neighbors >= n:
        # UMAP's spectral initialisation needs n_neighbors < n
        n_neighbors = max(2, n - 1)
    with warnings.catch_warnings():
        # ParametricUMAP's optional TensorFlow dependency is announced at import
        warnings.filterwarnings("ignore", message=".*Tensorflow not installed.*")
        import umap

    kwargs.setdefault("n_jobs", 1 if random_state is not None else -1)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=int(n_neighbors),
        min_dist=float(min_dist),
        metric=metric,
        n_epochs=n_epochs,
        random_state=random_state,
        **kwargs,
    )
    return reducer.fit_transform(x.astype(np.float32, copy=False)).astype(np.float32)


def projection_frame(coords, items: EmbeddingSet | None = None, labels=None, level_names=None, class_names=None) -> pd.DataFrame:
    """Coordinates with readable labels: columns ``x``, ``y``, ``item`` (row of the dataset) and one
    column per level (class names). Pass an :class:`EmbeddingSet` or ``labels`` and names."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {coords.shape}")
    if items is not None:
        labels, level_names, class_names = items.labels, items.level_names, items.class_names
        index = items.indices
    else:
        if labels is None:
            raise ValueError("give an EmbeddingSet or the labels of the projected items")
        index = np.arange(len(coords))
    labels = np.asarray(labels)
    if len(labels) != len(coords):
        raise ValueError(f"{len(coords)} projected points but {len(labels)} label rows")
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "item": np.asarray(index)})
    return pd.concat([frame, label_frame(labels, level_names, class_names)], axis=1)


def embedding_figure(
    frame: pd.DataFrame,
    color: str,
    facet: str | None = None,
    title: str | None = None,
    legend_max: int = 20,
    marker_size: int = 5,
):
    """Plotly scatter of :func:`projection_frame` coloured by the level column ``color``.

    Every level's class name shows when hovering. ``facet`` names a column (e.g. ``"model"`` after
    concatenating two frames) drawn as side-by-side panels with their own axes (UMAP coordinates of
    different models are not comparable) and a shared colour per class. The legend is hidden when
    the level has more than ``legend_max`` classes.
    """
    import plotly.express as px

    for col in ("x", "y", color) + ((facet,) if facet else ()):
        if col not in frame:
            raise ValueError(f"frame has no column {col!r}; its columns are {list(frame.columns)}")
    levels = [c for c in frame.columns if c not in ("x", "y", "item", facet)]
    order = sorted(frame[color].astype(str).unique())
    palette = px.colors.qualitative.Dark24 if len(order) > 10 else px.colors.qualitative.D3
    fig = px.scatter(
        frame.assign(**{color: frame[color].astype(str)}),
        x="x",
        y="y",
        color=color,
        facet_col=facet,
        hover_data={"x": False, "y": False, "item": True, **{c: True for c in levels}},
        category_orders={color: order},
        color_discrete_sequence=palette,
        title=title,
        render_mode="svg",
    )
    fig.update_traces(marker=dict(size=marker_size, opacity=0.8, line=dict(width=0)))
    fig.update_xaxes(matches=None, showticklabels=False, title=None, showgrid=False, zeroline=False)
    fig.update_yaxes(matches=None, showticklabels=False, title=None, showgrid=False, zeroline=False)
    if facet:
        fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_layout(
        showlegend=len(order) <= legend_max,
        legend=dict(title=color, itemsizing="constant"),
        height=480,
        width=None if facet else 640,
        plot_bgcolor="white",
        margin=dict(l=10, r=10, t=60, b=10),
    )
    return fig


def projection_mosaic(coords, images, grid: int = 16, pad: int = 1) -> np.ndarray:
    """Thumbnails on a ``grid`` x ``grid`` lattice over the 2-D projection: each cell holds the
    image of the point nearest its centre (blank when no point falls in it). Returns uint8
    (grid*(H+pad)+pad, grid*(W+pad)+pad, 3), y growing downwards as in an image."""
    coords = np.asarray(coords, dtype=np.float64)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 (N, H, W, 3) array, got {images.dtype} {images.shape}")
    if len(images) != len(coords):
        raise ValueError(f"{len(coords)} points but {len(images)} images")
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    h, w = images.shape[1:3]
    lo, hi = coords.min(0), coords.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    cell = np.minimum(((coords - lo) / span * grid).astype(np.int64), grid - 1)  # (N, 2): col, row from bottom
    centre = lo + (cell + 0.5) * span / grid
    dist = ((coords - centre) ** 2).sum(1)
    out = np.full((grid * (h + pad) + pad, grid * (w + pad) + pad, 3), 255, dtype=np.uint8)
    # nearest point of each cell: sort by distance, keep the first occurrence of each cell
    order = np.lexsort((dist, cell[:, 1], cell[:, 0]))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (np.diff(cell[order, 0]) != 0) | (np.diff(cell[order, 1]) != 0)
    for i in order[first]:
        cx, cy = cell[i]
        r = grid - 1 - cy  # image rows grow downwards, projection y upwards
        y0, x0 = pad + r * (h + pad), pad + cx * (w + pad)
        out[y0 : y0 + h, x0 : x0 + w] = images[i]
    return out


def mosaic_figure(coords, images, grid: int = 16, title: str | None = None, scale: float = 1.5):
    """A plotly figure of :func:`projection_mosaic` (image embedded as PNG, compact in notebooks)."""
    import plotly.express as px

    mosaic = projection_mosaic(coords, images, grid)
    fig = px.imshow(mosaic, binary_string=True, title=title)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(
        width=int(mosaic.shape[1] * scale) + 40,
        height=int(mosaic.shape[0] * scale) + 80,
        margin=dict(l=10, r=10, t=50, b=10),
    )
    return fig


# ----------------------------------------------------------------------------- metrics


def metrics_table(
    results: Mapping[str, object],
    level_names: Sequence[str] | None = None,
    metrics: Sequence[str] | None = ("H-AP", "ASI", "NDCG", "AP@*", "R@1@*"),
) -> pd.DataFrame:
    """Side-by-side summary of several :class:`hapkit.evaluate.RetrievalResults` (or summary
    dicts), in %: one row per metric (level numbers replaced by ``level_names``), one column per
    entry of ``results``. ``metrics`` selects names, ``*`` standing for every level (None: all)."""
    from hapkit.reproduce import metrics_frame

    if not results:
        raise ValueError("no results to tabulate")
    summaries = {name: dict(getattr(res, "summary", res)) for name, res in results.items()}
    names = list(dict.fromkeys(k for s in summaries.values() for k in s))
    if metrics is not None:  # in the order of the patterns, then of the summaries
        names = [k for m in metrics for k in names if _matches(k, m)]
        if not names:
            raise ValueError(f"no metric matches {list(metrics)}; available: {list(dict.fromkeys(k for s in summaries.values() for k in s))}")
    flat = {f"{name}/{k}": float(s[k]) for k in names for name, s in summaries.items() if k in s}
    frame = metrics_frame(flat, level_names)
    return frame[list(results)]


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith("@*"):
        head = pattern[:-2]
        return name.startswith(head + "@") and name[len(head) + 1 :].isdigit()
    return name == pattern


def write_metrics(output_dir, metrics: Mapping[str, float], **info) -> Path:
    """Write ``<output_dir>/metrics.json``: ``{"metrics": {name: value}, **info}`` (atomically).

    ``metrics`` is flat (e.g. ``{"trained/H-AP": 0.61}``); ``info`` holds the notebook's
    parameters and anything else worth keeping beside the numbers.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**{k: _jsonable(v) for k, v in info.items()}, "metrics": {k: float(v) for k, v in metrics.items()}}
    path = out / "metrics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
