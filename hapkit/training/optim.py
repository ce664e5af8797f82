"""Optimisers and per-epoch learning-rate schedules for the parameter groups of a recipe.

Each group (``backbone`` and ``head``, or ``net`` for the whole network, plus the loss's own
parameters) gets its own optimiser and scheduler, as in the official HAPPIER / ROADMAP
configurations: e.g. HAPPIER's cluster weights use Adam with lr 10 decayed to 0.1 on SOP while the
network uses Adam with lr 5e-5 / 1e-4, and on iNaturalist they follow the head group
(``optim.loss.follow: head``). Schedules step once per epoch; cosine schedules run over the
recipe's number of epochs (the official ``T_max: ${max_iter}``).
"""

from __future__ import annotations

import torch

from hapkit.training.config import OptimConfig, group_settings

__all__ = ["build_optimizer", "build_scheduler", "build_group", "build_optimizers", "steps_on_host"]


def build_optimizer(params, settings: dict) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum, optional Nesterov) from resolved group settings."""
    params = list(params)
    name, lr, wd = settings["optimizer"], settings["lr"], settings["weight_decay"]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, weight_decay=wd, momentum=settings["momentum"], nesterov=settings["nesterov"]
        )
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


def build_scheduler(optimizer, settings: dict, epochs: int):
    """Per-epoch schedule: cosine to ``eta_min`` over ``epochs``, multistep (``milestones``, ``gamma``) or constant."""
    kind = settings["scheduler"]
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, epochs), eta_min=settings["eta_min"]
        )
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(settings["milestones"]), gamma=settings["gamma"]
        )
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    raise ValueError(f"unknown scheduler {kind!r}; choose cosine, multistep or constant")


def build_group(params, optim: OptimConfig, group: str, epochs: int):
    """(optimizer, scheduler) for one named group, or (None, None) when it has no parameter."""
    params = [p for p in params]
    if not params:
        return None, None
    settings = group_settings(optim, group)
    opt = build_optimizer(params, settings)
    return opt, build_scheduler(opt, settings, epochs)


def build_optimizers(optim: OptimConfig, groups: dict, epochs: int) -> tuple[dict, dict]:
    """One optimiser and one scheduler per named group of parameters (``{group: params}``), in
    the order of ``groups``; groups without a parameter are left out."""
    optimizers, schedulers = {}, {}
    for group, params in groups.items():
        opt, sched = build_group(params, optim, group, epochs)
        if opt is not None:
            optimizers[group], schedulers[group] = opt, sched
    return optimizers, schedulers


def steps_on_host(state: dict) -> dict:
    """An optimiser ``state_dict`` with each ``step`` counter on the CPU, where torch creates it
    unless the group is ``capturable`` or ``fused``; the rest is left as it is.

    ``Optimizer.load_state_dict`` moves every other state tensor to its parameter's device but
    keeps ``step`` where the checkpoint was mapped: a checkpoint loaded with
    ``map_location="cuda"`` would leave the counters on the GPU, and Adam reads them on the host
    at every step (a synchronisation each). A capturable or fused group wants them on the device,
    and ``load_state_dict`` puts them there itself.
    """
    on_device = set()
    for group in state.get("param_groups", ()):
        if group.get("capturable", False) or group.get("fused", False):
            on_device.update(group["params"])
    moved = {
        pid: {k: v.to("cpu") if k == "step" and torch.is_tensor(v) and pid not in on_device else v
              for k, v in per_param.items()}
        for pid, per_param in state.get("state", {}).items()
    }
    return {**state, "state": moved}
