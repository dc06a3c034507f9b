"""An lm-evaluation-harness model backed by the textgen gRPC service.

``loglikelihood`` and ``loglikelihood_rolling`` score prompts (``max_new_tokens=0`` with prompt
log-probabilities and the top-1 alternative per position); ``generate_until`` generates with stop
strings. Requests travel in batches of ``batch_size`` prompts per Generate call, so the engine batches
them. Tokenization, truncation and slicing follow lm-eval's own API models (``TemplateLM._encode_pair``,
``max_length`` windows), which is why this model and lm-eval's ``local-completions`` pointed at the
gateway produce the same scores. With a :class:`~services.evaluator.request_cache.RequestCache`, answers
already known for this model and numeric mode are read from it and never sent.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import grpc
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from services.evaluator.request_cache import RequestCache, namespace, request_key
from shared.errors import Unavailable, from_rpc_error
from shared.grpc.channel import make_channel

logger = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]


DETERMINISM_SAMPLE = 16  # scored requests re-scored alone after a run (TextgenLM.determinism)


@register_model("megastack-textgen")
class TextgenLM(TemplateLM):
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        batch_size: int | str = 16,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        timeout_s: float = 600.0,
        progress: Progress | None = None,
        cache: RequestCache | None = None,
        **_: object,
    ) -> None:
        super().__init__()
        self.address = address
        self.channel = make_channel(address)
        self.stub = pb_grpc.TextGenServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.batch_size_per_call = max(1, int(batch_size)) if str(batch_size).isdigit() else 16
        self._progress = progress
        self._done = 0
        self._total = 0
        try:
            self.info = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        except grpc.RpcError as e:
            raise Unavailable(
                f"textgen at {address} is unreachable ({e.code().name}: {e.details()})"
            ) from None
        self._max_length = min(max_length, self.info.max_context_tokens)
        if cache is not None and not self.info.checkpoint_id:
            logger.warning("textgen at %s does not say which checkpoint it serves: no request cache", address)
            cache = None
        self.cache = cache
        self._ns = namespace(self.info) if cache is not None else ""
        self.sent = 0  # prompts sent to textgen (scored or generated), cache hits aside
        self.max_gen_toks = max_gen_toks
        self._encodings: dict[str, tuple[int, ...]] = {}
        # a sample of what was scored (prompt, first scored position, log-probs), re-scored alone afterwards
        self._scored: list[tuple[list[int], int, list[float]]] = []

    # -- what TemplateLM needs -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.info.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.info.bos_token_id if self.info.bos_token_id >= 0 else self.info.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.info.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The served model's own chat template (what ``apply_chat_template`` lays prompts out with)."""
        return self.info.chat_template if chat_template else ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """``chat_history`` as the served model lays out a conversation (its tokenizer's Jinja template,
        rendered as transformers renders it)."""
        from llm.chat_template import render

        return render(
            self.info.chat_template,
            chat_history,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.info.bos_token,
            eos_token=self.info.eos_token,
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self._encodings.get(string)
        if ids is None:
            ids = tuple(self._call(self.stub.Tokenize, pb.TokenizeRequest(text=string)).ids)
            self._cache_encoding(string, ids)
        return list(ids)

    def _cache_encoding(self, text: str, ids: tuple[int, ...]) -> None:
        if len(self._encodings) >= 200_000:
            self._encodings.clear()
        self._encodings[text] = ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self._call(self.stub.Detokenize, pb.DetokenizeRequest(ids=tokens)).text

    # -- plumbing --------------------------------------------------------------------------------
    def _call(self, method, request):
        return self._result(method.future(request, timeout=self.timeout_s))

    def _result(self, future):
        try:
            return future.result()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(
                    f"textgen at {self.address} went away during the evaluation ({e.details()})"
                ) from None
            raise from_rpc_error(e) from None

    def _phase(self, n: int, what: str) -> None:
        self._total += n
        self._report(what)

    def _report(self, what: str) -> None:
        if self._progress is not None:
            self._progress(self._done, self._total, what)

    def _score(
        self, prompts: list[list[int]], starts: list[int], what: str
    ) -> list[tuple[list[float], list[int]]]:
        """Log-probs and top-1 token ids of ``prompts[k][starts[k]:]`` given what precedes, ``batch_size``
        forward passes per call. Prompts go in order of length and content, so the answers of one question
        (equal but for the last token) travel in the same call, where the engine scores them with one forward
        pass, and padding stays small; each call asks only for the positions its prompts need. Answers in
        the request cache are not sent; each call's answers are stored as it returns."""
        out: list[tuple[list[float], list[int]] | None] = [None] * len(prompts)
        keys = [request_key(self._ns, "score", p, str(max(1, a))) for p, a in zip(prompts, starts)]
        self._from_cache(keys, out, what)
        todo = [k for k in range(len(prompts)) if out[k] is None]
        order = sorted(todo, key=lambda i: (len(prompts[i]), prompts[i][:-1]))
        in_flight: deque = deque()  # two calls in flight: the engine starts the next one without a round trip

        def collect() -> None:
            chunk, future = in_flight.popleft()
            answers = {}
            for k, c in zip(chunk, self._result(future).completions):
                out[k] = (list(c.prompt_logprobs), [t.token_ids[0] for t in c.prompt_top_logprobs])
                answers[keys[k]] = out[k]
                if len(self._scored) < DETERMINISM_SAMPLE and len(chunk) > 1:
                    self._scored.append((prompts[k], max(1, starts[k]), out[k][0]))
            if self.cache is not None:
                self.cache.put_many(answers)
            self.sent += len(chunk)
            self._done += len(chunk)
            self._report(what)

        for chunk in self._chunks(order, prompts):
            # each prompt scored from its own first position: what it gets back does not depend on the others
            params = pb.GenerationParams(
                sampling=pb.SamplingParams(greedy=True),
                stopping=pb.StoppingParams(max_new_tokens=0),
                prompt_logprobs=True,
                top_logprobs=1,
            )
            request = pb.GenerateRequest(
                prompts=[
                    pb.Prompt(tokens=pb.TokenIds(ids=prompts[k]), logprobs_from=max(1, starts[k]))
                    for k in chunk
                ],
                params=params,
            )
            in_flight.append((chunk, self.stub.Generate.future(request, timeout=self.timeout_s)))
            if len(in_flight) == 2:
                try:
                    collect()
                except BaseException:
                    for _, pending in in_flight:  # nothing left running (or to finalise) behind a failure
                        pending.cancel()
                    in_flight.clear()
                    raise
        while in_flight:
            collect()
        return out

    def _from_cache(self, keys: list[str], out: list, what: str) -> None:
        """``out[k]`` = the cached answer of ``keys[k]`` where the request cache has one, counted as done."""
        if self.cache is None:
            return
        known = self.cache.get_many(keys)
        for k, key in enumerate(keys):
            if key in known:
                out[k] = known[key]
        self._done += sum(x is not None for x in out)
        self._report(what)

    def determinism(self) -> float | None:
        """The fraction of a sample of scored requests whose log-probs come back bit for bit the same when
        each is sent again alone (a different batch composition from the run's); None when nothing was
        scored in a batch."""
        if not self._scored:
            return None
        same = 0
        for ids, start, logprobs in self._scored:
            params = pb.GenerationParams(
                sampling=pb.SamplingParams(greedy=True),
                stopping=pb.StoppingParams(max_new_tokens=0),
                prompt_logprobs=True,
                prompt_logprobs_from=start,
            )
            request = pb.GenerateRequest(prompts=[pb.Prompt(tokens=pb.TokenIds(ids=ids))], params=params)
            again = list(self._call(self.stub.Generate, request).completions[0].prompt_logprobs)
            same += again == logprobs
        return same / len(self._scored)

    def _chunks(self, order: list[int], prompts: list[list[int]]):
        """Calls of ``batch_size`` distinct forward passes: prompts that differ only in their last token
        count once (the engine scores them together), up to the server's prompts-per-call limit."""
        chunk: list[int] = []
        keys: set[tuple[int, ...]] = set()
        for k in order:
            key = tuple(prompts[k][:-1])
            if chunk and (
                (key not in keys and len(keys) == self.batch_size_per_call)
                or len(chunk) == self.info.max_prompts_per_request
            ):
                yield chunk
                chunk, keys = [], set()
            chunk.append(k)
            keys.add(key)
        if chunk:
            yield chunk

    def _encode_many(self, texts: list[str]) -> None:
        """Tokenize many strings in one call, into the encode cache."""
        todo = list(dict.fromkeys(t for t in texts if t))
        for i in range(0, len(todo), 1024):
            part = todo[i : i + 1024]
            resp = self._call(self.stub.Tokenize, pb.TokenizeRequest(texts=part))
            for text, enc in zip(part, resp.encoded):
                self._cache_encoding(text, tuple(enc.ids))

    # -- the three request types -----------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        texts = []
        for context, continuation in (req.args for req in requests):
            n = len(context) - len(context.rstrip())  # as TemplateLM._encode_pair moves trailing spaces
            texts += [context + continuation, context[: len(context) - n]] if context else [continuation]
        self._encode_many(texts)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, override_bs=None
    ) -> list[tuple[float, bool]]:
        inputs, starts = [], []
        for _, context_enc, continuation_enc in requests:
            whole = context_enc + continuation_enc
            inp = whole[-self.max_length :]
            inputs.append(inp)
            # the continuation is inp[start:]; token 0 has no prediction, so it is never scored
            starts.append(max(1, len(context_enc) - max(0, len(whole) - self.max_length)))
        self._phase(len(inputs), "loglikelihood")
        results = []
        for (key, _, _), inp, start, (lps, tops) in zip(
            requests, inputs, starts, self._score(inputs, starts, "loglikelihood")
        ):
            targets = inp[start:]
            answer = (float(sum(lps)), all(t == tok for t, tok in zip(tops, targets)))
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._encode_many([req.args[0] for req in requests])
        out = []
        for (string,) in [req.args for req in requests]:
            windows = [
                (None,) + w
                for w in map(
                    utils.make_disjoint_window,
                    utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length - 1,
                        context_len=1,
                    ),
                )
            ]
            total = sum(x[0] for x in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def _gen_params(self, gen_kwargs: dict) -> tuple[tuple, pb.GenerationParams]:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        sample = bool(kw.pop("do_sample", False)) and temperature > 0
        top_p = float(kw.pop("top_p", 0.0) or 0.0) if sample else 0.0
        params = pb.GenerationParams(
            sampling=pb.SamplingParams(
                greedy=not sample, temperature=temperature if sample else 1.0, top_p=top_p, seed=1234
            ),
            stopping=pb.StoppingParams(max_new_tokens=max_new, stop=until),
        )
        return (tuple(until), max_new, sample, temperature, top_p), params

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings go together, ``batch_size`` prompts per call."""
        self._phase(len(requests), "generate_until")
        self._encode_many([req.args[0] for req in requests])
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        params_of: dict[tuple, pb.GenerationParams] = {}
        cache_keys: list[str] = []
        prompt_ids: list[list[int]] = []  # each request's prompt, cut to leave room for its generation
        for i, req in enumerate(requests):
            key, params = self._gen_params(req.args[1])
            prompt_ids.append(
                self.tok_encode(req.args[0])[-(self.max_length - params.stopping.max_new_tokens) :]
            )
            cache_keys.append(
                request_key(self._ns, "generate", prompt_ids[i], params.SerializeToString(deterministic=True))
            )
            groups.setdefault(key, []).append(i)
            params_of[key] = params
        self._from_cache(cache_keys, out, "generate_until")
        groups = {k: [i for i in idxs if out[i] is None] for k, idxs in groups.items()}
        for key, idxs in groups.items():
            params = params_of[key]
            for j in range(0, len(idxs), self.batch_size_per_call):
                chunk = idxs[j : j + self.batch_size_per_call]
                prompts = [pb.Prompt(tokens=pb.TokenIds(ids=prompt_ids[i])) for i in chunk]
                resp = self._call(self.stub.Generate, pb.GenerateRequest(prompts=prompts, params=params))
                for i, c in zip(chunk, resp.completions):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
                if self.cache is not None:
                    self.cache.put_many({cache_keys[i]: out[i] for i in chunk})
                self.sent += len(chunk)
                self._done += len(chunk)
                self._report("generate_until")
        return [x or "" for x in out]
