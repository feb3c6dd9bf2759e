"""AccelerationReport: the pure measurements, the callback's baseline / final snapshots, files, loggers, resume."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_accel import AccelerationReport, Quantization, ReportWarning, StructuredPruning
from lightning_accel.report.measure import (
    ThroughputMeter,
    batch_inputs,
    count_macs,
    count_params,
    latency,
    measure_model,
    stored_bytes,
)
from lightning_accel.report.render import render_text, table_rows
from tests.helpers import RandomDataModule, TinyMLP, tiny_trainer

warnings.filterwarnings("ignore", message=".*kernels.*")


# ---------------------------------------------------------------------- a deterministic clock
class Clock:
    """A fake ``perf_counter``: time only moves when a ``SlowMLP`` runs (by its ``cost`` seconds per call)."""

    t = 0.0

    def __call__(self) -> float:
        return self.t


CLOCK = Clock()


class SlowMLP(TinyMLP):
    """TinyMLP whose every forward call takes ``cost`` fake seconds (``first_cost`` extra on the first training
    step, like a compilation)."""

    def __init__(self, cost: float = 1.0, first_cost: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cost = cost
        self.first_cost = first_cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CLOCK.t += self.cost
        if self.training and self.first_cost:
            CLOCK.t += self.first_cost
            self.first_cost = 0.0
        return super().forward(x)


class SetCost(pl.Callback):
    def __init__(self, cost: float) -> None:
        self.cost = cost

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.cost = self.cost


def _report(**kwargs: Any) -> AccelerationReport:
    defaults: dict[str, Any] = dict(repeats=3, warmup=1, console=False, figure=False)
    defaults.update(kwargs)
    rep = AccelerationReport(**defaults)
    return rep


# ---------------------------------------------------------------------- pure core
def test_batch_inputs_cuts_and_tiles_every_batch_tensor():
    x = torch.arange(6.0).reshape(3, 2)
    assert batch_inputs(x, 2).shape == (2, 2)
    tiled = batch_inputs(x, 7)
    assert tiled.shape == (7, 2) and torch.equal(tiled[3], x[0])
    out = batch_inputs({"x": x, "mask": torch.ones(3, 5), "scale": torch.tensor(2.0)}, 5)
    assert out["x"].shape == (5, 2) and out["mask"].shape == (5, 5) and out["scale"].dim() == 0
    a, b = batch_inputs((x, torch.zeros(3)), 1)
    assert a.shape == (1, 2) and b.shape == (1,)


def test_sizes_of_float_and_bitsandbytes_models():
    pytest.importorskip("bitsandbytes")
    from lightning_accel.quantization import quantize_

    model = TinyMLP(hidden=64)
    with torch.no_grad():
        model.fc1.weight[:, :8] = 0.0
    counts = count_params(model)
    assert counts["params"] == counts["trainable"] == sum(p.numel() for p in model.parameters())
    assert counts["nonzero"] == counts["params"] - 64 * 8
    assert stored_bytes(model) == 4 * counts["params"]
    float_macs, counter = count_macs(model, torch.zeros(5, 16))
    assert counter == "FlopCounterMode" and float_macs == 16 * 64 + 64 * 64 + 64 * 4  # one sample

    quantize_(model, mode="int8")
    q = count_params(model)
    assert q["params"] == counts["params"] and q["trainable"] < q["params"]
    assert q["nonzero"] <= counts["nonzero"] + 1  # zeros survive int8 (row scales keep 0 exact)
    w = 16 * 64 + 64 * 64  # int8 weights of fc1 and fc2, plus row scales, float biases, float head
    assert w < stored_bytes(model) < w + 64 * 4 * 8 + 4 * (64 * 4 + 4) + 16
    assert count_macs(model, torch.zeros(5, 16))[0] == float_macs  # packed kernels counted at in x out

    nf4 = TinyMLP(hidden=64)
    quantize_(nf4, mode="nf4")
    assert stored_bytes(nf4) < stored_bytes(model)  # 4.x bits < 8.x bits per weight
    assert count_macs(nf4, torch.zeros(1, 16))[0] == float_macs


def test_torchao_tensors_count_at_their_real_size():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as ao_quantize_

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    before = stored_bytes(model)
    macs = count_macs(model, torch.zeros(1, 64))[0]
    ao_quantize_(model, Int8WeightOnlyConfig())
    # int8 weights, one scale (and zero point) per row, float biases: far below float32, though the subclass
    # reports its logical float32 size through .nbytes
    assert model[0].weight.nbytes == 64 * 128 * 4
    assert stored_bytes(model) < 0.35 * before
    assert count_params(model)["params"] == 64 * 128 + 128 + 128 * 8 + 8
    assert count_macs(model, torch.zeros(1, 64))[0] == macs


def test_latency_is_the_median_of_timed_calls_after_warmup():
    calls = []
    durations = iter([0.0] * 2 + [3.0, 1.0, 2.0, 100.0, 2.0])  # 2 warm-up calls, then 5 timed ones
    clock = Clock()

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        clock.t += next(durations)
        return x

    res = latency(fn, torch.zeros(3, 4), batch_size=8, repeats=5, warmup=2, timer=clock)
    assert res["median_ms"] == pytest.approx(2000.0) and res["max_ms"] == pytest.approx(100_000.0)
    assert calls == [(8, 4)] * 7 and res["batch_size"] == 8


def test_throughput_meter_skips_warmup_and_pauses():
    clock = Clock()
    meter = ThroughputMeter(skip=1, timer=clock)
    for seconds in (50.0, 2.0, 2.0):  # the first step (compilation) is not counted
        meter.start()
        clock.t += seconds
        meter.step(8)
    meter.pause()
    clock.t += 1000.0  # validation: not counted
    meter.start()
    clock.t += 2.0
    meter.step(8)
    assert meter.steps == 3 and meter.samples_per_s == pytest.approx(4.0)


def test_measure_model_without_inputs_measures_sizes_only():
    snap = measure_model(TinyMLP(), None)
    assert snap["params"] > 0 and snap["macs"] is None and snap["latency_ms"] == {}


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1; got 0"),
        ({"batch_sizes": 8}, "`batch_sizes` must be None or a non-empty list"),
        ({"batch_sizes": [1, "64"]}, "`batch_sizes` must be an integer"),
        ({"repeats": 0}, "`repeats`"),
        ({"latency": "yes"}, "`latency` must be a bool"),
        ({"export": True, "latency": False}, "`export`=True .* needs `latency`=True"),
        ({"monitor": ""}, "`monitor` must be None or a logged metric name"),
        ({"monitor_mode": "maximum"}, "`monitor_mode` must be one of 'max', 'min'; got 'maximum'"),
        ({"regression_tolerance": -0.1}, "`regression_tolerance`"),
        ({"filename": "out/report.json"}, "`filename` must be a file stem"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AccelerationReport(**kwargs)


@pytest.mark.parametrize("sanity, steps_before", [(2, 0), (0, 2)])
def test_unlogged_monitor_fails_at_the_first_validation(tmp_path, sanity, steps_before):
    """Refused at the sanity check (before any training step), or without one at the first validation's end (after
    the first epoch's 2 steps), never after the whole 3-epoch fit."""
    trainer = tiny_trainer(
        tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        num_sanity_val_steps=sanity,
        callbacks=[_report(monitor="val_f1", latency=False)],
    )
    with pytest.raises(ValueError, match="`monitor`='val_f1' is not logged by TinyMLP"):
        trainer.fit(TinyMLP(), RandomDataModule())
    assert trainer.global_step == steps_before


# ---------------------------------------------------------------------- the callback
def test_structured_pruning_report_files_and_logged_metrics(tmp_path):
    pl.seed_everything(0)
    rep = _report(batch_sizes=[1, 4], figure=True, sparsity_every_n_steps=4)
    prune = StructuredPruning(amount=0.5, start=0, end=1, interval="epoch", verbose=0)
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, logger=CSVLogger(tmp_path), callbacks=[rep, prune])
    model = TinyMLP(hidden=32)
    trainer.fit(model, RandomDataModule())
    res = rep.results
    b, f = res["baseline"], res["final"]
    assert b["params"] == sum(p.numel() for p in TinyMLP(hidden=32).parameters())
    assert f["params"] == sum(p.numel() for p in model.parameters()) < 0.7 * b["params"]
    assert f["macs"] < 0.6 * b["macs"] and f["stored_bytes"] < b["stored_bytes"]
    assert set(res["latency"]["eager"]) == {"1", "4"} and all(e["final_ms"] > 0 for e in res["latency"]["eager"].values())
    assert res["throughput"]["samples_per_s"] > 0 and res["throughput"]["steps"] == 8 - 3
    assert res["memory"]["peak_bytes"] > 0 and "RSS" in res["memory"]["source"]
    assert [t["step"] for t in res["sparsity"]][:2] == [0, 4] and res["sparsity"][-1]["params"] == f["params"]
    # files in the Trainer's log dir; the json is the results
    out = Path(trainer.log_dir)
    assert rep.json_path == out / "report.json" and rep.figure_path == out / "report.png"
    assert json.loads(rep.json_path.read_text()) == json.loads(json.dumps(res))
    assert rep.figure_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # report/* metrics reached the logger
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {k: v for r in rows for k, v in r.items() if k.startswith("report/") and v}
    assert float(logged["report/params_final"]) == f["params"] and float(logged["report/params_baseline"]) == b["params"]
    assert "report/latency_eager_b4_speedup" in logged and "report/val_acc_final" in logged
    # nothing of the report stays on the model
    assert not model._forward_pre_hooks


def test_post_training_quantization_keeps_metrics_before_and_after(tmp_path):
    pytest.importorskip("bitsandbytes")
    pl.seed_everything(0)
    rep = _report()
    quant = Quantization(mode="int8", when="fit_end")
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, callbacks=[rep, quant])
    trainer.fit(TinyMLP(hidden=64), RandomDataModule())
    res = rep.results
    assert res["final"]["quantized_layers"] == 2 and res["baseline"]["quantized_layers"] == 0
    assert res["final"]["stored_bytes"] < 0.5 * res["baseline"]["stored_bytes"]
    assert res["final"]["params"] == res["baseline"]["params"]
    phases = [h["phase"] for h in res["metric"]["history"]]
    assert phases == ["sanity", "fit", "fit", "fit_end", "fit_end"]  # Quantization validates before and after
    before, after = (h["value"] for h in res["metric"]["history"][-2:])
    assert before == quant.record["metric_before"] and after == quant.record["metric_after"]
    assert res["metric"]["before_fit_end"] == res["metric"]["history"][2]["value"]
    assert res["metric"]["final"] == after and "val_loss" in res["metric"]["history"][-1]["metrics"]
    # the model as the fit got it (sanity check) and the final model, side by side in the table
    assert res["metric"]["sanity_check"] == res["metric"]["history"][0]["value"]
    row = {r[0]: r for r in table_rows(res)}[f"{res['metric']['name']} (sanity check at fit start -> final)"]
    assert row[1] == f"{res['metric']['sanity_check']:.4f}" and row[2] == f"{after:.4f}"
    assert row[3] == f"{after - res['metric']['sanity_check']:+.4f}"


def test_metric_rows_flag_a_final_value_worse_than_at_fit_start():
    res = {"baseline": {}, "final": {}, "metric": {"name": "val_acc", "mode": "max", "sanity_check": 0.9,
                                                   "before_fit_end": 0.8, "final": 0.85, "worse": False}}
    rows = {r[0]: r for r in table_rows(res)}
    assert rows["val_acc (sanity check at fit start -> final)"][4] is True
    assert rows["val_acc (last fit validation -> final)"][4] is False
    res["metric"].update(mode="min")  # a loss: lower is better, 0.85 < 0.9 is an improvement
    assert {r[0]: r for r in table_rows(res)}["val_acc (sanity check at fit start -> final)"][4] is False
    res["metric"]["sanity_check"] = None
    assert not any("sanity" in r[0] for r in table_rows(res))


def test_baseline_is_float_when_quantized_at_setup(tmp_path):
    pytest.importorskip("bitsandbytes")
    rep = _report(latency=False)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[rep, Quantization(mode="nf4")])
    trainer.fit(TinyMLP(hidden=64), RandomDataModule())
    res = rep.results
    assert res["baseline"]["quantized_layers"] == 0 and res["final"]["quantized_layers"] == 2
    assert res["final"]["stored_bytes"] < 0.4 * res["baseline"]["stored_bytes"]
    assert "after_setup_of" not in res["baseline"] and not res["notes"]


@pytest.mark.parametrize("report_first", [True, False])
def test_baseline_is_measured_before_compression_in_any_list_order(tmp_path, report_first):
    """The lifecycle runs every callback's accel_before_setup before any accel_setup: the baseline is the float model
    wherever the report is listed."""
    pytest.importorskip("bitsandbytes")
    rep = _report(latency=False)
    quant = Quantization(mode="nf4")
    callbacks = [rep, quant] if report_first else [quant, rep]
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=callbacks)
    trainer.fit(TinyMLP(hidden=64), RandomDataModule())
    res = rep.results
    float_bytes = 4 * sum(p.numel() for p in TinyMLP(hidden=64).parameters())
    assert res["baseline"]["quantized_layers"] == 0 and res["baseline"]["stored_bytes"] == float_bytes
    assert res["final"]["quantized_layers"] == 2 and res["final"]["stored_bytes"] < 0.4 * float_bytes
    assert not res["notes"]


def test_slower_model_is_flagged_and_throughput_excludes_warmup(tmp_path):
    CLOCK.t = 0.0
    rep = _report(batch_sizes=[1, 8], throughput_skip=1)
    rep.timer = CLOCK
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, callbacks=[rep, SetCost(3.0)])
    trainer.fit(SlowMLP(cost=1.0, first_cost=100.0), RandomDataModule(batch_size=16))
    res = rep.results
    for b in ("1", "8"):
        e = res["latency"]["eager"][b]
        assert e["baseline_ms"] == pytest.approx(1000.0) and e["final_ms"] == pytest.approx(3000.0)
        assert e["speedup"] == pytest.approx(1 / 3) and e["regression"] is True
    # both latencies, and the whole fit: its first step's 100 fake seconds ("compilation") against float eager steps
    assert len(res["regressions"]) == 3 and res["regressions"][2].startswith("whole fit") and res["training"]["fit_regression"]
    rows = {r[0]: r for r in table_rows(res)}
    assert rows["latency b=1 (in memory)"][4] is True and "SLOWER" in rows["latency b=1 (in memory)"][3]
    assert "REGRESSION" in render_text(res)
    # 8 steps of 16 samples at 1 fake second each; the first (100 s, "compilation") is left out
    assert res["throughput"]["steps"] == 7 and res["throughput"]["samples_per_s"] == pytest.approx(16.0)


def test_faster_model_is_not_flagged(tmp_path):
    CLOCK.t = 0.0
    rep = _report(regression_tolerance=0.0)
    rep.timer = CLOCK
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[rep, SetCost(0.5)])
    trainer.fit(SlowMLP(cost=1.0), RandomDataModule())
    e = rep.results["latency"]["eager"]["1"]
    assert e["speedup"] == pytest.approx(2.0) and e["regression"] is False and not rep.results["regressions"]
    assert "2.00x faster" in {r[0]: r for r in table_rows(rep.results)}["latency b=1 (in memory)"][3]


class DictMLP(SlowMLP):
    """No example_input_array; forward takes its input as a keyword (a dict-like call); a call costs
    ``cost * (1 + batch / 100)`` fake seconds."""

    def __init__(self) -> None:
        super().__init__(hidden=32)
        self.example_input_array = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        CLOCK.t += self.cost * x.shape[0] / 100
        return super().forward(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x=x), y)


class SlowDownAtSetup(pl.Callback):
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.cost = 2.0


def test_example_from_the_first_forward_call_and_baseline_copy(tmp_path):
    """Without example_input_array: the first forward's keyword input is recorded (the hook removed afterwards), and
    the baseline's MACs and latency are taken on the float copy made before the model was changed at setup."""
    CLOCK.t = 0.0
    rep = _report(batch_sizes=[2, 50], monitor=None)
    rep.timer = CLOCK
    model = DictMLP()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[rep, SlowDownAtSetup()])
    trainer.fit(model, RandomDataModule())
    lat = rep.results["latency"]["eager"]
    assert lat["2"]["baseline_ms"] == pytest.approx(1020.0) and lat["50"]["baseline_ms"] == pytest.approx(1500.0)
    assert lat["2"]["final_ms"] == pytest.approx(2040.0) and lat["50"]["regression"] is True
    assert rep.results["baseline"]["macs"] == rep.results["final"]["macs"] == 16 * 32 + 32 * 32 + 32 * 4
    assert not model._forward_pre_hooks and rep._pending is None


def test_matplotlib_missing_writes_json_and_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    rep = _report(figure=True, latency=False, output_dir=str(tmp_path / "out"), filename="run1")
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[rep])
    with pytest.warns(ReportWarning, match="matplotlib is not installed"):
        trainer.fit(TinyMLP(), RandomDataModule())
    assert (tmp_path / "out" / "run1.json").exists() and not (tmp_path / "out" / "run1.png").exists()
    assert rep.figure_path is None and "no figure" in " ".join(rep.results["notes"])


def _counting_export(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    import lightning_accel.deploy as deploy

    calls: list[str | None] = []
    real = deploy.export

    def export(model: nn.Module, example_inputs: Any, path: Any, format: str | None = None, **kw: Any) -> Path:
        calls.append(format)
        return real(model, example_inputs, path, format=format, **kw)

    monkeypatch.setattr(deploy, "export", export)
    return calls


def test_exported_latency_against_exported_baseline(tmp_path, monkeypatch):
    calls = _counting_export(monkeypatch)
    rep = _report(export=True, export_compile=False, batch_sizes=[1, 3])
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[rep])
    trainer.fit(TinyMLP(), RandomDataModule())
    res = rep.results
    assert calls == ["program", "program"]  # baseline and final, one file each (dynamic batch) for both batch sizes
    for b in ("1", "3"):
        e = res["latency"]["exported"][b]
        assert e["baseline_ms"] > 0 and e["final_ms"] > 0
    assert res["exported_bytes"]["baseline"] > 0 and res["exported_bytes"]["final"] > 0
    assert any(r[0] == "latency b=3 (exported)" for r in table_rows(res)) and not res["notes"]
    # both files timed again in turn at fit end (the load at fit start does not decide the ratio), with the spread
    assert res["baseline"]["exported"]["side_by_side"] and res["final"]["exported"]["side_by_side"]
    assert set(res["baseline"]["exported"]["latency_ms_at_fit_start"]) == {"1", "3"}
    spread = res["final"]["exported"]["latency_spread"]["3"]
    assert spread["min_ms"] <= spread["median_ms"] <= spread["max_ms"]
    # the deployed file against fp32 eager, and the files kept in the run folder
    assert res["latency"]["exported_vs_eager"]["3"]["speedup"] > 0
    for role in ("baseline", "final"):
        kept = Path(res[role]["exported"]["path"])
        assert kept.is_file() and kept.parent.name == "exported" and res[role]["exported"]["format"] == "program"
    with pytest.raises(ValueError, match="`export_format` must be one of"):
        _report(export=True, export_format="tflite")


def test_report_times_the_file_quantization_exports(tmp_path, monkeypatch):
    """Where the run exports (Quantization(export_path=...)), the report times that deployed file against a float
    baseline exported the same way, without `export=True`."""
    pytest.importorskip("torchao")
    calls = _counting_export(monkeypatch)
    rep = _report(batch_sizes=[1, 4])
    quant = Quantization(mode="int8", when="fit_end", export_path="model.pt2", export_compile=False, save_checkpoint=False)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[quant, rep])
    trainer.fit(TinyMLP(hidden=64), RandomDataModule())
    res = rep.results
    assert calls == ["program", None]  # the report's float baseline, then Quantization's own file (compile=False; not a third)
    assert res["final"]["exported"]["path"] == quant.exported_path and Path(quant.exported_path).is_file()
    assert res["final"]["exported"]["compiled"] is False and res["baseline"]["exported"]["compiled"] is False
    assert all(e["final_ms"] > 0 and e["baseline_ms"] > 0 for e in res["latency"]["exported"].values())
    assert res["exported_bytes"]["final"] > 0 and res["exported_bytes"]["baseline"] > 0


def test_export_failure_is_a_note(tmp_path, monkeypatch):
    import lightning_accel.deploy as deploy

    def export(*args: Any, **kwargs: Any) -> None:
        raise deploy.ExportError("torch.export could not capture TinyMLP: it failed in 'fc1'")

    monkeypatch.setattr(deploy, "export", export)
    rep = _report(export=True)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[rep])
    with pytest.warns(ReportWarning, match="exporting baseline failed: ExportError: torch.export could not capture"):
        trainer.fit(TinyMLP(), RandomDataModule())
    assert all(e["final_ms"] is None for e in rep.results["latency"]["exported"].values())
    assert rep.results["latency"]["eager"]["1"]["final_ms"] > 0  # the rest of the report is kept


# ---------------------------------------------------------------------- resume
class Interrupt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("interrupted")


def _resume_run(tmp_path: Path, mode: str) -> tuple[AccelerationReport, nn.Module]:
    pl.seed_everything(0)
    rep = _report(sparsity_every_n_steps=2, throughput_skip=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=1, save_top_k=-1)
    cbs: list[pl.Callback] = [rep, ckpt, StructuredPruning(amount=0.5, start=0, end=1, interval="epoch", verbose=0)]
    if mode == "kill":
        cbs.append(Interrupt(6))
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=4, callbacks=cbs, enable_checkpointing=True)
    model = TinyMLP(hidden=32)
    path = tmp_path / "ckpts" / "epoch=0-step=4.ckpt" if mode == "resume" else None
    if mode == "kill":
        with pytest.raises(RuntimeError, match="interrupted"):
            trainer.fit(model, RandomDataModule(), ckpt_path=path)
        assert not model._forward_pre_hooks  # cleaned up on the exception too
    else:
        trainer.fit(model, RandomDataModule(), ckpt_path=path)
    return rep, model


def test_resume_keeps_the_baseline_and_history(tmp_path):
    killed, _ = _resume_run(tmp_path, "kill")
    state = torch.load(tmp_path / "ckpts" / "epoch=0-step=4.ckpt", weights_only=False)["callbacks"]["AccelerationReport"]
    saved = state["baseline"]
    assert saved["complete"] and saved["latency_ms"]["1"] > 0
    resumed, model = _resume_run(tmp_path, "resume")
    full, _ = _resume_run(tmp_path / "full", "full")
    r, u = resumed.results, full.results
    assert r["baseline"]["latency_ms"] == saved["latency_ms"]  # the measured numbers of the first run, not new ones
    assert r["baseline"]["params"] == u["baseline"]["params"] and r["baseline"]["macs"] == u["baseline"]["macs"]
    assert r["final"]["params"] == u["final"]["params"] < r["baseline"]["params"]
    assert [h["step"] for h in r["metric"]["history"] if h["phase"] == "fit"] == [4, 8]
    assert [t["step"] for t in r["sparsity"]] == [t["step"] for t in u["sparsity"]]
    assert r["throughput"]["steps"] == u["throughput"]["steps"] == 8


# ---------------------------------------------------------------------- YAML
def test_yaml_config_through_lightning_cli(tmp_path):
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "examples"))
    from train import main

    cli = main(
        [
            "fit",
            "--config",
            str(root / "examples" / "configs" / "report.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ]
    )
    rep = next(cb for cb in cli.trainer.callbacks if isinstance(cb, AccelerationReport))
    assert rep.batch_sizes == [1, 64] and rep.repeats == 20 and rep.monitor == "val_acc"
    res = json.loads((tmp_path / "report.json").read_text())
    assert res["final"]["quantized_layers"] > 0 and res["final"]["stored_bytes"] < res["baseline"]["stored_bytes"]
    assert set(res["latency"]["eager"]) == {"1", "64"}
    assert (tmp_path / "report.png").exists()


@pytest.mark.gpu
def test_cuda_latency_and_allocator_peak(tmp_path):
    rep = _report(batch_sizes=[1, 32])
    trainer = tiny_trainer(tmp_path, accelerator="gpu", max_epochs=1, limit_train_batches=3, callbacks=[rep])
    model = TinyMLP()
    trainer.fit(model, RandomDataModule())
    res = rep.results
    assert res["memory"]["source"] == "torch.cuda.max_memory_allocated" and res["memory"]["peak_bytes"] > 0
    assert all(e["final_ms"] > 0 and e["baseline_ms"] > 0 for e in res["latency"]["eager"].values())
    assert res["final"]["latency"]["32"]["device"].startswith("cuda")
    assert next(model.parameters()).device.type == "cpu"  # moved back after timing, as Lightning left it


@pytest.mark.slow  # five short fits (~20-30 s on 2 shared cores)
def test_report_benchmark_quick(tmp_path):
    from benchmarks.__main__ import available, main

    assert "report" in available()
    assert main(["report", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert rows[0]["extra"]["params"] < 1.0 and rows[1]["extra"]["stored bytes"] < 0.5
