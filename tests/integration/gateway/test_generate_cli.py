"""`megastack generate` as a user runs it (a real process): the interactive loop with streaming, and one
clear line, no traceback, when the gateway cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from shared.net import free_port
from shared.paths import REPO_ROOT


def megastack(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEGASTACK_")}
    return subprocess.run(
        [sys.executable, "-m", "tools.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
    )


def greedy(url: str, prompt: str, n: int) -> str:
    r = requests.post(
        f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=60
    )
    return r.json()["choices"][0]["text"]


def test_interactive_loop_streams_each_prompt(gateway):
    prompts = ["the cat sat on", "one two three"]
    out = megastack(
        "generate",
        "--interactive",
        "--url",
        gateway.url,
        "-n",
        "5",
        "--greedy",
        stdin=f"{prompts[0]}\n\n   \n{prompts[1]}\n",
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    for p in prompts:
        assert f"{p}{greedy(gateway.url, p, 5)}\n" in out.stdout, out.stdout
    assert out.stdout.count("prompt> ") == 5  # two prompts, two blank lines skipped, then end of input


def test_interactive_refuses_prompt_flags(gateway):
    out = megastack("generate", "--interactive", "-p", "x", "--url", gateway.url)
    assert out.returncode == 2 and "--interactive" in out.stderr


@pytest.mark.parametrize("mode", [["-p", "hi"], ["-p", "hi", "--stream"], ["--interactive"]])
def test_unreachable_gateway_is_one_line(mode):
    url = f"http://127.0.0.1:{free_port()}"
    out = megastack("generate", "--url", url, *mode, stdin="hello\n")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.startswith("megastack: ")]
    assert lines == [
        f"megastack: cannot reach the gateway at {url} (connection refused); is the stack up? make up"
    ], out.stderr
