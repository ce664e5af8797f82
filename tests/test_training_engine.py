"""The training engine on a tiny in-memory dataset: logging, checkpoints, bit-exact resumption,
warm-up, schedules, clipping, the non-finite guard and evaluation."""

import json

import numpy as np
import pytest
import torch

from hapkit.training.checkpoint import load_checkpoint, save_atomic
from hapkit.training.config import ConfigError
from hapkit.data import EvalSet
from hapkit.training.engine import Callback, NonFiniteError, Trainer, evaluate_model, read_history, train
from hapkit.training.loading import SeededBatches, item_seed
from hapkit.training.recipes import load_recipe

TIMING = {"time_s", "images_per_s"}


class TinySet(torch.utils.data.Dataset):
    """8 fine classes in 2 super-classes, 8 images each, 16 px; random noise on every read
    stands for data augmentation (it draws from the global generator, like torchvision)."""

    def __init__(self, seed=0, per_class=8, noise=0.1, size=16):
        g = torch.Generator().manual_seed(seed)
        fine = torch.arange(8).repeat_interleave(per_class)
        self.labels = np.stack([fine.numpy(), (fine // 4).numpy()], 1).astype(np.int64)
        proto = torch.rand(8, 3, 1, 1, generator=g)
        self.images = proto[fine] + 0.3 * torch.rand(len(fine), 3, size, size, generator=g)
        self.noise = noise

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return x, torch.from_numpy(self.labels[i].copy())


TINY = [
    "model.width=4", "model.embedding_size=8", "data.batch_size=16", "data.samples_per_class=4",
    "data.super_classes_per_batch=2", "data.batches_per_super_tuple=2", "data.sampler_column=1",
    "data.num_workers=0", "data.eval_batch_size=64", "train.epochs=2", "train.log_every=1",
    "eval.every=1", "train.device=cpu", "train.amp=none",
]


def tiny_cfg(*overrides, recipe="happier_generated"):
    return load_recipe(recipe, overrides=TINY + list(overrides))


def eval_sets():
    return [EvalSet(name="test", query=TinySet(seed=1, noise=0.0))]


def run(tmp_path, *overrides, recipe="happier_generated", **kw):
    kw.setdefault("train_set", TinySet())
    kw.setdefault("eval_sets", eval_sets())
    return train(tiny_cfg(*overrides, recipe=recipe), out_dir=tmp_path, progress=False, **kw)


def model_state(run_dir):
    state = load_checkpoint(run_dir / "checkpoint.pt")
    return state["model"], state["loss"], state


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def strip_timing(history):
    return history.drop(columns=[c for c in TIMING if c in history])


def test_training_logs_evaluates_and_checkpoints(tmp_path):
    result = run(tmp_path)
    assert not result.interrupted and result.global_step == 4  # 2 epochs x 2 batches
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[-1])
    assert rec["epoch"] == 2 and rec["step"] == 4 and np.isfinite(rec["loss"])
    for key in ("test/H-AP", "test/ASI", "test/NDCG", "test/R@1@0", "test/AP@1", "lr/backbone", "lr/head", "lr/loss"):
        assert key in rec
    assert result.metrics["test/H-AP"] == rec["test/H-AP"]
    assert (tmp_path / "config.yaml").is_file()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["finished"] and state["epoch"] == 2 and state["batch_in_epoch"] == 0
    pd_hist = read_history(tmp_path)
    assert list(pd_hist["epoch"]) == [1, 2]


def test_same_seed_same_run_and_another_seed_differs(tmp_path):
    run(tmp_path / "a", "train.epochs=1", "eval.every=0", "eval.at_end=false")
    run(tmp_path / "b", "train.epochs=1", "eval.every=0", "eval.at_end=false")
    run(tmp_path / "c", "train.epochs=1", "eval.every=0", "eval.at_end=false", "seed=1")
    a, b, c = (model_state(tmp_path / n)[0] for n in "abc")
    assert_same_state(a, b)
    assert not torch.equal(a["head.weight"], c["head.weight"])


@pytest.mark.parametrize("stop_at", [3, 2])  # mid-epoch, and exactly at an epoch boundary
def test_run_stopped_and_resumed_equals_uninterrupted_run_bit_for_bit(tmp_path, stop_at):
    full = run(tmp_path / "full")
    first = run(tmp_path / "split", stop_after_steps=stop_at)
    assert first.interrupted and first.global_step == stop_at
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert state["global_step"] == stop_at and state["batch_in_epoch"] == stop_at % 2
    second = run(tmp_path / "split", resume=True)
    assert not second.interrupted and second.global_step == 4
    a, la, _ = model_state(tmp_path / "full")
    b, lb, _ = model_state(tmp_path / "split")
    assert_same_state(a, b)
    assert_same_state(la, lb)
    pd_full, pd_split = strip_timing(full.history), strip_timing(second.history)
    assert pd_full.equals(pd_split)
    assert strip_timing(read_history(tmp_path / "split")).equals(pd_full)


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_crashed_run_resumes_from_its_last_checkpoint(tmp_path):
    run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crash", "train.checkpoint_every=3", callbacks=[CrashAt(4)])
    # killed at step 4, before epoch 2 was saved: the last checkpoint is step 3 (epoch 2, batch 1)
    state = load_checkpoint(tmp_path / "crash" / "checkpoint.pt")
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (3, 1, 1)
    assert len(read_history(tmp_path / "crash")) == 1
    run(tmp_path / "crash", "train.checkpoint_every=3", resume=True)
    assert_same_state(model_state(tmp_path / "full")[0], model_state(tmp_path / "crash")[0])
    assert strip_timing(read_history(tmp_path / "crash")).equals(strip_timing(read_history(tmp_path / "full")))


def test_resume_drops_metric_lines_written_after_the_checkpoint(tmp_path):
    run(tmp_path, stop_after_steps=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 4, "loss": 0.0}) + "\n")  # a line from a lost future
    run(tmp_path, resume=True)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_resume_refuses_a_different_recipe(tmp_path):
    run(tmp_path, stop_after_steps=2)
    with pytest.raises(ConfigError, match="optim.lr"):
        run(tmp_path, "optim.lr=0.5", resume=True)
    # more epochs is a legitimate change (e.g. to continue a finished run further)
    longer = run(tmp_path, "train.epochs=3", resume=True)
    assert longer.global_step == 6 and list(longer.history["epoch"]) == [1, 2, 3]


def test_loader_workers_do_not_change_the_run(tmp_path):
    run(tmp_path / "w0", "train.epochs=1", "eval.every=0", "eval.at_end=false")
    run(tmp_path / "w2", "train.epochs=1", "eval.every=0", "eval.at_end=false", "data.num_workers=2")
    assert_same_state(model_state(tmp_path / "w0")[0], model_state(tmp_path / "w2")[0])


def test_warmup_freezes_the_backbone_only(tmp_path):
    cfg = tiny_cfg("train.warmup_epochs=1", "train.epochs=2", "eval.every=0", "eval.at_end=false",
                   "model.freeze_batchnorm=true")
    trainer = Trainer(cfg, out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(), progress=False)
    backbone0 = [p.detach().clone() for p in trainer.model.backbone_parameters()]
    head0 = [p.detach().clone() for p in trainer.model.head_parameters()]
    snapshots = []

    class Snap(Callback):
        def on_epoch_end(self, tr, record):
            snapshots.append([p.detach().clone() for p in tr.model.backbone_parameters()])

    trainer.callbacks.append(Snap())
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(backbone0, snapshots[0]))
    assert not all(torch.equal(a, b) for a, b in zip(head0, trainer.model.head_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))


def test_learning_rate_schedules_per_group(tmp_path):
    one_step = ["train.epochs=4", "data.batches_per_super_tuple=1", "eval.every=0", "eval.at_end=false"]
    res = run(tmp_path / "cos", *one_step, "optim.lr=0.01", "optim.eta_min=0.001", "optim.loss.lr=1.0",
              "optim.loss.eta_min=0.1")
    import math

    cos = lambda base, lo, e: lo + (base - lo) * (1 + math.cos(math.pi * e / 4)) / 2  # noqa: E731
    assert np.allclose(res.history["lr/head"], [cos(0.01, 0.001, e) for e in range(4)])
    assert np.allclose(res.history["lr/loss"], [cos(1.0, 0.1, e) for e in range(4)])
    res = run(tmp_path / "step", *one_step, "optim.lr=0.01", "optim.scheduler=multistep", "optim.milestones=[1,3]",
              "optim.gamma=0.3", "optim.backbone.scheduler=constant", "optim.backbone.lr=0.002")
    assert np.allclose(res.history["lr/head"], [0.01, 0.003, 0.003, 0.0009])
    assert np.allclose(res.history["lr/backbone"], [0.002] * 4)


def test_gradient_clipping_bounds_the_update(tmp_path):
    cfg = ["optim.optimizer=sgd", "optim.momentum=0", "optim.weight_decay=0", "optim.lr=1.0",
           "optim.loss.lr=1.0", "optim.loss.optimizer=sgd", "optim.grad_clip=0.001", "eval.every=0",
           "eval.at_end=false"]
    trainer = Trainer(tiny_cfg(*cfg), out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(),
                      progress=False, stop_after_steps=1)
    before = [p.detach().clone() for p in trainer._params]
    trainer.fit()
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainer._params, before)))
    assert step.item() == pytest.approx(0.001, rel=1e-3)  # |lr * clipped gradient| = lr * max_norm


@pytest.mark.parametrize("amp", ["bf16", "fp16"])  # fp16 goes through the gradient scaler
def test_mixed_precision_trains_on_cpu(tmp_path, amp):
    res = run(tmp_path, f"train.amp={amp}", "train.epochs=1")
    assert np.isfinite(res.history["loss"]).all() and np.isfinite(res.metrics["test/H-AP"])
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert bool(state["scaler"]) == (amp == "fp16")


def test_training_benchmark_runs_at_a_tiny_size():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run("happier_generated", TINY[:2] + ["data.batch_size=32", "data.train_transform.crop=16", "train.device=cpu"],
                    steps=3, warmup=1, repeats=1, synthetic=True, synthetic_images=512, verbose=False)
    assert res["bare_images_per_s"] > 0 and res["engine_images_per_s"] > 0 and "overhead" in res


@pytest.mark.parametrize("recipe", ["supap_generated", "smoothap_generated", "hpl_generated", "csl_generated",
                                    "roadmap_generated", "listwise_ap_generated"])
def test_every_generated_recipe_trains(tmp_path, recipe):
    res = run(tmp_path, "train.epochs=1", "eval.metrics=[H-AP, R@k]", recipe=recipe)
    assert np.isfinite(res.history["loss"]).all()
    assert set(res.metrics) == {"test/H-AP", "test/R@1@0", "test/R@4@0", "test/R@16@0", "test/R@1@1", "test/R@4@1", "test/R@16@1"}


def test_non_finite_embeddings_stop_training_with_a_clear_message(tmp_path):
    data = TinySet()
    data.images[:32] = float("nan")  # a whole super-class: every batch holds some of it
    with pytest.raises(NonFiniteError, match=r"the embeddings( and the loss)? became NaN or infinite at step 0 "):
        run(tmp_path, train_set=data)


def test_non_finite_loss_stops_training(tmp_path, monkeypatch):
    trainer = Trainer(tiny_cfg("train.log_every=2"), out_dir=tmp_path, train_set=TinySet(),
                      eval_sets=eval_sets(), progress=False)
    real = trainer.loss_fn.forward
    calls = []

    def flaky(*args, **kw):
        calls.append(1)
        out = real(*args, **kw)
        return out * float("inf") if len(calls) == 2 else out

    monkeypatch.setattr(trainer.loss_fn, "forward", flaky)
    with pytest.raises(NonFiniteError, match="the loss became NaN or infinite at step 1") as info:
        trainer.fit()
    assert "optim.grad_clip" in str(info.value)
    assert len(calls) == 2  # detected at the next log interval (log_every=2), no later


def test_evaluate_model_equals_direct_evaluation():
    from hapkit.evaluate import evaluate, extract_embeddings
    from hapkit.training.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg().model).eval()
    q, g = TinySet(seed=1, noise=0.0), TinySet(seed=2, noise=0.0)
    sets = [EvalSet("same", q), EvalSet("qg", q, g)]
    out = evaluate_model(model, sets, batch_size=16, progress=False, metrics=["H-AP", "AP"])
    loader = torch.utils.data.DataLoader(q, batch_size=64)
    emb, lab = extract_embeddings(model, loader, progress=False)
    ref = evaluate(emb, lab, metrics=["H-AP", "AP"], progress=False).summary
    gemb, glab = extract_embeddings(model, torch.utils.data.DataLoader(g, batch_size=64), progress=False)
    ref_qg = evaluate(emb, lab, gallery_embeddings=gemb, gallery_labels=glab, metrics=["H-AP", "AP"], progress=False).summary
    for k, v in ref.items():
        assert out[f"same/{k}"] == pytest.approx(v)
        assert out[f"qg/{k}"] == pytest.approx(ref_qg[k])
        assert out[f"overall/{k}"] == pytest.approx((v + ref_qg[k]) / 2)


def test_seeded_batches_resume_and_shard_with_stable_item_seeds():
    from hapkit.data import HierarchicalBatchSampler

    labels = TinySet().labels

    def sampler(**kw):
        return HierarchicalBatchSampler(labels, batch_size=16, samples_per_class=4, batches_per_super_tuple=3,
                                        seed=0, **kw)

    whole = sampler()
    whole.set_epoch(1)
    batches = list(SeededBatches(whole, seed=7))
    assert len(batches) == 3 and all(len(b) == 16 for b in batches)
    resumed = sampler()
    resumed.set_epoch(1, start_batch=2)
    assert len(SeededBatches(resumed, seed=7)) == 1 and list(SeededBatches(resumed, seed=7)) == batches[2:]
    halves = []
    for rank in range(2):
        part = sampler(num_replicas=2, rank=rank)
        part.set_epoch(1)
        halves.append(list(SeededBatches(part, seed=7)))
    assert [a + b for a, b in zip(*halves)] == batches  # the shards concatenate to the global batch
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)
    assert batches[0][3][1] == item_seed(7, 1, 0, 3)
    other = sampler()
    other.set_epoch(2)
    assert [s for _, s in next(iter(SeededBatches(other, seed=7)))] != [s for _, s in batches[0]]


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    path = save_atomic({"x": torch.ones(2)}, tmp_path / "sub" / "ckpt.pt")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------- official loop semantics


def test_warmup_holds_every_schedule_until_it_ends(tmp_path):
    """HAPPIER: during warm-up no epoch scheduler steps; the cosine starts after it."""
    import math

    one_step = ["train.epochs=4", "data.batches_per_super_tuple=1", "eval.every=0", "eval.at_end=false",
                "model.freeze_batchnorm=true", "optim.lr=0.01", "optim.eta_min=0.0", "train.warmup_epochs=2"]
    held = run(tmp_path / "held", *one_step)
    cos = lambda e: 0.01 * (1 + math.cos(math.pi * e / 4)) / 2  # noqa: E731
    # lr of epochs 1..4: two warm-up epochs at the initial lr, then the cosine from its start
    assert np.allclose(held.history["lr/head"], [cos(0), cos(0), cos(0), cos(1)])
    moving = run(tmp_path / "moving", *one_step, "train.warmup_schedules=true")
    assert np.allclose(moving.history["lr/head"], [cos(e) for e in range(4)])


def test_loss_parameters_follow_the_head_group(tmp_path):
    cfg = tiny_cfg("optim.loss.follow=head", "optim.loss.lr=null", "optim.loss.eta_min=null", "optim.lr=0.02", "optim.weight_decay=0.001", "optim.eta_min=0.005",
                   "optim.backbone.lr=0.005")
    trainer = Trainer(cfg, out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(), progress=False)
    head, loss = trainer.optimizers["head"], trainer.optimizers["loss"]
    assert loss is not head and type(loss) is type(head)
    assert {id(p) for p in loss.param_groups[0]["params"]} == {id(p) for p in trainer.loss_fn.parameters()}
    for key in ("lr", "weight_decay", "betas"):
        assert loss.param_groups[0][key] == head.param_groups[0][key]
    assert trainer.schedulers["loss"].eta_min == trainer.schedulers["head"].eta_min == 0.005


def test_one_optimiser_over_the_whole_network(tmp_path):
    cfg = tiny_cfg("optim.network=single", "optim.optimizer=sgd", "optim.lr=0.1", "optim.nesterov=true",
                   "optim.loss.follow=net", "optim.loss.lr=null", "optim.loss.eta_min=null")
    trainer = Trainer(cfg, out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(), progress=False)
    assert list(trainer.optimizers) == ["net", "loss"]
    net = trainer.optimizers["net"]
    assert isinstance(net, torch.optim.SGD) and net.param_groups[0]["nesterov"]
    assert len(net.param_groups[0]["params"]) == len(list(trainer.model.parameters()))
    assert trainer.optimizers["loss"].param_groups[0]["lr"] == 0.1
    trainer.fit()
    assert {"lr/net", "lr/loss"} <= set(trainer.history[-1])
    with pytest.raises(ConfigError, match="warmup_frozen"):
        Trainer(tiny_cfg("optim.network=single", "optim.loss.follow=net", "optim.loss.lr=null", "optim.loss.eta_min=null",
                         "train.warmup_epochs=1"), out_dir=tmp_path / "w", train_set=TinySet(), progress=False)


def test_fp16_uses_a_gradient_scaler_on_cpu(tmp_path):
    trainer = Trainer(tiny_cfg("train.amp=fp16"), out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(),
                      progress=False, stop_after_steps=1)
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    scale = trainer.scaler.get_scale()
    trainer.fit()
    assert trainer.scaler.get_scale() in (scale, scale / 2)  # updated after the step (halved on overflow)


def one_step_weights(tmp_path, *overrides):
    """The model after one optimiser step on the same first batch."""
    cfg = tiny_cfg("model.freeze_batchnorm=true", "model.dropout=0.3", "eval.every=0", "eval.at_end=false",
                   "optim.lr=0.01", *overrides)
    trainer = Trainer(cfg, out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(), progress=False,
                      stop_after_steps=1)
    trainer.fit()
    return trainer.model.state_dict(), trainer.loss_fn.state_dict()


@pytest.mark.parametrize("extra", [[], ["optim.grad_clip=0.05"]])
def test_a_step_with_sub_batches_equals_a_plain_step(tmp_path, extra):
    """Multi-stage backprop: the same augmented images, dropout masks replayed, frozen batch-norm."""
    plain, plain_loss = one_step_weights(tmp_path / "plain", *extra)
    staged, staged_loss = one_step_weights(tmp_path / "staged", "train.sub_batch=4", *extra)
    for key in plain:
        torch.testing.assert_close(staged[key], plain[key], rtol=1e-5, atol=1e-5, msg=key)
    for key in plain_loss:
        torch.testing.assert_close(staged_loss[key], plain_loss[key], rtol=1e-5, atol=1e-5, msg=key)


def test_under_bf16_a_step_with_sub_batches_moves_the_weights_as_a_plain_step(tmp_path):
    """bf16 rounds each path's activations differently (other batch shapes, other kernels), so the
    two updates agree to a fraction of the update, not to float32 precision. SGD keeps the update
    in proportion to the gradient (Adam's first step is lr x sign(gradient), which turns a rounding
    difference on a near-zero gradient entry into a full 2 lr)."""
    sgd = ["optim.optimizer=sgd", "optim.loss.optimizer=sgd"]
    start, _ = one_step_weights(tmp_path / "start", *sgd, "optim.lr=0", "optim.loss.lr=0")
    plain, _ = one_step_weights(tmp_path / "plain", "train.amp=bf16", *sgd)
    staged, _ = one_step_weights(tmp_path / "staged", "train.sub_batch=4", "train.amp=bf16", *sgd)
    moved = [k for k in plain if plain[k].is_floating_point() and not torch.equal(plain[k], start[k])]
    assert moved, "the step moved no weight"
    for key in moved:
        update = (plain[key] - start[key]).abs().max()
        assert (staged[key] - plain[key]).abs().max() <= 0.02 * update, key


def test_sub_batches_with_trainable_batch_norm_normalise_per_sub_batch(tmp_path):
    """Documented limit: batch statistics are those of each sub-batch (ghost batch-norm), and the
    running statistics are updated once per sub-batch, not twice."""
    plain, _ = one_step_weights(tmp_path / "plain", "model.freeze_batchnorm=false", "model.dropout=0")
    staged, _ = one_step_weights(tmp_path / "staged", "model.freeze_batchnorm=false", "model.dropout=0",
                                 "train.sub_batch=4")
    assert not torch.allclose(staged["head.weight"], plain["head.weight"], atol=1e-6)
    tracked = [k for k in staged if k.endswith("num_batches_tracked")]
    assert tracked and all(int(staged[k]) == 4 for k in tracked)  # 16 images in 4 sub-batches, counted once


def test_resume_survives_a_truncated_checkpoint(tmp_path):
    from hapkit.training.checkpoint import CheckpointError, previous_path

    full = run(tmp_path / "full", "eval.every=0", "eval.at_end=false")
    run(tmp_path / "cut", "eval.every=0", "eval.at_end=false")
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    assert previous_path(ckpt).is_file()  # the epoch-1 checkpoint is kept beside the last one
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a copy cut short
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        resumed = run(tmp_path / "cut", "eval.every=0", "eval.at_end=false", resume=True)
    assert resumed.global_step == full.global_step
    assert_same_state(model_state(tmp_path / "full")[0], model_state(tmp_path / "cut")[0])
    # both files unreadable: the error names the file and says what to do
    ckpt.write_bytes(b"not a checkpoint")
    previous_path(ckpt).write_bytes(b"nor this")
    with pytest.raises(CheckpointError, match=r"checkpoint.*checkpoint\.pt is damaged.*new output directory"):
        run(tmp_path / "cut", "eval.every=0", "eval.at_end=false", resume=True)


def test_a_run_with_sub_batches_resumes_bit_for_bit(tmp_path):
    extra = ["train.sub_batch=4", "model.dropout=0.2", "eval.every=0", "eval.at_end=false"]
    run(tmp_path / "full", *extra)
    run(tmp_path / "split", *extra, stop_after_steps=3)
    run(tmp_path / "split", *extra, resume=True)
    assert_same_state(model_state(tmp_path / "full")[0], model_state(tmp_path / "split")[0])
