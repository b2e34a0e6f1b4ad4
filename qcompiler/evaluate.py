"""Error of a quantized model against its float original: per output and per quantized layer.

Metrics (same inputs to both models):
    SQNR = 10·log10(Σx² / Σ(x − x̂)²) dB over all elements;  cosine = mean over samples of
    ⟨x_n, x̂_n⟩ / (‖x_n‖·‖x̂_n‖);  max_abs_error = max|x − x̂|.
Padding: when the inputs carry a 0/1 ``attention_mask`` (batch, seq), positions where it is 0 are
left out of every tensor whose leading axes are (batch, seq): a transformer computes outputs there
that every consumer masks (pooling, attention keys), and their error says nothing about the model
(on MiniLM it swung dmq's last_hidden_state SQNR between 4.6 and 11.9 dB across runs whose
attended-token SQNR agreed within 0.2 dB). ``EvalOptions(mask_input=None)`` counts every position.
Per layer: the output (after its bias Add) of every quantized GEMM, read from both models, SQNR
worst first; tensors an equivalence fold rescales on purpose (listed in the model's
``qcompile.rescaled_tensors`` metadata) are skipped, since their float counterpart differs by design.
Memory: one batch's outputs plus ``tensors_per_run`` layer outputs at a time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from qcompiler.calibration.capture import OutputRunner, run_batch
from qcompiler.graph import add_outputs, load_structure


@dataclass(frozen=True)
class EvalOptions:
    limit: int | None = None
    per_layer: bool = True
    tensors_per_run: int = 64
    #: A progress bar on stderr (on a terminal) over output and per-layer passes.
    progress: bool = True
    #: A (batch, seq) 0/1 model input: positions where it is 0 do not count (None: every position counts).
    mask_input: str | None = "attention_mask"


class _Accumulator:
    """Running Σx², Σ(x − x̂)², per-sample cosines and max|x − x̂| for one tensor."""

    def __init__(self):
        self.signal = 0.0
        self.noise = 0.0
        self.cosines: list[float] = []
        self.max_abs = 0.0

    def add(self, reference: np.ndarray, candidate: np.ndarray, keep: np.ndarray | None = None) -> None:
        """``keep``: 0/1 over the leading axes; positions at 0 add nothing (zero in both tensors)."""
        ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
        if keep is not None:
            weight = keep.astype(np.float64).reshape(keep.shape + (1,) * (ref.ndim - keep.ndim))
            ref, cand = ref * weight, cand * weight
        ref, cand = ref.reshape(ref.shape[0], -1), cand.reshape(cand.shape[0], -1)
        diff = ref - cand
        self.signal += float(np.sum(ref**2))
        self.noise += float(np.sum(diff**2))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))) if diff.size else 0.0)
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        self.cosines.extend((np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30)).tolist())

    def result(self) -> dict:
        sqnr = float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
        return {"sqnr_db": float(sqnr), "cosine": float(np.mean(self.cosines)) if self.cosines else 1.0,
                "max_abs_error": self.max_abs}


def _after_bias(node) -> str:
    """The GEMM's output, or its bias Add's output when a constant bias follows (folds keep that equal)."""
    from qcompiler.graph import constant_value

    out = node.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        add = out.outputs[0]
        if any(constant_value(t) is not None for t in add.inputs if t is not out):
            return add.outputs[0].name
    return out.name


def quantized_layer_outputs(quant_model: onnx.ModelProto, float_model: onnx.ModelProto) -> list[str]:
    """Post-bias outputs of the quantized GEMMs that exist in the float model and were not rescaled."""
    import json

    from qcompiler.graph import to_graph
    from qcompiler.grids import quantized_gemms

    metadata = {prop.key: prop.value for prop in quant_model.metadata_props}
    rescaled = set(json.loads(metadata.get("qcompile.rescaled_tensors", "[]")))
    float_tensors = {o for node in float_model.graph.node for o in node.output}
    names = [_after_bias(node) for node in quantized_gemms(to_graph(quant_model))]
    return [name for name in names if name in float_tensors and name not in rescaled]


def _open(model) -> tuple[onnx.ModelProto, Path | None]:
    """(proto, folder of its external data): a path is read without its weights, which ORT loads itself."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    return load_structure(model), Path(model).parent


def _kept_positions(batch, value: np.ndarray, mask_input: str | None) -> np.ndarray | None:
    """The batch's (batch, seq) 0/1 mask when ``value``'s leading axes are (batch, seq), else None."""
    mask = batch.feeds.get(mask_input) if mask_input else None
    if mask is None or np.ndim(mask) != 2 or value.shape[:2] != np.shape(mask):
        return None
    return np.asarray(mask) != 0


def _run_pairs(reference: OutputRunner, quant_model, batches, names: list[str], accumulators, bar=None,
               mask_input: str | None = None) -> None:
    """The float model through the capture engine (its weights memory-mapped and shared with ORT,
    not copied: the reference of a 3.4 GB UNet costs no second 3.4 GB), the candidate in ORT fully
    optimized from its file, so it runs its integer kernels as deployed."""
    from qcompiler.runtimes.ort import make_session

    quant_proto, quant_folder = quant_model
    wanted = names or reference.model_outputs
    float_session = reference.session(wanted)
    # Lean (no prepacked second copy of the integer weights, no arena, file order): the same kernels
    # and numbers as deployed, at a resident set that fits beside the float reference at real size.
    candidate = make_session(add_outputs(quant_proto, names) if names else quant_proto, external_folder=quant_folder,
                             lean=True)
    for batch in batches:
        expected = dict(zip(wanted, run_batch(float_session, wanted, batch)))
        got = dict(zip(wanted, run_batch(candidate, wanted, batch)))
        for name in wanted:
            keep = _kept_positions(batch, expected[name], mask_input)
            accumulators[name].add(expected[name], got[name], keep)
        del expected, got
        if bar is not None:
            bar.update(1)


def evaluate(float_model, quant_model, data, options: EvalOptions = EvalOptions()) -> dict:
    """Compare two models on ``data`` (anything ``load_calibration`` accepts)."""
    from qcompiler.calibration.readers import load_calibration

    reference = OutputRunner(float_model)
    float_model, quant_model = (reference.skeleton.proto, None), _open(quant_model)
    batches = load_calibration(data, float_model[0], limit=options.limit)
    outputs = defaultdict(_Accumulator)
    names = quantized_layer_outputs(quant_model[0], float_model[0]) if options.per_layer else []
    chunks = [names[start:start + options.tensors_per_run] for start in range(0, len(names), options.tensors_per_run)]
    bar = tqdm(total=len(batches) * (1 + len(chunks)), desc="evaluating", unit="run", leave=False,
               disable=None if options.progress else True)
    _run_pairs(reference, quant_model, batches, [], outputs, bar, options.mask_input)
    per_output = {name: acc.result() for name, acc in outputs.items()}
    overall = _Accumulator()
    overall.signal = sum(acc.signal for acc in outputs.values())
    overall.noise = sum(acc.noise for acc in outputs.values())
    overall.cosines = [float(np.mean(acc.cosines)) for acc in outputs.values()]
    overall.max_abs = max(acc.max_abs for acc in outputs.values())
    masked = options.mask_input if any(options.mask_input in b.feeds for b in batches if options.mask_input) else None
    result = {"samples": sum(b.batch_size for b in batches), "outputs": per_output, "overall": overall.result(),
              "padding_excluded_by": masked}
    if options.per_layer:
        layers = defaultdict(_Accumulator)
        for chunk in chunks:
            _run_pairs(reference, quant_model, batches, chunk, layers, bar, options.mask_input)
        per_layer = [{"tensor": name, **layers[name].result()} for name in names]
        result["per_layer"] = sorted(per_layer, key=lambda row: row["sqnr_db"])
    bar.close()
    return result
