"""Recipe ``smoothquant``: SmoothQuant scales (α = 0.5) folded into the graph, then ``minmax`` W8A8.

The scales move activation outliers into the weights exactly (``smooth_scales``); weights are
then int8 per output channel and activations uint8 per tensor, static, so ORT still fuses
every GEMM to an integer kernel. Explicit Mul fallbacks (where no producer absorbs s) are
listed in the report's ``fallbacks``.
"""

from qcompiler.recipes import Recipe, Step

SMOOTHQUANT = Recipe(
    name="smoothquant",
    description="SmoothQuant: per-channel scales s = max|X|^0.5 / max|W|^0.5 folded into producers and "
                "weights, then symmetric per-channel weights and asymmetric per-tensor static activations; "
                "lowered to ORT integer kernels",
    steps=(Step("smooth_scales"), Step("quantize_weights"), Step("insert_activation_qdq")),
)
