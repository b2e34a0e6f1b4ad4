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


@pytest.mark.parametrize("token_counts, probes", [((4, 4, 4), 1), ((4, 6, 4), 2)])
def test_graph_inputs_and_open_row_counts_take_the_same_draw(caplog, token_counts, probes):
    """A graph input (from the feeds) and a tensor whose row count shape inference leaves open
    (its shape probed once per feed-shape signature, then gathered in ORT) get the rows the full
    capture's draw takes."""
    model = graphs.linear_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"  # rows no longer static
    del model.graph.value_info[:]
    tensors, order, per_batch, seed = {"x": -1, "mm": -1}, ["x", "mm"], 5, 3
    batches = [_batches((2, tokens, 16), count=i + 1)[i] for i, tokens in enumerate(token_counts)]
    with caplog.at_level("INFO", logger="qcompiler.calibration.row_samples"):
        got = sample_rows(model, batches, tensors, per_batch, seed, order)
    assert f"1 of 2 sampled tensors have no static row count: shapes probed in {probes} forward pass" in caplog.text
    assert "returned whole" not in caplog.text  # 'mm' was gathered in ORT, not returned whole
    index = {id(batch): i for i, batch in enumerate(batches)}
    for batch, values in stream_tensors(model, batches, order, StatsConfig(progress=False)):
        batch_index = index[id(batch)]
        for name, value in values.items():
            flat = value.reshape(-1, value.shape[-1])
            rng = np.random.default_rng([seed, order.index(name), batch_index])
            keep = np.sort(rng.choice(flat.shape[0], size=min(per_batch, flat.shape[0]), replace=False))
            np.testing.assert_array_equal(got[name][batch_index], flat[keep])


def test_a_tensor_whose_channel_count_varies_comes_back_whole_with_the_same_draw(caplog):
    """No fixed (rank, channels) to gather by: the tensor is returned whole and drawn in numpy."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", "channels"])
    y = helper.make_tensor_value_info("r", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "relu", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    batches = [_batches((2, 4, channels), count=i + 1)[i] for i, channels in enumerate((16, 8))]
    with caplog.at_level("INFO", logger="qcompiler.calibration.row_samples"):
        got = sample_rows(model, batches, {"r": -1}, 5, 3, ["r"])
    assert "1 sampled tensors returned whole" in caplog.text
    for index, batch in enumerate(batches):
        flat = np.maximum(batch.feeds["x"], 0).reshape(-1, batch.feeds["x"].shape[-1])
        keep = np.sort(np.random.default_rng([3, 0, index]).choice(flat.shape[0], size=5, replace=False))
        np.testing.assert_array_equal(got["r"][index], flat[keep])


@pytest.mark.parametrize("model, shape, tensors", [
    (graphs.conv_model(), (2, 4, 8, 8), {"r1": 1, "c1": 1, "x": 1}),
    (graphs.linear_model(), (3, 4, 16), {"mm": -1, "biased": -1, "x": -1}),
])
def test_rows_riding_on_the_ranges_pass_equal_their_own_pass(monkeypatch, model, shape, tensors):
    """OS+/SmoothQuant's rows drawn in the statistics' forward passes (one per batch, the last
    batch not sampled): the same ranges and rows, bit for bit, as two passes of their own."""
    from qcompiler.calibration import reductions
    from qcompiler.calibration.row_samples import RowSampler

    batches, per_batch, seed, order = _batches(shape), 40, 5, list(tensors)
    config = StatsConfig(progress=False)
    alone_rows = sample_rows(model, batches[:2], tensors, per_batch, seed, order)
    alone_ranges = reductions.collect_ranges(model, batches, tensors, config)
    runs = []
    original = reductions.run_batch
    monkeypatch.setattr(reductions, "run_batch", lambda *a: runs.append(1) or original(*a))
    sampler = RowSampler(tensors, per_batch, seed, order, sampled=2)
    ranges = reductions.collect_ranges(model, batches, tensors, config, rows=sampler)
    assert len(runs) == len(batches) and sampler.done
    assert {name: sorted(parts) for name, parts in sampler.samples.items()} == {name: [0, 1] for name in tensors}
    for name in tensors:
        for b in (0, 1):
            np.testing.assert_array_equal(sampler.samples[name][b], alone_rows[name][b])
        for field in ("channel_min", "channel_max", "index_min", "index_max"):
            np.testing.assert_array_equal(getattr(ranges[name], field), getattr(alone_ranges[name], field))


@pytest.mark.parametrize("budget, probed", [(None, False), (0, True)])
def test_open_row_counts_with_expected_sizes_come_back_whole_from_the_ranges_pass(monkeypatch, caplog, budget,
                                                                                probed):
    """Sizes per sample learned from earlier statistics (``expect``) let a tensor whose row count
    shape inference leaves open come back whole from the ranges pass itself: no probe pass, and
    the same rows bit for bit; over the chunk budget it is probed as before."""
    from qcompiler.calibration import reductions, row_samples
    from qcompiler.calibration.row_samples import RowSampler

    model = graphs.linear_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"  # rows no longer static
    del model.graph.value_info[:]
    tensors, order, per_batch, seed = {"x": -1, "mm": -1}, ["x", "mm"], 5, 3
    batches, config = _batches((2, 4, 16)), StatsConfig(progress=False)
    alone = sample_rows(model, batches[1:], tensors, per_batch, seed, order, first=1)
    if budget is not None:
        monkeypatch.setattr(row_samples, "default_chunk_bytes", lambda weight_bytes: budget)
    probes = []
    original = row_samples.run_batch
    monkeypatch.setattr(row_samples, "run_batch", lambda *a: probes.append(1) or original(*a))
    sampler = RowSampler(tensors, per_batch, seed, order, sampled=2, first=1)
    sampler.expect(reductions.collect_ranges(model, batches[:1], tensors, config))
    assert sampler.sample_bytes["mm"] == 4 * 4 * 8  # 4 tokens × 8 channels of float32
    with caplog.at_level("INFO", logger="qcompiler.calibration.row_samples"):
        reductions.collect_ranges(model, batches[1:], tensors, config, rows=sampler)
    assert bool(probes) == probed and ("returned whole" in caplog.text) != probed
    for name in tensors:
        for b in (1, 2):
            np.testing.assert_array_equal(sampler.samples[name][b], alone[name][b])
