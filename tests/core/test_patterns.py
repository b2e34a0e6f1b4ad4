"""Pattern matching on small hand-built graphs: one match and one no-match case per unit."""

from qcompiler.graph import to_graph
from qcompiler.patterns import (NoMatch, find_attention, find_convs, find_linears, find_norms,
                                find_skip_concats, match_linear)
from tests import graphs


def _node(graph, name):
    return next(node for node in graph.nodes if node.name == name)


def test_linear_with_bias_matches():
    graph = to_graph(graphs.linear_model(bias=True))
    (linear,) = find_linears(graph)
    assert linear.node.name == "fc" and linear.bias_node.name == "fc_bias"
    assert linear.output.name == "biased" and linear.weight_out_axis == 1


def test_linear_without_bias_matches():
    (linear,) = find_linears(to_graph(graphs.linear_model(bias=False)))
    assert linear.bias is None and linear.output.name == "mm"


def test_matmul_with_variable_weight_does_not_match_and_says_why():
    graph = to_graph(graphs.linear_model(constant_weight=False))
    result = match_linear(_node(graph, "fc"))
    assert isinstance(result, NoMatch) and "not constant" in result.reason
    assert find_linears(graph) == []


def test_conv_matches_and_linear_model_has_none():
    assert [c.node.name for c in find_convs(to_graph(graphs.conv_model()))] == ["conv1", "conv2"]
    assert find_convs(to_graph(graphs.linear_model())) == []


def test_self_attention():
    (attention,) = find_attention(to_graph(graphs.attention_model(cross=False)))
    assert attention.kind == "self" and attention.softmax.name == "softmax" and attention.value_matmul.name == "av"


def test_cross_attention():
    (attention,) = find_attention(to_graph(graphs.attention_model(cross=True)))
    assert attention.kind == "cross"


def test_no_attention_without_softmax():
    assert find_attention(to_graph(graphs.linear_model())) == []


def test_layernorm_and_instance_groupnorm_forms():
    (layernorm,) = find_norms(to_graph(graphs.layernorm_model()))
    assert layernorm.kind == "LayerNormalization" and layernorm.gamma.name == "gamma"
    (groupnorm,) = find_norms(to_graph(graphs.instance_groupnorm_model()))
    assert groupnorm.kind == "InstanceNormalization"
    assert groupnorm.gamma.name == "gamma" and groupnorm.beta.name == "beta" and groupnorm.output.name == "y"


def test_no_norm_in_linear_model():
    assert find_norms(to_graph(graphs.linear_model())) == []


def test_skip_concat_feeding_conv_matches():
    (skip,) = find_skip_concats(to_graph(graphs.skip_concat_model(feeds_conv=True)))
    assert skip.concat.name == "skip_cat" and [c.name for c in skip.consumers] == ["shortcut"]


def test_skip_concat_not_feeding_gemm_does_not_match():
    assert find_skip_concats(to_graph(graphs.skip_concat_model(feeds_conv=False))) == []


def test_attention_kind_survives_weight_and_activation_quantization():
    from tests.passes.helpers import context
    from qcompiler.passes import InsertActivationQDQ, QuantizeWeights

    for cross, kind in ((False, "self"), (True, "cross")):
        shapes = {"x": (2, 4, 8)} | ({"ctx": (2, 3, 8)} if cross else {})
        ctx = context(graphs.attention_model(cross=cross), shapes)
        QuantizeWeights().call(ctx)
        InsertActivationQDQ().call(ctx)
        (attention,) = find_attention(ctx.graph)
        assert attention.kind == kind
