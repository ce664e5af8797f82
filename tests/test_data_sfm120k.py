"""retrieval-SfM-120k loader on a tiny fixture in the real format: a MATLAB .mat file with a 1 x N
cell array 'cids' and a 1 x N 'cluster' vector, images under ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>."""

import numpy as np
import pytest
import scipy.io
from PIL import Image

from hapkit.data import AnnotationError, DatasetNotFoundError, get_dataset, get_eval_sets
from hapkit.data.sfm120k import CLUSTER_FILE, image_path
from test_data_revisited import write_city

CIDS = ["0a1b2c3d4e5f60718293a4b5c6d7e8f9", "ffeeddccbbaa00998877665544332211", "00112233445566778899aabbccddeeff",
        "aabbccddeeff00112233445566778899"]
CLUSTERS = [713, 12, 713, 5]


def write_sfm(root, cids=CIDS, clusters=CLUSTERS, skip=None, size=(6, 8)):
    base = root / "sfm120k"
    base.mkdir(parents=True, exist_ok=True)
    cells = np.empty((1, len(cids)), dtype=object)  # saved as a MATLAB cell array of strings
    cells[0, :] = cids
    scipy.io.savemat(base / CLUSTER_FILE, {"cids": cells, "cluster": np.asarray([clusters], dtype=np.float64)})
    for k, cid in enumerate(cids):
        if cid == skip:
            continue
        path = base / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid  # no extension, as distributed
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((*size, 3), (30 * k) % 256, np.uint8)).save(path, format="JPEG")
    return base


def test_cluster_ids_are_the_labels(tmp_path):
    base = write_sfm(tmp_path)
    raw = scipy.io.loadmat(base / CLUSTER_FILE)
    assert raw["cids"].shape == (1, 4) and raw["cids"][0][0].shape == (1,)  # the official nesting
    ds = get_dataset("sfm120k", root=tmp_path)
    assert ds.level_names == ["cluster"] and ds.split == "train"
    assert ds.labels[:, 0].tolist() == [2, 1, 2, 0]  # clusters 713, 12, 713, 5 re-indexed
    assert ds.class_names == [["5", "12", "713"]]
    assert ds.paths[0] == str(base / "ims" / "f9" / "e8" / "d7" / CIDS[0])
    assert image_path("abcdef123456") == "56/34/12/abcdef123456"
    x, y = ds[1]
    assert x.shape == (3, 6, 8) and y.tolist() == [1]


def test_evaluated_on_the_revisited_benchmarks_beside_it(tmp_path):
    write_sfm(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="hapkit prepare-data roxford5k"):
        get_eval_sets("sfm120k", root=tmp_path)
    write_city(tmp_path, "roxford5k")
    write_city(tmp_path, "rparis6k")
    sets = get_eval_sets("sfm120k", root=tmp_path)
    assert [s.name for s in sets] == ["roxford5k", "rparis6k"] and all(s.gnd for s in sets)
    assert [s.name for s in get_eval_sets("sfm120k", root=tmp_path / "sfm120k")] == ["roxford5k", "rparis6k"]


def test_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"{CLUSTER_FILE}.*hapkit prepare-data sfm120k --root {tmp_path}"):
        get_dataset("sfm120k", root=tmp_path)
    write_sfm(tmp_path / "a", skip=CIDS[2])
    with pytest.raises(DatasetNotFoundError, match=f"{CIDS[2]}.*hapkit prepare-data sfm120k"):
        get_dataset("sfm120k", root=tmp_path / "a")
    base = write_sfm(tmp_path / "b")
    scipy.io.savemat(base / CLUSTER_FILE, {"cids": np.array([["abcdefgh"]], dtype=object)})
    with pytest.raises(AnnotationError, match=r"missing \['cluster'\]") as err:
        get_dataset("sfm120k", root=tmp_path / "b")
    assert err.value.path == base / CLUSTER_FILE
    write_sfm(tmp_path / "c", clusters=[1, 2, 2.5, 3])
    with pytest.raises(AnnotationError, match="entry 2 of 'cluster' is not an integer"):
        get_dataset("sfm120k", root=tmp_path / "c")
    (base / CLUSTER_FILE).write_bytes(b"not a mat file at all")
    with pytest.raises(AnnotationError, match="not a readable MATLAB file"):
        get_dataset("sfm120k", root=tmp_path / "b")
    with pytest.raises(ValueError, match="no split 'test'.*evaluated on roxford5k / rparis6k"):
        get_dataset("sfm120k", root=tmp_path, split="test")
