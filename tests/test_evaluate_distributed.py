"""evaluate(distributed=True) on two gloo processes: each passes its own shard and both get, bit for
bit, the single-process summary and per-query table."""

import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import KS, clustered  # noqa: E402

from hapkit.evaluate import RetrievalMetrics, evaluate  # noqa: E402

WORLD = 2
CHUNK = 16  # the same chunks in one process and in two: bit-for-bit equality


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data():
    emb, labels = clustered(n=91, seed=3)
    g = torch.Generator().manual_seed(4)
    distractors = torch.nn.functional.normalize(torch.randn(13, emb.shape[1], generator=g), dim=1)
    queries = torch.arange(0, 91, 3)  # query/gallery: the gallery holds the queries, each leaves itself out
    exclude = queries.clone()
    exclude[::4] = -1
    return emb, labels, distractors, queries, exclude


def sampler_indices(n, rank):
    """What DistributedSampler(shuffle=False, drop_last=False) gives a process: every world-th
    index, the first ones repeated to even out the shards."""
    padded = list(range(n)) + list(range(-(-n // WORLD) * WORLD - n))
    return torch.tensor(padded[rank::WORLD])


def single_process_cases():
    emb, labels, distractors, queries, exclude = data()
    quiet = dict(ks=KS, chunk_size=CHUNK, progress=False)
    qg = dict(gallery_embeddings=emb, gallery_labels=labels, distractor_embeddings=distractors,
              gallery_exclude=exclude, **quiet)
    return {
        "same-set": evaluate(emb, labels, **quiet),
        "sampler": evaluate(emb, labels, **quiet),
        "query/gallery": evaluate(emb[queries], labels[queries], **qg),
        "top-k": evaluate(emb, labels, metrics=["R@k", "P@1"], **quiet),
        "asi@": evaluate(emb, labels, metrics=["ASI@", "AP"], **quiet),
        "streaming": evaluate(emb, labels, **quiet),
    }


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    warnings.simplefilter("ignore")
    try:
        emb, labels, distractors, queries, exclude = data()
        quiet = dict(ks=KS, chunk_size=CHUNK, progress=False, distributed=True)
        out = {}
        # contiguous shards of unequal sizes
        mine = slice(0, 60) if rank == 0 else slice(60, 91)
        out["same-set"] = evaluate(emb[mine], labels[mine], **quiet)
        # a DistributedSampler's interleaved shards with the repeated padding
        idx = sampler_indices(91, rank)
        out["sampler"] = evaluate(emb[idx], labels[idx], indices=idx, **quiet)
        # query/gallery: interleaved gallery shards, distractors split unevenly, one shard of queries empty
        g_idx = sampler_indices(91, rank)
        q_mine = slice(0, len(queries)) if rank == 0 else slice(0, 0)
        d_mine = slice(0, 4) if rank == 0 else slice(4, 13)
        out["query/gallery"] = evaluate(
            emb[queries][q_mine], labels[queries][q_mine], gallery_embeddings=emb[g_idx], gallery_labels=labels[g_idx],
            gallery_indices=g_idx, distractor_embeddings=distractors[d_mine], gallery_exclude=exclude[q_mine], **quiet,
        )
        out["top-k"] = evaluate(emb[mine], labels[mine], metrics=["R@k", "P@1"], **quiet)
        out["asi@"] = evaluate(emb[mine], labels[mine], metrics=["ASI@", "AP"], **quiet)
        # the torchmetrics form: each process adds its batches, torchmetrics gathers them
        streaming = RetrievalMetrics(ks=KS, chunk_size=CHUNK)
        for start in range(mine.start, mine.stop, 8):
            stop = min(start + 8, mine.stop)
            streaming.update(emb[start:stop], labels[start:stop])
        streaming.compute()
        out["streaming"] = streaming.results
        # without distributed=True a process evaluates alone: process 1 takes no part here
        if rank == 0:
            out["alone"] = evaluate(emb[:30], labels[:30], ks=KS, progress=False)
        dist.barrier()
        # a bad shard on one process is reported by every process, none is left waiting
        bad = emb[mine].clone()
        if rank == 1:
            bad[3, 0] = float("nan")
        try:
            evaluate(bad, labels[mine], **quiet)
            out["error"] = None
        except ValueError as err:
            out["error"] = str(err)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_single_process_results_bit_for_bit(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = single_process_cases()
        emb, labels, *_ = data()
        alone = evaluate(emb[:30], labels[:30], ks=KS, progress=False)
    for got in ranks:
        for case, expected in want.items():
            res = got[case]
            assert res.summary == expected.summary, case
            assert res.per_query.equals(expected.per_query), case
            assert res.skipped == expected.skipped and res.num_queries == expected.num_queries, case
            assert res.settings["processes"] == (1 if case == "streaming" else WORLD), case
        assert "process 1" in got["error"] and "non-finite" in got["error"]
    assert ranks[0]["alone"].per_query.equals(alone.per_query) and ranks[0]["alone"].settings["processes"] == 1


def test_distributed_needs_a_process_group_and_indices_need_distributed():
    emb, labels, *_ = data()
    with pytest.raises(RuntimeError, match="process group"):
        evaluate(emb, labels, distributed=True, progress=False)
    with pytest.raises(ValueError, match="distributed=True"):
        evaluate(emb, labels, indices=torch.arange(91), progress=False)
