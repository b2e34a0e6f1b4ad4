"""Recipe ``osplus``: Outlier Suppression+ channel shifts and searched scales, then ``minmax`` W8A8.

``shift_scale`` centres the channels of each GEMM input (where that quantizes better and costs
no run-time op) and scales the channels wider than a searched t* down to it, exactly (folded
into producers and weights); weights are then int8 per output channel and activations uint8 per
tensor, static, so ORT still fuses every GEMM to an integer kernel. Explicit Mul (and, with
``explicit_shift``, Sub) fallbacks are listed in the report's ``fallbacks``.
"""

from qcompiler.recipes import Recipe, Step

OSPLUS = Recipe(
    name="osplus",
    description="Outlier Suppression+: channel shift z = (max + min)/2 (where a producer absorbs it and it lowers "
                "the error) and scale s = max(1, (max − z)/t*) with t* searched on quantized output error, folded "
                "into producers and weights, then symmetric per-channel weights and asymmetric per-tensor static "
                "activations; lowered to ORT integer kernels",
    steps=(Step("shift_scale"), Step("quantize_weights"), Step("insert_activation_qdq")),
)
