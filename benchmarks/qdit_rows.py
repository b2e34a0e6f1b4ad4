"""Q-DiT's ablation rows for ``bench_dit_recipes``: searched vs uniform group size 128, dynamic vs static ranges."""

from __future__ import annotations

from diffusion_rows import Row


def qdit_variants(bits: list[tuple[int, int]]) -> list[Row]:
    """Per setting: every layer at the paper's g = 128 (scaled), and the searched sizes with one calibrated
    range per group instead of run-time ranges."""
    rows = []
    for wbits, abits in bits:
        rows.append(Row("qdit", wbits, abits, "uniform-128", ("--set", "qdit_groups.uniform=128")))
        rows.append(Row("qdit", wbits, abits, "static", ("--set", "qdit_groups.dynamic=false")))
    return rows
