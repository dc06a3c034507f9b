"""Streaming client for the gateway's WebSocket endpoint, written the way PAI-EAS / BladeLLM clients are.

    python tools/eas_ws_client.py ws://127.0.0.1:5000/ws "Once upon a time" "The capital of France is" \
        [--token KEY] [--max-new-tokens 64] [--temperature 0.7] [--top-p 0.9]

One connection, the prompts one after the other: each is sent as {"prompt": ..., <settings>} and the
pieces of its answer are printed as they arrive, until the message with "is_end": true.
"""

from __future__ import annotations

import argparse
import json
import sys

import websocket  # websocket-client, as in the PAI-EAS examples


def stream(url: str, prompts: list[str], token: str = "", **settings):
    """Yield (prompt index, text piece) and, at the end of each prompt, (index, None)."""
    header = {"Authorization": token} if token else None
    ws = websocket.create_connection(url, header=header, timeout=600)
    try:
        for i, prompt in enumerate(prompts):
            ws.send(json.dumps({"prompt": prompt, **settings}))
            while True:
                msg = json.loads(ws.recv())
                if "error" in msg:
                    raise RuntimeError(f"prompt {i}: {msg['error']['message']}")
                if msg.get("text"):
                    yield i, msg["text"]
                if msg["is_end"]:
                    yield i, None
                    break
    finally:
        ws.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--token", default="")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=0.9)
    a = ap.parse_args()
    settings = {
        "max_new_tokens": a.max_new_tokens,
        "temperature": a.temperature,
        "top_k": a.top_k,
        "top_p": a.top_p,
    }
    try:
        for _prompt, piece in stream(a.url, a.prompts, a.token, **settings):
            if piece is None:
                sys.stdout.write("\n")
            else:
                if not piece:
                    continue
                sys.stdout.write(piece)
            sys.stdout.flush()
    except (RuntimeError, OSError, websocket.WebSocketException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
