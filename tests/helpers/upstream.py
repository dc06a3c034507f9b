"""Upstream tools run by path from a checkout outside this repository (never copied into it).

``MEGASTACK_MEGATRON_LM`` names a Megatron-LM checkout, or a bare git directory of one (then the file is
read from its HEAD into a temporary folder). Without it, a mirror beside the repository
(``../.mirror/NVIDIA+Megatron-LM/repo``) is used when present. Tests that need one skip, saying why,
where none is found.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests

from shared.paths import REPO_ROOT


def megatron_lm_file(relpath: str, tmp_dir: Path) -> Path | None:
    candidates = [
        os.environ.get("MEGASTACK_MEGATRON_LM", ""),
        str(REPO_ROOT.parent / ".mirror" / "NVIDIA+Megatron-LM" / "repo"),
    ]
    for c in filter(None, candidates):
        root = Path(c)
        if (root / relpath).is_file():
            return root / relpath
        if (root / "HEAD").is_file() and (root / "objects").is_dir():  # a bare git directory
            out = subprocess.run(
                ["git", f"--git-dir={root}", "show", f"HEAD:{relpath}"], capture_output=True, text=True
            )
            if out.returncode == 0:
                dest = tmp_dir / Path(relpath).name
                dest.write_text(out.stdout)
                return dest
    return None


def megatron_cli_exchange(url: str, sentence: str, tokens_to_generate) -> str:
    """What Megatron-LM's tools/text_generation_cli.py does for one prompt (the contract written down in
    shared/reference/megatron-contract.md 1.8), as it prints it. Used where no checkout is found."""
    data = {"prompts": [sentence], "tokens_to_generate": tokens_to_generate}
    response = requests.put(
        url + "/api", data=json.dumps(data), headers={"Content-Type": "application/json"}, timeout=120
    )
    if response.status_code != 200:
        return f"Error {response.status_code}: {response.json()['message']}"
    return "Megatron Response: \n" + response.json()["text"][0]
