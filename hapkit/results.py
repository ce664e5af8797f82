"""The one ``metrics.json`` schema, and the tables built from it.

Every notebook that produces numbers, and every run of the reproduction grid, writes one
``<output_dir>/metrics.json`` with :func:`write_metrics`:

.. code-block:: json

    {"schema": 1, "notebook": "...", "parameters": {...}, ...,
     "metrics": {"<set>/<metric>": 0.61, ...},
     "tables": {"<name>": [{"column": value, ...}, ...]}}

``metrics`` is flat (a name -> a float, names such as ``test/H-AP`` or ``trained/AP@1``); ``tables``
holds the small DataFrames a notebook shows, as records; any other key is information about the run
(its parameters, recipe, seed, level names). :func:`read_metrics` reads it back and checks it.

The tables: :func:`metrics_frame` (one run's flat metrics, one row per metric, one column per set),
:func:`metrics_table` (several evaluations side by side), :func:`headline_metrics` (the numbers a
summary compares), :func:`collect_runs` / :func:`summarize` / :func:`format_markdown` /
:func:`write_summary` (mean +/- std over seeds beside the published numbers, with the command
that reproduces each row).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from hapkit.errors import MissingFileError

__all__ = [
    "ClaimNotMet",
    "check_claims",
    "METRICS_FILE",
    "SCHEMA_VERSION",
    "write_metrics",
    "read_metrics",
    "metrics_frame",
    "metrics_table",
    "headline_metrics",
    "collect_runs",
    "summarize",
    "published_table",
    "format_markdown",
    "write_summary",
    "organisation_table",
    "failure_table",
    "compare_methods",
    "reproduce_command",
]

METRICS_FILE = "metrics.json"
SCHEMA_VERSION = 1


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, pd.DataFrame):
        return json.loads(v.to_json(orient="records"))
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    return v


def write_metrics(output_dir, metrics: Mapping[str, float], *, tables: Mapping | None = None, **info) -> Path:
    """Write ``<output_dir>/metrics.json`` atomically (complete or absent, never half-written: the
    reproduction grid takes an existing file as a finished run).

    ``metrics``: flat ``{name: value}``; ``tables``: ``{name: DataFrame or list of records}``;
    ``info``: anything else worth keeping beside the numbers (parameters, recipe, level names).
    """
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float, np.integer, np.floating))]
    if bad:
        raise TypeError(f"metrics must map names to numbers; not numbers: {bad[:5]} (put tables in tables=)")
    reserved = {"schema", "metrics", "tables"} & set(info)
    if reserved:
        raise ValueError(f"{sorted(reserved)} are fields of the metrics.json schema, not information keys")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"schema": SCHEMA_VERSION, **_jsonable(info), "metrics": {str(k): float(v) for k, v in metrics.items()}}
    if tables:
        payload["tables"] = _jsonable(dict(tables))
    path = out / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def read_metrics(path) -> dict:
    """The content of a ``metrics.json`` (or of ``<dir>/metrics.json``), checked against the schema."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"no {METRICS_FILE} at {path}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and run again") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{path} is not a hapkit metrics file: it has no 'metrics' mapping")
    return data


# ------------------------------------------------------------------------ one run's tables


def _level_name(name: str, level_names) -> str:
    if level_names and "@" in name:
        head, _, col = name.rpartition("@")
        if col.isdigit() and int(col) < len(level_names):
            return f"{head}@{level_names[int(col)]}"
    return name


def metrics_frame(metrics: Mapping[str, float], level_names=None) -> pd.DataFrame:
    """A tidy table of flat ``"<set>/<metric>"`` results: one row per metric (label columns named
    by ``level_names``), one column per set, in %."""
    rows: dict = {}
    for key, value in metrics.items():
        where, name = key.split("/", 1) if "/" in key else ("", key)
        rows.setdefault(_level_name(name, level_names), {})[where] = 100.0 * value
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "metric (%)"
    return frame.round(2)


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith("@*"):
        head = pattern[:-2]
        return name.startswith(head + "@") and name[len(head) + 1 :].isdigit()
    return name == pattern


def metrics_table(
    results: Mapping[str, object],
    level_names: Sequence[str] | None = None,
    metrics: Sequence[str] | None = ("H-AP", "ASI", "NDCG", "AP@*", "R@1@*"),
) -> pd.DataFrame:
    """Side-by-side summary of several :class:`hapkit.evaluate.RetrievalResults` (or summary
    dicts), in %: one row per metric (label columns named by ``level_names``), one column per
    entry of ``results``. ``metrics`` selects names, ``*`` standing for every label column
    (None: all)."""
    if not results:
        raise ValueError("no results to tabulate")
    summaries = {name: dict(getattr(res, "summary", res)) for name, res in results.items()}
    names = list(dict.fromkeys(k for s in summaries.values() for k in s))
    if metrics is not None:  # in the order of the patterns, then of the summaries
        available = names
        names = [k for m in metrics for k in available if _matches(k, m)]
        if not names:
            raise ValueError(f"no metric matches {list(metrics)}; available: {available}")
    flat = {f"{name}/{k}": float(s[k]) for k in names for name, s in summaries.items() if k in s}
    return metrics_frame(flat, level_names)[list(results)]


def organisation_table(metrics: Mapping[str, Mapping[str, float]], level_names: Sequence[str], k: int) -> pd.DataFrame:
    """Per label column (rows, finest first, named by ``level_names``), for each model: the
    fraction of k nearest neighbours sharing the label (``kNN@k <model>``) and the binary AP at
    that level (``AP <model>``), in %. ``metrics`` maps a model name to its flat metrics (those of
    :func:`hapkit.evaluate.neighbourhood_metrics` and of :func:`hapkit.evaluate.evaluate`)."""
    rows = {}
    for c, level in enumerate(level_names):
        row = {}
        for name, m in metrics.items():
            row[f"kNN@{k} {name}"] = 100.0 * m.get(f"kNN@{k}@{c}", math.nan)
        for name, m in metrics.items():
            row[f"AP {name}"] = 100.0 * m.get(f"AP@{c}", math.nan)
        rows[level] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "level"
    return table


def failure_table(metrics: Mapping[str, Mapping[str, float]], level_names: Sequence[str]) -> pd.DataFrame:
    """HAPPIER's failure-severity analysis: for the queries whose top-1 is not of their fine
    class, how many levels that top-1 shares with them (rows: ``shares v levels (...)``, v = 0 the
    most severe), as % of all queries per model, with the total of wrong top-1s last."""
    L = len(level_names)
    index = []
    for v in range(L):
        what = "not even the " + level_names[-1] if v == 0 else f"same {level_names[L - v]}, other {level_names[L - v - 1]}"
        index.append(f"shares {v} level{'s' if v != 1 else ''} ({what})")
    table = pd.DataFrame(
        {name: [100.0 * m.get(f"top1 wrong#{v}", math.nan) for v in range(L)] + [100.0 * m.get("top1 wrong", math.nan)]
         for name, m in metrics.items()},
        index=[*index, "top-1 wrong (all)"],
    )
    table.index.name = "wrong top-1"
    return table


def headline_metrics(metrics: Mapping[str, float]) -> dict:
    """The metrics the summary compares, without their eval-set prefix.

    From the ``overall/`` means when the dataset has several eval sets (DyML), otherwise from the
    first eval set: ``R@1`` (finest level), ``AP@c`` for every label column c, ``H-AP``, ``ASI``,
    ``NDCG``.
    """
    prefixes = sorted({k.split("/", 1)[0] for k in metrics if "/" in k})
    if not prefixes:
        return {}
    prefix = "overall" if "overall" in prefixes else prefixes[0]
    own = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(prefix + "/")}
    out = {}
    if "R@1@0" in own:
        out["R@1"] = own["R@1@0"]
    columns = sorted(int(k[3:]) for k in own if k.startswith("AP@") and k[3:].isdigit())
    out.update({f"AP@{c}": own[f"AP@{c}"] for c in columns})
    out.update({k: own[k] for k in ("H-AP", "ASI", "NDCG") if k in own})
    return out


# ----------------------------------------------------------------------- runs and summaries


def _papermill_meta(run_dir: Path) -> dict:
    path = run_dir / "notebook.ipynb"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
    except (OSError, ValueError):
        return {}


def collect_runs(out="results", run_dirs: Sequence | None = None) -> pd.DataFrame:
    """One row per complete run under ``<out>/runs/*/seed*`` (or in ``run_dirs``): parameters,
    duration, headline metrics (:func:`headline_metrics`) and every metric as ``metric:<name>``.

    Parameters and duration come from papermill's metadata in the run's executed ``notebook.ipynb``
    when there is one, else from the metrics file.
    """
    dirs = list(run_dirs) if run_dirs is not None else sorted((Path(out) / "runs").glob("*/seed*"))
    rows = []
    for run_dir in dirs:
        run_dir = Path(run_dir)
        if not (run_dir / METRICS_FILE).is_file():
            continue
        data = read_metrics(run_dir)
        meta = _papermill_meta(run_dir)
        params = meta.get("parameters", {})
        row = {
            "method": params.get("recipe", data.get("method")),
            "dataset": params.get("dataset", data.get("dataset")),
            "seed": params.get("seed", data.get("seed")),
            "recipe": data.get("recipe"),
            "epochs": data.get("epochs"),
            "duration_s": meta.get("duration", data.get("train_time_s")),
            "run_dir": str(run_dir),
            "level_names": data.get("level_names"),
            "reported": data.get("reported") or {},
        }
        row.update(data.get("headline") or headline_metrics(data["metrics"]))
        row.update({f"metric:{k}": v for k, v in data["metrics"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


SUMMARY_ORDER = ("R@1", "AP@*", "H-AP", "ASI", "NDCG")


def _metric_columns(frame: pd.DataFrame) -> list[str]:
    cols = []
    for name in SUMMARY_ORDER:
        if name == "AP@*":
            columns = sorted(int(c[3:]) for c in frame.columns if c.startswith("AP@") and c[3:].isdigit())
            cols += [f"AP@{c}" for c in columns]
        elif name in frame.columns:
            cols.append(name)
    return cols


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds (in %) of the headline metrics per (method, dataset).

    Columns ``<metric>`` (mean), ``<metric> std`` (NaN for a single seed), ``seeds``,
    ``duration_s`` (mean per run), ``levels`` (level names, finest first), ``paper`` (the
    published numbers of the recipe, e.g. ``"R@1 81.0"``), ``recipe``, ``epochs`` and
    ``command`` (the :func:`reproduce_command` of the row).
    """
    if runs.empty:
        return pd.DataFrame(columns=["method", "dataset", "seeds"])
    metrics = _metric_columns(runs)
    rows = []
    for (method, dataset), group in runs.groupby(["method", "dataset"], sort=False):
        row = {"method": method, "dataset": dataset, "seeds": len(group)}
        for m in metrics:
            values = 100.0 * group[m].astype(float).dropna()
            row[m] = values.mean() if len(values) else np.nan
            row[f"{m} std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        durations = group["duration_s"].dropna()
        row["duration_s"] = durations.mean() if len(durations) else np.nan
        names = next((n for n in group["level_names"] if isinstance(n, list)), None)
        row["levels"] = " / ".join(names) if names else ""
        reported = next((r for r in group["reported"] if r), {})
        row["paper"] = ", ".join(f"{k} {v:g}" for k, v in reported.items())
        row["recipe"] = next((r for r in group["recipe"] if isinstance(r, str)), "") if "recipe" in group else ""
        epochs = group["epochs"].dropna() if "epochs" in group else pd.Series(dtype=float)
        row["epochs"] = int(epochs.iloc[0]) if len(epochs) and epochs.nunique() == 1 else None
        row["command"] = reproduce_command(method, dataset, len(group), row["epochs"])
        rows.append(row)
    return pd.DataFrame(rows)


def compare_methods(summary: pd.DataFrame, method: str, baseline: str, dataset: str) -> pd.Series:
    """``method``'s mean minus ``baseline``'s for every headline metric of ``dataset`` (points of %,
    from :func:`summarize`); a KeyError names the (method, dataset) rows the summary lacks."""
    rows = summary.set_index(["method", "dataset"])
    missing = [m for m in (method, baseline) if (m, dataset) not in rows.index]
    if missing:
        have = ", ".join(f"{m}/{d}" for m, d in rows.index) or "none"
        raise KeyError(f"no summary row for {', '.join(f'{m}/{dataset}' for m in missing)} (rows: {have})")
    metrics = _metric_columns(summary)
    return (rows.loc[(method, dataset), metrics] - rows.loc[(baseline, dataset), metrics]).astype(float)


def reproduce_command(method: str, dataset: str, seeds: int = 1, epochs: int | None = None) -> str:
    """The ``hapkit reproduce`` command line that trains and evaluates these runs again (a real
    dataset is read from ``--data-root data``, the folder ``hapkit prepare-data`` fills)."""
    parts = ["hapkit reproduce", f"--methods {method}", f"--datasets {dataset}"]
    if dataset != "generated":
        parts.append("--data-root data")
    if seeds > 1:
        parts.append(f"--seeds {seeds}")
    if epochs is not None:
        parts.append(f"--epochs {epochs}")
    return " ".join(parts)


def published_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every published number of the runs' recipes beside the value measured under the same
    summary key (the recipe's ``reported`` keys, e.g. ``test/R@1@0`` or ``overall/AP@0``), in %:
    columns method, dataset, metric, paper, measured (mean over seeds), std, seeds."""
    rows = []
    if runs.empty or "reported" not in runs:
        return pd.DataFrame(columns=["method", "dataset", "metric", "paper", "measured", "std", "seeds"])
    for (method, dataset), group in runs.groupby(["method", "dataset"], sort=False):
        reported = next((r for r in group["reported"] if r), {})
        for key, paper in reported.items():
            column = f"metric:{key}"
            values = 100.0 * group[column].astype(float).dropna() if column in group else pd.Series(dtype=float)
            rows.append({
                "method": method, "dataset": dataset, "metric": key, "paper": float(paper),
                "measured": values.mean() if len(values) else np.nan,
                "std": values.std(ddof=1) if len(values) > 1 else np.nan, "seeds": len(values),
            })
    return pd.DataFrame(rows, columns=["method", "dataset", "metric", "paper", "measured", "std", "seeds"])


def _cell(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def format_markdown(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> str:
    """The summary as a Markdown table (pandas ``to_markdown``): mean ± std (%) per metric,
    published numbers last, then notes on the level names; with ``published``
    (:func:`published_table`), a second table of each published number beside its measurement."""
    if summary.empty:
        return "(no complete run)"
    metrics = _metric_columns(summary)
    table = pd.DataFrame({
        "method": summary["method"].astype(str),
        "dataset": summary["dataset"].astype(str),
        "seeds": summary["seeds"].astype(int),
        **{m: [_cell(r.get(m), r.get(f"{m} std")) for _, r in summary.iterrows()] for m in metrics},
        "paper": summary.get("paper", pd.Series([""] * len(summary))).fillna("").astype(str),
    })
    align = ("left", "left", "right", *["right"] * len(metrics), "left")
    lines = [table.to_markdown(index=False, colalign=align)]
    lines += ["", "Values in %, mean ± std over seeds. R@1 and AP@c: binary metrics at label column c "
              "(0 = finest); H-AP, ASI, NDCG: hierarchical metrics over all levels."]
    levels = {r["dataset"]: r["levels"] for _, r in summary.iterrows() if r.get("levels")}
    lines += [f"Levels of {d}: {lv}." for d, lv in levels.items()]
    if published is not None and not published.empty:
        table = published.assign(
            paper=published["paper"].map(lambda v: f"{v:.1f}"),
            measured=[_cell(m, s) for m, s in zip(published["measured"], published["std"])],
        )[["method", "dataset", "metric", "paper", "measured", "seeds"]]
        lines += ["", "Published numbers beside the measured ones (same summary key, %):", "",
                  table.to_markdown(index=False, colalign=("left", "left", "left", "right", "right", "right"),
                                    disable_numparse=True)]
    return "\n".join(lines)


def write_summary(out, runs: pd.DataFrame, summary: pd.DataFrame) -> None:
    """``runs.csv`` (one row per run), ``summary.csv`` and ``summary.md`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = runs.drop(columns=[c for c in ("reported",) if c in runs]).copy()
    if "level_names" in flat:
        flat["level_names"] = [" / ".join(n) if isinstance(n, list) else "" for n in flat["level_names"]]
    flat.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    published = published_table(runs)
    published.to_csv(out / "published.csv", index=False)
    (out / "summary.md").write_text("# hapkit reproduction\n\n" + format_markdown(summary, published) + "\n")


# ------------------------------------------------------------------------------- claims


class ClaimNotMet(AssertionError):
    """A statement a notebook makes about its results does not hold for the results at hand."""


def check_claims(claims: Mapping[str, bool]) -> dict[str, bool]:
    """Print each claim with whether it holds, and raise :class:`ClaimNotMet` naming those that do
    not.

    Notebooks call it where their text describes a figure or a table ("HAPPIER's family-level
    neighbour agreement is above SupAP's"), so that a change that breaks the story fails when the
    notebook runs (papermill, nbval) instead of leaving a sentence that the output contradicts.
    """
    if not claims:
        raise ValueError("check_claims needs at least one claim")
    held = {str(text): bool(value) for text, value in claims.items()}
    for text, value in held.items():
        print(f"{text}: {value}")
    failed = [text for text, value in held.items() if not value]
    if failed:
        raise ClaimNotMet(
            "the text of this notebook describes results these outputs do not show: "
            + "; ".join(failed)
            + ". With other parameters (a shorter training, another seed or recipe) this can be expected; "
            "with the defaults it means the story no longer matches the code."
        )
    return held

