"""prepare-data for the landmark datasets, against a local HTTP server that serves fake copies
of the public files (archives in the real layouts, the real annotation formats)."""

import functools
import hashlib
import io
import pickle
import tarfile
import threading
import warnings
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from hapkit.data import DataError, get_dataset, get_eval_sets
from hapkit.data import preparation as P
from hapkit.data.download import ChecksumError
from test_data_gldv2 import CLEAN, HIER, HIER_HEADER
from test_data_revisited import DISTRACTORS, GND, IMLIST, QIMLIST
from test_data_sfm120k import CIDS, CLUSTERS, write_sfm


class Handler(SimpleHTTPRequestHandler):
    served: list = []

    def do_GET(self):  # noqa: N802
        type(self).served.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    """(base URL, folder it serves)."""
    folder = tmp_path / "www"
    folder.mkdir()
    Handler.served = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()
    httpd.server_close()


def jpeg_bytes(seed, size=(12, 9)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def tar(path, members: dict, mode="w:gz"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def serve_file(folder, rel, data: bytes):
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(data)


def test_revisited_oxford_from_its_two_hosts(server, tmp_path, monkeypatch):
    url, www = server
    serve_file(www, "cnnimageretrieval/gnd_roxford5k.pkl", pickle.dumps({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": GND}))
    # the archive keeps its images in a sub-folder: prepare flattens them into jpg/ as revisitop does
    tar(www / "vgg/oxbuild_images-v1.tgz", {f"oxbuild/{n}.jpg": jpeg_bytes(k, (40, 30)) for k, n in enumerate(QIMLIST + IMLIST)})
    # the first mirror of the ground truth is down: the second one is used
    monkeypatch.setitem(P.SOURCES, "roxford5k_gnd", P.Source((f"{url}/revisitop/missing.pkl", f"{url}/cnnimageretrieval/gnd_roxford5k.pkl"), "gnd_roxford5k.pkl"))
    monkeypatch.setitem(P.SOURCES, "oxford_images", P.Source((f"{url}/vgg/oxbuild_images-v1.tgz",), "oxbuild_images-v1.tgz"))
    root = tmp_path / "data"
    assert P.prepare("roxford5k", root, progress=False) == root / "roxford5k"
    assert sorted(p.name for p in (root / "roxford5k" / "jpg").iterdir()) == sorted(f"{n}.jpg" for n in QIMLIST + IMLIST)
    (s,) = get_eval_sets("roxford5k", root=root)
    assert len(s.query) == 3 and len(s.gallery) == 6 and s.gnd[0]["junk"] == [4]
    served = len(Handler.served)
    P.prepare("roxford5k", root, progress=False)  # everything there: nothing fetched again
    assert len(Handler.served) == served


def test_revisited_archive_missing_an_image_is_an_error(server, tmp_path, monkeypatch):
    url, www = server
    serve_file(www, "gnd_rparis6k.pkl", pickle.dumps({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": GND}))
    names = QIMLIST + IMLIST
    tar(www / "paris_1-v1.tgz", {f"paris/a/{n}.jpg": jpeg_bytes(k, (40, 30)) for k, n in enumerate(names[:5])})
    tar(www / "paris_2-v1.tgz", {f"paris/b/{n}.jpg": jpeg_bytes(k, (40, 30)) for k, n in enumerate(names[5:-1])})
    monkeypatch.setitem(P.SOURCES, "rparis6k_gnd", P.Source((f"{url}/gnd_rparis6k.pkl",), "gnd_rparis6k.pkl"))
    for k in (1, 2):
        monkeypatch.setitem(P.SOURCES, f"paris_images_{k}", P.Source((f"{url}/paris_{k}-v1.tgz",), f"paris_{k}-v1.tgz"))
    with pytest.raises(DataError, match=r"1 of 9 images listed .* not on disk after extracting paris_1-v1.tgz and paris_2-v1.tgz, e.g. .*christ_church_000006.jpg"):
        P.prepare("rparis6k", tmp_path / "data", progress=False)


def test_unreachable_hosts_give_manual_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(P.SOURCES, "roxford5k_gnd", P.Source(("file:///nonexistent/gnd_roxford5k.pkl",), "gnd_roxford5k.pkl"))
    with pytest.raises(P.ManualDownloadRequired) as err:
        P.prepare("roxford5k", tmp_path, progress=False)
    assert "file:///nonexistent/gnd_roxford5k.pkl" in str(err.value) and str(tmp_path / "roxford5k" / "gnd_roxford5k.pkl") in str(err.value)


def test_r1m_numbered_archives_resume(server, tmp_path, monkeypatch):
    url, www = server
    serve_file(www, "revisitop1m.txt", ("\n".join(DISTRACTORS) + "\n").encode())
    tar(www / "jpg/revisitop1m.1.tar.gz", {DISTRACTORS[0]: jpeg_bytes(1), DISTRACTORS[1]: jpeg_bytes(2)})
    tar(www / "jpg/revisitop1m.2.tar.gz", {DISTRACTORS[2]: jpeg_bytes(3)})
    monkeypatch.setitem(P.SOURCES, "revisitop1m_list", P.Source((f"{url}/revisitop1m.txt",), "revisitop1m.txt"))
    monkeypatch.setitem(P.NUMBERED_ARCHIVES, "revisitop1m", (url + "/jpg/revisitop1m.{n}.tar.gz", None, 2, 1))
    root = tmp_path / "data"
    # an earlier run extracted archive 1 and was interrupted
    (root / "revisitop1m" / "jpg").mkdir(parents=True)
    (root / "revisitop1m" / "jpg" / ".revisitop1m.1.tar.gz.extracted").touch()
    tar(root / "tmp.tar", {DISTRACTORS[0]: jpeg_bytes(1), DISTRACTORS[1]: jpeg_bytes(2)}, mode="w")
    with tarfile.open(root / "tmp.tar") as tf:
        tf.extractall(root / "revisitop1m" / "jpg", filter="data")
    P.prepare("revisitop1m", root, progress=False)
    assert "/jpg/revisitop1m.1.tar.gz" not in Handler.served and "/jpg/revisitop1m.2.tar.gz" in Handler.served
    assert not list((root / "downloads").glob("revisitop1m.*.tar.gz"))  # deleted once extracted
    assert len(get_dataset("revisitop1m", root=root, split="distractors")) == 3


def test_sfm120k_cluster_file_and_image_tree(server, tmp_path, monkeypatch):
    url, www = server
    write_sfm(www / "made")  # the real .mat and image tree, then packed as the public archive
    serve_file(www, "ims/retrieval-SfM-120k-imagenames-clusterids.mat", (www / "made/sfm120k/retrieval-SfM-120k-imagenames-clusterids.mat").read_bytes())
    members = {str(p.relative_to(www / "made/sfm120k/ims")): p.read_bytes() for p in (www / "made/sfm120k/ims").rglob("*") if p.is_file()}
    tar(www / "ims/ims.tar.gz", members)
    monkeypatch.setitem(P.SOURCES, "sfm120k_clusters", P.Source((f"{url}/ims/retrieval-SfM-120k-imagenames-clusterids.mat",), "retrieval-SfM-120k-imagenames-clusterids.mat"))
    monkeypatch.setitem(P.SOURCES, "sfm120k_images", P.Source((f"{url}/ims/ims.tar.gz",), "sfm120k-ims.tar.gz"))
    root = tmp_path / "data"
    assert P.prepare("sfm120k", root, progress=False) == root / "sfm120k"
    ds = get_dataset("sfm120k", root=root)
    assert len(ds) == len(CIDS) and ds.num_classes == [len(set(CLUSTERS))]


def gldv2_files(www, url, monkeypatch, corrupt=False):
    ids = [i for ids in CLEAN.values() for i in ids]
    buf = io.StringIO()
    buf.write("landmark_id,images\n" + "".join(f"{k},{' '.join(v)}\n" for k, v in CLEAN.items()))
    serve_file(www, "metadata/train_clean.csv", buf.getvalue().encode())
    import csv

    hier = io.StringIO()
    w = csv.writer(hier)
    w.writerow(HIER_HEADER)
    w.writerows(HIER)
    serve_file(www, "metadata/train_label_to_hierarchical.csv", hier.getvalue().encode())
    extra = "ffffffffffffffff"  # an image of the full train set that the clean set does not list
    halves = [ids[:4], ids[4:] + [extra]]
    for n, half in enumerate(halves):
        path = tar(www / f"train/images_{n:03d}.tar", {f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg": jpeg_bytes(k) for k, i in enumerate(half)}, mode="w")
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        serve_file(www, f"md5sum/train/md5.images_{n:03d}.txt", f"{'0' * 32 if corrupt and n == 1 else md5}  images_{n:03d}.tar\n".encode())
    monkeypatch.setitem(P.SOURCES, "gldv2_train_clean", P.Source((f"{url}/metadata/train_clean.csv",), "train_clean.csv"))
    monkeypatch.setitem(P.SOURCES, "gldv2_hierarchy", P.Source((f"{url}/metadata/train_label_to_hierarchical.csv",), "train_label_to_hierarchical.csv"))
    monkeypatch.setitem(P.NUMBERED_ARCHIVES, "gldv2", (url + "/train/images_{n:03d}.tar", url + "/md5sum/train/md5.images_{n:03d}.txt", 2, 0))
    return extra


def test_gldv2_hier_verifies_md5_and_keeps_the_clean_images(server, tmp_path, monkeypatch):
    url, www = server
    extra = gldv2_files(www, url, monkeypatch)
    root = tmp_path / "data"
    with pytest.warns(RuntimeWarning, match="differs from the counts of SupRank's configuration.*landmarks 3 vs 46593"):
        assert P.prepare("gldv2_hier", root, progress=False) == root / "gldv2"
    assert not (root / "gldv2" / "train" / "f" / "f" / "f" / f"{extra}.jpg").exists()
    assert len(get_dataset("gldv2_hier", root=root)) == 6 and len(get_dataset("gldv2", root=root)) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.prepare("gldv2", root, progress=False)  # same folder, already complete; no count check


def test_gldv2_checksum_mismatch_stops_and_deletes(server, tmp_path, monkeypatch):
    url, www = server
    gldv2_files(www, url, monkeypatch, corrupt=True)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="images_001.tar"):
        P.prepare("gldv2", root, progress=False)
    assert (root / "gldv2" / "train" / ".images_000.tar.extracted").exists()  # the good one is kept
    assert not (root / "downloads" / "images_001.tar").exists()
