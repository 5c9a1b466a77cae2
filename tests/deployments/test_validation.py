"""The edge rules without Ray: admin token, adapter paths, config limits, app config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.api_models import CompletionRequest, RequestError
from deployments.validation import (
    check_admin,
    enforce_limits,
    explicit_mix,
    from_validation_error,
    resolve_under_root,
)
from dlp.config import AppConfig, ServingLimits, deep_merge, load_app_config, parse_set_option
from dlp.errors import DlpError


def test_admin_token_rules() -> None:
    check_admin("Bearer s3cret", expected="s3cret")
    check_admin("bearer s3cret", expected="s3cret")
    with pytest.raises(RequestError) as e:
        check_admin(None, expected="s3cret")
    assert e.value.status == 401
    with pytest.raises(RequestError) as e:
        check_admin("Token s3cret", expected="s3cret")
    assert e.value.status == 401
    with pytest.raises(RequestError) as e:
        check_admin("Bearer s3cre", expected="s3cret")
    assert e.value.status == 403
    with pytest.raises(RequestError) as e:  # nothing configured: closed, not open
        check_admin("Bearer anything", expected="")
    assert e.value.status == 403


def _adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def test_resolve_under_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    good = _adapter_dir(root / "team" / "a")
    assert resolve_under_root("team/a", root) == good.resolve()
    outside = _adapter_dir(tmp_path / "outside")
    os.symlink(outside, root / "link")
    linked_file = _adapter_dir(root / "b")
    (linked_file / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", linked_file / "adapter_model.safetensors")
    pickled = _adapter_dir(root / "p")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    cases = {
        "../outside": (400, ".."),
        "team/../../outside": (400, ".."),
        str(outside): (400, "relative"),
        "~/x": (400, "relative"),
        "link": (400, "adapter root"),
        "b": (400, "symlink"),
        "p": (400, "pickle"),
        "nothing": (404, "no adapter directory"),
        "a\x00b": (400, "NUL"),
    }
    for raw, (status, words) in cases.items():
        with pytest.raises(RequestError) as e:
            resolve_under_root(raw, root)
        assert e.value.status == status, raw
        assert e.value.field == "path"
        assert words in e.value.message, (raw, e.value.message)


def test_enforce_limits_and_mix() -> None:
    limits = ServingLimits(
        max_tokens_cap=10,
        default_max_tokens=4,
        max_stop_strings=1,
        max_adapters_per_mix=2,
        max_context_tokens=64,
    )
    assert enforce_limits(CompletionRequest(prompt="x"), limits) == 4
    assert enforce_limits(CompletionRequest(prompt="x", max_tokens=10), limits) == 10
    for req, field in [
        (CompletionRequest(prompt="x", max_tokens=11), "max_tokens"),
        (CompletionRequest(prompt="x", stop=["a", "b"]), "stop"),
        (CompletionRequest(prompt="x", stop=["a" * 65]), "stop"),
    ]:
        with pytest.raises(RequestError) as e:
            enforce_limits(req, limits)
        assert e.value.field == field
    assert explicit_mix({"a": 1, "b": 3}, limits).as_dict() == {"a": 0.25, "b": 0.75}
    with pytest.raises(RequestError) as e:
        explicit_mix({"a": 1, "b": 1, "c": 1}, limits)
    assert e.value.field == "adapters" and "at most 2" in e.value.message


def test_validation_errors_name_the_field() -> None:
    for payload, field in [
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "stream": "maybe"}, "stream"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "adapters": {"a": "b"}}, "adapters.a"),
        ({}, "prompt"),
    ]:
        with pytest.raises(ValidationError) as e:
            CompletionRequest.model_validate(payload)
        err = from_validation_error(e.value)
        assert err.status == 400 and err.field == field, (payload, err)


def test_limits_are_consistent() -> None:
    with pytest.raises(ValidationError):
        ServingLimits(max_tokens_cap=1024, max_context_tokens=1024)
    with pytest.raises(ValidationError):
        ServingLimits(default_max_tokens=100, max_tokens_cap=50)
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"limits": {"max_body_bytes": 10}})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"engine": {"model": "/m", "shape": "qwen2-1.5b"}})
    with pytest.raises(ValidationError):
        AppConfig.model_validate({"worker": {"no_such_field": 1}})
    # A mix as large as the limit allows must fit the adapter pool.
    with pytest.raises(ValidationError, match="max_adapters_per_mix"):
        AppConfig.model_validate({"engine": {"pool_slots": 4}})
    fits = {"engine": {"pool_slots": 4}, "limits": {"max_adapters_per_mix": 4}}
    assert AppConfig.model_validate(fits).engine.pool_slots == 4


def test_engine_process_defaults_to_the_device() -> None:
    """worker.engine_process null: the engine runs in a child process with CUDA only (where
    Serve's threads would share its GIL); an explicit value wins either way."""
    worker = AppConfig.model_validate({}).worker
    assert worker.engine_process is None
    assert worker.uses_engine_process("cuda") and worker.uses_engine_process("cuda:1")
    assert not worker.uses_engine_process("cpu")
    for value in (True, False):
        worker = AppConfig.model_validate({"worker": {"engine_process": value}}).worker
        assert worker.uses_engine_process("cpu") is value
        assert worker.uses_engine_process("cuda") is value


def test_app_args_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLP_APP_ARGS", json.dumps({"worker": {"num_gpus": 1}}))
    cfg = load_app_config({"worker": {"num_cpus": 2}, "engine": {"device": "cpu"}})
    assert cfg.worker.num_gpus == 1 and cfg.worker.num_cpus == 2
    monkeypatch.setenv("DLP_APP_ARGS", "{not json")
    with pytest.raises(DlpError, match="DLP_APP_ARGS"):
        load_app_config({})


def test_set_option_parsing() -> None:
    assert parse_set_option("worker.num_gpus=1") == {"worker": {"num_gpus": 1}}
    assert parse_set_option("engine.device=cuda") == {"engine": {"device": "cuda"}}
    assert parse_set_option("router_dir=") == {"router_dir": None}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    for bad in ("novalue", "=1", "a..b=1"):
        with pytest.raises(DlpError):
            parse_set_option(bad)


def test_serve_config_yaml_is_a_valid_app_config() -> None:
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text())
    (app,) = config["applications"]
    assert app["name"] == "dlp" and app["import_path"] == "deployments.app:build_app"
    cfg = AppConfig.model_validate(app["args"])
    assert cfg.worker.num_gpus == 0 and cfg.engine.device == "cpu"


def test_engine_config_from_app_config() -> None:
    """The GPU override maps onto a valid dlp.engine EngineConfig (no model is built)."""
    from deployments.worker import engine_config_dict
    from dlp.engine.config import EngineConfig

    cfg = AppConfig.model_validate(
        {
            "engine": {
                "shape": "qwen2-1.5b",
                "device": "cuda",
                "dtype": "bfloat16",
                "max_batch": 64,
                "admit_min_rows": 16,
                "compile_scope": "step",
                "decode_attention": "triton",
                "decode_gemm": "triton",
            },
            "limits": {"max_context_tokens": 2048, "max_adapter_rank": 8},
        }
    )
    engine = EngineConfig(**engine_config_dict(cfg))
    engine.validate()
    assert engine.admit_rows == 16
    assert engine.compile_scope == "step" and engine.decode_attention == "triton"
    assert engine.decode_gemm == "triton"
    assert engine.model_config["hidden_size"] == 1536 and engine.tokenizer_path
    assert engine.max_seq_len == 2048 and engine.max_rank == 8 and engine.max_batch == 64
    default = EngineConfig(**engine_config_dict(AppConfig()))
    default.validate()
    assert default.model_path is None and default.model_config is None  # embedded default
    # The decode settings default to "auto" (resolved by the runner per device: decode_path.py).
    assert (default.compile_scope, default.decode_attention, default.decode_gemm) == ("auto",) * 3
    # The fast path can also be named through the app config.
    fast = AppConfig.model_validate(
        {
            "engine": {
                "device": "cuda",
                "compile_scope": "step",
                "decode_attention": "triton_rope",
                "decode_gemm": "triton_pdl",
            }
        }
    )
    fast_engine = EngineConfig(**engine_config_dict(fast))
    fast_engine.validate()
    assert fast_engine.decode_gemm == "triton_pdl"
    # Overlapped steps: on for CUDA unless switched off, never on the CPU by default.
    assert default.overlap_steps is None and not default.use_overlap
    assert engine.use_overlap  # the cuda config above
    cfg_off = AppConfig.model_validate({"engine": {"device": "cuda", "overlap_steps": False}})
    assert not EngineConfig(**engine_config_dict(cfg_off)).use_overlap
    # Queue-ahead: off unless asked for, and only ever with overlapped steps.
    assert not default.use_queue_ahead and not engine.use_queue_ahead
    ahead = {"device": "cuda", "overlap_queue_ahead": True}
    cfg_ahead = AppConfig.model_validate({"engine": ahead})
    assert EngineConfig(**engine_config_dict(cfg_ahead)).use_queue_ahead
    cfg_ahead_sync = AppConfig.model_validate({"engine": {**ahead, "overlap_steps": False}})
    assert not EngineConfig(**engine_config_dict(cfg_ahead_sync)).use_queue_ahead
    # Spare cache rows: off by default, passed through, never negative.
    assert default.spare_rows == 0
    spare = AppConfig.model_validate({"engine": {"spare_rows": 16}})
    assert EngineConfig(**engine_config_dict(spare)).spare_rows == 16
    with pytest.raises(ValidationError, match="spare_rows"):
        AppConfig.model_validate({"engine": {"spare_rows": -1}})
    with pytest.raises(DlpError, match="spare_rows"):
        EngineConfig(spare_rows=-1).validate()
    for bad in ({"compile_scope": "model"}, {"decode_attention": "flash"}, {"decode_gemm": "x"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            AppConfig.model_validate({"engine": bad})
        with pytest.raises(DlpError, match=next(iter(bad))):
            EngineConfig(**bad).validate()


def test_routing_view_drops_the_options_block() -> None:
    from deployments.api_models import routing_view
    from dlp.training.prompts import user_text

    text = user_text("Is the sky green?", ["yes", "no"])
    assert routing_view(text) == "Is the sky green?"
    assert routing_view("no options here") == "no options here"
    assert routing_view("\n\nOptions:\n- a") == "\n\nOptions:\n- a"  # nothing before: keep


def test_stale_cluster_file_detection(tmp_path: Path) -> None:
    import socket

    from dlp.serve_cli import stale_cluster_file

    assert stale_cluster_file(tmp_path / "missing") is False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = tmp_path / "dead"
    dead.write_text(f"127.0.0.1:{port}")
    assert stale_cluster_file(dead) is True
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = tmp_path / "live"
        live.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        assert stale_cluster_file(live) is False
