"""salience_balance (PTQ4DiT CSB + SSC): the formula, the layers it picks on a DiT, exactness, no-match."""

import numpy as np
import pytest

from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import PassError
from qcompiler.graph import load_model
from qcompiler.pass_manager import EXACT_RTOL
from qcompiler.passes import SalienceBalance
from qcompiler.passes.salience_balance import activation_salience, balance, layer_role
from qcompiler.folding import find_scale_groups
from qcompiler.verify import compare_models
from tests import dit_graphs, fold_graphs
from tests.passes.helpers import context

QUIET = SalienceBalance.Config(progress=False)
needs_dit = pytest.mark.skipif(not dit_graphs.DIT.exists(), reason="dit_mnist.onnx not exported")


def test_spearman_weights_favour_timesteps_whose_salience_opposes_the_weights():
    weight = np.array([1.0, 2.0, 3.0, 0.5])
    units = np.array([[3.0, 2.0, 1.0, 0.0],    # ranks opposite to the weight's on the live channels
                      [1.0, 2.0, 3.0, 0.0]])   # same ranks
    from scipy.stats import spearmanr

    rho = np.array([spearmanr(u, weight).statistic for u in units])
    scale, eta = balance(units, weight, spearman=True)
    np.testing.assert_allclose(eta, np.exp(-rho) / np.exp(-rho).sum())  # η = softmax(−ρ)
    assert eta[0] > eta[1]
    blended = eta @ units
    np.testing.assert_allclose(scale[:3], np.sqrt(blended[:3] / (weight[:3] + 1e-8)))  # B = sqrt(s̃(X)/s(W))
    assert scale[3] == 1.0  # a channel that never fired keeps B = 1


def test_without_spearman_the_salience_is_the_max_over_timesteps():
    units = np.array([[4.0, 1.0], [1.0, 9.0]])
    scale, eta = balance(units, np.array([1.0, 4.0]), spearman=False)
    np.testing.assert_allclose(scale, [2.0, 1.5], rtol=1e-6)  # sqrt(4/1), sqrt(9/4): SmoothQuant α = 0.5
    np.testing.assert_allclose(eta, [0.5, 0.5])


@needs_dit
def test_dit_layers_are_the_papers_and_the_fold_is_exact():
    model = load_model(dit_graphs.DIT)
    batches = dit_graphs.dit_batches(count=3)
    ctx = CompileContext(model, QuantSettings(), batches)
    roles = [layer_role(ctx.graph, group) for group in find_scale_groups(ctx.graph)]
    # 4 blocks: qkv and fc1 after AdaLN, the out-projection after P·V; plus the final layer's modulated projection.
    assert roles.count("modulated") == 9 and roles.count("attention_output") == 4
    result = SalienceBalance(QUIET).call(ctx)
    assert result.modified and "9 AdaLN modulation, 4 value projection" in result.notes[1]
    assert ctx.fallbacks == []  # every 1/B folded: nothing runs at run time
    assert compare_models(model, ctx.model(), batches) <= EXACT_RTOL


@needs_dit
def test_salience_units_are_the_calibrated_timesteps():
    batches = dit_graphs.dit_batches(count=3)
    ctx = CompileContext(load_model(dit_graphs.DIT), QuantSettings(), batches)
    group = find_scale_groups(ctx.graph)[-1]
    salience = activation_salience(ctx, [group], batches, progress=False)[group.name]
    assert sorted(salience) == sorted(int(b.metadata["__timestep__"][0]) for b in batches)
    assert all(unit.shape == (group.channels,) and np.all(unit >= 0) for unit in salience.values())


def test_other_layers_fall_back_to_an_explicit_mul_and_stay_exact():
    model = fold_graphs.block_model()
    ctx = context(model, {"x": (2, 4, 8)})
    result = SalienceBalance(SalienceBalance.Config(roles=("attention_output", "other"), progress=False)).call(ctx)
    assert "1 attention_output" in result.notes[0]
    assert len(ctx.fallbacks) == 1 and "'gelu'" in ctx.fallbacks[0]  # fc2 after GELU: no producer absorbs 1/B
    assert compare_models(model, ctx.model(), ctx.calibration) <= EXACT_RTOL


def test_no_modulated_or_attention_layer_is_no_match():
    ctx = context(fold_graphs.linear_chain_model(), {"x": (2, 4, 8)})
    result = SalienceBalance(QUIET).call(ctx)
    assert not result.modified and "no Linear input in roles" in result.notes[0]


def test_requires_calibration():
    with pytest.raises(PassError, match="calibration"):
        SalienceBalance(QUIET).requires(CompileContext(fold_graphs.block_model(), QuantSettings()))


@pytest.mark.parametrize("bad", [dict(roles=()), dict(roles=("fc2",)), dict(batches=0)])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        SalienceBalance.Config(**bad)
