"""Typed training configuration: recipes are plain YAML turned into the dataclasses below.

A recipe has the sections ``data``, ``model``, ``loss``, ``optim``, ``train`` and ``eval`` plus a
few top-level fields. Every value is type-checked against the dataclass annotation, both when a
YAML file is read and when a command-line override such as ``--set optim.lr=1e-5`` is applied;
unknown keys are errors that name the key and list the valid ones. Numeric values must also lie in
their range (:data:`RANGES`, with the rules between fields of :data:`CROSS_CHECKS`): a recipe is
checked whole by :func:`validate_recipe` once read and again once overridden, and one
:class:`ConfigError` names every key that is out of range.

Optimiser settings cascade: ``optim.<field>`` is the default of every parameter group and
``optim.backbone.<field>``, ``optim.head.<field>`` or ``optim.loss.<field>`` overrides it for one
group (the loss group holds the learnable parameters of a loss, e.g. HAPPIER's cluster weights).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from hapkit.errors import HapkitError
from hapkit.data.transforms import TestTransform, TrainTransform

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "GroupConfig",
    "OptimConfig",
    "MemoryConfig",
    "WhiteningConfig",
    "TrainConfig",
    "EvalConfig",
    "Recipe",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "validate_recipe",
    "Range",
    "RANGES",
    "parse_override",
    "group_settings",
    "network_groups",
    "GROUPS",
]

GROUPS = ("backbone", "head", "net", "loss")


class ConfigError(HapkitError, ValueError):
    """A recipe or override that does not fit the configuration schema."""


@dataclass
class DataConfig:
    """Dataset, batch sampler and loader settings.

    ``batch_size`` is the global batch: with several processes each one takes an equal slice of
    every sampled batch, so the rank losses see the same batch as a single-process run.

    Samplers (:mod:`hapkit.data.samplers`): ``hierarchical`` draws each batch from
    ``super_classes_per_batch`` super-classes (labels of label column ``sampler_column``),
    ``samples_per_class`` images per fine class, ``batches_per_super_tuple`` batches for every
    combination of super-classes (HAPPIER / ROADMAP on SOP); ``m_per_class`` takes
    ``batch_size // samples_per_class`` classes of ``samples_per_class`` images, with the epoch
    of the reference samplers (``m_per_class_fill: passes``) or packed (``packed``), optionally
    at most ``max_per_class`` images of a class per epoch (SupRank's ``reduce_per_class``).
    """

    dataset: str = "generated"
    root: Optional[str] = None
    transform: str = "imagenet"  # kind passed to hapkit.data.transforms.build_transforms
    train_transform: TrainTransform = field(default_factory=TrainTransform)
    test_transform: TestTransform = field(default_factory=TestTransform)
    sampler: Literal["hierarchical", "m_per_class"] = "hierarchical"
    batch_size: int = 256
    samples_per_class: int = 4
    super_classes_per_batch: int = 2
    batches_per_super_tuple: int = 5
    sampler_column: int = 1  # label column whose classes (super-classes) the hierarchical sampler pairs
    m_per_class_fill: Literal["passes", "packed"] = "passes"
    max_per_class: Optional[int] = None
    num_workers: int = 8
    eval_batch_size: int = 256


@dataclass
class ModelConfig:
    """Backbone, pooling and embedding head (see :func:`hapkit.training.models.build_model`)."""

    backbone: str = "resnet50"  # resnet18/34/50/101, small_cnn, deit_small_distilled, or "timm:<name>"
    pretrained: Union[bool, Literal["required"]] = True
    pooling: Literal["avg", "max", "gem", "default"] = "avg"
    gem_p: float = 3.0
    layer_norm: bool = True  # parameter-free LayerNorm on the pooled feature
    linear_head: bool = True  # False: the pooled feature is the embedding (ROADMAP's DeiT, without_fc)
    embedding_size: int = 512
    dropout: float = 0.0  # dropout on the pooled feature before the head (no official recipe uses it)
    freeze_batchnorm: bool = True
    normalize: bool = True
    width: int = 32  # channels of the first small_cnn block (small_cnn only)


@dataclass
class LossConfig:
    """A loss of :mod:`hapkit.losses` by class name, with constructor keyword arguments.

    ``num_classes`` and ``embedding_size`` are filled from the training set and the model when the
    loss takes them and the recipe leaves them out.
    """

    name: str = "HAPPIER"
    kwargs: dict = field(default_factory=dict)


@dataclass
class GroupConfig:
    """Per-group overrides of the optimiser defaults; ``None`` inherits the ``optim`` value.

    ``follow: <group>`` gives this group the resolved settings of another group (its optimiser
    type, learning rate, weight decay and schedule), in a separate optimiser over this group's
    parameters: the official configurations' ``${optimizer.opt.N}`` for the loss parameters.
    """

    follow: Optional[Literal["backbone", "head", "net"]] = None
    optimizer: Optional[Literal["adam", "adamw", "sgd"]] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    scheduler: Optional[Literal["cosine", "multistep", "constant"]] = None
    eta_min: Optional[float] = None
    milestones: Optional[list[int]] = None
    gamma: Optional[float] = None


@dataclass
class OptimConfig:
    """Optimiser and per-epoch learning-rate schedule, defaults for every parameter group.

    ``network: split`` (default) gives the backbone and the embedding head one optimiser each
    (groups ``backbone`` and ``head``); ``single`` one optimiser over the whole network (group
    ``net``, the official configurations' ``params: null``) with the defaults below.
    Cosine schedules run over ``train.epochs`` epochs (the official ``T_max: ${max_iter}``).
    """

    network: Literal["split", "single"] = "split"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    scheduler: Literal["cosine", "multistep", "constant"] = "cosine"
    eta_min: float = 0.0  # cosine: final learning rate
    milestones: list[int] = field(default_factory=list)  # multistep: epochs where lr *= gamma
    gamma: float = 0.1
    grad_clip: Optional[float] = None  # max global gradient norm, None = no clipping
    backbone: GroupConfig = field(default_factory=GroupConfig)
    head: GroupConfig = field(default_factory=GroupConfig)
    loss: GroupConfig = field(default_factory=GroupConfig)


@dataclass
class MemoryConfig:
    """The cross-batch memory of rank losses (XBM; ROADMAP's ``memory/`` configs, SupRank's XBM).

    The last ``size`` embeddings of the global batches (detached, with every label level) are kept;
    each batch is enqueued before its loss, and from epoch ``activate_after + 1`` on the loss of the
    batch against the memory is combined with the batch loss:

    - ``combine: add`` (ROADMAP): batch loss + ``weight`` * memory loss;
    - ``combine: average`` (SupRank): (batch loss + ``weight`` * memory loss) / (1 + ``weight``).

    Official settings: ROADMAP ``memory/cub.yaml`` size 5824, ``memory/inaturalist.yaml`` size
    60000, activate_after -1 (counted from epoch 1: active from the start, 0 here), weight 1.0, add
    (no README command selects one); SupRank ``memory/{small,inat,full}_memory.yaml`` size 512,
    60000 or the training set, activate 5 (active from the 5th epoch: 4 here), weight 1.0, average.
    The memory is a ring buffer of items (ROADMAP's ``unique: True``, one slot per image path and
    no eviction, is not reproduced). Parts of a loss that ignore a reference set (HAPPIER's
    clustering term) see the batch only; in ``add`` they therefore count 1 + ``weight`` times.
    """

    size: int = 0  # embeddings kept; 0 = no memory
    activate_after: int = 0  # epochs trained before the memory loss counts
    weight: float = 1.0
    combine: Literal["add", "average"] = "add"


@dataclass
class WhiteningConfig:
    """A PCA-whitening learned after training (landmark retrieval; Revaud et al.'s post-processing).

    With ``learn: true``, once the last epoch is trained the model embeds the training set with
    the recipe's test transform (at ``eval.scales`` when set), a
    :class:`~hapkit.training.whitening.PCAWhitening` of exponent ``power`` keeping ``dim``
    components (None: all) is fitted on those embeddings and attached to the model before the
    final evaluation; it is saved in the checkpoint and restored by ``load_model``.
    ``max_items``: fit on this many training images, evenly spread (None: all of them).
    Evaluations before the end of training see the model without whitening.
    """

    learn: bool = False
    power: float = 0.25  # naver's --whitenp default; 0.5 is full whitening
    dim: Optional[int] = None
    max_items: Optional[int] = None

    def __post_init__(self):
        if self.power < 0:
            raise ConfigError(f"train.whitening.power must be >= 0 (0.5: full whitening, 0.25: Revaud et al.), got {self.power}")
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"train.whitening.dim must be a number of components >= 1 or null (all), got {self.dim}")
        if self.max_items is not None and self.max_items < 2:
            raise ConfigError(f"train.whitening.max_items must be >= 2 images or null (all), got {self.max_items}")


@dataclass
class TrainConfig:
    """Training loop settings.

    Warm-up (HAPPIER's ``warmup_step`` / ``warmup_keys``): during epochs 1..``warmup_epochs`` the
    groups in ``warmup_frozen`` are frozen (their optimiser does not step; the others do) and,
    unless ``warmup_schedules``, no learning-rate schedule advances: the schedules start after
    the warm-up, as in the official loops.

    ``sub_batch``: multi-stage backpropagation (Revaud et al., ICCV 2019) with this many images
    per network pass; the loss still sees the whole batch (see
    :func:`hapkit.losses.multistage_backward`).
    """

    epochs: int = 100
    warmup_epochs: int = 0
    warmup_frozen: list[str] = field(default_factory=lambda: ["backbone"])
    warmup_schedules: bool = False
    sub_batch: Optional[int] = None
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 (fp16 if unsupported) on CUDA, none on CPU
    device: str = "auto"  # auto: cuda when available
    channels_last: bool = True  # CUDA only
    log_every: int = 50  # steps between host synchronisations (loss read-out, finiteness check)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at the end of each epoch only
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    memory: MemoryConfig = field(default_factory=MemoryConfig)  # cross-batch memory (off by default)
    whitening: WhiteningConfig = field(default_factory=WhiteningConfig)  # learned after training (off by default)


@dataclass
class EvalConfig:
    """Evaluation during and after training (hapkit.evaluate on the dataset's eval sets).

    ``columns`` are the label columns of the binary metrics (HAPPIER's
    ``compute_for_hierarchy_levels``), ``ks`` the k of R@k, ``metrics`` the metric families
    (None: all). ``overall`` adds the official averages: the mean of each metric over the eval
    sets when there are several (DyML's benchmarks), else the mean of each binary metric over
    ``columns`` (``overall/AP`` etc.).

    Landmark benchmarks (an eval set with a ground truth ``gnd``: ROxford5k, RParis6k) are scored
    with the revisited protocol (:func:`hapkit.training.landmarks.evaluate_landmark_set`):
    ``<set>/mAP@medium``, ``<set>/mP@5@hard``, ... with ``ks`` as the k of mP@k, ``scales`` /
    ``scale_power`` for a multi-scale embedding and ``query_expansion`` for alpha-QE;
    ``max_items`` does not apply to them (the ground truth indexes the whole gallery).
    """

    every: int = 20  # epochs; 0 = only at the end
    at_end: bool = True
    metrics: Optional[list[str]] = None  # None = all of hapkit.evaluate
    columns: Optional[list[int]] = None  # None = every label column
    ks: list[int] = field(default_factory=lambda: [1, 4, 16])
    overall: bool = False
    max_items: Optional[int] = None  # evaluate on this many items spread over each set (quick checks)
    # landmark benchmarks (eval sets with a ground truth, scored with the revisited protocol)
    scales: Optional[list[float]] = None  # multi-scale embedding, e.g. [1, 0.7071, 0.5]; None: single scale
    scale_power: float = 3.0  # exponent of the power mean combining the scales
    query_expansion: Optional[list[float]] = None  # [k, alpha] of alpha-query expansion; None: off

    def __post_init__(self):
        if self.scales is not None and (not self.scales or any(not s > 0 for s in self.scales)):
            raise ConfigError(f"eval.scales must be a non-empty list of positive scales or null, got {self.scales}")
        if not self.scale_power > 0:
            raise ConfigError(f"eval.scale_power must be > 0 (1: mean, 3: GeM's), got {self.scale_power}")
        qe = self.query_expansion
        if qe is not None and (len(qe) != 2 or not float(qe[0]).is_integer() or qe[0] < 1 or qe[1] < 0):
            raise ConfigError(
                f"eval.query_expansion must be [k, alpha] with an integer k >= 1 and alpha >= 0 "
                f"(e.g. [2, 3.0]) or null, got {qe}"
            )


@dataclass
class Recipe:
    """A complete training configuration (one YAML file in hapkit/training/recipes)."""

    name: str = "custom"
    method: str = ""
    description: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reported: dict = field(default_factory=dict)  # published numbers, summary key -> value (%)


# ------------------------------------------------------------------------------ value ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: bounds ``lo`` / ``hi`` (closed unless ``lo_open`` /
    ``hi_open``); ``null`` says what null means where null is allowed. For a list field the bounds
    hold for every element; ``nonempty`` asks for at least one element and ``pair`` for exactly
    two, ``[min, max]`` with min <= max."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    null: Optional[str] = None
    nonempty: bool = False
    pair: bool = False

    def _in_bounds(self, x) -> bool:
        if self.lo is not None and not (x > self.lo if self.lo_open else x >= self.lo):
            return False
        if self.hi is not None and not (x < self.hi if self.hi_open else x <= self.hi):
            return False
        return True

    def accepts(self, value) -> bool:
        if value is None:
            return self.null is not None
        if isinstance(value, list):
            if (self.nonempty and not value) or (self.pair and (len(value) != 2 or value[0] > value[1])):
                return False
            return all(self._in_bounds(v) for v in value)
        return self._in_bounds(value)

    def describe(self, integer: bool, is_list: bool) -> str:
        if self.lo is not None and self.hi is not None:
            bounds = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            bounds = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            bounds = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            bounds = ""
        if self.pair:
            text = f"a pair [min, max] of numbers {bounds} with min <= max"
        elif is_list:
            kind = "integers" if integer else "numbers"
            text = f"a {'non-empty ' if self.nonempty else ''}list of {kind} {bounds}"
        else:
            text = f"{'an integer' if integer else 'a number'} {bounds}"
        return text.rstrip() + (f" or null ({self.null})" if self.null is not None else "")


_INHERIT = "inherits the optim value"

# Each range follows what the code does with the value; values the code would take without failing
# but with no sensible effect (0 epochs train nothing and save no checkpoint) are refused too.
# Not here: fields their class's __post_init__ checks (train.whitening, eval.scales, ...), the label
# columns (eval.columns: negative ones count from the coarsest, the dataset decides which exist) and
# loss.kwargs (the loss constructors check them).
RANGES: dict[type, dict[str, Range]] = {
    TrainTransform: {
        "resize": Range(lo=1, null="no resize"),
        "crop": Range(lo=1),
        # fractions of the image area: above 1 RandomResizedCrop falls back to a centre crop
        "scale": Range(lo=0, hi=1, lo_open=True, pair=True),
        "ratio": Range(lo=0, lo_open=True, pair=True),
        "padding": Range(lo=0, null="crop // 8"),  # generated kind only; 0: no padding
    },
    TestTransform: {
        "resize": Range(lo=1, null="no resize"),
        "crop": Range(lo=1, null="no crop"),
    },
    DataConfig: {
        "batch_size": Range(lo=1),
        "samples_per_class": Range(lo=1),
        "super_classes_per_batch": Range(lo=1),
        "batches_per_super_tuple": Range(lo=1),
        # column 0 holds the fine classes the sampler draws inside each super-class
        "sampler_column": Range(lo=1),
        "max_per_class": Range(lo=1, null="every image of a class"),
        "num_workers": Range(lo=0),
        "eval_batch_size": Range(lo=1),
    },
    ModelConfig: {
        "gem_p": Range(lo=0, lo_open=True),  # the pooled feature is mean(x^p)^(1/p)
        "embedding_size": Range(lo=1),
        "dropout": Range(lo=0, hi=1, hi_open=True),  # 1 would zero every feature
        "width": Range(lo=1),
    },
    GroupConfig: {
        "lr": Range(lo=0, null=_INHERIT),  # 0 keeps a group's weights as built (a frozen group)
        "weight_decay": Range(lo=0, null=_INHERIT),
        "momentum": Range(lo=0, hi=1, hi_open=True, null=_INHERIT),
        "eta_min": Range(lo=0, null=_INHERIT),
        # schedules step at the end of each epoch, so a milestone of 0 would never be reached
        "milestones": Range(lo=1, null=_INHERIT),
        "gamma": Range(lo=0, lo_open=True, null=_INHERIT),
    },
    OptimConfig: {
        "lr": Range(lo=0),  # 0: nothing moves, the network stays as built; below 0 would climb the loss
        "weight_decay": Range(lo=0),
        "momentum": Range(lo=0, hi=1, hi_open=True),
        "eta_min": Range(lo=0),
        "milestones": Range(lo=1),
        "gamma": Range(lo=0, lo_open=True),
        # the engine skips clipping when this is falsy, so 0 would mean off; a negative norm flips the gradients
        "grad_clip": Range(lo=0, lo_open=True, null="no clipping"),
    },
    MemoryConfig: {
        "size": Range(lo=0),
        "activate_after": Range(lo=0),
        "weight": Range(lo=0),
    },
    TrainConfig: {
        "epochs": Range(lo=1),
        "warmup_epochs": Range(lo=0),
        # multistage_backward takes any positive slice size (the last slice may be shorter)
        "sub_batch": Range(lo=1, null="the network sees the whole batch"),
        "log_every": Range(lo=1),  # the engine would read 0 or less as 1
        "checkpoint_every": Range(lo=0),
    },
    EvalConfig: {
        "every": Range(lo=0),
        "ks": Range(lo=1, nonempty=True),
        "max_items": Range(lo=1, null="every item"),
    },
    # the samplers seed numpy's SeedSequence, which takes non-negative integers only
    Recipe: {"seed": Range(lo=0)},
}


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _numeric_kind(tp) -> tuple[bool, bool]:
    """(integer, is_list) of a numeric annotation such as ``Optional[list[int]]``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    is_list = typing.get_origin(tp) is list
    if is_list:
        (tp,) = typing.get_args(tp)
    return tp is int, is_list


def _range_problems(obj, where: str = "") -> list[tuple[str, str]]:
    """(dotted key, message) for every field of ``obj`` and its sections outside its range."""
    problems = []
    rules = RANGES.get(type(obj), {})
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            problems += _range_problems(value, key)
        elif f.name in rules and not rules[f.name].accepts(value):
            integer, is_list = _numeric_kind(hints[f.name])
            problems.append((key, f"{key}={_show(value)}: must be {rules[f.name].describe(integer, is_list)}"))
    return problems


def _batch_fits_sampler(cfg: Recipe) -> Optional[str]:
    d = cfg.data
    if d.sampler == "m_per_class":
        unit = d.samples_per_class
        what = (f"data.samples_per_class={unit} (the m_per_class sampler fills a batch with whole "
                f"classes of samples_per_class images)")
    else:
        unit = d.super_classes_per_batch * d.samples_per_class
        what = (f"data.super_classes_per_batch * data.samples_per_class = {unit} (the hierarchical "
                f"sampler splits a batch evenly between its super-classes, each part in whole classes "
                f"of samples_per_class images)")
    if d.batch_size % unit:
        return f"data.batch_size={d.batch_size}: must be a multiple of {what}; {d.batch_size} is not divisible by {unit}"
    return None


def _max_per_class_fits(cfg: Recipe) -> Optional[str]:
    d = cfg.data
    if d.sampler == "m_per_class" and d.max_per_class is not None and d.max_per_class < d.samples_per_class:
        return (f"data.max_per_class={d.max_per_class}: must be >= data.samples_per_class={d.samples_per_class} "
                f"or null (every image of a class): a class gives groups of samples_per_class images")
    return None


def _warmup_ends(cfg: Recipe) -> Optional[str]:
    t = cfg.train
    if t.warmup_epochs >= t.epochs:
        return (f"train.warmup_epochs={t.warmup_epochs}: must be < train.epochs={t.epochs} (a warm-up over "
                f"the whole run never trains the frozen groups nor starts the schedules); lower it, e.g. "
                f"train.warmup_epochs=0, or raise train.epochs")
    return None


def _memory_holds_a_batch(cfg: Recipe) -> Optional[str]:
    size, batch = cfg.train.memory.size, cfg.data.batch_size
    if 0 < size < batch:
        return (f"train.memory.size={size}: must be 0 (no memory) or >= data.batch_size={batch} "
                f"(the memory holds at least one global batch)")
    return None


def _device_parses(cfg: Recipe) -> Optional[str]:
    import torch

    spec = cfg.train.device
    if spec == "auto":
        return None
    try:
        torch.device(spec)
    except (RuntimeError, TypeError):
        return f"train.device={spec}: must be auto or a torch device such as cpu, cuda or cuda:1"
    return None


# rules between fields: the keys they read (skipped when one of them is already out of range)
CROSS_CHECKS = [
    (("data.batch_size", "data.samples_per_class", "data.super_classes_per_batch"), _batch_fits_sampler),
    (("data.max_per_class", "data.samples_per_class"), _max_per_class_fits),
    (("train.warmup_epochs", "train.epochs"), _warmup_ends),
    (("train.memory.size", "data.batch_size"), _memory_holds_a_batch),
    (("train.device",), _device_parses),
]


def validate_recipe(cfg: Recipe) -> Recipe:
    """Return ``cfg`` when every value is in its range (:data:`RANGES`, :data:`CROSS_CHECKS`), else
    raise one :class:`ConfigError` naming every bad key, its value and the values it accepts."""
    problems = _range_problems(cfg)
    bad = {key for key, _ in problems}
    for keys, check in CROSS_CHECKS:
        if not bad.intersection(keys):
            message = check(cfg)
            if message:
                problems.append((keys[0], message))
    if problems:
        raise ConfigError("; ".join(message for _, message in problems))
    return cfg


# ---------------------------------------------------------------------------- type checking


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value, tp, where: str):
    """Return ``value`` converted to the annotation ``tp`` or raise :class:`ConfigError`.

    Strings are accepted for numbers and booleans because command-line values arrive as text and
    YAML 1.1 reads ``1e-5`` (no dot) as a string.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in {"null", "none", "~"}):
            if type(None) in args:
                return None
        # bool before str so that "true" becomes True for Union[bool, Literal[...]]
        for arg in sorted(args, key=lambda a: a is str):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # pragma: no cover


def _unknown_key(key: str, cls, where: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    path = f"{where}.{key}" if where else key
    return ConfigError(f"unknown key {path!r}.{hint} Valid keys{' in ' + repr(where) if where else ''}: {', '.join(valid)}")


def from_dict(cls, data, where: str = ""):
    """Build dataclass ``cls`` from a mapping, type-checking every value; missing keys keep defaults."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(str(key), cls, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The dataclass as nested plain dicts and lists (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``"optim.lr=1e-5"`` into (["optim", "lr"], "1e-5")."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=1e-5")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key component in {key!r}")
    return path, value.strip()


def _parse_free_value(text: str):
    """A value for a free-form mapping (loss.kwargs): YAML scalars, with 1e-5 read as a number."""
    import yaml

    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        reason = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{text!r} is not a YAML value ({reason}); quote it or fix it") from e
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(cfg: Recipe, overrides) -> Recipe:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied and type-checked.

    ``overrides`` is an iterable of ``"a.b=v"`` strings or a mapping ``{"a.b": v}``. Keys below
    ``loss.kwargs`` are free-form (checked later against the loss constructor). The result is
    checked whole by :func:`validate_recipe`.
    """
    if not overrides:
        return cfg
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    data = to_dict(cfg)
    for key, value in items:
        path = key.split(".") if isinstance(key, str) else list(key)
        node, cls, where = data, Recipe, ""
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if cls is None:  # inside a free-form dict
                if last:
                    node[part] = _parse_free_value(value) if isinstance(value, str) else value
                else:
                    node = node.setdefault(part, {})
                continue
            if part not in {f.name for f in dataclasses.fields(cls)}:
                raise _unknown_key(part, cls, where)
            tp = typing.get_type_hints(cls)[part]
            where = f"{where}.{part}" if where else part
            if last:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{where} is a section; set one of its keys, e.g. {where}.{dataclasses.fields(tp)[0].name}=...")
                node[part] = _coerce(value, tp, where)
            else:
                if dataclasses.is_dataclass(tp):
                    cls = tp
                elif tp is dict or typing.get_origin(tp) is dict:
                    cls = None
                else:
                    raise ConfigError(f"{where} is a value, not a section: use {where}=<value>")
                node = node[part]
    return validate_recipe(from_dict(Recipe, data))


def network_groups(optim: OptimConfig) -> tuple[str, ...]:
    """The parameter groups of the network: ``("backbone", "head")`` or ``("net",)``."""
    return ("net",) if optim.network == "single" else ("backbone", "head")


def group_settings(optim: OptimConfig, group: str, _seen: tuple = ()) -> dict:
    """The resolved optimiser settings of one parameter group: the group's own values over the
    ``optim`` defaults, or those of the group it follows."""
    if group not in GROUPS:
        raise ConfigError(f"unknown parameter group {group!r}; groups are {GROUPS}")
    if group in ("backbone", "head") and optim.network == "single":
        raise ConfigError(f"optim.network=single has one group, net: there is no {group!r} group")
    if group == "net":
        if optim.network != "single":
            raise ConfigError("group 'net' exists with optim.network=single only; this recipe has backbone and head")
        set_keys = [f"optim.{g}.{f.name}" for g in ("backbone", "head") for f in dataclasses.fields(GroupConfig)
                    if getattr(getattr(optim, g), f.name) is not None]
        if set_keys:
            raise ConfigError(f"optim.network=single takes the optim defaults for the whole network; "
                              f"remove {', '.join(set_keys)}")
        return {f.name: getattr(optim, f.name) for f in dataclasses.fields(GroupConfig) if f.name != "follow"}
    own = getattr(optim, group)
    if own.follow is not None:
        if own.follow == group or own.follow in _seen:
            raise ConfigError(f"optim.{group}.follow={own.follow!r} is circular")
        base = group_settings(optim, own.follow, _seen + (group,))
        others = [f.name for f in dataclasses.fields(GroupConfig) if f.name != "follow" and getattr(own, f.name) is not None]
        if others:
            raise ConfigError(f"optim.{group} follows {own.follow!r}: it cannot also set {', '.join(others)}")
        return base
    out = {}
    for f in dataclasses.fields(GroupConfig):
        if f.name == "follow":
            continue
        value = getattr(own, f.name)
        out[f.name] = getattr(optim, f.name) if value is None else value
    return out
