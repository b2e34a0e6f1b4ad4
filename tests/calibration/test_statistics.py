"""Tests for the streaming statistics engine against numpy reductions over all samples at once.

Inputs and weights are small multiples of 1/4 and 1/2, so every product and partial sum of
the MatMul/Conv is exactly representable in float32: ORT's results equal the float64 numpy
reference bitwise whatever its summation order, and min/max/histograms can be compared exactly.
"""

from __future__ import annotations

import math
import tracemalloc
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler.calibration import CalibrationBatch, StatsConfig, TensorStats, collect_statistics
from qcompiler.calibration import capture as capture_module
from qcompiler.errors import QCompileError

QUIET = StatsConfig(progress=False)


def exact_values(rng, shape, scale: float) -> np.ndarray:
    return (rng.integers(-8, 9, size=shape) * scale).astype(np.float32)


def build(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "stats", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def matmul_model(weight: np.ndarray, tokens=4) -> onnx.ModelProto:
    """x (B, T, K) -> MatMul W (K, N) -> h -> Relu -> y."""
    k, n = weight.shape
    return build([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", tokens, k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", tokens, n])],
                 [numpy_helper.from_array(weight, "W")])


def conv_model(weight: np.ndarray) -> onnx.ModelProto:
    """x (B, 2, 5, 5) -> Conv 3x3 pad 1 -> c -> Relu -> y (B, 3, 5, 5)."""
    return build([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, 5, 5])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3, 5, 5])],
                 [numpy_helper.from_array(weight, "W")])


def conv_reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack([padded[:, :, i:i + 5, j:j + 5] for i in range(3) for j in range(3)], axis=-1)
    return np.einsum("bchwk,ock->bohw", patches, weight.reshape(3, 2, 9).astype(np.float64)).astype(np.float32)


def make_batches(rng, sizes, sample_shape) -> list[CalibrationBatch]:
    return [CalibrationBatch(feeds={"x": exact_values(rng, (size, *sample_shape), 0.25)}, metadata={},
                             source=f"{index}.npz") for index, size in enumerate(sizes)]


def assert_matches(stats: TensorStats, values: np.ndarray, channel_axis: int) -> None:
    """Compare against numpy over all samples concatenated (values: (N, ...))."""
    channel_last = np.moveaxis(values, channel_axis, -1).reshape(values.shape[0], -1, values.shape[channel_axis])
    assert stats.samples == values.shape[0] and stats.shape == values.shape[1:]
    assert (stats.min, stats.max, stats.absmax) == (values.min(), values.max(), np.abs(values).max())
    np.testing.assert_array_equal(stats.channel_min, channel_last.min(axis=(0, 1)))
    np.testing.assert_array_equal(stats.channel_max, channel_last.max(axis=(0, 1)))
    np.testing.assert_array_equal(stats.channel_absmax, np.abs(channel_last).max(axis=(0, 1)))
    np.testing.assert_allclose(stats.channel_mean, channel_last.astype(np.float64).mean(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_array_equal(stats.index_min, channel_last.min(axis=(0, 2)))
    np.testing.assert_array_equal(stats.index_max, channel_last.max(axis=(0, 2)))
    magnitudes = np.abs(values.astype(np.float64)).ravel()
    assert stats.hist_counts.sum() == magnitudes.size == stats.count
    assert stats.hist_edges[-1] >= stats.absmax
    expected, edges = np.histogram(magnitudes, bins=stats.hist_counts.size, range=(0.0, stats.hist_edges[-1]))
    np.testing.assert_array_equal(stats.hist_edges, edges)
    np.testing.assert_array_equal(stats.hist_counts, expected)
    # mean |x|: same float64 sum in another order, so equal to a few ulps of the total.
    assert stats.mean_abs() == pytest.approx(magnitudes.mean(), rel=1e-12)


def test_matmul_statistics_equal_numpy_per_token():
    rng = np.random.default_rng(0)
    weight = exact_values(rng, (3, 5), 0.5)
    batches = make_batches(rng, [2, 3, 1], (4, 3))
    result = collect_statistics(matmul_model(weight), batches, {"x": None, "h": -1, "y": 2}, QUIET)
    x = np.concatenate([b.feeds["x"] for b in batches])
    h = (x.astype(np.float64) @ weight).astype(np.float32)
    assert list(result) == ["x", "h", "y"] and result["h"].channel_axis == 2
    assert result["h"].index_min.shape == (4,)  # one entry per token
    assert_matches(result["x"], x, 2)
    assert_matches(result["h"], h, 2)
    assert_matches(result["y"], np.maximum(h, 0), 2)


def test_conv_statistics_per_channel_and_pixel():
    rng = np.random.default_rng(1)
    weight = exact_values(rng, (3, 2, 3, 3), 0.5)
    batches = make_batches(rng, [2, 2, 3], (2, 5, 5))
    result = collect_statistics(conv_model(weight), batches, {"c": 1, "y": 1}, QUIET)
    c = conv_reference(np.concatenate([b.feeds["x"] for b in batches]), weight)
    assert result["c"].channel_min.shape == (3,) and result["c"].index_min.shape == (25,)
    assert_matches(result["c"], c, 1)
    assert_matches(result["y"], np.maximum(c, 0), 1)


def test_histogram_growth_is_exact_including_the_old_range_value():
    # Range: 0 (all zeros) -> 1.0 -> x4 (3.7 needs a factor 3.7, rounded up to a power of two).
    # The value 1.0 equals the old range: it sat in the closed last bin and must move to bin 512.
    rng = np.random.default_rng(2)
    parts = [np.zeros((2, 6)), np.array([[1.0, -0.25, 0.5, 0.0, -1.0, 0.75]]),
             rng.uniform(-3.7, 3.7, (3, 6)), np.array([[3.7, 0, 0, 0, 0, 0]]), rng.uniform(-0.5, 0.5, (2, 6))]
    for bins in (2048, 100, 4):  # 100: growth factors that do not divide the bin count
        stats = None
        for index, part in enumerate(parts):
            part = part.astype(np.float32)
            stats = stats or TensorStats.start("t", part, None, bins, per_index=True)
            stats.update(part, f"{index}.npz")
        assert stats.hist_edges[-1] == 4.0
        assert_matches(stats, np.concatenate(parts).astype(np.float32), 1)


def test_histogram_growth_by_more_than_the_bin_count():
    stats = TensorStats.start("t", np.zeros((1, 2)), None, 16, per_index=False)
    for part in (np.array([[1.0, 0.5]]), np.array([[1e5, 16.0]])):
        stats.update(part.astype(np.float32), "batch")
    # 1e5 / 1 needs k = 2^17 > 16 bins: everything old collapses into bin 0.
    assert stats.hist_edges[-1] == 2.0 ** 17 and stats.index_min is None
    expected, _ = np.histogram([1.0, 0.5, 1e5, 16.0], bins=16, range=(0, 2.0 ** 17))
    np.testing.assert_array_equal(stats.hist_counts, expected)
    assert stats.hist_counts[-1] == 0 and stats.hist_counts[12] == 1  # 1e5 / (2^17 / 16) = 12.2


def test_non_finite_activations_are_counted_and_left_out():
    stats = TensorStats.start("t", np.zeros((1, 3)), None, 8, per_index=True)
    stats.update(np.array([[1.0, -np.inf, 2.0], [np.nan, -3.0, 0.5]], np.float32), "batch")
    assert stats.nonfinite == 2 and (stats.min, stats.max, stats.absmax) == (-3.0, 2.0, 3.0)
    np.testing.assert_array_equal(stats.channel_min, [1.0, -3.0, 0.5])
    assert stats.count == 4 == stats.hist_counts.sum()


def test_chunking_and_determinism_are_bitwise():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((3, 5)).astype(np.float32)  # arbitrary values: determinism, not exactness
    batches = [CalibrationBatch({"x": rng.standard_normal((2, 4, 3)).astype(np.float32)}, {}, f"{i}")
               for i in range(4)]
    model, tensors = matmul_model(weight), {"x": None, "h": None, "y": None}
    runs = [collect_statistics(model, batches, tensors, StatsConfig(progress=False, tensors_per_run=size))
            for size in (1, 32, 32)]
    for other in runs[1:]:
        for name in tensors:
            first, second = runs[0][name], other[name]
            for attribute in ("channel_min", "channel_max", "index_min", "index_max", "hist_counts", "hist_edges"):
                assert getattr(first, attribute).tobytes() == getattr(second, attribute).tobytes()
            assert (first.min, first.max, first.sum_abs, first.count) == (second.min, second.max,
                                                                          second.sum_abs, second.count)


def traced_peak(model, batches, tensors) -> int:
    tracemalloc.start()
    try:
        collect_statistics(model, batches, tensors, QUIET)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def memory_case():
    """h is (B, 64, 256) float32: 64 KiB per sample; 32 batches of 2 samples."""
    rng = np.random.default_rng(4)
    model = matmul_model(rng.standard_normal((16, 256)).astype(np.float32), tokens=64)
    batches = [CalibrationBatch({"x": rng.standard_normal((2, 64, 16)).astype(np.float32)}, {}, f"{i}")
               for i in range(32)]
    return model, batches, 64 * 256 * 4


def test_peak_memory_does_not_grow_with_samples(monkeypatch):
    # ORT allocates its outputs outside tracemalloc's view, so each output is copied into numpy
    # memory (traced) before the reducer sees it. Keeping the activations of N = 64 instead of
    # N = 4 samples would add 60 x 64 KiB = 3.75 MiB; streaming adds nothing that scales with N.
    model, batches, per_sample = memory_case()
    run, kept = capture_module.run_batch, []
    monkeypatch.setattr(capture_module, "run_batch", lambda *args: [np.array(out) for out in run(*args)])
    traced_peak(model, batches[:1], {"h": None})  # warm-up: first-call caches are not the subject
    small, large = traced_peak(model, batches[:2], {"h": None}), traced_peak(model, batches, {"h": None})
    assert large - small < 0.1 * 60 * per_sample
    # The same measurement sees accumulation when it happens: keep every output alive.
    monkeypatch.setattr(capture_module, "run_batch", lambda *args: kept.append([np.array(o) for o in run(*args)])
                        or kept[-1])
    assert traced_peak(model, batches, {"h": None}) - small > 0.9 * 60 * per_sample


def test_each_activation_is_released_before_the_next_batch(monkeypatch):
    model, batches, _ = memory_case()
    run, alive = capture_module.run_batch, []

    def tracked(*args):
        assert not [ref for ref in alive if ref() is not None], "an earlier batch's activation is still referenced"
        outputs = run(*args)
        alive.extend(weakref.ref(out) for out in outputs)
        return outputs

    monkeypatch.setattr(capture_module, "run_batch", tracked)
    collect_statistics(model, batches[:4], {"h": None, "y": 1}, StatsConfig(progress=False, tensors_per_run=1))
    assert len(alive) == 8  # 2 chunks x 4 batches, each checked dead before the next run


def test_variable_token_length():
    rng = np.random.default_rng(5)
    model = matmul_model(exact_values(rng, (3, 5), 0.5), tokens="T")
    batches = [CalibrationBatch({"x": exact_values(rng, (1, tokens, 3), 0.25)}, {}, f"{tokens}.npz")
               for tokens in (4, 6)]
    with pytest.raises(QCompileError, match=r"6\.npz: tensor 'h' has 6 positions.*share a sequence length"):
        collect_statistics(model, batches, {"h": None}, QUIET)
    stats = collect_statistics(model, batches, {"h": None}, StatsConfig(progress=False, per_index=False))["h"]
    assert stats.samples == 2 and stats.index_min is None and stats.count == (4 + 6) * 5


def test_unknown_tensor_initializer_and_bad_axis():
    model = matmul_model(np.ones((3, 5), np.float32))
    batches = [CalibrationBatch({"x": np.ones((1, 4, 3), np.float32)}, {}, "0.npz")]
    with pytest.raises(QCompileError, match="tensor 'nope' is not in the model"):
        collect_statistics(model, batches, {"h": None, "nope": None}, QUIET)
    with pytest.raises(QCompileError, match="tensor 'W' is a constant initializer"):
        collect_statistics(model, batches, {"W": None}, QUIET)
    with pytest.raises(QCompileError, match="tensor 'h': channel axis 0"):
        collect_statistics(model, batches, {"h": 0}, QUIET)


def test_external_data_model_is_read_through_memory_maps(tmp_path):
    # A model saved with external data is captured from its path: weights memory-mapped, never copied
    # into a proto; statistics equal those of the in-memory model bit for bit.
    rng = np.random.default_rng(6)
    weight = exact_values(rng, (3, 160), 0.5)
    model = matmul_model(weight)
    batches = make_batches(rng, [2, 1], (4, 3))
    expected = collect_statistics(model, batches, {"h": None}, QUIET)["h"]
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # onnx.save moves the weights of the proto it writes out to the file
    onnx.save(saved, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    for source in (model, tmp_path / "model.onnx"):
        stats = collect_statistics(source, batches, {"h": None, "y": None}, StatsConfig(progress=False,
                                                                                       tensors_per_run=1))["h"]
        np.testing.assert_array_equal(stats.channel_max, expected.channel_max)
        np.testing.assert_array_equal(stats.hist_counts, expected.hist_counts)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), weight)  # caller's model intact


def _fold(parts, bins: int = 64) -> TensorStats:
    stats = TensorStats.start("t", parts[0], 1, bins, per_index=True)
    for index, part in enumerate(parts):
        stats.update(part, f"{index}.npz")
    return stats


@pytest.mark.parametrize("seed", range(3))
def test_merged_shards_equal_one_pass_bitwise(seed):
    # Arbitrary float32 values (not exact multiples) over ranges that grow by factors that are not
    # powers of two, and a shard of zeros: histograms, sums and ranges of any grouping of the
    # batches, merged in data order, equal one pass over all of them (calibration on a cluster).
    rng = np.random.default_rng(seed)
    parts = [np.zeros((2, 3, 4), np.float32)]
    parts += [(rng.standard_normal((int(rng.integers(1, 4)), 3, 4)) * 3.0 ** k).astype(np.float32) for k in range(5)]
    parts[3][0, 0, 0] = np.inf  # one non-finite value, counted and left out on both paths
    whole = _fold(parts)
    assert whole.hist_edges[-1] == 2.0 ** np.ceil(np.log2(whole.absmax))  # a power of two: order-free
    for cuts in ([1, 3], [2], [1, 2, 3, 4, 5], [4]):
        shards = [_fold(parts[a:b]) for a, b in zip([0, *cuts], [*cuts, len(parts)])]
        merged = shards[0]
        for shard in shards[1:]:
            merged.merge(shard)
        for attribute in ("channel_min", "channel_max", "index_min", "index_max", "hist_counts", "hist_edges"):
            assert getattr(merged, attribute).tobytes() == getattr(whole, attribute).tobytes(), (cuts, attribute)
        assert (merged.samples, merged.count, merged.nonfinite, merged.sum_abs, merged.min, merged.max,
                merged.shape) == (whole.samples, whole.count, whole.nonfinite, whole.sum_abs, whole.min, whole.max,
                                  whole.shape)
    # The block sums are exact here (a few float32 values within 2^29 of each other fit float64's 53
    # bits) and are added without rounding: the total equals math.fsum over every finite |x|.
    finite = np.abs(np.concatenate([p.ravel() for p in parts]).astype(np.float64))
    assert whole.sum_abs == math.fsum(finite[np.isfinite(finite)])


def test_merge_refuses_statistics_of_another_layout():
    rng = np.random.default_rng(0)
    first = _fold([rng.standard_normal((2, 3, 4)).astype(np.float32)])
    with pytest.raises(QCompileError, match="has 5 channels"):
        first.merge(_fold([rng.standard_normal((2, 5, 4)).astype(np.float32)]))
    with pytest.raises(QCompileError, match="cannot be merged"):
        first.merge(TensorStats.empty("t", 1, 3, 4))
