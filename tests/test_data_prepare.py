"""Downloads (resume, checksums), extraction and dataset preparation, all offline."""

import hashlib
import io
import pickle
import runpy
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hapkit.data import DataError, get_dataset
from hapkit.data import preparation as P
from hapkit.data.download import ChecksumError, DownloadError, download, extract
from hapkit.data.generated import cache_path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 64


class RangeHandler(BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file, honouring "Range: bytes=N-" like a real file server."""

    requests: list = []

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        if self.path != "/file":
            self.send_error(404)
            return
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    RangeHandler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_download_verifies_and_skips_a_verified_copy(server, tmp_path):
    dest = tmp_path / "d" / "file.bin"
    assert download(f"{server}/file", dest, md5=MD5, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD and not dest.with_name("file.bin.part").exists()
    download(f"{server}/file", dest, md5=MD5, progress=False)
    assert RangeHandler.requests == [None]  # second call: already there, nothing fetched


def test_download_resumes_a_partial_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.with_name("file.bin.part").write_bytes(PAYLOAD[:1000])
    download(f"{server}/file", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    assert RangeHandler.requests == ["bytes=1000-"]
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_deletes_the_download(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(ChecksumError, match="md5 is .* but the published value is 0123"):
        download(f"{server}/file", dest, md5="0123", progress=False)
    assert not dest.exists() and not dest.with_name("file.bin.part").exists()


def test_download_errors_name_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=f"could not download {server}/missing"):
        download(f"{server}/missing", tmp_path / "x", progress=False)
    src = tmp_path / "local.bin"
    src.write_bytes(PAYLOAD)
    download(src.as_uri(), tmp_path / "copy.bin", md5=MD5, progress=False)  # file:// works too
    assert (tmp_path / "copy.bin").read_bytes() == PAYLOAD


def test_extract_zip_tar_and_refuse_escaping_members(tmp_path):
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("top/x.txt", "zip")
    tpath = tmp_path / "a.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        info = tarfile.TarInfo("top/y.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"tar"))
    extract(zpath, tmp_path / "out", progress=False)
    extract(tpath, tmp_path / "out", progress=False)
    assert (tmp_path / "out/top/x.txt").read_text() == "zip" and (tmp_path / "out/top/y.txt").read_text() == "tar"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(DataError, match="outside"):
        extract(evil, tmp_path / "out2", progress=False)
    assert not (tmp_path / "escaped.txt").exists()
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(DataError, match="not a zip or tar"):
        extract(tmp_path / "plain.txt", tmp_path / "out3", progress=False)


def fake_cifar_archive(path):
    buf = {}
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        fine = rng.choice(100, 4).tolist()
        buf[split] = pickle.dumps({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "fine_labels": fine,
                                   "coarse_labels": [f // 5 for f in fine]})
    buf["meta"] = pickle.dumps({"fine_label_names": [str(i) for i in range(100)], "coarse_label_names": [str(i) for i in range(20)]})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in buf.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_prepare_uses_a_placed_archive_after_checking_it(tmp_path, monkeypatch):
    archive = tmp_path / "downloads" / "cifar-100-python.tar.gz"
    md5 = fake_cifar_archive(archive)
    # the real published checksum: our fake archive is rejected
    with pytest.raises(ChecksumError, match="eb9058c3a382ffc7106e4002c42a8d85"):
        P.prepare("cifar100", tmp_path, progress=False)
    fake_cifar_archive(archive)
    monkeypatch.setitem(P.SOURCES, "cifar100", P.Source(("file:///nonexistent",), archive.name, md5))
    assert P.prepare("cifar100", tmp_path, progress=False) == tmp_path / "cifar-100-python"
    assert len(get_dataset("cifar100", root=tmp_path, split="test")) == 4


def test_prepare_gives_manual_steps_when_downloads_fail(tmp_path, monkeypatch):
    monkeypatch.setitem(P.SOURCES, "sop", P.Source(("file:///nonexistent/sop.zip",), "Stanford_Online_Products.zip", "abc"))
    with pytest.raises(P.ManualDownloadRequired) as err:
        P.prepare("sop", tmp_path, progress=False)
    msg = str(err.value)
    assert "Stanford_Online_Products.zip" in msg and "md5 abc" in msg and str(tmp_path / "downloads") in msg


def test_prepare_dyml_is_manual_then_checks_the_layout(tmp_path):
    with pytest.raises(P.ManualDownloadRequired) as err:
        P.prepare("dyml_animal", tmp_path)
    msg = str(err.value)
    assert "onedrive" in msg.lower() and str(tmp_path / "dyml_animal" / "train" / "label.csv") in msg
    base = tmp_path / "dyml_animal"
    (base / "train" / "imgs").mkdir(parents=True)
    (base / "train" / "label.csv").write_text("fname, coarse_id, middle_id, fine_id0.jpg, 1, 2, 3\n")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(base / "train" / "imgs" / "0.jpg")
    assert P.prepare("dyml_animal", tmp_path) == base


def test_prepare_generated_renders_the_cache(tmp_path):
    P.prepare("generated", tmp_path, progress=False, images_per_class=1)
    assert cache_path(tmp_path, images_per_class=1).exists()
    with pytest.raises(ValueError, match="known datasets"):
        P.prepare("imagenet", tmp_path)


def test_data_scripts_are_thin_wrappers(tmp_path, capsys):
    scripts = sorted(p.name for p in (REPO / "data_scripts").glob("prepare_*.py"))
    assert scripts == ["prepare_cifar100.py", "prepare_cub.py", "prepare_dyml.py", "prepare_gldv2.py", "prepare_inaturalist.py",
                       "prepare_revisited.py", "prepare_sfm120k.py", "prepare_sop.py"]
    ns = runpy.run_path(str(REPO / "data_scripts" / "prepare_dyml.py"), run_name="imported")
    assert ns["main"] is P.main
    assert P.main(["--name", "dyml_product", "--root", str(tmp_path)], names=["dyml_vehicle", "dyml_product"]) == 2
    err = capsys.readouterr().err
    assert "dyml_product" in err and "mini-bmk_all_in_one" in err
