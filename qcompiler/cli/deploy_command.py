"""Write a Triton Inference Server model repository for a model: qcompile deploy MODEL --triton REPO_DIR.

Writes REPO_DIR/NAME/config.pbtxt (platform onnxruntime_onnx, validated against Triton's
ModelConfig schema) and REPO_DIR/NAME/1/model.onnx with its external data. Inputs, outputs,
dtypes and dims come from the graph (dynamic axes as -1); a dynamic leading axis on every
tensor becomes max_batch_size with dynamic batching. Serve it with
`tritonserver --model-repository REPO_DIR` (Triton with its onnxruntime backend).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model (a qcompile output; external data beside it is copied too)")
    parser.add_argument("--triton", required=True, metavar="REPO_DIR",
                        help="Triton model repository folder to write the model into (created if missing)")
    parser.add_argument("--name", help="model name in the repository (default: the model file's stem)")
    parser.add_argument("--max-batch", type=int, metavar="N",
                        help="max_batch_size (default: 8 when every input and output has a dynamic leading "
                             "axis, else 0; 0 turns batching off)")
    parser.add_argument("--instances", type=int, default=1, metavar="N", help="model instances (ORT sessions) Triton runs")
    parser.add_argument("--kind", choices=("cpu", "gpu"), default="cpu", help="instance group kind")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="ORT intra-op threads per instance (0: ONNX Runtime picks, one per core)")
    parser.add_argument("--force", action="store_true", help="replace a model of the same name in the repository")


def run(args: argparse.Namespace) -> int:
    from qcompiler.deploy.triton import TritonOptions, read_config, write_repository

    model = Path(args.model)
    options = TritonOptions(name=args.name or _stem(model), max_batch=args.max_batch, instances=args.instances,
                            kind=args.kind, intra_op_threads=args.threads, force=args.force)
    target = write_repository(model, Path(args.triton), options)
    config = read_config(target / "config.pbtxt")
    batching = f"max_batch_size {config.max_batch_size}" if config.max_batch_size else "no batching"
    print(f"wrote Triton model '{config.name}' to {target} ({batching}, {len(config.input)} inputs, "
          f"{len(config.output)} outputs, {args.instances} {args.kind} instance(s))")
    return 0


def _stem(model: Path) -> str:
    """``unet.minmax.w8a8.onnx`` -> ``unet.minmax.w8a8``."""
    return model.name[:-len(".onnx")] if model.name.endswith(".onnx") else model.stem
