"""Resumable downloads with checksums, and safe archive extraction (standard library + tqdm)."""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from hapkit.data.base import DataError

__all__ = ["ChecksumError", "DownloadError", "download", "file_digest", "verify", "extract"]

_CHUNK = 1 << 20


class ChecksumError(DataError):
    """A downloaded or user-supplied file does not have the published checksum."""


class DownloadError(DataError):
    """A URL could not be fetched."""


def file_digest(path, algorithm: str = "md5", progress: bool = False) -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    path = Path(path)
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"{algorithm} {path.name}",
        disable=not progress, leave=False,
    ) as bar:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify(path, md5: str | None = None, sha256: str | None = None, progress: bool = False) -> bool:
    """Raise :class:`ChecksumError` if ``path`` does not match a given checksum.

    Returns False when no checksum is known (nothing verified), True when verified.
    """
    checked = False
    for algo, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            actual = file_digest(path, algo, progress)
            if actual.lower() != expected.lower():
                raise ChecksumError(
                    f"{path}: {algo} is {actual} but the published value is {expected}; the file is "
                    f"corrupt or incomplete. Delete it and run the preparation again."
                )
            checked = True
    return checked


def download(
    url: str,
    dest,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``url`` to ``dest`` unless a verified copy is already there; return ``dest``.

    Data go to ``dest.part`` first and are resumed from where they stopped (HTTP Range) when the
    server allows it; the checksum is verified before the final rename. A file that fails its
    checksum is deleted, so that the next attempt starts afresh.
    """
    dest = Path(dest)
    if dest.exists():
        verify(dest, md5, sha256, progress)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "hapkit-data"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            status = getattr(resp, "status", None)
            if offset and status != 206:
                offset = 0  # the server ignored the Range header: start over
            length = resp.headers.get("Content-Length")
            total = int(length) + offset if length else None
            with open(part, "ab" if offset else "wb") as fh, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DownloadError(
            f"could not download {url}: {err}. Partial data (if any) is kept in {part} and the next "
            f"attempt resumes from it."
        ) from err
    try:
        verify(part, md5, sha256, progress)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def extract(archive, dest, progress: bool = True, keep=None) -> Path:
    """Extract a .zip / .tar(.gz) ``archive`` into ``dest`` (members must stay inside ``dest``).

    ``keep``: optional predicate on a member's name; members it rejects are not written (e.g. the
    images of a large archive that no annotation file lists).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()

    def _safe(name: str) -> None:
        target = (root / name).resolve()
        if target != root and root not in target.parents:
            raise DataError(f"{archive}: member {name!r} would be written outside {dest}; refusing to extract")

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in tqdm(members, desc=f"extracting {archive.name}", disable=not progress, unit="file"):
                if keep is not None and not keep(m.filename):
                    continue
                _safe(m.filename)
                zf.extract(m, dest)
    elif tarfile.is_tarfile(archive):
        # the "data" filter (Python >= 3.11.4 / 3.12) also refuses devices, absolute links, etc.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(archive) as tf:
            for m in tqdm(tf, desc=f"extracting {archive.name}", disable=not progress, unit="file"):
                if keep is not None and not keep(m.name):
                    continue
                _safe(m.name)
                if m.issym() or m.islnk():
                    _safe(os.path.join(os.path.dirname(m.name), m.linkname))
                tf.extract(m, dest, **safe)
    else:
        raise DataError(f"{archive}: not a zip or tar archive")
    return dest

