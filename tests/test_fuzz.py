"""Property-based robustness (Hypothesis): random graphs through every recipe, malformed inputs to the CLI.

Random graphs (tests/fuzz_graphs.py): every recipe compiles them with ``--verify`` (onnx.checker
and ORT after each pass; equivalence passes held to 1e-5 relative by the pass manager), the
output passes onnx.checker, loads in ORT, runs on new inputs with finite outputs, and no
internal error is raised. Malformed inputs (truncated or byte-flipped model files, calibration
with a wrong dtype, shape or NaN/Inf, a graph with a cycle or an op no runtime knows) end with
exit code 0 or 2 — never 1 — one line on stderr for 2, and never a file at the output path.

The example budget is fixed (``EXAMPLES`` below; derandomized, so CI runs the same cases).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from qcompiler import api
from qcompiler.api import CompileOptions
from qcompiler.cli.main import main
from qcompiler.recipes import available_recipes, get_recipe
from qcompiler.runtimes.ort import make_session
from tests import graphs
from tests.fuzz_graphs import IMAGE_BLOCKS, TOKEN_BLOCKS, random_model

#: CI's fixed budget per property; QCOMPILE_FUZZ_EXAMPLES=200 for a deeper local run.
EXAMPLES = int(os.environ.get("QCOMPILE_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def graph_cases(draw):
    image = draw(st.booleans())
    kinds = IMAGE_BLOCKS if image else TOKEN_BLOCKS
    blocks = draw(st.lists(st.tuples(st.sampled_from(kinds), st.booleans()), min_size=1, max_size=4))
    channels = draw(st.sampled_from([4, 6, 8, 12]))
    seed = draw(st.integers(0, 2**16))
    batch = draw(st.integers(1, 3))
    # tdq needs a denoiser's timestep input, which these graphs lack (tests/passes/test_tdq.py covers it).
    recipe = draw(st.sampled_from(sorted(r for r in available_recipes() if r != "tdq")))
    wbits = draw(st.sampled_from([8, 4])) if not image else 8
    return image, blocks, channels, seed, batch, recipe, wbits


def _recipe(name: str):
    recipe = get_recipe(name)
    if name == "dmq":  # LES training at its default 100 steps per group is the slow part: fewer here
        recipe = recipe.with_settings({"learned_scales": {"iterations": 5}})
    return recipe


@pytest.mark.slow
@FUZZ
@given(case=graph_cases())
def test_random_graphs_compile_with_every_recipe(case):
    image, blocks, channels, seed, batch, recipe, wbits = case
    model, shape = random_model(seed, image, blocks, channels)
    rng = np.random.default_rng(seed)
    calib = [{"x": rng.standard_normal((batch, *shape)).astype(np.float32)} for _ in range(3)]
    result = api.quantize(model, _recipe(recipe), calib,
                          options=CompileOptions(wbits=wbits, verify=True, progress=False, write_report=False))
    onnx.checker.check_model(result.model)
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    (y,) = make_session(result.model).run(None, {"x": x})
    assert y.shape == (2, *shape) and np.isfinite(y).all()
    for record in result.report["passes"]:
        if record["verify"].get("exact"):
            assert record["verify"]["max_relative_error"] <= 1e-5, record


# Malformed inputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    model_path = folder / "model.onnx"
    onnx.save(graphs.linear_model(k=16, n=8), model_path)
    calib = folder / "calib"
    calib.mkdir()
    np.savez(calib / "000.npz", x=np.random.default_rng(0).standard_normal((2, 4, 16)).astype(np.float32))
    return folder, model_path, calib


def _assert_bad_input_or_success(code: int, err: str, out):
    assert code in (0, 2), err  # 1 would be an internal error: a crash on bad input is a bug
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("qcompile: error:"), err
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "output left behind"


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv] + ["--quiet"])
    return code, capsys.readouterr().err


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_damaged_model_files_are_bad_input(workspace, capsys, data):
    folder, model_path, calib = workspace
    raw = bytearray(model_path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    damaged = folder / "damaged.onnx"
    damaged.write_bytes(bytes(raw))
    out = folder / "out" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    code, err = _run(capsys, damaged, "--calib", calib, "-o", out)
    _assert_bad_input_or_success(code, err, out)


@pytest.mark.slow
@FUZZ
@given(fault=st.sampled_from(["dtype", "shape", "rank", "nan", "inf", "name"]), seed=st.integers(0, 1000))
def test_damaged_calibration_is_bad_input(workspace, capsys, tmp_path_factory, fault, seed):
    folder, model_path, _ = workspace
    calib = tmp_path_factory.mktemp("calib")
    x = np.random.default_rng(seed).standard_normal((2, 4, 16)).astype(np.float32)
    if fault == "dtype":
        x = x.astype(np.float64)
    elif fault == "shape":
        x = x[:, :, : 1 + seed % 15]
    elif fault == "rank":
        x = x[0]
    elif fault in ("nan", "inf"):
        x.flat[seed % x.size] = np.nan if fault == "nan" else np.inf
    np.savez(calib / "000.npz", **{"y" if fault == "name" else "x": x})
    out = folder / "out2" / "q.onnx"
    out.parent.mkdir(exist_ok=True)
    code, err = _run(capsys, model_path, "--calib", calib, "-o", out)
    assert code == 2, err
    _assert_bad_input_or_success(code, err, out)


def _cyclic_model():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("MatMul", ["a", "W"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "cycle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [graphs.init("W", np.eye(4, dtype=np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _unknown_op_model():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("FancyNorm", ["h"], ["y"], name="fancy", domain="com.example")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [graphs.init("W", np.eye(4, dtype=np.float32))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                             ir_version=10)


@pytest.mark.parametrize("build, needle", [(_cyclic_model, "cycle"), (_unknown_op_model, "FancyNorm")])
def test_invalid_graphs_are_named_in_one_line(tmp_path, capsys, build, needle):
    model_path = tmp_path / "bad.onnx"
    onnx.save(build(), model_path)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.savez(calib / "000.npz", x=np.ones((2, 4), np.float32))
    out = tmp_path / "q.onnx"
    code, err = _run(capsys, model_path, "--calib", calib, "-o", out)
    assert code == 2, err
    _assert_bad_input_or_success(code, err, out)
    assert needle in err and "bad.onnx" in err, err
