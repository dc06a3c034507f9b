"""Shared fixtures: offline environment, tiny models, and servers on 127.0.0.1 port 0."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Jobs may name paths only under the data roots and call only allowed endpoints (shared/roots.py): the
# tests' own folders (the repository, the temporary folders) and the services they start on 127.0.0.1.
# The hostile tests of that confinement set narrower values themselves.
import tempfile  # noqa: E402

os.environ.setdefault(
    "MEGASTACK_DATA_ROOTS", f"{Path(__file__).resolve().parents[1]}:{Path(tempfile.gettempdir()).resolve()}"
)
os.environ.setdefault("MEGASTACK_ALLOWED_ENDPOINTS", "127.0.0.1,localhost")
# Ray heads run with token authentication (tools/stack.py); the tests share one token, set before Ray is
# imported (Ray reads its auth mode once per process), so in-process job clients can talk to them.
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    import secrets

    _token = Path(tempfile.mkdtemp(prefix="megastack-test-ray-")) / "token"
    _token.write_text(secrets.token_hex(32))
    _token.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(_token))


import pytest  # noqa: E402

try:
    from protos.textgen.v1 import textgen_pb2  # noqa: F401
except ImportError:  # pragma: no cover
    raise SystemExit("generated protobuf code is missing: run `make protos`") from None

from tests.fixtures import tiny  # noqa: E402


def pytest_collection_modifyitems(items):
    # A test's folder is its kind: tests/unit -> unit, tests/integration -> integration, tests/e2e -> e2e.
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("unit", "integration", "e2e"):
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: tiny.make_tiny_hf(f, root / f, tiny_tokenizer) for f in tiny.FAMILIES}


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from shared.paths import DEFAULT_MODEL_DIR
    from tools.models import is_prepared

    if not is_prepared(DEFAULT_MODEL_DIR):
        pytest.fail("the default model is not prepared: run `make setup`")
    return DEFAULT_MODEL_DIR


@pytest.fixture(scope="session")
def textgen(tiny_models):
    from tests.fixtures.servers import start_textgen

    handle = start_textgen(tiny_models["llama"])
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def gateway(textgen):
    from tests.fixtures.servers import start_gateway

    handle = start_gateway((textgen.address,))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory, tiny_tokenizer):
    from tests.fixtures.training import make_train_assets

    return make_train_assets(tmp_path_factory.mktemp("train"), tiny_tokenizer)


@pytest.fixture(scope="session")
def instruction_assets(tmp_path_factory, tiny_models):
    from tests.fixtures.training import make_instruction_assets

    return make_instruction_assets(tmp_path_factory.mktemp("instruct"), tiny_models)
