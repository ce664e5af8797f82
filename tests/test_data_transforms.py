"""Transforms: the official ImageNet recipes and the generated-data ones."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from hapkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TestTransform,
    TrainTransform,
    build_transforms,
    describe_transforms,
)


def pil(w=400, h=300, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def normalised(t):
    return (t.float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@pytest.mark.parametrize("square, size", [(True, [256, 256]), (False, [256])])
def test_imagenet_test_transform_resize_then_center_crop(square, size):
    img = pil()
    out = build_transforms("imagenet", train=False, spec=TestTransform(resize=256, square=square, crop=224))(img)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 224, 224)
    # reference written step by step with the functional API: a square resize (SOP) or the
    # shorter side to 256 (iNaturalist, CUB, DyML), then the centre 224 x 224
    t = TF.resize(TF.pil_to_tensor(img), size, antialias=True)
    ref = normalised(TF.center_crop(t, [224, 224]))
    assert torch.allclose(out, ref, atol=1e-5)
    assert build_transforms("imagenet", train=False).transforms[1].size == [256, 256]  # default: SOP's
    whole = build_transforms("imagenet", train=False, spec=TestTransform(resize=224, square=True, crop=None))(img)
    assert torch.allclose(whole, normalised(TF.resize(TF.pil_to_tensor(img), [224, 224], antialias=True)), atol=1e-5)


def test_imagenet_train_transform_with_and_without_a_prior_resize():
    plain = build_transforms("imagenet", train=True, spec=TrainTransform(resize=None, crop=224))
    assert [type(t) for t in plain.transforms][1:3] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    torch.manual_seed(0)
    assert plain(pil()).shape == (3, 224, 224)
    with pytest.raises(TypeError, match="TestTransform"):
        build_transforms("imagenet", train=False, spec=TrainTransform())


def test_describe_transforms_lists_torchvision_steps_and_parameters():
    steps = describe_transforms(build_transforms("imagenet", train=True, spec=TrainTransform(resize=288, crop=256)))
    names = [s["name"] for s in steps]
    assert names == ["ToImage", "Resize", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize", "ToPureTensor"]
    assert steps[1]["size"] == [288] and steps[2]["size"] == [256, 256] and steps[2]["scale"] == [0.16, 1.0]
    assert steps[3]["p"] == 0.5 and steps[5]["mean"] == list(IMAGENET_MEAN)
    import json

    json.dumps(steps)  # plain data


def test_imagenet_train_transform_recipe_and_overrides():
    tf = build_transforms("imagenet", train=True)
    rrc = [t for t in tf.transforms if isinstance(t, v2.RandomResizedCrop)][0]
    assert tuple(rrc.size) == (224, 224) and tuple(rrc.scale) == (0.16, 1.0) and tuple(rrc.ratio) == (0.75, 1.33)
    assert [type(t) for t in tf.transforms][1:4] == [v2.Resize, v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    assert list(tf.transforms[1].size) == [256]
    torch.manual_seed(0)
    assert tf(pil()).shape == (3, 224, 224)
    small = build_transforms("imagenet", train=True, resize=72, crop=64, flip=False)
    assert small(pil()).shape == (3, 64, 64)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in small.transforms)
    assert build_transforms("imagenet", train=False, resize=288, crop=256)(pil()).shape == (3, 256, 256)
    assert build_transforms("imagenet", train=False, resize=288, crop=256, square=False)(pil()).shape == (3, 256, 256)


def test_pil_and_uint8_tensor_inputs_agree():
    img = pil(64, 48)
    tensor = TF.pil_to_tensor(img)
    for kind in ("imagenet", "generated"):
        tf = build_transforms(kind, train=False, crop=32)
        assert torch.allclose(tf(img), tf(tensor), atol=1e-6)


def test_generated_transforms():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    test = build_transforms("generated", train=False)(img)
    assert torch.allclose(test, (img.float() / 255 - 0.5) / 0.25, atol=1e-6)
    train = build_transforms("generated", train=True)
    torch.manual_seed(0)
    outs = [train(img) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random crop / flip
    # colours are never altered: every pixel at the crop's centre is a pixel of the image
    centre = ((outs[0][:, 8:24, 8:24] * 0.25 + 0.5) * 255).round().to(torch.uint8)
    pool = {tuple(c) for c in img.reshape(3, -1).T.tolist()}
    assert all(tuple(c) in pool for c in centre.reshape(3, -1).T.tolist())


def test_unknown_kind():
    with pytest.raises(ValueError, match="imagenet"):
        build_transforms("cifar", train=True)
