"""Exporters: PyTorch / transformers models to ONNX, with the calibration data that goes with them."""
