"""Batch reproduction: run the training notebook over methods x datasets x seeds with papermill.

Each run executes ``notebooks/03_training.ipynb`` with its own parameters into its own directory
``<out>/runs/<method>_<dataset>/seed<k>/`` (the executed notebook, the checkpoint, metrics.jsonl and
``metrics.json``). A run whose ``metrics.json`` exists is complete and skipped, so an interrupted
batch continues where it stopped (an interrupted run resumes from its checkpoint). The runs are
then joined, with papermill's recorded parameters and durations, into ``<out>/runs.csv`` and a
summary, mean +/- std over seeds beside the published numbers, in ``<out>/summary.csv`` and
``<out>/summary.md``.

    hapkit reproduce                             # HAPPIER, SupAP, Smooth-AP, HPL on the generated data
    hapkit reproduce --seeds 3 --jobs 2
    hapkit reproduce --methods happier roadmap --datasets sop --data-root data --seeds 3
    hapkit reproduce --notebooks                 # every notebook into results/notebooks, then the grid
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_DATASETS",
    "RunSpec",
    "find_notebook",
    "plan_grid",
    "run_grid",
    "run_notebooks",
    "reproduce_all",
    "collect_runs",
    "summarize",
    "format_markdown",
    "write_run_metrics",
    "metrics_frame",
    "headline_metrics",
]

DEFAULT_METHODS = ("happier", "supap", "smoothap", "hpl")
DEFAULT_DATASETS = ("generated",)
TRAINING_NOTEBOOK = "03_training.ipynb"
METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------------ one run's results


def headline_metrics(metrics: dict) -> dict:
    """The metrics the summary compares, without their eval-set prefix.

    From the ``overall/`` means when the dataset has several eval sets (DyML), otherwise from the
    first eval set: ``R@1`` (finest level), ``AP@c`` for every level c, ``H-AP``, ``ASI``, ``NDCG``.
    """
    prefixes = sorted({k.split("/", 1)[0] for k in metrics if "/" in k})
    if not prefixes:
        return {}
    prefix = "overall" if "overall" in prefixes else prefixes[0]
    own = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(prefix + "/")}
    out = {}
    if "R@1@0" in own:
        out["R@1"] = own["R@1@0"]
    levels = sorted(int(k[3:]) for k in own if k.startswith("AP@") and k[3:].isdigit())
    out.update({f"AP@{c}": own[f"AP@{c}"] for c in levels})
    out.update({k: own[k] for k in ("H-AP", "ASI", "NDCG") if k in own})
    return out


def metrics_frame(metrics: dict, level_names=None) -> pd.DataFrame:
    """A tidy table of flat ``"<set>/<metric>"`` results: one row per metric, one column per set (%)."""
    rows: dict = {}
    for key, value in metrics.items():
        where, name = key.split("/", 1) if "/" in key else ("", key)
        if level_names and "@" in name:
            head, _, col = name.rpartition("@")
            if col.isdigit() and int(col) < len(level_names):
                name = f"{head}@{level_names[int(col)]}"
        rows.setdefault(name, {})[where] = 100.0 * value
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "metric (%)"
    return frame.round(2)


def write_run_metrics(output_dir, result, cfg, dataset: str | None = None, seed: int | None = None,
                      level_names=None) -> Path:
    """Write ``metrics.json`` of a finished training run (read back by :func:`collect_runs`)."""
    from hapkit.config import to_dict

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "recipe": cfg.name,
        "method": cfg.method,
        "dataset": dataset or cfg.data.dataset,
        "seed": cfg.seed if seed is None else seed,
        "epochs": cfg.train.epochs,
        "steps": int(result.global_step),
        "level_names": list(level_names) if level_names is not None else None,
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "headline": headline_metrics(result.metrics),
        "reported": dict(cfg.reported),
        "train_time_s": float(result.history["time_s"].sum()) if "time_s" in result.history else None,
        "config": to_dict(cfg),
    }
    path = out / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)  # complete or absent: a half-written file must not mark a run done
    return path


# ------------------------------------------------------------------------------- the grid


def find_notebook(name: str = TRAINING_NOTEBOOK) -> Path:
    """The repository's notebook ``name`` (next to the package, or under the current directory)."""
    for base in (Path(__file__).resolve().parents[1], Path.cwd()):
        path = base / "notebooks" / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"notebooks/{name} not found next to the hapkit package or in {Path.cwd()}: run from a "
        f"clone of the repository, or pass --notebook PATH"
    )


@dataclass
class RunSpec:
    """One execution of the training notebook."""

    method: str
    dataset: str
    seed: int
    run_dir: Path
    parameters: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.method}_{self.dataset}/seed{self.seed}"

    @property
    def complete(self) -> bool:
        return (self.run_dir / METRICS_FILE).is_file()


def plan_grid(methods=None, datasets=None, seeds=1, out="results", data_root=None, epochs=None,
              overrides=()) -> list[RunSpec]:
    """The runs of a grid, in order (seed-major, so that a partial batch covers every method)."""
    from hapkit.recipes import resolve_name

    methods = list(methods or DEFAULT_METHODS)
    datasets = list(datasets or DEFAULT_DATASETS)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    for m in methods:  # fail before running anything when a recipe is missing
        for d in datasets:
            resolve_name(m, d)
    specs = []
    for seed in seed_list:
        for d in datasets:
            for m in methods:
                run_dir = (Path(out) / "runs" / f"{m}_{d}" / f"seed{seed}").resolve()
                params = dict(recipe=m, dataset=d, data_root=None if data_root is None else str(data_root),
                              seed=seed, epochs=epochs, output_dir=str(run_dir),
                              overrides=list(overrides or ()), progress=False)
                specs.append(RunSpec(m, d, seed, run_dir, params))
    return specs


def _limit_threads(threads: int) -> None:
    # inherited by the notebook kernels this worker starts: parallel runs must not oversubscribe
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _execute(notebook: str, output: str, parameters: dict, cwd: str, timeout) -> float:
    """Run one notebook (in a worker process: its stderr goes to ``<output>.log``)."""
    import papermill

    t0 = time.perf_counter()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    # the kernel inherits this process's stderr: keep its start-up chatter out of the terminal
    log = open(Path(output).with_suffix(".log"), "w")
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        papermill.execute_notebook(
            notebook, output, parameters=parameters, cwd=cwd, progress_bar=False,
            execution_timeout=timeout, log_output=False,
        )
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        log.close()
    return time.perf_counter() - t0


def _describe(error: Exception) -> str:
    # papermill's error message starts with a blank line and a traceback: keep the cell's error
    if hasattr(error, "ename"):
        return f"{error.ename}: {error.evalue}"
    return f"{type(error).__name__}: {error}"


def _run_all(jobs_list, jobs: int, progress: bool, desc: str) -> list[tuple[str, str]]:
    """Execute (label, notebook, output, params, cwd, timeout) tuples; returns the failures."""
    failures = []
    if not jobs_list:
        return failures
    jobs = max(1, min(jobs, len(jobs_list)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    bar = tqdm(total=len(jobs_list), desc=desc, unit="run", disable=not progress)
    # worker processes (even for one job): a notebook's kernel must not share this terminal
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_limit_threads,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_execute, *args): label for label, *args in jobs_list}
        for fut in as_completed(futures):
            try:
                fut.result()
            except Exception as e:  # one failed run must not stop the batch
                failures.append((futures[fut], _describe(e)))
            bar.update(1)
    bar.close()
    return failures


def run_grid(methods=None, datasets=None, seeds=1, data_root=None, out="results", jobs=1, epochs=None,
             overrides=(), force=False, notebook=None, timeout=None, progress=True) -> pd.DataFrame:
    """Run the training notebook over the grid, then write and return the summary table.

    Runs already complete (their ``metrics.json`` exists) are skipped unless ``force``. A failed
    run is reported at the end (its executed notebook shows the error) after the summary of the
    others has been written.
    """
    notebook = Path(notebook) if notebook else find_notebook()
    specs = plan_grid(methods, datasets, seeds, out, data_root, epochs, overrides)
    todo = [s for s in specs if force or not s.complete]
    if force:
        for s in todo:
            (s.run_dir / METRICS_FILE).unlink(missing_ok=True)
    jobs_list = [
        (s.name, str(notebook), str(s.run_dir / "notebook.ipynb"), s.parameters, str(notebook.parent), timeout)
        for s in todo
    ]
    if len(todo) < len(specs) and progress:
        print(f"{len(specs) - len(todo)} of {len(specs)} runs already complete, skipped")
    failures = _run_all(jobs_list, jobs, progress, "reproduce")
    runs = collect_runs(out, specs)
    summary = summarize(runs)
    write_summary(out, runs, summary)
    if failures:
        lines = "\n".join(f"  {name}: {err}" for name, err in failures)
        raise RuntimeError(
            f"{len(failures)} run(s) failed (see notebook.ipynb in their run directory):\n{lines}"
        )
    return summary


def run_notebooks(notebooks_dir=None, out="results", jobs=1, force=False, timeout=None,
                  progress=True) -> list[Path]:
    """Execute every notebook of ``notebooks/`` with its default parameters into ``<out>/notebooks``.

    A notebook that takes an ``output_dir`` parameter gets ``<out>/notebooks/<name>/`` (and
    ``progress=False`` when it has that parameter). Notebooks whose executed copy exists without
    error are skipped unless ``force``.
    """
    import papermill

    src = Path(notebooks_dir) if notebooks_dir else find_notebook().parent
    dest = (Path(out) / "notebooks").resolve()
    jobs_list, outputs = [], []
    for nb in sorted(src.glob("*.ipynb")):
        target = dest / nb.name
        outputs.append(target)
        if not force and _executed_ok(target):
            continue
        params = {}
        declared = papermill.inspect_notebook(str(nb))
        if "output_dir" in declared:
            params["output_dir"] = str(dest / nb.stem)
        if "progress" in declared:
            params["progress"] = False  # progress widgets mean nothing in a stored notebook
        jobs_list.append((nb.name, str(nb), str(target), params, str(nb.parent), timeout))
    failures = _run_all(jobs_list, jobs, progress, "notebooks")
    if failures:
        lines = "\n".join(f"  {name}: {err}" for name, err in failures)
        raise RuntimeError(f"{len(failures)} notebook(s) failed (executed copies in {dest}):\n{lines}")
    return outputs


def _executed_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
    except (OSError, ValueError):
        return False
    return meta.get("exception") is False or (meta.get("end_time") is not None and not meta.get("exception"))


def reproduce_all(out="results", jobs=1, force=False, timeout=None, progress=True, **grid) -> pd.DataFrame:
    """Every notebook of ``notebooks/`` into ``<out>/notebooks``, then the grid (:func:`run_grid`)."""
    run_notebooks(out=out, jobs=jobs, force=force, timeout=timeout, progress=progress)
    return run_grid(out=out, jobs=jobs, force=force, timeout=timeout, progress=progress, **grid)


# --------------------------------------------------------------------------- the tables


def _papermill_meta(run_dir: Path) -> dict:
    path = run_dir / "notebook.ipynb"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
    except (OSError, ValueError):
        return {}


def collect_runs(out="results", specs=None) -> pd.DataFrame:
    """One row per complete run under ``<out>/runs`` (or of ``specs``): parameters, duration, metrics.

    Parameters and duration come from papermill's metadata in the executed notebook; metric
    columns are the headline metrics (:func:`headline_metrics`) and every full metric name.
    """
    dirs = [s.run_dir for s in specs] if specs is not None else sorted((Path(out) / "runs").glob("*/seed*"))
    rows = []
    for run_dir in dirs:
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        meta = _papermill_meta(Path(run_dir))
        params = meta.get("parameters", {})
        row = {
            "method": params.get("recipe", data.get("method")),
            "dataset": params.get("dataset", data.get("dataset")),
            "seed": params.get("seed", data.get("seed")),
            "recipe": data.get("recipe"),
            "epochs": data.get("epochs"),
            "duration_s": meta.get("duration"),
            "run_dir": str(run_dir),
            "level_names": data.get("level_names"),
            "reported": data.get("reported") or {},
        }
        row.update(data.get("headline") or headline_metrics(data.get("metrics", {})))
        row.update({f"metric:{k}": v for k, v in data.get("metrics", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


SUMMARY_ORDER = ("R@1", "AP@*", "H-AP", "ASI", "NDCG")


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    cols = []
    for name in SUMMARY_ORDER:
        if name == "AP@*":
            levels = sorted(int(c[3:]) for c in runs.columns if c.startswith("AP@") and c[3:].isdigit())
            cols += [f"AP@{c}" for c in levels]
        elif name in runs.columns:
            cols.append(name)
    return cols


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds (in %) of the headline metrics per (method, dataset).

    Columns ``<metric>`` (mean), ``<metric> std`` (NaN for a single seed), ``seeds``,
    ``duration_s`` (mean per run), ``levels`` (level names, finest first) and ``paper`` (the
    published numbers of the recipe, e.g. ``"R@1 81.0"``).
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
        row["paper"] = ", ".join(f"{k.replace('@0', '') if k.startswith('R@') else k} {v:g}" for k, v in reported.items())
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean, std) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def format_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: mean ± std (%) per metric, published numbers last."""
    if summary.empty:
        return "(no complete run)"
    metrics = [c for c in summary.columns if c in ("R@1", "H-AP", "ASI", "NDCG") or (c.startswith("AP@") and not c.endswith(" std"))]
    metrics = [m for m in ("R@1",) if m in metrics] + sorted(m for m in metrics if m.startswith("AP@")) + \
        [m for m in ("H-AP", "ASI", "NDCG") if m in metrics]
    head = ["method", "dataset", "seeds", *metrics, "paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(metrics) + ["---"]) + "|"]
    for _, r in summary.iterrows():
        cells = [str(r["method"]), str(r["dataset"]), str(r["seeds"])]
        cells += [_cell(r.get(m), r.get(f"{m} std")) for m in metrics]
        cells.append(r.get("paper") or "")
        lines.append("| " + " | ".join(cells) + " |")
    levels = {r["dataset"]: r["levels"] for _, r in summary.iterrows() if r.get("levels")}
    notes = ["", "Values in %, mean ± std over seeds. R@1 and AP@c: binary metrics at label level c "
             "(0 = finest); H-AP, ASI, NDCG: hierarchical metrics over all levels."]
    notes += [f"Levels of {d}: {lv}." for d, lv in levels.items()]
    return "\n".join(lines + notes)


def write_summary(out, runs: pd.DataFrame, summary: pd.DataFrame) -> None:
    """``runs.csv`` (one row per run), ``summary.csv`` and ``summary.md`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = runs.drop(columns=[c for c in ("reported",) if c in runs]).copy()
    if "level_names" in flat:
        flat["level_names"] = [" / ".join(n) if isinstance(n, list) else "" for n in flat["level_names"]]
    flat.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text("# hapkit reproduction\n\n" + format_markdown(summary) + "\n")
