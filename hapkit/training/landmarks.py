"""A model on a landmark benchmark (an :class:`~hapkit.data.EvalSet` with a ground truth): embed
its queries, gallery and distractors, apply the test-time processing (multi-scale, α-query
expansion) and score with :func:`hapkit.evaluate.evaluate_revisited`.

A learned whitening is part of the model (:mod:`hapkit.training.whitening`), so it is applied
here whenever the model holds one; :func:`learn_recipe_whitening` learns it after training, as a
recipe's ``train.whitening`` asks.

With ``distributed=True`` (every process of an initialised process group calls the function)
each process embeds its contiguous share of every image set, the shares are all-gathered in
order, and every process scores (or fits on) the whole gathered embeddings: the embedding is the
costly part, the scoring and the PCA are small next to it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hapkit.evaluate import (
    RetrievalResults,
    alpha_query_expansion,
    evaluate_revisited,
    extract_multiscale_embeddings,
)

__all__ = ["embed_landmark_set", "evaluate_landmark_set", "learn_recipe_whitening"]


def _world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    from hapkit.evaluate import _world as process_group_world

    return process_group_world()


def _embed_shares(embed, dataset, distributed: bool) -> torch.Tensor:
    """``embed(part)`` of this process's share of ``dataset``, the shares gathered in order
    (``embed(dataset)`` itself when not distributed)."""
    rank, world = _world(distributed)
    if world == 1:
        return embed(dataset)
    from hapkit.training.distributed import contiguous_share, gather_shares

    part, empty = contiguous_share(dataset, rank, world)
    rows = embed(part)
    return gather_shares(rows[:0] if empty else rows)


def _embed(model, dataset, batch_size, device, scales, power, progress, amp=True, num_workers=0,
           distributed=False) -> torch.Tensor:
    def embed(part):
        loader = torch.utils.data.DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        # every image is resized and combined within its own batch: a share embeds as the whole set does
        emb, _ = extract_multiscale_embeddings(model, loader, scales=scales, power=power, device=device, amp=amp,
                                               progress=progress)
        return emb

    return _embed_shares(embed, dataset, distributed)


def _model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def embed_landmark_set(model, eval_set, batch_size: int = 32, device=None, scales: Sequence[float] | None = None,
                       power: float = 3.0, progress: bool = True, amp: bool = True,
                       num_workers: int = 0, distributed: bool = False) -> dict[str, torch.Tensor | None]:
    """``{"query", "gallery", "distractors"}`` embeddings of a benchmark (``distractors``: None
    without R1M). ``scales``: multi-scale embedding (e.g. ``(1, 2**-0.5, 0.5)``), combined with
    the signed power mean of exponent ``power``; None = single scale. Use ``batch_size=1`` for
    images left at their native, varying, size. ``amp``: autocast on CUDA (True), or to this dtype
    (see :func:`hapkit.evaluate.extract_embeddings`). ``distributed``: each process embeds its
    share of every part, and every process gets the whole gathered embeddings (on the CPU, as
    :func:`hapkit.evaluate.extract_embeddings` returns them)."""
    if eval_set.gnd is None:
        raise ValueError(f"{eval_set.name} has no ground truth (gnd): it is not a landmark benchmark")
    out = {}
    for part in ("query", "gallery", "distractors"):
        ds = getattr(eval_set, part)
        out[part] = None if ds is None else _embed(model, ds, batch_size, device, scales, power, progress, amp,
                                                   num_workers, distributed)
    return out


def evaluate_landmark_set(model, eval_set, *, batch_size: int = 32, device=None, scales: Sequence[float] | None = None,
                          power: float = 3.0, query_expansion: tuple[int, float] | None = None,
                          ks: Sequence[int] = (1, 5, 10), progress: bool = True, amp: bool = True,
                          num_workers: int = 0, distributed: bool = False) -> RetrievalResults:
    """Embed a landmark benchmark (:func:`embed_landmark_set`) and score it with the revisited
    protocol. ``query_expansion``: ``(k, alpha)`` of α-query expansion over the gallery (and
    distractors), off by default as in the published numbers. The expansion and the scoring run
    on ``device`` (default: the model's). ``distributed``: each process embeds its share of the
    benchmark and every process scores the gathered embeddings, so all return the same results."""
    emb = embed_landmark_set(model, eval_set, batch_size, device, scales, power, progress, amp, num_workers,
                             distributed)
    dev = torch.device(device) if device is not None else _model_device(model)
    queries = emb["query"]
    if query_expansion is not None:
        k, alpha = int(query_expansion[0]), float(query_expansion[1])
        database = emb["gallery"] if emb["distractors"] is None else torch.cat([emb["gallery"], emb["distractors"]])
        queries = alpha_query_expansion(queries, database, k=k, alpha=alpha, device=dev)
    results = evaluate_revisited(queries, emb["gallery"], eval_set.gnd, ks=ks, distractor_embeddings=emb["distractors"],
                                 device=dev, progress=progress)
    results.settings.update(benchmark=eval_set.name, scales=None if scales is None else list(scales),
                            query_expansion=None if query_expansion is None else list(query_expansion))
    return results


def learn_recipe_whitening(model, cfg, train_set, device=None, progress: bool = True, distributed: bool = False):
    """The whitening of a recipe's ``train.whitening`` (:class:`~hapkit.training.config.WhiteningConfig`),
    learned on ``train_set`` and attached to ``model`` in place of any previous one; returns it.

    As naver's ``learn_whiten``: the training images are embedded with the recipe's TEST
    transform (not the augmentation) at the evaluation's scales (``eval.scales``, combined with
    ``eval.scale_power``), by the model without whitening, and the PCA is fitted on those
    (L2-normalised) embeddings with ``power`` and ``dim``; ``max_items`` images evenly spread
    (None: all). ``distributed``: each process embeds its share of those images and every process
    fits the gathered embeddings.
    """
    from hapkit.data import spread_subset
    from hapkit.data.builder import recipe_transform, with_transform
    from hapkit.training.whitening import attach_whitening, fit_pca_whitening, unwhitened_embeddings

    spec = cfg.train.whitening
    data = train_set
    if hasattr(data, "transform"):  # the test transform: the whitening sees what the benchmarks see
        data = with_transform(data, recipe_transform(cfg.data, train=False))
    from hapkit.training.engine import resolve_amp

    # the training's autocast dtype on CUDA (bf16 stays bf16); CPU embeds in float32
    dev = torch.device(device) if device is not None else torch.device("cpu")
    amp = (resolve_amp(cfg.train.amp, dev) or False) if dev.type == "cuda" else False

    def embed(part):
        loader = torch.utils.data.DataLoader(part, batch_size=cfg.data.eval_batch_size, shuffle=False,
                                             num_workers=cfg.data.num_workers)
        emb, _ = unwhitened_embeddings(model, loader, device=device, progress=progress, scales=cfg.eval.scales,
                                       scale_power=cfg.eval.scale_power, amp=amp)
        return emb

    embeddings = _embed_shares(embed, spread_subset(data, spec.max_items), distributed)
    whitening = fit_pca_whitening(embeddings, power=spec.power, dim=spec.dim, normalize_input=True)
    attach_whitening(model, whitening)
    return whitening
