"""Measuring what compression and acceleration deliver: :class:`AccelerationReport` (the callback), the pure
measurements of :mod:`~lightning_accel.report.measure` and the table / json / png of :mod:`~lightning_accel.report.render`."""

from lightning_accel.report.callbacks import AccelerationReport
from lightning_accel.report.measure import (
    ThroughputMeter,
    batch_inputs,
    count_macs,
    count_params,
    exported_latency,
    latency,
    measure_model,
    peak_memory,
    stored_bytes,
)
from lightning_accel.report.render import ReportWarning, flat_metrics, render_table, write_figure, write_json

__all__ = [
    "AccelerationReport",
    "ReportWarning",
    "ThroughputMeter",
    "batch_inputs",
    "count_macs",
    "count_params",
    "exported_latency",
    "flat_metrics",
    "latency",
    "measure_model",
    "peak_memory",
    "render_table",
    "stored_bytes",
    "write_figure",
    "write_json",
]
