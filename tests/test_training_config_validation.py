"""Recipe values out of their range are refused when a recipe is read and when it is overridden,
with one error naming every bad key, its value and what it accepts; every bundled recipe is in
range; a CUDA device asked for on a machine without one is a one-line DeviceUnavailableError."""

import dataclasses
import typing

import pytest
import torch

from hapkit.cli import main
from hapkit.errors import DeviceUnavailableError, HapkitError
from hapkit.training.config import ConfigError, Recipe, apply_overrides
from hapkit.training.recipes import list_recipes, load_recipe

BASE = "happier_generated"  # hierarchical sampler, batch 128 = 2 super-classes x 16 classes x 4, 10 epochs

OUT_OF_RANGE = [
    ("data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("data.samples_per_class=0", "data.samples_per_class=0: must be an integer >= 1"),
    ("data.super_classes_per_batch=0", "data.super_classes_per_batch=0: must be an integer >= 1"),
    ("data.batches_per_super_tuple=0", "data.batches_per_super_tuple=0: must be an integer >= 1"),
    ("data.sampler_column=0", "data.sampler_column=0: must be an integer >= 1"),
    ("data.max_per_class=0", "data.max_per_class=0: must be an integer >= 1 or null"),
    ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0: must be an integer >= 1"),
    ("data.train_transform.resize=0", "data.train_transform.resize=0: must be an integer >= 1 or null"),
    ("data.train_transform.crop=0", "data.train_transform.crop=0: must be an integer >= 1"),
    ("data.train_transform.scale=[0,1]", "data.train_transform.scale=[0.0, 1.0]: must be a pair [min, max] of numbers in (0, 1]"),
    ("data.train_transform.scale=[0.5,0.2]", "data.train_transform.scale=[0.5, 0.2]: must be a pair [min, max]"),
    ("data.train_transform.scale=[0.2,1.5]", "data.train_transform.scale=[0.2, 1.5]: must be a pair"),
    ("data.train_transform.scale=[0.2]", "data.train_transform.scale=[0.2]: must be a pair"),
    ("data.train_transform.ratio=[0,1.33]", "data.train_transform.ratio=[0.0, 1.33]: must be a pair [min, max] of numbers > 0"),
    ("data.train_transform.ratio=[1.33,0.75]", "data.train_transform.ratio=[1.33, 0.75]: must be a pair"),
    ("data.train_transform.padding=-1", "data.train_transform.padding=-1: must be an integer >= 0 or null"),
    ("data.test_transform.resize=0", "data.test_transform.resize=0: must be an integer >= 1 or null"),
    ("data.test_transform.crop=-32", "data.test_transform.crop=-32: must be an integer >= 1 or null"),
    ("model.gem_p=0", "model.gem_p=0.0: must be a number > 0"),
    ("model.embedding_size=0", "model.embedding_size=0: must be an integer >= 1"),
    ("model.dropout=1", "model.dropout=1.0: must be a number in [0, 1)"),
    ("model.dropout=-0.1", "model.dropout=-0.1: must be a number in [0, 1)"),
    ("model.width=0", "model.width=0: must be an integer >= 1"),
    ("optim.lr=-1e-4", "optim.lr=-0.0001: must be a number >= 0"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay=-0.0001: must be a number >= 0"),
    ("optim.momentum=1", "optim.momentum=1.0: must be a number in [0, 1)"),
    ("optim.momentum=-0.5", "optim.momentum=-0.5: must be a number in [0, 1)"),
    ("optim.eta_min=-1e-6", "optim.eta_min=-1e-06: must be a number >= 0"),
    ("optim.milestones=[0,3]", "optim.milestones=[0, 3]: must be a list of integers >= 1"),
    ("optim.gamma=0", "optim.gamma=0.0: must be a number > 0"),
    ("optim.grad_clip=0", "optim.grad_clip=0.0: must be a number > 0 or null (no clipping)"),
    ("optim.grad_clip=-10", "optim.grad_clip=-10.0: must be a number > 0 or null"),
    ("optim.backbone.lr=-1e-5", "optim.backbone.lr=-1e-05: must be a number >= 0 or null (inherits the optim value)"),
    ("optim.head.weight_decay=-1", "optim.head.weight_decay=-1.0: must be a number >= 0 or null"),
    ("optim.loss.momentum=1.5", "optim.loss.momentum=1.5: must be a number in [0, 1) or null"),
    ("optim.backbone.eta_min=-1", "optim.backbone.eta_min=-1.0: must be a number >= 0 or null"),
    ("optim.head.milestones=[0]", "optim.head.milestones=[0]: must be a list of integers >= 1 or null"),
    ("optim.loss.gamma=-0.1", "optim.loss.gamma=-0.1: must be a number > 0 or null"),
    ("train.epochs=0", "train.epochs=0: must be an integer >= 1"),
    ("train.epochs=-1", "train.epochs=-1: must be an integer >= 1"),
    ("train.warmup_epochs=-1", "train.warmup_epochs=-1: must be an integer >= 0"),
    ("train.sub_batch=0", "train.sub_batch=0: must be an integer >= 1 or null"),
    ("train.log_every=0", "train.log_every=0: must be an integer >= 1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every=-1: must be an integer >= 0"),
    ("train.memory.size=-1", "train.memory.size=-1: must be an integer >= 0"),
    ("train.memory.activate_after=-1", "train.memory.activate_after=-1: must be an integer >= 0"),
    ("train.memory.weight=-1", "train.memory.weight=-1.0: must be a number >= 0"),
    ("eval.every=-1", "eval.every=-1: must be an integer >= 0"),
    ("eval.ks=[0,4]", "eval.ks=[0, 4]: must be a non-empty list of integers >= 1"),
    ("eval.ks=[]", "eval.ks=[]: must be a non-empty list of integers >= 1"),
    ("eval.max_items=0", "eval.max_items=0: must be an integer >= 1 or null"),
    ("seed=-1", "seed=-1: must be an integer >= 0"),
]

# rules between fields: the overrides, then the message
BETWEEN_FIELDS = [
    (["data.batch_size=124"],  # classes of 4, but not two equal halves of whole classes
     "data.batch_size=124: must be a multiple of data.super_classes_per_batch * data.samples_per_class = 8"),
    (["data.batch_size=2"], "data.batch_size=2: must be a multiple of"),
    (["data.sampler=m_per_class", "data.batch_size=30"],
     "data.batch_size=30: must be a multiple of data.samples_per_class=4"),
    (["data.sampler=m_per_class", "data.max_per_class=2"],
     "data.max_per_class=2: must be >= data.samples_per_class=4 or null"),
    (["train.warmup_epochs=10"], "train.warmup_epochs=10: must be < train.epochs=10"),
    (["train.epochs=3", "train.warmup_epochs=5"], "train.warmup_epochs=5: must be < train.epochs=3"),
    (["train.memory.size=64"], "train.memory.size=64: must be 0 (no memory) or >= data.batch_size=128"),
    (["train.device=gpu"], "train.device=gpu: must be auto or a torch device"),
]

# the edges of the ranges, and values a stricter rule might wrongly refuse
IN_RANGE = [
    "optim.lr=0", "optim.backbone.lr=0", "optim.momentum=0", "optim.weight_decay=0", "optim.eta_min=0",
    "optim.grad_clip=null", "optim.grad_clip=10",
    "optim.backbone.lr=null", "optim.milestones=[]", "data.num_workers=0", "data.max_per_class=null",
    "data.train_transform.scale=[1,1]", "data.train_transform.padding=0", "data.test_transform.crop=null",
    "model.dropout=0", "train.warmup_epochs=9", "train.sub_batch=1", "train.sub_batch=1000", "train.sub_batch=null",
    "train.sub_batch=24", "train.checkpoint_every=0", "train.memory.size=0", "train.memory.size=128", "eval.every=0",
    "eval.ks=[1]", "eval.max_items=null", "seed=0", "train.device=cpu", "train.device=cuda:1",
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_a_value_out_of_its_range_is_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(BASE, overrides=[override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, message", BETWEEN_FIELDS, ids=[" ".join(o) for o, _ in BETWEEN_FIELDS])
def test_values_that_do_not_fit_together_are_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(BASE, overrides=overrides)
    assert message in str(info.value)


def test_the_batch_rule_follows_the_sampler():
    # 124 images are whole classes of 4 for m_per_class, not two equal halves for hierarchical
    assert load_recipe(BASE, overrides=["data.sampler=m_per_class", "data.batch_size=124"]).data.batch_size == 124


@pytest.mark.parametrize("override", IN_RANGE)
def test_values_at_the_edge_of_their_range_are_accepted(override):
    load_recipe(BASE, overrides=[override])


def test_every_bad_field_is_reported_in_one_error():
    with pytest.raises(ConfigError) as info:
        load_recipe(BASE, overrides=["train.epochs=0", "optim.lr=-1", "eval.ks=[0]", "data.num_workers=-2"])
    msg = str(info.value)
    for part in ("train.epochs=0:", "optim.lr=-1.0:", "eval.ks=[0]:", "data.num_workers=-2:"):
        assert part in msg
    assert msg.count("; ") == 3 and "\n" not in msg


def test_a_rule_between_fields_is_not_repeated_over_a_bad_field():
    with pytest.raises(ConfigError) as info:
        load_recipe(BASE, overrides=["train.epochs=0", "train.warmup_epochs=2"])
    assert "train.epochs=0: must be an integer >= 1" in str(info.value)
    assert "train.warmup_epochs" not in str(info.value)


def test_a_yaml_file_out_of_range_is_refused_with_its_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: happier_generated\ntrain:\n  epochs: 0\noptim:\n  momentum: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    msg = str(info.value)
    assert msg.startswith("recipe 'mine': ")
    assert "train.epochs=0: must be an integer >= 1" in msg and "optim.momentum=1.0: must be a number in [0, 1)" in msg


def test_an_override_can_break_a_rule_that_the_file_keeps():
    assert load_recipe("happier_sop").train.warmup_epochs == 5
    with pytest.raises(ConfigError, match=r"train.warmup_epochs=5: must be < train.epochs=3"):
        load_recipe("happier_sop", overrides=["train.epochs=3"])
    assert load_recipe("happier_sop", overrides=["train.epochs=3", "train.warmup_epochs=0"]).train.epochs == 3


def test_apply_overrides_checks_the_result():
    cfg = load_recipe(BASE)
    with pytest.raises(ConfigError, match=r"train.epochs=-1: must be an integer >= 1"):
        apply_overrides(cfg, ["train.epochs=-1"])
    with pytest.raises(ConfigError, match=r"optim.lr=-1.0: must be a number >= 0"):
        apply_overrides(cfg, {"optim.lr": -1})


def test_a_recipe_built_in_python_can_be_checked():
    from hapkit.training.config import TrainConfig, validate_recipe

    cfg = Recipe()
    assert validate_recipe(cfg) is cfg
    with pytest.raises(ConfigError, match=r"train.epochs=0: must be an integer >= 1"):
        validate_recipe(dataclasses.replace(cfg, train=TrainConfig(epochs=0)))


@pytest.mark.parametrize("name", list_recipes())
def test_every_bundled_recipe_is_in_range(name):
    from hapkit.training.config import validate_recipe

    cfg = load_recipe(name)
    assert validate_recipe(cfg) is cfg


# numeric fields whose range their class checks when built (the messages predate the range table)
CHECKED_BY_THEIR_CLASS = {"train.whitening.power", "train.whitening.dim", "train.whitening.max_items",
                          "eval.scales", "eval.scale_power", "eval.query_expansion"}
NO_RANGE = {"eval.columns"}  # any label column, negative ones counting from the coarsest: the dataset decides


def _numeric_fields(cls, where=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, key)
            continue
        args = set(typing.get_args(tp)) | {tp}
        args |= {a for t in list(args) for a in typing.get_args(t)}
        if args & {int, float}:
            yield cls, f.name, key


def test_every_numeric_field_has_a_range():
    from hapkit.training.config import RANGES

    missing = [key for cls, name, key in _numeric_fields(Recipe)
               if name not in RANGES.get(cls, {}) and key not in CHECKED_BY_THEIR_CLASS | NO_RANGE]
    assert not missing, f"numeric recipe fields without a range: {missing}"


def test_cli_train_with_zero_epochs_exits_2_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "r"
    code = main(["train", "--recipe", BASE, "--out", str(run), "--no-progress", "--set", "train.epochs=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.epochs=0: must be an integer >= 1" in err
    assert len(err.strip().splitlines()) == 1
    assert not run.exists() or not any(run.iterdir())


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_machine_without_one_is_a_one_line_error(no_cuda, device):
    from hapkit.training.distributed import init_distributed

    with pytest.raises(DeviceUnavailableError) as info:
        init_distributed(device)
    msg = str(info.value)
    assert msg.startswith(f"train.device={device} but torch sees no CUDA GPU on this machine")
    assert "--set train.device=cpu" in msg and "\n" not in msg
    assert isinstance(info.value, HapkitError) and isinstance(info.value, RuntimeError)


def test_auto_and_cpu_still_pick_the_cpu_without_cuda(no_cuda):
    from hapkit.training.distributed import init_distributed

    assert init_distributed("auto").device == torch.device("cpu")
    assert init_distributed("cpu").device == torch.device("cpu")


def test_trainer_asked_for_cuda_without_one_stops_before_writing(no_cuda, tmp_path):
    from hapkit.training.engine import Trainer

    cfg = load_recipe(BASE, overrides=["train.device=cuda", "model.width=4", "data.num_workers=0"])
    with pytest.raises(DeviceUnavailableError, match="train.device=cuda but torch sees no CUDA GPU"):
        Trainer(cfg, out_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
