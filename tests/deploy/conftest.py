"""Shared fixtures of the deploy tests: the bundled UNet compiled with minmax (once per session)."""

from __future__ import annotations

import pytest

import qcompiler
from qcompiler.api import CompileOptions
from qcompiler.models import BUNDLED_DEFAULT

#: Calibration samples for the test compile: enough for real ranges on every tensor, few enough
#: to compile in seconds; the deploy tests check serving and drawing, not accuracy.
CALIB_LIMIT = 16


@pytest.fixture(scope="session")
def unet_minmax(tmp_path_factory):
    """models/unet_mnist.onnx compiled with `--recipe minmax --calib models/unet_mnist.calib`."""
    out = tmp_path_factory.mktemp("unet") / "unet_mnist.minmax.w8a8.onnx"
    qcompiler.quantize(BUNDLED_DEFAULT, "minmax", BUNDLED_DEFAULT.with_suffix(".calib"), out,
                       CompileOptions(calib_limit=CALIB_LIMIT, progress=False))
    return out
