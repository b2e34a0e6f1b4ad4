"""The TensorRT target on small graphs: exact rewrites, stated error bounds, replacements and refusals.

Exactness is checked before quantization: with every activation Q/DQ pair bypassed, the lowered
graph must compute what the graph with integer weights and float activations computes (the shift
X' = X − c and its correction c·ΣŴ, the DGQ affine up to W' re-quantization). The quantized output
then stays within |ΔY[.., n]| ≤ Σ_k |Ŵ[k, n]|·s'/2 (one activation grid, |X − X̂| ≤ s'/2).
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from qcompiler.calibration.readers import CalibrationBatch
from qcompiler.context import CompileContext, QuantSettings
from qcompiler.errors import QCompileError
from qcompiler.passes import (
    DgqGroups,
    InsertActivationQDQ,
    Log2Attention,
    QuantizeWeights,
)
from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.quant import sqnr_db
from qcompiler.runtimes.ort import make_session
from qcompiler.targets.ort import OrtTarget
from qcompiler.targets.tensorrt import TensorRTTarget
from qcompiler.targets.tensorrt_rules import check
from tests import graphs
from tests.targets.test_ort_affine import ln_linear_model

RTOL = 1e-5


def _batches(arrays, name="x"):
    return [CalibrationBatch({name: x}, {}, f"test#{i}") for i, x in enumerate(arrays)]


def _compile(model, arrays, target, wbits=8, abits=8, before=(), groups=None):
    ctx = CompileContext(model, QuantSettings(wbits=wbits, abits=abits), _batches(arrays))
    for step in before:
        step.call(ctx)
    QuantizeWeights().call(ctx)
    reference = ctx.model()  # integer weights, float activations
    if groups:
        DgqGroups(DgqGroupsConfig(groups=groups, validate=False)).call(ctx)
    InsertActivationQDQ(InsertActivationQDQ.Config(quantize_conv_outputs=target is OrtTarget)).call(ctx)
    assert target().lower(ctx).modified
    return ctx, reference


def _run(model, feeds):
    session = make_session(model, optimize=False)
    return session.run(None, feeds)


def _bypass_activation_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Readers of every activation DQ read the float tensor its Q quantizes (weights stay integer)."""
    graph = gs.import_onnx(model)
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant)]:
        for dq in list(q.outputs[0].outputs):
            for reader in list(dq.outputs[0].outputs):
                for index, tensor in enumerate(reader.inputs):
                    if tensor is dq.outputs[0]:
                        reader.inputs[index] = q.inputs[0]
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out


def _ln_data(seed=0, count=3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 4, 16)).astype(np.float32) for _ in range(count)]


def test_layernorm_takes_the_shift_exactly():
    ctx, reference = _compile(ln_linear_model(), _ln_data(), TensorRTTarget)
    model = ctx.model()
    assert check(model) == []
    records = [r for r in ctx.records if r.role == "activation"]
    assert records and all(r.details["form"] == "shift" and "LayerNormalization" in r.details["shift_into"]
                           for r in records)
    x = _ln_data(seed=5, count=1)[0]
    got, = _run(_bypass_activation_qdq(model), {"x": x})
    want, = _run(reference, {"x": x})
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def test_quantized_output_within_the_activation_bound():
    ctx, _ = _compile(ln_linear_model(), _ln_data(), TensorRTTarget)
    model = ctx.model()
    q = next(n for n in ctx.graph.nodes if n.op == "QuantizeLinear")
    scale = float(np.asarray(q.inputs[1].values).reshape(-1)[0])
    weight = next(n for n in ctx.graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant))
    w_hat = weight.inputs[0].values.astype(np.float64) * weight.inputs[1].values[None, :]
    x = _ln_data(count=1)[0]  # inside the calibrated range: no clipping
    got, = _run(model, {"x": x})
    exact, = _run(_bypass_activation_qdq(model), {"x": x})
    bound = np.abs(w_hat).sum(axis=0) * scale / 2  # per output channel
    assert np.all(np.abs(got - exact) <= bound * (1 + 1e-5) + 1e-6)


def _conv_chain(shifted_bias=3.0):
    """x → Conv 3×3 (padded, bias + 3) → c1 → Conv 1×1 → y: c1 is asymmetric, written by a biased Conv."""
    rng = np.random.default_rng(0)
    inits = [graphs.init("w1", rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3),
             graphs.init("b1", (rng.standard_normal(8) * 0.1 + shifted_bias).astype(np.float32)),
             graphs.init("w2", rng.standard_normal((6, 8, 1, 1)).astype(np.float32) * 0.3)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["y"], name="conv2")]
    return graphs.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 8, 8])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, 8, 8])], inits)


def test_conv_bias_takes_the_shift_and_a_graph_input_gets_a_covering_range():
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((2, 4, 8, 8)) + 1.0).astype(np.float32) for _ in range(3)]
    ctx, reference = _compile(_conv_chain(), data, TensorRTTarget)
    forms = {r.node: r.details["form"] for r in ctx.records if r.role == "activation"}
    assert forms == {"conv1": "covering", "conv2": "shift"}  # x has no producer; c1 = Conv + bias
    model = ctx.model()
    assert check(model) == []
    got, = _run(_bypass_activation_qdq(model), {"x": data[0]})
    want, = _run(reference, {"x": data[0]})
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def test_a_shift_is_not_folded_behind_a_padded_conv():
    # c1 feeds a padded Conv: a padded 0 of c1 − c would stand for c1 = c, so the range covers instead
    model = _conv_chain()
    model.graph.node[1].attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    rng = np.random.default_rng(1)
    data = [(rng.standard_normal((2, 4, 8, 8)) + 1.0).astype(np.float32) for _ in range(2)]
    ctx, _ = _compile(model, data, TensorRTTarget)
    assert {r.details["form"] for r in ctx.records if r.role == "activation"} == {"covering"}


def test_int4_matmul_weights_become_a_blocked_dequantize_at_opset_21():
    model = graphs.linear_model(k=64, n=8)
    rng = np.random.default_rng(2)
    data = [rng.standard_normal((2, 4, 64)).astype(np.float32) for _ in range(2)]
    ctx, reference = _compile(model, data, TensorRTTarget, wbits=4)
    out = ctx.model()
    assert check(out) == []
    assert {o.domain: o.version for o in out.opset_import} == {"": 21}
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    weight = next(t for t in out.graph.initializer if t.name == dq.input[0])
    assert weight.data_type == TensorProto.INT4 and len(weight.raw_data) == 64 * 8 // 2  # two values per byte
    # Weight-only: the MatMul reads the float activation, so the output is X·Ŵ + b exactly as
    # MatMulNBits computes it (accuracy_level 0 there: float math).
    assert not any(n.op_type == "QuantizeLinear" for n in out.graph.node)
    session = make_session(reference, optimize=False)
    for node in reference.graph.node:
        if node.op_type == "MatMulNBits":
            next(a for a in node.attribute if a.name == "accuracy_level").i = 0
    want, = make_session(reference, optimize=False).run(None, {"x": data[0]})
    got, = _run(out, {"x": data[0]})
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    del session


def test_dgq_channel_groups_become_one_symmetric_grid_within_1_db_of_ort():
    from tests.passes.test_dgq_groups import channel_outliers

    rng = np.random.default_rng(0)
    data = []
    for _ in range(3):
        x = rng.standard_normal((2, 4, 16)).astype(np.float32)
        channel_outliers(x)
        data.append(x)
    held = data[0] * 0.9
    outputs = {}
    for target in (OrtTarget, TensorRTTarget):
        ctx, reference = _compile(ln_linear_model(), data, target, groups=4)
        model = ctx.model()
        outputs[target.name] = _run(model, {"x": held})[0]
        if target is TensorRTTarget:
            assert check(model) == []
            lowered = {r.lowering for r in ctx.records if r.role == "activation" and "groups" in r.details}
            assert lowered == {"symmetric per-tensor affine (one int8 GEMM)"}
    want, = _run(reference, {"x": held})
    ort, trt = sqnr_db(want, outputs["ort"]), sqnr_db(want, outputs["tensorrt"])
    # The same 256 levels per group as DGQ's grids; only W' = diag(r)·W is re-quantized: far inside 1 dB.
    assert trt >= ort - 1.0, (ort, trt)


def test_log2_attention_is_replaced_by_float_probabilities():
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((2, 4, 8)).astype(np.float32) for _ in range(2)]
    ctx, _ = _compile(graphs.attention_model(), data, TensorRTTarget, before=[Log2Attention()])
    model = ctx.model()
    assert check(model) == []
    assert not any("log2_attention" in n.name for n in model.graph.node)
    assert any("log2 attention" in f for f in ctx.fallbacks)
    assert all("replaced" in r.lowering for r in ctx.records if r.pass_name == "log2_attention")


def test_sub_8_bit_activations_run_as_int8_over_the_same_range():
    ctx, _ = _compile(ln_linear_model(), _ln_data(), TensorRTTarget, abits=6)
    model = ctx.model()
    assert check(model) == []
    assert not any(n.op_type == "Clip" for n in model.graph.node)
    assert any("6-bit activation" in f for f in ctx.fallbacks)


def test_a_contrib_op_in_the_input_is_refused_naming_the_node():
    model = graphs.linear_model()
    model.graph.node[-1].op_type, model.graph.node[-1].domain = "FusedGelu", "com.microsoft"
    with pytest.raises(QCompileError, match=r"node 'relu' is com.microsoft:FusedGelu") as error:
        TensorRTTarget().check_model(model, "m.onnx")
    assert "\n" not in str(error.value)


def test_cli_writes_a_tensorrt_model_and_refuses_ort_only_options(tmp_path, capsys):
    from qcompiler.cli.main import main

    model_path, calib = tmp_path / "model.onnx", tmp_path / "calib"
    onnx.save(ln_linear_model(), model_path)
    calib.mkdir()
    for index, x in enumerate(_ln_data()):
        np.savez(calib / f"{index}.npz", x=x)
    out = tmp_path / "out.onnx"
    assert main([str(model_path), "--calib", str(calib), "--target", "tensorrt", "-o", str(out)]) == 0
    assert check(out) == []
    capsys.readouterr()
    code = main([str(model_path), "--calib", str(calib), "--target", "tensorrt", "--channel-groups", "split",
                 "-o", str(tmp_path / "out2.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--channel-groups split" in err, err
    assert not (tmp_path / "out2.onnx").exists()
    code = main([str(model_path), "--calib", str(calib), "--target", "tensorrt", "--timestep-groups", "integer",
                 "-o", str(tmp_path / "out3.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "--timestep-groups integer" in err, err
    assert not (tmp_path / "out3.onnx").exists()


def test_an_input_no_producer_can_shift_gets_an_explicit_sub():
    # x is a graph input read by one MatMul: Sub(c) before the Q, c·ΣŴ in the bias; exact before rounding
    rng = np.random.default_rng(4)
    data = [(rng.standard_normal((2, 4, 16)) + 2.0).astype(np.float32) for _ in range(2)]
    ctx, reference = _compile(graphs.linear_model(), data, TensorRTTarget)
    records = [r for r in ctx.records if r.role == "activation"]
    assert [(r.details["form"], r.details["shift_into"]) for r in records] == \
        [("shift", "an explicit Sub before the QuantizeLinear")]
    model = ctx.model()
    assert check(model) == []
    got, = _run(_bypass_activation_qdq(model), {"x": data[1]})
    want, = _run(reference, {"x": data[1]})
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def test_the_shifted_grid_is_the_uint8_grid_and_keeps_zero_on_it():
    # c = s·(128 − z): the int8 code of X − c is the uint8 code of X − 128, so X = 0 is still a grid
    # point. A centred shift would move 0 up to s/2 off the grid, an error of (s/2)·Σ|Ŵ| per output.
    from qcompiler.lowering.symmetric import int8_grid

    step, shift = int8_grid(-1.3, 4.1)
    zero = round(1.3 / step)
    assert step == pytest.approx(5.4 / 255, rel=1e-6) and shift == pytest.approx(step * (128 - zero), rel=1e-6)
    assert int8_grid(-128.0, 127.0) == (1.0, 0.0)  # already centred on int8: no shift
    rng = np.random.default_rng(4)
    data = [(rng.standard_normal((2, 4, 16)) + 2.0).astype(np.float32) for _ in range(2)]
    ctx, reference = _compile(graphs.linear_model(), data, TensorRTTarget)
    model = ctx.model()
    assert [r.details["shift_into"] for r in ctx.records if r.role == "activation"] == \
        ["an explicit Sub before the QuantizeLinear"]
    x = data[1].copy()
    x[:, :2] = 0.0  # whole rows of exact zeros (padding, ReLU/GELU outputs)
    got, = _run(model, {"x": x})
    want, = _run(reference, {"x": x})
    scale = next(float(np.reshape(n.inputs[1].values, -1)[0]) for n in ctx.graph.nodes if n.op == "QuantizeLinear")
    weights = next(n for n in ctx.graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant))
    w_hat = weights.inputs[0].values.astype(np.float64) * weights.inputs[1].values[None, :]
    # float rounding of X − c and of the c·ΣŴ correction only: far below the s/2 of an off-grid 0
    np.testing.assert_allclose(got[:, :2], want[:, :2], rtol=0, atol=1e-3 * scale * np.abs(w_hat).sum(axis=0).max())


def test_qdit_is_refused_before_any_work_naming_its_pass(tmp_path, capsys):
    from qcompiler.cli.main import main

    model_path = tmp_path / "model.onnx"
    onnx.save(ln_linear_model(), model_path)
    out = tmp_path / "out.onnx"
    code = main([str(model_path), "--recipe", "qdit", "--target", "tensorrt", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    # no calibration given: the refusal comes first, before the calibration check
    assert code == 2 and err.count("\n") == 0 and "pass 'qdit_groups'" in err and "run time" in err, err
    assert not out.exists()
