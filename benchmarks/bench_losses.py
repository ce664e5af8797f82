"""Speed and peak memory of the rank losses, hapkit against the dense (B, B, B) form, in one run.

Each case (loss, implementation, batch size) runs forward + backward in a fresh subprocess, so
that its peak resident memory is its own: the kernel's high-water mark (which sees torch's CPU
allocations) is reset once the inputs are built, and the reported peak is the growth above
that. Wall time is the median over ``--repeats`` runs. The batch mimics HAPPIER's SOP sampler:
4 images per fine class, fine classes split over 2 super-classes, random L2-normalised
embeddings (timings do not depend on the values).

    python benchmarks/bench_losses.py                       # B in 128 256 512 1024, D = 512
    python benchmarks/bench_losses.py --sizes 256 512 --losses HAPPIER SupAP
    python benchmarks/bench_losses.py --threads 1          # on a machine shared with other jobs

On a machine whose cores are busy with other processes, torch's multi-threaded kernels wait for
descheduled threads at every operation and timings become erratic; one thread per case gives
stable, comparable figures there.

A dense case whose estimated peak (extrapolated as B**3 from the previous size) exceeds
``--dense-limit-gb`` is skipped and reported as such. ListwiseAP has no (B, B, B) form: it is
O(B * bins * B) by construction, so only hapkit's figures are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# loss name -> (hapkit constructor keyword arguments, given classes and dim; dense function or None)
LOSSES = {
    "HAPPIER": (lambda classes, dim: {"num_classes": classes, "embedding_size": dim}, "dense_happier"),
    "HAPLoss": (lambda classes, dim: {}, "dense_hap_loss"),
    "SupAP": (lambda classes, dim: {}, "dense_supap_loss"),
    "SmoothAP": (lambda classes, dim: {}, "dense_smoothap_loss"),
    "ListwiseAP": (lambda classes, dim: {}, None),
    "SupRecall": (lambda classes, dim: {}, "dense_suprecall_loss"),
    "SupNDCG": (lambda classes, dim: {}, "dense_supndcg_loss"),
}
DEFAULT_LOSSES = ["HAPPIER", "SupAP", "SmoothAP", "ListwiseAP", "SupRecall", "SupNDCG"]
PER_CLASS = 4


def sop_like_batch(B: int, dim: int, seed: int = 0):
    """(B, dim) L2-normalised embeddings and (B, 2) labels: 4 per class, 2 super-classes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(B, dim, generator=g), dim=1)
    fine = torch.arange(B) // PER_CLASS
    coarse = (fine >= (int(fine.max()) + 1) // 2).long()
    return emb, torch.stack([fine, coarse], dim=1)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> float:
    """Start a fresh peak-memory measurement; returns the baseline in MB.

    On Linux the resident high-water mark (VmHWM) is reset to the current resident size, so
    memory freed earlier (imports, warm-up) cannot hide the case's own peak. Elsewhere the
    process-wide ``ru_maxrss`` is the fallback (a lower bound of the growth).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return _peak_mb()


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 / scale


def _build(loss: str, impl: str, B: int, dim: int):
    """A callable (emb, labels) -> scalar loss for one case."""
    import torch

    import hapkit.losses as losses

    classes = B // PER_CLASS
    torch.manual_seed(0)  # same clustering weights for both implementations of HAPPIER
    if impl == "hapkit":
        return getattr(losses, loss)(**LOSSES[loss][0](classes, dim))
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import _dense_reference as dense

    if loss == "HAPPIER":
        happier = losses.HAPPIER(num_classes=classes, embedding_size=dim)
        lam = happier.lambda_
        return lambda e, y: (1 - lam) * dense.dense_hap_loss(e, y) + lam * happier.cluster(e, y)
    fn = getattr(dense, LOSSES[loss][1])
    return lambda e, y: fn(e, y)


def run_case(loss: str, impl: str, B: int, dim: int = 512, repeats: int = 3, threads: int | None = None) -> dict:
    """Time forward + backward of one case in this process and measure its peak memory growth."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    fn = _build(loss, impl, B, dim)
    # warm the code paths (lazy imports, first-call allocations) at a tiny size
    e0, y0 = sop_like_batch(16, dim, seed=1)
    e0.requires_grad_(True)
    fn(e0, y0).backward()
    emb, labels = sop_like_batch(B, dim)
    emb.requires_grad_(True)
    base = _reset_peak()
    times, value = [], None
    for _ in range(repeats):
        emb.grad = None
        t0 = time.perf_counter()
        out = fn(emb, labels)
        out.backward()
        times.append(time.perf_counter() - t0)
        value = float(out.detach())
        del out
    return {
        "loss": loss,
        "impl": impl,
        "B": B,
        "dim": dim,
        "time_s": statistics.median(times),
        "peak_mb": _peak_mb() - base,
        "value": value,
        "threads": torch.get_num_threads(),
    }


def measure_in_subprocess(
    loss: str, impl: str, B: int, dim: int = 512, repeats: int = 3, threads: int | None = None, timeout: float = 1800
) -> dict:
    """:func:`run_case` in a fresh Python process (so the peak memory is the case's own)."""
    case = json.dumps({"loss": loss, "impl": impl, "B": B, "dim": dim, "repeats": repeats, "threads": threads})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", case],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available(loss: str) -> bool:
    import hapkit.losses as losses

    try:
        getattr(losses, loss)
        return True
    except (ImportError, AttributeError):
        return False


def benchmark(sizes, losses, dim=512, repeats=3, dense=True, dense_limit_gb=4.5, threads=None, progress=True):
    """Run every case; returns a pandas DataFrame with one row per (loss, B) and the ratios."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    cases = [(loss, B) for loss in losses for B in sorted(sizes)]
    for loss in losses:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    bar = tqdm(total=len(cases), disable=not progress, desc="bench")
    for loss in losses:
        if not _available(loss):
            bar.update(len(sizes))
            rows.append({"loss": loss, "note": "not importable, skipped"})
            continue
        prev = None  # (B, peak_mb) of the last dense case, for the B**3 extrapolation
        for B in sorted(sizes):
            h = measure_in_subprocess(loss, "hapkit", B, dim, repeats, threads)
            row = {"loss": loss, "B": B, "hapkit_s": h["time_s"], "hapkit_MB": h["peak_mb"]}
            note = ""
            if dense and LOSSES[loss][1] is None:
                note = "no dense form"
            elif dense:
                estimate_gb = None if prev is None else prev[1] * (B / prev[0]) ** 3 / 1024
                if estimate_gb is not None and estimate_gb > dense_limit_gb:
                    note = f"dense skipped: ~{estimate_gb:.1f} GB estimated"
                else:
                    d = measure_in_subprocess(loss, "dense", B, dim, 1 if B >= 512 else repeats, threads)
                    prev = (B, max(d["peak_mb"], 1.0))
                    row.update(
                        dense_s=d["time_s"],
                        dense_MB=d["peak_mb"],
                        speedup=d["time_s"] / h["time_s"],
                        memory_ratio=d["peak_mb"] / max(h["peak_mb"], 1.0),
                        abs_diff=abs(d["value"] - h["value"]),
                    )
            row["note"] = note
            rows.append(row)
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--losses", nargs="+", default=DEFAULT_LOSSES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-dense", action="store_true", help="only time hapkit")
    parser.add_argument("--dense-limit-gb", type=float, default=4.5)
    parser.add_argument("--threads", type=int, help="torch CPU threads per case (default: torch's)")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        case = json.loads(args.worker)
        print(json.dumps(run_case(**case)))
        return
    import pandas as pd
    import torch

    table = benchmark(
        args.sizes, args.losses, args.dim, args.repeats, not args.no_dense, args.dense_limit_gb, args.threads
    )
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} CPU thread(s), D = {args.dim}; "
          f"time = forward + backward (median), MB = peak resident growth above the inputs")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3g}".format):
        print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
