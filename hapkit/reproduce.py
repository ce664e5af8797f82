"""Batch reproduction: run the training notebook over methods x datasets x seeds with papermill.

Each run executes ``notebooks/03_training.ipynb`` with its own parameters into its own directory
``<out>/runs/<method>_<dataset>/seed<k>/`` (the executed notebook, the checkpoint, metrics.jsonl and
``metrics.json``). A run whose ``metrics.json`` exists is complete and skipped, so an interrupted
batch continues where it stopped (an interrupted run resumes from its checkpoint). The runs are
then joined, with papermill's recorded parameters and durations, into ``<out>/runs.csv`` and a
summary, mean +/- std over seeds beside the published numbers, in ``<out>/summary.csv`` and
``<out>/summary.md`` (the tables of :mod:`hapkit.results`).

    hapkit reproduce                             # HAPPIER, SupAP, Smooth-AP, HPL, SupRecall, SupNDCG on the generated data
    hapkit reproduce --seeds 3 --jobs 2
    hapkit reproduce --methods happier roadmap --datasets sop --data-root data --seeds 3
    hapkit reproduce --notebooks                 # the grid, then every notebook (reading the grid's runs)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from hapkit.errors import HapkitError, MissingFileError
from hapkit._lazy import require_extra
from hapkit.results import METRICS_FILE, collect_runs, summarize, write_summary

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_DATASETS",
    "TRAINING_NOTEBOOK",
    "RunSpec",
    "DataNotPrepared",
    "check_datasets",
    "find_notebook",
    "plan_grid",
    "run_grid",
    "run_notebooks",
    "reproduce_all",
]

DEFAULT_METHODS = ("happier", "supap", "smoothap", "hpl", "suprecall", "supndcg")
DEFAULT_DATASETS = ("generated",)
TRAINING_NOTEBOOK = "03_training.ipynb"


# ------------------------------------------------------------------------------- the grid


def find_notebook(name: str = TRAINING_NOTEBOOK) -> Path:
    """The repository's notebook ``name`` (next to the package, or under the current directory)."""
    for base in (Path(__file__).resolve().parents[1], Path.cwd()):
        path = base / "notebooks" / name
        if path.is_file():
            return path
    raise MissingFileError(
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


class DataNotPrepared(HapkitError, RuntimeError):
    """Datasets of a grid that are not prepared; the message gives the command for each."""


def check_datasets(datasets, data_root=None) -> None:
    """Raise :class:`DataNotPrepared`, listing the ``hapkit prepare-data`` command of every real
    dataset of the grid that cannot be loaded from ``data_root``."""
    from hapkit.data import DataError, get_dataset

    missing = []
    for name in dict.fromkeys(datasets):
        if name == "generated":
            continue
        try:
            get_dataset(name, root=data_root, split="train")
        except DataError as e:
            missing.append(f"  {name}: {e}")
    if missing:
        raise DataNotPrepared(
            "the grid needs datasets that are not prepared:\n" + "\n".join(missing)
            + "\nPrepare them (see data_scripts/README.md), then pass the folder that holds them with --data-root."
        )


def plan_grid(methods=None, datasets=None, seeds=1, out="results", data_root=None, epochs=None,
              overrides=()) -> list[RunSpec]:
    """The runs of a grid, in order (seed-major, so that a partial batch covers every method)."""
    from hapkit.training.recipes import resolve_name

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
    require_extra("notebooks", "papermill", what="hapkit.reproduce.run_grid")
    notebook = Path(notebook) if notebook else find_notebook()
    specs = plan_grid(methods, datasets, seeds, out, data_root, epochs, overrides)
    check_datasets([s.dataset for s in specs], data_root)
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
    runs = collect_runs(out, [s.run_dir for s in specs])
    summary = summarize(runs)
    write_summary(out, runs, summary)
    if failures:
        lines = "\n".join(f"  {name}: {err}" for name, err in failures)
        raise RuntimeError(
            f"{len(failures)} run(s) failed (see notebook.ipynb in their run directory):\n{lines}"
        )
    return summary


def run_notebooks(notebooks_dir=None, out="results", jobs=1, force=False, timeout=None,
                  progress=True, runs_dir=None) -> list[Path]:
    """Execute every notebook of ``notebooks/`` with its default parameters into ``<out>/notebooks``.

    A notebook that takes an ``output_dir`` parameter gets ``<out>/notebooks/<name>/`` (and
    ``progress=False`` when it has that parameter); one that takes ``results_dir`` gets ``out``,
    and one that takes ``runs_dir`` gets ``runs_dir`` when given (the grid's ``<out>/runs``, so
    that it reads the grid's models instead of training its own). Notebooks whose executed copy
    exists without error are skipped unless ``force``.
    """
    require_extra("notebooks", "papermill", what="hapkit.reproduce.run_notebooks")
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
        if "results_dir" in declared:
            params["results_dir"] = str(Path(out).resolve())
        if "runs_dir" in declared and runs_dir is not None:
            params["runs_dir"] = str(Path(runs_dir).resolve())
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


def reproduce_all(out="results", jobs=1, force=False, timeout=None, progress=True, notebooks_dir=None,
                  **grid) -> pd.DataFrame:
    """The grid first (:func:`run_grid`), then every notebook of ``notebooks/`` into
    ``<out>/notebooks``, reading the grid's runs (``runs_dir=<out>/runs``) and results
    (``results_dir=<out>``) instead of training their own models.

    A failed grid run does not stop the notebooks (the ones that need it train it themselves);
    the failures are raised at the end.
    """
    error = None
    try:
        summary = run_grid(out=out, jobs=jobs, force=force, timeout=timeout, progress=progress, **grid)
    except RuntimeError as exc:  # failed runs: the summary of the others is written
        error, summary = exc, None
    run_notebooks(notebooks_dir, out=out, jobs=jobs, force=force, timeout=timeout, progress=progress,
                  runs_dir=Path(out) / "runs")
    if error is not None:
        raise error
    return summary
