"""The GPU check's parts that run without a GPU: its arguments, its refusal, its table, and each
section on the CPU at a tiny size (a mistake in a section fails here, not on the first GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.json == "gpu_check.json" and args.only == list(gpu_check.SECTIONS) and args.steps == 30
    args = gpu_check.parse_args(["--only", "evaluate", "gpu_items", "--json", "x.json",
                                 "--listwise-recipe", "listwise_ap_generated_large"])
    assert args.only == ["evaluate", "gpu_items"] and args.json == "x.json"
    for bad in (["--only", "nonsense"], ["--steps", "3"], ["--listwise-recipe", "happier_sop"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    assert sum(gpu_check.LIMITS.values()) + 30 <= 8 * 60  # the sections' limits fit the 8 minutes


def test_without_cuda_it_refuses_in_one_line(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "CUDA" in proc.stderr
    assert not (tmp_path / "r.json").exists() and proc.stdout == ""


def test_table_from_results():
    table = gpu_check.format_table({
        "device": "a GPU",
        "train_step": {"status": "ok", "ratio": 0.9512345, "ok": True, "sync_sites": {"rank.py:200": 25}},
        "evaluate": {"status": "ok", "ok": False, "max_abs_difference": 3e-5},
        "ddp": {"status": "timeout", "error": "no result within 50 s"},
    })
    lines = table.splitlines()
    assert lines[0] == "== train_step: ok" and "== evaluate: CHECK FAILED" in lines and "== ddp: timeout" in lines
    assert any(line.split() == ["ratio", "0.9512"] for line in lines)
    assert any("rank.py:200=25" in line for line in lines)
    assert "a GPU" not in table  # only the sections' dicts become blocks


def test_a_failing_section_is_reported_and_the_next_one_runs(monkeypatch):
    calls = []

    def fake_run(cmd, input, **kw):
        job = json.loads(input)
        calls.append(job["section"])
        if job["section"] == "evaluate":
            raise subprocess.TimeoutExpired(cmd, 1)
        return subprocess.CompletedProcess(cmd, 0 if job["section"] == "gpu_items" else 1,
                                           stdout='{"ok": true}\n' if job["section"] == "gpu_items" else "",
                                           stderr="Traceback\nRuntimeError: CUDA out of memory")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    assert gpu_check.run_section("evaluate", 1)["status"] == "timeout"
    failed = gpu_check.run_section("train_step", 1)
    assert failed["status"] == "failed" and "out of memory" in failed["error"]
    assert gpu_check.run_section("gpu_items", 1) == {"status": "ok", "wall_s": pytest.approx(0, abs=1), "ok": True}
    assert calls == ["evaluate", "train_step", "gpu_items"]


def test_train_step_section_on_cpu():
    # happier_sop's ResNet-50 takes minutes on a CPU: the same code with the generated recipe's small CNN
    res = gpu_check.section_train_step(device="cpu", recipe="happier_generated", batch_size=16, steps=3, warmup=1,
                                       size=16, workers=0, overrides=["model.width=4", "data.samples_per_class=4"])
    assert res["engine_images_per_s"] > 0 and res["bare_images_per_s"] > 0 and res["timed_steps"] == 2
    assert res["syncs_per_step"] is None and res["peak_mb"] is None  # counted on CUDA only


def test_evaluate_section_on_cpu():
    res = gpu_check.section_evaluate(device="cpu", n=400, dim=16, deep_levels=4)
    assert res["ok"] and res["same_metrics"] and res["max_abs_difference"] == 0.0
    assert res["levels_4_metrics"] > 0 and res["levels_4_chunk_size"] >= 1


def test_listwise_section_assembles_its_measures(monkeypatch):
    from hapkit.training import footprint

    seen = []

    def fake_measure(recipe, batch_size, sub_batch, steps, overrides, device, timeout):
        seen.append((recipe, batch_size, sub_batch, tuple(overrides), device))
        return footprint.StepFootprint(recipe, batch_size, sub_batch, steps, device, batch_size / 8 + 100, 100.0, 1.5)

    monkeypatch.setattr(footprint, "measure_step", fake_measure)
    res = gpu_check.section_listwise_memory(device="cpu")
    assert [s[1] for s in seen] == [256, 4096] and all(s[2] == 128 and "model.pretrained=false" in s[3] for s in seen)
    assert res["peak_mb_256"] == 132.0 and res["peak_mb_4096"] == 612.0 and res["batch_ratio"] == 16


def test_gpu_items_report_each_failure_on_their_own():
    res = gpu_check.section_gpu_items(device="cpu")  # no CUDA here: each item fails alone, none raises
    assert set(res) == {"ok", "cuda_labels", "bf16_embedding", "chunk_size", "amp_auto", "resumed_adam"}
    assert res["ok"] is False
    assert res["resumed_adam"]["ok"] is True  # on the CPU the counters are on the host either way


def test_ddp_section_skips_with_fewer_than_two_gpus():
    if torch.cuda.device_count() >= 2:
        pytest.skip("two GPUs here: the section runs for real")
    assert "skipped" in gpu_check.section_ddp()
