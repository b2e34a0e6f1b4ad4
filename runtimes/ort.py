"""ONNX Runtime sessions, ORT's optimized graph, and the count of integer GEMM kernels in it."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qcompiler.errors import QCompileError

#: ORT ops that execute a GEMM/conv on integer data (what "runs on an integer kernel" means).
INTEGER_GEMM_OPS = frozenset({
    "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QLinearConv", "ConvInteger", "QGemm", "MatMulNBits", "QAttention",
    "DynamicQuantizeLSTM", "QLinearConvTranspose",
})
#: Float GEMM ops: what an integer kernel replaces.
FLOAT_GEMM_OPS = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedConv", "FusedGemm", "ConvTranspose"})


def providers(device: str = "cpu") -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise QCompileError("CUDA requested but onnxruntime-gpu is not installed (pip install qcompile[gpu])")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(model, device: str = "cpu", threads: int | None = None, optimize: bool = True,
                 optimized_model_path: str | os.PathLike | None = None, lean: bool = False,
                 external_folder: str | os.PathLike | None = None):
    """An ORT InferenceSession from a path, a ModelProto (under 2 GiB) or a ``Skeleton`` (any size).

    A skeleton's arrays are handed to ORT with ``add_initializer``: ORT computes on them where
    they are (no copy). ``lean`` (calibration and checks, not deployment) also turns off weight
    prepacking and the memory arena, so ORT holds no second copy of the weights and frees each
    activation when it is consumed, and runs the nodes in the file's order. ``external_folder``:
    where a ModelProto's external data files are (a model loaded without its weights, e.g. with
    extra outputs added); ORT reads them itself.
    """
    import onnxruntime as ort

    from qcompiler.skeleton import Skeleton, write_placeholder_model

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if lean:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        # Nodes in file order (Kahn's order, lowest index first among ready nodes). ORT's default
        # order is a depth-first walk back from the graph's outputs, which runs a capture graph's
        # reductions and row gathers (``skeleton.insert_after_producers``) after the forward pass
        # they read, so every captured activation stayed alive to the end of the run (PixArt-α, 175
        # tensors reduced in one calibration forward pass: 1.28 GiB anonymous memory at the peak,
        # 0.25 GiB in file order).
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if external_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(external_folder))
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
        # Weights go beside the optimized graph, so a model over 2 GiB can be written (and read back).
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         Path(optimized_model_path).name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    where = str(model) if isinstance(model, (str, os.PathLike)) else "model"
    try:
        if isinstance(model, Skeleton):
            # ORT's graph transformers (constant folding of DequantizeLinear, QDQ fusions, the NCHWc
            # layout) read initializers from the model file, not from add_initializer, and would
            # compute on the placeholder: a skeleton runs unoptimized, exactly as its graph says
            # (checked against the self-contained model in tests/core/test_skeleton.py).
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            initializers = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
                            for name, array in model.arrays.items()}
            for name, value in initializers.items():
                options.add_initializer(name, value)
            # ORT opens the skeleton from a file; it reads the weights from `initializers`, never the file.
            with tempfile.TemporaryDirectory(prefix="qcompile-session-") as tmp:
                path = write_placeholder_model(model, Path(tmp))
                session = ort.InferenceSession(str(path), sess_options=options, providers=providers(device))
            session.qcompile_initializers = initializers  # ORT uses these buffers: keep them alive
            return session
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return ort.InferenceSession(source, sess_options=options, providers=providers(device))
    except QCompileError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise QCompileError(f"{where}: ONNX Runtime could not load it: {str(exc).splitlines()[0][:300]}") from None


@dataclass
class KernelCount:
    """What ORT's optimized graph runs: integer GEMMs vs float GEMMs, and every op type."""

    integer_gemms: int
    float_gemms: int
    op_types: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"integer_gemms": self.integer_gemms, "float_gemms": self.float_gemms, "op_types": self.op_types}


def count_kernels(model_path: str | os.PathLike, device: str = "cpu") -> KernelCount:
    """Ask ORT for its optimized graph (``optimized_model_filepath``) and count GEMM kernels."""
    with tempfile.TemporaryDirectory(prefix="qcompile-ortopt-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        make_session(model_path, device=device, optimized_model_path=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    return KernelCount(
        integer_gemms=sum(n for op, n in ops.items() if op in INTEGER_GEMM_OPS),
        float_gemms=sum(n for op, n in ops.items() if op in FLOAT_GEMM_OPS),
        op_types=dict(sorted(ops.items())),
    )


def run(session, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def unknown_ops(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node name, domain, op type) of every node ORT has no kernel for (any execution provider),
    not counting the model's own functions. A static check on the proto: no session is built."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    known = {(kernel.domain or "", kernel.op_name) for kernel in C.get_all_opkernel_def()}
    local = {(function.domain, function.name) for function in model.functions}
    missing = []
    for node in model.graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) in known or (node.domain, node.op_type) in local or _resolved_at_load(node, domain):
            continue
        missing.append((node.name, node.domain, node.op_type))
    return missing


def _resolved_at_load(node: onnx.NodeProto, domain: str) -> bool:
    """Ops ORT runs without a kernel of their own: Constant (turned into an initializer) and ONNX
    ops defined as functions (expanded into their body)."""
    if domain == "" and node.op_type == "Constant":
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, domain)
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)
