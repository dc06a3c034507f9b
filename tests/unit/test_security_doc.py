"""SECURITY.md names only settings and files that exist (a promise in a document must stay true)."""

from __future__ import annotations

import re

from shared.paths import REPO_ROOT
from tests.unit.test_deploy_files import SHARED_SETTINGS, _settings

TEXT = (REPO_ROOT / "SECURITY.md").read_text()


def test_every_setting_it_names_exists():
    known = set(_settings()) | SHARED_SETTINGS | {"MEGASTACK_API_KEY"}
    named = set(re.findall(r"MEGASTACK_[A-Z_]+", TEXT)) - {"MEGASTACK_"}
    named = {n for n in named if not n.endswith("_")}
    assert named and named <= known | {"MEGASTACK_SVC_MAX_WATCHERS"}, named - known


def test_every_file_it_names_exists():
    for rel in re.findall(r"`((?:deploy|shared|tests|services|tools)/[\w./-]+)`", TEXT):
        assert (REPO_ROOT / rel).exists(), rel
