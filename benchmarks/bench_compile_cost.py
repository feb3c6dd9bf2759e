"""What ``TorchCompile`` costs and returns in a whole compression pipeline: compile time, recompilations, the
steady-state training step against float32 eager, and the whole fit, with a cold and a warm compile cache.

Three pipelines, each fitted in a fresh process per variant (so a warm run has only the on-disk cache, as a second
run of the same config or a second ``make demo`` has):

* **digits CNN**: ``ResidualCNN(width=32, depth=2)`` with ``KnowledgeDistillation`` (a frozen copy as teacher),
  ``StructuredPruning`` (80% over the first epochs), ``MixedPrecision("auto")`` (examples/configs/digits_pipeline.yaml);
* **digits Transformer**: ``DigitsTransformer(dim=64, depth=2, heads=4)`` with distillation, ``StructuredPruning``
  (50%, heads), ``QuantizationAwareTraining`` (int8, from the step pruning ends) and ``MixedPrecision("auto")``
  (examples/configs/digits_pipeline_transformer.yaml without ``EightBitOptimizer``: bitsandbytes' CPU step
  is slower than AdamW's and cannot be compiled);
* **HF BERT**: a small ``transformers.BertForSequenceClassification`` built from a ``BertConfig`` (offline: no
  weights are downloaded), on synthetic token sequences, with distillation, ``StructuredPruning`` (heads and
  neurons) and ``MixedPrecision("auto")``.

Variants per pipeline: ``fp32 eager`` (no technique: the reference), ``pipeline eager`` (no ``TorchCompile``),
``pipeline + compile (cold)`` (``TorchCompile()``, compiling once the structure settled, into a fresh cache folder),
``pipeline + compile (warm)`` (the same again: the cache is reused) and, in the full run, ``... when='start' (cold)``
(compiled from the first step, recompiled at every structural change: the old behaviour).

Printed: whole-fit time and its ratio to fp32 eager, the steady-state step (median of the last 50 steps, from
``AccelerationReport``'s training rows) and its ratio to fp32 eager's, compile time and its share of the fit,
recompilations, FX graphs, cache hits and misses, the step compilation happened at.

    python -m benchmarks compile_cost            # ~15 minutes on 2 cores
    python -m benchmarks compile_cost --quick    # shorter fits (~8 minutes, cold compiles dominate)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from benchmarks._harness import Report, Row

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("digits_cnn", "digits_transformer", "hf_bert")

_FIT = textwrap.dedent(
    """
    import json, sys, time, warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(2)
    from benchmarks.bench_compile_cost import fit
    spec = json.loads(sys.argv[1])
    print("RESULT" + json.dumps(fit(**spec)), flush=True)
    """
)


# ---------------------------------------------------------------------- the models
def _bert_module(vocab: int, seq: int) -> Any:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from transformers import BertConfig, BertForSequenceClassification

    class BertClassifier(pl.LightningModule):
        """A small BERT from a config (random weights, offline) on token ids; logits out."""

        def __init__(self) -> None:
            super().__init__()
            config = BertConfig(
                vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=seq, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            )
            self.bert = BertForSequenceClassification(config)
            self.example_input_array = torch.zeros(2, seq, dtype=torch.long)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids).logits

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x).float(), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return BertClassifier()


def _bert_data(vocab: int, seq: int, n: int) -> Any:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    y = (x[:, :4].sum(-1) % 2).long()  # a learnable rule of the first tokens

    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, drop_last=True, generator=g)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64)

    return Data()


def fit(pipeline: str, variant: str, epochs: int, prune_end: int, cache_dir: str | None, out: str) -> dict[str, Any]:
    """One fit of ``pipeline`` as ``variant`` (run in a fresh process by :func:`run`); returns its figures."""
    import time

    import lightning.pytorch as pl

    from lightning_accel import (
        AccelerationReport,
        KnowledgeDistillation,
        MixedPrecision,
        QuantizationAwareTraining,
        StructuredPruning,
        TorchCompile,
    )
    from lightning_accel.demos import DigitsDataModule, DigitsTransformer, ResidualCNN

    pl.seed_everything(0)
    if pipeline == "digits_cnn":
        model, data = ResidualCNN(width=32, depth=2, lr=0.003), DigitsDataModule(batch_size=64, drop_last=True)
    elif pipeline == "digits_transformer":
        model, data = DigitsTransformer(dim=64, depth=2, heads=4, lr=0.003), DigitsDataModule(batch_size=64, drop_last=True)
    else:
        model, data = _bert_module(vocab=1000, seq=16), _bert_data(vocab=1000, seq=16, n=384)
    steps_per_epoch = len(data.train_dataloader()) if pipeline == "hf_bert" else None
    if steps_per_epoch is None:
        data.setup("fit")
        steps_per_epoch = len(data.train_dataloader())
    report = AccelerationReport(latency=False, console=False, figure=False, output_dir=out)
    callbacks: list[Any] = [report]
    tc = None
    if variant != "fp32_eager":
        amount = 0.8 if pipeline == "digits_cnn" else 0.5
        callbacks += [
            KnowledgeDistillation(teacher=None, verbose=0),
            StructuredPruning(amount=amount, schedule="linear", interval="epoch", start=0, end=prune_end, verbose=0),
            MixedPrecision("auto"),
        ]
        if pipeline == "digits_transformer":
            callbacks.append(QuantizationAwareTraining(bits=8, start=prune_end * steps_per_epoch, convert="none"))
        if variant.startswith("compile"):
            tc = TorchCompile(when="start" if "start" in variant else "settled", cache_dir=cache_dir)
            callbacks.append(tc)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        default_root_dir=out,
    )
    t0 = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - t0
    training = report.results.get("training", {})
    stats = tc.stats if tc is not None else {}
    return {
        "wall_s": wall,
        "fit_s": training.get("fit_s"),
        "steady_step_s": training.get("steady_step_s"),
        "baseline_step_s": training.get("baseline_step_s"),
        "steps": training.get("steps"),
        "compile_s": stats.get("compile_time_s"),
        "recompiles": stats.get("recompiles"),
        "structure_recompiles": stats.get("structure_recompiles"),
        "graphs": stats.get("graphs"),
        "compiled_at_step": stats.get("compiled_at_step"),
        "cache": stats.get("cache"),
        "fallbacks": stats.get("fallbacks"),
        "recompile_reasons": stats.get("recompile_reasons"),
    }


def _run_fit(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FIT, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT") :])
    raise RuntimeError(f"{spec['pipeline']} {spec['variant']} failed:\n{proc.stderr[-3000:]}")


def run(quick: bool = False, pipelines: tuple[str, ...] = PIPELINES) -> Report:
    epochs, prune_end = (3, 1) if quick else (6, 2)
    variants = ["fp32_eager", "eager", "compile_cold", "compile_warm"] + ([] if quick else ["compile_start_cold"])
    rows: list[Row] = []
    notes = [
        f"{epochs} epochs per fit, structured pruning over epochs 0..{prune_end}; every fit in a fresh process with "
        "torch.set_num_threads(2)",
        "step ratio: steady-state step (median of the last 50 training steps) / fp32 eager's; fit ratio: whole fit "
        "(validation included) / fp32 eager's fit",
        "cold: a fresh compile cache folder; warm: the same folder again in a new process (what a second run of the "
        "same config, a resumed fit and a second `make demo` get)",
    ]
    for pipeline in pipelines:
        cache = tempfile.mkdtemp(prefix=f"compile_cost_{pipeline}_")
        start_cache = tempfile.mkdtemp(prefix=f"compile_cost_{pipeline}_start_")
        out = tempfile.mkdtemp(prefix="compile_cost_out_")
        results: dict[str, dict[str, Any]] = {}
        try:
            for variant in variants:
                folder = start_cache if "start" in variant else cache
                spec = dict(pipeline=pipeline, variant=variant, epochs=epochs, prune_end=prune_end, cache_dir=folder, out=out)
                try:
                    results[variant] = _run_fit(spec)
                except RuntimeError as err:
                    notes.append(f"{pipeline} {variant}: failed: {str(err).splitlines()[-1][:200]}")
                print(f"  {pipeline} {variant}: {results.get(variant)}", flush=True)
        finally:
            for d in (cache, start_cache, out):
                shutil.rmtree(d, ignore_errors=True)
        ref = results.get("fp32_eager") or {}
        cold_compile = (results.get("compile_cold") or {}).get("compile_s")
        for variant, r in results.items():
            step_ratio = r["steady_step_s"] / ref["steady_step_s"] if r.get("steady_step_s") and ref.get("steady_step_s") else None
            fit_ratio = r["fit_s"] / ref["fit_s"] if r.get("fit_s") and ref.get("fit_s") else None
            cache_counts = r.get("cache") or {}
            extra = {
                "fit (s)": r.get("fit_s"),
                "step (ms)": None if r.get("steady_step_s") is None else r["steady_step_s"] * 1e3,
                "step ratio": step_ratio,
                "compile (s)": r.get("compile_s"),
                "compile share": r["compile_s"] / r["fit_s"] if r.get("compile_s") is not None and r.get("fit_s") else None,
                "warm/cold compile": r["compile_s"] / cold_compile if variant == "compile_warm" and cold_compile and r.get("compile_s") is not None else None,
                "recompiles": r.get("recompiles"),
                "graphs": r.get("graphs"),
                "compiled at step": r.get("compiled_at_step"),
                "cache hit/miss": f"{cache_counts.get('fx_graph_hit', 0)}/{cache_counts.get('fx_graph_miss', 0)}" if cache_counts else None,
            }
            rows.append(Row(name=f"{pipeline}: {variant.replace('_', ' ')}", median_s=r.get("fit_s"), ratio=fit_ratio, extra=extra))
    return Report(title="TorchCompile cost in the compression pipeline (CPU)", rows=rows, notes=notes, ratio_label="fit / fp32 eager fit")


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv).to_markdown())
