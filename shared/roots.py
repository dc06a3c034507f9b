"""Where job paths may point, and which model endpoints an evaluation may call.

Jobs submitted over gRPC (and so over the gateway's ``/v1/jobs/*``) name paths the services then read,
write or import code from; a caller must not be able to name any path on the machine. Every such path
is resolved (``~``, ``..`` and symlinks) and must lie under one of the **data roots**:

- ``MEGASTACK_DATA_ROOTS``: folders separated by ``:`` or ``,`` (k8s: the shared volume, ``/data``);
- unset: the repository's ``runs/`` and ``models/`` and the service's working directory (``make up``
  starts the services in the folder it is run from, so that folder is a root too).

An evaluation's ``textgen_address`` / ``completions_url`` must match ``MEGASTACK_ALLOWED_ENDPOINTS``
(``host`` or ``host:port`` entries, ``,``-separated); unset, the stack's own default addresses. The local
stack sets it to the services it started. A CLI run by the user on their own machine (``megastack convert``
without ``--address``) is the operator acting, and is not confined.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import InvalidArgument
from shared.paths import REPO_ROOT

ROOTS_ENV = "MEGASTACK_DATA_ROOTS"
ENDPOINTS_ENV = "MEGASTACK_ALLOWED_ENDPOINTS"
DEFAULT_ENDPOINTS = ("127.0.0.1:50051", "localhost:50051", "127.0.0.1:5000", "localhost:5000")


def data_roots() -> tuple[Path, ...]:
    """The folders job paths must lie under: MEGASTACK_DATA_ROOTS, else runs/, models/ and the working
    folder."""
    raw = os.environ.get(ROOTS_ENV, "")
    roots = (
        [Path(x.strip()) for x in re.split(r"[:,]", raw) if x.strip()]
        if raw.strip()
        else [REPO_ROOT / "runs", REPO_ROOT / "models", Path.cwd()]
    )
    return tuple(dict.fromkeys(r.expanduser().resolve() for r in roots))


def under_roots(path: str | Path, field: str) -> Path:
    """``path`` resolved, or InvalidArgument naming ``field`` and the roots when it lies outside all of
    them."""
    if not str(path).strip():
        return Path(path)
    p = Path(path).expanduser().resolve()  # a relative path resolves against the service's folder
    roots = data_roots()
    if not any(p == r or r in p.parents for r in roots):
        raise InvalidArgument(
            f"{field} {p} is outside the data roots ({', '.join(map(str, roots))}); jobs read and "
            f"write only there (the service's {ROOTS_ENV} setting)",
            field=field,
        )
    return p


def allowed_endpoints() -> tuple[str, ...]:
    """Host:port pairs that model endpoints in job specs may name: MEGASTACK_ALLOWED_ENDPOINTS, else the
    local textgen and gateway (127.0.0.1/localhost on 50051 and 5000)."""
    raw = os.environ.get(ENDPOINTS_ENV, "")
    return tuple(x.strip().lower() for x in raw.split(",") if x.strip()) if raw.strip() else DEFAULT_ENDPOINTS


def check_endpoint(address: str, field: str) -> None:
    """``address`` (``host:port`` or a URL) must match an allowed ``host`` or ``host:port`` entry."""
    netloc = urlsplit(address).netloc if "://" in address else address
    host, _, port = (
        netloc.rpartition(":") if netloc.count(":") == 1 or netloc.startswith("[") else (netloc, "", "")
    )
    host = (host or netloc).lower()
    if "://" in address and not port:
        port = "443" if address.lower().startswith("https") else "80"
    allowed = allowed_endpoints()
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise InvalidArgument(
            f"{field} {address!r} is not an allowed model endpoint ({', '.join(allowed)}); the "
            f"evaluator calls only those (the service's {ENDPOINTS_ENV} setting)",
            field=field,
        )
