"""retrieval-SfM-120k (Radenović et al., TPAMI 2018): landmark training images grouped into 3-D
reconstruction clusters, the training set of ROADMAP's landmark experiments. One level: the
cluster id.

Layout (the files of cnnimageretrieval's ``train/ims`` folder)::

    sfm120k/retrieval-SfM-120k-imagenames-clusterids.mat   # 'cids' (1 x N cell of image names),
                                                            # 'cluster' (1 x N cluster ids)
    sfm120k/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>  # images, named by their cid (no extension)

As in ROADMAP's and SupRank's loaders every image of the file is a training image (the file has
no train / validation split). It is evaluated on ROxford5k and RParis6k (:func:`eval_sets`),
prepared under the same root.
"""

from __future__ import annotations

import numpy as np

from hapkit.data.base import AnnotationError, ImageFileDataset, check_images_exist, locate, reindex_levels, require_file

__all__ = ["load", "eval_sets", "read_cluster_file", "image_path", "CLUSTER_FILE", "SUBDIR"]

NAME, TITLE = "sfm120k", "retrieval-SfM-120k"
SUBDIR = "sfm120k"
CLUSTER_FILE = "retrieval-SfM-120k-imagenames-clusterids.mat"
LEVEL_NAMES = ["cluster"]


def image_path(cid: str) -> str:
    """Relative path of image ``cid`` under the image folder (cnnimageretrieval's ``cid2filename``)."""
    return f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}"


def read_cluster_file(path) -> tuple[list[str], np.ndarray]:
    """(image names, cluster ids) from ``retrieval-SfM-120k-imagenames-clusterids.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError as err:  # scipy comes with scikit-learn, a dependency of hapkit
        raise ImportError("reading the SfM-120k .mat file needs scipy: pip install scipy") from err
    try:
        db = loadmat(str(path))
    except Exception as err:  # scipy reports truncated or foreign files with assorted errors
        raise AnnotationError(path, None, f"not a readable MATLAB file ({err}); download it again") from err
    missing = [k for k in ("cids", "cluster") if k not in db]
    if missing:
        found = sorted(k for k in db if not k.startswith("__"))
        raise AnnotationError(path, None, f"expected the variables 'cids' and 'cluster', missing {missing} (found {found})")
    cells, clusters = np.asarray(db["cids"]).reshape(-1), np.asarray(db["cluster"]).reshape(-1)
    if len(cells) != len(clusters):
        raise AnnotationError(path, None, f"'cids' has {len(cells)} entries but 'cluster' {len(clusters)}")
    cids = []
    for i, cell in enumerate(cells):
        value = np.asarray(cell).reshape(-1)  # a MATLAB cell of one string loads as a 1-element array
        name = str(value[0]) if value.size == 1 else ""
        if len(name) < 6:
            raise AnnotationError(path, None, f"entry {i} of 'cids' is not an image name of 6+ characters: {cell!r}")
        cids.append(name)
    if clusters.dtype.kind not in "iuf" or not np.all(np.isfinite(clusters)) or not np.all(np.mod(clusters, 1) == 0):
        bad = next(i for i, c in enumerate(clusters) if not (np.isfinite(c) and float(c) == int(c)))
        raise AnnotationError(path, None, f"entry {bad} of 'cluster' is not an integer cluster id: {clusters[bad]!r}")
    return cids, clusters.astype(np.int64)


def load(root=None, split: str = "train", transform=None) -> ImageFileDataset:
    """The training images, labelled by cluster (re-indexed 0..n-1)."""
    if split != "train":
        raise ValueError(f"{TITLE}: unknown split {split!r}; it has only 'train' (evaluate on roxford5k / rparis6k)")
    base = locate(root, NAME, TITLE, [CLUSTER_FILE], [SUBDIR])
    where = root if root is not None else base.parent
    cids, clusters = read_cluster_file(require_file(base / CLUSTER_FILE, NAME, TITLE, where))
    labels, names = reindex_levels(clusters[:, None], [None])
    paths = [str(base / "ims" / image_path(c)) for c in cids]
    check_images_exist(paths, NAME, TITLE, where)
    return ImageFileDataset(paths, labels, name=NAME, split=split, level_names=LEVEL_NAMES, class_names=names,
                            transform=transform)


def eval_sets(root=None, transform=None, distractors: bool = False):
    """ROxford5k and RParis6k with their ground truth (ROADMAP's evaluation of SfM-120k)."""
    from hapkit.data.revisited import landmark_benchmarks

    return landmark_benchmarks(root, transform, distractors)
