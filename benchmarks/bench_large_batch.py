"""Peak memory and time per image of a training step at large batch sizes: multi-stage
backpropagation (``train.sub_batch``) against the plain step, on a CPU.

Each configuration runs in a fresh process (its peak resident memory is its own), through
:func:`hapkit.training.footprint.measure_step`: the engine trains listwise AP (Revaud et al.'s
loss: 25 bins on [0, 1]) with the small CNN on random 32-px images for three steps; the time per
image is the median of the last two steps, the memory the process's peak resident set. The plain
step is skipped beyond ``--plain-max`` images (or fails when it runs out of memory, which is
reported); the multi-stage step should keep its peak memory flat, within 1.5x from 256 to 4,096
images per batch: the network only ever sees ``sub_batch`` images at once and the loss works
through chunks of queries.

    python benchmarks/bench_large_batch.py --threads 2
    python benchmarks/bench_large_batch.py --batches 256 1024 --sub-batch 64
"""

from __future__ import annotations

import argparse

from hapkit.training.footprint import FootprintError, measure_step

BATCHES = (256, 1024, 4096)
PER_CLASS = 16
STEPS = 3


def step_times(batch: int, sub_batch: int | None, threads: int | None = None) -> dict:
    """One configuration, measured in a fresh process by :func:`hapkit.training.footprint.measure_step`."""
    fp = measure_step("listwise_ap_generated_large", batch_size=batch, sub_batch=sub_batch, steps=STEPS,
                      overrides=[f"data.samples_per_class={PER_CLASS}", "train.amp=none"], device="cpu",
                      threads=threads)
    return {"batch": batch, "sub_batch": sub_batch, "ms_per_image": fp.ms_per_image, "peak_mb": fp.peak_mb}


def run(batches=BATCHES, sub_batch: int = 128, plain_max: int = 4096, threads: int | None = None) -> list[dict]:
    rows = []
    for batch in batches:
        for sub in (sub_batch, None):
            if sub is None and batch > plain_max:
                rows.append({"batch": batch, "sub_batch": None, "ms_per_image": None, "peak_mb": None,
                             "note": f"skipped (--plain-max {plain_max})"})
                continue
            try:
                rows.append(step_times(batch, sub, threads))
            except FootprintError as e:
                rows.append({"batch": batch, "sub_batch": sub, "ms_per_image": None, "peak_mb": None,
                             "note": f"failed: {e}"})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--sub-batch", type=int, default=128)
    parser.add_argument("--plain-max", type=int, default=4096, help="largest batch tried without sub-batches")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    rows = run(args.batches, args.sub_batch, args.plain_max, args.threads)
    print(f"{'batch':>6} {'sub-batch':>9} {'ms / image':>11} {'peak MB':>9}")
    for r in rows:
        ms = "-" if r["ms_per_image"] is None else f"{r['ms_per_image']:.3f}"
        mb = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"{r['batch']:>6} {r['sub_batch'] or 'plain':>9} {ms:>11} {mb:>9}  {r.get('note', '')}")
    staged = [r for r in rows if r["sub_batch"] and r["peak_mb"]]
    if len(staged) > 1:
        ratio = staged[-1]["peak_mb"] / staged[0]["peak_mb"]
        print(f"\nmulti-stage peak memory, batch {staged[-1]['batch']} / batch {staged[0]['batch']}: {ratio:.2f}x "
              f"(target <= 1.5x)")
    for b in sorted({r["batch"] for r in rows}):
        pair = {bool(r["sub_batch"]): r for r in rows if r["batch"] == b and r["peak_mb"]}
        if len(pair) == 2:
            print(f"batch {b}: plain / multi-stage peak memory {pair[False]['peak_mb'] / pair[True]['peak_mb']:.2f}x, "
                  f"time per image {pair[True]['ms_per_image'] / pair[False]['ms_per_image']:.2f}x")


if __name__ == "__main__":
    main()
