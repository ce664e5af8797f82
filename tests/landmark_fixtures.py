"""Tiny landmark data in the real formats, for tests that train and evaluate landmark recipes: a
root holding SfM-120k (.mat cluster file + ims/), GLDv2 (train_clean.csv + the hierarchy csv +
train/) and the revisited ROxford5k / RParis6k benchmarks (gnd pickle + jpg/), written by the
loaders' own fixture writers."""

import numpy as np

from test_data_gldv2 import HIER, write_gldv2
from test_data_revisited import write_city
from test_data_sfm120k import write_sfm

SFM_CLUSTERS = [101, 102, 103, 104]  # 4 clusters of 4 images: two 8-image batches of 2 x 4
GLD_LANDMARKS = [7, 12, 30, 99]  # landmarks of test_data_gldv2.HIER with a hierarchical label
IMAGES_PER_CLASS = 4


def _hex_ids(seed: int, n: int, length: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("0123456789abcdef"), length)) for _ in range(n)]


def write_landmark_root(root, size=(24, 24)):
    """Write every landmark fixture under ``root`` (images of ``size`` pixels) and return it."""
    n = len(SFM_CLUSTERS) * IMAGES_PER_CLASS
    write_sfm(root, cids=_hex_ids(0, n, 32), clusters=np.repeat(SFM_CLUSTERS, IMAGES_PER_CLASS).tolist(), size=size)
    ids = _hex_ids(1, len(GLD_LANDMARKS) * IMAGES_PER_CLASS, 16)
    clean = {lm: ids[i * IMAGES_PER_CLASS:(i + 1) * IMAGES_PER_CLASS] for i, lm in enumerate(GLD_LANDMARKS)}
    write_gldv2(root, hier=HIER, clean=clean, size=size)
    write_city(root, "roxford5k")
    write_city(root, "rparis6k")
    return root
