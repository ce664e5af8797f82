"""Dense (B, B, B) forms of the rank losses, written the way the reference implementations are.

They are the baseline of ``bench_losses.py``: every (query, item, competitor) triple is one
element of a tensor, so memory grows as B**3. Same-batch semantics (the query is its own top
positive), float32, default hyperparameters of each paper.
"""

from __future__ import annotations

import torch

from hapkit.losses.rank import heaviside_step, sigmoid_step, upper_step


def _differences(emb: torch.Tensor):
    scores = emb @ emb.T
    B = scores.shape[0]
    not_self = 1.0 - torch.eye(B, device=emb.device)[None]  # [., k, j]: j != k
    return scores[:, None, :] - scores[:, :, None], not_self  # [q, k, j] = s_qj - s_qk


def _shared_levels(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, None, :] == labels[None, :, :]).sum(-1)


def dense_hap_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HAPPIER H-AP loss (SOP config), 'pop' relevance counted over the batch."""
    L = labels.shape[1]
    V = _shared_levels(labels)
    counts = torch.stack([(V == v).sum(1) for v in range(L + 1)], 1).float()
    weights = torch.arange(L + 1, device=emb.device, dtype=torch.float32)
    rel = (weights / counts.clamp(min=1)).gather(1, V)
    d, not_self = _differences(emb)
    less = V[:, None, :] < V[:, :, None]
    rank = 1.0 + (torch.where(less, upper_step(d), heaviside_step(d)) * not_self).sum(-1)
    min_rel = torch.minimum(rel[:, None, :], rel[:, :, None])
    h_rank = rel + (heaviside_step(d) * not_self * min_rel).sum(-1)
    return 1.0 - ((h_rank / rank).sum(-1) / rel.sum(-1)).mean()


def dense_supap_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROADMAP SupAP on the finest level (corrected linear branch)."""
    pos = (labels[:, None, 0] == labels[None, :, 0]).float()
    d, not_self = _differences(emb)
    steps = torch.where(pos[:, None, :].bool(), heaviside_step(d), upper_step(d)) * not_self
    rank = 1.0 + steps.sum(-1)
    rank_pos = (1.0 + (heaviside_step(d) * not_self * pos[:, None, :]).sum(-1)) * pos
    return 1.0 - ((rank_pos / rank).sum(-1) / pos.sum(-1)).mean()


def dense_smoothap_loss(emb: torch.Tensor, labels: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """Smooth-AP (Brown et al. 2020): sigmoid for every competitor j != k."""
    pos = (labels[:, None, 0] == labels[None, :, 0]).float()
    d, not_self = _differences(emb)
    sig = sigmoid_step(d, tau) * not_self
    rank = 1.0 + sig.sum(-1)
    rank_pos = 1.0 + (sig * pos[:, None, :]).sum(-1)
    return 1.0 - ((rank_pos / rank * pos).sum(-1) / pos.sum(-1)).mean()


def _suprank(emb: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    d, not_self = _differences(emb)
    return 1.0 + (torch.where(lower, upper_step(d), heaviside_step(d)) * not_self).sum(-1)


def dense_suprecall_loss(emb, labels, ks=(1, 2, 4, 8, 16), temp: float = 1.0) -> torch.Tensor:
    """SupRank recall@k surrogate on the finest level."""
    pos = labels[:, None, 0] == labels[None, :, 0]
    rank = _suprank(emb, pos[:, :, None] & ~pos[:, None, :])  # negatives rank below positives
    n_pos = pos.sum(1).float()
    recall = sum(
        (sigmoid_step(k - rank, temp) * pos).sum(1) / n_pos.clamp(max=k) for k in ks
    ) / len(ks)
    return 1.0 - recall.mean()


def dense_supndcg_loss(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SupRank NDCG surrogate, gains 2**V - 1 over all levels."""
    V = _shared_levels(labels)
    rank = _suprank(emb, V[:, None, :] < V[:, :, None])
    gains = 2.0 ** V.float() - 1.0
    dcg = (gains / torch.log2(1.0 + rank)).sum(1)
    ideal_gains = gains.sort(dim=1, descending=True).values
    positions = torch.arange(1, V.shape[1] + 1, device=emb.device, dtype=torch.float32)
    ideal = (ideal_gains / torch.log2(1.0 + positions)).sum(1)
    return 1.0 - (dcg / ideal).mean()
