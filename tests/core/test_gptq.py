"""GPTQ: lower layer-output error than round-to-nearest on correlated inputs; im2col rows of a Conv."""

import numpy as np
import pytest

from qcompiler.gptq import _scales, conv_patches, dequantize_codes, gptq_quantize


def _correlated_layer(n=32, k=128, m=2048, seed=0):
    """W [N, K] and inputs X [M, K] whose features are strongly correlated (a low-rank mix plus noise)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((16, k))
    x = rng.standard_normal((m, 16)) @ mix + 0.1 * rng.standard_normal((m, k))
    return rng.standard_normal((n, k)) / np.sqrt(k), x


def _rtn(w, bits, group, ratios=()):
    qmax = 2 ** (bits - 1) - 1
    if group is None:
        s = _scales(w, qmax, ratios)
        return np.clip(np.rint(w / s[:, None]), -qmax, qmax) * s[:, None]
    out = np.empty_like(w)
    for g in range(0, w.shape[1], group):
        s = _scales(w[:, g:g + group], qmax, ratios)
        out[:, g:g + group] = np.clip(np.rint(w[:, g:g + group] / s[:, None]), -qmax, qmax) * s[:, None]
    return out


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("ratios", [(), (1.0, 0.9, 0.8, 0.7)])
def test_gptq_lowers_the_layer_output_error(group, ratios):
    w, x = _correlated_layer()
    codes, scales = gptq_quantize(w, x.T @ x, bits=4, group=group, block=64, clip_ratios=ratios)
    assert np.abs(codes).max() <= 7
    w_gptq = dequantize_codes(codes, scales, group)
    w_rtn = _rtn(w, 4, group, ratios)
    held_out = _correlated_layer(seed=0, m=4096)[1][2048:]  # same mix, rows GPTQ did not see
    error = {name: np.sum((held_out @ (w - w_hat).T) ** 2) for name, w_hat in (("gptq", w_gptq), ("rtn", w_rtn))}
    assert error["gptq"] < 0.5 * error["rtn"]


def test_uncorrelated_identity_hessian_is_round_to_nearest():
    # With H = I, U is diagonal: no error is fed forward, so GPTQ rounds exactly like RTN.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64))
    codes, scales = gptq_quantize(w, np.eye(64), bits=4, group=32, block=64, damp=0.0)
    np.testing.assert_allclose(dequantize_codes(codes, scales, 32), _rtn(w, 4, 32), rtol=1e-6)


def test_dead_inputs_are_zeroed():
    w, x = _correlated_layer(k=64)
    x[:, 5] = 0.0
    codes, _ = gptq_quantize(w, x.T @ x, bits=4)
    assert not codes[:, 5].any()


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 1, 1, 0], "strides": [2, 2]},
                                   {"pads": [2, 2, 2, 2], "dilations": [2, 2]}])
def test_conv_patches_reproduce_the_convolution(attrs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    top, left, bottom, right = attrs["pads"]
    padded = torch.nn.functional.pad(torch.from_numpy(x), (left, right, top, bottom))
    y = torch.nn.functional.conv2d(padded, torch.from_numpy(weight), stride=attrs.get("strides", [1, 1]),
                                   dilation=attrs.get("dilations", [1, 1])).numpy()
    patches = conv_patches(x, attrs, (3, 3), rows=10_000, rng=np.random.default_rng(0))
    assert patches.shape == (y.shape[0] * y.shape[2] * y.shape[3], 27)   # every position when rows allow
    got = patches @ weight.reshape(4, -1).T                                # rows in (b, oh, ow) order
    np.testing.assert_allclose(got, y.transpose(0, 2, 3, 1).reshape(-1, 4), rtol=1e-4, atol=1e-4)


def test_grouped_conv_is_not_read():
    assert conv_patches(np.zeros((1, 4, 4, 4)), {"group": 2}, (3, 3), 10, np.random.default_rng(0)) is None
