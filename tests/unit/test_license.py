"""The license pyproject.toml declares is the one at the root, and NOTICE names the contracts reproduced on
purpose."""

import tomllib

import pytest

from shared.paths import REPO_ROOT

pytestmark = pytest.mark.unit


def test_the_declared_license_is_at_the_root():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert (
        "Apache License" in text
        and "Version 2.0, January 2004" in text
        and "END OF TERMS AND CONDITIONS" in text
    )


def test_notice_names_every_project_whose_interfaces_are_reproduced():
    notice = (REPO_ROOT / "NOTICE").read_text()
    for project in (
        "Megatron-LM",
        "Pai-Megatron-Patch",
        "MindSpeed-LLM",
        "OpenAI API",
        "vLLM",
        "lm-evaluation-harness",
        "Ray",
    ):
        assert project in notice, project
