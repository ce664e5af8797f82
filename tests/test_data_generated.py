"""The embedded generated dataset: structure, determinism, rendering, cache."""

import time

import numpy as np
import pytest
import torch

from hapkit.data import generated as G
from hapkit.data import get_dataset, get_eval_sets
from hapkit.hierarchy import as_label_tensor

TINY = dict(images_per_class=3)


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


def test_class_structure_has_three_levels_and_enough_classes():
    table = G.class_table()
    assert len(table) >= 120
    assert len({r["shape"] for r in table}) == 16 and len({r["family"] for r in table}) == 4
    # every variant is a distinct (shape, colour, pattern)
    assert len({(r["shape"], r["colour"], r["pattern"]) for r in table}) == len(table)
    # within a shape, test variants need colour AND pattern to be told apart
    for s in range(16):
        test = [r for r in table if r["shape"] == s and r["split"] == "test"]
        assert len({r["colour"] for r in test}) == 2 and len({r["pattern"] for r in test}) == 2
    # every colour and pattern is seen in training
    train = [r for r in table if r["split"] == "train"]
    assert {r["colour"] for r in train} == set(range(len(G.COLOURS)))
    assert {r["pattern"] for r in train} == set(range(len(G.PATTERNS)))


def test_splits_have_disjoint_fine_classes_sharing_coarse_levels(cache):
    tr = get_dataset("generated", root=cache, split="train", **TINY)
    te = get_dataset("generated", root=cache, split="test", **TINY)
    assert tr.level_names == te.level_names == ["variant", "shape", "family"]
    assert not set(tr.class_names[0]) & set(te.class_names[0])
    assert tr.class_names[1] == te.class_names[1] and len(tr.class_names[1]) == 16
    assert tr.class_names[2] == te.class_names[2] and len(tr.class_names[2]) == 4
    assert len(tr.class_names[0]) + len(te.class_names[0]) >= 120
    for ds in (tr, te):
        assert ds.labels.dtype == np.int64 and ds.num_levels == 3
        as_label_tensor(ds.labels)  # raises unless the labels form a tree
        for c in range(3):  # re-indexed 0..n-1 per level
            assert np.array_equal(np.unique(ds.labels[:, c]), np.arange(ds.labels[:, c].max() + 1))
        # names agree with the labels: a variant's name starts with its shape's name
        for row in ds.labels[:: len(ds) // 7]:
            assert ds.class_names[0][row[0]].split("/")[0] == ds.class_names[1][row[1]]
        assert np.bincount(ds.labels[:, 0]).tolist() == [3] * 64


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = G.generate(seed=7, images_per_class=2)
    b = G.generate(seed=7, images_per_class=2)
    c = G.generate(seed=8, images_per_class=2)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes()
    assert a["train_images"].tobytes() != c["train_images"].tobytes()
    assert np.array_equal(a["train_classes"], c["train_classes"])
    # the rows are real RGB images, not blank
    img = a["train_images"]
    assert img.dtype == np.uint8 and img.shape[1:] == (32, 32, 3)
    assert img.reshape(len(img), -1).std(axis=1).min() > 10


def test_images_per_class_does_not_change_the_first_images():
    # parameters are drawn in one stream per split: sizes differ, classes are rendered in order
    a = G.generate(seed=1, images_per_class=2, image_size=48)
    assert a["test_images"].shape == (64 * 2, 48, 48, 3)


def _render_one(shape, colour, pattern, grey=0.5, size=32):
    params = dict(
        radius=np.array([0.35 * size]), cx=np.array([size / 2]), cy=np.array([size / 2]),
        angle=np.array([0.0]), aspect=np.array([1.0]), brightness=np.array([1.0]), grey=np.array([grey]),
        tint=np.zeros((1, 3)), grad_dir=np.array([0.0]), grad_amp=np.array([0.0]),
    )
    shapes = list(s for f in G.FAMILIES.values() for s in f)
    return G.render(
        np.array([shapes.index(shape)]), np.array([list(G.COLOURS).index(colour)]),
        np.array([G.PATTERNS.index(pattern)]), params, size, np.random.default_rng(0),
    )[0].astype(float) / 255


def test_renderer_draws_the_shape_colour_and_pattern():
    red = np.array(G.COLOURS["red"])
    disc = _render_one("disc", "red", "solid")
    ring = _render_one("ring", "red", "solid")
    centre = (slice(14, 18), slice(14, 18))
    assert np.abs(disc[centre].mean(axis=(0, 1)) - red).max() < 0.08  # filled with the colour
    assert np.abs(ring[centre].mean(axis=(0, 1)) - 0.5).max() < 0.08  # hole shows the grey background
    assert np.abs(disc[1, 1] - 0.5).max() < 0.15  # corner is background
    # pattern: horizontal stripes alternate dark/bright rows inside the shape, solid does not
    stripes = _render_one("square", "yellow", "stripes")[10:22, 16].mean(axis=1)
    solid = _render_one("square", "yellow", "solid")[10:22, 16].mean(axis=1)
    assert stripes.max() - stripes.min() > 0.3 > solid.max() - solid.min()
    # the triangle covers less of its box than the disc: shapes differ
    area = lambda img: (np.abs(img - 0.5).sum(axis=2) > 0.3).mean()  # noqa: E731
    assert area(_render_one("triangle", "blue", "solid")) < 0.8 * area(disc)


def test_dataset_items_and_transform(cache):
    ds = get_dataset("generated", root=cache, split="train", **TINY)
    x, y = ds[5]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, torch.from_numpy(ds.images[5]).permute(2, 0, 1).float() / 255)
    assert y.dtype == torch.int64 and y.tolist() == ds.labels[5].tolist()
    seen = []
    ds.transform = lambda img: seen.append(img) or img.float()
    ds[0]
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (3, 32, 32)


def test_cache_is_written_atomically_reused_and_keyed_by_version(cache, monkeypatch):
    calls = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = G.load_arrays(cache, images_per_class=1)
    path = G.cache_path(cache, images_per_class=1)
    assert path.exists() and f"v{G.GENERATOR_VERSION}" in path.name
    assert not list(cache.glob("*.tmp"))
    b = G.load_arrays(cache, images_per_class=1)
    assert len(calls) == 1 and np.array_equal(a["test_images"], b["test_images"])
    # a new generator version means a new key: rendered again, old file left alone
    monkeypatch.setattr(G, "GENERATOR_VERSION", G.GENERATOR_VERSION + 1)
    G.load_arrays(cache, images_per_class=1)
    assert len(calls) == 2 and G.cache_path(cache, images_per_class=1) != path
    # a file whose stored key does not match (or is corrupt) is re-rendered, not trusted
    G.cache_path(cache, images_per_class=1).write_bytes(b"not an npz")
    G.load_arrays(cache, images_per_class=1)
    assert len(calls) == 3


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HAPKIT_CACHE", str(tmp_path / "env"))
    get_dataset("generated", split="test", images_per_class=1)
    assert list((tmp_path / "env").glob("generated-v*.npz"))


def test_eval_sets_and_split_errors(cache):
    (es,) = get_eval_sets("generated", root=cache, **TINY)
    assert es.gallery is None and es.column is None and es.query.split == "test"
    with pytest.raises(ValueError, match="train"):
        get_dataset("generated", root=cache, split="val", **TINY)


@pytest.mark.slow
def test_full_size_generation_is_fast():
    start = time.perf_counter()
    arrays = G.generate()
    assert time.perf_counter() - start < 30
    assert arrays["train_images"].shape == (64 * 80, 32, 32, 3)
