"""tools/bench/baselines.py: an engine not installed is reported with what to set; one that is installed is
started, waited for, and stopped with its whole process group."""

from __future__ import annotations

import sys

import pytest
import requests

from shared.net import free_port
from tools.bench import baselines


def test_engines_not_installed_say_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGASTACK_BENCH_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    assert baselines.vllm(tmp_path, "float32", 16).startswith(
        f"not installed ({tmp_path / 'nope' / 'python'}"
    )
    monkeypatch.setenv("MEGASTACK_BENCH_LLAMA_SERVER", str(tmp_path / "llama-server"))
    assert baselines.llama_server(tmp_path, "float32", 16).startswith(
        f"not installed ({tmp_path / 'llama-server'} not found; set MEGASTACK_BENCH_LLAMA_SERVER"
    )
    monkeypatch.setenv("MEGASTACK_BENCH_LLAMA_SERVER", sys.executable)
    monkeypatch.setenv("MEGASTACK_BENCH_GGUF", str(tmp_path / "model.gguf"))
    assert baselines.llama_server(tmp_path, "float32", 16).startswith(
        f"not installed ({tmp_path / 'model.gguf'} not found"
    )


def test_llama_server_defaults_beside_the_project_with_a_gguf_of_the_bench_dtype(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGASTACK_BENCH_LLAMA_SERVER", raising=False)
    monkeypatch.delenv("MEGASTACK_BENCH_GGUF", raising=False)
    monkeypatch.setattr(baselines, "LLAMA_DIR", tmp_path)
    model = tmp_path / "smol"
    assert f"{tmp_path / 'llama-server'} not found" in baselines.llama_server(model, "bfloat16", 16)
    (tmp_path / "llama-server").write_text("")
    assert f"{tmp_path / 'smol-bf16.gguf'} not found" in baselines.llama_server(model, "bfloat16", 16)
    (tmp_path / "smol-bf16.gguf").write_text("")
    e = baselines.llama_server(model, "bfloat16", 16)
    assert e.argv[:3] == [str(tmp_path / "llama-server"), "-m", str(tmp_path / "smol-bf16.gguf")]
    assert e.argv[e.argv.index("-np") + 1] == "16" and e.extra == {"cache_prompt": False}


def test_an_installed_vllm_is_started_with_prefix_caching_off_and_the_model_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGASTACK_BENCH_VLLM_PYTHON", sys.executable)
    e = baselines.vllm(tmp_path, "bfloat16", 16)
    assert e.argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert "--no-enable-prefix-caching" in e.argv and e.argv[e.argv.index("--dtype") + 1] == "bfloat16"
    assert e.extra == {"model": baselines.SERVED_NAME}


def test_serving_waits_for_the_models_route_and_stops_the_process_group(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text('{"data": []}')
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        "127.0.0.1",
        "--directory",
        str(tmp_path),
    ]
    engine = baselines.Engine("a stand-in server", argv, port, start_timeout_s=30)
    with baselines.serving(engine) as url:
        assert requests.get(f"{url}/v1/models", timeout=5).ok
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v1/models", timeout=5)


def test_an_engine_that_dies_on_start_is_an_error_naming_its_log():
    engine = baselines.Engine("a broken engine", [sys.executable, "-c", "raise SystemExit(3)"], free_port())
    with pytest.raises(RuntimeError, match=r"a broken engine exited with 3 on start; see .*bench-baseline-"):
        with baselines.serving(engine):
            pass
