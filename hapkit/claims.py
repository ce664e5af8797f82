"""The sentences the notebooks say about their outputs, as data: one :class:`Claim` each.

A claim is a quantity computed from a notebook's results, a comparison and a threshold
("HAPPIER's family-level neighbour agreement is above SupAP's by more than 3 points" is the gap,
``>``, 3). Its **margin** is the signed distance by which the quantity clears the threshold
(``quantity - threshold`` for ``>``/``>=``, ``threshold - quantity`` for ``<``/``<=``,
``-|quantity - threshold|`` for ``==``): positive (or zero for ``>=``, ``<=``, ``==``) when the
claim holds, and how far from failing it is.

The notebooks check their claims with :func:`check` (through
:func:`hapkit.results.check_claims`, which prints each one and raises
:class:`~hapkit.results.ClaimNotMet`), and ``benchmarks/claims_across_seeds.py`` computes the
margins of the same definitions (:func:`margins`) on several seeds and thread counts: training is
bit-exact on one machine, not across CPUs, so a claim is kept only where its margin clears the
run-to-run spread by far.

``CLAIMS[notebook][group]`` holds the claims one notebook cell checks; each claim's ``quantity``
takes the cell's inputs by name (the names of its parameters) and returns a number. A claim whose
``guaranteed`` is true is a property of the code (a proven bound, an identity), not a measured
difference: its margin is shown, but no seed can move it across its threshold.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from hapkit.results import check_claims

__all__ = ["Claim", "CLAIMS", "claims", "margins", "check", "OPERATORS"]

OPERATORS = (">", ">=", "<", "<=", "==")


@dataclass(frozen=True)
class Claim:
    """A sentence of a notebook about its results: ``quantity(**inputs) <op> threshold``.

    ``text`` may hold ``{name}`` fields, filled from the inputs that are strings or numbers (level
    names, batch sizes). ``unit``
    says what the margin is measured in (``"points"`` of %, ``"ARI"``, ``"queries"``, ...).
    """

    text: str
    quantity: Callable[..., float]
    op: str
    threshold: float = 0.0
    unit: str = ""
    guaranteed: bool = False

    def __post_init__(self):
        if self.op not in OPERATORS:
            raise ValueError(f"op must be one of {OPERATORS}, got {self.op!r}")

    def value(self, **inputs) -> float:
        """The claim's quantity, from the inputs its function names (others are ignored)."""
        names = inspect.signature(self.quantity).parameters
        missing = [n for n in names if n not in inputs]
        if missing:
            raise TypeError(f"claim {self.text!r} needs the inputs {missing}")
        return float(self.quantity(**{n: inputs[n] for n in names}))

    def margin_of(self, value: float) -> float:
        """Signed distance by which ``value`` clears the threshold (NaN stays NaN)."""
        if self.op in (">", ">="):
            return value - self.threshold
        if self.op in ("<", "<="):
            return self.threshold - value
        return -abs(value - self.threshold)

    def margin(self, **inputs) -> float:
        return self.margin_of(self.value(**inputs))

    def holds_at(self, margin: float) -> bool:
        if math.isnan(margin):
            return False
        return margin > 0 if self.op in (">", "<") else margin >= 0

    def holds(self, **inputs) -> bool:
        return self.holds_at(self.margin(**inputs))

    def describe(self, **inputs) -> str:
        """``text`` with its ``{fields}`` filled from the string and number inputs."""
        fields = {k: v for k, v in inputs.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
        return self.text.format(**fields)

    @property
    def statement(self) -> str:
        """The comparison in symbols, e.g. ``"> 3 points"``."""
        return f"{self.op} {self.threshold:g}" + (f" {self.unit}" if self.unit else "")


# ------------------------------------------------------------------------- the quantities


def _min(values) -> float:
    return float(min(float(v) for v in values))


def _max(values) -> float:
    return float(max(float(v) for v in values))


def _max_abs_derivative(along, method):
    return float(along.loc[along["method"] == method, "derivative"].abs().max())


def _max_excess(summary, loss, metric=None):
    rows = summary[summary["loss"] == loss]
    if metric is not None:
        rows = rows[rows["metric"] == metric]
    if rows.empty:
        raise KeyError(f"no rows of {loss} ({metric}) in the bound summary")
    return float(rows["max_excess"].max())


def _further_below_on_random(suprank_summary, metric):
    rows = suprank_summary[suprank_summary["metric"] == metric].set_index("batch_kind")
    below = rows["mean_exact"] - rows["mean_surrogate"]
    return float(below["random"] - below["clustered"])


def _footprint_row(footprint, batch, sub):
    rows = footprint[(footprint["batch_size"] == batch) & (footprint["sub_batch"].fillna(0) == (sub or 0))]
    return rows.iloc[0]


# One group per notebook cell that checks claims; the notebooks call check(notebook, group, ...).
CLAIMS: dict[str, dict[str, tuple[Claim, ...]]] = {
    "02_surrogate_bounds": {
        "ap_along_score": (
            Claim("exact AP has a zero derivative everywhere",
                  lambda along: _max_abs_derivative(along, "exact AP"), "==", 0.0, guaranteed=True),
            Claim("Smooth-AP and SupAP have a non-zero derivative",
                  lambda along: min(_max_abs_derivative(along, "Smooth-AP"), _max_abs_derivative(along, "SupAP")),
                  ">", 0.0, "largest |d/dt|", guaranteed=True),
        ),
        "bounds": (
            Claim("no query where HAPPIER or SupAP exceeds its exact metric",
                  lambda summary: max(_max_excess(summary, "HAPPIER"), _max_excess(summary, "SupAP")),
                  "<=", 1e-6, "surrogate - exact", guaranteed=True),
        ),
        "suprank_bounds": (
            Claim("HAPPIER <= H-AP on every query", lambda summary: _max_excess(summary, "HAPPIER", "H-AP"),
                  "<=", 1e-6, "surrogate - exact", guaranteed=True),
            Claim("SupAP <= AP on every query", lambda summary: _max_excess(summary, "SupAP", "AP"),
                  "<=", 1e-6, "surrogate - exact", guaranteed=True),
            Claim("SupNDCG <= NDCG on every query", lambda suprank_summary: _max_excess(suprank_summary, "SupNDCG", "NDCG"),
                  "<=", 1e-6, "surrogate - exact", guaranteed=True),
            Claim("SupRecall <= sigmoid R@k of the exact ranks on every query",
                  lambda suprank_summary: _max_excess(suprank_summary, "SupRecall", "sigmoid R@k of the exact ranks"),
                  "<=", 1e-6, "surrogate - exact", guaranteed=True),
            Claim("SupRecall <= exact R@k on every query of these batches (not guaranteed)",
                  lambda suprank_summary: _max_excess(suprank_summary, "SupRecall", "R@k"),
                  "<=", 1e-6, "surrogate - exact"),
            Claim("SupRecall further below R@k on random than on clustered batches",
                  lambda suprank_summary: _further_below_on_random(suprank_summary, "R@k"), ">", 0.0, "exact - surrogate"),
            Claim("SupNDCG further below NDCG on random than on clustered batches",
                  lambda suprank_summary: _further_below_on_random(suprank_summary, "NDCG"), ">", 0.0, "exact - surrogate"),
        ),
        "decomposability": (
            Claim("calibration shrinks the fixed-batch gap",
                  lambda gap: float(gap["SupAP", "fixed"] - gap["ROADMAP", "fixed"]), ">", 0.0, "AP"),
        ),
    },
    "04_embedding_space": {
        "organisation": (
            Claim("{coarse} and {middle} neighbours: HAPPIER above SupAP by more than 3 points",
                  lambda gap, middle, coarse: _min(gap[[middle, coarse]]), ">", 3.0, "points"),
            Claim("{fine} level: the two within 5 points",
                  lambda gap, ap_gap, fine: max(abs(float(gap[fine])), abs(float(ap_gap[fine]))), "<", 5.0, "points"),
        ),
        "failures": (
            Claim("HAPPIER has fewer wrong top-1 results in all",
                  lambda failures: float(failures.iloc[-1]["SupAP"] - failures.iloc[-1]["HAPPIER"]), ">", 0.0, "points"),
        ),
        "exercise_2": (
            Claim("HAPPIER's {middle}-level advantage is smaller with k=10 than with the default k",
                  lambda gap, gap_10, middle: float(gap[middle] - gap_10), ">", 0.0, "points"),
        ),
        "exercise_3": (
            Claim("after 2 epochs HAPPIER is not yet ahead of SupAP by more than 5 points on {coarse} neighbours",
                  lambda family_gap_2: float(family_gap_2), "<", 5.0, "points"),
        ),
    },
    "05_ranking_explorer": {
        "better": (
            Claim("HAPPIER better on most queries", lambda better: float(better), ">", 0.5, "fraction of queries"),
        ),
        "largest_gaps": (
            Claim("SupAP's top results for these queries hold more images of other families",
                  lambda other_family, largest: float(sum(other_family["SupAP", q] - other_family["HAPPIER", q]
                                                          for q in largest)),
                  ">", 0.0, "images"),
        ),
    },
    "06_proxies_and_large_batches": {
        "clusters": (
            Claim("the clusters agree with the true shapes and families with an ARI below 0.2",
                  lambda clusters_over_time: float(clusters_over_time["ari"].max()), "<", 0.2, "ARI"),
        ),
        "gradients": (
            Claim("frozen batch-norm: the multi-stage gradient equals the plain one (to 1e-4 of its largest entry)",
                  lambda gradient_checks: float(gradient_checks["frozen batch-norm"]["max_abs_difference"]
                                                / gradient_checks["frozen batch-norm"]["max_abs_gradient"]),
                  "<=", 1e-4, "relative difference", guaranteed=True),
            Claim("trained batch-norm: the multi-stage gradient is another one (ghost batch-norm)",
                  lambda gradient_checks: float(gradient_checks["trained batch-norm"]["max_abs_difference"]
                                                / gradient_checks["trained batch-norm"]["max_abs_gradient"]),
                  ">", 1e-4, "relative difference"),
        ),
        "footprint": (
            Claim("multi-stage peak at {large_batch} < 2 x multi-stage peak at {small_batch}",
                  lambda footprint, small_batch, large_batch, sub_batch: float(
                      _footprint_row(footprint, large_batch, sub_batch).peak_mb
                      / _footprint_row(footprint, small_batch, sub_batch).peak_mb), "<", 2.0, "ratio"),
            Claim("multi-stage step at {large_batch} adds less memory than {ratio} x the plain step at {small_batch}",
                  lambda footprint, small_batch, large_batch, sub_batch, ratio: float(
                      _footprint_row(footprint, large_batch, sub_batch).step_mb
                      / _footprint_row(footprint, small_batch, None).step_mb) / ratio,
                  "<", 1.0, "fraction of the proportional growth"),
            Claim("at {small_batch} images, sub-batches of {sub_batch} add less memory than the plain step",
                  lambda footprint, small_batch, sub_batch: float(
                      _footprint_row(footprint, small_batch, sub_batch).step_mb
                      - _footprint_row(footprint, small_batch, None).step_mb), "<", 0.0, "MB"),
        ),
    },
    "07_reproduction": {
        "happier_vs_supap": (
            Claim("HAPPIER above SupAP on H-AP, ASI, NDCG", lambda gap: _min(gap[["H-AP", "ASI", "NDCG"]]), ">", 0.0, "points"),
        ),
    },
    "08_landmarks": {
        "protocols": (
            Claim("easy first wins the Easy protocol",
                  lambda by_protocol: float(by_protocol.loc["easy first", "AP@easy"] - by_protocol.loc["hard first", "AP@easy"]),
                  ">", 0.0, "AP", guaranteed=True),
            Claim("hard first wins the Hard protocol",
                  lambda by_protocol: float(by_protocol.loc["hard first", "AP@hard"] - by_protocol.loc["easy first", "AP@hard"]),
                  ">", 0.0, "AP", guaranteed=True),
            Claim("junk first scores exactly like easy first under Medium",
                  lambda by_protocol: float(by_protocol.loc["junk first", "AP@medium"] - by_protocol.loc["easy first", "AP@medium"]),
                  "==", 0.0, "AP", guaranteed=True),
        ),
        "junk": (
            Claim("junk as a negative scores lower, as a positive higher, than removed",
                  lambda junk_table: min(float(junk_table["removed (the protocol)"] - junk_table["counted as negative"]),
                                         float(junk_table["counted as positive"] - junk_table["removed (the protocol)"])),
                  ">", 0.0, "AP", guaranteed=True),
        ),
        "ap_forms": (
            Claim("one positive: the trapezoid is the standard AP at rank 1 and half of it below",
                  lambda lone_ratio: max(abs(float(lone_ratio.iloc[0]) - 1), float((lone_ratio.iloc[1:] - 0.5).abs().max())),
                  "<", 1e-12, guaranteed=True),
            Claim("ten positives in a row lose less to the trapezoid than one",
                  lambda gap_lone, gap_block: _min((gap_lone - gap_block).iloc[1:]), ">", 0.0, "AP", guaranteed=True),
        ),
    },
}


def claims(notebook: str, group: str) -> tuple[Claim, ...]:
    """The claims of one notebook cell (``CLAIMS[notebook][group]``), with a helpful error."""
    try:
        groups = CLAIMS[notebook]
    except KeyError:
        raise KeyError(f"no claims for notebook {notebook!r}; known: {sorted(CLAIMS)}") from None
    try:
        return groups[group]
    except KeyError:
        raise KeyError(f"notebook {notebook!r} has no claim group {group!r}; known: {sorted(groups)}") from None


def margins(notebook: str, group: str, **inputs) -> dict[str, float]:
    """``{claim text: margin}`` for one cell's claims on the given inputs."""
    return {c.describe(**inputs): c.margin(**inputs) for c in claims(notebook, group)}


def check(notebook: str, group: str, **inputs) -> dict[str, bool]:
    """Check one cell's claims on its inputs: print each with whether it holds, raise
    :class:`hapkit.results.ClaimNotMet` naming those that do not (:func:`check_claims`)."""
    return check_claims({c.describe(**inputs): c.holds(**inputs) for c in claims(notebook, group)})
