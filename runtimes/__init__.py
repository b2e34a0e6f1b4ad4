"""Runtimes that execute qcompile's output: ONNX Runtime (CPU default, CUDA) and TensorRT."""
