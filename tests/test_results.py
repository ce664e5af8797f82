"""The metrics.json schema and the tables built from it."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from hapkit.evaluate import evaluate
from hapkit.results import (
    collect_runs,
    format_markdown,
    headline_metrics,
    metrics_frame,
    metrics_table,
    published_table,
    read_metrics,
    summarize,
    write_metrics,
)
from test_viz_embedding import blobs


def test_headline_metrics_prefers_overall_and_orders_levels():
    m = {"test/R@1@0": 0.5, "test/AP@1": 0.2, "test/AP@0": 0.3, "test/H-AP": 0.4, "test/P@1@0": 0.5}
    assert headline_metrics(m) == {"R@1": 0.5, "AP@0": 0.3, "AP@1": 0.2, "H-AP": 0.4}
    dyml = {"fine/AP@0": 0.3, "coarse/AP@0": 0.5, "overall/AP@0": 0.4, "overall/R@1@0": 0.6}
    assert headline_metrics(dyml) == {"R@1": 0.6, "AP@0": 0.4}
    assert headline_metrics({}) == {}


def test_metrics_frame_names_levels_and_sets():
    frame = metrics_frame({"a/AP@0": 0.5, "a/H-AP": 0.25, "b/AP@0": 0.125}, ["species", "genus"])
    assert frame.loc["AP@species", "a"] == 50.0 and frame.loc["AP@species", "b"] == 12.5
    assert frame.loc["H-AP", "a"] == 25.0 and math.isnan(frame.loc["H-AP", "b"])


def test_summary_mean_std_and_markdown():
    runs = pd.DataFrame([
        {"method": "happier", "dataset": "sop", "seed": s, "R@1": 0.80 + 0.01 * s, "AP@0": 0.5, "H-AP": 0.6,
         "duration_s": 10.0, "level_names": ["product", "category"], "reported": {"test/R@1@0": 81.0},
         "metric:test/R@1@0": 0.80 + 0.01 * s}
        for s in range(3)
    ] + [{"method": "supap", "dataset": "sop", "seed": 0, "R@1": 0.79, "AP@0": 0.55, "H-AP": 0.5,
          "duration_s": 12.0, "level_names": ["product", "category"], "reported": {}}])
    s = summarize(runs).set_index("method")
    assert s.loc["happier", "seeds"] == 3
    assert s.loc["happier", "R@1"] == pytest.approx(81.0)
    assert s.loc["happier", "R@1 std"] == pytest.approx(1.0)  # sample std of 80, 81, 82
    assert math.isnan(s.loc["supap", "R@1 std"])
    assert s.loc["happier", "paper"] == "test/R@1@0 81"
    assert s.loc["happier", "command"] == "hapkit reproduce --methods happier --datasets sop --data-root data --seeds 3"
    assert s.loc["supap", "command"] == "hapkit reproduce --methods supap --datasets sop --data-root data"
    md = format_markdown(summarize(runs))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    assert rows[0] == ["method", "dataset", "seeds", "R@1", "AP@0", "H-AP", "paper"]
    assert set(rows[1][3:6]) == {"---:"} or all(c.endswith(":") for c in rows[1][2:6])  # numbers right-aligned
    assert rows[2] == ["happier", "sop", "3", "81.00 ± 1.00", "50.00 ± 0.00", "60.00 ± 0.00", "test/R@1@0 81"]
    assert rows[3] == ["supap", "sop", "1", "79.00", "55.00", "50.00", ""]
    assert "Levels of sop: product / category." in md
    assert format_markdown(summarize(runs.iloc[:0])) == "(no complete run)"
    published = published_table(runs)
    assert published.to_dict("records") == [{"method": "happier", "dataset": "sop", "metric": "test/R@1@0",
                                             "paper": 81.0, "measured": pytest.approx(81.0), "std": pytest.approx(1.0),
                                             "seeds": 3}]
    md = format_markdown(summarize(runs), published)
    assert "| happier  | sop       | test/R@1@0 |    81.0 | 81.00 ± 1.00 |       3 |" in md


def test_compare_methods_subtracts_the_baseline_row():
    from hapkit.results import compare_methods

    runs = pd.DataFrame([{"method": m, "dataset": "generated", "seed": 0, "H-AP": h, "AP@0": a, "duration_s": 1.0,
                          "level_names": None, "reported": {}} for m, h, a in (("happier", 0.6, 0.8), ("supap", 0.5, 0.82))])
    gap = compare_methods(summarize(runs), "happier", "supap", dataset="generated")
    assert gap["H-AP"] == pytest.approx(10.0) and gap["AP@0"] == pytest.approx(-2.0)
    with pytest.raises(KeyError, match="hpl/generated"):
        compare_methods(summarize(runs), "hpl", "supap", dataset="generated")


def test_reproduce_command_names_the_grid_of_a_row():
    from hapkit.results import reproduce_command

    assert reproduce_command("happier", "generated") == "hapkit reproduce --methods happier --datasets generated"
    assert reproduce_command("hpl", "generated", seeds=3, epochs=10) == (
        "hapkit reproduce --methods hpl --datasets generated --seeds 3 --epochs 10")
    runs = pd.DataFrame([{"method": "hpl", "dataset": "generated", "seed": s, "recipe": "hpl_generated", "epochs": 10,
                          "H-AP": 0.5, "duration_s": 1.0, "level_names": None, "reported": {}} for s in range(2)])
    row = summarize(runs).iloc[0]
    assert (row["recipe"], row["epochs"]) == ("hpl_generated", 10)
    assert row["command"] == "hapkit reproduce --methods hpl --datasets generated --seeds 2 --epochs 10"


def test_metrics_table_and_write_metrics(tmp_path):
    x, labels = blobs(n_per=6, k=4)
    labels = np.stack([labels, labels // 2], 1)
    a = evaluate(x, labels, progress=False)
    b = evaluate(np.roll(x, 1, axis=0), labels, progress=False)
    table = metrics_table({"good": a, "shuffled": b.summary}, ["fine", "coarse"])
    assert table.columns.tolist() == ["good", "shuffled"]
    assert table.index.tolist() == ["H-AP", "ASI", "NDCG", "AP@fine", "AP@coarse", "R@1@fine", "R@1@coarse"]
    assert table.loc["AP@coarse", "good"] == round(100 * a.summary["AP@1"], 2)
    assert table.loc["H-AP", "shuffled"] == round(100 * b.summary["H-AP"], 2)
    with pytest.raises(ValueError, match="no metric matches"):
        metrics_table({"good": a}, metrics=["recall"])



def test_write_metrics_schema_round_trip_and_errors(tmp_path):
    table = pd.DataFrame({"loss": ["a", "b"], "gap": [np.float32(0.25), 0.5]})
    path = write_metrics(tmp_path / "out", {"good/H-AP": np.float64(0.5), "n": 3}, tables={"gaps": table},
                         seed=np.int64(3), run=tmp_path, levels=("fine", "coarse"))
    data = json.loads(path.read_text())
    assert data == {"schema": 1, "seed": 3, "run": str(tmp_path), "levels": ["fine", "coarse"],
                    "metrics": {"good/H-AP": 0.5, "n": 3.0},
                    "tables": {"gaps": [{"loss": "a", "gap": 0.25}, {"loss": "b", "gap": 0.5}]}}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left
    assert read_metrics(path.parent) == data == read_metrics(path)
    with pytest.raises(TypeError, match="tables="):
        write_metrics(tmp_path, {"rows": [1, 2]})
    with pytest.raises(ValueError, match="schema"):
        write_metrics(tmp_path, {}, schema=2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_metrics(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="no 'metrics'"):
        read_metrics(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "nowhere")


def test_collect_runs_reads_metrics_files_without_papermill(tmp_path):
    for seed in (0, 1):
        write_metrics(tmp_path / "runs" / "happier_generated" / f"seed{seed}",
                      {"test/R@1@0": 0.5 + 0.1 * seed, "test/AP@0": 0.25}, method="happier", dataset="generated",
                      seed=seed, level_names=["a", "b"], train_time_s=2.0)
    runs = collect_runs(tmp_path)
    assert runs["seed"].tolist() == [0, 1] and runs["R@1"].tolist() == [0.5, 0.6]
    assert runs["duration_s"].tolist() == [2.0, 2.0] and runs["metric:test/AP@0"].tolist() == [0.25, 0.25]


def test_organisation_and_failure_tables_name_levels_and_models():
    from hapkit.results import failure_table, organisation_table

    metrics = {
        "HAPPIER": {"kNN@8@0": 0.5, "kNN@8@1": 0.75, "AP@0": 0.4, "AP@1": 0.6,
                    "top1 wrong": 0.25, "top1 wrong#0": 0.05, "top1 wrong#1": 0.2},
        "SupAP": {"kNN@8@0": 0.5, "kNN@8@1": 0.5, "AP@0": 0.45, "AP@1": 0.3,
                  "top1 wrong": 0.3, "top1 wrong#0": 0.25, "top1 wrong#1": 0.05},
    }
    org = organisation_table(metrics, ["variant", "family"], k=8)
    assert list(org.index) == ["variant", "family"]
    assert list(org.columns) == ["kNN@8 HAPPIER", "kNN@8 SupAP", "AP HAPPIER", "AP SupAP"]
    assert org.loc["family", "kNN@8 HAPPIER"] == 75.0 and org.loc["variant", "AP SupAP"] == 45.0
    fails = failure_table(metrics, ["variant", "family"])
    assert list(fails.index) == ["shares 0 levels (not even the family)", "shares 1 level (same family, other variant)",
                                 "top-1 wrong (all)"]
    assert fails["SupAP"].tolist() == [25.0, 5.0, 30.0]
    assert fails.iloc[:-1].sum().tolist() == pytest.approx(fails.iloc[-1].tolist())  # the severities add up


def test_check_claims_prints_every_claim_and_fails_on_those_that_do_not_hold(capsys):
    from hapkit.results import ClaimNotMet, check_claims

    assert check_claims({"a above b": True, "c within 3": 1 > 0}) == {"a above b": True, "c within 3": True}
    assert capsys.readouterr().out == "a above b: True\nc within 3: True\n"
    with pytest.raises(ClaimNotMet, match="c within 3") as err:
        check_claims({"a above b": True, "c within 3": False})
    assert "a above b" not in str(err.value)
    assert capsys.readouterr().out.splitlines() == ["a above b: True", "c within 3: False"]
    with pytest.raises(ValueError):
        check_claims({})
