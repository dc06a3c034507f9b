"""API keys with scopes.

A key grants scopes: ``generate`` (text generation, tokenization, the model list, the WebSocket routes),
``jobs`` (``/v1/jobs/*``: conversions, training, evaluations) and ``admin`` (everything). Keys come from
``MEGASTACK_GATEWAY_API_KEYS`` (comma-separated) and/or the file ``MEGASTACK_GATEWAY_API_KEYS_FILE`` (one
key per line, ``#`` comments; a k8s Secret mounted as a file), never from a command-line flag. Each entry
is ``<key>`` (all scopes, as keys were before scopes existed) or ``<key>:<scope>[+<scope>...]``.
``/health``, ``/ready`` and ``/metrics`` stay open (probes and Prometheus).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

SCOPES = ("generate", "jobs", "admin")
OPEN_PATHS = ("/health", "/ready", "/metrics")


def parse_keys(entries: Iterable[str], keys_file: str | Path | None = None) -> dict[bytes, frozenset[str]]:
    """key -> scopes, or ValueError naming the bad entry (never the key itself)."""
    lines = [e.strip() for e in entries if e.strip()]
    if keys_file:
        path = Path(keys_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"api_keys_file {path}: {e.strerror or e}") from None
        lines += [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    out: dict[bytes, frozenset[str]] = {}
    for n, line in enumerate(x for x in lines if x):
        key, _, scopes = line.partition(":")
        granted = (
            frozenset(s.strip() for s in scopes.split("+") if s.strip()) if scopes else frozenset(SCOPES)
        )
        unknown = granted - set(SCOPES)
        if not key.strip() or unknown:
            why = "an empty key" if not key.strip() else f"unknown scopes {sorted(unknown)}"
            raise ValueError(
                f"API key entry {n + 1} has {why} (entries are <key> or <key>:<scope>+<scope>; scopes: "
                f"{', '.join(SCOPES)})"
            )
        out[key.strip().encode()] = granted
    return out


def scope_of(path: str) -> str | None:
    """The scope a request path needs; None for the open paths."""
    if path in OPEN_PATHS:
        return None
    return "jobs" if path == "/v1/jobs" or path.startswith("/v1/jobs/") else "generate"


def authorize(keys: dict[bytes, frozenset[str]], header: str, path: str) -> tuple[int, str] | None:
    """None when the request may go on, else (status, message): 401 without a known key, 403 without the
    scope."""
    need = scope_of(path)
    if not keys or need is None:
        return None
    given = (
        header.removeprefix("Bearer ").strip().encode()
    )  # "Bearer <key>" (OpenAI) or the bare key (PAI-EAS)
    granted = None
    for k, scopes in keys.items():  # compare against every key: the time taken does not tell which matched
        if given and hmac.compare_digest(given, k):
            granted = scopes
    if granted is None:
        return 401, "missing or invalid API key (send Authorization: Bearer <key>)"
    if need not in granted and "admin" not in granted:
        return 403, f"this API key lacks the '{need}' scope ({path} needs it)"
    return None


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
