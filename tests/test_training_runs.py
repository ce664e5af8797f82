"""Cached training runs for the notebooks: trained, cached and initial embeddings, checkpoints."""

import numpy as np
import pytest
import torch

import hapkit.training.engine
from hapkit.data import get_dataset, spread_indices
from hapkit.data.transforms import build_transforms
from hapkit.training import runs
from hapkit.training.checkpoint import CheckpointError
from hapkit.viz.images import embedding_images

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
    real_train = hapkit.training.engine.train

    def counting_train(*args, **kwargs):
        calls.append(kwargs.get("out_dir"))
        return real_train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hapkit.training.engine, "train", counting_train)
        first = runs.trained_embeddings(
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


def test_resolve_recipe_and_run_key():
    cfg = runs.resolve_recipe("happier_generated", epochs=3, seed=5, overrides=["optim.lr=0.01"])
    assert (cfg.train.epochs, cfg.seed, cfg.optim.lr) == (3, 5, 0.01)
    assert cfg.eval.every == 0 and cfg.eval.at_end is False  # the notebooks evaluate themselves
    key = runs.run_key(cfg)
    assert key.startswith("happier_generated-e3-seed5-")
    assert runs.run_key(runs.resolve_recipe("happier_generated", 3, 5, ["optim.lr=0.01"])) == key
    assert runs.run_key(runs.resolve_recipe("happier_generated", 3, 5, ["optim.lr=0.02"])) != key
    assert runs.run_key(cfg, {"images_per_class": 4}) != key
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        runs.resolve_recipe("happier_generated", epochs=0)


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
    model, cfg = runs.load_model(run_dir / "checkpoint.pt")
    assert cfg.train.epochs == 1 and cfg.model.width == 4
    ref, ref_labels = reference_embeddings(model, first.indices, root / "data")
    np.testing.assert_allclose(first.embeddings, ref, atol=1e-6)
    np.testing.assert_array_equal(first.labels, ref_labels)
    np.testing.assert_array_equal(first.indices, spread_indices(len(first.dataset), 100))
    assert len(first.dataset) == 256  # 64 test variants x 4 images
    names = first.label_names()
    assert names["shape"].iloc[0] == first.dataset.class_names[1][first.labels[0, 1]]
    np.testing.assert_array_equal(embedding_images(first)[3], first.dataset.images[first.indices[3]])


def test_second_request_reuses_the_cache_and_other_keys_train_again(store, monkeypatch):
    monkeypatch.setattr(hapkit.training.engine, "train", store["counting_train"])
    n = len(store["calls"])
    again = runs.trained_embeddings(epochs=1, seed=0, **kwargs(store))
    assert len(store["calls"]) == n  # nothing trained
    np.testing.assert_array_equal(again.embeddings, store["first"].embeddings)
    assert again.run_dir == store["first"].run_dir
    # more items from the same run: embedded, not trained
    more = runs.trained_embeddings(epochs=1, seed=0, **kwargs(store, max_items=150))
    assert len(store["calls"]) == n and len(more) == 150
    # a damaged cache file is embedded again (same numbers), not trusted
    cached = next(store["first"].run_dir.glob("embeddings-trained-test-n100.npz"))
    cached.write_bytes(b"not an npz")
    repaired = runs.trained_embeddings(epochs=1, seed=0, **kwargs(store))
    assert len(store["calls"]) == n
    np.testing.assert_allclose(repaired.embeddings, store["first"].embeddings, atol=1e-6)
    with np.load(cached) as f:
        assert f["embeddings"].shape == (100, 8)
    # from the checkpoint directly
    direct = runs.trained_embeddings(checkpoint=store["first"].run_dir / "checkpoint.pt", **kwargs(store))
    np.testing.assert_allclose(direct.embeddings, store["first"].embeddings, atol=1e-6)
    assert direct.source == "checkpoint"
    # another seed is another run
    other = runs.trained_embeddings(epochs=1, seed=1, **kwargs(store))
    assert len(store["calls"]) == n + 1 and other.run_dir != store["first"].run_dir
    assert not np.allclose(other.embeddings, store["first"].embeddings)


def test_failed_training_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        (kwargs["out_dir"] / "checkpoint.pt").write_bytes(b"half")
        raise RuntimeError("diverged")

    monkeypatch.setattr(hapkit.training.engine, "train", broken)
    cfg = runs.resolve_recipe("happier_generated", 1, 0, TINY)
    with pytest.raises(RuntimeError, match="diverged"):
        runs.train_cached(cfg, tmp_path)
    assert list((tmp_path / "runs").iterdir()) == []


def test_untrained_embeddings_are_the_initial_network(store, tmp_path):
    from hapkit.training.engine import Trainer

    init = runs.untrained_embeddings(seed=0, **kwargs(store))
    assert init.source == "initial" and init.run_dir.name.endswith("-init")
    np.testing.assert_array_equal(init.indices, store["first"].indices)
    # the Trainer starts from exactly these weights
    cfg = runs.resolve_recipe("happier_generated", 1, 0, TINY)
    train_set = get_dataset("generated", root=store["root"] / "data", split="train", **OPTIONS)
    trainer = Trainer(cfg, out_dir=tmp_path, train_set=train_set, progress=False)
    model = runs.initial_model(cfg)
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
    runs.initial_model(cfg)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_load_model_rejects_foreign_files(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a hapkit training checkpoint"):
        runs.load_model(path)
    with pytest.raises(FileNotFoundError):
        runs.load_model(tmp_path / "missing.pt")


def test_a_finished_grid_run_is_read_instead_of_trained(store, tmp_path):
    from hapkit.results import write_metrics

    grid = tmp_path / "runs" / "happier_generated" / "seed0"
    assert runs.grid_run(tmp_path / "runs", "happier_generated", 0) is None
    grid.mkdir(parents=True)
    (grid / "checkpoint.pt").write_bytes((store["first"].run_dir / "checkpoint.pt").read_bytes())
    assert runs.grid_run(tmp_path / "runs", "happier_generated", 0) is None  # not finished: no metrics.json
    write_metrics(grid, {"test/H-AP": 0.5})
    assert runs.grid_run(tmp_path / "runs", "happier_generated", 0) == grid
    assert runs.grid_run(tmp_path / "runs", "happier_generated", 1) is None

    n = len(store["calls"])
    # any training length: the grid's run is the one used
    read = runs.trained_embeddings(epochs=7, seed=0, runs_dir=tmp_path / "runs", **kwargs(store))
    assert len(store["calls"]) == n and read.source == "checkpoint" and read.run_dir == grid
    np.testing.assert_allclose(read.embeddings, store["first"].embeddings, atol=1e-6)
    assert list(grid.glob("embeddings-checkpoint-*-test-n100.npz"))  # cached beside the grid's run
    # a grid without that seed: trained (here: found in the cache) as without runs_dir
    other = runs.trained_embeddings(epochs=1, seed=0, runs_dir=tmp_path / "elsewhere", **kwargs(store))
    assert other.source == "trained" and len(store["calls"]) == n
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        runs.trained_embeddings(checkpoint=tmp_path / "missing.pt", **kwargs(store))


@pytest.mark.slow
def test_cached_grid_writes_the_layout_of_the_batch_grid(tmp_path):
    from hapkit.results import collect_runs, summarize

    out = tmp_path / "results"
    folders = runs.cached_grid(["happier_generated", "supap_generated"], seeds=[0], epochs=1, out=out,
                               cache_dir=tmp_path / "cache", overrides=TINY, data_root=tmp_path / "data",
                               dataset_options=OPTIONS, progress=False)
    assert folders == [out / "runs" / "happier_generated" / "seed0", out / "runs" / "supap_generated" / "seed0"]
    table = collect_runs(out)
    assert table["method"].tolist() == ["happier", "supap"] and set(table["dataset"]) == {"generated"}
    assert table["epochs"].tolist() == [1, 1] and (table["duration_s"] > 0).all()
    # the metrics are the checkpoint's evaluation under its recipe's protocol
    again = runs.evaluate_checkpoint(next((tmp_path / "cache" / "runs").glob("happier*")), data_root=tmp_path / "data",
                                     dataset_options=OPTIONS, progress=False)
    assert table.loc[0, "metric:test/H-AP"] == pytest.approx(again["test/H-AP"], abs=1e-9)
    assert table.loc[0, "H-AP"] == pytest.approx(again["test/H-AP"], abs=1e-9)
    assert summarize(table)["seeds"].tolist() == [1, 1]
    # a second call trains nothing
    calls = []
    real = hapkit.training.engine.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hapkit.training.engine, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
        runs.cached_grid(["happier_generated"], seeds=[0], epochs=1, out=out, cache_dir=tmp_path / "cache",
                         overrides=TINY, data_root=tmp_path / "data", dataset_options=OPTIONS, progress=False)
    assert calls == []


def test_load_loss_gives_the_trained_loss_of_a_run(store):
    run_dir = store["first"].run_dir
    loss, cfg = runs.load_loss(run_dir, data_root=store["root"] / "data", dataset_options=OPTIONS)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["loss"]
    assert cfg.name == "happier_generated" and not loss.training
    assert saved and all(torch.equal(loss.state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(FileNotFoundError):
        runs.load_loss(store["root"] / "nowhere")
