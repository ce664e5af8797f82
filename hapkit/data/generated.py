"""The embedded generated hierarchical image dataset ("generated"): no download, CPU-sized.

Three levels, finest first:

- ``family`` (4): how a shape is built -- convex ``polygon``, spiky ``star``, curved ``round``,
  rectilinear ``bars``;
- ``shape`` (16, four per family): e.g. triangle / square / pentagon / hexagon;
- ``variant`` (128, eight per shape): the colour and surface pattern of the shape.

Each shape has 4 colours x 2 patterns. The variants of its first two colours are training
classes, those of its last two colours are test classes, so train and test have DISJOINT fine
classes that share every shape and family (as Stanford Online Products' test products share its
super-categories). Within a test shape, telling its 4 variants apart needs both colour and
pattern; every colour and pattern is seen in training on other shapes.

Every image is rendered from the seed with its own pose (rotation +-30 degrees, aspect), scale,
position, brightness, background (grey level, tint, gradient) and pixel noise, anti-aliased by
2x2 supersampling, as RGB uint8. Rendering is vectorised over images (numpy); the result is
cached as an ``.npz`` file keyed by :data:`GENERATOR_VERSION` and the parameters, written
atomically. Mistakes come in three severities: another variant of the right shape, another shape
of the right family, another family.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from hapkit.data.base import EvalSet, InMemoryImageDataset, default_cache_dir, reindex_levels

__all__ = [
    "GENERATOR_VERSION",
    "LEVEL_NAMES",
    "FAMILIES",
    "COLOURS",
    "PATTERNS",
    "class_table",
    "render",
    "generate",
    "load_arrays",
    "cache_path",
    "generated_dataset",
]

# Bump whenever the rendered pixels or the class structure change: it is part of the cache key.
GENERATOR_VERSION = 2

LEVEL_NAMES = ["variant", "shape", "family"]
SPLITS = ("train", "test")

FAMILIES: dict[str, list[str]] = {
    "polygon": ["triangle", "square", "pentagon", "hexagon"],
    "star": ["star3", "star4", "star5", "star6"],
    "round": ["disc", "ellipse", "half-disc", "ring"],
    "bars": ["plus", "tee", "ell", "equals"],
}
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.12),
    "green": (0.12, 0.72, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85),
    "pink": (1.00, 0.45, 0.75),
}
PATTERNS = ["solid", "stripes", "dots", "checker"]

_SHAPES = [s for shapes in FAMILIES.values() for s in shapes]
_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float32)
_CHUNK = 512  # images rendered at once; fixed so that the noise stream does not depend on it


def class_table() -> list[dict]:
    """One record per fine class: id, family, shape, colour, pattern, split (deterministic)."""
    rows = []
    for s, shape in enumerate(_SHAPES):
        family_id = s // 4
        # 4 colours two hue steps apart (clearly different), 2 distinct patterns per shape
        colours = [(s + 2 * j) % 8 for j in range(4)]
        patterns = [s % 4, (s % 4 + 1 + (s // 4) % 3) % 4]
        for j, c in enumerate(colours):
            for q, p in enumerate(patterns):
                rows.append(
                    dict(
                        fine=len(rows),
                        shape=s,
                        family=family_id,
                        colour=c,
                        pattern=p,
                        split="train" if j < 2 else "test",
                        name=f"{shape}/{_COLOUR_NAMES[c]}/{PATTERNS[p]}",
                        shape_name=shape,
                        family_name=list(FAMILIES)[family_id],
                    )
                )
    return rows


# ---------------------------------------------------------------- shape masks in local coordinates
# (u, v): shape frame, radius ~1, v pointing up. Each returns a boolean "inside" array.


def _polygon(n):
    def inside(u, v):
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        sector = 2 * np.pi / n
        rel = np.mod(phi - np.pi / 2 + np.pi / n, sector) - np.pi / n  # 0 at a vertex
        return rho * np.cos(np.abs(rel) - np.pi / n) <= np.cos(np.pi / n)

    return inside


def _star(n, inner=0.42):
    def inside(u, v):
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        sector = 2 * np.pi / n
        rel = np.abs(np.mod(phi - np.pi / 2 + np.pi / n, sector) - np.pi / n)  # 0 at a tip
        return rho <= inner + (1 - inner) * (1 - rel / (np.pi / n))

    return inside


def _bars(*boxes):
    """Union of axis-aligned boxes (u0, u1, v0, v1) in the shape frame."""

    def inside(u, v):
        out = np.zeros(u.shape, dtype=bool)
        for u0, u1, v0, v1 in boxes:
            out |= (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)
        return out

    return inside


_T = 0.5  # bar thickness
_MASKS: dict[str, Callable] = {
    "triangle": _polygon(3),
    "square": _polygon(4),
    "pentagon": _polygon(5),
    "hexagon": _polygon(6),
    "star3": _star(3, 0.35),
    "star4": _star(4),
    "star5": _star(5),
    "star6": _star(6, 0.5),
    "disc": lambda u, v: np.hypot(u, v) <= 0.9,
    "ellipse": lambda u, v: u**2 + (v / 0.5) ** 2 <= 1.0,
    "half-disc": lambda u, v: (u**2 + (v + 0.35) ** 2 <= 1.0) & (v >= -0.35),
    "ring": lambda u, v: (np.hypot(u, v) <= 1.0) & (np.hypot(u, v) >= 0.55),
    "plus": _bars((-_T / 2, _T / 2, -1, 1), (-1, 1, -_T / 2, _T / 2)),
    "tee": _bars((-1, 1, 1 - _T, 1), (-_T / 2, _T / 2, -1, 1)),
    "ell": _bars((-0.8, -0.8 + _T, -1, 1), (-0.8, 0.9, -1, -1 + _T)),
    "equals": _bars((-1, 1, 0.45 - _T / 2, 0.45 + _T / 2), (-1, 1, -0.45 - _T / 2, -0.45 + _T / 2)),
}

_PERIOD = 0.5  # pattern period in shape units (~5 px at 32 px)


def _pattern(p: int, u, v):
    """Fraction of darkening (0 or 1) of pattern ``p`` at local coordinates (u, v)."""
    if p == 0:
        return np.zeros(u.shape, dtype=np.float32)
    if p == 1:  # horizontal stripes in the shape frame (unchanged by a horizontal flip)
        return (np.floor(v / (_PERIOD / 2)) % 2).astype(np.float32)
    if p == 2:
        du = u / _PERIOD - np.round(u / _PERIOD)
        dv = v / _PERIOD - np.round(v / _PERIOD)
        return (du**2 + dv**2 < 0.3**2).astype(np.float32)
    return ((np.floor(u / (_PERIOD / 2)) + np.floor(v / (_PERIOD / 2))) % 2).astype(np.float32)


# ---------------------------------------------------------------- rendering


def _draw_params(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    r = rng.uniform(0.26, 0.38, n) * size
    margin = 0.5 * size - r
    return dict(
        radius=r,
        cx=0.5 * size + rng.uniform(-0.7, 0.7, n) * margin,
        cy=0.5 * size + rng.uniform(-0.7, 0.7, n) * margin,
        angle=rng.uniform(-np.pi / 6, np.pi / 6, n),
        aspect=np.exp(rng.uniform(-0.12, 0.12, n)),
        brightness=rng.uniform(0.75, 1.05, n),
        grey=rng.uniform(0.2, 0.8, n),
        tint=rng.normal(0.0, 0.05, (n, 3)),
        grad_dir=rng.uniform(0, 2 * np.pi, n),
        grad_amp=rng.uniform(0.0, 0.25, n),
    )


def render(
    shapes: np.ndarray,
    colours: np.ndarray,
    patterns: np.ndarray,
    params: dict[str, np.ndarray],
    size: int,
    noise_rng: np.random.Generator,
    supersample: int = 2,
) -> np.ndarray:
    """Render one chunk of images; returns uint8 (n, size, size, 3).

    ``shapes``, ``colours``, ``patterns``: integer arrays (n,) indexing :data:`FAMILIES`' shapes
    (flattened), :data:`COLOURS` and :data:`PATTERNS`; ``params`` as drawn by ``_draw_params``.
    """
    n = len(shapes)
    S = size * supersample
    coords = (np.arange(S, dtype=np.float32) + 0.5) / supersample  # pixel units
    x = coords[None, None, :]
    y = coords[None, :, None]

    def col(values):  # per-image parameter -> (n, 1, 1) for broadcasting over pixels
        return np.asarray(values, dtype=np.float32)[:, None, None]

    dx, dy = x - col(params["cx"]), y - col(params["cy"])
    cos, sin = col(np.cos(params["angle"])), col(np.sin(params["angle"]))
    r = col(params["radius"])
    aspect = col(params["aspect"])
    u = (cos * dx + sin * dy) / (r * aspect)
    v = -(-sin * dx + cos * dy) * aspect / r  # image y points down, the shape frame's v points up

    mask = np.zeros((n, S, S), dtype=np.float32)
    dark = np.zeros((n, S, S), dtype=np.float32)
    for s in np.unique(shapes):
        idx = np.nonzero(shapes == s)[0]
        mask[idx] = _MASKS[_SHAPES[s]](u[idx], v[idx])
    for p in np.unique(patterns):
        idx = np.nonzero(patterns == p)[0]
        dark[idx] = _pattern(int(p), u[idx], v[idx])

    # coverage of each output pixel by the shape and by its dark pattern (2x2 supersampling)
    def pool(arr):  # mean over k x k blocks; strided sums are much faster than mean(axis=(2, 4))
        k = supersample
        return sum(arr[:, i::k, j::k] for i in range(k) for j in range(k)) / np.float32(k * k)

    cover = pool(mask)
    cover_dark = pool(mask * dark)

    # background: grey level + small tint + linear gradient in a random direction (smooth, so it
    # is evaluated at output resolution)
    xo = (np.arange(size, dtype=np.float32) + 0.5)[None, None, :]
    yo = (np.arange(size, dtype=np.float32) + 0.5)[None, :, None]
    gx = col(np.cos(params["grad_dir"])) * (xo / size - 0.5)
    gy = col(np.sin(params["grad_dir"])) * (yo / size - 0.5)
    shade = col(params["grey"]) + col(params["grad_amp"]) * (gx + gy)  # (n, size, size)
    tint = np.asarray(params["tint"], dtype=np.float32)[:, None, None, :]
    background = shade[..., None] + tint
    fg_rgb = _COLOUR_RGB[colours] * np.asarray(params["brightness"], dtype=np.float32)[:, None]
    fg_rgb = fg_rgb[:, None, None, :]
    # pattern pixels are the colour darkened to 40%
    img = background * (1.0 - cover[..., None]) + fg_rgb * (cover - 0.6 * cover_dark)[..., None]
    img += noise_rng.normal(0.0, 0.04, img.shape).astype(np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def generate(
    seed: int = 0, image_size: int = 32, images_per_class: int = 80, progress: bool = False
) -> dict[str, np.ndarray]:
    """Render both splits; returns ``{split}_images`` (N, H, W, 3) uint8 and ``{split}_classes``
    (N,) int64 global fine-class ids (rows of :func:`class_table`), class-major order."""
    from tqdm.auto import tqdm

    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    table = class_table()
    out: dict[str, np.ndarray] = {}
    for code, split in enumerate(SPLITS):
        classes = np.array([c["fine"] for c in table if c["split"] == split], dtype=np.int64)
        fine = np.repeat(classes, images_per_class)
        shapes = np.array([table[f]["shape"] for f in fine], dtype=np.int64)
        colours = np.array([table[f]["colour"] for f in fine], dtype=np.int64)
        patterns = np.array([table[f]["pattern"] for f in fine], dtype=np.int64)
        params = _draw_params(np.random.default_rng([seed, code]), len(fine), image_size)
        images = np.empty((len(fine), image_size, image_size, 3), dtype=np.uint8)
        starts = range(0, len(fine), _CHUNK)
        for k, start in enumerate(tqdm(starts, desc=f"rendering {split}", disable=not progress)):
            sl = slice(start, start + _CHUNK)
            images[sl] = render(
                shapes[sl],
                colours[sl],
                patterns[sl],
                {name: val[sl] for name, val in params.items()},
                image_size,
                np.random.default_rng([seed, code, 1000 + k]),
            )
        out[f"{split}_images"] = images
        out[f"{split}_classes"] = fine
    return out


def cache_path(root=None, seed: int = 0, image_size: int = 32, images_per_class: int = 80) -> Path:
    """Where the arrays for these parameters are cached (the version is part of the name)."""
    root = Path(root).expanduser() if root is not None else default_cache_dir()
    return root / f"generated-v{GENERATOR_VERSION}-seed{seed}-px{image_size}-n{images_per_class}.npz"


def load_arrays(
    root=None,
    seed: int = 0,
    image_size: int = 32,
    images_per_class: int = 80,
    progress: bool = False,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """The rendered arrays, from the cache when present (rendering and caching them otherwise)."""
    path = cache_path(root, seed, image_size, images_per_class)
    key = np.array([GENERATOR_VERSION, seed, image_size, images_per_class], dtype=np.int64)
    if use_cache and path.exists():
        try:
            with np.load(path) as f:
                if np.array_equal(f["key"], key):
                    return {k: f[k] for k in f.files if k != "key"}
        except (OSError, ValueError, KeyError, EOFError):
            pass  # unreadable or foreign file: render again and overwrite it
    arrays = generate(seed, image_size, images_per_class, progress=progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        # temp file in the same directory then rename: readers never see a half-written cache
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, key=key, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return arrays


def generated_dataset(
    root=None,
    split: str = "train",
    transform: Callable | None = None,
    seed: int = 0,
    image_size: int = 32,
    images_per_class: int = 80,
    progress: bool = False,
    use_cache: bool = True,
) -> InMemoryImageDataset:
    """The generated dataset as a :class:`~hapkit.data.base.InMemoryImageDataset`.

    Defaults: 32 px, 80 images per fine class, i.e. 5,120 train images (64 fine classes) and
    5,120 test images (64 other fine classes); both share the 16 shapes and 4 families. ``root``
    is the cache directory (default ``$HAPKIT_CACHE`` or ``~/.cache/hapkit``).
    """
    if split not in SPLITS:
        raise ValueError(f"generated dataset: unknown split {split!r}; choose one of {SPLITS}")
    arrays = load_arrays(root, seed, image_size, images_per_class, progress, use_cache)
    table = class_table()
    fine = arrays[f"{split}_classes"]
    raw = np.stack(
        [fine, [table[f]["shape"] for f in fine], [table[f]["family"] for f in fine]], axis=1
    )
    # each level re-indexed 0..n-1 within the split (sorted raw ids keep the shape/family order)
    labels, names = reindex_levels(
        raw,
        [
            {r["fine"]: r["name"] for r in table},
            dict(enumerate(_SHAPES)),
            dict(enumerate(FAMILIES)),
        ],
    )
    return InMemoryImageDataset(
        arrays[f"{split}_images"],
        labels,
        name="generated",
        split=split,
        level_names=LEVEL_NAMES,
        class_names=names,
        transform=transform,
    )


# ---------------------------------------------------------------- registry entry points


def load(root=None, split: str = "train", transform: Callable | None = None, **options) -> InMemoryImageDataset:
    """Registry loader: :func:`generated_dataset` (``root`` is the cache directory)."""
    return generated_dataset(root=root, split=split, transform=transform, **options)


def eval_sets(root=None, transform: Callable | None = None, **options) -> list[EvalSet]:
    """Same-set protocol on the test split (64 fine classes unseen in training), every level."""
    return [EvalSet("test", load(root, "test", transform, **options))]
