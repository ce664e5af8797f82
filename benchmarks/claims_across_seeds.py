"""Margins of every notebook claim over seeds and torch thread counts.

Training is bit-exact on one machine but not across CPUs (vector kernels round differently), so a
claim a notebook checks (``hapkit.claims.CLAIMS``, the definitions the notebooks call) must clear
its threshold by more than the run-to-run spread. This script recomputes the inputs of every
claim group the way its notebook does (the same library functions, the same run cache:
``hapkit.training.runs``), on each seed and torch thread count, and prints one row per claim: its
margin on each (seed, threads) run, the mean, the standard deviation and the worst margin.

Each thread count keeps its own cache of trained runs (the run key does not hold the thread
count): the default count (torch's, as the notebooks run) uses the cache itself, any other count
``<cache>/threads-<n>``. A second execution reads every run from the cache.

    python benchmarks/claims_across_seeds.py --seeds 0 1 2 3 4 --threads 1 2 --jobs 2

``--jobs`` caps the torch threads used at once: a thread count t runs ``max(1, jobs // t)``
processes. ``--notebooks`` restricts the claims (e.g. ``--notebooks 04 06``); ``--csv`` writes the
long table (one row per claim and run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the notebooks' defaults
HAPPIER, SUPAP, HPL = "happier_generated", "supap_generated", "hpl_generated"
EPOCHS, SHORT_EPOCHS, HPL_EPOCHS = 10, 2, 1
MAX_ITEMS, K = 2048, 64
LEARNED_HIERARCHY = ["loss.kwargs.num_coarse=[16, 4]", "loss.kwargs.recluster_every=5", "loss.kwargs.record_clusters=true"]
FOOTPRINT = dict(recipe="listwise_ap_generated_large", small_batch=256, large_batch=2048, sub_batch=128)


def _cache(threads: int, default_threads: int) -> str:
    from hapkit.training.runs import default_cache_dir

    root = Path(default_cache_dir())
    return str(root if threads == default_threads else root / f"threads-{threads}")


# ----------------------------------------------------------------- each notebook's claim inputs


def inputs_02(seed, cache):
    from hapkit.viz import surrogates as vs

    along = vs.ap_along_score()
    bounds = vs.surrogate_vs_exact(num_batches=4, batch_size=64, dim=16, seed=seed,
                                   losses=["HAPPIER", "SupAP", "Smooth-AP", "ListwiseAP"])
    summary = vs.bound_summary(bounds)
    suprank_summary = vs.bound_summary(vs.surrogate_vs_exact(num_batches=4, batch_size=64, dim=16, seed=seed,
                                                             losses=["SupRecall", "SupNDCG"]))
    decomp = vs.decomposability_experiment(epochs=30, dim=8, seed=seed)
    final = decomp[decomp.epoch == decomp.epoch.max()]
    gap = final.set_index(["loss", "batching"]).gap
    return {
        "ap_along_score": dict(along=along),
        "bounds": dict(summary=summary),
        "suprank_bounds": dict(summary=summary, suprank_summary=suprank_summary),
        "decomposability": dict(gap=gap),
    }


def _pair(seed, cache, epochs):
    from hapkit.training.runs import trained_embeddings

    options = dict(epochs=epochs, seed=seed, cache_dir=cache, max_items=MAX_ITEMS, progress=False)
    return {"HAPPIER": trained_embeddings(HAPPIER, **options), "SupAP": trained_embeddings(SUPAP, **options)}


def inputs_04(seed, cache):
    from hapkit.evaluate import evaluate, neighbourhood_metrics
    from hapkit.results import failure_table, organisation_table

    models = _pair(seed, cache, EPOCHS)
    level_names = models["HAPPIER"].level_names
    fine, middle, coarse = level_names[0], level_names[len(level_names) // 2], level_names[-1]
    results = {name: evaluate(m.embeddings, m.labels, progress=False) for name, m in models.items()}
    metrics = {name: {**results[name].summary, **neighbourhood_metrics(m.embeddings, m.labels, k=K)}
               for name, m in models.items()}
    organisation = organisation_table(metrics, level_names, K)
    gap = organisation[f"kNN@{K} HAPPIER"] - organisation[f"kNN@{K} SupAP"]
    ap_gap = organisation["AP HAPPIER"] - organisation["AP SupAP"]
    small = {name: neighbourhood_metrics(m.embeddings, m.labels, k=10)["kNN@10@1"] for name, m in models.items()}
    short = _pair(seed, cache, SHORT_EPOCHS)
    family = {name: neighbourhood_metrics(m.embeddings, m.labels, k=K)[f"kNN@{K}@{len(level_names) - 1}"]
              for name, m in short.items()}
    names = dict(fine=fine, middle=middle, coarse=coarse)
    return {
        "organisation": dict(gap=gap, ap_gap=ap_gap, **names),
        "failures": dict(failures=failure_table(metrics, level_names)),
        "exercise_2": dict(gap=gap, gap_10=100 * (small["HAPPIER"] - small["SupAP"]), **names),
        "exercise_3": dict(family_gap_2=100 * (family["HAPPIER"] - family["SupAP"]), **names),
    }


def inputs_05(seed, cache):
    import torch

    from hapkit.evaluate import evaluate
    from hapkit.hierarchy import shared_levels
    from hapkit.viz.explorer import ComparisonExplorer
    from hapkit.viz.explorer_state import top_k_ranking

    models = _pair(seed, cache, EPOCHS)
    results = {name: evaluate(m.embeddings, m.labels, progress=False) for name, m in models.items()}
    comparison = ComparisonExplorer(models, results=results, top_k=10, column=0)
    gaps = comparison.comparison.gaps(range(len(models["HAPPIER"])))
    largest = comparison.comparison.listed[:2]
    other_family = {}
    for name, m in models.items():
        for q in largest:
            ranked = top_k_ranking(torch.as_tensor(m.embeddings), q, 10)
            other_family[name, q] = shared_levels(m.labels[q:q + 1], m.labels[ranked]).flatten().tolist().count(0)
    return {
        "better": dict(better=(gaps["H-AP gap"] > 0).mean()),
        "largest_gaps": dict(other_family=other_family, largest=largest),
    }


def inputs_06(seed, cache, threads, footprint=True):
    import numpy as np

    from hapkit.data import build_train_set
    from hapkit.training.footprint import measure_steps, multistage_gradient_difference
    from hapkit.training.runs import load_loss, trained_embeddings
    from hapkit.viz.proxies import cluster_history_frame

    runs = {"given hierarchy": [], "k-means hierarchy": LEARNED_HIERARCHY}
    test = {name: trained_embeddings(HPL, epochs=HPL_EPOCHS, seed=seed, overrides=o, max_items=MAX_ITEMS,
                                     cache_dir=cache, progress=False) for name, o in runs.items()}
    level_names = test["given hierarchy"].level_names
    loss, cfg = load_loss(test["k-means hierarchy"].run_dir)
    train = build_train_set(cfg.data)
    class_labels = np.unique(train.labels, axis=0)
    colour_of_class = [name.split("/")[1] for name in train.class_names[0]]
    clusters = cluster_history_frame(loss.cluster_history, class_labels, level_names, references={"colour": colour_of_class})
    recipe = FOOTPRINT["recipe"]
    seeded = [f"seed={seed}"]
    gradient_checks = {
        "frozen batch-norm": multistage_gradient_difference(recipe, batch_size=64, sub_batch=16,
                                                            overrides=[*seeded, "model.freeze_batchnorm=true"]),
        "trained batch-norm": multistage_gradient_difference(recipe, batch_size=64, sub_batch=16, overrides=seeded),
    }
    out = {
        "clusters": dict(clusters_over_time=clusters),
        "gradients": dict(gradient_checks=gradient_checks),
    }
    if footprint:
        small, large, sub = FOOTPRINT["small_batch"], FOOTPRINT["large_batch"], FOOTPRINT["sub_batch"]
        frame = measure_steps([(small, None), (small, sub), (large, sub)], recipe, steps=1, device="cpu",
                              threads=threads, progress=False)
        out["footprint"] = dict(footprint=frame, small_batch=small, large_batch=large, sub_batch=sub, ratio=large // small)
    return out


def inputs_07(seed, cache):
    from hapkit.results import compare_methods, summarize
    from hapkit.training.runs import grid_runs

    with tempfile.TemporaryDirectory() as out:
        runs = grid_runs(None, [HAPPIER, SUPAP], [seed], EPOCHS, out=out, cache_dir=cache, progress=False)
        summary = summarize(runs)
    return {"happier_vs_supap": dict(gap=compare_methods(summary, "happier", "supap", dataset="generated"))}


def inputs_08(seed, cache):
    from hapkit.evaluate import revisited_ranking_metrics

    rankings = {
        "easy first": ["easy", "easy", "negative", "junk", "negative", "negative", "hard", "negative", "hard", "negative"],
        "junk first": ["junk", "easy", "easy", "negative", "negative", "negative", "hard", "negative", "hard", "negative"],
        "hard first": ["hard", "hard", "negative", "junk", "negative", "negative", "easy", "negative", "easy", "negative"],
    }
    by_protocol = pd.DataFrame({name: revisited_ranking_metrics(r, ks=(1, 5)) for name, r in rankings.items()}).T
    ranking = rankings["junk first"]
    junk_as = {"removed (the protocol)": ranking,
               "counted as negative": ["negative" if s == "junk" else s for s in ranking],
               "counted as positive": ["easy" if s == "junk" else s for s in ranking]}
    junk_table = pd.Series({name: revisited_ranking_metrics(r)["AP@medium"] for name, r in junk_as.items()})
    rows = []
    for r in range(1, 16):
        lone, block = ["negative"] * (r - 1) + ["easy"], ["negative"] * (r - 1) + ["easy"] * 10
        rows.append({"lone_t": revisited_ranking_metrics(lone, ks=(1,))["AP@easy"],
                     "lone_s": revisited_ranking_metrics(lone, ks=(1,), ap="standard")["AP@easy"],
                     "block_t": revisited_ranking_metrics(block, ks=(1,))["AP@easy"],
                     "block_s": revisited_ranking_metrics(block, ks=(1,), ap="standard")["AP@easy"]})
    forms = pd.DataFrame(rows)

    return {
        "protocols": dict(by_protocol=by_protocol),
        "junk": dict(junk_table=junk_table),
        "ap_forms": dict(lone_ratio=forms["lone_t"] / forms["lone_s"], gap_lone=forms["lone_s"] - forms["lone_t"],
                         gap_block=forms["block_s"] - forms["block_t"]),
    }


NOTEBOOK_INPUTS = {
    "02_surrogate_bounds": inputs_02,
    "04_embedding_space": inputs_04,
    "05_ranking_explorer": inputs_05,
    "06_proxies_and_large_batches": inputs_06,
    "07_reproduction": inputs_07,
    "08_landmarks": inputs_08,
}


# ----------------------------------------------------------------------------------- runner


def _init(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def measure(notebook: str, seed: int, threads: int, default_threads: int, footprint: bool) -> list[dict]:
    """One row per claim of ``notebook`` on one (seed, threads) run."""
    from hapkit.claims import claims

    cache = _cache(threads, default_threads)
    start = time.time()
    fn = NOTEBOOK_INPUTS[notebook]
    groups = fn(seed, cache, threads, footprint) if notebook.startswith("06") else fn(seed, cache)
    rows = []
    for group, inputs in groups.items():
        for i, claim in enumerate(claims(notebook, group)):
            value = claim.value(**inputs)
            rows.append(dict(notebook=notebook, group=group, claim=i, text=claim.describe(**inputs),
                             statement=claim.statement, guaranteed=claim.guaranteed, seed=seed, threads=threads,
                             value=value, margin=claim.margin_of(value), seconds=time.time() - start))
    return rows


def margin_table(long: pd.DataFrame) -> pd.DataFrame:
    """One row per claim: its margin on each (seed, threads) run, mean, std and the worst."""
    keys = ["notebook", "group", "claim", "text", "statement", "guaranteed"]
    wide = long.pivot_table(index=keys, columns=["threads", "seed"], values="margin", aggfunc="first")
    wide.columns = [f"t{t}/s{s}" for t, s in wide.columns]
    margins = long.groupby(keys)["margin"]
    wide["mean"], wide["std"], wide["worst"] = margins.mean(), margins.std(ddof=1), margins.min()
    wide["worst/std"] = wide["worst"] / wide["std"]
    from hapkit.claims import CLAIMS

    order = {(n, g): i for i, (n, g) in enumerate((n, g) for n, groups in CLAIMS.items() for g in groups)}
    wide = wide.reset_index()
    wide["order"] = [order.get((n, g), len(order)) for n, g in zip(wide["notebook"], wide["group"])]  # measured
    # with definitions since changed: last
    return wide.sort_values(["order", "claim"]).drop(columns="order")


def _print(table: pd.DataFrame) -> None:
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.max_colwidth", 70, "display.float_format", "{:.4g}".format):
        print(table.drop(columns=["group", "claim"]).to_string(index=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds-per-threads", nargs="*", default=[], metavar="T:S,S,...",
                        help="seeds for one thread count, e.g. 1:0,1,2 (default: --seeds)")
    parser.add_argument("--jobs", type=int, default=2, help="torch threads in use at once, at most")
    parser.add_argument("--notebooks", nargs="+", default=None, help="notebook prefixes, e.g. 04 06")
    parser.add_argument("--footprint-seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds (repetitions) that also measure notebook 06's memory footprint")
    parser.add_argument("--csv", type=Path, default=None, help="write the long table here")
    parser.add_argument("--from-csv", type=Path, default=None, help="print the table of a long table written by --csv")
    args = parser.parse_args(argv)
    if args.from_csv:
        _print(margin_table(pd.read_csv(args.from_csv)))
        return 0

    import torch

    default_threads = torch.get_num_threads()
    notebooks = [n for n in NOTEBOOK_INPUTS if args.notebooks is None or any(n.startswith(p) for p in args.notebooks)]
    seeds_for = {t: list(args.seeds) for t in args.threads}
    for spec in args.seeds_per_threads:
        t, _, seeds = spec.partition(":")
        seeds_for[int(t)] = [int(s) for s in seeds.split(",") if s]
    started = time.time()
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for threads in args.threads:
        tasks = [(n, s, threads, default_threads, s in args.footprint_seeds) for s in seeds_for[threads] for n in notebooks]
        workers = max(1, args.jobs // threads)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(threads,)) as pool:
            futures = {pool.submit(measure, *task): task for task in tasks}
            for fut in as_completed(futures):
                n, s, t, *_ = futures[fut]
                found = fut.result()
                rows.extend(found)
                print(f"  {n} seed {s} threads {t}: {len(found)} claims, {found[-1]['seconds']:.0f} s", flush=True)
    long = pd.DataFrame(rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        long.to_csv(args.csv, index=False)
    table = margin_table(long)
    _print(table)
    print(f"\n{len(long)} margins, {len(table)} claims, default torch threads {default_threads}, "
          f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
