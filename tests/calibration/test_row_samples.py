"""Rows sampled inside ORT equal the same seeded draw from the fully captured activations."""

import numpy as np
import pytest

from qcompiler.calibration.capture import stream_tensors
from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.calibration.row_samples import sample_rows
from qcompiler.calibration.statistics import StatsConfig
from tests import graphs


def _batches(shape, count=3):
    return [CalibrationBatch({"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)}, {}, f"{i}.npz")
            for i in range(count)]


@pytest.mark.parametrize("model, shape, tensors", [
    (graphs.conv_model(), (2, 4, 8, 8), {"r1": 1, "c1": 1}),          # channel axis 1: transposed last
    (graphs.linear_model(), (3, 4, 16), {"mm": -1, "biased": -1}),    # channels last
])
def test_rows_drawn_inside_ort_equal_the_full_capture_draw(model, shape, tensors):
    batches, per_batch, seed, order = _batches(shape), 40, 5, list(tensors)
    got, rest = sample_rows(model, batches, tensors, per_batch, seed, order)
    assert not rest
    for batch_index, (batch, values) in enumerate(stream_tensors(model, batches, order, StatsConfig(progress=False))):
        for name, value in values.items():
            flat = np.moveaxis(value, tensors[name], -1).reshape(-1, value.shape[tensors[name]])
            rng = np.random.default_rng([seed, order.index(name), batch_index])
            keep = np.sort(rng.choice(flat.shape[0], size=min(per_batch, flat.shape[0]), replace=False))
            np.testing.assert_array_equal(got[name][batch_index], flat[keep])


def test_graph_inputs_and_unknown_shapes_are_left_to_the_caller():
    _, rest = sample_rows(graphs.linear_model(), _batches((2, 4, 16)), {"x": -1}, 8, 0, ["x"])
    assert rest == ["x"]
