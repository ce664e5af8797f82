"""Image transforms (torchvision.transforms.v2): the official recipes and the generated-data ones.

Both kinds accept a PIL image or a uint8 CxHxW tensor and return a normalised float32 tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.transforms import v2

__all__ = [
    "build_transforms",
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


def build_transforms(
    kind: str = "imagenet",
    train: bool = True,
    *,
    resize: int | None = None,
    crop: int | None = None,
    scale: Sequence[float] = (0.16, 1.0),
    ratio: Sequence[float] = (0.75, 1.33),
    padding: int | None = None,
    flip: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """Train or test transform of ``kind``.

    - ``"imagenet"`` (HAPPIER / ROADMAP official recipes): train = Resize(256),
      RandomResizedCrop(224, scale=(0.16, 1), ratio=(0.75, 1.33)), RandomHorizontalFlip; test =
      Resize(256), CenterCrop(224); ImageNet normalisation. ``resize`` / ``crop`` override 256 /
      224 (e.g. ROADMAP's 256-px crops on SOP: ``resize=288, crop=256``).
    - ``"generated"`` (embedded dataset, 32 px): train = RandomCrop(32, padding=4, reflect) and
      horizontal flip (no class of the generated set is the mirror image of another, and colour,
      the finest cue, is left untouched); test = identity (CenterCrop(crop) when ``crop`` is
      given); normalisation by mean 0.5, std 0.25. ``crop`` defaults to 32, ``padding`` to
      crop // 8.
    """
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind {kind!r}; choose one of {TRANSFORM_KINDS}")
    steps: list = [v2.ToImage()]
    if kind == "imagenet":
        resize = 256 if resize is None else resize
        crop = 224 if crop is None else crop
        if train:
            steps += [
                v2.Resize(resize, antialias=True),
                v2.RandomResizedCrop(crop, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
            ]
            if flip:
                steps.append(v2.RandomHorizontalFlip())
        else:
            steps += [v2.Resize(resize, antialias=True), v2.CenterCrop(crop)]
        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
    else:
        # float first: reflect padding is several times slower on uint8 images
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if resize is not None:
            steps.append(v2.Resize(resize, antialias=True))
        crop = 32 if crop is None else crop
        if train:
            pad = crop // 8 if padding is None else padding
            steps.append(v2.RandomCrop(crop, padding=pad or None, padding_mode="reflect"))
            if flip:
                steps.append(v2.RandomHorizontalFlip())
        else:
            steps.append(v2.CenterCrop(crop))
        mean = GENERATED_MEAN if mean is None else mean
        std = GENERATED_STD if std is None else std
    steps += [
        v2.ToDtype(torch.float32, scale=True),  # no-op when already float
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),  # a plain tensor, not a tv_tensors.Image, for the model and collate
    ]
    return v2.Compose(steps)
