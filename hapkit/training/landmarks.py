"""A model on a landmark benchmark (an :class:`~hapkit.data.EvalSet` with a ground truth): embed
its queries, gallery and distractors, apply the test-time processing (multi-scale, α-query
expansion) and score with :func:`hapkit.evaluate.evaluate_revisited`.

A learned whitening is part of the model (:mod:`hapkit.training.whitening`), so it is applied
here whenever the model holds one.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hapkit.evaluate import (
    RetrievalResults,
    alpha_query_expansion,
    evaluate_revisited,
    extract_embeddings,
    extract_multiscale_embeddings,
)

__all__ = ["embed_landmark_set", "evaluate_landmark_set"]


def _embed(model, dataset, batch_size, device, scales, power, progress) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    if scales is None or tuple(scales) == (1,):
        emb, _ = extract_embeddings(model, loader, device=device, progress=progress)
    else:
        emb, _ = extract_multiscale_embeddings(model, loader, scales=scales, power=power, device=device, progress=progress)
    return emb


def embed_landmark_set(model, eval_set, batch_size: int = 32, device=None, scales: Sequence[float] | None = None,
                       power: float = 3.0, progress: bool = True) -> dict[str, torch.Tensor | None]:
    """``{"query", "gallery", "distractors"}`` embeddings of a benchmark (``distractors``: None
    without R1M). ``scales``: multi-scale embedding (e.g. ``(1, 2**-0.5, 0.5)``), combined with
    the signed power mean of exponent ``power``; None = single scale. Use ``batch_size=1`` for
    images left at their native, varying, size."""
    if eval_set.gnd is None:
        raise ValueError(f"{eval_set.name} has no ground truth (gnd): it is not a landmark benchmark")
    out = {}
    for part in ("query", "gallery", "distractors"):
        ds = getattr(eval_set, part)
        out[part] = None if ds is None else _embed(model, ds, batch_size, device, scales, power, progress)
    return out


def evaluate_landmark_set(model, eval_set, *, batch_size: int = 32, device=None, scales: Sequence[float] | None = None,
                          power: float = 3.0, query_expansion: tuple[int, float] | None = None,
                          ks: Sequence[int] = (1, 5, 10), progress: bool = True) -> RetrievalResults:
    """Embed a landmark benchmark (:func:`embed_landmark_set`) and score it with the revisited
    protocol. ``query_expansion``: ``(k, alpha)`` of α-query expansion over the gallery (and
    distractors), off by default as in the published numbers."""
    emb = embed_landmark_set(model, eval_set, batch_size, device, scales, power, progress)
    queries = emb["query"]
    if query_expansion is not None:
        k, alpha = query_expansion
        database = emb["gallery"] if emb["distractors"] is None else torch.cat([emb["gallery"], emb["distractors"]])
        queries = alpha_query_expansion(queries, database, k=k, alpha=alpha)
    results = evaluate_revisited(queries, emb["gallery"], eval_set.gnd, ks=ks, distractor_embeddings=emb["distractors"],
                                 progress=progress)
    results.settings.update(benchmark=eval_set.name, scales=None if scales is None else list(scales),
                            query_expansion=None if query_expansion is None else list(query_expansion))
    return results
