"""Graph-building helpers shared by targets' lowering stages (and by the passes that emit QDQ).

Nothing here decides a grid: these functions turn a grid that a pass decided into ONNX nodes.
- ``qdq``: per-tensor QuantizeLinear/DequantizeLinear on a tensor, narrowing Clips, int32 biases.
- ``channel_affine``: DGQ groups as an exact affine x' = (x − δ)/r under one per-tensor grid.
- ``channel_groups``: the K-split (bit-exact reference) and the fold of DGQ channel groups.
- ``matmul_nbits``: ONNX Runtime's packed int4 layout.
- ``timestep_ranges``: per-timestep group ranges (statistics and their simulated lowering).
- ``timestep_integer``: the same tables on integer GEMMs, the gathered scales applied to their sums.
"""
