"""OpenAI-style endpoints: /v1/completions, /v1/chat/completions, /v1/models, and vLLM's tokenizer routes.

``/v1/completions`` supports what lm-eval's ``local-completions`` needs to score log-likelihoods:
token-id prompts, ``echo`` with ``logprobs`` (one entry per prompt token, the first ``null``), and the
remote tokenizer routes ``/tokenizer_info``, ``/tokenize`` and ``/detokenize``. ``stream: true`` answers
server-sent events ending with ``data: [DONE]``. Unsupported options are refused with a 400 naming them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import Response, stream_with_context
from flask_restful import Resource

from protos.textgen.v1 import textgen_pb2 as pb
from services.gateway.fields import (
    finish_name,
    guided,
    integer,
    logit_bias,
    number,
    sampling_params,
    stop_list,
    token_ids,
)
from services.gateway.http import (
    SSE_DONE,
    SSE_HEADERS,
    HTTPError,
    json_body,
    json_response,
    sse,
    stream_error,
)
from services.gateway.tools import Tools, chat_messages, constraint, parse_tools, read_calls
from shared.errors import ServiceError
from shared.limits import INT64_MAX, MAX_N, MAX_OPENAI_PENALTY, MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS


def _check_unsupported(doc: dict[str, Any], chat: bool) -> None:
    if chat and doc.get("best_of") not in (None, 1):
        raise HTTPError(400, "best_of is a completions parameter", "best_of")
    if doc.get("suffix") not in (None, ""):
        raise HTTPError(400, "suffix is not supported", "suffix")
    if not chat and doc.get("tools"):  # refused, never silently ignored
        raise HTTPError(400, "tools are a chat completions parameter", "tools")


def _prompts(doc: dict[str, Any]) -> list[pb.Prompt]:
    if "prompt" not in doc:
        raise HTTPError(400, "prompt is required", "prompt")
    p = doc["prompt"]
    if isinstance(p, str):
        return [pb.Prompt(text=p)]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return [pb.Prompt(text=x) for x in p]
        ids = token_ids(p, "prompt")
        if ids is not None:
            return [pb.Prompt(tokens=pb.TokenIds(ids=ids))]
        lists = [token_ids(x, "prompt") if x else None for x in p]
        if all(x is not None for x in lists):
            return [pb.Prompt(tokens=pb.TokenIds(ids=x)) for x in lists]
    raise HTTPError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
        "prompt",
    )


@dataclass
class Options:
    stream: bool
    echo: bool
    logprobs: int | None
    include_usage: bool
    params: pb.GenerationParams
    n: int = 1
    best_of: int = 1  # candidates generated per prompt; the n with the highest cumulative logprob return


def parse_options(doc: dict[str, Any], *, chat: bool) -> Options:
    _check_unsupported(doc, chat)
    max_tokens = integer(
        doc,
        "max_completion_tokens" if chat and "max_completion_tokens" in doc else "max_tokens",
        16 if not chat else 256,
        0,
    )
    temperature = number(doc, "temperature", 1.0, 0.0, 100.0)
    top_p = number(doc, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = integer(doc, "top_k", 0, -1) or 0
    seed = integer(doc, "seed", -1, 0, INT64_MAX)
    penalty = number(doc, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True)
    presence = number(doc, "presence_penalty", 0.0, -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY)
    frequency = number(doc, "frequency_penalty", 0.0, -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY)
    min_tokens = integer(doc, "min_tokens", 0, 0, max_tokens)
    n = integer(doc, "n", 1, 1, MAX_N)
    best_of = n if chat else integer(doc, "best_of", n, 1, MAX_N)
    if best_of < n:
        raise HTTPError(400, f"best_of ({best_of}) must be >= n ({n})", "best_of")
    stop_ids = doc.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP_SEQUENCES:
        raise HTTPError(
            400, f"stop_token_ids must be a list of at most {MAX_STOP_SEQUENCES} token ids", "stop_token_ids"
        )
    stop_ids = token_ids(stop_ids, "stop_token_ids")
    if stop_ids is None:
        raise HTTPError(400, "stop_token_ids must be a list of token ids", "stop_token_ids")
    if chat:
        want = doc.get("logprobs", False)
        if not isinstance(want, bool):
            raise HTTPError(400, "logprobs must be a boolean", "logprobs")
        logprobs = integer(doc, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if want else None
        echo = False
    else:
        logprobs = integer(doc, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        echo = doc.get("echo", False)
        if not isinstance(echo, bool):
            raise HTTPError(400, "echo must be a boolean", "echo")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, "stream must be a boolean", "stream")
    if stream and best_of > n:
        raise HTTPError(400, "best_of > n cannot be streamed (the best are known at the end)", "best_of")
    ignore_eos = doc.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise HTTPError(400, "ignore_eos must be a boolean", "ignore_eos")
    stream_options = doc.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise HTTPError(400, "stream_options must be an object", "stream_options")
    sampling = sampling_params(
        temperature,
        top_k,
        top_p,
        seed,
        penalty,
        presence_penalty=presence,
        frequency_penalty=frequency,
        logit_bias=logit_bias(doc),
    )
    stopping = pb.StoppingParams(
        max_new_tokens=max_tokens,
        stop=stop_list(doc),
        ignore_eos=ignore_eos,
        min_tokens=min_tokens,
        stop_token_ids=stop_ids,
    )
    params = pb.GenerationParams(
        sampling=sampling,
        stopping=stopping,
        echo=echo,
        prompt_logprobs=echo and logprobs is not None,
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
        n=best_of,
    )
    constraint = guided(doc)
    if constraint is not None:
        params.guided.CopyFrom(constraint)
    if best_of > n:
        params.logprobs = True  # the candidates are ranked by their cumulative logprob
    return Options(
        stream=stream,
        echo=echo,
        logprobs=logprobs,
        include_usage=bool(stream_options.get("include_usage")),
        params=params,
        n=n,
        best_of=best_of,
    )


def _top_dict(t: pb.TopLogprobs) -> dict[str, float]:
    out: dict[str, float] = {}
    for tok, lp in zip(t.tokens, t.logprobs):
        out.setdefault(tok, lp)
    return out


def completion_logprobs(c: pb.Completion, echo: bool, n: int) -> dict[str, Any]:
    tokens, lps, tops = list(c.tokens), list(c.logprobs), [_top_dict(t) for t in c.top_logprobs] if n else []
    if echo:
        tokens = list(c.prompt_tokens) + tokens
        lps = [None, *c.prompt_logprobs] + lps
        if n:
            tops = [None, *(_top_dict(t) for t in c.prompt_top_logprobs)] + tops
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": tops if n else None,
        "text_offset": offsets,
    }


def pick_best(completions: list[pb.Completion], n: int, candidates: int) -> list[pb.Completion]:
    """Of each prompt's ``candidates`` completions (consecutive), the ``n`` with the highest cumulative
    logprob, best first (vLLM's best_of before its V1 engine); all of them when ``candidates == n``."""
    if candidates == n:
        return completions
    out = []
    for start in range(0, len(completions), candidates):
        group = completions[start : start + candidates]
        out += sorted(group, key=lambda c: -sum(c.logprobs))[:n]
    return out


def usage(completions: list[pb.Completion], n: int = 1) -> dict[str, int]:
    """Token counts as OpenAI reports them: a prompt counts once, however many of its n choices came back."""
    p = sum(len(c.prompt_token_ids) for c in completions if c.index % n == 0)
    g = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


class _Base(Resource):
    def __init__(self, pool) -> None:
        self.pool = pool

    def _model(self, doc: dict[str, Any]) -> str:
        info = self.pool.model_info()
        model = doc.get("model")
        if model is not None and (not isinstance(model, str) or model != info.name):
            raise HTTPError(404, f"model {model!r} not found; this server serves {info.name!r}", "model")
        return info.name

    def _stream(self, request: pb.GenerateStreamRequest, render) -> Response:
        """Start the stream (errors before the first event become HTTP errors), then relay it as SSE."""
        events = self.pool.stream(request)
        try:
            first = next(events)
        except StopIteration:
            first = None

        def body() -> Iterator[str]:
            try:
                if first is not None:
                    yield from render(first)
                for msg in events:
                    yield from render(msg)
                yield from render(None)
                yield SSE_DONE
            except ServiceError as e:
                yield sse(stream_error(e))
            finally:
                events.close()

        return Response(stream_with_context(body()), mimetype="text/event-stream", headers=SSE_HEADERS)


class Completions(_Base):
    def post(self):
        doc = json_body()
        model = self._model(doc)
        opts = parse_options(doc, chat=False)
        prompts = _prompts(doc)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if opts.stream:
            return self._stream(
                pb.GenerateStreamRequest(prompts=prompts, params=opts.params),
                self._renderer(cid, created, model, opts),
            )
        resp = self.pool.unary("Generate", pb.GenerateRequest(prompts=prompts, params=opts.params))
        choices = []
        for index, c in enumerate(pick_best(list(resp.completions), opts.n, opts.best_of)):
            text = (c.prompt_text + c.text) if opts.echo else c.text
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "finish_reason": finish_name(c.finish_reason),
                    "logprobs": completion_logprobs(c, opts.echo, opts.logprobs or 0)
                    if opts.logprobs is not None
                    else None,
                }
            )
        return json_response(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage(list(resp.completions), opts.best_of),
            }
        )

    @staticmethod
    def _renderer(cid: str, created: int, model: str, opts: Options):
        done: list[pb.Completion] = []

        def chunk(index: int, text: str, finish: str | None, logprobs: Any = None) -> str:
            return sse(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
                    ],
                }
            )

        def render(msg: pb.GenerateStreamResponse | None) -> Iterator[str]:
            if msg is None:
                if opts.include_usage:
                    yield sse(
                        {
                            "id": cid,
                            "object": "text_completion",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage(done, opts.n),
                        }
                    )
                return
            if msg.finished:
                done.append(msg.completion)
                yield chunk(msg.index, msg.text, finish_name(msg.completion.finish_reason))
            elif msg.text or opts.logprobs is not None:
                lp = None
                if opts.logprobs is not None:
                    lp = {
                        "tokens": [t.text for t in msg.tokens],
                        "token_logprobs": [t.logprob for t in msg.tokens],
                        "top_logprobs": [_top_dict(t.top) for t in msg.tokens] if opts.logprobs else None,
                    }
                yield chunk(msg.index, msg.text, None, lp)

        return render


def _chat_choice(c: pb.Completion, opts: Options, tools: Tools) -> dict[str, Any]:
    """One chat choice (with OpenAI's chat logprobs when asked for; a reply that is a tool call as
    ``tool_calls``)."""
    calls = read_calls(c.text, tools) if tools.active and finish_name(c.finish_reason) != "length" else None
    choice: dict[str, Any] = {
        "index": c.index,
        "message": {"role": "assistant", "content": c.text}
        if calls is None
        else {"role": "assistant", "content": None, "tool_calls": calls},
        "finish_reason": finish_name(c.finish_reason) if calls is None else "tool_calls",
        "logprobs": None,
    }
    if opts.logprobs is not None:
        tops = list(c.top_logprobs) or [pb.TopLogprobs()] * len(c.tokens)
        choice["logprobs"] = {
            "content": [
                {
                    "token": t,
                    "logprob": lp,
                    "top_logprobs": [{"token": a, "logprob": b} for a, b in zip(top.tokens, top.logprobs)]
                    if opts.logprobs
                    else [],
                }
                for t, lp, top in zip(c.tokens, c.logprobs, tops)
            ]
        }
    return choice


class ChatCompletions(_Base):
    def post(self):
        doc = json_body()
        model = self._model(doc)
        opts = parse_options(doc, chat=True)
        tools = parse_tools(doc)
        forced = constraint(tools)
        if forced is not None:
            if opts.params.HasField("guided"):
                raise HTTPError(400, "a forced tool call and response_format are exclusive", "tool_choice")
            opts.params.guided.CopyFrom(forced)
        msgs = chat_messages(doc)
        templ = self.pool.unary(
            "ApplyChatTemplate",
            pb.ApplyChatTemplateRequest(
                messages=msgs,
                add_generation_prompt=True,
                tools_json=json.dumps(tools.tools) if tools.active else "",
            ),
        )
        prompts = [pb.Prompt(text=templ.prompt)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if opts.stream:
            return self._stream(
                pb.GenerateStreamRequest(prompts=prompts, params=opts.params),
                self._renderer(cid, created, model, opts, tools),
            )
        resp = self.pool.unary("Generate", pb.GenerateRequest(prompts=prompts, params=opts.params))
        return json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [_chat_choice(c, opts, tools) for c in resp.completions],
                "usage": usage(list(resp.completions), opts.n),
            }
        )

    @staticmethod
    def _renderer(cid: str, created: int, model: str, opts: Options, tools: Tools):
        started: set[int] = set()  # choices whose role chunk went out
        done: list[pb.Completion] = []
        held: dict[int, str] = {}  # with tools, each choice's text until it is known to be a call or not

        def chunk(index: int, delta: dict[str, Any], finish: str | None) -> str:
            return sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
                }
            )

        def render(msg: pb.GenerateStreamResponse | None) -> Iterator[str]:
            if msg is None:
                if opts.include_usage:
                    yield sse(
                        {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage(done, opts.n),
                        }
                    )
                return
            if msg.index not in started:
                started.add(msg.index)
                yield chunk(msg.index, {"role": "assistant", "content": ""}, None)
            if tools.active:  # a call is known only at the end: the text goes out then, as a call or content
                held[msg.index] = held.get(msg.index, "") + msg.text
                if not msg.finished:
                    return
                done.append(msg.completion)
                text = held.pop(msg.index)
                calls = None
                if finish_name(msg.completion.finish_reason) != "length":
                    calls = read_calls(text, tools)
                if calls is None:
                    yield chunk(msg.index, {"content": text}, finish_name(msg.completion.finish_reason))
                else:
                    delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                    yield chunk(msg.index, delta, "tool_calls")
                return
            if msg.finished:
                done.append(msg.completion)
                yield chunk(
                    msg.index,
                    {"content": msg.text} if msg.text else {},
                    finish_name(msg.completion.finish_reason),
                )
            elif msg.text:
                yield chunk(msg.index, {"content": msg.text}, None)

        return render


class Models(_Base):
    def get(self):
        info = self.pool.model_info()
        return json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": info.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "megastack",
                        "max_model_len": info.max_context_tokens,
                    }
                ],
            }
        )


class TokenizerInfo(_Base):
    def get(self):
        info = self.pool.model_info()
        body: dict[str, Any] = {
            "eos_token": info.eos_token,
            "bos_token": info.bos_token or None,
            "pad_token": None,
            "model_max_length": info.max_context_tokens,
        }
        if info.chat_template:
            body["chat_template"] = info.chat_template
        return json_response(body)


class Tokenize(_Base):
    def post(self):
        doc = json_body()
        text = doc.get("prompt", doc.get("text"))
        if not isinstance(text, str):
            raise HTTPError(400, "prompt must be a string", "prompt")
        add = doc.get("add_special_tokens", False)
        if not isinstance(add, bool):
            raise HTTPError(400, "add_special_tokens must be a boolean", "add_special_tokens")
        resp = self.pool.unary(
            "Tokenize", pb.TokenizeRequest(text=text, add_special_tokens=add), timeout_s=30.0
        )
        return json_response(
            {
                "tokens": list(resp.ids),
                "count": len(resp.ids),
                "max_model_len": self.pool.model_info().max_context_tokens,
            }
        )


class Detokenize(_Base):
    def post(self):
        doc = json_body()
        ids = token_ids(doc.get("tokens"), "tokens")
        if ids is None:
            raise HTTPError(400, "tokens must be a list of token ids", "tokens")
        vocab = self.pool.model_info().vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise HTTPError(
                400, f"tokens: token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens"
            )
        resp = self.pool.unary("Detokenize", pb.DetokenizeRequest(ids=ids), timeout_s=30.0)
        return json_response({"prompt": resp.text})
