"""Recipe ``ptq4dit``: PTQ4DiT's salience balancing (CSB with Spearman-guided SSC), folded offline, then W8A8/W4A8.

Steps, in order:
- ``salience_balance``: per GEMM after an AdaLN modulation (qkv, fc1) and per attention output
  projection, B = sqrt(s̃(X)/s(W)) with s̃(X) the activation salience weighted over timesteps by
  softmax(−Spearman ρ); X/B is folded into the modulation (its Linear's scale and shift rows, PixArt's
  table) or into V, B into the weights. fc2 is left alone, as in the paper.
- ``quantize_weights``: int8 per output channel (min/max); at ``--wbits 4`` int4 blocks / MatMulNBits
  with the MSE clip search of each scale (as dgq and dmq do at W4; the paper's weight quantizer also
  searches its range).
- ``insert_activation_qdq``: per-tensor static uint8 activations, so every GEMM stays one ORT integer kernel.

The paper's code divides X at run time; here nothing is added to the graph where a modulation
Linear, table or V absorbs 1/B (a per-sample Mul where a Linear is shared, as PixArt's
``adaln_single``; explicit Muls are listed in the report's ``fallbacks``). CSB alone (no SSC):
``--set salience_balance.spearman=false``.
"""

from qcompiler.passes.quantize_weights import QuantizeWeightsConfig
from qcompiler.recipes import Recipe, Step

PTQ4DIT = Recipe(
    name="ptq4dit",
    description="PTQ4DiT: channel-wise salience balancing B = sqrt(s̃(X)/s(W)) with s̃(X) weighted over timesteps "
                "by softmax(−Spearman ρ), on the GEMMs after AdaLN modulations (folded into the modulation "
                "Linear/table) and attention output projections (folded into V); per-channel weights (int4 with "
                "MSE clip search) and per-tensor static activations on ORT integer kernels",
    steps=(Step("salience_balance"), Step("quantize_weights", QuantizeWeightsConfig(clip_search=True,
                                                                                    clip_search_max_bits=4)),
           Step("insert_activation_qdq")),
)
