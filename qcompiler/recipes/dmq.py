"""Recipe ``dmq``: DMQ's learned equivalent scaling with timestep weighting, and power-of-two skip scales.

Steps, in order:
- ``learned_scales``: per Linear/Conv scale group γ = exp(θ) learned on the layer's quantized output
  error (X/γ per tensor at ``abits``, W·γ per channel at ``wbits``, STE); folded exactly (explicit Mul
  after SiLU, listed in ``fallbacks``). DMQ's adaptive timestep weighting w_t = (1 − L_t/ΣL)^20 is
  implemented but **off by default**: on the trained UNet at W4A8 it cost 6.9 dB of final-image PSNR
  (LES alone 24.52 dB vs LES + weighting 17.67 dB, ``benchmarks/results/dmq.md``): with 25 timesteps
  a timestep holding 20% of the loss gets weight 0.8^20 ≈ 0.01, so γ fits the easy timesteps only.
  ``--set learned_scales.timestep_weighting=adaptive`` turns it on.
  Held-out calibration batches (25%) stop training early and decide which γ is kept, judged with the
  clip-searched weights that will be lowered, on the relative error ‖Y − Ŷ‖²/‖Y‖² per sample; γ ≠ 1
  is kept only where it lowers that held-out error by ≥ 30% (``min_gain``). Why: on ``unet_mnist_b``
  every group's learned γ lowered its own held-out error (median ×0.90) and the final image still
  lost 5.7 dB (16.56 vs 22.26 dB with γ = 1), because the upstream layers' error moved into the
  channels the next layers weigh most (through ``conv_out``: 30.6 → 28.0 dB while ``conv_act``'s own
  SQNR rose 21.8 → 22.4 dB). With these defaults, W4A8, 16 images, paired difference to minmax + clip
  search ± SE: ``unet_mnist`` 23.72 dB (+0.44 ± 0.77), ``unet_mnist_b`` 21.22 dB (+0.06 ± 0.26).
  ``learned_scales.output_weighting="downstream"`` (the loss weighted per output channel by the next
  layers' weights) measured no better on every zoo UNet (−0.47 ± 0.30 dB vs minmax + clip on
  ``unet_mnist_b``, +0.37 ± 0.64 on ``unet_mnist_c``), so it is off.
- ``pow2_skip_scales``: decoder shortcut Convs reading concat(h, skip) get per-channel multipliers
  m_c ∈ {1, ½, ¼, ⅛} by voting (``variance_ratio = 16`` in a recipe file adds every input whose
  channel ranges differ more than 16×); at W4 lowered exactly to one int8 GEMM with int4 weights
  shifted by 2^(3−j_c).
- ``quantize_weights``: the rest, int8 per output channel, or at ``--wbits 4`` int4 with an MSE clip
  search (MatMulNBits blocks for MatMul, int4 values in int8 containers for Conv/Gemm).
- ``insert_activation_qdq``: per-tensor static activations (and Conv outputs for QLinearConv).

Fewer/more iterations, another init or the paper's weighting: ``--set learned_scales.FIELD=VALUE``
or a recipe file, e.g.

    [[steps]]
    pass = "learned_scales"
    iterations = 1000
    lr = 0.001
    timestep_weighting = "adaptive"
"""

from qcompiler.passes.learned_scales import LearnedScalesConfig
from qcompiler.passes.pow2_skip_scales import Pow2SkipScalesConfig
from qcompiler.passes.quantize_weights import QuantizeWeightsConfig
from qcompiler.recipes import Recipe, Step
from qcompiler.weight_quant import DEFAULT_CLIP_RATIOS

DMQ = Recipe(
    name="dmq",
    description="DMQ: learned equivalent scales γ per Linear/Conv input (Adam on the quantized layer output, "
                "adaptive timestep weighting optional, off by default: measured worse here), folded exactly; power-of-two per-channel activation scales on "
                "decoder skip-concat shortcuts by voting (one int8 GEMM at W4); per-channel weights (int4 with "
                "MSE clip search) and per-tensor static activations on ORT integer kernels",
    steps=(Step("learned_scales", LearnedScalesConfig(timestep_weighting="off", guard_clip_ratios=DEFAULT_CLIP_RATIOS,
                                                      relative_loss=True, min_gain=0.3)), Step("pow2_skip_scales", Pow2SkipScalesConfig()),
           Step("quantize_weights", QuantizeWeightsConfig(clip_search=True)), Step("insert_activation_qdq")),
    wbits=4,
)
