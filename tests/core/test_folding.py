"""qcompiler.folding: scale groups, what absorbs X' = (X − z)/s, and exactness of every fold target in ORT."""

from collections import Counter

import numpy as np
import pytest

from qcompiler.context import CompileContext, QuantSettings
from qcompiler.folding import find_absorber, find_scale_groups, fold
from qcompiler.pass_manager import EXACT_RTOL
from qcompiler.verify import compare_models, random_batches
from tests import fold_graphs, graphs


def _group(ctx, tensor):
    return next(g for g in find_scale_groups(ctx.graph, include_conv=True) if g.name == tensor)


def _fold(model, tensor, shift=True, seed=0):
    """Fold a random s (e^U(−1.5, 1.5): up to 4.5× either way) and z ~ N(0, 1) into ``tensor``'s group."""
    ctx = CompileContext(model, QuantSettings())
    group = _group(ctx, tensor)
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-1.5, 1.5, group.channels))
    kind = fold(ctx, group, scale, rng.standard_normal(group.channels) if shift else None)
    return ctx, kind


def _ops(model):
    return Counter(node.op_type for node in model.graph.node)


ABSORBED = [
    (fold_graphs.block_model, "ln1.out", "LayerNormalization"),
    (fold_graphs.block_model, "ln2.out", "LayerNormalization"),
    (lambda: fold_graphs.outlier_model(use_beta=False), "ln.out", "LayerNormalization"),
    (fold_graphs.block_model, "merged", "value projection"),
    (lambda: fold_graphs.norm_conv_model("group"), "n", "GroupNormalization"),
    (lambda: fold_graphs.norm_conv_model("instance"), "n", "InstanceNormalization"),
    (fold_graphs.linear_chain_model, "fc1.out", "Linear"),
    (fold_graphs.gemm_chain_model, "h", "Linear"),
    (fold_graphs.conv_chain_model, "h", "Conv"),
]
EXPLICIT = [
    (fold_graphs.block_model, "gelu"),
    (lambda: fold_graphs.activation_linear_model("silu"), "act"),
    (graphs.linear_model, "x"),
    (lambda: fold_graphs.block_model(post_ln=True), "ln1.out"),
    (lambda: fold_graphs.block_model(scrambled=True), "merged"),
]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("build, tensor, kind", ABSORBED)
def test_absorbed_fold_is_exact_and_adds_no_node(build, tensor, kind, shift):
    model = build()
    ctx, result = _fold(model, tensor, shift)
    assert result.split(":")[0] == kind and ctx.fallbacks == []
    folded = ctx.model()
    assert _ops(folded) == _ops(model)  # constants changed (a LayerNorm may gain β), not ops: free at run time
    assert compare_models(model, folded, random_batches(model, count=2, seed=1)) <= EXACT_RTOL


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("build, tensor", EXPLICIT)
def test_explicit_fallback_is_exact_and_counted(build, tensor, shift):
    model = build()
    ctx, result = _fold(model, tensor, shift)
    ops = 2 if shift else 1  # Sub(z) and Mul(1/s), or Mul alone
    assert result == f"explicit: {ops} elementwise op{'s' if shift else ''} ({'Sub+Mul' if shift else 'Mul'})"
    folded = ctx.model()
    assert _ops(folded) - _ops(model) == Counter(["Sub", "Mul"] if shift else ["Mul"])
    (note,) = ctx.fallbacks
    assert f"'{tensor}'" in note and f"costs {ops} elementwise op" in note
    assert compare_models(model, folded, random_batches(model, count=2, seed=1)) <= EXACT_RTOL


def test_bias_free_linear_producer_gets_a_bias_for_the_shift():
    model = fold_graphs.linear_chain_model(first_bias=False)
    ctx, result = _fold(model, "fc1.mm")
    folded = ctx.model()
    assert result.startswith("Linear") and _ops(folded) - _ops(model) == Counter(["Add"])  # −z/s needs a bias
    assert compare_models(model, folded, random_batches(model, count=2, seed=1)) <= EXACT_RTOL


def test_qkv_share_one_group_and_every_linear_input_is_found():
    groups = find_scale_groups(CompileContext(fold_graphs.block_model(), QuantSettings()).graph)
    assert {g.name: sorted(u.node.name for u in g.consumers) for g in groups} == {
        "ln1.out": ["k", "q", "v"], "merged": ["o"], "ln2.out": ["fc1"], "gelu": ["fc2"]}


def test_no_group_without_constant_weights():
    ctx = CompileContext(graphs.linear_model(constant_weight=False), QuantSettings())
    assert find_scale_groups(ctx.graph, include_conv=True) == []


@pytest.mark.parametrize("build, tensor, reason", [
    (lambda: fold_graphs.block_model(post_ln=True), "ln1.out", "also read by residual1"),
    (lambda: fold_graphs.block_model(scrambled=True), "merged", "Reshape 'merge' moves channels"),
    (fold_graphs.block_model, "gelu", "not written by a Norm, Linear, Conv"),
    (graphs.linear_model, "x", "not written by a Norm, Linear, Conv"),
])
def test_no_absorber_says_why(build, tensor, reason):
    ctx = CompileContext(build(), QuantSettings())
    assert reason in find_absorber(ctx.graph, _group(ctx, tensor)).reason


def test_shift_into_padded_conv_is_refused():
    ctx = CompileContext(fold_graphs.conv_chain_model(second_kernel=3), QuantSettings())
    group = _group(ctx, "h")
    assert not group.shift_exact  # a padded zero of X' would stand for X = z, not 0
    with pytest.raises(ValueError, match="padded Conv"):
        fold(ctx, group, np.ones(group.channels), np.ones(group.channels))
    assert fold(ctx, group, np.full(group.channels, 2.0)) == "Conv: 'conv1'"  # a scale alone stays exact


@pytest.mark.parametrize("scale", [np.zeros(8), np.full(8, np.inf), np.ones(7)])
def test_invalid_scale_is_refused(scale):
    ctx = CompileContext(fold_graphs.block_model(), QuantSettings())
    with pytest.raises(ValueError, match="finite values, scale > 0"):
        fold(ctx, _group(ctx, "ln1.out"), scale)
