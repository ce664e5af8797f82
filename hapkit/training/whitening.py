"""Learned PCA-whitening of embeddings, the post-processing of landmark retrieval.

Revaud et al. (ICCV 2019; naver/deep-image-retrieval) learn a PCA on the L2-normalised
descriptors of a training set (Landmarks-clean) and map each descriptor x to

    y = diag(λ)^(-power) U (x - mean),   then L2-normalise y,

with U the principal directions (rows, by decreasing variance λ). ``power = 0.5`` is full
whitening; their reported numbers use ``power = 0.25``, a shrunk whitening that divides each
component by the fourth root of its variance only. SupRank (whiten_utils.py) and cirtorch's
PCA-whitening use full whitening (0.5). A global scale of λ (n or n - 1 in the covariance) does
not matter once y is L2-normalised.

:class:`PCAWhitening` holds (mean, projection) as buffers, so it is saved in a model's state dict
and never trained; :func:`attach_whitening` puts it in an :class:`~hapkit.training.models.EmbeddingModel`
between the head and the final L2 normalisation; :func:`learn_whitening` does both from a loader.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PCAWhitening", "fit_pca_whitening", "attach_whitening", "ensure_whitening", "remove_whitening",
    "unwhitened_embeddings", "learn_whitening",
]

REVAUD_POWER = 0.25  # naver's --whitenp default, behind the ROxford / RParis numbers of the paper
_ROWS_PER_STEP = 65536  # rows of features accumulated at a time (float64 copies stay small)
_RANK_TOLERANCE = 1e-10  # components with less variance (relative to the largest) are dropped


class PCAWhitening(nn.Module):
    """``x -> diag(λ)^(-power) U (x̂ - mean)``, x̂ = x L2-normalised when ``normalize_input``.

    Built empty with the right shapes (to load a state dict) or by :func:`fit_pca_whitening`.
    The output is not normalised: the model (or the caller) does that afterwards.
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, normalize_input: bool = True, power: float = REVAUD_POWER):
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("projection", torch.eye(out_dim, in_dim))
        self.register_buffer("normalize_input", torch.tensor(bool(normalize_input)))
        self.register_buffer("power", torch.tensor(float(power)))

    @property
    def in_dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.projection.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 with autocast off: under autocast the product would round the projection (and
        # the small whitened components) to half precision
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if bool(self.normalize_input):
                x = F.normalize(x, dim=-1)
            return (x - self.mean) @ self.projection.T

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}, power={float(self.power):g}, normalize_input={bool(self.normalize_input)}"


def _rows(features):
    t = torch.as_tensor(np.asarray(features)) if not isinstance(features, torch.Tensor) else features
    if t.dim() != 2 or t.shape[0] < 2:
        raise ValueError(f"features must be an (N, D) array with N >= 2, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("features contain NaN or inf; a PCA of them is undefined")
    return t.detach()


def fit_pca_whitening(features, power: float = REVAUD_POWER, dim: int | None = None, normalize_input: bool = True) -> PCAWhitening:
    """Learn a :class:`PCAWhitening` from ``features`` (N, D), e.g. a model's embeddings of a
    training set.

    Args:
        power: exponent of the variance each component is divided by: 0.5 full whitening, 0.25
            Revaud et al.'s shrunk whitening (default), 0 a plain PCA rotation.
        dim: number of components kept (default: all of non-zero variance, at most min(D, N - 1)).
        normalize_input: L2-normalise the features before the PCA, and every input later (the
            module is fitted and applied on the same, normalised, vectors).

    Computed in float64 from the D x D covariance, accumulated over blocks of rows, so N may be
    large. Component signs are fixed (largest coefficient positive) so that a fit is reproducible.
    """
    if power < 0:
        raise ValueError(f"power must be >= 0 (0.5: full whitening, 0.25: Revaud et al.), got {power}")
    x = _rows(features)
    n, d = x.shape

    def blocks():
        for start in range(0, n, _ROWS_PER_STEP):
            b = x[start:start + _ROWS_PER_STEP].to("cpu", torch.float64)
            yield F.normalize(b, dim=1) if normalize_input else b

    mean = sum(b.sum(0) for b in blocks()) / n
    cov = sum((b - mean).T @ (b - mean) for b in blocks()) / (n - 1)
    var, vecs = torch.linalg.eigh(cov)  # ascending
    var, vecs = var.flip(0), vecs.flip(1).T  # rows = directions, by decreasing variance
    rank = int((var > _RANK_TOLERANCE * var[0].clamp(min=1e-300)).sum())
    if dim is None:
        dim = rank
    if not 1 <= dim <= rank:
        raise ValueError(
            f"dim={dim} components asked, but the {n} features of dimension {d} have {rank} of non-zero variance"
        )
    var, vecs = var[:dim], vecs[:dim]
    signs = torch.sign(vecs.gather(1, vecs.abs().argmax(1, keepdim=True)))
    vecs = vecs * signs
    module = PCAWhitening(d, dim, normalize_input=normalize_input, power=power)
    module.mean.copy_(mean.float())
    module.projection.copy_((vecs / var.pow(power)[:, None]).float())
    return module


def _unwhitened_size(model: nn.Module) -> int:
    """Dimension of the model's embeddings before its whitening (the head's output)."""
    if not hasattr(model, "whitening") or not hasattr(model, "embedding_size"):
        raise TypeError(f"{type(model).__name__} has no whitening slot; use hapkit.training.models.EmbeddingModel")
    current = model.whitening
    return current.in_dim if isinstance(current, PCAWhitening) else int(model.embedding_size)


def attach_whitening(model: nn.Module, whitening: PCAWhitening) -> nn.Module:
    """Put ``whitening`` in ``model`` (an :class:`~hapkit.training.models.EmbeddingModel`), applied
    to the head's output before the final L2 normalisation, in place of any previous one; it is
    then part of the state dict."""
    size = _unwhitened_size(model)
    if whitening.in_dim != size:
        raise ValueError(f"the whitening takes {whitening.in_dim}-d inputs but the model's head gives {size}")
    device = next((p.device for p in model.parameters()), whitening.mean.device)
    model.whitening = whitening.to(device)
    model.embedding_size = whitening.out_dim
    return model


def ensure_whitening(model: nn.Module, state_dict, prefix: str = "whitening.") -> nn.Module:
    """Before ``model.load_state_dict(state_dict)``: when the state dict holds a whitening, give
    the model an (empty) one of the same shape so that the weights load into it."""
    key = prefix + "projection"
    if key in state_dict and not isinstance(getattr(model, "whitening", None), PCAWhitening):
        out_dim, in_dim = state_dict[key].shape
        attach_whitening(model, PCAWhitening(in_dim, out_dim))
    return model


def remove_whitening(model: nn.Module) -> nn.Module:
    """Take a learned whitening out of ``model`` (the head's output is the embedding again)."""
    size = _unwhitened_size(model)
    model.whitening, model.embedding_size = nn.Identity(), size
    return model


def unwhitened_embeddings(model: nn.Module, loader, device=None, progress: bool = True, scales=None,
                          scale_power: float = 3.0, amp: bool = True):
    """Embeddings and labels of ``loader`` by ``model`` without its whitening (what
    :func:`fit_pca_whitening` learns from), the model's whitening left in place: several
    whitenings (powers, subsets) can be fitted from one pass over the images. ``scales``: a
    multi-scale embedding combined with the power mean of ``scale_power`` (None: one scale), as
    the benchmarks are embedded."""
    from hapkit.evaluate import extract_multiscale_embeddings

    previous, size = getattr(model, "whitening", None), model.embedding_size
    model.whitening, model.embedding_size = nn.Identity(), _unwhitened_size(model)
    try:
        return extract_multiscale_embeddings(model, loader, scales=scales, power=scale_power, device=device, amp=amp,
                                             progress=progress)
    finally:
        model.whitening, model.embedding_size = previous, size


def learn_whitening(model: nn.Module, loader, power: float = REVAUD_POWER, dim: int | None = None, device=None,
                    progress: bool = True, scales=None, scale_power: float = 3.0, amp: bool = True) -> PCAWhitening:
    """Embed ``loader`` (a training set) with ``model`` without whitening
    (:func:`unwhitened_embeddings`), fit a PCA-whitening on those embeddings and attach it to the
    model (replacing any previous one); return it."""
    embeddings, _ = unwhitened_embeddings(model, loader, device=device, progress=progress, scales=scales,
                                          scale_power=scale_power, amp=amp)
    whitening = fit_pca_whitening(embeddings, power=power, dim=dim, normalize_input=True)
    attach_whitening(model, whitening)
    return whitening
