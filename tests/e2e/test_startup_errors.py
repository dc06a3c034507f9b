"""A bad setting, a missing model folder or a taken port: exit non-zero with one clear line, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from shared.paths import REPO_ROOT


def run_service(module: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MEGASTACK_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", module],
        env=full,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize(
    "env,code,message",
    [
        (
            {"MEGASTACK_TEXTGEN_MAX_BATCH_SIZE": "many"},
            2,
            "MEGASTACK_TEXTGEN_MAX_BATCH_SIZE='many' is not an integer",
        ),
        (
            {"MEGASTACK_TEXTGEN_MAX_BACH_SIZE": "4"},
            2,
            "unknown setting MEGASTACK_TEXTGEN_MAX_BACH_SIZE (did you mean "
            "MEGASTACK_TEXTGEN_MAX_BATCH_SIZE?)",
        ),
        (
            {"MEGASTACK_TEXTGEN_DTYPE": "int4"},
            2,
            "MEGASTACK_TEXTGEN_DTYPE='int4' is not one of float32, bfloat16, float16",
        ),
        (
            {"MEGASTACK_TEXTGEN_MODEL_DIR": "/nonexistent/model"},
            1,
            "model folder /nonexistent/model does not exist (run `make setup`, or set "
            "MEGASTACK_TEXTGEN_MODEL_DIR)",
        ),
    ],
)
def test_textgen_refuses_to_start(env, code, message):
    out = run_service(
        "services.textgen", {"MEGASTACK_TEXTGEN_PORT": "0", "MEGASTACK_TEXTGEN_METRICS_PORT": "0", **env}
    )
    assert out.returncode == code
    assert error_lines(out.stderr) == [f"megastack-textgen: error: {message}"]
    assert "Traceback" not in out.stderr


def test_taken_ports_are_reported(tiny_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_service(
            "services.textgen",
            {
                "MEGASTACK_TEXTGEN_PORT": str(port),
                "MEGASTACK_TEXTGEN_METRICS_PORT": "0",
                "MEGASTACK_TEXTGEN_MODEL_DIR": str(tiny_models["llama"]),
            },
        )
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert error_lines(out.stderr) == [
            f"megastack-textgen: error: cannot bind gRPC port 127.0.0.1:{port}: address already in use or "
            "not available"
        ]
        out = run_service(
            "services.textgen", {"MEGASTACK_TEXTGEN_PORT": "0", "MEGASTACK_TEXTGEN_METRICS_PORT": str(port)}
        )
        assert error_lines(out.stderr) == [
            f"megastack-textgen: error: metrics port 127.0.0.1:{port} is already in use"
        ]
        out = run_service("services.gateway", {"MEGASTACK_GATEWAY_PORT": str(port)})
        assert out.returncode == 1 and error_lines(out.stderr) == [
            f"megastack-gateway: error: cannot listen on 127.0.0.1:{port}: Address already in use"
        ]


def test_gateway_bad_setting():
    out = run_service("services.gateway", {"MEGASTACK_GATEWAY_TEXTGEN_ADDRS": ""})
    assert out.returncode == 2
    assert error_lines(out.stderr) == [
        "megastack-gateway: error: invalid MEGASTACK_GATEWAY_* settings: textgen_addrs must name at least "
        "one replica"
    ]


def test_gateway_refuses_to_serve_open_beyond_loopback(tmp_path):
    out = run_service(
        "services.gateway", {"MEGASTACK_GATEWAY_HOST": "0.0.0.0", "MEGASTACK_GATEWAY_PORT": "0"}
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = error_lines(out.stderr)
    assert (
        "refusing to serve on 0.0.0.0 without API keys" in line and "MEGASTACK_GATEWAY_ALLOW_OPEN=1" in line
    )
    bad = tmp_path / "keys"
    bad.write_text("secret-key:generate+root\n")
    out = run_service(
        "services.gateway", {"MEGASTACK_GATEWAY_API_KEYS_FILE": str(bad), "MEGASTACK_GATEWAY_PORT": "0"}
    )
    assert out.returncode == 2 and "unknown scopes ['root']" in out.stderr and "secret-key" not in out.stderr


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _textgen(model_dir, **env) -> subprocess.CompletedProcess:
    return run_service(
        "services.textgen",
        {
            "MEGASTACK_TEXTGEN_PORT": "0",
            "MEGASTACK_TEXTGEN_METRICS_PORT": "0",
            "MEGASTACK_TEXTGEN_MODEL_DIR": str(model_dir),
            **env,
        },
    )


def test_unsupported_rope_scaling_is_one_line(tiny_models, tmp_path):
    import json

    model = _copy_model(tiny_models["llama"], tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"] = {
        "rope_type": "longrope",
        "factor": 4.0,
        "short_factor": [1.0],
        "long_factor": [1.0],
    }
    cfg.pop("rope_parameters", None)
    (model / "config.json").write_text(json.dumps(cfg))
    out = _textgen(model)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    [line] = error_lines(out.stderr)
    assert "rope_scaling type 'longrope'" in line and "MEGASTACK_TEXTGEN_MODEL_DIR" in line, line


def test_missing_tensors_are_one_line(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tiny_models["llama"], tmp_path / "m")
    [st] = list(model.glob("*.safetensors"))
    tensors = load_file(st)
    tensors.pop(next(k for k in tensors if "layers.0.mlp.down_proj" in k))
    save_file(tensors, st, metadata={"format": "pt"})
    out = _textgen(model)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    [line] = error_lines(out.stderr)
    assert "tensors missing" in line and "mlp.down_proj" in line, line


def test_kv_cache_larger_than_memory_is_one_line_naming_the_settings(tiny_models):
    out = _textgen(
        tiny_models["llama"],
        MEGASTACK_TEXTGEN_KV_CACHE_MB="50000000",
        MEGASTACK_TEXTGEN_MAX_BATCH_SIZE="50000000",
        MEGASTACK_TEXTGEN_MAX_QUEUE_SIZE="50000000",
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    [line] = error_lines(out.stderr)
    assert "MEGASTACK_TEXTGEN_KV_CACHE_MB=50000000" in line and "GiB" in line, line


def test_kv_cache_too_small_for_one_sequence_is_one_line_naming_the_settings(tiny_models):
    out = _textgen(tiny_models["llama"], MEGASTACK_TEXTGEN_KV_CACHE_BLOCKS="3")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    [line] = error_lines(out.stderr)
    assert "MEGASTACK_TEXTGEN_KV_CACHE_BLOCKS=3" in line and "MEGASTACK_TEXTGEN_MAX_CONTEXT_TOKENS" in line, (
        line
    )
