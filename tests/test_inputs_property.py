"""Property: every public entry point either works or raises a HapkitError with a one-line message.

Generated inputs (shapes, dtypes, NaN/inf, huge and negative label ids, tensors that require grad,
malformed annotation files, malformed recipe YAML and overrides) go through evaluate, every loss
of hapkit.losses, RetrievalMetrics.update, the dataset loaders and the recipe loader. Any other
exception (TypeError, IndexError, KeyError, a yaml or torch error...) is a bug of the library.
"""

import contextlib
import math
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import hapkit.losses as losses
from hapkit.errors import HapkitError, NonFiniteError
from hapkit.evaluate import evaluate
from hapkit.hierarchy import LabelError
from hapkit.losses.base import HapkitLoss
from test_losses_common import LOSSES as COMMON_LOSSES
from test_losses_common import B, D, batch

# The common factories, and the exported losses that only appear there as parts of others.
LOSSES = {
    **COMMON_LOSSES,
    "ClusterLoss": (lambda: losses.ClusterLoss(num_classes=B, embedding_size=D), False, False, False),
    "TieAwareListwiseAP": (lambda: losses.TieAwareListwiseAP(), True, True, True),
}

pytestmark = pytest.mark.filterwarnings("ignore:.*have no positive")

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def works_or_hapkit_error():
    """Let a HapkitError through only if its message is one non-empty line; re-raise the rest."""
    try:
        yield
    except HapkitError as err:
        message = str(err)
        assert message.strip() and "\n" not in message, f"{type(err).__name__} message is not one line: {message!r}"


# ----------------------------------------------------------------------------------------------
# Arrays

ID_VALUES = st.one_of(
    st.integers(0, 3),
    st.integers(0, 3).map(lambda v: v + 2**40),
    st.sampled_from([2**62, 2**63 - 1, -1, -(2**40)]),
)


@st.composite
def embeddings(draw, n=None, d=None):
    n = draw(st.integers(0, 7)) if n is None else n
    d = draw(st.integers(1, 4)) if d is None else d
    special = st.sampled_from([math.nan, math.inf, -math.inf])
    finite = st.floats(-2, 2, allow_nan=False, width=32)
    values = draw(st.lists(st.one_of(finite, finite, finite, special) if draw(st.booleans()) else finite,
                           min_size=n * d, max_size=n * d))
    x = torch.tensor(values, dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))).view(n, d)
    shape = draw(st.sampled_from(["ok", "ok", "ok", "1d", "3d", "int"]))
    if shape == "1d":
        x = x.flatten()
    elif shape == "3d":
        x = x[None]
    elif shape == "int":
        x = x.nan_to_num().long()
    if x.dtype.is_floating_point and draw(st.booleans()):
        x = x.clone().requires_grad_(True)
    return x


@st.composite
def labels(draw, n=None):
    n = draw(st.integers(0, 7)) if n is None else n
    levels = draw(st.integers(1, 3))
    rows = draw(st.lists(st.lists(ID_VALUES, min_size=levels, max_size=levels), min_size=n, max_size=n))
    kind = draw(st.sampled_from(["tensor", "tensor", "numpy", "list", "1d", "float", "ragged"]))
    if kind == "ragged" and rows:
        return [r[: 1 + i % levels] for i, r in enumerate(rows)]
    arr = np.array(rows, dtype=np.int64).reshape(n, levels)
    if kind == "numpy":
        return arr
    if kind == "list":
        return arr.tolist()
    if kind == "1d":
        return torch.from_numpy(arr[:, 0].copy())
    if kind == "float":
        return torch.from_numpy(arr).double()
    return torch.from_numpy(arr)


@st.composite
def tree_labels(draw, n):
    """Valid (n, 2) tree labels with at least two items per fine class, ids 0..3."""
    fine = draw(st.lists(st.integers(0, 3), min_size=n // 2, max_size=n // 2))
    fine = torch.tensor(fine + fine)
    return torch.stack([fine, fine // 2], 1)


@given(emb=embeddings(), lab=labels(), metrics=st.sampled_from([None, ["R@k"], ["H-AP", "AP"]]))
@FAST
def test_evaluate_works_or_raises_hapkit_error(emb, lab, metrics):
    with works_or_hapkit_error():
        evaluate(emb, lab, metrics=metrics, progress=False, use_faiss=False)


@given(n=st.integers(2, 6).map(lambda k: 2 * k), data=st.data())
@FAST
def test_evaluate_depends_on_label_equality_only(n, data):
    """Huge ids (hashes) give the very numbers of small ones: the metrics see label equality only."""
    lab = data.draw(tree_labels(n))
    emb = torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(n)), dim=1)
    offsets = torch.tensor([data.draw(st.sampled_from([0, 2**40, 2**62 - 8])) for _ in range(2)])
    big = lab * data.draw(st.sampled_from([1, 2**31 + 1])) + offsets
    for metrics in (None, ["R@k", "P@1"]):
        small_res = evaluate(emb, lab, metrics=metrics, progress=False, use_faiss=False)
        big_res = evaluate(emb, big, metrics=metrics, progress=False, use_faiss=False)
        assert big_res.summary == pytest.approx(small_res.summary, nan_ok=True, abs=0)


@given(emb=embeddings(), lab=labels(), gallery=st.booleans())
@FAST
def test_retrieval_metrics_update_works_or_raises_hapkit_error(emb, lab, gallery):
    from hapkit.evaluate import RetrievalMetrics

    metric = RetrievalMetrics(metrics=["AP"])
    with works_or_hapkit_error():
        metric.update(emb, lab, gallery=gallery)
        metric.compute()


def test_every_exported_loss_is_covered():
    exported = {n for n in losses.__all__ if isinstance(getattr(losses, n), type) and issubclass(getattr(losses, n), HapkitLoss)}
    assert exported - {"HapkitLoss"} <= set(LOSSES), f"add a factory for {exported - set(LOSSES)}"


@pytest.mark.parametrize("name", sorted(LOSSES))
@given(data=st.data())
@FEW
def test_loss_works_or_raises_hapkit_error(name, data):
    n = data.draw(st.integers(0, 8))
    emb, lab = data.draw(embeddings(n=n, d=8)), data.draw(labels(n=n))
    ref = data.draw(st.sampled_from([None, "same", "other"]))
    loss = LOSSES[name][0]()
    with works_or_hapkit_error():
        if ref is None:
            value = loss(emb, lab)
        else:
            ref_emb = emb if ref == "same" else data.draw(embeddings(d=8))
            value = loss(emb, lab, ref_emb=ref_emb, ref_labels=lab if ref == "same" else data.draw(labels()))
        assert value.shape == ()


@pytest.mark.parametrize("name", sorted(LOSSES))
@given(rows=st.sets(st.integers(0, 23), min_size=1, max_size=5), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       where=st.sampled_from(["embeddings", "ref_emb"]))
@FEW
def test_loss_refuses_non_finite_embeddings_naming_the_argument(name, rows, value, where):
    emb, lab = batch()
    bad = emb.clone()
    bad[sorted(rows), 1] = value
    loss = LOSSES[name][0]()
    takes_ref = LOSSES[name][1]
    assume(where == "embeddings" or takes_ref)
    with pytest.raises(NonFiniteError, match=rf"{name}: {where} contain .* in {len(rows)} of 24 row\(s\)"):
        if where == "embeddings":
            loss(bad.requires_grad_(True), lab)
        else:
            loss(emb, lab, ref_emb=bad, ref_labels=lab)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_check_finite_off_skips_the_check(name):
    emb, lab = batch()
    emb = emb.clone()
    emb[0, 0] = math.nan
    loss = LOSSES[name][0]()
    loss.check_finite = False
    try:
        loss(emb, lab)  # whatever the loss makes of NaN (the engine watches the loss value)
    except NonFiniteError as err:
        pytest.fail(f"check_finite=False still checks: {err}")


@pytest.mark.parametrize("name", sorted(n for n, spec in LOSSES.items() if spec[2] and not getattr(losses, n).has_parameters))
@given(offset=st.sampled_from([2**40, 2**62 - 8, 2**63 - 8]), scale=st.sampled_from([1, 2**20 + 3]))
@FEW
def test_rank_losses_depend_on_label_equality_only(name, offset, scale):
    emb, lab = batch()
    torch.manual_seed(0)
    small = LOSSES[name][0]()(emb, lab)
    torch.manual_seed(0)
    big_ids = (lab * scale + offset) if offset < 2**62 else (lab + offset)
    assert LOSSES[name][0]()(emb, big_ids).item() == small.item()


# ----------------------------------------------------------------------------------------------
# Annotation files

TOKENS = st.one_of(
    st.sampled_from(["1", "2", "07", "-3", "--5", "²", "٣", "1.5", "1e3", "nan", "", " ", "\t", "a b", ",", "x.jpg",
                     "bicycle_final/a.JPG", "/abs/a.jpg", "..", "99999999999999999999", str(2**63), str(2**62), "\ufeff1"]),
    st.text(alphabet="ab1-_/., \t", max_size=6),
)


ID_TOKENS = st.one_of(st.integers(-3, 2**64).map(str), st.sampled_from(["²", "٣", "--5", "1.5", "", "x", "1 2"]))


def line(sep):
    return st.lists(TOKENS, min_size=0, max_size=5).map(sep.join)


@contextlib.contextmanager
def tmp_root():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _patch_all(modules):
    """The loaders' annotation parsing is under test, not the (absent) image files."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(mock.patch.object(m, "check_images_exist", lambda *a, **k: None))
        yield


def check_annotation_error(err, *files):
    from hapkit.data import AnnotationError

    if isinstance(err, AnnotationError):
        assert any(f in str(err) for f in files), f"the message does not name the file: {err}"


@given(header=st.sampled_from(["image_id class_id super_class_id path"] * 3 + ["image_id class_id path", ""]),
       body=st.lists(st.one_of(line(" "), *[st.tuples(ID_TOKENS, ID_TOKENS, TOKENS).map(
           lambda t: f"1 {t[0]} {t[1]} bicycle_final/{t[2]}.JPG")] * 3), min_size=1, max_size=4))
@FAST
def test_sop_loader_on_malformed_files(header, body):
    from hapkit.data import sop

    with tmp_root() as root, _patch_all([sop]):
        base = root / sop.SUBDIR
        base.mkdir()
        for split in ("train", "test"):
            (base / f"Ebay_{split}.txt").write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
        try:
            with works_or_hapkit_error():
                sop.load(root, "train")
        except HapkitError as err:
            check_annotation_error(err, "Ebay_train.txt")


@given(header=st.sampled_from(["fname, coarse_id, middle_id, fine_id"] * 3 + ["fname, coarse_id, middle_id, fine_id0.jpg, 1, 2, 3", "fname"]),
       body=st.lists(st.one_of(line(", "), *[st.tuples(ID_TOKENS, ID_TOKENS, ID_TOKENS).map(
           lambda t: f"a.jpg, {t[0]}, {t[1]}, {t[2]}")] * 3), min_size=1, max_size=4))
@FAST
def test_dyml_loader_on_malformed_files(header, body):
    from hapkit.data import dyml

    with tmp_root() as root, _patch_all([dyml]):
        ann = root / "dyml_vehicle" / "train" / "label.csv"
        ann.parent.mkdir(parents=True)
        ann.write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
        try:
            with works_or_hapkit_error():
                dyml.load(root, "train")
        except HapkitError as err:
            check_annotation_error(err, "label.csv")


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
)
TAXON = ["name", "genus", "family", "order", "class", "phylum", "kingdom"]


@given(
    lines=st.lists(st.one_of(line("/"), *[st.tuples(TOKENS, ID_TOKENS).map(lambda t: f"train_val2018/{t[0]}/{t[1]}/a.jpg")] * 3),
                   min_size=1, max_size=4),
    categories=st.one_of(
        JSON_VALUES,
        st.lists(st.fixed_dictionaries({"id": st.one_of(st.integers(-2, 2**64), st.text(max_size=3), st.none()),
                                        **{k: st.one_of(st.text(max_size=3), st.integers(0, 3)) for k in TAXON}}),
                 max_size=3),
    ),
    hierarchy=st.sampled_from(["base", "full"]),
)
@FAST
def test_inaturalist_loader_on_malformed_files(lines, categories, hierarchy):
    import json

    from hapkit.data import inaturalist

    with tmp_root() as root, _patch_all([inaturalist]):
        base = root / inaturalist.SUBDIR
        (base / "Inat_dataset_splits").mkdir(parents=True)
        (base / "Inat_dataset_splits" / "Inaturalist_train_set1.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (base / "train2018.json").write_text(json.dumps({"categories": categories}))
        try:
            with works_or_hapkit_error():
                inaturalist.load(root, "train", hierarchy=hierarchy)
        except HapkitError as err:
            check_annotation_error(err, "Inaturalist_train_set1.txt", "train2018.json")


def id_lines(value):
    return st.lists(st.one_of(line(" "), *[st.tuples(st.integers(1, 3), value).map(lambda t: f"{t[0]} {t[1]}")] * 3), min_size=1, max_size=3)


@given(images=id_lines(st.just("a.jpg")), image_class=id_lines(ID_TOKENS),
       classes=id_lines(st.just("001.Black_footed_Albatross")), hierarchy=st.booleans())
@FAST
def test_cub_loader_on_malformed_files(images, image_class, classes, hierarchy):
    from hapkit.data import cub

    with tmp_root() as root, _patch_all([cub]):
        base = root / cub.SUBDIR
        base.mkdir()
        for name, rows in (("images.txt", images), ("image_class_labels.txt", image_class), ("classes.txt", classes)):
            (base / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
        try:
            with works_or_hapkit_error():
                cub.load(root, "train", hierarchy=hierarchy)
        except HapkitError as err:
            check_annotation_error(err, "images.txt", "image_class_labels.txt", "classes.txt")


# ----------------------------------------------------------------------------------------------
# Recipes

RECIPE = Path(__file__).resolve().parents[1] / "hapkit" / "training" / "recipes" / "happier_generated.yaml"
YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=5), st.sampled_from(["[", "{a: 1", "!!python/tuple [1]", "*x", "&a b"]))
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=4), st.integers()), inner, max_size=3)),
    max_leaves=5)


@st.composite
def malformed_recipe(draw):
    """The text of a real recipe with one section or key replaced, dropped or garbled."""
    data = yaml.safe_load(RECIPE.read_text())
    data.pop("extends", None)
    how = draw(st.sampled_from(["value", "value", "section", "drop", "text", "extends"]))
    if how == "text":
        text = RECIPE.read_text()
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from(["\t", ": [", "\n  - x", "{", "%", "\n!!", "\x00", "'"])) + text[at:]
    section = draw(st.sampled_from(sorted(data)))
    if how == "section":
        data[section] = draw(YAML_VALUES)
    elif how == "drop":
        del data[section]
    elif how == "extends":
        data["extends"] = draw(st.one_of(YAML_VALUES, st.sampled_from(["happier_generated", "nope.yaml", "x"])))
    elif isinstance(data[section], dict) and data[section]:
        key = draw(st.sampled_from(sorted(data[section], key=str)))
        data[section][key] = draw(YAML_VALUES)
    else:
        data[section] = draw(YAML_VALUES)
    return yaml.safe_dump(data, allow_unicode=True)


@given(text=malformed_recipe())
@FAST
def test_load_recipe_on_malformed_yaml(text):
    from hapkit.training.recipes import load_recipe

    with tmp_root() as root:
        path = root / "broken.yaml"
        path.write_text(text, encoding="utf-8")
        with works_or_hapkit_error():
            load_recipe(str(path))


OVERRIDE_KEYS = st.sampled_from(["optim.lr", "train.epochs", "loss.name", "loss.kwargs.alpha", "data", "optim",
                                 "nope", "data.batch_size", "optim.backbone.lr", "", ".", "a..b", "loss.kwargs"])


OVERRIDES = st.one_of(
    st.lists(st.one_of(st.tuples(OVERRIDE_KEYS, st.text(max_size=6)).map("=".join), st.text(max_size=8)), max_size=3),
    st.dictionaries(OVERRIDE_KEYS, YAML_VALUES, max_size=3),
)


@given(overrides=OVERRIDES)
@FAST
def test_apply_overrides_on_malformed_overrides(overrides):
    from hapkit.training.config import apply_overrides
    from hapkit.training.recipes import load_recipe

    cfg = load_recipe(str(RECIPE))
    with works_or_hapkit_error():
        apply_overrides(cfg, overrides)


@given(overrides=st.one_of(OVERRIDES, YAML_VALUES))
@FEW
def test_load_recipe_with_malformed_overrides(overrides):
    from hapkit.training.recipes import load_recipe

    with works_or_hapkit_error():
        load_recipe(str(RECIPE), overrides=overrides)


# ----------------------------------------------------------------------------------------------
# The cases found by the properties above, kept as plain examples


def test_labels_refuse_negative_ids_naming_the_fix():
    with pytest.raises(LabelError, match=r"labels contains 2 negative value\(s\).*np.unique"):
        evaluate(torch.randn(4, 3), torch.tensor([0, -1, 0, -1]), progress=False)


def test_evaluate_and_streaming_metrics_take_outputs_that_require_grad():
    from hapkit.evaluate import RetrievalMetrics

    emb, lab = batch()
    x = emb.clone().requires_grad_(True)
    assert evaluate(x, lab, progress=False).summary == evaluate(emb, lab, progress=False).summary
    metric = RetrievalMetrics(metrics=["AP"])
    metric.update(x, lab)
    assert metric.compute()["AP@0"] == evaluate(emb, lab, metrics=["AP"], progress=False)["AP@0"]


def test_setting_check_finite_reaches_the_parts_of_a_loss():
    loss = losses.HAPPIER(num_classes=B, embedding_size=D)
    loss.check_finite = False
    assert not any(m.check_finite for m in loss.modules() if isinstance(m, HapkitLoss))


def test_recipe_yaml_error_is_one_line_with_its_position():
    from hapkit.training.config import ConfigError
    from hapkit.training.recipes import load_recipe

    with tmp_root() as root:
        path = root / "broken.yaml"
        path.write_text("name: x\n\tseed: 1\n")
        with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML: line 2, column 1: [^\n]*'\\t'") as err:
            load_recipe(str(path))
        assert "\n" not in str(err.value)
