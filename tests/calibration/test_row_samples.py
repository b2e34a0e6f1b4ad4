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
    got = sample_rows(model, batches, tensors, per_batch, seed, order)
    for batch_index, (batch, values) in enumerate(stream_tensors(model, batches, order, StatsConfig(progress=False))):
        for name, value in values.items():
            flat = np.moveaxis(value, tensors[name], -1).reshape(-1, value.shape[tensors[name]])
            rng = np.random.default_rng([seed, order.index(name), batch_index])
            keep = np.sort(rng.choice(flat.shape[0], size=min(per_batch, flat.shape[0]), replace=False))
            np.testing.assert_array_equal(got[name][batch_index], flat[keep])


def test_graph_inputs_and_open_row_counts_take_the_same_draw(caplog):
    """A graph input (from the feeds) and a tensor whose row count shape inference leaves open
    (returned whole, drawn in numpy) get the rows the full capture's draw takes."""
    model = graphs.linear_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"  # rows no longer static
    del model.graph.value_info[:]
    tensors, order, per_batch, seed = {"x": -1, "mm": -1}, ["x", "mm"], 5, 3
    batches = _batches((2, 4, 16))
    with caplog.at_level("INFO", logger="qcompiler.calibration.row_samples"):
        got = sample_rows(model, batches, tensors, per_batch, seed, order)
    assert "1 of 2 sampled tensors have no static row count" in caplog.text  # 'mm' came back whole
    index = {id(batch): i for i, batch in enumerate(batches)}
    for batch, values in stream_tensors(model, batches, order, StatsConfig(progress=False)):
        batch_index = index[id(batch)]
        for name, value in values.items():
            flat = value.reshape(-1, value.shape[-1])
            rng = np.random.default_rng([seed, order.index(name), batch_index])
            keep = np.sort(rng.choice(flat.shape[0], size=min(per_batch, flat.shape[0]), replace=False))
            np.testing.assert_array_equal(got[name][batch_index], flat[keep])
