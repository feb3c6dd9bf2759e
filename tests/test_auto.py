"""AutoCompress: the planner's pure core, argument checks, a whole fit that measures, plans, prunes and answers,
a reused plan, back-off, conflicts and YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_accel import (
    AccelerationReport,
    AutoCompress,
    CompositionError,
    StructuredPruning,
    load_checkpoint,
)
from lightning_accel.auto.plan import (
    AutoPlan,
    GroupCost,
    LatencyModel,
    choose_amounts,
    plan_targets,
    predicted,
)
from lightning_accel.pruning.structured import count_macs_params
from tests.helpers import RandomDataModule, TinyConvNet, tiny_trainer
from tests.helpers.scripted import ScriptedMLP


# ---------------------------------------------------------------------------------------------- the pure core
def _group(key: str, drop: dict[str, float], saved_macs: dict[str, int], base_macs: int = 1000, base_params: int = 100) -> GroupCost:
    return GroupCost(
        key=key, kind="channels", units=10, drop=drop,
        macs={a: base_macs - s for a, s in saved_macs.items()},
        params={a: base_params - s // 10 for a, s in saved_macs.items()},
    )


def _latency(**kw: float) -> LatencyModel:
    args = dict(runtime="onnx", batch_size=8, eager_ms=10.0, float_ms=5.0, fixed_ms=1.0, ms_per_mmac=4000.0,
                int8_ratio=None, base_macs=1000)
    args.update(kw)
    return LatencyModel(**args)  # type: ignore[arg-type]


def test_choose_amounts_cuts_the_cheap_group_first_and_stops_at_the_target():
    groups = {
        "cheap": _group("cheap", {"0.5": 0.001, "0.9": 0.002}, {"0.5": 300, "0.9": 500}),
        "dear": _group("dear", {"0.5": 0.2, "0.9": 0.5}, {"0.5": 300, "0.9": 500}),
    }
    t = plan_targets({"speedup": 2.0}, _latency(), 100, 0.9, int8_allowed=False)
    # 10 ms eager / 2 = 5 ms = 1 + 4000 * macs / 1e6 -> macs <= 1000: already met, nothing cut
    assert t.macs == pytest.approx(1000)
    amounts, limits = choose_amounts(groups, 1000, 100, t, 0.9)
    assert amounts == {"cheap": 0.0, "dear": 0.0} and not limits
    t = plan_targets({"speedup": 4.0}, _latency(), 100, 0.9, int8_allowed=False)  # 2.5 ms -> macs <= 375
    amounts, limits = choose_amounts(groups, 1000, 100, t, 0.9)
    assert amounts["cheap"] == 0.9 and amounts["dear"] == 0.5 and not limits  # cheap to its end, then the least of dear
    macs, _, drop = predicted(groups, amounts, 1000, 100)
    assert macs <= t.macs and drop == pytest.approx(0.202)


def test_choose_amounts_names_the_limit_when_no_cut_reaches_the_goal():
    groups = {"g": _group("g", {"0.5": 0.01, "0.9": 0.05}, {"0.5": 100, "0.9": 200})}
    t = plan_targets({"speedup": 5.0}, _latency(), 100, 0.9, int8_allowed=False)
    amounts, limits = choose_amounts(groups, 1000, 100, t, max_amount=0.5)
    assert amounts == {"g": 0.5}
    assert limits and "max_layer_amount" in limits[0] and "speed" in limits[0]


def test_plan_targets_takes_int8_only_where_it_was_faster_or_the_size_goal_needs_it():
    faster = plan_targets({"speedup": 2.0}, _latency(int8_ratio=0.5), 100, 0.9, int8_allowed=True)
    assert faster.int8 and "faster" in faster.why_int8
    # int8 halves the time: the float file may take 10 ms instead of 5 -> more MACs allowed than without int8
    assert faster.macs == pytest.approx((10.0 - 1.0) / 4000.0 * 1e6)
    slower = plan_targets({"speedup": 2.0}, _latency(int8_ratio=1.3), 100, 0.9, int8_allowed=True)
    assert not slower.int8 and "not faster" in slower.why_int8
    size = plan_targets({"smaller": 3.0}, _latency(int8_ratio=1.3), 100, 1.0, int8_allowed=True)
    assert size.int8 and "size goal" in size.why_int8
    assert size.params == pytest.approx(400 / 3 / 1.05)  # 1.05 bytes per int8 weight
    off = plan_targets({"smaller": 3.0}, _latency(int8_ratio=0.5), 100, 1.0, int8_allowed=False)
    assert not off.int8 and off.params == pytest.approx(100 / 3)


def test_plan_targets_says_when_the_runtime_fixed_cost_is_above_the_goal():
    t = plan_targets({"speedup": 20.0}, _latency(fixed_ms=1.0), 100, 0.9, int8_allowed=False)  # 0.5 ms < 1 ms fixed
    assert t.macs == 0.0 and any("fixed cost" in lim for lim in t.limits)


def test_plan_round_trips_through_json_and_refuses_other_data():
    plan = AutoPlan(goal={"speedup": 2.0}, batch_size=4, amounts={"a": 0.5}, int8=False, why_int8="x",
                    predicted={"speedup": 2.1}, groups={}, latency={}, limits=[])
    again = AutoPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    with pytest.raises(ValueError, match="not an AutoCompress plan"):
        AutoPlan.from_dict({"version": 7})
    with pytest.raises(ValueError, match="lacks"):
        AutoPlan.from_dict({"version": 1, "goal": {}})


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"goal": {"faster": 2.0}}, "`goal`"),
        ({"goal": {}}, "`goal`"),
        ({"goal": {"speedup": 1.0}}, "`goal.speedup`"),
        ({"goal": {"speedup": 2.0}, "batch_size": 0}, "`batch_size`"),
        ({"goal": {"speedup": 2.0}, "techniques": ["pruning", "magic"]}, "`techniques`"),
        ({"goal": {"speedup": 2.0}, "techniques": ["distillation"]}, "'pruning' or 'int8'"),
        ({"goal": {"speedup": 2.0}, "amounts": [0.5, 1.0]}, "`amounts`"),
        ({"goal": {"speedup": 2.0}, "max_layer_amount": 1.0}, "`max_layer_amount`"),
        ({"goal": {"speedup": 2.0}, "prune_until": 0.0}, "`prune_until`"),
        ({"goal": {"speedup": 2.0}, "max_metric_drop": -0.1}, "`max_metric_drop`"),
        ({"goal": {"speedup": 2.0}, "export_format": "tflite"}, "`export_format`"),
        ({"goal": {"speedup": 2.0}, "margin": 0.9}, "`margin`"),
        ({"goal": {"speedup": 2.0}, "patience": 0}, "`patience`"),
        ({"goal": {"speedup": 2.0}, "plan": "/nonexistent/plan.json"}, "`plan`"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoCompress(**kwargs)


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: StructuredPruning(amount=0.5), "AutoCompress cannot be combined with StructuredPruning.*techniques"),
        (lambda: AccelerationReport(export=False), "does not export: give it `export=True`"),
    ],
)
def test_a_users_callback_that_clashes_with_autocompress_is_a_named_composition_error(tmp_path, other, match):
    trainer = tiny_trainer(tmp_path, callbacks=[other(), AutoCompress(goal={"speedup": 2.0})])
    with pytest.raises(CompositionError, match=match):
        trainer.fit(TinyConvNet(width=16), RandomDataModule(shape=(1, 8, 8)))


# ---------------------------------------------------------------------------------------------- a whole fit
class FakeClock:
    """Latencies that follow the plan's arithmetic: the float file takes 1 ms + 1 ms per 1k MACs of the pruned copy."""

    def __init__(self, eager_ms: float = 20.0, int8_ratio: float = 0.5) -> None:
        self.eager_ms, self.int8_ratio, self.calls = eager_ms, int8_ratio, 0

    def __call__(self, label, fn, inputs):
        self.calls += 1
        ms = {"eager": self.eager_ms, "float": 10.0, "small": 4.0, "small_int8": 4.0 * self.int8_ratio}[label]
        return ms / 1e3


def _fit(tmp_path: Path, clock: FakeClock | None = None, max_epochs: int = 4, model=None, data=None, checkpoints=False, **kwargs):
    args = dict(goal={"speedup": 5.0}, batch_size=8, techniques=["pruning", "int8"], export_format="onnx",
                amounts=[0.25, 0.5, 0.75], repeats=3, measure_batches=4, output_dir=str(tmp_path / "out"))
    args.update(kwargs)
    auto = AutoCompress(**args)
    auto.timer = clock or FakeClock()
    extra = [ModelCheckpoint(dirpath=tmp_path / "ckpts")] if checkpoints else []
    trainer = tiny_trainer(tmp_path, max_epochs=max_epochs, callbacks=[auto, *extra], enable_checkpointing=checkpoints)
    model = model if model is not None else TinyConvNet(width=16)
    trainer.fit(model, data if data is not None else RandomDataModule(shape=(1, 8, 8), n=96))
    return auto, trainer, model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_autocompress_measures_plans_prunes_and_answers(tmp_path):
    base_macs = count_macs_params(TinyConvNet(width=16), torch.zeros(1, 1, 8, 8))[0]
    clock = FakeClock(eager_ms=20.0, int8_ratio=0.5)
    auto, trainer, model = _fit(tmp_path, clock, checkpoints=True)
    plan = auto.plan
    assert plan is not None and clock.calls > 0
    # int8 halved the fake file's time, so int8 is taken; 5x of 20 ms (x1.15 margin) -> 3.5 ms int8 -> 7 ms float (of 10)
    assert plan.int8 and "faster" in plan.why_int8
    assert plan.latency["runtime"] == "onnx" and plan.latency["eager_ms"] == pytest.approx(20.0)
    assert plan.predicted["speedup"] >= 5.0 * 1.15 - 1e-6
    assert any(a > 0 for a in plan.amounts.values())  # it had to cut to reach the goal
    # the plan ran through the package's own callbacks, which the Trainer now holds and checkpoints
    roles = auto.children
    assert set(roles) == {"pruning", "int8", "report"} and all(any(c is x for x in trainer.callbacks) for c in roles.values())
    pruning = roles["pruning"]
    assert isinstance(pruning, StructuredPruning) and pruning.amount == pytest.approx(max(plan.amounts.values()))
    assert pruning.amount_pruned == pytest.approx(pruning.amount) and pruning.end == 2  # prune_until 0.5 of 4 epochs
    macs = count_macs_params(model, torch.zeros(1, 1, 8, 8))[0]
    assert macs < base_macs
    assert roles["int8"].record["applied"]  # post-training int8 at fit end
    # the deployable checkpoint replays AutoCompress's pruning and int8 into a fresh model
    fresh = load_checkpoint(TinyConvNet(width=16), roles["int8"].quantized_checkpoint_path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model.eval()(x), atol=1e-5)
    # the answer: goal vs achieved from the report's deployed file, the files, the recipe
    res = auto.results
    assert set(res["goal"]) == {"speedup"} and res["achieved"]["speedup"] > 0 and res["achieved"]["format"] == "onnx"
    assert res["achieved"]["timed"] == "side by side at fit end" and res["achieved"]["eager_ms"] > 0
    assert res["achieved"]["metric_drop"] is not None and "metric" in res["met"]
    out = tmp_path / "out"
    saved = json.loads((out / "autocompress.json").read_text())
    assert saved["plan"]["amounts"] == plan.amounts
    recipe = yaml.safe_load((out / "autocompress_recipe.yaml").read_text())
    paths = [c["class_path"] for c in recipe["trainer"]["callbacks"]]
    assert paths == ["lightning_accel.StructuredPruning", "lightning_accel.Quantization", "lightning_accel.AccelerationReport"]
    assert recipe["trainer"]["callbacks"][0]["init_args"]["layer_amounts"] == {k: a for k, a in plan.amounts.items()}
    assert json.loads((out / "autocompress_plan.json").read_text())["amounts"] == plan.amounts
    # the report shows the plan's row
    report = roles["report"]
    rows = [t for t in report.results["techniques"] if t["technique"] == "AutoCompress"]
    assert rows and rows[0]["goal"] == {"speedup": 5.0}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_int8_that_is_not_faster_here_is_left_out_and_a_saved_plan_replays_without_measuring(tmp_path):
    auto, _, _ = _fit(tmp_path / "a", FakeClock(eager_ms=20.0, int8_ratio=1.4), max_epochs=3)
    assert auto.plan is not None and not auto.plan.int8 and "not faster" in auto.plan.why_int8
    assert not auto.children["int8"].record["applied"]  # the model stays float
    assert auto.children["int8"].skipped is not None and "not faster" in auto.children["int8"].skipped
    plan_file = tmp_path / "a" / "out" / "autocompress_plan.json"
    clock = FakeClock()
    again, _, _ = _fit(tmp_path / "b", clock, max_epochs=3, plan=str(plan_file))
    assert clock.calls == 0  # nothing timed: the plan is replayed
    assert again.plan is not None and again.plan.amounts == auto.plan.amounts and not again.plan.int8


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_backs_off_the_most_sensitive_group_when_the_metric_drops_past_the_budget(tmp_path):
    """val_score is 1.0 at fit start and for two epochs, then 0.5 twice (``patience`` 2): past the 0.1 budget while the
    schedule (events at epochs 0..4 of 8) is under way, so the most sensitive planned group is held where it is."""
    model = ScriptedMLP([1.0, 1.0, 0.5, 0.5, 1.0], hidden=32)
    auto, _, _ = _fit(tmp_path, FakeClock(eager_ms=20.0), max_epochs=8, model=model, data=RandomDataModule(),
                      monitor="val_score", max_metric_drop=0.1, goal={"speedup": 5.0}, techniques=["pruning"])
    assert auto.baseline_metric == pytest.approx(1.0)
    planned = {k: a for k, a in auto.plan.amounts.items() if a > 0}
    assert planned, "the fake clock asks for cuts"
    first = auto.backoffs[0]
    assert first["step"] > 0 and first["drop"] == pytest.approx(0.5)
    assert first["group"] in planned and first["held_at"] < first["planned"]
    pruning = auto.children["pruning"]
    assert pruning.layer_targets(pruning.amount)[first["group"]] == pytest.approx(first["held_at"])
    assert auto.results["backoffs"] == auto.backoffs  # the answer lists them (and names them as a limit if a goal is missed)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_hugging_face_bert_fed_dict_batches_gets_a_plan_of_heads_and_neurons(tmp_path):
    """Keyword forward, dict batches, a metric where lower is better, attention heads as groups: planned, pruned,
    the config kept consistent and the deployed ONNX file timed by the report."""
    pytest.importorskip("transformers")
    from tests.helpers.real import RealClassifier

    model = RealClassifier("bert", heads=4, n=32)
    auto = AutoCompress(goal={"speedup": 5.0}, batch_size=8, monitor="val_loss", monitor_mode="min", max_metric_drop=10.0,
                        techniques=["pruning"], export_format="onnx", amounts=[0.25, 0.5, 0.75], repeats=3,
                        measure_batches=1, exclude=["model.bert.embeddings*"], output_dir=str(tmp_path / "out"))
    auto.timer = FakeClock()
    trainer = tiny_trainer(tmp_path, max_epochs=4, callbacks=[auto])
    trainer.fit(model)
    plan = auto.plan
    kinds = {g["kind"] for g in plan.groups.values()}
    assert any(a > 0 for a in plan.amounts.values()) and len(kinds) >= 1
    pruned = auto.children["pruning"]
    assert pruned.amount_pruned == pytest.approx(pruned.amount)
    bert = model.model.bert
    assert bert.encoder.layer[0].attention.self.num_attention_heads * bert.encoder.layer[0].attention.self.attention_head_size \
        == bert.encoder.layer[0].attention.self.query.out_features
    assert auto.results["achieved"]["format"] == "onnx" and auto.results["achieved"]["speedup"] > 0
    with torch.no_grad():
        out = model(**model.sample(2))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_size_goal_takes_int8_even_where_it_is_slower_and_prunes_for_the_rest(tmp_path):
    auto, _, model = _fit(tmp_path, FakeClock(int8_ratio=1.4), max_epochs=3, goal={"smaller": 8.0})
    plan = auto.plan
    assert plan.int8 and "size goal" in plan.why_int8 and "not faster" in plan.why_int8
    assert plan.predicted["smaller"] >= 8.0 * 1.15 - 1e-6  # the plan aims past the goal by `margin`
    assert any(a > 0 for a in plan.amounts.values())  # int8 alone (~3.8x) is not 8x: it prunes too
    res = auto.results
    assert set(res["goal"]) == {"smaller"} and res["achieved"]["smaller"] > 3.0
    assert res["met"]["smaller"] == (res["achieved"]["smaller"] >= 8.0)
