"""``openllm-clone start`` and :class:`Settings` agree: every field has a flag and an
environment variable, with the field's default and help text (one source)."""

from __future__ import annotations

import typer.main
from openllm_clone.cli import app
from openllm_clone.cli.serve import PARAM_FIELDS, env_var

from openllm_clone.settings import Settings


def test_every_settings_field_is_a_start_option_with_its_default_and_help() -> None:
    group = typer.main.get_command(app)
    start = group.commands["start"]  # type: ignore[attr-defined]
    by_field = {PARAM_FIELDS.get(p.name, p.name): p for p in start.params}
    assert set(by_field) == set(Settings.model_fields), set(Settings.model_fields) ^ set(by_field)
    for name, info in Settings.model_fields.items():
        param = by_field[name]
        assert param.envvar == env_var(name), name
        default = info.get_default(call_default_factory=True)
        got = list(param.default) if isinstance(param.default, tuple | list) else param.default
        assert got == ([] if isinstance(default, list) else default), name
        assert getattr(param, "help", None) == info.description, name


def test_start_builds_the_settings_it_is_given(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Flags and environment reach Settings (serve() is replaced: nothing starts)."""
    import openllm_clone.cli.serve as serve_mod
    from typer.testing import CliRunner

    seen: list[Settings] = []
    monkeypatch.setattr(serve_mod, "serve", seen.append)
    monkeypatch.setenv("OPENLLM_CLONE_MAX_PREFILL_TOKENS", "64")
    monkeypatch.setenv("OPENLLM_CLONE_API_KEY", "k1,k2")
    result = CliRunner().invoke(
        app,
        [
            "start",
            "some-model",
            "--block-size",
            "32",
            "--seed",
            "7",
            "--adapter-id",
            f"a={tmp_path}",
            "--no-prefix-caching",
        ],
    )
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert (settings.model, settings.block_size, settings.seed, settings.max_prefill_tokens) == (
        "some-model",
        32,
        7,
        64,
    )
    assert settings.api_keys == ["k1", "k2"] and not settings.prefix_caching
    assert [a.name for a in settings.adapters] == ["a"]


def test_explicit_bf16_warns_only_where_the_cpu_emulates_it() -> None:
    """``--dtype bfloat16`` on a CPU without native bf16 is said to be slow; ``auto`` picks
    float32 there, so it never warns."""
    import torch
    from openllm_clone.runners.loader import emulated_bf16_warning, pick_dtype

    cpu = torch.device("cpu")
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    warning = emulated_bf16_warning(torch.bfloat16, cpu)
    assert (warning is None) == native
    if warning is not None:
        assert "emulated" in warning and "float32" in warning
    assert emulated_bf16_warning(torch.float32, cpu) is None
    assert emulated_bf16_warning(pick_dtype("auto", cpu), cpu) is None
