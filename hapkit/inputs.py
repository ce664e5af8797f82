"""The checks that every public entry point applies to its array arguments (evaluation, metrics,
losses), so that one bad input is reported the same way wherever it enters."""

from __future__ import annotations

import torch

from hapkit.errors import NonFiniteError

__all__ = ["check_finite"]

_DEFAULT_HINT = "Check the model (diverged training, fp16 overflow) or drop those rows."


def check_finite(values: torch.Tensor, name: str, undefined: str = "a ranking of them is undefined",
                 hint: str = _DEFAULT_HINT) -> None:
    """Raise :class:`hapkit.errors.NonFiniteError` naming ``name`` and its bad rows when
    ``values`` holds a NaN or an infinity.

    The test reads one boolean back from the device: a host synchronisation, which callers in a
    training step skip (see ``HapkitLoss.check_finite``).
    """
    if values.numel() == 0 or not values.dtype.is_floating_point:
        return
    bad = ~torch.isfinite(values.detach())
    if not bool(bad.any()):
        return
    rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten() if bad.dim() else torch.zeros(1, dtype=torch.long)
    n_rows = values.shape[0] if values.dim() else 1
    raise NonFiniteError(
        f"{name} contain {int(bad.sum())} non-finite value(s) (NaN/inf) in {rows.numel()} of {n_rows} "
        f"row(s), first at row {int(rows[0])}; {undefined}. {hint}"
    )
