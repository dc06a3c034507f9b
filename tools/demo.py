"""`megastack demo` (make demo): the main job on the embedded default model, through the services."""

from __future__ import annotations

import argparse
import json
import time

import requests

from shared.paths import DEFAULT_MODEL_DIR, RUN_DIR
from tools.stack import StackOptions, down, up


def run(a: argparse.Namespace) -> int:
    run_dir = a.run_dir
    down(run_dir)  # idempotent: clean up a previous run's processes first
    t0 = time.perf_counter()
    print("== megastack demo: serve the default model and generate through the gateway")
    stack = up(StackOptions(run_dir=run_dir, model_dir=a.model_dir, services=("textgen", "gateway"), gateway_port=a.port))
    try:
        url = stack.endpoint("gateway", "http")
        prompt = "The capital of France is"
        body = {"prompts": [prompt], "tokens_to_generate": 16, "top_k": 1}
        resp = requests.put(f"{url}/api", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=120)
        resp.raise_for_status()
        print(f"\nPUT {url}/api {json.dumps(body)}")
        print(f"-> {resp.json()['text'][0]!r}\n")
    finally:
        stack.down()
    print(f"demo finished in {time.perf_counter() - t0:.1f}s; all services stopped")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the default model")
    p.add_argument("--run-dir", type=__import__("pathlib").Path, default=RUN_DIR / "demo")
    p.add_argument("--model-dir", type=__import__("pathlib").Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=run)
