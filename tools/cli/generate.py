"""`megastack generate`: generate through the gateway (Megatron PUT /api, SSE streaming, or an interactive
prompt loop with streaming)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import requests

from tools.cli.endpoints import auth_headers, endpoint


def _fail(resp: requests.Response) -> int:
    try:
        msg = resp.json().get("message", resp.text)
    except ValueError:
        msg = resp.text
    print(f"error {resp.status_code}: {msg}", file=sys.stderr)
    return 1


def run(a: argparse.Namespace) -> int:
    if a.input_file or a.output_file:
        if not (a.input_file and a.output_file):
            print("megastack generate: --input-file and --output-file go together", file=sys.stderr)
            return 2
        if a.prompt or a.stream:
            print(
                "megastack generate: --input-file does not combine with --prompt or --stream", file=sys.stderr
            )
            return 2
        from tools.cli.batch_generate import run as run_batch

        return run_batch(a)
    if a.interactive:
        if a.prompt:
            print(
                "megastack generate: --interactive reads its prompts at the prompt, not from --prompt",
                file=sys.stderr,
            )
            return 2
        return _interactive(a)
    prompts = a.prompt or ([sys.stdin.read()] if not sys.stdin.isatty() else [])
    if not prompts:
        print("megastack generate: give --prompt (or pipe a prompt on stdin)", file=sys.stderr)
        return 2
    if a.stream:
        return _stream(a, prompts)
    body = {
        "prompts": prompts,
        "tokens_to_generate": a.tokens_to_generate,
        "logprobs": a.logprobs,
        "temperature": a.temperature,
        "top_k": 1 if a.greedy else a.top_k,
        "top_p": a.top_p,
        "add_BOS": a.add_bos,
        "repetition_penalty": a.repetition_penalty,
    }
    if a.seed is not None:
        body["random_seed"] = a.seed
    resp = requests.put(
        f"{a.url}/api", data=json.dumps(body), headers=auth_headers(a.api_key), timeout=a.timeout
    )
    if resp.status_code != 200:
        return _fail(resp)
    out = resp.json()
    for i, text in enumerate(out["text"]):
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print(text)
        if a.logprobs:
            segs, lps = out["segments"][i], out["logprobs"][i]
            for seg, lp in zip(segs[1:], lps):
                print(f"  {lp:9.4f}  {seg!r}")
    return 0


def _stream(a: argparse.Namespace, prompts: list[str], session: requests.Session | None = None) -> int:
    """Stream the completion of ``prompts[0]`` to stdout (prompt first) through /v1/completions."""
    body = {
        "prompt": prompts[0],
        "max_tokens": a.tokens_to_generate,
        "temperature": 0.0 if a.greedy else a.temperature,
        "stream": True,
        "repetition_penalty": a.repetition_penalty,
    }
    if a.top_k:
        body["top_k"] = a.top_k
    if a.top_p:
        body["top_p"] = a.top_p
    if a.seed is not None:
        body["seed"] = a.seed
    if a.logprobs:
        body["logprobs"] = 1
    with (session or requests).post(
        f"{a.url}/v1/completions", json=body, headers=auth_headers(a.api_key), stream=True, timeout=a.timeout
    ) as resp:
        if resp.status_code != 200:
            return _fail(resp)
        sys.stdout.write(prompts[0])
        try:
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                doc = json.loads(data)
                if "error" in doc:
                    print(f"\nerror: {doc['error']['message']}", file=sys.stderr)
                    return 1
                for ch in doc.get("choices", []):
                    sys.stdout.write(ch.get("text", ""))
                    sys.stdout.flush()
        finally:
            sys.stdout.write("\n")
            sys.stdout.flush()
    return 0


def _interactive(a: argparse.Namespace) -> int:
    """Our own prompt loop: each prompt's completion streams as it is generated. Ctrl-C stops the current
    generation (the gateway frees its slot at once), Ctrl-D or an empty input stream ends the loop."""
    session = requests.Session()
    print(
        f"megastack generate: {a.url}, {a.tokens_to_generate} tokens per prompt "
        f"({'greedy' if a.greedy else f'temperature {a.temperature}'}); Ctrl-C stops a generation, Ctrl-D "
        "quits",
        file=sys.stderr,
    )
    while True:
        try:
            prompt = input("prompt> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not prompt.strip():
            continue
        try:
            _stream(a, [prompt], session)
        except KeyboardInterrupt:
            print("[stopped]", file=sys.stderr)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text through the gateway (one prompt, or a file of them)",
        description="Generate through the gateway: prompts on the command line or stdin, or offline batch "
        "generation from --input-file (jsonl or text, one sample per line) to --output-file "
        "(jsonl, resumable: samples already written are not generated again).",
    )
    p.add_argument("--url", default=endpoint("gateway"), help="gateway base URL (default %(default)s)")
    p.add_argument("--prompt", "-p", action="append", help="prompt (repeat for several); default: stdin")
    p.add_argument(
        "--tokens-to-generate", "-n", type=int, default=64, help="tokens to generate (default %(default)s)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off, 1 = greedy")
    p.add_argument("--top-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (top_k=1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--add-bos", action="store_true", help="prepend the BOS token")
    p.add_argument("--logprobs", action="store_true", help="print the log-probability of every token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (first prompt)")
    p.add_argument(
        "--interactive",
        "-i",
        action="store_true",
        help="a prompt loop: type a prompt, its completion streams back; Ctrl-D quits",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MEGASTACK_API_KEY") or None,
        help="API key when the gateway requires one; default $MEGASTACK_API_KEY (prefer it: a flag shows in "
        "ps)",
    )
    p.add_argument("--timeout", type=float, default=600.0)
    b = p.add_argument_group("batch generation from a file")
    b.add_argument(
        "--input-file",
        help="jsonl (prompt/text/query/instruction+input, or strings) or text, one sample per line",
    )
    b.add_argument("--output-file", help="jsonl written in input order; an existing one is continued")
    b.add_argument("--batch-size", type=int, default=16, help="samples per request (default %(default)s)")
    b.add_argument(
        "--max-input-tokens", type=int, default=0, help="keep only the last N prompt tokens (0 = no limit)"
    )
    b.add_argument(
        "--skip-bad", action="store_true", help="record bad input lines as errors instead of stopping"
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
