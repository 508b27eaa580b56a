"""`deltaserve serve`'s flags and DELTASERVE_* variables come from the settings models: one flag per field,
defaults in one place, flags over environment over defaults, errors that name the flag."""

from __future__ import annotations

import argparse
import ast
import inspect
from pathlib import Path

import pytest

from deltaserve.server.commands import demo, serve
from deltaserve.server.settings import ServerSettings
from deltaserve.server.settings_flags import flags

NEED = ["--base", "b", "--store", "s"]


def _leaf_fields(model, prefix=()):
    """Every field path of the settings, nested models walked (a KEY=VALUE model's fields are its keys)."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            yield from _leaf_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name)


def _settings(argv, environ=None):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(argv)
    from deltaserve.server.settings_flags import settings_from_args

    return settings_from_args(ServerSettings, args, args.settings_flags, environ=environ or {})


def test_every_settings_field_has_exactly_one_flag():
    covered: dict[tuple[str, ...], list[str]] = {}
    for flag in flags(ServerSettings):
        for path in [flag.path] if not flag.keys else [(*flag.path, key) for key in flag.keys]:
            covered.setdefault(path, []).append(flag.flag)
    leaves = set(_leaf_fields(ServerSettings))
    assert set(covered) == leaves, (sorted(leaves - set(covered)), sorted(set(covered) - leaves))
    assert all(len(names) == 1 for names in covered.values()), {p: n for p, n in covered.items() if len(n) > 1}
    names = [f.flag for f in flags(ServerSettings)]
    assert len(names) == len(set(names))


def _written_defaults(source: str) -> set:
    """Numbers anywhere in ``source`` (type and value), and strings given as a default (``default=`` or a value of
    a ``defaults={...}`` mapping)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            found.add((type(node.value), node.value))
        elif isinstance(node, ast.keyword) and node.arg in ("default", "defaults"):
            values = node.value.values if isinstance(node.value, ast.Dict) else [node.value]
            found |= {(str, v.value) for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
    return found


def test_no_settings_default_is_written_again_in_the_commands():
    """The serve and demo commands take every default from the settings models: no field's default value is
    written in their source again (small counts aside)."""
    defaults = set()
    for flag in flags(ServerSettings):
        value = flag.field.get_default(call_default_factory=True)
        if type(value) in (int, float, str) and value not in (0, 1, 2, ""):
            defaults.add((type(value), value))
    for module in (serve, demo):
        again = _written_defaults(inspect.getsource(module)) & defaults
        assert not again, (module.__name__, sorted(map(str, again)))


def test_defaults_environment_and_flags_in_that_order():
    default = _settings(NEED)
    assert default.engine.max_wait_ms == ServerSettings.model_fields["engine"].annotation.model_fields[
        "max_wait_ms"].default
    env = {"DELTASERVE_MAX_WAIT_MS": "75", "DELTASERVE_API_KEY": "k1,k2", "DELTASERVE_LORA": "off",
           "DELTASERVE_OPS_NEED_KEY": "true", "DELTASERVE_ROUTER_OPTION": "k=3"}
    from_env = _settings([*NEED, "--router", "knn"], env)
    assert from_env.engine.max_wait_ms == 75.0 and from_env.api_keys == ["k1", "k2"]
    assert from_env.engine.enable_lora is False and from_env.ops_need_key is True
    assert from_env.router.options == {"k": "3"}
    flagged = _settings([*NEED, "--max-wait-ms", "5", "--api-key", "k0", "--lora", "on"], env)
    assert flagged.engine.max_wait_ms == 5.0 and flagged.engine.enable_lora is True
    assert flagged.api_keys == ["k0", "k1", "k2"]          # repeated flags add to the environment's list


def test_nested_model_options_and_their_own_flag():
    s = _settings([*NEED, "--adaptive-merge", "off", "--adaptive-option", "window_s=5",
                   "--adaptive-option", "min_requests=3"])
    assert s.engine.adaptive.enabled is False and s.engine.adaptive.window_s == 5.0
    assert s.engine.adaptive.min_requests == 3
    assert s.engine.base_dir == Path("b") and s.store_dir == Path("s")


@pytest.mark.parametrize("argv, message", [
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--adaptive-option", "nope=1"], "--adaptive-option"),
    (["--adaptive-option", "window_s"], "--adaptive-option 'window_s' must be KEY=VALUE"),
    (["--max-lora-rank", "7"], "--max-lora-rank"),
    (["--router", "nope"], "unknown router 'nope'"),
])
def test_a_bad_value_exits_naming_its_flag(argv, message):
    with pytest.raises(SystemExit, match=message):
        _settings([*NEED, *argv])


def test_max_lora_rank_auto_is_sized_from_the_store(tmp_path):
    s = _settings(["--base", "b", "--store", str(tmp_path)])
    assert s.engine.max_lora_rank == "auto" and s.engine.resolved(tmp_path).max_lora_rank == 8
    (tmp_path / "lo").mkdir()
    (tmp_path / "lo" / "manifest.json").write_text('{"codec": "lowrank", "rank": 16}')
    assert s.engine.resolved(tmp_path).max_lora_rank == 32
    assert _settings([*NEED, "--max-lora-rank", "64"]).engine.resolved(tmp_path).max_lora_rank == 64


def test_the_demo_changes_defaults_without_redeclaring_fields():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    settings = serve.settings(args, engine__base_dir="b")
    assert settings.router.name == "knn" and settings.store_dir == Path("store/demo")
    assert "--base" not in parser.format_help()
