"""Figures of an embedding space: UMAP projections, scatter plots by level, image mosaics."""

import warnings

import numpy as np
import pandas as pd
import pytest

from hapkit.viz import embedding as E


def blobs(n_per=30, k=3, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 5
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.slow
def test_umap_projection_is_deterministic_and_keeps_clusters():
    x, labels = blobs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no n_jobs / random_state warning
        a = E.umap_projection(x, n_epochs=60, random_state=3)
    b = E.umap_projection(x, n_epochs=60, random_state=3)
    assert a.shape == (90, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # nearest neighbour in 2-D (brute force) is in the same cluster
    d = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (labels[d.argmin(1)] == labels).mean() > 0.95


def test_umap_projection_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        E.umap_projection(np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        E.umap_projection(np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match="at least 4"):
        E.umap_projection(np.zeros((3, 3)))


def test_projection_frame_and_figure():
    labels = np.array([[0, 0], [1, 0], [2, 1], [3, 1]])
    names = [["a", "b", "c", "d"], ["X", "Y"]]
    coords = np.arange(8.0).reshape(4, 2)
    frame = E.projection_frame(coords, labels=labels, level_names=["fine", "coarse"], class_names=names)
    assert frame.columns.tolist() == ["x", "y", "item", "fine", "coarse"]
    assert frame["coarse"].tolist() == ["X", "X", "Y", "Y"] and frame["item"].tolist() == [0, 1, 2, 3]
    fig = E.embedding_figure(frame, color="coarse")
    assert [t.name for t in fig.data] == ["X", "Y"] and [len(t.x) for t in fig.data] == [2, 2]
    assert "fine" in fig.data[0].hovertemplate and "coarse" in fig.data[0].hovertemplate
    assert fig.layout.showlegend
    both = pd.concat([frame.assign(model="trained"), frame.assign(model="initial")], ignore_index=True)
    fig = E.embedding_figure(both, color="fine", facet="model", legend_max=3)
    assert not fig.layout.showlegend  # 4 classes > legend_max
    assert {a.text for a in fig.layout.annotations} == {"trained", "initial"}
    assert fig.layout.xaxis2.matches is None  # each model keeps its own axes
    with pytest.raises(ValueError, match="no column 'shape'"):
        E.embedding_figure(frame, color="shape")
    with pytest.raises(ValueError, match="4 projected points but 3"):
        E.projection_frame(coords, labels=labels[:3])


def test_projection_mosaic_picks_the_point_nearest_each_cell_centre():
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 1, size=(60, 2))
    coords[0], coords[1] = (0, 0), (1, 1)  # span exactly [0, 1]^2
    images = rng.integers(0, 256, size=(60, 4, 5, 3), dtype=np.uint8)
    grid, pad = 4, 1
    out = E.projection_mosaic(coords, images, grid=grid, pad=pad)
    assert out.shape == (grid * 5 + 1, grid * 6 + 1, 3)
    for gx in range(grid):
        for gy in range(grid):
            inside = [i for i in range(60)
                      if min(int(coords[i, 0] * grid), grid - 1) == gx and min(int(coords[i, 1] * grid), grid - 1) == gy]
            row = grid - 1 - gy
            tile = out[pad + row * 5 : pad + row * 5 + 4, pad + gx * 6 : pad + gx * 6 + 5]
            if not inside:
                assert (tile == 255).all()
                continue
            centre = np.array([(gx + 0.5) / grid, (gy + 0.5) / grid])
            best = min(inside, key=lambda i: (((coords[i] - centre) ** 2).sum(), i))
            np.testing.assert_array_equal(tile, images[best])
    fig = E.mosaic_figure(coords, images, grid=grid)
    assert fig.data[0].source.startswith("data:image/png;base64,")
    with pytest.raises(ValueError, match="uint8"):
        E.projection_mosaic(coords, images.astype(np.float32))


def test_organisation_and_failure_figures_have_one_bar_group_per_model():
    from hapkit.results import failure_table, organisation_table
    from hapkit.viz.embedding import failure_figure, organisation_figure

    metrics = {name: {"kNN@4@0": a, "kNN@4@1": b, "AP@0": a, "AP@1": b, "top1 wrong": 0.3,
                      "top1 wrong#0": 0.1, "top1 wrong#1": 0.2} for name, a, b in (("A", 0.5, 0.7), ("B", 0.4, 0.6))}
    fig = organisation_figure(organisation_table(metrics, ["fine", "coarse"], 4))
    assert [t.name for t in fig.data] == ["A", "B"] and list(fig.data[0].x) == ["fine", "coarse"]
    assert list(fig.data[1].y) == pytest.approx([40.0, 60.0])
    fig = failure_figure(failure_table(metrics, ["fine", "coarse"]))
    assert len(fig.data[0].x) == 2  # the total row is not a severity
    with pytest.raises(ValueError, match="no kNN@k column"):
        organisation_figure(pd.DataFrame({"x": [1]}))
