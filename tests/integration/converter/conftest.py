import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.paths import REPO_ROOT
from tests.fixtures import tiny


@pytest.fixture(scope="session")
def deep_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 4-layer Llama for uneven and virtual pipeline layouts."""
    return tiny.make_tiny_hf(
        "llama", tmp_path_factory.mktemp("deep") / "llama4", tiny_tokenizer, num_hidden_layers=4
    )


def hf_reference(model_dir: Path, out: Path) -> Path:
    model = tiny.load_hf(model_dir)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": model(tokens).logits.float()}, out)
    return out


def torchrun(args: list[str], nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    from llm.mcore.dist import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        str(REPO_ROOT / "tests" / "helpers" / "mcore_load.py"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
