"""The engine's cross-batch memory (train.memory): what enters it, how its loss joins the batch
loss, and a resumed run with a memory equal bit for bit to an uninterrupted one."""

import pytest
import torch

from hapkit.training.config import ConfigError
from hapkit.training.engine import Trainer
from test_training_engine import TinySet, assert_same_state, eval_sets, model_state, run, strip_timing, tiny_cfg

MEMORY = ["train.memory.size=40", "eval.every=0", "eval.at_end=false"]


def trainer(tmp_path, *overrides, recipe="roadmap_generated"):
    cfg = tiny_cfg(*MEMORY, *overrides, recipe=recipe)
    return Trainer(cfg, out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(), progress=False)


def batches(n=3, size=16):
    data = TinySet(noise=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        idx = torch.randperm(len(data), generator=g)[:size].tolist()
        yield torch.stack([data[i][0] for i in idx]), torch.stack([data[i][1] for i in idx])


@pytest.mark.parametrize("combine, weight", [("add", 1.0), ("average", 0.5)])
def test_the_step_loss_is_the_batch_loss_combined_with_the_loss_against_the_memory(tmp_path, combine, weight):
    t = trainer(tmp_path, f"train.memory.combine={combine}", f"train.memory.weight={weight}")
    t.model.eval()  # the same embeddings for the loss of the engine and the one written here
    seen_emb, seen_labels = [], []
    for images, labels in batches():
        loss, emb = t.compute_loss(images, labels)
        seen_emb.append(emb.detach())
        seen_labels.append(labels)
        # the straightforward memory: every batch so far (the current one included), 40 at most
        ref_emb, ref_labels = torch.cat(seen_emb)[-40:], torch.cat(seen_labels)[-40:]
        batch = t.loss_fn(emb, labels)
        against_memory = t.loss_fn(emb, labels, ref_emb=ref_emb, ref_labels=ref_labels)
        expected = batch + weight * against_memory
        if combine == "average":
            expected = expected / (1 + weight)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    stored_emb, stored_labels = t.memory.bank.contents()
    assert stored_labels.shape == (40, 2) and not stored_emb.requires_grad


def test_before_activation_the_memory_fills_but_the_loss_is_the_batch_loss(tmp_path):
    t = trainer(tmp_path, "train.memory.activate_after=1")
    t.model.eval()
    for images, labels in batches(2):
        loss, emb = t.compute_loss(images, labels)
        assert torch.equal(loss, t.loss_fn(emb, labels))
    assert t.memory.bank.num_stored == 32
    t.epoch = 1  # the second epoch: active
    images, labels = next(batches(1))
    loss, emb = t.compute_loss(images, labels)
    assert not torch.equal(loss, t.loss_fn(emb, labels))


def test_a_memory_needs_a_rank_loss_and_room_for_a_batch(tmp_path):
    with pytest.raises(ConfigError, match="proxies"):
        trainer(tmp_path, recipe="hpl_generated")
    with pytest.raises(ConfigError, match="at least one global batch"):
        trainer(tmp_path, "train.memory.size=8")
    assert Trainer(tiny_cfg(), out_dir=tmp_path, train_set=TinySet(), eval_sets=eval_sets(),
                   progress=False).memory is None


@pytest.mark.parametrize("stop_at", [3, 2])  # mid-epoch, and exactly at an epoch boundary
def test_a_resumed_run_with_a_memory_equals_the_uninterrupted_run_bit_for_bit(tmp_path, stop_at):
    full = run(tmp_path / "full", *MEMORY, recipe="roadmap_generated")
    first = run(tmp_path / "split", *MEMORY, recipe="roadmap_generated", stop_after_steps=stop_at)
    assert first.interrupted
    second = run(tmp_path / "split", *MEMORY, recipe="roadmap_generated", resume=True)
    a, _, state_a = model_state(tmp_path / "full")
    b, _, state_b = model_state(tmp_path / "split")
    assert_same_state(a, b)
    memory_a, memory_b = state_a["memory"], state_b["memory"]
    assert (memory_a["queue_idx"], memory_a["has_been_filled"]) == (memory_b["queue_idx"], memory_b["has_been_filled"])
    assert_same_state({k: memory_a[k] for k in ("embedding_memory", "label_memory")},
                      {k: memory_b[k] for k in ("embedding_memory", "label_memory")})
    assert strip_timing(full.history).equals(strip_timing(second.history))
    # the memory made a difference: the same run without one ends elsewhere
    plain = run(tmp_path / "plain", "eval.every=0", "eval.at_end=false", recipe="roadmap_generated")
    assert not torch.equal(model_state(tmp_path / "plain")[0]["head.weight"], a["head.weight"])
    assert not plain.interrupted
