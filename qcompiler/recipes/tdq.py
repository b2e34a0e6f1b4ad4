"""Recipe ``tdq``: ``minmax`` with TDQ's timestep-dependent activation ranges.

Steps: ``quantize_weights`` (int8 per output channel, or int4 blocks at ``--wbits 4``), ``tdq`` (per
GEMM input an MLP from the timestep embedding to its range, trained on the calibration activations
grouped by timestep and tabled at every t in [0, T)), ``insert_activation_qdq`` (Conv output grids and
whatever ``tdq`` leaves). Any other recipe takes TDQ with ``qcompile ... --tdq`` (the step is placed
before ``insert_activation_qdq``; after ``dgq_groups`` it learns each DGQ group's range).
The run-time scales reach no ORT integer kernel: the GEMMs run in float on the fake-quantized input
(simulated, labelled so in the report).
"""

from qcompiler.recipes import Recipe, Step

TDQ = Recipe(
    name="tdq",
    description="TDQ: per GEMM input a small MLP maps the timestep embedding to its activation range (trained on "
                "calibration activations grouped by timestep), tabled at every timestep and gathered by the "
                "model's timestep input; per-channel weights; simulated (run-time scales, float GEMMs)",
    steps=(Step("quantize_weights"), Step("tdq"), Step("insert_activation_qdq")),
    integer_kernels=False,
)
