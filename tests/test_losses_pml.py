"""hapkit's losses are pytorch-metric-learning losses: PML's call shape, its DistributedLossWrapper
(two gloo processes against one process on the global batch) and the cross-batch memory."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import distributed as pml_distributed
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

sys.path.insert(0, str(Path(__file__).parent))
from test_losses_common import B, D, LOSSES, batch, build, names  # noqa: E402

import hapkit.losses as losses  # noqa: E402
from hapkit.losses import CrossBatchMemory  # noqa: E402

RANK_LOSSES = names(lambda ref, pos, ddp: ref)
WORLD = 2


@pytest.mark.parametrize("name", names())
def test_every_loss_is_a_pml_loss_called_in_pmls_order(name):
    loss = build(name)
    assert isinstance(loss, BaseMetricLossFunction)
    emb, labels = batch(seed=2)
    plain = loss(emb, labels)
    # PML's wrappers call loss(embeddings, labels, indices_tuple, ref_emb, ref_labels) positionally
    assert torch.equal(loss(emb, labels, None), plain)
    mined = lmu.get_all_pairs_indices(labels[:, 0])
    assert torch.equal(loss(emb, labels, mined), plain)  # indices_tuple: accepted, ignored
    if LOSSES[name][1]:
        ref = (emb[:10], labels[:10])
        assert torch.equal(loss(emb, labels, None, *ref), loss(emb, labels, ref_emb=ref[0], ref_labels=ref[1]))


@pytest.mark.parametrize("name", ["HAPLoss", "SupAP", "CSLLoss"])
def test_the_former_order_with_a_reference_set_in_third_place_is_refused(name):
    loss = build(name)
    emb, labels = batch()
    with pytest.raises(ValueError, match=r"indices_tuple must be None.*ref_emb=\.\.\."):
        loss(emb, labels, emb, labels)
    with pytest.raises(ValueError, match="labels are required"):
        loss(emb)


def test_pmls_wrapper_outside_a_process_group_returns_the_loss():
    loss = losses.HAPLoss()
    emb, labels = batch()
    with pytest.warns(UserWarning, match="non-distributed"):
        value = pml_distributed.DistributedLossWrapper(loss)(emb, labels)
    assert torch.equal(value, loss(emb, labels))


# ---------------------------------------------------------------------------------------------
# The cross-batch memory


def memory_batches(n, size=8, seed=10):
    """``n`` small batches of (embeddings, 2-level labels) with positives across batches."""
    out = []
    for i in range(n):
        emb, labels = batch(seed=seed + i)
        out.append((emb[:size], labels[:size]))
    return out


@pytest.mark.parametrize("name", RANK_LOSSES)
def test_memory_equals_the_loss_against_the_last_embeddings(name):
    loss = build(name)
    memory = CrossBatchMemory(loss, D, memory_size=20)
    kept_emb, kept_labels = [], []
    for emb, labels in memory_batches(4):
        x = emb.clone().requires_grad_(True)
        value = memory(x, labels)
        # the straightforward memory: a FIFO of the last 20 items, the current batch included
        kept_emb, kept_labels = (kept_emb + list(emb))[-20:], (kept_labels + list(labels))[-20:]
        ref_emb, ref_labels = torch.stack(kept_emb), torch.stack(kept_labels)
        xr = emb.clone().requires_grad_(True)
        expected = loss(xr, labels, ref_emb=ref_emb, ref_labels=ref_labels)
        assert value.item() == pytest.approx(expected.item(), abs=1e-6)
        (g,), (gr,) = torch.autograd.grad(value, x), torch.autograd.grad(expected, xr)
        torch.testing.assert_close(g, gr, atol=1e-6, rtol=1e-5)  # gradient through the queries only
    stored_emb, stored_labels = memory.contents()
    assert stored_labels.shape == (20, 2) and not stored_emb.requires_grad
    assert sorted(map(tuple, stored_labels.tolist())) == sorted(map(tuple, ref_labels.tolist()))


def test_memory_enqueue_mask_and_state_round_trip():
    loss = losses.SupAP()
    memory = CrossBatchMemory(loss, D, memory_size=12)
    (e1, l1), (e2, l2) = memory_batches(2)
    mask = torch.arange(8) < 5
    value = memory(e1, l1, enqueue_mask=mask)  # 5 enqueued, the 3 others are the queries
    assert memory.num_stored == 5
    assert value.item() == pytest.approx(loss(e1[~mask], l1[~mask], ref_emb=e1[mask], ref_labels=l1[mask]).item())
    memory(e2, l2)
    assert memory.has_been_filled and memory.num_stored == 12

    other = CrossBatchMemory(losses.SupAP(), D, memory_size=12)
    other.load_state_dict(memory.state_dict())  # the write position travels in the state
    assert (other.queue_idx, other.has_been_filled) == (memory.queue_idx, memory.has_been_filled)
    third = CrossBatchMemory(losses.SupAP(), D, memory_size=12)
    third.load_memory_state_dict(memory.memory_state_dict())
    e3, l3 = memory_batches(1, seed=30)[0]
    values = [m(e3, l3) for m in (memory, other, third)]  # the same next step from the same state
    assert torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])
    for m in (other, third):
        assert torch.equal(m.contents()[0], memory.contents()[0]) and torch.equal(m.contents()[1], memory.contents()[1])


def test_memory_refuses_what_it_cannot_serve():
    with pytest.raises(TypeError, match="proxies"):
        CrossBatchMemory(build("CSLLoss"), D)
    with pytest.raises(ValueError, match="miner"):
        CrossBatchMemory(losses.SupAP(), D, miner=object())
    memory = CrossBatchMemory(losses.SupAP(), D, memory_size=4)
    emb, labels = batch()
    with pytest.raises(ValueError, match="does not fit"):
        memory(emb, labels)
    memory(emb[:4], labels[:4])
    with pytest.raises(ValueError, match="level"):
        memory(emb[:4], labels[:4, :1])
    with pytest.raises(ValueError, match=rf"\(B, {D}\)"):
        memory(emb[:4, :3], labels[:4])


# ---------------------------------------------------------------------------------------------
# Two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(rank, size=B):
    n = size // WORLD
    return slice(rank * n, (rank + 1) * n)


def rows(embeddings, labels):
    """The (label, embedding) rows as a sorted list: a memory's contents whatever its slot order."""
    return sorted(zip(map(tuple, labels.tolist()), map(tuple, embeddings.tolist())))


def pml_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb, labels = batch(seed=1)
        mine = shard(rank)
        out = {}
        for name in names():
            for efficient in (False, True) if LOSSES[name][1] else (False,):
                wrapper_cls = losses.DistributedLossWrapper if efficient else pml_distributed.DistributedLossWrapper
                x = emb[mine].clone().requires_grad_(True)
                value = wrapper_cls(build(name), efficient=efficient)(x, labels[mine])
                value.backward()
                out[name, efficient] = (value.detach(), x.grad)
        memory = CrossBatchMemory(losses.SupAP(), D, memory_size=B)
        wrapped = pml_distributed.DistributedLossWrapper(memory)
        out["memory"] = [wrapped(e[shard(rank, B // 2)], l[shard(rank, B // 2)]).detach()
                         for e, l in memory_batches(3, size=B // 2)]
        out["memory_contents"] = memory.contents()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_pmls_distributed_wrapper_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    mp.spawn(pml_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    emb, labels = batch(seed=1)
    for name in names():
        x = emb.clone().requires_grad_(True)
        whole = build(name)(x, labels)
        (grad,) = torch.autograd.grad(whole, x)
        for r, got in enumerate(ranks):
            # default mode: every process computes the global loss; PML multiplies by the world size
            value, g = got[name, False]
            assert value.item() / WORLD == pytest.approx(whole.item(), abs=1e-6), name
            torch.testing.assert_close(g / WORLD, grad[shard(r)], atol=1e-6, rtol=1e-5, msg=name)
        if LOSSES[name][1] and LOSSES[name][3]:
            # efficient mode: each process's queries against the global batch; their mean is the loss
            mean = sum(got[name, True][0].item() for got in ranks) / WORLD / WORLD
            assert mean == pytest.approx(whole.item(), abs=1e-6), name

    # the memory holds the gathered global batch on every process, as one process would (PML puts
    # each process's own rows first, so the slots differ in order, not in content, as long as the
    # memory holds whole global batches)
    memory = CrossBatchMemory(losses.SupAP(), D, memory_size=B)
    expected = [memory(e, l) for e, l in memory_batches(3, size=B // 2)]
    for got in ranks:
        assert [v.item() / WORLD for v in got["memory"]] == pytest.approx([v.item() for v in expected], abs=1e-6)
        assert rows(*got["memory_contents"]) == rows(*memory.contents())


def test_hapkits_efficient_wrapper_tells_the_loss_where_its_queries_are(monkeypatch):
    # one process standing for rank 0 of two: PML's gather returns this process's rows first,
    # then the other process's rows; with exclude_self the queries must be found in that batch
    emb, labels = batch(seed=3)
    half = B // 2
    other_emb, other_labels = emb[half:], labels[half:]

    def gather_emb_and_ref(e, lab, ref_emb=None, ref_labels=None):
        refs = (None, None) if ref_emb is None else (torch.cat([ref_emb, other_emb]), torch.cat([ref_labels, other_labels]))
        return torch.cat([e, other_emb]), torch.cat([lab, other_labels]), *refs, lab

    monkeypatch.setattr(pml_distributed, "gather_emb_and_ref", gather_emb_and_ref)
    loss = losses.HAPLoss(exclude_self=True)
    wrapper = losses.DistributedLossWrapper(loss, efficient=True)
    mine = emb[:half], labels[:half]
    got = wrapper.forward_regular_loss(*mine, None, None, None, WORLD)
    expected = loss(*mine, ref_emb=emb, ref_labels=labels, query_offset=0) * WORLD
    assert got.item() == pytest.approx(expected.item(), abs=1e-7)
    # the query kept in its own ranking would give another value: the check can fail
    assert loss(*mine, ref_emb=emb, ref_labels=labels).item() * WORLD != pytest.approx(got.item(), abs=1e-4)
    # a caller's own reference set does not hold the queries: no offset is passed
    ref = emb[:4], labels[:4]
    got_ref = wrapper.forward_regular_loss(*mine, None, *ref, WORLD)
    expected_ref = loss(*mine, ref_emb=torch.cat([ref[0], other_emb]), ref_labels=torch.cat([ref[1], other_labels]))
    assert got_ref.item() == pytest.approx(expected_ref.item() * WORLD, abs=1e-7)
