"""Images for figures: one RGB conversion, one grid tiler, dataset samples, thumbnails."""

import numpy as np
import pytest
import torch
from PIL import Image

from hapkit.viz import images as I


def test_to_rgb_array_accepts_tensors_pil_and_floats():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(I.to_rgb_array(torch.from_numpy(img).permute(2, 0, 1)), img)
    np.testing.assert_array_equal(I.to_rgb_array(Image.fromarray(img)), img)
    np.testing.assert_array_equal(I.to_rgb_array(img.astype(np.float32) / 255.0), img)
    grey = I.to_rgb_array(img[:, :, 0])
    assert grey.shape == (5, 7, 3) and np.array_equal(grey[:, :, 2], img[:, :, 0])


def test_image_grid_pads_like_make_grid_and_fills_the_last_row():
    tiles = [np.full((4, 5, 3), i, np.uint8) for i in range(5)]
    grid = I.image_grid(tiles, ncols=3, pad=2)
    assert grid.shape == (2 * 6 + 2, 3 * 7 + 2, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[2 + r * 6 : 2 + r * 6 + 4, 2 + c * 7 : 2 + c * 7 + 5], tiles[i])
    assert (grid[8:12, 16:21] == 255).all()  # the missing sixth cell is blank
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()
    one = I.image_grid(tiles[:1], ncols=1, pad=1)
    assert one.shape == (6, 7, 3) and (one[1:5, 1:6] == 0).all() and one[0, 0, 0] == 255
    with pytest.raises(ValueError, match="no tile"):
        I.image_grid([], ncols=2)


def test_sample_grid_and_figure(tmp_path):
    from hapkit.data import get_dataset

    ds = get_dataset("generated", root=tmp_path, split="train", images_per_class=4)
    grid = I.sample_grid(ds, per_class=3, classes=[0, 5], column=0, pad=2)
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3) and grid.dtype == np.uint8
    first = grid[2:34, 2:34]
    assert any(np.array_equal(first, ds.images[i]) for i in np.nonzero(ds.labels[:, 0] == 0)[0])
    fig = I.sample_figure(ds, per_class=2, classes=[0, 1], column=2)
    assert list(fig.layout.yaxis.ticktext) == ds.class_names[2][:2]
    with pytest.raises(ValueError, match="no image"):
        I.sample_grid(ds, classes=[10**6])


def test_embedding_images_of_memory_and_file_datasets():
    from hapkit.data import EmbeddingSet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)

    class Files:  # a file dataset: PIL images, one of another size
        def load_image(self, i):
            img = Image.fromarray(images[i])
            return img.resize((8, 8)) if i == 5 else img

    class Memory:
        pass

    mem = Memory()
    mem.images = images
    for dataset in (mem, Files()):
        items = EmbeddingSet(np.zeros((3, 2), np.float32), np.zeros((3, 1), np.int64), np.array([0, 2, 4]), ["x"],
                             dataset=dataset)
        np.testing.assert_array_equal(I.embedding_images(items), images[[0, 2, 4]])
    resized = EmbeddingSet(np.zeros((2, 2), np.float32), np.zeros((2, 1), np.int64), np.array([1, 5]), ["x"],
                           dataset=Files())
    assert I.embedding_images(resized).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="no dataset"):
        I.embedding_images(EmbeddingSet(np.zeros((1, 2)), np.zeros((1, 1)), np.array([0]), ["x"]))
