"""qcompile's graph passes, one per module; importing this package registers them by name."""

from qcompiler.passes.dgq_groups import DgqGroups
from qcompiler.passes.insert_activation_qdq import InsertActivationQDQ
from qcompiler.passes.learned_scales import LearnedScales
from qcompiler.passes.log2_attention import Log2Attention
from qcompiler.passes.mixed_precision import MixedPrecision
from qcompiler.passes.pow2_skip_scales import Pow2SkipScales
from qcompiler.passes.qdit_groups import QditGroups
from qcompiler.passes.quantize_weights import QuantizeWeights
from qcompiler.passes.salience_balance import SalienceBalance
from qcompiler.passes.shift_scale import ShiftScale
from qcompiler.passes.ptqd import Ptqd
from qcompiler.passes.smooth_scales import SmoothScales
from qcompiler.passes.tdq import Tdq

PASSES = {cls.name: cls for cls in (SmoothScales, ShiftScale, QuantizeWeights, InsertActivationQDQ,
                                    DgqGroups, Log2Attention, LearnedScales, Pow2SkipScales, SalienceBalance,
                                    QditGroups, Tdq, Ptqd, MixedPrecision)}

__all__ = ["PASSES", "DgqGroups", "Log2Attention",
           "InsertActivationQDQ", "LearnedScales", "MixedPrecision", "Pow2SkipScales", "QditGroups", "QuantizeWeights", "SalienceBalance",
           "ShiftScale", "SmoothScales", "Tdq", "Ptqd"]
