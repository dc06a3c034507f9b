"""Where the CLI finds the services: the ports `make up` uses, or MEGASTACK_CLIENT_<SERVICE> for a stack
elsewhere (e.g. MEGASTACK_CLIENT_GATEWAY=http://gw:5000, MEGASTACK_CLIENT_TRAINER=trainer:50053)."""

from __future__ import annotations

import os

DEFAULTS = {
    "gateway": "http://127.0.0.1:5000",
    "textgen": "127.0.0.1:50051",
    "converter": "127.0.0.1:50052",
    "trainer": "127.0.0.1:50053",
    "evaluator": "127.0.0.1:50054",
}


def endpoint(service: str) -> str:
    return os.environ.get(f"MEGASTACK_CLIENT_{service.upper()}") or DEFAULTS[service]


def client_env(addresses: dict[str, str]) -> dict[str, str]:
    """The environment that points the CLI at the given services."""
    return {f"MEGASTACK_CLIENT_{k.upper()}": v for k, v in addresses.items()}


def auth_headers(api_key: str | None) -> dict[str, str]:
    """JSON content type, and the gateway key as a Bearer token when one is given."""
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h
