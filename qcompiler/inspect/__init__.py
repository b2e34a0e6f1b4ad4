"""Outlier analysis of a float model on calibration data: activations, weights, attention, advice."""

from qcompiler.inspect.analysis import InspectConfig, InspectResult, inspect_model

__all__ = ["InspectConfig", "InspectResult", "inspect_model"]
