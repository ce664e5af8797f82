"""Embedding networks: backbone -> pooling -> optional LayerNorm -> linear head -> L2 normalisation.

This is the architecture of HAPPIER (Ramzi et al., ECCV 2022) and ROADMAP (Ramzi et al., NeurIPS
2021): an ImageNet ResNet-50 with frozen batch-norm statistics, global average pooling (max
pooling on CUB), a LayerNorm without affine parameters on the 2048-d pooled feature and a linear
layer to a 512-d embedding, L2-normalised so that dot products are cosine similarities.

Backbones by name:

- ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101`` from torchvision (ImageNet weights
  ``IMAGENET1K_V1``, the ones the published numbers were trained from);
- ``timm:<model name>`` for any timm model when timm is installed, e.g. ``timm:deit_small_patch16_224``;
- ``deit_small_distilled``: ROADMAP's DeiT-S (``vit_deit_distilled`` in ``roadmap/models/net.py``):
  timm's plain ``deit_small_patch16_224`` initialised from the *distilled* DeiT-S weights, the
  distillation token and its position embedding dropped; its class token (384-d, after the final
  norm) is the embedding, with ``pooling: default`` and ``linear_head: false``;
- ``small_cnn``: a four-block CNN for the embedded generated dataset, quick on a CPU.

Pretrained weights are fetched through the torch hub cache. Offline, ``pretrained=True`` warns and
starts from random weights; ``pretrained="required"`` raises instead, so that a long GPU run never
silently trains from scratch.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hapkit._lazy import require_extra
from hapkit.errors import HapkitError, InputError

__all__ = [
    "GeM",
    "build_pooling",
    "SmallCNN",
    "EmbeddingModel",
    "build_backbone",
    "build_model",
    "freeze_batchnorm",
    "PretrainedWeightsError",
    "BACKBONES",
]

TORCHVISION_RESNETS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}
BACKBONES = (*TORCHVISION_RESNETS, "small_cnn", "deit_small_distilled", "timm:<name>")


class PretrainedWeightsError(HapkitError, RuntimeError):
    """ImageNet weights were required but could not be loaded."""


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., TPAMI 2018): (mean x^p)^(1/p), p learnable.

    p = 1 is average pooling and p -> inf approaches max pooling; the default p = 3 is the paper's.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 because x ** p overflows bfloat16/float16 for large activations
        p = self.p.float()
        x = x.float().clamp(min=self.eps).pow(p)
        return x.mean(dim=(-2, -1)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3g}, eps={self.eps}"


class _GlobalPool(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return x.mean(dim=(-2, -1))
        return x.amax(dim=(-2, -1))

    def extra_repr(self) -> str:
        return self.kind


def build_pooling(kind: str, gem_p: float = 3.0) -> nn.Module:
    """Global pooling of a (B, C, H, W) feature map to (B, C): ``avg``, ``max`` or ``gem``."""
    if kind in ("avg", "max"):
        return _GlobalPool(kind)
    if kind == "gem":
        return GeM(gem_p)
    raise InputError(f"model.pooling={kind!r} is not a pooling; choose 'avg', 'max' or 'gem'")


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (width, 2w, 4w, 8w channels), each halving the resolution.

    Sized for the 32-48 px images of the generated dataset: a few milliseconds per batch on a CPU.
    Returns the final feature map; pooling is done by :class:`EmbeddingModel`.
    """

    def __init__(self, width: int = 32, in_channels: int = 3):
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 8 * width]
        blocks = []
        for i in range(4):
            blocks += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.num_features = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _fetch_state_dict(url: str) -> dict:
    """Download (or read from the torch hub cache) a state dict; the one place that touches the net."""
    return torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True)


def _unavailable(name: str, error: Exception, pretrained) -> None:
    where = torch.hub.get_dir() + "/checkpoints"
    msg = (
        f"could not load ImageNet weights for {name!r} ({type(error).__name__}: {error}). "
        f"Download them once on a machine with internet access (they are cached in {where}; "
        f"copy that folder here or set TORCH_HOME), or set model.pretrained=false to train from "
        f"random initialisation on purpose."
    )
    if pretrained == "required":
        raise PretrainedWeightsError(msg) from error
    warnings.warn(msg + " Continuing from random initialisation.", RuntimeWarning, stacklevel=3)


def _torchvision_resnet(name: str, pretrained) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if pretrained:
        weights = getattr(torchvision.models, TORCHVISION_RESNETS[name]).IMAGENET1K_V1
        try:
            net.load_state_dict(_fetch_state_dict(weights.url))
        except Exception as e:  # offline, proxy, corrupted cache: all handled alike
            _unavailable(name, e, pretrained)
    dim = net.fc.in_features
    # keep the convolutional trunk: pooling and head are ours
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return trunk, dim


class _TimmTrunk(nn.Module):
    """A timm model returning unpooled features (or its own pooled features with pooling 'default')."""

    def __init__(self, model: nn.Module, own_pooling: bool):
        super().__init__()
        self.model = model
        self.own_pooling = own_pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_pooling:
            return self.model(x)
        feats = self.model.forward_features(x)
        if feats.dim() != 4:
            raise InputError(
                "this timm backbone returns tokens, not a feature map: use model.pooling=default "
                "(the model's own pooling, e.g. the class token)"
            )
        return feats


def _timm_backbone(name: str, pretrained, pooling: str) -> tuple[nn.Module, int]:
    require_extra("timm", "timm", what=f"backbone 'timm:{name}'")
    import timm

    own = pooling == "default"
    kwargs = dict(num_classes=0) if own else dict(num_classes=0, global_pool="")
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise InputError(f"model.backbone=timm:{name}: timm has no model {name!r}; see timm.list_models()") from e
        if not pretrained:
            raise
        _unavailable(f"timm:{name}", e, pretrained)
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # hub / network errors
        if not pretrained:
            raise
        _unavailable(f"timm:{name}", e, pretrained)
        model = timm.create_model(name, pretrained=False, **kwargs)
    return _TimmTrunk(model, own), model.num_features


def distilled_to_plain_deit(state: dict) -> dict:
    """A distilled DeiT state dict (class + distillation tokens) for the plain DeiT architecture:
    the position embedding of the distillation token (index 1) is removed, the distillation token
    and its head are dropped (ROADMAP's ``vit_deit_distilled``)."""
    out = {}
    for key, value in state.items():
        if key in ("dist_token",) or key.startswith("head_dist."):
            continue
        if key == "pos_embed":
            value = torch.cat([value[:, :1], value[:, 2:]], dim=1)
        out[key] = value
    return out


def _deit_small_distilled(pretrained) -> tuple[nn.Module, int]:
    require_extra("timm", "timm", what="backbone 'deit_small_distilled'")
    import timm

    model = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=0)
    if pretrained:
        try:
            teacher = timm.create_model("deit_small_distilled_patch16_224", pretrained=True)
            missing, _ = model.load_state_dict(distilled_to_plain_deit(teacher.state_dict()), strict=False)
            if missing:
                raise RuntimeError(f"parameters missing from the distilled weights: {missing}")
        except Exception as e:  # hub / network errors
            _unavailable("deit_small_distilled", e, pretrained)
    return _TimmTrunk(model, own_pooling=True), model.num_features


def build_backbone(name: str, pretrained=True, pooling: str = "avg", width: int = 32) -> tuple[nn.Module, int]:
    """Return (trunk, feature_dim); the trunk maps images to a (B, C, H, W) feature map.

    With a ``timm:`` backbone and ``pooling='default'`` the trunk returns the model's own pooled
    (B, C) feature instead.
    """
    if name in TORCHVISION_RESNETS:
        return _torchvision_resnet(name, pretrained)
    if name == "small_cnn":
        if pretrained == "required":
            raise PretrainedWeightsError("small_cnn has no pretrained weights; set model.pretrained=false")
        net = SmallCNN(width)
        return net, net.num_features
    if name.startswith("timm:"):
        return _timm_backbone(name[len("timm:"):], pretrained, pooling)
    if name == "deit_small_distilled":
        if pooling != "default":
            raise InputError("backbone deit_small_distilled embeds with its class token: use model.pooling=default")
        return _deit_small_distilled(pretrained)
    raise InputError(f"model.backbone={name!r} is not a known backbone; choose one of {', '.join(BACKBONES)}")


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every batch-norm layer in eval mode: running statistics stay at their pretrained values.

    The affine parameters still train, as in the reference implementations of HAPPIER / ROADMAP.
    Call after ``module.train()`` (:class:`EmbeddingModel` does it for you).
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class EmbeddingModel(nn.Module):
    """backbone -> pooling -> [LayerNorm] -> [dropout] -> [Linear] -> [whitening] -> [L2 normalise].

    Parameters
    ----------
    backbone : nn.Module returning (B, C, H, W) or already pooled (B, C) features.
    feature_dim : C.
    embedding_size : output dimension (512 in HAPPIER/ROADMAP); ignored without a linear head.
    pooling : "avg" | "max" | "gem" | "default" (the backbone pools itself).
    layer_norm : parameter-free LayerNorm on the pooled feature (HAPPIER, ROADMAP).
    linear_head : the linear layer to ``embedding_size``; False: the pooled feature is the
        embedding (ROADMAP's DeiT recipes, ``without_fc``).
    dropout : dropout probability on the feature before the head (0: none).
    normalize : L2-normalise the output (default True; the losses expect it).
    freeze_bn : keep batch-norm statistics frozen during training (default for pretrained models).

    ``whitening`` is the identity unless a learned PCA-whitening is attached after training
    (:func:`hapkit.training.whitening.attach_whitening`, landmark retrieval).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        embedding_size: int = 512,
        pooling: str = "avg",
        gem_p: float = 3.0,
        layer_norm: bool = True,
        normalize: bool = True,
        freeze_bn: bool = True,
        linear_head: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.pool = nn.Identity() if pooling == "default" else build_pooling(pooling, gem_p)
        self.norm = nn.LayerNorm(feature_dim, elementwise_affine=False) if layer_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(feature_dim, embedding_size) if linear_head else nn.Identity()
        self.whitening = nn.Identity()
        self.normalize = normalize
        self.freeze_bn = freeze_bn
        self.embedding_size = embedding_size if linear_head else feature_dim

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            freeze_batchnorm(self.backbone)
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, feature_dim), before LayerNorm and head."""
        x = self.backbone(images)
        return self.pool(x) if x.dim() == 4 else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(images))
        x = self.whitening(self.head(self.dropout(x)))
        if self.normalize:
            # float32: the losses compare similarities at the 1e-2 scale of their temperature
            x = F.normalize(x.float(), dim=-1)
        return x

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the pretrained trunk (including a learnable GeM exponent)."""
        yield from self.backbone.parameters()
        yield from self.pool.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the embedding head (LayerNorm has none)."""
        yield from self.norm.parameters()
        yield from self.head.parameters()


def build_model(cfg) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel` from a recipe's ``model`` section.

    ``cfg`` is a :class:`hapkit.training.config.ModelConfig` or a mapping with the same keys (missing keys
    take the defaults: ResNet-50, ImageNet weights, average pooling, LayerNorm, 512-d, frozen BN).
    """
    from hapkit.training.config import ModelConfig, from_dict

    if not isinstance(cfg, ModelConfig):
        cfg = from_dict(ModelConfig, dict(cfg), "model")
    trunk, dim = build_backbone(cfg.backbone, cfg.pretrained, cfg.pooling, cfg.width)
    if cfg.pooling == "default" and not (cfg.backbone.startswith("timm:") or cfg.backbone == "deit_small_distilled"):
        raise InputError("model.pooling=default is for timm backbones; use avg, max or gem")
    return EmbeddingModel(
        trunk,
        dim,
        embedding_size=cfg.embedding_size,
        pooling=cfg.pooling,
        gem_p=cfg.gem_p,
        layer_norm=cfg.layer_norm,
        normalize=cfg.normalize,
        freeze_bn=cfg.freeze_batchnorm,
        linear_head=cfg.linear_head,
        dropout=cfg.dropout,
    )
