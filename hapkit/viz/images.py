"""Images for figures: any image -> RGB uint8, tiles on a grid, dataset samples, thumbnails.

One conversion (:func:`to_rgb_array`) and one tiler (:func:`image_grid`, torchvision's
``make_grid``) serve every figure of :mod:`hapkit.viz`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["to_rgb_array", "image_grid", "blank_tile", "framed", "sample_grid", "sample_figure", "embedding_images"]

WHITE = 255


def to_rgb_array(img, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as an (H, W, 3) uint8 array: a PIL image, a CxHxW tensor (as a dataset's
    ``load_image`` returns) or an (H, W[, C]) array; floats are taken to lie in [0, 1].
    ``size`` = (H, W) resizes PIL images (file datasets mix sizes)."""
    if hasattr(img, "convert"):  # PIL
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]))
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


def blank_tile(height: int, width: int, value=WHITE) -> np.ndarray:
    """An (H, W, 3) uint8 tile of one colour (a grey level or an (r, g, b) triple)."""
    return np.broadcast_to(np.asarray(value, dtype=np.uint8), (height, width, 3)).copy()


def framed(tile: np.ndarray, color: tuple[int, int, int], border: int) -> np.ndarray:
    """``tile`` inside a ``border``-pixel frame of ``color``."""
    h, w = tile.shape[:2]
    out = blank_tile(h + 2 * border, w + 2 * border, color)
    out[border : border + h, border : border + w] = tile
    return out


def image_grid(tiles: Sequence[np.ndarray], ncols: int, pad: int = 2, pad_value: int = WHITE) -> np.ndarray:
    """Equal-sized (H, W, 3) uint8 tiles laid out row by row, ``ncols`` per row, with ``pad`` pixels
    of ``pad_value`` around and between them; returns (rows*(H+pad)+pad, ncols*(W+pad)+pad, 3).
    Missing cells of the last row are blank. (torchvision's ``make_grid``.)"""
    from torchvision.utils import make_grid

    if not len(tiles):
        raise ValueError("no tile to lay out")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    tiles = [np.asarray(t, dtype=np.uint8) for t in tiles]
    rows = -(-len(tiles) // ncols)
    tiles += [blank_tile(*tiles[0].shape[:2], pad_value)] * (rows * ncols - len(tiles))
    if len(tiles) == 1:  # make_grid hands a single image back without its padding
        return np.pad(tiles[0], ((pad, pad), (pad, pad), (0, 0)), constant_values=pad_value)
    stack = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    grid = make_grid(stack, nrow=ncols, padding=pad, pad_value=pad_value)
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())


def sample_grid(
    dataset,
    per_class: int = 8,
    classes: Sequence[int] | None = None,
    column: int = 0,
    pad: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """A uint8 image with one row per class of label column ``column``, ``per_class`` samples each.

    ``dataset`` is any dataset with ``.labels`` and ``load_image`` (in-memory or files; file images
    are resized to the first image's size). ``classes`` defaults to the first 8 classes of the
    column. Samples are drawn without replacement with ``seed``.
    """
    labels = np.asarray(dataset.labels)[:, column]
    classes = list(range(min(8, int(labels.max()) + 1))) if classes is None else list(classes)
    rng = np.random.default_rng(seed)
    tiles: list[np.ndarray] = []
    size = None
    for c in classes:
        idx = np.nonzero(labels == c)[0]
        if idx.size == 0:
            raise ValueError(f"class {c} has no image in label column {column}")
        pick = rng.choice(idx, size=min(per_class, idx.size), replace=False)
        row = []
        for i in pick:
            img = to_rgb_array(dataset.load_image(int(i)), size)
            size = size or img.shape[:2]
            row.append(img)
        tiles += row + [blank_tile(*size)] * (per_class - len(row))
    return image_grid(tiles, per_class, pad)


def sample_figure(dataset, per_class: int = 8, classes=None, column: int = 0, seed: int = 0, scale: int = 3):
    """A plotly figure of :func:`sample_grid`, each row labelled with its class name."""
    import plotly.express as px

    labels = np.asarray(dataset.labels)[:, column]
    classes = list(range(min(8, int(labels.max()) + 1))) if classes is None else list(classes)
    pad = 2
    grid = sample_grid(dataset, per_class, classes, column, pad, seed)
    h = (grid.shape[0] - pad) // len(classes) - pad
    fig = px.imshow(grid)
    names = dataset.class_names[column] if dataset.class_names else [str(c) for c in classes]
    fig.update_yaxes(
        tickmode="array",
        tickvals=[pad + r * (h + pad) + h / 2 for r in range(len(classes))],
        ticktext=[names[c] for c in classes],
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(
        width=grid.shape[1] * scale + 200,
        height=grid.shape[0] * scale + 60,
        margin=dict(l=10, r=10, t=30, b=10),
        title=f"{dataset.name} ({dataset.split}): samples per {dataset.level_names[column]}",
    )
    return fig


def embedding_images(items) -> np.ndarray:
    """The raw images of an :class:`hapkit.data.EmbeddingSet` as a uint8 (N, H, W, 3) array."""
    if items.dataset is None:
        raise ValueError("this EmbeddingSet has no dataset to take images from")
    stored = getattr(items.dataset, "images", None)
    if isinstance(stored, np.ndarray) and stored.dtype == np.uint8 and stored.ndim == 4:
        return stored[items.indices]  # in-memory datasets: one fancy-indexing copy
    size = None
    out = []
    for i in items.indices:
        img = to_rgb_array(items.dataset.load_image(int(i)), size)
        size = size or img.shape[:2]
        out.append(img)
    return np.stack(out)
