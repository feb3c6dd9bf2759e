"""Run a benchmark by name: ``python -m benchmarks NAME [--quick] [--out DIR]``; ``--list`` shows them.

``python -m benchmarks all`` runs the results table (``bench_pipeline``: every technique alone and the whole pipeline
against the float baseline of the same run) and writes it to ``RESULTS.md`` beside the JSON files: the table the
results page (docs/results.md) shows."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import benchmarks
from benchmarks._harness import save


def available() -> list[str]:
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(available())}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON results")
    parser.add_argument("--models", default=None, help="comma-separated models, for benchmarks that take them (deploy: cnn,transformer,minilm)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds, for benchmarks that take them (deploy)")
    parser.add_argument("--no-minilm-ours", action="store_true", help="deploy: skip training MiniLM variant (c) (its compressed rows)")
    args = parser.parse_args(argv)
    options = {
        "models": [m.strip() for m in args.models.split(",") if m.strip()] if args.models is not None else None,
        "rounds": args.rounds,
        "minilm_ours": False if args.no_minilm_ours else None,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if args.list or not args.names:
        print("\n".join(available()))
        return 0
    if args.names == ["all"]:
        report = importlib.import_module("benchmarks.bench_pipeline").run(quick=args.quick)
        table = report.to_markdown()
        print(table, flush=True)
        json_path = save(report, "pipeline", args.out)
        md = json_path.parent / "RESULTS.md"
        md.write_text(f"{table}\n\nReproduce: `python -m benchmarks all` ({json_path.name} holds the raw figures).\n")
        print(f"\nwrote {json_path} and {md}\n")
        return 0
    unknown = [n for n in args.names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    for name in args.names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        takes = inspect.signature(module.run).parameters
        extra = [k for k in options if k not in takes]
        if extra:
            parser.error(f"benchmark {name!r} takes no {', '.join('--' + k.replace('_', '-') for k in extra)}")
        report = module.run(quick=args.quick, **options)
        print(report.to_markdown(), flush=True)
        tag = name + ("-" + "-".join(options["models"]) if "models" in options else "")
        print(f"\nwrote {save(report, tag, args.out)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
