"""Bundled models: a small trained ONNX model with its calibration and held-out data, ready after install."""

from __future__ import annotations

from pathlib import Path

#: The README's default model: the text-to-image UNet trained here (``train_unet``), with its
#: timestep-tagged calibration folder ``unet_mnist.calib/`` (``qcompile collect``, 16 prompts x 25 steps).
BUNDLED_DEFAULT = Path(__file__).parent / "unet_mnist.onnx"
#: A second zoo UNet kept for validation only (``train_unet --name unet_mnist_b --seed 1 --steps 1500``:
#: widths 32/48/96, cross-attention only at the innermost level), with ``unet_mnist_b.calib/`` collected
#: the same way; a recipe change should help on it too, not just on the model it was tuned on.
HELDOUT_UNET = Path(__file__).parent / "unet_mnist_b.onnx"
#: The third zoo UNet, also for validation only (``train_unet --name unet_mnist_c --seed 2 --steps 2000``:
#: four levels 16/32/64/64, two ResNets per block, cross-attention at 16x16 and in the mid block).
HELDOUT_UNET_C = Path(__file__).parent / "unet_mnist_c.onnx"
#: The small digits ViT (``train_digits_vit``): seconds to compile, held-out data for ``qcompile eval``.
DIGITS_VIT = Path(__file__).parent / "digits_vit.onnx"


def bundled_model_path(name: str = "digits_vit") -> Path:
    """Path of the bundled ``<name>.onnx``; FileNotFoundError naming the rebuild command if absent."""
    path = Path(__file__).parent / f"{name}.onnx"
    if not path.exists():
        raise FileNotFoundError(
            f"bundled model {path} is missing; rebuild it with "
            f"`python -m qcompiler.models.train_{name} --seed 0`")
    return path


def bundled_data_dir(name: str = "digits_vit", split: str = "calib") -> Path:
    """The ``<name>.calib/`` or ``<name>.heldout/`` npz folder that ships beside the model."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split must be 'calib' or 'heldout', not {split!r}")
    path = Path(__file__).parent / f"{name}.{split}"
    if not path.is_dir():
        raise FileNotFoundError(f"bundled data folder {path} is missing")
    return path
