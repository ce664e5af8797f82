"""Peak memory and time per image of a training step at large batch sizes: multi-stage
backpropagation (``train.sub_batch``) against the plain step, on a CPU.

Each configuration runs in a fresh process (its peak resident memory is its own): the engine
trains listwise AP (Revaud et al.'s loss: 25 bins on [0, 1]) with the small CNN on random 32-px
images for three steps; the time per image is the median of the last two steps, the memory the
process's peak resident set. The plain step is skipped beyond ``--plain-max`` images (or fails
when it runs out of memory, which is reported); the multi-stage step should keep its peak memory
flat, within 1.5x from 256 to 4,096 images per batch: the network only ever sees ``sub_batch``
images at once and the loss works through chunks of queries.

    python benchmarks/bench_large_batch.py --threads 2
    python benchmarks/bench_large_batch.py --batches 256 1024 --sub-batch 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

BATCHES = (256, 1024, 4096)
PER_CLASS = 16


class RandomImages(torch.utils.data.Dataset):
    """Random 32-px images of classes of ``PER_CLASS`` images, 3 levels (fine, x4, x16)."""

    def __init__(self, n: int):
        fine = np.arange(n) // PER_CLASS
        self.labels = np.stack([fine, fine // 4, fine // 16], 1).astype(np.int64)
        self.images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], torch.from_numpy(self.labels[i].copy())


def step_times(batch: int, sub_batch: int | None) -> dict:
    from hapkit.training.engine import Callback, Trainer
    from hapkit.training.recipes import load_recipe

    overrides = [
        f"data.batch_size={batch}", f"data.samples_per_class={PER_CLASS}", "data.sampler=m_per_class",
        "data.m_per_class_fill=packed", "data.num_workers=0", "train.epochs=1", "train.amp=none",
        "train.device=cpu", "eval.every=0", "eval.at_end=false", "train.log_every=1",
        f"train.sub_batch={sub_batch if sub_batch else 'null'}",
    ]
    cfg = load_recipe("listwise_ap_generated_large", overrides=overrides)

    class Clock(Callback):
        def __init__(self):
            self.marks = [time.perf_counter()]

        def on_step_end(self, trainer):
            self.marks.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out_dir=out, train_set=RandomImages(3 * batch), progress=False, callbacks=[clock],
                          stop_after_steps=3)
        trainer.fit()
    steps = np.diff(clock.marks)[1:]  # the first step allocates
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"batch": batch, "sub_batch": sub_batch, "ms_per_image": 1000 * float(np.median(steps)) / batch,
            "peak_mb": peak_mb}


def run(batches=BATCHES, sub_batch: int = 128, plain_max: int = 4096, threads: int | None = None) -> list[dict]:
    rows = []
    for batch in batches:
        for sub in (sub_batch, None):
            if sub is None and batch > plain_max:
                rows.append({"batch": batch, "sub_batch": None, "ms_per_image": None, "peak_mb": None,
                             "note": f"skipped (--plain-max {plain_max})"})
                continue
            cmd = [sys.executable, __file__, "--worker", str(batch), "--sub-batch", str(sub or 0)]
            if threads:
                cmd += ["--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"batch": batch, "sub_batch": sub, "ms_per_image": None, "peak_mb": None,
                             "note": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--sub-batch", type=int, default=128)
    parser.add_argument("--plain-max", type=int, default=4096, help="largest batch tried without sub-batches")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        print(json.dumps(step_times(args.worker, args.sub_batch or None)))
        return
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
