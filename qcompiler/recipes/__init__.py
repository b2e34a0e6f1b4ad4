"""Recipes as data: an ordered list of (pass, config) with default bit widths; loadable from TOML."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from qcompiler.errors import QCompileError

#: Passes whose work moved to the lowering stage: what to use instead.
RETIRED_PASSES = {
    "insert_group_qdq": "DGQ groups are lowered by the target now: drop this step and choose the form with "
                        "--channel-groups affine|split|fold|simulate (CompileOptions.channel_groups)",
}


def _unknown_pass(where: str, name: str, known) -> QCompileError:
    if name in RETIRED_PASSES:
        return QCompileError(f"{where}: pass '{name}' no longer exists; {RETIRED_PASSES[name]}")
    return QCompileError(f"{where}: unknown pass '{name}'; known: {sorted(known)}")


@dataclass(frozen=True)
class Step:
    pass_name: str
    config: object | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: tuple[Step, ...]
    wbits: int = 8
    abits: int = 8
    #: Whether every quantized GEMM is expected to run as an ORT integer kernel (checked after lowering).
    integer_kernels: bool = True

    def build_passes(self):
        from qcompiler.passes import PASSES

        built = []
        for step in self.steps:
            if step.pass_name not in PASSES:
                raise _unknown_pass(f"recipe '{self.name}'", step.pass_name, PASSES)
            built.append(PASSES[step.pass_name](step.config))
        return built

    def describe(self) -> list[str]:
        return [f"{step.pass_name}" + (f" {step.config}" if step.config is not None else "") for step in self.steps]

    def with_step(self, pass_name: str, config: object | None = None, before: str | None = None) -> Recipe:
        """A copy that also runs ``pass_name``: before the first ``before`` step, else last. Unchanged when
        the recipe already runs it. A step whose lowering can stay simulated (tdq: the ORT target
        runs some tables fake-quantized, e.g. Convs under ``--timestep-groups auto``) clears
        ``integer_kernels`` whatever the lowering mode; tdq after
        ``dgq_groups`` also turns DGQ's held-out validation off, as ``--per-timestep`` does: TDQ gives
        every group its own range per timestep, a gain DGQ's static held-out score cannot see, and
        the score dropped the groups of 2 of the DiT's 27 activations at W8A6 (untuned TDQ then lost
        0.9 dB of final-image PSNR to the per-timestep lookup, which keeps them)."""
        if any(step.pass_name == pass_name for step in self.steps):
            return self
        names = [step.pass_name for step in self.steps]
        at = names.index(before) if before in names else len(names)
        steps = self.steps[:at] + (Step(pass_name, config),) + self.steps[at:]
        recipe = replace(self, steps=steps, integer_kernels=self.integer_kernels and pass_name != "tdq")
        if pass_name == "tdq" and "dgq_groups" in names:
            recipe = recipe.with_settings({"dgq_groups": {"validate": False}})
        return recipe

    def with_settings(self, settings: dict[str, dict[str, object]]) -> Recipe:
        """A copy with ``settings[pass][field] = value`` applied to the steps running that pass.

        QCompileError when the recipe has no such pass or the pass's config has no such field.
        """
        from qcompiler.passes import PASSES

        names = {step.pass_name for step in self.steps}
        for pass_name, values in settings.items():
            if pass_name not in names:
                raise QCompileError(f"recipe '{self.name}' has no pass '{pass_name}' to set {sorted(values)} on; "
                                    f"its passes: {', '.join(step.pass_name for step in self.steps)}")
            allowed = {f.name for f in fields(PASSES[pass_name].Config)}
            unknown = set(values) - allowed
            if unknown:
                raise QCompileError(f"pass '{pass_name}' has no setting {sorted(unknown)}; allowed: {sorted(allowed)}")
        steps = []
        for step in self.steps:
            values = settings.get(step.pass_name)
            if values:
                config = step.config if step.config is not None else PASSES[step.pass_name].Config()
                try:
                    step = Step(step.pass_name, replace(config, **values))
                except (TypeError, ValueError) as exc:
                    raise QCompileError(f"pass '{step.pass_name}': {exc}") from None
            steps.append(step)
        return replace(self, steps=tuple(steps))


def with_mixed_precision(recipe: Recipe, w8_budget: float) -> Recipe:
    """``recipe`` with ``mixed_precision`` just before its ``quantize_weights`` (``--w8-budget``).

    The pass measures sensitivities on the weights as that step will see them (after any folding
    pass) and on the grid it will write, so it gets a copy of that step's config.
    """
    from qcompiler.passes.mixed_precision import MixedPrecisionConfig
    from qcompiler.passes.quantize_weights import QuantizeWeightsConfig

    weights = [step.config for step in recipe.steps if step.pass_name == "quantize_weights"]
    if not weights:
        raise QCompileError(f"--w8-budget: recipe '{recipe.name}' has no quantize_weights step to choose weight "
                            "widths for")
    try:
        config = MixedPrecisionConfig(w8_budget=w8_budget, weights=weights[0] or QuantizeWeightsConfig())
    except ValueError as exc:
        raise QCompileError(f"--w8-budget: {exc}") from None
    return recipe.with_step("mixed_precision", config, before="quantize_weights")


def parse_setting(text: str) -> tuple[str, str, object]:
    """``"PASS.FIELD=VALUE"`` -> (pass, field, value); VALUE is read as a TOML value, else kept as a string."""
    key, sep, raw = text.partition("=")
    pass_name, dot, field = key.strip().partition(".")
    if not sep or not dot or not pass_name or not field:
        raise QCompileError(f"--set {text!r}: expected PASS.FIELD=VALUE, e.g. dgq_groups.groups=8")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return pass_name, field, tuple(value) if isinstance(value, list) else value


def _builtin() -> dict[str, Recipe]:
    from qcompiler.recipes.dgq import DGQ, DGQ_LOG2
    from qcompiler.recipes.dmq import DMQ
    from qcompiler.recipes.minmax import MINMAX
    from qcompiler.recipes.osplus import OSPLUS
    from qcompiler.recipes.ptq4dit import PTQ4DIT
    from qcompiler.recipes.qdit import QDIT
    from qcompiler.recipes.smoothquant import SMOOTHQUANT
    from qcompiler.recipes.tdq import TDQ

    return {recipe.name: recipe for recipe in (MINMAX, SMOOTHQUANT, OSPLUS, DGQ, DGQ_LOG2, DMQ, PTQ4DIT, QDIT, TDQ)}


def available_recipes() -> dict[str, Recipe]:
    return _builtin()


def get_recipe(name: str) -> Recipe:
    """A built-in recipe by name, or a user recipe from a ``.toml`` file path."""
    if name.endswith(".toml"):
        return load_recipe_file(Path(name))
    recipes = _builtin()
    if name not in recipes:
        raise QCompileError(f"unknown recipe '{name}'; available: {', '.join(sorted(recipes))} "
                            "(or a path to a recipe .toml file)")
    return recipes[name]


def load_recipe_file(path: Path) -> Recipe:
    """A TOML recipe: ``name``, ``description``, ``wbits``, ``abits`` and ``[[steps]] pass = "..."``
    with the pass's config fields beside ``pass``."""
    from qcompiler.passes import PASSES

    if not path.is_file():
        raise QCompileError(f"{path}: recipe file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise QCompileError(f"{path}: not valid TOML ({exc})") from None
    steps = []
    for index, raw in enumerate(data.get("steps", [])):
        raw = dict(raw)
        pass_name = raw.pop("pass", None)
        if pass_name not in PASSES:
            raise _unknown_pass(f"{path}: step {index + 1}", str(pass_name), PASSES)
        config_cls = PASSES[pass_name].Config
        allowed = {f.name for f in fields(config_cls)}
        unknown = set(raw) - allowed
        if unknown:
            raise QCompileError(f"{path}: step {index + 1} ({pass_name}) has unknown settings {sorted(unknown)}; "
                                f"allowed: {sorted(allowed)}")
        raw = {key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()}
        steps.append(Step(pass_name, config_cls(**raw)))
    if not steps:
        raise QCompileError(f"{path}: recipe has no [[steps]]")
    return Recipe(name=data.get("name", path.stem), description=data.get("description", ""), steps=tuple(steps),
                  wbits=int(data.get("wbits", 8)), abits=int(data.get("abits", 8)),
                  integer_kernels=bool(data.get("integer_kernels", True)))
