"""Recipe ``qdit``: Q-DiT's group-wise weights and dynamic per-token-group activations, group size per layer searched.

Steps, in order:
- ``qdit_groups``: every Linear gets a group size along its input channels from Q-DiT's {32, 64, 128,
  192, 288}, scaled to the model's hidden width (the zoo DiT: {3, 6, 12, 16, 24}), chosen by the
  paper's evolutionary search under a mean-size budget (≥ 128 paper-scale) with a cheap proxy (the
  layers' summed relative output error on sampled calibration rows) instead of FID; weights symmetric
  per group and column, activations asymmetric per token and group with ranges computed at run time.
  Lowered to one batched MatMulInteger per Linear (exact int32 sums) with the run-time scales applied
  to its partial sums: integer kernels, though more float work around them than a per-tensor GEMM.
- ``quantize_weights`` and ``insert_activation_qdq``: what is left (the patch-embedding Conv),
  per-channel weights and per-tensor static activations.

Ablations: ``--set qdit_groups.sizes=[128, 128, ...]`` (a given configuration; one per Linear in graph
order), ``--set qdit_groups.dynamic=false`` (one calibrated range per group).
"""

from qcompiler.recipes import Recipe, Step

QDIT = Recipe(
    name="qdit",
    description="Q-DiT: group-wise weights and dynamic per-token, per-group asymmetric activations along the "
                "input channels, group size per Linear from {32, 64, 128, 192, 288} (scaled to the model) chosen by "
                "an evolutionary search under a mean-size budget with a layer-error proxy; one batched "
                "MatMulInteger per Linear with run-time scales on its int32 sums",
    steps=(Step("qdit_groups"), Step("quantize_weights"), Step("insert_activation_qdq")),
)
