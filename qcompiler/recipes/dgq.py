"""Recipes ``dgq`` and ``dgq-log2``: distribution-aware group quantization of GEMM inputs (DGQ).

``dgq`` (deployable), steps in order:
- ``quantize_weights``: int8 per output channel (min/max), or at ``--wbits 4`` int4 blocks /
  MatMulNBits with an MSE clip search of each scale (as dmq). Measured on the trained UNet
  (benchmarks/results/diffusion.md): at W4A8 min/max int4 weights cost 8–9 dB of final-image
  PSNR, more than any activation treatment wins back. At W8 the weights stay min/max.
- ``dgq_groups``: per GEMM input, the axis with the larger spread D_d and K-means groups along it
  (K = 16 at W8, the paper's W8A8/W8A6 setting, and 8 at W4, chosen by the pass from the weight width).
- ``insert_activation_qdq``: per-tensor QDQ for whatever the groups do not cover.
The target lowers the group plans (ORT: DGQ's codes under one per-tensor grid, one integer GEMM
per GEMM; ``--channel-groups split`` for the bit-exact K-split reference).

``dgq-log2`` adds the paper's attention quantizer first: ``log2_attention`` puts Softmax outputs
on a log2 grid, the cross-attention start token exempt. It runs first because
``patterns.find_attention`` tells self from cross attention by tracing Q and K back to a
constant-weight projection, which a quantized weight no longer is. No current target has a
log-domain kernel, and the probabilities feed a float P·V MatMul either way, so on ORT it only
simulates the error (and costs the elementwise ops that simulate it); that is why ``dgq`` leaves
attention float, as minmax does. Measured on the trained UNet at W8A8 (diffusion.md ablation,
split lowering): attention float 37.47 dB, log2 35.02 dB; on the zoo's DiT the log2 quantizer
costs more (no start token to exempt).

Another K: ``--groups 8``; ``--per-timestep`` gives every group one range per calibrated
timestep, looked up from the denoiser's ``timestep`` input at run time (simulated: run-time scales
reach no integer kernel; ``qcompiler/lowering/timestep_ranges.py``).
"""

from qcompiler.passes.quantize_weights import QuantizeWeightsConfig
from qcompiler.recipes import Recipe, Step

_WEIGHTS = Step("quantize_weights", QuantizeWeightsConfig(clip_search=True, clip_search_max_bits=4))

DGQ = Recipe(
    name="dgq",
    description="DGQ: per GEMM input, groups along the axis with the larger min/max spread (channel or "
                "pixel/token), K-means K=16 (W8) / 8 (W4), asymmetric scale per group, lowered by the target "
                "to one integer GEMM per GEMM (DGQ's codes under one per-tensor grid); attention left float; "
                "int4 weights with an MSE clip search",
    steps=(_WEIGHTS, Step("dgq_groups"), Step("insert_activation_qdq")),
)

DGQ_LOG2 = Recipe(
    name="dgq-log2",
    description="dgq plus the paper's log2 quantizer on Softmax outputs (cross-attention start token exact); "
                "simulated on every current target: no log-domain kernel",
    steps=(Step("log2_attention"), _WEIGHTS, Step("dgq_groups"), Step("insert_activation_qdq")),
)
