"""Embedding models: shapes, normalisation, pooling, batch-norm freezing, parameter groups and
pretrained-weight handling (never downloading anything)."""

import urllib.error
import warnings

import pytest
import torch
import torchvision
from torch import nn

from hapkit.training import models
from hapkit.training.config import ConfigError, ModelConfig
from hapkit.training.models import GeM, PretrainedWeightsError, build_model, build_pooling


@pytest.fixture
def offline(monkeypatch):
    """Make every weight fetch fail as it does without internet access."""
    calls = []

    def fail(url):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(models, "_fetch_state_dict", fail)
    return calls


def small_cfg(**kw):
    base = dict(backbone="small_cnn", pretrained=False, embedding_size=16, width=8, freeze_batchnorm=False)
    base.update(kw)
    return ModelConfig(**base)


def test_small_cnn_embeddings_are_unit_norm_and_float32():
    torch.manual_seed(0)
    model = build_model(small_cfg())
    x = torch.rand(5, 3, 32, 32)
    e = model(x)
    assert e.shape == (5, 16) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))


def test_unnormalised_output_is_the_head_output():
    torch.manual_seed(0)
    model = build_model(small_cfg(normalize=False, layer_norm=False)).eval()
    x = torch.rand(3, 3, 32, 32)
    expected = model.head(model.backbone(x).mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), expected)


def test_layer_norm_has_no_parameters_and_normalises_features():
    model = build_model(small_cfg()).eval()
    assert isinstance(model.norm, nn.LayerNorm) and not list(model.norm.parameters())
    raw = model.features(torch.rand(4, 3, 32, 32))
    mean, var = raw.mean(1, keepdim=True), raw.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(model.norm(raw), (raw - mean) / torch.sqrt(var + 1e-5))


@pytest.mark.parametrize("kind", ["avg", "max", "gem"])
def test_pooling_matches_its_definition(kind):
    x = torch.rand(2, 3, 4, 5) + 0.1
    pool = build_pooling(kind, gem_p=3.0)
    expected = {
        "avg": x.flatten(2).mean(-1),
        "max": x.flatten(2).max(-1).values,
        "gem": x.pow(3).flatten(2).mean(-1).pow(1 / 3),
    }[kind]
    torch.testing.assert_close(pool(x), expected)


def test_gem_is_the_reference_formula_with_its_clamp():
    # Radenović et al. / naver's GeneralizedMeanPoolingP: (avg_pool(clamp(x, eps)^p))^(1/p) per channel
    x = torch.randn(2, 4, 5, 3)  # negative activations are clamped to eps, not raised to p
    gem = GeM(p=2.5, eps=1e-6)
    expected = torch.nn.functional.avg_pool2d(x.clamp(min=1e-6).pow(2.5), (5, 3)).pow(1 / 2.5).flatten(1)
    torch.testing.assert_close(gem(x), expected)
    (gem(x).sum()).backward()
    p = torch.tensor(2.5, requires_grad=True)
    x.clamp(min=1e-6).pow(p).mean((2, 3)).pow(1 / p).sum().backward()
    torch.testing.assert_close(gem.p.grad, p.grad)  # the exponent learns with the reference's gradient


def test_resnet101_gem_is_revauds_architecture(offline):
    # ResNet-101 -> GeM (p = 3, learnable) -> FC 2048 -> 2048 with bias -> L2 (naver's Resnet101-AP-GeM)
    model = build_model(ModelConfig(backbone="resnet101", pretrained=False, pooling="gem", layer_norm=False,
                                    embedding_size=2048)).eval()
    assert isinstance(model.pool, GeM) and model.pool.p.item() == 3.0
    assert model.head.in_features == 2048 and model.head.bias is not None
    e = model(torch.rand(1, 3, 64, 64))
    assert e.shape == (1, 2048) and torch.allclose(e.norm(dim=1), torch.ones(1))


def test_gem_exponent_is_learnable_and_in_the_backbone_group():
    model = build_model(small_cfg(pooling="gem"))
    assert isinstance(model.pool, GeM)
    assert any(p is model.pool.p for p in model.backbone_parameters())
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert model.pool.p.grad is not None


def test_parameter_groups_partition_the_model():
    model = build_model(small_cfg(pooling="gem"))
    groups = [set(map(id, model.backbone_parameters())), set(map(id, model.head_parameters()))]
    assert not groups[0] & groups[1]
    assert groups[0] | groups[1] == set(map(id, model.parameters()))
    assert set(map(id, model.head_parameters())) == set(map(id, model.head.parameters()))


def test_frozen_batchnorm_keeps_running_statistics_in_train_mode():
    model = build_model(small_cfg(freeze_batchnorm=True)).train()
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(not m.training for m in bn)
    before = [m.running_mean.clone() for m in bn]
    model(torch.rand(8, 3, 32, 32) * 5)
    for m, b in zip(bn, before):
        torch.testing.assert_close(m.running_mean, b)
    assert all(m.weight.requires_grad for m in bn)  # the affine part still trains
    assert model.head.training


def test_trainable_batchnorm_updates_statistics():
    model = build_model(small_cfg(freeze_batchnorm=False)).train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.rand(8, 3, 32, 32) * 5)
    assert not torch.equal(bn.running_mean, before)


def test_resnet_trunk_and_head_shapes(offline):
    model = build_model(ModelConfig(backbone="resnet18", pretrained=False, embedding_size=32))
    assert not offline  # pretrained=False never fetches
    e = model.eval()(torch.rand(2, 3, 64, 64))
    assert e.shape == (2, 32)
    assert model.head.in_features == 512


def test_pretrained_offline_warns_and_falls_back_to_random_init(offline):
    with pytest.warns(RuntimeWarning, match="could not load ImageNet weights for 'resnet18'"):
        model = build_model(ModelConfig(backbone="resnet18", pretrained=True, embedding_size=8))
    assert len(offline) == 1 and "resnet18" in offline[0]
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 8)


def test_required_pretrained_weights_raise_offline(offline):
    with pytest.raises(PretrainedWeightsError, match="pretrained=false"):
        build_model(ModelConfig(backbone="resnet18", pretrained="required"))


def test_pretrained_weights_are_loaded_when_available(monkeypatch):
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    urls = []

    def fetch(url):
        urls.append(url)
        return reference

    monkeypatch.setattr(models, "_fetch_state_dict", fetch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(ModelConfig(backbone="resnet18", pretrained="required"))
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    torch.testing.assert_close(model.backbone[0].weight, reference["conv1.weight"])
    torch.testing.assert_close(model.backbone[7][1].conv2.weight, reference["layer4.1.conv2.weight"])


def test_unknown_backbone_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match="model.backbone='resnet5' is not a known backbone"):
        build_model(ModelConfig(backbone="resnet5"))
    with pytest.raises(ConfigError, match="model.pooling"):
        build_model({"backbone": "small_cnn", "pooling": "mean"})
    with pytest.raises(PretrainedWeightsError):
        build_model(small_cfg(pretrained="required"))


def test_timm_backbone_without_download():
    pytest.importorskip("timm")
    model = build_model(ModelConfig(backbone="timm:resnet18", pretrained=False, embedding_size=8, pooling="gem"))
    assert model.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 8)
    # pooling "default": the model pools itself (a ViT's class token, here a CNN's average)
    own = build_model(ModelConfig(backbone="timm:resnet18", pretrained=False, embedding_size=8, pooling="default"))
    assert own.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 8)
    assert isinstance(own.pool, torch.nn.Identity)
    with pytest.raises(ValueError, match="for timm backbones"):
        build_model(ModelConfig(backbone="resnet18", pretrained=False, pooling="default"))


def test_bf16_autocast_forward_gives_float32_unit_embeddings():
    model = build_model(small_cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = model(torch.rand(3, 3, 32, 32))
    assert e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))


def test_distilled_deit_weights_load_into_the_plain_deit():
    """ROADMAP's vit_deit_distilled: the distillation token and its position embedding dropped."""
    timm = pytest.importorskip("timm")
    from hapkit.training.models import distilled_to_plain_deit

    teacher = timm.create_model("deit_small_distilled_patch16_224", pretrained=False)
    plain = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0)
    state = distilled_to_plain_deit(teacher.state_dict())
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not missing and all(k.startswith("head.") for k in unexpected)
    pos = teacher.state_dict()["pos_embed"]
    torch.testing.assert_close(plain.pos_embed, torch.cat([pos[:, :1], pos[:, 2:]], dim=1))
    torch.testing.assert_close(plain.cls_token, teacher.cls_token)
    torch.testing.assert_close(plain.blocks[3].attn.qkv.weight, teacher.blocks[3].attn.qkv.weight)
    assert "dist_token" not in state and not any(k.startswith("head_dist") for k in state)


def test_deit_class_token_is_the_embedding_without_a_head():
    pytest.importorskip("timm")
    model = build_model({"backbone": "deit_small_distilled", "pretrained": False, "pooling": "default",
                         "layer_norm": False, "linear_head": False, "freeze_batchnorm": False})
    assert model.embedding_size == 384 and isinstance(model.head, torch.nn.Identity)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model.eval()(x)
        tokens = model.backbone.model.forward_features(x)  # (2, 197, 384) after the final norm
    torch.testing.assert_close(out, torch.nn.functional.normalize(tokens[:, 0], dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pooling=default"):
        build_model({"backbone": "deit_small_distilled", "pretrained": False, "pooling": "avg"})


def test_dropout_before_the_head_is_active_in_training_only():
    model = build_model({"backbone": "small_cnn", "pretrained": False, "width": 4, "embedding_size": 8, "dropout": 0.5})
    x = torch.randn(4, 3, 16, 16)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
