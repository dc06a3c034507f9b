"""Request parameters, read once for every gateway dialect (Megatron, OpenAI, WebSocket, tokenizer routes).

Typed reads return the value or raise HTTPError(400) naming the field. Integers are bounded by the proto
field they travel in (``shared.limits``), floats must be finite: the protobuf runtime would otherwise raise
on ``2**35`` or ``2**64`` and the client would see a 500. The rules every dialect shares are here and
nowhere else: the greedy rule and the sampling message built from it (:func:`sampling_params`), stop lists
(:func:`stop_list`) and finish-reason names (:func:`finish_name`). A dialect keeps only its own contract:
field names, defaults, ranges and, for Megatron, its exact messages.
"""

from __future__ import annotations

import json
import math
from typing import Any

from protos.textgen.v1 import textgen_pb2 as pb
from services.gateway.http import HTTPError
from shared.limits import (
    INT32_MAX,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_STOP_SEQUENCES,
    MIN_TEMPERATURE,
    MIN_TOP_P,
)


def is_int(value: Any) -> bool:
    """A JSON integer (``true``/``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(doc: dict[str, Any], key: str, default: Any, lo: int, hi: int = INT32_MAX) -> Any:
    """``doc[key]`` as an int in [lo, hi]; ``default`` when absent or null."""
    value = doc.get(key)
    if value is None:
        return default
    if not is_int(value) or not lo <= value <= hi:
        raise HTTPError(400, f"{key} must be an integer in [{lo}, {hi}]", key)
    return value


def number(
    doc: dict[str, Any],
    key: str,
    default: float,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    name: str = "",
    field: str = "",
) -> float:
    """``doc[key]`` as a finite number in [lo, hi] (or (lo, hi]); ``default`` when absent or null. The error
    says ``name`` and names ``field`` (both default to ``key``)."""
    value = doc.get(key)
    if value is None:
        return default
    ok = (
        type(value) in (int, float)
        and math.isfinite(value)
        and lo <= value <= hi
        and not (lo_open and value == lo)
    )
    if not ok:
        bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise HTTPError(400, f"{name or key} must be a number in {bound}", field or key)
    return float(value)


def token_ids(value: Any, key: str) -> list[int] | None:
    """A list of token ids (each in [0, 2**31-1]) or None when ``value`` is not a list of ints; 400 when an
    id does not fit."""
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        return None
    bad = next((t for t in value if not 0 <= t <= INT32_MAX), None)
    if bad is not None:
        raise HTTPError(400, f"{key}: token id {bad} is out of range (0..{INT32_MAX})", key)
    return value


def sampling_is_greedy(temperature: float, top_k: int, top_p: float) -> bool:
    """The one greedy rule of every dialect: temperature below MIN_TEMPERATURE (0 included), top_k == 1,
    or a top_p in (0, MIN_TOP_P), which keeps only the best token."""
    return temperature < MIN_TEMPERATURE or top_k == 1 or 0.0 < top_p < MIN_TOP_P


def sampling_params(
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    repetition_penalty: float,
    *,
    top_p_decay: float = 0.0,
    top_p_bound: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> pb.SamplingParams:
    """The textgen sampling message of every dialect: greedy by :func:`sampling_is_greedy` (then the other
    values do not travel), ``top_k`` <= 0 and ``top_p`` >= 1 mean off; a ``top_k`` above 1 with a
    ``top_p`` in (0, 1) is a 400 naming top_p, since the engine applies one of the two."""
    # what changes the logits travels whether decoding is greedy or not
    common = dict(
        seed=seed,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=logit_bias or {},
    )
    if sampling_is_greedy(temperature, top_k, top_p):
        return pb.SamplingParams(greedy=True, **common)
    top_k = max(top_k, 0)
    top_p = 0.0 if top_p >= 1.0 else top_p
    if top_k > 0 and top_p > 0.0:
        raise HTTPError(400, "top_k and top_p are exclusive: set one of them", "top_p")
    return pb.SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        top_p_decay=top_p_decay,
        top_p_bound=top_p_bound,
        **common,
    )


def logit_bias(doc: dict[str, Any], key: str = "logit_bias") -> dict[int, float]:
    """OpenAI's ``{"<token id>": bias}`` (JSON keys are strings) as ids -> finite numbers in [-100, 100]."""
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise HTTPError(400, f"{key} must be an object of at most {MAX_LOGIT_BIAS_TOKENS} token ids", key)
    out = {}
    for k, v in value.items():
        token = int(k) if isinstance(k, str) and k.isdigit() else None
        if token is None or token > INT32_MAX:
            raise HTTPError(400, f"{key}: {k!r} is not a token id", key)
        out[token] = number(
            {"v": v}, "v", 0.0, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, name=f"{key}[{k}]", field=key
        )
    return out


def stop_list(doc: dict[str, Any], key: str = "stop") -> list[str]:
    """``doc[key]``: a string or a list of at most MAX_STOP_SEQUENCES strings (empty ones ignored)."""
    stop = doc.get(key)
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (
        isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_SEQUENCES
    ):
        raise HTTPError(400, f"{key} must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", key)
    return [s for s in stop if s]


MAX_SCHEMA_CHARS = 100_000


def _schema_text(value: Any, field: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise HTTPError(400, f"{field}: the schema is not valid JSON", field) from None
    if not isinstance(value, dict):
        raise HTTPError(400, f"{field}: the schema must be a JSON object", field)
    text = json.dumps(value)
    if len(text) > MAX_SCHEMA_CHARS:
        raise HTTPError(400, f"{field}: the schema is longer than {MAX_SCHEMA_CHARS} characters", field)
    return text


def guided(doc: dict[str, Any]) -> pb.Guided | None:
    """Structured output, in OpenAI's words (``response_format``: ``json_object``, or ``json_schema`` with
    ``{"name", "schema"}``) or vLLM's (``guided_json``, ``guided_regex``, ``guided_choice``, or the newer
    ``structured_outputs: {"json" | "regex" | "choice": ...}``); at most one. None: free text."""
    found: list[tuple[str, pb.Guided]] = []
    rf = doc.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise HTTPError(
                400, "response_format.type must be text, json_object or json_schema", "response_format"
            )
        if kind == "json_object":
            found.append(("response_format", pb.Guided(json_object=True)))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise HTTPError(400, "response_format.json_schema must be {name, schema}", "response_format")
            found.append(
                ("response_format", pb.Guided(json_schema=_schema_text(js["schema"], "response_format")))
            )
    so = doc.get("structured_outputs")
    if so is not None and not isinstance(so, dict):
        raise HTTPError(400, "structured_outputs must be an object", "structured_outputs")
    vllm = {
        "guided_json": doc.get("guided_json"),
        "guided_regex": doc.get("guided_regex"),
        "guided_choice": doc.get("guided_choice"),
    }
    for key, name in (("json", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice")):
        if so and so.get(key) is not None:
            vllm[name] = so[key]
    if vllm["guided_json"] is not None:
        found.append(("guided_json", pb.Guided(json_schema=_schema_text(vllm["guided_json"], "guided_json"))))
    if vllm["guided_regex"] is not None:
        if not isinstance(vllm["guided_regex"], str) or not vllm["guided_regex"]:
            raise HTTPError(400, "guided_regex must be a non-empty string", "guided_regex")
        found.append(("guided_regex", pb.Guided(regex=vllm["guided_regex"])))
    if vllm["guided_choice"] is not None:
        choice = vllm["guided_choice"]
        if not (isinstance(choice, list) and choice and all(isinstance(c, str) and c for c in choice)):
            raise HTTPError(400, "guided_choice must be a list of non-empty strings", "guided_choice")
        found.append(("guided_choice", pb.Guided(choice=pb.Choices(values=choice))))
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise HTTPError(400, f"give one structured-output constraint, not several ({names})", found[1][0])
    if not found:
        return None
    name, constraint = found[0]
    constraint.field = name  # textgen names this field when the constraint cannot be compiled
    return constraint


# The one table of finish-reason names (OpenAI's words) for every dialect that reports one.
FINISH_NAMES = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_EOL: "stop",
    pb.FINISH_REASON_CANCELLED: "abort",
}


def finish_name(reason: int) -> str:
    """The finish reason's name in every dialect's answers (OpenAI's words)."""
    return FINISH_NAMES.get(reason, "stop")
