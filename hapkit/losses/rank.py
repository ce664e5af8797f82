"""Smoothed step functions and smoothed ranks shared by the rank losses.

The rank of item k for query q is 1 + sum_j step(s_qj - s_qk). Replacing the step by a smooth
function gives a differentiable rank; which smooth function decides whether the surrogate bounds
the true metric (SPEC.md, "Batch surrogates").
"""

from __future__ import annotations

import torch

__all__ = ["sigmoid_step", "upper_step", "heaviside_step"]


def sigmoid_step(d: torch.Tensor, tau: float) -> torch.Tensor:
    """sigmoid(d / tau) with the exponent clamped to [-50, 50] (Smooth-AP's relaxation)."""
    return torch.sigmoid((d / tau).clamp(-50.0, 50.0))


def upper_step(
    d: torch.Tensor,
    tau: float = 0.01,
    rho: float = 100.0,
    delta: float = 0.05,
    start: float = 0.5,
    offset: float = 1.44,
    paper_branch: bool = False,
) -> torch.Tensor:
    """SupRank/ROADMAP step, >= the Heaviside step everywhere, so smoothed ranks bound true ranks.

    d <= 0: sigmoid_tau(d); 0 < d <= delta: start + sigmoid_tau(d); d > delta: linear with slope
    rho, rho * (d - delta) + offset (``paper_branch=True``: rho * d + offset, the branch the
    ROADMAP paper's numbers were trained with).
    """
    sig = sigmoid_step(d, tau)
    lin = rho * (d if paper_branch else d - delta) + offset
    return torch.where(d <= 0, sig, torch.where(d <= delta, start + sig, lin))


def heaviside_step(d: torch.Tensor) -> torch.Tensor:
    """Exact step H(d) = 1 for d >= 0, else 0, carrying no gradient (as in the reference code)."""
    return (d >= 0).to(d.dtype)
