"""Embeddings for the notebooks (trained, cached, initial), UMAP projections and their figures."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import hapkit.engine
from hapkit import embedding_space as es
from hapkit.data import get_dataset
from hapkit.data.transforms import build_transforms
from hapkit.evaluate import evaluate

# A tiny network, batches and generated dataset (4 images per fine class): seconds on a CPU.
TINY = [
    "model.width=4", "model.embedding_size=8", "data.batch_size=16", "data.batches_per_super_tuple=1",
    "data.eval_batch_size=64", "train.device=cpu", "train.amp=none",
]
OPTIONS = {"images_per_class": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A cache folder holding one tiny trained run, and the number of training calls made."""
    root = tmp_path_factory.mktemp("cache")
    calls = []
    real_train = hapkit.engine.train

    def counting_train(*args, **kwargs):
        calls.append(kwargs.get("out_dir"))
        return real_train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hapkit.engine, "train", counting_train)
        first = es.trained_embeddings(
            epochs=1, seed=0, cache_dir=root, overrides=TINY, data_root=root / "data",
            dataset_options=OPTIONS, max_items=100, progress=False,
        )
    return dict(root=root, calls=calls, first=first, counting_train=counting_train)


def kwargs(store, **extra):
    base = dict(cache_dir=store["root"], overrides=TINY, data_root=store["root"] / "data", dataset_options=OPTIONS,
                max_items=100, progress=False)
    base.update(extra)
    return base


def reference_embeddings(model, indices, root):
    """Embed the chosen test images by hand: test transform, eval mode, one batch."""
    raw = get_dataset("generated", root=root, split="test", **OPTIONS)
    tf = build_transforms("generated", train=False)
    batch = torch.stack([tf(raw.load_image(int(i))) for i in indices])
    with torch.no_grad():
        return model.eval()(batch).numpy(), raw.labels[indices]


# ------------------------------------------------------------------------------ small helpers


def test_spread_indices_and_label_frame():
    assert es.spread_indices(10, None).tolist() == list(range(10))
    assert es.spread_indices(10, 50).tolist() == list(range(10))
    idx = es.spread_indices(1000, 100)
    assert len(idx) == 100 and idx[0] == 0 and idx[-1] == 999 and np.all(np.diff(idx) >= 9)
    with pytest.raises(ValueError, match="at least 1"):
        es.spread_indices(10, 0)
    labels = np.array([[0, 1], [1, 1], [2, 0]])
    frame = es.label_frame(labels, ["fine", "coarse"], [["a", "b", "c"], ["x", "y"]])
    assert frame.to_dict("list") == {"fine": ["a", "b", "c"], "coarse": ["y", "y", "x"]}
    assert es.label_frame(labels).columns.tolist() == ["level 0", "level 1"]
    with pytest.raises(ValueError, match="level name"):
        es.label_frame(labels, ["only one"])


def test_to_rgb_array_accepts_tensors_pil_and_floats():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(es.to_rgb_array(torch.from_numpy(img).permute(2, 0, 1)), img)
    np.testing.assert_array_equal(es.to_rgb_array(Image.fromarray(img)), img)
    np.testing.assert_array_equal(es.to_rgb_array(img.astype(np.float32) / 255.0), img)
    grey = es.to_rgb_array(img[:, :, 0])
    assert grey.shape == (5, 7, 3) and np.array_equal(grey[:, :, 2], img[:, :, 0])


def test_resolve_recipe_and_run_key():
    cfg = es.resolve_recipe("happier_generated", epochs=3, seed=5, overrides=["optim.lr=0.01"])
    assert (cfg.train.epochs, cfg.seed, cfg.optim.lr) == (3, 5, 0.01)
    assert cfg.eval.every == 0 and cfg.eval.at_end is False  # the notebooks evaluate themselves
    key = es.run_key(cfg)
    assert key.startswith("happier_generated-e3-seed5-")
    assert es.run_key(es.resolve_recipe("happier_generated", 3, 5, ["optim.lr=0.01"])) == key
    assert es.run_key(es.resolve_recipe("happier_generated", 3, 5, ["optim.lr=0.02"])) != key
    assert es.run_key(cfg, {"images_per_class": 4}) != key
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        es.resolve_recipe("happier_generated", epochs=0)


# --------------------------------------------------------------------- trained embeddings


def test_trained_embeddings_match_the_checkpoint_model(store):
    first, root = store["first"], store["root"]
    assert len(store["calls"]) == 1
    run_dir = first.run_dir
    assert run_dir.parent == root / "runs" and (run_dir / "checkpoint.pt").is_file()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 1  # one epoch
    assert not list((root / "runs").glob("*.partial-*"))
    assert first.embeddings.shape == (100, 8) and first.embeddings.dtype == np.float32
    assert first.level_names == ["variant", "shape", "family"] and first.source == "trained"
    # the same numbers as embedding the images by hand with the checkpoint's weights
    model, cfg = es.load_model(run_dir / "checkpoint.pt")
    assert cfg.train.epochs == 1 and cfg.model.width == 4
    ref, ref_labels = reference_embeddings(model, first.indices, root / "data")
    np.testing.assert_allclose(first.embeddings, ref, atol=1e-6)
    np.testing.assert_array_equal(first.labels, ref_labels)
    np.testing.assert_array_equal(first.indices, es.spread_indices(len(first.dataset), 100))
    assert len(first.dataset) == 256  # 64 test variants x 4 images
    names = first.label_names()
    assert names["shape"].iloc[0] == first.dataset.class_names[1][first.labels[0, 1]]
    np.testing.assert_array_equal(first.images()[3], first.dataset.images[first.indices[3]])


def test_second_request_reuses_the_cache_and_other_keys_train_again(store, monkeypatch):
    monkeypatch.setattr(hapkit.engine, "train", store["counting_train"])
    n = len(store["calls"])
    again = es.trained_embeddings(epochs=1, seed=0, **kwargs(store))
    assert len(store["calls"]) == n  # nothing trained
    np.testing.assert_array_equal(again.embeddings, store["first"].embeddings)
    assert again.run_dir == store["first"].run_dir
    # more items from the same run: embedded, not trained
    more = es.trained_embeddings(epochs=1, seed=0, **kwargs(store, max_items=150))
    assert len(store["calls"]) == n and len(more) == 150
    # a damaged cache file is embedded again (same numbers), not trusted
    cached = next(store["first"].run_dir.glob("embeddings-trained-test-n100.npz"))
    cached.write_bytes(b"not an npz")
    repaired = es.trained_embeddings(epochs=1, seed=0, **kwargs(store))
    assert len(store["calls"]) == n
    np.testing.assert_allclose(repaired.embeddings, store["first"].embeddings, atol=1e-6)
    with np.load(cached) as f:
        assert f["embeddings"].shape == (100, 8)
    # from the checkpoint directly
    direct = es.trained_embeddings(checkpoint=store["first"].run_dir / "checkpoint.pt", **kwargs(store))
    np.testing.assert_allclose(direct.embeddings, store["first"].embeddings, atol=1e-6)
    assert direct.source == "checkpoint"
    # another seed is another run
    other = es.trained_embeddings(epochs=1, seed=1, **kwargs(store))
    assert len(store["calls"]) == n + 1 and other.run_dir != store["first"].run_dir
    assert not np.allclose(other.embeddings, store["first"].embeddings)


def test_failed_training_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        (kwargs["out_dir"] / "checkpoint.pt").write_bytes(b"half")
        raise RuntimeError("diverged")

    monkeypatch.setattr(hapkit.engine, "train", broken)
    cfg = es.resolve_recipe("happier_generated", 1, 0, TINY)
    with pytest.raises(RuntimeError, match="diverged"):
        es.train_cached(cfg, tmp_path)
    assert list((tmp_path / "runs").iterdir()) == []


def test_untrained_embeddings_are_the_initial_network(store, tmp_path):
    from hapkit.engine import Trainer

    init = es.untrained_embeddings(seed=0, **kwargs(store))
    assert init.source == "initial" and init.run_dir.name.endswith("-init")
    np.testing.assert_array_equal(init.indices, store["first"].indices)
    # the Trainer starts from exactly these weights
    cfg = es.resolve_recipe("happier_generated", 1, 0, TINY)
    train_set = get_dataset("generated", root=store["root"] / "data", split="train", **OPTIONS)
    trainer = Trainer(cfg, out_dir=tmp_path, train_set=train_set, progress=False)
    model = es.initial_model(cfg)
    for (k, a), b in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    ref, _ = reference_embeddings(model, init.indices, store["root"] / "data")
    np.testing.assert_allclose(init.embeddings, ref, atol=1e-6)
    assert not np.allclose(init.embeddings, store["first"].embeddings, atol=1e-3)
    # the global random state is left alone
    torch.manual_seed(123)
    np.random.seed(7)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(7)
    es.initial_model(cfg)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_load_model_rejects_foreign_files(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a hapkit training checkpoint"):
        es.load_model(path)
    with pytest.raises(FileNotFoundError):
        es.load_model(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------- projections


def blobs(n_per=30, k=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 5
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.slow
def test_umap_projection_is_deterministic_and_keeps_clusters():
    x, labels = blobs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no n_jobs / random_state warning
        a = es.umap_projection(x, n_epochs=60, random_state=3)
    b = es.umap_projection(x, n_epochs=60, random_state=3)
    assert a.shape == (90, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # nearest neighbour in 2-D (brute force) is in the same cluster
    d = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.95


def test_umap_projection_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        es.umap_projection(np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        es.umap_projection(np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match="at least 4"):
        es.umap_projection(np.zeros((3, 3)))


def test_projection_frame_and_figure():
    labels = np.array([[0, 0], [1, 0], [2, 1], [3, 1]])
    names = [["a", "b", "c", "d"], ["X", "Y"]]
    coords = np.arange(8.0).reshape(4, 2)
    frame = es.projection_frame(coords, labels=labels, level_names=["fine", "coarse"], class_names=names)
    assert frame.columns.tolist() == ["x", "y", "item", "fine", "coarse"]
    assert frame["coarse"].tolist() == ["X", "X", "Y", "Y"] and frame["item"].tolist() == [0, 1, 2, 3]
    fig = es.embedding_figure(frame, color="coarse")
    assert [t.name for t in fig.data] == ["X", "Y"] and [len(t.x) for t in fig.data] == [2, 2]
    assert "fine" in fig.data[0].hovertemplate and "coarse" in fig.data[0].hovertemplate
    assert fig.layout.showlegend
    both = pd.concat([frame.assign(model="trained"), frame.assign(model="initial")], ignore_index=True)
    fig = es.embedding_figure(both, color="fine", facet="model", legend_max=3)
    assert not fig.layout.showlegend  # 4 classes > legend_max
    assert {a.text for a in fig.layout.annotations} == {"trained", "initial"}
    assert fig.layout.xaxis2.matches is None  # each model keeps its own axes
    with pytest.raises(ValueError, match="no column 'shape'"):
        es.embedding_figure(frame, color="shape")
    with pytest.raises(ValueError, match="4 projected points but 3"):
        es.projection_frame(coords, labels=labels[:3])


def test_projection_mosaic_picks_the_point_nearest_each_cell_centre():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 1, size=(60, 2))
    coords[0], coords[1] = (0, 0), (1, 1)  # span exactly [0, 1]^2
    images = rng.integers(0, 256, size=(60, 4, 5, 3), dtype=np.uint8)
    grid, pad = 4, 1
    out = es.projection_mosaic(coords, images, grid=grid, pad=pad)
    assert out.shape == (grid * 5 + 1, grid * 6 + 1, 3)
    for gx in range(grid):
        for gy in range(grid):
            inside = [i for i in range(60)
                      if min(int(coords[i, 0] * grid), grid - 1) == gx and min(int(coords[i, 1] * grid), grid - 1) == gy]
            row = grid - 1 - gy
            tile = out[pad + row * 5 : pad + row * 5 + 4, pad + gx * 6 : pad + gx * 6 + 5]
            if not inside:
                assert (tile == 255).all()
                continue
            centre = np.array([(gx + 0.5) / grid, (gy + 0.5) / grid])
            best = min(inside, key=lambda i: (((coords[i] - centre) ** 2).sum(), i))
            np.testing.assert_array_equal(tile, images[best])
    fig = es.mosaic_figure(coords, images, grid=grid)
    assert fig.data[0].source.startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match="uint8"):
        es.projection_mosaic(coords, images.astype(np.float32))


# -------------------------------------------------------------------------------- metrics


def test_metrics_table_and_write_metrics(tmp_path):
    x, labels = blobs(n_per=6, k=4)
    labels = np.stack([labels, labels // 2], 1)
    a = evaluate(x, labels, progress=False)
    b = evaluate(np.roll(x, 1, axis=0), labels, progress=False)
    table = es.metrics_table({"good": a, "shuffled": b.summary}, ["fine", "coarse"])
    assert table.columns.tolist() == ["good", "shuffled"]
    assert table.index.tolist() == ["H-AP", "ASI", "NDCG", "AP@fine", "AP@coarse", "R@1@fine", "R@1@coarse"]
    assert table.loc["AP@coarse", "good"] == round(100 * a.summary["AP@1"], 2)
    assert table.loc["H-AP", "shuffled"] == round(100 * b.summary["H-AP"], 2)
    with pytest.raises(ValueError, match="no metric matches"):
        es.metrics_table({"good": a}, metrics=["recall"])

    path = es.write_metrics(tmp_path / "out", {"good/H-AP": np.float64(0.5)}, seed=np.int64(3), run=tmp_path,
                            levels=("fine", "coarse"))
    data = json.loads(path.read_text())
    assert data == {"seed": 3, "run": str(tmp_path), "levels": ["fine", "coarse"], "metrics": {"good/H-AP": 0.5}}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
