"""Embeddings of some images of a dataset, with what is needed to show and evaluate them.

An :class:`EmbeddingSet` is what the training wing hands to the figures
(:mod:`hapkit.training.runs` produces them, :mod:`hapkit.viz` draws them): plain arrays plus the
dataset the rows come from, so that a figure can show thumbnails without knowing how the
embeddings were made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["EmbeddingSet", "label_frame"]


@dataclass
class EmbeddingSet:
    """Embeddings of some images of a dataset.

    Attributes:
        embeddings: (N, D) float32 array, L2-normalised by the model.
        labels: (N, L) int64 tree labels, finest level first.
        indices: (N,) rows of ``dataset`` the embeddings belong to.
        level_names: names of the label columns, finest first.
        class_names: one list of readable class names per level (None when the dataset has none).
        dataset: the split the images come from, without transform (``load_image`` gives the raw
            image), for thumbnails (:func:`hapkit.viz.images.embedding_images`).
        source: what produced the embeddings (``"trained"``, ``"initial"`` or ``"checkpoint"``).
        run_dir: the training run (checkpoint, metrics.jsonl) when there is one.
        recipe: the recipe's name.
        info: the split, dataset name and subset size the set was made from.
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
