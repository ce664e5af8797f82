"""Peak memory and time of training steps measured in fresh processes; the multi-stage gradient."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hapkit.training import footprint
from hapkit.training.config import ConfigError
from hapkit.training.footprint import (
    FootprintError,
    StepFootprint,
    SyntheticImages,
    measure_step,
    measure_steps,
    multistage_gradient_difference,
)

# A tiny network and batch: each measuring process spends its time importing torch, not training.
TINY = ["model.width=4", "model.embedding_size=8", "data.samples_per_class=4"]


def test_a_step_is_measured_in_its_own_process_with_sane_numbers():
    table = measure_steps([(32, None), (32, 8)], steps=2, overrides=TINY, threads=1, progress=False)
    assert list(table["batch_size"]) == [32, 32]
    assert table["sub_batch"].isna().tolist() == [True, False] and int(table["sub_batch"][1]) == 8
    for _, row in table.iterrows():
        assert row["note"] == ""
        assert 50 < row["before_mb"] <= row["peak_mb"] < 100_000  # a python process with torch loaded
        assert row["step_mb"] == pytest.approx(row["peak_mb"] - row["before_mb"])
        assert 0 < row["ms_per_image"] < 10_000


def test_a_failed_measurement_is_an_error_or_a_recorded_row():
    with pytest.raises(FootprintError, match="no result within"):
        measure_step(batch_size=32, sub_batch=8, steps=1, overrides=TINY, timeout=0.01)
    table = measure_steps([(32, 8)], steps=1, overrides=TINY, timeout=0.01, errors="record", progress=False)
    assert table["peak_mb"].isna().all() and table["note"][0].startswith("failed: ")
    with pytest.raises(ValueError, match="errors"):
        measure_steps([(32, 8)], errors="ignore")


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=1), "batch_size must be an integer >= 2"),
    (dict(batch_size=64.0), "batch_size must be an integer"),
    (dict(sub_batch=0), "sub_batch must be None"),
    (dict(batch_size=32, sub_batch=64), "between 1 and batch_size=32"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(device="tpu"), "device must be cpu or cuda"),
    (dict(threads=0), "threads"),
])
def test_bad_arguments_are_refused_before_any_process_starts(kwargs, message, monkeypatch):
    def no_process(*args, **kw):
        raise AssertionError("a process was started")

    monkeypatch.setattr(footprint.subprocess, "run", no_process)
    with pytest.raises(ValueError, match=message):
        measure_step(**kwargs)


def test_recipes_that_cannot_make_the_batch_are_refused_before_any_process_starts(monkeypatch):
    monkeypatch.setattr(footprint.subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ConfigError, match="no_such_recipe"):
        measure_step("no_such_recipe")
    with pytest.raises(ConfigError, match="not divisible"):  # 30 images are not classes of 4
        measure_step(batch_size=30, overrides=TINY)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            measure_step(device="cuda")


def test_footprint_recipe_and_synthetic_images():
    cfg = footprint.footprint_recipe("listwise_ap_generated_large", 64, 16, overrides=TINY)
    assert (cfg.data.batch_size, cfg.train.sub_batch, cfg.data.sampler) == (64, 16, "m_per_class")
    assert (cfg.eval.every, cfg.eval.at_end, cfg.train.device) == (0, False, "cpu")
    assert footprint.footprint_recipe("listwise_ap_generated_large", 64, None).train.sub_batch is None
    data = SyntheticImages(48, size=8, per_class=4)
    assert data.labels.shape == (48, 3) and data.labels[:, 0].max() == 11
    assert np.array_equal(data.labels[:, 1], data.labels[:, 0] // 4)
    image, labels = data[5]
    assert image.shape == (3, 8, 8) and torch.equal(image, data[5][0]) and not torch.equal(image, data[6][0])
    assert labels.tolist() == [1, 0, 0]


def test_step_footprint_step_share():
    fp = StepFootprint("r", 256, 64, 2, "cpu", peak_mb=900.0, before_mb=700.0, ms_per_image=1.5)
    assert fp.step_mb == 200.0 and fp.as_dict()["step_mb"] == 200.0 and fp.as_dict()["sub_batch"] == 64


def test_the_multistage_gradient_equals_the_plain_one_with_frozen_batch_norm():
    frozen = multistage_gradient_difference(batch_size=32, sub_batch=8, overrides=[*TINY, "model.freeze_batchnorm=true"])
    assert frozen["max_abs_gradient"] > 0
    assert frozen["max_abs_difference"] < 1e-5 * max(1.0, frozen["max_abs_gradient"])
    assert frozen["loss_plain"] == pytest.approx(frozen["loss_multistage"], abs=1e-6)
    # trainable batch-norm normalises each sub-batch by its own statistics: another gradient
    ghost = multistage_gradient_difference(batch_size=32, sub_batch=8, overrides=TINY)
    assert ghost["max_abs_difference"] > 1e-4 * ghost["max_abs_gradient"]
    with pytest.raises(ValueError, match="sub_batch must be an integer"):
        multistage_gradient_difference(sub_batch=None)


def test_the_benchmark_measures_through_the_library(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_large_batch.py"
    spec = importlib.util.spec_from_file_location("bench_large_batch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def fake(recipe, batch_size, sub_batch, steps, overrides, device, threads):
        calls.append((batch_size, sub_batch))
        if sub_batch is None and batch_size > 256:
            raise FootprintError("killed (out of memory?)")
        return StepFootprint(recipe, batch_size, sub_batch, steps, device, 1000.0 + batch_size / 8, 800.0, 2.0)

    monkeypatch.setattr(bench, "measure_step", fake)
    rows = bench.run([256, 1024, 4096], sub_batch=128, plain_max=1024)
    assert calls == [(256, 128), (256, None), (1024, 128), (1024, None), (4096, 128)]
    assert rows[3]["note"].startswith("failed") and rows[5]["note"].startswith("skipped")
    assert rows[0] == {"batch": 256, "sub_batch": 128, "ms_per_image": 2.0, "peak_mb": 1032.0}


def test_a_child_process_reports_its_own_peak_not_its_parents():
    """Linux carries ru_maxrss over fork and exec: a child of a large process must not inherit it."""
    import subprocess
    import sys

    ballast = np.ones(600 * 2**20 // 8)  # 600 MB of touched pages in this process
    parent = footprint._peak_resident_mb()
    code = "from hapkit.training.footprint import _peak_resident_mb; print(_peak_resident_mb())"
    root = str(Path(__file__).resolve().parents[1])
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=root).stdout)
    assert ballast.sum() > 0 and 0 < child < parent - 300
