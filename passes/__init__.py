"""qcompile's graph passes, one per module; importing this package registers them by name."""

from qcompiler.passes.insert_activation_qdq import InsertActivationQDQ
from qcompiler.passes.quantize_weights import QuantizeWeights
from qcompiler.passes.shift_scale import ShiftScale
from qcompiler.passes.smooth_scales import SmoothScales

PASSES = {cls.name: cls for cls in (SmoothScales, ShiftScale, QuantizeWeights, InsertActivationQDQ)}

__all__ = ["PASSES", "InsertActivationQDQ", "QuantizeWeights", "ShiftScale", "SmoothScales"]
