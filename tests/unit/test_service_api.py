"""Each service's public module for tools/ (services/<svc>/api.py) names only what exists, and costs nothing
to import."""

import importlib
import subprocess
import sys

import pytest

from shared.paths import REPO_ROOT

pytestmark = pytest.mark.unit
APIS = ["services.trainer.api", "services.converter.api", "services.textgen.api", "services.evaluator.api"]


@pytest.mark.parametrize("name", APIS)
def test_every_public_name_resolves(name):
    api = importlib.import_module(name)
    assert api.__all__ and dir(api) == api.__all__
    for attr in api.__all__:
        assert getattr(api, attr) is not None, attr
    with pytest.raises(AttributeError, match="public names"):
        api.not_a_public_name  # noqa: B018


def test_importing_the_apis_loads_no_torch():
    probe = f"import sys; import {', '.join(APIS)}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr[-2000:]
