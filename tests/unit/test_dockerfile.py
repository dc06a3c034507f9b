"""deploy/docker/Dockerfile stays true to pyproject.toml (no Docker engine runs here, so this is what keeps
the image honest): the Python each documented base brings is one the project supports, and so do its
pinned megatron-core and torch; torch is the pinned version; the lock file is what gets installed; pip runs
in a venv (Ubuntu 24.04's system Python refuses it); no apt package names a Python the base lacks."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

from shared.paths import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "deploy/docker/Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# The Python each base image brings: python:X.Y-* images, and the CUDA images' Ubuntu release.
UBUNTU_PYTHON = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12"}


def base_python(image: str) -> str:
    m = re.match(r"python:(\d+\.\d+)", image)
    if m:
        return m.group(1)
    m = re.search(r"(ubuntu\d+\.\d+)$", image)
    assert m and m.group(1) in UBUNTU_PYTHON, f"unknown base {image}: add its Python here"
    return UBUNTU_PYTHON[m.group(1)]


def bases() -> list[str]:
    default = re.search(r"^ARG BASE=(\S+)", DOCKERFILE, re.M).group(1)
    return [default, *re.findall(r"BASE=(nvidia/cuda:\S+)", DOCKERFILE)]


def test_the_documented_bases_include_a_cuda_one():
    assert len(bases()) >= 2 and any(b.startswith("nvidia/cuda:") for b in bases())


@pytest.mark.parametrize("image", bases())
def test_each_base_brings_a_python_the_project_and_its_pins_support(image):
    py = base_python(image)
    assert py in SpecifierSet(PYPROJECT["project"]["requires-python"]), (image, py)
    for dist in ("megatron-core", "torch", "ray", "transformers", "lm_eval"):
        needs = importlib.metadata.metadata(dist).get("Requires-Python") or ""
        assert py in SpecifierSet(needs), f"{dist} needs Python {needs}, {image} has {py}"


def test_apt_never_asks_for_a_versioned_python():
    for line in re.findall(r"apt-get install[^\n]*", DOCKERFILE):
        assert not re.search(r"python3\.\d+", line), line


def test_torch_pin_and_lock_file_match_pyproject():
    pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    assert re.search(rf"pip install {re.escape(pin)} --index-url", DOCKERFILE), pin
    assert (
        "pip install -r requirements.lock" in DOCKERFILE
        and "COPY requirements.lock pyproject.toml" in DOCKERFILE
    )
    lock = (REPO_ROOT / "requirements.lock").read_text()
    mc = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("megatron-core"))
    assert mc in lock.splitlines(), f"{mc} of pyproject.toml is not the locked megatron-core"


def test_pip_runs_in_a_venv_and_transformer_engine_is_optional():
    assert "python3 -m venv /opt/venv" in DOCKERFILE and "PATH=/opt/venv/bin:$PATH" in DOCKERFILE
    assert re.search(r'if \[ "\$\{TE\}" = "1" \]; then python -m pip install', DOCKERFILE)
    assert "ARG TE=0" in DOCKERFILE
