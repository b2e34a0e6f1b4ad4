"""Recipe settings overrides: ``Recipe.with_settings``, ``--set PASS.FIELD=VALUE`` and the DGQ flags."""

import argparse

import pytest
from qcompiler.passes.dgq_groups import DgqGroupsConfig

from qcompiler.cli.compile_command import add_arguments, recipe_settings
from qcompiler.errors import QCompileError
from qcompiler.recipes import get_recipe, parse_setting


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["model.onnx", *argv])


def _config(recipe, pass_name):
    return next(step.config for step in recipe.steps if step.pass_name == pass_name)


def test_parse_setting_reads_toml_values_and_falls_back_to_strings():
    assert parse_setting("dgq_groups.groups=8") == ("dgq_groups", "groups", 8)
    assert parse_setting("quantize_weights.clip_search=true") == ("quantize_weights", "clip_search", True)
    assert parse_setting("learned_scales.objective=output") == ("learned_scales", "objective", "output")
    assert parse_setting("log2_attention.keep_start_token=[]") == ("log2_attention", "keep_start_token", ())
    with pytest.raises(QCompileError, match="PASS.FIELD=VALUE"):
        parse_setting("groups=8")


def test_dgq_flags_replace_the_step_configs_and_leave_the_builtin_alone():
    dgq = get_recipe("dgq")
    args = _args("--groups", "8", "--channel-groups", "fold", "--per-timestep")
    changed = dgq.with_settings(recipe_settings(args))
    assert _config(changed, "dgq_groups") == DgqGroupsConfig(groups=8, per_timestep=True)
    # The channel-group form is the target's choice, not a pass setting.
    assert args.channel_groups == "fold" and args.target == "ort"
    assert [s.pass_name for s in changed.steps] == [s.pass_name for s in dgq.steps]
    assert _config(get_recipe("dgq"), "dgq_groups") in (None, DgqGroupsConfig())


def test_set_overrides_are_validated_against_the_recipe_and_the_config():
    with pytest.raises(QCompileError, match="recipe 'minmax' has no pass 'dgq_groups'"):
        get_recipe("minmax").with_settings(recipe_settings(_args("--groups", "8")))
    with pytest.raises(QCompileError, match="has no setting \\['bogus'\\]"):
        get_recipe("dgq").with_settings(recipe_settings(_args("--set", "dgq_groups.bogus=1")))
    with pytest.raises(QCompileError, match="groups must be at least 1"):
        get_recipe("dgq").with_settings(recipe_settings(_args("--set", "dgq_groups.groups=0")))


def test_a_recipe_file_with_the_retired_group_pass_says_what_replaced_it(tmp_path):
    from qcompiler.recipes import load_recipe_file

    path = tmp_path / "old.toml"
    path.write_text('[[steps]]\npass = "dgq_groups"\n[[steps]]\npass = "insert_group_qdq"\nchannel_groups = "fold"\n')
    with pytest.raises(QCompileError, match="--channel-groups"):
        load_recipe_file(path)


def test_bias_correction_flag_reaches_the_ort_target_and_is_refused_elsewhere():
    from qcompiler.api import CompileOptions, _target

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["m.onnx", "--recipe", "dgq", "--bias-correction", "off"])
    assert args.bias_correction == "off"
    assert _target(CompileOptions(bias_correction=False)).config.bias_correction is False
    assert _target(CompileOptions()).config.bias_correction is True
    with pytest.raises(QCompileError, match="--bias-correction off"):
        _target(CompileOptions(bias_correction=False, target="tensorrt"))
