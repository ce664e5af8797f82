"""The landmark recipes train on CPU: two steps of each on tiny SfM-120k / H-GLDv2 fixtures in the
real formats, evaluated with the revisited protocol on tiny ROxford5k / RParis6k fixtures; the
whitening learned after training is saved in the checkpoint and restored by load_model."""

import dataclasses
import math

import pytest
import torch

from hapkit.data import get_eval_sets
from hapkit.data.builder import recipe_transform
from hapkit.training.config import ConfigError
from hapkit.training.engine import Trainer
from hapkit.training.landmarks import embed_landmark_set
from hapkit.training.recipes import load_recipe
from hapkit.training.runs import evaluate_checkpoint, load_model
from hapkit.training.whitening import PCAWhitening
from landmark_fixtures import write_landmark_root

LANDMARK_RECIPES = ["roadmap_sfm120k", "happier_gldv2_hier", "listwise_ap_sfm120k"]
CPU = [  # the recipe's data and protocol, a network and images small enough for a CPU test
    "model.backbone=small_cnn", "model.width=4", "model.pretrained=false", "model.embedding_size=8",
    "data.batch_size=8", "data.samples_per_class=4", "data.num_workers=0", "data.train_transform.crop=16",
    "train.epochs=1", "train.device=cpu", "train.amp=none", "train.log_every=1", "eval.every=0",
]
SIZED = {  # recipes that resize the benchmark images get a smaller square; listwise AP keeps them native
    "roadmap_sfm120k": ["data.test_transform.resize=24", "data.eval_batch_size=8"],
    "happier_gldv2_hier": ["data.test_transform.resize=24", "data.eval_batch_size=8"],
    "listwise_ap_sfm120k": ["train.sub_batch=4"],  # multi-stage backprop, 4 images per pass
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Networks this small run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_landmark_root(tmp_path_factory.mktemp("landmarks"))


def cpu_recipe(name, root, *extra):
    return load_recipe(name, overrides=[*CPU, *SIZED[name], f"data.root={root}", *extra])


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    runs = {}
    for name in LANDMARK_RECIPES:
        trainer = Trainer(cpu_recipe(name, root), out_dir=tmp_path_factory.mktemp(name), progress=False)
        runs[name] = trainer, trainer.fit()
    return runs


@pytest.mark.parametrize("name", LANDMARK_RECIPES)
def test_two_steps_then_the_revisited_protocol(name, trained):
    trainer, result = trained[name]
    assert result.global_step == 2 and not result.interrupted
    metrics = result.metrics
    for city in ("roxford5k", "rparis6k"):
        for key in ("mAP@easy", "mAP@medium", "mAP@hard", "mP@1@medium", "mP@10@hard"):
            assert f"{city}/{key}" in metrics, key
        assert 0.0 <= metrics[f"{city}/mAP@medium"] <= 1.0
    assert metrics["overall/mAP@hard"] == pytest.approx((metrics["roxford5k/mAP@hard"] + metrics["rparis6k/mAP@hard"]) / 2)
    assert not any(k.startswith(("roxford5k/R@", "roxford5k/AP@")) for k in metrics)  # no label metrics
    logged = result.history.iloc[-1]
    assert logged["roxford5k/mAP@hard"] == metrics["roxford5k/mAP@hard"]  # in metrics.jsonl like the others
    assert isinstance(trainer.model.whitening, PCAWhitening) == (name == "listwise_ap_sfm120k")


def test_the_whitening_is_learned_saved_and_restored(trained, root):
    trainer, result = trained["listwise_ap_sfm120k"]
    cfg = trainer.cfg
    w = trainer.model.whitening
    assert float(w.power) == 0.25 and w.in_dim == 8 and trainer.model.embedding_size == w.out_dim
    (bench,) = get_eval_sets("roxford5k", root=root, transform=recipe_transform(cfg.data, train=False))
    before = embed_landmark_set(trainer.model.eval(), bench, batch_size=1, progress=False)
    model, loaded_cfg = load_model(result.run_dir)
    assert isinstance(model.whitening, PCAWhitening) and loaded_cfg.train.whitening.learn
    after = embed_landmark_set(model, bench, batch_size=1, progress=False)
    for part in ("query", "gallery"):
        assert torch.equal(before[part], after[part])
    torch.testing.assert_close(after["query"].norm(dim=1), torch.ones(3))
    # the checkpoint evaluates as the training did (whitened), and a finished run resumes whitened
    again = evaluate_checkpoint(result.run_dir, progress=False)
    assert {k: v for k, v in again.items() if not math.isnan(v)} == {
        k: v for k, v in result.metrics.items() if not math.isnan(v)}
    resumed = Trainer(cfg, out_dir=result.run_dir, progress=False)
    resumed.fit(resume=True)
    assert torch.equal(resumed.model.whitening.projection, w.projection)


def test_training_further_learns_the_whitening_again(root, tmp_path):
    cfg = cpu_recipe("listwise_ap_sfm120k", root, "train.whitening.dim=4", "eval.at_end=false")
    first = Trainer(cfg, out_dir=tmp_path, progress=False)
    first.fit()
    assert first.model.whitening.out_dim == 4

    cfg2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))  # train.epochs may change on resume
    second = Trainer(cfg2, out_dir=tmp_path, progress=False)
    seen = []
    real = second.learn_whitening
    second.learn_whitening = lambda: seen.append(type(second.model.whitening).__name__) or real()
    second.fit(resume=True)
    assert seen == ["Identity"]  # trained on without the old whitening, learned again at the end
    assert second.global_step == 4 and isinstance(second.model.whitening, PCAWhitening)


@pytest.mark.parametrize("override, message", [
    ("eval.query_expansion=[0,3]", "eval.query_expansion must be \\[k, alpha\\]"),
    ("eval.query_expansion=[2]", "eval.query_expansion must be \\[k, alpha\\]"),
    ("eval.query_expansion=[2.5,3]", "integer k"),
    ("eval.scales=[1,0]", "eval.scales must be a non-empty list of positive scales"),
    ("eval.scale_power=0", "eval.scale_power must be > 0"),
    ("train.whitening.power=-0.5", "train.whitening.power must be >= 0"),
    ("train.whitening.dim=0", "train.whitening.dim must be"),
    ("train.whitening.max_items=1", "train.whitening.max_items must be >= 2"),
    ("train.whitening.learn=maybe", "expected true or false"),
])
def test_bad_landmark_settings_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("listwise_ap_sfm120k", overrides=[override])


def test_query_expansion_and_scales_reach_the_evaluation(trained, root):
    from hapkit.training.engine import evaluate_model
    from hapkit.training.landmarks import evaluate_landmark_set

    trainer, _ = trained["roadmap_sfm120k"]
    sets = get_eval_sets("roxford5k", root=root, transform=recipe_transform(trainer.cfg.data, train=False))
    got = evaluate_model(trainer.model, sets, batch_size=8, progress=False, ks=(1, 5), scales=(1.0, 0.5),
                         scale_power=2.0, query_expansion=(2, 3.0))
    ref = evaluate_landmark_set(trainer.model, sets[0], batch_size=8, scales=(1.0, 0.5), power=2.0,
                                query_expansion=(2, 3.0), ks=(1, 5), progress=False)
    assert got == {f"roxford5k/{k}": v for k, v in ref.summary.items()}
