"""Download, verify and lay out each dataset: ``hapkit prepare-data NAME --root DIR``.

Archives are kept in ``DIR/downloads`` (an archive fetched by hand and put there is used as is,
after its checksum is verified), downloads resume where they stopped, and each dataset ends up in
its own folder under ``DIR``, where :func:`hapkit.data.get_dataset` finds it with ``root=DIR``.
Datasets that cannot be fetched by a script (DyML; iNaturalist's split lists and SOP when their
hosts refuse) raise :class:`ManualDownloadRequired` whose message says exactly what to fetch and
where to put it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hapkit.data.base import DataError, default_data_root
from hapkit.data.download import DownloadError, download, extract
from hapkit.data.registry import dataset_info, get_dataset

__all__ = ["prepare", "ManualDownloadRequired", "SOURCES", "Source"]


class ManualDownloadRequired(DataError):
    """The dataset must be fetched by hand; the message gives the steps."""


@dataclass(frozen=True)
class Source:
    """One archive: where to get it (mirrors in order), its file name and published checksum."""

    urls: tuple[str, ...]
    filename: str
    md5: str | None = None  # None: no published checksum is known
    size: str = ""


SOURCES: dict[str, Source] = {
    # md5 as published by the dataset pages / widely used loaders
    "sop": Source(
        (
            "https://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
            # the authors' Google Drive copy, linked from the README of
            # github.com/rksltnl/Deep-Metric-Learning-CVPR16
            "https://drive.usercontent.google.com/download?id=1TclrpQOF_ullUP99wk_gjGN8pKvtErG8"
            "&export=download&confirm=t",
        ),
        "Stanford_Online_Products.zip",
        "7f73d41a2f44250d4779881525aea32e",
        "2.9 GB",
    ),
    "inat_images": Source(
        ("https://ml-inat-competition-datasets.s3.amazonaws.com/2018/train_val2018.tar.gz",),
        "train_val2018.tar.gz",
        "b1c6952ce38f31868cc50ea72d066cc3",
        "120 GB",
    ),
    "inat_json": Source(
        ("https://ml-inat-competition-datasets.s3.amazonaws.com/2018/train2018.json.tar.gz",),
        "train2018.json.tar.gz",
        "bfa29d89d629cbf04d826a720c0a68b0",
        "26 MB",
    ),
    # Smooth-AP split lists (github.com/Andrew-Brown1/Smooth_AP); no checksum is published
    "inat_splits": Source(
        (
            "https://drive.usercontent.google.com/download?id=1sXfkBTFDrRU3__-NUs1qBP3sf_0uMB98"
            "&export=download&confirm=t",
        ),
        "Inat_dataset_splits.zip",
        None,
        "10 MB",
    ),
    "cub": Source(
        ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",),
        "CUB_200_2011.tgz",
        "97eceeb196236b17998738112f37df78",
        "1.1 GB",
    ),
    "cifar100": Source(
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "161 MB",
    ),
}


def _fetch(source: Source, downloads: Path, progress: bool) -> Path:
    errors = []
    for url in source.urls:
        try:
            return download(url, downloads / source.filename, md5=source.md5, progress=progress)
        except DownloadError as err:
            errors.append(str(err))
    raise DownloadError("\n".join(errors))


def _manual(title: str, steps: str, root: Path) -> ManualDownloadRequired:
    return ManualDownloadRequired(
        f"{title} must be downloaded by hand:\n{steps}\nThen run the same preparation again (--root {root})."
    )


def _prepare_generated(root, progress, **options):
    from hapkit.data.generated import cache_path, load_arrays

    load_arrays(root, progress=progress, **options)
    return cache_path(root, **options).parent


def _prepare_sop(root: Path, progress: bool) -> Path:
    from hapkit.data.sop import SUBDIR

    target = root / SUBDIR
    if not (target / "Ebay_train.txt").is_file():
        try:
            archive = _fetch(SOURCES["sop"], root / "downloads", progress)
        except DownloadError as err:
            src = SOURCES["sop"]
            raise _manual(
                "Stanford Online Products",
                f"  1. fetch {src.filename} ({src.size}, md5 {src.md5}) from one of:\n"
                + "".join(f"     {u}\n" for u in src.urls)
                + "     or the dataset page https://cvgl.stanford.edu/projects/lifted_struct/\n"
                f"  2. put it in {root / 'downloads'}/\n(automatic download failed: {err})",
                root,
            ) from err
        extract(archive, root, progress)
    return target


def _prepare_inaturalist(root: Path, progress: bool) -> Path:
    from hapkit.data.inaturalist import SUBDIR

    target = root / SUBDIR
    downloads = root / "downloads"
    if not (target / "train2018.json").is_file():
        extract(_fetch(SOURCES["inat_json"], downloads, progress), target, progress)
    if not (target / "Inat_dataset_splits" / "Inaturalist_train_set1.txt").is_file():
        try:
            extract(_fetch(SOURCES["inat_splits"], downloads, progress), target, progress)
        except (DownloadError, DataError) as err:
            raise _manual(
                "The Smooth-AP iNaturalist split lists",
                "  1. open https://drive.google.com/file/d/1sXfkBTFDrRU3__-NUs1qBP3sf_0uMB98/view\n"
                "     and download the zip (no published checksum)\n"
                f"  2. save it as {downloads / SOURCES['inat_splits'].filename}\n"
                f"     (or unzip it so that {target / 'Inat_dataset_splits' / 'Inaturalist_train_set1.txt'}\n"
                "     exists)\n"
                f"(automatic download failed: {err})",
                root,
            ) from err
    if not (target / "train_val2018").is_dir():
        extract(_fetch(SOURCES["inat_images"], downloads, progress), target, progress)
    return target


def _prepare_dyml(root: Path, progress: bool, variant: str) -> Path:
    name = f"dyml_{variant}"
    target = root / name
    if (target / "train" / "label.csv").is_file():
        return target
    raise _manual(
        f"DyML-{variant.title()}",
        "  1. download the DyML datasets from the OneDrive folder linked by the HAPPIER authors\n"
        "     (https://github.com/elias-ramzi/HAPPIER, section Datasets):\n"
        "     https://onedrive.live.com/?authkey=%21AMLHa5h%2D56ZZL94&id=F4EF5F480284E1C2%21106"
        "&cid=F4EF5F480284E1C2\n"
        "     (no direct link a script can use, no published checksum)\n"
        f"  2. extract dyml_{variant} so that these exist:\n"
        f"     {target}/train/label.csv and {target}/train/imgs/\n"
        + (
            f"     {target}/mini-bmk_all_in_one/label.csv (and/or bmk_fine|middle|coarse/) with imgs\n"
            if variant == "product"
            else f"     {target}/bmk_{{fine,middle,coarse}}/{{query,gallery}}.csv and the query/,\n"
            "     gallery/ folders beside them\n"
        ),
        root,
    )


def _prepare_cub(root: Path, progress: bool) -> Path:
    from hapkit.data.cub import SUBDIR

    target = root / SUBDIR
    if not (target / "images.txt").is_file():
        extract(_fetch(SOURCES["cub"], root / "downloads", progress), root, progress)
    return target


def _prepare_cifar100(root: Path, progress: bool) -> Path:
    from hapkit.data.cifar100 import SUBDIR

    target = root / SUBDIR
    if not (target / "train").is_file():
        extract(_fetch(SOURCES["cifar100"], root / "downloads", progress), root, progress)
    return target


def prepare(name: str, root=None, progress: bool = True, **options) -> Path:
    """Download (resumably), verify (md5) and lay out dataset ``name`` under ``root``; return the
    dataset's folder. Checks the result by loading its training split.

    ``root`` defaults to ``$HAPKIT_DATA`` or ``./data`` (for "generated": the cache directory,
    where the images are rendered once). Raises :class:`ManualDownloadRequired` with
    instructions when a file cannot be fetched automatically, ``ChecksumError`` on a corrupt file.
    """
    info = dataset_info(name)
    if name == "generated":
        return _prepare_generated(root, progress, **options)
    root = Path(root).expanduser() if root is not None else default_data_root()
    root.mkdir(parents=True, exist_ok=True)
    if info.module == "dyml":
        target = _prepare_dyml(root, progress, info.options["variant"])
    else:
        target = {
            "sop": _prepare_sop,
            "inaturalist": _prepare_inaturalist,
            "cub": _prepare_cub,
            "cifar100": _prepare_cifar100,
        }[info.module](root, progress)
    get_dataset(name, root=root, split="train")  # raises a precise error if the layout is wrong
    return target


def main(argv=None, names=None, description: str | None = None) -> int:
    """Command line of the data_scripts: ``--root DIR`` (and ``--name`` when several datasets
    share a script). Prints where the dataset is, or the manual steps / error; returns the exit
    status (0 ok, 2 when something must be done by hand or failed)."""
    import argparse
    import sys

    names = list(names) if names is not None else None
    parser = argparse.ArgumentParser(description=description or "Download, verify and lay out a dataset.")
    parser.add_argument(
        "--root", default=None, help="directory to prepare the dataset in (default: $HAPKIT_DATA or ./data)"
    )
    if names is None or len(names) > 1:
        choices = names or None
        parser.add_argument(
            "--name", default=names[0] if names else None, choices=choices, required=names is None
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    name = getattr(args, "name", None) or names[0]
    try:
        where = prepare(name, args.root, progress=not args.quiet)
    except DataError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    print(f"{name}: ready in {where}")
    return 0
