"""qcompile: ONNX post-training quantization compiler."""

__version__ = "0.1.0"


def quantize(model, recipe="minmax", calibration=None, output=None, options=None):
    """Quantize ``model`` (path or ModelProto) with ``recipe``; see :func:`qcompiler.api.quantize`."""
    from qcompiler.api import CompileOptions
    from qcompiler.api import quantize as _quantize

    return _quantize(model, recipe, calibration, output, options or CompileOptions())
