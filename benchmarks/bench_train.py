"""Training throughput of hapkit's engine against a bare hand-written loop, in one run.

Both loops train the same model with the same loss, optimisers, mixed-precision setting and the
same batches (the recipe's sampler over the same dataset and transform); the engine adds its
bookkeeping: per-item seeding of the augmentation, the non-finite guard, per-group optimisers and
schedules, progress bar, callbacks. Steps are timed from a callback / inside the loop after a few
warm-up steps, alternating engine and bare runs to share the machine's noise. Prints images/s of
each and the engine's overhead (target: below 10%).

CPU, generated dataset, small CNN (the default; about a minute on two cores):

    python benchmarks/bench_train.py

GPU, ResNet-50 at 224 px, HAPPIER, batch 256, bf16 autocast, synthetic images (no dataset needed),
engine vs bare loop, and bare backbone forward/backward without the loss (``--backbone-only``):

    python benchmarks/bench_train.py --recipe happier_sop --synthetic --device cuda --steps 40 \\
        --set model.pretrained=false --set train.amp=bf16 --set data.num_workers=8
    python benchmarks/bench_train.py --recipe happier_sop --synthetic --device cuda --steps 40 \\
        --set model.pretrained=false --set train.amp=bf16 --backbone-only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from hapkit.training.config import apply_overrides
from hapkit.training.engine import Callback, Trainer, build_loss, build_sampler, resolve_amp
from hapkit.training.models import build_model
from hapkit.training.optim import build_group
from hapkit.training.recipes import load_recipe


class SyntheticImages(torch.utils.data.Dataset):
    """Random uint8-like images of the recipe's crop size with a 3-level tree of labels.

    Stands in for a real dataset when timing on a GPU: the images are made on the fly, so data
    loading costs a little but no disk is read.
    """

    def __init__(self, n: int = 8192, size: int = 224, fine_classes: int = 512, per_coarse: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        fine = rng.permutation(np.arange(n) % fine_classes)
        mid = fine // per_coarse
        self.labels = np.stack([fine, mid, mid // 4], 1).astype(np.int64)
        self.size = size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.rand(3, self.size, self.size), torch.from_numpy(self.labels[i].copy())


def make_dataset(cfg, synthetic: bool, synthetic_images: int = 8192):
    if synthetic:
        size = cfg.data.train_transform.crop
        return SyntheticImages(n=synthetic_images, size=size, fine_classes=max(64, synthetic_images // 16))
    from hapkit.data import build_train_set

    return build_train_set(cfg.data)


class StepTimer(Callback):
    def __init__(self):
        self.times = []

    def on_step_end(self, trainer):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def images_per_second(times, batch: int, warmup: int) -> float:
    t = times[warmup:]
    return batch * (len(t) - 1) / (t[-1] - t[0])


def engine_run(cfg, dataset, steps: int) -> list[float]:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out_dir=out, train_set=dataset, eval_sets=[], progress=False,
                          callbacks=[timer], stop_after_steps=steps)
        trainer.fit()
    return timer.times


def bare_run(cfg, dataset, steps: int, backbone_only: bool = False) -> list[float]:
    """The loop one would write by hand: DataLoader, autocast, loss, backward, optimiser steps."""
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    loss_fn = build_loss(cfg, dataset.labels).to(device)
    channels_last = cfg.train.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opts = []
    for group, params in (("backbone", model.backbone_parameters()), ("head", model.head_parameters()),
                          ("loss", loss_fn.parameters())):
        opt, _ = build_group(params, cfg.optim, group, cfg.train.epochs)
        if opt is not None:
            opts.append(opt)
    amp = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    sampler = build_sampler(cfg, dataset.labels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.train()
    times = []
    epoch = 0
    while len(times) < steps:
        sampler.set_epoch(epoch)
        for images, labels in loader:
            images = images.to(device, non_blocking=True, memory_format=fmt)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                emb = model(images)
            loss = emb.float().sum() if backbone_only else loss_fn(emb.float(), labels)
            scaler.scale(loss).backward()
            for o in opts:
                scaler.step(o)
            scaler.update()
            for o in opts:
                o.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if len(times) >= steps:
                break
        epoch += 1
    return times


def run(recipe: str = "happier_generated", overrides=(), steps: int = 30, warmup: int = 5, repeats: int = 2,
        synthetic: bool = False, backbone_only: bool = False, verbose: bool = True,
        synthetic_images: int = 8192) -> dict:
    """Time both loops ``repeats`` times (alternating); returns the median images/s and the overhead."""
    cfg = load_recipe(recipe, overrides=list(overrides))
    # the timed steps must not include an epoch end (evaluation, checkpoint)
    cfg = apply_overrides(cfg, {"eval.every": 0, "eval.at_end": False})
    dataset = make_dataset(cfg, synthetic, synthetic_images)
    per_epoch = len(build_sampler(cfg, dataset.labels))
    if steps > per_epoch:
        cfg = apply_overrides(cfg, {"train.epochs": max(cfg.train.epochs, -(-steps // per_epoch) + 1)})
    batch = cfg.data.batch_size
    engine, bare = [], []
    for r in range(repeats):
        bare.append(images_per_second(bare_run(cfg, dataset, steps, backbone_only), batch, warmup))
        if not backbone_only:
            engine.append(images_per_second(engine_run(cfg, dataset, steps), batch, warmup))
        if verbose:
            msg = f"repeat {r + 1}/{repeats}: bare {bare[-1]:8.1f} img/s"
            if engine:
                msg += f"   engine {engine[-1]:8.1f} img/s"
            print(msg, flush=True)
    out = {"recipe": cfg.name, "batch": batch, "steps": steps, "bare_images_per_s": statistics.median(bare)}
    if engine:
        out["engine_images_per_s"] = statistics.median(engine)
        out["overhead"] = 1.0 - out["engine_images_per_s"] / out["bare_images_per_s"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="happier_generated")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="alternating engine / bare runs (default 3)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the recipe's, auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--synthetic", action="store_true", help="random images instead of the recipe's dataset")
    p.add_argument("--backbone-only", action="store_true",
                   help="bare loop only, with the embeddings' sum as loss (backbone forward/backward cost)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    res = run(args.recipe, overrides, args.steps, args.warmup, args.repeats, args.synthetic, args.backbone_only)
    print(f"\n{res['recipe']}, batch {res['batch']}, {torch.get_num_threads()} CPU thread(s), "
          f"{'cuda' if torch.cuda.is_available() and args.device != 'cpu' else 'cpu'}")
    print(f"bare loop : {res['bare_images_per_s']:9.1f} images/s")
    if "engine_images_per_s" in res:
        print(f"engine    : {res['engine_images_per_s']:9.1f} images/s")
        print(f"overhead  : {100 * res['overhead']:+.1f}% (engine vs bare; target < 10%)")


if __name__ == "__main__":
    main()
