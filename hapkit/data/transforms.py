"""Image transforms (torchvision.transforms.v2): the official recipes' and the generated-data ones.

A transform is described by data, :class:`TrainTransform` or :class:`TestTransform` (the
``data.train_transform`` / ``data.test_transform`` sections of a recipe), so that the official
pipelines can be written down exactly:

- ``imagenet`` train: [Resize(resize), shorter side] -> RandomResizedCrop(crop, scale, ratio) ->
  [RandomHorizontalFlip]; test: [Resize(resize) (shorter side) or Resize([resize, resize])
  (``square``: the aspect ratio is not kept)] -> [CenterCrop(crop)]; ImageNet normalisation.
  HAPPIER / ROADMAP on SOP resize before the random crop and resize the test images to a square;
  their iNaturalist, CUB and DyML pipelines crop the raw image and resize the shorter side.
- ``generated`` (embedded dataset, 32 px): train = RandomCrop(crop, reflect padding) and
  horizontal flip (no class of the generated set is the mirror image of another, and colour, the
  finest cue, is left untouched); test = [Resize] -> CenterCrop(crop); normalisation by mean
  0.5, std 0.25.

Both kinds accept a PIL image or a uint8 CxHxW tensor and return a normalised float32 tensor.
:func:`describe_transforms` lists a built pipeline as plain data (names and parameters).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # imported on first build: the specs are read with every recipe, torch is not needed for that
    from torchvision.transforms import v2

__all__ = [
    "TrainTransform",
    "TestTransform",
    "default_transform",
    "build_transforms",
    "describe_transforms",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GENERATED_MEAN",
    "GENERATED_STD",
    "TRANSFORM_KINDS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# grey backgrounds centred on 0.5 with a spread of roughly 0.25
GENERATED_MEAN = (0.5, 0.5, 0.5)
GENERATED_STD = (0.25, 0.25, 0.25)
TRANSFORM_KINDS = ("imagenet", "generated")


@dataclass
class TrainTransform:
    """Training augmentation. Defaults: HAPPIER's SOP pipeline (``transform/sop.yaml``)."""

    resize: Optional[int] = 256  # shorter side resized first; null: crop the original image
    crop: int = 224  # RandomResizedCrop size (generated kind: RandomCrop size)
    scale: list[float] = field(default_factory=lambda: [0.16, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.33])
    flip: bool = True
    padding: Optional[int] = None  # generated kind: RandomCrop padding (null: crop // 8)


@dataclass
class TestTransform:
    """Test-time resizing. Defaults: HAPPIER's SOP pipeline (Resize([256, 256]), CenterCrop(224))."""

    __test__ = False  # a name pytest would otherwise collect

    resize: Optional[int] = 256  # null: no resize
    square: bool = True  # Resize([resize, resize]) (aspect ratio not kept) instead of the shorter side
    crop: Optional[int] = 224  # CenterCrop size; null: no crop


def default_transform(kind: str, train: bool):
    """The spec a kind uses when none is given: the SOP pipeline for ``imagenet``, 32-px crops
    without resizing for ``generated``."""
    if kind == "generated":
        return TrainTransform(resize=None, crop=32) if train else TestTransform(resize=None, crop=32)
    return TrainTransform() if train else TestTransform()


def build_transforms(
    kind: str = "imagenet",
    train: bool = True,
    spec: TrainTransform | TestTransform | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **fields,
) -> v2.Compose:
    """The train or test pipeline of ``kind`` from ``spec`` (default :func:`default_transform`);
    keyword ``fields`` replace fields of the spec (``build_transforms("imagenet", False, crop=256)``)."""
    import torch
    from torchvision.transforms import v2

    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; choose one of {TRANSFORM_KINDS}")
    spec = default_transform(kind, train) if spec is None else spec
    expected = TrainTransform if train else TestTransform
    if not isinstance(spec, expected):
        raise TypeError(f"a {'train' if train else 'test'} transform needs a {expected.__name__}, got {type(spec).__name__}")
    spec = dataclasses.replace(spec, **fields) if fields else spec
    steps: list = [v2.ToImage()]
    if kind == "imagenet":
        if train:
            if spec.resize is not None:
                steps.append(v2.Resize(spec.resize, antialias=True))
            steps.append(v2.RandomResizedCrop(spec.crop, scale=tuple(spec.scale), ratio=tuple(spec.ratio), antialias=True))
            if spec.flip:
                steps.append(v2.RandomHorizontalFlip())
        else:
            if spec.resize is not None:
                size = [spec.resize, spec.resize] if spec.square else spec.resize
                steps.append(v2.Resize(size, antialias=True))
            if spec.crop is not None:
                steps.append(v2.CenterCrop(spec.crop))
        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    else:
        # float first: reflect padding is several times slower on uint8 images
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if spec.resize is not None:
            size = [spec.resize, spec.resize] if (not train and spec.square) else spec.resize
            steps.append(v2.Resize(size, antialias=True))
        if train:
            pad = spec.crop // 8 if spec.padding is None else spec.padding
            steps.append(v2.RandomCrop(spec.crop, padding=pad or None, padding_mode="reflect"))
            if spec.flip:
                steps.append(v2.RandomHorizontalFlip())
        elif spec.crop is not None:
            steps.append(v2.CenterCrop(spec.crop))
        mean = GENERATED_MEAN if mean is None else mean
        std = GENERATED_STD if std is None else std
    steps += [
        v2.ToDtype(torch.float32, scale=True),  # no-op when already float
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),  # a plain tensor, not a tv_tensors.Image, for the model and collate
    ]
    return v2.Compose(steps)


def _plain(value):
    import torch

    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def describe_transforms(transform) -> list[dict]:
    """The steps of a built pipeline as plain data: ``[{"name": "Resize", "size": [256, 256], ...}, ...]``
    (the torchvision class name and its public parameters)."""
    import torch
    from torchvision.transforms import v2

    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    out = []
    for step in steps:
        params = {
            k: _plain(v) for k, v in vars(step).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (int, float, bool, str, list, tuple, dict, enum.Enum, torch.dtype, type(None)))
        }
        out.append({"name": type(step).__name__, **params})
    return out
