"""Open a model in Netron, served on 127.0.0.1: qcompile view MODEL [--port N] [--no-browser].

Netron shows the rewritten graph with qcompile's node names (<tensor>/<pass>/<Op>) and the
doc_string of each inserted node (which pass made it and why); View > Show Names puts the names
on the nodes. The server runs until Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="ONNX model (external data beside it is read too)")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--no-browser", action="store_true", help="only serve; print the URL to open")


def run(args: argparse.Namespace) -> int:
    from qcompiler.deploy import netron_view

    url = netron_view.serve(args.model, args.port, browse=not args.no_browser)
    print(f"Netron is serving {args.model} at {url} (Ctrl-C stops it)", flush=True)
    netron_view.wait(url)
    print("stopped", file=sys.stderr)
    return 0
