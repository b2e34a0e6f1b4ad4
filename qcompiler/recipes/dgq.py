"""Recipe ``dgq``: distribution-aware group quantization of GEMM inputs and log2 attention (DGQ).

Steps, in order:
- ``log2_attention``: Softmax outputs through the log2 quantizer, the cross-attention start token
  exempt (simulated). It runs first because ``patterns.find_attention`` tells self from cross
  attention by tracing Q and K back to a constant-weight projection, which a quantized weight no
  longer is; and so the statistics below see the quantized attention.
- ``quantize_weights``: int8 per output channel (min/max), or at ``--wbits 4`` int4 blocks /
  MatMulNBits with an MSE clip search of each scale (as dmq). Measured on the trained UNet
  (benchmarks/results/diffusion.md): at W4A8 min/max int4 weights cost 8–9 dB of final-image
  PSNR, more than any activation treatment wins back. At W8 the search is not measured, so the
  weights stay min/max there (the W8 rows and the ablation in diffusion.md were measured so).
- ``dgq_groups``: per GEMM input, the axis with the larger spread D_d and K-means groups along it
  (K = 16 at W8, the paper's W8A8/W8A6 setting, and 8 at W4, chosen by the pass from the weight width).
- ``insert_group_qdq``: MatMulInteger with per-row scales (token groups) or K partial integer
  GEMMs (channel groups; ConvInteger for Conv).
- ``insert_activation_qdq``: per-tensor QDQ for whatever is left.

Another K or the fold variant: a recipe file (``--recipe dgq_fold.toml``) with the same steps and

    [[steps]]
    pass = "dgq_groups"
    groups = 8
    [[steps]]
    pass = "insert_group_qdq"
    channel_groups = "fold"

or on the command line ``--groups 8 --channel-groups fold``. ``--per-timestep`` gives every group one
range per calibrated timestep, looked up from the denoiser's ``timestep`` input at run time
(``passes/timestep_ranges.py``; simulated: run-time scales reach no integer kernel).
"""

from qcompiler.passes.quantize_weights import QuantizeWeightsConfig
from qcompiler.recipes import Recipe, Step

DGQ = Recipe(
    name="dgq",
    description="DGQ: per GEMM input, groups along the axis with the larger min/max spread (channel or "
                "pixel/token), K-means K=16 (W8) / 8 (W4), asymmetric scale per group, lowered to MatMulInteger "
                "with per-row scales or K partial integer GEMMs; Softmax outputs log2-quantized (simulated), "
                "the cross-attention start token kept exact; int4 weights with an MSE clip search",
    steps=(Step("log2_attention"),
           Step("quantize_weights", QuantizeWeightsConfig(clip_search=True, clip_search_max_bits=4)),
           Step("dgq_groups"), Step("insert_activation_qdq")),
)
