"""Evaluation protocols as the official code runs them, through the engine's evaluate_model.

DyML-Vehicle / Animal: three query / gallery benchmarks whose galleries hold the query images;
hapkit removes each query's own copy (found by file name), the reference code drops each query's
first neighbour: with no tied scores the two agree. Per benchmark mAP, R@10, R@20 and binary ASI;
the published "average mAP" is the mean of the three benchmarks' mAP (``overall/AP@0``).
DyML-Product: one 3-level set in the same-set protocol, its average mAP the mean of AP over the
levels (``overall/AP``).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from hapkit.data import get_eval_sets
from hapkit.data.transforms import build_transforms
from hapkit.training.engine import column_means, evaluate_model

from test_data_dyml import TRAIN, write_csv, write_images


class PixelNet(torch.nn.Module):
    """Embeds an image as its normalised pixels: equal images, equal embeddings."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.nn.functional.normalize(x.flatten(1) + 0 * self.dummy, dim=1)


def write_benchmarks(root, n_gallery=14, n_query=5, seed=0):
    """DyML-Vehicle benchmarks in the distributed format: every query image also in the gallery."""
    rng = np.random.default_rng(seed)
    base = root / "dyml_vehicle"
    write_csv(base / "train" / "label.csv", "fname, coarse_id, middle_id, fine_id", TRAIN)
    write_images(base / "train" / "imgs", [r[0] for r in TRAIN])
    for g in ("fine", "middle", "coarse"):
        names = [f"{g}_{i}.jpg" for i in range(n_gallery)]
        labels = rng.integers(0, 3, size=n_gallery)
        for folder in ("gallery", "query"):
            (base / f"bmk_{g}" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            pixels = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / f"bmk_{g}" / "gallery" / name)
        picked = rng.choice(n_gallery, size=n_query, replace=False)
        for i in picked:  # the query's file is the gallery's, byte for byte
            (base / f"bmk_{g}" / "query" / names[i]).write_bytes((base / f"bmk_{g}" / "gallery" / names[i]).read_bytes())
        write_csv(base / f"bmk_{g}" / "gallery.csv", "fname, labels", list(zip(names, labels.tolist())))
        write_csv(base / f"bmk_{g}" / "query.csv", "fname, labels", [(names[i], int(labels[i])) for i in picked])
    return base


def first_neighbour_dropped(q, g, q_lab, g_lab, ks):
    """The reference code's protocol, by loops: rank the whole gallery, drop rank 1."""
    out = {"AP": [], "ASI": [], **{f"R@{k}": [] for k in ks}}
    for i in range(len(q)):
        order = np.argsort(-(g @ q[i]), kind="stable")[1:]
        rel = (g_lab[order] == q_lab[i]).astype(float)
        if rel.sum() == 0:
            continue
        hits = np.cumsum(rel)
        ranks = np.arange(1, len(rel) + 1)
        out["AP"].append(float((hits / ranks * rel).sum() / rel.sum()))
        n = int(rel.sum())
        out["ASI"].append(float(np.mean(hits[:n] / ranks[:n])))  # binary ASI: positives in the top n, n <= |P|
        for k in ks:
            out[f"R@{k}"].append(float(rel[:k].any()))
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_dyml_benchmarks_leave_each_query_copy_out_as_the_reference_does(tmp_path):
    write_benchmarks(tmp_path)
    transform = build_transforms("imagenet", train=False, resize=None, crop=None)
    sets = get_eval_sets("dyml_vehicle", root=tmp_path, transform=transform)
    assert all(s.gallery_contains_queries for s in sets)
    own = sets[0].gallery_exclude()
    assert (own >= 0).all() and [sets[0].gallery.paths[j].split("/")[-1] for j in own] == \
        [p.split("/")[-1] for p in sets[0].query.paths]
    out = evaluate_model(PixelNet(), sets, batch_size=4, metrics=["AP", "R@k", "ASI@"], ks=(10, 20), columns=[0],
                         overall=True, progress=False)
    per_set = []
    for es in sets:
        embed = lambda ds: torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)  # noqa: E731
        q = torch.nn.functional.normalize(embed(es.query), dim=1).numpy()
        g = torch.nn.functional.normalize(embed(es.gallery), dim=1).numpy()
        scores = g @ q.T
        assert np.array_equal(np.argmax(scores, axis=0), es.gallery_exclude())  # each copy ranks first
        ref = first_neighbour_dropped(q, g, es.query.labels[:, 0], es.gallery.labels[:, 0], (10, 20))
        assert out[f"{es.name}/AP@0"] == pytest.approx(ref["AP"], abs=1e-12)
        assert out[f"{es.name}/ASI@0"] == pytest.approx(ref["ASI"], abs=1e-12)
        for k in (10, 20):
            assert out[f"{es.name}/R@{k}@0"] == pytest.approx(ref[f"R@{k}"], abs=1e-12)
        per_set.append(ref["AP"])
    assert out["overall/AP@0"] == pytest.approx(np.mean(per_set), abs=1e-12)  # the published "average mAP"


def test_one_multi_level_set_averages_its_binary_metrics_over_the_levels():
    summary = {"AP@0": 0.2, "AP@1": 0.4, "AP@2": 0.9, "R@10@0": 1.0, "R@10@1": 0.5, "H-AP": 0.7, "AP#2": 0.3}
    assert column_means(summary) == pytest.approx({"AP": 0.5, "R@10": 0.75})
    rng = np.random.default_rng(1)

    class Set:
        name, gallery = "test", None
        label_column = None

        def __init__(self):
            fine = np.repeat(np.arange(8), 4)
            self.labels = np.stack([fine, fine // 2, fine // 4], 1)
            self.x = torch.from_numpy(rng.normal(size=(32, 5)).astype(np.float32))

        @property
        def query(self):
            return torch.utils.data.TensorDataset(self.x, torch.from_numpy(self.labels))

    out = evaluate_model(torch.nn.Identity(), [Set()], batch_size=8, metrics=["AP"], overall=True, progress=False)
    assert out["overall/AP"] == pytest.approx(np.mean([out[f"test/AP@{c}"] for c in range(3)]))
