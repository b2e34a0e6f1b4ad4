"""Share identical small constants: one initializer per distinct (dtype, shape, bytes).

Lowering inserts a scale, a zero point, a divisor or a bias vector per quantized tensor, and many
of them are equal (every int8 zero point 0, the same per-tensor scale read by several GEMMs, one
group table read by a Conv and its skip projection). Each copy costs its bytes plus its name in the
file; for a few-megabyte model the copies are several percent of it. Sharing them is exact: every
reader gets a constant with the same values.

Only constants already in memory and at most ``MAX_SHARED_BYTES`` are compared. Weights are large,
unique, and may be memory-mapped or stored outside the model, so hashing them would cost reads for
nothing. Inside subgraphs, node inputs are left as they are.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

#: Constants above this size are never compared (weights); scales and tables are far smaller.
MAX_SHARED_BYTES = 64 * 1024


def _key(tensor: gs.Constant):
    values = getattr(tensor, "_values", None)  # .values would load a lazy constant
    if type(values) is not np.ndarray or values.nbytes > MAX_SHARED_BYTES:
        return None
    digest = hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest()
    return (values.dtype.str, values.shape, str(getattr(tensor, "export_dtype", None)), digest)


def share_constants(graph: gs.Graph) -> int:
    """Point every reader of a duplicate small constant at one copy; returns the copies dropped.

    The graph's own inputs and outputs are never replaced (they are part of its interface)."""
    interface = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    canonical: dict[tuple, gs.Constant] = {}
    dropped: set[int] = set()
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant) or id(tensor) in interface:
                continue
            key = _key(tensor)
            if key is None:
                continue
            first = canonical.setdefault(key, tensor)
            if first is not tensor:
                node.inputs[index] = first
                dropped.add(id(tensor))
    if dropped:
        log.debug("shared %d duplicate constants", len(dropped))
    return len(dropped)
