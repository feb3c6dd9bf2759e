"""SensitivityAnalysis and its core, per-layer targets of the pruning callbacks, the accuracy guard."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_accel
from lightning_accel import (
    AccelerationReport,
    ScheduledPruning,
    SensitivityAnalysis,
    StructuredPruning,
    analyze_sensitivity,
    prune_,
    recommend_allocation,
)
from tests.helpers import RandomDataModule, TinyConvNet, TinyMLP, tiny_trainer
from tests.helpers.scripted import ScriptedMLP

ROOT = Path(__file__).resolve().parents[1]


def _trained_mlp() -> tuple[TinyMLP, RandomDataModule]:
    torch.manual_seed(0)
    dm = RandomDataModule(n=96, batch_size=16)
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(dm.x), dm.y).backward()
        opt.step()
    return model, dm


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == y).float().mean()


# ---------------------------------------------------------------------------------------------- the core
def test_each_drop_is_the_layer_pruned_alone_and_the_model_is_restored():
    model, dm = _trained_mlp()
    before = copy.deepcopy(model.state_dict())
    model.train()
    res = analyze_sensitivity(model, dm.val_dataloader(), _accuracy, amounts=[0.5, 0.9], folds=3, prune_head=True)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(res["layers"]) == ["fc1", "fc2", "head"] and res["layers"]["fc1"]["params"] == 16 * 32
    batches = list(dm.val_dataloader())
    folds = [batches[k::3] for k in range(3)]

    def fold_acc(m: nn.Module, fold: list) -> float:
        m.eval()
        with torch.no_grad():
            return sum(float(_accuracy(m(x), y)) * len(y) for x, y in fold) / sum(len(y) for _, y in fold)

    base = [fold_acc(model, f) for f in folds]
    assert res["baseline"]["folds"] == pytest.approx(base)
    for layer in ("fc2", "head"):
        pruned = copy.deepcopy(model)
        prune_(pruned, 0.9, scope="layer", modules=[layer], prune_head=True)
        drops = [b - fold_acc(pruned, f) for b, f in zip(base, folds)]
        entry = res["layers"][layer]["prune"]["0.9"]
        assert entry["folds"] == pytest.approx(drops)
        assert entry["mean"] == pytest.approx(sum(drops) / 3) and entry["std"] == pytest.approx(torch.tensor(drops).std(unbiased=False).item())
    assert res["layers"]["head"]["prune"]["0.9"]["mean"] > 0.05  # the head (4 x 32) at 90% does hurt


def test_recommendation_is_the_best_allocation_within_the_budget():
    layers = {
        "a": {"params": 100, "prune": {"0.5": {"mean": 0.0}, "0.9": {"mean": -0.01}}, "quant": {}},  # noise below 0
        "b": {"params": 1000, "prune": {"0.5": {"mean": 0.004}, "0.9": {"mean": 0.05}}, "quant": {}},
        "c": {"params": 1000, "prune": {"0.5": {"mean": 0.03}, "0.9": {"mean": 0.02}}, "quant": {}},  # not monotone
    }
    result = {"amounts": [0.5, 0.9], "bits": [], "layers": layers}
    rec = recommend_allocation(result, max_metric_drop=0.01)
    assert rec["layer_amounts"] == {"a": 0.9, "b": 0.5, "c": 0.0}
    assert rec["predicted_drop"]["prune"] == pytest.approx(0.004) and rec["sparsity"] == pytest.approx(590 / 2100)
    rec = recommend_allocation(result, max_metric_drop=0.035)  # c at 90% counts as 0.03 (monotone), b at 50%
    assert rec["layer_amounts"] == {"a": 0.9, "b": 0.5, "c": 0.9}
    rec = recommend_allocation(result, sparsity=0.7)  # >= 1470 weights with the least drop
    assert rec["layer_amounts"] == {"a": 0.9, "b": 0.5, "c": 0.9} and rec["sparsity"] >= 0.7
    with pytest.raises(ValueError, match="give one of `max_metric_drop` and `sparsity`"):
        recommend_allocation(result)


def test_quantization_candidates_and_channel_groups_restore_the_model():
    pytest.importorskip("bitsandbytes")
    model, dm = _trained_mlp()
    before = copy.deepcopy(model.state_dict())
    res = analyze_sensitivity(model, dm.val_dataloader(), _accuracy, amounts=[0.5], bits=["int8", "nf4"], max_metric_drop=0.05)
    assert type(model.fc1) is nn.Linear and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(res["layers"]["fc1"]["quant"]) == {"int8", "nf4"}
    assert res["layers"]["fc1"]["quant"]["int8"]["mean"] < 0.05  # int8 of a trained layer costs (almost) nothing
    rec = res["recommendation"]
    assert set(rec["layer_bits"]) == {"fc1", "fc2"} and set(rec["measured_drop"]) == {"prune", "quant"}
    conv = TinyConvNet()
    before = copy.deepcopy(conv.state_dict())
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    res = analyze_sensitivity(conv, data, _accuracy, amounts=[0.5, 0.75], granularity="channels", folds=2, sparsity=0.5)
    assert list(res["layers"]) == ["conv1"] and res["layers"]["conv1"]["units"] == 8  # conv1 + conv2 share channels
    assert res["layers"]["conv1"]["removed"]["0.5"] > 0
    assert conv.conv1.weight.shape == (8, 1, 3, 3) and all(torch.equal(before[k], v) for k, v in conv.state_dict().items())


# ---------------------------------------------------------------------------------------------- the callback
def test_callback_measures_with_validation_step_and_writes_its_files(tmp_path, capsys):
    analysis = SensitivityAnalysis(amounts=[0.5, 0.95], folds=1, when="fit_end", max_metric_drop=0.02, prune_head=True)
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[analysis])
    trainer.fit(model, RandomDataModule())
    res = analysis.results
    validated = trainer.validate(model, RandomDataModule(), verbose=False)[0]["val_acc"]
    assert res["baseline"]["mean"] == pytest.approx(validated, abs=1e-6)  # the same number Lightning logs
    assert set(res["layers"]) == {"fc1", "fc2", "head"} and res["when"] == "fit_end"
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    assert saved["layers"].keys() == res["layers"].keys() and (tmp_path / "sensitivity.png").stat().st_size > 0
    assert "prune 95%" in capsys.readouterr().out
    assert res["recommendation"]["predicted_drop"]["prune"] <= 0.02 + 1e-9
    assert analysis.state_dict()["results"]["layers"].keys() == res["layers"].keys()
    assert "val_acc" in trainer.callback_metrics  # the analysis logged nothing of its own


def test_resumed_analysis_keeps_its_results_and_fails_on_unlogged_monitor(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make() -> SensitivityAnalysis:
        return SensitivityAnalysis(amounts=[0.5], when="fit_start", monitor="val_loss", monitor_mode="min", console=False,
                                   figure=False, max_metric_drop=None, sparsity=0.5)

    first, ckpt = make(), ModelCheckpoint(dirpath=tmp_path / "ckpts")
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[first, ckpt], enable_checkpointing=True).fit(
        TinyMLP(), RandomDataModule()
    )
    assert first.results["mode"] == "min" and first.results["recommendation"]["target_sparsity"] == 0.5
    again = make()
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[again, ModelCheckpoint(dirpath=tmp_path / "ckpts")],
                           enable_checkpointing=True)
    trainer.fit(TinyMLP(), RandomDataModule(), ckpt_path=ckpt.best_model_path)  # the trained weights: would measure otherwise
    assert trainer.global_step == 4 and again.results == first.results  # kept from the checkpoint, not measured again
    missing = SensitivityAnalysis(amounts=[0.5], when="fit_start", monitor="nope")
    with pytest.raises(ValueError, match=r"`monitor`='nope' is not logged by TinyMLP.validation_step; it logs \['val_acc', 'val_loss'\]"):
        tiny_trainer(tmp_path, max_epochs=1, callbacks=[missing]).fit(TinyMLP(), RandomDataModule())


def test_the_report_includes_the_analysis_and_the_guard(tmp_path):
    analysis = SensitivityAnalysis(amounts=[0.5], when="fit_end", console=False, figure=False)
    pruner = ScheduledPruning(amount=0.5, interval="epoch", monitor="val_acc", max_metric_drop=0.5, verbose=0)
    report = AccelerationReport(latency=False, figure=False, console=False)
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[report, pruner, analysis])  # the report listed first
    trainer.fit(TinyMLP(), RandomDataModule())
    techniques = json.loads((tmp_path / "report.json").read_text())["techniques"]
    assert [t["technique"] for t in techniques] == ["ScheduledPruning", "SensitivityAnalysis"]
    assert techniques[1]["json"] == str(tmp_path / "sensitivity.json") and techniques[1]["layers"] == 2
    assert techniques[0]["reached"] == pytest.approx(0.5, abs=0.01) and techniques[0]["guard"]["paused"] is False


# ---------------------------------------------------------------------------------------------- per-layer targets
def test_scheduled_pruning_follows_per_layer_targets_from_a_sensitivity_json(tmp_path):
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"layers": {}, "recommendation": {"layer_amounts": {"fc1": 0.9, "fc2": 0.3}}}))
    pruner = ScheduledPruning(amount=0.6, schedule="linear", interval="epoch", start=0, end=4, layer_amounts=str(path),
                              make_permanent=False, verbose=0)
    model = TinyMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[pruner])
    trainer.fit(model, RandomDataModule())  # the last event: t=2, half way
    sparsity = {k: float((~m).float().mean()) for k, m in pruner.masks.items()}
    assert sparsity == pytest.approx({"fc1.weight": 0.45, "fc2.weight": 0.15}, abs=2e-3)
    trainer.fit_loop.max_epochs = 4
    trainer.fit(model, RandomDataModule())
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.9, abs=2e-3)
    assert float((model.fc2.weight == 0).float().mean()) == pytest.approx(0.3, abs=2e-3)
    assert pruner.state_dict()["layer_amounts"] == {"fc1": 0.9, "fc2": 0.3}


def test_structured_pruning_follows_per_group_targets(tmp_path):
    pruner = StructuredPruning(amount=0.5, end=1, layer_amounts={"conv1": 0.75}, verbose=0)
    model = TinyConvNet()
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[pruner]).fit(model, RandomDataModule(shape=(1, 8, 8)))
    assert model.conv1.out_channels == 2 and model.conv2.out_channels == 2  # 8 -> 2 (75%), not 4 (50%)
    bad = StructuredPruning(amount=0.5, end=1, layer_amounts={"conv2": 0.75}, verbose=0)
    with pytest.raises(ValueError, match=r"`layer_amounts` names \['conv2'\], which are not prunable groups"):
        tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[bad]).fit(TinyConvNet(), RandomDataModule(shape=(1, 8, 8)))


# ---------------------------------------------------------------------------------------------- the guard
@pytest.mark.parametrize(
    ("script", "skipped", "pauses", "sparsity"),
    [
        ([1.0, 0.5, 0.5, 1.0, 1.0], 2, 1, 0.8),  # paused after epoch 1, resumed after epoch 3: reaches the end
        ([1.0, 0.5, 0.5, 0.5, 0.5], 3, 1, 0.2),  # never recovers: stays at the target of t=1
        ([1.0, 0.95, 0.92, 0.95, 0.95], 0, 0, 0.8),  # within the limit
    ],
)
def test_the_guard_pauses_the_schedule_until_the_metric_recovers(tmp_path, script, skipped, pauses, sparsity):
    pruner = ScheduledPruning(amount=0.8, schedule="linear", interval="epoch", start=0, end=4, monitor="val_score",
                              max_metric_drop=0.1, verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=5, limit_train_batches=2, callbacks=[pruner])
    trainer.fit(ScriptedMLP(script), RandomDataModule())
    guard = pruner.guard
    assert (guard["events_skipped"], guard["pauses"], guard["reference"]) == (skipped, pauses, 1.0)
    assert pruner.sparsity == pytest.approx(sparsity, abs=2e-3)
    assert pruner.state_dict()["guard"]["paused"] == (script[-1] < 0.9)


def test_misconfigurations_raise_with_the_argument_name(tmp_path):
    cases = [
        (lambda: SensitivityAnalysis(amounts=[0.5, 1.0]), r"`amounts` must be a number in \(0.0, 1.0\); got 1.0"),
        (lambda: SensitivityAnalysis(amounts=[]), r"`amounts` must be a non-empty list"),
        (lambda: SensitivityAnalysis(bits=["int4"]), r"`bits` must be one of 'int8', 'nf4', 'fp4'; got 'int4'"),
        (lambda: SensitivityAnalysis(folds=0), r"`folds` must be an integer >= 1; got 0"),
        (lambda: SensitivityAnalysis(when="setup"), r"`when` must be one of 'fit_start', 'fit_end'; got 'setup'"),
        (lambda: SensitivityAnalysis(sparsity=0.9), r"`sparsity`=0.9 and `max_metric_drop`=0.01 are two ways"),
        (lambda: SensitivityAnalysis(granularity="channels", bits=["int8"]), r"`granularity`='channels' analyses"),
        (lambda: SensitivityAnalysis(filename="a/b"), r"`filename` must be a file stem"),
        (lambda: SensitivityAnalysis(monitor=""), r"`monitor` must be the name of a metric"),
        (lambda: ScheduledPruning(layer_amounts={"fc1": 1.5}), r"`layer_amounts\['fc1'\]` must be a number in \[0.0, 1.0\); got 1.5"),
        (lambda: ScheduledPruning(layer_amounts=str(tmp_path / "none.json")), r"`layer_amounts` must be a dict .* is not a file"),
        (lambda: ScheduledPruning(layer_amounts=[0.5]), r"`layer_amounts` must be None, a dict"),
        (lambda: ScheduledPruning(monitor="val_acc"), r"needs both `monitor` and `max_metric_drop`"),
        (lambda: StructuredPruning(monitor="val_acc", max_metric_drop=-1.0), r"`max_metric_drop` must be a number >= 0.0; got -1.0"),
        (lambda: StructuredPruning(amount=0.0, layer_amounts={"a": 0.5}), r"`amount` must be > 0 with `layer_amounts`"),
        (lambda: ScheduledPruning(monitor="val_acc", max_metric_drop=0.1, monitor_mode="up"), r"`monitor_mode` must be one of"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    pytest.importorskip("bitsandbytes")
    from lightning_accel import CompositionError, Quantization

    with pytest.raises(CompositionError, match="Quantization cannot be combined with SensitivityAnalysis: the analysis prunes"):
        tiny_trainer(tmp_path, callbacks=[SensitivityAnalysis(), Quantization()]).fit(TinyMLP(), RandomDataModule())
    bad = ScheduledPruning(layer_amounts={"fc9": 0.5})
    with pytest.raises(ValueError, match=r"`layer_amounts` names \['fc9'\], which it does not prune; selected layers: \['fc1', 'fc2'\]"):
        tiny_trainer(tmp_path, max_epochs=1, callbacks=[bad]).fit(TinyMLP(), RandomDataModule())


def test_lightning_cli_builds_it_from_yaml(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train import main
    finally:
        sys.path.remove(str(ROOT / "examples"))
    cli = main(["--config", str(ROOT / "examples" / "configs" / "sensitivity.yaml"),
                f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    (analysis,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SensitivityAnalysis)]
    assert (analysis.amounts, analysis.folds, analysis.when, analysis.max_metric_drop) == ([0.5, 0.7, 0.8, 0.9, 0.95], 3, "fit_end", 0.01)
    assert lightning_accel.SensitivityAnalysis is SensitivityAnalysis


def test_quantization_takes_per_layer_formats_and_replays_them(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_accel import Quantization
    from lightning_accel.quantization import quantized_layers
    from lightning_accel.quantization.bnb import layer_config

    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps({"layers": {}, "recommendation": {"layer_amounts": {}, "layer_bits": {"fc1": "int8", "fc2": "float"}}}))
    quant = Quantization(mode="nf4", layer_bits=str(path), modules=["fc1", "fc2", "head"])
    model = TinyMLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts")
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[quant, ckpt],
                           enable_checkpointing=True)
    trainer.fit(model, RandomDataModule())
    modes = {n: layer_config(m)["mode"] for n, m in quantized_layers(model).items()}
    assert modes == {"fc1": "int8", "head": "nf4"} and type(model.fc2) is nn.Linear  # "float" keeps fc2; head: `mode`
    assert quant.record["layer_modes"] == modes
    loaded = lightning_accel.load_checkpoint(TinyMLP(), ckpt.best_model_path)  # replays each layer's own format
    assert {n: layer_config(m)["mode"] for n, m in quantized_layers(loaded).items()} == modes
    x = torch.randn(4, 16)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"`layer_bits\['fc1'\]` must be one of 'int8', 'nf4', 'fp4', 'float'; got 'int4'"):
        Quantization(layer_bits={"fc1": "int4"})
    with pytest.raises(ValueError, match=r"`layer_bits` names \['fc9'\], which are not selected Linear layers"):
        tiny_trainer(tmp_path, max_epochs=1, callbacks=[Quantization(layer_bits={"fc9": "nf4"})]).fit(TinyMLP(), RandomDataModule())


def test_measuring_callbacks_writing_the_same_files_conflict():
    from lightning_accel._lifecycle import find_conflict

    same = "both write sensitivity.json / .png into the same directory; give one another `filename`"
    assert find_conflict(SensitivityAnalysis(), SensitivityAnalysis()) == same
    assert find_conflict(AccelerationReport(filename="sensitivity"), SensitivityAnalysis()) == same
    assert find_conflict(SensitivityAnalysis(), AccelerationReport(filename="sensitivity")) == same
    assert find_conflict(SensitivityAnalysis(), SensitivityAnalysis(filename="other")) is None
    assert find_conflict(SensitivityAnalysis(), SensitivityAnalysis(output_dir="elsewhere")) is None
    assert find_conflict(AccelerationReport(), SensitivityAnalysis()) is None
