"""qcompile's graph passes, one per module; importing this package registers them by name."""

from qcompiler.passes.insert_activation_qdq import InsertActivationQDQ
from qcompiler.passes.quantize_weights import QuantizeWeights

PASSES = {cls.name: cls for cls in (QuantizeWeights, InsertActivationQDQ)}

__all__ = ["PASSES", "InsertActivationQDQ", "QuantizeWeights"]
