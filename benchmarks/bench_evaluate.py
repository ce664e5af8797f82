"""Speed and memory of hapkit.evaluate against a straightforward full-sort evaluation.

Both evaluate the same clustered, 3-level embeddings (same-set protocol, every metric) in fresh
subprocesses, so that each peak memory (resource.getrusage ru_maxrss, which also sees torch's
allocations) is its own. The straightforward evaluation sorts every query's whole gallery and
applies the formulas to the sorted relevance, as the reference evaluation code does.

    python benchmarks/bench_evaluate.py --threads 2                    # N = 20,000, D = 128
    python benchmarks/bench_evaluate.py --n 2000                       # small and quick
    python benchmarks/bench_evaluate.py --n 100000 --no-baseline --threads 2   # time and memory only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings

import torch


def clustered_embeddings(n: int, dim: int = 128, seed: int = 0):
    """L2-normalised embeddings of a 3-level hierarchy (finest first) with overlapping clusters.

    8 coarse classes, 10 middle classes each and classes of 10 items: the noise is large enough
    that no metric is trivial (fine-level AP well below coarse-level AP).
    """
    g = torch.Generator().manual_seed(seed)
    n_coarse, n_mid_per, per_fine = 8, 10, 10
    n_fine = max(n // per_fine, n_coarse * n_mid_per)
    fine = torch.arange(n) % n_fine
    mid = fine % (n_coarse * n_mid_per)
    coarse = mid % n_coarse
    labels = torch.stack([fine, mid, coarse], 1)
    centre_c = torch.randn(n_coarse, dim, generator=g)
    centre_m = 0.8 * torch.randn(n_coarse * n_mid_per, dim, generator=g)
    centre_f = 0.6 * torch.randn(n_fine, dim, generator=g)
    x = centre_c[coarse] + centre_m[mid] + centre_f[fine] + 2.0 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1), labels


# ----------------------------------------------------------------------------------------------
# The straightforward evaluation: full sort of every gallery, then the formulas.


def straightforward_evaluate(
    embeddings, labels, ks=(1, 4, 16), chunk_size=256, num_queries: int | None = None
) -> dict[str, float]:
    """Every metric of :func:`hapkit.evaluate.evaluate` (same-set, pop relevance, alpha 1), computed
    the obvious way: sort each query's gallery, gather the shared levels in rank order, apply the
    formulas to (Q, G) tensors. ``num_queries`` evaluates the first queries only (profiling)."""
    from hapkit.hierarchy import relevance, shared_levels

    N, L = labels.shape
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name, values):
        ok = ~torch.isnan(values)
        sums[name] = sums.get(name, 0.0) + float(values[ok].sum())
        counts[name] = counts.get(name, 0) + int(ok.sum())

    n_q = N if num_queries is None else min(num_queries, N)
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        Q = stop - start
        rows = torch.arange(Q)
        S = embeddings[start:stop] @ embeddings.T
        S[rows, rows + start] = -math.inf  # the query leaves its own gallery: last, then dropped
        order = torch.argsort(S, dim=1, descending=True, stable=True)[:, : N - 1]
        V = shared_levels(labels[start:stop], labels)
        V[rows, rows + start] = 0
        rel = relevance(V, L, count_query=True)
        Vs = V.gather(1, order).long()
        rels = rel.gather(1, order)
        ranks = torch.arange(1, N, dtype=torch.float64)
        nan = torch.tensor(float("nan"), dtype=torch.float64)

        # H-AP: H-rank(k) = sum_v min(rel_v, rel_k) * #(level v up to k)
        hrank = torch.zeros_like(rels)
        for v in range(1, L + 1):
            at_v = Vs == v
            rel_v = torch.where(at_v, rels, 0.0).amax(1, keepdim=True)
            hrank += torch.minimum(rel_v, rels) * at_v.cumsum(1)
        hrank *= rels > 0
        add("H-AP", (hrank / ranks).sum(1) / rels.sum(1))

        gains = 2.0 ** Vs.double() - 1
        disc = 1 / torch.log2(1 + ranks)
        ideal = gains.sort(1, descending=True).values
        add("NDCG", (gains * disc).sum(1) / (ideal * disc).sum(1))

        R = (Vs > 0).sum(1)
        Rmax = int(R.max())
        ideal_v = Vs.sort(1, descending=True).values[:, :Rmax]
        top = Vs[:, :Rmax]
        si = torch.zeros(Q, Rmax, dtype=torch.float64)
        for v in range(1, L + 1):
            si += torch.minimum((top == v).cumsum(1), (ideal_v == v).cumsum(1))
        n = torch.arange(1, Rmax + 1, dtype=torch.float64)
        add("ASI", ((si / n) * (n <= R[:, None])).sum(1) / R)

        for c in range(L):
            pos = Vs >= L - c
            npos = pos.sum(1)
            prec = pos.cumsum(1) / ranks * pos
            ap = prec.sum(1) / npos
            add(f"AP@{c}", torch.where(npos > 0, ap, nan))
            add(f"mAP@R@{c}", torch.where(npos > 0, (prec * (ranks <= npos[:, None])).sum(1) / npos, nan))
            add(f"P@1@{c}", torch.where(npos > 0, pos[:, 0].double(), nan))
            for k in ks:
                add(f"R@{k}@{c}", torch.where(npos > 0, pos[:, :k].any(1).double(), nan))
        for v in range(1, L + 1):
            pert = Vs == v
            kept = (Vs <= v).cumsum(1)
            num = pert.cumsum(1)
            npert = pert.sum(1)
            apx = (torch.where(pert, num / kept.clamp(min=1), 0.0)).sum(1) / npert
            add(f"AP#{v}", torch.where(npert > 0, apx, nan))
    return {k: sums[k] / counts[k] if counts[k] else float("nan") for k in sums}


# ----------------------------------------------------------------------------------------------
# Measurement


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker(which: str, n: int, dim: int, chunk_size: int | None, threads: int | None) -> dict:
    from hapkit.evaluate import evaluate

    if threads:
        torch.set_num_threads(threads)

    emb, labels = clustered_embeddings(n, dim)
    with warnings.catch_warnings():  # warm-up (imports, first calls) on items without positives
        warnings.simplefilter("ignore")
        evaluate(emb[:64], labels[:64], progress=False)
        straightforward_evaluate(emb[:64], labels[:64])
    before = _peak_rss_bytes()
    t0 = time.perf_counter()
    if which == "hapkit":
        kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
        summary = evaluate(emb, labels, progress=False, **kwargs).summary
    else:
        summary = straightforward_evaluate(emb, labels, chunk_size=chunk_size or 256)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    return {
        "which": which, "seconds": seconds, "peak_rss": peak, "extra_rss": peak - before,
        "threads": torch.get_num_threads(), "summary": summary,
    }


def run(
    n: int = 20_000, dim: int = 128, chunk_size: int | None = None, baseline: bool = True, threads: int | None = None
) -> dict:
    """Run both evaluations in fresh subprocesses and return their measurements."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = {}
    for which in ("hapkit", "straightforward") if baseline else ("hapkit",):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--n", str(n), "--dim", str(dim)]
        if chunk_size is not None:
            cmd += ["--chunk-size", str(chunk_size)]
        if threads:
            cmd += ["--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{which} worker failed:\n{res.stderr}")
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="number of embeddings (default 20000)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    p.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: hapkit's own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--no-baseline", action="store_true", help="time hapkit only")
    p.add_argument("--worker", choices=["hapkit", "straightforward"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.n, args.dim, args.chunk_size, args.threads)))
        return

    res = run(args.n, args.dim, args.chunk_size, baseline=not args.no_baseline, threads=args.threads)
    print(f"N = {args.n}, D = {args.dim}, 3 levels, same-set protocol, every metric; "
          f"torch {torch.__version__}, {res['hapkit']['threads']} CPU thread(s), load average "
          f"{os.getloadavg()[0]:.1f} (other processes slow both runs down)")
    print(f"{'':16s} {'time (s)':>10s} {'peak RSS (MB)':>14s} {'added (MB)':>11s}")
    for which, r in res.items():
        print(f"{which:16s} {r['seconds']:10.2f} {r['peak_rss'] / 2**20:14.0f} {r['extra_rss'] / 2**20:11.0f}")
    h = res["hapkit"]
    print("hapkit: " + ", ".join(f"{k} {v:.4f}" for k, v in list(h["summary"].items())[:6]) + ", ...")
    if "straightforward" in res:
        b = res["straightforward"]
        print(f"speed-up over the full-sort evaluation: {b['seconds'] / h['seconds']:.1f}x")
        diff = max(abs(h["summary"][k] - b["summary"][k]) for k in b["summary"])
        print(f"largest difference between the two over {len(b['summary'])} metrics: {diff:.2e}")


if __name__ == "__main__":
    main()
