"""Two processes (gloo, CPU) see the same loss, gradients and updates as one process on the
global batch: sampler sharding, embeddings gathered with gradient, DDP, loss parameters."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_launch import spawn  # noqa: E402
from test_training_engine import TINY, TinySet, eval_sets  # noqa: E402

import hapkit.training.engine as engine  # noqa: E402
from hapkit.training.engine import Callback, NonFiniteError, Trainer  # noqa: E402
from hapkit.training.recipes import load_recipe  # noqa: E402

# frozen batch-norm statistics: per-process BN would see half the batch (SyncBatchNorm is CUDA-only)
OVERRIDES = TINY + ["model.freeze_batchnorm=true", "eval.every=0", "eval.at_end=false", "optim.lr=0.01"]
STEPS = 2


def with_unused_parameter(build):
    """build_model whose backbone holds a layer the forward pass never uses (as a timm head norm
    after avg pooling): DDP must be told to look for parameters without gradient."""
    def build_model(cfg):
        model = build(cfg)
        torch.manual_seed(1)
        model.backbone.spare = torch.nn.Linear(4, 4)
        return model
    return build_model


def fixed_batch():
    data = TinySet(noise=0.0)
    idx = list(range(0, 8)) + list(range(32, 40))  # 2 fine classes from each super-class, 4 images each
    images = torch.stack([data[i][0] for i in idx])
    labels = torch.stack([data[i][1] for i in idx])
    return images, labels


def loss_and_grads(trainer, images, labels):
    trainer._set_warmup(False)
    trainer.model.train()
    loss, _ = trainer.compute_loss(images, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    for n, p in trainer.loss_fn.named_parameters():
        grads["loss." + n] = p.grad.clone()
    return loss.detach(), grads


def worker(rank, world, out_dir, recipe, extra=(), unused=False):
    import torch.distributed as dist

    from hapkit.training.distributed import all_reduce_mean, shutdown_distributed

    if unused:
        engine.build_model = with_unused_parameter(engine.build_model)
    try:
        cfg = load_recipe(recipe, overrides=OVERRIDES + list(extra))
        trainer = Trainer(cfg, out_dir=Path(out_dir) / "run", train_set=TinySet(), eval_sets=eval_sets(),
                          progress=False, stop_after_steps=STEPS)
        assert trainer.dist.world_size == world and trainer.dist.rank == rank
        images, labels = fixed_batch()
        n = images.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        loss, grads = loss_and_grads(trainer, images[sl], labels[sl])
        # what DDP and the engine do to the loss parameters: average over processes
        for g in grads.values():
            dist.all_reduce(g)
            g.div_(world)
        for o in trainer.optimizers.values():
            o.zero_grad(set_to_none=True)
        result = trainer.fit()
        if rank == 0:
            torch.save({"loss": all_reduce_mean(loss), "grads": grads, "model": trainer.model.state_dict(),
                        "steps": result.global_step, "history": result.history,
                        "memory": trainer.memory and trainer.memory.state_dict()},
                       Path(out_dir) / "ddp.pt")
        else:
            all_reduce_mean(loss)
        if trainer.memory is not None:  # every process holds the same memory
            contents = trainer.memory.state_dict()["embedding_memory"]
            same = all_reduce_mean(contents)
            assert torch.equal(same, contents)
    finally:
        shutdown_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("extra, unused", [((), False), (("train.memory.size=32",), False),
                                           # SGD: Adam's first step moves a weight by lr whatever
                                           # its gradient's size, float rounding included
                                           (("loss.kwargs.exclude_self=true", "optim.optimizer=sgd"), True)],
                         ids=["batch", "with-memory", "exclude-self-and-unused-parameter"])
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, monkeypatch, extra, unused,
                                                             recipe="happier_generated"):
    # HAPPIER: a rank loss over the gathered batch plus a clustering loss with its own parameters;
    # with a memory, each process enqueues the gathered batch and ranks its queries against it;
    # with exclude_self, each process's queries leave themselves out of the gathered batch; a
    # parameter that gets no gradient must not stop DDP at the second step
    spawn(worker, str(tmp_path), recipe, extra, unused)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    if unused:
        monkeypatch.setattr(engine, "build_model", with_unused_parameter(engine.build_model))

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        assert key not in os.environ
    cfg = load_recipe(recipe, overrides=OVERRIDES + list(extra))
    single = Trainer(cfg, out_dir=tmp_path / "single", train_set=TinySet(), eval_sets=eval_sets(),
                     progress=False, stop_after_steps=STEPS)
    images, labels = fixed_batch()
    loss, grads = loss_and_grads(single, images, labels)
    for o in single.optimizers.values():
        o.zero_grad(set_to_none=True)

    torch.testing.assert_close(ddp["loss"], loss, rtol=1e-5, atol=1e-6)
    assert ddp["grads"].keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(ddp["grads"][k], grads[k], rtol=1e-4, atol=1e-6, msg=k)

    result = single.fit()
    assert ddp["steps"] == result.global_step == STEPS
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    if single.memory is not None:
        want = single.memory.state_dict()
        assert torch.equal(ddp["memory"]["label_memory"], want["label_memory"])
        torch.testing.assert_close(ddp["memory"]["embedding_memory"], want["embedding_memory"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_with_sub_batches_match_one_process_without(tmp_path, recipe="happier_generated"):
    """Multi-stage backprop under DDP: each process embeds its slice in sub-batches, the loss ranks
    against the gathered global batch, gradients are synchronised once per step."""
    spawn(worker, str(tmp_path), recipe, ("train.sub_batch=2",))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    single = Trainer(load_recipe(recipe, overrides=OVERRIDES), out_dir=tmp_path / "single", train_set=TinySet(),
                     eval_sets=eval_sets(), progress=False, stop_after_steps=STEPS)
    result = single.fit()
    assert ddp["steps"] == result.global_step == STEPS
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_gather_is_the_identity_without_a_process_group():
    from hapkit.training.distributed import all_gather_nograd, all_reduce_mean, gather_with_grad

    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x and all_gather_nograd(x) is x and all_reduce_mean(x) is x


def eval_worker(rank, world, out_dir):
    from hapkit.training.distributed import shutdown_distributed

    try:
        cfg = load_recipe("happier_generated", overrides=OVERRIDES)
        trainer = Trainer(cfg, out_dir=Path(out_dir) / "run", train_set=TinySet(), eval_sets=two_eval_sets(),
                          progress=False)
        torch.save(trainer.evaluate(), Path(out_dir) / f"eval{rank}.pt")
    finally:
        shutdown_distributed()


def two_eval_sets():
    from hapkit.data import EvalSet

    return [EvalSet("same", TinySet(seed=1, noise=0.0, per_class=5)),
            EvalSet("qg", TinySet(seed=2, noise=0.0, per_class=3), TinySet(seed=3, noise=0.0, per_class=7))]


@pytest.mark.slow
def test_every_process_embeds_its_share_and_all_get_the_single_process_metrics(tmp_path):
    spawn(eval_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"eval{r}.pt", weights_only=False) for r in range(2)]
    single = Trainer(load_recipe("happier_generated", overrides=OVERRIDES), out_dir=tmp_path / "single",
                     train_set=TinySet(), eval_sets=two_eval_sets(), progress=False).evaluate()
    assert got[0] == got[1]  # the same on every process
    assert got[0].keys() == single.keys() and "overall/H-AP" in single
    for k, v in single.items():  # shards embedded apart: the same embeddings up to float rounding
        assert got[0][k] == pytest.approx(v, abs=1e-6), k


class StopOnRankZero(Callback):
    """What a SIGTERM reaching one process first does: that process alone asks to stop."""

    def on_step_end(self, trainer):
        if trainer.dist.rank == 0 and trainer.global_step == 1:
            trainer.request_stop()


def stop_worker(rank, world, out_dir):
    out = {}
    cfg = load_recipe("happier_generated", overrides=OVERRIDES)
    trainer = Trainer(cfg, out_dir=Path(out_dir) / "stop", train_set=TinySet(), eval_sets=eval_sets(),
                      progress=False, callbacks=[StopOnRankZero()])
    result = trainer.fit()
    out["stop"] = (result.interrupted, result.global_step, trainer.model.state_dict())

    # a non-finite loss seen by process 1 alone: both processes stop at that step with the error
    trainer = Trainer(cfg, out_dir=Path(out_dir) / "nan", train_set=TinySet(), eval_sets=eval_sets(),
                      progress=False)
    if rank == 1:
        track = trainer._track_finite
        trainer._track_finite = lambda loss, emb: track(loss * float("nan") if trainer.global_step == 1 else loss, emb)
    try:
        trainer.fit()
        out["nan"] = None
    except NonFiniteError as err:
        out["nan"] = (trainer.global_step, str(err))
    torch.save(out, Path(out_dir) / f"stop{rank}.pt")


@pytest.mark.slow
def test_a_stop_or_a_non_finite_value_on_one_process_stops_all_at_the_same_step(tmp_path):
    spawn(stop_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"stop{r}.pt", weights_only=False) for r in range(2)]
    single = Trainer(load_recipe("happier_generated", overrides=OVERRIDES), out_dir=tmp_path / "single",
                     train_set=TinySet(), eval_sets=eval_sets(), progress=False, stop_after_steps=1)
    single.fit()
    for out in got:
        interrupted, step, model = out["stop"]
        assert interrupted and step == 1
        for k, v in single.model.state_dict().items():
            torch.testing.assert_close(model[k], v, rtol=1e-5, atol=1e-5, msg=k)
        step, message = out["nan"]
        assert step == 2 and "the loss became NaN or infinite at step 1" in message
    saved = torch.load(tmp_path / "stop" / "checkpoint.pt", weights_only=False)
    assert saved["global_step"] == 1 and not saved["finished"]


def tiny_query_set():
    """One query image: fewer items than processes."""
    data = TinySet(seed=2, noise=0.0, per_class=1)
    data.images, data.labels = data.images[3:4], data.labels[3:4]
    return data


def bn_worker(rank, world, out_dir):
    from hapkit.data import EvalSet

    cfg = load_recipe("happier_generated", overrides=OVERRIDES + ["model.freeze_batchnorm=false"])
    one = [EvalSet("one", query=tiny_query_set(), gallery=TinySet(seed=3, noise=0.0, per_class=3))]
    trainer = Trainer(cfg, out_dir=Path(out_dir) / "run", train_set=TinySet(), eval_sets=one,
                      progress=False, stop_after_steps=1)
    metrics = trainer.evaluate()
    trainer.fit()
    torch.save((dict(trainer.model.named_buffers()), metrics), Path(out_dir) / f"bn{rank}.pt")


@pytest.mark.slow
def test_batchnorm_statistics_agree_and_a_set_smaller_than_the_processes_is_evaluated(tmp_path):
    """Without SyncBatchNorm (CUDA only) every process keeps the mean of the processes' running
    statistics: after one step the first layer's running mean is the global batch's. An eval set of one
    query leaves one process an empty share, which it contributes without raising."""
    from hapkit.data import EvalSet

    spawn(bn_worker, str(tmp_path))
    (buffers, metrics), (buffers1, metrics1) = [torch.load(tmp_path / f"bn{r}.pt", weights_only=False) for r in range(2)]
    assert buffers.keys() == buffers1.keys()
    for k in buffers:
        assert torch.equal(buffers[k], buffers1[k]), k

    cfg = load_recipe("happier_generated", overrides=OVERRIDES + ["model.freeze_batchnorm=false"])
    one = [EvalSet("one", query=tiny_query_set(), gallery=TinySet(seed=3, noise=0.0, per_class=3))]
    single = Trainer(cfg, out_dir=tmp_path / "single", train_set=TinySet(), eval_sets=one, progress=False,
                     stop_after_steps=1)
    want = single.evaluate()
    assert metrics == metrics1 and metrics.keys() == want.keys() and "one/H-AP" in want
    for k, v in want.items():
        assert metrics[k] == pytest.approx(v, abs=1e-6), k
    single.fit()
    # the first batch-norm layer sees the same inputs in both runs, and with equal slices the mean
    # of the slices' means is the batch mean (deeper layers see inputs normalised per slice)
    k = "backbone.features.1.running_mean"
    torch.testing.assert_close(buffers[k], single.model.state_dict()[k], rtol=1e-5, atol=1e-6)
