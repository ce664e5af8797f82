"""SupRank's recall@k and NDCG recipes on the generated dataset: they load, build the SupRank loss
with the settings of the official configurations, and train a couple of steps."""

import numpy as np
import pytest

from hapkit.losses import SupNDCG, SupRecall
from hapkit.training.engine import Trainer
from hapkit.training.recipes import load_recipe, recipe_path, resolve_name

# elias-ramzi/SupRank, suprank/config/loss/suprecall.yaml and supndcg.yaml
STEP = {"tau": 0.01, "rho": 100.0, "delta": 0.05, "start": 0.5, "offset": 1.44}
OFFICIAL = {
    "suprecall_generated": (SupRecall, {**STEP, "ks": (1, 2, 4, 8, 16), "temp": 1.0, "column": 0}),
    "supndcg_generated": (SupNDCG, STEP),
}
SMALL = [  # a couple of steps: two families per batch, one batch per pair of families, a narrow network
    "model.width=4", "model.embedding_size=16", "data.batch_size=32", "data.batches_per_super_tuple=1",
    "train.epochs=1", "train.device=cpu", "train.amp=none", "eval.every=0", "eval.at_end=false",
]


def test_methods_resolve_to_the_recipes():
    assert resolve_name("suprecall", "generated") == "suprecall_generated"
    assert resolve_name("supndcg", "generated") == "supndcg_generated"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_differs_from_happier_by_its_loss_only(name):
    cfg, base = load_recipe(name), load_recipe("happier_generated")
    assert cfg.method == name.removesuffix("_generated")
    for section in ("data", "model", "optim", "train", "eval"):
        assert getattr(cfg, section) == getattr(base, section), section
    assert "lambda_" not in cfg.loss.kwargs and "extends: happier_generated" in recipe_path(name).read_text()


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_trains_a_few_steps_with_the_suprank_loss(tmp_path, name):
    cls, official = OFFICIAL[name]
    trainer = Trainer(load_recipe(name, overrides=SMALL), out_dir=tmp_path, progress=False)
    loss = trainer.loss_fn
    assert type(loss) is cls
    for key, value in official.items():
        got = getattr(loss.step, key) if key in STEP else getattr(loss, key)
        assert got == value, key
    result = trainer.fit()
    assert 1 <= result.global_step <= 12 and np.isfinite(result.history["loss"]).all()
    assert (tmp_path / "checkpoint.pt").is_file()


def test_the_default_grid_trains_both_suprank_recipes(tmp_path):
    from hapkit.reproduce import DEFAULT_METHODS, plan_grid

    names = [s.name for s in plan_grid(out=tmp_path)]
    assert {"suprecall", "supndcg"} <= set(DEFAULT_METHODS)
    assert "suprecall_generated/seed0" in names and "supndcg_generated/seed0" in names
