from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_accel._select import NoMatchError, output_layer_name, select_modules
from lightning_accel._validate import (
    check_choice,
    check_int,
    check_logged,
    check_number,
    check_patterns,
    check_stem,
    check_str,
)
from lightning_accel.demos import DigitsTransformer, ResidualCNN


def test_default_selection_skips_output_layer():
    model = DigitsTransformer(depth=2)
    names = list(select_modules(model))
    assert output_layer_name(model) == "head"
    assert "head" not in names
    assert "blocks.0.attn.qkv" in names and "blocks.1.mlp.3" in names
    assert "head" in select_modules(model, include_output=True)


def test_patterns_on_names_and_classes():
    model = DigitsTransformer(depth=2)
    assert list(select_modules(model, ["blocks.*.mlp.*"])) == ["blocks.0.mlp.0", "blocks.0.mlp.3", "blocks.1.mlp.0", "blocks.1.mlp.3"]
    assert list(select_modules(model, ["head"])) == ["head"]
    norms = select_modules(model, ["LayerNorm"], types=(nn.LayerNorm,))
    assert len(norms) == 5
    kept = select_modules(ResidualCNN(depth=1), exclude=["stem.*", "*shortcut*"])
    assert all(not n.startswith("stem") and "shortcut" not in n for n in kept)


def test_no_match_names_pattern_and_candidates():
    with pytest.raises(NoMatchError, match=r"`modules` pattern 'encoder\.\*' matches no .*candidates: 'embed'"):
        select_modules(DigitsTransformer(), ["encoder.*"])
    with pytest.raises(NoMatchError, match="`exclude` pattern 'nothing'"):
        select_modules(DigitsTransformer(), exclude=["nothing"])
    with pytest.raises(NoMatchError, match="is left to act on"):
        select_modules(nn.Sequential(nn.Linear(2, 2)))  # only an output layer


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: check_choice("schedule", "cubicc", ("linear", "cubic")), r"`schedule` must be one of 'linear', 'cubic'; got 'cubicc'"),
        (lambda: check_number("amount", 1.0, low=0, high=1, high_inclusive=False), r"`amount` must be a number in \[0, 1\); got 1.0"),
        (lambda: check_number("amount", "0.5", low=0), r"`amount` must be a number >= 0; got '0.5'"),
        (lambda: check_number("amount", float("nan")), r"`amount` must be a number; got nan"),
        (lambda: check_int("frequency", 1.5, low=1), r"`frequency` must be an integer >= 1; got 1.5"),
        (lambda: check_int("frequency", True, low=1), r"`frequency` must be an integer"),
        (lambda: check_patterns("modules", "blocks.*"), r"`modules` must be None or a non-empty list"),
        (lambda: check_patterns("modules", []), r"`modules` must be None or a non-empty list"),
        (lambda: check_patterns("exclude", ["a", ""]), r"`exclude` must contain non-empty strings"),
        (lambda: check_str("monitor", "", "a metric name like 'val_acc'"), r"`monitor` must be a metric name like 'val_acc'; got ''"),
        (lambda: check_str("output_dir", 3, "a directory path", allow_none=True), r"`output_dir` must be None or a directory path; got 3"),
        (lambda: check_stem("filename", "out/report.json", "report"), r"`filename` must be a file stem .* like 'report'; got 'out/report.json'"),
        (lambda: check_stem("filename", "report.png", "report"), r"`filename` must be a file stem"),
        (lambda: check_logged(nn.ReLU(), "val_f1", {"val_acc": 1.0}, nn.Identity()), r"ReLU `monitor`='val_f1' is not logged by Identity; logged metrics: \['val_acc'\]"),
    ],
)
def test_validation_messages(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_validation_accepts_good_values():
    assert check_number("amount", 0.5, low=0, high=1) == 0.5
    assert check_int("n", None, allow_none=True) is None
    assert check_patterns("modules", ("a.*",)) == ["a.*"]
    assert check_str("monitor", None, "a metric name", allow_none=True) is None
    assert check_str("monitor", "val_acc", "a metric name") == "val_acc"
    assert check_stem("filename", "report", "report") == "report"
    check_logged(nn.ReLU(), "val_acc", {"val_acc": 1.0}, nn.Identity())


# ---------------------------------------------------------------------- one rule for every name pattern
class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential()
        self.net.add_module("body", nn.Linear(4, 4))
        self.net.add_module("head", nn.Linear(4, 2))


def test_a_bare_name_matches_that_module_at_any_depth():
    from lightning_accel._select import matches, select_modules

    model = _Wrapped()
    assert list(select_modules(model, ["head"], include_output=True)) == ["net.head"]
    assert list(select_modules(model, None, exclude=["head"], include_output=True)) == ["net.body"]
    assert matches("net.body", model.net.body, ["Linear"]) and not matches("net.body", model.net.body, ["ody"])


def test_no_match_lists_every_candidate_or_says_how_many_more():
    from lightning_accel._select import NoMatchError, select_modules

    wide = nn.Sequential(*[nn.Linear(2, 2) for _ in range(45)])
    with pytest.raises(NoMatchError, match=r"'39', \.\.\. and 5 more"):
        select_modules(wide, ["nothing"])
    with pytest.raises(NoMatchError, match=r"matches no module of Sequential"):
        select_modules(wide, ["nothing"], types=(nn.Module,))


@pytest.mark.parametrize(("arg", "value"), [("scope", "gloabl"), ("importance", "tailor")])
def test_plan_refuses_unknown_scope_and_importance(arg, value):
    from lightning_accel.pruning.structured import build_pruning_graph, plan_structured_pruning

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    graph = build_pruning_graph(model, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=f"`{arg}` must be one of"):
        plan_structured_pruning(graph, 0.5, **{arg: value})
