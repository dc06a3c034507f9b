"""`megastack`: the one console script. Subcommands live in their own modules and import lazily."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# (module, description) for each subcommand group; each module defines add_parser(subparsers).
COMMANDS = (
    "tools.models",
    "tools.stack",
    "tools.cli.generate",
    "tools.cli.convert",
    "tools.preprocess.cli",
    "tools.preprocess.dataset_cli",
    "tools.cli.train",
    "tools.cli.eval",
    "tools.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megastack",
        description="The Megatron LLM lifecycle as services: convert, train on Ray, serve, evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    return parser


def unreachable(e: Exception) -> str:
    """One line for an HTTP call that never got an answer: which gateway, why, what to do."""
    from urllib.parse import urlsplit

    import requests

    url = getattr(getattr(e, "request", None), "url", None) or ""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the gateway"
    text = str(e)
    if isinstance(e, requests.Timeout):
        why = "no answer in time; raise --timeout"
    elif "Connection refused" in text:
        why = "connection refused"
    elif (
        "Name or service not known" in text
        or "nodename nor servname" in text
        or "Temporary failure in name resolution" in text
    ):
        why = "unknown host"
    else:
        why = type(e).__name__
    return f"cannot reach the gateway at {base} ({why}); is the stack up? make up"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import requests

    from shared.errors import ServiceError

    try:
        rc = args.func(args)
    except ServiceError as e:
        print(f"megastack: error: {e.message}", file=sys.stderr)
        return 2
    except (requests.ConnectionError, requests.Timeout) as e:
        print(f"megastack: {unreachable(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
