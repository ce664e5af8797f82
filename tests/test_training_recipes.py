"""Recipes: every bundled file loads into the typed config and builds its loss; overrides are
type-checked; unknown keys are errors naming the valid ones; the official settings (docs/definitions.md, 'Official training recipes') are
what the files say."""

import inspect

import numpy as np
import pytest

import hapkit.losses as losses
from hapkit.training.config import (
    ConfigError,
    GroupConfig,
    OptimConfig,
    Recipe,
    from_dict,
    group_settings,
    network_groups,
    to_dict,
)
from hapkit.training.recipes import list_recipes, load_recipe, read_recipe_dict, resolve_name

METHODS = ["happier", "roadmap", "supap", "smoothap", "listwise_ap", "hpl", "csl"]
REAL = ["sop", "inaturalist", "inaturalist_full", "dyml_vehicle", "dyml_animal", "dyml_product", "cub"]
LANDMARKS = ["sfm120k", "gldv2_hier"]  # one recipe per method with an official landmark setting


def test_one_recipe_per_method_and_dataset():
    names = set(list_recipes())
    for m in METHODS:
        for d in REAL + ["generated"]:
            assert f"{m}_{d}" in names, f"missing recipe {m}_{d}"


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_and_its_loss_accepts_its_kwargs(name):
    cfg = load_recipe(name)
    assert cfg.name == name
    assert cfg.description, f"{name} has no description"
    variant = name[len(cfg.method) + 1:].removesuffix("_deit").removesuffix("_large")
    assert name.startswith(cfg.method + "_") and variant in REAL + LANDMARKS + ["generated"]
    cls = getattr(losses, cfg.loss.name)
    params = inspect.signature(cls.__init__).parameters
    if cfg.loss.name == "HAPPIER":
        params = {**params, **inspect.signature(losses.HAPLoss.__init__).parameters}
    if cfg.loss.name == "ROADMAP":
        params = {**params, **inspect.signature(losses.SupAP.__init__).parameters}
    unknown = set(cfg.loss.kwargs) - set(params)
    assert not unknown, f"{name}: {cls.__name__} has no argument {unknown}"
    # every group resolves to a complete optimiser setting
    for g in (*network_groups(cfg.optim), "loss"):
        s = group_settings(cfg.optim, g)
        assert None not in s.values()
    assert cfg.data.batch_size % cfg.data.samples_per_class == 0
    from hapkit.data import dataset_names
    from hapkit.data.transforms import TRANSFORM_KINDS

    assert cfg.data.dataset in dataset_names() and cfg.data.transform in TRANSFORM_KINDS


def test_yaml_round_trip_is_identity():
    cfg = load_recipe("happier_sop")
    assert from_dict(Recipe, to_dict(cfg)) == cfg


def test_derived_recipes_replace_the_parent_loss_kwargs():
    supap = load_recipe("supap_sop")
    assert supap.loss.name == "SupAP" and "lambda_" not in supap.loss.kwargs
    # everything else is the HAPPIER setting
    happier = load_recipe("happier_sop")
    assert supap.data == happier.data and supap.model == happier.model
    assert supap.reported == {}  # published numbers are not inherited
    assert "derived" in (read_recipe_dict("supap_sop").get("description") or "")


def test_generated_recipes_differ_by_their_loss_only():
    base = load_recipe("happier_generated")
    assert base.model.backbone == "small_cnn" and base.data.dataset == "generated"
    for m in ["supap", "smoothap", "hpl", "csl", "roadmap", "listwise_ap"]:
        cfg = load_recipe(m, dataset="generated")
        assert cfg.data == base.data and cfg.model == base.model and cfg.train == base.train


def test_overrides_are_type_checked():
    cfg = load_recipe("happier_generated", overrides=["optim.lr=1e-5", "train.epochs=3", "model.pretrained=true",
                                                     "optim.backbone.lr=2e-4", "optim.milestones=[3, 5]",
                                                     "loss.kwargs.lambda_=0.5", "loss.kwargs.relevance=map"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.model.pretrained is True
    assert cfg.optim.backbone.lr == 2e-4 and cfg.optim.milestones == [3, 5]
    assert cfg.loss.kwargs["lambda_"] == 0.5 and cfg.loss.kwargs["relevance"] == "map"
    assert load_recipe("happier_generated", overrides={"model.pretrained": "required"}).model.pretrained == "required"
    assert load_recipe("happier_generated", overrides=["data.root=null"]).data.root is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.amp=fp8", "train.amp: expected one of"),
        ("optim.lrr=1", "unknown key 'optim.lrr'. Did you mean 'lr'?"),
        ("optimizer.lr=1", "unknown key 'optimizer'"),
        ("optim=3", "optim is a section"),
        ("optim.lr.x=3", "optim.lr is a value"),
        ("noequals", "must look like section.key=value"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError) as info:
        load_recipe("happier_generated", overrides=[override])
    assert message in str(info.value)


def test_unknown_yaml_key_names_the_key_and_the_valid_ones(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: happier_generated\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert "unknown key 'train.epoch'" in msg and "Did you mean 'epochs'" in msg and "warmup_epochs" in msg


def test_group_follow_and_single_network():
    optim = OptimConfig(lr=1e-4, head=GroupConfig(lr=2e-5, eta_min=1e-6), loss=GroupConfig(follow="head"))
    assert group_settings(optim, "loss") == group_settings(optim, "head")
    with pytest.raises(ConfigError, match="cannot also set"):
        group_settings(OptimConfig(loss=GroupConfig(follow="head", lr=3.0)), "loss")
    single = OptimConfig(network="single", optimizer="sgd", lr=0.1, loss=GroupConfig(follow="net"))
    assert network_groups(single) == ("net",)
    assert group_settings(single, "loss")["lr"] == 0.1 and group_settings(single, "net")["optimizer"] == "sgd"
    with pytest.raises(ConfigError, match="no 'backbone' group"):
        group_settings(single, "backbone")
    with pytest.raises(ConfigError, match="remove optim.head.lr"):
        group_settings(OptimConfig(network="single", head=GroupConfig(lr=1.0)), "net")
    with pytest.raises(ConfigError, match="circular"):
        group_settings(OptimConfig(head=GroupConfig(follow="head")), "head")


def test_user_recipe_file_extends_a_bundled_one(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text("extends: happier_generated\ndescription: faster\ntrain:\n  epochs: 1\noptim:\n  lr: 1e-5\n")
    cfg = load_recipe(str(path))
    assert cfg.name == "fast" and cfg.train.epochs == 1 and cfg.optim.lr == 1e-5
    assert cfg.loss.kwargs == load_recipe("happier_generated").loss.kwargs


def test_circular_extends_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="circular"):
        load_recipe(str(tmp_path / "a.yaml"))


def test_unknown_recipe_lists_methods():
    with pytest.raises(ConfigError, match="hapkit recipes"):
        resolve_name("nope", "generated")
    assert resolve_name("happier", "generated") == "happier_generated"
    assert resolve_name("happier_sop") == "happier_sop"
    assert resolve_name("happier", "cub_hierarchy") == "happier_cub"  # by the recipe's data.dataset
    assert resolve_name("smoothap", "cub_hierarchy") == "smoothap_cub"  # ... found through `extends`


def test_group_settings_cascade():
    optim = OptimConfig(lr=1.0, optimizer="sgd", head=GroupConfig(lr=2.0), loss=GroupConfig(optimizer="adam"))
    assert group_settings(optim, "backbone")["lr"] == 1.0
    assert group_settings(optim, "head")["lr"] == 2.0 and group_settings(optim, "head")["optimizer"] == "sgd"
    assert group_settings(optim, "loss")["optimizer"] == "adam"
    with pytest.raises(ConfigError):
        group_settings(optim, "neck")


def test_build_loss_fills_sizes_from_the_labels():
    from hapkit.training.engine import build_loss

    labels = np.array([[0, 0], [1, 0], [2, 1], [3, 1], [4, 1]])
    cfg = load_recipe("happier_generated", overrides=["model.embedding_size=8"])
    loss = build_loss(cfg, labels)
    assert loss.cluster.weight.shape == (5, 8)
    hpl = build_loss(load_recipe("hpl_generated", overrides=["model.embedding_size=8"]), labels)
    assert hpl.sizes == [5, 2]
    csl = build_loss(load_recipe("csl_generated", overrides=["model.embedding_size=8"]), labels)
    assert csl.proxies.shape == (5, 8)
    with pytest.raises(ConfigError, match="has no argument 'lambda'"):
        build_loss(load_recipe("supap_generated", overrides=["loss.kwargs.lambda=0.5"]), labels)
    with pytest.raises(ConfigError, match="not a hapkit loss"):
        build_loss(load_recipe("supap_generated", overrides=["loss.name=Nope"]), labels)


def test_published_numbers_list_every_reported_value():
    from hapkit.training.recipes import list_recipes, published_numbers, read_recipe_dict

    table = published_numbers()
    row = table[(table["recipe"] == "happier_sop") & (table["metric"] == "test/R@1@0")]
    assert row["paper"].tolist() == [81.0] and row["dataset"].tolist() == ["sop"]
    expected = sum(len(read_recipe_dict(n).get("reported") or {}) for n in list_recipes())
    assert len(table) == expected > 0
    assert table["metric"].str.fullmatch(r"[a-z0-9_]+/[A-Za-z@0-9\-]+").all()  # summary keys: <set>/<metric>
