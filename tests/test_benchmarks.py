from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import available, main
from benchmarks._harness import Report, Row, compare


def test_compare_median_of_ratios():
    calls = []
    rows = compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1, threads=1)
    assert calls == ["a", "b"] * 4  # interleaved, warm-up included once
    assert [r.name for r in rows] == ["a", "b"] and rows[0].ratio == 1.0
    with pytest.raises(ValueError, match="`baseline`"):
        compare({"a": lambda: None}, baseline="x")


def test_markdown_has_no_empty_median_column():
    ratios_only = Report("t", [Row("a", ratio=1.0, extra={"acc": 0.5}), Row("b", ratio=0.5, extra={"acc": 0.25})])
    assert ratios_only.to_markdown().splitlines()[2] == "| variant | time / baseline | acc |"
    timed = Report("t", [Row("a", median_s=0.002, ratio=1.0), Row("b", ratio=0.5)])
    lines = timed.to_markdown().splitlines()
    assert lines[2] == "| variant | median (ms) | time / baseline |" and lines[4] == "| a | 2.00 | 1.000 |"
    assert lines[5] == "| b |  | 0.500 |"


def test_demo_models_benchmark_smoke(tmp_path, capsys):
    assert "demo_models" in available()
    assert main(["demo_models", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| variant |" in out
    data = json.loads((tmp_path / "demo_models.json").read_text())
    assert len(data["rows"]) == 8 and all(r["ratio"] > 0 for r in data["rows"])


def test_fast_inference_benchmark_smoke(tmp_path):
    assert main(["fast_inference", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "fast_inference.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert any("torchao int8 exported" in n for n in names) and all(r["ratio"] > 0 for r in data["rows"])
    assert all(r["extra"]["stored bytes / float"] < 0.5 for r in data["rows"] if "int8" in r["name"])


def test_int4_cpu_benchmark_smoke(tmp_path):
    assert main(["int4_cpu", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "int4_cpu.json").read_text())["rows"]
    assert {r["extra"]["batch"] for r in rows} == {1, 8} and all(r["ratio"] > 0 for r in rows)
    assert all(r["extra"]["stored bytes / float"] < 0.5 for r in rows if "float" not in r["name"])


def test_distillation_benchmark_smoke(tmp_path):
    assert "distillation" in available()
    assert main(["distillation", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "distillation.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert len(names) == 4 and sum(n.endswith("KnowledgeDistillation()") for n in names) == 2
    assert all(r["ratio"] > 0 for r in data["rows"]) and all("recovered" in r["extra"] for r in data["rows"])


def test_qat_benchmark_smoke(tmp_path):
    assert "qat" in available()
    assert main(["qat", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "qat.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert sum("float" in n for n in names) == 2 and any("PTQ" in n for n in names) and any("QAT" in n for n in names)
    assert all(-100 <= r["ratio"] <= 100 for r in data["rows"])


def test_results_table_smoke(tmp_path):
    """`python -m benchmarks all` (quick): the baseline and the pipeline trained, exported and timed side by side, and
    RESULTS.md written with the command that reproduces it."""
    assert main(["all", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "pipeline.json").read_text())["rows"]
    assert [r["name"].split(":")[0] for r in rows] == ["cnn", "cnn"]
    base, pipe = rows
    assert base["ratio"] == 1.0 and base["extra"]["smaller (bytes)"] == 1.0
    assert pipe["extra"]["smaller (bytes)"] > 4  # pruned to a quarter of the channels, then int8
    assert pipe["extra"]["faster b=256 (exported)"] > 0 and pipe["ratio"] > 0
    assert "python -m benchmarks all" in (tmp_path / "RESULTS.md").read_text()


def test_options_reach_only_the_benchmarks_that_take_them(capsys):
    with pytest.raises(SystemExit):
        main(["demo_models", "--quick", "--models", "cnn"])
    assert "takes no --models" in capsys.readouterr().err


def test_deploy_benchmark_checks_its_arguments():
    from benchmarks import bench_deploy

    with pytest.raises(ValueError, match="`models` must be a non-empty list of 'cnn', 'transformer', 'minilm'; got \\['resnet'\\]"):
        bench_deploy.run(models=["resnet"])
    with pytest.raises(ValueError, match="`rounds` must be a positive int; got 0"):
        bench_deploy.run(models=["cnn"], rounds=0)
