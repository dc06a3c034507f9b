"""``PUT /api``: Megatron-LM's text-generation contract, field by field, in Megatron's order.

Validation follows megatron/inference/text_generation_server.py (core_r0.8.0, with main's beam search
refusal) with its exact messages, but every failure is a 400 with ``{"message": ...}`` (Megatron returns
most of them with HTTP 200, which breaks its own CLI). Behind it is the batching engine, not a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask_restful import Resource

from protos.textgen.v1 import textgen_pb2 as pb
from services.gateway.fields import sampling_params
from services.gateway.http import HTTPError, json_body, json_response
from shared.limits import INT32_MAX, INT64_MAX

MAX_PROMPTS = (
    128  # Megatron's limit; the served replica's own (textgen's max_prompts_per_request) wins when known
)


@dataclass(frozen=True)
class MegatronRequest:
    prompts: list[str]
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    add_BOS: bool = False
    stop_on_double_eol: bool = False
    stop_on_eol: bool = False
    prevent_newline_after_colon: bool = False
    random_seed: int = -1
    repetition_penalty: float = 1.0  # megastack extension (Pai's offline generation has it)


def _bad(message: str, field: str) -> HTTPError:
    return HTTPError(400, message, field)


def _bool(doc: dict[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{key} must be a boolean value", key)
    return value


def parse(doc: dict[str, Any], max_prompts: int = MAX_PROMPTS) -> MegatronRequest:  # noqa: C901 - one check per rule, in order
    if "prompts" not in doc:
        raise _bad("prompts argument required", "prompts")
    if "max_len" in doc:
        raise _bad("max_len is no longer used.  Replace with tokens_to_generate", "max_len")
    if "sentences" in doc:
        raise _bad("sentences is no longer used.  Replace with prompts", "sentences")
    if "beam_width" in doc:
        raise _bad("Beam search is no longer supported.", "beam_width")
    prompts = doc["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _bad("prompts is not a list of strings", "prompts")
    if len(prompts) == 0:
        raise _bad("prompts is empty", "prompts")
    if len(prompts) > max_prompts:
        raise _bad(f"Maximum number of prompts is {max_prompts}", "prompts")

    tokens = doc.get("tokens_to_generate", 64)
    if not isinstance(tokens, int):  # bool is an int, as in Megatron
        raise _bad("tokens_to_generate must be an integer greater than 0", "tokens_to_generate")
    if tokens < 0:
        raise _bad("tokens_to_generate must be an integer greater than or equal to 0", "tokens_to_generate")
    if tokens > INT32_MAX:
        raise _bad(
            f"tokens_to_generate must be an integer less than or equal to {INT32_MAX}", "tokens_to_generate"
        )

    logprobs = _bool(doc, "logprobs")
    if tokens == 0 and not logprobs:
        raise _bad("tokens_to_generate=0 implies logprobs should be True", "logprobs")

    temperature = doc.get("temperature", 1.0)
    if type(temperature) not in (int, float) or not 0.0 < temperature <= 100.0:
        raise _bad("temperature must be a positive number less than or equal to 100.0", "temperature")

    top_k = doc.get("top_k", 0)
    if type(top_k) is not int:
        raise _bad(
            "top_k must be an integer equal to or greater than 0 and less than or equal to 1000", "top_k"
        )
    if not 0 <= top_k <= 1000:
        raise _bad("top_k must be equal to or greater than 0 and less than or equal to 1000", "top_k")

    top_p = doc.get("top_p", 0.0)
    if type(top_p) is not float:
        raise _bad("top_p must be a positive float less than or equal to 1.0", "top_p")
    if top_p > 0.0 and top_k > 0:
        raise _bad("cannot set both top-k and top-p samplings.", "top_p")
    if not 0 <= top_p <= 1.0:
        raise _bad("top_p must be less than or equal to 1.0", "top_p")

    top_p_decay = doc.get("top_p_decay", 0.0)
    if "top_p_decay" in doc:
        if type(top_p_decay) is not float:
            raise _bad("top_p_decay must be a positive float less than or equal to 1.0", "top_p_decay")
        if top_p == 0.0:
            raise _bad("top_p_decay cannot be set without top_p", "top_p_decay")
        if not 0 <= top_p_decay <= 1.0:
            raise _bad("top_p_decay must be less than or equal to 1.0", "top_p_decay")

    top_p_bound = doc.get("top_p_bound", 0.0)
    if "top_p_bound" in doc:
        if type(top_p_bound) is not float:
            raise _bad("top_p_bound must be a positive float less than or equal to top_p", "top_p_bound")
        if top_p == 0.0:
            raise _bad("top_p_bound cannot be set without top_p", "top_p_bound")
        if not 0.0 < top_p_bound <= top_p:
            raise _bad("top_p_bound must be greater than 0 and less than top_p", "top_p_bound")

    add_bos = _bool(doc, "add_BOS")
    if any(len(p) == 0 for p in prompts) and not add_bos:
        raise _bad("Empty prompts require add_BOS=true", "prompts")
    stop_on_double_eol = _bool(doc, "stop_on_double_eol")
    stop_on_eol = _bool(doc, "stop_on_eol")
    prevent_newline_after_colon = _bool(doc, "prevent_newline_after_colon")

    random_seed = doc.get("random_seed", -1)
    if "random_seed" in doc:
        if not isinstance(random_seed, int) or isinstance(random_seed, bool):
            raise _bad("random_seed must be integer", "random_seed")
        if random_seed < 0:
            raise _bad("random_seed must be a positive integer", "random_seed")
        if random_seed > INT64_MAX:
            raise _bad(f"random_seed must be less than or equal to {INT64_MAX}", "random_seed")
    if "no_log" in doc:
        _bool(doc, "no_log")
    if "stop_token" in doc and (
        not isinstance(doc["stop_token"], int) or isinstance(doc["stop_token"], bool)
    ):
        raise _bad("stop_token must be an integer", "stop_token")
    if "length_penalty" in doc and type(doc["length_penalty"]) is not float:
        raise _bad("length_penalty must be a float", "length_penalty")

    penalty = doc.get("repetition_penalty", 1.0)
    if type(penalty) not in (int, float) or not 0 < penalty <= 100.0:
        raise _bad(
            "repetition_penalty must be a positive number less than or equal to 100.0", "repetition_penalty"
        )

    return MegatronRequest(
        prompts=prompts,
        tokens_to_generate=tokens,
        logprobs=logprobs,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        top_p_decay=top_p_decay,
        top_p_bound=top_p_bound,
        add_BOS=add_bos,
        stop_on_double_eol=stop_on_double_eol,
        stop_on_eol=stop_on_eol,
        prevent_newline_after_colon=prevent_newline_after_colon,
        random_seed=random_seed,
        repetition_penalty=float(penalty),
    )


def to_grpc(r: MegatronRequest) -> pb.GenerateRequest:
    sampling = sampling_params(
        r.temperature,
        r.top_k,
        r.top_p,
        r.random_seed,
        r.repetition_penalty,
        top_p_decay=r.top_p_decay,
        top_p_bound=r.top_p_bound,
    )
    stopping = pb.StoppingParams(
        max_new_tokens=r.tokens_to_generate,
        stop_on_eol=r.stop_on_eol,
        stop_on_double_eol=r.stop_on_double_eol,
        prevent_newline_after_colon=r.prevent_newline_after_colon,
    )
    params = pb.GenerationParams(
        sampling=sampling,
        stopping=stopping,
        add_bos=r.add_BOS,
        prompt_logprobs=r.logprobs,
        logprobs=r.logprobs,
        echo=True,
    )
    return pb.GenerateRequest(prompts=[pb.Prompt(text=p) for p in r.prompts], params=params)


def from_grpc(resp: pb.GenerateResponse, logprobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"text": [], "segments": [], "logprobs": [] if logprobs else None, "tokens": []}
    for c in resp.completions:
        out["text"].append(c.full_text)
        out["segments"].append(list(c.prompt_tokens) + list(c.tokens))
        out["tokens"].append(list(c.prompt_token_ids) + list(c.token_ids))
        if logprobs:
            out["logprobs"].append(list(c.prompt_logprobs) + list(c.logprobs))
    return out


class MegatronGenerate(Resource):
    def __init__(self, pool) -> None:
        self.pool = pool

    def put(self):
        # the limit textgen enforces (GetModelInfo, cached): the two cannot drift apart
        req = parse(json_body(), self.pool.model_info().max_prompts_per_request or MAX_PROMPTS)
        resp = self.pool.unary("Generate", to_grpc(req))
        return json_response(from_grpc(resp, req.logprobs))
