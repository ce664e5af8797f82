"""Landmark evaluation and the learned whitening with several processes (torchrun, gloo on CPU):
each process embeds its share of the images, and every process ends with what one process
computes from the whole set."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_launch import spawn  # noqa: E402
from landmark_fixtures import write_landmark_root  # noqa: E402
from test_data_revisited import write_distractors  # noqa: E402

from hapkit.data import build_transforms, get_eval_sets  # noqa: E402
from hapkit.training.config import ModelConfig  # noqa: E402
from hapkit.training.distributed import contiguous_share, gather_shares  # noqa: E402
from hapkit.training.engine import Trainer, evaluate_model  # noqa: E402
from hapkit.training.models import build_model  # noqa: E402
from hapkit.training.recipes import load_recipe  # noqa: E402

SCALES = (1.0, 0.5)
WORLD = 2
CPU = [  # the listwise AP recipe with a network and images small enough for a CPU test
    "model.backbone=small_cnn", "model.width=4", "model.pretrained=false", "model.embedding_size=8",
    "data.batch_size=8", "data.samples_per_class=4", "data.num_workers=0", "data.train_transform.crop=16",
    "data.test_transform.resize=24", "data.eval_batch_size=3", "train.epochs=1", "train.device=cpu",
    "train.amp=none", "eval.every=0", "eval.scales=[1.0,0.5]", "train.whitening.dim=4",
]


def counting_model():
    """The same network in every process, which records the rows of every batch it embeds."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="small_cnn", pretrained=False, width=4, pooling="gem", layer_norm=False,
                                  embedding_size=8)).eval()
    return net, count_rows(net)


def count_rows(net):
    rows = []
    net.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows


def benchmarks(root):
    transform = build_transforms("imagenet", train=False, resize=24, crop=None)
    (full,) = get_eval_sets("roxford5k", root=root, transform=transform, distractors=True)
    # one distractor for two processes: one share is empty
    one = dataclasses.replace(full, name="one", distractors=torch.utils.data.Subset(full.distractors, [0]))
    return [full, one]


def evaluate(sets, distributed):
    net, rows = counting_model()
    metrics = evaluate_model(net, sets, batch_size=2, progress=False, ks=(1, 5), scales=SCALES, scale_power=3.0,
                             query_expansion=(2, 3.0), distributed=distributed)
    return metrics, sum(rows)


def recipe(root):
    return load_recipe("listwise_ap_sfm120k", overrides=[*CPU, f"data.root={root}"])


def whiten(root, out_dir):
    trainer = Trainer(recipe(root), out_dir=out_dir, progress=False)
    rows = count_rows(trainer.model)
    trainer.learn_whitening()
    return {k: v.clone() for k, v in trainer.model.whitening.state_dict().items()}, sum(rows)


def worker(rank, world, root, out_dir):
    metrics, rows = evaluate(benchmarks(Path(root)), distributed=True)
    whitening, whitening_rows = whiten(root, Path(out_dir) / "run")
    torch.save({"metrics": metrics, "rows": rows, "whitening": whitening, "whitening_rows": whitening_rows},
               Path(out_dir) / f"landmarks{rank}.pt")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = write_landmark_root(tmp_path_factory.mktemp("landmarks"))
    write_distractors(root)
    return root


def shares(n):
    return [n * (r + 1) // WORLD - n * r // WORLD for r in range(WORLD)]


@pytest.mark.slow
def test_every_process_embeds_its_share_and_ends_with_the_single_process_results(root, tmp_path):
    spawn(worker, str(root), str(tmp_path), world=WORLD)
    got = [torch.load(tmp_path / f"landmarks{r}.pt", weights_only=False) for r in range(WORLD)]

    sets = benchmarks(root)
    single, single_rows = evaluate(sets, distributed=False)
    assert got[0]["metrics"] == got[1]["metrics"]  # the same on every process
    assert got[0]["metrics"].keys() == single.keys() and "one/mAP@medium" in single
    for k, v in single.items():  # shares embedded apart: the same embeddings up to float rounding
        assert got[0]["metrics"][k] == pytest.approx(v, abs=1e-6), k
    # each process embedded its share of the queries, gallery and distractors, at every scale; the
    # empty distractor share embeds one stand-in image
    sizes = [len(part) for s in sets for part in (s.query, s.gallery, s.distractors)]
    want = [len(SCALES) * sum(max(1, shares(n)[r]) for n in sizes) for r in range(WORLD)]
    assert [g["rows"] for g in got] == want and sum(want) < 2 * single_rows

    whitening, whitening_rows = whiten(root, tmp_path / "single")
    for g in got:
        assert g["whitening"].keys() == whitening.keys()
        for k, v in whitening.items():
            # the projection divides by the fourth root of small variances, which magnifies the
            # float rounding of images embedded in other batches: agreement relative to its scale
            scale = float(v.float().abs().max())
            torch.testing.assert_close(g["whitening"][k], v, rtol=0, atol=1e-6 + 1e-5 * scale, msg=k)
    assert [g["whitening_rows"] for g in got] == [whitening_rows // WORLD] * WORLD


def test_shares_concatenate_to_the_set_and_an_empty_share_stands_in_one_item():
    data = list(range(5))
    parts = [contiguous_share(data, r, 3) for r in range(3)]
    assert [list(p) for p, _ in parts] == [[0], [1, 2], [3, 4]] and not any(empty for _, empty in parts)
    assert contiguous_share(data, 0, 1) == (data, False)
    part, empty = contiguous_share([7], 0, 2)
    assert empty and list(part) == [7]
    part, empty = contiguous_share([7], 1, 2)
    assert not empty and list(part) == [7]
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(gather_shares(rows), rows)  # no process group: the rows themselves

