"""Download, verify and lay out each dataset: ``hapkit prepare-data NAME --root DIR``.

Archives are kept in ``DIR/downloads`` (an archive fetched by hand and put there is used as is,
after its checksum is verified), downloads resume where they stopped, and each dataset ends up in
its own folder under ``DIR``, where :func:`hapkit.data.get_dataset` finds it with ``root=DIR``.
Datasets that cannot be fetched by a script (DyML; iNaturalist's split lists and SOP when their
hosts refuse) raise :class:`ManualDownloadRequired` whose message says exactly what to fetch and
where to put it.

The landmark datasets are fetched from their public locations: revisitop's (images from the
Oxford VGG pages, ground truth from CMP Prague), cnnimageretrieval's for SfM-120k and
cvdfoundation's S3 bucket for GLDv2. Their hosts publish no checksums except GLDv2's (one md5 file
per archive, verified); what can be verified is: the ground truth parses, and every image it
lists is on disk. The datasets made of many archives (R1M: 100, GLDv2: 500) are extracted one
archive at a time, each deleted once extracted (a marker file remembers it), so that an
interrupted preparation resumes and the disk never holds both copies.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from hapkit.data.base import DataError, default_data_root
from hapkit.data.download import DownloadError, download, extract
from hapkit.data.registry import dataset_info, get_dataset

__all__ = ["prepare", "ManualDownloadRequired", "SOURCES", "Source", "NUMBERED_ARCHIVES"]


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
    # Landmarks (no checksum published). Revisited ground truth: revisitop's host, then
    # cnnimageretrieval's copy. Images: the face-blurred "-v1" archives revisitop now fetches.
    **{
        f"{city}_gnd": Source(
            (
                f"http://cmp.felk.cvut.cz/revisitop/data/datasets/{city}/gnd_{city}.pkl",
                f"http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/{city}/gnd_{city}.pkl",
            ),
            f"gnd_{city}.pkl",
        )
        for city in ("roxford5k", "rparis6k")
    },
    "oxford_images": Source(
        (
            "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
            "http://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",
        ),
        "oxbuild_images-v1.tgz",
    ),
    **{
        f"paris_images_{k}": Source(
            (
                f"https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_{k}-v1.tgz",
                f"http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_{k}-v1.tgz",
            ),
            f"paris_{k}-v1.tgz",
        )
        for k in (1, 2)
    },
    "revisitop1m_list": Source(("http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt",), "revisitop1m.txt"),
    "sfm120k_clusters": Source(
        ("http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/retrieval-SfM-120k-imagenames-clusterids.mat",),
        "retrieval-SfM-120k-imagenames-clusterids.mat",
    ),
    "sfm120k_images": Source(("http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/ims/ims.tar.gz",), "sfm120k-ims.tar.gz"),
    "gldv2_train_clean": Source(("https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv",), "train_clean.csv"),
    "gldv2_hierarchy": Source(
        ("https://s3.amazonaws.com/google-landmark/metadata/train_label_to_hierarchical.csv",),
        "train_label_to_hierarchical.csv",
    ),
}

# name -> (archive URL template, md5-file URL template or None, how many, first number)
NUMBERED_ARCHIVES = {
    "revisitop1m": ("http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{n}.tar.gz", None, 100, 1),
    "gldv2": (
        "https://s3.amazonaws.com/google-landmark/train/images_{n:03d}.tar",
        "https://s3.amazonaws.com/google-landmark/md5sum/train/md5.images_{n:03d}.txt",
        500,
        0,
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


def _fetch_landmark_file(key: str, dest: Path, root: Path, progress: bool) -> Path:
    """``dest`` (a small annotation file), fetched from its mirrors unless already there."""
    if dest.is_file():
        return dest
    src = SOURCES[key]
    try:
        fetched = _fetch(src, root / "downloads", progress)
    except DownloadError as err:
        raise _manual(
            src.filename,
            "  1. fetch it from one of:\n" + "".join(f"     {u}\n" for u in src.urls)
            + f"  2. put it at {dest}\n(automatic download failed: {err})",
            root,
        ) from err
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fetched, dest)
    return dest


def _missing(paths) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def _require_all(paths, title: str, source: str) -> None:
    missing = _missing(paths)
    if missing:
        raise DataError(
            f"{title}: {len(missing)} of {len(paths)} images listed in the annotations are not on disk after "
            f"extracting {source}, e.g. {missing[0]}; delete the partial download and run the preparation again"
        )


def _extract_flat(archive: Path, dest: Path, progress: bool) -> None:
    """Extract ``archive`` and move every file into ``dest`` itself (sub-folders dropped, as
    revisitop lays out the Oxford and Paris images)."""
    tmp = dest.parent / f".{dest.name}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    extract(archive, tmp, progress)
    dest.mkdir(parents=True, exist_ok=True)
    for path in tmp.rglob("*"):
        if path.is_file():
            os.replace(path, dest / path.name)
    shutil.rmtree(tmp)


def _prepare_revisited(root: Path, progress: bool, city: str) -> Path:
    from hapkit.data.revisited import CITIES, image_file, read_gnd

    target = root / city
    gt = read_gnd(_fetch_landmark_file(f"{city}_gnd", target / f"gnd_{city}.pkl", root, progress))
    paths = [image_file(target, n) for n in gt["qimlist"] + gt["imlist"]]
    if _missing(paths):
        keys = ["oxford_images"] if city == "roxford5k" else ["paris_images_1", "paris_images_2"]
        for key in keys:
            try:
                archive = _fetch(SOURCES[key], root / "downloads", progress)
            except DownloadError as err:
                src = SOURCES[key]
                raise _manual(
                    CITIES[city],
                    f"  1. fetch {src.filename} from one of:\n" + "".join(f"     {u}\n" for u in src.urls)
                    + f"  2. put it in {root / 'downloads'}/\n(automatic download failed: {err})",
                    root,
                ) from err
            _extract_flat(archive, target / "jpg", progress)
        _require_all(paths, CITIES[city], " and ".join(SOURCES[k].filename for k in keys))
    return target


def _numbered_archives(name: str, dest: Path, root: Path, progress: bool, keep=None) -> None:
    """Download, verify (md5 file when published), extract into ``dest`` and delete each
    numbered archive of ``name``; a marker per archive lets an interrupted run resume."""
    url, md5_url, count, first = NUMBERED_ARCHIVES[name]
    downloads = root / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    for n in range(first, first + count):
        filename = url.format(n=n).rsplit("/", 1)[1]
        marker = dest / f".{filename}.extracted"
        if marker.exists():
            continue
        try:
            md5 = None
            if md5_url is not None:
                md5_file = download(md5_url.format(n=n), downloads / f"{filename}.md5.txt", progress=False)
                md5 = (md5_file.read_text().split() or [""])[0].lower()
                if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
                    md5_file.unlink()
                    raise DataError(f"{md5_url.format(n=n)} holds no md5 checksum ({md5[:40]!r})")
            archive = download(url.format(n=n), downloads / filename, md5=md5, progress=progress)
        except DownloadError as err:
            raise _manual(
                name,
                f"  1. fetch {url.format(n=n)} (and the {count} archives numbered like it)\n"
                f"  2. put them in {downloads}/\n(automatic download failed: {err})",
                root,
            ) from err
        extract(archive, dest, progress, keep=keep)
        marker.touch()
        archive.unlink()


def _prepare_revisitop1m(root: Path, progress: bool) -> Path:
    from hapkit.data.revisited import DISTRACTORS, DISTRACTORS_TITLE, image_file, read_distractor_list

    target = root / DISTRACTORS
    entries = read_distractor_list(_fetch_landmark_file("revisitop1m_list", target / f"{DISTRACTORS}.txt", root, progress))
    paths = [image_file(target, e) for e in entries]
    if _missing(paths):
        _numbered_archives("revisitop1m", target / "jpg", root, progress)
        _require_all(paths, DISTRACTORS_TITLE, "the revisitop1m archives")
    return target


def _prepare_sfm120k(root: Path, progress: bool) -> Path:
    from hapkit.data.sfm120k import CLUSTER_FILE, SUBDIR, TITLE, image_path, read_cluster_file

    target = root / SUBDIR
    cids, _ = read_cluster_file(_fetch_landmark_file("sfm120k_clusters", target / CLUSTER_FILE, root, progress))
    paths = [str(target / "ims" / image_path(c)) for c in cids]
    if _missing(paths):
        try:
            archive = _fetch(SOURCES["sfm120k_images"], root / "downloads", progress)
        except DownloadError as err:
            src = SOURCES["sfm120k_images"]
            raise _manual(
                TITLE, f"  1. fetch {src.urls[0]}\n  2. save it as {root / 'downloads' / src.filename}\n"
                f"(automatic download failed: {err})", root,
            ) from err
        extract(archive, target / "ims", progress)
        nested = target / "ims" / "ims"
        if _missing(paths) and nested.is_dir():  # an archive that holds the folder itself
            for child in nested.iterdir():
                os.replace(child, target / "ims" / child.name)
            nested.rmdir()
        _require_all(paths, TITLE, SOURCES["sfm120k_images"].filename)
    return target


def _prepare_gldv2(root: Path, progress: bool, hierarchy: bool) -> Path:
    from hapkit.data.gldv2 import SUBDIR, TITLES, image_path, read_train_clean

    target = root / SUBDIR
    rows = read_train_clean(_fetch_landmark_file("gldv2_train_clean", target / "train_clean.csv", root, progress))
    if hierarchy:
        _fetch_landmark_file("gldv2_hierarchy", target / SOURCES["gldv2_hierarchy"].filename, root, progress)
    listed = {image_path(i) for _, _, ids in rows for i in ids}
    paths = sorted(str(target / "train" / p) for p in listed)
    if _missing(paths):
        # only the images of the clean set are kept: about 1.6 of the 4.1 million of the archives
        _numbered_archives("gldv2", target / "train", root, progress, keep=lambda m: m.removeprefix("./") in listed)
        _require_all(paths, TITLES["gldv2_hier" if hierarchy else "gldv2"], "the GLDv2 train archives")
    return target


def _compare_with_suprank(dataset) -> None:
    from hapkit.data.gldv2 import SUPRANK_COUNTS

    found = {"landmarks": dataset.num_classes[0], "images": len(dataset), "hierarchical_labels": dataset.num_classes[1]}
    differ = {k: (found[k], v) for k, v in SUPRANK_COUNTS.items() if found[k] != v}
    if differ:
        warnings.warn(
            "H-GLDv2 differs from the counts of SupRank's configuration (found, SupRank): "
            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
            + "; a newer or older copy of the public files?",
            RuntimeWarning,
            stacklevel=3,
        )


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
    elif info.module == "revisited":
        city = info.options["city"]
        target = _prepare_revisitop1m(root, progress) if city == "revisitop1m" else _prepare_revisited(root, progress, city)
    elif info.module == "gldv2":
        target = _prepare_gldv2(root, progress, info.options["hierarchy"])
    else:
        target = {
            "sop": _prepare_sop,
            "inaturalist": _prepare_inaturalist,
            "cub": _prepare_cub,
            "cifar100": _prepare_cifar100,
            "sfm120k": _prepare_sfm120k,
        }[info.module](root, progress)
    # raises a precise error if the layout is wrong
    loaded = get_dataset(name, root=root, split="train" if "train" in info.splits else info.splits[0])
    if name == "gldv2_hier":
        _compare_with_suprank(loaded)
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
