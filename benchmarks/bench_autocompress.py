"""AutoCompress against the best hand-written pipeline of the README, on the same models, teacher and epochs.

For each digits model a float model is trained for ``T`` epochs (the teacher, saved as a checkpoint). Then, from its
weights, every variant trains ``P`` more epochs:

* **hand-written**: the README's pipeline for that model, with its amounts chosen by hand: KnowledgeDistillation from
  the teacher + StructuredPruning (80% of the CNN's channels, 50% of the Transformer's units; linear over the first
  third of the fit) + (Transformer) post-training int8, and an AccelerationReport exporting the deployed file with
  ``export_format="auto"``;
* **AutoCompress**: ``AutoCompress(goal={"speedup": x}, batch_size=b, teacher=<the checkpoint>)``, nothing else.

Per row: the deployed file's speed-up over the fp32 eager model at the goal's batch size (the report's
``exported_vs_eager``, in the format each run chose; for AutoCompress also its own answer, timed side by side at fit
end against a copy of the uncompressed model), test accuracy (359 held-out digits) and its change from the
teacher, stored bytes vs the float model, the fit's wall time and, for AutoCompress, the share of it spent measuring
at fit start. Timings on a shared 2-core CPU are noisy: read the ratios with the report's spread.
"""

from __future__ import annotations

import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks._harness import Report, Row
from lightning_accel import (
    AccelerationReport,
    AutoCompress,
    KnowledgeDistillation,
    Quantization,
    StructuredPruning,
)
from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN

#: (model, goal speed-up, deployed batch)
GOALS: tuple[tuple[str, float, int], ...] = (("cnn", 5.0, 256), ("transformer", 2.5, 256), ("transformer", 1.5, 1))


def _model(kind: str) -> pl.LightningModule:
    return ResidualCNN(width=32, depth=2, lr=0.001) if kind == "cnn" else DigitsTransformer(dim=64, depth=2, heads=4, lr=0.001)


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, drop_last=True)


def _trainer(epochs: int, callbacks: list[pl.Callback], root: str, limit: int | None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
        limit_train_batches=limit, limit_val_batches=limit or 1.0,
    )


def _isa() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return platform.processor() or "unknown"
    have = [f for f in ("avx512_vnni", "avx512_bf16", "amx_tile", "avx2") if f in flags]
    return ", ".join(have) or "no AVX2"


def _teacher(kind: str, epochs: int, root: str, limit: int | None) -> tuple[str, float]:
    pl.seed_everything(0, verbose=False)
    model = _model(kind)
    trainer = _trainer(epochs, [], root, limit)
    trainer.fit(model, _data())
    acc = trainer.test(model, _data(), verbose=False)[0]["test_acc"]
    path = str(Path(root) / f"{kind}_teacher.ckpt")
    trainer.save_checkpoint(path)
    return path, float(acc)


def _hand(kind: str, teacher: str, batch: int, p: int, root: str) -> list[pl.Callback]:
    amount = 0.8 if kind == "cnn" else 0.5
    cbs: list[pl.Callback] = [
        KnowledgeDistillation(teacher=teacher, init_student_from_teacher=True, verbose=0),
        StructuredPruning(amount=amount, schedule="linear", interval="epoch", start=0, end=max(1, p // 3), verbose=0),
        AccelerationReport(batch_sizes=[batch], export=True, export_format="auto", monitor="val_acc", output_dir=root,
                           filename="hand_report", figure=False, console=False),
    ]
    if kind != "cnn":
        cbs.append(Quantization(mode="int8", when="fit_end", monitor=None, save_checkpoint=False))
    return cbs


def _run(kind: str, callbacks: list[pl.Callback], p: int, root: str, limit: int | None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    model = _model(kind)
    trainer = _trainer(p, callbacks, root, limit)
    started = time.perf_counter()
    trainer.fit(model, _data())
    seconds = time.perf_counter() - started
    acc = float(trainer.test(model, _data(), verbose=False)[0]["test_acc"])
    report = next(c for c in trainer.callbacks if isinstance(c, AccelerationReport))  # type: ignore[attr-defined]
    res = report.results
    return {"acc": acc, "seconds": seconds, "report": res}


def _row(name: str, out: dict[str, Any], teacher_acc: float, batch: int, extra: dict[str, Any]) -> Row:
    res = out["report"]
    vs = ((res.get("latency") or {}).get("exported_vs_eager") or {}).get(str(batch)) or {}
    base, fin = (res.get("baseline") or {}).get("stored_bytes"), (res.get("final") or {}).get("stored_bytes")
    fmt = ((res.get("final") or {}).get("exported") or {}).get("format")
    return Row(
        name,
        ratio=vs.get("speedup"),
        extra={
            "test acc": round(out["acc"], 4),
            "vs teacher (pts)": round(100 * (out["acc"] - teacher_acc), 2),
            "smaller": round(base / fin, 2) if base and fin else None,
            "format": fmt,
            "fit s": round(out["seconds"], 1),
            **extra,
        },
    )


def run(quick: bool = False) -> Report:
    t_epochs, p = (1, 3) if quick else (15, 12)
    limit = 2 if quick else None
    report = Report(
        "AutoCompress vs the hand-written pipeline (deployed speed-up over fp32 eager at the goal's batch)",
        ratio_label="deployed speed-up",
    )
    torch.set_num_threads(2)
    teachers: dict[str, tuple[str, float]] = {}
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        goals = GOALS[:1] if quick else GOALS
        for kind, goal, batch in goals:
            if kind not in teachers:
                teachers[kind] = _teacher(kind, t_epochs, root, limit)
            ckpt, t_acc = teachers[kind]
            hand = _run(kind, _hand(kind, ckpt, batch, p, root), p, root, limit)
            report.rows.append(_row(f"{kind} b{batch}: hand-written pipeline", hand, t_acc, batch, {"goal": goal}))
            auto = AutoCompress(goal={"speedup": goal}, batch_size=batch, teacher=ckpt, output_dir=root,
                                filename=f"auto_{kind}_{batch}", measure_batches=2 if quick else 8)
            out = _run(kind, [auto], p, root, limit)
            plan = auto.plan
            res = auto.results
            report.rows.append(_row(
                f"{kind} b{batch}: AutoCompress(goal={{speedup: {goal:g}}})", out, t_acc, batch,
                {
                    "goal": goal,
                    "met": all(res["met"].values()) if res else None,
                    "predicted": round(plan.predicted["speedup"], 2) if plan else None,
                    "side by side": round(res["achieved"]["speedup"], 2) if res and res["achieved"].get("speedup") else None,
                    "int8": plan.int8 if plan else None,
                    "measure s": round(plan.measured_seconds, 1) if plan else None,
                    "measure share": round(plan.measured_seconds / out["seconds"], 3) if plan else None,
                    "backoffs": len(auto.backoffs),
                },
            ))
            if res.get("limits"):
                report.notes.append(f"{kind} b{batch} AutoCompress limits: " + "; ".join(res["limits"]))
            if plan is not None:
                cut = {k: a for k, a in plan.amounts.items() if a > 0}
                report.notes.append(f"{kind} b{batch} plan: int8={plan.int8} ({plan.why_int8}); amounts {cut}")
    report.notes.append(
        f"teachers: {', '.join(f'{k} {v[1]:.4f}' for k, v in teachers.items())} test acc after {t_epochs} epochs; every "
        f"variant then trains {p} epochs from the teacher's weights. CPU: {platform.processor() or platform.machine()} ({_isa()}), "
        f"{torch.get_num_threads()} threads."
    )
    return report
