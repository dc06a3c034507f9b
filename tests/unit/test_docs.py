"""Documentation that is generated must be current, and every service documents itself."""

import subprocess
import sys

from shared.paths import REPO_ROOT


def test_service_readmes_have_current_environment_tables():
    out = subprocess.run(
        [sys.executable, "tools/gen_docs.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout


def test_import_rules_hold():
    out = subprocess.run(
        [sys.executable, "tools/check_imports.py"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout
