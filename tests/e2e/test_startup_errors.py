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
    return subprocess.run([sys.executable, "-m", module], env=full, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize("env,code,message", [
    ({"MEGASTACK_TEXTGEN_MAX_BATCH_SIZE": "many"}, 2, "MEGASTACK_TEXTGEN_MAX_BATCH_SIZE='many' is not an integer"),
    ({"MEGASTACK_TEXTGEN_MAX_BACH_SIZE": "4"}, 2, "unknown setting MEGASTACK_TEXTGEN_MAX_BACH_SIZE (did you mean MEGASTACK_TEXTGEN_MAX_BATCH_SIZE?)"),
    ({"MEGASTACK_TEXTGEN_DTYPE": "int4"}, 2, "MEGASTACK_TEXTGEN_DTYPE='int4' is not one of float32, bfloat16, float16"),
    ({"MEGASTACK_TEXTGEN_MODEL_DIR": "/nonexistent/model"}, 1, "model folder /nonexistent/model does not exist (run `make setup`, or set MEGASTACK_TEXTGEN_MODEL_DIR)"),
])
def test_textgen_refuses_to_start(env, code, message):
    out = run_service("services.textgen", {"MEGASTACK_TEXTGEN_PORT": "0", "MEGASTACK_TEXTGEN_METRICS_PORT": "0", **env})
    assert out.returncode == code
    assert error_lines(out.stderr) == [f"megastack-textgen: error: {message}"]
    assert "Traceback" not in out.stderr


def test_taken_ports_are_reported(tiny_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_service("services.textgen", {"MEGASTACK_TEXTGEN_PORT": str(port), "MEGASTACK_TEXTGEN_METRICS_PORT": "0",
                                               "MEGASTACK_TEXTGEN_MODEL_DIR": str(tiny_models["llama"])})
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert error_lines(out.stderr) == [f"megastack-textgen: error: cannot bind gRPC port 127.0.0.1:{port}: address already in use or not available"]
        out = run_service("services.textgen", {"MEGASTACK_TEXTGEN_PORT": "0", "MEGASTACK_TEXTGEN_METRICS_PORT": str(port)})
        assert error_lines(out.stderr) == [f"megastack-textgen: error: metrics port 127.0.0.1:{port} is already in use"]
        out = run_service("services.gateway", {"MEGASTACK_GATEWAY_PORT": str(port)})
        assert out.returncode == 1 and error_lines(out.stderr) == [f"megastack-gateway: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_gateway_bad_setting():
    out = run_service("services.gateway", {"MEGASTACK_GATEWAY_TEXTGEN_ADDRS": ""})
    assert out.returncode == 2
    assert error_lines(out.stderr) == ["megastack-gateway: error: invalid MEGASTACK_GATEWAY_* settings: textgen_addrs must name at least one replica"]
