"""The rows of ``bench_diffusion``: which recipe, bits and settings each compiled model gets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: DGQ without the attention quantizer (Softmax outputs stay float, as in minmax/smoothquant/osplus).
DGQ_NO_ATTENTION_TOML = '''name = "dgq-attn-float"
description = "dgq groups, attention probabilities left float"
[[steps]]
pass = "quantize_weights"
[[steps]]
pass = "dgq_groups"
[[steps]]
pass = "insert_activation_qdq"
'''


@dataclass(frozen=True)
class Row:
    recipe: str
    wbits: int
    abits: int
    variant: str = ""                 # ablation label; "" for the main table
    extra: tuple[str, ...] = ()       # more CLI flags (--set ..., --groups ...)
    toml: str | None = None           # a recipe file's text instead of the built-in recipe

    @property
    def simulate_for_quality(self) -> bool:
        """Rows lowered with ``--channel-groups split`` (slow on ORT's CPU) sample images from a
        ``--channel-groups simulate`` twin (see bench_diffusion); every other row from its deployed model."""
        extra = list(self.extra)
        return "--channel-groups" in extra and extra[extra.index("--channel-groups") + 1] == "split"

    def key(self, lowering: str | None = None) -> str:
        name = f"{self.recipe}{'-' + self.variant if self.variant else ''}.w{self.wbits}a{self.abits}"
        return f"{name}.{lowering}" if lowering else name

    def recipe_arg(self, work: Path) -> str:
        if self.toml is None:
            return self.recipe
        path = work / f"{self.key()}.toml"
        path.write_text(self.toml)
        return str(path)

    def describe(self) -> dict:
        return {"row": self.key(), "recipe": self.recipe, "setting": f"W{self.wbits}A{self.abits}",
                "variant": self.variant, "flags": list(self.extra)}


def main_rows(settings: list[str], recipes: list[str]) -> list[Row]:
    """Every recipe at every setting, except ``dmq`` at 8-bit weights (DMQ targets W4A8/W4A6 and its
    learned scales cost minutes per compile)."""
    rows = []
    for setting in settings:
        wbits, abits = int(setting[1]), int(setting[3])
        rows += [Row(recipe, wbits, abits) for recipe in recipes if not (recipe == "dmq" and wbits == 8)]
    return rows


def ablation_rows(wbits: int = 8, abits: int = 8) -> list[Row]:
    """DGQ at one setting: attention float/linear/log2 × start token exempt or not, K = 1/8/16,
    per-timestep ranges, and the fold lowering."""
    no_keep = ("--set", "log2_attention.keep_start_token=[]")
    linear = ("--set", "log2_attention.quantizer=linear")
    return [
        Row("dgq", wbits, abits, "attn-float", toml=DGQ_NO_ATTENTION_TOML),
        Row("dgq", wbits, abits, "linear", linear),
        Row("dgq", wbits, abits, "linear-no-keep", linear + no_keep),
        Row("dgq", wbits, abits, "log2-no-keep", no_keep),
        Row("dgq", wbits, abits, "k1", ("--groups", "1")),
        Row("dgq", wbits, abits, "k8", ("--groups", "8")),
        Row("dgq", wbits, abits, "per-timestep", ("--set", "dgq_groups.per_timestep=true")),
        Row("dgq", wbits, abits, "fold", ("--channel-groups", "fold")),
    ]


def fold_rows() -> list[Row]:
    """DGQ's fold lowering (group ratios folded into W: one integer GEMM per layer, not bit-exact)
    at the settings the ablation does not cover."""
    return [Row("dgq", wbits, abits, "fold", ("--channel-groups", "fold")) for wbits, abits in ((8, 6), (4, 8))]


def dmq_rows() -> list[Row]:
    """DMQ with the paper's adaptive timestep weighting (the recipe's default leaves it off)."""
    weighting = ("--set", "learned_scales.timestep_weighting=adaptive")
    return [Row("dmq", 4, abits, "timestep-weighting", weighting) for abits in (8, 6)]


def weight_clip_rows() -> list[Row]:
    """The int4 weight quantizer's share of a W4 result: minmax with the MSE clip search that dgq
    and dmq use at W4, and dgq with plain min/max int4 weights."""
    return [Row("minmax", 4, abits, "clip-search", ("--set", "quantize_weights.clip_search=true"))
            for abits in (8, 6)] + [
            Row("dgq", 4, abits, "minmax-weights", ("--set", "quantize_weights.clip_search=false"))
            for abits in (8, 6)]
