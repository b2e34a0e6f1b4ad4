"""qcompiler.modulation: AdaLN modulations found, X/s − z/s folded into them exactly, per-sample Mul fallbacks counted."""

from collections import Counter

import numpy as np
import pytest

from qcompiler.context import CompileContext, QuantSettings
from qcompiler.folding import find_absorber, find_scale_groups, fold
from qcompiler.graph import load_model
from qcompiler.modulation import _slice_bounds, match_modulation
from qcompiler.pass_manager import EXACT_RTOL
from qcompiler.verify import compare_models, random_batches
from tests import dit_graphs, fold_graphs

needs_dit = pytest.mark.skipif(not dit_graphs.DIT.exists(), reason="dit_mnist.onnx not exported")


def _ops(model):
    """Op counts without Constant nodes (a folded constant becomes an initializer)."""
    return Counter(node.op_type for node in model.graph.node if node.op_type != "Constant")


def _fold_modulated(model, shift: bool, seed: int = 0):
    """Fold a random s (e^U(−1.5, 1.5)) and z ~ N(0, 1) into every group an AdaLN modulation writes."""
    ctx = CompileContext(model, QuantSettings())
    rng = np.random.default_rng(seed)
    groups = [g for g in find_scale_groups(ctx.graph)
              if getattr(find_absorber(ctx.graph, g), "kind", None) == "AdaLN modulation"]
    for group in reversed(groups):
        scale = np.exp(rng.uniform(-1.5, 1.5, group.channels))
        result = fold(ctx, group, scale, rng.standard_normal(group.channels) if shift else None, "test")
        assert result.startswith("AdaLN modulation")
    ctx.graph.cleanup().toposort()
    return ctx, groups


@needs_dit
def test_dit_slice_bounds_are_computed_from_static_dims():
    # diffusers' chunk(6) exports Slice bounds as Shape → Gather → Add → Div → Mul of the Gemm's (batch, 576)
    # output: (576 + 5) // 6 = 96, so the scale chunk (the second of six) is [96, 192) on axis 1.
    graph = CompileContext(load_model(dit_graphs.DIT), QuantSettings()).graph
    node = next(n for n in graph.nodes if n.name == "/dit/transformer_blocks.0/norm1/Slice_1")
    assert _slice_bounds(node, 2) == (1, 96, 192)


@needs_dit
@pytest.mark.parametrize("shift", [False, True])
def test_zoo_dit_folds_into_the_modulation_linears(shift):
    model = load_model(dit_graphs.DIT)
    ctx, groups = _fold_modulated(model, shift)
    assert len(groups) == 9  # qkv and fc1 of 4 blocks, and the final layer's projection
    assert ctx.fallbacks == []  # every S and T traced to its block's modulation Gemm rows
    folded = ctx.model()
    assert _ops(folded) == _ops(model)  # constants changed, not ops: free at run time
    assert compare_models(model, folded, dit_graphs.dit_batches(count=2)) <= EXACT_RTOL


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    pytest.importorskip("diffusers")
    return dit_graphs.pixart_model(tmp_path_factory.mktemp("pixart"))


@pytest.mark.parametrize("shift", [False, True])
def test_pixart_folds_into_its_table_and_one_per_sample_mul_per_block(pixart, shift):
    model = pixart
    ctx, groups = _fold_modulated(model, shift)
    layers = dit_graphs.PIXART_SMALL["num_layers"]
    assert len(groups) == 2 * layers + 1
    # Each block's scale_shift_table takes its rows; the shared adaln_single Linear cannot, so each block gets one
    # Mul on its (B, 6·C) timestep vector (merged for qkv and fc1), and the final layer one on its (B, 1, C) term.
    shared = [note for note in ctx.fallbacks if "adaln_single/linear/Gemm_output_0" in note]
    assert len(shared) == layers and len(ctx.fallbacks) == layers + 1
    assert all("per sample" in note for note in ctx.fallbacks)
    folded = ctx.model()
    assert _ops(folded) - _ops(model) == Counter({"Mul": layers + 1})
    assert compare_models(model, folded, random_batches(model, count=2, seed=1)) <= EXACT_RTOL


@pytest.mark.parametrize("shift", [False, True])
def test_hand_built_block_folds_into_its_linear(shift):
    model = dit_graphs.modulated_block("linear")
    ctx, groups = _fold_modulated(model, shift)
    assert len(groups) == 1 and ctx.fallbacks == []
    assert compare_models(model, ctx.model(), random_batches(model, count=2, seed=1)) <= EXACT_RTOL


@pytest.mark.parametrize("shift", [False, True])
def test_modulation_without_a_linear_falls_back_to_counted_per_sample_muls(shift):
    model = dit_graphs.modulated_block("sigmoid")
    ctx, _ = _fold_modulated(model, shift)
    # 1 + Sigmoid(c): the "1" becomes 1/s, the Sigmoid output gets a Mul; the shift input gets Mul (+ Add for −z/s).
    assert len(ctx.fallbacks) == 2
    assert any("'gate'" in note for note in ctx.fallbacks) and any("'shift'" in note for note in ctx.fallbacks)
    expected = Counter({"Mul": 2, "Add": 1}) if shift else Counter({"Mul": 2})
    folded = ctx.model()
    assert _ops(folded) - _ops(model) == expected
    assert compare_models(model, folded, random_batches(model, count=2, seed=1)) <= EXACT_RTOL


def test_plain_norm_output_is_no_modulation():
    ctx = CompileContext(fold_graphs.block_model(), QuantSettings())
    tensor = ctx.graph.tensors()["ln1.out"]
    assert "not written by Add(Mul(norm, scale), shift)" in match_modulation(tensor).reason
    # the GELU output is a Mul of two activations, neither a Norm output
    assert not match_modulation(ctx.graph.tensors()["gelu"])


def test_silu_of_a_norm_output_is_no_modulation():
    import onnx_graphsurgeon as gs

    graph = gs.Graph()
    x = gs.Variable("x", np.float32, ["B", 4, 8])
    n, sig, out = (gs.Variable(name, np.float32, ["B", 4, 8]) for name in ("n", "sig", "out"))
    gamma = gs.Constant("g", np.ones(8, np.float32))
    graph.nodes = [gs.Node("LayerNormalization", "ln", inputs=[x, gamma], outputs=[n]),
                   gs.Node("Sigmoid", "sigmoid", inputs=[n], outputs=[sig]),
                   gs.Node("Mul", "silu", inputs=[n, sig], outputs=[out])]
    assert not match_modulation(out)  # the "scale" is computed from N itself: per token, not per sample
