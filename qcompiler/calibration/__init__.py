"""Calibration: read and validate calibration data, and collect streaming tensor statistics."""

from qcompiler.calibration.readers import (
    CalibrationBatch,
    CallableReader,
    NpzFolderReader,
    as_reader,
    load_calibration,
)
from qcompiler.calibration.statistics import StatsConfig, TensorStats, collect_statistics

__all__ = [
    "CalibrationBatch",
    "CallableReader",
    "NpzFolderReader",
    "StatsConfig",
    "TensorStats",
    "as_reader",
    "collect_statistics",
    "load_calibration",
]
