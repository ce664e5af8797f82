"""What one CUDA GPU says about hapkit's GPU paths, in one command of a few minutes, with no dataset
and no downloaded weights (synthetic images, ``model.pretrained=false``):

- ``train_step``: happier_sop's training step (ResNet-50, 224 px, batch 256, float16 with a
  gradient scaler, the backbone trained: no warm-up) through :class:`hapkit.training.engine.Trainer`,
  its images/s against the bare network's forward/backward at the same batch and precision
  (target: 90% or more), its peak memory, and its host synchronisations per step (counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` over the steps after the warm-up);
- ``listwise_memory``: the listwise AP recipe's multi-stage step (sub-batches of 128) at batch
  4,096 against batch 256, peak memory of each in a fresh process
  (:func:`hapkit.training.footprint.measure_step`); ``listwise_ap_sfm120k`` (ResNet-101) by default;
- ``evaluate``: :func:`hapkit.evaluate.evaluate` on the GPU at N = 50,000, D = 512, 3 levels,
  equal to the CPU result (every metric within 1e-6), its time and peak memory; and at 7 levels
  under a shared root (every item relevant to every query: the chunk sizing's worst case);
- ``gpu_items``: evaluation with CUDA labels, a bf16 embedding pass, the chunk size taken from
  ``torch.cuda.mem_get_info``, amp ``auto`` and native bf16, a resumed Adam's step counters;
- ``ddp`` (two GPUs or more): a rank loss with ``exclude_self`` over NCCL, each process's queries
  against the gathered batch, equal to one process on the whole batch.

Each section runs in its own process (fresh peak-memory counters) under its own time limit; a
section that fails or runs out of time is reported as such and the others still run. The result
goes to ``--json`` (default gpu_check.json) and as a table to stdout::

    python benchmarks/gpu_check.py                  # every section, about 8 minutes at most
    python benchmarks/gpu_check.py --only evaluate gpu_items --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

SECTIONS = ("train_step", "listwise_memory", "evaluate", "gpu_items", "ddp")
# seconds per section: together under 8 minutes with the processes' start-up
LIMITS = {"train_step": 140, "listwise_memory": 110, "evaluate": 110, "gpu_items": 40, "ddp": 40}
TARGET_RATIO = 0.9
TOLERANCE = 1e-6


def _mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return _mb(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# --------------------------------------------------------------------------- training step


class _PooledImages(torch.utils.data.Dataset):
    """The labels of footprint's synthetic set, its pixels drawn once for a small pool of images
    reused in turn: the loader then costs next to nothing, and what is timed is the training."""

    def __init__(self, cfg, steps: int, pool: int = 64):
        from hapkit.training.footprint import _synthetic_set

        base = _synthetic_set(cfg, steps)
        self.labels = base.labels
        self.pool = torch.stack([base[i][0] for i in range(min(pool, len(base)))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.pool[index % len(self.pool)], torch.from_numpy(self.labels[index].copy())


def train_recipe(recipe: str = "happier_sop", batch_size: int = 256, device: str = "cuda", size: int | None = None,
                 steps: int = 30, workers: int | None = None, overrides=()):
    """The recipe as trained here: untrained weights, the backbone trained from the first step,
    m-per-class batches of synthetic images, no evaluation or checkpoint until the end."""
    from hapkit.training.recipes import load_recipe

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    settings = ["model.pretrained=false", "train.warmup_epochs=0", f"data.batch_size={batch_size}",
                "data.sampler=m_per_class", "data.m_per_class_fill=packed", f"data.num_workers={workers}",
                "train.epochs=1", f"train.device={device}", f"train.log_every={steps + 1}",
                "train.checkpoint_every=0", "eval.every=0", "eval.at_end=false", *overrides]
    if size is not None:
        settings.append(f"data.train_transform.crop={size}")
    return load_recipe(recipe, overrides=settings)


def _bare_images_per_s(cfg, device: torch.device, images: torch.Tensor, steps: int, warmup: int) -> float:
    """The network alone: forward, a trivial loss, backward, at the recipe's precision."""
    from hapkit.training.engine import resolve_amp
    from hapkit.training.models import build_model

    model = build_model(cfg.model).to(device).train()
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    dtype = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            emb = model(images)
        scaler.scale(emb.float().square().mean()).backward()
        model.zero_grad(set_to_none=True)
    _sync(device)
    return steps * images.shape[0] / (time.perf_counter() - start)


def section_train_step(device: str = "cuda", recipe: str = "happier_sop", batch_size: int = 256, steps: int = 30,
                       warmup: int = 5, size: int | None = None, workers: int | None = None, overrides=()) -> dict:
    """The engine's images/s against the bare network's, peak memory, host syncs per step."""
    from hapkit.training.engine import Callback, Trainer

    if steps <= warmup:
        raise ValueError(f"steps must exceed warmup={warmup}, got {steps}")
    cfg = train_recipe(recipe, batch_size, device, size, steps, workers, overrides)
    dev = torch.device(device)
    data = _PooledImages(cfg, steps)

    class Meter(Callback):
        def __init__(self):
            self.start = self.end = None
            self.caught = None
            self._catcher = None

        def on_step_end(self, trainer):
            if trainer.global_step == warmup:
                _sync(dev)
                self.start = time.perf_counter()
                if dev.type == "cuda":
                    self._catcher = warnings.catch_warnings(record=True)
                    self.caught = self._catcher.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
            elif trainer.global_step == steps:
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
                    self._catcher.__exit__(None, None, None)
                _sync(dev)
                self.end = time.perf_counter()

    meter = Meter()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out_dir=out, train_set=data, progress=False, callbacks=[meter],
                          stop_after_steps=steps)
        _reset_peak(dev)
        trainer.fit()
    engine_peak = _peak_mb(dev)
    timed = steps - warmup
    engine = timed * cfg.data.batch_size / (meter.end - meter.start)
    syncs = None
    where: dict[str, int] = {}
    if meter.caught is not None:
        hits = [w for w in meter.caught if "synchroniz" in str(w.message)]
        syncs = len(hits) / timed
        for w in hits:
            key = f"{Path(w.filename).name}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    images = data.pool[torch.arange(cfg.data.batch_size) % len(data.pool)].to(dev)
    del trainer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    bare = _bare_images_per_s(cfg, dev, images, timed, warmup)
    ratio = engine / bare
    return {
        "recipe": recipe, "device": str(dev), "batch_size": cfg.data.batch_size, "crop": cfg.data.train_transform.crop,
        "amp": cfg.train.amp, "backbone": cfg.model.backbone, "timed_steps": timed,
        "engine_images_per_s": round(engine, 1), "bare_images_per_s": round(bare, 1), "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO, "ok": ratio >= TARGET_RATIO, "peak_mb": engine_peak,
        "syncs_per_step": syncs, "sync_sites": where,
    }


# ------------------------------------------------------------------------- listwise memory


def section_listwise_memory(device: str = "cuda", recipe: str = "listwise_ap_sfm120k", large: int = 4096,
                            small: int = 256, sub_batch: int = 128, steps: int = 2, overrides=(),
                            timeout: float | None = None) -> dict:
    """Peak memory of the multi-stage step at ``large`` against ``small`` images per batch."""
    from hapkit.training.footprint import measure_step

    overrides = ["model.pretrained=false", "train.warmup_epochs=0", *overrides]
    rows = {}
    for batch in (small, large):
        fp = measure_step(recipe, batch_size=batch, sub_batch=sub_batch, steps=steps, overrides=overrides,
                          device=device, timeout=timeout)
        rows[batch] = fp.as_dict()
    ratio = rows[large]["peak_mb"] / rows[small]["peak_mb"]
    return {
        "recipe": recipe, "sub_batch": sub_batch, "steps": steps,
        f"peak_mb_{small}": round(rows[small]["peak_mb"], 1), f"peak_mb_{large}": round(rows[large]["peak_mb"], 1),
        "peak_ratio": round(ratio, 3), "batch_ratio": large / small,
        f"ms_per_image_{large}": round(rows[large]["ms_per_image"], 3),
    }


# ------------------------------------------------------------------------------- evaluation


def hierarchy(n: int, levels: int, shared_root: bool = False, seed: int = 0) -> np.ndarray:
    """(n, levels) tree labels, finest first: fine classes of 10 items, each coarser level
    grouping 10 of the one below; ``shared_root``: the coarsest column is one class."""
    rng = np.random.default_rng(seed)
    fine = rng.permutation(n) // 10
    cols = [fine // 10**c for c in range(levels)]
    if shared_root:
        cols[-1] = np.zeros(n, dtype=np.int64)
    return np.stack(cols, axis=1).astype(np.int64)


def embeddings(n: int, dim: int, labels: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Unit vectors near their fine class's centre: rankings neither trivial nor random."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(int(labels[:, 0].max()) + 1, dim, generator=g)
    x = centres[torch.from_numpy(labels[:, 0])] + 1.5 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _timed_evaluate(emb, labels, device: torch.device, **options):
    from hapkit.evaluate import evaluate

    _reset_peak(device)
    start = time.perf_counter()
    res = evaluate(emb, labels, device=device, progress=False, **options)
    _sync(device)
    return res, time.perf_counter() - start, _peak_mb(device)


def section_evaluate(device: str = "cuda", n: int = 50_000, dim: int = 512, deep_levels: int = 7,
                     reference_device: str = "cpu") -> dict:
    """The GPU evaluation equal to the CPU one at 3 levels; the 7-level shared-root case timed."""
    import hapkit.evaluate as ev

    dev = torch.device(device)
    labels = hierarchy(n, 3)
    emb = embeddings(n, dim, labels)
    got, seconds, peak = _timed_evaluate(emb, labels, dev)
    ref, ref_seconds, _ = _timed_evaluate(emb, labels, torch.device(reference_device))
    diffs = {k: abs(got.summary[k] - ref.summary[k]) for k in ref.summary}
    worst = max(diffs, key=diffs.get)
    out = {
        "n": n, "dim": dim, "device": str(dev), "seconds": round(seconds, 2), "peak_mb": peak,
        "reference_seconds": round(ref_seconds, 2), "metrics": len(diffs),
        "same_metrics": set(got.summary) == set(ref.summary),
        "max_abs_difference": diffs[worst], "worst_metric": worst,
        "ok": set(got.summary) == set(ref.summary) and diffs[worst] <= TOLERANCE,
    }
    deep = hierarchy(n, deep_levels, shared_root=True)
    inputs = ev._check_inputs(emb, deep, None, None, None)
    plan = ev._plan(inputs, None, None, "pop", 1.0, None, (1, 4, 16), None, dev, False)
    res, deep_seconds, deep_peak = _timed_evaluate(emb, deep, dev)
    out.update({
        f"levels_{deep_levels}_seconds": round(deep_seconds, 2), f"levels_{deep_levels}_peak_mb": deep_peak,
        f"levels_{deep_levels}_chunk_size": plan.chunk_size,
        f"levels_{deep_levels}_metrics": len(res.summary),
    })
    return out


# ------------------------------------------------------------------------ GPU-only items


def _item(check) -> dict:
    try:
        return check()
    except Exception as e:  # one item failing must not hide the others
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def check_cuda_labels(device: torch.device) -> dict:
    """Item 4: embeddings and labels already on the GPU evaluate as on the CPU."""
    from hapkit.evaluate import evaluate

    labels = hierarchy(2000, 3, seed=1)
    emb = embeddings(2000, 64, labels, seed=1)
    got = evaluate(emb.to(device), torch.from_numpy(labels).to(device), progress=False).summary
    ref = evaluate(emb, labels, device="cpu", progress=False).summary
    worst = max(abs(got[k] - ref[k]) for k in ref)
    return {"ok": worst <= TOLERANCE, "max_abs_difference": worst}


def check_bf16_embedding(device: torch.device) -> dict:
    """Item 5: ``extract_embeddings(amp=torch.bfloat16)`` runs the network in bf16 (its output
    dtype inside the pass) and returns what the evaluation ranks."""
    from hapkit.evaluate import extract_embeddings
    from hapkit.training.models import build_model

    model = build_model({"backbone": "resnet18", "pretrained": False, "embedding_size": 128}).to(device).eval()
    inner = []
    model.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    data = torch.utils.data.TensorDataset(torch.rand(16, 3, 64, 64), torch.zeros(16, 1, dtype=torch.long))
    emb, _ = extract_embeddings(model, torch.utils.data.DataLoader(data, batch_size=8), device=device,
                                amp=torch.bfloat16, progress=False)
    return {"ok": bool(inner) and all(d == torch.bfloat16 for d in inner), "network_output_dtype": str(inner[0]),
            "returned_dtype": str(emb.dtype), "returned_device": str(emb.device)}


def check_chunk_size(device: torch.device) -> dict:
    """Item 7: with no chunk_size, the evaluation sizes its chunks from the free memory."""
    import hapkit.evaluate as ev

    labels = hierarchy(20_000, 7, shared_root=True, seed=2)
    emb = embeddings(20_000, 128, labels, seed=2).to(device)
    inputs = ev._check_inputs(emb, labels, None, None, None)
    free = torch.cuda.mem_get_info(device)[0]
    planned = ev._plan(inputs, None, None, "pop", 1.0, None, (1, 4, 16), None, device, False).chunk_size
    expected = ev.cuda_chunk_size(free, 20_000, 7, 20_000, 20_000)
    close = abs(planned - expected) <= max(1, 0.02 * expected)  # free memory moves a little between the two
    return {"ok": close and 1 <= planned <= 20_000, "chunk_size": planned, "from_free_memory": expected,
            "free_mb": _mb(free)}


def check_amp_auto(device: torch.device) -> dict:
    """Item 8: amp ``auto`` takes bf16 only where the GPU computes it natively."""
    from hapkit.training.engine import resolve_amp

    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        native = torch.cuda.is_bf16_supported()
    auto = resolve_amp("auto", device)
    expected = torch.bfloat16 if native else torch.float16
    return {"ok": auto == expected, "auto": str(auto), "native_bf16": native,
            "bf16_with_emulation": torch.cuda.is_bf16_supported()}


def check_resumed_adam(device: torch.device) -> dict:
    """Item 8: a checkpoint mapped to the GPU gives Adam its step counters back on the host."""
    from hapkit.training.optim import steps_on_host

    p = torch.nn.Parameter(torch.ones(8, device=device))
    opt = torch.optim.Adam([p], lr=0.1)
    p.sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    mapped = torch.load(buffer, map_location=device, weights_only=True)
    plain, fixed = torch.optim.Adam([p], lr=0.1), torch.optim.Adam([p], lr=0.1)
    plain.load_state_dict(mapped)
    fixed.load_state_dict(steps_on_host(mapped))
    where = {"load_state_dict": str(plain.state[p]["step"].device), "steps_on_host": str(fixed.state[p]["step"].device),
             "exp_avg": str(fixed.state[p]["exp_avg"].device)}
    return {"ok": where["steps_on_host"] == "cpu" and where["exp_avg"] == str(p.device), **where}


def section_gpu_items(device: str = "cuda") -> dict:
    dev = torch.device(device)
    checks = {"cuda_labels": check_cuda_labels, "bf16_embedding": check_bf16_embedding,
              "chunk_size": check_chunk_size, "amp_auto": check_amp_auto, "resumed_adam": check_resumed_adam}
    items = {name: _item(lambda c=check: c(dev)) for name, check in checks.items()}
    return {"ok": all(v.get("ok") for v in items.values()), **items}


# --------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from hapkit.losses import HAPLoss
    from hapkit.training.distributed import gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        labels = torch.from_numpy(hierarchy(64 * world, 3, seed=3)).cuda()
        emb = embeddings(64 * world, 32, labels.cpu().numpy(), seed=3).cuda()
        mine = slice(64 * rank, 64 * (rank + 1))
        x = emb[mine].clone().requires_grad_(True)
        loss = HAPLoss(exclude_self=True)
        value = loss(x, labels[mine], ref_emb=gather_with_grad(x), ref_labels=labels, query_offset=64 * rank)
        value.backward()
        torch.save({"value": value.detach().cpu(), "grad": x.grad.cpu()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def section_ddp(device: str = "cuda") -> dict:
    """exclude_self under NCCL: each process's queries against the gathered batch, their mean
    loss and gradients equal to one process's on the whole batch."""
    import socket

    import torch.multiprocessing as mp

    from hapkit.losses import HAPLoss

    world = torch.cuda.device_count()
    if world < 2:
        return {"skipped": f"{world} GPU(s): the DDP comparison needs 2 or more"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_ddp_worker, args=(world, port, out), nprocs=world, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]
    labels = hierarchy(64 * world, 3, seed=3)
    x = embeddings(64 * world, 32, labels, seed=3).cuda().requires_grad_(True)
    whole = HAPLoss(exclude_self=True)(x, torch.from_numpy(labels).cuda())
    whole.backward()
    mean = sum(r["value"] for r in ranks) / world
    # gradient of the mean over processes of their losses: each process's own rows, scaled
    grad = torch.cat([r["grad"] for r in ranks]) / world
    diff_value = abs(float(mean) - float(whole))
    diff_grad = float((grad - x.grad.cpu()).abs().max())
    return {"world": world, "loss_difference": diff_value, "ok": diff_value <= 1e-5,
            "grad_max_abs_difference_own_rows": diff_grad}


# ------------------------------------------------------------------------------- driver

FUNCTIONS = {"train_step": section_train_step, "listwise_memory": section_listwise_memory,
             "evaluate": section_evaluate, "gpu_items": section_gpu_items, "ddp": section_ddp}


def run_section(name: str, limit_s: float, options: dict | None = None) -> dict:
    """The section in a fresh process under ``limit_s`` seconds; its dict, or what went wrong."""
    job = json.dumps({"section": name, "options": options or {}})
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], input=job,
                              capture_output=True, text=True, timeout=limit_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {limit_s:.0f} s", "wall_s": round(limit_s, 1)}
    wall = round(time.perf_counter() - start, 1)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit status {proc.returncode}"
        return {"status": "failed", "error": tail, "wall_s": wall}
    return {"status": "ok", "wall_s": wall, **json.loads(lines[-1])}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def format_table(results: dict) -> str:
    """One block per section: its status, then one ``key  value`` line per entry."""
    lines = []
    for name, res in results.items():
        if not isinstance(res, dict):
            continue
        verdict = res.get("status", "ok")
        if res.get("ok") is False and verdict == "ok":
            verdict = "CHECK FAILED"
        lines.append(f"== {name}: {verdict}")
        width = max((len(k) for k in res), default=0)
        for key, value in res.items():
            if key == "status":
                continue
            lines.append(f"  {key.ljust(width)}  {_cell(value)}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gpu_check.json", help="where the results go (default gpu_check.json)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--listwise-recipe", default="listwise_ap_sfm120k",
                        choices=["listwise_ap_sfm120k", "listwise_ap_generated_large"],
                        help="recipe of the listwise memory section (default listwise_ap_sfm120k, ResNet-101)")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the train_step section (default 30)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 6:
        parser.error("--steps must be at least 6 (5 warm-up steps, then the timed ones)")
    return args


def _child() -> None:
    job = json.loads(sys.stdin.read())
    print(json.dumps(FUNCTIONS[job["section"]](**job["options"]), default=str))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        _child()
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    options = {"train_step": {"steps": args.steps},
               "listwise_memory": {"recipe": args.listwise_recipe, "timeout": LIMITS["listwise_memory"] / 2 - 5}}
    results = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
               "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in args.only:
        results[name] = run_section(name, LIMITS[name], options.get(name))
        print(format_table({name: results[name]}), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
