"""Every command of the migration guides (docs/workflows/: megatron-lm, pai-megatron-patch, modellink and
hf-deepspeed .md) runs, in order, on a tiny model against a real stack: the pages cannot rot.

Substitutions make the runs tiny (the default model -> a tiny Llama; sizes and step counts shrunk; runs/ ->
a temporary folder). Lines that manage the stack (`make ...`, `megastack up/down`) are the test's job, and
lines marked "(needs its data" need datasets this offline machine does not have."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from shared.paths import REPO_ROOT
from tools.cli.endpoints import client_env
from tools.stack import StackOptions, up

TINY = {
    "megatron-lm.md": {
        "--num-layers 24": "--num-layers 2",
        "--hidden-size 1024": "--hidden-size 64",
        "--num-attention-heads 16": "--num-attention-heads 4",
        "--seq-length 1024": "--seq-length 64",
        "--max-position-embeddings 1024": "--max-position-embeddings 64",
        "--micro-batch-size 4": "--micro-batch-size 2",
        "--train-iters 500000": "--train-iters 4",
        "--lr-decay-iters 320000": "--lr-decay-iters 4",
        "--fp16": "",
    },
    "pai-megatron-patch.md": {
        "runs/pai/mcore 1000000 10240": "runs/pai/mcore 4096 1024",
        "runs/pai/mcore 1000 10": "runs/pai/mcore 4 1",
        "--tokens-to-generate 32": "--tokens-to-generate 8",
    },
    "modellink.md": {"--num-layer-list 14,16": "--num-layer-list 1,1"},
    "hf-deepspeed.md": {},  # the tiny model in place of SmolLM2 is enough: 16 records, 4 steps an epoch
}
COMMAND_TIMEOUT_S = 240
SKIP = (r"^make ", r"^megastack (up|down)\b", r"\(needs its data")


def page_commands(page) -> list[str]:
    """The commands of a page's bash blocks, one per line, trailing comments kept (they carry the markers)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(line.strip())
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    s = up(
        StackOptions(
            run_dir=tmp_path_factory.mktemp("pages-stack"),
            model_dir=tiny_models["llama"],
            free_ports=True,
            services=("textgen", "trainer", "evaluator", "gateway"),
        ),
        log=lambda _: None,
    )
    yield s
    s.down()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", sorted(TINY))
def test_guide_page_runs(page, stack, tiny_models, tmp_path):
    gateway = stack.endpoint("gateway", "http")
    env = {
        **os.environ,
        "PATH": f"{REPO_ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        **client_env(
            {
                "gateway": gateway,
                "textgen": stack.endpoint("textgen", "grpc"),
                "trainer": stack.endpoint("trainer", "grpc"),
                "evaluator": stack.endpoint("evaluator", "grpc"),
            }
        ),
    }
    subs = {
        **TINY[page],
        "models/smollm2-135m-instruct": str(tiny_models["llama"]),
        "runs/": f"{tmp_path}/runs/",
        "ws://127.0.0.1:5000": gateway.replace("http://", "ws://"),
    }
    ran = 0
    for cmd in page_commands(REPO_ROOT / "docs" / "workflows" / page):
        if any(re.search(p, cmd) for p in SKIP):
            continue
        cmd = cmd.split("  #")[0].strip()
        for a, b in subs.items():
            cmd = cmd.replace(a, b)
        started = time.monotonic()
        try:
            out = subprocess.run(
                ["bash", "-c", cmd],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"{page}: `{cmd}` still running after "
                f"{COMMAND_TIMEOUT_S}s:\n{(e.stdout or b'')[-2500:]!r}\n{(e.stderr or b'')[-2500:]!r}"
            )
        print(f"{time.monotonic() - started:6.1f}s  {cmd}")
        if out.returncode != 0 and "train submit" in cmd and out.stdout:  # the ranks' log says why
            logs = subprocess.run(
                ["bash", "-c", f"megastack train logs {out.stdout.split()[0]}"],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            out.stderr += "\n--- job log ---\n" + "\n".join(
                line for line in logs.stdout.splitlines() if "Error" in line or "rank0]" in line
            )
        assert out.returncode == 0, (
            f"{page}: `{cmd}` failed ({out.returncode}):\n{out.stdout[-2500:]}\n{out.stderr[-2500:]}"
        )
        assert "Traceback" not in out.stderr, f"{page}: `{cmd}`:\n{out.stderr[-2500:]}"
        ran += 1
    assert ran >= 6
