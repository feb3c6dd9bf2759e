"""One tiny run of the quantization benchmark, so it keeps working (the real figures come from the full run)."""

from __future__ import annotations

import json

from benchmarks.__main__ import available, main


def test_quantization_benchmark_quick(tmp_path, capsys):
    assert {"quantization", "quantization_finetune", "optimizer8bit"} <= set(available())
    assert main(["quantization", "--quick", "--out", str(tmp_path)]) == 0
    assert "| variant |" in capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads((tmp_path / "quantization.json").read_text())["rows"]}
    bits = {name: r["extra"]["bits/weight"] for name, r in rows.items() if "bits/weight" in r["extra"]}
    assert 4.0 < bits["DigitsTransformer(dim=32) nf4 + double quant (compute auto)"] < 4.2
    assert 4.4 < bits["DigitsTransformer(dim=32) nf4 (compute auto)"] <= 4.5
    assert 8.0 < bits["DigitsTransformer(dim=32) int8 (compute auto)"] < 9.0  # 32 inputs per row scale here
    assert all(r["ratio"] > 0 for r in rows.values() if r["median_s"] is not None)
