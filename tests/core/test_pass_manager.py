"""The pass manager: timing, --verify (exact passes held to 1e-5), --dump-after, errors naming the pass."""

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from qcompiler.errors import InternalError, QCompileError
from qcompiler.pass_manager import ManagerOptions, Pass, PassManager, PassResult
from qcompiler.passes import InsertActivationQDQ, QuantizeWeights
from tests import graphs
from tests.passes.helpers import context


class ScaleWeights(Pass):
    """W → W·factor: exact only when factor == 1 (used to prove the 1e-5 check can fail)."""

    name = "scale_weights"
    exact = True

    @dataclass(frozen=True)
    class Config:
        factor: float = 1.0

    def call(self, ctx):
        for tensor in ctx.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.name == "W":
                tensor.values = (tensor.values * self.config.factor).astype(np.float32)
        return PassResult(self.config.factor != 1.0)


class Broken(Pass):
    name = "broken"

    def call(self, ctx):
        for node in ctx.graph.nodes:  # the failing node is found from the traceback's locals
            if node.op == "MatMul":
                raise RuntimeError("boom")


def test_records_timing_and_verify_quantizing_passes():
    ctx = context(graphs.linear_model(), {"x": (2, 4, 16)})
    records = PassManager([QuantizeWeights(), InsertActivationQDQ()], ManagerOptions(verify=True, progress=False)).run(ctx)
    assert [r.name for r in records] == ["quantize_weights", "insert_activation_qdq"]
    assert all(r.modified for r in records)
    assert 0 < records[-1].verify["max_relative_error"] < 0.1  # quantizing: small but not zero


def test_exact_pass_within_tolerance_passes():
    ctx = context(graphs.linear_model(), {"x": (2, 4, 16)})
    (record,) = PassManager([ScaleWeights(ScaleWeights.Config(1.0))], ManagerOptions(verify=True, progress=False)).run(ctx)
    assert record.verify["max_relative_error"] == 0.0


def test_exact_pass_that_changes_outputs_is_caught():
    ctx = context(graphs.linear_model(), {"x": (2, 4, 16)})
    manager = PassManager([ScaleWeights(ScaleWeights.Config(1.001))], ManagerOptions(verify=True, progress=False))
    with pytest.raises(InternalError, match="internal error: pass 'scale_weights' is an equivalence"):
        manager.run(ctx)


def test_a_bug_in_a_pass_is_an_internal_error_naming_the_pass_and_node():
    ctx = context(graphs.linear_model(), {"x": (2, 4, 16)})
    with pytest.raises(InternalError, match=r"internal error in pass 'broken' on node 'fc': RuntimeError: boom") as info:
        PassManager([QuantizeWeights(), Broken()], ManagerOptions(progress=False)).run(ctx)
    assert not isinstance(info.value, QCompileError)  # exit code 1, not a user error
    assert info.value.pass_name == "broken" and isinstance(info.value.__cause__, RuntimeError)


def test_dump_after_writes_a_loadable_model(tmp_path):
    ctx = context(graphs.linear_model(), {"x": (2, 4, 16)})
    options = ManagerOptions(dump_after=("quantize_weights",), dump_prefix=str(tmp_path / "m"), progress=False)
    PassManager([QuantizeWeights(), InsertActivationQDQ()], options).run(ctx)
    dumped = onnx.load(tmp_path / "m.after-quantize_weights.onnx")
    onnx.checker.check_model(dumped, full_check=True)
    from qcompiler.runtimes.ort import make_session

    make_session(tmp_path / "m.after-quantize_weights.onnx")  # opens in ORT as well as in Netron
    assert "QuantizeLinear" not in [n.op_type for n in dumped.graph.node]


def test_dump_after_unknown_pass_is_a_user_error():
    with pytest.raises(QCompileError, match="no pass named"):
        PassManager([QuantizeWeights()], ManagerOptions(dump_after=("nope",)))
