"""The rule checker of the TensorRT target: every explicit-quantization rule, verified on an output graph.

``check(model)`` (a ModelProto or path) and ``check_graph(graph)`` return a list of ``Violation``s,
empty when the graph follows every rule. The rules (TensorRT developer guide, "Explicit Quantization";
onnx-tensorrt's Q/DQ support):

- ``standard-ops``: no contrib (com.microsoft) or integer-op forms (MatMulInteger, ConvInteger,
  QLinear*, QGemm, DynamicQuantizeLinear, MatMulNBits): TensorRT fuses Q/DQ itself;
- ``zero-point-0``: every Q/DQ zero point is a constant 0 of a signed type (int8, or int4 weights);
- ``constant-scale``: every Q/DQ scale is a constant, finite and > 0 (no run-time scales);
- ``per-tensor-activation``: an activation Q has one scale, is read only by DQs with the same scale;
- ``weight-dq-only``: an integer constant is read only by a DequantizeLinear (no DQ-less int8
  weight, no weight QuantizeLinear: weights are stored quantized);
- ``weight-axis``: a per-channel weight DQ feeds a GEMM weight with its scales on the output axis
  (Conv 0, ConvTranspose 1, MatMul the last axis, Gemm 0 with transB else 1);
- ``block-dq``: a blocked DQ is an int4 MatMul weight, blocks of 32–128 along the reduction axis
  (the weight's second-to-last), in a model of opset ≥ 21;
- ``qdq-placement``: an activation DQ feeds only a GEMM/Conv data input, or an Add whose other input a
  GEMM/Conv writes (the residual rule: TensorRT fuses that Add into the GEMM); never an attention BMM
  (MatMul of two activations) or a Softmax, and no Q reads a Softmax output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

FORBIDDEN_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd",
                           "DynamicQuantizeLinear", "MatMulNBits", "MatMulIntegerToFloat", "QAttention"})
GEMM_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
BLOCK_SIZES = (32, 64, 128)
SIGNED = (onnx.TensorProto.INT8, onnx.TensorProto.INT4)


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: node '{self.node}': {self.message}"


def _onnx_type(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
        return tensor._values.tensor.data_type
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) if dtype is not None else None
    except (TypeError, KeyError):
        return None


def _value(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant's values (Constant-node outputs too); int4 read without caching the unpacked copy."""
    if isinstance(tensor, gs.Constant):
        if isinstance(tensor._values, LazyValues):
            return np.asarray(tensor._values.load()).astype(np.float64)
        return np.asarray(tensor.values)
    if tensor.inputs and tensor.inputs[0].op == "Constant":
        return np.asarray(tensor.inputs[0].attrs["value"].values)
    return None


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _is_weight_dq(node: gs.Node | None) -> bool:
    return node is not None and node.op == "DequantizeLinear" and _value(node.inputs[0]) is not None


def out_axis(gemm: gs.Node, rank: int) -> int:
    if gemm.op == "Conv":
        return 0
    if gemm.op == "ConvTranspose":
        return 1
    if gemm.op == "Gemm":
        return 0 if gemm.attrs.get("transB", 0) else 1
    return rank - 1


def check(model: onnx.ModelProto | str | os.PathLike) -> list[Violation]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return check_graph(gs.import_onnx(model))


def check_graph(graph: gs.Graph) -> list[Violation]:
    found: list[Violation] = []
    for node in graph.nodes:
        if (node.domain or "") not in ("", "ai.onnx") or node.op in FORBIDDEN_OPS:
            found.append(Violation("standard-ops", node.name, f"{node.domain or 'ai.onnx'}:{node.op} is not a "
                                   "standard op TensorRT parses; Q/DQ around a float op instead"))
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            found.extend(_check_grid(node))
            found.extend(_check_weight(graph, node) if _value(node.inputs[0]) is not None else _check_activation(node))
        if node.op == "Softmax":
            found.extend(_check_softmax(node))
    found.extend(_check_integer_constants(graph))
    return found


def _check_grid(node: gs.Node) -> list[Violation]:
    found = []
    scale = _value(node.inputs[1])
    if scale is None:
        found.append(Violation("constant-scale", node.name, f"scale '{node.inputs[1].name}' is computed at run time"))
    elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        found.append(Violation("constant-scale", node.name, "scale is not finite and positive"))
    zero = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if zero is not None:
        kind = _onnx_type(zero)
    elif node.op == "DequantizeLinear":
        kind = _onnx_type(node.inputs[0])  # None for an activation: its Q is checked
    else:  # QuantizeLinear without a zero point writes uint8 unless output_dtype says otherwise
        kind = int(node.attrs.get("output_dtype", 0)) or onnx.TensorProto.UINT8
    if zero is not None and (_value(zero) is None or np.any(_value(zero) != 0)):
        found.append(Violation("zero-point-0", node.name, "zero point is not a constant 0 (asymmetric grid)"))
    elif kind is not None and kind not in SIGNED:
        found.append(Violation("zero-point-0", node.name, f"integer type {onnx.TensorProto.DataType.Name(kind)} "
                               "is not int8/int4 (TensorRT quantizes to signed types)"))
    return found


def _check_activation(node: gs.Node) -> list[Violation]:
    found = []
    if node.op == "QuantizeLinear":
        scale = _value(node.inputs[1])
        if scale is not None and scale.size != 1:
            found.append(Violation("per-tensor-activation", node.name, "activation scale is not per-tensor"))
        for reader in node.outputs[0].outputs:
            if reader.op != "DequantizeLinear":
                found.append(Violation("per-tensor-activation", node.name, f"Q is read by {reader.op} '{reader.name}'"))
            elif scale is not None and not np.array_equal(_value(reader.inputs[1]), scale):
                found.append(Violation("per-tensor-activation", reader.name, "DQ scale differs from its Q's"))
        producer = _producer(node.inputs[0])
        if producer is not None and producer.op == "Softmax":
            found.append(Violation("qdq-placement", node.name, f"quantizes the output of Softmax '{producer.name}' "
                                   "(attention stays float)"))
        return found
    for reader in node.outputs[0].outputs:
        reason = _placement(node, reader)
        if reason:
            found.append(Violation("qdq-placement", node.name, reason))
    return found


def _placement(dq: gs.Node, reader: gs.Node) -> str | None:
    tensor = dq.outputs[0]
    if reader.op in ("Conv", "ConvTranspose", "Gemm") and reader.inputs[0] is tensor:
        return None
    if reader.op == "MatMul" and reader.inputs[0] is tensor:
        return None if _is_weight_dq(_producer(reader.inputs[1])) or _value(reader.inputs[1]) is not None else \
            f"feeds attention BMM '{reader.name}' (a MatMul of two activations stays float)"
    if reader.op == "Add":
        other = next((t for t in reader.inputs if t is not tensor), None)
        producer = _producer(other) if other is not None else None
        if producer is not None and producer.op in GEMM_OPS:
            return None  # the residual rule: TensorRT fuses this Add into the GEMM's epilogue
        return f"feeds Add '{reader.name}' whose other input no GEMM/Conv writes (an extra Q/DQ that breaks fusion)"
    if reader.op == "Softmax":
        return f"feeds Softmax '{reader.name}' (Softmax stays float)"
    return f"feeds {reader.op} '{reader.name}': TensorRT fuses Q/DQ only into GEMM/Conv inputs"


def _check_softmax(node: gs.Node) -> list[Violation]:
    producer = _producer(node.inputs[0])
    if producer is not None and producer.op == "DequantizeLinear":
        return [Violation("qdq-placement", node.name, "Softmax reads a DequantizeLinear (Softmax stays float)")]
    return []


def _check_weight(graph: gs.Graph, node: gs.Node) -> list[Violation]:
    if node.op == "QuantizeLinear":
        return [Violation("weight-dq-only", node.name, "quantizes a constant at run time; store the weight quantized "
                          "with a DequantizeLinear only")]
    found = []
    rank = len(node.inputs[0].shape)
    scale = _value(node.inputs[1])
    axis = int(node.attrs.get("axis", 1)) % max(rank, 1)
    block = int(node.attrs.get("block_size", 0))
    for reader in node.outputs[0].outputs:
        if reader.op not in GEMM_OPS or reader.inputs[1] is not node.outputs[0]:
            continue  # an int32 bias DQ or a shared constant: no axis rule
        if block:
            k_axis = rank - 2
            if reader.op != "MatMul" or axis != k_axis:
                found.append(Violation("block-dq", node.name, f"blocks run along axis {axis} of {reader.op} "
                                       f"'{reader.name}' weight; they must run along the reduction axis {k_axis}"))
            if block not in BLOCK_SIZES:
                found.append(Violation("block-dq", node.name, f"block_size {block} not in {BLOCK_SIZES}"))
            if _onnx_type(node.inputs[0]) != onnx.TensorProto.INT4:
                found.append(Violation("block-dq", node.name, "blocked weights must be int4"))
            if graph.opset < 21:
                found.append(Violation("block-dq", node.name, f"blocked DequantizeLinear needs opset 21, the model "
                                       f"has {graph.opset}"))
        elif scale is not None and scale.size > 1 and axis != out_axis(reader, rank):
            found.append(Violation("weight-axis", node.name, f"per-channel scales on axis {axis} of {reader.op} "
                                   f"'{reader.name}' weight; TensorRT needs the output axis {out_axis(reader, rank)}"))
    return found


def _check_integer_constants(graph: gs.Graph) -> list[Violation]:
    found = []
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or _onnx_type(tensor) not in integer or tensor.shape == ():
            continue
        for reader in tensor.outputs:
            if reader.op != "DequantizeLinear" or reader.inputs[0] is not tensor:
                if reader.op in ("QuantizeLinear", "DequantizeLinear"):
                    continue  # a zero point
                found.append(Violation("weight-dq-only", reader.name, f"reads integer constant '{tensor.name}' "
                                       "without a DequantizeLinear"))
    return found


def gemm_kinds(graph: gs.Graph) -> dict[str, int]:
    """GEMMs by what TensorRT runs: int8 (activation and weight DQ-fed), int4 weight-only, float."""
    kinds = {"int8": 0, "int4 weight-only": 0, "float": 0}
    for node in graph.nodes:
        if node.op not in GEMM_OPS or len(node.inputs) < 2:
            continue
        weight, data = _producer(node.inputs[1]), _producer(node.inputs[0])
        if _is_weight_dq(weight) and weight.attrs.get("block_size"):
            kinds["int4 weight-only"] += 1
        elif _is_weight_dq(weight) and data is not None and data.op == "DequantizeLinear":
            kinds["int8"] += 1
        else:
            kinds["float"] += 1
    return kinds
