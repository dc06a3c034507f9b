"""`megastack generate --input-file IN --output-file OUT`: offline batch generation through the gateway.

What Pai-Megatron-Patch's ``run_text_generation_megatron_llama.sh`` does (a file of samples in, a file of
generations out, top_k / top_p / temperature / repetition_penalty, input and output lengths), served by
the textgen service instead of a one-off Megatron process:

- Input: ``.jsonl`` (each line a string, or an object with ``prompt``, ``text``, ``query`` or
  ``instruction`` [+ ``input``]) or plain text, one sample per line. Every line is checked before
  anything is generated; a bad line stops the run with ``file:line`` (``--skip-bad`` records it instead).
- Output: JSON lines in input order: ``{"index", "prompt", "text", "finish_reason"}`` (or with ``error``
  instead of ``text``), flushed and fsynced batch by batch.
- Resumable: lines already in the output file are not generated again; a torn last line (a crash mid-
  write) is dropped and redone. The output must belong to the same input (checked on the prompts).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

KEYS = ("prompt", "text", "query")


@dataclass
class Sample:
    index: int
    line_no: int
    prompt: str | None
    error: str | None = None


def read_samples(path: Path) -> list[Sample]:
    jsonl = path.suffix in (".jsonl", ".json")
    out: list[Sample] = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise SampleError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompt, error = line, None
        if jsonl:
            prompt, error = _prompt_of(line)
        out.append(Sample(len(out), no, prompt, error))
    return out


def _prompt_of(line: str) -> tuple[str | None, str | None]:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg} at column {e.colno})"
    if isinstance(doc, str):
        return doc, None
    if not isinstance(doc, dict):
        return None, f"expected a string or an object, got {type(doc).__name__}"
    for k in KEYS:
        if isinstance(doc.get(k), str):
            return doc[k], None
    if isinstance(doc.get("instruction"), str):
        extra = doc.get("input")
        return doc["instruction"] + (f"\n{extra}" if isinstance(extra, str) and extra else ""), None
    return None, f"no prompt: expected one of {', '.join(KEYS)} or instruction (+input) as a string"


class SampleError(Exception):
    pass


def done_lines(out: Path, samples: list[Sample]) -> int:
    """How many complete, matching lines the output already holds; drops a torn last line."""
    if not out.exists():
        return 0
    raw = out.read_bytes()
    keep = raw[: raw.rfind(b"\n") + 1] if not raw.endswith(b"\n") else raw
    n = 0
    for line in keep.decode("utf-8", errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            raise SampleError(
                f"{out}: line {n + 1} is not JSON; not a megastack output file (move it away)"
            ) from None
        if (
            n >= len(samples)
            or doc.get("index") != n
            or ("prompt" in doc and doc["prompt"] != samples[n].prompt)
        ):
            raise SampleError(
                f"{out}: line {n + 1} does not match {n}th sample of the input; it belongs to another input "
                "(use another --output-file, or remove it to start over)"
            )
        n += 1
    if len(keep) != len(raw):
        with out.open("r+b") as f:
            f.truncate(len(keep))
    return n


def run(a: Any) -> int:
    from tqdm import tqdm

    from tools.cli.endpoints import auth_headers

    inp, out = Path(a.input_file), Path(a.output_file)
    if not inp.is_file():
        print(f"megastack generate: {inp} does not exist", file=sys.stderr)
        return 2
    try:
        samples = read_samples(inp)
        bad = [s for s in samples if s.error]
        if bad and not a.skip_bad:
            for s in bad[:20]:
                print(f"{inp}:{s.line_no}: {s.error}", file=sys.stderr)
            more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
            print(
                f"megastack generate: {len(bad)} bad line(s){more}; nothing generated (--skip-bad records "
                "them and goes on)",
                file=sys.stderr,
            )
            return 2
        start = done_lines(out, samples)
    except SampleError as e:
        print(f"megastack generate: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    session = requests.Session()
    session.headers.update(auth_headers(a.api_key))
    params = {
        "max_tokens": a.tokens_to_generate,
        "temperature": 0.0 if a.greedy else a.temperature,
        "repetition_penalty": a.repetition_penalty,
    }
    if a.top_k and not a.greedy:
        params["top_k"] = a.top_k
    if a.top_p:
        params["top_p"] = a.top_p
    if a.seed is not None:
        params["seed"] = a.seed
    bar = tqdm(total=len(samples), initial=start, unit="sample", desc=out.name, disable=a.no_progress)
    failed = 0
    with out.open("a", encoding="utf-8") as f:
        for i in range(start, len(samples), a.batch_size):
            batch = samples[i : i + a.batch_size]
            try:
                rows = _generate(session, a, params, batch)
            except SampleError as e:
                bar.close()
                print(
                    f"megastack generate: {e}; {i} of {len(samples)} samples are written, run again to go on",
                    file=sys.stderr,
                )
                return 1
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
            failed += sum("error" in r for r in rows)
            bar.update(len(batch))
    bar.close()
    print(f"wrote {len(samples) - start} samples to {out} ({start} were already there; {failed} with errors)")
    return 0


def _generate(session: requests.Session, a: Any, params: dict, batch: list[Sample]) -> list[dict]:
    """One /v1/completions call for the batch; a batch the gateway refuses is retried sample by sample so
    one bad prompt costs only its own line."""
    good = [s for s in batch if s.error is None]
    rows = {s.index: {"index": s.index, "error": s.error} for s in batch if s.error}
    if good:
        try:
            rows.update(_call(session, a, params, good))
        except _Refused:
            for s in good:
                try:
                    rows.update(_call(session, a, params, [s]))
                except _Refused as e:
                    rows[s.index] = {"index": s.index, "prompt": s.prompt, "error": str(e)}
    return [rows[s.index] for s in batch]


class _Refused(Exception):
    pass


def _call(session: requests.Session, a: Any, params: dict, batch: list[Sample]) -> dict[int, dict]:
    prompts: list[Any] = [s.prompt for s in batch]
    if a.max_input_tokens:
        prompts = [_truncate(session, a, p) for p in prompts]
    body = {**params, "prompt": prompts}
    try:
        r = session.post(f"{a.url}/v1/completions", data=json.dumps(body), timeout=a.timeout)
    except requests.RequestException as e:
        raise SampleError(f"the gateway at {a.url} is unreachable ({type(e).__name__})") from None
    if r.status_code in (400, 413, 422):
        raise _Refused(_message(r))
    if r.status_code != 200:
        raise SampleError(f"the gateway answered {r.status_code}: {_message(r)}")
    out = {}
    for ch in r.json()["choices"]:
        s = batch[ch["index"]]
        out[s.index] = {
            "index": s.index,
            "prompt": s.prompt,
            "text": ch["text"],
            "finish_reason": ch.get("finish_reason"),
        }
    return out


def _truncate(session: requests.Session, a: Any, prompt: str) -> Any:
    r = session.post(f"{a.url}/tokenize", data=json.dumps({"prompt": prompt}), timeout=a.timeout)
    if r.status_code != 200:
        raise _Refused(_message(r))
    ids = r.json()["tokens"]
    return ids[-a.max_input_tokens :] if len(ids) > a.max_input_tokens else prompt


def _message(r: requests.Response) -> str:
    try:
        return r.json().get("message") or r.text[:200]
    except ValueError:
        return r.text[:200]
