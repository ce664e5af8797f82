"""Revisited Oxford / Paris and R1M loaders on tiny fixtures in the real formats: a pickled
gnd_<name>.pkl with 3 queries, jpg/ images, revisitop1m.txt."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from hapkit.data import AnnotationError, DatasetNotFoundError, EvalSet, get_dataset, get_eval_sets
from hapkit.data.revisited import benchmark_from_labels, read_gnd
from hapkit.evaluate import evaluate_revisited

IMLIST = ["all_souls_000001", "all_souls_000002", "ashmolean_000003", "balliol_000004", "radcliffe_camera_000005",
          "christ_church_000006"]
QIMLIST = ["all_souls_000013", "ashmolean_000007", "balliol_000011"]
GND = [  # the real files hold plain lists of ints and a bbx of 4 floats
    {"bbx": [10.4, 5.0, 30.6, 24.5], "easy": [0], "hard": [1], "junk": [4]},
    {"bbx": [0.0, 0.0, 40.0, 30.0], "easy": [2], "hard": [], "junk": []},
    {"bbx": [2.5, 3.5, 20.0, 12.0], "easy": [], "hard": [3], "junk": [5, 0]},
]
DISTRACTORS = ["1/10000000.jpg", "1/10000001.jpg", "2/20000000.jpg"]


def image(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_city(root, city="roxford5k", gnd=None, skip_image=None):
    base = root / city
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    with open(base / f"gnd_{city}.pkl", "wb") as fh:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": GND if gnd is None else gnd}, fh)
    for k, name in enumerate(QIMLIST + IMLIST):
        if name != skip_image:
            image(k).save(base / "jpg" / f"{name}.jpg", quality=95)
    return base


def write_distractors(root):
    base = root / "revisitop1m"
    (base / "revisitop1m.txt").parent.mkdir(parents=True, exist_ok=True)
    (base / "revisitop1m.txt").write_text("\n".join(DISTRACTORS) + "\n")
    for k, entry in enumerate(DISTRACTORS):
        (base / "jpg" / entry).parent.mkdir(parents=True, exist_ok=True)
        image(100 + k).save(base / "jpg" / entry)
    return base


def test_queries_are_cropped_to_their_box(tmp_path):
    base = write_city(tmp_path)
    query = get_dataset("roxford5k", root=tmp_path, split="query")
    assert len(query) == 3 and query.split == "query" and query.paths[0].endswith("roxford5k/jpg/all_souls_000013.jpg")
    for q, entry in enumerate(GND):
        full = np.asarray(Image.open(base / "jpg" / f"{QIMLIST[q]}.jpg").convert("RGB"))
        x1, y1, x2, y2 = (round(v) for v in entry["bbx"])  # PIL rounds the box, right / bottom edges excluded
        np.testing.assert_array_equal(np.asarray(query.load_image(q)), full[y1:y2, x1:x2])
    x, _ = query[0]
    assert x.shape == (3, 19, 21)  # rows round(5.0)..round(24.5) = 5..24 (half to even), columns 10..31


def test_gallery_order_labels_and_eval_set(tmp_path):
    write_city(tmp_path, "rparis6k")
    gallery = get_dataset("rparis6k", root=tmp_path, split="gallery")
    assert [p.rsplit("/", 1)[1] for p in gallery.paths] == [f"{n}.jpg" for n in IMLIST]
    assert gallery.level_names == ["landmark"]
    (s,) = get_eval_sets("rparis6k", root=tmp_path / "rparis6k")  # the dataset's own folder works too
    assert isinstance(s, EvalSet) and s.name == "rparis6k" and s.distractors is None
    assert s.gnd == [{**g, "bbx": [float(v) for v in g["bbx"]]} for g in GND]
    # one label per landmark name, shared by queries and gallery
    names = s.query.class_names[0]
    assert [names[i] for i in s.query.labels[:, 0]] == ["all_souls", "ashmolean", "balliol"]
    assert [names[i] for i in s.gallery.labels[:, 0]][:3] == ["all_souls", "all_souls", "ashmolean"]


def test_the_eval_set_feeds_evaluate_revisited(tmp_path):
    write_city(tmp_path)
    (s,) = get_eval_sets("roxford5k", root=tmp_path)

    def embed(ds):
        return torch.nn.functional.normalize(torch.stack([ds[i][0].mean((1, 2)) - 0.5 for i in range(len(ds))]), dim=1)

    res = evaluate_revisited(embed(s.query), embed(s.gallery), s.gnd, progress=False)
    assert res.num_queries == 3 and res.skipped["mAP@easy"] == 1 and res.skipped["mAP@hard"] == 1


def test_r1m_distractors(tmp_path):
    write_city(tmp_path)
    write_distractors(tmp_path)
    d = get_dataset("revisitop1m", root=tmp_path, split="distractors")
    assert len(d) == 3 and d.paths[2].endswith("revisitop1m/jpg/2/20000000.jpg") and d.labels.tolist() == [[0]] * 3
    (s,) = get_eval_sets("roxford5k", root=tmp_path, distractors=True)
    assert len(s.distractors) == 3
    with pytest.raises(ValueError, match="distractors=True"):
        get_eval_sets("revisitop1m", root=tmp_path)


def test_missing_dataset_and_files_say_how_to_prepare(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"gnd_roxford5k.pkl.*{tmp_path}.*hapkit prepare-data roxford5k --root {tmp_path}"):
        get_dataset("roxford5k", root=tmp_path, split="gallery")
    write_city(tmp_path, skip_image="balliol_000004")
    with pytest.raises(DatasetNotFoundError, match="balliol_000004.jpg.*hapkit prepare-data roxford5k"):
        get_dataset("roxford5k", root=tmp_path, split="gallery")
    write_city(tmp_path / "full")
    with pytest.raises(DatasetNotFoundError, match="hapkit prepare-data revisitop1m"):
        get_eval_sets("roxford5k", root=tmp_path / "full", distractors=True)
    with pytest.raises(ValueError, match="choose one of \\('query', 'gallery'\\)"):
        get_dataset("roxford5k", root=tmp_path)  # no 'train' split


@pytest.mark.parametrize("gnd, problem", [
    ([{**GND[0], "hard": [6]}] + GND[1:], r"query 0: 'hard' holds index 6, outside imlist \(0..5\)"),
    ([{"bbx": [0, 0, 1, 1], "ok": [1], "junk": []}] + GND[1:], "classic, not revisited"),
    ([{**GND[1], "bbx": [5, 5, 2, 9]}] + GND[1:], "bbx must be x1 < x2"),
    (GND[:2], "'gnd' has 2 entries but 'qimlist' 3 queries"),
])
def test_malformed_ground_truth_names_the_file(tmp_path, gnd, problem):
    write_city(tmp_path, gnd=gnd)
    with pytest.raises(AnnotationError, match=problem) as err:
        get_dataset("roxford5k", root=tmp_path, split="query")
    assert err.value.path == tmp_path / "roxford5k" / "gnd_roxford5k.pkl"


def test_a_truncated_pickle_is_a_clear_error(tmp_path):
    path = write_city(tmp_path) / "gnd_roxford5k.pkl"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(AnnotationError, match="not a readable ground-truth pickle"):
        read_gnd(path)


def test_benchmark_from_labels_makes_a_revisited_ground_truth():
    from hapkit.data import InMemoryImageDataset

    # variant, shape, family: 2 images per variant, 2 variants per shape, 2 shapes per family
    labels = np.array([[v, v // 2, v // 4] for v in range(8) for _ in range(2)])
    ds = InMemoryImageDataset(np.zeros((16, 2, 2, 3), np.uint8), labels, name="t", split="test",
                              level_names=["variant", "shape", "family"])
    s = benchmark_from_labels(ds, num_queries=3, seed=1)
    q, g = s.query.labels, s.gallery.labels
    assert len(s.query) == 3 and len(s.gallery) == 13 and len(set(q[:, 0])) == 3  # queries left out
    for i, entry in enumerate(s.gnd):
        status = {j: name for name in ("easy", "hard", "junk") for j in entry[name]}
        for j, row in enumerate(g):
            shared = (row == q[i]).tolist()
            expected = "easy" if shared[0] else "hard" if shared[1] else "junk" if shared[2] else None
            assert status.get(j) == expected
    res = evaluate_revisited(torch.randn(3, 4), torch.randn(13, 4), s.gnd, progress=False)
    assert res.num_queries == 3
    small = benchmark_from_labels(ds, num_queries=2, gallery_size=6)
    assert len(small.gallery) == 6
    with pytest.raises(ValueError, match="between 1 and the 8 fine classes"):
        benchmark_from_labels(ds, num_queries=9)
