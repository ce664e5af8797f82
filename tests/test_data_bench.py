"""The data benchmark runs end to end at a tiny size (its figures are not checked)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data.py"


def test_bench_data_runs_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--batch-size", "16", "--batches", "2", "--workers", "0", "--repeats", "1",
                      "--images-per-class", "4", "--cache", str(tmp_path), "--learn-steps", "2"])
    assert out["model_images_per_s"] > 0 and out["loader"][0]["ratio"] > 0
    assert [row["steps"] for row in out["learn"]] == [0, 2]
    assert all(0 <= r <= 1 for row in out["learn"] for r in row["R@1"])
    assert "ratio loader/model" in capsys.readouterr().out
