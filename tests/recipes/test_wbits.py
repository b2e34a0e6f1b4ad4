"""``--wbits 6``: int6 weight values in int8 containers, still one integer kernel per GEMM."""

import qcompiler
from qcompiler.api import CompileOptions


def test_wbits_6_carries_int6_values_in_int8_containers():
    import numpy as np
    from onnx import numpy_helper

    from tests import graphs
    from tests.passes.helpers import batches_for

    model = graphs.linear_model()
    result = qcompiler.quantize(model, "minmax", batches_for(model, {"x": (2, 4, 16)}),
                                options=CompileOptions(wbits=6, progress=False))
    weights = [numpy_helper.to_array(i) for i in result.model.graph.initializer if i.data_type == 3]  # int8
    assert weights and all(np.abs(w).max() <= 31 for w in weights)  # symmetric int6: q in [−31, 31]
    assert result.report["integer_kernels"]["integer_gemms"] == result.report["quantized_gemms"] == 1
    assert result.report["quantized"][0]["lowering"] == "int8 container, int6 values (per-channel)"
