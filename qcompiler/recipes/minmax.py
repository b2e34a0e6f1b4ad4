"""Recipe ``minmax``: per-output-channel int8 (or block int4) weights, per-tensor uint8 activations."""

from qcompiler.recipes import Recipe, Step

MINMAX = Recipe(
    name="minmax",
    description="min/max calibration: symmetric per-channel weights, asymmetric per-tensor static "
                "activations on every Linear/Conv input; lowered to ORT integer kernels",
    steps=(Step("quantize_weights"), Step("insert_activation_qdq")),
)
