"""Diffusion harness: a DDIM sampler on ONNX Runtime, timestep-aware calibration, image metrics, evaluation."""
