"""Recipe.with_step: adding a pass to a recipe (``--tdq``, ``--ptqd``)."""

from qcompiler.passes.dgq_groups import DgqGroupsConfig
from qcompiler.recipes import get_recipe


def test_tdq_after_dgq_turns_the_static_group_validation_off():
    recipe = get_recipe("dgq")
    assert next(s for s in recipe.steps if s.pass_name == "dgq_groups").config in (None, DgqGroupsConfig())
    with_tdq = recipe.with_step("tdq", before="insert_activation_qdq")
    names = [s.pass_name for s in with_tdq.steps]
    assert names.index("tdq") == names.index("insert_activation_qdq") - 1 and not with_tdq.integer_kernels
    assert next(s for s in with_tdq.steps if s.pass_name == "dgq_groups").config.validate is False
    # An explicit setting afterwards (--set dgq_groups.validate=true) still wins.
    again = with_tdq.with_settings({"dgq_groups": {"validate": True}})
    assert next(s for s in again.steps if s.pass_name == "dgq_groups").config.validate is True


def test_other_steps_leave_dgq_validation_alone():
    recipe = get_recipe("dgq").with_step("ptqd")
    config = next(s for s in recipe.steps if s.pass_name == "dgq_groups").config
    assert config is None or config.validate is True
    assert get_recipe("minmax").with_step("tdq", before="insert_activation_qdq").steps[-2].pass_name == "tdq"
